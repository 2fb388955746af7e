//! The bridge actor: subscriptions on both brokers, the spool between them, and one forwarding
//! lane per direction (a Colony broker by calls over the cluster, or the external MQTT link).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_cluster::{Address, CallError, Cluster, Delivery, LinkState};
use colony_config::ActorSettings;
use colony_config::kinds::{BridgeRemote, BridgeSettings};
use futures::FutureExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::BridgeMessage;
use super::link::{self, Forward, FromLink, LinkConfig, ToLink};
use super::rules::{Rules, Side, may_forward, with_hop};
use super::spool::{Bounds, Dir, Entry, NEXT_MAX, Spool, Spooled};
use crate::broker::{BrokerMessage, BrokerNotice, PublishStream};
use crate::host::{ActorContext, ActorEvent, ActorFailure};
use crate::notice_ids::NoticeIds;

/// Messages handed to a lane and not yet acknowledged, at most (Colony lanes).
const COLONY_WINDOW: usize = 512;
/// Events taken from the mailbox before the spool commits.
pub(super) const DRAIN: usize = 1024;
/// QoS 0 messages waiting for a busy lane, at most, per direction: beyond it the oldest are
/// dropped (and counted in `dropped_qos0`). A lane is busy when the far broker (or the link to
/// it) takes messages slower than they come; a burst within this bound is delivered.
const QOS0_QUEUE: usize = 65_536;
/// QoS 0 messages handed to the MQTT link and not yet written by it, at most: well within the
/// MQTT client's request queue (it drops what does not fit), so that a burst waits in the
/// bridge's bounded queue instead.
const QOS0_LINK_WINDOW: usize = 4096;
/// Messages kept in memory for a lane, at most (see [`Lane::appended`]).
const READY_MAX: usize = 4 * COLONY_WINDOW;
/// How long delivered messages may stay in the spool when no append comes to remove them in
/// its transaction (see [`Spool::delivered`]).
const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Batches of fewer messages than this let an MQTT lane write them before the spool commits;
/// a bridge busy with larger ones commits at once.
const YIELD_BELOW: usize = 16;
/// Tokens of the messages handed to an MQTT link straight from a notice start here (spool seqs,
/// SQLite rowids, stay far below).
const DIRECT_BASE: u64 = 1 << 63;
/// Messages in flight directly, at most: a quarter of the broker's notice window. Past it the
/// link is not keeping up, and the bridge spools instead, acknowledging the broker at once: the
/// backlog then waits in the spool (with its bounds), never in the broker's queue for the bridge
/// (bounded by its `max_queued`, past which the broker drops). The link queues what is beyond
/// its own `max_inflight`.
const DIRECT_WINDOW: usize = super::NOTICE_WINDOW as usize / 4;
/// How long a call to a broker may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn fail(e: impl std::fmt::Display) -> ActorFailure {
    ActorFailure::new(e.to_string())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One direction's forwarding state.
struct Lane {
    dir: Dir,
    tx: LaneTx,
    epoch: u64,
    up: bool,
    /// The highest spool seq handed to the lane in this epoch.
    cursor: u64,
    /// Spooled messages right after `cursor`, in order, kept from their append so that they
    /// need not be read back (see [`Lane::appended`]).
    ready: VecDeque<Forward>,
    /// The highest seq handed or in `ready`: everything up to it is accounted for in memory.
    known: u64,
    outstanding: usize,
    window: usize,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// For a Colony lane: the node that must be up.
    node: Option<String>,
    delivered: u64,
    /// QoS 0 messages waiting for room in the lane's queue (at most [`QOS0_QUEUE`]).
    qos0: VecDeque<Forward>,
    /// QoS 0 messages handed to an MQTT link and not yet written by it (at most
    /// [`QOS0_LINK_WINDOW`]); `None` for a Colony lane, whose queue is its bound.
    qos0_unwritten: Option<usize>,
}

#[derive(Clone)]
enum LaneTx {
    Colony(mpsc::Sender<(u64, Vec<Forward>)>),
    Mqtt(mpsc::Sender<ToLink>),
}

impl Lane {
    /// A lane that is down, with nothing handed yet. An MQTT lane counts the QoS 0 messages its
    /// link has not yet written.
    fn new(dir: Dir, tx: LaneTx, window: usize, backoff: Duration) -> Lane {
        let qos0_unwritten = matches!(tx, LaneTx::Mqtt(_)).then_some(0);
        Lane {
            dir,
            tx,
            epoch: 0,
            up: false,
            cursor: 0,
            ready: VecDeque::new(),
            known: 0,
            outstanding: 0,
            window,
            retry_at: None,
            backoff,
            node: None,
            delivered: 0,
            qos0: VecDeque::new(),
            qos0_unwritten,
        }
    }

    /// Marks the lane down; returns how many waiting QoS 0 messages that dropped.
    fn down(&mut self, reason: &str, min: Duration, max: Duration) -> usize {
        if self.up {
            warn!(dir = self.dir.as_str(), "bridge lane down: {reason}");
        }
        let dropped = self.qos0.len();
        self.qos0.clear();
        if let Some(n) = &mut self.qos0_unwritten {
            *n = 0;
        }
        self.up = false;
        self.rewind();
        self.outstanding = 0;
        self.retry_at = Some(Instant::now() + super::jittered(self.backoff));
        self.backoff = (self.backoff * 2).clamp(min, max);
        dropped
    }

    fn revive(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.up = true;
        self.rewind();
        self.outstanding = 0;
        self.retry_at = None;
    }

    /// Reads the spool from its start again (a new connection sends what is not acknowledged).
    fn rewind(&mut self) {
        self.cursor = 0;
        self.forget_ready();
    }

    /// Drops the messages kept in memory: the next pump reads them from the spool (after the
    /// spool dropped some, which may be among them).
    fn forget_ready(&mut self) {
        self.ready.clear();
        self.known = self.cursor;
    }

    /// Messages just appended to the spool, after `before` (the spool's last seq until then).
    /// When everything up to `before` is already in memory they are kept for the lane, so
    /// that a lane keeping up never reads back what it was just given; otherwise (a backlog, a
    /// lane that is down) the spool has them.
    fn appended(&mut self, before: u64, rows: Vec<Spooled>) {
        if self.up && self.known == before && self.ready.len() + rows.len() <= READY_MAX {
            if let Some(last) = rows.last() {
                self.known = last.seq;
            }
            self.ready.extend(rows.into_iter().map(forward));
        }
    }

