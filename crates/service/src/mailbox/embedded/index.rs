//! The embedded mailbox's in-memory index: per recipient, the counters, the
//! stored messages in seq order with the file location of each envelope, and
//! the dedupe records.
//!
//! Every change goes through the same primitives whether it comes from a
//! request (which also encodes the record into the group's log buffer) or
//! from replaying the files at startup, so both build the same state.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::super::{
    AckTarget, Appended, MailboxError, MailboxSettings, NewMessage, duration_millis,
};
use super::log::{MAX_RECORD_BYTES, Record, fits_short};

/// Maximum message id length, in bytes, that the store accepts. The HTTP layer
/// allows 128 characters, so this only stops a caller bug.
pub(super) const MAX_MESSAGE_ID_BYTES: usize = 1024;

/// Maximum envelope length, in bytes, that the store accepts: a record
/// with the longest addresses and id still fits [`MAX_RECORD_BYTES`].
/// `limits.max_envelope_bytes` is at most 16 MiB, so this only stops a
/// caller bug.
const MAX_ENVELOPE_BYTES: usize = MAX_RECORD_BYTES - (1 << 20);

/// The position of an envelope's bytes in the segment files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

/// The sender and message id of a message, joined by 0x00 (which neither
/// contains). It names the dedupe record and is shared with the message's
/// index entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct DedupeKey(Arc<str>);

impl DedupeKey {
    fn join(sender: &str, message_id: &str) -> String {
        let mut key = String::with_capacity(sender.len() + 1 + message_id.len());
        key.push_str(sender);
        key.push('\0');
        key.push_str(message_id);
        key
    }

    fn parts(&self) -> (&str, &str) {
        self.0.split_once('\0').unwrap_or((&self.0, ""))
    }

    fn sender(&self) -> &str {
        self.parts().0
    }

    fn message_id(&self) -> &str {
        self.parts().1
    }
}

impl Borrow<str> for DedupeKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A stored message in the index; its envelope stays in the files.
#[derive(Debug)]
struct Entry {
    seq: u64,
    received_at_ms: u64,
    key: DedupeKey,
    location: Location,
    /// Bytes of its append record, framing included, for the live-bytes total.
    record_len: u32,
}

/// The seq, content hash and acceptance time of the first message with a
/// (recipient, sender, messageId).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DedupeRecord {
    seq: u64,
    content_hash: u128,
    accepted_ms: u64,
}

#[derive(Debug)]
struct RecipientState {
    name: Arc<str>,
    /// The highest seq assigned, 0 before the first append.
    last_seq: u64,
    /// The `received_at_ms` of the message with `last_seq`.
    last_received_ms: u64,
    /// The highest seq whose group is on disk. Reads return nothing above it.
    committed_seq: u64,
    /// Stored messages, ascending by seq, expired ones included until
    /// `expire` deletes them.
    entries: VecDeque<Entry>,
    dedupe: HashMap<DedupeKey, DedupeRecord>,
}

impl RecipientState {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            last_seq: 0,
            last_received_ms: 0,
            committed_seq: 0,
            entries: VecDeque::new(),
            dedupe: HashMap::new(),
        }
    }

    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&seq, |entry| entry.seq)
    }
}

/// A dedupe record in acceptance order, so `expire` finds the records whose
/// window has passed without visiting every record.
#[derive(Debug)]
struct DedupeDue {
    accepted_ms: u64,
    recipient: Arc<str>,
    key: DedupeKey,
}

/// A message that a read returns, before its envelope is read from disk.
#[derive(Debug)]
pub(super) struct ReadItem {
    pub seq: u64,
    pub received_at_ms: u64,
    pub message_id: String,
    pub location: Location,
}

/// The records a group of requests adds to the log, and where they will land.
pub(super) struct GroupLog {
    pub bytes: Vec<u8>,
    segment: u32,
    /// File offset at which `bytes` will be written.
    start_offset: u64,
    /// Recipients that received a message in this group.
    pub appended_to: Vec<Arc<str>>,
}

