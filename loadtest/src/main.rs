//! `weir-loadtest`: weir's load generator, verifier, report and benchmark.
//!
//! ```text
//! weir-loadtest produce --count 100000 --rate 5000 --malformed 0.02 --duplicates 0.05
//! weir-loadtest verify              # every event exactly once where it belongs; exit 1 if not
//! weir-loadtest report              # throughput and latency, report.md + report.svg
//! weir-loadtest bench               # weir against PostgreSQL's own COPY limit -> loadtest/RESULTS.md
//! weir-loadtest reads               # read latency on 10M+ rows while weir ingests -> loadtest/RESULTS.md
//! weir-loadtest chaos               # faults injected while weir ingests; every item counted
//! ```

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir_loadtest::{bench, chaos, connect, database_url, produce, reads, report, verify};

// The same allocator as the weir binary, so in-process measurements match.
#[global_allocator]
static ALLOCATOR: weir::alloc::Mimalloc = weir::alloc::Mimalloc;

#[derive(Debug, Parser)]
#[command(
    name = "weir-loadtest",
    version,
    about = "Load generator, verifier and benchmark for weir"
)]
struct Cli {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "WEIR_KAFKA__BROKERS",
        default_value = "localhost:9092",
        global = true
    )]
    brokers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send realistic WhatsApp webhook bodies and chat messages to Kafka.
    Produce(produce::ProduceArgs),
    /// Check PostgreSQL against what a `produce` run sent.
    Verify(verify::VerifyArgs),
    /// Throughput and end-to-end latency of a run, with a chart.
    Report(report::ReportArgs),
    /// Measure weir against PostgreSQL's own binary COPY of the same rows.
    Bench(bench::BenchArgs),
    /// Read latency of the seeds' dashboard queries on 10M+ rows while weir ingests.
    Reads(reads::ReadsArgs),
    /// Inject faults (kill -9, database restarts, broker outages, zombies...)
    /// while weir ingests, then account for every item exactly.
    Chaos(chaos::ChaosArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Produce(args) => produce::produce(&cli.brokers, &args).map(|_| true),
        Command::Verify(args) => runtime().and_then(|rt| {
            rt.block_on(async {
                let client = connect(&database_url()?).await?;
                verify::verify(&client, &args).await
            })
        }),
        Command::Report(args) => runtime().and_then(|rt| {
            rt.block_on(async {
                let client = connect(&database_url()?).await?;
                let text = report::report(&client, &args).await?;
                print!("{text}");
                Ok(true)
            })
        }),
        Command::Bench(args) => {
            runtime().and_then(|rt| rt.block_on(bench::bench(&cli.brokers, &args)).map(|_| true))
        }
        Command::Reads(args) => runtime().and_then(|rt| {
            let done = rt.block_on(reads::reads(&cli.brokers, &args));
            done.map(|_| true)
        }),
        Command::Chaos(args) => runtime().and_then(|rt| rt.block_on(chaos::chaos(&args))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("weir-loadtest: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
