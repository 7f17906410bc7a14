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

/// Cluster mode: a message stored without a live publish (its API instance
/// routed it with a cached "offline" lookup) leaves a gap before the next
/// live message. The connection keeps the later message only briefly, then
/// reads both from the mailbox, in order, before the first resync would.
#[tokio::test]
async fn unpublished_gap_fills_before_resync() {
    let cluster = Cluster::new();
    let api_cached = cluster.start("[api]").await;
    let api_fresh = cluster.start("[api]").await;
    let ws = cluster.start("[websocket]").await;

    let alice_cached = crate::binary::client(&api_cached, "alice");
    let alice_fresh = crate::binary::client(&api_fresh, "alice");
    let started = Instant::now();
    // The first send fills api_cached's lookup cache with "bob is offline".
    alice_cached
        .send(&envelope_with_id("bob", "QUFB", "g1"))
        .await
        .unwrap();
    let mut bob = connect(&crate::binary::client(&ws, "bob")).await;
    let connected = Instant::now();
    assert_eq!(next_message(&mut bob).await.0, 1);
    alice_cached
        .send(&envelope_with_id("bob", "QUFB", "g2"))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "precondition: g2 was routed with the cached lookup, so it was not published"
    );
    alice_fresh
        .send(&envelope_with_id("bob", "QUFB", "g3"))
        .await
        .unwrap();

    let second = next_message(&mut bob).await.0;
    let third = next_message(&mut bob).await.0;
    let waited = connected.elapsed();
    cluster.remove().await;
    assert_eq!((second, third), (2, 3), "the gap is filled in seq order");
    // The first resync runs 1.25 s after the connection opened.
    assert!(
        waited < Duration::from_millis(1_200),
        "seq 3 waited for the resync ({waited:?}) instead of the short gap wait"
    );
}

/// Pipelined sends to many recipients that are all rate limited: the
/// twentieth in a row closes with 4029, and the replies to the sends still
/// pending at that moment must not stop the close frame.
#[tokio::test]
async fn rate_limited_pipeline_closes_4029() {
    let app = TestApp::spawn_with(|c| {
        c.limits.send_burst = 1;
        c.limits.send_rate_per_second = 1;
    })
    .await;
    let mut alice = connect(&app.client("alice")).await;
    for index in 0..40 {
        let frame = ClientFrame::Send {
            envelope: envelope_with_id(&format!("r{index}"), "dataAA", &format!("m{index}")),
        };
        alice.send_frame(&frame).await.unwrap();
    }
    let mut limited = 0;
    loop {
        match tokio::time::timeout(WAIT, alice.next_event())
            .await
            .expect("an event within the wait")
        {
            Ok(Event::Frame(ServerFrame::Error { code, .. })) => {
                assert_eq!(code, routing_protocol::ErrorCode::RateLimited);
                limited += 1;
            }
            Ok(Event::Frame(_)) => {}
            Ok(Event::Closed(Some((code, _)))) => {
                assert_eq!(code, routing_protocol::close_code::RATE_LIMITED);
                break;
            }
            other => panic!(
                "expected a 4029 close frame after {limited} rate-limited replies, got {other:?}"
            ),
        }
    }
    assert!(
        limited >= 20,
        "{limited} rate-limited replies before the close"
    );
    app.stop().await;
}
