//! Shared helpers for integration tests: the real PostgreSQL and Kafka
//! broker of the local stack, a schema, topics and a consumer group of its
//! own for every test (so tests run in parallel), and the shipped config
//! pointed at them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_postgres::{Client, NoTls};

pub use weir_loadtest::webhooks;

/// Connection settings of the local stack.
pub struct Stack {
    pub database_url: String,
    pub brokers: String,
}

/// The stack, started once per test binary by `deploy/local/stack.sh up`
/// unless `WEIR_DATABASE_URL` and `WEIR_KAFKA__BROKERS` are already set.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        if let (Ok(database_url), Ok(brokers)) = (
            std::env::var("WEIR_DATABASE_URL"),
            std::env::var("WEIR_KAFKA__BROKERS"),
        ) {
            return Stack {
                database_url,
                brokers,
            };
        }
        let script = project_root().join("deploy/local/stack.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg("up")
            .output()
            .expect("deploy/local/stack.sh should run");
        assert!(
            output.status.success(),
            "stack.sh up failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let vars: HashMap<String, String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.strip_prefix("export "))
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        Stack {
            database_url: vars["WEIR_DATABASE_URL"].clone(),
            brokers: vars["WEIR_KAFKA__BROKERS"].clone(),
        }
    })
}

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("test database should accept connections");
    tokio::spawn(connection);
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("set timezone");
    client
}

/// A schema of the test's own; the shipped schema is migrated into it.
pub struct TestDb {
    pub schema: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new(prefix: &str) -> TestDb {
        let schema = unique(prefix);
        let client = connect(&stack().database_url).await;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA \"{schema}\"; SET search_path = \"{schema}\""
            ))
            .await
            .expect("create test schema");
        TestDb { schema, client }
    }

    /// Runs `weir migrate` (bundled tables plus weir's own) into the schema.
    pub async fn migrate(&self, config: &weir::config::Config) {
        let mut client =
            weir::store::db::connect(&stack().database_url, &config.postgres, "test-migrate")
                .await
                .expect("connect for migrate");
        weir::store::schema::migrate(&mut client, config, false)
            .await
            .expect("migrate the bundled schema");
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
            .get(0)
    }
}

/// What most tests start from: a schema of their own with the shipped
/// schema migrated into it, topics and a consumer group of their own, and
/// the shipped config pointed at them.
pub struct Fixture {
    pub db: TestDb,
    pub topics: Topics,
    pub group: String,
    pub config: weir::config::Config,
}

impl Fixture {
    /// With both generator topics created, `partitions` partitions each.
    pub async fn new(prefix: &str, partitions: i32) -> Fixture {
        let fixture = Fixture::without_topics(prefix).await;
        fixture.topics.create(partitions).await;
        fixture
    }

    /// Topics left for the test (or the load generator) to create.
    pub async fn without_topics(prefix: &str) -> Fixture {
        let db = TestDb::new(prefix).await;
        let topics = Topics::new(prefix);
        let group = unique("g");
        let config = config(&db.schema, &topics, &group, "");
        db.migrate(&config).await;
        Fixture {
            db,
            topics,
            group,
            config,
        }
    }
}

/// Topic names of one test: the generator's topics with a unique prefix.
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: unique(prefix),
        }
    }

    pub fn name(&self, topic: &str) -> String {
        format!("{}.{topic}", self.prefix)
    }

    pub fn webhooks(&self) -> String {
        self.name(webhooks::WEBHOOK_TOPIC)
    }

    pub fn chat(&self) -> String {
        self.name(webhooks::CHAT_TOPIC)
    }

    pub async fn create(&self, partitions: i32) {
        create_topics(&[self.webhooks(), self.chat()], partitions).await;
    }
}

/// An admin client of the stack's broker, and the options of its calls.
fn admin() -> (AdminClient<DefaultClientContext>, AdminOptions) {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", &stack().brokers)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    (admin, options)
}

pub async fn create_topics(names: &[String], partitions: i32) {
    let (admin, options) = admin();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin.create_topics(&topics, &options).await;
    for result in results.expect("create topics") {
        result.expect("topic created");
    }
}

