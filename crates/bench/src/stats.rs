//! Counters shared by the tasks of a run, the server's CPU and memory from
//! /proc, latency summaries and the final report.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::options::{Scenario, Target, Via};
use crate::payload::{MessageKey, split_key};

/// Live counters, read by the progress line and by the scenario's wait loops,
/// and the latency histogram every receiver records into.
#[derive(Debug)]
pub struct Counters {
    /// Messages the server accepted (202 or `sent`).
    pub accepted: AtomicU64,
    /// Messages the server rejected with an error status or frame.
    pub rejected: AtomicU64,
    /// Sends that failed in transport, with no response.
    pub send_errors: AtomicU64,
    /// Messages received for the first time (redeliveries are not counted).
    pub delivered: AtomicU64,
    /// Open receiving connections that got their `welcome` (or subscription).
    pub connected: AtomicU64,
    /// Connections that failed or closed unexpectedly.
    pub connection_errors: AtomicU64,
    /// Receiving connections opened, reconnects included.
    pub opened: AtomicU64,
    /// Send-to-deliver latency of first deliveries, in microseconds. One
    /// shared histogram, because one per receiver would take about 100 KiB
    /// each at three significant digits.
    pub latency: Mutex<Histogram<u64>>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            connection_errors: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
        }
    }
}

impl Counters {
    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records latencies in microseconds and empties `samples`.
    pub fn record_latencies(&self, samples: &mut Vec<u64>) {
        if samples.is_empty() {
            return;
        }
        let mut histogram = self
            .latency
            .lock()
            .expect("no thread panicked holding the histogram");
        for &sample in samples.iter() {
            histogram.saturating_record(sample.max(1));
        }
        samples.clear();
    }

    /// Waits until `done` holds, checking every 5 ms; false when `timeout` passed first.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        // Bounded by the deadline.
        while !done(self) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// Prints a progress line on stderr once a second until the returned handle is aborted.
pub fn spawn_progress(counters: Arc<Counters>, quiet: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let start = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let (mut last_accepted, mut last_delivered) = (0, 0);
        // Bounded by the caller, which aborts this task when the run ends.
        loop {
            ticker.tick().await;
            let accepted = Counters::get(&counters.accepted);
            let delivered = Counters::get(&counters.delivered);
            eprintln!(
                "[{:>4}s] accepted {accepted} (+{}/s)  delivered {delivered} (+{}/s)  rejected {}  send errors {}  connected {}  connection errors {}",
                start.elapsed().as_secs(),
                accepted - last_accepted,
                delivered - last_delivered,
                Counters::get(&counters.rejected),
                Counters::get(&counters.send_errors),
                Counters::get(&counters.connected),
                Counters::get(&counters.connection_errors),
            );
            last_accepted = accepted;
            last_delivered = delivered;
        }
    })
}

/// A server process observed through /proc.
#[derive(Debug, Clone, Copy)]
pub struct ServerProbe {
    pid: u32,
    ticks_per_second: u64,
}

impl ServerProbe {
    /// Probes `pid`, or nothing when no pid was given.
    pub fn new(pid: Option<u32>) -> Option<Self> {
        pid.map(|pid| Self {
            pid,
            ticks_per_second: clock_ticks_per_second(),
        })
    }

    /// Reads the process's user plus system CPU time, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).map_err(|err| {
            anyhow::anyhow!("reading {path} failed: {err}; is --server-pid right?")
        })?;
        // The command name in brackets may contain spaces, so fields are
        // counted after its closing bracket: utime and stime are fields 14 and
        // 15 of the whole line, so 12 and 13 after the name.
        let after_name = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow::anyhow!("{path} has no command name"))?;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| -> anyhow::Result<u64> {
            fields
                .get(index)
                .and_then(|field| field.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{path} field {} is missing", index + 3))
        };
        Ok((ticks(11)? + ticks(12)?) as f64 / self.ticks_per_second as f64)
    }

    /// Reads the process's resident set size (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).map_err(|err| {
            anyhow::anyhow!("reading {path} failed: {err}; is --server-pid right?")
        })?;
        let line = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .ok_or_else(|| anyhow::anyhow!("{path} has no VmRSS line"))?;
        let kib: u64 = line
            .trim_start_matches("VmRSS:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .map_err(|err| anyhow::anyhow!("invalid VmRSS line {line:?} in {path}: {err}"))?;
        Ok(kib * 1024)
    }
}

/// Returns the kernel's clock ticks per second from `getconf CLK_TCK`, or 100 when getconf fails.
fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

/// Creates a latency histogram in microseconds, from 1 µs to 10 minutes, at three
/// significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("the histogram bounds are valid")
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    /// Summarises a histogram; `None` when it is empty.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        Some(Self {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        })
    }
}

