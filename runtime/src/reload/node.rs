//! Applying reloads on a node, and spreading a cluster reload to every node.
//!
//! A reload is validated in full before anything happens. Then every node — this one directly,
//! the others through their system actor — computes and applies its own plan. Applying is atomic
//! per node: the plan's actors must all report started within [`START_TIMEOUT`], or the node
//! undoes the plan and keeps its previous config. A node that is down is reported as not
//! reloaded; it keeps the config it has until it is started again with the new file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use colony_cluster::{Address, PeerSpec};
use colony_config::{ClusterConfig, FileChecks};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::plan::{NodePlan, PlanSummary};
use crate::node::{Node, NodeRequest, SYSTEM_ACTOR};

/// How long a started or restarted actor has to come up before the reload is undone.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload waits for a peer node's answer.
pub const PEER_RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A config as it travels to peers: its text, and where its relative paths resolve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSource {
    /// The TOML text.
    pub text: String,
    /// The file name, for error messages.
    pub name: String,
    /// The directory relative paths resolve against.
    pub base_dir: PathBuf,
}

impl ConfigSource {
    /// Reads a config file.
    pub fn read(path: &Path) -> Result<ConfigSource, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the config: {e}", path.display()))?;
        let absolute = std::path::absolute(path).map_err(|e| e.to_string())?;
        let base_dir = absolute.parent().map(Path::to_owned).unwrap_or_default();
        Ok(ConfigSource {
            text,
            name: path.display().to_string(),
            base_dir,
        })
    }

    /// Parses and validates it, with the same errors as `colony check`.
    pub fn parse(&self, state_dir: Option<&Path>) -> Result<ClusterConfig, String> {
        let mut config = ClusterConfig::from_toml_str_in(
            &self.text,
            &self.name,
            &self.base_dir,
            FileChecks::Check,
        )
        .map_err(|e| e.to_string())?;
        crate::commands::check::runnable(&config, &self.name)?;
        if let Some(dir) = state_dir {
            config.cluster.state_dir = Some(dir.to_owned());
        }
        Ok(config)
    }
}

/// What happened on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The plan was applied.
    Applied,
    /// Nothing to change.
    NoChange,
    /// Only shown (dry run).
    DryRun,
    /// A step failed; the node went back to its previous config.
    RolledBack,
    /// The node could not be reached; it keeps its config.
    NotReloaded,
}

/// One node's part of a reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node.
    pub node: String,
    /// What happened.
    pub outcome: Outcome,
    /// Its plan.
    pub plan: PlanSummary,
    /// What failed, if anything.
    pub errors: Vec<String>,
}

/// A whole reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Per node, sorted by name.
    pub nodes: Vec<NodeReport>,
}

impl ReloadReport {
    /// True when every node applied its plan (or had nothing to do, or it was a dry run).
    pub fn succeeded(&self) -> bool {
        self.nodes.iter().all(|n| {
            matches!(
                n.outcome,
                Outcome::Applied | Outcome::NoChange | Outcome::DryRun
            )
        })
    }
}

impl Node {
    /// Applies `new` on this node atomically (or only plans it, for a dry run).
    pub async fn reload_local(
        &self,
        new: ClusterConfig,
        dry_run: bool,
        source: &str,
    ) -> NodeReport {
        let _one_at_a_time = self.reload_lock.lock().await;
        let old = self.config();
        let plan = NodePlan::between(&old, &new, &self.name);
        let summary = plan.summary();
        let report = |outcome, errors| NodeReport {
            node: self.name.clone(),
            outcome,
            plan: summary.clone(),
            errors,
        };
        if dry_run {
            return report(Outcome::DryRun, Vec::new());
        }
        let peers = new
            .nodes
            .iter()
            .filter(|n| n.name != self.name)
            .map(|n| PeerSpec {
                name: n.name.clone(),
                listen: n.listen,
            })
            .collect::<Vec<_>>();
        let new = Arc::new(new);
        if plan.is_noop() {
            self.set_config(new);
            return report(Outcome::NoChange, Vec::new());
        }
        let peers_changed = plan.peers_changed;
        // systemd (Type=notify) sees the reload; these do nothing outside systemd.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let report = self
            .apply_plan(plan, new, peers, peers_changed, source)
            .await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        NodeReport {
            plan: summary,
            ..report
        }
    }

