//! weir moves webhook and message events from Kafka into time-partitioned
//! PostgreSQL tables: binary COPY straight into the right partition (created
//! when missing), exactly once, with failures kept in a compressed
//! dead-letter table and per-stage latency metrics.
//!
//! Modules by concern, in the order data flows through them:
//! - [`config`]: the TOML file, environment overrides, validation;
//! - [`consumer`]: the Kafka consumer thread, lanes, positions, backpressure;
//! - [`decode`], [`pointer`], [`mapping`]: JSON events to typed rows;
//! - [`encode`]: PostgreSQL's binary COPY format;
//! - [`partition`]: time ranges, the partition cache, creation on demand;
//! - [`writer`], [`batch`], [`offsets`]: batches, transactions, fencing;
//! - [`deadletter`], [`dlq`]: what could not be written, and why; inspect and replay;
//! - [`db`], [`catalog`], [`schema`]: sessions, errors, the catalog, migrations;
//! - [`metrics`], [`health`], [`http`]: what operators see;
//! - [`pipeline`], [`maintenance`]: wiring, start-up, shutdown, upkeep.

pub mod batch;
pub mod catalog;
pub mod config;
pub mod consumer;
pub mod db;
pub mod deadletter;
pub mod decode;
pub mod dlq;
pub mod encode;
pub mod health;
pub mod http;
pub mod maintenance;
pub mod mapping;
pub mod metrics;
pub mod offsets;
pub mod partition;
pub mod pipeline;
pub mod pointer;
pub mod schema;
pub mod writer;
