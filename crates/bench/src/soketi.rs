//! Soketi target: runs the benchmark workload against soketi, a server for the
//! Pusher Channels protocol (version 7), so both servers can be measured in one run.
//!
//! Each user maps to the private channel `private-user-<user>`. A receiver is one
//! WebSocket subscribed to that channel, and the publisher sends events through
//! soketi's HTTP events API (`POST /apps/<app_id>/events`) with signed requests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use md5::Md5;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Name of the event that carries a benchmark payload.
const EVENT_NAME: &str = "message";

/// Maximum time for `open_receiver` to connect and get the subscription
/// confirmed. A guard against a hung server, not a measured bound.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum time for one HTTP request to the events API, as a guard against a hung server.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle time after which a receiver sends `pusher:ping` if the server states no
/// `activity_timeout`. A fallback guess, because soketi 1.6.1 always states 30 s.
const DEFAULT_ACTIVITY_TIMEOUT: Duration = Duration::from_secs(120);

/// Address and app credentials of a soketi server.
#[derive(Clone, Debug)]
pub struct SoketiConfig {
    pub host: String,
    pub port: u16,
    pub app_id: String,
    pub key: String,
    pub secret: String,
}

impl Default for SoketiConfig {
    /// Local soketi with the app `app-id` / `app-key` / `app-secret`.
    fn default() -> Self {
        SoketiConfig {
            host: "127.0.0.1".to_owned(),
            port: 6001,
            app_id: "app-id".to_owned(),
            key: "app-key".to_owned(),
            secret: "app-secret".to_owned(),
        }
    }
}

impl SoketiConfig {
    /// Returns `host:port`, with brackets around an IPv6 address.
    fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket subscribed to the channel `private-user-<user>`.
pub struct SoketiReceiver {
    socket: Socket,
    channel: String,
    /// Idle time after which the receiver sends `pusher:ping`, from the
    /// server's `activity_timeout`.
    activity_timeout: Duration,
}

/// Connects to soketi, authorizes and subscribes to `private-user-<user>`, and
/// returns once soketi confirms the subscription.
///
/// The subscription is signed with `config.secret` directly, so no auth endpoint
/// is involved. Fails if the connection, the handshake or the subscription is
/// rejected, or if it all takes longer than 30 s.
pub async fn open_receiver(config: &SoketiConfig, user: &str) -> anyhow::Result<SoketiReceiver> {
    let channel = channel_for(user)?;
    let url = format!(
        "ws://{}/app/{}?protocol=7&client=routing-bench&version=1.0",
        config.authority(),
        config.key
    );

    tokio::time::timeout(OPEN_TIMEOUT, connect_and_subscribe(config, &url, channel))
        .await
        .map_err(|_| {
            anyhow!(
                "timed out after {} s opening a soketi receiver for user {user:?} at {url}",
                OPEN_TIMEOUT.as_secs()
            )
        })?
}

async fn connect_and_subscribe(
    config: &SoketiConfig,
    url: &str,
    channel: String,
) -> anyhow::Result<SoketiReceiver> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("failed to open a WebSocket to soketi at {url}"))?;

    // The server speaks first, with the socket id the subscription must sign.
    let established = loop {
        let event = next_event(&mut socket).await?.ok_or_else(|| {
            anyhow!("soketi at {url} closed the connection before pusher:connection_established")
        })?;
        match event_name(&event) {
            "pusher:connection_established" => break event,
            "pusher:error" => bail!("soketi at {url} rejected the connection: {}", event["data"]),
            "pusher:ping" => send_event(&mut socket, "pusher:pong").await?,
            _ => {}
        }
    };
    let details = event_data(&established)?;
    let socket_id = details["socket_id"].as_str().ok_or_else(|| {
        anyhow!("pusher:connection_established from {url} has no socket_id: {established}")
    })?;
    let activity_timeout = details["activity_timeout"]
        .as_u64()
        .filter(|&seconds| seconds > 0)
        .map_or(DEFAULT_ACTIVITY_TIMEOUT, Duration::from_secs);

    let subscribe = json!({
        "event": "pusher:subscribe",
        "data": {
            "channel": channel,
            "auth": subscription_auth(&config.key, &config.secret, socket_id, &channel),
        },
    });
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .with_context(|| {
            format!("failed to send pusher:subscribe for {channel} to soketi at {url}")
        })?;

    loop {
        let event = next_event(&mut socket)
            .await?
            .ok_or_else(|| anyhow!("soketi at {url} closed the connection before confirming the subscription to {channel}"))?;
        let is_ours = event["channel"].as_str() == Some(channel.as_str());
        match event_name(&event) {
            "pusher_internal:subscription_succeeded" if is_ours => break,
            "pusher:subscription_error" => {
                bail!(
                    "soketi at {url} rejected the subscription to {channel}: {}",
                    event["data"]
                )
            }
            "pusher:error" => bail!(
                "soketi at {url} sent an error while subscribing to {channel}: {}",
                event["data"]
            ),
            "pusher:ping" => send_event(&mut socket, "pusher:pong").await?,
            _ => {}
        }
    }

    Ok(SoketiReceiver {
        socket,
        channel,
        activity_timeout,
    })
}

