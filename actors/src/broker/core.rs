//! The broker's deterministic core: connections, sessions, subscriptions, routing.
//!
//! [`BrokerCore`] takes events — a client's CONNECT, each packet after it, the end of a
//! connection, an actor's subscribe or publish — and answers with [`Action`]s (packets to send,
//! connections to close, notices for actor subscribers) and [`StoreOp`]s (what must be written to
//! disk so persistent sessions and retained messages survive a restart). It owns no socket, task or
//! file; the actor shell carries the actions out.
//!
//! It speaks the protocol-neutral packets of [`super::packet`], so MQTT 3.1.1 and MQTT 5 clients
//! share sessions, subscriptions and messages. Rules it keeps: the first packet is CONNECT and
//! there is only one; a client id already connected is taken over (the old connection is closed,
//! an MQTT 5 one with reason "session taken over"); a session outlives its connection by its
//! expiry interval (3.1.1: clean session ends with the connection, persistent never expires) and
//! keeps subscriptions and QoS 1/2 messages meanwhile; a will is published when a connection ends
//! without DISCONNECT (after its MQTT 5 delay, unless the session resumes); delivered QoS is the
//! lower of publish and subscription; QoS 2 from clients is routed once per packet id until
//! PUBREL; retained messages go to new subscriptions (per MQTT 5 retain handling); no-local,
//! retain-as-published and subscription identifiers are honoured; messages past their expiry are
//! not delivered and carry their remaining lifetime; one member of each `$share` group receives
//! each message, round-robin. A protocol violation closes only the offending connection.
//!
//! Time enters only through [`BrokerCore::tick`] (Unix seconds), so the core stays
//! deterministic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use colony_config::kinds::BrokerLimits;
use tracing::{debug, info, warn};

use super::actor_queue::{ActorOffer, ActorQueue, Pending};
use super::auth::{Access, AccessPolicy, LoginRefusal};
use super::codec::TOPIC_ALIAS_MAX;
use super::packet::{
    AckCode, ClientPacket, ConnAckOut, ConnCode, ConnectIn, DisconnectCode, FilterIn, Protocol,
    PublishIn, ServerPacket, SubCode,
};
use super::retained::{RetainChange, RetainedStore};
pub use super::session::Subscriber;
use super::session::{Ack, AckOutcome, InFlight, Message, Offer, OutState, Outbound, Session};
use super::topic::{ParsedFilter, SubOptions, SubscriptionTrie, is_valid_topic_name, parse_filter};

/// A connection's id, unique for the life of the broker actor.
pub type ConnId = u64;

/// Ticks (of the broker's one-second clock) after which an unacknowledged notice to an actor
/// subscriber is sent again.
pub const ACTOR_REDELIVER_TICKS: u32 = 3;

/// Ids reserved on disk ahead of use (renewed when half are used), so that a batch's
/// deliveries can go out before its commit with ids no restart hands out again.
const SEQ_RESERVE: u64 = 1 << 16;

/// What became of a publish from an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorPublish {
    /// Routed.
    Routed,
    /// Its stream had already accepted this sequence number: acknowledged, not routed again.
    Duplicate,
    /// The topic is not a valid topic name.
    InvalidTopic,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a packet on a connection.
    Send(ConnId, ServerPacket),
    /// Close a connection once what was queued for it is written.
    Close(ConnId),
    /// Push a message to an actor subscriber.
    Notify {
        /// The actor's address.
        to: Arc<str>,
        /// The message.
        message: Message,
        /// The id the actor acknowledges (QoS 1/2 deliveries).
        id: Option<u64>,
        /// Sent before.
        dup: bool,
    },
}

impl Action {
    /// True for a delivery its receiver takes exactly once: a QoS 2 publish to a client, or a
    /// notice an actor acknowledges by id (and recognises again by it).
    fn is_exactly_once(&self) -> bool {
        match self {
            Action::Send(_, ServerPacket::Publish { message, .. }) => message.qos == 2,
            Action::Notify { id, .. } => id.is_some(),
            _ => false,
        }
    }
}

/// A change to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// A persistent session's subscriptions (created or changed).
    SaveSession {
        /// Client id.
        client_id: String,
        /// Username it last connected with.
        username: Option<String>,
        /// Session expiry interval in seconds (`u32::MAX`: never).
        expiry: u32,
        /// Raw filters and how they were subscribed.
        subscriptions: Vec<(String, SubOptions)>,
    },
    /// A persistent session is gone (with its messages).
    DeleteSession {
        /// Client id.
        client_id: String,
    },
    /// A message for a persistent session, queued (`inflight` None) or in flight.
    PutMessage {
        /// Client id.
        client_id: String,
        /// Sequence number.
        seq: u64,
        /// Packet id and state when in flight.
        inflight: Option<(u16, OutState)>,
        /// The message.
        message: Message,
    },
    /// A message for a persistent session is done.
    DeleteMessage {
        /// Client id.
        client_id: String,
        /// Sequence number.
        seq: u64,
    },
    /// A retained message set.
    PutRetained(Message),
    /// A retained topic cleared.
    DeleteRetained(String),
    /// An actor's subscription.
    PutActorSubscription {
        /// Actor address.
        address: String,
        /// Filter.
        filter: String,
        /// QoS.
        qos: u8,
        /// The actor does not receive its own publishes.
        no_local: bool,
    },
    /// A QoS 1/2 notice for an actor, until it is acknowledged.
    PutActorMessage {
        /// Actor address.
        address: String,
        /// The notice's id.
        id: u64,
        /// The message.
        message: Message,
    },
    /// An actor acknowledged the notices with ids `first..=last` (every one of them).
    DeleteActorMessages {
        /// Actor address.
        address: String,
        /// The first id.
        first: u64,
        /// The last id.
        last: u64,
    },
    /// An actor has no subscriptions left: its queue goes.
    DeleteActorQueue {
        /// Actor address.
        address: String,
    },
    /// The highest sequence number accepted on a publishing stream.
    PutStream {
        /// Stream id.
        id: String,
        /// Its high-water mark.
        seq: u64,
    },
    /// The next broker-wide sequence number (ids are never reused across restarts).
    NextSeq(u64),
    /// An actor's subscription removed.
    DeleteActorSubscription {
        /// Actor address.
        address: String,
        /// Filter.
        filter: String,
    },
}

