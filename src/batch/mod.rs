//! Batches: what one lane (one Kafka partition) hands to its writer.
//!
//! A batch covers a contiguous range of a partition's offsets, from the
//! stored offset it continues (`prev`) to the offset after its last message
//! (`next`). It holds every row those messages produced, already encoded
//! for COPY and grouped by target partition range ("segments"), and every
//! dead letter they produced. It commits whole or not at all.
//!
//! The batcher (one per writer) takes its lanes' events in offset order,
//! decodes each into rows and dead letters, and cuts a lane's batch by rows,
//! bytes or, once the linger has passed, when the writer can take it. A
//! lane holding rows read behind its partition's end (a backlog) does not
//! linger: it is cut as soon as the writer can take it, and grows while the
//! writer is busy (even once it has read up to the end). What
//! it hands the writer is a *flush*: one or more batches of distinct lanes,
//! committed in one transaction. Every lane past its linger when the writer
//! can take a flush goes in it, so a busy writer with several lanes pays one
//! COMMIT for all of them, not one per lane. The writer writes a flush while
//! the next one is gathered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use tokio::sync::mpsc::{Receiver, Sender};

use crate::copy::now_micros;
use crate::copy::pool::BufferPool;
use crate::copy::segment::Sealed;
use crate::decode::{Decoder, Gathered};
use crate::event::{DeadLetter, Event};
use crate::lane::{InFlight, LaneEvent};
use crate::metrics as m;

/// Most lane events the batcher takes from its queue at once.
const RECV_CHUNK: usize = 256;

/// Offset gaps are logged at most this often per lane (always counted).
const GAP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// A lane's batch, cut and on its way to the writer.
#[derive(Debug)]
pub struct Batch {
    pub topic: Arc<str>,
    pub partition: i32,
    /// Assignment epoch of the lane that cut it: a batch from an older epoch
    /// is never written after the lane was reset.
    pub epoch: u64,
    /// The stored `next_offset` this batch continues from; `None` when the
    /// partition has no stored offset yet. The commit is conditional on it.
    pub prev: Option<i64>,
    /// The `next_offset` stored when this batch commits: its last offset + 1.
    pub next: i64,
    pub segments: Vec<Sealed>,
    pub dead_letters: Vec<DeadLetter>,
    /// The events, kept for dead letters found while writing.
    pub messages: Vec<Event>,
    pub rows: usize,
    /// Bytes charged to the in-flight budget, released when the batch is done.
    pub charged_bytes: usize,
}

/// A lane as the batcher sees it: the batch being gathered, and where the
/// lane stands.
struct Gathering {
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
    /// The most messages a batch of this lane has held: the room the next
    /// batch's vector is given. A backlog's batches are cut whenever the
    /// writer is free, so their sizes vary; sized from the batch before,
    /// a vector regrew whenever a batch outgrew it (1.9% of weir's CPU
    /// samples in a 1-writer drain).
    most_messages: usize,
    charged: usize,
    /// When the oldest message held was taken in (tokio's clock, which
    /// the linger sleeps on).
    oldest: Option<tokio::time::Instant>,
    /// A message taken since the last cut was behind its partition's end:
    /// the lane holds a backlog's rows. It stays set when the lane then
    /// reads up to the end while its writer is busy, so that those rows,
    /// which have already waited, do not wait for the linger as well.
    behind: bool,
    decode_time: Duration,
    /// When a gap was last logged, and offsets missed since.
    gap_warned: Option<Instant>,
    gap_offsets: u64,
}

impl Gathering {
    fn new(
        topic: Arc<str>,
        partition: i32,
        epoch: u64,
        stored: Option<i64>,
        pool: BufferPool,
    ) -> Self {
        Gathering {
            topic,
            partition,
            epoch,
            prev: stored,
            position: stored,
            gathered: Gathered::with_pool(pool.clone()),
            pool,
            messages: Vec::new(),
            most_messages: 0,
            charged: 0,
            oldest: None,
            behind: false,
            decode_time: Duration::ZERO,
            gap_warned: None,
            gap_offsets: 0,
        }
    }

