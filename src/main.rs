//! The `weir` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};

use weir::config::{self, Config, LogFormat};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, &config::process_env()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("weir: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
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
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weir: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
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
    let mut client = weir::db::connect(url, &config.postgres, "migrate").await?;
    let applied = weir::schema::migrate(&mut client, &config, internal_only)
        .await
        .map_err(|err| anyhow!("migration failed: {}", weir::db::describe(&err)))?;
    for step in applied {
        println!("applied {step}");
    }
    Ok(())
}

async fn check(config: Config) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let mut client = weir::db::connect(url, &config.postgres, "check").await?;
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
            println!("  note: {default} is a DEFAULT partition");
        }
    }

    let consumer: BaseConsumer = weir::consumer::client_config(&config)
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
