//! The Kafka side: one consumer-group member, run on its own thread, that
//! feeds every assigned partition ("lane") to the writer that owns it.
//!
//! Positions come from PostgreSQL, not Kafka. When partitions are assigned,
//! their stored offsets are read from the offsets table (inside the
//! rebalance callback) and the partitions are assigned *at* those offsets.
//! Kafka's committed offsets are only a fallback for partitions with no
//! stored offset, and are committed after PostgreSQL commits, for lag tools.
//!
//! Every assignment of a lane gets a new epoch. Messages carry the epoch of
//! the assignment they were read under, so a writer can tell a stale message
//! (read before a revoke or a re-seek) from a current one.
//!
//! Memory is bounded: events taken from Kafka are charged to an in-flight
//! budget until their batch commits. Over the budget every assigned
//! partition is held back; when one writer's queue is full, only that
//! writer's partitions are (a stuck writer does not stall the others). Each
//! partition is read through a queue of its own, so holding it back means
//! not reading it: librdkafka keeps its prefetch and stops fetching when
//! that queue is full (`queued.max.messages.kbytes`, per partition). Pausing
//! would drop the prefetch and refetch it on resume; under a backlog that
//! left writers idle between pause and refetch. Polling the consumer's own
//! queue continues meanwhile, to serve rebalances and heartbeats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;
use tokio_postgres::Client;

use crate::config::{Config, OffsetReset};
use crate::event::Event;
use crate::health::Health;
use crate::metrics as m;
use crate::store::offsets::OffsetStore;

use crate::lane::{InFlight, LaneEvent, Request};

mod arena;
mod lanes;

use lanes::{LaneKey, Lanes};

pub struct WeirContext {
    runtime: tokio::runtime::Handle,
    offsets: OffsetStore,
    database_url: String,
    config: Arc<Config>,
    /// Session used to read stored offsets; reconnected when lost.
    control: tokio::sync::Mutex<Option<Client>>,
    state: Mutex<Lanes>,
    in_flight: Arc<InFlight>,
    health: Arc<Health>,
    /// The consumer itself, to split partition queues off it in the
    /// rebalance callback (weak: the consumer owns this context).
    me: OnceLock<Weak<BaseConsumer<WeirContext>>>,
    /// Each assigned partition's own queue. Lock order: `queues`, then
    /// `state`.
    queues: Mutex<HashMap<LaneKey, PartitionQueue<WeirContext>>>,
}

