//! The protocol-neutral packets the core speaks.
//!
//! A connection decodes MQTT 3.1.1 or MQTT 5 packets ([`super::codec`]) into these and encodes
//! these back into the version its client speaks, so the core has one model of the protocol:
//! MQTT 5's extras (properties, reason codes, session and message expiry, subscription options)
//! are fields a 3.1.1 connection leaves at their 3.1.1 meaning. Topic aliases never reach the
//! core: the connection resolves them.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::session::Message;
use super::topic::SubOptions;

/// The MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// MQTT 5 publish properties the broker forwards unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishProps {
    /// Payload format indicator (1 = UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    /// Content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Response topic (request/response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Correlation data (request/response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    /// User properties, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

impl PublishProps {
    /// True when there is nothing to forward.
    pub fn is_empty(&self) -> bool {
        *self == PublishProps::default()
    }

    /// Bytes these take on the wire, roughly (for the client's maximum packet size).
    pub fn wire_len(&self) -> usize {
        self.content_type.as_ref().map_or(0, |s| s.len() + 3)
            + self.response_topic.as_ref().map_or(0, |s| s.len() + 3)
            + self.correlation_data.as_ref().map_or(0, |s| s.len() + 3)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
            + 2
    }
}

/// A will, as given in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillIn {
    /// The will message (its `expires_at` still unset).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Seconds to wait after the connection ends before publishing it (MQTT 5).
    pub delay: u32,
    /// Message expiry interval in seconds (MQTT 5).
    pub expiry: Option<u32>,
    /// Properties to forward.
    pub props: Option<Arc<PublishProps>>,
}

/// A CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectIn {
    /// The client's protocol.
    pub protocol: Protocol,
    /// Client id (may be empty).
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    /// Keepalive in seconds.
    pub keep_alive: u16,
    /// Username.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// The will.
    pub will: Option<WillIn>,
    /// Seconds the session outlives the connection: 3.1.1 clean session is 0, persistent is
    /// `u32::MAX` (never expires).
    pub session_expiry: u32,
    /// The most QoS 1/2 publishes the client takes unacknowledged (MQTT 5 receive maximum).
    pub receive_maximum: Option<u16>,
    /// The largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// An MQTT 5 enhanced authentication method (not supported: refused).
    pub auth_method: Option<String>,
}

/// A PUBLISH from a client, its topic alias resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishIn {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Packet id (0 at QoS 0).
    pub pkid: u16,
    /// Message expiry interval in seconds (MQTT 5).
    pub expiry: Option<u32>,
    /// Properties to forward.
    pub props: Option<Arc<PublishProps>>,
}

/// One filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterIn {
    /// The raw filter (`$share/group/...` included).
    pub filter: String,
    /// QoS, no-local, retain-as-published and the subscription id.
    pub opts: SubOptions,
    /// 0: retained messages on every subscribe; 1: only for a new subscription; 2: never.
    pub retain_handling: u8,
}

/// A packet from a client after its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket {
    /// A second CONNECT (a protocol violation).
    Connect,
    /// PUBLISH.
    Publish(PublishIn),
    /// PUBACK.
    PubAck(u16),
    /// PUBREC; `true` when its reason code is an error (the exchange ends there).
    PubRec(u16, bool),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<FilterIn>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet id.
        pkid: u16,
        /// Filters.
        filters: Vec<String>,
    },
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect {
        /// Publish the will anyway (MQTT 5 reason 0x04).
        with_will: bool,
        /// A new session expiry interval (MQTT 5).
        session_expiry: Option<u32>,
    },
    /// A packet only a server sends (CONNACK, SUBACK, ...), or AUTH.
    Unexpected(&'static str),
}

/// Why a CONNECT is refused (or `Success`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCode {
    /// Accepted.
    Success,
    /// Unsupported protocol version.
    UnsupportedProtocol,
    /// Client id not acceptable.
    BadClientId,
    /// Server unavailable (connection limit).
    ServerUnavailable,
    /// Wrong username or password.
    BadUserNamePassword,
    /// Not authorised (anonymous not allowed).
    NotAuthorized,
    /// Unsupported authentication method (MQTT 5).
    BadAuthMethod,
}

/// A PUBACK/PUBREC reason (MQTT 5; 3.1.1 sends none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Accepted.
    Success,
    /// Accepted, but nobody subscribes.
    NoMatchingSubscribers,
    /// Refused by ACL.
    NotAuthorized,
}

/// A SUBACK code per filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubCode {
    /// Granted at this QoS.
    Granted(u8),
    /// Refused by ACL.
    NotAuthorized,
    /// Not a valid filter.
    InvalidFilter,
}

/// Why the server ends a connection (sent as DISCONNECT to MQTT 5 clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectCode {
    /// A protocol violation.
    ProtocolError,
    /// Malformed packet.
    MalformedPacket,
    /// Too large.
    PacketTooLarge,
    /// Another connection took the client id.
    SessionTakenOver,
    /// A topic alias out of range or unknown.
    TopicAliasInvalid,
    /// An invalid topic name.
    TopicNameInvalid,
    /// More unacknowledged QoS 2 publishes than allowed.
    ReceiveMaximumExceeded,
    /// Keepalive expired.
    KeepAliveTimeout,
    /// An operator cut the client off.
    AdministrativeAction,
    /// The broker is stopping.
    ServerShuttingDown,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAckOut {
    /// A session was resumed.
    pub session_present: bool,
    /// The outcome.
    pub code: ConnCode,
    /// The client id the server assigned (MQTT 5, when the client sent none).
    pub assigned_client_id: Option<String>,
    /// The largest packet the server accepts.
    pub max_packet_size: u32,
    /// The highest topic alias the client may use.
    pub topic_alias_max: u16,
    /// The most QoS 1/2 publishes the server takes unacknowledged.
    pub receive_max: u16,
}

impl ConnAckOut {
    /// A refusal.
    pub fn refuse(code: ConnCode) -> ConnAckOut {
        ConnAckOut {
            session_present: false,
            code,
            assigned_client_id: None,
            max_packet_size: 0,
            topic_alias_max: 0,
            receive_max: 0,
        }
    }
}

/// A packet to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerPacket {
    /// CONNACK.
    ConnAck(ConnAckOut),
    /// PUBLISH.
    Publish {
        /// Packet id (0 at QoS 0).
        pkid: u16,
        /// DUP flag.
        dup: bool,
        /// The message (QoS, retain, properties, expiry, subscription ids).
        message: Message,
    },
    /// PUBACK.
    PubAck(u16, AckCode),
    /// PUBREC.
    PubRec(u16, AckCode),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBACK.
    SubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter.
        codes: Vec<SubCode>,
    },
    /// UNSUBACK; per filter, whether a subscription existed.
    UnsubAck {
        /// Packet id.
        pkid: u16,
        /// Per filter.
        existed: Vec<bool>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT (MQTT 5 only; a 3.1.1 connection is just closed).
    Disconnect(DisconnectCode),
}
