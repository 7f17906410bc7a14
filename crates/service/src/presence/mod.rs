//! Presence: which instances hold connections of a user. A hint only: a
//! stale entry costs a wasted delivery, never a message.

use async_trait::async_trait;
use routing_protocol::Address;

pub mod memory;
pub mod redis;

#[cfg(test)]
pub(crate) mod conformance;

/// How long a backend may serve `lookup` from a cache. A connection
/// rereads the mailbox this long after it registers, so a message routed
/// with a stale answer still reaches it.
pub const LOOKUP_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// A process's id, used for presence and its delivery bus subject.
pub type InstanceId = std::sync::Arc<str>;

/// Why a presence call failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The backend cannot be reached; retry later.
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
}

/// Leases of (user, instance) pairs. Every backend keeps these guarantees:
///
/// - After `register(user, instance)` and before the matching `unregister`,
///   `lookup(user)` includes `instance` (for backends with leases, as long
///   as the instance keeps refreshing).
/// - `register` and `unregister` count: a user with two connections on one
///   instance stays present until both are unregistered.
/// - `lookup` returns each instance at most once. Its answer may be up to
///   [`LOOKUP_CACHE_TTL`] old for registrations made by other processes.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records that `instance` has one more connection of `user`.
    async fn register(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError>;

    /// Records that `instance` has one connection fewer of `user`.
    async fn unregister(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError>;

    /// Returns every instance that has a connection of `user`.
    async fn lookup(&self, user: &Address) -> Result<Vec<InstanceId>, PresenceError>;

    /// Checks that the backend responds, for `/readyz`.
    async fn check(&self) -> Result<(), PresenceError>;
}
