//! Exactly-once at the edges: inputs and schema changes that once panicked
//! a writer, and Kafka positions that once made weir skip records without a
//! word. Each test failed before its fix.

mod common;

use std::time::Duration;

use common::webhooks::Shape;
use common::{Fixture, Running, TestDb, Topics};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

/// The stored offset of one partition of `group`.
async fn stored_at(db: &TestDb, group: &str, topic: &str, partition: i32) -> Option<i64> {
    db.client
        .query_opt(
            &format!(
                "SELECT next_offset FROM \"{}\".weir_offsets
                  WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
                db.schema
            ),
            &[&group, &topic, &partition],
        )
        .await
        .expect("read offsets")
        .map(|row| row.get(0))
}

/// Sends a generated event, with an explicit Kafka timestamp (CreateTime)
/// and one more header whose name is raw bytes, when given. rust-rdkafka's
/// producer takes names as `&str`, so that one is added through librdkafka
/// itself.
async fn send_event(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    event: &common::webhooks::Produced,
    timestamp_ms: Option<i64>,
    raw_header: Option<(&[u8], &[u8])>,
) -> (i32, i64) {
    let mut headers = OwnedHeaders::new();
    for (name, value) in &event.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    if let Some((name, value)) = raw_header {
        // A `&BorrowedHeaders` is librdkafka's own headers pointer
        // (rust-rdkafka casts one to the other); these headers are ours
        // until sent.
        let native = headers.as_borrowed() as *const rdkafka::message::BorrowedHeaders
            as *mut rdkafka::bindings::rd_kafka_headers_t;
        // SAFETY: `native` is the live headers list `headers` owns;
        // librdkafka copies `name` and `value` (lengths given, so no NUL
        // is needed).
        let err = unsafe {
            rdkafka::bindings::rd_kafka_header_add(
                native,
                name.as_ptr().cast(),
                name.len() as isize,
                value.as_ptr().cast(),
                value.len() as isize,
            )
        };
        assert_eq!(
            err,
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        );
    }
    let mut record = FutureRecord::to(topic)
        .key(event.key.as_bytes())
        .payload(&event.payload)
        .headers(headers);
    if let Some(ms) = timestamp_ms {
        record = record.timestamp(ms);
    }
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(err, _)| err)
        .expect("delivered");
    (delivery.partition, delivery.offset)
}

/// A producer that sends microseconds as milliseconds stamps a message in
/// the year 55,000. The event's webhook_logs row (whose time is the Kafka
/// timestamp) becomes a dead letter, and the dead letter itself records the
/// timestamp as NULL with the reason. Before: encoding that dead letter
/// panicked the writer, and no later event of its partitions was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_timestamp_past_year_9999_is_a_dead_letter_and_the_rest_flows() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("farts", 1).await;
    let s = db.schema.clone();
    let mut sent = common::generate(
        Shape {
            seed: 91,
            chat_share: 0.0,
            ..Shape::default()
        },
        21,
    );
    let producer = common::producer();
    let topic = topics.webhooks();
    let microseconds_as_millis = 1_700_000_000_000_000i64;
    for (index, event) in sent.events.iter().enumerate() {
        let timestamp = (index == 0).then_some(microseconds_as_millis);
        let position = send_event(&producer, &topic, event, timestamp, None).await;
        sent.delivered.push(Some(position));
    }
    // Every table takes `received_at` from the Kafka timestamp: each row
    // of the first event is a dead letter; the 20 others are written.
    let bad_rows = std::mem::take(&mut sent.events[0].rows);
    assert!(bad_rows.len() >= 2, "the first event carries several rows");
    for row in &bad_rows {
        sent.events[0]
            .dead_letters
            .push(common::webhooks::ExpectedDeadLetter {
                table: Some(row.table),
                stage: "validate",
                code: "out_of_range",
            });
    }
    let dead_table = weir::store::deadletter::DeadLetterTable::new(&config);
    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, 21, Duration::from_secs(60)).await;
    running.stop().await;

    // The body is stored once, with one of its dead letters; the others
    // point at it, and `weir dlq show` restores it from there.
    let stored: Vec<(i64, String, i64)> = db
        .client
        .query(
            &format!(
                "SELECT id, payload_encoding, length(payload)::int8 FROM \"{s}\".weir_dead_letters ORDER BY id"
            ),
            &[],
        )
        .await
        .expect("dead-letter payloads")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    println!("stored payloads: {stored:?}");
    let carriers: Vec<_> = stored
        .iter()
        .filter(|(_, encoding, _)| encoding != "sibling")
        .collect();
    assert_eq!(carriers.len(), 1, "the payload is stored once");
    assert!(carriers[0].2 > 0, "with its bytes");
    let sibling = stored
        .iter()
        .find(|(_, encoding, size)| encoding == "sibling" && *size == 0)
        .expect("the other dead letters store no copy");
    let shown = weir::dlq::show(&db.client, &dead_table, sibling.0, 1 << 20)
        .await
        .expect("dlq show")
        .expect("the dead letter exists");
    let body = std::str::from_utf8(&sent.events[0].payload).expect("utf-8 body");
    let probe = &body[..body.len().min(40)];
    assert!(
        shown.contains(probe),
        "dlq show restores the payload from its sibling:\n{shown}"
    );

    let letters = db
        .client
        .query(
            &format!("SELECT kafka_timestamp IS NULL, message FROM \"{s}\".weir_dead_letters"),
            &[],
        )
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), bad_rows.len());
    for letter in &letters {
        let (null_timestamp, message): (bool, String) = (letter.get(0), letter.get(1));
        println!("dead letter: {message}");
        assert!(
            null_timestamp,
            "the unrepresentable timestamp is stored as NULL"
        );
        assert!(
            message.contains(&format!(
                "kafka timestamp {microseconds_as_millis} ms is outside years 1 to 9999"
            )),
            "the message says why: {message}"
        );
    }
    common::assert_exactly_once(&db, &sent, &topics).await;
}

