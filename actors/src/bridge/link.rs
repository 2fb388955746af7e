//! The MQTT client side of a bridge to an external broker: one task that connects (failing
//! over between addresses and going back to the primary when it answers again), subscribes,
//! publishes what the bridge hands it and reports acknowledgements and incoming publishes back.
//! QoS is capped at 1 on this side: each connection is a fresh client, so a QoS 2 exchange could
//! not be resumed across a reconnect.
//!
//! MQTT 5 (the default) subscribes with no-local and carries a message's hops in a user
//! property. MQTT 3.1.1 has neither, so the link remembers what it published on topics it also
//! subscribes to (topic and payload, for a minute) and drops such a message when the broker
//! sends it back; hops end at such a broker.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_config::kinds::MqttVersion;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, Publish, PublishProperties, RetainForwardRule,
};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::HOPS_PROPERTY;
use crate::broker::topic::filter_matches;

/// One message for the far side; `seq` 0 for QoS 0 (nothing to report back).
#[derive(Debug, Clone)]
pub(super) struct Forward {
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub hops: Vec<String>,
}

/// What the bridge tells the link.
pub(super) enum ToLink {
    /// Publish these, in order, if still on connection `epoch`.
    Batch { epoch: u64, items: Vec<Forward> },
    /// Acknowledge an incoming publish (now spooled) if still on connection `epoch`.
    Ack { epoch: u64, token: AckToken },
    /// The remote filters changed: unsubscribe `removed`, subscribe `filters`.
    Filters {
        filters: Vec<(String, u8)>,
        removed: Vec<String>,
    },
}

/// What the link tells the bridge.
pub(super) enum FromLink {
    /// Connected (connection `epoch`) to `address`.
    Up { epoch: u64, address: String },
    /// Connection `epoch` is gone; what was handed to it and not acknowledged must be sent again.
    Down { epoch: u64, reason: String },
    /// The far broker acknowledged these.
    Delivered { seqs: Vec<u64> },
    /// QoS 0 messages written to the connection.
    Written { count: u64 },
    /// QoS 0 messages dropped because the connection could not take them.
    Dropped { count: u64 },
    /// A publish from the far broker, to spool and then acknowledge.
    Received { epoch: u64, message: Received },
    /// Publishes of the bridge's own that the broker sent back (MQTT 3.1.1), dropped.
    Echoed { count: u64 },
}

/// A publish from the far broker.
pub(super) struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub hops: Vec<String>,
    /// What acknowledges it (QoS 1).
    pub token: AckToken,
}

/// What acknowledges an incoming publish on the connection it came on.
pub(super) enum AckToken {
    V5(Box<Publish>),
    V311(rumqttc::Publish),
}

