//! Request extractors: the bearer token and JSON bodies with the contract's
//! error codes.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use bytes::Bytes;
use routing_protocol::ErrorCode;
use serde::de::DeserializeOwned;

use super::AppState;
use crate::auth::{AuthError, Identity};
use crate::error::ApiError;

/// The authenticated caller of an HTTP request.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Identity);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?.ok_or(AuthError::Missing)?;
        Ok(Self(state.verifier.verify_cached(token).await?))
    }
}

/// Reads the token of an `Authorization: Bearer` header, if there is one.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::new(
            ErrorCode::Unauthorized,
            "the Authorization header must be `Bearer <token>`",
        )
    };
    let value = value.to_str().map_err(|_| invalid())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(invalid)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(invalid());
    }
    Ok(Some(token.trim()))
}

/// Whether the request declares a JSON body. Extracting it reads the
/// `Content-Type` header in place, where extracting a `HeaderMap` would copy
/// every header.
#[derive(Debug)]
pub struct JsonContentType(pub Result<(), ApiError>);

impl<S: Sync> FromRequestParts<S> for JsonContentType {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(require_json(&parts.headers)))
    }
}

/// Checks that the request declares a JSON body.
pub fn require_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the body must be JSON with Content-Type: application/json",
        ))
    }
}

/// Turns a body-buffering failure into 413 or 400.
pub fn body_error(rejection: axum::extract::rejection::BytesRejection, limit: usize) -> ApiError {
    if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            ErrorCode::TooLarge,
            format!("the body is larger than {limit} bytes"),
        )
    } else {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "the request body could not be read",
        )
    }
}

/// Parses a JSON body: syntax errors are `invalid_json`, shape errors
/// (unknown, duplicate, missing or mistyped fields) get `shape_code`.
pub fn parse_json<T: DeserializeOwned>(body: &Bytes, shape_code: ErrorCode) -> Result<T, ApiError> {
    routing_protocol::json::from_object_slice(body).map_err(|err| json_error(&err, shape_code))
}

/// Maps a serde_json error to the contract's code and a message.
pub fn json_error(err: &serde_json::Error, shape_code: ErrorCode) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not valid JSON: {err}"),
        ),
        Category::Data => ApiError::new(shape_code, format!("the body has the wrong shape: {err}")),
    }
}
