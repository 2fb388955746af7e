//! The store-and-forward spool: QoS 1/2 messages waiting for the far side, in SQLite in the
//! bridge's data directory (`spool.sqlite`), one queue per direction.
//!
//! A message is appended (and the notice it came in marked as seen, in the same transaction)
//! before its source is acknowledged, and removed once the far side acknowledges it, so neither
//! a bridge restart nor a node restart loses it. Redelivered notices that are already spooled
//! are recognised by their source and id and not spooled twice.
//!
//! Bounds, per direction: `max_messages`, `max_bytes` (payload and topic bytes) and `max_age`.
//! The policy when one is hit: the OLDEST waiting messages are dropped to make room (the newest
//! readings are the ones worth having), and each drop is counted (`dropped_full`,
//! `dropped_expired`), persistently.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

/// Which way a queued message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Local broker to the remote.
    Out,
    /// Remote to the local broker.
    In,
}

impl Dir {
    /// `out` or `in`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Out => "out",
            Dir::In => "in",
        }
    }

    fn index(self) -> usize {
        match self {
            Dir::Out => 0,
            Dir::In => 1,
        }
    }
}

/// A message to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spooled {
    /// Its place in its queue (increasing, never reused).
    pub seq: u64,
    /// Topic on the far side.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS on the far side.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Brokers it has been in.
    pub hops: Vec<String>,
    /// When it was spooled (Unix ms).
    pub at_ms: u64,
}

/// A message to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The notice it came in as (`source`, `id`), to recognise a redelivery.
    pub notice: Option<(String, u64)>,
    /// Topic on the far side.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS on the far side.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Brokers it has been in.
    pub hops: Vec<String>,
}

/// What one [`Spool::append`] did.
#[derive(Debug)]
pub struct Appended {
    /// The messages appended, oldest first.
    pub rows: Vec<Spooled>,
    /// How many of the oldest messages were dropped to stay within the bounds (some of these
    /// rows among them, when the bounds are that small).
    pub dropped: u64,
}

/// Spool bounds per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Messages.
    pub max_messages: u64,
    /// Bytes (topic and payload).
    pub max_bytes: u64,
    /// Age in milliseconds.
    pub max_age_ms: u64,
}

/// Depth and drop counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Messages waiting.
    pub messages: u64,
    /// Bytes waiting.
    pub bytes: u64,
    /// Dropped because a size bound was hit.
    pub dropped_full: u64,
    /// Dropped because they waited longer than the age bound.
    pub dropped_expired: u64,
}

/// A spool failure (the file).
#[derive(Debug, thiserror::Error)]
#[error("spool: {0}")]
pub struct SpoolError(#[from] rusqlite::Error);

/// The spool file.
pub struct Spool {
    conn: Connection,
    bounds: Bounds,
    dirs: [DirCounters; 2],
    /// Acknowledgement marks not yet written: (source, id, when). They only shorten how long a
    /// notice is remembered, so they ride along with the next commit instead of one of their own.
    acks: Vec<(String, u64, u64)>,
    /// The highest seq appended per direction (0 when none ever was).
    last: [u64; 2],
    /// Seqs the far side has, per direction, not yet removed (see [`Spool::delivered`]).
    done: [Vec<u64>; 2],
    /// A transaction is open with staged appends ([`Spool::stage`]).
    open: bool,
    /// Names this spool file's numbering (see [`Spool::numbering`]).
    numbering: String,
    _checkpoints: crate::checkpoint::Checkpointer,
}

macro_rules! next_max {
    () => {
        256
    };
}
/// Messages one [`Spool::next`] reads, at most. It is a literal in the statement: SQLite
/// prepares a statement again each time a bound `LIMIT` changes.
pub const NEXT_MAX: usize = next_max!();

/// Acknowledgement marks held before they are written in a transaction of their own.
const ACKS_HELD: usize = 4096;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dir TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    hops TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS spool_dir ON spool (dir, seq);
CREATE TABLE IF NOT EXISTS seen (
    source TEXT NOT NULL,
    id INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    acked_ms INTEGER,
    PRIMARY KEY (source, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    dir TEXT PRIMARY KEY,
    dropped_full INTEGER NOT NULL,
    dropped_expired INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// How long a notice is remembered after its acknowledgement reached the broker.
const SEEN_AFTER_ACK_MS: u64 = 60_000;

/// The file's numbering name (see [`Spool::numbering`]), made and saved on first use: random for
/// a new file, empty for one that numbered messages before it had a name.
fn numbering(conn: &Connection) -> Result<String, rusqlite::Error> {
    let saved: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'numbering'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(name) = saved {
        return Ok(name);
    }
    let numbered_before: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'spool')",
        [],
        |r| r.get(0),
    )?;
    let name = if numbered_before {
        String::new()
    } else {
        format!("{:016x}", rand::random::<u64>())
    };
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('numbering', ?1)",
        [&name],
    )?;
    Ok(name)
}

