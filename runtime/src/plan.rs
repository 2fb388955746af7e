//! Capacity planning: what a cluster config will move, per flow, per node and per cluster link,
//! estimated from the config alone (`colony plan CONFIG`).
//!
//! The model follows readings from where they are made to where they are stored:
//!
//! - a simulated sensor group publishes `count × 1000 / interval_ms` readings per second to its
//!   broker, over MQTT on TCP (TLS for an `mqtts://` URL), each the payload the group really
//!   builds (its format, padding or template) on the topic its template gives;
//! - a broker passes each stream on to every collector whose filters match it (over MQTT, or as
//!   actor notices over the cluster for `via = "actor"`) and to every bridge whose rules match
//!   it, which forwards it — with its prefixes remapped — to the far broker, where the same
//!   happens again (at most [`MAX_HOPS`] brokers deep, never straight back);
//! - host and probe sensors send their readings to their collector as cluster messages;
//! - tunnel endpoints probe each of their routers every `probe_interval_ms`, and routers report
//!   to their balancer every `report_interval_secs`.
//!
//! What the config cannot say is left out and named in [`Plan::notes`]: UDP devices, traffic
//! through tunnels, external publishers.
//!
//! Per-message overheads are stated in [`Overheads`]: they assume one TCP segment per MQTT packet
//! and one QUIC packet per cluster message, which is right at sensor rates and an upper bound
//! under load (TCP and QUIC both pack many small messages per packet when busy).

use std::collections::BTreeMap;

use colony_actors::broker::topic::filter_matches;
use colony_actors::reading::{self, Reading};
use colony_actors::sensor_group;
use colony_config::kinds::{
    BridgeDirection, BridgeRemote, CollectorVia, ReadingFormat, SensorSource,
};
use colony_config::{ActorConfig, ActorSettings, Address, ClusterConfig};
use serde::Serialize;

/// How many brokers deep a stream is followed through bridges.
pub const MAX_HOPS: usize = 8;

/// The per-message overheads the estimates add to payloads, in bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Overheads {
    /// IPv4 and TCP headers of one segment, with the timestamp option (20 + 20 + 12).
    pub tcp_ip: usize,
    /// A TLS 1.3 record around one MQTT packet: 5-byte header, content type, 16-byte AEAD tag.
    pub tls_record: usize,
    /// PUBACK (QoS 1) or PUBREC + PUBREL + PUBCOMP (QoS 2): 4 bytes per packet.
    pub mqtt_ack: usize,
    /// IPv4 and UDP headers of one QUIC packet (20 + 8).
    pub udp_ip: usize,
    /// A QUIC 1-RTT packet: short header (flags, 8-byte connection id, 2-byte packet number),
    /// STREAM frame header, 16-byte AEAD tag.
    pub quic_packet: usize,
    /// Colony's frame header (length, kind, correlation) on a cluster stream.
    pub colony_frame: usize,
    /// The CBOR envelope around a cluster message, besides the two addresses it carries.
    pub envelope: usize,
}

/// The overheads Colony's links and MQTT really have (see the field docs).
pub const OVERHEADS: Overheads = Overheads {
    tcp_ip: 52,
    tls_record: 22,
    mqtt_ack: 4,
    udp_ip: 28,
    quic_packet: 31,
    colony_frame: 13,
    envelope: 12,
};

/// How a flow travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// Actor messages over the cluster's QUIC links (in process when both ends share a node).
    Cluster,
    /// QUIC datagrams between tunnel actors.
    Datagram,
}

impl Transport {
    /// Its name in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Mqtts => "mqtts",
            Transport::Cluster => "cluster",
            Transport::Datagram => "datagram",
        }
    }
}

/// One estimated flow of messages from one actor to another (or to a broker outside the
/// cluster).
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    /// The sending actor.
    pub from: String,
    /// The receiving actor, or a URL outside the cluster.
    pub to: String,
    /// The sending node.
    pub from_node: String,
    /// The receiving node; `None` outside the cluster.
    pub to_node: Option<String>,
    /// How it travels.
    pub transport: Transport,
    /// What it carries.
    pub what: String,
    /// Messages per second.
    pub messages_per_sec: f64,
    /// Application payload of one message, in bytes.
    pub payload_bytes: usize,
    /// One message on the wire, every overhead included, in bytes.
    pub wire_bytes: usize,
    /// What goes back for each message (acknowledgements) on the wire, in bytes.
    pub ack_wire_bytes: usize,
}

