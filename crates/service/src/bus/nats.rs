//! Delivery bus on NATS core for cluster mode: one subject per instance,
//! `<prefix>.deliver.<instance id>`, with no JetStream. NATS core delivers
//! at most once, which the bus contract allows because connections fill
//! gaps from the mailbox.
//!
//! Wire format of one event, version 1, integers big-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | format version, 1 |
//! | 1 | kind: 1 delivery, 2 acked |
//! | 1 | length `n` of the recipient's bare id, 1 to 128 |
//! | n | the recipient's bare id, ASCII |
//! | 8 + 8 + rest | delivery: seq, received_at_ms, then the frame bytes |
//! | 8 | acked: up_to, and nothing after it |

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, Event, Subscriber};
use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use routing_protocol::Address;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::AbortHandle;

use super::{BusError, BusEvent, DeliveryBus};
use crate::presence::InstanceId;

/// Events queued per subscription before further events are dropped.
pub const CHANNEL_CAPACITY: usize = 4096;

/// Largest encoded event that `publish` sends, in bytes (1 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Time allowed to connect to the NATS server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Time allowed for a flush round trip to the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

const FORMAT_VERSION: u8 = 1;
const KIND_DELIVERY: u8 = 1;
const KIND_ACKED: u8 = 2;

/// Events dropped by a subscription, by `reason`.
const EVENTS_DROPPED: &str = "routing_bus_events_dropped_total";

/// A delivery bus on a NATS server.
///
/// Clones share one client and one table of subscriptions. Dropping the
/// last clone ends every subscription, so their receivers return `None`.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    subject_prefix: String,
    /// The forwarding task of each subscribed instance.
    subscriptions: Mutex<HashMap<InstanceId, AbortHandle>>,
    /// Counts of skipped events, shared with the forwarding tasks.
    drops: Arc<DropCounts>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let subscriptions = self.subscriptions.get_mut().expect("bus lock poisoned");
        for (_, task) in subscriptions.drain() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("subject_prefix", &self.inner.subject_prefix)
            .finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Connects to the NATS server at `url` and uses subjects under
    /// `subject_prefix`, which must be one or more dot-separated tokens
    /// without wildcards.
    ///
    /// Fails with `Unavailable` when the prefix is invalid or the server
    /// cannot be reached. After a successful connect, the client reconnects
    /// by itself whenever the connection drops.
    pub async fn connect(url: &str, subject_prefix: &str) -> Result<Self, BusError> {
        if !subject_prefix.split('.').all(is_subject_token) {
            return Err(BusError::Unavailable(format!(
                "subject prefix {subject_prefix:?} is invalid; use dot-separated tokens \
                 without spaces, '*' or '>'"
            )));
        }
        let connected = Arc::new(AtomicBool::new(true));
        let client = async_nats::ConnectOptions::new()
            .name("routing-service")
            .connection_timeout(CONNECT_TIMEOUT)
            .event_callback(move |event| {
                log_event(&connected, event);
                async {}
            })
            .connect(url)
            .await
            .map_err(|err| BusError::Unavailable(format!("cannot connect to NATS: {err}")))?;
        tracing::info!(subject_prefix, "nats delivery bus connected");
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                subject_prefix: subject_prefix.to_owned(),
                subscriptions: Mutex::new(HashMap::new()),
                drops: Arc::new(DropCounts::default()),
            }),
        })
    }

    fn subject(&self, instance: &InstanceId) -> Result<String, BusError> {
        if !is_subject_token(instance) {
            return Err(BusError::Unavailable(format!(
                "instance id {instance:?} cannot be a NATS subject token; \
                 use letters, digits, '_' and '-'"
            )));
        }
        Ok(format!("{}.deliver.{instance}", self.inner.subject_prefix))
    }

    async fn flush(&self) -> Result<(), BusError> {
        match tokio::time::timeout(FLUSH_TIMEOUT, self.inner.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(BusError::Unavailable(format!("NATS flush failed: {err}"))),
            Err(_) => Err(BusError::Unavailable(format!(
                "NATS flush timed out after {FLUSH_TIMEOUT:?}"
            ))),
        }
    }
}

/// Logs changes of the connection state once each, and server or client
/// errors as they come.
fn log_event(connected: &AtomicBool, event: Event) {
    match event {
        Event::Connected => {
            if !connected.swap(true, Ordering::Relaxed) {
                tracing::info!("nats delivery bus reconnected");
            }
        }
        Event::Disconnected => {
            if connected.swap(false, Ordering::Relaxed) {
                tracing::warn!("nats delivery bus disconnected; reconnecting");
            }
        }
        Event::Closed => tracing::info!("nats delivery bus closed"),
        Event::LameDuckMode => {
            tracing::warn!("nats server entered lame duck mode; it will disconnect soon");
        }
        Event::Draining => tracing::info!("nats delivery bus draining"),
        Event::SlowConsumer(sid) => {
            tracing::warn!(sid, "nats client dropped messages of a slow subscription");
        }
        Event::ServerError(err) => tracing::warn!(error = %err, "nats server error"),
        // While disconnected, every reconnect attempt reports an error; the
        // disconnect was logged once already.
        Event::ClientError(err) if !connected.load(Ordering::Relaxed) => {
            tracing::debug!(error = %err, "nats reconnect attempt failed");
        }
        Event::ClientError(err) => tracing::warn!(error = %err, "nats client error"),
    }
}

