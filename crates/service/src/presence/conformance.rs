//! The conformance suite every presence backend must pass.

use std::sync::Arc;

use routing_protocol::Address;

use super::{InstanceId, Presence};

fn user(id: &str) -> Address {
    Address::parse(id).expect("valid test id")
}

fn instance(id: &str) -> InstanceId {
    Arc::from(id)
}

/// Runs every case against presence backends made by `make`, one fresh
/// backend per case. Ids are unique per case so shared backends do not mix.
pub(crate) async fn run_all<P: Presence>(make: impl Fn() -> P) {
    registered_user_is_found(&make()).await;
    registrations_are_counted(&make()).await;
    instances_are_listed_once(&make()).await;
    unregistering_an_unknown_pair_is_harmless(&make()).await;
    make().check().await.expect("check answers");
}

async fn registered_user_is_found(presence: &impl Presence) {
    let (bob, first) = (user("found-bob"), instance("found-1"));
    assert!(presence.lookup(&bob).await.unwrap().is_empty());
    presence.register(&bob, &first).await.unwrap();
    assert_eq!(presence.lookup(&bob).await.unwrap(), vec![first.clone()]);
    assert!(
        presence
            .lookup(&user("found-alice"))
            .await
            .unwrap()
            .is_empty()
    );
    presence.unregister(&bob, &first).await.unwrap();
    assert!(presence.lookup(&bob).await.unwrap().is_empty());
}

async fn registrations_are_counted(presence: &impl Presence) {
    let (bob, first) = (user("count-bob"), instance("count-1"));
    presence.register(&bob, &first).await.unwrap();
    presence.register(&bob, &first).await.unwrap();
    presence.unregister(&bob, &first).await.unwrap();
    assert_eq!(
        presence.lookup(&bob).await.unwrap(),
        vec![first.clone()],
        "one connection is still open"
    );
    presence.unregister(&bob, &first).await.unwrap();
    assert!(presence.lookup(&bob).await.unwrap().is_empty());
}

async fn instances_are_listed_once(presence: &impl Presence) {
    let bob = user("once-bob");
    let (first, second) = (instance("once-1"), instance("once-2"));
    presence.register(&bob, &first).await.unwrap();
    presence.register(&bob, &first).await.unwrap();
    presence.register(&bob, &second).await.unwrap();
    let mut found = presence.lookup(&bob).await.unwrap();
    found.sort();
    assert_eq!(found, vec![first, second]);
}

async fn unregistering_an_unknown_pair_is_harmless(presence: &impl Presence) {
    let bob = user("unknown-bob");
    presence
        .unregister(&bob, &instance("unknown-1"))
        .await
        .unwrap();
    presence
        .register(&bob, &instance("unknown-2"))
        .await
        .unwrap();
    presence
        .unregister(&bob, &instance("unknown-1"))
        .await
        .unwrap();
    assert_eq!(
        presence.lookup(&bob).await.unwrap(),
        vec![instance("unknown-2")]
    );
}
