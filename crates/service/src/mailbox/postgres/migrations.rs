//! Versioned schema migrations, applied when a mailbox connects.
//!
//! Every migration that `schema_migrations` does not list runs in one
//! transaction that first takes a transaction-level advisory lock keyed by
//! the schema name. Instances that start at once therefore migrate one after
//! the other, and the later ones find nothing left to do.

use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use super::{MailboxError, backend_error};

/// One schema change. Versions only grow, and a released migration never changes.
pub(super) struct Migration {
    pub(super) version: i64,
    pub(super) name: &'static str,
    pub(super) sql: &'static str,
}

/// Every migration, in version order.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create_tables",
        sql: include_str!("migrations/0001_create_tables.sql"),
    },
    Migration {
        version: 2,
        name: "write_functions",
        sql: include_str!("migrations/0002_write_functions.sql"),
    },
];

/// Creates `schema` when missing and applies the migrations it lacks.
///
/// `schema` must have passed [`super::validate_schema`], because it is
/// written into the SQL text.
pub(super) async fn run(pool: &PgPool, schema: &str) -> Result<(), MailboxError> {
    apply_missing(pool, schema, MIGRATIONS).await
}

/// Creates `schema` when missing and applies those of `migrations` that it
/// lacks. Tests pass a prefix of [`MIGRATIONS`] to build an older schema.
pub(super) async fn apply_missing(
    pool: &PgPool,
    schema: &str,
    migrations: &[Migration],
) -> Result<(), MailboxError> {
    let mut tx = pool.begin().await.map_err(backend_error)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(schema))
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?;

    prepare_schema(&mut tx, schema).await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(&mut *tx)
        .await
        .map_err(backend_error)?;
    warn_on_unknown_versions(schema, &applied);

    for migration in migrations {
        if applied.contains(&migration.version) {
            continue;
        }
        apply(&mut tx, migration).await?;
        tracing::info!(
            schema,
            version = migration.version,
            name = migration.name,
            "mailbox migration applied"
        );
    }
    tx.commit().await.map_err(backend_error)
}

/// Creates the schema and the `schema_migrations` table when missing.
async fn prepare_schema(conn: &mut PgConnection, schema: &str) -> Result<(), MailboxError> {
    // `SET LOCAL` makes the connection resolve names in the schema that may
    // have just been created, whatever search_path it started with.
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; \
         SET LOCAL search_path TO \"{schema}\"; \
         CREATE TABLE IF NOT EXISTS schema_migrations ( \
             version bigint PRIMARY KEY, \
             name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now() \
         )"
    );
    sqlx::raw_sql(AssertSqlSafe(create))
        .execute(conn)
        .await
        .map_err(backend_error)?;
    Ok(())
}

async fn apply(conn: &mut PgConnection, migration: &Migration) -> Result<(), MailboxError> {
    sqlx::raw_sql(migration.sql)
        .execute(&mut *conn)
        .await
        .map_err(backend_error)?;
    sqlx::query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)")
        .bind(migration.version)
        .bind(migration.name)
        .execute(&mut *conn)
        .await
        .map_err(backend_error)?;
    Ok(())
}

/// Logs versions that a newer release applied. This release keeps running,
/// because migrations only add to the schema.
fn warn_on_unknown_versions(schema: &str, applied: &[i64]) {
    let newest_known = MIGRATIONS.last().map_or(0, |migration| migration.version);
    let Some(newest_applied) = applied.iter().copied().max() else {
        return;
    };
    if newest_applied > newest_known {
        // NOTE: nothing checks that a newer migration kept the tables this
        // release uses; a migration that drops or renames one breaks it.
        tracing::warn!(
            schema,
            newest_applied,
            newest_known,
            "mailbox schema has migrations newer than this release"
        );
    }
}

/// Derives the advisory lock key from the schema name, so instances on
/// different schemas of one database do not wait for each other.
fn lock_key(schema: &str) -> i64 {
    let mut input = b"routing-service mailbox migrations\0".to_vec();
    input.extend_from_slice(schema.as_bytes());
    i64::from_be_bytes(xxhash_rust::xxh3::xxh3_64(&input).to_be_bytes())
}
