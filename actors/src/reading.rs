//! Readings and the payload formats they travel in: JSON, CBOR and the gas detectors' text form.
//!
//! A [`Reading`] is what a sensor measured once: who measured it (`source`), its per-source
//! sequence number, when it was sent (Unix milliseconds), one or more named values, and whether
//! it answers a "read now" request. Sensor groups produce payloads with [`encode`]; collectors
//! take them apart with [`decode`]. Payloads come from devices and networks, so decoding never
//! panics: sizes are bounded first and every failure is a [`PayloadError`] that says why.
//!
//! The formats:
//! - JSON: `{"source": "g/7", "seq": 12, "ts": 1700000000000, "values": {"value": 21.5},
//!   "requested": false}`; `"value": 21.5` is shorthand for one value named `value`; other keys
//!   (such as `pad`, which fills a payload to a size) are ignored.
//! - CBOR: the same object in CBOR.
//! - Gas: `12-Gas Sensor IP:10.0.0.7 MAC:02:00:00:00:00:07 Reading value=41.5`, optionally followed
//!   by ` requested`. Its source is the MAC address; it carries no timestamp.

use std::collections::BTreeMap;

use colony_config::kinds::ReadingFormat;
use serde::{Deserialize, Serialize};

/// The largest payload decoded; anything longer is refused before it is looked at.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The most values one reading may carry.
pub const MAX_VALUES: usize = 256;
/// The longest source name, in bytes.
pub const MAX_SOURCE: usize = 256;

/// One measurement of one sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The sensor or device that measured it (empty: the receiver names it).
    #[serde(default)]
    pub source: String,
    /// Its per-source sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// When it was sent, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// The measured values, by name.
    #[serde(default)]
    pub values: BTreeMap<String, f64>,
    /// True when it answers a "read now" command.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requested: bool,
    /// The sensor's type, when the format carries it (the gas form does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor_type: Option<String>,
    /// The device's IP address, when the format carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The device's MAC address, when the format carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Reading {
    /// A reading of one value named `value`.
    pub fn single(source: impl Into<String>, seq: u64, ts: u64, value: f64) -> Reading {
        Reading {
            source: source.into(),
            seq: Some(seq),
            ts: Some(ts),
            values: BTreeMap::from([("value".to_owned(), value)]),
            requested: false,
            sensor_type: None,
            ip: None,
            mac: None,
        }
    }

    /// Checks what every format must satisfy: a bounded source, 1 to [`MAX_VALUES`] finite
    /// values with non-empty names.
    pub fn validate(&self) -> Result<(), PayloadError> {
        if self.source.len() > MAX_SOURCE {
            return Err(PayloadError::Invalid(format!(
                "source is {} bytes, more than {MAX_SOURCE}",
                self.source.len()
            )));
        }
        if self.values.is_empty() {
            return Err(PayloadError::Invalid("no values".into()));
        }
        if self.values.len() > MAX_VALUES {
            return Err(PayloadError::Invalid(format!(
                "{} values, more than {MAX_VALUES}",
                self.values.len()
            )));
        }
        for (name, v) in &self.values {
            if name.is_empty() || name.len() > MAX_SOURCE {
                return Err(PayloadError::Invalid(
                    "a value has an empty or overlong name".into(),
                ));
            }
            if !v.is_finite() {
                return Err(PayloadError::Invalid(format!(
                    "value '{name}' is not a finite number"
                )));
            }
        }
        Ok(())
    }
}

/// Why a payload is not a reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Longer than [`MAX_PAYLOAD`].
    #[error("payload is {0} bytes, more than {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// Empty.
    #[error("payload is empty")]
    Empty,
    /// Not in any format tried.
    #[error("payload is not JSON, CBOR or the gas text form")]
    Unrecognised,
    /// Not valid JSON of a reading.
    #[error("bad JSON reading: {0}")]
    Json(String),
    /// Not valid CBOR of a reading.
    #[error("bad CBOR reading: {0}")]
    Cbor(String),
    /// Not valid gas text.
    #[error("bad gas reading: {0}")]
    Gas(String),
    /// Decoded, but not a valid reading.
    #[error("invalid reading: {0}")]
    Invalid(String),
}

