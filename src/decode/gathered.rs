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
            let rows = self.pool.as_ref().map(BufferPool::take_rows);
            self.segments.push(Segment::new(
                source,
                table,
                lo,
                hi,
                rows.unwrap_or_default(),
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
