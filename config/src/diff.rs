//! The difference between two valid configs, per node: which actors are added, removed, changed
//! (and in which settings) and unchanged, and which node-level settings changed.
//!
//! The diff is pure data; hot reload decides from it, with each kind's rules, what restarts and
//! what changes in place.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{ActorConfig, ClusterConfig, NodeConfig};

/// An actor present in both configs whose settings differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActorChange {
    /// The actor's name on its node.
    pub name: String,
    /// Top-level keys whose values differ (`kind` when the kind itself changed).
    pub fields: Vec<String>,
    /// The new config of the actor.
    pub new: ActorConfig,
}

/// What changes on one node.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct NodeDiff {
    /// True when the node is new in the second config.
    pub node_added: bool,
    /// True when the node is gone from the second config.
    pub node_removed: bool,
    /// Node-level keys that differ (listen, cert, key, control_socket, supervision).
    pub node_fields: Vec<String>,
    /// Actors only in the second config, in start order.
    pub added: Vec<ActorConfig>,
    /// Actors only in the first config.
    pub removed: Vec<String>,
    /// Actors in both whose settings differ.
    pub changed: Vec<ActorChange>,
    /// Actors in both with the same settings.
    pub unchanged: Vec<String>,
}

impl NodeDiff {
    /// True when nothing on this node changes.
    pub fn is_empty(&self) -> bool {
        !self.node_added
            && !self.node_removed
            && self.node_fields.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }
}

/// The difference between two configs.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ConfigDiff {
    /// Keys of `[cluster]` and `[supervision]` that differ.
    pub cluster_fields: Vec<String>,
    /// Per node, by name.
    pub nodes: BTreeMap<String, NodeDiff>,
}

impl ConfigDiff {
    /// True when the configs are equivalent.
    pub fn is_empty(&self) -> bool {
        self.cluster_fields.is_empty() && self.nodes.values().all(NodeDiff::is_empty)
    }
}

/// Top-level keys whose serialized values differ between `a` and `b`.
fn changed_fields<T: Serialize>(a: &T, b: &T) -> Vec<String> {
    let (Ok(toml::Value::Table(a)), Ok(toml::Value::Table(b))) =
        (toml::Value::try_from(a), toml::Value::try_from(b))
    else {
        return vec!["*".to_owned()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

fn actor_fields(old: &ActorConfig, new: &ActorConfig) -> Vec<String> {
    if old.kind() != new.kind() {
        return vec!["kind".to_owned()];
    }
    let mut fields = changed_fields(&old.settings, &new.settings);
    if old.restart != new.restart {
        fields.push("restart".to_owned());
    }
    fields
}

impl ClusterConfig {
    /// What changes going from `self` to `new`.
    pub fn diff(&self, new: &ClusterConfig) -> ConfigDiff {
        let mut diff = ConfigDiff::default();
        for f in changed_fields(&self.cluster, &new.cluster) {
            diff.cluster_fields.push(format!("cluster.{f}"));
        }
        if self.supervision != new.supervision {
            for f in changed_fields(&self.supervision, &new.supervision) {
                diff.cluster_fields.push(format!("supervision.{f}"));
            }
        }
        let mut names: Vec<&str> = self
            .nodes
            .iter()
            .chain(&new.nodes)
            .map(|n| n.name.as_str())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            diff.nodes
                .insert(name.to_owned(), self.node_diff(new, name));
        }
        diff
    }

    fn node_diff(&self, new: &ClusterConfig, name: &str) -> NodeDiff {
        let old_node: Option<&NodeConfig> = self.node(name);
        let new_node: Option<&NodeConfig> = new.node(name);
        let mut d = NodeDiff {
            node_added: old_node.is_none(),
            node_removed: new_node.is_none(),
            ..NodeDiff::default()
        };
        if let (Some(a), Some(b)) = (old_node, new_node) {
            d.node_fields = changed_fields(a, b);
            // The node's effective supervision may change through the cluster default.
            if self.node_supervision(a) != new.node_supervision(b)
                && !d.node_fields.iter().any(|f| f == "supervision")
            {
                d.node_fields.push("supervision".to_owned());
            }
        }
        for old in self.actors_on(name) {
            match new.actors_on(name).find(|a| a.name == old.name) {
                None => d.removed.push(old.name.clone()),
                Some(cur) => {
                    let fields = actor_fields(old, cur);
                    if fields.is_empty() {
                        d.unchanged.push(old.name.clone());
                    } else {
                        d.changed.push(ActorChange {
                            name: old.name.clone(),
                            fields,
                            new: cur.clone(),
                        });
                    }
                }
            }
        }
        for cur in new.actors_on(name) {
            if !self.actors_on(name).any(|a| a.name == cur.name) {
                d.added.push(cur.clone());
            }
        }
        d
    }
}
