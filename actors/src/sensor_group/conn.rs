//! One simulated sensor's MQTT 3.1.1 connection, kept as small as a sensor that publishes once a
//! second allows: a task holding its socket, a read buffer that starts at 256 bytes, the
//! publishes not yet acknowledged, and a mailbox ([`Outbox`]) the group drops payloads into.
//!
//! A general client (rumqttc) keeps a 100-event queue, a 64 Ki-bit QoS 2 table and a request
//! channel per connection, some 30 KiB; a sensor needs none of it. This one connects (TCP or
//! TLS, with credentials), subscribes to its command topic, publishes at QoS 0, 1 or 2 with at
//! most [`MAX_INFLIGHT`] unacknowledged, answers incoming commands, pings when idle, and on any
//! error reconnects after a spread-out pause, sending what was unacknowledged again (marked dup).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, Subscribe,
};
use rumqttc::mqttbytes::{Error as MqttError, v4::Connect};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::mqtt_client::MqttTarget;

/// Publishes in flight (unacknowledged) at once; more wait in the outbox.
pub const MAX_INFLIGHT: usize = 16;
/// Payloads waiting in a sensor's outbox; beyond this the group counts a send error.
pub const OUTBOX_LIMIT: usize = 64;
/// The largest packet a sensor accepts (commands are at most 1 KiB).
const MAX_INCOMING: usize = 64 * 1024;
/// Connecting (TCP and TLS) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection task reports to its group.
pub enum ConnEvent {
    /// Connected (CONNACK accepted).
    Up(usize),
    /// Disconnected or could not connect, and why.
    Down(usize, String),
    /// A command payload arrived on the command topic.
    Command(usize, Bytes),
}

/// Where the group leaves payloads for one sensor's task.
#[derive(Default)]
pub struct Outbox {
    queue: Mutex<VecDeque<Bytes>>,
    notify: Notify,
    closed: AtomicBool,
}

impl Outbox {
    /// Queues a payload; false when the outbox is full (the sensor cannot keep up).
    pub fn push(&self, payload: Bytes) -> bool {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= OUTBOX_LIMIT {
            return false;
        }
        q.push_back(payload);
        drop(q);
        self.notify.notify_one();
        true
    }

    /// Tells the task to disconnect and end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn pop(&self) -> Option<Bytes> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

/// Everything one sensor's connection needs to know.
pub struct SensorLink {
    /// The sensor (0-based).
    pub index: usize,
    /// Its MQTT client id.
    pub client_id: String,
    /// The topic it publishes to.
    pub topic: String,
    /// The topic it takes commands on.
    pub command_topic: Option<String>,
    /// QoS of its publishes.
    pub qos: QoS,
    /// Keep-alive interval.
    pub keep_alive: Duration,
}

/// A publish sent and not yet acknowledged.
struct Unacked {
    pkid: u16,
    payload: Bytes,
    /// QoS 2: PUBREC came, PUBREL sent, waiting for PUBCOMP.
    released: bool,
}

/// The state that outlives one connection.
struct Session {
    unacked: VecDeque<Unacked>,
    last_pkid: u16,
}

impl Session {
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            let id = self.last_pkid;
            if id != 0 && !self.unacked.iter().any(|u| u.pkid == id) {
                return id;
            }
        }
    }
}

/// Runs one sensor's connection until its outbox is closed or the group is gone.
pub async fn run(
    link: SensorLink,
    target: Arc<MqttTarget>,
    outbox: Arc<Outbox>,
    events: mpsc::Sender<ConnEvent>,
) {
    let mut session = Session {
        unacked: VecDeque::new(),
        last_pkid: 0,
    };
    let index = link.index;
    while !outbox.is_closed() {
        let result = match connect_tcp(&target).await {
            Err(e) => Err(e),
            Ok(tcp) => match &target.tls {
                None => serve(tcp, &link, &target, &outbox, &events, &mut session).await,
                Some(tls) => match connect_tls(tcp, &target.host, tls.clone()).await {
                    Ok(s) => serve(s, &link, &target, &outbox, &events, &mut session).await,
                    Err(e) => Err(e),
                },
            },
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                if events.send(ConnEvent::Down(index, e)).await.is_err() {
                    return;
                }
            }
        }
        // Spread reconnects so a broker restart is not met by every sensor at once.
        let wait = Duration::from_millis(500 + (index as u64 * 7919) % 1000);
        tokio::time::sleep(wait).await;
    }
}

async fn connect_tcp(target: &MqttTarget) -> Result<TcpStream, String> {
    let addr = (target.host.as_str(), target.port);
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("connect to {target:?}: {e}")),
        Err(_) => Err(format!("connect to {target:?}: timed out")),
    }
}

async fn connect_tls(
    tcp: TcpStream,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<Box<tokio_rustls::client::TlsStream<TcpStream>>, String> {
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("'{host}' is not a TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => Err(format!("TLS with {host}: {e}")),
        Err(_) => Err(format!("TLS with {host}: timed out")),
    }
}

async fn write_packet<S: AsyncWrite + Unpin>(
    stream: &mut S,
    packet: &Packet,
) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(packet.size() + 5);
    packet
        .write(&mut buf, usize::MAX)
        .map_err(|e| format!("encode: {e}"))?;
    stream
        .write_all(&buf)
        .await
        .map_err(|e| format!("write: {e}"))
}

fn publish_packet(link: &SensorLink, pkid: u16, payload: Bytes, dup: bool) -> Packet {
    let mut p = Publish::from_bytes(link.topic.clone(), link.qos, payload);
    p.pkid = pkid;
    p.dup = dup;
    Packet::Publish(p)
}

