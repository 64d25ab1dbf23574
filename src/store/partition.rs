//! Time partitions: the arithmetic of day, week and month ranges, the cache
//! of a table's existing partitions (learned from the catalog by their
//! bounds, not their names), and their creation on demand.
//!
//! Creation never blocks readers of the parent: the new partition is created
//! as a plain table `LIKE` the parent and then attached. `ATTACH PARTITION`
//! takes SHARE UPDATE EXCLUSIVE on the parent, which does not conflict with
//! the ACCESS SHARE of readers or the ROW EXCLUSIVE of writers, where
//! `CREATE TABLE ... PARTITION OF` would take ACCESS EXCLUSIVE. Every step
//! runs under a `lock_timeout`, so a DDL that cannot get its lock gives up
//! quickly instead of queueing (and making everyone queue behind it), and is
//! retried. Creators serialize on an advisory lock per parent and re-read
//! the catalog under it, so processes racing on one range all succeed and
//! one partition is made.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Datelike, Days, Months, NaiveDate, NaiveDateTime, Utc};
use tokio_postgres::Client;

use crate::config::{Granularity, PropertyValue};
use crate::copy::PgType;
use crate::metrics as m;
use crate::store::catalog::{qualify, quote_ident};

/// First key of weir's advisory locks (`'weir'` in ASCII); the second is the
/// parent table's OID.
pub const ADVISORY_LOCK_CLASS: i32 = 0x7765_6972;

/// One attached partition, with bounds in Unix microseconds `[lo, hi)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub lo: i64,
    pub hi: i64,
    pub schema: String,
    pub name: String,
}

impl Leaf {
    pub fn qualified(&self) -> String {
        qualify(&self.schema, &self.name)
    }
}

/// The partitions of one table, sorted by lower bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionSet {
    pub leaves: Vec<Leaf>,
    /// The DEFAULT partition, if the table has one (bounds MIN..MAX).
    pub default: Option<Leaf>,
}

impl PartitionSet {
    pub fn new(mut leaves: Vec<Leaf>, default: Option<Leaf>) -> Self {
        leaves.sort_by_key(|leaf| leaf.lo);
        PartitionSet { leaves, default }
    }

    /// The partition holding time `t`.
    pub fn find(&self, t: i64) -> Option<&Leaf> {
        let i = self.leaves.partition_point(|leaf| leaf.lo <= t);
        let leaf = self.leaves.get(i.checked_sub(1)?)?;
        (t < leaf.hi).then_some(leaf)
    }

    /// The partition with exactly these bounds; `[MIN, MAX)` is the DEFAULT
    /// partition when there is one.
    pub fn exact(&self, lo: i64, hi: i64) -> Option<&Leaf> {
        self.leaves
            .iter()
            .find(|leaf| leaf.lo == lo && leaf.hi == hi)
            .or_else(|| self.default.as_ref().filter(|d| d.lo == lo && d.hi == hi))
    }

    pub fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.leaves.iter().any(|leaf| leaf.lo < hi && lo < leaf.hi)
    }

    /// The range a row at `t` goes to: the existing partition holding it, or
    /// the table's granularity range around `t`, clipped to the gap between
    /// existing partitions (so a table laid out by another tool still gets
    /// partitions that fit).
    ///
    /// A table with a DEFAULT partition gets no new partitions from weir:
    /// attaching one would lock the default partition while PostgreSQL scans
    /// it, and fail as soon as it holds a row of the new range. Rows without
    /// a partition of their own go to the DEFAULT partition instead, the
    /// table owner's choice. Nothing is lost and nothing blocks.
    pub fn route(&self, granularity: Granularity, t: i64) -> (i64, i64) {
        if let Some(leaf) = self.find(t) {
            return (leaf.lo, leaf.hi);
        }
        if let Some(default) = &self.default {
            return (default.lo, default.hi);
        }
        let (mut lo, mut hi) = bucket(granularity, t);
        let i = self.leaves.partition_point(|leaf| leaf.lo <= t);
        if let Some(before) = i.checked_sub(1).and_then(|j| self.leaves.get(j)) {
            lo = lo.max(before.hi);
        }
        if let Some(after) = self.leaves.get(i) {
            hi = hi.min(after.lo);
        }
        (lo, hi)
    }
}

