//! The PostgreSQL mailbox, shared by every instance of a cluster.
//!
//! All tables live in the schema given to [`PostgresMailbox::connect`],
//! created and migrated at connect (see `migrations.rs`):
//!
//! - `mailbox_counters`: recipient -> last seq, stored count and last
//!   `received_at_ms`. Every append, ack and expiry of a recipient locks this
//!   row first, so writes to one recipient run one at a time. Each of these
//!   transactions locks rows of one recipient only, so they cannot deadlock
//!   one another. The dedupe sweep spans recipients but skips locked rows.
//! - `messages`: (recipient, seq) -> sender, message id, `received_at_ms`
//!   and envelope JSON.
//! - `dedupe`: (recipient, sender, message id) -> seq, content hash and
//!   acceptance time, kept while the message is stored or the dedupe window
//!   is open.
//!
//! Appends, acks and expiry batches call the PL/pgSQL functions of migration
//! 2 (`migrations/0002_write_functions.sql`). Each call is one statement in
//! its own transaction, so it costs one round trip and the counter row stays
//! locked only while the function runs and its transaction commits. `append`
//! returns after that commit, so it is as durable as the server's
//! `synchronous_commit` setting makes a commit.
//!
//! Times are milliseconds since the Unix epoch on this instance's clock. A
//! message's `received_at_ms` is the later of that clock and the recipient's
//! last one, so it never decreases with seq even when instances' clocks differ.
//!
//! NOTE: TTL and dedupe windows are measured on the clock of the instance
//! that runs the call, so clock skew between instances shifts them by the skew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use routing_protocol::Address;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use super::{
    AckTarget, Appended, Mailbox, MailboxError, MailboxSettings, NewMessage, StoredMessage,
    duration_millis, unix_millis,
};

mod migrations;
#[cfg(test)]
mod tests;

/// Connection pool settings of a [`PostgresMailbox`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresPoolSettings {
    /// Maximum open connections from this instance.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails with
    /// [`MailboxError::Unavailable`]. It bounds the first connect too.
    pub acquire_timeout: Duration,
}

/// The PostgreSQL-backed mailbox. See the module docs for the tables.
pub struct PostgresMailbox {
    pool: PgPool,
    closed: AtomicBool,
    limits: Limits,
    expire_batch: ExpireBatch,
}

/// [`MailboxSettings`] in the units of the tables.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_stored_per_user: u64,
    max_stored: i64,
    ttl_ms: i64,
    dedupe_window_ms: i64,
}

impl Limits {
    fn new(settings: &MailboxSettings) -> Self {
        Self {
            max_stored_per_user: settings.max_stored_per_user,
            max_stored: to_db(settings.max_stored_per_user),
            ttl_ms: to_db(duration_millis(settings.message_ttl)),
            dedupe_window_ms: to_db(duration_millis(settings.dedupe_window)),
        }
    }

    /// Returns the latest `received_at_ms` that is expired at `now_ms`.
    fn expired_cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.ttl_ms)
    }

    /// Returns the latest acceptance time whose dedupe window has passed at `now_ms`.
    fn window_cutoff(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.dedupe_window_ms)
    }
}

/// How much one `expire` step takes on, so no transaction grows with the backlog.
#[derive(Debug, Clone, Copy)]
struct ExpireBatch {
    /// Recipients looked up per query.
    recipients: i64,
    /// Messages or dedupe records deleted per transaction.
    rows: i64,
}

const EXPIRE_BATCH: ExpireBatch = ExpireBatch {
    recipients: 100,
    rows: 1000,
};

/// How long a pooled connection may sit idle before it is pinged when it is
/// handed out again. A connection broken sooner, for example by a server
/// restart, fails the call that gets it with [`MailboxError::Unavailable`],
/// and the pool replaces it.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

