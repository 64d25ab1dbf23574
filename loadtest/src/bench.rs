//! `bench`: weir against the physical limit, in one run on the local stack.
//!
//! 1. The limit: the exact rows weir would write (encoded by weir's own
//!    decoder) are written to binary COPY files, and PostgreSQL loads them
//!    itself (`COPY ... FROM '<file>'`, server side: no client in the way),
//!    with 1 and with 2 sessions.
//! 2. weir, with 1 and with 2 writers, draining a preloaded topic of the same
//!    events: rows/s, ratio to the limit, CPU per row of weir and of
//!    PostgreSQL, weir's peak RSS.
//! 3. Latency: live traffic at half of weir's best rate, p99 end to end.
//!
//! Beside weir's and PostgreSQL's CPU it reports the other two processes a
//! reader must rule out as the bottleneck: the generator (CPU per event
//! while preloading, batched and lz4-compressed as a gateway would) and the
//! broker (CPU per row while weir drains, and the rate at which a plain
//! librdkafka consumer reads the preloaded topic: the broker's ceiling).
//!
//! The table is the seeds' `wa_events` with the shipped schema; weir writes
//! it through the direct COPY path (no dedupe key), as the limit does.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio_postgres::Client;

use crate::produce::{ProduceArgs, produce};
use crate::webhooks::{Generator, Shape};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// wa_events rows to load (about 1.6 per webhook body).
    #[arg(long, default_value_t = 1_000_000)]
    pub items: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Seconds of live traffic for the latency measurement.
    #[arg(long, default_value_t = 60)]
    pub latency_secs: u64,
    /// Where the results are recorded (appended as a new section).
    #[arg(long, default_value = "loadtest/RESULTS.md")]
    pub results: PathBuf,
    /// The weir binary measured.
    #[arg(long, default_value = "target/release/weir")]
    pub weir: PathBuf,
    /// Scratch directory (COPY files, configs, logs); PostgreSQL must be able to read it.
    #[arg(long, default_value = "/tmp/weir-bench")]
    pub work_dir: PathBuf,
    /// Only measure weir's decode and encode speed (no Kafka, no load).
    #[arg(long)]
    pub decode_only: bool,
    /// Most records per Kafka batch when preloading (librdkafka's `batch.num.messages`).
    #[arg(long, default_value_t = 10_000)]
    pub batch_messages: u32,
    /// Stop after the drains (no latency phase, nothing appended to the
    /// results): for trying a change quickly.
    #[arg(long)]
    pub drain_only: bool,
    /// Live traffic rate of the latency phase, in webhook bodies per second
    /// (default: half of weir's best drain rate).
    #[arg(long)]
    pub latency_rate: Option<f64>,
    /// Only the latency phase, at `--latency-rate` (no limit, no drains,
    /// nothing appended to the results): for comparing builds on live
    /// traffic quickly.
    #[arg(long, requires = "latency_rate")]
    pub latency_only: bool,
    /// Record a CPU profile of weir during each drain with `perf record`
    /// (call graphs from DWARF), into `<work-dir>/perf-drain-<writers>.data`.
    #[arg(long)]
    pub profile: bool,
}

const SEED: u64 = 4242;

fn shape() -> Shape {
    Shape {
        seed: SEED,
        chat_share: 0.0,
        malformed_share: 0.0,
        duplicate_share: 0.0,
        late_share: 0.0,
        spread_secs: 20 * 86_400,
        ..Shape::default()
    }
}

/// The shortest of three runs of `pass` (one pass is noisy on a shared
/// machine).
fn best_of_three(mut pass: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        pass()?;
        best = best.min(started.elapsed());
    }
    Ok(best)
}

/// Events (webhook bodies) needed for `items` wa_events rows.
fn events_for(items: u64, now_secs: i64) -> (u64, u64) {
    let mut generator = Generator::new(Shape {
        now_secs,
        ..shape()
    });
    let (mut events, mut rows) = (0u64, 0u64);
    while rows < items {
        let event = generator.next_event();
        rows += event.rows.iter().filter(|r| r.table == "wa_events").count() as u64;
        events += 1;
    }
    (events, rows)
}

/// CPU seconds used so far by a process.
fn cpu_seconds(pid: u32) -> f64 {
    ProcStat::read(pid).cpu_seconds()
}

/// What `/proc/<pid>/stat` says of a process's CPU and page faults (all 0
/// when it is gone).
#[derive(Debug, Clone, Copy, Default)]
struct ProcStat {
    user_seconds: f64,
    kernel_seconds: f64,
    /// Page faults served without IO: mostly fresh anonymous pages, each
    /// zeroed by the kernel (memory the allocator gave back and took again).
    minor_faults: f64,
}

impl ProcStat {
    fn read(pid: u32) -> Self {
        Self::live(pid).unwrap_or_default()
    }

    /// The process's figures, or `None` when it is gone.
    fn live(pid: u32) -> Option<Self> {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .map(|stat| Self::parse(&stat, clock_ticks()))
    }

    /// A stat line, its times in clock ticks of `1 / ticks` seconds.
    fn parse(stat: &str, ticks: f64) -> Self {
        // The name may hold spaces and parentheses: the fields start after
        // its last `)`.
        let after = stat.rsplit(')').next().unwrap_or_default();
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Field n of proc(5)'s stat is n - 3 after the name: minflt is 10,
        // utime 14, stime 15.
        let field = |n: usize| {
            fields
                .get(n - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            user_seconds: field(14) / ticks,
            kernel_seconds: field(15) / ticks,
            minor_faults: field(10),
        }
    }

    fn cpu_seconds(&self) -> f64 {
        self.user_seconds + self.kernel_seconds
    }
}

/// Pages the kernel has written to disk since boot (`nr_written` of
/// `/proc/vmstat`: writeback of dirty pages and `fsync`ed writes alike), if
/// it says.
fn pages_written_back() -> Option<u64> {
    std::fs::read_to_string("/proc/vmstat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("nr_written ")?.trim().parse().ok())
}

/// Clock ticks per second, asked of `getconf` once (every CPU reading used
/// to start a process for it).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Processes named `name` (by /proc/*/comm).
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == name)
        })
        .collect()
}

/// CPU seconds of every live process named `name`, by pid: `postgres`
/// (backends, walwriter, checkpointer...) or the broker, `tansu`.
fn cpu_by_name(name: &str) -> HashMap<u32, f64> {
    pids_named(name)
        .into_iter()
        .filter_map(|pid| Some((pid, ProcStat::live(pid)?.cpu_seconds())))
        .collect()
}

fn postgres_cpu() -> HashMap<u32, f64> {
    cpu_by_name("postgres")
}

fn broker_cpu() -> HashMap<u32, f64> {
    cpu_by_name("tansu")
}

/// CPU used between two readings of [`cpu_by_name`]: by the processes
/// alive at the second, a process started in between counted whole. One
/// that exited in between is left out: its last figures are gone with it
/// (counting it as 0 made a restarted broker's CPU negative).
fn cpu_delta(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, cpu)| cpu - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

fn peak_rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM")
}

