//! A node's root supervisor: one task that owns a [`SupervisorCore`] and the node's actors.
//!
//! Each actor runs as a tokio task; a panic or an `Err` from it is a failure, an operator kill
//! aborts it. The supervisor reports every exit to the core and carries out the answer: it stops
//! siblings in reverse start order (asking each to shut down, aborting it after a grace period),
//! waits for their exits and for the backoff, then starts children in start order. An actor's
//! mailbox belongs to the supervisor, not to the actor, so what was queued while it restarted is
//! delivered to the new instance.
//!
//! When the core gives up (restart intensity exceeded) the root logs it and keeps the node, its
//! links and its control socket running, with the actors stopped; an operator `start` or
//! `restart` rebuilds the root and starts the named actor again.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_actors::{ActorContext, ActorEnv, ActorFailure, ActorStats, StartSignal};
use colony_cluster::{Address, Cluster, MailboxReceiver, MailboxSender};
use colony_config::{ActorConfig, ActorSettings, ClusterConfig, RestartPolicy, Strategy};
use futures::FutureExt;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{Instrument, error, info, warn};

use super::core::{ChildExit, ChildId, ChildState, Decision, Failure, Plan, SupervisorCore};
use crate::control::protocol::{ActorStatus, SupervisorStatus};
use crate::reload::plan::NodePlan;

/// How long a stopping actor gets to finish before it is aborted.
pub const STOP_GRACE: Duration = Duration::from_secs(3);
/// Messages an actor's mailbox holds before senders wait.
pub const MAILBOX_CAPACITY: usize = 1024;

/// An operator action on one actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Stop, then start (not a failure).
    Restart,
    /// Stop until started.
    Stop,
    /// Start a stopped actor.
    Start,
    /// Fail it as a crash would.
    Kill,
}

enum Command {
    Act {
        name: String,
        action: OperatorAction,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Status {
        reply: oneshot::Sender<(SupervisorStatus, Vec<ActorStatus>)>,
    },
    Apply {
        plan: NodePlan,
        config: Arc<ClusterConfig>,
        source: String,
        reply: oneshot::Sender<Applied>,
    },
    Undo {
        undo: Undo,
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Whether each actor a plan (re)started came up.
pub type StartReports = Vec<(String, oneshot::Receiver<Result<(), String>>)>;

/// A plan carried out: the starts to watch, and how to go back.
pub struct Applied {
    /// One report per actor started or restarted by the plan.
    pub starts: StartReports,
    /// What [`SupervisorHandle::undo`] needs to return to the previous config.
    pub undo: Undo,
}

/// The previous state of everything a plan changed.
pub struct Undo {
    config: Arc<ClusterConfig>,
    supervision: colony_config::SupervisionSettings,
    added: Vec<String>,
    removed: Vec<Child>,
    /// (name, previous config, previous settings source)
    changed: Vec<(String, ActorConfig, String, bool)>,
}

/// Talks to a running supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Command>,
}

impl SupervisorHandle {
    /// Applies an operator action to the actor called `name`.
    pub async fn act(&self, name: &str, action: OperatorAction) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Act {
                name: name.to_owned(),
                action,
                reply,
            })
            .await
            .map_err(|_| "node is stopping".to_owned())?;
        rx.await.map_err(|_| "node is stopping".to_owned())?
    }

    /// The supervisor's and its actors' status.
    pub async fn status(&self) -> Option<(SupervisorStatus, Vec<ActorStatus>)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Status { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Carries out a reload plan: stops, changes in place, restarts and starts actors.
    pub async fn apply(
        &self,
        plan: NodePlan,
        config: Arc<ClusterConfig>,
        source: &str,
    ) -> Result<Applied, String> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Apply {
            plan,
            config,
            source: source.to_owned(),
            reply,
        };
        self.tx
            .send(cmd)
            .await
            .map_err(|_| "node is stopping".to_owned())?;
        rx.await.map_err(|_| "node is stopping".to_owned())
    }

