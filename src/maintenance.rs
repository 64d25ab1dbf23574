//! Partition upkeep: premake ahead of time, retention behind it, for every
//! table and for the dead-letter table. Runs as a loop inside `weir run`
//! and as `weir partitions ensure | prune`.
//!
//! Retention never blocks readers and never loses track of a partition:
//! - only partitions *wholly* older than the window are touched (a partition
//!   overlapping the window is never dropped);
//! - each step is journaled in `weir_partition_jobs` before it is taken, so
//!   a prune interrupted between detach and drop (a crash, a deploy) is
//!   finished by the next run, by any pod;
//! - detach uses `DETACH PARTITION ... CONCURRENTLY` (SHARE UPDATE EXCLUSIVE
//!   on the parent, then waits for queries using the partition), except on
//!   tables with a DEFAULT partition where PostgreSQL forbids it; an
//!   interrupted concurrent detach is completed with `FINALIZE`;
//! - when an archive directory is configured, the detached partition is
//!   copied to `<dir>/<partition>.csv.gz` with a manifest (table, bounds,
//!   rows, SHA-256), both fsynced, before it is dropped;
//! - `DROP TABLE` then only locks the detached table, which no query on the
//!   parent can reach any more.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::config::Config;
use crate::copy::now_micros;
use crate::decode::mapping::Mappings;
use crate::store::catalog::{qualify, quote_ident};
use crate::store::journal::journal_table;
use crate::store::partition::{ADVISORY_LOCK_CLASS, Leaf, ManagedTable, PartitionError};

/// What to do with one table's old partitions.
#[derive(Debug, Clone)]
pub struct Retention {
    pub days: u32,
    pub archive_dir: Option<PathBuf>,
}

/// One step taken (or, in a dry run, that would be taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created(String),
    Detached(String),
    Archived {
        partition: String,
        file: PathBuf,
        rows: u64,
    },
    Dropped(String),
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Created(p) => write!(f, "created {p}"),
            Action::Detached(p) => write!(f, "detached {p}"),
            Action::Archived {
                partition,
                file,
                rows,
            } => {
                write!(
                    f,
                    "archived {partition} ({rows} rows) to {}",
                    file.display()
                )
            }
            Action::Dropped(p) => write!(f, "dropped {p}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("postgres: {}", crate::store::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("archive {path}: {source}")]
    Archive {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Creates the partition holding now and the `ahead` following ones.
pub async fn premake(
    client: &mut Client,
    table: &ManagedTable,
    ahead: u32,
    lock_timeout: Duration,
    dry_run: bool,
) -> Result<Vec<Action>, PartitionError> {
    let mut actions = Vec::new();
    if table.snapshot().default.is_some() {
        // See `PartitionSet::route`: tables with a DEFAULT partition are
        // never given new partitions by weir.
        return Ok(actions);
    }
    let mut at = now_micros();
    for _ in 0..=ahead {
        let snapshot = table.snapshot();
        let (lo, hi) = snapshot.route(table.granularity, at);
        if snapshot.find(at).is_none() {
            if dry_run {
                actions.push(Action::Created(qualify(
                    &table.schema,
                    &crate::store::partition::leaf_name(&table.name, lo),
                )));
            } else {
                match table.ensure(client, lo, hi, lock_timeout).await {
                    Ok((leaf, true)) => actions.push(Action::Created(leaf.qualified())),
                    Ok((_, false)) | Err(PartitionError::Overlap) => {}
                    Err(err) => return Err(err),
                }
            }
        }
        at = hi;
    }
    Ok(actions)
}

/// Partitions of `table` wholly older than `now - days`.
pub fn expired(leaves: &[Leaf], days: u32, now: i64) -> Vec<Leaf> {
    let cutoff = now - days as i64 * 86_400_000_000;
    leaves
        .iter()
        .filter(|leaf| leaf.hi <= cutoff)
        .cloned()
        .collect()
}

/// Applies retention to one table: detach, archive (optionally) and drop
/// every partition wholly older than the window, and finish any prune a
/// previous run left half done.
pub async fn prune(
    client: &mut Client,
    config: &Config,
    table: &ManagedTable,
    retention: &Retention,
    lock_timeout: Duration,
    dry_run: bool,
) -> Result<Vec<Action>, MaintenanceError> {
    let journal = journal_table(config);
    let set = table.refresh(client).await?;
    let expired = expired(&set.leaves, retention.days, now_micros());
    let mut actions = Vec::new();
    if dry_run {
        for leaf in expired {
            actions.push(Action::Detached(leaf.qualified()));
            if let Some(dir) = &retention.archive_dir {
                actions.push(Action::Archived {
                    partition: leaf.qualified(),
                    file: dir.join(format!("{}.csv.gz", leaf.name)),
                    rows: 0,
                });
            }
            actions.push(Action::Dropped(leaf.qualified()));
        }
        return Ok(actions);
    }
    // One pruner per parent at a time, across pods. Session-level: DETACH
    // CONCURRENTLY cannot run inside a transaction.
    let lock_key = (table.oid as i32).wrapping_add(1 << 30);
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&ADVISORY_LOCK_CLASS, &lock_key],
        )
        .await?
        .get(0);
    if !locked {
        tracing::debug!(table = %table.qualified(), "another process is pruning this table");
        return Ok(actions);
    }
    let steps = Steps {
        journal: &journal,
        retention,
        lock_timeout,
    };
    let result = prune_locked(client, &steps, table, expired, &mut actions).await;
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock($1, $2)",
            &[&ADVISORY_LOCK_CLASS, &lock_key],
        )
        .await;
    table.refresh(client).await?;
    result.map(|()| actions)
}

