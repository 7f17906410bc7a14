//! In-process delivery bus for local mode: one bounded channel per
//! subscribed instance.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{BusError, BusEvent, DeliveryBus};
use crate::presence::InstanceId;

/// Events queued per instance before `publish` waits for the subscriber.
pub const CHANNEL_CAPACITY: usize = 4096;

/// A delivery bus inside this process.
#[derive(Debug, Default)]
pub struct MemoryBus {
    subscribers: Mutex<HashMap<InstanceId, mpsc::Sender<BusEvent>>>,
}

impl MemoryBus {
    /// Creates a bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl DeliveryBus for MemoryBus {
    async fn publish(&self, instance: &InstanceId, event: BusEvent) -> Result<(), BusError> {
        let sender = {
            let subscribers = self.subscribers.lock().expect("bus lock poisoned");
            subscribers.get(instance).cloned()
        };
        let Some(sender) = sender else {
            return Ok(());
        };
        // Waiting here when the queue is full slows the publisher down
        // instead of dropping events; a closed subscriber drops them.
        let _ = sender.send(event).await;
        Ok(())
    }

    async fn subscribe(&self, instance: &InstanceId) -> Result<mpsc::Receiver<BusEvent>, BusError> {
        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let mut subscribers = self.subscribers.lock().expect("bus lock poisoned");
        subscribers.insert(instance.clone(), sender);
        Ok(receiver)
    }

    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryBus;

    #[tokio::test]
    async fn memory_bus_passes_conformance() {
        crate::bus::conformance::run_all(MemoryBus::new).await;
    }
}
