//! The HTTP API: every rule of POST /send, GET /messages, POST /messages/ack.

use routing_protocol::{AckRequest, ErrorCode};
use routing_service::auth::mint_hs256;
use serde_json::{Value, json};

use crate::support::{TestApp, assert_error, envelope, envelope_with_id};

async fn post_send(app: &TestApp, token: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/send", app.api))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn stored_count(app: &TestApp, user: &str) -> usize {
    match app.client(user).messages(0, 1000).await.unwrap() {
        None => 0,
        Some(page) => page.messages.len(),
    }
}

#[tokio::test]
async fn send_stores_and_forces_sender() {
    let app = TestApp::spawn().await;
    let mut spoofed = envelope("bob", "aGVsbG8");
    spoofed.sender_id = Some("urn:sm:user:mallory".into());
    spoofed.signature = Some("-_8".into());

    let answer = app.client("alice").send(&spoofed).await.unwrap();
    assert_eq!(answer.recipient_id, "urn:sm:user:bob");
    assert!(!answer.message_id.is_empty(), "server assigns a messageId");

    let page = app
        .client("bob")
        .messages(0, 100)
        .await
        .unwrap()
        .expect("one message");
    assert_eq!(page.messages.len(), 1);
    let item = &page.messages[0];
    assert_eq!(item.seq, 1);
    assert_eq!(
        item.envelope.sender_id.as_deref(),
        Some("urn:sm:user:alice")
    );
    assert_eq!(
        item.envelope.recipient_id.as_deref(),
        Some("urn:sm:user:bob")
    );
    assert_eq!(
        item.envelope.message_id.as_deref(),
        Some(answer.message_id.as_str())
    );
    assert_eq!(
        item.envelope.encrypted_data.as_deref(),
        Some("aGVsbG8="),
        "padded on output"
    );
    assert_eq!(
        item.envelope.signature.as_deref(),
        Some("+/8="),
        "standard alphabet on output"
    );
    assert_eq!(item.received_at.len(), "2026-12-04T19:14:13.123Z".len());
    assert!(item.received_at.ends_with('Z'));
    assert_eq!(page.next_after, None);
    app.stop().await;
}

