//! The reload plan of one node, computed from two configs with no I/O.
//!
//! - An actor only in the new config is **started**; one only in the old is **stopped**.
//! - An actor whose settings differ **changes in place** when its kind can take every changed
//!   setting live ([`colony_actors::changes_in_place`]); otherwise it is **restarted**, and the
//!   settings that forced it are named. A changed `kind` or `restart` policy always restarts.
//! - An actor with the same settings is **untouched**: it keeps running, with its uptime and
//!   its mailbox.
//! - A node's supervision settings and its set of peers change in place. Its listen address,
//!   certificate, key or control socket, and cluster-wide settings (heartbeat, frame size, CA,
//!   state directory), are named as **needing a node restart**: they are not applied live.

use colony_config::{ActorConfig, ClusterConfig, SupervisionSettings};
use serde::{Deserialize, Serialize};

/// An actor whose settings change, and which settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorUpdate {
    /// The actor's new config.
    pub config: ActorConfig,
    /// The settings that differ.
    pub fields: Vec<String>,
}

/// What reloading does on one node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodePlan {
    /// Actors to start, in start order.
    pub start: Vec<ActorConfig>,
    /// Actors to stop.
    pub stop: Vec<String>,
    /// Actors whose settings change while they run.
    pub in_place: Vec<ActorUpdate>,
    /// Actors restarted with new settings.
    pub restart: Vec<ActorUpdate>,
    /// Actors not touched.
    pub untouched: Vec<String>,
    /// New settings for the root supervisor, if they change.
    pub supervision: Option<SupervisionSettings>,
    /// True when the set of peer nodes (or their addresses) changes.
    pub peers_changed: bool,
    /// Changes that need the node restarted to take effect.
    pub needs_node_restart: Vec<String>,
}

/// A plan as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PlanSummary {
    /// Actors to start.
    pub start: Vec<String>,
    /// Actors to stop.
    pub stop: Vec<String>,
    /// `name: field, field` for actors changed in place.
    pub change_in_place: Vec<String>,
    /// `name: field, field` for actors restarted, naming the settings that forced it.
    pub restart: Vec<String>,
    /// Actors untouched.
    pub untouched: Vec<String>,
    /// Other changes applied live (supervision, peers).
    pub node: Vec<String>,
    /// Changes that need a node restart.
    pub needs_node_restart: Vec<String>,
}

impl NodePlan {
    /// The plan for `node` going from `old` to `new`.
    pub fn between(old: &ClusterConfig, new: &ClusterConfig, node: &str) -> NodePlan {
        let diff = old.diff(new);
        let mut plan = NodePlan::default();
        let Some(d) = diff.nodes.get(node) else {
            return plan;
        };
        if d.node_removed {
            plan.needs_node_restart
                .push("this node is no longer in the config: stop it".to_owned());
            return plan;
        }
        plan.start = d.added.clone();
        plan.stop = d.removed.clone();
        plan.untouched = d.unchanged.clone();
        for change in &d.changed {
            let update = ActorUpdate {
                config: change.new.clone(),
                fields: change.fields.clone(),
            };
            let structural = change.fields.iter().any(|f| f == "kind" || f == "restart");
            if !structural && colony_actors::changes_in_place(change.new.kind(), &change.fields) {
                plan.in_place.push(update);
            } else {
                plan.restart.push(update);
            }
        }
        for field in &d.node_fields {
            if field == "supervision" {
                if let (Some(_), Some(n)) = (old.node(node), new.node(node)) {
                    plan.supervision = Some(new.node_supervision(n).clone());
                }
            } else {
                plan.needs_node_restart.push(format!("node.{field}"));
            }
        }
        plan.needs_node_restart.extend(
            diff.cluster_fields
                .iter()
                .filter(|f| f.starts_with("cluster."))
                .cloned(),
        );
        let peers = |c: &ClusterConfig| -> Vec<(String, Option<std::net::SocketAddr>)> {
            c.nodes
                .iter()
                .filter(|n| n.name != node)
                .map(|n| (n.name.clone(), n.listen))
                .collect()
        };
        plan.peers_changed = peers(old) != peers(new);
        plan
    }