/// A size line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`...), in MiB; 0
/// when the process is gone.
pub(crate) fn proc_status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| {
                    l.strip_prefix(field)
                        .is_some_and(|rest| rest.starts_with(':'))
                })
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One measured load.
#[derive(Debug, Clone, Default)]
struct Measure {
    rows: u64,
    seconds: f64,
    postgres_cpu: f64,
    weir_cpu: f64,
    broker_cpu: f64,
    peak_rss_mib: f64,
    /// Of `weir_cpu`, the part spent in the kernel.
    weir_kernel_cpu: f64,
    /// weir's minor page faults.
    weir_faults: f64,
    /// weir's writer sessions as PostgreSQL saw them.
    sessions: Vec<SessionLoad>,
    /// Per writer, the fraction of its time spent writing (weir's own
    /// `weir_writer_seconds`).
    writers_busy: Vec<(String, f64)>,
    /// Times weir paused its partitions for backpressure (each pause drops
    /// librdkafka's prefetched data, and fetching resumes up to a second
    /// later).
    pauses: f64,
}

/// How busy one PostgreSQL backend serving a weir writer was.
#[derive(Debug, Clone, Default)]
struct SessionLoad {
    /// `application_name`, e.g. weir-writer-0.
    name: String,
    /// Fraction of `pg_stat_activity` samples in which it was working:
    /// active and not waiting for the client (a COPY waiting for weir's
    /// next chunk shows `ClientRead`).
    busy: f64,
    /// Its CPU time over the wall time it was sampled.
    cpu: f64,
    /// What it waited on while working (`wait_event_type:wait_event`),
    /// most frequent first, as fractions of all its samples.
    waits: Vec<(String, f64)>,
}

/// Samples of weir's writer backends in `pg_stat_activity` over a drain.
#[derive(Default)]
struct SessionSampler {
    /// Per application_name: backend pid, samples working, samples in all,
    /// CPU seconds when first seen and when first seen.
    seen: HashMap<String, (u32, u64, u64, f64, Instant)>,
    /// Per application_name, samples working but waiting, by wait event.
    waits: HashMap<String, HashMap<String, u64>>,
}

impl SessionSampler {
    async fn sample(&mut self, client: &Client, pattern: &str) -> anyhow::Result<()> {
        let rows = client
            .query(
                "SELECT application_name, pid, state = 'active' AND wait_event IS DISTINCT FROM 'ClientRead',
                        wait_event_type || ':' || wait_event
                   FROM pg_stat_activity WHERE application_name LIKE $1",
                &[&pattern],
            )
            .await?;
        for row in rows {
            let name: String = row.get(0);
            let pid = row.get::<_, i32>(1) as u32;
            let working: bool = row.get::<_, Option<bool>>(2).unwrap_or(false);
            if working && let Some(wait) = row.get::<_, Option<String>>(3) {
                *self
                    .waits
                    .entry(name.clone())
                    .or_default()
                    .entry(wait)
                    .or_default() += 1;
            }
            let entry = self
                .seen
                .entry(name.clone())
                .or_insert_with(|| (pid, 0, 0, cpu_seconds(pid), Instant::now()));
            if entry.0 != pid {
                // A new session (the writer reconnected): start over.
                *entry = (pid, 0, 0, cpu_seconds(pid), Instant::now());
                self.waits.remove(&name);
            }
            entry.1 += working as u64;
            entry.2 += 1;
        }
        Ok(())
    }

    fn loads(&self) -> Vec<SessionLoad> {
        let mut loads: Vec<SessionLoad> = self
            .seen
            .iter()
            .map(
                |(name, (pid, working, total, cpu_before, since))| SessionLoad {
                    waits: {
                        let mut waits: Vec<(String, f64)> = self
                            .waits
                            .get(name)
                            .into_iter()
                            .flatten()
                            .map(|(wait, n)| (wait.clone(), *n as f64 / (*total).max(1) as f64))
                            .collect();
                        waits.sort_by(|a, b| b.1.total_cmp(&a.1));
                        waits.truncate(3);
                        waits
                    },
                    name: name.clone(),
                    busy: *working as f64 / (*total).max(1) as f64,
                    cpu: (cpu_seconds(*pid) - cpu_before) / since.elapsed().as_secs_f64().max(1e-9),
                },
            )
            .collect();
        loads.sort_by(|a, b| a.name.cmp(&b.name));
        loads
    }
}

/// Per writer, the fraction of its time spent writing, from weir's
/// `weir_writer_seconds_sum{writer,state}` in a /metrics text.
fn writers_busy(metrics: &str) -> Vec<(String, f64)> {
    let mut sums: HashMap<String, (f64, f64)> = HashMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("weir_writer_seconds_sum{") else {
            continue;
        };
        let label = |name: &str| {
            let start = rest
                .find(&format!("{name}=\""))
                .map(|i| i + name.len() + 2)?;
            let end = rest[start..].find('"')? + start;
            Some(rest[start..end].to_string())
        };
        let (Some(writer), Some(state), Some(value)) = (
            label("writer"),
            label("state"),
            line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        let entry = sums.entry(writer).or_default();
        match state.as_str() {
            "writing" => entry.0 += value,
            _ => entry.1 += value,
        }
    }
    let mut busy: Vec<(String, f64)> = sums
        .into_iter()
        .map(|(writer, (writing, idle))| (writer, writing / (writing + idle).max(1e-9)))
        .collect();
    busy.sort_by(|a, b| a.0.cmp(&b.0));
    busy
}

impl Measure {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.seconds
    }
    fn per_row_us(cpu: f64, rows: u64) -> f64 {
        cpu / rows as f64 * 1e6
    }
}

pub(crate) struct Bench {
    url: String,
    brokers: String,
    schema: String,
    prefix: String,
    config_text: String,
    /// The same, keeping the shipped `dedupe_key` of wa_events.
    dedupe_config_text: String,
    config: weir::config::Config,
    args: BenchArgs,
}