/// Accepted and received messages of a run, compared at its end.
#[derive(Debug, Clone, Serialize)]
pub struct Accounting {
    /// Messages the server accepted.
    pub accepted: u64,
    /// Accepted messages that arrived at least once.
    pub delivered: u64,
    /// Accepted messages that never arrived.
    pub lost: u64,
    /// The first lost messages, as `sender:counter`.
    pub lost_examples: Vec<String>,
    /// Messages that arrived but were never accepted (for example after a
    /// send that timed out on the client).
    pub unexpected: u64,
    /// A seq delivered twice, or out of order, on one connection.
    pub duplicates_on_connection: u64,
    /// A seq delivered again on a later connection of the same recipient
    /// (allowed by the protocol after a reconnect).
    pub redeliveries_after_reconnect: u64,
    /// For targets without seq: the same payload received twice.
    pub duplicate_payloads: u64,
}

impl Accounting {
    /// Compares the accepted keys with the received ones; both are sorted and
    /// deduplicated here.
    pub fn compare(mut accepted: Vec<MessageKey>, mut received: Vec<MessageKey>) -> Self {
        accepted.sort_unstable();
        accepted.dedup();
        received.sort_unstable();
        let received_total = received.len();
        received.dedup();
        let duplicate_payloads = (received_total - received.len()) as u64;

        let mut lost = Vec::new();
        let mut unexpected = 0u64;
        let (mut a, mut r) = (0, 0);
        while a < accepted.len() || r < received.len() {
            match (accepted.get(a), received.get(r)) {
                (Some(x), Some(y)) if x == y => {
                    a += 1;
                    r += 1;
                }
                (Some(x), Some(y)) if x < y => {
                    lost.push(*x);
                    a += 1;
                }
                (Some(x), None) => {
                    lost.push(*x);
                    a += 1;
                }
                _ => {
                    unexpected += 1;
                    r += 1;
                }
            }
        }
        Self {
            accepted: accepted.len() as u64,
            delivered: (accepted.len() - lost.len()) as u64,
            lost: lost.len() as u64,
            lost_examples: lost
                .iter()
                .take(20)
                .map(|&key| {
                    let (sender, counter) = split_key(key);
                    format!("{sender}:{counter}")
                })
                .collect(),
            unexpected,
            duplicates_on_connection: 0,
            redeliveries_after_reconnect: 0,
            duplicate_payloads,
        }
    }

    /// Returns whether the run broke a delivery guarantee.
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.duplicates_on_connection > 0
    }
}

/// Server memory at one connection count (idle).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryStep {
    pub connections: u64,
    pub rss_bytes: Option<u64>,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub target: Target,
    /// The send path, absent for idle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    pub recipients: usize,
    pub senders: usize,
    pub payload_bytes: usize,
    /// The requested send rate in messages per second; 0 is full speed.
    pub rate: u64,
    /// Seconds from the first send (or the first connection of a drain) to the last delivery.
    pub elapsed_s: f64,
    pub delivered_per_s: f64,
    pub rejected: u64,
    pub send_errors: u64,
    pub connection_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accounting: Option<Accounting>,
    /// Send-to-deliver latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Server user plus system CPU seconds during the measured phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    /// Server CPU seconds per 1,000 delivered messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_s_per_1000: Option<f64>,
    /// Backlog: messages stored before the drain, and the store phase's rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_per_s: Option<f64>,
    /// Backlog: seconds from the first connection to the last message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_s: Option<f64>,
    /// Idle: server memory after each step.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory_steps: Vec<MemoryStep>,
    /// Idle: bytes of server RSS per connection between the first and last step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes_per_connection: Option<f64>,
    /// Reconnect: storms run, connections re-opened, and re-opened per second during storms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnects: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnects_per_s: Option<f64>,
    /// Reconnect: the slowest storm, from the drop to the last `welcome`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slowest_storm_s: Option<f64>,
}

impl Report {
    /// Creates a report with the run's parameters and nothing measured yet.
    pub fn new(options: &crate::options::Options) -> Self {
        Self {
            scenario: options.scenario,
            target: options.target,
            via: (options.scenario != Scenario::Idle).then_some(options.via),
            recipients: options.recipients,
            senders: options.senders,
            payload_bytes: options.payload_bytes,
            rate: options.rate,
            elapsed_s: 0.0,
            delivered_per_s: 0.0,
            rejected: 0,
            send_errors: 0,
            connection_errors: 0,
            accounting: None,
            latency: None,
            server_cpu_s: None,
            server_cpu_s_per_1000: None,
            stored_per_s: None,
            drain_s: None,
            memory_steps: Vec::new(),
            rss_bytes_per_connection: None,
            storms: None,
            reconnects: None,
            reconnects_per_s: None,
            slowest_storm_s: None,
        }
    }

    /// Copies the error counters.
    pub fn take_counters(&mut self, counters: &Counters) {
        self.rejected = Counters::get(&counters.rejected);
        self.send_errors = Counters::get(&counters.send_errors);
        self.connection_errors = Counters::get(&counters.connection_errors);
    }

