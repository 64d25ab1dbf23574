//! Segment buffers reused across batches of one writer.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::segment::RowMeta;

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
    /// Row indexes of written segments, emptied (their capacity counts in
    /// `held` too).
    rows: Vec<Vec<RowMeta>>,
    /// Capacity of `buffers` and `rows`, summed, in bytes.
    held: usize,
    budget: usize,
}

impl BufferPool {
    /// Capacity of a fresh buffer.
    pub const FRESH: usize = 256 * 1024;

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

    /// The largest buffer held, or a fresh one. Segments fill chunks of
    /// [`BufferPool::FRESH`] bytes; a chunk grown for one wide row is
    /// handed out first, so its extra room is used rather than held.
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

    /// An empty row index, the largest held, or a fresh one.
    pub fn take_rows(&self) -> Vec<RowMeta> {
        let mut inner = self.lock();
        match inner.rows.pop() {
            Some(rows) => {
                inner.held -= rows_bytes(&rows);
                rows
            }
            None => Vec::new(),
        }
    }

    /// Takes a written segment's row index back, when the budget has room.
    pub fn give_rows(&self, mut rows: Vec<RowMeta>) {
        rows.clear();
        let mut inner = self.lock();
        if inner.held + rows_bytes(&rows) <= inner.budget {
            inner.held += rows_bytes(&rows);
            let at = inner
                .rows
                .partition_point(|held| held.capacity() <= rows.capacity());
            inner.rows.insert(at, rows);
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
                // Kept in order of capacity: `take` hands out the largest.
                let at = inner
                    .buffers
                    .partition_point(|held| held.capacity() <= buf.capacity());
                inner.buffers.insert(at, buf);
            }
        }
    }

    /// Bytes of capacity held for reuse.
    pub fn held(&self) -> usize {
        self.lock().held
    }
}

fn rows_bytes(rows: &Vec<RowMeta>) -> usize {
    rows.capacity() * std::mem::size_of::<RowMeta>()
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

    #[test]
    fn the_largest_buffer_is_handed_out_first() {
        let pool = BufferPool::new(16 * 1024 * 1024);
        for size in [512 * 1024, 4 * 1024 * 1024, 1024 * 1024] {
            let mut buf = BytesMut::with_capacity(size);
            buf.extend_from_slice(&[1]);
            pool.give(buf.freeze());
        }
        let capacities: Vec<usize> = (0..3).map(|_| pool.take().capacity()).collect();
        assert!(capacities[0] >= 4 * 1024 * 1024, "{capacities:?}");
        assert!(capacities[1] >= 1024 * 1024 && capacities[1] < 4 * 1024 * 1024);
        assert!(capacities[2] < 1024 * 1024);
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn row_indexes_are_reused_within_the_same_budget() {
        let row = RowMeta {
            start: 0,
            time: 0,
            message: 0,
            item: 0,
        };
        let pool = BufferPool::new(64 * 1024);
        let mut rows = pool.take_rows();
        rows.resize(1000, row);
        let capacity = rows.capacity();
        let ptr = rows.as_ptr();
        pool.give_rows(rows);
        assert_eq!(pool.held(), capacity * std::mem::size_of::<RowMeta>());

        // Handed back empty, with its capacity.
        let reused = pool.take_rows();
        assert!(reused.is_empty());
        assert_eq!(reused.as_ptr(), ptr);
        assert_eq!(pool.held(), 0);

        // Past the budget, an index is dropped.
        let mut huge = Vec::new();
        huge.resize(10_000, row);
        pool.give_rows(huge);
        assert_eq!(pool.held(), 0);
    }
}
