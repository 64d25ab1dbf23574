//! Encoded rows on their way into COPY: segments (the rows of one column
//! list for one partition range, already in binary COPY format), and the
//! streaming of chosen rows of a segment through `COPY ... FROM STDIN`
//! without copying them.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use futures::SinkExt;
use tokio_postgres::{Statement, Transaction};

use super::pool::BufferPool;
use super::{COPY_HEADER, COPY_TRAILER};

/// Largest CopyData message sent at once.
const COPY_CHUNK_BYTES: usize = 256 * 1024;

/// Where a row came from and where it lies in its segment.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta {
    /// Byte offset of the row in the segment (over all its chunks).
    pub start: u32,
    /// Event time, Unix microseconds (to route the row again if needed).
    pub time: i64,
    /// Index of the event in the batch's `messages`.
    pub message: u32,
    /// Position of the item among the event's items for this table.
    pub item: u32,
}

/// Room a chunk must have left for the next row to begin in it: the
/// widest row of the segment so far, within these bounds. A row wider than
/// the room left grows its chunk (a copy); a chunk handed on with room left
/// wastes that room.
const MIN_ROW_ROOM: usize = 4 * 1024;
const MAX_ROW_ROOM: usize = 64 * 1024;

/// Rows of one source (one COPY column list) for one partition range,
/// encoded into chunks of about [`BufferPool::FRESH`] bytes.
///
/// One growing buffer per segment was copied whole at every doubling (a
/// 4 MiB segment: 4 MiB copied, into freshly faulted pages): 4.2% of
/// weir's samples in a 1-writer drain. Chunks of one size are never
/// copied and are reused whole from the pool. A row never straddles two
/// chunks, so each row is one slice.
#[derive(Debug)]
pub struct Segment {
    pub source: usize,
    pub table: usize,
    /// Partition range `[lo, hi)`, Unix microseconds.
    pub lo: i64,
    pub hi: i64,
    /// Full chunks, in order.
    full: Vec<Bytes>,
    /// Bytes in `full`.
    full_len: usize,
    /// The chunk rows are encoded into now, without the COPY header and
    /// trailer.
    pub buf: BytesMut,
    pub rows: Vec<RowMeta>,
    /// The widest row so far.
    widest: usize,
    /// Where fresh chunks come from (new allocations without a pool).
    pool: Option<BufferPool>,
}

impl Segment {
    /// A segment writing into `rows` (empty), its chunks taken from `pool`.
    pub fn new(
        source: usize,
        table: usize,
        lo: i64,
        hi: i64,
        rows: Vec<RowMeta>,
        pool: Option<BufferPool>,
    ) -> Self {
        Segment {
            source,
            table,
            lo,
            hi,
            full: Vec::new(),
            full_len: 0,
            buf: fresh_chunk(pool.as_ref()),
            rows,
            widest: 0,
            pool,
        }
    }

    /// Encoded bytes, over all chunks.
    pub fn len(&self) -> usize {
        self.full_len + self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for a row about to be encoded into [`Segment::buf`]; its
    /// offset in the segment. A chunk without room for a row as wide as the
    /// widest yet is handed on, and the row begins a fresh one.
    pub fn begin_row(&mut self) -> usize {
        let room = self.widest.clamp(MIN_ROW_ROOM, MAX_ROW_ROOM);
        if !self.buf.is_empty() && self.buf.capacity() - self.buf.len() < room {
            let next = fresh_chunk(self.pool.as_ref());
            let full = std::mem::replace(&mut self.buf, next);
            self.full_len += full.len();
            self.full.push(full.freeze());
        }
        self.len()
    }

    /// Ends the row begun at `start` by [`Segment::begin_row`]: kept, or
    /// (not `keep`) its bytes dropped again.
    pub fn end_row(&mut self, start: usize, keep: bool) {
        let local = start - self.full_len;
        if keep {
            self.widest = self.widest.max(self.buf.len() - local);
        } else {
            self.buf.truncate(local);
        }
    }

    /// All encoded bytes in one piece (a copy; for checks and tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.len());
        for chunk in &self.full {
            all.extend_from_slice(chunk);
        }
        all.extend_from_slice(&self.buf);
        all
    }

    /// Freezes the rows for writing.
    pub fn seal(mut self) -> Sealed {
        if !self.buf.is_empty() || self.full.is_empty() {
            self.full.push(self.buf.freeze());
        }
        let mut end = 0;
        let ends = self
            .full
            .iter()
            .map(|chunk| {
                end += chunk.len();
                end
            })
            .collect();
        Sealed {
            source: self.source,
            table: self.table,
            lo: self.lo,
            hi: self.hi,
            chunks: self.full,
            ends,
            rows: self.rows,
        }
    }
}

fn fresh_chunk(pool: Option<&BufferPool>) -> BytesMut {
    match pool {
        Some(pool) => pool.take(),
        None => BytesMut::with_capacity(BufferPool::FRESH),
    }
}

/// A segment of a cut batch: immutable, shareable without copying.
#[derive(Debug)]
pub struct Sealed {
    pub source: usize,
    pub table: usize,
    pub lo: i64,
    pub hi: i64,
    chunks: Vec<Bytes>,
    /// Where each chunk ends in the segment.
    ends: Vec<usize>,
    pub rows: Vec<RowMeta>,
}

