//! Binary COPY round trips, against a real PostgreSQL, for every column type
//! weir writes: values encoded by `weir::copy` are COPY'd in and read back
//! as PostgreSQL's own text output. Column types are resolved by
//! `weir::store::catalog`, as in production (domains, enums, arrays included).

mod common;

use bytes::BytesMut;
use serde_json::{Value, json};
use weir::config::TimeUnit;
use weir::copy::{self, Input};

/// One input and the text PostgreSQL must give back (`None`: NULL).
struct Case {
    input: Value,
    expected: Option<&'static str>,
}

fn case(input: Value, expected: &'static str) -> Case {
    Case {
        input,
        expected: Some(expected),
    }
}

/// Creates `t_<sql_type> (id int4, v <sql_type>)`, with the column's type
/// resolved by weir's catalog, and COPYs `values` into it as weir encodes
/// them (row `id` is the index, `None` is NULL). Returns the table's name.
async fn copy_values(
    db: &common::TestDb,
    sql_type: &str,
    values: &[Option<weir::json::Json<'_>>],
) -> String {
    let table = format!(
        "t_{}",
        sql_type.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    db.client
        .batch_execute(&format!("CREATE TABLE {table} (id int4, v {sql_type})"))
        .await
        .unwrap_or_else(|err| panic!("create table for {sql_type}: {err}"));
    let info = weir::store::catalog::load_table(&db.client, &table, &db.schema)
        .await
        .expect("catalog");
    let ty = info.columns[1]
        .ty
        .clone()
        .unwrap_or_else(|name| panic!("{sql_type} should be supported, got {name}"));

    let mut buf = BytesMut::new();
    copy::write_header(&mut buf);
    for (id, value) in values.iter().enumerate() {
        copy::begin_row(&mut buf, 2);
        copy::write_field(
            &mut buf,
            &copy::PgType::Int4,
            Input::Int(id as i64),
            TimeUnit::Seconds,
        )
        .expect("id");
        match value {
            None => copy::write_null(&mut buf),
            Some(value) => copy::write_field(&mut buf, &ty, Input::Json(value), TimeUnit::Seconds)
                .unwrap_or_else(|err| panic!("{sql_type}: encoding {value}: {err}")),
        }
    }
    buf.extend_from_slice(copy::COPY_TRAILER);
    let sink = db
        .client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} (id, v) FROM STDIN (FORMAT binary)"))
        .await
        .expect("copy statement");
    futures::pin_mut!(sink);
    futures::SinkExt::send(&mut sink, buf.freeze())
        .await
        .expect("copy data");
    let rows = sink
        .as_mut()
        .finish()
        .await
        .unwrap_or_else(|err| panic!("{sql_type}: PostgreSQL refused the COPY: {err}"));
    assert_eq!(rows as usize, values.len());
    table
}

async fn round_trip(db: &common::TestDb, sql_type: &str, cases: Vec<Case>) {
    let values: Vec<_> = cases
        .iter()
        .map(|case| (!case.input.is_null()).then(|| weir::json::Json::from(case.input.clone())))
        .collect();
    let table = copy_values(db, sql_type, &values).await;
    let back = db
        .client
        .query(&format!("SELECT v::text FROM {table} ORDER BY id"), &[])
        .await
        .expect("read back");
    for (case, row) in cases.iter().zip(back) {
        let text: Option<String> = row.get(0);
        assert_eq!(
            text.as_deref(),
            case.expected,
            "{sql_type}: {} should read back as {:?}",
            case.input,
            case.expected
        );
    }
}

#[tokio::test]
async fn every_supported_type_round_trips_through_binary_copy() {
    let db = common::TestDb::new("types").await;
    db.client
        .batch_execute(
            "CREATE TYPE delivery AS ENUM ('sent', 'delivered', 'read', 'failed');
             CREATE DOMAIN positive_int AS int4 CHECK (VALUE > 0);",
        )
        .await
        .expect("custom types");
    let null = Case {
        input: Value::Null,
        expected: None,
    };

    round_trip(
        &db,
        "boolean",
        vec![
            case(json!(true), "true"),
            case(json!("false"), "false"),
            null,
        ],
    )
    .await;
    round_trip(
        &db,
        "smallint",
        vec![
            case(json!(32767), "32767"),
            case(json!(-32768), "-32768"),
            case(json!("12"), "12"),
        ],
    )
    .await;
    round_trip(
        &db,
        "integer",
        vec![
            case(json!(2147483647), "2147483647"),
            case(json!(-1), "-1"),
            case(json!(7.0), "7"),
        ],
    )
    .await;
    round_trip(
        &db,
        "bigint",
        vec![
            case(json!(9223372036854775807i64), "9223372036854775807"),
            case(json!(-9223372036854775808i64), "-9223372036854775808"),
            case(json!("131050"), "131050"),
        ],
    )
    .await;
    round_trip(
        &db,
        "real",
        vec![
            case(json!(1.5), "1.5"),
            case(json!(-0.25), "-0.25"),
            case(json!("3"), "3"),
        ],
    )
    .await;
    round_trip(
        &db,
        "double precision",
        vec![
            case(json!(0.1), "0.1"),
            case(json!(-1e300), "-1e+300"),
            case(json!(42), "42"),
        ],
    )
    .await;
    round_trip(
        &db,
        "numeric",
        vec![
            case(json!("12345.678"), "12345.678"),
            case(json!("-0.0001"), "-0.0001"),
            case(json!("0"), "0"),
            case(json!("1e-3"), "0.001"),
            case(json!("10000"), "10000"),
            case(json!("0.00001234"), "0.00001234"),
            case(json!("99999999999999999999.5"), "99999999999999999999.5"),
            case(
                json!("-123456789012345678901234567890"),
                "-123456789012345678901234567890",
            ),
            case(json!(19.99), "19.99"),
            case(json!(7), "7"),
        ],
    )
    .await;
    round_trip(
        &db,
        "text",
        vec![
            case(json!("olá 👍 mundo"), "olá 👍 mundo"),
            case(json!(""), ""),
            case(json!(131050), "131050"),
        ],
    )
    .await;
    round_trip(
        &db,
        "varchar(10)",
        vec![
            case(json!("0123456789"), "0123456789"),
            case(json!("São"), "São"),
        ],
    )
    .await;
    round_trip(
        &db,
        "char(5)",
        vec![case(json!("ab"), "ab"), case(json!("abcde"), "abcde")],
    )
    .await;
    round_trip(
        &db,
        "delivery",
        vec![case(json!("read"), "read"), case(json!("failed"), "failed")],
    )
    .await;
    round_trip(&db, "positive_int", vec![case(json!(5), "5")]).await;
    round_trip(
        &db,
        "uuid",
        vec![
            case(
                json!("6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11"),
                "6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11",
            ),
            case(
                json!("6F1F7A7E4B7A4A399A615D3B9F0E2C11"),
                "6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11",
            ),
        ],
    )
    .await;
    round_trip(
        &db,
        "json",
        vec![
            case(
                json!({"b": 1, "a": [1, "x", null]}),
                r#"{"a":[1,"x",null],"b":1}"#,
            ),
            case(json!(3), "3"),
        ],
    )
    .await;
    round_trip(
        &db,
        "jsonb",
        vec![
            case(
                json!({"b": 1, "a": [1, "olá", null], "n": 1.5}),
                r#"{"a": [1, "olá", null], "b": 1, "n": 1.5}"#,
            ),
            case(json!("text"), r#""text""#),
            case(json!([]), "[]"),
        ],
    )
    .await;
    round_trip(
        &db,
        "timestamptz",
        vec![
            case(json!(1700000000), "2023-11-14 22:13:20+00"),
            case(
                json!("2023-11-14T22:13:20.123456Z"),
                "2023-11-14 22:13:20.123456+00",
            ),
            case(json!("1999-12-31T23:59:59Z"), "1999-12-31 23:59:59+00"),
            case(json!("2026-03-01T01:30:00-03:00"), "2026-03-01 04:30:00+00"),
            case(json!("9999-12-31T23:59:59Z"), "9999-12-31 23:59:59+00"),
        ],
    )
    .await;
    round_trip(
        &db,
        "timestamp",
        vec![
            case(json!("2023-11-14T22:13:20"), "2023-11-14 22:13:20"),
            case(json!(0), "1970-01-01 00:00:00"),
        ],
    )
    .await;
    round_trip(
        &db,
        "date",
        vec![
            case(json!("2024-02-29"), "2024-02-29"),
            case(json!("1999-12-31"), "1999-12-31"),
            case(json!(86400), "1970-01-02"),
        ],
    )
    .await;
    round_trip(
        &db,
        "bytea",
        vec![case(json!("abc"), "\\x616263"), case(json!(""), "\\x")],
    )
    .await;
    round_trip(
        &db,
        "text[]",
        vec![
            case(json!(["a", null, "b c"]), r#"{a,NULL,"b c"}"#),
            case(json!([]), "{}"),
        ],
    )
    .await;
    round_trip(&db, "bigint[]", vec![case(json!([1, 2, 3]), "{1,2,3}")]).await;
    round_trip(
        &db,
        "uuid[]",
        vec![case(
            json!(["6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11"]),
            "{6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11}",
        )],
    )
    .await;
    round_trip(
        &db,
        "delivery[]",
        vec![case(json!(["sent", "read"]), "{sent,read}")],
    )
    .await;
}

#[tokio::test]
async fn values_that_do_not_fit_are_refused_before_postgresql_sees_them() {
    let db = common::TestDb::new("refuse").await;
    db.client
        .batch_execute("CREATE TYPE delivery AS ENUM ('sent', 'read'); CREATE TABLE r (a varchar(3), b delivery, c int2, d uuid, e jsonb, f text)")
        .await
        .expect("table");
    let info = weir::store::catalog::load_table(&db.client, "r", &db.schema)
        .await
        .expect("catalog");
    let ty = |i: usize| info.columns[i].ty.clone().expect("supported");
    let refuse = |i: usize, value: Value| {
        let mut buf = BytesMut::new();
        let value = weir::json::Json::from(value);
        copy::write_field(&mut buf, &ty(i), Input::Json(&value), TimeUnit::Seconds)
            .expect_err("should be refused")
            .code()
    };
    assert_eq!(refuse(0, json!("abcd")), "value_too_long");
    assert_eq!(refuse(1, json!("delivered")), "invalid_value");
    assert_eq!(refuse(2, json!(40000)), "out_of_range");
    assert_eq!(refuse(3, json!("not-a-uuid")), "invalid_value");
    assert_eq!(refuse(4, json!({"a": "\u{0}"})), "nul_character");
    assert_eq!(refuse(5, json!("a\u{0}b")), "nul_character");
    assert_eq!(refuse(5, json!({"an": "object"})), "wrong_type");
}

/// An object or array read from an event goes to `jsonb` as the event's own
/// text: what PostgreSQL stores is exactly what it makes of that text.
#[tokio::test]
async fn jsonb_from_event_text_is_postgresqls_reading_of_that_text() {
    let db = common::TestDb::new("rawjsonb").await;
    let texts = [
        r#"{ "a" : 1.50, "b" : [ 1e3, 2E-300, -0, 123456789012345678901234567890 ] }"#,
        r#"{"esc": "\u00e9 \ud83d\ude00 \" \\ \/ \t", "not_nul": "\\u0000"}"#,
        r#"{"k": 1, "k": 2, "nested": {"deep": [[{}], []]}}"#,
        "[\n\t\"x\" ,\r\n null, true, false, -9223372036854775808\n]",
    ];
    let values: Vec<_> = texts
        .iter()
        .map(|text| {
            let value = weir::json::Json::parse(text).expect("JSON");
            assert_eq!(value.source_text(), Some(text.trim()), "kept as written");
            Some(value)
        })
        .collect();
    let table = copy_values(&db, "jsonb", &values).await;
    for (id, text) in texts.iter().enumerate() {
        let row = db
            .client
            .query_one(
                &format!("SELECT v::text, $2::text::jsonb::text FROM {table} WHERE id = $1"),
                &[&(id as i32), text],
            )
            .await
            .expect("read back");
        let (stored, expected): (String, String) = (row.get(0), row.get(1));
        assert_eq!(stored, expected, "{text}");
    }
}

/// weir builds only the parts of an event its mappings read (see
/// `weir::json::Wanted`). On the shipped mapping, for generated traffic
/// (malformed events included) and for bodies made to reach the edges (a
/// U+0000 or a long exponent where no column reads it, escaped and
/// repeated keys, nesting past weir's reader), every row is byte for byte
/// the row of a decoder that builds whole events, and every dead letter
/// the same.
#[tokio::test]
async fn building_only_what_the_mapping_reads_changes_no_row_and_no_dead_letter() {
    use std::sync::Arc;

    use bytes::Bytes;
    use weir::decode::Gathered;
    use weir_loadtest::webhooks::Shape;

    let db = common::TestDb::new("wanted").await;
    let topics = common::Topics::new("wanted");
    let config = common::config(&db.schema, &topics, "wanted", "");
    db.migrate(&config).await;
    let mut client = weir::store::db::connect(&common::stack().database_url, &config.postgres, "t")
        .await
        .expect("connect");
    let wanted = weir::pipeline::prepare(&config, &mut client)
        .await
        .expect("prepare");
    let mut everything = weir::pipeline::prepare(&config, &mut client)
        .await
        .expect("prepare");
    Arc::get_mut(&mut everything.mappings)
        .expect("not shared yet")
        .want_everything();
    let (wanted, everything) = (wanted.decoder(&config), everything.decoder(&config));

    let now_secs = 1_763_800_000;
    let event =
        |topic: String, headers: Vec<(String, String)>, payload: Vec<u8>| weir::event::Event {
            topic: Arc::from(topic.as_str()),
            partition: 0,
            offset: 0,
            timestamp_ms: Some(now_secs * 1000),
            key: None,
            headers: weir::event::Headers::from_pairs(
                headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.as_bytes()))),
            ),
            payload: Bytes::from(payload),
        };
    let sent = common::generate(
        Shape {
            seed: 77,
            malformed_share: 0.3,
            now_secs,
            ..Shape::default()
        },
        3_000,
    );
    let mut events: Vec<weir::event::Event> = sent
        .events
        .iter()
        .map(|produced| {
            let headers = produced
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            event(
                topics.name(produced.topic),
                headers,
                produced.payload.clone(),
            )
        })
        .collect();
    let deep = format!("{}1{}", "[".repeat(110), "]".repeat(110));
    let items = [
        r#"{"from":"W","id":"m1","timestamp":"1763800000","type":"text","text":{"body":"hi"}}"#.to_string(),
        r#"{"from":"W","id":"m2","timestamp":"1763800000","type":"text","context":{"x":"a\u0000"}}"#.to_string(),
        r#"{"from":"W","id":"m3","timestamp":"1763800000","type":"text","extra":[1.0e-1000, 2]}"#.to_string(),
        r#"{"from":"W","i\u0064":"m4","timestamp":"1763800000","ty\"pe":"x","type":"image","image":{"caption":"c"}}"#.to_string(),
        r#"{"from":"W","id":"m5","id":"m5b","timestamp":"1763800000","type":"text"}"#.to_string(),
        format!(r#"{{"from":"W","id":"m6","timestamp":"1763800000","type":"text","deep":{deep}}}"#),
        r#"{"from":"W","id":"m7","timestamp":"1763800000","type":"text","text":{"body":"a\u0000b"}}"#.to_string(),
        r#"{"from":"W","id":"m8","timestamp":"1763800000","type":"text","text":{"body":1e5000}}"#.to_string(),
    ];
    let statuses = [
        r#"{"id":"s1","status":"failed","timestamp":"1763800000","recipient_id":"R","errors":[{"code":131026},{"code":2}],"pricing":{"billable":false}}"#,
        r#"{"id":"s2","status":"sent","timestamp":"1763800000","recipient_id":"R","errors":[null,{"code":5}],"conversation":{"id":"c","origin":{"type":"x\u0000"}}}"#,
    ];
    let body = |messages: &str, statuses: &str| {
        format!(
            r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"1","phone_number_id":"P1"}},"contacts":[{{"profile":{{"name":"A"}},"wa_id":"W"}}],"messages":[{messages}],"statuses":[{statuses}]}}}}]}}]}}"#
        )
    };
    let company = vec![(
        "company_id".to_string(),
        "6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11".to_string(),
    )];
    for item in &items {
        events.push(event(
            topics.webhooks(),
            company.clone(),
            body(item, "").into(),
        ));
    }
    for status in statuses {
        events.push(event(
            topics.webhooks(),
            company.clone(),
            body("", status).into(),
        ));
    }
    let all = body(&items.join(","), &statuses.join(","));
    events.push(event(topics.webhooks(), company.clone(), all.into()));

    let decode = |decoder: &weir::decode::Decoder| {
        let mut out = Gathered::default();
        for (message, event) in events.iter().enumerate() {
            decoder.decode(event, message as u32, now_secs * 1_000_000, &mut out);
        }
        out
    };
    let (ours, reference) = (decode(&wanted), decode(&everything));
    assert_eq!(ours.rows, reference.rows);
    assert_eq!(ours.segments.len(), reference.segments.len());
    for (ours, reference) in ours.segments.iter().zip(&reference.segments) {
        let at = (ours.source, ours.table, ours.lo, ours.hi);
        assert_eq!(
            at,
            (
                reference.source,
                reference.table,
                reference.lo,
                reference.hi
            )
        );
        assert_eq!(ours.to_vec(), reference.to_vec(), "rows of segment {at:?}");
        let metas = |rows: &[weir::copy::segment::RowMeta]| -> Vec<_> {
            rows.iter()
                .map(|r| (r.start, r.time, r.message, r.item))
                .collect()
        };
        assert_eq!(metas(&ours.rows), metas(&reference.rows));
    }
    let letters = |out: &Gathered| format!("{:?}", out.dead_letters);
    assert_eq!(letters(&ours), letters(&reference));
    // The edges were reached: rows and dead letters of both kinds.
    let codes: Vec<&str> = ours.dead_letters.iter().map(|d| d.code.as_ref()).collect();
    for code in ["nul_character", "invalid_json"] {
        assert!(codes.contains(&code), "no `{code}` dead letter");
    }
    assert!(ours.rows > 3_000, "{} rows", ours.rows);
}