pub async fn delete_topics(names: &[String]) {
    let (admin, options) = admin();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = admin.delete_topics(&names, &options).await;
    for result in results.expect("delete topics") {
        result.expect("topic deleted");
    }
}

/// The shipped `config/weir.toml`, pointed at this test's schema, topics and
/// group, with tansu-friendly consumer settings.
pub fn config_text(schema: &str, topics: &Topics, group: &str, extra: &str) -> String {
    let shipped = std::fs::read_to_string(project_root().join("config/weir.toml"))
        .expect("read shipped config");
    let mut table: toml::Table = toml::from_str(&shipped).expect("shipped config is TOML");
    let kafka = table["kafka"].as_table_mut().expect("kafka section");
    kafka.insert("brokers".into(), stack().brokers.clone().into());
    kafka.insert("group_id".into(), group.into());
    let properties = kafka["properties"].as_table_mut().expect("properties");
    properties.insert("fetch.wait.max.ms".into(), "10".into());
    properties.insert("session.timeout.ms".into(), "6000".into());
    properties.insert("heartbeat.interval.ms".into(), "500".into());
    table["postgres"]
        .as_table_mut()
        .expect("postgres section")
        .insert("schema".into(), schema.into());
    table["maintenance"]
        .as_table_mut()
        .expect("maintenance section")
        .insert("interval_ms".into(), 5000.into());
    for entry in table["tables"].as_array_mut().expect("tables") {
        for source in entry["sources"].as_array_mut().expect("sources") {
            let renamed: Vec<toml::Value> = source["topics"]
                .as_array()
                .expect("topics")
                .iter()
                .map(|t| toml::Value::String(topics.name(t.as_str().expect("topic name"))))
                .collect();
            source["topics"] = toml::Value::Array(renamed);
        }
    }
    let mut text = toml::to_string(&table).expect("serialize config");
    text.push('\n');
    text.push_str(extra);
    text
}

pub fn config(schema: &str, topics: &Topics, group: &str, extra: &str) -> weir::config::Config {
    let env = vec![(
        weir::config::DATABASE_URL_ENV.to_string(),
        stack().database_url.clone(),
    )];
    weir::config::Config::from_toml(&config_text(schema, topics, group, extra), &env)
        .expect("test config is valid")
}

/// Generated events plus the exact Kafka message each became.
pub struct Sent {
    pub events: Vec<webhooks::Produced>,
    /// Where `produce` delivered each event: (partition, offset), by index.
    pub delivered: Vec<Option<(i32, i64)>>,
}

impl Sent {
    /// Expected rows of `table`: wa_events and messages dedupe on their
    /// natural key (a redelivered webhook adds nothing), webhook_logs logs
    /// every delivery.
    pub fn expected_rows(&self, table: &str) -> usize {
        let rows = self
            .events
            .iter()
            .flat_map(|e| e.rows.iter())
            .filter(|r| r.table == table);
        if table == "webhook_logs" {
            rows.count()
        } else {
            rows.map(|r| &r.key)
                .collect::<std::collections::HashSet<_>>()
                .len()
        }
    }
}

/// Produces `sent`'s events to this test's topics as a webhook gateway
/// would: batched (5 ms linger, up to 10,000 records a batch) and
/// lz4-compressed, so consumers resume inside batches as they do in
/// production. Waits for every delivery and records where each event landed
/// in `sent.delivered`. Returns the sum over partitions of (last delivered
/// offset + 1): the stored offsets weir must reach. (Delivery reports are
/// used because tansu's ListOffsets answers are not reliable.)
pub async fn produce(topics: &Topics, sent: &mut Sent) -> i64 {
    produce_to(&stack().brokers, topics, sent).await
}

/// `produce` to the brokers at `brokers` (librdkafka's mock cluster, say).
pub async fn produce_to(brokers: &str, topics: &Topics, sent: &mut Sent) -> i64 {
    produce_with(brokers, "lz4", 10_000, topics, sent).await
}

