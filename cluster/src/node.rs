//! The cluster node: one quinn endpoint, a link per peer, and sending by address.
//!
//! Which side dials is fixed so that two nodes never hold two connections: a node dials every
//! peer that listens whose name sorts after its own, and a node without a listen address dials
//! every peer that listens. An accepted connection from a peer that should not have dialled is
//! refused. A dialler never gives up on a configured peer: it re-dials with jittered exponential
//! backoff (50 ms doubling to 1 s). When a peer reconnects while its old connection still looks
//! alive (it restarted), the new connection replaces the old one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{broadcast, oneshot};
use tracing::{Instrument, debug, info, warn};

use colony_certs::{AllowedNodes, NodeIdentity};
use colony_config::{Address, ClusterConfig};

use crate::ClusterError;
use crate::envelope::{
    CallError, decode_body, decode_envelope, decode_reply, encode_body, encode_envelope,
    encode_reply, envelope_len,
};
use crate::frame::{Frame, FrameDecoder, FrameKind, frame_bytes, put_frame_header};
use crate::link::{Link, run_writer};
use crate::registry::{Datagram, Delivery, FrameSink, Registry, ReplyHandle};
use crate::relay::{RelayHub, RelayRoute};
use crate::stats::{LinkState, LinkStats, NodeEvent, unix_ms};
use crate::transport;

/// Another node as this node sees it in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Its name (the DNS SAN of its certificate).
    pub name: String,
    /// Its QUIC address, if it listens.
    pub listen: Option<SocketAddr>,
}

/// Everything a node's cluster layer needs from the config.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's name.
    pub node: String,
    /// This node's QUIC listen address; `None` for a dial-only node.
    pub listen: Option<SocketAddr>,
    /// Every other node.
    pub peers: Vec<PeerSpec>,
    /// Heartbeat (QUIC keep-alive) interval.
    pub heartbeat: Duration,
    /// Silence after which a peer is down.
    pub failure_timeout: Duration,
    /// Largest frame sent or accepted.
    pub max_frame: usize,
    /// Default call timeout.
    pub call_timeout: Duration,
}

impl ClusterSettings {
    /// The settings of node `node` in `config`; `None` when the config has no such node.
    pub fn from_config(config: &ClusterConfig, node: &str) -> Option<ClusterSettings> {
        let me = config.node(node)?;
        Some(ClusterSettings {
            node: node.to_owned(),
            listen: me.listen,
            peers: config
                .nodes
                .iter()
                .filter(|n| n.name != node)
                .map(|n| PeerSpec {
                    name: n.name.clone(),
                    listen: n.listen,
                })
                .collect(),
            heartbeat: config.cluster.heartbeat(),
            failure_timeout: config.cluster.failure_timeout(),
            max_frame: config.cluster.max_frame_bytes as usize,
            call_timeout: Duration::from_millis(config.cluster.call_timeout_ms),
        })
    }
}

struct Peer {
    spec: PeerSpec,
    link: Option<Arc<Link>>,
    since: SystemTime,
    refused_handshakes: u64,
    last_error: Option<String>,
    /// Set when the peer leaves the config, to stop its dialler.
    removed: Arc<AtomicBool>,
}

struct Pending {
    node: Arc<str>,
    tx: oneshot::Sender<Result<Bytes, CallError>>,
}

pub(crate) struct Inner {
    pub(crate) name: Arc<str>,
    listen: Option<SocketAddr>,
    pub(crate) settings: RwLock<ClusterSettings>,
    endpoint: quinn::Endpoint,
    pub(crate) registry: Registry,
    peers: RwLock<HashMap<String, Peer>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    events: broadcast::Sender<NodeEvent>,
    allowed: AllowedNodes,
    refused_unknown: AtomicU64,
    stopping: AtomicBool,
    pub(crate) relay: RelayHub,
    pub(crate) max_frame: usize,
}

/// A handle to this node's cluster layer; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

/// The route to a node: its direct link, or a relay session.
pub(crate) enum Route {
    Direct(Arc<Link>),
    Relayed(RelayRoute),
}

impl Route {
    async fn send(&self, frame: Bytes) -> bool {
        self.send_frames(frame, 1).await
    }

