//! The one place that turns failures into HTTP statuses, JSON error bodies
//! and WebSocket error frames. WebSocket close codes live in
//! `routing_protocol::close_code`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use routing_protocol::{ErrorBody, ErrorCode};

use crate::auth::AuthError;
use crate::mailbox::MailboxError;

/// Seconds a client should wait before retrying after 429 or 503.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// A failure with its contract error code and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The contract's error code, which also fixes the HTTP status.
    pub code: ErrorCode,
    /// What failed and what to do, safe to show to the caller.
    pub message: String,
}

impl ApiError {
    /// Creates an error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code,
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        Self::new(ErrorCode::Unauthorized, err.to_string())
    }
}

impl From<MailboxError> for ApiError {
    fn from(err: MailboxError) -> Self {
        match err {
            MailboxError::Full { .. } => Self::new(
                ErrorCode::MailboxFull,
                format!("{err}; the recipient must acknowledge messages before more can be stored"),
            ),
            MailboxError::Conflict { .. } => Self::new(
                ErrorCode::Conflict,
                format!("{err}; use a new messageId for new content"),
            ),
            // The router logs when the mailbox becomes unavailable and when
            // it responds again, so this is not logged per request.
            MailboxError::Unavailable(_) => Self::new(
                ErrorCode::Unavailable,
                "the message store is unavailable; retry later",
            ),
            MailboxError::Internal(_) => {
                tracing::error!(error = %err, "mailbox failure");
                Self::new(
                    ErrorCode::Internal,
                    "an internal error occurred; retry later",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self.code {
            ErrorCode::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ErrorCode::RateLimited | ErrorCode::MailboxFull | ErrorCode::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            _ => {}
        }
        response
    }
}