    /// Returns to the state before an [`Applied`] plan.
    pub async fn undo(&self, undo: Undo) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Undo { undo, reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops every actor in reverse start order and ends the supervisor.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Running {
    generation: u64,
    abort: AbortHandle,
    shutdown: watch::Sender<bool>,
    killed: bool,
}

struct Child {
    id: ChildId,
    config: ActorConfig,
    settings_source: String,
    stats: Arc<ActorStats>,
    mailbox: Arc<Mutex<MailboxReceiver>>,
    mailbox_tx: MailboxSender,
    settings: watch::Sender<ActorSettings>,
    running: Option<Running>,
    /// The start signal for the next spawn, when someone waits to hear it came up.
    probation: Option<StartSignal>,
    /// The running instance's start signal.
    start_signal: StartSignal,
    /// Why its last start failed, if it did.
    start_failure: Option<String>,
}

/// Starts waiting for `waiting_for` to exit, then for `not_before`.
struct PendingStart {
    waiting_for: Vec<ChildId>,
    not_before: Instant,
    start: Vec<ChildId>,
}

struct Supervisor {
    node: String,
    cluster: Cluster,
    config: Arc<ClusterConfig>,
    data_dir: PathBuf,
    core: SupervisorCore,
    children: Vec<Child>,
    tasks: JoinSet<(ChildId, u64, ExitOutcome)>,
    next_generation: u64,
    pending: Vec<PendingStart>,
    /// Restarts and last failure of each child before the root was rebuilt.
    history: HashMap<ChildId, (u32, Option<Failure>)>,
}

enum ExitOutcome {
    Returned(Result<(), ActorFailure>),
    Panicked(String),
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_owned()
    }
}

/// Starts the root supervisor of `node` with every actor the config places on it, in order;
/// the reports say whether each came up.
pub fn start(
    cluster: Cluster,
    config: Arc<ClusterConfig>,
    node: &str,
    data_dir: PathBuf,
) -> (SupervisorHandle, StartReports) {
    let settings = config
        .node(node)
        .map(|n| config.node_supervision(n).clone())
        .unwrap_or_default();
    let mut sup = Supervisor {
        node: node.to_owned(),
        cluster,
        config: config.clone(),
        data_dir,
        core: SupervisorCore::new(settings),
        children: Vec::new(),
        tasks: JoinSet::new(),
        next_generation: 1,
        pending: Vec::new(),
        history: HashMap::new(),
    };
    let starts = config
        .actors_on(node)
        .map(|actor| {
            (
                actor.name.clone(),
                sup.add(actor.clone(), "config".to_owned()),
            )
        })
        .collect();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(sup.run(rx).in_current_span());
    (SupervisorHandle { tx }, starts)
}

impl Supervisor {
    /// Adds a child and starts it; the receiver hears whether it came up.
    fn add(
        &mut self,
        config: ActorConfig,
        settings_source: String,
    ) -> oneshot::Receiver<Result<(), String>> {
        let now = Instant::now();
        let id = self.core.add_child(config.restart, now);
        let (tx, rx) = mpsc::channel(MAILBOX_CAPACITY);
        self.cluster.registry().insert(&config.name, tx.clone());
        let (settings, _) = watch::channel(config.settings.clone());
        let (signal, started) = StartSignal::new();
        self.children.push(Child {
            id,
            config,
            settings_source,
            stats: Arc::new(ActorStats::default()),
            mailbox: Arc::new(Mutex::new(rx)),
            mailbox_tx: tx,
            settings,
            running: None,
            probation: Some(signal),
            start_signal: StartSignal::default(),
            start_failure: None,
        });
        self.spawn(id);
        started
    }

    /// Brings back a child removed by a plan that is being undone.
    fn readd(&mut self, mut child: Child) {
        child.id = self.core.add_child(child.config.restart, Instant::now());
        self.cluster
            .registry()
            .insert(&child.config.name, child.mailbox_tx.clone());
        let id = child.id;
        self.children.push(child);
        self.spawn(id);
    }

