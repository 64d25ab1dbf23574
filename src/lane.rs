//! The contract between the source and the writers. A lane is one Kafka
//! partition as one writer sees it: the source announces it
//! ([`LaneEvent::Assigned`]), feeds it messages in offset order under the
//! assignment's epoch, and revokes it; the writer answers with
//! [`Request`]s (commit this offset to Kafka, reload this lane). Bytes read
//! and not yet committed are charged to one [`InFlight`] budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::event::Event;

/// What the consumer tells a writer about one of its lanes.
#[derive(Debug)]
pub enum LaneEvent {
    /// The lane starts (again) under `epoch`. `stored` is the stored
    /// `next_offset` in PostgreSQL, `None` if the partition has none (or it
    /// could not be read; the first commit's compare-and-set then decides).
    Assigned {
        topic: Arc<str>,
        partition: i32,
        epoch: u64,
        stored: Option<i64>,
    },
    /// The lane is no longer ours: drop what is pending.
    Revoked {
        topic: Arc<str>,
        partition: i32,
        epoch: u64,
    },
    /// A message read under `epoch`, with the bytes charged for it.
    Message {
        epoch: u64,
        event: Event,
        charged: usize,
        /// The partition held many more messages past this one when it was
        /// read (its high watermark, as of the last fetch, was more than a
        /// read round past it): a backlog, which never waits for the linger.
        behind: bool,
    },
}

/// What writers ask of the consumer.
#[derive(Debug)]
pub enum Request {
    /// Rows of the lane up to `next` are committed in PostgreSQL: commit
    /// `next` to Kafka too (for lag tools).
    Committed {
        topic: Arc<str>,
        partition: i32,
        epoch: u64,
        next: i64,
    },
    /// A commit of the lane was fenced: read its stored offset again and
    /// resume the lane from there, under a new epoch.
    Reload {
        topic: Arc<str>,
        partition: i32,
        epoch: u64,
    },
}

/// What an event is charged to the [`InFlight`] budget when it is taken
/// from Kafka: its own bytes, and as much again reserved for the rows it
/// will be encoded into (rows are about the size of their event). The
/// batcher replaces the reservation with the rows' true size once it has
/// encoded them ([`reserved_for_rows`]). Reserving up front keeps the
/// ceiling a ceiling: otherwise the rows of every event queued but not yet
/// decoded when the consumer pauses (up to a full writer queue) came on
/// top of it.
pub fn charge_for(event: &Event) -> usize {
    event.size() + reserved_for_rows(event)
}

/// The part of [`charge_for`] reserved for the event's encoded rows.
pub fn reserved_for_rows(event: &Event) -> usize {
    event.payload.len()
}

/// Bytes taken from Kafka and not yet committed or dropped: the events,
/// and the rows encoded from them.
///
/// Charged and released once per message, from the consumer thread and the
/// batchers: only the atomic is touched. The metrics upkeep publishes it
/// as `weir_in_flight_bytes` every second.
#[derive(Default)]
pub struct InFlight {
    bytes: AtomicUsize,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("bytes", &self.get())
            .finish()
    }
}

impl InFlight {
    pub fn charge(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn release(&self, bytes: usize) {
        let before = self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        debug_assert!(
            before >= bytes,
            "in-flight accounting should never go negative"
        );
    }

    pub fn get(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}