impl StoreOp {
    /// True for a change that only forgets what a subscriber has acknowledged: left undone by a
    /// crash, it costs a delivery again, never a loss.
    pub fn is_acknowledgement(&self) -> bool {
        matches!(
            self,
            StoreOp::DeleteMessage { .. } | StoreOp::DeleteActorMessages { .. }
        )
    }
}

/// Running totals, for status and `$SYS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Publishes received (clients and actors).
    pub messages_in: u64,
    /// Publishes delivered (clients and actors).
    pub messages_out: u64,
    /// Messages dropped: queue full, or a slow client's buffer full.
    pub dropped: u64,
    /// Publishes and subscriptions refused by ACL.
    pub denied: u64,
    /// Logins refused.
    pub auth_failures: u64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: u64,
    /// Successful CONNECTs.
    pub connects: u64,
}

struct Conn {
    client_id: Arc<str>,
    will: Option<(Message, u32)>,
    protocol: Protocol,
    /// The most unacknowledged QoS 1/2 publishes the client takes.
    receive_max: usize,
    /// The largest packet the client takes.
    max_packet: Option<u32>,
}

/// A will waiting out its delay (MQTT 5).
struct PendingWill {
    client_id: Arc<str>,
    username: Option<String>,
    due: u64,
    message: Message,
}

/// The broker's state.
pub struct BrokerCore {
    sessions: HashMap<Arc<str>, Session>,
    conns: HashMap<ConnId, Conn>,
    online: HashMap<Arc<str>, ConnId>,
    trie: SubscriptionTrie<Subscriber>,
    actor_subs: BTreeMap<Arc<str>, ActorQueue>,
    streams: HashMap<String, u64>,
    /// Ids below this are reserved on disk ([`StoreOp::NextSeq`]): a restart starts above
    /// them, so they may be handed out before the batch that uses them is committed.
    reserved: u64,
    /// Set when something in this batch must be on disk before any of its deliveries go out
    /// (see [`BrokerCore::may_deliver_before_commit`]).
    hold: bool,
    retained: RetainedStore,
    policy: AccessPolicy,
    limits: BrokerLimits,
    next_seq: u64,
    share_cursor: HashMap<(String, String), usize>,
    wills: Vec<PendingWill>,
    now: u64,
    counters: Counters,
    actions: Vec<Action>,
    store: Vec<StoreOp>,
}

/// What was restored from disk.
#[derive(Debug, Default)]
pub struct Restored {
    /// Persistent sessions by client id.
    pub sessions: Vec<(String, Session)>,
    /// Retained messages.
    pub retained: Vec<Message>,
    /// Actor subscriptions (address, filter, options).
    pub actor_subscriptions: Vec<(String, String, SubOptions)>,
    /// Unacknowledged notices for actor subscribers (address, id, message).
    pub actor_messages: Vec<(String, u64, Message)>,
    /// Publishing streams' high-water marks.
    pub streams: Vec<(String, u64)>,
    /// The next sequence number to use.
    pub next_seq: u64,
}

impl BrokerCore {
    /// A broker with this policy and these limits, and what a previous run left on disk.
    pub fn new(policy: AccessPolicy, limits: BrokerLimits, restored: Restored) -> Self {
        let mut core = BrokerCore {
            sessions: HashMap::new(),
            conns: HashMap::new(),
            online: HashMap::new(),
            trie: SubscriptionTrie::new(),
            actor_subs: BTreeMap::new(),
            streams: restored.streams.into_iter().collect(),
            reserved: restored.next_seq.max(1),
            hold: false,
            retained: RetainedStore::new(),
            policy,
            limits,
            next_seq: restored.next_seq.max(1),
            share_cursor: HashMap::new(),
            wills: Vec::new(),
            now: 0,
            counters: Counters::default(),
            actions: Vec::new(),
            store: Vec::new(),
        };
        for (id, session) in restored.sessions {
            let id: Arc<str> = id.into();
            for (raw, opts) in &session.subscriptions {
                if let Some(f) = parse_filter(raw) {
                    core.trie
                        .insert(f.filter, f.group, Subscriber::Client(id.clone()), *opts);
                }
            }
            core.sessions.insert(id, session);
        }
        for m in restored.retained {
            core.retained.apply(&m);
        }
        for (address, filter, opts) in restored.actor_subscriptions {
            if let Some(f) = parse_filter(&filter) {
                let address: Arc<str> = address.into();
                core.trie
                    .insert(f.filter, f.group, Subscriber::Actor(address.clone()), opts);
                core.actor_subs
                    .entry(address)
                    .or_default()
                    .filters
                    .insert(filter, opts);
            }
        }
        let mut left: BTreeMap<String, Vec<(u64, Message)>> = BTreeMap::new();
        for (address, id, message) in restored.actor_messages {
            left.entry(address).or_default().push((id, message));
        }
        for (address, messages) in left {
            match core.actor_subs.get_mut(address.as_str()) {
                Some(q) => q.restore(messages),
                None => core.store.push(StoreOp::DeleteActorQueue { address }),
            }
        }
        core
    }

    /// Sends actor subscribers what a previous run left unacknowledged (call once at start).
    pub fn start(&mut self) {
        let addresses: Vec<Arc<str>> = self.actor_subs.keys().cloned().collect();
        for a in addresses {
            self.pump_actor(&a);
        }
    }

    /// Replaces users and ACL rules (in place, on reload).
    pub fn set_policy(&mut self, policy: AccessPolicy) {
        self.policy = policy;
    }

