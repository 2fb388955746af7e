//! One client's session: its subscriptions, the QoS 1/2 messages in flight to it, the messages
//! queued behind them, and the QoS 2 packet ids it has sent and not yet released.
//!
//! Outgoing QoS 1 and 2 messages move through a window of at most `max_inflight` packets: a
//! message enters the window with a fresh packet id and leaves it on PUBACK (QoS 1) or PUBCOMP
//! (QoS 2, after PUBREC/PUBREL); beyond the window messages wait in a queue of at most
//! `max_queued`, and past that they are dropped (and counted by the caller). On reconnect every
//! message still in the window is sent again, PUBLISH with DUP set or PUBREL, in original order.
//! Each message carries a broker-wide sequence number so the on-disk copy can be found again.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Who a subscription belongs to, or who published a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subscriber {
    /// An MQTT client, by client id.
    Client(Arc<str>),
    /// An actor, by address.
    Actor(Arc<str>),
}

/// An application message as the broker routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it travels at.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Who published it (for no-local); not kept on disk.
    pub origin: Option<Subscriber>,
    /// Bridges this message has passed through, carried to actor subscribers untouched.
    pub hops: Vec<String>,
}

impl Message {
    /// A message with no origin and no hops.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>, qos: u8, retain: bool) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            origin: None,
            hops: Vec::new(),
        }
    }
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

impl OutState {
    /// Number stored on disk.
    pub fn code(self) -> u8 {
        match self {
            OutState::AwaitAck => 1,
            OutState::AwaitRec => 2,
            OutState::AwaitComp => 3,
        }
    }

    /// From the number stored on disk.
    pub fn from_code(code: u8) -> Option<OutState> {
        match code {
            1 => Some(OutState::AwaitAck),
            2 => Some(OutState::AwaitRec),
            3 => Some(OutState::AwaitComp),
            _ => None,
        }
    }
}

/// A message in the in-flight window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Broker-wide sequence number.
    pub seq: u64,
    /// Packet id.
    pub pid: u16,
    /// Its state.
    pub state: OutState,
    /// The message.
    pub message: Message,
}

/// What the session wants sent to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A PUBLISH (packet id 0 for QoS 0).
    Publish {
        /// Packet id.
        pid: u16,
        /// DUP flag.
        dup: bool,
        /// The message.
        message: Message,
    },
    /// A PUBREL for a QoS 2 message the client has received.
    PubRel(u16),
}

/// What happened to a message offered to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// It entered the in-flight window (send `Outbound::Publish`) with this packet id.
    Sent(u16),
    /// It waits in the queue.
    Queued,
    /// The queue is full: it was dropped.
    Dropped,
}

/// An acknowledgement received for an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// PUBACK.
    PubAck(u16),
    /// PUBREC.
    PubRec(u16),
    /// PUBCOMP.
    PubComp(u16),
}

/// What an acknowledgement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// The message with this sequence number is done.
    Done(u64),
    /// PUBREC: the message moved to `AwaitComp`; send PUBREL.
    Released(u64),
    /// No message in flight with that packet id in a state that takes this ack.
    Unknown,
}

/// One client's session.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Raw subscription filters (shared ones with their `$share/group/` prefix) and their QoS.
    pub subscriptions: BTreeMap<String, u8>,
    /// Kept across disconnects (clean session false).
    pub persistent: bool,
    /// The username it last connected with (ACLs on delivery use it).
    pub username: Option<String>,
    inflight: VecDeque<InFlight>,
    queue: VecDeque<(u64, Message)>,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    incoming_qos2: HashSet<u16>,
    next_pid: u16,
}

impl Session {
    /// A new empty session.
    pub fn new(persistent: bool, username: Option<String>) -> Session {
        Session {
            persistent,
            username,
            next_pid: 1,
            ..Session::default()
        }
    }

