//! The embedded mailbox: an append-only log of records in `data_dir`, an
//! in-memory index, and group commit.
//!
//! One writer thread owns every change. Callers queue appends, acks and
//! expiry runs on a bounded channel. The writer applies up to
//! [`MAX_GROUP_REQUESTS`] queued requests in order to the [`index::Index`],
//! which encodes one record per change into the group's buffer. The writer
//! then writes the buffer to the head segment with one `write` and one
//! `fdatasync`. Only then does it make the new messages visible to reads and
//! reply to each caller, so an accepted append survives `kill -9` and power
//! loss.
//!
//! The index holds, per recipient, the counters, the dedupe records and one
//! entry per stored message with the file location of its envelope. Reads
//! take the entries from the index and the envelopes from the files with
//! positioned reads, and never wait for a disk sync.
//!
//! The log only grows until a compaction: when it is at least twice the size
//! of the live messages (and larger than [`LogTuning::compact_min_bytes`]),
//! the writer writes the live state into a new base segment and deletes the
//! older segments. Startup replays the newest base segment and the segments
//! after it. See `log.rs` for the file format.
//!
//! NOTE: the index keeps about 250 bytes (estimated from struct sizes) per
//! message that is stored or was accepted within `limits.dedupe_window`, so
//! memory grows with the message rate times that window.

mod index;
mod log;

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use routing_protocol::Address;
use tokio::sync::{mpsc, oneshot};

use self::index::{GroupLog, Index, Location};
use self::log::{HEADER_LEN, Record, SegmentKind, corrupt, io_error, segment_path};
use super::{
    AckTarget, Appended, Mailbox, MailboxError, MailboxSettings, NewMessage, StoredMessage,
    unix_millis,
};

/// Requests that may wait in the writer's queue; callers wait when it is full.
const QUEUE_CAPACITY: usize = 4096;

/// Requests applied and committed together in one write and sync.
pub const MAX_GROUP_REQUESTS: usize = 256;

/// The file whose lock keeps a second process out of the directory.
const LOCK_FILE: &str = "LOCK";

/// Sizes that decide when the log starts a new segment and when it compacts.
#[derive(Debug, Clone, Copy)]
pub struct LogTuning {
    /// A segment this long is closed and a new one started.
    pub segment_bytes: u64,
    /// The log is never compacted while it is shorter than this.
    pub compact_min_bytes: u64,
}

impl Default for LogTuning {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            compact_min_bytes: 128 << 20,
        }
    }
}

/// The append-only mailbox. See the module docs for the design.
pub struct EmbeddedMailbox {
    shared: Arc<Shared>,
    /// `None` only while the mailbox is dropped.
    requests: Option<mpsc::Sender<Request>>,
    closed: AtomicBool,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Holds the directory lock until the mailbox is dropped.
    _lock: File,
}