/// The `[lo, hi)` range of `granularity` holding Unix-microsecond time `t`,
/// in UTC. Weeks are ISO weeks (Monday to Monday).
pub fn bucket(granularity: Granularity, t: i64) -> (i64, i64) {
    let date = DateTime::<Utc>::from_timestamp_micros(t)
        .expect("event times should be validated to years 1..9999 before routing")
        .date_naive();
    let (start, end) = match granularity {
        Granularity::Day => (date, date + Days::new(1)),
        Granularity::Week => {
            let start = date - Days::new(date.weekday().num_days_from_monday() as u64);
            (start, start + Days::new(7))
        }
        Granularity::Month => {
            let start = date.with_day(1).expect("day 1 should exist in every month");
            (start, start + Months::new(1))
        }
    };
    (midnight_micros(start), midnight_micros(end))
}

/// The range after the one holding `t`.
pub fn next_bucket(granularity: Granularity, t: i64) -> (i64, i64) {
    let (_, hi) = bucket(granularity, t);
    bucket(granularity, hi)
}

fn midnight_micros(date: NaiveDate) -> i64 {
    date.and_hms_opt(0, 0, 0)
        .expect("midnight should exist")
        .and_utc()
        .timestamp_micros()
}

/// Partition name from the parent and the lower bound: `wa_events_p20251101`
/// (with `_HHMMSS` when the bound is not at midnight). Sorts in time order
/// and stays within PostgreSQL's 63-byte identifiers.
pub fn leaf_name(parent: &str, lo: i64) -> String {
    let at =
        DateTime::<Utc>::from_timestamp_micros(lo).expect("partition bounds should be valid times");
    let suffix = if at.time() == chrono::NaiveTime::MIN {
        at.format("_p%Y%m%d").to_string()
    } else {
        at.format("_p%Y%m%d_%H%M%S").to_string()
    };
    let mut base = parent.to_string();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    base + &suffix
}

/// A SQL literal for a bound of a `timestamptz` (or `timestamp`) key.
pub fn bound_literal(micros: i64, key_type: &PgType) -> String {
    let at = DateTime::<Utc>::from_timestamp_micros(micros)
        .expect("partition bounds should be valid times");
    match key_type {
        PgType::Timestamp => format!("'{}'", at.format("%Y-%m-%d %H:%M:%S%.6f")),
        _ => format!("'{}'", at.format("%Y-%m-%d %H:%M:%S%.6f+00")),
    }
}

/// Parses `pg_get_expr(relpartbound)` of a range partition on one
/// timestamp column, read in a session with `TimeZone = UTC`.
/// Returns `None` for `DEFAULT`.
pub fn parse_bound(expr: &str) -> Result<Option<(i64, i64)>, String> {
    let expr = expr.trim();
    if expr == "DEFAULT" {
        return Ok(None);
    }
    let inner = expr
        .strip_prefix("FOR VALUES FROM (")
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| format!("unexpected partition bound `{expr}`"))?;
    let (from, to) = inner
        .split_once(") TO (")
        .ok_or_else(|| format!("unexpected partition bound `{expr}`"))?;
    Ok(Some((parse_bound_value(from)?, parse_bound_value(to)?)))
}

fn parse_bound_value(value: &str) -> Result<i64, String> {
    match value.trim() {
        "MINVALUE" => return Ok(i64::MIN),
        "MAXVALUE" => return Ok(i64::MAX),
        _ => {}
    }
    let text = value
        .trim()
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .ok_or_else(|| format!("unexpected bound value `{value}`"))?;
    match text {
        "-infinity" => return Ok(i64::MIN),
        "infinity" => return Ok(i64::MAX),
        _ => {}
    }
    if let Ok(at) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Ok(at.timestamp_micros());
    }
    if let Ok(at) = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f") {
        return Ok(at.and_utc().timestamp_micros());
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(midnight_micros(date));
    }
    Err(format!("cannot read bound value `{text}`"))
}

