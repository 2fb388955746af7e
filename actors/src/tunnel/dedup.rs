//! Duplicate suppression for redundant mode: a sliding window over sequence numbers.
//!
//! In redundant mode every packet travels on both tunnels with the same sequence number; the
//! receiver keeps the highest number seen and a bitmap of the [`WINDOW`] numbers below it, and
//! accepts a number only once. Numbers older than the window are refused (they are late
//! duplicates, or so late that delivering them would not help).
//!
//! [`SenderWindow`] adds the sender's epoch (a random number it draws at start): a new epoch means
//! the sender restarted and counts from 1 again, so the window starts afresh.

/// How many sequence numbers below the highest are remembered.
pub const WINDOW: u64 = 4096;

const WORDS: usize = (WINDOW / 64) as usize;

/// Remembers which recent sequence numbers were delivered.
#[derive(Debug, Clone)]
pub struct DuplicateWindow {
    highest: Option<u64>,
    /// Bit `n % WINDOW` says whether `n` was seen, for `n` in `highest - WINDOW + 1 ..= highest`.
    seen: [u64; WORDS],
    duplicates: u64,
    too_old: u64,
}

impl Default for DuplicateWindow {
    fn default() -> Self {
        DuplicateWindow {
            highest: None,
            seen: [0; WORDS],
            duplicates: 0,
            too_old: 0,
        }
    }
}

impl DuplicateWindow {
    /// A window that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    fn bit(&mut self, n: u64) -> (&mut u64, u64) {
        let i = (n % WINDOW) as usize;
        (&mut self.seen[i / 64], 1u64 << (i % 64))
    }

    /// True the first time `seq` is offered (deliver it); false for a duplicate or a number
    /// older than the window (drop it).
    pub fn accept(&mut self, seq: u64) -> bool {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            let (w, m) = self.bit(seq);
            *w |= m;
            return true;
        };
        if seq > highest {
            // Forget the numbers that slide out of the window.
            let advance = seq - highest;
            if advance >= WINDOW {
                self.seen = [0; WORDS];
            } else {
                for n in highest + 1..=seq {
                    let (w, m) = self.bit(n);
                    *w &= !m;
                }
            }
            self.highest = Some(seq);
            let (w, m) = self.bit(seq);
            *w |= m;
            return true;
        }
        if highest - seq >= WINDOW {
            self.too_old += 1;
            return false;
        }
        let (w, m) = self.bit(seq);
        if *w & m != 0 {
            self.duplicates += 1;
            false
        } else {
            *w |= m;
            true
        }
    }

    /// True when `seq` was already accepted or is older than the window (`accept` would refuse
    /// it); changes nothing.
    pub fn seen(&self, seq: u64) -> bool {
        let Some(highest) = self.highest else {
            return false;
        };
        if seq > highest {
            return false;
        }
        if highest - seq >= WINDOW {
            return true;
        }
        let i = (seq % WINDOW) as usize;
        self.seen[i / 64] & (1u64 << (i % 64)) != 0
    }

    /// Duplicates dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Numbers dropped for being older than the window.
    pub fn too_old(&self) -> u64 {
        self.too_old
    }
}

/// A [`DuplicateWindow`] for one sender, reset when the sender's epoch changes.
#[derive(Debug, Clone, Default)]
pub struct SenderWindow {
    epoch: Option<u32>,
    window: DuplicateWindow,
    /// Duplicates and too-old numbers of earlier epochs.
    dropped_before: u64,
    restarts: u64,
}

impl SenderWindow {
    /// Switches to `epoch` if it is new (the sender restarted): forgets the old numbers. True
    /// when it was new.
    pub fn enter(&mut self, epoch: u32) -> bool {
        if self.epoch == Some(epoch) {
            return false;
        }
        if self.epoch.is_some() {
            self.restarts += 1;
        }
        self.dropped_before += self.window.duplicates() + self.window.too_old();
        self.epoch = Some(epoch);
        self.window = DuplicateWindow::new();
        true
    }

    /// True the first time `(epoch, seq)` is offered.
    pub fn accept(&mut self, epoch: u32, seq: u64) -> bool {
        self.enter(epoch);
        self.window.accept(seq)
    }

    /// True when `(epoch, seq)` was already accepted (a different epoch has seen nothing).
    pub fn seen(&self, epoch: u32, seq: u64) -> bool {
        self.epoch == Some(epoch) && self.window.seen(seq)
    }

    /// Copies dropped so far (duplicates and too old), over every epoch.
    pub fn dropped(&self) -> u64 {
        self.dropped_before + self.window.duplicates() + self.window.too_old()
    }

    /// Times the sender's epoch changed (it restarted).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The epoch in force.
    pub fn epoch(&self) -> Option<u32> {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_number_once_in_any_order() {
        let mut w = DuplicateWindow::new();
        for n in [5, 3, 4, 9, 6, 8, 7] {
            assert!(w.accept(n), "{n}");
        }
        for n in [5, 3, 4, 9, 6, 8, 7] {
            assert!(!w.accept(n), "{n} again");
        }
        assert_eq!(w.duplicates(), 7);
    }

    #[test]
    fn interleaved_copies_from_two_paths() {
        let mut w = DuplicateWindow::new();
        let mut delivered = 0;
        for n in 0..10_000u64 {
            // Path B runs three packets behind path A.
            delivered += u64::from(w.accept(n));
            if n >= 3 {
                delivered += u64::from(w.accept(n - 3));
            }
        }
        assert_eq!(delivered, 10_000);
    }

    #[test]
    fn slides_and_refuses_the_too_old() {
        let mut w = DuplicateWindow::new();
        assert!(w.accept(10));
        assert!(w.accept(10 + WINDOW + 5));
        assert!(!w.accept(10));
        assert_eq!(w.too_old(), 1);
        // A bit reused after sliding is clear.
        assert!(w.accept(10 + WINDOW));
        assert!(w.accept(u64::MAX));
        assert!(!w.accept(u64::MAX));
    }

    #[test]
    fn seen_agrees_with_accept() {
        let mut w = DuplicateWindow::new();
        assert!(!w.seen(3));
        w.accept(3);
        assert!(w.seen(3) && !w.seen(2) && !w.seen(4));
        w.accept(3 + WINDOW);
        assert!(w.seen(3), "older than the window counts as seen");
    }

    #[test]
    fn a_new_epoch_starts_afresh() {
        let mut w = SenderWindow::default();
        assert!(w.accept(1, 1) && w.accept(1, 2));
        assert!(!w.accept(1, 2));
        assert!(w.seen(1, 1) && !w.seen(2, 1));
        // The sender restarted: its numbers start from 1 again and are delivered.
        assert!(w.accept(2, 1));
        assert!(!w.accept(2, 1));
        assert_eq!((w.restarts(), w.dropped(), w.epoch()), (1, 2, Some(2)));
    }
}