impl SoketiReceiver {
    /// Waits for the next event named `message` on this receiver's channel and
    /// returns its `data` string. Returns `None` once the server closes the
    /// socket with a close frame or the stream ends.
    ///
    /// Replies to `pusher:ping` with `pusher:pong` and skips other events.
    /// After `activity_timeout` seconds without traffic it sends `pusher:ping`
    /// itself, as the protocol asks of clients, and fails if another
    /// `activity_timeout` passes with nothing from the server. A socket reset
    /// without a close frame is an error, not `None`, and so is `pusher:error`,
    /// which soketi 1.6.1 sends with code 4200 before it closes sockets on
    /// shutdown. Dropping the future before it completes loses no event.
    pub async fn next_payload(&mut self) -> anyhow::Result<Option<String>> {
        let mut ping_sent = false;
        loop {
            let event =
                match tokio::time::timeout(self.activity_timeout, next_event(&mut self.socket))
                    .await
                {
                    Ok(event) => event?,
                    Err(_) if ping_sent => bail!(
                        "no reply from soketi on {} within {} s of a pusher:ping",
                        self.channel,
                        self.activity_timeout.as_secs()
                    ),
                    Err(_) => {
                        send_event(&mut self.socket, "pusher:ping").await?;
                        ping_sent = true;
                        continue;
                    }
                };
            let Some(event) = event else {
                return Ok(None);
            };
            ping_sent = false;

            let on_our_channel = event["channel"].as_str() == Some(self.channel.as_str());
            match event_name(&event) {
                EVENT_NAME if on_our_channel => return Ok(Some(payload_of(&event))),
                "pusher:ping" => send_event(&mut self.socket, "pusher:pong").await?,
                "pusher:error" => bail!(
                    "soketi sent an error on the socket for {}: {}",
                    self.channel,
                    event["data"]
                ),
                _ => {}
            }
        }
    }
}

/// Sends events through soketi's HTTP events API with a keep-alive client.
#[derive(Clone)]
pub struct SoketiPublisher {
    client: reqwest::Client,
    events_url: String,
    app_id: String,
    key: String,
    secret: String,
}

impl SoketiPublisher {
    pub fn new(config: &SoketiConfig) -> Self {
        // NOTE: soketi 1.6.1 closes the connection after every HTTP response
        // (`Connection: close`), so each publish opens a new TCP connection even
        // though this client keeps connections alive.
        let client = reqwest::Client::builder()
            .timeout(PUBLISH_TIMEOUT)
            .build()
            .expect("a reqwest client without TLS settings or a proxy builds");
        SoketiPublisher {
            client,
            events_url: format!(
                "http://{}/apps/{}/events",
                config.authority(),
                config.app_id
            ),
            app_id: config.app_id.clone(),
            key: config.key.clone(),
            secret: config.secret.clone(),
        }
    }

