//! What every kind of actor gets from the runtime that hosts it, and what it gives back.
//!
//! An actor is an async function from an [`ActorContext`] to `Result<(), ActorFailure>`: it runs
//! until it is told to shut down (return `Ok`) or something goes wrong (return `Err` or panic),
//! and its supervisor decides what happens next. The context's mailbox outlives the actor, so
//! messages queued while it restarts are not lost; its [`ActorStats`] outlive it too, so status
//! counts across restarts.
//!
//! [`ActorContext::next_event`] is the actor's one place to wait on the outside world: a message,
//! new settings to apply in place, or the request to stop. It is cancel-safe, so a kind can race
//! it against its own timers and sockets in `tokio::select!`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use colony_cluster::{Address, Cluster, Delivery, MailboxReceiver};
use colony_config::{ActorSettings, ClusterConfig};
use tokio::sync::{OwnedMutexGuard, oneshot, watch};

/// Why an actor stopped abnormally, in one line for status and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ActorFailure(pub String);

impl ActorFailure {
    /// A failure with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        ActorFailure(reason.into())
    }
}

/// Counters and kind-specific status that survive restarts.
#[derive(Debug, Default)]
pub struct ActorStats {
    handled: AtomicU64,
    rejected: AtomicU64,
    rate: AtomicU64,
    rate_base: AtomicU64,
    detail: Mutex<serde_json::Value>,
}

impl ActorStats {
    /// Counts one message handled.
    pub fn handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one message refused (did not decode, or not valid).
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages handled so far.
    pub fn handled_total(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Messages refused so far.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Messages handled per second over the last sampling period.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Closes a sampling period of `secs` seconds (the runtime calls this once a second).
    pub fn sample_rate(&self, secs: f64) {
        let now = self.handled_total();
        let before = self.rate_base.swap(now, Ordering::Relaxed);
        let rate = if secs > 0.0 {
            (now.saturating_sub(before) as f64 / secs).round() as u64
        } else {
            0
        };
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Replaces the kind-specific status shown by `colony ctl status`.
    pub fn set_detail(&self, detail: serde_json::Value) {
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = detail;
    }

    /// The kind-specific status.
    pub fn detail(&self) -> serde_json::Value {
        self.detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Tells whoever started an actor whether it came up: it has once it first waits for events
/// (or calls [`ActorContext::started`]); if it exits before that, it failed to start.
#[derive(Debug, Clone, Default)]
pub struct StartSignal(Arc<Mutex<Option<StartReply>>>);

/// Where the outcome of a start goes.
type StartReply = oneshot::Sender<Result<(), String>>;

impl StartSignal {
    /// A signal and the receiver that learns the outcome.
    pub fn new() -> (StartSignal, oneshot::Receiver<Result<(), String>>) {
        let (tx, rx) = oneshot::channel();
        (StartSignal(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Reports a successful start (once; later calls do nothing).
    pub fn succeed(&self) {
        if let Some(tx) = self.take() {
            let _ = tx.send(Ok(()));
        }
    }

    /// Reports a failed start; false when the start was already reported.
    pub fn fail(&self, reason: &str) -> bool {
        match self.take() {
            Some(tx) => {
                let _ = tx.send(Err(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// True while nobody has reported the start either way.
    pub fn is_pending(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn take(&self) -> Option<StartReply> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What an actor waits for.
// Events are moved once each, never stored in bulk: boxing the settings would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ActorEvent {
    /// A message or call from another actor (or the control plane).
    Message(Delivery),
    /// New settings that the kind said it can take in place.
    Reconfigure(ActorSettings),
    /// Stop now: flush what must be flushed and return `Ok(())`.
    Shutdown,
}

/// The parts of an actor's context that its supervisor keeps across restarts.
pub struct ActorEnv {
    /// The actor's address.
    pub address: Address,
    /// The cluster handle.
    pub cluster: Cluster,
    /// The cluster config in force.
    pub config: Arc<ClusterConfig>,
    /// The actor's own directory.
    pub data_dir: PathBuf,
    /// Its counters and status.
    pub stats: Arc<ActorStats>,
    /// Reports whether it came up.
    pub start: StartSignal,
}

/// Everything an actor needs from the node.
pub struct ActorContext {
    /// This actor's address.
    pub address: Address,
    /// The cluster, to send to and call other actors by address.
    pub cluster: Cluster,
    /// The cluster config in force when the actor started.
    pub config: Arc<ClusterConfig>,
    /// A directory this actor may keep files in (created by the runtime).
    pub data_dir: PathBuf,
    /// Counters and status, shared with the runtime.
    pub stats: Arc<ActorStats>,
    settings: watch::Receiver<ActorSettings>,
    mailbox: OwnedMutexGuard<MailboxReceiver>,
    shutdown: watch::Receiver<bool>,
    start: StartSignal,
}

impl ActorContext {
    /// A context; the runtime builds one for each (re)start.
    pub fn new(
        env: ActorEnv,
        settings: watch::Receiver<ActorSettings>,
        mailbox: OwnedMutexGuard<MailboxReceiver>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let ActorEnv {
            address,
            cluster,
            config,
            data_dir,
            stats,
            start,
        } = env;
        ActorContext {
            address,
            cluster,
            config,
            data_dir,
            stats,
            settings,
            mailbox,
            shutdown,
            start,
        }
    }

    /// The settings in force now.
    pub fn settings(&mut self) -> ActorSettings {
        self.settings.borrow_and_update().clone()
    }

    /// Says the actor is up (its sockets are bound, its files open). Waiting for the first event
    /// says so too.
    pub fn started(&self) {
        self.start.succeed();
    }

    /// A message already in the mailbox, if any, without waiting: for an actor that is
    /// stopping and must still handle what was sent to it before (acknowledgements, say).
    pub fn queued(&mut self) -> Option<Delivery> {
        self.mailbox.try_recv().ok()
    }

    /// The next thing to react to. Cancel-safe.
    pub async fn next_event(&mut self) -> ActorEvent {
        self.start.succeed();
        if *self.shutdown.borrow() {
            return ActorEvent::Shutdown;
        }
        tokio::select! {
            biased;
            r = self.shutdown.changed() => {
                // A dropped sender means the node is going away: stop as well.
                let _ = r;
                ActorEvent::Shutdown
            }
            r = self.settings.changed() => match r {
                Ok(()) => ActorEvent::Reconfigure(self.settings.borrow_and_update().clone()),
                Err(_) => ActorEvent::Shutdown,
            },
            m = self.mailbox.recv() => match m {
                Some(d) => ActorEvent::Message(d),
                None => ActorEvent::Shutdown,
            },
        }
    }
}

/// How long a start waits for an address still held by the actor's previous instance.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds with `bind`, retrying for up to 2 s while the address is in use: a killed or
/// restarting actor's previous instance may still be letting go of it (its tasks are cancelled
/// asynchronously). Anyone else still holding it after that gets the error.
pub async fn bind_retrying<T, F, Fut>(mut bind: F) -> std::io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match bind().await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Lets the tasks this one just woke run before it goes on: it is queued again behind the tasks
/// already waiting on this thread (another thread may take it), and the task it woke last
/// runs first. Unlike [`tokio::task::yield_now`], which waits until the thread has nothing else
/// to do, a thread kept busy by many tasks cannot hold it back for long.
pub async fn run_woken_first() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}
