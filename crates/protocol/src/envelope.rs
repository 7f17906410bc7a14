//! The envelope: the sealed message unit that the service routes.
//!
//! [`WireEnvelope`] is the JSON shape on the wire, with base64 strings.
//! [`Envelope`] is a validated envelope with its bytes decoded. The service
//! never looks inside `encryptedData` beyond base64 validity and size.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, general_purpose};
use serde::{Deserialize, Serialize};

use crate::address::{Address, AddressError};

/// The maximum length of a `messageId`, in characters.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// An envelope as JSON on the wire. Unknown fields and duplicate keys are
/// rejected when it is parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireEnvelope {
    /// Overwritten by the server with the caller's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    /// The recipient's address or bare id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_id: Option<String>,
    /// Chosen by the sender for deduplication; the server assigns a UUIDv7 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Base64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_symmetric_key: Option<String>,
    /// Base64 bytes, required and non-empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_data: Option<String>,
    /// Base64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Why an envelope is invalid. The `Display` text names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// `recipientId` is absent.
    MissingRecipient,
    /// `recipientId` is not a valid address.
    InvalidRecipient(AddressError),
    /// `encryptedData` is absent or empty.
    MissingData,
    /// `messageId` is empty, too long or has a character outside `[A-Za-z0-9._:-]`.
    InvalidMessageId,
    /// A byte field is not valid base64.
    InvalidBase64(&'static str),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingRecipient => f.write_str("recipientId is required"),
            Self::InvalidRecipient(err) => write!(f, "recipientId is invalid: {err}"),
            Self::MissingData => f.write_str("encryptedData is required and must not be empty"),
            Self::InvalidMessageId => {
                f.write_str("messageId must be 1 to 128 characters of [A-Za-z0-9._:-]")
            }
            Self::InvalidBase64(field) => write!(
                f,
                "{field} is not valid base64 (standard or URL-safe alphabet, padding optional)"
            ),
        }
    }
}

impl std::error::Error for EnvelopeError {}

/// A validated envelope with its sender forced to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The authenticated caller.
    pub sender: Address,
    /// The recipient.
    pub recipient: Address,
    /// The sender's message id, or a server-assigned UUIDv7.
    pub message_id: String,
    /// Decoded `encryptedSymmetricKey`.
    pub encrypted_symmetric_key: Option<Vec<u8>>,
    /// Decoded `encryptedData`, never empty.
    pub encrypted_data: Vec<u8>,
    /// Decoded `signature`.
    pub signature: Option<Vec<u8>>,
}

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(false);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// Decodes base64 in the standard or URL-safe alphabet, padding optional.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    STANDARD_LENIENT
        .decode(text)
        .or_else(|_| URL_SAFE_LENIENT.decode(text))
        .ok()
}

/// Encodes bytes as padded standard base64, the output form.
pub fn encode_base64(bytes: &[u8]) -> String {
    general_purpose::STANDARD.encode(bytes)
}

/// Checks a `messageId`: 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn is_valid_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MESSAGE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn decode_field(
    value: Option<String>,
    field: &'static str,
) -> Result<Option<Vec<u8>>, EnvelopeError> {
    match value {
        None => Ok(None),
        Some(text) => decode_base64(&text)
            .map(Some)
            .ok_or(EnvelopeError::InvalidBase64(field)),
    }
}

impl WireEnvelope {
    /// Validates the envelope, forcing its sender to `sender`. A missing
    /// `messageId` is filled by `new_id`.
    pub fn validate(
        self,
        sender: &Address,
        new_id: impl FnOnce() -> String,
    ) -> Result<Envelope, EnvelopeError> {
        let recipient = self.recipient_id.ok_or(EnvelopeError::MissingRecipient)?;
        let recipient = Address::parse(&recipient).map_err(EnvelopeError::InvalidRecipient)?;

        let message_id = match self.message_id {
            Some(id) if is_valid_message_id(&id) => id,
            Some(_) => return Err(EnvelopeError::InvalidMessageId),
            None => new_id(),
        };

        let data = decode_field(self.encrypted_data, "encryptedData")?;
        let encrypted_data = match data {
            Some(bytes) if !bytes.is_empty() => bytes,
            _ => return Err(EnvelopeError::MissingData),
        };

        Ok(Envelope {
            sender: sender.clone(),
            recipient,
            message_id,
            encrypted_symmetric_key: decode_field(
                self.encrypted_symmetric_key,
                "encryptedSymmetricKey",
            )?,
            encrypted_data,
            signature: decode_field(self.signature, "signature")?,
        })
    }
}

