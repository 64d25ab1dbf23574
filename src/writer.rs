//! Writers: each owns a set of lanes (Kafka partitions) and one PostgreSQL
//! session, and commits its lanes' batches one at a time, in order.
//!
//! A writer is two tasks joined by a queue of one batch: the *batcher*
//! decodes events and cuts batches (by rows, bytes or linger), the *flusher*
//! writes them. So the next batch is decoded while the current one is
//! copied.
//!
//! One batch is one transaction:
//!   1. move the lane's stored offset from `prev` to `next` by
//!      compare-and-set (first, so a fenced batch costs no COPY, and the
//!      offset row stays locked until commit);
//!   2. COPY the rows, in binary, into each leaf partition;
//!   3. COPY the batch's dead letters;
//!   4. COMMIT; then tell the consumer, which commits to Kafka.
//!
//! A crash anywhere before 4 leaves nothing; after 4, rows, dead letters and
//! offset are all there. Partitions are ensured before the transaction.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::Sender as StdSender;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};
use bytes::{Bytes, BytesMut};
use futures::SinkExt;
use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc::{Receiver, Sender};
use tokio_postgres::{Client, Statement, Transaction};

use crate::batch::{Batch, BufferPool, DeadLetter, Event, Gathered, Sealed, Stage, copy_chunks};
use crate::config::Config;
use crate::consumer::{InFlight, LaneEvent, Request};
use crate::db::{self, ErrorClass};
use crate::deadletter::{COPY_COLUMNS, DeadLetterTable, PayloadCopy};
use crate::decode::Decoder;
use crate::health::Health;
use crate::metrics as m;
use crate::offsets::{AdvanceStatements, OffsetStore};
use crate::partition::{Leaf, ManagedTable, PartitionError};

/// Offset gaps are logged at most this often per lane (always counted).
const GAP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Largest CopyData message sent at once.
const COPY_CHUNK_BYTES: usize = 256 * 1024;

/// Unix microseconds now.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

// ---- batcher --------------------------------------------------------------

/// A lane as the batcher sees it.
struct Lane {
    topic: Arc<str>,
    partition: i32,
    epoch: u64,
    /// Stored offset the next cut batch continues from.
    prev: Option<i64>,
    /// Offset of the next message expected (last taken + 1).
    position: Option<i64>,
    gathered: Gathered,
    pool: BufferPool,
    messages: Vec<Event>,
    charged: usize,
    oldest: Option<Instant>,
    decode_time: Duration,
    /// When a gap was last logged, and offsets missed since.
    gap_warned: Option<Instant>,
    gap_offsets: u64,
}

impl Lane {
    fn new(
        topic: Arc<str>,
        partition: i32,
        epoch: u64,
        stored: Option<i64>,
        pool: BufferPool,
    ) -> Self {
        Lane {
            topic,
            partition,
            epoch,
            prev: stored,
            position: stored,
            gathered: Gathered::with_pool(pool.clone()),
            pool,
            messages: Vec::new(),
            charged: 0,
            oldest: None,
            decode_time: Duration::ZERO,
            gap_warned: None,
            gap_offsets: 0,
        }
    }

    /// Cuts what the lane holds into a batch (none if it holds nothing).
    fn cut(&mut self) -> Option<Batch> {
        if self.messages.is_empty() {
            return None;
        }
        // Offsets are exclusive at the end: `next` is the first offset this
        // batch does not cover, which is what the offsets table stores.
        let next = self
            .position
            .expect("a lane holding messages should have a position");
        let gathered =
            std::mem::replace(&mut self.gathered, Gathered::with_pool(self.pool.clone()));
        let started = self.oldest.take().unwrap_or_else(Instant::now);
        m::stage_time(
            m::stage::DECODE,
            m::ALL_TABLES,
            std::mem::take(&mut self.decode_time),
        );
        m::stage_time(m::stage::BATCH_WAIT, m::ALL_TABLES, started.elapsed());
        counter!(m::EVENTS, "topic" => self.topic.to_string())
            .increment(self.messages.len() as u64);
        let batch = Batch {
            topic: self.topic.clone(),
            partition: self.partition,
            epoch: self.epoch,
            prev: self.prev,
            next,
            rows: gathered.rows,
            segments: gathered.segments.into_iter().map(|s| s.seal()).collect(),
            dead_letters: gathered.dead_letters,
            messages: std::mem::take(&mut self.messages),
            charged_bytes: std::mem::take(&mut self.charged),
            started,
        };
        // The following batch continues where this one ends. If this one is
        // fenced, the following one fails its compare-and-set too and the
        // lane is reloaded.
        self.prev = Some(next);
        Some(batch)
    }
}

/// Decodes a writer's lanes into batches.
pub struct Batcher {
    pub decoder: Arc<Decoder>,
    pub input: Receiver<LaneEvent>,
    pub output: Sender<Batch>,
    pub in_flight: Arc<InFlight>,
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    /// Shared with this writer's flusher, which gives buffers back.
    pub pool: BufferPool,
}

