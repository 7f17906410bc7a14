//! The conformance suite every mailbox backend must pass.
//!
//! [`run_all`] takes a factory that opens a fresh, empty mailbox with the
//! given settings, and runs every case against its own mailbox, one after
//! the other. Each case names itself on stderr before it runs, so a failure
//! points to the case, and each runs under [`CASE_TIMEOUT`].
//!
//! Time-based cases use real time with windows and TTLs of 50 ms to 1 s,
//! because the trait takes no clock except for `expire`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;
use routing_protocol::Address;

use super::{AckTarget, Appended, Mailbox, MailboxError, MailboxSettings, NewMessage};

/// Maximum time one case may take, sleeps included.
pub(crate) const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns the settings of the cases that do not test a limit, so nothing
/// fills up or expires while they run.
pub(crate) fn roomy_settings() -> MailboxSettings {
    MailboxSettings {
        max_stored_per_user: 10_000,
        message_ttl: Duration::from_secs(3600),
        dedupe_window: Duration::from_secs(3600),
    }
}

/// Runs every case, each against a fresh mailbox from `make`, and closes
/// each mailbox afterwards.
pub(crate) async fn run_all<F, Fut, M>(make: F)
where
    F: Fn(MailboxSettings) -> Fut,
    Fut: Future<Output = M>,
    M: Mailbox,
{
    let roomy = roomy_settings;
    let short_window = || MailboxSettings {
        dedupe_window: Duration::from_millis(50),
        ..roomy_settings()
    };
    let limit_three = || MailboxSettings {
        max_stored_per_user: 3,
        ..roomy_settings()
    };
    let short_ttl = || MailboxSettings {
        message_ttl: Duration::from_millis(1000),
        dedupe_window: Duration::from_millis(50),
        ..roomy_settings()
    };

    macro_rules! case {
        ($name:ident, $settings:expr) => {{
            eprintln!("mailbox conformance: {}", stringify!($name));
            let mailbox = make($settings).await;
            tokio::time::timeout(CASE_TIMEOUT, $name(&mailbox))
                .await
                .unwrap_or_else(|_| panic!("case {} timed out", stringify!($name)));
            mailbox.close().await;
        }};
    }

    case!(seq_starts_at_one_per_recipient, roomy());
    case!(read_pages_in_seq_order, roomy());
    case!(unknown_recipient_is_empty, roomy());
    case!(ack_up_to_is_per_recipient, roomy());
    case!(ack_above_last_seq, roomy());
    case!(ack_by_ids, roomy());
    case!(duplicate_same_content, roomy());
    case!(conflict_other_content, roomy());
    case!(same_id_other_recipient_or_sender, roomy());
    case!(dedupe_holds_while_stored, short_window());
    case!(dedupe_holds_within_window_after_ack, roomy());
    case!(dedupe_ends_after_ack_and_window, short_window());
    case!(full_at_limit, limit_three());
    case!(ttl_hides_and_expire_deletes, short_ttl());
    case!(expire_uses_given_time, roomy());
    case!(concurrent_appends_contiguous, roomy());
    case!(close_rejects_calls, roomy());
}

/// Builds an address from a bare id.
pub(crate) fn address(id: &str) -> Address {
    Address::from_id(id).expect("test ids are valid")
}

/// Builds a message whose envelope and content hash derive from `content`.
pub(crate) fn message(
    recipient: &str,
    sender: &str,
    message_id: &str,
    content: &str,
) -> NewMessage {
    let envelope = serde_json::json!({
        "senderId": address(sender).as_str(),
        "recipientId": address(recipient).as_str(),
        "messageId": message_id,
        "encryptedData": content,
    });
    NewMessage {
        recipient: address(recipient),
        sender: address(sender),
        message_id: message_id.to_owned(),
        content_hash: xxhash_rust::xxh3::xxh3_128(content.as_bytes()),
        envelope_json: Arc::from(envelope.to_string()),
    }
}