    /// Replaces the limits (in place, on reload).
    pub fn set_limits(&mut self, limits: BrokerLimits) {
        self.limits = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> &BrokerLimits {
        &self.limits
    }

    /// Takes the actions produced so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Moves the actions produced so far into `out`.
    pub fn drain_actions_into(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    /// Takes the store operations produced so far.
    pub fn take_store_ops(&mut self) -> Vec<StoreOp> {
        if self.next_seq > self.reserved {
            // An id past the reservation was used: this batch waits for its commit.
            self.hold = true;
        }
        if self.next_seq != self.reserved && self.next_seq + SEQ_RESERVE / 2 > self.reserved {
            self.reserved = self.next_seq + SEQ_RESERVE;
            self.store.push(StoreOp::NextSeq(self.reserved));
        }
        std::mem::take(&mut self.store)
    }

    /// True when the deliveries of the batch taken with [`BrokerCore::take_store_ops`] may go
    /// out before its store operations are committed (and acknowledgements only after): a
    /// crash in between then costs a QoS 0/1 duplicate at worst, never a loss, since the
    /// publisher was not acknowledged and sends again. Not so when the batch took a QoS 2
    /// publish, or a publish on a stream that reached a receiver taking it exactly once (a
    /// QoS 2 delivery, or an actor's notice, which the actor recognises again by its id): the
    /// mark that recognises a repeat must be on disk first. A stream publish delivered only at
    /// QoS 0/1 to clients goes first: a crash before the commit then gives such a subscriber a
    /// repeat at worst, as QoS 1 allows (a persistent one would get the message again after
    /// the same crash just after the commit, too). Nor when the batch used an id beyond the
    /// reservation. Call after taking the store operations; it starts the next batch.
    pub fn may_deliver_before_commit(&mut self) -> bool {
        !std::mem::take(&mut self.hold)
    }

    /// Totals so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Counts messages dropped by the shell (a slow client's buffer was full).
    pub fn count_dropped(&mut self, n: u64) {
        self.counters.dropped += n;
    }

    /// Connected clients.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The client id and protocol of connection `conn`, once its CONNECT was accepted.
    pub fn client_of(&self, conn: ConnId) -> Option<(&str, Protocol)> {
        self.conns.get(&conn).map(|c| (&*c.client_id, c.protocol))
    }

    /// Sessions held (connected or not).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Subscriptions held (clients and actors).
    pub fn subscriptions(&self) -> usize {
        self.trie.len()
    }

    /// Retained topics.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Messages queued for offline or slow clients and actor subscribers.
    pub fn queued(&self) -> usize {
        self.sessions
            .values()
            .map(Session::queued_len)
            .sum::<usize>()
            + self
                .actor_subs
                .values()
                .map(ActorQueue::queued_len)
                .sum::<usize>()
    }

    /// The session of `client_id`, if any.
    pub fn session(&self, client_id: &str) -> Option<&Session> {
        self.sessions.get(client_id)
    }

    /// Sets the clock (Unix seconds) and does what is due: sessions past their expiry end,
    /// delayed wills are published, actor notices unacknowledged too long go again. The shell
    /// calls it about once a second.
    pub fn tick(&mut self, now: u64) {
        self.now = now;
        let mut expired = Vec::new();
        for (id, s) in &mut self.sessions {
            if self.online.contains_key(id) {
                continue;
            }
            if s.expires_at.is_none() && s.expiry != u32::MAX {
                s.expires_at = Some(now.saturating_add(u64::from(s.expiry)));
            }
            if s.expires_at.is_some_and(|at| at <= now) {
                expired.push(id.clone());
            }
        }
        for id in expired {
            debug!(client_id = %id, "session expired");
            // A will still waiting goes out when its session ends.
            for w in &mut self.wills {
                if w.client_id == id {
                    w.due = now;
                }
            }
            self.discard_session(&id);
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.wills)
            .into_iter()
            .partition(|w| w.due <= now);
        self.wills = waiting;
        for w in due {
            self.publish_will(&w.client_id, w.username.as_deref(), w.message);
        }
        self.actor_tick();
    }

    /// Sets the clock (Unix seconds) without doing what is due.
    pub fn set_now(&mut self, now: u64) {
        self.now = now;
    }

    /// A client's CONNECT, the first packet of connection `conn`.
    pub fn connect(&mut self, conn: ConnId, connect: ConnectIn) {
        let refuse = |core: &mut Self, code| {
            core.actions.push(Action::Send(
                conn,
                ServerPacket::ConnAck(ConnAckOut::refuse(code)),
            ));
            core.actions.push(Action::Close(conn));
        };
        if self.conns.contains_key(&conn) {
            return self.violation(conn, "second CONNECT", DisconnectCode::ProtocolError);
        }
        if let Some(method) = &connect.auth_method {
            info!(client_id = %connect.client_id, %method, "enhanced authentication is not supported");
            return refuse(self, ConnCode::BadAuthMethod);
        }
        if self.conns.len() >= self.limits.max_connections as usize {
            warn!(client_id = %connect.client_id, "connection refused: max_connections reached");
            return refuse(self, ConnCode::ServerUnavailable);
        }
        let username = connect.username.clone();
        if let Err(why) = self
            .policy
            .login(username.as_deref(), connect.password.as_deref())
        {
            self.counters.auth_failures += 1;
            warn!(
                client_id = %connect.client_id,
                username = username.as_deref().unwrap_or(""),
                reason = ?why,
                "login refused"
            );
            let code = match why {
                LoginRefusal::AnonymousNotAllowed => ConnCode::NotAuthorized,
                LoginRefusal::BadCredentials => ConnCode::BadUserNamePassword,
            };
            return refuse(self, code);
        }
        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if connect.protocol == Protocol::V4 && !connect.clean_start {
                return refuse(self, ConnCode::BadClientId);
            }
            let id = format!("colony-auto-{conn}");
            if connect.protocol == Protocol::V5 {
                assigned = Some(id.clone());
            }
            id.into()
        } else {
            connect.client_id.as_str().into()
        };
        let will = match connect.will {
            Some(w) if !is_valid_topic_name(&w.topic) => {
                return self.violation(
                    conn,
                    "invalid will topic",
                    DisconnectCode::TopicNameInvalid,
                );
            }
            Some(w) => {
                let mut m = Message::new(w.topic, w.payload, w.qos.min(2), w.retain);
                m.origin = Some(Subscriber::Client(client_id.clone()));
                m.props = w.props;
                m.expires_at = w.expiry.map(|e| self.now + u64::from(e));
                Some((m, w.delay))
            }
            None => None,
        };
        if let Some(old) = self.online.get(&client_id).copied() {
            info!(client_id = %client_id, "client id taken over by a new connection");
            self.actions.push(Action::Send(
                old,
                ServerPacket::Disconnect(DisconnectCode::SessionTakenOver),
            ));
            self.actions.push(Action::Close(old));
            self.drop_conn(old, true);
        }
        // The client is back: a will still waiting out its delay is not sent.
        self.wills.retain(|w| w.client_id != client_id);
        let expiry = connect.session_expiry;
        let mut session_present = false;
        match self.sessions.get_mut(&client_id) {
            Some(s) if !connect.clean_start && s.persistent => {
                session_present = true;
                s.username = username.clone();
                s.expiry = expiry;
                s.persistent = expiry > 0;
                s.expires_at = None;
            }
            _ => {
                self.discard_session(&client_id);
                self.sessions
                    .insert(client_id.clone(), Session::new(expiry, username.clone()));
            }
        }
        if expiry > 0 {
            self.save_session(&client_id);
        } else if session_present {
            // Resumed with expiry 0: it ends with this connection; forget it on disk now.
            self.store.push(StoreOp::DeleteSession {
                client_id: client_id.to_string(),
            });
        }
        self.conns.insert(
            conn,
            Conn {
                client_id: client_id.clone(),
                will,
                protocol: connect.protocol,
                receive_max: usize::from(connect.receive_maximum.unwrap_or(u16::MAX).max(1)),
                max_packet: connect.max_packet_size,
            },
        );
        self.online.insert(client_id.clone(), conn);
        self.counters.connects += 1;
        debug!(client_id = %client_id, session_present, "client connected");
        self.actions.push(Action::Send(
            conn,
            ServerPacket::ConnAck(ConnAckOut {
                session_present,
                code: ConnCode::Success,
                assigned_client_id: assigned,
                max_packet_size: self.limits.max_packet_size,
                topic_alias_max: TOPIC_ALIAS_MAX,
                receive_max: u16::MAX,
            }),
        ));
        if session_present && let Some(s) = self.sessions.get(&client_id) {
            for out in s.resend() {
                self.actions.push(Action::Send(conn, outbound_packet(out)));
            }
            self.pump(&client_id);
        }
    }

    /// A packet after CONNECT on `conn`.
    pub fn packet(&mut self, conn: ConnId, packet: ClientPacket) {
        let Some(client_id) = self.conns.get(&conn).map(|c| c.client_id.clone()) else {
            // Not connected (refused, taken over or closed): ignore what is still in flight.
            return;
        };
        match packet {
            ClientPacket::Connect => {
                self.violation(conn, "second CONNECT", DisconnectCode::ProtocolError)
            }
            ClientPacket::Publish(p) => self.client_publish(conn, &client_id, p),
            ClientPacket::PubAck(pid) => self.client_ack(&client_id, Ack::PubAck(pid)),
            ClientPacket::PubRec(pid, false) => self.client_ack(&client_id, Ack::PubRec(pid)),
            ClientPacket::PubRec(pid, true) => self.client_ack(&client_id, Ack::PubRecFailed(pid)),
            ClientPacket::PubComp(pid) => self.client_ack(&client_id, Ack::PubComp(pid)),
            ClientPacket::PubRel(pid) => {
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.release_qos2(pid);
                }
                self.actions
                    .push(Action::Send(conn, ServerPacket::PubComp(pid)));
            }
            ClientPacket::Subscribe { pkid, filters } => {
                let mut codes = Vec::with_capacity(filters.len());
                let mut retained = Vec::new();
                for f in filters {
                    let code = self.subscribe_client(&client_id, &f, &mut retained);
                    codes.push(code);
                }
                self.actions
                    .push(Action::Send(conn, ServerPacket::SubAck { pkid, codes }));
                self.save_session(&client_id);
                for (filter, qos) in retained {
                    self.send_retained(&Subscriber::Client(client_id.clone()), &filter, qos);
                }
            }
            ClientPacket::Unsubscribe { pkid, filters } => {
                let mut existed = Vec::with_capacity(filters.len());
                for raw in &filters {
                    let had = self
                        .sessions
                        .get_mut(&client_id)
                        .is_some_and(|s| s.subscriptions.remove(raw).is_some());
                    existed.push(had);
                    if let Some(f) = parse_filter(raw) {
                        self.trie
                            .remove(f.filter, f.group, &Subscriber::Client(client_id.clone()));
                    }
                }
                self.save_session(&client_id);
                self.actions
                    .push(Action::Send(conn, ServerPacket::UnsubAck { pkid, existed }));
            }
            ClientPacket::PingReq => self
                .actions
                .push(Action::Send(conn, ServerPacket::PingResp)),
            ClientPacket::Disconnect {
                with_will,
                session_expiry,
            } => {
                if let Some(e) = session_expiry
                    && let Some(s) = self.sessions.get_mut(&client_id)
                {
                    if s.expiry == 0 && e > 0 {
                        return self.violation(
                            conn,
                            "DISCONNECT sets a session expiry on a session that had none",
                            DisconnectCode::ProtocolError,
                        );
                    }
                    s.expiry = e;
                    s.persistent = e > 0;
                    if e > 0 {
                        self.save_session(&client_id);
                    }
                }
                if !with_will && let Some(c) = self.conns.get_mut(&conn) {
                    c.will = None;
                }
                self.drop_conn(conn, true);
                self.actions.push(Action::Close(conn));
            }
            ClientPacket::Unexpected(what) => self.violation(
                conn,
                &format!("{what} from a client"),
                DisconnectCode::ProtocolError,
            ),
        }
    }

