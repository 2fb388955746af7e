//! The broker: an MQTT 3.1.1 and MQTT 5 broker for real clients over TCP and TLS, that actors can
//! subscribe to and publish into by address.
//!
//! Clients connect on any of the configured listeners (plain TCP, or TLS optionally requiring a
//! client certificate from `client_ca`). Each connection is its own task under the broker actor:
//! a client that breaks the protocol, sends an oversize packet or goes silent past its keepalive
//! is cut off and nobody else notices; a connection whose task panics is cut off the same way and
//! counted (`connection_panics`). The connections are the broker's children: status lists them
//! (`children`, the first 100 by client id, and `children_total`) as `node/broker/<client-id>`,
//! which `colony ctl tree` shows under the broker, and `disconnect {client_id}` cuts one off.
//! Logins check argon2 password hashes (anonymous clients only with `allow_anonymous = true`); ACL
//! rules with `%u`/`%c` decide who may publish and subscribe where. Failed logins and ACL denials
//! are logged without secrets and counted in status.
//!
//! QoS 0, 1 and 2 work end to end with per-client in-flight windows (`limits.max_inflight`) and
//! queues (`limits.max_queued`; QoS 0 messages for a client that reads too slowly wait in the same
//! bound and are dropped and counted as `dropped` beyond it); retained messages, wills,
//! `$share/group/filter` subscriptions and
//! `$SYS/broker/...` statistics are there. Persistent sessions (clean session off), their queued
//! and in-flight QoS 1/2 messages, retained messages and actor subscriptions live in SQLite in the
//! actor's data directory (`broker.sqlite`), written before the packets that depend on them go
//! out, so they survive client disconnects and the broker actor's restart or kill.
//!
//! Messages ([`BrokerMessage`]): `subscribe {filters, qos, no_local}` (the sender, or
//! `subscriber`, then receives a [`BrokerNotice::Publish`] for every matching publish; the reply
//! is the granted QoS per filter, `null` for an invalid one), `unsubscribe {filters}` (all when
//! empty), `publish {topic, payload, qos, retain, hops, stream}`, `ack {ids}`,
//! `disconnect {client_id}` (cut one client off) and `status {}`.
//!
//! Actor subscriptions are reliable at QoS 1 and 2: each notice carries an `id`, stays in the
//! store until the subscriber sends `ack {ids}`, at most `limits.max_inflight` are unacknowledged
//! per subscriber unless it asked for its own `window` when subscribing (at most
//! [`ACTOR_WINDOW_MAX`]; a collector asks for a few of its batches) (up to `limits.max_queued` more wait; beyond that they are dropped and counted),
//! and unacknowledged ones go again, in order and marked `dup`, when the subscriber subscribes
//! again and after a few seconds. Subscriptions, queues and what is in flight survive the broker
//! actor's restart. Subscriptions the config implies (collectors with `via = "actor"`,
//! [`declared`]) are created when the broker starts, so nothing published before a subscriber
//! first runs is lost. `no_local` keeps an actor's own publishes (the envelope's sender is the
//! origin) from coming back to it; `hops` pass through untouched for bridges. A publish with a
//! `stream {id, seq}` is exactly-once: the highest seq per stream is kept on disk and a publish at
//! or below it is acknowledged but not routed again. Called at QoS 1 or 2, the reply to a publish
//! comes after the batch holding it is committed.
//!
//! Users, ACL rules, `allow_anonymous` and limits reload in place; listeners need a restart. A
//! listener that cannot be bound, or TLS files that do not load, fail the start. The store
//! failing fails the actor (its supervisor restarts it; sessions come back from disk).
//!
//! MQTT 5 runs on the same listeners as 3.1.1 (the CONNECT's protocol level decides, per
//! connection): properties are forwarded (user properties, content type, response topic,
//! correlation data, payload format), acknowledgements carry reason codes (not authorised, no
//! matching subscribers, invalid filter, no subscription existed, bad login...), sessions expire
//! after their session expiry interval, messages after their message expiry interval (and are
//! delivered with the time they have left), wills wait out their delay, topic aliases (up to
//! [`codec::TOPIC_ALIAS_MAX`]) are resolved per connection, and subscriptions take no-local,
//! retain-as-published, retain handling and subscription identifiers; receive maximum and maximum
//! packet size from the client are respected. A client that breaks the protocol gets a DISCONNECT
//! with the reason before it is closed. 3.1.1 and 5 clients share topics and sessions; MQTT 3.1
//! (level 3) is refused with "unacceptable protocol version". Not supported: MQTT 5 enhanced
//! authentication (AUTH; refused with "bad authentication method") and server-to-client topic
//! aliases.
//!
//! The logic is in pure modules: [`topic`] (filters and the subscription trie), [`session`]
//! (in-flight windows and queues), [`actor_queue`] (actor subscribers' reliable queues),
//! [`retained`], [`auth`] (passwords and ACLs), [`packet`] (the protocol-neutral model),
//! [`core`] (the protocol state machine) and [`codec`] (MQTT 3.1.1 and 5 with rumqttc's
//! `mqttbytes`); [`store`] is the SQLite file and [`listener`] the sockets.

