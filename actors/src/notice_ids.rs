//! A bounded memory of the broker notice ids an actor subscriber has taken, to recognise a
//! notice that comes again.
//!
//! A broker sends a notice again when it is not acknowledged in time, and sends its whole
//! window again when the subscriber subscribes anew (after a restart, while the first copies
//! may still wait in the subscriber's mailbox, which outlives it). Ids are unique per broker, so
//! a subscriber that remembers the ids it took recently can tell such a repeat from a new
//! message and acknowledge it again without doing its work twice.

use std::collections::{HashSet, VecDeque};

/// The newest ids taken (at most the bound given to [`NoticeIds::take`]).
#[derive(Debug, Default)]
pub struct NoticeIds {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
}

impl NoticeIds {
    /// Notes `id`, forgetting the oldest beyond `keep`; false when it was taken before.
    pub fn take(&mut self, id: u64, keep: usize) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > keep.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }

    /// True when `id` was taken (and is still remembered).
    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// How many ids to remember with a broker window of `window` notices: twice the window, so
    /// that what is sent again of a window is still recognised after the next one.
    pub fn keep(window: u32) -> usize {
        2 * window as usize
    }
}

#[cfg(test)]
mod tests {
    use super::NoticeIds;

    #[test]
    fn a_notice_is_taken_once_and_the_oldest_are_forgotten_past_the_bound() {
        let mut t = NoticeIds::default();
        assert!(t.take(1, 3));
        assert!(t.take(2, 3));
        assert!(!t.take(1, 3), "taken before");
        assert!(t.take(3, 3));
        assert!(t.take(4, 3));
        assert!(!t.contains(1), "forgotten as the oldest");
        assert!(t.take(1, 3));
        assert!(!t.take(4, 3));
        assert_eq!(t.ids.len(), 3);
        assert_eq!(NoticeIds::keep(20_000), 40_000);
    }
}
