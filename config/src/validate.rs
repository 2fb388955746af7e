//! Checks beyond parsing: names, references, addresses, files and ranges.
//!
//! Each rule reports a [`Problem`] at a key path; the parser turns paths into lines and columns.
//! Every rule runs, so a config with several mistakes reports all of them at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use crate::address::{is_valid_actor_name, is_valid_node_name};
use crate::kinds::{
    ActorKind, ActorSettings, BridgeRemote, BridgeSettings, BrokerSettings, MqttVersion,
    SensorSource, TunnelRole,
};
use crate::model::{ClusterConfig, SupervisionSettings};
use crate::parse::{KeyPath, Problem, Seg, key_path};

/// Whether validation checks that the files a config names exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChecks {
    /// Files named explicitly (CA, certificates, keys) must exist and be readable.
    Check,
    /// Do not look at the file system (for configs checked before their certificates exist).
    Skip,
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: KeyPath, message: impl Into<String>) {
        self.0.push(Problem {
            path,
            message: message.into(),
        });
    }

    /// A problem at `path` unless `lo <= v <= hi`; the message names the path's last key.
    fn range<T: PartialOrd + std::fmt::Display>(&mut self, path: KeyPath, v: T, lo: T, hi: T) {
        if v < lo || v > hi {
            let what = match path.last() {
                Some(Seg::Key(k)) => *k,
                _ => "value",
            };
            self.add(
                path,
                format!("{what} must be between {lo} and {hi}, not {v}"),
            );
        }
    }
}

pub(crate) fn validate(config: &ClusterConfig, checks: FileChecks) -> Vec<Problem> {
    let mut p = Problems(Vec::new());
    cluster_rules(config, &mut p);
    supervision_rules(&config.supervision, key_path!["supervision"], &mut p);
    node_rules(config, checks, &mut p);
    actor_rules(config, &mut p);
    listen_rules(config, &mut p);
    for (i, key, message) in crate::tunnel::problems(config) {
        p.add(key_path!["actor", i, key], message);
    }
    p.0
}

fn cluster_rules(config: &ClusterConfig, p: &mut Problems) {
    let c = &config.cluster;
    if !is_valid_actor_name(&c.name) {
        p.add(
            key_path!["cluster", "name"],
            format!(
                "cluster name '{}' must be 1 to 64 letters, digits, '-' or '_'",
                c.name
            ),
        );
    }
    p.range(
        key_path!["cluster", "heartbeat_ms"],
        c.heartbeat_ms,
        10,
        60_000,
    );
    p.range(
        key_path!["cluster", "heartbeat_misses"],
        c.heartbeat_misses,
        1,
        100,
    );
    p.range(
        key_path!["cluster", "max_frame_bytes"],
        c.max_frame_bytes,
        1024,
        64 << 20,
    );
    p.range(
        key_path!["cluster", "call_timeout_ms"],
        c.call_timeout_ms,
        1,
        3_600_000,
    );
}

fn supervision_rules(s: &SupervisionSettings, at: KeyPath, p: &mut Problems) {
    let key = |k: &'static str| {
        let mut path = at.clone();
        path.push(Seg::Key(k));
        path
    };
    p.range(key("max_restarts"), s.max_restarts, 0, 100_000);
    p.range(key("within_secs"), s.within_secs, 1, 86_400);
    p.range(
        key("backoff_max_ms"),
        s.backoff_max_ms,
        s.backoff_ms,
        3_600_000,
    );
}

fn node_rules(config: &ClusterConfig, checks: FileChecks, p: &mut Problems) {
    if config.nodes.is_empty() {
        p.add(
            key_path!["cluster"],
            "the config defines no [[node]]; a cluster needs at least one",
        );
        return;
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, node) in config.nodes.iter().enumerate() {
        if !is_valid_node_name(&node.name) {
            p.add(
                key_path!["node", i, "name"],
                format!("node name '{}' must be DNS labels of letters, digits and '-' (it is the certificate's DNS name)", node.name),
            );
        }
        if let Some(first) = seen.insert(&node.name, i) {
            seen.insert(&node.name, first);
            p.add(
                key_path!["node", i, "name"],
                format!(
                    "node '{}' is defined twice (also node #{})",
                    node.name,
                    first + 1
                ),
            );
        }
        if let Some(s) = &node.supervision {
            supervision_rules(s, key_path!["node", i, "supervision"], p);
        }
        if checks == FileChecks::Check {
            for (key, file) in [("cert", &node.cert), ("key", &node.key)] {
                if let Some(file) = file {
                    check_file(config, file, key_path!["node", i, key], p);
                }
            }
        }
    }
    if config.nodes.len() > 1 && config.nodes.iter().all(|n| n.listen.is_none()) {
        p.add(key_path!["node", 0], "no node has a listen address, so no node can reach another; give at least one node `listen`");
    }
    if let (FileChecks::Check, Some(ca)) = (checks, &config.cluster.ca) {
        check_file(config, ca, key_path!["cluster", "ca"], p);
    }
}

