//! `weir migrate`: the bundled schema (the seeds' tables, from SQL files
//! under `config/schema/`) and weir's own tables (offsets, dead letters).
//!
//! Every statement is idempotent (`IF NOT EXISTS`), and the whole migration
//! runs in one transaction under an advisory lock, so pods starting together
//! can all run it.

use tokio_postgres::Client;

use crate::config::Config;
use crate::store::catalog::{qualify, split_name};
use crate::store::deadletter::DeadLetterTable;
use crate::store::offsets::OffsetStore;
use crate::store::partition::ADVISORY_LOCK_CLASS;

/// The bundled SQL files, in order: (file name, SQL).
pub const BUNDLED: &[(&str, &str)] = &[
    (
        "010_wa_events.sql",
        include_str!("../../config/schema/010_wa_events.sql"),
    ),
    (
        "020_messages.sql",
        include_str!("../../config/schema/020_messages.sql"),
    ),
    (
        "030_webhook_logs.sql",
        include_str!("../../config/schema/030_webhook_logs.sql"),
    ),
];

/// Second key of the migration advisory lock (the first is weir's class).
const MIGRATION_LOCK: i32 = 0;

/// Applies weir's own tables and, unless `internal_only`, the bundled
/// schema. Returns the names of the steps applied.
pub async fn migrate(
    client: &mut Client,
    config: &Config,
    internal_only: bool,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&ADVISORY_LOCK_CLASS, &MIGRATION_LOCK],
        )
        .await?;
    let mut applied = Vec::new();
    if !internal_only {
        for (name, sql) in BUNDLED {
            transaction.batch_execute(sql).await?;
            applied.push(name.to_string());
        }
    }
    for (name, sql) in internal_ddl(config) {
        transaction.batch_execute(&sql).await?;
        applied.push(name);
    }
    transaction.commit().await?;
    Ok(applied)
}

/// DDL of weir's own tables: (description, SQL).
pub fn internal_ddl(config: &Config) -> Vec<(String, String)> {
    let offsets = OffsetStore::new(config);
    let dead = DeadLetterTable::new(config);
    vec![
        (format!("offsets table {}", offsets.table), offsets.ddl()),
        (
            format!("dead-letter table {}", dead.qualified()),
            dead.ddl(),
        ),
        (
            format!(
                "retention journal {}",
                crate::store::journal::journal_table(config)
            ),
            crate::store::journal::journal_ddl(config),
        ),
    ]
}

/// Creates weir's own tables if they are missing (what `weir run` needs even
/// when the user manages the data tables). Checks first, so a role without
/// CREATE rights can run weir against tables made by `weir migrate`.
pub async fn ensure_internal(
    client: &mut Client,
    config: &Config,
) -> Result<(), tokio_postgres::Error> {
    let (offsets_schema, offsets) =
        split_name(&config.postgres.offsets_table, &config.postgres.schema);
    let (dead_schema, dead) = split_name(&config.dead_letters.table, &config.postgres.schema);
    let names = [
        qualify(offsets_schema, offsets),
        qualify(dead_schema, dead),
        crate::store::journal::journal_table(config),
    ];
    let mut missing = false;
    for name in &names {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[name])
            .await?
            .get(0);
        missing |= !exists;
    }
    if missing {
        migrate(client, config, true).await?;
    }
    Ok(())
}
