//! `weir dlq`: list, show, replay and purge dead letters.
//!
//! Replay re-runs decode, validation, routing and the write for each
//! selected dead letter with the *current* configuration and schema (after
//! a fix), writes what now succeeds and marks it replayed, all in one
//! transaction, so a dead letter is replayed at most once. One that fails
//! again stays, with `attempts` incremented and the new reason.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use crate::config::Config;
use crate::copy::now_micros;
use crate::copy::segment::Sealed;
use crate::decode::Decoder;
use crate::decode::Gathered;
use crate::event::{Event, Headers, Stage};
use crate::pipeline::Prepared;
use crate::store::db::{self, ErrorClass};
use crate::store::deadletter::{DeadLetterTable, SIBLING_ENCODING, restore_payload};
use crate::write::{Statements, plan, write_rows};

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ids: Vec<i64>,
    pub table: Option<String>,
    pub stage: Option<String>,
    pub code: Option<String>,
    pub topic: Option<String>,
    /// failed_at >= since
    pub since: Option<DateTime<Utc>>,
    /// failed_at < until
    pub until: Option<DateTime<Utc>>,
    /// Include dead letters already replayed.
    pub include_replayed: bool,
}

impl Filter {
    /// `WHERE ...` with numbered parameters appended to `params`.
    fn clause(&self, params: &mut Vec<Box<dyn ToSql + Sync + Send>>) -> String {
        let mut conditions = Vec::new();
        let mut add = |sql: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            conditions.push(sql.replace('?', &format!("${}", params.len())));
        };
        if !self.ids.is_empty() {
            add("id = ANY(?)", Box::new(self.ids.clone()));
        }
        if let Some(table) = &self.table {
            add("target_table = ?", Box::new(table.clone()));
        }
        if let Some(stage) = &self.stage {
            add("stage = ?", Box::new(stage.clone()));
        }
        if let Some(code) = &self.code {
            add("code = ?", Box::new(code.clone()));
        }
        if let Some(topic) = &self.topic {
            add("topic = ?", Box::new(topic.clone()));
        }
        if let Some(since) = self.since {
            add("failed_at >= ?", Box::new(since));
        }
        if let Some(until) = self.until {
            add("failed_at < ?", Box::new(until));
        }
        if !self.include_replayed {
            conditions.push("replayed_at IS NULL".into());
        }
        if conditions.is_empty() {
            "TRUE".into()
        } else {
            conditions.join(" AND ")
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.table.is_none()
            && self.stage.is_none()
            && self.code.is_none()
            && self.topic.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }
}

/// Parses `2026-11-01T00:00:00Z`, `2026-11-01`, or a duration back from now
/// (`90s`, `15m`, `2h`, `7d`).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    let ago = parse_duration(text)?;
    Ok(Utc::now() - chrono::Duration::from_std(ago).map_err(|e| e.to_string())?)
}

/// Parses `90s`, `15m`, `2h`, `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}`: add a unit (s, m, h, d)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a time: use an RFC 3339 time, a date, or a duration like 2h or 7d")
    })?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(number * seconds))
}

