//! What decoding produces for a lane's next batch: encoded rows grouped
//! into segments, and dead letters.

use std::collections::HashMap;

use crate::copy::pool::BufferPool;
use crate::copy::segment::Segment;
use crate::event::DeadLetter;

/// Rows and dead letters being gathered for a lane's next batch.
#[derive(Debug, Default)]
pub struct Gathered {
    pub segments: Vec<Segment>,
    /// Segment index by (source, partition range). Looked up for every row,
    /// so hashed with foldhash (seeded per process) instead of SipHash,
    /// which was 12M of a 20K-row drain's instructions.
    lookup: HashMap<(usize, i64, i64), usize, foldhash::fast::RandomState>,
    pub dead_letters: Vec<DeadLetter>,
    pub rows: usize,
    /// Where segment buffers come from (fresh ones without a pool).
    pub pool: Option<BufferPool>,
    /// The most rows a segment of this key has held, over the lane's
    /// batches up to the previous one (a key the previous batch lacked is
    /// forgotten): the room a new segment's row index is given, so that it
    /// does not regrow while the batch gathers (its growth was 1.3% of
    /// weir's CPU samples in a 1-writer drain, where batch sizes vary).
    expected: HashMap<(usize, i64, i64), usize, foldhash::fast::RandomState>,
}

impl Gathered {
    /// An empty gathering whose segments take their buffers from `pool`.
    pub fn with_pool(pool: BufferPool) -> Self {
        Gathered {
            pool: Some(pool),
            ..Gathered::default()
        }
    }

    /// An empty gathering for the lane's next batch: the same pool, and
    /// its segments' row indexes sized from this one's and those before.
    pub fn following(&self) -> Self {
        let mut next = Gathered {
            pool: self.pool.clone(),
            ..Gathered::default()
        };
        next.expected
            .extend(self.lookup.iter().map(|(key, &index)| {
                let before = self.expected.get(key).copied().unwrap_or(0);
                (*key, self.segments[index].rows.len().max(before))
            }));
        next
    }

    /// The segment for `source` and range `[lo, hi)`, created when missing.
    pub fn segment(&mut self, source: usize, table: usize, lo: i64, hi: i64) -> &mut Segment {
        let key = (source, lo, hi);
        let index = *self.lookup.entry(key).or_insert_with(|| {
            let expected = self.expected.get(&key).copied().unwrap_or(0);
            let rows = self.pool.as_ref().map(|pool| pool.take_rows(expected));
            self.segments.push(Segment::new(
                source,
                table,
                lo,
                hi,
                rows.unwrap_or_else(|| Vec::with_capacity(expected)),
                self.pool.clone(),
            ));
            self.segments.len() - 1
        });
        &mut self.segments[index]
    }

    /// Encoded bytes so far.
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(Segment::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::segment::RowMeta;

    #[test]
    fn the_next_batch_gives_each_segment_room_for_the_rows_it_had() {
        let pool = BufferPool::new(1 << 20);
        let mut gathered = Gathered::with_pool(pool.clone());
        let row = RowMeta {
            start: 0,
            time: 0,
            message: 0,
            item: 0,
        };
        gathered.segment(0, 0, 0, 10).rows.resize(3_000, row);
        gathered.segment(1, 1, 0, 10).rows.resize(40, row);

        let mut next = gathered.following();
        assert!(next.segments.is_empty());
        assert!(next.segment(0, 0, 0, 10).rows.capacity() >= 3_000);
        assert!(next.segment(1, 1, 0, 10).rows.capacity() >= 40);
        // A segment the previous batch did not have starts small.
        assert_eq!(next.segment(0, 0, 10, 20).rows.capacity(), 0);
        assert!(next.pool.is_some());

        // A smaller batch after it: the room stays the most seen.
        next.segment(0, 0, 0, 10).rows.resize(10, row);
        let mut third = next.following();
        assert!(third.segment(0, 0, 0, 10).rows.capacity() >= 3_000);
    }
}