/// A table with a constraint PostgreSQL checks only at COMMIT
/// (`DEFERRABLE INITIALLY DEFERRED`): the batch's commit fails with no row
/// named. The careful pass checks constraints per COPY, isolates the rows
/// the constraint refuses and writes the rest. Before: the careful pass hit
/// the same failure at COMMIT and the writer panicked (`unreachable!`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_deferred_constraint_refuses_at_commit_become_dead_letters() {
    let db = TestDb::new("deferred").await;
    let topics = Topics::new("deferred");
    let topic = topics.name("events");
    common::create_topics(std::slice::from_ref(&topic), 1).await;
    let group = common::unique("g");
    db.client
        .batch_execute(
            "CREATE TABLE deferred_events (
                 id bigint NOT NULL,
                 body text NOT NULL,
                 created_at timestamptz NOT NULL
             ) PARTITION BY RANGE (created_at);
             CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.body = 'poison' THEN
                     RAISE EXCEPTION 'poison row %', NEW.id USING ERRCODE = 'check_violation';
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER no_poison AFTER INSERT ON deferred_events
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
        )
        .await
        .expect("table with a deferred constraint");
    let extra = format!(
        r#"
[[tables]]
name = "deferred_events"
time_column = "created_at"
granularity = "month"
[[tables.sources]]
topics = ["{topic}"]
[tables.sources.columns]
id = {{ item = "/id" }}
body = {{ item = "/body" }}
created_at = {{ item = "/at" }}
"#
    );
    let mut config = common::config(&db.schema, &topics, &group, &extra);
    config.tables.retain(|t| t.name == "deferred_events");
    config.pipeline.batch_max_rows = 1_000;
    config.pipeline.batch_linger_ms = 2_000;
    db.migrate(&config).await;

    let bad = [17u64, 400];
    let now = chrono::Utc::now().to_rfc3339();
    let producer = common::producer();
    for id in 0..500u64 {
        let body = if bad.contains(&id) { "poison" } else { "fine" };
        let payload = serde_json::json!({"id": id, "body": body, "at": now}).to_string();
        common::send(&producer, &topic, b"k", &[], Some(payload.as_bytes())).await;
    }
    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, 500, Duration::from_secs(60)).await;
    running.stop().await;

    let s = &db.schema;
    assert_eq!(
        db.count(&format!(
            "SELECT count(DISTINCT id) FROM \"{s}\".deferred_events"
        ))
        .await,
        498
    );
    let dead: Vec<(String, String, i64)> = db
        .client
        .query(
            &format!(
                "SELECT stage, code, kafka_offset FROM \"{s}\".weir_dead_letters ORDER BY kafka_offset"
            ),
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        dead,
        vec![
            ("write".to_string(), "23514".to_string(), 17),
            ("write".to_string(), "23514".to_string(), 400)
        ]
    );
}

