//! The dead-letter table: every event (or item) weir will not write to its
//! table, with where it came from, the stage that refused it, a reason code,
//! a message, and the original bytes (gzip-compressed above a threshold).
//!
//! Dead letters are COPY'd in the same transaction as the batch's rows and
//! offsets, so they too are written exactly once. The table is partitioned
//! by day on `failed_at` and managed like the data tables (premake,
//! retention).

use std::io::{Read, Write};

use bytes::BytesMut;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::{Config, TimeUnit};
use crate::copy::{self, Input, PgType};
use crate::event::{DeadLetter, Event};
use crate::store::catalog::{qualify, split_name};

/// Columns written by weir, in COPY order.
pub const COPY_COLUMNS: &str = "(failed_at, consumer_group, topic, kafka_partition, kafka_offset, \
     kafka_timestamp, kafka_key, kafka_headers, target_table, item_index, item_path, stage, code, \
     message, attempts, payload, payload_encoding, payload_size, payload_truncated, payload_sha256)";
const COPY_FIELDS: u16 = 20;

/// Longest `message` kept.
const MAX_MESSAGE_CHARS: usize = 2000;

/// Encoding of a dead letter whose payload is stored with another dead
/// letter of the same Kafka message (same group, topic, partition and
/// offset, written in the same transaction): an event with k bad items
/// stores and compresses its payload once, not k times.
pub const SIBLING_ENCODING: &str = "sibling";

/// Whether a dead letter carries its message's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadCopy {
    /// The first dead letter of a message in a batch: the payload itself.
    Carried,
    /// A later one: an empty payload, [`SIBLING_ENCODING`].
    WithSibling,
}

/// How dead letters are stored.
#[derive(Debug, Clone)]
pub struct DeadLetterTable {
    pub schema: String,
    pub name: String,
    pub group: String,
    pub compress_over_bytes: usize,
    pub max_payload_bytes: usize,
}

impl DeadLetterTable {
    pub fn new(config: &Config) -> Self {
        let (schema, name) = split_name(&config.dead_letters.table, &config.postgres.schema);
        DeadLetterTable {
            schema: schema.to_string(),
            name: name.to_string(),
            group: config.offsets_group().to_string(),
            compress_over_bytes: config.dead_letters.compress_over_bytes,
            max_payload_bytes: config.dead_letters.max_payload_bytes,
        }
    }

    pub fn qualified(&self) -> String {
        qualify(&self.schema, &self.name)
    }