/// One address of the external broker.
#[derive(Clone)]
pub(super) struct Target {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// How the link connects.
pub(super) struct LinkConfig {
    pub targets: Vec<Target>,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub keepalive: Duration,
    pub session_expiry_secs: u32,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub primary_retry: Duration,
    pub max_inflight: u16,
    pub filters: Vec<(String, u8)>,
    pub version: MqttVersion,
}

/// Parses `mqtt://host[:port]` or `mqtts://host[:port]`.
pub(super) fn target(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Target, String> {
    let (secure, host, port) = crate::mqtt_client::parse_url(url)?;
    let tls = if secure {
        Some(
            tls.cloned()
                .ok_or_else(|| format!("'{url}' needs `ca` (the CA certificate, PEM)"))?,
        )
    } else {
        None
    };
    Ok(Target {
        url: url.to_owned(),
        host,
        port,
        tls,
    })
}

/// One connection's client half, whichever MQTT version it speaks.
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// One connection's event loop.
enum Events {
    V5(Box<rumqttc::v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// What a connection reports, whichever MQTT version it speaks.
enum Event {
    ConnAck(Result<(), String>),
    /// A publish left, with this packet id (0 for QoS 0).
    Sent(u16),
    PubAck(u16),
    Publish(Received),
    Disconnect(String),
    Other,
}

/// The largest packet either way.
const MAX_PACKET: usize = 16 * 1024 * 1024;

fn connect(c: &LinkConfig, t: &Target, capacity: usize) -> (Client, Events) {
    let transport = t
        .tls
        .as_ref()
        .map(|tls| Transport::tls_with_config(TlsConfiguration::Rustls(tls.clone())));
    match c.version {
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(c.client_id.clone(), t.host.clone(), t.port);
            o.set_keep_alive(c.keepalive);
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(c.session_expiry_secs));
            o.set_manual_acks(true);
            o.set_outgoing_inflight_upper_limit(c.max_inflight);
            o.set_receive_maximum(Some(c.max_inflight));
            o.set_max_packet_size(Some(MAX_PACKET as u32));
            o.set_connection_timeout(10);
            if let Some((u, p)) = &c.credentials {
                o.set_credentials(u.clone(), p.clone());
            }
            if let Some(transport) = transport {
                o.set_transport(transport);
            }
            let (client, events) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(client), Events::V5(Box::new(events)))
        }
        MqttVersion::V311 => {
            // The session lives as long as the broker keeps it (3.1.1 has no expiry to ask for).
            let mut o = rumqttc::MqttOptions::new(c.client_id.clone(), t.host.clone(), t.port);
            o.set_keep_alive(c.keepalive);
            o.set_clean_session(false);
            o.set_manual_acks(true);
            o.set_inflight(c.max_inflight);
            o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
            if let Some((u, p)) = &c.credentials {
                o.set_credentials(u.clone(), p.clone());
            }
            if let Some(transport) = transport {
                o.set_transport(transport);
            }
            let (client, events) = rumqttc::AsyncClient::new(o, capacity);
            (Client::V311(client), Events::V311(Box::new(events)))
        }
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    if q == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

fn qos311(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

impl Client {
    fn subscribe(&self, filters: &[(String, u8)]) {
        if filters.is_empty() {
            return;
        }
        let result = match self {
            Client::V5(client) => client
                .try_subscribe_many(filters.iter().map(|(f, q)| Filter {
                    path: f.clone(),
                    qos: qos5(*q),
                    nolocal: true,
                    preserve_retain: true,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                }))
                .map_err(|e| e.to_string()),
            Client::V311(client) => client
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos311(*q))),
                )
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            warn!("cannot subscribe on the remote broker: {e}");
        }
    }

    fn unsubscribe(&self, filter: String) {
        let result = match self {
            Client::V5(client) => client.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Client::V311(client) => client.try_unsubscribe(filter).map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            warn!("cannot unsubscribe on the remote broker: {e}");
        }
    }

    fn publish(&self, f: Forward) -> Result<(), String> {
        match self {
            Client::V5(client) => {
                let mut props = PublishProperties::default();
                if !f.hops.is_empty() {
                    props.user_properties.push((
                        HOPS_PROPERTY.to_owned(),
                        serde_json::to_string(&f.hops).unwrap_or_default(),
                    ));
                }
                client
                    .try_publish_with_properties(f.topic, qos5(f.qos), f.retain, f.payload, props)
                    .map_err(|e| e.to_string())
            }
            Client::V311(client) => client
                .try_publish(f.topic, qos311(f.qos), f.retain, f.payload)
                .map_err(|e| e.to_string()),
        }
    }

    fn ack(&self, token: &AckToken) -> Result<(), String> {
        match (self, token) {
            (Client::V5(client), AckToken::V5(p)) => client.try_ack(p).map_err(|e| e.to_string()),
            (Client::V311(client), AckToken::V311(p)) => {
                client.try_ack(p).map_err(|e| e.to_string())
            }
            // A version switch needs a restart, so a token always fits its connection.
            _ => Ok(()),
        }
    }

    /// Asks the broker to close the connection; when that cannot be queued the connection is
    /// dropped anyway, which the broker sees as the same.
    fn disconnect(&self) {
        match self {
            Client::V5(client) => drop(client.try_disconnect()),
            Client::V311(client) => drop(client.try_disconnect()),
        }
    }
}

impl Events {
    async fn poll(&mut self) -> Result<Event, String> {
        match self {
            Events::V5(events) => {
                use rumqttc::v5::Event as E5;
                Ok(match events.poll().await.map_err(|e| e.to_string())? {
                    E5::Incoming(Packet::ConnAck(ack)) => Event::ConnAck(
                        (ack.code == ConnectReturnCode::Success)
                            .then_some(())
                            .ok_or_else(|| format!("refused: {:?}", ack.code)),
                    ),
                    E5::Incoming(Packet::PubAck(a)) => Event::PubAck(a.pkid),
                    E5::Incoming(Packet::Publish(p)) => Event::Publish(Received {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        hops: hops_of(&p),
                        token: AckToken::V5(Box::new(p)),
                    }),
                    E5::Incoming(Packet::Disconnect(d)) => Event::Disconnect(format!(
                        "disconnected by the broker: {:?}",
                        d.reason_code
                    )),
                    E5::Outgoing(Outgoing::Publish(pkid)) => Event::Sent(pkid),
                    _ => Event::Other,
                })
            }
            Events::V311(events) => {
                use rumqttc::{Event as E4, Packet as P4};
                Ok(match events.poll().await.map_err(|e| e.to_string())? {
                    E4::Incoming(P4::ConnAck(ack)) => Event::ConnAck(
                        (ack.code == rumqttc::ConnectReturnCode::Success)
                            .then_some(())
                            .ok_or_else(|| format!("refused: {:?}", ack.code)),
                    ),
                    E4::Incoming(P4::PubAck(a)) => Event::PubAck(a.pkid),
                    E4::Incoming(P4::Publish(p)) => Event::Publish(Received {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        hops: Vec::new(),
                        token: AckToken::V311(p),
                    }),
                    E4::Outgoing(Outgoing::Publish(pkid)) => Event::Sent(pkid),
                    _ => Event::Other,
                })
            }
        }
    }
}

/// Hops carried by an incoming MQTT 5 publish.
fn hops_of(p: &Publish) -> Vec<String> {
    p.properties
        .as_ref()
        .and_then(|props| {
            props
                .user_properties
                .iter()
                .find(|(k, _)| k == HOPS_PROPERTY)
                .and_then(|(_, v)| serde_json::from_str(v).ok())
        })
        .unwrap_or_default()
}

/// How long a publish of the bridge's own is looked for among incoming ones (MQTT 3.1.1).
const ECHO_TTL: Duration = Duration::from_secs(60);
/// Publishes remembered for that, at most.
const ECHO_MAX: usize = 100_000;

/// What the bridge published on topics it also subscribes to, to recognise it when an MQTT
/// 3.1.1 broker (which has no no-local) sends it back.
#[derive(Default)]
struct Echoes {
    /// (topic, payload hash) → when each copy still expected back was published, oldest first.
    expected: HashMap<(String, u64), VecDeque<Instant>>,
    /// Every copy, oldest first, to forget them.
    order: VecDeque<(Instant, (String, u64))>,
}

fn echo_key(topic: &str, payload: &[u8]) -> (String, u64) {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    (topic.to_owned(), h.finish())
}

impl Echoes {
    fn published(&mut self, topic: &str, payload: &[u8], now: Instant) {
        self.forget(now);
        if self.order.len() >= ECHO_MAX {
            self.pop();
        }
        let key = echo_key(topic, payload);
        self.expected.entry(key.clone()).or_default().push_back(now);
        self.order.push_back((now, key));
    }