    /// Publishes `payload` as the `data` of a `message` event on
    /// `private-user-<user>`. Fails on a transport error, a non-2xx status or
    /// a 2xx response whose body is an error object, with soketi's response
    /// body in the error.
    pub async fn publish(&self, user: &str, payload: &str) -> anyhow::Result<()> {
        let channel = channel_for(user)?;
        let body =
            json!({ "name": EVENT_NAME, "channels": [channel], "data": payload }).to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the system clock is before 1970")?
            .as_secs();
        let query = sign_events_request(&self.app_id, &self.key, &self.secret, &body, timestamp);

        let response = self
            .client
            .post(&self.events_url)
            .query(&query)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| {
                format!(
                    "failed to POST an event for {channel} to {}",
                    self.events_url
                )
            })?;
        let status = response.status();
        let text = response.text().await.with_context(|| {
            format!(
                "failed to read the response to an event for {channel} from {}",
                self.events_url
            )
        })?;
        if status.is_success() && !body_reports_error(&text) {
            return Ok(());
        }
        bail!(
            "soketi rejected the event for {channel} at {}: HTTP {status}: {text}",
            self.events_url
        )
    }
}

/// Returns whether an events API response body is an error object.
///
/// Soketi 1.6.1 responds to a rejected request, such as one with a wrong signature,
/// with HTTP 200 and a body like `{"error":"...","code":401}`, because its CORS
/// headers are written before the status. So the status alone misses failures.
fn body_reports_error(body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|value| value.get("error").is_some())
}

/// Returns the channel of `user`, `private-user-<user>`.
///
/// Pusher channel names may contain only ASCII letters, digits and `_ - = @ , . ;`,
/// so other user names are rejected here instead of by the server.
fn channel_for(user: &str) -> anyhow::Result<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-=@,.;".contains(c);
    if user.is_empty() || !user.chars().all(allowed) {
        bail!(
            "invalid user name {user:?} for a soketi channel: use 1 or more ASCII letters, digits or _ - = @ , . ;"
        );
    }
    Ok(format!("private-user-{user}"))
}

/// Returns the `auth` value of a private-channel subscription:
/// `<key>:<hex HMAC-SHA256 of "<socket_id>:<channel>" with the secret>`.
fn subscription_auth(key: &str, secret: &str, socket_id: &str, channel: &str) -> String {
    let signature = hmac_sha256_hex(secret, &format!("{socket_id}:{channel}"));
    format!("{key}:{signature}")
}

/// Returns the query parameters of a signed `POST /apps/<app_id>/events` with `body`.
///
/// The signed string is `POST\n<path>\n<query>`, where the query contains every
/// parameter except `auth_signature`, keys sorted, values not URL-encoded.
fn sign_events_request(
    app_id: &str,
    key: &str,
    secret: &str,
    body: &str,
    timestamp: u64,
) -> Vec<(&'static str, String)> {
    // Already in key order, as the signature requires.
    let mut query = vec![
        ("auth_key", key.to_owned()),
        ("auth_timestamp", timestamp.to_string()),
        ("auth_version", "1.0".to_owned()),
        ("body_md5", hex::encode(Md5::digest(body.as_bytes()))),
    ];
    let joined = query
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&");
    let signature = hmac_sha256_hex(secret, &format!("POST\n/apps/{app_id}/events\n{joined}"));
    query.push(("auth_signature", signature));
    query
}

