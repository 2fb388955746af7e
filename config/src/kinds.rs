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
// Settings are made once per config load and reload, never in a hot path: boxing the larger
// variants would buy nothing but indirection.
#[allow(clippy::large_enum_variant)]
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
                if let Some(b) = &s.balancer {
                    refs.push(("balancer", b, Some(ActorKind::Balancer)));
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
            ActorSettings::Broker(b) => b
                .listen
                .map(|a| ("listen", a))
                .into_iter()
                .chain(b.listeners.iter().map(|l| ("listeners", l.bind)))
                .collect(),
            ActorSettings::Collector(c) => {
                c.source.udp.map(|u| ("source", u)).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }
}

/// `kind = "broker"`: an MQTT broker.
///
/// `listen` is shorthand for one plain TCP listener; `listeners` adds any number of TCP or TLS
/// ones. Users, ACL rules, `allow_anonymous` and limits change in place; listeners by restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// A plain MQTT-over-TCP listen address (shorthand for one entry of `listeners`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Listeners, plain TCP or TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<BrokerListener>,
    /// Accept clients that give no username (off by default).
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Users and their argon2 password hashes (`colony passwd` makes one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<BrokerUser>,
    /// Topic access rules; with none, every client may publish and subscribe to anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclRule>,
    /// Per-client and per-broker limits.
    #[serde(default)]
    pub limits: BrokerLimits,
}

impl BrokerSettings {
    /// Every listener, the `listen` shorthand first.
    pub fn all_listeners(&self) -> Vec<BrokerListener> {
        self.listen
            .map(|bind| BrokerListener { bind, tls: None })
            .into_iter()
            .chain(self.listeners.iter().cloned())
            .collect()
    }
}

/// One MQTT listener of a broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerListener {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// TLS settings; plain TCP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BrokerTls>,
}

/// TLS on a broker listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that client certificates must chain to (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate from `client_ca`.
    #[serde(default)]
    pub require_client_cert: bool,
}

/// One MQTT user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    /// The username.
    pub name: String,
    /// The password's argon2 hash in PHC form (`$argon2id$...`).
    pub password_hash: String,
}

/// What an ACL rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AclAccess {
    /// Subscribe and receive.
    Read,
    /// Publish.
    Write,
    /// Both.
    Readwrite,
    /// Neither; a matching deny rule wins over any grant.
    Deny,
}

/// One topic access rule. `%u` in `topic` stands for the username, `%c` for the client id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// The user it applies to; every client (anonymous ones included) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A topic filter, MQTT wildcards and `%u`/`%c` allowed.
    pub topic: String,
    /// What it grants.
    pub access: AclAccess,
}

/// Limits of a broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerLimits {
    /// Largest packet accepted from a client, in bytes.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
    /// QoS 1 and 2 messages in flight to one client at a time.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages queued for one client beyond those in flight; more are dropped and counted.
    #[serde(default = "default_max_queued")]
    pub max_queued: u32,
    /// Client connections at a time; more are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_packet_size() -> u32 {
    1024 * 1024
}
fn default_max_inflight() -> u16 {
    64
}
fn default_max_queued() -> u32 {
    1000
}
fn default_max_connections() -> u32 {
    10_000
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_packet_size: default_max_packet_size(),
            max_inflight: default_max_inflight(),
            max_queued: default_max_queued(),
            max_connections: default_max_connections(),
        }
    }
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
///
/// Topic rules change in place; everything else (the remote, its credentials and TLS files, the
/// spool bounds) by restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    /// The local Colony broker.
    pub local: Address,
    /// The far broker: a Colony broker by address, or the primary URL of an external one.
    pub remote: BridgeRemote,
    /// Topic rules.
    pub topics: Vec<BridgeRule>,
    /// More URLs of the external broker, tried in order when the primary is unreachable; the
    /// bridge goes back to the primary once it answers again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<String>,
    /// MQTT username at the external broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password at the external broker (sent in clear inside TLS; keep the file private).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// CA certificate (PEM) an `mqtts://` broker's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) shown to an `mqtts://` broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// MQTT client id at the external broker; `colony-bridge-<node>-<name>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// MQTT keepalive with the external broker, in seconds.
    #[serde(default = "default_bridge_keepalive")]
    pub keepalive_secs: u64,
    /// How long the external broker keeps the bridge's session while it is away, in seconds.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// First reconnect delay, in milliseconds; it doubles (with jitter) up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// While on a failover address, try the primary again this often, in seconds.
    #[serde(default = "default_primary_retry_secs")]
    pub primary_retry_secs: u64,
    /// Where the connection state is published, retained, on the local broker (`{name}` and
    /// `{node}` are replaced).
    #[serde(default = "default_notification_topic")]
    pub notification_topic: String,
    /// Spool bound: messages waiting per direction; past it the oldest are dropped and counted.
    #[serde(default = "default_spool_max_messages")]
    pub spool_max_messages: u64,
    /// Spool bound: payload bytes waiting per direction; past it the oldest are dropped.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Spool bound: a message waiting longer than this many seconds is dropped and counted.
    #[serde(default = "default_spool_max_age_secs")]
    pub spool_max_age_secs: u64,
    /// QoS 1/2 messages sent to an external broker and not yet acknowledged, at most.
    #[serde(default = "default_bridge_inflight")]
    pub max_inflight: u16,
    /// The MQTT version spoken to an external broker.
    #[serde(default, skip_serializing_if = "MqttVersion::is_default")]
    pub mqtt_version: MqttVersion,
}