    /// Queues `count` whole frames laid end to end in `frames`.
    async fn send_frames(&self, frames: Bytes, count: u64) -> bool {
        match self {
            Route::Direct(link) => link.send_frames(frames, count).await,
            // The far end decodes every frame in a sealed relay message.
            Route::Relayed(r) => r.send_frames(frames, count).await,
        }
    }
}

/// Bytes of frames [`Cluster::send_batch`] queues on a link as one item at most (a single frame
/// may be larger, up to the frame limit). The item holds room in the link's queue for every frame
/// it carries, so batches are bounded exactly like single sends.
pub const BATCH_CHUNK: usize = 64 * 1024;

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Binds the endpoint and starts dialling and accepting. Must run inside a tokio runtime.
    pub async fn start(
        settings: ClusterSettings,
        identity: NodeIdentity,
    ) -> Result<Cluster, ClusterError> {
        colony_certs::install_crypto_provider();
        if identity.name() != settings.node {
            return Err(ClusterError::Config(format!(
                "the certificate is for node '{}', not '{}'",
                identity.name(),
                settings.node
            )));
        }
        let names = settings
            .peers
            .iter()
            .map(|p| p.name.clone())
            .chain([settings.node.clone()]);
        let allowed = AllowedNodes::new(names);
        let client = transport::client_config(
            &identity,
            allowed.clone(),
            settings.heartbeat,
            settings.failure_timeout,
        )?;
        let mut endpoint = match settings.listen {
            Some(addr) => {
                let server = transport::server_config(
                    &identity,
                    allowed.clone(),
                    settings.heartbeat,
                    settings.failure_timeout,
                )?;
                quinn::Endpoint::server(server, addr)
                    .map_err(|e| ClusterError::Bind { addr, reason: e })?
            }
            None => {
                let v6 = settings
                    .peers
                    .iter()
                    .filter_map(|p| p.listen)
                    .any(|a| a.is_ipv6());
                let addr: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
                    .parse()
                    .map_err(|_| ClusterError::Config("bad bind".into()))?;
                quinn::Endpoint::client(addr).map_err(|e| ClusterError::Bind { addr, reason: e })?
            }
        };
        endpoint.set_default_client_config(client);
        let (events, _) = broadcast::channel(1024);
        let now = SystemTime::now();
        let peers = settings
            .peers
            .iter()
            .map(|p| {
                let peer = Peer {
                    spec: p.clone(),
                    link: None,
                    since: now,
                    refused_handshakes: 0,
                    last_error: None,
                    removed: Arc::new(AtomicBool::new(false)),
                };
                (p.name.clone(), peer)
            })
            .collect();
        let inner = Arc::new(Inner {
            name: settings.node.clone().into(),
            listen: settings.listen,
            max_frame: settings.max_frame,
            relay: RelayHub::new(identity),
            settings: RwLock::new(settings),
            endpoint,
            registry: Registry::default(),
            peers: RwLock::new(peers),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            events,
            allowed,
            refused_unknown: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        if inner.listen.is_some() {
            tokio::spawn(accept_loop(inner.clone()).in_current_span());
        }
        let to_dial: Vec<String> = read(&inner.peers)
            .values()
            .filter(|p| inner.dials(&p.spec))
            .map(|p| p.spec.name.clone())
            .collect();
        for peer in to_dial {
            inner.spawn_dialler(peer);
        }
        tokio::spawn(crate::relay::maintain(inner.clone()).in_current_span());
        Ok(Cluster { inner })
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.name
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    /// This node's actors.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Node up/down events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// The default call timeout.
    pub fn call_timeout(&self) -> Duration {
        read(&self.inner.settings).call_timeout
    }

    /// The configured peers' names, sorted.
    pub fn peers(&self) -> Vec<String> {
        let mut v: Vec<String> = read(&self.inner.peers).keys().cloned().collect();
        v.sort();
        v
    }

    /// True when `node` is this node or reachable now.
    pub fn is_up(&self, node: &str) -> bool {
        node == &*self.inner.name || self.inner.route(node).is_some()
    }

    /// Sends `message` to `to` without waiting for an answer. Waits while the receiver (or the
    /// link to it) is full.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        to: &Address,
        from: Option<&Address>,
        message: &T,
    ) -> Result<(), CallError> {
        let body = encode_body(message)?;
        self.send_raw(to, from, Bytes::from(body)).await
    }

    /// Sends an already encoded body.
    pub async fn send_raw(
        &self,
        to: &Address,
        from: Option<&Address>,
        body: Bytes,
    ) -> Result<(), CallError> {
        if to.node() == &*self.inner.name {
            let delivery = Delivery {
                from: from.cloned(),
                body,
                reply: None,
            };
            return self
                .inner
                .deliver_local(&to.path().join("/"), delivery)
                .await
                .map_err(|(e, _)| e);
        }
        let frame = self
            .inner
            .envelope_frame(FrameKind::Send, 0, to, from, &body)?;
        let route = self
            .inner
            .route(to.node())
            .ok_or_else(|| CallError::NodeDown(to.node().to_owned()))?;
        if route.send(frame).await {
            Ok(())
        } else {
            Err(CallError::NodeDown(to.node().to_owned()))
        }
    }

    /// Sends an already encoded body to an actor on this node if its mailbox has room now, as
    /// [`Cluster::send_raw`] would without waiting; false (nothing sent) when `to` is on another
    /// node, is not there, or has no room.
    pub fn try_send_local(&self, to: &Address, from: Option<&Address>, body: Bytes) -> bool {
        to.node() == &*self.inner.name
            && self.inner.registry.try_deliver(
                &to.path().join("/"),
                Delivery {
                    from: from.cloned(),
                    body,
                    reply: None,
                },
            )
    }

    /// Sends already encoded bodies to `to`, in order, as [`Cluster::send_raw`] would one by one
    /// but with one queue operation per [`BATCH_CHUNK`] bytes of frames rather than per message.
    ///
    /// Waits while the receiver (or the link to it) is full. Stops at the first body too large for
    /// a frame: the bodies before it are sent, it and the rest are not.
    pub async fn send_batch(
        &self,
        to: &Address,
        from: Option<&Address>,
        bodies: impl IntoIterator<Item = Bytes>,
    ) -> Result<(), CallError> {
        if to.node() == &*self.inner.name {
            for body in bodies {
                self.send_raw(to, from, body).await?;
            }
            return Ok(());
        }
        let route = self
            .inner
            .route(to.node())
            .ok_or_else(|| CallError::NodeDown(to.node().to_owned()))?;
        // A relayed chunk travels inside one relay frame, which must stay under the frame limit.
        let limit = BATCH_CHUNK.min(self.inner.max_frame / 2);
        let mut frames = BytesMut::new();
        let mut count = 0;
        let mut outcome = Ok(());
        for body in bodies {
            let before = frames.len();
            if let Err(e) =
                self.inner
                    .put_envelope_frame(&mut frames, FrameKind::Send, 0, to, from, &body)
            {
                outcome = Err(e);
                break;
            }
            count += 1;
            if frames.len() >= limit && count > 1 {
                // Send what came before this frame; it starts the next chunk.
                let chunk = frames.split_to(before).freeze();
                if !route.send_frames(chunk, count - 1).await {
                    return Err(CallError::NodeDown(to.node().to_owned()));
                }
                count = 1;
            }
        }
        if count > 0 && !route.send_frames(frames.freeze(), count).await {
            return Err(CallError::NodeDown(to.node().to_owned()));
        }
        outcome
    }

    /// Sends `message` to `to` and waits for the reply, decoded as `R`.
    pub async fn call<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        to: &Address,
        from: Option<&Address>,
        message: &T,
        timeout: Option<Duration>,
    ) -> Result<R, CallError> {
        let body = encode_body(message)?;
        let reply = self.call_raw(to, from, Bytes::from(body), timeout).await?;
        decode_body(&reply)
    }

    /// Calls with an already encoded body; returns the encoded reply.
    pub async fn call_raw(
        &self,
        to: &Address,
        from: Option<&Address>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, CallError> {
        let timeout = timeout.unwrap_or_else(|| self.call_timeout());
        let timeout_err = || CallError::Timeout(timeout.as_millis() as u64);
        let (tx, rx) = oneshot::channel();
        if to.node() == &*self.inner.name {
            let path = to.path().join("/");
            let delivery = Delivery {
                from: from.cloned(),
                body,
                reply: Some(ReplyHandle::local(tx, to.to_string())),
            };
            let deliver = self.inner.deliver_local(&path, delivery);
            match tokio::time::timeout(timeout, deliver).await {
                Err(_) => return Err(timeout_err()),
                // The undelivered call's reply handle answers into a channel nobody reads.
                Ok(Err((e, _undelivered))) => return Err(e),
                Ok(Ok(())) => {}
            }
            return match tokio::time::timeout(timeout, rx).await {
                Err(_) => Err(timeout_err()),
                Ok(Err(_)) => Err(CallError::Rejected(format!("{to} stopped before replying"))),
                Ok(Ok(r)) => r,
            };
        }
        let node: Arc<str> = to.node().into();
        let route = self
            .inner
            .route(&node)
            .ok_or_else(|| CallError::NodeDown(node.to_string()))?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = self
            .inner
            .envelope_frame(FrameKind::Call, id, to, from, &body)?;
        lock(&self.inner.pending).insert(
            id,
            Pending {
                node: node.clone(),
                tx,
            },
        );
        let outcome = tokio::time::timeout(timeout, async {
            if !route.send(frame).await {
                return Err(CallError::NodeDown(node.to_string()));
            }
            drop(route);
            rx.await
                .unwrap_or_else(|_| Err(CallError::NodeDown(node.to_string())))
        })
        .await;
        lock(&self.inner.pending).remove(&id);
        outcome.unwrap_or_else(|_| Err(timeout_err()))
    }

    /// Sends an unreliable datagram to the actor at `to` (on another node).
    pub fn send_datagram(&self, to: &Address, payload: &[u8]) -> Result<(), DatagramError> {
        let path = to.path().join("/");
        let Some(Route::Direct(link)) = self.inner.route(to.node()) else {
            return Err(DatagramError::NoLink(to.node().to_owned()));
        };
        let name = path.as_bytes();
        if name.len() > 255 {
            return Err(DatagramError::TooLarge {
                size: name.len(),
                max: 255,
            });
        }
        let mut buf = BytesMut::with_capacity(1 + name.len() + payload.len());
        buf.put_u8(name.len() as u8);
        buf.put_slice(name);
        buf.put_slice(payload);
        let max = link.conn.max_datagram_size().unwrap_or(0);
        if buf.len() > max {
            return Err(DatagramError::TooLarge {
                size: payload.len(),
                max: max.saturating_sub(1 + name.len()),
            });
        }
        link.conn
            .send_datagram(buf.freeze())
            .map_err(|e| DatagramError::Send(e.to_string()))
    }

    /// The largest datagram payload that fits to an actor called `path` on `node` now.
    pub fn max_datagram_payload(&self, node: &str, path: &str) -> Option<usize> {
        match self.inner.route(node)? {
            Route::Direct(link) => link
                .conn
                .max_datagram_size()
                .map(|m| m.saturating_sub(1 + path.len())),
            Route::Relayed(_) => None,
        }
    }

    /// Statistics of every configured peer link, sorted by peer.
    pub fn link_stats(&self) -> Vec<LinkStats> {
        let peers = read(&self.inner.peers);
        let mut out: Vec<LinkStats> = peers
            .values()
            .map(|p| {
                let mut s = LinkStats {
                    peer: p.spec.name.clone(),
                    state: LinkState::Down,
                    since_unix_ms: unix_ms(p.since),
                    via: None,
                    remote_addr: None,
                    rtt_us: 0,
                    packets_sent: 0,
                    packets_lost: 0,
                    bytes_out: 0,
                    bytes_in: 0,
                    messages_out: 0,
                    messages_in: 0,
                    frames_rejected: 0,
                    datagrams_dropped: 0,
                    refused_handshakes: p.refused_handshakes,
                    last_error: p.last_error.clone(),
                };
                if let Some(link) = &p.link {
                    let q = link.conn.stats();
                    s.state = LinkState::Up;
                    s.since_unix_ms = unix_ms(link.since);
                    s.remote_addr = Some(link.conn.remote_address().to_string());
                    s.rtt_us = q.path.rtt.as_micros() as u64;
                    s.packets_sent = q.path.sent_packets;
                    s.packets_lost = q.path.lost_packets;
                    s.bytes_out = q.udp_tx.bytes;
                    s.bytes_in = q.udp_rx.bytes;
                    s.messages_out = link.messages_out.load(Ordering::Relaxed);
                    s.messages_in = link.messages_in.load(Ordering::Relaxed);
                    s.frames_rejected = link.frames_rejected.load(Ordering::Relaxed);
                    s.datagrams_dropped = link.datagrams_dropped.load(Ordering::Relaxed);
                } else {
                    self.inner.relay.fill_stats(&mut s);
                }
                s
            })
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Which connection carries messages to `peer` now: its state and since when (Unix ms), as
    /// [`Cluster::link_stats`] tells them; `None` when the peer is down or unknown. Cheap (no
    /// transport statistics), for a check before and after each batch of messages.
    pub fn link_generation(&self, peer: &str) -> Option<(LinkState, u64)> {
        let peers = read(&self.inner.peers);
        let p = peers.get(peer)?;
        match &p.link {
            Some(link) => Some((LinkState::Up, unix_ms(link.since))),
            None => self
                .inner
                .relay
                .relayed_since(peer)
                .map(|since| (LinkState::Relayed, since)),
        }
    }

    /// Handshakes refused from nodes whose name is unknown (foreign CA, garbage).
    pub fn refused_unknown_handshakes(&self) -> u64 {
        self.inner.refused_unknown.load(Ordering::Relaxed)
    }

    /// Replaces the set of peers (hot reload): new peers are dialled, removed ones disconnected.
    pub fn update_peers(&self, peers: Vec<PeerSpec>) {
        let inner = &self.inner;
        inner.allowed.replace(
            peers
                .iter()
                .map(|p| p.name.clone())
                .chain([inner.name.to_string()]),
        );
        let mut to_dial = Vec::new();
        {
            let mut table = write(&inner.peers);
            table.retain(|name, p| {
                let keep = peers
                    .iter()
                    .any(|n| &n.name == name && n.listen == p.spec.listen);
                if !keep {
                    p.removed.store(true, Ordering::Relaxed);
                    if let Some(link) = &p.link {
                        link.conn
                            .close(0u32.into(), b"removed from the cluster config");
                    }
                }
                keep
            });
            for spec in &peers {
                if !table.contains_key(&spec.name) {
                    table.insert(
                        spec.name.clone(),
                        Peer {
                            spec: spec.clone(),
                            link: None,
                            since: SystemTime::now(),
                            refused_handshakes: 0,
                            last_error: None,
                            removed: Arc::new(AtomicBool::new(false)),
                        },
                    );
                    if inner.dials(spec) {
                        to_dial.push(spec.name.clone());
                    }
                }
            }
        }
        write(&inner.settings).peers = peers;
        for name in to_dial {
            inner.spawn_dialler(name);
        }
    }

    /// Closes every link and the endpoint, waiting briefly for the peers to hear it.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::Relaxed);
        inner.endpoint.close(0u32.into(), b"node stopping");
        let _ = tokio::time::timeout(Duration::from_millis(500), inner.endpoint.wait_idle()).await;
    }
}

/// Why a datagram was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// No direct link to the node (datagrams are not relayed).
    #[error("no direct link to node {0}")]
    NoLink(String),
    /// Larger than the path carries.
    #[error("datagram payload of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// Largest payload that fits.
        max: usize,
    },
    /// QUIC refused it.
    #[error("datagram not sent: {0}")]
    Send(String),
}

