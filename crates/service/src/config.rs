//! Configuration: the embedded `config.yaml`, an optional file, and
//! `ROUTING_` environment variables, validated into [`Config`].
//!
//! [`Config::load`] reads three layers, each over the one before: the
//! embedded defaults, the file, then the environment. Every valid key exists
//! in the defaults, so a key missing there is a typo and is rejected. The
//! secrets (`JWT_SECRET` and passwords inside backend URLs) come only from
//! the environment.

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The embedded defaults; every valid key appears here.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("../config.yaml");

/// The prefix of environment variables that override config keys.
pub const ENV_PREFIX: &str = "ROUTING_";

/// The environment variable that names the config file; it is not a key.
pub const CONFIG_FILE_ENV: &str = "ROUTING_CONFIG";

/// The environment variable that contains the HS256 secret.
pub const JWT_SECRET_ENV: &str = "JWT_SECRET";

/// The minimum length of `JWT_SECRET`, in bytes. RFC 7518 requires an HS256
/// key at least as long as the hash output, 256 bits.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// The maximum accepted `limits.max_envelope_bytes`: 16 MiB.
pub const MAX_ENVELOPE_BYTES_LIMIT: usize = 16 * 1024 * 1024;

/// The text that replaces secrets in [`Config::to_masked_yaml`].
const MASK: &str = "***";

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
    /// Prefix of every key this service writes, so several deployments can share a server.
    pub key_prefix: String,
    /// How long a presence lease lives without a refresh.
    #[serde(with = "duration_text")]
    pub lease_ttl: Duration,
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
    /// Prefix of every subject this service uses.
    pub subject_prefix: String,
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
    /// The schema that holds the service's tables, created when missing.
    pub schema: String,
    /// Connections in the pool of each instance.
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before it fails with 503.
    #[serde(with = "duration_text")]
    pub acquire_timeout: Duration,
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
    /// Open HTTP connections on the API port.
    pub max_http_connections: usize,
    /// How long one HTTP request may take, body included.
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
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
    /// How often a connection checks the mailbox for messages it missed.
    #[serde(with = "duration_text")]
    pub resync_interval: Duration,
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

/// Why the configuration could not be loaded. Every message names the key,
/// file or environment variable at fault and says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {cause}; check --config or ROUTING_CONFIG", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The config file is not valid YAML, or its top level is not a mapping.
    #[error("config file {} is invalid: {message}", path.display())]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The config file contains a key that the defaults do not have.
    #[error(
        "unknown key `{key}` in {}; remove it or fix its spelling \
         (`routing-service config` prints every valid key)",
        path.display()
    )]
    UnknownKey {
        /// The dotted key path.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A `ROUTING_` variable names no key.
    #[error(
        "unknown environment variable {name}: it names no config key; unset it or fix its \
         name (ROUTING_ plus the key path in upper case, with __ between levels, for example \
         ROUTING_LIMITS__MAX_ENVELOPE_BYTES)"
    )]
    UnknownEnv {
        /// The variable's name.
        name: String,
    },
    /// A `ROUTING_` variable's value does not fit its key.
    #[error("environment variable {name} is invalid: {message}")]
    InvalidEnv {
        /// The variable's name.
        name: String,
        /// What is wrong with the value.
        message: String,
    },
    /// An environment variable that the service reads is not valid UTF-8.
    #[error("environment variable {name} is not valid UTF-8; set it to UTF-8 text")]
    NotUnicode {
        /// The variable's name, with invalid bytes replaced.
        name: String,
    },
    /// A URL in the config file contains a password.
    #[error(
        "{key} in {} contains a password, but passwords come only from the environment; \
         remove the password from the file and set the whole URL in {env_name}",
        path.display()
    )]
    PasswordInFile {
        /// The dotted key path.
        key: String,
        /// The file.
        path: PathBuf,
        /// The environment variable that may carry the URL with its password.
        env_name: String,
    },
    /// A key has a value of the wrong type or out of range.
    #[error("{key}: {message}")]
    InvalidValue {
        /// The dotted key path.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// HS256 is accepted but `JWT_SECRET` is not set.
    #[error(
        "JWT_SECRET is not set, but auth.algorithms includes HS256; set JWT_SECRET in the \
         environment to a random string of at least 32 bytes, or remove HS256"
    )]
    MissingSecret,
    /// `JWT_SECRET` is too short to be a safe HS256 key.
    #[error(
        "JWT_SECRET is {length} bytes long, but an HS256 key needs at least 32 bytes \
         (256 bits) to be as strong as the hash; set a longer random secret, for example \
         the output of `openssl rand -base64 48`"
    )]
    ShortSecret {
        /// The secret's length in bytes.
        length: usize,
    },
}

impl Config {
    /// The embedded defaults, without any secret.
    pub fn defaults() -> Self {
        serde_saphyr::from_str(DEFAULT_CONFIG_YAML).expect("the embedded config.yaml is valid")
    }

    /// Loads the embedded defaults, then `file` over them, then the
    /// `ROUTING_` variables and `JWT_SECRET` from `env`, and validates the
    /// result. Other variables in `env` are ignored.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let defaults = default_tree();
        let mut tree = defaults.clone();
        if let Some(path) = file {
            let overrides = read_file_tree(path)?;
            merge_file(object_mut(&mut tree), overrides, "", path)?;
        }

