//! Traffic to routing-service: tokens, WebSocket receivers that ack as they
//! go, and senders over HTTP or WebSocket. These bypass `routing-client` and
//! parse only the fields they need, so the load generator stays cheaper per
//! message than the server it measures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::payload::{self, MessageKey, message_key};
use crate::stats::Counters;

/// A client WebSocket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a WebSocket handshake plus `welcome` may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Failed connection attempts in a row after which a receiver gives up.
const MAX_CONNECT_FAILURES: u32 = 20;
/// Max frames handled before an ack is sent. It stays below the server's
/// default `websocket.max_unacked` of 1000, so deliveries do not stall on acks.
const ACK_BATCH: usize = 256;
/// Errors printed on stderr per run; later ones are only counted.
const LOGGED_ERRORS: u64 = 20;

static ERRORS_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Prints an error on stderr unless `LOGGED_ERRORS` were printed already.
pub fn log_error(message: std::fmt::Arguments<'_>) {
    let logged = ERRORS_LOGGED.fetch_add(1, Ordering::Relaxed);
    if logged < LOGGED_ERRORS {
        eprintln!("error: {message}");
    } else if logged == LOGGED_ERRORS {
        eprintln!("error: more errors follow; only their counts are reported");
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

/// Mints an HS256 token for `user`, valid for `ttl`, as routing-service's
/// `token` command does.
pub fn mint_token(secret: &str, user: &str, ttl: Duration) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())
        .map_err(|err| anyhow::anyhow!("invalid JWT secret: {err}"))?;
    let claims = Claims {
        sub: user,
        exp: now + ttl.as_secs(),
        iat: now,
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )?)
}

/// User ids of one run, prefixed so that runs against one server never share
/// a mailbox.
#[derive(Debug, Clone)]
pub struct Users {
    prefix: String,
}

impl Users {
    /// Ids for a new run.
    pub fn new() -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis())
            .unwrap_or(0);
        Self {
            prefix: format!("bench{millis:x}"),
        }
    }

    /// Returns the id of recipient `index`.
    pub fn recipient(&self, index: usize) -> String {
        format!("{}-r{index}", self.prefix)
    }

    /// Returns the id of sender `index`.
    pub fn sender(&self, index: usize) -> String {
        format!("{}-s{index}", self.prefix)
    }
}

impl Default for Users {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens `<ws_base>/connect` with the token in the `Authorization` header and
/// waits for the `welcome` frame.
pub async fn connect(ws_base: &str, token: &str) -> anyhow::Result<Socket> {
    let base = ws_base.trim_end_matches('/');
    let base = base.strip_suffix("/connect").unwrap_or(base);
    let mut request = format!("{base}/connect").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let handshake = async {
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(socket_config()), true)
                .await?;
        // Bounded by HANDSHAKE_TIMEOUT around this block.
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: FrameHead<'_> = serde_json::from_str(&text)?;
                    if frame.kind == "welcome" {
                        return Ok(socket);
                    }
                    anyhow::bail!("expected a welcome frame first, got {text}");
                }
                Some(Ok(Message::Close(frame))) => {
                    anyhow::bail!("the server closed the connection before welcome: {frame:?}")
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.into()),
                None => anyhow::bail!("the connection ended before welcome"),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| anyhow::anyhow!("no welcome within {HANDSHAKE_TIMEOUT:?}"))?
}

/// WebSocket settings for many mostly idle sockets: tungstenite's default
/// 128 KiB read buffer would take about 2 GiB at 15,000 connections.
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// The fields of a server frame that the load generator reads.
#[derive(Deserialize)]
struct FrameHead<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    envelope: Option<EnvelopeHead<'a>>,
    #[serde(default, rename = "messageId", borrow)]
    message_id: Option<&'a str>,
}

#[derive(Deserialize)]
struct EnvelopeHead<'a> {
    #[serde(default, rename = "encryptedData", borrow)]
    encrypted_data: Option<&'a str>,
}

/// Commands to receivers, sent through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Control {
    /// Bumped to make every receiver drop its connection and open a new one.
    pub generation: u64,
    /// Set to make every receiver close and return.
    pub stop: bool,
}

/// Messages one receiver got. Latencies go to the shared histogram in [`Counters`].
#[derive(Debug, Default)]
pub struct ReceiverOutcome {
    /// Keys of first deliveries.
    pub keys: Vec<MessageKey>,
    /// A seq at or below the previous one on the same connection.
    pub duplicates_on_connection: u64,
    /// A seq already delivered on an earlier connection.
    pub redeliveries: u64,
    /// Connections opened.
    pub sessions: u64,
}

/// The reason a receiver's connection ended.
enum SessionEnd {
    Stop,
    Reconnect,
    Lost,
}

