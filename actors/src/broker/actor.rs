//! The broker actor: listeners, connection tasks, the SQLite store and actor subscribers around
//! [`BrokerCore`].
//!
//! The actor binds every listener before it reports itself started (a bind failure fails the
//! start). Each accepted connection runs in its own task, owned by its listener's task set, which
//! the actor owns: when the actor stops or is killed, every connection goes with it, and one
//! connection failing touches no other. Events from connections are handled in batches; after
//! each batch the store changes are committed and only then are the acknowledgements sent, so a
//! client is never acknowledged for something that is not yet on disk. A batch's QoS 0/1
//! deliveries may go before its commit (see [`BrokerCore::may_deliver_before_commit`]), and
//! those of a message arriving alone leave before the commit starts; a batch of
//! acknowledgements alone waits for the next commit (see [`Shell::settle`]). Asked to
//! stop, the actor accepts no more connections, and each connection goes on until its client is
//! quiet (taking the last acknowledgements of a subscriber that stopped before the broker); the
//! actor handles and answers all that, and its mailbox, until every connection has ended (at
//! most a second), then commits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use colony_cluster::Address;
use colony_config::ActorSettings;
use colony_config::kinds::{BrokerListener, BrokerSettings};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use colony_cluster::{CallError, Delivery};
use futures::FutureExt;

use super::auth::AccessPolicy;
use super::core::{Action, ActorPublish, BrokerCore, StoreOp, Subscriber};
use super::declared::declared_subscriptions;
use super::listener::{
    ConnEvent, ConnLimits, ConnMeta, Ended, Outgoing, serve, stopped, tls_acceptor,
};
use super::packet::{ClientPacket, DisconnectCode, Protocol, ServerPacket};
use super::session::Message;
use super::store::BrokerStore;
use super::topic::SubOptions;
use super::{BrokerMessage, BrokerNotice};
use crate::host::{ActorContext, ActorEvent, ActorFailure};

/// Events handled before the store is committed and packets go out.
const BATCH: usize = 512;
/// Connections listed one by one in status (all are counted).
const STATUS_CHILDREN: usize = 100;
/// QoS 0 notices queued for one actor subscriber before more are dropped, at least (the bound
/// is `max_inflight + max_queued`, as for a client connection).
const NOTICE_QUEUE: usize = 4096;
/// Room in one actor subscriber's notice channel besides its QoS 0 bound: QoS 1/2 notices are
/// bounded by its window, and a redelivery may repeat the whole window.
const NOTICE_CHANNEL: usize = 2 * super::ACTOR_WINDOW_MAX as usize;
/// Notices sent to an actor subscriber in one `send_batch`.
const NOTICE_BATCH: usize = 1024;
/// How long a batch of acknowledgements alone may wait to be committed with the next batch
/// (see [`Shell::settle`]).
const DEFER_LIMIT: Duration = Duration::from_millis(50);

fn policy(s: &BrokerSettings) -> AccessPolicy {
    AccessPolicy::new(s.allow_anonymous, s.users.clone(), s.acl.clone())
}

struct Shell {
    core: BrokerCore,
    store: BrokerStore,
    conns: HashMap<u64, mpsc::Sender<Outgoing>>,
    /// Where each connection comes from and since when.
    meta: HashMap<u64, (ConnMeta, Instant)>,
    /// Per actor subscriber: how its notices leave.
    notifiers: HashMap<Arc<str>, Notifier>,
    /// Notices queued for one actor subscriber (a bridge, a collector) while it is busy; past
    /// this QoS 0 ones are dropped and counted, as for a client connection.
    notice_queue: usize,
    actions: Vec<Action>,
    /// The batch being delivered is one event (see [`Shell::settle`]).
    lone: bool,
    /// Acknowledgements held for the next commit (see [`Shell::settle`]).
    deferred: Deferred,
    panics: u64,
}

/// Batches of acknowledgements alone, not yet committed, and the replies that wait for them.
#[derive(Default)]
struct Deferred {
    ops: Vec<StoreOp>,
    replies: Vec<(Delivery, Reply)>,
    /// When they are committed at the latest.
    until: Option<tokio::time::Instant>,
}

