//! The source's bookkeeping of its lanes, without Kafka: which partitions
//! are assigned and under which epoch, what waits to be handed to each
//! writer, what was committed in PostgreSQL and not yet in Kafka, and
//! which partitions backpressure wants paused. The consumer thread applies
//! the decisions taken here to librdkafka (see the module above).
//!
//! Invariants kept here:
//! - every start of a lane (assignment or reload) gets a new, larger epoch,
//!   and its writer hears of it (an `Assigned` event) before any message
//!   read under it;
//! - a lane's events reach its writer in the order they were taken: they
//!   are held, per writer, behind whatever is held already;
//! - a lane that ends (revoked, lost or reloaded) leaves nothing held and
//!   nothing charged behind; its next start decides its pause state afresh.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

// Looked up once per message taken: foldhash, not SipHash (the keys are
// topic names and partition numbers, which a producer cannot choose).
use foldhash::{HashMap, HashSet};

use crate::lane::LaneEvent;

pub(super) type LaneKey = (Arc<str>, i32);

/// One assigned partition.
pub(super) struct Lane {
    pub epoch: u64,
    pub writer: usize,
    /// The stored offset as last known here (from the assignment, then from
    /// each commit): the lag reported is measured from it, i.e. from what is
    /// in PostgreSQL, not from what was merely read.
    pub stored: Option<i64>,
    /// Messages between the partition's end and `stored` (its lag), as
    /// last measured: what the lane will bring its writer. New lanes go to
    /// the writer with the least of it.
    pub backlog: u64,
}

/// Pause and resume decisions to apply to librdkafka.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PauseChange {
    pub pause: Vec<LaneKey>,
    pub resume: Vec<LaneKey>,
}

/// State shared by the poll loop and the rebalance callbacks (both run on
/// the consumer thread; its mutex is never contended).
pub(super) struct Lanes {
    pub lanes: HashMap<LaneKey, Lane>,
    next_epoch: u64,
    /// Events that could not be handed to their writer yet, per writer, in
    /// order (a lane always has the same writer, so its order is kept).
    pub held: Vec<VecDeque<LaneEvent>>,
    /// Copies of the bytes of the messages taken (payload, key, packed
    /// headers), and the topic names they share.
    pub arena: super::arena::Arena,
    /// Offsets committed in PostgreSQL and not yet in Kafka, with the epoch
    /// that committed them.
    pub pending_commits: HashMap<LaneKey, (u64, i64)>,
    /// Over the in-flight budget: every partition is paused.
    over_budget: bool,
    /// Writers whose queue is full: their partitions are paused.
    blocked: Vec<bool>,
    /// Partitions held back by backpressure: not read now. A lane with a
    /// queue of its own is simply not read (librdkafka keeps its prefetch
    /// and stops fetching when that queue is full); any other is paused in
    /// librdkafka (and must be resumed).
    pub paused: HashSet<LaneKey>,
    /// Lanes read through a queue of their own.
    own_queue: HashSet<LaneKey>,
    /// Fenced lanes whose reload (read the stored offset, seek there) has
    /// failed, with when to try again. Until it succeeds the lane keeps its
    /// fenced epoch, whose batches the writer drops.
    pub reloads_due: Vec<(LaneKey, u64, Instant)>,
}

impl Lanes {
    /// Lanes for `writers` writers, keeping up to `arena_keep` bytes of
    /// message copies' blocks for reuse.
    pub fn new(writers: usize, arena_keep: usize) -> Self {
        Lanes {
            lanes: HashMap::default(),
            next_epoch: 1,
            held: (0..writers).map(|_| VecDeque::new()).collect(),
            arena: super::arena::Arena::new(arena_keep),
            pending_commits: HashMap::default(),
            over_budget: false,
            blocked: vec![false; writers],
            paused: HashSet::default(),
            own_queue: HashSet::default(),
            reloads_due: Vec::new(),
        }
    }

