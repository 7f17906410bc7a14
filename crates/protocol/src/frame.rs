//! WebSocket frames: JSON text frames with a `type` field.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::api::ErrorCode;
use crate::envelope::WireEnvelope;

/// Close codes the server uses.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect, nothing is lost.
    pub const GOING_AWAY: u16 = 1001;
    /// Policy violation, such as repeated frames that are not of this protocol.
    pub const POLICY: u16 = 1008;
    /// A frame is larger than the limit.
    pub const TOO_LARGE: u16 = 1009;
    /// The token's `exp` passed.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read its socket for `websocket.write_timeout`.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client exceeded its rate.
    pub const RATE_LIMITED: u16 = 4029;
}

/// A frame from the server to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerFrame {
    /// Sent first, once.
    #[serde(rename_all = "camelCase")]
    Welcome {
        /// The caller's address.
        user_id: String,
        /// This connection's id.
        connection_id: String,
    },
    /// A stored or live message.
    #[serde(rename_all = "camelCase")]
    Message {
        /// The per-recipient sequence number.
        seq: u64,
        /// RFC 3339 UTC with milliseconds.
        received_at: String,
        /// The envelope.
        envelope: WireEnvelope,
    },
    /// Answers a client `send`.
    #[serde(rename_all = "camelCase")]
    Sent {
        /// The accepted message's id.
        message_id: String,
    },
    /// Answers a client frame that failed.
    #[serde(rename_all = "camelCase")]
    Error {
        /// The error code, as in HTTP error bodies.
        code: ErrorCode,
        /// What failed.
        message: String,
        /// The message id the failure applies to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
    },
    /// Answers a client `ping`.
    Pong,
}

/// A frame from the client to the server. Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ClientFrame {
    /// Acknowledges every message up to `upToSeq`.
    #[serde(rename_all = "camelCase")]
    Ack {
        /// The highest acknowledged seq.
        up_to_seq: u64,
    },
    /// Sends an envelope, as `POST /send` does.
    Send {
        /// The envelope to send; a JSON object.
        #[serde(deserialize_with = "crate::json::deserialize_object")]
        envelope: WireEnvelope,
    },
    /// Asks for a `pong`. A struct variant, so unknown fields are rejected
    /// here too.
    Ping {},
}

/// Builds a `message` frame around an envelope that is already JSON, so a
/// stored envelope is never parsed again on its way out.
pub fn message_frame_json(seq: u64, received_at: &str, envelope_json: &str) -> String {
    let mut frame = String::with_capacity(envelope_json.len() + 80);
    let _ = write!(
        frame,
        r#"{{"type":"message","seq":{seq},"receivedAt":"{received_at}","envelope":"#
    );
    frame.push_str(envelope_json);
    frame.push('}');
    frame
}

/// Builds a `message` item of `GET /messages` around an envelope that is already JSON.
pub fn message_item_json(seq: u64, received_at: &str, envelope_json: &str, out: &mut String) {
    let _ = write!(
        out,
        r#"{{"seq":{seq},"receivedAt":"{received_at}","envelope":"#
    );
    out.push_str(envelope_json);
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spliced_message_frame_parses_as_server_frame() {
        let envelope = r#"{"senderId":"urn:sm:user:a","recipientId":"urn:sm:user:b","messageId":"m1","encryptedData":"aGk="}"#;
        let frame = message_frame_json(7, "2026-12-04T19:14:13.123Z", envelope);
        let parsed: ServerFrame = serde_json::from_str(&frame).unwrap();
        let ServerFrame::Message {
            seq,
            received_at,
            envelope,
        } = parsed
        else {
            panic!("not a message frame: {frame}");
        };
        assert_eq!(seq, 7);
        assert_eq!(received_at, "2026-12-04T19:14:13.123Z");
        assert_eq!(envelope.message_id.as_deref(), Some("m1"));
    }

    #[test]
    fn client_frames_parse_and_reject_unknown_fields() {
        let ack: ClientFrame = serde_json::from_str(r#"{"type":"ack","upToSeq":3}"#).unwrap();
        assert_eq!(ack, ClientFrame::Ack { up_to_seq: 3 });
        let ping: ClientFrame = serde_json::from_str(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(ping, ClientFrame::Ping {});
        assert_eq!(serde_json::to_string(&ping).unwrap(), r#"{"type":"ping"}"#);
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"ping","x":1}"#).is_err());
        let array_envelope = r#"{"type":"send","envelope":[null,"bob",null,null,"aGk=",null]}"#;
        assert!(serde_json::from_str::<ClientFrame>(array_envelope).is_err());
        assert!(
            serde_json::from_str::<ClientFrame>(r#"{"type":"ack","upToSeq":3,"x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn error_frame_serialises_with_snake_case_code() {
        let frame = ServerFrame::Error {
            code: ErrorCode::MailboxFull,
            message: "full".into(),
            message_id: Some("m1".into()),
        };
        let json = serde_json::to_string(&frame).unwrap();
        assert_eq!(
            json,
            r#"{"type":"error","code":"mailbox_full","message":"full","messageId":"m1"}"#
        );
    }
}