/// Someone adds a DEFAULT partition while weir runs and it already holds
/// rows of next month: creating next month's partition then fails with
/// 23514 at ATTACH. No row of the batch is at fault: the writer stops and
/// says why (readiness 503), nothing is dead-lettered, the stored offsets
/// hold still; once the rows are moved out it writes everything. Before:
/// the failure reached an `unreachable!` and panicked the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_partition_blocking_attach_stops_the_writer_until_fixed() {
    let db = TestDb::new("defattach").await;
    let topics = Topics::new("defattach");
    let topic = topics.name("events");
    common::create_topics(std::slice::from_ref(&topic), 1).await;
    let group = common::unique("g");
    db.client
        .batch_execute(
            "CREATE TABLE plain_events (
                 id bigint NOT NULL,
                 created_at timestamptz NOT NULL
             ) PARTITION BY RANGE (created_at);",
        )
        .await
        .expect("table");
    let extra = format!(
        r#"
[[tables]]
name = "plain_events"
time_column = "created_at"
granularity = "day"
premake = 0
[[tables.sources]]
topics = ["{topic}"]
[tables.sources.columns]
id = {{ item = "/id" }}
created_at = {{ item = "/at" }}
"#
    );
    let mut config = common::config(&db.schema, &topics, &group, &extra);
    config.tables.retain(|t| t.name == "plain_events");
    config.maintenance.enabled = false;
    db.migrate(&config).await;
    let s = db.schema.clone();
    let running = Running::start(config);
    common::eventually("ready", Duration::from_secs(30), || async {
        running.get("/readyz").await.0 == 200
    })
    .await;

    // Added behind weir's back, with a row of the day the event will need.
    let day = chrono::Utc::now() - chrono::Duration::days(2);
    db.client
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".plain_events_default PARTITION OF \"{s}\".plain_events DEFAULT;
             INSERT INTO \"{s}\".plain_events VALUES (-1, '{}');",
            day.to_rfc3339()
        ))
        .await
        .expect("default partition holding a row");
    let producer = common::producer();
    let payload = serde_json::json!({"id": 1, "at": day.to_rfc3339()}).to_string();
    common::send(&producer, &topic, b"k", &[], Some(payload.as_bytes())).await;

    common::eventually(
        "not ready, naming the cause",
        Duration::from_secs(30),
        || async {
            let (status, body) = running.get("/readyz").await;
            status == 503 && body.contains("DEFAULT partition")
        },
    )
    .await;
    let (_, reason) = running.get("/readyz").await;
    println!("readyz while blocked: {}", reason.trim());
    let first = common::offsets_hold_still(&db).await;
    assert_eq!(first, 0, "the event is not committed");
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        0,
        "nothing dead-lettered"
    );

    // The fix: the DEFAULT partition goes.
    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".plain_events DETACH PARTITION \"{s}\".plain_events_default"
        ))
        .await
        .expect("detach the default partition");
    common::wait_for_offsets(&db, &group, 1, Duration::from_secs(60)).await;
    running.stop().await;
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM \"{s}\".plain_events WHERE id = 1"
        ))
        .await,
        1
    );
}

/// weir's metrics in this test binary (the process-wide recorder: an
/// in-process `Running` serves a recorder of its own, which the pipeline's
/// metrics do not reach).
fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static RECORDER: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    RECORDER.get_or_init(|| weir::metrics::install().expect("metrics recorder"))
}

/// A topic that was deleted and recreated after weir stored offset 30 for
/// its webhooks partition 0: on librdkafka's mock cluster (which answers
/// out-of-range fetches as Kafka does), the recreated log holds 10 new
/// bodies, offsets 0 to 9. Returns the mock (keep it alive), the fixture
/// pointed at it with `policy`, and what was sent.
async fn recreated_topic(
    prefix: &str,
    seed: u64,
    policy: weir::config::OffsetReset,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    Fixture,
    common::Sent,
) {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let mut fixture = Fixture::without_topics(prefix).await;
    let topics = &fixture.topics;
    for name in [topics.webhooks(), topics.chat()] {
        mock.create_topic(&name, 1, 1).expect("mock topic");
    }
    fixture.config.kafka.brokers = mock.bootstrap_servers();
    fixture.config.kafka.auto_offset_reset = policy;
    fixture
        .db
        .client
        .execute(
            &format!(
                "INSERT INTO \"{}\".weir_offsets (consumer_group, topic, partition, next_offset)
                 VALUES ($1, $2, 0, 30)",
                fixture.db.schema
            ),
            &[&fixture.group, &topics.webhooks()],
        )
        .await
        .expect("the offset stored before the topic was recreated");
    let mut sent = common::generate(
        Shape {
            seed,
            chat_share: 0.0,
            ..Shape::default()
        },
        10,
    );
    common::produce_to(&mock.bootstrap_servers(), topics, &mut sent).await;
    (mock, fixture, sent)
}

