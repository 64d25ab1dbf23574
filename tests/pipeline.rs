//! End to end against real PostgreSQL and a real Kafka-protocol broker:
//! generated webhook bodies and chat messages go through `weir run` (in
//! process) and must land exactly once, in the right partitions, with the
//! offsets stored.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Datelike, Days, TimeZone, Utc};
use common::webhooks::Shape;
use common::{Fixture, TestDb};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

/// Runs the pipeline until the stored offsets cover every message, then
/// stops it. Returns the time it took.
async fn drain(db: &TestDb, config: weir::config::Config, group: &str, target: i64) -> Duration {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let run = tokio::spawn(weir::pipeline::run(
        Arc::new(config),
        async {
            let _ = stop_rx.await;
        },
        None,
    ));
    common::wait_for_offsets(db, group, target, Duration::from_secs(180)).await;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    run.await
        .expect("pipeline task")
        .expect("pipeline stops cleanly");
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_exactly_once_in_partitions_created_on_demand() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("e2e", 4).await;
    let s = &db.schema;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = '\"{s}\".wa_events'::regclass"
        ))
        .await,
        0,
        "no partition exists before the run"
    );

    // 70 days back: three months of wa_events, ten weeks of messages.
    let mut sent = common::generate(
        Shape {
            seed: 7,
            spread_secs: 70 * 86_400,
            late_share: 0.0,
            ..Shape::default()
        },
        4000,
    );
    let target = common::produce(&topics, &mut sent).await;
    assert_eq!(
        target, 4000,
        "every message is in Kafka, offsets contiguous"
    );

    let elapsed = drain(&db, config, &group, target).await;

    common::assert_exactly_once(&db, &sent, &topics).await;
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        0
    );
    let rows = db
        .count(&format!(
            "SELECT (SELECT count(*) FROM \"{s}\".wa_events) + (SELECT count(*) FROM \"{s}\".messages) \
                  + (SELECT count(*) FROM \"{s}\".webhook_logs)"
        ))
        .await;
    println!(
        "end to end: {target} events, {rows} rows in {:.2}s: {:.0} rows/s, {:.0} events/s",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
        target as f64 / elapsed.as_secs_f64()
    );

    // Partitions were made on demand, and rows sit in at least three of them.
    let wa_leaves = db
        .count(&format!(
            "SELECT count(DISTINCT tableoid) FROM \"{s}\".wa_events"
        ))
        .await;
    assert!(wa_leaves >= 3, "wa_events rows span {wa_leaves} partitions");
    let message_leaves = db
        .count(&format!(
            "SELECT count(DISTINCT tableoid) FROM \"{s}\".messages"
        ))
        .await;
    assert!(
        message_leaves >= 9,
        "messages rows span {message_leaves} weekly partitions"
    );

    // Stored offsets: one row per Kafka partition, summing to every message.
    let offsets = db
        .count(&format!(
            "SELECT count(*) FROM \"{s}\".weir_offsets WHERE consumer_group = '{group}'"
        ))
        .await;
    assert_eq!(offsets, 8, "two topics of four partitions");
}

/// A writer that cannot keep up commits every partition that fell due
/// meanwhile in one transaction. The test holds the offsets table locked
/// while weir reads a backlog, so the one writer is stuck in its first
/// transaction and every partition falls due behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_writer_commits_its_due_partitions_in_one_transaction() {
    let Fixture {
        db,
        topics,
        group,
        mut config,
    } = Fixture::new("flush", 4).await;
    let s = &db.schema;
    config.postgres.writers = 1;
    let mut sent = common::generate(
        Shape {
            seed: 21,
            ..Shape::default()
        },
        1000,
    );
    let target = common::produce(&topics, &mut sent).await;
    // The writer's compare-and-set (UPDATE or INSERT) waits for this lock;
    // reads of the table do not.
    let locker = common::connect(&common::stack().database_url).await;
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{s}\".weir_offsets IN SHARE ROW EXCLUSIVE MODE"
        ))
        .await
        .expect("lock the offsets table");
    let running = common::Running::start(config);
    common::eventually(
        "the writer waits for the offsets table",
        Duration::from_secs(60),
        || async {
            db.count(&format!(
                "SELECT count(*) FROM pg_locks WHERE relation = '\"{s}\".weir_offsets'::regclass \
                   AND NOT granted"
            ))
            .await
                > 0
        },
    )
    .await;
    // The backlog was read as soon as it flowed; this leaves every
    // partition's linger (50 ms) ample time to pass while the writer waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    locker.batch_execute("COMMIT").await.expect("unlock");
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exactly_once(&db, &sent, &topics).await;

    // Rows of one transaction share `ingested_at` (its start, now()). At
    // most two transactions (the stuck one and the one waiting for the
    // writer) can have been cut before the rest fell due, so the four
    // webhook partitions cannot each have had a transaction of their own.
    let shared_transactions = db
        .count(&format!(
            "SELECT count(*) FROM (SELECT ingested_at FROM \"{s}\".webhook_logs GROUP BY ingested_at \
               HAVING count(DISTINCT source_partition) > 1) AS t"
        ))
        .await;
    assert!(
        shared_transactions > 0,
        "some transaction carried the rows of more than one partition"
    );
}

