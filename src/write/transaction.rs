//! One flush (batches of distinct lanes), one transaction, in named steps:
//!
//! 1. prepare the statements ([`prepare_sinks`], [`prepare_dead_letters`]) (before the transaction: a statement
//!    cannot be prepared on a client the transaction borrows) and encode
//!    the dead letters already known, so the session does not sit idle in
//!    an open transaction doing weir's work;
//! 2. [`fence`]: move every lane's stored offset from its batch's `prev` to
//!    its `next` by compare-and-set, first, so a fenced batch costs no
//!    COPY, and the offset rows stay locked until commit;
//! 3. [`copy_parts`]: COPY the rows, in binary, into each leaf partition;
//!    in the careful pass each part under a savepoint, bisected on refusal;
//! 4. [`copy_dead_letters`];
//! 5. COMMIT.
//!
//! A crash anywhere before 5 leaves nothing; after it, rows, dead letters
//! and offset are all there.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use metrics::counter;
use tokio_postgres::{Statement, Transaction};

use crate::batch::Batch;
use crate::copy::segment::{copy_stream, send_copy};
use crate::decode::mapping::Mappings;
use crate::event::{DeadLetter, Stage};
use crate::metrics as m;
use crate::store::db::{self, ErrorClass};
use crate::store::deadletter::{COPY_COLUMNS, DeadLetterTable, PayloadCopy};
use crate::store::offsets::AdvanceStatements;
use crate::store::partition::Leaf;
use crate::write::bisect::{self, Isolated, SavepointCopy, Suspicion};
use crate::write::failure::Failure;
use crate::write::plan::Part;
use crate::write::session::{Session, Sink, Statements, write_rows};

/// How a batch is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Every part in one COPY; any refusal fails the whole transaction.
    Fast,
    /// After a row-level refusal: each part under a savepoint, bisected
    /// until the bad rows are isolated; they become dead letters, the rest
    /// is written.
    Careful,
}

/// What the transaction writes to besides the batch's own tables.
pub struct Destinations<'a> {
    pub mappings: &'a Mappings,
    pub dead_letters: &'a DeadLetterTable,
    /// The offsets group the compare-and-set moves.
    pub group: &'a str,
}

/// Where a flush's rows go, planned before its transaction.
pub struct Plan {
    /// Each batch's parts, in the flush's order.
    pub parts: Vec<Vec<Part>>,
    /// The dead-letter partition of `failed_at`.
    pub dead_letter_leaf: Leaf,
    /// The time stamped on this attempt's dead letters, Unix microseconds.
    pub failed_at: i64,
}

/// Writes `flush` in one transaction (see the module doc). A fenced batch
/// rolls the whole transaction back: `Failure::Fenced` names its index.
/// The written rows' latencies go into `latencies` (emptied first), a
/// vector the writer reuses from flush to flush.
pub async fn write_flush(
    session: &mut Session,
    to: &Destinations<'_>,
    flush: &[&Batch],
    plan: &Plan,
    pass: Pass,
    mut latencies: Vec<RowLatency>,
) -> Result<Written, Failure> {
    let Session {
        client,
        advance,
        statements,
    } = session;
    let mut sinks = Vec::with_capacity(flush.len());
    for (batch, parts) in flush.iter().zip(&plan.parts) {
        sinks.push(prepare_sinks(client, statements, to.mappings, batch, parts).await?);
    }
    let dead_letter_copy = prepare_dead_letters(client, statements, plan).await?;
    let mut dead_rows = DeadLetterRows::default();
    for (index, batch) in flush.iter().enumerate() {
        dead_rows.add(
            to.dead_letters,
            index,
            batch,
            &batch.dead_letters,
            plan.failed_at,
        );
    }

    let transaction = client
        .transaction()
        .await
        .map_err(|err| Failure::from_db(&err))?;
    if pass == Pass::Careful {
        // Deferred constraints are checked at COMMIT, where a failure names
        // no row. The careful pass checks them at the end of each COPY
        // instead, so bisection can find the rows they refuse.
        transaction
            .batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
            .await
            .map_err(|err| Failure::from_db(&err))?;
    }
    // Every lane is fenced before any row is copied, so a fenced lane costs
    // no COPY. Its rollback undoes the other lanes' offset moves too, and
    // the writer writes them again without it. The flush comes in (topic,
    // partition) order, the order every writer locks offset rows in (see
    // the writer).
    for (index, batch) in flush.iter().enumerate() {
        if fence(&transaction, advance, to.group, batch).await? == Ownership::Fenced {
            let _ = transaction.rollback().await;
            return Err(Failure::Fenced(index));
        }
    }
    latencies.clear();
    let mut written = Written {
        latencies,
        ..Written::default()
    };
    for (index, batch) in flush.iter().enumerate() {
        let write_dead = copy_parts(
            &transaction,
            to.mappings,
            batch,
            &plan.parts[index],
            &sinks[index],
            pass,
            &mut written,
        )
        .await?;
        dead_rows.add(to.dead_letters, index, batch, &write_dead, plan.failed_at);
    }
    written.dead_letters = std::mem::take(&mut dead_rows.reported);
    copy_dead_letters(&transaction, &dead_letter_copy, dead_rows.buf).await?;

    let commit_started = Instant::now();
    transaction
        .commit()
        .await
        .map_err(|err| Failure::from_db(&err))?;
    m::stage_time(m::stage::COMMIT, m::ALL_TABLES, commit_started.elapsed());
    Ok(written)
}