impl GroupLog {
    pub(super) fn new(segment: u32, start_offset: u64) -> Self {
        Self {
            bytes: Vec::new(),
            segment,
            start_offset,
            appended_to: Vec::new(),
        }
    }

    fn push(&mut self, record: &Record<'_>) {
        record.encode_into(&mut self.bytes);
    }

    /// Encodes an append record; returns the envelope's location and the
    /// record's length.
    fn push_append(&mut self, record: &Record<'_>) -> (Location, u32) {
        let start = self.bytes.len();
        let envelope_start = record
            .encode_into(&mut self.bytes)
            .expect("an append record has an envelope");
        let Record::Append { envelope, .. } = record else {
            unreachable!("push_append takes append records")
        };
        let location = Location {
            segment: self.segment,
            offset: self.start_offset + envelope_start as u64,
            len: u32::try_from(envelope.len()).expect("envelope fits in u32"),
        };
        let record_len = u32::try_from(self.bytes.len() - start).expect("record fits in u32");
        (location, record_len)
    }
}

/// The whole in-memory state of the embedded mailbox.
pub(super) struct Index {
    recipients: HashMap<Arc<str>, RecipientState>,
    dedupe_by_time: VecDeque<DedupeDue>,
    /// Bytes of the append records of stored messages, framing included.
    live_bytes: u64,
    /// Stored messages over all recipients.
    stored: u64,
    ttl_ms: u64,
    dedupe_window_ms: u64,
    max_stored_per_user: u64,
}

/// A message to add to the index, from a request or from the files.
struct NewEntry<'a> {
    recipient: &'a str,
    seq: u64,
    received_at_ms: u64,
    content_hash: u128,
    key: DedupeKey,
    location: Location,
    record_len: u32,
}

impl Index {
    pub(super) fn new(settings: &MailboxSettings) -> Self {
        Self {
            recipients: HashMap::new(),
            dedupe_by_time: VecDeque::new(),
            live_bytes: 0,
            stored: 0,
            ttl_ms: duration_millis(settings.message_ttl),
            dedupe_window_ms: duration_millis(settings.dedupe_window),
            max_stored_per_user: settings.max_stored_per_user,
        }
    }

    pub(super) fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Dedupe records over all recipients.
    #[cfg(test)]
    pub(super) fn dedupe_records(&self) -> usize {
        self.recipients
            .values()
            .map(|state| state.dedupe.len())
            .sum()
    }

    pub(super) fn stored(&self) -> u64 {
        self.stored
    }

    fn is_expired(&self, received_at_ms: u64, now_ms: u64) -> bool {
        received_at_ms.saturating_add(self.ttl_ms) <= now_ms
    }

    fn window_passed(&self, accepted_ms: u64, now_ms: u64) -> bool {
        accepted_ms.saturating_add(self.dedupe_window_ms) <= now_ms
    }

    fn state_mut(&mut self, recipient: &str) -> &mut RecipientState {
        if !self.recipients.contains_key(recipient) {
            let name: Arc<str> = Arc::from(recipient);
            self.recipients
                .insert(Arc::clone(&name), RecipientState::new(name));
        }
        self.recipients
            .get_mut(recipient)
            .expect("the recipient was just inserted")
    }

    /// Returns whether `seq` is stored for `state` and not expired.
    fn is_stored(&self, state: &RecipientState, seq: u64, now_ms: u64) -> bool {
        state
            .position(seq)
            .is_ok_and(|at| !self.is_expired(state.entries[at].received_at_ms, now_ms))
    }

    // -----------------------------------------------------------------------
    // Primitives shared by requests and replay.

    fn insert_entry(&mut self, new: NewEntry<'_>) -> Result<(), MailboxError> {
        let state = self.state_mut(new.recipient);
        if state.entries.back().is_some_and(|last| last.seq >= new.seq) {
            return Err(super::log::corrupt(
                "a message's seq is not above the previous one",
            ));
        }
        state.last_seq = state.last_seq.max(new.seq);
        state.last_received_ms = state.last_received_ms.max(new.received_at_ms);
        let record = DedupeRecord {
            seq: new.seq,
            content_hash: new.content_hash,
            accepted_ms: new.received_at_ms,
        };
        state.dedupe.insert(new.key.clone(), record);
        let recipient = Arc::clone(&state.name);
        state.entries.push_back(Entry {
            seq: new.seq,
            received_at_ms: new.received_at_ms,
            key: new.key.clone(),
            location: new.location,
            record_len: new.record_len,
        });
        self.dedupe_by_time.push_back(DedupeDue {
            accepted_ms: new.received_at_ms,
            recipient,
            key: new.key,
        });
        self.live_bytes += u64::from(new.record_len);
        self.stored += 1;
        Ok(())
    }