    /// Whether every partition is paused for the in-flight budget.
    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    /// The lane of `key` is read through a queue of its own.
    pub fn read_through_own_queue(&mut self, key: &LaneKey) {
        if self.lanes.contains_key(key) {
            self.own_queue.insert(key.clone());
        }
    }

    /// Whether the lane of `key` is read through a queue of its own.
    pub fn has_own_queue(&self, key: &LaneKey) -> bool {
        self.own_queue.contains(key)
    }

    /// Lanes with a queue of their own that backpressure lets be read now,
    /// with their writers.
    pub fn readable(&self) -> Vec<(LaneKey, usize)> {
        self.own_queue
            .iter()
            .filter(|key| !self.paused.contains(*key))
            .filter_map(|key| Some((key.clone(), self.lanes.get(key)?.writer)))
            .collect()
    }

    /// Whether `writer`'s queue was full at the last backpressure decision.
    pub fn blocked(&self, writer: usize) -> bool {
        self.blocked.get(writer).copied().unwrap_or(false)
    }

    /// Whether the lanes of `writer` should be paused now.
    fn should_pause(&self, writer: usize) -> bool {
        self.over_budget || self.blocked.get(writer).copied().unwrap_or(false)
    }

    /// The writer a new lane goes to: the one whose lanes hold the least
    /// backlog, then the one with the fewest lanes. Partitions are rarely
    /// even (webhook topics are keyed by tenant, and tenants are not), so
    /// placing them by hash can leave one session idle while the other has
    /// most of the rows; placing them by backlog splits a catch-up evenly.
    pub fn least_loaded_writer(&self) -> usize {
        let mut load = vec![(0u64, 0usize); self.held.len()];
        for lane in self.lanes.values() {
            load[lane.writer].0 += lane.backlog;
            load[lane.writer].1 += 1;
        }
        (0..load.len())
            .min_by_key(|writer| (load[*writer], *writer))
            .unwrap_or(0)
    }