    /// Queues QoS 0 messages for the lane (dropped when the lane is down, and the oldest
    /// past [`QOS0_QUEUE`]). Returns how many were dropped.
    fn queue_qos0(&mut self, items: Vec<Forward>) -> usize {
        if !self.up {
            return items.len();
        }
        self.qos0.extend(items);
        let over = self.qos0.len().saturating_sub(QOS0_QUEUE);
        self.qos0.drain(..over);
        over
    }

    /// True when QoS 0 messages wait for room in the lane's queue.
    fn qos0_waiting(&self) -> bool {
        self.up && !self.qos0.is_empty() && self.qos0_room() > 0
    }

    /// How many more QoS 0 messages the link may be handed now.
    fn qos0_room(&self) -> usize {
        self.qos0_unwritten
            .map_or(usize::MAX, |n| QOS0_LINK_WINDOW.saturating_sub(n))
    }

    /// The link wrote (or dropped) `count` QoS 0 messages.
    fn qos0_done(&mut self, count: u64) {
        if let Some(n) = &mut self.qos0_unwritten {
            *n = n.saturating_sub(count as usize);
        }
    }

    /// Hands waiting QoS 0 messages to the lane while its queue has room. Returns how many went.
    fn flush_qos0(&mut self) -> usize {
        let mut sent = 0;
        while self.up && !self.qos0.is_empty() && self.tx.capacity() > 0 && self.qos0_room() > 0 {
            let n = self.qos0.len().min(DRAIN).min(self.qos0_room());
            let items: Vec<Forward> = self.qos0.drain(..n).collect();
            if !self.hand_over(items) {
                // The lane's task is gone (the actor is stopping).
                self.qos0.clear();
                return sent;
            }
            sent += n;
            if let Some(u) = &mut self.qos0_unwritten {
                *u += n;
            }
        }
        sent
    }

    /// Puts `items` in the lane's queue (which must have room); false when the lane's task is
    /// gone.
    fn hand_over(&self, items: Vec<Forward>) -> bool {
        match &self.tx {
            LaneTx::Colony(tx) => tx.try_send((self.epoch, items)).is_ok(),
            LaneTx::Mqtt(tx) => tx
                .try_send(ToLink::Batch {
                    epoch: self.epoch,
                    items,
                })
                .is_ok(),
        }
    }

    /// Hands the next spooled messages to the lane while it has room: those kept in memory,
    /// then, given the spool, those read from it.
    fn pump(&mut self, mut spool: Option<&mut Spool>) -> Result<(), ActorFailure> {
        while self.up && self.outstanding < self.window {
            if self.tx.capacity() == 0 {
                // The lane's queue is full; the next pump goes on from the cursor.
                return Ok(());
            }
            let want = (self.window - self.outstanding).min(NEXT_MAX);
            let items: Vec<Forward> = if !self.ready.is_empty() {
                let n = want.min(self.ready.len());
                self.ready.drain(..n).collect()
            } else if let Some(spool) = spool.as_deref_mut() {
                let batch = spool.next(self.dir, self.cursor, want).map_err(fail)?;
                batch.into_iter().map(forward).collect()
            } else {
                return Ok(());
            };
            let Some(last) = items.last() else {
                return Ok(());
            };
            self.cursor = last.seq;
            self.known = self.known.max(self.cursor);
            self.outstanding += items.len();
            if !self.hand_over(items) {
                // The lane's task is gone (the actor is stopping): nothing more to hand over.
                self.up = false;
                return Ok(());
            }
        }
        Ok(())
    }
}

impl LaneTx {
    fn capacity(&self) -> usize {
        match self {
            LaneTx::Colony(tx) => tx.capacity(),
            LaneTx::Mqtt(tx) => tx.capacity(),
        }
    }

    /// Waits until the lane's queue has room (forever once its task is gone).
    async fn room(&self) {
        let free = match self {
            LaneTx::Colony(tx) => tx.reserve().await.is_ok(),
            LaneTx::Mqtt(tx) => tx.reserve().await.is_ok(),
        };
        if !free {
            std::future::pending::<()>().await;
        }
    }
}

fn forward(m: Spooled) -> Forward {
    Forward {
        seq: m.seq,
        topic: m.topic,
        payload: m.payload,
        qos: m.qos,
        retain: m.retain,
        hops: m.hops,
    }
}

/// Which connection to `node` carries messages now: `None` when there is none. On this node
/// delivery is in-process and in order, always the same "connection".
fn generation(cluster: &Cluster, node: &str) -> Option<(LinkState, u64)> {
    if node == cluster.node_name() {
        return Some((LinkState::Up, 0));
    }
    cluster.link_generation(node)
}

fn publish_message(f: Forward, stream: &str) -> BrokerMessage {
    let seq = f.seq;
    BrokerMessage::Publish {
        topic: f.topic,
        payload: f.payload,
        qos: f.qos,
        retain: f.retain,
        hops: f.hops,
        stream: (seq != 0).then(|| PublishStream {
            id: stream.to_owned(),
            seq,
        }),
    }
}

/// Sends `items` in one ordered batch whose last message is a call: its reply, over the same
/// connection the batch went on, means the broker has handled (and committed) every message
/// before it too. A single message is one call, with no extra round trip. Returns false when
/// that is not certain (the caller then sends them again one call at a time; the stream makes
/// the repeats harmless).
async fn pipelined(
    cluster: &Cluster,
    me: &Address,
    to: &Address,
    stream: &str,
    items: &[Forward],
) -> bool {
    let Some((last, rest)) = items.split_last() else {
        return true;
    };
    let before = generation(cluster, to.node());
    if before.is_none() {
        return false;
    }
    if !rest.is_empty() {
        let mut bodies = Vec::with_capacity(rest.len());
        for f in rest {
            match colony_cluster::encode_body(&publish_message(f.clone(), stream)) {
                Ok(b) => bodies.push(bytes::Bytes::from(b)),
                Err(_) => return false,
            }
        }
        if cluster.send_batch(to, Some(me), bodies).await.is_err() {
            return false;
        }
    }
    let reply = cluster
        .call::<_, ()>(
            to,
            Some(me),
            &publish_message(last.clone(), stream),
            Some(CALL_TIMEOUT),
        )
        .await;
    reply.is_ok() && generation(cluster, to.node()) == before
}