    /// Connection `conn` ended (socket closed, error, keepalive timeout). Publishes its will
    /// unless it sent DISCONNECT. Does nothing for a connection already dropped.
    pub fn closed(&mut self, conn: ConnId) {
        self.drop_conn(conn, true);
    }

    /// Cuts off the client `client_id` (an operator's decision): an MQTT 5 client is told why,
    /// its will is published, its session kept per its expiry. False when it is not connected.
    pub fn disconnect_client(&mut self, client_id: &str) -> bool {
        let Some(conn) = self.online.get(client_id).copied() else {
            return false;
        };
        info!(client_id, "client disconnected by an operator");
        self.drop_conn(conn, true);
        self.actions.push(Action::Send(
            conn,
            ServerPacket::Disconnect(DisconnectCode::AdministrativeAction),
        ));
        self.actions.push(Action::Close(conn));
        true
    }

    /// Connection `conn` is cut off by its connection task for `code` (malformed or oversize
    /// packet, bad topic alias, keepalive): counted as a protocol error unless it is keepalive.
    pub fn cut_off(&mut self, conn: ConnId, code: DisconnectCode) {
        if code != DisconnectCode::KeepAliveTimeout {
            self.counters.protocol_errors += 1;
        }
        self.drop_conn(conn, true);
    }