fn params_ref(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// One line of `weir dlq list`.
#[derive(Debug)]
pub struct Summary {
    pub id: i64,
    pub failed_at: DateTime<Utc>,
    pub stage: String,
    pub code: String,
    pub table: Option<String>,
    pub source: String,
    pub attempts: i32,
    pub size: i32,
    pub replayed: bool,
    pub message: String,
}

pub async fn list(
    client: &Client,
    dead: &DeadLetterTable,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<Summary>, tokio_postgres::Error> {
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let clause = filter.clause(&mut params);
    params.push(Box::new(limit));
    let rows = client
        .query(
            &format!(
                "SELECT id, failed_at, stage, code, target_table, topic, kafka_partition, kafka_offset,
                        attempts, payload_size, replayed_at IS NOT NULL, message
                   FROM {} WHERE {clause} ORDER BY failed_at DESC, id DESC LIMIT ${}",
                dead.qualified(),
                params.len()
            ),
            &params_ref(&params),
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Summary {
            id: row.get(0),
            failed_at: row.get(1),
            stage: row.get(2),
            code: row.get(3),
            table: row.get(4),
            source: format!(
                "{}/{}@{}",
                row.get::<_, String>(5),
                row.get::<_, i32>(6),
                row.get::<_, i64>(7)
            ),
            attempts: row.get(8),
            size: row.get(9),
            replayed: row.get(10),
            message: row.get(11),
        })
        .collect())
}

/// `payload, payload_encoding` of the dead letter aliased `d`: its own, or,
/// for one whose message's payload is stored with a sibling (an event with
/// several bad items stores its payload once), the sibling's.
fn payload_columns(dead: &DeadLetterTable) -> String {
    let sibling = |column: &str| {
        format!(
            "COALESCE((SELECT c.{column} FROM {table} c
                        WHERE d.payload_encoding = '{SIBLING_ENCODING}'
                          AND c.failed_at = d.failed_at AND c.consumer_group = d.consumer_group
                          AND c.topic = d.topic AND c.kafka_partition = d.kafka_partition
                          AND c.kafka_offset = d.kafka_offset
                          AND c.payload_encoding <> '{SIBLING_ENCODING}'
                        ORDER BY c.id LIMIT 1), d.{column})",
            table = dead.qualified()
        )
    };
    format!("{}, {}", sibling("payload"), sibling("payload_encoding"))
}

/// `weir dlq show`: every field, and the payload restored (capped at
/// `max_bytes`: a dead letter is untrusted input).
pub async fn show(
    client: &Client,
    dead: &DeadLetterTable,
    id: i64,
    max_bytes: usize,
) -> Result<Option<String>, String> {
    let row = client
        .query_opt(
            &format!(
                "SELECT id, failed_at, consumer_group, topic, kafka_partition, kafka_offset, kafka_timestamp,
                        kafka_key, kafka_headers::text, target_table, item_index, item_path, stage, code,
                        message, attempts, {payload}, payload_size, payload_truncated,
                        payload_sha256, replayed_at
                   FROM {} d WHERE id = $1",
                dead.qualified(),
                payload = payload_columns(dead)
            ),
            &[&id],
        )
        .await
        .map_err(|err| db::describe(&err))?;
    let Some(row) = row else { return Ok(None) };
    let mut out = String::new();
    let key: Option<Vec<u8>> = row.get(7);
    let timestamp: Option<DateTime<Utc>> = row.get(6);
    let replayed: Option<DateTime<Utc>> = row.get(21);
    let sha: Option<Vec<u8>> = row.get(20);
    let _ = writeln!(out, "id:            {}", row.get::<_, i64>(0));
    let _ = writeln!(
        out,
        "failed at:     {}",
        row.get::<_, DateTime<Utc>>(1).to_rfc3339()
    );
    let _ = writeln!(out, "group:         {}", row.get::<_, String>(2));
    let _ = writeln!(
        out,
        "source:        {} partition {} offset {}",
        row.get::<_, String>(3),
        row.get::<_, i32>(4),
        row.get::<_, i64>(5)
    );
    let _ = writeln!(
        out,
        "kafka time:    {}",
        timestamp.map(|t| t.to_rfc3339()).unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "key:           {}",
        key.map(|k| String::from_utf8_lossy(&k).into_owned())
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "headers:       {}",
        row.get::<_, Option<String>>(8).unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "table:         {}",
        row.get::<_, Option<String>>(9)
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "item:          {} {}",
        row.get::<_, Option<i32>>(10)
            .map(|i| i.to_string())
            .unwrap_or_else(|| "-".into()),
        row.get::<_, Option<String>>(11).unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "stage / code:  {} / {}",
        row.get::<_, String>(12),
        row.get::<_, String>(13)
    );
    let _ = writeln!(out, "message:       {}", row.get::<_, String>(14));
    let _ = writeln!(out, "attempts:      {}", row.get::<_, i32>(15));
    let encoding: String = row.get(17);
    let size: i32 = row.get(18);
    let truncated: bool = row.get(19);
    let stored: Vec<u8> = row.get(16);
    let _ = writeln!(
        out,
        "payload:       {size} bytes, stored {} as {encoding}{}",
        stored.len(),
        if truncated {
            ", TRUNCATED (only a prefix is kept)"
        } else {
            ""
        }
    );
    if let Some(sha) = sha {
        let _ = writeln!(out, "sha256:        {}", hex::encode(sha));
    }
    if let Some(replayed) = replayed {
        let _ = writeln!(out, "replayed at:   {}", replayed.to_rfc3339());
    }
    match restore_payload(&stored, &encoding, max_bytes) {
        Ok(payload) => {
            out.push_str("---\n");
            match std::str::from_utf8(&payload) {
                Ok(text) => out.push_str(text),
                Err(_) => {
                    out.push_str("(not UTF-8; shown with invalid bytes replaced)\n");
                    out.push_str(&String::from_utf8_lossy(&payload));
                }
            }
            out.push('\n');
        }
        Err(err) => {
            let _ = writeln!(out, "--- payload not shown: {err}");
        }
    }
    Ok(Some(out))
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub selected: usize,
    pub replayed: usize,
    pub rows_written: usize,
    /// Rows already in a table with a dedupe key: skipped, as the live
    /// path skips them; their dead letters count as replayed.
    pub duplicates_skipped: usize,
    pub failed_again: usize,
    /// Truncated payloads cannot be replayed.
    pub skipped: usize,
}

