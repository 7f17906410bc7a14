//! The real `routing-service` binary: kill -9 loses no accepted message, and
//! SIGTERM closes WebSockets with 1001 and exits 0.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use routing_client::{Client, Event};
use routing_protocol::close_code;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::support::{SECRET, WAIT, connect, envelope_with_id, next_event};

pub struct Running {
    pub child: Child,
    pub api: String,
    pub ws: String,
}

/// Starts the binary on loopback port 0 in local mode.
async fn start_binary(data_dir: &Path) -> Running {
    start_binary_with(data_dir, &[]).await
}

/// Starts the binary on loopback port 0 with extra environment, and reads
/// the bound addresses of the roles it runs from its JSON log lines.
pub async fn start_binary_with(data_dir: &Path, extra_env: &[(String, String)]) -> Running {
    let roles = extra_env
        .iter()
        .find(|(name, _)| name == "ROUTING_ROLES")
        .map_or("[api, websocket]", |(_, value)| value.as_str());
    let (wants_api, wants_ws) = (roles.contains("api"), roles.contains("websocket"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_routing-service"))
        .env("JWT_SECRET", SECRET)
        .env("ROUTING_BIND_ADDRESS", "127.0.0.1")
        .env("ROUTING_API_PORT", "0")
        .env("ROUTING_WEBSOCKET_PORT", "0")
        .env("ROUTING_DATA_DIR", data_dir)
        .env("ROUTING_LOG__FORMAT", "json")
        .env("ROUTING_LIMITS__SEND_BURST", "100000")
        .env("RUST_LOG", "info")
        .envs(extra_env.iter().map(|(name, value)| (name, value)))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut api, mut ws) = (None, None);
    let found = tokio::time::timeout(WAIT, async {
        while (wants_api && api.is_none()) || (wants_ws && ws.is_none()) {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the binary logs before it exits");
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let fields = &event["fields"];
            if fields["message"] != "listening" {
                continue;
            }
            let address = fields["address"].as_str().unwrap().to_owned();
            match fields["role"].as_str() {
                Some("api") => api = Some(format!("http://{address}")),
                Some("websocket") => ws = Some(format!("ws://{address}")),
                _ => {}
            }
        }
    })
    .await;
    assert!(found.is_ok(), "the binary did not log its addresses");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Running {
        child,
        api: api.unwrap_or_default(),
        ws: ws.unwrap_or_default(),
    }
}

pub fn client(running: &Running, user: &str) -> Client {
    let token = routing_service::auth::mint_hs256(SECRET, user, Duration::from_secs(3600)).unwrap();
    Client::new(&running.api, &running.ws, &token)
}

#[tokio::test]
async fn kill_9_loses_no_accepted_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = start_binary(dir.path()).await;
    let accepted = Arc::new(Mutex::new(Vec::new()));

    let mut senders = Vec::new();
    for sender in 0..4 {
        let alice = client(&running, &format!("sender{sender}"));
        let accepted = accepted.clone();
        senders.push(tokio::spawn(async move {
            for index in 0..10_000 {
                let id = format!("s{sender}-{index}");
                match alice.send(&envelope_with_id("bob", "QUJD", &id)).await {
                    Ok(_) => accepted.lock().await.push(id),
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::timeout(WAIT, async {
        while accepted.lock().await.len() < 300 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("300 sends accepted before the kill");
    running.child.kill().await.unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let accepted = accepted.lock().await.clone();

    let running = start_binary(dir.path()).await;
    let bob = client(&running, "bob");
    let (mut stored, mut seqs, mut after) = (HashSet::new(), Vec::new(), 0);
    while let Some(page) = bob.messages(after, 1000).await.unwrap() {
        for item in &page.messages {
            assert!(
                stored.insert(item.envelope.message_id.clone().unwrap()),
                "no duplicate"
            );
            seqs.push(item.seq);
        }
        after = page.messages.last().unwrap().seq;
    }
    let missing: Vec<_> = accepted.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted messages lost: {missing:?}",
        missing.len(),
        accepted.len()
    );
    assert!(
        seqs.windows(2).all(|pair| pair[0] < pair[1]),
        "seq order after restart"
    );

    let fresh = client(&running, "carol");
    fresh
        .send(&envelope_with_id("bob", "QUJD", "after-restart"))
        .await
        .unwrap();
    let page = bob
        .messages(after, 10)
        .await
        .unwrap()
        .expect("the new message");
    assert_eq!(
        page.messages[0].seq,
        after + 1,
        "seq continues after the restart"
    );
}

#[tokio::test]
async fn sigterm_closes_with_1001_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut running = start_binary(dir.path()).await;
    let mut bob = connect(&client(&running, "bob")).await;

    let pid = running.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());

    match next_event(&mut bob).await {
        Event::Closed(Some((code, _))) => assert_eq!(code, close_code::GOING_AWAY),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let exit = tokio::time::timeout(WAIT, running.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}