impl Inner {
    /// True when this node dials `peer` (see the module docs).
    fn dials(&self, peer: &PeerSpec) -> bool {
        peer.listen.is_some() && (self.listen.is_none() || *self.name < *peer.name)
    }

    /// True when `peer` is expected to dial this node.
    fn expects_dial_from(&self, peer: &PeerSpec) -> bool {
        self.listen.is_some() && (peer.listen.is_none() || *peer.name < *self.name)
    }

    pub(crate) fn route(&self, node: &str) -> Option<Route> {
        let peers = read(&self.peers);
        let peer = peers.get(node)?;
        if let Some(link) = &peer.link {
            return Some(Route::Direct(link.clone()));
        }
        drop(peers);
        self.relay.route(node).map(Route::Relayed)
    }

    /// The direct link to `node`, if any.
    pub(crate) fn direct_link(&self, node: &str) -> Option<Arc<Link>> {
        read(&self.peers).get(node).and_then(|p| p.link.clone())
    }

    /// Peers that listen (candidates to relay through), sorted by name.
    pub(crate) fn listening_peers_up(&self) -> Vec<Arc<Link>> {
        let peers = read(&self.peers);
        let mut v: Vec<Arc<Link>> = peers
            .values()
            .filter(|p| p.spec.listen.is_some())
            .filter_map(|p| p.link.clone())
            .collect();
        v.sort_by(|a, b| a.peer.cmp(&b.peer));
        v
    }