        let mut jwt_secret = None;
        for (name, text) in env {
            if name == JWT_SECRET_ENV {
                jwt_secret = Some(Secret(text));
            } else if name.starts_with(ENV_PREFIX) && name != CONFIG_FILE_ENV {
                apply_env(&mut tree, &defaults, &name, &text)?;
            }
        }

        let mut config: Config =
            serde_path_to_error::deserialize(tree).map_err(|err| ConfigError::InvalidValue {
                key: err.path().to_string(),
                message: err.inner().to_string(),
            })?;
        config.jwt_secret = jwt_secret;
        config.validate()?;
        Ok(config)
    }

    /// Renders the effective configuration as YAML with every secret
    /// replaced by `***`: `jwt_secret` (listed only when set) and the
    /// passwords inside URLs.
    pub fn to_masked_yaml(&self) -> String {
        let mut masked = self.clone();
        for url in [
            &mut masked.presence_cache.redis.url,
            &mut masked.delivery_bus.nats.url,
            &mut masked.message_store.postgres.url,
        ] {
            *url = mask_url(url);
        }
        if let Some(url) = &mut masked.auth.jwks_url {
            *url = mask_url(url);
        }

        let mut yaml =
            serde_saphyr::to_string(&masked).expect("a Config always serialises to YAML");
        if self.jwt_secret.is_some() {
            if !yaml.ends_with('\n') {
                yaml.push('\n');
            }
            // A comment, so the output can be read back with --config.
            yaml.push_str(&format!("# JWT_SECRET: {MASK} (set in the environment)\n"));
        }
        yaml
    }

    /// Checks every value that its type alone does not constrain.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_process()?;
        self.validate_backends()?;
        self.validate_limits()?;
        self.validate_auth()?;
        self.validate_secret()?;
        validate_origins(&self.cors.allowed_origins)
    }

    fn validate_process(&self) -> Result<(), ConfigError> {
        if self.roles.is_empty() {
            return Err(invalid(
                "roles",
                "is empty; list at least one of api, websocket",
            ));
        }
        if let Some(role) = first_duplicate(&self.roles) {
            return Err(invalid(
                "roles",
                format!("lists {role:?} twice; list each role once"),
            ));
        }
        if !self.instance_id.is_empty() && !is_valid_instance_id(&self.instance_id) {
            return Err(invalid(
                "instance_id",
                format!(
                    "{:?} is invalid; use 1 to 64 characters of A-Z, a-z, 0-9, _ and -, \
                     or leave it empty for a random id",
                    self.instance_id
                ),
            ));
        }
        let both_roles = self.roles.contains(&Role::Api) && self.roles.contains(&Role::Websocket);
        if both_roles && self.api_port != 0 && self.api_port == self.websocket_port {
            return Err(invalid(
                "websocket_port",
                format!(
                    "is {}, the same as api_port; give the two servers different ports",
                    self.api_port
                ),
            ));
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        self.validate_backend_settings()?;
        if self.run_mode == RunMode::Cluster {
            return self.validate_cluster_backends();
        }
        if self.presence_cache.kind != PresenceKind::Memory {
            return Err(local_mode_error("presence_cache.type", "memory", "redis"));
        }
        if self.delivery_bus.kind != BusKind::Memory {
            return Err(local_mode_error("delivery_bus.type", "memory", "nats"));
        }
        if self.message_store.kind != StoreKind::Embedded {
            return Err(local_mode_error(
                "message_store.type",
                "embedded",
                "postgres",
            ));
        }
        Ok(())
    }

    /// Cluster instances share state only through the networked backends,
    /// so an in-process backend would split the cluster without a sign.
    fn validate_cluster_backends(&self) -> Result<(), ConfigError> {
        let cluster_error = |key: &str, expected: &str, found: &str| {
            invalid(
                key,
                format!(
                    "is {found}, but run_mode cluster shares state between instances, so it \
                     must be {expected}; set run_mode: local for a single process"
                ),
            )
        };
        if self.message_store.kind != StoreKind::Postgres {
            return Err(cluster_error("message_store.type", "postgres", "embedded"));
        }
        if self.presence_cache.kind != PresenceKind::Redis {
            return Err(cluster_error("presence_cache.type", "redis", "memory"));
        }
        if self.delivery_bus.kind != BusKind::Nats {
            return Err(cluster_error("delivery_bus.type", "nats", "memory"));
        }
        Ok(())
    }

    fn validate_backend_settings(&self) -> Result<(), ConfigError> {
        let postgres = &self.message_store.postgres;
        let schema_ok = postgres.schema.len() <= 63
            && postgres
                .schema
                .starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && postgres
                .schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !schema_ok {
            return Err(invalid(
                "message_store.postgres.schema",
                "must be 1 to 63 characters of [a-z0-9_], not starting with a digit",
            ));
        }
        if postgres.max_connections == 0 {
            return Err(invalid(
                "message_store.postgres.max_connections",
                "must be at least 1",
            ));
        }
        if postgres.acquire_timeout.is_zero() {
            return Err(invalid(
                "message_store.postgres.acquire_timeout",
                "must be above 0",
            ));
        }
        if self.presence_cache.redis.lease_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "presence_cache.redis.lease_ttl",
                "must be at least 1s",
            ));
        }
        let prefixes = [
            (
                "presence_cache.redis.key_prefix",
                &self.presence_cache.redis.key_prefix,
            ),
            (
                "delivery_bus.nats.subject_prefix",
                &self.delivery_bus.nats.subject_prefix,
            ),
        ];
        for (key, prefix) in prefixes {
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 64
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !prefix_ok {
                return Err(invalid(key, "must be 1 to 64 characters of [A-Za-z0-9_-]"));
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        if !(1..=MAX_ENVELOPE_BYTES_LIMIT).contains(&limits.max_envelope_bytes) {
            return Err(invalid(
                "limits.max_envelope_bytes",
                format!(
                    "is {}; set it between 1 and {MAX_ENVELOPE_BYTES_LIMIT} bytes (16 MiB)",
                    limits.max_envelope_bytes
                ),
            ));
        }
        let at_least_one = [
            ("limits.max_stored_per_user", limits.max_stored_per_user),
            (
                "limits.send_rate_per_second",
                u64::from(limits.send_rate_per_second),
            ),
            ("limits.send_burst", u64::from(limits.send_burst)),
            (
                "limits.max_http_connections",
                limits.max_http_connections as u64,
            ),
            ("websocket.max_unacked", self.websocket.max_unacked as u64),
            (
                "websocket.max_connections_per_user",
                self.websocket.max_connections_per_user as u64,
            ),
            (
                "websocket.max_connections",
                self.websocket.max_connections as u64,
            ),
        ];
        for (key, value) in at_least_one {
            if value == 0 {
                return Err(invalid(key, "is 0; set it to 1 or more"));
            }
        }
        let positive_durations = [
            ("limits.message_ttl", limits.message_ttl),
            ("limits.request_timeout", limits.request_timeout),
            ("websocket.write_timeout", self.websocket.write_timeout),
            ("websocket.ping_interval", self.websocket.ping_interval),
            ("websocket.resync_interval", self.websocket.resync_interval),
        ];
        for (key, value) in positive_durations {
            if value.is_zero() {
                return Err(invalid(key, "is 0; set a duration above zero, such as 10s"));
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.algorithms.is_empty() {
            return Err(invalid(
                "auth.algorithms",
                "is empty; list at least one of HS256, RS256, ES256, EdDSA",
            ));
        }
        if let Some(algorithm) = first_duplicate(&auth.algorithms) {
            return Err(invalid(
                "auth.algorithms",
                format!("lists {algorithm:?} twice; list each algorithm once"),
            ));
        }
        for (key, value) in [
            ("auth.issuer", &auth.issuer),
            ("auth.audience", &auth.audience),
        ] {
            if value.as_deref() == Some("") {
                return Err(invalid(
                    key,
                    "is empty; set the expected value or null to skip the check",
                ));
            }
        }

        if let Some(url) = &auth.jwks_url {
            let parsed = reqwest::Url::parse(url).ok();
            let is_web_url = parsed.as_ref().is_some_and(|url| {
                matches!(url.scheme(), "http" | "https") && url.host_str().is_some()
            });
            if !is_web_url {
                return Err(invalid(
                    "auth.jwks_url",
                    format!(
                        "{:?} is not an http or https URL; set the URL of the JWKS document",
                        mask_url(url)
                    ),
                ));
            }
        }
        let asymmetric = auth
            .algorithms
            .iter()
            .find(|algorithm| **algorithm != Algorithm::HS256);
        if let Some(algorithm) = asymmetric
            && auth.jwks_url.is_none()
        {
            return Err(invalid(
                "auth.jwks_url",
                format!(
                    "is not set, but auth.algorithms includes {algorithm:?}, whose keys come from \
                     a JWKS; set auth.jwks_url or remove {algorithm:?}"
                ),
            ));
        }
        Ok(())
    }

    fn validate_secret(&self) -> Result<(), ConfigError> {
        match &self.jwt_secret {
            Some(secret) if secret.0.len() < MIN_JWT_SECRET_BYTES => {
                Err(ConfigError::ShortSecret {
                    length: secret.0.len(),
                })
            }
            Some(_) => Ok(()),
            None if self.auth.algorithms.contains(&Algorithm::HS256) => {
                Err(ConfigError::MissingSecret)
            }
            None => Ok(()),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::InvalidValue {
        key: key.to_owned(),
        message: message.into(),
    }
}

fn local_mode_error(key: &str, expected: &str, found: &str) -> ConfigError {
    invalid(
        key,
        format!(
            "is {found}, but run_mode local uses only the in-process backends, so it must be \
             {expected}; set run_mode: cluster to use {found}"
        ),
    )
}

fn first_duplicate<T: Copy + PartialEq>(items: &[T]) -> Option<T> {
    let (_, item) = items
        .iter()
        .enumerate()
        .find(|(index, item)| items[..*index].contains(item))?;
    Some(*item)
}

fn is_valid_instance_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Checks that each origin is `*`, `null`, or `scheme://host[:port]` in the
/// form browsers send in the `Origin` header, since origins are compared as
/// whole strings.
fn validate_origins(origins: &[String]) -> Result<(), ConfigError> {
    for origin in origins {
        if origin == "*" || origin == "null" {
            continue;
        }
        if let Err(reason) = check_origin(origin) {
            return Err(invalid(
                "cors.allowed_origins",
                format!(
                    "{origin:?} is not an origin: {reason}; write it as scheme://host[:port], \"*\" or \"null\""
                ),
            ));
        }
    }
    Ok(())
}

fn check_origin(origin: &str) -> Result<(), String> {
    let Some((_, authority)) = origin.split_once("://") else {
        return Err("it has no scheme".into());
    };
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(
            "only a scheme, a host and a port are allowed, with no path, query or user".into(),
        );
    }
    let url = reqwest::Url::parse(origin).map_err(|err| err.to_string())?;
    if url.host_str().is_none() {
        return Err("it has no host".into());
    }

    // Browsers send special-scheme origins in canonical form (lower-case
    // host, default port left out), so only that form can ever match.
    let canonical = url.origin().ascii_serialization();
    if canonical != "null" && canonical != origin {
        return Err(format!("browsers send it as {canonical:?}"));
    }
    Ok(())
}

/// Parses the embedded defaults into a generic tree.
fn default_tree() -> Value {
    serde_saphyr::from_str(DEFAULT_CONFIG_YAML).expect("the embedded config.yaml is valid")
}

fn object_mut(tree: &mut Value) -> &mut Map<String, Value> {
    tree.as_object_mut()
        .expect("the embedded config.yaml is a mapping")
}

fn read_file_tree(path: &Path) -> Result<Map<String, Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::ReadFile {
        path: path.to_owned(),
        cause,
    })?;
    let parse_error = |message: String| ConfigError::ParseFile {
        path: path.to_owned(),
        message,
    };
    let tree: Value = serde_saphyr::from_str(&text).map_err(|err| parse_error(err.to_string()))?;
    match tree {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(parse_error(
            "the top level must be a mapping of keys".into(),
        )),
    }
}

/// Merges a file's tree over `target`, which has the defaults' shape.
/// Mappings merge key by key; any other value replaces the default.
fn merge_file(
    target: &mut Map<String, Value>,
    overrides: Map<String, Value>,
    prefix: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for (name, value) in overrides {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let Some(slot) = target.get_mut(&name) else {
            return Err(ConfigError::UnknownKey {
                key,
                path: path.to_owned(),
            });
        };

        match (slot, value) {
            // An empty section (`limits:` with nothing below) changes nothing.
            (Value::Object(_), Value::Null) => {}
            (Value::Object(section), Value::Object(values)) => {
                merge_file(section, values, &key, path)?
            }
            (Value::Object(_), _) => {
                return Err(ConfigError::ParseFile {
                    path: path.to_owned(),
                    message: format!("{key} is a section; give it a mapping of keys"),
                });
            }
            (slot, value) => {
                if is_url_key(&name)
                    && let Value::String(url) = &value
                    && !url_secret_spans(url).is_empty()
                {
                    let env_name = env_name(&key);
                    return Err(ConfigError::PasswordInFile {
                        key,
                        path: path.to_owned(),
                        env_name,
                    });
                }
                *slot = coerce_to_default_type(slot, value);
            }
        }
    }
    Ok(())
}

/// Turns a YAML number or boolean into text where the key holds text, so
/// that `instance_id: 123` means the id "123".
// NOTE: a number is re-rendered from its parsed value, so a spelling like
// `1.10` becomes "1.1"; quote such values in the file.
fn coerce_to_default_type(default: &Value, value: Value) -> Value {
    let holds_text = matches!(default, Value::String(_) | Value::Null);
    match value {
        Value::Number(number) if holds_text => Value::String(number.to_string()),
        Value::Bool(flag) if holds_text => Value::String(flag.to_string()),
        other => other,
    }
}

fn is_url_key(name: &str) -> bool {
    name == "url" || name.ends_with("_url")
}

/// The environment variable that overrides a dotted key path.
fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// Sets the key that a `ROUTING_` variable names, reading its text as the
/// type of the key's default.
fn apply_env(
    tree: &mut Value,
    defaults: &Value,
    name: &str,
    text: &str,
) -> Result<(), ConfigError> {
    let unknown = || ConfigError::UnknownEnv {
        name: name.to_owned(),
    };
    let key_path = &name[ENV_PREFIX.len()..];

    let mut default = defaults;
    let mut slot = tree;
    for segment in key_path.split("__").map(str::to_ascii_lowercase) {
        default = default
            .as_object()
            .and_then(|map| map.get(&segment))
            .ok_or_else(unknown)?;
        slot = slot
            .as_object_mut()
            .and_then(|map| map.get_mut(&segment))
            .ok_or_else(unknown)?;
    }

    *slot = parse_env_text(default, text).map_err(|message| ConfigError::InvalidEnv {
        name: name.to_owned(),
        message,
    })?;
    Ok(())
}

fn parse_env_text(default: &Value, text: &str) -> Result<Value, String> {
    match default {
        // A key whose default is null is optional text; empty text unsets it.
        Value::Null if text.is_empty() => Ok(Value::Null),
        Value::Null | Value::String(_) => Ok(Value::String(text.to_owned())),
        Value::Bool(_) => match text.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(format!("expected true or false, found {text:?}")),
        },
        Value::Number(_) => parse_env_number(text.trim())
            .ok_or_else(|| format!("expected a number, found {text:?}")),
        Value::Array(_) => parse_env_list(text),
        Value::Object(_) => Err(
            "it names a section, not a key; set the section's keys one by one, \
                                 with __ between levels"
                .into(),
        ),
    }
}

