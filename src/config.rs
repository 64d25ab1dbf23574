//! Configuration: one TOML file, environment overrides, secrets from the
//! environment only.
//!
//! Every field is documented in `config/weir.toml`, which is also the shipped
//! default. Unknown fields are rejected. Any scalar field can be overridden
//! from the environment as `WEIR_<SECTION>__<FIELD>` (double underscore
//! between levels), e.g. `WEIR_PIPELINE__BATCH_MAX_ROWS=20000`; librdkafka
//! properties as `WEIR_KAFKA__PROPERTIES__<NAME>` with the dots of the name
//! written as underscores (`WEIR_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS=10`).
//!
//! Secrets never come from the file: the PostgreSQL URL is read from
//! `WEIR_DATABASE_URL`, and librdkafka properties that carry secrets
//! (passwords, keys, JAAS configs) are refused in the file and accepted from
//! the environment.
//!
//! A bad configuration is reported as one [`ConfigError`] that names the
//! field, e.g. `tables[0].sources[0].columns.created_at: ...`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Environment variable holding the PostgreSQL connection string.
pub const DATABASE_URL_ENV: &str = "WEIR_DATABASE_URL";
/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "WEIR_CONFIG";
/// Prefix of environment overrides.
const ENV_PREFIX: &str = "WEIR_";

/// A configuration problem, naming the field it is about.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending field (`pipeline.batch_max_rows`), or the
    /// file / environment variable when no single field is at fault.
    pub field: String,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration of one weir process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka consumer settings.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// PostgreSQL settings (the URL itself comes from `WEIR_DATABASE_URL`).
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// Batching, memory bounds and shutdown.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Where events that cannot be written are kept.
    #[serde(default)]
    pub dead_letters: DeadLetterConfig,
    /// Background partition maintenance (premake, retention).
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    /// The HTTP endpoint for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The tables weir writes, each with the topics that feed it.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// From `WEIR_DATABASE_URL`, never from the file.
    #[serde(skip)]
    pub database_url: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Kafka consumer group. Pods of one deployment share it.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Key under which progress is stored in the offsets table. Defaults to
    /// `group_id`. Two deployments with the same key never write the same
    /// offsets twice, even in different consumer groups.
    #[serde(default)]
    pub offsets_group: Option<String>,
    /// Where to start a partition that has no stored offset in PostgreSQL
    /// and no committed offset in Kafka.
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,
    /// How often stored offsets are also committed to Kafka (for lag tools
    /// and autoscalers; PostgreSQL stays the source of truth).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// librdkafka properties passed through as they are (TLS, SASL, tuning).
    /// Secret-bearing ones are accepted only from the environment.
    #[serde(default = "default_kafka_properties")]
    pub properties: BTreeMap<String, PropertyValue>,
}

