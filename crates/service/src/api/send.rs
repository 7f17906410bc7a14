//! `POST /send`: accepts one envelope.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use bytes::Bytes;
use routing_protocol::{ErrorCode, SendResponse, WireEnvelope};

use super::AppState;
use super::extract::{AuthUser, JsonContentType, body_error, parse_json};
use crate::error::ApiError;
use crate::router::record_rejected;

/// Accepts an envelope; answers 202 once it is stored.
pub async fn send(
    State(state): State<AppState>,
    auth: Result<AuthUser, ApiError>,
    JsonContentType(content_type): JsonContentType,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SendResponse>), ApiError> {
    let (AuthUser(identity), wire) = match read_request(&state, auth, content_type, body) {
        Ok(request) => request,
        Err(err) => {
            // Rejections before the router are counted here; the router
            // counts its own outcomes.
            record_rejected(&err);
            return Err(err);
        }
    };
    let accepted = state.router.accept(&identity.user, wire).await?;
    let response = SendResponse {
        message_id: accepted.message_id,
        recipient_id: accepted.recipient.as_str().to_owned(),
    };
    Ok((StatusCode::ACCEPTED, Json(response)))
}

fn read_request(
    state: &AppState,
    auth: Result<AuthUser, ApiError>,
    content_type: Result<(), ApiError>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(AuthUser, WireEnvelope), ApiError> {
    let user = auth?;
    content_type?;
    let limit = state.config.limits.max_envelope_bytes;
    let body = body.map_err(|rejection| body_error(rejection, limit))?;
    if body.len() > limit {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "the envelope is {} bytes; the limit is {limit} bytes",
                body.len()
            ),
        ));
    }
    let wire = parse_json(&body, ErrorCode::InvalidEnvelope)?;
    Ok((user, wire))
}