impl Flow {
    /// Bits per second forward.
    pub fn bits_per_sec(&self) -> f64 {
        self.messages_per_sec * self.wire_bytes as f64 * 8.0
    }

    /// Bits per second back (acknowledgements).
    pub fn ack_bits_per_sec(&self) -> f64 {
        self.messages_per_sec * self.ack_wire_bytes as f64 * 8.0
    }

    /// True when it leaves its node (its bytes cross a network; in-node flows cost CPU only).
    pub fn crosses_nodes(&self) -> bool {
        self.to_node.as_deref() != Some(self.from_node.as_str())
    }
}

/// What one node sends and receives.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeLoad {
    /// Messages per second received (from other nodes, outside, or its own actors).
    pub messages_in_per_sec: f64,
    /// Messages per second sent.
    pub messages_out_per_sec: f64,
    /// Bits per second received from other nodes and outside, acknowledgements included.
    pub bits_in_per_sec: f64,
    /// Bits per second sent to other nodes and outside, acknowledgements included.
    pub bits_out_per_sec: f64,
}

/// What crosses one cluster link (QUIC), each way; `a` is the lower-named node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkLoad {
    /// One end.
    pub a: String,
    /// The other end.
    pub b: String,
    /// Messages per second from `a` to `b`.
    pub messages_a_to_b: f64,
    /// Messages per second from `b` to `a`.
    pub messages_b_to_a: f64,
    /// Bits per second from `a` to `b`.
    pub bits_a_to_b: f64,
    /// Bits per second from `b` to `a`.
    pub bits_b_to_a: f64,
    /// Of those, bits per second each way that keep the link alive (QUIC PINGs every heartbeat
    /// and their acknowledgements), carried even when the link is idle.
    pub keepalive_bits: f64,
}

/// The estimate for a whole config.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Every flow.
    pub flows: Vec<Flow>,
    /// Per node.
    pub nodes: BTreeMap<String, NodeLoad>,
    /// Per cluster link that carries anything.
    pub links: Vec<LinkLoad>,
    /// Readings stored per second, per collector.
    pub stored_per_sec: BTreeMap<String, f64>,
    /// What the estimate leaves out.
    pub notes: Vec<String>,
    /// The overheads it assumed.
    pub overheads: Overheads,
}

/// A stream of publishes arriving at a broker.
#[derive(Debug, Clone)]
struct Stream {
    /// A representative topic.
    topic: String,
    rate: f64,
    payload: usize,
    qos: u8,
    /// The bridge it came through, which must not send it back.
    via_bridge: Option<String>,
    hops: usize,
}

/// Estimates what `config` moves, sizing host readings by this machine's metrics.
pub fn estimate(config: &ClusterConfig) -> Plan {
    estimate_with(config, &sensor_group::host_reading_sample())
}

/// Estimates what `config` moves, a host sensor's reading carrying `host_values` (pure: the
/// same inputs give the same plan).
pub fn estimate_with(config: &ClusterConfig, host_values: &BTreeMap<String, f64>) -> Plan {
    let mut p = Planner {
        config,
        host_values,
        flows: Vec::new(),
        notes: Vec::new(),
        stored: BTreeMap::new(),
    };
    for actor in &config.actors {
        p.actor(actor);
    }
    p.finish()
}

struct Planner<'a> {
    config: &'a ClusterConfig,
    host_values: &'a BTreeMap<String, f64>,
    flows: Vec<Flow>,
    notes: Vec<String>,
    stored: BTreeMap<String, f64>,
}