/// The topic was deleted and recreated (or its log truncated) after weir
/// stored offset 30: the log now ends at 10. Kafka answers a fetch at 30
/// with OFFSET_OUT_OF_RANGE, librdkafka resets to the log's start, and the
/// 10 new records arrive below weir's position. They are new records: weir
/// writes them, moves the stored offset back to 10, and counts and logs the
/// reset. Before: they were dropped as "already written", without a word.
/// (librdkafka's mock cluster answers out-of-range fetches as Kafka does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_past_the_log_end_restarts_at_the_log_start_and_writes_it() {
    let recorder = recorder();
    let (_mock, fixture, sent) =
        recreated_topic("reset", 92, weir::config::OffsetReset::Earliest).await;
    let Fixture {
        db,
        topics,
        group,
        config,
    } = fixture;

    let running = Running::start(config);
    let webhooks = topics.webhooks();
    common::eventually(
        "the stored offset moves to the new log's end",
        Duration::from_secs(60),
        || async { stored_at(&db, &group, &webhooks, 0).await == Some(10) },
    )
    .await;
    running.stop().await;
    let resets = common::scraped(&recorder.render(), "weir_offset_resets_total");
    println!("offset resets: {resets}");
    assert!(resets >= 1.0, "the reset is counted");
    common::assert_exactly_once(&db, &sent, &topics).await;
}

