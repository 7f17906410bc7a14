//! Presence on Redis for cluster mode: one lease per (user, instance), so
//! the entries of a crashed instance vanish when their leases run out.
//!
//! Each user has a sorted set `<prefix>:presence:<user id>`. Its members are
//! instance ids and its scores are lease expiries in milliseconds of the
//! Redis server's clock. Every script reads the time with `TIME` on the
//! server, so the instances' clocks need not agree. The set's own key expiry
//! is kept at or past its latest lease, so the keys of idle users vanish too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use routing_protocol::Address;
use tokio_util::sync::CancellationToken;

use super::{InstanceId, LOOKUP_CACHE_TTL, Presence, PresenceError};

/// Users whose lookup answers are cached at once; past this, stale answers
/// are dropped, then all of them.
const MAX_CACHED_LOOKUPS: usize = 100_000;

/// Time allowed to open a TCP connection to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Time allowed for one Redis reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// (user, instance) pairs refreshed per script call.
const REFRESH_BATCH: usize = 256;

/// Adds or renews one lease and extends the key's expiry to cover it.
/// KEYS[1]: the user's set. ARGV: instance id, lease TTL in milliseconds.
const REGISTER_SCRIPT: &str = r"
local time = redis.call('TIME')
local ttl = tonumber(ARGV[2])
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + ttl
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";

