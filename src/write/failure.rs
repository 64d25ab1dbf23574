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
    /// Another consumer moved the stored offset: drop the batch, reload.
    Fenced,
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
            Failure::Fenced => f.write_str("fenced: another consumer moved the stored offset"),
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

    pub(crate) fn from_partition(err: PartitionError) -> Failure {
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
            PartitionError::Db(err) => Failure::from_db(&err),
            other => Failure::Transient {
                cause: "partition",
                detail: other.to_string(),
            },
        }
    }
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
