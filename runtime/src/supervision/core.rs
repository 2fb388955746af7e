//! The supervisor's decisions, as a plain state machine: Colony's supervision semantics.
//!
//! A [`SupervisorCore`] knows its children in start order and decides what happens when one of
//! them exits or an operator acts on it. It does no I/O and reads no clock: every event carries
//! `now`, and every answer is a [`Decision`] or a [`Plan`] that the actor around it carries out.
//! The semantics are Erlang/OTP's, stated here once:
//!
//! # Exits
//! - A child exits [`ChildExit::Normal`] (it stopped on its own without error),
//!   [`ChildExit::Failed`] (an error or a panic) or [`ChildExit::Killed`] (an operator kill,
//!   treated exactly as a failure with reason "killed by operator").
//!
//! # Restart policy
//! - `permanent`: always restarted.
//! - `transient`: restarted only if it exited abnormally (failed or killed).
//! - `temporary`: never restarted.
//! - A child that exits and is not restarted is marked stopped, and no sibling is touched.
//!
//! # Strategy
//! When the exited child is to be restarted:
//! - `one_for_one`: only that child is restarted.
//! - `one_for_all`: every other running child is stopped in reverse start order, then all of
//!   them are started in start order.
//! - `rest_for_one`: every running child started after it is stopped in reverse start order,
//!   then the exited child and those are started in start order.
//! - A temporary sibling stopped this way is not restarted; permanent and transient ones are.
//! - Siblings that are already stopped stay stopped; siblings already awaiting a restart are left
//!   to that restart.
//! - The exits of children the supervisor is stopping are expected and ignored.
//!
//! # Restart intensity
//! - One exit that is restarted is one restart in the window, however many children it restarts.
//! - A restart counts for `within_secs` seconds (one exactly `within_secs` old still counts).
//! - If a restart would make more than `max_restarts` restarts within the last `within_secs`
//!   seconds, counting itself, the supervisor gives up instead: it stops all its running children
//!   in reverse start order, marks the exited child gave-up and the others stopped, and escalates
//!   to its own supervisor. `max_restarts = 0` means any restart escalates.
//! - A supervisor that gave up is finished: it ignores every later exit and operator action; its
//!   own supervisor restarts it by building a new `SupervisorCore`.
//!
//! # Backoff
//! - The first restart in the window starts at once; the n-th waits `backoff_ms * 2^(n-2)` ms,
//!   capped at `backoff_max_ms`. As restarts age out of the window the delay shrinks again.
//!
//! # Operator actions
//! - `stop` stops a child; it is not restarted when its exit arrives, and if it was awaiting a
//!   restart that start is cancelled. `start` starts a stopped child. `restart` stops a running
//!   child and starts it again.
//! - They are not failures: they never enter the intensity window and never wait for backoff.
//!   `restart` adds one to the child's restart count; `stop` and `start` do not.
//!
//! # Status
//! - Each child's [`ChildRecord`] holds its state (with when it started, while running), its
//!   restart count (every restart of it, as the failed child, as a sibling or by an operator) and
//!   its last failure with reason and time.
//!
//! # Carrying out a plan
//! The shell terminates `plan.stop` in order, reporting each exit through
//! [`SupervisorCore::on_exit`], waits `plan.delay`, then for each child of `plan.start` calls
//! [`SupervisorCore::confirm_start`] and starts it only if that returns true (an operator may
//! have stopped it meanwhile).

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use colony_config::{RestartPolicy, Strategy, SupervisionSettings};

/// The failure reason recorded for [`ChildExit::Killed`].
pub const KILLED_REASON: &str = "killed by operator";

/// One child of a supervisor; stable across its restarts and the removal of others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChildId(u64);

impl fmt::Display for ChildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How a child's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildExit {
    /// It stopped on its own without error.
    Normal,
    /// It returned an error or panicked, for this reason.
    Failed(String),
    /// An operator killed it: a failure with reason [`KILLED_REASON`].
    Killed,
}

impl ChildExit {
    /// The failure reason, or `None` for a normal exit.
    pub fn failure_reason(&self) -> Option<&str> {
        match self {
            ChildExit::Normal => None,
            ChildExit::Failed(reason) => Some(reason),
            ChildExit::Killed => Some(KILLED_REASON),
        }
    }
}