#[tokio::test]
async fn bare_id_and_urn_recipients_share_a_mailbox() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    alice.send(&envelope("bob", "MQ==")).await.unwrap();
    alice
        .send(&envelope("urn:sm:user:bob", "Mg=="))
        .await
        .unwrap();
    assert_eq!(stored_count(&app, "bob").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn send_rejects_bad_envelopes_and_stores_nothing() {
    let app = TestApp::spawn_with(|c| c.limits.max_envelope_bytes = 1024).await;
    let token = app.token("alice");
    let cases: Vec<(&str, String, u16, ErrorCode)> = vec![
        ("not json", "{".into(), 400, ErrorCode::InvalidJson),
        (
            "trailing garbage",
            r#"{"recipientId":"bob","encryptedData":"aGk="} x"#.into(),
            400,
            ErrorCode::InvalidJson,
        ),
        (
            "unknown field",
            r#"{"recipientId":"bob","encryptedData":"aGk=","extra":1}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "duplicate key",
            r#"{"recipientId":"bob","recipientId":"eve","encryptedData":"aGk="}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "missing recipient",
            r#"{"encryptedData":"aGk="}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "invalid recipient",
            r#"{"recipientId":"b ob","encryptedData":"aGk="}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "foreign urn",
            r#"{"recipientId":"urn:x:bob","encryptedData":"aGk="}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "missing data",
            r#"{"recipientId":"bob"}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "empty data",
            r#"{"recipientId":"bob","encryptedData":""}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "bad base64",
            r#"{"recipientId":"bob","encryptedData":"a$b"}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "bad key base64",
            r#"{"recipientId":"bob","encryptedData":"aGk=","encryptedSymmetricKey":"%%"}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "bad messageId",
            r#"{"recipientId":"bob","encryptedData":"aGk=","messageId":"a/b"}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "wrong type",
            r#"{"recipientId":7,"encryptedData":"aGk="}"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        ("array body", "[]".into(), 400, ErrorCode::InvalidEnvelope),
        (
            "positional array",
            r#"[null,"bob","a-1",null,"aGk=",null]"#.into(),
            400,
            ErrorCode::InvalidEnvelope,
        ),
        (
            "too large",
            format!(
                r#"{{"recipientId":"bob","encryptedData":"{}"}}"#,
                "A".repeat(2000)
            ),
            413,
            ErrorCode::TooLarge,
        ),
    ];
    for (name, body, status, code) in cases {
        let response = post_send(&app, &token, &body).await;
        assert_eq!(response.status().as_u16(), status, "case {name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"], json!(code.as_str()), "case {name}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "case {name}"
        );
    }
    assert_eq!(stored_count(&app, "bob").await, 0, "nothing stored");
    app.stop().await;
}

#[tokio::test]
async fn send_requires_json_content_type() {
    let app = TestApp::spawn().await;
    let response = reqwest::Client::new()
        .post(format!("{}/send", app.api))
        .bearer_auth(app.token("alice"))
        .header("content-type", "text/plain")
        .body(r#"{"recipientId":"bob","encryptedData":"aGk="}"#)
        .send()
        .await
        .unwrap();
    assert_error(response, 415, ErrorCode::UnsupportedMediaType).await;
    assert_eq!(stored_count(&app, "bob").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn bad_tokens_get_401_with_challenge() {
    let app = TestApp::spawn_with(|c| c.auth.leeway_seconds = 0).await;
    let body = r#"{"recipientId":"bob","encryptedData":"aGk="}"#;
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = json!({"sub": "alice", "exp": 1_000_000_000u64});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(crate::support::SECRET.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let forged = mint_hs256(
        "another-secret-that-is-32-bytes-long!",
        "alice",
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let bad_sub = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = json!({"sub": "al ice", "exp": 4_000_000_000u64});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(crate::support::SECRET.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    for (name, header) in [
        ("missing", None),
        ("not bearer", Some("Basic abc".to_owned())),
        ("garbage", Some("Bearer not.a.jwt".to_owned())),
        ("expired", Some(format!("Bearer {expired}"))),
        ("wrong secret", Some(format!("Bearer {forged}"))),
        ("invalid sub", Some(format!("Bearer {bad_sub}"))),
    ] {
        let mut request = reqwest::Client::new()
            .post(format!("{}/send", app.api))
            .header("content-type", "application/json")
            .body(body);
        if let Some(header) = header {
            request = request.header("authorization", header);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "case {name}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer",
            "case {name}"
        );
        assert_error(response, 401, ErrorCode::Unauthorized).await;
    }
    assert_eq!(stored_count(&app, "bob").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn dedupe_answers_retries_and_rejects_conflicts() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    let first = alice
        .send(&envelope_with_id("bob", "MQ==", "m-1"))
        .await
        .unwrap();
    let retry = alice
        .send(&envelope_with_id("bob", "MQ", "m-1"))
        .await
        .unwrap();
    assert_eq!(first, retry, "a retry is answered as the first was");

    let conflict = reqwest::Client::new()
        .post(format!("{}/send", app.api))
        .bearer_auth(app.token("alice"))
        .json(&envelope_with_id("bob", "Mg==", "m-1"))
        .send()
        .await
        .unwrap();
    assert_error(conflict, 409, ErrorCode::Conflict).await;

    alice
        .send(&envelope_with_id("carol", "MQ==", "m-1"))
        .await
        .unwrap();
    app.client("dave")
        .send(&envelope_with_id("bob", "Mw==", "m-1"))
        .await
        .unwrap();

    let page = app.client("bob").messages(0, 100).await.unwrap().unwrap();
    let data: Vec<_> = page
        .messages
        .iter()
        .map(|m| m.envelope.encrypted_data.clone().unwrap())
        .collect();
    assert_eq!(
        data,
        ["MQ==", "Mw=="],
        "first message stands; another sender's same id is new"
    );
    assert_eq!(
        stored_count(&app, "carol").await,
        1,
        "same id to another recipient is stored"
    );
    app.stop().await;
}

#[tokio::test]
async fn messages_page_in_seq_order() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    for index in 1..=5 {
        alice
            .send(&envelope("bob", &format!("{index}AAA")))
            .await
            .unwrap();
    }
    let bob = app.client("bob");
    let first = bob.messages(0, 2).await.unwrap().unwrap();
    assert_eq!(
        first.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(first.next_after, Some(2));
    let second = bob.messages(2, 2).await.unwrap().unwrap();
    assert_eq!(
        second.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [3, 4]
    );
    let last = bob.messages(4, 2).await.unwrap().unwrap();
    assert_eq!(last.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [5]);
    assert_eq!(last.next_after, None);
    assert!(
        bob.messages(5, 2).await.unwrap().is_none(),
        "204 after the end"
    );
    let again = bob.messages(0, 100).await.unwrap().unwrap();
    assert_eq!(again.messages.len(), 5, "reading deletes nothing");
    app.stop().await;
}

#[tokio::test]
async fn messages_rejects_bad_query() {
    let app = TestApp::spawn().await;
    for query in ["limit=0", "limit=1001", "after=-3", "after=abc", "other=1"] {
        let response = reqwest::Client::new()
            .get(format!("{}/messages?{query}", app.api))
            .bearer_auth(app.token("bob"))
            .send()
            .await
            .unwrap();
        assert_error(response, 400, ErrorCode::InvalidRequest).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn ack_deletes_only_callers_messages() {
    let app = TestApp::spawn().await;
    let alice = app.client("alice");
    for index in 1..=4 {
        alice
            .send(&envelope_with_id("bob", "QQ==", &format!("b{index}")))
            .await
            .unwrap();
        alice
            .send(&envelope_with_id("carol", "QQ==", &format!("c{index}")))
            .await
            .unwrap();
    }
    let bob = app.client("bob");
    let carol = app.client("carol");

    carol
        .ack(&AckRequest {
            up_to_seq: Some(100),
            message_ids: None,
        })
        .await
        .unwrap();
    carol
        .ack(&AckRequest {
            up_to_seq: None,
            message_ids: Some(vec!["b3".into()]),
        })
        .await
        .unwrap();
    assert_eq!(
        stored_count(&app, "bob").await,
        4,
        "another user's ack touches nothing of bob"
    );
    assert_eq!(stored_count(&app, "carol").await, 0);

    bob.ack(&AckRequest {
        up_to_seq: Some(2),
        message_ids: None,
    })
    .await
    .unwrap();
    bob.ack(&AckRequest {
        up_to_seq: None,
        message_ids: Some(vec!["b4".into()]),
    })
    .await
    .unwrap();
    let page = bob.messages(0, 100).await.unwrap().unwrap();
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [3]);

    alice.send(&envelope("carol", "QQ==")).await.unwrap();
    let page = carol
        .messages(0, 100)
        .await
        .unwrap()
        .expect("an ack above the last seq does not swallow new mail");
    assert_eq!(page.messages[0].seq, 5);
    app.stop().await;
}

#[tokio::test]
async fn ack_rejects_bad_bodies() {
    let app = TestApp::spawn().await;
    let ids = (0..1001)
        .map(|i| format!("\"m{i}\""))
        .collect::<Vec<_>>()
        .join(",");
    let many = format!(r#"{{"messageIds":[{ids}]}}"#);
    let cases: Vec<(&str, String, ErrorCode)> = vec![
        ("not json", "{".into(), ErrorCode::InvalidJson),
        ("empty object", "{}".into(), ErrorCode::InvalidRequest),
        (
            "both fields",
            r#"{"upToSeq":1,"messageIds":["a"]}"#.into(),
            ErrorCode::InvalidRequest,
        ),
        (
            "unknown field",
            r#"{"upToSeq":1,"x":2}"#.into(),
            ErrorCode::InvalidRequest,
        ),
        (
            "negative seq",
            r#"{"upToSeq":-1}"#.into(),
            ErrorCode::InvalidRequest,
        ),
        (
            "empty ids",
            r#"{"messageIds":[]}"#.into(),
            ErrorCode::InvalidRequest,
        ),
        (
            "bad id",
            r#"{"messageIds":["a b"]}"#.into(),
            ErrorCode::InvalidRequest,
        ),
        ("too many ids", many, ErrorCode::InvalidRequest),
        ("positional array", "[7]".into(), ErrorCode::InvalidRequest),
    ];
    for (name, body, code) in cases {
        let response = reqwest::Client::new()
            .post(format!("{}/messages/ack", app.api))
            .bearer_auth(app.token("bob"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "case {name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"], json!(code.as_str()), "case {name}");
    }
    app.stop().await;
}

#[tokio::test]
async fn full_mailbox_answers_429() {
    let app = TestApp::spawn_with(|c| c.limits.max_stored_per_user = 3).await;
    let alice = app.client("alice");
    for index in 0..3 {
        alice
            .send(&envelope("bob", &format!("{index}AAA")))
            .await
            .unwrap();
    }
    let response = reqwest::Client::new()
        .post(format!("{}/send", app.api))
        .bearer_auth(app.token("alice"))
        .json(&envelope("bob", "QUFB"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(response, 429, ErrorCode::MailboxFull).await;
    assert_eq!(stored_count(&app, "bob").await, 3, "nothing more stored");

    app.client("bob")
        .ack(&AckRequest {
            up_to_seq: Some(1),
            message_ids: None,
        })
        .await
        .unwrap();
    alice
        .send(&envelope("bob", "QUFB"))
        .await
        .expect("room after an ack");
    app.stop().await;
}

#[tokio::test]
async fn send_rate_is_limited_per_user() {
    let app = TestApp::spawn_with(|c| {
        c.limits.send_rate_per_second = 1;
        c.limits.send_burst = 2;
    })
    .await;
    let alice = app.client("alice");
    alice.send(&envelope("bob", "QQ==")).await.unwrap();
    alice.send(&envelope("bob", "QQ==")).await.unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/send", app.api))
        .bearer_auth(app.token("alice"))
        .json(&envelope("bob", "QQ=="))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    assert_error(response, 429, ErrorCode::RateLimited).await;
    app.client("carol")
        .send(&envelope("bob", "QQ=="))
        .await
        .expect("other users keep their own rate");
    assert_eq!(stored_count(&app, "bob").await, 3);
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let app =
        TestApp::spawn_with(|c| c.cors.allowed_origins = vec!["https://app.example".into()]).await;
    let http = reqwest::Client::new();
    let preflight = http
        .request(reqwest::Method::OPTIONS, format!("{}/send", app.api))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );

    for origin in ["https://evil.example", "https://app.example.evil", "null"] {
        let response = http
            .post(format!("{}/send", app.api))
            .header("origin", origin)
            .bearer_auth(app.token("alice"))
            .json(&envelope("bob", "QQ=="))
            .send()
            .await
            .unwrap();
        assert_error(response, 403, ErrorCode::Forbidden).await;
    }
    assert_eq!(stored_count(&app, "bob").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn cors_headers_on_allowed_simple_request() {
    let app =
        TestApp::spawn_with(|c| c.cors.allowed_origins = vec!["https://app.example".into()]).await;
    let response = reqwest::Client::new()
        .post(format!("{}/send", app.api))
        .header("origin", "https://app.example")
        .bearer_auth(app.token("alice"))
        .json(&envelope("bob", "QQ=="))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        response.headers()["access-control-expose-headers"],
        "retry-after"
    );
    let vary = response
        .headers()
        .get_all("vary")
        .iter()
        .map(|value| value.to_str().unwrap().to_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    assert!(vary.contains("origin"), "{vary}");
    app.stop().await;
}

#[tokio::test]
async fn cors_preflight_from_unlisted_origin_is_forbidden() {
    let app =
        TestApp::spawn_with(|c| c.cors.allowed_origins = vec!["https://app.example".into()]).await;
    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{}/send", app.api))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_error(preflight, 403, ErrorCode::Forbidden).await;
    app.stop().await;
}

#[tokio::test]
async fn slow_request_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app =
        TestApp::spawn_with(|c| c.limits.request_timeout = std::time::Duration::from_millis(300))
            .await;
    let address = app.api.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let token = app.token("alice");
    // The body is announced as 100 bytes, but only 10 are sent.
    let request = format!(
        "POST /send HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"recipie"
    );
    stream.write_all(request.as_bytes()).await.unwrap();

    let mut response = Vec::new();
    let read = tokio::time::timeout(crate::support::WAIT, stream.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "no response within the wait");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    app.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    let missing = http.get(format!("{}/nope", app.api)).send().await.unwrap();
    assert_error(missing, 404, ErrorCode::NotFound).await;
    let wrong_method = http.get(format!("{}/send", app.api)).send().await.unwrap();
    assert_error(wrong_method, 405, ErrorCode::MethodNotAllowed).await;
    app.stop().await;
}

#[tokio::test]
async fn probes_and_metrics_answer() {
    let app = TestApp::spawn().await;
    app.client("alice")
        .send(&envelope("bob", "QQ=="))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    for base in [&app.api, &app.ws.replace("ws://", "http://")] {
        let health = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200);
        assert_eq!(health.text().await.unwrap(), "ok");
        let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(ready.status().as_u16(), 200);
        let body: Value = ready.json().await.unwrap();
        assert_eq!(body["status"], "ready");
        assert_eq!(body["components"]["mailbox"], "ok");
    }
    let unsupported = http
        .post(format!("{}/send", app.api))
        .bearer_auth(app.token("alice"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(unsupported.status().as_u16(), 415);
    let metrics = http
        .get(format!("{}/metrics", app.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "routing_messages_accepted_total",
        "routing_messages_stored_total",
        "routing_messages_acknowledged_total",
        "routing_messages_expired_total",
        "routing_backend_call_duration_seconds",
        "routing_messages_rejected_total{reason=\"unsupported_media_type\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.stop().await;
}

#[tokio::test]
async fn large_envelopes_shorten_the_page() {
    let app = TestApp::spawn_with(|c| c.limits.max_envelope_bytes = 1024 * 1024).await;
    let alice = app.client("alice");
    for index in 0..6 {
        alice
            .send(&envelope("bob", &format!("{index}AAA")))
            .await
            .unwrap();
    }
    let page = app.client("bob").messages(0, 100).await.unwrap().unwrap();
    assert_eq!(page.messages.len(), 4, "4 MiB of 1 MiB envelopes");
    assert_eq!(
        page.next_after,
        Some(4),
        "a shortened page says where to go on"
    );
    app.stop().await;
}