    /// Starts (or restarts) the lane of `key` for `writer` at `stored`,
    /// under a new epoch, and announces it to the writer. Returns the epoch
    /// and whether the partition must be paused now. librdkafka keeps an
    /// application pause on a partition across unassign and assign, so the
    /// caller sets the pause state of every started lane explicitly.
    pub fn start(
        &mut self,
        key: LaneKey,
        writer: usize,
        stored: Option<i64>,
        backlog: u64,
    ) -> (u64, bool) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.lanes.insert(
            key.clone(),
            Lane {
                epoch,
                writer,
                stored,
                backlog,
            },
        );
        let pause = self.should_pause(writer);
        if pause {
            self.paused.insert(key.clone());
        } else {
            self.paused.remove(&key);
        }
        self.held[writer].push_back(LaneEvent::Assigned {
            topic: key.0,
            partition: key.1,
            epoch,
            stored,
        });
        (epoch, pause)
    }

    /// Ends the lane of `key` (revoked or lost): drops what is held for it
    /// (the next owner reads it again) and tells its writer. Returns the
    /// bytes released, and the offset committed in PostgreSQL under this
    /// assignment and not yet in Kafka; `None` if the lane was not ours.
    pub fn end(&mut self, key: &LaneKey) -> Option<(usize, Option<i64>)> {
        let lane = self.lanes.remove(key)?;
        let commit = match self.pending_commits.remove(key) {
            Some((epoch, next)) if epoch == lane.epoch => Some(next),
            _ => None,
        };
        let released = drop_held(&mut self.held[lane.writer], key);
        self.paused.remove(key);
        self.own_queue.remove(key);
        self.held[lane.writer].push_back(LaneEvent::Revoked {
            topic: key.0.clone(),
            partition: key.1,
            epoch: lane.epoch,
        });
        Some((released, commit))
    }

    /// Restarts a fenced lane at `stored`, once librdkafka was moved there:
    /// drops what is held for its old epoch. Returns the new epoch, the
    /// bytes released and whether the partition must be paused now; `None`
    /// if the lane is gone or was restarted since `epoch`.
    pub fn restart(
        &mut self,
        key: &LaneKey,
        epoch: u64,
        stored: Option<i64>,
    ) -> Option<(u64, usize, bool)> {
        // A restarted lane keeps its writer: batches of its old epoch may
        // still be in that writer's queue, and the writer drops them by
        // their epoch.
        let (writer, backlog) = match self.lanes.get(key) {
            Some(lane) if lane.epoch == epoch => (lane.writer, lane.backlog),
            _ => return None,
        };
        self.pending_commits.remove(key);
        let released = drop_held(&mut self.held[writer], key);
        let (new_epoch, pause) = self.start(key.clone(), writer, stored, backlog);
        Some((new_epoch, released, pause))
    }

    /// The writer of the lane of `key` if it is at `epoch`.
    pub fn writer_at(&self, key: &LaneKey, epoch: u64) -> Option<usize> {
        self.lanes
            .get(key)
            .filter(|lane| lane.epoch == epoch)
            .map(|lane| lane.writer)
    }

    /// PostgreSQL committed the lane up to `next` under `epoch`: remember it
    /// for Kafka, only for the assignment that made the commit (after a
    /// rebalance the partition's progress is the next owner's).
    pub fn committed(&mut self, key: LaneKey, epoch: u64, next: i64) {
        if let Some(lane) = self.lanes.get_mut(&key)
            && lane.epoch == epoch
        {
            lane.stored = Some(next);
            self.pending_commits.insert(key, (epoch, next));
        }
    }

    /// Backpressure: over the in-flight budget every partition is paused,
    /// until the budget is half free again (hysteresis keeps pause and
    /// resume from flapping); a writer whose queue is full has only its own
    /// partitions paused, until it takes events again. Returns what to
    /// change, if anything.
    pub fn backpressure(
        &mut self,
        in_flight: usize,
        max_in_flight: usize,
        blocked: &[bool],
    ) -> Option<PauseChange> {
        let over = if self.over_budget {
            in_flight > max_in_flight / 2
        } else {
            in_flight > max_in_flight
        };
        if over == self.over_budget && blocked == self.blocked.as_slice() {
            return None;
        }
        self.over_budget = over;
        self.blocked.clear();
        self.blocked.extend_from_slice(blocked);
        let wanted: Vec<(LaneKey, bool)> = self
            .lanes
            .iter()
            .map(|(key, lane)| (key.clone(), self.should_pause(lane.writer)))
            .collect();
        let mut change = PauseChange::default();
        for (key, pause) in wanted {
            if pause && self.paused.insert(key.clone()) {
                change.pause.push(key);
            } else if !pause && self.paused.remove(&key) {
                change.resume.push(key);
            }
        }
        Some(change)
    }

    /// Bytes charged for messages held and not handed to writers; empties
    /// every queue (at shutdown).
    pub fn drain_held(&mut self) -> usize {
        self.held
            .iter_mut()
            .flat_map(|queue| queue.drain(..))
            .map(|event| match event {
                LaneEvent::Message { charged, .. } => charged,
                _ => 0,
            })
            .sum()
    }
}