/// A librdkafka property value; TOML numbers and booleans are accepted and
/// passed on as their text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl fmt::Display for PropertyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropertyValue::Text(text) => f.write_str(text),
            PropertyValue::Integer(n) => write!(f, "{n}"),
            PropertyValue::Float(n) => write!(f, "{n}"),
            PropertyValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// Start from the oldest message still in the topic.
    #[default]
    Earliest,
    /// Start from new messages only.
    Latest,
    /// Refuse to start the partition (the lane reports an error).
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Schema searched for unqualified table names (the `search_path`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Writer connections. Kafka partitions are spread over them; each
    /// commits its partitions' batches in order.
    #[serde(default = "default_writers")]
    pub writers: usize,
    /// `application_name` of weir's sessions (visible in `pg_stat_activity`).
    #[serde(default = "default_application_name")]
    pub application_name: String,
    /// Timeout for establishing a connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// `statement_timeout` of weir's sessions (0 disables it). Also bounds
    /// how long a COPY from a stalled (frozen) weir process can hold locks.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// `idle_in_transaction_session_timeout` of weir's sessions. weir never
    /// pauses inside a transaction, so a session idle in one belongs to a
    /// stalled process: PostgreSQL ends it, releasing the offset row it
    /// holds, and the partition's new owner carries on.
    #[serde(default = "default_idle_in_transaction_ms")]
    pub idle_in_transaction_timeout_ms: u64,
    /// `lock_timeout` for partition DDL: a DDL step waiting longer gives up
    /// and is retried, so it never queues in front of readers for long.
    #[serde(default = "default_lock_timeout_ms")]
    pub ddl_lock_timeout_ms: u64,
    /// Table holding the stored offsets (weir's source of truth).
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
    /// CA certificate(s) (PEM) to verify the server against, as libpq's
    /// `sslmode=verify-full` with `sslrootcert`: TLS is required (a server
    /// without TLS is refused, whatever the URL's `sslmode`), the server's
    /// certificate must chain to these CAs only and name the URL's host.
    /// Unset: the URL's `sslmode` applies (default `prefer`: TLS when the
    /// server offers it), without verification.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// A batch is cut when it holds this many rows...
    #[serde(default = "default_batch_max_rows")]
    pub batch_max_rows: usize,
    /// ...or this many bytes of encoded rows...
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// ...or when its first message has waited this long.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Ceiling on bytes held between Kafka and a PostgreSQL commit (events
    /// and the rows encoded from them). Above it the consumer pauses its
    /// partitions until writers catch up.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Capacity, in messages, of each writer's input queue.
    #[serde(default = "default_queue_messages")]
    pub queue_messages: usize,
    /// Events larger than this are not decoded: they become dead letters
    /// (stage `validate`, code `event_too_large`).
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// What to do with an event that yields no row for any table (for
    /// instance a webhook body without messages or statuses).
    #[serde(default)]
    pub empty_events: EmptyEvents,
    /// First delay between retries of a transient failure.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Largest delay between retries of a transient failure.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// On shutdown, time allowed to commit batches already cut. What is not
    /// committed by then is rolled back and read again by the next owner.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

impl PipelineConfig {
    /// The backoff between retries after a transient PostgreSQL failure:
    /// doubling from `retry_initial_ms` up to `retry_max_ms`, with 20%
    /// jitter so pods that failed together do not retry together. Without
    /// an end unless `give_up_after` is set.
    pub fn retry_backoff(
        &self,
        give_up_after: Option<std::time::Duration>,
    ) -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(std::time::Duration::from_millis(self.retry_initial_ms))
            .with_max_interval(std::time::Duration::from_millis(self.retry_max_ms))
            .with_multiplier(2.0)
            .with_randomization_factor(0.2)
            .with_max_elapsed_time(give_up_after)
            .build()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmptyEvents {
    /// Keep it as a dead letter (stage `route`, code `no_rows`).
    #[default]
    DeadLetter,
    /// Count it (`weir_events_skipped_total`) and move on.
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The dead-letter table (partitioned by day on `failed_at`).
    #[serde(default = "default_dead_letter_table")]
    pub table: String,
    /// Payloads larger than this are stored gzip-compressed.
    #[serde(default = "default_compress_over_bytes")]
    pub compress_over_bytes: usize,
    /// Payloads larger than this keep only a prefix of this size, plus their
    /// full length and SHA-256 (code `oversize`).
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Dead-letter partitions older than this many days are dropped.
    #[serde(default = "default_dead_letter_retention_days")]
    pub retention_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Run premake and retention in the background of `weir run`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often the maintenance loop runs.
    #[serde(default = "default_maintenance_interval_ms")]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the `/metrics`, `/healthz`, `/readyz` endpoint.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `weir=debug,rdkafka=warn`). `RUST_LOG`
    /// wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Time granularity of a table's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Day,
    /// ISO weeks, Monday 00:00 UTC to Monday.
    Week,
    Month,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The parent table, `name` or `schema.name`. It must be
    /// `PARTITION BY RANGE (time_column)`.
    pub name: String,
    /// The `timestamptz` column the table is partitioned on. Every mapping
    /// of the table must give it a value.
    pub time_column: String,
    /// Partition size.
    pub granularity: Granularity,
    /// Partitions kept ready ahead of the current one.
    #[serde(default = "default_premake")]
    pub premake: u32,
    /// Partitions wholly older than this many days are detached and dropped.
    /// Unset: kept forever.
    #[serde(default)]
    pub retention_days: Option<u32>,
    /// Events older than this many days are refused (dead letter
    /// `event_time_out_of_window`). Defaults to `retention_days`, and to 3650
    /// without retention.
    #[serde(default)]
    pub max_age_days: Option<u32>,
    /// Events further in the future than this are refused the same way.
    #[serde(default = "default_max_future_skew_secs")]
    pub max_future_skew_secs: u64,
    /// Directory where partitions are archived (gzip'd COPY plus manifest)
    /// before retention drops them. Unset: dropped without archive.
    #[serde(default)]
    pub archive_dir: Option<String>,
    /// Storage parameters set on every new partition (PostgreSQL does not
    /// inherit them from the parent), e.g. autovacuum tuning.
    #[serde(default)]
    pub storage_parameters: BTreeMap<String, PropertyValue>,
    /// Columns identifying a logical event. When set, a row whose key is
    /// already in the table is skipped (webhook retries arrive twice under
    /// different offsets). Needs a unique index on these columns plus the
    /// time column.
    #[serde(default)]
    pub dedupe_key: Vec<String>,
    /// Where the rows come from.
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Kafka topics read by this mapping.
    pub topics: Vec<String>,
    /// Turn one event into one row per item found at these paths. A path is
    /// a JSON pointer where `*` steps into every element of an array. Empty:
    /// one row per event.
    #[serde(default)]
    pub explode: Vec<ExplodeConfig>,
    /// Column name -> where its value comes from.
    pub columns: BTreeMap<String, ColumnSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplodeConfig {
    /// JSON pointer with `*` wildcards, e.g. `/entry/*/changes/*/value/messages/*`.
    pub path: String,
    /// A label for items found here, available as `{ weir = "item_kind" }`.
    #[serde(default)]
    pub kind: Option<String>,
}

/// Where one column's value comes from. Exactly one source key is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSource {
    /// JSON pointer into the item (the event itself without `explode`). A
    /// list is tried in order; the first present, non-null value wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<Pointers>,
    /// JSON pointer from the root of the event. A `*` takes the index the
    /// current item has at the same place of its explode path, so
    /// `/entry/*/changes/*/value/metadata/phone_number_id` is the item's own
    /// envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Pointers>,
    /// Kafka metadata of the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaField>,
    /// A Kafka header, by name (first occurrence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A value weir supplies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weir: Option<WeirField>,
    /// A constant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<toml::Value>,
    /// A row without a value here is refused (dead letter
    /// `missing_required`). Columns declared `NOT NULL` without a default are
    /// always required.
    #[serde(default)]
    pub required: bool,
    /// Unit of numeric timestamps (JSON numbers or digit strings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_unit: Option<TimeUnit>,
}

/// One JSON pointer or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Pointers {
    One(String),
    Many(Vec<String>),
}

impl Pointers {
    pub fn as_slice(&self) -> &[String] {
        match self {
            Pointers::One(one) => std::slice::from_ref(one),
            Pointers::Many(many) => many,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaField {
    /// The message timestamp (create or log-append time).
    Timestamp,
    Key,
    Topic,
    Partition,
    Offset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeirField {
    /// When weir decoded the event.
    IngestTime,
    /// The `kind` of the explode path the item was found at.
    ItemKind,
    /// The item's position among the event's items (0-based).
    ItemIndex,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    #[default]
    #[serde(rename = "s")]
    Seconds,
    #[serde(rename = "ms")]
    Millis,
    #[serde(rename = "us")]
    Micros,
}

// ---- defaults -------------------------------------------------------------

fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_group_id() -> String {
    "weir".into()
}
fn default_commit_interval_ms() -> u64 {
    1000
}
fn default_kafka_properties() -> BTreeMap<String, PropertyValue> {
    BTreeMap::new()
}
fn default_schema() -> String {
    "public".into()
}
fn default_writers() -> usize {
    2
}
fn default_application_name() -> String {
    "weir".into()
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_statement_timeout_ms() -> u64 {
    60_000
}
fn default_idle_in_transaction_ms() -> u64 {
    15_000
}
fn default_lock_timeout_ms() -> u64 {
    2_000
}
fn default_offsets_table() -> String {
    "weir_offsets".into()
}
fn default_batch_max_rows() -> usize {
    20_000
}
fn default_batch_max_bytes() -> usize {
    8 << 20
}
fn default_batch_linger_ms() -> u64 {
    50
}
fn default_max_in_flight_bytes() -> usize {
    32 << 20
}
fn default_queue_messages() -> usize {
    16_384
}
fn default_max_event_bytes() -> usize {
    4 << 20
}
fn default_retry_initial_ms() -> u64 {
    100
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_shutdown_grace_ms() -> u64 {
    15_000
}
fn default_dead_letter_table() -> String {
    "weir_dead_letters".into()
}
fn default_compress_over_bytes() -> usize {
    1024
}
fn default_max_payload_bytes() -> usize {
    8 << 20
}
fn default_dead_letter_retention_days() -> u32 {
    14
}
fn default_true() -> bool {
    true
}
fn default_maintenance_interval_ms() -> u64 {
    60_000
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9187))
}
fn default_log_level() -> String {
    "info".into()
}
fn default_premake() -> u32 {
    2
}
fn default_max_future_skew_secs() -> u64 {
    86_400
}

macro_rules! default_from_serde {
    ($($ty:ty),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                toml::Table::new()
                    .try_into()
                    .expect("every field of this section should have a default")
            }
        }
    )*};
}
default_from_serde!(
    KafkaConfig,
    PostgresConfig,
    PipelineConfig,
    DeadLetterConfig,
    MaintenanceConfig,
    HttpConfig,
    LogConfig
);

// ---- loading --------------------------------------------------------------

impl Config {
    /// Reads `path`, applies `WEIR_*` overrides from `env`, reads secrets
    /// from `env`, and validates the result.
    pub fn load(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new(path.display().to_string(), format!("cannot read: {err}"))
        })?;
        Config::from_toml(&text, env).map_err(|err| {
            ConfigError::new(format!("{}: {}", path.display(), err.field), err.message)
        })
    }

    /// Like [`Config::load`] from text. `env` is the process environment (or
    /// a test's stand-in).
    pub fn from_toml(text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|err| {
            ConfigError::new(
                "toml",
                err.message().to_string() + &toml_location(text, &err),
            )
        })?;
        reject_file_secrets(&table)?;
        apply_env_overrides(&mut table, env)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|err| {
                let field = err.path().to_string();
                ConfigError::new(field, err.into_inner().message().to_string())
            })?;
        config.database_url = env
            .iter()
            .find(|(key, _)| key == DATABASE_URL_ENV)
            .map(|(_, value)| Secret::new(value.clone()));
        config.validate()?;
        Ok(config)
    }

    /// The key of this deployment's rows in the offsets table.
    pub fn offsets_group(&self) -> &str {
        self.kafka
            .offsets_group
            .as_deref()
            .unwrap_or(&self.kafka.group_id)
    }

    /// The database URL, or an error naming the variable to set.
    pub fn require_database_url(&self) -> Result<&str, ConfigError> {
        self.database_url
            .as_ref()
            .map(Secret::expose)
            .ok_or_else(|| {
                ConfigError::new(
                    DATABASE_URL_ENV,
                    "not set: export the PostgreSQL connection string, e.g. postgres://user@host:5432/db",
                )
            })
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pipeline = &self.pipeline;
        positive("pipeline.batch_max_rows", pipeline.batch_max_rows as u64)?;
        positive("pipeline.batch_max_bytes", pipeline.batch_max_bytes as u64)?;
        positive("pipeline.queue_messages", pipeline.queue_messages as u64)?;
        positive("pipeline.max_event_bytes", pipeline.max_event_bytes as u64)?;
        positive("postgres.writers", self.postgres.writers as u64)?;
        positive("pipeline.retry_initial_ms", pipeline.retry_initial_ms)?;
        if pipeline.retry_max_ms < pipeline.retry_initial_ms {
            return Err(ConfigError::new(
                "pipeline.retry_max_ms",
                "must not be smaller than pipeline.retry_initial_ms",
            ));
        }
        if pipeline.max_in_flight_bytes < pipeline.max_event_bytes {
            return Err(ConfigError::new(
                "pipeline.max_in_flight_bytes",
                "must be at least pipeline.max_event_bytes, or one large event could never be taken in",
            ));
        }
        if self.postgres.writers > 64 {
            return Err(ConfigError::new("postgres.writers", "at most 64"));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::new("kafka.brokers", "must not be empty"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(ConfigError::new("kafka.group_id", "must not be empty"));
        }
        for key in self.kafka.properties.keys() {
            if MANAGED_PROPERTIES.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    format!("kafka.properties.{key}"),
                    "weir sets this property itself and relies on its value (see the kafka section)",
                ));
            }
        }
        identifier("postgres.offsets_table", &self.postgres.offsets_table)?;
        identifier("dead_letters.table", &self.dead_letters.table)?;
        // The schema is one name: a dot in it is part of the name.
        single_name("postgres.schema", &self.postgres.schema, "schema")?;
        positive(
            "dead_letters.max_payload_bytes",
            self.dead_letters.max_payload_bytes as u64,
        )?;
        if self.tables.is_empty() {
            return Err(ConfigError::new(
                "tables",
                "no table is configured: add at least one [[tables]] entry",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (index, table) in self.tables.iter().enumerate() {
            let at = format!("tables[{index}]");
            identifier(&format!("{at}.name"), &table.name)?;
            column_name(&format!("{at}.time_column"), &table.time_column)?;
            if !names.insert(table.name.as_str()) {
                return Err(ConfigError::new(
                    format!("{at}.name"),
                    format!(
                        "table `{}` is configured twice: put all its sources under one entry",
                        table.name
                    ),
                ));
            }
            if table.sources.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.sources"),
                    "a table needs at least one source",
                ));
            }
            if table.retention_days == Some(0) {
                return Err(ConfigError::new(
                    format!("{at}.retention_days"),
                    "must be at least 1 (leave it unset to keep partitions forever)",
                ));
            }
            if table.max_age_days == Some(0) {
                return Err(ConfigError::new(
                    format!("{at}.max_age_days"),
                    "must be at least 1",
                ));
            }
            for key in &table.dedupe_key {
                column_name(&format!("{at}.dedupe_key"), key)?;
            }
            for (source_index, source) in table.sources.iter().enumerate() {
                let at = format!("{at}.sources[{source_index}]");
                if source.topics.is_empty() || source.topics.iter().any(|t| t.trim().is_empty()) {
                    return Err(ConfigError::new(
                        format!("{at}.topics"),
                        "list at least one non-empty topic",
                    ));
                }
                for topic in &source.topics {
                    topic_name(&format!("{at}.topics"), topic)?;
                }
                if !source.columns.contains_key(&table.time_column) {
                    return Err(ConfigError::new(
                        format!("{at}.columns"),
                        format!(
                            "no source for the time column `{}`: every row needs its time to find its partition",
                            table.time_column
                        ),
                    ));
                }
                for (name, column) in &source.columns {
                    column_name(&format!("{at}.columns"), name)?;
                    column.validate(&format!("{at}.columns.{name}"))?;
                }
                // Pointer syntax and explode compatibility are checked when
                // the mapping is compiled (`mapping::compile`), which names
                // the field the same way.
            }
        }
        Ok(())
    }
}

