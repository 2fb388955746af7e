//! Duplicate suppression for redundant mode: a sliding window over sequence numbers.
//!
//! In redundant mode every packet travels on both tunnels with the same sequence number; the
//! receiver keeps the highest number seen and a bitmap of the [`WINDOW`] numbers below it, and
//! accepts a number only once. Numbers older than the window are refused (they are late
//! duplicates, or so late that delivering them would not help).
//!
//! The window is wide (65,536 numbers, 8 KiB per sender) because a router in redundant mode
//! holds copies for tens of milliseconds, in which a fast endpoint sends thousands of packets.
//!
//! [`SenderWindow`] adds the sender's epoch (a random number it draws at start): a new epoch means
//! the sender restarted and counts from 1 again, so the window starts afresh.

/// How many sequence numbers below the highest are remembered.
pub const WINDOW: u64 = 65_536;

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

/// How a copy of an endpoint's packet reached a router (see the router's redundant mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// The only copy (not redundant): forward it unless it is a repeat.
    Only,
    /// The active router's copy: forward it now and tell the partner.
    Active,
    /// The standby router's copy: hold it in case the endpoint moves here.
    Standby,
}

/// A held standby copy.
#[derive(Debug, Clone)]
struct Held<P> {
    arrived: std::time::Instant,
    epoch: u32,
    seq: u64,
    packet: P,
}

/// How long held copies wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldTimes {
    /// Once this router is active, a held copy goes out when it is this old and the partner has
    /// not said it sent it (the partner's notice has had time to arrive).
    pub grace: std::time::Duration,
    /// While this router is standby, a held copy is dropped when it is this old: the active
    /// router sent it, or lost it while alive (as without redundancy). Longer than the
    /// endpoint takes to find the active router dead, so copies the dead router never sent are
    /// still here when the endpoint moves.
    pub expiry: std::time::Duration,
}

/// One router's side of an endpoint's redundant mode, with no I/O: which copies go out, which
/// are held and which are dropped, and which numbers to report to the partner router.
///
/// The endpoint sends each packet to its active router (`Active`) and a copy to the other
/// (`Standby`). The active router sends its copy at once and reports the number to the standby,
/// which marks it in one [`SenderWindow`] with what it sent itself; a copy already marked is
/// dropped. The standby holds its copies: when the endpoint moves here (because the active router
/// died, the first `Active` or `Only` copy says so), the held copies the old router never reported
/// go out — no loss; while the endpoint stays, they expire. The standby never sends a copy while
/// the other router is active, so a flow keeps to one router (and its source NAT): a TCP segment
/// sent by the wrong router would have its connection reset.
#[derive(Debug, Clone)]
pub struct Redundancy<P> {
    window: SenderWindow,
    held: std::collections::VecDeque<Held<P>>,
    max_held: usize,
    /// The endpoint's latest copy says this router is active.
    active: bool,
    emitted: Vec<u64>,
    /// Held copies sent after the endpoint moved here.
    pub held_forwarded: u64,
    /// Held copies dropped because the partner sent them.
    pub held_dropped: u64,
    /// Held copies that expired (or overflowed) while the partner was active.
    pub held_expired: u64,
    /// Numbers the partner reported that went out here too (a late notice: one duplicate).
    pub both_forwarded: u64,
    /// Notices from the partner.
    pub notices: u64,
}

impl<P> Redundancy<P> {
    /// Holds at most `max_held` standby copies; past that the oldest is dropped.
    pub fn new(max_held: usize) -> Self {
        Redundancy {
            window: SenderWindow::default(),
            held: std::collections::VecDeque::new(),
            max_held: max_held.max(1),
            active: false,
            emitted: Vec::new(),
            held_forwarded: 0,
            held_dropped: 0,
            held_expired: 0,
            both_forwarded: 0,
            notices: 0,
        }
    }

    /// Switches to the endpoint's `epoch`; a new one (it restarted) forgets what was held.
    fn enter(&mut self, epoch: u32) {
        if self.window.enter(epoch) {
            self.held.clear();
            self.emitted.clear();
        }
    }

    /// A copy arrived at `now`: returns it when it must go out at once; a standby copy is held.
    pub fn packet(
        &mut self,
        copy: Copy,
        epoch: u32,
        seq: u64,
        packet: P,
        now: std::time::Instant,
    ) -> Option<P> {
        self.enter(epoch);
        match copy {
            Copy::Only | Copy::Active => {
                self.active = true;
                if !self.window.accept(epoch, seq) {
                    return None;
                }
                if copy == Copy::Active {
                    self.emitted.push(seq);
                }
                Some(packet)
            }
            Copy::Standby => {
                self.active = false;
                if self.window.seen(epoch, seq) {
                    self.held_dropped += 1;
                    return None;
                }
                if self.held.len() >= self.max_held {
                    self.held.pop_front();
                    self.held_expired += 1;
                }
                self.held.push_back(Held {
                    arrived: now,
                    epoch,
                    seq,
                    packet,
                });
                None
            }
        }
    }