    pub fn ddl(&self) -> String {
        let table = self.qualified();
        let index_name = crate::store::catalog::quote_ident(&format!("{}_source_idx", self.name));
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id                bigserial   NOT NULL,
                failed_at         timestamptz NOT NULL DEFAULT now(),
                consumer_group    text        NOT NULL,
                topic             text        NOT NULL,
                kafka_partition   integer     NOT NULL,
                kafka_offset      bigint      NOT NULL,
                kafka_timestamp   timestamptz,
                kafka_key         bytea,
                kafka_headers     jsonb,
                target_table      text,
                item_index        integer,
                item_path         text,
                stage             text        NOT NULL,
                code              text        NOT NULL,
                message           text        NOT NULL,
                attempts          integer     NOT NULL DEFAULT 1,
                payload           bytea       NOT NULL,
                payload_encoding  text        NOT NULL,
                payload_size      integer     NOT NULL,
                payload_truncated boolean     NOT NULL DEFAULT false,
                payload_sha256    bytea,
                replayed_at       timestamptz,
                PRIMARY KEY (id, failed_at)
            ) PARTITION BY RANGE (failed_at);
            CREATE INDEX IF NOT EXISTS {index_name} ON {table} (topic, kafka_partition, kafka_offset);"
        )
    }

    /// Appends one dead letter as a COPY row (columns of [`COPY_COLUMNS`]).
    pub fn encode_row(
        &self,
        buf: &mut BytesMut,
        letter: &DeadLetter,
        event: &Event,
        failed_at: i64,
        copy: PayloadCopy,
    ) {
        // Every field here is built by weir and encodes. Should one ever
        // fail, it is written as NULL: a NOT NULL column then refuses the
        // row, which stops the writer loudly (a schema-class error) instead
        // of panicking it.
        let field = |buf: &mut BytesMut, ty: &PgType, input: Input<'_>| {
            let start = buf.len();
            if let Err(err) = copy::write_field(buf, ty, input, TimeUnit::Seconds) {
                tracing::error!(error = %err, "a dead-letter field did not encode; written as NULL");
                buf.truncate(start);
                copy::write_null(buf);
            }
        };
        let text = |buf: &mut BytesMut, value: &str| {
            let clean = value.replace('\0', "\u{fffd}");
            field(buf, &PgType::Text, Input::Str(&clean));
        };
        copy::begin_row(buf, COPY_FIELDS);
        field(buf, &PgType::Timestamptz, Input::UnixMicros(failed_at));
        text(buf, &self.group);
        text(buf, &event.topic);
        field(buf, &PgType::Int4, Input::Int(event.partition as i64));
        field(buf, &PgType::Int8, Input::Int(event.offset));
        // A Kafka timestamp timestamptz cannot hold is stored as NULL, and
        // the message says what it was.
        let mut timestamp_note = None;
        match event
            .timestamp_ms
            .map(|ms| (ms, copy::kafka_timestamp_micros(ms)))
        {
            Some((_, Some(micros))) => field(buf, &PgType::Timestamptz, Input::UnixMicros(micros)),
            Some((ms, None)) => {
                timestamp_note = Some(format!(
                    " [kafka timestamp {ms} ms is outside years 1 to 9999: kafka_timestamp is NULL]"
                ));
                copy::write_null(buf);
            }
            None => copy::write_null(buf),
        }
        match &event.key {
            Some(key) => field(buf, &PgType::Bytea, Input::Bytes(key)),
            None => copy::write_null(buf),
        }
        if event.headers.is_empty() {
            copy::write_null(buf);
        } else {
            let headers = crate::json::Json::from(headers_json(event));
            field(buf, &PgType::Jsonb, Input::Json(&headers));
        }
        match &letter.table {
            Some(table) => text(buf, table),
            None => copy::write_null(buf),
        }
        match letter.item {
            Some(item) => field(buf, &PgType::Int4, Input::Int(item as i64)),
            None => copy::write_null(buf),
        }
        match &letter.item_path {
            Some(path) => text(buf, path),
            None => copy::write_null(buf),
        }
        text(buf, letter.stage.as_str());
        text(buf, &letter.code);
        let mut message: String = letter.detail.chars().take(MAX_MESSAGE_CHARS).collect();
        if let Some(note) = timestamp_note {
            message.push_str(&note);
        }
        text(buf, &message);
        field(buf, &PgType::Int4, Input::Int(1));
        let stored = match copy {
            PayloadCopy::Carried => self.store_payload(&event.payload),
            PayloadCopy::WithSibling => StoredPayload {
                bytes: Vec::new(),
                encoding: SIBLING_ENCODING,
                truncated: event.payload.len() > self.max_payload_bytes,
                sha256: None,
            },
        };
        field(buf, &PgType::Bytea, Input::Bytes(&stored.bytes));
        text(buf, stored.encoding);
        field(buf, &PgType::Int4, Input::Int(event.payload.len() as i64));
        field(
            buf,
            &PgType::Bool,
            Input::Json(&crate::json::Json::Bool(stored.truncated)),
        );
        match stored.sha256 {
            Some(hash) => field(buf, &PgType::Bytea, Input::Bytes(&hash)),
            None => copy::write_null(buf),
        }
    }

    /// The payload as stored: capped at `max_payload_bytes` (with its hash
    /// kept), and gzip-compressed above `compress_over_bytes`.
    pub fn store_payload(&self, payload: &[u8]) -> StoredPayload {
        let truncated = payload.len() > self.max_payload_bytes;
        let kept = &payload[..payload.len().min(self.max_payload_bytes)];
        let sha256 = truncated.then(|| Sha256::digest(payload).to_vec());
        if kept.len() > self.compress_over_bytes {
            let mut encoder =
                GzEncoder::new(Vec::with_capacity(kept.len() / 3), Compression::fast());
            encoder
                .write_all(kept)
                .expect("writing to a Vec should not fail");
            let compressed = encoder
                .finish()
                .expect("finishing a Vec gzip stream should not fail");
            StoredPayload {
                bytes: compressed,
                encoding: "gzip",
                truncated,
                sha256,
            }
        } else {
            StoredPayload {
                bytes: kept.to_vec(),
                encoding: "identity",
                truncated,
                sha256,
            }
        }
    }
}

