//! Envelopes: who a message is for, who sent it, and its body, encoded as CBOR.
//!
//! The body is the target kind's own message type, encoded as CBOR by [`encode_body`] and decoded
//! by the target with [`decode_body`]; the envelope carries it as opaque bytes so that routing never
//! needs to know any kind's types. On the wire an envelope is the CBOR array
//! `[destination, sender-or-null, body-bytes]`.

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use colony_config::Address;

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

/// An envelope as decoded from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The destination's path on its node (`name` or `name/child`).
    pub to: String,
    /// The sending actor, if it gave one.
    pub from: Option<Address>,
    /// The body, CBOR of the destination kind's message type.
    pub body: Bytes,
}

#[derive(Serialize)]
struct WireOut<'a>(
    &'a str,
    Option<&'a Address>,
    #[serde(with = "serde_bytes")] &'a [u8],
);

#[derive(Deserialize)]
struct WireIn(
    String,
    Option<Address>,
    #[serde(with = "serde_bytes")] Vec<u8>,
);

/// Encodes an envelope for `to` (a full address; only its path travels) into `out`.
pub fn encode_envelope(out: &mut Vec<u8>, to: &Address, from: Option<&Address>, body: &[u8]) {
    let path = to.path().join("/");
    // Writing into a Vec cannot fail.
    let _ = ciborium::into_writer(&WireOut(&path, from, body), out);
}

/// Decodes an envelope payload.
pub fn decode_envelope(payload: &[u8]) -> Result<Envelope, String> {
    let WireIn(to, from, body) = ciborium::from_reader(payload)
        .map_err(|e| format!("undecodable envelope: {}", cbor_error(&e)))?;
    Ok(Envelope {
        to,
        from,
        body: Bytes::from(body),
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
        assert!(decode_envelope(b"\xff\x00garbage").is_err());
        assert!(matches!(decode_reply(b"\x01"), Err(CallError::Rejected(_))));
        assert!(decode_body::<Command>(b"").is_err());
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
