//! `reconnect`: every recipient drops its connection and reconnects at once,
//! every `--interval`, while senders send for `--duration`; every accepted
//! message must still arrive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::options::Options;
use crate::routing::{Users, Workload};
use crate::stats::{Counters, Latency, Report, ServerProbe, spawn_progress};

use super::{Receivers, account, run_senders, sender_period};

/// How long all recipients may take to connect, at the start and in each storm.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) async fn run(options: &Options) -> anyhow::Result<Report> {
    let counters = Arc::new(Counters::default());
    let progress = spawn_progress(counters.clone(), options.quiet);
    let users = Users::new();
    let probe = ServerProbe::new(options.server_pid);
    let recipients: Arc<Vec<String>> = Arc::new(
        (0..options.recipients)
            .map(|index| users.recipient(index))
            .collect(),
    );

    let mut receivers = Receivers::new(options, &counters);
    receivers.add(options, &recipients)?;
    receivers.wait_connected(CONNECT_TIMEOUT).await?;

    let cpu_before = probe.map(|probe| probe.cpu_seconds()).transpose()?;
    let start = Instant::now();
    let deadline = start + options.duration;
    let workload = Workload::Timed {
        deadline,
        period: sender_period(options),
    };
    let senders = run_senders(options, &users, &recipients, &counters, workload);

    // Storms run beside the senders until the deadline.
    let storms = async {
        let mut durations = Vec::new();
        let count = recipients.len() as u64;
        // Bounded by the deadline.
        while Instant::now() + options.interval < deadline {
            tokio::time::sleep(options.interval).await;
            let opened_before = Counters::get(&counters.opened);
            let storm_start = Instant::now();
            receivers.reconnect_all();
            let reopened = counters
                .wait_until(CONNECT_TIMEOUT, |counters| {
                    Counters::get(&counters.opened) >= opened_before + count
                })
                .await;
            if !reopened {
                eprintln!("a reconnect storm did not finish within {CONNECT_TIMEOUT:?}");
            }
            durations.push(storm_start.elapsed());
            if !options.quiet {
                eprintln!(
                    "storm {}: {count} reconnects in {:.3} s",
                    durations.len(),
                    storm_start.elapsed().as_secs_f64()
                );
            }
        }
        durations
    };
    let (accepted, storm_durations) = tokio::join!(senders, storms);
    let accepted = accepted?;

    let expected = accepted.len() as u64;
    let arrived = counters
        .wait_until(options.drain_timeout, |counters| {
            Counters::get(&counters.delivered) >= expected
        })
        .await;
    if !arrived {
        eprintln!(
            "not every accepted message arrived within {:?}",
            options.drain_timeout
        );
    }
    let elapsed = start.elapsed();
    let cpu_after = probe.map(|probe| probe.cpu_seconds()).transpose()?;

    let received = receivers.stop().await?;
    progress.abort();
    let mut report = Report::new(options);
    let reconnects = received.sessions.saturating_sub(recipients.len() as u64);
    let storm_time: f64 = storm_durations.iter().map(Duration::as_secs_f64).sum();
    let accounting = account(accepted, received);
    report.set_throughput(
        accounting.delivered,
        elapsed,
        cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after - before),
    );
    report.latency = Latency::from_histogram(&counters.latency.lock().expect("not poisoned"));
    report.accounting = Some(accounting);
    report.storms = Some(storm_durations.len() as u64);
    report.reconnects = Some(reconnects);
    report.reconnects_per_s = (storm_time > 0.0).then(|| reconnects as f64 / storm_time);
    report.slowest_storm_s = storm_durations
        .iter()
        .map(Duration::as_secs_f64)
        .reduce(f64::max);
    report.take_counters(&counters);
    Ok(report)
}