    /// Stops a child and forgets it; returns it (for an undo).
    fn remove(&mut self, name: &str) -> Option<Child> {
        let index = self.children.iter().position(|c| c.config.name == name)?;
        let id = self.children[index].id;
        if let Some(r) = &self.children[index].running {
            let _ = r.shutdown.send(true);
            let abort = r.abort.clone();
            tokio::spawn(async move {
                tokio::time::sleep(STOP_GRACE).await;
                abort.abort();
            });
        }
        self.core.remove_child(id);
        for p in &mut self.pending {
            p.waiting_for.retain(|w| *w != id);
            p.start.retain(|s| *s != id);
        }
        self.cluster.registry().unregister(name);
        let mut child = self.children.remove(index);
        child.running = None;
        Some(child)
    }

    fn apply(&mut self, plan: NodePlan, config: Arc<ClusterConfig>, source: &str) -> Applied {
        let mut undo = Undo {
            config: std::mem::replace(&mut self.config, config),
            supervision: self.core.settings().clone(),
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        };
        let mut starts = Vec::new();
        if let Some(s) = plan.supervision {
            self.core.set_settings(s);
        }
        for name in &plan.stop {
            if let Some(child) = self.remove(name) {
                info!(actor = %name, "stopped by reload");
                undo.removed.push(child);
            }
        }
        for (update, restart) in plan
            .in_place
            .into_iter()
            .map(|u| (u, false))
            .chain(plan.restart.into_iter().map(|u| (u, true)))
        {
            let Some(child) = self
                .children
                .iter_mut()
                .find(|c| c.config.name == update.config.name)
            else {
                continue;
            };
            let old = std::mem::replace(&mut child.config, update.config);
            let old_source = std::mem::replace(&mut child.settings_source, source.to_owned());
            undo.changed
                .push((old.name.clone(), old, old_source, restart));
            child.settings.send_replace(child.config.settings.clone());
            if restart {
                let (signal, started) = StartSignal::new();
                child.probation = Some(signal);
                starts.push((child.config.name.clone(), started));
                let id = child.id;
                let plan = self.core.restart(id);
                self.carry_out(plan);
            }
        }
        for config in plan.start {
            let name = config.name.clone();
            starts.push((name.clone(), self.add(config, source.to_owned())));
            undo.added.push(name);
        }
        self.start_due();
        Applied { starts, undo }
    }

    fn undo(&mut self, undo: Undo) {
        warn!(node = %self.node, "rolling back to the previous config");
        self.config = undo.config;
        self.core.set_settings(undo.supervision);
        for name in undo.added.iter().rev() {
            self.remove(name);
        }
        for (name, old, source, restart) in undo.changed {
            let Some(child) = self.children.iter_mut().find(|c| c.config.name == name) else {
                continue;
            };
            child.config = old;
            child.settings_source = source;
            child.settings.send_replace(child.config.settings.clone());
            child.start_failure = None;
            if restart {
                let id = child.id;
                let plan = self.core.restart(id);
                let plan = if plan.is_empty() {
                    self.core.start(id)
                } else {
                    plan
                };
                self.carry_out(plan);
            }
        }
        for child in undo.removed {
            self.readd(child);
        }
        self.start_due();
    }

    fn child(&mut self, id: ChildId) -> Option<&mut Child> {
        self.children.iter_mut().find(|c| c.id == id)
    }

