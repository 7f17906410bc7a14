//! routing-bench: the load generator of routing-service, with soketi as a
//! same-run peer. Each scenario is a library function, so tests can run it
//! against an in-process server:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use clap::Parser as _;
//! let options = routing_bench::Options::try_parse_from([
//!     "routing-bench", "online", "--duration", "2s", "--jwt-secret", "a-secret-of-at-least-32-bytes-long",
//! ])?;
//! let report = routing_bench::run(&options).await?;
//! assert!(!report.failed());
//! # Ok(()) }
//! ```

pub mod options;
pub mod payload;
pub mod routing;
mod scenario;
pub mod soketi;
pub mod soketi_load;
pub mod stats;

pub use options::{Options, Scenario, Target, Via};
pub use scenario::run;
pub use stats::{Accounting, Latency, Report};