impl WeirContext {
    fn state(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<LaneKey, PartitionQueue<WeirContext>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads stored offsets of `partitions` of `topic`, retrying briefly.
    /// `None` when PostgreSQL cannot be reached now.
    fn load_stored(&self, topic: &str, partitions: &[i32]) -> Option<HashMap<i32, i64>> {
        for attempt in 0..3u32 {
            let result = self.runtime.block_on(async {
                let mut control = self.control.lock().await;
                if control.as_ref().is_none_or(Client::is_closed) {
                    *control = Some(
                        crate::store::db::connect(
                            &self.database_url,
                            &self.config.postgres,
                            "control",
                        )
                        .await
                        .map_err(|err| err.to_string())?,
                    );
                }
                let client = control.as_ref().expect("control session was just set");
                let loaded = self
                    .offsets
                    .load(client, topic, partitions)
                    .await
                    .map_err(|err| crate::store::db::describe(&err));
                if loaded.is_err() {
                    *control = None;
                }
                loaded
            });
            match result {
                Ok(stored) => return Some(stored),
                Err(err) => {
                    tracing::warn!(topic, attempt, error = %err, "cannot read stored offsets");
                    std::thread::sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        None
    }

    /// Starts lanes for `tpl` (assigned): positions them at their stored
    /// offsets and announces them to their writers.
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let mut by_topic: HashMap<String, Vec<i32>> = HashMap::new();
        for elem in tpl.elements() {
            by_topic
                .entry(elem.topic().to_string())
                .or_default()
                .push(elem.partition());
        }
        let mut announced = Vec::new();
        for (topic, partitions) in &by_topic {
            let stored = self.load_stored(topic, partitions);
            for &partition in partitions {
                let offset = stored.as_ref().and_then(|s| s.get(&partition).copied());
                if let Some(offset) = offset {
                    // PostgreSQL is the source of truth: resume exactly where
                    // the last committed batch ended, whatever Kafka says.
                    if let Err(err) =
                        tpl.set_partition_offset(topic, partition, Offset::Offset(offset))
                    {
                        tracing::error!(topic, partition, error = %err, "cannot position partition");
                    }
                }
                announced.push((topic.clone(), partition, offset));
            }
        }
        // Each new partition gets a queue of its own, split off *before*
        // the assignment starts fetching it. Invariant kept: a partition's
        // messages reach weir through one queue only, so in offset order.
        // (librdkafka forwards a partition's fetch queue to the consumer's
        // queue when fetching starts, unless the application has set its
        // forwarding, which splitting does.) With its own queue, a lane held
        // back by backpressure is simply not read: librdkafka keeps what it
        // prefetched and stops fetching once that queue is full, instead of
        // dropping the prefetch on a pause and fetching it again on resume.
        let mut split = std::collections::HashSet::new();
        if let Some(me) = self.me.get().and_then(Weak::upgrade) {
            let mut queues = self.queues();
            for elem in tpl.elements() {
                let key: LaneKey = (Arc::from(elem.topic()), elem.partition());
                match me.split_partition_queue(elem.topic(), elem.partition()) {
                    Some(queue) => {
                        queues.insert(key.clone(), queue);
                        split.insert(key);
                    }
                    None => tracing::warn!(
                        topic = elem.topic(),
                        partition = elem.partition(),
                        "cannot give a partition a queue of its own; it is read through the \
                         consumer's queue and paused for backpressure"
                    ),
                }
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
            _ => consumer.assign(tpl),
        };
        // Weighing the new lanes asks the brokers for their ends; a slow
        // broker costs the rebalance at most this long (lanes not weighed
        // by then count as empty).
        let weigh_until = Instant::now() + Duration::from_secs(2);
        if let Err(err) = result {
            tracing::error!(error = %err, "assign failed");
            counter!(m::KAFKA_ERRORS, "kind" => "assign").increment(1);
        }
        let mut state = self.state();
        let (mut to_pause, mut to_resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        let protocol = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => "cooperative",
            RebalanceProtocol::Eager => "eager",
            RebalanceProtocol::None => "none",
        };
        // Heaviest first, each to the writer with the least backlog then:
        // a greedy split that keeps the sessions evenly fed.
        let mut announced: Vec<_> = announced
            .into_iter()
            .map(|(topic, partition, stored)| {
                let backlog = backlog_of(consumer, &topic, partition, stored, weigh_until);
                (topic, partition, stored, backlog)
            })
            .collect();
        announced.sort_by_key(|(topic, partition, _, backlog)| {
            (std::cmp::Reverse(*backlog), topic.clone(), *partition)
        });
        for (topic, partition, stored, backlog) in announced {
            let topic = state.arena.name(&topic);
            // Invariant kept: a lane keeps its writer for the whole
            // assignment (one writer commits a partition's batches, in
            // order); only a new assignment places it afresh.
            let writer = state.least_loaded_writer();
            let key = (topic.clone(), partition);
            let (epoch, pause) = state.start(key.clone(), writer, stored, backlog);
            let own_queue = split.contains(&key);
            if own_queue {
                state.read_through_own_queue(&key);
            }
            gauge!(m::PARTITION_WRITER, "topic" => topic.to_string(), "partition" => partition.to_string())
                .set(writer as f64);
            tracing::info!(
                topic = %topic, partition, epoch, stored = ?stored, writer, backlog, protocol,
                "partition assigned"
            );
            // librdkafka keeps an application pause on a partition's handle
            // across unassign and assign: a partition revoked while paused
            // comes back paused, and would never be fetched again if weir
            // had resumed meanwhile. So every assigned partition is set
            // explicitly to what backpressure wants now: paused, or resumed
            // (resuming a partition that is not paused does nothing). A lane
            // with its own queue is never paused in librdkafka: backpressure
            // just does not read it.
            let list = if pause && !own_queue {
                &mut to_pause
            } else {
                &mut to_resume
            };
            let _ = list.add_partition(&topic, partition);
        }
        for (list, pause) in [(&to_pause, true), (&to_resume, false)] {
            if list.count() == 0 {
                continue;
            }
            let applied = if pause {
                consumer.pause(list)
            } else {
                consumer.resume(list)
            };
            if let Err(err) = applied {
                tracing::warn!(error = %err, pause, "cannot set the pause state of new partitions");
            }
        }
        gauge!(m::PAUSED_PARTITIONS).set(state.paused.len() as f64);
        gauge!(m::ASSIGNED_PARTITIONS).set(state.lanes.len() as f64);
        self.health.consumer_joined(true);
        // A new assignment tries stopped partitions again.
        self.health.partition_stopped(None);
    }

    /// Ends lanes for `tpl` (revoked or lost).
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        let mut commits = TopicPartitionList::new();
        {
            let mut state = self.state();
            for elem in tpl.elements() {
                let topic = state.arena.name(elem.topic());
                let key = (topic.clone(), elem.partition());
                // What is still held for the lane is dropped: the next
                // owner reads it again from the stored offset.
                let Some((released, commit)) = state.end(&key) else {
                    continue;
                };
                self.in_flight.release(released);
                // Only what this assignment committed in PostgreSQL, and not
                // after the assignment was lost (its progress is no longer
                // ours to report).
                if let Some(next) = commit
                    && !lost
                {
                    let _ = commits.add_partition_offset(
                        &topic,
                        elem.partition(),
                        Offset::Offset(next),
                    );
                }
                // The lag of a partition given away is its next owner's to
                // report: left as it was, this pod's series would go on
                // exporting a frozen value that dashboards and alerts add up.
                gauge!(m::CONSUMER_LAG, "topic" => topic.to_string(), "partition" => elem.partition().to_string())
                    .set(0.0);
                gauge!(m::PARTITION_WRITER, "topic" => topic.to_string(), "partition" => elem.partition().to_string())
                    .set(-1.0);
                tracing::info!(topic = %topic, partition = elem.partition(), lost, "partition revoked");
            }
            gauge!(m::PAUSED_PARTITIONS).set(state.paused.len() as f64);
            gauge!(m::ASSIGNED_PARTITIONS).set(state.lanes.len() as f64);
        }
        if commits.count() > 0 {
            // Last chance to record progress in Kafka before the partitions
            // move on; PostgreSQL already has it.
            if let Err(err) = consumer.commit(&commits, CommitMode::Sync) {
                tracing::debug!(error = %err, "commit on revoke failed");
            }
        }
        {
            // What a revoked partition's queue still holds is dropped: the
            // next owner reads it again from the stored offset.
            let mut queues = self.queues();
            for elem in tpl.elements() {
                queues.remove(&(Arc::from(elem.topic()), elem.partition()));
            }
        }
        // Leave no application pause behind on a partition that goes away
        // (see `assign`: librdkafka would keep it for the next assignment).
        if let Err(err) = consumer.resume(tpl) {
            tracing::debug!(error = %err, "cannot clear the pause of revoked partitions");
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(err) = result {
            tracing::error!(error = %err, "unassign failed");
        }
    }
}

impl ClientContext for WeirContext {
    fn error(&self, error: KafkaError, reason: &str) {
        counter!(m::KAFKA_ERRORS, "kind" => "client").increment(1);
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.health.kafka_reachable(false);
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }

    fn stats(&self, statistics: Statistics) {
        let up = statistics
            .brokers
            .values()
            .any(|broker| broker.nodeid >= 0 && broker.state == "UP");
        self.health.kafka_reachable(up);
        let mut state = self.state();
        let mut prefetched = 0u64;
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition >= 0 {
                    // Memory weir's in-flight budget does not see: what the
                    // client has fetched ahead (every partition it still
                    // holds a queue for, assigned or on its way out).
                    prefetched += p.fetchq_size;
                }
                if *partition < 0 || p.hi_offset < 0 {
                    continue;
                }
                let Some(lane) = state
                    .lanes
                    .get_mut(&(Arc::from(topic.as_str()), *partition))
                else {
                    continue;
                };
                // Lag behind PostgreSQL: from the end of the partition to the
                // stored offset (or, before the first commit, to the read
                // position).
                let done = lane
                    .stored
                    .or((p.app_offset >= 0).then_some(p.app_offset))
                    .unwrap_or(0);
                let lag = (p.hi_offset - done).max(0);
                lane.backlog = lag as u64;
                gauge!(m::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(lag as f64);
            }
        }
        gauge!(m::KAFKA_PREFETCHED_BYTES).set(prefetched as f64);
    }
}

impl ConsumerContext for WeirContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(base_consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(base_consumer, tpl),
            other => {
                tracing::error!(error = ?other, "rebalance error");
                counter!(m::KAFKA_ERRORS, "kind" => "rebalance").increment(1);
                let _ = base_consumer.unassign();
            }
        }
    }
}

/// The consumer thread's inputs and outputs.
pub struct ConsumerParts {
    pub config: Arc<Config>,
    pub database_url: String,
    pub writers: Vec<Sender<LaneEvent>>,
    pub requests: Receiver<Request>,
    pub in_flight: Arc<InFlight>,
    pub health: Arc<Health>,
    pub shutdown: Arc<AtomicBool>,
    pub runtime: tokio::runtime::Handle,
    pub topics: Vec<String>,
}

/// Builds the librdkafka configuration weir relies on.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.kafka.group_id)
        // Offsets are weir's business: stored in PostgreSQL with the rows,
        // committed to Kafka only afterwards and explicitly.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            match config.kafka.auto_offset_reset {
                OffsetReset::Earliest => "earliest",
                OffsetReset::Latest => "latest",
                OffsetReset::Error => "error",
            },
        )
        .set("statistics.interval.ms", "5000")
        .set("client.id", format!("weir-{}", std::process::id()));
    for (key, value) in &config.kafka.properties {
        client.set(key, value.to_string());
    }
    client
}

