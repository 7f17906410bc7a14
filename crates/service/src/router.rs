//! Accept, store, route: the path every message takes.
//!
//! `accept` validates an envelope, forces its sender, appends it to the
//! recipient's mailbox (durable) and only then routes it: presence names the
//! instances that hold the recipient's connections, and the delivery bus
//! carries the message frame to each. Routing failures are logged and
//! counted but never fail the send, because the message is already stored.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use metrics::Histogram;
use routing_protocol::frame::message_frame_json;
use routing_protocol::{Address, ErrorCode, WireEnvelope};

use crate::bus::{ACKED_BY_ID, BusError, BusEvent, DeliveryBus};
use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::mailbox::{AckTarget, Appended, Mailbox, MailboxError, NewMessage, StoredMessage};
use crate::presence::{InstanceId, Presence, PresenceError};
use crate::telemetry;

/// How long routing waits for presence or the bus. Both are hints: past
/// this the message waits in the mailbox, and connections resync from it,
/// so a slow backend never holds up the 202.
pub const HINT_TIMEOUT: Duration = Duration::from_secs(1);

/// A send that was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The message id, as sent or as assigned.
    pub message_id: String,
    /// The recipient's canonical address.
    pub recipient: Address,
}

/// The backends and limits every request path shares.
pub struct Router {
    mailbox: Arc<dyn Mailbox>,
    presence: Arc<dyn Presence>,
    bus: Arc<dyn DeliveryBus>,
    limiter: DefaultKeyedRateLimiter<Address>,
    max_envelope_bytes: usize,
    health: BackendHealth,
}

/// Whether each backend succeeded on its last call, so an outage and the
/// recovery are logged once each instead of once per call.
struct BackendHealth {
    up: [AtomicBool; 3],
    /// `routing_backend_call_duration_seconds` per [`Call`], resolved once
    /// because every message makes several calls.
    durations: [Histogram; Call::ALL.len()],
}

/// The backends the router calls, as named in logs and metric labels.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Mailbox = 0,
    Presence = 1,
    Bus = 2,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Mailbox => "mailbox",
            Self::Presence => "presence",
            Self::Bus => "bus",
        }
    }
}

/// A backend call the router times, as the `backend` and `operation` labels.
#[derive(Debug, Clone, Copy)]
enum Call {
    Append = 0,
    Ack = 1,
    Read = 2,
    Lookup = 3,
    Publish = 4,
}

impl Call {
    /// Every call, in the order of the discriminants.
    const ALL: [Call; 5] = [
        Self::Append,
        Self::Ack,
        Self::Read,
        Self::Lookup,
        Self::Publish,
    ];

    fn backend(self) -> Backend {
        match self {
            Self::Append | Self::Ack | Self::Read => Backend::Mailbox,
            Self::Lookup => Backend::Presence,
            Self::Publish => Backend::Bus,
        }
    }

    fn operation(self) -> &'static str {
        match self {
            Self::Append => "append",
            Self::Ack => "ack",
            Self::Read => "read",
            Self::Lookup => "lookup",
            Self::Publish => "publish",
        }
    }
}

impl BackendHealth {
    fn new() -> Self {
        telemetry::install_recorder();
        Self {
            up: [
                AtomicBool::new(true),
                AtomicBool::new(true),
                AtomicBool::new(true),
            ],
            durations: Call::ALL.map(|call| {
                metrics::histogram!(
                    telemetry::BACKEND_CALL_DURATION,
                    "backend" => call.backend().name(),
                    "operation" => call.operation()
                )
            }),
        }
    }

    /// Records a call's outcome; logs when the backend's state changes.
    fn record(&self, call: Call, started: Instant, failure: Option<&dyn std::fmt::Display>) {
        let backend = call.backend();
        let name = backend.name();
        let operation = call.operation();
        self.durations[call as usize].record(started.elapsed().as_secs_f64());
        let up = &self.up[backend as usize];
        match failure {
            None => {
                if !up.swap(true, Ordering::AcqRel) {
                    tracing::info!(backend = name, "backend responds again");
                }
            }
            Some(error) => {
                metrics::counter!(telemetry::BACKEND_ERRORS, "backend" => name, "operation" => operation)
                    .increment(1);
                if up.swap(false, Ordering::AcqRel) {
                    tracing::warn!(backend = name, operation, error = %error, "backend call failed; messages wait in the mailbox where possible");
                } else {
                    tracing::debug!(backend = name, operation, error = %error, "backend call failed");
                }
            }
        }
    }
}