/// One writer is stuck (its partition's offset row is locked by someone
/// else) and its queue fills: only that writer's partitions pause; the other
/// writer's partitions are read and written to their end meanwhile. Before:
/// one full queue paused every partition of the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_pauses_only_its_own_partitions() {
    let Fixture {
        db,
        topics,
        group,
        mut config,
    } = Fixture::new("stuck", 4).await;
    let recorder = recorder();
    let writers = 2;
    config.postgres.writers = writers;
    config.pipeline.queue_messages = 64;
    config.pipeline.batch_max_rows = 400;
    let (mut first, mut second) = common::generate(
        Shape {
            seed: 94,
            ..Shape::default()
        },
        8_000,
    )
    .split(3_000);
    common::produce(&topics, &mut first).await;
    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, first.target(), Duration::from_secs(60)).await;

    // From now on the writer of webhooks partition 0 cannot commit.
    let stuck_topic = topics.webhooks();
    // Which writer writes a partition, as weir exports it.
    let writer_of = |topic: &str, partition: i32| -> i64 {
        let series =
            format!("weir_partition_writer{{topic=\"{topic}\",partition=\"{partition}\"}} ");
        let metrics = recorder.render();
        let line = metrics
            .lines()
            .find(|line| line.starts_with(&series))
            .unwrap_or_else(|| panic!("no {series} in the metrics"));
        line[series.len()..].trim().parse().expect("a writer index")
    };
    let stuck_writer = writer_of(&stuck_topic, 0);
    let mut locker = common::connect(&common::stack().database_url).await;
    let lock = locker.transaction().await.expect("begin");
    lock.query_one(
        &format!(
            "SELECT next_offset FROM \"{}\".weir_offsets
              WHERE consumer_group = $1 AND topic = $2 AND partition = 0 FOR UPDATE",
            db.schema
        ),
        &[&group, &stuck_topic],
    )
    .await
    .expect("lock the offset row of webhooks partition 0");
    common::produce(&topics, &mut second).await;
    let all = first.join(second);
    let ends: std::collections::HashMap<(String, i32), i64> = all
        .ends()
        .into_iter()
        .map(|((topic, partition), end)| ((topics.name(topic), partition), end))
        .collect();
    let free: Vec<((String, i32), i64)> = ends
        .iter()
        .filter(|((topic, partition), _)| writer_of(topic, *partition) != stuck_writer)
        .map(|(key, end)| (key.clone(), *end))
        .collect();
    assert!(!free.is_empty(), "the other writer owns partitions");
    common::eventually(
        "the other writer's partitions are written to their end",
        Duration::from_secs(45),
        || async {
            for ((topic, partition), end) in &free {
                if stored_at(&db, &group, topic, *partition).await != Some(*end) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert!(
        stored_at(&db, &group, &stuck_topic, 0).await
            < ends.get(&(stuck_topic.clone(), 0)).copied(),
        "the stuck partition is still behind"
    );
    lock.rollback().await.expect("unlock");
    common::wait_for_offsets(&db, &group, all.target(), Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exactly_once(&db, &all, &topics).await;
}

/// The session dies inside COMMIT, three times (a deferred trigger on the
/// offsets table terminates its own backend at commit time): weir cannot
/// know whether the batch committed. It reconnects and retries the same
/// batch; the compare-and-set decides, and every event lands exactly once,
/// with no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_killed_inside_commit_are_retried_exactly_once() {
    let Fixture {
        db,
        topics,
        group,
        mut config,
    } = Fixture::new("commitkill", 2).await;
    let s = db.schema.clone();
    config.pipeline.batch_max_rows = 500;
    config.pipeline.retry_max_ms = 500;
    config.postgres.writers = 1;
    db.client
        .batch_execute(&format!(
            "CREATE SEQUENCE \"{s}\".commit_kills;
             CREATE FUNCTION \"{s}\".kill_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 -- A sequence does not roll back with the dying transaction.
                 IF nextval('\"{s}\".commit_kills') <= 3 THEN
                     PERFORM pg_terminate_backend(pg_backend_pid());
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER die_at_commit AFTER UPDATE ON \"{s}\".weir_offsets
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                 EXECUTE FUNCTION \"{s}\".kill_at_commit();"
        ))
        .await
        .expect("a trigger that kills the session at commit");
    let mut sent = common::generate(
        Shape {
            seed: 95,
            ..Shape::default()
        },
        3_000,
    );
    let target = common::produce(&topics, &mut sent).await;
    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(90)).await;
    running.stop().await;
    let kills = db
        .count(&format!("SELECT last_value FROM \"{s}\".commit_kills"))
        .await;
    println!("commits interrupted by a killed session: {}", kills.min(3));
    assert!(
        kills >= 3,
        "three commits died with their session ({kills})"
    );
    common::assert_exactly_once(&db, &sent, &topics).await;
}

/// The same recreated topic with `auto_offset_reset = "error"`: nothing is
/// read or skipped, the stored offset stays, and readiness says why. Before:
/// the partition silently stopped with a warning and weir reported ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_error_policy_an_out_of_range_partition_stops_and_says_so() {
    let (_mock, fixture, _sent) =
        recreated_topic("reseterr", 96, weir::config::OffsetReset::Error).await;
    let Fixture {
        db,
        topics,
        group,
        config,
    } = fixture;
    let running = Running::start(config);
    common::eventually(
        "not ready, naming the out-of-range partition",
        Duration::from_secs(60),
        || async {
            let (status, body) = running.get("/readyz").await;
            status == 503 && body.contains("out of range")
        },
    )
    .await;
    let (_, reason) = running.get("/readyz").await;
    println!("readyz: {}", reason.trim());
    running.stop().await;
    let webhooks = topics.webhooks();
    assert_eq!(
        stored_at(&db, &group, &webhooks, 0).await,
        Some(30),
        "the stored offset stays"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM \"{}\".webhook_logs",
            db.schema
        ))
        .await,
        0,
        "nothing read, nothing skipped"
    );
}

/// Failed reloads so far, from weir's metrics in this test binary.
#[cfg(feature = "failpoints")]
fn failed_reloads() -> f64 {
    common::scraped_matching(
        &recorder().render(),
        "weir_kafka_errors_total",
        "kind=\"reload\"",
    )
}