/// Appends a message, expects it to be new, and returns its seq.
pub(crate) async fn append_new(mailbox: &impl Mailbox, message: NewMessage) -> u64 {
    match mailbox.append(message).await {
        Ok(Appended::New(stored)) => stored.seq,
        other => panic!("expected a new message, got {other:?}"),
    }
}

/// Reads every stored message of `recipient` and returns their seqs.
pub(crate) async fn stored_seqs(mailbox: &impl Mailbox, recipient: &str) -> Vec<u64> {
    let messages = mailbox
        .read(&address(recipient), 0, 100_000)
        .await
        .expect("read succeeds");
    messages.iter().map(|message| message.seq).collect()
}

async fn seq_starts_at_one_per_recipient(mailbox: &impl Mailbox) {
    let first = message("bob", "alice", "m1", "one");
    let appended = mailbox
        .append(first.clone())
        .await
        .expect("append succeeds");
    let Appended::New(stored) = appended else {
        panic!("expected a new message, got {appended:?}");
    };
    assert_eq!(stored.seq, 1);
    assert_eq!(stored.message_id, "m1");
    assert_eq!(stored.envelope_json, first.envelope_json);

    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m2", "two")).await,
        2
    );
    assert_eq!(
        append_new(mailbox, message("bob", "dave", "m3", "three")).await,
        3
    );
    assert_eq!(
        append_new(mailbox, message("carol", "alice", "m4", "four")).await,
        1
    );
    assert_eq!(
        append_new(mailbox, message("carol", "alice", "m5", "five")).await,
        2
    );

    let read = mailbox
        .read(&address("bob"), 0, 10)
        .await
        .expect("read succeeds");
    let times: Vec<u64> = read.iter().map(|message| message.received_at_ms).collect();
    assert!(times.is_sorted(), "received_at_ms decreased: {times:?}");
    assert!(times[0] > 0);
}

async fn read_pages_in_seq_order(mailbox: &impl Mailbox) {
    for index in 1..=5 {
        let id = format!("m{index}");
        append_new(mailbox, message("bob", "alice", &id, &id)).await;
    }
    let bob = address("bob");

    let all = mailbox.read(&bob, 0, 10).await.expect("read succeeds");
    let seqs: Vec<u64> = all.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let ids: Vec<&str> = all
        .iter()
        .map(|message| message.message_id.as_str())
        .collect();
    assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5"]);

    let page = mailbox.read(&bob, 2, 2).await.expect("read succeeds");
    let seqs: Vec<u64> = page.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, [3, 4]);

    assert_eq!(
        stored_seqs(mailbox, "bob").await,
        [1, 2, 3, 4, 5],
        "reading deleted messages"
    );
    assert!(
        mailbox
            .read(&bob, 5, 10)
            .await
            .expect("read succeeds")
            .is_empty()
    );
    assert!(
        mailbox
            .read(&bob, u64::MAX, 10)
            .await
            .expect("read succeeds")
            .is_empty()
    );
    assert!(
        mailbox
            .read(&bob, 0, 0)
            .await
            .expect("read succeeds")
            .is_empty()
    );
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 5);
}

async fn unknown_recipient_is_empty(mailbox: &impl Mailbox) {
    let nobody = address("nobody");
    assert!(
        mailbox
            .read(&nobody, 0, 10)
            .await
            .expect("read succeeds")
            .is_empty()
    );
    assert_eq!(mailbox.count(&nobody).await.expect("count succeeds"), 0);
    assert_eq!(
        mailbox
            .ack(&nobody, AckTarget::UpTo(10))
            .await
            .expect("ack succeeds"),
        0
    );
    let ids = AckTarget::Ids(vec!["m1".into()]);
    assert_eq!(mailbox.ack(&nobody, ids).await.expect("ack succeeds"), 0);
    assert_eq!(
        append_new(mailbox, message("nobody", "alice", "m1", "x")).await,
        1
    );
}

