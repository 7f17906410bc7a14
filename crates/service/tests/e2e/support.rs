//! The `TestApp` fixture: a server on loopback port 0 with its own data_dir.

use std::time::Duration;

use routing_client::{Client, Connection, Event};
use routing_protocol::{ErrorCode, ServerFrame, WireEnvelope};
use routing_service::auth::mint_hs256;
use routing_service::config::{Config, Secret};
use routing_service::server::Server;

pub const SECRET: &str = "e2e-test-secret-of-at-least-32-bytes";
/// Every wait in these tests ends within this time.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub api: String,
    pub ws: String,
    #[allow(dead_code)]
    pub config: Config,
    server: Option<Server>,
    _dir: tempfile::TempDir,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::defaults();
        config.bind_address = "127.0.0.1".parse().unwrap();
        config.api_port = 0;
        config.websocket_port = 0;
        config.data_dir = dir.path().to_path_buf();
        config.jwt_secret = Some(Secret(SECRET.into()));
        adjust(&mut config);
        let server = Server::start(config.clone()).await.expect("server starts");
        Self {
            api: format!("http://{}", server.api_addr.expect("api role")),
            ws: format!("ws://{}", server.websocket_addr.expect("websocket role")),
            config,
            server: Some(server),
            _dir: dir,
        }
    }

    pub fn token(&self, user: &str) -> String {
        mint_hs256(SECRET, user, Duration::from_secs(3600)).expect("token")
    }

    pub fn client(&self, user: &str) -> Client {
        Client::new(&self.api, &self.ws, &self.token(user))
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean shutdown");
        }
    }
}

pub fn envelope(to: &str, data: &str) -> WireEnvelope {
    WireEnvelope {
        recipient_id: Some(to.into()),
        encrypted_data: Some(data.into()),
        ..WireEnvelope::default()
    }
}

pub fn envelope_with_id(to: &str, data: &str, id: &str) -> WireEnvelope {
    WireEnvelope {
        message_id: Some(id.into()),
        ..envelope(to, data)
    }
}

/// Asserts an HTTP error answer: status, JSON code, and a non-empty message.
pub async fn assert_error(response: reqwest::Response, status: u16, code: ErrorCode) {
    assert_eq!(response.status().as_u16(), status, "status");
    let body: routing_protocol::ErrorBody = response.json().await.expect("JSON error body");
    assert_eq!(body.error, code, "error code; message: {}", body.message);
    assert!(!body.message.is_empty(), "error message is empty");
}

/// Waits for the next event, failing after [`WAIT`].
pub async fn next_event(connection: &mut Connection) -> Event {
    tokio::time::timeout(WAIT, connection.next_event())
        .await
        .expect("an event within the wait")
        .expect("a readable event")
}

/// Waits for the next frame and asserts it is a message; returns its seq and data.
pub async fn next_message(connection: &mut Connection) -> (u64, String) {
    match next_event(connection).await {
        Event::Frame(ServerFrame::Message { seq, envelope, .. }) => {
            (seq, envelope.encrypted_data.expect("encryptedData"))
        }
        other => panic!("expected a message frame, got {other:?}"),
    }
}

/// Connects and consumes the welcome frame.
pub async fn connect(client: &Client) -> Connection {
    let mut connection = tokio::time::timeout(WAIT, client.connect())
        .await
        .expect("connect within the wait")
        .expect("connected");
    match next_event(&mut connection).await {
        Event::Frame(ServerFrame::Welcome { .. }) => connection,
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Asserts that no frame arrives for a short while.
pub async fn assert_quiet(connection: &mut Connection, for_how_long: Duration) {
    if let Ok(event) = tokio::time::timeout(for_how_long, connection.next_event()).await {
        panic!("expected no frame, got {event:?}");
    }
}
