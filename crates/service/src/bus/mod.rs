//! The delivery bus: carries deliveries from the instance that accepted a
//! message to the instances that hold the recipient's connections. A hint
//! only: a lost delivery costs latency, because connections fill gaps from
//! the mailbox.

use async_trait::async_trait;
use bytes::Bytes;
use routing_protocol::Address;
use tokio::sync::mpsc;

use crate::presence::InstanceId;

pub mod memory;
pub mod nats;

#[cfg(test)]
pub(crate) mod conformance;

/// The `up_to` of a [`BusEvent::Acked`] sent after an ack by message ids,
/// which names no seq. Seq 0 is never assigned, so it cannot be a real ack.
pub const ACKED_BY_ID: u64 = 0;

/// What the bus carries to an instance.
#[derive(Debug, Clone)]
pub enum BusEvent {
    /// A message was stored for `recipient`.
    Delivery {
        /// The recipient.
        recipient: Address,
        /// Its seq.
        seq: u64,
        /// When it was accepted, milliseconds since the Unix epoch.
        received_at_ms: u64,
        /// The complete `message` frame, as JSON text.
        frame: Bytes,
    },
    /// Messages of `recipient` up to `up_to` were acknowledged, so every
    /// connection of the user may open its flow-control window. `up_to` is
    /// [`ACKED_BY_ID`] when messages were acknowledged by message id.
    Acked {
        /// The recipient.
        recipient: Address,
        /// The acknowledged seq.
        up_to: u64,
    },
}

impl BusEvent {
    /// The user the event is about.
    pub fn recipient(&self) -> &Address {
        match self {
            Self::Delivery { recipient, .. } | Self::Acked { recipient, .. } => recipient,
        }
    }
}

/// Why a bus call failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The backend cannot be reached; retry later.
    #[error("the delivery bus is unavailable: {0}")]
    Unavailable(String),
}

/// Point-to-point delivery between instances. Every backend keeps these
/// guarantees:
///
/// - Events published to one instance from one publisher arrive in publish
///   order, or not at all.
/// - An event to an instance that nobody subscribed to is dropped without error.
#[async_trait]
pub trait DeliveryBus: Send + Sync + 'static {
    /// Publishes an event to `instance`.
    async fn publish(&self, instance: &InstanceId, event: BusEvent) -> Result<(), BusError>;

    /// Subscribes to the events of `instance`. A second subscription of the
    /// same instance replaces the first.
    async fn subscribe(&self, instance: &InstanceId) -> Result<mpsc::Receiver<BusEvent>, BusError>;

    /// Checks that the backend responds, for `/readyz`.
    async fn check(&self) -> Result<(), BusError>;
}