fn size(topic: &str, payload: &[u8]) -> u64 {
    (topic.len() + payload.len()) as u64
}

impl Spool {
    /// Opens (or creates) the spool at `path`.
    pub fn open(path: &Path, bounds: Bounds) -> Result<Spool, SpoolError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        let checkpoints =
            crate::checkpoint::Checkpointer::start(&conn, path, "bridge-spool-checkpoint")?;
        let mut s = Spool {
            conn,
            bounds,
            dirs: [DirCounters::default(); 2],
            acks: Vec::new(),
            last: [0; 2],
            done: [Vec::new(), Vec::new()],
            open: false,
            numbering: String::new(),
            _checkpoints: checkpoints,
        };
        s.numbering = numbering(&s.conn)?;
        for dir in [Dir::Out, Dir::In] {
            let (messages, bytes): (u64, u64) = s.conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool WHERE dir = ?1",
                [dir.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let dropped: Option<(u64, u64)> = s
                .conn
                .query_row(
                    "SELECT dropped_full, dropped_expired FROM counters WHERE dir = ?1",
                    [dir.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (dropped_full, dropped_expired) = dropped.unwrap_or_default();
            s.last[dir.index()] = s.conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM spool WHERE dir = ?1",
                [dir.as_str()],
                |r| r.get::<_, i64>(0),
            )? as u64;
            s.dirs[dir.index()] = DirCounters {
                messages,
                bytes,
                dropped_full,
                dropped_expired,
            };
        }
        Ok(s)
    }

    /// A name for this file's numbering of messages, chosen when the file was created: a far
    /// broker keeps the highest seq it accepted per stream, so a spool made afresh (its file
    /// lost, or its data directory cleared), which numbers from 1 again, must not go on under
    /// the same stream name, or every message up to the old mark would be taken for a repeat
    /// and dropped. Empty for a file made before spools named their numbering (it goes on
    /// under the name it had).
    pub fn numbering(&self) -> &str {
        &self.numbering
    }

    /// New bounds (applied at the next append or expiry).
    pub fn set_bounds(&mut self, bounds: Bounds) {
        self.bounds = bounds;
    }

    /// Depth and counters of `dir`.
    pub fn counters(&self, dir: Dir) -> DirCounters {
        self.dirs[dir.index()]
    }

    /// Appends `entries` to `dir` in one transaction; an entry whose notice was seen before is
    /// skipped. Then drops the oldest messages past the size bounds. Returns what was appended,
    /// as [`Spool::next`] would read it back.
    pub fn append(
        &mut self,
        dir: Dir,
        entries: &[Entry],
        now_ms: u64,
    ) -> Result<Appended, SpoolError> {
        let appended = self.stage(dir, entries, now_ms)?;
        self.commit()?;
        Ok(appended)
    }

    /// [`Spool::append`] without the commit: the rows are written in the transaction the spool
    /// has open (opening one, which removes the delivered messages first), and are on disk
    /// only after [`Spool::commit`]. Until then a crash loses them, and the spool's counters
    /// already count them. Several stages go in one commit. After an error the spool's memory
    /// no longer matches its file: drop it and open the file again (the bridge fails and its
    /// restart does that).
    pub fn stage(
        &mut self,
        dir: Dir,
        entries: &[Entry],
        now_ms: u64,
    ) -> Result<Appended, SpoolError> {
        if !self.open {
            self.conn.execute_batch("BEGIN")?;
            self.open = true;
            let removed = remove_done(&self.conn, &self.done)?;
            subtract(&mut self.dirs, removed);
            self.done.iter_mut().for_each(Vec::clear);
        }
        let db = &self.conn;
        let mut dirs = self.dirs;
        let mut rows = Vec::new();
        let mut bytes = 0;
        let mut last = self.last[dir.index()];
        {
            let mut seen = db.prepare_cached(
                "INSERT OR IGNORE INTO seen (source, id, at_ms) VALUES (?1, ?2, ?3)",
            )?;
            let mut insert = db.prepare_cached(
                "INSERT INTO spool (dir, topic, payload, qos, retain, hops, at_ms, size)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for e in entries {
                if let Some((source, id)) = &e.notice
                    && seen.execute(params![source, *id as i64, now_ms as i64])? == 0
                {
                    continue;
                }
                let n = size(&e.topic, &e.payload);
                let hops = serde_json::to_string(&e.hops).unwrap_or_else(|_| "[]".into());
                insert.execute(params![
                    dir.as_str(),
                    e.topic,
                    e.payload,
                    e.qos,
                    e.retain,
                    hops,
                    now_ms as i64,
                    n as i64
                ])?;
                last = db.last_insert_rowid() as u64;
                rows.push(Spooled {
                    seq: last,
                    topic: e.topic.clone(),
                    payload: e.payload.clone(),
                    qos: e.qos,
                    retain: e.retain,
                    hops: e.hops.clone(),
                    at_ms: now_ms,
                });
                bytes += n;
            }
        }
        let c = &mut dirs[dir.index()];
        c.messages += rows.len() as u64;
        c.bytes += bytes;
        let dropped = trim(db, dir, c, self.bounds)?;
        if dropped > 0 {
            c.dropped_full += dropped;
            save_counters(db, dir, c)?;
        }
        self.dirs = dirs;
        self.last[dir.index()] = last;
        Ok(Appended { rows, dropped })
    }

    /// Commits what was staged ([`Spool::stage`]); nothing when no transaction is open.
    pub fn commit(&mut self) -> Result<(), SpoolError> {
        if self.open {
            self.conn.execute_batch("COMMIT")?;
            self.open = false;
        }
        Ok(())
    }

    /// The highest seq ever appended to `dir`: nothing comes after it.
    pub fn last(&self, dir: Dir) -> u64 {
        self.last[dir.index()]
    }

    /// Up to `limit` (at most [`NEXT_MAX`]) messages of `dir` after `after`, oldest first.
    /// Messages already delivered are not among them.
    pub fn next(&mut self, dir: Dir, after: u64, limit: usize) -> Result<Vec<Spooled>, SpoolError> {
        if after >= self.last(dir) {
            return Ok(Vec::new());
        }
        if self.done[dir.index()].iter().any(|&s| s > after) {
            self.flush()?;
        }
        let mut q = self.conn.prepare_cached(concat!(
            "SELECT seq, topic, payload, qos, retain, hops, at_ms FROM spool
             WHERE dir = ?1 AND seq > ?2 ORDER BY seq LIMIT ",
            next_max!()
        ))?;
        let rows = q.query_map(params![dir.as_str(), after as i64], |r| {
            let hops: String = r.get(5)?;
            Ok(Spooled {
                seq: r.get::<_, i64>(0)? as u64,
                topic: r.get(1)?,
                payload: r.get(2)?,
                qos: r.get(3)?,
                retain: r.get(4)?,
                hops: serde_json::from_str(&hops).unwrap_or_default(),
                at_ms: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.take(limit).collect::<Result<_, _>>()?)
    }

    /// Notes that the far side has the messages `seqs` of `dir`. They are removed in the next
    /// transaction the spool makes anyway (an append, an expiry) or at a [`Spool::flush`], so a
    /// steady stream costs one commit per batch, not two. Until then a crash sends them again,
    /// which the far side's stream or QoS 1 allows.
    pub fn delivered(&mut self, dir: Dir, seqs: Vec<u64>) {
        let done = &mut self.done[dir.index()];
        if done.is_empty() {
            *done = seqs;
        } else {
            done.extend(seqs);
        }
    }

    /// True when delivered messages wait to be removed (at the next append or [`Spool::flush`]).
    pub fn pending(&self) -> bool {
        self.done.iter().any(|d| !d.is_empty())
    }

    /// Commits what was staged, and removes delivered messages now (with the acknowledgement
    /// marks held).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        self.commit()?;
        if !self.pending() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        let removed = remove_done(&tx, &self.done)?;
        write_acks(&tx, &self.acks)?;
        tx.commit()?;
        subtract(&mut self.dirs, removed);
        self.done.iter_mut().for_each(Vec::clear);
        self.acks.clear();
        Ok(())
    }

    /// Drops messages older than the age bound, and forgets seen notices as old. Returns how
    /// many messages were dropped.
    pub fn expire(&mut self, now_ms: u64) -> Result<u64, SpoolError> {
        self.flush()?;
        let cutoff = now_ms.saturating_sub(self.bounds.max_age_ms) as i64;
        let tx = self.conn.transaction()?;
        write_acks(&tx, &self.acks)?;
        let mut total = 0;
        for dir in [Dir::Out, Dir::In] {
            let (n, bytes): (u64, u64) = tx.query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM spool WHERE dir = ?1 AND at_ms < ?2",
                params![dir.as_str(), cutoff],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if n == 0 {
                continue;
            }
            tx.execute(
                "DELETE FROM spool WHERE dir = ?1 AND at_ms < ?2",
                params![dir.as_str(), cutoff],
            )?;
            let c = &mut self.dirs[dir.index()];
            c.messages = c.messages.saturating_sub(n);
            c.bytes = c.bytes.saturating_sub(bytes);
            c.dropped_expired += n;
            save_counters(&tx, dir, c)?;
            total += n;
        }
        // A notice is remembered until a minute after its acknowledgement reached the broker
        // (a redelivery already on its way then still comes in), or until the age bound.
        tx.execute(
            "DELETE FROM seen WHERE at_ms < ?1 OR acked_ms < ?2",
            params![cutoff, now_ms.saturating_sub(SEEN_AFTER_ACK_MS) as i64],
        )?;
        tx.commit()?;
        self.acks.clear();
        Ok(total)
    }

    /// Notes that the broker `source` has the acknowledgement of `ids`: they are forgotten a
    /// minute later (at an [`Spool::expire`]). The marks are written with the next removal or
    /// expiry (or on their own once `ACKS_HELD` wait): a mark lost in a crash only means the
    /// notice is remembered until the age bound instead.
    pub fn acked(&mut self, source: &str, ids: &[u64], now_ms: u64) -> Result<(), SpoolError> {
        self.acks
            .extend(ids.iter().map(|id| (source.to_owned(), *id, now_ms)));
        if self.acks.len() >= ACKS_HELD {
            self.commit()?;
            let tx = self.conn.transaction()?;
            write_acks(&tx, &self.acks)?;
            tx.commit()?;
            self.acks.clear();
        }
        Ok(())
    }
}

/// Deletes the delivered seqs `done` (per direction); returns how many messages and bytes
/// each direction lost.
fn remove_done(tx: &Connection, done: &[Vec<u64>; 2]) -> Result<[(u64, u64); 2], rusqlite::Error> {
    let mut removed = [(0, 0); 2];
    for (dir, seqs) in [Dir::Out, Dir::In].into_iter().zip(done) {
        if seqs.is_empty() {
            continue;
        }
        let mut del = tx.prepare_cached(
            "DELETE FROM spool WHERE seq BETWEEN ?1 AND ?2 AND dir = ?3 RETURNING size",
        )?;
        let (n, bytes) = &mut removed[dir.index()];
        let mut seqs = seqs.clone();
        seqs.sort_unstable();
        for (first, last) in runs(&seqs) {
            let mut rows = del.query(params![first as i64, last as i64, dir.as_str()])?;
            while let Some(row) = rows.next()? {
                *n += 1;
                *bytes += row.get::<_, i64>(0)? as u64;
            }
        }
    }
    Ok(removed)
}

/// Runs of consecutive numbers in `sorted` (duplicates allowed), as (first, last).
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &x in sorted {
        match out.last_mut() {
            Some((_, last)) if x <= *last + 1 => *last = (*last).max(x),
            _ => out.push((x, x)),
        }
    }
    out
}

/// Counts out what [`remove_done`] removed.
fn subtract(dirs: &mut [DirCounters; 2], removed: [(u64, u64); 2]) {
    for (c, (n, bytes)) in dirs.iter_mut().zip(removed) {
        c.messages = c.messages.saturating_sub(n);
        c.bytes = c.bytes.saturating_sub(bytes);
    }
}

fn write_acks(tx: &Connection, acks: &[(String, u64, u64)]) -> Result<(), rusqlite::Error> {
    if acks.is_empty() {
        return Ok(());
    }
    let mut up = tx.prepare_cached(
        "UPDATE seen SET acked_ms = ?4 WHERE source = ?1 AND id BETWEEN ?2 AND ?3",
    )?;
    // The marks come per acknowledgement, each a run of ids from one source at one time.
    let mut i = 0;
    while i < acks.len() {
        let (source, _, at) = &acks[i];
        let j = i + acks[i..]
            .iter()
            .take_while(|(s, _, t)| s == source && t == at)
            .count();
        let mut ids: Vec<u64> = acks[i..j].iter().map(|(_, id, _)| *id).collect();
        ids.sort_unstable();
        for (first, last) in runs(&ids) {
            up.execute(params![source, first as i64, last as i64, *at as i64])?;
        }
        i = j;
    }
    Ok(())
}

fn save_counters(tx: &Connection, dir: Dir, c: &DirCounters) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT INTO counters (dir, dropped_full, dropped_expired) VALUES (?1, ?2, ?3)
         ON CONFLICT (dir) DO UPDATE SET dropped_full = ?2, dropped_expired = ?3",
        params![
            dir.as_str(),
            c.dropped_full as i64,
            c.dropped_expired as i64
        ],
    )?;
    Ok(())
}