    /// Configured peers that neither this node nor they can dial (both dial-only).
    pub(crate) fn unreachable_directly(&self) -> Vec<String> {
        if self.listen.is_some() {
            return Vec::new();
        }
        read(&self.peers)
            .values()
            .filter(|p| p.spec.listen.is_none())
            .map(|p| p.spec.name.clone())
            .collect()
    }

    pub(crate) fn is_configured(&self, node: &str) -> bool {
        read(&self.peers).contains_key(node)
    }

    pub(crate) fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    fn envelope_frame(
        &self,
        kind: FrameKind,
        id: u64,
        to: &Address,
        from: Option<&Address>,
        body: &[u8],
    ) -> Result<Bytes, CallError> {
        let mut out = BytesMut::new();
        self.put_envelope_frame(&mut out, kind, id, to, from, body)?;
        Ok(out.freeze())
    }

    /// Appends a frame carrying an envelope to `out`, refusing one larger than the frame limit.
    fn put_envelope_frame(
        &self,
        out: &mut BytesMut,
        kind: FrameKind,
        id: u64,
        to: &Address,
        from: Option<&Address>,
        body: &[u8],
    ) -> Result<(), CallError> {
        let len = envelope_len(to, from, body);
        if len + crate::frame::HEADER_AFTER_LEN > self.max_frame {
            return Err(CallError::Rejected(format!(
                "message of {len} bytes exceeds the {}-byte frame limit",
                self.max_frame
            )));
        }
        out.reserve(crate::frame::HEADER_LEN + len);
        put_frame_header(out, kind, id, len);
        encode_envelope(out, to, from, body);
        Ok(())
    }