/// JSON and CBOR readings as they arrive: `value` is shorthand for `values.value`.
#[derive(Deserialize)]
struct WireReading {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(default)]
    values: BTreeMap<String, f64>,
    #[serde(default)]
    requested: bool,
    #[serde(default)]
    sensor_type: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

impl From<WireReading> for Reading {
    fn from(w: WireReading) -> Reading {
        let mut values = w.values;
        if let Some(v) = w.value {
            values.insert("value".to_owned(), v);
        }
        Reading {
            source: w.source.unwrap_or_default(),
            seq: w.seq,
            ts: w.ts,
            values,
            requested: w.requested,
            sensor_type: w.sensor_type,
            ip: w.ip,
            mac: w.mac,
        }
    }
}

/// Guesses a payload's format from its first byte: `{` JSON, a CBOR map header CBOR, a digit gas.
pub fn detect(payload: &[u8]) -> Option<ReadingFormat> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
    match first {
        b'{' => Some(ReadingFormat::Json),
        0xa0..=0xbf => Some(ReadingFormat::Cbor),
        b'0'..=b'9' => Some(ReadingFormat::Gas),
        _ => None,
    }
}

/// Decodes and validates a payload in `format` (detected when `None`).
pub fn decode(payload: &[u8], format: Option<ReadingFormat>) -> Result<Reading, PayloadError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(PayloadError::Empty);
    }
    let format = match format {
        Some(f) => f,
        None => detect(payload).ok_or(PayloadError::Unrecognised)?,
    };
    let reading = match format {
        ReadingFormat::Json => serde_json::from_slice::<WireReading>(payload)
            .map_err(|e| PayloadError::Json(e.to_string()))?
            .into(),
        ReadingFormat::Cbor => ciborium::from_reader::<WireReading, _>(payload)
            .map_err(|e| PayloadError::Cbor(e.to_string()))?
            .into(),
        ReadingFormat::Gas => decode_gas(payload)?,
    };
    reading.validate()?;
    Ok(reading)
}

