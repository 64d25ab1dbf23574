//! Faults with real processes: `weir run` killed with SIGKILL mid-stream
//! and restarted, a consumer frozen (SIGSTOP) until the group gives its
//! partitions away and then thawed (a zombie), two deployments writing the
//! same offsets at once, and a consumer that pauses and resumes under
//! backpressure. Every time: each event exactly once, counted per id.
//!
//! The traffic is what production sees: batched, compressed producers
//! (`common::produce`), so every restart, takeover and resume starts inside
//! a Kafka record batch. The tables' dedupe keys are dropped
//! (`common::without_dedupe`): a row written twice then breaks a unique
//! index instead of being skipped, and the accounting sees it.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::webhooks::Shape;
use common::{Fixture, TestDb};

/// A `weir run` child process.
struct Weir {
    child: Child,
    log: PathBuf,
}

impl Weir {
    fn start(dir: &std::path::Path, name: &str, config_text: &str) -> Weir {
        let config_dir = dir.join(name);
        let config = common::write_config(&config_dir, config_text);
        let log = config_dir.join("weir.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config"])
            .arg(&config)
            .env("WEIR_DATABASE_URL", &common::stack().database_url)
            // WEIR_TEST_LOG (e.g. weir=debug) to see more when a test fails.
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "weir=info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start weir");
        Weir { child, log }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill command");
        assert!(status.success(), "kill -{signal}");
    }

    /// SIGKILL: no chance to clean up.
    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then wait for a graceful exit.
    fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "weir did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn stored(db: &TestDb, group: &str) -> i64 {
    db.count(&format!(
        "SELECT COALESCE(sum(next_offset), 0)::int8 FROM \"{}\".weir_offsets WHERE consumer_group = '{group}'",
        db.schema
    ))
    .await
}