/// Reads the partitions of the table with OID `parent` from the catalog.
/// The session must use `TimeZone = UTC`.
pub async fn load_partitions(
    client: &impl tokio_postgres::GenericClient,
    parent: u32,
) -> Result<PartitionSet, PartitionError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, pg_get_expr(c.relpartbound, c.oid)
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE i.inhparent = $1",
            &[&parent],
        )
        .await?;
    let mut leaves = Vec::with_capacity(rows.len());
    let mut default = None;
    for row in rows {
        let schema: String = row.get(0);
        let name: String = row.get(1);
        let bound: Option<String> = row.get(2);
        let Some(bound) = bound else { continue };
        match parse_bound(&bound).map_err(PartitionError::Catalog)? {
            Some((lo, hi)) => leaves.push(Leaf {
                lo,
                hi,
                schema,
                name,
            }),
            None => {
                default = Some(Leaf {
                    lo: i64::MIN,
                    hi: i64::MAX,
                    schema,
                    name,
                })
            }
        }
    }
    Ok(PartitionSet::new(leaves, default))
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Another tool created a partition overlapping the wanted range: the
    /// rows must be routed again against the fresh set.
    #[error("an existing partition overlaps the range")]
    Overlap,
    #[error("partition catalog: {0}")]
    Catalog(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// A table whose partitions weir manages.
#[derive(Debug)]
pub struct ManagedTable {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub granularity: Granularity,
    pub key_type: PgType,
    /// `WITH (...)` clause for new partitions, or empty.
    pub with_clause: String,
    /// The current partitions; readers take a snapshot, creators replace it.
    pub partitions: ArcSwap<PartitionSet>,
    /// Serializes creation inside this process (other processes are kept in
    /// line by the advisory lock).
    create_lock: tokio::sync::Mutex<()>,
}

impl ManagedTable {
    pub fn new(
        oid: u32,
        schema: String,
        name: String,
        granularity: Granularity,
        key_type: PgType,
        storage_parameters: &std::collections::BTreeMap<String, PropertyValue>,
        partitions: PartitionSet,
    ) -> Self {
        ManagedTable {
            oid,
            schema,
            name,
            granularity,
            key_type,
            with_clause: with_clause(storage_parameters),
            partitions: ArcSwap::from_pointee(partitions),
            create_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn qualified(&self) -> String {
        qualify(&self.schema, &self.name)
    }

    pub fn snapshot(&self) -> Arc<PartitionSet> {
        self.partitions.load_full()
    }

    /// Re-reads the partitions from the catalog.
    pub async fn refresh(&self, client: &Client) -> Result<Arc<PartitionSet>, PartitionError> {
        let set = Arc::new(load_partitions(client, self.oid).await?);
        self.partitions.store(set.clone());
        Ok(set)
    }

    /// The partition covering exactly `[lo, hi)`: found in the cached set
    /// (no lock, no query: the common case), or created when missing.
    /// Returns whether this call created it (then counted in
    /// `weir_partitions_created_total` and logged). Fails with
    /// [`PartitionError::Overlap`] when a partition with other bounds covers
    /// part of the range; the partition set is fresh afterwards.
    pub async fn ensure(
        &self,
        client: &mut Client,
        lo: i64,
        hi: i64,
        lock_timeout: Duration,
    ) -> Result<(Leaf, bool), PartitionError> {
        if let Some(leaf) = self.snapshot().exact(lo, hi) {
            return Ok((leaf.clone(), false));
        }
        let started = std::time::Instant::now();
        let made = self.create(client, lo, hi, lock_timeout).await?;
        m::stage_time(m::stage::PARTITION_ENSURE, &self.name, started.elapsed());
        if made.1 {
            metrics::counter!(m::PARTITIONS_CREATED, "table" => self.name.clone()).increment(1);
            tracing::info!(partition = %made.0.qualified(), "partition created");
        }
        Ok(made)
    }

    /// [`ManagedTable::ensure`] past the cache: under the in-process and
    /// the advisory lock, with the catalog re-read.
    async fn create(
        &self,
        client: &mut Client,
        lo: i64,
        hi: i64,
        lock_timeout: Duration,
    ) -> Result<(Leaf, bool), PartitionError> {
        let _in_process = self.create_lock.lock().await;
        if let Some(leaf) = self.snapshot().exact(lo, hi) {
            return Ok((leaf.clone(), false));
        }
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            ))
            .await?;
        // Serializes creators of this parent across processes; the catalog is
        // re-read under the lock, so a range created meanwhile is seen.
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&ADVISORY_LOCK_CLASS, &(self.oid as i32)],
            )
            .await?;
        let current = load_partitions(&transaction, self.oid).await?;
        if let Some(leaf) = current.exact(lo, hi).cloned() {
            transaction.commit().await?;
            self.partitions.store(Arc::new(current));
            return Ok((leaf, false));
        }
        if current.overlaps(lo, hi) {
            transaction.commit().await?;
            self.partitions.store(Arc::new(current));
            return Err(PartitionError::Overlap);
        }
        let name = self.free_name(&transaction, lo).await?;
        let child = qualify(&self.schema, &name);
        let parent = self.qualified();
        // LIKE copies columns, defaults, NOT NULL and CHECK constraints,
        // storage and statistics settings; ATTACH then creates the parent's
        // indexes on the (empty) child. Only the child is locked exclusively,
        // and nobody can see it before commit.
        transaction
            .batch_execute(&format!(
                "CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS \
                 INCLUDING STORAGE INCLUDING COMMENTS INCLUDING STATISTICS INCLUDING GENERATED){with};
                 ALTER TABLE {parent} ATTACH PARTITION {child} FOR VALUES FROM ({lo_lit}) TO ({hi_lit});",
                with = self.with_clause,
                lo_lit = bound_literal(lo, &self.key_type),
                hi_lit = bound_literal(hi, &self.key_type),
            ))
            .await?;
        transaction.commit().await?;
        let set = self.refresh(client).await?;
        let leaf = set.exact(lo, hi).cloned().ok_or_else(|| {
            PartitionError::Catalog(format!("{child} was attached but is not in the catalog"))
        })?;
        Ok((leaf, true))
    }

    /// The canonical name for a partition starting at `lo`, or a suffixed
    /// one if a table of that name exists already (say, a detached
    /// partition waiting to be dropped).
    async fn free_name(
        &self,
        client: &impl tokio_postgres::GenericClient,
        lo: i64,
    ) -> Result<String, PartitionError> {
        let base = leaf_name(&self.name, lo);
        for attempt in 0..100 {
            let candidate = if attempt == 0 {
                base.clone()
            } else {
                let suffix = format!("_{attempt}");
                let mut trimmed = base.clone();
                while trimmed.len() + suffix.len() > 63 {
                    trimmed.pop();
                }
                trimmed + &suffix
            };
            let taken = client
                .query_opt(
                    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relname = $2",
                    &[&self.schema, &candidate],
                )
                .await?
                .is_some();
            if !taken {
                return Ok(candidate);
            }
        }
        Err(PartitionError::Catalog(format!(
            "no free partition name near {base}"
        )))
    }
}

