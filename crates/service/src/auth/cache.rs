//! A bounded cache of verified HS256 tokens, keyed by the exact token text,
//! so a client that sends many requests with one token has its signature
//! and claims checked once instead of per request.
//!
//! Only HS256 tokens are cached, because their key (`JWT_SECRET`) cannot
//! change while the process runs. A JWKS key can be rotated out, and a
//! cached token would outlive that. An entry is used only while `exp` plus
//! the leeway has not passed and for at most [`MAX_ENTRY_AGE`], so the
//! checks that depend on the clock (`exp`, `nbf`, `iat`) have the result
//! that a full verification would have.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Identity;

/// The maximum number of cached tokens.
pub const MAX_ENTRIES: usize = 4096;
/// Tokens longer than this, in bytes, are verified every time. With
/// [`MAX_ENTRIES`] this bounds the cache's token text to 4 MiB.
pub const MAX_CACHED_TOKEN_BYTES: usize = 1024;
/// How long an entry is used after its token was verified. A short age
/// also bounds the effect of the wall clock stepping backwards.
pub const MAX_ENTRY_AGE: Duration = Duration::from_secs(60);

/// Verified tokens and the identity each one names.
pub struct TokenCache {
    entries: Mutex<HashMap<Box<str>, Entry>>,
    max_entries: usize,
    max_age: Duration,
}

struct Entry {
    identity: Identity,
    /// The last Unix second at which the token is still accepted: `exp`
    /// plus the leeway.
    accepted_until: u64,
    verified_at: Instant,
}

impl TokenCache {
    /// Creates an empty cache of at most `max_entries` tokens, each used for
    /// at most `max_age`.
    pub fn new(max_entries: usize, max_age: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_entries,
            max_age,
        }
    }

    /// Returns the identity of a cached `token` that is still accepted at
    /// `now_unix` (seconds), and drops the entry when it is not.
    pub fn get(&self, token: &str, now_unix: u64) -> Option<Identity> {
        let mut entries = self.entries.lock().expect("token cache lock poisoned");
        let entry = entries.get(token)?;
        if now_unix > entry.accepted_until || entry.verified_at.elapsed() > self.max_age {
            entries.remove(token);
            return None;
        }
        Some(entry.identity.clone())
    }

    /// Caches a verified `token` that is accepted until `accepted_until`
    /// (Unix seconds). A token longer than [`MAX_CACHED_TOKEN_BYTES`] is not
    /// cached. When the cache is full, an arbitrary entry makes room.
    pub fn insert(&self, token: &str, identity: &Identity, accepted_until: u64) {
        if token.len() > MAX_CACHED_TOKEN_BYTES || self.max_entries == 0 {
            return;
        }
        let mut entries = self.entries.lock().expect("token cache lock poisoned");
        if entries.len() >= self.max_entries && !entries.contains_key(token) {
            let evicted = entries.keys().next().cloned();
            if let Some(evicted) = evicted {
                entries.remove(&evicted);
            }
        }
        entries.insert(
            token.into(),
            Entry {
                identity: identity.clone(),
                accepted_until,
                verified_at: Instant::now(),
            },
        );
    }

    /// Returns the number of cached tokens.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .expect("token cache lock poisoned")
            .len()
    }
}

#[cfg(test)]
mod tests {
    use routing_protocol::Address;

    use super::*;

    fn identity(user: &str) -> Identity {
        Identity {
            user: Address::from_id(user).expect("a valid id"),
            expires_at: 2_000,
        }
    }

    #[test]
    fn cached_token_returns_its_identity() {
        let cache = TokenCache::new(4, MAX_ENTRY_AGE);
        cache.insert("token-a", &identity("alice"), 2_030);
        assert_eq!(cache.get("token-a", 1_000), Some(identity("alice")));
        assert_eq!(cache.get("token-b", 1_000), None);
    }

    #[test]
    fn lookup_is_by_exact_token_text() {
        let cache = TokenCache::new(4, MAX_ENTRY_AGE);
        cache.insert("token-a", &identity("alice"), 2_030);
        assert_eq!(cache.get("token-a ", 1_000), None);
        assert_eq!(cache.get("TOKEN-A", 1_000), None);
        assert_eq!(cache.get("token-", 1_000), None);
    }

    #[test]
    fn entry_past_exp_and_leeway_is_dropped() {
        let cache = TokenCache::new(4, MAX_ENTRY_AGE);
        cache.insert("token-a", &identity("alice"), 2_030);
        assert!(
            cache.get("token-a", 2_030).is_some(),
            "the last second counts"
        );
        assert_eq!(cache.get("token-a", 2_031), None);
        assert_eq!(cache.len(), 0, "the expired entry is removed");
        assert_eq!(
            cache.get("token-a", 1_000),
            None,
            "a removed entry does not come back"
        );
    }

    #[test]
    fn entry_older_than_max_age_is_dropped() {
        let cache = TokenCache::new(4, Duration::ZERO);
        cache.insert("token-a", &identity("alice"), 2_030);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(cache.get("token-a", 1_000), None);
    }

    #[test]
    fn entry_count_stays_within_bound() {
        let cache = TokenCache::new(3, MAX_ENTRY_AGE);
        for index in 0..10 {
            cache.insert(&format!("token-{index}"), &identity("alice"), 2_030);
            assert!(cache.len() <= 3, "{} entries after {index}", cache.len());
        }
        assert!(
            cache.get("token-9", 1_000).is_some(),
            "the newest entry is kept"
        );
    }

    #[test]
    fn reinserting_a_cached_token_evicts_nothing() {
        let cache = TokenCache::new(2, MAX_ENTRY_AGE);
        cache.insert("token-a", &identity("alice"), 2_030);
        cache.insert("token-b", &identity("bob"), 2_030);
        cache.insert("token-a", &identity("alice"), 2_030);
        assert!(cache.get("token-a", 1_000).is_some());
        assert!(cache.get("token-b", 1_000).is_some());
    }

    #[test]
    fn long_token_is_not_cached() {
        let cache = TokenCache::new(4, MAX_ENTRY_AGE);
        let long = "a".repeat(MAX_CACHED_TOKEN_BYTES + 1);
        cache.insert(&long, &identity("alice"), 2_030);
        assert_eq!(cache.get(&long, 1_000), None);
        assert_eq!(cache.len(), 0);
    }
}