impl Router {
    /// Creates a router over the given backends.
    pub fn new(
        mailbox: Arc<dyn Mailbox>,
        presence: Arc<dyn Presence>,
        bus: Arc<dyn DeliveryBus>,
        limits: &LimitsConfig,
    ) -> Self {
        let rate = NonZeroU32::new(limits.send_rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.send_burst).unwrap_or(rate);
        Self {
            mailbox,
            presence,
            bus,
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            max_envelope_bytes: limits.max_envelope_bytes,
            health: BackendHealth::new(),
        }
    }

    /// The mailbox, for reads.
    pub fn mailbox(&self) -> &Arc<dyn Mailbox> {
        &self.mailbox
    }

    /// The presence backend.
    pub fn presence(&self) -> &Arc<dyn Presence> {
        &self.presence
    }

    /// The delivery bus.
    pub fn bus(&self) -> &Arc<dyn DeliveryBus> {
        &self.bus
    }

    /// Validates, stores and routes one envelope from `sender`.
    pub async fn accept(&self, sender: &Address, wire: WireEnvelope) -> Result<Accepted, ApiError> {
        let result = self.accept_inner(sender, wire).await;
        match &result {
            Ok(_) => telemetry::message_metrics().accepted.increment(1),
            Err(err) => record_rejected(err),
        }
        result
    }