/// Runs the consumer until `shutdown` is set and every writer is done.
pub fn run(parts: ConsumerParts) -> Result<(), KafkaError> {
    let ConsumerParts {
        config,
        database_url,
        writers,
        requests,
        in_flight,
        health,
        shutdown,
        runtime,
        topics,
    } = parts;
    let context = WeirContext {
        runtime,
        offsets: OffsetStore::new(&config),
        database_url,
        config: config.clone(),
        control: tokio::sync::Mutex::new(None),
        state: Mutex::new(Lanes::new(
            writers.len(),
            config.pipeline.max_in_flight_bytes,
        )),
        in_flight: in_flight.clone(),
        health: health.clone(),
        me: OnceLock::new(),
        queues: Mutex::new(HashMap::new()),
    };
    let consumer: Arc<BaseConsumer<WeirContext>> =
        Arc::new(client_config(&config).create_with_context(context)?);
    let _ = consumer.context().me.set(Arc::downgrade(&consumer));
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs)?;
    tracing::info!(topics = ?topics, group = %config.kafka.group_id, "consumer subscribed");

    let max_in_flight = config.pipeline.max_in_flight_bytes;
    let poll_time =
        metrics::histogram!(m::STAGE_DURATION, "stage" => m::stage::POLL, "table" => m::ALL_TABLES);
    let commit_interval = Duration::from_millis(config.kafka.commit_interval_ms);
    let mut requests_open = true;
    // Kafka commits run on a thread of their own, synchronously: their
    // duration is measured, and a slow or unreachable coordinator never
    // stalls the poll loop.
    let committer_stop = Arc::new(AtomicBool::new(false));
    let committer = {
        let consumer = consumer.clone();
        let stop = committer_stop.clone();
        std::thread::Builder::new()
            .name("weir-kafka-commit".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(commit_interval);
                    commit_pending(&consumer);
                }
            })
            .map_err(|err| {
                KafkaError::ClientCreation(format!("cannot start the commit thread: {err}"))
            })?
    };

    // Which writers' queues are full, refreshed every iteration (reused: the
    // loop runs once per message).
    let mut blocked = vec![false; writers.len()];
    let mut took = 0usize;
    while !shutdown.load(Ordering::Relaxed) {
        health.consumer_beat();
        serve_requests(&consumer, &requests, &mut requests_open);
        retry_reloads(&consumer);
        deliver_held(&consumer, &writers, &mut blocked);
        let any_blocked = blocked.iter().any(|b| *b);
        apply_backpressure(&consumer, in_flight.get(), max_in_flight, &blocked);
        // The consumer's own queue carries rebalances, errors and the
        // messages of partitions without a queue of their own; waiting on
        // it is also how this loop idles, briefly, since messages arrive on
        // the partitions' queues.
        let timeout = if took > 0 {
            Duration::ZERO
        } else if any_blocked {
            Duration::from_millis(5)
        } else {
            IDLE_POLL
        };
        let polled = Instant::now();
        match consumer.poll(timeout) {
            Some(Ok(message)) => {
                // Time to get a message from librdkafka (wait included).
                poll_time.record(polled.elapsed().as_secs_f64());
                // Rare (partitions without a queue of their own): the
                // watermark is read per message.
                let high = high_watermark(&consumer, message.topic(), message.partition());
                take(&consumer, &message, &writers, &in_flight, high);
            }
            Some(Err(err)) => consume_error(&health, err),
            None => {}
        }
        took = read_lanes(&consumer, &writers, &in_flight, &health, &poll_time);
    }

    // Shutdown: hand nothing more to the writers. Closing their queues tells
    // them to flush what they hold; keep committing to Kafka what they
    // commit to PostgreSQL until they are all done (their request senders
    // dropped) or the grace period ends.
    tracing::info!("consumer stopping");
    health.shutting_down();
    let released = consumer.context().state().drain_held();
    in_flight.release(released);
    drop(writers);
    let deadline =
        Instant::now() + Duration::from_millis(config.pipeline.shutdown_grace_ms + 2_000);
    while requests_open && Instant::now() < deadline {
        serve_requests(&consumer, &requests, &mut requests_open);
        // Keep the group membership healthy meanwhile; messages that arrive
        // are not taken (they stay unconsumed for the next owner).
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
            drop(message);
        }
    }
    // Last commit, once the commit thread is gone (two threads committing
    // could land out of order and move Kafka's offset back).
    committer_stop.store(true, Ordering::Relaxed);
    let _ = committer.join();
    commit_pending(&consumer);
    // The partition queues hold the consumer: drop them first.
    consumer.context().queues().clear();
    consumer.unsubscribe();
    tracing::info!("consumer stopped");
    Ok(())
}

