//! The quinn endpoint's TLS and transport settings.
//!
//! Mutual TLS 1.3 comes from the certs crate. The transport adds: QUIC keep-alives at the
//! heartbeat interval and an idle timeout of `heartbeat × misses`, which together are the failure
//! detector (a peer that sends nothing for that long is down); an initial MTU that lets a
//! 1400-byte datagram payload through on a 1500-byte path; and windows sized for throughput.

use std::sync::Arc;
use std::time::Duration;

use colony_certs::{AllowedNodes, NodeIdentity};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::ClusterError;

/// ALPN protocol id of Colony's cluster protocol.
pub const ALPN: &[u8] = b"colony/1";

/// The round-trip time assumed before one is measured.
pub const INITIAL_RTT: Duration = Duration::from_millis(50);

/// UDP payload size of the first packets: 1500-byte Ethernet MTU minus IPv4 and UDP headers.
pub const INITIAL_MTU: u16 = 1472;

fn transport(
    heartbeat: Duration,
    failure_timeout: Duration,
) -> Result<Arc<TransportConfig>, ClusterError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(heartbeat));
    let idle = IdleTimeout::try_from(failure_timeout).map_err(|_| {
        ClusterError::Config(format!("failure timeout {failure_timeout:?} is too long"))
    })?;
    t.max_idle_timeout(Some(idle));
    t.initial_mtu(INITIAL_MTU);
    // QUIC's default (333 ms) makes a first handshake packet lost to a peer that is still
    // binding wait about a second; clusters run on LANs and the estimate adapts anyway.
    t.initial_rtt(INITIAL_RTT);
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(8 << 20));
    t.receive_window(VarInt::from_u32(16 << 20));
    t.send_window(16 << 20);
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    Ok(Arc::new(t))
}

/// The server side: requires a client certificate from the cluster CA naming a configured node.
pub(crate) fn server_config(
    identity: &NodeIdentity,
    allowed: AllowedNodes,
    heartbeat: Duration,
    failure_timeout: Duration,
) -> Result<quinn::ServerConfig, ClusterError> {
    let mut tls = colony_certs::server_config(identity, allowed).map_err(ClusterError::Certs)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| ClusterError::Config(format!("TLS for QUIC: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(heartbeat, failure_timeout)?);
    Ok(config)
}

/// The client side: presents this node's certificate, trusts only the cluster CA.
pub(crate) fn client_config(
    identity: &NodeIdentity,
    allowed: AllowedNodes,
    heartbeat: Duration,
    failure_timeout: Duration,
) -> Result<quinn::ClientConfig, ClusterError> {
    let mut tls = colony_certs::client_config(identity, allowed).map_err(ClusterError::Certs)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| ClusterError::Config(format!("TLS for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(heartbeat, failure_timeout)?);
    Ok(config)
}
