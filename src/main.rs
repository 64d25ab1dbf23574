//! The `weir` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};

use weir::config::{self, Config, LogFormat};

// Decoding allocates many small, short-lived objects (JSON trees); mimalloc
// serves them markedly cheaper than the system allocator (asked as
// `weir::alloc` explains).
#[global_allocator]
static ALLOCATOR: weir::alloc::Mimalloc = weir::alloc::Mimalloc;

/// mimalloc's `mi_option_purge_delay` (its index in `mi_option_e`, which
/// libmimalloc-sys does not name; a test checks it against the option's
/// default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc's `mi_option_allow_thp`, numbered as [`MI_OPTION_PURGE_DELAY`]
/// is (the test checks it too).
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// No transparent huge pages for weir's memory. weir frees a batch's
/// memory soon after it is written (see [`return_freed_memory_soon`]),
/// and a later batch faults it in again: as 2 MiB huge pages, each zeroed
/// whole (and compacted for, where the kernel's THP `defrag` is `madvise`)
/// however little of it is used. With 4 KiB pages, alternated drains of the
/// bench took 11% less CPU per row and peaked 20 MiB lower
/// (loadtest/RESULTS.md). This is what `MIMALLOC_ALLOW_THP=0` does; an
/// operator's `MIMALLOC_ALLOW_THP` wins.
fn no_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's options, an atomic store that is valid
    // at any time, from any thread. mimalloc no longer asks for huge pages
    // for the memory it maps from now on.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0) };
    // What mimalloc mapped before `main` (and glibc's heaps, librdkafka's)
    // are covered by the process's flag, which the kernel checks at every
    // fault. A kernel without it leaves THP as it was: only slower.
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and
    // touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

/// How long mimalloc keeps freed pages before it gives them back to the
/// OS, in milliseconds.
///
/// - Its default, a second, kept about a second of batches resident under
///   a backlog: peak RSS of a full-speed drain 162-187 MiB.
/// - Purging at once (0, weir's setting until 2026-11-24) made every batch
///   fault its memory in afresh, each page zeroed by the kernel: a quarter
///   of weir's CPU was in the kernel, 0.26 page faults per row (COPY
///   chunks, vectors, librdkafka's decompression buffers).
/// - A tenth of a second spans about one flush at full speed, so the next
///   batches reuse the last one's pages: 0.17-0.20 faults per row, 40%
///   less kernel time per row, and peak RSS 113-136 MiB against 104-118
///   purging at once (loadtest/RESULTS.md).
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Freed memory goes back to the OS after [`PURGE_DELAY_MS`], not after
/// mimalloc's default second. An operator's `MIMALLOC_PURGE_DELAY` wins.
fn return_freed_memory_soon() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, an atomic store that is
        // valid at any time, from any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// weir: Kafka events into time-partitioned PostgreSQL tables, exactly once.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, env = config::CONFIG_PATH_ENV, default_value = "config/weir.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume and write until SIGINT or SIGTERM.
    Run,
    /// Create the bundled schema and weir's own tables (idempotent).
    Migrate {
        /// Only weir's own tables (offsets, dead letters): for users who
        /// manage their data tables themselves.
        #[arg(long)]
        internal_only: bool,
    },
    /// Validate the config, connect to PostgreSQL and Kafka, and check every
    /// table mapping against the catalog. Exits non-zero naming what is wrong.
    Check,
    /// Inspect and maintain time partitions.
    Partitions {
        #[command(subcommand)]
        command: PartitionsCommand,
    },
    /// Inspect, replay and purge dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

/// Which dead letters a `dlq` command applies to.
#[derive(Debug, clap::Args)]
struct DlqFilter {
    /// Target table.
    #[arg(long)]
    table: Option<String>,
    /// Stage that refused it: decode, validate, route or write.
    #[arg(long)]
    stage: Option<String>,
    /// Reason code (missing_required, event_time_out_of_window, 23505, ...).
    #[arg(long)]
    code: Option<String>,
    /// Source topic.
    #[arg(long)]
    topic: Option<String>,
    /// Failed at or after: RFC 3339, a date, or a duration back from now (2h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Failed before: same forms as --since.
    #[arg(long)]
    until: Option<String>,
    /// These ids only.
    #[arg(long = "id")]
    ids: Vec<i64>,
}

