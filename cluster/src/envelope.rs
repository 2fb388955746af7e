//! Envelopes: who a message is for, who sent it, and its body, encoded as CBOR.
//!
//! The body is the target kind's own message type, encoded as CBOR by [`encode_body`] and decoded
//! by the target with [`decode_body`]; the envelope carries it as opaque bytes so that routing never
//! needs to know any kind's types. On the wire an envelope is the CBOR array
//! `[destination, sender-or-null, body-bytes]`. It is written and read by hand, not through serde:
//! it is on the path of every message, and this way decoding copies nothing but the sender's
//! address (the body is a slice of the frame). The bytes are what serde would write.

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use colony_config::Address;

pub use crate::cbor::CborError;
use crate::cbor::{self, Reader};

/// Why a send or a call did not get through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CallError {
    /// No actor is registered at that address.
    #[error("no actor at {0}")]
    NoSuchActor(String),
    /// The node is not in the cluster, or its link is down.
    #[error("node {0} is down")]
    NodeDown(String),
    /// No reply within the timeout.
    #[error("no reply within {0} ms")]
    Timeout(u64),
    /// The target (or the link) refused the message, with the reason.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// An envelope as decoded from a frame (borrowing the destination from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The destination's path on its node (`name` or `name/child`).
    pub to: &'a str,
    /// The sending actor, if it gave one.
    pub from: Option<Address>,
    /// The body, CBOR of the destination kind's message type.
    pub body: Bytes,
}

/// Why an envelope payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not the CBOR array `[text, text-or-null, bytes]`.
    #[error("undecodable envelope: {0}")]
    Cbor(#[from] CborError),
    /// The array does not have three items.
    #[error("undecodable envelope: an array of {0} items, not 3")]
    Shape(u64),
    /// The sender is not an address.
    #[error("undecodable envelope: bad sender: {0}")]
    Sender(#[from] colony_config::AddressError),
}

/// Length of the text `a/b/c` made of `parts` joined by `/`.
fn joined_len<'a>(parts: impl Iterator<Item = &'a str>) -> usize {
    parts.map(|p| p.len() + 1).sum::<usize>().saturating_sub(1)
}

fn put_joined<'a>(out: &mut impl BufMut, parts: impl Iterator<Item = &'a str>) {
    for (i, part) in parts.enumerate() {
        if i > 0 {
            out.put_u8(b'/');
        }
        out.put_slice(part.as_bytes());
    }
}

fn path_parts(to: &Address) -> impl Iterator<Item = &str> {
    to.path().iter().map(String::as_str)
}

fn address_parts(a: &Address) -> impl Iterator<Item = &str> {
    std::iter::once(a.node()).chain(path_parts(a))
}

/// Bytes [`encode_envelope`] writes for these arguments.
pub fn envelope_len(to: &Address, from: Option<&Address>, body: &[u8]) -> usize {
    let text = |len: usize| cbor::header_len(len as u64) + len;
    let from = from.map_or(1, |f| text(joined_len(address_parts(f))));
    1 + text(joined_len(path_parts(to))) + from + text(body.len())
}

/// Encodes an envelope for `to` (a full address; only its path travels) into `out`.
///
/// The CBOR is written by hand; it is what a serde encoder writes for the same array.
pub fn encode_envelope(out: &mut impl BufMut, to: &Address, from: Option<&Address>, body: &[u8]) {
    cbor::put_header(out, cbor::ARRAY, 3);
    cbor::put_header(out, cbor::TEXT, joined_len(path_parts(to)) as u64);
    put_joined(out, path_parts(to));
    match from {
        Some(from) => {
            cbor::put_header(out, cbor::TEXT, joined_len(address_parts(from)) as u64);
            put_joined(out, address_parts(from));
        }
        None => out.put_u8(cbor::NULL),
    }
    cbor::put_header(out, cbor::BYTES, body.len() as u64);
    out.put_slice(body);
}

