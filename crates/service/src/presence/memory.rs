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
    /// Connection counts per instance, for each user. A list rather than a
    /// map, because a user is usually on one or two instances, and a map
    /// allocates room for four entries at its first insert.
    users: Mutex<HashMap<Address, Vec<(InstanceId, usize)>>>,
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
        match instances.iter_mut().find(|(id, _)| id == instance) {
            Some((_, count)) => *count += 1,
            None => {
                instances.reserve_exact(1);
                instances.push((instance.clone(), 1));
            }
        }
        Ok(())
    }

    async fn unregister(&self, user: &Address, instance: &InstanceId) -> Result<(), PresenceError> {
        let mut users = self.users.lock().expect("presence lock poisoned");
        let Some(instances) = users.get_mut(user) else {
            return Ok(());
        };
        if let Some(index) = instances.iter().position(|(id, _)| id == instance) {
            instances[index].1 -= 1;
            if instances[index].1 == 0 {
                instances.swap_remove(index);
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
            .map(|instances| instances.iter().map(|(id, _)| id.clone()).collect())
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