/// A payload as it goes into the dead-letter table.
pub struct StoredPayload {
    pub bytes: Vec<u8>,
    pub encoding: &'static str,
    pub truncated: bool,
    pub sha256: Option<Vec<u8>>,
}

/// Restores a stored payload. Decompression stops at `limit` bytes: a dead
/// letter is untrusted input, and a small gzip stream can expand enormously.
pub fn restore_payload(bytes: &[u8], encoding: &str, limit: usize) -> Result<Vec<u8>, String> {
    match encoding {
        "identity" => Ok(bytes.to_vec()),
        "gzip" => {
            let mut out = Vec::new();
            let mut decoder = GzDecoder::new(bytes).take(limit as u64 + 1);
            decoder
                .read_to_end(&mut out)
                .map_err(|err| format!("corrupt gzip payload: {err}"))?;
            if out.len() > limit {
                return Err(format!(
                    "payload expands beyond {limit} bytes; refusing to decompress further"
                ));
            }
            Ok(out)
        }
        SIBLING_ENCODING => Err(
            "the payload was stored with another dead letter of the same message, which is gone"
                .into(),
        ),
        other => Err(format!("unknown payload encoding `{other}`")),
    }
}

/// Kafka headers as JSON: `[{"key": ..., "value": ...}]`, values as text when
/// they are UTF-8 and as `value_hex` otherwise.
pub(crate) fn headers_json(event: &Event) -> serde_json::Value {
    serde_json::Value::Array(
        event
            .headers
            .iter()
            .map(|(key, value)| match value {
                None => json!({ "key": key.replace('\0', "\u{fffd}"), "value": null }),
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) if !text.contains('\0') => json!({ "key": key.replace('\0', "\u{fffd}"), "value": text }),
                    _ => json!({ "key": key.replace('\0', "\u{fffd}"), "value_hex": hex::encode(bytes) }),
                },
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> DeadLetterTable {
        DeadLetterTable {
            schema: "public".into(),
            name: "dl".into(),
            group: "g".into(),
            compress_over_bytes: 1024,
            max_payload_bytes: 4096,
        }
    }

    #[test]
    fn small_payloads_are_kept_as_they_are() {
        let stored = table().store_payload(b"{\"a\":1}");
        assert_eq!(stored.encoding, "identity");
        assert_eq!(stored.bytes, b"{\"a\":1}");
        assert!(!stored.truncated);
    }

    #[test]
    fn large_payloads_are_compressed_and_restored() {
        let payload = "{\"text\":\"olá mundo\"}".repeat(150);
        let stored = table().store_payload(payload.as_bytes());
        assert_eq!(stored.encoding, "gzip");
        assert!(stored.bytes.len() < payload.len() / 5);
        let restored = restore_payload(&stored.bytes, stored.encoding, 1 << 20).unwrap();
        assert_eq!(restored, payload.as_bytes());
    }

    #[test]
    fn oversize_payloads_keep_a_prefix_and_the_hash() {
        let payload = vec![b'x'; 10_000];
        let stored = table().store_payload(&payload);
        assert!(stored.truncated);
        assert_eq!(
            stored.sha256.as_deref(),
            Some(&Sha256::digest(&payload)[..])
        );
        let restored = restore_payload(&stored.bytes, stored.encoding, 1 << 20).unwrap();
        assert_eq!(restored.len(), 4096);
    }

    #[test]
    fn decompression_is_capped() {
        let bomb = table().store_payload(&vec![0u8; 4000]);
        let err = restore_payload(&bomb.bytes, "gzip", 100).unwrap_err();
        assert!(err.contains("beyond 100 bytes"), "{err}");
    }
}