async fn wait_until_stored(db: &TestDb, group: &str, at_least: i64) -> i64 {
    let started = Instant::now();
    loop {
        let now = stored(db, group).await;
        if now >= at_least {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "stuck at {now} of {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn test_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(common::unique(name))
}

fn small_batches(text: String, port: u16) -> String {
    let mut table: toml::Table = toml::from_str(&common::without_dedupe(&text)).expect("config");
    let pipeline = table
        .entry("pipeline")
        .or_insert(toml::Value::Table(Default::default()));
    let pipeline = pipeline.as_table_mut().expect("pipeline");
    pipeline.insert("batch_max_rows".into(), 400.into());
    pipeline.insert("batch_linger_ms".into(), 50.into());
    table["http"]
        .as_table_mut()
        .expect("http")
        .insert("listen".into(), format!("127.0.0.1:{port}").into());
    toml::to_string(&table).expect("config")
}

/// `small_batches` with a 2 MiB in-flight budget: a consumer with a backlog
/// pauses and resumes its partitions again and again.
fn small_budget(text: String, port: u16) -> String {
    let mut table: toml::Table = toml::from_str(&small_batches(text, port)).expect("config");
    let pipeline = table["pipeline"].as_table_mut().expect("pipeline");
    pipeline.insert("max_event_bytes".into(), 1_048_576.into());
    pipeline.insert("max_in_flight_bytes".into(), 2_097_152.into());
    pipeline.insert("shutdown_grace_ms".into(), 5_000.into());
    toml::to_string(&table).expect("config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_is_exactly_once() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("kill", 4).await;
    let mut sent = common::generate(
        Shape {
            seed: 11,
            ..Shape::default()
        },
        30_000,
    );
    let target = common::produce(&topics, &mut sent).await;
    let dir = test_dir("kill");
    let text = small_batches(
        common::config_text(&db.schema, &topics, &group, ""),
        common::free_port(),
    );

    // Two crashes at different points of the stream, then a clean finish.
    let mut killed_at = Vec::new();
    for share in [4, 2] {
        let mut weir = Weir::start(&dir, &format!("run{share}"), &text);
        let reached = wait_until_stored(&db, &group, target / share).await;
        weir.kill9();
        assert!(
            reached < target,
            "killed mid-stream ({reached} of {target})"
        );
        killed_at.push(reached);
    }
    let mut weir = Weir::start(&dir, "final", &text);
    wait_until_stored(&db, &group, target).await;
    let status = weir.terminate();
    assert!(
        status.success(),
        "clean exit after SIGTERM: {status}\n{}",
        weir.log()
    );
    println!("killed at stored offsets {killed_at:?} of {target}");

    common::assert_exactly_once(&db, &sent, &topics).await;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM \"{}\".weir_dead_letters",
            db.schema
        ))
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_consumer_that_wakes_up_is_fenced() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("zombie", 4).await;
    // Two rounds: the second is sent once both consumers share the
    // partitions, so the one frozen then has a backlog of its own, and a
    // batch in flight when it stops. (One round left that to timing: on a
    // slow machine the freeze could fall while it held nothing to fence.)
    let (mut early, mut late) = common::generate(
        Shape {
            seed: 12,
            ..Shape::default()
        },
        30_000,
    )
    .split(10_000);
    let early_target = common::produce(&topics, &mut early).await;
    let dir = test_dir("zombie");

    // Both in one consumer group. Short PostgreSQL timeouts: the frozen
    // process may hold an offset row locked mid-transaction, and it is
    // PostgreSQL that must end its session for the other to go on.
    let config = |port: u16| {
        let text = small_batches(common::config_text(&db.schema, &topics, &group, ""), port);
        let mut table: toml::Table = toml::from_str(&text).expect("config");
        let postgres = table["postgres"].as_table_mut().expect("postgres");
        postgres.insert("statement_timeout_ms".into(), 8000.into());
        postgres.insert("idle_in_transaction_timeout_ms".into(), 4000.into());
        toml::to_string(&table).expect("config")
    };
    let (first_port, second_port) = (common::free_port(), common::free_port());
    let first = Weir::start(&dir, "first", &config(first_port));
    wait_until_stored(&db, &group, early_target / 10).await;
    let mut second = Weir::start(&dir, "second", &config(second_port));
    common::eventually(
        "both consumers own partitions",
        Duration::from_secs(60),
        || async {
            scrape(first_port, "weir_assigned_partitions").await > 0.0
                && scrape(second_port, "weir_assigned_partitions").await > 0.0
        },
    )
    .await;
    // Both topics' 4 partitions.
    let partitions = 8.0;
    common::produce(&topics, &mut late).await;
    let sent = early.join(late);
    let target = sent.target();
    // Freeze the first mid-work, with a cut batch on its way to PostgreSQL:
    // its session times out and the group gives its partitions away.
    common::eventually(
        "the first consumer has a batch in flight",
        Duration::from_secs(60),
        || async { scrape(first_port, "weir_in_flight_rows").await > 0.0 },
    )
    .await;
    first.signal("STOP");
    let frozen_at = stored(&db, &group).await;
    // The group evicts the frozen member after its session timeout (6 s),
    // and PostgreSQL ends its sessions (statement and idle-in-transaction
    // timeouts); under a loaded machine the broker may take a while longer.
    let took_over = tokio::time::timeout(Duration::from_secs(60), async {
        while scrape(second_port, "weir_assigned_partitions").await < partitions {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        took_over.is_ok(),
        "the second consumer took over every partition while the first was frozen:\n{}",
        second.log()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let progressed = stored(&db, &group).await;
    assert!(
        progressed > frozen_at,
        "the second consumer went on past {frozen_at} while the first was frozen:\n{}",
        second.log()
    );
    // Thaw it: whatever it was about to commit must not be written again.
    // Only what it logs from here on shows the fencing (a batch fenced
    // before the freeze proves nothing about the zombie).
    let log_before_thaw = first.log().len();
    first.signal("CONT");
    wait_until_stored(&db, &group, target).await;
    let mut first = first;
    assert!(first.terminate().success(), "{}", first.log());
    assert!(second.terminate().success(), "{}", second.log());
    println!("frozen at {frozen_at}, the other consumer went on to {progressed} of {target}");
    let after_thaw = first
        .log()
        .get(log_before_thaw..)
        .unwrap_or_default()
        .to_string();
    assert!(
        after_thaw.contains("batch fenced"),
        "the woken consumer's stale batches were fenced after SIGCONT:\n{after_thaw}"
    );

    common::assert_exactly_once(&db, &sent, &topics).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_on_the_same_offsets_never_write_twice() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("overlap", 2).await;
    let mut sent = common::generate(
        Shape {
            seed: 13,
            ..Shape::default()
        },
        10_000,
    );
    let target = common::produce(&topics, &mut sent).await;
    let dir = test_dir("overlap");

    // Different Kafka consumer groups (each reads every partition) sharing
    // one offsets group: a total overlap, every batch raced.
    let overlap = |port: u16, kafka_group: &str| {
        let text = common::config_text(&db.schema, &topics, kafka_group, "");
        let mut table: toml::Table = toml::from_str(&small_batches(text, port)).expect("config");
        table["kafka"]
            .as_table_mut()
            .expect("kafka")
            .insert("offsets_group".into(), group.clone().into());
        toml::to_string(&table).expect("config")
    };
    let mut a = Weir::start(
        &dir,
        "a",
        &overlap(common::free_port(), &common::unique("ka")),
    );
    let mut b = Weir::start(
        &dir,
        "b",
        &overlap(common::free_port(), &common::unique("kb")),
    );
    wait_until_stored(&db, &group, target).await;
    assert!(a.terminate().success(), "{}", a.log());
    assert!(b.terminate().success(), "{}", b.log());
    let fenced = a.log().matches("batch fenced").count() + b.log().matches("batch fenced").count();
    println!("fenced batches: {fenced}");
    assert!(fenced > 0, "the overlap was real: some commits were fenced");
    // Each transaction fences its partitions in (topic, partition) order,
    // so two that share partitions queue on the offset rows instead of
    // deadlocking on them.
    for (name, log) in [("a", a.log()), ("b", b.log())] {
        assert!(
            !log.contains("deadlock"),
            "{name} deadlocked on the offset rows:\n{log}"
        );
    }

    common::assert_exactly_once(&db, &sent, &topics).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_and_resuming_inside_batches_is_exactly_once() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("pause", 4).await;
    let mut sent = common::generate(
        Shape {
            seed: 14,
            ..Shape::default()
        },
        8_000,
    );
    let target = common::produce(&topics, &mut sent).await;
    let dir = test_dir("pause");
    let port = common::free_port();
    // An in-flight budget of a fraction of the topic: the consumer outruns
    // the writers and pauses every partition, several times; each resume
    // fetches from a lane's next offset, inside one of the producer's
    // batches (librdkafka drops what it prefetched when it pauses).
    let text = small_budget(common::config_text(&db.schema, &topics, &group, ""), port);

    let mut weir = Weir::start(&dir, "paused", &text);
    wait_until_stored(&db, &group, target).await;
    let (status, metrics) = common::http_get(port, "/metrics").await;
    assert_eq!(status, 200, "metrics endpoint");
    let pauses = common::scraped(&metrics, "weir_backpressure_pauses_total");
    assert!(weir.terminate().success(), "{}", weir.log());
    println!("backpressure pauses: {pauses}");
    assert!(
        pauses >= 2.0,
        "the consumer paused and resumed ({pauses} pauses)"
    );

    common::assert_exactly_once(&db, &sent, &topics).await;
}

/// The partitions `pod` gave away (revoked and not assigned back, per its
/// log) export no lag from it any more: zeroed on revoke, so only their new
/// owner's lag counts. Before, their last value stayed frozen there, and
/// alerts and dashboards added it up.
async fn assert_no_lag_left_behind(pod: &Weir, port: u16) {
    let mut owned: std::collections::BTreeMap<(String, String), bool> = Default::default();
    for line in pod.log().lines() {
        let event = if line.contains("partition assigned") {
            true
        } else if line.contains("partition revoked") {
            false
        } else {
            continue;
        };
        if let (Some(topic), Some(partition)) = (field(line, "topic"), field(line, "partition")) {
            owned.insert((topic, partition), event);
        }
    }
    let given_away: Vec<&(String, String)> = owned
        .iter()
        .filter(|(_, owned)| !**owned)
        .map(|(key, _)| key)
        .collect();
    assert!(!given_away.is_empty(), "the pod gave partitions away");
    let metrics = common::http_get(port, "/metrics").await.1;
    for (topic, partition) in given_away {
        assert_eq!(
            lag_of(&metrics, topic, partition).unwrap_or(0.0),
            0.0,
            "{topic}/{partition}: the lag series of a pod that gave it away"
        );
    }
}

/// The value of `name=value` in a log line (ANSI colours stripped).
fn field(line: &str, name: &str) -> Option<String> {
    let plain: String = strip_ansi(line);
    let start = plain.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &plain[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `weir_consumer_lag` of one partition in a /metrics text.
fn lag_of(metrics: &str, topic: &str, partition: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with("weir_consumer_lag{"))
        .find(|line| {
            line.contains(&format!("topic=\"{topic}\""))
                && line.contains(&format!("partition=\"{partition}\""))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

async fn scrape(port: u16, name: &str) -> f64 {
    common::scraped(&common::http_get(port, "/metrics").await.1, name)
}

/// Backpressure pauses every partition; a second pod joins and takes half
/// of them while they are paused; the first pod resumes its own half; the
/// second pod leaves and its half comes back. librdkafka keeps an
/// application pause on a partition across unassign and assign, so the
/// returning half must be resumed explicitly. Before: it stayed paused for
/// good, and the records sent to it afterwards were never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_revoked_while_paused_are_fetched_when_they_come_back() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("repause", 4).await;
    let s = db.schema.clone();
    let (mut first, mut second) = common::generate(
        Shape {
            seed: 93,
            ..Shape::default()
        },
        8_200,
    )
    .split(8_000);
    let target = common::produce(&topics, &mut first).await;
    let dir = test_dir("repause");
    let pod = |port: u16| small_budget(common::config_text(&db.schema, &topics, &group, ""), port);

    // Writers cannot commit while the offsets table is locked: the first
    // pod fills its in-flight budget and pauses.
    let mut locker = common::connect(&common::stack().database_url).await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute(&format!(
        "LOCK TABLE \"{s}\".weir_offsets IN EXCLUSIVE MODE"
    ))
    .await
    .expect("lock the offsets table");
    let (a_port, b_port) = (common::free_port(), common::free_port());
    let mut a = Weir::start(&dir, "a", &pod(a_port));
    common::eventually("the first pod pauses", Duration::from_secs(60), || async {
        scrape(a_port, "weir_paused_partitions").await > 0.0
    })
    .await;
    // ... and has reported the lag of its partitions (every 5 s): nothing
    // is committed, so it is not zero.
    common::eventually(
        "the first pod reports lag",
        Duration::from_secs(30),
        || async { scrape(a_port, "weir_consumer_lag").await > 0.0 },
    )
    .await;
    // What the client fetched ahead of the paused partitions is memory
    // outside the in-flight budget, and is reported.
    common::eventually(
        "the first pod reports what its client prefetched",
        Duration::from_secs(30),
        || async { scrape(a_port, "weir_kafka_prefetched_bytes").await > 0.0 },
    )
    .await;
    // The second pod joins: the group moves partitions while they are paused.
    let mut b = Weir::start(&dir, "b", &pod(b_port));
    common::eventually(
        "the second pod gets partitions",
        Duration::from_secs(60),
        || async { scrape(b_port, "weir_assigned_partitions").await > 0.0 },
    )
    .await;
    assert_no_lag_left_behind(&a, a_port).await;
    lock.rollback().await.expect("unlock");
    wait_until_stored(&db, &group, target).await;
    common::eventually("the first pod resumed", Duration::from_secs(60), || async {
        scrape(a_port, "weir_paused_partitions").await == 0.0
    })
    .await;
    // The second pod leaves: every partition returns to the first.
    assert!(b.terminate().success(), "{}", b.log());
    common::eventually(
        "the first pod owns every partition",
        Duration::from_secs(60),
        || async { scrape(a_port, "weir_assigned_partitions").await == 8.0 },
    )
    .await;
    // Well under the in-flight budget: no new pause and resume that would
    // happen to clear a stale pause.
    common::produce(&topics, &mut second).await;
    let all = first.join(second);
    wait_until_stored(&db, &group, all.target()).await;
    assert!(a.terminate().success(), "{}", a.log());
    common::assert_exactly_once(&db, &all, &topics).await;
}

/// A rolling restart under the cooperative-sticky assignor (incremental
/// rebalances: partitions move one by one, the others keep flowing): a
/// second pod joins mid-stream and takes some partitions, then the first
/// leaves on SIGTERM and hands its partitions over, while traffic keeps
/// arriving. Every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_cooperative_sticky_is_exactly_once() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("coop", 4).await;
    let (mut first, mut second) = common::generate(
        Shape {
            seed: 15,
            ..Shape::default()
        },
        20_000,
    )
    .split(12_000);
    let target = common::produce(&topics, &mut first).await;
    let dir = test_dir("coop");
    let pod = |port: u16| {
        let mut table: toml::Table = toml::from_str(&small_batches(
            common::config_text(&db.schema, &topics, &group, ""),
            port,
        ))
        .expect("config");
        table["kafka"]["properties"]
            .as_table_mut()
            .expect("kafka properties")
            .insert(
                "partition.assignment.strategy".into(),
                "cooperative-sticky".into(),
            );
        toml::to_string(&table).expect("config")
    };
    let (a_port, b_port) = (common::free_port(), common::free_port());
    let mut a = Weir::start(&dir, "a", &pod(a_port));
    wait_until_stored(&db, &group, target / 4).await;
    let mut b = Weir::start(&dir, "b", &pod(b_port));
    common::eventually(
        "the second pod gets partitions",
        Duration::from_secs(60),
        || async { scrape(b_port, "weir_assigned_partitions").await > 0.0 },
    )
    .await;
    let shared = scrape(a_port, "weir_assigned_partitions").await;
    // The first pod leaves while the second round arrives.
    let producing = {
        let topics = common::Topics {
            prefix: topics.prefix.clone(),
        };
        tokio::spawn(async move {
            common::produce(&topics, &mut second).await;
            second
        })
    };
    assert!(a.terminate().success(), "{}", a.log());
    let second = producing.await.expect("second round");
    common::eventually(
        "the second pod owns every partition",
        Duration::from_secs(60),
        || async { scrape(b_port, "weir_assigned_partitions").await == 8.0 },
    )
    .await;
    let all = first.join(second);
    wait_until_stored(&db, &group, all.target()).await;
    assert!(b.terminate().success(), "{}", b.log());
    println!("while both ran, the first pod kept {shared} of 8 partitions");
    assert!(
        a.log().contains("cooperative") && b.log().contains("cooperative"),
        "both pods rebalanced incrementally"
    );
    common::assert_exactly_once(&db, &all, &topics).await;
}

/// A rolling deploy of a mapping change: the old deployment maps a column
/// that was just dropped, so its writer stops on the schema error with a
/// batch in hand; the new deployment (without that column, same offsets)
/// writes everything. The old batch is stale: on its next retry it is
/// fenced and dropped. Before: the old writer retried the schema error for
/// as long as the column was missing, for a batch it could never commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_batch_stuck_on_a_schema_error_is_fenced_once_another_deployment_moves_on() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("stale", 1).await;
    let s = db.schema.clone();
    let dir = test_dir("stale");
    // Separate Kafka groups sharing one offsets group, as in an overlap.
    // The shipped dedupe keys stay: the staged write prepares its INSERT
    // before the transaction, so the missing column fails there, before
    // the compare-and-set could fence the batch.
    let deployment = |port: u16, drop_body: bool| {
        let text = common::config_text(&db.schema, &topics, &common::unique("k"), "");
        let mut table: toml::Table = toml::from_str(&text).expect("config");
        table["http"]
            .as_table_mut()
            .expect("http")
            .insert("listen".into(), format!("127.0.0.1:{port}").into());
        table["kafka"]
            .as_table_mut()
            .expect("kafka")
            .insert("offsets_group".into(), group.clone().into());
        let pipeline = table["pipeline"].as_table_mut().expect("pipeline");
        pipeline.insert("retry_max_ms".into(), 500.into());
        pipeline.insert("batch_max_rows".into(), 400.into());
        if drop_body {
            for entry in table["tables"].as_array_mut().expect("tables") {
                if entry["name"].as_str() == Some("messages") {
                    for source in entry["sources"].as_array_mut().expect("sources") {
                        source["columns"]
                            .as_table_mut()
                            .expect("columns")
                            .remove("body");
                    }
                }
            }
        }
        toml::to_string(&table).expect("config")
    };
    let old_port = common::free_port();
    let mut old = Weir::start(&dir, "old", &deployment(old_port, false));
    common::eventually(
        "the old deployment is ready",
        Duration::from_secs(60),
        || async { common::http_get(old_port, "/readyz").await.0 == 200 },
    )
    .await;
    db.client
        .batch_execute(&format!("ALTER TABLE \"{s}\".messages DROP COLUMN body"))
        .await
        .expect("drop column");
    let mut sent = common::generate(
        Shape {
            seed: 16,
            ..Shape::default()
        },
        2_000,
    );
    let target = common::produce(&topics, &mut sent).await;
    common::eventually(
        "the old deployment stops on the missing column",
        Duration::from_secs(60),
        || async {
            let (status, body) = common::http_get(old_port, "/readyz").await;
            status == 503 && body.contains("body")
        },
    )
    .await;
    let log_before = old.log().len();
    let mut new = Weir::start(&dir, "new", &deployment(common::free_port(), true));
    wait_until_stored(&db, &group, target).await;
    common::eventually(
        "the old deployment's stale batch is fenced",
        Duration::from_secs(30),
        || async {
            old.log()
                .get(log_before..)
                .is_some_and(|after| after.contains("batch fenced"))
        },
    )
    .await;
    assert!(new.terminate().success(), "{}", new.log());
    assert!(old.terminate().success(), "{}", old.log());
    common::assert_exactly_once(&db, &sent, &topics).await;
}
