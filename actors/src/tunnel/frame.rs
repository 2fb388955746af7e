//! The tunnel's datagram framing: one byte of kind, the sender's four-byte epoch, an eight-byte
//! sequence number, then the body.
//!
//! The epoch is a random number a tunnel actor draws when it starts; together with the sequence
//! number (counted per sender from 1) it names a packet uniquely, so a receiver can drop the
//! second copy of a packet in redundant mode and start afresh when the sender restarts (a new
//! epoch). A data frame's body is one raw IP packet; a probe's body is the sending endpoint's
//! actor path (so a router knows where to send that endpoint's traffic back); a probe reply
//! echoes the probe's sequence number with an empty body; an `Emitted` notice (router to
//! router) lists the sequence numbers of an endpoint's packets the sender has forwarded (see
//! [`encode_emitted`]). Frames arrive from other nodes: decoding checks every length and never
//! panics.

/// Bytes of header before the body.
pub const HEADER_LEN: usize = 13;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One IP packet, sent on one tunnel only.
    Data,
    /// One IP packet of an endpoint in redundant mode, to its active router: forward it now and
    /// tell the other router (which holds a copy) that it went out.
    Redundant,
    /// The redundant copy of an IP packet, to the standby router: hold it, and forward it only
    /// if the active router has not said it forwarded it within the hold time.
    Held,
    /// A liveness probe from an endpoint.
    Probe,
    /// A router's answer to a probe.
    ProbeReply,
    /// Router to router: these packets of an endpoint were forwarded (epoch: the endpoint's).
    Emitted,
}

impl FrameKind {
    fn to_byte(self) -> u8 {
        match self {
            FrameKind::Data => 0,
            FrameKind::Probe => 1,
            FrameKind::ProbeReply => 2,
            FrameKind::Redundant => 3,
            FrameKind::Held => 4,
            FrameKind::Emitted => 5,
        }
    }

    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            0 => Some(FrameKind::Data),
            1 => Some(FrameKind::Probe),
            2 => Some(FrameKind::ProbeReply),
            3 => Some(FrameKind::Redundant),
            4 => Some(FrameKind::Held),
            5 => Some(FrameKind::Emitted),
            _ => None,
        }
    }

    /// True for the kinds that carry an IP packet.
    pub fn is_packet(self) -> bool {
        matches!(
            self,
            FrameKind::Data | FrameKind::Redundant | FrameKind::Held
        )
    }
}

/// A decoded frame, borrowing its body from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it carries.
    pub kind: FrameKind,
    /// The sender's epoch (for `Emitted`, the endpoint's).
    pub epoch: u32,
    /// The sender's sequence number (data) or probe number (probes and replies).
    pub seq: u64,
    /// The packet, or the probe's payload.
    pub body: &'a [u8],
}

/// Why a datagram is not a tunnel frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the header.
    #[error("datagram of {0} bytes is shorter than the {HEADER_LEN}-byte tunnel header")]
    Short(usize),
    /// An unknown kind byte.
    #[error("unknown tunnel frame kind {0}")]
    UnknownKind(u8),
    /// An `Emitted` body that does not parse.
    #[error("malformed emitted notice")]
    BadNotice,
}