/// Applies writers' requests: remember commits, reload fenced lanes.
fn serve_requests(
    consumer: &BaseConsumer<WeirContext>,
    requests: &Receiver<Request>,
    open: &mut bool,
) {
    loop {
        match requests.try_recv() {
            Ok(Request::Committed {
                topic,
                partition,
                epoch,
                next,
            }) => {
                // Kafka's committed offset only ever follows PostgreSQL's.
                consumer
                    .context()
                    .state()
                    .committed((topic, partition), epoch, next);
            }
            Ok(Request::Reload {
                topic,
                partition,
                epoch,
            }) => reload(consumer, topic, partition, epoch),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                *open = false;
                return;
            }
        }
    }
}

/// A fenced lane: read the stored offset, seek there, restart the lane
/// under a new epoch. Messages of the old epoch still queued are dropped by
/// the writer; librdkafka drops those fetched before the seek.
fn reload(consumer: &BaseConsumer<WeirContext>, topic: Arc<str>, partition: i32, epoch: u64) {
    let ctx = consumer.context();
    let key = (topic.clone(), partition);
    if ctx.state().writer_at(&key, epoch).is_none() {
        // Revoked or already reloaded since: nothing to do.
        return;
    }
    // Invariant: a lane's new epoch starts exactly where librdkafka will
    // fetch next. Its first batch's compare-and-set starts from the stored
    // offset; if librdkafka fetched from anywhere else, the batcher would
    // take the difference for a gap (or a reset) and commit over it. So the
    // new epoch starts only once the stored offset is read and the seek to
    // it has succeeded; until then the lane stays in its fenced epoch, whose
    // batches the writer drops, and the reload is tried again shortly.
    let retry = |why: String| {
        counter!(m::KAFKA_ERRORS, "kind" => "reload").increment(1);
        tracing::warn!(topic = %topic, partition, epoch, error = %why, "lane reload failed; retrying in 1s");
        ctx.state()
            .reloads_due
            .push((key.clone(), epoch, Instant::now() + Duration::from_secs(1)));
    };
    let Some(loaded) = ctx.load_stored(&topic, &[partition]) else {
        retry("cannot read the stored offset".into());
        return;
    };
    let stored = loaded.get(&partition).copied();
    if let Some(offset) = stored
        && let Err(err) = injected_seek_failure(&topic).map_or_else(
            || {
                consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                )
            },
            Err,
        )
    {
        retry(format!("seek to {offset} failed: {err}"));
        return;
    }
    let (new_epoch, released, pause) = {
        let mut state = ctx.state();
        let Some((new_epoch, released, pause)) = state.restart(&key, epoch, stored) else {
            // Revoked meanwhile.
            return;
        };
        // A lane with its own queue is held back by not being read.
        (new_epoch, released, pause && !state.has_own_queue(&key))
    };
    ctx.in_flight.release(released);
    // The pause state backpressure wants for the restarted lane (resuming
    // a partition that is not paused does nothing).
    let mut tpl = TopicPartitionList::new();
    let _ = tpl.add_partition(&topic, partition);
    let applied = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(err) = applied {
        tracing::warn!(topic = %topic, partition, error = %err, "cannot set the pause state of a reloaded lane");
    }
    tracing::info!(topic = %topic, partition, epoch = new_epoch, stored = ?stored, "lane reloaded after fencing");
}

