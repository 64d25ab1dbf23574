//! `reads`: the seeds' read target, "reads of recent data at p99 < 100 ms
//! on tables of 10M+ rows", measured while weir ingests at its max rate.
//!
//! 1. Load: a fresh schema with the shipped DDL (what `weir migrate`
//!    applies), filled with `--rows` `wa_events` rows and the `messages` rows
//!    the same traffic carries. The traffic is the project's generator (200
//!    Zipf-distributed tenants, event times over the last 20 days, 15%
//!    outbound chat messages); weir's own decoder turns it into rows, which
//!    are streamed into the leaf partitions with binary COPY over a few
//!    sessions. Then one round of weir's partition maintenance (the
//!    partitions premade ahead, as a running weir keeps them) and
//!    `VACUUM (ANALYZE)`, the state autovacuum leaves a live table in.
//! 2. Idle baseline: the read queries with nothing else running.
//! 3. weir (2 writers, the shipped mapping of all three tables) drains a
//!    preloaded topic of the same tenants' traffic, event times within the
//!    last 10 minutes, into the same schema: first alone (its rate without
//!    reads), then while `--sessions` sessions run the seeds' read queries
//!    with parameters seen in the loaded data, mostly from its last day.
//!    Every latency is kept and sorted: the percentiles are exact.
//! 4. The results are printed and appended to `loadtest/RESULTS.md`; the
//!    schema, the topics and the scratch files are removed unless `--keep`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;
use weir::copy::segment::{Sealed, send_copy};
use weir::event::Headers;

use crate::bench::{Bench, append_results, free_port, machine, terminate};
use crate::produce::{ProduceArgs, produce};
use crate::webhooks::{CHAT_TOPIC, Generator, Produced, Shape, WEBHOOK_TOPIC};

#[derive(Debug, Clone, clap::Args)]
pub struct ReadsArgs {
    /// wa_events rows to load (the same traffic adds about half as many messages rows).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    /// Seconds of reads while weir ingests.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub secs: u64,
    /// Seconds of weir ingesting without reads, just before them: its rate
    /// without reads (0: not measured).
    #[arg(long, default_value_t = 15)]
    pub baseline_secs: u64,
    /// Seconds of reads before weir starts, with nothing else running (0: none).
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Seconds weir runs before anything is measured.
    #[arg(long, default_value_t = 5)]
    pub warmup_secs: u64,
    /// Concurrent read sessions.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub sessions: u32,
    /// Pause of each read session between two of its queries, in ms (0: back to back).
    #[arg(long, default_value_t = 10)]
    pub pause_ms: u64,
    /// Webhook bodies and chat messages preloaded into the topic weir drains
    /// (0: 30,000 per second of warm-up, baseline and reads, more than weir
    /// takes on this machine; the run says if weir ran out).
    #[arg(long, default_value_t = 0)]
    pub preload: u64,
    /// Partitions of the Kafka topics.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: i32,
    /// Sessions loading the rows.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub load_sessions: u32,
    /// weir writes without the dedupe keys (the direct COPY path `bench`
    /// measures) instead of the shipped configuration's INSERT ... ON CONFLICT.
    #[arg(long)]
    pub direct: bool,
    /// Where the results are recorded (appended as a new section).
    #[arg(long, default_value = "loadtest/RESULTS.md")]
    pub results: PathBuf,
    /// The weir binary that ingests.
    #[arg(long, default_value = "target/release/weir")]
    pub weir: PathBuf,
    /// Scratch directory (weir's config and log, the preload manifest).
    #[arg(long, default_value = "/tmp/weir-reads")]
    pub work_dir: PathBuf,
    /// Keep the schema, the topics and the scratch directory afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// Seed of the loaded traffic; the preloaded topic uses it too, so both
/// have the same tenants (companies derive from the seed alone).
const SEED: u64 = 5150;
/// Bodies the generator and decoder hand over at once (about 27,000 rows).
const CHUNK_EVENTS: usize = 12_000;
/// Read parameters come from this last stretch of the loaded data...
const RECENT_SECS: i64 = 86_400;
/// ...this often (dashboards look at what just happened); otherwise from
/// anywhere in it.
const RECENT_SHARE: f64 = 0.9;
/// Parameters kept per kind and stretch (uniform reservoir samples).
const RESERVOIR: usize = 4096;
/// Event times of the preloaded (live) traffic: the last 10 minutes.
const LIVE_SPREAD_SECS: f64 = 600.0;
/// Bodies preloaded per second of the run when `--preload` is 0.
const PRELOAD_PER_SEC: u64 = 30_000;
/// A partition this small (8 MiB) may be read whole rather than through
/// its index, as the planner judges.
const SMALL_PAGES: i32 = 1024;
/// The read target, ms.
const TARGET_P99_MS: f64 = 100.0;
/// Rows the target is about.
const TARGET_ROWS: u64 = 10_000_000;

fn load_shape(now_secs: i64) -> Shape {
    Shape {
        seed: SEED,
        spread_secs: 20 * 86_400,
        malformed_share: 0.0,
        duplicate_share: 0.0,
        now_secs,
        ..Shape::default()
    }
}

/// The seeds' read queries (seed 000 gives the messages one: LIMIT 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    Company,
    Phone,
    Failed,
    Conversation,
}

impl Query {
    const ALL: [Query; 4] = [
        Query::Company,
        Query::Phone,
        Query::Failed,
        Query::Conversation,
    ];

