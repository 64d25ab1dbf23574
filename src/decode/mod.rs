//! Decode, validate and route: one Kafka event becomes encoded rows in the
//! right partition range of each table it feeds, or dead letters that say
//! why not.
//!
//! Nothing here touches the database. Every failure is attributed to the
//! item it concerns, so the good items of a webhook body are written even
//! when one of its items is broken.
//!
//! [`mapping`] compiles the configured tables into column programs,
//! [`pointer`] walks JSON pointers, [`gathered`] holds the output.

mod gathered;
pub mod mapping;
pub mod pointer;

pub use gathered::Gathered;

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::{EmptyEvents, KafkaField, WeirField};
use crate::copy::segment::RowMeta;
use crate::copy::{self, Input, PgType};
use crate::decode::mapping::{CompiledColumn, CompiledSource, Mappings, Source};
use crate::event::{DeadLetter, Event, Stage};
use crate::json::Json;
use crate::store::partition::ManagedTable;

/// Turns events into rows. Shared by all lanes; holds no mutable state.
pub struct Decoder {
    pub mappings: Arc<Mappings>,
    /// Partition sets of the mapped tables, by table index.
    pub tables: Vec<Arc<ManagedTable>>,
    pub max_event_bytes: usize,
    /// Events above this are refused as `oversize` (their dead letter keeps
    /// only a prefix); between `max_event_bytes` and this, `event_too_large`.
    pub oversize_bytes: usize,
    pub empty_events: EmptyEvents,
}

/// What happened to one event, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub rows: usize,
    pub dead_letters: usize,
    pub skipped: bool,
}

/// The event an item comes from.
struct Origin<'a> {
    event: &'a Event,
    /// Index of the event in its batch.
    message: u32,
    /// Now, Unix microseconds (for the event-time window).
    now: i64,
}

/// One exploded item and where it came from.
struct Item<'v> {
    value: &'v Json<'v>,
    indices: pointer::Indices,
    kind: Option<&'v str>,
    ordinal: u32,
    path: usize,
}

impl Decoder {
    /// Decodes `event` (the `message`-th event of the batch) into `out`.
    /// `now` is the ingest time, Unix microseconds.
    pub fn decode(&self, event: &Event, message: u32, now: i64, out: &mut Gathered) -> Outcome {
        let dead_before = out.dead_letters.len();
        let rows_before = out.rows;
        let dead = |out: &mut Gathered, stage: Stage, code: &'static str, detail: String| {
            out.dead_letters.push(DeadLetter {
                message,
                table: None,
                item: None,
                item_path: None,
                stage,
                code: Cow::Borrowed(code),
                detail,
            });
        };

        if event.payload.len() > self.max_event_bytes {
            dead(
                out,
                Stage::Validate,
                if event.payload.len() > self.oversize_bytes {
                    "oversize"
                } else {
                    "event_too_large"
                },
                format!(
                    "event of {} bytes is over pipeline.max_event_bytes ({})",
                    event.payload.len(),
                    self.max_event_bytes
                ),
            );
            return self.outcome(out, rows_before, dead_before, false);
        }
        let Some(readers) = self.mappings.readers(&event.topic) else {
            dead(
                out,
                Stage::Route,
                "no_mapping",
                format!("no table reads topic `{}`", event.topic),
            );
            return self.outcome(out, rows_before, dead_before, false);
        };
        // One SIMD UTF-8 check of the whole payload, then a parse that need
        // not check each string again.
        let Ok(text) = simdutf8::basic::from_utf8(&event.payload) else {
            dead(
                out,
                Stage::Decode,
                "invalid_utf8",
                "payload is not valid UTF-8".into(),
            );
            return self.outcome(out, rows_before, dead_before, false);
        };
        // Strings borrow from the payload; see `crate::json`. Only what the
        // topic's mappings read is built; the verdict is the whole text's.
        let root = match Json::parse_wanted(text, &readers.wanted) {
            Ok(root) => root,
            Err(err) => {
                let text = err.to_string();
                let code = if text.contains("recursion limit") {
                    "nesting_too_deep"
                } else {
                    "invalid_json"
                };
                dead(out, Stage::Decode, code, text);
                return self.outcome(out, rows_before, dead_before, false);
            }
        };

