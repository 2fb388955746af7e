//! Per-source sequence tracking: gaps, duplicates, reorderings and resets.
//!
//! Each source numbers its readings 1, 2, 3, …. The tracker keeps, per source, the highest number
//! seen and the numbers below it still missing (within a window of [`WINDOW`] numbers; older
//! holes are counted as lost for good). From that it classifies every arriving number:
//!
//! - above the highest: in order, or after a gap (the skipped numbers become missing);
//! - a missing number: a late (reordered) reading, which closes its hole;
//! - any other number below the highest: a duplicate — unless the source has evidently
//!   restarted its numbering, which is a reset: its sent time is later than that of the highest
//!   reading (when readings carry one), or, without times, it is 0 or 1 or below the window.
//!
//! After a reset a source starts a new epoch; (source, epoch, seq) identifies a reading. The state
//! of each source is a plain value ([`SourceState`]) that the collector stores in the same
//! transaction as the readings, so a restarted collector picks up exactly where its data ends.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// How far below the highest number holes are remembered.
pub const WINDOW: u64 = 65_536;

/// What an arriving sequence number means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// The source's first reading.
    First,
    /// The next number.
    InOrder,
    /// A number after a gap of `missing` numbers.
    Gap {
        /// How many numbers were skipped.
        missing: u64,
    },
    /// A number that was missing: it arrived late.
    Late,
    /// A number already seen; the reading should not be stored again.
    Duplicate,
    /// The source restarted its numbering; a new epoch begins.
    Reset,
}

impl SeqEvent {
    /// True when the reading should be stored.
    pub fn is_new(self) -> bool {
        self != SeqEvent::Duplicate
    }

    /// A short name for the flags column.
    pub fn as_str(self) -> &'static str {
        match self {
            SeqEvent::First => "first",
            SeqEvent::InOrder => "",
            SeqEvent::Gap { .. } => "gap",
            SeqEvent::Late => "late",
            SeqEvent::Duplicate => "duplicate",
            SeqEvent::Reset => "reset",
        }
    }
}

/// Counters of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqCounters {
    /// Readings with a sequence number received.
    pub received: u64,
    /// Numbers given up on: holes that fell out of the window, or that a reset left open.
    pub lost: u64,
    /// Duplicates received.
    pub duplicates: u64,
    /// Late readings that closed a hole.
    pub reordered: u64,
    /// Resets of the numbering.
    pub resets: u64,
}

/// Everything the tracker knows about one source; stored with the data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// Increases at each reset.
    pub epoch: u32,
    /// The highest number seen in this epoch.
    pub highest: u64,
    /// Sent time of the reading with the highest number, if it had one.
    pub highest_ts: Option<u64>,
    /// Numbers below `highest` not yet seen (within the window).
    pub missing: BTreeSet<u64>,
    /// Counters over the source's life.
    pub counters: SeqCounters,
}

impl SourceState {
    /// Gaps now: numbers still missing plus numbers lost for good.
    pub fn gaps(&self) -> u64 {
        self.missing.len() as u64 + self.counters.lost
    }

    fn observe(&mut self, seq: u64, ts: Option<u64>) -> SeqEvent {
        self.counters.received += 1;
        if seq > self.highest {
            let skipped = seq - self.highest - 1;
            let from = self.highest + 1;
            let tracked_from = from.max(seq.saturating_sub(WINDOW));
            self.counters.lost += tracked_from - from;
            self.missing.extend(tracked_from..seq);
            self.highest = seq;
            self.highest_ts = ts;
            self.prune();
            return if skipped == 0 {
                SeqEvent::InOrder
            } else {
                SeqEvent::Gap { missing: skipped }
            };
        }
        if self.missing.remove(&seq) {
            self.counters.reordered += 1;
            return SeqEvent::Late;
        }
        let restarted = match (ts, self.highest_ts) {
            (Some(ts), Some(highest_ts)) => ts > highest_ts,
            _ => seq <= 1 || self.highest - seq > WINDOW,
        };
        if restarted {
            self.counters.resets += 1;
            self.counters.lost += self.missing.len() as u64;
            self.missing.clear();
            self.epoch += 1;
            self.highest = seq;
            self.highest_ts = ts;
            return SeqEvent::Reset;
        }
        self.counters.duplicates += 1;
        SeqEvent::Duplicate
    }

