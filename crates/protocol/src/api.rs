//! HTTP request and response bodies, and the error codes of the contract.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::envelope::WireEnvelope;

/// The `error` field of an error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not valid JSON.
    InvalidJson,
    /// 400: the envelope breaks a rule of the contract.
    InvalidEnvelope,
    /// 400: a parameter or a non-envelope body is invalid.
    InvalidRequest,
    /// 401: the token is missing or invalid.
    Unauthorized,
    /// 403: the caller may not do this, or the Origin is not allowed.
    Forbidden,
    /// 404: no such path.
    NotFound,
    /// 405: the path exists but not with this method.
    MethodNotAllowed,
    /// 409: the same messageId was sent before with other content.
    Conflict,
    /// 413: the body is larger than the limit.
    TooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 429: the caller sends faster than its rate.
    RateLimited,
    /// 429: the recipient's mailbox holds the maximum number of messages.
    MailboxFull,
    /// 503: a backend is unavailable; retry later.
    Unavailable,
    /// 500: an unexpected failure.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidEnvelope => "invalid_envelope",
            Self::InvalidRequest => "invalid_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited => "rate_limited",
            Self::MailboxFull => "mailbox_full",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidJson | Self::InvalidEnvelope | Self::InvalidRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited | Self::MailboxFull => 429,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A machine-readable code.
    pub error: ErrorCode,
    /// What failed and what to do.
    pub message: String,
}

/// The 202 answer to `POST /send`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendResponse {
    /// The message id, as sent or as assigned by the server.
    pub message_id: String,
    /// The recipient's canonical address.
    pub recipient_id: String,
}

/// One stored message, in `GET /messages` and in `message` frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageItem {
    /// The per-recipient sequence number.
    pub seq: u64,
    /// When the service accepted the message, RFC 3339 UTC with milliseconds.
    pub received_at: String,
    /// The envelope, with `senderId` set by the service.
    pub envelope: WireEnvelope,
}

/// The 200 answer to `GET /messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagesPage {
    /// Messages with `seq > after`, oldest first.
    pub messages: Vec<MessageItem>,
    /// The `after` value for the next page when this page was full, else null.
    pub next_after: Option<u64>,
}

/// The body of `POST /messages/ack`: exactly one of the two fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AckRequest {
    /// Acknowledges every message with `seq <= upToSeq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to_seq: Option<u64>,
    /// Acknowledges the messages with these ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ids: Option<Vec<String>>,
}
