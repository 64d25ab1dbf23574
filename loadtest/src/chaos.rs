//! `chaos`: inject faults while weir ingests, then count every item.
//!
//! The runner provisions a private stack of its own (PostgreSQL and a tansu
//! broker, through `deploy/local/stack.sh`, in `<work-dir>/stack` on free
//! ports), so restarting PostgreSQL or cutting the broker never disturbs
//! anything else. Two fault proxies ([`crate::proxy`]) stand in the network
//! paths: weir and the generator reach the broker only through one (the
//! broker advertises the proxy's address), weir reaches PostgreSQL only
//! through the other.
//!
//! It starts `--processes` weir processes in one consumer group. Every run
//! sends `--rate` events per second for `--secs` seconds with a seed of its
//! own (batched, lz4-compressed, idempotent producer, 2% malformed bodies,
//! 5% redeliveries), injects one fault at a random moment inside that
//! window, measures the time to recover, waits for weir to drain, and then
//! accounts for every item of the run exactly, as `verify` does: every
//! row in its table once, every bad body a dead letter with its reason,
//! nothing else.
//!
//! Time to recover: from the moment the fault ends (the kill, the restart
//! command returning, the outage or stall lifted, SIGCONT, the leaving
//! process gone) until weir has committed everything the broker held at
//! that moment; for a broker outage, everything the generator queued
//! while the broker was unreachable, which reaches the broker only after.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use tokio_postgres::Client;

use crate::bench::{free_port, proc_status_mib, terminate};
use crate::produce::{ProduceArgs, log_ends, produce};
use crate::proxy::{FaultProxy, Mode};
use crate::report::metric_sum;
use crate::verify::{Outcome, Run, check};
use crate::webhooks::{CHAT_TOPIC, WEBHOOK_TOPIC};

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Faults and how many runs of each, comma separated (`fault=runs`).
    /// Faults: kill9, pg-restart (alternating fast and immediate),
    /// terminate (pg_terminate_backend of weir's sessions), broker-outage,
    /// rebalance (a process joins, another leaves), zombie (SIGSTOP past
    /// the session timeout, then SIGCONT), slow-db (latency, then a stall).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill9=50,pg-restart=10,terminate=10,broker-outage=5,rebalance=20,zombie=5,slow-db=3"
    )]
    pub runs: Vec<FaultRuns>,
    /// weir processes in the consumer group.
    #[arg(long, default_value_t = 3)]
    pub processes: usize,
    /// Events per second the generator sends during each run.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds of traffic per run; the fault falls inside this window.
    #[arg(long, default_value_t = 6)]
    pub secs: u64,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Seconds the broker is unreachable in a broker outage.
    #[arg(long, default_value_t = 10)]
    pub outage_secs: u64,
    /// Seeds the traffic (each run adds its number) and the fault schedule.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// How long weir may take to recover from a fault, and to drain a
    /// run, before the run counts as failed.
    #[arg(long, default_value_t = 120)]
    pub patience_secs: u64,
    /// The weir binary.
    #[arg(long, default_value = "target/release/weir")]
    pub weir: PathBuf,
    /// Scratch directory: the private stack, configs, weir's logs, the runs.
    #[arg(long, default_value = "/tmp/weir-chaos")]
    pub work_dir: PathBuf,
    /// Leave the private stack's data (database, broker log) behind, the
    /// servers stopped, for a look after the run.
    #[arg(long)]
    pub keep_stack: bool,
    /// Append the table to this file (e.g. loadtest/RESULTS.md).
    #[arg(long)]
    pub results: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    Kill9,
    PgRestart,
    Terminate,
    BrokerOutage,
    Rebalance,
    Zombie,
    SlowDb,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::Kill9,
        Fault::PgRestart,
        Fault::Terminate,
        Fault::BrokerOutage,
        Fault::Rebalance,
        Fault::Zombie,
        Fault::SlowDb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill9",
            Fault::PgRestart => "pg-restart",
            Fault::Terminate => "terminate",
            Fault::BrokerOutage => "broker-outage",
            Fault::Rebalance => "rebalance",
            Fault::Zombie => "zombie",
            Fault::SlowDb => "slow-db",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9 of a weir process (restarted after 1 s)",
            Fault::PgRestart => "PostgreSQL restart, fast and immediate modes alternating",
            Fault::Terminate => "pg_terminate_backend of all of weir's sessions",
            Fault::BrokerOutage => "broker unreachable (connections cut, new ones refused)",
            Fault::Rebalance => "a process joins, then another leaves (SIGTERM)",
            Fault::Zombie => "SIGSTOP past the session timeout, the group moves on, SIGCONT",
            Fault::SlowDb => "database link: 150 ms latency each way for 5 s, then stalled 8 s",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct FaultRuns {
    pub fault: Fault,
    pub runs: usize,
}

