//! Table mappings compiled against the catalog: for every topic, which
//! tables it feeds, how an event is exploded into items, and for every
//! column where its value comes from and what type it must become.
//!
//! Compilation is where configuration meets the database: a column missing
//! from the table, a type weir cannot write, a `NOT NULL` column nobody
//! fills, an envelope pointer that does not line up with the explode path...
//! each is reported once, at start, naming the config field.

use std::sync::Arc;

use crate::config::{
    ColumnSource, ConfigError, Granularity, KafkaField, SourceConfig, TableConfig, TimeUnit,
    WeirField,
};
use crate::copy::{self, PgType};
use crate::decode::pointer::Pointer;
use crate::json::{Wanted, Whole};
use crate::store::catalog::{ColumnInfo, TableInfo};

/// Everything the decoder needs, shared read-only by all lanes.
#[derive(Debug)]
pub struct Mappings {
    pub tables: Vec<TableMapping>,
    pub sources: Vec<CompiledSource>,
    /// Topic -> the sources reading it.
    pub by_topic: foldhash::HashMap<String, Readers>,
}

/// The sources reading one topic.
#[derive(Debug, Default)]
pub struct Readers {
    /// Indices into `Mappings::sources`.
    pub sources: Vec<usize>,
    /// What they read of an event, together: all the parse builds.
    pub wanted: Wanted,
}

impl Mappings {
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.by_topic.keys().cloned().collect();
        topics.sort();
        topics
    }

    pub fn sources_for(&self, topic: &str) -> &[usize] {
        self.readers(topic).map_or(&[], |readers| &readers.sources)
    }

    /// The sources reading `topic`, if any.
    pub fn readers(&self, topic: &str) -> Option<&Readers> {
        self.by_topic.get(topic)
    }

    /// Makes every event be read whole, as if each column read all of it.
    /// The rows and dead letters are the same either way: this is the
    /// reference the tests hold [`Readers::wanted`] to.
    pub fn want_everything(&mut self) {
        for readers in self.by_topic.values_mut() {
            readers.wanted = Wanted::everything();
        }
    }
}

/// A target table.
#[derive(Debug)]
pub struct TableMapping {
    pub index: usize,
    pub config: TableConfig,
    pub info: TableInfo,
    pub granularity: Granularity,
    /// Accepted event-time window, relative to now.
    pub max_age_micros: i64,
    pub max_future_micros: i64,
    /// `ON CONFLICT (...)` columns when the table dedupes (the dedupe key
    /// plus the time column), quoted and joined.
    pub conflict_columns: Option<String>,
}

