//! Link frames: the length-prefixed unit every message, call and reply travels in.
//!
//! ```text
//! +----------------+---------+---------------------+-------------------------+
//! | length: u32 BE | kind: u8| correlation: u64 BE | payload (length-9 bytes)|
//! +----------------+---------+---------------------+-------------------------+
//! ```
//!
//! The fixed header comes before the payload so that a receiver can answer a call even when its
//! payload is too large or does not decode. [`FrameDecoder`] is a pure state machine: feed it the
//! bytes of a stream in chunks of any size and it yields whole frames, or an error for each frame
//! it had to skip, keeping at most `max_frame` bytes buffered. It never panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the header after the length prefix: kind and correlation id.
pub const HEADER_AFTER_LEN: usize = 1 + 8;
/// Bytes of the whole fixed header.
pub const HEADER_LEN: usize = 4 + HEADER_AFTER_LEN;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A one-way message to an actor.
    Send = 1,
    /// A request that expects a [`FrameKind::Reply`] with the same correlation id.
    Call = 2,
    /// The answer to a call.
    Reply = 3,
    /// A sealed frame on its way between two nodes that have no direct link.
    Relay = 4,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FrameKind::Send,
            2 => FrameKind::Call,
            3 => FrameKind::Reply,
            4 => FrameKind::Relay,
            _ => return None,
        })
    }
}

/// One whole frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The call id for calls and replies, 0 otherwise.
    pub correlation: u64,
    /// The encoded envelope or reply.
    pub payload: Bytes,
}

/// A frame that could not be taken, and what is known of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Larger than the receiver accepts; its bytes were skipped.
    #[error("frame of {size} bytes is larger than the {max}-byte limit")]
    TooLarge {
        /// Announced size.
        size: usize,
        /// Limit.
        max: usize,
        /// The frame's kind byte.
        kind: u8,
        /// The frame's correlation id, so a call can still be answered.
        correlation: u64,
    },
    /// Shorter than a header, or of a kind this version does not know.
    #[error("malformed frame: {reason}")]
    Malformed {
        /// What was wrong.
        reason: String,
        /// The frame's kind byte (0 when unknown).
        kind: u8,
        /// Its correlation id (0 when unknown).
        correlation: u64,
    },
}

impl FrameError {
    /// The correlation id of a call that should be answered with an error, if any.
    pub fn call_to_answer(&self) -> Option<u64> {
        let (kind, correlation) = match self {
            FrameError::TooLarge {
                kind, correlation, ..
            } => (*kind, *correlation),
            FrameError::Malformed {
                kind, correlation, ..
            } => (*kind, *correlation),
        };
        (kind == FrameKind::Call as u8 && correlation != 0).then_some(correlation)
    }
}

/// Appends a frame with `payload` to `out`.
pub fn encode_frame(out: &mut BytesMut, kind: FrameKind, correlation: u64, payload: &[u8]) {
    out.reserve(HEADER_LEN + payload.len());
    put_frame_header(out, kind, correlation, payload.len());
    out.put_slice(payload);
}

/// Appends the header of a frame whose `payload_len` bytes of payload the caller writes next.
pub fn put_frame_header(out: &mut BytesMut, kind: FrameKind, correlation: u64, payload_len: usize) {
    out.put_u32((HEADER_AFTER_LEN + payload_len) as u32);
    out.put_u8(kind as u8);
    out.put_u64(correlation);
}

/// A frame with `payload`, as bytes.
pub fn frame_bytes(kind: FrameKind, correlation: u64, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    encode_frame(&mut out, kind, correlation, payload);
    out.freeze()
}

