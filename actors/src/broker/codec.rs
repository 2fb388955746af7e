//! MQTT 3.1.1 and MQTT 5 on the wire, with rumqttc's `mqttbytes` codecs (v4 and v5), mapped to
//! and from the core's protocol-neutral [`packet`](super::packet) model.
//!
//! A connection peeks at its first CONNECT's protocol level ([`connect_protocol_level`]) and then
//! frames everything with that version's codec. A [`Decoder`] returns whole packets, `None` when
//! more bytes are needed, or a typed error for anything malformed or too large; the size limit is
//! checked from the fixed header, before the body is buffered, so a client cannot make the broker
//! allocate more than `max_packet_size`. MQTT 5 topic aliases are resolved here, per connection,
//! so the core only ever sees topic names. [`encode`] writes a neutral packet in the connection's
//! version: a 3.1.1 client gets no properties or reason codes, and no DISCONNECT.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as V4Error, check};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::{Error as V5Error, QoS as V5QoS};

use super::packet::{
    AckCode, ClientPacket, ConnAckOut, ConnCode, ConnectIn, DisconnectCode, FilterIn, Protocol,
    PublishIn, PublishProps, ServerPacket, SubCode, WillIn,
};
use super::session::Message;
use super::topic::SubOptions;

/// Topic aliases a client may use (advertised in CONNACK).
pub const TOPIC_ALIAS_MAX: u16 = 64;

/// Why a stream of bytes is not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than the broker accepts.
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Malformed.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A topic alias of 0, above the maximum, or not yet set.
    #[error("invalid topic alias {0}")]
    TopicAlias(u16),
    /// A CONNECT for a protocol level the broker does not speak.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocol(u8),
    /// The first packet was not a CONNECT.
    #[error("first packet was not CONNECT")]
    NotConnect,
}

impl FrameError {
    /// The DISCONNECT reason an MQTT 5 client gets for this error.
    pub fn disconnect_code(&self) -> DisconnectCode {
        match self {
            FrameError::TooLarge { .. } => DisconnectCode::PacketTooLarge,
            FrameError::TopicAlias(_) => DisconnectCode::TopicAliasInvalid,
            FrameError::Malformed(_) => DisconnectCode::MalformedPacket,
            FrameError::UnsupportedProtocol(_) | FrameError::NotConnect => {
                DisconnectCode::ProtocolError
            }
        }
    }
}

fn v4_error(e: V4Error, max: usize) -> Option<FrameError> {
    match e {
        V4Error::InsufficientBytes(_) => None,
        V4Error::PayloadSizeLimitExceeded(size) => Some(FrameError::TooLarge { size, max }),
        e => Some(FrameError::Malformed(e.to_string())),
    }
}

fn v5_error(e: V5Error, max: usize) -> Option<FrameError> {
    match e {
        V5Error::InsufficientBytes(_) => None,
        V5Error::PayloadSizeLimitExceeded { pkt_size, .. } => Some(FrameError::TooLarge {
            size: pkt_size,
            max,
        }),
        e => Some(FrameError::Malformed(e.to_string())),
    }
}

/// The protocol level a CONNECT at the start of `buf` asks for (4 = 3.1.1, 5 = MQTT 5), once
/// enough bytes are there; `None` when `buf` does not start with a whole CONNECT yet.
pub fn connect_protocol_level(buf: &BytesMut) -> Option<u8> {
    if buf.first().map(|b| b >> 4) != Some(1) {
        return None;
    }
    let header = check(buf.iter(), usize::MAX).ok()?;
    // The fixed header is the type byte and 1 to 4 length bytes (the last without bit 7); then
    // come the protocol name ("MQTT": 2-byte length + 4) and the level byte.
    let len_len = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let at = 1 + len_len + 6;
    (header.frame_length() > at).then(|| buf[at])
}

fn utf8(b: Bytes) -> Result<String, FrameError> {
    String::from_utf8(b.to_vec()).map_err(|_| FrameError::Malformed("topic is not UTF-8".into()))
}

