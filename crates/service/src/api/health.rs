//! `/healthz`, `/readyz` and `/metrics`, served by both servers so a process
//! with one role can be probed.

use axum::Json;
use axum::Router as HttpRouter;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::AppState;
use crate::error::RETRY_AFTER_SECONDS;

/// The probe routes, for any router state that contains an [`AppState`].
pub fn routes<S>() -> HttpRouter<S>
where
    AppState: axum::extract::FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    HttpRouter::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// 200 `ok` while the process runs.
pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 when every configured backend answers, else 503 naming the failures.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let router = &state.router;
    let mailbox = router
        .mailbox()
        .check()
        .await
        .err()
        .map(|err| err.to_string());
    let presence = router
        .presence()
        .check()
        .await
        .err()
        .map(|err| err.to_string());
    let bus = router.bus().check().await.err().map(|err| err.to_string());

    let mut components = serde_json::Map::new();
    let mut ready = true;
    for (name, failure) in [
        ("mailbox", mailbox),
        ("presence", presence),
        ("delivery_bus", bus),
    ] {
        let value = match failure {
            None => json!("ok"),
            Some(error) => {
                ready = false;
                json!({ "error": error })
            }
        };
        components.insert(name.to_owned(), value);
    }

    let status = if ready { "ready" } else { "unavailable" };
    let body = Json(json!({ "status": status, "components": components }));
    if ready {
        return (StatusCode::OK, body).into_response();
    }
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    response
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