/// The state that the writer thread and readers share.
struct Shared {
    index: RwLock<Index>,
    /// A read handle on each segment, for envelope reads.
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// Groups committed since open, for tests that check grouping.
    committed_groups: AtomicU64,
    /// Compactions finished since open.
    compactions: AtomicU64,
    /// Set when a write or sync failed. The index may then hold changes
    /// that are not on disk, so the mailbox accepts no more writes until
    /// the process restarts and replays the files.
    write_failed: AtomicBool,
}

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl EmbeddedMailbox {
    /// Opens or creates the mailbox in `dir`, replays its files and starts
    /// its writer thread.
    ///
    /// Fails with [`MailboxError::Unavailable`] when another process has
    /// the directory locked, and with [`MailboxError::Internal`] when the files
    /// cannot be read or are damaged before their last record.
    pub fn open(dir: &Path, settings: MailboxSettings) -> Result<Self, MailboxError> {
        Self::open_tuned(dir, settings, LogTuning::default())
    }

    /// Like [`EmbeddedMailbox::open`], with other segment and compaction sizes.
    pub fn open_tuned(
        dir: &Path,
        settings: MailboxSettings,
        tuning: LogTuning,
    ) -> Result<Self, MailboxError> {
        std::fs::create_dir_all(dir).map_err(|err| io_error("create", dir, &err))?;
        reject_earlier_format(dir)?;
        let lock = lock_dir(dir)?;
        let started = Instant::now();
        let recovered = recover(dir, &settings)?;
        tracing::info!(
            path = %dir.display(),
            stored = recovered.index.stored(),
            log_bytes = recovered.writer_log_bytes,
            elapsed_ms = started.elapsed().as_millis(),
            max_stored_per_user = settings.max_stored_per_user,
            "embedded mailbox opened"
        );

        let writer_state = LogWriter {
            dir: dir.to_path_buf(),
            segment: recovered.head_segment,
            file: recovered.head_file,
            len: recovered.head_len,
            log_bytes: recovered.writer_log_bytes,
            tuning,
            compact_at: tuning.compact_min_bytes,
        };
        let shared = Arc::new(Shared {
            index: RwLock::new(recovered.index),
            files: RwLock::new(recovered.files),
            committed_groups: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            write_failed: AtomicBool::new(false),
        });
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("mailbox-writer".into())
            .spawn(move || run_writer(&writer_shared, writer_state, receiver))
            .map_err(|err| {
                MailboxError::Internal(format!("failed to start the mailbox writer thread: {err}"))
            })?;

        Ok(Self {
            shared,
            requests: Some(sender),
            closed: AtomicBool::new(false),
            writer: Mutex::new(Some(writer)),
            _lock: lock,
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
        self.open_sender()?;
        let recipient = recipient.clone();
        let now_ms = unix_millis(SystemTime::now());
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            read_messages(&shared, recipient.as_str(), after, limit, now_ms)
        })
        .await
        .map_err(|err| MailboxError::Internal(format!("mailbox read task failed: {err}")))?
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
        self.open_sender()?;
        Ok(read_lock(&self.shared.index).count(recipient.as_str()))
    }

    async fn expire(&self, now: SystemTime) -> Result<u64, MailboxError> {
        let now_ms = unix_millis(now);
        self.call(|reply| Request::Expire { now_ms, reply }).await
    }

    async fn check(&self) -> Result<(), MailboxError> {
        if self.shared.write_failed.load(Ordering::Acquire) {
            return Err(write_failed_error());
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

fn write_failed_error() -> MailboxError {
    MailboxError::Unavailable(
        "a write to disk failed, so the store accepts no more writes; restart the process".into(),
    )
}

/// Fails when `dir` contains the fjall store of routing-service versions
/// before the append-only log, whose messages this version cannot read.
/// Starting over it would hide those messages, so the start fails instead.
fn reject_earlier_format(dir: &Path) -> Result<(), MailboxError> {
    if dir.join("keyspaces").is_dir() && dir.join("version").is_file() {
        return Err(MailboxError::Internal(format!(
            "{} holds a mailbox in the format of an earlier routing-service version, \
             which this version cannot read; deliver or export its messages with the \
             earlier version, or set data_dir to an empty folder",
            dir.display()
        )));
    }
    Ok(())
}

/// Takes the directory's lock file, so two processes never write one log.
fn lock_dir(dir: &Path) -> Result<File, MailboxError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|err| io_error("open", &path, &err))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(MailboxError::Unavailable(format!(
            "the mailbox directory {} is in use by another process",
            dir.display()
        ))),
        Err(TryLockError::Error(err)) => Err(io_error("lock", &path, &err)),
    }
}

/// Reads committed messages from the index, then their envelopes from disk.
fn read_messages(
    shared: &Shared,
    recipient: &str,
    after: u64,
    limit: usize,
    now_ms: u64,
) -> Result<Vec<StoredMessage>, MailboxError> {
    let (items, handles) = {
        let index = read_lock(&shared.index);
        let items = index.read(recipient, after, limit, now_ms);
        let files = read_lock(&shared.files);
        let handles = items
            .iter()
            .map(|item| segment_file(&files, &item.location))
            .collect::<Result<Vec<_>, _>>()?;
        (items, handles)
    };

    items
        .into_iter()
        .zip(handles)
        .map(|(item, file)| {
            Ok(StoredMessage {
                seq: item.seq,
                received_at_ms: item.received_at_ms,
                message_id: item.message_id,
                envelope_json: read_envelope(&file, &item.location)?.into(),
            })
        })
        .collect()
}