/// Where a child is in its life, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Running since this instant.
    Running {
        /// When it was (re)started.
        since: Instant,
    },
    /// Awaiting a (re)start from a plan.
    Restarting,
    /// Stopped; only an operator starts it again.
    Stopped,
    /// Its exit made the supervisor give up.
    GaveUp,
}

/// A child's most recent failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Why it failed.
    pub reason: String,
    /// When its exit was reported.
    pub at: Instant,
}

/// What the supervisor knows about one child.
#[derive(Debug, Clone)]
pub struct ChildRecord {
    /// The child.
    pub id: ChildId,
    /// When it is restarted.
    pub policy: RestartPolicy,
    /// Where it is in its life.
    pub state: ChildState,
    /// How many times it has been restarted, for any reason.
    pub restarts: u32,
    /// Its most recent failure, if any.
    pub last_failure: Option<Failure>,
    /// The supervisor is terminating it, so its next exit is expected, not a failure.
    stopping: bool,
}

impl ChildRecord {
    /// How long it has been running at `now`, or `None` if it is not running.
    pub fn uptime(&self, now: Instant) -> Option<Duration> {
        match self.state {
            ChildState::Running { since } => Some(now.saturating_duration_since(since)),
            _ => None,
        }
    }

    fn is_running(&self) -> bool {
        matches!(self.state, ChildState::Running { .. }) && !self.stopping
    }
}

/// Children to terminate and to (re)start, for the shell to carry out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Terminate these first, in this order (reverse start order).
    pub stop: Vec<ChildId>,
    /// Then wait this long.
    pub delay: Duration,
    /// Then start these, in this order (start order), each once `confirm_start` allows it.
    pub start: Vec<ChildId>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty() && self.start.is_empty()
    }
}

/// What to do about a child's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// An expected or stale exit: nothing to do.
    Ignore,
    /// The child is not restarted and stays stopped; nothing else happens.
    Stopped,
    /// Carry out this plan.
    Restart(Plan),
    /// Give up: terminate `stop` in order, drop pending starts, report `reason` to the parent.
    Escalate {
        /// All running children, in reverse start order.
        stop: Vec<ChildId>,
        /// Why the supervisor gave up, for the parent and the log.
        reason: String,
    },
}

/// A supervisor's children, restart window and decisions; see the module doc.
#[derive(Debug, Clone)]
pub struct SupervisorCore {
    settings: SupervisionSettings,
    children: Vec<ChildRecord>,
    /// When each restart in the current window was decided, oldest first.
    window: VecDeque<Instant>,
    next_id: u64,
    gave_up: bool,
}

impl SupervisorCore {
    /// A supervisor with no children yet.
    pub fn new(settings: SupervisionSettings) -> Self {
        SupervisorCore {
            settings,
            children: Vec::new(),
            window: VecDeque::new(),
            next_id: 0,
            gave_up: false,
        }
    }

    /// Its current settings.
    pub fn settings(&self) -> &SupervisionSettings {
        &self.settings
    }

    /// Replaces its settings (hot reload); past restarts stay in the window.
    pub fn set_settings(&mut self, settings: SupervisionSettings) {
        self.settings = settings;
    }

    /// Adds a child at the end of the start order, running since `now`.
    pub fn add_child(&mut self, policy: RestartPolicy, now: Instant) -> ChildId {
        let id = ChildId(self.next_id);
        self.next_id += 1;
        self.children.push(ChildRecord {
            id,
            policy,
            state: ChildState::Running { since: now },
            restarts: 0,
            last_failure: None,
            stopping: false,
        });
        id
    }

    /// Forgets a child (hot reload); its later exit is ignored. Returns its last record.
    pub fn remove_child(&mut self, id: ChildId) -> Option<ChildRecord> {
        let index = self.index(id)?;
        Some(self.children.remove(index))
    }

    /// One child's record.
    pub fn child(&self, id: ChildId) -> Option<&ChildRecord> {
        self.children.iter().find(|c| c.id == id)
    }

    /// All children's records, in start order.
    pub fn children(&self) -> impl Iterator<Item = &ChildRecord> {
        self.children.iter()
    }

    /// Whether it has given up (escalated) and is finished.
    pub fn has_given_up(&self) -> bool {
        self.gave_up
    }

    /// How many restarts count in the intensity window at `now`.
    pub fn restarts_in_window(&self, now: Instant) -> usize {
        self.window
            .iter()
            .filter(|&&t| self.in_window(t, now))
            .count()
    }

