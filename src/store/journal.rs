//! The retention journal: each step of pruning a partition (detach,
//! archive, drop) is recorded here before it is taken, so an interrupted
//! prune resumes where it stopped (see `maintenance`).

use crate::config::Config;
use crate::store::catalog::{qualify, split_name};

/// Journal of retention steps, next to the offsets table.
pub fn journal_table(config: &Config) -> String {
    let (schema, _) = split_name(&config.postgres.offsets_table, &config.postgres.schema);
    qualify(schema, "weir_partition_jobs")
}

pub fn journal_ddl(config: &Config) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
            parent_oid   oid         NOT NULL,
            parent       text        NOT NULL,
            partition    text        NOT NULL,  -- schema-qualified, quoted
            lower_bound  bigint      NOT NULL,  -- Unix microseconds
            upper_bound  bigint      NOT NULL,
            state        text        NOT NULL,  -- detaching | detached | archived
            archive_path text,
            updated_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (partition)
        );",
        journal_table(config)
    )
}
