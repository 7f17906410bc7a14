//! The embedded mailbox's files: numbered segment files of checksummed
//! records. A segment is appended to and never rewritten; startup only
//! cuts an interrupted write off the end of the newest one.
//!
//! A segment file is `<id>.seg`, with `id` a zero-padded decimal `u32`. It
//! starts with a 16-byte header: [`SEGMENT_MAGIC`], then one byte for the
//! [`SegmentKind`], then seven zero bytes. Each record after it is framed as
//! `length (u32 LE) | CRC-32 of the body (u32 LE) | body`. Integers in bodies
//! are little-endian. Strings carry a u16 length, except the envelope, which
//! is last in its record and carries a u32 length.
//!
//! A compaction writes the whole live state into one [`SegmentKind::Base`]
//! segment. Recovery replays the newest base segment and every segment after
//! it, and deletes the segments before it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::super::MailboxError;

/// The first bytes of every segment file, with the format version.
const SEGMENT_MAGIC: &[u8; 8] = b"RTMBOX01";

/// Bytes before the first record of a segment.
pub(super) const HEADER_LEN: u64 = 16;

/// Bytes of a record's frame before its body: length and checksum.
pub(super) const FRAME_LEN: usize = 8;

/// Largest record body recovery accepts. Envelopes are limited to far less
/// by `limits.max_envelope_bytes`, so a larger length means a damaged file.
pub(super) const MAX_RECORD_BYTES: usize = 64 << 20;

const SEGMENT_EXTENSION: &str = "seg";

/// The kind of records a segment contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SegmentKind {
    /// Records of operations, in the order they were committed.
    Log = 0,
    /// The complete live state written by a compaction. Segments with a
    /// lower id are obsolete.
    Base = 1,
}

/// One record. Strings borrow from the buffer they were decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Record<'a> {
    /// A stored message. It also stands for its dedupe record, with the
    /// acceptance time `received_at_ms`.
    Append {
        recipient: &'a str,
        seq: u64,
        received_at_ms: u64,
        content_hash: u128,
        sender: &'a str,
        message_id: &'a str,
        envelope: &'a str,
    },
    /// Deletes the recipient's messages with a seq up to `up_to` (acks and
    /// expiry).
    DeleteUpTo { recipient: &'a str, up_to: u64 },
    /// Deletes the recipient's messages with these seqs (acks by message id).
    DeleteSeqs { recipient: &'a str, seqs: Vec<u64> },
    /// The recipient's counters, written by compaction so that a seq is
    /// never reused after its messages are gone.
    Cursor {
        recipient: &'a str,
        last_seq: u64,
        last_received_ms: u64,
    },
    /// A dedupe record that outlives its message, written by compaction.
    Dedupe {
        recipient: &'a str,
        sender: &'a str,
        message_id: &'a str,
        seq: u64,
        content_hash: u128,
        accepted_ms: u64,
    },
}

const APPEND: u8 = 1;
const DELETE_UP_TO: u8 = 2;
const DELETE_SEQS: u8 = 3;
const CURSOR: u8 = 4;
const DEDUPE: u8 = 5;

impl Record<'_> {
    /// Appends the framed record to `out`. Returns the position in `out`
    /// where the envelope's bytes start, for [`Record::Append`].
    ///
    /// Callers check string lengths first (see [`fits_short`]); a longer
    /// string is a bug and panics here.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) -> Option<usize> {
        let frame_start = out.len();
        out.extend_from_slice(&[0; FRAME_LEN]);
        let mut envelope_start = None;
        match self {
            Self::Append {
                recipient,
                seq,
                received_at_ms,
                content_hash,
                sender,
                message_id,
                envelope,
            } => {
                out.push(APPEND);
                put_short(out, recipient);
                put_u64(out, *seq);
                put_u64(out, *received_at_ms);
                out.extend_from_slice(&content_hash.to_le_bytes());
                put_short(out, sender);
                put_short(out, message_id);
                let length = u32::try_from(envelope.len()).expect("envelope fits in u32");
                out.extend_from_slice(&length.to_le_bytes());
                envelope_start = Some(out.len());
                out.extend_from_slice(envelope.as_bytes());
            }
            Self::DeleteUpTo { recipient, up_to } => {
                out.push(DELETE_UP_TO);
                put_short(out, recipient);
                put_u64(out, *up_to);
            }
            Self::DeleteSeqs { recipient, seqs } => {
                out.push(DELETE_SEQS);
                put_short(out, recipient);
                let count = u32::try_from(seqs.len()).expect("seq count fits in u32");
                out.extend_from_slice(&count.to_le_bytes());
                for seq in seqs {
                    put_u64(out, *seq);
                }
            }
            Self::Cursor {
                recipient,
                last_seq,
                last_received_ms,
            } => {
                out.push(CURSOR);
                put_short(out, recipient);
                put_u64(out, *last_seq);
                put_u64(out, *last_received_ms);
            }
            Self::Dedupe {
                recipient,
                sender,
                message_id,
                seq,
                content_hash,
                accepted_ms,
            } => {
                out.push(DEDUPE);
                put_short(out, recipient);
                put_short(out, sender);
                put_short(out, message_id);
                put_u64(out, *seq);
                out.extend_from_slice(&content_hash.to_le_bytes());
                put_u64(out, *accepted_ms);
            }
        }

        let body = &out[frame_start + FRAME_LEN..];
        let length = u32::try_from(body.len()).expect("record fits in u32");
        let checksum = crc32fast::hash(body);
        out[frame_start..frame_start + 4].copy_from_slice(&length.to_le_bytes());
        out[frame_start + 4..frame_start + FRAME_LEN].copy_from_slice(&checksum.to_le_bytes());
        envelope_start
    }
}

