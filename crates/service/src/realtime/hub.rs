//! The local hub: this instance's WebSocket connections by user. It takes
//! events from the delivery bus and hands each to every connection of the
//! recipient, without ever waiting on a slow one.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use routing_protocol::Address;

use crate::bus::{ACKED_BY_ID, BusEvent};

/// Live messages queued per connection. When the queue is full the
/// connection is marked lagged and reads the rest from the mailbox.
pub const CONNECTION_QUEUE: usize = 64;

const SHARDS: usize = 32;

/// A live message on its way to one connection.
#[derive(Debug, Clone)]
pub struct LiveMessage {
    /// The recipient's seq.
    pub seq: u64,
    /// When it was accepted, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// The `message` frame, shared by every connection of the recipient.
    pub frame: Utf8Bytes,
}

/// State a connection shares with the hub.
#[derive(Debug, Default)]
pub struct Signals {
    /// The highest seq the user acknowledged on any connection.
    pub acked: AtomicU64,
    /// Set when a live message could not be queued.
    pub lagged: AtomicBool,
    /// Set when messages of the user were acknowledged by message id.
    pub acked_by_id: AtomicBool,
    /// Live messages for the connection, at most [`CONNECTION_QUEUE`]. It
    /// allocates only when a message arrives, and the connection takes the
    /// whole buffer each time, so an idle connection keeps no queue memory.
    live: Mutex<VecDeque<LiveMessage>>,
    /// Set after `acked`, `lagged`, `acked_by_id` or `live` changed, and
    /// cleared when the connection polls it.
    changed: AtomicBool,
    /// The connection's task, woken after a change. It is smaller than a
    /// `Notify` and its waiting future, which every idle connection would
    /// keep.
    waker: AtomicWaker,
}

impl Signals {
    /// Queues a live message, or marks the connection lagged when the queue
    /// is full, then wakes the connection.
    fn push_live(&self, message: LiveMessage) {
        let queued = {
            let mut live = self.live.lock().expect("live queue lock poisoned");
            if live.len() < CONNECTION_QUEUE {
                live.push_back(message);
                true
            } else {
                false
            }
        };
        if !queued {
            self.lagged.store(true, Ordering::Release);
        }
        self.wake();
    }

    /// Marks a change and wakes the connection.
    fn wake(&self) {
        self.changed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Returns ready once for the changes since the last ready poll;
    /// otherwise the task is woken by the next [`Signals::wake`].
    pub fn poll_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.changed.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Takes every queued live message, oldest first.
    pub fn take_live(&self) -> VecDeque<LiveMessage> {
        std::mem::take(&mut *self.live.lock().expect("live queue lock poisoned"))
    }
}

struct Slot {
    id: u64,
    signals: Arc<Signals>,
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The instance has `websocket.max_connections` connections.
    #[error("this instance holds the maximum number of connections")]
    InstanceFull,
    /// The user has `websocket.max_connections_per_user` connections here.
    #[error("this user holds the maximum number of connections")]
    UserFull,
}

/// Connections of this instance, by user.
pub struct Hub {
    shards: Vec<Mutex<HashMap<Address, Vec<Slot>>>>,
    hasher: RandomState,
    next_id: AtomicU64,
    open: AtomicUsize,
    max_connections: usize,
    max_per_user: usize,
}

/// A connection's place in the hub; dropping it removes the connection.
pub struct Registration {
    hub: Arc<Hub>,
    user: Address,
    id: u64,
    /// Live messages, acks and lag signals for this connection.
    pub signals: Arc<Signals>,
}

impl Hub {
    /// Creates an empty hub with connection limits.
    pub fn new(max_connections: usize, max_per_user: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            max_connections,
            max_per_user,
        }
    }

    fn shard(&self, user: &Address) -> &Mutex<HashMap<Address, Vec<Slot>>> {
        let index = self.hasher.hash_one(user) as usize % SHARDS;
        &self.shards[index]
    }

