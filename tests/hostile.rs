//! Hostile identifiers and odd partition names.
//!
//! A table whose schema, name and columns hold quotes (' and "), spaces,
//! dots, unicode, SQL keywords and `"; DROP TABLE ...; --` injections is fed
//! through the real broker by a real pipeline, with a dedupe key (the
//! staging path: a temporary table, `INSERT ... ON CONFLICT (...)`), weir's
//! own tables (offsets, dead letters, retention journal) in the same hostile
//! schema, and event times at year and week boundaries, before 1970, on a
//! leap day, far in the past and far in the future. Every good row lands
//! exactly once in the partition named after its ISO week, the out-of-window
//! events are dead letters, and the sentinel table the injections name still
//! exists, untouched.
//!
//! Names the configuration cannot carry are refused at start with one
//! message naming the field: a Kafka topic outside `[a-zA-Z0-9._-]`, a
//! table name with two dots, an over-long column name, a NUL.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveTime, Utc};
use serde_json::json;

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Drops the test's schemas and tables, also on panic.
struct Cleanup {
    schemas: Vec<String>,
    tables: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let tables = self
            .tables
            .iter()
            .map(|t| format!("DROP TABLE IF EXISTS {t}"));
        let schemas = self
            .schemas
            .iter()
            .map(|s| format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(s)));
        common::clean_up_sql(tables.chain(schemas).collect());
    }
}

