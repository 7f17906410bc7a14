-- Functions that run each write of the mailbox as one statement on the
-- server, so a call is one round trip and the recipient's counter row is
-- locked only while the function runs and its transaction commits.
--
-- Runs with search_path set to the mailbox schema. `SET search_path FROM
-- CURRENT` pins that path into each function, so a function resolves the
-- tables of its own schema whatever path the calling session has.
-- Times are milliseconds since the Unix epoch on the caller's clock.

-- Locks the recipient's counter row, creating it first for a new
-- recipient, and returns it. Counter rows are never deleted, so the second
-- lookup finds the row that this or a concurrent call inserted.
CREATE FUNCTION lock_counter_row(p_recipient text)
RETURNS mailbox_counters
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    counter mailbox_counters;
BEGIN
    SELECT * INTO counter FROM mailbox_counters
        WHERE recipient = p_recipient FOR UPDATE;
    IF FOUND THEN
        RETURN counter;
    END IF;

    INSERT INTO mailbox_counters (recipient) VALUES (p_recipient)
        ON CONFLICT (recipient) DO NOTHING;
    SELECT * INTO STRICT counter FROM mailbox_counters
        WHERE recipient = p_recipient FOR UPDATE;
    RETURN counter;
END
$$;

-- Appends one message under the recipient's counter lock.
--
-- Returns one row. `outcome` is:
--   'new':       stored with `seq` and `received_at_ms`;
--   'duplicate': a live dedupe record with the same content hash exists,
--                and `seq` is its message's seq; nothing was stored;
--   'conflict':  a live dedupe record with another content hash exists;
--   'full':      the recipient holds p_max_stored messages after its
--                expired ones were deleted. Those deletions stay.
-- A dedupe record is live while its window is open (accepted_at_ms above
-- p_window_cutoff_ms) or its message is stored and unexpired
-- (received_at_ms above p_expired_cutoff_ms).
CREATE FUNCTION append_message(
    p_recipient text,
    p_sender text,
    p_message_id text,
    p_content_hash bytea,
    p_envelope_json text,
    p_now_ms bigint,
    p_window_cutoff_ms bigint,
    p_expired_cutoff_ms bigint,
    p_max_stored bigint,
    OUT outcome text,
    OUT seq bigint,
    OUT received_at_ms bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    counter mailbox_counters;
    first_seq bigint;
    first_hash bytea;
    expired bigint;
BEGIN
    counter := lock_counter_row(p_recipient);

    SELECT d.seq, d.content_hash INTO first_seq, first_hash FROM dedupe d
        WHERE d.recipient = p_recipient AND d.sender = p_sender
        AND d.message_id = p_message_id
        AND (d.accepted_at_ms > p_window_cutoff_ms OR EXISTS (
            SELECT 1 FROM messages m
            WHERE m.recipient = d.recipient AND m.seq = d.seq
            AND m.received_at_ms > p_expired_cutoff_ms));
    IF FOUND THEN
        outcome := CASE WHEN first_hash = p_content_hash
            THEN 'duplicate' ELSE 'conflict' END;
        seq := first_seq;
        RETURN;
    END IF;

    IF counter.stored >= p_max_stored THEN
        WITH gone AS (
            DELETE FROM messages m WHERE m.recipient = p_recipient
                AND m.received_at_ms <= p_expired_cutoff_ms
                RETURNING m.seq),
        forgotten AS (
            DELETE FROM dedupe d WHERE d.recipient = p_recipient
                AND d.accepted_at_ms <= p_window_cutoff_ms
                AND d.seq IN (SELECT gone.seq FROM gone))
        SELECT count(*) INTO expired FROM gone;
        counter.stored := greatest(counter.stored - expired, 0);
        IF counter.stored >= p_max_stored THEN
            IF expired > 0 THEN
                UPDATE mailbox_counters SET stored = counter.stored
                    WHERE recipient = p_recipient;
            END IF;
            outcome := 'full';
            RETURN;
        END IF;
    END IF;

    -- Raises 22003 (bigint out of range) once the seq would overflow.
    seq := counter.last_seq + 1;
    received_at_ms := greatest(counter.last_received_at_ms, p_now_ms);
    INSERT INTO messages
        (recipient, seq, sender, message_id, received_at_ms, envelope_json)
        VALUES (p_recipient, seq, p_sender, p_message_id, received_at_ms,
                p_envelope_json);
    -- A record that exists here is dead, so the new message replaces it.
    INSERT INTO dedupe AS d
        (recipient, sender, message_id, seq, content_hash, accepted_at_ms)
        VALUES (p_recipient, p_sender, p_message_id, seq, p_content_hash,
                received_at_ms)
        ON CONFLICT (recipient, sender, message_id) DO UPDATE SET
            seq = EXCLUDED.seq, content_hash = EXCLUDED.content_hash,
            accepted_at_ms = EXCLUDED.accepted_at_ms;
    UPDATE mailbox_counters SET last_seq = seq, stored = counter.stored + 1,
        last_received_at_ms = received_at_ms
        WHERE recipient = p_recipient;
    outcome := 'new';
END
$$;

-- Deletes the messages of a recipient with seq <= p_up_to, and the dedupe
-- records of those messages whose window has passed. Returns how many
-- messages it deleted, 0 for a recipient without a counter row.
CREATE FUNCTION ack_up_to(
    p_recipient text,
    p_window_cutoff_ms bigint,
    p_up_to bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM 1 FROM mailbox_counters
        WHERE recipient = p_recipient FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    WITH gone AS (
        DELETE FROM messages m WHERE m.recipient = p_recipient
            AND m.seq <= p_up_to
            RETURNING m.seq),
    forgotten AS (
        DELETE FROM dedupe d WHERE d.recipient = p_recipient
            AND d.accepted_at_ms <= p_window_cutoff_ms
            AND d.seq IN (SELECT gone.seq FROM gone))
    SELECT count(*) INTO deleted FROM gone;
    IF deleted > 0 THEN
        UPDATE mailbox_counters SET stored = greatest(stored - deleted, 0)
            WHERE recipient = p_recipient;
    END IF;
    RETURN deleted;
END
$$;

-- Deletes the messages of a recipient whose message id is in p_ids, from
-- any sender, like ack_up_to.
CREATE FUNCTION ack_message_ids(
    p_recipient text,
    p_window_cutoff_ms bigint,
    p_ids text[])
RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM 1 FROM mailbox_counters
        WHERE recipient = p_recipient FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;

    WITH gone AS (
        DELETE FROM messages m WHERE m.recipient = p_recipient
            AND m.message_id = ANY (p_ids)
            RETURNING m.seq),
    forgotten AS (
        DELETE FROM dedupe d WHERE d.recipient = p_recipient
            AND d.accepted_at_ms <= p_window_cutoff_ms
            AND d.seq IN (SELECT gone.seq FROM gone))
    SELECT count(*) INTO deleted FROM gone;
    IF deleted > 0 THEN
        UPDATE mailbox_counters SET stored = greatest(stored - deleted, 0)
            WHERE recipient = p_recipient;
    END IF;
    RETURN deleted;
END
$$;

-- Deletes up to p_batch of the lowest-seq expired messages of a recipient,
-- and the dedupe records of those whose window has passed. Expired
-- messages are the lowest seqs, because received_at_ms never decreases
-- with seq. Returns how many messages it deleted.
CREATE FUNCTION delete_expired_batch(
    p_recipient text,
    p_window_cutoff_ms bigint,
    p_expired_cutoff_ms bigint,
    p_batch bigint)
RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM lock_counter_row(p_recipient);

    WITH gone AS (
        DELETE FROM messages m WHERE m.recipient = p_recipient
            AND m.seq IN (
                SELECT e.seq FROM messages e WHERE e.recipient = p_recipient
                AND e.received_at_ms <= p_expired_cutoff_ms
                ORDER BY e.seq LIMIT p_batch)
            RETURNING m.seq),
    forgotten AS (
        DELETE FROM dedupe d WHERE d.recipient = p_recipient
            AND d.accepted_at_ms <= p_window_cutoff_ms
            AND d.seq IN (SELECT gone.seq FROM gone))
    SELECT count(*) INTO deleted FROM gone;
    IF deleted > 0 THEN
        UPDATE mailbox_counters SET stored = greatest(stored - deleted, 0)
            WHERE recipient = p_recipient;
    END IF;
    RETURN deleted;
END
$$;