/// The MQTT version a bridge speaks to an external broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MqttVersion {
    /// MQTT 5: no-local subscriptions, and hops carried in a user property.
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1, for brokers without MQTT 5: the bridge recognises its own publishes when
    /// they come back, but hops cannot travel through such a broker.
    #[serde(rename = "3.1.1")]
    V311,
}

impl MqttVersion {
    fn is_default(&self) -> bool {
        *self == MqttVersion::V5
    }
}

fn default_bridge_keepalive() -> u64 {
    30
}
fn default_session_expiry() -> u32 {
    7 * 86_400
}
fn default_reconnect_min_ms() -> u64 {
    250
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_primary_retry_secs() -> u64 {
    60
}
fn default_notification_topic() -> String {
    "colony/bridge/{node}/{name}/state".to_owned()
}
fn default_spool_max_messages() -> u64 {
    1_000_000
}
fn default_spool_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_spool_max_age_secs() -> u64 {
    7 * 86_400
}
fn default_bridge_inflight() -> u16 {
    256
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
    /// The balancer an endpoint follows and a router reports to.
    #[serde(default)]
    pub balancer: Option<Address>,
    /// The device's IPv4 address and network (`10.77.0.1/24`); from `pool` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<crate::tunnel::IpNet>,
    /// The device's IPv6 address and network (`fd77::1/64`); from `pool` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<crate::tunnel::IpNet>,
    /// A pool an endpoint draws its addresses from (see [`crate::tunnel`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<crate::tunnel::TunnelPool>,
    /// Networks routed into the tunnel (an endpoint's; a router's own networks need none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<crate::tunnel::IpNet>,
    /// How often an endpoint probes each tunnel, in milliseconds.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// A tunnel is dead after this many probes in a row go unanswered.
    #[serde(default = "default_dead_after")]
    pub dead_after: u32,
    /// A recovered tunnel must stay healthy this long before traffic moves back to it.
    #[serde(default = "default_recovery_hold_ms")]
    pub recovery_hold_ms: u64,
    /// Send every packet on both tunnels; the receiver drops duplicates.
    #[serde(default)]
    pub redundant: bool,
    /// A router's interface to source-NAT forwarded traffic on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    /// How often a router reports its metrics to the balancer, in seconds.
    #[serde(default = "default_tunnel_report_secs")]
    pub report_interval_secs: u64,
}

fn default_mtu() -> u16 {
    1400
}
fn default_probe_interval_ms() -> u64 {
    20
}
fn default_dead_after() -> u32 {
    3
}
fn default_recovery_hold_ms() -> u64 {
    10_000
}
fn default_tunnel_report_secs() -> u64 {
    10
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
    /// A balancer host sensors report this node's load to (CPU, memory, network throughput),
    /// so that it can score nodes as it scores routers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<Address>,
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
    /// An MQTT broker by URL (`mqtt://host:port`, `mqtts://host:port`) instead of `broker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// CA certificate (PEM) that an `mqtts://` broker's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// MQTT username of every sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password of every sensor (a client must send it in clear; keep the file private).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Each reading is due at `interval_ms` ± up to this many milliseconds.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Payload format of simulated readings.
    #[serde(default)]
    pub format: ReadingFormat,
    /// Pad each payload to at least this many bytes (0: no padding).
    #[serde(default)]
    pub payload_size: usize,
    /// A payload template instead of `format`: `{id}`, `{group}`, `{node}`, `{seq}`, `{ts}`
    /// (Unix ms), `{value}` and `{requested}` are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_template: Option<String>,
    /// Topic each sensor takes commands on (`{id}`, `{group}`, `{node}`); empty: none.
    #[serde(default = "default_command_topic")]
    pub command_topic: String,
    /// MQTT client id template (`{id}`, `{group}`, `{node}`); unique per sensor.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// New sensor connections per second while the group ramps up.
    #[serde(default = "default_ramp")]
    pub ramp_per_sec: u32,
    /// Probe sensors: hosts to ping (ICMP echo).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ping: Vec<String>,
    /// Probe sensors: `host:port` to time a TCP connect to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<String>,
    /// Probe sensors: names to time a resolution of (system resolver).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// Probe sensors: pings per target per round (loss and jitter are over these).
    #[serde(default = "default_ping_count")]
    pub ping_count: u32,
    /// Host and probe sensors: stop after this many seconds (run for ever when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
}

/// How a reading is written in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadingFormat {
    /// A JSON object (`{"source": …, "seq": …, "ts": …, "values": {…}}`).
    #[default]
    Json,
    /// The same object in CBOR.
    Cbor,
    /// The gas detectors' text form `SEQ-Gas Sensor IP:… MAC:… Reading value=V`.
    Gas,
}