    /// Decides what follows a child's exit, reported at `now`.
    pub fn on_exit(&mut self, id: ChildId, exit: ChildExit, now: Instant) -> Decision {
        let Some(index) = self.index(id) else {
            return Decision::Ignore;
        };
        let child = &mut self.children[index];
        if child.stopping {
            child.stopping = false;
            return Decision::Ignore;
        }
        if self.gave_up || !child.is_running() {
            return Decision::Ignore;
        }
        let reason = exit.failure_reason();
        if let Some(reason) = reason {
            child.last_failure = Some(Failure {
                reason: reason.to_owned(),
                at: now,
            });
        }
        let restart = match child.policy {
            RestartPolicy::Permanent => true,
            RestartPolicy::Transient => reason.is_some(),
            RestartPolicy::Temporary => false,
        };
        if !restart {
            child.state = ChildState::Stopped;
            return Decision::Stopped;
        }

        let n = self.record_restart(now);
        if n > self.settings.max_restarts as usize {
            return self.give_up(index, &exit);
        }
        let siblings = match self.settings.strategy {
            Strategy::OneForOne => 0..0,
            Strategy::OneForAll => 0..self.children.len(),
            Strategy::RestForOne => index + 1..self.children.len(),
        };
        let mut plan = Plan {
            delay: self.backoff(n),
            ..Plan::default()
        };
        for (i, c) in self.children.iter_mut().enumerate() {
            let failed = i == index;
            if !(failed || siblings.contains(&i) && c.is_running()) {
                continue;
            }
            if !failed {
                c.stopping = true;
                plan.stop.push(c.id);
                if c.policy == RestartPolicy::Temporary {
                    c.state = ChildState::Stopped;
                    continue;
                }
            }
            c.state = ChildState::Restarting;
            c.restarts += 1;
            plan.start.push(c.id);
        }
        plan.stop.reverse();
        Decision::Restart(plan)
    }

    /// The shell is about to start `id` from a plan: whether it still should; if so the child
    /// is running from `now`.
    pub fn confirm_start(&mut self, id: ChildId, now: Instant) -> bool {
        if self.gave_up {
            return false;
        }
        match self.record_mut(id) {
            Some(c) if c.state == ChildState::Restarting => {
                c.state = ChildState::Running { since: now };
                true
            }
            _ => false,
        }
    }

    /// Operator stop: the child stays stopped; a pending restart of it is cancelled.
    pub fn stop(&mut self, id: ChildId) -> Plan {
        let mut plan = Plan::default();
        if self.gave_up {
            return plan;
        }
        if let Some(c) = self.record_mut(id) {
            if c.is_running() {
                c.stopping = true;
                plan.stop.push(id);
            }
            if c.state != ChildState::GaveUp {
                c.state = ChildState::Stopped;
            }
        }
        plan
    }

    /// Operator start of a stopped child.
    pub fn start(&mut self, id: ChildId) -> Plan {
        let mut plan = Plan::default();
        if self.gave_up {
            return plan;
        }
        if let Some(c) = self.record_mut(id)
            && c.state == ChildState::Stopped
        {
            c.state = ChildState::Restarting;
            plan.start.push(id);
        }
        plan
    }

    /// Operator restart: stops the child if running and starts it again; counts as a restart
    /// of the child but not in the intensity window. A child awaiting a restart is left alone.
    pub fn restart(&mut self, id: ChildId) -> Plan {
        let mut plan = Plan::default();
        if self.gave_up {
            return plan;
        }
        if let Some(c) = self.record_mut(id) {
            if c.is_running() {
                c.stopping = true;
                plan.stop.push(id);
            } else if c.state != ChildState::Stopped {
                return plan;
            }
            c.state = ChildState::Restarting;
            c.restarts += 1;
            plan.start.push(id);
        }
        plan
    }

    fn index(&self, id: ChildId) -> Option<usize> {
        self.children.iter().position(|c| c.id == id)
    }

    fn record_mut(&mut self, id: ChildId) -> Option<&mut ChildRecord> {
        self.children.iter_mut().find(|c| c.id == id)
    }

    fn in_window(&self, then: Instant, now: Instant) -> bool {
        now.saturating_duration_since(then) <= Duration::from_secs(self.settings.within_secs)
    }