async fn ack_up_to_is_per_recipient(mailbox: &impl Mailbox) {
    for id in ["m1", "m2", "m3"] {
        append_new(mailbox, message("bob", "alice", id, id)).await;
    }
    for id in ["m1", "m2"] {
        append_new(mailbox, message("carol", "alice", id, id)).await;
    }
    let bob = address("bob");

    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(2))
            .await
            .expect("ack succeeds"),
        2
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [3]);
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 1);
    assert_eq!(stored_seqs(mailbox, "carol").await, [1, 2]);

    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(2))
            .await
            .expect("ack succeeds"),
        0
    );
    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(0))
            .await
            .expect("ack succeeds"),
        0
    );
    let after_ack = mailbox.read(&bob, 0, 10).await.expect("read succeeds");
    assert_eq!(after_ack.len(), 1);
    assert_eq!(after_ack[0].message_id, "m3");
}

async fn ack_above_last_seq(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    append_new(mailbox, message("bob", "alice", "m2", "two")).await;
    let bob = address("bob");

    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(100))
            .await
            .expect("ack succeeds"),
        2
    );
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m3", "three")).await,
        3
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [3]);
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 1);
}

async fn ack_by_ids(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "from alice")).await;
    append_new(mailbox, message("bob", "dave", "m1", "from dave")).await;
    append_new(mailbox, message("bob", "alice", "m2", "two")).await;
    append_new(mailbox, message("bob", "alice", "m3", "three")).await;
    append_new(mailbox, message("carol", "alice", "m3", "three")).await;
    let bob = address("bob");

    let ids = AckTarget::Ids(vec!["m1".into(), "unknown".into()]);
    assert_eq!(mailbox.ack(&bob, ids).await.expect("ack succeeds"), 2);
    assert_eq!(stored_seqs(mailbox, "bob").await, [3, 4]);

    let empty = AckTarget::Ids(Vec::new());
    assert_eq!(mailbox.ack(&bob, empty).await.expect("ack succeeds"), 0);

    let repeated = AckTarget::Ids(vec!["m3".into(), "m3".into()]);
    assert_eq!(mailbox.ack(&bob, repeated).await.expect("ack succeeds"), 1);
    assert_eq!(stored_seqs(mailbox, "bob").await, [3]);
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 1);
    assert_eq!(
        stored_seqs(mailbox, "carol").await,
        [1],
        "ack touched another recipient"
    );
}

async fn duplicate_same_content(mailbox: &impl Mailbox) {
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m1", "one")).await,
        1
    );
    append_new(mailbox, message("bob", "alice", "m2", "two")).await;

    let repeat = mailbox.append(message("bob", "alice", "m1", "one")).await;
    assert_eq!(
        repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 1 }
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [1, 2]);
    assert_eq!(
        mailbox
            .count(&address("bob"))
            .await
            .expect("count succeeds"),
        2
    );
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m3", "three")).await,
        3
    );
}

async fn conflict_other_content(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;

    let other = mailbox.append(message("bob", "alice", "m1", "other")).await;
    match other {
        Err(MailboxError::Conflict { message_id }) => assert_eq!(message_id, "m1"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let stored = mailbox
        .read(&address("bob"), 0, 10)
        .await
        .expect("read succeeds");
    assert_eq!(stored.len(), 1);
    let first = message("bob", "alice", "m1", "one");
    assert_eq!(
        stored[0].envelope_json, first.envelope_json,
        "the first message must stand"
    );
}

async fn same_id_other_recipient_or_sender(mailbox: &impl Mailbox) {
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m1", "one")).await,
        1
    );
    assert_eq!(
        append_new(mailbox, message("carol", "alice", "m1", "one")).await,
        1
    );
    assert_eq!(
        append_new(mailbox, message("bob", "dave", "m1", "one")).await,
        2
    );
    assert_eq!(
        append_new(mailbox, message("bob", "erin", "m1", "other")).await,
        3
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [1, 2, 3]);
    assert_eq!(stored_seqs(mailbox, "carol").await, [1]);
}

/// Checks dedupe past a 50 ms window while the message is still stored.
async fn dedupe_holds_while_stored(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    let repeat = mailbox.append(message("bob", "alice", "m1", "one")).await;
    assert_eq!(
        repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 1 }
    );
    let other = mailbox.append(message("bob", "alice", "m1", "other")).await;
    assert!(
        matches!(other, Err(MailboxError::Conflict { .. })),
        "got {other:?}"
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [1]);
}