/// Decodes an envelope payload; the body is a slice of `payload`, not a copy.
pub fn decode_envelope(payload: &Bytes) -> Result<Envelope<'_>, EnvelopeError> {
    let mut r = Reader::new(payload);
    let items = r.header(cbor::ARRAY, "an array")?;
    if items != 3 {
        return Err(EnvelopeError::Shape(items));
    }
    let to = r.text()?;
    let from = match r.null() {
        true => None,
        false => Some(r.text()?.parse::<Address>()?),
    };
    let body = r.string(cbor::BYTES, "a byte string")?;
    r.finish()?;
    Ok(Envelope {
        to,
        from,
        body: payload.slice(body),
    })
}

/// The payload of a reply frame.
pub fn encode_reply(result: &Result<Bytes, CallError>) -> Vec<u8> {
    #[derive(Serialize)]
    enum Out<'a> {
        Ok(#[serde(with = "serde_bytes")] &'a [u8]),
        Err(&'a CallError),
    }
    let mut out = Vec::new();
    let value = match result {
        Ok(b) => Out::Ok(b),
        Err(e) => Out::Err(e),
    };
    let _ = ciborium::into_writer(&value, &mut out);
    out
}

/// Decodes the payload of a reply frame.
pub fn decode_reply(payload: &[u8]) -> Result<Bytes, CallError> {
    #[derive(Deserialize)]
    enum In {
        Ok(#[serde(with = "serde_bytes")] Vec<u8>),
        Err(CallError),
    }
    match ciborium::from_reader(payload) {
        Ok(In::Ok(b)) => Ok(Bytes::from(b)),
        Ok(In::Err(e)) => Err(e),
        Err(e) => Err(CallError::Rejected(format!(
            "undecodable reply: {}",
            cbor_error(&e)
        ))),
    }
}

/// Encodes a message body as CBOR.
pub fn encode_body<T: Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, CallError> {
    let mut out = Vec::with_capacity(64);
    ciborium::into_writer(message, &mut out)
        .map_err(|e| CallError::Rejected(format!("cannot encode message: {e}")))?;
    Ok(out)
}

/// Decodes a message body; the error says why the bytes do not fit `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CallError> {
    ciborium::from_reader(body)
        .map_err(|e| CallError::Rejected(format!("message does not fit: {}", cbor_error(&e))))
}

/// A CBOR decoding error in one plain sentence.
fn cbor_error<T: std::fmt::Debug>(e: &ciborium::de::Error<T>) -> String {
    match e {
        ciborium::de::Error::Semantic(_, message) => message.clone(),
        ciborium::de::Error::Syntax(offset) => format!("malformed CBOR at byte {offset}"),
        ciborium::de::Error::Io(e) => format!("truncated CBOR ({e:?})"),
        ciborium::de::Error::RecursionLimitExceeded => "CBOR nested too deeply".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Command {
        Request {},
        Sleep { secs: u32 },
    }

    #[test]
    fn envelope_round_trip() {
        let to: Address = "edge/sensors/s1".parse().unwrap();
        let from: Address = "core/ctl".parse().unwrap();
        let body = encode_body(&Command::Sleep { secs: 5 }).unwrap();
        let mut out = Vec::new();
        encode_envelope(&mut out, &to, Some(&from), &body);
        assert_eq!(out.len(), envelope_len(&to, Some(&from), &body));
        let out = Bytes::from(out);
        let env = decode_envelope(&out).unwrap();
        assert_eq!(env.to, "sensors/s1");
        assert_eq!(env.from, Some(from));
        assert_eq!(
            decode_body::<Command>(&env.body).unwrap(),
            Command::Sleep { secs: 5 }
        );
    }

    #[test]
    fn json_shaped_bodies_decode_into_kind_types() {
        // The control plane turns JSON into CBOR without knowing the kind's type.
        let json: serde_json::Value = serde_json::json!({"request": {}});
        let body = encode_body(&json).unwrap();
        assert_eq!(decode_body::<Command>(&body).unwrap(), Command::Request {});
        let wrong = encode_body(&serde_json::json!({"explode": 1})).unwrap();
        let err = decode_body::<Command>(&wrong).unwrap_err();
        assert!(
            matches!(err, CallError::Rejected(ref r) if r.contains("explode")),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_envelope(&Bytes::from_static(b"\xff\x00garbage")).is_err());
        assert!(matches!(decode_reply(b"\x01"), Err(CallError::Rejected(_))));
        assert!(decode_body::<Command>(b"").is_err());
    }

    /// The envelope as a serde encoder sees it.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Wire(
        String,
        Option<Address>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    );

    fn sample(from: Option<&str>, body_len: usize) -> (Address, Option<Address>, Vec<u8>) {
        let to: Address = "edge/group/sensor-17".parse().unwrap();
        let from = from.map(|f| f.parse().unwrap());
        let body = (0..body_len).map(|i| i as u8).collect();
        (to, from, body)
    }

    #[test]
    fn hand_written_cbor_is_what_serde_writes_and_reads() {
        for (from, body_len) in [
            (None, 0),
            (Some("core/ctl"), 23),
            (Some("core/ctl/child_1"), 24),
            (None, 255),
            (Some("a/b"), 256),
            (Some("a/b"), 70_000),
        ] {
            let (to, from, body) = sample(from, body_len);
            let mut ours = Vec::new();
            encode_envelope(&mut ours, &to, from.as_ref(), &body);
            let wire = Wire("group/sensor-17".into(), from.clone(), body.clone());
            let mut theirs = Vec::new();
            ciborium::into_writer(&wire, &mut theirs).unwrap();
            assert_eq!(ours, theirs, "{from:?} {body_len}");
            assert_eq!(ours.len(), envelope_len(&to, from.as_ref(), &body));
            let theirs = Bytes::from(theirs);
            let env = decode_envelope(&theirs).unwrap();
            assert_eq!(
                (env.to, env.from, env.body.as_ref()),
                ("group/sensor-17", from, &body[..])
            );
        }
    }

    #[test]
    fn malformed_envelopes_are_typed_errors() {
        let bad = |bytes: &'static [u8]| decode_envelope(&Bytes::from_static(bytes)).unwrap_err();
        assert_eq!(bad(b"\x82\x61a\xf6"), EnvelopeError::Shape(2));
        assert!(matches!(
            bad(b"\x83\x61a\x62xy\x40"),
            EnvelopeError::Sender(_)
        ));
        assert!(matches!(
            bad(b"\x83\x61a\xf6\x61b"),
            EnvelopeError::Cbor(CborError::Unexpected { .. })
        ));
        assert!(matches!(
            bad(b"\x83\x61a\xf6\x40\x00"),
            EnvelopeError::Cbor(CborError::Trailing(1))
        ));
        assert!(matches!(
            bad(b"\x9f\x61a\xf6\x40\xff"),
            EnvelopeError::Cbor(CborError::UnsupportedLength(0))
        ));
        assert!(bad(b"\x83\x61a\xf6").to_string().contains("undecodable"));
    }

    #[test]
    fn every_truncation_and_corruption_is_handled() {
        let (to, from, body) = sample(Some("core/ctl"), 40);
        let mut good = Vec::new();
        encode_envelope(&mut good, &to, from.as_ref(), &body);
        for end in 0..good.len() {
            assert!(decode_envelope(&Bytes::copy_from_slice(&good[..end])).is_err());
        }
        for i in 0..good.len() {
            for b in [0x00, 0x17, 0x18, 0x1b, 0x1f, 0x5b, 0x7b, 0x9b, 0xf6, 0xff] {
                let mut bent = good.clone();
                bent[i] = b;
                let _ = decode_envelope(&Bytes::from(bent));
            }
        }
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            let mut junk = vec![0x83];
            for _ in 0..(x % 24) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                junk.push(x as u8);
            }
            let _ = decode_envelope(&Bytes::from(junk));
        }
    }

    #[test]
    fn reply_round_trip() {
        let ok = encode_reply(&Ok(Bytes::from_static(b"abc")));
        assert_eq!(decode_reply(&ok).unwrap().as_ref(), b"abc");
        let err = encode_reply(&Err(CallError::NoSuchActor("a/b".into())));
        assert_eq!(
            decode_reply(&err),
            Err(CallError::NoSuchActor("a/b".into()))
        );
    }
}
