//! Failures against the real services: a corpus of bad input where every
//! event's fate is asserted, PostgreSQL connections killed mid-batch, a
//! column dropped mid-run and restored, and dead letters replayed after a
//! fix.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Fixture, Running, TestDb, Topics};
use serde_json::{Value, json};

const TENANT: &str = "6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11";

/// Where the parts of one input must end up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Fate {
    /// Rows per table.
    rows: BTreeMap<&'static str, i64>,
    /// Dead letters as "table stage/code" (table `-` when none).
    dead: Vec<String>,
}

fn fate(rows: &[(&'static str, i64)], dead: &[&str]) -> Fate {
    let mut dead: Vec<String> = dead.iter().map(|d| d.to_string()).collect();
    dead.sort();
    Fate {
        rows: rows.iter().copied().collect(),
        dead,
    }
}

/// A webhook body with messages built from `items` (each may override fields).
fn webhook(items: Vec<Value>) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "waba-1", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": "pn-1"},
            "contacts": [{"profile": {"name": "Ana Silva"}, "wa_id": "5511999990000"}],
            "messages": items
        }}]}]
    })
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn message(id: &str, timestamp: Value) -> Value {
    json!({"from": "5511999990000", "id": id, "timestamp": timestamp, "type": "text", "text": {"body": "oi"}})
}

fn chat(id: &str) -> Value {
    json!({
        "id": id, "company_id": TENANT, "direction": "outbound", "phone_number_id": "pn-1",
        "to": "5511999990000", "type": "text", "text": "Olá!", "sent_at": chrono::Utc::now().to_rfc3339()
    })
}

struct Input {
    name: &'static str,
    topic: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    payload: Option<Vec<u8>>,
    /// Ids of the items this input may write (to count its rows).
    ids: Vec<String>,
    fate: Fate,
}

fn tenant() -> Vec<(&'static str, Vec<u8>)> {
    vec![("company_id", TENANT.as_bytes().to_vec())]
}

fn json_bytes(value: &Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(value).expect("json"))
}