/// State a receiver keeps across its connections.
struct ReceiverState {
    outcome: ReceiverOutcome,
    /// Highest seq delivered on any connection of this recipient.
    max_seq: u64,
    /// Highest seq delivered on the current connection.
    connection_seq: u64,
    /// Latencies not yet recorded in the shared histogram, in microseconds.
    latencies: Vec<u64>,
    counters: Arc<Counters>,
}

impl ReceiverState {
    /// Handles one frame; returns false when the connection ended.
    fn handle(&mut self, message: Message) -> bool {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => {
                if frame
                    .as_ref()
                    .is_some_and(|frame| u16::from(frame.code) != 1000)
                {
                    log_error(format_args!("the server closed a receiver: {frame:?}"));
                }
                return false;
            }
            _ => return true,
        };
        let frame: FrameHead<'_> = match serde_json::from_str(&text) {
            Ok(frame) => frame,
            Err(err) => {
                log_error(format_args!(
                    "invalid frame from the server ({err}): {text}"
                ));
                return true;
            }
        };
        match frame.kind {
            "message" => {
                let seq = frame.seq.unwrap_or(0);
                if seq <= self.connection_seq {
                    self.outcome.duplicates_on_connection += 1;
                    log_error(format_args!(
                        "seq {seq} arrived after seq {} on the same connection",
                        self.connection_seq
                    ));
                    return true;
                }
                self.connection_seq = seq;
                if seq <= self.max_seq {
                    self.outcome.redeliveries += 1;
                    return true;
                }
                self.max_seq = seq;
                let stamp = frame
                    .envelope
                    .and_then(|envelope| envelope.encrypted_data)
                    .and_then(payload::decode);
                match stamp {
                    Some(stamp) => {
                        let latency_ns = payload::now_ns().saturating_sub(stamp.sent_ns);
                        self.latencies.push(latency_ns / 1000);
                        self.outcome.keys.push(stamp.key);
                    }
                    None => log_error(format_args!("a message without a bench payload: {text}")),
                }
                Counters::bump(&self.counters.delivered);
            }
            "error" => log_error(format_args!("error frame on a receiver: {text}")),
            _ => {}
        }
        true
    }
}

/// Receives as one recipient until [`Control::stop`] is set: connects, reads messages,
/// acks after each batch, and reconnects when the generation changes or the
/// connection is lost. `gate` bounds the handshakes in progress at once.
pub async fn run_receiver(
    ws_base: String,
    token: String,
    counters: Arc<Counters>,
    mut control: watch::Receiver<Control>,
    gate: Arc<Semaphore>,
) -> ReceiverOutcome {
    let mut state = ReceiverState {
        outcome: ReceiverOutcome::default(),
        max_seq: 0,
        connection_seq: 0,
        latencies: Vec::new(),
        counters: counters.clone(),
    };
    let mut generation = control.borrow().generation;
    let mut failures = 0;

    // Ends on stop, or after MAX_CONNECT_FAILURES failed connects in a row.
    while !control.borrow().stop {
        let socket = {
            let _permit = gate.acquire().await;
            connect(&ws_base, &token).await
        };
        let mut socket = match socket {
            Ok(socket) => socket,
            Err(err) => {
                Counters::bump(&counters.connection_errors);
                failures += 1;
                log_error(format_args!(
                    "receiver connect failed (attempt {failures}): {err:#}"
                ));
                if failures >= MAX_CONNECT_FAILURES {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
                continue;
            }
        };
        failures = 0;
        state.connection_seq = 0;
        state.outcome.sessions += 1;
        Counters::bump(&counters.opened);
        Counters::bump(&counters.connected);

        let end = read_session(&mut socket, &mut state, &mut control, &mut generation).await;
        counters.connected.fetch_sub(1, Ordering::Relaxed);
        match end {
            SessionEnd::Stop => {
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
                break;
            }
            // Dropping the socket without a close frame, as a network failure would.
            SessionEnd::Reconnect => drop(socket),
            SessionEnd::Lost => {
                Counters::bump(&counters.connection_errors);
                if !control.borrow().stop {
                    log_error(format_args!(
                        "a receiver's connection was lost; reconnecting"
                    ));
                }
            }
        }
    }
    counters.record_latencies(&mut state.latencies);
    state.outcome
}

/// Reads one connection until it ends or the control changes.
async fn read_session(
    socket: &mut Socket,
    state: &mut ReceiverState,
    control: &mut watch::Receiver<Control>,
    generation: &mut u64,
) -> SessionEnd {
    let mut acked = 0;
    // Ends when the connection ends or the control is set to stop or reconnect.
    loop {
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() {
                    return SessionEnd::Stop;
                }
                let now = *control.borrow_and_update();
                if now.stop {
                    return SessionEnd::Stop;
                }
                if now.generation != *generation {
                    *generation = now.generation;
                    return SessionEnd::Reconnect;
                }
            }
            next = socket.next() => {
                let Some(Ok(message)) = next else { return SessionEnd::Lost };
                if !state.handle(message) {
                    return SessionEnd::Lost;
                }
                // Handle what is already buffered, then ack it all at once.
                for _ in 0..ACK_BATCH {
                    match socket.next().now_or_never() {
                        Some(Some(Ok(message))) => {
                            if !state.handle(message) {
                                return SessionEnd::Lost;
                            }
                        }
                        Some(_) => return SessionEnd::Lost,
                        None => break,
                    }
                }
                state.counters.record_latencies(&mut state.latencies);
                if state.connection_seq > acked {
                    acked = state.connection_seq;
                    let ack = format!(r#"{{"type":"ack","upToSeq":{acked}}}"#);
                    if socket.send(Message::Text(ack.into())).await.is_err() {
                        return SessionEnd::Lost;
                    }
                }
            }
        }
    }
}