async fn dedupe_holds_within_window_after_ack(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    let bob = address("bob");
    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(1))
            .await
            .expect("ack succeeds"),
        1
    );

    let repeat = mailbox.append(message("bob", "alice", "m1", "one")).await;
    assert_eq!(
        repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 1 }
    );
    let other = mailbox.append(message("bob", "alice", "m1", "other")).await;
    assert!(
        matches!(other, Err(MailboxError::Conflict { .. })),
        "got {other:?}"
    );
    assert!(stored_seqs(mailbox, "bob").await.is_empty());
}

/// Checks that an id is new once its message is acked and the 50 ms window
/// has passed.
async fn dedupe_ends_after_ack_and_window(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    append_new(mailbox, message("bob", "alice", "m2", "two")).await;
    let bob = address("bob");
    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(1))
            .await
            .expect("ack succeeds"),
        1
    );
    let ids = AckTarget::Ids(vec!["m2".into()]);
    assert_eq!(mailbox.ack(&bob, ids).await.expect("ack succeeds"), 1);
    tokio::time::sleep(Duration::from_millis(150)).await;

    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m1", "one")).await,
        3
    );
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m2", "changed")).await,
        4
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [3, 4]);

    let repeat = mailbox.append(message("bob", "alice", "m1", "one")).await;
    assert_eq!(
        repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 3 }
    );
}

/// Checks `Full` with a limit of 3.
async fn full_at_limit(mailbox: &impl Mailbox) {
    for id in ["m1", "m2", "m3"] {
        append_new(mailbox, message("bob", "alice", id, id)).await;
    }
    let bob = address("bob");

    let over = mailbox.append(message("bob", "alice", "m4", "m4")).await;
    assert!(
        matches!(over, Err(MailboxError::Full { limit: 3 })),
        "got {over:?}"
    );
    let repeat = mailbox.append(message("bob", "alice", "m1", "m1")).await;
    assert_eq!(
        repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 1 }
    );
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 3);
    assert_eq!(
        append_new(mailbox, message("carol", "alice", "m4", "m4")).await,
        1
    );

    assert_eq!(
        mailbox
            .ack(&bob, AckTarget::UpTo(1))
            .await
            .expect("ack succeeds"),
        1
    );
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m4", "m4")).await,
        4
    );
    let over = mailbox.append(message("bob", "alice", "m5", "m5")).await;
    assert!(
        matches!(over, Err(MailboxError::Full { limit: 3 })),
        "got {over:?}"
    );
}

/// Checks expiry with a TTL of 1 s and a dedupe window of 50 ms. The last
/// append must be read within 1 s, so the TTL is not shorter.
async fn ttl_hides_and_expire_deletes(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    append_new(mailbox, message("bob", "alice", "m2", "two")).await;
    append_new(mailbox, message("carol", "alice", "m1", "one")).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    append_new(mailbox, message("bob", "alice", "m3", "three")).await;
    let bob = address("bob");

    assert_eq!(
        stored_seqs(mailbox, "bob").await,
        [3],
        "expired messages were read"
    );
    assert!(stored_seqs(mailbox, "carol").await.is_empty());

    let expired = mailbox
        .expire(SystemTime::now())
        .await
        .expect("expire succeeds");
    assert_eq!(expired, 3);
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 1);
    assert_eq!(
        mailbox
            .count(&address("carol"))
            .await
            .expect("count succeeds"),
        0
    );
    assert_eq!(
        mailbox
            .expire(SystemTime::now())
            .await
            .expect("expire succeeds"),
        0
    );

    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m1", "one")).await,
        4
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [3, 4]);
}

