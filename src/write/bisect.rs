//! Bisection: finding the rows PostgreSQL refuses, one COPY at a time.
//!
//! A set of rows is copied under a savepoint; when PostgreSQL refuses it
//! for a row-level reason, the savepoint is rolled back and the set split
//! in two, recursively, until each bad row is alone and refused on its
//! own. A row is only ever declared bad by its own failed COPY, so good
//! rows are never dead-lettered for a neighbour's fault.

use tokio_postgres::Transaction;

use crate::copy::segment::Sealed;
use crate::store::db::{self, ErrorClass};
use crate::write::failure::Failure;
use crate::write::session::{Sink, write_rows};

/// What is known about a set of rows before it is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// Nothing: try the set whole first.
    None,
    /// The set holds a bad row (its sibling half was clean, and the whole
    /// failed): trying it whole would only fail again, so split at once.
    HoldsBadRow,
}

/// What one try of a set of rows came to.
pub enum Tried<E> {
    /// Written; the table gained this many rows.
    Written(u64),
    /// Refused for a row-level reason, and rolled back.
    Refused(E),
}

/// One try of a set of rows, all or nothing.
pub trait TryRows {
    type Refusal;
    async fn try_rows(&mut self, rows: &[usize]) -> Result<Tried<Self::Refusal>, Failure>;
}

/// What isolating found and did.
#[derive(Debug)]
pub struct Isolated<E> {
    /// Refused rows (index in the segment) with the refusal.
    pub bad: Vec<(usize, E)>,
    /// Tries issued.
    pub copies: u64,
    /// Rows the table gained.
    pub inserted: u64,
}

impl<E> Default for Isolated<E> {
    fn default() -> Self {
        Isolated {
            bad: Vec::new(),
            copies: 0,
            inserted: 0,
        }
    }
}

/// Tries `rows` and splits on refusal until every bad row is isolated (see
/// the module doc); good rows stay written.
pub async fn isolate<T: TryRows>(
    target: &mut T,
    rows: &[usize],
    suspicion: Suspicion,
    found: &mut Isolated<T::Refusal>,
) -> Result<(), Failure> {
    if rows.is_empty() {
        return Ok(());
    }
    if suspicion == Suspicion::None || rows.len() == 1 {
        found.copies += 1;
        match target.try_rows(rows).await? {
            Tried::Written(inserted) => {
                found.inserted += inserted;
                return Ok(());
            }
            Tried::Refused(refusal) => {
                if rows.len() == 1 {
                    found.bad.push((rows[0], refusal));
                    return Ok(());
                }
            }
        }
    }
    let (left, right) = split(rows);
    let bad_before = found.bad.len();
    Box::pin(isolate(target, left, Suspicion::None, found)).await?;
    // The whole set failed: if the left half was clean, the right half holds
    // the bad row, and trying it whole would only fail again.
    let right_suspicion = if found.bad.len() == bad_before {
        Suspicion::HoldsBadRow
    } else {
        Suspicion::None
    };
    Box::pin(isolate(target, right, right_suspicion, found)).await
}

/// The two halves a refused set is split into (the left one the smaller
/// when the count is odd).
fn split(rows: &[usize]) -> (&[usize], &[usize]) {
    rows.split_at(rows.len() / 2)
}

/// Rows of one segment written through a sink, each try under a savepoint
/// of the batch's transaction.
pub struct SavepointCopy<'a, 't> {
    pub transaction: &'a Transaction<'t>,
    pub sink: &'a Sink,
    pub segment: &'a Sealed,
}

impl TryRows for SavepointCopy<'_, '_> {
    type Refusal = tokio_postgres::Error;

