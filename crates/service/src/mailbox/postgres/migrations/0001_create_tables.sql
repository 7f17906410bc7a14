-- Runs with search_path set to the mailbox schema, so the names below are
-- created there. Times are milliseconds since the Unix epoch.

-- One row per recipient. Every append, ack and expiry of a recipient locks
-- this row first, so writes to one recipient run one at a time.
CREATE TABLE mailbox_counters (
    recipient text PRIMARY KEY,
    -- The highest seq assigned, 0 before the first append.
    last_seq bigint NOT NULL DEFAULT 0,
    -- Messages stored, including expired ones not deleted yet.
    stored bigint NOT NULL DEFAULT 0,
    -- The received_at_ms of the message with last_seq.
    last_received_at_ms bigint NOT NULL DEFAULT 0
);

CREATE TABLE messages (
    recipient text NOT NULL,
    seq bigint NOT NULL,
    sender text NOT NULL,
    message_id text NOT NULL,
    received_at_ms bigint NOT NULL,
    envelope_json text NOT NULL,
    PRIMARY KEY (recipient, seq)
);

-- Acks by message id.
CREATE INDEX messages_recipient_message_id ON messages (recipient, message_id);
-- Expiry finds the recipients with expired messages.
CREATE INDEX messages_received_at_ms ON messages (received_at_ms);

-- The first message with a (recipient, sender, message_id), kept while that
-- message is stored or the dedupe window is open.
CREATE TABLE dedupe (
    recipient text NOT NULL,
    sender text NOT NULL,
    message_id text NOT NULL,
    seq bigint NOT NULL,
    -- The 128-bit content hash, big-endian.
    content_hash bytea NOT NULL,
    accepted_at_ms bigint NOT NULL,
    PRIMARY KEY (recipient, sender, message_id)
);

-- Deleting the records of deleted messages.
CREATE INDEX dedupe_recipient_seq ON dedupe (recipient, seq);
-- Sweeping records whose window has passed.
CREATE INDEX dedupe_accepted_at_ms ON dedupe (accepted_at_ms);