/// Decodes a record body (without its frame). Returns the record and, for
/// an append, the envelope's position in `body`.
pub(super) fn decode(body: &[u8]) -> Result<(Record<'_>, Option<usize>), MailboxError> {
    let mut reader = BodyReader { body, at: 0 };
    let kind = reader.u8()?;
    let recipient = reader.short_str()?;
    let mut envelope_start = None;
    let record = match kind {
        APPEND => {
            let seq = reader.u64()?;
            let received_at_ms = reader.u64()?;
            let content_hash = reader.u128()?;
            let sender = reader.short_str()?;
            let message_id = reader.short_str()?;
            let length = reader.u32()? as usize;
            envelope_start = Some(reader.at);
            let envelope = reader.str(length)?;
            Record::Append {
                recipient,
                seq,
                received_at_ms,
                content_hash,
                sender,
                message_id,
                envelope,
            }
        }
        DELETE_UP_TO => Record::DeleteUpTo {
            recipient,
            up_to: reader.u64()?,
        },
        DELETE_SEQS => {
            let count = reader.u32()? as usize;
            if count > body.len() / 8 {
                return Err(corrupt("a delete record's seq count exceeds its length"));
            }
            let seqs = (0..count).map(|_| reader.u64()).collect::<Result<_, _>>()?;
            Record::DeleteSeqs { recipient, seqs }
        }
        CURSOR => Record::Cursor {
            recipient,
            last_seq: reader.u64()?,
            last_received_ms: reader.u64()?,
        },
        DEDUPE => Record::Dedupe {
            recipient,
            sender: reader.short_str()?,
            message_id: reader.short_str()?,
            seq: reader.u64()?,
            content_hash: reader.u128()?,
            accepted_ms: reader.u64()?,
        },
        other => return Err(corrupt(&format!("unknown record type {other}"))),
    };
    if reader.at != body.len() {
        return Err(corrupt("a record has bytes after its last field"));
    }
    Ok((record, envelope_start))
}

/// Returns whether a string fits a record's u16 length field.
pub(super) fn fits_short(value: &str) -> bool {
    value.len() <= usize::from(u16::MAX)
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_short(out: &mut Vec<u8>, value: &str) {
    let length = u16::try_from(value.len()).expect("string fits in u16");
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

struct BodyReader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> BodyReader<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], MailboxError> {
        let end = self
            .at
            .checked_add(length)
            .filter(|&end| end <= self.body.len())
            .ok_or_else(|| corrupt("a record ends before its last field"))?;
        let bytes = &self.body[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], MailboxError> {
        let bytes = self.take(N)?;
        Ok(bytes.try_into().expect("take returns N bytes"))
    }

    fn u8(&mut self) -> Result<u8, MailboxError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, MailboxError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, MailboxError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn u128(&mut self) -> Result<u128, MailboxError> {
        Ok(u128::from_le_bytes(self.array()?))
    }

    fn str(&mut self, length: usize) -> Result<&'a str, MailboxError> {
        std::str::from_utf8(self.take(length)?).map_err(|_| corrupt("a record has invalid UTF-8"))
    }

    fn short_str(&mut self) -> Result<&'a str, MailboxError> {
        let length = u16::from_le_bytes(self.array()?);
        self.str(usize::from(length))
    }
}

pub(super) fn corrupt(what: &str) -> MailboxError {
    MailboxError::Internal(format!("the mailbox files are damaged: {what}"))
}

pub(super) fn io_error(action: &str, path: &Path, err: &io::Error) -> MailboxError {
    MailboxError::Internal(format!("failed to {action} {}: {err}", path.display()))
}

// ---------------------------------------------------------------------------
// Segment files.

/// Returns the path of segment `id` in `dir`.
pub(super) fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:010}.{SEGMENT_EXTENSION}"))
}

