//! The conformance suite every delivery bus backend must pass.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use routing_protocol::Address;

use super::{BusEvent, DeliveryBus};
use crate::presence::InstanceId;

const WAIT: Duration = Duration::from_secs(5);

fn delivery(user: &str, seq: u64) -> BusEvent {
    BusEvent::Delivery {
        recipient: Address::parse(user).expect("valid test id"),
        seq,
        received_at_ms: 0,
        frame: Bytes::from(format!("{{\"seq\":{seq}}}")),
    }
}

fn seq_of(event: &BusEvent) -> Option<u64> {
    match event {
        BusEvent::Delivery { seq, .. } => Some(*seq),
        BusEvent::Acked { .. } => None,
    }
}

/// Runs every case against bus backends made by `make`, one fresh backend
/// per case. Instance ids are unique per case so shared backends do not mix.
pub(crate) async fn run_all<B: DeliveryBus>(make: impl Fn() -> B) {
    events_arrive_in_publish_order(&make()).await;
    events_reach_only_their_instance(&make()).await;
    publish_without_subscriber_is_dropped(&make()).await;
    make().check().await.expect("check answers");
}

async fn events_arrive_in_publish_order(bus: &impl DeliveryBus) {
    let instance: InstanceId = Arc::from("order-1");
    let mut events = bus.subscribe(&instance).await.unwrap();
    for seq in 1..=100 {
        bus.publish(&instance, delivery("order-bob", seq))
            .await
            .unwrap();
    }
    let acked = BusEvent::Acked {
        recipient: Address::parse("order-bob").unwrap(),
        up_to: 7,
    };
    bus.publish(&instance, acked).await.unwrap();
    for expected in 1..=100 {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seq_of(&event), Some(expected));
    }
    let last = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(last, BusEvent::Acked { up_to: 7, .. }), "{last:?}");
}

async fn events_reach_only_their_instance(bus: &impl DeliveryBus) {
    let (first, second): (InstanceId, InstanceId) = (Arc::from("only-1"), Arc::from("only-2"));
    let mut first_events = bus.subscribe(&first).await.unwrap();
    let mut second_events = bus.subscribe(&second).await.unwrap();
    bus.publish(&second, delivery("only-bob", 1)).await.unwrap();
    let event = tokio::time::timeout(WAIT, second_events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seq_of(&event), Some(1));
    let stray = tokio::time::timeout(Duration::from_millis(200), first_events.recv()).await;
    assert!(stray.is_err(), "the other instance got {stray:?}");
}

async fn publish_without_subscriber_is_dropped(bus: &impl DeliveryBus) {
    let nobody: InstanceId = Arc::from("nobody-1");
    bus.publish(&nobody, delivery("nobody-bob", 1))
        .await
        .expect("no error without subscriber");
}