fn parse_env_number(text: &str) -> Option<Value> {
    if let Ok(number) = text.parse::<u64>() {
        return Some(number.into());
    }
    if let Ok(number) = text.parse::<i64>() {
        return Some(number.into());
    }
    let number = text.parse::<f64>().ok()?;
    serde_json::Number::from_f64(number).map(Value::Number)
}

/// Reads a list either in YAML flow syntax (`[a, b]`) or as comma-separated
/// text (`a,b`).
fn parse_env_list(text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('[') {
        let list: Value = serde_saphyr::from_str(trimmed)
            .map_err(|err| format!("expected a list like [a, b]: {err}"))?;
        return match list {
            Value::Array(_) => Ok(list),
            _ => Err("expected a list like [a, b] or a,b".into()),
        };
    }
    let items = trimmed
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| Value::String(item.to_owned()))
        .collect();
    Ok(Value::Array(items))
}

/// Finds the secret parts of a URL: the password in `user:password@host`
/// and the value of any `password=` query parameter.
fn url_secret_spans(url: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();

    let authority_start = url.find("://").map_or(0, |index| index + 3);
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    if let Some(at) = authority.rfind('@')
        && let Some(colon) = authority[..at].find(':')
        && colon + 1 < at
    {
        spans.push(authority_start + colon + 1..authority_start + at);
    }

    if let Some(question) = url.find('?') {
        let query_end = url[question..]
            .find('#')
            .map_or(url.len(), |index| question + index);
        let mut start = question + 1;
        for pair in url[start..query_end].split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && name.eq_ignore_ascii_case("password")
                && !value.is_empty()
            {
                spans.push(start + name.len() + 1..start + pair.len());
            }
            start += pair.len() + 1;
        }
    }
    spans
}

