//! `produce`: send generated traffic to Kafka and record what went where.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::manifest::{Delivery, DeliveryLog, Manifest};
use crate::webhooks::{CHAT_TOPIC, Generator, Shape, WEBHOOK_TOPIC};

/// How far ahead of its schedule a paced generator may run before it
/// sleeps (see `produce`).
const PACING_TICK: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// Events to send (redeliveries included).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Events per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Stop after this many seconds even if --count is not reached.
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Seed of the traffic: the same seed and options send the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Tenants (Zipf-distributed).
    #[arg(long, default_value_t = 200)]
    pub companies: usize,
    /// Zipf exponent of tenant popularity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Event times spread over this many days before now (crossing partition boundaries).
    #[arg(long, default_value_t = 40.0)]
    pub spread_days: f64,
    /// Share of late events (1 to 5 days older than the spread), 0..1.
    #[arg(long, default_value_t = 0.01)]
    pub late: f64,
    /// Share of malformed bodies, 0..1.
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Share of webhook bodies delivered twice, 0..1.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Share of outbound chat-message events, 0..1.
    #[arg(long, default_value_t = 0.15)]
    pub chat_share: f64,
    /// Partitions of topics this command creates.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Put this before the topic names (`<prefix>.whatsapp.webhooks`).
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Most records per Kafka batch (librdkafka's `batch.num.messages`); the
    /// producer lingers 5 ms and compresses with lz4, as a gateway would.
    #[arg(long, default_value_t = 10_000)]
    pub batch_messages: u32,
    /// Where the manifest (for verify and report) is written.
    #[arg(long, default_value = "target/loadtest/last")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

struct Deliveries {
    slots: Mutex<Vec<Option<Delivery>>>,
    failed: std::sync::atomic::AtomicU64,
}

struct DeliveryContext(Arc<Deliveries>);

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<(usize, u8)>;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<(usize, u8)>) {
        let (index, topic) = *opaque;
        match result {
            Ok(message) => {
                let mut slots = self.0.slots.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(slot) = slots.get_mut(index) {
                    *slot = Some(Delivery {
                        topic,
                        partition: message.partition(),
                        offset: message.offset(),
                    });
                }
            }
            Err((err, _)) => {
                eprintln!("delivery failed: {err}");
                self.0
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Sends the events; returns the manifest written to `args.out`.
pub fn produce(brokers: &str, args: &ProduceArgs) -> anyhow::Result<Manifest> {
    for value in [args.malformed, args.duplicates, args.chat_share, args.late] {
        if !(0.0..=1.0).contains(&value) {
            bail!("shares must be between 0 and 1");
        }
    }
    let topic = |name: &str| match &args.topic_prefix {
        Some(prefix) => format!("{prefix}.{name}"),
        None => name.to_string(),
    };
    let topics = [topic(WEBHOOK_TOPIC), topic(CHAT_TOPIC)];
    for created in ensure_topics(brokers, &topics, args.partitions)? {
        // On stdout even when quiet: a script learns that the topic's log
        // starts afresh (deploy/local/demo.sh forgets its stale offsets).
        println!("created topic {created}");
    }
    let deliveries = Arc::new(Deliveries {
        slots: Mutex::new(vec![None; args.count as usize]),
        failed: Default::default(),
    });
    let producer: ThreadedProducer<DeliveryContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("batch.num.messages", args.batch_messages.to_string())
        .set("compression.type", "lz4")
        .set("acks", "all")
        // Idempotent, as a gateway should be: a retry after a lost
        // connection (the chaos runner cuts them) never appends a record
        // twice, so every record in the log is one the manifest knows.
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "16000000")
        .set("queue.buffering.max.kbytes", "262144")
        .create_with_context(DeliveryContext(deliveries.clone()))
        .context("kafka producer")?;
    let shape = Shape {
        seed: args.seed,
        companies: args.companies,
        zipf_exponent: args.zipf,
        spread_secs: (args.spread_days * 86_400.0) as i64,
        late_share: args.late,
        malformed_share: args.malformed,
        duplicate_share: args.duplicates,
        chat_share: args.chat_share,
        ..Shape::default()
    };
    // Where the run's records start in each partition.
    let starts = {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("kafka client")?;
        log_ends(&consumer, &topics, Duration::from_secs(30))?
    };
    // A new producer connects, fetches metadata and (idempotent) gets its
    // producer id before it sends anything. Records handed to it meanwhile
    // wait in its queue with their timestamps already set, which reads as
    // latency of whoever consumes them. Connect before the clock starts.
    for topic in &topics {
        producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .with_context(|| format!("metadata of {topic}"))?;
    }
    let mut generator = Generator::new(shape.clone());
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.count)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events {per_sec} {msg}",
        )
        .expect("static template should parse"),
    );
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let deadline = args.duration_secs.map(|s| started + Duration::from_secs(s));
    let mut sent = 0u64;
    let mut malformed: std::collections::BTreeMap<&'static str, u64> = Default::default();
    let mut duplicates = 0u64;
    while sent < args.count {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if args.rate > 0 {
            // Paced in ticks: an event may go up to one tick before its due
            // time, and the generator sleeps only once it is a tick ahead.
            // Sleeping before every event (40 us apart at 25K/s) cost a
            // wake-up each: the generator used 0.52 of a core at 25K
            // events/s, 0.39 to 0.44 paced in ticks, on the machine weir is
            // measured on. The producer's linger batches the same records
            // either way.
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now())
                && wait >= PACING_TICK
            {
                std::thread::sleep(wait);
            }
        }
        let event = generator.next_event();
        if let Some(class) = event.malformed {
            *malformed.entry(class.name()).or_default() += 1;
        }
        duplicates += event.duplicate as u64;
        let topic_index: u8 = if event.topic == WEBHOOK_TOPIC { 0 } else { 1 };
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for (name, value) in &event.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = BaseRecord::with_opaque_to(
            &topics[topic_index as usize],
            Box::new((sent as usize, topic_index)),
        )
        .key(event.key.as_bytes())
        .payload(&event.payload)
        .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((err, _)) => bail!("cannot produce: {err}"),
            }
        }
        sent += 1;
        bar.inc(1);
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the producer")?;
    bar.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let failed = deliveries.failed.load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} events were not delivered");
    }
    let mut slots = deliveries.slots.lock().unwrap_or_else(|p| p.into_inner());
    slots.truncate(sent as usize);
    let mut delivered = Vec::with_capacity(slots.len());
    for (index, slot) in slots.iter().enumerate() {
        delivered.push(slot.with_context(|| format!("no delivery report for event {index}"))?);
    }
    let unknown = offsets_unknown(&delivered);
    if !unknown.is_empty() {
        let found = find_in_log(brokers, &topics, &starts, &shape, &mut delivered, &unknown)?;
        println!(
            "{} deliveries were acknowledged without their offsets (a retry the broker had already appended); found them in the log",
            found
        );
    }
    let mut log = DeliveryLog::create(&args.out)?;
    for delivery in &delivered {
        log.record(*delivery)?;
    }
    log.finish()?;
    let manifest = Manifest {
        version: 1,
        count: sent,
        shape: shape.clone(),
        topic_prefix: args.topic_prefix.clone(),
        rate: args.rate,
        achieved_rate: sent as f64 / elapsed,
        started_at: started_at.to_rfc3339(),
        finished_at: chrono::Utc::now().to_rfc3339(),
    };
    manifest.save(&args.out)?;
    println!(
        "sent {sent} events in {elapsed:.1}s ({:.0}/s): {duplicates} redeliveries, {} malformed{}; manifest in {}",
        sent as f64 / elapsed,
        malformed.values().sum::<u64>(),
        if malformed.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                malformed
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        args.out.display()
    );
    Ok(manifest)
}

