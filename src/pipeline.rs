//! `weir run`: wires the consumer thread, the writers and the HTTP endpoint
//! together, and shuts them down in order.
//!
//! Start-up checks everything it can before taking traffic: the config, the
//! database connection, every table mapping against the catalog, weir's own
//! tables, the partitions needed now and next. A problem found here is one
//! clear error and a non-zero exit.
//!
//! Shutdown (SIGINT/SIGTERM): the consumer stops taking messages and closes
//! the writers' queues; batchers cut what they hold; writers commit what
//! they can within `shutdown_grace_ms`; whatever is not committed by then is
//! rolled back (a transaction is all or nothing) and will be read again by
//! the partition's next owner.
//!
//! Writer tasks are supervised: a batcher or writer that ends before
//! shutdown (a panic, say) would leave its lanes dead while the consumer
//! went on reading, so instead the whole process stops, loudly and with a
//! non-zero exit. Nothing is lost: what the dead task held was never
//! committed, and the partitions' next owner (this pod, restarted) reads it
//! again from the stored offsets.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backoff::backoff::Backoff;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_postgres::Client;

use crate::batch::Batcher;
use crate::config::{Config, ConfigError, Granularity};
use crate::copy::PgType;
use crate::decode::Decoder;
use crate::decode::mapping::{self, Mappings};
use crate::health::Health;
use crate::lane::InFlight;
use crate::maintenance;
use crate::source::{self, ConsumerParts};
use crate::store::catalog::{self, CatalogError};
use crate::store::db::{self, ConnectError};
use crate::store::deadletter::DeadLetterTable;
use crate::store::partition::{self, ManagedTable, PartitionError, load_partitions};
use crate::write::{Shared, Writer};

/// Why weir could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    #[error("{0}")]
    Connect(ConnectError),
    #[error("catalog: {0}")]
    Catalog(CatalogError),
    #[error("postgres: {}", db::describe(.0))]
    Db(tokio_postgres::Error),
    #[error("partitions: {0}")]
    Partition(PartitionError),
    #[error("kafka: {0}")]
    Kafka(rdkafka::error::KafkaError),
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// A PostgreSQL failure that trying again may cure: the session was
    /// lost, the server is shutting down or not accepting connections yet.
    pub fn is_transient(&self) -> bool {
        let db_error = match self {
            StartError::Connect(ConnectError::Db(err))
            | StartError::Catalog(CatalogError::Db(err))
            | StartError::Db(err)
            | StartError::Partition(PartitionError::Db(err)) => err,
            _ => return false,
        };
        db::classify(db_error) == db::ErrorClass::Transient
    }
}

// Conversions without `#[source]`: each message already says everything,
// and a source would print it a second time in error chains.
macro_rules! start_error_from {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for StartError {
            fn from(err: $ty) -> Self {
                StartError::$variant(err)
            }
        }
    )*};
}
start_error_from!(
    Config(ConfigError),
    Connect(ConnectError),
    Catalog(CatalogError),
    Db(tokio_postgres::Error),
    Partition(PartitionError),
    Kafka(rdkafka::error::KafkaError)
);

/// What start-up learns from the database.
pub struct Prepared {
    pub mappings: Arc<Mappings>,
    /// Partition managers of the mapped tables, by table index.
    pub tables: Vec<Arc<ManagedTable>>,
    pub dead_letters: Arc<DeadLetterTable>,
    pub dead_letter_partitions: Arc<ManagedTable>,
}

impl Prepared {
    /// The decoder of these tables under `config`.
    pub fn decoder(&self, config: &Config) -> Decoder {
        Decoder {
            mappings: self.mappings.clone(),
            tables: self.tables.clone(),
            max_event_bytes: config.pipeline.max_event_bytes,
            oversize_bytes: config.dead_letters.max_payload_bytes,
            empty_events: config.pipeline.empty_events,
        }
    }
}

/// Connects, makes sure weir's own tables exist, reads the catalog and
/// compiles every mapping against it.
pub async fn prepare(config: &Config, client: &mut Client) -> Result<Prepared, StartError> {
    crate::store::schema::ensure_internal(client, config).await?;
    let mut infos = Vec::new();
    for table in &config.tables {
        infos.push(catalog::load_table(client, &table.name, &config.postgres.schema).await?);
    }
    let mappings = mapping::compile(&config.tables, infos)?;
    let mut tables = Vec::new();
    for table in &mappings.tables {
        let key_type = table
            .info
            .column(&table.config.time_column)
            .and_then(|c| c.ty.clone().ok())
            .unwrap_or(PgType::Timestamptz);
        for key in table.config.storage_parameters.keys() {
            if !partition::valid_parameter_name(key) {
                return Err(ConfigError::new(
                    format!("tables[{}].storage_parameters.{key}", table.index),
                    "not a storage parameter name",
                )
                .into());
            }
        }
        let partitions = load_partitions(client, table.info.oid).await?;
        tables.push(Arc::new(ManagedTable::new(
            table.info.oid,
            table.info.schema.clone(),
            table.info.name.clone(),
            table.granularity,
            key_type,
            &table.config.storage_parameters,
            partitions,
        )));
    }
    let dead_letters = Arc::new(DeadLetterTable::new(config));
    let dead_info =
        catalog::load_table(client, &config.dead_letters.table, &config.postgres.schema).await?;
    let dead_partitions = load_partitions(client, dead_info.oid).await?;
    let dead_letter_partitions = Arc::new(ManagedTable::new(
        dead_info.oid,
        dead_info.schema,
        dead_info.name,
        Granularity::Day,
        PgType::Timestamptz,
        &Default::default(),
        dead_partitions,
    ));
    Ok(Prepared {
        mappings: Arc::new(mappings),
        tables,
        dead_letters,
        dead_letter_partitions,
    })
}