/// `produce_to` with another compression codec and batch size.
pub async fn produce_with(
    brokers: &str,
    compression: &str,
    batch_messages: usize,
    topics: &Topics,
    sent: &mut Sent,
) -> i64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", batch_messages.to_string())
        .set("compression.type", compression)
        .set("message.max.bytes", "16000000")
        .create()
        .expect("producer");
    let events = &sent.events;
    let mut pending = Vec::with_capacity(events.len());
    for event in events {
        let topic = topics.name(event.topic);
        let mut headers = OwnedHeaders::new();
        for (name, value) in &event.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let record = FutureRecord::to(&topic)
            .key(event.key.as_bytes())
            .payload(&event.payload)
            .headers(headers);
        pending.push(
            producer
                .send_result(record)
                .map_err(|(err, _)| err)
                .expect("enqueue message"),
        );
    }
    let mut positions = Vec::with_capacity(events.len());
    for delivery in pending {
        let delivered = delivery
            .await
            .expect("delivery future")
            .map_err(|(err, _)| err)
            .expect("message delivered");
        positions.push(Some((delivered.partition, delivered.offset)));
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    sent.delivered = positions;
    sent.target()
}

/// Waits until the stored offsets of `group` cover `target` messages.
pub async fn wait_for_offsets(db: &TestDb, group: &str, target: i64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let stored: i64 = db
            .client
            .query_one(
                &format!(
                    "SELECT COALESCE(sum(next_offset), 0)::int8 FROM \"{}\".weir_offsets WHERE consumer_group = $1",
                    db.schema
                ),
                &[&group],
            )
            .await
            .expect("read offsets")
            .get(0);
        if stored >= target {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "stored offsets reached {stored} of {target} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of the schema's stored offsets, over every group.
pub async fn stored_offsets(db: &TestDb) -> i64 {
    db.count(&format!(
        "SELECT COALESCE(sum(next_offset), 0)::int8 FROM \"{}\".weir_offsets",
        db.schema
    ))
    .await
}

/// `stored_offsets`, sampled twice 3 s apart and asserted equal: a stopped
/// writer commits nothing.
pub async fn offsets_hold_still(db: &TestDb) -> i64 {
    let first = stored_offsets(db).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stored_offsets(db).await,
        first,
        "stored offsets hold still while stopped"
    );
    first
}

/// A free TCP port on loopback for a test's HTTP endpoint, bound later by
/// weir. Taken below Linux's ephemeral range (32768 and up): a port the
/// kernel hands out for `:0` can be taken meanwhile by any outgoing
/// connection (the Kafka clients open many), and weir then fails to bind.
/// Ports handed out are remembered, so two tests never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 600) as u16 * 20;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_768, "no free port left below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Writes a config file for a weir process.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Exact per-id accounting of a run: every row the generator expects is in
/// its table exactly once, nothing else is there, and the dead letters are
/// exactly the expected ones (not yet replayed), per source message. `webhook_logs` keeps one
/// row per delivery (no dedupe), keyed by the Kafka position `produce`
/// recorded, so a batch written twice shows there even where the other
/// tables dedupe; tests that inject faults also drop the dedupe keys
/// (`without_dedupe`), so a duplicate write fails loudly on the unique
/// indexes instead of being skipped.
pub async fn assert_exactly_once(db: &TestDb, sent: &Sent, topics: &Topics) {
    use std::collections::HashSet;
    let s = &db.schema;
    assert_eq!(
        sent.delivered.len(),
        sent.events.len(),
        "produce() recorded a position for every event"
    );
    let mut expected: HashMap<&str, HashSet<String>> = HashMap::new();
    let mut dead_expected: HashMap<String, Vec<String>> = HashMap::new();
    for (event, position) in sent.events.iter().zip(&sent.delivered) {
        let (partition, offset) = position.expect("delivered");
        let source = format!("{}/{partition}/{offset}", topics.name(event.topic));
        for row in &event.rows {
            let key = if row.table == "webhook_logs" {
                source.clone()
            } else {
                row.key.clone()
            };
            expected.entry(row.table).or_default().insert(key);
        }
        if !event.dead_letters.is_empty() {
            dead_expected.insert(source, event.dead_letter_signature());
        }
    }
    for (table, key_sql) in [
        ("wa_events", "event_id || '/' || event_type"),
        ("messages", "message_id"),
        (
            "webhook_logs",
            "source_topic || '/' || source_partition || '/' || source_offset",
        ),
    ] {
        let found: HashMap<String, i64> = db
            .client
            .query(
                &format!("SELECT {key_sql}, count(*) FROM \"{s}\".{table} GROUP BY 1"),
                &[],
            )
            .await
            .unwrap_or_else(|err| panic!("read {table}: {err}"))
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let want = expected.remove(table).unwrap_or_default();
        let missing: Vec<&String> = want.iter().filter(|k| !found.contains_key(*k)).collect();
        let duplicated: Vec<(&String, &i64)> = found.iter().filter(|(_, n)| **n > 1).collect();
        let unexpected: Vec<&String> = found.keys().filter(|k| !want.contains(*k)).collect();
        assert!(
            missing.is_empty() && duplicated.is_empty() && unexpected.is_empty(),
            "{table}: {} expected, {} found; {} missing (e.g. {:?}), {} duplicated (e.g. {:?}), {} unexpected (e.g. {:?})",
            want.len(),
            found.len(),
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            duplicated.len(),
            duplicated.iter().take(5).collect::<Vec<_>>(),
            unexpected.len(),
            unexpected.iter().take(5).collect::<Vec<_>>(),
        );
    }
    let mut dead_found: HashMap<String, Vec<String>> = HashMap::new();
    for row in db
        .client
        .query(
            &format!(
                "SELECT topic || '/' || kafka_partition || '/' || kafka_offset,
                        COALESCE(target_table, '-') || ' ' || stage || '/' || code
                   FROM \"{s}\".weir_dead_letters WHERE replayed_at IS NULL"
            ),
            &[],
        )
        .await
        .expect("read dead letters")
    {
        dead_found.entry(row.get(0)).or_default().push(row.get(1));
    }
    for letters in dead_found.values_mut() {
        letters.sort();
    }
    assert_eq!(
        dead_found, dead_expected,
        "dead letters, per source message"
    );
}

/// `text` (a config) with no table's `dedupe_key`: every row takes the plain
/// COPY path, and a row written twice breaks the tables' unique indexes
/// (a `write/23505` dead letter) instead of being skipped as a redelivery.
/// For tests that generate no redeliveries and inject faults.
pub fn without_dedupe(text: &str) -> String {
    let mut table: toml::Table = toml::from_str(text).expect("config");
    for entry in table["tables"].as_array_mut().expect("tables") {
        entry
            .as_table_mut()
            .expect("table entry")
            .remove("dedupe_key");
    }
    toml::to_string(&table).expect("config")
}

async fn pair(db: &TestDb, sql: &str) -> (i64, i64) {
    let row = db
        .client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    (row.get(0), row.get(1))
}

impl Sent {
    /// The first `count` events, and the rest (sent in two rounds).
    pub fn split(self, count: usize) -> (Sent, Sent) {
        let mut events = self.events;
        let rest = events.split_off(count);
        (
            Sent {
                events,
                delivered: Vec::new(),
            },
            Sent {
                events: rest,
                delivered: Vec::new(),
            },
        )
    }

    /// Per (generator topic, partition): last delivered offset + 1, the
    /// stored offset weir must reach there.
    pub fn ends(&self) -> HashMap<(&'static str, i32), i64> {
        let mut ends: HashMap<(&'static str, i32), i64> = HashMap::new();
        for (event, position) in self.events.iter().zip(&self.delivered) {
            let (partition, offset) = position.expect("delivered");
            let end = ends.entry((event.topic, partition)).or_default();
            *end = (*end).max(offset + 1);
        }
        ends
    }

    /// The stored offsets weir must reach for every delivered event: the
    /// sum of [`Sent::ends`].
    pub fn target(&self) -> i64 {
        self.ends().values().sum()
    }

    /// Both rounds, as one run.
    pub fn join(self, other: Sent) -> Sent {
        Sent {
            events: self.events.into_iter().chain(other.events).collect(),
            delivered: self.delivered.into_iter().chain(other.delivered).collect(),
        }
    }
}

/// Generates `count` events with `shape`.
pub fn generate(shape: webhooks::Shape, count: usize) -> Sent {
    let mut generator = webhooks::Generator::new(shape);
    Sent {
        events: (0..count).map(|_| generator.next_event()).collect(),
        delivered: Vec::new(),
    }
}

/// An in-process `weir run`.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), weir::pipeline::StartError>>>,
    /// Port of its HTTP endpoint.
    pub port: u16,
}

impl Running {
    /// Starts the pipeline with an HTTP endpoint on a free port (metrics go
    /// to a recorder of its own, not installed globally).
    pub fn start(mut config: weir::config::Config) -> Running {
        let port = free_port();
        config.http.listen = format!("127.0.0.1:{port}").parse().expect("listen address");
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weir::pipeline::run(
            std::sync::Arc::new(config),
            async {
                let _ = stop_rx.await;
            },
            Some(handle),
        ));
        Running {
            stop: Some(stop),
            task: Some(task),
            port,
        }
    }

    /// SIGTERM, in effect: stops and waits for a clean exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("pipeline task")
                .expect("pipeline stops cleanly");
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).await
    }

    /// Panics with the pipeline's outcome if it has ended: for a test that
    /// waits on the pipeline's progress, so it fails rather than waits on
    /// a pipeline that is gone.
    pub async fn assert_running(&mut self) {
        if self.task.as_ref().is_some_and(|task| task.is_finished()) {
            let outcome = self.task.take().expect("task").await;
            panic!("the pipeline ended while the test waited on it: {outcome:?}");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Polls `check` every 100 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A producer for hand-made messages, with librdkafka's default batching
/// (messages sent without waiting for each other share batches).
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &stack().brokers)
        .set("compression.type", "zstd")
        .set("message.max.bytes", "16000000")
        .create()
        .expect("producer")
}

