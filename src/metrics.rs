//! Every metric weir exports: name, type, labels and meaning, in one place.
//!
//! Metrics go through the `metrics` facade to a Prometheus exporter that
//! renders real histograms (buckets are configured here; without them the
//! exporter renders summaries, which cannot be aggregated across pods).
//! Label values are low-cardinality: table, stage, topic, partition, reason
//! code; never ids or message text. Hot paths record once per batch, not per
//! row.

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const STAGE_DURATION: &str = "weir_stage_duration_seconds";
pub const WRITER_TIME: &str = "weir_writer_seconds";
pub const END_TO_END: &str = "weir_end_to_end_seconds";
pub const ROWS_WRITTEN: &str = "weir_rows_written_total";
pub const BYTES_WRITTEN: &str = "weir_bytes_written_total";
pub const BATCHES: &str = "weir_batches_total";
pub const BATCH_ROWS: &str = "weir_batch_rows";
pub const DEAD_LETTERS: &str = "weir_dead_letters_total";
pub const EVENTS: &str = "weir_events_total";
pub const PARTITIONS_CREATED: &str = "weir_partitions_created_total";
pub const PARTITIONS_DROPPED: &str = "weir_partitions_dropped_total";
pub const RETRIES: &str = "weir_retries_total";
pub const FENCED: &str = "weir_fenced_total";
pub const OFFSET_GAPS: &str = "weir_offset_gaps_total";
pub const OFFSET_RESETS: &str = "weir_offset_resets_total";
pub const CONSUMER_LAG: &str = "weir_consumer_lag";
pub const IN_FLIGHT_BYTES: &str = "weir_in_flight_bytes";
pub const IN_FLIGHT_ROWS: &str = "weir_in_flight_rows";
pub const KAFKA_PREFETCHED_BYTES: &str = "weir_kafka_prefetched_bytes";
pub const PAUSED_PARTITIONS: &str = "weir_paused_partitions";
pub const BACKPRESSURE_PAUSES: &str = "weir_backpressure_pauses_total";
pub const ASSIGNED_PARTITIONS: &str = "weir_assigned_partitions";
pub const PARTITION_WRITER: &str = "weir_partition_writer";
pub const LANE_STOPPED: &str = "weir_lane_stopped";
pub const KAFKA_ERRORS: &str = "weir_kafka_errors_total";
pub const BISECT_COPIES: &str = "weir_bisect_copies_total";
pub const DUPLICATES_SKIPPED: &str = "weir_duplicates_skipped_total";
pub const BUILD_INFO: &str = "weir_build_info";
pub const READY: &str = "weir_ready";

/// Every metric weir exports (dashboards and alert rules are checked
/// against this list).
pub const ALL: &[&str] = &[
    STAGE_DURATION,
    WRITER_TIME,
    END_TO_END,
    ROWS_WRITTEN,
    BYTES_WRITTEN,
    BATCHES,
    BATCH_ROWS,
    DEAD_LETTERS,
    EVENTS,
    PARTITIONS_CREATED,
    PARTITIONS_DROPPED,
    RETRIES,
    FENCED,
    OFFSET_GAPS,
    OFFSET_RESETS,
    CONSUMER_LAG,
    IN_FLIGHT_BYTES,
    IN_FLIGHT_ROWS,
    KAFKA_PREFETCHED_BYTES,
    PAUSED_PARTITIONS,
    BACKPRESSURE_PAUSES,
    ASSIGNED_PARTITIONS,
    PARTITION_WRITER,
    LANE_STOPPED,
    KAFKA_ERRORS,
    BISECT_COPIES,
    DUPLICATES_SKIPPED,
    BUILD_INFO,
    READY,
];

/// Pipeline stages timed by [`STAGE_DURATION`].
pub mod stage {
    pub const ALL: &[&str] = &[
        POLL,
        DECODE,
        BATCH_WAIT,
        PARTITION_ENSURE,
        COPY,
        COMMIT,
        KAFKA_COMMIT,
    ];
    pub const POLL: &str = "poll";
    pub const DECODE: &str = "decode";
    pub const BATCH_WAIT: &str = "batch_wait";
    pub const PARTITION_ENSURE: &str = "partition_ensure";
    pub const COPY: &str = "copy";
    pub const COMMIT: &str = "commit";
    pub const KAFKA_COMMIT: &str = "kafka_commit";
}

/// The `table` label of stages that concern a whole batch or event rather
/// than one table.
pub const ALL_TABLES: &str = "_all";

