//! Partition lifecycle against a real PostgreSQL: concurrent creation,
//! creation that never blocks (or waits for) readers, DEFAULT partitions,
//! storage parameters, retention with archive, and a prune interrupted
//! between detach and drop.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::webhooks::Shape;
use common::{Fixture, TestDb, Topics};
use sha2::Digest;
use weir::config::{Granularity, PostgresConfig};
use weir::copy::PgType;
use weir::store::partition::{ManagedTable, load_partitions};

fn postgres(schema: &str) -> PostgresConfig {
    PostgresConfig {
        schema: schema.to_string(),
        ..Default::default()
    }
}

async fn managed(db: &TestDb, table: &str, granularity: Granularity) -> ManagedTable {
    let client =
        weir::store::db::connect(&common::stack().database_url, &postgres(&db.schema), "test")
            .await
            .expect("connect");
    let info = weir::store::catalog::load_table(&client, table, &db.schema)
        .await
        .expect("catalog");
    let set = load_partitions(&client, info.oid)
        .await
        .expect("partitions");
    let mut parameters = std::collections::BTreeMap::new();
    parameters.insert(
        "autovacuum_vacuum_scale_factor".to_string(),
        weir::config::PropertyValue::Float(0.05),
    );
    ManagedTable::new(
        info.oid,
        info.schema,
        info.name,
        granularity,
        PgType::Timestamptz,
        &parameters,
        set,
    )
}

fn micros(year: i32, month: u32) -> i64 {
    Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .expect("date")
        .timestamp_micros()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_creators_make_one_partition_per_range() {
    let db = TestDb::new("race").await;
    db.client
        .batch_execute("CREATE TABLE events (id int, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at)")
        .await
        .expect("parent");
    let ranges: Vec<(i64, i64)> = (1..=6)
        .map(|m| (micros(2031, m), micros(2031, m + 1)))
        .collect();
    let mut tasks = Vec::new();
    for creator in 0..4usize {
        // Each creator is a separate session with its own partition cache,
        // as four processes would be, and takes the ranges in its own order.
        let table = managed(&db, "events", Granularity::Month).await;
        let mut client = weir::store::db::connect(
            &common::stack().database_url,
            &postgres(&db.schema),
            "creator",
        )
        .await
        .expect("connect");
        let mut order = ranges.clone();
        order.rotate_left(creator);
        if creator % 2 == 1 {
            order.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let mut created = 0;
            for (lo, hi) in order {
                let (_, made) = table
                    .ensure(&mut client, lo, hi, Duration::from_millis(2000))
                    .await
                    .expect("every creator succeeds");
                created += made as usize;
            }
            created
        }));
    }
    let mut created = 0;
    for task in tasks {
        created += tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("no deadlock")
            .expect("task");
    }
    assert_eq!(created, 6, "each range created by exactly one creator");
    let set = load_partitions(
        &db.client,
        managed(&db, "events", Granularity::Month).await.oid,
    )
    .await
    .expect("partitions");
    assert_eq!(set.leaves.len(), 6, "one partition per range");
    for (leaf, (lo, hi)) in set.leaves.iter().zip(&ranges) {
        assert_eq!((leaf.lo, leaf.hi), (*lo, *hi));
    }
    // Storage parameters are set on every new leaf (PostgreSQL does not
    // inherit them from the parent).
    let options: Vec<Option<Vec<String>>> = db
        .client
        .query(
            "SELECT c.reloptions FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = to_regclass('events')",
            &[],
        )
        .await
        .expect("reloptions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(options.len(), 6);
    for option in options {
        assert_eq!(
            option,
            Some(vec!["autovacuum_vacuum_scale_factor=0.05".to_string()])
        );
    }
}

