//! Sockets: listeners that accept TCP or TLS clients, and one task per client connection.
//!
//! A connection task frames packets out of its socket ([`super::codec`]), hands them to the
//! broker actor as [`ConnEvent`]s and writes back whatever the actor queues for it. It enforces
//! what needs only the socket and a clock: CONNECT first (within [`CONNECT_TIMEOUT`]), the packet
//! size limit, and keepalive (one and a half times the client's interval without a packet ends the
//! connection). Any error ends this connection only; a drop guard tells the actor it is gone,
//! whether the task returned, failed or was aborted.
//!
//! A connection never leaves unread what its client sent before it went. When a write fails
//! (the client closed, perhaps with a reset), the task first reads what is still coming
//! ([`STOP_QUIET`] without a byte ends that) and hands its packets to the actor. When the broker
//! stops, the connection goes on as before, the broker answering what it reads, until its client
//! has been quiet for [`STOP_QUIET`] (at most `CONN_STOP_LIMIT`, half a second); then it writes
//! what the broker answered last, tells an MQTT 5 client why it goes (DISCONNECT 0x8B, server
//! shutting down) and ends. So the acknowledgements a subscriber wrote just before it left are
//! not lost with the connection, and what they acknowledge is not sent again to its next
//! session; and a publisher that goes on publishing while the broker stops is acknowledged for
//! what the broker took, so it does not send that again either.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use colony_config::kinds::BrokerTls;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::codec::{Decoder, FrameError, encode};
use super::core::ConnId;
use super::packet::{
    ClientPacket, ConnAckOut, ConnCode, ConnectIn, DisconnectCode, Protocol, ServerPacket,
};

/// How long a new connection has to send CONNECT (and finish its TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that is ending (its broker stopping, or its write failed) goes on reading
/// until its client has sent nothing for this long...
pub const STOP_QUIET: Duration = Duration::from_millis(20);
/// ... and for at most this long after the stop (or the failed write).
const CONN_STOP_LIMIT: Duration = Duration::from_millis(500);

/// What a connection task tells the broker actor.
#[derive(Debug)]
pub enum ConnEvent {
    /// The CONNECT, where to send the connection's outgoing packets, and where it comes from.
    Connect(ConnId, Box<ConnectIn>, mpsc::Sender<Outgoing>, ConnMeta),
    /// A packet after CONNECT.
    Packet(ConnId, ClientPacket),
}

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnMeta {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// It came over TLS.
    pub tls: bool,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Closed by either side, or the socket failed.
    Closed,
    /// Cut off by the connection task for breaking the protocol (or its keepalive).
    CutOff(DisconnectCode),
    /// Its task panicked.
    Panicked,
}

/// What the actor sends a connection task.
#[derive(Debug)]
pub enum Outgoing {
    /// Write a packet.
    Packet(ServerPacket),
    /// Write what is queued, then close.
    Close,
}

/// Reports a connection's end when dropped (normal return, error, panic or abort alike).
struct ClosedGuard {
    id: ConnId,
    how: Ended,
    closed: mpsc::UnboundedSender<(ConnId, Ended)>,
}