/// Replays the dead letters matching `filter` (at most `limit`).
pub async fn replay(
    client: &mut Client,
    ddl: &mut Client,
    config: &Config,
    prepared: &Prepared,
    filter: &Filter,
    limit: i64,
    dry_run: bool,
) -> Result<ReplayReport, String> {
    let dead = &prepared.dead_letters;
    let decoder = prepared.decoder(config);
    let mut statements = Statements::default();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut filter = filter.clone();
    filter.include_replayed = false;
    let clause = filter.clause(&mut params);
    params.push(Box::new(limit));
    let lock_timeout = Duration::from_millis(config.postgres.ddl_lock_timeout_ms);

    let transaction = client.transaction().await.map_err(|e| db::describe(&e))?;
    // SKIP LOCKED: two replays at once never take the same dead letter.
    let rows = transaction
        .query(
            &format!(
                "SELECT id, failed_at, topic, kafka_partition, kafka_offset, kafka_timestamp, kafka_key,
                        kafka_headers, target_table, item_index, {payload},
                        payload_truncated
                   FROM {} d WHERE {clause} ORDER BY failed_at, id LIMIT ${} FOR UPDATE SKIP LOCKED",
                dead.qualified(),
                params.len(),
                payload = payload_columns(dead)
            ),
            &params_ref(&params),
        )
        .await
        .map_err(|e| db::describe(&e))?;
    let mut report = ReplayReport {
        selected: rows.len(),
        ..Default::default()
    };
    for row in &rows {
        let id: i64 = row.get(0);
        let failed_at: DateTime<Utc> = row.get(1);
        match replay_one(
            &transaction,
            ddl,
            &mut statements,
            &decoder,
            row,
            lock_timeout,
        )
        .await?
        {
            Replayed::Written(written) => {
                report.replayed += 1;
                report.rows_written += written.rows;
                report.duplicates_skipped += written.skipped;
                transaction
                    .execute(
                        &format!(
                            "UPDATE {} SET replayed_at = now() WHERE id = $1 AND failed_at = $2",
                            dead.qualified()
                        ),
                        &[&id, &failed_at],
                    )
                    .await
                    .map_err(|e| db::describe(&e))?;
            }
            Replayed::Failed {
                stage,
                code,
                message,
            } => {
                report.failed_again += 1;
                transaction
                    .execute(
                        &format!(
                            "UPDATE {} SET attempts = attempts + 1, stage = $3, code = $4, message = $5
                              WHERE id = $1 AND failed_at = $2",
                            dead.qualified()
                        ),
                        &[&id, &failed_at, &stage, &code, &message],
                    )
                    .await
                    .map_err(|e| db::describe(&e))?;
            }
            Replayed::Skipped => report.skipped += 1,
        }
    }
    if dry_run {
        transaction.rollback().await.map_err(|e| db::describe(&e))?;
    } else {
        transaction.commit().await.map_err(|e| db::describe(&e))?;
    }
    Ok(report)
}