        let mut items_seen = 0usize;
        for &source_index in &readers.sources {
            let source = &self.mappings.sources[source_index];
            for item in explode(source, &root) {
                items_seen += 1;
                let origin = Origin {
                    event,
                    message,
                    now,
                };
                self.row(source, &root, &item, &origin, out);
            }
        }
        let mut skipped = false;
        if items_seen == 0 {
            match self.empty_events {
                EmptyEvents::DeadLetter => dead(
                    out,
                    Stage::Route,
                    "no_rows",
                    "the event matched no explode path of any table reading its topic".into(),
                ),
                EmptyEvents::Skip => skipped = true,
            }
        }
        self.outcome(out, rows_before, dead_before, skipped)
    }

    fn outcome(
        &self,
        out: &Gathered,
        rows_before: usize,
        dead_before: usize,
        skipped: bool,
    ) -> Outcome {
        Outcome {
            rows: out.rows - rows_before,
            dead_letters: out.dead_letters.len() - dead_before,
            skipped,
        }
    }

    /// Encodes one item as one row, or records why it cannot be.
    fn row(
        &self,
        source: &CompiledSource,
        root: &Json<'_>,
        item: &Item<'_>,
        origin: &Origin<'_>,
        out: &mut Gathered,
    ) {
        let &Origin {
            event,
            message,
            now,
        } = origin;
        let table = &self.mappings.tables[source.table];
        let fail = |out: &mut Gathered, stage: Stage, code: Cow<'static, str>, detail: String| {
            let item_path = source
                .explode
                .get(item.path)
                .map(|explode| explode.path.concrete(&item.indices));
            out.dead_letters.push(DeadLetter {
                message,
                table: Some(Arc::from(table.name())),
                item: Some(item.ordinal),
                item_path,
                stage,
                code,
                detail,
            });
        };
        let context = Context {
            root,
            item,
            event,
            now,
        };

        // The time column first: it decides the partition.
        let time_column = &source.columns[source.time_column];
        let time = match context.input(time_column) {
            None => {
                return fail(
                    out,
                    Stage::Validate,
                    Cow::Borrowed("missing_required"),
                    format!("time column `{}` has no value", time_column.name),
                );
            }
            Some(input) => match copy::to_unix_micros(input, time_column.unit) {
                Ok(time) => time,
                Err(err) => {
                    return fail(
                        out,
                        Stage::Validate,
                        Cow::Borrowed(err.code()),
                        format!("time column `{}`: {err}", time_column.name),
                    );
                }
            },
        };
        // Accepted window: never a partition in 1970 or 2999.
        if time < now - table.max_age_micros || time > now + table.max_future_micros {
            return fail(
                out,
                Stage::Route,
                Cow::Borrowed("event_time_out_of_window"),
                format!(
                    "event time {} is outside the accepted window of `{}`",
                    format_micros(time),
                    table.name()
                ),
            );
        }
        let (lo, hi) = self.tables[source.table]
            .partitions
            .load()
            .route(table.granularity, time);

        let segment = out.segment(source.index, source.table, lo, hi);
        let start = segment.begin_row();
        copy::begin_row(&mut segment.buf, source.columns.len() as u16);
        for (index, column) in source.columns.iter().enumerate() {
            // The time column's value was read and checked above: written
            // from it, not read and converted again (a timestamp column, so
            // the same bytes).
            let input = if index == source.time_column {
                Some(Input::UnixMicros(time))
            } else {
                context.input(column)
            };
            let result = match input {
                None if column.required => Err(None),
                None => {
                    copy::write_null(&mut segment.buf);
                    Ok(())
                }
                Some(input) => copy::write_field(&mut segment.buf, &column.ty, input, column.unit)
                    .map_err(Some),
            };
            if let Err(err) = result {
                segment.end_row(start, false);
                let (code, detail) = match err {
                    None => (
                        Cow::Borrowed("missing_required"),
                        format!("required column `{}` has no value", column.name),
                    ),
                    Some(err) => (
                        Cow::Borrowed(err.code()),
                        format!("column `{}`: {err}", column.name),
                    ),
                };
                return fail(out, Stage::Validate, code, detail);
            }
        }
        segment.end_row(start, true);
        segment.rows.push(RowMeta {
            start: start as u32,
            time,
            message,
            item: item.ordinal,
        });
        out.rows += 1;
    }
}