impl Planner<'_> {
    fn actor(&mut self, actor: &ActorConfig) {
        let address = actor.address();
        match &actor.settings {
            ActorSettings::SensorGroup(s) => match s.source {
                SensorSource::Simulated => self.simulated(&address, s),
                SensorSource::Host | SensorSource::Probe => self.reporting(&address, s),
            },
            ActorSettings::Collector(c) => {
                self.stored.entry(address.to_string()).or_insert(0.0);
                if let Some(udp) = c.source.udp {
                    self.notes.push(format!(
                        "{address}: readings from UDP devices on {udp} depend on the devices and \
                         are not estimated"
                    ));
                }
            }
            ActorSettings::Tunnel(t) => {
                use colony_config::kinds::TunnelRole;
                let node = address.node().to_owned();
                match t.role {
                    TunnelRole::Endpoint => {
                        let rate = 1000.0 / t.probe_interval_ms.max(1) as f64;
                        for peer in &t.peers {
                            // A probe and its answer: a sequence number and a timestamp.
                            let wire = 16 + OVERHEADS.udp_ip + OVERHEADS.quic_packet;
                            self.flows.push(Flow {
                                from: address.to_string(),
                                to: peer.to_string(),
                                from_node: node.clone(),
                                to_node: Some(peer.node().to_owned()),
                                transport: Transport::Datagram,
                                what: "probes".into(),
                                messages_per_sec: rate,
                                payload_bytes: 16,
                                wire_bytes: wire,
                                ack_wire_bytes: wire,
                            });
                        }
                        self.notes.push(format!(
                            "{address}: traffic through the tunnel depends on what the endpoint \
                             sends and is not estimated (probes are)"
                        ));
                    }
                    TunnelRole::Router => {
                        if let Some(balancer) = &t.balancer {
                            let rate = 1.0 / t.report_interval_secs.max(1) as f64;
                            self.message_flow(&address, balancer, "metrics reports", rate, 120);
                        }
                    }
                }
            }
            ActorSettings::Broker(_) | ActorSettings::Bridge(_) | ActorSettings::Balancer(_) => {}
        }
    }

    /// A simulated group: its MQTT publishes, then whatever its broker does with them.
    fn simulated(&mut self, address: &Address, s: &colony_config::kinds::SensorGroupSettings) {
        let node = address.node();
        let group = address.actor();
        let rate = f64::from(s.count) * 1000.0 / s.interval_ms.max(1) as f64;
        let topic = sensor_group::simulated_topic(s, node, group, 1);
        let payload =
            sensor_group::simulated_payload(s, node, group, 1, 1, SAMPLE_TS_MS, false).len();
        let (to, to_node, transport) = match (&s.broker, &s.url) {
            (Some(b), _) => (b.to_string(), Some(b.node().to_owned()), Transport::Mqtt),
            (None, Some(url)) => (
                url.clone(),
                None,
                if url.starts_with("mqtts://") {
                    Transport::Mqtts
                } else {
                    Transport::Mqtt
                },
            ),
            (None, None) => return,
        };
        self.flows.push(mqtt_flow(
            address.to_string(),
            to,
            node.to_owned(),
            to_node,
            transport,
            "readings".into(),
            rate,
            &topic,
            payload,
            s.qos,
        ));
        if let Some(broker) = &s.broker {
            self.at_broker(
                broker,
                Stream {
                    topic,
                    rate,
                    payload,
                    qos: s.qos,
                    via_bridge: None,
                    hops: 0,
                },
            );
        }
    }

    /// Host and probe sensors: readings sent to the collector by message.
    fn reporting(&mut self, address: &Address, s: &colony_config::kinds::SensorGroupSettings) {
        let Some(collector) = &s.collector else {
            return;
        };
        let per_round = if s.source == SensorSource::Host {
            1
        } else {
            s.ping.len() + s.tcp.len() + s.dns.len()
        };
        let values = if s.source == SensorSource::Host {
            self.host_values.clone()
        } else {
            // A ping result: min, avg, max, jitter, loss; TCP and DNS results carry fewer.
            [
                "rtt_min_ms",
                "rtt_avg_ms",
                "rtt_max_ms",
                "jitter_ms",
                "loss_percent",
            ]
            .into_iter()
            .map(|k| (k.to_owned(), 1.0))
            .collect()
        };
        let sample = Reading {
            values,
            ..Reading::single(address.to_string(), 1, SAMPLE_TS_MS, 0.0)
        };
        let payload = reading::encode(&sample, ReadingFormat::Cbor, 0).len();
        let rate = per_round as f64 * 1000.0 / s.interval_ms.max(1) as f64;
        self.message_flow(address, collector, "readings", rate, payload);
        *self.stored.entry(collector.to_string()).or_default() += rate;
    }

    /// A stream arriving at `broker`: to its collectors and through its bridges.
    fn at_broker(&mut self, broker: &Address, stream: Stream) {
        for actor in &self.config.actors {
            let address = actor.address();
            match &actor.settings {
                ActorSettings::Collector(c) if c.source.broker.as_ref() == Some(broker) => {
                    if !c
                        .source
                        .topics
                        .iter()
                        .any(|f| filter_matches(f, &stream.topic))
                    {
                        continue;
                    }
                    let qos = stream.qos.min(c.qos);
                    match c.source.via {
                        CollectorVia::Mqtt => self.flows.push(mqtt_flow(
                            broker.to_string(),
                            address.to_string(),
                            broker.node().to_owned(),
                            Some(address.node().to_owned()),
                            Transport::Mqtt,
                            "readings".into(),
                            stream.rate,
                            &stream.topic,
                            stream.payload,
                            qos,
                        )),
                        CollectorVia::Actor => {
                            let body = stream.payload + stream.topic.len() + 24;
                            self.message_flow(broker, &address, "notices", stream.rate, body);
                            if qos > 0 {
                                self.message_flow(&address, broker, "acks", stream.rate, 16);
                            }
                        }
                    }
                    *self.stored.entry(address.to_string()).or_default() += stream.rate;
                }
                ActorSettings::Bridge(b) if stream.hops < MAX_HOPS => {
                    let name = address.to_string();
                    if stream.via_bridge.as_deref() == Some(name.as_str()) {
                        continue;
                    }
                    let local = b.local == *broker;
                    let remote = matches!(&b.remote, BridgeRemote::Actor(r) if r == broker);
                    for rule in &b.topics {
                        let (from_prefix, to_prefix, wanted) = if local {
                            (
                                &rule.local_prefix,
                                &rule.remote_prefix,
                                BridgeDirection::Out,
                            )
                        } else if remote {
                            (&rule.remote_prefix, &rule.local_prefix, BridgeDirection::In)
                        } else {
                            break;
                        };
                        if rule.direction != wanted && rule.direction != BridgeDirection::Both {
                            continue;
                        }
                        let Some(rest) = stream.topic.strip_prefix(from_prefix.as_str()) else {
                            continue;
                        };
                        if !filter_matches(&rule.pattern, rest) {
                            continue;
                        }
                        let topic = format!("{to_prefix}{rest}");
                        let qos = stream.qos.min(rule.qos);
                        self.bridged(&address, b, local, stream.clone(), topic, qos);
                        break;
                    }
                }
                _ => {}
            }
        }
    }

    /// `stream`, matched by a rule of `bridge`, crosses it to `topic` on the other side.
    fn bridged(
        &mut self,
        bridge: &Address,
        b: &colony_config::kinds::BridgeSettings,
        outward: bool,
        stream: Stream,
        topic: String,
        qos: u8,
    ) {
        let near = if outward {
            b.local.clone()
        } else {
            match &b.remote {
                BridgeRemote::Actor(a) => a.clone(),
                BridgeRemote::Url(_) => return,
            }
        };
        let body = stream.payload + stream.topic.len() + 24;
        self.message_flow(&near, bridge, "notices", stream.rate, body);
        if stream.qos > 0 {
            self.message_flow(bridge, &near, "acks", stream.rate, 16);
        }
        let next = Stream {
            topic,
            rate: stream.rate,
            payload: stream.payload,
            qos,
            via_bridge: Some(bridge.to_string()),
            hops: stream.hops + 1,
        };
        let far = if outward {
            match &b.remote {
                BridgeRemote::Actor(a) => Some(a.clone()),
                BridgeRemote::Url(url) => {
                    let transport = if url.starts_with("mqtts://") {
                        Transport::Mqtts
                    } else {
                        Transport::Mqtt
                    };
                    self.flows.push(mqtt_flow(
                        bridge.to_string(),
                        url.clone(),
                        bridge.node().to_owned(),
                        None,
                        transport,
                        "bridged".into(),
                        next.rate,
                        &next.topic,
                        next.payload,
                        qos,
                    ));
                    None
                }
            }
        } else {
            Some(b.local.clone())
        };
        if let Some(far) = far {
            let body = next.payload + next.topic.len() + 40;
            self.message_flow(bridge, &far, "bridged", next.rate, body);
            if qos > 0 {
                // A QoS 1 or 2 publish is a call: the far broker answers once it has stored it.
                self.message_flow(&far, bridge, "replies", next.rate, 8);
            }
            self.at_broker(&far, next);
        }
    }

    /// Actor messages of `body` bytes from `from` to `to`, over the cluster.
    fn message_flow(&mut self, from: &Address, to: &Address, what: &str, rate: f64, body: usize) {
        let o = OVERHEADS;
        let message =
            body + o.colony_frame + o.envelope + from.to_string().len() + to.to_string().len();
        self.flows.push(Flow {
            from: from.to_string(),
            to: to.to_string(),
            from_node: from.node().to_owned(),
            to_node: Some(to.node().to_owned()),
            transport: Transport::Cluster,
            what: what.into(),
            messages_per_sec: rate,
            payload_bytes: body,
            wire_bytes: message + o.udp_ip + o.quic_packet,
            // QUIC acknowledges packets in ACK frames that ride on later packets; at most one
            // small packet per two received.
            ack_wire_bytes: (o.udp_ip + o.quic_packet) / 2,
        });
    }

    fn finish(self) -> Plan {
        let mut nodes: BTreeMap<String, NodeLoad> = self
            .config
            .nodes
            .iter()
            .map(|n| (n.name.clone(), NodeLoad::default()))
            .collect();
        let mut links: BTreeMap<(String, String), LinkLoad> = BTreeMap::new();
        for f in &self.flows {
            let crosses = f.crosses_nodes();
            if let Some(n) = nodes.get_mut(&f.from_node) {
                n.messages_out_per_sec += f.messages_per_sec;
                if crosses {
                    n.bits_out_per_sec += f.bits_per_sec();
                    n.bits_in_per_sec += f.ack_bits_per_sec();
                }
            }
            if let Some(n) = f.to_node.as_ref().and_then(|t| nodes.get_mut(t)) {
                n.messages_in_per_sec += f.messages_per_sec;
                if crosses {
                    n.bits_in_per_sec += f.bits_per_sec();
                    n.bits_out_per_sec += f.ack_bits_per_sec();
                }
            }
            let Some(to_node) = f.to_node.as_ref() else {
                continue;
            };
            if !crosses || !matches!(f.transport, Transport::Cluster | Transport::Datagram) {
                continue;
            }
            let forward = f.from_node < *to_node;
            let key = if forward {
                (f.from_node.clone(), to_node.clone())
            } else {
                (to_node.clone(), f.from_node.clone())
            };
            let link = links.entry(key.clone()).or_insert_with(|| LinkLoad {
                a: key.0.clone(),
                b: key.1.clone(),
                ..LinkLoad::default()
            });
            if forward {
                link.messages_a_to_b += f.messages_per_sec;
                link.bits_a_to_b += f.bits_per_sec();
                link.bits_b_to_a += f.ack_bits_per_sec();
            } else {
                link.messages_b_to_a += f.messages_per_sec;
                link.bits_b_to_a += f.bits_per_sec();
                link.bits_a_to_b += f.ack_bits_per_sec();
            }
        }
        // Every pair of nodes keeps a link (relayed pairs through a third node: counted as direct).
        let keepalive = 2.0 * 1000.0 / self.config.cluster.heartbeat_ms.max(1) as f64
            * (OVERHEADS.udp_ip + OVERHEADS.quic_packet) as f64
            * 8.0;
        let names: Vec<&String> = nodes.keys().collect();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                let key = ((*a).clone(), (*b).clone());
                let link = links.entry(key.clone()).or_insert_with(|| LinkLoad {
                    a: key.0.clone(),
                    b: key.1.clone(),
                    ..LinkLoad::default()
                });
                link.keepalive_bits = keepalive;
                link.bits_a_to_b += keepalive;
                link.bits_b_to_a += keepalive;
            }
        }
        for (name, n) in nodes.iter_mut() {
            let peers = links
                .values()
                .filter(|l| l.a == *name || l.b == *name)
                .count();
            n.bits_in_per_sec += keepalive * peers as f64;
            n.bits_out_per_sec += keepalive * peers as f64;
        }
        Plan {
            flows: self.flows,
            nodes,
            links: links.into_values().collect(),
            stored_per_sec: self.stored,
            notes: self.notes,
            overheads: OVERHEADS,
        }
    }
}