/// `WITH (a = 1, b = 'x')` for storage parameters, or empty.
fn with_clause(parameters: &std::collections::BTreeMap<String, PropertyValue>) -> String {
    if parameters.is_empty() {
        return String::new();
    }
    let items: Vec<String> = parameters
        .iter()
        .map(|(key, value)| {
            let value = match value {
                PropertyValue::Text(text) => format!("'{}'", text.replace('\'', "''")),
                other => other.to_string(),
            };
            format!("{key} = {value}")
        })
        .collect();
    format!(" WITH ({})", items.join(", "))
}

/// Checks a storage parameter name (it is spliced into DDL).
pub fn valid_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// Quoted identifier helper re-exported for DDL callers.
pub fn ident(name: &str) -> String {
    quote_ident(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    #[test]
    fn buckets_at_day_week_and_month_boundaries_in_utc() {
        let day = bucket(Granularity::Day, at("2025-11-30T23:59:59.999999Z"));
        assert_eq!(
            day,
            (at("2025-11-30T00:00:00Z"), at("2025-12-01T00:00:00Z"))
        );
        let day = bucket(Granularity::Day, at("2025-12-01T00:00:00Z"));
        assert_eq!(day.0, at("2025-12-01T00:00:00Z"));
        // 2025-11-30 is a Sunday: its ISO week started Monday 24th.
        let week = bucket(Granularity::Week, at("2025-11-30T23:00:00Z"));
        assert_eq!(
            week,
            (at("2025-11-24T00:00:00Z"), at("2025-12-01T00:00:00Z"))
        );
        let week = bucket(Granularity::Week, at("2025-12-01T00:00:00Z"));
        assert_eq!(week.0, at("2025-12-01T00:00:00Z"));
        // Across a year boundary.
        let week = bucket(Granularity::Week, at("2026-01-01T12:00:00Z"));
        assert_eq!(
            week,
            (at("2025-12-29T00:00:00Z"), at("2026-01-05T00:00:00Z"))
        );
        let month = bucket(Granularity::Month, at("2024-02-29T23:59:59Z"));
        assert_eq!(
            month,
            (at("2024-02-01T00:00:00Z"), at("2024-03-01T00:00:00Z"))
        );
        let month = bucket(Granularity::Month, at("2025-12-31T23:59:59Z"));
        assert_eq!(
            month,
            (at("2025-12-01T00:00:00Z"), at("2026-01-01T00:00:00Z"))
        );
        // A local offset does not move the boundary: 2025-12-01T01:00+02:00 is still November in UTC.
        let month = bucket(Granularity::Month, at("2025-12-01T01:00:00+02:00"));
        assert_eq!(month.0, at("2025-11-01T00:00:00Z"));
        assert_eq!(
            next_bucket(Granularity::Month, at("2025-12-15T00:00:00Z")).0,
            at("2026-01-01T00:00:00Z")
        );
    }

    #[test]
    fn names_sort_and_fit() {
        assert_eq!(
            leaf_name("wa_events", at("2025-11-01T00:00:00Z")),
            "wa_events_p20251101"
        );
        assert_eq!(
            leaf_name("t", at("2025-11-01T06:00:00Z")),
            "t_p20251101_060000"
        );
        let long = "x".repeat(63);
        assert_eq!(leaf_name(&long, 0).len(), 63);
    }

    #[test]
    fn bounds_parse_from_the_catalog_text() {
        let parsed =
            parse_bound("FOR VALUES FROM ('2025-11-01 00:00:00+00') TO ('2025-12-01 00:00:00+00')")
                .unwrap();
        assert_eq!(
            parsed,
            Some((at("2025-11-01T00:00:00Z"), at("2025-12-01T00:00:00Z")))
        );
        let parsed =
            parse_bound("FOR VALUES FROM (MINVALUE) TO ('2025-01-01 00:00:00.5')").unwrap();
        assert_eq!(parsed, Some((i64::MIN, at("2025-01-01T00:00:00.5Z"))));
        assert_eq!(parse_bound("DEFAULT").unwrap(), None);
        assert!(parse_bound("FOR VALUES IN (1)").is_err());
    }

    #[test]
    fn routing_fits_new_ranges_between_foreign_partitions() {
        let leaf = |lo: &str, hi: &str, name: &str| Leaf {
            lo: at(lo),
            hi: at(hi),
            schema: "public".into(),
            name: name.into(),
        };
        // Another tool made daily partitions for Nov 10 and Nov 20.
        let set = PartitionSet::new(
            vec![
                leaf("2025-11-20T00:00:00Z", "2025-11-21T00:00:00Z", "b"),
                leaf("2025-11-10T00:00:00Z", "2025-11-11T00:00:00Z", "a"),
            ],
            None,
        );
        let t = at("2025-11-10T05:00:00Z");
        assert_eq!(set.find(t).unwrap().name, "a");
        assert_eq!(
            set.route(Granularity::Month, t),
            (at("2025-11-10T00:00:00Z"), at("2025-11-11T00:00:00Z"))
        );
        // A monthly range for Nov 15 is clipped to the gap between them.
        assert_eq!(
            set.route(Granularity::Month, at("2025-11-15T00:00:00Z")),
            (at("2025-11-11T00:00:00Z"), at("2025-11-20T00:00:00Z"))
        );
        assert_eq!(
            set.route(Granularity::Month, at("2025-11-02T00:00:00Z")),
            (at("2025-11-01T00:00:00Z"), at("2025-11-10T00:00:00Z"))
        );
        assert!(set.find(at("2025-11-11T00:00:00Z")).is_none());
    }
}