/// Everything a column source can read from.
struct Context<'a> {
    root: &'a Json<'a>,
    item: &'a Item<'a>,
    event: &'a Event,
    now: i64,
}

impl<'a> Context<'a> {
    /// The column's value, or `None` when absent or null.
    fn input(&self, column: &'a CompiledColumn) -> Option<Input<'a>> {
        let json = |value: Option<&'a Json<'a>>| match value {
            None | Some(Json::Null) => None,
            Some(value) => Some(Input::Json(value)),
        };
        match &column.source {
            Source::Item(pointers) => pointers.iter().find_map(|p| json(p.get(self.item.value))),
            Source::Event(pointers) => pointers
                .iter()
                .find_map(|p| json(p.get_bound(self.root, &self.item.indices))),
            Source::Const(value) => json(Some(value)),
            Source::Header(name) => self.event.header(name).map(Input::Bytes),
            Source::Kafka(field) => match field {
                KafkaField::Timestamp => self.event.timestamp_ms.map(|ms| {
                    if column.ty == PgType::Int8 {
                        Input::Int(ms)
                    } else {
                        Input::UnixMicros(ms.saturating_mul(1000))
                    }
                }),
                KafkaField::Key => self.event.key.as_deref().map(Input::Bytes),
                KafkaField::Topic => Some(Input::Str(&self.event.topic)),
                KafkaField::Partition => Some(Input::Int(self.event.partition as i64)),
                KafkaField::Offset => Some(Input::Int(self.event.offset)),
            },
            Source::Weir(field) => match field {
                WeirField::IngestTime => Some(Input::UnixMicros(self.now)),
                WeirField::ItemKind => self.item.kind.map(Input::Str),
                WeirField::ItemIndex => Some(Input::Int(self.item.ordinal as i64)),
            },
        }
    }
}

/// The items of `root` for `source`, in a stable order (explode paths in
/// configuration order, each in document order). Without explode paths the
/// event itself is the one item.
fn explode<'v>(source: &'v CompiledSource, root: &'v Json<'v>) -> Vec<Item<'v>> {
    if source.explode.is_empty() {
        return vec![Item {
            value: root,
            indices: pointer::Indices::new(),
            kind: None,
            ordinal: 0,
            path: usize::MAX,
        }];
    }
    let mut items = Vec::new();
    for (path_index, path) in source.explode.iter().enumerate() {
        let kind = path.kind.as_deref();
        path.path.for_each_match(root, &mut |value, indices| {
            let ordinal = items.len() as u32;
            items.push(Item {
                value,
                indices: pointer::Indices::from_slice(indices),
                kind,
                ordinal,
                path: path_index,
            });
        });
    }
    items
}

/// The item of `root` with `ordinal` for `source` (for replaying one item).
pub fn item_value<'v>(
    source: &'v CompiledSource,
    root: &'v Json<'v>,
    ordinal: u32,
) -> Option<&'v Json<'v>> {
    explode(source, root)
        .into_iter()
        .find(|item| item.ordinal == ordinal)
        .map(|item| item.value)
}

fn format_micros(micros: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros)
        .map(|at| at.to_rfc3339())
        .unwrap_or_else(|| format!("{micros}us"))
}