impl Envelope {
    /// Converts to the wire form, with padded standard base64.
    pub fn to_wire(&self) -> WireEnvelope {
        WireEnvelope {
            sender_id: Some(self.sender.as_str().to_owned()),
            recipient_id: Some(self.recipient.as_str().to_owned()),
            message_id: Some(self.message_id.clone()),
            encrypted_symmetric_key: self.encrypted_symmetric_key.as_deref().map(encode_base64),
            encrypted_data: Some(encode_base64(&self.encrypted_data)),
            signature: self.signature.as_deref().map(encode_base64),
        }
    }

    /// Serialises the wire form as compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.to_wire()).expect("an envelope always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Address {
        Address::parse("alice").unwrap()
    }

    fn wire(data: &str) -> WireEnvelope {
        WireEnvelope {
            recipient_id: Some("bob".into()),
            encrypted_data: Some(data.into()),
            ..WireEnvelope::default()
        }
    }

    #[test]
    fn sender_is_forced_to_caller() {
        let mut input = wire("aGVsbG8=");
        input.sender_id = Some("urn:sm:user:mallory".into());
        let envelope = input.validate(&alice(), || "id".into()).unwrap();
        assert_eq!(envelope.sender, alice());
        assert_eq!(
            envelope.to_wire().sender_id.as_deref(),
            Some("urn:sm:user:alice")
        );
    }

    #[test]
    fn base64_input_forms_are_normalised() {
        for input in ["aGk", "aGk=", "-_8", "+/8="] {
            let envelope = wire(input).validate(&alice(), || "id".into()).unwrap();
            let output = envelope.to_wire().encrypted_data.unwrap();
            assert!(
                output.ends_with('=') || output.len().is_multiple_of(4),
                "{output}"
            );
            assert_eq!(decode_base64(&output).unwrap(), envelope.encrypted_data);
        }
        let envelope = wire("-_8").validate(&alice(), || "id".into()).unwrap();
        assert_eq!(envelope.to_wire().encrypted_data.as_deref(), Some("+/8="));
    }

    #[test]
    fn invalid_envelopes_name_the_field() {
        let missing = WireEnvelope {
            encrypted_data: Some("aGk=".into()),
            ..Default::default()
        };
        assert_eq!(
            missing.validate(&alice(), String::new),
            Err(EnvelopeError::MissingRecipient)
        );
        assert_eq!(
            wire("").validate(&alice(), String::new),
            Err(EnvelopeError::MissingData)
        );
        assert_eq!(
            wire("not base64!").validate(&alice(), String::new),
            Err(EnvelopeError::InvalidBase64("encryptedData"))
        );
        let mut bad_id = wire("aGk=");
        bad_id.message_id = Some("has space".into());
        assert_eq!(
            bad_id.validate(&alice(), String::new),
            Err(EnvelopeError::InvalidMessageId)
        );
    }

    #[test]
    fn unknown_and_duplicate_fields_are_rejected() {
        let unknown = r#"{"recipientId":"bob","encryptedData":"aGk=","extra":1}"#;
        assert!(serde_json::from_str::<WireEnvelope>(unknown).is_err());
        let duplicate = r#"{"recipientId":"bob","recipientId":"eve","encryptedData":"aGk="}"#;
        assert!(serde_json::from_str::<WireEnvelope>(duplicate).is_err());
    }

    #[test]
    fn message_id_rules() {
        assert!(is_valid_message_id("0193a5f0-7c1e-7d2a-9b1c-3f5e8a2b4c6d"));
        assert!(is_valid_message_id("a.b_c:d-e"));
        assert!(!is_valid_message_id(""));
        assert!(!is_valid_message_id(&"a".repeat(129)));
        assert!(!is_valid_message_id("a/b"));
    }
}