/// Forwards batches to a Colony broker. QoS 1/2 messages are numbered in the bridge's publish
/// stream, so the broker drops a repeat: a batch goes in one ordered send with a barrier call
/// behind it, and when that is not conclusive (the connection changed, a call failed) it is
/// sent again one call at a time, each reply meaning committed.
async fn colony_lane(
    cluster: Cluster,
    me: Address,
    to: Address,
    stream: String,
    dir: Dir,
    mut rx: mpsc::Receiver<(u64, Vec<Forward>)>,
    tx: mpsc::Sender<(Dir, FromLink)>,
) {
    let mut dead_epoch = 0;
    while let Some((epoch, items)) = rx.recv().await {
        if epoch <= dead_epoch {
            continue;
        }
        if items.iter().all(|f| f.seq == 0) {
            let bodies: Vec<bytes::Bytes> = items
                .into_iter()
                .filter_map(|f| colony_cluster::encode_body(&publish_message(f, &stream)).ok())
                .map(bytes::Bytes::from)
                .collect();
            if let Err(e) = cluster.send_batch(&to, Some(&me), bodies).await {
                debug!(%to, "QoS 0 messages not forwarded: {e}");
            }
            continue;
        }
        if pipelined(&cluster, &me, &to, &stream, &items).await {
            let seqs = items.iter().map(|f| f.seq).collect();
            if tx.send((dir, FromLink::Delivered { seqs })).await.is_err() {
                return;
            }
            continue;
        }
        let mut delivered = Vec::new();
        for f in items {
            let seq = f.seq;
            let msg = publish_message(f, &stream);
            match cluster
                .call::<_, ()>(&to, Some(&me), &msg, Some(CALL_TIMEOUT))
                .await
            {
                Ok(()) => delivered.push(seq),
                Err(CallError::Rejected(r))
                    if r.contains("is not a valid topic name") || r.contains("too large") =>
                {
                    warn!(%to, "a forwarded message was refused and dropped: {r}");
                    delivered.push(seq);
                }
                Err(e) => {
                    dead_epoch = epoch;
                    let seqs = std::mem::take(&mut delivered);
                    if (!seqs.is_empty()
                        && tx.send((dir, FromLink::Delivered { seqs })).await.is_err())
                        || tx
                            .send((
                                dir,
                                FromLink::Down {
                                    epoch,
                                    reason: e.to_string(),
                                },
                            ))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    break;
                }
            }
        }
        if !delivered.is_empty()
            && tx
                .send((dir, FromLink::Delivered { seqs: delivered }))
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Something the bridge's helper tasks report.
enum Report {
    /// A subscription on `side` was made (or not).
    Subscribed { side: Side, ok: bool },
    /// The broker `source` has our acknowledgement of `ids`.
    Acked { source: String, ids: Vec<u64> },
}

/// Subscribes the bridge to `filters` (grouped by QoS) on `broker`, with no-local.
async fn subscribe(
    cluster: Cluster,
    me: Address,
    broker: Address,
    filters: Vec<(String, u8)>,
    removed: Vec<String>,
    side: Side,
    tx: mpsc::Sender<Report>,
) {
    let mut ok = true;
    if !removed.is_empty() {
        let m = BrokerMessage::Unsubscribe {
            filters: removed,
            subscriber: None,
        };
        ok &= cluster
            .call::<_, ()>(&broker, Some(&me), &m, Some(CALL_TIMEOUT))
            .await
            .is_ok();
    }
    for (qos, filters) in by_qos(&filters) {
        let m = BrokerMessage::Subscribe {
            filters,
            qos,
            subscriber: None,
            no_local: true,
            window: Some(super::NOTICE_WINDOW),
        };
        match cluster
            .call::<_, Vec<Option<u8>>>(&broker, Some(&me), &m, Some(CALL_TIMEOUT))
            .await
        {
            Ok(granted) if granted.iter().all(Option::is_some) => {}
            Ok(granted) => {
                warn!(%broker, ?granted, "broker refused some bridge filters");
            }
            Err(e) => {
                debug!(%broker, "cannot subscribe yet: {e}");
                ok = false;
            }
        }
    }
    let _ = tx.send(Report::Subscribed { side, ok }).await;
}

/// Filters grouped by QoS, lowest first (one actor subscription per QoS).
pub fn by_qos(filters: &[(String, u8)]) -> Vec<(u8, Vec<String>)> {
    let mut out: Vec<(u8, Vec<String>)> = Vec::new();
    for (f, q) in filters {
        match out.iter_mut().find(|(g, _)| g == q) {
            Some((_, v)) => v.push(f.clone()),
            None => out.push((*q, vec![f.clone()])),
        }
    }
    out.sort_by_key(|(q, _)| *q);
    out
}

#[derive(Default)]
struct Counters {
    forwarded_out: u64,
    forwarded_in: u64,
    reconnects: u64,
    dropped_qos0: u64,
    loops_stopped: u64,
    unmatched: u64,
}

enum Remote {
    Colony(Address),
    Mqtt,
}

/// Messages of the local broker handed to the MQTT link straight from their notice, without the
/// spool (see [`Bridge::take`]): the broker keeps each until the far broker has acknowledged it
/// and the bridge passes that on.
#[derive(Default)]
struct Direct {
    /// In flight, by token, in the order handed.
    inflight: BTreeMap<u64, Entry>,
    /// The notice ids of those in flight.
    ids: HashSet<u64>,
    /// Tokens of messages spooled while in flight (see [`Bridge::spool_direct`]), and their seqs.
    spooled: HashMap<u64, u64>,
    /// Notice ids delivered directly, to recognise one the broker sends again.
    delivered: NoticeIds,
    /// Notice ids delivered directly, to acknowledge to the local broker.
    acks: Vec<u64>,
    /// Notice ids spooled from in flight and committed, to acknowledge to the local broker.
    spooled_acks: Vec<u64>,
    next_token: u64,
    /// Messages forwarded this way.
    count: u64,
}

struct Bridge {
    me: Address,
    cluster: Cluster,
    local: Address,
    local_id: String,
    remote: Remote,
    remote_id: String,
    rules: Rules,
    spool: Spool,
    out: Lane,
    inn: Lane,
    mqtt: Option<mpsc::Sender<ToLink>>,
    mqtt_epoch: u64,
    connected: bool,
    address: Option<String>,
    n: Counters,
    reconnect_min: Duration,
    reconnect_max: Duration,
    notification_topic: String,
    local_subscribed: bool,
    remote_subscribed: bool,
    direct: Direct,
}

/// An incoming message, from either side.
struct Incoming {
    side: Side,
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    hops: Vec<String>,
    notice: Option<u64>,
    /// A notice the broker sends again.
    dup: bool,
}

impl Bridge {
    fn side_id(&self, side: Side) -> &str {
        match side {
            Side::Local => &self.local_id,
            Side::Remote => &self.remote_id,
        }
    }

    /// Routes incoming messages: QoS 0 straight to the far lane, QoS 1/2 into the spool, staged
    /// and not yet committed: the caller commits ([`Spool::commit`]) before it acknowledges
    /// them. An MQTT lane that keeps up is handed its messages at once, before the commit: a
    /// crash before it costs a duplicate at the far broker (QoS 1, at least once), never a
    /// loss, since the source is not yet acknowledged and sends them again. A Colony lane
    /// waits for the commit, as its seqs number the messages for the far broker's exactly-once
    /// stream. Returns the notice ids to acknowledge per source, and whether a lane was handed
    /// messages before the commit.
    ///
    /// Direct forwarding: while the MQTT link keeps up (nothing of the out direction waits in
    /// the spool or is in flight from it, and the batch fits in its window), fresh notices of
    /// the local broker are handed to the link without the spool at all, and acknowledged to
    /// the broker only once the far broker has acknowledged them: until then the broker keeps
    /// them on disk, and a crash has it send them again (QoS 1, at least once, as through the
    /// spool). Once anything has to be spooled (the link is slow, or down), what is in flight
    /// directly is spooled first, so that the order holds across a reconnect or a restart.
    fn take(
        &mut self,
        batch: Vec<Incoming>,
    ) -> Result<(HashMap<Side, Vec<u64>>, bool), ActorFailure> {
        let mut acks: HashMap<Side, Vec<u64>> = HashMap::new();
        let mut spooled: [Vec<Entry>; 2] = [Vec::new(), Vec::new()];
        let mut now: [Vec<Forward>; 2] = [Vec::new(), Vec::new()];
        // Every message for the out lane is a notice the local broker sends the first time.
        let mut fresh = true;
        for m in batch {
            if m.side == Side::Local
                && let Some(id) = m.notice
            {
                if self.direct.ids.contains(&id) {
                    // In flight directly: acknowledged once the far broker has it.
                    continue;
                }
                if self.direct.delivered.contains(id) {
                    acks.entry(Side::Local).or_default().push(id);
                    continue;
                }
            }
            if let Some(id) = m.notice {
                acks.entry(m.side).or_default().push(id);
            }
            let from = self.side_id(m.side).to_owned();
            let to = self.side_id(m.side.other()).to_owned();
            let Some(mapped) = self.rules.map(m.side, &m.topic, m.qos) else {
                self.n.unmatched += 1;
                continue;
            };
            if !may_forward(&m.hops, &from, &to) {
                self.n.loops_stopped += 1;
                continue;
            }
            let hops = with_hop(&m.hops, &from);
            let i = usize::from(m.side == Side::Remote);
            if mapped.qos == 0 {
                now[i].push(Forward {
                    seq: 0,
                    topic: mapped.topic,
                    payload: m.payload,
                    qos: 0,
                    retain: m.retain,
                    hops,
                });
            } else {
                fresh &= i == 1 || (m.notice.is_some() && !m.dup);
                spooled[i].push(Entry {
                    notice: m.notice.map(|id| (from.clone(), id)),
                    topic: mapped.topic,
                    payload: m.payload,
                    qos: mapped.qos,
                    retain: m.retain,
                    hops,
                });
            }
        }
        let t = unix_ms();
        if fresh && self.may_go_direct(spooled[0].len()) {
            let entries = std::mem::take(&mut spooled[0]);
            if let Err(entries) = self.go_direct(entries, &mut acks) {
                spooled[0] = entries;
            }
        }
        if !spooled[0].is_empty() && !self.direct.inflight.is_empty() {
            // In order: what is in flight directly goes into the spool before these.
            let ids = self.spool_direct(t)?;
            acks.entry(Side::Local).or_default().extend(ids);
        }
        let mut early = false;
        for (i, dir) in [(0, Dir::Out), (1, Dir::In)] {
            let lane = if i == 0 { &mut self.out } else { &mut self.inn };
            if !spooled[i].is_empty() {
                let before = self.spool.last(dir);
                let appended = self.spool.stage(dir, &spooled[i], t).map_err(fail)?;
                if appended.dropped > 0 {
                    lane.forget_ready();
                } else {
                    lane.appended(before, appended.rows);
                    if matches!(lane.tx, LaneTx::Mqtt(_)) && !lane.ready.is_empty() {
                        lane.pump(None)?;
                        early = true;
                    }
                }
            }
            let items = std::mem::take(&mut now[i]);
            self.n.dropped_qos0 += lane.queue_qos0(items) as u64;
        }
        Ok((acks, early))
    }

    /// True when `n` messages for the out lane may go to the MQTT link directly (see
    /// [`Bridge::take`]).
    fn may_go_direct(&self, n: usize) -> bool {
        let lane = &self.out;
        n > 0
            && matches!(self.remote, Remote::Mqtt)
            && lane.up
            && lane.ready.is_empty()
            && lane.cursor == self.spool.last(Dir::Out)
            && lane.outstanding == self.direct.inflight.len()
            && lane.outstanding + n <= lane.window.max(DIRECT_WINDOW)
            && lane.tx.capacity() > 0
    }

    /// Hands `entries` to the MQTT link under tokens of their own, and takes their notices out
    /// of `acks` (they are acknowledged once delivered). Gives them back when the link's task
    /// is gone.
    fn go_direct(
        &mut self,
        entries: Vec<Entry>,
        acks: &mut HashMap<Side, Vec<u64>>,
    ) -> Result<(), Vec<Entry>> {
        let first = DIRECT_BASE + self.direct.next_token;
        let items = entries
            .iter()
            .zip(first..)
            .map(|(e, seq)| Forward {
                seq,
                topic: e.topic.clone(),
                payload: e.payload.clone(),
                qos: e.qos,
                retain: e.retain,
                hops: e.hops.clone(),
            })
            .collect();
        if !self.out.hand_over(items) {
            return Err(entries);
        }
        self.direct.next_token += entries.len() as u64;
        self.out.outstanding += entries.len();
        for (e, token) in entries.into_iter().zip(first..) {
            if let Some((_, id)) = &e.notice {
                self.direct.ids.insert(*id);
            }
            self.direct.inflight.insert(token, e);
        }
        if let Some(local) = acks.get_mut(&Side::Local) {
            local.retain(|id| !self.direct.ids.contains(id));
        }
        Ok(())
    }

    /// Stages what is in flight directly into the spool, in order, ahead of anything spooled
    /// after it, so that a new connection or a restart sends it again in its place; the link
    /// may still acknowledge it under its tokens. Returns the notice ids, to acknowledge once
    /// committed.
    fn spool_direct(&mut self, t: u64) -> Result<Vec<u64>, ActorFailure> {
        self.direct.ids.clear();
        let (tokens, entries): (Vec<u64>, Vec<Entry>) = std::mem::take(&mut self.direct.inflight)
            .into_iter()
            .unzip();
        let ids = entries
            .iter()
            .filter_map(|e| e.notice.as_ref().map(|(_, id)| *id))
            .collect();
        let appended = self.spool.stage(Dir::Out, &entries, t).map_err(fail)?;
        if appended.rows.len() == tokens.len() {
            let seqs = appended.rows.iter().map(|r| r.seq);
            self.direct.spooled.extend(tokens.into_iter().zip(seqs));
        }
        // They were handed already: the lane goes on after them.
        let lane = &mut self.out;
        if let Some(last) = appended.rows.last() {
            lane.cursor = last.seq;
            lane.known = last.seq;
        }
        if appended.dropped > 0 {
            lane.forget_ready();
        }
        Ok(ids)
    }

    /// Sorts acknowledged seqs of the out lane: direct tokens are done (their notices are to
    /// be acknowledged), tokens of messages spooled since stand for their seqs. Returns the
    /// spool's seqs.
    fn direct_delivered(&mut self, seqs: Vec<u64>) -> Vec<u64> {
        let keep = NoticeIds::keep(super::NOTICE_WINDOW);
        let mut spooled = Vec::with_capacity(seqs.len());
        for s in seqs {
            if s < DIRECT_BASE {
                spooled.push(s);
            } else if let Some(e) = self.direct.inflight.remove(&s) {
                self.direct.count += 1;
                if let Some((_, id)) = e.notice {
                    self.direct.ids.remove(&id);
                    self.direct.delivered.take(id, keep);
                    self.direct.acks.push(id);
                }
            } else if let Some(seq) = self.direct.spooled.remove(&s) {
                spooled.push(seq);
            }
        }
        spooled
    }

    /// Spools and commits what is in flight directly (its connection is gone), to be sent
    /// again from the spool; its notices are acknowledged next.
    fn spool_direct_now(&mut self) -> Result<(), ActorFailure> {
        if !self.direct.inflight.is_empty() {
            let ids = self.spool_direct(unix_ms())?;
            self.spool.commit().map_err(fail)?;
            self.direct.spooled_acks.extend(ids);
        }
        self.direct.spooled.clear();
        Ok(())
    }

    /// The far side has `seqs` of direction `dir` (spool seqs, or direct tokens on the out
    /// lane of an MQTT link).
    fn delivered(&mut self, dir: Dir, seqs: Vec<u64>) {
        let n = seqs.len();
        let seqs = match dir {
            Dir::Out => self.direct_delivered(seqs),
            Dir::In => seqs,
        };
        let lane = match dir {
            Dir::Out => &mut self.out,
            Dir::In => &mut self.inn,
        };
        lane.backoff = self.reconnect_min;
        lane.outstanding = lane.outstanding.saturating_sub(n);
        lane.delivered += n as u64;
        match dir {
            Dir::Out => self.n.forwarded_out += n as u64,
            Dir::In => self.n.forwarded_in += n as u64,
        }
        self.spool.delivered(dir, seqs);
    }

    fn lane_event(&mut self, dir: Dir, ev: FromLink) -> Result<(), ActorFailure> {
        let (min, max) = (self.reconnect_min, self.reconnect_max);
        if dir == Dir::Out
            && matches!(self.remote, Remote::Mqtt)
            && match &ev {
                FromLink::Down { epoch, .. } => *epoch == self.out.epoch,
                FromLink::Up { .. } => true,
                _ => false,
            }
        {
            self.spool_direct_now()?;
        }
        if let FromLink::Delivered { seqs } = ev {
            self.delivered(dir, seqs);
            return Ok(());
        }
        let lane = match dir {
            Dir::Out => &mut self.out,
            Dir::In => &mut self.inn,
        };
        match ev {
            // Handled above (it needs the whole bridge, not one lane).
            FromLink::Delivered { .. } => {}
            FromLink::Down { epoch, reason } => {
                if epoch == lane.epoch {
                    self.n.dropped_qos0 += lane.down(&reason, min, max) as u64;
                }
                if matches!(self.remote, Remote::Mqtt) && dir == Dir::Out {
                    // The MQTT link retries by itself; it says when it is up.
                    lane.retry_at = None;
                    if self.connected {
                        self.n.reconnects += 1;
                    }
                    self.connected = false;
                }
            }
            FromLink::Up { epoch, address } => {
                lane.revive(epoch);
                self.mqtt_epoch = epoch;
                self.connected = true;
                self.address = Some(address);
            }
            FromLink::Written { count } => lane.qos0_done(count),
            FromLink::Dropped { count } => {
                lane.qos0_done(count);
                self.n.dropped_qos0 += count;
                self.n.forwarded_out = self.n.forwarded_out.saturating_sub(count);
            }
            FromLink::Echoed { count } => self.n.loops_stopped += count,
            FromLink::Received { .. } => {}
        }
        Ok(())
    }

    /// Hands waiting QoS 0 messages and the next spooled ones to the lanes.
    fn pump(&mut self) -> Result<(), ActorFailure> {
        self.n.forwarded_out += self.out.flush_qos0() as u64;
        self.n.forwarded_in += self.inn.flush_qos0() as u64;
        self.out.pump(Some(&mut self.spool))?;
        self.inn.pump(Some(&mut self.spool))
    }

    /// Colony lanes: retry a lane that is down once its node is up and its backoff has passed.
    fn revive_colony_lanes(&mut self) {
        let now = Instant::now();
        for lane in [&mut self.out, &mut self.inn] {
            let Some(node) = &lane.node else { continue };
            if lane.up || lane.retry_at.is_some_and(|t| now < t) {
                continue;
            }
            if self.cluster.is_up(node) {
                lane.revive(lane.epoch + 1);
            } else {
                // Checked again each second until the node is back.
                lane.retry_at = None;
            }
        }
    }

    /// When a Colony lane that is down may be tried again.
    fn next_retry(&self) -> Option<Instant> {
        [&self.out, &self.inn]
            .into_iter()
            .filter(|l| !l.up && l.node.is_some())
            .filter_map(|l| l.retry_at)
            .min()
    }

    fn detail(&self, rates: (u64, u64)) -> serde_json::Value {
        let spool = |d: Dir| {
            let c = self.spool.counters(d);
            json!({
                "messages": c.messages, "bytes": c.bytes,
                "dropped_full": c.dropped_full, "dropped_expired": c.dropped_expired,
            })
        };
        json!({
            "local": self.local_id,
            "remote": self.remote_id,
            "connected": self.connected,
            "address": self.address,
            "reconnects": self.n.reconnects,
            "forwarded_out": self.n.forwarded_out,
            "forwarded_in": self.n.forwarded_in,
            "forwarded_direct": self.direct.count,
            "out_per_sec": rates.0,
            "in_per_sec": rates.1,
            "spool_out": spool(Dir::Out),
            "spool_in": spool(Dir::In),
            "spool_depth": self.spool.counters(Dir::Out).messages + self.spool.counters(Dir::In).messages,
            "dropped_qos0": self.n.dropped_qos0,
            "loops_stopped": self.n.loops_stopped,
            "unmatched": self.n.unmatched,
        })
    }

    /// Publishes the connection state, retained, on the local broker.
    fn notify(&self, tasks: &mut JoinSet<()>) {
        let payload = json!({
            "state": if self.connected { "connected" } else { "disconnected" },
            "remote": self.remote_id,
            "address": self.address,
            "at_ms": unix_ms(),
        });
        let msg = BrokerMessage::Publish {
            topic: self.notification_topic.clone(),
            payload: payload.to_string().into_bytes(),
            qos: 1,
            retain: true,
            hops: Vec::new(),
            stream: None,
        };
        let (cluster, me, to) = (self.cluster.clone(), self.me.clone(), self.local.clone());
        tasks.spawn(async move {
            if let Err(e) = cluster
                .call::<_, ()>(&to, Some(&me), &msg, Some(CALL_TIMEOUT))
                .await
            {
                debug!("bridge state not published: {e}");
            }
        });
    }
}

fn notice(side: Side, n: BrokerNotice) -> Incoming {
    let BrokerNotice::Publish {
        topic,
        payload,
        qos,
        retain,
        id,
        dup,
        hops,
    } = n;
    Incoming {
        side,
        topic,
        payload,
        qos,
        retain,
        hops,
        notice: id,
        dup,
    }
}

fn expand(template: &str, me: &Address) -> String {
    template
        .replace("{node}", me.node())
        .replace("{name}", me.actor())
}

fn bounds(s: &BridgeSettings) -> Bounds {
    Bounds {
        max_messages: s.spool_max_messages,
        max_bytes: s.spool_max_bytes,
        max_age_ms: s.spool_max_age_secs.saturating_mul(1000),
    }
}

fn link_config(
    s: &BridgeSettings,
    ctx: &ActorContext,
    primary: &str,
    filters: Vec<(String, u8)>,
) -> Result<LinkConfig, ActorFailure> {
    let tls = match &s.ca {
        Some(ca) => {
            let ca = ctx.config.resolve(ca);
            let client = match (&s.cert, &s.key) {
                (Some(c), Some(k)) => Some((ctx.config.resolve(c), ctx.config.resolve(k))),
                _ => None,
            };
            Some(Arc::new(
                crate::mqtt_client::tls_config(
                    &ca,
                    client.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                )
                .map_err(fail)?,
            ))
        }
        None => None,
    };
    let targets = std::iter::once(primary)
        .chain(s.failover.iter().map(String::as_str))
        .map(|u| link::target(u, tls.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    Ok(LinkConfig {
        targets,
        client_id: s.client_id.clone().unwrap_or_else(|| {
            format!(
                "colony-bridge-{}-{}",
                ctx.address.node(),
                ctx.address.actor()
            )
        }),
        credentials: s
            .username
            .clone()
            .map(|u| (u, s.password.clone().unwrap_or_default())),
        keepalive: Duration::from_secs(s.keepalive_secs),
        session_expiry_secs: s.session_expiry_secs,
        reconnect_min: Duration::from_millis(s.reconnect_min_ms),
        reconnect_max: Duration::from_millis(s.reconnect_max_ms),
        primary_retry: Duration::from_secs(s.primary_retry_secs),
        max_inflight: s.max_inflight,
        filters: capped(filters),
        version: s.mqtt_version,
    })
}

/// External brokers get QoS 1 at most (see [`link`]).
fn capped(filters: Vec<(String, u8)>) -> Vec<(String, u8)> {
    filters.into_iter().map(|(f, q)| (f, q.min(1))).collect()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Runs a bridge until it is told to stop.
pub async fn run(mut ctx: ActorContext) -> Result<(), ActorFailure> {
    let ActorSettings::Bridge(settings) = ctx.settings() else {
        return Err(fail("bridge started with another kind's settings"));
    };
    std::fs::create_dir_all(&ctx.data_dir)
        .map_err(|e| fail(format!("data dir {}: {e}", ctx.data_dir.display())))?;
    let spool = Spool::open(&ctx.data_dir.join("spool.sqlite"), bounds(&settings)).map_err(fail)?;
    let rules = Rules::new(settings.topics.clone());
    let me = ctx.address.clone();
    let cluster = ctx.cluster.clone();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let (lane_tx, mut lane_rx) = mpsc::channel::<(Dir, FromLink)>(1024);
    let (report_tx, mut report_rx) = mpsc::channel::<Report>(256);
    let min = Duration::from_millis(settings.reconnect_min_ms);
    let max = Duration::from_millis(settings.reconnect_max_ms);

    // The far broker keeps a high-water mark per stream: a spool made afresh numbers from 1
    // again, so its streams take its own name (see `Spool::numbering`).
    let numbering = spool.numbering().to_owned();
    let stream_of = |dir: Dir| match numbering.as_str() {
        "" => format!("bridge:{me}:{}", dir.as_str()),
        n => format!("bridge:{me}:{}:{n}", dir.as_str()),
    };
    let colony_lane_for = |tasks: &mut JoinSet<()>, to: &Address, dir: Dir| {
        let (tx, rx) = mpsc::channel(COLONY_WINDOW);
        tasks.spawn(colony_lane(
            cluster.clone(),
            me.clone(),
            to.clone(),
            stream_of(dir),
            dir,
            rx,
            lane_tx.clone(),
        ));
        Lane {
            epoch: 1,
            up: true,
            node: Some(to.node().to_owned()),
            ..Lane::new(dir, LaneTx::Colony(tx), COLONY_WINDOW, min)
        }
    };

    let inn = colony_lane_for(&mut tasks, &settings.local, Dir::In);
    let mut mqtt_rx = None;
    let (remote, remote_id, out, mqtt) = match &settings.remote {
        BridgeRemote::Actor(a) => {
            let lane = colony_lane_for(&mut tasks, a, Dir::Out);
            (Remote::Colony(a.clone()), a.to_string(), lane, None)
        }
        BridgeRemote::Url(url) => {
            let config = link_config(&settings, &ctx, url, rules.filters(Side::Remote))?;
            let (tx, rx) = mpsc::channel(4096);
            let (events_tx, events_rx) = mpsc::channel(4096);
            tasks.spawn(link::run(config, rx, events_tx));
            mqtt_rx = Some(events_rx);
            let window = settings.max_inflight as usize;
            let lane = Lane::new(Dir::Out, LaneTx::Mqtt(tx.clone()), window, min);
            (Remote::Mqtt, url.clone(), lane, Some(tx))
        }
    };
    info!(local = %settings.local, remote = %remote_id, "bridge starting");
    let mut b = Bridge {
        me: me.clone(),
        cluster: cluster.clone(),
        local: settings.local.clone(),
        local_id: settings.local.to_string(),
        remote,
        remote_id,
        rules,
        spool,
        out,
        inn,
        mqtt,
        mqtt_epoch: 0,
        connected: false,
        address: None,
        n: Counters::default(),
        reconnect_min: min,
        reconnect_max: max,
        notification_topic: expand(&settings.notification_topic, &me),
        local_subscribed: false,
        remote_subscribed: false,
        direct: Direct::default(),
    };
    if let Remote::Colony(a) = &b.remote {
        b.connected = cluster.is_up(a.node());
        b.address = Some(a.to_string());
    }
    drop(settings);
    let mut subscribing = [false, false];
    let start_subscribe =
        |b: &Bridge, tasks: &mut JoinSet<()>, side: Side, removed: Vec<String>| {
            let broker = match (side, &b.remote) {
                (Side::Local, _) => b.local.clone(),
                (Side::Remote, Remote::Colony(a)) => a.clone(),
                (Side::Remote, Remote::Mqtt) => return false,
            };
            tasks.spawn(subscribe(
                b.cluster.clone(),
                b.me.clone(),
                broker,
                b.rules.filters(side),
                removed,
                side,
                report_tx.clone(),
            ));
            true
        };
    subscribing[0] = start_subscribe(&b, &mut tasks, Side::Local, Vec::new());
    if b.connected {
        subscribing[1] = start_subscribe(&b, &mut tasks, Side::Remote, Vec::new());
    }
    b.notify(&mut tasks);
    ctx.started();

    let (out_tx, in_tx) = (b.out.tx.clone(), b.inn.tx.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (0u64, 0u64);
    let mut ticks = 0u64;
    let mut was_connected = b.connected;
    let mut flush_at: Option<Instant> = None;
    loop {
        tokio::select! {
            event = ctx.next_event() => {
                let mut batch = Vec::new();
                let mut next = Some(event);
                let mut n = 0;
                while let Some(event) = next.take() {
                    match event {
                        ActorEvent::Shutdown => return Ok(()),
                        ActorEvent::Reconfigure(ActorSettings::Bridge(s)) => {
                            let old = [b.rules.filters(Side::Local), b.rules.filters(Side::Remote)];
                            b.rules = Rules::new(s.topics.clone());
                            b.spool.set_bounds(bounds(&s));
                            for (i, side) in [(0, Side::Local), (1, Side::Remote)] {
                                let new = b.rules.filters(side);
                                let removed: Vec<String> = old[i]
                                    .iter()
                                    .filter(|(f, _)| !new.iter().any(|(g, _)| g == f))
                                    .map(|(f, _)| f.clone())
                                    .collect();
                                if side == Side::Remote && let Some(tx) = &b.mqtt {
                                    let _ = tx.try_send(ToLink::Filters { filters: capped(new), removed });
                                } else if side != Side::Remote || b.connected {
                                    subscribing[i] = start_subscribe(&b, &mut tasks, side, removed);
                                }
                            }
                            info!("bridge rules updated in place");
                        }
                        ActorEvent::Reconfigure(_) => {}
                        ActorEvent::Message(d) => {
                            if let Some(m) = message(&b, d) {
                                batch.push(m);
                            }
                        }
                    }
                    n += 1;
                    if n < DRAIN {
                        next = ctx.next_event().now_or_never();
                    }
                }
                if !batch.is_empty() {
                    let small = batch.len() < YIELD_BELOW;
                    let (acks, early) = b.take(batch)?;
                    if early && small {
                        // Not busy: let the link write what it was just handed before the
                        // spool commits.
                        crate::host::run_woken_first().await;
                    }
                    b.spool.commit().map_err(fail)?;
                    // Forward first: the lanes' tasks run before the acknowledgements' calls.
                    b.pump()?;
                    for (side, ids) in acks {
                        acknowledge(&b, &mut tasks, &report_tx, side, ids, true);
                    }
                }
            }
            Some((dir, ev)) = lane_rx.recv() => {
                b.lane_event(dir, ev)?;
                while let Ok((dir, ev)) = lane_rx.try_recv() {
                    b.lane_event(dir, ev)?;
                }
            }
            Some(ev) = recv_opt(&mut mqtt_rx) => {
                let mut received = Vec::new();
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    match ev {
                        FromLink::Received { epoch, message } => received.push((epoch, message)),
                        other => b.lane_event(Dir::Out, other)?,
                    }
                    if received.len() < DRAIN {
                        next = mqtt_rx.as_mut().and_then(|rx| rx.try_recv().ok());
                    }
                }
                if !received.is_empty() {
                    let mut tokens = Vec::new();
                    let batch = received.into_iter().map(|(epoch, m)| {
                        if m.qos > 0 {
                            tokens.push((epoch, m.token));
                        }
                        Incoming {
                            side: Side::Remote,
                            topic: m.topic,
                            payload: m.payload,
                            qos: m.qos,
                            retain: m.retain,
                            hops: m.hops,
                            notice: None,
                            dup: false,
                        }
                    }).collect();
                    b.take(batch)?;
                    b.spool.commit().map_err(fail)?;
                    if let Some(tx) = &b.mqtt {
                        for (epoch, token) in tokens {
                            let _ = tx.send(ToLink::Ack { epoch, token }).await;
                        }
                    }
                }
            }
            Some(r) = report_rx.recv() => match r {
                Report::Subscribed { side, ok } => {
                    let i = usize::from(side == Side::Remote);
                    subscribing[i] = false;
                    match side {
                        Side::Local => b.local_subscribed = ok,
                        Side::Remote => b.remote_subscribed = ok,
                    }
                }
                Report::Acked { source, ids } => b.spool.acked(&source, &ids, unix_ms()).map_err(fail)?,
            },
            _ = tick.tick() => {
                ticks += 1;
                if let Remote::Colony(a) = &b.remote {
                    let up = cluster.is_up(a.node());
                    if up && !b.connected {
                        b.remote_subscribed = false;
                    }
                    if !up && b.connected {
                        // The lane finds out by itself (its calls fail); a missed heartbeat
                        // alone must not stall forwarding.
                        b.n.reconnects += 1;
                    }
                    b.connected = up;
                }
                b.revive_colony_lanes();
                if !b.local_subscribed && !subscribing[0] {
                    subscribing[0] = start_subscribe(&b, &mut tasks, Side::Local, Vec::new());
                }
                if b.connected && !b.remote_subscribed && !subscribing[1] {
                    subscribing[1] = start_subscribe(&b, &mut tasks, Side::Remote, Vec::new());
                }
                if b.connected != was_connected {
                    was_connected = b.connected;
                    info!(remote = %b.remote_id, connected = b.connected, "bridge connection state");
                    b.notify(&mut tasks);
                }
                if ticks.is_multiple_of(10) {
                    let dropped = b.spool.expire(unix_ms()).map_err(fail)?;
                    if dropped > 0 {
                        warn!(dropped, "spooled messages older than spool_max_age_secs dropped");
                        b.out.forget_ready();
                        b.inn.forget_ready();
                    }
                }
                let rates = (b.n.forwarded_out - last.0, b.n.forwarded_in - last.1);
                last = (b.n.forwarded_out, b.n.forwarded_in);
                ctx.stats.set_detail(b.detail(rates));
            }
            _ = sleep_until(b.next_retry()) => b.revive_colony_lanes(),
            _ = sleep_until(flush_at) => b.spool.flush().map_err(fail)?,
            // QoS 0 messages wait for a busy lane: `pump` below hands them over.
            _ = out_tx.room(), if b.out.qos0_waiting() => {}
            _ = in_tx.room(), if b.inn.qos0_waiting() => {}
            Some(done) = tasks.join_next() => {
                if let Err(e) = done && e.is_panic() {
                    return Err(fail("a bridge task panicked"));
                }
            }
        }
        b.pump()?;
        if !b.direct.acks.is_empty() {
            // Never in the spool: nothing there to mark.
            let ids = std::mem::take(&mut b.direct.acks);
            acknowledge(&b, &mut tasks, &report_tx, Side::Local, ids, false);
        }
        if !b.direct.spooled_acks.is_empty() {
            let ids = std::mem::take(&mut b.direct.spooled_acks);
            acknowledge(&b, &mut tasks, &report_tx, Side::Local, ids, true);
        }
        flush_at = match flush_at {
            _ if !b.spool.pending() => None,
            None => Some(Instant::now() + FLUSH_AFTER),
            at => at,
        };
    }
}

/// Acknowledges the notices `ids` to the broker on `side`: by a call whose answer is reported
/// when `mark` (the spool marks them acknowledged), otherwise by a message that asks for no
/// answer. Nothing when `ids` is empty (a batch whose notices all went to the link directly:
/// they are acknowledged once delivered).
fn acknowledge(
    b: &Bridge,
    tasks: &mut JoinSet<()>,
    report_tx: &mpsc::Sender<Report>,
    side: Side,
    ids: Vec<u64>,
    mark: bool,
) {
    if ids.is_empty() {
        return;
    }
    let broker = match (side, &b.remote) {
        (Side::Local, _) => b.local.clone(),
        (Side::Remote, Remote::Colony(a)) => a.clone(),
        (Side::Remote, Remote::Mqtt) => return,
    };
    let (cluster, me, tx) = (b.cluster.clone(), b.me.clone(), report_tx.clone());
    tasks.spawn(async move {
        let m = BrokerMessage::Ack {
            ids: ids.clone(),
            subscriber: None,
        };
        if !mark {
            // Nothing waits for the broker to have it: a lost ack costs a notice sent again.
            if let Err(e) = cluster.send(&broker, Some(&me), &m).await {
                debug!(%broker, "ack not delivered: {e}");
            }
            return;
        }
        if cluster
            .call::<_, ()>(&broker, Some(&me), &m, Some(CALL_TIMEOUT))
            .await
            .is_ok()
        {
            let source = broker.to_string();
            let _ = tx.send(Report::Acked { source, ids }).await;
        }
    });
}

/// Decodes a delivery: a broker notice becomes an incoming message; a status call is answered.
fn message(b: &Bridge, mut d: Delivery) -> Option<Incoming> {
    let side = match (&d.from, &b.remote) {
        (Some(f), _) if *f == b.local => Some(Side::Local),
        (Some(f), Remote::Colony(a)) if f == a => Some(Side::Remote),
        _ => None,
    };
    if let Some(side) = side
        && let Ok(n) = d.decode::<BrokerNotice>()
    {
        return Some(notice(side, n));
    }
    match d.decode::<BridgeMessage>() {
        Ok(BridgeMessage::Status {}) => {
            let detail = b.detail((0, 0));
            d.reply(&detail);
        }
        Err(e) => d.reject(e),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mqtt_lane() -> (Lane, mpsc::Receiver<ToLink>) {
        let (tx, rx) = mpsc::channel(4096);
        let lane = Lane {
            epoch: 1,
            up: true,
            ..Lane::new(Dir::Out, LaneTx::Mqtt(tx), 64, Duration::from_millis(100))
        };
        (lane, rx)
    }

    fn qos0(n: usize) -> Vec<Forward> {
        (0..n)
            .map(|i| Forward {
                seq: 0,
                topic: format!("t/{i}"),
                payload: Vec::new(),
                qos: 0,
                retain: false,
                hops: Vec::new(),
            })
            .collect()
    }

    fn handed(rx: &mut mpsc::Receiver<ToLink>) -> usize {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| match m {
                ToLink::Batch { items, .. } => items.len(),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn an_mqtt_link_is_handed_no_more_qos_0_messages_than_it_can_queue() {
        let (mut lane, mut rx) = mqtt_lane();
        assert_eq!(lane.queue_qos0(qos0(10_000)), 0);
        assert_eq!(lane.flush_qos0(), QOS0_LINK_WINDOW);
        assert_eq!(handed(&mut rx), QOS0_LINK_WINDOW);
        assert!(
            !lane.qos0_waiting(),
            "nothing more until the link has written some"
        );
        assert_eq!(lane.flush_qos0(), 0);
        // The link wrote (or dropped) 1,000: as many more go.
        lane.qos0_done(1000);
        assert!(lane.qos0_waiting());
        assert_eq!(lane.flush_qos0(), 1000);
        assert_eq!(handed(&mut rx), 1000);
        assert_eq!(lane.qos0.len(), 10_000 - QOS0_LINK_WINDOW - 1000);
        // A connection that goes down takes what it had: the window starts again.
        lane.down("gone", Duration::from_millis(10), Duration::from_secs(1));
        assert_eq!(lane.qos0_unwritten, Some(0));
    }
}
