//! Wiring, start and graceful shutdown.

use crate::config::Config;

/// Runs the servers that `roles` names until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("not wired yet")
}