/// Sends one message; returns its offset.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    headers: &[(&str, &[u8])],
    payload: Option<&[u8]>,
) -> i64 {
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .key(key)
        .headers(owned);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(err, _)| err)
        .expect("delivered")
        .offset
}

/// The metric `name` from a Prometheus scrape, summed over its labels (0
/// when it is not there).
pub fn scraped(metrics: &str, name: &str) -> f64 {
    scraped_matching(metrics, name, "")
}

/// [`scraped`], over the series of `name` whose line contains `fragment`
/// (a label, say `kind="reload"`).
pub fn scraped_matching(metrics: &str, name: &str, fragment: &str) -> f64 {
    weir_loadtest::report::metric_sum(metrics, name, fragment)
}

/// The `weir-loadtest` binary of this build. It belongs to the workspace's
/// `weir-loadtest` crate, so cargo neither builds it for weir's tests nor
/// hands them its path: tests/run.sh builds it first (`cargo build
/// --workspace --bins`), into the target directory of this test's
/// executable. A binary older than the load test's sources is refused
/// rather than tested.
pub fn loadtest_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let binary = dir.join("weir-loadtest");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
                binary.display()
            )
        });
    let root = project_root();
    let mut dirs = vec![root.join("loadtest/src"), root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("source directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let modified = path.metadata().and_then(|m| m.modified()).expect("mtime");
            assert!(
                modified <= built,
                "{} is older than {}: run `cargo build --workspace --bins` first",
                binary.display(),
                path.display()
            );
        }
    }
    binary
}

/// Runs each statement (errors ignored) on the shared database from a
/// thread and runtime of their own: for clean-ups in `Drop`, which may run
/// inside a test's runtime or while it panics.
pub fn clean_up_sql(statements: Vec<String>) {
    let url = stack().database_url.clone();
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client = connect(&url).await;
            for statement in statements {
                let _ = client.batch_execute(&statement).await;
            }
        });
    })
    .join();
}

/// `deploy/local/stack.sh <command>` for a PostgreSQL of a test's own, in
/// `dir` on `port` (so stopping it disturbs no other test); its stdout.
pub fn private_postgres(dir: &Path, port: u16, command: &str) -> String {
    let output = Command::new("bash")
        .arg(project_root().join("deploy/local/stack.sh"))
        .arg(command)
        .env("WEIR_STACK_DIR", dir)
        .env("WEIR_STACK_PG_PORT", port.to_string())
        .output()
        .expect("stack.sh");
    assert!(
        output.status.success(),
        "stack.sh {command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