    /// True when `topic` and `payload` are one of the bridge's own publishes coming back.
    fn is_echo(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        self.forget(now);
        let key = echo_key(topic, payload);
        let Some(times) = self.expected.get_mut(&key) else {
            return false;
        };
        times.pop_front();
        if times.is_empty() {
            self.expected.remove(&key);
        }
        true
    }

    fn forget(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ECHO_TTL)
        {
            self.pop();
        }
    }

    /// Forgets the oldest copy, unless it already came back.
    fn pop(&mut self) {
        let Some((at, key)) = self.order.pop_front() else {
            return;
        };
        if let Some(times) = self.expected.get_mut(&key)
            && times.front() == Some(&at)
        {
            times.pop_front();
            if times.is_empty() {
                self.expected.remove(&key);
            }
        }
    }
}

async fn primary_answers(t: &Target) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((t.host.as_str(), t.port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// Runs the link until the bridge drops its command channel.
pub(super) async fn run(
    mut c: LinkConfig,
    mut rx: mpsc::Receiver<ToLink>,
    tx: mpsc::Sender<FromLink>,
) {
    let mut index = 0;
    let mut epoch = 0u64;
    let mut backoff = c.reconnect_min;
    // Kept across connections: a persistent session may send an echo after a reconnect.
    let mut echoes = Echoes::default();
    loop {
        epoch += 1;
        let target = c.targets[index].clone();
        let capacity = 16_384 + c.max_inflight as usize * 4;
        let (client, mut events) = connect(&c, &target, capacity);
        // Connect.
        let outcome = loop {
            tokio::select! {
                r = events.poll() => match r {
                    Ok(Event::ConnAck(result)) => break result,
                    Ok(_) => {}
                    Err(e) => break Err(e),
                },
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(ToLink::Filters { filters, .. }) => c.filters = filters,
                    Some(_) => {} // for an older connection
                },
            }
        };
        if let Err(reason) = outcome {
            debug!(remote = %target.url, "cannot connect: {reason}");
            if tx.send(FromLink::Down { epoch, reason }).await.is_err() {
                return;
            }
            drop(client);
            let wait = super::jittered(backoff);
            backoff = (backoff * 2).min(c.reconnect_max);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(ToLink::Filters { filters, .. }) => c.filters = filters,
                        Some(_) => {}
                    },
                }
            }
            index = (index + 1) % c.targets.len();
            continue;
        }
        backoff = c.reconnect_min;
        info!(remote = %target.url, "bridge connected");
        client.subscribe(&c.filters);
        if tx
            .send(FromLink::Up {
                epoch,
                address: target.url.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        let mut sent: VecDeque<u64> = VecDeque::new();
        let mut pkids: HashMap<u16, u64> = HashMap::new();
        let mut probe = tokio::time::interval(c.primary_retry);
        probe.tick().await;
        // Acknowledged seqs and written QoS 0 messages, reported together once the connection
        // has nothing more ready.
        let mut acked: Vec<u64> = Vec::new();
        let mut written = 0u64;
        let reason = loop {
            tokio::select! {
                biased;
                r = events.poll() => match r {
                    Ok(Event::Sent(pkid)) => match sent.pop_front() {
                        Some(0) => written += 1,
                        Some(seq) => {
                            pkids.insert(pkid, seq);
                        }
                        None => {}
                    },
                    Ok(Event::PubAck(pkid)) => {
                        if let Some(seq) = pkids.remove(&pkid) {
                            acked.push(seq);
                        }
                    }
                    Ok(Event::Publish(message)) => {
                        if c.version == MqttVersion::V311
                            && echoes.is_echo(&message.topic, &message.payload, Instant::now())
                        {
                            if message.qos > 0 && let Err(e) = client.ack(&message.token) {
                                break format!("cannot queue an acknowledgement: {e}");
                            }
                            if tx.send(FromLink::Echoed { count: 1 }).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if tx.send(FromLink::Received { epoch, message }).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Disconnect(reason)) => break reason,
                    Ok(_) => {}
                    Err(e) => break e,
                },
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(ToLink::Batch { epoch: e, items }) if e == epoch => {
                        let mut failed = None;
                        let mut dropped = 0;
                        let now = Instant::now();
                        for f in items {
                            let seq = f.seq;
                            // Without no-local (MQTT 3.1.1) the broker sends this back.
                            let echo = (c.version == MqttVersion::V311
                                && c.filters.iter().any(|(filter, _)| filter_matches(filter, &f.topic)))
                                .then(|| (f.topic.clone(), f.payload.clone()));
                            if let Err(e) = client.publish(f) {
                                if seq == 0 {
                                    // QoS 0 faster than the connection takes it: dropped.
                                    dropped += 1;
                                    continue;
                                }
                                failed = Some(e);
                                break;
                            }
                            if let Some((topic, payload)) = echo {
                                echoes.published(&topic, &payload, now);
                            }
                            sent.push_back(seq);
                        }
                        if dropped > 0 && tx.send(FromLink::Dropped { count: dropped }).await.is_err() {
                            return;
                        }
                        if let Some(e) = failed {
                            // A QoS 1 message could not be queued: start a new connection, and
                            // the bridge sends what is unacknowledged again.
                            break format!("cannot queue a publish: {e}");
                        }
                    }
                    Some(ToLink::Ack { epoch: e, token }) if e == epoch => {
                        if let Err(e) = client.ack(&token) {
                            break format!("cannot queue an acknowledgement: {e}");
                        }
                    }
                    Some(ToLink::Filters { filters, removed }) => {
                        for f in removed {
                            client.unsubscribe(f);
                        }
                        client.subscribe(&filters);
                        c.filters = filters;
                    }
                    Some(_) => {}
                },
                // Only when nothing above is ready: one report for a run of acknowledgements.
                _ = std::future::ready(()), if !acked.is_empty() || written > 0 => {
                    let seqs = std::mem::take(&mut acked);
                    if !seqs.is_empty() && tx.send(FromLink::Delivered { seqs }).await.is_err() {
                        return;
                    }
                    let count = std::mem::take(&mut written);
                    if count > 0 && tx.send(FromLink::Written { count }).await.is_err() {
                        return;
                    }
                }
                _ = probe.tick(), if index != 0 => {
                    if primary_answers(&c.targets[0]).await {
                        info!(primary = %c.targets[0].url, "primary broker answers again; going back to it");
                        client.disconnect();
                        index = 0;
                        break "going back to the primary".to_owned();
                    }
                }
            }
        };
        warn!(remote = %target.url, "bridge connection lost: {reason}");
        if !acked.is_empty() && tx.send(FromLink::Delivered { seqs: acked }).await.is_err() {
            return;
        }
        if tx.send(FromLink::Down { epoch, reason }).await.is_err() {
            return;
        }
        if index == 0 && reason_is_primary_return(&target, &c) {
            continue;
        }
        // Try the next address after a short pause (the first retry of the same one is quick).
        tokio::time::sleep(super::jittered(c.reconnect_min)).await;
    }
}