fn hmac_sha256_hex(secret: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts a key of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Reads the next Pusher event from the socket, or `None` after a close frame
/// or the end of the stream. Tungstenite itself replies to WebSocket ping frames.
async fn next_event(socket: &mut Socket) -> anyhow::Result<Option<Value>> {
    loop {
        let message = match socket.next().await {
            None => return Ok(None),
            Some(Ok(message)) => message,
            Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => {
                return Ok(None);
            }
            Some(Err(err)) => return Err(err).context("failed to read from the soketi WebSocket"),
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(_) => return Ok(None),
            // Ping, pong and binary frames carry no Pusher event.
            _ => continue,
        };
        let event: Value = serde_json::from_str(text.as_str())
            .with_context(|| format!("soketi sent a frame that is not JSON: {}", text.as_str()))?;
        return Ok(Some(event));
    }
}

/// Sends a Pusher event with empty data, such as `pusher:pong`.
async fn send_event(socket: &mut Socket, name: &str) -> anyhow::Result<()> {
    let event = json!({ "event": name, "data": {} });
    socket
        .send(Message::text(event.to_string()))
        .await
        .with_context(|| format!("failed to send {name} to soketi"))
}

fn event_name(event: &Value) -> &str {
    event["event"].as_str().unwrap_or_default()
}

/// Returns an event's `data` as a JSON value. Pusher servers send it as a string
/// that contains JSON, so a string is parsed.
fn event_data(event: &Value) -> anyhow::Result<Value> {
    match &event["data"] {
        Value::String(text) => serde_json::from_str(text)
            .with_context(|| format!("the data of this event is not JSON: {event}")),
        other => Ok(other.clone()),
    }
}

/// Returns the `data` of a `message` event. A publisher outside this module may
/// have sent non-string data, which is returned as its JSON text.
fn payload_of(event: &Value) -> String {
    match &event["data"] {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Credentials, timestamp and body of the worked example in Pusher's HTTP API
    // reference. The expected digests were computed independently with `md5sum`
    // and `openssl dgst -sha256 -hmac`.
    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn subscription_auth_matches_pusher_example() {
        assert_eq!(
            subscription_auth(KEY, SECRET, "1234.1234", "private-foobar"),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn events_signature_matches_pusher_example() {
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = sign_events_request("3", KEY, SECRET, body, 1_353_088_179);
        let value = |name: &str| {
            query
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.as_str())
        };

        assert_eq!(value("auth_key"), Some(KEY));
        assert_eq!(value("auth_timestamp"), Some("1353088179"));
        assert_eq!(value("auth_version"), Some("1.0"));
        assert_eq!(value("body_md5"), Some("ec365a775a4cd0599faeb73354201b6f"));
        assert_eq!(
            value("auth_signature"),
            Some("da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c")
        );
    }

    #[test]
    fn channel_for_valid_and_invalid_users() {
        assert_eq!(channel_for("bob").unwrap(), "private-user-bob");
        assert_eq!(
            channel_for("u-1_a=b@c,d.e;f").unwrap(),
            "private-user-u-1_a=b@c,d.e;f"
        );
        for user in ["", "bob smith", "bob/1", "bøb", "a#b"] {
            assert!(
                channel_for(user).is_err(),
                "user {user:?} should be rejected"
            );
        }
    }

    #[test]
    fn event_data_parses_string_and_object() {
        let as_string = json!({ "event": "e", "data": "{\"socket_id\":\"1.2\"}" });
        let as_object = json!({ "event": "e", "data": { "socket_id": "1.2" } });
        assert_eq!(event_data(&as_string).unwrap()["socket_id"], "1.2");
        assert_eq!(event_data(&as_object).unwrap()["socket_id"], "1.2");
    }

    #[test]
    fn payload_of_returns_string_data_verbatim() {
        let event = json!({ "event": "message", "data": "{\"seq\":1}" });
        assert_eq!(payload_of(&event), "{\"seq\":1}");
    }

    #[test]
    fn body_reports_error_cases() {
        assert!(body_reports_error(
            r#"{"error":"The secret authentication failed","code":401}"#
        ));
        assert!(!body_reports_error(r#"{"ok":true}"#));
        assert!(!body_reports_error("{}"));
        assert!(!body_reports_error(""));
    }

    #[test]
    fn authority_brackets_ipv6_host() {
        let mut config = SoketiConfig::default();
        assert_eq!(config.authority(), "127.0.0.1:6001");
        config.host = "::1".to_owned();
        assert_eq!(config.authority(), "[::1]:6001");
    }
}
