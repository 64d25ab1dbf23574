//! Least privilege: weir runs as a plain LOGIN role with exactly the grants
//! the README's Security section lists, not as a superuser.
//!
//! The role gets `CONNECT, TEMPORARY` on the database and `USAGE, CREATE` on
//! a schema of its own, nothing else; it runs `weir migrate` (so it owns
//! the tables), then `weir run` through the real broker:
//! - every row lands exactly once and every bad event is a dead letter;
//! - partitions missing for past event times are created (owned by the
//!   role);
//! - retention drops an expired partition of `webhook_logs` and of the
//!   dead-letter table;
//! - a reader role with the documented `SELECT` grant reads dead letters, a
//!   role without it cannot; the documented purge-by-tenant `DELETE`
//!   removes exactly one tenant's dead letters.
//!
//! Then one needed grant is revoked (`CREATE` on the schema) and events
//! that need a new partition arrive: weir stops writing with one clear
//! reason on /readyz that names the privilege and the schema, commits
//! nothing further and dead-letters nothing.

mod common;

use std::time::Duration;

use common::{Running, TestDb, Topics};
use weir_loadtest::webhooks::Shape;

/// Drops the test's roles (and what they own) and schema, also on panic.
struct Cleanup {
    schema: String,
    roles: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut statements = vec![format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema)];
        for role in &self.roles {
            statements.push(format!("DROP OWNED BY \"{role}\""));
            statements.push(format!("DROP ROLE IF EXISTS \"{role}\""));
        }
        common::clean_up_sql(statements);
    }
}

/// The stack's URL with `role` as the user (the local stack trusts
/// loopback, so no password).
fn url_as(role: &str) -> String {
    let url = &common::stack().database_url;
    assert!(url.contains("://postgres@"), "stack URL: {url}");
    url.replacen("://postgres@", &format!("://{role}@"), 1)
}

