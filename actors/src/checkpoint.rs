//! Write-ahead-log checkpoints off the hot path, for the SQLite files of brokers and bridges.
//!
//! With `journal_mode = WAL` and `synchronous = NORMAL` a commit only appends to the log; the
//! fsyncs happen when the log is copied into the database (a checkpoint). SQLite's automatic
//! checkpoint runs inside whichever commit crosses its threshold, so that commit — and every
//! message behind it — waits for two fsyncs (tens of milliseconds on a busy disk). Here the
//! automatic checkpoint is turned off and a thread of its own checkpoints instead, passively
//! (never blocking a writer), every quarter of a second.
//!
//! A passive checkpoint never lets the log start over while commits keep coming (a writer
//! rewinds the log only when the last checkpoint copied all of it), so under a steady stream
//! the log would grow by every commit, without end (about 8 KB per message at 1,000 messages a
//! second). Once it holds more than [`LOG_MAX`] bytes, the thread checkpoints in RESTART mode
//! instead: the writer waits for that one checkpoint (it copies only what came since the
//! passive one just before, and syncs: well under a millisecond on a disk whose sync is fast),
//! and its next commit writes the log from the start again. The file keeps its size
//! (truncating it would cost the writer far longer).
//!
//! The writer waits for that checkpoint in SQLite's busy handler, whose default sleeps a whole
//! millisecond before it looks again (then 2, 5, 10 ms ...): several times longer than the
//! checkpoint itself, and every message behind the commit waits with it. The writer's handler
//! here looks again every [`WRITER_RETRY`] for the first couple of milliseconds instead.
//!
//! The bound is small on purpose. A log that starts over early is written into pages the
//! kernel already caches; one that grows has every commit extend the file, which costs the
//! writer a page allocation per frame and leaves a file of [`LOG_MAX`] beside each store.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::Connection;

/// How often the log is copied into the database.
const EVERY: Duration = Duration::from_millis(250);
/// The log size past which it is checkpointed in RESTART mode (the writer waits for that one):
/// about half a second of commits at 1,000 messages a second.
const LOG_MAX: u64 = 4 << 20;
/// How long a RESTART checkpoint waits for the writer's transaction, or for a reader, before it
/// gives up until the next round (it holds the writer off meanwhile).
const RESTART_WAIT: Duration = Duration::from_secs(1);
/// How long the writer sleeps between its first [`WRITER_FINE_RETRIES`] looks at a database
/// held by a checkpoint; after those, it looks every millisecond.
const WRITER_RETRY: Duration = Duration::from_micros(50);
const WRITER_FINE_RETRIES: i32 = 40;
/// How long the writer waits for a checkpoint in all before its statement fails as busy (the
/// default of a connection: 5 s).
const WRITER_WAIT: Duration = Duration::from_secs(5);

/// How long the writer sleeps before it looks again at a database held by a checkpoint, after
/// `attempt` looks (0: the first failed); `None` once it has waited [`WRITER_WAIT`] in all.
fn writer_pause(attempt: i32) -> Option<Duration> {
    let fine = attempt.clamp(0, WRITER_FINE_RETRIES) as u32;
    let coarse = (attempt - WRITER_FINE_RETRIES).max(0) as u32;
    let waited = WRITER_RETRY * fine + Duration::from_millis(1) * coarse;
    if waited >= WRITER_WAIT {
        None
    } else if attempt < WRITER_FINE_RETRIES {
        Some(WRITER_RETRY)
    } else {
        Some(Duration::from_millis(1))
    }
}

/// The writer's busy handler (see [`writer_pause`]).
fn writer_busy(attempt: i32) -> bool {
    writer_pause(attempt).map(std::thread::sleep).is_some()
}

