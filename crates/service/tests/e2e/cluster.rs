//! Cluster mode with the real binary: one API instance and two WebSocket
//! instances on PostgreSQL, Redis and NATS behave as one service.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use routing_client::Event;
use routing_protocol::ServerFrame;
use tokio::sync::Mutex;

use crate::binary::{Running, client, start_binary_with};
use crate::support::{WAIT, connect, envelope, envelope_with_id, next_event, next_message};

/// The PostgreSQL URL of the cluster tests; `ROUTING_TEST_POSTGRES_URL` overrides it.
fn postgres_url() -> String {
    std::env::var("ROUTING_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A cluster whose schema, key prefix and subject prefix are unique to one test.
struct Cluster {
    name: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        let name = format!("e2e_{}", uuid_suffix());
        Self { name, dir: tempfile::tempdir().unwrap() }
    }

    async fn start(&self, roles: &str) -> Running {
        let env = [
            ("ROUTING_RUN_MODE", "cluster".to_owned()),
            ("ROUTING_ROLES", roles.to_owned()),
            ("ROUTING_MESSAGE_STORE__TYPE", "postgres".to_owned()),
            ("ROUTING_MESSAGE_STORE__POSTGRES__URL", postgres_url()),
            ("ROUTING_MESSAGE_STORE__POSTGRES__SCHEMA", self.name.clone()),
            ("ROUTING_PRESENCE_CACHE__TYPE", "redis".to_owned()),
            ("ROUTING_PRESENCE_CACHE__REDIS__KEY_PREFIX", self.name.clone()),
            ("ROUTING_PRESENCE_CACHE__REDIS__LEASE_TTL", "3s".to_owned()),
            ("ROUTING_DELIVERY_BUS__TYPE", "nats".to_owned()),
            ("ROUTING_DELIVERY_BUS__NATS__SUBJECT_PREFIX", self.name.clone()),
        ]
        .map(|(name, value)| (name.to_owned(), value));
        start_binary_with(self.dir.path(), &env).await
    }
}

fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

#[tokio::test]
async fn send_to_api_reaches_other_instance_live() {
    let cluster = Cluster::new();
    let api = cluster.start("[api]").await;
    let _first_ws = cluster.start("[websocket]").await;
    let second_ws = cluster.start("[websocket]").await;

    let mut bob = connect(&client(&second_ws, "bob")).await;
    client(&api, "alice").send(&envelope("bob", "bGl2ZQ==")).await.unwrap();
    assert_eq!(next_message(&mut bob).await, (1, "bGl2ZQ==".into()));
}

#[tokio::test]
async fn connections_on_two_instances_get_every_message() {
    let cluster = Cluster::new();
    let api = cluster.start("[api]").await;
    let first_ws = cluster.start("[websocket]").await;
    let second_ws = cluster.start("[websocket]").await;

    let mut on_first = connect(&client(&first_ws, "bob")).await;
    let mut on_second = connect(&client(&second_ws, "bob")).await;
    let alice = client(&api, "alice");
    for index in 1..=5 {
        alice.send(&envelope("bob", &format!("m{index}AA"))).await.unwrap();
    }
    for expected in 1..=5 {
        assert_eq!(next_message(&mut on_first).await.0, expected);
        assert_eq!(next_message(&mut on_second).await.0, expected);
    }
}

#[tokio::test]
async fn killed_instance_loses_nothing_after_reconnect() {
    let cluster = Cluster::new();
    let api = cluster.start("[api]").await;
    let mut first_ws = cluster.start("[websocket]").await;
    let second_ws = cluster.start("[websocket]").await;

    let mut bob = connect(&client(&first_ws, "bob")).await;
    let accepted = Arc::new(Mutex::new(0u64));
    let alice = client(&api, "alice");
    let counter = accepted.clone();
    let sender = tokio::spawn(async move {
        for index in 0..200 {
            let id = format!("k{index}");
            alice.send(&envelope_with_id("bob", "QUJD", &id)).await.unwrap();
            *counter.lock().await += 1;
        }
    });

    let mut received = BTreeSet::new();
    while received.len() < 50 {
        let (seq, _) = next_message(&mut bob).await;
        received.insert(seq);
    }
    first_ws.child.kill().await.unwrap();

    let mut again = connect(&client(&second_ws, "bob")).await;
    tokio::time::timeout(WAIT * 3, sender).await.unwrap().unwrap();
    let total = *accepted.lock().await;
    let mut last = 0;
    while received.len() < total as usize {
        match next_event(&mut again).await {
            Event::Frame(ServerFrame::Message { seq, .. }) => {
                assert!(seq > last, "seq order on one connection: {seq} after {last}");
                last = seq;
                received.insert(seq);
            }
            other => panic!("expected messages, got {other:?}"),
        }
    }
    assert_eq!(received, (1..=total).collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn offline_mail_is_fetched_through_any_api_instance() {
    let cluster = Cluster::new();
    let first_api = cluster.start("[api]").await;
    client(&first_api, "alice").send(&envelope("bob", "b2ZmbGluZQ==")).await.unwrap();

    let second_api = cluster.start("[api]").await;
    let page = client(&second_api, "bob").messages(0, 10).await.unwrap().expect("stored");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].envelope.encrypted_data.as_deref(), Some("b2ZmbGluZQ=="));
    tokio::time::sleep(Duration::from_millis(10)).await;
}