async fn expire_uses_given_time(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    append_new(mailbox, message("bob", "alice", "m2", "two")).await;
    let bob = address("bob");

    assert_eq!(
        mailbox
            .expire(SystemTime::now())
            .await
            .expect("expire succeeds"),
        0
    );
    assert_eq!(stored_seqs(mailbox, "bob").await, [1, 2]);

    let later = SystemTime::now() + Duration::from_secs(2 * 3600);
    assert_eq!(mailbox.expire(later).await.expect("expire succeeds"), 2);
    assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 0);
    assert!(stored_seqs(mailbox, "bob").await.is_empty());
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m3", "three")).await,
        3
    );
}

async fn concurrent_appends_contiguous(mailbox: &impl Mailbox) {
    const COUNT: u64 = 300;
    let appends = (0..COUNT).map(|index| {
        let id = format!("m{index}");
        mailbox.append(message("bob", "alice", &id, &id))
    });
    let results = join_all(appends).await;

    let mut seqs: Vec<u64> = results
        .into_iter()
        .map(|result| match result {
            Ok(Appended::New(stored)) => stored.seq,
            other => panic!("expected a new message, got {other:?}"),
        })
        .collect();
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=COUNT).collect();
    assert_eq!(seqs, expected);

    let stored = mailbox
        .read(&address("bob"), 0, 1000)
        .await
        .expect("read succeeds");
    let read_seqs: Vec<u64> = stored.iter().map(|message| message.seq).collect();
    assert_eq!(read_seqs, expected);
    for message in &stored {
        assert!(
            message
                .envelope_json
                .contains(&format!("\"{}\"", message.message_id))
        );
    }
}

async fn close_rejects_calls(mailbox: &impl Mailbox) {
    append_new(mailbox, message("bob", "alice", "m1", "one")).await;
    mailbox.check().await.expect("check succeeds while open");
    mailbox.close().await;

    let append = mailbox.append(message("bob", "alice", "m2", "two")).await;
    assert!(
        matches!(append, Err(MailboxError::Unavailable(_))),
        "got {append:?}"
    );
    let ack = mailbox.ack(&address("bob"), AckTarget::UpTo(1)).await;
    assert!(
        matches!(ack, Err(MailboxError::Unavailable(_))),
        "got {ack:?}"
    );
    let expire = mailbox.expire(SystemTime::now()).await;
    assert!(
        matches!(expire, Err(MailboxError::Unavailable(_))),
        "got {expire:?}"
    );
    let check = mailbox.check().await;
    assert!(
        matches!(check, Err(MailboxError::Unavailable(_))),
        "got {check:?}"
    );
}

/// Stores the state that [`check_state_after_reopen`] expects: m1 to m3 for
/// bob, with seq 1 acknowledged.
pub(crate) async fn fill_before_reopen(mailbox: &impl Mailbox) {
    for id in ["m1", "m2", "m3"] {
        append_new(mailbox, message("bob", "alice", id, id)).await;
    }
    let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(1)).await;
    assert_eq!(acked.expect("ack succeeds"), 1);
}

/// Checks that a mailbox opened again over [`fill_before_reopen`]'s state
/// kept the messages, the count, the next seq, the ack cursor and dedupe.
pub(crate) async fn check_state_after_reopen(mailbox: &impl Mailbox) {
    assert_eq!(stored_seqs(mailbox, "bob").await, [2, 3]);
    let count = mailbox.count(&address("bob")).await;
    assert_eq!(count.expect("count succeeds"), 2);
    assert_eq!(
        append_new(mailbox, message("bob", "alice", "m4", "m4")).await,
        4
    );

    let repeat = mailbox.append(message("bob", "alice", "m2", "m2")).await;
    assert_eq!(
        repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 2 }
    );
    let acked_repeat = mailbox.append(message("bob", "alice", "m1", "m1")).await;
    assert_eq!(
        acked_repeat.expect("append succeeds"),
        Appended::Duplicate { seq: 1 }
    );
    let conflict = mailbox.append(message("bob", "alice", "m3", "other")).await;
    assert!(
        matches!(conflict, Err(MailboxError::Conflict { .. })),
        "got {conflict:?}"
    );
}