/// A seek librdkafka refuses (the partition is stopping, or its fetcher did
/// not answer within the timeout) is rare and cannot be caused on demand
/// from outside; with the `failpoints` feature, a test makes the reload's
/// seek on `topic` fail through the fail point `reload-seek`.
fn injected_seek_failure(topic: &str) -> Option<KafkaError> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("reload-seek", |arg: Option<String>| {
        (arg.as_deref() == Some(topic))
            .then(|| KafkaError::Seek("injected by the reload-seek fail point".into()))
    });
    let _ = topic;
    None
}

/// How long the consumer waits on its own queue when no partition queue had
/// anything: the most a message waits in an idle consumer before it is read.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// Most messages read from one partition queue in one round, so one busy
/// partition does not keep the others (and the consumer's queue) waiting.
const LANE_ROUND: usize = 512;

/// An error from librdkafka's consumer or a partition queue.
fn consume_error(health: &Health, err: KafkaError) {
    match err {
        KafkaError::PartitionEOF(_) => {}
        err if err.rdkafka_error_code()
            == Some(rdkafka::types::RDKafkaErrorCode::AutoOffsetReset) =>
        {
            // Only with `auto_offset_reset = "error"`: the log no longer
            // holds a partition's position and librdkafka stopped fetching
            // it. Nothing is skipped; an operator decides.
            counter!(m::KAFKA_ERRORS, "kind" => "offset_out_of_range").increment(1);
            tracing::error!(
                error = %err,
                "a partition's position is out of range (topic recreated, log truncated or \
                 records deleted by retention) and kafka.auto_offset_reset = \"error\": it \
                 is not read until an operator moves its stored offset or sets another policy"
            );
            health.partition_stopped(Some(format!(
                "a partition's position is out of range and kafka.auto_offset_reset = \"error\" \
                 stopped it ({err})"
            )));
        }
        err => {
            counter!(m::KAFKA_ERRORS, "kind" => "consume").increment(1);
            tracing::warn!(error = %err, "kafka consume error");
        }
    }
}