fn check_file(config: &ClusterConfig, file: &Path, at: KeyPath, p: &mut Problems) {
    let resolved = config.resolve(file);
    if let Err(e) = std::fs::metadata(&resolved) {
        p.add(at, format!("cannot read {}: {e}", resolved.display()));
    }
}

fn actor_rules(config: &ClusterConfig, p: &mut Problems) {
    let nodes: BTreeSet<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    let node_list = nodes.iter().copied().collect::<Vec<_>>().join(", ");
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, actor) in config.actors.iter().enumerate() {
        if !is_valid_actor_name(&actor.name) {
            p.add(key_path!["actor", i, "name"], format!("actor name '{}' must be 1 to 64 letters, digits, '-' or '_', starting with a letter or digit", actor.name));
        }
        if !nodes.contains(actor.node.as_str()) {
            p.add(
                key_path!["actor", i, "node"],
                format!(
                    "node '{}' is not defined; the nodes are {node_list}",
                    actor.node
                ),
            );
        }
        if let Some(first) = seen.insert((&actor.node, &actor.name), i) {
            seen.insert((&actor.node, &actor.name), first);
            p.add(
                key_path!["actor", i, "name"],
                format!(
                    "actor '{}/{}' is defined twice (also actor #{})",
                    actor.node,
                    actor.name,
                    first + 1
                ),
            );
        }
        for (key, target, kind) in actor.settings.references() {
            let at = key_path!["actor", i, key];
            match config.actor(target) {
                None if !nodes.contains(target.node()) => {
                    p.add(
                        at,
                        format!(
                            "`{key}` refers to {target}, but node '{}' is not defined",
                            target.node()
                        ),
                    );
                }
                None => p.add(
                    at,
                    format!("`{key}` refers to {target}, which is not defined"),
                ),
                Some(found) if kind.is_some_and(|k| k != found.kind()) => p.add(
                    at,
                    format!(
                        "`{key}` must name a {}, but {target} is a {}",
                        kind.map_or("", ActorKind::as_str),
                        found.kind()
                    ),
                ),
                Some(_) => {}
            }
        }
        kind_rules(&actor.settings, i, p);
    }
}

