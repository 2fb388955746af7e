//! `NODE/_node`: the system actor through which peers ask a node for its status and act on its
//! actors.

use std::sync::Arc;

use tracing::debug;

use super::{Node, NodeRequest};

/// The system actor's name on every node.
pub const SYSTEM_ACTOR: &str = "_node";

/// Serves peers' requests until the node stops.
pub async fn serve(node: Arc<Node>) {
    let mut mailbox = node.cluster.registry().register(SYSTEM_ACTOR, 256);
    while let Some(mut delivery) = mailbox.recv().await {
        let request: NodeRequest = match delivery.decode() {
            Ok(r) => r,
            Err(e) => {
                debug!("refused a system request: {e}");
                delivery.reject(e);
                continue;
            }
        };
        let node = node.clone();
        // Each request on its own task: an action may wait on the supervisor.
        tokio::spawn(async move {
            match request {
                NodeRequest::Status => match node.local_status().await {
                    Ok(status) => delivery.reply(&status),
                    Err(e) => delivery.reject(colony_cluster::CallError::Rejected(e)),
                },
                NodeRequest::Reload { source, dry_run } => {
                    let result = match source.parse(node.state_dir_override.as_deref()) {
                        Ok(config) => Ok(node.reload_local(config, dry_run, "reload").await),
                        Err(e) => Err(e),
                    };
                    delivery.reply(&result);
                }
                NodeRequest::Reconfigure { actor, changes } => {
                    let result = match serde_json::from_str::<serde_json::Value>(&changes) {
                        Ok(changes) => node.reconfigure_local(&actor, &changes).await,
                        Err(e) => Err(format!("settings are not JSON: {e}")),
                    };
                    delivery.reply(&result);
                }
                NodeRequest::Act { actor, action } => {
                    let result = node.supervisor.act(&actor, action.into()).await;
                    delivery.reply(&result);
                }
            }
        });
    }
}