/// Lists the segment ids in `dir`, ascending. Deletes leftover temporary
/// files of an interrupted compaction.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u32>, MailboxError> {
    let entries = std::fs::read_dir(dir).map_err(|err| io_error("list", dir, &err))?;
    let mut ids = Vec::new();
    for entry in entries {
        let path = entry.map_err(|err| io_error("list", dir, &err))?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        if name.ends_with(TEMPORARY_SUFFIX) {
            std::fs::remove_file(&path).map_err(|err| io_error("delete", &path, &err))?;
            continue;
        }
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        if let Ok(id) = stem.parse::<u32>() {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The suffix of a base segment while compaction writes it.
pub(super) const TEMPORARY_SUFFIX: &str = ".seg.tmp";

/// Flushes the directory entry changes (new, renamed or deleted files).
pub(super) fn sync_dir(dir: &Path) -> Result<(), MailboxError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|err| io_error("sync the directory", dir, &err))
}

/// Writes the 16-byte segment header.
pub(super) fn header(kind: SegmentKind) -> [u8; HEADER_LEN as usize] {
    let mut bytes = [0; HEADER_LEN as usize];
    bytes[..8].copy_from_slice(SEGMENT_MAGIC);
    bytes[8] = kind as u8;
    bytes
}

/// Creates segment `id` as an empty log segment, synced with its directory
/// entry, and returns it open for appending.
pub(super) fn create_log_segment(dir: &Path, id: u32) -> Result<File, MailboxError> {
    let path = segment_path(dir, id);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(|err| io_error("create", &path, &err))?;
    file.write_all(&header(SegmentKind::Log))
        .and_then(|()| file.sync_all())
        .map_err(|err| io_error("write", &path, &err))?;
    sync_dir(dir)?;
    Ok(file)
}

/// A record read back from a segment, with the file offset of its body.
pub(super) struct ScannedRecord<'a> {
    pub body: &'a [u8],
    pub body_offset: u64,
}

/// Reads a segment's kind from its header.
pub(super) fn read_kind(path: &Path) -> Result<SegmentKind, MailboxError> {
    let mut header = [0; HEADER_LEN as usize];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .map_err(|err| io_error("read", path, &err))?;
    parse_header(&header).ok_or_else(|| corrupt(&format!("{} has no valid header", path.display())))
}

fn parse_header(header: &[u8; HEADER_LEN as usize]) -> Option<SegmentKind> {
    if &header[..8] != SEGMENT_MAGIC {
        return None;
    }
    match header[8] {
        0 => Some(SegmentKind::Log),
        1 => Some(SegmentKind::Base),
        _ => None,
    }
}

/// The position where a segment scan stopped.
pub(super) struct ScanEnd {
    /// Bytes of whole, valid records plus the header.
    pub valid_len: u64,
    /// The file's length; more than `valid_len` when the end is damaged.
    pub file_len: u64,
}

/// Calls `visit` for each record of the segment at `path`, in order. Stops
/// at the first incomplete or damaged record and reports where; the caller
/// decides whether that is a torn final write or damage.
pub(super) fn scan_segment(
    path: &Path,
    mut visit: impl FnMut(ScannedRecord<'_>) -> Result<(), MailboxError>,
) -> Result<ScanEnd, MailboxError> {
    let file = File::open(path).map_err(|err| io_error("open", path, &err))?;
    let file_len = file
        .metadata()
        .map_err(|err| io_error("read", path, &err))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0; HEADER_LEN as usize];
    reader
        .read_exact(&mut header)
        .map_err(|err| io_error("read", path, &err))?;
    if parse_header(&header).is_none() {
        return Err(corrupt(&format!("{} has no valid header", path.display())));
    }

    let mut offset = HEADER_LEN;
    let mut body = Vec::new();
    loop {
        let mut frame = [0; FRAME_LEN];
        match read_full(&mut reader, &mut frame).map_err(|err| io_error("read", path, &err))? {
            0 => break,
            FRAME_LEN => {}
            _ => break,
        }
        let length = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
        let checksum = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
        if length == 0 || length > MAX_RECORD_BYTES {
            break;
        }
        body.resize(length, 0);
        if read_full(&mut reader, &mut body).map_err(|err| io_error("read", path, &err))? < length {
            break;
        }
        if crc32fast::hash(&body) != checksum {
            break;
        }
        let body_offset = offset + FRAME_LEN as u64;
        visit(ScannedRecord {
            body: &body,
            body_offset,
        })?;
        offset = body_offset + length as u64;
    }
    Ok(ScanEnd {
        valid_len: offset,
        file_len,
    })
}