    /// When what the lane holds is due to be cut (once its writer can take
    /// it). The linger waits for more rows to share a transaction; a lane
    /// behind its partition's end has them already, so waiting would only
    /// leave the writer idle: a backlog is due at once.
    fn due_at(&self, linger: Duration) -> Option<tokio::time::Instant> {
        let oldest = self.oldest?;
        Some(if self.behind { oldest } else { oldest + linger })
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
        let following = self.gathered.following();
        let gathered = std::mem::replace(&mut self.gathered, following);
        let started = self.oldest.take().unwrap_or_else(tokio::time::Instant::now);
        self.behind = false;
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
            // Room for as many messages as any batch of the lane has held,
            // in a vector a written batch gave back when one is that large.
            messages: {
                self.most_messages = self.most_messages.max(self.messages.len());
                let room = self.pool.take_messages(self.most_messages);
                std::mem::replace(&mut self.messages, room)
            },
            charged_bytes: std::mem::take(&mut self.charged),
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
    /// Flushes: batches of distinct lanes, each flush committed in one
    /// transaction.
    pub output: Sender<Vec<Batch>>,
    pub in_flight: Arc<InFlight>,
    pub max_rows: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    /// Shared with this lane set's writer, which gives buffers back.
    pub pool: BufferPool,
}

impl Batcher {
    pub async fn run(mut self) {
        // Looked up once per event: foldhash, not SipHash.
        let mut lanes: foldhash::HashMap<(Arc<str>, i32), Gathering> = Default::default();
        // Events are taken from the queue in chunks: under a backlog the
        // linger timer and the channel are polled once per chunk, not once
        // per message.
        let mut events = Vec::with_capacity(RECV_CHUNK);
        loop {
            let deadline = lanes
                .values()
                .filter_map(|lane| lane.due_at(self.linger))
                .min();
            let received = match deadline {
                // A lane is due. It is cut when its writer can take a batch
                // (one waits while one is written), not before: while the
                // writer is busy the lane goes on gathering, up to
                // `max_rows` or `max_bytes`, so under load the batches grow
                // and each transaction carries more rows, instead of small
                // linger-sized batches queueing up behind one another.
                Some(deadline) if deadline <= tokio::time::Instant::now() => tokio::select! {
                    received = self.input.recv_many(&mut events, RECV_CHUNK) => received,
                    permit = self.output.reserve() => {
                        // Every due lane goes in one flush: the writer
                        // commits them in one transaction, one COMMIT
                        // instead of one per lane. Lanes not yet due stay:
                        // taking them along would make each row wait for
                        // every other lane's COPY, and line the lanes'
                        // lingers up so they all fall due at once.
                        let now = tokio::time::Instant::now();
                        let flush: Vec<Batch> = lanes
                            .values_mut()
                            .filter(|lane| lane.due_at(self.linger).is_some_and(|at| at <= now))
                            .filter_map(Gathering::cut)
                            .collect();
                        if !flush.is_empty() {
                            match permit {
                                Ok(permit) => {
                                    gauge!(m::IN_FLIGHT_ROWS).increment(rows_of(&flush) as f64);
                                    permit.send(flush);
                                    let_the_writer_start().await;
                                }
                                // The writer is gone: `send` releases it.
                                Err(_) => self.send(flush).await,
                            }
                        }
                        continue;
                    }
                },
                Some(deadline) => tokio::select! {
                    received = self.input.recv_many(&mut events, RECV_CHUNK) => received,
                    _ = tokio::time::sleep_until(deadline) => continue,
                },
                None => self.input.recv_many(&mut events, RECV_CHUNK).await,
            };
            if received == 0 {
                // The consumer is shutting down: flush what is held.
                let rest: Vec<_> = lanes.values_mut().filter_map(Gathering::cut).collect();
                if !rest.is_empty() {
                    self.send(rest).await;
                }
                return;
            }
            let clock = WallClock::now();
            for event in events.drain(..) {
                self.take(&mut lanes, event, clock).await;
            }
        }
    }

