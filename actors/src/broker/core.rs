//! The broker's deterministic core: connections, sessions, subscriptions, routing.
//!
//! [`BrokerCore`] takes events — a client's CONNECT, each packet after it, the end of a
//! connection, an actor's subscribe or publish — and answers with [`Action`]s (packets to send,
//! connections to close, notices for actor subscribers) and [`StoreOp`]s (what must be written to
//! disk so persistent sessions and retained messages survive a restart). It owns no socket, task or
//! file; the actor shell carries the actions out.
//!
//! Rules it keeps (MQTT 3.1.1): the first packet is CONNECT and there is only one; a client id
//! already connected is taken over (the old connection is closed); clean sessions end with their
//! connection, persistent ones keep subscriptions and QoS 1/2 messages while offline; a will is
//! published when a connection ends without DISCONNECT; delivered QoS is the lower of publish and
//! subscription; QoS 2 from clients is routed once per packet id until PUBREL; retained messages
//! go to new subscriptions; one member of each `$share` group receives each message, round-robin.
//! A protocol violation closes only the offending connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use colony_config::kinds::BrokerLimits;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use tracing::{debug, info, warn};

use super::actor_queue::{ActorOffer, ActorQueue, Pending};
use super::auth::{Access, AccessPolicy, LoginRefusal};
use super::retained::{RetainChange, RetainedStore};
pub use super::session::Subscriber;
use super::session::{Ack, AckOutcome, InFlight, Message, Offer, OutState, Outbound, Session};
use super::topic::{SubOptions, SubscriptionTrie, is_valid_topic_name, parse_filter};

/// A connection's id, unique for the life of the broker actor.
pub type ConnId = u64;

/// Ticks (of the broker's one-second clock) after which an unacknowledged notice to an actor
/// subscriber is sent again.
pub const ACTOR_REDELIVER_TICKS: u32 = 3;

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
    Send(ConnId, Packet),
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