/// Checks that `token` can appear between two dots of a NATS subject.
fn is_subject_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && !matches!(byte, b'.' | b'*' | b'>'))
}

#[async_trait]
impl DeliveryBus for NatsBus {
    async fn publish(&self, instance: &InstanceId, event: BusEvent) -> Result<(), BusError> {
        let subject = self.subject(instance)?;
        // NOTE: an oversized event is reported as `Unavailable` because
        // `BusError` has no kind for invalid input. Real frames stay far
        // below the limit, since envelopes are limited to `max_envelope_bytes`.
        let payload = encode(&event)?;
        self.inner
            .client
            .publish(subject, payload)
            .await
            .map_err(|err| BusError::Unavailable(format!("NATS publish failed: {err}")))
    }

    async fn subscribe(&self, instance: &InstanceId) -> Result<mpsc::Receiver<BusEvent>, BusError> {
        let subject = self.subject(instance)?;
        let subscriber = self
            .inner
            .client
            .subscribe(subject)
            .await
            .map_err(|err| BusError::Unavailable(format!("NATS subscribe failed: {err}")))?;
        // The flush returns once the server has processed the SUB, so events
        // published after this call returns reach the subscription.
        self.flush().await?;

        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let task = tokio::spawn(forward(
            subscriber,
            sender,
            self.inner.drops.clone(),
            instance.clone(),
        ));
        let replaced = {
            let mut subscriptions = self.inner.subscriptions.lock().expect("bus lock poisoned");
            subscriptions.insert(instance.clone(), task.abort_handle())
        };
        if let Some(replaced) = replaced {
            replaced.abort();
        }
        Ok(receiver)
    }

    async fn check(&self) -> Result<(), BusError> {
        let state = self.inner.client.connection_state();
        if state != State::Connected {
            return Err(BusError::Unavailable(format!(
                "NATS connection is {state:?}, not connected"
            )));
        }
        self.flush().await
    }
}

/// Decodes the messages of `subscriber` into `events` until the receiver
/// is dropped or the client closes. Never waits for room in `events`, so a
/// slow receiver cannot stall the NATS client.
async fn forward(
    mut subscriber: Subscriber,
    events: mpsc::Sender<BusEvent>,
    drops: Arc<DropCounts>,
    instance: InstanceId,
) {
    loop {
        let message = tokio::select! {
            () = events.closed() => return,
            message = subscriber.next() => message,
        };
        let Some(message) = message else {
            return;
        };
        let event = match decode(message.payload) {
            Ok(event) => event,
            Err(err) => {
                drops.record_malformed(&instance, &err);
                continue;
            }
        };
        match events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => drops.record_full(&instance),
            Err(TrySendError::Closed(_)) => return,
        }
    }
}

/// Counts of events a subscription skipped. Only the 1st, 2nd, 4th, 8th
/// and so on of each reason are logged, but the metric counts every one.
#[derive(Debug, Default)]
struct DropCounts {
    malformed: AtomicU64,
    full: AtomicU64,
}

impl DropCounts {
    fn record_malformed(&self, instance: &InstanceId, err: &DecodeError) {
        metrics::counter!(EVENTS_DROPPED, "reason" => "malformed").increment(1);
        let total = self.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        if total.is_power_of_two() {
            tracing::warn!(instance = %instance, error = %err, total, "skipped malformed bus event");
        }
    }

    fn record_full(&self, instance: &InstanceId) {
        metrics::counter!(EVENTS_DROPPED, "reason" => "full").increment(1);
        let total = self.full.fetch_add(1, Ordering::Relaxed) + 1;
        if total.is_power_of_two() {
            tracing::warn!(
                instance = %instance,
                total,
                "dropped bus event because the subscriber queue is full; the mailbox fills the gap"
            );
        }
    }
}

/// A reason to skip a NATS message that is not a valid bus event.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum DecodeError {
    #[error("payload ends early")]
    Truncated,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("invalid recipient id")]
    InvalidRecipient,
    #[error("{0} bytes after the event")]
    TrailingBytes(usize),
}