    /// Takes one lane event in: starts or ends a lane, or decodes a message
    /// into its lane's batch (cutting the batch when it is full).
    async fn take(
        &self,
        lanes: &mut foldhash::HashMap<(Arc<str>, i32), Gathering>,
        event: LaneEvent,
        clock: WallClock,
    ) {
        match event {
            LaneEvent::Assigned {
                topic,
                partition,
                epoch,
                stored,
            } => {
                let lane =
                    Gathering::new(topic.clone(), partition, epoch, stored, self.pool.clone());
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
                behind,
            } => {
                let key = (event.topic.clone(), event.partition);
                let Some(lane) = lanes.get_mut(&key).filter(|lane| lane.epoch == epoch) else {
                    // Read under an assignment that has ended.
                    self.in_flight.release(charged);
                    return;
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
                        counter!(m::OFFSET_RESETS, "topic" => event.topic.to_string()).increment(1);
                        tracing::warn!(
                            topic = %event.topic, partition = event.partition,
                            stored = ?lane.prev, expected = position, got = event.offset,
                            "offset reset: the log no longer holds this partition's position \
                             (topic recreated or log truncated); writing what it holds from \
                             its new start"
                        );
                        if let Some(batch) = lane.cut() {
                            self.send(vec![batch]).await;
                        }
                    } else if event.offset > position {
                        counter!(m::OFFSET_GAPS, "topic" => event.topic.to_string()).increment(1);
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
                // The size its rows are expected to have (about the
                // event's own), as the source reserved it.
                let reserved = crate::lane::reserved_for_rows(&event);
                // Cut before an event that would likely carry the batch
                // past `max_bytes`: a segment buffer then stays within
                // the ceiling instead of doubling past it for the last
                // few rows.
                let mut encoded_before = lane.gathered.bytes();
                if lane.gathered.rows > 0
                    && encoded_before + reserved > self.max_bytes
                    && let Some(batch) = lane.cut()
                {
                    self.send(vec![batch]).await;
                    encoded_before = 0; // a fresh batch
                }
                lane.position = Some(event.offset + 1);
                let started = Instant::now();
                let message = lane.messages.len() as u32;
                let ingested = clock.micros_at(started);
                self.decoder
                    .decode(&event, message, ingested, &mut lane.gathered);
                lane.decode_time += started.elapsed();
                // The encoded rows are held until the commit too: they
                // count against the same in-flight ceiling, and are
                // released with the event bytes (through `lane.charged`
                // and then the batch's `charged_bytes`). The source
                // reserved room for them when it took the event; their
                // true size replaces the reservation.
                let encoded_now = lane.gathered.bytes();
                let encoded = encoded_now.saturating_sub(encoded_before);
                if encoded >= reserved {
                    self.in_flight.charge(encoded - reserved);
                } else {
                    self.in_flight.release(reserved - encoded);
                }
                lane.messages.push(event);
                lane.charged += charged - reserved + encoded;
                lane.oldest.get_or_insert_with(tokio::time::Instant::now);
                lane.behind |= behind;
                if (lane.gathered.rows >= self.max_rows || encoded_now >= self.max_bytes)
                    && let Some(batch) = lane.cut()
                {
                    self.send(vec![batch]).await;
                }
            }
        }
    }

    /// Hands a flush to the writer (waiting while it writes the one before).
    async fn send(&self, flush: Vec<Batch>) {
        gauge!(m::IN_FLIGHT_ROWS).increment(rows_of(&flush) as f64);
        let sent = self.output.send(flush).await;
        let_the_writer_start().await;
        if let Err(returned) = sent {
            // The writer is gone (shutdown deadline): release and drop.
            for batch in returned.0 {
                self.in_flight.release(batch.charged_bytes);
                gauge!(m::IN_FLIGHT_ROWS).decrement(batch.rows as f64);
            }
        }
    }
}

/// The wall clock, read once per chunk of events taken in and carried
/// forward on the monotonic clock that times each decode anyway: one clock
/// read per event fewer (reads were 3.2% of weir's CPU samples in a
/// 1-writer drain, four per event in the batcher). Within a chunk it misses
/// only an adjustment of the wall clock, which the next chunk picks up.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    at: Instant,
    micros: i64,
}

impl WallClock {
    fn now() -> Self {
        WallClock {
            at: Instant::now(),
            micros: now_micros(),
        }
    }

