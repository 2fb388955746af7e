//! Sockets: listeners that accept TCP or TLS clients, and one task per client connection.
//!
//! A connection task frames packets out of its socket ([`super::codec`]), hands them to the
//! broker actor as [`ConnEvent`]s and writes back whatever the actor queues for it. It enforces
//! what needs only the socket and a clock: CONNECT first (within [`CONNECT_TIMEOUT`]), the packet
//! size limit, and keepalive (one and a half times the client's interval without a packet ends the
//! connection). Any error ends this connection only; a drop guard tells the actor it is gone,
//! whether the task returned, failed or was aborted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use colony_config::kinds::BrokerTls;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::codec::{connect_protocol_level, next_packet};
use super::core::ConnId;

/// How long a new connection has to send CONNECT (and finish its TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection task tells the broker actor.
#[derive(Debug)]
pub enum ConnEvent {
    /// The CONNECT, and where to send the connection's outgoing packets.
    Connect(ConnId, Box<Connect>, mpsc::Sender<Outgoing>),
    /// A packet after CONNECT.
    Packet(ConnId, Packet),
}

/// What the actor sends a connection task.
#[derive(Debug)]
pub enum Outgoing {
    /// Write a packet.
    Packet(Packet),
    /// Write what is queued, then close.
    Close,
}

/// Reports a connection's end when dropped (normal return, error, panic or abort alike).
struct ClosedGuard {
    id: ConnId,
    closed: mpsc::UnboundedSender<ConnId>,
}

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        let _ = self.closed.send(self.id);
    }
}

/// Limits a connection task applies itself.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Largest packet accepted.
    pub max_packet_size: usize,
    /// Room in the outgoing queue.
    pub outgoing_capacity: usize,
}

/// Why a TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("TLS settings: {0}")]
pub struct TlsSetupError(String);

/// A rustls server config from a listener's TLS settings, paths resolved with `resolve`.
pub fn tls_acceptor(
    tls: &BrokerTls,
    resolve: impl Fn(&Path) -> std::path::PathBuf,
) -> Result<TlsAcceptor, TlsSetupError> {
    let err = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        TlsSetupError(format!("{what} {}: {e}", p.display()))
    };
    let cert_path = resolve(&tls.cert);
    let key_path = resolve(&tls.key);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| err("cannot read certificate", &cert_path, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("bad certificate", &cert_path, &e))?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!(
            "no certificate in {}",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| err("cannot read key", &key_path, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(e.to_string()))?;
    let config = match &tls.client_ca {
        Some(ca) => {
            let ca_path = resolve(ca);
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca_path)
                .map_err(|e| err("cannot read client CA", &ca_path, &e))?
            {
                let c = c.map_err(|e| err("bad client CA", &ca_path, &e))?;
                roots
                    .add(c)
                    .map_err(|e| err("bad client CA", &ca_path, &e))?;
            }
            let mut v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            if !tls.require_client_cert {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| TlsSetupError(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    }
    .with_single_cert(certs, key)
    .map_err(|e| err("certificate and key do not fit", &cert_path, &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs one client connection over `stream` until it ends.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    id: ConnId,
    stream: S,
    events: mpsc::Sender<ConnEvent>,
    closed: mpsc::UnboundedSender<ConnId>,
    limits: ConnLimits,
) {
    let _guard = ClosedGuard { id, closed };
    match serve_inner(id, stream, events, limits).await {
        Ok(()) => debug!(conn = id, "connection closed"),
        Err(why) => debug!(conn = id, "connection ended: {why}"),
    }
}

async fn serve_inner<S: AsyncRead + AsyncWrite + Unpin>(
    id: ConnId,
    mut stream: S,
    events: mpsc::Sender<ConnEvent>,
    limits: ConnLimits,
) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(4096);
    let max = limits.max_packet_size;
    // CONNECT first, within the timeout.
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            if connect_protocol_level(&buf).is_some_and(|l| l != 4) {
                // MQTT 3.1 or 5 asked for: refuse with 3.1.1's "unacceptable protocol version".
                write_packets(
                    &mut stream,
                    &[Packet::ConnAck(ConnAck::new(
                        ConnectReturnCode::RefusedProtocolVersion,
                        false,
                    ))],
                )
                .await?;
                return Err("unsupported protocol level".to_owned());
            }
            match next_packet(&mut buf, max).map_err(|e| e.to_string())? {
                Some(Packet::Connect(c)) => return Ok(c),
                Some(other) => return Err(format!("first packet was not CONNECT but {other:?}")),
                None => {}
            }
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed before CONNECT".to_owned());
            }
        }
    })
    .await
    .map_err(|_| "no CONNECT in time".to_owned())??;
    let keepalive = match connect.keep_alive {
        0 => None,
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    let (tx, mut rx) = mpsc::channel(limits.outgoing_capacity.max(16));
    events
        .send(ConnEvent::Connect(id, Box::new(connect), tx))
        .await
        .map_err(|_| "broker gone")?;
    let mut out = BytesMut::with_capacity(4096);
    let mut last_read = tokio::time::Instant::now();
    loop {
        // Packets already buffered go first.
        loop {
            match next_packet(&mut buf, max) {
                Ok(Some(p)) => {
                    last_read = tokio::time::Instant::now();
                    events
                        .send(ConnEvent::Packet(id, p))
                        .await
                        .map_err(|_| "broker gone")?;
                }
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        let deadline = keepalive.map(|k| last_read + k);
        tokio::select! {
            r = stream.read_buf(&mut buf) => {
                match r {
                    Ok(0) => return Err("closed by client".to_owned()),
                    Ok(_) => last_read = tokio::time::Instant::now(),
                    Err(e) => return Err(e.to_string()),
                }
            }
            o = rx.recv() => {
                let mut close = false;
                let mut next = o;
                // Batch everything queued into one write.
                loop {
                    match next {
                        Some(Outgoing::Packet(p)) => {
                            if p.write(&mut out, usize::MAX).is_err() {
                                return Err("could not encode a packet".to_owned());
                            }
                        }
                        Some(Outgoing::Close) | None => { close = true; break; }
                    }
                    if out.len() > 64 * 1024 { break; }
                    match rx.try_recv() {
                        Ok(x) => next = Some(x),
                        Err(_) => break,
                    }
                }
                if !out.is_empty() {
                    stream.write_all(&out).await.map_err(|e| e.to_string())?;
                    out.clear();
                }
                if close {
                    let _ = stream.flush().await;
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
            }
            _ = sleep_until(deadline) => return Err("keepalive expired".to_owned()),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn write_packets<S: AsyncWrite + Unpin>(
    stream: &mut S,
    packets: &[Packet],
) -> Result<(), String> {
    let mut out = BytesMut::new();
    for p in packets {
        p.write(&mut out, usize::MAX).map_err(|e| e.to_string())?;
    }
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())
}