impl Batcher {
    pub async fn run(mut self) {
        let mut lanes: HashMap<(Arc<str>, i32), Lane> = HashMap::new();
        loop {
            let deadline = lanes
                .values()
                .filter_map(|lane| lane.oldest)
                .min()
                .map(|oldest| oldest + self.linger);
            let next = match deadline {
                Some(deadline) => tokio::select! {
                    next = self.input.recv() => next,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        let due: Vec<_> = lanes
                            .values_mut()
                            .filter(|lane| lane.oldest.is_some_and(|t| t.elapsed() >= self.linger))
                            .filter_map(Lane::cut)
                            .collect();
                        for batch in due {
                            self.send(batch).await;
                        }
                        continue;
                    }
                },
                None => self.input.recv().await,
            };
            let Some(event) = next else {
                // The consumer is shutting down: flush what is held.
                let rest: Vec<_> = lanes.values_mut().filter_map(Lane::cut).collect();
                for batch in rest {
                    self.send(batch).await;
                }
                return;
            };
            match event {
                LaneEvent::Assigned {
                    topic,
                    partition,
                    epoch,
                    stored,
                } => {
                    let lane =
                        Lane::new(topic.clone(), partition, epoch, stored, self.pool.clone());
                    if let Some(old) = lanes.insert((topic, partition), lane) {
                        // Whatever the old assignment held is read again.
                        self.in_flight.release(old.charged);
                    }
                }
                LaneEvent::Revoked {
                    topic,
                    partition,
                    epoch,
                } => {
                    let key = (topic, partition);
                    if lanes.get(&key).is_some_and(|lane| lane.epoch == epoch) {
                        let lane = lanes.remove(&key).expect("lane was just found");
                        self.in_flight.release(lane.charged);
                    }
                }
                LaneEvent::Message {
                    epoch,
                    event,
                    charged,
                } => {
                    let key = (event.topic.clone(), event.partition);
                    let Some(lane) = lanes.get_mut(&key).filter(|lane| lane.epoch == epoch) else {
                        // Read under an assignment that has ended.
                        self.in_flight.release(charged);
                        continue;
                    };
                    if let Some(position) = lane.position {
                        if event.offset < position {
                            // Within one epoch librdkafka delivers a
                            // partition's offsets in increasing order; it
                            // goes back only when it resets a position the
                            // log no longer holds (the topic was deleted and
                            // recreated, or the log truncated by an unclean
                            // leader election) to the log's start. Those
                            // offsets now hold *other* records than the ones
                            // weir wrote under them: they are written, never
                            // skipped. What the lane holds is cut first (it
                            // ends at `position`); the next batch then moves
                            // the stored offset back, by the same
                            // compare-and-set as any other batch.
                            counter!(m::OFFSET_RESETS, "topic" => event.topic.to_string())
                                .increment(1);
                            tracing::warn!(
                                topic = %event.topic, partition = event.partition,
                                stored = ?lane.prev, expected = position, got = event.offset,
                                "offset reset: the log no longer holds this partition's position \
                                 (topic recreated or log truncated); writing what it holds from \
                                 its new start"
                            );
                            if let Some(batch) = lane.cut() {
                                self.send(batch).await;
                            }
                        } else if event.offset > position {
                            counter!(m::OFFSET_GAPS, "topic" => event.topic.to_string())
                                .increment(1);
                            // A warning, at most once a minute per lane:
                            // compacted topics and transaction markers make
                            // gaps all the time, retention only when records
                            // were deleted before weir read them.
                            lane.gap_offsets += (event.offset - position) as u64;
                            if lane
                                .gap_warned
                                .is_none_or(|at| at.elapsed() >= GAP_WARNING_EVERY)
                            {
                                tracing::warn!(
                                    topic = %event.topic, partition = event.partition,
                                    expected = position, got = event.offset,
                                    missing_offsets = lane.gap_offsets,
                                    "offsets missing: expected on a compacted topic or after \
                                     transaction markers; otherwise records were deleted before \
                                     weir read them"
                                );
                                lane.gap_warned = Some(Instant::now());
                                lane.gap_offsets = 0;
                            }
                        }
                    }
                    // Cut before an event that would likely carry the batch
                    // past `max_bytes` (its rows are about its size): a
                    // segment buffer then stays within the ceiling instead
                    // of doubling past it for the last few rows.
                    let mut encoded_before = lane.gathered.bytes();
                    if lane.gathered.rows > 0
                        && encoded_before + event.payload.len() > self.max_bytes
                        && let Some(batch) = lane.cut()
                    {
                        self.send(batch).await;
                        encoded_before = 0; // a fresh batch
                    }
                    lane.position = Some(event.offset + 1);
                    let started = Instant::now();
                    let message = lane.messages.len() as u32;
                    self.decoder
                        .decode(&event, message, now_micros(), &mut lane.gathered);
                    lane.decode_time += started.elapsed();
                    // The encoded rows are held until the commit too: they
                    // count against the same in-flight ceiling, and are
                    // released with the event bytes (through `lane.charged`
                    // and then the batch's `charged_bytes`).
                    let encoded_now = lane.gathered.bytes();
                    let encoded = encoded_now.saturating_sub(encoded_before);
                    self.in_flight.charge(encoded);
                    lane.messages.push(event);
                    lane.charged += charged + encoded;
                    lane.oldest.get_or_insert(started);
                    if (lane.gathered.rows >= self.max_rows || encoded_now >= self.max_bytes)
                        && let Some(batch) = lane.cut()
                    {
                        self.send(batch).await;
                    }
                }
            }
        }
    }

    async fn send(&self, batch: Batch) {
        gauge!(m::IN_FLIGHT_ROWS).increment(batch.rows as f64);
        if let Err(returned) = self.output.send(batch).await {
            // The flusher is gone (shutdown deadline): release and drop.
            self.in_flight.release(returned.0.charged_bytes);
            gauge!(m::IN_FLIGHT_ROWS).decrement(returned.0.rows as f64);
        }
    }
}