/// An MQTT publish flow, with TCP/IP (and TLS) overhead and the acknowledgements its QoS brings.
#[allow(clippy::too_many_arguments)]
fn mqtt_flow(
    from: String,
    to: String,
    from_node: String,
    to_node: Option<String>,
    transport: Transport,
    what: String,
    rate: f64,
    topic: &str,
    payload: usize,
    qos: u8,
) -> Flow {
    let o = OVERHEADS;
    let tls = if transport == Transport::Mqtts {
        o.tls_record
    } else {
        0
    };
    let packet = mqtt_publish_size(topic, payload, qos);
    let ack_packets = match qos {
        0 => 0,
        1 => 1,
        _ => 3,
    };
    Flow {
        from,
        to,
        from_node,
        to_node,
        transport,
        what,
        messages_per_sec: rate,
        payload_bytes: payload,
        wire_bytes: packet + tls + o.tcp_ip,
        ack_wire_bytes: ack_packets * (o.mqtt_ack + tls + o.tcp_ip),
    }
}

/// The size of an MQTT PUBLISH: fixed header (type byte and remaining length), topic with its
/// length, packet id at QoS 1 and 2, payload.
pub fn mqtt_publish_size(topic: &str, payload: usize, qos: u8) -> usize {
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

/// The send time written into sample payloads: a present-day Unix time in milliseconds, as
/// wide as the real ones.
const SAMPLE_TS_MS: u64 = 1_800_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(actors: &str) -> ClusterConfig {
        let text = format!(
            r#"
[cluster]
name = "plan"

[[node]]
name = "core"
listen = "127.0.0.1:7101"

[[node]]
name = "site"
listen = "127.0.0.1:7102"

[[node]]
name = "cloud"
listen = "127.0.0.1:7103"

[[actor]]
name = "broker"
node = "core"
kind = "broker"
listen = "127.0.0.1:1883"
allow_anonymous = true
{actors}
"#
        );
        ClusterConfig::from_toml_str(&text, "plan.toml").unwrap()
    }

    #[test]
    fn publish_size_counts_every_header_byte() {
        // 2 + 3 + 100 = 105 remaining: one length byte.
        assert_eq!(mqtt_publish_size("a/b", 100, 0), 107);
        assert_eq!(mqtt_publish_size("a/b", 100, 1), 109);
        // 2 + 3 + 2 + 200 = 207 remaining: two length bytes.
        assert_eq!(mqtt_publish_size("a/b", 200, 1), 210);
    }

    #[test]
    fn sensors_into_a_broker_and_a_collector_by_mqtt() {
        let plan = estimate(&config(
            r#"
[[actor]]
name = "gas"
node = "site"
kind = "sensor_group"
broker = "core/broker"
count = 1000
interval_ms = 500
qos = 1
payload_size = 100

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "r.sqlite"
source = { broker = "core/broker", topics = ["sensors/#"] }
"#,
        ));
        let publish = &plan.flows[0];
        assert_eq!(publish.from, "site/gas");
        assert_eq!(publish.to, "core/broker");
        assert_eq!(publish.messages_per_sec, 2000.0);
        assert!(publish.payload_bytes >= 100);
        let topic = "sensors/site/gas/1".len();
        assert_eq!(
            publish.wire_bytes,
            1 + 1 + 2 + topic + 2 + publish.payload_bytes + 52
        );
        assert_eq!(publish.ack_wire_bytes, 4 + 52);
        let deliver = &plan.flows[1];
        assert_eq!(
            (deliver.from.as_str(), deliver.to.as_str()),
            ("core/broker", "core/store")
        );
        assert!(!deliver.crosses_nodes());
        assert_eq!(plan.stored_per_sec["core/store"], 2000.0);
        let site = &plan.nodes["site"];
        let keepalives = 2.0 * plan.links[0].keepalive_bits;
        assert_eq!(
            site.bits_out_per_sec,
            2000.0 * publish.wire_bytes as f64 * 8.0 + keepalives
        );
        // MQTT over TCP is not a cluster link: the links carry keep-alives only.
        assert_eq!(plan.links.len(), 3);
        assert!(
            plan.links
                .iter()
                .all(|l| l.messages_a_to_b == 0.0 && l.bits_a_to_b == l.keepalive_bits)
        );
    }

    #[test]
    fn a_filter_that_does_not_match_stores_nothing() {
        let plan = estimate(&config(
            r#"
[[actor]]
name = "gas"
node = "site"
kind = "sensor_group"
broker = "core/broker"
count = 10

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "r.sqlite"
source = { broker = "core/broker", topics = ["other/#"] }
"#,
        ));
        assert_eq!(plan.flows.len(), 1);
        assert_eq!(plan.stored_per_sec["core/store"], 0.0);
    }

    #[test]
    fn bridges_remap_topics_and_cross_cluster_links() {
        let plan = estimate(&config(
            r##"
[[actor]]
name = "gas"
node = "core"
kind = "sensor_group"
broker = "core/broker"
count = 100
topic = "gas/{id}"

[[actor]]
name = "broker"
node = "cloud"
kind = "broker"
listen = "127.0.0.1:1884"
allow_anonymous = true

[[actor]]
name = "up"
node = "core"
kind = "bridge"
local = "core/broker"
remote = "cloud/broker"
topics = [{ pattern = "#", direction = "both", qos = 1, local_prefix = "gas/", remote_prefix = "site-a/gas/" }]

[[actor]]
name = "store"
node = "cloud"
kind = "collector"
database = "r.sqlite"
source = { broker = "cloud/broker", topics = ["site-a/#"], via = "actor" }
"##,
        ));
        let bridged: Vec<&Flow> = plan.flows.iter().filter(|f| f.what == "bridged").collect();
        assert_eq!(bridged.len(), 1, "{:#?}", plan.flows);
        assert_eq!(bridged[0].to, "cloud/broker");
        assert_eq!(plan.stored_per_sec["cloud/store"], 100.0);
        // The bridge's `both` rule does not send the stream back to where it came from.
        assert!(
            !plan
                .flows
                .iter()
                .any(|f| f.from == "core/up" && f.to == "core/broker")
        );
        let link = plan
            .links
            .iter()
            .find(|l| l.a == "cloud" && l.b == "core")
            .unwrap();
        // bridged out core -> cloud: b_to_a; notices and acks cloud/broker -> cloud/store are local.
        assert_eq!(link.messages_b_to_a, 100.0);
    }

    #[test]
    fn host_sensors_report_by_message() {
        // A host reading as this module sizes it: overall and per-core CPU, memory, load, disks and
        // interfaces.
        let host: BTreeMap<String, f64> = (0..24).map(|i| (format!("metric.{i}"), 1.5)).collect();
        let plan = estimate_with(
            &config(
                r#"
[[actor]]
name = "host"
node = "site"
kind = "sensor_group"
source = "host"
collector = "core/store"
interval_ms = 2000

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "r.sqlite"
"#,
            ),
            &host,
        );
        let f = &plan.flows[0];
        assert_eq!(f.transport, Transport::Cluster);
        assert_eq!(f.messages_per_sec, 0.5);
        assert!(f.payload_bytes > 50, "a host reading carries many values");
        let link = plan
            .links
            .iter()
            .find(|l| l.a == "core" && l.b == "site")
            .unwrap();
        assert_eq!(link.messages_b_to_a, 0.5);
        assert_eq!(plan.stored_per_sec["core/store"], 0.5);
    }
}