/// An operator rewinds a partition while weir runs (empties the tables and
/// moves its stored offset back to 0, to re-ingest it). weir's next batch is
/// fenced, and the lane reloads: it reads the stored offset and seeks there.
/// That seek fails (a fail point stands in for librdkafka refusing it) for
/// as long as the test says, while librdkafka goes on fetching the new
/// records. The lane stays fenced, retries, and once the seek succeeds
/// writes everything from 0, exactly once. Before: the failed seek was only
/// logged, the lane restarted at 0 while librdkafka fetched from far later,
/// and the batcher committed over the difference as a gap: every record
/// below it lost.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_seek_fails_waits_for_the_seek_and_loses_nothing() {
    let _ = recorder();
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("reseek", 1).await;
    let s = db.schema.clone();
    let (mut first, mut second) = common::generate(
        Shape {
            seed: 97,
            chat_share: 0.0,
            ..Shape::default()
        },
        600,
    )
    .split(300);
    common::produce(&topics, &mut first).await;
    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, first.target(), Duration::from_secs(60)).await;

    let webhooks = topics.webhooks();
    db.client
        .batch_execute(&format!(
            "BEGIN;
             TRUNCATE \"{s}\".webhook_logs, \"{s}\".wa_events, \"{s}\".messages, \"{s}\".weir_dead_letters;
             UPDATE \"{s}\".weir_offsets SET next_offset = 0;
             COMMIT;"
        ))
        .await
        .expect("rewind to 0");
    let failed_before = failed_reloads();
    fail::cfg("reload-seek", &format!("return({webhooks})")).expect("fail point");
    common::produce(&topics, &mut second).await;
    common::eventually(
        "the reload's seek fails twice (the lane stays fenced meanwhile)",
        Duration::from_secs(60),
        || async { failed_reloads() >= failed_before + 2.0 },
    )
    .await;
    assert_eq!(
        stored_at(&db, &group, &webhooks, 0).await,
        Some(0),
        "nothing is written while the seek fails"
    );
    fail::remove("reload-seek");
    let all = first.join(second);
    common::wait_for_offsets(&db, &group, all.target(), Duration::from_secs(60)).await;
    running.stop().await;
    common::assert_exactly_once(&db, &all, &topics).await;
}

/// Retention deleted records before weir read them: weir stored offset 20,
/// and the log now starts far above it (librdkafka's mock cluster keeps
/// 5 MiB a partition and deletes the oldest batches past that, as
/// retention.bytes does). The fetch at 20 is out of range, librdkafka resets
/// to the log's start, and weir goes on from there: the jump is a gap,
/// counted in `weir_offset_gaps_total` and logged, and everything the log
/// still holds is written exactly once. Before: the gap passed with a debug
/// line and no metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_weir_read_them_are_a_counted_gap() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let recorder = recorder();
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let Fixture {
        db,
        topics,
        group,
        mut config,
    } = Fixture::without_topics("retained").await;
    for name in [topics.webhooks(), topics.chat()] {
        mock.create_topic(&name, 1, 1).expect("mock topic");
    }
    config.kafka.brokers = mock.bootstrap_servers();
    let webhooks = topics.webhooks();
    db.client
        .execute(
            &format!(
                "INSERT INTO \"{}\".weir_offsets (consumer_group, topic, partition, next_offset)
                 VALUES ($1, $2, 0, 20)",
                db.schema
            ),
            &[&group, &webhooks],
        )
        .await
        .expect("the offset weir stored before retention ran");
    let mut sent = common::generate(
        Shape {
            seed: 98,
            chat_share: 0.0,
            ..Shape::default()
        },
        9_000,
    );
    let bytes: usize = sent.events.iter().map(|e| e.payload.len()).sum();
    // Uncompressed batches of 200, so retention deletes a few at a time.
    common::produce_with(&mock.bootstrap_servers(), "none", 200, &topics, &mut sent).await;
    let probe: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "probe")
        .create()
        .expect("probe consumer");
    let (start, end) = probe
        .fetch_watermarks(&webhooks, 0, Duration::from_secs(10))
        .expect("watermarks");
    println!("produced {bytes} bytes; the log holds offsets {start}..{end}");
    assert!(
        start > 20,
        "retention deleted records past the stored offset"
    );
    // What the log still holds is what weir can and must write.
    let (events, delivered) = sent
        .events
        .into_iter()
        .zip(sent.delivered)
        .filter(|(_, position)| position.is_some_and(|(_, offset)| offset >= start))
        .unzip();
    let held = common::Sent { events, delivered };

    let running = Running::start(config);
    common::eventually(
        "the stored offset reaches the log's end",
        Duration::from_secs(60),
        || async { stored_at(&db, &group, &webhooks, 0).await == Some(end) },
    )
    .await;
    running.stop().await;
    let metrics = recorder.render();
    let of_topic = |name: &str| common::scraped_matching(&metrics, name, &webhooks);
    let (gaps, resets) = (
        of_topic("weir_offset_gaps_total"),
        of_topic("weir_offset_resets_total"),
    );
    println!("gaps {gaps}, resets {resets}");
    assert_eq!(gaps, 1.0, "the jump from 20 to {start} is one counted gap");
    assert_eq!(resets, 0.0, "a forward jump is not a reset");
    common::assert_exactly_once(&db, &held, &topics).await;
}

