//! Writers: each owns a set of lanes (Kafka partitions) and one PostgreSQL
//! session, and commits its lanes' batches one flush at a time, in order.
//!
//! A writer takes flushes from its batcher (a queue of one flush, so the
//! next is decoded while the current one is copied). A flush holds batches
//! of distinct lanes, and the writer writes it in one transaction
//! ([`transaction`]): fence every lane by compare-and-set, COPY the rows,
//! COPY the dead letters, COMMIT; then tells the source, which commits to
//! Kafka. Partitions are planned before the transaction ([`plan`]); a row
//! PostgreSQL refuses is found by bisection ([`bisect`]) and becomes a dead
//! letter. Failures are classified ([`failure`]): transient ones retry the
//! same flush, schema errors stop the writer until fixed, a fenced lane's
//! batch is dropped, its lane reloaded, and the rest of the flush written
//! without it.
//!
//! [`session`] holds the connection and its statements, and
//! [`write_rows`], the one way rows reach a leaf partition (used by
//! `weir dlq replay` too).

mod bisect;
pub(crate) mod failure;
pub(crate) mod plan;
pub mod session;
mod transaction;

pub use session::{Session, Statements, write_rows};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Sender as StdSender;
use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;
use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc::Receiver;

use crate::batch::Batch;
use crate::config::Config;
use crate::copy::now_micros;
use crate::copy::pool::BufferPool;
use crate::decode::Decoder;
use crate::health::Health;
use crate::lane::{InFlight, Request};
use crate::metrics as m;
use crate::store::deadletter::DeadLetterTable;
use crate::store::offsets::OffsetStore;
use crate::store::partition::ManagedTable;
use failure::{Attempt, Failure};
use transaction::{Destinations, Pass, Plan, RowLatency, Written};

/// What every writer of the pipeline shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub database_url: String,
    pub decoder: Arc<Decoder>,
    pub dead_letters: Arc<DeadLetterTable>,
    pub dead_letter_partitions: Arc<ManagedTable>,
    pub requests: StdSender<Request>,
    pub in_flight: Arc<InFlight>,
    pub health: Arc<Health>,
}

/// Writes batches for one writer.
pub struct Writer {
    index: usize,
    shared: Arc<Shared>,
    offsets: OffsetStore,
    /// The session, while connected.
    session: Option<Session>,
    /// Lanes fenced at an epoch: their batches up to that epoch are dropped.
    fenced: HashMap<(Arc<str>, i32), u64>,
    /// End-to-end histograms by table index, registered on first use
    /// (each row records into them: no lookup by name per row).
    latency: Vec<Option<(metrics::Histogram, metrics::Histogram)>>,
    /// The last committed flush's row latencies, emptied, for the next
    /// flush to fill: a vector of a flush's rows, allocated afresh, was
    /// faulted in page by page every time (2.2% of weir's CPU samples in
    /// a 1-writer drain).
    spare_latencies: Vec<RowLatency>,
    /// Where written segment buffers go back to (the batcher's pool).
    pool: BufferPool,
}

impl Writer {
    pub fn new(index: usize, shared: Arc<Shared>, pool: BufferPool) -> Self {
        Writer {
            index,
            offsets: OffsetStore::new(&shared.config),
            shared,
            session: None,
            fenced: HashMap::new(),
            latency: Vec::new(),
            spare_latencies: Vec::new(),
            pool,
        }
    }