    /// An actor subscribes to `filters`; returns the granted QoS per filter (`None` = invalid).
    /// A subscribe is also the actor saying it (re)started: what is in flight to it is sent
    /// again.
    pub fn actor_subscribe(
        &mut self,
        address: &str,
        filters: &[String],
        opts: SubOptions,
    ) -> Vec<Option<u8>> {
        let address: Arc<str> = address.into();
        let opts = SubOptions {
            qos: opts.qos.min(2),
            ..opts
        };
        if let Some(q) = self.actor_subs.get_mut(&address) {
            for p in q.resend_all() {
                self.notify(&address, p);
            }
        }
        let mut out = Vec::new();
        let mut fresh = Vec::new();
        for raw in filters {
            let Some(f) = parse_filter(raw) else {
                out.push(None);
                continue;
            };
            self.add_actor_filter(&address, raw, f, opts);
            out.push(Some(opts.qos));
            fresh.push(raw.clone());
        }
        self.pump_actor(&address);
        for raw in fresh {
            self.send_retained(&Subscriber::Actor(address.clone()), &raw, opts.qos);
        }
        out
    }

    /// Subscribes the actor at `address` to one parsed filter (`raw` as written): in the trie, in
    /// its subscription list, and in the store.
    fn add_actor_filter(
        &mut self,
        address: &Arc<str>,
        raw: &str,
        f: ParsedFilter<'_>,
        opts: SubOptions,
    ) {
        self.trie
            .insert(f.filter, f.group, Subscriber::Actor(address.clone()), opts);
        self.actor_subs
            .entry(address.clone())
            .or_default()
            .filters
            .insert(raw.to_owned(), opts);
        self.store.push(StoreOp::PutActorSubscription {
            address: address.to_string(),
            filter: raw.to_owned(),
            qos: opts.qos,
            no_local: opts.no_local,
        });
    }

    /// Makes sure `address` is subscribed to `filters` with `opts` (a declared subscription):
    /// filters already held with the same options are left alone (no retained messages again).
    pub fn ensure_actor_subscription(
        &mut self,
        address: &str,
        filters: &[String],
        opts: SubOptions,
    ) {
        let missing: Vec<String> = filters
            .iter()
            .filter(|f| {
                self.actor_subs
                    .get(address)
                    .and_then(|q| q.filters.get(f.as_str()))
                    != Some(&opts)
            })
            .cloned()
            .collect();
        if missing.is_empty() {
            return;
        }
        let address: Arc<str> = address.into();
        for raw in &missing {
            let Some(f) = parse_filter(raw) else { continue };
            self.add_actor_filter(&address, raw, f, opts);
        }
        for raw in missing {
            self.send_retained(&Subscriber::Actor(address.clone()), &raw, opts.qos);
        }
    }

    /// An actor unsubscribes from `filters` (all of its filters when empty). With none left,
    /// its queue goes too.
    pub fn actor_unsubscribe(&mut self, address: &str, filters: &[String]) {
        let address: Arc<str> = address.into();
        let raws: Vec<String> = if filters.is_empty() {
            self.actor_subs
                .get(&address)
                .map(|q| q.filters.keys().cloned().collect())
                .unwrap_or_default()
        } else {
            filters.to_vec()
        };
        for raw in raws {
            if let Some(f) = parse_filter(&raw) {
                self.trie
                    .remove(f.filter, f.group, &Subscriber::Actor(address.clone()));
            }
            if let Some(q) = self.actor_subs.get_mut(&address) {
                q.filters.remove(&raw);
                if q.filters.is_empty() {
                    self.actor_subs.remove(&address);
                    self.store.push(StoreOp::DeleteActorQueue {
                        address: address.to_string(),
                    });
                }
            }
            self.store.push(StoreOp::DeleteActorSubscription {
                address: address.to_string(),
                filter: raw,
            });
        }
    }

    /// Sets the in-flight window `address` asked for (`None`: `limits.max_inflight`; at most
    /// [`super::ACTOR_WINDOW_MAX`]); with a larger window, queued notices go out now.
    pub fn set_actor_window(&mut self, address: &str, window: Option<u32>) {
        let Some(q) = self.actor_subs.get_mut(address) else {
            return;
        };
        q.window = window;
        let address: Arc<str> = address.into();
        self.pump_actor(&address);
    }

    /// An actor acknowledges notices by id; the next queued ones go out.
    pub fn actor_ack(&mut self, address: &str, ids: &[u64]) {
        let Some(q) = self.actor_subs.get_mut(address) else {
            return;
        };
        let address: Arc<str> = address.into();
        // Runs of consecutive ids (a subscriber acknowledges a batch at once) go in one delete.
        let mut run: Option<(u64, u64)> = None;
        for &id in ids {
            if !q.ack(id) {
                continue;
            }
            run = match run {
                Some((first, last)) if id == last + 1 => Some((first, id)),
                Some((first, last)) => {
                    self.store.push(StoreOp::DeleteActorMessages {
                        address: address.to_string(),
                        first,
                        last,
                    });
                    Some((id, id))
                }
                None => Some((id, id)),
            };
        }
        if let Some((first, last)) = run {
            self.store.push(StoreOp::DeleteActorMessages {
                address: address.to_string(),
                first,
                last,
            });
        }
        self.pump_actor(&address);
    }

