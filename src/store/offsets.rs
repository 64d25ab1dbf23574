//! Stored offsets: weir's record of how far each Kafka partition has been
//! written, kept in the target database and updated in the same transaction
//! as the rows and dead letters it covers.
//!
//! Invariant: for every (group, topic, partition), `next_offset` is the
//! offset of the first message whose rows are *not* in PostgreSQL. Every
//! message below it has all its rows and dead letters committed, exactly
//! once, because the rows and the offset move in one transaction and the
//! offset only moves by compare-and-set from the value the batch started at.

use std::collections::HashMap;

use tokio_postgres::{Client, GenericClient, Statement};

use crate::config::Config;
use crate::store::catalog::{qualify, split_name};

/// Where offsets live and under which group key.
#[derive(Debug, Clone)]
pub struct OffsetStore {
    /// `"schema"."table"`.
    pub table: String,
    pub group: String,
}

impl OffsetStore {
    pub fn new(config: &Config) -> Self {
        let (schema, name) = split_name(&config.postgres.offsets_table, &config.postgres.schema);
        OffsetStore {
            table: qualify(schema, name),
            group: config.offsets_group().to_string(),
        }
    }

    /// DDL for the offsets table. Small, updated in place many times a
    /// second: fillfactor 50 and no index on the updated columns keep the
    /// updates HOT.
    pub fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                consumer_group text        NOT NULL,
                topic          text        NOT NULL,
                partition      integer     NOT NULL,
                next_offset    bigint      NOT NULL,
                updated_at     timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (consumer_group, topic, partition)
            ) WITH (fillfactor = 50);",
            table = self.table
        )
    }

    /// Stored `next_offset` of each partition of `topic` that has one.
    pub async fn load(
        &self,
        client: &impl GenericClient,
        topic: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, i64>, tokio_postgres::Error> {
        let rows = client
            .query(
                &format!(
                    "SELECT partition, next_offset FROM {} \
                      WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)",
                    self.table
                ),
                &[&self.group, &topic, &partitions],
            )
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// Prepares the two statements a writer uses to advance offsets.
    pub async fn prepare(
        &self,
        client: &Client,
    ) -> Result<AdvanceStatements, tokio_postgres::Error> {
        Ok(AdvanceStatements {
            // Compare-and-set: moves from exactly the offset the batch
            // started at. Zero rows updated means another consumer (a new
            // owner after a rebalance, or a zombie) moved it: fenced.
            update: client
                .prepare(&format!(
                    "UPDATE {} SET next_offset = $5, updated_at = now() \
                      WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
                    self.table
                ))
                .await?,
            // First batch of a partition: only if nobody stored one meanwhile.
            insert: client
                .prepare(&format!(
                    "INSERT INTO {} (consumer_group, topic, partition, next_offset) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    self.table
                ))
                .await?,
        })
    }
}

/// Prepared offset statements of one writer session.
#[derive(Debug, Clone)]
pub struct AdvanceStatements {
    update: Statement,
    insert: Statement,
}

impl AdvanceStatements {
    /// Moves the stored offset of `topic`/`partition` from `prev` to `next`
    /// inside the caller's transaction. Returns false when the stored value
    /// was not `prev` (fenced): the caller must roll back.
    pub async fn advance(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        group: &str,
        topic: &str,
        partition: i32,
        prev: Option<i64>,
        next: i64,
    ) -> Result<bool, tokio_postgres::Error> {
        let changed = match prev {
            Some(prev) => {
                transaction
                    .execute(&self.update, &[&group, &topic, &partition, &prev, &next])
                    .await?
            }
            None => {
                transaction
                    .execute(&self.insert, &[&group, &topic, &partition, &next])
                    .await?
            }
        };
        // Exactly one row moved means this transaction owns the range
        // [prev, next); anything else means someone else moved it.
        Ok(changed == 1)
    }
}