fn kind_rules(settings: &ActorSettings, i: usize, p: &mut Problems) {
    match settings {
        ActorSettings::Broker(b) => broker_rules(b, i, p),
        ActorSettings::Bridge(b) => bridge_rules(b, i, p),
        ActorSettings::Tunnel(t) => {
            p.range(key_path!["actor", i, "mtu"], t.mtu, 576, 9000);
            if t.role == TunnelRole::Endpoint && t.peers.len() > 2 {
                p.add(
                    key_path!["actor", i, "peers"],
                    "an endpoint keeps at most two tunnels",
                );
            }
            p.range(
                key_path!["actor", i, "probe_interval_ms"],
                t.probe_interval_ms,
                1,
                60_000,
            );
            p.range(key_path!["actor", i, "dead_after"], t.dead_after, 1, 1000);
            p.range(
                key_path!["actor", i, "report_interval_secs"],
                t.report_interval_secs,
                1,
                86_400,
            );
            if let Some(d) = &t.device
                && (d.is_empty() || d.len() > 15 || d.contains(['/', ' ']))
            {
                p.add(
                    key_path!["actor", i, "device"],
                    format!("'{d}' is not a device name (1 to 15 characters, no '/' or spaces)"),
                );
            }
            if t.role == TunnelRole::Endpoint
                && t.ipv4.is_none()
                && t.ipv6.is_none()
                && t.pool.is_none()
            {
                p.add(
                    key_path!["actor", i],
                    "an endpoint needs `ipv4`, `ipv6` or a `pool` to take them from",
                );
            }
        }
        ActorSettings::SensorGroup(s) => {
            p.range(key_path!["actor", i, "count"], s.count, 1, 100_000);
            p.range(
                key_path!["actor", i, "interval_ms"],
                s.interval_ms,
                1,
                86_400_000,
            );
            p.range(key_path!["actor", i, "qos"], s.qos, 0, 2);
            if s.source == SensorSource::Simulated && s.broker.is_none() == s.url.is_none() {
                p.add(
                    key_path!["actor", i],
                    "simulated sensors need exactly one of `broker` (an address) or `url` to publish to",
                );
            }
            if let Some(url) = &s.url
                && !(url.starts_with("mqtt://") || url.starts_with("mqtts://"))
            {
                p.add(
                    key_path!["actor", i, "url"],
                    format!("'{url}' must start with mqtt:// or mqtts://"),
                );
            }
            p.range(
                key_path!["actor", i, "ramp_per_sec"],
                s.ramp_per_sec,
                1,
                1_000_000,
            );
            p.range(key_path!["actor", i, "ping_count"], s.ping_count, 1, 1000);
            if s.jitter_ms >= s.interval_ms {
                p.add(
                    key_path!["actor", i, "jitter_ms"],
                    "jitter_ms must be below interval_ms",
                );
            }
            if s.source == SensorSource::Probe
                && s.ping.is_empty()
                && s.tcp.is_empty()
                && s.dns.is_empty()
            {
                p.add(
                    key_path!["actor", i],
                    "probe sensors need at least one target in `ping`, `tcp` or `dns`",
                );
            }
            match s.source {
                SensorSource::Host if s.collector.is_none() && s.balancer.is_none() => p.add(
                    key_path!["actor", i],
                    "host sensors need a `collector` or a `balancer` to report to",
                ),
                SensorSource::Probe if s.collector.is_none() => p.add(
                    key_path!["actor", i],
                    "probe sensors need a `collector` to report to",
                ),
                _ => {}
            }
            if s.balancer.is_some() && s.source != SensorSource::Host {
                p.add(
                    key_path!["actor", i, "balancer"],
                    "only host sensors (source = \"host\") report to a balancer",
                );
            }
        }
        ActorSettings::Balancer(b) => {
            let w = &b.weights;
            for (key, v) in [
                ("cpu", w.cpu),
                ("memory", w.memory),
                ("bandwidth", w.bandwidth),
                ("connections", w.connections),
            ] {
                p.range(key_path!["actor", i, "weights", key], v, 0.0, 1.0);
            }
            if w.cpu + w.memory + w.bandwidth + w.connections <= 0.0 {
                p.add(
                    key_path!["actor", i, "weights"],
                    "at least one balancer weight must be above 0",
                );
            }
            p.range(
                key_path!["actor", i, "anti_flap_threshold"],
                b.anti_flap_threshold,
                0.0,
                1.0,
            );
            p.range(
                key_path!["actor", i, "anti_flap_hold_secs"],
                b.anti_flap_hold_secs,
                0,
                86_400,
            );
            p.range(
                key_path!["actor", i, "report_interval_secs"],
                b.report_interval_secs,
                1,
                3_600,
            );
            if b.max_bandwidth_mbps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                p.add(
                    key_path!["actor", i, "max_bandwidth_mbps"],
                    "max_bandwidth_mbps must be above 0",
                );
            }
            p.range(
                key_path!["actor", i, "max_connections"],
                b.max_connections,
                1,
                u32::MAX,
            );
        }
        ActorSettings::Collector(c) => {
            if c.source.broker.is_some() == c.source.topics.is_empty() {
                p.add(
                    key_path!["actor", i, "source"],
                    "a collector's `source` needs both `broker` and `topics`, or neither",
                );
            }
            for (j, t) in c.source.topics.iter().enumerate() {
                if !is_valid_topic_filter(t) {
                    p.add(
                        key_path!["actor", i, "source", "topics", j],
                        format!("'{t}' is not a valid MQTT topic filter"),
                    );
                }
            }
            p.range(key_path!["actor", i, "qos"], c.qos, 0, 1);
            p.range(
                key_path!["actor", i, "batch_size"],
                c.batch_size,
                1,
                1_000_000,
            );
            p.range(key_path!["actor", i, "flush_ms"], c.flush_ms, 1, 60_000);
            if c.database.as_os_str().is_empty() {
                p.add(
                    key_path!["actor", i, "database"],
                    "`database` must name a file",
                );
            }
        }
    }
}

/// A problem with an external broker URL (`mqtt://host[:port]`, `mqtts://host[:port]`).
fn url_problem(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("mqtt://"));
    let Some(rest) = rest else {
        return Some(format!("'{url}' must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let host = match rest.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || h.starts_with('[') => {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Some(format!(
                    "'{url}': the port must be a number from 1 to 65535"
                ));
            }
            h
        }
        _ => rest,
    };
    if host.trim_matches(['[', ']']).is_empty() || host.contains(['/', '@', ' ']) {
        return Some(format!("'{url}' names no host"));
    }
    None
}