impl TableMapping {
    /// Name for logs, metric labels and dead letters (as configured).
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// One `[[tables.sources]]` entry.
#[derive(Debug)]
pub struct CompiledSource {
    pub index: usize,
    pub table: usize,
    pub explode: Vec<Explode>,
    /// In COPY order.
    pub columns: Vec<CompiledColumn>,
    /// Position of the time column in `columns`.
    pub time_column: usize,
    /// `("a", "b", ...)` for the COPY statement.
    pub column_list: String,
}

#[derive(Debug)]
pub struct Explode {
    pub path: Pointer,
    pub kind: Option<Arc<str>>,
}

#[derive(Debug)]
pub struct CompiledColumn {
    pub name: String,
    pub ty: PgType,
    pub source: Source,
    pub required: bool,
    pub unit: TimeUnit,
}

#[derive(Debug)]
pub enum Source {
    Item(Vec<Pointer>),
    Event(Vec<Pointer>),
    Kafka(KafkaField),
    Header(String),
    Weir(WeirField),
    Const(crate::json::Json<'static>),
}

impl CompiledSource {
    /// What this source reads of an event: its explode paths, and below
    /// them (or the event) what its columns read, whole. A `jsonb` column
    /// reads its value as text (see [`Whole::Text`]); any other, as a value.
    fn wanted(&self) -> Wanted {
        let mut root = Wanted::default();
        for explode in &self.explode {
            explode.path.wanted(&mut root);
        }
        for column in &self.columns {
            let how = if column.ty == PgType::Jsonb {
                Whole::Text
            } else {
                Whole::Value
            };
            // Item pointers start at each explode path's items (without
            // explode paths, the event is the one item); event pointers at
            // the event.
            let (pointers, from_items) = match &column.source {
                Source::Item(pointers) => (pointers, !self.explode.is_empty()),
                Source::Event(pointers) => (pointers, false),
                Source::Kafka(_) | Source::Header(_) | Source::Weir(_) | Source::Const(_) => {
                    continue;
                }
            };
            let read = |start: &mut Wanted| {
                for pointer in pointers {
                    pointer.wanted(start).read_whole(how);
                }
            };
            if from_items {
                for explode in &self.explode {
                    read(explode.path.wanted(&mut root));
                }
            } else {
                read(&mut root);
            }
        }
        root
    }
}

/// Compiles every table's sources against the catalog entries in `infos`
/// (same order as `tables`).
pub fn compile(tables: &[TableConfig], infos: Vec<TableInfo>) -> Result<Mappings, ConfigError> {
    let mut mappings = Mappings {
        tables: Vec::new(),
        sources: Vec::new(),
        by_topic: Default::default(),
    };
    for (table_index, (config, info)) in tables.iter().zip(infos).enumerate() {
        let at = format!("tables[{table_index}]");
        check_partitioning(&at, config, &info)?;
        let max_age_days = config
            .max_age_days
            .or(config.retention_days)
            .unwrap_or(3650) as i64;
        let conflict_columns = check_dedupe(&at, config, &info)?;
        for (source_index, source) in config.sources.iter().enumerate() {
            let at = format!("{at}.sources[{source_index}]");
            let compiled = compile_source(
                &at,
                mappings.sources.len(),
                table_index,
                config,
                &info,
                source,
            )?;
            let wanted = compiled.wanted();
            for topic in &source.topics {
                let readers = mappings.by_topic.entry(topic.clone()).or_default();
                readers.sources.push(compiled.index);
                readers.wanted.merge(&wanted);
            }
            mappings.sources.push(compiled);
        }
        mappings.tables.push(TableMapping {
            index: table_index,
            config: config.clone(),
            granularity: config.granularity,
            max_age_micros: max_age_days * 86_400_000_000,
            max_future_micros: config.max_future_skew_secs as i64 * 1_000_000,
            conflict_columns,
            info,
        });
    }
    // Every pointer is in: items wanted by index also get what `*` wants.
    for readers in mappings.by_topic.values_mut() {
        readers.wanted.settle();
    }
    Ok(mappings)
}

/// A dedupe key needs a unique index on exactly (key columns + time column),
/// which is what `ON CONFLICT` infers its arbiter from, and every source
/// must fill the key.
fn check_dedupe(
    at: &str,
    config: &TableConfig,
    info: &TableInfo,
) -> Result<Option<String>, ConfigError> {
    if config.dedupe_key.is_empty() {
        return Ok(None);
    }
    let field = format!("{at}.dedupe_key");
    let mut wanted: Vec<String> = config.dedupe_key.clone();
    if !wanted.contains(&config.time_column) {
        wanted.push(config.time_column.clone());
    }
    for column in &wanted {
        if info.column(column).is_none() {
            return Err(ConfigError::new(
                &field,
                format!("table `{}` has no column `{column}`", config.name),
            ));
        }
    }
    let mut sorted = wanted.clone();
    sorted.sort();
    let indexed = info.unique_keys.iter().any(|key| {
        let mut key = key.clone();
        key.sort();
        key == sorted
    });
    if !indexed {
        return Err(ConfigError::new(
            &field,
            format!(
                "needs a unique index on ({}) of `{}` (the time column is part of it: unique indexes of partitioned tables must include the partition key)",
                wanted.join(", "),
                config.name
            ),
        ));
    }
    for (index, source) in config.sources.iter().enumerate() {
        for column in &config.dedupe_key {
            if !source.columns.contains_key(column) {
                return Err(ConfigError::new(
                    format!("{at}.sources[{index}].columns"),
                    format!(
                        "dedupe key column `{column}` has no source: rows without it could not be deduplicated"
                    ),
                ));
            }
        }
    }
    Ok(Some(
        wanted
            .iter()
            .map(|c| crate::store::catalog::quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

fn check_partitioning(at: &str, config: &TableConfig, info: &TableInfo) -> Result<(), ConfigError> {
    let Some(time_column) = info.column(&config.time_column) else {
        return Err(ConfigError::new(
            format!("{at}.time_column"),
            format!(
                "table `{}` has no column `{}`",
                config.name, config.time_column
            ),
        ));
    };
    match &time_column.ty {
        Ok(PgType::Timestamptz) | Ok(PgType::Timestamp) => {}
        _ => {
            return Err(ConfigError::new(
                format!("{at}.time_column"),
                format!(
                    "column `{}` must be timestamptz (or timestamp) to partition by time",
                    config.time_column
                ),
            ));
        }
    }
    match &info.range_key {
        Some(key) if *key == config.time_column => Ok(()),
        Some(key) => Err(ConfigError::new(
            format!("{at}.time_column"),
            format!(
                "table `{}` is partitioned by range on `{key}`, not on `{}`",
                config.name, config.time_column
            ),
        )),
        None => Err(ConfigError::new(
            format!("{at}.name"),
            format!(
                "table `{}` must be PARTITION BY RANGE ({}) (it is partitioned: {})",
                config.name, config.time_column, info.partitioning
            ),
        )),
    }
}

fn compile_source(
    at: &str,
    index: usize,
    table_index: usize,
    table: &TableConfig,
    info: &TableInfo,
    source: &SourceConfig,
) -> Result<CompiledSource, ConfigError> {
    let mut explode = Vec::new();
    for (i, path) in source.explode.iter().enumerate() {
        let pointer = Pointer::parse(&path.path)
            .map_err(|msg| ConfigError::new(format!("{at}.explode[{i}].path"), msg))?;
        explode.push(Explode {
            path: pointer,
            kind: path.kind.as_deref().map(Arc::from),
        });
    }

    // Every NOT NULL column without a default must be filled by the mapping.
    for column in &info.columns {
        if column.not_null
            && !column.has_default
            && !column.generated
            && !source.columns.contains_key(&column.name)
        {
            return Err(ConfigError::new(
                format!("{at}.columns"),
                format!(
                    "column `{}` of `{}` is NOT NULL without a default and has no source: every row would fail",
                    column.name, table.name
                ),
            ));
        }
    }

    let mut columns = Vec::new();
    for (name, column) in &source.columns {
        let field = format!("{at}.columns.{name}");
        let Some(catalog) = info.column(name) else {
            let known: Vec<&str> = info.columns.iter().map(|c| c.name.as_str()).collect();
            return Err(ConfigError::new(
                field,
                format!(
                    "table `{}` has no column `{name}` (it has: {})",
                    table.name,
                    known.join(", ")
                ),
            ));
        };
        columns.push(compile_column(&field, name, column, catalog, &explode)?);
    }
    let time_column = columns
        .iter()
        .position(|c| c.name == table.time_column)
        .expect("config validation should have required a time column source");
    // The time column routes the row: it can never be NULL. Dedupe key
    // columns neither: NULLs never conflict, so such rows would not dedupe.
    columns[time_column].required = true;
    for column in columns.iter_mut() {
        if table.dedupe_key.contains(&column.name) {
            column.required = true;
        }
    }
    let column_list = format!(
        "({})",
        columns
            .iter()
            .map(|c| crate::store::catalog::quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(CompiledSource {
        index,
        table: table_index,
        explode,
        columns,
        time_column,
        column_list,
    })
}

fn compile_column(
    field: &str,
    name: &str,
    column: &ColumnSource,
    catalog: &ColumnInfo,
    explode: &[Explode],
) -> Result<CompiledColumn, ConfigError> {
    let ty = match &catalog.ty {
        Ok(ty) => ty.clone(),
        Err(type_name) => {
            return Err(ConfigError::new(
                field,
                format!("column `{name}` has type {type_name}, which weir cannot write"),
            ));
        }
    };
    if catalog.generated {
        return Err(ConfigError::new(
            field,
            format!("column `{name}` is generated: PostgreSQL computes it, remove its source"),
        ));
    }
    let parse_all = |pointers: &crate::config::Pointers| -> Result<Vec<Pointer>, ConfigError> {
        pointers
            .as_slice()
            .iter()
            .map(|p| Pointer::parse(p).map_err(|msg| ConfigError::new(field, msg)))
            .collect()
    };
    let source = if let Some(pointers) = &column.item {
        let pointers = parse_all(pointers)?;
        if pointers.iter().any(|p| p.wildcards() > 0) {
            return Err(ConfigError::new(
                field,
                "`*` is only meaningful in `event` pointers and explode paths",
            ));
        }
        Source::Item(pointers)
    } else if let Some(pointers) = &column.event {
        let pointers = parse_all(pointers)?;
        for pointer in &pointers {
            check_binding(field, pointer, explode)?;
        }
        Source::Event(pointers)
    } else if let Some(kafka) = column.kafka {
        check_kafka_type(field, kafka, &ty)?;
        Source::Kafka(kafka)
    } else if let Some(header) = &column.header {
        Source::Header(header.clone())
    } else if let Some(weir) = column.weir {
        if weir == WeirField::ItemKind && explode.iter().all(|e| e.kind.is_none()) {
            return Err(ConfigError::new(
                field,
                "`item_kind` needs explode paths with a `kind`",
            ));
        }
        Source::Weir(weir)
    } else if let Some(value) = &column.value {
        let value = serde_json::to_value(value)
            .map_err(|err| ConfigError::new(field, format!("constant: {err}")))?;
        let value = crate::json::Json::from(value);
        // A constant that cannot be encoded would fail every row: say so now.
        let mut scratch = bytes::BytesMut::new();
        copy::write_field(
            &mut scratch,
            &ty,
            copy::Input::Json(&value),
            column.time_unit.unwrap_or_default(),
        )
        .map_err(|err| {
            ConfigError::new(field, format!("constant does not fit the column: {err}"))
        })?;
        Source::Const(value)
    } else {
        unreachable!("config validation should have required exactly one source")
    };
    Ok(CompiledColumn {
        name: name.to_string(),
        ty,
        source,
        // NOT NULL columns are required even with a default: COPY with a
        // column list sends NULL, it never falls back to the default.
        required: column.required || catalog.not_null,
        unit: column.time_unit.unwrap_or_default(),
    })
}

/// An event pointer's `*`s take the item's indices: each explode path must
/// agree with the pointer up to the pointer's last `*`.
fn check_binding(field: &str, pointer: &Pointer, explode: &[Explode]) -> Result<(), ConfigError> {
    let wildcards = pointer.wildcards();
    if wildcards == 0 {
        return Ok(());
    }
    if explode.is_empty() {
        return Err(ConfigError::new(
            field,
            format!(
                "`{}` has `*` but the source has no explode paths to bind it",
                pointer.as_str()
            ),
        ));
    }
    let prefix = pointer
        .wildcard_prefix()
        .expect("a pointer with wildcards should have a wildcard prefix");
    for path in explode {
        let path_text = path.path.as_str();
        let lines_up = path.path.wildcards() >= wildcards && path_text.starts_with(&prefix);
        if !lines_up {
            return Err(ConfigError::new(
                field,
                format!(
                    "`{}` does not line up with explode path `{path_text}`: their parts up to the last `*` must be the same",
                    pointer.as_str()
                ),
            ));
        }
    }
    Ok(())
}

fn check_kafka_type(field: &str, kafka: KafkaField, ty: &PgType) -> Result<(), ConfigError> {
    let ok = match kafka {
        KafkaField::Timestamp => matches!(
            ty,
            PgType::Timestamptz | PgType::Timestamp | PgType::Date | PgType::Int8 | PgType::Text
        ),
        KafkaField::Partition | KafkaField::Offset => matches!(
            ty,
            PgType::Int2 | PgType::Int4 | PgType::Int8 | PgType::Numeric | PgType::Text
        ),
        KafkaField::Key | KafkaField::Topic => !matches!(ty, PgType::Array { .. }),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("kafka {kafka:?} cannot be written to a column of type {ty:?}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn info(columns: &[(&str, PgType, bool)]) -> TableInfo {
        TableInfo {
            oid: 1,
            schema: "public".into(),
            name: "events".into(),
            columns: columns
                .iter()
                .map(|(name, ty, not_null)| ColumnInfo {
                    name: name.to_string(),
                    ty: Ok(ty.clone()),
                    not_null: *not_null,
                    has_default: false,
                    generated: false,
                })
                .collect(),
            range_key: Some("created_at".into()),
            partitioning: "range",
            unique_keys: vec![vec!["id".into(), "created_at".into()]],
        }
    }

    fn config(columns: &str, explode: &str) -> Config {
        let text = format!(
            r#"
            [[tables]]
            name = "events"
            time_column = "created_at"
            granularity = "day"
            [[tables.sources]]
            topics = ["t"]
            {explode}
            [tables.sources.columns]
            {columns}
            "#
        );
        Config::from_toml(&text, &[]).unwrap()
    }

    fn standard() -> TableInfo {
        info(&[
            ("created_at", PgType::Timestamptz, true),
            ("id", PgType::Text, true),
            ("note", PgType::Text, false),
        ])
    }

    #[test]
    fn compiles_and_indexes_topics() {
        let config = config(
            "created_at = { item = \"/ts\" }\nid = { item = [\"/id\", \"/alt\"] }",
            "",
        );
        let mappings = compile(&config.tables, vec![standard()]).unwrap();
        assert_eq!(mappings.sources_for("t"), &[0]);
        let source = &mappings.sources[0];
        assert_eq!(source.column_list, "(\"created_at\", \"id\")");
        assert!(
            source.columns.iter().all(|c| c.required),
            "NOT NULL columns are required"
        );
    }

    #[test]
    fn unknown_column_is_named() {
        let config = config(
            "created_at = { item = \"/ts\" }\nid = { item = \"/id\" }\nnope = { item = \"/x\" }",
            "",
        );
        let err = compile(&config.tables, vec![standard()]).unwrap_err();
        assert_eq!(err.field, "tables[0].sources[0].columns.nope");
    }

    #[test]
    fn unfilled_not_null_column_is_refused() {
        let config = config("created_at = { item = \"/ts\" }", "");
        let err = compile(&config.tables, vec![standard()]).unwrap_err();
        assert!(err.message.contains("`id`"), "{err}");
    }

    #[test]
    fn envelope_pointers_must_line_up_with_explode_paths() {
        let explode = "explode = [{ path = \"/entry/*/changes/*/value/messages/*\" }]";
        let good = config(
            "created_at = { item = \"/ts\" }\nid = { event = \"/entry/*/changes/*/value/metadata/id\" }",
            explode,
        );
        assert!(compile(&good.tables, vec![standard()]).is_ok());
        let bad = config(
            "created_at = { item = \"/ts\" }\nid = { event = \"/entry/*/other/*/id\" }",
            explode,
        );
        let err = compile(&bad.tables, vec![standard()]).unwrap_err();
        assert_eq!(err.field, "tables[0].sources[0].columns.id");
    }

    #[test]
    fn table_must_be_range_partitioned_on_the_time_column() {
        let config = config(
            "created_at = { item = \"/ts\" }\nid = { item = \"/id\" }",
            "",
        );
        let mut plain = standard();
        plain.range_key = None;
        plain.partitioning = "none";
        let err = compile(&config.tables, vec![plain]).unwrap_err();
        assert_eq!(err.field, "tables[0].name");
    }

    #[test]
    fn a_dedupe_key_needs_a_matching_unique_index() {
        let mut with_key = config(
            "created_at = { item = \"/ts\" }\nid = { item = \"/id\" }",
            "",
        );
        with_key.tables[0].dedupe_key = vec!["id".into()];
        let mappings = compile(&with_key.tables, vec![standard()]).unwrap();
        assert_eq!(
            mappings.tables[0].conflict_columns.as_deref(),
            Some("\"id\", \"created_at\"")
        );
        let mut without_index = standard();
        without_index.unique_keys.clear();
        let err = compile(&with_key.tables, vec![without_index]).unwrap_err();
        assert_eq!(err.field, "tables[0].dedupe_key");
        assert!(
            err.message.contains("unique index on (id, created_at)"),
            "{err}"
        );
    }

    #[test]
    fn bad_constant_is_refused_at_start() {
        let config = config(
            "created_at = { item = \"/ts\" }\nid = { item = \"/id\" }\nnote = { value = 1 }",
            "",
        );
        let mut table = standard();
        table.columns[2].ty = Ok(PgType::Uuid);
        let err = compile(&config.tables, vec![table]).unwrap_err();
        assert_eq!(err.field, "tables[0].sources[0].columns.note");
    }
}
