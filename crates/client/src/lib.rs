//! A small async client for routing-service: `POST /send`, `GET /messages`,
//! `POST /messages/ack`, and a WebSocket connection that reads frames and
//! sends acks, sends and pings.
//!
//! ```no_run
//! # async fn demo() -> Result<(), routing_client::ClientError> {
//! use routing_client::Client;
//! use routing_protocol::WireEnvelope;
//!
//! let client = Client::new("http://127.0.0.1:8082", "ws://127.0.0.1:8085", "TOKEN");
//! let envelope = WireEnvelope {
//!     recipient_id: Some("bob".into()),
//!     encrypted_data: Some("aGVsbG8=".into()),
//!     ..Default::default()
//! };
//! client.send(&envelope).await?;
//! # Ok(()) }
//! ```

use futures_util::{SinkExt, StreamExt};
use routing_protocol::{
    AckRequest, ClientFrame, ErrorBody, MessagesPage, SendResponse, ServerFrame, WireEnvelope,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("the server answered {status}: {}: {}", body.error, body.message)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server answered with an unexpected status or body.
    #[error("unexpected answer {status}: {text}")]
    Unexpected {
        /// The HTTP status.
        status: u16,
        /// The body text.
        text: String,
    },
    /// HTTP transport failure.
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// WebSocket failure.
    #[error("WebSocket failed: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// A frame was not valid JSON of the protocol.
    #[error("invalid frame from the server: {0}")]
    InvalidFrame(#[from] serde_json::Error),
}

/// A client for one user's token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    api_url: String,
    websocket_url: String,
    token: String,
}

impl Client {
    /// Creates a client; `api_url` is like `http://127.0.0.1:8082` and
    /// `websocket_url` like `ws://127.0.0.1:8085` (a trailing `/connect` is
    /// accepted too).
    pub fn new(api_url: &str, websocket_url: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            api_url: api_url.trim_end_matches('/').to_owned(),
            websocket_url: base_url(websocket_url, "/connect"),
            token: token.to_owned(),
        }
    }

    /// The same client with another token.
    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: token.to_owned(),
            ..self.clone()
        }
    }

    /// Sends one envelope with `POST /send`.
    pub async fn send(&self, envelope: &WireEnvelope) -> Result<SendResponse, ClientError> {
        let response = self
            .http
            .post(format!("{}/send", self.api_url))
            .bearer_auth(&self.token)
            .json(envelope)
            .send()
            .await?;
        expect_json(response, 202).await
    }

    /// Reads stored messages with `GET /messages`; `None` when there are none (204).
    pub async fn messages(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Option<MessagesPage>, ClientError> {
        let response = self
            .http
            .get(format!(
                "{}/messages?after={after}&limit={limit}",
                self.api_url
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if response.status().as_u16() == 204 {
            return Ok(None);
        }
        expect_json(response, 200).await.map(Some)
    }

    /// Acknowledges with `POST /messages/ack`.
    pub async fn ack(&self, request: &AckRequest) -> Result<(), ClientError> {
        let response = self
            .http
            .post(format!("{}/messages/ack", self.api_url))
            .bearer_auth(&self.token)
            .json(request)
            .send()
            .await?;
        let status = response.status().as_u16();
        if status == 204 {
            return Ok(());
        }
        Err(error_from(status, response.text().await?))
    }

    /// Opens a WebSocket with the token in the `Authorization` header.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let mut request = format!("{}/connect", self.websocket_url).into_client_request()?;
        let value = format!("Bearer {}", self.token)
            .parse()
            .expect("a token is a valid header value");
        request.headers_mut().insert("authorization", value);
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(Connection { socket }),
            // The server rejected the upgrade with a JSON error body.
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.into_body().unwrap_or_default();
                Err(error_from(
                    status,
                    String::from_utf8_lossy(&body).into_owned(),
                ))
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// Strips a trailing `/` and `suffix`, so `ws://host:8085/connect` and
/// `ws://host:8085` name the same server.
fn base_url(url: &str, suffix: &str) -> String {
    let url = url.trim_end_matches('/');
    url.strip_suffix(suffix).unwrap_or(url).to_owned()
}

async fn expect_json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    expected: u16,
) -> Result<T, ClientError> {
    let status = response.status().as_u16();
    let text = response.text().await?;
    if status == expected {
        return serde_json::from_str(&text).map_err(ClientError::from);
    }
    Err(error_from(status, text))
}

fn error_from(status: u16, text: String) -> ClientError {
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => ClientError::Unexpected { status, text },
    }
}

/// What the server sent on a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A protocol frame.
    Frame(ServerFrame),
    /// The server closed the connection with this code and reason.
    Closed(Option<(u16, String)>),
}

/// An open WebSocket connection.
#[derive(Debug)]
pub struct Connection {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Connection {
    /// Waits for the next protocol frame or the close; WebSocket pings are
    /// answered by the library and skipped here.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            let Some(message) = self.socket.next().await else {
                return Ok(Event::Closed(None));
            };
            match message? {
                Message::Text(text) => return Ok(Event::Frame(serde_json::from_str(&text)?)),
                Message::Close(frame) => return Ok(Event::Closed(frame.map(close_parts))),
                _ => continue,
            }
        }
    }

    /// Sends a client frame.
    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let text = serde_json::to_string(frame)?;
        self.send_text(&text).await
    }

    /// Sends raw text, for testing how the server handles bad frames.
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Acknowledges every message up to `seq`.
    pub async fn ack(&mut self, seq: u64) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Ack { up_to_seq: seq }).await
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.socket.close(None).await?;
        Ok(())
    }
}

fn close_parts(frame: CloseFrame) -> (u16, String) {
    (u16::from(frame.code), frame.reason.to_string())
}
