//! `online`: recipients connected over WebSocket, senders sending for `--duration`.

use std::sync::Arc;
use std::time::Instant;

use crate::options::Options;
use crate::routing::{Users, Workload};
use crate::stats::{Counters, Latency, Report, ServerProbe, spawn_progress};

use super::{Receivers, account, run_senders, sender_period};

/// How long all recipients may take to connect.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

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
    let workload = Workload::Timed {
        deadline: start + options.duration,
        period: sender_period(options),
    };
    let accepted = run_senders(options, &users, &recipients, &counters, workload).await?;

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
    report.take_counters(&counters);
    Ok(report)
}