impl Drop for ClosedGuard {
    fn drop(&mut self) {
        let how = if std::thread::panicking() {
            Ended::Panicked
        } else {
            self.how
        };
        let _ = self.closed.send((self.id, how));
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

/// Runs one client connection over `stream` until it ends, or until `stopping` turns true (the
/// broker is stopping).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    id: ConnId,
    meta: ConnMeta,
    stream: S,
    events: mpsc::Sender<ConnEvent>,
    closed: mpsc::UnboundedSender<(ConnId, Ended)>,
    limits: ConnLimits,
    stopping: watch::Receiver<bool>,
) {
    let mut guard = ClosedGuard {
        id,
        how: Ended::Closed,
        closed,
    };
    match serve_inner(id, meta, stream, events, limits, stopping).await {
        Ok(()) => debug!(conn = id, "connection closed"),
        Err(Stop::Closed(why)) => debug!(conn = id, "connection ended: {why}"),
        Err(Stop::CutOff(code, why)) => {
            debug!(conn = id, "connection cut off: {why}");
            guard.how = Ended::CutOff(code);
        }
    }
}

/// Why a connection task stops.
enum Stop {
    /// The socket closed or failed, or the broker went away.
    Closed(String),
    /// The client broke the protocol (or went silent past its keepalive).
    CutOff(DisconnectCode, String),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Closed(e.to_string())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `packets` in `protocol` and flushes.
async fn write_now<S: AsyncWrite + Unpin>(
    stream: &mut S,
    protocol: Protocol,
    packets: impl IntoIterator<Item = ServerPacket>,
) -> Result<(), std::io::Error> {
    let mut out = BytesMut::new();
    for p in packets {
        let _ = encode(p, protocol, unix_now(), &mut out);
    }
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Tells the client why it is cut off (an MQTT 5 DISCONNECT; nothing for 3.1.1) and stops.
async fn cut_off<S: AsyncWrite + Unpin>(stream: &mut S, protocol: Protocol, e: FrameError) -> Stop {
    let code = e.disconnect_code();
    let _ = write_now(stream, protocol, [ServerPacket::Disconnect(code)]).await;
    Stop::CutOff(code, e.to_string())
}

/// Resolves once the broker is stopping (or gone).
pub async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}

/// Hands the actor every whole packet in `buf`. A framing error ends the hand-over quietly: the
/// connection is ending anyway.
async fn hand_over(
    id: ConnId,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    events: &mpsc::Sender<ConnEvent>,
) -> Result<(), Stop> {
    while let Ok(Some(p)) = decoder.next(buf) {
        events
            .send(ConnEvent::Packet(id, p))
            .await
            .map_err(|_| Stop::Closed("broker gone".to_owned()))?;
    }
    Ok(())
}

/// Reads and hands over what the client still sends, until [`STOP_QUIET`] passes without a
/// byte, the socket ends, or `until` (what is readable then is still taken). Used when the
/// connection is ending: its last packets (acknowledgements above all) must reach the actor.
async fn read_out<S: AsyncRead + Unpin>(
    id: ConnId,
    stream: &mut S,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    events: &mpsc::Sender<ConnEvent>,
    until: tokio::time::Instant,
) -> Result<(), Stop> {
    loop {
        hand_over(id, decoder, buf, events).await?;
        let quiet = tokio::time::Instant::now() + STOP_QUIET;
        match tokio::time::timeout_at(quiet.min(until), stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(()),
        }
    }
}

async fn serve_inner<S: AsyncRead + AsyncWrite + Unpin>(
    id: ConnId,
    meta: ConnMeta,
    mut stream: S,
    events: mpsc::Sender<ConnEvent>,
    limits: ConnLimits,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), Stop> {
    let mut buf = BytesMut::with_capacity(4096);
    let mut decoder = Decoder::new(limits.max_packet_size);
    // CONNECT first, within the timeout (a stopping broker waits for no CONNECT).
    let connecting = tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match decoder.connect(&mut buf) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(FrameError::UnsupportedProtocol(level)) => {
                    // MQTT 3.1 (or anything else): 3.1.1's "unacceptable protocol version".
                    let refuse =
                        ServerPacket::ConnAck(ConnAckOut::refuse(ConnCode::UnsupportedProtocol));
                    let _ = write_now(&mut stream, Protocol::V4, [refuse]).await;
                    return Err(Stop::CutOff(
                        DisconnectCode::ProtocolError,
                        format!("unsupported protocol level {level}"),
                    ));
                }
                Err(e) => return Err(Stop::CutOff(e.disconnect_code(), e.to_string())),
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(Stop::Closed("closed before CONNECT".to_owned()));
            }
        }
    });
    let connect = tokio::select! {
        c = connecting => c.map_err(|_| Stop::Closed("no CONNECT in time".to_owned()))??,
        () = stopped(&mut stopping) => return Err(Stop::Closed("the broker is stopping".to_owned())),
    };
    let protocol = decoder.protocol();
    let client_max = connect.max_packet_size.map(|m| m as usize);
    let keepalive = match connect.keep_alive {
        0 => None,
        k => Some(Duration::from_millis(u64::from(k) * 1500)),
    };
    let (tx, mut rx) = mpsc::channel(limits.outgoing_capacity.max(16));
    events
        .send(ConnEvent::Connect(id, Box::new(connect), tx, meta))
        .await
        .map_err(|_| Stop::Closed("broker gone".to_owned()))?;
    let mut out = BytesMut::with_capacity(4096);
    let mut last_read = tokio::time::Instant::now();
    // Set once the broker is stopping: by when the connection goes at the latest. Until then it
    // goes on as before (the broker still answers what it reads), and goes once its client has
    // been quiet for `STOP_QUIET`.
    let mut stop_by: Option<tokio::time::Instant> = None;
    loop {
        // Packets already buffered go first.
        loop {
            match decoder.next(&mut buf) {
                Ok(Some(p)) => {
                    last_read = tokio::time::Instant::now();
                    events
                        .send(ConnEvent::Packet(id, p))
                        .await
                        .map_err(|_| Stop::Closed("broker gone".to_owned()))?;
                }
                Ok(None) => break,
                Err(e) => return Err(cut_off(&mut stream, protocol, e).await),
            }
        }
        let deadline = match stop_by {
            Some(by) => Some((last_read + STOP_QUIET).min(by)),
            None => keepalive.map(|k| last_read + k),
        };
        tokio::select! {
            r = stream.read_buf(&mut buf) => {
                if r? == 0 {
                    return Err(Stop::Closed("closed by client".to_owned()));
                }
                last_read = tokio::time::Instant::now();
            }
            o = rx.recv() => {
                let mut close = false;
                let mut next = o;
                let now = unix_now();
                // Batch everything queued into one write.
                loop {
                    match next {
                        Some(Outgoing::Packet(p)) => encode_for(p, protocol, now, client_max, &mut out)?,
                        Some(Outgoing::Close) | None => { close = true; break; }
                    }
                    if out.len() > 64 * 1024 { break; }
                    match rx.try_recv() {
                        Ok(x) => next = Some(x),
                        Err(_) => break,
                    }
                }
                if !out.is_empty() {
                    // A client that reads nothing must not hold up a stopping broker.
                    let written = tokio::select! {
                        w = stream.write_all(&out) => Some(w),
                        () = write_cut(&mut stopping, stop_by) => None,
                    };
                    match written {
                        Some(Ok(())) => out.clear(),
                        Some(Err(e)) => {
                            // Gone (perhaps with a reset): what it sent before still counts.
                            let until = stop_by.unwrap_or_else(|| tokio::time::Instant::now() + CONN_STOP_LIMIT);
                            read_out(id, &mut stream, &mut decoder, &mut buf, &events, until).await?;
                            return Err(e.into());
                        }
                        None => {
                            // Cut in the middle of a packet, its time up: nothing more can be
                            // written, and what the client sent is taken for one quiet spell.
                            let until = tokio::time::Instant::now() + STOP_QUIET;
                            read_out(id, &mut stream, &mut decoder, &mut buf, &events, until).await?;
                            return Ok(());
                        }
                    }
                }
                if close {
                    let _ = stream.flush().await;
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
            }
            () = stopped(&mut stopping), if stop_by.is_none() => {
                let now = tokio::time::Instant::now();
                stop_by = Some(now + CONN_STOP_LIMIT);
                last_read = now;
            }
            _ = sleep_until(deadline) => {
                let Some(until) = stop_by else {
                    let code = DisconnectCode::KeepAliveTimeout;
                    let _ = write_now(&mut stream, protocol, [ServerPacket::Disconnect(code)]).await;
                    return Err(Stop::CutOff(code, "keepalive expired".to_owned()));
                };
                // The broker is stopping and the client has gone quiet (or its time is up):
                // take what is still coming, write what the broker has answered, say why, go.
                read_out(id, &mut stream, &mut decoder, &mut buf, &events, until).await?;
                let now = unix_now();
                while let Ok(Outgoing::Packet(p)) = rx.try_recv() {
                    encode_for(p, protocol, now, client_max, &mut out)?;
                }
                let _ = encode(ServerPacket::Disconnect(DisconnectCode::ServerShuttingDown), protocol, now, &mut out);
                let last = async {
                    stream.write_all(&out).await?;
                    stream.flush().await
                };
                let _ = tokio::time::timeout(STOP_QUIET, last).await;
                return Ok(());
            }
        }
    }
}