    /// Restores a session from disk: in-flight messages (ordered by sequence) and queued ones.
    pub fn restore(
        subscriptions: BTreeMap<String, u8>,
        username: Option<String>,
        inflight: Vec<InFlight>,
        queue: Vec<(u64, Message)>,
    ) -> Session {
        let next_pid = inflight
            .iter()
            .map(|f| f.pid)
            .max()
            .map_or(1, |p| p.wrapping_add(1).max(1));
        Session {
            subscriptions,
            persistent: true,
            username,
            inflight: inflight.into(),
            queue: queue.into(),
            incoming_qos2: HashSet::new(),
            next_pid,
        }
    }

    /// Messages in flight.
    pub fn inflight(&self) -> impl Iterator<Item = &InFlight> {
        self.inflight.iter()
    }

    /// Messages queued behind the window.
    pub fn queued(&self) -> impl Iterator<Item = &(u64, Message)> {
        self.queue.iter()
    }

    /// Number of queued messages.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Offers a QoS 1/2 message: into the window if there is room (and the client is online),
    /// else into the queue, else dropped.
    pub fn offer(
        &mut self,
        seq: u64,
        message: Message,
        online: bool,
        max_inflight: usize,
        max_queued: usize,
    ) -> Offer {
        if online && self.queue.is_empty() && self.inflight.len() < max_inflight {
            let pid = self.take_pid();
            let state = if message.qos == 1 {
                OutState::AwaitAck
            } else {
                OutState::AwaitRec
            };
            self.inflight.push_back(InFlight {
                seq,
                pid,
                state,
                message,
            });
            return Offer::Sent(pid);
        }
        if self.queue.len() >= max_queued {
            return Offer::Dropped;
        }
        self.queue.push_back((seq, message));
        Offer::Queued
    }

    /// Moves queued messages into the window while there is room; returns them (seq, pid, msg).
    pub fn pump(&mut self, max_inflight: usize) -> Vec<InFlight> {
        let mut moved = Vec::new();
        while self.inflight.len() < max_inflight {
            let Some((seq, message)) = self.queue.pop_front() else {
                break;
            };
            let pid = self.take_pid();
            let state = if message.qos == 1 {
                OutState::AwaitAck
            } else {
                OutState::AwaitRec
            };
            let f = InFlight {
                seq,
                pid,
                state,
                message,
            };
            self.inflight.push_back(f.clone());
            moved.push(f);
        }
        moved
    }

    /// Applies an acknowledgement from the client.
    pub fn ack(&mut self, ack: Ack) -> AckOutcome {
        let (pid, want) = match ack {
            Ack::PubAck(p) => (p, OutState::AwaitAck),
            Ack::PubRec(p) => (p, OutState::AwaitRec),
            Ack::PubComp(p) => (p, OutState::AwaitComp),
        };
        let Some(i) = self.inflight.iter().position(|f| f.pid == pid) else {
            return AckOutcome::Unknown;
        };
        let f = &mut self.inflight[i];
        if f.state != want {
            // A repeated PUBREC for a message already released: release it again.
            if matches!(ack, Ack::PubRec(_)) && f.state == OutState::AwaitComp {
                return AckOutcome::Released(f.seq);
            }
            return AckOutcome::Unknown;
        }
        match ack {
            Ack::PubRec(_) => {
                f.state = OutState::AwaitComp;
                AckOutcome::Released(f.seq)
            }
            _ => {
                let seq = f.seq;
                self.inflight.remove(i);
                AckOutcome::Done(seq)
            }
        }
    }

    /// Packets to send again on reconnect, in order.
    pub fn resend(&self) -> Vec<Outbound> {
        self.inflight
            .iter()
            .map(|f| match f.state {
                OutState::AwaitComp => Outbound::PubRel(f.pid),
                _ => Outbound::Publish {
                    pid: f.pid,
                    dup: true,
                    message: f.message.clone(),
                },
            })
            .collect()
    }

    /// Records an incoming QoS 2 packet id; false if it was already held (a duplicate to ack but
    /// not route again).
    pub fn receive_qos2(&mut self, pid: u16) -> bool {
        self.incoming_qos2.insert(pid)
    }

