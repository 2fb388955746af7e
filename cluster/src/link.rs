//! One QUIC connection to a peer node: a writer task that batches frames onto one stream, a
//! reader task that decodes the peer's stream, and the datagram path.
//!
//! Each side opens one unidirectional stream for everything it sends, so every message between a
//! pair of actors on the two nodes arrives in the order it was sent. The writer's queue is bounded:
//! when the peer reads slowly, QUIC flow control stalls the writer, the queue fills, and senders
//! wait — memory does not grow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use crate::registry::FrameSink;

/// Frames queued for a link's writer before senders wait.
pub(crate) const LINK_QUEUE: usize = 8192;
/// Frames written to the stream in one batch at most.
const WRITE_BATCH: usize = 512;

/// A live connection to a peer.
pub(crate) struct Link {
    /// Distinguishes this connection from a later one to the same peer.
    pub id: u64,
    pub peer: Arc<str>,
    pub conn: quinn::Connection,
    pub tx: mpsc::Sender<Bytes>,
    pub since: SystemTime,
    pub messages_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub frames_rejected: AtomicU64,
}

impl Link {
    /// A link over `conn` and the receiving end of its writer queue.
    pub fn new(
        id: u64,
        peer: Arc<str>,
        conn: quinn::Connection,
    ) -> (Arc<Link>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let link = Link {
            id,
            peer,
            conn,
            tx,
            since: SystemTime::now(),
            messages_out: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
        };
        (Arc::new(link), rx)
    }

    /// Queues a frame, waiting while the queue is full; false when the link is gone.
    pub async fn send(&self, frame: Bytes) -> bool {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
        self.tx.send(frame).await.is_ok()
    }
}

impl FrameSink for Link {
    fn send_frame(&self, frame: Bytes) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Writes queued frames to a fresh unidirectional stream in batches until the queue closes or
/// the connection fails.
pub(crate) async fn run_writer(conn: quinn::Connection, mut rx: mpsc::Receiver<Bytes>) {
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            debug!("cannot open a stream: {e}");
            return;
        }
    };
    let mut batch: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    loop {
        if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            let _ = stream.finish();
            return;
        }
        if let Err(e) = stream.write_all_chunks(&mut batch).await {
            debug!("link write failed: {e}");
            return;
        }
        batch.clear();
    }
}