fn props_of(
    payload_format_indicator: Option<u8>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    user_properties: Vec<(String, String)>,
) -> Option<Arc<PublishProps>> {
    let p = PublishProps {
        payload_format_indicator,
        content_type,
        response_topic,
        correlation_data: correlation_data.map(|b| b.to_vec()),
        user_properties,
    };
    (!p.is_empty()).then(|| Arc::new(p))
}

/// Frames one connection's packets.
#[derive(Debug)]
pub struct Decoder {
    protocol: Protocol,
    max: usize,
    aliases: Vec<Option<String>>,
}

impl Decoder {
    /// A decoder for a connection whose CONNECT is still to come.
    pub fn new(max_packet_size: usize) -> Decoder {
        Decoder {
            protocol: Protocol::V4,
            max: max_packet_size,
            aliases: Vec::new(),
        }
    }

    /// The protocol of the connection (3.1.1 until a CONNECT said otherwise).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The CONNECT at the start of `buf` (consumed), `None` if more bytes are needed.
    pub fn connect(&mut self, buf: &mut BytesMut) -> Result<Option<ConnectIn>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf[0] >> 4 != 1 {
            return Err(FrameError::NotConnect);
        }
        let level = match connect_protocol_level(buf) {
            Some(l) => l,
            None => {
                // Not whole yet: still refuse an oversize announcement now.
                return match check(buf.iter(), self.max) {
                    Err(e) => match v4_error(e, self.max) {
                        None => Ok(None),
                        Some(e) => Err(e),
                    },
                    Ok(_) => Err(FrameError::Malformed("CONNECT too short".into())),
                };
            }
        };
        match level {
            4 => {
                self.protocol = Protocol::V4;
                match self.next_v4(buf)? {
                    Some(v4::Packet::Connect(c)) => Ok(Some(connect_v4(c))),
                    Some(_) => Err(FrameError::NotConnect),
                    None => Ok(None),
                }
            }
            5 => {
                self.protocol = Protocol::V5;
                match self.next_v5(buf)? {
                    Some(v5::Packet::Connect(c, will, login)) => {
                        connect_v5(c, will, login).map(Some)
                    }
                    Some(_) => Err(FrameError::NotConnect),
                    None => Ok(None),
                }
            }
            l => Err(FrameError::UnsupportedProtocol(l)),
        }
    }

    /// The next packet after CONNECT in `buf` (consumed), `None` if more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<ClientPacket>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        match self.protocol {
            Protocol::V4 => Ok(self.next_v4(buf)?.map(from_v4)),
            Protocol::V5 => match self.next_v5(buf)? {
                Some(p) => self.neutral_v5(p).map(Some),
                None => Ok(None),
            },
        }
    }

    fn next_v4(&mut self, buf: &mut BytesMut) -> Result<Option<v4::Packet>, FrameError> {
        match v4::Packet::read(buf, self.max) {
            Ok(p) => Ok(Some(p)),
            Err(e) => v4_error(e, self.max).map_or(Ok(None), Err),
        }
    }

    fn next_v5(&mut self, buf: &mut BytesMut) -> Result<Option<v5::Packet>, FrameError> {
        // A DISCONNECT with no reason code has remaining length 0, which the codec refuses.
        if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
            let _ = buf.split_to(2);
            return Ok(Some(v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            ))));
        }
        let max = u32::try_from(self.max).unwrap_or(u32::MAX);
        match v5::Packet::read(buf, Some(max)) {
            Ok(p) => Ok(Some(p)),
            Err(e) => v5_error(e, self.max).map_or(Ok(None), Err),
        }
    }

    fn neutral_v5(&mut self, p: v5::Packet) -> Result<ClientPacket, FrameError> {
        Ok(match p {
            v5::Packet::Connect(..) => ClientPacket::Connect,
            v5::Packet::Publish(p) => ClientPacket::Publish(self.publish_v5(p)?),
            v5::Packet::PubAck(a) => ClientPacket::PubAck(a.pkid),
            v5::Packet::PubRec(r) => ClientPacket::PubRec(
                r.pkid,
                !matches!(
                    r.reason,
                    v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
                ),
            ),
            v5::Packet::PubRel(r) => ClientPacket::PubRel(r.pkid),
            v5::Packet::PubComp(c) => ClientPacket::PubComp(c.pkid),
            v5::Packet::Subscribe(s) => {
                let id = s
                    .properties
                    .as_ref()
                    .and_then(|p| p.id)
                    .map(|i| u32::try_from(i).unwrap_or(u32::MAX));
                let filters = s
                    .filters
                    .into_iter()
                    .map(|f| FilterIn {
                        filter: f.path,
                        opts: SubOptions {
                            qos: f.qos as u8,
                            no_local: f.nolocal,
                            retain_as_published: f.preserve_retain,
                            id,
                        },
                        retain_handling: match f.retain_forward_rule {
                            v5::RetainForwardRule::OnEverySubscribe => 0,
                            v5::RetainForwardRule::OnNewSubscribe => 1,
                            v5::RetainForwardRule::Never => 2,
                        },
                    })
                    .collect();
                ClientPacket::Subscribe {
                    pkid: s.pkid,
                    filters,
                }
            }
            v5::Packet::Unsubscribe(u) => ClientPacket::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters,
            },
            v5::Packet::PingReq(_) => ClientPacket::PingReq,
            v5::Packet::Disconnect(d) => ClientPacket::Disconnect {
                with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
                session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
            },
            v5::Packet::Auth(_) => ClientPacket::Unexpected("AUTH"),
            v5::Packet::ConnAck(_) => ClientPacket::Unexpected("CONNACK"),
            v5::Packet::SubAck(_) => ClientPacket::Unexpected("SUBACK"),
            v5::Packet::UnsubAck(_) => ClientPacket::Unexpected("UNSUBACK"),
            v5::Packet::PingResp(_) => ClientPacket::Unexpected("PINGRESP"),
        })
    }

    fn publish_v5(&mut self, p: v5::Publish) -> Result<PublishIn, FrameError> {
        let mut topic = utf8(p.topic)?;
        let (expiry, props, alias) = match p.properties {
            Some(pp) => (
                pp.message_expiry_interval,
                props_of(
                    pp.payload_format_indicator,
                    pp.content_type,
                    pp.response_topic,
                    pp.correlation_data,
                    pp.user_properties,
                ),
                pp.topic_alias,
            ),
            None => (None, None, None),
        };
        if let Some(a) = alias {
            if a == 0 || a > TOPIC_ALIAS_MAX {
                return Err(FrameError::TopicAlias(a));
            }
            let i = usize::from(a - 1);
            if self.aliases.len() <= i {
                self.aliases.resize(i + 1, None);
            }
            if topic.is_empty() {
                topic = self.aliases[i].clone().ok_or(FrameError::TopicAlias(a))?;
            } else {
                self.aliases[i] = Some(topic.clone());
            }
        }
        Ok(PublishIn {
            topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
            expiry,
            props,
        })
    }
}

