//! The chaos runner at a small N, in CI: `weir-loadtest chaos` provisions a
//! private PostgreSQL and tansu (behind its fault proxies), runs three weir
//! processes of this build in one group, and injects every fault at least
//! once while the generator sends batched, compressed, idempotent traffic
//! (malformed bodies and redeliveries included): kill -9, PostgreSQL
//! restarts (fast and immediate), pg_terminate_backend, a broker outage, a
//! join and a leave, a zombie (SIGSTOP past the session timeout), and a
//! slow then stalled database. After each fault it drains and accounts for
//! every item of the run: nothing lost, nothing written twice, every bad
//! body a dead letter with its reason. The full-N run is in
//! loadtest/RESULTS.md.

mod common;

use std::process::Command;

/// The table row of a fault: its cells.
fn row<'a>(output: &'a str, fault: &str) -> Vec<&'a str> {
    output
        .lines()
        .find(|line| line.starts_with(&format!("| {fault}")))
        .unwrap_or_else(|| panic!("no table row for `{fault}`:\n{output}"))
        .split('|')
        .map(str::trim)
        .filter(|cell| !cell.is_empty())
        .collect()
}

#[test]
fn every_fault_once_loses_nothing_and_writes_nothing_twice() {
    let work_dir = std::env::temp_dir().join(common::unique("weir-chaos"));
    let output = Command::new(common::loadtest_binary())
        .current_dir(common::project_root())
        .args([
            "chaos",
            "--runs",
            "kill9=2,pg-restart=2,terminate=1,broker-outage=1,rebalance=1,zombie=1,slow-db=1",
            "--processes",
            "3",
            "--rate",
            "300",
            "--secs",
            "4",
            "--outage-secs",
            "8",
            "--patience-secs",
            "120",
            "--weir",
            env!("CARGO_BIN_EXE_weir"),
            "--work-dir",
        ])
        .arg(&work_dir)
        .output()
        .expect("weir-loadtest chaos runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    assert!(output.status.success(), "chaos failed:\n{text}");
    assert!(text.contains("chaos: ok"), "{text}");
    // | fault | runs | events | items | lost | duplicated | unexpected | dead letters | p50 | max | notes |
    for (fault, runs) in [
        ("kill -9", "2"),
        ("PostgreSQL restart", "2"),
        ("pg_terminate_backend", "1"),
        ("broker unreachable", "1"),
        ("a process joins", "1"),
        ("SIGSTOP", "1"),
        ("database link", "1"),
    ] {
        let cells = row(&text, fault);
        assert_eq!(cells[1], runs, "{cells:?}");
        assert!(cells[3].parse::<u64>().expect("items") > 0, "{cells:?}");
        assert_eq!(
            &cells[4..7],
            ["0", "0", "0"],
            "lost, duplicated, unexpected: {cells:?}"
        );
        // Every run had malformed bodies; each is a dead letter.
        assert!(
            cells[7].parse::<u64>().expect("dead letters") > 0,
            "{cells:?}"
        );
    }
    // The restarts ran in both modes.
    let restarts = row(&text, "PostgreSQL restart");
    assert!(
        restarts[10].contains("fast") && restarts[10].contains("immediate"),
        "{restarts:?}"
    );
    let _ = std::fs::remove_dir_all(&work_dir);
}
