//! The bytes carried in `encryptedData`: when the message was sent, by which
//! sender, and that sender's counter, padded to the requested size.
//!
//! Layout, little-endian: 8 bytes send time in nanoseconds since [`now_ns`]'s
//! origin, 4 bytes sender index, 8 bytes counter, then zero padding. Senders
//! and receivers run in one process, so they share the monotonic origin.

use std::sync::OnceLock;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Bytes taken by the timestamp, sender index and counter.
pub const HEADER_BYTES: usize = 20;

/// Bits of a [`MessageKey`] that hold the counter.
const COUNTER_BITS: u32 = 40;

/// Identifies one message of a run: sender index in the high 24 bits,
/// counter in the low 40.
pub type MessageKey = u64;

/// Builds the key of a sender's `counter`-th message.
pub fn message_key(sender: u32, counter: u64) -> MessageKey {
    (u64::from(sender) << COUNTER_BITS) | (counter & ((1 << COUNTER_BITS) - 1))
}

/// Splits a key into sender index and counter.
pub fn split_key(key: MessageKey) -> (u32, u64) {
    (
        (key >> COUNTER_BITS) as u32,
        key & ((1 << COUNTER_BITS) - 1),
    )
}

/// Nanoseconds since the first call in this process, from a monotonic clock.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// Converts an instant to nanoseconds on the [`now_ns`] clock (0 before its origin).
pub fn ns_at(instant: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    instant.saturating_duration_since(origin).as_nanos() as u64
}

/// Encodes a payload of `size` bytes as standard base64, stamped with
/// `sent_ns` (from [`now_ns`] or [`ns_at`]).
pub fn encode(
    sender: u32,
    counter: u64,
    size: usize,
    sent_ns: u64,
    buffer: &mut Vec<u8>,
) -> String {
    buffer.clear();
    buffer.extend_from_slice(&sent_ns.to_le_bytes());
    buffer.extend_from_slice(&sender.to_le_bytes());
    buffer.extend_from_slice(&counter.to_le_bytes());
    buffer.resize(size.max(HEADER_BYTES), 0);
    STANDARD.encode(buffer)
}

/// A decoded payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Send time, from [`now_ns`].
    pub sent_ns: u64,
    /// The message's key.
    pub key: MessageKey,
}

/// Decodes the header of a base64 payload; `None` when it is not one of ours.
pub fn decode(encoded: &str) -> Option<Stamp> {
    // 28 base64 characters decode to 21 bytes, which cover the 20-byte header,
    // so the padding is never decoded.
    let prefix = encoded.get(..28)?;
    let mut header = [0u8; 21];
    let written = STANDARD.decode_slice(prefix, &mut header).ok()?;
    if written < HEADER_BYTES {
        return None;
    }
    let sent_ns = u64::from_le_bytes(header[0..8].try_into().ok()?);
    let sender = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let counter = u64::from_le_bytes(header[12..20].try_into().ok()?);
    Some(Stamp {
        sent_ns,
        key: message_key(sender, counter),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips() {
        let mut buffer = Vec::new();
        let encoded = encode(7, 123_456, 64, 987_654_321, &mut buffer);
        assert_eq!(STANDARD.decode(&encoded).unwrap().len(), 64);
        let stamp = decode(&encoded).expect("decodes");
        assert_eq!(split_key(stamp.key), (7, 123_456));
        assert_eq!(stamp.sent_ns, 987_654_321);
    }

    #[test]
    fn ns_at_follows_now_ns() {
        let before = now_ns();
        let later = Instant::now() + std::time::Duration::from_millis(5);
        assert!(ns_at(later) >= before + 5_000_000);
    }

    #[test]
    fn short_payload_is_not_decoded() {
        assert_eq!(decode("aGVsbG8="), None);
    }
}