fn bridge_rules(b: &BridgeSettings, i: usize, p: &mut Problems) {
    if b.topics.is_empty() {
        p.add(
            key_path!["actor", i, "topics"],
            "a bridge needs at least one topic rule",
        );
    }
    for (j, rule) in b.topics.iter().enumerate() {
        if !is_valid_topic_filter(&rule.pattern) || rule.pattern.starts_with("$share/") {
            p.add(
                key_path!["actor", i, "topics", j, "pattern"],
                format!("'{}' is not a valid MQTT topic filter", rule.pattern),
            );
        }
        for (key, prefix) in [
            ("local_prefix", &rule.local_prefix),
            ("remote_prefix", &rule.remote_prefix),
        ] {
            if prefix.contains(['+', '#', '\0']) {
                p.add(
                    key_path!["actor", i, "topics", j, key],
                    format!("`{key}` '{prefix}' must not hold wildcards"),
                );
            }
        }
        p.range(key_path!["actor", i, "topics", j, "qos"], rule.qos, 0, 2);
    }
    match &b.remote {
        BridgeRemote::Actor(a) => {
            if *a == b.local {
                p.add(
                    key_path!["actor", i, "remote"],
                    "`remote` must be another broker than `local`",
                );
            }
            let external = [
                ("failover", !b.failover.is_empty()),
                ("username", b.username.is_some()),
                ("password", b.password.is_some()),
                ("ca", b.ca.is_some()),
                ("cert", b.cert.is_some()),
                ("key", b.key.is_some()),
                ("client_id", b.client_id.is_some()),
                ("mqtt_version", b.mqtt_version != MqttVersion::V5),
            ];
            for (key, set) in external {
                if set {
                    p.add(
                        key_path!["actor", i, key],
                        format!("`{key}` is for an external broker (`remote = \"mqtt(s)://...\"`); a Colony remote is reached over the cluster"),
                    );
                }
            }
        }
        BridgeRemote::Url(u) => {
            if let Some(m) = url_problem(u) {
                p.add(key_path!["actor", i, "remote"], m);
            }
            for (j, u) in b.failover.iter().enumerate() {
                if let Some(m) = url_problem(u) {
                    p.add(key_path!["actor", i, "failover", j], m);
                }
            }
            let tls = std::iter::once(u)
                .chain(&b.failover)
                .any(|u| u.starts_with("mqtts://"));
            if tls && b.ca.is_none() {
                p.add(
                    key_path!["actor", i, "ca"],
                    "an mqtts:// remote needs `ca` (the CA certificate, PEM)",
                );
            }
            if b.cert.is_some() != b.key.is_some() {
                p.add(
                    key_path!["actor", i, "cert"],
                    "a client certificate needs both `cert` and `key`",
                );
            }
            if b.password.is_some() && b.username.is_none() {
                p.add(
                    key_path!["actor", i, "password"],
                    "`password` needs `username`",
                );
            }
            if let Some(id) = &b.client_id
                && (id.is_empty() || id.len() > 65_535)
            {
                p.add(
                    key_path!["actor", i, "client_id"],
                    "`client_id` must not be empty",
                );
            }
        }
    }
    p.range(
        key_path!["actor", i, "keepalive_secs"],
        b.keepalive_secs,
        1,
        65_535,
    );
    p.range(
        key_path!["actor", i, "reconnect_min_ms"],
        b.reconnect_min_ms,
        1,
        3_600_000,
    );
    p.range(
        key_path!["actor", i, "reconnect_max_ms"],
        b.reconnect_max_ms,
        b.reconnect_min_ms.max(1),
        3_600_000,
    );
    p.range(
        key_path!["actor", i, "primary_retry_secs"],
        b.primary_retry_secs,
        1,
        86_400,
    );
    if b.notification_topic.is_empty() || b.notification_topic.contains(['+', '#', '\0']) {
        p.add(
            key_path!["actor", i, "notification_topic"],
            "`notification_topic` must be a topic name without wildcards",
        );
    }
    p.range(
        key_path!["actor", i, "spool_max_messages"],
        b.spool_max_messages,
        1,
        u64::MAX,
    );
    p.range(
        key_path!["actor", i, "spool_max_bytes"],
        b.spool_max_bytes,
        1024,
        u64::MAX,
    );
    p.range(
        key_path!["actor", i, "spool_max_age_secs"],
        b.spool_max_age_secs,
        1,
        u64::MAX,
    );
    p.range(
        key_path!["actor", i, "max_inflight"],
        b.max_inflight,
        1,
        u16::MAX,
    );
}