    /// Slides the window to `now`, adds a restart, and returns how many it now holds.
    fn record_restart(&mut self, now: Instant) -> usize {
        while let Some(&oldest) = self.window.front() {
            if self.in_window(oldest, now) {
                break;
            }
            self.window.pop_front();
        }
        self.window.push_back(now);
        self.window.len()
    }

    /// The delay before the `n`-th restart in the window.
    fn backoff(&self, n: usize) -> Duration {
        if n <= 1 {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(n - 2).unwrap_or(u32::MAX);
        let ms = self
            .settings
            .backoff_ms
            .saturating_mul(2u64.saturating_pow(doublings));
        Duration::from_millis(ms.min(self.settings.backoff_max_ms))
    }

    fn give_up(&mut self, index: usize, exit: &ChildExit) -> Decision {
        self.gave_up = true;
        let mut stop = Vec::new();
        for (i, c) in self.children.iter_mut().enumerate() {
            if i == index {
                c.state = ChildState::GaveUp;
                continue;
            }
            if c.is_running() {
                c.stopping = true;
                stop.push(c.id);
            }
            c.state = ChildState::Stopped;
        }
        stop.reverse();
        let what = match exit.failure_reason() {
            Some(reason) => format!("failed ({reason})"),
            None => "exited normally".to_owned(),
        };
        let reason = format!(
            "child {} {what}: more than {} restarts within {}s, giving up",
            self.children[index].id, self.settings.max_restarts, self.settings.within_secs
        );
        Decision::Escalate { stop, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChildState::{GaveUp, Restarting, Stopped};
    use RestartPolicy::{Permanent, Temporary, Transient};
    use Strategy::{OneForAll, OneForOne, RestForOne};

    fn settings(strategy: Strategy, max_restarts: u32, within_secs: u64) -> SupervisionSettings {
        let (backoff_ms, backoff_max_ms) = (0, 0);
        SupervisionSettings {
            strategy,
            max_restarts,
            within_secs,
            backoff_ms,
            backoff_max_ms,
        }
    }

    fn boom() -> ChildExit {
        ChildExit::Failed("boom".into())
    }

    /// A supervisor under test, its children by start index, and a fake clock in seconds.
    struct Sup {
        core: SupervisorCore,
        ids: Vec<ChildId>,
        t0: Instant,
    }

    impl Sup {
        fn new(settings: SupervisionSettings, policies: &[RestartPolicy]) -> Self {
            let t0 = Instant::now();
            let mut core = SupervisorCore::new(settings);
            let ids = policies.iter().map(|&p| core.add_child(p, t0)).collect();
            Sup { core, ids, t0 }
        }

        /// Generous intensity, no backoff.
        fn with(strategy: Strategy, policies: &[RestartPolicy]) -> Self {
            Sup::new(settings(strategy, 100, 60), policies)
        }

        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }

        fn exit(&mut self, i: usize, exit: ChildExit, secs: u64) -> Decision {
            self.core.on_exit(self.ids[i], exit, self.at(secs))
        }

        /// Reports an exit that must be restarted, and returns the plan.
        fn restart_after(&mut self, i: usize, exit: ChildExit, secs: u64) -> Plan {
            match self.exit(i, exit, secs) {
                Decision::Restart(plan) => plan,
                other => panic!("expected a restart, got {other:?}"),
            }
        }

        /// Does what the shell does: terminates `stop` (exits ignored), then starts `start`.
        fn carry_out(&mut self, plan: &Plan, secs: u64) {
            for &id in &plan.stop {
                let exit = ChildExit::Failed("terminated".into());
                assert_eq!(self.core.on_exit(id, exit, self.at(secs)), Decision::Ignore);
            }
            for &id in &plan.start {
                assert!(self.core.confirm_start(id, self.at(secs)));
            }
        }

        /// A failure of child `i` at `secs` that is restarted and carried out.
        fn fail_and_restart(&mut self, i: usize, secs: u64) -> Plan {
            let plan = self.restart_after(i, boom(), secs);
            self.carry_out(&plan, secs);
            plan
        }

        /// A plan's stop and start lists as start indices.
        fn order(&self, plan: &Plan) -> (Vec<usize>, Vec<usize>) {
            let index = |id: &ChildId| self.ids.iter().position(|x| x == id).unwrap_or(99);
            (
                plan.stop.iter().map(index).collect(),
                plan.start.iter().map(index).collect(),
            )
        }

        fn record(&self, i: usize) -> &ChildRecord {
            self.core.child(self.ids[i]).expect("child exists")
        }

        fn state(&self, i: usize) -> ChildState {
            self.record(i).state
        }

        fn restarts(&self) -> Vec<u32> {
            self.core.children().map(|c| c.restarts).collect()
        }

        fn window(&self, secs: u64) -> usize {
            self.core.restarts_in_window(self.at(secs))
        }
    }

    #[test]
    fn one_for_one_restarts_only_the_failed_child() {
        let mut sup = Sup::with(OneForOne, &[Permanent; 3]);
        let plan = sup.restart_after(1, boom(), 0);
        assert_eq!(sup.order(&plan), (vec![], vec![1]));
        assert_eq!(sup.restarts(), [0, 1, 0]);
    }

    #[test]
    fn one_for_all_stops_others_in_reverse_then_starts_all_in_order() {
        let mut sup = Sup::with(OneForAll, &[Permanent; 4]);
        let plan = sup.restart_after(1, boom(), 0);
        assert_eq!(sup.order(&plan), (vec![3, 2, 0], vec![0, 1, 2, 3]));
        assert_eq!(sup.restarts(), [1, 1, 1, 1]);
    }

    #[test]
    fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
        let mut sup = Sup::with(RestForOne, &[Permanent; 4]);
        let plan = sup.restart_after(1, boom(), 0);
        assert_eq!(sup.order(&plan), (vec![3, 2], vec![1, 2, 3]));
        assert_eq!(sup.restarts(), [0, 1, 1, 1]);
    }

    #[test]
    fn permanent_is_always_restarted() {
        let mut sup = Sup::with(OneForOne, &[Permanent]);
        for exit in [ChildExit::Normal, boom(), ChildExit::Killed] {
            let plan = sup.restart_after(0, exit, 0);
            sup.carry_out(&plan, 0);
        }
        assert_eq!(sup.restarts(), [3]);
    }

    #[test]
    fn transient_is_restarted_only_after_an_abnormal_exit() {
        let mut sup = Sup::with(OneForOne, &[Transient]);
        for exit in [boom(), ChildExit::Killed] {
            let plan = sup.restart_after(0, exit, 0);
            sup.carry_out(&plan, 0);
        }
        assert_eq!(sup.exit(0, ChildExit::Normal, 0), Decision::Stopped);
        assert_eq!(sup.state(0), Stopped);
    }

    #[test]
    fn temporary_is_never_restarted_and_is_marked_stopped() {
        for exit in [ChildExit::Normal, boom(), ChildExit::Killed] {
            let mut sup = Sup::with(OneForOne, &[Temporary]);
            assert_eq!(sup.exit(0, exit, 0), Decision::Stopped);
            assert_eq!((sup.state(0), sup.window(0)), (Stopped, 0));
        }
    }

    #[test]
    fn killed_is_a_failure_with_reason_killed_by_operator() {
        let mut sup = Sup::with(OneForOne, &[Transient]);
        sup.restart_after(0, ChildExit::Killed, 3);
        let failure = Failure {
            reason: "killed by operator".into(),
            at: sup.at(3),
        };
        assert_eq!(sup.record(0).last_failure, Some(failure));
    }

    #[test]
    fn an_exit_that_is_not_restarted_touches_no_sibling() {
        let mut sup = Sup::with(OneForAll, &[Permanent, Transient, Temporary]);
        assert_eq!(sup.exit(1, ChildExit::Normal, 0), Decision::Stopped);
        assert_eq!(sup.exit(2, boom(), 0), Decision::Stopped);
        assert!(sup.record(0).is_running());
        assert_eq!(sup.restarts(), [0, 0, 0]);
    }

    #[test]
    fn temporary_siblings_are_stopped_but_not_restarted_under_one_for_all() {
        let mut sup = Sup::with(OneForAll, &[Permanent, Temporary, Transient]);
        let plan = sup.fail_and_restart(0, 0);
        assert_eq!(sup.order(&plan), (vec![2, 1], vec![0, 2]));
        assert_eq!(sup.state(1), Stopped);
    }

    #[test]
    fn already_stopped_siblings_stay_stopped() {
        let mut sup = Sup::with(OneForAll, &[Permanent; 3]);
        let plan = sup.core.stop(sup.ids[2]);
        sup.carry_out(&plan, 0);
        let plan = sup.fail_and_restart(0, 0);
        assert_eq!(sup.order(&plan), (vec![1], vec![0, 1]));
        assert_eq!(sup.state(2), Stopped);
    }

    #[test]
    fn exits_of_children_being_stopped_by_the_supervisor_are_ignored() {
        let mut sup = Sup::with(OneForAll, &[Permanent; 3]);
        let plan = sup.restart_after(0, boom(), 0);
        for &id in &plan.stop {
            assert_eq!(sup.core.on_exit(id, boom(), sup.at(1)), Decision::Ignore);
        }
        assert_eq!(
            (sup.window(1), sup.state(1), sup.state(2)),
            (1, Restarting, Restarting)
        );
        // A stale second exit of a child awaiting its restart is ignored too.
        assert_eq!(sup.exit(0, boom(), 1), Decision::Ignore);
    }

    #[test]
    fn one_failure_is_one_restart_in_the_window_however_many_children_restart() {
        let mut sup = Sup::new(settings(OneForAll, 1, 60), &[Permanent; 3]);
        sup.fail_and_restart(0, 0);
        assert_eq!((sup.restarts(), sup.window(0)), (vec![1, 1, 1], 1));
        assert!(matches!(sup.exit(2, boom(), 0), Decision::Escalate { .. }));
    }

    #[test]
    fn exactly_max_restarts_in_the_window_are_allowed_and_the_next_escalates() {
        let policies = [Permanent, Transient, Temporary, Permanent];
        let mut sup = Sup::new(settings(OneForOne, 3, 10), &policies);
        for secs in 0..3 {
            sup.fail_and_restart(0, secs);
        }
        let Decision::Escalate { stop, reason } = sup.exit(0, boom(), 3) else {
            panic!("expected escalation");
        };
        let all_but_failed = Plan {
            stop,
            ..Plan::default()
        };
        assert_eq!(sup.order(&all_but_failed).0, [3, 2, 1]);
        assert_eq!(
            reason,
            "child #0 failed (boom): more than 3 restarts within 10s, giving up"
        );
        let states: Vec<_> = (0..4).map(|i| sup.state(i)).collect();
        assert_eq!(states, [GaveUp, Stopped, Stopped, Stopped]);
    }

    #[test]
    fn a_supervisor_that_gave_up_ignores_everything_after() {
        let mut sup = Sup::new(settings(OneForOne, 0, 10), &[Permanent; 2]);
        assert!(matches!(sup.exit(0, boom(), 0), Decision::Escalate { .. }));
        assert!(sup.core.has_given_up());
        assert_eq!(sup.exit(1, boom(), 0), Decision::Ignore);
        assert!(sup.core.start(sup.ids[0]).is_empty());
        assert!(sup.core.restart(sup.ids[1]).is_empty());
        assert!(!sup.core.confirm_start(sup.ids[0], sup.t0));
    }

    #[test]
    fn max_restarts_zero_escalates_on_any_restart_but_not_on_a_stop() {
        let mut sup = Sup::new(settings(OneForOne, 0, 10), &[Temporary, Permanent]);
        assert_eq!(sup.exit(0, boom(), 0), Decision::Stopped);
        let Decision::Escalate { stop, .. } = sup.exit(1, ChildExit::Normal, 0) else {
            panic!("expected escalation");
        };
        assert!(stop.is_empty());
    }

    #[test]
    fn restarts_older_than_the_window_fall_out() {
        let mut sup = Sup::new(settings(OneForOne, 2, 10), &[Permanent]);
        sup.fail_and_restart(0, 0);
        sup.fail_and_restart(0, 5);
        // At 10s the restart at 0s is exactly 10s old and still counts.
        let mut probe = Sup {
            core: sup.core.clone(),
            ids: sup.ids.clone(),
            t0: sup.t0,
        };
        assert!(matches!(
            probe.exit(0, boom(), 10),
            Decision::Escalate { .. }
        ));
        // At 11s it has fallen out, so a third restart fits (5s, 11s).
        sup.fail_and_restart(0, 11);
        assert_eq!(sup.window(11), 2);
    }

    #[test]
    fn backoff_is_zero_then_doubles_from_the_base_and_is_capped() {
        let settings = SupervisionSettings {
            backoff_ms: 100,
            backoff_max_ms: 1000,
            ..settings(OneForOne, 100, 60)
        };
        let mut sup = Sup::new(settings, &[Permanent]);
        let delays: Vec<_> = (0..7)
            .map(|s| sup.fail_and_restart(0, s).delay.as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000]);
        // Once the window has emptied, the next restart is immediate again.
        assert_eq!(sup.fail_and_restart(0, 200).delay, Duration::ZERO);
    }

