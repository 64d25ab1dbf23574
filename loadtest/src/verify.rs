//! `verify`: prove a `produce` run landed exactly once.
//!
//! The events are regenerated from the manifest's seed and options, so the
//! expectations are exact: every good item is in its table once (wa_events
//! and messages dedupe on their natural key, so a redelivered webhook adds
//! nothing), every delivery of a webhook body is in webhook_logs once, every
//! bad body or item is a dead letter with the expected stage and code, and
//! nothing else of this run is anywhere.
//!
//! Scope: rows of wa_events and messages are recognised by the ids the
//! generator derives from the seed; webhook_logs rows and dead letters by the
//! Kafka offsets the run's deliveries got. A run should have its topics'
//! offsets to itself (use `--topic-prefix` when several runs overlap).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::Client;

use crate::manifest::{Delivery, Manifest, load_deliveries};
use crate::webhooks::{Generator, Produced};

#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The run to verify (the directory `produce --out` wrote).
    #[arg(long, default_value = "target/loadtest/last")]
    pub run: PathBuf,
    /// Schema of the tables.
    #[arg(long, env = "WEIR_POSTGRES__SCHEMA", default_value = "public")]
    pub schema: String,
    /// weir's offsets group (to wait for it to catch up).
    #[arg(long, env = "WEIR_KAFKA__GROUP_ID", default_value = "weir")]
    pub group: String,
    /// How long to wait for weir's stored offsets to reach the run's end.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
}

/// The run's events, regenerated, with where each landed.
pub struct Run {
    pub manifest: Manifest,
    pub events: Vec<(Produced, Delivery)>,
}

impl Run {
    pub fn load(dir: &std::path::Path) -> anyhow::Result<Run> {
        let manifest = Manifest::load(dir)?;
        let deliveries = load_deliveries(dir)?;
        anyhow::ensure!(
            deliveries.len() as u64 == manifest.count,
            "{} deliveries recorded for {} events",
            deliveries.len(),
            manifest.count
        );
        let mut generator = Generator::new(manifest.shape.clone());
        let events = deliveries
            .into_iter()
            .map(|d| (generator.next_event(), d))
            .collect();
        Ok(Run { manifest, events })
    }

    /// `[first, last]` offsets of the run per (topic, partition).
    pub fn ranges(&self) -> BTreeMap<(String, i32), (i64, i64)> {
        let topics = self.manifest.topics();
        let mut ranges: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
        for (_, d) in &self.events {
            let entry = ranges
                .entry((topics[d.topic as usize].clone(), d.partition))
                .or_insert((d.offset, d.offset));
            entry.0 = entry.0.min(d.offset);
            entry.1 = entry.1.max(d.offset);
        }
        ranges
    }

    /// SQL condition selecting the run's offsets (`topic`, `partition`,
    /// `offset` are the column names to use).
    pub fn offset_scope(&self, topic: &str, partition: &str, offset: &str) -> String {
        let ranges = self.ranges();
        if ranges.is_empty() {
            return "FALSE".into();
        }
        ranges
            .iter()
            .map(|((t, p), (lo, hi))| {
                format!(
                    "({topic} = '{}' AND {partition} = {p} AND {offset} BETWEEN {lo} AND {hi})",
                    t.replace('\'', "''")
                )
            })
            .collect::<Vec<_>>()
            .join(" OR ")
    }

    /// Prefixes of the ids the generator gave this run's items.
    pub fn id_prefixes(&self) -> (String, String) {
        (
            format!("wamid.HBgM{:016X}%", self.manifest.shape.seed),
            format!("msg\\_{:016x}\\_%", self.manifest.shape.seed),
        )
    }
}

/// Found vs expected for one table.
#[derive(Debug, Default)]
pub struct Tally {
    pub expected: usize,
    pub found: usize,
    pub missing: usize,
    pub duplicated: usize,
    pub unexpected: usize,
}

impl Tally {
    fn ok(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.expected == self.found
    }
}

fn compare<K: std::hash::Hash + Eq>(expected: &HashSet<K>, found: &HashMap<K, i64>) -> Tally {
    let mut tally = Tally {
        expected: expected.len(),
        ..Default::default()
    };
    for (key, count) in found {
        tally.found += *count as usize;
        if !expected.contains(key) {
            tally.unexpected += *count as usize;
        } else if *count > 1 {
            tally.duplicated += *count as usize - 1;
        }
    }
    tally.missing = expected.iter().filter(|k| !found.contains_key(*k)).count();
    tally
}