    async fn accept_inner(
        &self,
        sender: &Address,
        wire: WireEnvelope,
    ) -> Result<Accepted, ApiError> {
        if self.limiter.check_key(sender).is_err() {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "too many sends from this user; slow down and retry after a second",
            ));
        }

        let envelope = wire
            .validate(sender, || uuid::Uuid::now_v7().to_string())
            .map_err(|err| ApiError::new(ErrorCode::InvalidEnvelope, err.to_string()))?;
        let envelope_json = envelope.to_json();
        if envelope_json.len() > self.max_envelope_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "the envelope is {} bytes as JSON; the limit is {} bytes",
                    envelope_json.len(),
                    self.max_envelope_bytes
                ),
            ));
        }

        let message = NewMessage {
            recipient: envelope.recipient.clone(),
            sender: sender.clone(),
            message_id: envelope.message_id.clone(),
            content_hash: content_hash(&envelope),
            envelope_json: envelope_json.into(),
        };
        let accepted = Accepted {
            message_id: envelope.message_id,
            recipient: envelope.recipient,
        };

        let started = Instant::now();
        let appended = self.mailbox.append(message).await;
        let failure = match &appended {
            Err(err @ (MailboxError::Unavailable(_) | MailboxError::Internal(_))) => Some(err),
            _ => None,
        };
        self.health
            .record(Call::Append, started, failure.map(|e| e as _));
        match appended? {
            Appended::New(stored) => {
                telemetry::message_metrics().stored.increment(1);
                self.route(&accepted.recipient, &stored).await;
            }
            Appended::Duplicate { .. } => {
                telemetry::message_metrics().duplicate.increment(1);
            }
        }
        Ok(accepted)
    }

    /// Publishes a stored message to every instance that has a connection
    /// of its recipient.
    async fn route(&self, recipient: &Address, stored: &StoredMessage) {
        let Some(instances) = self.lookup(recipient).await else {
            return;
        };
        let received_at = format_received_at(stored.received_at_ms);
        let frame = Bytes::from(message_frame_json(
            stored.seq,
            &received_at,
            &stored.envelope_json,
        ));
        let publishes = instances.iter().map(|instance| {
            let event = BusEvent::Delivery {
                recipient: recipient.clone(),
                seq: stored.seq,
                received_at_ms: stored.received_at_ms,
                frame: frame.clone(),
            };
            self.publish(instance, event)
        });
        futures_util::future::join_all(publishes).await;
    }

    /// Acknowledges messages of `user` and notifies the user's connections.
    pub async fn ack(&self, user: &Address, target: AckTarget) -> Result<u64, ApiError> {
        let up_to = match &target {
            AckTarget::UpTo(seq) => *seq,
            AckTarget::Ids(_) => ACKED_BY_ID,
        };
        let started = Instant::now();
        let deleted = self.mailbox.ack(user, target).await;
        self.health
            .record(Call::Ack, started, deleted.as_ref().err().map(|e| e as _));
        let deleted = deleted?;
        telemetry::message_metrics().acknowledged.increment(deleted);

        // An ack that deleted nothing changes no connection's window.
        if deleted > 0
            && let Some(instances) = self.lookup(user).await
        {
            let publishes = instances.iter().map(|instance| {
                let event = BusEvent::Acked {
                    recipient: user.clone(),
                    up_to,
                };
                self.publish(instance, event)
            });
            futures_util::future::join_all(publishes).await;
        }
        Ok(deleted)
    }

    /// Reads stored messages of `user` after `after`.
    pub async fn read(
        &self,
        user: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ApiError> {
        let started = Instant::now();
        let messages = self.mailbox.read(user, after, limit).await;
        self.health
            .record(Call::Read, started, messages.as_ref().err().map(|e| e as _));
        Ok(messages?)
    }

    /// Forgets rate-limit state of users that have been idle.
    pub fn forget_idle_senders(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    async fn lookup(&self, user: &Address) -> Option<Vec<InstanceId>> {
        let started = Instant::now();
        let result = tokio::time::timeout(HINT_TIMEOUT, self.presence.lookup(user))
            .await
            .unwrap_or_else(|_| Err(PresenceError::Unavailable("lookup timed out".into())));
        self.health
            .record(Call::Lookup, started, result.as_ref().err().map(|e| e as _));
        result.ok()
    }

    async fn publish(&self, instance: &InstanceId, event: BusEvent) {
        let started = Instant::now();
        let result = tokio::time::timeout(HINT_TIMEOUT, self.bus.publish(instance, event))
            .await
            .unwrap_or_else(|_| Err(BusError::Unavailable("publish timed out".into())));
        self.health.record(
            Call::Publish,
            started,
            result.as_ref().err().map(|e| e as _),
        );
        if result.is_err() {
            metrics::counter!(telemetry::MESSAGES_DEAD_LETTERED).increment(1);
        }
    }
}

/// Counts a rejected send by its error code. Callers that reject a send
/// before [`Router::accept`] call this too.
pub fn record_rejected(err: &ApiError) {
    metrics::counter!(telemetry::MESSAGES_REJECTED, "reason" => err.code.as_str()).increment(1);
}

/// Hashes the content fields of an envelope, so a retry (same content) can
/// be told from a conflict (other content) without storing the content twice.
pub fn content_hash(envelope: &routing_protocol::Envelope) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for field in [
        envelope.encrypted_symmetric_key.as_deref(),
        Some(envelope.encrypted_data.as_slice()),
        envelope.signature.as_deref(),
    ] {
        match field {
            // The length prefix keeps ("ab", "c") apart from ("a", "bc").
            Some(bytes) => {
                hasher.update(&[1]);
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
            }
            None => hasher.update(&[0]),
        }
    }
    hasher.digest128()
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn format_received_at(millis: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(millis);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_health_tracks_state_changes() {
        let health = BackendHealth::new();
        let error = "connection refused";
        health.record(Call::Publish, Instant::now(), Some(&error));
        assert!(!health.up[Backend::Bus as usize].load(Ordering::Acquire));
        assert!(
            health.up[Backend::Mailbox as usize].load(Ordering::Acquire),
            "others stay up"
        );
        health.record(Call::Publish, Instant::now(), None);
        assert!(health.up[Backend::Bus as usize].load(Ordering::Acquire));
    }

    #[test]
    fn received_at_has_milliseconds_and_z() {
        assert_eq!(
            format_received_at(1_796_411_653_123),
            "2026-12-04T19:14:13.123Z"
        );
        assert_eq!(format_received_at(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn content_hash_separates_fields() {
        let sender = Address::parse("a").unwrap();
        let make = |key: Option<&[u8]>, data: &[u8]| routing_protocol::Envelope {
            sender: sender.clone(),
            recipient: sender.clone(),
            message_id: "m".into(),
            encrypted_symmetric_key: key.map(<[u8]>::to_vec),
            encrypted_data: data.to_vec(),
            signature: None,
        };
        let one = content_hash(&make(Some(b"ab"), b"c"));
        let two = content_hash(&make(Some(b"a"), b"bc"));
        let three = content_hash(&make(None, b"abc"));
        assert_ne!(one, two);
        assert_ne!(two, three);
        assert_eq!(one, content_hash(&make(Some(b"ab"), b"c")));
    }
}
