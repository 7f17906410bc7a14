//! The scenarios' receivers and senders for soketi, built on the `soketi`
//! module and reporting into the same [`Counters`] as the routing-service ones.
//! soketi has no seq and stores nothing, so a receiver only counts payloads.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, watch};

use crate::payload::{self, MessageKey, message_key};
use crate::routing::{Control, ReceiverOutcome, Schedule, SendPlan, log_error};
use crate::soketi::{SoketiConfig, SoketiPublisher, open_receiver};
use crate::stats::Counters;

/// Latencies kept by a receiver before they go to the shared histogram.
const LATENCY_BATCH: usize = 64;

/// Receives on `private-user-<user>` until [`Control::stop`] is set. Does not reconnect:
/// a lost connection ends the receiver and counts as a connection error.
pub async fn run_receiver(
    config: Arc<SoketiConfig>,
    user: String,
    counters: Arc<Counters>,
    mut control: watch::Receiver<Control>,
    gate: Arc<Semaphore>,
) -> ReceiverOutcome {
    let mut outcome = ReceiverOutcome::default();
    let opened = {
        let _permit = gate.acquire().await;
        open_receiver(&config, &user).await
    };
    let mut receiver = match opened {
        Ok(receiver) => receiver,
        Err(err) => {
            Counters::bump(&counters.connection_errors);
            log_error(format_args!(
                "soketi receiver for {user} failed to open: {err:#}"
            ));
            return outcome;
        }
    };
    outcome.sessions = 1;
    Counters::bump(&counters.opened);
    Counters::bump(&counters.connected);

    let mut latencies = Vec::new();
    // Ends on stop or when the connection ends.
    loop {
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() || control.borrow_and_update().stop {
                    break;
                }
            }
            next = receiver.next_payload() => {
                match next {
                    Ok(Some(data)) => match payload::decode(&data) {
                        Some(stamp) => {
                            latencies.push(payload::now_ns().saturating_sub(stamp.sent_ns) / 1000);
                            outcome.keys.push(stamp.key);
                            Counters::bump(&counters.delivered);
                            if latencies.len() >= LATENCY_BATCH {
                                counters.record_latencies(&mut latencies);
                            }
                        }
                        None => log_error(format_args!("a soketi event without a bench payload: {data}")),
                    },
                    Ok(None) => {
                        Counters::bump(&counters.connection_errors);
                        log_error(format_args!("soketi closed the receiver for {user}"));
                        break;
                    }
                    Err(err) => {
                        Counters::bump(&counters.connection_errors);
                        log_error(format_args!("soketi receiver for {user} failed: {err:#}"));
                        break;
                    }
                }
            }
        }
    }
    counters.record_latencies(&mut latencies);
    counters
        .connected
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    outcome
}

/// Publishes through the events API, one request at a time, and returns the
/// keys of the events soketi accepted.
pub async fn run_sender(
    publisher: SoketiPublisher,
    index: usize,
    plan: SendPlan,
) -> Vec<MessageKey> {
    let schedule = Schedule {
        plan: &plan,
        index,
        start: Instant::now(),
    };
    let counters = &plan.counters;
    let mut buffer = Vec::new();
    let mut accepted = Vec::new();
    let mut counter = 0u64;
    // Bounded by the workload: a deadline or a fixed count.
    while let Some((recipient, sent_ns)) = schedule.next(counter).await {
        let data = payload::encode(
            index as u32,
            counter,
            plan.payload_bytes,
            sent_ns,
            &mut buffer,
        );
        match publisher.publish(recipient, &data).await {
            Ok(()) => {
                accepted.push(message_key(index as u32, counter));
                Counters::bump(&counters.accepted);
            }
            // NOTE: `publish` returns one error type for a non-2xx status and
            // for a transport failure, so both count as rejected here.
            Err(err) => {
                Counters::bump(&counters.rejected);
                log_error(format_args!("soketi publish failed: {err:#}"));
            }
        }
        counter += 1;
    }
    accepted
}