fn segment_file(
    files: &HashMap<u32, Arc<File>>,
    location: &Location,
) -> Result<Arc<File>, MailboxError> {
    files
        .get(&location.segment)
        .cloned()
        .ok_or_else(|| corrupt(&format!("segment {} is not open", location.segment)))
}

fn read_envelope(file: &File, location: &Location) -> Result<String, MailboxError> {
    let mut bytes = vec![0; location.len as usize];
    file.read_exact_at(&mut bytes, location.offset)
        .map_err(|err| {
            MailboxError::Internal(format!(
                "failed to read a message from segment {}: {err}",
                location.segment
            ))
        })?;
    String::from_utf8(bytes).map_err(|_| corrupt("a stored envelope is not UTF-8"))
}

// ---------------------------------------------------------------------------
// Startup.

struct Recovered {
    index: Index,
    files: HashMap<u32, Arc<File>>,
    head_segment: u32,
    head_file: File,
    /// Bytes in the head segment.
    head_len: u64,
    writer_log_bytes: u64,
}

/// Replays the newest base segment and the segments after it, cuts off a
/// torn final write, deletes obsolete segments, and starts a new head
/// segment.
fn recover(dir: &Path, settings: &MailboxSettings) -> Result<Recovered, MailboxError> {
    let mut ids = log::list_segments(dir)?;
    drop_torn_creation(dir, &mut ids)?;
    let first = newest_base(dir, &ids)?;
    for &obsolete in &ids[..first] {
        let path = segment_path(dir, obsolete);
        std::fs::remove_file(&path).map_err(|err| io_error("delete", &path, &err))?;
    }
    let ids = &ids[first..];

    let now_ms = unix_millis(SystemTime::now());
    let mut index = Index::new(settings);
    let mut files = HashMap::new();
    let mut log_bytes = 0;
    let mut empty_log_segment = None;
    for (position, &id) in ids.iter().enumerate() {
        let path = segment_path(dir, id);
        let end = log::scan_segment(&path, |scanned| {
            let (record, envelope_start) = log::decode(scanned.body)?;
            let location = match (&record, envelope_start) {
                (Record::Append { envelope, .. }, Some(start)) => Some(Location {
                    segment: id,
                    offset: scanned.body_offset + start as u64,
                    len: u32::try_from(envelope.len()).map_err(|_| corrupt("envelope length"))?,
                }),
                _ => None,
            };
            let record_len = u32::try_from(scanned.body.len() + log::FRAME_LEN)
                .map_err(|_| corrupt("record length"))?;
            index.replay(record, location, record_len, now_ms)
        })?;
        if end.valid_len < end.file_len {
            if position + 1 < ids.len() {
                return Err(corrupt(&format!(
                    "{} is damaged at byte {}, before its last record",
                    path.display(),
                    end.valid_len
                )));
            }
            if let Some(next) = log::find_record_after(&path, end.valid_len)? {
                return Err(corrupt(&format!(
                    "{} is damaged at byte {}, and a whole record follows at byte {next}, \
                     so this is not an interrupted write. To start without the records \
                     from byte {} on, truncate the file to {} bytes",
                    path.display(),
                    end.valid_len,
                    end.valid_len,
                    end.valid_len
                )));
            }
            tracing::warn!(
                path = %path.display(),
                discarded_bytes = end.file_len - end.valid_len,
                "discarding an incomplete write at the end of the mailbox log"
            );
            truncate(&path, end.valid_len)?;
        }
        log_bytes += end.valid_len;
        if end.valid_len == HEADER_LEN && log::read_kind(&path)? == SegmentKind::Log {
            empty_log_segment = Some(id);
        }
        files.insert(id, Arc::new(open_for_reads(&path)?));
    }
    index.finish_replay();

    // A newest log segment without records (the process stopped before its
    // first write) becomes the head again, so restarts add no files.
    if let Some(&last) = ids.last()
        && empty_log_segment == Some(last)
    {
        let path = segment_path(dir, last);
        let head_file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|err| io_error("open", &path, &err))?;
        return Ok(Recovered {
            index,
            files,
            head_segment: last,
            head_file,
            head_len: HEADER_LEN,
            writer_log_bytes: log_bytes,
        });
    }

    let head_segment = match ids.last() {
        Some(&last) => last
            .checked_add(1)
            .ok_or_else(|| corrupt("segment ids are exhausted"))?,
        None => 1,
    };
    let head_file = log::create_log_segment(dir, head_segment)?;
    files.insert(
        head_segment,
        Arc::new(open_for_reads(&segment_path(dir, head_segment))?),
    );
    Ok(Recovered {
        index,
        files,
        head_segment,
        head_file,
        head_len: HEADER_LEN,
        writer_log_bytes: log_bytes + HEADER_LEN,
    })
}

