//! Runs the `online` scenario for about a second against routing-service in
//! this process, over HTTP and over WebSocket sends, and checks the
//! accounting. No speed thresholds: this machine's speed varies.

use clap::Parser as _;
use routing_bench::{Options, Report};
use routing_service::config::{Config, Secret};
use routing_service::server::Server;

const SECRET: &str = "bench-smoke-secret-of-at-least-32-bytes";

/// Starts a server on loopback ports chosen by the OS, with send limits
/// high enough for a load generator.
async fn start_server(data_dir: &std::path::Path) -> Server {
    let mut config = Config::defaults();
    config.bind_address = "127.0.0.1".parse().unwrap();
    config.api_port = 0;
    config.websocket_port = 0;
    config.data_dir = data_dir.to_path_buf();
    config.jwt_secret = Some(Secret(SECRET.into()));
    config.limits.send_rate_per_second = 1_000_000;
    config.limits.send_burst = 1_000_000;
    config.limits.max_stored_per_user = 1_000_000;
    Server::start(config).await.expect("server starts")
}

async fn run_online(server: &Server, via: &str, extra: &[&str]) -> Report {
    let mut args = vec!["--via", via, "--recipients", "5", "--duration", "1s"];
    args.extend_from_slice(extra);
    run_scenario(server, "online", &args).await
}

/// Runs `scenario` with three senders against `server`; `extra` options come last.
async fn run_scenario(server: &Server, scenario: &str, extra: &[&str]) -> Report {
    let api = format!("http://{}", server.api_addr.expect("api role"));
    let ws = format!("ws://{}", server.websocket_addr.expect("websocket role"));
    let mut args = vec![
        "routing-bench",
        scenario,
        "--api",
        &api,
        "--ws",
        &ws,
        "--jwt-secret",
        SECRET,
        "--senders",
        "3",
        "--drain-timeout",
        "10s",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let options = Options::try_parse_from(args).expect("valid options");
    routing_bench::run(&options)
        .await
        .expect("the scenario runs")
}

fn assert_clean(report: &Report) {
    let accounting = report
        .accounting
        .as_ref()
        .expect("online reports accounting");
    assert!(accounting.accepted > 0, "nothing was accepted: {report:?}");
    assert_eq!(
        accounting.lost, 0,
        "lost messages: {:?}",
        accounting.lost_examples
    );
    assert_eq!(accounting.delivered, accounting.accepted);
    assert_eq!(accounting.duplicates_on_connection, 0);
    assert_eq!(accounting.duplicate_payloads, 0);
    assert_eq!(accounting.unexpected, 0);
    assert_eq!(report.rejected, 0);
    assert_eq!(report.send_errors, 0);
    assert!(!report.failed());
    let latency = report.latency.expect("latency was recorded");
    assert_eq!(latency.count, accounting.delivered);
    assert!(latency.p50_us <= latency.max_us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_over_http_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path()).await;
    let report = run_online(&server, "http", &[]).await;
    assert_clean(&report);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_over_websocket_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path()).await;
    let report = run_online(&server, "ws", &[]).await;
    assert_clean(&report);
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_at_fixed_rate_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path()).await;
    let report = run_online(&server, "http", &["--rate", "300"]).await;
    assert_clean(&report);
    let accepted = report.accounting.as_ref().unwrap().accepted;
    // 300 msg/s for 1 s, with slack for a slow machine: never more than sent.
    assert!(
        accepted <= 303,
        "the rate was not kept: {accepted} accepted"
    );
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path()).await;
    let report = run_scenario(
        &server,
        "backlog",
        &["--recipients", "5", "--per-user", "20"],
    )
    .await;
    let accounting = report
        .accounting
        .as_ref()
        .expect("backlog reports accounting");
    assert_eq!(accounting.accepted, 100);
    assert_eq!(
        accounting.lost, 0,
        "lost messages: {:?}",
        accounting.lost_examples
    );
    assert_eq!(accounting.duplicates_on_connection, 0);
    assert!(report.drain_s.is_some());
    assert!(!report.failed());
    server.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storms_lose_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_server(dir.path()).await;
    let args = [
        "--recipients",
        "5",
        "--rate",
        "300",
        "--duration",
        "2s",
        "--interval",
        "500ms",
    ];
    let report = run_scenario(&server, "reconnect", &args).await;
    let accounting = report
        .accounting
        .as_ref()
        .expect("reconnect reports accounting");
    assert!(accounting.accepted > 0);
    assert_eq!(
        accounting.lost, 0,
        "lost messages: {:?}",
        accounting.lost_examples
    );
    assert_eq!(accounting.duplicates_on_connection, 0);
    assert!(report.storms.unwrap_or(0) >= 1, "no storm ran: {report:?}");
    assert_eq!(report.reconnects, Some(report.storms.unwrap() * 5));
    assert!(!report.failed());
    server.stop().await.expect("clean shutdown");
}