impl FromStr for FaultRuns {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, runs) = text
            .split_once('=')
            .ok_or_else(|| format!("`{text}`: expected fault=runs, e.g. kill9=50"))?;
        let fault = Fault::ALL
            .into_iter()
            .find(|f| f.name() == name.trim())
            .ok_or_else(|| {
                format!(
                    "unknown fault `{name}` (one of: {})",
                    Fault::ALL.map(Fault::name).join(", ")
                )
            })?;
        let runs = runs
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: runs must be a whole number"))?;
        Ok(FaultRuns { fault, runs })
    }
}

/// How a fault went and when it ended.
struct Injected {
    ended: Instant,
    note: String,
}

/// One run's figures.
struct RunResult {
    events: u64,
    outcome: Outcome,
    recovered: Option<Duration>,
    note: String,
}

/// The private stack: PostgreSQL, tansu and the two fault proxies.
struct Stack {
    dir: PathBuf,
    keep: bool,
    pg_port: u16,
    kafka_port: u16,
    broker: FaultProxy,
    database: FaultProxy,
}

impl Stack {
    fn script(&self, args: &[&str]) -> Command {
        let mut command = Command::new("deploy/local/stack.sh");
        command
            .args(args)
            .env("WEIR_STACK_DIR", &self.dir)
            .env("WEIR_STACK_PG_PORT", self.pg_port.to_string())
            .env("WEIR_STACK_KAFKA_PORT", self.kafka_port.to_string())
            .env(
                "WEIR_STACK_KAFKA_ADVERTISED",
                self.broker.addr().to_string(),
            )
            // The broker logs every request at info: its default level
            // keeps a long run's log (and the disk) small.
            .env_remove("RUST_LOG")
            .stdout(Stdio::null());
        command
    }

    async fn up(work_dir: &Path, keep: bool) -> anyhow::Result<Stack> {
        let dir = work_dir.join("stack");
        let localhost = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let (pg_port, kafka_port) = (free_port()?, free_port()?);
        let broker = FaultProxy::start(localhost(free_port()?), localhost(kafka_port)).await?;
        let database = FaultProxy::start(localhost(free_port()?), localhost(pg_port)).await?;
        let stack = Stack {
            dir,
            keep,
            pg_port,
            kafka_port,
            broker,
            database,
        };
        let status = stack
            .script(&["up"])
            .status()
            .context("run deploy/local/stack.sh (from the repository root)")?;
        anyhow::ensure!(status.success(), "deploy/local/stack.sh up failed");
        Ok(stack)
    }

    /// Straight to PostgreSQL: the runner's own session and the faults.
    fn direct_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/weir", self.pg_port)
    }

    /// Through the database fault proxy: weir's.
    fn proxied_url(&self) -> String {
        format!("postgres://postgres@{}/weir", self.database.addr())
    }

    fn brokers(&self) -> String {
        self.broker.addr().to_string()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Stops both servers and deletes the database; the servers' logs
        // stay beside weir's for a look at a failed run.
        let command = if self.keep { "down" } else { "destroy" };
        let _ = self.script(&[command]).stderr(Stdio::null()).status();
    }
}

/// One weir process.
struct Pod {
    name: String,
    child: Child,
    http: u16,
    log: PathBuf,
}

