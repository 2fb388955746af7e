//! The collector's SQLite file: readings, rejects and per-source sequence state.
//!
//! The file is in WAL mode with `synchronous = NORMAL` by default: a committed transaction
//! survives the process dying (an OS crash or power cut may lose the last transactions, never
//! corrupt the file); with the collector's `synchronous = "full"` every commit syncs the log, so
//! what was acknowledged survives those too. Every commit writes one batch of readings, rejects and the sequence state of the
//! sources they came from together, so the data and the tracker never disagree.
//!
//! Schema (see the module doc of [`super`] for what each column means):
//!
//! ```sql
//! CREATE TABLE readings (id INTEGER PRIMARY KEY, source TEXT NOT NULL, epoch INTEGER NOT NULL,
//!     seq INTEGER, topic TEXT NOT NULL, value REAL, "values" TEXT NOT NULL, sensor_type TEXT,
//!     ip TEXT, mac TEXT, sent_ms INTEGER, received_ms INTEGER NOT NULL, flags TEXT NOT NULL);
//! CREATE TABLE rejects (id INTEGER PRIMARY KEY, received_ms INTEGER NOT NULL,
//!     origin TEXT NOT NULL, reason TEXT NOT NULL, payload BLOB NOT NULL);
//! CREATE TABLE sources (source TEXT PRIMARY KEY, epoch INTEGER NOT NULL, highest INTEGER NOT NULL,
//!     highest_ts INTEGER, missing TEXT NOT NULL, received INTEGER NOT NULL, lost INTEGER NOT NULL,
//!     duplicates INTEGER NOT NULL, reordered INTEGER NOT NULL, resets INTEGER NOT NULL,
//!     last_seen_ms INTEGER, last_addr TEXT, last_id INTEGER);
//! CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
//! ```
//!
//! `readings` has no index besides its id, so that every insert appends: an index by source
//! puts each source's rows in its own place, and a batch from thousands of sources then
//! rewrites a page of it per source (about 4 KiB written per reading, which capped ingest
//! near 130,000 readings/s; without it, several times that). A reading is stored once per
//! (source, epoch, seq) because the sequence tracker, which is exact across restarts (below),
//! drops duplicates before they reach the store. Per-source questions go to `sources`:
//! `received - duplicates` is what was stored of a source's numbered readings, and `last_id`
//! is the id of its newest reading. Someone who queries one source's history often with
//! `sqlite3` can add `CREATE INDEX readings_source ON readings (source)` to the file; the
//! collector works the same with it, only slower to write.
//!
//! The `sources` rows are a checkpoint of the sequence tracker, written with a batch (at most
//! once a second while readings flow, and on every query and shutdown) together with
//! `meta.sources_upto_id`, the newest reading id they account for. A collector that restarts
//! loads the checkpoint and replays the readings stored after it through the tracker
//! ([`Store::readings_after_checkpoint`]), which brings it to exactly where the data ends. (The
//! duplicates counted since the checkpoint are not stored, so that counter may come back a
//! little low after a crash.) Writing every source with every batch would double the rows
//! written per reading.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use colony_config::kinds::CollectorSync;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::sequence::{SeqCounters, SourceState};
use crate::reading::Reading;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    seq INTEGER,
    topic TEXT NOT NULL,
    value REAL,
    "values" TEXT NOT NULL,
    sensor_type TEXT,
    ip TEXT,
    mac TEXT,
    sent_ms INTEGER,
    received_ms INTEGER NOT NULL,
    flags TEXT NOT NULL DEFAULT ''
);
DROP INDEX IF EXISTS readings_source_seq;
CREATE TABLE IF NOT EXISTS rejects (
    id INTEGER PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    origin TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    source TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    highest INTEGER NOT NULL,
    highest_ts INTEGER,
    missing TEXT NOT NULL,
    received INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    reordered INTEGER NOT NULL,
    resets INTEGER NOT NULL,
    last_seen_ms INTEGER,
    last_addr TEXT,
    last_id INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"#;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file could not be written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Another store (a collector's earlier run still finishing a commit, or another collector
    /// given the same file) holds the file.
    #[error("{0} is in use by another collector")]
    InUse(String),
    /// An earlier commit failed, so the ids this store hands out may be wrong.
    #[error("an earlier commit failed; the database must be reopened")]
    Broken,
}

