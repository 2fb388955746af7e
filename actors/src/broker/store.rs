//! The broker's on-disk state: persistent sessions, their queued and in-flight messages, retained
//! messages and actor subscriptions, in one SQLite file in the actor's data directory.
//!
//! The core emits [`StoreOp`]s; the actor applies each batch in one transaction before it sends
//! the packets that batch produced, so whatever a client has been acknowledged is on disk even if
//! the actor is killed a moment later. Clean sessions never touch the disk.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use rusqlite::{Connection, params};

use super::core::{Restored, StoreOp};
use super::session::{InFlight, Message, OutState, Session};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("broker store: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

/// A session's in-flight and queued messages as loaded.
type SessionMessages = (Vec<InFlight>, Vec<(u64, Message)>);

/// The SQLite file.
pub struct BrokerStore {
    db: Connection,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    username TEXT
);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL,
    filter TEXT NOT NULL,
    qos INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
);
CREATE TABLE IF NOT EXISTS messages (
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pid INTEGER,
    state INTEGER,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS actor_subscriptions (
    address TEXT NOT NULL,
    filter TEXT NOT NULL,
    qos INTEGER NOT NULL,
    PRIMARY KEY (address, filter)
);
";

impl BrokerStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        db.execute_batch(SCHEMA)?;
        Ok(BrokerStore { db })
    }

    /// Everything a previous run left.
    pub fn load(&self) -> Result<Restored, StoreError> {
        let mut subs: BTreeMap<String, BTreeMap<String, u8>> = BTreeMap::new();
        let mut stmt = self
            .db
            .prepare("SELECT client_id, filter, qos FROM subscriptions")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u8>(2)?,
            ))
        })? {
            let (c, f, q) = row?;
            subs.entry(c).or_default().insert(f, q.min(2));
        }
        let mut msgs: BTreeMap<String, SessionMessages> = BTreeMap::new();
        let mut next_seq = 1u64;
        let mut stmt = self.db.prepare(
            "SELECT client_id, seq, pid, state, topic, payload, qos, retain FROM messages ORDER BY client_id, seq",
        )?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<u16>>(2)?,
                r.get::<_, Option<u8>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, u8>(6)?,
                r.get::<_, bool>(7)?,
            ))
        })? {
            let (client, seq, pid, state, topic, payload, qos, retain) = row?;
            let seq = seq.max(0) as u64;
            next_seq = next_seq.max(seq + 1);
            let message = Message {
                topic,
                payload: Bytes::from(payload),
                qos: qos.clamp(1, 2),
                retain,
            };
            let entry = msgs.entry(client).or_default();
            match (pid, state.and_then(OutState::from_code)) {
                (Some(pid), Some(state)) if pid != 0 => entry.0.push(InFlight {
                    seq,
                    pid,
                    state,
                    message,
                }),
                _ => entry.1.push((seq, message)),
            }
        }
        let mut sessions = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT client_id, username FROM sessions")?;
        for row in stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })? {
            let (client, username) = row?;
            let (inflight, queue) = msgs.remove(&client).unwrap_or_default();
            let subscriptions = subs.remove(&client).unwrap_or_default();
            sessions.push((
                client,
                Session::restore(subscriptions, username, inflight, queue),
            ));
        }
        let mut retained = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT topic, payload, qos FROM retained")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, u8>(2)?,
            ))
        })? {
            let (topic, payload, qos) = row?;
            retained.push(Message {
                topic,
                payload: Bytes::from(payload),
                qos: qos.min(2),
                retain: true,
            });
        }
        let mut actor_subscriptions = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT address, filter, qos FROM actor_subscriptions")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u8>(2)?,
            ))
        })? {
            actor_subscriptions.push(row?);
        }
        Ok(Restored {
            sessions,
            retained,
            actor_subscriptions,
            next_seq,
        })
    }

    /// Applies a batch of changes in one transaction.
    pub fn apply(&mut self, ops: &[StoreOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        for op in ops {
            match op {
                StoreOp::SaveSession {
                    client_id,
                    username,
                    subscriptions,
                } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO sessions (client_id, username) VALUES (?1, ?2)",
                        params![client_id, username],
                    )?;
                    tx.execute(
                        "DELETE FROM subscriptions WHERE client_id = ?1",
                        params![client_id],
                    )?;
                    let mut ins = tx.prepare_cached(
                        "INSERT INTO subscriptions (client_id, filter, qos) VALUES (?1, ?2, ?3)",
                    )?;
                    for (f, q) in subscriptions {
                        ins.execute(params![client_id, f, q])?;
                    }
                }
                StoreOp::DeleteSession { client_id } => {
                    for table in ["sessions", "subscriptions", "messages"] {
                        tx.execute(
                            &format!("DELETE FROM {table} WHERE client_id = ?1"),
                            params![client_id],
                        )?;
                    }
                }
                StoreOp::PutMessage {
                    client_id,
                    seq,
                    inflight,
                    message,
                } => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO messages (client_id, seq, pid, state, topic, payload, qos, retain) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?
                    .execute(params![
                        client_id,
                        *seq as i64,
                        inflight.map(|(p, _)| p),
                        inflight.map(|(_, s)| s.code()),
                        message.topic,
                        &message.payload[..],
                        message.qos,
                        message.retain,
                    ])?;
                }
                StoreOp::DeleteMessage { client_id, seq } => {
                    tx.prepare_cached("DELETE FROM messages WHERE client_id = ?1 AND seq = ?2")?
                        .execute(params![client_id, *seq as i64])?;
                }
                StoreOp::PutRetained(m) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO retained (topic, payload, qos) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![m.topic, &m.payload[..], m.qos])?;
                }
                StoreOp::DeleteRetained(topic) => {
                    tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                        .execute(params![topic])?;
                }
                StoreOp::PutActorSubscription {
                    address,
                    filter,
                    qos,
                } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO actor_subscriptions (address, filter, qos) VALUES (?1, ?2, ?3)",
                        params![address, filter, qos],
                    )?;
                }
                StoreOp::DeleteActorSubscription { address, filter } => {
                    tx.execute(
                        "DELETE FROM actor_subscriptions WHERE address = ?1 AND filter = ?2",
                        params![address, filter],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"p"),
            qos: 1,
            retain: false,
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sqlite");
        let mut s = BrokerStore::open(&path).unwrap();
        s.apply(&[
            StoreOp::SaveSession {
                client_id: "c1".into(),
                username: Some("u".into()),
                subscriptions: vec![("a/#".into(), 1)],
            },
            StoreOp::PutMessage {
                client_id: "c1".into(),
                seq: 5,
                inflight: Some((3, OutState::AwaitAck)),
                message: msg("a/1"),
            },
            StoreOp::PutMessage {
                client_id: "c1".into(),
                seq: 6,
                inflight: None,
                message: msg("a/2"),
            },
            StoreOp::PutMessage {
                client_id: "c1".into(),
                seq: 7,
                inflight: None,
                message: msg("a/3"),
            },
            StoreOp::DeleteMessage {
                client_id: "c1".into(),
                seq: 7,
            },
            StoreOp::PutRetained(Message {
                retain: true,
                ..msg("r")
            }),
            StoreOp::PutActorSubscription {
                address: "n/c".into(),
                filter: "x/#".into(),
                qos: 0,
            },
        ])
        .unwrap();
        drop(s);
        let s = BrokerStore::open(&path).unwrap();
        let r = s.load().unwrap();
        assert_eq!(r.next_seq, 7);
        assert_eq!(r.sessions.len(), 1);
        let (id, session) = &r.sessions[0];
        assert_eq!(id, "c1");
        assert_eq!(session.subscriptions.get("a/#"), Some(&1));
        assert_eq!(session.inflight().count(), 1);
        assert_eq!(session.queued_len(), 1);
        assert_eq!(r.retained.len(), 1);
        assert_eq!(r.actor_subscriptions, [("n/c".into(), "x/#".into(), 0)]);
    }
}