    /// Deletes the recipient's messages with a seq up to `up_to`; returns how
    /// many there were.
    fn delete_up_to(&mut self, recipient: &str, up_to: u64, now_ms: u64) -> u64 {
        let window_ms = self.dedupe_window_ms;
        let Some(state) = self.recipients.get_mut(recipient) else {
            return 0;
        };
        let mut deleted = 0;
        while state
            .entries
            .front()
            .is_some_and(|entry| entry.seq <= up_to)
        {
            let entry = state.entries.pop_front().expect("the front entry exists");
            self.live_bytes -= u64::from(entry.record_len);
            forget_dedupe_if_done(state, &entry, window_ms, now_ms);
            deleted += 1;
        }
        self.stored -= deleted;
        deleted
    }

    /// Deletes the recipient's messages with these seqs; returns how many
    /// were stored.
    fn delete_seqs(&mut self, recipient: &str, seqs: &[u64], now_ms: u64) -> u64 {
        let window_ms = self.dedupe_window_ms;
        let Some(state) = self.recipients.get_mut(recipient) else {
            return 0;
        };
        let mut deleted = 0;
        for &seq in seqs {
            let Ok(at) = state.position(seq) else {
                continue;
            };
            let entry = state.entries.remove(at).expect("the entry exists");
            self.live_bytes -= u64::from(entry.record_len);
            forget_dedupe_if_done(state, &entry, window_ms, now_ms);
            deleted += 1;
        }
        self.stored -= deleted;
        deleted
    }

    // -----------------------------------------------------------------------
    // Requests. Each checks and changes the index and encodes its records
    // into the group's log.

    /// Appends with dedupe and the per-recipient limit.
    pub(super) fn append(
        &mut self,
        log: &mut GroupLog,
        message: &NewMessage,
        now_ms: u64,
    ) -> Result<Appended, MailboxError> {
        let recipient = message.recipient.as_str();
        let sender = message.sender.as_str();
        if message.message_id.len() > MAX_MESSAGE_ID_BYTES
            || !fits_short(recipient)
            || !fits_short(sender)
        {
            return Err(MailboxError::Internal(format!(
                "a recipient, sender or message id is longer than the store accepts \
                 ({MAX_MESSAGE_ID_BYTES} bytes for ids)"
            )));
        }
        // Startup rejects longer records as damage, so none may be written.
        if message.envelope_json.len() > MAX_ENVELOPE_BYTES {
            return Err(MailboxError::Internal(format!(
                "the envelope is {} bytes; the store accepts at most {MAX_ENVELOPE_BYTES}",
                message.envelope_json.len()
            )));
        }
        let key_text = DedupeKey::join(sender, &message.message_id);

        if let Some(state) = self.recipients.get(recipient)
            && let Some(record) = state.dedupe.get(key_text.as_str())
            && (!self.window_passed(record.accepted_ms, now_ms)
                || self.is_stored(state, record.seq, now_ms))
        {
            if record.content_hash != message.content_hash {
                return Err(MailboxError::Conflict {
                    message_id: message.message_id.clone(),
                });
            }
            return Ok(Appended::Duplicate { seq: record.seq });
        }

        let stored_count = self
            .recipients
            .get(recipient)
            .map_or(0, |state| state.entries.len() as u64);
        if stored_count >= self.max_stored_per_user {
            self.expire_recipient(log, recipient, now_ms);
            let stored_count = self.recipients[recipient].entries.len() as u64;
            if stored_count >= self.max_stored_per_user {
                return Err(MailboxError::Full {
                    limit: self.max_stored_per_user,
                });
            }
        }

        let state = self.state_mut(recipient);
        let seq = state.last_seq + 1;
        let received_at_ms = state.last_received_ms.max(now_ms);
        log.appended_to.push(Arc::clone(&state.name));
        let (location, record_len) = log.push_append(&Record::Append {
            recipient,
            seq,
            received_at_ms,
            content_hash: message.content_hash,
            sender,
            message_id: &message.message_id,
            envelope: &message.envelope_json,
        });
        self.insert_entry(NewEntry {
            recipient,
            seq,
            received_at_ms,
            content_hash: message.content_hash,
            key: DedupeKey(Arc::from(key_text)),
            location,
            record_len,
        })?;
        Ok(Appended::New(super::super::StoredMessage {
            seq,
            received_at_ms,
            message_id: message.message_id.clone(),
            envelope_json: Arc::clone(&message.envelope_json),
        }))
    }