/// Writes a frame into `buf` (cleared first).
pub fn encode(buf: &mut Vec<u8>, kind: FrameKind, epoch: u32, seq: u64, body: &[u8]) {
    buf.clear();
    buf.reserve(HEADER_LEN + body.len());
    buf.push(kind.to_byte());
    buf.extend_from_slice(&epoch.to_be_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(body);
}

/// Reads a frame from a datagram.
pub fn decode(datagram: &[u8]) -> Result<Frame<'_>, FrameError> {
    let (header, body) = datagram
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(FrameError::Short(datagram.len()))?;
    let kind = FrameKind::from_byte(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
    let mut epoch = [0u8; 4];
    epoch.copy_from_slice(&header[1..5]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[5..]);
    Ok(Frame {
        kind,
        epoch: u32::from_be_bytes(epoch),
        seq: u64::from_be_bytes(seq),
        body,
    })
}

/// The most sequence numbers one `Emitted` notice carries (it stays well inside a datagram).
pub const MAX_EMITTED: usize = 128;

/// Writes an `Emitted` notice: `endpoint`'s packets `seqs` (at most [`MAX_EMITTED`]) of its
/// epoch `epoch` went out. Body: the endpoint's address length (one byte) and text, then the
/// sequence numbers.
pub fn encode_emitted(buf: &mut Vec<u8>, endpoint: &str, epoch: u32, seqs: &[u64]) {
    let name = &endpoint.as_bytes()[..endpoint.len().min(255)];
    let seqs = &seqs[..seqs.len().min(MAX_EMITTED)];
    let mut body = Vec::with_capacity(1 + name.len() + 8 * seqs.len());
    body.push(name.len() as u8);
    body.extend_from_slice(name);
    for s in seqs {
        body.extend_from_slice(&s.to_be_bytes());
    }
    encode(buf, FrameKind::Emitted, epoch, 0, &body);
}

/// Reads an `Emitted` notice's body: the endpoint's address and the sequence numbers.
pub fn decode_emitted(body: &[u8]) -> Result<(&str, Vec<u64>), FrameError> {
    let (&len, rest) = body.split_first().ok_or(FrameError::BadNotice)?;
    let len = usize::from(len);
    let name = rest.get(..len).ok_or(FrameError::BadNotice)?;
    let name = std::str::from_utf8(name).map_err(|_| FrameError::BadNotice)?;
    let seqs = &rest[len..];
    if seqs.len() % 8 != 0 || seqs.len() / 8 > MAX_EMITTED {
        return Err(FrameError::BadNotice);
    }
    let seqs = seqs
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Ok((name, seqs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut buf = Vec::new();
        for kind in [
            FrameKind::Data,
            FrameKind::Redundant,
            FrameKind::Held,
            FrameKind::Probe,
            FrameKind::ProbeReply,
            FrameKind::Emitted,
        ] {
            encode(
                &mut buf,
                kind,
                0xdead_beef,
                0x0102_0304_0506_0708,
                b"packet",
            );
            let f = decode(&buf).unwrap();
            assert_eq!(
                (f.kind, f.epoch, f.seq, f.body),
                (kind, 0xdead_beef, 0x0102_0304_0506_0708, &b"packet"[..])
            );
        }
        encode(&mut buf, FrameKind::ProbeReply, 1, 7, b"");
        assert_eq!(decode(&buf).unwrap().body, b"");
    }

    #[test]
    fn emitted_notices_round_trip_and_refuse_garbage() {
        let mut buf = Vec::new();
        encode_emitted(&mut buf, "edge/tun", 42, &[1, 2, u64::MAX]);
        let f = decode(&buf).unwrap();
        assert_eq!((f.kind, f.epoch), (FrameKind::Emitted, 42));
        assert_eq!(
            decode_emitted(f.body).unwrap(),
            ("edge/tun", vec![1, 2, u64::MAX])
        );
        for bad in [
            &[][..],
            &[5, b'a'][..],
            &[1, b'a', 0, 0][..],
            &[1, 0xff][..],
        ] {
            assert_eq!(decode_emitted(bad), Err(FrameError::BadNotice), "{bad:?}");
        }
        let too_many = vec![0u8; 1 + 8 * (MAX_EMITTED + 1)];
        assert_eq!(decode_emitted(&too_many), Err(FrameError::BadNotice));
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        assert_eq!(decode(&[]), Err(FrameError::Short(0)));
        assert_eq!(decode(&[0; 12]), Err(FrameError::Short(12)));
        assert_eq!(decode(&[9; 16]), Err(FrameError::UnknownKind(9)));
        // Every short prefix of every byte value decodes or errors, never panics.
        for b in 0..=255u8 {
            for len in 0..24 {
                if let Ok(f) = decode(&vec![b; len])
                    && f.kind == FrameKind::Emitted
                {
                    let _ = decode_emitted(f.body);
                }
            }
        }
    }
}