/// A backlog does not wait for the linger. With a linger of ten minutes and
/// far fewer rows than a batch holds, the only thing that can cut a batch
/// early is that the partition holds more than weir has read: its batches
/// go to the writer as soon as it can take them. (Only what is read once
/// caught up with the partition's end lingers; stopping flushes it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_without_waiting_for_the_linger() {
    let Fixture {
        db,
        topics,
        group,
        mut config,
    } = Fixture::new("backlog", 1).await;
    let recorder = recorder();
    config.pipeline.batch_linger_ms = 600_000;
    let mut sent = common::generate(
        Shape {
            seed: 95,
            chat_share: 0.0,
            ..Shape::default()
        },
        3_000,
    );
    common::produce(&topics, &mut sent).await;
    let rows: usize = sent.events.iter().map(|event| event.rows.len()).sum();
    assert!(
        rows < config.pipeline.batch_max_rows,
        "{rows} rows: below one batch"
    );
    let running = Running::start(config);
    let webhooks = topics.webhooks();
    let started = std::time::Instant::now();
    while stored_at(&db, &group, &webhooks, 0).await.is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            // Say where it stood: read? lagging? (weir records into the
            // process's recorder; only this test's topic is shown.)
            let (_, ready) = common::http_get(running.port, "/readyz").await;
            let metrics = recorder.render();
            let lines: Vec<&str> = metrics
                .lines()
                .filter(|line| line.contains(webhooks.as_str()))
                .collect();
            panic!(
                "nothing committed after 120 s, with a backlog and a 600 s linger;\n\
                 readyz: {ready}\n{}",
                lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("first commit after {:?}", started.elapsed());
    running.stop().await;
    common::assert_exactly_once(&db, &sent, &topics).await;
}

/// A header whose name is not UTF-8. Kafka calls header names strings,
/// but a client writing raw bytes can send any. rust-rdkafka's header
/// reader unwraps each name as UTF-8: it panicked weir's consumer thread,
/// so nothing more was read, and after a restart the same record did it
/// again. Now the name is read lossily (U+FFFD for each bad sequence, as
/// the dead-letter table already stores a NUL in a name), every row is
/// written, and a dead letter keeps the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_kept_lossily_and_the_rows_flow() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("rawhdr", 1).await;
    let s = db.schema.clone();
    let mut sent = common::generate(
        Shape {
            seed: 93,
            chat_share: 0.0,
            ..Shape::default()
        },
        12,
    );
    // The first event's body is not JSON: a dead letter, with its headers.
    sent.events[0].payload = b"{\"object\": not json".to_vec();
    sent.events[0].rows.clear();
    sent.events[0].dead_letters = vec![common::webhooks::ExpectedDeadLetter {
        table: None,
        stage: "decode",
        code: "invalid_json",
    }];
    let producer = common::producer();
    let topic = topics.webhooks();
    for event in &sent.events {
        let raw_header = Some((&b"x-\xff\xfename"[..], &b"kept"[..]));
        let position = send_event(&producer, &topic, event, None, raw_header).await;
        sent.delivered.push(Some(position));
    }
    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, 12, Duration::from_secs(60)).await;
    running.stop().await;

    common::assert_exactly_once(&db, &sent, &topics).await;
    let headers: String = db
        .client
        .query_one(
            &format!("SELECT kafka_headers::text FROM \"{s}\".weir_dead_letters"),
            &[],
        )
        .await
        .expect("the dead letter")
        .get(0);
    println!("dead letter's headers: {headers}");
    assert!(
        headers.contains(r#"{"key": "x-\ufffd\ufffdname", "value": "kept"}"#)
            || headers.contains(r#"{"key": "x-��name", "value": "kept"}"#),
        "the odd name is kept lossily with its value: {headers}"
    );
    assert!(
        headers.contains(r#""key": "company_id""#),
        "the other headers are kept: {headers}"
    );
}