/// Drops the oldest messages of `dir` until it is within the size bounds; returns how many.
fn trim(tx: &Connection, dir: Dir, c: &mut DirCounters, b: Bounds) -> Result<u64, rusqlite::Error> {
    let mut dropped = 0;
    while c.messages > b.max_messages || c.bytes > b.max_bytes {
        let over = c.messages.saturating_sub(b.max_messages).max(1);
        let mut q = tx.prepare_cached(
            "DELETE FROM spool WHERE seq IN
               (SELECT seq FROM spool WHERE dir = ?1 ORDER BY seq LIMIT ?2)
             RETURNING size",
        )?;
        let sizes: Vec<i64> = q
            .query_map(params![dir.as_str(), over as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if sizes.is_empty() {
            c.messages = 0;
            c.bytes = 0;
            break;
        }
        dropped += sizes.len() as u64;
        c.messages = c.messages.saturating_sub(sizes.len() as u64);
        c.bytes = c
            .bytes
            .saturating_sub(sizes.iter().map(|s| *s as u64).sum::<u64>());
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, notice: Option<u64>) -> Entry {
        Entry {
            notice: notice.map(|id| ("n1/broker".to_owned(), id)),
            topic: topic.into(),
            payload: vec![b'x'; 10],
            qos: 1,
            retain: false,
            hops: vec!["n1/broker".into()],
        }
    }

    /// Appends one message with notice `id` going out; how many were appended.
    fn appended(s: &mut Spool, topic: &str, id: u64, now_ms: u64) -> usize {
        s.append(Dir::Out, &[entry(topic, Some(id))], now_ms)
            .unwrap()
            .rows
            .len()
    }

    fn bounds() -> Bounds {
        Bounds {
            max_messages: 1000,
            max_bytes: 1 << 20,
            max_age_ms: 60_000,
        }
    }

    #[test]
    fn a_spool_made_afresh_numbers_under_a_name_of_its_own_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.sqlite");
        let first = Spool::open(&path, bounds()).unwrap().numbering().to_owned();
        assert_eq!(first.len(), 16, "{first:?}");
        assert_eq!(Spool::open(&path, bounds()).unwrap().numbering(), first);
        // The file lost: the new one numbers from 1 again, under another name.
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let mut s = Spool::open(&path, bounds()).unwrap();
        assert_ne!(s.numbering(), first);
        let appended = s.append(Dir::Out, &[entry("t/0", None)], 1000).unwrap();
        assert_eq!(appended.rows[0].seq, 1);
    }

    #[test]
    fn a_spool_that_numbered_before_it_had_a_name_goes_on_under_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.sqlite");
        let mut s = Spool::open(&path, bounds()).unwrap();
        s.append(Dir::Out, &[entry("t/0", None)], 1000).unwrap();
        drop(s);
        // As a file from before: numbered, with no name saved.
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM meta", []).unwrap();
        drop(conn);
        assert_eq!(Spool::open(&path, bounds()).unwrap().numbering(), "");
        assert_eq!(Spool::open(&path, bounds()).unwrap().numbering(), "");
    }

    #[test]
    fn messages_come_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.sqlite");
        let mut s = Spool::open(&path, bounds()).unwrap();
        let entries: Vec<_> = (0..5).map(|i| entry(&format!("t/{i}"), Some(i))).collect();
        let appended = s.append(Dir::Out, &entries, 1000).unwrap();
        assert_eq!((appended.rows.len(), appended.dropped), (5, 0));
        s.append(Dir::In, &[entry("in/0", None)], 1000).unwrap();
        let got = s.next(Dir::Out, 0, 3).unwrap();
        assert_eq!(got[..], appended.rows[..3], "as read back");
        assert_eq!(
            got.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["t/0", "t/1", "t/2"]
        );
        assert_eq!(got[0].hops, ["n1/broker"]);
        s.delivered(Dir::Out, vec![got[0].seq, got[1].seq]);
        s.flush().unwrap();
        drop(s);
        let mut s = Spool::open(&path, bounds()).unwrap();
        assert_eq!(s.counters(Dir::Out).messages, 3);
        assert_eq!(s.counters(Dir::In).messages, 1);
        let rest = s.next(Dir::Out, 0, 100).unwrap();
        assert_eq!(
            rest.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["t/2", "t/3", "t/4"]
        );
        let after = s.next(Dir::Out, rest[0].seq, 100).unwrap();
        assert_eq!(after.len(), 2);
    }

    #[test]
    fn staged_messages_are_on_disk_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.sqlite");
        let mut s = Spool::open(&path, bounds()).unwrap();
        s.stage(Dir::Out, &[entry("t/0", Some(0))], 1).unwrap();
        s.stage(Dir::In, &[entry("in/0", None)], 1).unwrap();
        assert_eq!(
            s.next(Dir::Out, 0, 10).unwrap().len(),
            1,
            "read back before the commit"
        );
        // A crash before the commit: neither is kept, and the notice is not remembered.
        drop(s);
        let mut s = Spool::open(&path, bounds()).unwrap();
        assert_eq!(
            s.counters(Dir::Out).messages + s.counters(Dir::In).messages,
            0
        );
        assert!(s.next(Dir::Out, 0, 10).unwrap().is_empty());
        // Both stages go in one commit; a flush commits what is staged first.
        s.stage(Dir::Out, &[entry("t/0", Some(0))], 1).unwrap();
        s.stage(Dir::In, &[entry("in/0", None)], 1).unwrap();
        s.commit().unwrap();
        s.stage(Dir::Out, &[entry("t/1", Some(1))], 1).unwrap();
        s.flush().unwrap();
        drop(s);
        let mut s = Spool::open(&path, bounds()).unwrap();
        let out = s.next(Dir::Out, 0, 10).unwrap();
        assert_eq!(
            out.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["t/0", "t/1"]
        );
        assert_eq!(s.counters(Dir::In).messages, 1);
    }

    #[test]
    fn delivered_messages_leave_with_the_next_commit_and_are_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.sqlite");
        let mut s = Spool::open(&path, bounds()).unwrap();
        let entries: Vec<_> = (0..4).map(|i| entry(&format!("t/{i}"), Some(i))).collect();
        s.append(Dir::Out, &entries, 1).unwrap();
        let got = s.next(Dir::Out, 0, 10).unwrap();
        s.delivered(Dir::Out, vec![got[0].seq, got[1].seq]);
        assert!(s.pending());
        assert_eq!(s.counters(Dir::Out).messages, 4, "not removed yet");
        // Read again from the start (a lane that came back): the delivered ones are not there.
        let again = s.next(Dir::Out, 0, 10).unwrap();
        assert_eq!(again[0].topic, "t/2");
        assert!(!s.pending());
        assert_eq!(s.counters(Dir::Out).messages, 2);
        // Removed in the transaction of the next append.
        s.delivered(Dir::Out, vec![again[0].seq]);
        s.append(Dir::Out, &[entry("t/4", Some(4))], 2).unwrap();
        assert!(!s.pending());
        assert_eq!(s.counters(Dir::Out).messages, 2);
        // Not yet removed when the spool goes away: still there, to be sent again.
        s.delivered(Dir::Out, vec![again[1].seq]);
        let last = s.last(Dir::Out);
        drop(s);
        let mut s = Spool::open(&path, bounds()).unwrap();
        assert_eq!(s.last(Dir::Out), last);
        let left = s.next(Dir::Out, 0, 10).unwrap();
        assert_eq!(
            left.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
            ["t/3", "t/4"]
        );
        assert!(s.next(Dir::Out, last, 10).unwrap().is_empty());
    }

    #[test]
    fn runs_of_consecutive_numbers() {
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[3, 4, 4, 5, 7, 9, 10]), [(3, 5), (7, 7), (9, 10)]);
    }

    #[test]
    fn a_redelivered_notice_is_spooled_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(&dir.path().join("s"), bounds()).unwrap();
        assert_eq!(appended(&mut s, "a", 7, 1), 1);
        assert_eq!(appended(&mut s, "a", 7, 2), 0);
        // Acknowledged: a redelivery already on its way is still recognised for a minute.
        s.acked("n1/broker", &[7], 3).unwrap();
        s.expire(30_000).unwrap();
        assert_eq!(appended(&mut s, "a", 7, 30_000), 0);
        s.expire(70_000).unwrap();
        assert_eq!(appended(&mut s, "a", 7, 70_000), 1);
    }

    #[test]
    fn the_oldest_are_dropped_past_the_bounds_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let b = Bounds {
            max_messages: 3,
            ..bounds()
        };
        let mut s = Spool::open(&path, b).unwrap();
        let entries: Vec<_> = (0..5).map(|i| entry(&format!("t/{i}"), None)).collect();
        assert_eq!(s.append(Dir::Out, &entries, 1).unwrap().dropped, 2);
        let c = s.counters(Dir::Out);
        assert_eq!((c.messages, c.dropped_full), (3, 2));
        let left = s.next(Dir::Out, 0, 10).unwrap();
        assert_eq!(left[0].topic, "t/2");
        // By bytes: each entry is 13 bytes.
        s.set_bounds(Bounds {
            max_messages: 100,
            max_bytes: 30,
            ..bounds()
        });
        s.append(Dir::Out, &[entry("t/5", None)], 1).unwrap();
        let c = s.counters(Dir::Out);
        assert_eq!((c.messages, c.bytes, c.dropped_full), (2, 26, 4));
        drop(s);
        let s = Spool::open(&path, b).unwrap();
        assert_eq!(s.counters(Dir::Out).dropped_full, 4, "counters persist");
    }

    #[test]
    fn old_messages_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(&dir.path().join("s"), bounds()).unwrap();
        s.append(Dir::In, &[entry("old", Some(1))], 1_000).unwrap();
        s.append(Dir::In, &[entry("new", Some(2))], 50_000).unwrap();
        assert_eq!(s.expire(70_000).unwrap(), 1);
        let c = s.counters(Dir::In);
        assert_eq!((c.messages, c.dropped_expired), (1, 1));
        assert_eq!(s.next(Dir::In, 0, 10).unwrap()[0].topic, "new");
        // The expired notice is forgotten too: a redelivery would be spooled again.
        assert_eq!(
            s.append(Dir::In, &[entry("old", Some(1))], 70_000)
                .unwrap()
                .rows
                .len(),
            1
        );
    }
}
