//! Backend outages in cluster mode: each backend is reached through a TCP
//! proxy that the test cuts and restores, so the real PostgreSQL, Redis and
//! NATS servers stay up while the service sees them go away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use routing_protocol::ErrorCode;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::binary::{Running, client, start_binary_with};
use crate::support::{assert_error, connect, envelope, next_message};

/// Forwards loopback connections to `upstream` while enabled.
struct Proxy {
    address: SocketAddr,
    enabled: Arc<AtomicBool>,
    generation: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let enabled = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let (accepting, current) = (enabled.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::Acquire) {
                    continue;
                }
                let cut = current.lock().await.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Self {
            address,
            enabled,
            generation,
        }
    }

    /// Drops every open connection and refuses new ones.
    async fn cut(&self) {
        self.enabled.store(false, Ordering::Release);
        let mut generation = self.generation.lock().await;
        generation.cancel();
        *generation = CancellationToken::new();
    }

    fn restore(&self) {
        self.enabled.store(true, Ordering::Release);
    }
}

async fn readyz(running: &Running) -> (u16, Value) {
    let response = reqwest::get(format!("{}/readyz", running.api))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Polls `/readyz` until it has `status`, failing after 30 s.
async fn wait_ready(running: &Running, status: u16) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (now, body) = readyz(running).await;
        if now == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {now}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn outages_answer_503_and_recover() {
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let redis = Proxy::start("127.0.0.1:6379".parse().unwrap()).await;
    let nats = Proxy::start("127.0.0.1:4222".parse().unwrap()).await;
    let name = format!("outage_{}", std::process::id());
    let env = [
        ("ROUTING_RUN_MODE", "cluster".to_owned()),
        ("ROUTING_MESSAGE_STORE__TYPE", "postgres".to_owned()),
        (
            "ROUTING_MESSAGE_STORE__POSTGRES__URL",
            format!("postgres://postgres@{}/test", postgres.address),
        ),
        ("ROUTING_MESSAGE_STORE__POSTGRES__SCHEMA", name.clone()),
        (
            "ROUTING_MESSAGE_STORE__POSTGRES__ACQUIRE_TIMEOUT",
            "1s".to_owned(),
        ),
        ("ROUTING_PRESENCE_CACHE__TYPE", "redis".to_owned()),
        (
            "ROUTING_PRESENCE_CACHE__REDIS__URL",
            format!("redis://{}", redis.address),
        ),
        ("ROUTING_PRESENCE_CACHE__REDIS__KEY_PREFIX", name.clone()),
        ("ROUTING_DELIVERY_BUS__TYPE", "nats".to_owned()),
        (
            "ROUTING_DELIVERY_BUS__NATS__URL",
            format!("nats://{}", nats.address),
        ),
        ("ROUTING_DELIVERY_BUS__NATS__SUBJECT_PREFIX", name.clone()),
        ("ROUTING_WEBSOCKET__RESYNC_INTERVAL", "1s".to_owned()),
    ]
    .map(|(key, value)| (key.to_owned(), value));
    let dir = tempfile::tempdir().unwrap();
    let running = start_binary_with(dir.path(), &env).await;
    wait_ready(&running, 200).await;
    let alice = client(&running, "alice");
    let mut bob = connect(&client(&running, "bob")).await;

    // PostgreSQL down: sends get 503 with Retry-After, and work again after.
    postgres.cut().await;
    let body = wait_ready(&running, 503).await;
    assert!(body["components"]["mailbox"]["error"].is_string(), "{body}");
    let response = reqwest::Client::new()
        .post(format!("{}/send", running.api))
        .bearer_auth(
            routing_service::auth::mint_hs256(
                crate::support::SECRET,
                "alice",
                Duration::from_secs(60),
            )
            .unwrap(),
        )
        .json(&envelope("bob", "ZG93bg=="))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert_error(response, 503, ErrorCode::Unavailable).await;
    postgres.restore();
    wait_ready(&running, 200).await;
    alice
        .send(&envelope("bob", "YmFjaw=="))
        .await
        .expect("sends work again");
    assert_eq!(next_message(&mut bob).await, (1, "YmFjaw==".into()));

    // Redis down: the message is stored, and the resync delivers it.
    redis.cut().await;
    let body = wait_ready(&running, 503).await;
    assert!(
        body["components"]["presence"]["error"].is_string(),
        "{body}"
    );
    alice
        .send(&envelope("bob", "cmVkaXM="))
        .await
        .expect("stored without presence");
    assert_eq!(next_message(&mut bob).await, (2, "cmVkaXM=".into()));
    redis.restore();
    wait_ready(&running, 200).await;

    // NATS down: the same.
    nats.cut().await;
    let body = wait_ready(&running, 503).await;
    assert!(
        body["components"]["delivery_bus"]["error"].is_string(),
        "{body}"
    );
    alice
        .send(&envelope("bob", "bmF0cw=="))
        .await
        .expect("stored without the bus");
    assert_eq!(next_message(&mut bob).await, (3, "bmF0cw==".into()));
    nats.restore();
    wait_ready(&running, 200).await;
    alice.send(&envelope("bob", "bGl2ZQ==")).await.unwrap();
    assert_eq!(next_message(&mut bob).await, (4, "bGl2ZQ==".into()));

    let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .unwrap();
    let drop = format!("DROP SCHEMA IF EXISTS {name} CASCADE");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(&pool)
        .await
        .unwrap();
}