    /// True when applying it changes nothing that runs.
    pub fn is_noop(&self) -> bool {
        self.start.is_empty()
            && self.stop.is_empty()
            && self.in_place.is_empty()
            && self.restart.is_empty()
            && self.supervision.is_none()
            && !self.peers_changed
    }

    /// The plan for operators.
    pub fn summary(&self) -> PlanSummary {
        let with_fields = |u: &ActorUpdate| format!("{}: {}", u.config.name, u.fields.join(", "));
        let mut node = Vec::new();
        if self.supervision.is_some() {
            node.push("supervision settings".to_owned());
        }
        if self.peers_changed {
            node.push("peer nodes".to_owned());
        }
        PlanSummary {
            start: self.start.iter().map(|a| a.name.clone()).collect(),
            stop: self.stop.clone(),
            change_in_place: self.in_place.iter().map(with_fields).collect(),
            restart: self.restart.iter().map(with_fields).collect(),
            untouched: self.untouched.clone(),
            node,
            needs_node_restart: self.needs_node_restart.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[cluster]
name = "t"
[[node]]
name = "a"
listen = "127.0.0.1:7001"
[[node]]
name = "b"
listen = "127.0.0.1:7002"
[[actor]]
name = "lb"
node = "a"
kind = "balancer"
[[actor]]
name = "keep"
node = "a"
kind = "balancer"
[[actor]]
name = "gone"
node = "a"
kind = "balancer"
"#;

    fn config(src: &str) -> ClusterConfig {
        ClusterConfig::from_toml_str(src, "t.toml").unwrap()
    }

    #[test]
    fn same_config_is_a_no_op() {
        let plan = NodePlan::between(&config(BASE), &config(BASE), "a");
        assert!(plan.is_noop());
        assert_eq!(plan.untouched, ["lb", "keep", "gone"]);
    }

    #[test]
    fn added_removed_in_place_and_restart() {
        let new = BASE
            .replace(
                "name = \"lb\"\nnode = \"a\"\nkind = \"balancer\"",
                "name = \"lb\"\nnode = \"a\"\nkind = \"balancer\"\nanti_flap_threshold = 0.2",
            )
            .replace(
                "name = \"gone\"\nnode = \"a\"\nkind = \"balancer\"",
                "name = \"new\"\nnode = \"a\"\nkind = \"balancer\"",
            )
            .replace(
                "name = \"keep\"\nnode = \"a\"\nkind = \"balancer\"",
                "name = \"keep\"\nnode = \"a\"\nkind = \"balancer\"\nrestart = \"temporary\"",
            );
        let plan = NodePlan::between(&config(BASE), &config(&new), "a");
        let s = plan.summary();
        assert_eq!(s.start, ["new"]);
        assert_eq!(s.stop, ["gone"]);
        assert_eq!(s.change_in_place, ["lb: anti_flap_threshold"]);
        assert_eq!(s.restart, ["keep: restart"]);
        assert!(s.untouched.is_empty());
        assert!(!plan.is_noop());
        // Node b has nothing.
        assert!(NodePlan::between(&config(BASE), &config(&new), "b").is_noop());
    }

    #[test]
    fn node_level_changes_are_named() {
        let new = BASE
            .replace("127.0.0.1:7001", "127.0.0.1:7101")
            .replace("name = \"t\"", "name = \"t\"\nheartbeat_ms = 300")
            + "\n[[node]]\nname = \"c\"\nlisten = \"127.0.0.1:7003\"\n[supervision]\nmax_restarts = 9\n";
        let plan = NodePlan::between(&config(BASE), &config(&new), "a");
        assert_eq!(
            plan.needs_node_restart,
            ["node.listen", "cluster.heartbeat_ms"]
        );
        assert_eq!(plan.supervision.as_ref().map(|s| s.max_restarts), Some(9));
        assert!(plan.peers_changed);
        assert_eq!(plan.summary().node, ["supervision settings", "peer nodes"]);
        // b sees a's new address as a peer change, and no restart of its own.
        let b = NodePlan::between(&config(BASE), &config(&new), "b");
        assert!(b.peers_changed);
        assert_eq!(b.needs_node_restart, ["cluster.heartbeat_ms"]);
    }
}