/// Waits until weir's stored offsets cover every delivery of the run.
pub async fn wait_for(
    client: &Client,
    schema: &str,
    group: &str,
    run: &Run,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let ranges = run.ranges();
    let started = Instant::now();
    loop {
        let rows = client
            .query(
                &format!(
                    "SELECT topic, partition, next_offset FROM \"{}\".weir_offsets WHERE consumer_group = $1",
                    schema.replace('"', "\"\"")
                ),
                &[&group],
            )
            .await
            .context("read weir_offsets")?;
        let stored: HashMap<(String, i32), i64> = rows
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let behind = ranges
            .iter()
            .filter(|(key, (_, hi))| stored.get(*key).is_none_or(|next| *next <= *hi))
            .count();
        if behind == 0 {
            return Ok(true);
        }
        if started.elapsed() >= timeout {
            println!(
                "weir has not caught up on {behind} partition(s) after {}s; verifying anyway",
                timeout.as_secs()
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Verifies the run; prints a table and returns whether everything matched.
pub async fn verify(client: &Client, args: &VerifyArgs) -> anyhow::Result<bool> {
    let run = Run::load(&args.run)?;
    let outcome = check(
        client,
        &run,
        &args.schema,
        &args.group,
        Duration::from_secs(args.wait_secs),
    )
    .await?;
    outcome.print(&run);
    Ok(outcome.ok())
}

/// What `verify` found for one run.
pub struct Outcome {
    /// Whether weir's stored offsets reached the run's end in time.
    pub caught_up: bool,
    /// wa_events, messages, webhook_logs, then dead letters.
    pub tallies: Vec<(&'static str, Tally)>,
    /// Dead letters per class `table stage/code`: (expected, found).
    pub classes: BTreeMap<String, (usize, usize)>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.caught_up && self.tallies.iter().all(|(_, tally)| tally.ok())
    }

    /// Expected items (rows and dead letters) not found.
    pub fn lost(&self) -> usize {
        self.tallies.iter().map(|(_, t)| t.missing).sum()
    }

    /// Items found more than once.
    pub fn duplicated(&self) -> usize {
        self.tallies.iter().map(|(_, t)| t.duplicated).sum()
    }

    /// Items found that the run never asked for.
    pub fn unexpected(&self) -> usize {
        self.tallies.iter().map(|(_, t)| t.unexpected).sum()
    }

    /// Items expected: rows of every table plus dead letters.
    pub fn expected(&self) -> usize {
        self.tallies.iter().map(|(_, t)| t.expected).sum()
    }

    pub fn dead_letters(&self) -> usize {
        self.tallies
            .iter()
            .filter(|(name, _)| *name == "dead letters")
            .map(|(_, t)| t.found)
            .sum()
    }
}

/// Waits (up to `wait`) for weir to reach the run's end, then counts every
/// item of the run where it belongs.
pub async fn check(
    client: &Client,
    run: &Run,
    schema: &str,
    group: &str,
    wait: Duration,
) -> anyhow::Result<Outcome> {
    let caught_up = wait_for(client, schema, group, run, wait).await?;
    let schema = format!("\"{}\"", schema.replace('"', "\"\""));
    let topics = run.manifest.topics();

    let mut wa_expected = HashSet::new();
    let mut messages_expected = HashSet::new();
    let mut logs_expected = HashSet::new();
    let mut dead_expected: HashMap<(String, i32, i64), Vec<String>> = HashMap::new();
    for (event, delivery) in &run.events {
        let source = (
            topics[delivery.topic as usize].clone(),
            delivery.partition,
            delivery.offset,
        );
        for row in &event.rows {
            match row.table {
                "wa_events" => {
                    wa_expected.insert(row.key.clone());
                }
                "messages" => {
                    messages_expected.insert(row.key.clone());
                }
                "webhook_logs" => {
                    logs_expected.insert(source.clone());
                }
                other => anyhow::bail!("generator expects a row in unknown table {other}"),
            }
        }
        if !event.dead_letters.is_empty() {
            dead_expected.insert(source, event.dead_letter_signature());
        }
    }

    let (wamid, chat) = run.id_prefixes();
    let wa_found: HashMap<String, i64> = client
        .query(
            &format!(
                "SELECT event_id || '/' || event_type, count(*) FROM {schema}.wa_events WHERE event_id LIKE $1 GROUP BY 1"
            ),
            &[&wamid],
        )
        .await
        .context("read wa_events")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let messages_found: HashMap<String, i64> = client
        .query(
            &format!(
                "SELECT message_id, count(*) FROM {schema}.messages WHERE message_id LIKE $1 OR message_id LIKE $2 GROUP BY 1"
            ),
            &[&wamid, &chat],
        )
        .await
        .context("read messages")?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let logs_found: HashMap<(String, i32, i64), i64> = client
        .query(
            &format!(
                "SELECT source_topic, source_partition, source_offset, count(*) FROM {schema}.webhook_logs
                  WHERE {} GROUP BY 1, 2, 3",
                run.offset_scope("source_topic", "source_partition", "source_offset")
            ),
            &[],
        )
        .await
        .context("read webhook_logs")?
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect();
    let dead_rows = client
        .query(
            &format!(
                "SELECT topic, kafka_partition, kafka_offset, COALESCE(target_table, '-') || ' ' || stage || '/' || code
                   FROM {schema}.weir_dead_letters WHERE {}",
                run.offset_scope("topic", "kafka_partition", "kafka_offset")
            ),
            &[],
        )
        .await
        .context("read weir_dead_letters")?;
    let mut dead_found: HashMap<(String, i32, i64), Vec<String>> = HashMap::new();
    for row in &dead_rows {
        dead_found
            .entry((row.get(0), row.get(1), row.get(2)))
            .or_default()
            .push(row.get(3));
    }
    for letters in dead_found.values_mut() {
        letters.sort();
    }

    let tallies = [
        ("wa_events", compare(&wa_expected, &wa_found)),
        ("messages", compare(&messages_expected, &messages_found)),
        ("webhook_logs", compare(&logs_expected, &logs_found)),
    ];
    // Dead letters: per source message, the exact list of (table stage/code).
    let mut dead = Tally {
        expected: dead_expected.values().map(Vec::len).sum(),
        found: dead_found.values().map(Vec::len).sum(),
        ..Default::default()
    };
    for (source, expected) in &dead_expected {
        match dead_found.get(source) {
            None => dead.missing += expected.len(),
            Some(found) if found != expected => {
                let mut rest = found.clone();
                for letter in expected {
                    match rest.iter().position(|f| f == letter) {
                        Some(i) => {
                            rest.remove(i);
                        }
                        None => dead.missing += 1,
                    }
                }
                dead.unexpected += rest.len();
            }
            Some(_) => {}
        }
    }
    for (source, found) in &dead_found {
        if !dead_expected.contains_key(source) {
            dead.unexpected += found.len();
        }
    }

    let [wa, messages, logs] = tallies;
    let mut classes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for letter in dead_expected.values().flatten() {
        classes.entry(letter.clone()).or_default().0 += 1;
    }
    for letter in dead_found.values().flatten() {
        classes.entry(letter.clone()).or_default().1 += 1;
    }
    Ok(Outcome {
        caught_up,
        tallies: vec![wa, messages, logs, ("dead letters", dead)],
        classes,
    })
}

impl Outcome {
    /// The table `verify` prints.
    pub fn print(&self, run: &Run) {
        println!(
            "run: seed {} | {} events ({} redeliveries, {} malformed) | topics {}",
            run.manifest.shape.seed,
            run.events.len(),
            run.events.iter().filter(|(e, _)| e.duplicate).count(),
            run.events
                .iter()
                .filter(|(e, _)| e.malformed.is_some())
                .count(),
            run.manifest.topics().join(", ")
        );
        println!(
            "{:<14} {:>10} {:>10} {:>9} {:>11} {:>11}  RESULT",
            "TABLE", "EXPECTED", "FOUND", "MISSING", "DUPLICATED", "UNEXPECTED"
        );
        for (name, tally) in &self.tallies {
            println!(
                "{:<14} {:>10} {:>10} {:>9} {:>11} {:>11}  {}",
                name,
                tally.expected,
                tally.found,
                tally.missing,
                tally.duplicated,
                tally.unexpected,
                if tally.ok() { "ok" } else { "MISMATCH" }
            );
        }
        if !self.classes.is_empty() {
            println!("dead letters by class (expected / found):");
            for (class, (expected, found)) in &self.classes {
                println!(
                    "  {class:<50} {expected:>7} / {found:<7}{}",
                    if expected == found { "" } else { "  MISMATCH" }
                );
            }
        }
        println!(
            "{}",
            if self.ok() {
                "verify: ok"
            } else {
                "verify: FAILED"
            }
        );
    }
}
