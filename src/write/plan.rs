//! Planning a batch's writes: every segment (rows of one range of one
//! table) mapped to the leaf partition that holds the range, created when
//! missing. Partitions are made before the batch's transaction opens, in
//! short transactions of their own (see `store::partition`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::copy::segment::Sealed;
use crate::store::partition::{Leaf, ManagedTable, PartitionError};
use crate::write::failure::Failure;

/// Rows of one segment bound for one leaf partition.
pub(crate) struct Part {
    pub leaf: Leaf,
    /// Index of the segment in its batch.
    pub segment: usize,
    /// Row indices within the segment.
    pub rows: Vec<usize>,
}

/// Maps every row of every segment to an existing leaf partition,
/// creating missing ones. `tables` are the partition managers by table
/// index.
pub(crate) async fn plan(
    client: &mut Client,
    tables: &[Arc<ManagedTable>],
    segments: &[Sealed],
    lock_timeout: Duration,
) -> Result<Vec<Part>, Failure> {
    let mut parts = Vec::new();
    for (segment_index, segment) in segments.iter().enumerate() {
        let table = &tables[segment.table];
        let mut pending: Vec<(i64, i64, Vec<usize>)> =
            vec![(segment.lo, segment.hi, (0..segment.rows.len()).collect())];
        let mut rounds = 0;
        while let Some((lo, hi, rows)) = pending.pop() {
            rounds += 1;
            if rounds > 64 {
                return Err(Failure::Schema(format!(
                    "cannot find or create partitions of {} for the batch's rows",
                    table.qualified()
                )));
            }
            match table.ensure(client, lo, hi, lock_timeout).await {
                Ok((leaf, _)) => parts.push(Part {
                    leaf,
                    segment: segment_index,
                    rows,
                }),
                Err(PartitionError::Overlap) => {
                    // Someone made a partition with other bounds: route
                    // these rows again against the fresh set.
                    let set = table.snapshot();
                    let mut regrouped: HashMap<(i64, i64), Vec<usize>> = HashMap::new();
                    for row in rows {
                        let range = set.route(table.granularity, segment.rows[row].time);
                        regrouped.entry(range).or_default().push(row);
                    }
                    pending.extend(regrouped.into_iter().map(|((lo, hi), rows)| (lo, hi, rows)));
                }
                Err(err) => return Err(Failure::from_partition(err, &table.qualified(), lo, hi)),
            }
        }
    }
    Ok(parts)
}

/// The dead-letter partition for the instant `at`, created when missing.
pub(crate) async fn dead_letter_leaf(
    client: &mut Client,
    table: &ManagedTable,
    at: i64,
    lock_timeout: Duration,
) -> Result<Leaf, Failure> {
    let (lo, hi) = table.snapshot().route(table.granularity, at);
    table
        .ensure(client, lo, hi, lock_timeout)
        .await
        .map(|(leaf, _)| leaf)
        .map_err(|err| Failure::from_partition(err, &table.qualified(), lo, hi))
}
