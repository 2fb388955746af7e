//! The MQTT 5 client side of a bridge to an external broker: one task that connects (failing
//! over between addresses and going back to the primary when it answers again), subscribes with
//! no-local, publishes what the bridge hands it and reports acknowledgements and incoming
//! publishes back. QoS is capped at 1 on this side: each connection is a fresh client, so a
//! QoS 2 exchange could not be resumed across a reconnect.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, Publish, PublishProperties, RetainForwardRule,
};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::HOPS_PROPERTY;

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
    Ack { epoch: u64, publish: Box<Publish> },
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
    /// QoS 0 messages dropped because the connection could not take them.
    Dropped { count: u64 },
    /// A publish from the far broker, to spool and then acknowledge.
    Received { epoch: u64, publish: Box<Publish> },
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

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn options(c: &LinkConfig, t: &Target) -> MqttOptions {
    let mut o = MqttOptions::new(c.client_id.clone(), t.host.clone(), t.port);
    o.set_keep_alive(c.keepalive);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(c.session_expiry_secs));
    o.set_manual_acks(true);
    o.set_outgoing_inflight_upper_limit(c.max_inflight);
    o.set_receive_maximum(Some(c.max_inflight));
    o.set_max_packet_size(Some(16 * 1024 * 1024));
    o.set_connection_timeout(10);
    if let Some((u, p)) = &c.credentials {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(tls) = &t.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    o
}

fn subscribe(client: &AsyncClient, filters: &[(String, u8)]) {
    if filters.is_empty() {
        return;
    }
    let filters = filters.iter().map(|(f, q)| Filter {
        path: f.clone(),
        qos: qos(*q),
        nolocal: true,
        preserve_retain: true,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    });
    if let Err(e) = client.try_subscribe_many(filters) {
        warn!("cannot subscribe on the remote broker: {e}");
    }
}

fn publish(client: &AsyncClient, f: Forward) -> Result<(), String> {
    let mut props = PublishProperties::default();
    if !f.hops.is_empty() {
        props.user_properties.push((
            HOPS_PROPERTY.to_owned(),
            serde_json::to_string(&f.hops).unwrap_or_default(),
        ));
    }
    client
        .try_publish_with_properties(f.topic, qos(f.qos), f.retain, f.payload, props)
        .map_err(|e| e.to_string())
}

/// Hops carried by an incoming publish.
pub(super) fn hops_of(p: &Publish) -> Vec<String> {
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
    loop {
        epoch += 1;
        let target = c.targets[index].clone();
        let capacity = 16_384 + c.max_inflight as usize * 4;
        let (client, mut events) = AsyncClient::new(options(&c, &target), capacity);
        // Connect.
        let outcome = loop {
            tokio::select! {
                r = events.poll() => match r {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code == ConnectReturnCode::Success {
                            break Ok(());
                        }
                        break Err(format!("refused: {:?}", ack.code));
                    }
                    Ok(_) => {}
                    Err(e) => break Err(e.to_string()),
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
        subscribe(&client, &c.filters);
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
        // Acknowledged seqs, reported together once the connection has nothing more ready.
        let mut acked: Vec<u64> = Vec::new();
        let reason = loop {
            tokio::select! {
                biased;
                r = events.poll() => match r {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(seq) = sent.pop_front()
                            && seq != 0
                        {
                            pkids.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        if let Some(seq) = pkids.remove(&a.pkid) {
                            acked.push(seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(FromLink::Received { epoch, publish: Box::new(p) }).await.is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        break format!("disconnected by the broker: {:?}", d.reason_code);
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(ToLink::Batch { epoch: e, items }) if e == epoch => {
                        let mut failed = None;
                        let mut dropped = 0;
                        for f in items {
                            let seq = f.seq;
                            if let Err(e) = publish(&client, f) {
                                if seq == 0 {
                                    // QoS 0 faster than the connection takes it: dropped.
                                    dropped += 1;
                                    continue;
                                }
                                failed = Some(e);
                                break;
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
                    Some(ToLink::Ack { epoch: e, publish }) if e == epoch => {
                        if let Err(e) = client.try_ack(&publish) {
                            break format!("cannot queue an acknowledgement: {e}");
                        }
                    }
                    Some(ToLink::Filters { filters, removed }) => {
                        for f in removed {
                            let _ = client.try_unsubscribe(f);
                        }
                        subscribe(&client, &filters);
                        c.filters = filters;
                    }
                    Some(_) => {}
                },
                // Only when nothing above is ready: one report for a run of acknowledgements.
                _ = std::future::ready(()), if !acked.is_empty() => {
                    let seqs = std::mem::take(&mut acked);
                    if tx.send(FromLink::Delivered { seqs }).await.is_err() {
                        return;
                    }
                }
                _ = probe.tick(), if index != 0 => {
                    if primary_answers(&c.targets[0]).await {
                        info!(primary = %c.targets[0].url, "primary broker answers again; going back to it");
                        let _ = client.try_disconnect();
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