/// How one prune takes its steps.
struct Steps<'a> {
    /// The retention journal (qualified name).
    journal: &'a str,
    retention: &'a Retention,
    lock_timeout: Duration,
}

async fn prune_locked(
    client: &mut Client,
    steps: &Steps<'_>,
    table: &ManagedTable,
    expired: Vec<Leaf>,
    actions: &mut Vec<Action>,
) -> Result<(), MaintenanceError> {
    let Steps {
        journal,
        retention,
        lock_timeout,
    } = *steps;
    // Unfinished work first: partitions a previous run detached but did not drop.
    let pending = client
        .query(
            &format!(
                "SELECT partition, lower_bound, upper_bound, state, archive_path FROM {journal}
                  WHERE parent_oid = $1 ORDER BY lower_bound"
            ),
            &[&table.oid],
        )
        .await?;
    let mut work: Vec<(String, i64, i64, String)> = pending
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    for leaf in expired {
        let qualified = leaf.qualified();
        if !work.iter().any(|(p, ..)| *p == qualified) {
            // Journal before acting: if we die after this, the next run knows.
            client
                .execute(
                    &format!(
                        "INSERT INTO {journal} (parent_oid, parent, partition, lower_bound, upper_bound, state)
                         VALUES ($1, $2, $3, $4, $5, 'detaching') ON CONFLICT (partition) DO NOTHING"
                    ),
                    &[&table.oid, &table.qualified(), &qualified, &leaf.lo, &leaf.hi],
                )
                .await?;
            work.push((qualified, leaf.lo, leaf.hi, "detaching".into()));
        }
    }
    let has_default = table.snapshot().default.is_some();
    for (partition, lo, hi, mut state) in work {
        if state == "detaching" {
            detach(client, table, &partition, has_default, lock_timeout).await?;
            set_state(client, journal, &partition, "detached", None).await?;
            actions.push(Action::Detached(partition.clone()));
            state = "detached".into();
        }
        // Archive before dropping: the archive and its manifest are synced
        // to disk and journaled before the data is gone.
        if state == "detached"
            && let Some(dir) = &retention.archive_dir
            && relation_exists(client, &partition).await?
        {
            let (file, rows) = archive(client, table, &partition, lo, hi, dir).await?;
            set_state(client, journal, &partition, "archived", Some(&file)).await?;
            actions.push(Action::Archived {
                partition: partition.clone(),
                file,
                rows,
            });
        }
        // Only the detached table is locked; no query on the parent reaches it.
        client
            .batch_execute(&format!(
                "SET lock_timeout = '{}ms'; DROP TABLE IF EXISTS {partition}; RESET lock_timeout;",
                lock_timeout.as_millis().max(1)
            ))
            .await?;
        client
            .execute(
                &format!("DELETE FROM {journal} WHERE partition = $1"),
                &[&partition],
            )
            .await?;
        metrics::counter!(crate::metrics::PARTITIONS_DROPPED, "table" => table.name.clone())
            .increment(1);
        tracing::info!(partition = %partition, "partition dropped by retention");
        actions.push(Action::Dropped(partition));
    }
    Ok(())
}

