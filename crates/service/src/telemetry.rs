//! Logging and metrics. Metric names are constants here so the code and the
//! docs use one spelling; every name starts with `routing_`.

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;

/// Messages answered 202 or `sent`, duplicates included.
pub const MESSAGES_ACCEPTED: &str = "routing_messages_accepted_total";
/// Messages newly written to a mailbox.
pub const MESSAGES_STORED: &str = "routing_messages_stored_total";
/// Sends that were duplicates of a stored message and stored nothing.
pub const MESSAGES_DUPLICATE: &str = "routing_messages_duplicate_total";
/// Messages written to a WebSocket, labelled `path` = `live` or `backlog`.
pub const MESSAGES_DELIVERED: &str = "routing_messages_delivered_total";
/// Messages deleted by an ack.
pub const MESSAGES_ACKNOWLEDGED: &str = "routing_messages_acknowledged_total";
/// Messages deleted because their TTL passed.
pub const MESSAGES_EXPIRED: &str = "routing_messages_expired_total";
/// Rejected sends, labelled `reason` with the error code.
pub const MESSAGES_REJECTED: &str = "routing_messages_rejected_total";
/// Deliveries the bus could not publish; the message stays in the mailbox.
pub const MESSAGES_DEAD_LETTERED: &str = "routing_messages_dead_lettered_total";
/// Open WebSocket connections on this instance.
pub const CONNECTIONS_OPEN: &str = "routing_connections_open";
/// WebSocket connections the server closed, labelled `code` with the close code.
pub const CONNECTIONS_CLOSED: &str = "routing_connections_closed_total";
/// Seconds from acceptance to the write on a WebSocket.
pub const DELIVERY_LATENCY: &str = "routing_delivery_latency_seconds";
/// Seconds per backend call, labelled `backend` and `operation`.
pub const BACKEND_CALL_DURATION: &str = "routing_backend_call_duration_seconds";
/// Failed backend calls, labelled `backend` and `operation`.
pub const BACKEND_ERRORS: &str = "routing_backend_errors_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// The log filter when `RUST_LOG` is not set: the storage engine's routine
/// lines are left out.
const DEFAULT_LOG_FILTER: &str = "info";

/// Installs the global `tracing` subscriber; the level comes from `RUST_LOG`.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the Prometheus recorder once per process and returns its handle.
/// Several servers in one process (as in tests) share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed by an embedding
            // program; then this handle renders nothing, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            describe_metrics();
            register_at_zero();
            handle
        })
        .clone()
}

/// Handles of the metrics recorded for every message. Each `counter!` or
/// `histogram!` call looks its series up by name and labels, so the paths
/// that run per message use these handles, resolved once.
pub struct MessageMetrics {
    /// [`MESSAGES_ACCEPTED`].
    pub accepted: Counter,
    /// [`MESSAGES_STORED`].
    pub stored: Counter,
    /// [`MESSAGES_DUPLICATE`].
    pub duplicate: Counter,
    /// [`MESSAGES_ACKNOWLEDGED`].
    pub acknowledged: Counter,
    /// [`MESSAGES_DELIVERED`] with `path` = `live`.
    pub delivered_live: Counter,
    /// [`MESSAGES_DELIVERED`] with `path` = `backlog`.
    pub delivered_backlog: Counter,
    /// [`DELIVERY_LATENCY`].
    pub delivery_latency: Histogram,
}

/// Returns the per-message metric handles. The first call installs the
/// recorder, because a handle resolved before that would record nothing.
pub fn message_metrics() -> &'static MessageMetrics {
    static METRICS: OnceLock<MessageMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        install_recorder();
        MessageMetrics {
            accepted: metrics::counter!(MESSAGES_ACCEPTED),
            stored: metrics::counter!(MESSAGES_STORED),
            duplicate: metrics::counter!(MESSAGES_DUPLICATE),
            acknowledged: metrics::counter!(MESSAGES_ACKNOWLEDGED),
            delivered_live: metrics::counter!(MESSAGES_DELIVERED, "path" => "live"),
            delivered_backlog: metrics::counter!(MESSAGES_DELIVERED, "path" => "backlog"),
            delivery_latency: metrics::histogram!(DELIVERY_LATENCY),
        }
    })
}

/// Installs the Prometheus recorder if this process has none yet, so that
/// metric handles resolved afterwards record into it.
pub fn install_recorder() {
    let _ = metrics_handle();
}

/// Creates the unlabelled series at zero, so dashboards see them before
/// the first event.
fn register_at_zero() {
    for name in [
        MESSAGES_ACCEPTED,
        MESSAGES_STORED,
        MESSAGES_DUPLICATE,
        MESSAGES_ACKNOWLEDGED,
        MESSAGES_EXPIRED,
        MESSAGES_DEAD_LETTERED,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(CONNECTIONS_OPEN).increment(0.0);
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        MESSAGES_ACCEPTED,
        "Messages answered 202 or sent, duplicates included."
    );
    describe_counter!(MESSAGES_STORED, "Messages newly written to a mailbox.");
    describe_counter!(
        MESSAGES_DUPLICATE,
        "Sends answered as an earlier identical message."
    );
    describe_counter!(
        MESSAGES_DELIVERED,
        "Messages written to a WebSocket, by path."
    );
    describe_counter!(MESSAGES_ACKNOWLEDGED, "Messages deleted by an ack.");
    describe_counter!(
        MESSAGES_EXPIRED,
        "Messages deleted because their TTL passed."
    );
    describe_counter!(MESSAGES_REJECTED, "Rejected sends, by error code.");
    describe_counter!(
        MESSAGES_DEAD_LETTERED,
        "Deliveries the bus could not publish."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Open WebSocket connections.");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections the server closed, by close code."
    );
    describe_histogram!(
        DELIVERY_LATENCY,
        "Seconds from acceptance to the WebSocket write."
    );
    describe_histogram!(BACKEND_CALL_DURATION, "Seconds per backend call.");
    describe_counter!(BACKEND_ERRORS, "Failed backend calls.");
}