    pub(super) fn ack(
        &mut self,
        log: &mut GroupLog,
        recipient: &str,
        target: &AckTarget,
        now_ms: u64,
    ) -> u64 {
        let Some(state) = self.recipients.get(recipient) else {
            return 0;
        };
        match target {
            AckTarget::UpTo(up_to) => {
                let last = (*up_to).min(state.last_seq);
                if state.entries.front().is_none_or(|entry| entry.seq > last) {
                    return 0;
                }
                self.log_delete_up_to(log, recipient, last, now_ms)
            }
            AckTarget::Ids(ids) => {
                // NOTE: this scans the recipient's stored messages once per
                // id, so its cost grows with `limits.max_stored_per_user`.
                let mut seqs: Vec<u64> = ids
                    .iter()
                    .flat_map(|id| {
                        state
                            .entries
                            .iter()
                            .filter(move |entry| entry.key.message_id() == id)
                            .map(|entry| entry.seq)
                    })
                    .collect();
                if seqs.is_empty() {
                    return 0;
                }
                seqs.sort_unstable();
                seqs.dedup();
                log.push(&Record::DeleteSeqs {
                    recipient,
                    seqs: seqs.clone(),
                });
                self.delete_seqs(recipient, &seqs, now_ms)
            }
        }
    }

    /// Deletes the expired messages of every recipient, then the dedupe
    /// records whose window has passed and whose message is gone. Returns
    /// how many messages were deleted.
    pub(super) fn expire(&mut self, log: &mut GroupLog, now_ms: u64) -> u64 {
        let due: Vec<(Arc<str>, u64)> = self
            .recipients
            .values()
            .filter_map(|state| {
                let up_to = self.last_expired_seq(state, now_ms)?;
                Some((Arc::clone(&state.name), up_to))
            })
            .collect();
        let mut expired = 0;
        for (recipient, up_to) in due {
            expired += self.log_delete_up_to(log, &recipient, up_to, now_ms);
        }
        self.sweep_dedupe(now_ms);
        expired
    }

    /// Deletes the expired prefix of one mailbox.
    fn expire_recipient(&mut self, log: &mut GroupLog, recipient: &str, now_ms: u64) {
        let Some(state) = self.recipients.get(recipient) else {
            return;
        };
        if let Some(up_to) = self.last_expired_seq(state, now_ms) {
            self.log_delete_up_to(log, recipient, up_to, now_ms);
        }
    }

    /// Returns the seq of the last expired message of a mailbox. Expired
    /// messages form a prefix because `received_at_ms` never decreases with
    /// seq.
    fn last_expired_seq(&self, state: &RecipientState, now_ms: u64) -> Option<u64> {
        state
            .entries
            .iter()
            .take_while(|entry| self.is_expired(entry.received_at_ms, now_ms))
            .last()
            .map(|entry| entry.seq)
    }

    /// Logs and applies the deletion of a recipient's messages up to `up_to`.
    fn log_delete_up_to(
        &mut self,
        log: &mut GroupLog,
        recipient: &str,
        up_to: u64,
        now_ms: u64,
    ) -> u64 {
        log.push(&Record::DeleteUpTo { recipient, up_to });
        self.delete_up_to(recipient, up_to, now_ms)
    }