pub async fn bench(brokers: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let url = std::env::var("WEIR_DATABASE_URL")
        .context("set WEIR_DATABASE_URL (deploy/local/stack.sh up prints it)")?;
    anyhow::ensure!(
        args.weir.exists(),
        "{} not found: cargo build --release --bins",
        args.weir.display()
    );
    let id = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let schema = format!("bench_{id}");
    let prefix = format!("bench{id}");
    std::fs::create_dir_all(&args.work_dir)?;
    set_mode(&args.work_dir, 0o755)?;
    let (config_text, config) = bench_config(&url, brokers, &schema, &prefix, false)?;
    let (dedupe_config_text, _) = bench_config(&url, brokers, &schema, &prefix, true)?;
    let bench = Bench {
        url: url.clone(),
        brokers: brokers.to_string(),
        schema,
        prefix,
        config_text,
        dedupe_config_text,
        config,
        args: args.clone(),
    };
    let client = crate::connect(&url).await?;
    client
        .batch_execute(&format!("CREATE SCHEMA \"{}\"", bench.schema))
        .await?;
    let mut admin = weir::store::db::connect(&url, &bench.config.postgres, "bench").await?;
    weir::store::schema::migrate(&mut admin, &bench.config, false)
        .await
        .context("migrate the bench schema")?;

    let now_secs = chrono::Utc::now().timestamp();
    let (events, items) = events_for(args.items, now_secs);
    println!(
        "bench {id}: {events} webhook bodies carrying {items} wa_events rows (schema {}, topics {}.*)",
        bench.schema, bench.prefix
    );

    if args.latency_only {
        let rate = args
            .latency_rate
            .context("--latency-only needs --latency-rate")?;
        let latency = bench.latency(&client, rate).await?;
        print_latency(&latency, items as f64 / events as f64);
        return bench.clean_up(&client).await;
    }

    // 1. The limit.
    let files = bench.copy_files(&mut admin, events, now_secs).await?;
    if args.decode_only {
        return bench.clean_up(&client).await;
    }
    let mut limit = Vec::new();
    for streams in [1usize, 2] {
        let measure = bench.server_copy(&client, &files, streams).await?;
        println!(
            "limit, {streams} stream(s): {:.0} rows/s, PostgreSQL {:.1} us CPU/row",
            measure.rate(),
            Measure::per_row_us(measure.postgres_cpu, measure.rows)
        );
        limit.push(measure);
    }

    // 2. weir draining a preloaded topic.
    let run_dir = args.work_dir.join(format!("run-{id}"));
    println!("preloading {events} events into Kafka...");
    let preload = ProduceArgs {
        count: events,
        rate: 0,
        duration_secs: None,
        seed: SEED,
        companies: shape().companies,
        zipf: shape().zipf_exponent,
        spread_days: shape().spread_secs as f64 / 86_400.0,
        late: 0.0,
        malformed: 0.0,
        duplicates: 0.0,
        chat_share: 0.0,
        partitions: args.partitions,
        topic_prefix: Some(bench.prefix.clone()),
        batch_messages: args.batch_messages,
        out: run_dir.clone(),
        quiet: true,
    };
    let brokers_owned = brokers.to_string();
    let (generator_before, broker_before) = (cpu_seconds(std::process::id()), broker_cpu());
    let preloaded =
        tokio::task::spawn_blocking(move || produce(&brokers_owned, &preload)).await??;
    let preload_cost = Preload {
        events,
        events_per_second: preloaded.achieved_rate,
        generator_cpu: cpu_seconds(std::process::id()) - generator_before,
        broker_cpu: cpu_delta(&broker_before, &broker_cpu()),
    };
    println!(
        "preloaded at {:.0} events/s: generator {:.1} us CPU/event, broker {:.1} us CPU/event",
        preload_cost.events_per_second,
        Measure::per_row_us(preload_cost.generator_cpu, events),
        Measure::per_row_us(preload_cost.broker_cpu, events)
    );
    let ceiling = broker_read_ceiling(
        brokers,
        &format!("{}.whatsapp.webhooks", bench.prefix),
        events,
    )
    .await?;
    println!(
        "broker read ceiling (plain librdkafka consumer): {:.0} msg/s, broker {:.1} us CPU/msg",
        ceiling.rate(),
        Measure::per_row_us(ceiling.broker_cpu, ceiling.rows)
    );
    let mut drained = Vec::new();
    for writers in [1usize, 2] {
        let measure = bench.drain(&client, writers, events, items, false).await?;
        println!(
            "weir, {writers} writer(s): {:.0} rows/s ({:.2} of the limit), weir {:.1} us CPU/row, PostgreSQL {:.1} us CPU/row, peak RSS {:.0} MiB",
            measure.rate(),
            measure.rate() / limit[writers - 1].rate(),
            Measure::per_row_us(measure.weir_cpu, measure.rows),
            Measure::per_row_us(measure.postgres_cpu, measure.rows),
            measure.peak_rss_mib
        );
        println!("  {}", where_the_time_goes(&measure));
        drained.push(measure);
    }
    // The same drains through the dedupe path.
    let mut deduped = Vec::new();
    for writers in [1usize, 2] {
        let measure = bench.drain(&client, writers, events, items, true).await?;
        println!(
            "weir, {writers} writer(s), dedupe path: {:.0} rows/s ({:.2} of the plain path), weir {:.1} us CPU/row, PostgreSQL {:.1} us CPU/row",
            measure.rate(),
            measure.rate() / drained[writers - 1].rate(),
            Measure::per_row_us(measure.weir_cpu, measure.rows),
            Measure::per_row_us(measure.postgres_cpu, measure.rows),
        );
        deduped.push(measure);
    }

    if args.drain_only {
        return bench.clean_up(&client).await;
    }

    // 3. Latency at half of the best rate.
    let best = drained.iter().map(Measure::rate).fold(0.0, f64::max);
    let rows_per_event = items as f64 / events as f64;
    let rate = args.latency_rate.unwrap_or(best / 2.0 / rows_per_event);
    let latency = bench.latency(&client, rate).await?;
    print_latency(&latency, rows_per_event);

    let section = results_section(
        &bench,
        &id,
        events,
        items,
        &Phases {
            limit: &limit,
            preload: &preload_cost,
            ceiling: &ceiling,
            drained: &drained,
            deduped: &deduped,
            latency: &latency,
        },
    )?;
    append_results(&args.results, &section)?;
    println!("results appended to {}", args.results.display());
    bench.clean_up(&client).await
}

fn print_latency(latency: &Latency, rows_per_event: f64) {
    println!(
        "latency at {:.0} events/s ({:.0} rows/s offered, {:.0} achieved): p50 {:.0} ms, p99 {:.0} ms (weir's histogram), p99 {:.0} ms (rows), \
         p99 {:.0} ms (rows after the first {WARM_UP_SECS} s)",
        latency.offered_events,
        latency.offered_events * rows_per_event,
        latency.achieved_rows,
        latency.metric_p50 * 1000.0,
        latency.metric_p99 * 1000.0,
        latency.row_p99 * 1000.0,
        latency.steady_p99 * 1000.0
    );
    println!(
        "cores used during the live traffic: {}",
        latency.cores_text()
    );
}

