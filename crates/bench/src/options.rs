//! Command-line options of `routing-bench`.

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Load generator for routing-service, with soketi as a same-run peer.
#[derive(Debug, Clone, Parser)]
#[command(name = "routing-bench", version)]
pub struct Options {
    /// The workload to run.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// The server under load.
    #[arg(long, value_enum, default_value_t = Target::Routing)]
    pub target: Target,

    /// Base URL of routing-service's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    pub api: String,

    /// Base URL of routing-service's WebSocket server.
    #[arg(long, default_value = "ws://127.0.0.1:8085")]
    pub ws: String,

    /// HS256 secret the server verifies tokens with; tokens are minted here.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, default_value = "")]
    pub jwt_secret: String,

    /// Process id of the server, to read its CPU time and resident memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// How long senders send (online, reconnect), for example `10s` or `500ms`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,

    /// Messages per second over all senders; 0 sends as fast as the server responds.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,

    /// Recipients (users connected over WebSocket, or offline users for backlog).
    #[arg(long, default_value_t = 100)]
    pub recipients: usize,

    /// Sending users; each has one HTTP request or one WebSocket in flight at a time.
    #[arg(long, default_value_t = 16)]
    pub senders: usize,

    /// The send path: `POST /send` with keep-alive, or `send` frames on a WebSocket.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,

    /// Size of the decoded `encryptedData` of each message, in bytes (at least 20).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,

    /// Messages stored for each offline user (backlog).
    #[arg(long, default_value_t = 50)]
    pub per_user: usize,

    /// Connection counts at which the server's resident memory is read (idle).
    #[arg(long, value_delimiter = ',', default_value = "5000,10000,15000")]
    pub steps: Vec<usize>,

    /// Time between two reconnect storms (reconnect).
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub interval: Duration,

    /// How long to wait after sending for the last messages to arrive.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// WebSocket handshakes in progress at once while connecting many users.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Messages a WebSocket sender may have in flight before it waits for `sent`.
    #[arg(long, default_value_t = 256)]
    pub ws_window: usize,

    /// Do not print the progress line every second on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Recipients online over WebSocket; senders send for `--duration`.
    Online,
    /// Messages stored for offline users, then drained by connecting them all.
    Backlog,
    /// Many idle authenticated WebSockets; the server's memory per connection.
    Idle,
    /// All recipients drop and reconnect at once, repeatedly, while messages flow.
    Reconnect,
}

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// routing-service.
    Routing,
    /// soketi, a Pusher-protocol server, through its HTTP events API.
    Soketi,
}

/// The path senders submit messages through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `POST /send` over keep-alive HTTP connections.
    Http,
    /// `send` frames on one WebSocket per sender.
    Ws,
}

/// Parses `250ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let invalid =
        || format!("invalid duration {text:?}: expected a number with ms, s or m, like 10s");
    let (number, unit_ms) = if let Some(number) = text.strip_suffix("ms") {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1000.0)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60_000.0)
    } else {
        (text, 1000.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| invalid())?;
    if !value.is_finite() || value < 0.0 {
        return Err(invalid());
    }
    Ok(Duration::from_secs_f64(value * unit_ms / 1000.0))
}

impl Options {
    /// Checks option combinations that clap cannot express.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.payload_bytes < crate::payload::HEADER_BYTES {
            anyhow::bail!(
                "--payload-bytes {} is too small: the timestamp, sender and counter take {} bytes",
                self.payload_bytes,
                crate::payload::HEADER_BYTES
            );
        }
        if self.recipients == 0 {
            anyhow::bail!("--recipients must be at least 1");
        }
        if self.senders == 0
            && matches!(
                self.scenario,
                Scenario::Online | Scenario::Backlog | Scenario::Reconnect
            )
        {
            anyhow::bail!("--senders must be at least 1");
        }
        if self.target == Target::Routing && self.jwt_secret.is_empty() {
            anyhow::bail!(
                "missing token secret: pass --jwt-secret or set JWT_SECRET to the server's secret"
            );
        }
        if self.target == Target::Soketi {
            match (self.scenario, self.via) {
                (Scenario::Online, Via::Http) | (Scenario::Idle, _) => {}
                (Scenario::Online, Via::Ws) => anyhow::bail!(
                    "soketi accepts messages only through its HTTP events API: use --via http"
                ),
                (scenario, _) => anyhow::bail!(
                    "soketi stores no messages, so scenario {scenario:?} has no soketi version: use online or idle"
                ),
            }
        }
        if self.scenario == Scenario::Idle {
            let mut previous = 0;
            for &step in &self.steps {
                if step <= previous {
                    anyhow::bail!(
                        "--steps must be increasing connection counts, got {:?}",
                        self.steps
                    );
                }
                previous = step;
            }
            if self.steps.is_empty() {
                anyhow::bail!("--steps needs at least one connection count");
            }
        }
        Ok(())
    }
}
