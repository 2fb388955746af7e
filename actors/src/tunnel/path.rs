//! Which of an endpoint's tunnels carries its traffic: probe accounting, path health, failover
//! and anti-flap. No I/O and no clock: the actor passes `now` in.
//!
//! Each path (one tunnel to one router) is probed every `probe_interval`. A probe is missed when
//! no reply came within its timeout (the interval, or 1.5 × the smoothed RTT if that is longer);
//! after `dead_after` missed probes in a row the path is dead. Any reply brings a path up. A path
//! that comes back from the dead is on probation for `hold`: traffic is not moved to it for a
//! preference until it has answered for that long (it is still used if nothing else works).
//!
//! The preferred path is the balancer's choice, or the first peer when there is none. Local
//! health beats the balancer: traffic goes to the preferred path when it is up and off
//! probation; otherwise it stays where it is while that path is up; otherwise it moves to any up
//! path.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Timing of probes and failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathTiming {
    /// Time between probes on each path.
    pub probe_interval: Duration,
    /// Missed probes in a row that make a path dead.
    pub dead_after: u32,
    /// How long a recovered path must stay up before traffic moves back to it.
    pub hold: Duration,
}

/// A path's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathHealth {
    /// Never answered yet.
    Unknown,
    /// Answering probes.
    Up,
    /// Missed `dead_after` probes in a row (or its link is gone).
    Dead,
}

impl PathHealth {
    /// Lower-case name for status.
    pub fn as_str(self) -> &'static str {
        match self {
            PathHealth::Unknown => "unknown",
            PathHealth::Up => "up",
            PathHealth::Dead => "dead",
        }
    }
}

/// Why traffic moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The first path came up.
    Initial,
    /// The active path died.
    Dead,
    /// Back to the preferred path (the balancer's choice or the primary).
    Preferred,
}

impl SwitchReason {
    /// Lower-case name for status.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::Initial => "initial",
            SwitchReason::Dead => "dead",
            SwitchReason::Preferred => "preferred",
        }
    }
}

/// A change of the active path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// When.
    pub at: Instant,
    /// The path left (none at first).
    pub from: Option<usize>,
    /// The path now active.
    pub to: usize,
    /// Why.
    pub reason: SwitchReason,
}

/// How many recent probes the loss figure covers.
const LOSS_WINDOW: usize = 100;

#[derive(Debug, Clone)]
struct Probe {
    seq: u64,
    sent: Instant,
    answered: bool,
}

/// One path's state and probe figures.
#[derive(Debug, Clone)]
pub struct PathState {
    health: PathHealth,
    /// When `health` last changed.
    since: Instant,
    /// Came back from dead and may be on probation.
    recovered: bool,
    next_seq: u64,
    probes: VecDeque<Probe>,
    srtt: Option<Duration>,
    last_rtt: Option<Duration>,
    sent: u64,
    answered: u64,
}

impl PathState {
    fn new(now: Instant) -> Self {
        PathState {
            health: PathHealth::Unknown,
            since: now,
            recovered: false,
            next_seq: 0,
            probes: VecDeque::with_capacity(LOSS_WINDOW + 1),
            srtt: None,
            last_rtt: None,
            sent: 0,
            answered: 0,
        }
    }

    /// Its health.
    pub fn health(&self) -> PathHealth {
        self.health
    }

    /// When its health last changed.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Smoothed round-trip time of probes.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The last probe's round-trip time.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// Probes sent and answered in total.
    pub fn probe_counts(&self) -> (u64, u64) {
        (self.sent, self.answered)
    }

    fn timeout(&self, timing: &PathTiming) -> Duration {
        let by_rtt = self.srtt.map_or(Duration::ZERO, |r| r * 3 / 2);
        timing.probe_interval.max(by_rtt)
    }