fn reason_is_primary_return(current: &Target, c: &LinkConfig) -> bool {
    current.url != c.targets[0].url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_is_recognised_once_per_publish_and_forgotten_after_a_minute() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        e.published("sync/x", b"5", t0);
        e.published("sync/x", b"5", t0 + Duration::from_secs(1));
        assert!(!e.is_echo("sync/x", b"6", t0), "another payload");
        assert!(!e.is_echo("sync/y", b"5", t0), "another topic");
        assert!(e.is_echo("sync/x", b"5", t0 + Duration::from_secs(2)));
        assert!(e.is_echo("sync/x", b"5", t0 + Duration::from_secs(2)));
        assert!(
            !e.is_echo("sync/x", b"5", t0 + Duration::from_secs(2)),
            "both came back"
        );
        e.published("sync/x", b"7", t0 + Duration::from_secs(3));
        assert!(
            !e.is_echo("sync/x", b"7", t0 + Duration::from_secs(64)),
            "forgotten"
        );
        assert!(e.order.is_empty() && e.expected.is_empty());
    }

    #[test]
    fn echoes_are_bounded_and_the_oldest_go_first() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        for i in 0..=ECHO_MAX {
            e.published("t", i.to_string().as_bytes(), t0);
        }
        assert_eq!(e.order.len(), ECHO_MAX);
        assert!(!e.is_echo("t", b"0", t0), "the oldest was forgotten");
        assert!(e.is_echo("t", ECHO_MAX.to_string().as_bytes(), t0));
    }
}
