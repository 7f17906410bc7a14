//! Tests against the PostgreSQL server at `ROUTING_TEST_POSTGRES_URL`
//! (default `postgres://127.0.0.1:5432/test`). Each mailbox gets its own
//! schema, and each test drops the schemas it created when it ends, even when
//! it fails.

use std::future::Future;
use std::panic::{AssertUnwindSafe, resume_unwind};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use sqlx::AssertSqlSafe;

use super::*;
use crate::mailbox::conformance::{
    self, address, append_new, message, roomy_settings, stored_seqs,
};

/// Maximum time of the whole conformance suite. Each case has its own limit too.
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

/// Maximum time of every other test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

fn test_url() -> String {
    std::env::var("ROUTING_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".into())
}

fn pool_settings() -> PostgresPoolSettings {
    PostgresPoolSettings {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(10),
    }
}

async fn connect(schema: &str, settings: MailboxSettings) -> PostgresMailbox {
    PostgresMailbox::connect(&test_url(), schema, pool_settings(), settings)
        .await
        .expect("the mailbox connects")
}

async fn admin_pool() -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&test_url())
        .await
        .expect("the test database accepts connections")
}

/// Counts the rows of a table in a test schema.
async fn row_count(schema: &str, table: &str) -> i64 {
    let admin = admin_pool().await;
    let sql = format!("SELECT count(*) FROM \"{schema}\".{table}");
    let count = sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&admin)
        .await
        .expect("the count query succeeds");
    admin.close().await;
    count
}

/// The schemas one test created.
#[derive(Clone, Default)]
struct Schemas(Arc<Mutex<Vec<String>>>);

impl Schemas {
    /// Returns a new unique schema name and remembers it for dropping.
    fn create_name(&self) -> String {
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        self.0
            .lock()
            .expect("the schema list is not poisoned")
            .push(name.clone());
        name
    }

    /// Drops every schema. A failure is printed and otherwise ignored.
    async fn drop_all(&self) {
        let names = std::mem::take(&mut *self.0.lock().unwrap_or_else(|err| err.into_inner()));
        let admin = admin_pool().await;
        for name in names {
            let sql = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
            if let Err(err) = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&admin).await {
                eprintln!("failed to drop test schema {name}: {err}");
            }
        }
        admin.close().await;
    }
}