/// Deletes the last segment when it is shorter than a header: a crash hit
/// while it was being created, before anything was written to it.
fn drop_torn_creation(dir: &Path, ids: &mut Vec<u32>) -> Result<(), MailboxError> {
    let Some(&last) = ids.last() else {
        return Ok(());
    };
    let path = segment_path(dir, last);
    let len = std::fs::metadata(&path)
        .map_err(|err| io_error("read", &path, &err))?
        .len();
    if len < HEADER_LEN {
        std::fs::remove_file(&path).map_err(|err| io_error("delete", &path, &err))?;
        ids.pop();
    }
    Ok(())
}

/// Returns the position in `ids` of the newest base segment, or 0.
fn newest_base(dir: &Path, ids: &[u32]) -> Result<usize, MailboxError> {
    for (position, &id) in ids.iter().enumerate().rev() {
        if log::read_kind(&segment_path(dir, id))? == SegmentKind::Base {
            return Ok(position);
        }
    }
    Ok(0)
}

fn truncate(path: &Path, len: u64) -> Result<(), MailboxError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| {
            file.set_len(len)?;
            file.sync_all()
        })
        .map_err(|err| io_error("truncate", path, &err))
}

fn open_for_reads(path: &Path) -> Result<File, MailboxError> {
    File::open(path).map_err(|err| io_error("open", path, &err))
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

/// The result of a request and its reply channel, sent once the group is on disk.
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
        // send is ignored. Its write is on disk all the same.
        match self {
            Self::Appended(reply, result) => {
                let _ = reply.send(result);
            }
            Self::Count(reply, result) => {
                let _ = reply.send(result);
            }
        }
    }

    fn fail(self) {
        match self {
            Self::Appended(reply, _) => {
                let _ = reply.send(Err(write_failed_error()));
            }
            Self::Count(reply, _) => {
                let _ = reply.send(Err(write_failed_error()));
            }
        }
    }
}

/// Totals logged when the writer stops.
#[derive(Debug, Default)]
struct WriterTotals {
    appended: u64,
    acked: u64,
    expired: u64,
}

/// The head segment and the log's size, owned by the writer thread.
struct LogWriter {
    dir: PathBuf,
    segment: u32,
    file: File,
    /// Bytes in the head segment.
    len: u64,
    /// Bytes in every segment together.
    log_bytes: u64,
    tuning: LogTuning,
    /// The log size from which a compaction is tried.
    compact_at: u64,
}

/// Takes queued requests in groups until the channel closes or a close
/// request arrives.
fn run_writer(shared: &Shared, mut writer: LogWriter, mut receiver: mpsc::Receiver<Request>) {
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
        close_replies = commit_group(shared, &mut writer, group, &mut totals);
    }

    // Requests still queued behind a close request get `Unavailable` when
    // their reply channels drop with the receiver.
    drop(receiver);
    tracing::info!(
        groups = shared.committed_groups.load(Ordering::Relaxed),
        appended = totals.appended,
        acked = totals.acked,
        expired = totals.expired,
        "embedded mailbox writer stopped"
    );
    for reply in close_replies {
        let _ = reply.send(());
    }
}

