//! One WebSocket connection: the stored backlog, then live messages, in seq
//! order with no duplicate, within the `max_unacked` window.
//!
//! The connection registers in the hub before it reads the mailbox, so a
//! message stored after the read arrives live. It tracks `sent_through`,
//! the highest seq it wrote, and drops a live message at or below it as a
//! duplicate. A live message above `sent_through + 1`, a full window or a
//! lagged queue switches the connection to catching up, which reads the
//! mailbox from `sent_through` until it reaches the end.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use routing_protocol::frame::{close_code, message_frame_json};
use routing_protocol::{Address, ClientFrame, ErrorCode, ServerFrame};
use tokio_util::sync::CancellationToken;

use super::RealtimeState;
use super::hub::{LiveMessage, Registration};
use crate::auth::Identity;
use crate::config::{Config, StoreKind};
use crate::error::ApiError;
use crate::mailbox::AckTarget;
use crate::presence::{InstanceId, LOOKUP_CACHE_TTL};
use crate::router::{Accepted, Router, format_received_at, unix_millis};
use crate::telemetry;

/// The latest token-expiry deadline a connection sets; a later `exp` is
/// treated as this far away.
const FARTHEST_DEADLINE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a connection waits to read its backlog again after a failed read.
const BACKLOG_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long after the presence cache TTL the first resync runs.
const RESYNC_MARGIN: Duration = Duration::from_millis(250);
/// Messages read from the mailbox per page while catching up.
const BACKLOG_PAGE: usize = 256;
/// Consecutive frames that are not of this protocol before the server closes with 1008.
const MAX_BAD_FRAMES: u32 = 3;
/// Consecutive rate-limited sends before the server closes with 4029.
const MAX_RATE_LIMITED: u32 = 20;
/// `send` and `ack` frames of one connection that may wait for the store at
/// once. While this many wait, the connection reads no more frames.
const MAX_PENDING_FRAMES: usize = 64;
/// How long a live message that arrived ahead of a missing seq waits for
/// it, because two senders' messages to one recipient may be published out
/// of seq order. After this wait the connection reads the mailbox. On one
/// saturated core a 10 ms wait ran out about 200 times a second; 50 ms did not.
const GAP_WAIT: Duration = Duration::from_millis(50);
/// Out-of-order live messages a connection keeps. One more switches it to
/// catching up.
const MAX_OUT_OF_ORDER: usize = super::hub::CONNECTION_QUEUE;
/// How long the server waits to deliver its close frame. A slow consumer's
/// close frame waits behind the frames already queued, so this is generous.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server then waits for the client's close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// The reason the connection loop ended, as a close code and reason.
struct Closing {
    code: u16,
    reason: &'static str,
}

impl Closing {
    fn new(code: u16, reason: &'static str) -> Self {
        Self { code, reason }
    }

    /// Creates the reason for a peer that is gone or a socket that failed,
    /// where no close frame can be sent.
    fn gone() -> Self {
        Self {
            code: 0,
            reason: "",
        }
    }
}

/// The result of a `send` or `ack` that went through the router.
enum FrameResult {
    Send(Result<Accepted, ApiError>),
    Ack(Result<u64, ApiError>),
}

/// A `send` or `ack` on its way through the router.
type PendingFuture = Pin<Box<dyn Future<Output = FrameResult> + Send>>;

/// The details of a pending frame that its reply needs.
enum PendingFrame {
    Send {
        message_id: Option<String>,
        /// The canonical recipient, when the envelope names a valid one.
        recipient: Option<Address>,
    },
    Ack {
        up_to_seq: u64,
    },
}

/// Frames that wait for the store, replied to in the order they arrived.
struct PendingFrames {
    results: FuturesOrdered<PendingFuture>,
    /// One entry per future in `results`, in the same order.
    frames: VecDeque<PendingFrame>,
}

/// The delivery path of a message, as the `path` label of
/// `routing_messages_delivered_total`.
#[derive(Debug, Clone, Copy)]
enum DeliveryPath {
    Live,
    Backlog,
}

/// A source that is ready, handled next by the connection loop.
enum Event {
    Shutdown,
    Timer,
    Incoming(Option<Result<Message, axum::Error>>),
    Reply(FrameResult),
    Signals,
    Backlog,
}

/// The deadlines a connection waits for besides its socket and signals,
/// served by one timer. The intervals are read from the configuration.
struct Timers {
    /// When the token's `exp` passes.
    token_deadline: tokio::time::Instant,
    next_ping: tokio::time::Instant,
    next_resync: tokio::time::Instant,
}