async fn connect_as(role: &str) -> tokio_postgres::Client {
    common::connect(&url_as(role)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_runs_as_a_least_privilege_role_and_a_missing_grant_is_named() {
    let db = TestDb::new("privileges").await;
    let s = db.schema.clone();
    let role = common::unique("weir_role");
    let reader = common::unique("weir_dlq_reader");
    let outsider = common::unique("weir_outsider");
    let _cleanup = Cleanup {
        schema: s.clone(),
        roles: vec![role.clone(), reader.clone(), outsider.clone()],
    };
    let database: String = db
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .expect("database")
        .get(0);
    // Exactly the README's grants.
    db.client
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN;
             GRANT CONNECT, TEMPORARY ON DATABASE \"{database}\" TO \"{role}\";
             GRANT USAGE, CREATE ON SCHEMA \"{s}\" TO \"{role}\";
             CREATE ROLE \"{reader}\" LOGIN;
             CREATE ROLE \"{outsider}\" LOGIN;"
        ))
        .await
        .expect("create the roles");
    let attributes = db
        .client
        .query_one(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication
               FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("role attributes");
    for index in 0..5 {
        assert!(
            !attributes.get::<_, bool>(index),
            "the role has no special attribute"
        );
    }

    let topics = Topics::new("privileges");
    topics.create(2).await;
    let group = common::unique("g");
    let mut config = common::config(&s, &topics, &group, "");
    config.database_url = Some(weir::config::Secret::new(url_as(&role)));
    config.pipeline.retry_max_ms = 1000;

    // `weir migrate`, as the role: it owns what it creates.
    let mut client = weir::store::db::connect(&url_as(&role), &config.postgres, "test-migrate")
        .await
        .expect("the role connects");
    weir::store::schema::migrate(&mut client, &config, false)
        .await
        .expect("the role can migrate");
    drop(client);
    let foreign: i64 = db
        .count(&format!(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = '{s}' AND c.relkind IN ('r', 'p')
                AND pg_get_userbyid(c.relowner) <> '{role}'"
        ))
        .await;
    assert_eq!(foreign, 0, "every table of the schema belongs to the role");

    // Expired partitions, made the way weir makes them (by the role), for
    // retention to drop: webhook_logs keeps 30 days, dead letters 14.
    let weir_session = connect_as(&role).await;
    weir_session
        .batch_execute(&format!(
            "CREATE TABLE \"{s}\".webhook_logs_p20200101 PARTITION OF \"{s}\".webhook_logs
                 FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00');
             CREATE TABLE \"{s}\".weir_dead_letters_p20200101 PARTITION OF \"{s}\".weir_dead_letters
                 FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-01-02 00:00+00');"
        ))
        .await
        .expect("the role creates old partitions");

    // The happy path, as the role.
    let mut sent = common::generate(
        Shape {
            seed: 71,
            malformed_share: 0.1,
            ..Shape::default()
        },
        600,
    );
    let target = common::produce(&topics, &mut sent).await;
    let running = Running::start(config.clone());
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(60)).await;
    common::eventually(
        "retention drops the expired partitions",
        Duration::from_secs(30),
        || async {
            db.count(&format!(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = '{s}' AND c.relname LIKE '%\\_p20200101'"
            ))
            .await
                == 0
        },
    )
    .await;
    running.stop().await;
    common::assert_exactly_once(&db, &sent, &topics).await;
    let dead = db
        .count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
        .await;
    assert!(dead > 0, "the run made dead letters");
    // Event times go 40 days back: wa_events (monthly) needed a partition
    // for a month weir does not premake (it premakes now and ahead).
    let past = db
        .count(&format!(
            "SELECT count(*) FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = '\"{s}\".wa_events'::regclass
                AND pg_get_userbyid(c.relowner) = '{role}'
                AND c.relname < 'wa_events_p' || to_char(date_trunc('month', now()), 'YYYYMMDD')"
        ))
        .await;
    assert!(past > 0, "a missing past partition was created by the role");

    // PII: readers of dead letters need an explicit SELECT.
    db.client
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA \"{s}\" TO \"{reader}\", \"{outsider}\";
             GRANT SELECT ON \"{s}\".weir_dead_letters TO \"{reader}\";"
        ))
        .await
        .expect("grant the reader");
    let readable: i64 = connect_as(&reader)
        .await
        .query_one(
            &format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"),
            &[],
        )
        .await
        .expect("the reader reads dead letters")
        .get(0);
    assert_eq!(readable, dead, "the reader sees every dead letter");
    let refused = connect_as(&outsider)
        .await
        .query_one(
            &format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"),
            &[],
        )
        .await
        .expect_err("a role without SELECT cannot read dead letters");
    assert!(
        weir::store::db::describe(&refused).contains("permission denied"),
        "{refused}"
    );

    // PII: purge one tenant's dead letters, as the README says.
    let tenant: String = db
        .client
        .query_one(
            &format!(
                "SELECT h->>'value' FROM \"{s}\".weir_dead_letters d,
                        jsonb_array_elements(d.kafka_headers) h
                  WHERE h->>'key' = 'company_id'
                  GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
            ),
            &[],
        )
        .await
        .expect("a tenant with dead letters")
        .get(0);
    let of_tenant = format!(
        "SELECT count(*) FROM \"{s}\".weir_dead_letters
          WHERE kafka_headers @> jsonb_build_array(jsonb_build_object('key', 'company_id', 'value', '{tenant}'))"
    );
    let before = db.count(&of_tenant).await;
    assert!(before > 0);
    let deleted = weir_session
        .execute(
            &format!(
                "DELETE FROM \"{s}\".weir_dead_letters
                  WHERE kafka_headers @> jsonb_build_array(jsonb_build_object('key', 'company_id', 'value', $1::text))"
            ),
            &[&tenant],
        )
        .await
        .expect("purge by tenant, as the role");
    assert_eq!(
        deleted as i64, before,
        "the purge took the tenant's letters"
    );
    assert_eq!(db.count(&of_tenant).await, 0);
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        dead - before,
        "other tenants' dead letters stay"
    );

    // One needed grant taken away: CREATE on the schema, which creating a
    // partition needs. Events 200 days old need wa_events and messages
    // partitions that do not exist (webhook_logs goes by Kafka's timestamp,
    // so it needs none). No chat messages: a chat batch that happened to be
    // written first would name the messages table for the same reason.
    db.client
        .batch_execute(&format!("REVOKE CREATE ON SCHEMA \"{s}\" FROM \"{role}\""))
        .await
        .expect("revoke");
    let mut old = common::generate(
        Shape {
            seed: 72,
            spread_secs: 86_400,
            late_share: 0.0,
            chat_share: 0.0,
            now_secs: chrono::Utc::now().timestamp() - 200 * 86_400,
            ..Shape::default()
        },
        50,
    );
    let dead_before = db
        .count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
        .await;
    let offsets_before = common::stored_offsets(&db).await;
    common::produce(&topics, &mut old).await;
    let mut revoked = config.clone();
    revoked.postgres.writers = 1;
    let running = Running::start(revoked);
    // The body that first names the privilege is the one checked (a second
    // request could land between two retries of the batch).
    let refused = std::sync::Mutex::new(String::new());
    common::eventually(
        "not ready, naming the missing privilege",
        Duration::from_secs(45),
        || async {
            let (status, body) = running.get("/readyz").await;
            let named = status == 503 && body.contains("permission denied");
            if named {
                *refused.lock().expect("not poisoned") = body;
            }
            named
        },
    )
    .await;
    let body = refused.into_inner().expect("not poisoned");
    println!("readyz without CREATE on the schema:\n{}", body.trim());
    let reasons: Vec<&str> = body
        .lines()
        .filter(|line| line.contains("permission denied"))
        .collect();
    assert_eq!(reasons.len(), 1, "one reason: {body}");
    let reason = reasons[0];
    // The batch needs a wa_events and a messages partition; the reason names
    // whichever weir tried to create first.
    assert!(
        ["\".\"wa_events\" for", "\".\"messages\" for"]
            .iter()
            .any(|table| reason.contains(table)),
        "the reason names the partition's table: {reason}"
    );
    for needle in [
        "cannot create the partition of",
        "permission denied for schema",
        s.as_str(),
        "42501",
    ] {
        assert!(
            reason.contains(needle),
            "the reason names `{needle}`: {reason}"
        );
    }
    let stuck = common::offsets_hold_still(&db).await;
    assert_eq!(
        stuck, offsets_before,
        "nothing is committed while the batch cannot be written"
    );
    assert_eq!(
        db.count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
            .await,
        dead_before,
        "a missing grant makes no dead letters"
    );
    running.stop().await;
}