async fn relation_exists(client: &Client, qualified: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified])
        .await?
        .get(0))
}

/// The file name (without extension) of a partition's archive, from its
/// quoted, schema-qualified name: the table part, unquoted, with `/` (and
/// NUL) replaced, so a table name can never point the archive outside its
/// directory.
fn archive_file_stem(partition: &str) -> String {
    let table = match partition.rfind("\".\"") {
        Some(at) => &partition[at + 2..],
        None => partition.rsplit('.').next().unwrap_or(partition),
    };
    let unquoted = table
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .map(|t| t.replace("\"\"", "\""))
        .unwrap_or_else(|| table.to_string());
    unquoted.replace(['/', '\0'], "_")
}

/// Detaches `partition` from `table` if it is still attached (finishing an
/// interrupted concurrent detach).
async fn detach(
    client: &Client,
    table: &ManagedTable,
    partition: &str,
    has_default: bool,
    lock_timeout: Duration,
) -> Result<(), MaintenanceError> {
    let row = client
        .query_opt(
            "SELECT i.inhdetachpending FROM pg_inherits i
              WHERE i.inhparent = $1 AND i.inhrelid = to_regclass($2)",
            &[&table.oid, &partition],
        )
        .await?;
    let parent = table.qualified();
    let statement = match row {
        None => return Ok(()), // already detached (or gone)
        Some(row) if row.get::<_, bool>(0) => {
            format!("ALTER TABLE {parent} DETACH PARTITION {partition} FINALIZE")
        }
        // CONCURRENTLY is refused on tables with a DEFAULT partition.
        Some(_) if has_default => format!("ALTER TABLE {parent} DETACH PARTITION {partition}"),
        Some(_) => format!("ALTER TABLE {parent} DETACH PARTITION {partition} CONCURRENTLY"),
    };
    let mut wait = Duration::from_millis(200);
    for attempt in 0..10 {
        client
            .batch_execute(&format!(
                "SET lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            ))
            .await?;
        let result = client.batch_execute(&statement).await;
        client.batch_execute("RESET lock_timeout").await?;
        match result {
            Ok(()) => return Ok(()),
            Err(err) if err.code().map(|c| c.code()) == Some("55P03") && attempt < 9 => {
                crate::metrics::retry("lock_timeout");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

async fn set_state(
    client: &Client,
    journal: &str,
    partition: &str,
    state: &str,
    archive: Option<&Path>,
) -> Result<(), tokio_postgres::Error> {
    let archive = archive.map(|p| p.display().to_string());
    client
        .execute(
            &format!("UPDATE {journal} SET state = $2, archive_path = COALESCE($3, archive_path), updated_at = now() WHERE partition = $1"),
            &[&partition, &state, &archive],
        )
        .await?;
    Ok(())
}

/// Copies a detached partition to `<dir>/<name>.csv.gz` and writes a
/// manifest beside it; both are fsynced before returning.
async fn archive(
    client: &Client,
    table: &ManagedTable,
    partition: &str,
    lo: i64,
    hi: i64,
    dir: &Path,
) -> Result<(PathBuf, u64), MaintenanceError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MaintenanceError::Archive { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = archive_file_stem(partition);
    let file = dir.join(format!("{name}.csv.gz"));
    let partial = dir.join(format!("{name}.csv.gz.partial"));
    let mut encoder = GzEncoder::new(
        std::fs::File::create(&partial).map_err(io(&partial))?,
        Compression::default(),
    );
    let mut hasher = Sha256::new();
    // The partition is detached: nothing writes to it any more.
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {partition}"), &[])
        .await?
        .get(0);
    let rows = rows as u64;
    let stream = client
        .copy_out(&format!(
            "COPY {partition} TO STDOUT (FORMAT csv, HEADER true)"
        ))
        .await?;
    futures::pin_mut!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        encoder.write_all(&chunk).map_err(io(&partial))?;
    }
    let gz = encoder.finish().map_err(io(&partial))?;
    gz.sync_all().map_err(io(&partial))?;
    drop(gz);
    std::fs::rename(&partial, &file).map_err(io(&file))?;
    let manifest = serde_json::json!({
        "table": table.qualified(),
        "partition": partition,
        "lower_bound": format_micros(lo),
        "upper_bound": format_micros(hi),
        "rows": rows,
        "format": "csv with header, gzip",
        "sha256_of_csv": hex::encode(hasher.finalize()),
        "file": file.file_name().map(|n| n.to_string_lossy().to_string()),
        "archived_at": Utc::now().to_rfc3339(),
        "weir_version": env!("CARGO_PKG_VERSION"),
        "restore": format!("gunzip -c {name}.csv.gz | psql -c \"COPY {} FROM STDIN (FORMAT csv, HEADER true)\"", quote_ident(&name)),
    });
    let manifest_path = dir.join(format!("{name}.manifest.json"));
    let mut out = std::fs::File::create(&manifest_path).map_err(io(&manifest_path))?;
    out.write_all(
        serde_json::to_string_pretty(&manifest)
            .unwrap_or_default()
            .as_bytes(),
    )
    .map_err(io(&manifest_path))?;
    out.sync_all().map_err(io(&manifest_path))?;
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
    Ok((file, rows))
}

fn format_micros(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .map(|at| at.to_rfc3339())
        .unwrap_or_else(|| micros.to_string())
}

/// The retention of each managed table (data tables by index, then the
/// dead-letter table).
pub fn retention_for(config: &Config, mappings: &Mappings) -> Vec<Option<Retention>> {
    let mut out: Vec<Option<Retention>> = mappings
        .tables
        .iter()
        .map(|t| {
            t.config.retention_days.map(|days| Retention {
                days,
                archive_dir: t.config.archive_dir.as_ref().map(PathBuf::from),
            })
        })
        .collect();
    out.push(Some(Retention {
        days: config.dead_letters.retention_days,
        archive_dir: None,
    }));
    out
}

/// Runs premake and retention every `maintenance.interval_ms` until aborted.
pub async fn run_loop(
    config: Arc<Config>,
    url: String,
    tables: Vec<Arc<ManagedTable>>,
    mappings: Arc<Mappings>,
    dead_letters: Arc<ManagedTable>,
) {
    let interval = Duration::from_millis(config.maintenance.interval_ms);
    loop {
        tokio::time::sleep(interval).await;
        let mut client =
            match crate::store::db::connect(&url, &config.postgres, "maintenance").await {
                Ok(client) => client,
                Err(err) => {
                    tracing::warn!(error = %err, "maintenance cannot connect; will retry");
                    continue;
                }
            };
        if let Err(err) = run_once(
            &mut client,
            &config,
            &tables,
            &mappings,
            &dead_letters,
            false,
        )
        .await
        {
            tracing::warn!(error = %err, "maintenance failed; will retry");
        }
    }
}

/// One round of premake and retention over every managed table.
pub async fn run_once(
    client: &mut Client,
    config: &Config,
    tables: &[Arc<ManagedTable>],
    mappings: &Mappings,
    dead_letters: &Arc<ManagedTable>,
    dry_run: bool,
) -> Result<Vec<Action>, MaintenanceError> {
    let lock_timeout = Duration::from_millis(config.postgres.ddl_lock_timeout_ms);
    let retention = retention_for(config, mappings);
    let mut actions = Vec::new();
    let all: Vec<(&Arc<ManagedTable>, u32)> = tables
        .iter()
        .zip(&mappings.tables)
        .map(|(t, m)| (t, m.config.premake))
        .chain(std::iter::once((dead_letters, 1)))
        .collect();
    for (index, (table, ahead)) in all.into_iter().enumerate() {
        table.refresh(client).await?;
        actions.extend(premake(client, table, ahead, lock_timeout, dry_run).await?);
        if let Some(retention) = &retention[index] {
            actions.extend(prune(client, config, table, retention, lock_timeout, dry_run).await?);
        }
    }
    for action in &actions {
        tracing::info!(action = %action, dry_run, "partition maintenance");
    }
    Ok(actions)
}

/// A partition as `weir partitions list` shows it.
#[derive(Debug, Clone)]
pub struct PartitionInfo {
    pub leaf: Leaf,
    pub default: bool,
    /// Estimated rows (exact for small, never-analyzed partitions); `None`
    /// when unknown.
    pub rows: Option<i64>,
    pub size: String,
    pub status: &'static str,
}

/// Describes the partitions of `table`, oldest first.
pub async fn list(
    client: &Client,
    table: &ManagedTable,
    retention_days: Option<u32>,
) -> Result<Vec<PartitionInfo>, MaintenanceError> {
    let set = table.refresh(client).await?;
    let now = now_micros();
    let expired: Vec<Leaf> = retention_days
        .map(|days| expired(&set.leaves, days, now))
        .unwrap_or_default();
    let mut out = Vec::new();
    let leaves = set
        .leaves
        .iter()
        .map(|l| (l, false))
        .chain(set.default.iter().map(|d| (d, true)));
    for (leaf, default) in leaves {
        let row = client
            .query_one(
                "SELECT c.reltuples::int8, c.relpages::int8, pg_size_pretty(pg_total_relation_size(c.oid))
                   FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&leaf.qualified()],
            )
            .await?;
        let estimate: i64 = row.get(0);
        let pages: i64 = row.get(1);
        let rows = if estimate >= 0 {
            Some(estimate)
        } else if pages <= 10_000 {
            // Never analyzed, and small enough to count.
            let counted: i64 = client
                .query_one(&format!("SELECT count(*) FROM {}", leaf.qualified()), &[])
                .await?
                .get(0);
            Some(counted)
        } else {
            None
        };
        let status = if default {
            "default"
        } else if expired.iter().any(|e| e == leaf) {
            "expired: prune drops it"
        } else if leaf.lo <= now && now < leaf.hi {
            "current"
        } else if leaf.lo > now {
            "ahead"
        } else {
            "kept"
        };
        out.push(PartitionInfo {
            leaf: leaf.clone(),
            default,
            rows,
            size: row.get(2),
            status,
        });
    }
    Ok(out)
}

/// A bound for display: `2025-11-01 00:00`, or MINVALUE / MAXVALUE.
pub fn display_bound(micros: i64) -> String {
    match micros {
        i64::MIN => "MINVALUE".into(),
        i64::MAX => "MAXVALUE".into(),
        _ => DateTime::<Utc>::from_timestamp_micros(micros)
            .map(|at| at.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_else(|| micros.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_stay_in_their_directory() {
        assert_eq!(
            archive_file_stem(&qualify("public", "webhook_logs_p20260101")),
            "webhook_logs_p20260101"
        );
        assert_eq!(
            archive_file_stem(&qualify("a.b \"s\"", "we\"ird/../../etc_p20260101")),
            "we\"ird_.._.._etc_p20260101"
        );
    }

    fn leaf(lo: i64, hi: i64) -> Leaf {
        Leaf {
            lo,
            hi,
            schema: "s".into(),
            name: format!("p{lo}"),
        }
    }

    #[test]
    fn only_partitions_wholly_older_than_the_window_expire() {
        let day = 86_400_000_000;
        let now = 100 * day + day / 2; // noon of day 100
        let leaves = vec![
            leaf(60 * day, 69 * day),
            leaf(69 * day, 70 * day),
            leaf(70 * day, 71 * day),
            leaf(99 * day, 100 * day),
        ];
        // Window: 30 days back from now is day 70 at noon.
        let gone: Vec<i64> = expired(&leaves, 30, now).iter().map(|l| l.lo).collect();
        assert_eq!(
            gone,
            vec![60 * day, 69 * day],
            "day 70 overlaps the window and stays"
        );
    }
}