impl Timers {
    fn new(token_deadline: tokio::time::Instant, ping_interval: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            token_deadline,
            next_ping: now + ping_interval,
            // The first resync catches messages routed with a cached
            // presence lookup from before this connection registered.
            next_resync: now + LOOKUP_CACHE_TTL + RESYNC_MARGIN,
        }
    }

    /// Returns the earliest deadline, counting a pending backlog retry and
    /// the wait for a missing seq.
    fn next_deadline(
        &self,
        backlog_retry_at: Option<tokio::time::Instant>,
        gap_deadline: Option<tokio::time::Instant>,
    ) -> tokio::time::Instant {
        let earliest = self
            .token_deadline
            .min(self.next_ping)
            .min(self.next_resync);
        [backlog_retry_at, gap_deadline]
            .into_iter()
            .flatten()
            .fold(earliest, tokio::time::Instant::min)
    }
}

/// Live messages that arrived ahead of a lower seq, in seq order, kept until
/// the missing ones arrive or `deadline` passes.
struct OutOfOrder {
    messages: BTreeMap<u64, LiveMessage>,
    deadline: tokio::time::Instant,
}

impl OutOfOrder {
    fn new(deadline: tokio::time::Instant) -> Self {
        Self {
            messages: BTreeMap::new(),
            deadline,
        }
    }

    /// Adds `message`, or returns false when the map is full.
    fn insert(&mut self, message: LiveMessage) -> bool {
        if self.messages.len() >= MAX_OUT_OF_ORDER && !self.messages.contains_key(&message.seq) {
            return false;
        }
        self.messages.insert(message.seq, message);
        true
    }