    /// The broker has handed notices up to `id` to the cluster for actor `address` (what is
    /// above still waits in its outbound queue, and is not sent again).
    pub fn actor_handed(&mut self, address: &str, id: u64) {
        if let Some(q) = self.actor_subs.get_mut(address) {
            q.set_handed(id);
        }
    }

    /// One tick of the broker's clock: notices unacknowledged for too long go out again.
    pub fn actor_tick(&mut self) {
        let mut due = Vec::new();
        for (address, q) in &mut self.actor_subs {
            for p in q.tick(ACTOR_REDELIVER_TICKS) {
                due.push((address.clone(), p));
            }
        }
        for (address, p) in due {
            self.notify(&address, p);
        }
    }

    /// Actor subscribers: address, filters and options, notices in flight and queued.
    pub fn actor_subscriptions(&self) -> impl Iterator<Item = (&Arc<str>, &ActorQueue)> {
        self.actor_subs.iter()
    }

    /// A publish from an actor (or the broker itself). With a `stream` (id, seq), a seq at or
    /// below the stream's high-water mark is a duplicate: acknowledged, not routed again.
    pub fn publish(&mut self, message: Message, stream: Option<(String, u64)>) -> ActorPublish {
        if !is_valid_topic_name(&message.topic) {
            return ActorPublish::InvalidTopic;
        }
        let on_stream = stream.is_some();
        if let Some((id, seq)) = stream {
            if self.streams.get(&id).is_some_and(|&hw| seq <= hw) {
                return ActorPublish::Duplicate;
            }
            self.streams.insert(id.clone(), seq);
            self.store.push(StoreOp::PutStream { id, seq });
        }
        self.counters.messages_in += 1;
        let first = self.actions.len();
        self.route(message);
        if on_stream && self.actions[first..].iter().any(Action::is_exactly_once) {
            // The mark that recognises a repeat goes to disk before these deliveries.
            self.hold = true;
        }
        ActorPublish::Routed
    }

    fn notify(&mut self, to: &Arc<str>, p: Pending) {
        self.actions.push(Action::Notify {
            to: to.clone(),
            message: p.message,
            id: Some(p.id),
            dup: p.dup,
        });
    }

    fn pump_actor(&mut self, address: &Arc<str>) {
        let Some(q) = self.actor_subs.get_mut(address) else {
            return;
        };
        let window = actor_window(q, &self.limits);
        for p in q.pump(window) {
            self.counters.messages_out += 1;
            self.notify(address, p);
        }
    }

    /// Publishes a broker statistic on `$SYS/...`, retained and not persisted.
    pub fn publish_sys(&mut self, topic: &str, value: String) {
        self.route(Message::new(topic, Bytes::from(value), 0, true));
    }

    fn client_publish(&mut self, conn: ConnId, client_id: &Arc<str>, p: PublishIn) {
        if !is_valid_topic_name(&p.topic) {
            return self.violation(
                conn,
                "invalid topic name in PUBLISH",
                DisconnectCode::TopicNameInvalid,
            );
        }
        self.counters.messages_in += 1;
        let qos = p.qos.min(2);
        let mut route = true;
        if qos == 2 {
            self.hold = true;
            route = self
                .sessions
                .get_mut(client_id)
                .is_none_or(|s| s.receive_qos2(p.pkid));
        }
        let mut code = AckCode::Success;
        if route {
            let username = self
                .sessions
                .get(client_id)
                .and_then(|s| s.username.clone());
            if self.policy.allows(
                username.as_deref(),
                client_id,
                Access::Write,
                &p.topic,
                false,
            ) {
                let mut m = Message::new(p.topic, p.payload, qos, p.retain);
                m.origin = Some(Subscriber::Client(client_id.clone()));
                m.props = p.props;
                m.expires_at = p.expiry.map(|e| self.now + u64::from(e));
                if self.route(m) == 0 {
                    code = AckCode::NoMatchingSubscribers;
                }
            } else {
                self.counters.denied += 1;
                code = AckCode::NotAuthorized;
                info!(client_id = %client_id, topic = %p.topic, "publish denied by ACL");
            }
        }
        match qos {
            1 => self
                .actions
                .push(Action::Send(conn, ServerPacket::PubAck(p.pkid, code))),
            2 => {
                if code == AckCode::NotAuthorized
                    && let Some(s) = self.sessions.get_mut(client_id)
                {
                    // A refused QoS 2 publish ends at PUBREC (MQTT 5): no PUBREL follows.
                    s.release_qos2(p.pkid);
                }
                self.actions
                    .push(Action::Send(conn, ServerPacket::PubRec(p.pkid, code)))
            }
            _ => {}
        }
    }

