//! The WebSocket server: backlog then live, acks, the window, closes.

use std::time::Duration;

use routing_client::Event;
use routing_protocol::{ClientFrame, ErrorCode, ServerFrame, close_code};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{
    TestApp, WAIT, assert_quiet, connect, envelope, envelope_with_id, next_event, next_message,
};

#[tokio::test]
async fn backlog_then_live_in_seq_order() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    for index in 1..=3 {
        alice
            .send(&envelope("bob", &format!("b{index}AA")))
            .await
            .unwrap();
    }
    let mut bob = connect(&app.client("bob")).await;
    for expected in 1..=3 {
        assert_eq!(
            next_message(&mut bob).await,
            (expected, format!("b{expected}AA"))
        );
    }
    for index in 4..=6 {
        alice
            .send(&envelope("bob", &format!("b{index}AA")))
            .await
            .unwrap();
    }
    for expected in 4..=6 {
        assert_eq!(next_message(&mut bob).await.0, expected);
    }
    assert_quiet(&mut bob, Duration::from_millis(200)).await;
    app.stop().await;
}

#[tokio::test]
async fn live_delivery_under_concurrent_sends_has_no_gap_or_duplicate() {
    let app = TestApp::spawn_with(|c| c.limits.send_burst = 1000).await;
    let mut bob = connect(&app.client("bob")).await;
    let mut senders = Vec::new();
    for sender in 0..4 {
        let client = app.client(&format!("s{sender}"));
        senders.push(tokio::spawn(async move {
            for index in 0..25 {
                client
                    .send(&envelope("bob", &format!("{sender}x{index:02}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for expected in 1..=100 {
        let (seq, _) = next_message(&mut bob).await;
        assert_eq!(seq, expected, "seq order without gaps or duplicates");
        if expected % 10 == 0 {
            bob.ack(seq).await.unwrap();
        }
    }
    for sender in senders {
        sender.await.unwrap();
    }
    assert_quiet(&mut bob, Duration::from_millis(200)).await;
    app.stop().await;
}

#[tokio::test]
async fn unacked_messages_are_redelivered_with_same_seq() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    for index in 1..=3 {
        alice
            .send(&envelope("bob", &format!("m{index}AA")))
            .await
            .unwrap();
    }
    let bob_client = app.client("bob");
    let mut bob = connect(&bob_client).await;
    for expected in 1..=3 {
        assert_eq!(next_message(&mut bob).await.0, expected);
    }
    bob.ack(2).await.unwrap();
    bob.send_frame(&ClientFrame::Ping {}).await.unwrap();
    assert_eq!(next_event(&mut bob).await, Event::Frame(ServerFrame::Pong));
    bob.close().await.unwrap();

    let mut again = connect(&bob_client).await;
    assert_eq!(next_message(&mut again).await, (3, "m3AA".into()));
    assert_quiet(&mut again, Duration::from_millis(200)).await;
    app.stop().await;
}

#[tokio::test]
async fn every_connection_of_a_user_receives_every_message() {
    let app = TestApp::spawn().await;
    let bob_client = app.client("bob");
    let mut first = connect(&bob_client).await;
    let mut second = connect(&bob_client).await;
    let alice = app.client("alice");
    for index in 1..=3 {
        alice
            .send(&envelope("bob", &format!("m{index}AA")))
            .await
            .unwrap();
    }
    for expected in 1..=3 {
        assert_eq!(next_message(&mut first).await.0, expected);
        assert_eq!(next_message(&mut second).await.0, expected);
    }
    app.stop().await;
}

#[tokio::test]
async fn window_waits_for_acks() {
    let app = TestApp::spawn_with(|c| c.websocket.max_unacked = 2).await;
    let alice = app.client("alice");
    for index in 1..=5 {
        alice
            .send(&envelope("bob", &format!("m{index}AA")))
            .await
            .unwrap();
    }
    let mut bob = connect(&app.client("bob")).await;
    assert_eq!(next_message(&mut bob).await.0, 1);
    assert_eq!(next_message(&mut bob).await.0, 2);
    assert_quiet(&mut bob, Duration::from_millis(300)).await;

    bob.ack(2).await.unwrap();
    assert_eq!(next_message(&mut bob).await.0, 3);
    assert_eq!(next_message(&mut bob).await.0, 4);
    assert_quiet(&mut bob, Duration::from_millis(300)).await;

    alice.send(&envelope("bob", "bTZBQQ==")).await.unwrap();
    bob.ack(4).await.unwrap();
    assert_eq!(next_message(&mut bob).await.0, 5);
    assert_eq!(
        next_message(&mut bob).await.0,
        6,
        "a live message waits in the mailbox while the window is full"
    );
    app.stop().await;
}

#[tokio::test]
async fn websocket_send_answers_sent_or_error() {
    let app = TestApp::spawn().await;
    let mut alice = connect(&app.client("alice")).await;
    alice
        .send_frame(&ClientFrame::Send {
            envelope: envelope_with_id("bob", "QQ==", "w-1"),
        })
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut alice).await,
        Event::Frame(ServerFrame::Sent {
            message_id: "w-1".into()
        })
    );

    alice
        .send_frame(&ClientFrame::Send {
            envelope: envelope_with_id("bob", "", "w-2"),
        })
        .await
        .unwrap();
    match next_event(&mut alice).await {
        Event::Frame(ServerFrame::Error {
            code, message_id, ..
        }) => {
            assert_eq!(code, ErrorCode::InvalidEnvelope);
            assert_eq!(message_id.as_deref(), Some("w-2"));
        }
        other => panic!("expected an error frame, got {other:?}"),
    }

    alice
        .send_text(r#"{"type":"send","envelope":{"recipientId":"bob","encryptedData":"QQ==","messageId":"w-3","typo":1}}"#)
        .await
        .unwrap();
    match next_event(&mut alice).await {
        Event::Frame(ServerFrame::Error {
            code, message_id, ..
        }) => {
            assert_eq!(
                code,
                ErrorCode::InvalidEnvelope,
                "a misshapen envelope is answered as POST /send"
            );
            assert_eq!(message_id.as_deref(), Some("w-3"));
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    alice
        .send_text(r#"{"type":"ping","extra":1}"#)
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut alice).await,
        Event::Frame(ServerFrame::Error {
            code: ErrorCode::InvalidRequest,
            ..
        })
    ));

    let mut bob = connect(&app.client("bob")).await;
    match next_event(&mut bob).await {
        Event::Frame(ServerFrame::Message { seq, envelope, .. }) => {
            assert_eq!(seq, 1);
            assert_eq!(envelope.sender_id.as_deref(), Some("urn:sm:user:alice"));
        }
        other => panic!("expected a message, got {other:?}"),
    }
    assert_quiet(&mut bob, Duration::from_millis(200)).await;
    app.stop().await;
}

#[tokio::test]
async fn three_bad_frames_in_a_row_close_with_1008() {
    let app = TestApp::spawn().await;
    let mut alice = connect(&app.client("alice")).await;
    alice.send_text("not json").await.unwrap();
    assert!(matches!(
        next_event(&mut alice).await,
        Event::Frame(ServerFrame::Error {
            code: ErrorCode::InvalidJson,
            ..
        })
    ));
    alice.send_text(r#"{"type":"ping"}"#).await.unwrap();
    assert_eq!(
        next_event(&mut alice).await,
        Event::Frame(ServerFrame::Pong),
        "a good frame resets the count"
    );
    for text in [r#"{"type":"nope"}"#, r#"{"type":"ack"}"#, "{"] {
        alice.send_text(text).await.unwrap();
        assert!(matches!(
            next_event(&mut alice).await,
            Event::Frame(ServerFrame::Error { .. })
        ));
    }
    match next_event(&mut alice).await {
        Event::Closed(Some((code, _))) => assert_eq!(code, close_code::POLICY),
        other => panic!("expected close 1008, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let app = TestApp::spawn_with(|c| c.limits.max_envelope_bytes = 1024).await;
    let mut alice = connect(&app.client("alice")).await;
    alice.send_text(&"x".repeat(8192)).await.unwrap();
    match next_event(&mut alice).await {
        Event::Closed(Some((code, _))) => assert_eq!(code, close_code::TOO_LARGE),
        other => panic!("expected close 1009, got {other:?}"),
    }
    app.stop().await;
}

async fn upgrade_status(
    app: &TestApp,
    path_and_query: &str,
    headers: &[(&'static str, String)],
) -> u16 {
    let mut request = format!("{}{path_and_query}", app.ws)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected failure: {other}"),
    }
}

#[tokio::test]
async fn upgrade_checks_token_and_origin_first() {
    let app =
        TestApp::spawn_with(|c| c.cors.allowed_origins = vec!["https://app.example".into()]).await;
    let token = app.token("bob");
    let bearer = format!("Bearer {token}");
    assert_eq!(upgrade_status(&app, "/connect", &[]).await, 401);
    assert_eq!(upgrade_status(&app, "/connect?token=bad", &[]).await, 401);
    assert_eq!(
        upgrade_status(&app, &format!("/connect?token={token}"), &[]).await,
        101
    );
    assert_eq!(
        upgrade_status(&app, "/connect", &[("authorization", bearer.clone())]).await,
        101
    );
    let evil = [
        ("authorization", bearer.clone()),
        ("origin", "https://evil.example".to_owned()),
    ];
    assert_eq!(upgrade_status(&app, "/connect", &evil).await, 403);
    let good = [
        ("authorization", bearer),
        ("origin", "https://app.example".to_owned()),
    ];
    assert_eq!(upgrade_status(&app, "/connect", &good).await, 101);
    app.stop().await;
}

#[tokio::test]
async fn token_expiry_closes_with_4001() {
    let app = TestApp::spawn_with(|c| c.auth.leeway_seconds = 0).await;
    let token =
        routing_service::auth::mint_hs256(crate::support::SECRET, "bob", Duration::from_secs(2))
            .unwrap();
    let client = routing_client::Client::new(&app.api, &app.ws, &token);
    let mut bob = connect(&client).await;
    match next_event(&mut bob).await {
        Event::Closed(Some((code, _))) => assert_eq!(code, close_code::TOKEN_EXPIRED),
        other => panic!("expected close 4001, got {other:?}"),
    }
    app.stop().await;
}

/// Reads the server's count of connections it closed with `code`.
async fn closed_with(app: &TestApp, code: u16) -> u64 {
    let text = reqwest::get(format!("{}/metrics", app.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("routing_connections_closed_total{{code=\"{code}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4008() {
    let app = TestApp::spawn_with(|c| {
        c.websocket.write_timeout = Duration::from_millis(300);
        c.limits.send_burst = 10_000;
        c.limits.send_rate_per_second = 10_000;
    })
    .await;
    let before = closed_with(&app, close_code::SLOW_CONSUMER).await;
    let mut bob = connect(&app.client("bob")).await;
    let alice = app.client("alice");
    let data = "A".repeat(60_000);

    // bob reads nothing while the sends fill the kernel's loopback buffers,
    // until the server gives up on him. Reading starts only then, so the
    // close frame queued behind the messages can be reached.
    let mut closed = false;
    for index in 0..2_000 {
        alice.send(&envelope("bob", &data)).await.unwrap();
        if index % 10 == 9 && closed_with(&app, close_code::SLOW_CONSUMER).await > before {
            closed = true;
            break;
        }
    }
    assert!(closed, "the server never closed the slow consumer");

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 4008 close within the wait"
        );
        match next_event(&mut bob).await {
            Event::Frame(ServerFrame::Message { .. }) => continue,
            Event::Closed(Some((code, _))) => {
                assert_eq!(code, close_code::SLOW_CONSUMER);
                break;
            }
            other => panic!("expected messages then close 4008, got {other:?}"),
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_with_1001() {
    let app = TestApp::spawn().await;
    let mut bob = connect(&app.client("bob")).await;
    let stopping = tokio::spawn(app.stop());
    match next_event(&mut bob).await {
        Event::Closed(Some((code, _))) => assert_eq!(code, close_code::GOING_AWAY),
        other => panic!("expected close 1001, got {other:?}"),
    }
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn ack_ahead_of_delivery_loses_nothing() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    alice.send(&envelope("bob", "bTFBQQ==")).await.unwrap();
    let mut bob = connect(&app.client("bob")).await;
    assert_eq!(next_message(&mut bob).await.0, 1);

    bob.ack(1_000).await.unwrap();
    bob.send_frame(&ClientFrame::Ping {}).await.unwrap();
    assert_eq!(next_event(&mut bob).await, Event::Frame(ServerFrame::Pong));
    alice.send(&envelope("bob", "bTJBQQ==")).await.unwrap();
    assert_eq!(next_message(&mut bob).await, (2, "bTJBQQ==".into()));
    app.stop().await;
}

#[tokio::test]
async fn ack_by_ids_opens_the_window() {
    let app = TestApp::spawn_with(|c| c.websocket.max_unacked = 2).await;
    let alice = app.client("alice");
    for index in 1..=4 {
        alice
            .send(&envelope_with_id("bob", "QUFB", &format!("id-{index}")))
            .await
            .unwrap();
    }
    let bob_client = app.client("bob");
    let mut bob = connect(&bob_client).await;
    assert_eq!(next_message(&mut bob).await.0, 1);
    assert_eq!(next_message(&mut bob).await.0, 2);
    assert_quiet(&mut bob, Duration::from_millis(300)).await;

    let ids = vec!["id-1".to_owned(), "id-2".to_owned()];
    bob_client
        .ack(&routing_protocol::AckRequest {
            up_to_seq: None,
            message_ids: Some(ids),
        })
        .await
        .unwrap();
    assert_eq!(next_message(&mut bob).await.0, 3);
    assert_eq!(next_message(&mut bob).await.0, 4);
    app.stop().await;
}

/// Sends written back to back, without waiting for `sent`, get their replies
/// in the order they were written and stored in that order per recipient.
#[tokio::test]
async fn websocket_sends_without_waiting_keep_order() {
    const SENDS: usize = 150;
    let app = TestApp::spawn().await;
    let mut alice = connect(&app.client("alice")).await;
    for index in 0..SENDS {
        // Every third send goes to carol, so sends to bob and to carol wait
        // for the store at the same time.
        let to = if index % 3 == 0 { "carol" } else { "bob" };
        alice
            .send_frame(&ClientFrame::Send {
                envelope: envelope_with_id(to, &format!("p{index:03}"), &format!("w-{index}")),
            })
            .await
            .unwrap();
    }
    for index in 0..SENDS {
        assert_eq!(
            next_event(&mut alice).await,
            Event::Frame(ServerFrame::Sent {
                message_id: format!("w-{index}")
            }),
            "answer {index} is out of order"
        );
    }

    for (user, sends) in [("bob", SENDS - SENDS / 3), ("carol", SENDS / 3)] {
        let mut connection = connect(&app.client(user)).await;
        let mut payloads = Vec::new();
        for expected_seq in 1..=sends as u64 {
            let (seq, payload) = next_message(&mut connection).await;
            assert_eq!(seq, expected_seq, "{user}'s seqs have a gap");
            payloads.push(payload);
        }
        let mut sorted = payloads.clone();
        sorted.sort();
        assert_eq!(payloads, sorted, "{user}'s messages are out of send order");
    }
    app.stop().await;
}
