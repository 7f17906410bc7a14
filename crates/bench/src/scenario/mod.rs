//! The four workloads, and the receiver and sender pools they share.

mod backlog;
mod idle;
mod online;
mod reconnect;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::options::{Options, Scenario, Target, Via};
use crate::payload::MessageKey;
use crate::routing::{self, Control, ReceiverOutcome, SendPlan, Users};
use crate::soketi::{SoketiConfig, SoketiPublisher};
use crate::soketi_load;
use crate::stats::{Accounting, Counters, Report};

/// How long minted tokens stay valid; longer than any run.
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);

/// Runs the scenario that `options` names and returns its report.
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    options.validate()?;
    match options.scenario {
        Scenario::Online => online::run(options).await,
        Scenario::Backlog => backlog::run(options).await,
        Scenario::Idle => idle::run(options).await,
        Scenario::Reconnect => reconnect::run(options).await,
    }
}

/// A pool of receiving connections, one task each, steered through a `watch` channel.
struct Receivers {
    tasks: Vec<JoinHandle<ReceiverOutcome>>,
    control: watch::Sender<Control>,
    gate: Arc<Semaphore>,
    counters: Arc<Counters>,
    soketi: Arc<SoketiConfig>,
}

/// Messages all receivers of a run got.
#[derive(Debug, Default)]
struct Received {
    keys: Vec<MessageKey>,
    duplicates_on_connection: u64,
    redeliveries: u64,
    sessions: u64,
}

impl Receivers {
    fn new(options: &Options, counters: &Arc<Counters>) -> Self {
        Self {
            tasks: Vec::new(),
            control: watch::channel(Control::default()).0,
            gate: Arc::new(Semaphore::new(options.connect_concurrency.max(1))),
            counters: counters.clone(),
            soketi: Arc::new(SoketiConfig::default()),
        }
    }

    /// Starts one receiver for each of `users`; they connect in the background.
    fn add(&mut self, options: &Options, users: &[String]) -> anyhow::Result<()> {
        for user in users {
            let control = self.control.subscribe();
            let task = match options.target {
                Target::Routing => tokio::spawn(routing::run_receiver(
                    options.ws.clone(),
                    routing::mint_token(&options.jwt_secret, user, TOKEN_TTL)?,
                    self.counters.clone(),
                    control,
                    self.gate.clone(),
                )),
                Target::Soketi => tokio::spawn(soketi_load::run_receiver(
                    self.soketi.clone(),
                    user.clone(),
                    self.counters.clone(),
                    control,
                    self.gate.clone(),
                )),
            };
            self.tasks.push(task);
        }
        Ok(())
    }

    /// Waits until every receiver is connected; fails after `timeout`.
    async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let expected = self.tasks.len() as u64;
        let all = self
            .counters
            .wait_until(timeout, |counters| {
                Counters::get(&counters.connected) >= expected
            })
            .await;
        if !all {
            anyhow::bail!(
                "only {} of {expected} receivers connected within {timeout:?}",
                Counters::get(&self.counters.connected)
            );
        }
        Ok(())
    }

    /// Makes every receiver drop its connection and open a new one.
    fn reconnect_all(&self) {
        self.control.send_modify(|control| control.generation += 1);
    }

    /// Stops every receiver and collects what they saw.
    async fn stop(self) -> anyhow::Result<Received> {
        self.control.send_modify(|control| control.stop = true);
        let mut received = Received::default();
        for task in self.tasks {
            let outcome = task.await?;
            received.keys.extend(outcome.keys);
            received.duplicates_on_connection += outcome.duplicates_on_connection;
            received.redeliveries += outcome.redeliveries;
            received.sessions += outcome.sessions;
        }
        Ok(received)
    }
}

/// Runs `options.senders` senders on `workload` until it ends and returns
/// the keys of every accepted message.
async fn run_senders(
    options: &Options,
    users: &Users,
    recipients: &Arc<Vec<String>>,
    counters: &Arc<Counters>,
    workload: routing::Workload,
) -> anyhow::Result<Vec<MessageKey>> {
    let plan = SendPlan {
        counters: counters.clone(),
        recipients: recipients.clone(),
        senders: options.senders,
        payload_bytes: options.payload_bytes,
        workload,
        drain_timeout: options.drain_timeout,
    };
    let http = routing::http_client(options.senders)?;
    let publisher =
        (options.target == Target::Soketi).then(|| SoketiPublisher::new(&SoketiConfig::default()));
    let mut tasks = Vec::with_capacity(options.senders);
    for index in 0..options.senders {
        let plan = plan.clone();
        let task = match (&publisher, options.via) {
            (Some(publisher), _) => {
                tokio::spawn(soketi_load::run_sender(publisher.clone(), index, plan))
            }
            (None, via) => {
                let token =
                    routing::mint_token(&options.jwt_secret, &users.sender(index), TOKEN_TTL)?;
                match via {
                    Via::Http => tokio::spawn(routing::run_http_sender(
                        http.clone(),
                        options.api.clone(),
                        token,
                        index,
                        plan,
                    )),
                    Via::Ws => tokio::spawn(routing::run_ws_sender(
                        options.ws.clone(),
                        token,
                        index,
                        options.ws_window,
                        plan,
                    )),
                }
            }
        };
        tasks.push(task);
    }
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await?);
    }
    Ok(accepted)
}

/// Returns the time between two messages of one sender for the total `--rate`, or `None` for full speed.
fn sender_period(options: &Options) -> Option<Duration> {
    (options.rate > 0)
        .then(|| Duration::from_secs_f64(options.senders as f64 / options.rate as f64))
}

/// Compares accepted with received messages and prints any loss loudly on stderr.
fn account(accepted: Vec<MessageKey>, received: Received) -> Accounting {
    let mut accounting = Accounting::compare(accepted, received.keys);
    accounting.duplicates_on_connection = received.duplicates_on_connection;
    accounting.redeliveries_after_reconnect = received.redeliveries;
    if accounting.lost > 0 {
        eprintln!();
        eprintln!(
            "!!! LOST {} OF {} ACCEPTED MESSAGES !!!",
            accounting.lost, accounting.accepted
        );
        eprintln!(
            "!!! first lost (sender:counter): {} !!!",
            accounting.lost_examples.join(" ")
        );
        eprintln!();
    }
    if accounting.duplicates_on_connection > 0 {
        eprintln!(
            "!!! {} MESSAGES ARRIVED TWICE OR OUT OF ORDER ON ONE CONNECTION !!!",
            accounting.duplicates_on_connection
        );
    }
    accounting
}