    async fn deliver_local(
        &self,
        path: &str,
        delivery: Delivery,
    ) -> Result<(), (CallError, Delivery)> {
        self.registry
            .deliver(path, delivery)
            .await
            .map_err(|(e, d)| match e {
                CallError::NoSuchActor(p) => {
                    (CallError::NoSuchActor(format!("{}/{p}", self.name)), d)
                }
                e => (e, d),
            })
    }

    /// Fails every call waiting on `node`.
    pub(crate) fn fail_pending(&self, node: &str) {
        let mut pending = lock(&self.pending);
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| &*p.node == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = pending.remove(&id) {
                let _ = p.tx.send(Err(CallError::NodeDown(node.to_owned())));
            }
        }
    }

    fn spawn_dialler(self: &Arc<Self>, peer: String) {
        let inner = self.clone();
        tokio::spawn(async move { dial_loop(inner, peer).await }.in_current_span());
    }

    /// Makes `conn` the link to `peer`, replacing an older one, and runs it until it closes.
    async fn run_link(self: Arc<Self>, peer: String, conn: quinn::Connection) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (link, rx) = Link::new(id, peer.clone().into(), conn.clone());
        let replaced = {
            let mut peers = write(&self.peers);
            let Some(p) = peers.get_mut(&peer) else {
                conn.close(0u32.into(), b"not in the cluster config");
                return;
            };
            p.last_error = None;
            p.since = SystemTime::now();
            p.link.replace(link.clone())
        };
        if let Some(old) = replaced {
            old.conn
                .close(0u32.into(), b"replaced by a newer connection");
            self.fail_pending(&peer);
            self.emit(NodeEvent::Down {
                node: peer.clone(),
                reason: "reconnected".into(),
            });
        }
        info!(peer = %peer, remote = %conn.remote_address(), "link up");
        self.emit(NodeEvent::Up {
            node: peer.clone(),
            via: None,
        });

        let writer = tokio::spawn(run_writer(conn.clone(), rx).in_current_span());
        let reader = tokio::spawn(run_reader(self.clone(), link.clone()).in_current_span());
        let datagrams = tokio::spawn(run_datagrams(self.clone(), link.clone()).in_current_span());
        let reason = conn.closed().await;
        reader.abort();
        datagrams.abort();
        writer.abort();

        let was_current = {
            let mut peers = write(&self.peers);
            match peers.get_mut(&peer) {
                Some(p) if p.link.as_ref().is_some_and(|l| l.id == id) => {
                    p.link = None;
                    p.since = SystemTime::now();
                    p.last_error = Some(reason.to_string());
                    true
                }
                _ => false,
            }
        };
        if was_current {
            warn!(peer = %peer, "link down: {reason}");
            self.fail_pending(&peer);
            self.relay.link_lost(&self, &peer);
            self.emit(NodeEvent::Down {
                node: peer,
                reason: reason.to_string(),
            });
        }
    }

    fn note_refused(&self, peer: Option<&str>, error: String) {
        match peer.and_then(|p| {
            write(&self.peers).get_mut(p).map(|e| {
                e.refused_handshakes += 1;
                e.last_error = Some(error.clone());
            })
        }) {
            Some(()) => {}
            None => {
                self.refused_unknown.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Handles one frame from `from_node`; `sink` carries replies back the way the frame came.
    pub(crate) async fn handle_frame(
        self: &Arc<Self>,
        from_node: &str,
        sink: &Arc<dyn FrameSink>,
        frame: Frame,
    ) {
        match frame.kind {
            FrameKind::Send | FrameKind::Call => {
                let is_call = frame.kind == FrameKind::Call;
                let env = match decode_envelope(&frame.payload) {
                    Ok(env) => env,
                    Err(e) => {
                        let reason = e.to_string();
                        debug!(peer = from_node, "dropping frame: {reason}");
                        if is_call {
                            sink.send_frame(frame_bytes(
                                FrameKind::Reply,
                                frame.correlation,
                                &encode_reply(&Err(CallError::Rejected(reason))),
                            ));
                        }
                        return;
                    }
                };
                let reply = is_call.then(|| {
                    let target = format!("{}/{}", self.name, env.to);
                    ReplyHandle::remote(sink.clone(), frame.correlation, target)
                });
                let delivery = Delivery {
                    from: env.from,
                    body: env.body,
                    reply,
                };
                if let Err((e, mut d)) = self.deliver_local(env.to, delivery).await {
                    debug!(peer = from_node, "undeliverable: {e}");
                    d.reject(e);
                }
            }
            FrameKind::Reply => {
                // Only the node a call went to may answer it.
                let pending = {
                    let mut pending = lock(&self.pending);
                    match pending.get(&frame.correlation) {
                        Some(p) if &*p.node == from_node => pending.remove(&frame.correlation),
                        _ => None,
                    }
                };
                if let Some(p) = pending {
                    let _ = p.tx.send(decode_reply(&frame.payload));
                }
            }
            FrameKind::Relay => {
                Box::pin(crate::relay::handle_frame(self, from_node, frame)).await;
            }
        }
    }
}

async fn dial_loop(inner: Arc<Inner>, peer: String) {
    let mut backoff = Duration::ZERO;
    let mut failures = 0u32;
    loop {
        if inner.stopping.load(Ordering::Relaxed) {
            return;
        }
        let (spec, removed) = match read(&inner.peers).get(&peer) {
            Some(p) => (p.spec.clone(), p.removed.clone()),
            None => return,
        };
        if removed.load(Ordering::Relaxed) {
            return;
        }
        let Some(addr) = spec.listen else { return };
        match connect(&inner, addr, &peer).await {
            Ok(conn) => {
                failures = 0;
                backoff = Duration::ZERO;
                inner.clone().run_link(peer.clone(), conn).await;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    info!(peer = %peer, %addr, attempts = failures, "cannot reach peer: {e}");
                }
                if let Some(p) = write(&inner.peers).get_mut(&peer) {
                    p.last_error = Some(e.clone());
                }
                if is_tls_refusal(&e) {
                    inner.note_refused(Some(&peer), e);
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
            }
        }
        let jitter = rand::random_range(0.75..1.25);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
    }
}

fn is_tls_refusal(error: &str) -> bool {
    error.contains("certificate")
        || error.contains("TLS")
        || error.contains("crypto")
        || error.contains("refused")
}

async fn connect(inner: &Inner, addr: SocketAddr, peer: &str) -> Result<quinn::Connection, String> {
    let connecting = inner
        .endpoint
        .connect(addr, peer)
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    match peer_name(&conn) {
        Ok(name) if name == peer => Ok(conn),
        Ok(name) => {
            conn.close(1u32.into(), b"unexpected node name");
            Err(format!(
                "refused: dialled {peer} but the certificate names {name}"
            ))
        }
        Err(e) => Err(e),
    }
}

fn peer_name(conn: &quinn::Connection) -> Result<String, String> {
    let certs = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| "refused: the peer presented no certificate".to_owned())?;
    colony_certs::peer_node_name(&certs).map_err(|e| format!("refused: {e}"))
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let inner = inner.clone();
        let task = async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, "refused handshake: {e}");
                    inner.note_refused(None, e.to_string());
                    return;
                }
            };
            let name = match peer_name(&conn) {
                Ok(n) => n,
                Err(e) => {
                    warn!(%remote, "{e}");
                    conn.close(1u32.into(), b"no node certificate");
                    inner.note_refused(None, e);
                    return;
                }
            };
            let spec = read(&inner.peers).get(&name).map(|p| p.spec.clone());
            let Some(spec) = spec else {
                warn!(%remote, node = %name, "refused handshake: node is not in the cluster config");
                conn.close(1u32.into(), b"not in the cluster config");
                inner.note_refused(None, format!("node {name} is not in the cluster config"));
                return;
            };
            if !inner.expects_dial_from(&spec) {
                warn!(%remote, node = %name, "refused connection: this node dials {name}, not the other way");
                conn.close(1u32.into(), b"wrong dial direction");
                inner.note_refused(Some(&name), "dialled in the wrong direction".into());
                return;
            }
            inner.run_link(name, conn).await;
        };
        tokio::spawn(task.in_current_span());
    }
}