    fn label(self) -> &'static str {
        match self {
            Query::Company => "a company's recent events",
            Query::Phone => "a customer's history by phone",
            Query::Failed => "failed statuses per company",
            Query::Conversation => "a conversation's messages",
        }
    }

    /// The index the query is meant to use.
    fn index(self) -> &'static str {
        match self {
            Query::Company => "wa_events_company_created_idx",
            Query::Phone => "wa_events_from_created_idx",
            Query::Failed => "wa_events_failed_idx",
            Query::Conversation => "messages_conversation_created_idx",
        }
    }

    fn sql(self, schema: &str) -> String {
        let s = quote(schema);
        match self {
            Query::Company => format!(
                "SELECT * FROM {s}.wa_events WHERE company_id = $1 ORDER BY created_at DESC LIMIT 50"
            ),
            Query::Phone => format!(
                "SELECT * FROM {s}.wa_events WHERE from_number = $1 ORDER BY created_at DESC LIMIT 50"
            ),
            Query::Failed => format!(
                "SELECT * FROM {s}.wa_events WHERE company_id = $1 AND event_type = 'failed' ORDER BY created_at DESC LIMIT 50"
            ),
            Query::Conversation => format!(
                "SELECT * FROM {s}.messages WHERE conversation_id = $1 ORDER BY created_at DESC LIMIT 100"
            ),
        }
    }

    /// The query as the results show it (`<schema>.` left out).
    fn shown(self) -> String {
        self.sql("").replace("\"\".", "")
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A read parameter.
#[derive(Debug, Clone)]
enum Param {
    Uuid(Uuid),
    Text(String),
}

impl Param {
    fn typed(&self) -> (&(dyn ToSql + Sync), Type) {
        match self {
            Param::Uuid(value) => (value, Type::UUID),
            Param::Text(value) => (value, Type::TEXT),
        }
    }
}

/// A uniform sample of what was offered (Algorithm R).
#[derive(Debug, Default)]
struct Reservoir {
    items: Vec<Param>,
    seen: u64,
}

impl Reservoir {
    /// Where the next offered item goes, if it is kept.
    fn slot(&mut self, rng: &mut SmallRng) -> Option<usize> {
        self.seen += 1;
        if self.items.len() < RESERVOIR {
            return Some(self.items.len());
        }
        let j = rng.random_range(0..self.seen) as usize;
        (j < RESERVOIR).then_some(j)
    }

    fn put(&mut self, slot: usize, item: Param) {
        if slot == self.items.len() {
            self.items.push(item);
        } else {
            self.items[slot] = item;
        }
    }
}

/// Parameters of one kind: from the last day of the data and from all of it.
#[derive(Debug, Default)]
struct Pool {
    recent: Reservoir,
    any: Reservoir,
}

impl Pool {
    /// Offers an item of an event (made only if a reservoir keeps it).
    fn offer(&mut self, recent: bool, rng: &mut SmallRng, make: impl Fn() -> Option<Param>) {
        let mut made: Option<Option<Param>> = None;
        let mut get = || made.get_or_insert_with(&make).clone();
        if let Some(slot) = self.any.slot(rng)
            && let Some(item) = get()
        {
            self.any.put(slot, item);
        }
        if recent
            && let Some(slot) = self.recent.slot(rng)
            && let Some(item) = get()
        {
            self.recent.put(slot, item);
        }
    }

    /// The item sampled most often from the last day (else from all).
    fn most_common(&self) -> Option<&Param> {
        let from = if self.recent.items.is_empty() {
            &self.any
        } else {
            &self.recent
        };
        let mut counts: BTreeMap<String, (usize, &Param)> = BTreeMap::new();
        for item in &from.items {
            counts.entry(format!("{item:?}")).or_insert((0, item)).0 += 1;
        }
        counts
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, item)| item)
    }

    fn pick(&self, rng: &mut SmallRng) -> Option<&Param> {
        let from = if !self.recent.items.is_empty()
            && (self.any.items.is_empty() || rng.random::<f64>() < RECENT_SHARE)
        {
            &self.recent
        } else {
            &self.any
        };
        if from.items.is_empty() {
            return None;
        }
        from.items.get(rng.random_range(0..from.items.len()))
    }
}

/// Read parameters seen in the loaded traffic.
#[derive(Debug, Default)]
struct Pools {
    companies: Pool,
    phones: Pool,
    conversations: Pool,
}

impl Pools {
    fn pool(&self, query: Query) -> &Pool {
        match query {
            Query::Company | Query::Failed => &self.companies,
            Query::Phone => &self.phones,
            Query::Conversation => &self.conversations,
        }
    }
}

/// Collects read parameters from the generated traffic, weighted as the
/// traffic is: a busy tenant is drawn as often as it has events.
struct Sampler {
    rng: SmallRng,
    pools: Pools,
    recent_after: i64,
}

impl Sampler {
    fn observe(&mut self, produced: &Produced) {
        let Some(time) = event_time(produced) else {
            return;
        };
        let recent = time >= self.recent_after;
        let header = |name: &str| {
            produced
                .headers
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.as_str())
        };
        let rng = &mut self.rng;
        if let Some(company) = header("company_id").and_then(|c| Uuid::parse_str(c).ok()) {
            self.pools
                .companies
                .offer(recent, rng, || Some(Param::Uuid(company)));
        }
        if produced.rows.iter().any(|r| r.table == "messages") {
            // Inbound messages carry the CRM conversation in a header,
            // outbound ones are keyed by it.
            let conversation = if produced.topic == WEBHOOK_TOPIC {
                header("conversation_id")
            } else {
                Some(produced.key.as_str())
            };
            if let Some(conversation) = conversation.and_then(|c| Uuid::parse_str(c).ok()) {
                self.pools
                    .conversations
                    .offer(recent, rng, || Some(Param::Uuid(conversation)));
            }
        }
        if produced.rows.iter().any(|r| r.table == "wa_events") {
            self.pools.phones.offer(recent, rng, || {
                customer_number(&produced.payload).map(Param::Text)
            });
        }
    }
}

/// The event time of a generated event's rows (webhook_logs rows carry
/// the delivery time instead).
fn event_time(produced: &Produced) -> Option<i64> {
    produced
        .rows
        .iter()
        .filter(|r| r.table != "webhook_logs")
        .map(|r| r.time)
        .max()
}

/// wa_events.from_number of a webhook body: the sender of its messages or
/// the recipient of its statuses.
fn customer_number(payload: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(payload).ok()?;
    let value = &body["entry"][0]["changes"][0]["value"];
    value["messages"][0]["from"]
        .as_str()
        .or_else(|| value["statuses"][0]["recipient_id"].as_str())
        .map(str::to_string)
}

/// What the generator side of the load produced.
struct Generated {
    sampler: Sampler,
    events: u64,
    /// Rows the traffic should make, per table.
    expected: BTreeMap<String, u64>,
}