/// The next whole packet in `buf`, `None` when more bytes are needed.
fn next_packet(buf: &mut BytesMut) -> Result<Option<Packet>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    match Packet::read(buf, MAX_INCOMING) {
        Ok(p) => Ok(Some(p)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(format!("bad packet from the broker: {e}")),
    }
}

/// One connection: CONNECT, SUBSCRIBE, then publishes and commands until an error (`Err`) or
/// the outbox is closed (`Ok`, after a DISCONNECT).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    link: &SensorLink,
    target: &MqttTarget,
    outbox: &Outbox,
    events: &mpsc::Sender<ConnEvent>,
    session: &mut Session,
) -> Result<(), String> {
    let mut connect = Connect::new(link.client_id.clone());
    connect.keep_alive = link.keep_alive.as_secs().clamp(1, u64::from(u16::MAX)) as u16;
    if let Some((u, p)) = &target.credentials {
        connect.set_login(u.clone(), p.clone());
    }
    write_packet(&mut stream, &Packet::Connect(connect)).await?;
    let mut buf = BytesMut::with_capacity(256);
    // The CONNACK, within the connect timeout.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        if let Some(p) = next_packet(&mut buf)? {
            match p {
                Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => break,
                Packet::ConnAck(ack) => return Err(format!("broker refused: {:?}", ack.code)),
                other => return Err(format!("expected CONNACK, got {other:?}")),
            }
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return Err("the broker closed the connection".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Err(_) => return Err("no CONNACK in time".into()),
        }
    }
    if let Some(t) = &link.command_topic {
        let mut s = Subscribe::new(t.clone(), QoS::AtLeastOnce);
        s.pkid = session.next_pkid();
        // Not kept as unacknowledged: the SUBACK is not waited for.
        write_packet(&mut stream, &Packet::Subscribe(s)).await?;
    }
    if events.send(ConnEvent::Up(link.index)).await.is_err() {
        return Ok(());
    }
    // What the last connection left unacknowledged goes again.
    for u in session.unacked.iter_mut() {
        let packet = if u.released {
            Packet::PubRel(PubRel::new(u.pkid))
        } else {
            publish_packet(link, u.pkid, u.payload.clone(), true)
        };
        write_packet(&mut stream, &packet).await?;
    }
    let mut last_out = Instant::now();
    let mut awaiting_ping = false;
    loop {
        // Send what waits, within the in-flight window.
        while link.qos == QoS::AtMostOnce || session.unacked.len() < MAX_INFLIGHT {
            let Some(payload) = outbox.pop() else { break };
            let pkid = match link.qos {
                QoS::AtMostOnce => 0,
                _ => session.next_pkid(),
            };
            write_packet(
                &mut stream,
                &publish_packet(link, pkid, payload.clone(), false),
            )
            .await?;
            last_out = Instant::now();
            if pkid != 0 {
                session.unacked.push_back(Unacked {
                    pkid,
                    payload,
                    released: false,
                });
            }
        }
        if outbox.is_closed() {
            let _ = write_packet(&mut stream, &Packet::Disconnect).await;
            let _ = stream.shutdown().await;
            return Ok(());
        }
        let ping_at = last_out + link.keep_alive;
        tokio::select! {
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) => return Err("the broker closed the connection".into()),
                Ok(_) => {
                    awaiting_ping = false;
                    while let Some(p) = next_packet(&mut buf)? {
                        handle(p, &mut stream, link, events, session).await?;
                    }
                    if buf.is_empty() && buf.capacity() > 4096 {
                        // A large packet passed; give the memory back.
                        buf = BytesMut::with_capacity(256);
                    }
                }
                Err(e) => return Err(format!("read: {e}")),
            },
            _ = outbox.notify.notified() => {}
            _ = tokio::time::sleep_until(ping_at) => {
                if awaiting_ping {
                    return Err("no answer to a ping within the keep-alive".into());
                }
                write_packet(&mut stream, &Packet::PingReq).await?;
                awaiting_ping = true;
                last_out = Instant::now();
            }
        }
    }
}

async fn handle<S: AsyncWrite + Unpin>(
    packet: Packet,
    stream: &mut S,
    link: &SensorLink,
    events: &mpsc::Sender<ConnEvent>,
    session: &mut Session,
) -> Result<(), String> {
    match packet {
        Packet::PubAck(a) => session.unacked.retain(|u| u.pkid != a.pkid),
        Packet::PubRec(r) => {
            if let Some(u) = session.unacked.iter_mut().find(|u| u.pkid == r.pkid) {
                u.released = true;
            }
            write_packet(stream, &Packet::PubRel(PubRel::new(r.pkid))).await?;
        }
        Packet::PubComp(c) => session.unacked.retain(|u| u.pkid != c.pkid),
        Packet::Publish(p) => {
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    write_packet(stream, &Packet::PubAck(PubAck::new(p.pkid))).await?
                }
                QoS::ExactlyOnce => {
                    write_packet(stream, &Packet::PubRec(PubRec::new(p.pkid))).await?
                }
            }
            if events
                .send(ConnEvent::Command(link.index, p.payload))
                .await
                .is_err()
            {
                return Err("the group is gone".into());
            }
        }
        Packet::PubRel(r) => write_packet(stream, &Packet::PubComp(PubComp::new(r.pkid))).await?,
        Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {}
        other => return Err(format!("unexpected packet from the broker: {other:?}")),
    }
    Ok(())
}
