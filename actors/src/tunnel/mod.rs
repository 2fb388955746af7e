//! The tunnel: IP packets between a TUN device and peer tunnel actors, over QUIC datagrams.
//!
//! A tunnel actor is an `endpoint` or a `router`. Each owns a real TUN device (name, IPv4 and
//! IPv6 address from the config or from a pool — see [`colony_config::tunnel`] —, MTU 1400 by
//! default, routes). Packets travel as datagrams on the cluster's mutually authenticated QUIC
//! links, addressed to the peer tunnel actor, in a small [`frame`]; there are no pre-shared keys.
//!
//! An endpoint keeps tunnels to (up to) two routers at once, probes both every
//! `probe_interval_ms` (20 ms by default), declares one dead after `dead_after` missed probes and
//! moves traffic to the other; a recovered path is taken back only after `recovery_hold_ms`
//! ([`path`]). With a `balancer` it prefers the balancer's router unless that tunnel is
//! unhealthy. In `redundant` mode every packet goes on both tunnels and the two routers see to
//! it that it leaves once: the standby router holds its copy until the active one says it sent
//! it, and sends it itself when no word comes (the active one died) — see [`dedup`] and the
//! router. Frames carry the sender's epoch and sequence number ([`frame`]) for this.
//!
//! A router enables IP forwarding (back to its earlier value when the namespace's last router
//! stops), source-NATs forwarded traffic on `egress` when set (removed when it stops), answers probes, sends each packet for a tunnel address back to the endpoint
//! that owns it, and reports CPU, memory, bandwidth and active tunnels to its `balancer` every
//! `report_interval_secs`.
//!
//! A packet that does not fit in a datagram gets the ICMP/ICMPv6 "too big" answer ([`packet`]).
//! Untrusted datagrams and packets are checked and counted, never trusted.
//!
//! Messages ([`TunnelMessage`]): `routing_decision` (pushed by the balancer) and `status`.
//! `probe_interval_ms`, `dead_after`, `recovery_hold_ms`, `redundant` and `report_interval_secs`
//! reload in place; the device, addresses, routes, peers and NAT by restart. The actor fails to
//! start when the device cannot be created or configured (not root, no /dev/net/tun).

pub mod dedup;
mod device;
mod endpoint;
pub mod frame;
pub mod packet;
pub mod path;
mod router;

use colony_config::ActorSettings;
use colony_config::kinds::{TunnelRole, TunnelSettings};
use colony_config::tunnel::TunnelAddresses;
use serde::{Deserialize, Serialize};

use crate::balancer::core::RoutingDecision;
use crate::host::{ActorContext, ActorFailure};

/// What a tunnel accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelMessage {
    /// The balancer's choice of router for this endpoint (the same encoding as
    /// [`crate::balancer::EndpointNotice`]).
    RoutingDecision(RoutingDecision),
    /// Replies with the tunnel's status detail.
    Status {},
}

/// Settings that change without a restart.
pub const IN_PLACE: &[&str] = &[
    "probe_interval_ms",
    "dead_after",
    "recovery_hold_ms",
    "redundant",
    "report_interval_secs",
];

/// Runs a tunnel actor until it is told to stop.
pub async fn run(mut ctx: ActorContext) -> Result<(), ActorFailure> {
    let ActorSettings::Tunnel(settings) = ctx.settings() else {
        return Err(ActorFailure::new(
            "tunnel started with another kind's settings",
        ));
    };
    match settings.role {
        TunnelRole::Endpoint => endpoint::run(ctx, settings).await,
        TunnelRole::Router => router::run(ctx, settings).await,
    }
}

fn tunnel_addresses(ctx: &ActorContext) -> Result<TunnelAddresses, ActorFailure> {
    colony_config::tunnel::tunnel_addresses(&ctx.config, &ctx.address).map_err(ActorFailure::new)
}

/// The configured device name, or `col-` and the actor's name (at most 15 bytes).
fn device_name(ctx: &ActorContext, settings: &TunnelSettings) -> String {
    settings.device.clone().unwrap_or_else(|| {
        let mut name = format!("col-{}", ctx.address.actor());
        while name.len() > 15 {
            name.pop();
        }
        name
    })
}

/// A random, non-zero number for this run of a tunnel actor (see [`frame`]): a restarted actor
/// draws a new one, so its peers know its sequence numbers start again.
fn new_epoch() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() as u32).max(1)
}

/// Aborts a task when dropped, so a stopping actor leaves nothing behind.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