    /// The partner sent the endpoint's packets `seqs` of `epoch`.
    pub fn notice(&mut self, epoch: u32, seqs: &[u64]) {
        self.notices += 1;
        self.enter(epoch);
        for &seq in seqs {
            if self.window.seen(epoch, seq) {
                self.both_forwarded += 1;
            } else {
                self.window.accept(epoch, seq);
            }
        }
    }

    /// Settles the held copies due by `now`: returns those to send out now (this router is
    /// active and the partner never reported them); drops the reported and the expired.
    pub fn release(&mut self, now: std::time::Instant, times: HoldTimes) -> Vec<P> {
        let mut out = Vec::new();
        while let Some(h) = self.held.front() {
            if self.window.seen(h.epoch, h.seq) {
                self.held.pop_front();
                self.held_dropped += 1;
                continue;
            }
            let age = now.saturating_duration_since(h.arrived);
            if self.active && age >= times.grace {
                let Some(h) = self.held.pop_front() else {
                    break;
                };
                self.window.accept(h.epoch, h.seq);
                self.held_forwarded += 1;
                self.emitted.push(h.seq);
                out.push(h.packet);
            } else if !self.active && age >= times.expiry {
                self.held.pop_front();
                self.held_expired += 1;
            } else {
                break;
            }
        }
        out
    }

    /// When the oldest held copy is next due.
    pub fn next_due(&self, times: HoldTimes) -> Option<std::time::Instant> {
        let wait = if self.active {
            times.grace
        } else {
            times.expiry
        };
        self.held.front().map(|h| h.arrived + wait)
    }

    /// The endpoint's epoch and the numbers sent here since the last call (to tell the
    /// partner).
    pub fn take_emitted(&mut self) -> Option<(u32, Vec<u64>)> {
        if self.emitted.is_empty() {
            return None;
        }
        let seqs = std::mem::take(&mut self.emitted);
        Some((self.window.epoch()?, seqs))
    }

    /// Copies held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// True while the endpoint's latest copy made this router its active one.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Copies dropped as repeats or because the partner sent them.
    pub fn dropped(&self) -> u64 {
        self.window.dropped() + self.held_dropped
    }