/// Splits a byte stream into frames (see the module docs).
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    buf: BytesMut,
    /// Bytes of an oversize frame still to discard.
    skipping: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames whose length field exceeds `max_frame`.
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            max_frame: max_frame.max(HEADER_AFTER_LEN),
            buf: BytesMut::new(),
            skipping: 0,
        }
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.skipping > 0 {
            let n = self.skipping.min(data.len());
            self.skipping -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, an error for a frame that was refused, or `None` when more bytes
    /// are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        if self.skipping > 0 || self.buf.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        let kind = self.buf[4];
        let correlation = u64::from_be_bytes(self.buf[5..HEADER_LEN].try_into().unwrap_or([0; 8]));
        if len < HEADER_AFTER_LEN {
            // The length cannot even cover the header: drop the 4-byte prefix and carry on.
            self.buf.advance(4);
            return Some(Err(FrameError::Malformed {
                reason: format!("length {len} is shorter than the {HEADER_AFTER_LEN}-byte header"),
                kind: 0,
                correlation: 0,
            }));
        }
        if len > self.max_frame {
            let available = self.buf.len() - 4;
            let discard = available.min(len);
            self.buf.advance(4 + discard);
            self.skipping = len - discard;
            return Some(Err(FrameError::TooLarge {
                size: len,
                max: self.max_frame,
                kind,
                correlation,
            }));
        }
        if self.buf.len() < 4 + len {
            return None;
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len - HEADER_AFTER_LEN).freeze();
        Some(match FrameKind::from_u8(kind) {
            Some(kind) => Ok(Frame {
                kind,
                correlation,
                payload,
            }),
            None => Err(FrameError::Malformed {
                reason: format!("unknown frame kind {kind}"),
                kind,
                correlation,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames(d: &mut FrameDecoder) -> Vec<Result<Frame, FrameError>> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, FrameKind::Send, 0, b"hello");
        encode_frame(&mut wire, FrameKind::Call, 42, b"");
        encode_frame(&mut wire, FrameKind::Reply, 42, &[7u8; 300]);
        for chunk in [1, 2, 3, 7, 13, 64, 1000] {
            let mut d = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                got.extend(all_frames(&mut d));
            }
            let got: Vec<Frame> = got.into_iter().map(Result::unwrap).collect();
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(got[0].payload.as_ref(), b"hello");
            assert_eq!((got[1].kind, got[1].correlation), (FrameKind::Call, 42));
            assert_eq!(got[2].payload.len(), 300);
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversize_frame_is_skipped_and_the_next_one_decodes() {
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, FrameKind::Call, 9, &[1u8; 5000]);
        encode_frame(&mut wire, FrameKind::Send, 0, b"after");
        let mut d = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for piece in wire.chunks(100) {
            d.push(piece);
            got.extend(all_frames(&mut d));
            assert!(d.buffered() <= 1024 + HEADER_LEN + 100);
        }
        assert_eq!(got.len(), 2);
        let err = got[0].clone().unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                size: 5009,
                max: 1024,
                ..
            }
        ));
        assert_eq!(err.call_to_answer(), Some(9));
        assert_eq!(got[1].clone().unwrap().payload.as_ref(), b"after");
    }

    #[test]
    fn unknown_kind_is_an_error_with_its_correlation() {
        let mut wire = BytesMut::new();
        wire.put_u32(9 + 2);
        wire.put_u8(2);
        wire.put_u64(5);
        wire.put_slice(b"xy");
        let mut bad = wire.clone();
        bad[4] = 99;
        let mut d = FrameDecoder::new(64);
        d.push(&bad);
        let err = d.next_frame().unwrap().unwrap_err();
        assert!(matches!(
            err,
            FrameError::Malformed {
                kind: 99,
                correlation: 5,
                ..
            }
        ));
        assert_eq!(err.call_to_answer(), None);
        d.push(&wire);
        assert_eq!(d.next_frame().unwrap().unwrap().correlation, 5);
    }

    #[test]
    fn garbage_never_panics_and_stays_bounded() {
        // A simple deterministic pseudo-random stream.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut d = FrameDecoder::new(4096);
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            d.push(&x.to_le_bytes());
            while let Some(_frame) = d.next_frame() {}
            assert!(d.buffered() <= 4096 + HEADER_LEN + 8);
        }
    }
}