/// A reading ready to store.
#[derive(Debug, Clone)]
pub struct StoredReading {
    /// The reading (its source filled in).
    pub reading: Reading,
    /// The sequence epoch.
    pub epoch: u32,
    /// Where it came from: the MQTT topic, `udp:ADDR`, or `actor:ADDRESS`.
    pub topic: String,
    /// When the collector received it, Unix ms.
    pub received_ms: u64,
    /// Comma-separated flags: `requested`, `first`, `gap`, `late`, `reset`.
    pub flags: String,
}

/// A payload that was not a reading.
#[derive(Debug, Clone)]
pub struct Reject {
    /// When it arrived, Unix ms.
    pub received_ms: u64,
    /// Where it came from (as `topic` of a reading).
    pub origin: String,
    /// Why it was refused.
    pub reason: String,
    /// The payload as received (truncated to 4 KiB).
    pub payload: Vec<u8>,
}

/// One transaction's worth of writes.
#[derive(Debug, Default)]
pub struct Commit {
    /// Readings.
    pub readings: Vec<StoredReading>,
    /// Rejects.
    pub rejects: Vec<Reject>,
    /// Sources whose sequence state changed, when `checkpoint` is set: every source changed
    /// since the last checkpoint.
    pub sources: Vec<(String, SourceState)>,
    /// Write `sources` as the tracker's checkpoint, complete up to the newest reading.
    pub checkpoint: bool,
    /// Sources' last addresses and when they were seen.
    pub seen: Vec<(String, Option<String>, u64)>,
}

/// A source as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRow {
    /// Its name.
    pub source: String,
    /// Sequence state.
    pub state: SourceState,
    /// The last address it sent from (UDP devices).
    pub last_addr: Option<String>,
}

/// Per-source figures a query returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceCounts {
    /// The source.
    pub source: String,
    /// Readings stored.
    pub stored: u64,
    /// Readings received with a sequence number.
    pub received: u64,
    /// Gaps (missing now plus lost).
    pub gaps: u64,
    /// Duplicates received (not stored).
    pub duplicates: u64,
    /// Late readings.
    pub reordered: u64,
    /// Resets.
    pub resets: u64,
    /// Highest sequence number of the current epoch.
    pub highest: u64,
}