impl Shell {
    /// Like [`Shell::flush`], then replies; but a batch whose store changes only forget what
    /// subscribers acknowledged (a bridge's or a collector's acks, a client's PUBACK), and
    /// whose actions have all gone, is not committed on its own: it waits, with its replies,
    /// for the next commit, at most [`DEFER_LIMIT`]. Under a steady stream each message then
    /// costs one commit, not two (its notice's insert and, once acknowledged, its delete). A
    /// crash in between forgets nothing anyone was told is safe: the acknowledged messages
    /// come back from disk and go again (QoS 1, at least once), and the calls held have no
    /// reply yet.
    ///
    /// When the batch is one event (`lone`: a message arriving on its own, not in a burst)
    /// and some of its deliveries went before the commit, the broker yields once before it
    /// commits. The tasks those deliveries woke (a connection's writer, an actor's notifier
    /// and the actor behind it, a bridge's MQTT client) then run first, or on another worker
    /// while this one commits, so a lone message leaves the node without waiting for the
    /// disk. Its notices for actors on this node skip their notifier task's hop too (see
    /// [`Notifier`]). A burst's commit is shared by its whole batch, and is not put off, and
    /// its notices are encoded and handed over by the notifier tasks, beside the broker.
    async fn settle(
        &mut self,
        ctx: &ActorContext,
        notifier_tasks: &mut JoinSet<()>,
        replies: Vec<(Delivery, Reply)>,
        lone: bool,
    ) -> Result<(), ActorFailure> {
        self.lone = lone;
        let (ops, went_early) = self.deliver(ctx, notifier_tasks);
        self.lone = false;
        if went_early && lone {
            tokio::task::yield_now().await;
        }
        if !ops.is_empty() && self.actions.is_empty() && ops.iter().all(StoreOp::is_acknowledgement)
        {
            self.deferred.ops.extend(ops);
            self.deferred.replies.extend(replies);
            self.deferred
                .until
                .get_or_insert_with(|| tokio::time::Instant::now() + DEFER_LIMIT);
            return Ok(());
        }
        self.commit(ops, ctx, notifier_tasks)?;
        answer(self, ctx, replies);
        Ok(())
    }

    /// Commits the batch's store changes and carries out its actions (see [`Shell::deliver`]).
    fn flush(
        &mut self,
        ctx: &ActorContext,
        notifier_tasks: &mut JoinSet<()>,
    ) -> Result<(), ActorFailure> {
        let (ops, _) = self.deliver(ctx, notifier_tasks);
        self.commit(ops, ctx, notifier_tasks)
    }

    /// Takes the batch's store changes and actions and carries out the deliveries that may go
    /// before the commit, when the core says the batch allows (see
    /// [`BrokerCore::may_deliver_before_commit`]), in order per destination: once one action
    /// for a connection or an actor has to wait, the rest for it wait too. Acknowledgements
    /// always wait for the commit ([`Shell::commit`]). Returns the store changes, and whether
    /// any action went.
    fn deliver(
        &mut self,
        ctx: &ActorContext,
        notifier_tasks: &mut JoinSet<()>,
    ) -> (Vec<StoreOp>, bool) {
        let ops = self.core.take_store_ops();
        let early = self.core.may_deliver_before_commit();
        let mut actions = std::mem::take(&mut self.actions);
        self.core.drain_actions_into(&mut actions);
        let mut dropped = 0;
        let mut went = false;
        if early && !ops.is_empty() {
            let mut held = Held::default();
            for action in actions.extract_if(.., |a| held.lets_through(a)) {
                dropped += self.act(action, ctx, notifier_tasks);
                went = true;
            }
        }
        self.actions = actions;
        self.core.count_dropped(dropped);
        (ops, went)
    }

    /// Commits the deferred acknowledgements and `ops`, then carries out the actions still
    /// waiting and answers the deferred replies.
    fn commit(
        &mut self,
        ops: Vec<StoreOp>,
        ctx: &ActorContext,
        notifier_tasks: &mut JoinSet<()>,
    ) -> Result<(), ActorFailure> {
        let ops = if self.deferred.ops.is_empty() {
            ops
        } else {
            let mut all = std::mem::take(&mut self.deferred.ops);
            all.extend(ops);
            all
        };
        self.store
            .apply(&ops)
            .map_err(|e| ActorFailure::new(e.to_string()))?;
        self.deferred.until = None;
        let replies = std::mem::take(&mut self.deferred.replies);
        answer(self, ctx, replies);
        let mut actions = std::mem::take(&mut self.actions);
        let mut dropped = 0;
        for action in actions.drain(..) {
            dropped += self.act(action, ctx, notifier_tasks);
        }
        self.actions = actions;
        self.core.count_dropped(dropped);
        Ok(())
    }