/// Renews leases that still exist, and returns the 1-based positions of
/// those that were missing. Missing leases are not re-created here, because
/// an `unregister` may have removed them since the caller took its snapshot.
/// KEYS: the users' sets. ARGV[1]: lease TTL in milliseconds; ARGV[i + 1]:
/// the instance id for KEYS[i].
const REFRESH_SCRIPT: &str = r"
local time = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + ttl
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', expiry, ARGV[i + 1]) == 0 then
    missing[#missing + 1] = i
  elseif redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return missing
";

/// Removes expired leases and returns the instances whose lease is live.
/// KEYS[1]: the user's set.
const LOOKUP_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
";

/// Presence stored in Redis with leases that this process keeps refreshing.
///
/// Clones share one connection, one table of local connection counts and
/// one refresh task. The refresh task stops when the last clone is dropped,
/// and the leases it was refreshing then expire after the lease TTL.
#[derive(Clone)]
pub struct RedisPresence {
    inner: Arc<Inner>,
}

struct Inner {
    connection: ConnectionManager,
    key_prefix: String,
    lease_ttl_ms: u64,
    /// Open connections per (user, instance) in this process.
    counts: Mutex<HashMap<(Address, InstanceId), usize>>,
    /// Recent `lookup` answers, so a busy recipient costs one Redis call per
    /// [`LOOKUP_CACHE_TTL`] instead of one per message.
    lookups: Mutex<HashMap<Address, (Instant, Vec<InstanceId>)>>,
    /// Whether the last Redis call reached the server, so that each change
    /// is logged once.
    reachable: AtomicBool,
    stop: CancellationToken,
    register_script: Script,
    refresh_script: Script,
    lookup_script: Script,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("key_prefix", &self.inner.key_prefix)
            .field("lease_ttl_ms", &self.inner.lease_ttl_ms)
            .finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// Connects to the Redis server at `url` (`redis://`), stores keys under
    /// `key_prefix` and starts the task that refreshes this process's leases
    /// every `lease_ttl / 3`.
    ///
    /// Fails with `Unavailable` when the URL is invalid, the server cannot be
    /// reached, or `lease_ttl` is shorter than 3 ms.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        lease_ttl: Duration,
    ) -> Result<Self, PresenceError> {
        let lease_ttl_ms = u64::try_from(lease_ttl.as_millis()).unwrap_or(u64::MAX);
        if lease_ttl_ms < 3 {
            return Err(PresenceError::Unavailable(format!(
                "lease TTL of {lease_ttl:?} is too short; use at least 3 ms"
            )));
        }
        // NOTE: TLS (`rediss://`) is rejected by the client because the
        // redis crate is built without a TLS feature.
        let client = redis::Client::open(url)
            .map_err(|err| PresenceError::Unavailable(format!("invalid Redis URL: {err}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;

        let inner = Arc::new(Inner {
            connection,
            key_prefix: key_prefix.to_owned(),
            lease_ttl_ms,
            counts: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
            reachable: AtomicBool::new(true),
            stop: CancellationToken::new(),
            register_script: Script::new(REGISTER_SCRIPT),
            refresh_script: Script::new(REFRESH_SCRIPT),
            lookup_script: Script::new(LOOKUP_SCRIPT),
        });
        let period = Duration::from_millis(lease_ttl_ms / 3);
        tokio::spawn(refresh_leases(
            Arc::downgrade(&inner),
            inner.stop.clone(),
            period,
        ));
        tracing::info!(key_prefix, lease_ttl_ms, "redis presence connected");
        Ok(Self { inner })
    }
}

/// Renews every local lease each `period` until `stop` is cancelled or the
/// presence is dropped.
async fn refresh_leases(inner: Weak<Inner>, stop: CancellationToken, period: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(err) = inner.refresh_all().await {
            tracing::debug!(error = %err, "presence lease refresh failed; retrying next period");
        }
    }
}

impl Inner {
    fn user_key(&self, user: &Address) -> String {
        format!("{}:presence:{}", self.key_prefix, user.id())
    }

    /// Counts one more connection and returns whether it is the first.
    fn cached_lookup(&self, user: &Address) -> Option<Vec<InstanceId>> {
        let lookups = self.lookups.lock().expect("presence lock poisoned");
        let (at, instances) = lookups.get(user)?;
        (at.elapsed() < LOOKUP_CACHE_TTL).then(|| instances.clone())
    }

    fn cache_lookup(&self, user: &Address, instances: &[InstanceId], asked_at: Instant) {
        let mut lookups = self.lookups.lock().expect("presence lock poisoned");
        if lookups.len() >= MAX_CACHED_LOOKUPS {
            lookups.retain(|_, (at, _)| at.elapsed() < LOOKUP_CACHE_TTL);
            if lookups.len() >= MAX_CACHED_LOOKUPS {
                lookups.clear();
            }
        }
        lookups.insert(user.clone(), (asked_at, instances.to_vec()));
    }

    /// Drops a cached answer after this process changed the user's presence.
    fn forget_lookup(&self, user: &Address) {
        self.lookups
            .lock()
            .expect("presence lock poisoned")
            .remove(user);
    }

    fn count_up(&self, user: &Address, instance: &InstanceId) -> bool {
        let mut counts = self.counts.lock().expect("presence lock poisoned");
        let count = counts.entry((user.clone(), instance.clone())).or_default();
        *count += 1;
        *count == 1
    }

    /// Counts one connection fewer and returns whether it was the last.
    fn count_down(&self, user: &Address, instance: &InstanceId) -> bool {
        let mut counts = self.counts.lock().expect("presence lock poisoned");
        let pair = (user.clone(), instance.clone());
        let Some(count) = counts.get_mut(&pair) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        counts.remove(&pair);
        true
    }

    fn is_counted(&self, user: &Address, instance: &InstanceId) -> bool {
        let counts = self.counts.lock().expect("presence lock poisoned");
        counts.contains_key(&(user.clone(), instance.clone()))
    }

    async fn write_lease(
        &self,
        user: &Address,
        instance: &InstanceId,
    ) -> Result<(), PresenceError> {
        let result = self
            .register_script
            .key(self.user_key(user))
            .arg(instance.as_ref())
            .arg(self.lease_ttl_ms)
            .invoke_async::<i64>(&mut self.connection.clone())
            .await;
        self.observe(result).map(drop)
    }

    async fn refresh_all(&self) -> Result<(), PresenceError> {
        let pairs: Vec<(Address, InstanceId)> = {
            let counts = self.counts.lock().expect("presence lock poisoned");
            counts.keys().cloned().collect()
        };
        for batch in pairs.chunks(REFRESH_BATCH) {
            let missing = self.refresh_batch(batch).await?;
            for (user, instance) in missing {
                // An unregister since the snapshot means the lease is gone
                // on purpose; only a pair still counted here is re-created.
                if self.is_counted(user, instance) {
                    self.write_lease(user, instance).await?;
                }
            }
        }
        Ok(())
    }

    /// Renews the leases of `batch` in one round trip and returns the pairs
    /// whose lease had vanished, such as after a Redis restart.
    async fn refresh_batch<'a>(
        &self,
        batch: &'a [(Address, InstanceId)],
    ) -> Result<Vec<&'a (Address, InstanceId)>, PresenceError> {
        let mut invocation = self.refresh_script.prepare_invoke();
        invocation.arg(self.lease_ttl_ms);
        for (user, instance) in batch {
            invocation.key(self.user_key(user)).arg(instance.as_ref());
        }
        // NOTE: one script call touches many keys, which Redis Cluster
        // rejects unless they share a hash slot; this backend targets a
        // single Redis server.
        let result = invocation
            .invoke_async::<Vec<usize>>(&mut self.connection.clone())
            .await;
        let missing = self.observe(result)?;
        Ok(missing
            .into_iter()
            .filter_map(|position| batch.get(position.checked_sub(1)?))
            .collect())
    }

    /// Maps a Redis result to a presence result, and logs when the server
    /// becomes unreachable or reachable again.
    fn observe<T>(&self, result: Result<T, RedisError>) -> Result<T, PresenceError> {
        match result {
            Ok(value) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!("redis presence is reachable again");
                }
                Ok(value)
            }
            Err(err) => {
                let lost = err.is_io_error()
                    || err.is_timeout()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal();
                if lost && self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "redis presence is unreachable; reconnecting");
                }
                Err(unavailable(err))
            }
        }
    }
}

