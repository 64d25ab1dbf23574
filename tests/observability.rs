//! What operators see: the /metrics scrape after a real run (every stage
//! timed, counters equal to what PostgreSQL holds, lag back to 0, a clean
//! `promtool check metrics`), the alert rules (`promtool check rules`), the
//! dashboard and rules referring only to metrics weir exports, the README
//! documenting every metric, and /readyz following PostgreSQL down and up.
//! (Its own test binary: it installs the process-wide metrics recorder.)

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::webhooks::Shape;
use common::{TestDb, Topics};
use metrics_exporter_prometheus::PrometheusHandle;
use yaml_rust2::YamlLoader;

fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| weir::metrics::install().expect("install the recorder"))
        .clone()
}

/// Sum of the samples of `name` whose labels contain every `label="value"`.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether weir's /metrics on `port` has exactly the sample line `line`.
async fn scrape_shows(port: u16, line: &str) -> bool {
    let (_, scrape) = common::http_get(port, "/metrics").await;
    scrape.lines().any(|l| l == line)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool should be installed (tests/run.sh installs Debian's prometheus package)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("promtool");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_after_a_run_matches_postgresql() {
    let handle = recorder();
    let db = TestDb::new("scrape").await;
    let topics = Topics::new("scrape");
    topics.create(2).await;
    let group = common::unique("g");
    let mut config = common::config(&db.schema, &topics, &group, "");
    let port = common::free_port();
    config.http.listen = format!("127.0.0.1:{port}").parse().expect("address");
    // Statistics (and so the lag gauge) every second.
    config.kafka.properties.insert(
        "statistics.interval.ms".into(),
        weir::config::PropertyValue::Text("1000".into()),
    );
    db.migrate(&config).await;
    let mut sent = common::generate(
        Shape {
            seed: 61,
            malformed_share: 0.05,
            ..Shape::default()
        },
        3000,
    );
    let target = common::produce(&topics, &mut sent).await;

    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(weir::pipeline::run(
        Arc::new(config),
        async {
            let _ = stop_rx.await;
        },
        Some(handle.clone()),
    ));
    common::wait_for_offsets(&db, &group, target, Duration::from_secs(120)).await;
    // Lag is back to 0 once the stored offsets reach the end.
    common::eventually(
        "lag back to 0 on every partition",
        Duration::from_secs(30),
        || async {
            let (_, scrape) = common::http_get(port, "/metrics").await;
            let lags: Vec<f64> = scrape
                .lines()
                .filter(|l| l.starts_with("weir_consumer_lag{") && l.contains(&topics.prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
                .collect();
            lags.len() == 4 && lags.iter().all(|lag| *lag == 0.0)
        },
    )
    .await;
    // Everything is committed, so the in-flight budget is all released:
    // what the consumer charged each event when it took it (the event,
    // and room for its rows) and the batcher's correction to the rows'
    // encoded size (malformed events encode none) add up to what the
    // batches released.
    common::eventually("in-flight bytes back to 0", Duration::from_secs(10), || {
        scrape_shows(port, "weir_in_flight_bytes 0")
    })
    .await;
    // ... and the client holds nothing fetched ahead (its statistics come
    // every 5 s).
    common::eventually(
        "prefetched bytes reported and back to 0",
        Duration::from_secs(15),
        || scrape_shows(port, "weir_kafka_prefetched_bytes 0"),
    )
    .await;
    // Kafka commits happen every second; wait for one to be timed.
    common::eventually("a Kafka commit timed", Duration::from_secs(10), || async {
        let (_, scrape) = common::http_get(port, "/metrics").await;
        sample(
            &scrape,
            "weir_stage_duration_seconds_count",
            &[("stage", "kafka_commit")],
        ) > 0.0
    })
    .await;
    let (status, scrape) = common::http_get(port, "/metrics").await;
    assert_eq!(status, 200);
    let (ready, _) = common::http_get(port, "/readyz").await;
    assert_eq!(ready, 200);
    let _ = stop.send(());
    run.await.expect("task").expect("pipeline");

    for stage in weir::metrics::stage::ALL {
        let count = sample(
            &scrape,
            "weir_stage_duration_seconds_count",
            &[("stage", stage)],
        );
        assert!(count > 0.0, "stage {stage} has observations");
    }
    let s = &db.schema;
    for table in ["wa_events", "messages", "webhook_logs"] {
        let rows = db
            .count(&format!("SELECT count(*) FROM \"{s}\".{table}"))
            .await as f64;
        // This test binary runs one pipeline at a time, so the process-wide
        // counters are this run's.
        assert_eq!(
            sample(&scrape, "weir_rows_written_total", &[("table", table)]),
            rows,
            "{table}"
        );
        let kafka = sample(
            &scrape,
            "weir_end_to_end_seconds_count",
            &[("table", table), ("from", "kafka")],
        );
        assert_eq!(kafka, rows, "one end-to-end observation per row of {table}");
    }
    let dead = db
        .count(&format!("SELECT count(*) FROM \"{s}\".weir_dead_letters"))
        .await as f64;
    assert!(dead > 0.0, "the malformed share produced dead letters");
    assert_eq!(sample(&scrape, "weir_dead_letters_total", &[]), dead);
    assert_eq!(sample(&scrape, "weir_build_info", &[]), 1.0);

    let (ok, report) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok, "promtool check metrics:\n{report}");
}

#[test]
fn alert_rules_pass_promtool_and_use_only_weir_metrics() {
    let rules = common::project_root().join("deploy/prometheus/alerts.yml");
    let (ok, report) = promtool(&["check", "rules", rules.to_str().expect("path")], None);
    assert!(ok, "promtool check rules:\n{report}");
    let text = std::fs::read_to_string(&rules).expect("rules");
    assert_known_metrics("alerts.yml", &text);
    for alert in [
        "WeirLagGrowing",
        "WeirDeadLetters",
        "WeirNoCommits",
        "WeirNotReady",
        "WeirRetriesStorming",
        "WeirLatencyHigh",
        "WeirAbsent",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert}");
    }

    // Unit tests: every alert has a case in which it fires.
    let tests = common::project_root().join("deploy/prometheus/alerts.test.yml");
    let (ok, report) = promtool(&["test", "rules", tests.to_str().expect("path")], None);
    assert!(ok, "promtool test rules:\n{report}");
    let rules = &YamlLoader::load_from_str(&text).expect("rules YAML")[0];
    let cases = &YamlLoader::load_from_str(&std::fs::read_to_string(&tests).expect("tests"))
        .expect("tests YAML")[0];
    for rule in rules["groups"][0]["rules"].as_vec().expect("rules") {
        let alert = rule["alert"].as_str().expect("alert name");
        assert!(
            rule["annotations"]["runbook"].as_str().is_some(),
            "{alert} has runbook text"
        );
        let fires = cases["tests"].as_vec().expect("tests").iter().any(|case| {
            case["alert_rule_test"]
                .as_vec()
                .into_iter()
                .flatten()
                .any(|check| {
                    check["alertname"].as_str() == Some(alert)
                        && check["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty())
                })
        });
        assert!(fires, "{alert}: no test case in which it fires");
    }
}

#[test]
fn the_dashboard_uses_only_weir_metrics_and_covers_the_essentials() {
    let path = common::project_root().join("deploy/grafana/weir-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert_known_metrics("weir-dashboard.json", &exprs.join("\n"));
    for needed in [
        "weir_rows_written_total",
        "weir_stage_duration_seconds_bucket",
        "weir_end_to_end_seconds_bucket",
        "weir_consumer_lag",
        "weir_dead_letters_total",
        "weir_partitions_created_total",
        "weir_in_flight_rows",
        "weir_offset_gaps_total",
        "weir_bisect_copies_total",
        "weir_duplicates_skipped_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(needed)),
            "dashboard shows {needed}"
        );
    }
    assert!(text.contains("\"heatmap\""), "stage latency heatmap");
    // One Prometheus may scrape several deployments: every query is scoped
    // by the dashboard's job variable, and lag is counted per partition.
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(variables.contains(&"job"), "a job variable");
    for expr in &exprs {
        assert!(expr.contains("job=~\"$job\""), "not scoped by $job: {expr}");
    }
    assert!(
        exprs
            .iter()
            .filter(|e| e.contains("weir_consumer_lag"))
            .all(|e| e.contains("max by (topic, partition)")),
        "lag is counted once per partition"
    );
}

#[test]
fn the_readme_explains_every_metric() {
    let readme = std::fs::read_to_string(common::project_root().join("README.md")).expect("README");
    for name in weir::metrics::ALL {
        assert!(readme.contains(name), "README documents {name}");
    }
}

fn assert_known_metrics(file: &str, text: &str) {
    let known: BTreeSet<&str> = weir::metrics::ALL.iter().copied().collect();
    let mut used = BTreeSet::new();
    for (start, _) in text.match_indices("weir_") {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_string();
        used.insert(base);
    }
    for name in &used {
        assert!(
            known.contains(name.as_str()),
            "{file} uses {name}, which weir does not export"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_postgresql_down_and_up_and_start_waits_for_it() {
    recorder();
    // A PostgreSQL of this test's own, so stopping it disturbs no other test.
    let dir = std::env::temp_dir().join(common::unique("readyz-pg"));
    let port = common::free_port();
    let stack = |command: &str| common::private_postgres(&dir, port, command);
    let up = stack("postgres-up");
    let url = up
        .lines()
        .find_map(|l| l.strip_prefix("export WEIR_DATABASE_URL="))
        .expect("url")
        .trim_matches('\'')
        .to_string();

    let topics = Topics::new("readyz");
    topics.create(1).await;
    let group = common::unique("g");
    let mut config = common::config("public", &topics, &group, "");
    config.database_url = Some(weir::config::Secret::new(url.clone()));
    config.pipeline.retry_max_ms = 1000;
    let mut client = weir::store::db::connect(&url, &config.postgres, "test")
        .await
        .expect("connect");
    weir::store::schema::migrate(&mut client, &config, false)
        .await
        .expect("migrate");
    drop(client);

    // weir started while PostgreSQL is down waits for it (a session lost
    // while starting is retried), rather than exiting at once.
    stack("postgres-stop");
    let http = common::free_port();
    config.http.listen = format!("127.0.0.1:{http}").parse().expect("address");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(weir::pipeline::run(
        Arc::new(config),
        async {
            let _ = stop_rx.await;
        },
        Some(recorder()),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !run.is_finished(),
        "weir gave up at start while PostgreSQL was down: {:?}",
        run.await
    );
    stack("postgres-up");
    common::eventually("ready", Duration::from_secs(60), || async {
        common::http_get(http, "/readyz").await.0 == 200
    })
    .await;

    stack("postgres-stop");
    common::eventually(
        "not ready while PostgreSQL is down",
        Duration::from_secs(30),
        || async {
            let (status, body) = common::http_get(http, "/readyz").await;
            status == 503 && body.contains("PostgreSQL")
        },
    )
    .await;
    let (_, reasons) = common::http_get(http, "/readyz").await;
    println!("readyz with PostgreSQL down:\n{}", reasons.trim());
    assert_eq!(
        common::http_get(http, "/healthz").await.0,
        200,
        "still alive: no restart wanted"
    );

    stack("postgres-up");
    common::eventually("ready again", Duration::from_secs(60), || async {
        common::http_get(http, "/readyz").await.0 == 200
    })
    .await;
    let _ = stop.send(());
    run.await.expect("task").expect("pipeline");
    stack("postgres-destroy");
}
