//! weir moves webhook and message events from Kafka into time-partitioned
//! PostgreSQL tables: binary COPY straight into the right partition (created
//! when missing), exactly once, with failures kept in a compressed
//! dead-letter table and per-stage latency metrics.
//!
//! The modules, in the order data flows through them:
//!
//! ```text
//! Kafka ─▶ source ─lane─▶ batch (decode ─▶ copy) ─▶ write ─▶ PostgreSQL (store)
//!            ▲                                         │
//!            └──────── Request (commit, reload) ◀──────┘
//! ```
//!
//! - [`source`]: the Kafka consumer thread: lanes, epochs, positions read
//!   from PostgreSQL, rebalances, backpressure;
//! - [`lane`]: the contract between the source and the writers (lane
//!   events, requests back, the in-flight budget);
//! - [`decode`]: the table mappings, JSON pointers; one event to encoded
//!   rows and dead letters;
//! - [`copy`]: PostgreSQL's binary COPY format, segments, streaming;
//! - [`batch`]: the batcher and its cut rules (rows, bytes, linger);
//! - [`write`]: one batch, one transaction: fencing, COPY, dead letters,
//!   bisection of bad rows;
//! - [`store`]: what weir keeps in PostgreSQL: sessions, catalog,
//!   partitions, offsets, the dead-letter table, migrations;
//! - [`event`]: a Kafka message and its dead letters, as they flow;
//! - [`pipeline`] wires the stages; [`maintenance`] keeps partitions ahead
//!   and prunes old ones; [`dlq`] inspects and replays dead letters;
//! - [`config`], [`metrics`], [`health`], [`http`]: settings and what
//!   operators see; [`alloc`]: the binaries' allocator.
//!
//! Lower layers never import higher ones: `config`, `metrics`, `event` ◀
//! `copy` ◀ `store` ◀ `decode` ◀ `lane` ◀ `batch` ◀ `write` ◀ `source` ◀
//! `pipeline`, `maintenance`, `dlq`.

pub mod alloc;
pub(crate) mod batch;
pub mod config;
pub mod copy;
pub mod decode;
pub mod dlq;
pub mod event;
pub(crate) mod health;
pub(crate) mod http;
pub mod json;
pub mod lane;
pub mod maintenance;
pub mod metrics;
pub mod pipeline;
pub mod source;
pub mod store;
pub(crate) mod write;