impl ColumnSource {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let set = [
            self.item.is_some(),
            self.event.is_some(),
            self.kafka.is_some(),
            self.header.is_some(),
            self.weir.is_some(),
            self.value.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if set != 1 {
            return Err(ConfigError::new(
                at,
                "set exactly one of item, event, kafka, header, weir, value",
            ));
        }
        for pointers in [&self.item, &self.event].into_iter().flatten() {
            if pointers.as_slice().is_empty() {
                return Err(ConfigError::new(at, "the pointer list is empty"));
            }
        }
        Ok(())
    }
}

/// librdkafka properties weir sets itself: the delivery guarantee depends on
/// them.
pub const MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

/// Property names (or parts of them) that carry secrets.
fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "ssl.key.pem",
        "ssl_key",
        "token",
    ]
    .iter()
    .any(|needle| name.contains(needle))
}

fn reject_file_secrets(table: &toml::Table) -> Result<(), ConfigError> {
    if table.contains_key("database_url") {
        return Err(ConfigError::new(
            "database_url",
            format!("secrets are not read from the file: set {DATABASE_URL_ENV}"),
        ));
    }
    let properties = table
        .get("kafka")
        .and_then(|kafka| kafka.get("properties"))
        .and_then(toml::Value::as_table);
    if let Some(properties) = properties {
        for name in properties.keys() {
            if is_secret_property(name) {
                let env_name = format!(
                    "{ENV_PREFIX}KAFKA__PROPERTIES__{}",
                    name.replace('.', "_").to_ascii_uppercase()
                );
                return Err(ConfigError::new(
                    format!("kafka.properties.{name}"),
                    format!("secrets are not read from the file: set {env_name}"),
                ));
            }
        }
    }
    Ok(())
}

fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::new(field, "must be greater than 0"))
    } else {
        Ok(())
    }
}

/// A PostgreSQL identifier weir will quote: non-empty, at most 63 bytes, no
/// NUL. `schema.name` is accepted where a table name is expected.
fn identifier(field: &str, value: &str) -> Result<(), ConfigError> {
    for part in value.split('.') {
        if part.is_empty() || part.len() > 63 || part.contains('\0') {
            return Err(ConfigError::new(
                field,
                format!(
                    "`{}` is not a valid PostgreSQL name (1 to 63 bytes per part, no NUL)",
                    value.replace('\0', "\\0")
                ),
            ));
        }
    }
    if value.split('.').count() > 2 {
        return Err(ConfigError::new(
            field,
            format!("`{value}`: use `name` or `schema.name`"),
        ));
    }
    Ok(())
}

/// A column name weir will quote: non-empty, at most 63 bytes (PostgreSQL
/// would silently cut a longer one), no NUL. Unlike table names it is never
/// split on dots: `a.b` is one column.
fn column_name(field: &str, value: &str) -> Result<(), ConfigError> {
    single_name(field, value, "column")
}

/// One PostgreSQL identifier (a schema, a column), never split on dots.
fn single_name(field: &str, value: &str, what: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 63 || value.contains('\0') {
        return Err(ConfigError::new(
            field,
            format!(
                "`{}` is not a valid PostgreSQL {what} name (1 to 63 bytes, no NUL)",
                value.replace('\0', "\\0")
            ),
        ));
    }
    Ok(())
}