/// Installs the recorder and describes every metric. Returns the handle
/// that renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(STAGE_DURATION.into()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(WRITER_TIME.into()),
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
        })
        .and_then(|b| {
            // Finer from 50 ms to 1 s, where a live pipeline's p99 sits:
            // a quantile is interpolated inside its bucket, so one bucket
            // from 250 to 500 ms read a p99 the rows put at 214 ms as 440.
            b.set_buckets_for_metric(
                Matcher::Full(END_TO_END.into()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_ROWS.into()),
                &[
                    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 20000.0, 50000.0,
                    100000.0,
                ],
            )
        })
        .map_err(|err| err.to_string())?
        .install_recorder()
        .map_err(|err| err.to_string())?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    describe_histogram!(
        STAGE_DURATION,
        Unit::Seconds,
        "Time spent per pipeline stage (poll, decode, batch_wait, partition_ensure, copy, commit, kafka_commit)"
    );
    describe_histogram!(
        WRITER_TIME,
        Unit::Seconds,
        "Time each writer spends idle (state=idle: waiting for a batch) and writing (state=writing: \
         partitions, COPY, commit, retries); rate(..._sum) is the fraction of the time"
    );
    describe_histogram!(
        END_TO_END,
        Unit::Seconds,
        "Latency from Kafka append (from=kafka) or event time (from=event) to PostgreSQL commit"
    );
    describe_counter!(ROWS_WRITTEN, Unit::Count, "Rows committed to each table");
    describe_counter!(
        BYTES_WRITTEN,
        Unit::Bytes,
        "COPY bytes committed to each table"
    );
    describe_counter!(
        BATCHES,
        Unit::Count,
        "Batches by outcome (committed, fenced, abandoned)"
    );
    describe_histogram!(
        BATCH_ROWS,
        Unit::Count,
        "Rows per committed transaction (one flush: the batches of one or more partitions)"
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Dead letters committed, by table, stage and reason code"
    );
    describe_counter!(EVENTS, Unit::Count, "Kafka messages taken in, by topic");
    describe_counter!(
        PARTITIONS_CREATED,
        Unit::Count,
        "Partitions created by weir"
    );
    describe_counter!(
        PARTITIONS_DROPPED,
        Unit::Count,
        "Partitions dropped by retention"
    );
    describe_counter!(RETRIES, Unit::Count, "Retries of a batch or DDL, by cause");
    describe_counter!(
        FENCED,
        Unit::Count,
        "Batches rolled back because another consumer had moved the stored offset"
    );
    describe_counter!(
        OFFSET_GAPS,
        Unit::Count,
        "Times a partition continued past missing offsets (compaction, transactions, retention)"
    );
    describe_counter!(
        OFFSET_RESETS,
        Unit::Count,
        "Times a partition's log no longer held its position and reading restarted at the log's start"
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Messages between the consumer position and the partition end"
    );
    describe_gauge!(
        IN_FLIGHT_BYTES,
        Unit::Bytes,
        "Event bytes taken from Kafka, and rows encoded from them, not yet committed"
    );
    describe_gauge!(
        IN_FLIGHT_ROWS,
        Unit::Count,
        "Rows cut into batches and not yet committed"
    );
    describe_gauge!(
        KAFKA_PREFETCHED_BYTES,
        Unit::Bytes,
        "Message bytes librdkafka has fetched ahead and weir has not taken yet, over the \
         assigned partitions (bounded by queued.max.messages.kbytes per partition; outside \
         max_in_flight_bytes)"
    );
    describe_gauge!(
        PARTITION_WRITER,
        Unit::Count,
        "The writer (and PostgreSQL session) an assigned partition is written by; -1 once given away"
    );
    describe_gauge!(
        PAUSED_PARTITIONS,
        Unit::Count,
        "Partitions held back (not read) for backpressure"
    );
    describe_counter!(
        BACKPRESSURE_PAUSES,
        Unit::Count,
        "Times the consumer held partitions back (stopped reading them) because writers fell behind"
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Kafka partitions assigned to this process"
    );
    describe_gauge!(
        LANE_STOPPED,
        Unit::Count,
        "Writers stopped on a schema or configuration error (1 = stopped)"
    );
    describe_counter!(
        KAFKA_ERRORS,
        Unit::Count,
        "Errors reported by the Kafka client"
    );
    describe_counter!(
        BISECT_COPIES,
        Unit::Count,
        "COPY attempts made while isolating bad rows"
    );
    describe_gauge!(BUILD_INFO, Unit::Count, "Build information (always 1)");
    describe_gauge!(READY, Unit::Count, "1 when /readyz answers ready, else 0");
}

/// Records a stage duration.
pub fn stage_time(stage: &'static str, table: &str, elapsed: Duration) {
    histogram!(STAGE_DURATION, "stage" => stage, "table" => table.to_string())
        .record(elapsed.as_secs_f64());
}

/// Counts a retry.
pub fn retry(cause: &'static str) {
    counter!(RETRIES, "cause" => cause).increment(1);
}
