//! A running node: its cluster endpoint, root supervisor, system actor and control socket.
//!
//! Boot order: validate the config, load the node's certificate, bind the QUIC endpoint, bind
//! the control socket, start every actor the config places here (in file order) under the root
//! supervisor. Shutdown (SIGTERM or SIGINT) runs it backwards: actors stop in reverse start order,
//! the control socket is removed, links close with a goodbye so peers see the node leave at once.
//!
//! Every node registers a system actor at `NODE/_node` that answers its peers: its own status,
//! and operator actions on its actors. That is how any node's control socket answers for the
//! whole cluster.

pub mod system;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_cluster::{Address, CallError, Cluster};
use colony_config::ClusterConfig;
use serde::{Deserialize, Serialize};

use crate::control::protocol::{ClusterStatus, NodeEntry, NodeStatus};
use crate::supervision::supervisor::{OperatorAction, SupervisorHandle};

pub use system::SYSTEM_ACTOR;

/// How long a node waits for a peer's answer to a status request.
pub const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// What a node asks a peer's system actor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRequest {
    /// The peer's [`NodeStatus`].
    Status,
    /// Apply a cluster reload on the peer ([`crate::reload::node::NodeReport`]).
    Reload {
        /// The new config.
        source: crate::reload::node::ConfigSource,
        /// Only plan.
        dry_run: bool,
    },
    /// Reconfigure one of the peer's actors.
    Reconfigure {
        /// The actor's name on that node.
        actor: String,
        /// Settings to merge, as JSON.
        changes: String,
    },
    /// An operator action on one of the peer's actors.
    Act {
        /// The actor's name on that node.
        actor: String,
        /// What to do.
        action: ActionName,
    },
}

/// [`OperatorAction`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionName {
    /// Stop and start.
    Restart,
    /// Stop.
    Stop,
    /// Start.
    Start,
    /// Fail as a crash would.
    Kill,
}

impl From<ActionName> for OperatorAction {
    fn from(a: ActionName) -> Self {
        match a {
            ActionName::Restart => OperatorAction::Restart,
            ActionName::Stop => OperatorAction::Stop,
            ActionName::Start => OperatorAction::Start,
            ActionName::Kill => OperatorAction::Kill,
        }
    }
}

/// A node's shared state, used by the control server and the system actor.
pub struct Node {
    /// This node's name.
    pub name: String,
    /// Its cluster layer.
    pub cluster: Cluster,
    /// The config it runs (replaced by reloads).
    pub config: std::sync::RwLock<Arc<ClusterConfig>>,
    /// The file it was started with (re-read on SIGHUP).
    pub config_path: PathBuf,
    /// `--state-dir`, applied to every config it loads.
    pub state_dir_override: Option<PathBuf>,
    /// One reload at a time.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Its root supervisor.
    pub supervisor: SupervisorHandle,
    /// When it started.
    pub started: Instant,
    /// Its control socket.
    pub socket: PathBuf,
}

impl Node {
    /// The config in force.
    pub fn config(&self) -> Arc<ClusterConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the config in force.
    pub fn set_config(&self, config: Arc<ClusterConfig>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Reconfigures the actor at `address`, on whichever node it lives.
    pub async fn reconfigure(
        &self,
        address: &Address,
        changes: &serde_json::Value,
    ) -> Result<crate::reload::node::NodeReport, String> {
        self.check_actor(address)?;
        if address.node() == self.name {
            return self.reconfigure_local(address.actor(), changes).await;
        }
        let to = Address::new(address.node(), SYSTEM_ACTOR);
        let request = NodeRequest::Reconfigure {
            actor: address.actor().to_owned(),
            changes: changes.to_string(),
        };
        let timeout = Some(crate::reload::node::PEER_RELOAD_TIMEOUT);
        let reply: Result<Result<crate::reload::node::NodeReport, String>, CallError> =
            self.cluster.call(&to, None, &request, timeout).await;
        reply.map_err(|e| e.to_string())?
    }

    /// This node's own report.
    pub async fn local_status(&self) -> Result<NodeStatus, String> {
        let (supervisor, actors) = self.supervisor.status().await.ok_or("node is stopping")?;
        Ok(NodeStatus {
            node: self.name.clone(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            supervisor,
            links: self.cluster.link_stats(),
            actors,
        })
    }

    /// Every configured node's report, asking peers concurrently; unreachable ones say why.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let config = self.config();
        let asks = config.nodes.iter().map(|n| async move {
            let result = if n.name == self.name {
                self.local_status().await
            } else {
                let to = Address::new(n.name.clone(), SYSTEM_ACTOR);
                self.cluster
                    .call::<_, NodeStatus>(
                        &to,
                        None,
                        &NodeRequest::Status,
                        Some(PEER_STATUS_TIMEOUT),
                    )
                    .await
                    .map_err(|e| e.to_string())
            };
            match result {
                Ok(status) => NodeEntry {
                    node: n.name.clone(),
                    reachable: true,
                    error: None,
                    status: Some(status),
                },
                Err(e) => NodeEntry {
                    node: n.name.clone(),
                    reachable: false,
                    error: Some(e),
                    status: None,
                },
            }
        });
        let mut nodes = futures::future::join_all(asks).await;
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        ClusterStatus {
            answered_by: self.name.clone(),
            nodes,
        }
    }

    /// Applies an operator action to the actor at `address`, on whichever node it lives.
    pub async fn act(&self, address: &Address, action: ActionName) -> Result<(), String> {
        if address.path().len() == 2 && action != ActionName::Start {
            return self.end_child(address).await;
        }
        if address.path().len() != 1 {
            return Err(format!(
                "{address} is not a top-level actor; start, stop, restart and kill apply to \
                 configured actors, and stop, restart and kill to the children they report"
            ));
        }
        self.check_actor(address)?;
        if address.node() == self.name {
            return self.supervisor.act(address.actor(), action.into()).await;
        }
        let to = Address::new(address.node(), SYSTEM_ACTOR);
        let request = NodeRequest::Act {
            actor: address.actor().to_owned(),
            action,
        };
        let reply: Result<Result<(), String>, CallError> =
            self.cluster.call(&to, None, &request, None).await;
        reply.map_err(|e| e.to_string())?
    }

    /// Ends the child at `address` (`node/actor/child`) through its actor: for a broker, the
    /// client connection is cut off, and the client reconnects as it would after any failure.
    async fn end_child(&self, address: &Address) -> Result<(), String> {
        let actor = self.check_actor(address)?;
        let child = &address.path()[1];
        let body = colony_actors::end_child_message(actor.kind(), child).ok_or_else(|| {
            format!(
                "{} is a {}, which has no children to stop",
                address.top_level(),
                actor.kind()
            )
        })?;
        let from = Address::new(self.name.clone(), "_ctl");
        let reply = self
            .cluster
            .call_raw(&address.top_level(), Some(&from), body.into(), None)
            .await
            .map_err(|e| e.to_string())?;
        match colony_cluster::decode_body::<bool>(&reply) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{address} is not connected")),
            Err(e) => Err(format!("{address}: unexpected reply: {e}")),
        }
    }

    /// An error unless the config places an actor at `address`.
    pub fn check_actor(&self, address: &Address) -> Result<colony_config::ActorConfig, String> {
        let config = self.config();
        if config.node(address.node()).is_none() {
            let nodes: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(format!(
                "no node {} in the cluster; the nodes are {}",
                address.node(),
                nodes.join(", ")
            ));
        }
        config
            .actor(&address.top_level())
            .cloned()
            .ok_or_else(|| format!("no actor {} on node {}", address.actor(), address.node()))
    }
}
