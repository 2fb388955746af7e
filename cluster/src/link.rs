//! One QUIC connection to a peer node: a writer task that batches frames onto one stream, a
//! reader task that decodes the peer's stream, and the datagram path.
//!
//! Each side opens one unidirectional stream for everything it sends, so every message between a
//! pair of actors on the two nodes arrives in the order it was sent. The writer's queue is bounded
//! to [`LINK_QUEUE`] frames: when the peer reads slowly, QUIC flow control stalls the writer, the
//! queue fills, and senders wait — memory does not grow. An item of the queue is one frame, or
//! several whole frames laid end to end (a batch), never part of one; it holds room for as many
//! frames as it carries until the writer has handed it to quinn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tracing::debug;

use crate::registry::FrameSink;

/// Frames queued for a link's writer before senders wait.
pub(crate) const LINK_QUEUE: usize = 8192;
/// Queue items taken in one batch at most.
const WRITE_BATCH: usize = 512;
/// Frames smaller than this are copied together into one chunk before they reach quinn.
const COALESCE_BELOW: usize = 4096;

/// Whole frames on their way to the writer, and the room they hold in the queue.
pub(crate) struct Queued {
    frames: Bytes,
    _room: OwnedSemaphorePermit,
}

/// A live connection to a peer.
pub(crate) struct Link {
    /// Distinguishes this connection from a later one to the same peer.
    pub id: u64,
    pub peer: Arc<str>,
    pub conn: quinn::Connection,
    /// The writer's queue; its bound is `room`.
    tx: mpsc::UnboundedSender<Queued>,
    /// One permit per frame the queue may still take; closed when the writer stops.
    room: Arc<Semaphore>,
    pub since: SystemTime,
    pub messages_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub frames_rejected: AtomicU64,
    /// Datagrams dropped because the addressed actor had no room or no inbox.
    pub datagrams_dropped: AtomicU64,
}

/// The writer's end of a link's queue.
pub(crate) struct LinkQueue {
    rx: mpsc::UnboundedReceiver<Queued>,
    room: Arc<Semaphore>,
}

impl Link {
    /// A link over `conn` and the writer's end of its queue.
    pub fn new(id: u64, peer: Arc<str>, conn: quinn::Connection) -> (Arc<Link>, LinkQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(LINK_QUEUE));
        let link = Link {
            id,
            peer,
            conn,
            tx,
            room: room.clone(),
            since: SystemTime::now(),
            messages_out: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            frames_rejected: AtomicU64::new(0),
            datagrams_dropped: AtomicU64::new(0),
        };
        (Arc::new(link), LinkQueue { rx, room })
    }

    /// Queues a frame, waiting while the queue is full; false when the link is gone.
    pub async fn send(&self, frame: Bytes) -> bool {
        self.send_frames(frame, 1).await
    }

    /// Queues `count` whole frames laid end to end in `frames` as one item, waiting until the
    /// queue has room for that many frames; false when the link is gone.
    pub async fn send_frames(&self, frames: Bytes, count: u64) -> bool {
        self.messages_out.fetch_add(count, Ordering::Relaxed);
        let Ok(room) = self.room.clone().acquire_many_owned(permits(count)).await else {
            return false;
        };
        self.tx
            .send(Queued {
                frames,
                _room: room,
            })
            .is_ok()
    }
}

/// Permits for `count` frames; an item never needs more than the whole queue.
fn permits(count: u64) -> u32 {
    count.clamp(1, LINK_QUEUE as u64) as u32
}

impl FrameSink for Link {
    fn send_frame(&self, frame: Bytes) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
        match self.room.clone().try_acquire_owned() {
            Ok(room) => {
                let _ = self.tx.send(Queued {
                    frames: frame,
                    _room: room,
                });
            }
            Err(TryAcquireError::NoPermits) => {
                let (tx, room) = (self.tx.clone(), self.room.clone());
                tokio::spawn(async move {
                    if let Ok(room) = room.acquire_owned().await {
                        let _ = tx.send(Queued {
                            frames: frame,
                            _room: room,
                        });
                    }
                });
            }
            Err(TryAcquireError::Closed) => {}
        }
    }
}

/// Closes the queue's room when the writer stops (returns or is aborted), so that senders waiting
/// for room learn that the link is gone.
struct CloseOnDrop(Arc<Semaphore>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Writes queued frames to a fresh unidirectional stream in batches until the queue closes or
/// the connection fails.
pub(crate) async fn run_writer(conn: quinn::Connection, queue: LinkQueue) {
    let LinkQueue { mut rx, room } = queue;
    let _close = CloseOnDrop(room);
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            debug!("cannot open a stream: {e}");
            return;
        }
    };
    let mut batch: Vec<Queued> = Vec::with_capacity(WRITE_BATCH);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    let mut small = BytesMut::new();
    loop {
        if rx.recv_many(&mut batch, WRITE_BATCH).await == 0 {
            let _ = stream.finish();
            return;
        }
        coalesce(batch.iter().map(|q| &q.frames), &mut small, &mut chunks);
        if let Err(e) = stream.write_all_chunks(&mut chunks).await {
            debug!("link write failed: {e}");
            return;
        }
        chunks.clear();
        // Quinn holds the bytes now (within its flow-control windows): free the room.
        batch.clear();
    }
}

/// Moves `frames` into `chunks` in order, copying runs of small frames into one chunk each.
///
/// quinn keeps every chunk written to a stream as a separate segment until it is acknowledged and
/// finds the bytes to send by walking those segments from the oldest, so thousands of 100-byte
/// frames in flight make every packet cost a long walk (and a STREAM frame per segment).
fn coalesce<'a>(
    frames: impl Iterator<Item = &'a Bytes>,
    small: &mut BytesMut,
    chunks: &mut Vec<Bytes>,
) {
    for frame in frames {
        if frame.len() < COALESCE_BELOW {
            small.extend_from_slice(frame);
            continue;
        }
        if !small.is_empty() {
            chunks.push(small.split().freeze());
        }
        chunks.push(frame.clone());
    }
    if !small.is_empty() {
        chunks.push(small.split().freeze());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_keeps_bytes_and_order() {
        let frames: Vec<Bytes> = [10, 20, COALESCE_BELOW, 5, COALESCE_BELOW + 1, 7, 8]
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let (mut small, mut chunks) = (BytesMut::new(), Vec::new());
        coalesce(frames.iter(), &mut small, &mut chunks);
        let sizes: Vec<usize> = chunks.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [30, COALESCE_BELOW, 5, COALESCE_BELOW + 1, 15]);
        let got: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(got, expected);
        assert!(small.is_empty());
    }
}
