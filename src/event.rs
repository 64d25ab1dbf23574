//! What flows through weir: a Kafka message ([`Event`]) as weir keeps it
//! until its batch commits, and why an event (or one item of it) was not
//! written ([`DeadLetter`], [`Stage`]).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

/// A Kafka message as weir keeps it until its batch commits.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch (create or log-append time).
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Vec<(Arc<str>, Option<Bytes>)>,
    pub payload: Bytes,
}

impl Event {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(key, _)| &**key == name)
            .and_then(|(_, value)| value.as_deref())
    }

    /// Bytes this event holds (for the in-flight memory budget).
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
            + 64
    }
}

/// Where processing gave up on an event or item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Decode,
    Validate,
    Route,
    Write,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Route => "route",
            Stage::Write => "write",
        }
    }

    pub fn parse(text: &str) -> Option<Stage> {
        Some(match text {
            "decode" => Stage::Decode,
            "validate" => Stage::Validate,
            "route" => Stage::Route,
            "write" => Stage::Write,
            _ => return None,
        })
    }
}

/// An event (or one item of it) that will not be written to its table.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Index of the event in the batch's `messages`.
    pub message: u32,
    /// The target table, when the failure concerns one.
    pub table: Option<Arc<str>>,
    /// Position of the item among the event's items for that table.
    pub item: Option<u32>,
    /// JSON pointer of the item within the event.
    pub item_path: Option<String>,
    pub stage: Stage,
    /// Low-cardinality reason code (`missing_required`, `23505`, ...).
    pub code: Cow<'static, str>,
    /// Human-readable detail (never the payload itself).
    pub detail: String,
}