    /// Fraction of recent probes (past their timeout) that went unanswered.
    pub fn loss(&self, timing: &PathTiming, now: Instant) -> f64 {
        let timeout = self.timeout(timing);
        let settled = self
            .probes
            .iter()
            .filter(|p| p.answered || now.saturating_duration_since(p.sent) >= timeout);
        let (mut total, mut lost) = (0u32, 0u32);
        for p in settled {
            total += 1;
            lost += u32::from(!p.answered);
        }
        if total == 0 {
            0.0
        } else {
            f64::from(lost) / f64::from(total)
        }
    }

    /// Unanswered probes past their timeout since the last answered one.
    fn missed_in_a_row(&self, timing: &PathTiming, now: Instant) -> u32 {
        let timeout = self.timeout(timing);
        let mut missed = 0;
        for p in self.probes.iter().rev() {
            if p.answered {
                break;
            }
            if now.saturating_duration_since(p.sent) >= timeout {
                missed += 1;
            }
        }
        missed
    }

    fn set_health(&mut self, health: PathHealth, now: Instant) {
        if self.health != health {
            if health == PathHealth::Up {
                self.recovered = self.health == PathHealth::Dead;
            }
            self.health = health;
            self.since = now;
        }
    }

    /// Up and off probation.
    fn settled(&self, timing: &PathTiming, now: Instant) -> bool {
        self.health == PathHealth::Up
            && (!self.recovered || now.saturating_duration_since(self.since) >= timing.hold)
    }
}

/// The paths of one endpoint and which one is active.
#[derive(Debug, Clone)]
pub struct PathSelector {
    timing: PathTiming,
    paths: Vec<PathState>,
    preferred: Option<usize>,
    active: Option<usize>,
    switches: VecDeque<Switch>,
    failovers: usize,
}

/// How many past switches are kept for status.
const SWITCH_HISTORY: usize = 32;

impl PathSelector {
    /// `count` paths, none up yet.
    pub fn new(count: usize, timing: PathTiming, now: Instant) -> Self {
        PathSelector {
            timing,
            paths: (0..count).map(|_| PathState::new(now)).collect(),
            preferred: None,
            active: None,
            switches: VecDeque::new(),
            failovers: 0,
        }
    }

    /// Changes probe interval, dead-after and hold (in place).
    pub fn set_timing(&mut self, timing: PathTiming) {
        self.timing = timing;
    }

    /// The timing in force.
    pub fn timing(&self) -> &PathTiming {
        &self.timing
    }

    /// The path traffic goes to now.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// The preferred path (the balancer's choice, if any).
    pub fn preferred(&self) -> Option<usize> {
        self.preferred
    }

    /// One path's state.
    pub fn path(&self, i: usize) -> Option<&PathState> {
        self.paths.get(i)
    }

    /// Past switches, oldest first.
    pub fn switches(&self) -> impl Iterator<Item = &Switch> {
        self.switches.iter()
    }

    /// Failovers so far (switches away from a path that died), all of them (the history of
    /// [`PathSelector::switches`] keeps only the latest).
    pub fn failovers(&self) -> usize {
        self.failovers
    }