impl Sealed {
    /// Encoded bytes, over all chunks.
    pub fn len(&self) -> usize {
        self.ends.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Byte range of row `i` in the segment.
    pub fn row_range(&self, i: usize) -> Range<usize> {
        let start = self.rows[i].start as usize;
        let end = self
            .rows
            .get(i + 1)
            .map_or(self.len(), |next| next.start as usize);
        start..end
    }

    /// The bytes of row `i` (rows never straddle chunks).
    pub fn row(&self, i: usize) -> &[u8] {
        let range = self.row_range(i);
        let (chunk, base) = self.chunk_at(range.start);
        &self.chunks[chunk][range.start - base..range.end - base]
    }

    /// The chunk holding byte `offset` of the segment, and where it begins.
    fn chunk_at(&self, offset: usize) -> (usize, usize) {
        let chunk = self.ends.partition_point(|end| *end <= offset);
        let base = self
            .ends
            .get(chunk)
            .map_or(0, |end| end - self.chunks[chunk].len());
        (chunk, base)
    }

    /// The bytes of `range` of the segment, as slices of its chunks (no
    /// copy), in order.
    pub fn slices(&self, range: Range<usize>) -> impl Iterator<Item = Bytes> + '_ {
        let (first, _) = self.chunk_at(range.start);
        self.chunks[first..]
            .iter()
            .zip(&self.ends[first..])
            .map_while(move |(chunk, end)| {
                let base = end - chunk.len();
                (base < range.end)
                    .then(|| chunk.slice(range.start.max(base) - base..range.end.min(*end) - base))
            })
    }

    /// A complete COPY stream of the rows in `ranges`: header, their bytes
    /// (no copy), trailer.
    pub fn copy_stream(&self, ranges: &[Range<usize>]) -> Vec<Bytes> {
        copy_stream(ranges.iter().flat_map(|range| self.slices(range.clone())))
    }

    /// The chunks and the row index, for reuse once written.
    pub fn into_parts(self) -> (Vec<Bytes>, Vec<RowMeta>) {
        (self.chunks, self.rows)
    }
}

/// A complete COPY stream: the header, `rows` (encoded rows, not copied),
/// the trailer.
pub fn copy_stream(rows: impl Iterator<Item = Bytes>) -> Vec<Bytes> {
    let mut chunks = vec![Bytes::from_static(COPY_HEADER)];
    chunks.extend(rows.filter(|rows| !rows.is_empty()));
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
    send_copy(transaction, statement, segment.copy_stream(&ranges)).await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes rows of the given widths (each filled with its index), the
    /// way the decoder does; the segment and every row's bytes.
    fn encode(widths: &[usize], fail: &[usize]) -> (Segment, Vec<Vec<u8>>) {
        let mut segment = Segment::new(0, 0, 0, 1, Vec::new(), None);
        let mut kept = Vec::new();
        for (i, width) in widths.iter().enumerate() {
            let start = segment.begin_row();
            let row = vec![i as u8; *width];
            segment.buf.extend_from_slice(&row);
            let keep = !fail.contains(&i);
            segment.end_row(start, keep);
            if keep {
                segment.rows.push(RowMeta {
                    start: start as u32,
                    time: 0,
                    message: i as u32,
                    item: 0,
                });
                kept.push(row);
            }
        }
        (segment, kept)
    }

    #[test]
    fn rows_fill_chunks_of_one_size_and_never_straddle_them() {
        let widths: Vec<usize> = (0..3000).map(|i| 200 + (i * 37) % 900).collect();
        let (segment, rows) = encode(&widths, &[]);
        let all: Vec<u8> = rows.concat();
        assert_eq!(segment.to_vec(), all);
        let sealed = segment.seal();
        // About 1.6 MB in 256 KiB chunks: none grew, none was copied.
        assert!(sealed.chunks.len() >= 6, "{} chunks", sealed.chunks.len());
        for chunk in &sealed.chunks {
            assert!(
                chunk.len() <= BufferPool::FRESH,
                "a chunk grew to {}",
                chunk.len()
            );
        }
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(sealed.row(i), &row[..], "row {i}");
            assert_eq!(sealed.row_range(i).len(), row.len());
        }
        // Any range, across chunk ends, reads back as the flat bytes.
        for (start, end) in [
            (0, all.len()),
            (1, 300_000),
            (262_000, 263_000),
            (500_000, 1_200_003),
        ] {
            let got: Vec<u8> = sealed.slices(start..end).flat_map(|s| s.to_vec()).collect();
            assert_eq!(got, all[start..end], "{start}..{end}");
        }
        let stream: Vec<u8> = sealed
            .copy_stream(std::slice::from_ref(&(0..sealed.len())))
            .iter()
            .flat_map(|chunk| chunk.to_vec())
            .collect();
        assert_eq!(stream, [COPY_HEADER, &all, COPY_TRAILER].concat());
    }

    #[test]
    fn a_refused_row_leaves_nothing_and_a_wide_row_grows_only_its_chunk() {
        let mut widths = vec![1000; 300];
        widths[100] = 700_000;
        let (segment, rows) = encode(&widths, &[5, 101]);
        assert_eq!(rows.len(), 298);
        assert_eq!(segment.to_vec(), rows.concat());
        let sealed = segment.seal();
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(sealed.row(i), &row[..], "row {i}");
        }
        assert_eq!(
            sealed
                .chunks
                .iter()
                .filter(|c| c.len() > BufferPool::FRESH)
                .count(),
            1,
            "only the wide row's chunk grew"
        );
    }
}