    /// Carries out one action; returns how many QoS 0 messages it dropped (1 or 0).
    fn act(&mut self, action: Action, ctx: &ActorContext, notifier_tasks: &mut JoinSet<()>) -> u64 {
        match action {
            Action::Send(id, packet) => {
                let Some(tx) = self.conns.get(&id) else {
                    return 0;
                };
                let qos0 =
                    matches!(&packet, ServerPacket::Publish { message, .. } if message.qos == 0);
                if tx.try_send(Outgoing::Packet(packet)).is_err() {
                    if qos0 {
                        return 1;
                    }
                    // Too slow to take even acknowledgements: cut it off; its session keeps
                    // what is in flight.
                    warn!(conn = id, "client too slow, disconnecting");
                    self.conns.remove(&id);
                }
                0
            }
            Action::Close(id) => {
                if let Some(tx) = self.conns.remove(&id) {
                    let _ = tx.try_send(Outgoing::Close);
                }
                0
            }
            Action::Notify {
                to,
                message,
                id,
                dup,
            } => {
                let capacity = NOTICE_CHANNEL + self.notice_queue;
                let notifier = self
                    .notifiers
                    .entry(to.clone())
                    .or_insert_with(|| Notifier::start(ctx, &to, capacity, notifier_tasks));
                let mut notice = BrokerNotice::publish(message, id, dup);
                if self.lone {
                    match notifier.send_direct(ctx, notice) {
                        Ok(()) => return 0,
                        Err(back) => notice = back,
                    }
                }
                // A QoS 0 notice for an actor that reads too slowly is dropped; a QoS 1/2
                // notice that does not fit stays unacknowledged and goes again later.
                let sent = (id.is_some() || notifier.backlog() < self.notice_queue)
                    && notifier.queue(notice);
                u64::from(!sent && id.is_none())
            }
        }
    }

    /// Tells the core how far each actor subscriber's notices have left the broker.
    fn sync_handed(&mut self) {
        for (to, notifier) in &self.notifiers {
            self.core
                .actor_handed(to, notifier.handed.load(Ordering::Relaxed));
        }
    }

    fn conn_ended(&mut self, id: u64, how: Ended) {
        self.conns.remove(&id);
        self.meta.remove(&id);
        match how {
            Ended::Closed => self.core.closed(id),
            Ended::CutOff(code) => self.core.cut_off(id, code),
            Ended::Panicked => {
                self.panics += 1;
                warn!(
                    conn = id,
                    "a connection task panicked; that client was cut off"
                );
                self.core.cut_off(id, DisconnectCode::ProtocolError);
            }
        }
    }

    /// The connections as children for status: `node/broker/<client-id>`, at most
    /// [`STATUS_CHILDREN`] of them, by client id.
    fn children(&self, me: &Address) -> serde_json::Value {
        let mut rows: Vec<(&str, Protocol, &ConnMeta, Instant)> = self
            .meta
            .iter()
            .filter_map(|(id, (meta, since))| {
                let (client, protocol) = self.core.client_of(*id)?;
                Some((client, protocol, meta, *since))
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows.truncate(STATUS_CHILDREN);
        let rows: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|(client, protocol, meta, since)| {
                let version = match protocol {
                    Protocol::V4 => "mqtt 3.1.1",
                    Protocol::V5 => "mqtt 5",
                };
                let tls = if meta.tls { " tls" } else { "" };
                json!({
                    "address": format!("{me}/{client}"),
                    "kind": "connection",
                    "state": "running",
                    "info": format!("{version}{tls} from {} for {}s", meta.peer, since.elapsed().as_secs()),
                })
            })
            .collect();
        json!(rows)
    }

    fn conn_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Connect(id, connect, tx, meta) => {
                self.conns.insert(id, tx);
                self.meta.insert(id, (meta, Instant::now()));
                self.core.connect(id, *connect);
            }
            ConnEvent::Packet(id, p) => self.core.packet(id, p),
        }
    }
}

/// Sends notices to one actor subscriber, in order, in batches of what is waiting, and
/// records in `handed` the highest id it has handed to the cluster (delivered into a mailbox on
/// this node, sent on a link, or failed: either way no longer waiting here).
/// How an actor subscriber's notices leave the broker. A task of its own takes them from a
/// queue and hands them to the cluster in batches, waiting while the subscriber is full. When
/// nothing is queued and the subscriber is on this node, a notice goes straight into its mailbox
/// instead if there is room, without that task's hop: it cannot overtake one queued before it,
/// since the task counts a notice as queued until the cluster has taken it.
struct Notifier {
    tx: mpsc::Sender<BrokerNotice>,
    /// Notices queued and not yet handed to the cluster.
    queued: Arc<AtomicUsize>,
    /// The highest notice id handed to the cluster.
    handed: Arc<AtomicU64>,
    /// The subscriber's address when it is on this node.
    local: Option<Address>,
}

