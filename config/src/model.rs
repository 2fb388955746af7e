//! The typed cluster config: cluster, nodes, supervision and actors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::kinds::{ActorKind, ActorSettings};

/// A whole, valid cluster config.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The `[cluster]` table.
    pub cluster: ClusterSection,
    /// Default supervision for every node (`[supervision]`).
    pub supervision: SupervisionSettings,
    /// The `[[node]]` tables, in file order.
    pub nodes: Vec<NodeConfig>,
    /// The `[[actor]]` tables, in file order (which is also start order on each node).
    pub actors: Vec<ActorConfig>,
    /// The directory relative paths in the config are resolved against (the file's directory).
    pub base_dir: PathBuf,
    /// The file this config was read from, as the user named it.
    pub source_name: String,
}

/// `[cluster]`: cluster-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// The cluster's name (used in the CA's name and the default state directory).
    pub name: String,
    /// The cluster CA certificate; defaults to `<state_dir>/certs/ca.pem`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Where nodes keep certificates, sockets and data; defaults to `.colony/<name>`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Interval between heartbeats on a link, in milliseconds.
    #[serde(default = "defaults::heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Missed heartbeat intervals after which a peer is declared down.
    #[serde(default = "defaults::heartbeat_misses")]
    pub heartbeat_misses: u32,
    /// Largest frame a link accepts, in bytes.
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// Default timeout of a call between actors, in milliseconds.
    #[serde(default = "defaults::call_timeout_ms")]
    pub call_timeout_ms: u64,
}

impl ClusterSection {
    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// How long a silent peer stays up before it is declared down.
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms * u64::from(self.heartbeat_misses))
    }
}

/// `[[node]]`: one node of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name; must equal the DNS SAN of its certificate.
    pub name: String,
    /// QUIC listen address; a node without one only dials out (it may sit behind NAT).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Node certificate (PEM); defaults to `<certs dir>/<name>.pem`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Node private key (PEM); defaults to `<certs dir>/<name>.key`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Control socket path; defaults to `<state_dir>/<name>/control.sock`.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// HTTP address serving Prometheus metrics at `/metrics`; none by default.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Supervision of this node's root, overriding `[supervision]`.
    #[serde(default)]
    pub supervision: Option<SupervisionSettings>,
}

/// How a supervisor reacts when a child fails (OTP's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Restart only the child that failed.
    #[default]
    OneForOne,
    /// Restart every child.
    OneForAll,
    /// Restart the failed child and every child started after it.
    RestForOne,
}

/// When a child is restarted (OTP's restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only when it fails (not when it stops normally).
    Transient,
    /// Never restarted.
    Temporary,
}

/// A supervisor's strategy, restart intensity and backoff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionSettings {
    /// Which siblings restart with a failed child.
    #[serde(default)]
    pub strategy: Strategy,
    /// At most this many restarts ...
    #[serde(default = "defaults::max_restarts")]
    pub max_restarts: u32,
    /// ... within this many seconds, or the supervisor gives up and escalates.
    #[serde(default = "defaults::within_secs")]
    pub within_secs: u64,
    /// Base delay between restarts, in milliseconds: the first restart in a window is immediate,
    /// the n-th waits `backoff_ms * 2^(n-2)`, capped at `backoff_max_ms`.
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
    /// Largest delay between restarts, in milliseconds.
    #[serde(default = "defaults::backoff_max_ms")]
    pub backoff_max_ms: u64,
}

impl Default for SupervisionSettings {
    fn default() -> Self {
        SupervisionSettings {
            strategy: Strategy::default(),
            max_restarts: defaults::max_restarts(),
            within_secs: defaults::within_secs(),
            backoff_ms: defaults::backoff_ms(),
            backoff_max_ms: defaults::backoff_max_ms(),
        }
    }
}

/// `[[actor]]`: one actor, placed on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct ActorConfig {
    /// Unique on its node; the address is `node/name`.
    pub name: String,
    /// The node that runs it.
    pub node: String,
    /// When its supervisor restarts it.
    pub restart: RestartPolicy,
    /// The settings of its kind (the `kind` key selects the variant).
    pub settings: ActorSettings,
}

impl ActorConfig {
    /// This actor's address.
    pub fn address(&self) -> Address {
        Address::new(self.node.clone(), self.name.clone())
    }

