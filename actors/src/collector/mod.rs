//! The collector: takes readings from a broker, from devices over UDP and from other actors,
//! checks them, tracks each source's sequence numbers and stores them in SQLite.
//!
//! Sources, any combination:
//! - `source = { broker = "node/broker", topics = ["outTopic/#"] }`: by default (`via = "actor"`)
//!   the collector subscribes by address; at QoS 1 the broker keeps each notice (on disk, and
//!   from before the collector first starts: the subscription is declared by the config) until
//!   the collector acknowledges it after the transaction holding it has committed. With
//!   `via = "mqtt"` it is instead an MQTT client of that broker's plain TCP listener with a
//!   persistent session (clean session off, client id `colony-collector-NODE-NAME`) and
//!   acknowledges a QoS 1 publish only after the transaction holding it has committed; the
//!   broker redelivers whatever was not acknowledged when the collector died. Either way a
//!   redelivered reading that was already stored is dropped by the sequence tracker, and
//!   acknowledged again. By actor, a notice the collector already took (the broker sends its
//!   window again when the collector subscribes anew, while the first copies still wait in the
//!   mailbox) is recognised by its id, acknowledged again and not counted as a duplicate
//!   (`notices_again` in status). Stopping, the collector commits what it has, acknowledges it
//!   and (over MQTT) waits up to 2 s for its client to write those acknowledgements and its
//!   disconnect, so that a clean restart sends nothing again.
//!
//!   **Readings published before the first connect.** Over MQTT the broker queues QoS 1
//!   readings for the collector only once its persistent session exists, that is from the
//!   collector's first successful subscribe on: whatever is published before that (a collector
//!   added after its sensors, or started late) is not delivered to it. By actor the broker
//!   declares the subscription itself when it starts, so nothing published after the broker's
//!   start is lost. Exactly-once storage relies on sequence numbers: a redelivered reading
//!   that carries none is stored again.
//! - `source = { udp = "0.0.0.0:6001" }`: each datagram is one reading. The collector remembers
//!   each device's last address (in memory and in the `sources` table) so that a `command`
//!   message can send it a datagram.
//! - Messages: `reading` (host and probe sensors send these) and `publish` (the broker's notice
//!   to actor subscribers).
//!
//! Each payload is decoded per `format` (JSON, CBOR or gas text; all are tried when unset). A
//! payload that is not a valid reading is counted and stored in `rejects` with the reason; the
//! collector carries on. The source of a reading is its `source` field (the MAC for gas text),
//! else the MQTT topic, `udp:ADDR` or the sending actor's address.
//!
//! Storage ([`store`]): the `database` file (relative to the actor's data directory) in WAL mode;
//! a transaction commits `batch_size` readings or whatever waited `flush_ms`, and on shutdown
//! (over MQTT at QoS 1 also whenever half the broker's in-flight window waits for
//! acknowledgement: raise the broker's `limits.max_inflight` for larger batches). By actor, the
//! collector asks the broker for a window of [`WINDOW_BATCHES`] batches ([`actor_window`]), so
//! the broker keeps sending while a batch commits, and acknowledges each committed batch in one
//! `ack` (also when the broker caps the window: then at half of it). `synchronous`
//! (`normal` by default, or `full`) says whether a commit, and so an acknowledgement, survives
//! only the process dying or also an OS crash or power cut.
//! Tables: `readings` (source, epoch, seq, topic, value = the value named `value` or the first,
//! `values` = JSON of all values, sensor_type, ip, mac, sent_ms = the sensor's timestamp,
//! received_ms, flags = `requested`, `first`, `gap`, `late`, `reset`), `rejects` (received_ms,
//! origin, reason, payload) and `sources` (the [`sequence`] tracker's state per source, with the
//! last address, counters and the id of its newest reading). A reading is stored once per
//! (source, epoch, seq); duplicates are counted, not stored. `readings` is indexed only by id,
//! so that writes append (see [`store`]). Query it with
//! `sqlite3 FILE 'select source, count(*) from readings group by 1'`.
//!
//! Messages ([`CollectorMessage`]): `query` (`latest`, `latest_per_source`, `counts`, `gaps`,
//! `rejects`), `export` (CSV to a file on the collector's node; replies with the file's path),
//! `export_page` (CSV in pages, what `colony export` writes to a file or stdout on the machine
//! it runs on, from a collector on any node), `command` (a datagram to a UDP device), `flush`,
//! `status`. Queries and exports commit the pending batch first. Exports filter by `source` and
//! by received time (`from_ms` inclusive, `to_ms` exclusive, Unix ms).
//!
//! Reloads in place: `batch_size`, `flush_ms`, `format`. Anything else restarts the actor. A
//! database that cannot be opened or a UDP port that cannot be bound fails the start; a failed
//! commit fails the actor (its supervisor restarts it; nothing unacknowledged was acknowledged).

mod actor;

/// Batches of readings a collector subscribed by actor asks the broker to have in flight.
pub const WINDOW_BATCHES: usize = 4;

