//! The control socket's protocol, version 1.
//!
//! Each request and each response is one frame: a 4-byte big-endian length, then that many bytes
//! of JSON. A request is an object with `"v": 1`, `"cmd"` and the command's fields, e.g.
//! `{"v":1,"cmd":"kill","address":"edge-1/sensors"}`. A response is `{"ok": …}` or
//! `{"error": "one plain sentence"}`. Requests larger than [`MAX_REQUEST_BYTES`] are refused;
//! anything that is not a request gets an error response and the socket keeps serving.

use serde::{Deserialize, Serialize};

use colony_cluster::LinkStats;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest request the node reads.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The largest response a client reads.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A request with its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionedRequest {
    /// Protocol version.
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub request: Request,
}

/// What a client can ask a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Status of every node and actor in the cluster ([`ClusterStatus`]).
    Status,
    /// The supervision tree of every node ([`ClusterStatus`], rendered as a tree).
    Tree,
    /// Delivers `message` to the actor at `address`.
    Send {
        /// `node/actor`.
        address: String,
        /// The kind's message, as JSON.
        message: serde_json::Value,
    },
    /// Delivers `message` and returns the actor's reply as JSON.
    Call {
        /// `node/actor`.
        address: String,
        /// The kind's message, as JSON.
        message: serde_json::Value,
        /// How long to wait for the reply.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Stops and starts an actor (not counted as a failure).
    Restart {
        /// `node/actor`.
        address: String,
    },
    /// Stops an actor; it stays stopped until started.
    Stop {
        /// `node/actor`.
        address: String,
    },
    /// Starts a stopped actor.
    Start {
        /// `node/actor`.
        address: String,
    },
    /// Makes an actor fail as a crash would, so its supervisor reacts.
    Kill {
        /// `node/actor`.
        address: String,
    },
    /// Validates a new config and applies it on every node (a `ReloadReport`).
    Reload {
        /// The config's text and where its relative paths resolve.
        source: crate::reload::node::ConfigSource,
        /// Only show the plan.
        #[serde(default)]
        dry_run: bool,
    },
    /// Changes one actor's settings (a `NodeReport`).
    Reconfigure {
        /// `node/actor`.
        address: String,
        /// The settings to change, as a JSON object.
        settings: serde_json::Value,
    },
}

/// A response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Success, with the command's result.
    Ok(serde_json::Value),
    /// Failure, in one sentence.
    Error(String),
}

/// The whole cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub answered_by: String,
    /// Every node in the config, reachable or not, sorted by name.
    pub nodes: Vec<NodeEntry>,
}

/// One node in [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The node's name.
    pub node: String,
    /// False when it could not be asked.
    pub reachable: bool,
    /// Why it could not be asked.
    pub error: Option<String>,
    /// Its own report, when reachable.
    pub status: Option<NodeStatus>,
}

/// A node's report about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name.
    pub node: String,
    /// Its process id.
    pub pid: u32,
    /// How long it has run.
    pub uptime_ms: u64,
    /// Its root supervisor.
    pub supervisor: SupervisorStatus,
    /// Its links to every other node.
    pub links: Vec<LinkStats>,
    /// Its actors, in start order.
    pub actors: Vec<ActorStatus>,
}

/// A supervisor's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    /// one_for_one, one_for_all or rest_for_one.
    pub strategy: String,
    /// At most this many restarts …
    pub max_restarts: u32,
    /// … within this many seconds.
    pub within_secs: u64,
    /// Restarts inside the current window.
    pub restarts_in_window: usize,
    /// True once it exceeded its intensity and stopped its children.
    pub given_up: bool,
}

/// One actor in a node's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorStatus {
    /// `node/actor`.
    pub address: String,
    /// Its kind.
    pub kind: String,
    /// running, restarting, stopped or failed.
    pub state: String,
    /// permanent, transient or temporary.
    pub restart: String,
    /// How many times it was restarted.
    pub restarts: u64,
    /// The last failure's reason.
    pub last_error: Option<String>,
    /// How long ago the last failure was, in milliseconds.
    pub last_error_ago_ms: Option<u64>,
    /// How long it has run since its last start.
    pub uptime_ms: Option<u64>,
    /// Messages waiting in its mailbox.
    pub mailbox_depth: usize,
    /// Its mailbox's capacity.
    pub mailbox_capacity: usize,
    /// Messages handled since the node started.
    pub messages_handled: u64,
    /// Messages refused since the node started.
    pub messages_rejected: u64,
    /// Messages handled per second, lately.
    pub messages_per_sec: u64,
    /// Where its settings came from (the config file, or a reconfigure message).
    pub settings_source: String,
    /// Its settings in effect.
    pub settings: serde_json::Value,
    /// Kind-specific status.
    pub detail: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let r: VersionedRequest =
            serde_json::from_str(r#"{"v":1,"cmd":"kill","address":"edge-1/sensors"}"#).unwrap();
        assert_eq!(
            r.request,
            Request::Kill {
                address: "edge-1/sensors".into()
            }
        );
        let r: VersionedRequest = serde_json::from_str(r#"{"v":1,"cmd":"status"}"#).unwrap();
        assert_eq!(r.request, Request::Status);
        let r: VersionedRequest =
            serde_json::from_str(r#"{"v":1,"cmd":"call","address":"a/b","message":{"status":{}}}"#)
                .unwrap();
        assert!(matches!(
            r.request,
            Request::Call {
                timeout_ms: None,
                ..
            }
        ));
        assert!(serde_json::from_str::<VersionedRequest>(r#"{"v":1,"cmd":"explode"}"#).is_err());
        let ok = serde_json::to_string(&Response::Ok(serde_json::json!(1))).unwrap();
        assert_eq!(ok, r#"{"ok":1}"#);
        let err = serde_json::to_string(&Response::Error("no".into())).unwrap();
        assert_eq!(err, r#"{"error":"no"}"#);
    }
}