async fn run_reader(inner: Arc<Inner>, link: Arc<Link>) {
    let mut stream = match link.conn.accept_uni().await {
        Ok(s) => s,
        Err(e) => {
            debug!(peer = %link.peer, "no stream from peer: {e}");
            return;
        }
    };
    let sink: Arc<dyn FrameSink> = link.clone();
    let mut decoder = FrameDecoder::new(inner.max_frame);
    loop {
        match stream.read_chunk(256 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return,
            Err(e) => {
                debug!(peer = %link.peer, "link read failed: {e}");
                return;
            }
        }
        while let Some(next) = decoder.next_frame() {
            match next {
                Ok(frame) => {
                    link.messages_in.fetch_add(1, Ordering::Relaxed);
                    inner.handle_frame(&link.peer, &sink, frame).await;
                }
                Err(e) => {
                    link.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %link.peer, "dropped a frame: {e}");
                    if let Some(id) = e.call_to_answer() {
                        let reply = encode_reply(&Err(CallError::Rejected(e.to_string())));
                        sink.send_frame(frame_bytes(FrameKind::Reply, id, &reply));
                    }
                }
            }
        }
    }
}

async fn run_datagrams(inner: Arc<Inner>, link: Arc<Link>) {
    while let Ok(data) = link.conn.read_datagram().await {
        let Some(&len) = data.first() else { continue };
        let len = usize::from(len);
        let Some(name) = data
            .get(1..1 + len)
            .and_then(|n| std::str::from_utf8(n).ok())
        else {
            link.frames_rejected.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let datagram = Datagram {
            from_node: link.peer.clone(),
            payload: data.slice(1 + len..),
        };
        if !inner.registry.deliver_datagram(name, datagram) {
            link.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