    /// Drops dedupe records whose window has passed and whose message is no
    /// longer stored. A record whose message is still stored goes when that
    /// message is deleted (see [`forget_dedupe_if_done`]). Dropping needs no
    /// record in the log: replay drops the same records by the same rule.
    fn sweep_dedupe(&mut self, now_ms: u64) {
        while let Some(due) = self.dedupe_by_time.front() {
            if !self.window_passed(due.accepted_ms, now_ms) {
                break;
            }
            let due = self.dedupe_by_time.pop_front().expect("the front exists");
            let Some(state) = self.recipients.get(&due.recipient) else {
                continue;
            };
            let Some(record) = state.dedupe.get(&due.key).copied() else {
                continue;
            };
            if record.accepted_ms == due.accepted_ms && !self.is_stored(state, record.seq, now_ms) {
                let state = self
                    .recipients
                    .get_mut(&due.recipient)
                    .expect("the recipient exists");
                state.dedupe.remove(&due.key);
            }
        }
    }

    /// Makes the group's appends visible to reads once the group is on disk.
    pub(super) fn publish(&mut self, appended_to: &[Arc<str>]) {
        for recipient in appended_to {
            if let Some(state) = self.recipients.get_mut(recipient) {
                state.committed_seq = state.last_seq;
            }
        }
    }

    // -----------------------------------------------------------------------
    // Reads.