/// How long starting keeps retrying a lost PostgreSQL session.
const START_RETRY_FOR: Duration = Duration::from_secs(60);

/// What starting needs from PostgreSQL: the tables read from the catalog,
/// their next partitions made. Its session is closed when done.
async fn start_up(config: &Config, url: &str) -> Result<Prepared, StartError> {
    let mut control = db::connect(url, &config.postgres, "control").await?;
    let prepared = prepare(config, &mut control).await?;
    let lock_timeout = Duration::from_millis(config.postgres.ddl_lock_timeout_ms);
    for (table, mapping) in prepared.tables.iter().zip(&prepared.mappings.tables) {
        if let Some(default) = &table.snapshot().default {
            tracing::warn!(
                table = %table.qualified(), default = %default.qualified(),
                "table has a DEFAULT partition: weir will not create partitions for it (that would lock \
                 the default partition and fail once it holds rows of the new range); rows with no \
                 partition of their own are written to the DEFAULT partition"
            );
        }
        let created = maintenance::premake(
            &mut control,
            table,
            mapping.config.premake,
            lock_timeout,
            false,
        )
        .await?;
        for action in created {
            tracing::info!(table = %table.qualified(), %action, "partition premade");
        }
    }
    maintenance::premake(
        &mut control,
        &prepared.dead_letter_partitions,
        1,
        lock_timeout,
        false,
    )
    .await?;
    Ok(prepared)
}