/// Reads the partition queues backpressure lets be read, up to
/// [`LANE_ROUND`] messages each, stopping at a writer whose queue fills.
/// Returns the messages taken. Each partition's round that took a message
/// is one sample of the `poll` stage: from its first message to its end
/// (the dequeues, the copies into the arena, the headers).
fn read_lanes(
    consumer: &BaseConsumer<WeirContext>,
    writers: &[Sender<LaneEvent>],
    in_flight: &InFlight,
    health: &Health,
    poll_time: &metrics::Histogram,
) -> usize {
    let ctx = consumer.context();
    let readable = ctx.state().readable();
    if readable.is_empty() {
        return 0;
    }
    let queues = ctx.queues();
    let mut took = 0;
    let mut full = vec![false; writers.len()];
    for (key, writer) in readable {
        let Some(queue) = queues.get(&key) else {
            continue;
        };
        // A writer whose queue is full takes no more this round: what it
        // did not take stays in librdkafka, not in weir.
        full[writer] = full[writer] || !ctx.state().held[writer].is_empty();
        // Read once per round, and only once the round has a message (most
        // rounds of an idle lane have none): after that message was polled
        // it counts the fetch that brought it, and it only grows, so a
        // message before it is behind the partition's end even if more
        // arrived since.
        let mut high = None;
        // The round is timed from its first message to its end: one
        // sample per round, not per message, whose clock reads and
        // histogram pushes cost more than the dequeue they timed.
        let mut round_started = None;
        for _ in 0..LANE_ROUND {
            if full[writer] {
                break;
            }
            match queue.poll(Duration::ZERO) {
                Some(Ok(message)) => {
                    round_started.get_or_insert_with(Instant::now);
                    let high = *high.get_or_insert_with(|| high_watermark(consumer, &key.0, key.1));
                    full[writer] = take(consumer, &message, writers, in_flight, high);
                    took += 1;
                }
                Some(Err(err)) => consume_error(health, err),
                None => break,
            }
        }
        if let Some(started) = round_started {
            poll_time.record(started.elapsed().as_secs_f64());
        }
    }
    took
}