    #[test]
    fn backoff_does_not_overflow() {
        let core = SupervisorCore::new(SupervisionSettings {
            backoff_ms: u64::MAX / 2,
            backoff_max_ms: 5000,
            ..settings(OneForOne, u32::MAX, 60)
        });
        assert_eq!(core.backoff(200), Duration::from_millis(5000));
    }

    #[test]
    fn operator_stop_prevents_restart() {
        let mut sup = Sup::with(OneForAll, &[Permanent; 2]);
        let plan = sup.core.stop(sup.ids[0]);
        assert_eq!(sup.order(&plan), (vec![0], vec![]));
        assert_eq!(sup.exit(0, ChildExit::Killed, 0), Decision::Ignore);
        assert_eq!(
            (sup.state(0), sup.restarts(), sup.window(0)),
            (Stopped, vec![0, 0], 0)
        );
    }

    #[test]
    fn operator_stop_cancels_a_pending_restart() {
        let mut sup = Sup::with(OneForOne, &[Permanent]);
        let plan = sup.restart_after(0, boom(), 0);
        assert!(sup.core.stop(sup.ids[0]).is_empty());
        assert!(!sup.core.confirm_start(plan.start[0], sup.t0));
        assert_eq!(sup.state(0), Stopped);
    }

    #[test]
    fn operator_start_starts_only_a_stopped_child() {
        let mut sup = Sup::with(OneForOne, &[Transient]);
        assert!(sup.core.start(sup.ids[0]).is_empty());
        assert_eq!(sup.exit(0, ChildExit::Normal, 0), Decision::Stopped);
        let plan = sup.core.start(sup.ids[0]);
        assert_eq!(sup.order(&plan), (vec![], vec![0]));
        sup.carry_out(&plan, 2);
        assert_eq!(
            sup.record(0).uptime(sup.at(5)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(sup.restarts(), [0]);
    }

    #[test]
    fn operator_restart_counts_for_the_child_but_not_toward_intensity() {
        let mut sup = Sup::new(settings(OneForOne, 1, 60), &[Permanent]);
        for _ in 0..3 {
            let plan = sup.core.restart(sup.ids[0]);
            assert_eq!(
                (sup.order(&plan), plan.delay),
                ((vec![0], vec![0]), Duration::ZERO)
            );
            sup.carry_out(&plan, 0);
        }
        assert_eq!((sup.restarts(), sup.window(0)), (vec![3], 0));
        sup.fail_and_restart(0, 0);
    }

    #[test]
    fn status_records_last_failure_and_uptime() {
        let mut sup = Sup::with(OneForOne, &[Permanent]);
        assert_eq!(
            sup.record(0).uptime(sup.at(4)),
            Some(Duration::from_secs(4))
        );
        let plan = sup.restart_after(0, boom(), 5);
        assert_eq!(sup.record(0).uptime(sup.at(5)), None);
        sup.carry_out(&plan, 6);
        assert_eq!(
            sup.record(0).uptime(sup.at(7)),
            Some(Duration::from_secs(1))
        );
        let failure = Failure {
            reason: "boom".into(),
            at: sup.at(5),
        };
        assert_eq!(sup.record(0).last_failure, Some(failure));
    }

    #[test]
    fn a_removed_childs_exit_is_ignored_and_ids_stay_stable() {
        let mut sup = Sup::with(RestForOne, &[Permanent; 3]);
        assert!(sup.core.remove_child(sup.ids[1]).is_some());
        assert_eq!(sup.exit(1, boom(), 0), Decision::Ignore);
        let plan = sup.restart_after(0, boom(), 0);
        assert_eq!(sup.order(&plan), (vec![2], vec![0, 2]));
        assert_eq!(sup.core.add_child(Permanent, sup.t0).to_string(), "#3");
    }

    #[test]
    fn new_settings_apply_to_the_next_exit() {
        let mut sup = Sup::with(OneForOne, &[Permanent; 2]);
        sup.core.set_settings(settings(OneForAll, 100, 60));
        let plan = sup.restart_after(1, boom(), 0);
        assert_eq!(sup.order(&plan), (vec![0], vec![0, 1]));
    }
}