    /// Removes and returns the message with `seq`. Messages below it were
    /// already written, so they are dropped.
    fn take(&mut self, seq: u64) -> Option<LiveMessage> {
        while let Some(entry) = self.messages.first_entry() {
            match entry.key().cmp(&seq) {
                std::cmp::Ordering::Less => {
                    entry.remove();
                }
                std::cmp::Ordering::Equal => return Some(entry.remove()),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// Everything a connection keeps while it is open. Its task's future
/// contains this struct once, next to the timer. The socket is not split, because a
/// split moves it behind a shared lock of its own. The user is read from
/// the registration, and the connection id is formatted only where it is
/// sent or logged.
struct Connection {
    socket: WebSocket,
    registration: Registration,
    router: Arc<Router>,
    config: Arc<Config>,
    instance_id: InstanceId,
    /// Checked whenever the connection wakes. The server wakes every
    /// connection through the hub after cancelling it.
    shutdown: CancellationToken,
    timers: Timers,
    /// Created at the first `send` or `ack`, so idle connections do not carry it.
    pending: Option<Box<PendingFrames>>,
    /// Seqs written and not yet acknowledged, oldest first.
    in_flight: VecDeque<u64>,
    sent_through: u64,
    catching_up: bool,
    bad_frames: u32,
    rate_limited: u32,
    last_seen: Instant,
    /// When a failed backlog read is tried again.
    backlog_retry_at: Option<tokio::time::Instant>,
    /// Live messages waiting for a lower seq, created at the first gap.
    out_of_order: Option<Box<OutOfOrder>>,
}

/// Runs a connection until the client leaves, the token expires, or the
/// server shuts down.
pub fn run(
    socket: WebSocket,
    identity: Identity,
    registration: Registration,
    state: RealtimeState,
) -> impl Future<Output = ()> + Send + 'static {
    // The leeway applies when a token is checked, not here: the contract
    // closes the connection when `exp` passes on this server's clock.
    let timers = Timers::new(
        deadline_at(identity.expires_at),
        state.app.config.websocket.ping_interval,
    );
    let mut connection = Connection {
        socket,
        registration,
        router: state.app.router,
        config: state.app.config,
        instance_id: state.instance_id,
        shutdown: state.shutdown,
        timers,
        pending: None,
        in_flight: VecDeque::new(),
        sent_through: 0,
        catching_up: true,
        bad_frames: 0,
        rate_limited: 0,
        last_seen: Instant::now(),
        backlog_retry_at: None,
        out_of_order: None,
    };
    // An async block that captures the connection keeps it in place, while
    // an `async fn` taking `mut self` would hold a second copy of it.
    async move {
        connection.open().await;
        let closing = connection.serve().await;
        // Boxed, because closing runs once and its write futures are large.
        Box::pin(connection.close(closing)).await;
        connection.finish().await;
    }
}

impl Connection {
    /// Counts the connection and registers its user in presence.
    async fn open(&mut self) {
        metrics::gauge!(telemetry::CONNECTIONS_OPEN).increment(1.0);
        let user = self.registration.user();
        if let Err(err) = self
            .router
            .presence()
            .register(user, &self.instance_id)
            .await
        {
            tracing::warn!(error = %err, "presence register failed; live delivery to this connection may lag");
        }
        tracing::debug!(user = %user, connection_id = self.connection_id(), "connection opened");
    }

    /// Removes the user from presence and stops counting the connection.
    async fn finish(&mut self) {
        let user = self.registration.user();
        if let Err(err) = self
            .router
            .presence()
            .unregister(user, &self.instance_id)
            .await
        {
            tracing::warn!(error = %err, "presence unregister failed; the entry stays until it expires");
        }
        metrics::gauge!(telemetry::CONNECTIONS_OPEN).decrement(1.0);
        tracing::debug!(user = %user, connection_id = self.connection_id(), "connection closed");
    }

    /// Formats the id sent in the welcome frame from the instance id and
    /// the hub-wide id.
    fn connection_id(&self) -> String {
        format!("{}-{}", self.instance_id, self.registration.id())
    }

    /// Writes the welcome frame. The caller boxes this future, so the frame
    /// and the write futures do not grow the future that every idle
    /// connection keeps.
    async fn send_welcome(&mut self) -> Result<(), Closing> {
        let welcome = ServerFrame::Welcome {
            user_id: self.registration.user().as_str().to_owned(),
            connection_id: self.connection_id(),
        };
        self.write_frame(&welcome).await
    }

    async fn serve(&mut self) -> Closing {
        if let Err(closing) = Box::pin(self.send_welcome()).await {
            return closing;
        }

        // One timer stays registered across the loop, so a delivered
        // message does not register and remove it again.
        let timer = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(timer);

        loop {
            let event = std::future::poll_fn(|cx| self.poll_event(timer.as_mut(), cx)).await;
            if let Err(closing) = self.handle(event).await {
                return closing;
            }
            let deadline = self.next_deadline();
            if timer.is_elapsed() || timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
        }
    }

    /// Returns when the timer fires next: the earliest of the timers, a
    /// backlog retry and the wait for a missing seq.
    fn next_deadline(&self) -> tokio::time::Instant {
        let gap_deadline = self.out_of_order.as_ref().map(|kept| kept.deadline);
        self.timers
            .next_deadline(self.backlog_retry_at, gap_deadline)
    }

    /// Starts the handler of an event. Each handler is boxed, so the deep
    /// paths (a send goes through the router and the store) do not grow
    /// every idle connection's task. The event moves into the box, so it
    /// does not stay in the task while the handler runs.
    fn handle(
        &mut self,
        event: Event,
    ) -> Pin<Box<dyn Future<Output = Result<(), Closing>> + Send + '_>> {
        match event {
            Event::Shutdown => Box::pin(std::future::ready(Err(Closing::new(
                close_code::GOING_AWAY,
                "server shutting down",
            )))),
            Event::Timer => Box::pin(self.on_timer()),
            Event::Incoming(incoming) => Box::pin(self.on_incoming(incoming)),
            Event::Reply(result) => Box::pin(self.reply_to_ready_frames(result)),
            Event::Signals => Box::pin(self.on_signals()),
            Event::Backlog => Box::pin(self.send_backlog_page()),
        }
    }

    /// Polls the connection's sources in priority order and returns the
    /// first that is ready: shutdown, timer, client frame, reply to a
    /// pending frame, hub signals, then the backlog while catching up.
    ///
    /// A hand-written poll instead of `tokio::select!`, because the macro
    /// keeps its futures and its output in the task's state across every
    /// await of the loop.
    fn poll_event(
        &mut self,
        timer: Pin<&mut tokio::time::Sleep>,
        cx: &mut Context<'_>,
    ) -> Poll<Event> {
        // The server wakes every connection through the hub after it
        // cancels the token, so checking the token here is enough.
        if self.shutdown.is_cancelled() {
            return Poll::Ready(Event::Shutdown);
        }
        if timer.poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        let pending = self.pending_count();
        if pending < MAX_PENDING_FRAMES
            && let Poll::Ready(incoming) = self.socket.poll_next_unpin(cx)
        {
            return Poll::Ready(Event::Incoming(incoming));
        }
        if let Some(pending) = self.pending.as_mut()
            && let Poll::Ready(Some(result)) = pending.results.poll_next_unpin(cx)
        {
            return Poll::Ready(Event::Reply(result));
        }
        if self.registration.signals.poll_changed(cx).is_ready() {
            return Poll::Ready(Event::Signals);
        }
        if self.catching_up && self.window_room() > 0 {
            return Poll::Ready(Event::Backlog);
        }
        Poll::Pending
    }

    /// Handles every timer that is due: token expiry, ping, resync and the
    /// backlog retry.
    async fn on_timer(&mut self) -> Result<(), Closing> {
        let now = tokio::time::Instant::now();
        if now >= self.timers.token_deadline {
            return Err(Closing::new(close_code::TOKEN_EXPIRED, "token expired"));
        }
        let websocket = &self.config.websocket;
        let (ping_interval, resync_interval) = (websocket.ping_interval, websocket.resync_interval);
        if now >= self.timers.next_ping {
            self.timers.next_ping = now + ping_interval;
            self.on_ping_tick(ping_interval).await?;
        }
        if now >= self.timers.next_resync {
            self.timers.next_resync = now + resync_interval;
            // An ack event lost on the bus leaves the window full, so the
            // resync also rechecks what is still in flight.
            self.drop_deleted_in_flight().await;
            self.catching_up = true;
        }
        if self
            .backlog_retry_at
            .is_some_and(|retry_at| now >= retry_at)
        {
            self.backlog_retry_at = None;
            self.catching_up = true;
        }
        if self
            .out_of_order
            .as_ref()
            .is_some_and(|kept| now >= kept.deadline)
        {
            // The missing seq was not published to this connection, so it
            // is read from the mailbox. After a failed read that waits for
            // the retry, so a failing store is not read every GAP_WAIT.
            self.out_of_order = None;
            if self.backlog_retry_at.is_none() {
                self.catching_up = true;
            }
        }
        Ok(())
    }

    fn window_room(&self) -> usize {
        self.config
            .websocket
            .max_unacked
            .saturating_sub(self.in_flight.len())
    }

    async fn on_signals(&mut self) -> Result<(), Closing> {
        let signals = Arc::clone(&self.registration.signals);
        self.apply_ack(signals.acked.load(Ordering::Acquire));
        if signals.lagged.swap(false, Ordering::AcqRel) {
            self.catching_up = true;
        }
        if signals.acked_by_id.swap(false, Ordering::AcqRel) {
            Box::pin(self.drop_deleted_in_flight()).await;
        }
        let live = signals.take_live();
        if live.is_empty() {
            return Ok(());
        }
        self.send_live(live).await
    }

    /// Forgets in-flight seqs that are no longer stored, after an ack by
    /// message ids, which names no seq.
    async fn drop_deleted_in_flight(&mut self) {
        let (Some(&first), Some(&last)) = (self.in_flight.front(), self.in_flight.back()) else {
            return;
        };
        let max_envelope = self.config.limits.max_envelope_bytes;
        let limit = ((last - first + 1) as usize)
            .min(self.config.websocket.max_unacked)
            .min(crate::api::messages::page_messages(max_envelope));
        let router = &self.router;
        let Ok(stored) = router
            .read(self.registration.user(), first - 1, limit)
            .await
        else {
            // The window stays as it is until the next ack or resync.
            return;
        };
        // A full page may end before `last`; seqs past its end stay in flight.
        let checked_through = match stored.last() {
            Some(message) if stored.len() == limit => message.seq,
            _ => last,
        };
        let stored: std::collections::HashSet<u64> = stored.iter().map(|m| m.seq).collect();
        self.in_flight
            .retain(|seq| *seq > checked_through || stored.contains(seq));
    }

    /// Records that everything up to `up_to` is acknowledged, which opens
    /// the window. `sent_through` stays, because a client may ack a seq it
    /// has not seen yet and must still receive the messages stored above it.
    fn apply_ack(&mut self, up_to: u64) {
        while self.in_flight.front().is_some_and(|&seq| seq <= up_to) {
            self.in_flight.pop_front();
        }
    }

    /// Writes the live messages that continue the seq order within the
    /// window, then flushes once for all of them. A message above the next
    /// seq waits up to [`GAP_WAIT`] for the ones below it.
    async fn send_live(&mut self, live: VecDeque<LiveMessage>) -> Result<(), Closing> {
        let mut written = false;
        for message in live {
            if self.catching_up || message.seq <= self.sent_through {
                continue;
            }
            if message.seq != self.sent_through + 1 {
                self.keep_out_of_order(message);
                continue;
            }
            let mut next = Some(message);
            while let Some(message) = next {
                if self.window_room() == 0 {
                    self.catching_up = true;
                    break;
                }
                self.write(Message::Text(message.frame)).await?;
                self.record_sent(message.seq, message.received_at_ms, DeliveryPath::Live);
                written = true;
                let seq = self.sent_through + 1;
                next = self.out_of_order.as_mut().and_then(|kept| kept.take(seq));
            }
        }
        let none_waiting = self
            .out_of_order
            .as_ref()
            .is_some_and(|kept| kept.is_empty());
        if self.catching_up || none_waiting {
            // Catching up reads the waiting messages from the mailbox too.
            self.out_of_order = None;
        }
        if written {
            self.flush().await?;
        }
        Ok(())
    }

    /// Keeps a live message above the next seq, or switches to catching up
    /// when [`MAX_OUT_OF_ORDER`] are kept already.
    fn keep_out_of_order(&mut self, message: LiveMessage) {
        let kept = self.out_of_order.get_or_insert_with(|| {
            Box::new(OutOfOrder::new(tokio::time::Instant::now() + GAP_WAIT))
        });
        if !kept.insert(message) {
            self.out_of_order = None;
            self.catching_up = true;
        }
    }

    async fn send_backlog_page(&mut self) -> Result<(), Closing> {
        // Out-of-order messages are stored, so reading on to the end of the
        // mailbox delivers them too.
        self.out_of_order = None;
        let max_envelope = self.config.limits.max_envelope_bytes;
        let limit = self
            .window_room()
            .min(BACKLOG_PAGE)
            .min(crate::api::messages::page_messages(max_envelope));
        let messages = match self
            .router
            .read(self.registration.user(), self.sent_through, limit)
            .await
        {
            Ok(messages) => messages,
            Err(err) => {
                // The connection stays open: the store is the one failing,
                // and a reconnect would fail the same way. Errors are
                // counted per backend call, so this logs at debug only.
                tracing::debug!(error = %err, "backlog read failed; retrying");
                self.catching_up = false;
                self.backlog_retry_at = Some(tokio::time::Instant::now() + BACKLOG_RETRY_DELAY);
                return Ok(());
            }
        };
        if messages.len() < limit {
            self.catching_up = false;
        }
        if messages.is_empty() {
            return Ok(());
        }
        for message in &messages {
            let received_at = format_received_at(message.received_at_ms);
            let frame = message_frame_json(message.seq, &received_at, &message.envelope_json);
            self.write(Message::Text(frame.into())).await?;
        }
        self.flush().await?;
        for message in &messages {
            self.record_sent(message.seq, message.received_at_ms, DeliveryPath::Backlog);
        }
        Ok(())
    }

    fn record_sent(&mut self, seq: u64, received_at_ms: u64, path: DeliveryPath) {
        self.sent_through = seq;
        self.in_flight.push_back(seq);
        let metrics = telemetry::message_metrics();
        match path {
            DeliveryPath::Live => metrics.delivered_live.increment(1),
            DeliveryPath::Backlog => metrics.delivered_backlog.increment(1),
        }
        let now = unix_millis(SystemTime::now());
        let latency = now.saturating_sub(received_at_ms) as f64 / 1000.0;
        metrics.delivery_latency.record(latency);
    }

    async fn on_ping_tick(&mut self, interval: Duration) -> Result<(), Closing> {
        if self.last_seen.elapsed() > interval * 2 {
            return Err(Closing::new(
                close_code::POLICY,
                "no pong within two ping intervals",
            ));
        }
        self.write(Message::Ping(bytes::Bytes::new())).await?;
        self.flush().await
    }

    async fn on_incoming(
        &mut self,
        incoming: Option<Result<Message, axum::Error>>,
    ) -> Result<(), Closing> {
        let message = match incoming {
            None => return Err(Closing::gone()),
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(read_error_closing(err)),
        };
        self.last_seen = Instant::now();
        match message {
            Message::Text(text) => self.on_text(&text).await,
            Message::Binary(_) => {
                let error = ApiError::new(
                    ErrorCode::InvalidRequest,
                    "binary frames are not supported; send JSON text frames",
                );
                self.on_bad_frame(error).await
            }
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Closing::new(close_code::NORMAL, "")),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Closing> {
        let frame = match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => frame,
            Err(err) => {
                if let Some(message_id) = send_frame_message_id(text) {
                    // A `send` whose envelope has the wrong shape is a valid
                    // frame with an invalid envelope, answered as POST /send is.
                    self.bad_frames = 0;
                    let error = crate::api::json_error(&err, ErrorCode::InvalidEnvelope);
                    crate::router::record_rejected(&error);
                    return self.write_error(error, message_id).await;
                }
                let error = crate::api::json_error(&err, ErrorCode::InvalidRequest);
                return self.on_bad_frame(error).await;
            }
        };
        self.bad_frames = 0;
        match frame {
            ClientFrame::Ping {} => self.write_frame(&ServerFrame::Pong).await,
            ClientFrame::Ack { up_to_seq } => {
                self.on_ack(up_to_seq);
                Ok(())
            }
            ClientFrame::Send { envelope } => self.on_send(envelope).await,
        }
    }

    async fn on_bad_frame(&mut self, error: ApiError) -> Result<(), Closing> {
        self.bad_frames += 1;
        self.write_error(error, None).await?;
        if self.bad_frames >= MAX_BAD_FRAMES {
            return Err(Closing::new(
                close_code::POLICY,
                "three invalid frames in a row",
            ));
        }
        Ok(())
    }

    /// Starts an ack through the router; the window opens when it succeeds.
    fn on_ack(&mut self, up_to_seq: u64) {
        let router = Arc::clone(&self.router);
        let user = self.registration.user().clone();
        let future =
            async move { FrameResult::Ack(router.ack(&user, AckTarget::UpTo(up_to_seq)).await) };
        self.push_pending(future, PendingFrame::Ack { up_to_seq });
    }

    fn pending_count(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(0, |pending| pending.frames.len())
    }

    /// Queues a send or ack for a reply, in arrival order.
    ///
    /// With the PostgreSQL mailbox the call runs as its own task, because it
    /// may hold a pooled database connection while this connection waits
    /// for the pool itself (a backlog read) without polling it. With many
    /// connections the pool would then run dry until its acquire timeout. The embedded mailbox holds nothing for a call
    /// that is not polled, so there the connection polls its calls itself,
    /// which costs less CPU than a task per frame.
    fn push_pending(
        &mut self,
        future: impl Future<Output = FrameResult> + Send + 'static,
        frame: PendingFrame,
    ) {
        let result: PendingFuture = if self.config.message_store.kind == StoreKind::Postgres {
            let task = tokio::spawn(future);
            let is_send = matches!(frame, PendingFrame::Send { .. });
            Box::pin(async move {
                task.await.unwrap_or_else(|err| {
                    tracing::error!(error = %err, "a send or ack task failed");
                    let error = ApiError::new(ErrorCode::Internal, "the request failed; retry it");
                    if is_send {
                        FrameResult::Send(Err(error))
                    } else {
                        FrameResult::Ack(Err(error))
                    }
                })
            })
        } else {
            Box::pin(future)
        };
        let pending = self.pending.get_or_insert_with(|| {
            Box::new(PendingFrames {
                results: FuturesOrdered::new(),
                frames: VecDeque::new(),
            })
        });
        pending.results.push_back(result);
        pending.frames.push_back(frame);
    }

    /// Starts a send through the router without waiting for the store, so
    /// the connection reads its next frame meanwhile. Sends to one
    /// recipient still go to the store one at a time, in the order they
    /// arrived, because a send to a recipient with a send pending first
    /// waits for the pending frames before it.
    async fn on_send(&mut self, envelope: routing_protocol::WireEnvelope) -> Result<(), Closing> {
        let message_id = envelope.message_id.clone();
        let recipient = envelope
            .recipient_id
            .as_deref()
            .and_then(|text| Address::parse(text).ok());
        let mut replied = false;
        while self.has_pending_send_to(recipient.as_ref()) {
            let Some(result) = next_result(&mut self.pending).await else {
                break;
            };
            self.reply_to_frame(result).await?;
            replied = true;
        }
        if replied {
            self.flush().await?;
        }

        let router = Arc::clone(&self.router);
        let user = self.registration.user().clone();
        let future = async move { FrameResult::Send(router.accept(&user, envelope).await) };
        self.push_pending(
            future,
            PendingFrame::Send {
                message_id,
                recipient,
            },
        );
        Ok(())
    }

    fn has_pending_send_to(&self, recipient: Option<&Address>) -> bool {
        let (Some(recipient), Some(pending)) = (recipient, &self.pending) else {
            return false;
        };
        pending.frames.iter().any(|frame| {
            matches!(frame, PendingFrame::Send { recipient: Some(other), .. } if other == recipient)
        })
    }

    /// Replies to `first` and to every later pending frame whose result is
    /// already in, then flushes once. A group commit finishes many of a
    /// connection's sends at once, and one write for all their replies
    /// saves a syscall per message.
    async fn reply_to_ready_frames(&mut self, first: FrameResult) -> Result<(), Closing> {
        self.reply_to_frame(first).await?;
        // Polling with a no-op waker is enough here: the serve loop polls
        // the pending frames again with its own waker before it sleeps.
        while let Some(Some(result)) = next_result(&mut self.pending).now_or_never() {
            self.reply_to_frame(result).await?;
        }
        self.flush().await
    }

    /// Handles the result of the oldest pending frame: opens the window
    /// after an ack, and queues a `sent` or error frame without flushing.
    async fn reply_to_frame(&mut self, result: FrameResult) -> Result<(), Closing> {
        let frame = self
            .pending
            .as_mut()
            .and_then(|pending| pending.frames.pop_front());
        match (result, frame) {
            (FrameResult::Ack(Ok(_)), Some(PendingFrame::Ack { up_to_seq })) => {
                self.apply_ack(up_to_seq);
                Ok(())
            }
            (FrameResult::Ack(Err(error)), _) => self.queue_error(error, None).await,
            (FrameResult::Send(Ok(accepted)), _) => {
                self.rate_limited = 0;
                self.queue_frame(&ServerFrame::Sent {
                    message_id: accepted.message_id,
                })
                .await
            }
            (FrameResult::Send(Err(error)), frame) => {
                let message_id = match frame {
                    Some(PendingFrame::Send { message_id, .. }) => message_id,
                    _ => None,
                };
                let limited = error.code == ErrorCode::RateLimited;
                self.rate_limited = if limited { self.rate_limited + 1 } else { 0 };
                self.queue_error(error, message_id).await?;
                if self.rate_limited >= MAX_RATE_LIMITED {
                    return Err(Closing::new(close_code::RATE_LIMITED, "rate limited"));
                }
                Ok(())
            }
            (FrameResult::Ack(Ok(_)), _) => Ok(()),
        }
    }

    /// Waits for the pending frames and writes their replies, before a close frame.
    async fn reply_to_pending_frames(&mut self) -> Result<(), Closing> {
        let mut replied = false;
        while let Some(result) = next_result(&mut self.pending).await {
            match self.reply_to_frame(result).await {
                // The connection is closing already; one more rate-limited
                // reply must not stop its close frame.
                Err(closing) if closing.code != close_code::RATE_LIMITED => return Err(closing),
                _ => {}
            }
            replied = true;
        }
        // A slow consumer's close comes after a failed flush, so one with
        // nothing new to write must not try again.
        if replied {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_error(
        &mut self,
        error: ApiError,
        message_id: Option<String>,
    ) -> Result<(), Closing> {
        self.queue_error(error, message_id).await?;
        self.flush().await
    }

    /// Queues an error frame without flushing.
    async fn queue_error(
        &mut self,
        error: ApiError,
        message_id: Option<String>,
    ) -> Result<(), Closing> {
        let frame = ServerFrame::Error {
            code: error.code,
            message: error.message,
            message_id,
        };
        self.queue_frame(&frame).await
    }

    async fn write_frame(&mut self, frame: &ServerFrame) -> Result<(), Closing> {
        self.queue_frame(frame).await?;
        self.flush().await
    }

    /// Queues a frame without flushing.
    async fn queue_frame(&mut self, frame: &ServerFrame) -> Result<(), Closing> {
        let text = serde_json::to_string(frame).expect("server frames always serialise");
        self.write(Message::Text(Utf8Bytes::from(text))).await
    }

    /// Queues a frame; a socket that stays full for `write_timeout` is a slow consumer.
    async fn write(&mut self, message: Message) -> Result<(), Closing> {
        let timeout = self.config.websocket.write_timeout;
        match tokio::time::timeout(timeout, self.socket.feed(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closing::gone()),
            Err(_) => Err(Closing::new(close_code::SLOW_CONSUMER, "slow consumer")),
        }
    }

    async fn flush(&mut self) -> Result<(), Closing> {
        let timeout = self.config.websocket.write_timeout;
        match tokio::time::timeout(timeout, self.socket.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closing::gone()),
            Err(_) => Err(Closing::new(close_code::SLOW_CONSUMER, "slow consumer")),
        }
    }

    /// Sends the close frame, then reads until the client's close frame
    /// arrives. Closing the socket with client data unread makes the kernel
    /// send a reset, which discards the close frame before the client reads
    /// its code.
    async fn close(&mut self, closing: Closing) {
        if closing.code == 0 {
            return;
        }
        // A send that reached the store gets its reply before the close frame,
        // so a client that gets its `sent` need not retry it.
        let answered = tokio::time::timeout(CLOSE_TIMEOUT, self.reply_to_pending_frames()).await;
        if !matches!(answered, Ok(Ok(()))) {
            return;
        }
        metrics::counter!(telemetry::CONNECTIONS_CLOSED, "code" => closing.code.to_string())
            .increment(1);
        let frame = CloseFrame {
            code: closing.code,
            reason: Utf8Bytes::from_static(closing.reason),
        };
        let sent =
            tokio::time::timeout(CLOSE_TIMEOUT, self.socket.send(Message::Close(Some(frame))));
        if !matches!(sent.await, Ok(Ok(()))) {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
            while let Some(Ok(message)) = self.socket.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Returns `Some(messageId)` when `text` is a JSON object of type `send`,
/// the inner option being the envelope's `messageId` when it is a string.
fn send_frame_message_id(text: &str) -> Option<Option<String>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value.get("type")?.as_str()? != "send" {
        return None;
    }
    let message_id = value
        .get("envelope")
        .and_then(|envelope| envelope.get("messageId"))
        .and_then(|id| id.as_str())
        .map(str::to_owned);
    Some(message_id)
}

/// Maps a read failure to a close: 1009 for an oversized frame, else gone.
fn read_error_closing(err: axum::Error) -> Closing {
    let inner = err.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => {
            Closing::new(close_code::TOO_LARGE, "frame larger than the limit")
        }
        _ => Closing::gone(),
    }
}

/// Waits for the oldest pending frame's result; `None` when none is pending.
async fn next_result(pending: &mut Option<Box<PendingFrames>>) -> Option<FrameResult> {
    pending.as_mut()?.results.next().await
}

/// Converts a Unix time in seconds to a Tokio instant.
fn deadline_at(unix_seconds: u64) -> tokio::time::Instant {
    let now_unix = crate::auth::unix_now();
    let remaining = Duration::from_secs(unix_seconds.saturating_sub(now_unix));
    let now = tokio::time::Instant::now();
    // A token may carry an `exp` so far ahead that the sum overflows.
    now.checked_add(remaining.min(FARTHEST_DEADLINE))
        .unwrap_or(now + FARTHEST_DEADLINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(seq: u64) -> LiveMessage {
        LiveMessage {
            seq,
            received_at_ms: 0,
            frame: Utf8Bytes::from(format!("frame {seq}")),
        }
    }

    fn out_of_order() -> OutOfOrder {
        OutOfOrder::new(tokio::time::Instant::now() + GAP_WAIT)
    }

    #[test]
    fn out_of_order_takes_in_seq_order() {
        let mut kept = out_of_order();
        assert!(kept.insert(live(5)));
        assert!(kept.insert(live(3)));
        assert!(kept.insert(live(4)));
        assert!(kept.take(2).is_none(), "seq 2 was never inserted");
        assert_eq!(kept.take(3).map(|m| m.seq), Some(3));
        assert_eq!(kept.take(4).map(|m| m.seq), Some(4));
        assert_eq!(kept.take(5).map(|m| m.seq), Some(5));
        assert!(kept.is_empty());
    }

    #[test]
    fn out_of_order_drops_lower_seqs() {
        let mut kept = out_of_order();
        assert!(kept.insert(live(2)));
        assert!(kept.insert(live(7)));
        // Seq 2 arrived from the mailbox meanwhile, so the next expected is 7.
        assert_eq!(kept.take(7).map(|m| m.seq), Some(7));
        assert!(
            kept.is_empty(),
            "seq 2 is below the expected seq and is dropped"
        );
    }

    #[test]
    fn out_of_order_rejects_past_bound() {
        let mut kept = out_of_order();
        for seq in 0..MAX_OUT_OF_ORDER as u64 {
            assert!(kept.insert(live(10 + seq)));
        }
        assert!(
            !kept.insert(live(1_000)),
            "one more than MAX_OUT_OF_ORDER is rejected"
        );
        assert!(kept.insert(live(10)), "a seq already kept replaces itself");
    }
}
