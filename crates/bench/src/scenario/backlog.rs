//! `backlog`: store `--per-user` messages for each of `--recipients` offline
//! users, then connect them all at once and drain with acks.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use crate::options::Options;
use crate::routing::{Users, Workload};
use crate::stats::{Counters, Report, ServerProbe, spawn_progress};

use super::{Receivers, account, run_senders};

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

    let total = (options.recipients * options.per_user) as u64;
    let store_start = Instant::now();
    let workload = Workload::Fixed {
        next: Arc::new(AtomicU64::new(0)),
        total,
    };
    let accepted = run_senders(options, &users, &recipients, &counters, workload).await?;
    let store_elapsed = store_start.elapsed();
    if !options.quiet {
        eprintln!(
            "stored {} messages in {:.2} s; connecting {} recipients",
            accepted.len(),
            store_elapsed.as_secs_f64(),
            recipients.len()
        );
    }

    let cpu_before = probe.map(|probe| probe.cpu_seconds()).transpose()?;
    let drain_start = Instant::now();
    let mut receivers = Receivers::new(options, &counters);
    receivers.add(options, &recipients)?;
    let expected = accepted.len() as u64;
    let drained = counters
        .wait_until(options.drain_timeout, |counters| {
            Counters::get(&counters.delivered) >= expected
        })
        .await;
    if !drained {
        eprintln!(
            "the backlog did not drain within {:?}",
            options.drain_timeout
        );
    }
    let drain_elapsed = drain_start.elapsed();
    let cpu_after = probe.map(|probe| probe.cpu_seconds()).transpose()?;

    let received = receivers.stop().await?;
    progress.abort();
    let mut report = Report::new(options);
    let accounting = account(accepted, received);
    report.set_throughput(
        accounting.delivered,
        drain_elapsed,
        cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after - before),
    );
    report.stored_per_s = Some(expected as f64 / store_elapsed.as_secs_f64().max(1e-9));
    report.drain_s = Some(drain_elapsed.as_secs_f64());
    // Latency since sending includes the store phase, so it is left out here.
    report.accounting = Some(accounting);
    report.take_counters(&counters);
    Ok(report)
}
