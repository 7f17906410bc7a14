//! Manual check of the soketi target against a running soketi on 127.0.0.1:6001
//! with the app `app-id` / `app-key` / `app-secret`.
//!
//! Opens receivers for bob and carol, publishes 1000 payloads to bob and 10 to
//! carol, and checks that each receiver gets exactly its own payloads in order.
//! Then checks that a wrong secret fails both publishing and subscribing.
//! With `--idle SECONDS`, it also keeps a receiver idle that long before one
//! more payload, which exercises the `pusher:ping` keepalive (soketi 1.6.1 sets
//! `activity_timeout` to 30 s). Exits non-zero on the first failed check.
//!
//! Run: `cargo run -p routing-bench --example soketi_check [-- --idle 75]`

#[path = "../src/soketi.rs"]
mod soketi;

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use soketi::{SoketiConfig, SoketiPublisher, SoketiReceiver, open_receiver};

const BOB_COUNT: usize = 1000;
const CAROL_COUNT: usize = 10;

/// Maximum wait for one expected payload before the check fails.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time to wait for stray payloads after the last expected one.
const QUIET_PERIOD: Duration = Duration::from_millis(500);

/// Builds a payload with quotes and non-ASCII text, so JSON escaping is checked too.
fn payload(user: &str, seq: usize) -> String {
    format!(r#"{{"to":"{user}","seq":{seq},"note":"größe \"quoted\""}}"#)
}

/// Receives `count` payloads and checks each against the expected sequence, then
/// checks that nothing else arrives within `QUIET_PERIOD`.
async fn expect_payloads(
    mut receiver: SoketiReceiver,
    user: &'static str,
    count: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for seq in 0..count {
        let received = tokio::time::timeout(RECEIVE_TIMEOUT, receiver.next_payload())
            .await
            .with_context(|| format!("{user}: timed out waiting for payload {seq}"))??
            .with_context(|| format!("{user}: socket closed before payload {seq}"))?;
        ensure!(
            received == payload(user, seq),
            "{user}: payload {seq} is {received:?}, expected {:?}",
            payload(user, seq)
        );
    }
    let elapsed = start.elapsed();

    if let Ok(extra) = tokio::time::timeout(QUIET_PERIOD, receiver.next_payload()).await {
        bail!("{user}: unexpected payload after the last one: {extra:?}");
    }
    Ok(elapsed)
}

fn print_latencies(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{label}: n={} min={:?} p50={:?} p99={:?} max={:?}",
        samples.len(),
        samples[0],
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    );
}

/// Parses the optional `--idle SECONDS` argument.
fn idle_seconds() -> anyhow::Result<Option<u64>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.as_slice() {
        [] => Ok(None),
        [flag, seconds] if flag == "--idle" => {
            let seconds = seconds.parse().with_context(|| {
                format!("invalid --idle value {seconds:?}: expected whole seconds")
            })?;
            Ok(Some(seconds))
        }
        _ => bail!("invalid arguments {arguments:?}: expected none or `--idle SECONDS`"),
    }
}

/// Leaves a receiver idle for `idle`, then checks that it still gets a payload.
async fn check_idle_receiver(
    config: &SoketiConfig,
    publisher: &SoketiPublisher,
    idle: Duration,
) -> anyhow::Result<()> {
    let receiver = open_receiver(config, "dave").await?;
    let waiter = tokio::spawn(async move {
        let mut receiver = receiver;
        receiver.next_payload().await
    });

    tokio::time::sleep(idle).await;
    ensure!(
        !waiter.is_finished(),
        "dave: next_payload returned during the idle period: {:?}",
        waiter.await?
    );
    publisher.publish("dave", &payload("dave", 0)).await?;

    let received = tokio::time::timeout(RECEIVE_TIMEOUT, waiter)
        .await
        .context("dave: timed out waiting for the payload after the idle period")???
        .context("dave: socket closed during the idle period")?;
    ensure!(
        received == payload("dave", 0),
        "dave: payload after the idle period is {received:?}"
    );
    println!("dave received a payload after {idle:?} idle");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = SoketiConfig::default();

    let start = Instant::now();
    let bob = open_receiver(&config, "bob").await?;
    let carol = open_receiver(&config, "carol").await?;
    println!("opened 2 receivers in {:?}", start.elapsed());

    let bob_task = tokio::spawn(expect_payloads(bob, "bob", BOB_COUNT));
    let carol_task = tokio::spawn(expect_payloads(carol, "carol", CAROL_COUNT));

    // Publish one event at a time so the expected order is well defined,
    // because overlapping requests may be handled in any order.
    let publisher = SoketiPublisher::new(&config);
    let mut publish_times = Vec::with_capacity(BOB_COUNT + CAROL_COUNT);
    let publish_start = Instant::now();
    for seq in 0..BOB_COUNT {
        let started = Instant::now();
        publisher.publish("bob", &payload("bob", seq)).await?;
        publish_times.push(started.elapsed());

        if seq % (BOB_COUNT / CAROL_COUNT) == 0 {
            let carol_seq = seq / (BOB_COUNT / CAROL_COUNT);
            let started = Instant::now();
            publisher
                .publish("carol", &payload("carol", carol_seq))
                .await?;
            publish_times.push(started.elapsed());
        }
    }
    let publish_elapsed = publish_start.elapsed();
    println!(
        "published {} events in {publish_elapsed:?} ({:.0} events/s)",
        publish_times.len(),
        publish_times.len() as f64 / publish_elapsed.as_secs_f64()
    );
    print_latencies("publish request time", publish_times);

    let bob_elapsed = bob_task.await??;
    let carol_elapsed = carol_task.await??;
    println!("bob received {BOB_COUNT} payloads in order in {bob_elapsed:?}");
    println!("carol received {CAROL_COUNT} payloads in order in {carol_elapsed:?}");

    let wrong = SoketiConfig {
        secret: "wrong-secret".to_owned(),
        ..SoketiConfig::default()
    };
    match SoketiPublisher::new(&wrong).publish("bob", "x").await {
        Ok(()) => bail!("publish with a wrong secret succeeded"),
        Err(err) => println!("publish with a wrong secret failed as expected: {err:#}"),
    }
    match open_receiver(&wrong, "bob").await {
        Ok(_) => bail!("subscribe with a wrong secret succeeded"),
        Err(err) => println!("subscribe with a wrong secret failed as expected: {err:#}"),
    }
    match open_receiver(&config, "bob smith").await {
        Ok(_) => bail!("open_receiver accepted a user name with a space"),
        Err(err) => println!("invalid user name rejected as expected: {err:#}"),
    }

    if let Some(idle) = idle_seconds()? {
        check_idle_receiver(&config, &publisher, Duration::from_secs(idle)).await?;
    }

    println!("all soketi checks passed");
    Ok(())
}