/// Drops the messages of one lane from a writer's held queue; returns the
/// bytes they were charged.
fn drop_held(held: &mut VecDeque<LaneEvent>, key: &LaneKey) -> usize {
    let mut released = 0;
    held.retain(|event| match event {
        LaneEvent::Message { event, charged, .. }
            if *event.topic == *key.0 && event.partition == key.1 =>
        {
            released += charged;
            false
        }
        _ => true,
    });
    released
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::event::Event;

    fn key(partition: i32) -> LaneKey {
        (Arc::from("t"), partition)
    }

    fn message(lanes: &mut Lanes, partition: i32, offset: i64, charged: usize) {
        let lane = &lanes.lanes[&key(partition)];
        let (epoch, writer) = (lane.epoch, lane.writer);
        lanes.held[writer].push_back(LaneEvent::Message {
            epoch,
            event: Event {
                topic: Arc::from("t"),
                partition,
                offset,
                timestamp_ms: None,
                key: None,
                headers: Default::default(),
                payload: Bytes::new(),
            },
            charged,
            behind: false,
        });
    }

    /// What a writer's queue holds, as short strings.
    fn held(lanes: &Lanes, writer: usize) -> Vec<String> {
        lanes.held[writer]
            .iter()
            .map(|event| match event {
                LaneEvent::Assigned {
                    partition, epoch, ..
                } => format!("assigned {partition}@{epoch}"),
                LaneEvent::Revoked {
                    partition, epoch, ..
                } => format!("revoked {partition}@{epoch}"),
                LaneEvent::Message { event, epoch, .. } => {
                    format!("message {}:{}@{epoch}", event.partition, event.offset)
                }
            })
            .collect()
    }

    #[test]
    fn every_start_gets_a_new_larger_epoch_announced_first() {
        let mut lanes = Lanes::new(1, 0);
        let (first, _) = lanes.start(key(0), 0, Some(5), 0);
        let (other, _) = lanes.start(key(1), 0, None, 0);
        message(&mut lanes, 0, 5, 10);
        let (again, _) = lanes.start(key(0), 0, Some(5), 0);
        assert!(first < other && other < again);
        assert_eq!(
            held(&lanes, 0),
            [
                "assigned 0@1",
                "assigned 1@2",
                "message 0:5@1",
                "assigned 0@3"
            ]
        );
    }

    #[test]
    fn ending_a_lane_drops_its_held_messages_and_keeps_the_others_in_order() {
        let mut lanes = Lanes::new(1, 0);
        lanes.start(key(0), 0, Some(0), 0);
        lanes.start(key(1), 0, Some(0), 0);
        lanes.held[0].clear();
        message(&mut lanes, 0, 0, 10);
        message(&mut lanes, 1, 0, 20);
        message(&mut lanes, 0, 1, 30);
        message(&mut lanes, 1, 1, 40);
        assert_eq!(lanes.end(&key(0)), Some((40, None)));
        assert_eq!(
            held(&lanes, 0),
            ["message 1:0@2", "message 1:1@2", "revoked 0@1"]
        );
        assert_eq!(lanes.end(&key(0)), None, "not ours any more");
    }

    #[test]
    fn a_commit_counts_only_for_the_assignment_that_made_it() {
        let mut lanes = Lanes::new(1, 0);
        let (old, _) = lanes.start(key(0), 0, Some(0), 0);
        lanes.committed(key(0), old, 10);
        assert_eq!(lanes.lanes[&key(0)].stored, Some(10));
        let (new, _) = lanes.start(key(0), 0, Some(10), 0);
        lanes.committed(key(0), old, 20);
        assert_eq!(lanes.lanes[&key(0)].stored, Some(10), "a stale commit");
        lanes.committed(key(0), new, 30);
        assert_eq!(lanes.end(&key(0)), Some((0, Some(30))));
    }

    #[test]
    fn a_restart_after_fencing_drops_the_old_epoch_and_ignores_stale_requests() {
        let mut lanes = Lanes::new(2, 0);
        let (epoch, _) = lanes.start(key(0), 1, Some(0), 0);
        message(&mut lanes, 0, 0, 7);
        message(&mut lanes, 0, 1, 7);
        let (new, released, paused) = lanes.restart(&key(0), epoch, Some(0)).expect("restarted");
        assert!(!paused);
        assert!(new > epoch);
        assert_eq!(released, 14);
        assert_eq!(held(&lanes, 1), ["assigned 0@1", "assigned 0@2"]);
        assert_eq!(
            lanes.restart(&key(0), epoch, Some(0)),
            None,
            "already restarted"
        );
        assert_eq!(lanes.writer_at(&key(0), new), Some(1));
        assert_eq!(lanes.writer_at(&key(0), epoch), None);
    }

    #[test]
    fn over_the_budget_everything_pauses_until_half_of_it_is_free() {
        let mut lanes = Lanes::new(2, 0);
        lanes.start(key(0), 0, None, 0);
        lanes.start(key(1), 1, None, 0);
        let none = [false, false];
        assert_eq!(lanes.backpressure(100, 100, &none), None, "at the budget");
        let change = lanes.backpressure(101, 100, &none).expect("pause");
        assert_eq!(change.pause.len(), 2);
        assert!(change.resume.is_empty());
        assert_eq!(lanes.backpressure(60, 100, &none), None, "still above half");
        let change = lanes.backpressure(50, 100, &none).expect("resume");
        assert_eq!((change.pause.len(), change.resume.len()), (0, 2));
        assert!(lanes.paused.is_empty());
    }

    #[test]
    fn a_blocked_writer_pauses_only_its_own_partitions() {
        let mut lanes = Lanes::new(2, 0);
        lanes.start(key(0), 0, None, 0);
        lanes.start(key(1), 1, None, 0);
        lanes.start(key(2), 1, None, 0);
        let change = lanes.backpressure(0, 100, &[false, true]).expect("pause");
        let mut paused: Vec<i32> = change.pause.iter().map(|k| k.1).collect();
        paused.sort_unstable();
        assert_eq!(paused, [1, 2]);
        // A lane started for the blocked writer starts paused, another not.
        assert!(lanes.start(key(3), 1, None, 0).1);
        assert!(!lanes.start(key(4), 0, None, 0).1);
        let change = lanes.backpressure(0, 100, &[false, false]).expect("resume");
        assert_eq!(change.resume.len(), 3);
    }

    #[test]
    fn a_partition_revoked_while_paused_is_not_left_paused() {
        let mut lanes = Lanes::new(1, 0);
        lanes.start(key(0), 0, None, 0);
        lanes.backpressure(101, 100, &[false]).expect("pause");
        assert!(lanes.paused.contains(&key(0)));
        lanes.end(&key(0));
        assert!(lanes.paused.is_empty());
        // Back after the pressure is gone: it starts unpaused, and the
        // caller resumes it explicitly.
        lanes.backpressure(0, 100, &[false]);
        assert!(!lanes.start(key(0), 0, None, 0).1);
    }

    #[test]
    fn shutdown_releases_every_held_message() {
        let mut lanes = Lanes::new(2, 0);
        lanes.start(key(0), 0, None, 0);
        lanes.start(key(1), 1, None, 0);
        message(&mut lanes, 0, 0, 5);
        message(&mut lanes, 1, 0, 6);
        assert_eq!(lanes.drain_held(), 11);
        assert!(lanes.held.iter().all(VecDeque::is_empty));
    }

    #[test]
    fn new_lanes_go_to_the_writer_with_the_least_backlog() {
        let mut lanes = Lanes::new(2, 0);
        // Skewed partitions, placed heaviest first (as `assign` does).
        for (partition, backlog) in [(3, 208), (1, 166), (2, 104), (0, 96)] {
            let writer = lanes.least_loaded_writer();
            lanes.start(key(partition), writer, None, backlog);
        }
        let load = |writer: usize| -> u64 {
            lanes
                .lanes
                .values()
                .filter(|lane| lane.writer == writer)
                .map(|lane| lane.backlog)
                .sum()
        };
        assert_eq!((load(0), load(1)), (304, 270));
        // With no backlog anywhere, lanes are spread by count.
        let mut idle = Lanes::new(3, 0);
        for partition in 0..6 {
            let writer = idle.least_loaded_writer();
            idle.start(key(partition), writer, None, 0);
        }
        for writer in 0..3 {
            let count = idle.lanes.values().filter(|l| l.writer == writer).count();
            assert_eq!(count, 2, "writer {writer}");
        }
    }
}
