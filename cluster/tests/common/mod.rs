//! Test nodes: real quinn endpoints on loopback, each on its own tokio runtime so that dropping
//! the runtime kills the node silently, as a crashed process would.

#![allow(dead_code)] // Each test file uses a different part of this support module.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use colony_certs::{IssueOptions, NodeIdentity, init_ca, issue_node_cert};
use colony_cluster::{Cluster, ClusterSettings, PeerSpec};

/// A free UDP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A cluster CA in a temporary directory, with certificates issued on demand.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test", false).unwrap();
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn issue(&self, node: &str) -> NodeIdentity {
        let files = issue_node_cert(self.path(), node, &IssueOptions::default()).unwrap();
        NodeIdentity::load(&self.path().join("ca.pem"), &files.cert, &files.key).unwrap()
    }

    /// PEM paths (ca, cert, key) of a node certificate with custom options.
    pub fn issue_files(&self, node: &str, opts: &IssueOptions) -> (PathBuf, PathBuf, PathBuf) {
        let files = issue_node_cert(self.path(), node, opts).unwrap();
        (self.path().join("ca.pem"), files.cert, files.key)
    }
}

/// A node's place in a test cluster.
#[derive(Clone)]
pub struct Spec {
    pub name: String,
    pub listen: Option<SocketAddr>,
}

pub fn spec(name: &str, listens: bool) -> Spec {
    let listen = listens.then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
    Spec {
        name: name.to_owned(),
        listen,
    }
}

pub fn settings(me: &Spec, all: &[Spec]) -> ClusterSettings {
    ClusterSettings {
        node: me.name.clone(),
        listen: me.listen,
        peers: all
            .iter()
            .filter(|s| s.name != me.name)
            .map(|s| PeerSpec {
                name: s.name.clone(),
                listen: s.listen,
            })
            .collect(),
        heartbeat: Duration::from_millis(100),
        failure_timeout: Duration::from_millis(300),
        max_frame: 64 * 1024,
        call_timeout: Duration::from_secs(2),
    }
}

/// A running node and the runtime it lives on.
pub struct TestNode {
    pub cluster: Cluster,
    pub runtime: Option<tokio::runtime::Runtime>,
}

impl TestNode {
    pub fn start(settings: ClusterSettings, identity: NodeIdentity) -> TestNode {
        Self::try_start(settings, identity).unwrap()
    }

    pub fn try_start(
        settings: ClusterSettings,
        identity: NodeIdentity,
    ) -> Result<TestNode, colony_cluster::ClusterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cluster = runtime.block_on(Cluster::start(settings, identity))?;
        Ok(TestNode {
            cluster,
            runtime: Some(runtime),
        })
    }

    /// Starts a node on an address a crashed node may still be releasing.
    pub fn restart(settings: ClusterSettings, identity: NodeIdentity) -> TestNode {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Self::try_start(settings.clone(), identity.clone()) {
                Ok(node) => return node,
                Err(e) if std::time::Instant::now() > deadline => panic!("cannot restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Runs a future on this node's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.as_ref().unwrap().block_on(f)
    }

    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().unwrap().spawn(f)
    }

    /// Kills the node without a word to its peers.
    pub fn crash(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.crash();
    }
}

/// Waits up to `limit` for `f` to hold, polling every 10 ms.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Registers an actor at `name` that answers every call with `"<node>:<body as string>"` and
/// counts one-way messages into the returned receiver.
pub fn echo_actor(node: &TestNode, name: &str) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let mut mailbox = node.cluster.registry().register(name, 64);
    let me = node.cluster.node_name().to_owned();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    node.spawn(async move {
        while let Some(mut d) = mailbox.recv().await {
            let text: String = match d.decode() {
                Ok(t) => t,
                Err(e) => {
                    d.reject(e);
                    continue;
                }
            };
            if d.reply.is_some() {
                d.reply(&format!("{me}:{text}"));
            } else {
                let _ = seen_tx.send(text);
            }
        }
    });
    seen_rx
}