/// Generates events until `target` wa_events rows, decodes them with weir's
/// decoder in chunks and hands the rows over, segment by segment.
fn generate(
    decoder: weir::decode::Decoder,
    prefix: &str,
    shape: Shape,
    target: u64,
    rows: mpsc::Sender<Vec<Sealed>>,
) -> anyhow::Result<Generated> {
    let topic = |name: &str| -> Arc<str> { Arc::from(format!("{prefix}.{name}").as_str()) };
    let (webhooks, chat) = (topic(WEBHOOK_TOPIC), topic(CHAT_TOPIC));
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut sampler = Sampler {
        rng: SmallRng::seed_from_u64(SEED ^ 0x5eed),
        pools: Pools::default(),
        recent_after: shape.now_secs - RECENT_SECS,
    };
    let mut generator = Generator::new(shape);
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = 0u64;
    while expected.get("wa_events").copied().unwrap_or(0) < target {
        let mut gathered = weir::decode::Gathered::default();
        for message in 0..CHUNK_EVENTS {
            if expected.get("wa_events").copied().unwrap_or(0) >= target {
                break;
            }
            let produced = generator.next_event();
            for row in produced.rows.iter().filter(|r| r.table != "webhook_logs") {
                *expected.entry(row.table.to_string()).or_default() += 1;
            }
            sampler.observe(&produced);
            // Appended to Kafka 0.2 to 2 s after the event happened.
            let appended = event_time(&produced).unwrap_or(0) * 1000 + 200 + (events % 1800) as i64;
            let event = weir::event::Event {
                topic: if produced.topic == WEBHOOK_TOPIC {
                    webhooks.clone()
                } else {
                    chat.clone()
                },
                partition: 0,
                offset: events as i64,
                timestamp_ms: Some(appended.min(now_ms)),
                key: Some(Bytes::from(produced.key)),
                headers: Headers::from_pairs(
                    produced
                        .headers
                        .iter()
                        .map(|(k, v)| (*k, Some(v.as_bytes()))),
                ),
                payload: Bytes::from(produced.payload),
            };
            decoder.decode(&event, message as u32, now_ms * 1000, &mut gathered);
            events += 1;
        }
        anyhow::ensure!(
            gathered.dead_letters.is_empty(),
            "the loaded traffic made dead letters: {:?}",
            gathered.dead_letters.first()
        );
        let sealed = gathered.segments.into_iter().map(|s| s.seal()).collect();
        if rows.blocking_send(sealed).is_err() {
            bail!("the load stopped");
        }
    }
    Ok(Generated {
        sampler,
        events,
        expected,
    })
}

/// One COPY of a load session.
struct CopyJob {
    table: String,
    sql: String,
    rows: Sealed,
}

/// A load session: each job is one COPY ... FROM STDIN (FORMAT binary) of
/// a segment into its leaf partition, in its own transaction.
async fn copy_session(
    mut session: Client,
    mut jobs: mpsc::Receiver<CopyJob>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    session
        .batch_execute("SET synchronous_commit = off")
        .await?;
    let mut copied: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(job) = jobs.recv().await {
        let expected = job.rows.rows.len() as u64;
        let transaction = session.transaction().await?;
        let statement = transaction.prepare(&job.sql).await?;
        let whole = 0..job.rows.len();
        let chunks = job.rows.copy_stream(std::slice::from_ref(&whole));
        let rows = send_copy(&transaction, &statement, chunks)
            .await
            .with_context(|| job.sql.clone())?;
        transaction.commit().await?;
        anyhow::ensure!(
            rows == expected,
            "COPY loaded {rows} rows, expected {expected}"
        );
        *copied.entry(job.table).or_default() += rows;
    }
    Ok(copied)
}

/// What the load put in the tables.
struct Loaded {
    events: u64,
    rows: BTreeMap<String, u64>,
    seconds: f64,
    maintenance_seconds: f64,
    vacuum_seconds: f64,
}

impl Loaded {
    fn total(&self) -> u64 {
        self.rows.values().sum()
    }
}

/// One read: which query, how long to the last row, how many rows.
#[derive(Debug, Clone, Copy)]
struct Sample {
    query: usize,
    ms: f64,
    rows: usize,
}

/// Percentiles of one query's latencies (nearest rank over every sample).
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    runs: usize,
    p50: f64,
    p99: f64,
    max: f64,
    rows: f64,
}

fn summarize(samples: &[Sample], query: Option<usize>) -> Summary {
    let mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| query.is_none_or(|q| s.query == q))
        .collect();
    let mut ms: Vec<f64> = mine.iter().map(|s| s.ms).collect();
    if ms.is_empty() {
        return Summary::default();
    }
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let rank = |p: f64| ms[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Summary {
        runs: n,
        p50: rank(0.50),
        p99: rank(0.99),
        max: ms[n - 1],
        rows: mine.iter().map(|s| s.rows as f64).sum::<f64>() / n as f64,
    }
}

/// A read window: every sample, its length and how busy the machine was.
struct Reads {
    samples: Vec<Sample>,
    seconds: f64,
    cpu_busy: f64,
}

impl Reads {
    fn summary(&self, query: Option<Query>) -> Summary {
        summarize(&self.samples, query.map(|q| q as usize))
    }

    fn table(&self) -> String {
        let mut s = String::from(
            "| query | runs | p50 ms | p99 ms | max ms | rows returned (avg) |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for query in Query::ALL {
            let m = self.summary(Some(query));
            let _ = writeln!(
                s,
                "| {} (`{}`) | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
                query.label(),
                query.index(),
                m.runs,
                m.p50,
                m.p99,
                m.max,
                m.rows
            );
        }
        let m = self.summary(None);
        let _ = writeln!(
            s,
            "| all four | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
            m.runs, m.p50, m.p99, m.max, m.rows
        );
        s
    }

    fn per_second(&self) -> f64 {
        self.samples.len() as f64 / self.seconds.max(1e-9)
    }
}

/// Busy and total jiffies of the machine (/proc/stat).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn cpu_busy_since(before: (u64, u64)) -> f64 {
    let after = cpu_jiffies();
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
}