/// A message's headers, packed into `arena`. Read through librdkafka
/// itself: rust-rdkafka's reader unwraps every header name as UTF-8, and a
/// name that is not (Kafka calls names strings, but a client writing raw
/// bytes can send any) panicked the consumer thread, which then read
/// nothing more, and met the same record again after a restart. Names go
/// to [`Headers::pack`](crate::event::Headers::pack) as bytes.
fn headers_of(message: &BorrowedMessage<'_>, arena: &mut arena::Arena) -> crate::event::Headers {
    use rdkafka::bindings as rd;
    let mut native: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message pointer is valid while `message` is borrowed.
    // librdkafka parses the headers on the first call and keeps them with
    // the message, which owns them: `native` lives as long as `message`.
    let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut native) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
        // `_NOENT`: the message has no headers. A header block librdkafka
        // cannot parse (`_BAD_MSG`, from a broken producer: the record's
        // CRC passed) reads as none too, as it did through rust-rdkafka; a
        // column that reads a header then sees it missing.
        return crate::event::Headers::default();
    }
    // SAFETY: `native` is the message's live headers list (above).
    let count = unsafe { rd::rd_kafka_header_cnt(native) };
    let pairs = (0..count).filter_map(|index| {
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let mut value: *const std::ffi::c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: as above; `index` is below the list's count, and the
        // three out-pointers are valid for writes.
        let err =
            unsafe { rd::rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: librdkafka keeps each name NUL-terminated and each value
        // `size` bytes long (NULL for a header without one), both owned by
        // the headers list, so by the message, for the borrow's length.
        let (name, value) = unsafe {
            (
                std::ffi::CStr::from_ptr(name).to_bytes(),
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
            )
        };
        Some((name, value))
    });
    arena.headers(pairs)
}