/// Runs the pipeline until `shutdown` resolves.
pub async fn run(
    config: Arc<Config>,
    shutdown: impl Future<Output = ()>,
    metrics: Option<PrometheusHandle>,
) -> Result<(), StartError> {
    let url = config.require_database_url()?.to_string();
    tokio::pin!(shutdown);
    // A session lost while starting (PostgreSQL restarting or failing
    // over, a session terminated) is retried, as it would be later; what
    // is wrong (config, schema, privileges) stops weir at once.
    let mut backoff = config.pipeline.retry_backoff(Some(START_RETRY_FOR));
    let prepared = loop {
        let error = match start_up(&config, &url).await {
            Ok(prepared) => break prepared,
            Err(error) => error,
        };
        let wait = match backoff.next_backoff() {
            Some(wait) if error.is_transient() => wait,
            _ => return Err(error),
        };
        tracing::warn!(%error, ?wait, "PostgreSQL failed while weir was starting: retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    };

    let writers = config.postgres.writers;
    let health = Arc::new(Health::new(writers));
    let in_flight = Arc::new(InFlight::default());
    let decoder = Arc::new(prepared.decoder(&config));
    let (request_tx, request_rx) = std::sync::mpsc::channel();
    let (died_tx, mut died_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut lane_senders = Vec::with_capacity(writers);
    let mut writers_done = Vec::with_capacity(writers);
    let shared = Arc::new(Shared {
        config: config.clone(),
        database_url: url.clone(),
        decoder: decoder.clone(),
        dead_letters: prepared.dead_letters.clone(),
        dead_letter_partitions: prepared.dead_letter_partitions.clone(),
        requests: request_tx,
        in_flight: in_flight.clone(),
        health: health.clone(),
    });
    let mut batchers = Vec::with_capacity(writers);
    for index in 0..writers {
        let (lane_tx, lane_rx) = tokio::sync::mpsc::channel(config.pipeline.queue_messages);
        // One flush waits while one is written: decode overlaps COPY, and
        // memory stays at two flushes per writer (within the in-flight
        // budget either way).
        let (batch_tx, batch_rx) = tokio::sync::mpsc::channel(1);
        lane_senders.push(lane_tx);
        // Recycled COPY buffers: at most one batch's worth per writer. A
        // pool of the writer's share of the in-flight budget was tried:
        // peak RSS rose by 15 to 20 MiB, for no CPU per row the drains
        // could tell apart.
        let pool = crate::copy::pool::BufferPool::new(config.pipeline.batch_max_bytes);
        batchers.push(tokio::spawn(supervised(
            format!("writer {index} batcher"),
            died_tx.clone(),
            Batcher {
                decoder: decoder.clone(),
                input: lane_rx,
                output: batch_tx,
                in_flight: in_flight.clone(),
                max_rows: config.pipeline.batch_max_rows,
                max_bytes: config.pipeline.batch_max_bytes,
                linger: Duration::from_millis(config.pipeline.batch_linger_ms),
                pool: pool.clone(),
            }
            .run(),
        )));
        writers_done.push(tokio::spawn(supervised(
            format!("writer {index}"),
            died_tx.clone(),
            Writer::new(index, shared.clone(), pool).run(batch_rx),
        )));
    }
    // The request channel closes once every writer is done with `shared`.
    drop(shared);
    drop(died_tx);

    let http = match metrics {
        Some(handle) => {
            // The exporter keeps histogram samples until upkeep folds them
            // into buckets; without a scrape they would pile up. At full
            // speed that is about 200,000 samples a second (two per row),
            // in freshly allocated blocks: folded every second, at most
            // a second's worth is held.
            let upkeep = handle.clone();
            let readiness = health.clone();
            // Charged and released once per message: the gauge is a
            // sample taken here, with the readiness gauge, not a write
            // at every charge.
            let in_flight = in_flight.clone();
            let upkeep = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    upkeep.run_upkeep();
                    metrics::gauge!(crate::metrics::READY).set(if readiness.readiness().ok {
                        1.0
                    } else {
                        0.0
                    });
                    metrics::gauge!(crate::metrics::IN_FLIGHT_BYTES).set(in_flight.get() as f64);
                }
            });
            Some((
                crate::http::serve(config.http.listen, handle, health.clone())
                    .await
                    .map_err(StartError::Other)?,
                upkeep,
            ))
        }
        None => None,
    };

    let maintenance = config.maintenance.enabled.then(|| {
        tokio::spawn(crate::maintenance::run_loop(
            config.clone(),
            url.clone(),
            prepared.tables.clone(),
            prepared.mappings.clone(),
            prepared.dead_letter_partitions.clone(),
        ))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let (consumer_done_tx, consumer_done_rx) = tokio::sync::oneshot::channel();
    let parts = ConsumerParts {
        config: config.clone(),
        database_url: url,
        writers: lane_senders,
        requests: request_rx,
        in_flight,
        health: health.clone(),
        shutdown: stop.clone(),
        runtime: tokio::runtime::Handle::current(),
        topics: prepared.mappings.topics(),
    };
    std::thread::Builder::new()
        .name("weir-consumer".into())
        .spawn(move || {
            let result = source::run(parts);
            let _ = consumer_done_tx.send(result);
        })
        .map_err(|err| StartError::Other(format!("cannot start the consumer thread: {err}")))?;

    tokio::pin!(consumer_done_rx);
    let mut died = None;
    let early = tokio::select! {
        _ = &mut shutdown => None,
        result = &mut consumer_done_rx => Some(result),
        Some(why) = died_rx.recv() => {
            tracing::error!(
                task = %why,
                "a writer task died: stopping weir so that its partitions are read again \
                 (nothing it held was committed)"
            );
            died = Some(why);
            None
        }
    };
    tracing::info!("shutting down");
    health.shutting_down();
    stop.store(true, Ordering::Relaxed);
    if let Some(task) = maintenance {
        task.abort();
    }
    let grace = Duration::from_millis(config.pipeline.shutdown_grace_ms);
    let drained = tokio::time::timeout(grace, async {
        for batcher in batchers {
            let _ = batcher.await;
        }
        for writer in writers_done.iter_mut() {
            let _ = writer.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "shutdown grace period over: abandoning uncommitted batches (rolled back, read again by the next owner)"
        );
        for writer in &writers_done {
            writer.abort();
        }
    }
    let consumer_result = match early {
        Some(result) => result,
        None => consumer_done_rx.await,
    };
    if let Some((http, upkeep)) = http {
        http.abort();
        upkeep.abort();
    }
    if let Some(why) = died {
        return Err(StartError::Other(format!("a writer task died: {why}")));
    }
    match consumer_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(StartError::Kafka(err)),
        Err(_) => Err(StartError::Other("the consumer thread died".into())),
    }
}

/// Runs a writer task; when it ends, for whatever reason, says so on
/// `died` (the pipeline listens only until shutdown starts, so only an end
/// before shutdown counts as a death). A panic is caught here and reported
/// with its message.
async fn supervised<F>(name: String, died: tokio::sync::mpsc::UnboundedSender<String>, task: F)
where
    F: Future<Output = ()>,
{
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(task).catch_unwind().await;
    let why = match outcome {
        Ok(()) => format!("{name} ended"),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            format!("{name} panicked: {message}")
        }
    };
    let _ = died.send(why);
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).expect("installing a SIGTERM handler should work");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_writer_task_that_panics_is_reported_with_its_message() {
        let (died, mut deaths) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(supervised("writer 3".into(), died, async {
            panic!("boom");
        }));
        task.await.expect("the supervisor catches the panic");
        assert_eq!(
            deaths.recv().await.as_deref(),
            Some("writer 3 panicked: boom")
        );
    }

    #[tokio::test]
    async fn a_writer_task_that_returns_is_reported_too() {
        let (died, mut deaths) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(supervised("writer 0 batcher".into(), died, async {}))
            .await
            .expect("task");
        assert_eq!(
            deaths.recv().await.as_deref(),
            Some("writer 0 batcher ended")
        );
    }
}