/// The checkpoint thread of one database file; it stops when this is dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Turns off automatic checkpoints on `db` (the writer's connection to `path`), gives it
    /// the busy handler [`writer_busy`] and starts a thread named `name` that checkpoints
    /// `path` from a connection of its own.
    pub(crate) fn start(db: &Connection, path: &Path, name: &str) -> Result<Self, rusqlite::Error> {
        db.pragma_update(None, "wal_autocheckpoint", 0)?;
        db.busy_handler(Some(writer_busy))?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(RESTART_WAIT)?;
        let page: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        // Each frame of the log is a page and its 24-byte header.
        let log_max_frames = LOG_MAX / (page + 24);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EVERY);
                    if let Err(e) = checkpoint(&conn, log_max_frames) {
                        tracing::debug!("checkpoint: {e}");
                    }
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer { stop })
    }
}

/// One passive checkpoint; one that restarts the log when it holds more than `max_frames`.
fn checkpoint(conn: &Connection, max_frames: u64) -> Result<(), rusqlite::Error> {
    // (busy, frames in the log, frames copied)
    let frames: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
    if frames.max(0) as u64 > max_frames {
        tracing::debug!(
            frames,
            "the log is past its bound: checkpoint and restart it"
        );
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(())
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_len(path: &Path) -> u64 {
        std::fs::metadata(path.with_extension("sqlite-wal")).map_or(0, |m| m.len())
    }

    /// Commits 3,000 rows of 4 KB one at a time, 0.2 ms apart, while checkpoints with
    /// `max_frames` run every millisecond beside them; returns the log file's size at the end.
    fn log_under_steady_commits(max_frames: u64) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
             CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB);",
        )
        .unwrap();
        db.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let checkpoints = {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let conn = Connection::open(&path).unwrap();
                while !done.load(Ordering::Relaxed) {
                    checkpoint(&conn, max_frames).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        for k in 0..3_000 {
            db.execute("INSERT INTO t VALUES (?1, zeroblob(4000))", [k])
                .unwrap();
            // A writer does other work between its commits.
            std::thread::sleep(Duration::from_micros(200));
        }
        done.store(true, Ordering::Relaxed);
        checkpoints.join().unwrap();
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3_000);
        wal_len(&path)
    }

    #[test]
    fn the_writer_looks_again_at_a_fine_grain_then_every_millisecond_for_5_s_in_all() {
        assert_eq!(writer_pause(0), Some(WRITER_RETRY));
        assert_eq!(writer_pause(WRITER_FINE_RETRIES - 1), Some(WRITER_RETRY));
        assert_eq!(
            writer_pause(WRITER_FINE_RETRIES),
            Some(Duration::from_millis(1))
        );
        let pauses: Vec<Duration> = (0..).map_while(writer_pause).collect();
        let total: Duration = pauses.iter().sum();
        assert!(
            total >= WRITER_WAIT - Duration::from_millis(1) && total <= WRITER_WAIT,
            "{total:?} over {} looks",
            pauses.len()
        );
    }

    #[test]
    fn a_writer_held_off_by_another_connection_waits_for_it_and_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        let db = Connection::open(&path).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT);",
        )
        .unwrap();
        let _checkpoints = Checkpointer::start(&db, &path, "test-checkpoint").unwrap();
        // Another connection holds the write lock for 30 ms, as a RESTART checkpoint does.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            other.execute_batch("COMMIT").unwrap();
        });
        locked.recv().unwrap();
        db.execute("INSERT INTO t (v) VALUES ('after the wait')", [])
            .unwrap();
        holder.join().unwrap();
        let n: i64 = db
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn under_steady_commits_the_log_stays_near_its_bound() {
        // Passive checkpoints alone (a bound never reached) let the log grow with nearly every
        // commit (up to 3,000 × 3 pages; 20–38 MB here, 10 MB or more with the cores busy).
        // Past a bound of 1 MiB it starts over, and the file stays at about what the log
        // reached between two checkpoints (1.1–1.5 MB here; 4.8 MB once under a full test
        // run, when the checkpoint thread waited long for a core).
        let unbounded = log_under_steady_commits(u64::MAX);
        // 1 MiB of frames of a 4 KiB page and its 24-byte header.
        let bounded = log_under_steady_commits((1 << 20) / (4096 + 24));
        assert!(
            bounded < 16 << 20,
            "{bounded} (without a bound: {unbounded})"
        );
        assert!(
            unbounded > 2 * bounded,
            "{unbounded} without a bound, {bounded} with one"
        );
    }
}
