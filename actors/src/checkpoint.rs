//! Write-ahead-log checkpoints off the hot path, for the SQLite files of brokers and bridges.
//!
//! With `journal_mode = WAL` and `synchronous = NORMAL` a commit only appends to the log; the
//! fsyncs happen when the log is copied into the database (a checkpoint). SQLite's automatic
//! checkpoint runs inside whichever commit crosses its threshold, so that commit — and every
//! message behind it — waits for two fsyncs (tens of milliseconds on a busy disk). Here the
//! automatic checkpoint is turned off and a thread of its own checkpoints instead, passively
//! (never blocking a writer), every quarter of a second.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rusqlite::Connection;

/// How often the log is copied into the database.
const EVERY: Duration = Duration::from_millis(250);

/// The checkpoint thread of one database file; it stops when this is dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Turns off automatic checkpoints on `db` (the writer's connection to `path`) and starts a
    /// thread named `name` that checkpoints `path` from a connection of its own.
    pub(crate) fn start(db: &Connection, path: &Path, name: &str) -> Result<Self, rusqlite::Error> {
        db.pragma_update(None, "wal_autocheckpoint", 0)?;
        let conn = Connection::open(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EVERY);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!("checkpoint: {e}");
                    }
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer { stop })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
