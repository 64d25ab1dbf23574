//! `weir-loadtest`: weir's load generator.
//!
//! `produce` sends realistic WhatsApp webhook bodies and chat-message
//! events to Kafka, at a target rate or as fast as possible.

mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};

use webhooks::{Generator, Shape};

#[derive(Debug, Parser)]
#[command(name = "weir-loadtest", version, about = "Load generator for weir")]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "WEIR_KAFKA__BROKERS",
        default_value = "localhost:9092",
        global = true
    )]
    brokers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send events to Kafka.
    Produce(ProduceArgs),
}

#[derive(Debug, clap::Args)]
struct ProduceArgs {
    /// Number of events to send (duplicates included).
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Events per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seed of the traffic: the same seed sends the same events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Tenants (Zipf-distributed).
    #[arg(long, default_value_t = 200)]
    companies: usize,
    /// Event times spread over this many days before now.
    #[arg(long, default_value_t = 40.0)]
    spread_days: f64,
    /// Share of malformed bodies (0..1).
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Share of webhook bodies delivered twice (0..1).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Share of outbound chat-message events (0..1).
    #[arg(long, default_value_t = 0.15)]
    chat_share: f64,
    /// Partitions of topics created by this command.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Records per Kafka batch. The local stack sets 1 (its tansu broker
    /// mishandles fetches that start inside a batch); keep the default for
    /// Apache Kafka.
    #[arg(long, env = "WEIR_LOADTEST_BATCH_MESSAGES", default_value_t = 10_000)]
    batch_messages: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Produce(args) => produce(&cli.brokers, args),
    }
}

struct Delivery {
    failed: AtomicU64,
    delivered: AtomicU64,
}

struct DeliveryContext(Arc<Delivery>);

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.delivered.fetch_add(1, Ordering::Relaxed),
            Err((err, _)) => {
                eprintln!("delivery failed: {err}");
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

fn produce(brokers: &str, args: ProduceArgs) -> anyhow::Result<()> {
    for value in [args.malformed, args.duplicates, args.chat_share] {
        if !(0.0..=1.0).contains(&value) {
            bail!("shares must be between 0 and 1");
        }
    }
    ensure_topics(
        brokers,
        &[webhooks::WEBHOOK_TOPIC, webhooks::CHAT_TOPIC],
        args.partitions,
    )?;
    let delivery = Arc::new(Delivery {
        failed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });
    let producer: ThreadedProducer<DeliveryContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("batch.num.messages", args.batch_messages.to_string())
        .set("compression.type", "lz4")
        .set("acks", "all")
        .set("queue.buffering.max.kbytes", "262144")
        .create_with_context(DeliveryContext(delivery.clone()))
        .context("kafka producer")?;
    let mut generator = Generator::new(Shape {
        seed: args.seed,
        companies: args.companies,
        spread_secs: (args.spread_days * 86_400.0) as i64,
        malformed_share: args.malformed,
        duplicate_share: args.duplicates,
        chat_share: args.chat_share,
        ..Shape::default()
    });
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.count)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events {per_sec}",
        )
        .expect("static template should parse"),
    );
    let started = Instant::now();
    let mut malformed: std::collections::BTreeMap<&'static str, u64> = Default::default();
    for sent in 0..args.count {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let event = generator.next_event();
        if let Some(class) = event.malformed {
            *malformed.entry(class.name()).or_default() += 1;
        }
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for (name, value) in &event.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = BaseRecord::to(event.topic)
            .key(event.key.as_bytes())
            .payload(&event.payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((err, _)) => bail!("cannot produce: {err}"),
            }
        }
        bar.inc(1);
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the producer")?;
    bar.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let failed = delivery.failed.load(Ordering::Relaxed);
    println!(
        "sent {} events in {:.1}s ({:.0}/s), {} delivered, {} failed",
        args.count,
        elapsed,
        args.count as f64 / elapsed,
        delivery.delivered.load(Ordering::Relaxed),
        failed
    );
    for (class, count) in &malformed {
        println!("  malformed {class}: {count}");
    }
    if failed > 0 {
        bail!("{failed} events were not delivered");
    }
    Ok(())
}

/// Creates the topics that do not exist yet.
fn ensure_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("kafka admin client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = runtime
        .block_on(admin.create_topics(
            &new_topics,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .context("creating topics")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}