    /// Returns up to `limit` committed, unexpired messages with `seq > after`.
    pub(super) fn read(
        &self,
        recipient: &str,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Vec<ReadItem> {
        let Some(state) = self.recipients.get(recipient) else {
            return Vec::new();
        };
        let start = state.entries.partition_point(|entry| entry.seq <= after);
        state
            .entries
            .range(start..)
            .take_while(|entry| entry.seq <= state.committed_seq)
            .filter(|entry| !self.is_expired(entry.received_at_ms, now_ms))
            .take(limit)
            .map(|entry| ReadItem {
                seq: entry.seq,
                received_at_ms: entry.received_at_ms,
                message_id: entry.key.message_id().to_owned(),
                location: entry.location,
            })
            .collect()
    }

    /// Counts stored messages, including expired ones not yet deleted.
    pub(super) fn count(&self, recipient: &str) -> u64 {
        self.recipients
            .get(recipient)
            .map_or(0, |state| state.entries.len() as u64)
    }

    // -----------------------------------------------------------------------
    // Replay and compaction.

    /// Applies a record read back from the files. `location` is set for
    /// append records. Deletes use `now_ms` to drop dedupe records whose
    /// window has passed, as the request did or a later sweep would.
    pub(super) fn replay(
        &mut self,
        record: Record<'_>,
        location: Option<Location>,
        record_len: u32,
        now_ms: u64,
    ) -> Result<(), MailboxError> {
        match record {
            Record::Append {
                recipient,
                seq,
                received_at_ms,
                content_hash,
                sender,
                message_id,
                ..
            } => {
                let location = location.expect("append records have a location");
                self.insert_entry(NewEntry {
                    recipient,
                    seq,
                    received_at_ms,
                    content_hash,
                    key: DedupeKey(Arc::from(DedupeKey::join(sender, message_id))),
                    location,
                    record_len,
                })?;
            }
            Record::DeleteUpTo { recipient, up_to } => {
                self.delete_up_to(recipient, up_to, now_ms);
            }
            Record::DeleteSeqs { recipient, seqs } => {
                self.delete_seqs(recipient, &seqs, now_ms);
            }
            Record::Cursor {
                recipient,
                last_seq,
                last_received_ms,
            } => {
                let state = self.state_mut(recipient);
                state.last_seq = state.last_seq.max(last_seq);
                state.last_received_ms = state.last_received_ms.max(last_received_ms);
            }
            Record::Dedupe {
                recipient,
                sender,
                message_id,
                seq,
                content_hash,
                accepted_ms,
            } => {
                let key = DedupeKey(Arc::from(DedupeKey::join(sender, message_id)));
                let state = self.state_mut(recipient);
                let record = DedupeRecord {
                    seq,
                    content_hash,
                    accepted_ms,
                };
                state.dedupe.insert(key.clone(), record);
                let recipient = Arc::clone(&state.name);
                self.dedupe_by_time.push_back(DedupeDue {
                    accepted_ms,
                    recipient,
                    key,
                });
            }
        }
        Ok(())
    }

    /// Finishes a replay: everything read back is committed, and the dedupe
    /// queue, filled out of order by base segments, is sorted by time.
    pub(super) fn finish_replay(&mut self) {
        for state in self.recipients.values_mut() {
            state.committed_seq = state.last_seq;
        }
        self.dedupe_by_time
            .make_contiguous()
            .sort_by_key(|due| due.accepted_ms);
    }

    /// Calls `write` with the records that rebuild the live state: per
    /// recipient its counters, its stored messages and the dedupe records
    /// that outlive their message. `envelope` reads a stored envelope. Returns
    /// the new location and record length of every stored message, in the
    /// order [`Index::relocate`] expects.
    pub(super) fn write_base(
        &self,
        now_ms: u64,
        mut envelope: impl FnMut(&Location) -> Result<String, MailboxError>,
        mut write: impl FnMut(&Record<'_>) -> Result<Option<(Location, u32)>, MailboxError>,
    ) -> Result<Vec<(Location, u32)>, MailboxError> {
        let mut moved = Vec::with_capacity(usize::try_from(self.stored).unwrap_or(0));
        for state in self.recipients.values() {
            let recipient = &*state.name;
            write(&Record::Cursor {
                recipient,
                last_seq: state.last_seq,
                last_received_ms: state.last_received_ms,
            })?;
            for entry in &state.entries {
                // An expired message that `expire` has not deleted yet may
                // have lost its dedupe record to a newer message with the
                // same id. Its hash no longer matters, because the newer
                // record comes later in the base segment and replaces the
                // one that this append recreates.
                let content_hash = state
                    .dedupe
                    .get(&entry.key)
                    .filter(|record| record.seq == entry.seq)
                    .map_or(0, |record| record.content_hash);
                let envelope = envelope(&entry.location)?;
                let location = write(&Record::Append {
                    recipient,
                    seq: entry.seq,
                    received_at_ms: entry.received_at_ms,
                    content_hash,
                    sender: entry.key.sender(),
                    message_id: entry.key.message_id(),
                    envelope: &envelope,
                })?
                .expect("an append record has a location");
                moved.push(location);
            }
            for (key, record) in &state.dedupe {
                let with_message = state
                    .position(record.seq)
                    .is_ok_and(|at| state.entries[at].key == *key);
                if with_message || self.window_passed(record.accepted_ms, now_ms) {
                    continue;
                }
                write(&Record::Dedupe {
                    recipient,
                    sender: key.sender(),
                    message_id: key.message_id(),
                    seq: record.seq,
                    content_hash: record.content_hash,
                    accepted_ms: record.accepted_ms,
                })?;
            }
        }
        Ok(moved)
    }

    /// Points every stored message at its copy in the new base segment.
    /// `moved` comes from [`Index::write_base`] on this same, unchanged index.
    pub(super) fn relocate(&mut self, moved: &[(Location, u32)]) {
        let mut moved = moved.iter();
        let mut live_bytes = 0;
        for state in self.recipients.values_mut() {
            for entry in &mut state.entries {
                let (location, record_len) = moved.next().expect("one location per message");
                entry.location = *location;
                entry.record_len = *record_len;
                live_bytes += u64::from(*record_len);
            }
        }
        assert!(moved.next().is_none(), "one location per message");
        self.live_bytes = live_bytes;
    }
}

/// Drops the dedupe record of a deleted message when its window has passed,
/// because nothing can match it then.
fn forget_dedupe_if_done(state: &mut RecipientState, entry: &Entry, window_ms: u64, now_ms: u64) {
    let done = state.dedupe.get(&entry.key).is_some_and(|record| {
        record.seq == entry.seq && record.accepted_ms.saturating_add(window_ms) <= now_ms
    });
    if done {
        state.dedupe.remove(&entry.key);
    }
}