/// Replaces the secret parts of a URL with `***`.
fn mask_url(url: &str) -> String {
    let mut masked = url.to_owned();
    for span in url_secret_spans(url).into_iter().rev() {
        masked.replace_range(span, MASK);
    }
    masked
}

/// The process environment for [`Config::load`]. Variables that are not
/// UTF-8 are skipped, unless the service reads them.
pub fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with(ENV_PREFIX) || name == JWT_SECRET_ENV => {
                return Err(ConfigError::NotUnicode { name });
            }
            (Err(name), _) if name.to_string_lossy().starts_with(ENV_PREFIX) => {
                return Err(ConfigError::NotUnicode {
                    name: name.to_string_lossy().into_owned(),
                });
            }
            _ => {}
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn with_secret(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars = env(pairs);
        vars.push((JWT_SECRET_ENV.to_owned(), SECRET.to_owned()));
        vars
    }

    fn yaml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("create a temporary file");
        file.write_all(text.as_bytes())
            .expect("write the temporary file");
        file
    }

    fn load_error(file: Option<&Path>, vars: Vec<(String, String)>) -> String {
        match Config::load(file, vars) {
            Ok(_) => panic!("the configuration was accepted"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn defaults_load_with_secret() {
        let config = Config::load(None, with_secret(&[])).expect("defaults load");
        let mut expected = Config::defaults();
        expected.jwt_secret = Some(Secret(SECRET.to_owned()));
        assert_eq!(config, expected);
        assert_eq!(config.api_port, 8082);
        assert_eq!(
            config.limits.message_ttl,
            Duration::from_secs(7 * 24 * 3600)
        );
    }

    #[test]
    fn backend_settings_are_checked() {
        let cases = [
            (
                "ROUTING_MESSAGE_STORE__POSTGRES__SCHEMA",
                "Bad-Schema",
                "message_store.postgres.schema",
            ),
            (
                "ROUTING_MESSAGE_STORE__POSTGRES__SCHEMA",
                "1abc",
                "message_store.postgres.schema",
            ),
            (
                "ROUTING_MESSAGE_STORE__POSTGRES__MAX_CONNECTIONS",
                "0",
                "max_connections",
            ),
            (
                "ROUTING_PRESENCE_CACHE__REDIS__LEASE_TTL",
                "100ms",
                "presence_cache.redis.lease_ttl",
            ),
            (
                "ROUTING_PRESENCE_CACHE__REDIS__KEY_PREFIX",
                "a:b",
                "presence_cache.redis.key_prefix",
            ),
            (
                "ROUTING_DELIVERY_BUS__NATS__SUBJECT_PREFIX",
                "a.b",
                "delivery_bus.nats.subject_prefix",
            ),
        ];
        for (name, value, key) in cases {
            let message = load_error(None, with_secret(&[(name, value)]));
            assert!(message.contains(key), "{name}={value}: {message}");
        }
        let config = Config::load(
            None,
            with_secret(&[("ROUTING_MESSAGE_STORE__POSTGRES__SCHEMA", "routing_test_1")]),
        )
        .expect("a valid schema loads");
        assert_eq!(config.message_store.postgres.schema, "routing_test_1");
    }

    #[test]
    fn file_overrides_defaults() {
        let file = yaml_file("api_port: 9100\nlimits:\n  send_burst: 5\ncors:\n");
        let config = Config::load(Some(file.path()), with_secret(&[])).expect("file loads");
        assert_eq!(config.api_port, 9100);
        assert_eq!(config.limits.send_burst, 5);
        assert_eq!(config.limits.send_rate_per_second, 100);
        assert_eq!(config.cors, Config::defaults().cors);
    }

    #[test]
    fn empty_file_keeps_defaults() {
        let file = yaml_file("# nothing here\n");
        let config = Config::load(Some(file.path()), with_secret(&[])).expect("file loads");
        assert_eq!(config.api_port, 8082);
    }

    #[test]
    fn file_number_for_text_key_is_text() {
        let file = yaml_file("instance_id: 123\n");
        let config = Config::load(Some(file.path()), with_secret(&[])).expect("file loads");
        assert_eq!(config.instance_id, "123");
    }

    #[test]
    fn env_overrides_file() {
        let file = yaml_file("api_port: 9100\n");
        let vars = with_secret(&[("ROUTING_API_PORT", "9000")]);
        let config = Config::load(Some(file.path()), vars).expect("config loads");
        assert_eq!(config.api_port, 9000);
    }

    #[test]
    fn env_overrides_nested_key() {
        let vars = with_secret(&[
            ("ROUTING_RUN_MODE", "cluster"),
            ("ROUTING_PRESENCE_CACHE__TYPE", "redis"),
            ("ROUTING_DELIVERY_BUS__TYPE", "nats"),
            ("ROUTING_MESSAGE_STORE__TYPE", "postgres"),
            ("ROUTING_LIMITS__MAX_ENVELOPE_BYTES", "1024"),
            ("ROUTING_WEBSOCKET__PING_INTERVAL", "5s"),
        ]);
        let config = Config::load(None, vars).expect("config loads");
        assert_eq!(config.presence_cache.kind, PresenceKind::Redis);
        assert_eq!(config.limits.max_envelope_bytes, 1024);
        assert_eq!(config.websocket.ping_interval, Duration::from_secs(5));
    }

    #[test]
    fn env_list_in_both_syntaxes() {
        let flow =
            Config::load(None, with_secret(&[("ROUTING_ROLES", "[api]")])).expect("flow list");
        assert_eq!(flow.roles, vec![Role::Api]);

        let commas = with_secret(&[(
            "ROUTING_CORS__ALLOWED_ORIGINS",
            "https://a.example, https://b.example",
        )]);
        let config = Config::load(None, commas).expect("comma list");
        assert_eq!(
            config.cors.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }

    #[test]
    fn env_number_like_text_stays_text() {
        let config =
            Config::load(None, with_secret(&[("ROUTING_INSTANCE_ID", "123")])).expect("loads");
        assert_eq!(config.instance_id, "123");
    }

    #[test]
    fn env_sets_and_unsets_optional_text() {
        let vars = with_secret(&[("ROUTING_AUTH__ISSUER", "https://issuer.example")]);
        let config = Config::load(None, vars).expect("loads");
        assert_eq!(
            config.auth.issuer.as_deref(),
            Some("https://issuer.example")
        );

        let file = yaml_file("auth:\n  audience: routing\n");
        let vars = with_secret(&[("ROUTING_AUTH__AUDIENCE", "")]);
        let config = Config::load(Some(file.path()), vars).expect("loads");
        assert_eq!(config.auth.audience, None);
    }

    #[test]
    fn env_bad_number_names_variable() {
        let message = load_error(None, with_secret(&[("ROUTING_API_PORT", "eighty")]));
        assert!(message.contains("ROUTING_API_PORT"), "{message}");
        assert!(message.contains("expected a number"), "{message}");
    }

    #[test]
    fn env_section_is_rejected() {
        let message = load_error(None, with_secret(&[("ROUTING_LIMITS", "5")]));
        assert!(message.contains("ROUTING_LIMITS"), "{message}");
        assert!(message.contains("section"), "{message}");
    }

    #[test]
    fn config_file_variable_is_not_a_key() {
        let vars = with_secret(&[("ROUTING_CONFIG", "/nonexistent.yaml")]);
        assert!(Config::load(None, vars).is_ok());
    }

    #[test]
    fn unknown_file_key_is_named() {
        let file = yaml_file("limits:\n  max_envelope_byte: 10\n");
        let message = load_error(Some(file.path()), with_secret(&[]));
        assert!(message.contains("limits.max_envelope_byte"), "{message}");
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn unknown_env_key_is_named() {
        let message = load_error(None, with_secret(&[("ROUTING_API_PROT", "1")]));
        assert!(message.contains("ROUTING_API_PROT"), "{message}");
        let message = load_error(None, with_secret(&[("ROUTING_LIMITS__NOPE", "1")]));
        assert!(message.contains("ROUTING_LIMITS__NOPE"), "{message}");
    }

    #[test]
    fn bad_type_names_key_path() {
        let file = yaml_file("limits:\n  max_envelope_bytes: lots\n");
        let message = load_error(Some(file.path()), with_secret(&[]));
        assert!(
            message.starts_with("limits.max_envelope_bytes: invalid type"),
            "{message}"
        );
    }

    #[test]
    fn bad_values_name_their_keys() {
        let cases = [
            (
                "ROUTING_LIMITS__MAX_ENVELOPE_BYTES",
                "0",
                "limits.max_envelope_bytes",
            ),
            (
                "ROUTING_LIMITS__MAX_ENVELOPE_BYTES",
                "16777217",
                "limits.max_envelope_bytes",
            ),
            (
                "ROUTING_LIMITS__MAX_STORED_PER_USER",
                "0",
                "limits.max_stored_per_user",
            ),
            (
                "ROUTING_LIMITS__SEND_RATE_PER_SECOND",
                "0",
                "limits.send_rate_per_second",
            ),
            ("ROUTING_LIMITS__SEND_BURST", "0", "limits.send_burst"),
            ("ROUTING_LIMITS__MESSAGE_TTL", "0s", "limits.message_ttl"),
            (
                "ROUTING_WEBSOCKET__MAX_UNACKED",
                "0",
                "websocket.max_unacked",
            ),
            (
                "ROUTING_WEBSOCKET__WRITE_TIMEOUT",
                "0s",
                "websocket.write_timeout",
            ),
            (
                "ROUTING_WEBSOCKET__PING_INTERVAL",
                "0ms",
                "websocket.ping_interval",
            ),
            (
                "ROUTING_WEBSOCKET__PING_INTERVAL",
                "soon",
                "websocket.ping_interval",
            ),
            ("ROUTING_ROLES", "[]", "roles"),
            ("ROUTING_ROLES", "api,api", "roles"),
            ("ROUTING_ROLES", "api,proxy", "roles"),
            ("ROUTING_AUTH__ALGORITHMS", "[]", "auth.algorithms"),
            ("ROUTING_AUTH__ALGORITHMS", "HS256,HS256", "auth.algorithms"),
            ("ROUTING_AUTH__ALGORITHMS", "none", "auth.algorithms"),
            ("ROUTING_AUTH__ALGORITHMS", "HS256,RS256", "auth.jwks_url"),
            (
                "ROUTING_AUTH__JWKS_URL",
                "ftp://keys.example/jwks.json",
                "auth.jwks_url",
            ),
            ("ROUTING_INSTANCE_ID", "has space", "instance_id"),
            ("ROUTING_INSTANCE_ID", &"x".repeat(65), "instance_id"),
            ("ROUTING_RUN_MODE", "serverless", "run_mode"),
            (
                "ROUTING_PRESENCE_CACHE__TYPE",
                "redis",
                "presence_cache.type",
            ),
            ("ROUTING_DELIVERY_BUS__TYPE", "nats", "delivery_bus.type"),
            (
                "ROUTING_MESSAGE_STORE__TYPE",
                "postgres",
                "message_store.type",
            ),
            ("ROUTING_WEBSOCKET_PORT", "8082", "websocket_port"),
            ("ROUTING_BIND_ADDRESS", "localhost", "bind_address"),
        ];
        for (name, value, key) in cases {
            let message = load_error(None, with_secret(&[(name, value)]));
            assert!(message.contains(key), "{name}={value:?}: {message}");
        }
    }

    #[test]
    fn empty_issuer_in_file_is_rejected() {
        let file = yaml_file("auth:\n  issuer: \"\"\n");
        let message = load_error(Some(file.path()), with_secret(&[]));
        assert!(message.starts_with("auth.issuer: is empty"), "{message}");
    }

    #[test]
    fn cors_origins_are_checked() {
        let accepted = [
            "*",
            "null",
            "https://app.example",
            "http://127.0.0.1:3000",
            "http://[::1]:8080",
        ];
        for origin in accepted {
            let vars = with_secret(&[("ROUTING_CORS__ALLOWED_ORIGINS", origin)]);
            assert!(Config::load(None, vars).is_ok(), "{origin} was rejected");
        }

        let rejected = [
            "app.example",
            "https://app.example/",
            "https://app.example/path",
            "https://app.example?x=1",
            "https://user@app.example",
            "https://App.Example",
            "https://app.example:443",
            "https://",
        ];
        for origin in rejected {
            let vars = with_secret(&[("ROUTING_CORS__ALLOWED_ORIGINS", origin)]);
            let message = load_error(None, vars);
            assert!(
                message.starts_with("cors.allowed_origins"),
                "{origin}: {message}"
            );
        }
    }

    #[test]
    fn production_is_read_as_cluster() {
        let vars = with_secret(&[
            ("ROUTING_RUN_MODE", "production"),
            ("ROUTING_MESSAGE_STORE__TYPE", "postgres"),
            ("ROUTING_PRESENCE_CACHE__TYPE", "redis"),
            ("ROUTING_DELIVERY_BUS__TYPE", "nats"),
        ]);
        let config = Config::load(None, vars).expect("loads");
        assert_eq!(config.run_mode, RunMode::Cluster);
        assert_eq!(config.message_store.kind, StoreKind::Postgres);
    }

    #[test]
    fn cluster_needs_networked_backends() {
        let cases = [
            (
                "ROUTING_MESSAGE_STORE__TYPE",
                "embedded",
                "message_store.type",
            ),
            (
                "ROUTING_PRESENCE_CACHE__TYPE",
                "memory",
                "presence_cache.type",
            ),
            ("ROUTING_DELIVERY_BUS__TYPE", "memory", "delivery_bus.type"),
        ];
        for (name, value, key) in cases {
            let mut vars = vec![
                ("ROUTING_RUN_MODE", "cluster"),
                ("ROUTING_MESSAGE_STORE__TYPE", "postgres"),
                ("ROUTING_PRESENCE_CACHE__TYPE", "redis"),
                ("ROUTING_DELIVERY_BUS__TYPE", "nats"),
            ];
            vars.retain(|(var, _)| *var != name);
            vars.push((name, value));
            let message = load_error(None, with_secret(&vars));
            assert!(message.contains(key), "{name}={value}: {message}");
        }
    }

    #[test]
    fn asymmetric_algorithms_with_jwks_url_load_without_secret() {
        let vars = env(&[
            ("ROUTING_AUTH__ALGORITHMS", "[RS256, ES256, EdDSA]"),
            (
                "ROUTING_AUTH__JWKS_URL",
                "https://issuer.example/.well-known/jwks.json",
            ),
        ]);
        let config = Config::load(None, vars).expect("loads");
        assert_eq!(
            config.auth.algorithms,
            vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]
        );
        assert_eq!(config.jwt_secret, None);
    }

    #[test]
    fn missing_secret_names_jwt_secret() {
        let message = load_error(None, env(&[]));
        assert!(message.contains("JWT_SECRET"), "{message}");
        assert!(message.contains("HS256"), "{message}");
    }

    #[test]
    fn short_secret_is_rejected() {
        let message = load_error(None, env(&[("JWT_SECRET", "too-short")]));
        assert!(message.contains("JWT_SECRET is 9 bytes long"), "{message}");
        assert!(message.contains("32 bytes"), "{message}");
    }

    #[test]
    fn password_in_file_url_is_rejected() {
        let file = yaml_file(
            "message_store:\n  postgres:\n    url: postgres://app:hunter2@db:5432/routing\n",
        );
        let message = load_error(Some(file.path()), with_secret(&[]));
        assert!(message.contains("message_store.postgres.url"), "{message}");
        assert!(
            message.contains("ROUTING_MESSAGE_STORE__POSTGRES__URL"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");

        let file = yaml_file(
            "presence_cache:\n  redis:\n    url: redis://127.0.0.1:6379/?password=hunter2\n",
        );
        let message = load_error(Some(file.path()), with_secret(&[]));
        assert!(message.contains("presence_cache.redis.url"), "{message}");
    }

    #[test]
    fn user_without_password_in_file_url_is_accepted() {
        let file =
            yaml_file("message_store:\n  postgres:\n    url: postgres://app@db:5432/routing\n");
        let config = Config::load(Some(file.path()), with_secret(&[])).expect("loads");
        assert_eq!(
            config.message_store.postgres.url,
            "postgres://app@db:5432/routing"
        );
    }

    #[test]
    fn password_in_env_url_is_accepted() {
        let url = "postgres://app:hunter2@db:5432/routing";
        let vars = with_secret(&[("ROUTING_MESSAGE_STORE__POSTGRES__URL", url)]);
        let config = Config::load(None, vars).expect("loads");
        assert_eq!(config.message_store.postgres.url, url);
    }

    #[test]
    fn masked_yaml_hides_secrets() {
        let vars = with_secret(&[
            (
                "ROUTING_MESSAGE_STORE__POSTGRES__URL",
                "postgres://app:hunter2@db:5432/routing",
            ),
            (
                "ROUTING_PRESENCE_CACHE__REDIS__URL",
                "redis://:s3cret@cache:6379/0?password=other",
            ),
        ]);
        let config = Config::load(None, vars).expect("loads");
        let yaml = config.to_masked_yaml();

        assert!(!yaml.contains(SECRET), "{yaml}");
        assert!(!yaml.contains("hunter2"), "{yaml}");
        assert!(!yaml.contains("s3cret"), "{yaml}");
        assert!(!yaml.contains("other"), "{yaml}");
        assert!(
            yaml.contains("# JWT_SECRET: *** (set in the environment)"),
            "{yaml}"
        );
        assert!(
            yaml.contains("postgres://app:***@db:5432/routing"),
            "{yaml}"
        );
        assert!(
            yaml.contains("redis://:***@cache:6379/0?password=***"),
            "{yaml}"
        );
    }

    #[test]
    fn masked_yaml_loads_back() {
        let config = Config::load(None, with_secret(&[])).expect("loads");
        let yaml = config.to_masked_yaml();
        let file = yaml_file(&yaml);
        let reloaded = Config::load(Some(file.path()), with_secret(&[])).expect("reloads");
        assert_eq!(reloaded, config);
    }

    #[test]
    fn masked_yaml_without_secret_omits_it() {
        let vars = env(&[
            ("ROUTING_AUTH__ALGORITHMS", "EdDSA"),
            ("ROUTING_AUTH__JWKS_URL", "https://issuer.example/jwks.json"),
        ]);
        let config = Config::load(None, vars).expect("loads");
        assert!(!config.to_masked_yaml().contains("JWT_SECRET"));
    }

    #[test]
    fn url_secret_spans_cover_passwords_only() {
        assert_eq!(mask_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            mask_url("nats://user:pw@host:4222"),
            "nats://user:***@host:4222"
        );
        assert_eq!(mask_url("postgres://u:p@ss@db/x"), "postgres://u:***@db/x");
        assert_eq!(
            mask_url("postgres://u@db/x?sslmode=require"),
            "postgres://u@db/x?sslmode=require"
        );
        assert_eq!(
            mask_url("postgres://db/x?user=u&password=p#f"),
            "postgres://db/x?user=u&password=***#f"
        );
    }
}