/// A 3.1.1 CONNECT in the neutral model.
pub fn connect_v4(c: v4::Connect) -> ConnectIn {
    ConnectIn {
        protocol: Protocol::V4,
        client_id: c.client_id,
        clean_start: c.clean_session,
        keep_alive: c.keep_alive,
        username: c.login.as_ref().map(|l| l.username.clone()),
        password: c.login.map(|l| Bytes::from(l.password)),
        will: c.last_will.map(|w| WillIn {
            topic: w.topic,
            payload: w.message,
            qos: w.qos as u8,
            retain: w.retain,
            delay: 0,
            expiry: None,
            props: None,
        }),
        session_expiry: if c.clean_session { 0 } else { u32::MAX },
        receive_maximum: None,
        max_packet_size: None,
        auth_method: None,
    }
}

fn connect_v5(
    c: v5::Connect,
    will: Option<v5::LastWill>,
    login: Option<v5::Login>,
) -> Result<ConnectIn, FrameError> {
    let props = c.properties.unwrap_or_default();
    let will = match will {
        None => None,
        Some(w) => {
            let (delay, expiry, props) = match w.properties {
                Some(p) => (
                    p.delay_interval.unwrap_or(0),
                    p.message_expiry_interval,
                    props_of(
                        p.payload_format_indicator,
                        p.content_type,
                        p.response_topic,
                        p.correlation_data,
                        p.user_properties,
                    ),
                ),
                None => (0, None, None),
            };
            Some(WillIn {
                topic: utf8(w.topic)?,
                payload: w.message,
                qos: w.qos as u8,
                retain: w.retain,
                delay,
                expiry,
                props,
            })
        }
    };
    Ok(ConnectIn {
        protocol: Protocol::V5,
        client_id: c.client_id,
        clean_start: c.clean_start,
        keep_alive: c.keep_alive,
        username: login.as_ref().map(|l| l.username.clone()),
        password: login.map(|l| Bytes::from(l.password)),
        will,
        session_expiry: props.session_expiry_interval.unwrap_or(0),
        receive_maximum: props.receive_maximum,
        max_packet_size: props.max_packet_size,
        auth_method: props.authentication_method,
    })
}