/// A decoder and events without a database, for the tests of this module
/// and of the batcher.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::Decoder;
    use crate::config::{Config, EmptyEvents, Granularity};
    use crate::copy::PgType;
    use crate::event::Event;
    use crate::store::catalog::{ColumnInfo, TableInfo};
    use crate::store::partition::{ManagedTable, PartitionSet};

    /// A decoder for a webhook-like table: explode messages, item time in
    /// seconds, a header tenant.
    pub(crate) fn decoder() -> Decoder {
        let text = r#"
            [[tables]]
            name = "events"
            time_column = "created_at"
            granularity = "month"
            max_age_days = 30
            max_future_skew_secs = 3600
            [[tables.sources]]
            topics = ["t"]
            explode = [{ path = "/entry/*/messages/*", kind = "message" }]
            [tables.sources.columns]
            id         = { item = "/id" }
            tenant     = { header = "tenant" }
            envelope   = { event = "/entry/*/phone" }
            kind       = { weir = "item_kind" }
            created_at = { item = "/timestamp", time_unit = "s" }
        "#;
        let config = Config::from_toml(text, &[]).unwrap();
        let column = |name: &str, ty: PgType, not_null: bool| ColumnInfo {
            name: name.into(),
            ty: Ok(ty),
            not_null,
            has_default: false,
            generated: false,
        };
        let info = TableInfo {
            oid: 1,
            schema: "public".into(),
            name: "events".into(),
            columns: vec![
                column("id", PgType::Text, true),
                column("tenant", PgType::Uuid, true),
                column("envelope", PgType::Text, false),
                column("kind", PgType::Text, false),
                column("created_at", PgType::Timestamptz, true),
            ],
            range_key: Some("created_at".into()),
            partitioning: "range",
            unique_keys: Vec::new(),
        };
        let mappings = crate::decode::mapping::compile(&config.tables, vec![info]).unwrap();
        let table = ManagedTable::new(
            1,
            "public".into(),
            "events".into(),
            Granularity::Month,
            PgType::Timestamptz,
            &Default::default(),
            PartitionSet::default(),
        );
        Decoder {
            mappings: Arc::new(mappings),
            tables: vec![Arc::new(table)],
            max_event_bytes: 10_000,
            oversize_bytes: 50_000,
            empty_events: EmptyEvents::DeadLetter,
        }
    }

    pub(crate) fn event(payload: &[u8], tenant: Option<&str>) -> Event {
        Event {
            topic: Arc::from("t"),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1),
            key: None,
            headers: crate::event::Headers::from_pairs(
                tenant.map(|t| ("tenant", Some(t.as_bytes()))),
            ),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    pub(crate) const TENANT: &str = "6f1f7a7e-4b7a-4a39-9a61-5d3b9f0e2c11";
    pub(crate) const NOW: i64 = 1_763_800_000_000_000; // 2025-11-22T08:26:40Z

    pub(crate) fn body(timestamps: &[serde_json::Value]) -> Vec<u8> {
        let messages: Vec<serde_json::Value> = timestamps
            .iter()
            .enumerate()
            .map(|(i, ts)| serde_json::json!({"id": format!("m{i}"), "timestamp": ts}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"entry": [{"phone": "p1", "messages": messages}]}))
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn outcome_of(timestamp: serde_json::Value) -> (usize, Vec<(Stage, String)>) {
        let mut out = Gathered::default();
        decoder().decode(&event(&body(&[timestamp]), Some(TENANT)), 0, NOW, &mut out);
        (
            out.rows,
            out.dead_letters
                .iter()
                .map(|d| (d.stage, d.code.to_string()))
                .collect(),
        )
    }

    #[test]
    fn event_times_outside_the_window_are_dead_letters_never_partitions() {
        let window = (Stage::Route, "event_time_out_of_window".to_string());
        let now_secs = NOW / 1_000_000;
        assert_eq!(
            outcome_of(serde_json::json!(now_secs.to_string())),
            (1, vec![])
        );
        assert_eq!(
            outcome_of(serde_json::json!(0)),
            (0, vec![window.clone()]),
            "1970"
        );
        assert_eq!(
            outcome_of(serde_json::json!(-86400)),
            (0, vec![window.clone()]),
            "negative"
        );
        assert_eq!(
            outcome_of(serde_json::json!("253402300799")),
            (0, vec![window.clone()]),
            "9999-12-31"
        );
        assert_eq!(
            outcome_of(serde_json::json!(now_secs - 31 * 86_400)),
            (0, vec![window.clone()]),
            "older than max_age"
        );
        assert_eq!(
            outcome_of(serde_json::json!(now_secs + 7200)),
            (0, vec![window]),
            "beyond the skew"
        );
        assert_eq!(
            outcome_of(serde_json::json!("99999999999999")),
            (0, vec![(Stage::Validate, "out_of_range".into())]),
            "past year 9999"
        );
        assert_eq!(
            outcome_of(serde_json::json!("noon-ish")),
            (0, vec![(Stage::Validate, "invalid_value".into())]),
            "unparsable"
        );
        assert_eq!(
            outcome_of(serde_json::json!(null)),
            (0, vec![(Stage::Validate, "missing_required".into())]),
            "missing"
        );
        assert_eq!(
            outcome_of(serde_json::json!(now_secs as f64 + 0.5)),
            (1, vec![]),
            "fractional seconds"
        );
    }

    #[test]
    fn good_items_of_a_body_are_written_next_to_a_bad_one() {
        let now_secs = NOW / 1_000_000;
        let mut out = Gathered::default();
        let payload = body(&[
            serde_json::json!(now_secs),
            serde_json::json!("bad"),
            serde_json::json!(now_secs - 60),
        ]);
        let outcome = decoder().decode(&event(&payload, Some(TENANT)), 3, NOW, &mut out);
        assert_eq!(
            outcome,
            Outcome {
                rows: 2,
                dead_letters: 1,
                skipped: false
            }
        );
        let letter = &out.dead_letters[0];
        assert_eq!(letter.item, Some(1));
        assert_eq!(letter.item_path.as_deref(), Some("/entry/0/messages/1"));
        assert_eq!(letter.message, 3);
        assert_eq!(out.segments.len(), 1, "both rows go to the same month");
        assert_eq!(
            out.segments[0]
                .rows
                .iter()
                .map(|r| r.item)
                .collect::<Vec<_>>(),
            vec![0, 2]
        );
    }

    #[test]
    fn decode_failures_are_classified() {
        let codes = |payload: &[u8], tenant: Option<&str>| {
            let mut out = Gathered::default();
            decoder().decode(&event(payload, tenant), 0, NOW, &mut out);
            out.dead_letters
                .iter()
                .map(|d| format!("{}/{}", d.stage.as_str(), d.code))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            codes(b"{\"entry\": [", Some(TENANT)),
            vec!["decode/invalid_json"]
        );
        assert_eq!(
            codes(b"{\"a\": \"\xff\"}", Some(TENANT)),
            vec!["decode/invalid_utf8"]
        );
        assert_eq!(
            codes(br#"{"a": "\ud800"}"#, Some(TENANT)),
            vec!["decode/invalid_json"],
            "lone surrogate"
        );
        let deep = "[".repeat(2_000) + &"]".repeat(2_000);
        assert_eq!(
            codes(deep.as_bytes(), Some(TENANT)),
            vec!["decode/nesting_too_deep"]
        );
        assert_eq!(
            codes(&vec![b' '; 10_001], Some(TENANT)),
            vec!["validate/event_too_large"]
        );
        assert_eq!(
            codes(&vec![b' '; 50_001], Some(TENANT)),
            vec!["validate/oversize"]
        );
        assert_eq!(
            codes(br#"{"entry": []}"#, Some(TENANT)),
            vec!["route/no_rows"]
        );
        let now_secs = NOW / 1_000_000;
        assert_eq!(
            codes(&body(&[serde_json::json!(now_secs)]), None),
            vec!["validate/missing_required"]
        );
        assert_eq!(
            codes(&body(&[serde_json::json!(now_secs)]), Some("acme")),
            vec!["validate/invalid_value"]
        );
    }
}