// ---- flusher --------------------------------------------------------------

/// Whether a write attempt is the batch's first, or follows a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    Retry,
}

/// Why a write attempt did not commit.
#[derive(Debug)]
enum Failure {
    /// Another consumer moved the stored offset: drop the batch, reload.
    Fenced,
    /// Retry the same batch after a backoff.
    Transient { cause: &'static str, detail: String },
    /// Stop and report; retry slowly until fixed.
    Schema(String),
    /// A row-level error in the fast path: retry carefully, isolating rows.
    Row,
}

impl Failure {
    fn from_db(err: &tokio_postgres::Error) -> Failure {
        match db::classify(err) {
            ErrorClass::Transient => Failure::Transient {
                cause: transient_cause(err),
                detail: db::describe(err),
            },
            ErrorClass::Schema => Failure::Schema(db::describe(err)),
            ErrorClass::Row => Failure::Row,
        }
    }

    fn from_partition(err: PartitionError) -> Failure {
        match err {
            // No row of the batch is at fault when a partition cannot be
            // made: a data-class error here (23514 when a DEFAULT partition
            // added since start-up already holds rows of the new range) is
            // the schema's, and stops the writer until it is fixed.
            PartitionError::Db(err) if db::classify(&err) == ErrorClass::Row => {
                Failure::Schema(format!(
                    "cannot create a partition: {} (a DEFAULT partition holding rows of the new \
                     range blocks ATTACH; move those rows out, or restart weir to write to the \
                     DEFAULT partition)",
                    db::describe(&err)
                ))
            }
            PartitionError::Db(err) => Failure::from_db(&err),
            other => Failure::Transient {
                cause: "partition",
                detail: other.to_string(),
            },
        }
    }
}

fn transient_cause(err: &tokio_postgres::Error) -> &'static str {
    if err.is_closed() || err.code().is_none() {
        return "connection";
    }
    match err.code().map(|c| c.code()) {
        Some("40001") => "serialization",
        Some("40P01") => "deadlock",
        Some("55P03") => "lock_timeout",
        Some("57014") => "statement_timeout",
        Some(code) if code.starts_with("57P") => "shutdown",
        Some(code) if code.starts_with("08") => "connection",
        Some(code) if code.starts_with("53") => "resources",
        _ => "other",
    }
}

/// Rows of one segment bound for one leaf partition.
struct Part {
    leaf: Leaf,
    segment: usize,
    /// Row indices within the segment.
    rows: Vec<usize>,
}

/// Writes batches for one writer.
pub struct Flusher {
    pub index: usize,
    pub config: Arc<Config>,
    pub database_url: String,
    pub decoder: Arc<Decoder>,
    pub dead_letters: Arc<DeadLetterTable>,
    pub dead_letter_partitions: Arc<ManagedTable>,
    pub offsets: OffsetStore,
    pub requests: StdSender<Request>,
    pub in_flight: Arc<InFlight>,
    pub health: Arc<Health>,
    client: Option<Client>,
    advance: Option<AdvanceStatements>,
    /// Prepared statements of this session, by SQL text.
    copy_statements: HashMap<String, Statement>,
    /// Lanes fenced at an epoch: their batches up to that epoch are dropped.
    fenced: HashMap<(Arc<str>, i32), u64>,
    /// End-to-end histograms by table index.
    latency: HashMap<usize, (metrics::Histogram, metrics::Histogram)>,
    /// Where written segment buffers go back to.
    pub pool: BufferPool,
}