/// The messages a sender sends.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Until `deadline`, paced to `period` per message when given.
    Timed {
        deadline: Instant,
        period: Option<Duration>,
    },
    /// Items taken from a shared counter until `total` were taken; item `i`
    /// goes to recipient `i % recipients`.
    Fixed { next: Arc<AtomicU64>, total: u64 },
}

/// Settings and counters shared by every sender of a run.
#[derive(Debug, Clone)]
pub struct SendPlan {
    pub counters: Arc<Counters>,
    /// Recipient user ids.
    pub recipients: Arc<Vec<String>>,
    pub senders: usize,
    pub payload_bytes: usize,
    pub workload: Workload,
    /// How long to wait for responses still in flight after the last send.
    pub drain_timeout: Duration,
}

/// Paces and picks messages for one sender.
pub(crate) struct Schedule<'a> {
    pub(crate) plan: &'a SendPlan,
    pub(crate) index: usize,
    pub(crate) start: Instant,
}

impl Schedule<'_> {
    /// Waits until message `counter` is due and returns its recipient and
    /// its send time for the payload; `None` when done.
    ///
    /// At a fixed rate the send time is the time the message was due, not
    /// the time it went out. A sender that falls behind its pace (because
    /// the server responds slowly) therefore counts the wait in the latency,
    /// as a client at that rate would see it.
    pub(crate) async fn next(&self, counter: u64) -> Option<(&str, u64)> {
        let recipients = &self.plan.recipients;
        match &self.plan.workload {
            Workload::Timed { deadline, period } => {
                let mut sent_ns = None;
                if let Some(period) = period {
                    // Senders are offset by a fraction of the period each, so
                    // the run sends evenly spaced messages rather than one
                    // burst from every sender at once per period.
                    let phase = self.index as f64 / self.plan.senders as f64;
                    let due = self.start + period.mul_f64(counter as f64 + phase);
                    tokio::time::sleep_until(due.into()).await;
                    sent_ns = Some(payload::ns_at(due));
                }
                if Instant::now() >= *deadline {
                    return None;
                }
                let global = counter as usize * self.plan.senders + self.index;
                let sent_ns = sent_ns.unwrap_or_else(payload::now_ns);
                Some((&recipients[global % recipients.len()], sent_ns))
            }
            Workload::Fixed { next, total } => {
                let item = next.fetch_add(1, Ordering::Relaxed);
                (item < *total).then(|| {
                    let recipient = recipients[item as usize % recipients.len()].as_str();
                    (recipient, payload::now_ns())
                })
            }
        }
    }

    fn paced(&self) -> bool {
        matches!(
            self.plan.workload,
            Workload::Timed {
                period: Some(_),
                ..
            }
        )
    }
}

/// Builds the JSON body of one envelope.
fn envelope_json(recipient: &str, sender: usize, counter: u64, data: &str) -> String {
    format!(
        r#"{{"recipientId":"{recipient}","messageId":"m{sender}.{counter}","encryptedData":"{data}"}}"#
    )
}

