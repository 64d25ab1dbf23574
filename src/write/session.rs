//! A writer's PostgreSQL session: the connection, the offset statements
//! prepared on it, and its cache of COPY statements. A [`Session`] value
//! exists only while connected, so code holding one cannot run without a
//! connection.
//!
//! [`Sink`] is how rows reach a leaf partition, and [`write_rows`] the one
//! function that sends them there, used by the pipeline's writers and by
//! `weir dlq replay` alike.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use tokio_postgres::{Client, GenericClient, Statement, Transaction};

use crate::config::PostgresConfig;
use crate::copy::segment::{Sealed, copy_rows};
use crate::decode::mapping::Mappings;
use crate::store::db;
use crate::store::offsets::{AdvanceStatements, OffsetStore};

/// A connected session of one writer.
pub struct Session {
    pub(crate) client: Client,
    /// The compare-and-set statements of the offsets table.
    pub(crate) advance: AdvanceStatements,
    pub(crate) statements: Statements,
}

impl Session {
    /// Connects as `name` (shown in `pg_stat_activity`) and prepares the
    /// offset statements.
    pub async fn open(
        database_url: &str,
        postgres: &PostgresConfig,
        name: &str,
        offsets: &OffsetStore,
    ) -> Result<Session, String> {
        let client = db::connect(database_url, postgres, name)
            .await
            .map_err(|err| err.to_string())?;
        let advance = offsets
            .prepare(&client)
            .await
            .map_err(|err| db::describe(&err))?;
        Ok(Session {
            client,
            advance,
            statements: Statements::default(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Whether the session still answers, within 5 s.
    pub async fn answers(&self) -> bool {
        !self.client.is_closed()
            && tokio::time::timeout(Duration::from_secs(5), self.client.simple_query("SELECT 1"))
                .await
                .is_ok_and(|result| result.is_ok())
    }
}

/// Statements prepared once per session, by SQL text.
#[derive(Default)]
pub struct Statements {
    cache: HashMap<String, Statement>,
}

impl Statements {
    /// Forgets every statement (after a schema change, say).
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// `sql`, prepared on `client` the first time it is asked for.
    pub async fn prepared(
        &mut self,
        client: &impl GenericClient,
        sql: String,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.cache.get(&sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(&sql).await?;
        self.cache.insert(sql, statement.clone());
        Ok(statement)
    }

    /// How rows of `source` reach `leaf`: straight COPY, or for a table
    /// with a dedupe key, COPY into a session-local staging table then
    /// `INSERT ... ON CONFLICT DO NOTHING` (rows whose key exists are
    /// skipped).
    pub async fn sink(
        &mut self,
        client: &impl GenericClient,
        mappings: &Mappings,
        leaf: &str,
        source: usize,
    ) -> Result<Sink, tokio_postgres::Error> {
        let source = &mappings.sources[source];
        let table = &mappings.tables[source.table];
        let Some(conflict) = &table.conflict_columns else {
            let copy = self
                .prepared(
                    client,
                    format!(
                        "COPY {leaf} {} FROM STDIN (FORMAT binary)",
                        source.column_list
                    ),
                )
                .await?;
            return Ok(Sink::Direct(copy));
        };
        let stage = format!("pg_temp.weir_stage_{}", table.index);
        // Created once per session, and by the writers outside any batch
        // transaction (a rollback would take it away); the statements below
        // reference it.
        let create = format!(
            "CREATE TEMP TABLE IF NOT EXISTS weir_stage_{} (LIKE {} INCLUDING DEFAULTS)",
            table.index,
            table.info.qualified()
        );
        if let Entry::Vacant(entry) = self.cache.entry(create) {
            client.batch_execute(entry.key()).await?;
            entry.insert(client.prepare("SELECT 1").await?);
        }
        let columns = source
            .column_list
            .trim_start_matches('(')
            .trim_end_matches(')');
        let copy = self
            .prepared(
                client,
                format!(
                    "COPY {stage} {} FROM STDIN (FORMAT binary)",
                    source.column_list
                ),
            )
            .await?;
        let insert = self
            .prepared(
                client,
                format!(
                    "INSERT INTO {leaf} {} SELECT {columns} FROM {stage} ON CONFLICT ({conflict}) DO NOTHING",
                    source.column_list
                ),
            )
            .await?;
        let clear = self.prepared(client, format!("TRUNCATE {stage}")).await?;
        Ok(Sink::Staged {
            copy,
            insert,
            clear,
        })
    }
}

/// How rows get into a partition (see [`Statements::sink`]).
pub enum Sink {
    Direct(Statement),
    Staged {
        copy: Statement,
        insert: Statement,
        clear: Statement,
    },
}

/// Writes `rows` of `segment` through `sink`; returns how many rows the
/// table gained (fewer than `rows` when a dedupe key skipped some).
pub async fn write_rows(
    transaction: &Transaction<'_>,
    sink: &Sink,
    segment: &Sealed,
    rows: &[usize],
) -> Result<u64, tokio_postgres::Error> {
    match sink {
        Sink::Direct(copy) => copy_rows(transaction, copy, segment, rows).await,
        Sink::Staged {
            copy,
            insert,
            clear,
        } => {
            copy_rows(transaction, copy, segment, rows).await?;
            let inserted = transaction.execute(insert, &[]).await?;
            transaction.execute(clear, &[]).await?;
            Ok(inserted)
        }
    }
}