    /// The number of open connections.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Adds a connection of `user`, within the limits.
    pub fn register(self: &Arc<Self>, user: &Address) -> Result<Registration, RegisterError> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(RegisterError::InstanceFull);
        }
        let mut shard = self.shard(user).lock().expect("hub lock poisoned");
        // Most users have one connection, and the first push of a `Vec`
        // would reserve room for four.
        let slots = shard
            .entry(user.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        if slots.len() >= self.max_per_user {
            drop(shard);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(RegisterError::UserFull);
        }
        let signals = Arc::new(Signals::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        slots.push(Slot {
            id,
            signals: signals.clone(),
        });
        drop(shard);
        Ok(Registration {
            hub: self.clone(),
            user: user.clone(),
            id,
            signals,
        })
    }

    fn unregister(&self, user: &Address, id: u64) {
        let mut shard = self.shard(user).lock().expect("hub lock poisoned");
        if let Some(slots) = shard.get_mut(user) {
            slots.retain(|slot| slot.id != id);
            if slots.is_empty() {
                shard.remove(user);
            }
        }
        drop(shard);
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Hands a bus event to every local connection of its recipient.
    pub fn dispatch(&self, event: BusEvent) {
        match event {
            BusEvent::Delivery {
                recipient,
                seq,
                received_at_ms,
                frame,
            } => {
                let Ok(frame) = Utf8Bytes::try_from(frame) else {
                    tracing::error!(seq, "dropped a delivery whose frame is not UTF-8");
                    return;
                };
                let message = LiveMessage {
                    seq,
                    received_at_ms,
                    frame,
                };
                self.each_connection(&recipient, |slot| {
                    slot.signals.push_live(message.clone());
                });
            }
            BusEvent::Acked { recipient, up_to } => {
                self.each_connection(&recipient, |slot| {
                    if up_to == ACKED_BY_ID {
                        slot.signals.acked_by_id.store(true, Ordering::Release);
                    } else {
                        slot.signals.acked.fetch_max(up_to, Ordering::AcqRel);
                    }
                    slot.signals.wake();
                });
            }
        }
    }

    /// Wakes every connection, so that each checks the shutdown token, which
    /// the caller has cancelled.
    pub fn wake_all(&self) {
        for shard in &self.shards {
            let shard = shard.lock().expect("hub lock poisoned");
            for slot in shard.values().flatten() {
                slot.signals.wake();
            }
        }
    }

    fn each_connection(&self, user: &Address, mut visit: impl FnMut(&Slot)) {
        let shard = self.shard(user).lock().expect("hub lock poisoned");
        if let Some(slots) = shard.get(user) {
            slots.iter().for_each(&mut visit);
        }
    }
}

impl Registration {
    /// The registered user.
    pub fn user(&self) -> &Address {
        &self.user
    }

    /// The hub-wide id of this connection.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.user, self.id);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn delivery(user: &Address, seq: u64) -> BusEvent {
        BusEvent::Delivery {
            recipient: user.clone(),
            seq,
            received_at_ms: 0,
            frame: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn every_connection_of_a_user_gets_each_delivery() {
        let hub = Arc::new(Hub::new(10, 10));
        let bob = Address::parse("bob").unwrap();
        let first = hub.register(&bob).unwrap();
        let second = hub.register(&bob).unwrap();
        hub.dispatch(delivery(&bob, 1));
        assert_eq!(first.signals.take_live().front().unwrap().seq, 1);
        assert_eq!(second.signals.take_live().front().unwrap().seq, 1);
    }

    #[test]
    fn live_queue_keeps_order_and_empties() {
        let hub = Arc::new(Hub::new(10, 10));
        let bob = Address::parse("bob").unwrap();
        let registration = hub.register(&bob).unwrap();
        for seq in 1..=3 {
            hub.dispatch(delivery(&bob, seq));
        }
        let seqs: Vec<u64> = registration
            .signals
            .take_live()
            .iter()
            .map(|live| live.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(registration.signals.take_live().is_empty());
        assert!(!registration.signals.lagged.load(Ordering::Acquire));
    }

    #[test]
    fn full_queue_marks_connection_lagged() {
        let hub = Arc::new(Hub::new(10, 10));
        let bob = Address::parse("bob").unwrap();
        let registration = hub.register(&bob).unwrap();
        for seq in 1..=(CONNECTION_QUEUE as u64 + 1) {
            hub.dispatch(delivery(&bob, seq));
        }
        assert!(registration.signals.lagged.load(Ordering::Acquire));
        assert_eq!(registration.signals.take_live().len(), CONNECTION_QUEUE);
    }

    #[test]
    fn limits_and_drop_release_slots() {
        let hub = Arc::new(Hub::new(2, 1));
        let bob = Address::parse("bob").unwrap();
        let alice = Address::parse("alice").unwrap();
        let first = hub.register(&bob).unwrap();
        assert_eq!(hub.register(&bob).err(), Some(RegisterError::UserFull));
        let _second = hub.register(&alice).unwrap();
        let carol = Address::parse("carol").unwrap();
        assert_eq!(
            hub.register(&carol).err(),
            Some(RegisterError::InstanceFull)
        );
        drop(first);
        assert_eq!(hub.open_connections(), 1);
        assert!(hub.register(&bob).is_ok());
    }
}