    /// Connects (so readiness is known before traffic), then writes flushes
    /// until the batcher closes the queue.
    pub async fn run(mut self, mut input: Receiver<Vec<Batch>>) {
        let mut backoff = self.backoff();
        while let Err(err) = self.connect().await {
            self.shared.health.writer_connected(self.index, false);
            tracing::warn!(writer = self.index, error = %err, "cannot connect to PostgreSQL; retrying");
            m::retry("connection");
            tokio::time::sleep(backoff.next_backoff().unwrap_or(Duration::from_secs(5))).await;
            self.shared.health.writer_beat(self.index);
        }
        // Where this writer's time goes: waiting for the batcher (idle) or
        // writing. An idle writer under a backlog means decoding or Kafka
        // is the bottleneck; a writer always writing means PostgreSQL is.
        let writer = self.index.to_string();
        let idle = histogram!(m::WRITER_TIME, "writer" => writer.clone(), "state" => "idle");
        let writing = histogram!(m::WRITER_TIME, "writer" => writer, "state" => "writing");
        loop {
            let waiting = std::time::Instant::now();
            let flush = tokio::select! {
                flush = input.recv() => flush,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    idle.record(waiting.elapsed().as_secs_f64());
                    self.shared.health.writer_beat(self.index);
                    self.check_session().await;
                    continue;
                }
            };
            let waited = waiting.elapsed();
            idle.record(waited.as_secs_f64());
            let Some(flush) = flush else { break };
            let started = std::time::Instant::now();
            self.handle(&flush).await;
            let wrote = started.elapsed();
            writing.record(wrote.as_secs_f64());
            tracing::debug!(
                writer = self.index,
                batches = flush.len(),
                rows = flush.iter().map(|batch| batch.rows).sum::<usize>(),
                idle_ms = waited.as_secs_f64() * 1e3,
                writing_ms = wrote.as_secs_f64() * 1e3,
                "flush written"
            );
            for batch in flush {
                for segment in batch.segments {
                    let (chunks, rows) = segment.into_parts();
                    for chunk in chunks {
                        self.pool.give(chunk);
                    }
                    self.pool.give_rows(rows);
                }
                self.pool.give_messages(batch.messages);
            }
        }
        tracing::debug!(writer = self.index, "writer finished");
    }

    /// While idle: make sure the session still works, so readiness tells
    /// the truth without traffic; reconnect when it does not.
    async fn check_session(&mut self) {
        let alive = match &self.session {
            Some(session) => session.answers().await,
            None => false,
        };
        if !alive {
            self.shared.health.writer_connected(self.index, false);
            if let Err(err) = self.connect().await {
                tracing::warn!(writer = self.index, error = %err, "PostgreSQL unreachable; will retry");
            }
        }
    }

    fn backoff(&self) -> ExponentialBackoff {
        self.shared.config.pipeline.retry_backoff(None)
    }

    async fn connect(&mut self) -> Result<(), String> {
        self.session = None;
        let session = Session::open(
            &self.shared.database_url,
            &self.shared.config.postgres,
            &format!("writer-{}", self.index),
            &self.offsets,
        )
        .await?;
        self.session = Some(session);
        self.shared.health.writer_connected(self.index, true);
        Ok(())
    }

    /// The session, connecting first when there is none or it closed.
    async fn session(&mut self) -> Result<&mut Session, Failure> {
        if self.session.as_ref().is_none_or(Session::is_closed) {
            self.connect().await.map_err(|detail| Failure::Transient {
                cause: "connection",
                detail,
            })?;
        }
        self.session.as_mut().ok_or_else(|| Failure::Transient {
            cause: "connection",
            detail: "no session after connecting".into(),
        })
    }

    /// Writes one flush in one transaction, retrying transient failures
    /// for as long as it takes (in order: nothing after it is written
    /// meanwhile). A lane found fenced is dropped from the flush and the
    /// others are written without it.
    async fn handle(&mut self, flush: &[Batch]) {
        let mut pending: Vec<&Batch> = Vec::with_capacity(flush.len());
        for batch in flush {
            if self
                .fenced
                .get(&(batch.topic.clone(), batch.partition))
                .is_some_and(|&epoch| batch.epoch <= epoch)
            {
                self.finish(batch);
                counter!(m::BATCHES, "outcome" => "dropped_after_fence").increment(1);
            } else {
                pending.push(batch);
            }
        }
        // Every writer of every pod fences its lanes in (topic, partition)
        // order, so two transactions that share lanes (a zombie and the new
        // owner, in a rebalance) lock the offset rows in the same order: one
        // waits for the other and then finds the offset moved, instead of
        // the two deadlocking.
        pending.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let mut backoff = self.backoff();
        let mut schema_reported = false;
        let mut attempt = Attempt::First;
        while !pending.is_empty() {
            self.shared.health.writer_beat(self.index);
            match self.attempt(&pending, attempt).await {
                Ok(written) => {
                    if schema_reported {
                        tracing::info!(
                            writer = self.index,
                            "writing again after the schema error was fixed"
                        );
                    }
                    self.shared.health.writer_stopped(self.index, None);
                    self.report(written, pending.len());
                    for batch in pending {
                        // Kafka's committed offset only ever follows a
                        // PostgreSQL commit, never precedes it.
                        let _ = self.shared.requests.send(Request::Committed {
                            topic: batch.topic.clone(),
                            partition: batch.partition,
                            epoch: batch.epoch,
                            next: batch.next,
                        });
                        self.finish(batch);
                    }
                    return;
                }
                Err(Failure::Fenced(index)) => {
                    let batch = pending.remove(index);
                    tracing::warn!(
                        topic = %batch.topic, partition = batch.partition, epoch = batch.epoch,
                        prev = ?batch.prev, next = batch.next,
                        "batch fenced: another consumer moved this partition's stored offset; reloading"
                    );
                    counter!(m::FENCED, "topic" => batch.topic.to_string()).increment(1);
                    counter!(m::BATCHES, "outcome" => "fenced").increment(1);
                    // Every later batch of this lane up to this epoch was cut
                    // after this one and continues it: drop them too, until
                    // the source restarts the lane from the stored offset.
                    self.fenced
                        .insert((batch.topic.clone(), batch.partition), batch.epoch);
                    let _ = self.shared.requests.send(Request::Reload {
                        topic: batch.topic.clone(),
                        partition: batch.partition,
                        epoch: batch.epoch,
                    });
                    self.finish(batch);
                    // The transaction was rolled back; the other lanes'
                    // batches are not at fault and are written at once,
                    // without this one.
                }
                Err(Failure::Transient { cause, detail }) => {
                    attempt = Attempt::Retry;
                    m::retry(cause);
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(
                        writer = self.index, cause, error = %detail, retry_in_ms = wait.as_millis() as u64,
                        "transient failure; retrying the same batches"
                    );
                    if self.session.as_ref().is_none_or(Session::is_closed) || cause == "connection"
                    {
                        self.shared.health.writer_connected(self.index, false);
                        self.session = None;
                    }
                    tokio::time::sleep(wait).await;
                    if self.session.is_none()
                        && let Err(err) = self.connect().await
                    {
                        tracing::warn!(writer = self.index, error = %err, "reconnect failed");
                    }
                }
                Err(Failure::Schema(detail)) => {
                    attempt = Attempt::Retry;
                    m::retry("schema");
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                    if !schema_reported {
                        tracing::error!(
                            writer = self.index, lanes = %lanes(&pending), error = %detail,
                            "schema or configuration error: this writer is stopped until it is fixed; \
                             offsets stay where they are and nothing is dead-lettered"
                        );
                        schema_reported = true;
                    }
                    self.shared.health.writer_stopped(self.index, Some(detail));
                    // The fix may have changed tables: forget cached statements.
                    if let Some(session) = &mut self.session {
                        session.statements.clear();
                    }
                    tokio::time::sleep(wait).await;
                    if self.session.as_ref().is_none_or(Session::is_closed) {
                        let _ = self.connect().await;
                    }
                }
                Err(Failure::Row) => {
                    attempt = Attempt::Retry;
                    // `attempt` turns row failures into dead letters or a
                    // schema error; this arm is kept total so no path can
                    // panic a writer.
                    tracing::error!(
                        writer = self.index, lanes = %lanes(&pending),
                        "a row-level failure escaped isolation; retrying the batches"
                    );
                    m::retry("row");
                    tokio::time::sleep(backoff.next_backoff().unwrap_or(Duration::from_secs(30)))
                        .await;
                }
            }
        }
    }

    /// Cached end-to-end histograms of a table (from Kafka, from event time).
    fn latency_histograms(&mut self, table: usize) -> &(metrics::Histogram, metrics::Histogram) {
        if self.latency.len() <= table {
            self.latency.resize_with(table + 1, || None);
        }
        let tables = &self.shared.decoder.mappings.tables;
        self.latency[table].get_or_insert_with(|| {
            let name = tables[table].name().to_string();
            (
                histogram!(m::END_TO_END, "table" => name.clone(), "from" => "kafka"),
                histogram!(m::END_TO_END, "table" => name, "from" => "event"),
            )
        })
    }

    /// Releases what the batch held of the in-flight budget.
    fn finish(&self, batch: &Batch) {
        self.shared.in_flight.release(batch.charged_bytes);
        gauge!(m::IN_FLIGHT_ROWS).decrement(batch.rows as f64);
    }

    /// Counts a committed flush of `batches` lane batches.
    fn report(&mut self, mut written: Written, batches: usize) {
        counter!(m::BATCHES, "outcome" => "committed").increment(batches as u64);
        histogram!(m::BATCH_ROWS).record(written.rows_total() as f64);
        for table in &written.per_table {
            counter!(m::ROWS_WRITTEN, "table" => table.table.clone()).increment(table.rows);
            counter!(m::BYTES_WRITTEN, "table" => table.table.clone()).increment(table.bytes);
            if table.skipped > 0 {
                counter!(m::DUPLICATES_SKIPPED, "table" => table.table.clone())
                    .increment(table.skipped);
            }
        }
        // End to end, per row, now that it is committed: from the Kafka
        // append and from the event's own time.
        let now = now_micros();
        for row in written.latencies.drain(..) {
            let (from_kafka, from_event) = self.latency_histograms(row.table);
            if let Some(ms) = row.kafka_ms {
                from_kafka.record(now.saturating_sub(ms.saturating_mul(1000)).max(0) as f64 / 1e6);
            }
            from_event.record((now - row.event_time).max(0) as f64 / 1e6);
        }
        self.spare_latencies = written.latencies;
        for letter in written.dead_letters {
            counter!(
                m::DEAD_LETTERS,
                "table" => letter.table,
                "stage" => letter.stage,
                "reason" => letter.reason
            )
            .increment(1);
        }
    }

    /// One try at committing the flush (batches of distinct lanes, in
    /// fencing order).
    async fn attempt(&mut self, flush: &[&Batch], attempt: Attempt) -> Result<Written, Failure> {
        let shared = self.shared.clone();
        let offsets = self.offsets.clone();
        let latencies = std::mem::take(&mut self.spare_latencies);
        let lock_timeout = Duration::from_millis(shared.config.postgres.ddl_lock_timeout_ms);
        let session = self.session().await?;
        if attempt == Attempt::Retry {
            // Fence first on a retry: while this flush waited (a schema
            // error, an outage), another consumer may have committed past
            // a batch's start (a rebalance, a newer deployment). Then that
            // batch is stale and is dropped now, before any other work,
            // instead of retrying an error only this consumer meets. A
            // read: the compare-and-set in the transaction still decides.
            for (index, batch) in flush.iter().enumerate() {
                let stored = offsets
                    .load(&session.client, &batch.topic, &[batch.partition])
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                if stored.get(&batch.partition).copied() != batch.prev {
                    return Err(Failure::Fenced(index));
                }
            }
        }
        let planning = std::time::Instant::now();
        let mut parts = Vec::with_capacity(flush.len());
        for batch in flush {
            parts.push(
                plan::plan(
                    &mut session.client,
                    &shared.decoder.tables,
                    &batch.segments,
                    lock_timeout,
                )
                .await?,
            );
        }
        // The dead-letter partition for this instant, in case the flush has
        // or finds dead letters.
        let failed_at = now_micros();
        let dead_letter_leaf = plan::dead_letter_leaf(
            &mut session.client,
            &shared.dead_letter_partitions,
            failed_at,
            lock_timeout,
        )
        .await?;
        m::stage_time(
            m::stage::PARTITION_ENSURE,
            m::ALL_TABLES,
            planning.elapsed(),
        );
        let plan = Plan {
            parts,
            dead_letter_leaf,
            failed_at,
        };
        let to = Destinations {
            mappings: &shared.decoder.mappings,
            dead_letters: &shared.dead_letters,
            group: &offsets.group,
        };
        match transaction::write_flush(session, &to, flush, &plan, Pass::Fast, latencies).await {
            Err(Failure::Row) => {
                tracing::info!(
                    lanes = %lanes(flush),
                    rows = flush.iter().map(|batch| batch.rows).sum::<usize>(),
                    "a row was refused by PostgreSQL; isolating bad rows"
                );
                match transaction::write_flush(
                    session,
                    &to,
                    flush,
                    &plan,
                    Pass::Careful,
                    Vec::new(),
                )
                .await
                {
                    // The careful pass checks every constraint per COPY
                    // (deferred ones included), so nothing row-level is
                    // left for COMMIT to refuse. If PostgreSQL still
                    // refuses the commit, no row can be blamed: stop and
                    // say so rather than guess.
                    Err(Failure::Row) => Err(Failure::Schema(
                        "PostgreSQL refused the batch's commit although every row was accepted \
                         on its own (a constraint trigger that cannot be checked per statement?)"
                            .into(),
                    )),
                    other => other,
                }
            }
            other => other,
        }
    }
}

/// The lanes of a flush, for logs: `topic/0, topic/3`.
fn lanes(flush: &[&Batch]) -> String {
    flush
        .iter()
        .map(|batch| format!("{}/{}", batch.topic, batch.partition))
        .collect::<Vec<_>>()
        .join(", ")
}
