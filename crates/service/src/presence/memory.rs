//! In-process presence for local mode: a map from user to connection counts
//! per instance.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use routing_protocol::Address;

use super::{InstanceId, Presence, PresenceError};

/// Presence held in this process's memory.
#[derive(Debug, Default)]
pub struct MemoryPresence {
    users: Mutex<HashMap<Address, HashMap<InstanceId, usize>>>,
}

impl MemoryPresence {
    /// Creates an empty presence map.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn register(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError> {
        let mut users = self.users.lock().expect("presence lock poisoned");
        let instances = users.entry(user.clone()).or_default();
        *instances.entry(instance.clone()).or_default() += 1;
        Ok(())
    }

    async fn unregister(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError> {
        let mut users = self.users.lock().expect("presence lock poisoned");
        let Some(instances) = users.get_mut(user) else {
            return Ok(());
        };
        if let Some(count) = instances.get_mut(instance) {
            *count -= 1;
            if *count == 0 {
                instances.remove(instance);
            }
        }
        if instances.is_empty() {
            users.remove(user);
        }
        Ok(())
    }

    async fn lookup(&self, user: &Address) -> Result<Vec<InstanceId>, PresenceError> {
        let users = self.users.lock().expect("presence lock poisoned");
        Ok(users
            .get(user)
            .map(|instances| instances.keys().cloned().collect())
            .unwrap_or_default())
    }

    async fn check(&self) -> Result<(), PresenceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryPresence;

    #[tokio::test]
    async fn memory_presence_passes_conformance() {
        crate::presence::conformance::run_all(MemoryPresence::new).await;
    }
}