    async fn apply_plan(
        &self,
        plan: NodePlan,
        new: Arc<ClusterConfig>,
        peers: Vec<PeerSpec>,
        peers_changed: bool,
        source: &str,
    ) -> NodeReport {
        let report = |outcome, errors| NodeReport {
            node: self.name.clone(),
            outcome,
            plan: PlanSummary::default(),
            errors,
        };
        let applied = match self.supervisor.apply(plan, new.clone(), source).await {
            Ok(a) => a,
            Err(e) => return report(Outcome::RolledBack, vec![e]),
        };
        let mut errors = Vec::new();
        for (name, started) in applied.starts {
            match tokio::time::timeout(START_TIMEOUT, started).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(reason))) => {
                    errors.push(format!("{}/{name} failed to start: {reason}", self.name))
                }
                Ok(Err(_)) => errors.push(format!(
                    "{}/{name} was removed before it started",
                    self.name
                )),
                Err(_) => errors.push(format!(
                    "{}/{name} did not start within {START_TIMEOUT:?}",
                    self.name
                )),
            }
        }
        if errors.is_empty() {
            self.set_config(new);
            if peers_changed {
                self.cluster.update_peers(peers);
            }
            info!(source, "reload applied");
            report(Outcome::Applied, errors)
        } else {
            warn!("reload failed ({}); rolling back", errors.join("; "));
            self.supervisor.undo(applied.undo).await;
            report(Outcome::RolledBack, errors)
        }
    }

    /// Validates `source` and reloads every node of the old and new configs.
    pub async fn reload_cluster(
        &self,
        source: ConfigSource,
        dry_run: bool,
    ) -> Result<ReloadReport, String> {
        let new = source.parse(self.state_dir_override.as_deref())?;
        let old = self.config();
        let mut names: Vec<String> = old
            .nodes
            .iter()
            .chain(&new.nodes)
            .map(|n| n.name.clone())
            .collect();
        names.sort();
        names.dedup();
        let asks = names.into_iter().map(|name| {
            let (source, new, old) = (source.clone(), new.clone(), old.clone());
            async move {
                if name == self.name {
                    return self.reload_local(new, dry_run, "reload").await;
                }
                let plan = NodePlan::between(&old, &new, &name).summary();
                if new.node(&name).is_none() {
                    let errors = vec!["removed from the config: stop it".to_owned()];
                    return NodeReport {
                        node: name,
                        outcome: Outcome::NotReloaded,
                        plan,
                        errors,
                    };
                }
                let to = Address::new(name.clone(), SYSTEM_ACTOR);
                let request = NodeRequest::Reload { source, dry_run };
                match self
                    .cluster
                    .call::<_, Result<NodeReport, String>>(
                        &to,
                        None,
                        &request,
                        Some(PEER_RELOAD_TIMEOUT),
                    )
                    .await
                {
                    Ok(Ok(report)) => report,
                    Ok(Err(e)) => NodeReport {
                        node: name,
                        outcome: Outcome::RolledBack,
                        plan,
                        errors: vec![e],
                    },
                    Err(e) => NodeReport {
                        node: name,
                        outcome: Outcome::NotReloaded,
                        plan,
                        errors: vec![e.to_string()],
                    },
                }
            }
        });
        let nodes = futures::future::join_all(asks).await;
        Ok(ReloadReport { nodes })
    }

    /// Changes one of this node's actors: `changes` (a JSON object of settings) merged onto its
    /// current settings, validated like a config, applied in place or by a restart.
    pub async fn reconfigure_local(
        &self,
        actor: &str,
        changes: &serde_json::Value,
    ) -> Result<NodeReport, String> {
        let old = self.config();
        let new = with_actor_settings(&old, &self.name, actor, changes)?;
        let report = self.reload_local(new, false, "reconfigure").await;
        match report.outcome {
            Outcome::RolledBack => Err(report.errors.join("; ")),
            _ => Ok(report),
        }
    }

    /// Re-reads the file this node was started with and applies it here (SIGHUP).
    pub async fn reload_from_file(&self) -> Result<NodeReport, String> {
        let source = ConfigSource::read(&self.config_path)?;
        let new = source.parse(self.state_dir_override.as_deref())?;
        Ok(self.reload_local(new, false, "reload (SIGHUP)").await)
    }
}