impl Flusher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        config: Arc<Config>,
        database_url: String,
        decoder: Arc<Decoder>,
        dead_letters: Arc<DeadLetterTable>,
        dead_letter_partitions: Arc<ManagedTable>,
        requests: StdSender<Request>,
        in_flight: Arc<InFlight>,
        health: Arc<Health>,
    ) -> Self {
        Flusher {
            index,
            offsets: OffsetStore::new(&config),
            config,
            database_url,
            decoder,
            dead_letters,
            dead_letter_partitions,
            requests,
            in_flight,
            health,
            client: None,
            advance: None,
            copy_statements: HashMap::new(),
            fenced: HashMap::new(),
            latency: HashMap::new(),
            pool: BufferPool::default(),
        }
    }

    /// Connects (so readiness is known before traffic), then writes batches
    /// until the batcher closes the queue.
    pub async fn run(mut self, mut input: Receiver<Batch>) {
        let mut backoff = self.backoff();
        while let Err(err) = self.connect().await {
            self.health.writer_connected(self.index, false);
            tracing::warn!(writer = self.index, error = %err, "cannot connect to PostgreSQL; retrying");
            m::retry("connection");
            tokio::time::sleep(backoff.next_backoff().unwrap_or(Duration::from_secs(5))).await;
            self.health.writer_beat(self.index);
        }
        loop {
            let batch = tokio::select! {
                batch = input.recv() => batch,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    self.health.writer_beat(self.index);
                    self.check_session().await;
                    continue;
                }
            };
            let Some(batch) = batch else { break };
            self.handle(&batch).await;
            for segment in batch.segments {
                self.pool.give(segment.buf);
            }
        }
        tracing::debug!(writer = self.index, "writer finished");
    }

    /// While idle: make sure the session still works, so readiness tells
    /// the truth without traffic; reconnect when it does not.
    async fn check_session(&mut self) {
        let alive = match &self.client {
            Some(client) if !client.is_closed() => {
                tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1"))
                    .await
                    .is_ok_and(|result| result.is_ok())
            }
            _ => false,
        };
        if !alive {
            self.health.writer_connected(self.index, false);
            if let Err(err) = self.connect().await {
                tracing::warn!(writer = self.index, error = %err, "PostgreSQL unreachable; will retry");
            }
        }
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(self.config.pipeline.retry_initial_ms))
            .with_max_interval(Duration::from_millis(self.config.pipeline.retry_max_ms))
            .with_multiplier(2.0)
            .with_randomization_factor(0.2)
            .with_max_elapsed_time(None)
            .build()
    }

    async fn connect(&mut self) -> Result<(), String> {
        self.client = None;
        self.advance = None;
        self.copy_statements.clear();
        let client = db::connect(
            &self.database_url,
            &self.config.postgres,
            &format!("writer-{}", self.index),
        )
        .await
        .map_err(|err| err.to_string())?;
        let advance = self
            .offsets
            .prepare(&client)
            .await
            .map_err(|err| db::describe(&err))?;
        self.client = Some(client);
        self.advance = Some(advance);
        self.health.writer_connected(self.index, true);
        Ok(())
    }

    /// Writes one batch, retrying transient failures for as long as it
    /// takes (in order: nothing after it is written meanwhile).
    async fn handle(&mut self, batch: &Batch) {
        let key = (batch.topic.clone(), batch.partition);
        if self
            .fenced
            .get(&key)
            .is_some_and(|&epoch| batch.epoch <= epoch)
        {
            self.finish(batch);
            counter!(m::BATCHES, "outcome" => "dropped_after_fence").increment(1);
            return;
        }
        let mut backoff = self.backoff();
        let mut schema_reported = false;
        let mut retry = Attempt::First;
        loop {
            self.health.writer_beat(self.index);
            match self.attempt(batch, retry).await {
                Ok(written) => {
                    if schema_reported {
                        tracing::info!(
                            writer = self.index,
                            "writing again after the schema error was fixed"
                        );
                    }
                    self.health.writer_stopped(self.index, None);
                    self.report(written);
                    // Kafka's committed offset only ever follows a PostgreSQL
                    // commit, never precedes it.
                    let _ = self.requests.send(Request::Committed {
                        topic: batch.topic.clone(),
                        partition: batch.partition,
                        epoch: batch.epoch,
                        next: batch.next,
                    });
                    self.finish(batch);
                    return;
                }
                Err(Failure::Fenced) => {
                    tracing::warn!(
                        topic = %batch.topic, partition = batch.partition, epoch = batch.epoch,
                        prev = ?batch.prev, next = batch.next,
                        "batch fenced: another consumer moved this partition's stored offset; reloading"
                    );
                    counter!(m::FENCED, "topic" => batch.topic.to_string()).increment(1);
                    counter!(m::BATCHES, "outcome" => "fenced").increment(1);
                    self.fenced.insert(key.clone(), batch.epoch);
                    let _ = self.requests.send(Request::Reload {
                        topic: batch.topic.clone(),
                        partition: batch.partition,
                        epoch: batch.epoch,
                    });
                    self.finish(batch);
                    return;
                }
                Err(Failure::Transient { cause, detail }) => {
                    retry = Attempt::Retry;
                    m::retry(cause);
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(
                        writer = self.index, cause, error = %detail, retry_in_ms = wait.as_millis() as u64,
                        "transient failure; retrying the same batch"
                    );
                    if self.client.as_ref().is_none_or(Client::is_closed) || cause == "connection" {
                        self.health.writer_connected(self.index, false);
                        self.client = None;
                    }
                    tokio::time::sleep(wait).await;
                    if self.client.is_none()
                        && let Err(err) = self.connect().await
                    {
                        tracing::warn!(writer = self.index, error = %err, "reconnect failed");
                    }
                }
                Err(Failure::Schema(detail)) => {
                    retry = Attempt::Retry;
                    m::retry("schema");
                    let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(30));
                    if !schema_reported {
                        tracing::error!(
                            writer = self.index, topic = %batch.topic, partition = batch.partition,
                            error = %detail,
                            "schema or configuration error: this writer is stopped until it is fixed; \
                             offsets stay where they are and nothing is dead-lettered"
                        );
                        schema_reported = true;
                    }
                    self.health.writer_stopped(self.index, Some(detail));
                    // The fix may have changed tables: forget cached statements
                    // and partitions.
                    self.copy_statements.clear();
                    tokio::time::sleep(wait).await;
                    if self.client.as_ref().is_none_or(Client::is_closed) {
                        let _ = self.connect().await;
                    }
                }
                Err(Failure::Row) => {
                    retry = Attempt::Retry;
                    // `attempt` turns row failures into dead letters or a
                    // schema error; this arm is kept total so no path can
                    // panic a writer.
                    tracing::error!(
                        writer = self.index, topic = %batch.topic, partition = batch.partition,
                        "a row-level failure escaped isolation; retrying the batch"
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
        let name = self.decoder.mappings.tables[table].name().to_string();
        self.latency.entry(table).or_insert_with(|| {
            (
                histogram!(m::END_TO_END, "table" => name.clone(), "from" => "kafka"),
                histogram!(m::END_TO_END, "table" => name, "from" => "event"),
            )
        })
    }

    fn finish(&self, batch: &Batch) {
        self.in_flight.release(batch.charged_bytes);
        gauge!(m::IN_FLIGHT_ROWS).decrement(batch.rows as f64);
    }

    fn report(&mut self, written: Written) {
        counter!(m::BATCHES, "outcome" => "committed").increment(1);
        histogram!(m::BATCH_ROWS).record(written.rows_total() as f64);
        for (table, rows, bytes, skipped) in &written.per_table {
            counter!(m::ROWS_WRITTEN, "table" => table.clone()).increment(*rows);
            counter!(m::BYTES_WRITTEN, "table" => table.clone()).increment(*bytes);
            if *skipped > 0 {
                counter!(m::DUPLICATES_SKIPPED, "table" => table.clone()).increment(*skipped);
            }
        }
        // End to end, per row, now that it is committed: from the Kafka
        // append and from the event's own time.
        let now = now_micros();
        for (table, event_time, kafka_ms) in written.latencies {
            let (from_kafka, from_event) = self.latency_histograms(table);
            if let Some(ms) = kafka_ms {
                from_kafka.record(now.saturating_sub(ms.saturating_mul(1000)).max(0) as f64 / 1e6);
            }
            from_event.record((now - event_time).max(0) as f64 / 1e6);
        }
        for letter in &written.dead_letters {
            counter!(
                m::DEAD_LETTERS,
                "table" => letter.0.clone(),
                "stage" => letter.1,
                "reason" => letter.2.clone()
            )
            .increment(1);
        }
    }

    /// One try at committing the batch.
    async fn attempt(&mut self, batch: &Batch, attempt: Attempt) -> Result<Written, Failure> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.connect().await.map_err(|detail| Failure::Transient {
                cause: "connection",
                detail,
            })?;
        }
        if attempt == Attempt::Retry {
            // Fence first on a retry: while this batch waited (a schema
            // error, an outage), another consumer may have committed past
            // its start (a rebalance, a newer deployment). Then the batch is
            // stale and is dropped now, before any other work, instead of
            // retrying an error only this consumer meets. A read: the
            // compare-and-set in the transaction still decides.
            let client = self
                .client
                .as_ref()
                .expect("attempt connects before the fence check");
            let stored = self
                .offsets
                .load(client, &batch.topic, &[batch.partition])
                .await
                .map_err(|err| Failure::from_db(&err))?;
            if stored.get(&batch.partition).copied() != batch.prev {
                return Err(Failure::Fenced);
            }
        }
        let parts = self.plan(batch).await?;
        let failed_at = now_micros();
        // The dead-letter partition for this instant, in case the batch has
        // or finds dead letters.
        let ensure_started = Instant::now();
        let dead_letter_leaf = self.ensure_dead_letter_leaf(failed_at).await?;
        m::stage_time(
            m::stage::PARTITION_ENSURE,
            m::ALL_TABLES,
            ensure_started.elapsed(),
        );
        match self
            .transaction(batch, &parts, &dead_letter_leaf, failed_at, false)
            .await
        {
            Err(Failure::Row) => {
                tracing::info!(
                    topic = %batch.topic, partition = batch.partition, rows = batch.rows,
                    "a row was refused by PostgreSQL; isolating bad rows"
                );
                match self
                    .transaction(batch, &parts, &dead_letter_leaf, failed_at, true)
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

    /// Maps every segment to existing leaf partitions, creating missing ones.
    async fn plan(&mut self, batch: &Batch) -> Result<Vec<Part>, Failure> {
        let mut parts = Vec::new();
        for (segment_index, segment) in batch.segments.iter().enumerate() {
            let table = self.decoder.tables[segment.table].clone();
            let mut pending: Vec<(i64, i64, Vec<usize>)> =
                vec![(segment.lo, segment.hi, (0..segment.rows.len()).collect())];
            let mut rounds = 0;
            while let Some((lo, hi, rows)) = pending.pop() {
                if let Some(leaf) = table.snapshot().exact(lo, hi) {
                    parts.push(Part {
                        leaf: leaf.clone(),
                        segment: segment_index,
                        rows,
                    });
                    continue;
                }
                rounds += 1;
                if rounds > 64 {
                    return Err(Failure::Schema(format!(
                        "cannot find or create partitions of {} for the batch's rows",
                        table.qualified()
                    )));
                }
                let started = Instant::now();
                let client = self
                    .client
                    .as_mut()
                    .expect("attempt connects before planning");
                let lock_timeout = Duration::from_millis(self.config.postgres.ddl_lock_timeout_ms);
                match table.ensure(client, lo, hi, lock_timeout).await {
                    Ok((leaf, created)) => {
                        m::stage_time(m::stage::PARTITION_ENSURE, &table.name, started.elapsed());
                        if created {
                            counter!(m::PARTITIONS_CREATED, "table" => table.name.clone())
                                .increment(1);
                            tracing::info!(partition = %leaf.qualified(), "partition created");
                        }
                        parts.push(Part {
                            leaf,
                            segment: segment_index,
                            rows,
                        });
                    }
                    Err(PartitionError::Overlap) => {
                        // Someone made a partition with other bounds: route
                        // these rows again against the fresh set.
                        let set = table.snapshot();
                        let mut regrouped: HashMap<(i64, i64), Vec<usize>> = HashMap::new();
                        for row in rows {
                            let range = set.route(table.granularity, segment.rows[row].time);
                            regrouped.entry(range).or_default().push(row);
                        }
                        pending
                            .extend(regrouped.into_iter().map(|((lo, hi), rows)| (lo, hi, rows)));
                    }
                    Err(err) => return Err(Failure::from_partition(err)),
                }
            }
        }
        Ok(parts)
    }

    async fn ensure_dead_letter_leaf(&mut self, at: i64) -> Result<Leaf, Failure> {
        let table = self.dead_letter_partitions.clone();
        let (lo, hi) = table.snapshot().route(table.granularity, at);
        if let Some(leaf) = table.snapshot().exact(lo, hi) {
            return Ok(leaf.clone());
        }
        let client = self
            .client
            .as_mut()
            .expect("attempt connects before planning");
        let lock_timeout = Duration::from_millis(self.config.postgres.ddl_lock_timeout_ms);
        match table.ensure(client, lo, hi, lock_timeout).await {
            Ok((leaf, created)) => {
                if created {
                    counter!(m::PARTITIONS_CREATED, "table" => table.name.clone()).increment(1);
                }
                Ok(leaf)
            }
            Err(err) => Err(Failure::from_partition(err)),
        }
    }

    /// A statement prepared once per session.
    async fn prepared(&mut self, sql: String) -> Result<Statement, Failure> {
        if let Some(statement) = self.copy_statements.get(&sql) {
            return Ok(statement.clone());
        }
        let client = self
            .client
            .as_ref()
            .expect("attempt connects before copying");
        let statement = client
            .prepare(&sql)
            .await
            .map_err(|err| Failure::from_db(&err))?;
        self.copy_statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// How rows of `source` reach `leaf`: straight COPY, or for a table with
    /// a dedupe key, COPY into a session-local staging table then
    /// `INSERT ... ON CONFLICT DO NOTHING` (rows whose key exists are skipped).
    async fn sink(&mut self, leaf: &str, source: usize) -> Result<Sink, Failure> {
        let mappings = self.decoder.mappings.clone();
        let source = &mappings.sources[source];
        let table = &mappings.tables[source.table];
        let Some(conflict) = &table.conflict_columns else {
            let copy = self
                .prepared(format!(
                    "COPY {leaf} {} FROM STDIN (FORMAT binary)",
                    source.column_list
                ))
                .await?;
            return Ok(Sink::Direct(copy));
        };
        let stage = format!("pg_temp.weir_stage_{}", table.index);
        // Created outside any batch transaction (a rollback would take it
        // away), once per session; prepared statements below reference it.
        let create = format!(
            "CREATE TEMP TABLE IF NOT EXISTS weir_stage_{} (LIKE {} INCLUDING DEFAULTS)",
            table.index,
            table.info.qualified()
        );
        if !self.copy_statements.contains_key(&create) {
            let client = self
                .client
                .as_ref()
                .expect("attempt connects before copying");
            client
                .batch_execute(&create)
                .await
                .map_err(|err| Failure::from_db(&err))?;
            let marker = client
                .prepare("SELECT 1")
                .await
                .map_err(|err| Failure::from_db(&err))?;
            self.copy_statements.insert(create, marker);
        }
        let columns = source
            .column_list
            .trim_start_matches('(')
            .trim_end_matches(')');
        let copy = self
            .prepared(format!(
                "COPY {stage} {} FROM STDIN (FORMAT binary)",
                source.column_list
            ))
            .await?;
        let insert = self
            .prepared(format!(
                "INSERT INTO {leaf} {} SELECT {columns} FROM {stage} ON CONFLICT ({conflict}) DO NOTHING",
                source.column_list
            ))
            .await?;
        let clear = self.prepared(format!("TRUNCATE {stage}")).await?;
        Ok(Sink::Staged {
            copy,
            insert,
            clear,
        })
    }

    /// The batch as one transaction. `careful`: each part is copied under a
    /// savepoint, and a part PostgreSQL refuses is bisected until the bad
    /// rows are isolated; they become dead letters, the rest is written.
    async fn transaction(
        &mut self,
        batch: &Batch,
        parts: &[Part],
        dead_letter_leaf: &Leaf,
        failed_at: i64,
        careful: bool,
    ) -> Result<Written, Failure> {
        // Prepare statements first: they cannot be prepared mid-transaction
        // with the client borrowed by it.
        let mut statements = Vec::with_capacity(parts.len());
        for part in parts {
            statements.push(
                self.sink(&part.leaf.qualified(), batch.segments[part.segment].source)
                    .await?,
            );
        }
        let dead_statement = self
            .prepared(format!(
                "COPY {} {COPY_COLUMNS} FROM STDIN (FORMAT binary)",
                dead_letter_leaf.qualified()
            ))
            .await?;
        let advance = self
            .advance
            .clone()
            .expect("attempt connects before writing");
        let group = self.offsets.group.clone();
        let mappings = self.decoder.mappings.clone();
        let dead_letters = self.dead_letters.clone();
        // The dead letters known before the transaction (decode, validate,
        // route) are encoded now, not while the session sits in an open
        // transaction; each message's payload is stored (and compressed)
        // once, with its first dead letter in the batch.
        let mut dead_encoded = DeadLetterRows::default();
        dead_encoded.add(&dead_letters, batch, &batch.dead_letters, failed_at);
        let client = self
            .client
            .as_mut()
            .expect("attempt connects before writing");

        let transaction = client
            .transaction()
            .await
            .map_err(|err| Failure::from_db(&err))?;
        if careful {
            // Deferred constraints are checked at COMMIT, where a failure
            // names no row. The careful pass checks them at the end of each
            // COPY instead, so bisection can find the rows they refuse.
            transaction
                .batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
                .await
                .map_err(|err| Failure::from_db(&err))?;
        }
        // Fencing first. The compare-and-set moves the stored offset from
        // exactly where this batch starts; if another consumer got there
        // first it matches nothing and nothing is written. The updated row
        // stays locked until commit, so a racing consumer waits and then
        // finds the offset moved.
        let owned = advance
            .advance(
                &transaction,
                &group,
                &batch.topic,
                batch.partition,
                batch.prev,
                batch.next,
            )
            .await
            .map_err(|err| Failure::from_db(&err))?;
        if !owned {
            let _ = transaction.rollback().await;
            return Err(Failure::Fenced);
        }

        let mut written = Written::default();
        let mut write_dead: Vec<DeadLetter> = Vec::new();
        let mut bisect_copies = 0u64;
        for (part, statement) in parts.iter().zip(&statements) {
            let copy_started = Instant::now();
            let segment = &batch.segments[part.segment];
            let table = mappings.tables[segment.table].name().to_string();
            let buf = &segment.buf;
            let mut inserted = 0u64;
            let rows_written: Vec<usize> = if careful {
                let mut bad = Vec::new();
                isolate(
                    &transaction,
                    statement,
                    segment,
                    buf,
                    &part.rows,
                    false,
                    &mut bad,
                    &mut Progress {
                        copies: &mut bisect_copies,
                        inserted: &mut inserted,
                    },
                )
                .await?;
                for (row, err) in &bad {
                    let meta = segment.rows[*row];
                    write_dead.push(DeadLetter {
                        message: meta.message,
                        table: Some(Arc::from(table.as_str())),
                        item: Some(meta.item),
                        item_path: None,
                        stage: Stage::Write,
                        code: db::sqlstate(err).into(),
                        detail: db::describe(err),
                    });
                }
                let bad_rows: std::collections::HashSet<usize> =
                    bad.iter().map(|(row, _)| *row).collect();
                part.rows
                    .iter()
                    .copied()
                    .filter(|row| !bad_rows.contains(row))
                    .collect()
            } else {
                inserted = write_rows(&transaction, statement, segment, buf, &part.rows)
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                part.rows.clone()
            };
            // Rows a dedupe key skipped (already in the table); counted
            // only once the transaction commits, like every other figure.
            let skipped = rows_written.len() as u64 - inserted.min(rows_written.len() as u64);
            let bytes: u64 = rows_written
                .iter()
                .map(|&row| segment.row_range(row).len() as u64)
                .sum();
            written.add(&table, inserted, bytes, skipped);
            written.latencies.extend(rows_written.iter().map(|&row| {
                let meta = segment.rows[row];
                (
                    segment.table,
                    meta.time,
                    batch.messages[meta.message as usize].timestamp_ms,
                )
            }));
            m::stage_time(m::stage::COPY, &table, copy_started.elapsed());
        }
        if careful {
            counter!(m::BISECT_COPIES).increment(bisect_copies);
            tracing::info!(
                topic = %batch.topic, partition = batch.partition,
                bad_rows = write_dead.len(), copies = bisect_copies,
                "bad rows isolated"
            );
        }

        dead_encoded.add(&dead_letters, batch, &write_dead, failed_at);
        if !dead_encoded.buf.is_empty() {
            written.dead_letters = std::mem::take(&mut dead_encoded.reported);
            let buf = std::mem::take(&mut dead_encoded.buf).freeze();
            let whole = 0..buf.len();
            send_copy(
                &transaction,
                &dead_statement,
                copy_chunks(&buf, std::slice::from_ref(&whole)),
            )
            .await
            .map_err(|err| match db::classify(&err) {
                // Dead letters are weir's own rows: a refusal here is not
                // the event's fault. Stop and say so.
                ErrorClass::Row => Failure::Schema(format!(
                    "the dead-letter table refused a row: {}",
                    db::describe(&err)
                )),
                _ => Failure::from_db(&err),
            })?;
        }

        let commit_started = Instant::now();
        transaction
            .commit()
            .await
            .map_err(|err| Failure::from_db(&err))?;
        m::stage_time(m::stage::COMMIT, m::ALL_TABLES, commit_started.elapsed());
        Ok(written)
    }
}

/// A batch's dead letters as COPY rows, and what to report once committed.
#[derive(Default)]
struct DeadLetterRows {
    buf: BytesMut,
    /// Messages (by index in the batch) whose payload a row already carries.
    carried: std::collections::HashSet<u32>,
    /// Per dead letter: table, stage, reason code.
    reported: Vec<(String, &'static str, String)>,
}

impl DeadLetterRows {
    fn add(
        &mut self,
        table: &DeadLetterTable,
        batch: &Batch,
        letters: &[DeadLetter],
        failed_at: i64,
    ) {
        for letter in letters {
            let event = &batch.messages[letter.message as usize];
            let copy = if self.carried.insert(letter.message) {
                PayloadCopy::Carried
            } else {
                PayloadCopy::WithSibling
            };
            table.encode_row(&mut self.buf, letter, event, failed_at, copy);
            self.reported.push((
                letter.table.as_deref().unwrap_or("").to_string(),
                letter.stage.as_str(),
                letter.code.to_string(),
            ));
        }
    }
}

/// What a committed batch wrote, for metrics.
#[derive(Debug, Default)]
struct Written {
    /// Per table: rows inserted, COPY bytes, rows skipped as duplicates.
    per_table: Vec<(String, u64, u64, u64)>,
    /// Per row written: table index, event time (Unix us), Kafka timestamp (ms).
    latencies: Vec<(usize, i64, Option<i64>)>,
    dead_letters: Vec<(String, &'static str, String)>,
}

impl Written {
    fn add(&mut self, table: &str, rows: u64, bytes: u64, skipped: u64) {
        match self.per_table.iter_mut().find(|(t, ..)| t == table) {
            Some(entry) => {
                entry.1 += rows;
                entry.2 += bytes;
                entry.3 += skipped;
            }
            None => self
                .per_table
                .push((table.to_string(), rows, bytes, skipped)),
        }
    }

    fn rows_total(&self) -> u64 {
        self.per_table.iter().map(|(_, rows, ..)| rows).sum()
    }
}

/// Byte ranges of `rows` (consecutive rows merged).
fn row_ranges(segment: &Sealed, rows: &[usize]) -> Vec<Range<usize>> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for &row in rows {
        let range = segment.row_range(row);
        match ranges.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => ranges.push(range),
        }
    }
    ranges
}

async fn copy_rows(
    transaction: &Transaction<'_>,
    statement: &Statement,
    segment: &Sealed,
    buf: &Bytes,
    rows: &[usize],
) -> Result<u64, tokio_postgres::Error> {
    let ranges = row_ranges(segment, rows);
    send_copy(transaction, statement, copy_chunks(buf, &ranges)).await
}

/// COPYs byte `ranges` of encoded rows with a COPY statement given as text.
pub async fn copy_ranges(
    transaction: &Transaction<'_>,
    statement: &str,
    buf: &Bytes,
    ranges: &[Range<usize>],
) -> Result<u64, tokio_postgres::Error> {
    let statement = transaction.prepare(statement).await?;
    send_copy(transaction, &statement, copy_chunks(buf, ranges)).await
}

/// Streams `chunks` through `COPY ... FROM STDIN` and finishes it.
async fn send_copy(
    transaction: &Transaction<'_>,
    statement: &Statement,
    chunks: Vec<Bytes>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = transaction.copy_in::<_, Bytes>(statement).await?;
    futures::pin_mut!(sink);
    for chunk in chunks {
        let mut chunk = chunk;
        while chunk.len() > COPY_CHUNK_BYTES {
            let head = chunk.split_to(COPY_CHUNK_BYTES);
            sink.feed(head).await?;
        }
        sink.feed(chunk).await?;
    }
    sink.as_mut().finish().await
}

/// How rows get into a partition (see [`Flusher::sink`]).
enum Sink {
    Direct(Statement),
    Staged {
        copy: Statement,
        insert: Statement,
        clear: Statement,
    },
}

/// Writes `rows` through `sink`; returns how many rows the table gained.
async fn write_rows(
    transaction: &Transaction<'_>,
    sink: &Sink,
    segment: &Sealed,
    buf: &Bytes,
    rows: &[usize],
) -> Result<u64, tokio_postgres::Error> {
    match sink {
        Sink::Direct(copy) => copy_rows(transaction, copy, segment, buf, rows).await,
        Sink::Staged {
            copy,
            insert,
            clear,
        } => {
            copy_rows(transaction, copy, segment, buf, rows).await?;
            let inserted = transaction.execute(insert, &[]).await?;
            transaction.execute(clear, &[]).await?;
            Ok(inserted)
        }
    }
}

/// Counters kept while isolating bad rows.
struct Progress<'a> {
    copies: &'a mut u64,
    inserted: &'a mut u64,
}

/// Copies `rows` under a savepoint; on a row-level refusal, splits them and
/// recurses until each bad row is alone and refused on its own. A row is
/// only ever declared bad by its own failed COPY. `known_bad`: the caller
/// already knows these rows hold a bad one, so the whole set is not tried.
#[allow(clippy::too_many_arguments)]
async fn isolate(
    transaction: &Transaction<'_>,
    sink: &Sink,
    segment: &Sealed,
    buf: &Bytes,
    rows: &[usize],
    known_bad: bool,
    bad: &mut Vec<(usize, tokio_postgres::Error)>,
    progress: &mut Progress<'_>,
) -> Result<(), Failure> {
    if rows.is_empty() {
        return Ok(());
    }
    if !known_bad || rows.len() == 1 {
        transaction
            .batch_execute("SAVEPOINT weir_rows")
            .await
            .map_err(|err| Failure::from_db(&err))?;
        *progress.copies += 1;
        match write_rows(transaction, sink, segment, buf, rows).await {
            Ok(inserted) => {
                *progress.inserted += inserted;
                transaction
                    .batch_execute("RELEASE SAVEPOINT weir_rows")
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                return Ok(());
            }
            Err(err) if db::classify(&err) == ErrorClass::Row => {
                transaction
                    .batch_execute("ROLLBACK TO SAVEPOINT weir_rows; RELEASE SAVEPOINT weir_rows")
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                if rows.len() == 1 {
                    bad.push((rows[0], err));
                    return Ok(());
                }
            }
            Err(err) => return Err(Failure::from_db(&err)),
        }
    }
    let (left, right) = rows.split_at(rows.len() / 2);
    let bad_before = bad.len();
    Box::pin(isolate(
        transaction,
        sink,
        segment,
        buf,
        left,
        false,
        bad,
        progress,
    ))
    .await?;
    // The whole set failed: if the left half was clean, the right half holds
    // the bad row, and trying it whole would only fail again.
    let left_clean = bad.len() == bad_before;
    Box::pin(isolate(
        transaction,
        sink,
        segment,
        buf,
        right,
        left_clean,
        bad,
        progress,
    ))
    .await
}
