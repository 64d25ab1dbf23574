//! Encoded rows on their way into COPY: segments (the rows of one column
//! list for one partition range, already in binary COPY format), and the
//! streaming of chosen rows of a segment through `COPY ... FROM STDIN`
//! without copying them.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use futures::SinkExt;
use tokio_postgres::{Statement, Transaction};

use super::{COPY_HEADER, COPY_TRAILER};

/// Largest CopyData message sent at once.
const COPY_CHUNK_BYTES: usize = 256 * 1024;

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
    /// A segment writing into `buf` and `rows` (both empty).
    pub fn new(
        source: usize,
        table: usize,
        lo: i64,
        hi: i64,
        buf: BytesMut,
        rows: Vec<RowMeta>,
    ) -> Self {
        Segment {
            source,
            table,
            lo,
            hi,
            buf,
            rows,
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

/// Zero-copy view of a segment as a complete COPY stream: header, the rows
/// in `rows`, trailer.
pub fn copy_chunks(buf: &Bytes, ranges: &[std::ops::Range<usize>]) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(ranges.len() + 2);
    chunks.push(Bytes::from_static(COPY_HEADER));
    for range in ranges {
        if !range.is_empty() {
            chunks.push(buf.slice(range.clone()));
        }
    }
    chunks.push(Bytes::from_static(COPY_TRAILER));
    chunks
}

/// Byte ranges of `rows` (consecutive rows merged).
fn row_ranges(segment: &Sealed, rows: &[usize]) -> Vec<Range<usize>> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for &row in rows {
        let range = segment.row_range(row);
        match ranges.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => ranges.push(range),
        }
    }
    ranges
}

/// COPYs `rows` of `segment` (by index) with `statement`, without copying
/// their bytes.
pub async fn copy_rows(
    transaction: &Transaction<'_>,
    statement: &Statement,
    segment: &Sealed,
    rows: &[usize],
) -> Result<u64, tokio_postgres::Error> {
    let ranges = row_ranges(segment, rows);
    send_copy(transaction, statement, copy_chunks(&segment.buf, &ranges)).await
}

/// Streams `chunks` through `COPY ... FROM STDIN` and finishes it.
pub async fn send_copy(
    transaction: &Transaction<'_>,
    statement: &Statement,
    chunks: Vec<Bytes>,
) -> Result<u64, tokio_postgres::Error> {
    let sink = transaction.copy_in::<_, Bytes>(statement).await?;
    futures::pin_mut!(sink);
    for chunk in chunks {
        let mut chunk = chunk;
        while chunk.len() > COPY_CHUNK_BYTES {
            let head = chunk.split_to(COPY_CHUNK_BYTES);
            sink.feed(head).await?;
        }
        sink.feed(chunk).await?;
    }
    sink.as_mut().finish().await
}