/// `config` with the settings of `node/actor` replaced by its current settings merged with
/// `changes`, validated in full.
pub fn with_actor_settings(
    config: &ClusterConfig,
    node: &str,
    actor: &str,
    changes: &serde_json::Value,
) -> Result<ClusterConfig, String> {
    let serde_json::Value::Object(changes) = changes else {
        return Err("settings must be a JSON object of the kind's settings, e.g. {\"anti_flap_threshold\": 0.1}".to_owned());
    };
    for key in ["name", "node", "kind"] {
        if changes.contains_key(key) {
            return Err(format!(
                "`{key}` cannot change by reconfiguration; edit the config and reload"
            ));
        }
    }
    let text = config.to_toml();
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e| format!("cannot rewrite the config: {e}"))?;
    let actors = doc
        .get_mut("actor")
        .and_then(toml::Value::as_array_mut)
        .ok_or("the config has no actors")?;
    let entry = actors
        .iter_mut()
        .filter_map(toml::Value::as_table_mut)
        .find(|t| {
            t.get("node").and_then(toml::Value::as_str) == Some(node)
                && t.get("name").and_then(toml::Value::as_str) == Some(actor)
        })
        .ok_or_else(|| format!("no actor {actor} on node {node}"))?;
    for (key, value) in changes {
        let value = toml::Value::try_from(value).map_err(|e| format!("setting `{key}`: {e}"))?;
        entry.insert(key.clone(), value);
    }
    let text = toml::to_string(&doc).map_err(|e| format!("cannot rewrite the config: {e}"))?;
    let name = format!("reconfigure {node}/{actor}");
    let mut new = ClusterConfig::from_toml_str_in(&text, &name, &config.base_dir, FileChecks::Skip)
        .map_err(|e| {
            // Positions refer to the rewritten text, not to anything the operator wrote.
            e.iter()
                .map(|e| format!("{name}: {}", e.message))
                .collect::<Vec<_>>()
                .join("\n")
        })?;
    new.source_name.clone_from(&config.source_name);
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[cluster]
name = "t"
[[node]]
name = "a"
listen = "127.0.0.1:7001"
[[actor]]
name = "lb"
node = "a"
kind = "balancer"
"#;

    #[test]
    fn reconfigure_merges_and_validates() {
        let config = ClusterConfig::from_toml_str(CONFIG, "t.toml").unwrap();
        let new = with_actor_settings(
            &config,
            "a",
            "lb",
            &serde_json::json!({"anti_flap_threshold": 0.2}),
        )
        .unwrap();
        let plan = NodePlan::between(&config, &new, "a");
        assert_eq!(plan.summary().change_in_place, ["lb: anti_flap_threshold"]);

        let err = with_actor_settings(
            &config,
            "a",
            "lb",
            &serde_json::json!({"anti_flap_threshold": 3}),
        )
        .unwrap_err();
        assert!(
            err.contains("anti_flap_threshold must be between 0 and 1, not 3"),
            "{err}"
        );
        let err =
            with_actor_settings(&config, "a", "lb", &serde_json::json!({"bogus": 1})).unwrap_err();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        let err = with_actor_settings(&config, "a", "nope", &serde_json::json!({})).unwrap_err();
        assert_eq!(err, "no actor nope on node a");
        let err = with_actor_settings(&config, "a", "lb", &serde_json::json!({"kind": "broker"}))
            .unwrap_err();
        assert!(err.contains("`kind` cannot change"), "{err}");
        assert!(with_actor_settings(&config, "a", "lb", &serde_json::json!([1])).is_err());
    }
}
