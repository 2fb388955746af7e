//! What the cluster layer reports: node events and per-peer link statistics.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// A change in a peer's reachability, for supervisors and actors watching remote addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The peer is reachable (directly, or through `via`).
    Up {
        /// The peer.
        node: String,
        /// The relay node, when there is no direct link.
        via: Option<String>,
    },
    /// The peer is unreachable.
    Down {
        /// The peer.
        node: String,
        /// Why (idle timeout, closed by peer, relay lost, …).
        reason: String,
    },
}

/// A peer link's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Connected directly over QUIC.
    Up,
    /// Reached through a relay node.
    Relayed,
    /// Not reachable now.
    Down,
}

/// One peer link as the control plane shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// The peer node.
    pub peer: String,
    /// Up, relayed or down.
    pub state: LinkState,
    /// When it entered that state (seconds since the Unix epoch).
    pub since_unix_ms: u64,
    /// The relay node for a relayed link.
    pub via: Option<String>,
    /// The peer's address for a direct link.
    pub remote_addr: Option<String>,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u64,
    /// QUIC packets sent on the link.
    pub packets_sent: u64,
    /// QUIC packets declared lost.
    pub packets_lost: u64,
    /// UDP bytes sent and received.
    pub bytes_out: u64,
    /// UDP bytes received.
    pub bytes_in: u64,
    /// Messages (sends, calls, replies) sent.
    pub messages_out: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Frames dropped because they were too large or did not decode.
    pub frames_rejected: u64,
    /// Datagrams from this peer dropped at a full (or missing) actor inbox.
    #[serde(default)]
    pub datagrams_dropped: u64,
    /// Handshakes with this peer refused (bad certificate, wrong name, wrong direction).
    pub refused_handshakes: u64,
    /// The last connection error, if any.
    pub last_error: Option<String>,
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
