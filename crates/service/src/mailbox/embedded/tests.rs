//! Tests of the embedded mailbox: the conformance suite, restarts, crashes,
//! damaged files and compaction.

use std::time::Duration;

use tempfile::TempDir;

use super::*;
use crate::mailbox::conformance::{
    self, CASE_TIMEOUT, address, append_new, message, roomy_settings, stored_seqs,
};
use crate::mailbox::{NewMessage, StoredMessage};

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

/// Segment and compaction sizes small enough that a few messages start new
/// segments and compact the log.
fn tiny_tuning() -> LogTuning {
    LogTuning {
        segment_bytes: 2048,
        compact_min_bytes: 4096,
    }
}

fn open_tiny(dir: &Path, settings: MailboxSettings) -> EmbeddedMailbox {
    EmbeddedMailbox::open_tuned(dir, settings, tiny_tuning()).expect("the mailbox opens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_conformance_suite_while_compacting() {
    conformance::run_all(|settings| async move {
        let dir = TempDir::new().expect("a temporary directory");
        let mailbox = open_tiny(dir.path(), settings);
        InTempDir { mailbox, _dir: dir }
    })
    .await;
}

fn segment_files(dir: &Path) -> Vec<u32> {
    log::list_segments(dir).expect("the directory lists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_state_across_reopen() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_tiny(dir.path(), roomy_settings());
        for index in 1..=200 {
            let id = format!("m{index}");
            append_new(
                &mailbox,
                message("bob", "alice", &id, &format!("payload {index}")),
            )
            .await;
        }
        append_new(&mailbox, message("carol", "alice", "c1", "c1")).await;
        let acked = mailbox.ack(&address("carol"), AckTarget::UpTo(1)).await;
        assert_eq!(acked.expect("ack succeeds"), 1);
        let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(150)).await;
        assert_eq!(acked.expect("ack succeeds"), 150);
        let ids = vec!["m160".to_owned(), "m170".to_owned()];
        let acked = mailbox.ack(&address("bob"), AckTarget::Ids(ids)).await;
        assert_eq!(acked.expect("ack succeeds"), 2);
        // Appends after the acks make the log at least twice the live bytes.
        for index in 201..=260 {
            let id = format!("m{index}");
            append_new(
                &mailbox,
                message("bob", "alice", &id, &format!("payload {index}")),
            )
            .await;
        }
        let compactions = mailbox.shared.compactions.load(Ordering::Relaxed);
        assert!(compactions >= 1, "no compaction ran");
        let before = read_stored(&mailbox, "bob").await;
        mailbox.close().await;
        drop(mailbox);

        let mailbox = open_in(&dir, roomy_settings());
        let after = read_stored(&mailbox, "bob").await;
        assert_eq!(after, before);
        let expected: Vec<u64> = (151..=260)
            .filter(|seq| *seq != 160 && *seq != 170)
            .collect();
        let seqs: Vec<u64> = after.iter().map(|stored| stored.seq).collect();
        assert_eq!(seqs, expected);
        assert_eq!(
            after.first().map(|stored| &*stored.envelope_json),
            Some(&*message("bob", "alice", "m151", "payload 151").envelope_json)
        );

        // Carol's only message is gone, but her seq and dedupe record stay.
        assert_eq!(
            mailbox
                .append(message("carol", "alice", "c1", "c1"))
                .await
                .expect("append succeeds"),
            Appended::Duplicate { seq: 1 }
        );
        assert_eq!(
            append_new(&mailbox, message("carol", "alice", "c2", "c2")).await,
            2
        );
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m261", "m261")).await,
            261
        );
        mailbox.close().await;
    })
    .await;
}

async fn read_stored(mailbox: &impl Mailbox, recipient: &str) -> Vec<StoredMessage> {
    mailbox
        .read(&address(recipient), 0, 10_000)
        .await
        .expect("read succeeds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_deletes_old_segments() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_tiny(dir.path(), roomy_settings());
        for index in 1..=300 {
            let id = format!("m{index}");
            append_new(&mailbox, message("bob", "alice", &id, &id)).await;
            let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(index)).await;
            assert_eq!(acked.expect("ack succeeds"), 1);
        }
        assert!(mailbox.shared.compactions.load(Ordering::Relaxed) >= 1);
        let segments = segment_files(dir.path());
        assert!(
            segments.len() <= 4,
            "{} segments remain after compaction: {segments:?}",
            segments.len()
        );
        mailbox.close().await;
    })
    .await;
}