impl Notifier {
    fn start(
        ctx: &ActorContext,
        to: &Arc<str>,
        capacity: usize,
        tasks: &mut JoinSet<()>,
    ) -> Notifier {
        let (tx, rx) = mpsc::channel(capacity);
        let notifier = Notifier {
            tx,
            queued: Arc::default(),
            handed: Arc::default(),
            local: to
                .parse::<Address>()
                .ok()
                .filter(|a| a.node() == ctx.cluster.node_name()),
        };
        tasks.spawn(notify_actor(
            ctx.cluster.clone(),
            ctx.address.clone(),
            to.clone(),
            rx,
            notifier.queued.clone(),
            notifier.handed.clone(),
        ));
        notifier
    }

    /// Puts `notice` straight into the mailbox of a subscriber on this node when nothing is
    /// queued before it and the mailbox has room; otherwise gives it back.
    fn send_direct(&self, ctx: &ActorContext, notice: BrokerNotice) -> Result<(), BrokerNotice> {
        let Some(to) = &self.local else {
            return Err(notice);
        };
        if self.queued.load(Ordering::Acquire) != 0 {
            return Err(notice);
        }
        let Ok(body) = colony_cluster::encode_body(&notice) else {
            return Err(notice);
        };
        if !ctx
            .cluster
            .try_send_local(to, Some(&ctx.address), bytes::Bytes::from(body))
        {
            return Err(notice);
        }
        if let Some(id) = notice.id() {
            self.handed.fetch_max(id, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Notices queued for the task.
    fn backlog(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues `notice` for the task; false when the queue is full.
    fn queue(&self, notice: BrokerNotice) -> bool {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let queued = self.tx.try_send(notice).is_ok();
        if !queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        queued
    }
}

async fn notify_actor(
    cluster: colony_cluster::Cluster,
    from: Address,
    to: Arc<str>,
    mut rx: mpsc::Receiver<BrokerNotice>,
    queued: Arc<AtomicUsize>,
    handed: Arc<AtomicU64>,
) {
    let Ok(address) = to.parse::<Address>() else {
        warn!(subscriber = %to, "actor subscriber address does not parse");
        return;
    };
    let mut notices = Vec::with_capacity(NOTICE_BATCH);
    while rx.recv_many(&mut notices, NOTICE_BATCH).await > 0 {
        let taken = notices.len();
        let highest = notices.iter().filter_map(BrokerNotice::id).max();
        let bodies: Vec<bytes::Bytes> = notices
            .drain(..)
            .filter_map(|n| colony_cluster::encode_body(&n).ok())
            .map(bytes::Bytes::from)
            .collect();
        // Undelivered QoS 1/2 notices go again when unacknowledged for a while.
        if let Err(e) = cluster.send_batch(&address, Some(&from), bodies).await {
            debug!(subscriber = %to, "notices not delivered: {e}");
        }
        if let Some(id) = highest {
            handed.fetch_max(id, Ordering::Relaxed);
        }
        queued.fetch_sub(taken, Ordering::AcqRel);
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    next_id: Arc<AtomicU64>,
    events: mpsc::Sender<ConnEvent>,
    closed: mpsc::UnboundedSender<(u64, Ended)>,
    limits: ConnLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stopping) => {
                // Accept no more; each connection goes on until its client is quiet.
                drop(listener);
                while conns.join_next().await.is_some() {}
                return;
            }
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let (events, closed, stopping) = (events.clone(), closed.clone(), stopping.clone());
                let meta = ConnMeta { peer, tls: tls.is_some() };
                match tls.clone() {
                    None => {
                        conns.spawn(serve(id, meta, sock, events, closed, limits, stopping));
                    }
                    Some(acceptor) => {
                        conns.spawn(async move {
                            let hs = tokio::time::timeout(super::listener::CONNECT_TIMEOUT, acceptor.accept(sock)).await;
                            match hs {
                                Ok(Ok(stream)) => serve(id, meta, stream, events, closed, limits, stopping).await,
                                Ok(Err(e)) => info!(%peer, "TLS handshake refused: {e}"),
                                Err(_) => info!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Some(done) = conns.join_next() => {
                if let Err(e) = done && e.is_panic() {
                    debug!("a connection task panicked (reported by its guard)");
                }
            }
        }
    }
}

async fn bind(
    l: &BrokerListener,
    ctx: &ActorContext,
) -> Result<(TcpListener, Option<tokio_rustls::TlsAcceptor>), ActorFailure> {
    let tls = match &l.tls {
        Some(t) => Some(
            tls_acceptor(t, |p| ctx.config.resolve(p))
                .map_err(|e| ActorFailure::new(format!("listener {}: {e}", l.bind)))?,
        ),
        None => None,
    };
    let sock = crate::host::bind_retrying(|| TcpListener::bind(l.bind))
        .await
        .map_err(|e| ActorFailure::new(format!("cannot listen on {}: {e}", l.bind)))?;
    Ok((sock, tls))
}

/// Runs a broker until it is told to stop.
pub async fn run(mut ctx: ActorContext) -> Result<(), ActorFailure> {
    let ActorSettings::Broker(settings) = ctx.settings() else {
        return Err(ActorFailure::new(
            "broker started with another kind's settings",
        ));
    };
    std::fs::create_dir_all(&ctx.data_dir)
        .map_err(|e| ActorFailure::new(format!("data dir {}: {e}", ctx.data_dir.display())))?;
    let store = BrokerStore::open(&ctx.data_dir.join("broker.sqlite"))
        .map_err(|e| ActorFailure::new(e.to_string()))?;
    let restored = store.load().map_err(|e| ActorFailure::new(e.to_string()))?;
    let mut core = BrokerCore::new(policy(&settings), settings.limits.clone(), restored);
    core.set_now(unix_now());
    for d in declared_subscriptions(&ctx.config, &ctx.address) {
        let opts = SubOptions {
            qos: d.qos,
            no_local: d.no_local,
            ..SubOptions::default()
        };
        core.ensure_actor_subscription(&d.subscriber.to_string(), &d.filters, opts);
        if d.window.is_some() {
            core.set_actor_window(&d.subscriber.to_string(), d.window);
        }
    }
    let mut shell = Shell {
        core,
        store,
        conns: HashMap::new(),
        meta: HashMap::new(),
        notifiers: HashMap::new(),
        lone: false,
        // Like a client connection's queue: `max_inflight` + `max_queued`, at least 4096.
        notice_queue: settings.limits.max_inflight as usize
            + (settings.limits.max_queued as usize).max(NOTICE_QUEUE),
        actions: Vec::new(),
        deferred: Deferred::default(),
        panics: 0,
    };

    let (events_tx, mut events) = mpsc::channel::<ConnEvent>(4096);
    let (closed_tx, mut closed) = mpsc::unbounded_channel::<(u64, Ended)>();
    let next_id = Arc::new(AtomicU64::new(1));
    let limits = ConnLimits {
        max_packet_size: settings.limits.max_packet_size as usize,
        // QoS 0 messages wait for a busy client like queued QoS 1/2 ones do (`max_queued`, at
        // least 4096), and are dropped and counted beyond that.
        outgoing_capacity: settings.limits.max_inflight as usize
            + (settings.limits.max_queued as usize).max(4096),
    };
    let mut notifier_tasks = JoinSet::new();
    let (stopping, stopping_rx) = watch::channel(false);
    let mut listeners = JoinSet::new();
    let mut bound = Vec::new();
    for l in settings.all_listeners() {
        let (sock, tls) = bind(&l, &ctx).await?;
        bound.push(format!(
            "{}{}",
            if tls.is_some() { "mqtts://" } else { "mqtt://" },
            sock.local_addr().map_or(l.bind, |a| a)
        ));
        listeners.spawn(accept_loop(
            sock,
            tls,
            next_id.clone(),
            events_tx.clone(),
            closed_tx.clone(),
            limits,
            stopping_rx.clone(),
        ));
    }
    info!(listeners = ?bound, "broker listening");
    shell.core.start();
    shell.flush(&ctx, &mut notifier_tasks)?;
    ctx.started();

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = shell.core.counters();
    let mut ticks: u64 = 0;
    loop {
        // Biased: connection events before closes, so a connection's CONNECT (queued before it
        // could close) is always seen before its end.
        tokio::select! {
            biased;
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => return stop(&mut shell, &mut ctx, &mut events, &mut notifier_tasks, &stopping, &mut listeners).await,
                ActorEvent::Reconfigure(ActorSettings::Broker(s)) => {
                    shell.core.set_policy(policy(&s));
                    shell.core.set_limits(s.limits.clone());
                    info!("broker users, ACLs and limits updated in place");
                }
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(d) => {
                    // Take what else is already in the mailbox, commit once, then reply: a reply
                    // to a QoS 1/2 publish means it is on disk.
                    shell.sync_handed();
                    let mut replies = Vec::new();
                    handle_message(&mut shell, &ctx, d, &mut replies);
                    let mut stop = false;
                    let mut messages = 1;
                    while replies.len() < BATCH {
                        match ctx.next_event().now_or_never() {
                            Some(ActorEvent::Message(d)) => {
                                messages += 1;
                                handle_message(&mut shell, &ctx, d, &mut replies);
                            }
                            Some(ActorEvent::Reconfigure(ActorSettings::Broker(s))) => {
                                shell.core.set_policy(policy(&s));
                                shell.core.set_limits(s.limits.clone());
                            }
                            Some(ActorEvent::Reconfigure(_)) => {}
                            Some(ActorEvent::Shutdown) => { stop = true; break; }
                            None => break,
                        }
                    }
                    shell.settle(&ctx, &mut notifier_tasks, replies, messages == 1).await?;
                    if stop {
                        return self::stop(&mut shell, &mut ctx, &mut events, &mut notifier_tasks, &stopping, &mut listeners).await;
                    }
                }
            },
            _ = tick.tick() => {
                ticks += 1;
                shell.sync_handed();
                shell.core.tick(unix_now());
                let now = shell.core.counters();
                let detail = json!({
                    "listeners": bound,
                    "connections": shell.core.connections(),
                    "sessions": shell.core.sessions(),
                    "subscriptions": shell.core.subscriptions(),
                    "retained": shell.core.retained(),
                    "queued": shell.core.queued(),
                    "messages_in_per_sec": now.messages_in - last.messages_in,
                    "messages_out_per_sec": now.messages_out - last.messages_out,
                    "messages_in": now.messages_in,
                    "messages_out": now.messages_out,
                    "dropped": now.dropped,
                    "denied": now.denied,
                    "auth_failures": now.auth_failures,
                    "protocol_errors": now.protocol_errors,
                    "connection_panics": shell.panics,
                    "store_commits": shell.store.commits(),
                    "children": shell.children(&ctx.address),
                    "children_total": shell.core.connections(),
                });
                ctx.stats.set_detail(detail);
                last = now;
                if ticks % 10 == 1 {
                    publish_sys(&mut shell.core, started.elapsed());
                }
                shell.flush(&ctx, &mut notifier_tasks)?;
            }
            Some(ev) = events.recv() => {
                let mut n = 0;
                let mut next = Some(ev);
                while let Some(ev) = next {
                    if matches!(ev, ConnEvent::Packet(_, ClientPacket::Publish(_))) {
                        ctx.stats.handled();
                    }
                    shell.conn_event(ev);
                    n += 1;
                    next = if n < BATCH { events.try_recv().ok() } else { None };
                }
                shell.settle(&ctx, &mut notifier_tasks, Vec::new(), n == 1).await?;
            }
            _ = deadline(shell.deferred.until) => shell.flush(&ctx, &mut notifier_tasks)?,
            Some(first) = closed.recv() => {
                let mut next = Some(first);
                while let Some((id, how)) = next {
                    shell.conn_ended(id, how);
                    next = closed.try_recv().ok();
                }
                shell.flush(&ctx, &mut notifier_tasks)?;
            }
            Some(done) = listeners.join_next() => {
                if let Err(e) = done && e.is_panic() {
                    return Err(ActorFailure::new("a broker listener task panicked"));
                }
            }
            Some(done) = notifier_tasks.join_next() => {
                if let Err(e) = done && e.is_panic() {
                    return Err(ActorFailure::new("a broker notifier task panicked"));
                }
            }
        }
    }
}

/// Resolves at `at`; never when there is none.
async fn deadline(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The destinations whose actions wait for a commit, within one batch.
#[derive(Default)]
struct Held {
    conns: HashSet<u64>,
    actors: HashSet<Arc<str>>,
}

impl Held {
    /// True when `action` may go before the commit: a QoS 0/1 delivery to a destination none
    /// of whose earlier actions wait. Otherwise its destination waits from here on.
    fn lets_through(&mut self, action: &Action) -> bool {
        match action {
            Action::Send(id, packet) => {
                let delivery =
                    matches!(packet, ServerPacket::Publish { message, .. } if message.qos <= 1);
                if delivery && !self.conns.contains(id) {
                    return true;
                }
                self.conns.insert(*id);
                false
            }
            Action::Close(id) => {
                self.conns.insert(*id);
                false
            }
            Action::Notify { to, message, .. } => {
                if message.qos <= 1 && !self.actors.contains(to) {
                    return true;
                }
                self.actors.insert(to.clone());
                false
            }
        }
    }
}

/// A reply held until the batch it belongs to is committed.
enum Reply {
    Granted(Vec<Option<u8>>),
    Connected(bool),
    Done,
    Status,
    Reject(CallError),
}

/// Replies to the calls of a batch, once it is committed.
fn answer(shell: &Shell, ctx: &ActorContext, replies: Vec<(Delivery, Reply)>) {
    for (mut d, reply) in replies {
        match reply {
            Reply::Granted(g) => d.reply(&g),
            Reply::Connected(c) => d.reply(&c),
            Reply::Done => d.reply(&()),
            Reply::Status => d.reply(&status(&shell.core, &ctx.stats.detail())),
            Reply::Reject(e) => d.reject(e),
        }
    }
}

/// How long a stopping broker waits in all for its connections to end (each ends once its
/// client has been quiet for [`super::listener::STOP_QUIET`], at most half a second after the
/// stop, and then takes one more quiet spell at most).
const STOP_LIMIT: Duration = Duration::from_secs(1);

/// Stops the broker. It tells every connection to stop; each goes on until its client is quiet
/// (acknowledgements above all: a subscriber that stopped just before, committing and
/// acknowledging what it had, must not be sent it all again after the restart) and ends. The
/// broker handles all of that, and what actors already sent it, until every connection has
/// ended (or [`STOP_LIMIT`]), then commits. A connection's end is not handled as a client going
/// away: no will is published for a broker that stops.
async fn stop(
    shell: &mut Shell,
    ctx: &mut ActorContext,
    events: &mut mpsc::Receiver<ConnEvent>,
    notifier_tasks: &mut JoinSet<()>,
    stopping: &watch::Sender<bool>,
    listeners: &mut JoinSet<()>,
) -> Result<(), ActorFailure> {
    stopping.send_replace(true);
    let until = tokio::time::Instant::now() + STOP_LIMIT;
    loop {
        // A batch at a time, as while running, so that each is committed and answered.
        let mut replies = Vec::new();
        let mut handled = 0;
        while handled < BATCH {
            if let Some(d) = ctx.queued() {
                handle_message(shell, ctx, d, &mut replies);
            } else if let Ok(ev) = events.try_recv() {
                shell.conn_event(ev);
            } else {
                break;
            }
            handled += 1;
        }
        shell.flush(ctx, notifier_tasks)?;
        answer(shell, ctx, replies);
        if tokio::time::Instant::now() >= until {
            return Ok(());
        }
        if handled == BATCH {
            continue;
        }
        if listeners.is_empty() && events.is_empty() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return Ok(()),
            Some(ev) = events.recv() => shell.conn_event(ev),
            Some(_) = listeners.join_next() => {}
        }
    }
}

fn handle_message(
    shell: &mut Shell,
    ctx: &ActorContext,
    mut d: Delivery,
    replies: &mut Vec<(Delivery, Reply)>,
) {
    let message: BrokerMessage = match d.decode() {
        Ok(m) => m,
        Err(e) => {
            ctx.stats.rejected();
            d.reject(e);
            return;
        }
    };
    ctx.stats.handled();
    let who = |explicit: Option<Address>, what: &str| {
        explicit.or_else(|| d.from.clone()).ok_or_else(|| {
            CallError::Rejected(format!("{what} needs a sender (or `subscriber`) address"))
        })
    };
    let reply = match message {
        BrokerMessage::Subscribe {
            filters,
            qos,
            subscriber,
            no_local,
            window,
        } => match who(subscriber, "subscribe") {
            Ok(who) => {
                let opts = SubOptions {
                    qos,
                    no_local,
                    ..SubOptions::default()
                };
                let who = who.to_string();
                let granted = shell.core.actor_subscribe(&who, &filters, opts);
                shell.core.set_actor_window(&who, window);
                Reply::Granted(granted)
            }
            Err(e) => Reply::Reject(e),
        },
        BrokerMessage::Unsubscribe {
            filters,
            subscriber,
        } => match who(subscriber, "unsubscribe") {
            Ok(who) => {
                shell.core.actor_unsubscribe(&who.to_string(), &filters);
                Reply::Done
            }
            Err(e) => Reply::Reject(e),
        },
        BrokerMessage::Ack { ids, subscriber } => match who(subscriber, "ack") {
            Ok(who) => {
                shell.core.actor_ack(&who.to_string(), &ids);
                Reply::Done
            }
            Err(e) => Reply::Reject(e),
        },
        BrokerMessage::Publish {
            topic,
            payload,
            qos,
            retain,
            hops,
            stream,
        } => {
            let message = Message {
                origin: d
                    .from
                    .as_ref()
                    .map(|a| Subscriber::Actor(a.to_string().into())),
                hops,
                ..Message::new(topic.clone(), payload, qos.min(2), retain)
            };
            match shell.core.publish(message, stream.map(|s| (s.id, s.seq))) {
                ActorPublish::Routed | ActorPublish::Duplicate => Reply::Done,
                ActorPublish::InvalidTopic => {
                    ctx.stats.rejected();
                    Reply::Reject(CallError::Rejected(format!(
                        "'{topic}' is not a valid topic name"
                    )))
                }
            }
        }
        BrokerMessage::Disconnect { client_id } => {
            Reply::Connected(shell.core.disconnect_client(&client_id))
        }
        BrokerMessage::Status {} => Reply::Status,
    };
    replies.push((d, reply));
}

fn status(core: &BrokerCore, detail: &serde_json::Value) -> serde_json::Value {
    let subs: serde_json::Map<String, serde_json::Value> = core
        .actor_subscriptions()
        .map(|(a, q)| {
            let filters: serde_json::Map<String, serde_json::Value> = q
                .filters
                .iter()
                .map(|(f, o)| (f.clone(), json!(o.qos)))
                .collect();
            (
                a.to_string(),
                json!({
                    "filters": filters,
                    "inflight": q.inflight_len(),
                    "queued": q.queued_len(),
                    "window": q.window,
                }),
            )
        })
        .collect();
    json!({ "detail": detail, "actor_subscriptions": subs })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn publish_sys(core: &mut BrokerCore, uptime: Duration) {
    let c = core.counters();
    let values = [
        (
            "$SYS/broker/version",
            format!("colony {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", uptime.as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            core.connections().to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            core.subscriptions().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            core.retained().to_string(),
        ),
        ("$SYS/broker/messages/received", c.messages_in.to_string()),
        ("$SYS/broker/messages/sent", c.messages_out.to_string()),
        ("$SYS/broker/messages/dropped", c.dropped.to_string()),
        ("$SYS/broker/clients/denied", c.denied.to_string()),
        (
            "$SYS/broker/clients/auth_failures",
            c.auth_failures.to_string(),
        ),
    ];
    for (topic, value) in values {
        core.publish_sys(topic, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::packet::AckCode;
    use bytes::Bytes;

    fn delivery(conn: u64, qos: u8) -> Action {
        Action::Send(
            conn,
            ServerPacket::Publish {
                pkid: 1,
                dup: false,
                message: Message::new("t", Bytes::from_static(b"v"), qos, false),
            },
        )
    }

    fn notice(to: &str, qos: u8) -> Action {
        Action::Notify {
            to: to.into(),
            message: Message::new("t", Bytes::from_static(b"v"), qos, false),
            id: Some(1),
            dup: false,
        }
    }

    #[test]
    fn only_qos_0_and_1_deliveries_go_before_the_commit_and_each_destination_keeps_its_order() {
        let mut held = Held::default();
        assert!(held.lets_through(&delivery(1, 1)));
        assert!(held.lets_through(&delivery(1, 0)));
        // An acknowledgement waits, and whatever follows it on that connection.
        assert!(!held.lets_through(&Action::Send(1, ServerPacket::PubAck(7, AckCode::Success))));
        assert!(!held.lets_through(&delivery(1, 1)));
        // Another connection is not held by it.
        assert!(held.lets_through(&delivery(2, 1)));
        // QoS 2 waits (exactly once), and so does what comes after it.
        assert!(!held.lets_through(&delivery(2, 2)));
        assert!(!held.lets_through(&delivery(2, 0)));
        assert!(!held.lets_through(&Action::Close(3)));
        assert!(!held.lets_through(&delivery(3, 0)));
        assert!(held.lets_through(&notice("n/a", 1)));
        assert!(!held.lets_through(&notice("n/a", 2)));
        assert!(!held.lets_through(&notice("n/a", 1)));
        assert!(held.lets_through(&notice("n/b", 0)));
    }
}
