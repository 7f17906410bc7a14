//! Regressions: each test checks a behaviour the contract requires that an
//! earlier version broke.

use std::time::{Duration, Instant};

use routing_client::Event;
use routing_protocol::{AckRequest, ClientFrame, ServerFrame};

use crate::cluster::Cluster;
use crate::support::{SECRET, TestApp, WAIT, connect, envelope_with_id, next_event, next_message};

/// A token whose `exp` is far in the future (the largest u64) is accepted,
/// and its connection must not fail when the server computes the expiry.
#[tokio::test]
async fn far_future_exp_keeps_connection() {
    let app = TestApp::spawn().await;
    let token = routing_service::auth::mint_hs256(SECRET, "bob", Duration::MAX).unwrap();
    let client = routing_client::Client::new(&app.api, &app.ws, &token);
    let mut bob = connect(&client).await;
    bob.send_frame(&ClientFrame::Ping {}).await.ok();
    assert_eq!(
        next_event(&mut bob).await,
        Event::Frame(ServerFrame::Pong),
        "the connection must survive a token with a far-future exp"
    );
    app.stop().await;
}

/// Cluster mode: an HTTP ack whose presence lookup is served from the API
/// instance's lookup cache (filled before the recipient connected) never
/// reaches the WebSocket instance, so the resync must reopen the window.
#[tokio::test]
async fn http_ack_within_cache_ttl_opens_window() {
    let cluster = Cluster::new();
    let api = cluster.start("[api]").await;
    let ws = cluster
        .start_with(
            "[websocket]",
            &[
                ("ROUTING_WEBSOCKET__MAX_UNACKED", "2"),
                ("ROUTING_WEBSOCKET__RESYNC_INTERVAL", "2s"),
            ],
        )
        .await;

    let alice = crate::binary::client(&api, "alice");
    let started = Instant::now();
    for index in 1..=3 {
        alice
            .send(&envelope_with_id("bob", "QUFB", &format!("w{index}")))
            .await
            .unwrap();
    }
    let bob_api = crate::binary::client(&api, "bob");
    let mut bob = connect(&crate::binary::client(&ws, "bob")).await;
    assert_eq!(next_message(&mut bob).await.0, 1);
    assert_eq!(next_message(&mut bob).await.0, 2);
    bob_api
        .ack(&AckRequest {
            up_to_seq: None,
            message_ids: Some(vec!["w1".into(), "w2".into()]),
        })
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "precondition: the ack ran while the API's cached lookup was fresh"
    );

    let third = tokio::time::timeout(WAIT, bob.next_event()).await;
    let delivered = matches!(
        third,
        Ok(Ok(Event::Frame(ServerFrame::Message { seq: 3, .. })))
    );
    cluster.remove().await;
    assert!(
        delivered,
        "seq 3 is stored and the client acked everything it got, yet nothing arrived: {third:?}"
    );
}

/// Sockets that connect and never send a byte must not hold the API's
/// connection places for ever, or `limits.max_http_connections` of them
/// would lock every client out.
#[tokio::test]
async fn idle_sockets_keep_api_reachable() {
    let app = TestApp::spawn_with(|c| c.limits.max_http_connections = 4).await;
    let address = app.api.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    let wait = routing_service::listener::HEADER_READ_TIMEOUT + Duration::from_secs(2);
    tokio::time::sleep(wait).await;
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!("{}/healthz", app.api))
        .send()
        .await;
    assert!(
        probe.is_ok(),
        "four silent sockets locked out /healthz: {probe:?}"
    );
    drop(idle);
    app.stop().await;
}
