//! The embedded mailbox: fjall in `data_dir`, with group commit.
//!
//! One writer thread owns every write. Callers queue appends, acks and
//! expiry runs on a bounded channel. The writer applies up to
//! [`MAX_GROUP_REQUESTS`] queued requests in order inside one fjall write
//! transaction and commits it once with `PersistMode::SyncAll`. Only then
//! does it reply to each caller, so an accepted append survives `kill -9`.
//! That costs one disk sync per group instead of one per message. Reads and counts
//! use fjall snapshots directly and never wait for the writer.
//!
//! Keyspaces (every address is ASCII without 0x00, so 0x00 separates parts,
//! and numbers are big-endian so byte order is numeric order):
//!
//! - `meta`: recipient -> [`Meta`] (last seq, ack cursor, stored count,
//!   last `received_at_ms`).
//! - `messages`: recipient 0x00 seq -> `received_at_ms`, sender, message id,
//!   envelope JSON.
//! - `message_ids`: recipient 0x00 id length (u16) id seq -> empty, for
//!   acks by message id.
//! - `dedupe`: recipient 0x00 sender 0x00 id length (u16) id -> seq,
//!   content hash, acceptance time.
//! - `dedupe_by_time`: acceptance time then the `dedupe` key -> empty, so
//!   `expire` finds the records whose window has passed without a full scan.

use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use async_trait::async_trait;
use fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    SingleWriterWriteTx,
};
use routing_protocol::Address;
use tokio::sync::{mpsc, oneshot};

use super::{
    AckTarget, Appended, Mailbox, MailboxError, MailboxSettings, NewMessage, StoredMessage,
    duration_millis, unix_millis,
};

/// Requests that may wait in the writer's queue; callers wait when it is full.
const QUEUE_CAPACITY: usize = 4096;

/// Requests applied and committed together in one write transaction.
pub const MAX_GROUP_REQUESTS: usize = 256;

/// Maximum message id length, in bytes, that the key layout accepts. The HTTP layer
/// allows 128 characters, so this only stops a caller bug.
const MAX_MESSAGE_ID_BYTES: usize = 1024;

/// The fjall-backed mailbox. See the module docs for the layout.
pub struct EmbeddedMailbox {
    store: Arc<Store>,
    /// `None` only while the mailbox is dropped.
    requests: Option<mpsc::Sender<Request>>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The database and its keyspaces, shared by the writer and readers.
struct Store {
    db: SingleWriterTxDatabase,
    meta: SingleWriterTxKeyspace,
    messages: SingleWriterTxKeyspace,
    message_ids: SingleWriterTxKeyspace,
    dedupe: SingleWriterTxKeyspace,
    dedupe_by_time: SingleWriterTxKeyspace,
    ttl_ms: u64,
    dedupe_window_ms: u64,
    max_stored_per_user: u64,
    /// Groups committed since open, for tests that check grouping.
    committed_groups: AtomicU64,
    /// Set when a commit failed. fjall then rejects every later write, so the
    /// mailbox reports itself unavailable until the process restarts.
    write_failed: AtomicBool,
}

impl EmbeddedMailbox {
    /// Opens or creates the mailbox in `dir` and starts its writer thread.
    ///
    /// Fails with [`MailboxError::Unavailable`] when another process holds
    /// a lock on the directory, and with [`MailboxError::Internal`] when it cannot be
    /// read or recovered.
    pub fn open(dir: &Path, settings: MailboxSettings) -> Result<Self, MailboxError> {
        let store = Arc::new(Store::open(dir, &settings)?);
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);

        let writer_store = Arc::clone(&store);
        let writer = std::thread::Builder::new()
            .name("mailbox-writer".into())
            .spawn(move || run_writer(&writer_store, receiver))
            .map_err(|err| {
                MailboxError::Internal(format!("failed to start the mailbox writer thread: {err}"))
            })?;

