//! The settings of each kind of actor.
//!
//! Each `[[actor]]` table has `name`, `node`, `kind`, an optional `restart` policy, and the keys of
//! its kind's settings struct below. Unknown keys are errors. Settings start small and grow with
//! each kind.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::address::Address;

/// The kinds of actor Colony hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// An MQTT broker.
    Broker,
    /// Forwards topics between two brokers.
    Bridge,
    /// Moves IP packets between a TUN device and peer tunnels.
    Tunnel,
    /// Runs simulated or real sensors.
    SensorGroup,
    /// Scores routers and answers routing decisions.
    Balancer,
    /// Stores readings in SQLite.
    Collector,
}

impl ActorKind {
    /// Every kind, in documentation order.
    pub const ALL: [ActorKind; 6] = [
        ActorKind::Broker,
        ActorKind::Bridge,
        ActorKind::Tunnel,
        ActorKind::SensorGroup,
        ActorKind::Balancer,
        ActorKind::Collector,
    ];

    /// The name used for `kind` in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Broker => "broker",
            ActorKind::Bridge => "bridge",
            ActorKind::Tunnel => "tunnel",
            ActorKind::SensorGroup => "sensor_group",
            ActorKind::Balancer => "balancer",
            ActorKind::Collector => "collector",
        }
    }

    /// The kind called `name` in the config.
    pub fn from_name(name: &str) -> Option<ActorKind> {
        ActorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for ActorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The settings of one actor, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ActorSettings {
    /// `kind = "broker"`.
    Broker(BrokerSettings),
    /// `kind = "bridge"`.
    Bridge(BridgeSettings),
    /// `kind = "tunnel"`.
    Tunnel(TunnelSettings),
    /// `kind = "sensor_group"`.
    SensorGroup(SensorGroupSettings),
    /// `kind = "balancer"`.
    Balancer(BalancerSettings),
    /// `kind = "collector"`.
    Collector(CollectorSettings),
}

impl ActorSettings {
    /// The kind these settings belong to.
    pub fn kind(&self) -> ActorKind {
        match self {
            ActorSettings::Broker(_) => ActorKind::Broker,
            ActorSettings::Bridge(_) => ActorKind::Bridge,
            ActorSettings::Tunnel(_) => ActorKind::Tunnel,
            ActorSettings::SensorGroup(_) => ActorKind::SensorGroup,
            ActorSettings::Balancer(_) => ActorKind::Balancer,
            ActorSettings::Collector(_) => ActorKind::Collector,
        }
    }

    /// Every actor address these settings refer to, with the key that names it and the kind the
    /// target must be (if any).
    pub fn references(&self) -> Vec<(&'static str, &Address, Option<ActorKind>)> {
        let mut refs = Vec::new();
        match self {
            ActorSettings::Broker(_) => {}
            ActorSettings::Bridge(b) => {
                refs.push(("local", &b.local, Some(ActorKind::Broker)));
                if let BridgeRemote::Actor(a) = &b.remote {
                    refs.push(("remote", a, Some(ActorKind::Broker)));
                }
            }
            ActorSettings::Tunnel(t) => {
                for p in &t.peers {
                    refs.push(("peers", p, Some(ActorKind::Tunnel)));
                }
                if let Some(b) = &t.balancer {
                    refs.push(("balancer", b, Some(ActorKind::Balancer)));
                }
            }
            ActorSettings::SensorGroup(s) => {
                if let Some(b) = &s.broker {
                    refs.push(("broker", b, Some(ActorKind::Broker)));
                }
                if let Some(c) = &s.collector {
                    refs.push(("collector", c, Some(ActorKind::Collector)));
                }
            }
            ActorSettings::Balancer(_) => {}
            ActorSettings::Collector(c) => {
                if let Some(b) = &c.source.broker {
                    refs.push(("source", b, Some(ActorKind::Broker)));
                }
            }
        }
        refs
    }

    /// The local sockets these settings listen on, with the key naming each.
    pub fn listen_addresses(&self) -> Vec<(&'static str, SocketAddr)> {
        match self {
            ActorSettings::Broker(b) => vec![("listen", b.listen)],
            ActorSettings::Collector(c) => {
                c.source.udp.map(|u| ("source", u)).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }
}

/// `kind = "broker"`: an MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// MQTT over TCP listen address.
    pub listen: SocketAddr,
}

/// Which way a bridge rule forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeDirection {
    /// Local to remote.
    Out,
    /// Remote to local.
    In,
    /// Both ways.
    Both,
}

/// One topic rule of a bridge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeRule {
    /// Topic filter, MQTT wildcards allowed.
    pub pattern: String,
    /// Which way it forwards.
    pub direction: BridgeDirection,
    /// QoS used on the far side (0, 1 or 2).
    #[serde(default)]
    pub qos: u8,
    /// Prefix on the local side.
    #[serde(default)]
    pub local_prefix: String,
    /// Prefix on the remote side.
    #[serde(default)]
    pub remote_prefix: String,
}

/// The far side of a bridge: a Colony broker by address, or an external broker by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeRemote {
    /// A Colony broker (`node/broker`), reached over the cluster.
    Actor(Address),
    /// An external broker (`mqtt://host:port` or `mqtts://host:port`).
    Url(String),
}

impl Serialize for BridgeRemote {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BridgeRemote::Actor(a) => a.serialize(s),
            BridgeRemote::Url(u) => s.serialize_str(u),
        }
    }
}

impl<'de> Deserialize<'de> for BridgeRemote {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.starts_with("mqtt://") || s.starts_with("mqtts://") {
            Ok(BridgeRemote::Url(s))
        } else {
            s.parse()
                .map(BridgeRemote::Actor)
                .map_err(serde::de::Error::custom)
        }
    }
}

