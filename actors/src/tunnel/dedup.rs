//! Duplicate suppression for redundant mode: a sliding window over sequence numbers.
//!
//! In redundant mode every packet travels on both tunnels with the same sequence number; the
//! receiver keeps the highest number seen and a bitmap of the [`WINDOW`] numbers below it, and
//! accepts a number only once. Numbers older than the window are refused (they are late
//! duplicates, or so late that delivering them would not help).

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

    /// Duplicates dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Numbers dropped for being older than the window.
    pub fn too_old(&self) -> u64 {
        self.too_old
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
}