    fn prune(&mut self) {
        let floor = self.highest.saturating_sub(WINDOW);
        while let Some(&low) = self.missing.first() {
            if low >= floor {
                break;
            }
            self.missing.pop_first();
            self.counters.lost += 1;
        }
    }
}

/// One source's state and whether it changed since it was last taken to store.
#[derive(Debug, Default)]
struct Entry {
    state: SourceState,
    changed: bool,
}

/// The sequence state of every source.
#[derive(Debug, Default)]
pub struct SequenceTracker {
    sources: HashMap<String, Entry>,
    /// How many entries are marked changed.
    changed: usize,
}

impl SequenceTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts back a source's stored state.
    pub fn restore(&mut self, source: String, state: SourceState) {
        self.sources.insert(
            source,
            Entry {
                state,
                changed: false,
            },
        );
    }

    /// Classifies `seq` from `source` (sent at `ts`, Unix ms, if known) and updates the state.
    pub fn observe(&mut self, source: &str, seq: u64, ts: Option<u64>) -> SeqEvent {
        self.observe_in_epoch(source, seq, ts).0
    }

    /// As [`SequenceTracker::observe`], also returning the source's epoch after the reading.
    pub fn observe_in_epoch(&mut self, source: &str, seq: u64, ts: Option<u64>) -> (SeqEvent, u32) {
        let entry = match self.sources.get_mut(source) {
            Some(entry) => entry,
            None => {
                let mut state = SourceState {
                    highest: seq,
                    highest_ts: ts,
                    ..SourceState::default()
                };
                state.counters.received = 1;
                self.sources.insert(
                    source.to_owned(),
                    Entry {
                        state,
                        changed: true,
                    },
                );
                self.changed += 1;
                return (SeqEvent::First, 0);
            }
        };
        if !entry.changed {
            entry.changed = true;
            self.changed += 1;
        }
        let event = entry.state.observe(seq, ts);
        (event, entry.state.epoch)
    }

    /// The state of `source`.
    pub fn source(&self, source: &str) -> Option<&SourceState> {
        self.sources.get(source).map(|e| &e.state)
    }

    /// Every source and its state.
    pub fn sources(&self) -> impl Iterator<Item = (&String, &SourceState)> {
        self.sources.iter().map(|(name, e)| (name, &e.state))
    }

    /// The number of sources.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// True when no source has been seen.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// How many sources changed since [`SequenceTracker::take_changed`] was last called.
    pub fn changed(&self) -> usize {
        self.changed
    }

    /// The sources changed since the last call, with their state (to store).
    pub fn take_changed(&mut self) -> Vec<(String, SourceState)> {
        if self.changed == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.changed);
        for (name, e) in &mut self.sources {
            if std::mem::take(&mut e.changed) {
                out.push((name.clone(), e.state.clone()));
            }
        }
        self.changed = 0;
        out
    }

    /// Totals over every source: (gaps, duplicates).
    pub fn totals(&self) -> (u64, u64) {
        self.sources.values().fold((0, 0), |(g, d), e| {
            (g + e.state.gaps(), d + e.state.counters.duplicates)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut SequenceTracker, seqs: &[u64]) -> Vec<SeqEvent> {
        seqs.iter().map(|&s| t.observe("a", s, None)).collect()
    }

    #[test]
    fn in_order_has_no_gaps() {
        let mut t = SequenceTracker::new();
        let ev = run(&mut t, &[1, 2, 3, 4]);
        assert_eq!(ev[0], SeqEvent::First);
        assert!(ev[1..].iter().all(|e| *e == SeqEvent::InOrder));
        let s = t.source("a").unwrap();
        assert_eq!((s.gaps(), s.counters.duplicates, s.highest), (0, 0, 4));
    }

    #[test]
    fn gap_then_late_arrival_closes_it() {
        let mut t = SequenceTracker::new();
        let ev = run(&mut t, &[1, 2, 5]);
        assert_eq!(ev[2], SeqEvent::Gap { missing: 2 });
        assert_eq!(t.source("a").unwrap().gaps(), 2);
        assert_eq!(t.observe("a", 4, None), SeqEvent::Late);
        assert_eq!(t.source("a").unwrap().gaps(), 1);
        assert_eq!(t.observe("a", 3, None), SeqEvent::Late);
        let s = t.source("a").unwrap();
        assert_eq!((s.gaps(), s.counters.reordered), (0, 2));
    }

    #[test]
    fn duplicates_are_counted_not_stored() {
        let mut t = SequenceTracker::new();
        run(&mut t, &[1, 2, 3]);
        assert_eq!(t.observe("a", 2, None), SeqEvent::Duplicate);
        assert_eq!(t.observe("a", 3, None), SeqEvent::Duplicate);
        assert!(!SeqEvent::Duplicate.is_new());
        assert_eq!(t.source("a").unwrap().counters.duplicates, 2);
        assert_eq!(t.totals(), (0, 2));
    }

    #[test]
    fn reset_without_times_is_a_restart_from_one() {
        let mut t = SequenceTracker::new();
        run(&mut t, &[1, 2, 3, 7]);
        assert_eq!(t.observe("a", 1, None), SeqEvent::Reset);
        let s = t.source("a").unwrap();
        assert_eq!((s.epoch, s.highest, s.counters.resets), (1, 1, 1));
        // The holes 4..=6 of the old epoch are lost for good.
        assert_eq!(s.gaps(), 3);
        assert_eq!(t.observe("a", 2, None), SeqEvent::InOrder);
    }

    #[test]
    fn times_tell_a_reset_from_a_redelivered_duplicate() {
        let mut t = SequenceTracker::new();
        for s in 1..=10 {
            t.observe("a", s, Some(1000 + s));
        }
        // Seq 1 again, sent back then: a redelivery.
        assert_eq!(t.observe("a", 1, Some(1001)), SeqEvent::Duplicate);
        // Seq 3, sent after everything else: the sensor restarted.
        assert_eq!(t.observe("a", 3, Some(5000)), SeqEvent::Reset);
        assert_eq!(t.source("a").unwrap().epoch, 1);
    }

    #[test]
    fn huge_gaps_stay_bounded() {
        let mut t = SequenceTracker::new();
        t.observe("a", 1, None);
        assert_eq!(
            t.observe("a", 1_000_000_000_000, None),
            SeqEvent::Gap {
                missing: 999_999_999_998
            }
        );
        let s = t.source("a").unwrap();
        assert_eq!(s.missing.len() as u64, WINDOW);
        assert_eq!(s.gaps(), 999_999_999_998);
        t.observe("a", 1_000_000_000_000 + WINDOW, None);
        let s = t.source("a").unwrap();
        assert!(s.missing.len() as u64 <= WINDOW);
        assert_eq!(s.gaps(), 999_999_999_998 + WINDOW - 1);
        // u64::MAX does not overflow anything.
        t.observe("a", u64::MAX, None);
        t.observe("a", u64::MAX, None);
    }

    #[test]
    fn sources_are_independent_and_state_restores() {
        let mut t = SequenceTracker::new();
        t.observe("a", 1, None);
        t.observe("b", 5, None);
        t.observe("a", 3, None);
        let changed = t.take_changed();
        assert_eq!(changed.len(), 2);
        assert!(t.take_changed().is_empty());
        let mut u = SequenceTracker::new();
        for (s, st) in changed {
            u.restore(s, st);
        }
        assert_eq!(u.observe("a", 2, None), SeqEvent::Late);
        assert_eq!(u.observe("a", 3, None), SeqEvent::Duplicate);
        assert_eq!(u.observe("b", 6, None), SeqEvent::InOrder);
    }
}
