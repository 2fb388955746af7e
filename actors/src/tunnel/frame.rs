//! The tunnel's datagram framing: one byte of kind, an eight-byte sequence number, then the body.
//!
//! A data frame's body is one raw IP packet; a probe's body is the sending endpoint's actor path
//! (so a router knows where to send that endpoint's traffic back); a probe reply echoes the
//! probe's sequence number with an empty body. Frames arrive from other nodes: decoding checks
//! every length and never panics.

/// Bytes of header before the body.
pub const HEADER_LEN: usize = 9;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// One IP packet.
    Data,
    /// A liveness probe from an endpoint.
    Probe,
    /// A router's answer to a probe.
    ProbeReply,
}

impl FrameKind {
    fn to_byte(self) -> u8 {
        match self {
            FrameKind::Data => 0,
            FrameKind::Probe => 1,
            FrameKind::ProbeReply => 2,
        }
    }

    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            0 => Some(FrameKind::Data),
            1 => Some(FrameKind::Probe),
            2 => Some(FrameKind::ProbeReply),
            _ => None,
        }
    }
}

/// A decoded frame, borrowing its body from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it carries.
    pub kind: FrameKind,
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
}

/// Writes a frame into `buf` (cleared first).
pub fn encode(buf: &mut Vec<u8>, kind: FrameKind, seq: u64, body: &[u8]) {
    buf.clear();
    buf.reserve(HEADER_LEN + body.len());
    buf.push(kind.to_byte());
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend_from_slice(body);
}

/// Reads a frame from a datagram.
pub fn decode(datagram: &[u8]) -> Result<Frame<'_>, FrameError> {
    let (header, body) = datagram
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(FrameError::Short(datagram.len()))?;
    let kind = FrameKind::from_byte(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&header[1..]);
    Ok(Frame {
        kind,
        seq: u64::from_be_bytes(seq),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut buf = Vec::new();
        for kind in [FrameKind::Data, FrameKind::Probe, FrameKind::ProbeReply] {
            encode(&mut buf, kind, 0x0102_0304_0506_0708, b"packet");
            let f = decode(&buf).unwrap();
            assert_eq!(
                (f.kind, f.seq, f.body),
                (kind, 0x0102_0304_0506_0708, &b"packet"[..])
            );
        }
        encode(&mut buf, FrameKind::ProbeReply, 7, b"");
        assert_eq!(decode(&buf).unwrap().body, b"");
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        assert_eq!(decode(&[]), Err(FrameError::Short(0)));
        assert_eq!(decode(&[0; 8]), Err(FrameError::Short(8)));
        assert_eq!(decode(&[9; 12]), Err(FrameError::UnknownKind(9)));
        // Every short prefix of every byte value decodes or errors, never panics.
        for b in 0..=255u8 {
            for len in 0..20 {
                let _ = decode(&vec![b; len]);
            }
        }
    }
}