/// The read sessions run the four queries in turn (each session starting
/// at a different one) for `secs`, with fresh parameters every time.
async fn read_window(
    readers: Vec<Client>,
    sqls: &Arc<Vec<String>>,
    pools: &Arc<Pools>,
    pause: Duration,
    secs: u64,
    seed: u64,
) -> anyhow::Result<(Vec<Client>, Reads)> {
    let cpu_before = cpu_jiffies();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = JoinSet::new();
    for (index, client) in readers.into_iter().enumerate() {
        let (sqls, pools) = (sqls.clone(), pools.clone());
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed + index as u64);
            let mut samples = Vec::new();
            let mut turn = index;
            while Instant::now() < deadline {
                let query = turn % Query::ALL.len();
                turn += 1;
                let Some(param) = pools.pool(Query::ALL[query]).pick(&mut rng) else {
                    continue;
                };
                let start = Instant::now();
                let rows = client
                    .query_typed(&sqls[query], &[param.typed()])
                    .await
                    .with_context(|| sqls[query].clone())?;
                samples.push(Sample {
                    query,
                    ms: start.elapsed().as_secs_f64() * 1000.0,
                    rows: rows.len(),
                });
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Ok::<_, anyhow::Error>((client, samples))
        });
    }
    let mut readers = Vec::new();
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (client, mine) = done??;
        readers.push(client);
        samples.extend(mine);
    }
    anyhow::ensure!(
        !samples.is_empty(),
        "no read parameters: nothing was loaded"
    );
    Ok((
        readers,
        Reads {
            samples,
            seconds: started.elapsed().as_secs_f64(),
            cpu_busy: cpu_busy_since(cpu_before),
        },
    ))
}

/// weir's counters at one moment.
struct Snapshot {
    at: Instant,
    cpu: (u64, u64),
    metrics: String,
}

/// weir's ingest between two snapshots.
struct Ingest {
    seconds: f64,
    /// Rows committed per table.
    rows: BTreeMap<String, f64>,
    cpu_busy: f64,
}

impl Ingest {
    fn between(before: &Snapshot, after: &Snapshot) -> Ingest {
        let mut rows = BTreeMap::new();
        for table in ["wa_events", "messages", "webhook_logs"] {
            let fragment = format!("table=\"{table}\"");
            let delta = written(&after.metrics, &fragment) - written(&before.metrics, &fragment);
            rows.insert(table.to_string(), delta);
        }
        Ingest {
            seconds: after.at.duration_since(before.at).as_secs_f64(),
            rows,
            cpu_busy: (after.cpu.0 - before.cpu.0) as f64
                / (after.cpu.1 - before.cpu.1).max(1) as f64,
        }
    }

    fn rate(&self, table: Option<&str>) -> f64 {
        let rows: f64 = match table {
            Some(table) => self.rows.get(table).copied().unwrap_or(0.0),
            None => self.rows.values().sum(),
        };
        rows / self.seconds.max(1e-9)
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} rows/s (wa_events {:.0}, messages {:.0}, webhook_logs {:.0}) over {:.1} s, machine CPU {:.0}% busy",
            self.rate(None),
            self.rate(Some("wa_events")),
            self.rate(Some("messages")),
            self.rate(Some("webhook_logs")),
            self.seconds,
            self.cpu_busy * 100.0
        )
    }
}

fn written(metrics: &str, fragment: &str) -> f64 {
    crate::report::metric_sum(metrics, "weir_rows_written_total", fragment)
}

async fn snapshot(http: u16) -> anyhow::Result<Snapshot> {
    let metrics = crate::report::fetch(&format!("http://127.0.0.1:{http}/metrics")).await?;
    Ok(Snapshot {
        at: Instant::now(),
        cpu: cpu_jiffies(),
        metrics,
    })
}

/// weir running; stopped (SIGTERM, SIGKILL after a minute) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = terminate(&mut self.0);
    }
}

/// The shipped configuration for this run: `tables` of it, pointed at the
/// run's schema and topics (without dedupe keys when `direct`).
pub(crate) fn config_for(
    url: &str,
    brokers: &str,
    schema: &str,
    prefix: &str,
    tables: &[&str],
    direct: bool,
) -> anyhow::Result<(String, weir::config::Config)> {
    let shipped =
        std::fs::read_to_string("config/weir.toml").context("run from the repository root")?;
    let mut table: toml::Table = toml::from_str(&shipped)?;
    let entries = table["tables"].as_array_mut().context("tables")?;
    entries.retain(|t| {
        t["name"]
            .as_str()
            .is_some_and(|name| tables.contains(&name))
    });
    for entry in entries.iter_mut() {
        let entry = entry.as_table_mut().context("table")?;
        if direct {
            entry.remove("dedupe_key");
        }
        for source in entry["sources"].as_array_mut().context("sources")? {
            let topics: Vec<toml::Value> = source["topics"]
                .as_array()
                .context("topics")?
                .iter()
                .map(|t| {
                    toml::Value::String(format!("{prefix}.{}", t.as_str().unwrap_or_default()))
                })
                .collect();
            source["topics"] = toml::Value::Array(topics);
        }
    }
    table["postgres"]
        .as_table_mut()
        .context("postgres")?
        .insert("schema".into(), schema.into());
    table["kafka"]
        .as_table_mut()
        .context("kafka")?
        .insert("brokers".into(), brokers.into());
    let text = toml::to_string(&table)?;
    let mut env = weir::config::process_env();
    env.retain(|(k, _)| k.starts_with("WEIR_KAFKA__PROPERTIES__"));
    env.push(("WEIR_DATABASE_URL".into(), url.into()));
    let config = weir::config::Config::from_toml(&text, &env)?;
    Ok((text, config))
}

/// Everything one run needs.
struct Run<'a> {
    args: &'a ReadsArgs,
    id: String,
    url: String,
    brokers: String,
    schema: String,
    prefix: String,
    run_text: String,
    run_config: weir::config::Config,
    load_config: weir::config::Config,
}

/// Table sizes at the end of the reads.
struct Sizes {
    partitions: i64,
    bytes: i64,
}