/// weir's processes, all in one group, all with the same config.
struct Fleet {
    weir: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
    pods: Vec<Pod>,
    started: usize,
}

impl Fleet {
    fn spawn(&mut self) -> anyhow::Result<()> {
        self.started += 1;
        let name = format!("weir-{}", self.started);
        let http = free_port()?;
        let log = self.dir.join(format!("{name}.log"));
        let child = Command::new(&self.weir)
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("WEIR_HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", self.weir.display()))?;
        self.pods.push(Pod {
            name,
            child,
            http,
            log,
        });
        Ok(())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        for pod in &self.pods {
            crate::bench::Bench::wait_ready(pod.http)
                .await
                .with_context(|| format!("{} (log: {})", pod.name, pod.log.display()))?;
        }
        Ok(())
    }

    fn signal(&self, index: usize, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.pods[index].child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// Every process still running (a crash is a finding).
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for pod in &mut self.pods {
            if let Some(status) = pod.child.try_wait()? {
                bail!(
                    "{} exited on its own ({status}); log: {}",
                    pod.name,
                    pod.log.display()
                );
            }
        }
        Ok(())
    }

    /// Resident memory of all processes (MiB), their paused (held back)
    /// partitions, and their backpressure pauses so far.
    async fn sample(&self) -> (f64, f64, f64) {
        let (mut rss, mut paused, mut pauses) = (0.0, 0.0, 0.0);
        for pod in &self.pods {
            rss += proc_status_mib(pod.child.id(), "VmRSS");
            let metrics = scrape(pod.http).await;
            paused += metric_sum(&metrics, "weir_paused_partitions", "");
            pauses += metric_sum(&metrics, "weir_backpressure_pauses_total", "");
        }
        (rss, paused, pauses)
    }

    fn stop_all(&mut self) {
        for pod in &mut self.pods {
            let _ = terminate(&mut pod.child);
        }
        self.pods.clear();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
    }
}

async fn scrape(http: u16) -> String {
    crate::report::fetch(&format!("http://127.0.0.1:{http}/metrics"))
        .await
        .unwrap_or_default()
}

struct Chaos<'a> {
    args: &'a ChaosArgs,
    stack: Stack,
    fleet: Fleet,
    client: Client,
    watermarks: BaseConsumer,
    topics: Vec<String>,
    prefix: String,
    group: String,
    rng: SmallRng,
    runs_done: u64,
    zombie: Option<Zombie>,
}