impl DlqFilter {
    fn build(&self) -> anyhow::Result<weir::dlq::Filter> {
        if let Some(stage) = &self.stage
            && weir::event::Stage::parse(stage).is_none()
        {
            bail!("--stage must be decode, validate, route or write (got `{stage}`)");
        }
        let time = |t: &Option<String>, flag: &str| -> anyhow::Result<_> {
            t.as_deref()
                .map(weir::dlq::parse_time)
                .transpose()
                .map_err(|err| anyhow!("{flag}: {err}"))
        };
        Ok(weir::dlq::Filter {
            ids: self.ids.clone(),
            table: self.table.clone(),
            stage: self.stage.clone(),
            code: self.code.clone(),
            topic: self.topic.clone(),
            since: time(&self.since, "--since")?,
            until: time(&self.until, "--until")?,
            include_replayed: false,
        })
    }
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Dead letters, newest first.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Include those already replayed.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One dead letter in full, with its payload decompressed.
    Show {
        id: i64,
        /// Largest payload shown (decompression stops there).
        #[arg(long, default_value_t = 16 << 20)]
        max_bytes: usize,
    },
    /// Decode and write again with the current config and schema; mark what
    /// succeeds as replayed, in one transaction. Exit 3 if some fail again.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
        /// Report what would happen, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters (replayed or not) matching the filters.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Only those older than this (90s, 15m, 2h, 7d).
        #[arg(long)]
        older_than: Option<String>,
        /// Purge everything when no filter is given.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PartitionsCommand {
    /// Each table's partitions: bounds, rows (estimate), size, retention status.
    List {
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
    },
    /// Create the current partition and `premake` ahead.
    Ensure {
        #[arg(long)]
        table: Option<String>,
        /// Say what would be created, create nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Detach, archive (if configured) and drop partitions wholly older than
    /// the table's retention.
    Prune {
        #[arg(long)]
        table: Option<String>,
        /// Say what would be dropped, drop nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    return_freed_memory_soon();
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, &config::process_env()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("weir: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    // `run` logs at the configured level; one-shot commands only warn.
    let level = match cli.command {
        Command::Run => config.log.level.clone(),
        _ => "warn".to_string(),
    };
    init_logging(&config, &level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("weir: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(config).await,
            Command::Migrate { internal_only } => migrate(config, internal_only).await,
            Command::Check => check(config).await,
            Command::Partitions { command } => partitions(config, command).await,
            Command::Dlq { command } => dlq(config, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.downcast_ref::<PartialFailure>().is_some() => {
            eprintln!("weir: {err:#}");
            ExitCode::from(3)
        }
        Err(err) => {
            eprintln!("weir: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let handle =
        weir::metrics::install().map_err(|err| anyhow!("cannot install metrics: {err}"))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        tables = config.tables.len(),
        "weir starting"
    );
    weir::pipeline::run(
        Arc::new(config),
        weir::pipeline::shutdown_signal(),
        Some(handle),
    )
    .await?;
    tracing::info!("weir stopped");
    Ok(())
}

async fn migrate(config: Config, internal_only: bool) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let mut client = weir::store::db::connect(url, &config.postgres, "migrate").await?;
    let applied = weir::store::schema::migrate(&mut client, &config, internal_only)
        .await
        .map_err(|err| anyhow!("migration failed: {}", weir::store::db::describe(&err)))?;
    for step in applied {
        println!("applied {step}");
    }
    Ok(())
}

async fn check(config: Config) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let mut client = weir::store::db::connect(url, &config.postgres, "check").await?;
    println!("postgres: connected");
    let prepared = weir::pipeline::prepare(&config, &mut client).await?;
    for (table, managed) in prepared.mappings.tables.iter().zip(&prepared.tables) {
        let sources = prepared
            .mappings
            .sources
            .iter()
            .filter(|s| s.table == table.index)
            .count();
        println!(
            "table {}: partitioned by {} on {}, {} partitions, {} source(s): ok",
            managed.qualified(),
            format!("{:?}", table.granularity).to_lowercase(),
            table.config.time_column,
            managed.snapshot().leaves.len(),
            sources
        );
        if let Some(default) = &managed.snapshot().default {
            println!(
                "  note: {} is a DEFAULT partition: weir writes rows without a partition of their own there \
                 and creates no partitions for this table",
                default.qualified()
            );
        }
    }

    let consumer: BaseConsumer = weir::source::client_config(&config)
        .create()
        .context("kafka client configuration")?;
    let metadata =
        tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, Duration::from_secs(10)))
            .await?
            .context("cannot reach the Kafka brokers (kafka.brokers)")?;
    println!("kafka: connected to {} broker(s)", metadata.brokers().len());
    let mut missing = Vec::new();
    for topic in prepared.mappings.topics() {
        match metadata.topics().iter().find(|t| t.name() == topic) {
            Some(found) if found.error().is_none() => {
                println!("topic {topic}: {} partition(s)", found.partitions().len());
            }
            _ => missing.push(topic),
        }
    }
    if !missing.is_empty() {
        bail!("topic(s) not found in Kafka: {}", missing.join(", "));
    }
    println!("check: ok");
    Ok(())
}

async fn partitions(config: Config, command: PartitionsCommand) -> anyhow::Result<()> {
    use weir::maintenance;
    let url = config.require_database_url()?;
    let mut client = weir::store::db::connect(url, &config.postgres, "partitions").await?;
    let prepared = weir::pipeline::prepare(&config, &mut client).await?;
    let wanted = match &command {
        PartitionsCommand::List { table }
        | PartitionsCommand::Ensure { table, .. }
        | PartitionsCommand::Prune { table, .. } => table.clone(),
    };
    if let Some(name) = &wanted
        && !config.tables.iter().any(|t| &t.name == name)
        && *name != config.dead_letters.table
    {
        bail!("no table `{name}` in the configuration");
    }
    let retention = maintenance::retention_for(&config, &prepared.mappings);
    let mut managed: Vec<(Arc<weir::store::partition::ManagedTable>, String, u32)> = prepared
        .tables
        .iter()
        .zip(&prepared.mappings.tables)
        .map(|(t, m)| (t.clone(), m.config.name.clone(), m.config.premake))
        .collect();
    managed.push((
        prepared.dead_letter_partitions.clone(),
        config.dead_letters.table.clone(),
        1,
    ));
    let lock_timeout = Duration::from_millis(config.postgres.ddl_lock_timeout_ms);
    let mut total = 0;
    for (index, (table, name, premake)) in managed.iter().enumerate() {
        if wanted.as_ref().is_some_and(|w| w != name) {
            continue;
        }
        let retention = &retention[index];
        match &command {
            PartitionsCommand::List { .. } => {
                let infos =
                    maintenance::list(&client, table, retention.as_ref().map(|r| r.days)).await?;
                println!(
                    "{} ({}, retention: {}, premake: {premake})",
                    table.qualified(),
                    format!("{:?}", table.granularity).to_lowercase(),
                    retention
                        .as_ref()
                        .map(|r| format!("{} days", r.days))
                        .unwrap_or_else(|| "none".into()),
                );
                println!(
                    "  {:<36} {:<17} {:<17} {:>10} {:>10}  STATUS",
                    "PARTITION", "FROM", "TO", "ROWS", "SIZE"
                );
                for info in infos {
                    println!(
                        "  {:<36} {:<17} {:<17} {:>10} {:>10}  {}",
                        info.leaf.name,
                        maintenance::display_bound(info.leaf.lo),
                        maintenance::display_bound(info.leaf.hi),
                        info.rows
                            .map(|r| r.to_string())
                            .unwrap_or_else(|| "?".into()),
                        info.size,
                        info.status
                    );
                }
            }
            PartitionsCommand::Ensure { dry_run, .. } => {
                for action in
                    maintenance::premake(&mut client, table, *premake, lock_timeout, *dry_run)
                        .await?
                {
                    println!("{}{action}", if *dry_run { "would have " } else { "" });
                    total += 1;
                }
            }
            PartitionsCommand::Prune { dry_run, .. } => {
                let Some(retention) = retention else { continue };
                for action in maintenance::prune(
                    &mut client,
                    &config,
                    table,
                    retention,
                    lock_timeout,
                    *dry_run,
                )
                .await?
                {
                    println!("{}{action}", if *dry_run { "would have " } else { "" });
                    total += 1;
                }
            }
        }
    }
    if !matches!(command, PartitionsCommand::List { .. }) && total == 0 {
        println!("nothing to do");
    }
    Ok(())
}

/// Some of what was asked did not succeed (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PartialFailure(String);

async fn dlq(config: Config, command: DlqCommand) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let mut client = weir::store::db::connect(url, &config.postgres, "dlq").await?;
    let dead = weir::store::deadletter::DeadLetterTable::new(&config);
    match command {
        DlqCommand::List { filter, all, limit } => {
            let mut filter = filter.build()?;
            filter.include_replayed = all;
            let rows = weir::dlq::list(&client, &dead, &filter, limit)
                .await
                .map_err(|e| anyhow!(weir::store::db::describe(&e)))?;
            println!(
                "{:>8}  {:<20} {:<9} {:<26} {:<13} {:<40} {:>3} {:>8}  MESSAGE",
                "ID", "FAILED AT", "STAGE", "CODE", "TABLE", "SOURCE", "TRY", "BYTES"
            );
            for row in &rows {
                let message: String = row.message.chars().take(80).collect();
                println!(
                    "{:>8}  {:<20} {:<9} {:<26} {:<13} {:<40} {:>3} {:>8}  {}{}",
                    row.id,
                    row.failed_at.format("%Y-%m-%d %H:%M:%S"),
                    row.stage,
                    row.code,
                    row.table.as_deref().unwrap_or("-"),
                    row.source,
                    row.attempts,
                    row.size,
                    if row.replayed { "[replayed] " } else { "" },
                    message
                );
            }
            println!("{} dead letter(s)", rows.len());
        }
        DlqCommand::Show { id, max_bytes } => match weir::dlq::show(&client, &dead, id, max_bytes)
            .await
            .map_err(|e| anyhow!(e))?
        {
            Some(text) => print!("{text}"),
            None => bail!("no dead letter with id {id}"),
        },
        DlqCommand::Replay {
            filter,
            limit,
            dry_run,
        } => {
            let filter = filter.build()?;
            let prepared = weir::pipeline::prepare(&config, &mut client).await?;
            let mut ddl = weir::store::db::connect(url, &config.postgres, "dlq-ddl").await?;
            let report = weir::dlq::replay(
                &mut client,
                &mut ddl,
                &config,
                &prepared,
                &filter,
                limit,
                dry_run,
            )
            .await
            .map_err(|e| anyhow!(e))?;
            println!(
                "{}selected {}, replayed {} ({} rows written, {} already there and skipped by the dedupe key), failed again {}, skipped {} (truncated payloads)",
                if dry_run {
                    "dry run (nothing changed): "
                } else {
                    ""
                },
                report.selected,
                report.replayed,
                report.rows_written,
                report.duplicates_skipped,
                report.failed_again,
                report.skipped
            );
            if report.failed_again + report.skipped > 0 {
                return Err(PartialFailure(format!(
                    "{} dead letter(s) could not be replayed; see `weir dlq list`",
                    report.failed_again + report.skipped
                ))
                .into());
            }
        }
        DlqCommand::Purge {
            filter,
            older_than,
            all,
            dry_run,
        } => {
            let filter = filter.build()?;
            if filter.is_empty() && older_than.is_none() && !all {
                bail!("refusing to purge every dead letter: give a filter, --older-than, or --all");
            }
            let older_than = older_than
                .as_deref()
                .map(weir::dlq::parse_duration)
                .transpose()
                .map_err(|e| anyhow!("--older-than: {e}"))?;
            let deleted = weir::dlq::purge(&mut client, &dead, &filter, older_than, dry_run)
                .await
                .map_err(|e| anyhow!(weir::store::db::describe(&e)))?;
            println!(
                "{}{deleted} dead letter(s) purged",
                if dry_run { "dry run: would have " } else { "" }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads of mimalloc's options, valid at any time.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        // mimalloc's defaults (src/options.c): purge_delay 1000 ms, and
        // use_numa_nodes (the option after it) 0. A reordered enum fails
        // here.
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
        assert_eq!(get(MI_OPTION_PURGE_DELAY + 1), 0);
        return_freed_memory_soon();
        assert_eq!(get(MI_OPTION_PURGE_DELAY), PURGE_DELAY_MS);
    }

    #[test]
    fn transparent_huge_pages_are_turned_off_for_the_process() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return;
        }
        // SAFETY: reads of mimalloc's options, valid at any time.
        let get = |option| unsafe { libmimalloc_sys::mi_option_get(option) };
        // SAFETY: PR_GET_THP_DISABLE takes integer arguments only.
        let thp_disabled = || unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        // mimalloc's defaults (src/options.c): page_cross_thread_max_reclaim
        // 32, allow_thp 1, minimal_purge_size 0. A reordered enum fails here.
        assert_eq!(get(MI_OPTION_ALLOW_THP - 1), 32);
        assert_eq!(get(MI_OPTION_ALLOW_THP), 1);
        assert_eq!(get(MI_OPTION_ALLOW_THP + 1), 0);
        // Not asserted unset: the flag is inherited across fork and exec, so
        // a runner started under a process that set it starts with it set
        // (the last check then holds without proving the call).
        assert!(matches!(thp_disabled(), 0 | 1), "PR_GET_THP_DISABLE failed");
        no_transparent_huge_pages();
        assert_eq!(get(MI_OPTION_ALLOW_THP), 0);
        assert_eq!(thp_disabled(), 1);
    }
}