/// Appends bytes to the newest segment file, as a write torn by power loss
/// would leave them.
fn append_to_last_segment(dir: &Path, bytes: &[u8]) {
    let last = *segment_files(dir).last().expect("a segment exists");
    let mut file = OpenOptions::new()
        .append(true)
        .open(segment_path(dir, last))
        .expect("the segment opens");
    file.write_all(bytes).expect("the bytes are written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_final_write_is_cut_off() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        for id in ["m1", "m2", "m3"] {
            append_new(&mailbox, message("bob", "alice", id, id)).await;
        }
        mailbox.close().await;
        drop(mailbox);

        // A frame that promises more bytes than follow it.
        let mut torn = Vec::new();
        Record::DeleteUpTo {
            recipient: "urn:sm:user:bob",
            up_to: 3,
        }
        .encode_into(&mut torn);
        torn.truncate(torn.len() - 3);
        append_to_last_segment(dir.path(), &torn);

        let mailbox = open_in(&dir, roomy_settings());
        assert_eq!(stored_seqs(&mailbox, "bob").await, [1, 2, 3]);
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m4", "m4")).await,
            4
        );
        mailbox.close().await;
        drop(mailbox);

        let mailbox = open_in(&dir, roomy_settings());
        assert_eq!(stored_seqs(&mailbox, "bob").await, [1, 2, 3, 4]);
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_last_segment_fails_open() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        mailbox.close().await;
        drop(mailbox);
        let mailbox = open_in(&dir, roomy_settings());
        append_new(&mailbox, message("bob", "alice", "m2", "m2")).await;
        mailbox.close().await;
        drop(mailbox);

        let first = segment_path(dir.path(), segment_files(dir.path())[0]);
        let mut bytes = std::fs::read(&first).expect("the segment reads");
        let at = HEADER_LEN as usize + log::FRAME_LEN + 4;
        bytes[at] ^= 0xff;
        std::fs::write(&first, &bytes).expect("the segment is written");

        let reopened = EmbeddedMailbox::open(dir.path(), roomy_settings());
        match reopened {
            Err(MailboxError::Internal(message)) => {
                assert!(message.contains("damaged"), "{message}");
            }
            Err(other) => panic!("open failed with {other:?}"),
            Ok(_) => panic!("a damaged segment opened"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_compaction_is_ignored() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        mailbox.close().await;
        drop(mailbox);

        let leftover = dir
            .path()
            .join(format!("{:010}{}", 9, log::TEMPORARY_SUFFIX));
        std::fs::write(&leftover, b"half a base segment").expect("the file is written");

        let mailbox = open_in(&dir, roomy_settings());
        assert_eq!(stored_seqs(&mailbox, "bob").await, [1]);
        assert!(!leftover.exists(), "the leftover file was not deleted");
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_the_sync() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        // An append applied to the index but not yet on disk stays hidden.
        {
            let mut index = write_lock(&mailbox.shared.index);
            let mut log = GroupLog::new(99, HEADER_LEN);
            let appended = index.append(&mut log, &message("bob", "alice", "m2", "m2"), 1);
            assert!(matches!(appended, Ok(Appended::New(_))));
        }
        assert_eq!(stored_seqs(&mailbox, "bob").await, [1]);
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
        let dedupe_records = || read_lock(&mailbox.shared.index).dedupe_records();
        assert_eq!(dedupe_records(), 1, "m2 is stored");

        let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(2)).await;
        assert_eq!(acked.expect("ack succeeds"), 1);
        assert_eq!(dedupe_records(), 0);
        assert_eq!(read_lock(&mailbox.shared.index).stored(), 0);
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

        let groups = mailbox.shared.committed_groups.load(Ordering::Relaxed);
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
fn earlier_store_format_is_rejected() {
    let dir = TempDir::new().expect("a temporary directory");
    std::fs::create_dir(dir.path().join("keyspaces")).expect("the folder is created");
    std::fs::write(dir.path().join("version"), b"3").expect("the file is written");

    match EmbeddedMailbox::open(dir.path(), roomy_settings()) {
        Err(MailboxError::Internal(message)) => {
            assert!(
                message.contains("earlier routing-service version"),
                "{message}"
            );
        }
        Err(other) => panic!("open failed with {other:?}"),
        Ok(_) => panic!("a folder of the earlier format opened"),
    }
    assert!(
        log::list_segments(dir.path())
            .expect("the folder lists")
            .is_empty(),
        "open wrote segments next to the earlier store"
    );
}

/// An expired message that `expire` has not deleted yet may lose its dedupe
/// record to a new message with the same id. Compaction must still keep
/// both messages' state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_after_dedupe_record_is_replaced() {
    let dir = TempDir::new().expect("a temporary directory");
    // The TTL leaves the second message seconds to be checked after the
    // reopen.
    let settings = MailboxSettings {
        message_ttl: Duration::from_secs(3),
        dedupe_window: Duration::from_millis(50),
        ..roomy_settings()
    };
    with_timeout(async {
        let mailbox = open_tiny(dir.path(), settings.clone());
        append_new(&mailbox, message("bob", "alice", "m1", "first")).await;
        tokio::time::sleep(Duration::from_millis(3100)).await;
        // m1 is expired but still indexed, and its window has passed, so
        // the same id is a new message.
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m1", "second")).await,
            2
        );

        // Writes for another recipient, acknowledged at once, grow the log
        // past twice the live bytes, so compactions run.
        for index in 1..=60 {
            let id = format!("c{index}");
            append_new(&mailbox, message("carol", "alice", &id, &id)).await;
            let acked = mailbox.ack(&address("carol"), AckTarget::UpTo(index)).await;
            assert_eq!(acked.expect("ack succeeds"), 1);
        }
        let compactions = mailbox.shared.compactions.load(Ordering::Relaxed);
        assert!(compactions >= 1, "no compaction ran");
        mailbox.close().await;
        drop(mailbox);

        let mailbox = open_in(&dir, settings);
        assert_eq!(stored_seqs(&mailbox, "bob").await, [2]);
        assert_eq!(
            mailbox
                .append(message("bob", "alice", "m1", "second"))
                .await
                .expect("append succeeds"),
            Appended::Duplicate { seq: 2 }
        );
        mailbox.close().await;
    })
    .await;
}