/// A Kafka topic name as brokers accept it: 1 to 249 characters of ASCII
/// letters, digits, `.`, `_` and `-`, and neither `.` nor `..`.
fn topic_name(field: &str, value: &str) -> Result<(), ConfigError> {
    let legal = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !legal || value.len() > 249 || value == "." || value == ".." {
        return Err(ConfigError::new(
            field,
            format!(
                "`{value}` is not a valid Kafka topic name (1 to 249 characters of a-z, A-Z, \
                 0-9, '.', '_' and '-')"
            ),
        ));
    }
    Ok(())
}

fn toml_location(text: &str, err: &toml::de::Error) -> String {
    match err.span() {
        Some(span) => {
            let line = text[..span.start].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// Applies `WEIR_A__B__C=value` to `table.a.b.c`. The value is typed like
/// the field it replaces (from the file, else from the section defaults):
/// integers, booleans and lists (comma separated) are parsed, the rest is text.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
    let defaults = section_defaults();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            // WEIR_DATABASE_URL, WEIR_CONFIG, WEIR_CACHE_DIR...: not overrides.
            continue;
        }
        let mut path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                name,
                "empty path segment in override name",
            ));
        }
        let is_property = path.len() == 3 && path[0] == "kafka" && path[1] == "properties";
        if is_property {
            // librdkafka names use dots; environment names cannot.
            path[2] = path[2].replace('_', ".");
        }
        let template = lookup(table, &path).or_else(|| lookup(&defaults, &path));
        let value = if is_property {
            toml::Value::String(raw.clone())
        } else {
            typed_like(template, raw).map_err(|message| ConfigError::new(name, message))?
        };
        set_path(table, &path, value).map_err(|message| ConfigError::new(name, message))?;
    }
    Ok(())
}

