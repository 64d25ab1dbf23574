//! Batches: what one lane (one Kafka partition) hands to its writer.
//!
//! A batch covers a contiguous range of a partition's offsets, from the
//! stored offset it continues (`prev`) to the offset after its last message
//! (`next`). It holds every row those messages produced, already encoded
//! for COPY and grouped by target partition range ("segments"), and every
//! dead letter they produced. It commits whole or not at all.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

/// A Kafka message as weir keeps it until its batch commits.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch (create or log-append time).
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    pub payload: Bytes,
}

impl Event {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
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

/// Where a row came from and where it lies in its segment buffer.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta {
    /// Byte offset of the row in the segment buffer.
    pub start: u32,
    /// Event time, Unix microseconds (to route the row again if needed).
    pub time: i64,
    /// Index of the event in the batch's `messages`.
    pub message: u32,
    /// Position of the item among the event's items for this table.
    pub item: u32,
}

/// Rows of one source (one COPY column list) for one partition range.
#[derive(Debug)]
pub struct Segment {
    pub source: usize,
    pub table: usize,
    /// Partition range `[lo, hi)`, Unix microseconds.
    pub lo: i64,
    pub hi: i64,
    /// Encoded rows, without the COPY header and trailer.
    pub buf: BytesMut,
    pub rows: Vec<RowMeta>,
}

impl Segment {
    pub fn new(source: usize, table: usize, lo: i64, hi: i64) -> Self {
        Segment {
            source,
            table,
            lo,
            hi,
            buf: BytesMut::with_capacity(256 * 1024),
            rows: Vec::new(),
        }
    }

    /// Freezes the rows for writing.
    pub fn seal(self) -> Sealed {
        Sealed {
            source: self.source,
            table: self.table,
            lo: self.lo,
            hi: self.hi,
            buf: self.buf.freeze(),
            rows: self.rows,
        }
    }
}

/// A segment of a cut batch: immutable, shareable without copying.
#[derive(Debug)]
pub struct Sealed {
    pub source: usize,
    pub table: usize,
    pub lo: i64,
    pub hi: i64,
    pub buf: Bytes,
    pub rows: Vec<RowMeta>,
}

impl Sealed {
    /// Byte range of row `i`.
    pub fn row_range(&self, i: usize) -> std::ops::Range<usize> {
        let start = self.rows[i].start as usize;
        let end = self
            .rows
            .get(i + 1)
            .map_or(self.buf.len(), |next| next.start as usize);
        start..end
    }
}

/// Segment buffers handed back after their batch is written, for the next
/// batches of the same writer: reused memory is already mapped, so batches
/// do not fault fresh pages in (and zero them) every time. The pool keeps at
/// most `budget` bytes of capacity, so it never holds more than about one
/// batch beyond what the pipeline itself has in flight.
#[derive(Debug, Clone, Default)]
pub struct BufferPool {
    inner: Arc<std::sync::Mutex<PoolInner>>,
}

#[derive(Debug, Default)]
struct PoolInner {
    buffers: Vec<BytesMut>,
    /// Capacity of `buffers`, summed.
    held: usize,
    budget: usize,
}

impl BufferPool {
    /// Capacity of a fresh buffer.
    const FRESH: usize = 256 * 1024;

