//! The bridge: forwards topics between the local Colony broker and a far broker — another
//! Colony broker by address over the cluster's QUIC (`remote = "cloud/broker"`), or an external
//! MQTT broker by URL (`remote = "mqtts://host:8883"`) as an MQTT 5 client (or MQTT 3.1.1 with
//! `mqtt_version = "3.1.1"`) — without losing QoS 1/2 messages while the far side is away.
//!
//! Topic rules are Mosquitto's (see [`rules`]). Messages reach the bridge as reliable actor
//! subscriptions of Colony brokers (acknowledged only once spooled) or as MQTT publishes
//! (acknowledged only once spooled); QoS 1/2 ones go through the [`spool`] on disk and leave it
//! in order once the far side has them: a Colony broker acknowledges a publish once it is
//! committed, and drops a repeat of one it already has (each direction is a publish stream
//! numbered by the spool, and named after the spool file so that a spool made afresh starts a
//! stream of its own), so Colony to Colony forwarding is exactly once across restarts and
//! outages (into the far broker, and on to its actors and QoS 2 subscribers; a QoS 0/1 client
//! there gets its copy before the far broker's commit, so a crash of that node in between can
//! give it a repeat, as QoS 1 allows); an external broker acknowledges with PUBACK/PUBREC, and what was in flight when the
//! connection broke is sent again (at least once). While an external broker keeps up, the local
//! broker's messages go to it without the spool: the local broker holds each on disk until the
//! far broker has acknowledged it (see `Bridge::take`). QoS 0 messages are forwarded while the far
//! side is reachable and otherwise dropped (counted); while it is merely busy they wait, up to a
//! bound per direction, and only the oldest past it are dropped (counted).
//!
//! Loops: the bridge subscribes with no-local (its own publishes do not come back to it), and
//! every message carries the brokers it has been in (`hops`; an MQTT 5 user property
//! `colony-hops` on an external broker), so a message never goes back to a broker it has been in
//! — bridges in both directions, chains and rings forward each message a bounded number of times.
//! MQTT 3.1.1 has neither no-local nor properties: there the link recognises its own publishes
//! coming back (see the `link` module), and hops end at that broker.
//!
//! Connection state is published retained on `notification_topic` on the local broker and shown
//! in status with spool depth and drops, messages forwarded each way per second and reconnects.
//! Rules and spool bounds reload in place; the remote and its settings by restart.
//!
//! Messages ([`BridgeMessage`]): `status {}`.

mod actor;
mod link;
pub mod rules;
pub mod spool;

pub use actor::{by_qos, run};

use serde::{Deserialize, Serialize};

/// Settings a bridge applies without restarting.
pub const IN_PLACE: &[&str] = &[
    "topics",
    "spool_max_messages",
    "spool_max_bytes",
    "spool_max_age_secs",
];

/// What the bridge accepts from the control plane (broker notices aside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeMessage {
    /// Replies with the bridge's status detail.
    Status {},
}

/// The notices a bridge has unacknowledged on a broker, at most, that it asks for when it
/// subscribes: a few of its batches (it acknowledges a batch once it is spooled), so that the
/// broker keeps sending while the spool commits, whatever the broker's `limits.max_inflight`
/// for clients.
pub const NOTICE_WINDOW: u32 = 4 * actor::DRAIN as u32;

/// The MQTT 5 user property that carries a message's hops through an external broker.
pub const HOPS_PROPERTY: &str = "colony-hops";

/// A reconnect delay between `d / 2` and `d`, so that bridges cut off together do not all
/// come back at the same instant (both Colony lanes and the external MQTT link use it).
fn jittered(d: std::time::Duration) -> std::time::Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}