    fn spawn(&mut self, id: ChildId) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let node = self.node.clone();
        let (cluster, config, data_dir) = (
            self.cluster.clone(),
            self.config.clone(),
            self.data_dir.clone(),
        );
        let Some(child) = self.children.iter_mut().find(|c| c.id == id) else {
            return;
        };
        let address = Address::new(node, child.config.name.clone());
        let start = child.probation.take().unwrap_or_default();
        child.start_signal = start.clone();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mailbox = child.mailbox.clone();
        let stats = child.stats.clone();
        let settings = child.settings.subscribe();
        let dir = data_dir.join(&child.config.name);
        let span = tracing::info_span!("actor", actor = %address);
        let abort = self.tasks.spawn(
            async move {
                let run = async move {
                    std::fs::create_dir_all(&dir).map_err(|e| {
                        ActorFailure::new(format!("cannot create {}: {e}", dir.display()))
                    })?;
                    // Waits for a previous instance that is still stopping to let go of the mailbox.
                    let mailbox = mailbox.lock_owned().await;
                    let env = ActorEnv {
                        address,
                        cluster,
                        config,
                        data_dir: dir,
                        stats,
                        start,
                    };
                    let ctx = ActorContext::new(env, settings, mailbox, shutdown_rx);
                    colony_actors::run(ctx).await
                };
                let outcome = match AssertUnwindSafe(run).catch_unwind().await {
                    Ok(result) => ExitOutcome::Returned(result),
                    Err(panic) => ExitOutcome::Panicked(panic_message(panic)),
                };
                (id, generation, outcome)
            }
            .instrument(span),
        );
        child.running = Some(Running {
            generation,
            abort,
            shutdown: shutdown_tx,
            killed: false,
        });
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut rates = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_start = self
                .pending
                .iter()
                .filter(|p| p.waiting_for.is_empty())
                .map(|p| p.not_before)
                .min();
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd),
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => self.joined(joined),
                _ = sleep_until(next_start), if next_start.is_some() => self.start_due(),
                _ = rates.tick() => {
                    for c in &self.children {
                        c.stats.sample_rate(1.0);
                    }
                }
            }
        }
    }

    fn joined(&mut self, joined: Result<(ChildId, u64, ExitOutcome), tokio::task::JoinError>) {
        let (id, generation, exit) = match joined {
            Ok((id, generation, ExitOutcome::Returned(Ok(())))) => {
                (id, Some(generation), ChildExit::Normal)
            }
            Ok((id, generation, ExitOutcome::Returned(Err(f)))) => {
                (id, Some(generation), ChildExit::Failed(f.0))
            }
            Ok((id, generation, ExitOutcome::Panicked(m))) => {
                (id, Some(generation), ChildExit::Failed(m))
            }
            Err(e) => {
                // Aborted: find which child by its task id.
                let task = e.id();
                let Some(child) = self
                    .children
                    .iter()
                    .find(|c| c.running.as_ref().is_some_and(|r| r.abort.id() == task))
                else {
                    return;
                };
                let killed = child.running.as_ref().is_some_and(|r| r.killed);
                let exit = if killed {
                    ChildExit::Killed
                } else {
                    ChildExit::Normal
                };
                (child.id, None, exit)
            }
        };
        let node = self.node.clone();
        let Some(child) = self.child(id) else { return };
        if let (Some(g), Some(r)) = (generation, &child.running)
            && r.generation != g
        {
            return;
        }
        child.running = None;
        let address = format!("{node}/{}", child.config.name);
        if child.start_signal.is_pending() {
            // It never came up: a start failure, reported to whoever started it, not restarted.
            let reason = exit
                .failure_reason()
                .unwrap_or("stopped before it started")
                .to_owned();
            warn!(actor = %address, "actor failed to start: {reason}");
            child.start_signal.fail(&reason);
            child.start_failure = Some(reason);
            let now = Instant::now();
            let _ = self.core.stop(id);
            let _ = self.core.on_exit(id, ChildExit::Normal, now);
            for p in &mut self.pending {
                p.waiting_for.retain(|w| *w != id);
            }
            self.start_due();
            return;
        }
        match &exit {
            ChildExit::Normal => info!(actor = %address, "actor stopped"),
            ChildExit::Failed(reason) => warn!(actor = %address, "actor failed: {reason}"),
            ChildExit::Killed => warn!(actor = %address, "actor killed by operator"),
        }
        self.exited(id, exit);
    }

    /// Reports an exit to the core and carries out its decision.
    fn exited(&mut self, id: ChildId, exit: ChildExit) {
        for p in &mut self.pending {
            p.waiting_for.retain(|w| *w != id);
        }
        match self.core.on_exit(id, exit, Instant::now()) {
            Decision::Ignore | Decision::Stopped => {}
            Decision::Restart(plan) => {
                let names: Vec<String> = plan
                    .start
                    .iter()
                    .filter_map(|id| self.name_of(*id))
                    .collect();
                info!(restarting = ?names, delay_ms = plan.delay.as_millis() as u64, "restarting");
                self.carry_out(plan);
            }
            Decision::Escalate { stop, reason } => {
                error!(node = %self.node, "root supervisor gave up ({reason}); actors stay stopped until an operator starts them");
                self.pending.clear();
                for id in stop {
                    self.stop_child(id);
                }
            }
        }
        self.start_due();
    }

    fn name_of(&self, id: ChildId) -> Option<String> {
        self.children
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.config.name.clone())
    }

    /// Asks a child to stop and aborts it after the grace period. Returns false when it was not
    /// running (its exit has then been reported already).
    fn stop_child(&mut self, id: ChildId) -> bool {
        let Some(child) = self.child(id) else {
            return false;
        };
        match &child.running {
            Some(r) => {
                let _ = r.shutdown.send(true);
                let abort = r.abort.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(STOP_GRACE).await;
                    abort.abort();
                });
                true
            }
            None => {
                // Nothing to stop: tell the core the expected exit happened.
                let _ = self.core.on_exit(id, ChildExit::Normal, Instant::now());
                false
            }
        }
    }

    fn carry_out(&mut self, plan: Plan) {
        let mut waiting_for = Vec::new();
        for id in plan.stop {
            if self.stop_child(id) {
                waiting_for.push(id);
            }
        }
        if !plan.start.is_empty() {
            self.pending.push(PendingStart {
                waiting_for,
                not_before: Instant::now() + plan.delay,
                start: plan.start,
            });
        }
    }

    fn start_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.waiting_for.is_empty() && p.not_before <= now);
        self.pending = later;
        for p in due {
            for id in p.start {
                if self.core.confirm_start(id, now) {
                    self.spawn(id);
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Act {
                name,
                action,
                reply,
            } => {
                let _ = reply.send(self.act(&name, action));
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Apply {
                plan,
                config,
                source,
                reply,
            } => {
                let _ = reply.send(self.apply(plan, config, &source));
            }
            Command::Undo { undo, reply } => {
                self.undo(undo);
                let _ = reply.send(());
            }
            Command::Shutdown { .. } => {}
        }
    }

    fn act(&mut self, name: &str, action: OperatorAction) -> Result<(), String> {
        let Some(id) = self
            .children
            .iter()
            .find(|c| c.config.name == name)
            .map(|c| c.id)
        else {
            return Err(format!("no actor {name} on node {}", self.node));
        };
        if self.core.has_given_up()
            && matches!(action, OperatorAction::Start | OperatorAction::Restart)
        {
            self.rebuild_core();
        }
        let state = self.core.child(id).map(|c| c.state);
        match action {
            OperatorAction::Kill => {
                let child = self.child(id).ok_or("no such actor")?;
                let Some(r) = child.running.as_mut() else {
                    return Err(format!("{name} is not running"));
                };
                r.killed = true;
                r.abort.abort();
                Ok(())
            }
            OperatorAction::Stop => {
                if !matches!(
                    state,
                    Some(ChildState::Running { .. }) | Some(ChildState::Restarting)
                ) {
                    return Err(format!("{name} is not running"));
                }
                let plan = self.core.stop(id);
                self.carry_out(plan);
                self.pending
                    .iter_mut()
                    .for_each(|p| p.start.retain(|s| *s != id));
                Ok(())
            }
            OperatorAction::Start => {
                if !matches!(state, Some(ChildState::Stopped) | Some(ChildState::GaveUp)) {
                    return Err(format!("{name} is already running"));
                }
                let plan = self.core.start(id);
                self.carry_out(plan);
                self.start_due();
                Ok(())
            }
            OperatorAction::Restart => {
                let plan = self.core.restart(id);
                if plan.is_empty() {
                    return Err(format!("{name} is already restarting"));
                }
                self.carry_out(plan);
                self.start_due();
                Ok(())
            }
        }
    }

    /// A fresh root after giving up: every actor stopped, history kept in the actors' records.
    fn rebuild_core(&mut self) {
        info!(node = %self.node, "operator restarts the root supervisor");
        let now = Instant::now();
        let mut core = SupervisorCore::new(self.core.settings().clone());
        let old: HashMap<ChildId, (u32, Option<Failure>)> = self
            .core
            .children()
            .map(|c| {
                let (r, f) = self.history.get(&c.id).cloned().unwrap_or((0, None));
                (c.id, (c.restarts + r, c.last_failure.clone().or(f)))
            })
            .collect();
        let mut history = Vec::new();
        for child in &mut self.children {
            let new_id = core.add_child(child.config.restart, now);
            let _ = core.stop(new_id);
            let _ = core.on_exit(new_id, ChildExit::Normal, now);
            history.push((new_id, old.get(&child.id).cloned()));
            child.id = new_id;
        }
        self.core = core;
        self.pending.clear();
        self.history = history
            .into_iter()
            .filter_map(|(id, h)| h.map(|h| (id, h)))
            .collect();
    }

    fn status(&self) -> (SupervisorStatus, Vec<ActorStatus>) {
        let now = Instant::now();
        let s = self.core.settings();
        let sup = SupervisorStatus {
            strategy: match s.strategy {
                Strategy::OneForOne => "one_for_one",
                Strategy::OneForAll => "one_for_all",
                Strategy::RestForOne => "rest_for_one",
            }
            .to_owned(),
            max_restarts: s.max_restarts,
            within_secs: s.within_secs,
            restarts_in_window: self.core.restarts_in_window(now),
            given_up: self.core.has_given_up(),
        };
        let actors = self
            .children
            .iter()
            .map(|c| {
                let record = self.core.child(c.id);
                let (prior_restarts, prior_failure) =
                    self.history.get(&c.id).cloned().unwrap_or((0, None));
                let failure = record
                    .and_then(|r| r.last_failure.clone())
                    .or(prior_failure);
                let start_failure = c
                    .start_failure
                    .clone()
                    .map(|reason| format!("failed to start: {reason}"));
                ActorStatus {
                    address: format!("{}/{}", self.node, c.config.name),
                    kind: c.config.kind().as_str().to_owned(),
                    state: match record.map(|r| r.state) {
                        Some(ChildState::Running { .. }) => "running",
                        Some(ChildState::Restarting) => "restarting",
                        Some(ChildState::Stopped) => "stopped",
                        Some(ChildState::GaveUp) | None => "failed",
                    }
                    .to_owned(),
                    restart: match c.config.restart {
                        RestartPolicy::Permanent => "permanent",
                        RestartPolicy::Transient => "transient",
                        RestartPolicy::Temporary => "temporary",
                    }
                    .to_owned(),
                    restarts: u64::from(record.map_or(0, |r| r.restarts) + prior_restarts),
                    last_error: failure.as_ref().map(|f| f.reason.clone()).or(start_failure),
                    last_error_ago_ms: failure
                        .as_ref()
                        .map(|f| now.saturating_duration_since(f.at).as_millis() as u64),
                    uptime_ms: record
                        .and_then(|r| r.uptime(now))
                        .map(|d| d.as_millis() as u64),
                    mailbox_depth: c.mailbox_tx.max_capacity() - c.mailbox_tx.capacity(),
                    mailbox_capacity: c.mailbox_tx.max_capacity(),
                    messages_handled: c.stats.handled_total(),
                    messages_rejected: c.stats.rejected_total(),
                    messages_per_sec: c.stats.rate(),
                    settings_source: c.settings_source.clone(),
                    settings: serde_json::to_value(&c.config.settings).unwrap_or_default(),
                    detail: c.stats.detail(),
                }
            })
            .collect();
        (sup, actors)
    }

    /// Stops every actor in reverse start order, each within the grace period.
    async fn shutdown(&mut self) {
        self.pending.clear();
        let ids: Vec<ChildId> = self.children.iter().rev().map(|c| c.id).collect();
        for id in ids {
            let Some(child) = self.child(id) else {
                continue;
            };
            let Some(r) = child.running.take() else {
                continue;
            };
            let _ = r.shutdown.send(true);
            let name = child.config.name.clone();
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            loop {
                match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                    Ok(Some(Ok((done, _, _)))) if done == id => break,
                    Ok(Some(Err(e))) if e.id() == r.abort.id() => break,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => {
                        warn!(actor = %name, "did not stop within {STOP_GRACE:?}; aborting");
                        r.abort.abort();
                        break;
                    }
                }
            }
            self.cluster.registry().unregister(&name);
        }
        self.tasks.shutdown().await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