    /// A pool keeping at most `budget` bytes of buffer capacity.
    pub fn new(budget: usize) -> Self {
        BufferPool {
            inner: Arc::new(std::sync::Mutex::new(PoolInner {
                budget,
                ..PoolInner::default()
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn take(&self) -> BytesMut {
        let mut inner = self.lock();
        match inner.buffers.pop() {
            Some(buf) => {
                inner.held -= buf.capacity();
                buf
            }
            None => BytesMut::with_capacity(Self::FRESH),
        }
    }

    /// Takes a written segment's bytes back, when nothing else holds them
    /// and the budget has room.
    pub fn give(&self, bytes: Bytes) {
        if let Ok(mut buf) = bytes.try_into_mut() {
            buf.clear();
            let mut inner = self.lock();
            if inner.held + buf.capacity() <= inner.budget {
                inner.held += buf.capacity();
                inner.buffers.push(buf);
            }
        }
    }

    /// Bytes of capacity held for reuse.
    pub fn held(&self) -> usize {
        self.lock().held
    }
}

/// Rows and dead letters being gathered for a lane's next batch.
#[derive(Debug, Default)]
pub struct Gathered {
    pub segments: Vec<Segment>,
    lookup: HashMap<(usize, i64, i64), usize>,
    pub dead_letters: Vec<DeadLetter>,
    pub rows: usize,
    /// Where segment buffers come from (fresh ones without a pool).
    pub pool: Option<BufferPool>,
}

impl Gathered {
    /// An empty gathering whose segments take their buffers from `pool`.
    pub fn with_pool(pool: BufferPool) -> Self {
        Gathered {
            pool: Some(pool),
            ..Gathered::default()
        }
    }

    /// The segment for `source` and range `[lo, hi)`, created when missing.
    pub fn segment(&mut self, source: usize, table: usize, lo: i64, hi: i64) -> &mut Segment {
        let index = *self.lookup.entry((source, lo, hi)).or_insert_with(|| {
            let mut segment = Segment::new(source, table, lo, hi);
            if let Some(pool) = &self.pool {
                segment.buf = pool.take();
            }
            self.segments.push(segment);
            self.segments.len() - 1
        });
        &mut self.segments[index]
    }

    /// Encoded bytes so far.
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|s| s.buf.len()).sum()
    }
}

/// A lane's batch, cut and on its way to the writer.
#[derive(Debug)]
pub struct Batch {
    pub topic: Arc<str>,
    pub partition: i32,
    /// Assignment epoch of the lane that cut it: a batch from an older epoch
    /// is never written after the lane was reset.
    pub epoch: u64,
    /// The stored `next_offset` this batch continues from; `None` when the
    /// partition has no stored offset yet. The commit is conditional on it.
    pub prev: Option<i64>,
    /// The `next_offset` stored when this batch commits: its last offset + 1.
    pub next: i64,
    pub segments: Vec<Sealed>,
    pub dead_letters: Vec<DeadLetter>,
    /// The events, kept for dead letters found while writing.
    pub messages: Vec<Event>,
    pub rows: usize,
    /// Bytes charged to the in-flight budget, released when the batch is done.
    pub charged_bytes: usize,
    /// When the oldest message of the batch was taken in.
    pub started: Instant,
}

impl Batch {
    /// Offsets `[first, next)` covered by the batch, for logs.
    pub fn first_offset(&self) -> i64 {
        self.messages.first().map_or(self.next, |m| m.offset)
    }
}

/// Zero-copy view of a segment as a complete COPY stream: header, the rows
/// in `rows`, trailer.
pub fn copy_chunks(buf: &Bytes, ranges: &[std::ops::Range<usize>]) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(ranges.len() + 2);
    chunks.push(Bytes::from_static(crate::encode::COPY_HEADER));
    for range in ranges {
        if !range.is_empty() {
            chunks.push(buf.slice(range.clone()));
        }
    }
    chunks.push(Bytes::from_static(crate::encode::COPY_TRAILER));
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_pool_reuses_buffers_within_its_budget() {
        let pool = BufferPool::new(3 * 1024 * 1024);
        let mut big = pool.take();
        big.extend_from_slice(&vec![7u8; 2 * 1024 * 1024]);
        let big_capacity = big.capacity();
        pool.give(big.freeze());
        assert_eq!(pool.held(), big_capacity);

        // A second big buffer would exceed the budget: it is dropped.
        let mut other = BytesMut::with_capacity(2 * 1024 * 1024);
        other.extend_from_slice(&[1]);
        pool.give(other.freeze());
        assert_eq!(pool.held(), big_capacity);

        // Reuse hands the big buffer back empty, and the pool is empty.
        let reused = pool.take();
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), big_capacity);
        assert_eq!(pool.held(), 0);

        // Bytes still shared elsewhere are not taken back.
        let shared = Bytes::from(vec![1u8; 16]);
        let _clone = shared.clone();
        pool.give(shared);
        assert_eq!(pool.held(), 0);
    }
}