fn section_defaults() -> toml::Table {
    let mut table = toml::Table::new();
    let sections: [(&str, Result<toml::Value, toml::ser::Error>); 7] = [
        ("kafka", toml::Value::try_from(KafkaConfig::default())),
        ("postgres", toml::Value::try_from(PostgresConfig::default())),
        ("pipeline", toml::Value::try_from(PipelineConfig::default())),
        (
            "dead_letters",
            toml::Value::try_from(DeadLetterConfig::default()),
        ),
        (
            "maintenance",
            toml::Value::try_from(MaintenanceConfig::default()),
        ),
        ("http", toml::Value::try_from(HttpConfig::default())),
        ("log", toml::Value::try_from(LogConfig::default())),
    ];
    for (name, value) in sections {
        if let Ok(value) = value {
            table.insert(name.to_string(), value);
        }
    }
    table
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    if rest.is_empty() {
        Some(value)
    } else {
        lookup(value.as_table()?, rest)
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (first, rest) = path
        .split_first()
        .expect("override paths should be non-empty");
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(inner) => set_path(inner, rest, value),
        _ => Err(format!("`{first}` is not a section")),
    }
}

fn typed_like(template: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    match template {
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("`{raw}` is not an integer")),
        Some(toml::Value::Float(_)) => raw
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("`{raw}` is not a number")),
        Some(toml::Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("`{raw}` is not true or false")),
        },
        Some(toml::Value::Array(_)) => Ok(toml::Value::Array(
            raw.split(',')
                .map(|part| toml::Value::String(part.trim().to_string()))
                .collect(),
        )),
        Some(toml::Value::Table(_)) => Err("names a section, not a field".into()),
        Some(toml::Value::String(_)) | Some(toml::Value::Datetime(_)) => {
            Ok(toml::Value::String(raw.to_string()))
        }
        // A field with no default (an optional one): integers and booleans
        // are recognised, anything else is text.
        None => Ok(if let Ok(n) = raw.trim().parse::<i64>() {
            toml::Value::Integer(n)
        } else if let Ok(b) = raw.trim().parse::<bool>() {
            toml::Value::Boolean(b)
        } else {
            toml::Value::String(raw.to_string())
        }),
    }
}