pub async fn chaos(args: &ChaosArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.weir.exists(),
        "{} not found: cargo build --release -p weir",
        args.weir.display()
    );
    anyhow::ensure!(args.processes >= 2, "--processes: at least 2");
    anyhow::ensure!(args.rate > 0 && args.secs > 0, "--rate and --secs: above 0");
    let _ = std::fs::remove_dir_all(&args.work_dir);
    std::fs::create_dir_all(&args.work_dir)?;
    let work_dir = std::fs::canonicalize(&args.work_dir)?;
    println!(
        "chaos: provisioning a private stack in {}",
        work_dir.display()
    );
    let stack = Stack::up(&work_dir, args.keep_stack).await?;
    let client = crate::connect(&stack.direct_url()).await?;

    let prefix = "chaos".to_string();
    let group = "chaos".to_string();
    let topics = vec![
        format!("{prefix}.{WEBHOOK_TOPIC}"),
        format!("{prefix}.{CHAT_TOPIC}"),
    ];
    {
        let (brokers, topics, partitions) = (stack.brokers(), topics.clone(), args.partitions);
        tokio::task::spawn_blocking(move || {
            crate::produce::ensure_topics(&brokers, &topics, partitions)
        })
        .await??;
    }

    let (config_text, _) = crate::reads::config_for(
        &stack.proxied_url(),
        &stack.brokers(),
        "public",
        &prefix,
        &["wa_events", "messages", "webhook_logs"],
        false,
    )?;
    let config = work_dir.join("weir.toml");
    std::fs::write(&config, &config_text)?;
    let env: Vec<(String, String)> = [
        ("WEIR_DATABASE_URL", stack.proxied_url()),
        ("WEIR_KAFKA__BROKERS", stack.brokers()),
        ("WEIR_KAFKA__GROUP_ID", group.clone()),
        ("WEIR_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "10".into()),
        ("WEIR_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000".into()),
        // A small budget and short writer queues, so backpressure (holding
        // partitions back) takes part in every fault, not only in the slow
        // database.
        ("WEIR_PIPELINE__MAX_IN_FLIGHT_BYTES", "4194304".into()),
        ("WEIR_PIPELINE__QUEUE_MESSAGES", "1024".into()),
        (
            "WEIR_KAFKA__PROPERTIES__QUEUED_MAX_MESSAGES_KBYTES",
            "1024".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let migrated = Command::new(&args.weir)
        .args(["migrate", "--config"])
        .arg(&config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("WEIR_DATABASE_URL", stack.direct_url())
        .status()?;
    anyhow::ensure!(migrated.success(), "weir migrate failed");

    let watermarks: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack.brokers())
        .set("group.id", "chaos-watermarks")
        .create()
        .context("kafka client")?;
    let mut fleet = Fleet {
        weir: args.weir.clone(),
        config,
        env,
        dir: work_dir.clone(),
        pods: Vec::new(),
        started: 0,
    };
    for _ in 0..args.processes {
        fleet.spawn()?;
    }
    fleet.wait_ready().await?;
    println!(
        "chaos: {} weir processes ready; broker via {}, PostgreSQL via {}",
        args.processes,
        stack.broker.addr(),
        stack.database.addr()
    );
    let mut chaos = Chaos {
        args,
        stack,
        fleet,
        client,
        watermarks,
        topics,
        prefix,
        group,
        rng: SmallRng::seed_from_u64(args.seed),
        runs_done: 0,
        zombie: None,
    };
    let started = Instant::now();
    let mut results: BTreeMap<Fault, Vec<RunResult>> = BTreeMap::new();
    for plan in &args.runs {
        for index in 0..plan.runs {
            let result = chaos.run(plan.fault, index).await.with_context(|| {
                format!("{} run {} of {}", plan.fault.name(), index + 1, plan.runs)
            })?;
            results.entry(plan.fault).or_default().push(result);
        }
    }
    chaos.fleet.stop_all();
    let (table, all_ok) = table(&results);
    println!("\n{table}");
    if let Some(path) = &args.results {
        let section = format!(
            "\n## Chaos run {}\n\nCommand: `weir-loadtest chaos {}`\n\n{}. {} weir processes, {} events/s for {} s per run, {} partitions per topic, {:.0} minutes in all.\n\n{}\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            std::env::args().skip(2).collect::<Vec<_>>().join(" "),
            crate::bench::machine(),
            args.processes,
            args.rate,
            args.secs,
            args.partitions,
            started.elapsed().as_secs_f64() / 60.0,
            table
        );
        crate::bench::append_results(path, &section)?;
        println!("results appended to {}", path.display());
    }
    println!("{}", if all_ok { "chaos: ok" } else { "chaos: FAILED" });
    Ok(all_ok)
}

impl Chaos<'_> {
    async fn run(&mut self, fault: Fault, index: usize) -> anyhow::Result<RunResult> {
        self.fleet.check_alive()?;
        self.runs_done += 1;
        let seed = self.args.seed * 1000 + self.runs_done;
        let out = self
            .args
            .work_dir
            .join(format!("run-{}-{}", fault.name(), index + 1));
        let count = self.args.rate * self.args.secs;
        let produce_args = produce_args(&[
            "--count",
            &count.to_string(),
            "--rate",
            &self.args.rate.to_string(),
            "--seed",
            &seed.to_string(),
            "--malformed",
            "0.02",
            "--duplicates",
            "0.05",
            "--partitions",
            &self.args.partitions.to_string(),
            "--topic-prefix",
            &self.prefix,
            "--out",
            out.to_str().context("utf-8 work dir")?,
            "--quiet",
        ]);
        let brokers = self.stack.brokers();
        let producer = tokio::task::spawn_blocking(move || produce(&brokers, &produce_args));
        let window = self.args.secs as f64;
        let at = self.rng.random_range(0.2 * window..0.7 * window);
        tokio::time::sleep(Duration::from_secs_f64(at)).await;
        let injected = self.inject(fault, index).await?;
        let recovered = if fault == Fault::BrokerOutage {
            // The generator could not send either: what it queued during
            // the outage (the whole run, as the window is shorter) reaches
            // the broker after it. Recovered is when weir has committed
            // all of that.
            producer.await.context("generator")??;
            let target = self.log_ends().await?;
            self.wait_recovered(injected.ended, &target).await?
        } else {
            let target = self.log_ends().await?;
            let recovered = self.wait_recovered(injected.ended, &target).await?;
            producer.await.context("generator")??;
            recovered
        };
        let run = Run::load(&out)?;
        let outcome = check(
            &self.client,
            &run,
            "public",
            &self.group,
            Duration::from_secs(self.args.patience_secs),
        )
        .await?;
        let mut note = injected.note;
        if fault == Fault::Zombie {
            note = format!("{note}; {}", self.fencing_seen().await);
        }
        println!(
            "{:<14} run {:>2}: {} events, {} items: lost {}, duplicated {}, unexpected {}, dead letters {}; recovered in {}{}",
            fault.name(),
            index + 1,
            run.events.len(),
            outcome.expected(),
            outcome.lost(),
            outcome.duplicated(),
            outcome.unexpected(),
            outcome.dead_letters(),
            recovered.map_or("NEVER".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
            if note.is_empty() {
                String::new()
            } else {
                format!(" ({note})")
            }
        );
        if !outcome.ok() {
            outcome.print(&run);
            println!(
                "weir's logs: {}",
                self.fleet
                    .pods
                    .iter()
                    .map(|p| p.log.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(RunResult {
            events: run.events.len() as u64,
            outcome,
            recovered,
            note,
        })
    }

    fn pick(&mut self) -> usize {
        self.rng.random_range(0..self.fleet.pods.len())
    }

    async fn inject(&mut self, fault: Fault, index: usize) -> anyhow::Result<Injected> {
        match fault {
            Fault::Kill9 => {
                let victim = self.pick();
                let mut pod = self.fleet.pods.remove(victim);
                // SIGKILL: no shutdown path runs, in-flight transactions die
                // with the connection.
                pod.child.kill()?;
                pod.child.wait()?;
                let ended = Instant::now();
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.fleet.spawn()?;
                Ok(Injected {
                    ended,
                    note: String::new(),
                })
            }
            Fault::PgRestart => {
                let mode = if index.is_multiple_of(2) {
                    "fast"
                } else {
                    "immediate"
                };
                let status = self.stack.script(&["postgres-restart", mode]).status()?;
                anyhow::ensure!(status.success(), "PostgreSQL restart ({mode}) failed");
                let ended = Instant::now();
                // The runner's own session died with the server.
                self.client = crate::connect(&self.stack.direct_url()).await?;
                Ok(Injected {
                    ended,
                    note: mode.to_string(),
                })
            }
            Fault::Terminate => {
                let terminated: i64 = self
                    .client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                           FROM pg_stat_activity
                          WHERE application_name LIKE 'weir-%' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await?
                    .get(0);
                Ok(Injected {
                    ended: Instant::now(),
                    note: format!("{terminated} sessions"),
                })
            }
            Fault::BrokerOutage => {
                self.stack.broker.set(Mode::Down);
                tokio::time::sleep(Duration::from_secs(self.args.outage_secs)).await;
                self.stack.broker.set(Mode::Pass);
                Ok(Injected {
                    ended: Instant::now(),
                    note: format!("{} s", self.args.outage_secs),
                })
            }
            Fault::Rebalance => {
                let leaver = self.pick();
                self.fleet.spawn()?;
                let joined = self.fleet.pods.len() - 1;
                crate::bench::Bench::wait_ready(self.fleet.pods[joined].http).await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                let mut pod = self.fleet.pods.remove(leaver);
                terminate(&mut pod.child)?;
                Ok(Injected {
                    ended: Instant::now(),
                    note: String::new(),
                })
            }
            Fault::Zombie => {
                let victim = self.pick();
                let pod = &self.fleet.pods[victim];
                let before = scrape(pod.http).await;
                let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
                self.zombie = Some(Zombie {
                    name: pod.name.clone(),
                    fenced_before: metric_sum(&before, "weir_fenced_total", ""),
                    batches_before: metric_sum(&before, "weir_batches_total", "outcome=\"fenced\""),
                    log_lines_before: log.lines().filter(|l| l.contains("fenced")).count(),
                });
                self.fleet.signal(victim, "-STOP")?;
                // Past the 6 s session timeout: the group evicts it and
                // hands its partitions to the others, who commit past it.
                tokio::time::sleep(Duration::from_secs(11)).await;
                self.fleet.signal(victim, "-CONT")?;
                Ok(Injected {
                    ended: Instant::now(),
                    note: format!("{} stopped 11 s", self.fleet.pods[victim].name),
                })
            }
            Fault::SlowDb => {
                let (before, _, pauses_before) = self.fleet.sample().await;
                let (mut peak, mut paused, mut pauses) = (before, 0.0f64, pauses_before);
                // Latency first (every statement slower), then a stall
                // (nothing moves); the generator keeps sending throughout.
                for (mode, secs) in [
                    (Mode::Delay(Duration::from_millis(150)), 5),
                    (Mode::Stall, 8),
                ] {
                    self.stack.database.set(mode);
                    let until = Instant::now() + Duration::from_secs(secs);
                    while Instant::now() < until {
                        let (rss, held, paused_so_far) = self.fleet.sample().await;
                        peak = peak.max(rss);
                        paused = paused.max(held);
                        pauses = paused_so_far;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                self.stack.database.set(Mode::Pass);
                Ok(Injected {
                    ended: Instant::now(),
                    note: format!(
                        "RSS of all processes {before:.0} MiB before, {peak:.0} MiB at most; up to {paused:.0} partitions held back, {:.0} backpressure pauses",
                        pauses - pauses_before
                    ),
                })
            }
        }
    }

    /// The broker's log end of every partition of the topics (right after
    /// an outage the broker may need a moment to answer).
    async fn log_ends(&self) -> anyhow::Result<HashMap<(String, i32), i64>> {
        tokio::task::block_in_place(|| {
            log_ends(&self.watermarks, &self.topics, Duration::from_secs(120))
        })
    }

    /// Waits until weir's committed offsets reach `target`; the time since
    /// `since`, or None after `--patience-secs`.
    async fn wait_recovered(
        &mut self,
        since: Instant,
        target: &HashMap<(String, i32), i64>,
    ) -> anyhow::Result<Option<Duration>> {
        loop {
            let committed: HashMap<(String, i32), i64> = match self
                .client
                .query(
                    "SELECT topic, partition, next_offset FROM weir_offsets WHERE consumer_group = $1",
                    &[&self.group],
                )
                .await
            {
                Ok(rows) => rows
                    .iter()
                    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                    .collect(),
                Err(_) => {
                    self.client = crate::connect(&self.stack.direct_url()).await?;
                    continue;
                }
            };
            let behind = target
                .iter()
                .any(|(key, end)| committed.get(key).copied().unwrap_or(0) < *end);
            if !behind {
                return Ok(Some(since.elapsed()));
            }
            if since.elapsed() > Duration::from_secs(self.args.patience_secs) {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After a zombie run: did the woken process get fenced? From its
    /// metrics (`weir_fenced_total`, batches with outcome `fenced`) and its
    /// log lines, watched for up to 20 s (it finds out when it next tries to
    /// commit, after its rejoin).
    async fn fencing_seen(&mut self) -> String {
        let Some(zombie) = self.zombie.take() else {
            return String::new();
        };
        let Some(pod) = self.fleet.pods.iter().find(|p| p.name == zombie.name) else {
            return "the zombie is gone".into();
        };
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let after = scrape(pod.http).await;
            let fenced = metric_sum(&after, "weir_fenced_total", "") - zombie.fenced_before;
            let batches = metric_sum(&after, "weir_batches_total", "outcome=\"fenced\"")
                - zombie.batches_before;
            let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
            let lines = log
                .lines()
                .filter(|l| l.contains("fenced"))
                .count()
                .saturating_sub(zombie.log_lines_before);
            if fenced + batches > 0.0 || lines > 0 || Instant::now() >= until {
                return format!(
                    "fencing: weir_fenced_total +{fenced:.0}, fenced batches +{batches:.0}, {lines} log lines"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// What a zombie's metrics and log said before it was stopped.
struct Zombie {
    name: String,
    fenced_before: f64,
    batches_before: f64,
    log_lines_before: usize,
}

fn produce_args(args: &[&str]) -> ProduceArgs {
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        produce: ProduceArgs,
    }
    Wrapper::parse_from(std::iter::once("produce").chain(args.iter().copied())).produce
}

/// The results table (markdown) and whether every run was clean.
fn table(results: &BTreeMap<Fault, Vec<RunResult>>) -> (String, bool) {
    let mut out = String::from(
        "| fault | runs | events | items | lost | duplicated | unexpected | dead letters | recover p50 | recover max | notes |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    let mut all_ok = true;
    for (fault, runs) in results {
        let sum = |f: &dyn Fn(&RunResult) -> usize| runs.iter().map(f).sum::<usize>();
        let never = runs.iter().filter(|r| r.recovered.is_none()).count();
        let mut times: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.recovered.map(|d| d.as_secs_f64()))
            .collect();
        times.sort_by(f64::total_cmp);
        let p50 = times.get(times.len().saturating_sub(1) / 2).copied();
        let max = times.last().copied();
        let seconds = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.1} s"));
        let failed = runs.iter().filter(|r| !r.outcome.ok()).count();
        all_ok &= failed == 0 && never == 0;
        let mut notes = Vec::new();
        if failed > 0 {
            notes.push(format!("{failed} run(s) FAILED verification"));
        }
        if never > 0 {
            notes.push(format!("{never} run(s) never recovered"));
        }
        match fault {
            Fault::PgRestart | Fault::Zombie | Fault::SlowDb | Fault::Terminate => {
                let mut counted: BTreeMap<&str, usize> = BTreeMap::new();
                for run in runs {
                    *counted.entry(run.note.as_str()).or_default() += 1;
                }
                for (note, n) in counted {
                    notes.push(if n > 1 {
                        format!("{n}x {note}")
                    } else {
                        note.to_string()
                    });
                }
            }
            _ => {}
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            fault.describe(),
            runs.len(),
            runs.iter().map(|r| r.events).sum::<u64>(),
            sum(&|r| r.outcome.expected()),
            sum(&|r| r.outcome.lost()),
            sum(&|r| r.outcome.duplicated()),
            sum(&|r| r.outcome.unexpected()),
            sum(&|r| r.outcome.dead_letters()),
            seconds(p50),
            seconds(max),
            notes.join("; ")
        ));
    }
    (out, all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_runs_parse_and_bad_ones_name_the_problem() {
        let parsed: FaultRuns = "kill9=50".parse().unwrap();
        assert_eq!((parsed.fault, parsed.runs), (Fault::Kill9, 50));
        let parsed: FaultRuns = "slow-db=3".parse().unwrap();
        assert_eq!((parsed.fault, parsed.runs), (Fault::SlowDb, 3));
        assert!(
            "kill9"
                .parse::<FaultRuns>()
                .unwrap_err()
                .contains("fault=runs")
        );
        assert!(
            "meteor=1"
                .parse::<FaultRuns>()
                .unwrap_err()
                .contains("unknown fault `meteor`")
        );
        assert!(
            "kill9=many"
                .parse::<FaultRuns>()
                .unwrap_err()
                .contains("whole number")
        );
    }
}
