//! Liveness and readiness, as `/healthz` and `/readyz` report them.
//!
//! Alive: the consumer loop and every writer have shown a sign of life
//! recently (a stuck loop makes Kubernetes restart the pod). Ready: every
//! writer has a PostgreSQL session, the consumer has joined its group, no
//! writer is stopped on a schema or configuration error, and the process is
//! not shutting down.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a loop may stay silent before the process is considered stuck.
pub const STALL_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    consumer_beat: Instant,
    consumer_joined: bool,
    kafka_reachable: bool,
    writer_beats: Vec<Instant>,
    writer_connected: Vec<bool>,
    /// Writer index -> what stopped it.
    stopped: BTreeMap<usize, String>,
    /// What stopped a partition on the Kafka side (until the next assignment).
    partition_stopped: Option<String>,
    shutting_down: bool,
}

/// A readiness verdict with the reasons it is negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reasons: Vec<String>,
}

impl Health {
    pub fn new(writers: usize) -> Self {
        let now = Instant::now();
        Health {
            state: Mutex::new(State {
                consumer_beat: now,
                consumer_joined: false,
                kafka_reachable: true,
                writer_beats: vec![now; writers],
                writer_connected: vec![false; writers],
                stopped: BTreeMap::new(),
                partition_stopped: None,
                shutting_down: false,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut state)
    }

    pub fn consumer_beat(&self) {
        self.with(|s| s.consumer_beat = Instant::now());
    }

    /// A partition stopped fetching for a reason only an operator can fix
    /// (`None`: the consumer was assigned again, so it is tried again).
    pub fn partition_stopped(&self, reason: Option<String>) {
        self.with(|s| s.partition_stopped = reason);
    }

    pub fn consumer_joined(&self, joined: bool) {
        self.with(|s| s.consumer_joined = joined);
    }

    /// Whether some broker is up (from librdkafka's statistics and errors).
    pub fn kafka_reachable(&self, reachable: bool) {
        self.with(|s| s.kafka_reachable = reachable);
    }

    pub fn writer_beat(&self, writer: usize) {
        self.with(|s| s.writer_beats[writer] = Instant::now());
    }

    pub fn writer_connected(&self, writer: usize, connected: bool) {
        self.with(|s| s.writer_connected[writer] = connected);
    }

    pub fn writer_stopped(&self, writer: usize, reason: Option<String>) {
        self.with(|s| match reason {
            Some(reason) => {
                s.stopped.insert(writer, reason);
            }
            None => {
                s.stopped.remove(&writer);
            }
        });
        metrics::gauge!(crate::metrics::LANE_STOPPED, "writer" => writer.to_string()).set(
            if self.with(|s| s.stopped.contains_key(&writer)) {
                1.0
            } else {
                0.0
            },
        );
    }

    pub fn shutting_down(&self) {
        self.with(|s| s.shutting_down = true);
    }

    pub fn liveness(&self) -> Verdict {
        self.with(|s| {
            let mut reasons = Vec::new();
            if s.consumer_beat.elapsed() > STALL_AFTER {
                reasons.push(format!(
                    "consumer loop silent for {}s",
                    s.consumer_beat.elapsed().as_secs()
                ));
            }
            for (writer, beat) in s.writer_beats.iter().enumerate() {
                if beat.elapsed() > STALL_AFTER {
                    reasons.push(format!(
                        "writer {writer} silent for {}s",
                        beat.elapsed().as_secs()
                    ));
                }
            }
            Verdict {
                ok: reasons.is_empty(),
                reasons,
            }
        })
    }

    pub fn readiness(&self) -> Verdict {
        let alive = self.liveness();
        self.with(|s| {
            let mut reasons = alive.reasons;
            if s.shutting_down {
                reasons.push("shutting down".into());
            }
            if !s.consumer_joined {
                reasons.push("not yet a member of the consumer group".into());
            }
            if !s.kafka_reachable {
                reasons.push("no Kafka broker reachable".into());
            }
            for (writer, connected) in s.writer_connected.iter().enumerate() {
                if !connected {
                    reasons.push(format!("writer {writer} has no PostgreSQL session"));
                }
            }
            for (writer, reason) in &s.stopped {
                reasons.push(format!("writer {writer} stopped: {reason}"));
            }
            if let Some(reason) = &s.partition_stopped {
                reasons.push(reason.clone());
            }
            Verdict {
                ok: reasons.is_empty(),
                reasons,
            }
        })
    }
}
