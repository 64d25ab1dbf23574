//! Bisection: a batch of 10,000 rows holding 3 rows PostgreSQL refuses is
//! written as 9,997 rows and 3 dead letters, in about 3·log2(10,000) COPY
//! attempts. (Its own test binary: it installs the process-wide metrics
//! recorder to read the attempt counter.)

mod common;

use std::time::Duration;

use common::{Running, TestDb, Topics};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bad_rows_in_ten_thousand_are_isolated_in_about_3_log2_n_copies() {
    let recorder = weir::metrics::install().expect("metrics recorder");
    let db = TestDb::new("bisect").await;
    let topics = Topics::new("bisect");
    let topic = topics.name("events");
    common::create_topics(std::slice::from_ref(&topic), 1).await;
    let group = common::unique("g");
    db.client
        .batch_execute(
            "CREATE TABLE checked_events (
                 id bigint NOT NULL,
                 body text NOT NULL CHECK (body <> 'poison'),
                 created_at timestamptz NOT NULL
             ) PARTITION BY RANGE (created_at)",
        )
        .await
        .expect("table with a constraint weir cannot check itself");
    // Everything in one batch: one partition, rows cut at 10,000, long linger.
    let extra = format!(
        r#"
[[tables]]
name = "checked_events"
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
    config.tables.retain(|t| t.name == "checked_events");
    config.pipeline.batch_max_rows = 10_000;
    config.pipeline.batch_linger_ms = 60_000;
    db.migrate(&config).await;

    let bad = [1_234u64, 5_678, 9_001];
    let now = chrono::Utc::now().to_rfc3339();
    let producer = common::producer();
    let mut pending = Vec::new();
    for id in 0..10_000u64 {
        let body = if bad.contains(&id) {
            "poison".to_string()
        } else {
            format!("message {id}")
        };
        let payload = serde_json::json!({"id": id, "body": body, "at": now}).to_string();
        let producer = producer.clone();
        let topic = topic.clone();
        pending.push(tokio::spawn(async move {
            common::send(&producer, &topic, b"k", &[], Some(payload.as_bytes())).await
        }));
    }
    for send in pending {
        send.await.expect("send");
    }

    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, 10_000, Duration::from_secs(120)).await;
    running.stop().await;

    let s = &db.schema;
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".checked_events"))
            .await,
        9_997
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(DISTINCT id) FROM \"{s}\".checked_events"
        ))
        .await,
        9_997
    );
    let dead: Vec<(String, String, i32)> = db
        .client
        .query(
            &format!("SELECT stage, code, item_index FROM \"{s}\".weir_dead_letters ORDER BY kafka_offset"),
            &[],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get::<_, Option<i32>>(2).unwrap_or(-1)))
        .collect();
    assert_eq!(
        dead,
        vec![("write".into(), "23514".into(), 0); 3],
        "three check violations"
    );
    let ids: Vec<i64> = db
        .client
        .query(
            &format!(
                "SELECT (convert_from(payload, 'UTF8')::jsonb ->> 'id')::int8 FROM \"{s}\".weir_dead_letters
                  WHERE payload_encoding = 'identity' ORDER BY 1"
            ),
            &[],
        )
        .await
        .expect("dead-letter payloads")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids, vec![1_234, 5_678, 9_001], "exactly the bad rows");

    let rendered = recorder.render();
    let copies: f64 = rendered
        .lines()
        .find(|line| line.starts_with("weir_bisect_copies_total"))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse().ok())
        .expect("bisect counter exported");
    let bound = 3.0 * (10_000f64).log2();
    println!(
        "COPY attempts while isolating 3 bad rows in 10,000: {copies} (3·log2(n) = {bound:.1})"
    );
    assert!(
        copies <= 2.0 * bound,
        "{copies} COPY attempts is not O(k log n)"
    );
}