/// The log end of every partition of `topics`, asking again for up to
/// `patience` while the broker does not answer.
pub fn log_ends(
    consumer: &BaseConsumer,
    topics: &[String],
    patience: Duration,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let until = Instant::now() + patience;
    let mut ends = HashMap::new();
    for topic in topics {
        let metadata = patiently(until, || {
            consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
        })
        .with_context(|| format!("metadata of {topic}"))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let id = partition.id();
            let (_, high) = patiently(until, || {
                consumer.fetch_watermarks(topic, id, Duration::from_secs(5))
            })
            .with_context(|| format!("end of {topic} [{id}]"))?;
            ends.insert((topic.clone(), id), high);
        }
    }
    Ok(ends)
}

/// `call` until it answers, or its last error once `until` has passed.
fn patiently<T>(
    until: Instant,
    mut call: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    loop {
        match call() {
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(500)),
            answer => return answer,
        }
    }
}

/// Deliveries whose reported offsets are not real. An idempotent producer
/// whose acknowledgement was lost retries the batch; the broker, which had
/// appended it, answers DUPLICATE_SEQUENCE_NUMBER, and librdkafka reports
/// the batch delivered with an invalid base offset: its messages get -1,
/// 0, 1, ... Within a partition an idempotent producer's offsets rise in
/// send order, and a real batch after such a batch starts at least two
/// above the last made-up offset, so the made-up run is exactly: a -1,
/// then each offset one above the one before.
fn offsets_unknown(delivered: &[Delivery]) -> Vec<usize> {
    let mut made_up: HashMap<(u8, i32), i64> = HashMap::new();
    let mut unknown = Vec::new();
    for (index, d) in delivered.iter().enumerate() {
        let key = (d.topic, d.partition);
        let continues = made_up.get(&key).is_some_and(|last| d.offset == last + 1);
        if d.offset < 0 || continues {
            made_up.insert(key, d.offset);
            unknown.push(index);
        } else {
            made_up.remove(&key);
        }
    }
    unknown
}

