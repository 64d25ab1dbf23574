//! Decode + mapping on arbitrary bytes, with the shipped configuration: no
//! panic, every event accounted for (rows, dead letters or counted skip),
//! and every row a well-formed binary COPY tuple of the mapping's width.
//! Any JSON text weir reads is written back (for json and jsonb columns)
//! byte for byte as serde_json writes it, and refused for jsonb exactly
//! when it holds U+0000. weir's JSON reader agrees with serde_json on every
//! input (verdict, values, error text), and any source text it keeps for a
//! jsonb column reads back as the same value and holds no U+0000. Building
//! only what the mapping reads gives the same rows and dead letters as
//! building whole events.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir::decode::Gathered;
use weir::json::Json;
use weir::event::{Event, Headers};
use weir::store::catalog::{ColumnInfo, TableInfo};
use weir::config::{Config, EmptyEvents};
use weir::decode::Decoder;
use weir::copy::PgType;
use weir::store::partition::{ManagedTable, PartitionSet};

/// The shipped tables, as the catalog describes them (config/schema/*.sql).
fn catalog(name: &str) -> TableInfo {
    use PgType::*;
    let columns: &[(&str, PgType, bool)] = match name {
        "wa_events" => &[
            ("event_id", Text, true), ("kind", Text, true), ("event_type", Text, true),
            ("company_id", Uuid, true), ("team_id", Uuid, false), ("phone_number_id", Text, true),
            ("from_number", Text, true), ("conversation_id", Text, false), ("error_code", Int4, false),
            ("payload", Jsonb, true), ("created_at", Timestamptz, true), ("received_at", Timestamptz, true),
        ],
        "messages" => &[
            ("message_id", Text, true), ("company_id", Uuid, true), ("team_id", Uuid, false),
            ("conversation_id", Uuid, false), ("direction", Text, true), ("phone_number_id", Text, true),
            ("contact_wa_id", Text, true), ("contact_name", Text, false), ("message_type", Text, true),
            ("body", Text, false), ("payload", Jsonb, true), ("created_at", Timestamptz, true),
            ("received_at", Timestamptz, true),
        ],
        "webhook_logs" => &[
            ("received_at", Timestamptz, true), ("company_id", Uuid, true), ("request_id", Text, false),
            ("object", Text, false), ("waba_id", Text, false), ("source_topic", Text, true),
            ("source_partition", Int4, true), ("source_offset", Int8, true), ("payload", Jsonb, true),
        ],
        other => panic!("unknown table {other}"),
    };
    TableInfo {
        oid: 1,
        schema: "public".into(),
        name: name.into(),
        columns: columns
            .iter()
            .map(|(n, ty, not_null)| ColumnInfo {
                name: n.to_string(),
                ty: Ok(ty.clone()),
                not_null: *not_null,
                has_default: false,
                generated: false,
            })
            .collect(),
        range_key: Some(if name == "webhook_logs" { "received_at" } else { "created_at" }.into()),
        partitioning: "range",
        // The unique indexes the shipped dedupe keys need (config/schema/*.sql).
        unique_keys: match name {
            "wa_events" => vec![vec!["event_id".into(), "event_type".into(), "created_at".into()]],
            "messages" => vec![vec!["message_id".into(), "created_at".into()]],
            _ => Vec::new(),
        },
    }
}

/// Every array or object that keeps its source text (what a jsonb column is
/// given as it is) holds no U+0000, and its text reads back as itself.
fn check_source_texts(value: &Json<'_>) {
    if let Some(text) = value.source_text() {
        assert!(!value.contains_nul(), "source text kept for a value holding U+0000");
        assert_eq!(&Json::parse_with_serde(text).expect("source text is JSON"), value);
    }
    match value {
        Json::Array(items) => items.iter().for_each(check_source_texts),
        Json::Object(members) => members.iter().for_each(|(_, v)| check_source_texts(v)),
        _ => {}
    }
}