/// The bad-input corpus: at least 25 distinct classes, each with the exact
/// table, stage and code every part of it must end up in.
fn corpus() -> Vec<Input> {
    let t = now();
    let good_logs = ("webhook_logs", 1);
    let mut inputs = Vec::new();
    let mut add =
        |name: &'static str, topic: &'static str, headers, payload, ids: Vec<&str>, fate| {
            inputs.push(Input {
                name,
                topic,
                headers,
                payload,
                ids: ids.into_iter().map(String::from).collect(),
                fate,
            })
        };
    let wh = "whatsapp.webhooks";
    let ch = "chat.messages";
    let id = |n: &str| format!("wamid.{n}");

    add(
        "truncated json",
        wh,
        tenant(),
        Some(br#"{"object": "whatsapp_business_account", "entry": [{"#.to_vec()),
        vec![],
        fate(&[], &["- decode/invalid_json"]),
    );
    add(
        "invalid utf-8",
        wh,
        tenant(),
        Some(b"{\"object\": \"wh\xff\xfeatsapp\"}".to_vec()),
        vec![],
        fate(&[], &["- decode/invalid_utf8"]),
    );
    add(
        "empty payload",
        wh,
        tenant(),
        Some(Vec::new()),
        vec![],
        fate(&[], &["- decode/invalid_json"]),
    );
    add(
        "tombstone (no payload)",
        wh,
        tenant(),
        None,
        vec![],
        fate(&[], &["- decode/invalid_json"]),
    );
    add(
        "nesting 10,000 deep",
        wh,
        tenant(),
        Some(("[".repeat(10_000) + &"]".repeat(10_000)).into_bytes()),
        vec![],
        fate(&[], &["- decode/nesting_too_deep"]),
    );
    add(
        "10 MB body",
        wh,
        tenant(),
        Some(format!("{{\"object\": \"{}\"}}", "x".repeat(10 << 20)).into_bytes()),
        vec![],
        fate(&[], &["- validate/oversize"]),
    );
    add(
        "lone surrogate",
        wh,
        tenant(),
        Some(br#"{"object": "whatsapp_business_account", "entry": [{"id": "\ud800"}]}"#.to_vec()),
        vec![],
        fate(&[], &["- decode/invalid_json"]),
    );
    let nul_id = id("nul");
    add(
        "NUL in text and jsonb",
        wh,
        tenant(),
        json_bytes(&webhook(vec![
            json!({"from": "5511999990000", "id": nul_id, "timestamp": t.to_string(), "type": "text", "text": {"body": "a\u{0}b"}}),
        ])),
        vec![&nul_id],
        fate(
            &[],
            &[
                "wa_events validate/nul_character",
                "messages validate/nul_character",
                "webhook_logs validate/nul_character",
            ],
        ),
    );
    add(
        "duplicate keys (last wins, as in jsonb)",
        wh,
        tenant(),
        Some(
            format!(
                r#"{{"object": "whatsapp_business_account", "entry": [{{"id": "w", "changes": [{{"field": "messages", "value": {{"metadata": {{"phone_number_id": "pn-1"}}, "messages": [{{"from": "5511", "id": "wamid.dup-first", "id": "wamid.dup-last", "timestamp": "{t}", "type": "text", "text": {{"body": "x"}}}}]}}}}]}}]}}"#
            )
            .into_bytes(),
        ),
        vec!["wamid.dup-last"],
        fate(&[("wa_events", 1), ("messages", 1), good_logs], &[]),
    );
    let ts_int = id("ts-int");
    add(
        "timestamp as number",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_int, json!(t))])),
        vec![&ts_int],
        fate(&[("wa_events", 1), ("messages", 1), good_logs], &[]),
    );
    let ts_str = id("ts-str");
    add(
        "timestamp as string",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_str, json!(t.to_string()))])),
        vec![&ts_str],
        fate(&[("wa_events", 1), ("messages", 1), good_logs], &[]),
    );
    let ts_float = id("ts-float");
    add(
        "timestamp as float",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_float, json!(t as f64 + 0.25))])),
        vec![&ts_float],
        fate(&[("wa_events", 1), ("messages", 1), good_logs], &[]),
    );
    let window = &[
        "wa_events route/event_time_out_of_window",
        "messages route/event_time_out_of_window",
    ];
    let ts_neg = id("ts-neg");
    add(
        "timestamp negative",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_neg, json!(-3600))])),
        vec![&ts_neg],
        fate(&[good_logs], window),
    );
    let ts_zero = id("ts-zero");
    add(
        "timestamp zero",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_zero, json!(0))])),
        vec![&ts_zero],
        fate(&[good_logs], window),
    );
    let ts_9999 = id("ts-9999");
    add(
        "timestamp in 9999",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_9999, json!("253402300799"))])),
        vec![&ts_9999],
        fate(&[good_logs], window),
    );
    let ts_bad = id("ts-bad");
    add(
        "timestamp unparsable",
        wh,
        tenant(),
        json_bytes(&webhook(vec![message(&ts_bad, json!("last tuesday"))])),
        vec![&ts_bad],
        fate(
            &[good_logs],
            &[
                "wa_events validate/invalid_value",
                "messages validate/invalid_value",
            ],
        ),
    );
    let wrong = id("wrong-type");
    add(
        "wrong type (object where text goes)",
        wh,
        tenant(),
        json_bytes(&webhook(vec![
            json!({"from": {"phone": "5511"}, "id": wrong, "timestamp": t.to_string(), "type": "text"}),
        ])),
        vec![&wrong],
        fate(
            &[good_logs],
            &[
                "wa_events validate/wrong_type",
                "messages validate/wrong_type",
            ],
        ),
    );
    let status = |id: &str, code: Value| {
        json!({
            "object": "whatsapp_business_account",
            "entry": [{"id": "waba-1", "changes": [{"field": "messages", "value": {
                "metadata": {"phone_number_id": "pn-1"},
                "statuses": [{"id": id, "status": "failed", "timestamp": t.to_string(), "recipient_id": "5511",
                              "errors": [{"code": code, "title": "x"}]}]
            }}]}]
        })
    };
    let code_text = id("code-text");
    add(
        "integer column given text",
        wh,
        tenant(),
        json_bytes(&status(&code_text, json!("abc"))),
        vec![&code_text],
        fate(&[good_logs], &["wa_events validate/invalid_value"]),
    );
    let code_big = id("code-big");
    add(
        "integer out of range",
        wh,
        tenant(),
        json_bytes(&status(&code_big, json!(99_999_999_999i64))),
        vec![&code_big],
        fate(&[good_logs], &["wa_events validate/out_of_range"]),
    );
    let no_tenant = id("no-tenant");
    add(
        "missing tenant header",
        wh,
        vec![],
        json_bytes(&webhook(vec![message(&no_tenant, json!(t))])),
        vec![&no_tenant],
        fate(
            &[],
            &[
                "wa_events validate/missing_required",
                "messages validate/missing_required",
                "webhook_logs validate/missing_required",
            ],
        ),
    );
    let bad_tenant = id("bad-tenant");
    add(
        "tenant header not a uuid",
        wh,
        vec![("company_id", b"acme-corp".to_vec())],
        json_bytes(&webhook(vec![message(&bad_tenant, json!(t))])),
        vec![&bad_tenant],
        fate(
            &[],
            &[
                "wa_events validate/invalid_value",
                "messages validate/invalid_value",
                "webhook_logs validate/invalid_value",
            ],
        ),
    );
    let binary_tenant = id("binary-tenant");
    add(
        "tenant header not UTF-8",
        wh,
        vec![("company_id", vec![0xff, 0x00, 0xfe])],
        json_bytes(&webhook(vec![message(&binary_tenant, json!(t))])),
        vec![&binary_tenant],
        fate(
            &[],
            &[
                "wa_events validate/invalid_value",
                "messages validate/invalid_value",
                "webhook_logs validate/invalid_value",
            ],
        ),
    );
    let (mixed_a, mixed_c) = (id("mixed-a"), id("mixed-c"));
    add(
        "broken item next to good ones",
        wh,
        tenant(),
        json_bytes(&webhook(vec![
            message(&mixed_a, json!(t)),
            json!({"from": "5511", "timestamp": t.to_string(), "type": "text"}),
            message(&mixed_c, json!(t)),
        ])),
        vec![&mixed_a, &mixed_c],
        fate(
            &[("wa_events", 2), ("messages", 2), good_logs],
            &[
                "wa_events validate/missing_required",
                "messages validate/missing_required",
            ],
        ),
    );
    add(
        "no messages nor statuses",
        wh,
        tenant(),
        json_bytes(
            &json!({"object": "whatsapp_business_account", "entry": [{"id": "w", "changes": [{"field": "account_update", "value": {}}]}]}),
        ),
        vec![],
        fate(&[good_logs], &[]),
    );
    add(
        "top-level array",
        wh,
        tenant(),
        Some(b"[1, 2, 3]".to_vec()),
        vec![],
        fate(&[good_logs], &[]),
    );
    let mut bad_uuid = chat("chat-bad-uuid");
    bad_uuid["company_id"] = json!("not-a-uuid");
    add(
        "chat: company_id not a uuid",
        ch,
        vec![],
        json_bytes(&bad_uuid),
        vec!["chat-bad-uuid"],
        fate(&[], &["messages validate/invalid_value"]),
    );
    let mut no_time = chat("chat-no-time");
    no_time.as_object_mut().expect("object").remove("sent_at");
    add(
        "chat: time missing",
        ch,
        vec![],
        json_bytes(&no_time),
        vec!["chat-no-time"],
        fate(&[], &["messages validate/missing_required"]),
    );
    add(
        "chat: JSON null",
        ch,
        vec![],
        Some(b"null".to_vec()),
        vec![],
        fate(&[], &["messages validate/missing_required"]),
    );
    let mut number_text = chat("chat-number-text");
    number_text["direction"] = json!(5);
    add(
        "chat: number where text goes (kept as text)",
        ch,
        vec![],
        json_bytes(&number_text),
        vec!["chat-number-text"],
        fate(&[("messages", 1)], &[]),
    );
    let mut future = chat("chat-future");
    future["sent_at"] = json!("2999-01-01T00:00:00Z");
    add(
        "chat: far future",
        ch,
        vec![],
        json_bytes(&future),
        vec!["chat-future"],
        fate(&[], &["messages route/event_time_out_of_window"]),
    );
    add(
        "chat: good",
        ch,
        vec![],
        json_bytes(&chat("chat-good")),
        vec!["chat-good"],
        fate(&[("messages", 1)], &[]),
    );
    inputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_lands_where_it_belongs_and_good_items_are_written() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("corpus", 1).await;
    let s = db.schema.clone();
    let corpus = corpus();
    assert!(corpus.len() >= 25, "{} classes", corpus.len());

    let producer = common::producer();
    let mut offsets = Vec::new();
    for input in &corpus {
        let headers: Vec<(&str, &[u8])> = input
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_slice()))
            .collect();
        let offset = common::send(
            &producer,
            &topics.name(input.topic),
            input.name.as_bytes(),
            &headers,
            input.payload.as_deref(),
        )
        .await;
        offsets.push(offset);
    }
    let target = corpus
        .iter()
        .filter(|i| i.topic == "whatsapp.webhooks")
        .count()
        + corpus.iter().filter(|i| i.topic == "chat.messages").count();

    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, target as i64, Duration::from_secs(120)).await;
    running.stop().await;

    let mut mismatches = Vec::new();
    for (input, offset) in corpus.iter().zip(&offsets) {
        let topic = topics.name(input.topic);
        let mut seen = Fate::default();
        let ids: Vec<String> = input.ids.clone();
        for (table, key) in [("wa_events", "event_id"), ("messages", "message_id")] {
            let rows = db
                .client
                .query_one(
                    &format!("SELECT count(*) FROM \"{s}\".{table} WHERE {key} = ANY($1)"),
                    &[&ids],
                )
                .await
                .expect("count rows")
                .get::<_, i64>(0);
            if rows > 0 {
                seen.rows.insert(table, rows);
            }
        }
        if input.topic == "whatsapp.webhooks" {
            let logs = db
                .client
                .query_one(
                    &format!("SELECT count(*) FROM \"{s}\".webhook_logs WHERE source_topic = $1 AND source_offset = $2"),
                    &[&topic, &offset],
                )
                .await
                .expect("count logs")
                .get::<_, i64>(0);
            if logs > 0 {
                seen.rows.insert("webhook_logs", logs);
            }
        }
        let dead = db
            .client
            .query(
                &format!(
                    "SELECT COALESCE(target_table, '-') || ' ' || stage || '/' || code FROM \"{s}\".weir_dead_letters
                      WHERE topic = $1 AND kafka_offset = $2 ORDER BY 1"
                ),
                &[&topic, &offset],
            )
            .await
            .expect("dead letters");
        seen.dead = dead.iter().map(|row| row.get(0)).collect();
        println!(
            "{:<42} rows {:?} dead {:?}",
            input.name, seen.rows, seen.dead
        );
        if seen != input.fate {
            mismatches.push(format!(
                "{}: expected {:?}, got {:?}",
                input.name, input.fate, seen
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    // The 10 MB body is over the hard cap (dead_letters.max_payload_bytes,
    // 8 MiB): its dead letter keeps a prefix, the full length and a hash.
    let (size, encoding, truncated): (i32, String, bool) = {
        let row = db
            .client
            .query_one(
                &format!("SELECT payload_size, payload_encoding, payload_truncated FROM \"{s}\".weir_dead_letters WHERE code = 'oversize'"),
                &[],
            )
            .await
            .expect("large dead letter");
        (row.get(0), row.get(1), row.get(2))
    };
    assert!(size > 10 << 20);
    assert_eq!(encoding, "gzip");
    assert!(truncated, "only a prefix is kept");
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters WHERE code = 'oversize' AND payload_sha256 IS NOT NULL")).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postgres_sessions_cause_retries_never_dead_letters() {
    let db = TestDb::new("pgkill").await;
    let topics = Topics::new("pgkill");
    topics.create(2).await;
    let group = common::unique("g");
    let app = common::unique("weirpgkill");
    let mut config = common::config(&db.schema, &topics, &group, "");
    config.postgres.application_name = app.clone();
    config.pipeline.batch_max_rows = 500;
    config.pipeline.retry_max_ms = 500;
    db.migrate(&config).await;
    let mut sent = common::generate(
        common::webhooks::Shape {
            seed: 31,
            ..Default::default()
        },
        12_000,
    );
    let target = common::produce(&topics, &mut sent).await;

    let mut running = Running::start(config);
    let killer = common::connect(&common::stack().database_url).await;
    let mut killed = 0i64;
    let mut rounds = 0;
    loop {
        running.assert_running().await;
        let stored = common::stored_offsets(&db).await;
        if stored >= target {
            break;
        }
        // Kill every session of this weir, often mid-COPY or mid-commit,
        // until half the stream is in (or for 40 rounds, so a slow machine,
        // where weir cannot commit between two kills, still finishes); then
        // let it finish.
        if stored * 2 >= target || rounds >= 40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        killed += killer
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE $1 || '-%'",
                &[&app],
            )
            .await
            .expect("terminate")
            .get::<_, i64>(0);
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    running.stop().await;
    println!("terminated {killed} sessions");
    assert!(killed >= 5, "sessions were killed mid-stream ({killed})");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM \"{}\".weir_dead_letters",
            db.schema
        ))
        .await,
        0
    );
    common::assert_exactly_once(&db, &sent, &topics).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_column_stops_the_writer_until_it_is_restored() {
    let db = TestDb::new("column").await;
    let topics = Topics::new("column");
    topics.create(1).await;
    let group = common::unique("g");
    let mut config = common::config(&db.schema, &topics, &group, "");
    config.pipeline.retry_max_ms = 1000;
    config.postgres.writers = 1;
    db.migrate(&config).await;
    let s = db.schema.clone();
    let first = common::generate(
        common::webhooks::Shape {
            seed: 41,
            ..Default::default()
        },
        500,
    );
    let second = common::generate(
        common::webhooks::Shape {
            seed: 42,
            ..Default::default()
        },
        500,
    );
    let mut first = first;
    let mut target = common::produce(&topics, &mut first).await;

    let running = Running::start(config);
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    common::eventually("ready", Duration::from_secs(30), || async {
        running.get("/readyz").await.0 == 200
    })
    .await;

    db.client
        .batch_execute(&format!("ALTER TABLE \"{s}\".messages DROP COLUMN body"))
        .await
        .expect("drop column");
    let mut second = second;
    target = common::produce(&topics, &mut second).await;
    common::eventually(
        "not ready after the column is gone",
        Duration::from_secs(30),
        || async {
            let (status, body) = running.get("/readyz").await;
            status == 503 && body.contains("body")
        },
    )
    .await;
    let (_, reason) = running.get("/readyz").await;
    println!("readyz while stopped: {}", reason.trim());
    // Stopped means stopped: the stored offsets hold still (sampled twice,
    // seconds apart), short of the second round.
    let stuck = common::offsets_hold_still(&db).await;
    assert!(
        stuck < target,
        "offsets do not advance past the failing batch"
    );
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        0,
        "nothing dead-lettered"
    );

    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".messages ADD COLUMN body text"
        ))
        .await
        .expect("restore column");
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    common::eventually("ready again", Duration::from_secs(30), || async {
        running.get("/readyz").await.0 == 200
    })
    .await;
    running.stop().await;
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        0
    );
    let all = first.join(second);
    common::assert_exactly_once(&db, &all, &topics).await;
}