    /// This actor's kind.
    pub fn kind(&self) -> ActorKind {
        self.settings.kind()
    }
}

impl Serialize for ActorConfig {
    /// The flat form of the config file: common keys, `kind`, then the kind's own keys.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let settings = match toml::Value::try_from(&self.settings).map_err(S::Error::custom)? {
            toml::Value::Table(t) => t,
            _ => return Err(S::Error::custom("actor settings must serialize to a table")),
        };
        let mut map = s.serialize_map(Some(settings.len() + 4))?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("node", &self.node)?;
        map.serialize_entry("kind", self.kind().as_str())?;
        map.serialize_entry("restart", &self.restart)?;
        for (k, v) in &settings {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl ClusterConfig {
    /// The config written back as TOML, in the same schema it is read from.
    pub fn to_toml(&self) -> String {
        #[derive(Serialize)]
        struct File<'a> {
            cluster: &'a ClusterSection,
            supervision: &'a SupervisionSettings,
            node: &'a [NodeConfig],
            actor: &'a [ActorConfig],
        }
        let file = File {
            cluster: &self.cluster,
            supervision: &self.supervision,
            node: &self.nodes,
            actor: &self.actors,
        };
        toml::to_string(&file)
            .unwrap_or_else(|e| format!("# cannot write this config as TOML: {e}\n"))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The actors placed on `node`, in start order.
    pub fn actors_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a ActorConfig> + 'a {
        self.actors.iter().filter(move |a| a.node == node)
    }

    /// The actor at `address` (top-level actors only).
    pub fn actor(&self, address: &Address) -> Option<&ActorConfig> {
        self.actors
            .iter()
            .find(|a| a.node == address.node() && a.name == address.actor())
    }

    /// A path from the config, resolved against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The state directory: `[cluster] state_dir`, or `.colony/<cluster name>` beside the config.
    pub fn state_dir(&self) -> PathBuf {
        match &self.cluster.state_dir {
            Some(dir) => self.resolve(dir),
            None => self.base_dir.join(".colony").join(&self.cluster.name),
        }
    }

    /// The cluster CA certificate's path.
    pub fn ca_path(&self) -> PathBuf {
        match &self.cluster.ca {
            Some(ca) => self.resolve(ca),
            None => self.state_dir().join("certs").join("ca.pem"),
        }
    }

    /// The directory holding the CA (and, by default, the node certificates).
    pub fn certs_dir(&self) -> PathBuf {
        let ca = self.ca_path();
        ca.parent().map(Path::to_owned).unwrap_or_default()
    }

    /// A node's certificate and key paths.
    pub fn node_cert_paths(&self, node: &NodeConfig) -> (PathBuf, PathBuf) {
        let dir = self.certs_dir();
        let cert = node.cert.as_ref().map_or_else(
            || dir.join(format!("{}.pem", node.name)),
            |p| self.resolve(p),
        );
        let key = node.key.as_ref().map_or_else(
            || dir.join(format!("{}.key", node.name)),
            |p| self.resolve(p),
        );
        (cert, key)
    }

    /// A node's control socket path.
    pub fn control_socket(&self, node: &NodeConfig) -> PathBuf {
        match &node.control_socket {
            Some(p) => self.resolve(p),
            None => self.state_dir().join(&node.name).join("control.sock"),
        }
    }

    /// A node's data directory (databases, spools) under the state directory.
    pub fn node_data_dir(&self, node: &str) -> PathBuf {
        self.state_dir().join(node)
    }

    /// The supervision settings of a node's root supervisor.
    pub fn node_supervision<'a>(&'a self, node: &'a NodeConfig) -> &'a SupervisionSettings {
        node.supervision.as_ref().unwrap_or(&self.supervision)
    }
}

pub(crate) mod defaults {
    pub fn heartbeat_ms() -> u64 {
        200
    }
    pub fn heartbeat_misses() -> u32 {
        3
    }
    pub fn max_frame_bytes() -> u32 {
        1 << 20
    }
    pub fn call_timeout_ms() -> u64 {
        5_000
    }
    pub fn max_restarts() -> u32 {
        5
    }
    pub fn within_secs() -> u64 {
        10
    }
    pub fn backoff_ms() -> u64 {
        10
    }
    pub fn backoff_max_ms() -> u64 {
        5_000
    }
}