/// Sends with `POST /send`, one request at a time, and returns the keys of
/// accepted messages.
pub async fn run_http_sender(
    client: reqwest::Client,
    api_base: String,
    token: String,
    index: usize,
    plan: SendPlan,
) -> Vec<MessageKey> {
    let url = format!("{}/send", api_base.trim_end_matches('/'));
    let authorization = format!("Bearer {token}");
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
        let body = envelope_json(recipient, index, counter, &data);
        let response = client
            .post(&url)
            .header("authorization", &authorization)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status().as_u16() == 202 => {
                // Read the body so the connection goes back to the pool.
                let _ = response.bytes().await;
                accepted.push(message_key(index as u32, counter));
                Counters::bump(&counters.accepted);
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                Counters::bump(&counters.rejected);
                log_error(format_args!("POST /send returned {status}: {text}"));
            }
            Err(err) => {
                Counters::bump(&counters.send_errors);
                log_error(format_args!("POST /send failed: {err}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        counter += 1;
    }
    accepted
}

/// Sends `send` frames on one WebSocket with up to `window` unanswered, and
/// returns the keys that the server confirmed with a `sent` frame.
pub async fn run_ws_sender(
    ws_base: String,
    token: String,
    index: usize,
    window: usize,
    plan: SendPlan,
) -> Vec<MessageKey> {
    let counters = plan.counters.clone();
    let socket = match connect(&ws_base, &token).await {
        Ok(socket) => socket,
        Err(err) => {
            Counters::bump(&counters.connection_errors);
            log_error(format_args!("sender {index} could not connect: {err:#}"));
            return Vec::new();
        }
    };
    let (mut sink, mut stream) = socket.split();
    let window = window.max(1);
    let permits = Arc::new(Semaphore::new(window));
    let accepted = Arc::new(Mutex::new(Vec::new()));

    let reader = {
        let permits = permits.clone();
        let accepted = accepted.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            // Ends when the connection closes; the writer closes it after the drain.
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(frame) = serde_json::from_str::<FrameHead<'_>>(&text) else {
                    log_error(format_args!("invalid frame on a sender: {text}"));
                    continue;
                };
                match frame.kind {
                    "sent" => {
                        let key = frame.message_id.and_then(parse_message_id);
                        match key {
                            Some(key) => accepted.lock().expect("not poisoned").push(key),
                            None => {
                                log_error(format_args!("sent frame with an unknown id: {text}"))
                            }
                        }
                        Counters::bump(&counters.accepted);
                        permits.add_permits(1);
                    }
                    "error" => {
                        Counters::bump(&counters.rejected);
                        log_error(format_args!("send frame rejected: {text}"));
                        if frame.message_id.is_some() {
                            permits.add_permits(1);
                        }
                    }
                    _ => {}
                }
            }
        })
    };

    let schedule = Schedule {
        plan: &plan,
        index,
        start: Instant::now(),
    };
    let mut buffer = Vec::new();
    let mut counter = 0u64;
    let mut unflushed = 0;
    // Bounded by the workload: a deadline or a fixed count.
    while let Some((recipient, sent_ns)) = schedule.next(counter).await {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if sink.flush().await.is_err() {
                    break;
                }
                unflushed = 0;
                match tokio::time::timeout(plan.drain_timeout, permits.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        log_error(format_args!(
                            "sender {index}: no answer to {window} sends within {:?}",
                            plan.drain_timeout
                        ));
                        break;
                    }
                }
            }
        };
        permit.forget();
        let data = payload::encode(
            index as u32,
            counter,
            plan.payload_bytes,
            sent_ns,
            &mut buffer,
        );
        let frame = format!(
            r#"{{"type":"send","envelope":{}}}"#,
            envelope_json(recipient, index, counter, &data)
        );
        if let Err(err) = sink.feed(Message::Text(frame.into())).await {
            Counters::bump(&counters.send_errors);
            log_error(format_args!("sender {index} write failed: {err}"));
            break;
        }
        unflushed += 1;
        if schedule.paced() || unflushed >= 64 {
            if sink.flush().await.is_err() {
                break;
            }
            unflushed = 0;
        }
        counter += 1;
    }
    let _ = sink.flush().await;

    // All permits back means the server responded to every send.
    let drained =
        tokio::time::timeout(plan.drain_timeout, permits.acquire_many(window as u32)).await;
    if drained.is_err() {
        log_error(format_args!(
            "sender {index}: some sends were not answered within {:?}",
            plan.drain_timeout
        ));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    if tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .is_err()
    {
        log_error(format_args!(
            "sender {index}: the server did not close the connection"
        ));
    }
    std::mem::take(&mut *accepted.lock().expect("not poisoned"))
}

/// Parses a `m<sender>.<counter>` message id back into its key.
fn parse_message_id(id: &str) -> Option<MessageKey> {
    let (sender, counter) = id.strip_prefix('m')?.split_once('.')?;
    Some(message_key(sender.parse().ok()?, counter.parse().ok()?))
}

/// Builds a keep-alive HTTP client for `senders` concurrent senders that never uses a proxy.
pub fn http_client(senders: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(senders)
        .timeout(Duration::from_secs(30))
        .build()?)
}