/// `weir dlq replay` as the command runs it: its own sessions (one for the
/// replay transaction, one for partition DDL) and the tables as prepared
/// at start-up.
struct Replayer {
    config: weir::config::Config,
    client: tokio_postgres::Client,
    ddl: tokio_postgres::Client,
    prepared: weir::pipeline::Prepared,
}

impl Replayer {
    async fn connect(config: &weir::config::Config) -> Replayer {
        let url = &common::stack().database_url;
        let mut client = weir::store::db::connect(url, &config.postgres, "test")
            .await
            .expect("connect");
        let ddl = weir::store::db::connect(url, &config.postgres, "test-ddl")
            .await
            .expect("connect");
        let prepared = weir::pipeline::prepare(config, &mut client)
            .await
            .expect("prepare");
        Replayer {
            config: config.clone(),
            client,
            ddl,
            prepared,
        }
    }

    /// Replays every dead letter not replayed yet (`dry_run`: rolled back).
    async fn replay(&mut self, dry_run: bool) -> weir::dlq::ReplayReport {
        weir::dlq::replay(
            &mut self.client,
            &mut self.ddl,
            &self.config,
            &self.prepared,
            &weir::dlq::Filter::default(),
            10_000,
            dry_run,
        )
        .await
        .expect("replay")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_fixing_a_constraint_writes_rows_exactly_once() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("replay", 1).await;
    let s = db.schema.clone();
    // A constraint the data breaks: outbound texts mentioning a code.
    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".messages ADD CONSTRAINT no_codes CHECK (body NOT LIKE '%código%')"
        ))
        .await
        .expect("constraint");
    let mut sent = common::generate(
        common::webhooks::Shape {
            seed: 51,
            chat_share: 0.5,
            ..Default::default()
        },
        1500,
    );
    let target = common::produce(&topics, &mut sent).await;
    let running = Running::start(config.clone());
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    running.stop().await;

    let refused = db
        .count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters WHERE stage = 'write' AND code = '23514'"))
        .await;
    assert!(
        refused > 0,
        "rows refused by the constraint became dead letters"
    );
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        refused,
        "nothing else failed"
    );

    // Replay before the fix: every one fails again, attempts go up.
    let mut replayer = Replayer::connect(&config).await;
    let report = replayer.replay(false).await;
    assert_eq!(
        (report.replayed, report.failed_again),
        (0, refused as usize)
    );
    assert_eq!(
        db.count(&format!(
            "SELECT min(attempts)::int8 FROM \"{s}\".weir_dead_letters"
        ))
        .await,
        2
    );

    // Fix, dry run, replay, replay again.
    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".messages DROP CONSTRAINT no_codes"
        ))
        .await
        .expect("fix");
    let dry = replayer.replay(true).await;
    assert_eq!(dry.replayed, refused as usize);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM \"{s}\".weir_dead_letters WHERE replayed_at IS NOT NULL"
        ))
        .await,
        0
    );
    let report = replayer.replay(false).await;
    assert_eq!(report.replayed, refused as usize);
    assert_eq!(report.rows_written, refused as usize);
    let again = replayer.replay(false).await;
    assert_eq!(
        again.selected, 0,
        "replayed dead letters are not replayed twice"
    );
    common::assert_exactly_once(&db, &sent, &topics).await;
}

