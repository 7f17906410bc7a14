//! Configuration: the embedded `config.yaml`, an optional file, and
//! `ROUTING_` environment variables, validated into [`Config`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The embedded defaults; every valid key appears here.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../config.yaml");

/// The whole configuration of one process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `local` or `cluster` (`production` is read as `cluster`).
    pub run_mode: RunMode,
    /// The servers this process runs.
    pub roles: Vec<Role>,
    /// This process's id for presence and the delivery bus; empty: random.
    pub instance_id: String,
    /// The address both servers bind to.
    pub bind_address: IpAddr,
    /// HTTP API port; 0 picks a free port.
    pub api_port: u16,
    /// WebSocket port; 0 picks a free port.
    pub websocket_port: u16,
    /// The embedded store's folder.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// Allowed browser origins.
    pub cors: CorsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Presence backend.
    pub presence_cache: PresenceConfig,
    /// Delivery bus backend.
    pub delivery_bus: BusConfig,
    /// Mailbox backend.
    pub message_store: StoreConfig,
    /// Sizes, rates and retention.
    pub limits: LimitsConfig,
    /// WebSocket flow control and liveness.
    pub websocket: WebSocketConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// The HS256 secret, from `JWT_SECRET` only; never serialised.
    #[serde(skip)]
    pub jwt_secret: Option<Secret>,
}

/// A secret string whose `Debug` output is masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// One process: embedded store, in-memory presence and bus.
    Local,
    /// Many instances on the configured backends.
    #[serde(alias = "production")]
    Cluster,
}

/// A server a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The HTTP API on `api_port`.
    Api,
    /// The WebSocket server on `websocket_port`.
    Websocket,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Allowed browser origins, for CORS and WebSocket upgrades.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins; `*` allows any.
    pub allowed_origins: Vec<String>,
}

/// Token verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// JWKS URL for asymmetric algorithms.
    pub jwks_url: Option<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Clock leeway on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
}

/// A JWT signature algorithm the service can accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// HMAC-SHA256 with `JWT_SECRET`.
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256, keys from JWKS.
    RS256,
    /// ECDSA P-256 with SHA-256, keys from JWKS.
    ES256,
    /// Ed25519, keys from JWKS.
    EdDSA,
}

/// Presence backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    /// `memory` or `redis`.
    #[serde(rename = "type")]
    pub kind: PresenceKind,
    /// Redis settings, used when `type` is `redis`.
    pub redis: RedisConfig,
}

/// Presence backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    /// In-process map.
    Memory,
    /// Redis leases.
    Redis,
}

/// Redis connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port`; a password comes from the environment.
    pub url: String,
}

/// Delivery bus backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// `memory` or `nats`.
    #[serde(rename = "type")]
    pub kind: BusKind,
    /// NATS settings, used when `type` is `nats`.
    pub nats: NatsConfig,
}

/// Delivery bus backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// In-process channels.
    Memory,
    /// NATS core subjects.
    Nats,
}

/// NATS connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port`.
    pub url: String,
}

/// Mailbox backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` or `postgres`.
    #[serde(rename = "type")]
    pub kind: StoreKind,
    /// PostgreSQL settings, used when `type` is `postgres`.
    pub postgres: PostgresConfig,
}

/// Mailbox backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The on-disk store in `data_dir`.
    Embedded,
    /// PostgreSQL.
    Postgres,
}

/// PostgreSQL connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db`; a password comes from the environment.
    pub url: String,
}

/// Sizes, rates and retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The whole envelope as JSON, in bytes.
    pub max_envelope_bytes: usize,
    /// Stored messages per recipient.
    pub max_stored_per_user: u64,
    /// How long an unacknowledged message is kept.
    #[serde(with = "duration_text")]
    pub message_ttl: Duration,
    /// How long a (sender, recipient, messageId) is remembered.
    #[serde(with = "duration_text")]
    pub dedupe_window: Duration,
    /// Sends per second per user.
    pub send_rate_per_second: u32,
    /// Sends a user may make at once above the rate.
    pub send_burst: u32,
}

/// WebSocket flow control and liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Messages in flight per connection.
    pub max_unacked: usize,
    /// How long a full socket is tolerated before 4008.
    #[serde(with = "duration_text")]
    pub write_timeout: Duration,
    /// Server ping period.
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    /// Open connections per user on one instance.
    pub max_connections_per_user: usize,
    /// Open connections on one instance.
    pub max_connections: usize,
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long shutdown waits for in-flight work.
    #[serde(with = "duration_text")]
    pub grace_period: Duration,
}

/// Durations as humantime text: `10s`, `24h`, `7d`, `250ms`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({err}); write it like 250ms, 10s, 24h or 7d"
            ))
        })
    }
}

impl Config {
    /// The embedded defaults, without any secret.
    pub fn defaults() -> Self {
        serde_saphyr::from_str(DEFAULT_CONFIG_YAML).expect("the embedded config.yaml is valid")
    }
}