/// The sinks of one batch's parts, in order, prepared before the
/// transaction.
async fn prepare_sinks(
    client: &tokio_postgres::Client,
    statements: &mut Statements,
    mappings: &Mappings,
    batch: &Batch,
    parts: &[Part],
) -> Result<Vec<Sink>, Failure> {
    let mut sinks = Vec::with_capacity(parts.len());
    for part in parts {
        let source = batch.segments[part.segment].source;
        sinks.push(
            statements
                .sink(client, mappings, &part.leaf.qualified(), source)
                .await
                .map_err(|err| Failure::from_db(&err))?,
        );
    }
    Ok(sinks)
}

/// The COPY statement of the flush's dead letters.
async fn prepare_dead_letters(
    client: &tokio_postgres::Client,
    statements: &mut Statements,
    plan: &Plan,
) -> Result<Statement, Failure> {
    statements
        .prepared(
            client,
            format!(
                "COPY {} {COPY_COLUMNS} FROM STDIN (FORMAT binary)",
                plan.dead_letter_leaf.qualified()
            ),
        )
        .await
        .map_err(|err| Failure::from_db(&err))
}

/// Whether this transaction owns the batch's offset range.
#[derive(Debug, PartialEq, Eq)]
enum Ownership {
    Owned,
    /// Another consumer moved the stored offset: roll back, write nothing.
    Fenced,
}

/// Fencing first. The compare-and-set moves the stored offset from exactly
/// where this batch starts; if another consumer got there first it matches
/// nothing, the transaction is rolled back and nothing is written. The
/// updated row stays locked until commit, so a racing consumer waits and
/// then finds the offset moved.
async fn fence(
    transaction: &Transaction<'_>,
    advance: &AdvanceStatements,
    group: &str,
    batch: &Batch,
) -> Result<Ownership, Failure> {
    let owned = advance
        .advance(
            transaction,
            group,
            &batch.topic,
            batch.partition,
            batch.prev,
            batch.next,
        )
        .await
        .map_err(|err| Failure::from_db(&err))?;
    Ok(if owned {
        Ownership::Owned
    } else {
        Ownership::Fenced
    })
}

/// COPYs every part of one batch, adding what it wrote to `written`;
/// returns, in the careful pass, the dead letters of the rows PostgreSQL
/// refused.
async fn copy_parts(
    transaction: &Transaction<'_>,
    mappings: &Mappings,
    batch: &Batch,
    parts: &[Part],
    sinks: &[Sink],
    pass: Pass,
    written: &mut Written,
) -> Result<Vec<DeadLetter>, Failure> {
    let mut refused: Vec<DeadLetter> = Vec::new();
    let mut bisect_copies = 0u64;
    for (part, sink) in parts.iter().zip(sinks) {
        let copy_started = Instant::now();
        let segment = &batch.segments[part.segment];
        let table = mappings.tables[segment.table].name().to_string();
        let (rows_written, inserted): (Cow<'_, [usize]>, u64) = match pass {
            Pass::Fast => {
                let inserted = write_rows(transaction, sink, segment, &part.rows)
                    .await
                    .map_err(|err| Failure::from_db(&err))?;
                (Cow::Borrowed(&part.rows), inserted)
            }
            Pass::Careful => {
                let mut found = Isolated::default();
                let mut target = SavepointCopy {
                    transaction,
                    sink,
                    segment,
                };
                bisect::isolate(&mut target, &part.rows, Suspicion::None, &mut found).await?;
                bisect_copies += found.copies;
                for (row, err) in &found.bad {
                    let meta = segment.rows[*row];
                    refused.push(DeadLetter {
                        message: meta.message,
                        table: Some(Arc::from(table.as_str())),
                        item: Some(meta.item),
                        item_path: None,
                        stage: Stage::Write,
                        code: db::sqlstate(err).into(),
                        detail: db::describe(err),
                    });
                }
                let bad: HashSet<usize> = found.bad.iter().map(|(row, _)| *row).collect();
                let kept = part
                    .rows
                    .iter()
                    .copied()
                    .filter(|row| !bad.contains(row))
                    .collect();
                (Cow::Owned(kept), found.inserted)
            }
        };
        // Rows a dedupe key skipped (already in the table); counted only
        // once the transaction commits, like every other figure.
        let offered = rows_written.len() as u64;
        let bytes: u64 = rows_written
            .iter()
            .map(|&row| segment.row_range(row).len() as u64)
            .sum();
        written.add(TableWritten {
            table: table.clone(),
            rows: inserted,
            bytes,
            skipped: offered - inserted.min(offered),
        });
        written.latencies.extend(rows_written.iter().map(|&row| {
            let meta = segment.rows[row];
            RowLatency {
                table: segment.table,
                event_time: meta.time,
                kafka_ms: batch.messages[meta.message as usize].timestamp_ms,
            }
        }));
        m::stage_time(m::stage::COPY, &table, copy_started.elapsed());
    }
    if pass == Pass::Careful {
        counter!(m::BISECT_COPIES).increment(bisect_copies);
        tracing::info!(
            topic = %batch.topic, partition = batch.partition,
            bad_rows = refused.len(), copies = bisect_copies,
            "bad rows isolated"
        );
    }
    Ok(refused)
}