/// `kind = "bridge"`: forwards topics between two brokers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    /// The local Colony broker.
    pub local: Address,
    /// The far broker.
    pub remote: BridgeRemote,
    /// Topic rules.
    pub topics: Vec<BridgeRule>,
}

/// A tunnel's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelRole {
    /// Keeps tunnels to routers.
    Endpoint,
    /// Forwards endpoint traffic to its networks.
    Router,
}

/// `kind = "tunnel"`: a TUN device joined to peer tunnels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSettings {
    /// Endpoint or router.
    pub role: TunnelRole,
    /// TUN device name.
    #[serde(default)]
    pub device: Option<String>,
    /// Device MTU.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Peer tunnels (an endpoint's routers, at most two).
    #[serde(default)]
    pub peers: Vec<Address>,
    /// The balancer an endpoint follows.
    #[serde(default)]
    pub balancer: Option<Address>,
}

fn default_mtu() -> u16 {
    1400
}

/// Where a sensor's readings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorSource {
    /// Simulated sensors publishing MQTT.
    #[default]
    Simulated,
    /// This host's metrics.
    Host,
    /// Network probes.
    Probe,
}

/// `kind = "sensor_group"`: N sensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorGroupSettings {
    /// Where readings come from.
    #[serde(default)]
    pub source: SensorSource,
    /// The Colony broker simulated sensors publish to.
    #[serde(default)]
    pub broker: Option<Address>,
    /// A collector host and probe sensors report to.
    #[serde(default)]
    pub collector: Option<Address>,
    /// Number of sensors (1 to 100,000).
    #[serde(default = "default_count")]
    pub count: u32,
    /// Interval between readings of one sensor, in milliseconds.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Topic template (`{id}`, `{group}`, `{node}`).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// QoS of published readings.
    #[serde(default)]
    pub qos: u8,
}

fn default_count() -> u32 {
    1
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_topic() -> String {
    "sensors/{node}/{group}/{id}".to_owned()
}

/// Scoring weights of the balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerWeights {
    /// Weight of CPU load.
    #[serde(default = "w_cpu")]
    pub cpu: f64,
    /// Weight of memory use.
    #[serde(default = "w_memory")]
    pub memory: f64,
    /// Weight of bandwidth use.
    #[serde(default = "w_bandwidth")]
    pub bandwidth: f64,
    /// Weight of tunnel count.
    #[serde(default = "w_connections")]
    pub connections: f64,
}

fn w_cpu() -> f64 {
    0.30
}
fn w_memory() -> f64 {
    0.20
}
fn w_bandwidth() -> f64 {
    0.30
}
fn w_connections() -> f64 {
    0.20
}

impl Default for BalancerWeights {
    fn default() -> Self {
        BalancerWeights {
            cpu: w_cpu(),
            memory: w_memory(),
            bandwidth: w_bandwidth(),
            connections: w_connections(),
        }
    }
}

/// `kind = "balancer"`: scores routers and decides which one each endpoint uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSettings {
    /// Scoring weights.
    #[serde(default)]
    pub weights: BalancerWeights,
    /// A new best router must beat the current one by this much to take over.
    #[serde(default = "default_threshold")]
    pub anti_flap_threshold: f64,
    /// No switch within this many seconds of the last one.
    #[serde(default = "default_hold")]
    pub anti_flap_hold_secs: u64,
    /// Routers report every this many seconds; silent for three intervals means out.
    #[serde(default = "default_report")]
    pub report_interval_secs: u64,
    /// Bandwidth that scores as fully loaded, in Mbit/s.
    #[serde(default = "default_max_bw")]
    pub max_bandwidth_mbps: f64,
    /// Tunnel count that scores as fully loaded.
    #[serde(default = "default_max_conn")]
    pub max_connections: u32,
}

fn default_threshold() -> f64 {
    0.05
}
fn default_hold() -> u64 {
    30
}
fn default_report() -> u64 {
    10
}
fn default_max_bw() -> f64 {
    1000.0
}
fn default_max_conn() -> u32 {
    1000
}

/// Where a collector's readings come from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSource {
    /// A Colony broker to subscribe to.
    #[serde(default)]
    pub broker: Option<Address>,
    /// Topic filters to subscribe to.
    #[serde(default)]
    pub topics: Vec<String>,
    /// A UDP address devices send readings to.
    #[serde(default)]
    pub udp: Option<SocketAddr>,
}

/// `kind = "collector"`: validates readings and stores them in SQLite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSettings {
    /// Where readings come from (readings may also arrive by message).
    #[serde(default)]
    pub source: CollectorSource,
    /// The SQLite file.
    pub database: PathBuf,
}

/// The settings struct of `kind`, deserialized from the rest of an actor's table.
pub(crate) fn deserialize_settings<'de, D: serde::Deserializer<'de>>(
    kind: ActorKind,
    d: D,
) -> Result<ActorSettings, D::Error> {
    Ok(match kind {
        ActorKind::Broker => ActorSettings::Broker(Deserialize::deserialize(d)?),
        ActorKind::Bridge => ActorSettings::Bridge(Deserialize::deserialize(d)?),
        ActorKind::Tunnel => ActorSettings::Tunnel(Deserialize::deserialize(d)?),
        ActorKind::SensorGroup => ActorSettings::SensorGroup(Deserialize::deserialize(d)?),
        ActorKind::Balancer => ActorSettings::Balancer(Deserialize::deserialize(d)?),
        ActorKind::Collector => ActorSettings::Collector(Deserialize::deserialize(d)?),
    })
}