/// The shipped config reduced to wa_events, pointed at the bench schema and
/// topics: on the direct COPY path, or with `dedupe` on the shipped dedupe
/// path (staged COPY, then `INSERT ... ON CONFLICT DO NOTHING`).
fn bench_config(
    url: &str,
    brokers: &str,
    schema: &str,
    prefix: &str,
    dedupe: bool,
) -> anyhow::Result<(String, weir::config::Config)> {
    crate::reads::config_for(url, brokers, schema, prefix, &["wa_events"], !dedupe)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// One COPY file: a leaf partition, its column list, rows in it.
struct CopyFile {
    path: PathBuf,
    leaf: String,
    columns: String,
    rows: u64,
}

impl Bench {
    /// Encodes the events exactly as weir would and writes binary COPY files
    /// of about 50,000 rows each, creating the partitions they need.
    async fn copy_files(
        &self,
        admin: &mut Client,
        events: u64,
        now_secs: i64,
    ) -> anyhow::Result<Vec<CopyFile>> {
        let prepared = weir::pipeline::prepare(&self.config, admin).await?;
        let decoder = prepared.decoder(&self.config);
        let topic: Arc<str> = Arc::from(format!("{}.whatsapp.webhooks", self.prefix).as_str());
        let mut generator = Generator::new(Shape {
            now_secs,
            ..shape()
        });
        let now = now_secs * 1_000_000;
        let inputs: Vec<weir::event::Event> = (0..events)
            .map(|offset| {
                let produced = generator.next_event();
                weir::event::Event {
                    topic: topic.clone(),
                    partition: 0,
                    offset: offset as i64,
                    timestamp_ms: Some(now / 1000),
                    key: Some(Bytes::from(produced.key.clone())),
                    headers: weir::event::Headers::from_pairs(
                        produced
                            .headers
                            .iter()
                            .map(|(k, v)| (*k, Some(v.as_bytes()))),
                    ),
                    payload: Bytes::from(produced.payload),
                }
            })
            .collect();
        // Decoded batch by batch, as a writer does (12,000 bodies make about
        // the 20,000 rows of a default batch).
        let decode_batch = |chunk: &[weir::event::Event]| {
            let mut gathered = weir::decode::Gathered::default();
            for (message, event) in chunk.iter().enumerate() {
                decoder.decode(event, message as u32, now, &mut gathered);
            }
            gathered
        };
        let started = Instant::now();
        let batches: Vec<weir::decode::Gathered> =
            inputs.chunks(12_000).map(decode_batch).collect();
        let decode_time = started.elapsed();
        let rows: usize = batches.iter().map(|b| b.rows).sum();
        anyhow::ensure!(
            batches.iter().all(|b| b.dead_letters.is_empty()),
            "the benchmark traffic produced dead letters"
        );
        println!(
            "decode + encode in weir, one thread: {:.2} us per row ({rows} rows from {events} bodies)",
            decode_time.as_secs_f64() * 1e6 / rows.max(1) as f64
        );
        // The pass above faults in fresh pages for every buffer, and on a
        // shared machine one pass is noisy. A writer reuses its buffers, so
        // decode again into memory the allocator already holds, dropping
        // each batch after it, and report the best of three passes.
        let per_row = |time: Duration| time.as_secs_f64() * 1e6 / rows.max(1) as f64;
        let warm = best_of_three(|| {
            for chunk in inputs.chunks(12_000) {
                std::hint::black_box(decode_batch(chunk));
            }
            Ok(())
        })?;
        println!(
            "decode + encode in weir, one thread, warm memory: {:.2} us per row (best of 3 passes)",
            per_row(warm)
        );
        // The largest single part of decoding, alone: the JSON reader
        // building what the topic's mappings read; then validating only
        // (building nothing), by weir's reader and by serde_json, for
        // scale.
        let wanted = &decoder
            .mappings
            .readers(&topic)
            .context("the bench topic has no mapping")?
            .wanted;
        let nothing = weir::json::Wanted::default();
        let texts: Vec<&str> = inputs
            .iter()
            .map(|event| std::str::from_utf8(&event.payload))
            .collect::<Result<_, _>>()?;
        let bytes: usize = texts.iter().map(|text| text.len()).sum();
        let building = best_of_three(|| {
            for text in &texts {
                std::hint::black_box(weir::json::Json::parse_wanted(text, wanted)?);
            }
            Ok(())
        })?;
        let validating = best_of_three(|| {
            for text in &texts {
                std::hint::black_box(weir::json::Json::parse_wanted(text, &nothing)?);
            }
            Ok(())
        })?;
        let serde_validating = best_of_three(|| {
            for text in &texts {
                std::hint::black_box(serde_json::from_str::<serde::de::IgnoredAny>(text)?);
            }
            Ok(())
        })?;
        println!(
            "  of which reading the JSON: {:.2} us per row, {:.0} MB/s (validating alone: {:.2} us per row; serde_json validating alone: {:.2}; best of 3 passes)",
            per_row(building),
            bytes as f64 / building.as_secs_f64() / 1e6,
            per_row(validating),
            per_row(serde_validating),
        );
        let dir = self.args.work_dir.join(format!("copy-{}", self.schema));
        std::fs::create_dir_all(&dir)?;
        set_mode(&dir, 0o755)?;
        let lock_timeout = Duration::from_secs(5);
        let mut files = Vec::new();
        for segment in batches.into_iter().flat_map(|b| b.segments) {
            let table = &prepared.tables[segment.table];
            let (leaf, _) = table
                .ensure(admin, segment.lo, segment.hi, lock_timeout)
                .await?;
            let columns = prepared.mappings.sources[segment.source]
                .column_list
                .clone();
            let sealed = segment.seal();
            for (chunk, rows) in (0..sealed.rows.len())
                .collect::<Vec<_>>()
                .chunks(50_000)
                .enumerate()
            {
                let path = dir.join(format!("{}-{}-{chunk}.bin", leaf.name, files.len()));
                let mut data = Vec::with_capacity(sealed.len() / 4);
                data.extend_from_slice(weir::copy::COPY_HEADER);
                let start = sealed.row_range(rows[0]).start;
                let end = sealed.row_range(*rows.last().expect("non-empty chunk")).end;
                for slice in sealed.slices(start..end) {
                    data.extend_from_slice(&slice);
                }
                data.extend_from_slice(weir::copy::COPY_TRAILER);
                std::fs::write(&path, &data)?;
                set_mode(&path, 0o644)?;
                files.push(CopyFile {
                    path,
                    leaf: leaf.qualified(),
                    columns: columns.clone(),
                    rows: rows.len() as u64,
                });
            }
        }
        Ok(files)
    }

    /// Drops the bench schema and the COPY files: repeated runs do not fill
    /// the disk.
    async fn clean_up(&self, client: &Client) -> anyhow::Result<()> {
        client
            .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .await?;
        let _ = std::fs::remove_dir_all(self.args.work_dir.join(format!("copy-{}", self.schema)));
        Ok(())
    }

    async fn reset(&self, client: &Client) -> anyhow::Result<()> {
        client
            .batch_execute(&format!(
                "TRUNCATE \"{s}\".wa_events; DELETE FROM \"{s}\".weir_offsets; CHECKPOINT;",
                s = self.schema
            ))
            .await?;
        Ok(())
    }

    /// PostgreSQL loads the files itself, over `streams` sessions.
    async fn server_copy(
        &self,
        client: &Client,
        files: &[CopyFile],
        streams: usize,
    ) -> anyhow::Result<Measure> {
        self.reset(client).await?;
        let mut sessions = Vec::new();
        for _ in 0..streams {
            sessions.push(crate::connect(&self.url).await?);
        }
        let cpu_before = postgres_cpu();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (index, session) in sessions.into_iter().enumerate() {
            let mine: Vec<(String, u64)> = files
                .iter()
                .enumerate()
                .filter(|(i, _)| i % streams == index)
                .map(|(_, f)| {
                    (
                        format!(
                            "COPY {} {} FROM '{}' (FORMAT binary)",
                            f.leaf,
                            f.columns,
                            f.path.display()
                        ),
                        f.rows,
                    )
                })
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut rows = 0;
                for (sql, expected) in mine {
                    let copied = session.execute(sql.as_str(), &[]).await?;
                    anyhow::ensure!(
                        copied == expected,
                        "COPY loaded {copied} rows, expected {expected}"
                    );
                    rows += copied;
                }
                // The session goes back to the caller: its backend must
                // still be alive when its CPU time is read.
                Ok::<_, anyhow::Error>((rows, session))
            }));
        }
        let mut rows = 0;
        let mut open = Vec::new();
        for task in tasks {
            let (copied, session) = task.await??;
            rows += copied;
            open.push(session);
        }
        let seconds = started.elapsed().as_secs_f64();
        let postgres_cpu = cpu_delta(&cpu_before, &postgres_cpu());
        drop(open);
        Ok(Measure {
            rows,
            seconds,
            postgres_cpu,
            ..Default::default()
        })
    }

    fn spawn_weir(
        &self,
        writers: usize,
        group: &str,
        http: u16,
        name: &str,
    ) -> anyhow::Result<Child> {
        self.spawn_weir_with(&self.config_text, writers, group, http, name)
    }

    fn spawn_weir_with(
        &self,
        config_text: &str,
        writers: usize,
        group: &str,
        http: u16,
        name: &str,
    ) -> anyhow::Result<Child> {
        let dir = &self.args.work_dir;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_text)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        Command::new(&self.args.weir)
            .args(["run", "--config"])
            .arg(&config)
            .env("WEIR_DATABASE_URL", &self.url)
            .env("WEIR_KAFKA__BROKERS", &self.brokers)
            .env("WEIR_KAFKA__GROUP_ID", group)
            .env("WEIR_POSTGRES__WRITERS", writers.to_string())
            .env("WEIR_HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .env("WEIR_MAINTENANCE__ENABLED", "false")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.args.weir.display()))
    }

    /// `perf record` attached to `pid`, sampling at 999 Hz with DWARF call
    /// graphs (release builds carry line tables), until [`stop_profile`].
    fn start_profile(&self, pid: u32, name: &str) -> anyhow::Result<Child> {
        let out = self.args.work_dir.join(name);
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "999",
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start perf record (apt-get install linux-perf)")?;
        println!("profiling weir (pid {pid}) into {}", out.display());
        Ok(child)
    }

    pub(crate) async fn wait_ready(http: u16) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if crate::report::fetch(&format!("http://127.0.0.1:{http}/readyz"))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("weir did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stored(&self, client: &Client, group: &str) -> anyhow::Result<i64> {
        Ok(client
            .query_one(
                &format!(
                    "SELECT COALESCE(sum(next_offset), 0)::int8 FROM \"{}\".weir_offsets WHERE consumer_group = $1",
                    self.schema
                ),
                &[&group],
            )
            .await?
            .get(0))
    }

    /// weir with `writers` writers drains the preloaded topic.
    async fn drain(
        &self,
        client: &Client,
        writers: usize,
        events: u64,
        items: u64,
        dedupe: bool,
    ) -> anyhow::Result<Measure> {
        self.reset(client).await?;
        let path = if dedupe { "dedupe" } else { "drain" };
        let group = format!("{}-{path}-{writers}", self.prefix);
        let http = free_port()?;
        let text = if dedupe {
            &self.dedupe_config_text
        } else {
            &self.config_text
        };
        let mut child =
            self.spawn_weir_with(text, writers, &group, http, &format!("{path}-{writers}"))?;
        let pid = child.id();
        Self::wait_ready(http).await?;
        let count_sql = format!("SELECT count(*) FROM \"{}\".wa_events", self.schema);
        // Rows weir may already have written between readiness and now are
        // left out of the rate.
        let already = client.query_one(&count_sql, &[]).await?.get::<_, i64>(0) as u64;
        let (weir_before, broker_before, cpu_before) =
            (ProcStat::read(pid), broker_cpu(), postgres_cpu());
        let profiler = if self.args.profile {
            Some(self.start_profile(pid, &format!("perf-{path}-{writers}.data"))?)
        } else {
            None
        };
        let started = Instant::now();
        let mut sampler = SessionSampler::default();
        let writer_sessions = format!("{}-writer-%", self.config.postgres.application_name);
        loop {
            sampler.sample(client, &writer_sessions).await?;
            if self.stored(client, &group).await? >= events as i64 {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("weir exited during the benchmark: {status}");
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("weir did not drain the topic within an hour");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let weir_after = ProcStat::read(pid);
        let (postgres_cpu, weir_cpu, broker_cpu, sessions) = (
            cpu_delta(&cpu_before, &postgres_cpu()),
            weir_after.cpu_seconds() - weir_before.cpu_seconds(),
            cpu_delta(&broker_before, &broker_cpu()),
            sampler.loads(),
        );
        if let Some(profiler) = profiler {
            stop_profile(profiler)?;
        }
        let metrics = crate::report::fetch(&format!("http://127.0.0.1:{http}/metrics")).await?;
        // Kept beside the logs: the stage counts and sums say how many
        // statements a drain took and where its writers' time went.
        std::fs::write(
            self.args
                .work_dir
                .join(format!("{path}-{writers}-metrics.txt")),
            &metrics,
        )?;
        let measure = Measure {
            rows: items - already,
            seconds,
            postgres_cpu,
            weir_cpu,
            broker_cpu,
            peak_rss_mib: peak_rss_mib(pid),
            weir_kernel_cpu: weir_after.kernel_seconds - weir_before.kernel_seconds,
            weir_faults: weir_after.minor_faults - weir_before.minor_faults,
            sessions,
            writers_busy: writers_busy(&metrics),
            pauses: crate::report::metric_sum(&metrics, "weir_backpressure_pauses_total", ""),
        };
        let written = client.query_one(&count_sql, &[]).await?.get::<_, i64>(0);
        terminate(&mut child)?;
        anyhow::ensure!(
            written as u64 == items,
            "weir wrote {written} rows, expected {items}"
        );
        Ok(measure)
    }

    /// PostgreSQL's counts of checkpoints (timed, requested) and of
    /// autovacuums and autoanalyzes of the bench schema's tables: work of
    /// the server's own that competes with the writers for the machine.
    async fn background(&self, client: &Client) -> anyhow::Result<[i64; 4]> {
        let row = client
            .query_one(
                "SELECT (SELECT checkpoints_timed FROM pg_stat_bgwriter),
                        (SELECT checkpoints_req FROM pg_stat_bgwriter),
                        coalesce(sum(autovacuum_count), 0)::int8,
                        coalesce(sum(autoanalyze_count), 0)::int8
                   FROM pg_stat_user_tables WHERE schemaname = $1",
                &[&self.schema],
            )
            .await?;
        Ok(std::array::from_fn(|i| row.get(i)))
    }

    /// Live traffic at `events_per_second` for `latency_secs`, weir with 2 writers.
    async fn latency(&self, client: &Client, events_per_second: f64) -> anyhow::Result<Latency> {
        self.reset(client).await?;
        let prefix = format!("{}live", self.prefix);
        let group = format!("{prefix}-group");
        let http = free_port()?;
        // Same config, the live topics.
        let live = Bench {
            config_text: self
                .config_text
                .replace(&format!("{}.", self.prefix), &format!("{prefix}.")),
            dedupe_config_text: String::new(),
            url: self.url.clone(),
            brokers: self.brokers.clone(),
            schema: self.schema.clone(),
            prefix: prefix.clone(),
            config: self.config.clone(),
            args: self.args.clone(),
        };
        let (brokers, topics, partitions) = (
            self.brokers.clone(),
            vec![
                format!("{prefix}.whatsapp.webhooks"),
                format!("{prefix}.chat.messages"),
            ],
            self.args.partitions,
        );
        tokio::task::spawn_blocking(move || {
            crate::produce::ensure_topics(&brokers, &topics, partitions)
        })
        .await??;
        let mut child = live.spawn_weir(2, &group, http, "latency")?;
        Self::wait_ready(http).await?;
        let rate = events_per_second.max(1.0) as u64;
        let run_dir = self.args.work_dir.join(format!("live-{}", self.schema));
        let brokers = self.brokers.clone();
        let args = ProduceArgs {
            count: rate * self.args.latency_secs,
            rate,
            duration_secs: Some(self.args.latency_secs),
            seed: SEED + 1,
            companies: shape().companies,
            zipf: shape().zipf_exponent,
            spread_days: 0.0,
            late: 0.0,
            malformed: 0.0,
            duplicates: 0.0,
            chat_share: 0.0,
            partitions: self.args.partitions,
            topic_prefix: Some(prefix.clone()),
            batch_messages: 10_000,
            out: run_dir,
            quiet: true,
        };
        // Who uses the machine while the traffic runs: on one machine the
        // generator and the broker compete with weir and PostgreSQL, and a
        // saturated machine sets the tail whatever weir does.
        let weir_pid = child.id();
        let cpu_now = || {
            (
                cpu_seconds(weir_pid),
                postgres_cpu(),
                broker_cpu(),
                cpu_seconds(std::process::id()),
            )
        };
        let background_before = self.background(client).await?;
        let pg_started: f64 = client
            .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
            .await?
            .get(0);
        let written_back_before = pages_written_back();
        let cpu_before = cpu_now();
        let traffic_started = Instant::now();
        let manifest = tokio::task::spawn_blocking(move || produce(&brokers, &args)).await??;
        let started = Instant::now();
        while self.stored(client, &group).await? < manifest.count as i64 {
            if started.elapsed() > Duration::from_secs(300) {
                bail!("weir did not catch up with the live traffic");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let wall = traffic_started.elapsed().as_secs_f64();
        let cpu_after = cpu_now();
        let cores = [
            cpu_after.0 - cpu_before.0,
            cpu_delta(&cpu_before.1, &cpu_after.1),
            cpu_delta(&cpu_before.2, &cpu_after.2),
            cpu_after.3 - cpu_before.3,
        ]
        .map(|seconds| seconds / wall);
        let background_after = self.background(client).await?;
        let background: [i64; 4] =
            std::array::from_fn(|i| background_after[i] - background_before[i]);
        // The kernel writes a file's dirty pages back 30 s (by default) after
        // it was first dirtied, all at once, and PostgreSQL's WAL flushes
        // may queue behind that on the disk. nr_written counts pages of
        // PAGE_SIZE, 4 KiB on the machines the bench runs on.
        let written_back_mib = pages_written_back()
            .zip(written_back_before)
            .map(|(after, before)| (after - before) as f64 * 4096.0 / (1 << 20) as f64);
        println!(
            "background work during the live traffic: PostgreSQL {} timed and {} requested checkpoints, {} autovacuums and {} autoanalyzes of the bench's tables; the kernel wrote {} to disk (WAL, data files)",
            background[0],
            background[1],
            background[2],
            background[3],
            written_back_mib.map_or("an unknown amount".to_string(), |m| format!("{m:.0} MiB"))
        );
        // When they finished, to line them up with the p99 by second below.
        let finished: Vec<String> = client
            .query(
                "SELECT relname, work, extract(epoch FROM finished)::float8 - $2
                   FROM pg_stat_user_tables,
                        LATERAL (VALUES ('autovacuum', last_autovacuum),
                                        ('autoanalyze', last_autoanalyze)) AS w(work, finished)
                  WHERE schemaname = $1 AND finished >= to_timestamp($2)
                  ORDER BY 3",
                &[&self.schema, &pg_started],
            )
            .await?
            .iter()
            .map(|row| {
                format!(
                    "{} of {} finished at second {:.1}",
                    row.get::<_, &str>(1),
                    row.get::<_, &str>(0),
                    row.get::<_, f64>(2)
                )
            })
            .collect();
        if !finished.is_empty() {
            println!("  {}", finished.join("; "));
        }
        let scrape = crate::report::fetch(&format!("http://127.0.0.1:{http}/metrics")).await?;
        terminate(&mut child)?;
        // Kept for reading the stages' histograms after the run.
        std::fs::write(self.args.work_dir.join("latency-metrics.txt"), &scrape)?;
        let metric = crate::report::metric_percentiles(&scrape)
            .remove("wa_events")
            .unwrap_or_default();
        let rows = client
            .query_one(
                &format!(
                    "WITH r AS (SELECT received_at, ingested_at, extract(epoch FROM ingested_at - received_at) AS lat
                                  FROM \"{0}\".wa_events)
                     SELECT count(*), percentile_cont(0.99) WITHIN GROUP (ORDER BY lat),
                            extract(epoch FROM max(ingested_at) - min(ingested_at))::float8,
                            coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY lat)
                                       FILTER (WHERE received_at >= (SELECT min(received_at) FROM r) + interval '{1} seconds'), 0)
                       FROM r",
                    self.schema, WARM_UP_SECS
                ),
                &[],
            )
            .await?;
        let written: i64 = rows.get(0);
        let span: f64 = rows.get(2);
        // The tail over the run, second by second (by Kafka timestamp): each
        // second's p99, to tell a tail that grows from one that comes and
        // goes, and the seconds holding the most rows over 250 ms.
        let by_second: Vec<(i64, f64, i64, i64, f64)> = client
            .query(
                &format!(
                    "WITH r AS (SELECT received_at, extract(epoch FROM ingested_at - received_at) AS lat
                                  FROM \"{0}\".wa_events)
                     SELECT floor(extract(epoch FROM received_at - (SELECT min(received_at) FROM r)))::int8,
                            percentile_cont(0.99) WITHIN GROUP (ORDER BY lat),
                            count(*) FILTER (WHERE lat > 0.25), count(*), max(lat)::float8
                       FROM r GROUP BY 1 ORDER BY 1",
                    self.schema
                ),
                &[],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
            .collect();
        println!(
            "latency p99 by second of the run (ms, rows): {}",
            by_second
                .iter()
                .map(|(_, p99, ..)| format!("{:.0}", p99 * 1000.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut slow: Vec<_> = by_second
            .iter()
            .filter(|(_, _, over, ..)| *over > 0)
            .collect();
        slow.sort_by_key(|(second, _, over, ..)| (std::cmp::Reverse(*over), *second));
        let seconds: Vec<String> = slow
            .iter()
            .take(5)
            .map(|(second, _, over, rows, worst)| {
                format!(
                    "second {second}: {over} of {rows} rows over 250 ms, worst {:.0} ms",
                    worst * 1000.0
                )
            })
            .collect();
        println!(
            "latency tail by second of the run: {}",
            if seconds.is_empty() {
                "no row over 250 ms".to_string()
            } else {
                seconds.join("; ")
            }
        );
        let expected: usize = {
            let mut generator = Generator::new(Shape {
                seed: SEED + 1,
                now_secs: manifest.shape.now_secs,
                spread_secs: 0,
                ..shape()
            });
            (0..manifest.count)
                .map(|_| {
                    generator
                        .next_event()
                        .rows
                        .iter()
                        .filter(|r| r.table == "wa_events")
                        .count()
                })
                .sum()
        };
        anyhow::ensure!(
            written as usize == expected,
            "live phase: {written} rows written, {expected} expected"
        );
        Ok(Latency {
            offered_events: manifest.achieved_rate,
            achieved_rows: written as f64 / span.max(1.0),
            metric_p50: metric.p50,
            metric_p99: metric.p99,
            row_p99: rows.get(1),
            steady_p99: rows.get(3),
            cores,
        })
    }
}

struct Latency {
    offered_events: f64,
    achieved_rows: f64,
    metric_p50: f64,
    metric_p99: f64,
    row_p99: f64,
    /// p99 from the rows, leaving out those appended in the first
    /// `WARM_UP_SECS` seconds of the run.
    steady_p99: f64,
    /// Cores used while the traffic ran (from its start until weir had
    /// committed all of it): weir, PostgreSQL, the broker, the generator
    /// (this process).
    cores: [f64; 4],
}

impl Latency {
    /// "weir 0.25, PostgreSQL 0.62, ... : 1.84 of 2 cores".
    fn cores_text(&self) -> String {
        let [weir, postgres, broker, generator] = self.cores;
        let machine = std::thread::available_parallelism().map_or(0, usize::from);
        format!(
            "weir {weir:.2}, PostgreSQL {postgres:.2}, the broker {broker:.2}, the generator {generator:.2}: \
             {:.2} of the machine's {machine} cores",
            weir + postgres + broker + generator
        )
    }
}

/// Seconds at the start of the live phase left out of the steady-state p99.
const WARM_UP_SECS: u64 = 5;

/// Stops `perf record` (SIGINT makes it write its data) and waits for it.
fn stop_profile(mut profiler: Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-INT", &profiler.id().to_string()])
        .status()?;
    profiler.wait()?;
    Ok(())
}

pub(crate) fn terminate(child: &mut Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({cpu}), {memory:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// What producing the preloaded topic cost the generator and the broker.
struct Preload {
    events: u64,
    events_per_second: f64,
    generator_cpu: f64,
    broker_cpu: f64,
}

/// A plain librdkafka consumer (no group, no processing) reads `events`
/// messages of `topic` from the start of every partition: the broker's
/// delivery ceiling on this machine. `rows` of the result are messages.
async fn broker_read_ceiling(brokers: &str, topic: &str, events: u64) -> anyhow::Result<Measure> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let brokers = brokers.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "weir-bench-ceiling")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("ceiling consumer")?;
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .context("topic metadata")?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        {
            assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let broker_before = broker_cpu();
        let started = Instant::now();
        let mut read = 0u64;
        while read < events {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => read += 1,
                Some(Err(err)) => bail!("ceiling consumer: {err}"),
                None if started.elapsed() > Duration::from_secs(600) => {
                    bail!("ceiling consumer read {read} of {events} messages in 10 minutes")
                }
                None => {}
            }
        }
        Ok(Measure {
            rows: read,
            seconds: started.elapsed().as_secs_f64(),
            postgres_cpu: 0.0,
            weir_cpu: 0.0,
            broker_cpu: cpu_delta(&broker_before, &broker_cpu()),
            ..Measure::default()
        })
    })
    .await?
}

/// Every phase's measurements, for the results section.
struct Phases<'a> {
    limit: &'a [Measure],
    preload: &'a Preload,
    ceiling: &'a Measure,
    drained: &'a [Measure],
    deduped: &'a [Measure],
    latency: &'a Latency,
}

fn results_section(
    bench: &Bench,
    id: &str,
    events: u64,
    items: u64,
    phases: &Phases<'_>,
) -> anyhow::Result<String> {
    let Phases {
        limit,
        preload,
        ceiling,
        drained,
        deduped,
        latency,
    } = *phases;
    let mut s = String::new();
    let _ = writeln!(s, "\n## Run {id}\n");
    let _ = writeln!(
        s,
        "Command: `weir-loadtest bench --items {} --partitions {} --latency-secs {} --batch-messages {}` on the local stack \
         (`deploy/local/stack.sh`: PostgreSQL 15, tansu in-memory broker; preloaded with up to {} records per lz4-compressed Kafka batch).\n\
         Machine: {}. Workload: {events} WhatsApp webhook bodies, {items} `wa_events` rows \
         (shipped schema: 3 btree indexes, a partial one and a unique one, jsonb payload), direct COPY path (no dedupe key) \
         unless the row says otherwise, {} Kafka partitions.\n",
        bench.args.items,
        bench.args.partitions,
        bench.args.latency_secs,
        bench.args.batch_messages,
        bench.args.batch_messages,
        machine(),
        bench.args.partitions
    );
    let _ = writeln!(
        s,
        "| load | rows/s | ratio to the limit | weir CPU/row | PostgreSQL CPU/row | weir/PostgreSQL CPU | broker CPU/row | weir peak RSS |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (streams, m) in limit.iter().enumerate() {
        let _ = writeln!(
            s,
            "| limit: server-side binary COPY, {} session(s) | {:.0} | 1.00 | - | {:.1} us | - | - | - |",
            streams + 1,
            m.rate(),
            Measure::per_row_us(m.postgres_cpu, m.rows)
        );
    }
    for (writers, m) in drained.iter().enumerate() {
        let _ = writeln!(
            s,
            "| weir, {} writer(s), draining the topic | {:.0} | {:.2} | {:.1} us | {:.1} us | {:.2} | {:.1} us | {:.0} MiB |",
            writers + 1,
            m.rate(),
            m.rate() / limit[writers].rate(),
            Measure::per_row_us(m.weir_cpu, m.rows),
            Measure::per_row_us(m.postgres_cpu, m.rows),
            m.weir_cpu / m.postgres_cpu.max(1e-9),
            Measure::per_row_us(m.broker_cpu, m.rows),
            m.peak_rss_mib
        );
    }
    for (writers, m) in deduped.iter().enumerate() {
        let _ = writeln!(
            s,
            "| weir, {} writer(s), dedupe path (staged COPY, then INSERT ... ON CONFLICT DO NOTHING) | {:.0} | {:.2} ({:.2} of the plain path) | {:.1} us | {:.1} us | {:.2} | {:.1} us | {:.0} MiB |",
            writers + 1,
            m.rate(),
            m.rate() / limit[writers].rate(),
            m.rate() / drained[writers].rate(),
            Measure::per_row_us(m.weir_cpu, m.rows),
            Measure::per_row_us(m.postgres_cpu, m.rows),
            m.weir_cpu / m.postgres_cpu.max(1e-9),
            Measure::per_row_us(m.broker_cpu, m.rows),
            m.peak_rss_mib
        );
    }
    for (writers, m) in drained.iter().enumerate() {
        let _ = writeln!(
            s,
            "\nWhere the time goes, {} writer(s): {}.",
            writers + 1,
            where_the_time_goes(m)
        );
    }
    let _ = writeln!(
        s,
        "\nThe other processes: the generator preloaded {} bodies at {:.0} bodies/s using {:.1} us CPU per body \
         (batched, lz4-compressed), the broker {:.1} us per body taking them in. A plain librdkafka consumer \
         (no group, no processing) reads the preloaded topic at {:.0} msg/s, the broker using {:.1} us CPU per message: \
         the broker's ceiling here.",
        preload.events,
        preload.events_per_second,
        Measure::per_row_us(preload.generator_cpu, preload.events),
        Measure::per_row_us(preload.broker_cpu, preload.events),
        ceiling.rate(),
        Measure::per_row_us(ceiling.broker_cpu, ceiling.rows)
    );
    let _ = writeln!(
        s,
        "\nLatency, live traffic offered at {:.0} bodies/s (half of weir's best rate in rows, {:.0} rows/s achieved), 2 writers: \
         Kafka append to commit p50 {:.0} ms, p99 {:.0} ms (weir's `weir_end_to_end_seconds`, interpolated in buckets); \
         p99 {:.0} ms from the rows (`ingested_at - received_at`); p99 {:.0} ms from the rows appended after the first {WARM_UP_SECS} s \
         (steady state). Cores used during the live traffic: {}.\n",
        latency.offered_events,
        latency.achieved_rows,
        latency.metric_p50 * 1000.0,
        latency.metric_p99 * 1000.0,
        latency.row_p99 * 1000.0,
        latency.steady_p99 * 1000.0,
        latency.cores_text()
    );
    let best = |i: usize| {
        drained
            .get(i)
            .map(|m| m.rate() / limit[i].rate())
            .unwrap_or(0.0)
    };
    let cpu_ratio = drained
        .iter()
        .map(|m| m.weir_cpu / m.postgres_cpu.max(1e-9))
        .fold(f64::MAX, f64::min);
    let rss = drained.iter().map(|m| m.peak_rss_mib).fold(0.0, f64::max);
    let dedupe = deduped
        .iter()
        .zip(drained)
        .map(|(d, p)| d.rate() / p.rate())
        .fold(f64::MAX, f64::min);
    let _ = writeln!(
        s,
        "Targets: 1 writer >= 0.9 of the 1-session limit: {:.2} ({}); 2 writers >= 0.85 of the 2-session limit: {:.2} ({}); \
         weir CPU/row <= 0.25 of PostgreSQL's: {:.2} ({}); peak RSS < 150 MiB: {:.0} MiB ({}); p99 <= 250 ms at half rate: {:.0} ms ({}), {:.0} ms after the first {WARM_UP_SECS} s ({}); \
         dedupe path >= 0.6 of plain COPY: {:.2} ({}).",
        best(0),
        verdict(best(0) >= 0.9),
        best(1),
        verdict(best(1) >= 0.85),
        cpu_ratio,
        verdict(cpu_ratio <= 0.25),
        rss,
        verdict(rss < 150.0),
        latency.metric_p99 * 1000.0,
        verdict(latency.metric_p99 <= 0.25),
        latency.steady_p99 * 1000.0,
        verdict(latency.steady_p99 <= 0.25),
        dedupe,
        verdict(dedupe >= 0.6)
    );
    Ok(s)
}

/// weir's writer sessions in PostgreSQL (busy and CPU fractions) and
/// weir's writers (fraction of their time writing), in one line.
fn where_the_time_goes(m: &Measure) -> String {
    let sessions: Vec<String> = m
        .sessions
        .iter()
        .map(|l| {
            let waits: Vec<String> = l
                .waits
                .iter()
                .map(|(wait, share)| format!("{wait} {:.0}%", share * 100.0))
                .collect();
            format!(
                "PostgreSQL backend {} busy {:.0}% of samples (waiting on {}), CPU {:.0}%",
                l.name,
                l.busy * 100.0,
                if waits.is_empty() {
                    "nothing".to_string()
                } else {
                    waits.join(", ")
                },
                l.cpu * 100.0
            )
        })
        .collect();
    let writers: Vec<String> = m
        .writers_busy
        .iter()
        .map(|(writer, busy)| {
            format!(
                "weir writer {writer} writing {:.0}% of its time",
                busy * 100.0
            )
        })
        .collect();
    format!(
        "{}; {}; weir used {:.0}% of a core ({:.0}% of it in the kernel, {:.2} page faults per row); backpressure paused the partitions {:.0} times",
        sessions.join(", "),
        writers.join(", "),
        m.weir_cpu / m.seconds.max(1e-9) * 100.0,
        m.weir_kernel_cpu / m.weir_cpu.max(1e-9) * 100.0,
        m.weir_faults / (m.rows.max(1) as f64),
        m.pauses
    )
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

pub(crate) fn append_results(path: &Path, section: &str) -> anyhow::Result<()> {
    let mut text =
        std::fs::read_to_string(path).unwrap_or_else(|_| "# weir benchmark results\n".into());
    text.push_str(section);
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod writer_time_tests {
    use super::writers_busy;

    #[test]
    fn the_busy_fraction_per_writer_comes_from_the_histogram_sums() {
        let metrics = "\
# TYPE weir_writer_seconds histogram
weir_writer_seconds_bucket{writer=\"0\",state=\"idle\",le=\"+Inf\"} 10
weir_writer_seconds_sum{writer=\"0\",state=\"idle\"} 3
weir_writer_seconds_count{writer=\"0\",state=\"idle\"} 10
weir_writer_seconds_sum{writer=\"0\",state=\"writing\"} 9
weir_writer_seconds_sum{writer=\"1\",state=\"writing\"} 2
weir_writer_seconds_sum{writer=\"1\",state=\"idle\"} 6
";
        let busy = writers_busy(metrics);
        assert_eq!(busy.len(), 2);
        assert_eq!(busy[0].0, "0");
        assert!((busy[0].1 - 0.75).abs() < 1e-9);
        assert!((busy[1].1 - 0.25).abs() < 1e-9);
    }
}

#[cfg(test)]
mod proc_stat_tests {
    use super::{ProcStat, cpu_delta};
    use std::collections::HashMap;

    /// Fields are counted from the name's last `)`, whatever the name
    /// holds: minflt is field 10, utime 14, stime 15 (proc(5)).
    #[test]
    fn a_stat_line_gives_cpu_and_minor_faults() {
        let line = "4242 (tokio) rt (1)) S 1 4242 4242 0 -1 4194560 \
                    777 0 3 0 250 50 0 0 20 0 9 0 100 0 0";
        let stat = ProcStat::parse(line, 100.0);
        assert_eq!(stat.minor_faults, 777.0);
        assert_eq!(stat.user_seconds, 2.5);
        assert_eq!(stat.kernel_seconds, 0.5);
        assert_eq!(stat.cpu_seconds(), 3.0);
        // A line cut short reads as nothing, not as a neighbour's field.
        let cut = ProcStat::parse("4242 (weir) S 1 4242", 100.0);
        assert_eq!((cut.minor_faults, cut.cpu_seconds()), (0.0, 0.0));
    }

    /// A process that exits between the readings is left out rather than
    /// counted as having given its CPU back; one started in between counts
    /// whole.
    #[test]
    fn cpu_deltas_leave_out_processes_that_exited() {
        let before = HashMap::from([(10, 5.0), (11, 40.0)]);
        let after = HashMap::from([(10, 6.5), (12, 0.25)]);
        assert_eq!(cpu_delta(&before, &after), 1.75);
        assert_eq!(cpu_delta(&before, &HashMap::new()), 0.0);
    }
}