/// Applies one group to the index, writes and syncs its records, and sends
/// every reply. Returns the reply channels of close requests. Requests after
/// the first close request in the group are rejected as closed.
fn commit_group(
    shared: &Shared,
    writer: &mut LogWriter,
    group: Vec<Request>,
    totals: &mut WriterTotals,
) -> Vec<oneshot::Sender<()>> {
    let mut close_replies = Vec::new();
    if shared.write_failed.load(Ordering::Acquire) {
        for request in group {
            reject(request, &mut close_replies, write_failed_error);
        }
        return close_replies;
    }

    let mut log = GroupLog::new(writer.segment, writer.len);
    let mut replies = Vec::with_capacity(group.len());
    {
        let mut index = write_lock(&shared.index);
        for request in group {
            if !close_replies.is_empty() {
                reject(request, &mut close_replies, closed_error);
                continue;
            }
            match apply(&mut index, &mut log, request, totals) {
                Applied::Reply(pending) => replies.push(pending),
                Applied::Close(reply) => close_replies.push(reply),
            }
        }
    }

    if let Err(err) = writer.write_and_sync(&log.bytes) {
        shared.write_failed.store(true, Ordering::Release);
        tracing::error!(error = %err, requests = replies.len(), "mailbox write failed; the store accepts no more writes");
        replies.into_iter().for_each(PendingReply::fail);
        return close_replies;
    }
    if !log.appended_to.is_empty() {
        write_lock(&shared.index).publish(&log.appended_to);
    }
    shared.committed_groups.fetch_add(1, Ordering::Relaxed);
    replies.into_iter().for_each(PendingReply::send);

    writer.maintain(shared);
    close_replies
}

/// Rejects a request that comes after a close request or a failed write.
fn reject(
    request: Request,
    close_replies: &mut Vec<oneshot::Sender<()>>,
    error: fn() -> MailboxError,
) {
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

enum Applied {
    Reply(PendingReply),
    Close(oneshot::Sender<()>),
}

fn apply(
    index: &mut Index,
    log: &mut GroupLog,
    request: Request,
    totals: &mut WriterTotals,
) -> Applied {
    let now_ms = unix_millis(SystemTime::now());
    let pending = match request {
        Request::Append { message, reply } => {
            let result = index.append(log, &message, now_ms);
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
            let acked = index.ack(log, recipient.as_str(), &target, now_ms);
            totals.acked += acked;
            PendingReply::Count(reply, Ok(acked))
        }
        Request::Expire { now_ms, reply } => {
            let expired = index.expire(log, now_ms);
            totals.expired += expired;
            PendingReply::Count(reply, Ok(expired))
        }
        Request::Close { reply } => return Applied::Close(reply),
    };
    Applied::Reply(pending)
}

impl LogWriter {
    /// Appends a group's records to the head segment and syncs them.
    fn write_and_sync(&mut self, bytes: &[u8]) -> Result<(), MailboxError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.segment);
        self.file
            .write_all(bytes)
            .and_then(|()| self.file.sync_data())
            .map_err(|err| io_error("write", &path, &err))?;
        self.len += bytes.len() as u64;
        self.log_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Starts a new segment or compacts when the log has grown enough.
    fn maintain(&mut self, shared: &Shared) {
        let live_bytes = read_lock(&shared.index).live_bytes();
        if self.log_bytes >= self.compact_at && self.log_bytes >= live_bytes.saturating_mul(2) {
            if let Err(err) = self.compact(shared) {
                tracing::error!(error = %err, "mailbox log compaction failed; retrying after the log grows");
            }
            self.compact_at =
                self.log_bytes.max(live_bytes.saturating_mul(2)) + self.tuning.compact_min_bytes;
            return;
        }
        if self.len >= self.tuning.segment_bytes
            && let Err(err) = self.start_segment(shared)
        {
            tracing::error!(error = %err, "starting a new mailbox log segment failed; retrying after the next write");
        }
    }

    fn start_segment(&mut self, shared: &Shared) -> Result<(), MailboxError> {
        let id = self
            .segment
            .checked_add(1)
            .ok_or_else(|| corrupt("segment ids are exhausted"))?;
        let file = log::create_log_segment(&self.dir, id)?;
        let reads = open_for_reads(&segment_path(&self.dir, id))?;
        write_lock(&shared.files).insert(id, Arc::new(reads));
        self.segment = id;
        self.file = file;
        self.len = HEADER_LEN;
        self.log_bytes += HEADER_LEN;
        Ok(())
    }

    /// Writes the live state into a new base segment, switches to it and a
    /// new head segment, and deletes the older segments.
    ///
    /// NOTE: requests wait while this runs, for a time that grows with the
    /// bytes of the stored messages.
    fn compact(&mut self, shared: &Shared) -> Result<(), MailboxError> {
        let started = Instant::now();
        let base = self
            .segment
            .checked_add(1)
            .ok_or_else(|| corrupt("segment ids are exhausted"))?;
        let head = base
            .checked_add(1)
            .ok_or_else(|| corrupt("segment ids are exhausted"))?;
        let temporary = self
            .dir
            .join(format!("{base:010}{}", log::TEMPORARY_SUFFIX));

        let written = write_base_file(shared, &temporary, base);
        let (moved, base_len) = match written {
            Ok(written) => written,
            Err(err) => {
                let _ = std::fs::remove_file(&temporary);
                return Err(err);
            }
        };
        let base_path = segment_path(&self.dir, base);
        if let Err(err) = std::fs::rename(&temporary, &base_path) {
            // A leftover file would make every later compaction fail to
            // create it.
            let _ = std::fs::remove_file(&temporary);
            return Err(io_error("rename", &temporary, &err));
        }

        // From here on the base segment replaces the older ones at the next
        // startup, so a failure must stop writes to the old head segment.
        let switched = (|| {
            log::sync_dir(&self.dir)?;
            let head_file = log::create_log_segment(&self.dir, head)?;
            let base_reads = open_for_reads(&base_path)?;
            let head_reads = open_for_reads(&segment_path(&self.dir, head))?;
            Ok::<_, MailboxError>((head_file, base_reads, head_reads))
        })();
        let (head_file, base_reads, head_reads) = match switched {
            Ok(opened) => opened,
            Err(err) => {
                shared.write_failed.store(true, Ordering::Release);
                return Err(err);
            }
        };

        let obsolete: Vec<u32> = {
            let mut index = write_lock(&shared.index);
            index.relocate(&moved);
            let mut files = write_lock(&shared.files);
            let obsolete = files.keys().copied().collect();
            files.clear();
            files.insert(base, Arc::new(base_reads));
            files.insert(head, Arc::new(head_reads));
            obsolete
        };
        let log_bytes_before = self.log_bytes;
        self.segment = head;
        self.file = head_file;
        self.len = HEADER_LEN;
        self.log_bytes = base_len + HEADER_LEN;

        // Readers may still hold an old segment open; its data stays readable
        // until they close it.
        for id in obsolete {
            let path = segment_path(&self.dir, id);
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %err, "failed to delete an obsolete mailbox segment; startup deletes it");
            }
        }
        let _ = log::sync_dir(&self.dir);
        shared.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            log_bytes_before,
            log_bytes_after = self.log_bytes,
            messages = moved.len(),
            elapsed_ms = started.elapsed().as_millis(),
            "mailbox log compacted"
        );
        Ok(())
    }
}

