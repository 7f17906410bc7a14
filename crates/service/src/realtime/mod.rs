//! The WebSocket server on `websocket_port`: `GET /connect`, plus the probe
//! routes so a process with only this role can be checked.

use std::sync::Arc;

use axum::Router as HttpRouter;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{FromRef, RawQuery, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use routing_protocol::ErrorCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::auth::AuthError;
use crate::error::ApiError;
use crate::presence::InstanceId;

pub mod connection;
pub mod hub;

pub use hub::Hub;

/// Bytes a frame may carry beyond the envelope itself (the `send` wrapper).
const FRAME_OVERHEAD_BYTES: usize = 1024;
/// Bytes of frames collected before a write to the socket.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Bytes of the read buffer that tungstenite 0.29 allocates and fills with
/// zeros for every connection, idle or not. It is also the maximum size of
/// one read call, so a smaller buffer costs more calls for large frames.
/// NOTE: 512 instead of 1024 saves about 420 bytes per idle connection. It
/// costs about 5 % more server CPU per 40,000-byte message sent over
/// WebSocket (measured A/B), and no measurable CPU for small frames.
const READ_BUFFER_BYTES: usize = 512;

/// What the WebSocket server's handlers share.
#[derive(Clone)]
pub struct RealtimeState {
    /// The state shared with the HTTP API.
    pub app: AppState,
    /// This instance's connections.
    pub hub: Arc<Hub>,
    /// This instance's id.
    pub instance_id: InstanceId,
    /// Cancelled when the server shuts down.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl FromRef<RealtimeState> for AppState {
    fn from_ref(state: &RealtimeState) -> Self {
        state.app.clone()
    }
}

/// Builds the WebSocket server's router.
pub fn router(state: RealtimeState) -> HttpRouter {
    HttpRouter::new()
        .route("/connect", get(connect))
        .merge(api::health_routes())
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
}

/// Checks Origin and token before the upgrade, then runs the connection.
async fn connect(
    State(state): State<RealtimeState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match accept_upgrade(state, &headers, query.as_deref(), upgrade).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn accept_upgrade(
    state: RealtimeState,
    headers: &HeaderMap,
    query: Option<&str>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    state.app.origins.check(headers)?;
    let token = match api::bearer_token(headers)? {
        Some(token) => token.to_owned(),
        None => query_token(query).ok_or(AuthError::Missing)?,
    };
    let identity = state.app.verifier.verify(&token).await?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("not a WebSocket upgrade: {rejection}"),
        )
    })?;

    let registration = state
        .hub
        .register(&identity.user)
        .map_err(|err| match err {
            hub::RegisterError::UserFull => ApiError::new(
                ErrorCode::RateLimited,
                "this user holds the maximum number of connections; close one first",
            ),
            hub::RegisterError::InstanceFull => ApiError::new(
                ErrorCode::Unavailable,
                "this instance holds the maximum number of connections; retry later",
            ),
        })?;

    let max_message = state.app.config.limits.max_envelope_bytes + FRAME_OVERHEAD_BYTES;
    let tasks = state.tasks.clone();
    let response = upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WRITE_BUFFER_BYTES + 2 * max_message)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| {
            // The connection runs as a task of its own, so the upgrade
            // task's captured state, which axum 0.8 keeps until the callback's
            // future ends, is freed instead of living as long as the
            // connection.
            tasks.spawn(connection::run(socket, identity, registration, state));
            std::future::ready(())
        });
    Ok(response)
}

/// Reads the `token` query parameter. Its value is never logged.
fn query_token(query: Option<&str>) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
    pairs
        .into_iter()
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value)
}
