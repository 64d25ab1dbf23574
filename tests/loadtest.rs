//! The load generator and the exactly-once verifier, end to end: the real
//! `weir-loadtest` binary sends webhook bodies (malformed ones and
//! redeliveries included) to the broker, weir drains them into PostgreSQL,
//! and `weir-loadtest verify` must find every event exactly once where it
//! belongs. Then the verifier is shown to catch a lost row and a duplicated
//! one.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Fixture;

fn loadtest(args: &[&str]) -> Output {
    let stack = common::stack();
    Command::new(common::loadtest_binary())
        .args(args)
        .env("WEIR_DATABASE_URL", &stack.database_url)
        .env("WEIR_KAFKA__BROKERS", &stack.brokers)
        .output()
        .expect("weir-loadtest runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn verify(run: &Path, schema: &str, group: &str, wait_secs: &str) -> Output {
    loadtest(&[
        "verify",
        "--run",
        run.to_str().expect("utf-8 path"),
        "--schema",
        schema,
        "--group",
        group,
        "--wait-secs",
        wait_secs,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_traffic_verifies_exactly_once_and_verify_catches_damage() {
    // The generator creates the topics.
    let Fixture {
        db,
        topics,
        group,
        config,
    } = Fixture::without_topics("lt").await;
    let run_dir = std::env::temp_dir().join(common::unique("weir-loadtest-run"));

    // 600 bodies at a fixed seed: late events, 4% malformed, 5% redelivered.
    let produced = loadtest(&[
        "produce",
        "--count",
        "600",
        "--seed",
        "4242",
        "--malformed",
        "0.04",
        "--duplicates",
        "0.05",
        "--late",
        "0.05",
        "--partitions",
        "3",
        "--topic-prefix",
        &topics.prefix,
        "--out",
        run_dir.to_str().expect("utf-8 path"),
        "--quiet",
    ]);
    assert!(produced.status.success(), "produce:\n{}", text(&produced));

    let weir = common::Running::start(config);
    let verified = verify(&run_dir, &db.schema, &group, "180");
    let report = text(&verified);
    println!("{report}");
    assert!(verified.status.success(), "verify should pass:\n{report}");
    assert!(report.contains("verify: ok"), "{report}");
    for table in ["wa_events", "messages", "webhook_logs", "dead letters"] {
        let line = report
            .lines()
            .find(|l| l.starts_with(table))
            .unwrap_or_else(|| panic!("verify reports {table}:\n{report}"));
        assert!(line.ends_with("ok"), "{line}");
    }
    // The run was not trivial: it holds redeliveries and malformed bodies,
    // and the malformed ones are dead letters.
    assert!(!report.contains("0 redeliveries"), "{report}");
    assert!(!report.contains("0 malformed"), "{report}");
    assert!(
        db.count(&format!(
            "SELECT count(*) FROM \"{}\".weir_dead_letters",
            db.schema
        ))
        .await
            > 0
    );
    weir.stop().await;

    // Damage: one wa_events row lost, one messages row written twice.
    let client = common::connect(&common::stack().database_url).await;
    let s = &db.schema;
    client
        .batch_execute(&format!(
            "DELETE FROM \"{s}\".wa_events WHERE (tableoid, ctid) =
                (SELECT tableoid, ctid FROM \"{s}\".wa_events LIMIT 1);
             -- the dedupe index would refuse the planted duplicate
             DROP INDEX \"{s}\".messages_message_uidx;"
        ))
        .await
        .expect("damage the tables");
    client
        .batch_execute(&format!(
            "INSERT INTO \"{s}\".messages SELECT * FROM \"{s}\".messages LIMIT 1"
        ))
        .await
        .expect("duplicate a messages row");

    let damaged = verify(&run_dir, &db.schema, &group, "5");
    let report = text(&damaged);
    println!("{report}");
    assert!(!damaged.status.success(), "verify should fail:\n{report}");
    assert!(report.contains("verify: FAILED"), "{report}");
    let columns = |table: &str| -> Vec<String> {
        report
            .lines()
            .find(|l| l.starts_with(table))
            .unwrap_or_else(|| panic!("verify reports {table}:\n{report}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // TABLE EXPECTED FOUND MISSING DUPLICATED UNEXPECTED RESULT
    let wa = columns("wa_events");
    assert_eq!(
        (wa[3].as_str(), wa[6].as_str()),
        ("1", "MISMATCH"),
        "{wa:?}"
    );
    let messages = columns("messages");
    assert_eq!(
        (messages[4].as_str(), messages[6].as_str()),
        ("1", "MISMATCH"),
        "{messages:?}"
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}