fn decode_gas(payload: &[u8]) -> Result<Reading, PayloadError> {
    let bad = |why: &str| PayloadError::Gas(why.to_owned());
    let text = std::str::from_utf8(payload)
        .map_err(|_| bad("not UTF-8"))?
        .trim();
    let (seq, rest) = text
        .split_once('-')
        .ok_or_else(|| bad("no 'SEQ-' prefix"))?;
    let seq: u64 = seq
        .parse()
        .map_err(|_| bad("the sequence number is not a whole number"))?;
    let (sensor_type, rest) = rest
        .split_once(" Sensor ")
        .ok_or_else(|| bad("no '<type> Sensor'"))?;
    if sensor_type.is_empty() || sensor_type.contains(char::is_whitespace) {
        return Err(bad("the sensor type must be one word"));
    }
    let rest = rest.strip_prefix("IP:").ok_or_else(|| bad("no 'IP:'"))?;
    let (ip, rest) = rest
        .split_once(' ')
        .ok_or_else(|| bad("nothing after the IP"))?;
    let rest = rest.strip_prefix("MAC:").ok_or_else(|| bad("no 'MAC:'"))?;
    let (mac, rest) = rest
        .split_once(' ')
        .ok_or_else(|| bad("nothing after the MAC"))?;
    let rest = rest
        .strip_prefix("Reading value=")
        .ok_or_else(|| bad("no 'Reading value='"))?;
    let (value, requested) = match rest.split_once(' ') {
        Some((v, "requested")) => (v, true),
        Some(_) => return Err(bad("unexpected text after the value")),
        None => (rest, false),
    };
    let value: f64 = value
        .parse()
        .map_err(|_| bad("the value is not a number"))?;
    if ip.parse::<std::net::IpAddr>().is_err() {
        return Err(bad("the IP is not an IP address"));
    }
    if !is_mac(mac) {
        return Err(bad("the MAC is not six hex pairs"));
    }
    Ok(Reading {
        source: mac.to_ascii_uppercase(),
        seq: Some(seq),
        ts: None,
        values: BTreeMap::from([("value".to_owned(), value)]),
        requested,
        sensor_type: Some(sensor_type.to_owned()),
        ip: Some(ip.to_owned()),
        mac: Some(mac.to_ascii_uppercase()),
    })
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Encodes a reading in `format`, padded (JSON: a `pad` key; CBOR: a `pad` entry; gas: not
/// padded) to at least `min_size` bytes.
pub fn encode(reading: &Reading, format: ReadingFormat, min_size: usize) -> Vec<u8> {
    #[derive(Serialize)]
    struct Padded<'a> {
        #[serde(flatten)]
        reading: &'a Reading,
        #[serde(skip_serializing_if = "str::is_empty")]
        pad: &'a str,
    }
    match format {
        ReadingFormat::Json | ReadingFormat::Cbor => {
            let encode = |pad: &str| -> Vec<u8> {
                let p = Padded { reading, pad };
                if format == ReadingFormat::Json {
                    serde_json::to_vec(&p).unwrap_or_default()
                } else {
                    let mut out = Vec::new();
                    // Writing to a Vec cannot fail and a Reading always serializes.
                    let _ = ciborium::into_writer(&p, &mut out);
                    out
                }
            };
            let plain = encode("");
            if plain.len() >= min_size {
                return plain;
            }
            // Grow the pad until the payload is long enough (length headers grow with it).
            let mut n = min_size.saturating_sub(plain.len() + 9).max(1);
            loop {
                let padded = encode(&"x".repeat(n));
                if padded.len() >= min_size {
                    return padded;
                }
                n += min_size - padded.len();
            }
        }
        ReadingFormat::Gas => {
            let value = reading.values.values().next().copied().unwrap_or(0.0);
            let mut s = format!(
                "{}-{} Sensor IP:{} MAC:{} Reading value={}",
                reading.seq.unwrap_or(0),
                reading.sensor_type.as_deref().unwrap_or("Gas"),
                reading.ip.as_deref().unwrap_or("0.0.0.0"),
                reading.mac.as_deref().unwrap_or("00:00:00:00:00:00"),
                value
            );
            if reading.requested {
                s.push_str(" requested");
            }
            s.into_bytes()
        }
    }
}

/// A MAC address made from a sensor number (locally administered, so it clashes with no device).
pub fn simulated_mac(id: u32) -> String {
    let b = id.to_be_bytes();
    format!("02:00:{:02X}:{:02X}:{:02X}:{:02X}", b[0], b[1], b[2], b[3])
}

/// An IP address made from a sensor number (in 10.0.0.0/8).
pub fn simulated_ip(id: u32) -> String {
    let b = id.to_be_bytes();
    format!("10.{}.{}.{}", b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gas(seq: u64, mac: &str, v: f64) -> Reading {
        Reading {
            source: mac.to_owned(),
            seq: Some(seq),
            ts: None,
            values: BTreeMap::from([("value".to_owned(), v)]),
            requested: false,
            sensor_type: Some("Gas".into()),
            ip: Some("10.0.0.7".into()),
            mac: Some(mac.to_owned()),
        }
    }

    #[test]
    fn json_and_cbor_round_trip_with_padding() {
        let mut r = Reading::single("g/7", 12, 1_700_000_000_000, 21.5);
        r.requested = true;
        for format in [ReadingFormat::Json, ReadingFormat::Cbor] {
            for size in [0, 100, 1000] {
                let bytes = encode(&r, format, size);
                assert!(bytes.len() >= size, "{format:?} {size}: {}", bytes.len());
                assert!(
                    bytes.len() <= size.max(80) + 16,
                    "{format:?} {size}: {}",
                    bytes.len()
                );
                assert_eq!(decode(&bytes, Some(format)).unwrap(), r);
                assert_eq!(decode(&bytes, None).unwrap(), r);
            }
        }
    }

    #[test]
    fn json_value_shorthand_and_unknown_keys() {
        let r = decode(br#"{"source":"a","seq":1,"value":3,"extra":[1,2]}"#, None).unwrap();
        assert_eq!(r.values["value"], 3.0);
        assert_eq!(r.seq, Some(1));
    }

    #[test]
    fn gas_text_round_trips() {
        let text = b"12-Gas Sensor IP:10.0.0.7 MAC:02:00:00:00:00:07 Reading value=41.5";
        let r = decode(text, None).unwrap();
        assert_eq!(r, gas(12, "02:00:00:00:00:07", 41.5));
        assert_eq!(encode(&r, ReadingFormat::Gas, 0), text.to_vec());
        let mut req = r.clone();
        req.requested = true;
        let bytes = encode(&req, ReadingFormat::Gas, 0);
        assert!(bytes.ends_with(b" requested"));
        assert_eq!(decode(&bytes, Some(ReadingFormat::Gas)).unwrap(), req);
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"   ", "empty"),
            (b"hello", "not JSON, CBOR"),
            (b"{\"seq\": 1", "bad JSON"),
            (b"{\"seq\": -1, \"value\": 1}", "bad JSON"),
            (b"{\"seq\": 1}", "no values"),
            (b"{\"value\": 1e999}", "bad JSON"),
            (b"12Gas Sensor", "no 'SEQ-'"),
            (
                b"x-Gas Sensor IP:1.2.3.4 MAC:00:00:00:00:00:00 Reading value=1",
                "not JSON",
            ),
            (
                b"1-Gas Sensor IP:1.2.3.4 MAC:00:00:00:00:00:00 Reading value=abc",
                "not a number",
            ),
            (
                b"1-Gas Sensor IP:1.2.3.999 MAC:00:00:00:00:00:00 Reading value=1",
                "IP",
            ),
            (
                b"1-Gas Sensor IP:1.2.3.4 MAC:00:00:00 Reading value=1",
                "MAC",
            ),
            (
                b"1-Gas Sensor IP:1.2.3.4 MAC:00:00:00:00:00:00 Reading value=NaN",
                "finite",
            ),
            (
                b"1-Gas Sensor IP:1.2.3.4 MAC:00:00:00:00:00:00 Reading value=1 extra",
                "unexpected",
            ),
            (&[0xa1, 0x61], "bad CBOR"),
            (&[0xbf, 0xff, 0xff], "no values"),
        ];
        for (bytes, want) in cases {
            let err = decode(bytes, None).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
        let big = vec![b'{'; MAX_PAYLOAD + 1];
        assert_eq!(
            decode(&big, None),
            Err(PayloadError::TooLarge(MAX_PAYLOAD + 1))
        );
        let many: BTreeMap<String, f64> = (0..300).map(|i| (format!("v{i}"), 1.0)).collect();
        let json = serde_json::to_vec(&serde_json::json!({ "values": many })).unwrap();
        assert!(decode(&json, None).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and single-byte mutation of valid payloads.
        let r = Reading::single("s", 5, 9, 1.25);
        let seeds = [
            encode(&r, ReadingFormat::Json, 0),
            encode(&r, ReadingFormat::Cbor, 0),
            encode(&gas(1, "02:00:00:00:00:01", 2.0), ReadingFormat::Gas, 0),
        ];
        for seed in &seeds {
            for cut in 0..seed.len() {
                let _ = decode(&seed[..cut], None);
            }
            for i in 0..seed.len() {
                for b in [0u8, 0xff, b'-', b' ', 0x1b, 0xa5] {
                    let mut m = seed.clone();
                    m[i] = b;
                    let _ = decode(&m, None);
                }
            }
        }
    }

    #[test]
    fn simulated_identities() {
        assert_eq!(simulated_mac(7), "02:00:00:00:00:07");
        assert_eq!(simulated_ip(258), "10.0.1.2");
        assert!(is_mac(&simulated_mac(u32::MAX)));
    }
}
