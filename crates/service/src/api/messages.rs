//! `GET /messages` and `POST /messages/ack`: the caller's stored mail.

use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use routing_protocol::envelope::is_valid_message_id;
use routing_protocol::frame::message_item_json;
use routing_protocol::{AckRequest, ErrorCode};
use serde::Deserialize;

use super::AppState;
use super::extract::{AuthUser, body_error, parse_json, require_json};
use crate::error::ApiError;
use crate::mailbox::AckTarget;
use crate::router::format_received_at;

/// The default and maximum page sizes of `GET /messages`.
pub const DEFAULT_LIMIT: usize = 100;
/// The maximum `limit` of `GET /messages`.
pub const MAX_LIMIT: usize = 1000;
/// The maximum number of ids in one `POST /messages/ack`.
pub const MAX_ACK_IDS: usize = 1000;
/// The body size a page of `GET /messages` stays under, in bytes: a page
/// holds fewer than `limit` messages when envelopes are large.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Pages of `GET /messages` built at once; further requests wait.
pub const CONCURRENT_PAGE_READS: usize = 64;
/// The maximum body size of `POST /messages/ack`, in bytes.
pub const MAX_ACK_BODY_BYTES: usize = 256 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// Lists the caller's stored messages with `seq > after`, oldest first.
pub async fn list(
    State(state): State<AppState>,
    AuthUser(identity): AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (after, requested) = parse_list_query(query.as_deref().unwrap_or(""))?;
    let limit = requested.min(page_messages(state.config.limits.max_envelope_bytes));
    let _permit = state.page_reads.acquire().await.map_err(|_| {
        ApiError::new(
            ErrorCode::Unavailable,
            "the server is shutting down; retry later",
        )
    })?;
    let messages = state.router.read(&identity.user, after, limit).await?;
    let Some(last) = messages.last() else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let next_after = if messages.len() == limit {
        last.seq.to_string()
    } else {
        "null".into()
    };

    let size: usize = messages.iter().map(|m| m.envelope_json.len() + 80).sum();
    let mut body = String::with_capacity(size + 40);
    body.push_str(r#"{"messages":["#);
    for (index, message) in messages.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        let received_at = format_received_at(message.received_at_ms);
        message_item_json(message.seq, &received_at, &message.envelope_json, &mut body);
    }
    body.push_str(r#"],"nextAfter":"#);
    body.push_str(&next_after);
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The most messages of up to `max_envelope_bytes` each that fit in
/// [`MAX_PAGE_BYTES`], at least one.
pub fn page_messages(max_envelope_bytes: usize) -> usize {
    (MAX_PAGE_BYTES / max_envelope_bytes.max(1)).clamp(1, MAX_LIMIT)
}

fn parse_list_query(query: &str) -> Result<(u64, usize), ApiError> {
    let parsed: ListQuery = serde_urlencoded::from_str(query).map_err(|err| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("invalid query ({err}); the parameters are after and limit"),
        )
    })?;
    let after = match parsed.after.as_deref() {
        None | Some("") => 0,
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "after must be a non-negative integer seq",
            )
        })?,
    };
    let limit = match parsed.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => limit,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("limit must be an integer from 1 to {MAX_LIMIT}"),
                ));
            }
        },
    };
    Ok((after, limit))
}

/// Acknowledges the caller's messages up to a seq or by ids.
pub async fn ack(
    State(state): State<AppState>,
    AuthUser(identity): AuthUser,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    require_json(&headers)?;
    let body = body.map_err(|rejection| body_error(rejection, MAX_ACK_BODY_BYTES))?;
    let request: AckRequest = parse_json(&body, ErrorCode::InvalidRequest)?;
    let target = ack_target(request)?;
    state.router.ack(&identity.user, target).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks an ack body: exactly one of `upToSeq` and `messageIds`.
pub fn ack_target(request: AckRequest) -> Result<AckTarget, ApiError> {
    let invalid = |message: String| ApiError::new(ErrorCode::InvalidRequest, message);
    match (request.up_to_seq, request.message_ids) {
        (Some(seq), None) => Ok(AckTarget::UpTo(seq)),
        (None, Some(ids)) => {
            if ids.is_empty() || ids.len() > MAX_ACK_IDS {
                return Err(invalid(format!(
                    "messageIds must list 1 to {MAX_ACK_IDS} ids"
                )));
            }
            if let Some(bad) = ids.iter().find(|id| !is_valid_message_id(id)) {
                return Err(invalid(format!(
                    "messageIds contains {bad:?}, which is not 1 to 128 characters of [A-Za-z0-9._:-]"
                )));
            }
            Ok(AckTarget::Ids(ids))
        }
        _ => Err(invalid(
            "the body must contain exactly one of upToSeq and messageIds".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_defaults_and_bounds() {
        assert_eq!(parse_list_query("").unwrap(), (0, DEFAULT_LIMIT));
        assert_eq!(parse_list_query("after=5&limit=1000").unwrap(), (5, 1000));
        for bad in [
            "limit=0",
            "limit=1001",
            "after=-1",
            "after=x",
            "limit=1.5",
            "foo=1",
        ] {
            let err = parse_list_query(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{bad}");
        }
    }

    #[test]
    fn page_size_follows_envelope_limit() {
        assert_eq!(page_messages(65_536), 64);
        assert_eq!(page_messages(1), MAX_LIMIT);
        assert_eq!(page_messages(16 * 1024 * 1024), 1);
    }

    #[test]
    fn ack_target_needs_exactly_one_field() {
        let both = AckRequest {
            up_to_seq: Some(1),
            message_ids: Some(vec!["a".into()]),
        };
        assert!(ack_target(both).is_err());
        assert!(ack_target(AckRequest::default()).is_err());
        let empty = AckRequest {
            up_to_seq: None,
            message_ids: Some(vec![]),
        };
        assert!(ack_target(empty).is_err());
        let ok = AckRequest {
            up_to_seq: Some(3),
            message_ids: None,
        };
        assert_eq!(ack_target(ok).unwrap(), AckTarget::UpTo(3));
    }
}