/// Finds the real offsets of `unknown` deliveries by reading the run's part
/// of their partitions and matching key and payload (the generator makes
/// them again from the seed). Redelivered bodies are identical, so any
/// free record with the same bytes is theirs. Fills in the offsets found;
/// returns how many.
fn find_in_log(
    brokers: &str,
    topics: &[String; 2],
    starts: &HashMap<(String, i32), i64>,
    shape: &Shape,
    delivered: &mut [Delivery],
    unknown: &[usize],
) -> anyhow::Result<usize> {
    let unknown_set: std::collections::HashSet<usize> = unknown.iter().copied().collect();
    let mut generator = Generator::new(shape.clone());
    // (topic, partition) -> (key, payload) -> unknown deliveries, in order.
    type ByBytes = HashMap<(Vec<u8>, Vec<u8>), Vec<usize>>;
    let mut wanted: HashMap<(u8, i32), ByBytes> = HashMap::new();
    let mut claimed: std::collections::HashSet<(u8, i32, i64)> = Default::default();
    for (index, d) in delivered.iter().enumerate() {
        let event = generator.next_event();
        if unknown_set.contains(&index) {
            wanted
                .entry((d.topic, d.partition))
                .or_default()
                .entry((event.key.into_bytes(), event.payload))
                .or_default()
                .push(index);
        } else {
            claimed.insert((d.topic, d.partition, d.offset));
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "weir-loadtest-offsets")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .context("kafka consumer")?;
    let mut found: HashMap<usize, i64> = HashMap::new();
    for ((topic, partition), mut by_bytes) in wanted {
        let name = &topics[topic as usize];
        let start = starts.get(&(name.clone(), partition)).copied().unwrap_or(0);
        let (_, end) = consumer.fetch_watermarks(name, partition, Duration::from_secs(30))?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(name, partition, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut next = start;
        while next < end && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = match message {
                Ok(message) => message,
                Err(KafkaError::PartitionEOF(_)) => break,
                Err(err) => bail!("reading {name} [{partition}]: {err}"),
            };
            next = message.offset() + 1;
            if claimed.contains(&(topic, partition, message.offset())) {
                continue;
            }
            let bytes = (
                message.key().unwrap_or_default().to_vec(),
                message.payload().unwrap_or_default().to_vec(),
            );
            if let Some(indices) = by_bytes.get_mut(&bytes)
                && !indices.is_empty()
            {
                found.insert(indices.remove(0), message.offset());
            }
        }
    }
    let missing = unknown.len() - found.len();
    if missing > 0 {
        bail!("{missing} acknowledged deliveries were not found in the log");
    }
    for (index, offset) in &found {
        delivered[*index].offset = *offset;
    }
    Ok(found.len())
}

/// Creates the topics that do not exist yet; returns those it created.
pub fn ensure_topics(
    brokers: &str,
    topics: &[String],
    partitions: i32,
) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("kafka admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = runtime
        .block_on(admin.create_topics(
            &new_topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .context("creating topics")?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(topic: u8, partition: i32, offset: i64) -> Delivery {
        Delivery {
            topic,
            partition,
            offset,
        }
    }

    #[test]
    fn a_batch_acknowledged_without_offsets_is_told_apart_from_real_ones() {
        // Partition 2: offsets 95, 96, then a batch of 3 reported as -1, 0,
        // 1 (its real offsets are 97..99), then the next real batch at 100.
        // Partition 3, interleaved, is real throughout: 0, 1.
        let delivered = [
            at(0, 2, 95),
            at(0, 3, 0),
            at(0, 2, 96),
            at(0, 2, -1),
            at(0, 3, 1),
            at(0, 2, 0),
            at(0, 2, 1),
            at(0, 2, 100),
            at(1, 2, 0),
        ];
        assert_eq!(offsets_unknown(&delivered), vec![3, 5, 6]);
        // A made-up batch at the very start of a partition: -1, 0, then the
        // real next batch at 2 (its own offsets were 0 and 1).
        let delivered = [at(0, 0, -1), at(0, 0, 0), at(0, 0, 2), at(0, 0, 3)];
        assert_eq!(offsets_unknown(&delivered), vec![0, 1]);
        assert!(offsets_unknown(&[at(0, 0, 0), at(0, 0, 1)]).is_empty());
    }
}