impl PostgresMailbox {
    /// Connects to PostgreSQL at `url`, creates `schema` when missing and
    /// applies the migrations it lacks.
    ///
    /// `schema` is 1 to 63 lowercase ASCII letters, digits and underscores,
    /// not starting with a digit or `pg_`. Fails with
    /// [`MailboxError::Unavailable`] when the server cannot be reached within
    /// `pool.acquire_timeout`, and with [`MailboxError::Internal`] on an
    /// invalid URL or schema name or a failed migration.
    pub async fn connect(
        url: &str,
        schema: &str,
        pool: PostgresPoolSettings,
        settings: MailboxSettings,
    ) -> Result<Self, MailboxError> {
        validate_schema(schema)?;
        // In sqlx 0.9.1 a URL parse error names what failed, not the password.
        let options: PgConnectOptions = url
            .parse()
            .map_err(|err| MailboxError::Internal(format!("invalid PostgreSQL URL: {err}")))?;
        let options = options
            .application_name("routing-service")
            .options([("search_path", schema)]);

        let connections = PgPoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            // sqlx pings every idle connection it hands out by default, which
            // costs a round trip per call. Only connections idle for a while
            // are pinged here.
            .test_before_acquire(false)
            .before_acquire(|conn, metadata| {
                Box::pin(async move {
                    if metadata.idle_for >= PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(backend_error)?;
        if let Err(err) = migrations::run(&connections, schema).await {
            connections.close().await;
            return Err(err);
        }

        tracing::info!(
            schema,
            max_connections = pool.max_connections,
            max_stored_per_user = settings.max_stored_per_user,
            "PostgreSQL mailbox connected"
        );
        Ok(Self {
            pool: connections,
            closed: AtomicBool::new(false),
            limits: Limits::new(&settings),
            expire_batch: EXPIRE_BATCH,
        })
    }

    fn open_pool(&self) -> Result<&PgPool, MailboxError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed_error());
        }
        Ok(&self.pool)
    }
}

#[async_trait]
impl Mailbox for PostgresMailbox {
    /// Runs `append_message` (migration 2) as one statement, so the call is
    /// one round trip and returns after its commit.
    async fn append(&self, message: NewMessage) -> Result<Appended, MailboxError> {
        let pool = self.open_pool()?;
        let now_ms = now_ms();
        let row: (String, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT outcome, seq, received_at_ms \
             FROM append_message($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(message.recipient.as_str())
        .bind(message.sender.as_str())
        .bind(&message.message_id)
        .bind(message.content_hash.to_be_bytes().as_slice())
        .bind(&*message.envelope_json)
        .bind(now_ms)
        .bind(self.limits.window_cutoff(now_ms))
        .bind(self.limits.expired_cutoff(now_ms))
        .bind(self.limits.max_stored)
        .fetch_one(pool)
        .await
        .map_err(backend_error)?;
        self.append_outcome(row, message)
    }

    async fn read(
        &self,
        recipient: &Address,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, MailboxError> {
        let pool = self.open_pool()?;
        // Seqs are stored as bigint, so none is above i64::MAX.
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }

        let rows: Vec<(i64, i64, String, String)> = sqlx::query_as(
            "SELECT seq, received_at_ms, message_id, envelope_json FROM messages \
             WHERE recipient = $1 AND seq > $2 AND received_at_ms > $3 \
             ORDER BY seq LIMIT $4",
        )
        .bind(recipient.as_str())
        .bind(after)
        .bind(self.limits.expired_cutoff(now_ms()))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await
        .map_err(backend_error)?;
        rows.into_iter().map(stored_message).collect()
    }

    /// Runs `ack_up_to` or `ack_message_ids` (migration 2) as one statement.
    async fn ack(&self, recipient: &Address, target: AckTarget) -> Result<u64, MailboxError> {
        let pool = self.open_pool()?;
        let window_cutoff = self.limits.window_cutoff(now_ms());
        let deleted = match target {
            AckTarget::UpTo(up_to) => {
                sqlx::query_scalar("SELECT ack_up_to($1, $2, $3)")
                    .bind(recipient.as_str())
                    .bind(window_cutoff)
                    .bind(to_db(up_to))
                    .fetch_one(pool)
                    .await
            }
            AckTarget::Ids(ids) => {
                sqlx::query_scalar("SELECT ack_message_ids($1, $2, $3)")
                    .bind(recipient.as_str())
                    .bind(window_cutoff)
                    .bind(ids)
                    .fetch_one(pool)
                    .await
            }
        };
        let deleted: i64 = deleted.map_err(backend_error)?;
        from_db(deleted, "acked count")
    }

    /// Counts stored messages, including expired ones that `expire` has not
    /// deleted yet.
    async fn count(&self, recipient: &Address) -> Result<u64, MailboxError> {
        let stored: Option<i64> =
            sqlx::query_scalar("SELECT stored FROM mailbox_counters WHERE recipient = $1")
                .bind(recipient.as_str())
                .fetch_optional(self.open_pool()?)
                .await
                .map_err(backend_error)?;
        from_db(stored.unwrap_or(0), "stored count")
    }

    /// Deletes expired messages recipient by recipient, each batch in its
    /// own transaction under the recipient's lock. Instances that run it at
    /// once share the work, and each message is counted by the one that
    /// deleted it.
    async fn expire(&self, now: SystemTime) -> Result<u64, MailboxError> {
        let pool = self.open_pool()?;
        let now_ms = to_db(unix_millis(now));
        let mut expired = 0;
        loop {
            let recipients: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT recipient FROM messages WHERE received_at_ms <= $1 LIMIT $2",
            )
            .bind(self.limits.expired_cutoff(now_ms))
            .bind(self.expire_batch.recipients)
            .fetch_all(pool)
            .await
            .map_err(backend_error)?;
            if recipients.is_empty() {
                break;
            }
            for recipient in &recipients {
                expired += self.expire_recipient(pool, recipient, now_ms).await?;
            }
        }
        self.sweep_dedupe(pool, now_ms).await?;
        from_db(expired, "expired count")
    }

    async fn check(&self) -> Result<(), MailboxError> {
        sqlx::query("SELECT 1")
            .execute(self.open_pool()?)
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    /// Rejects new calls, waits for the calls in flight to return their
    /// connections, then closes every connection.
    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.pool.close().await;
        tracing::info!("PostgreSQL mailbox closed");
    }
}

impl PostgresMailbox {
    /// Converts the row of `append_message` to the result of `append`.
    fn append_outcome(
        &self,
        row: (String, Option<i64>, Option<i64>),
        message: NewMessage,
    ) -> Result<Appended, MailboxError> {
        let (outcome, seq, received_at_ms) = row;
        match outcome.as_str() {
            "new" => Ok(Appended::New(StoredMessage {
                seq: from_db(required(seq, "seq")?, "seq")?,
                received_at_ms: from_db(
                    required(received_at_ms, "received_at_ms")?,
                    "received_at_ms",
                )?,
                message_id: message.message_id,
                envelope_json: message.envelope_json,
            })),
            "duplicate" => Ok(Appended::Duplicate {
                seq: from_db(required(seq, "seq")?, "dedupe seq")?,
            }),
            "conflict" => Err(MailboxError::Conflict {
                message_id: message.message_id,
            }),
            "full" => Err(MailboxError::Full {
                limit: self.limits.max_stored_per_user,
            }),
            other => Err(MailboxError::Internal(format!(
                "append_message returned the unknown outcome {other:?}"
            ))),
        }
    }