        tracing::info!(
            path = %dir.display(),
            max_stored_per_user = settings.max_stored_per_user,
            "embedded mailbox opened"
        );
        Ok(Self {
            store,
            requests: Some(sender),
            closed: AtomicBool::new(false),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues a request for the writer and waits for the reply.
    async fn call<T>(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<T, MailboxError>>) -> Request,
    ) -> Result<T, MailboxError> {
        let sender = self.open_sender()?;
        let (reply, reply_receiver) = oneshot::channel();
        sender
            .send(build(reply))
            .await
            .map_err(|_| closed_error())?;
        reply_receiver.await.map_err(|_| closed_error())?
    }

    fn open_sender(&self) -> Result<&mpsc::Sender<Request>, MailboxError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_error());
        }
        self.requests.as_ref().ok_or_else(closed_error)
    }

    /// Runs a snapshot read on the blocking pool.
    async fn read_with<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, MailboxError> + Send + 'static,
    ) -> Result<T, MailboxError> {
        self.open_sender()?;
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|err| MailboxError::Internal(format!("mailbox read task failed: {err}")))?
    }

    fn take_writer(&self) -> Option<JoinHandle<()>> {
        match self.writer.lock() {
            Ok(mut writer) => writer.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

#[async_trait]
impl Mailbox for EmbeddedMailbox {
    async fn append(&self, message: NewMessage) -> Result<Appended, MailboxError> {
        self.call(|reply| Request::Append { message, reply }).await
    }

    async fn read(
        &self,
        recipient: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MailboxError> {
        let recipient = recipient.clone();
        let now_ms = unix_millis(SystemTime::now());
        self.read_with(move |store| store.read(&recipient, after, limit, now_ms))
            .await
    }

    async fn ack(&self, recipient: &Address, target: AckTarget) -> Result<u64, MailboxError> {
        let recipient = recipient.clone();
        self.call(|reply| Request::Ack {
            recipient,
            target,
            reply,
        })
        .await
    }

    /// Counts stored messages, including expired ones that `expire` has not
    /// deleted yet.
    async fn count(&self, recipient: &Address) -> Result<u64, MailboxError> {
        let recipient = recipient.clone();
        self.read_with(move |store| {
            let snapshot = store.db.read_tx();
            Ok(store.load_meta(&snapshot, recipient.as_str())?.stored)
        })
        .await
    }

    async fn expire(&self, now: SystemTime) -> Result<u64, MailboxError> {
        let now_ms = unix_millis(now);
        self.call(|reply| Request::Expire { now_ms, reply }).await
    }

    async fn check(&self) -> Result<(), MailboxError> {
        if self.store.write_failed.load(Ordering::Acquire) {
            return Err(MailboxError::Unavailable(
                "a commit to disk failed, so the store accepts no more writes; restart the process"
                    .into(),
            ));
        }
        let sender = self.open_sender()?;
        if sender.is_closed() {
            return Err(MailboxError::Unavailable(
                "the mailbox writer thread has stopped".into(),
            ));
        }
        Ok(())
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(sender) = &self.requests {
            let (reply, done) = oneshot::channel();
            if sender.send(Request::Close { reply }).await.is_ok() {
                let _ = done.await;
            }
        }
        if let Some(writer) = self.take_writer() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

impl Drop for EmbeddedMailbox {
    /// Lets the writer finish the queued requests and waits for it, so the
    /// directory can be opened again as soon as the mailbox is dropped.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(writer) = self.take_writer() {
            let _ = writer.join();
        }
    }
}

fn closed_error() -> MailboxError {
    MailboxError::Unavailable("the mailbox is closed".into())
}

fn storage_error(err: fjall::Error) -> MailboxError {
    match err {
        fjall::Error::Locked => {
            MailboxError::Unavailable("the mailbox directory is in use by another process".into())
        }
        fjall::Error::Poisoned => MailboxError::Unavailable(
            "the mailbox store failed to write to disk earlier and accepts no more writes. \
             Restart the process"
                .into(),
        ),
        other => MailboxError::Internal(format!("mailbox storage failed: {other}")),
    }
}

// ---------------------------------------------------------------------------
// The writer thread.

/// A call queued for the writer.
enum Request {
    Append {
        message: NewMessage,
        reply: oneshot::Sender<Result<Appended, MailboxError>>,
    },
    Ack {
        recipient: Address,
        target: AckTarget,
        reply: oneshot::Sender<Result<u64, MailboxError>>,
    },
    Expire {
        now_ms: u64,
        reply: oneshot::Sender<Result<u64, MailboxError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// The result of a request and its reply channel, sent once the group commits.
enum PendingReply {
    Appended(
        oneshot::Sender<Result<Appended, MailboxError>>,
        Result<Appended, MailboxError>,
    ),
    Count(
        oneshot::Sender<Result<u64, MailboxError>>,
        Result<u64, MailboxError>,
    ),
}

impl PendingReply {
    fn send(self) {
        // A caller that stopped waiting has nothing to receive, so a failed
        // send is ignored. Its write is committed all the same.
        match self {
            Self::Appended(reply, result) => {
                let _ = reply.send(result);
            }
            Self::Count(reply, result) => {
                let _ = reply.send(result);
            }
        }
    }

    /// Answers a request of a group whose commit failed. Nothing of the
    /// group was stored, so the caller may retry: the error is `Unavailable`.
    fn fail(self, reason: &str) {
        let error = MailboxError::Unavailable(reason.to_owned());
        match self {
            Self::Appended(reply, _) => {
                let _ = reply.send(Err(error));
            }
            Self::Count(reply, _) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// Totals logged when the writer stops. They count applied requests, so a
/// group whose commit failed is counted too.
#[derive(Debug, Default)]
struct WriterTotals {
    appended: u64,
    acked: u64,
    expired: u64,
}

/// Takes queued requests in groups until the channel closes or a close
/// request arrives.
fn run_writer(store: &Store, mut receiver: mpsc::Receiver<Request>) {
    let mut totals = WriterTotals::default();
    let mut close_replies = Vec::new();

    while close_replies.is_empty() {
        let Some(first) = receiver.blocking_recv() else {
            break;
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP_REQUESTS {
            let Ok(next) = receiver.try_recv() else {
                break;
            };
            group.push(next);
        }
        close_replies = commit_group(store, group, &mut totals);
    }

    // Requests still queued behind a close request get `Unavailable` when
    // their reply channels drop with the receiver.
    drop(receiver);
    tracing::info!(
        groups = store.committed_groups.load(Ordering::Relaxed),
        appended = totals.appended,
        acked = totals.acked,
        expired = totals.expired,
        "embedded mailbox writer stopped"
    );
    for reply in close_replies {
        let _ = reply.send(());
    }
}

/// Applies one group in one transaction, commits it, and sends every
/// reply. Returns the reply channels of close requests. Requests after the
/// first close request in the group are rejected as closed.
fn commit_group(
    store: &Store,
    group: Vec<Request>,
    totals: &mut WriterTotals,
) -> Vec<oneshot::Sender<()>> {
    let mut tx = store.db.write_tx().durability(Some(PersistMode::SyncAll));
    let mut replies = Vec::with_capacity(group.len());
    let mut close_replies = Vec::new();
    let mut failure = None;

    for request in group {
        if !close_replies.is_empty() || failure.is_some() {
            reject(request, &mut close_replies, failure.as_deref());
            continue;
        }
        let pending = match apply(store, &mut tx, request, totals) {
            Applied::Reply(pending) => pending,
            Applied::Close(reply) => {
                close_replies.push(reply);
                continue;
            }
        };
        failure = fatal_reason(&pending);
        replies.push(pending);
    }

    if failure.is_none() {
        match tx.commit() {
            Ok(()) => {
                store.committed_groups.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                store.write_failed.store(true, Ordering::Release);
                failure = Some(storage_error(err).to_string());
            }
        }
    }
    finish_group(replies, failure);
    close_replies
}

fn finish_group(replies: Vec<PendingReply>, failure: Option<String>) {
    match failure {
        None => replies.into_iter().for_each(PendingReply::send),
        Some(reason) => {
            tracing::error!(error = %reason, requests = replies.len(), "mailbox group commit failed");
            for pending in replies {
                pending.fail(&reason);
            }
        }
    }
}

/// Rejects a request that comes after a close request or after a storage
/// failure in the same group.
fn reject(request: Request, close_replies: &mut Vec<oneshot::Sender<()>>, failure: Option<&str>) {
    let error = || match failure {
        Some(reason) => MailboxError::Internal(reason.to_owned()),
        None => closed_error(),
    };
    match request {
        Request::Append { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Request::Ack { reply, .. } | Request::Expire { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Request::Close { reply } => close_replies.push(reply),
    }
}

/// Returns the reason when a request failed on storage. Such a failure rolls
/// back the whole group, because the transaction may contain part of the
/// failed request's writes.
fn fatal_reason(pending: &PendingReply) -> Option<String> {
    let error = match pending {
        PendingReply::Appended(_, Err(error)) | PendingReply::Count(_, Err(error)) => error,
        _ => return None,
    };
    match error {
        MailboxError::Internal(_) | MailboxError::Unavailable(_) => Some(error.to_string()),
        MailboxError::Full { .. } | MailboxError::Conflict { .. } => None,
    }
}

enum Applied {
    Reply(PendingReply),
    Close(oneshot::Sender<()>),
}

fn apply(
    store: &Store,
    tx: &mut SingleWriterWriteTx<'_>,
    request: Request,
    totals: &mut WriterTotals,
) -> Applied {
    let now_ms = unix_millis(SystemTime::now());
    let pending = match request {
        Request::Append { message, reply } => {
            let result = store.append(tx, &message, now_ms);
            if matches!(result, Ok(Appended::New(_))) {
                totals.appended += 1;
            }
            PendingReply::Appended(reply, result)
        }
        Request::Ack {
            recipient,
            target,
            reply,
        } => {
            let result = store.ack(tx, recipient.as_str(), &target, now_ms);
            totals.acked += result.as_ref().copied().unwrap_or(0);
            PendingReply::Count(reply, result)
        }
        Request::Expire { now_ms, reply } => {
            let result = store.expire(tx, now_ms);
            totals.expired += result.as_ref().copied().unwrap_or(0);
            PendingReply::Count(reply, result)
        }
        Request::Close { reply } => return Applied::Close(reply),
    };
    Applied::Reply(pending)
}

// ---------------------------------------------------------------------------
// Mailbox operations on the store. Writes go through the writer's
// transaction, which also returns the group's own earlier writes on reads.

impl Store {
    fn open(dir: &Path, settings: &MailboxSettings) -> Result<Self, MailboxError> {
        let db = SingleWriterTxDatabase::builder(dir)
            .open()
            .map_err(storage_error)?;
        let keyspace = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage_error)
        };
        Ok(Self {
            meta: keyspace("meta")?,
            messages: keyspace("messages")?,
            message_ids: keyspace("message_ids")?,
            dedupe: keyspace("dedupe")?,
            dedupe_by_time: keyspace("dedupe_by_time")?,
            db,
            ttl_ms: duration_millis(settings.message_ttl),
            dedupe_window_ms: duration_millis(settings.dedupe_window),
            max_stored_per_user: settings.max_stored_per_user,
            committed_groups: AtomicU64::new(0),
            write_failed: AtomicBool::new(false),
        })
    }

    fn is_expired(&self, received_at_ms: u64, now_ms: u64) -> bool {
        received_at_ms.saturating_add(self.ttl_ms) <= now_ms
    }

    fn load_meta(&self, reader: &impl Readable, recipient: &str) -> Result<Meta, MailboxError> {
        match reader.get(&self.meta, recipient).map_err(storage_error)? {
            Some(bytes) => Meta::decode(&bytes),
            None => Ok(Meta::default()),
        }
    }

    fn save_meta(&self, tx: &mut SingleWriterWriteTx<'_>, recipient: &str, meta: &Meta) {
        tx.insert(&self.meta, recipient, meta.encode().to_vec());
    }

    /// Appends with dedupe and the per-recipient limit.
    fn append(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        message: &NewMessage,
        now_ms: u64,
    ) -> Result<Appended, MailboxError> {
        let recipient = message.recipient.as_str();
        let dedupe_key = dedupe_key(recipient, message.sender.as_str(), &message.message_id)?;
        let previous = self.live_dedupe_record(tx, recipient, &dedupe_key, now_ms)?;
        if let Some(record) = previous.live {
            if record.content_hash != message.content_hash {
                return Err(MailboxError::Conflict {
                    message_id: message.message_id.clone(),
                });
            }
            return Ok(Appended::Duplicate { seq: record.seq });
        }

        let mut meta = self.load_meta(tx, recipient)?;
        if meta.stored >= self.max_stored_per_user {
            self.expire_recipient(tx, recipient, &mut meta, now_ms)?;
            if meta.stored >= self.max_stored_per_user {
                return Err(MailboxError::Full {
                    limit: self.max_stored_per_user,
                });
            }
        }
        if let Some(dead) = previous.dead {
            tx.remove(
                &self.dedupe_by_time,
                dedupe_time_key(dead.accepted_ms, &dedupe_key),
            );
        }

        let stored = meta.push(now_ms, message);
        self.insert_message(tx, message, &stored, &dedupe_key)?;
        self.save_meta(tx, recipient, &meta);
        Ok(Appended::New(stored))
    }

    fn insert_message(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        message: &NewMessage,
        stored: &StoredMessage,
        dedupe_key: &[u8],
    ) -> Result<(), MailboxError> {
        let recipient = message.recipient.as_str();
        let value = encode_message(stored.received_at_ms, message.sender.as_str(), message);
        tx.insert(&self.messages, message_key(recipient, stored.seq), value);
        tx.insert(
            &self.message_ids,
            message_id_key(recipient, &message.message_id, stored.seq)?,
            [],
        );

        let record = DedupeRecord {
            seq: stored.seq,
            content_hash: message.content_hash,
            accepted_ms: stored.received_at_ms,
        };
        tx.insert(&self.dedupe, dedupe_key, record.encode().to_vec());
        tx.insert(
            &self.dedupe_by_time,
            dedupe_time_key(record.accepted_ms, dedupe_key),
            [],
        );
        Ok(())
    }

    /// Looks up the dedupe record of a key and sorts it into one that still
    /// matches (the message is stored or the window is open) or a dead one.
    fn live_dedupe_record(
        &self,
        tx: &SingleWriterWriteTx<'_>,
        recipient: &str,
        dedupe_key: &[u8],
        now_ms: u64,
    ) -> Result<DedupeLookup, MailboxError> {
        let Some(bytes) = tx.get(&self.dedupe, dedupe_key).map_err(storage_error)? else {
            return Ok(DedupeLookup::default());
        };
        let record = DedupeRecord::decode(&bytes)?;
        let in_window = record.accepted_ms.saturating_add(self.dedupe_window_ms) > now_ms;
        if in_window || self.is_stored(tx, recipient, record.seq, now_ms)? {
            return Ok(DedupeLookup {
                live: Some(record),
                dead: None,
            });
        }
        Ok(DedupeLookup {
            live: None,
            dead: Some(record),
        })
    }

    /// Checks whether a message is stored and not expired.
    fn is_stored(
        &self,
        reader: &impl Readable,
        recipient: &str,
        seq: u64,
        now_ms: u64,
    ) -> Result<bool, MailboxError> {
        let key = message_key(recipient, seq);
        let Some(bytes) = reader.get(&self.messages, key).map_err(storage_error)? else {
            return Ok(false);
        };
        let received_at_ms = decode_received_at(&bytes)?;
        Ok(!self.is_expired(received_at_ms, now_ms))
    }

    /// Deletes one message and its index entry. Its dedupe record goes too
    /// when the dedupe window has passed, because nothing can match it then.
    fn delete_message(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        recipient: &str,
        seq: u64,
        value: &[u8],
        now_ms: u64,
    ) -> Result<(), MailboxError> {
        let decoded = decode_message(value)?;
        tx.remove(&self.messages, message_key(recipient, seq));
        tx.remove(
            &self.message_ids,
            message_id_key(recipient, &decoded.message_id, seq)?,
        );

        let dedupe_key = dedupe_key(recipient, &decoded.sender, &decoded.message_id)?;
        let Some(bytes) = tx.get(&self.dedupe, &dedupe_key).map_err(storage_error)? else {
            return Ok(());
        };
        let record = DedupeRecord::decode(&bytes)?;
        let window_passed = record.accepted_ms.saturating_add(self.dedupe_window_ms) <= now_ms;
        if record.seq == seq && window_passed {
            tx.remove(&self.dedupe, dedupe_key.clone());
            tx.remove(
                &self.dedupe_by_time,
                dedupe_time_key(record.accepted_ms, &dedupe_key),
            );
        }
        Ok(())
    }

    /// Collects the messages of a recipient whose seq is in `seqs`, in order.
    fn scan_messages(
        &self,
        reader: &impl Readable,
        recipient: &str,
        seqs: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<(u64, fjall::Slice), MailboxError>> {
        let range = message_key(recipient, *seqs.start())..=message_key(recipient, *seqs.end());
        reader.range(&self.messages, range).map(|guard| {
            let (key, value) = guard.into_inner().map_err(storage_error)?;
            Ok((seq_from_key_suffix(&key)?, value))
        })
    }

    fn ack(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        recipient: &str,
        target: &AckTarget,
        now_ms: u64,
    ) -> Result<u64, MailboxError> {
        let mut meta = self.load_meta(tx, recipient)?;
        if meta.last_seq == 0 {
            return Ok(0);
        }
        let deleted = match target {
            AckTarget::UpTo(up_to) => self.ack_up_to(tx, recipient, &mut meta, *up_to, now_ms)?,
            AckTarget::Ids(ids) => self.ack_ids(tx, recipient, ids, now_ms)?,
        };
        meta.stored = meta.stored.saturating_sub(deleted);
        self.save_meta(tx, recipient, &meta);
        Ok(deleted)
    }

    fn ack_up_to(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        recipient: &str,
        meta: &mut Meta,
        up_to: u64,
        now_ms: u64,
    ) -> Result<u64, MailboxError> {
        let last = up_to.min(meta.last_seq);
        if last <= meta.ack_cursor {
            return Ok(0);
        }
        let acked: Vec<_> = self
            .scan_messages(tx, recipient, meta.ack_cursor + 1..=last)
            .collect::<Result<_, _>>()?;
        for (seq, value) in &acked {
            self.delete_message(tx, recipient, *seq, value, now_ms)?;
        }
        meta.ack_cursor = last;
        Ok(acked.len() as u64)
    }

    fn ack_ids(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        recipient: &str,
        ids: &[String],
        now_ms: u64,
    ) -> Result<u64, MailboxError> {
        let mut deleted = 0;
        for id in ids {
            let Ok(prefix) = message_id_prefix(recipient, id) else {
                // An id too long to store was never stored.
                continue;
            };
            let seqs: Vec<u64> = tx
                .prefix(&self.message_ids, &prefix)
                .map(|guard| seq_from_key_suffix(&guard.key().map_err(storage_error)?))
                .collect::<Result<_, _>>()?;
            for seq in seqs {
                let key = message_key(recipient, seq);
                let Some(value) = tx.get(&self.messages, key).map_err(storage_error)? else {
                    continue;
                };
                self.delete_message(tx, recipient, seq, &value, now_ms)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes the expired messages of every recipient, then the dedupe
    /// records whose window has passed and whose message is gone.
    fn expire(&self, tx: &mut SingleWriterWriteTx<'_>, now_ms: u64) -> Result<u64, MailboxError> {
        // NOTE: this visits every recipient with stored messages and keeps
        // the whole run in one transaction, so its cost grows with the number
        // of recipients and expired messages.
        let recipients: Vec<(String, Meta)> = tx
            .iter(&self.meta)
            .map(|guard| {
                let (key, value) = guard.into_inner().map_err(storage_error)?;
                let recipient = String::from_utf8(key.to_vec()).map_err(|_| corrupt("meta key"))?;
                Ok((recipient, Meta::decode(&value)?))
            })
            .filter(|entry| !matches!(entry, Ok((_, meta)) if meta.stored == 0))
            .collect::<Result<_, MailboxError>>()?;

        let mut expired = 0;
        for (recipient, mut meta) in recipients {
            expired += self.expire_recipient(tx, &recipient, &mut meta, now_ms)?;
        }
        self.sweep_dedupe(tx, now_ms)?;
        Ok(expired)
    }

    /// Deletes the expired prefix of one mailbox and moves its ack cursor
    /// past it. Expired messages form a prefix because `received_at_ms`
    /// never decreases with seq.
    fn expire_recipient(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        recipient: &str,
        meta: &mut Meta,
        now_ms: u64,
    ) -> Result<u64, MailboxError> {
        let mut expired = Vec::new();
        for entry in self.scan_messages(tx, recipient, meta.ack_cursor + 1..=u64::MAX) {
            let (seq, value) = entry?;
            if !self.is_expired(decode_received_at(&value)?, now_ms) {
                break;
            }
            expired.push((seq, value));
        }
        let Some((last_expired, _)) = expired.last() else {
            return Ok(0);
        };

        meta.ack_cursor = *last_expired;
        for (seq, value) in &expired {
            self.delete_message(tx, recipient, *seq, value, now_ms)?;
        }
        meta.stored = meta.stored.saturating_sub(expired.len() as u64);
        self.save_meta(tx, recipient, meta);
        Ok(expired.len() as u64)
    }

    /// Deletes dedupe records whose window has passed and whose message is
    /// no longer stored. A record whose message is still stored is deleted
    /// with that message instead (see [`Store::delete_message`]).
    fn sweep_dedupe(
        &self,
        tx: &mut SingleWriterWriteTx<'_>,
        now_ms: u64,
    ) -> Result<(), MailboxError> {
        let Some(cutoff) = now_ms.checked_sub(self.dedupe_window_ms) else {
            return Ok(());
        };
        let end = cutoff.saturating_add(1).to_be_bytes();
        let due: Vec<fjall::Slice> = tx
            .range(&self.dedupe_by_time, ..end.as_slice())
            .map(|guard| guard.key().map_err(storage_error))
            .collect::<Result<_, _>>()?;

        for time_key in due {
            let (accepted_ms, dedupe_key) = split_dedupe_time_key(&time_key)?;
            tx.remove(&self.dedupe_by_time, time_key.clone());
            let Some(bytes) = tx.get(&self.dedupe, dedupe_key).map_err(storage_error)? else {
                continue;
            };
            let record = DedupeRecord::decode(&bytes)?;
            let recipient = recipient_of_dedupe_key(dedupe_key)?;
            if record.accepted_ms == accepted_ms
                && !self.is_stored(tx, recipient, record.seq, now_ms)?
            {
                tx.remove(&self.dedupe, dedupe_key);
            }
        }
        Ok(())
    }

    /// Reads from a snapshot, starting past the ack cursor so the tombstones
    /// of acknowledged messages are never scanned.
    fn read(
        &self,
        recipient: &Address,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredMessage>, MailboxError> {
        let snapshot = self.db.read_tx();
        let meta = self.load_meta(&snapshot, recipient.as_str())?;
        let Some(first) = after.max(meta.ack_cursor).checked_add(1) else {
            return Ok(Vec::new());
        };

        let mut messages = Vec::with_capacity(limit.min(1024));
        for entry in self.scan_messages(&snapshot, recipient.as_str(), first..=u64::MAX) {
            if messages.len() >= limit {
                break;
            }
            let (seq, value) = entry?;
            let decoded = decode_message(&value)?;
            if self.is_expired(decoded.received_at_ms, now_ms) {
                continue;
            }
            messages.push(StoredMessage {
                seq,
                received_at_ms: decoded.received_at_ms,
                message_id: decoded.message_id,
                envelope_json: decoded.envelope_json.into(),
            });
        }
        Ok(messages)
    }
}

#[derive(Default)]
struct DedupeLookup {
    /// A record that still matches a repeat.
    live: Option<DedupeRecord>,
    /// A record that no longer matches and is replaced by the next append.
    dead: Option<DedupeRecord>,
}

// ---------------------------------------------------------------------------
// Records and keys.

/// The per-recipient counters, stored in `meta`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Meta {
    /// The highest seq assigned, 0 before the first append.
    last_seq: u64,
    /// Every message with a seq up to this one is deleted.
    ack_cursor: u64,
    /// Messages stored, including expired ones not yet deleted.
    stored: u64,
    /// The `received_at_ms` of the message with `last_seq`.
    last_received_ms: u64,
}

impl Meta {
    const LEN: usize = 32;

    /// Assigns the next seq and a `received_at_ms` no earlier than the last.
    fn push(&mut self, now_ms: u64, message: &NewMessage) -> StoredMessage {
        self.last_seq += 1;
        self.stored += 1;
        self.last_received_ms = self.last_received_ms.max(now_ms);
        StoredMessage {
            seq: self.last_seq,
            received_at_ms: self.last_received_ms,
            message_id: message.message_id.clone(),
            envelope_json: Arc::clone(&message.envelope_json),
        }
    }

    fn encode(&self) -> [u8; Self::LEN] {
        let mut bytes = [0; Self::LEN];
        bytes[..8].copy_from_slice(&self.last_seq.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.ack_cursor.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.stored.to_be_bytes());
        bytes[24..].copy_from_slice(&self.last_received_ms.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, MailboxError> {
        if bytes.len() != Self::LEN {
            return Err(corrupt("meta record"));
        }
        Ok(Self {
            last_seq: read_u64(bytes, 0)?,
            ack_cursor: read_u64(bytes, 8)?,
            stored: read_u64(bytes, 16)?,
            last_received_ms: read_u64(bytes, 24)?,
        })
    }
}

/// The seq, content hash and acceptance time of the first message with a
/// (recipient, sender, messageId).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DedupeRecord {
    seq: u64,
    content_hash: u128,
    accepted_ms: u64,
}

impl DedupeRecord {
    const LEN: usize = 32;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut bytes = [0; Self::LEN];
        bytes[..8].copy_from_slice(&self.seq.to_be_bytes());
        bytes[8..24].copy_from_slice(&self.content_hash.to_be_bytes());
        bytes[24..].copy_from_slice(&self.accepted_ms.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, MailboxError> {
        let hash: [u8; 16] = bytes
            .get(8..24)
            .and_then(|slice| slice.try_into().ok())
            .ok_or_else(|| corrupt("dedupe record"))?;
        if bytes.len() != Self::LEN {
            return Err(corrupt("dedupe record"));
        }
        Ok(Self {
            seq: read_u64(bytes, 0)?,
            content_hash: u128::from_be_bytes(hash),
            accepted_ms: read_u64(bytes, 24)?,
        })
    }
}

/// A `messages` value, decoded.
#[derive(Debug, PartialEq, Eq)]
struct DecodedMessage {
    received_at_ms: u64,
    sender: String,
    message_id: String,
    envelope_json: String,
}

/// Encodes `received_at_ms` (u64), sender and message id (each a u16 length
/// then bytes), then the envelope JSON to the end.
fn encode_message(received_at_ms: u64, sender: &str, message: &NewMessage) -> Vec<u8> {
    let envelope = message.envelope_json.as_bytes();
    let mut value =
        Vec::with_capacity(12 + sender.len() + message.message_id.len() + envelope.len());
    value.extend_from_slice(&received_at_ms.to_be_bytes());
    push_short_bytes(&mut value, sender.as_bytes());
    push_short_bytes(&mut value, message.message_id.as_bytes());
    value.extend_from_slice(envelope);
    value
}

fn decode_message(bytes: &[u8]) -> Result<DecodedMessage, MailboxError> {
    let received_at_ms = read_u64(bytes, 0)?;
    let (sender, rest) = split_short_bytes(&bytes[8..])?;
    let (message_id, envelope) = split_short_bytes(rest)?;
    let text =
        |part: &[u8]| String::from_utf8(part.to_vec()).map_err(|_| corrupt("stored message"));
    Ok(DecodedMessage {
        received_at_ms,
        sender: text(sender)?,
        message_id: text(message_id)?,
        envelope_json: text(envelope)?,
    })
}

fn decode_received_at(bytes: &[u8]) -> Result<u64, MailboxError> {
    read_u64(bytes, 0)
}

/// Appends a u16 length and the bytes. Callers keep `bytes` shorter than
/// `u16::MAX`, because addresses are at most 140 bytes and ids are checked.
fn push_short_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(len)]);
}

fn split_short_bytes(bytes: &[u8]) -> Result<(&[u8], &[u8]), MailboxError> {
    let len_bytes: [u8; 2] = bytes
        .get(..2)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| corrupt("length prefix"))?;
    let len = usize::from(u16::from_be_bytes(len_bytes));
    let rest = &bytes[2..];
    if rest.len() < len {
        return Err(corrupt("length prefix"));
    }
    Ok(rest.split_at(len))
}

fn read_u64(bytes: &[u8], at: usize) -> Result<u64, MailboxError> {
    let array: [u8; 8] = bytes
        .get(at..at + 8)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| corrupt("number field"))?;
    Ok(u64::from_be_bytes(array))
}

fn corrupt(what: &str) -> MailboxError {
    MailboxError::Internal(format!("corrupt {what} in the mailbox store"))
}

fn message_key(recipient: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(recipient.len() + 9);
    key.extend_from_slice(recipient.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Reads the seq from the last 8 bytes of a key, where every key with a seq
/// stores it.
fn seq_from_key_suffix(key: &[u8]) -> Result<u64, MailboxError> {
    let start = key.len().checked_sub(8).ok_or_else(|| corrupt("key"))?;
    read_u64(key, start)
}

fn checked_message_id(message_id: &str) -> Result<&[u8], MailboxError> {
    // NOTE: an over-long id fails as `Internal` because `MailboxError` has no
    // kind for invalid input. The HTTP layer is expected to reject it first.
    if message_id.len() > MAX_MESSAGE_ID_BYTES {
        return Err(MailboxError::Internal(format!(
            "message id of {} bytes is longer than the maximum of {MAX_MESSAGE_ID_BYTES}",
            message_id.len()
        )));
    }
    Ok(message_id.as_bytes())
}

fn message_id_prefix(recipient: &str, message_id: &str) -> Result<Vec<u8>, MailboxError> {
    let id = checked_message_id(message_id)?;
    let mut key = Vec::with_capacity(recipient.len() + id.len() + 11);
    key.extend_from_slice(recipient.as_bytes());
    key.push(0);
    push_short_bytes(&mut key, id);
    Ok(key)
}

fn message_id_key(recipient: &str, message_id: &str, seq: u64) -> Result<Vec<u8>, MailboxError> {
    let mut key = message_id_prefix(recipient, message_id)?;
    key.extend_from_slice(&seq.to_be_bytes());
    Ok(key)
}

fn dedupe_key(recipient: &str, sender: &str, message_id: &str) -> Result<Vec<u8>, MailboxError> {
    let id = checked_message_id(message_id)?;
    let mut key = Vec::with_capacity(recipient.len() + sender.len() + id.len() + 4);
    key.extend_from_slice(recipient.as_bytes());
    key.push(0);
    key.extend_from_slice(sender.as_bytes());
    key.push(0);
    push_short_bytes(&mut key, id);
    Ok(key)
}

fn recipient_of_dedupe_key(dedupe_key: &[u8]) -> Result<&str, MailboxError> {
    let end = dedupe_key
        .iter()
        .position(|&byte| byte == 0)
        .ok_or_else(|| corrupt("dedupe key"))?;
    std::str::from_utf8(&dedupe_key[..end]).map_err(|_| corrupt("dedupe key"))
}

fn dedupe_time_key(accepted_ms: u64, dedupe_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + dedupe_key.len());
    key.extend_from_slice(&accepted_ms.to_be_bytes());
    key.extend_from_slice(dedupe_key);
    key
}

fn split_dedupe_time_key(key: &[u8]) -> Result<(u64, &[u8]), MailboxError> {
    let accepted_ms = read_u64(key, 0)?;
    Ok((accepted_ms, &key[8..]))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tempfile::TempDir;

    use super::*;
    use crate::mailbox::conformance::{
        self, CASE_TIMEOUT, address, append_new, message, roomy_settings, stored_seqs,
    };

    fn open_in(dir: &TempDir, settings: MailboxSettings) -> EmbeddedMailbox {
        EmbeddedMailbox::open(dir.path(), settings).expect("the mailbox opens")
    }

    /// Keeps each mailbox's directory alive as long as the mailbox.
    struct InTempDir {
        mailbox: EmbeddedMailbox,
        _dir: TempDir,
    }

    #[async_trait]
    impl Mailbox for InTempDir {
        async fn append(&self, message: NewMessage) -> Result<Appended, MailboxError> {
            self.mailbox.append(message).await
        }
        async fn read(
            &self,
            recipient: &Address,
            after: u64,
            limit: usize,
        ) -> Result<Vec<StoredMessage>, MailboxError> {
            self.mailbox.read(recipient, after, limit).await
        }
        async fn ack(&self, recipient: &Address, target: AckTarget) -> Result<u64, MailboxError> {
            self.mailbox.ack(recipient, target).await
        }
        async fn count(&self, recipient: &Address) -> Result<u64, MailboxError> {
            self.mailbox.count(recipient).await
        }
        async fn expire(&self, now: SystemTime) -> Result<u64, MailboxError> {
            self.mailbox.expire(now).await
        }
        async fn check(&self) -> Result<(), MailboxError> {
            self.mailbox.check().await
        }
        async fn close(&self) {
            self.mailbox.close().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_conformance_suite() {
        conformance::run_all(|settings| async move {
            let dir = TempDir::new().expect("a temporary directory");
            let mailbox = open_in(&dir, settings);
            InTempDir { mailbox, _dir: dir }
        })
        .await;
    }

    async fn with_timeout<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(CASE_TIMEOUT, future)
            .await
            .expect("the test finishes in time")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_messages_seq_and_cursor() {
        let dir = TempDir::new().expect("a temporary directory");
        with_timeout(async {
            let mailbox = open_in(&dir, roomy_settings());
            conformance::fill_before_reopen(&mailbox).await;
            append_new(&mailbox, message("carol", "alice", "m1", "m1")).await;
            mailbox.close().await;
            drop(mailbox);

            let mailbox = open_in(&dir, roomy_settings());
            conformance::check_state_after_reopen(&mailbox).await;
            assert_eq!(
                append_new(&mailbox, message("carol", "alice", "m2", "m2")).await,
                2
            );
            mailbox.close().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_after_drop_without_close() {
        let dir = TempDir::new().expect("a temporary directory");
        with_timeout(async {
            let mailbox = open_in(&dir, roomy_settings());
            append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
            append_new(&mailbox, message("bob", "alice", "m2", "m2")).await;
            let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(100)).await;
            assert_eq!(acked.expect("ack succeeds"), 2);
            drop(mailbox);

            let mailbox = open_in(&dir, roomy_settings());
            assert!(stored_seqs(&mailbox, "bob").await.is_empty());
            assert_eq!(
                append_new(&mailbox, message("bob", "alice", "m3", "m3")).await,
                3
            );
            assert_eq!(stored_seqs(&mailbox, "bob").await, [3]);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_open_of_directory_is_unavailable() {
        let dir = TempDir::new().expect("a temporary directory");
        let _first = open_in(&dir, roomy_settings());
        let second = EmbeddedMailbox::open(dir.path(), roomy_settings());
        assert!(
            matches!(second, Err(MailboxError::Unavailable(_))),
            "second open succeeded"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_mailbox_of_expired_messages_accepts() {
        let dir = TempDir::new().expect("a temporary directory");
        let settings = MailboxSettings {
            max_stored_per_user: 2,
            message_ttl: Duration::from_millis(100),
            ..roomy_settings()
        };
        with_timeout(async {
            let mailbox = open_in(&dir, settings);
            append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
            append_new(&mailbox, message("bob", "alice", "m2", "m2")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;

            assert_eq!(
                append_new(&mailbox, message("bob", "alice", "m3", "m3")).await,
                3
            );
            assert_eq!(
                mailbox
                    .count(&address("bob"))
                    .await
                    .expect("count succeeds"),
                1
            );
            mailbox.close().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expire_sweeps_dead_dedupe_records() {
        let dir = TempDir::new().expect("a temporary directory");
        let settings = MailboxSettings {
            dedupe_window: Duration::from_millis(50),
            ..roomy_settings()
        };
        with_timeout(async {
            let mailbox = open_in(&dir, settings);
            append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
            append_new(&mailbox, message("bob", "alice", "m2", "m2")).await;
            let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(1)).await;
            assert_eq!(acked.expect("ack succeeds"), 1);
            tokio::time::sleep(Duration::from_millis(100)).await;

            let expired = mailbox.expire(SystemTime::now()).await;
            assert_eq!(expired.expect("expire succeeds"), 0);
            let store = &mailbox.store;
            assert_eq!(
                store.dedupe.inner().len().expect("len succeeds"),
                1,
                "m2 is stored"
            );
            assert_eq!(store.dedupe_by_time.inner().len().expect("len succeeds"), 0);

            let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(2)).await;
            assert_eq!(acked.expect("ack succeeds"), 1);
            assert_eq!(store.dedupe.inner().len().expect("len succeeds"), 0);
            assert_eq!(store.message_ids.inner().len().expect("len succeeds"), 0);
            assert_eq!(store.messages.inner().len().expect("len succeeds"), 0);
            mailbox.close().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits() {
        const COUNT: usize = 300;
        let dir = TempDir::new().expect("a temporary directory");
        with_timeout(async {
            let mailbox = open_in(&dir, roomy_settings());
            let appends = (0..COUNT).map(|index| {
                let id = format!("m{index}");
                mailbox.append(message("bob", "alice", &id, &id))
            });
            let results = futures_util::future::join_all(appends).await;
            assert!(
                results
                    .iter()
                    .all(|result| matches!(result, Ok(Appended::New(_))))
            );

            let groups = mailbox.store.committed_groups.load(Ordering::Relaxed);
            assert!(groups >= 2, "{COUNT} appends in {groups} commits");
            assert!(
                groups < COUNT as u64 / 4,
                "{COUNT} appends in {groups} commits"
            );
            mailbox.close().await;
        })
        .await;
    }

    /// Names the directory a [`crash_child_appends`] process writes to.
    const CRASH_DIR_VARIABLE: &str = "ROUTING_MAILBOX_CRASH_TEST_DIR";

    /// Appends until killed and prints the seq of every accepted append. It
    /// runs only as the child process of [`accepted_appends_survive_sigkill`].
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs only as the child process of accepted_appends_survive_sigkill"]
    async fn crash_child_appends() {
        let Some(dir) = std::env::var_os(CRASH_DIR_VARIABLE) else {
            return;
        };
        let mailbox =
            EmbeddedMailbox::open(Path::new(&dir), roomy_settings()).expect("the mailbox opens");
        // The parent kills this process long before the last round.
        for round in 0..1000 {
            let appends = (0..16).map(|index| {
                let id = format!("m{round}-{index}");
                mailbox.append(message("bob", "alice", &id, &id))
            });
            for result in futures_util::future::join_all(appends).await {
                if let Ok(Appended::New(stored)) = result {
                    println!("accepted {}", stored.seq);
                }
            }
        }
    }

    #[test]
    fn accepted_appends_survive_sigkill() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};

        let dir = TempDir::new().expect("a temporary directory");
        let mut child = Command::new(std::env::current_exe().expect("the test binary path"))
            .args([
                "mailbox::embedded::tests::crash_child_appends",
                "--exact",
                "--ignored",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_VARIABLE, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the child test process starts");

        let stdout = child.stdout.take().expect("the child stdout is piped");
        let (lines, accepted) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(seq) = line.strip_prefix("accepted ") {
                    let _ = lines.send(seq.parse::<u64>().expect("the child prints a seq"));
                }
            }
        });

        let mut seqs = Vec::new();
        while seqs.len() < 2000 {
            match accepted.recv_timeout(CASE_TIMEOUT) {
                Ok(seq) => seqs.push(seq),
                Err(err) => panic!(
                    "the child stopped accepting after {} appends: {err}",
                    seqs.len()
                ),
            }
        }
        child.kill().expect("SIGKILL reaches the child");
        child.wait().expect("the child exits");
        seqs.extend(accepted.try_iter());

        let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
        let stored = runtime.block_on(async {
            let mailbox = open_in(&dir, roomy_settings());
            with_timeout(stored_seqs(&mailbox, "bob")).await
        });
        let stored: std::collections::HashSet<u64> = stored.into_iter().collect();
        let lost: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|seq| !stored.contains(seq))
            .collect();
        assert!(
            lost.is_empty(),
            "{} of {} accepted appends lost: {lost:?}",
            lost.len(),
            seqs.len()
        );
    }

    #[test]
    fn message_value_round_trips() {
        let new = message("bob", "alice", "m1", "payload");
        let value = encode_message(42, new.sender.as_str(), &new);
        let decoded = decode_message(&value).expect("the value decodes");
        assert_eq!(decoded.received_at_ms, 42);
        assert_eq!(decoded.sender, "urn:sm:user:alice");
        assert_eq!(decoded.message_id, "m1");
        assert_eq!(decoded.envelope_json, &*new.envelope_json);
    }

    #[test]
    fn truncated_values_are_corrupt() {
        let new = message("bob", "alice", "m1", "payload");
        let value = encode_message(42, new.sender.as_str(), &new);
        assert!(matches!(
            decode_message(&value[..12]),
            Err(MailboxError::Internal(_))
        ));
        assert!(matches!(
            decode_message(&value[..4]),
            Err(MailboxError::Internal(_))
        ));
        assert!(matches!(
            Meta::decode(&[0; 31]),
            Err(MailboxError::Internal(_))
        ));
        assert!(matches!(
            DedupeRecord::decode(&[0; 33]),
            Err(MailboxError::Internal(_))
        ));
    }

    #[test]
    fn records_round_trip() {
        let meta = Meta {
            last_seq: 7,
            ack_cursor: 3,
            stored: 4,
            last_received_ms: 99,
        };
        assert_eq!(Meta::decode(&meta.encode()).expect("meta decodes"), meta);
        let record = DedupeRecord {
            seq: 5,
            content_hash: u128::MAX - 1,
            accepted_ms: 12,
        };
        assert_eq!(
            DedupeRecord::decode(&record.encode()).expect("record decodes"),
            record
        );
    }

    #[test]
    fn message_keys_sort_by_seq() {
        let low = message_key("urn:sm:user:bob", 255);
        let high = message_key("urn:sm:user:bob", 256);
        assert!(low < high);
        assert!(message_key("urn:sm:user:bob", u64::MAX) < message_key("urn:sm:user:bob.", 0));
        assert_eq!(seq_from_key_suffix(&high).expect("the key has a seq"), 256);
    }

    #[test]
    fn message_id_prefix_does_not_match_longer_id() {
        let short = message_id_prefix("r", "a").expect("the id fits");
        let long = message_id_key("r", "ab", 1).expect("the id fits");
        assert!(!long.starts_with(&short));
        let too_long = "x".repeat(MAX_MESSAGE_ID_BYTES + 1);
        assert!(matches!(
            message_id_prefix("r", &too_long),
            Err(MailboxError::Internal(_))
        ));
    }
}