fn unavailable(err: RedisError) -> PresenceError {
    PresenceError::Unavailable(format!("redis: {err}"))
}

#[async_trait]
impl Presence for RedisPresence {
    async fn register(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError> {
        self.inner.forget_lookup(user);
        if !self.inner.count_up(user, instance) {
            return Ok(());
        }
        // On failure the count stays, so the refresh task writes the lease
        // once Redis responds again.
        self.inner.write_lease(user, instance).await
    }

    async fn unregister(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError> {
        self.inner.forget_lookup(user);
        if !self.inner.count_down(user, instance) {
            return Ok(());
        }
        // NOTE: a register of the same pair that races this call can have its
        // lease removed here. The next refresh writes it again within a third
        // of the lease TTL.
        let result = redis::cmd("ZREM")
            .arg(self.inner.user_key(user))
            .arg(instance.as_ref())
            .query_async::<i64>(&mut self.inner.connection.clone())
            .await;
        self.inner.observe(result).map(drop)
    }

    async fn lookup(&self, user: &Address) -> Result<Vec<InstanceId>, PresenceError> {
        if let Some(instances) = self.inner.cached_lookup(user) {
            return Ok(instances);
        }
        // The answer ages from before the request, so an answer that raced
        // a registration expires no later than the registration plus the TTL.
        let asked_at = Instant::now();
        let result = self
            .inner
            .lookup_script
            .key(self.inner.user_key(user))
            .invoke_async::<Vec<String>>(&mut self.inner.connection.clone())
            .await;
        let instances: Vec<InstanceId> = self
            .inner
            .observe(result)?
            .into_iter()
            .map(InstanceId::from)
            .collect();
        self.inner.cache_lookup(user, &instances, asked_at);
        Ok(instances)
    }

    async fn check(&self) -> Result<(), PresenceError> {
        let result = redis::cmd("PING")
            .query_async::<String>(&mut self.inner.connection.clone())
            .await;
        self.inner.observe(result).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use routing_protocol::Address;

    use super::RedisPresence;
    use crate::presence::{InstanceId, Presence};

    const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

    fn redis_url() -> String {
        std::env::var("ROUTING_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    fn unique_prefix() -> String {
        format!("routing-test-{}", uuid::Uuid::now_v7().simple())
    }

    fn user(id: &str) -> Address {
        Address::parse(id).expect("valid test id")
    }

    fn instance(id: &str) -> InstanceId {
        Arc::from(id)
    }

    async fn connect(prefix: &str, lease_ttl: Duration) -> RedisPresence {
        RedisPresence::connect(&redis_url(), prefix, lease_ttl)
            .await
            .expect("Redis is reachable at ROUTING_TEST_REDIS_URL or redis://127.0.0.1:6379")
    }

    async fn key_exists(presence: &RedisPresence, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut presence.inner.connection.clone())
            .await
            .expect("EXISTS returns a count")
            == 1
    }

    /// Deletes every key under `prefix`, best effort.
    async fn delete_keys(presence: &RedisPresence, prefix: &str) {
        let mut connection = presence.inner.connection.clone();
        let Ok(keys) = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async::<Vec<String>>(&mut connection)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _ = redis::cmd("DEL")
                .arg(keys)
                .query_async::<i64>(&mut connection)
                .await;
        }
    }

    #[tokio::test]
    async fn redis_presence_passes_conformance() {
        let prefix = unique_prefix();
        let presence = connect(&prefix, Duration::from_secs(10)).await;
        crate::presence::conformance::run_all(|| presence.clone()).await;
        delete_keys(&presence, &prefix).await;
    }

    #[tokio::test]
    async fn refreshed_lease_outlives_ttl() {
        let prefix = unique_prefix();
        let presence = connect(&prefix, Duration::from_millis(600)).await;
        let bob = user("refresh-bob");
        presence
            .register(&bob, &instance("refresh-1"))
            .await
            .unwrap();

        tokio::time::sleep(Duration::from_millis(2000)).await;

        assert_eq!(
            presence.lookup(&bob).await.unwrap(),
            vec![instance("refresh-1")],
            "the refresh task renews the lease"
        );
        delete_keys(&presence, &prefix).await;
    }

    #[tokio::test]
    async fn vanished_lease_is_rewritten() {
        let prefix = unique_prefix();
        let presence = connect(&prefix, Duration::from_millis(600)).await;
        let bob = user("vanish-bob");
        presence
            .register(&bob, &instance("vanish-1"))
            .await
            .unwrap();

        // Deleting the key simulates a Redis restart that lost its data.
        delete_keys(&presence, &prefix).await;
        assert!(presence.lookup(&bob).await.unwrap().is_empty());
        // Past the cached empty answer; the refresh runs every 200 ms.
        tokio::time::sleep(crate::presence::LOOKUP_CACHE_TTL + Duration::from_millis(200)).await;

        assert_eq!(
            presence.lookup(&bob).await.unwrap(),
            vec![instance("vanish-1")],
            "the refresh task writes a lease that vanished"
        );
        delete_keys(&presence, &prefix).await;
    }

    #[tokio::test]
    async fn crashed_instance_lease_expires() {
        let prefix = unique_prefix();
        let survivor = connect(&prefix, Duration::from_secs(10)).await;
        let crashed = connect(&prefix, Duration::from_millis(600)).await;
        let (bob, alice) = (user("crash-bob"), user("crash-alice"));
        survivor.register(&bob, &instance("alive-1")).await.unwrap();
        crashed
            .register(&bob, &instance("crashed-1"))
            .await
            .unwrap();
        crashed
            .register(&alice, &instance("crashed-1"))
            .await
            .unwrap();
        let mut found = survivor.lookup(&bob).await.unwrap();
        found.sort();
        assert_eq!(found, vec![instance("alive-1"), instance("crashed-1")]);

        // Dropping the only handle stops its refresh task, as a crash would.
        // The wait also outlasts the survivor's cached lookup answer.
        drop(crashed);
        tokio::time::sleep(crate::presence::LOOKUP_CACHE_TTL + Duration::from_millis(200)).await;

        assert_eq!(
            survivor.lookup(&bob).await.unwrap(),
            vec![instance("alive-1")]
        );
        let alice_key = format!("{prefix}:presence:crash-alice");
        assert!(
            !key_exists(&survivor, &alice_key).await,
            "the key of a user with no live lease expires"
        );
        assert!(survivor.lookup(&alice).await.unwrap().is_empty());
        delete_keys(&survivor, &prefix).await;
    }

    #[tokio::test]
    async fn check_pings_server() {
        let presence = connect(&unique_prefix(), Duration::from_secs(10)).await;
        presence.check().await.expect("PING succeeds");
    }
}

#[cfg(test)]
mod cache_tests {
    use std::time::Duration;

    use routing_protocol::Address;

    use super::*;

    #[tokio::test]
    async fn lookup_is_cached_until_local_change() {
        let url = std::env::var("ROUTING_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let prefix = format!("routing-test-cache-{}", std::process::id());
        let local = RedisPresence::connect(&url, &prefix, Duration::from_secs(5))
            .await
            .unwrap();
        let other = RedisPresence::connect(&url, &prefix, Duration::from_secs(5))
            .await
            .unwrap();
        let bob = Address::parse("cache-bob").unwrap();
        let (here, there): (InstanceId, InstanceId) = ("here-1".into(), "there-1".into());

        assert!(local.lookup(&bob).await.unwrap().is_empty());
        other.register(&bob, &there).await.unwrap();
        assert!(
            local.lookup(&bob).await.unwrap().is_empty(),
            "another process's registration is seen only after the cache TTL"
        );
        local.register(&bob, &here).await.unwrap();
        let mut found = local.lookup(&bob).await.unwrap();
        found.sort();
        assert_eq!(
            found,
            vec![here.clone(), there.clone()],
            "a local change drops the cache"
        );

        other.unregister(&bob, &there).await.unwrap();
        local.unregister(&bob, &here).await.unwrap();
    }
}