    /// Up paths, for redundant mode.
    pub fn up_paths(&self) -> impl Iterator<Item = usize> + '_ {
        self.paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.health == PathHealth::Up)
            .map(|(i, _)| i)
    }

    /// Records a probe sent on `path` now; returns the number to put in it.
    pub fn probe_sent(&mut self, path: usize, now: Instant) -> Option<u64> {
        let p = self.paths.get_mut(path)?;
        let seq = p.next_seq;
        p.next_seq += 1;
        p.sent += 1;
        p.probes.push_back(Probe {
            seq,
            sent: now,
            answered: false,
        });
        while p.probes.len() > LOSS_WINDOW {
            p.probes.pop_front();
        }
        Some(seq)
    }

    /// Records a reply to probe `seq` on `path`; returns its round-trip time. Replies to
    /// unknown or already answered probes are ignored.
    pub fn probe_reply(&mut self, path: usize, seq: u64, now: Instant) -> Option<Duration> {
        let p = self.paths.get_mut(path)?;
        let probe = p.probes.iter_mut().find(|q| q.seq == seq && !q.answered)?;
        probe.answered = true;
        let rtt = now.saturating_duration_since(probe.sent);
        p.answered += 1;
        p.last_rtt = Some(rtt);
        p.srtt = Some(match p.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
        p.set_health(PathHealth::Up, now);
        Some(rtt)
    }

    /// The link under `path` is gone (its node is unreachable): it is dead now.
    pub fn link_lost(&mut self, path: usize, now: Instant) {
        if let Some(p) = self.paths.get_mut(path)
            && p.health == PathHealth::Up
        {
            p.set_health(PathHealth::Dead, now);
        }
    }

    /// Sets the preferred path (`None`: the first one).
    pub fn set_preferred(&mut self, path: Option<usize>) {
        self.preferred = path.filter(|p| *p < self.paths.len());
    }

    /// Updates health from missed probes and picks the active path; returns the switch, if any.
    pub fn tick(&mut self, now: Instant) -> Option<Switch> {
        let timing = self.timing;
        for p in &mut self.paths {
            if p.health == PathHealth::Up && p.missed_in_a_row(&timing, now) >= timing.dead_after {
                p.set_health(PathHealth::Dead, now);
            }
        }
        let target = self.target(now)?;
        if Some(target) == self.active {
            return None;
        }
        let from = self.active;
        let reason = match from {
            None => SwitchReason::Initial,
            Some(a) if self.paths[a].health != PathHealth::Up => SwitchReason::Dead,
            Some(_) => SwitchReason::Preferred,
        };
        self.active = Some(target);
        if reason == SwitchReason::Dead {
            self.failovers += 1;
        }
        let switch = Switch {
            at: now,
            from,
            to: target,
            reason,
        };
        self.switches.push_back(switch);
        while self.switches.len() > SWITCH_HISTORY {
            self.switches.pop_front();
        }
        Some(switch)
    }

    fn target(&self, now: Instant) -> Option<usize> {
        let want = self.preferred.unwrap_or(0);
        let settled = |i: usize| {
            self.paths
                .get(i)
                .is_some_and(|p| p.settled(&self.timing, now))
        };
        let up = |i: usize| {
            self.paths
                .get(i)
                .is_some_and(|p| p.health == PathHealth::Up)
        };
        if settled(want) {
            return Some(want);
        }
        if let Some(a) = self.active
            && up(a)
        {
            return Some(a);
        }
        let all = 0..self.paths.len();
        all.clone()
            .find(|i| settled(*i))
            .or_else(|| all.clone().find(|i| up(*i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timing() -> PathTiming {
        PathTiming {
            probe_interval: 20 * MS,
            dead_after: 3,
            hold: 1000 * MS,
        }
    }

    /// A fake network: each tick of 20 ms probes every path and answers the live ones after
    /// 1 ms.
    struct Sim {
        sel: PathSelector,
        now: Instant,
        alive: Vec<bool>,
    }

    impl Sim {
        fn new(paths: usize) -> Sim {
            let now = Instant::now();
            Sim {
                sel: PathSelector::new(paths, timing(), now),
                now,
                alive: vec![true; paths],
            }
        }

        /// Runs for `ms`; returns the switches seen.
        fn run(&mut self, ms: u64) -> Vec<Switch> {
            let mut out = Vec::new();
            let end = self.now + MS * ms as u32;
            while self.now < end {
                for i in 0..self.alive.len() {
                    let seq = self.sel.probe_sent(i, self.now).unwrap();
                    if self.alive[i] {
                        self.sel.probe_reply(i, seq, self.now + MS);
                    }
                }
                self.now += 20 * MS;
                out.extend(self.sel.tick(self.now));
            }
            out
        }
    }

    #[test]
    fn first_up_path_becomes_active() {
        let mut s = Sim::new(2);
        let sw = s.run(20);
        assert_eq!(sw.len(), 1);
        assert_eq!((sw[0].to, sw[0].reason), (0, SwitchReason::Initial));
        assert_eq!(s.sel.path(0).unwrap().rtt(), Some(MS));
    }

    #[test]
    fn fails_over_within_dead_after_probes() {
        let mut s = Sim::new(2);
        s.run(200);
        let died = s.now;
        s.alive[0] = false;
        let sw = s.run(200);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert_eq!(
            (sw[0].from, sw[0].to, sw[0].reason),
            (Some(0), 1, SwitchReason::Dead)
        );
        let took = sw[0].at - died;
        assert!(took <= 100 * MS, "failover took {took:?}");
        assert_eq!(s.sel.path(0).unwrap().health(), PathHealth::Dead);
        assert_eq!(s.sel.failovers(), 1);
        assert!(s.sel.path(0).unwrap().loss(&timing(), s.now) >= 0.45);
    }

    #[test]
    fn two_misses_are_not_death() {
        let mut s = Sim::new(2);
        s.run(200);
        s.alive[0] = false;
        let sw = s.run(40);
        s.alive[0] = true;
        let sw2 = s.run(400);
        assert!(sw.is_empty() && sw2.is_empty(), "{sw:?} {sw2:?}");
        assert_eq!(s.sel.active(), Some(0));
    }

    #[test]
    fn recovered_path_is_taken_back_only_after_hold() {
        let mut s = Sim::new(2);
        s.run(200);
        s.alive[0] = false;
        s.run(200);
        assert_eq!(s.sel.active(), Some(1));
        s.alive[0] = true;
        let back = s.now;
        // Flapping inside the hold: up for a while, down, up again.
        assert!(s.run(500).is_empty());
        s.alive[0] = false;
        s.run(100);
        s.alive[0] = true;
        let back_again = s.now;
        let sw = s.run(900);
        assert!(
            sw.is_empty(),
            "took back a flapping path: {sw:?} ({:?})",
            s.now - back
        );
        let sw = s.run(300);
        assert_eq!(sw.len(), 1);
        assert_eq!((sw[0].to, sw[0].reason), (0, SwitchReason::Preferred));
        assert!(sw[0].at - back_again >= timing().hold);
    }

    #[test]
    fn follows_the_balancer_unless_its_choice_is_unhealthy() {
        let mut s = Sim::new(2);
        s.run(100);
        s.sel.set_preferred(Some(1));
        let sw = s.run(20);
        assert_eq!((sw[0].to, sw[0].reason), (1, SwitchReason::Preferred));
        // The balancer's choice dies: local health wins.
        s.alive[1] = false;
        s.run(200);
        assert_eq!(s.sel.active(), Some(0));
        // Preferred again but dead: stays.
        s.sel.set_preferred(Some(1));
        assert!(s.run(200).is_empty());
        s.alive[1] = true;
        s.run(500);
        assert_eq!(s.sel.active(), Some(0), "on probation still");
        s.run(600);
        assert_eq!(s.sel.active(), Some(1));
    }

    #[test]
    fn link_loss_is_immediate_and_a_lone_recovering_path_is_used() {
        let mut s = Sim::new(2);
        s.run(100);
        s.alive = vec![false, false];
        s.sel.link_lost(0, s.now);
        s.sel.link_lost(1, s.now);
        s.run(100);
        // Only path 1 comes back: used at once despite probation, since nothing else works.
        s.alive[1] = true;
        s.run(40);
        assert_eq!(s.sel.active(), Some(1));
    }

    #[test]
    fn replies_to_unknown_probes_are_ignored() {
        let mut sel = PathSelector::new(1, timing(), Instant::now());
        assert_eq!(sel.probe_reply(0, 99, Instant::now()), None);
        assert_eq!(sel.probe_reply(7, 0, Instant::now()), None);
        assert_eq!(sel.path(0).unwrap().health(), PathHealth::Unknown);
    }

    #[test]
    fn failovers_are_counted_past_the_switch_history() {
        let mut s = Sim::new(2);
        s.run(100);
        for _ in 0..SWITCH_HISTORY {
            s.alive = vec![false, true];
            s.run(100);
            s.alive = vec![true, false];
            s.run(100);
        }
        assert_eq!(s.sel.switches().count(), SWITCH_HISTORY);
        assert_eq!(s.sel.failovers(), 2 * SWITCH_HISTORY);
    }
}
