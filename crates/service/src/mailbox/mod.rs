//! The mailbox: a durable, per-recipient, append-only log keyed by `seq`.
//! It is the truth of the service; presence and the delivery bus are hints.
//!
//! Backends: [`embedded::EmbeddedMailbox`] (an append-only log in `data_dir`) and
//! [`postgres::PostgresMailbox`] (PostgreSQL, shared by a cluster).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use routing_protocol::Address;

pub mod embedded;
pub mod postgres;

#[cfg(test)]
pub(crate) mod conformance;

/// Limits and retention that every mailbox backend applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxSettings {
    /// Stored messages per recipient before `append` fails with
    /// [`MailboxError::Full`] (`limits.max_stored_per_user`).
    pub max_stored_per_user: u64,
    /// How long an unacknowledged message is kept (`limits.message_ttl`).
    pub message_ttl: Duration,
    /// How long after its acceptance a (recipient, sender, messageId) is
    /// remembered, even once the message is gone (`limits.dedupe_window`).
    pub dedupe_window: Duration,
}

impl From<&crate::config::LimitsConfig> for MailboxSettings {
    fn from(limits: &crate::config::LimitsConfig) -> Self {
        Self {
            max_stored_per_user: limits.max_stored_per_user,
            message_ttl: limits.message_ttl,
            dedupe_window: limits.dedupe_window,
        }
    }
}

/// Converts a point in time to milliseconds since the Unix epoch, with
/// times before the epoch as 0 and times past `u64::MAX` ms as `u64::MAX`.
pub fn unix_millis(time: SystemTime) -> u64 {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    duration_millis(since_epoch)
}

/// Converts a duration to whole milliseconds, saturating at `u64::MAX`.
pub fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A message to append, validated and with its sender forced to the caller.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The recipient's address.
    pub recipient: Address,
    /// The authenticated sender's address.
    pub sender: Address,
    /// The sender's message id (or the server-assigned one).
    pub message_id: String,
    /// A hash of the envelope's content (the three byte fields), used to tell
    /// a retry (same content) from a conflict (other content).
    pub content_hash: u128,
    /// The envelope in its output form, as compact JSON.
    pub envelope_json: Arc<str>,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The per-recipient sequence number, starting at 1.
    pub seq: u64,
    /// When the mailbox accepted it, in milliseconds since the Unix epoch.
    /// Never decreases with `seq` for one recipient.
    pub received_at_ms: u64,
    /// The sender's message id.
    pub message_id: String,
    /// The envelope as compact JSON.
    pub envelope_json: Arc<str>,
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The message is new and durably stored.
    New(StoredMessage),
    /// The same (recipient, sender, messageId) with the same content was
    /// accepted before; nothing was stored. `seq` is the first one's.
    Duplicate {
        /// The seq of the first message.
        seq: u64,
    },
}

/// What an ack removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckTarget {
    /// Every message with `seq <= up_to`.
    UpTo(u64),
    /// The messages with these message ids, from any sender.
    Ids(Vec<String>),
}

/// Why a mailbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    /// The recipient holds `limit` messages already.
    #[error("the recipient's mailbox holds the maximum of {limit} messages")]
    Full {
        /// `limits.max_stored_per_user`.
        limit: u64,
    },
    /// The same (recipient, sender, messageId) was accepted with other content.
    #[error("messageId {message_id} was already used for another message to this recipient")]
    Conflict {
        /// The reused message id.
        message_id: String,
    },
    /// The backend cannot be reached or is shutting down; retry later.
    #[error("the mailbox is unavailable: {0}")]
    Unavailable(String),
    /// An unexpected failure, such as corrupt data.
    #[error("mailbox failure: {0}")]
    Internal(String),
}

/// The durable mailbox. Every backend keeps these guarantees, checked by
/// the conformance suite in `conformance.rs`:
///
/// - `append` returns only after the message is durable: it survives a
///   crash of the process from then on.
/// - `seq` is assigned per recipient, strictly increasing from 1, and never
///   reused, even after acks, expiry or a restart.
/// - A repeated (recipient, sender, messageId) with the same content, while
///   the first is stored or within the dedupe window of its acceptance,
///   returns [`Appended::Duplicate`] and stores nothing; with other content it
///   fails with [`MailboxError::Conflict`]. After both have passed, it is new.
/// - A recipient holding `max_stored_per_user` messages makes `append` fail
///   with [`MailboxError::Full`].
/// - `read` returns stored, unexpired messages with `seq > after`, in `seq`
///   order, at most `limit` of them. Reading deletes nothing.
/// - `ack` deletes only the named recipient's messages; acking a seq above
///   the highest assigned one acks only what exists.
/// - Messages older than the TTL are never returned, and `expire` deletes them.
#[async_trait]
pub trait Mailbox: Send + Sync + 'static {
    /// Appends a message durably, with deduplication and the mailbox limit.
    async fn append(&self, message: NewMessage) -> Result<Appended, MailboxError>;

    /// Reads up to `limit` stored messages of `recipient` with `seq > after`.
    async fn read(
        &self,
        recipient: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MailboxError>;

    /// Deletes acknowledged messages of `recipient`; returns how many were deleted.
    async fn ack(&self, recipient: &Address, target: AckTarget) -> Result<u64, MailboxError>;

    /// Counts the stored messages of `recipient`.
    async fn count(&self, recipient: &Address) -> Result<u64, MailboxError>;

    /// Deletes every message accepted before `now - message_ttl`, and dedupe
    /// records that can no longer match; returns how many messages were deleted.
    async fn expire(&self, now: SystemTime) -> Result<u64, MailboxError>;

    /// Checks that the backend answers, for `/readyz`.
    async fn check(&self) -> Result<(), MailboxError>;

    /// Finishes in-flight appends and acks, then rejects new calls with
    /// [`MailboxError::Unavailable`].
    async fn close(&self);
}