/// A change to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// A persistent session's subscriptions (created or changed).
    SaveSession {
        /// Client id.
        client_id: String,
        /// Username it last connected with.
        username: Option<String>,
        /// Raw filters and QoS.
        subscriptions: Vec<(String, u8)>,
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
    /// An actor acknowledged a notice.
    DeleteActorMessage {
        /// Actor address.
        address: String,
        /// The notice's id.
        id: u64,
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
    will: Option<Message>,
}

/// The broker's state.
pub struct BrokerCore {
    sessions: HashMap<Arc<str>, Session>,
    conns: HashMap<ConnId, Conn>,
    online: HashMap<Arc<str>, ConnId>,
    trie: SubscriptionTrie<Subscriber>,
    actor_subs: BTreeMap<Arc<str>, ActorQueue>,
    streams: HashMap<String, u64>,
    saved_seq: u64,
    retained: RetainedStore,
    policy: AccessPolicy,
    limits: BrokerLimits,
    next_seq: u64,
    share_cursor: HashMap<(String, String), usize>,
    counters: Counters,
    actions: Vec<Action>,
    store: Vec<StoreOp>,
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
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
            saved_seq: restored.next_seq.max(1),
            retained: RetainedStore::new(),
            policy,
            limits,
            next_seq: restored.next_seq.max(1),
            share_cursor: HashMap::new(),
            counters: Counters::default(),
            actions: Vec::new(),
            store: Vec::new(),
        };
        for (id, session) in restored.sessions {
            let id: Arc<str> = id.into();
            for (raw, qos) in &session.subscriptions {
                if let Some(f) = parse_filter(raw) {
                    core.trie
                        .insert(f.filter, f.group, Subscriber::Client(id.clone()), *qos);
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
        if self.next_seq != self.saved_seq && !self.store.is_empty() {
            self.saved_seq = self.next_seq;
            self.store.push(StoreOp::NextSeq(self.next_seq));
        }
        std::mem::take(&mut self.store)
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

    /// A client's CONNECT, the first packet of connection `conn`.
    pub fn connect(&mut self, conn: ConnId, connect: Connect) {
        let refuse = |core: &mut Self, code| {
            core.actions.push(Action::Send(
                conn,
                Packet::ConnAck(ConnAck::new(code, false)),
            ));
            core.actions.push(Action::Close(conn));
        };
        if self.conns.contains_key(&conn) {
            return self.violation(conn, "second CONNECT");
        }
        if self.conns.len() >= self.limits.max_connections as usize {
            warn!(client_id = %connect.client_id, "connection refused: max_connections reached");
            return refuse(self, ConnectReturnCode::ServiceUnavailable);
        }
        let username = connect.login.as_ref().map(|l| l.username.clone());
        let password = connect.login.as_ref().map(|l| l.password.as_bytes());
        if let Err(why) = self.policy.login(username.as_deref(), password) {
            self.counters.auth_failures += 1;
            warn!(
                client_id = %connect.client_id,
                username = username.as_deref().unwrap_or(""),
                reason = ?why,
                "login refused"
            );
            let code = match why {
                LoginRefusal::AnonymousNotAllowed => ConnectReturnCode::NotAuthorized,
                LoginRefusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
            };
            return refuse(self, code);
        }
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if !connect.clean_session {
                return refuse(self, ConnectReturnCode::BadClientId);
            }
            format!("colony-auto-{conn}").into()
        } else {
            connect.client_id.as_str().into()
        };
        let will = match connect.last_will {
            Some(w) if !is_valid_topic_name(&w.topic) => {
                return self.violation(conn, "invalid will topic");
            }
            Some(w) => Some(Message {
                origin: Some(Subscriber::Client(client_id.clone())),
                ..Message::new(w.topic, w.message, w.qos as u8, w.retain)
            }),
            None => None,
        };
        if let Some(old) = self.online.get(&client_id).copied() {
            info!(client_id = %client_id, "client id taken over by a new connection");
            self.actions.push(Action::Close(old));
            self.drop_conn(old, true);
        }
        let mut session_present = false;
        if connect.clean_session {
            self.discard_session(&client_id);
            self.sessions
                .insert(client_id.clone(), Session::new(false, username.clone()));
        } else {
            match self.sessions.get_mut(&client_id) {
                Some(s) if s.persistent => {
                    session_present = true;
                    s.username = username.clone();
                }
                _ => {
                    self.discard_session(&client_id);
                    self.sessions
                        .insert(client_id.clone(), Session::new(true, username.clone()));
                }
            }
            self.save_session(&client_id);
        }
        self.conns.insert(
            conn,
            Conn {
                client_id: client_id.clone(),
                will,
            },
        );
        self.online.insert(client_id.clone(), conn);
        self.counters.connects += 1;
        debug!(client_id = %client_id, session_present, "client connected");
        self.actions.push(Action::Send(
            conn,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
        ));
        if session_present && let Some(s) = self.sessions.get(&client_id) {
            for out in s.resend() {
                let p = outbound_packet(out);
                self.actions.push(Action::Send(conn, p));
            }
            self.pump(&client_id);
        }
    }

    /// A packet after CONNECT on `conn`.
    pub fn packet(&mut self, conn: ConnId, packet: Packet) {
        let Some(client_id) = self.conns.get(&conn).map(|c| c.client_id.clone()) else {
            // Not connected (refused, taken over or closed): ignore what is still in flight.
            return;
        };
        match packet {
            Packet::Connect(_) => self.violation(conn, "second CONNECT"),
            Packet::Publish(p) => self.client_publish(conn, &client_id, p),
            Packet::PubAck(a) => self.client_ack(&client_id, Ack::PubAck(a.pkid)),
            Packet::PubRec(a) => self.client_ack(&client_id, Ack::PubRec(a.pkid)),
            Packet::PubComp(a) => self.client_ack(&client_id, Ack::PubComp(a.pkid)),
            Packet::PubRel(r) => {
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.release_qos2(r.pkid);
                }
                self.actions
                    .push(Action::Send(conn, Packet::PubComp(PubComp::new(r.pkid))));
            }
            Packet::Subscribe(sub) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                let mut granted = Vec::new();
                for f in sub.filters {
                    let qos = f.qos as u8;
                    match self.subscribe_client(&client_id, &f.path, qos) {
                        Some(q) => {
                            codes.push(SubscribeReasonCode::Success(qos_of(q)));
                            granted.push((f.path, q));
                        }
                        None => codes.push(SubscribeReasonCode::Failure),
                    }
                }
                self.actions.push(Action::Send(
                    conn,
                    Packet::SubAck(SubAck::new(sub.pkid, codes)),
                ));
                self.save_session(&client_id);
                for (filter, qos) in granted {
                    self.send_retained(&Subscriber::Client(client_id.clone()), &filter, qos);
                }
            }
            Packet::Unsubscribe(u) => {
                for raw in &u.topics {
                    if let Some(s) = self.sessions.get_mut(&client_id) {
                        s.subscriptions.remove(raw);
                    }
                    if let Some(f) = parse_filter(raw) {
                        self.trie
                            .remove(f.filter, f.group, &Subscriber::Client(client_id.clone()));
                    }
                }
                self.save_session(&client_id);
                self.actions
                    .push(Action::Send(conn, Packet::UnsubAck(UnsubAck::new(u.pkid))));
            }
            Packet::PingReq => self.actions.push(Action::Send(conn, Packet::PingResp)),
            Packet::Disconnect => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.will = None;
                }
                self.drop_conn(conn, false);
                self.actions.push(Action::Close(conn));
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.violation(conn, "server-only packet from a client")
            }
        }
    }

    /// Connection `conn` ended (socket closed, error, keepalive timeout). Publishes its will
    /// unless it sent DISCONNECT. Does nothing for a connection already dropped.
    pub fn closed(&mut self, conn: ConnId) {
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
            self.trie
                .insert(f.filter, f.group, Subscriber::Actor(address.clone()), opts);
            self.actor_subs
                .entry(address.clone())
                .or_default()
                .filters
                .insert(raw.clone(), opts);
            self.store.push(StoreOp::PutActorSubscription {
                address: address.to_string(),
                filter: raw.clone(),
                qos: opts.qos,
                no_local: opts.no_local,
            });
            out.push(Some(opts.qos));
            fresh.push(raw.clone());
        }
        self.pump_actor(&address);
        for raw in fresh {
            self.send_retained(&Subscriber::Actor(address.clone()), &raw, opts.qos);
        }
        out
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
            self.trie
                .insert(f.filter, f.group, Subscriber::Actor(address.clone()), opts);
            self.actor_subs
                .entry(address.clone())
                .or_default()
                .filters
                .insert(raw.clone(), opts);
            self.store.push(StoreOp::PutActorSubscription {
                address: address.to_string(),
                filter: raw.clone(),
                qos: opts.qos,
                no_local: opts.no_local,
            });
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

    /// An actor acknowledges notices by id; the next queued ones go out.
    pub fn actor_ack(&mut self, address: &str, ids: &[u64]) {
        let Some(q) = self.actor_subs.get_mut(address) else {
            return;
        };
        let address: Arc<str> = address.into();
        for &id in ids {
            if q.ack(id) {
                self.store.push(StoreOp::DeleteActorMessage {
                    address: address.to_string(),
                    id,
                });
            }
        }
        self.pump_actor(&address);
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
        if let Some((id, seq)) = stream {
            if self.streams.get(&id).is_some_and(|&hw| seq <= hw) {
                return ActorPublish::Duplicate;
            }
            self.streams.insert(id.clone(), seq);
            self.store.push(StoreOp::PutStream { id, seq });
        }
        self.counters.messages_in += 1;
        self.route(message);
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
        for p in q.pump(self.limits.max_inflight as usize) {
            self.counters.messages_out += 1;
            self.notify(address, p);
        }
    }

    /// Publishes a broker statistic on `$SYS/...`, retained and not persisted.
    pub fn publish_sys(&mut self, topic: &str, value: String) {
        self.route(Message::new(topic, Bytes::from(value), 0, true));
    }

    fn client_publish(&mut self, conn: ConnId, client_id: &Arc<str>, p: Publish) {
        if !is_valid_topic_name(&p.topic) {
            return self.violation(conn, "invalid topic name in PUBLISH");
        }
        self.counters.messages_in += 1;
        let qos = p.qos as u8;
        let mut route = true;
        if qos == 2 {
            route = self
                .sessions
                .get_mut(client_id)
                .is_none_or(|s| s.receive_qos2(p.pkid));
        }
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
                self.route(Message {
                    origin: Some(Subscriber::Client(client_id.clone())),
                    ..Message::new(p.topic, p.payload, qos, p.retain)
                });
            } else {
                self.counters.denied += 1;
                info!(client_id = %client_id, topic = %p.topic, "publish denied by ACL");
            }
        }
        match qos {
            1 => self
                .actions
                .push(Action::Send(conn, Packet::PubAck(PubAck::new(p.pkid)))),
            2 => self
                .actions
                .push(Action::Send(conn, Packet::PubRec(PubRec::new(p.pkid)))),
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
                        .push(Action::Send(conn, Packet::PubRel(PubRel::new(pid))));
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

    fn subscribe_client(&mut self, client_id: &Arc<str>, raw: &str, qos: u8) -> Option<u8> {
        let f = parse_filter(raw)?;
        let username = self.sessions.get(client_id)?.username.clone();
        if !self
            .policy
            .allows(username.as_deref(), client_id, Access::Read, f.filter, true)
        {
            self.counters.denied += 1;
            info!(client_id = %client_id, filter = %raw, "subscription denied by ACL");
            return None;
        }
        self.trie.insert(
            f.filter,
            f.group,
            Subscriber::Client(client_id.clone()),
            qos,
        );
        self.sessions
            .get_mut(client_id)?
            .subscriptions
            .insert(raw.to_owned(), qos);
        Some(qos)
    }

    fn send_retained(&mut self, to: &Subscriber, raw: &str, qos: u8) {
        let Some(f) = parse_filter(raw) else { return };
        if f.group.is_some() {
            return; // Shared subscriptions get no retained messages.
        }
        for m in self.retained.matching(f.filter) {
            let q = m.qos.min(qos);
            self.deliver(to, q, &m, true);
        }
    }

    fn route(&mut self, message: Message) {
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
        for m in matches.direct {
            if m.no_local && message.origin.as_ref() == Some(&m.key) {
                continue;
            }
            let retain = m.retain_as_published && message.retain;
            self.deliver(&m.key, message.qos.min(m.qos), &message, retain);
        }
        for (group, members) in matches.shared {
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
            self.deliver(&m.key.clone(), message.qos.min(m.qos), &message, false);
        }
    }

    fn deliver(&mut self, to: &Subscriber, qos: u8, message: &Message, retain: bool) {
        let client_id = match to {
            Subscriber::Actor(address) => {
                return self.deliver_to_actor(address, qos, message, retain);
            }
            Subscriber::Client(id) => id,
        };
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
        let out = Message {
            qos,
            retain,
            ..message.clone()
        };
        if qos == 0 {
            if let Some(conn) = conn {
                self.counters.messages_out += 1;
                self.actions.push(Action::Send(
                    conn,
                    Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain,
                        topic: out.topic,
                        pkid: 0,
                        payload: out.payload,
                    }),
                ));
            }
            return;
        }
        if conn.is_none() && !session.persistent {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let offer = session.offer(
            seq,
            out.clone(),
            conn.is_some(),
            self.limits.max_inflight as usize,
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
        let offer = q.offer(
            id,
            out.clone(),
            self.limits.max_inflight as usize,
            self.limits.max_queued as usize,
        );
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
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let moved: Vec<InFlight> = s.pump(self.limits.max_inflight as usize);
        let persistent = s.persistent;
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
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|(f, q)| (f.clone(), *q))
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

    fn violation(&mut self, conn: ConnId, what: &str) {
        self.counters.protocol_errors += 1;
        info!(conn, "closing connection: {what}");
        self.drop_conn(conn, true);
        self.actions.push(Action::Close(conn));
    }

    fn drop_conn(&mut self, conn: ConnId, publish_will: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let username = self
            .sessions
            .get(&c.client_id)
            .and_then(|s| s.username.clone());
        if self.online.get(&c.client_id) == Some(&conn) {
            self.online.remove(&c.client_id);
            if self
                .sessions
                .get(&c.client_id)
                .is_some_and(|s| !s.persistent)
            {
                self.discard_session(&c.client_id);
            }
        }
        if publish_will && let Some(will) = c.will {
            if self.policy.allows(
                username.as_deref(),
                &c.client_id,
                Access::Write,
                &will.topic,
                false,
            ) {
                debug!(client_id = %c.client_id, topic = %will.topic, "publishing will");
                self.counters.messages_in += 1;
                self.route(will);
            } else {
                self.counters.denied += 1;
            }
        }
    }
}

fn outbound_packet(out: Outbound) -> Packet {
    match out {
        Outbound::Publish { pid, dup, message } => Packet::Publish(Publish {
            dup,
            qos: qos_of(message.qos),
            retain: message.retain,
            topic: message.topic,
            pkid: pid,
            payload: message.payload,
        }),
        Outbound::PubRel(pid) => Packet::PubRel(PubRel::new(pid)),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