/// Each append here is its own synced group, so a bad record followed by
/// later groups is damage, not a write cut by power loss. Open must fail
/// instead of dropping the accepted messages after it and reusing their seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_inside_newest_segment_fails_open() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        for id in ["m1", "m2", "m3", "m4", "m5"] {
            append_new(&mailbox, message("bob", "alice", id, id)).await;
        }
        mailbox.close().await;
        drop(mailbox);

        // The five appends are the only records of the newest segment.
        // Flip one byte inside the body of the second record.
        let segments = segment_files(dir.path());
        assert_eq!(segments.len(), 1, "segments: {segments:?}");
        let path = segment_path(dir.path(), segments[0]);
        let mut bytes = std::fs::read(&path).expect("the segment reads");
        let first_start = HEADER_LEN as usize;
        let first_len = u32::from_le_bytes(
            bytes[first_start..first_start + 4]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let second_body = first_start + log::FRAME_LEN + first_len + log::FRAME_LEN;
        bytes[second_body + 4] ^= 0xff;
        std::fs::write(&path, &bytes).expect("the segment is written");

        match EmbeddedMailbox::open(dir.path(), roomy_settings()) {
            Err(MailboxError::Internal(message)) => {
                assert!(message.contains("damaged"), "{message}");
            }
            Err(other) => panic!("open failed with {other:?}"),
            Ok(mailbox) => {
                let stored = stored_seqs(&mailbox, "bob").await;
                let next = append_new(&mailbox, message("bob", "alice", "m6", "m6")).await;
                panic!(
                    "open treated a damaged record with three whole records after it as a \
                     torn write: stored seqs are {stored:?} of the accepted [1, 2, 3, 4, 5], \
                     and the next append got seq {next} again"
                );
            }
        }
    })
    .await;
}

/// Every open starts a new head segment. Unless an open reuses a newest
/// segment that has no records, each restart leaves one more file and one
/// more open file handle until the next compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_without_writes_adds_no_segments() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        mailbox.close().await;
        drop(mailbox);

        for _ in 0..20 {
            let mailbox = open_in(&dir, roomy_settings());
            mailbox.close().await;
            drop(mailbox);
        }

        let segments = segment_files(dir.path());
        assert!(
            segments.len() <= 2,
            "{} segments after 21 opens with one append: {segments:?}",
            segments.len()
        );
        let mailbox = open_in(&dir, roomy_settings());
        let open_handles = read_lock(&mailbox.shared.files).len();
        assert!(
            open_handles <= 2,
            "{open_handles} segment files are held open after 22 opens"
        );
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_longer_than_a_record_is_rejected() {
    let dir = TempDir::new().expect("a temporary directory");
    with_timeout(async {
        let mailbox = open_in(&dir, roomy_settings());
        let mut oversized = message("bob", "alice", "m1", "m1");
        oversized.envelope_json = "x".repeat(log::MAX_RECORD_BYTES).into();
        let appended = mailbox.append(oversized).await;
        assert!(
            matches!(appended, Err(MailboxError::Internal(_))),
            "append returned {appended:?}"
        );
        assert!(stored_seqs(&mailbox, "bob").await.is_empty());
        mailbox.close().await;
        drop(mailbox);

        // Nothing was written that startup would reject.
        let mailbox = open_in(&dir, roomy_settings());
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m2", "m2")).await,
            1
        );
        mailbox.close().await;
    })
    .await;
}