pub async fn reads(brokers: &str, args: &ReadsArgs) -> anyhow::Result<()> {
    let url = crate::database_url()?;
    anyhow::ensure!(
        args.weir.exists(),
        "{} not found: cargo build --release -p weir",
        args.weir.display()
    );
    let id = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let schema = format!("reads_{id}");
    let prefix = format!("reads{id}");
    let all_tables = ["wa_events", "messages", "webhook_logs"];
    let (run_text, run_config) =
        config_for(&url, brokers, &schema, &prefix, &all_tables, args.direct)?;
    // The load writes the two tables the reads read (webhook_logs is not read).
    let (_, load_config) = config_for(
        &url,
        brokers,
        &schema,
        &prefix,
        &["wa_events", "messages"],
        false,
    )?;
    let run = Run {
        args,
        id,
        url,
        brokers: brokers.to_string(),
        schema,
        prefix,
        run_text,
        run_config,
        load_config,
    };
    std::fs::create_dir_all(&args.work_dir)?;
    let client = crate::connect(&run.url).await?;
    client
        .batch_execute(&format!("CREATE SCHEMA {}", quote(&run.schema)))
        .await?;
    let outcome = run.measure(&client).await;
    if args.keep {
        println!(
            "kept: schema {}, topics {}.*, {}",
            run.schema,
            run.prefix,
            args.work_dir.display()
        );
        return outcome;
    }
    let cleaned = run.clean_up(&client).await;
    match (outcome, cleaned) {
        (Err(err), Err(clean)) => {
            eprintln!("weir-loadtest: cleaning up after the failure: {clean:#}");
            Err(err)
        }
        (Err(err), Ok(())) => Err(err),
        (Ok(()), cleaned) => cleaned,
    }
}