/// The partition's high watermark as of librdkafka's last fetch response
/// for it (no request to the broker); -1 when none is known yet.
fn high_watermark(consumer: &BaseConsumer<WeirContext>, topic: &str, partition: i32) -> i64 {
    let Ok(topic) = std::ffi::CString::new(topic) else {
        return -1;
    };
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` is borrowed; the
    // topic is a NUL-terminated string that outlives the call; `low` and
    // `high` are valid for writes. librdkafka reads its cached offsets
    // under its own lock. rust-rdkafka wraps only the variant that asks
    // the broker (`fetch_watermarks`), a round trip per call.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        high
    } else {
        -1
    }
}

/// Messages a newly assigned partition holds past `stored` (past its
/// log's start when nothing is stored): its weight when placing it on a
/// writer. 0 when the broker does not answer before `until`.
fn backlog_of(
    consumer: &BaseConsumer<WeirContext>,
    topic: &str,
    partition: i32,
    stored: Option<i64>,
    until: Instant,
) -> u64 {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return 0;
    }
    match consumer.fetch_watermarks(topic, partition, left.min(Duration::from_millis(500))) {
        Ok((low, high)) => (high - stored.unwrap_or(low).max(low)).max(0) as u64,
        Err(err) => {
            tracing::debug!(topic, partition, error = %err, "cannot weigh a new partition");
            0
        }
    }
}

/// Pauses and resumes partitions as backpressure decides (see
/// [`Lanes::backpressure`]).
fn apply_backpressure(
    consumer: &BaseConsumer<WeirContext>,
    in_flight: usize,
    max_in_flight: usize,
    blocked: &[bool],
) {
    let ctx = consumer.context();
    let mut state = ctx.state();
    let Some(change) = state.backpressure(in_flight, max_in_flight, blocked) else {
        return;
    };
    // Lanes with a queue of their own are held back by not being read
    // (`read_lanes` skips them); only the others are paused in librdkafka.
    let (mut to_pause, mut to_resume) = (TopicPartitionList::new(), TopicPartitionList::new());
    for key in change.pause.iter().filter(|key| !state.has_own_queue(key)) {
        let _ = to_pause.add_partition(&key.0, key.1);
    }
    for key in change.resume.iter().filter(|key| !state.has_own_queue(key)) {
        let _ = to_resume.add_partition(&key.0, key.1);
    }
    let over = state.over_budget();
    if !change.pause.is_empty() {
        counter!(m::BACKPRESSURE_PAUSES).increment(1);
        tracing::debug!(
            partitions = change.pause.len(),
            in_flight_bytes = in_flight,
            over_budget = over,
            "partitions paused for backpressure"
        );
    }
    if to_pause.count() > 0
        && let Err(err) = consumer.pause(&to_pause)
    {
        tracing::warn!(error = %err, "cannot pause partitions");
    }
    if !change.resume.is_empty() {
        tracing::debug!(
            partitions = change.resume.len(),
            in_flight_bytes = in_flight,
            "partitions resumed after backpressure"
        );
    }
    if to_resume.count() > 0
        && let Err(err) = consumer.resume(&to_resume)
    {
        tracing::warn!(error = %err, "cannot resume partitions");
    }
    gauge!(m::PAUSED_PARTITIONS).set(state.paused.len() as f64);
}

/// Tries again the reloads that failed and are due.
fn retry_reloads(consumer: &BaseConsumer<WeirContext>) {
    let due: Vec<(LaneKey, u64)> = {
        let mut state = consumer.context().state();
        if state.reloads_due.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = state
            .reloads_due
            .drain(..)
            .partition(|(_, _, at)| *at <= now);
        state.reloads_due = later;
        due.into_iter()
            .map(|(key, epoch, _)| (key, epoch))
            .collect()
    };
    for ((topic, partition), epoch) in due {
        reload(consumer, topic, partition, epoch);
    }
}

fn commit_pending(consumer: &BaseConsumer<WeirContext>) {
    let ctx = consumer.context();
    let mut tpl = TopicPartitionList::new();
    {
        let mut state = ctx.state();
        if state.pending_commits.is_empty() {
            return;
        }
        for ((topic, partition), (_, next)) in state.pending_commits.drain() {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
        }
    }
    let started = Instant::now();
    // Kafka's committed offset trails PostgreSQL's: it never runs ahead of
    // the data, because only offsets already committed there get here.
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => m::stage_time(m::stage::KAFKA_COMMIT, m::ALL_TABLES, started.elapsed()),
        Err(err) => {
            counter!(m::KAFKA_ERRORS, "kind" => "commit").increment(1);
            tracing::debug!(error = %err, "kafka commit failed (progress is safe in PostgreSQL)");
        }
    }
}

/// Hands held events to their writers in order. Sets, per writer, whether
/// its queue is full (the rest of its events stays held). A writer found
/// full stays blocked until its queue is half empty again: pausing and
/// resuming a partition costs librdkafka its prefetch, and resuming as soon
/// as one slot frees would pause again at once (a pause storm that leaves
/// the writer waiting for the refetch).
fn deliver_held(
    consumer: &BaseConsumer<WeirContext>,
    writers: &[Sender<LaneEvent>],
    blocked: &mut [bool],
) {
    let ctx = consumer.context();
    let mut state = ctx.state();
    for (writer, sender) in writers.iter().enumerate() {
        blocked[writer] =
            state.blocked(writer) && sender.capacity() < sender.max_capacity().div_ceil(2);
    }
    for (writer, queue) in state.held.iter_mut().enumerate() {
        while let Some(event) = queue.pop_front() {
            match writers[writer].try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    queue.push_front(event);
                    blocked[writer] = true;
                    break;
                }
                Err(TrySendError::Closed(event)) => {
                    queue.push_front(event);
                    blocked[writer] = true;
                    break;
                }
            }
        }
    }
}

/// Takes one message in: charge it, stamp it with its lane's epoch, hand it
/// to the lane's writer (or hold it, preserving order). Returns whether the
/// message had to be held (its writer's queue is full).
fn take(
    consumer: &BaseConsumer<WeirContext>,
    message: &BorrowedMessage<'_>,
    writers: &[Sender<LaneEvent>],
    in_flight: &InFlight,
    high_watermark: i64,
) -> bool {
    let ctx = consumer.context();
    let mut state = ctx.state();
    let topic = state.arena.name(message.topic());
    let partition = message.partition();
    let Some(lane) = state.lanes.get(&(topic.clone(), partition)) else {
        // Not (or no longer) ours; it will be read by its owner.
        return false;
    };
    let (epoch, writer) = (lane.epoch, lane.writer);
    let event = Event {
        topic,
        partition,
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(|key| state.arena.copy(key)),
        headers: headers_of(message, &mut state.arena),
        payload: state.arena.copy(message.payload().unwrap_or_default()),
    };
    // Charged for its rows too, before they exist: see `charge_for`.
    let charged = crate::lane::charge_for(&event);
    in_flight.charge(charged);
    let lane_event = LaneEvent::Message {
        // More than a read round from the partition's end: a backlog. Live
        // traffic, read as it arrives, stays within a round of the end (a
        // fetch response's worth) and keeps the linger.
        behind: high_watermark - (event.offset + 1) > LANE_ROUND as i64,
        epoch,
        event,
        charged,
    };
    // Behind what is already held for this writer, to keep each lane's order.
    if !state.held[writer].is_empty() {
        state.held[writer].push_back(lane_event);
        return true;
    }
    match writers[writer].try_send(lane_event) {
        Ok(()) => false,
        Err(TrySendError::Full(lane_event)) | Err(TrySendError::Closed(lane_event)) => {
            state.held[writer].push_back(lane_event);
            true
        }
    }
}