/// Runs a test under `timeout`, then drops its schemas, also after a panic.
async fn with_schemas<F, Fut>(timeout: Duration, test: F)
where
    F: FnOnce(Schemas) -> Fut,
    Fut: Future<Output = ()>,
{
    let schemas = Schemas::default();
    let run = tokio::time::timeout(timeout, test(schemas.clone()));
    let outcome = AssertUnwindSafe(run).catch_unwind().await;
    schemas.drop_all().await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the test did not finish within {timeout:?}"),
        Err(panic) => resume_unwind(panic),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_conformance_suite() {
    with_schemas(SUITE_TIMEOUT, |schemas| async move {
        conformance::run_all(|settings| {
            let schema = schemas.create_name();
            async move { connect(&schema, settings).await }
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_twice_and_concurrently() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let known: Vec<i64> = migrations::MIGRATIONS
            .iter()
            .map(|migration| migration.version)
            .collect();
        // A few rounds, because two connects race for the new schema.
        for _ in 0..3 {
            let schema = schemas.create_name();
            let (first, second) = tokio::join!(
                connect(&schema, roomy_settings()),
                connect(&schema, roomy_settings()),
            );
            let third = connect(&schema, roomy_settings()).await;

            let admin = admin_pool().await;
            let sql =
                format!("SELECT version FROM \"{schema}\".schema_migrations ORDER BY version");
            let versions: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_all(&admin)
                .await
                .expect("schema_migrations is readable");
            admin.close().await;
            assert_eq!(versions, known, "each migration is recorded once");

            assert_eq!(
                append_new(&first, message("bob", "alice", "m1", "m1")).await,
                1
            );
            assert_eq!(
                append_new(&second, message("bob", "alice", "m2", "m2")).await,
                2
            );
            assert_eq!(stored_seqs(&third, "bob").await, [1, 2]);
            for mailbox in [first, second, third] {
                mailbox.close().await;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_keeps_seq_and_dedupe() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let schema = schemas.create_name();
        let mailbox = connect(&schema, roomy_settings()).await;
        conformance::fill_before_reopen(&mailbox).await;
        mailbox.close().await;

        let mailbox = connect(&schema, roomy_settings()).await;
        conformance::check_state_after_reopen(&mailbox).await;
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_expire_counts_each_once() {
    const RECIPIENTS: usize = 6;
    const PER_RECIPIENT: usize = 10;
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let schema = schemas.create_name();
        // Small batches, so the two runs interleave over many transactions.
        let small = ExpireBatch {
            recipients: 2,
            rows: 3,
        };
        let mut first = connect(&schema, roomy_settings()).await;
        first.expire_batch = small;
        let mut second = connect(&schema, roomy_settings()).await;
        second.expire_batch = small;
        for recipient in 0..RECIPIENTS {
            for index in 0..PER_RECIPIENT {
                let id = format!("m{index}");
                let to = format!("r{recipient}");
                append_new(&first, message(&to, "alice", &id, &id)).await;
            }
        }

        let later = SystemTime::now() + Duration::from_secs(2 * 3600);
        let (by_first, by_second) = tokio::join!(first.expire(later), second.expire(later));
        let by_first = by_first.expect("the first expire succeeds");
        let by_second = by_second.expect("the second expire succeeds");
        assert_eq!(by_first + by_second, (RECIPIENTS * PER_RECIPIENT) as u64);

        for recipient in 0..RECIPIENTS {
            let to = address(&format!("r{recipient}"));
            assert_eq!(first.count(&to).await.expect("count succeeds"), 0);
        }
        assert_eq!(row_count(&schema, "messages").await, 0);
        assert_eq!(row_count(&schema, "dedupe").await, 0);
        assert_eq!(first.expire(later).await.expect("expire succeeds"), 0);
        assert_eq!(
            append_new(&second, message("r0", "alice", "m0", "m0")).await,
            (PER_RECIPIENT + 1) as u64
        );
        first.close().await;
        second.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_store_once() {
    const REPEATS: usize = 20;
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let mailbox = connect(&schemas.create_name(), roomy_settings()).await;
        // The recipient is new, so the repeats also race to create its counter row.
        let appends = (0..REPEATS).map(|_| mailbox.append(message("bob", "alice", "m1", "one")));
        let results = futures_util::future::join_all(appends).await;

        let mut new = 0;
        for result in results {
            match result.expect("append succeeds") {
                Appended::New(stored) => {
                    assert_eq!(stored.seq, 1);
                    new += 1;
                }
                Appended::Duplicate { seq } => assert_eq!(seq, 1),
            }
        }
        assert_eq!(new, 1, "exactly one append stores the message");
        assert_eq!(stored_seqs(&mailbox, "bob").await, [1]);
        let count = mailbox.count(&address("bob")).await;
        assert_eq!(count.expect("count succeeds"), 1);
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_of_expired_messages_accepts() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let settings = MailboxSettings {
            max_stored_per_user: 2,
            message_ttl: Duration::from_millis(100),
            ..roomy_settings()
        };
        let mailbox = connect(&schemas.create_name(), settings).await;
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        append_new(&mailbox, message("bob", "alice", "m2", "m2")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m3", "m3")).await,
            3
        );
        let count = mailbox.count(&address("bob")).await;
        assert_eq!(count.expect("count succeeds"), 1);
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_sweeps_dead_dedupe_records() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let schema = schemas.create_name();
        let settings = MailboxSettings {
            dedupe_window: Duration::from_millis(50),
            ..roomy_settings()
        };
        let mailbox = connect(&schema, settings).await;
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        append_new(&mailbox, message("bob", "alice", "m2", "m2")).await;
        let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(1)).await;
        assert_eq!(acked.expect("ack succeeds"), 1);
        assert_eq!(row_count(&schema, "dedupe").await, 2, "m1 is in its window");
        tokio::time::sleep(Duration::from_millis(100)).await;

        let expired = mailbox.expire(SystemTime::now()).await;
        assert_eq!(expired.expect("expire succeeds"), 0);
        assert_eq!(row_count(&schema, "dedupe").await, 1, "m2 is stored");

        let acked = mailbox.ack(&address("bob"), AckTarget::UpTo(2)).await;
        assert_eq!(acked.expect("ack succeeds"), 1);
        assert_eq!(row_count(&schema, "dedupe").await, 0);
        assert_eq!(row_count(&schema, "messages").await, 0);
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_unavailable() {
    let settings = PostgresPoolSettings {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(2),
    };
    // Nothing listens on port 1 of the loopback address.
    let url = "postgres://routing:secret-password@127.0.0.1:1/test";
    let connect = PostgresMailbox::connect(url, "t_unreachable", settings, roomy_settings());
    let result = tokio::time::timeout(TEST_TIMEOUT, connect)
        .await
        .expect("the connect fails in time");
    match result {
        Err(MailboxError::Unavailable(reason)) => {
            assert!(!reason.contains("secret-password"), "leaked: {reason}");
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("connected to a closed port"),
    }
}

#[tokio::test]
async fn invalid_schema_names_are_rejected() {
    let too_long = "a".repeat(64);
    for schema in [
        "",
        "Bad",
        "1abc",
        "pg_mailbox",
        "a-b",
        "a b",
        "a\"b",
        &too_long,
    ] {
        let result =
            PostgresMailbox::connect(&test_url(), schema, pool_settings(), roomy_settings()).await;
        assert!(
            matches!(result, Err(MailboxError::Internal(_))),
            "schema {schema:?} was accepted"
        );
    }
    assert!(validate_schema("mailbox_2").is_ok());
    assert!(validate_schema("_private").is_ok());
}

/// Builds a schema at migration version 1 with the rows that version-1
/// code left for bob: seq 5 acknowledged (its dedupe record in its window),
/// seqs 6 and 7 stored.
async fn fill_version_one_schema(schema: &str) {
    let admin = admin_pool().await;
    migrations::apply_missing(&admin, schema, &migrations::MIGRATIONS[..1])
        .await
        .expect("migration 1 applies");

    let now = now_ms();
    let bob = address("bob");
    let insert_counter = format!(
        "INSERT INTO \"{schema}\".mailbox_counters \
         (recipient, last_seq, stored, last_received_at_ms) VALUES ($1, 7, 2, $2)"
    );
    sqlx::query(AssertSqlSafe(insert_counter))
        .bind(bob.as_str())
        .bind(now)
        .execute(&admin)
        .await
        .expect("the counter row is inserted");
    for (seq, id) in [(5_i64, "m5"), (6, "m6"), (7, "m7")] {
        let old = message("bob", "alice", id, id);
        let insert_dedupe = format!(
            "INSERT INTO \"{schema}\".dedupe \
             (recipient, sender, message_id, seq, content_hash, accepted_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        );
        sqlx::query(AssertSqlSafe(insert_dedupe))
            .bind(old.recipient.as_str())
            .bind(old.sender.as_str())
            .bind(&old.message_id)
            .bind(seq)
            .bind(old.content_hash.to_be_bytes().as_slice())
            .bind(now)
            .execute(&admin)
            .await
            .expect("the dedupe record is inserted");
        if seq == 5 {
            continue;
        }
        let insert_message = format!(
            "INSERT INTO \"{schema}\".messages \
             (recipient, seq, sender, message_id, received_at_ms, envelope_json) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        );
        sqlx::query(AssertSqlSafe(insert_message))
            .bind(old.recipient.as_str())
            .bind(seq)
            .bind(old.sender.as_str())
            .bind(&old.message_id)
            .bind(now)
            .bind(&*old.envelope_json)
            .execute(&admin)
            .await
            .expect("the message is inserted");
    }
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_two_keeps_version_one_data() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let schema = schemas.create_name();
        fill_version_one_schema(&schema).await;

        let mailbox = connect(&schema, roomy_settings()).await;
        let admin = admin_pool().await;
        let sql = format!("SELECT version FROM \"{schema}\".schema_migrations ORDER BY version");
        let versions: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
            .fetch_all(&admin)
            .await
            .expect("schema_migrations is readable");
        admin.close().await;
        assert_eq!(versions, [1, 2]);

        let bob = address("bob");
        assert_eq!(stored_seqs(&mailbox, "bob").await, [6, 7]);
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m8", "m8")).await,
            8
        );
        let repeat = mailbox.append(message("bob", "alice", "m6", "m6")).await;
        assert_eq!(
            repeat.expect("append succeeds"),
            Appended::Duplicate { seq: 6 }
        );
        let acked_repeat = mailbox.append(message("bob", "alice", "m5", "other")).await;
        assert!(
            matches!(acked_repeat, Err(MailboxError::Conflict { .. })),
            "got {acked_repeat:?}"
        );
        assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 3);

        let acked = mailbox.ack(&bob, AckTarget::UpTo(7)).await;
        assert_eq!(acked.expect("ack succeeds"), 2);
        assert_eq!(mailbox.count(&bob).await.expect("count succeeds"), 1);
        assert_eq!(stored_seqs(&mailbox, "bob").await, [8]);
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_keeps_expired_deletions() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let schema = schemas.create_name();
        let roomy = connect(&schema, roomy_settings()).await;
        append_new(&roomy, message("bob", "alice", "m1", "m1")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        append_new(&roomy, message("bob", "alice", "m2", "m2")).await;

        // A second instance on the same tables, for which m1 has expired and
        // one stored message fills the mailbox.
        let strict_settings = MailboxSettings {
            max_stored_per_user: 1,
            message_ttl: Duration::from_millis(100),
            ..roomy_settings()
        };
        let strict = connect(&schema, strict_settings).await;
        let over = strict.append(message("bob", "alice", "m3", "m3")).await;
        assert!(
            matches!(over, Err(MailboxError::Full { limit: 1 })),
            "got {over:?}"
        );

        let bob = address("bob");
        assert_eq!(roomy.count(&bob).await.expect("count succeeds"), 1);
        assert_eq!(stored_seqs(&roomy, "bob").await, [2]);
        assert_eq!(row_count(&schema, "messages").await, 1);
        roomy.close().await;
        strict.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_functions_ignore_caller_search_path() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let schema = schemas.create_name();
        let mailbox = connect(&schema, roomy_settings()).await;
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;

        // The admin connection's search_path does not contain the schema.
        let admin = admin_pool().await;
        let new = message("bob", "alice", "m2", "m2");
        let call = format!(
            "SELECT outcome, seq FROM \"{schema}\".append_message( \
             $1, $2, $3, $4, $5, $6, 0, 0, 100)"
        );
        let (outcome, seq): (String, Option<i64>) = sqlx::query_as(AssertSqlSafe(call))
            .bind(new.recipient.as_str())
            .bind(new.sender.as_str())
            .bind(&new.message_id)
            .bind(new.content_hash.to_be_bytes().as_slice())
            .bind(&*new.envelope_json)
            .bind(now_ms())
            .fetch_one(&admin)
            .await
            .expect("append_message runs with the caller's search_path");
        admin.close().await;
        assert_eq!(outcome, "new");
        assert_eq!(seq, Some(2));

        assert_eq!(stored_seqs(&mailbox, "bob").await, [1, 2]);
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m3", "m3")).await,
            3
        );
        mailbox.close().await;
    })
    .await;
}

/// Connects a mailbox with a pool of one connection and returns it with
/// the server process id of that connection.
async fn connect_single(schema: &str) -> (PostgresMailbox, i32) {
    let single = PostgresPoolSettings {
        max_connections: 1,
        ..pool_settings()
    };
    let mailbox = PostgresMailbox::connect(&test_url(), schema, single, roomy_settings())
        .await
        .expect("the mailbox connects");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mailbox.pool)
        .await
        .expect("the pid query succeeds");
    (mailbox, pid)
}

/// Terminates the server process of the pool's one connection once that
/// connection is back in the pool, so the pool's own check on release has
/// passed.
async fn terminate_idle_backend(mailbox: &PostgresMailbox, pid: i32) {
    while mailbox.pool.num_idle() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let admin = admin_pool().await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .expect("pg_terminate_backend runs");
    admin.close().await;
    assert!(terminated, "backend {pid} was not terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_busy_connection_fails_one_call() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let (mailbox, pid) = connect_single(&schemas.create_name()).await;
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        terminate_idle_backend(&mailbox, pid).await;

        // Used less than PING_AFTER_IDLE ago, so the pool hands it out unchecked.
        let failed = mailbox.append(message("bob", "alice", "m2", "m2")).await;
        assert!(
            matches!(failed, Err(MailboxError::Unavailable(_))),
            "got {failed:?}"
        );
        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m2", "m2")).await,
            2
        );
        mailbox.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_idle_connection_is_replaced() {
    with_schemas(TEST_TIMEOUT, |schemas| async move {
        let (mailbox, pid) = connect_single(&schemas.create_name()).await;
        append_new(&mailbox, message("bob", "alice", "m1", "m1")).await;
        terminate_idle_backend(&mailbox, pid).await;
        tokio::time::sleep(PING_AFTER_IDLE + Duration::from_millis(200)).await;

        assert_eq!(
            append_new(&mailbox, message("bob", "alice", "m2", "m2")).await,
            2
        );
        mailbox.close().await;
    })
    .await;
}