/// Monday 00:00 UTC of the ISO week holding `at`: the lower bound of its
/// weekly partition.
fn week_start(at: DateTime<Utc>) -> DateTime<Utc> {
    let day = at.date_naive() - chrono::Days::new(at.weekday().num_days_from_monday() as u64);
    day.and_time(NaiveTime::MIN).and_utc()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_quoted_and_odd_times_get_well_named_partitions() {
    let tag = format!("{:08x}", rand::random::<u32>());
    // In `public`, which weir's sessions have on their search_path: an
    // injection that escaped its quotes would find it by this bare name.
    // (No dot in it: a dot in a configured table name separates the schema.)
    let sentinel = format!("weir_sentinel_{tag}");
    let schema = format!("sch \"q\" 'a'.ü; DROP TABLE {sentinel}; --");
    let table = format!("ev\"en ts'; DROP TABLE {sentinel}; --");
    let id = "\"id\"".to_string();
    let time = "at. time".to_string();
    let note = "it's ünïcødé".to_string();
    let inject = format!("x\"); DROP TABLE {sentinel}; --");
    let keyword = "select".to_string();
    assert!(schema.len() <= 63 && table.len() + "_p20000101".len() <= 63);
    let _cleanup = Cleanup {
        schemas: vec![schema.clone()],
        tables: vec![format!("public.{sentinel}")],
    };

    let admin = common::connect(&common::stack().database_url).await;
    let (s, t) = (quote(&schema), quote(&table));
    admin
        .batch_execute(&format!(
            "CREATE TABLE public.{sentinel} (v int); INSERT INTO public.{sentinel} VALUES (42);
             CREATE SCHEMA {s};
             CREATE TABLE {s}.{t} (
                 {id} text NOT NULL,
                 {time} timestamptz NOT NULL,
                 {note} text,
                 {inject} text,
                 {keyword} integer
             ) PARTITION BY RANGE ({time});
             CREATE UNIQUE INDEX ON {s}.{t} ({id}, {time});",
            id = quote(&id),
            time = quote(&time),
            note = quote(&note),
            inject = quote(&inject),
            keyword = quote(&keyword),
        ))
        .await
        .expect("create the hostile table");

    let topic = common::unique("hostile");
    common::create_topics(std::slice::from_ref(&topic), 2).await;
    let group = common::unique("g");

    let mut columns = toml::Table::new();
    let item = |pointer: &str| {
        let mut source = toml::Table::new();
        source.insert("item".into(), pointer.into());
        toml::Value::Table(source)
    };
    columns.insert(id.clone(), item("/id"));
    columns.insert(time.clone(), item("/at"));
    columns.insert(note.clone(), item("/note"));
    columns.insert(inject.clone(), item("/inject"));
    columns.insert(keyword.clone(), item("/n"));
    let config_table = |topics: Vec<String>, table_name: &str| -> toml::Table {
        let base: toml::Table = toml::from_str(
            r#"
            [kafka]
            group_id = "placeholder"
            [kafka.properties]
            "fetch.wait.max.ms" = "10"
            "session.timeout.ms" = "6000"
            "heartbeat.interval.ms" = "500"
            [postgres]
            writers = 1
            [maintenance]
            enabled = false
            [[tables]]
            granularity = "week"
            premake = 0
            max_age_days = 50000
            [[tables.sources]]
            "#,
        )
        .expect("base config");
        base.into_iter()
            .map(|(key, mut value)| {
                match key.as_str() {
                    "kafka" => {
                        let kafka = value.as_table_mut().expect("kafka");
                        kafka.insert("brokers".into(), common::stack().brokers.clone().into());
                        kafka.insert("group_id".into(), group.clone().into());
                    }
                    "postgres" => {
                        value
                            .as_table_mut()
                            .expect("postgres")
                            .insert("schema".into(), schema.clone().into());
                    }
                    "tables" => {
                        let entry = value.as_array_mut().expect("tables")[0]
                            .as_table_mut()
                            .expect("table");
                        entry.insert("name".into(), table_name.into());
                        entry.insert("time_column".into(), time.clone().into());
                        entry.insert("dedupe_key".into(), vec![id.clone()].into());
                        let source = entry["sources"].as_array_mut().expect("sources")[0]
                            .as_table_mut()
                            .expect("source");
                        source.insert("topics".into(), topics.clone().into());
                        source.insert("columns".into(), toml::Value::Table(columns.clone()));
                    }
                    _ => {}
                }
                (key, value)
            })
            .collect()
    };
    let env = vec![(
        weir::config::DATABASE_URL_ENV.to_string(),
        common::stack().database_url.clone(),
    )];
    let load = |table: toml::Table| {
        weir::config::Config::from_toml(&toml::to_string(&table).expect("toml"), &env)
    };
    let config = load(config_table(vec![topic.clone()], &table)).expect("hostile names are valid");

    // Names the configuration cannot carry: one message naming the field.
    for (what, bad, field) in [
        (
            "a topic outside [a-zA-Z0-9._-]",
            config_table(vec![format!("to pic\"; DROP TABLE {sentinel}; --")], &table),
            "tables[0].sources[0].topics",
        ),
        (
            "a topic of unicode",
            config_table(vec!["événements".into()], &table),
            "tables[0].sources[0].topics",
        ),
        (
            "a table name with two dots",
            config_table(vec![topic.clone()], "a.b.c"),
            "tables[0].name",
        ),
        (
            "a table name with a NUL",
            config_table(vec![topic.clone()], "ev\0il"),
            "tables[0].name",
        ),
        (
            "a table name of 64 bytes",
            config_table(vec![topic.clone()], &"t".repeat(64)),
            "tables[0].name",
        ),
    ] {
        let err = load(bad).expect_err(what);
        assert_eq!(err.field, field, "{what}: {err}");
        println!("{what}: {err}");
    }
    let mut long_column = config_table(vec![topic.clone()], &table);
    long_column["tables"].as_array_mut().expect("tables")[0]["sources"]
        .as_array_mut()
        .expect("sources")[0]["columns"]
        .as_table_mut()
        .expect("columns")
        .insert("c".repeat(64), item("/c"));
    let err = load(long_column).expect_err("a column name of 64 bytes");
    assert_eq!(err.field, "tables[0].sources[0].columns", "{err}");
    assert!(err.message.contains("column name"), "{err}");

    // Events: year, week and epoch boundaries, a leap day, before 1970,
    // and two outside the window (dead letters).
    let now = Utc::now();
    let good_times = [
        "1900-01-01T00:00:00Z",
        "1969-12-31T23:59:59.999999Z",
        "1970-01-01T00:00:00Z",
        "1999-12-31T23:59:59Z",
        "2000-01-01T00:00:00Z",
        "2000-01-03T00:00:00Z",
        "2024-02-29T12:00:00Z",
        "2024-12-31T23:59:59.999999Z",
        "2025-01-01T00:00:00Z",
    ]
    .into_iter()
    .map(|text| text.to_string())
    .chain([now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)])
    .collect::<Vec<_>>();
    let dead_times = ["2999-01-01T00:00:00Z", "1700-01-01T00:00:00Z"];
    let producer = common::producer();
    let mut expected: BTreeMap<String, (DateTime<Utc>, String, String, i32)> = BTreeMap::new();
    let mut sent = 0;
    for (index, at) in good_times
        .iter()
        .map(String::as_str)
        .chain(dead_times)
        .enumerate()
    {
        let row_id = format!("id-{index}'\"; DROP TABLE {sentinel}; --");
        let note_value = format!("it's \"{index}\" ünï\\cødé\t;");
        let inject_value = format!("'); DROP TABLE {sentinel}; --{index}");
        let event = json!({
            "id": row_id,
            "at": at,
            "note": note_value,
            "inject": inject_value,
            "n": index as i64,
        });
        let payload = serde_json::to_vec(&event).expect("json");
        // The first event is delivered twice: the dedupe key skips it.
        let copies = if index == 0 { 2 } else { 1 };
        for _ in 0..copies {
            common::send(&producer, &topic, row_id.as_bytes(), &[], Some(&payload)).await;
            sent += 1;
        }
        if index < good_times.len() {
            let parsed = DateTime::parse_from_rfc3339(at)
                .expect("time")
                .with_timezone(&Utc);
            expected.insert(row_id, (parsed, note_value, inject_value, index as i32));
        }
    }

    let running = common::Running::start(config);
    let offsets = format!("{}.weir_offsets", quote(&schema));
    let dead = format!("{}.weir_dead_letters", quote(&schema));
    let started = std::time::Instant::now();
    loop {
        let committed: i64 = admin
            .query_one(
                &format!(
                    "SELECT COALESCE(sum(next_offset), 0)::int8 FROM {offsets} WHERE consumer_group = $1"
                ),
                &[&group],
            )
            .await
            .map(|row| row.get(0))
            .unwrap_or(0);
        if committed >= sent {
            break;
        }
        if started.elapsed() > Duration::from_secs(45) {
            let (status, body) = running.get("/readyz").await;
            println!("{committed} of {sent} messages committed in 45 s; /readyz {status}: {body}");
            // Stopping shows why a pipeline that ended early ended.
            running.stop().await;
            panic!("{committed} of {sent} messages committed in 45 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = running.get("/readyz").await;
    assert_eq!(status, 200, "ready: {body}");
    running.stop().await;

    // Every good row, exactly once, with its values intact.
    let rows = admin
        .query(
            &format!(
                "SELECT {id}, {time}, {note}, {inject}, {keyword}, tableoid::regclass::text
                   FROM {s}.{t}",
                id = quote(&id),
                time = quote(&time),
                note = quote(&note),
                inject = quote(&inject),
                keyword = quote(&keyword),
            ),
            &[],
        )
        .await
        .expect("read the hostile table");
    assert_eq!(rows.len(), expected.len(), "one row per good event");
    for row in &rows {
        let row_id: String = row.get(0);
        let (at, note_value, inject_value, n) = expected
            .get(&row_id)
            .unwrap_or_else(|| panic!("unexpected row {row_id}"));
        assert_eq!(row.get::<_, DateTime<Utc>>(1), *at, "{row_id}");
        assert_eq!(row.get::<_, String>(2), *note_value);
        assert_eq!(row.get::<_, String>(3), *inject_value);
        assert_eq!(row.get::<_, i32>(4), *n);
        // In the partition of its ISO week (a quoted identifier: the
        // parent's name has quotes).
        let leaf: String = row.get(5);
        let want = format!("{table}_p{}", week_start(*at).format("%Y%m%d"));
        assert!(
            leaf.ends_with(&quote(&want)),
            "{row_id} at {at} is in {leaf}, want {want}"
        );
    }

    // The partitions: exactly one per ISO week of the good events, named
    // from their Monday (1969-12-29 for the epoch: before 1970, and not
    // a partition "in 1970" for the far-past dead letter).
    let partitions: BTreeSet<String> = admin
        .query(
            &format!(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                  WHERE i.inhparent = '{}'::regclass",
                format!("{s}.{t}").replace('\'', "''")
            ),
            &[],
        )
        .await
        .expect("partitions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let weeks: BTreeSet<String> = expected
        .values()
        .map(|(at, ..)| format!("{table}_p{}", week_start(*at).format("%Y%m%d")))
        .collect();
    println!("partitions: {partitions:#?}");
    assert_eq!(partitions, weeks, "one partition per week of good events");
    assert!(partitions.contains(&format!("{table}_p19691229")));
    assert!(partitions.contains(&format!("{table}_p19000101")));

    // The out-of-window events are dead letters, in the hostile schema.
    let letters = admin
        .query(&format!("SELECT code, stage FROM {dead}"), &[])
        .await
        .expect("dead letters");
    assert_eq!(letters.len(), dead_times.len(), "the out-of-window events");
    for letter in letters {
        assert_eq!(letter.get::<_, String>(0), "event_time_out_of_window");
    }

    // The injections ran nowhere: the sentinel is there, untouched.
    let kept: Vec<i32> = admin
        .query(&format!("SELECT v FROM public.{sentinel}"), &[])
        .await
        .expect("the sentinel table still exists")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(kept, vec![42], "the sentinel is untouched");
}
