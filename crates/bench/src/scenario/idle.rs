//! `idle`: open authenticated WebSockets in steps and read the server's
//! resident memory after each step.

use std::sync::Arc;
use std::time::Duration;

use crate::options::Options;
use crate::routing::Users;
use crate::stats::{Counters, MemoryStep, Report, ServerProbe, spawn_progress};

use super::Receivers;

/// How long one step's connections may take to open.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause after a step before the memory is read, so that handshake buffers are freed.
const SETTLE: Duration = Duration::from_secs(2);

pub(super) async fn run(options: &Options) -> anyhow::Result<Report> {
    let counters = Arc::new(Counters::default());
    let progress = spawn_progress(counters.clone(), options.quiet);
    let users = Users::new();
    let probe = ServerProbe::new(options.server_pid);
    if probe.is_none() {
        eprintln!("no --server-pid: connections are opened but the server's memory is not read");
    }

    let mut receivers = Receivers::new(options, &counters);
    let mut steps = Vec::new();
    let mut opened = 0;
    for &step in &options.steps {
        let new_users: Vec<String> = (opened..step).map(|index| users.recipient(index)).collect();
        receivers.add(options, &new_users)?;
        opened = step;
        if let Err(err) = receivers.wait_connected(STEP_TIMEOUT).await {
            eprintln!("step {step}: {err:#}");
        }
        tokio::time::sleep(SETTLE).await;
        let connections = Counters::get(&counters.connected);
        let rss_bytes = probe.map(|probe| probe.rss_bytes()).transpose()?;
        if !options.quiet {
            eprintln!(
                "step {step}: {connections} connections, server RSS {}",
                rss_bytes.map_or("unknown".into(), |rss| format!(
                    "{:.1} MiB",
                    rss as f64 / 1_048_576.0
                ))
            );
        }
        steps.push(MemoryStep {
            connections,
            rss_bytes,
        });
    }

    receivers.stop().await?;
    progress.abort();
    let mut report = Report::new(options);
    report.recipients = options.steps.last().copied().unwrap_or(0);
    report.senders = 0;
    report.rss_bytes_per_connection = slope(&steps);
    report.memory_steps = steps;
    report.take_counters(&counters);
    Ok(report)
}

/// Bytes per connection between the first and the last step.
fn slope(steps: &[MemoryStep]) -> Option<f64> {
    let (first, last) = (steps.first()?, steps.last()?);
    let connections = last
        .connections
        .checked_sub(first.connections)
        .filter(|&count| count > 0)?;
    let bytes = last.rss_bytes? as f64 - first.rss_bytes? as f64;
    Some(bytes / connections as f64)
}
