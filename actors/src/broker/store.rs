//! The broker's on-disk state: persistent sessions, their queued and in-flight messages, retained
//! messages and actor subscriptions, in one SQLite file in the actor's data directory.
//!
//! The core emits [`StoreOp`]s; the actor applies each batch in one transaction before it sends
//! the acknowledgements that batch produced, so whatever a client has been acknowledged is on disk
//! even if the actor is killed a moment later. Clean sessions never touch the disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{Connection, params};

use super::core::{Restored, StoreOp};
use super::packet::PublishProps;
use super::session::{InFlight, Message, OutState, Session};
use super::topic::SubOptions;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("broker store: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

/// A session's in-flight and queued messages as loaded.
type SessionMessages = (Vec<InFlight>, Vec<(u64, Message)>);

/// The SQLite file.
pub struct BrokerStore {
    db: Connection,
    /// Transactions committed since the store was opened.
    commits: u64,
    /// Checkpoints the write-ahead log from a thread of its own, so no commit waits for fsync.
    _checkpoints: crate::checkpoint::Checkpointer,
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
CREATE TABLE IF NOT EXISTS actor_messages (
    address TEXT NOT NULL,
    id INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    hops TEXT NOT NULL,
    PRIMARY KEY (address, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Columns added after the first release, added to older files on open.
const MIGRATIONS: &[(&str, &str, &str)] = &[
    (
        "actor_subscriptions",
        "no_local",
        "ALTER TABLE actor_subscriptions ADD COLUMN no_local INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "sessions",
        "expiry",
        "ALTER TABLE sessions ADD COLUMN expiry INTEGER",
    ),
    (
        "subscriptions",
        "options",
        "ALTER TABLE subscriptions ADD COLUMN options INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "subscriptions",
        "sub_id",
        "ALTER TABLE subscriptions ADD COLUMN sub_id INTEGER",
    ),
    (
        "messages",
        "extras",
        "ALTER TABLE messages ADD COLUMN extras TEXT",
    ),
    (
        "retained",
        "extras",
        "ALTER TABLE retained ADD COLUMN extras TEXT",
    ),
];

/// What MQTT 5 adds to a stored message, as JSON (`NULL` when there is nothing).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Extras {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    props: Option<PublishProps>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    sub_ids: Vec<u32>,
}

fn extras_of(m: &Message) -> Option<String> {
    if m.props.is_none() && m.expires_at.is_none() && m.sub_ids.is_empty() {
        return None;
    }
    let e = Extras {
        props: m.props.as_deref().cloned(),
        expires_at: m.expires_at,
        sub_ids: m.sub_ids.clone(),
    };
    serde_json::to_string(&e).ok()
}

fn with_extras(mut m: Message, extras: Option<String>) -> Message {
    if let Some(e) = extras.and_then(|e| serde_json::from_str::<Extras>(&e).ok()) {
        m.props = e.props.map(Arc::new);
        m.expires_at = e.expires_at;
        m.sub_ids = e.sub_ids;
    }
    m
}

/// Subscription option bits on disk: 1 no-local, 2 retain-as-published.
fn options_code(o: &SubOptions) -> u8 {
    u8::from(o.no_local) | (u8::from(o.retain_as_published) << 1)
}

impl BrokerStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        db.execute_batch(SCHEMA)?;
        for (table, column, alter) in MIGRATIONS {
            let has: bool = db.query_row(
                &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                params![column],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if !has {
                db.execute_batch(alter)?;
            }
        }
        // Actor notices are kept in their key's order, with no rowid beside it: a notice is
        // written once and deleted once, in id order, and acknowledged ranges go in one delete.
        let sql: String = db.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'actor_messages'",
            [],
            |r| r.get(0),
        )?;
        if !sql.contains("WITHOUT ROWID") {
            db.execute_batch(
                "BEGIN;
                 ALTER TABLE actor_messages RENAME TO actor_messages_rowid;
                 CREATE TABLE actor_messages (address TEXT NOT NULL, id INTEGER NOT NULL, \
                     topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, \
                     retain INTEGER NOT NULL, hops TEXT NOT NULL, PRIMARY KEY (address, id)) \
                     WITHOUT ROWID;
                 INSERT INTO actor_messages SELECT address, id, topic, payload, qos, retain, hops \
                     FROM actor_messages_rowid;
                 DROP TABLE actor_messages_rowid;
                 COMMIT;",
            )?;
        }
        let checkpoints = crate::checkpoint::Checkpointer::start(&db, path, "broker-checkpoint")?;
        Ok(BrokerStore {
            db,
            commits: 0,
            _checkpoints: checkpoints,
        })
    }

    /// Everything a previous run left.
    pub fn load(&self) -> Result<Restored, StoreError> {
        let mut subs: BTreeMap<String, BTreeMap<String, SubOptions>> = BTreeMap::new();
        let mut stmt = self
            .db
            .prepare("SELECT client_id, filter, qos, options, sub_id FROM subscriptions")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u8>(2)?,
                r.get::<_, u8>(3)?,
                r.get::<_, Option<u32>>(4)?,
            ))
        })? {
            let (c, f, q, o, id) = row?;
            let opts = SubOptions {
                qos: q.min(2),
                no_local: o & 1 != 0,
                retain_as_published: o & 2 != 0,
                id,
            };
            subs.entry(c).or_default().insert(f, opts);
        }
        let mut msgs: BTreeMap<String, SessionMessages> = BTreeMap::new();
        let mut next_seq = 1u64;
        let mut stmt = self.db.prepare(
            "SELECT client_id, seq, pid, state, topic, payload, qos, retain, extras FROM messages ORDER BY client_id, seq",
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
                r.get::<_, Option<String>>(8)?,
            ))
        })? {
            let (client, seq, pid, state, topic, payload, qos, retain, extras) = row?;
            let seq = seq.max(0) as u64;
            next_seq = next_seq.max(seq + 1);
            let message = with_extras(
                Message::new(topic, Bytes::from(payload), qos.clamp(1, 2), retain),
                extras,
            );
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
            .prepare("SELECT client_id, username, expiry FROM sessions")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
            ))
        })? {
            let (client, username, expiry) = row?;
            let expiry = expiry.map_or(u32::MAX, |e| u32::try_from(e.max(1)).unwrap_or(u32::MAX));
            let (inflight, queue) = msgs.remove(&client).unwrap_or_default();
            let subscriptions = subs.remove(&client).unwrap_or_default();
            sessions.push((
                client,
                Session::restore(subscriptions, username, expiry, inflight, queue),
            ));
        }
        let mut retained = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT topic, payload, qos, extras FROM retained")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, u8>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })? {
            let (topic, payload, qos, extras) = row?;
            retained.push(with_extras(
                Message::new(topic, Bytes::from(payload), qos.min(2), true),
                extras,
            ));
        }
        let mut actor_subscriptions = Vec::new();
        let mut stmt = self
            .db
            .prepare("SELECT address, filter, qos, no_local FROM actor_subscriptions")?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                SubOptions {
                    qos: r.get::<_, u8>(2)?.min(2),
                    no_local: r.get::<_, bool>(3)?,
                    ..SubOptions::default()
                },
            ))
        })? {
            actor_subscriptions.push(row?);
        }
        let mut actor_messages = Vec::new();
        let mut stmt = self.db.prepare(
            "SELECT address, id, topic, payload, qos, retain, hops FROM actor_messages ORDER BY address, id",
        )?;
        for row in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, u8>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, String>(6)?,
            ))
        })? {
            let (address, id, topic, payload, qos, retain, hops) = row?;
            let id = id.max(0) as u64;
            next_seq = next_seq.max(id + 1);
            let mut m = Message::new(topic, Bytes::from(payload), qos.clamp(1, 2), retain);
            m.hops = serde_json::from_str(&hops).unwrap_or_default();
            actor_messages.push((address, id, m));
        }
        let mut streams = Vec::new();
        let mut stmt = self.db.prepare("SELECT id, seq FROM streams")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (id, seq) = row?;
            streams.push((id, seq.max(0) as u64));
        }
        let saved: Option<i64> = self
            .db
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .ok();
        if let Some(saved) = saved {
            next_seq = next_seq.max(saved.max(0) as u64);
        }
        Ok(Restored {
            sessions,
            retained,
            actor_subscriptions,
            actor_messages,
            streams,
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
                    expiry,
                    subscriptions,
                } => {
                    let expiry = (*expiry != u32::MAX).then_some(*expiry);
                    tx.execute(
                        "INSERT OR REPLACE INTO sessions (client_id, username, expiry) VALUES (?1, ?2, ?3)",
                        params![client_id, username, expiry],
                    )?;
                    tx.execute(
                        "DELETE FROM subscriptions WHERE client_id = ?1",
                        params![client_id],
                    )?;
                    let mut ins = tx.prepare_cached(
                        "INSERT INTO subscriptions (client_id, filter, qos, options, sub_id) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for (f, o) in subscriptions {
                        ins.execute(params![client_id, f, o.qos, options_code(o), o.id])?;
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
                        "INSERT OR REPLACE INTO messages (client_id, seq, pid, state, topic, payload, qos, retain, extras) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
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
                        extras_of(message),
                    ])?;
                }
                StoreOp::DeleteMessage { client_id, seq } => {
                    tx.prepare_cached("DELETE FROM messages WHERE client_id = ?1 AND seq = ?2")?
                        .execute(params![client_id, *seq as i64])?;
                }
                StoreOp::PutRetained(m) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO retained (topic, payload, qos, extras) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![m.topic, &m.payload[..], m.qos, extras_of(m)])?;
                }
                StoreOp::DeleteRetained(topic) => {
                    tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                        .execute(params![topic])?;
                }
                StoreOp::PutActorSubscription {
                    address,
                    filter,
                    qos,
                    no_local,
                } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO actor_subscriptions (address, filter, qos, no_local) VALUES (?1, ?2, ?3, ?4)",
                        params![address, filter, qos, no_local],
                    )?;
                }
                StoreOp::PutActorMessage {
                    address,
                    id,
                    message,
                } => {
                    let hops = serde_json::to_string(&message.hops).unwrap_or_default();
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO actor_messages (address, id, topic, payload, qos, retain, hops) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?
                    .execute(params![
                        address,
                        *id as i64,
                        message.topic,
                        &message.payload[..],
                        message.qos,
                        message.retain,
                        hops,
                    ])?;
                }
                StoreOp::DeleteActorMessages {
                    address,
                    first,
                    last,
                } => {
                    tx.prepare_cached(
                        "DELETE FROM actor_messages WHERE address = ?1 AND id BETWEEN ?2 AND ?3",
                    )?
                    .execute(params![address, *first as i64, *last as i64])?;
                }
                StoreOp::DeleteActorQueue { address } => {
                    tx.execute(
                        "DELETE FROM actor_messages WHERE address = ?1",
                        params![address],
                    )?;
                }
                StoreOp::PutStream { id, seq } => {
                    tx.prepare_cached("INSERT OR REPLACE INTO streams (id, seq) VALUES (?1, ?2)")?
                        .execute(params![id, *seq as i64])?;
                }
                StoreOp::NextSeq(seq) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?1)",
                    )?
                    .execute(params![*seq as i64])?;
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
        self.commits += 1;
        Ok(())
    }

    /// Transactions committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Message {
        Message::new(topic, Bytes::from_static(b"p"), 1, false)
    }

    #[test]
    fn actor_notices_of_a_file_from_before_move_to_a_table_without_rowid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sqlite");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE actor_messages (address TEXT NOT NULL, id INTEGER NOT NULL, \
                 topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, \
                 retain INTEGER NOT NULL, hops TEXT NOT NULL, PRIMARY KEY (address, id));
                 INSERT INTO actor_messages VALUES ('n/c', 7, 't', x'01', 1, 0, '[]');",
            )
            .unwrap();
        }
        let s = BrokerStore::open(&path).unwrap();
        let sql: String =
            s.db.query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'actor_messages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{sql}");
        let r = s.load().unwrap();
        assert_eq!(r.actor_messages.len(), 1);
        assert_eq!(
            (r.actor_messages[0].1, &r.actor_messages[0].2.topic[..]),
            (7, "t")
        );
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
                expiry: u32::MAX,
                subscriptions: vec![("a/#".into(), SubOptions::from(1))],
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
                qos: 1,
                no_local: true,
            },
            StoreOp::PutActorMessage {
                address: "n/c".into(),
                id: 3,
                message: Message {
                    hops: vec!["n/bridge".into()],
                    ..msg("x/1")
                },
            },
            StoreOp::PutActorMessage {
                address: "n/c".into(),
                id: 4,
                message: msg("x/2"),
            },
            StoreOp::PutActorMessage {
                address: "n/c".into(),
                id: 5,
                message: msg("x/3"),
            },
            StoreOp::DeleteActorMessages {
                address: "n/c".into(),
                first: 4,
                last: 5,
            },
            StoreOp::PutStream {
                id: "s".into(),
                seq: 41,
            },
            StoreOp::NextSeq(90),
        ])
        .unwrap();
        drop(s);
        let s = BrokerStore::open(&path).unwrap();
        let r = s.load().unwrap();
        assert_eq!(r.next_seq, 90);
        assert_eq!(r.sessions.len(), 1);
        let (id, session) = &r.sessions[0];
        assert_eq!(id, "c1");
        assert_eq!(session.subscriptions.get("a/#"), Some(&SubOptions::from(1)));
        assert_eq!(session.inflight().count(), 1);
        assert_eq!(session.queued_len(), 1);
        assert_eq!(r.retained.len(), 1);
        let opts = SubOptions {
            qos: 1,
            no_local: true,
            ..SubOptions::default()
        };
        assert_eq!(r.actor_subscriptions, [("n/c".into(), "x/#".into(), opts)]);
        assert_eq!(r.actor_messages.len(), 1);
        assert_eq!(r.actor_messages[0].1, 3);
        assert_eq!(r.actor_messages[0].2.hops, ["n/bridge"]);
        assert_eq!(r.streams, [("s".into(), 41)]);
    }
}