impl Run<'_> {
    async fn measure(&self, client: &Client) -> anyhow::Result<()> {
        let args = self.args;
        let mut admin =
            weir::store::db::connect(&self.url, &self.run_config.postgres, "reads").await?;
        weir::store::schema::migrate(&mut admin, &self.run_config, false)
            .await
            .context("migrate the reads schema")?;
        println!(
            "reads {}: loading {} wa_events rows into schema {} ({} sessions)",
            self.id, args.rows, self.schema, args.load_sessions
        );

        // 1. The data.
        let (loaded, pools) = self.load(&mut admin, client).await?;
        let wa_loaded = loaded.rows.get("wa_events").copied().unwrap_or(0);
        let pools = Arc::new(pools);
        let sqls: Arc<Vec<String>> =
            Arc::new(Query::ALL.iter().map(|q| q.sql(&self.schema)).collect());
        let plans = self.explain(client, &pools).await?;
        for line in &plans {
            println!("plan: {line}");
        }
        let mut readers = Vec::new();
        let mut rng = SmallRng::seed_from_u64(SEED + 4);
        for _ in 0..args.sessions {
            let reader = crate::connect(&self.url).await?;
            // One unrecorded run of each query: the session has the tables'
            // catalog entries cached, as a pooled application session does.
            for query in Query::ALL {
                if let Some(param) = pools.pool(query).pick(&mut rng) {
                    reader
                        .query_typed(&sqls[query as usize], &[param.typed()])
                        .await?;
                }
            }
            readers.push(reader);
        }
        let pause = Duration::from_millis(args.pause_ms);

        // 2. Reads with nothing else running.
        let idle = if args.idle_secs > 0 {
            let (back, reads) =
                read_window(readers, &sqls, &pools, pause, args.idle_secs, SEED + 1).await?;
            readers = back;
            println!(
                "idle reads: {} queries in {:.1} s, p99 {:.2} ms",
                reads.samples.len(),
                reads.seconds,
                reads.summary(None).p99
            );
            Some(reads)
        } else {
            None
        };

        // 3. weir drains a preloaded topic, without and then with reads.
        let preload = if args.preload > 0 {
            args.preload
        } else {
            PRELOAD_PER_SEC * (args.warmup_secs + args.baseline_secs + args.secs)
        };
        println!("preloading {preload} events into {}.*...", self.prefix);
        let shape = load_shape(0);
        let produce_args = ProduceArgs {
            count: preload,
            rate: 0,
            duration_secs: None,
            seed: SEED,
            companies: shape.companies,
            zipf: shape.zipf_exponent,
            spread_days: LIVE_SPREAD_SECS / 86_400.0,
            late: 0.0,
            malformed: 0.0,
            duplicates: 0.0,
            chat_share: shape.chat_share,
            partitions: args.partitions,
            topic_prefix: Some(self.prefix.clone()),
            batch_messages: 10_000,
            out: args.work_dir.join(format!("preload-{}", self.id)),
            quiet: true,
        };
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || produce(&brokers, &produce_args)).await??;

        let http = free_port()?;
        let mut ingesting = Running(self.spawn_weir(http)?);
        Bench::wait_ready(http).await?;
        tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
        let start = snapshot(http).await?;
        let alone = if args.baseline_secs > 0 {
            tokio::time::sleep(Duration::from_secs(args.baseline_secs)).await;
            let end = snapshot(http).await?;
            let ingest = Ingest::between(&start, &end);
            println!("weir alone: {}", ingest.describe());
            Some(ingest)
        } else {
            None
        };
        let before = snapshot(http).await?;
        let (readers, reads) =
            read_window(readers, &sqls, &pools, pause, args.secs, SEED + 2).await?;
        let after = snapshot(http).await?;
        drop(readers);
        if let Some(status) = ingesting.0.try_wait()? {
            bail!(
                "weir exited during the reads ({status}): see {}",
                self.log_path().display()
            );
        }
        let during = Ingest::between(&before, &after);
        println!("weir during the reads: {}", during.describe());
        let taken = crate::report::metric_sum(&after.metrics, "weir_events_total", "");
        let dead_letters = crate::report::metric_sum(&after.metrics, "weir_dead_letters_total", "");
        let backlog = taken < preload as f64;
        let written_total: BTreeMap<String, f64> = ["wa_events", "messages"]
            .iter()
            .map(|t| {
                (
                    t.to_string(),
                    written(&after.metrics, &format!("table=\"{t}\"")),
                )
            })
            .collect();
        drop(ingesting);

        // 4. Results.
        let sizes = (
            self.sizes(client, "wa_events").await?,
            self.sizes(client, "messages").await?,
        );
        let outcome = Outcome {
            loaded: &loaded,
            idle: idle.as_ref(),
            alone: alone.as_ref(),
            during: &during,
            reads: &reads,
            plans: &plans,
            preload,
            taken,
            backlog,
            dead_letters,
            written: &written_total,
            sizes: &sizes,
            wa_loaded,
            pools: &pools,
        };
        let section = self.section(&outcome);
        print!("{section}");
        append_results(&args.results, &section)?;
        println!("results appended to {}", args.results.display());
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.args.work_dir.join(format!("weir-{}.log", self.id))
    }

    /// weir with 2 writers, started as `bench` starts it.
    fn spawn_weir(&self, http: u16) -> anyhow::Result<Child> {
        let config = self.args.work_dir.join(format!("weir-{}.toml", self.id));
        std::fs::write(&config, &self.run_text)?;
        let log = std::fs::File::create(self.log_path())?;
        Command::new(&self.args.weir)
            .args(["run", "--config"])
            .arg(&config)
            .env("WEIR_DATABASE_URL", &self.url)
            .env("WEIR_KAFKA__BROKERS", &self.brokers)
            .env("WEIR_KAFKA__GROUP_ID", format!("{}-reads", self.prefix))
            .env("WEIR_POSTGRES__WRITERS", "2")
            .env("WEIR_HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .env("WEIR_MAINTENANCE__ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.args.weir.display()))
    }

    /// Generates, decodes and COPYs the rows; then premakes partitions and
    /// vacuums.
    async fn load(&self, admin: &mut Client, client: &Client) -> anyhow::Result<(Loaded, Pools)> {
        let prepared = weir::pipeline::prepare(&self.load_config, admin).await?;
        let decoder = prepared.decoder(&self.load_config);
        let now_secs = chrono::Utc::now().timestamp();
        let (rows_tx, mut rows_rx) = mpsc::channel::<Vec<Sealed>>(2);
        let (prefix, target) = (self.prefix.clone(), self.args.rows);
        let generator = tokio::task::spawn_blocking(move || {
            generate(decoder, &prefix, load_shape(now_secs), target, rows_tx)
        });
        let mut sessions = JoinSet::new();
        let mut queues = Vec::new();
        for _ in 0..self.args.load_sessions {
            let (jobs_tx, jobs_rx) = mpsc::channel::<CopyJob>(2);
            sessions.spawn(copy_session(crate::connect(&self.url).await?, jobs_rx));
            queues.push(jobs_tx);
        }
        let lock_timeout = Duration::from_millis(self.load_config.postgres.ddl_lock_timeout_ms);
        let started = Instant::now();
        let (mut next, mut queued_wa, mut reported) = (0usize, 0u64, 0u64);
        let mut stalled = false;
        'chunks: while let Some(segments) = rows_rx.recv().await {
            for rows in segments {
                let table = &prepared.tables[rows.table];
                let (leaf, _) = table.ensure(admin, rows.lo, rows.hi, lock_timeout).await?;
                if table.name == "wa_events" {
                    queued_wa += rows.rows.len() as u64;
                }
                let job = CopyJob {
                    table: table.name.clone(),
                    sql: format!(
                        "COPY {} {} FROM STDIN (FORMAT binary)",
                        leaf.qualified(),
                        prepared.mappings.sources[rows.source].column_list
                    ),
                    rows,
                };
                if queues[next % queues.len()].send(job).await.is_err() {
                    stalled = true;
                    break 'chunks;
                }
                next += 1;
            }
            if queued_wa >= reported + 1_000_000 {
                reported = queued_wa / 1_000_000 * 1_000_000;
                println!(
                    "  {queued_wa} wa_events rows loaded or queued, {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        drop(queues);
        drop(rows_rx);
        let mut rows: BTreeMap<String, u64> = BTreeMap::new();
        while let Some(done) = sessions.join_next().await {
            for (table, n) in done?? {
                *rows.entry(table).or_default() += n;
            }
        }
        if stalled {
            bail!("a load session stopped");
        }
        let generated = generator.await??;
        let seconds = started.elapsed().as_secs_f64();
        for (table, expected) in &generated.expected {
            let got = rows.get(table).copied().unwrap_or(0);
            anyhow::ensure!(
                got == *expected,
                "{table}: loaded {got} rows, the traffic makes {expected}"
            );
        }
        let total: u64 = rows.values().sum();
        println!(
            "loaded {} events as {} rows in {seconds:.1} s ({:.0} rows/s, {:.1} s per million wa_events rows)",
            generated.events,
            rows.iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect::<Vec<_>>()
                .join(" + "),
            total as f64 / seconds,
            seconds / (rows.get("wa_events").copied().unwrap_or(0) as f64 / 1e6)
        );

        // Partitions ahead, as weir's maintenance keeps them.
        let started = Instant::now();
        let all = weir::pipeline::prepare(&self.run_config, admin).await?;
        weir::maintenance::run_once(
            admin,
            &self.run_config,
            &all.tables,
            &all.mappings,
            &all.dead_letter_partitions,
            false,
        )
        .await?;
        let maintenance_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for table in ["wa_events", "messages"] {
            client
                .batch_execute(&format!("VACUUM (ANALYZE) {}.{table}", quote(&self.schema)))
                .await
                .with_context(|| format!("vacuum {table}"))?;
        }
        client.batch_execute("CHECKPOINT").await?;
        let vacuum_seconds = started.elapsed().as_secs_f64();
        println!("VACUUM (ANALYZE) and CHECKPOINT: {vacuum_seconds:.1} s");
        Ok((
            Loaded {
                events: generated.events,
                rows,
                seconds,
                maintenance_seconds,
                vacuum_seconds,
            },
            generated.sampler.pools,
        ))
    }

    /// EXPLAIN ANALYZE of each query: which index it scans, on how many
    /// partitions, how fast. The tenant queries use the busiest tenant
    /// sampled (the most rows to choose from), the others a sampled value.
    async fn explain(&self, client: &Client, pools: &Pools) -> anyhow::Result<Vec<String>> {
        // Partition indexes are named after their partition: map them to
        // the parent index the schema declares.
        let parents: BTreeMap<String, String> = client
            .query(
                "SELECT c.relname::text, p.relname::text FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_class p ON p.oid = i.inhparent
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relkind = 'i'",
                &[&self.schema],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Pages of each partition: a Seq Scan of an empty one (premade
        // ahead) reads nothing, and the planner rightly scans a small one
        // (a few late events) rather than probe its index.
        let pages: BTreeMap<String, i32> = client
            .query(
                "SELECT c.relname::text, c.relpages FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relkind = 'r'",
                &[&self.schema],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut rng = SmallRng::seed_from_u64(SEED + 3);
        let mut lines = Vec::new();
        for query in Query::ALL {
            let busiest = matches!(query, Query::Company | Query::Failed);
            let param = if busiest {
                pools.companies.most_common()
            } else {
                pools.pool(query).pick(&mut rng)
            };
            let Some(param) = param else {
                lines.push(format!("{}: no parameter", query.label()));
                continue;
            };
            let row = client
                .query_typed_one(
                    &format!(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
                        query.sql(&self.schema)
                    ),
                    &[param.typed()],
                )
                .await?;
            let plan: Value = row.get(0);
            let mut nodes = Vec::new();
            walk(&plan[0]["Plan"], &mut nodes);
            let mut scans: BTreeMap<String, usize> = BTreeMap::new();
            let mut shape = Vec::new();
            let mut as_meant = true;
            for (node, index, relation) in &nodes {
                if !node.contains("Scan") {
                    if !shape.contains(node) {
                        shape.push(node.clone());
                    }
                    continue;
                }
                let target = match (index, relation) {
                    (Some(index), _) => {
                        let parent = parents.get(index).unwrap_or(index);
                        as_meant &= parent == query.index();
                        format!("using {parent}")
                    }
                    (None, Some(relation)) if pages.get(relation) == Some(&0) => {
                        "of an empty partition".to_string()
                    }
                    (None, Some(relation))
                        if pages.get(relation).is_some_and(|p| *p <= SMALL_PAGES) =>
                    {
                        "of a small partition".to_string()
                    }
                    // Its Bitmap Index Scan child names the index.
                    (None, _) if node == "Bitmap Heap Scan" => "of a partition".to_string(),
                    (None, relation) => {
                        as_meant = false;
                        format!("of {}", relation.as_deref().unwrap_or("?"))
                    }
                };
                *scans.entry(format!("{node} {target}")).or_default() += 1;
            }
            let top = &plan[0]["Plan"];
            lines.push(format!(
                "{}{}: {} > {}; planning {:.2} ms, execution {:.2} ms, {} buffers hit, {} read, {} rows: {}",
                query.label(),
                if busiest { " (busiest tenant)" } else { "" },
                shape.join(" > "),
                scans
                    .iter()
                    .map(|(scan, n)| format!("{n} x {scan}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                plan[0]["Planning Time"].as_f64().unwrap_or(0.0),
                plan[0]["Execution Time"].as_f64().unwrap_or(0.0),
                top["Shared Hit Blocks"].as_i64().unwrap_or(0),
                top["Shared Read Blocks"].as_i64().unwrap_or(0),
                top["Actual Rows"].as_i64().unwrap_or(0),
                if as_meant {
                    format!("{} on every partition with rows", query.index())
                } else {
                    format!("NOT {} everywhere: check the plan", query.index())
                }
            ));
        }
        Ok(lines)
    }

    async fn sizes(&self, client: &Client, table: &str) -> anyhow::Result<Sizes> {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*)::int8, COALESCE(sum(pg_total_relation_size(inhrelid)), 0)::int8
                       FROM pg_inherits WHERE inhparent = '{}.{table}'::regclass",
                    quote(&self.schema)
                ),
                &[],
            )
            .await?;
        Ok(Sizes {
            partitions: row.get(0),
            bytes: row.get(1),
        })
    }

    fn section(&self, o: &Outcome<'_>) -> String {
        let args = self.args;
        let loaded = o.loaded;
        let shape = load_shape(0);
        let mut s = String::new();
        let _ = writeln!(s, "\n## Reads {}\n", self.id);
        let command: Vec<String> = std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect();
        let _ = writeln!(
            s,
            "Command: `{}` on the local stack (`deploy/local/stack.sh`: PostgreSQL 15, tansu in-memory broker). \
             Machine: {}.\n",
            command.join(" "),
            machine()
        );
        let gib = |b: i64| b as f64 / (1u64 << 30) as f64;
        let wa_total = o.wa_loaded as f64 + o.written.get("wa_events").copied().unwrap_or(0.0);
        let messages_loaded = loaded.rows.get("messages").copied().unwrap_or(0);
        let messages_total =
            messages_loaded as f64 + o.written.get("messages").copied().unwrap_or(0.0);
        let _ = writeln!(
            s,
            "Data: {} generator events (seed {SEED}, {} tenants, Zipf {}, event times over the last {} days with {:.0}% up to 5 days \
             older, {:.0}% outbound chat messages) decoded by weir and loaded with binary COPY over {} sessions in {:.0} s ({:.1} s per million `wa_events` rows, \
             {:.0} rows/s for both tables); weir's maintenance premade partitions ({:.1} s), then `VACUUM (ANALYZE)` and \
             `CHECKPOINT` ({:.0} s). At the end of the reads `wa_events` held {:.0} rows ({} loaded) in {} partitions, \
             {:.1} GiB with indexes; `messages` {:.0} rows ({} loaded) in {} partitions, {:.1} GiB.\n",
            loaded.events,
            shape.companies,
            shape.zipf_exponent,
            shape.spread_secs / 86_400,
            shape.late_share * 100.0,
            shape.chat_share * 100.0,
            args.load_sessions,
            loaded.seconds,
            loaded.seconds / (o.wa_loaded as f64 / 1e6).max(1e-9),
            loaded.total() as f64 / loaded.seconds.max(1e-9),
            loaded.maintenance_seconds,
            loaded.vacuum_seconds,
            wa_total,
            o.wa_loaded,
            o.sizes.0.partitions,
            gib(o.sizes.0.bytes),
            messages_total,
            messages_loaded,
            o.sizes.1.partitions,
            gib(o.sizes.1.bytes),
        );
        let recent = |pool: &Pool| pool.recent.items.len();
        let _ = writeln!(
            s,
            "Reads: {} sessions, each running the four queries in turn with a {} ms pause after each, for {} s while weir ingests; \
             unnamed statements (`query_typed`: parsed and planned on every run, one round trip), latency from sending the \
             query to its last row, every run recorded (exact percentiles). Parameters are drawn from the loaded traffic as \
             often as they occur in it (busy tenants more), {:.0}% from its last day: {} / {} companies, {} / {} phone numbers, \
             {} / {} conversations sampled (last day / all).\n",
            args.sessions,
            args.pause_ms,
            args.secs,
            RECENT_SHARE * 100.0,
            recent(&o.pools.companies),
            o.pools.companies.any.items.len(),
            recent(&o.pools.phones),
            o.pools.phones.any.items.len(),
            recent(&o.pools.conversations),
            o.pools.conversations.any.items.len(),
        );
        let _ = writeln!(
            s,
            "While weir ingests ({:.0} queries/s):\n",
            o.reads.per_second()
        );
        s.push_str(&o.reads.table());
        if let Some(idle) = o.idle {
            let _ = writeln!(
                s,
                "\nThe same reads with nothing else running ({} s, {:.0} queries/s, machine CPU {:.0}% busy):\n",
                args.idle_secs,
                idle.per_second(),
                idle.cpu_busy * 100.0
            );
            s.push_str(&idle.table());
        }
        let _ = writeln!(s, "\nQueries:\n");
        for query in Query::ALL {
            let _ = writeln!(s, "- {}: `{}`", query.label(), query.shown());
        }
        let _ = writeln!(
            s,
            "\nPlans (`EXPLAIN (ANALYZE, BUFFERS)` with one parameter each, after the load):\n"
        );
        for line in o.plans {
            let _ = writeln!(s, "- {line}");
        }
        let config = if args.direct {
            "the shipped mapping of `wa_events`, `messages` and `webhook_logs` without dedupe keys (direct COPY)"
        } else {
            "the shipped configuration: `wa_events`, `messages` and `webhook_logs`, dedupe keys (COPY into staging, INSERT ... ON CONFLICT)"
        };
        let _ = writeln!(
            s,
            "\nweir (2 writers, {config}) drained a preloaded topic of {} events (the load's seed: the same tenants, and the same \
             customer numbers and conversations again, at event times within the last 10 minutes; {} Kafka partitions), \
             and had taken {:.0} of them when the reads ended: during the reads {}.{}",
            o.preload,
            args.partitions,
            o.taken,
            o.during.describe(),
            match o.alone {
                Some(alone) => format!(
                    " Just before, without reads: {}; with the reads weir ran at {:.0}% of that rate.",
                    alone.describe(),
                    o.during.rate(None) / alone.rate(None).max(1e-9) * 100.0
                ),
                None => String::new(),
            }
        );
        if !o.backlog {
            let _ = writeln!(
                s,
                "\nweir took all {:.0} preloaded events before the reads ended: it was not ingesting at its max rate for the whole \
                 window (raise `--preload`).",
                o.taken
            );
        }
        let few = |q: Query| o.reads.summary(Some(q)).rows < 10.0;
        if few(Query::Phone) || few(Query::Conversation) {
            let _ = writeln!(
                s,
                "\nThe generator gives every webhook body its own customer number and every body or chat message its own \
                 conversation, so the phone and conversation queries find a few rows each (see the table): they measure \
                 the index probe of every partition, not the fetch of a long history."
            );
        }
        if o.dead_letters > 0.0 {
            let _ = writeln!(
                s,
                "\nweir wrote {:.0} dead letters during the run.",
                o.dead_letters
            );
        }
        let _ = writeln!(s, "\n{}", self.verdict(o, wa_total));
        s
    }

    fn verdict(&self, o: &Outcome<'_>, wa_rows: f64) -> String {
        let (worst, worst_query) = Query::ALL
            .iter()
            .map(|q| (o.reads.summary(Some(*q)).p99, q.label()))
            .fold((0.0, ""), |acc, x| if x.0 > acc.0 { x } else { acc });
        let met = worst < TARGET_P99_MS;
        let mut v = format!(
            "Target (reads of recent data at p99 < {TARGET_P99_MS:.0} ms on tables of 10M+ rows while weir ingests at its max rate): \
             **{}**: the slowest p99 is {worst:.2} ms ({worst_query})",
            if met { "met" } else { "missed" }
        );
        let mut caveats = Vec::new();
        if wa_rows < TARGET_ROWS as f64 {
            caveats.push(format!(
                "`wa_events` held {wa_rows:.0} rows, under 10M, so this run does not show the target"
            ));
        }
        if !o.backlog {
            caveats.push("weir ran out of backlog during the reads".to_string());
        }
        if caveats.is_empty() {
            let _ = write!(
                v,
                ", with `wa_events` at {wa_rows:.0} rows and weir committing {:.0} rows/s throughout.",
                o.during.rate(None)
            );
        } else {
            let _ = write!(v, "; but {}.", caveats.join(", and "));
        }
        v
    }

    async fn clean_up(&self, client: &Client) -> anyhow::Result<()> {
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                quote(&self.schema)
            ))
            .await
            .context("drop the reads schema")?;
        delete_topics(
            &self.brokers,
            &[
                format!("{}.{WEBHOOK_TOPIC}", self.prefix),
                format!("{}.{CHAT_TOPIC}", self.prefix),
            ],
        )
        .await?;
        for path in [
            self.args.work_dir.join(format!("preload-{}", self.id)),
            self.args.work_dir.join(format!("weir-{}.toml", self.id)),
            self.log_path(),
        ] {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
        let _ = std::fs::remove_dir(&self.args.work_dir);
        println!(
            "cleaned up: schema {} dropped, topics {}.* deleted",
            self.schema, self.prefix
        );
        Ok(())
    }
}

/// Everything measured, for the results section.
struct Outcome<'a> {
    loaded: &'a Loaded,
    idle: Option<&'a Reads>,
    alone: Option<&'a Ingest>,
    during: &'a Ingest,
    reads: &'a Reads,
    plans: &'a [String],
    preload: u64,
    taken: f64,
    backlog: bool,
    dead_letters: f64,
    written: &'a BTreeMap<String, f64>,
    sizes: &'a (Sizes, Sizes),
    wa_loaded: u64,
    pools: &'a Pools,
}

/// Node type, index and relation of every node of a JSON plan.
fn walk(plan: &Value, out: &mut Vec<(String, Option<String>, Option<String>)>) {
    if let Some(node) = plan["Node Type"].as_str() {
        out.push((
            node.to_string(),
            plan["Index Name"].as_str().map(str::to_string),
            plan["Relation Name"].as_str().map(str::to_string),
        ));
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        walk(child, out);
    }
}

async fn delete_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("kafka admin client")?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let results = admin
        .delete_topics(
            &names,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("delete the topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => bail!("cannot delete topic {topic}: {code}"),
        }
    }
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("topic metadata")?;
    let left: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| names.contains(name))
        .collect();
    anyhow::ensure!(
        left.is_empty(),
        "topics still listed after deletion: {left:?}"
    );
    Ok(())
}