/// COPYs the batch's dead letters (encoded rows) into their partition.
async fn copy_dead_letters(
    transaction: &Transaction<'_>,
    statement: &Statement,
    rows: BytesMut,
) -> Result<(), Failure> {
    if rows.is_empty() {
        return Ok(());
    }
    send_copy(
        transaction,
        statement,
        copy_stream(std::iter::once(rows.freeze())),
    )
    .await
    .map_err(|err| match db::classify(&err) {
        // Dead letters are weir's own rows: a refusal here is not the
        // event's fault. Stop and say so.
        ErrorClass::Row => Failure::Schema(format!(
            "the dead-letter table refused a row: {}",
            db::describe(&err)
        )),
        _ => Failure::from_db(&err),
    })?;
    Ok(())
}

/// A flush's dead letters as COPY rows, and what to report once committed.
#[derive(Default)]
struct DeadLetterRows {
    buf: BytesMut,
    /// Messages (by index of the batch in the flush, and of the message in
    /// the batch) whose payload a row already carries.
    carried: HashSet<(usize, u32)>,
    reported: Vec<LetterReport>,
}

impl DeadLetterRows {
    /// Encodes `letters` of the flush's batch number `index`; each
    /// message's payload is stored (and compressed) once, with its first
    /// dead letter in the flush.
    fn add(
        &mut self,
        table: &DeadLetterTable,
        index: usize,
        batch: &Batch,
        letters: &[DeadLetter],
        failed_at: i64,
    ) {
        for letter in letters {
            let event = &batch.messages[letter.message as usize];
            let copy = if self.carried.insert((index, letter.message)) {
                PayloadCopy::Carried
            } else {
                PayloadCopy::WithSibling
            };
            table.encode_row(&mut self.buf, letter, event, failed_at, copy);
            self.reported.push(LetterReport {
                table: letter.table.as_deref().unwrap_or("").to_string(),
                stage: letter.stage.as_str(),
                reason: letter.code.to_string(),
            });
        }
    }
}

/// What a committed batch wrote to one table.
#[derive(Debug)]
pub struct TableWritten {
    pub table: String,
    /// Rows the table gained.
    pub rows: u64,
    /// COPY bytes of the rows offered.
    pub bytes: u64,
    /// Rows a dedupe key skipped as already there.
    pub skipped: u64,
}

/// One written row's times, for the end-to-end latency histograms.
#[derive(Debug)]
pub struct RowLatency {
    /// Table index.
    pub table: usize,
    /// Event time, Unix microseconds.
    pub event_time: i64,
    /// Kafka timestamp, Unix milliseconds.
    pub kafka_ms: Option<i64>,
}

/// One dead letter, as counted in `weir_dead_letters_total`.
#[derive(Debug)]
pub struct LetterReport {
    pub table: String,
    pub stage: &'static str,
    pub reason: String,
}

/// What a committed batch wrote, for metrics.
#[derive(Debug, Default)]
pub struct Written {
    pub per_table: Vec<TableWritten>,
    pub latencies: Vec<RowLatency>,
    pub dead_letters: Vec<LetterReport>,
}

impl Written {
    fn add(&mut self, more: TableWritten) {
        match self.per_table.iter_mut().find(|t| t.table == more.table) {
            Some(entry) => {
                entry.rows += more.rows;
                entry.bytes += more.bytes;
                entry.skipped += more.skipped;
            }
            None => self.per_table.push(more),
        }
    }

    pub fn rows_total(&self) -> u64 {
        self.per_table.iter().map(|t| t.rows).sum()
    }
}