/// The process environment as a list (what [`Config::load`] takes).
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[tables]]
        name = "events"
        time_column = "created_at"
        granularity = "day"
        [[tables.sources]]
        topics = ["t"]
        [tables.sources.columns]
        created_at = { item = "/ts" }
        id = { item = "/id", required = true }
    "#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::from_toml(MINIMAL, &[]).unwrap();
        assert_eq!(config.pipeline.batch_max_rows, 20_000);
        assert_eq!(config.kafka.group_id, "weir");
        assert_eq!(config.offsets_group(), "weir");
        assert!(config.database_url.is_none());
        assert_eq!(config.tables[0].granularity, Granularity::Day);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = format!("{MINIMAL}\n[pipeline]\nbatch_max_rowz = 5\n");
        let err = Config::from_toml(&text, &[]).unwrap_err();
        assert_eq!(err.field, "pipeline.batch_max_rowz");
        assert!(err.message.contains("unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_nested_field() {
        let text = MINIMAL.replace("required = true", "required = \"yes\"");
        let err = Config::from_toml(&text, &[]).unwrap_err();
        assert_eq!(
            err.field, "tables[0].sources[0].columns.id.required",
            "{err}"
        );
    }

    #[test]
    fn env_overrides_are_typed_like_the_field() {
        let config = Config::from_toml(
            MINIMAL,
            &env(&[
                ("WEIR_PIPELINE__BATCH_MAX_ROWS", "123"),
                ("WEIR_KAFKA__BROKERS", "a:1,b:2"),
                ("WEIR_KAFKA__GROUP_ID", "42"),
                ("WEIR_KAFKA__PROPERTIES__FETCH_WAIT_MAX_MS", "10"),
                ("WEIR_DATABASE_URL", "postgres://x:secret@h/db"),
                ("WEIR_CACHE_DIR", "/ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(config.pipeline.batch_max_rows, 123);
        assert_eq!(config.kafka.brokers, "a:1,b:2");
        assert_eq!(config.kafka.group_id, "42");
        assert_eq!(
            config.kafka.properties["fetch.wait.max.ms"],
            PropertyValue::Text("10".into())
        );
        assert_eq!(
            config.database_url.as_ref().unwrap().expose(),
            "postgres://x:secret@h/db"
        );
        assert!(!format!("{config:?}").contains("secret@"));
    }

    #[test]
    fn bad_env_override_names_the_variable() {
        let err = Config::from_toml(MINIMAL, &env(&[("WEIR_PIPELINE__BATCH_MAX_ROWS", "lots")]))
            .unwrap_err();
        assert_eq!(err.field, "WEIR_PIPELINE__BATCH_MAX_ROWS");
    }

    #[test]
    fn secrets_in_the_file_are_refused() {
        let text = format!("{MINIMAL}\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n");
        let err = Config::from_toml(&text, &[]).unwrap_err();
        assert_eq!(err.field, "kafka.properties.sasl.password");
        assert!(
            err.message
                .contains("WEIR_KAFKA__PROPERTIES__SASL_PASSWORD")
        );
    }

    #[test]
    fn managed_properties_are_refused() {
        let text = format!("{MINIMAL}\n[kafka.properties]\n\"enable.auto.commit\" = true\n");
        let err = Config::from_toml(&text, &[]).unwrap_err();
        assert_eq!(err.field, "kafka.properties.enable.auto.commit");
    }

    #[test]
    fn a_column_needs_exactly_one_source() {
        let text = MINIMAL.replace(
            "id = { item = \"/id\", required = true }",
            "id = { item = \"/id\", header = \"h\" }",
        );
        let err = Config::from_toml(&text, &[]).unwrap_err();
        assert_eq!(err.field, "tables[0].sources[0].columns.id");
    }

    #[test]
    fn the_time_column_must_be_mapped() {
        let text = MINIMAL.replace("created_at = { item = \"/ts\" }", "");
        let err = Config::from_toml(&text, &[]).unwrap_err();
        assert_eq!(err.field, "tables[0].sources[0].columns");
        assert!(err.message.contains("created_at"));
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../config/weir.toml");
        let config = Config::from_toml(text, &[]).unwrap();
        assert!(config.tables.iter().any(|t| t.name == "wa_events"));
        assert!(config.tables.iter().any(|t| t.name == "messages"));
    }
}