/// Rows at the last instant before a boundary and the first after it land
/// in different partitions, by UTC, at day, week and month granularity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boundaries_route_by_utc_day_week_and_month() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("edge", 1).await;
    let s = &db.schema;

    let now = Utc::now();
    let month_start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .expect("first of month");
    let today = now.date_naive();
    let monday = today - Days::new(today.weekday().num_days_from_monday() as u64);
    let week_start = Utc.from_utc_datetime(&monday.and_hms_opt(0, 0, 0).expect("midnight"));
    let day_start = Utc.from_utc_datetime(&today.and_hms_opt(0, 0, 0).expect("midnight"));
    let company = "6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11";

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &common::stack().brokers)
        .create()
        .expect("producer");
    let send = |topic: String, payload: serde_json::Value, kafka_ms: i64| {
        let producer = producer.clone();
        async move {
            let body = serde_json::to_vec(&payload).expect("json");
            let headers = OwnedHeaders::new().insert(Header {
                key: "company_id",
                value: Some(company),
            });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key("k")
                        .payload(&body)
                        .headers(headers)
                        .timestamp(kafka_ms),
                    Duration::from_secs(10),
                )
                .await
                .expect("delivered");
        }
    };
    // Month edge (wa_events, second precision): 23:59:59 and 00:00:00.
    // Day edge (webhook_logs, Kafka timestamp in ms): 23:59:59.999 and 00:00:00.000.
    for (id, at, kafka_ms) in [
        (
            "wamid.before",
            month_start.timestamp() - 1,
            day_start.timestamp_millis() - 1,
        ),
        (
            "wamid.after",
            month_start.timestamp(),
            day_start.timestamp_millis(),
        ),
    ] {
        let body = json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": {
                "metadata": {"phone_number_id": "100", "display_phone_number": "1555"},
                "messages": [{"from": "5511", "id": id, "timestamp": at.to_string(), "type": "text", "text": {"body": "oi"}}]
            }}]}]
        });
        send(topics.webhooks(), body, kafka_ms).await;
    }
    // Week edge (messages, millisecond precision): Sunday 23:59:59.999 and Monday 00:00:00.000.
    for (id, at) in [
        (
            "msg.before",
            (week_start - chrono::Duration::milliseconds(1)).to_rfc3339(),
        ),
        ("msg.after", week_start.to_rfc3339()),
    ] {
        let body = json!({
            "id": id, "company_id": company, "direction": "outbound", "phone_number_id": "100",
            "to": "5511", "type": "text", "text": "olá", "sent_at": at
        });
        send(topics.chat(), body, now.timestamp_millis()).await;
    }

    drain(&db, config, &group, 4).await;

    let leaf = |table: &str, key_column: &str, key: &str| {
        format!("SELECT tableoid::regclass::text FROM \"{s}\".{table} WHERE {key_column} = '{key}'")
    };
    let name = |sql: String| {
        let db = &db;
        async move {
            let row = db
                .client
                .query_one(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            row.get::<_, String>(0)
        }
    };
    let month_before = (month_start - chrono::Duration::days(1))
        .format("wa_events_p%Y%m01")
        .to_string();
    let month_after = month_start.format("wa_events_p%Y%m%d").to_string();
    assert!(
        name(leaf("wa_events", "event_id", "wamid.before"))
            .await
            .ends_with(&month_before)
    );
    assert!(
        name(leaf("wa_events", "event_id", "wamid.after"))
            .await
            .ends_with(&month_after)
    );
    let week_before = (week_start - chrono::Duration::days(7))
        .format("messages_p%Y%m%d")
        .to_string();
    let week_after = week_start.format("messages_p%Y%m%d").to_string();
    assert!(
        name(leaf("messages", "message_id", "msg.before"))
            .await
            .ends_with(&week_before)
    );
    assert!(
        name(leaf("messages", "message_id", "msg.after"))
            .await
            .ends_with(&week_after)
    );
    let day_before = (day_start - chrono::Duration::days(1))
        .format("webhook_logs_p%Y%m%d")
        .to_string();
    let day_after = day_start.format("webhook_logs_p%Y%m%d").to_string();
    let logs: Vec<String> = db
        .client
        .query(
            &format!(
                "SELECT tableoid::regclass::text FROM \"{s}\".webhook_logs ORDER BY received_at"
            ),
            &[],
        )
        .await
        .expect("webhook_logs rows")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(logs.len(), 2);
    assert!(logs[0].ends_with(&day_before), "{logs:?}");
    assert!(logs[1].ends_with(&day_after), "{logs:?}");
}

/// Meta redelivers webhooks it thinks failed: the same items under new
/// offsets. wa_events and messages keep each item once (their dedupe key);
/// webhook_logs keeps every delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_webhooks_are_written_once_and_logged_twice() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("dup", 2).await;
    let mut sent = common::generate(
        Shape {
            seed: 71,
            duplicate_share: 0.3,
            ..Shape::default()
        },
        2000,
    );
    let duplicates = sent.events.iter().filter(|e| e.duplicate).count();
    assert!(duplicates > 300, "{duplicates} redeliveries");
    let target = common::produce(&topics, &mut sent).await;
    drain(&db, config, &group, target).await;
    common::assert_exactly_once(&db, &sent, &topics).await;
    let s = &db.schema;
    let logs = db
        .count(&format!("SELECT count(*) FROM \"{s}\".webhook_logs"))
        .await as usize;
    let deliveries = sent
        .events
        .iter()
        .filter(|e| e.topic == common::webhooks::WEBHOOK_TOPIC)
        .count();
    assert_eq!(
        logs, deliveries,
        "every delivery is logged, redeliveries included"
    );
}