/// The shipped mapping's decoder; with `everything`, one that builds whole
/// events instead of only what the mapping reads (the reference).
fn decoder(everything: bool) -> &'static Decoder {
    static DECODERS: [OnceLock<Decoder>; 2] = [OnceLock::new(), OnceLock::new()];
    DECODERS[everything as usize].get_or_init(|| {
        let config = Config::from_toml(include_str!("../../../config/weir.toml"), &[]).expect("shipped config");
        let infos = config.tables.iter().map(|t| catalog(&t.name)).collect();
        let mut mappings = weir::decode::mapping::compile(&config.tables, infos).expect("shipped mapping");
        if everything {
            mappings.want_everything();
        }
        let tables = mappings
            .tables
            .iter()
            .map(|t| {
                Arc::new(ManagedTable::new(
                    1,
                    "public".into(),
                    t.info.name.clone(),
                    t.granularity,
                    PgType::Timestamptz,
                    &Default::default(),
                    PartitionSet::default(),
                ))
            })
            .collect();
        Decoder {
            mappings: Arc::new(mappings),
            tables,
            max_event_bytes: 1 << 20,
            oversize_bytes: 2 << 20,
            empty_events: EmptyEvents::DeadLetter,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let topic = if selector & 1 == 0 { "whatsapp.webhooks" } else { "chat.messages" };
    let header = if selector & 2 == 0 {
        Some(Bytes::from_static(b"6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11"))
    } else {
        rest.get(..8).map(Bytes::copy_from_slice)
    };
    let event = Event {
        topic: Arc::from(topic),
        partition: 0,
        offset: 0,
        timestamp_ms: Some(1_763_800_000_000),
        key: None,
        headers: Headers::from_pairs([("company_id", header.as_deref())]),
        payload: Bytes::copy_from_slice(rest),
    };
    if let Ok(text) = std::str::from_utf8(rest) {
        // weir's reader (with its fallback) and serde_json alone: the same
        // verdict, the same values, the same error text.
        let ours = Json::parse(text);
        let theirs = Json::parse_with_serde(text);
        match (&ours, &theirs) {
            (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "values read"),
            (Err(ours), Err(theirs)) => assert_eq!(ours.to_string(), theirs.to_string()),
            _ => panic!("verdicts differ: weir {ours:?}, serde_json {theirs:?}"),
        }
        if let Ok(doc) = ours {
            let mut compact = Vec::new();
            doc.write_compact(&mut compact, false).expect("NUL is refused only when asked");
            assert_eq!(compact, serde_json::to_vec(&doc).unwrap(), "compact text");
            assert_eq!(doc.write_compact(&mut Vec::new(), true).is_err(), doc.contains_nul());
            check_source_texts(&doc);
        }
    }
    let wanted = decoder(false);
    let mut out = Gathered::default();
    let outcome = wanted.decode(&event, 0, 1_763_800_000_000_000, &mut out);
    // Building only what the mapping reads changes no row and no dead letter.
    let mut reference = Gathered::default();
    decoder(true).decode(&event, 0, 1_763_800_000_000_000, &mut reference);
    assert_eq!(format!("{:?}", out.dead_letters), format!("{:?}", reference.dead_letters));
    assert_eq!(out.segments.len(), reference.segments.len());
    for (ours, theirs) in out.segments.iter().zip(&reference.segments) {
        assert_eq!((ours.source, ours.lo, ours.hi), (theirs.source, theirs.lo, theirs.hi));
        assert_eq!(ours.to_vec(), theirs.to_vec(), "rows");
    }
    assert!(outcome.rows + outcome.dead_letters > 0 || outcome.skipped, "every event is accounted for");
    assert_eq!(outcome.rows, out.segments.iter().map(|s| s.rows.len()).sum::<usize>());
    for segment in out.segments {
        let width = wanted.mappings.sources[segment.source].columns.len();
        let sealed = segment.seal();
        for row in 0..sealed.rows.len() {
            let bytes = sealed.row(row);
            assert_eq!(i16::from_be_bytes([bytes[0], bytes[1]]) as usize, width);
            let mut at = 2;
            for _ in 0..width {
                let len = i32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
                at += 4;
                assert!(len >= -1, "field length");
                if len > 0 {
                    at += len as usize;
                }
            }
            assert_eq!(at, bytes.len(), "a row is exactly its fields");
        }
    }
});