/// Replay goes through the live write path. Rows refused by a constraint
/// became dead letters; the constraint was fixed, and the webhook gateway
/// delivered the same events again (as Meta retries), so weir wrote those
/// rows live. A replay of the old dead letters then finds each row already
/// in `messages`, whose dedupe key skips it, as the live path did: every
/// dead letter counts as replayed, nothing fails, nothing is written twice.
/// Before: replay COPYed straight into the partition, and every one failed
/// again with 23505.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_skips_rows_a_dedupe_key_finds_already_written() {
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::new("replaydup", 1).await;
    let s = db.schema.clone();
    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".messages ADD CONSTRAINT no_codes CHECK (body NOT LIKE '%código%')"
        ))
        .await
        .expect("constraint");
    let shape = common::webhooks::Shape {
        seed: 52,
        chat_share: 0.5,
        ..Default::default()
    };
    let mut first = common::generate(shape.clone(), 800);
    let target = common::produce(&topics, &mut first).await;
    let running = Running::start(config.clone());
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    let refused = db
        .count(&format!(
            "SELECT count(*) FROM \"{s}\".weir_dead_letters WHERE stage = 'write' AND code = '23514'"
        ))
        .await;
    assert!(
        refused > 0,
        "rows refused by the constraint became dead letters"
    );

    // The fix, then the same events again: weir writes the refused rows now.
    db.client
        .batch_execute(&format!(
            "ALTER TABLE \"{s}\".messages DROP CONSTRAINT no_codes"
        ))
        .await
        .expect("fix");
    let mut again = common::generate(shape, 800);
    let target = common::produce(&topics, &mut again).await;
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    running.stop().await;
    let messages = db
        .count(&format!("SELECT count(*) FROM \"{s}\".messages"))
        .await;

    let mut replayer = Replayer::connect(&config).await;
    let report = replayer.replay(false).await;
    println!("{report:?}");
    assert_eq!(report.failed_again, 0, "no dead letter fails again");
    assert_eq!(report.replayed, refused as usize);
    assert_eq!(
        (report.rows_written, report.duplicates_skipped),
        (0, refused as usize),
        "every replayed row was already there, and was skipped"
    );
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".messages"))
            .await,
        messages,
        "nothing written twice"
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM \"{s}\".weir_dead_letters WHERE replayed_at IS NULL"
        ))
        .await,
        0
    );
}
