//! Framing MQTT packets out of a byte stream, with rumqttc's `mqttbytes` v4 codec.
//!
//! [`next_packet`] takes bytes read so far and returns the next whole packet, `None` when more
//! bytes are needed, or a typed error for anything malformed or too large. The size limit is
//! checked from the fixed header, before the body is buffered, so a client cannot make the broker
//! allocate more than `max_packet_size`. A CONNECT that asks for MQTT 5 is recognised before
//! decoding ([`connect_protocol_level`]) so it can be refused with the right CONNACK.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::{Error as MqttError, check};

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
}

/// The next whole packet in `buf` (which it consumes), or `None` if more bytes are needed.
pub fn next_packet(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Packet>, FrameError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match Packet::read(buf, max_packet_size) {
        Ok(p) => Ok(Some(p)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(MqttError::PayloadSizeLimitExceeded(size)) => Err(FrameError::TooLarge {
            size,
            max: max_packet_size,
        }),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;
    use rumqttc::mqttbytes::v4::{Connect, Publish};

    fn encode(p: &Packet) -> BytesMut {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        b
    }

    #[test]
    fn frames_whole_packets_and_waits_for_partial_ones() {
        let mut all = encode(&Packet::Connect(Connect::new("c1")));
        let mut publish = Publish::new("a/b", QoS::AtLeastOnce, b"hi".to_vec());
        publish.pkid = 1;
        all.extend_from_slice(&encode(&Packet::Publish(publish)));
        let whole = all.clone();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in whole {
            buf.extend_from_slice(&[byte]);
            if let Some(p) = next_packet(&mut buf, 1024).unwrap() {
                got.push(p);
            }
        }
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Packet::Connect(_)));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversize_is_refused_from_the_header() {
        // A PUBLISH announcing 2 MB, of which only the header arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x01][..]);
        assert!(matches!(
            next_packet(&mut buf, 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn protocol_level_is_read_before_decoding() {
        let mut c = Connect::new("c");
        assert_eq!(
            connect_protocol_level(&encode(&Packet::Connect(c.clone()))),
            Some(4)
        );
        c.protocol = rumqttc::mqttbytes::Protocol::V5;
        assert_eq!(
            connect_protocol_level(&encode(&Packet::Connect(c))),
            Some(5)
        );
        assert_eq!(connect_protocol_level(&BytesMut::from(&[0x10u8][..])), None);
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random walk over byte strings, including valid headers with
        // lying lengths; every outcome must be a packet, a wait or a typed error.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
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
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = connect_protocol_level(&buf);
            while let Ok(Some(_)) = next_packet(&mut buf, 256) {}
        }
    }
}
