//! Colony's cluster layer: nodes linked over mutually authenticated QUIC, and messages routed to
//! actors by address (`node/actor`).
//!
//! Each node runs one quinn endpoint, server and client at once, with mutual TLS 1.3 from the
//! cluster CA: a peer's name is the DNS name in the certificate it presented, never what it says.
//! Every pair of nodes keeps one connection (see [`node`] for who dials); nodes behind NAT that
//! cannot reach each other talk through a node both reach, end-to-end authenticated ([`relay`]).
//! QUIC keep-alives are the heartbeat: a peer silent for `heartbeat × misses` is down, calls to it
//! fail at once with [`CallError::NodeDown`], and watchers get a [`NodeEvent`].
//!
//! Messages are CBOR [`envelope`]s in length-prefixed [`frame`]s on one QUIC stream per direction,
//! so order is kept per sender and receiver; [`Cluster::send_batch`] queues many messages on a link
//! at once, for senders with a backlog. IP packets for tunnels ride QUIC datagrams. Locally, a
//! [`Registry`] maps actor names to bounded mailboxes; a full mailbox makes senders wait.
//!
//! This crate knows addresses, peers and envelopes, and nothing of MQTT, tunnels or supervision.

mod cbor;
pub mod envelope;
pub mod frame;
mod link;
pub mod node;
pub mod registry;
pub mod relay;
mod stats;
mod transport;

pub use colony_config::Address;
pub use envelope::{CallError, decode_body, encode_body};
pub use node::{Cluster, ClusterSettings, DatagramError, PeerSpec};
pub use registry::{Datagram, Delivery, MailboxReceiver, MailboxSender, Registry, ReplyHandle};
pub use stats::{LinkState, LinkStats, NodeEvent};
pub use transport::{ALPN, INITIAL_MTU};

/// Why the cluster layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A certificate or key could not be used.
    #[error(transparent)]
    Certs(#[from] colony_certs::CertError),
    /// The UDP socket could not be bound.
    #[error("cannot bind QUIC endpoint on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why (not a `source`: the message already says it).
        reason: std::io::Error,
    },
    /// The settings are unusable.
    #[error("{0}")]
    Config(String),
}
