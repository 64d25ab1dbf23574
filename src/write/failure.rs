//! Why a write attempt did not commit, decided by SQLSTATE class (never by
//! message text), and what the writer does about each.

use crate::store::db::{self, ErrorClass};
use crate::store::partition::PartitionError;

/// Whether a write attempt is the batch's first, or follows a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    First,
    Retry,
}

/// Why a write attempt did not commit.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Another consumer moved the stored offset of the flush's batch at
    /// this index: drop the batch, reload its lane.
    Fenced(usize),
    /// Retry the same batch after a backoff.
    Transient { cause: &'static str, detail: String },
    /// Stop and report; retry slowly until fixed.
    Schema(String),
    /// A row-level error in the fast path: retry carefully, isolating rows.
    Row,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Fenced(_) => f.write_str("fenced: another consumer moved the stored offset"),
            Failure::Transient { cause, detail } => write!(f, "{cause}: {detail}"),
            Failure::Schema(detail) => f.write_str(detail),
            Failure::Row => f.write_str("PostgreSQL refused a row"),
        }
    }
}

impl Failure {
    pub(crate) fn from_db(err: &tokio_postgres::Error) -> Failure {
        match db::classify(err) {
            ErrorClass::Transient => Failure::Transient {
                cause: transient_cause(err),
                detail: db::describe(err),
            },
            ErrorClass::Schema => Failure::Schema(db::describe(err)),
            ErrorClass::Row => Failure::Row,
        }
    }

    /// A failure to find or create the partition `[lo, hi)` of `table`.
    pub(crate) fn from_partition(err: PartitionError, table: &str, lo: i64, hi: i64) -> Failure {
        match err {
            // No row of the batch is at fault when a partition cannot be
            // made: a data-class error here (23514 when a DEFAULT partition
            // added since start-up already holds rows of the new range) is
            // the schema's, and stops the writer until it is fixed.
            PartitionError::Db(err) if db::classify(&err) == ErrorClass::Row => {
                Failure::Schema(format!(
                    "cannot create a partition: {} (a DEFAULT partition holding rows of the new \
                     range blocks ATTACH; move those rows out, or restart weir to write to the \
                     DEFAULT partition)",
                    db::describe(&err)
                ))
            }
            // Say what weir was doing: PostgreSQL's text alone ("permission
            // denied for schema s") does not tell which table needed what.
            PartitionError::Db(err) => match Failure::from_db(&err) {
                Failure::Schema(detail) => Failure::Schema(format!(
                    "cannot create the partition of {table} for [{}, {}): {detail}",
                    micros_text(lo),
                    micros_text(hi)
                )),
                other => other,
            },
            other => Failure::Transient {
                cause: "partition",
                detail: other.to_string(),
            },
        }
    }
}

fn micros_text(micros: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros)
        .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| micros.to_string())
}

fn transient_cause(err: &tokio_postgres::Error) -> &'static str {
    if err.is_closed() || err.code().is_none() {
        return "connection";
    }
    match err.code().map(|c| c.code()) {
        Some("40001") => "serialization",
        Some("40P01") => "deadlock",
        Some("55P03") => "lock_timeout",
        Some("57014") => "statement_timeout",
        Some(code) if code.starts_with("57P") => "shutdown",
        Some(code) if code.starts_with("08") => "connection",
        Some(code) if code.starts_with("53") => "resources",
        _ => "other",
    }
}