/// The in-flight window a collector subscribed by actor asks its broker for: [`WINDOW_BATCHES`]
/// batches of `batch_size`, at most the broker's [`crate::broker::ACTOR_WINDOW_MAX`].
pub fn actor_window(batch_size: usize) -> u32 {
    let w = batch_size.max(1).saturating_mul(WINDOW_BATCHES);
    u32::try_from(w)
        .unwrap_or(u32::MAX)
        .min(crate::broker::ACTOR_WINDOW_MAX)
}
pub mod batch;
pub mod sequence;
pub mod store;

pub use actor::run;

use serde::{Deserialize, Serialize};

use crate::reading::Reading;
use store::ExportFilter;

/// What the collector accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectorMessage {
    /// A reading from an actor (host and probe sensors).
    Reading {
        /// The reading; an empty source is replaced by the sender's address.
        reading: Reading,
        /// Stored as the reading's topic; `actor:SENDER` when absent.
        #[serde(default)]
        topic: Option<String>,
    },
    /// A broker's notice to an actor subscriber (same shape as the broker's `publish` notice).
    Publish {
        /// Topic name.
        topic: String,
        /// Payload.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        /// QoS.
        #[serde(default)]
        qos: u8,
        /// Retained.
        #[serde(default)]
        retain: bool,
        /// The id to acknowledge to the broker once the reading is committed (QoS 1/2).
        #[serde(default)]
        id: Option<u64>,
    },
    /// Answers a query (after committing what is pending).
    Query(CollectorQuery),
    /// Writes readings as CSV to a file on the collector's node; replies
    /// `{"path": …, "rows": …}`.
    Export {
        /// The file (relative to the actor's data directory); `export-<ms>.csv` when absent.
        #[serde(default)]
        path: Option<String>,
        /// Which readings: `source`, `from_ms`, `to_ms`.
        #[serde(flatten)]
        filter: ExportFilter,
    },
    /// One page of readings as CSV, for a client that writes the file itself (`colony export`);
    /// replies with an [`ExportPageReply`]. Pages are bounded by the cluster's frame size.
    ExportPage {
        /// Which readings: `source`, `from_ms`, `to_ms`.
        #[serde(flatten)]
        filter: ExportFilter,
        /// Rows after this id (0 or absent: from the start).
        #[serde(default)]
        after_id: Option<i64>,
        /// Rows up to this id (absent: up to the newest now; the reply says which id that was,
        /// to pass on with the next pages so the export ends).
        #[serde(default)]
        upto_id: Option<i64>,
        /// At most this many rows (default and limit 5,000).
        #[serde(default)]
        max_rows: Option<u32>,
    },
    /// Sends `payload` as one datagram to the UDP device `device` (its last address).
    Command {
        /// The device's source name (a MAC for gas text, or its `source` field).
        device: String,
        /// The datagram.
        payload: String,
    },
    /// Commits the pending batch now; replies with the totals.
    Flush {},
    /// Replies with the status detail.
    Status {},
}

/// The reply to [`CollectorMessage::ExportPage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPageReply {
    /// The CSV header line (without a newline).
    pub header: String,
    /// CSV lines of this page, each ending in a newline.
    pub csv: String,
    /// Rows in `csv`.
    pub rows: u64,
    /// Ask for the next page after this id.
    pub last_id: Option<i64>,
    /// The newest id this export covers.
    pub upto_id: i64,
    /// True when no row is left.
    pub done: bool,
}

/// Questions the collector answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectorQuery {
    /// The latest readings, newest first.
    Latest {
        /// Only this source.
        #[serde(default)]
        source: Option<String>,
        /// At most this many (default 10, at most 10,000).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The latest reading of every source.
    LatestPerSource {},
    /// Stored, received, gaps, duplicates per source, and totals.
    Counts {
        /// Only this source.
        #[serde(default)]
        source: Option<String>,
    },
    /// Missing sequence numbers per source.
    Gaps {
        /// Only this source.
        #[serde(default)]
        source: Option<String>,
    },
    /// The latest rejects.
    Rejects {
        /// At most this many (default 10).
        #[serde(default)]
        limit: Option<u32>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_page_request_decodes_from_json_and_through_the_cluster_encoding() {
        let json: CollectorMessage = serde_json::from_str(
            r#"{"export_page": {"source": "dev-7", "from_ms": 5, "after_id": 9}}"#,
        )
        .unwrap();
        let expected = CollectorMessage::ExportPage {
            filter: ExportFilter {
                source: Some("dev-7".into()),
                from_ms: Some(5),
                to_ms: None,
            },
            after_id: Some(9),
            upto_id: None,
            max_rows: None,
        };
        assert_eq!(json, expected);
        let body = colony_cluster::encode_body(&expected).unwrap();
        let back: CollectorMessage = colony_cluster::decode_body(&body).unwrap();
        assert_eq!(back, expected);
        // Bad input is an error, not a guess.
        let bad = serde_json::from_str::<CollectorMessage>(r#"{"export_page": {"from_ms": "x"}}"#);
        assert!(bad.is_err());
    }
}