    /// Unix microseconds at `instant` (taken after this clock was read).
    fn micros_at(self, instant: Instant) -> i64 {
        let since = instant.saturating_duration_since(self.at).as_micros();
        self.micros
            .saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
    }
}

/// Yields right after handing the writer a flush. tokio runs a task woken
/// by another next on the waker's worker, in a slot other workers cannot
/// steal; without a yield the writer would wait there while the batcher
/// decodes on (a backlog keeps its input ready), until tokio's cooperative
/// budget stops it: 128 chunks, 80 ms of idle writer per flush measured in
/// the bench's drain.
async fn let_the_writer_start() {
    tokio::task::yield_now().await;
}

fn rows_of(flush: &[Batch]) -> usize {
    flush.iter().map(|batch| batch.rows).sum()
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::decode::Gathered;
    use crate::decode::testing::{TENANT, body, decoder, event};

    /// Room in the batcher's input queue.
    const INPUT: usize = 1 << 16;

    #[test]
    fn a_lane_keeps_room_for_its_largest_batch_of_messages() {
        let pool = BufferPool::new(64 << 20);
        let mut lane = Gathering::new(Arc::from("t"), 0, 1, None, pool);
        let mut offset = 0;
        let mut cut_after = |lane: &mut Gathering, messages: usize| {
            for _ in 0..messages {
                lane.messages.push(Event {
                    offset,
                    ..event(&body(&[]), None)
                });
                offset += 1;
            }
            lane.position = Some(offset);
            lane.cut().expect("the lane holds messages")
        };
        let big = cut_after(&mut lane, 1_000);
        assert!(lane.messages.capacity() >= 1_000);
        drop(big);
        // A small batch, then room for the big one's size still.
        let small = cut_after(&mut lane, 10);
        assert_eq!(small.messages.len(), 10);
        assert!(lane.messages.capacity() >= 1_000);
    }

    #[test]
    fn the_wall_clock_is_carried_forward_on_the_monotonic_one() {
        let clock = WallClock::now();
        let later = clock.at + Duration::from_micros(1_500);
        assert_eq!(clock.micros_at(later), clock.micros + 1_500);
        assert_eq!(clock.micros_at(clock.at), clock.micros);
        // Never behind its own reading.
        let earlier = clock
            .at
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(clock.at);
        assert_eq!(clock.micros_at(earlier), clock.micros);
        // And close to the wall clock read separately.
        let apart = (clock.micros_at(Instant::now()) - now_micros()).abs();
        assert!(apart < 1_000_000, "{apart} us apart");
    }

    /// A batcher over the test decoder, fed and drained by the test.
    struct Harness {
        input: mpsc::Sender<LaneEvent>,
        output: mpsc::Receiver<Vec<Batch>>,
        in_flight: Arc<InFlight>,
        topic: Arc<str>,
    }

    impl Harness {
        fn start(max_rows: usize, max_bytes: usize, linger: Duration) -> Harness {
            Harness::with_output(max_rows, max_bytes, linger, 1024)
        }

        /// `start`, with room for `waiting` batches between batcher and
        /// writer (the pipeline has room for one).
        fn with_output(
            max_rows: usize,
            max_bytes: usize,
            linger: Duration,
            waiting: usize,
        ) -> Harness {
            let (input, input_rx) = mpsc::channel(INPUT);
            let (output_tx, output) = mpsc::channel(waiting);
            let in_flight = Arc::new(InFlight::default());
            let batcher = Batcher {
                decoder: Arc::new(decoder()),
                input: input_rx,
                output: output_tx,
                in_flight: in_flight.clone(),
                max_rows,
                max_bytes,
                linger,
                pool: BufferPool::default(),
            };
            tokio::spawn(batcher.run());
            Harness {
                input,
                output,
                in_flight,
                topic: Arc::from("t"),
            }
        }

        async fn assign(&self, epoch: u64, stored: Option<i64>) {
            self.assign_partition(0, epoch, stored).await;
        }

        async fn assign_partition(&self, partition: i32, epoch: u64, stored: Option<i64>) {
            self.send(LaneEvent::Assigned {
                topic: self.topic.clone(),
                partition,
                epoch,
                stored,
            })
            .await;
        }

        /// A one-row webhook at `offset` of partition 0, charged as the
        /// source charges it.
        async fn message(&self, epoch: u64, offset: i64) {
            self.message_to(0, epoch, offset).await;
        }

        async fn message_to(&self, partition: i32, epoch: u64, offset: i64) {
            self.message_read(partition, epoch, offset, false).await;
        }

        /// A message, `behind` the end of its partition or not.
        async fn message_read(&self, partition: i32, epoch: u64, offset: i64, behind: bool) {
            let message = self.lane_message(partition, epoch, offset, behind);
            self.send(message).await;
        }

        /// A one-row message of `partition`, charged to the budget.
        fn lane_message(&self, partition: i32, epoch: u64, offset: i64, behind: bool) -> LaneEvent {
            let now = chrono::Utc::now().timestamp();
            let mut event = event(&body(&[serde_json::json!(now)]), Some(TENANT));
            event.partition = partition;
            event.offset = offset;
            let charged = crate::lane::charge_for(&event);
            self.in_flight.charge(charged);
            LaneEvent::Message {
                epoch,
                event,
                charged,
                behind,
            }
        }

        async fn send(&self, event: LaneEvent) {
            self.input.send(event).await.expect("batcher running");
        }

        /// The next flush, which must hold one batch.
        async fn one(&mut self) -> Batch {
            let mut flush = self.output.recv().await.expect("a flush");
            assert_eq!(flush.len(), 1, "a flush of one lane's batch");
            flush.pop().expect("one batch")
        }

        /// The next flush's one batch, as (prev, next, offsets of its
        /// messages).
        async fn batch(&mut self) -> (Option<i64>, i64, Vec<i64>) {
            let batch = self.one().await;
            let offsets = batch.messages.iter().map(|m| m.offset).collect();
            (batch.prev, batch.next, offsets)
        }

        /// Whether no batch comes within `wait`.
        async fn quiet_for(&mut self, wait: Duration) -> bool {
            tokio::time::timeout(wait, self.output.recv())
                .await
                .is_err()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_cut_at_max_rows_and_the_rest_after_the_linger() {
        let mut h = Harness::start(3, 1 << 20, Duration::from_secs(10));
        h.assign(1, Some(10)).await;
        for offset in 10..17 {
            h.message(1, offset).await;
        }
        assert_eq!(h.batch().await, (Some(10), 13, vec![10, 11, 12]));
        assert_eq!(h.batch().await, (Some(13), 16, vec![13, 14, 15]));
        // The seventh row waits for the linger, counted from when it came.
        assert!(h.quiet_for(Duration::from_secs(9)).await);
        assert_eq!(h.batch().await, (Some(16), 17, vec![16]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_behind_its_partitions_end_does_not_wait_for_the_linger() {
        let mut h = Harness::with_output(1000, 1 << 20, Duration::from_secs(10), 1);
        h.assign(1, Some(0)).await;
        // More is in the partition: the writer is free, so it takes the
        // row at once instead of idling through the linger.
        h.message_read(0, 1, 0, true).await;
        let cut = tokio::time::timeout(Duration::from_millis(1), h.batch()).await;
        assert_eq!(cut.expect("cut at once"), (Some(0), 1, vec![0]));
        // Caught up: the next row waits for the linger to gather company.
        h.message_read(0, 1, 1, false).await;
        assert!(h.quiet_for(Duration::from_secs(9)).await);
        assert_eq!(h.batch().await, (Some(1), 2, vec![1]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_that_read_a_backlog_stays_due_once_it_reaches_the_end() {
        let mut h = Harness::with_output(1000, 1 << 20, Duration::from_secs(10), 1);
        h.assign_partition(0, 1, Some(0)).await;
        h.assign_partition(1, 2, Some(0)).await;
        // The writer is busy: partition 1's batch is cut at once and holds
        // the one place between batcher and writer.
        h.message_read(1, 2, 0, true).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Meanwhile partition 0 is read from a backlog up to its end.
        for offset in 0..3 {
            h.message_read(0, 1, offset, true).await;
        }
        h.message_read(0, 1, 3, false).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let busy = h.one().await;
        assert_eq!(busy.partition, 1);
        // Once the writer is free, the backlog's rows go at once, although
        // the last row read was at the partition's end.
        let cut = tokio::time::timeout(Duration::from_millis(1), h.batch()).await;
        assert_eq!(cut.expect("cut at once"), (Some(0), 4, vec![0, 1, 2, 3]));
        // The next batch holds only rows read at the end: it lingers.
        h.message_read(0, 1, 4, false).await;
        assert!(h.quiet_for(Duration::from_secs(9)).await);
        assert_eq!(h.batch().await, (Some(4), 5, vec![4]));
    }

    /// On tokio's multi-threaded runtime a task woken by another runs next
    /// on that task's worker, in a slot no other worker can steal: a writer
    /// handed a flush would wait there while the batcher decodes on, up to
    /// tokio's cooperative budget (128 chunks of input, tens of ms).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_writer_starts_on_a_flush_before_the_batcher_decodes_on() {
        const BACKLOG: usize = 5000;
        let mut h = Harness::with_output(100_000, 1 << 30, Duration::from_secs(10), 1);
        // Everything runs on the one worker, in tasks: the order is the
        // scheduler's, not a race between threads.
        let taken = tokio::spawn(async move {
            h.assign(1, Some(0)).await;
            // A backlog, queued without yielding (`try_send` spends no
            // cooperative budget).
            for offset in 0..BACKLOG as i64 {
                let message = h.lane_message(0, 1, offset, true);
                h.input.try_send(message).expect("room in the input queue");
            }
            let input = h.input.clone();
            let writer = tokio::spawn(async move {
                let flush = h.output.recv().await.expect("a flush");
                let still_queued = INPUT - input.capacity();
                (rows_of(&flush), still_queued)
            });
            writer.await.expect("writer task")
        });
        let (rows, still_queued) = taken.await.expect("driver task");
        assert!(
            rows < BACKLOG,
            "the backlog was cut before the end ({rows} rows)"
        );
        // When the writer got the flush, the batcher had taken nothing more.
        assert_eq!(rows + still_queued, BACKLOG);
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_lane_keeps_gathering_while_its_writer_is_busy() {
        // Room for one batch, as in the pipeline; the test is the writer.
        let mut h = Harness::with_output(1000, 1 << 20, Duration::from_millis(50), 1);
        h.assign(1, Some(0)).await;
        h.message(1, 0).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        // [0] was cut at its linger and waits: the writer is busy.
        h.message(1, 1).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        // [1] is due, but nothing can take it yet: it goes on gathering.
        h.message(1, 2).await;
        h.message(1, 3).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(h.batch().await, (Some(0), 1, vec![0]));
        // The writer took [0]: the due lane is cut with all it gathered.
        assert_eq!(h.batch().await, (Some(1), 4, vec![1, 2, 3]));
        assert!(h.quiet_for(Duration::from_secs(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_due_when_the_writer_can_take_a_flush_go_in_one() {
        let mut h = Harness::with_output(1000, 1 << 20, Duration::from_millis(50), 1);
        for partition in 0..3 {
            h.assign_partition(partition, 1, Some(0)).await;
        }
        h.message_to(0, 1, 0).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        // [0] of partition 0 was cut at its linger and waits: the writer is
        // busy. Partitions 0 and 1 take rows and fall due meanwhile.
        h.message_to(0, 1, 1).await;
        h.message_to(1, 1, 0).await;
        h.message_to(1, 1, 1).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Partition 2's row is not due yet.
        h.message_to(2, 1, 0).await;
        assert_eq!(h.batch().await, (Some(0), 1, vec![0]));
        // The writer took the first flush: partitions 0 and 1 are due and
        // go in one flush; partition 2 is not due and stays.
        let mut flush = h.output.recv().await.expect("a flush");
        flush.sort_by_key(|batch| batch.partition);
        let cut: Vec<_> = flush
            .iter()
            .map(|b| (b.partition, b.prev, b.next, b.rows))
            .collect();
        assert_eq!(cut, vec![(0, Some(1), 2, 1), (1, Some(0), 2, 2)]);
        let last = h.one().await;
        assert_eq!((last.partition, last.prev, last.next), (2, Some(0), 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_reaching_max_bytes_is_cut_at_once() {
        let mut h = Harness::start(1000, 1, Duration::from_secs(60));
        h.assign(1, None).await;
        h.message(1, 0).await;
        h.message(1, 1).await;
        assert_eq!(h.batch().await, (None, 1, vec![0]));
        assert_eq!(h.batch().await, (Some(1), 2, vec![1]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_charged_its_events_and_the_true_size_of_its_rows() {
        let mut h = Harness::start(2, 1 << 20, Duration::from_secs(60));
        h.assign(1, None).await;
        h.message(1, 0).await;
        h.message(1, 1).await;
        let batch = h.one().await;
        let events: usize = batch.messages.iter().map(Event::size).sum();
        let rows: usize = batch.segments.iter().map(Sealed::len).sum();
        let reserved: usize = batch
            .messages
            .iter()
            .map(crate::lane::reserved_for_rows)
            .sum();
        assert!(
            rows > 0 && rows != reserved,
            "the test needs rows unlike the reservation"
        );
        assert_eq!(
            batch.charged_bytes,
            events + rows,
            "what was reserved for the rows is replaced by their encoded size"
        );
        assert_eq!(h.in_flight.get(), batch.charged_bytes);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_of_an_ended_assignment_are_dropped_and_released() {
        let mut h = Harness::start(1000, 1 << 20, Duration::from_millis(50));
        h.assign(1, Some(0)).await;
        h.message(1, 0).await;
        // Reassigned (a rebalance, or a reload after fencing) at offset 0:
        // what epoch 1 held, and anything still arriving under it, is gone.
        h.assign(2, Some(0)).await;
        h.message(1, 1).await;
        h.message(2, 0).await;
        let batch = h.one().await;
        assert_eq!((batch.epoch, batch.prev, batch.next), (2, Some(0), 1));
        assert_eq!(batch.messages.len(), 1);
        assert_eq!(
            h.in_flight.get(),
            batch.charged_bytes,
            "only the new batch is still charged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_lane_drops_what_it_holds_and_releases_its_budget() {
        let mut h = Harness::start(1000, 1 << 20, Duration::from_secs(60));
        h.assign(1, Some(0)).await;
        h.message(1, 0).await;
        h.message(1, 1).await;
        h.send(LaneEvent::Revoked {
            topic: h.topic.clone(),
            partition: 0,
            epoch: 1,
        })
        .await;
        drop(h.input);
        // Closing the input flushes what lanes hold: nothing is left.
        assert!(h.output.recv().await.is_none());
        assert_eq!(h.in_flight.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_the_input_flushes_what_is_held() {
        let mut h = Harness::start(1000, 1 << 20, Duration::from_secs(60));
        h.assign(1, Some(5)).await;
        h.message(1, 5).await;
        h.message(1, 6).await;
        drop(h.input);
        let flush = h.output.recv().await.expect("flushed");
        let cut: Vec<_> = flush.iter().map(|b| (b.prev, b.next, b.rows)).collect();
        assert_eq!(cut, vec![(Some(5), 7, 2)]);
        assert!(h.output.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_is_carried_and_the_batch_ends_after_its_last_message() {
        let mut h = Harness::start(1000, 1 << 20, Duration::from_millis(50));
        h.assign(1, Some(0)).await;
        h.message(1, 0).await;
        h.message(1, 1).await;
        // Offsets 2 to 4 are missing (compaction, transaction markers).
        h.message(1, 5).await;
        assert_eq!(h.batch().await, (Some(0), 6, vec![0, 1, 5]));
    }

    #[tokio::test(start_paused = true)]
    async fn an_offset_reset_cuts_first_and_then_moves_the_stored_offset_back() {
        let mut h = Harness::start(1000, 1 << 20, Duration::from_millis(50));
        h.assign(1, Some(30)).await;
        h.message(1, 30).await;
        h.message(1, 31).await;
        // The log was recreated: librdkafka restarts at its start.
        h.message(1, 0).await;
        h.message(1, 1).await;
        assert_eq!(h.batch().await, (Some(30), 32, vec![30, 31]));
        // The next batch continues from 32 in PostgreSQL and stores 2.
        assert_eq!(h.batch().await, (Some(32), 2, vec![0, 1]));
    }

    #[test]
    fn the_test_events_are_one_row_each() {
        let decoder = decoder();
        let now = chrono::Utc::now().timestamp();
        let event = event(&body(&[serde_json::json!(now)]), Some(TENANT));
        let mut gathered = Gathered::default();
        decoder.decode(&event, 0, now_micros(), &mut gathered);
        assert_eq!((gathered.rows, gathered.dead_letters.len()), (1, 0));
    }
}
