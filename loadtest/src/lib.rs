//! `weir-loadtest`: weir's load generator, verifier, report and benchmark,
//! as a library (the `weir-loadtest` binary is its command line; weir's
//! tests use [`webhooks`] to generate traffic and know what it must become).
//!
//! ```text
//! weir-loadtest produce --count 100000 --rate 5000 --malformed 0.02 --duplicates 0.05
//! weir-loadtest verify              # every event exactly once where it belongs; exit 1 if not
//! weir-loadtest report              # throughput and latency, report.md + report.svg
//! weir-loadtest bench               # weir against PostgreSQL's own COPY limit -> loadtest/RESULTS.md
//! weir-loadtest reads               # read latency on 10M+ rows while weir ingests -> loadtest/RESULTS.md
//! weir-loadtest chaos               # faults injected while weir ingests; every item counted
//! ```

pub mod bench;
pub mod chaos;
pub mod manifest;
pub mod produce;
pub mod proxy;
pub mod reads;
pub mod report;
pub mod verify;
pub mod webhooks;

use anyhow::Context;

/// The database URL from `WEIR_DATABASE_URL`.
pub fn database_url() -> anyhow::Result<String> {
    std::env::var("WEIR_DATABASE_URL")
        .context("set WEIR_DATABASE_URL (deploy/local/stack.sh env prints it)")
}

/// A plain session for the verifier and the report, in UTC.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to PostgreSQL")?;
    tokio::spawn(connection);
    client.batch_execute("SET TimeZone = 'UTC'").await?;
    Ok(client)
}