/// Writes the index's live state to `path` as base segment `segment` and
/// syncs it. Returns each stored message's new location and the file length.
fn write_base_file(
    shared: &Shared,
    path: &Path,
    segment: u32,
) -> Result<(Vec<(Location, u32)>, u64), MailboxError> {
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .map_err(|err| io_error("create", path, &err))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let write_error = |err: std::io::Error| io_error("write", path, &err);
    out.write_all(&log::header(SegmentKind::Base))
        .map_err(write_error)?;

    let files = read_lock(&shared.files).clone();
    let now_ms = unix_millis(SystemTime::now());
    let mut offset = HEADER_LEN;
    let mut buffer = Vec::new();
    let moved = read_lock(&shared.index).write_base(
        now_ms,
        |location| read_envelope(&*segment_file(&files, location)?, location),
        |record| {
            buffer.clear();
            let envelope_start = record.encode_into(&mut buffer);
            out.write_all(&buffer).map_err(write_error)?;
            let moved = match (record, envelope_start) {
                (Record::Append { envelope, .. }, Some(start)) => Some((
                    Location {
                        segment,
                        offset: offset + start as u64,
                        len: u32::try_from(envelope.len()).expect("envelope fits in u32"),
                    },
                    u32::try_from(buffer.len()).expect("record fits in u32"),
                )),
                _ => None,
            };
            offset += buffer.len() as u64;
            Ok(moved)
        },
    )?;

    let file = out
        .into_inner()
        .map_err(|err| write_error(err.into_error()))?;
    file.sync_all().map_err(write_error)?;
    Ok((moved, offset))
}

#[cfg(test)]
mod tests;
