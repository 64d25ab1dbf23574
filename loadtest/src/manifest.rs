//! What a `produce` run sent: the generator's parameters (the events
//! themselves are regenerated from the seed) and where each delivery landed
//! in Kafka. `verify` and `report` read it back.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::webhooks::{CHAT_TOPIC, Shape, WEBHOOK_TOPIC};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub count: u64,
    /// The generator's parameters: with the seed, they regenerate every event.
    #[serde(flatten)]
    pub shape: Shape,
    /// Prefix put before the generator's topic names (`<prefix>.whatsapp.webhooks`).
    pub topic_prefix: Option<String>,
    /// Target rate (0: as fast as possible) and the rate achieved.
    pub rate: u64,
    pub achieved_rate: f64,
    pub started_at: String,
    pub finished_at: String,
}

impl Manifest {
    /// The Kafka topic a generator topic was sent to.
    pub fn topic(&self, generated: &str) -> String {
        match &self.topic_prefix {
            Some(prefix) => format!("{prefix}.{generated}"),
            None => generated.to_string(),
        }
    }

    pub fn topics(&self) -> Vec<String> {
        vec![self.topic(WEBHOOK_TOPIC), self.topic(CHAT_TOPIC)]
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("manifest.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", path.display()))
    }

    pub fn load(dir: &Path) -> anyhow::Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read(&path)
            .with_context(|| format!("read {} (run `produce` first)", path.display()))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))?;
        if manifest.version != 1 {
            bail!(
                "{}: manifest version {} is not supported",
                path.display(),
                manifest.version
            );
        }
        Ok(manifest)
    }
}

/// Where one delivery landed: in the order events were generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// 0: webhooks topic, 1: chat topic.
    pub topic: u8,
    pub partition: i32,
    pub offset: i64,
}

/// Appends deliveries as lines `topic partition offset`.
pub struct DeliveryLog {
    out: BufWriter<File>,
}

impl DeliveryLog {
    pub fn create(dir: &Path) -> anyhow::Result<DeliveryLog> {
        std::fs::create_dir_all(dir)?;
        let path = deliveries_path(dir);
        Ok(DeliveryLog {
            out: BufWriter::new(
                File::create(&path).with_context(|| format!("create {}", path.display()))?,
            ),
        })
    }

    pub fn record(&mut self, delivery: Delivery) -> anyhow::Result<()> {
        writeln!(
            self.out,
            "{} {} {}",
            delivery.topic, delivery.partition, delivery.offset
        )?;
        Ok(())
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

fn deliveries_path(dir: &Path) -> PathBuf {
    dir.join("deliveries.txt")
}

pub fn load_deliveries(dir: &Path) -> anyhow::Result<Vec<Delivery>> {
    let path = deliveries_path(dir);
    let file = File::open(&path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        let mut parts = line.split(' ');
        let mut next = || -> anyhow::Result<i64> {
            parts
                .next()
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("{}:{}: bad line", path.display(), number + 1))
        };
        out.push(Delivery {
            topic: next()? as u8,
            partition: next()? as i32,
            offset: next()?,
        });
    }
    Ok(out)
}