    fn client_ack(&mut self, client_id: &Arc<str>, ack: Ack) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let persistent = s.persistent;
        match s.ack(ack) {
            AckOutcome::Done(seq) => {
                if persistent {
                    self.store.push(StoreOp::DeleteMessage {
                        client_id: client_id.to_string(),
                        seq,
                    });
                }
                self.pump(client_id);
            }
            AckOutcome::Released(seq) => {
                let pid = match ack {
                    Ack::PubRec(p) => p,
                    _ => return,
                };
                if let Some(conn) = self.online.get(client_id).copied() {
                    self.actions
                        .push(Action::Send(conn, ServerPacket::PubRel(pid)));
                }
                if persistent && let Some(f) = s.inflight().find(|f| f.seq == seq) {
                    self.store.push(StoreOp::PutMessage {
                        client_id: client_id.to_string(),
                        seq,
                        inflight: Some((pid, OutState::AwaitComp)),
                        message: f.message.clone(),
                    });
                }
            }
            AckOutcome::Unknown => {}
        }
    }

    /// Subscribes a client to one filter; pushes (filter, qos) onto `retained` when retained
    /// messages should follow.
    fn subscribe_client(
        &mut self,
        client_id: &Arc<str>,
        f: &FilterIn,
        retained: &mut Vec<(String, u8)>,
    ) -> SubCode {
        let Some(parsed) = parse_filter(&f.filter) else {
            return SubCode::InvalidFilter;
        };
        let Some(session) = self.sessions.get(client_id) else {
            return SubCode::InvalidFilter;
        };
        let username = session.username.clone();
        if !self.policy.allows(
            username.as_deref(),
            client_id,
            Access::Read,
            parsed.filter,
            true,
        ) {
            self.counters.denied += 1;
            info!(client_id = %client_id, filter = %f.filter, "subscription denied by ACL");
            return SubCode::NotAuthorized;
        }
        let mut opts = SubOptions {
            qos: f.opts.qos.min(2),
            ..f.opts
        };
        if parsed.group.is_some() {
            // No-local means nothing on a shared subscription.
            opts.no_local = false;
        }
        self.trie.insert(
            parsed.filter,
            parsed.group,
            Subscriber::Client(client_id.clone()),
            opts,
        );
        let existed = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.subscriptions.insert(f.filter.clone(), opts))
            .is_some();
        if f.retain_handling == 0 || (f.retain_handling == 1 && !existed) {
            retained.push((f.filter.clone(), opts.qos));
        }
        SubCode::Granted(opts.qos)
    }

    fn send_retained(&mut self, to: &Subscriber, raw: &str, qos: u8) {
        let Some(f) = parse_filter(raw) else { return };
        if f.group.is_some() {
            return; // Shared subscriptions get no retained messages.
        }
        let now = self.now;
        for m in self.retained.matching(f.filter) {
            if m.expired(now) {
                continue;
            }
            let q = m.qos.min(qos);
            self.deliver(to, q, &m, true, &[]);
        }
    }

    /// Routes a message to its subscribers; returns how many it reached.
    fn route(&mut self, message: Message) -> usize {
        if message.retain {
            let persisted = !message.topic.starts_with("$SYS/");
            match self.retained.apply(&message) {
                RetainChange::Set if persisted => {
                    self.store.push(StoreOp::PutRetained(message.clone()))
                }
                RetainChange::Cleared if persisted => self
                    .store
                    .push(StoreOp::DeleteRetained(message.topic.clone())),
                _ => {}
            }
        }
        let matches = self.trie.matches(&message.topic);
        let mut reached = 0;
        for m in matches.direct {
            if m.no_local && message.origin.as_ref() == Some(&m.key) {
                continue;
            }
            reached += 1;
            let retain = m.retain_as_published && message.retain;
            self.deliver(&m.key, message.qos.min(m.qos), &message, retain, &m.ids);
        }
        for (group, members) in matches.shared {
            reached += 1;
            let cursor = self.share_cursor.entry(group).or_insert(0);
            let n = members.len();
            // Prefer a member that is connected (or an actor), starting after the last one used.
            let pick = (0..n)
                .map(|i| (*cursor + i) % n)
                .find(|&i| match &members[i].key {
                    Subscriber::Client(id) => self.online.contains_key(id),
                    Subscriber::Actor(_) => true,
                })
                .unwrap_or(*cursor % n);
            *cursor = pick + 1;
            let m = &members[pick];
            let retain = m.retain_as_published && message.retain;
            self.deliver(
                &m.key.clone(),
                message.qos.min(m.qos),
                &message,
                retain,
                &m.ids.clone(),
            );
        }
        reached
    }

    fn deliver(
        &mut self,
        to: &Subscriber,
        qos: u8,
        message: &Message,
        retain: bool,
        sub_ids: &[u32],
    ) {
        let client_id = match to {
            Subscriber::Actor(address) => {
                return self.deliver_to_actor(address, qos, message, retain);
            }
            Subscriber::Client(id) => id,
        };
        if message.expired(self.now) {
            return;
        }
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if !self.policy.allows(
            session.username.as_deref(),
            client_id,
            Access::Read,
            &message.topic,
            false,
        ) {
            return;
        }
        let conn = self.online.get(client_id).copied();
        let (receive_max, max_packet) = conn
            .and_then(|c| self.conns.get(&c))
            .map_or((usize::MAX, None), |c| (c.receive_max, c.max_packet));
        if let Some(max) = max_packet {
            let size = 16
                + message.topic.len()
                + message.payload.len()
                + message.props.as_ref().map_or(0, |p| p.wire_len())
                + sub_ids.len() * 5;
            if size > max as usize {
                // Larger than the client takes: dropped as if delivered (MQTT 5 §3.1.2.25).
                self.counters.dropped += 1;
                return;
            }
        }
        let out = Message {
            qos,
            retain,
            origin: None,
            sub_ids: sub_ids.to_vec(),
            ..message.clone()
        };
        if qos == 0 {
            if let Some(conn) = conn {
                self.counters.messages_out += 1;
                self.actions.push(Action::Send(
                    conn,
                    ServerPacket::Publish {
                        pkid: 0,
                        dup: false,
                        message: out,
                    },
                ));
            }
            return;
        }
        if conn.is_none() && !session.persistent {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let window = receive_max.min(self.limits.max_inflight as usize);
        let offer = session.offer(
            seq,
            out.clone(),
            conn.is_some(),
            window,
            self.limits.max_queued as usize,
        );
        let persistent = session.persistent;
        match offer {
            Offer::Sent(pid) => {
                self.counters.messages_out += 1;
                if persistent {
                    let state = if qos == 1 {
                        OutState::AwaitAck
                    } else {
                        OutState::AwaitRec
                    };
                    self.store.push(StoreOp::PutMessage {
                        client_id: client_id.to_string(),
                        seq,
                        inflight: Some((pid, state)),
                        message: out.clone(),
                    });
                }
                if let Some(conn) = conn {
                    self.actions.push(Action::Send(
                        conn,
                        outbound_packet(Outbound::Publish {
                            pid,
                            dup: false,
                            message: out,
                        }),
                    ));
                }
            }
            Offer::Queued => {
                if persistent {
                    self.store.push(StoreOp::PutMessage {
                        client_id: client_id.to_string(),
                        seq,
                        inflight: None,
                        message: out,
                    });
                }
            }
            Offer::Dropped => self.counters.dropped += 1,
        }
    }

    fn deliver_to_actor(&mut self, address: &Arc<str>, qos: u8, message: &Message, retain: bool) {
        if message.expired(self.now) {
            return;
        }
        let out = Message {
            qos,
            retain,
            origin: None,
            ..message.clone()
        };
        if qos == 0 {
            self.counters.messages_out += 1;
            self.actions.push(Action::Notify {
                to: address.clone(),
                message: out,
                id: None,
                dup: false,
            });
            return;
        }
        let Some(q) = self.actor_subs.get_mut(address) else {
            return;
        };
        let id = self.next_seq;
        self.next_seq += 1;
        let window = actor_window(q, &self.limits);
        let offer = q.offer(id, out.clone(), window, self.limits.max_queued as usize);
        match offer {
            ActorOffer::Dropped => {
                self.counters.dropped += 1;
                return;
            }
            ActorOffer::Send => {
                self.counters.messages_out += 1;
                self.actions.push(Action::Notify {
                    to: address.clone(),
                    message: out.clone(),
                    id: Some(id),
                    dup: false,
                });
            }
            ActorOffer::Queued => {}
        }
        self.store.push(StoreOp::PutActorMessage {
            address: address.to_string(),
            id,
            message: out,
        });
    }

    fn pump(&mut self, client_id: &Arc<str>) {
        let Some(conn) = self.online.get(client_id).copied() else {
            return;
        };
        let window = self
            .conns
            .get(&conn)
            .map_or(usize::MAX, |c| c.receive_max)
            .min(self.limits.max_inflight as usize);
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let mut expired = Vec::new();
        let moved: Vec<InFlight> = s.pump(window, self.now, &mut expired);
        let persistent = s.persistent;
        if persistent {
            for seq in expired {
                self.store.push(StoreOp::DeleteMessage {
                    client_id: client_id.to_string(),
                    seq,
                });
            }
        }
        for f in moved {
            self.counters.messages_out += 1;
            if persistent {
                self.store.push(StoreOp::PutMessage {
                    client_id: client_id.to_string(),
                    seq: f.seq,
                    inflight: Some((f.pid, f.state)),
                    message: f.message.clone(),
                });
            }
            self.actions.push(Action::Send(
                conn,
                outbound_packet(Outbound::Publish {
                    pid: f.pid,
                    dup: false,
                    message: f.message,
                }),
            ));
        }
    }

    fn save_session(&mut self, client_id: &Arc<str>) {
        if let Some(s) = self.sessions.get(client_id)
            && s.persistent
        {
            self.store.push(StoreOp::SaveSession {
                client_id: client_id.to_string(),
                username: s.username.clone(),
                expiry: s.expiry,
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|(f, o)| (f.clone(), *o))
                    .collect(),
            });
        }
    }

    fn discard_session(&mut self, client_id: &Arc<str>) {
        let Some(old) = self.sessions.remove(client_id) else {
            return;
        };
        for raw in old.subscriptions.keys() {
            if let Some(f) = parse_filter(raw) {
                self.trie
                    .remove(f.filter, f.group, &Subscriber::Client(client_id.clone()));
            }
        }
        if old.persistent {
            self.store.push(StoreOp::DeleteSession {
                client_id: client_id.to_string(),
            });
        }
    }

    fn violation(&mut self, conn: ConnId, what: &str, code: DisconnectCode) {
        self.counters.protocol_errors += 1;
        info!(conn, "closing connection: {what}");
        self.drop_conn(conn, true);
        self.actions
            .push(Action::Send(conn, ServerPacket::Disconnect(code)));
        self.actions.push(Action::Close(conn));
    }

    fn publish_will(&mut self, client_id: &Arc<str>, username: Option<&str>, will: Message) {
        if self
            .policy
            .allows(username, client_id, Access::Write, &will.topic, false)
        {
            debug!(client_id = %client_id, topic = %will.topic, "publishing will");
            self.counters.messages_in += 1;
            self.route(will);
        } else {
            self.counters.denied += 1;
        }
    }

    fn drop_conn(&mut self, conn: ConnId, publish_will: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let username = self
            .sessions
            .get(&c.client_id)
            .and_then(|s| s.username.clone());
        let mut session_lives = false;
        if self.online.get(&c.client_id) == Some(&conn) {
            self.online.remove(&c.client_id);
            let now = self.now;
            if let Some(s) = self.sessions.get_mut(&c.client_id) {
                session_lives = s.expiry > 0;
                if s.expiry != u32::MAX {
                    s.expires_at = Some(now.saturating_add(u64::from(s.expiry)));
                }
            }
            if !session_lives {
                self.discard_session(&c.client_id);
            }
        }
        if publish_will && let Some((will, delay)) = c.will {
            if delay > 0 && session_lives {
                self.wills.push(PendingWill {
                    client_id: c.client_id.clone(),
                    username,
                    due: self.now + u64::from(delay),
                    message: will,
                });
            } else {
                self.publish_will(&c.client_id, username.as_deref(), will);
            }
        }
    }
}

fn outbound_packet(out: Outbound) -> ServerPacket {
    match out {
        Outbound::Publish { pid, dup, message } => ServerPacket::Publish {
            pkid: pid,
            dup,
            message,
        },
        Outbound::PubRel(pid) => ServerPacket::PubRel(pid),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

/// The in-flight window of an actor subscriber: what it asked for (1 to
/// [`super::ACTOR_WINDOW_MAX`]) or the broker's `max_inflight`.
fn actor_window(q: &ActorQueue, limits: &BrokerLimits) -> usize {
    match q.window {
        Some(w) => w.clamp(1, super::ACTOR_WINDOW_MAX) as usize,
        None => limits.max_inflight as usize,
    }
}