/// Encodes `event` in the wire format, rejecting events over
/// `MAX_PAYLOAD_BYTES`.
fn encode(event: &BusEvent) -> Result<Bytes, BusError> {
    let id = event.recipient().id().as_bytes();
    let id_len = u8::try_from(id.len())
        .map_err(|_| BusError::Unavailable("recipient id is longer than 255 bytes".to_owned()))?;
    let body_len = match event {
        BusEvent::Delivery { frame, .. } => 16 + frame.len(),
        BusEvent::Acked { .. } => 8,
    };
    let total = 3 + id.len() + body_len;
    if total > MAX_PAYLOAD_BYTES {
        return Err(BusError::Unavailable(format!(
            "bus event of {total} bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes"
        )));
    }

    let mut buffer = BytesMut::with_capacity(total);
    buffer.put_u8(FORMAT_VERSION);
    match event {
        BusEvent::Delivery {
            seq,
            received_at_ms,
            frame,
            ..
        } => {
            buffer.put_u8(KIND_DELIVERY);
            buffer.put_u8(id_len);
            buffer.put_slice(id);
            buffer.put_u64(*seq);
            buffer.put_u64(*received_at_ms);
            buffer.put_slice(frame);
        }
        BusEvent::Acked { up_to, .. } => {
            buffer.put_u8(KIND_ACKED);
            buffer.put_u8(id_len);
            buffer.put_slice(id);
            buffer.put_u64(*up_to);
        }
    }
    Ok(buffer.freeze())
}

