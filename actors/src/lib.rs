//! Colony's kinds of actor: broker, bridge, tunnel, sensor group, balancer, collector.
//!
//! Each kind is a module with a pure core (no I/O, no clock: it takes events and `now` and
//! returns decisions) and a thin actor around it that owns the mailbox, timers and sockets. The
//! runtime hosts every kind the same way, through [`run`] and an [`ActorContext`]; what a kind
//! needs of the rest of the cluster it reaches by address through the context's cluster handle.
//!
//! This crate knows nothing of supervision, processes or the control socket: an actor returns
//! `Err` (or panics) when it fails and its supervisor decides what happens next.

pub mod balancer;
pub mod bridge;
pub mod broker;
mod checkpoint;
pub mod collector;
pub mod host;
pub mod mqtt_client;
pub mod notice_ids;
pub mod reading;
pub mod sensor_group;
pub mod tunnel;

use colony_config::ActorKind;
use futures::future::BoxFuture;

pub use host::{ActorContext, ActorEnv, ActorEvent, ActorFailure, ActorStats, StartSignal};

/// True when this build can host `kind`. Kinds arrive one by one; a config that places an
/// unavailable kind on a node is refused when that node starts.
pub fn is_available(kind: ActorKind) -> bool {
    matches!(
        kind,
        ActorKind::Balancer
            | ActorKind::Bridge
            | ActorKind::Broker
            | ActorKind::Collector
            | ActorKind::SensorGroup
            | ActorKind::Tunnel
    )
}

/// Runs the actor described by the context's settings until it stops or fails.
pub fn run(mut ctx: ActorContext) -> BoxFuture<'static, Result<(), ActorFailure>> {
    match ctx.settings().kind() {
        ActorKind::Balancer => Box::pin(balancer::run(ctx)),
        ActorKind::Bridge => Box::pin(bridge::run(ctx)),
        ActorKind::Broker => Box::pin(broker::run(ctx)),
        ActorKind::Collector => Box::pin(collector::run(ctx)),
        ActorKind::SensorGroup => Box::pin(sensor_group::run(ctx)),
        ActorKind::Tunnel => Box::pin(tunnel::run(ctx)),
    }
}

/// True when a change of `fields` in an actor of `kind` can be applied without restarting it.
pub fn changes_in_place(kind: ActorKind, fields: &[String]) -> bool {
    let in_place: &[&str] = match kind {
        ActorKind::Balancer => &[
            "weights",
            "anti_flap_threshold",
            "anti_flap_hold_secs",
            "report_interval_secs",
            "max_bandwidth_mbps",
            "max_connections",
        ],
        ActorKind::Bridge => bridge::IN_PLACE,
        ActorKind::Broker => &["users", "acl", "allow_anonymous", "limits"],
        ActorKind::Collector => &["batch_size", "flush_ms", "format"],
        ActorKind::SensorGroup => sensor_group::IN_PLACE,
        ActorKind::Tunnel => tunnel::IN_PLACE,
    };
    fields.iter().all(|f| in_place.contains(&f.as_str()))
}

/// The message that ends child `child` of an actor of `kind` (a connection the actor reports as
/// its child), for `colony ctl kill|stop|restart NODE/ACTOR/CHILD`; `None` when the kind has no
/// children that can be ended. A broker's child is a client connection: it is cut off (its will
/// is published) and the client may connect again, as a supervised child restarts.
pub fn end_child_message(kind: ActorKind, child: &str) -> Option<Vec<u8>> {
    match kind {
        ActorKind::Broker => colony_cluster::encode_body(&broker::BrokerMessage::Disconnect {
            client_id: child.to_owned(),
        })
        .ok(),
        _ => None,
    }
}

/// Turns `message` (JSON, as an operator writes it) into the body `kind` accepts: it must be
/// one of the kind's messages, and is encoded as that type so that, say, a whole number is
/// accepted where the kind expects a float.
pub fn encode_message(kind: ActorKind, message: &serde_json::Value) -> Result<Vec<u8>, String> {
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
        message: &serde_json::Value,
    ) -> Result<Vec<u8>, String> {
        let typed: T = serde_json::from_value(message.clone()).map_err(|e| e.to_string())?;
        colony_cluster::encode_body(&typed).map_err(|e| e.to_string())
    }
    let result = match kind {
        ActorKind::Balancer => typed::<balancer::BalancerMessage>(message),
        ActorKind::Bridge => typed::<bridge::BridgeMessage>(message),
        ActorKind::Broker => typed::<broker::BrokerMessage>(message),
        ActorKind::Collector => typed::<collector::CollectorMessage>(message),
        ActorKind::SensorGroup => typed::<sensor_group::SensorGroupMessage>(message),
        ActorKind::Tunnel => typed::<tunnel::TunnelMessage>(message),
    };
    result.map_err(|e| format!("not a {kind} message: {e}"))
}