/// A 3.1.1 packet after CONNECT in the neutral model.
pub fn from_v4(p: v4::Packet) -> ClientPacket {
    match p {
        v4::Packet::Connect(_) => ClientPacket::Connect,
        v4::Packet::Publish(p) => ClientPacket::Publish(PublishIn {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
            expiry: None,
            props: None,
        }),
        v4::Packet::PubAck(a) => ClientPacket::PubAck(a.pkid),
        v4::Packet::PubRec(a) => ClientPacket::PubRec(a.pkid, false),
        v4::Packet::PubRel(a) => ClientPacket::PubRel(a.pkid),
        v4::Packet::PubComp(a) => ClientPacket::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => ClientPacket::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| FilterIn {
                    filter: f.path,
                    opts: SubOptions::from(f.qos as u8),
                    retain_handling: 0,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => ClientPacket::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => ClientPacket::PingReq,
        v4::Packet::Disconnect => ClientPacket::Disconnect {
            with_will: false,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => ClientPacket::Unexpected("CONNACK"),
        v4::Packet::SubAck(_) => ClientPacket::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => ClientPacket::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => ClientPacket::Unexpected("PINGRESP"),
    }
}

fn qos4(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> V5QoS {
    match q {
        0 => V5QoS::AtMostOnce,
        1 => V5QoS::AtLeastOnce,
        _ => V5QoS::ExactlyOnce,
    }
}

/// Writes `packet` in `protocol` to `out`; `now` (Unix seconds) turns message expiry into the
/// remaining interval. A packet 3.1.1 has no form for (DISCONNECT from the server) writes nothing.
pub fn encode(
    packet: ServerPacket,
    protocol: Protocol,
    now: u64,
    out: &mut BytesMut,
) -> Result<(), String> {
    match protocol {
        Protocol::V4 => match to_v4(packet) {
            Some(p) => p
                .write(out, usize::MAX)
                .map(drop)
                .map_err(|e| e.to_string()),
            None => Ok(()),
        },
        Protocol::V5 => to_v5(packet, now)
            .write(out, None)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

/// A neutral packet as 3.1.1 sends it (`None`: 3.1.1 has no such packet).
pub fn to_v4(p: ServerPacket) -> Option<v4::Packet> {
    Some(match p {
        ServerPacket::ConnAck(c) => {
            let code = match c.code {
                ConnCode::Success => v4::ConnectReturnCode::Success,
                ConnCode::UnsupportedProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
                ConnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnCode::ServerUnavailable => v4::ConnectReturnCode::ServiceUnavailable,
                ConnCode::BadUserNamePassword => v4::ConnectReturnCode::BadUserNamePassword,
                ConnCode::NotAuthorized | ConnCode::BadAuthMethod => {
                    v4::ConnectReturnCode::NotAuthorized
                }
            };
            v4::Packet::ConnAck(v4::ConnAck::new(code, c.session_present))
        }
        ServerPacket::Publish { pkid, dup, message } => v4::Packet::Publish(v4::Publish {
            dup,
            qos: qos4(message.qos),
            retain: message.retain,
            topic: message.topic,
            pkid,
            payload: message.payload,
        }),
        ServerPacket::PubAck(pid, _) => v4::Packet::PubAck(v4::PubAck::new(pid)),
        ServerPacket::PubRec(pid, _) => v4::Packet::PubRec(v4::PubRec::new(pid)),
        ServerPacket::PubRel(pid) => v4::Packet::PubRel(v4::PubRel::new(pid)),
        ServerPacket::PubComp(pid) => v4::Packet::PubComp(v4::PubComp::new(pid)),
        ServerPacket::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(q) => v4::SubscribeReasonCode::Success(qos4(*q)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        ServerPacket::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        ServerPacket::PingResp => v4::Packet::PingResp,
        ServerPacket::Disconnect(_) => return None,
    })
}

fn publish_v5(pkid: u16, dup: bool, m: Message, now: u64) -> v5::Publish {
    let expiry = m
        .expires_at
        .map(|at| u32::try_from(at.saturating_sub(now).max(1)).unwrap_or(u32::MAX));
    let properties = if m.props.is_none() && expiry.is_none() && m.sub_ids.is_empty() {
        None
    } else {
        let p = m.props.as_deref().cloned().unwrap_or_default();
        let sub_ids = m.sub_ids.iter().map(|&i| i as usize).collect();
        Some(v5::PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: expiry,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data.map(Bytes::from),
            user_properties: p.user_properties,
            subscription_identifiers: sub_ids,
            content_type: p.content_type,
        })
    };
    v5::Publish {
        dup,
        qos: qos5(m.qos),
        retain: m.retain,
        topic: Bytes::copy_from_slice(m.topic.as_bytes()),
        pkid,
        payload: m.payload,
        properties,
    }
}

fn ack_reason(code: AckCode) -> (v5::PubAckReason, v5::PubRecReason) {
    match code {
        AckCode::Success => (v5::PubAckReason::Success, v5::PubRecReason::Success),
        AckCode::NoMatchingSubscribers => (
            v5::PubAckReason::NoMatchingSubscribers,
            v5::PubRecReason::NoMatchingSubscribers,
        ),
        AckCode::NotAuthorized => (
            v5::PubAckReason::NotAuthorized,
            v5::PubRecReason::NotAuthorized,
        ),
    }
}

fn connack_v5(c: &ConnAckOut) -> v5::ConnAck {
    let code = match c.code {
        ConnCode::Success => v5::ConnectReturnCode::Success,
        ConnCode::UnsupportedProtocol => v5::ConnectReturnCode::UnsupportedProtocolVersion,
        ConnCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
        ConnCode::ServerUnavailable => v5::ConnectReturnCode::ServerUnavailable,
        ConnCode::BadUserNamePassword => v5::ConnectReturnCode::BadUserNamePassword,
        ConnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
        ConnCode::BadAuthMethod => v5::ConnectReturnCode::BadAuthenticationMethod,
    };
    let properties = (c.code == ConnCode::Success).then(|| v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: Some(c.receive_max),
        max_qos: None,
        retain_available: None,
        max_packet_size: Some(c.max_packet_size),
        assigned_client_identifier: c.assigned_client_id.clone(),
        topic_alias_max: Some(c.topic_alias_max),
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    });
    v5::ConnAck {
        session_present: c.session_present,
        code,
        properties,
    }
}

fn to_v5(p: ServerPacket, now: u64) -> v5::Packet {
    match p {
        ServerPacket::ConnAck(c) => v5::Packet::ConnAck(connack_v5(&c)),
        ServerPacket::Publish { pkid, dup, message } => {
            v5::Packet::Publish(publish_v5(pkid, dup, message, now))
        }
        ServerPacket::PubAck(pid, code) => {
            let mut a = v5::PubAck::new(pid, None);
            a.reason = ack_reason(code).0;
            v5::Packet::PubAck(a)
        }
        ServerPacket::PubRec(pid, code) => {
            let mut r = v5::PubRec::new(pid, None);
            r.reason = ack_reason(code).1;
            v5::Packet::PubRec(r)
        }
        ServerPacket::PubRel(pid) => v5::Packet::PubRel(v5::PubRel::new(pid, None)),
        ServerPacket::PubComp(pid) => v5::Packet::PubComp(v5::PubComp::new(pid, None)),
        ServerPacket::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(q) => v5::SubscribeReasonCode::Success(qos5(*q)),
                    SubCode::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    SubCode::InvalidFilter => v5::SubscribeReasonCode::TopicFilterInvalid,
                })
                .collect(),
            properties: None,
        }),
        ServerPacket::UnsubAck { pkid, existed } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: existed
                .iter()
                .map(|&e| {
                    if e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        }),
        ServerPacket::PingResp => v5::Packet::PingResp(v5::PingResp),
        ServerPacket::Disconnect(code) => {
            use v5::DisconnectReasonCode as R;
            let reason = match code {
                DisconnectCode::ProtocolError => R::ProtocolError,
                DisconnectCode::MalformedPacket => R::MalformedPacket,
                DisconnectCode::PacketTooLarge => R::PacketTooLarge,
                DisconnectCode::SessionTakenOver => R::SessionTakenOver,
                DisconnectCode::TopicAliasInvalid => R::TopicAliasInvalid,
                DisconnectCode::TopicNameInvalid => R::TopicNameInvalid,
                DisconnectCode::ReceiveMaximumExceeded => R::ReceiveMaximumExceeded,
                DisconnectCode::KeepAliveTimeout => R::KeepAliveTimeout,
                DisconnectCode::AdministrativeAction => R::AdministrativeAction,
                DisconnectCode::ServerShuttingDown => R::ServerShuttingDown,
            };
            v5::Packet::Disconnect(v5::Disconnect::new(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode4(p: &v4::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        b
    }

    fn encode5(p: &v5::Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, None).unwrap();
        b
    }

    #[test]
    fn frames_whole_packets_and_waits_for_partial_ones() {
        let mut all = encode4(&v4::Packet::Connect(v4::Connect::new("c1")));
        let mut publish = v4::Publish::new("a/b", QoS::AtLeastOnce, b"hi".to_vec());
        publish.pkid = 1;
        all.extend_from_slice(&encode4(&v4::Packet::Publish(publish)));
        let mut d = Decoder::new(1024);
        let mut buf = BytesMut::new();
        let mut connect = None;
        let mut got = Vec::new();
        for byte in all {
            buf.extend_from_slice(&[byte]);
            if connect.is_none() {
                connect = d.connect(&mut buf).unwrap();
            } else if let Some(p) = d.next(&mut buf).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(connect.unwrap().client_id, "c1");
        assert!(matches!(&got[..], [ClientPacket::Publish(p)] if p.topic == "a/b" && p.pkid == 1));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_is_refused_from_the_header() {
        // A PUBLISH announcing 2 MB, of which only the header arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        let mut d = Decoder::new(1024);
        assert!(matches!(d.next(&mut buf), Err(FrameError::TooLarge { .. })));
        let mut buf = BytesMut::from(&[0x10u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            Decoder::new(1024).connect(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn protocol_level_is_read_before_decoding() {
        let mut c = v4::Connect::new("c");
        assert_eq!(
            connect_protocol_level(&encode4(&v4::Packet::Connect(c.clone()))),
            Some(4)
        );
        c.protocol = rumqttc::mqttbytes::Protocol::V5;
        assert_eq!(
            connect_protocol_level(&encode4(&v4::Packet::Connect(c))),
            Some(5)
        );
        assert_eq!(connect_protocol_level(&BytesMut::from(&[0x10u8][..])), None);
    }

    #[test]
    fn mqtt5_connect_properties_and_topic_aliases() {
        let mut c = v5::Connect {
            keep_alive: 30,
            client_id: "five".into(),
            clean_start: false,
            properties: None,
        };
        c.properties = Some(v5::ConnectProperties {
            session_expiry_interval: Some(300),
            receive_maximum: Some(5),
            max_packet_size: Some(4096),
            ..Default::default()
        });
        let mut buf = encode5(&v5::Packet::Connect(c, None, None));
        let mut d = Decoder::new(1 << 20);
        let connect = d.connect(&mut buf).unwrap().unwrap();
        assert_eq!(d.protocol(), Protocol::V5);
        assert_eq!(
            (
                connect.session_expiry,
                connect.receive_maximum,
                connect.max_packet_size
            ),
            (300, Some(5), Some(4096))
        );
        // Alias 3 set with a topic, then used with an empty one.
        let props = |alias| v5::PublishProperties {
            topic_alias: Some(alias),
            message_expiry_interval: Some(60),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let mut buf = encode5(&v5::Packet::Publish(v5::Publish::new(
            "a/b",
            V5QoS::AtMostOnce,
            "x",
            Some(props(3)),
        )));
        buf.extend_from_slice(&encode5(&v5::Packet::Publish(v5::Publish::new(
            "",
            V5QoS::AtMostOnce,
            "y",
            Some(props(3)),
        ))));
        let a = d.next(&mut buf).unwrap().unwrap();
        let b = d.next(&mut buf).unwrap().unwrap();
        for p in [a, b] {
            let ClientPacket::Publish(p) = p else {
                panic!("not a publish")
            };
            assert_eq!((p.topic.as_str(), p.expiry), ("a/b", Some(60)));
            assert_eq!(p.props.unwrap().user_properties, [("k".into(), "v".into())]);
        }
        // An unknown alias and one above the maximum are errors.
        for alias in [4, TOPIC_ALIAS_MAX + 1, 0] {
            let mut buf = encode5(&v5::Packet::Publish(v5::Publish::new(
                "",
                V5QoS::AtMostOnce,
                "z",
                Some(props(alias)),
            )));
            assert!(matches!(d.next(&mut buf), Err(FrameError::TopicAlias(_))));
        }
        // A bare DISCONNECT (no reason code).
        let mut buf = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert_eq!(
            d.next(&mut buf).unwrap(),
            Some(ClientPacket::Disconnect {
                with_will: false,
                session_expiry: None
            })
        );
    }

    #[test]
    fn neutral_packets_encode_in_both_versions() {
        let mut m = Message::new("t", Bytes::from_static(b"p"), 1, false);
        m.expires_at = Some(100);
        m.sub_ids = vec![7];
        m.props = Some(Arc::new(PublishProps {
            content_type: Some("text/plain".into()),
            ..Default::default()
        }));
        let packets = [
            ServerPacket::ConnAck(ConnAckOut::refuse(ConnCode::BadUserNamePassword)),
            ServerPacket::Publish {
                pkid: 3,
                dup: true,
                message: m,
            },
            ServerPacket::PubAck(1, AckCode::NotAuthorized),
            ServerPacket::SubAck {
                pkid: 2,
                codes: vec![
                    SubCode::Granted(1),
                    SubCode::NotAuthorized,
                    SubCode::InvalidFilter,
                ],
            },
            ServerPacket::UnsubAck {
                pkid: 4,
                existed: vec![true, false],
            },
            ServerPacket::Disconnect(DisconnectCode::SessionTakenOver),
        ];
        for p in &packets {
            let mut out = BytesMut::new();
            encode(p.clone(), Protocol::V4, 40, &mut out).unwrap();
            let mut out5 = BytesMut::new();
            encode(p.clone(), Protocol::V5, 40, &mut out5).unwrap();
            assert!(!out5.is_empty());
        }
        // The 3.1.1 encoding of the publish has no properties; MQTT 5's carries the remaining
        // expiry (60 s), the subscription id and the content type.
        let mut out = BytesMut::new();
        encode(packets[1].clone(), Protocol::V5, 40, &mut out).unwrap();
        let v5::Packet::Publish(p) = v5::Packet::read(&mut out, None).unwrap() else {
            panic!("not a publish")
        };
        let props = p.properties.unwrap();
        assert_eq!(props.message_expiry_interval, Some(60));
        assert_eq!(props.subscription_identifiers, [7]);
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random walk over byte strings, including valid headers with
        // lying lengths; every outcome must be a packet, a wait or a typed error.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for round in 0..40_000 {
            let mut bytes = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 64) as usize;
            for i in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(if i == 0 {
                    (x as u8 & 0xF0) | (x >> 8) as u8 & 0x0F
                } else {
                    x as u8
                });
            }
            let mut d = Decoder::new(256);
            d.protocol = if round % 2 == 0 {
                Protocol::V4
            } else {
                Protocol::V5
            };
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Decoder::new(256).connect(&mut buf.clone());
            while let Ok(Some(_)) = d.next(&mut buf) {}
        }
    }
}