    /// Fills the rate and CPU fields from the delivered count.
    pub fn set_throughput(&mut self, delivered: u64, elapsed: Duration, server_cpu_s: Option<f64>) {
        self.elapsed_s = elapsed.as_secs_f64();
        self.delivered_per_s = if self.elapsed_s > 0.0 {
            delivered as f64 / self.elapsed_s
        } else {
            0.0
        };
        self.server_cpu_s = server_cpu_s;
        self.server_cpu_s_per_1000 = server_cpu_s
            .filter(|_| delivered > 0)
            .map(|cpu| cpu * 1000.0 / delivered as f64);
    }

    /// Returns whether the run broke a delivery guarantee.
    pub fn failed(&self) -> bool {
        self.accounting.as_ref().is_some_and(Accounting::failed)
    }

    /// Formats the human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |name: &str, value: String| rows.push((name.to_owned(), value));
        row("scenario", format!("{:?}", self.scenario).to_lowercase());
        row("target", format!("{:?}", self.target).to_lowercase());
        if let Some(via) = self.via {
            row("via", format!("{via:?}").to_lowercase());
        }
        row(
            "recipients / senders",
            format!("{} / {}", self.recipients, self.senders),
        );
        row("payload bytes", self.payload_bytes.to_string());
        row(
            "requested rate",
            if self.rate == 0 {
                "full speed".into()
            } else {
                format!("{} msg/s", self.rate)
            },
        );
        if let Some(accounting) = &self.accounting {
            row("accepted", accounting.accepted.to_string());
            row("delivered", accounting.delivered.to_string());
            row("lost", accounting.lost.to_string());
            row(
                "duplicates on one connection",
                accounting.duplicates_on_connection.to_string(),
            );
            row(
                "redeliveries after reconnect",
                accounting.redeliveries_after_reconnect.to_string(),
            );
            row(
                "duplicate payloads",
                accounting.duplicate_payloads.to_string(),
            );
            row(
                "received but never accepted",
                accounting.unexpected.to_string(),
            );
        }
        row(
            "rejected / send errors",
            format!("{} / {}", self.rejected, self.send_errors),
        );
        row("connection errors", self.connection_errors.to_string());
        if self.scenario != Scenario::Idle {
            row("elapsed", format!("{:.2} s", self.elapsed_s));
            row(
                "delivered per second",
                format!("{:.0}", self.delivered_per_s),
            );
        }
        if let Some(latency) = &self.latency {
            row(
                "latency p50 / p90 / p99",
                format!(
                    "{} / {} / {} µs",
                    latency.p50_us, latency.p90_us, latency.p99_us
                ),
            );
            row(
                "latency p99.9 / max",
                format!("{} / {} µs", latency.p999_us, latency.max_us),
            );
        }
        if let Some(cpu) = self.server_cpu_s {
            row("server CPU", format!("{cpu:.2} s"));
        }
        if let Some(per_1000) = self.server_cpu_s_per_1000 {
            row(
                "server CPU per 1,000 delivered",
                format!("{per_1000:.4} s ({:.1} µs per message)", per_1000 * 1000.0),
            );
        }
        if let Some(stored) = self.stored_per_s {
            row("stored per second", format!("{stored:.0}"));
        }
        if let Some(drain) = self.drain_s {
            row("drain time", format!("{drain:.2} s"));
        }
        for step in &self.memory_steps {
            row(
                &format!("server RSS at {} connections", step.connections),
                step.rss_bytes
                    .map_or("unknown (no --server-pid)".into(), |rss| {
                        format!("{:.1} MiB", rss as f64 / 1_048_576.0)
                    }),
            );
        }
        if let Some(slope) = self.rss_bytes_per_connection {
            row(
                "server RSS per connection",
                format!("{slope:.0} bytes ({:.2} KiB)", slope / 1024.0),
            );
        }
        if let Some(storms) = self.storms {
            row("reconnect storms", storms.to_string());
        }
        if let Some(reconnects) = self.reconnects {
            row("reconnects", reconnects.to_string());
        }
        if let Some(rate) = self.reconnects_per_s {
            row("reconnects per second (in storms)", format!("{rate:.0}"));
        }
        if let Some(slowest) = self.slowest_storm_s {
            row("slowest storm", format!("{slowest:.2} s"));
        }

        let width = rows
            .iter()
            .map(|(name, _)| name.chars().count())
            .max()
            .unwrap_or(0);
        let mut table = String::new();
        for (name, value) in rows {
            let _ = writeln!(table, "{name:<width$}  {value}");
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::message_key;

    #[test]
    fn accounting_finds_lost_and_duplicates() {
        let accepted = vec![message_key(0, 1), message_key(0, 2), message_key(1, 1)];
        let received = vec![
            message_key(1, 1),
            message_key(0, 1),
            message_key(0, 1),
            message_key(2, 9),
        ];
        let accounting = Accounting::compare(accepted, received);
        assert_eq!(accounting.accepted, 3);
        assert_eq!(accounting.delivered, 2);
        assert_eq!(accounting.lost, 1);
        assert_eq!(accounting.lost_examples, vec!["0:2".to_owned()]);
        assert_eq!(accounting.duplicate_payloads, 1);
        assert_eq!(accounting.unexpected, 1);
        assert!(accounting.failed());
    }
}