/// Decodes one event. The frame of a delivery shares `payload`'s memory.
fn decode(mut payload: Bytes) -> Result<BusEvent, DecodeError> {
    if payload.remaining() < 3 {
        return Err(DecodeError::Truncated);
    }
    let version = payload.get_u8();
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let kind = payload.get_u8();
    let id_len = usize::from(payload.get_u8());
    if payload.remaining() < id_len {
        return Err(DecodeError::Truncated);
    }
    let id = payload.split_to(id_len);
    let recipient = std::str::from_utf8(&id)
        .ok()
        .and_then(|id| Address::from_id(id).ok())
        .ok_or(DecodeError::InvalidRecipient)?;

    match kind {
        KIND_DELIVERY => {
            if payload.remaining() < 16 {
                return Err(DecodeError::Truncated);
            }
            let seq = payload.get_u64();
            let received_at_ms = payload.get_u64();
            Ok(BusEvent::Delivery {
                recipient,
                seq,
                received_at_ms,
                frame: payload,
            })
        }
        KIND_ACKED => {
            if payload.remaining() < 8 {
                return Err(DecodeError::Truncated);
            }
            let up_to = payload.get_u64();
            if payload.has_remaining() {
                return Err(DecodeError::TrailingBytes(payload.remaining()));
            }
            Ok(BusEvent::Acked { recipient, up_to })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use routing_protocol::Address;

    use super::{DecodeError, MAX_PAYLOAD_BYTES, NatsBus, decode, encode};
    use crate::bus::{BusEvent, DeliveryBus};
    use crate::presence::InstanceId;

    const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

    fn nats_url() -> String {
        std::env::var("ROUTING_TEST_NATS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    fn unique_prefix() -> String {
        format!("routing-test-{}", uuid::Uuid::now_v7().simple())
    }

    async fn connect(prefix: &str) -> NatsBus {
        NatsBus::connect(&nats_url(), prefix)
            .await
            .expect("NATS is reachable at ROUTING_TEST_NATS_URL or nats://127.0.0.1:4222")
    }

    fn bob() -> Address {
        Address::parse("bob.ok-1").expect("valid test id")
    }

    #[tokio::test]
    async fn nats_bus_passes_conformance() {
        let bus = connect(&unique_prefix()).await;
        crate::bus::conformance::run_all(|| bus.clone()).await;
    }

    #[test]
    fn delivery_round_trips() {
        let event = BusEvent::Delivery {
            recipient: bob(),
            seq: u64::MAX - 1,
            received_at_ms: 1_767_225_600_123,
            frame: Bytes::from_static(b"{\"type\":\"message\"}"),
        };
        let decoded = decode(encode(&event).unwrap()).unwrap();
        let BusEvent::Delivery {
            recipient,
            seq,
            received_at_ms,
            frame,
        } = decoded
        else {
            panic!("decoded {decoded:?}");
        };
        assert_eq!(recipient, bob());
        assert_eq!(seq, u64::MAX - 1);
        assert_eq!(received_at_ms, 1_767_225_600_123);
        assert_eq!(&frame[..], b"{\"type\":\"message\"}");
    }

    #[test]
    fn acked_round_trips() {
        let event = BusEvent::Acked {
            recipient: bob(),
            up_to: 42,
        };
        let decoded = decode(encode(&event).unwrap()).unwrap();
        let BusEvent::Acked { recipient, up_to } = decoded else {
            panic!("decoded {decoded:?}");
        };
        assert_eq!(recipient, bob());
        assert_eq!(up_to, 42);
    }

    #[test]
    fn empty_frame_round_trips() {
        let event = BusEvent::Delivery {
            recipient: bob(),
            seq: 1,
            received_at_ms: 0,
            frame: Bytes::new(),
        };
        let decoded = decode(encode(&event).unwrap()).unwrap();
        assert!(
            matches!(decoded, BusEvent::Delivery { ref frame, .. } if frame.is_empty()),
            "{decoded:?}"
        );
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        let acked = encode(&BusEvent::Acked {
            recipient: bob(),
            up_to: 3,
        })
        .unwrap();
        let mut trailing = acked.to_vec();
        trailing.push(0);
        let mut bad_version = acked.to_vec();
        bad_version[0] = 9;
        let mut bad_kind = acked.to_vec();
        bad_kind[1] = 7;
        let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
            ("empty", vec![], DecodeError::Truncated),
            ("header only", vec![1, 1], DecodeError::Truncated),
            ("version", bad_version, DecodeError::UnknownVersion(9)),
            ("kind", bad_kind, DecodeError::UnknownKind(7)),
            ("id past end", vec![1, 2, 50, b'b'], DecodeError::Truncated),
            ("empty id", vec![1, 2, 0], DecodeError::InvalidRecipient),
            (
                "id with space",
                vec![1, 2, 2, b'b', b' '],
                DecodeError::InvalidRecipient,
            ),
            (
                "id not utf-8",
                vec![1, 2, 1, 0xff],
                DecodeError::InvalidRecipient,
            ),
            (
                "acked without seq",
                vec![1, 2, 1, b'b', 0, 0],
                DecodeError::Truncated,
            ),
            (
                "delivery without seq",
                vec![1, 1, 1, b'b', 0, 0, 0, 0, 0, 0, 0, 0],
                DecodeError::Truncated,
            ),
            ("trailing", trailing, DecodeError::TrailingBytes(1)),
        ];
        for (name, payload, expected) in cases {
            assert_eq!(
                decode(Bytes::from(payload)).unwrap_err(),
                expected,
                "case {name}"
            );
        }
    }

    #[test]
    fn oversized_event_is_rejected() {
        let event = BusEvent::Delivery {
            recipient: bob(),
            seq: 1,
            received_at_ms: 0,
            frame: Bytes::from(vec![b'x'; MAX_PAYLOAD_BYTES]),
        };
        assert!(encode(&event).is_err());
    }

    #[tokio::test]
    async fn malformed_message_is_skipped() {
        let prefix = unique_prefix();
        let bus = connect(&prefix).await;
        let instance: InstanceId = Arc::from("malformed-1");
        let mut events = bus.subscribe(&instance).await.unwrap();
        let subject = format!("{prefix}.deliver.malformed-1");
        bus.inner
            .client
            .publish(subject, Bytes::from_static(b"\x01\x01\xffnot an event"))
            .await
            .unwrap();
        let valid = BusEvent::Acked {
            recipient: bob(),
            up_to: 5,
        };
        bus.publish(&instance, valid).await.unwrap();

        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the valid event arrives")
            .expect("the subscription is open");
        assert!(
            matches!(event, BusEvent::Acked { up_to: 5, .. }),
            "{event:?}"
        );
        assert_eq!(bus.inner.drops.malformed.load(super::Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn second_subscription_replaces_first() {
        let bus = connect(&unique_prefix()).await;
        let instance: InstanceId = Arc::from("replace-1");
        let mut first = bus.subscribe(&instance).await.unwrap();
        let mut second = bus.subscribe(&instance).await.unwrap();
        let acked = BusEvent::Acked {
            recipient: bob(),
            up_to: 1,
        };
        bus.publish(&instance, acked).await.unwrap();

        let event = tokio::time::timeout(Duration::from_secs(5), second.recv())
            .await
            .expect("the new subscription gets the event");
        assert!(event.is_some());
        let ended = tokio::time::timeout(Duration::from_secs(5), first.recv())
            .await
            .expect("the old subscription ends");
        assert!(ended.is_none(), "the old subscription got {ended:?}");
    }

    #[tokio::test]
    async fn invalid_instance_is_rejected() {
        let bus = connect(&unique_prefix()).await;
        let wildcard: InstanceId = Arc::from("a.*");
        assert!(bus.subscribe(&wildcard).await.is_err());
        let acked = BusEvent::Acked {
            recipient: bob(),
            up_to: 1,
        };
        assert!(bus.publish(&wildcard, acked).await.is_err());
    }

    #[tokio::test]
    async fn check_passes_when_connected() {
        let bus = connect(&unique_prefix()).await;
        bus.check().await.expect("connected bus passes check");
    }
}