mod actor;
pub mod actor_queue;
pub mod auth;
pub mod codec;
pub mod core;
pub mod declared;
pub mod listener;
pub mod packet;
pub mod retained;
pub mod session;
pub mod store;
pub mod topic;

pub use actor::run;
pub use auth::hash_password;

use colony_cluster::Address;
use serde::{Deserialize, Serialize};

/// Where a forwarder's publish sits in its stream, for exactly-once ingress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishStream {
    /// The stream (one per forwarder and source, stable across its restarts).
    pub id: String,
    /// Increases with every publish on the stream.
    pub seq: u64,
}

/// The largest in-flight window an actor subscriber may ask for in
/// [`BrokerMessage::Subscribe`]: larger requests get this many. The notices in flight are held in
/// the broker's memory (and store) until acknowledged.
pub const ACTOR_WINDOW_MAX: u32 = 65_536;

/// What the broker accepts from other actors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMessage {
    /// Subscribe the sender (or `subscriber`) to `filters`; matching publishes arrive as
    /// [`BrokerNotice::Publish`]. Replies with the granted QoS per filter (`None` if invalid).
    /// At QoS 1 or 2 notices carry an `id` to [`BrokerMessage::Ack`]; a subscribe also says the
    /// subscriber (re)started, and what it has not acknowledged is sent again.
    Subscribe {
        /// Topic filters, wildcards and `$share/group/...` allowed.
        filters: Vec<String>,
        /// Maximum QoS wanted.
        #[serde(default)]
        qos: u8,
        /// Who receives the notices, when not the sender.
        #[serde(default)]
        subscriber: Option<Address>,
        /// Publishes sent by the subscriber itself are not delivered to it.
        #[serde(default)]
        no_local: bool,
        /// The most QoS 1/2 notices unacknowledged at a time this subscriber wants (at most
        /// [`ACTOR_WINDOW_MAX`]); `None` for the broker's `limits.max_inflight`. A subscriber
        /// that acknowledges in batches asks for a few batches, so that the broker keeps sending
        /// while it commits.
        #[serde(default)]
        window: Option<u32>,
    },
    /// Removes the sender's (or `subscriber`'s) subscriptions to `filters`, or all when empty.
    Unsubscribe {
        /// Topic filters as subscribed.
        #[serde(default)]
        filters: Vec<String>,
        /// Whose subscriptions, when not the sender's.
        #[serde(default)]
        subscriber: Option<Address>,
    },
    /// Publishes into the broker as a client would. Called at QoS 1 or 2, the reply comes once
    /// the message (and the stream's mark) is committed to disk.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload (bytes; a string in JSON).
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// QoS 0, 1 or 2.
        #[serde(default)]
        qos: u8,
        /// Retain flag.
        #[serde(default)]
        retain: bool,
        /// Bridges the message has passed through; handed to actor subscribers untouched.
        #[serde(default)]
        hops: Vec<String>,
        /// The publish's place in a forwarder's stream: one already accepted is acknowledged
        /// but not delivered again.
        #[serde(default)]
        stream: Option<PublishStream>,
    },
    /// The subscriber acknowledges notices (their `id`s).
    Ack {
        /// Notice ids.
        ids: Vec<u64>,
        /// Whose notices, when not the sender's.
        #[serde(default)]
        subscriber: Option<Address>,
    },
    /// Cuts off the client connection `client_id` (its will is published, its session kept as
    /// its expiry says); replies whether it was connected.
    Disconnect {
        /// The client id.
        client_id: String,
    },
    /// Replies with the broker's status (the detail `colony ctl status` shows, and the actor
    /// subscriptions).
    Status {},
}

/// What the broker sends an actor subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerNotice {
    /// A publish matching one of the actor's filters.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// QoS (the lower of the publish and the subscription).
        qos: u8,
        /// True for a retained message sent on subscribing.
        retain: bool,
        /// At QoS 1 and 2: the id to acknowledge with [`BrokerMessage::Ack`]; the broker keeps
        /// the message (on disk) and sends it again until then.
        #[serde(default)]
        id: Option<u64>,
        /// Sent before (a redelivery).
        #[serde(default)]
        dup: bool,
        /// Bridges the message has passed through.
        #[serde(default)]
        hops: Vec<String>,
    },
}

impl BrokerNotice {
    /// The id to acknowledge, if any.
    pub fn id(&self) -> Option<u64> {
        let BrokerNotice::Publish { id, .. } = self;
        *id
    }

    /// The notice for `message`, with its id when it must be acknowledged.
    pub fn publish(m: session::Message, id: Option<u64>, dup: bool) -> Self {
        BrokerNotice::Publish {
            topic: m.topic,
            payload: m.payload.to_vec(),
            qos: m.qos,
            retain: m.retain,
            id,
            dup,
            hops: m.hops,
        }
    }
}
