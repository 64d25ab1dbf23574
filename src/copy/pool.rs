//! Segment buffers reused across batches of one writer.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::segment::RowMeta;
use crate::event::Event;

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
    /// Event vectors of written batches, emptied (their capacity counts in
    /// `held` too).
    messages: Vec<Vec<Event>>,
    /// Capacity of `buffers`, `rows` and `messages`, summed, in bytes.
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

    /// An empty row index with room for `expected` rows: the smallest
    /// held that has it, else a fresh one of that size. Expecting none
    /// takes the largest held.
    pub fn take_rows(&self, expected: usize) -> Vec<RowMeta> {
        let mut inner = self.lock();
        let fits = if expected == 0 {
            inner.rows.len().checked_sub(1)
        } else {
            let at = inner
                .rows
                .partition_point(|held| held.capacity() < expected);
            (at < inner.rows.len()).then_some(at)
        };
        match fits {
            Some(at) => {
                let rows = inner.rows.remove(at);
                inner.held -= rows_bytes(&rows);
                rows
            }
            None => Vec::with_capacity(expected),
        }
    }

    /// An empty event vector with room for `capacity` events: one a
    /// written batch gave back, when it is that large, else a fresh one. A
    /// batch's vector is about a megabyte and a half of events (12,000 of
    /// the bench's webhooks); allocated afresh for every batch, it was
    /// faulted in page by page, and regrown when the batch outgrew the one
    /// before (2.1% of weir's CPU samples in a 1-writer drain).
    pub fn take_messages(&self, capacity: usize) -> Vec<Event> {
        let mut inner = self.lock();
        if let Some(messages) = inner.messages.pop() {
            inner.held -= messages_bytes(&messages);
            if messages.capacity() >= capacity {
                return messages;
            }
        }
        Vec::with_capacity(capacity)
    }

    /// Takes a written batch's event vector back, its events dropped, when
    /// the budget has room.
    pub fn give_messages(&self, mut messages: Vec<Event>) {
        // Dropping the events releases their views of the consumer's
        // arena, before the lock is taken.
        messages.clear();
        let mut inner = self.lock();
        if inner.held + messages_bytes(&messages) <= inner.budget {
            inner.held += messages_bytes(&messages);
            inner.messages.push(messages);
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

fn messages_bytes(messages: &Vec<Event>) -> usize {
    messages.capacity() * std::mem::size_of::<Event>()
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
    fn event_vectors_are_reused_emptied_when_large_enough_and_within_the_budget() {
        let event = || Event {
            topic: std::sync::Arc::from("t"),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            headers: Default::default(),
            payload: Bytes::from(b"{}".to_vec()),
        };
        let size = std::mem::size_of::<Event>();
        let pool = BufferPool::new(1000 * size);
        let mut messages = pool.take_messages(100);
        assert!(messages.capacity() >= 100);
        messages.resize_with(100, event);
        let (ptr, capacity) = (messages.as_ptr(), messages.capacity());
        let payload = messages[0].payload.clone();
        pool.give_messages(messages);
        assert_eq!(pool.held(), capacity * size);
        // The events themselves are dropped on the way in.
        assert!(payload.is_unique());

        // Handed back empty, with its capacity, to a batch it can hold.
        let reused = pool.take_messages(capacity);
        assert!(reused.is_empty());
        assert_eq!(reused.as_ptr(), ptr);
        assert_eq!(pool.held(), 0);

        // Too small for the batch: dropped, and a fresh one handed out.
        pool.give_messages(reused);
        let bigger = pool.take_messages(capacity + 1);
        assert!(bigger.capacity() > capacity);
        assert_eq!(pool.held(), 0);

        // Past the budget, a vector is dropped.
        pool.give_messages(Vec::with_capacity(2000));
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
        let mut rows = pool.take_rows(0);
        rows.resize(1000, row);
        let capacity = rows.capacity();
        let ptr = rows.as_ptr();
        pool.give_rows(rows);
        assert_eq!(pool.held(), capacity * std::mem::size_of::<RowMeta>());

        // Handed back empty, with its capacity.
        let reused = pool.take_rows(0);
        assert!(reused.is_empty());
        assert_eq!(reused.as_ptr(), ptr);
        assert_eq!(pool.held(), 0);

        // A segment expecting rows gets the smallest index that holds them,
        // or a fresh one with room for them all.
        let small = Vec::with_capacity(100);
        let (small_ptr, reused_ptr) = (small.as_ptr(), reused.as_ptr());
        pool.give_rows(small);
        pool.give_rows(reused);
        let fresh = pool.take_rows(capacity + 1);
        assert!(fresh.capacity() > capacity);
        let (fits_50, fits_500) = (pool.take_rows(50), pool.take_rows(500));
        assert_eq!(fits_50.as_ptr(), small_ptr);
        assert_eq!(fits_500.as_ptr(), reused_ptr);
        assert_eq!(pool.held(), 0);

        // Past the budget, an index is dropped.
        let mut huge = Vec::new();
        huge.resize(10_000, row);
        pool.give_rows(huge);
        assert_eq!(pool.held(), 0);
    }
}