/// Adds `p` to `out`, unless it is larger than the client takes (MQTT 5): then it is not sent.
fn encode_for(
    p: ServerPacket,
    protocol: Protocol,
    now: u64,
    client_max: Option<usize>,
    out: &mut BytesMut,
) -> Result<(), Stop> {
    let before = out.len();
    if let Err(e) = encode(p, protocol, now, out) {
        return Err(Stop::Closed(format!("could not encode a packet: {e}")));
    }
    if client_max.is_some_and(|m| out.len() - before > m) {
        out.truncate(before);
    }
    Ok(())
}

/// Resolves when a write must be given up: [`CONN_STOP_LIMIT`] after the broker began to stop
/// (`stop_by`, once the connection knows).
async fn write_cut(stopping: &mut watch::Receiver<bool>, stop_by: Option<tokio::time::Instant>) {
    match stop_by {
        Some(by) => tokio::time::sleep_until(by).await,
        None => {
            stopped(stopping).await;
            tokio::time::sleep(CONN_STOP_LIMIT).await;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::packet::AckCode;
    use crate::broker::session::Message;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A socket whose read panics, as a bug in a connection's handling would.
    struct Panicking;

    impl AsyncRead for Panicking {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            panic!("a bug in the connection");
        }
    }

    impl AsyncWrite for Panicking {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_panicking_connection_is_reported_as_such_and_nothing_else_stops() {
        let (events, _events_rx) = mpsc::channel(8);
        let (closed, mut closed_rx) = mpsc::unbounded_channel();
        let limits = ConnLimits {
            max_packet_size: 1024,
            outgoing_capacity: 16,
        };
        let meta = ConnMeta {
            peer: "127.0.0.1:1".parse().unwrap(),
            tls: false,
        };
        let (_stopping, stopping_rx) = watch::channel(false);
        let mut set = tokio::task::JoinSet::new();
        set.spawn(serve(
            7,
            meta,
            Panicking,
            events.clone(),
            closed.clone(),
            limits,
            stopping_rx.clone(),
        ));
        // A well-behaved connection alongside: closes normally.
        let (stream, peer_end) = tokio::io::duplex(64);
        drop(peer_end);
        set.spawn(serve(8, meta, stream, events, closed, limits, stopping_rx));
        let mut ended = Vec::new();
        while ended.len() < 2 {
            ended.push(closed_rx.recv().await.unwrap());
        }
        ended.sort_by_key(|e| e.0);
        assert_eq!(ended, [(7, Ended::Panicked), (8, Ended::Closed)]);
        let first = set.join_next().await.unwrap();
        let second = set.join_next().await.unwrap();
        assert_eq!(
            [first.is_err(), second.is_err()]
                .iter()
                .filter(|e| **e)
                .count(),
            1,
            "only the panicking task failed"
        );
    }
    /// A 3.1.1 CONNECT of client `t`, clean session, keepalive 60 s.
    const CONNECT: [u8; 15] = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b't',
    ];

    fn limits() -> ConnLimits {
        ConnLimits {
            max_packet_size: 1024,
            outgoing_capacity: 16,
        }
    }

    /// The client acknowledges three publishes and leaves with a reset while the broker still
    /// has packets for it: whichever the task meets first, the failing write or the reset's
    /// data, the acknowledgements reach the broker. (The task's choice is random, so 16 rounds.)
    #[tokio::test]
    async fn acknowledgements_sent_just_before_a_reset_reach_the_broker_when_a_write_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stopping, stopping_rx) = watch::channel(false);
        for round in 0..16 {
            let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, peer) = listener.accept().await.unwrap();
            let (events, mut events_rx) = mpsc::channel(64);
            let (closed, mut closed_rx) = mpsc::unbounded_channel();
            let meta = ConnMeta { peer, tls: false };
            let task = tokio::spawn(serve(
                round,
                meta,
                server,
                events,
                closed,
                limits(),
                stopping_rx.clone(),
            ));
            client.write_all(&CONNECT).await.unwrap();
            let Some(ConnEvent::Connect(_, _, tx, _)) = events_rx.recv().await else {
                panic!("no CONNECT handed over");
            };
            // Without yielding, so the task sees all of this at once: the acknowledgements,
            // the reset, and packets to write.
            client
                .write_all(&[0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3])
                .await
                .unwrap();
            client.set_zero_linger().unwrap();
            drop(client);
            std::thread::sleep(Duration::from_millis(10));
            for _ in 0..4 {
                tx.try_send(Outgoing::Packet(ServerPacket::PingResp))
                    .unwrap();
            }
            let mut acked = Vec::new();
            while let Some(ConnEvent::Packet(_, p)) = events_rx.recv().await {
                if let ClientPacket::PubAck(id) = p {
                    acked.push(id);
                }
            }
            task.await.unwrap();
            assert_eq!(closed_rx.recv().await, Some((round, Ended::Closed)));
            assert_eq!(acked, [1, 2, 3], "round {round}");
        }
    }

    /// Connects an MQTT 5 client `t` to a connection task; the task's outgoing queue, its
    /// events and its end.
    async fn connect5(
        stopping: watch::Receiver<bool>,
    ) -> (
        tokio::net::TcpStream,
        mpsc::Sender<Outgoing>,
        mpsc::Receiver<ConnEvent>,
        mpsc::UnboundedReceiver<(ConnId, Ended)>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let (events, mut events_rx) = mpsc::channel(64);
        let (closed, closed_rx) = mpsc::unbounded_channel();
        let meta = ConnMeta { peer, tls: false };
        let limits = ConnLimits {
            max_packet_size: 1 << 20,
            outgoing_capacity: 64,
        };
        let task = tokio::spawn(serve(1, meta, server, events, closed, limits, stopping));
        // No properties.
        let connect = [
            0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b't',
        ];
        client.write_all(&connect).await.unwrap();
        let Some(ConnEvent::Connect(_, _, tx, _)) = events_rx.recv().await else {
            panic!("no CONNECT handed over");
        };
        (client, tx, events_rx, closed_rx, task)
    }

    /// Every acknowledgement handed over until the task lets go of its sender.
    async fn acks(events: &mut mpsc::Receiver<ConnEvent>) -> Vec<u16> {
        let mut acked = Vec::new();
        while let Some(ConnEvent::Packet(_, p)) = events.recv().await {
            if let ClientPacket::PubAck(id) = p {
                acked.push(id);
            }
        }
        acked
    }

    /// The client acknowledges publish 9 and the broker stops: the acknowledgement is handed
    /// over and the connection ends, within 2 s.
    async fn acknowledge_as_the_broker_stops(
        client: &mut tokio::net::TcpStream,
        stopping: &watch::Sender<bool>,
        events: &mut mpsc::Receiver<ConnEvent>,
        closed: &mut mpsc::UnboundedReceiver<(ConnId, Ended)>,
        task: tokio::task::JoinHandle<()>,
    ) {
        client.write_all(&[0x40, 2, 0, 9]).await.unwrap();
        stopping.send_replace(true);
        assert_eq!(acks(events).await, [9]);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the connection ended")
            .unwrap();
        assert_eq!(closed.recv().await, Some((1, Ended::Closed)));
    }

    /// A stopping broker: the connection hands over what its client sent last, and tells an
    /// MQTT 5 client why it goes.
    #[tokio::test]
    async fn a_stopping_broker_takes_what_the_client_sent_and_says_why_it_goes() {
        let (stopping, stopping_rx) = watch::channel(false);
        let (mut client, _tx, mut events, mut closed, task) = connect5(stopping_rx).await;
        acknowledge_as_the_broker_stops(&mut client, &stopping, &mut events, &mut closed, task)
            .await;
        let mut bye = Vec::new();
        client.read_to_end(&mut bye).await.unwrap();
        assert_eq!(
            (bye.first(), bye.get(2)),
            (Some(&0xE0), Some(&0x8B)),
            "{bye:?}"
        );
    }

    /// A publisher that goes on while the broker stops: what the broker took is acknowledged
    /// before the connection goes, so the client has nothing to send again.
    #[tokio::test]
    async fn a_publisher_is_acknowledged_for_what_a_stopping_broker_took() {
        let (stopping, stopping_rx) = watch::channel(false);
        let (mut client, tx, mut events, _closed, task) = connect5(stopping_rx).await;
        stopping.send_replace(true);
        // QoS 1 PUBLISH, packet id 5, topic `t`, payload `x`, no properties.
        client
            .write_all(&[0x32, 7, 0, 1, b't', 0, 5, 0, b'x'])
            .await
            .unwrap();
        let Some(ConnEvent::Packet(_, ClientPacket::Publish(p))) = events.recv().await else {
            panic!("the publish was not handed over");
        };
        assert_eq!((p.topic.as_str(), p.pkid), ("t", 5));
        tx.send(Outgoing::Packet(ServerPacket::PubAck(5, AckCode::Success)))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the connection ended")
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        // PUBACK 5 (4 bytes with MQTT 5's success code left out), then DISCONNECT 0x8B.
        assert_eq!(&got[..4], [0x40, 2, 0, 5], "{got:?}");
        assert_eq!((got[4], got[6]), (0xE0, 0x8B), "{got:?}");
    }

    /// A connection stuck writing to a client that reads nothing does not hold up a stopping
    /// broker, and still hands over what the client sent.
    #[tokio::test]
    async fn a_stopping_broker_is_not_held_up_by_a_client_that_reads_nothing() {
        let (stopping, stopping_rx) = watch::channel(false);
        let (mut client, tx, mut events, mut closed, task) = connect5(stopping_rx).await;
        // Far more than the sockets hold.
        let big = Message::new("t", vec![0u8; 512 * 1024], 0, false);
        for _ in 0..32 {
            let publish = ServerPacket::Publish {
                pkid: 0,
                dup: false,
                message: big.clone(),
            };
            if tx.try_send(Outgoing::Packet(publish)).is_err() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        acknowledge_as_the_broker_stops(&mut client, &stopping, &mut events, &mut closed, task)
            .await;
    }
}