/// A long transaction reading the parent must not stop weir from creating
/// a partition and writing into it; and the creation must never take
/// ACCESS EXCLUSIVE on the parent (recorded from inside weir's own DDL
/// transaction by an event trigger reading pg_locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_partitions_neither_waits_for_nor_blocks_readers() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("readers", 2).await;
    let s = db.schema.clone();
    let probe = format!("weir_lock_probe_{}", rand::random::<u32>());
    db.client
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".lock_log (mode text, tag text);
             CREATE FUNCTION \"{s}\".log_locks() RETURNS event_trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO \"{s}\".lock_log
               SELECT l.mode, tg_tag FROM pg_locks l
                WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation'
                  AND l.relation = to_regclass('\"{s}\".wa_events');
             END $$;
             CREATE EVENT TRIGGER {probe} ON ddl_command_end EXECUTE FUNCTION \"{s}\".log_locks();"
        ))
        .await
        .expect("lock probe");

    // A reader holds ACCESS SHARE on the parent for the whole test.
    let reader = common::connect(&common::stack().database_url).await;
    reader
        .batch_execute(&format!("BEGIN; SELECT count(*) FROM \"{s}\".wa_events;"))
        .await
        .expect("reader transaction");

    let mut sent = common::generate(
        Shape {
            seed: 21,
            spread_secs: 80 * 86_400,
            chat_share: 0.0,
            ..Shape::default()
        },
        500,
    );
    let target = common::produce(&topics, &mut sent).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(weir::pipeline::run(
        Arc::new(config),
        async {
            let _ = stop_rx.await;
        },
        None,
    ));
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(120)).await;
    let _ = stop_tx.send(());
    run.await.expect("task").expect("pipeline");

    // Everything landed while the reader still held its lock.
    let rows = db
        .count(&format!("SELECT count(*) FROM \"{s}\".wa_events"))
        .await;
    assert_eq!(rows as usize, sent.expected_rows("wa_events"));
    reader.batch_execute("COMMIT").await.expect("reader commit");
    db.client
        .batch_execute(&format!("DROP EVENT TRIGGER {probe}"))
        .await
        .expect("drop probe");

    let modes: Vec<(String, String)> = db
        .client
        .query(
            &format!("SELECT DISTINCT mode, tag FROM \"{s}\".lock_log"),
            &[],
        )
        .await
        .expect("lock log")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    println!("locks held on the parent during weir's DDL: {modes:?}");
    assert!(
        modes
            .iter()
            .any(|(mode, tag)| mode == "ShareUpdateExclusiveLock" && tag == "ALTER TABLE"),
        "ATTACH PARTITION ran and was observed: {modes:?}"
    );
    assert!(
        modes.iter().all(|(mode, _)| mode != "AccessExclusiveLock"),
        "weir never takes ACCESS EXCLUSIVE on the parent: {modes:?}"
    );
    let leaves = db
        .count(&format!(
            "SELECT count(DISTINCT tableoid) FROM \"{s}\".wa_events"
        ))
        .await;
    assert!(
        leaves >= 3,
        "rows span {leaves} partitions, created while the reader was open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_partition_gets_the_rows_and_weir_creates_none() {
    let db = TestDb::new("dflt").await;
    let topics = Topics::new("dflt");
    common::create_topics(&[topics.name("custom")], 1).await;
    let group = common::unique("g");
    db.client
        .batch_execute(
            "CREATE TABLE custom_events (id text NOT NULL, created_at timestamptz NOT NULL)
                 PARTITION BY RANGE (created_at);
             CREATE TABLE custom_events_rest PARTITION OF custom_events DEFAULT;
             CREATE TABLE custom_events_2031 PARTITION OF custom_events
                 FOR VALUES FROM ('2031-01-01') TO ('2032-01-01');",
        )
        .await
        .expect("user table with a DEFAULT partition");
    let extra = format!(
        r#"
[[tables]]
name = "custom_events"
time_column = "created_at"
granularity = "day"
premake = 3
[[tables.sources]]
topics = ["{}"]
[tables.sources.columns]
id = {{ item = "/id" }}
created_at = {{ item = "/at" }}
"#,
        topics.name("custom")
    );
    let config = common::config(&db.schema, &topics, &group, &extra);
    db.migrate(&config).await;

    let now = Utc::now();
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &common::stack().brokers)
        .create()
        .expect("producer");
    for (id, at) in [
        ("a", now.to_rfc3339()),
        ("b", (now - chrono::Duration::days(3)).to_rfc3339()),
    ] {
        let body = serde_json::json!({"id": id, "at": at}).to_string();
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topics.name("custom"))
                    .key(id)
                    .payload(&body),
                Duration::from_secs(10),
            )
            .await
            .expect("delivered");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(weir::pipeline::run(
        Arc::new(config),
        async {
            let _ = stop_rx.await;
        },
        None,
    ));
    common::wait_for_offsets(&db, &group, 2, Duration::from_secs(60)).await;
    let _ = stop_tx.send(());
    run.await.expect("task").expect("pipeline");

    let in_default = db.count("SELECT count(*) FROM custom_events_rest").await;
    assert_eq!(
        in_default, 2,
        "rows without a partition of their own go to the DEFAULT partition"
    );
    let partitions = db
        .count("SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass('custom_events')")
        .await;
    assert_eq!(
        partitions, 2,
        "weir created no partition (not even premade ones)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_archives_and_drops_only_what_is_wholly_expired_and_finishes_interrupted_prunes()
{
    let db = TestDb::new("retain").await;
    let topics = Topics::new("retain");
    let group = common::unique("g");
    let archive = std::env::temp_dir().join(common::unique("archive"));
    let mut config = common::config(&db.schema, &topics, &group, "");
    db.migrate(&config).await;
    let logs = config
        .tables
        .iter_mut()
        .find(|t| t.name == "webhook_logs")
        .expect("shipped webhook_logs");
    assert_eq!(logs.retention_days, Some(30), "seed 001: 30-day retention");
    logs.archive_dir = Some(archive.display().to_string());
    let s = db.schema.clone();

    let table = managed(&db, "webhook_logs", Granularity::Day).await;
    let mut client = weir::store::db::connect(&common::stack().database_url, &postgres(&s), "test")
        .await
        .expect("connect");
    let today = Utc::now().date_naive();
    let day = |back: u64| {
        let date = today - chrono::Days::new(back);
        let lo = date.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        (
            lo.timestamp_micros(),
            (lo + chrono::Duration::days(1)).timestamp_micros(),
            lo,
        )
    };
    // Days 40, 35, 31 back are wholly older than 30 days; day 30 back
    // overlaps the window (it ends less than 30 days ago), day 29 is inside.
    let mut names = Vec::new();
    for back in [40u64, 35, 31, 30, 29] {
        let (lo, hi, at) = day(back);
        let (leaf, _) = table
            .ensure(&mut client, lo, hi, Duration::from_secs(2))
            .await
            .expect("old partition");
        for n in 0..(back as i64) {
            db.client
                .execute(
                    &format!(
                        "INSERT INTO \"{s}\".webhook_logs (received_at, company_id, source_topic, source_partition, source_offset, payload)
                         VALUES ($1, '6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11', 't', 0, $2, '{{\"n\": 1, \"text\": \"a,b \\\"q\\\"\\nnewline\"}}')"
                    ),
                    &[&(at + chrono::Duration::minutes(n)), &n],
                )
                .await
                .expect("insert");
        }
        names.push((back, leaf.name));
    }
    // A prune interrupted earlier: day 45 back was journaled and detached,
    // then the process died before dropping it.
    let (lo, hi, at) = day(45);
    let (stale, _) = table
        .ensure(&mut client, lo, hi, Duration::from_secs(2))
        .await
        .expect("stale partition");
    db.client
        .execute(
            &format!(
                "INSERT INTO \"{s}\".webhook_logs (received_at, company_id, source_topic, source_partition, source_offset, payload)
                 VALUES ($1, '6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11', 't', 0, 1, '{{}}')"
            ),
            &[&at],
        )
        .await
        .expect("insert");
    let journal = weir::store::journal::journal_table(&config);
    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".webhook_logs DETACH PARTITION {q};
             INSERT INTO {journal} (parent_oid, parent, partition, lower_bound, upper_bound, state)
             VALUES ({oid}, 'webhook_logs', '{qs}', {lo}, {hi}, 'detached');",
            q = stale.qualified(),
            qs = stale.qualified().replace('\'', "''"),
            oid = table.oid,
        ))
        .await
        .expect("simulate an interrupted prune");

    let retention = weir::maintenance::Retention {
        days: 30,
        archive_dir: Some(archive.clone()),
    };
    let dry = weir::maintenance::prune(
        &mut client,
        &config,
        &table,
        &retention,
        Duration::from_secs(2),
        true,
    )
    .await
    .expect("dry run");
    assert!(
        dry.iter().all(
            |a| !matches!(a, weir::maintenance::Action::Dropped(p) if p.contains(&names[3].1))
        )
    );
    let exists = |name: String| {
        let db = &db;
        async move {
            db.count(&format!(
                "SELECT count(*) FROM pg_class WHERE oid = to_regclass('\"{}\".\"{name}\"')",
                db.schema
            ))
            .await
                == 1
        }
    };
    assert!(exists(names[0].1.clone()).await, "a dry run drops nothing");

    let actions = weir::maintenance::prune(
        &mut client,
        &config,
        &table,
        &retention,
        Duration::from_secs(2),
        false,
    )
    .await
    .expect("prune");
    for action in &actions {
        println!("{action}");
    }
    for (back, name) in &names {
        assert_eq!(
            exists(name.clone()).await,
            *back < 31,
            "{name} ({back} days back)"
        );
    }
    assert!(
        !exists(stale.name.clone()).await,
        "the interrupted prune was finished"
    );
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM {journal}")).await,
        0,
        "journal emptied"
    );

    // Archives: one per dropped partition, each with a manifest whose row
    // count and checksum match the file.
    for (back, name) in names
        .iter()
        .filter(|(b, _)| *b >= 31)
        .chain(std::iter::once(&(45, stale.name.clone())))
    {
        let file = archive.join(format!("{name}.csv.gz"));
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(archive.join(format!("{name}.manifest.json"))).expect("manifest"),
        )
        .expect("manifest json");
        let mut csv = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&file).expect("archive"))
            .read_to_end(&mut csv)
            .expect("gunzip");
        assert_eq!(
            manifest["sha256_of_csv"],
            hex::encode(sha2::Sha256::digest(&csv)),
            "{name}"
        );
        let expected_rows = if *back == 45 { 1 } else { *back };
        assert_eq!(manifest["rows"], expected_rows, "{name}");
        assert!(
            String::from_utf8_lossy(&csv).starts_with("received_at,company_id"),
            "CSV with a header"
        );
    }
    drop(topics);
}