fn broker_rules(b: &BrokerSettings, i: usize, p: &mut Problems) {
    if b.listen.is_none() && b.listeners.is_empty() {
        p.add(
            key_path!["actor", i],
            "a broker needs `listen` or at least one of `listeners`",
        );
    }
    for (j, l) in b.listeners.iter().enumerate() {
        if let Some(tls) = &l.tls
            && tls.require_client_cert
            && tls.client_ca.is_none()
        {
            p.add(
                key_path!["actor", i, "listeners", j, "tls"],
                "`require_client_cert` needs a `client_ca` to check client certificates against",
            );
        }
    }
    for (j, u) in b.users.iter().enumerate() {
        if u.name.is_empty() {
            p.add(
                key_path!["actor", i, "users", j, "name"],
                "a user needs a name",
            );
        }
        if b.users[..j].iter().any(|o| o.name == u.name) {
            p.add(
                key_path!["actor", i, "users", j, "name"],
                format!("user '{}' is defined twice", u.name),
            );
        }
        if !u.password_hash.starts_with("$argon2") {
            p.add(
                key_path!["actor", i, "users", j, "password_hash"],
                "`password_hash` must be an argon2 hash (make one with `colony passwd`), never a plain password",
            );
        }
    }
    for (j, rule) in b.acl.iter().enumerate() {
        if !is_valid_topic_filter(&rule.topic) {
            p.add(
                key_path!["actor", i, "acl", j, "topic"],
                format!("'{}' is not a valid MQTT topic filter", rule.topic),
            );
        }
    }
    let l = &b.limits;
    p.range(
        key_path!["actor", i, "limits", "max_packet_size"],
        l.max_packet_size,
        64,
        268_435_455,
    );
    p.range(
        key_path!["actor", i, "limits", "max_inflight"],
        l.max_inflight,
        1,
        65_535,
    );
    p.range(
        key_path!["actor", i, "limits", "max_queued"],
        l.max_queued,
        0,
        10_000_000,
    );
    p.range(
        key_path!["actor", i, "limits", "max_connections"],
        l.max_connections,
        1,
        1_000_000,
    );
}

/// True when `filter` is a valid MQTT topic filter: non-empty, `#` only as the whole last level,
/// `+` only as a whole level, no NUL.
pub(crate) fn is_valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

/// Two sockets of the same protocol clash when their ports match and their IPs match or either
/// is a wildcard.
fn clashes(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn listen_rules(config: &ClusterConfig, p: &mut Problems) {
    // (protocol, address, path, owner) for every configured listener on this machine's view.
    let mut sockets: Vec<(&str, SocketAddr, KeyPath, String)> = Vec::new();
    for (i, node) in config.nodes.iter().enumerate() {
        if let Some(addr) = node.listen {
            sockets.push((
                "udp",
                addr,
                key_path!["node", i, "listen"],
                format!("node '{}'", node.name),
            ));
        }
        if let Some(addr) = node.metrics {
            let owner = format!("node '{}' metrics", node.name);
            sockets.push(("tcp", addr, key_path!["node", i, "metrics"], owner));
        }
    }
    for (i, actor) in config.actors.iter().enumerate() {
        for (key, addr) in actor.settings.listen_addresses() {
            let proto = if actor.kind() == ActorKind::Broker {
                "tcp"
            } else {
                "udp"
            };
            sockets.push((
                proto,
                addr,
                key_path!["actor", i, key],
                format!("actor {}", actor.address()),
            ));
        }
    }
    for (j, (proto, addr, path, _)) in sockets.iter().enumerate() {
        if let Some((_, other, _, owner)) = sockets[..j]
            .iter()
            .find(|(p2, a2, _, _)| p2 == proto && clashes(*a2, *addr))
        {
            p.add(
                path.clone(),
                format!("{proto} address {addr} is already used by {owner} ({other})"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters() {
        for ok in ["a", "a/b", "a/+/c", "#", "a/#", "+", "+/+", "/a"] {
            assert!(is_valid_topic_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "a\0"] {
            assert!(!is_valid_topic_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn socket_clashes() {
        let a: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let b: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        let c: SocketAddr = "127.0.0.2:1883".parse().unwrap();
        assert!(clashes(a, b));
        assert!(!clashes(a, c));
        assert!(!clashes(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap()
        ));
    }
}