    /// Deletes the expired messages of one recipient, one batch per
    /// `delete_expired_batch` call; returns how many this call deleted.
    async fn expire_recipient(
        &self,
        pool: &PgPool,
        recipient: &str,
        now_ms: i64,
    ) -> Result<i64, MailboxError> {
        let mut expired = 0;
        loop {
            let deleted: i64 = sqlx::query_scalar("SELECT delete_expired_batch($1, $2, $3, $4)")
                .bind(recipient)
                .bind(self.limits.window_cutoff(now_ms))
                .bind(self.limits.expired_cutoff(now_ms))
                .bind(self.expire_batch.rows)
                .fetch_one(pool)
                .await
                .map_err(backend_error)?;

            expired += deleted;
            if deleted < self.expire_batch.rows {
                return Ok(expired);
            }
        }
    }

    /// Deletes dedupe records whose window has passed and whose message is
    /// gone. Records locked by an append or another sweep are skipped, and
    /// the outer check of `accepted_at_ms` skips a record that an append
    /// has just renewed.
    async fn sweep_dedupe(&self, pool: &PgPool, now_ms: i64) -> Result<(), MailboxError> {
        loop {
            let swept = sqlx::query(
                "DELETE FROM dedupe WHERE accepted_at_ms <= $1 \
                 AND (recipient, sender, message_id) IN ( \
                     SELECT d.recipient, d.sender, d.message_id FROM dedupe d \
                     WHERE d.accepted_at_ms <= $1 AND NOT EXISTS (SELECT 1 FROM messages m \
                         WHERE m.recipient = d.recipient AND m.seq = d.seq) \
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(self.limits.window_cutoff(now_ms))
            .bind(self.expire_batch.rows)
            .execute(pool)
            .await
            .map_err(backend_error)?;
            if swept.rows_affected() < u64::try_from(self.expire_batch.rows).unwrap_or(0) {
                return Ok(());
            }
        }
    }
}

/// Returns a column of `append_message` that its outcome always sets.
fn required(value: Option<i64>, column: &str) -> Result<i64, MailboxError> {
    value.ok_or_else(|| MailboxError::Internal(format!("append_message returned no {column}")))
}

fn stored_message(row: (i64, i64, String, String)) -> Result<StoredMessage, MailboxError> {
    let (seq, received_at_ms, message_id, envelope_json) = row;
    Ok(StoredMessage {
        seq: from_db(seq, "seq")?,
        received_at_ms: from_db(received_at_ms, "received_at_ms")?,
        message_id,
        envelope_json: envelope_json.into(),
    })
}

/// Checks that a schema name needs no quoting and is not reserved, because
/// it is written into SQL text and the connection's search_path.
fn validate_schema(schema: &str) -> Result<(), MailboxError> {
    let mut chars = schema.chars();
    let starts_well = chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_');
    let rest_valid = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if starts_well && rest_valid && schema.len() <= 63 && !schema.starts_with("pg_") {
        return Ok(());
    }
    Err(MailboxError::Internal(format!(
        "invalid PostgreSQL schema name {schema:?}: use 1 to 63 lowercase ASCII letters, \
         digits and underscores, not starting with a digit or pg_"
    )))
}

fn now_ms() -> i64 {
    to_db(unix_millis(SystemTime::now()))
}

/// Converts a number to bigint, saturating at `i64::MAX`.
fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Converts a bigint read from the tables, which never holds a negative value.
fn from_db(value: i64, what: &str) -> Result<u64, MailboxError> {
    u64::try_from(value).map_err(|_| {
        MailboxError::Internal(format!("negative {what} {value} in the mailbox tables"))
    })
}

fn closed_error() -> MailboxError {
    MailboxError::Unavailable("the mailbox is closed".into())
}

/// Maps connection, pool and transient server failures to
/// [`MailboxError::Unavailable`], and everything else to
/// [`MailboxError::Internal`].
fn backend_error(err: sqlx::Error) -> MailboxError {
    let transient = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        _ => false,
    };
    if transient {
        MailboxError::Unavailable(format!("PostgreSQL failed: {err}"))
    } else {
        MailboxError::Internal(format!("PostgreSQL failed: {err}"))
    }
}

/// Checks for SQLSTATEs that a retry may not meet: connection exceptions
/// (08), insufficient resources (53), shutdown or restart (57P01 to 57P03),
/// a cancelled statement (57014), serialization failures and deadlocks
/// (40001, 40P01) and lock timeouts (55P03).
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "57014" | "40001" | "40P01" | "55P03"
        )
}