fn default_command_topic() -> String {
    "InTopic/{group}/{id}".to_owned()
}
fn default_client_id() -> String {
    "{node}-{group}-{id}".to_owned()
}
fn default_ramp() -> u32 {
    1000
}
fn default_ping_count() -> u32 {
    5
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
    /// How readings come from `broker`: as an actor subscriber (`actor`, the default; the
    /// subscription is declared by the config, and QoS 1 notices are acknowledged once
    /// committed), or as an MQTT client with a persistent session that acknowledges only
    /// committed readings (`mqtt`).
    #[serde(default)]
    pub via: CollectorVia,
}

/// How a collector takes readings from its broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectorVia {
    /// An MQTT session on the broker's plain TCP listener.
    Mqtt,
    /// The broker's actor subscriptions, by address (the default: declared by the config, so
    /// nothing published before the collector first runs is lost, and faster).
    #[default]
    Actor,
}

/// `kind = "collector"`: validates readings and stores them in SQLite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSettings {
    /// Where readings come from (readings may also arrive by message).
    #[serde(default)]
    pub source: CollectorSource,
    /// The SQLite file (relative to the actor's data directory unless absolute).
    pub database: PathBuf,
    /// Payload format; every format is tried when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ReadingFormat>,
    /// QoS of the broker subscription (1: readings are acknowledged only once committed).
    #[serde(default = "default_collector_qos")]
    pub qos: u8,
    /// Readings per transaction, at most.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// A reading waits at most this long before its transaction commits.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// How durable a commit is before readings are acknowledged: `normal` survives the process
    /// dying (an OS crash or power cut may lose the last commits); `full` syncs the log at
    /// every commit and survives those too, at the cost of one fsync per batch.
    #[serde(default)]
    pub synchronous: CollectorSync,
}

/// `synchronous` of a collector: SQLite's setting of that name (the file is in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectorSync {
    /// Committed transactions survive the process dying.
    #[default]
    Normal,
    /// Committed transactions also survive an OS crash or power cut.
    Full,
}

fn default_collector_qos() -> u8 {
    1
}
fn default_batch_size() -> usize {
    5000
}
fn default_flush_ms() -> u64 {
    200
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