/// Returns the offset of the first whole, valid record that starts after
/// `from` in the segment at `path`, if any.
///
/// An interrupted write leaves an incomplete record and nothing valid after
/// it, so a valid record there means the bytes at `from` were damaged after
/// they were written.
pub(super) fn find_record_after(path: &Path, from: u64) -> Result<Option<u64>, MailboxError> {
    let bytes = std::fs::read(path).map_err(|err| io_error("read", path, &err))?;
    let start = usize::try_from(from)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    for at in start..bytes.len().saturating_sub(FRAME_LEN) {
        let length = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let body_start = at + FRAME_LEN;
        if length == 0 || length > MAX_RECORD_BYTES || length > bytes.len() - body_start {
            continue;
        }
        let body = &bytes[body_start..body_start + length];
        if !(APPEND..=DEDUPE).contains(&body[0]) {
            continue;
        }
        let checksum = u32::from_le_bytes(bytes[at + 4..body_start].try_into().expect("4 bytes"));
        if crc32fast::hash(body) == checksum {
            return Ok(Some(at as u64));
        }
    }
    Ok(None)
}

/// Reads until `buffer` is full or the end of the file; returns the bytes read.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(record: &Record<'_>) {
        let mut out = vec![7, 7];
        let envelope_start = record.encode_into(&mut out);
        let length = u32::from_le_bytes(out[2..6].try_into().expect("4 bytes")) as usize;
        let body = &out[2 + FRAME_LEN..];
        assert_eq!(body.len(), length);
        assert_eq!(
            u32::from_le_bytes(out[6..10].try_into().expect("4 bytes")),
            crc32fast::hash(body)
        );
        let (decoded, decoded_start) = decode(body).expect("the record decodes");
        assert_eq!(&decoded, record);
        assert_eq!(
            envelope_start.map(|start| start - 2 - FRAME_LEN),
            decoded_start
        );
    }

    #[test]
    fn records_round_trip() {
        round_trip(&Record::Append {
            recipient: "urn:sm:user:bob",
            seq: 7,
            received_at_ms: 1_700_000_000_000,
            content_hash: u128::MAX - 3,
            sender: "urn:sm:user:alice",
            message_id: "m1",
            envelope: "{\"a\":1}",
        });
        round_trip(&Record::DeleteUpTo {
            recipient: "r",
            up_to: u64::MAX,
        });
        round_trip(&Record::DeleteSeqs {
            recipient: "r",
            seqs: vec![1, 5, 9],
        });
        round_trip(&Record::Cursor {
            recipient: "r",
            last_seq: 3,
            last_received_ms: 4,
        });
        round_trip(&Record::Dedupe {
            recipient: "r",
            sender: "s",
            message_id: "id",
            seq: 2,
            content_hash: 9,
            accepted_ms: 10,
        });
    }

    #[test]
    fn truncated_and_padded_bodies_are_corrupt() {
        let mut out = Vec::new();
        Record::Cursor {
            recipient: "r",
            last_seq: 3,
            last_received_ms: 4,
        }
        .encode_into(&mut out);
        let body = &out[FRAME_LEN..];
        for end in 0..body.len() {
            assert!(
                matches!(decode(&body[..end]), Err(MailboxError::Internal(_))),
                "a body cut at {end} bytes decoded"
            );
        }
        let mut padded = body.to_vec();
        padded.push(0);
        assert!(matches!(decode(&padded), Err(MailboxError::Internal(_))));
    }

    #[test]
    fn huge_seq_count_is_corrupt() {
        let mut body = vec![DELETE_SEQS, 1, 0, b'r'];
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&body), Err(MailboxError::Internal(_))));
    }

    #[test]
    fn scan_stops_at_damaged_record() {
        let dir = tempfile::TempDir::new().expect("a temporary directory");
        let path = segment_path(dir.path(), 1);
        let mut bytes = header(SegmentKind::Log).to_vec();
        for up_to in 1..=3 {
            Record::DeleteUpTo {
                recipient: "r",
                up_to,
            }
            .encode_into(&mut bytes);
        }
        let second_end = {
            let mut probe = header(SegmentKind::Log).to_vec();
            for up_to in 1..=2 {
                Record::DeleteUpTo {
                    recipient: "r",
                    up_to,
                }
                .encode_into(&mut probe);
            }
            probe.len()
        };
        bytes[second_end + FRAME_LEN + 2] ^= 0xff;
        std::fs::write(&path, &bytes).expect("the segment is written");

        let mut seen = Vec::new();
        let end = scan_segment(&path, |record| {
            seen.push(decode(record.body)?.0.up_to());
            Ok(())
        })
        .expect("the scan succeeds");
        assert_eq!(seen, [1, 2]);
        assert_eq!(end.valid_len, second_end as u64);
        assert_eq!(end.file_len, bytes.len() as u64);
    }

    impl Record<'_> {
        fn up_to(&self) -> u64 {
            match self {
                Record::DeleteUpTo { up_to, .. } => *up_to,
                _ => panic!("not a delete record"),
            }
        }
    }
}