    async fn try_rows(&mut self, rows: &[usize]) -> Result<Tried<Self::Refusal>, Failure> {
        let transaction = self.transaction;
        transaction
            .batch_execute("SAVEPOINT weir_rows")
            .await
            .map_err(|err| Failure::from_db(&err))?;
        match write_rows(transaction, self.sink, self.segment, rows).await {
            Ok(inserted) => {
                transaction
                    .batch_execute("RELEASE SAVEPOINT weir_rows")
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                Ok(Tried::Written(inserted))
            }
            Err(err) if db::classify(&err) == ErrorClass::Row => {
                transaction
                    .batch_execute("ROLLBACK TO SAVEPOINT weir_rows; RELEASE SAVEPOINT weir_rows")
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                Ok(Tried::Refused(err))
            }
            Err(err) => Err(Failure::from_db(&err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table that refuses any set holding one of `bad`.
    struct Refusing {
        bad: Vec<usize>,
        tried: Vec<Vec<usize>>,
    }

    impl TryRows for Refusing {
        type Refusal = usize;

        async fn try_rows(&mut self, rows: &[usize]) -> Result<Tried<usize>, Failure> {
            self.tried.push(rows.to_vec());
            Ok(match rows.iter().find(|row| self.bad.contains(row)) {
                Some(&row) => Tried::Refused(row),
                None => Tried::Written(rows.len() as u64),
            })
        }
    }

    async fn bisect(rows: usize, bad: &[usize]) -> (Refusing, Isolated<usize>) {
        let mut table = Refusing {
            bad: bad.to_vec(),
            tried: Vec::new(),
        };
        let mut found = Isolated::default();
        let rows: Vec<usize> = (0..rows).collect();
        isolate(&mut table, &rows, Suspicion::None, &mut found)
            .await
            .expect("the fake table never fails otherwise");
        (table, found)
    }

    #[test]
    fn halves_split_at_the_middle() {
        assert_eq!(split(&[1, 2, 3, 4]), (&[1, 2][..], &[3, 4][..]));
        assert_eq!(split(&[1, 2, 3]), (&[1][..], &[2, 3][..]));
        assert_eq!(split(&[7]), (&[][..], &[7][..]));
    }

    #[tokio::test]
    async fn a_clean_set_costs_one_copy() {
        let (table, found) = bisect(1000, &[]).await;
        assert_eq!(table.tried.len(), 1);
        assert_eq!((found.copies, found.inserted), (1, 1000));
        assert!(found.bad.is_empty());
    }

    #[tokio::test]
    async fn one_bad_row_is_found_in_about_two_copies_per_halving() {
        for bad in [0, 1, 511, 512, 1023] {
            let (_, found) = bisect(1024, &[bad]).await;
            let blamed: Vec<usize> = found.bad.iter().map(|(row, _)| *row).collect();
            assert_eq!(blamed, vec![bad]);
            assert_eq!(found.inserted, 1023, "every other row is written");
            // The whole set, then per level at most the left half and the
            // right half: 10 levels for 1024 rows.
            assert!(
                found.copies <= 1 + 2 * 10,
                "{} copies for row {bad}",
                found.copies
            );
        }
    }

    #[tokio::test]
    async fn every_bad_row_is_found_and_no_good_row_is_blamed() {
        let bad = [3, 4, 150, 299];
        let (_, found) = bisect(300, &bad).await;
        let blamed: Vec<usize> = found.bad.iter().map(|(row, _)| *row).collect();
        assert_eq!(blamed, bad.to_vec());
        assert_eq!(found.inserted, 296);
    }

    #[tokio::test]
    async fn a_half_known_to_hold_the_bad_row_is_not_tried_whole() {
        // 0..4 fails whole; 0..2 is clean, so 2..4 is split at once.
        let (table, found) = bisect(4, &[3]).await;
        assert_eq!(
            table.tried,
            vec![vec![0, 1, 2, 3], vec![0, 1], vec![2], vec![3]]
        );
        assert_eq!(found.copies, 4);
    }

    #[tokio::test]
    async fn no_row_is_ever_written_twice() {
        let (table, _) = bisect(257, &[0, 17, 128, 200, 256]).await;
        let mut written: Vec<usize> = table
            .tried
            .iter()
            .filter(|set| !set.iter().any(|row| [0, 17, 128, 200, 256].contains(row)))
            .flatten()
            .copied()
            .collect();
        written.sort_unstable();
        let before = written.len();
        written.dedup();
        assert_eq!(before, written.len());
        assert_eq!(written.len(), 252);
    }
}