/// The collector's database.
pub struct Store {
    conn: Connection,
    /// Holds an exclusive lock on the file while this store is open.
    _lock: std::fs::File,
    /// The id the next reading gets.
    next_id: i64,
    /// Sources' newest reading ids not yet written to `sources` (at the next checkpoint).
    last_ids: HashMap<String, i64>,
    /// A commit failed: ids handed out may not be stored, so this store must be reopened.
    broken: bool,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens (creating if needed) the file at `path` in WAL mode with `synchronous = NORMAL`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, CollectorSync::Normal)
    }

    /// Opens (creating if needed) the file at `path` in WAL mode with `synchronous` as given.
    pub fn open_with(path: &Path, synchronous: CollectorSync) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let lock = lock_exclusive(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match synchronous {
            CollectorSync::Normal => "NORMAL",
            CollectorSync::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        // A large cache for the pages queries read, and a WAL checkpointed less often so that a
        // page written by several commits goes back to the file once. The log is truncated
        // back after each checkpoint.
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.pragma_update(None, "wal_autocheckpoint", 8_192)?;
        conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Files written before `last_id` existed get it (their latest readings are found by
        // the replay after the checkpoint, or by the next checkpoint).
        let has_last_id = conn
            .prepare("SELECT 1 FROM pragma_table_info('sources') WHERE name = 'last_id'")?
            .exists([])?;
        if !has_last_id {
            conn.execute_batch("ALTER TABLE sources ADD COLUMN last_id INTEGER")?;
        }
        let mut store = Store {
            conn,
            _lock: lock,
            next_id: 0,
            last_ids: HashMap::new(),
            broken: false,
        };
        store.next_id = store.max_id()? + 1;
        Ok(store)
    }

    /// Every stored source with its sequence state.
    pub fn load_sources(&self) -> Result<Vec<SourceRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT source, epoch, highest, highest_ts, missing, received, lost, duplicates, \
             reordered, resets, last_addr FROM sources",
        )?;
        let rows = stmt.query_map([], |r| {
            let missing: String = r.get(4)?;
            Ok(SourceRow {
                source: r.get(0)?,
                state: SourceState {
                    epoch: r.get(1)?,
                    highest: r.get::<_, i64>(2)? as u64,
                    highest_ts: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    missing: serde_json::from_str(&missing).unwrap_or_default(),
                    counters: SeqCounters {
                        received: r.get::<_, i64>(5)? as u64,
                        lost: r.get::<_, i64>(6)? as u64,
                        duplicates: r.get::<_, i64>(7)? as u64,
                        reordered: r.get::<_, i64>(8)? as u64,
                        resets: r.get::<_, i64>(9)? as u64,
                    },
                },
                last_addr: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The readings stored after the last checkpoint of the sequence tracker, oldest first:
    /// (source, sequence number, sent time). Readings without a sequence number are left out.
    /// Their ids become the sources' newest, written with the next checkpoint.
    pub fn readings_after_checkpoint(
        &mut self,
    ) -> Result<Vec<(String, u64, Option<u64>)>, StoreError> {
        let upto: i64 = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'sources_upto_id'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let mut stmt = self
            .conn
            .prepare("SELECT id, source, seq, sent_ms FROM readings WHERE id > ?1 ORDER BY id")?;
        let mut rows = stmt.query(params![upto])?;
        let mut replay = Vec::new();
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let source: String = r.get(1)?;
            let seq: Option<i64> = r.get(2)?;
            let sent: Option<i64> = r.get(3)?;
            self.last_ids.insert(source.clone(), id);
            if let Some(seq) = seq {
                replay.push((source, seq as u64, sent.map(|v| v as u64)));
            }
        }
        Ok(replay)
    }

    /// Sources whose newest reading id waits for the next checkpoint.
    pub fn pending_sources(&self) -> usize {
        self.last_ids.len()
    }

    /// Writes a batch in one transaction; returns the readings stored. Each gets the next id,
    /// so they are stored in the order given; duplicates must have been dropped before (the
    /// sequence tracker does it). After an error the store must be reopened.
    pub fn commit(&mut self, c: &Commit) -> Result<u64, StoreError> {
        if self.broken {
            return Err(StoreError::Broken);
        }
        self.broken = true;
        let first_id = self.next_id;
        for (k, r) in c.readings.iter().enumerate() {
            let id = first_id + k as i64;
            match self.last_ids.get_mut(&r.reading.source) {
                Some(last) => *last = id,
                None => {
                    self.last_ids.insert(r.reading.source.clone(), id);
                }
            }
        }
        let tx = self.conn.transaction()?;
        {
            // Many rows per statement: a statement's fixed cost is paid once per chunk.
            let mut chunks = c.readings.chunks_exact(ROWS_PER_INSERT);
            let mut id = first_id;
            if chunks.len() > 0 {
                let mut ins = tx.prepare_cached(&insert_sql(ROWS_PER_INSERT))?;
                for chunk in &mut chunks {
                    for (k, r) in chunk.iter().enumerate() {
                        bind_reading(&mut ins, k * READING_COLUMNS, id, r)?;
                        id += 1;
                    }
                    ins.raw_execute()?;
                }
            }
            let mut one = tx.prepare_cached(&insert_sql(1))?;
            for r in chunks.remainder() {
                bind_reading(&mut one, 0, id, r)?;
                id += 1;
                one.raw_execute()?;
            }
            let mut rej = tx.prepare_cached(
                "INSERT INTO rejects (received_ms, origin, reason, payload) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in &c.rejects {
                rej.execute(params![i(r.received_ms), r.origin, r.reason, r.payload])?;
            }
            if c.checkpoint {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('sources_upto_id', \
                     (SELECT coalesce(max(id), 0) FROM readings)) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [],
                )?;
            }
            let mut src = tx.prepare_cached(
                "INSERT INTO sources (source, epoch, highest, highest_ts, missing, received, lost, \
                 duplicates, reordered, resets) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (source) DO UPDATE SET epoch = ?2, highest = ?3, highest_ts = ?4, \
                 missing = ?5, received = ?6, lost = ?7, duplicates = ?8, reordered = ?9, resets = ?10",
            )?;
            for (name, s) in &c.sources {
                let missing = serde_json::to_string(&s.missing).unwrap_or_else(|_| "[]".into());
                let k = &s.counters;
                src.execute(params![
                    name,
                    s.epoch,
                    i(s.highest),
                    s.highest_ts.map(i),
                    missing,
                    i(k.received),
                    i(k.lost),
                    i(k.duplicates),
                    i(k.reordered),
                    i(k.resets),
                ])?;
            }
            let mut seen = tx.prepare_cached(
                "INSERT INTO sources (source, epoch, highest, missing, received, lost, duplicates, \
                 reordered, resets, last_seen_ms, last_addr) VALUES (?1, 0, 0, '[]', 0, 0, 0, 0, 0, ?2, ?3) \
                 ON CONFLICT (source) DO UPDATE SET last_seen_ms = ?2, last_addr = coalesce(?3, last_addr)",
            )?;
            for (name, addr, at) in &c.seen {
                seen.execute(params![name, i(*at), addr])?;
            }
            if c.checkpoint {
                let mut last = tx.prepare_cached(
                    "INSERT INTO sources (source, epoch, highest, missing, received, lost, \
                     duplicates, reordered, resets, last_id) VALUES (?1, 0, 0, '[]', 0, 0, 0, 0, 0, ?2) \
                     ON CONFLICT (source) DO UPDATE SET last_id = ?2",
                )?;
                for (name, id) in &self.last_ids {
                    last.execute(params![name, id])?;
                }
            }
        }
        tx.commit()?;
        if c.checkpoint {
            self.last_ids.clear();
        }
        self.next_id = first_id + c.readings.len() as i64;
        self.broken = false;
        Ok(c.readings.len() as u64)
    }

    /// The latest `limit` readings, of `source` or of all sources, newest first.
    pub fn latest(
        &self,
        source: Option<&str>,
        limit: u32,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT source, epoch, seq, topic, value, \"values\", sensor_type, ip, mac, sent_ms, \
             received_ms, flags FROM readings WHERE ?1 IS NULL OR source = ?1 \
             ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![source, limit], row_json)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The latest reading of every source (one per source), by source name.
    pub fn latest_per_source(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT source, epoch, seq, topic, value, \"values\", sensor_type, ip, mac, sent_ms, \
             received_ms, flags FROM readings WHERE id IN \
             (SELECT last_id FROM sources WHERE last_id IS NOT NULL) ORDER BY source",
        )?;
        let rows = stmt.query_map([], row_json)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Readings stored, rejects, and figures per source (`source` only, when given).
    pub fn counts(&self, source: Option<&str>) -> Result<Vec<SourceCounts>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT s.source, s.received - s.duplicates, \
             s.received, s.lost, s.missing, s.duplicates, s.reordered, s.resets, s.highest \
             FROM sources s WHERE ?1 IS NULL OR s.source = ?1 ORDER BY s.source",
        )?;
        let rows = stmt.query_map(params![source], |r| {
            let missing: String = r.get(4)?;
            let missing: Vec<u64> = serde_json::from_str(&missing).unwrap_or_default();
            Ok(SourceCounts {
                source: r.get(0)?,
                stored: r.get::<_, i64>(1)? as u64,
                received: r.get::<_, i64>(2)? as u64,
                gaps: r.get::<_, i64>(3)? as u64 + missing.len() as u64,
                duplicates: r.get::<_, i64>(5)? as u64,
                reordered: r.get::<_, i64>(6)? as u64,
                resets: r.get::<_, i64>(7)? as u64,
                highest: r.get::<_, i64>(8)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Total readings and rejects stored.
    pub fn totals(&self) -> Result<(u64, u64), StoreError> {
        let readings: i64 = self
            .conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
        let rejects: i64 = self
            .conn
            .query_row("SELECT count(*) FROM rejects", [], |r| r.get(0))?;
        Ok((readings as u64, rejects as u64))
    }

    /// The missing sequence numbers of `source` (or of every source with gaps).
    pub fn gaps(&self, source: Option<&str>) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT source, epoch, lost, missing FROM sources \
             WHERE (?1 IS NULL OR source = ?1) AND (lost > 0 OR missing != '[]') ORDER BY source",
        )?;
        let rows = stmt.query_map(params![source], |r| {
            let missing: String = r.get(3)?;
            let missing: Vec<u64> = serde_json::from_str(&missing).unwrap_or_default();
            Ok(serde_json::json!({
                "source": r.get::<_, String>(0)?,
                "epoch": r.get::<_, u32>(1)?,
                "lost": r.get::<_, i64>(2)?,
                "missing": missing,
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The latest `limit` rejects, newest first.
    pub fn rejects(&self, limit: u32) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT received_ms, origin, reason, payload FROM rejects ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            let payload: Vec<u8> = r.get(3)?;
            Ok(serde_json::json!({
                "received_ms": r.get::<_, i64>(0)?,
                "origin": r.get::<_, String>(1)?,
                "reason": r.get::<_, String>(2)?,
                "payload": String::from_utf8_lossy(&payload),
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last address `source` sent from, if stored.
    pub fn last_addr(&self, source: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_addr FROM sources WHERE source = ?1",
                params![source],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Writes the readings `filter` selects as CSV (with [`CSV_HEADER`]) to `path`, through a
    /// temporary file renamed at the end; returns the rows written.
    pub fn export_csv(&self, path: &Path, filter: &ExportFilter) -> Result<u64, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("csv.partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(out, "{CSV_HEADER}")?;
        let mut after = 0;
        let upto = self.max_id()?;
        let mut n = 0;
        loop {
            let page = self.export_page(filter, after, upto, 10_000, usize::MAX)?;
            out.write_all(page.csv.as_bytes())?;
            n += page.rows;
            match page.last_id {
                Some(id) if !page.done => after = id,
                _ => break,
            }
        }
        out.flush()?;
        drop(out);
        std::fs::rename(&tmp, path)?;
        Ok(n)
    }

    /// The highest reading id stored (0 when there is none).
    pub fn max_id(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT coalesce(max(id), 0) FROM readings", [], |r| {
                r.get(0)
            })?)
    }

    /// One page of the readings `filter` selects with ids in (`after_id`, `upto_id`], oldest
    /// first, as CSV lines (no header): at most `max_rows` rows, and no more lines once
    /// `max_bytes` is reached (but always at least one row, if any is left).
    pub fn export_page(
        &self,
        filter: &ExportFilter,
        after_id: i64,
        upto_id: i64,
        max_rows: u32,
        max_bytes: usize,
    ) -> Result<ExportPage, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, source, epoch, seq, topic, value, \"values\", sensor_type, ip, mac, sent_ms, \
             received_ms, flags FROM readings WHERE id > ?1 AND id <= ?2 \
             AND (?3 IS NULL OR source = ?3) AND (?4 IS NULL OR received_ms >= ?4) \
             AND (?5 IS NULL OR received_ms < ?5) ORDER BY id LIMIT ?6",
        )?;
        let mut rows = stmt.query(params![
            after_id,
            upto_id,
            filter.source,
            filter.from_ms.map(i),
            filter.to_ms.map(i),
            max_rows.max(1),
        ])?;
        let mut page = ExportPage {
            csv: String::new(),
            rows: 0,
            last_id: None,
            done: true,
        };
        let mut fields = Vec::with_capacity(12);
        while let Some(r) = rows.next()? {
            if page.rows > 0 && page.csv.len() >= max_bytes {
                page.done = false;
                return Ok(page);
            }
            page.last_id = Some(r.get(0)?);
            fields.clear();
            for c in 1..=12 {
                let v: rusqlite::types::Value = r.get(c)?;
                fields.push(csv_field(&v));
            }
            page.csv.push_str(&fields.join(","));
            page.csv.push('\n');
            page.rows += 1;
        }
        // A full page may have more behind it.
        page.done = page.rows < u64::from(max_rows.max(1));
        Ok(page)
    }
}

/// How long [`Store::open`] waits for another store of the same file to close.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens `path` (creating it empty, which SQLite takes as a new database) and takes an
/// exclusive lock on it, waiting up to [`LOCK_WAIT`]: one store per file, so that a restarted
/// collector reads the file only once the commit its previous run left going has ended.
fn lock_exclusive(path: &Path) -> Result<std::fs::File, StoreError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse(path.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
}

/// Columns of `readings` an insert binds.
const READING_COLUMNS: usize = 13;
/// Readings per multi-row INSERT (13 columns each: 832 parameters, well below SQLite's limit).
const ROWS_PER_INSERT: usize = 64;

/// `INSERT INTO readings … VALUES (…), (…)` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let one = format!("({})", ["?"; READING_COLUMNS].join(","));
    format!(
        "INSERT INTO readings (id, source, epoch, seq, topic, value, \"values\", \
         sensor_type, ip, mac, sent_ms, received_ms, flags) VALUES {}",
        vec![one; rows].join(",")
    )
}

/// Binds one reading's columns, its id first, at parameters `base + 1 ..= base + 13`.
fn bind_reading(
    stmt: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    id: i64,
    r: &StoredReading,
) -> rusqlite::Result<()> {
    stmt.raw_bind_parameter(base + 1, id)?;
    let base = base + 1;
    let rd = &r.reading;
    let value = rd
        .values
        .get("value")
        .or_else(|| rd.values.values().next())
        .copied();
    let values = values_json(&rd.values);
    stmt.raw_bind_parameter(base + 1, &rd.source)?;
    stmt.raw_bind_parameter(base + 2, r.epoch)?;
    stmt.raw_bind_parameter(base + 3, rd.seq.map(i))?;
    stmt.raw_bind_parameter(base + 4, &r.topic)?;
    stmt.raw_bind_parameter(base + 5, value)?;
    stmt.raw_bind_parameter(base + 6, values)?;
    stmt.raw_bind_parameter(base + 7, &rd.sensor_type)?;
    stmt.raw_bind_parameter(base + 8, &rd.ip)?;
    stmt.raw_bind_parameter(base + 9, &rd.mac)?;
    stmt.raw_bind_parameter(base + 10, rd.ts.map(i))?;
    stmt.raw_bind_parameter(base + 11, i(r.received_ms))?;
    stmt.raw_bind_parameter(base + 12, &r.flags)
}

/// The `values` column: a JSON object of name → number.
fn values_json(values: &std::collections::BTreeMap<String, f64>) -> String {
    serde_json::to_string(values).unwrap_or_default()
}

/// The first line of every CSV export: the columns of `readings` (without `id`).
pub const CSV_HEADER: &str =
    "source,epoch,seq,topic,value,values,sensor_type,ip,mac,sent_ms,received_ms,flags";

/// Which readings an export takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFilter {
    /// Only this source.
    #[serde(default)]
    pub source: Option<String>,
    /// Only readings received at or after this time, Unix ms.
    #[serde(default)]
    pub from_ms: Option<u64>,
    /// Only readings received before this time, Unix ms.
    #[serde(default)]
    pub to_ms: Option<u64>,
}

/// One page of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPage {
    /// CSV lines, each ending in a newline, without the header.
    pub csv: String,
    /// Rows in `csv`.
    pub rows: u64,
    /// The id of the last row, to ask for the next page after.
    pub last_id: Option<i64>,
    /// True when no row is left.
    pub done: bool,
}

fn csv_field(v: &rusqlite::types::Value) -> String {
    use rusqlite::types::Value;
    let s = match v {
        Value::Null => return String::new(),
        Value::Integer(i) => return i.to_string(),
        Value::Real(f) => return f.to_string(),
        Value::Text(t) => t.clone(),
        Value::Blob(b) => String::from_utf8_lossy(b).into_owned(),
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn row_json(r: &rusqlite::Row<'_>) -> rusqlite::Result<serde_json::Value> {
    let values: String = r.get(5)?;
    Ok(serde_json::json!({
        "source": r.get::<_, String>(0)?,
        "epoch": r.get::<_, u32>(1)?,
        "seq": r.get::<_, Option<i64>>(2)?,
        "topic": r.get::<_, String>(3)?,
        "value": r.get::<_, Option<f64>>(4)?,
        "values": serde_json::from_str::<serde_json::Value>(&values).unwrap_or_default(),
        "sensor_type": r.get::<_, Option<String>>(6)?,
        "ip": r.get::<_, Option<String>>(7)?,
        "mac": r.get::<_, Option<String>>(8)?,
        "sent_ms": r.get::<_, Option<i64>>(9)?,
        "received_ms": r.get::<_, i64>(10)?,
        "flags": r.get::<_, String>(11)?,
    }))
}

/// Now, Unix milliseconds.
pub fn unix_ms() -> u64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::sequence::{SeqEvent, SequenceTracker};

    fn stored(source: &str, seq: u64) -> StoredReading {
        StoredReading {
            reading: Reading::single(source, seq, 1000 + seq, seq as f64 / 2.0),
            epoch: 0,
            topic: format!("t/{source}"),
            received_ms: 2000 + seq,
            flags: String::new(),
        }
    }

    #[test]
    fn a_restart_replays_what_came_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let mut store = Store::open(&path).unwrap();
        let mut tracker = SequenceTracker::new();
        let mut c = Commit::default();
        // `stored` readings were sent at 1000 + seq.
        for seq in [1, 2] {
            tracker.observe("a", seq, Some(1000 + seq));
            c.readings.push(stored("a", seq));
        }
        c.sources = tracker.take_changed();
        c.checkpoint = true;
        store.commit(&c).unwrap();
        // Two more batches without a checkpoint: 4 leaves 3 missing, then "b" appears.
        for (source, seq) in [("a", 4), ("b", 1)] {
            let mut c = Commit::default();
            tracker.observe(source, seq, Some(1000 + seq));
            c.readings.push(stored(source, seq));
            store.commit(&c).unwrap();
        }
        drop(store);

        let mut store = Store::open(&path).unwrap();
        let mut restored = SequenceTracker::new();
        for row in store.load_sources().unwrap() {
            restored.restore(row.source, row.state);
        }
        assert_eq!(restored.source("a").unwrap().highest, 2);
        let replay = store.readings_after_checkpoint().unwrap();
        assert_eq!(replay.len(), 2);
        for (source, seq, ts) in replay {
            restored.observe(&source, seq, ts);
        }
        for name in ["a", "b"] {
            assert_eq!(restored.source(name), tracker.source(name), "{name}");
        }
        assert_eq!(restored.observe("a", 3, Some(1003)), SeqEvent::Late);
        assert_eq!(restored.observe("a", 4, Some(1004)), SeqEvent::Duplicate);
    }

    #[test]
    fn many_rows_per_statement_keep_their_order_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let mut store = Store::open(&path).unwrap();
        let batch = |seqs: std::ops::RangeInclusive<u64>| Commit {
            readings: seqs.map(|seq| stored("a", seq)).collect(),
            ..Commit::default()
        };
        // Two full chunks and a remainder.
        assert_eq!(store.commit(&batch(1..=150)).unwrap(), 150);
        drop(store);
        // Ids go on where the file ends.
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.commit(&batch(151..=225)).unwrap(), 75);
        assert_eq!(store.totals().unwrap(), (225, 0));
        let ordered: bool = store
            .conn
            .query_row(
                "SELECT count(*) = 225 FROM readings WHERE id = seq",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(ordered);
        let rows = store.latest(Some("a"), 1).unwrap();
        assert_eq!(rows[0]["seq"], 225);
        assert_eq!(rows[0]["values"]["value"], 112.5);
        assert_eq!(rows[0]["sent_ms"], 1225);
    }

    #[test]
    fn the_old_unique_index_is_dropped_and_last_id_added() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE sources (source TEXT PRIMARY KEY, epoch INTEGER NOT NULL, \
                 highest INTEGER NOT NULL, highest_ts INTEGER, missing TEXT NOT NULL, \
                 received INTEGER NOT NULL, lost INTEGER NOT NULL, duplicates INTEGER NOT NULL, \
                 reordered INTEGER NOT NULL, resets INTEGER NOT NULL, last_seen_ms INTEGER, \
                 last_addr TEXT);
                 CREATE TABLE readings (id INTEGER PRIMARY KEY, source TEXT NOT NULL, \
                 epoch INTEGER NOT NULL DEFAULT 0, seq INTEGER, topic TEXT NOT NULL, value REAL, \
                 \"values\" TEXT NOT NULL, sensor_type TEXT, ip TEXT, mac TEXT, sent_ms INTEGER, \
                 received_ms INTEGER NOT NULL, flags TEXT NOT NULL DEFAULT '');
                 CREATE UNIQUE INDEX readings_source_seq ON readings (source, epoch, seq);",
            )
            .unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        let mut tracker = SequenceTracker::new();
        tracker.observe("a", 1, None);
        let c = Commit {
            readings: vec![stored("a", 1)],
            sources: tracker.take_changed(),
            checkpoint: true,
            ..Commit::default()
        };
        store.commit(&c).unwrap();
        let indexes: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'readings'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        assert_eq!(store.latest_per_source().unwrap()[0]["seq"], 1);
    }

    #[test]
    fn one_store_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let first = Store::open(&path).unwrap();
        let opener = std::thread::spawn({
            let path = path.clone();
            move || Store::open(&path).map(|_| ())
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!opener.is_finished(), "the second open waits");
        drop(first);
        opener.join().unwrap().unwrap();
    }

    #[test]
    fn export_pages_filter_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.sqlite")).unwrap();
        let mut c = Commit::default();
        for seq in 1..=5 {
            c.readings.push(stored("a", seq));
            c.readings.push(stored("b", seq));
        }
        store.commit(&c).unwrap();
        let upto = store.max_id().unwrap();
        assert_eq!(upto, 10);
        let all = ExportFilter::default();
        let first = store.export_page(&all, 0, upto, 4, usize::MAX).unwrap();
        assert_eq!((first.rows, first.done, first.last_id), (4, false, Some(4)));
        let rest = store.export_page(&all, 4, upto, 100, usize::MAX).unwrap();
        assert_eq!((rest.rows, rest.done), (6, true));
        // Bounded by bytes, but never empty while rows are left.
        let tiny = store.export_page(&all, 0, upto, 100, 1).unwrap();
        assert_eq!((tiny.rows, tiny.done), (1, false));
        let only_b = ExportFilter {
            source: Some("b".into()),
            from_ms: Some(2002),
            to_ms: Some(2005),
        };
        let b = store
            .export_page(&only_b, 0, upto, 100, usize::MAX)
            .unwrap();
        let seqs: Vec<&str> = b
            .csv
            .lines()
            .map(|l| l.split(',').nth(2).unwrap())
            .collect();
        assert_eq!(seqs, ["2", "3", "4"]);
        // Rows after `upto` (stored once the export began) are not part of it.
        let later = store.export_page(&all, 0, 3, 100, usize::MAX).unwrap();
        assert_eq!((later.rows, later.done), (3, true));
    }

    #[test]
    fn commit_query_reload_and_export() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.sqlite");
        let mut store = Store::open(&path).unwrap();
        let mut tracker = SequenceTracker::new();
        let mut c = Commit::default();
        for seq in [1, 2, 4] {
            tracker.observe("a", seq, None);
            c.readings.push(stored("a", seq));
        }
        tracker.observe("b", 1, None);
        c.readings.push(stored("b", 1));
        c.rejects.push(Reject {
            received_ms: 5,
            origin: "t/x".into(),
            reason: "bad".into(),
            payload: b"junk".to_vec(),
        });
        c.sources = tracker.take_changed();
        c.checkpoint = true;
        c.seen.push(("a".into(), Some("127.0.0.1:9".into()), 7));
        assert_eq!(store.commit(&c).unwrap(), 4);
        // A checkpoint without readings or rejects.
        tracker.observe("a", 4, None);
        let again = Commit {
            sources: tracker.take_changed(),
            checkpoint: true,
            ..Commit::default()
        };
        assert_eq!(store.commit(&again).unwrap(), 0);
        assert_eq!(store.totals().unwrap(), (4, 1));

        let counts = store.counts(Some("a")).unwrap();
        assert_eq!(counts[0].stored, 3);
        assert_eq!(counts[0].gaps, 1);
        assert_eq!(
            store.gaps(None).unwrap()[0]["missing"],
            serde_json::json!([3])
        );
        assert_eq!(counts[0].duplicates, 1);
        let latest = store.latest_per_source().unwrap();
        assert_eq!(latest.len(), 2);
        assert_eq!(latest[0]["seq"], 4);
        assert_eq!(latest[1]["source"], "b");
        assert_eq!(
            store.last_addr("a").unwrap().as_deref(),
            Some("127.0.0.1:9")
        );
        assert_eq!(store.rejects(10).unwrap()[0]["reason"], "bad");

        drop(store);
        let store = Store::open(&path).unwrap();
        let rows = store.load_sources().unwrap();
        let a = rows.iter().find(|r| r.source == "a").unwrap();
        assert_eq!(a.state.highest, 4);
        assert!(a.state.missing.contains(&3));

        let csv = dir.path().join("out.csv");
        assert_eq!(store.export_csv(&csv, &ExportFilter::default()).unwrap(), 4);
        let text = std::fs::read_to_string(&csv).unwrap();
        assert!(text.starts_with("source,epoch,seq"));
        assert!(text.contains("\"{\"\"value\"\":0.5}\""), "{text}");
    }
}
