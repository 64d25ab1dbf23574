//! Secrets stay secret: weir runs with a known database password (in
//! `WEIR_DATABASE_URL`) and a known SASL password (as
//! `WEIR_KAFKA__PROPERTIES__SASL_PASSWORD`, the documented way), at debug
//! log level, through a working run (rows, dead letters, a scrape of
//! `/metrics` and `/readyz`), a `check`, and runs whose database is
//! unreachable (the error paths, where connection strings tend to leak).
//! Neither password appears in any of it.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Fixture;
use weir_loadtest::webhooks::Shape;

const DB_PASSWORD: &str = "pg-Secret-7f3a91c2";
const SASL_PASSWORD: &str = "sasl-Secret-44be10d9";

/// A weir command with both secrets in its environment, logging at debug.
fn weir(config: &Path, url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .env("WEIR_DATABASE_URL", url)
        .env("WEIR_KAFKA__PROPERTIES__SASL_USERNAME", "weir")
        .env("WEIR_KAFKA__PROPERTIES__SASL_PASSWORD", SASL_PASSWORD)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null());
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [DB_PASSWORD, SASL_PASSWORD] {
        if let Some(line) = text.lines().find(|line| line.contains(secret)) {
            panic!("{what} shows a password: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_appear_in_no_log_line_and_no_metric() {
    let Fixture {
        db, topics, group, ..
    } = Fixture::new("secrets", 2).await;
    // A role of its own with a known password; the URL carries it.
    let role = common::unique("weir_secret");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN SUPERUSER PASSWORD '{DB_PASSWORD}'"
        ))
        .await
        .expect("create the role");
    let stack_url = &common::stack().database_url;
    let url = stack_url.replacen("://postgres@", &format!("://{role}:{DB_PASSWORD}@"), 1);
    assert!(
        url.contains(DB_PASSWORD),
        "the URL carries the password: {url}"
    );

    let mut sent = common::generate(
        Shape {
            seed: 61,
            malformed_share: 0.1,
            ..Shape::default()
        },
        400,
    );
    let target = common::produce(&topics, &mut sent).await;
    let port = common::free_port();
    let mut table: toml::Table =
        toml::from_str(&common::config_text(&db.schema, &topics, &group, "")).expect("config");
    table
        .entry("http")
        .or_insert(toml::Value::Table(Default::default()))
        .as_table_mut()
        .expect("http")
        .insert("listen".into(), format!("127.0.0.1:{port}").into());
    let dir = std::env::temp_dir().join(common::unique("secrets"));
    let config = common::write_config(&dir, &toml::to_string(&table).expect("config"));

    // A working run: everything written, dead letters kept, scraped.
    let log_path = dir.join("run.log");
    let mut child = weir(&config, &url, &["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start weir");
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(90)).await;
    let (status, metrics) = common::http_get(port, "/metrics").await;
    assert_eq!(status, 200);
    let (_, readyz) = common::http_get(port, "/readyz").await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = child.wait().expect("wait for weir");
    assert!(exit.success(), "weir stopped cleanly");
    let run_log = std::fs::read_to_string(&log_path).expect("run log");
    // The searches below cover real output.
    assert!(
        run_log.contains("partition assigned") && run_log.contains("DEBUG"),
        "the run logged at debug level:\n{run_log}"
    );
    assert!(
        common::scraped(&metrics, "weir_dead_letters_total") > 0.0,
        "the run made dead letters"
    );
    assert_no_secret("the run's log", &run_log);
    assert_no_secret("/metrics", &metrics);
    assert_no_secret("/readyz", &readyz);

    // `check` against the same database.
    let checked = weir(&config, &url, &["check"])
        .output()
        .expect("weir check");
    assert!(
        checked.status.success(),
        "check passes:\n{}",
        text(&checked)
    );
    assert_no_secret("weir check", &text(&checked));

    // The database unreachable: the connection errors name the host, never
    // the password.
    let closed = common::free_port();
    let unreachable = url.replacen(":55432/", &format!(":{closed}/"), 1);
    let unreachable = if unreachable == url {
        // The stack listens elsewhere: swap whatever port the URL has.
        let (head, tail) = url.rsplit_once(':').expect("a port in the URL");
        let db_name = tail.split_once('/').map(|(_, d)| d).unwrap_or("weir");
        format!("{head}:{closed}/{db_name}")
    } else {
        unreachable
    };
    assert!(unreachable.contains(DB_PASSWORD));
    let refused = weir(&config, &unreachable, &["check"])
        .output()
        .expect("weir check");
    assert!(!refused.status.success(), "check fails without a database");
    let refused_text = text(&refused);
    assert!(
        refused_text.contains(&closed.to_string())
            || refused_text.to_lowercase().contains("connect"),
        "the error says what failed:\n{refused_text}"
    );
    assert_no_secret("weir check without a database", &refused_text);
    let migrate = weir(&config, &unreachable, &["migrate"])
        .output()
        .expect("weir migrate");
    assert!(
        !migrate.status.success(),
        "migrate fails without a database"
    );
    assert_no_secret("weir migrate without a database", &text(&migrate));

    db.client
        .batch_execute(&format!(
            "REASSIGN OWNED BY \"{role}\" TO CURRENT_USER; DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""
        ))
        .await
        .expect("drop the role");
}