/// Rows one replayed dead letter wrote.
#[derive(Default)]
struct Written {
    rows: usize,
    /// Rows a dedupe key skipped: already in the table, as the live path
    /// would have found them.
    skipped: usize,
}

enum Replayed {
    Written(Written),
    Failed {
        stage: String,
        code: String,
        message: String,
    },
    Skipped,
}

async fn replay_one(
    transaction: &tokio_postgres::Transaction<'_>,
    ddl: &mut Client,
    statements: &mut Statements,
    decoder: &Decoder,
    row: &Row,
    lock_timeout: Duration,
) -> Result<Replayed, String> {
    let truncated: bool = row.get(12);
    if truncated {
        return Ok(Replayed::Skipped);
    }
    let encoding: String = row.get(11);
    let stored: Vec<u8> = row.get(10);
    let payload = match restore_payload(&stored, &encoding, decoder.max_event_bytes.max(1) + 1) {
        Ok(payload) => payload,
        Err(err) => {
            return Ok(Replayed::Failed {
                stage: Stage::Decode.as_str().into(),
                code: "unreadable_payload".into(),
                message: err,
            });
        }
    };
    let headers: Option<serde_json::Value> = row.get(7);
    let event = Event {
        topic: Arc::from(row.get::<_, String>(2).as_str()),
        partition: row.get(3),
        offset: row.get(4),
        timestamp_ms: row
            .get::<_, Option<DateTime<Utc>>>(5)
            .map(|t| t.timestamp_millis()),
        key: row.get::<_, Option<Vec<u8>>>(6).map(Bytes::from),
        headers: headers_from_json(headers.as_ref()),
        payload: Bytes::from(payload),
    };
    let target: Option<String> = row.get(8);
    let item: Option<i32> = row.get(9);
    let mut gathered = Gathered::default();
    decoder.decode(&event, 0, now_micros(), &mut gathered);
    let concerns = |table: Option<&str>, row_item: Option<u32>| match &target {
        None => true,
        Some(target) => {
            table == Some(target.as_str()) && item.is_none_or(|i| row_item == Some(i as u32))
        }
    };
    if let Some(letter) = gathered
        .dead_letters
        .iter()
        .find(|d| concerns(d.table.as_deref(), d.item))
    {
        return Ok(Replayed::Failed {
            stage: letter.stage.as_str().into(),
            code: letter.code.to_string(),
            message: letter.detail.clone(),
        });
    }
    // Only the rows this dead letter stands for (its table and item).
    let segments: Vec<Sealed> = gathered.segments.into_iter().map(|s| s.seal()).collect();
    let concerned: Vec<HashSet<usize>> = segments
        .iter()
        .map(|segment| {
            let table = decoder.mappings.tables[segment.table].name();
            segment
                .rows
                .iter()
                .enumerate()
                .filter(|(_, r)| concerns(Some(table), Some(r.item)))
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    // The live write path from here on: the same partitions (found or
    // created), the same sinks (a dedupe key's staging table and
    // `ON CONFLICT DO NOTHING`), the same `write_rows`.
    let parts = plan::plan(ddl, &decoder.tables, &segments, lock_timeout)
        .await
        .map_err(|failure| failure.to_string())?;
    let mut writes = Vec::new();
    for part in parts {
        let rows: Vec<usize> = part
            .rows
            .into_iter()
            .filter(|row| concerned[part.segment].contains(row))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let segment = &segments[part.segment];
        // Prepared outside the savepoint: a staging table created inside it
        // would vanish with a rollback to it.
        let sink = statements
            .sink(
                transaction,
                &decoder.mappings,
                &part.leaf.qualified(),
                segment.source,
            )
            .await
            .map_err(|e| db::describe(&e))?;
        writes.push((segment, sink, rows));
    }
    if writes.is_empty() {
        return Ok(Replayed::Failed {
            stage: Stage::Route.as_str().into(),
            code: "no_rows".into(),
            message: "the event no longer yields a row for this table and item".into(),
        });
    }
    transaction
        .batch_execute("SAVEPOINT weir_replay")
        .await
        .map_err(|e| db::describe(&e))?;
    let mut written = Written::default();
    for (segment, sink, rows) in &writes {
        match write_rows(transaction, sink, segment, rows).await {
            Ok(inserted) => {
                let offered = rows.len() as u64;
                written.rows += inserted.min(offered) as usize;
                written.skipped += (offered - inserted.min(offered)) as usize;
            }
            Err(err) if db::classify(&err) == ErrorClass::Row => {
                transaction
                    .batch_execute(
                        "ROLLBACK TO SAVEPOINT weir_replay; RELEASE SAVEPOINT weir_replay",
                    )
                    .await
                    .map_err(|e| db::describe(&e))?;
                return Ok(Replayed::Failed {
                    stage: Stage::Write.as_str().into(),
                    code: db::sqlstate(&err),
                    message: db::describe(&err),
                });
            }
            Err(err) => return Err(db::describe(&err)),
        }
    }
    transaction
        .batch_execute("RELEASE SAVEPOINT weir_replay")
        .await
        .map_err(|e| db::describe(&e))?;
    Ok(Replayed::Written(written))
}

fn headers_from_json(value: Option<&serde_json::Value>) -> Headers {
    let Some(serde_json::Value::Array(items)) = value else {
        return Default::default();
    };
    let pairs: Vec<(&str, Option<Cow<'_, [u8]>>)> = items
        .iter()
        .filter_map(|item| {
            let key = item.get("key")?.as_str()?;
            let value = if let Some(text) = item.get("value").and_then(|v| v.as_str()) {
                Some(Cow::Borrowed(text.as_bytes()))
            } else {
                item.get("value_hex")
                    .and_then(|v| v.as_str())
                    .and_then(|h| hex::decode(h).ok())
                    .map(Cow::Owned)
            };
            Some((key, value))
        })
        .collect();
    Headers::from_pairs(pairs.iter().map(|(key, value)| (*key, value.as_deref())))
}

/// Deletes matching dead letters (replayed ones included), optionally only
/// those older than `older_than`. Returns how many (would have) gone.
pub async fn purge(
    client: &mut Client,
    dead: &DeadLetterTable,
    filter: &Filter,
    older_than: Option<Duration>,
    dry_run: bool,
) -> Result<u64, tokio_postgres::Error> {
    let mut filter = filter.clone();
    filter.include_replayed = true;
    if let Some(age) = older_than {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::zero());
        filter.until = Some(filter.until.map_or(cutoff, |u| u.min(cutoff)));
    }
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let clause = filter.clause(&mut params);
    let transaction = client.transaction().await?;
    let deleted = transaction
        .execute(
            &format!("DELETE FROM {} WHERE {clause}", dead.qualified()),
            &params_ref(&params),
        )
        .await?;
    if dry_run {
        transaction.rollback().await?;
    } else {
        transaction.commit().await?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_kept_with_a_dead_letter_come_back_whole_on_replay() {
        let headers = Headers::from_pairs([
            ("company_id", Some(&b"6f1f7a7e"[..])),
            ("trace", None),
            ("empty", Some(&b""[..])),
            ("binary", Some(&[0xff, 0x00, 0x80][..])),
            ("company_id", Some(&b"second"[..])),
        ]);
        let event = Event {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            headers: headers.clone(),
            payload: Bytes::new(),
        };
        let stored = crate::store::deadletter::headers_json(&event);
        assert_eq!(headers_from_json(Some(&stored)), headers);
        assert!(headers_from_json(None).is_empty());
    }

    #[test]
    fn durations_and_times_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("7w").is_err());
        assert_eq!(
            parse_time("2026-11-01").unwrap(),
            DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z").unwrap()
        );
        assert!(parse_time("2h").unwrap() < Utc::now());
        assert!(parse_time("soon").is_err());
    }

    #[test]
    fn filters_build_numbered_conditions() {
        let filter = Filter {
            table: Some("wa_events".into()),
            code: Some("23505".into()),
            ..Default::default()
        };
        let mut params = Vec::new();
        assert_eq!(
            filter.clause(&mut params),
            "target_table = $1 AND code = $2 AND replayed_at IS NULL"
        );
        assert_eq!(params.len(), 2);
    }
}
