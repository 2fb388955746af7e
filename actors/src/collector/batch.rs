//! When to commit: a batch closes when it holds `max_items` items or its oldest item has waited
//! `max_age`, whichever comes first. Pure: the caller passes `now`.

use std::time::{Duration, Instant};

/// Items waiting for one transaction.
#[derive(Debug)]
pub struct Batcher<T> {
    items: Vec<T>,
    oldest: Option<Instant>,
    max_items: usize,
    max_age: Duration,
}

impl<T> Batcher<T> {
    /// An empty batch bounded by `max_items` (at least 1) and `max_age`.
    pub fn new(max_items: usize, max_age: Duration) -> Self {
        Batcher {
            items: Vec::new(),
            oldest: None,
            max_items: max_items.max(1),
            max_age,
        }
    }

    /// Changes the bounds (they apply from the next check).
    pub fn set_bounds(&mut self, max_items: usize, max_age: Duration) {
        self.max_items = max_items.max(1);
        self.max_age = max_age;
    }

    /// Adds an item; true when the batch is now full and should be committed.
    pub fn push(&mut self, item: T, now: Instant) -> bool {
        self.oldest.get_or_insert(now);
        self.items.push(item);
        self.items.len() >= self.max_items
    }

    /// True when the batch should be committed now (full, or its oldest item is due).
    pub fn is_due(&self, now: Instant) -> bool {
        self.items.len() >= self.max_items || self.deadline().is_some_and(|d| now >= d)
    }

    /// When the oldest item falls due, if any is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|t| t + self.max_age)
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Takes the waiting items, leaving the batch empty.
    pub fn take(&mut self) -> Vec<T> {
        self.oldest = None;
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_on_size() {
        let t0 = Instant::now();
        let mut b = Batcher::new(3, Duration::from_secs(10));
        assert!(!b.push(1, t0));
        assert!(!b.push(2, t0));
        assert!(b.push(3, t0));
        assert!(b.is_due(t0));
        assert_eq!(b.take(), vec![1, 2, 3]);
        assert!(b.is_empty() && !b.is_due(t0) && b.deadline().is_none());
    }

    #[test]
    fn closes_on_age_of_the_oldest() {
        let t0 = Instant::now();
        let mut b = Batcher::new(100, Duration::from_millis(200));
        b.push("a", t0);
        b.push("b", t0 + Duration::from_millis(150));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(200)));
        assert!(!b.is_due(t0 + Duration::from_millis(199)));
        assert!(b.is_due(t0 + Duration::from_millis(200)));
        b.take();
        b.push("c", t0 + Duration::from_millis(300));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn zero_size_means_one() {
        let mut b = Batcher::new(0, Duration::ZERO);
        assert!(b.push((), Instant::now()));
    }
}
