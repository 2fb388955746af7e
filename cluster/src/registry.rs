//! The local side of addresses: actor names on this node mapped to bounded mailboxes.
//!
//! A [`Delivery`] is what an actor receives: the body, the sender, and for a call a
//! [`ReplyHandle`]. A reply handle always answers: if the actor drops it unanswered, the caller
//! gets `Rejected("… did not reply")` rather than waiting for its timeout.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

use colony_config::Address;

use crate::envelope::{CallError, decode_body, encode_body, encode_reply};
use crate::frame::{FrameKind, frame_bytes};

/// Where a reply frame for a remote caller goes (a link, or a relay session).
pub trait FrameSink: Send + Sync {
    /// Queues a frame; never blocks (it may spawn to wait for room).
    fn send_frame(&self, frame: Bytes);
}

enum ReplyRoute {
    Local(oneshot::Sender<Result<Bytes, CallError>>),
    Remote { sink: Arc<dyn FrameSink>, id: u64 },
}

/// Answers one call, exactly once.
pub struct ReplyHandle {
    route: Option<ReplyRoute>,
    target: String,
}

impl ReplyHandle {
    pub(crate) fn local(tx: oneshot::Sender<Result<Bytes, CallError>>, target: String) -> Self {
        ReplyHandle {
            route: Some(ReplyRoute::Local(tx)),
            target,
        }
    }

    pub(crate) fn remote(sink: Arc<dyn FrameSink>, id: u64, target: String) -> Self {
        ReplyHandle {
            route: Some(ReplyRoute::Remote { sink, id }),
            target,
        }
    }

    /// Sends the reply (an encoded body, or an error).
    pub fn send_raw(mut self, result: Result<Bytes, CallError>) {
        self.finish(result);
    }

    /// Sends `value` as the reply.
    pub fn send<T: Serialize + ?Sized>(self, value: &T) {
        let result = encode_body(value).map(Bytes::from);
        self.send_raw(result);
    }

    /// Answers with an error.
    pub fn fail(self, error: CallError) {
        self.send_raw(Err(error));
    }

    fn finish(&mut self, result: Result<Bytes, CallError>) {
        match self.route.take() {
            Some(ReplyRoute::Local(tx)) => {
                let _ = tx.send(result);
            }
            Some(ReplyRoute::Remote { sink, id }) => {
                sink.send_frame(frame_bytes(FrameKind::Reply, id, &encode_reply(&result)));
            }
            None => {}
        }
    }
}

impl Drop for ReplyHandle {
    fn drop(&mut self) {
        if self.route.is_some() {
            let reason = format!("{} did not reply", self.target);
            self.finish(Err(CallError::Rejected(reason)));
        }
    }
}

impl std::fmt::Debug for ReplyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyHandle")
            .field("target", &self.target)
            .finish()
    }
}

/// One message as an actor receives it.
#[derive(Debug)]
pub struct Delivery {
    /// The sending actor, if it gave one.
    pub from: Option<Address>,
    /// CBOR of the receiving kind's message type.
    pub body: Bytes,
    /// Present when the sender waits for a reply.
    pub reply: Option<ReplyHandle>,
}

impl Delivery {
    /// Decodes the body as the kind's message type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CallError> {
        decode_body(&self.body)
    }

    /// Replies to a call (a no-op for a one-way message).
    pub fn reply<T: Serialize + ?Sized>(&mut self, value: &T) {
        if let Some(r) = self.reply.take() {
            r.send(value);
        }
    }

    /// Replies to a call with an error (a no-op for a one-way message).
    pub fn reject(&mut self, error: CallError) {
        if let Some(r) = self.reply.take() {
            r.fail(error);
        }
    }
}

/// The sending half of an actor's mailbox.
pub type MailboxSender = mpsc::Sender<Delivery>;
/// The receiving half of an actor's mailbox.
pub type MailboxReceiver = mpsc::Receiver<Delivery>;

/// A datagram as an actor receives it.
#[derive(Debug, Clone)]
pub struct Datagram {
    /// The node it came from.
    pub from_node: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
}

/// Local actor names to mailboxes and datagram inboxes.
#[derive(Default)]
pub struct Registry {
    mailboxes: RwLock<HashMap<String, MailboxSender>>,
    datagrams: RwLock<HashMap<String, mpsc::Sender<Datagram>>>,
}

impl Registry {
    /// Registers `path` (e.g. `broker` or `broker/client_7`) with a mailbox of `capacity`
    /// messages, replacing any earlier registration; returns the receiving half.
    pub fn register(&self, path: &str, capacity: usize) -> MailboxReceiver {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.write_mailboxes().insert(path.to_owned(), tx);
        rx
    }

    /// Registers an existing mailbox at `path` (an actor coming back after removal).
    pub fn insert(&self, path: &str, mailbox: MailboxSender) {
        self.write_mailboxes().insert(path.to_owned(), mailbox);
    }

    /// Removes `path`.
    pub fn unregister(&self, path: &str) {
        self.write_mailboxes().remove(path);
        self.datagrams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
    }

    /// The mailbox at `path`.
    pub fn mailbox(&self, path: &str) -> Option<MailboxSender> {
        self.mailboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }

    /// Registered paths, sorted.
    pub fn paths(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .mailboxes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Registers a datagram inbox for `path`; datagrams beyond `capacity` queued are dropped.
    pub fn register_datagrams(&self, path: &str, capacity: usize) -> mpsc::Receiver<Datagram> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.datagrams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), tx);
        rx
    }

    /// Hands a datagram to `path`'s inbox; false when there is none or it is full.
    pub fn deliver_datagram(&self, path: &str, datagram: Datagram) -> bool {
        let tx = self
            .datagrams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned();
        tx.is_some_and(|tx| tx.try_send(datagram).is_ok())
    }

    /// Delivers to `path` if its mailbox has room now; false when it has none or there is no
    /// such actor.
    pub fn try_deliver(&self, path: &str, delivery: Delivery) -> bool {
        let mailboxes = self.mailboxes.read().unwrap_or_else(|e| e.into_inner());
        mailboxes
            .get(path)
            .is_some_and(|tx| tx.try_send(delivery).is_ok())
    }

    /// Delivers to `path`, waiting while its mailbox is full (that wait is the back-pressure).
    pub async fn deliver(
        &self,
        path: &str,
        delivery: Delivery,
    ) -> Result<(), (CallError, Delivery)> {
        let no_such_actor = || CallError::NoSuchActor(path.to_owned());
        // Most deliveries find room: hand those over under the read lock, without cloning the
        // sender; only a full mailbox needs a sender of our own to wait on.
        let (tx, delivery) = {
            let mailboxes = self.mailboxes.read().unwrap_or_else(|e| e.into_inner());
            let Some(tx) = mailboxes.get(path) else {
                return Err((no_such_actor(), delivery));
            };
            match tx.try_send(delivery) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(d)) => return Err((no_such_actor(), d)),
                Err(mpsc::error::TrySendError::Full(d)) => (tx.clone(), d),
            }
        };
        tx.send(delivery).await.map_err(|e| (no_such_actor(), e.0))
    }

    fn write_mailboxes(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, MailboxSender>> {
        self.mailboxes.write().unwrap_or_else(|e| e.into_inner())
    }
}