    /// Times the endpoint restarted (its epoch changed).
    pub fn endpoint_restarts(&self) -> u64 {
        self.window.restarts()
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

    const MS: std::time::Duration = std::time::Duration::from_millis(1);
    const TIMES: HoldTimes = HoldTimes {
        grace: MS.saturating_mul(5),
        expiry: MS.saturating_mul(200),
    };

    /// Two routers and an endpoint sending every packet to both; notices arrive at once.
    struct Pair {
        a: Redundancy<u64>,
        b: Redundancy<u64>,
        out: Vec<u64>,
    }

    impl Pair {
        fn new() -> Pair {
            Pair {
                a: Redundancy::new(1000),
                b: Redundancy::new(1000),
                out: Vec::new(),
            }
        }

        /// The endpoint sends `seqs` at `t` with `a` active (`a_alive`: `a` gets them) or, when
        /// `to_b`, with `b` active.
        fn send(
            &mut self,
            t: std::time::Instant,
            seqs: std::ops::Range<u64>,
            a_alive: bool,
            to_b: bool,
        ) {
            for seq in seqs {
                if to_b {
                    self.out.extend(self.b.packet(Copy::Active, 7, seq, seq, t));
                    if a_alive {
                        assert_eq!(self.a.packet(Copy::Standby, 7, seq, seq, t), None);
                    }
                } else {
                    if a_alive {
                        self.out.extend(self.a.packet(Copy::Active, 7, seq, seq, t));
                    }
                    assert_eq!(self.b.packet(Copy::Standby, 7, seq, seq, t), None);
                }
            }
            if a_alive && let Some((epoch, seqs)) = self.a.take_emitted() {
                self.b.notice(epoch, &seqs);
            }
            if let Some((epoch, seqs)) = self.b.take_emitted()
                && a_alive
            {
                self.a.notice(epoch, &seqs);
            }
        }

        fn release(&mut self, t: std::time::Instant) {
            self.out.extend(self.b.release(t, TIMES));
            self.out.extend(self.a.release(t, TIMES));
        }

        fn sorted(&self) -> Vec<u64> {
            let mut all = self.out.clone();
            all.sort_unstable();
            all
        }
    }

    #[test]
    fn both_alive_each_packet_goes_out_once() {
        let t = std::time::Instant::now();
        let mut p = Pair::new();
        p.send(t, 1..101, true, false);
        p.release(t + 300 * MS);
        assert_eq!(p.out, (1..101).collect::<Vec<_>>());
        assert_eq!((p.b.held_dropped, p.b.held_forwarded), (100, 0));
        assert_eq!(p.b.held(), 0);
    }

    #[test]
    fn the_standby_sends_what_the_dead_active_did_not_once_the_endpoint_moves() {
        let t = std::time::Instant::now();
        let mut p = Pair::new();
        p.send(t, 1..51, true, false);
        // The active router dies: packets 51..101 reach only the standby, which holds them.
        p.send(t + MS, 51..101, false, false);
        p.release(t + 60 * MS);
        assert_eq!(
            p.out.len(),
            50,
            "the standby sends nothing while it is standby"
        );
        // The endpoint finds A dead and moves to B.
        p.send(t + 70 * MS, 101..111, false, true);
        p.release(t + 70 * MS);
        assert_eq!(
            p.sorted(),
            (1..111).collect::<Vec<_>>(),
            "no loss, no duplicate"
        );
        assert_eq!(p.b.held_forwarded, 50);
    }

    #[test]
    fn copies_expire_while_the_partner_is_active() {
        let t = std::time::Instant::now();
        let mut r: Redundancy<u64> = Redundancy::new(10);
        assert_eq!(r.packet(Copy::Standby, 1, 5, 5, t), None);
        assert_eq!(r.next_due(TIMES), Some(t + TIMES.expiry));
        assert_eq!(r.release(t + TIMES.expiry, TIMES), Vec::<u64>::new());
        assert_eq!((r.held(), r.held_expired), (0, 1));
    }

    #[test]
    fn moving_back_waits_the_grace_for_the_partners_notices() {
        let t = std::time::Instant::now();
        let mut p = Pair::new();
        // B is active; A holds copies.
        p.send(t, 1..11, true, true);
        // Copies 11..21 reach A; B sent them, but its notice is still on the way when the
        // endpoint moves back to A.
        for seq in 11..21 {
            p.out.extend(p.b.packet(Copy::Active, 7, seq, seq, t + MS));
            p.a.packet(Copy::Standby, 7, seq, seq, t + MS);
        }
        let late = p.b.take_emitted().unwrap();
        p.out
            .extend(p.a.packet(Copy::Active, 7, 21, 21, t + 2 * MS));
        p.release(t + 3 * MS);
        p.a.notice(late.0, &late.1);
        p.release(t + 10 * MS);
        assert_eq!(p.sorted(), (1..22).collect::<Vec<_>>(), "each once");
    }

    #[test]
    fn a_late_notice_is_counted_and_an_active_copy_after_release_dropped() {
        let t = std::time::Instant::now();
        let mut r: Redundancy<u64> = Redundancy::new(10);
        assert_eq!(r.packet(Copy::Standby, 1, 5, 5, t), None);
        assert_eq!(r.packet(Copy::Active, 1, 6, 6, t), Some(6));
        assert_eq!(r.release(t + TIMES.grace, TIMES), vec![5]);
        assert_eq!(r.take_emitted(), Some((1, vec![6, 5])));
        r.notice(1, &[5]);
        assert_eq!(r.both_forwarded, 1);
        assert_eq!(r.packet(Copy::Active, 1, 5, 5, t), None);
    }

    #[test]
    fn an_endpoint_restart_forgets_held_copies_and_numbers() {
        let t = std::time::Instant::now();
        let mut r: Redundancy<u64> = Redundancy::new(10);
        assert_eq!(r.packet(Copy::Only, 1, 1, 1, t), Some(1));
        assert_eq!(r.packet(Copy::Standby, 1, 2, 2, t), None);
        // New epoch: number 1 again is a new packet; the old held copy is gone.
        assert_eq!(r.packet(Copy::Only, 2, 1, 10, t), Some(10));
        assert_eq!(r.release(t + TIMES.expiry, TIMES), Vec::<u64>::new());
        assert_eq!(r.endpoint_restarts(), 1);
    }

    #[test]
    fn too_many_held_copies_drop_the_oldest() {
        let t = std::time::Instant::now();
        let mut r: Redundancy<u64> = Redundancy::new(2);
        for seq in 1..=3 {
            r.packet(Copy::Standby, 1, seq, seq, t);
        }
        assert_eq!((r.held(), r.held_expired), (2, 1));
        assert_eq!(r.packet(Copy::Active, 1, 4, 4, t), Some(4));
        assert_eq!(r.release(t + TIMES.grace, TIMES), vec![2, 3]);
    }
}