    /// Releases an incoming QoS 2 packet id (PUBREL).
    pub fn release_qos2(&mut self, pid: u16) {
        self.incoming_qos2.remove(&pid);
    }

    /// Incoming QoS 2 ids held.
    pub fn incoming_qos2_len(&self) -> usize {
        self.incoming_qos2.len()
    }

    fn take_pid(&mut self) -> u16 {
        // Skip ids still in flight; the window is far smaller than the id space, so this ends.
        loop {
            let pid = self.next_pid.max(1);
            self.next_pid = pid.wrapping_add(1).max(1);
            if !self.inflight.iter().any(|f| f.pid == pid) {
                return pid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(qos: u8) -> Message {
        Message::new("t", Bytes::from_static(b"x"), qos, false)
    }

    #[test]
    fn window_then_queue_then_drop() {
        let mut s = Session::new(true, None);
        assert_eq!(s.offer(1, msg(1), true, 2, 1), Offer::Sent(1));
        assert_eq!(s.offer(2, msg(1), true, 2, 1), Offer::Sent(2));
        assert_eq!(s.offer(3, msg(1), true, 2, 1), Offer::Queued);
        assert_eq!(s.offer(4, msg(1), true, 2, 1), Offer::Dropped);
        assert_eq!(s.ack(Ack::PubAck(1)), AckOutcome::Done(1));
        let moved = s.pump(2);
        assert_eq!(moved.len(), 1);
        assert_eq!((moved[0].seq, moved[0].pid), (3, 3));
        assert_eq!(s.ack(Ack::PubAck(1)), AckOutcome::Unknown);
    }

    #[test]
    fn offline_messages_queue_in_order_behind_the_window() {
        let mut s = Session::new(true, None);
        assert_eq!(s.offer(1, msg(1), false, 10, 10), Offer::Queued);
        // Online again but the queue is not empty: order is kept.
        assert_eq!(s.offer(2, msg(1), true, 10, 10), Offer::Queued);
        let moved = s.pump(10);
        assert_eq!(moved.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn qos2_handshake_and_resend() {
        let mut s = Session::new(true, None);
        assert_eq!(s.offer(7, msg(2), true, 10, 10), Offer::Sent(1));
        assert_eq!(
            s.ack(Ack::PubAck(1)),
            AckOutcome::Unknown,
            "wrong ack for QoS 2"
        );
        assert_eq!(
            s.resend(),
            [Outbound::Publish {
                pid: 1,
                dup: true,
                message: msg(2)
            }]
        );
        assert_eq!(s.ack(Ack::PubRec(1)), AckOutcome::Released(7));
        assert_eq!(
            s.ack(Ack::PubRec(1)),
            AckOutcome::Released(7),
            "repeat PUBREC"
        );
        assert_eq!(s.resend(), [Outbound::PubRel(1)]);
        assert_eq!(s.ack(Ack::PubComp(1)), AckOutcome::Done(7));
        assert!(s.resend().is_empty());
    }

    #[test]
    fn incoming_qos2_dedup() {
        let mut s = Session::new(false, None);
        assert!(s.receive_qos2(5));
        assert!(!s.receive_qos2(5));
        s.release_qos2(5);
        assert!(s.receive_qos2(5));
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_zero() {
        let mut s = Session::new(false, None);
        s.next_pid = u16::MAX;
        assert_eq!(s.offer(1, msg(1), true, 10, 10), Offer::Sent(u16::MAX));
        assert_eq!(s.offer(2, msg(1), true, 10, 10), Offer::Sent(1));
        s.next_pid = u16::MAX;
        assert_eq!(s.offer(3, msg(1), true, 10, 10), Offer::Sent(2));
    }

    #[test]
    fn restore_continues_packet_ids() {
        let f = InFlight {
            seq: 1,
            pid: 9,
            state: OutState::AwaitAck,
            message: msg(1),
        };
        let mut s = Session::restore(BTreeMap::new(), None, vec![f], vec![(2, msg(1))]);
        let moved = s.pump(10);
        assert_eq!(moved[0].pid, 10);
    }
}
