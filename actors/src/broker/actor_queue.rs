//! One actor subscriber's reliable queue: its filters, the QoS 1/2 notices in flight to it
//! (unacknowledged) and those queued behind them.
//!
//! Like a client session, but addressed by message: each notice carries a broker-wide `id` the
//! actor acknowledges with [`super::BrokerMessage::Ack`]. At most `max_inflight` are
//! unacknowledged at a time (or the window the subscriber asked for); beyond that up to `max_queued` wait, and past that they are dropped
//! (and counted by the caller). What is in flight is sent again, in order and marked `dup`, when
//! the actor subscribes again (it restarted) and when it has gone unacknowledged for
//! `redeliver_ticks` ticks of the broker's clock, then twice as long, four times, up to
//! [`MAX_BACKOFF`] times (a stopped actor's mailbox keeps what was sent; each copy is work
//! for it when it comes back). Only what has left the broker goes again: a notice still in
//! the broker's outbound queue to a subscriber that is not taking them (stopped, or slow) is
//! neither aged nor copied. Nothing here touches a clock or the disk; the core turns changes
//! into store operations.

use std::collections::{BTreeMap, VecDeque};

use super::session::Message;
use super::topic::SubOptions;

/// While a subscriber acknowledges, a notice goes again only after this many times the usual
/// redelivery time.
pub const PROGRESS_FACTOR: u32 = 10;
/// A notice sent again by the clock waits twice as long before the next time, up to this many
/// times the usual redelivery time.
pub const MAX_BACKOFF: u32 = 16;

/// A notice waiting for its acknowledgement, or queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The broker-wide id the actor acknowledges.
    pub id: u64,
    /// The message.
    pub message: Message,
    /// Sent before (by this run or a previous one).
    pub dup: bool,
    /// Ticks since it was last sent.
    pub age: u32,
    /// Times the clock sent it again since the subscriber last subscribed.
    pub resends: u32,
}

/// What happened to a notice offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorOffer {
    /// Send it now.
    Send,
    /// It waits behind the window.
    Queued,
    /// The queue is full: dropped.
    Dropped,
}

/// One actor subscriber.
#[derive(Debug, Clone, Default)]
pub struct ActorQueue {
    /// Raw filters and how they were subscribed.
    pub filters: BTreeMap<String, SubOptions>,
    /// The in-flight window the subscriber asked for (`None`: the broker's `max_inflight`).
    pub window: Option<u32>,
    inflight: VecDeque<Pending>,
    queue: VecDeque<Pending>,
    /// An acknowledgement came since the last tick.
    progressed: bool,
    /// The highest id the broker has handed to the cluster for this subscriber. Notices above
    /// it still wait in the broker's own outbound queue (the subscriber is not taking them), so
    /// sending them again would only queue a second copy behind the first.
    handed: u64,
}

impl ActorQueue {
    /// Restores messages left unacknowledged by a previous run (all marked `dup`; the first
    /// `pump` puts them in flight again, in id order).
    pub fn restore(&mut self, mut messages: Vec<(u64, Message)>) {
        messages.sort_by_key(|(id, _)| *id);
        self.queue
            .extend(messages.into_iter().map(|(id, message)| Pending {
                id,
                message,
                dup: true,
                age: 0,
                resends: 0,
            }));
    }

    /// Notices in flight.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Notices queued behind the window.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Offers a QoS 1/2 notice.
    pub fn offer(
        &mut self,
        id: u64,
        message: Message,
        max_inflight: usize,
        max_queued: usize,
    ) -> ActorOffer {
        let p = Pending {
            id,
            message,
            dup: false,
            age: 0,
            resends: 0,
        };
        if self.queue.is_empty() && self.inflight.len() < max_inflight.max(1) {
            self.inflight.push_back(p);
            return ActorOffer::Send;
        }
        if self.queue.len() >= max_queued {
            return ActorOffer::Dropped;
        }
        self.queue.push_back(p);
        ActorOffer::Queued
    }

    /// Removes an acknowledged notice (in flight or queued); false when it is not held. Both
    /// lists are in id order (ids are handed out increasing; restored ones are sorted), so this
    /// is a binary search: a window of tens of thousands acknowledged in batches stays cheap,
    /// also for ids acknowledged twice.
    pub fn ack(&mut self, id: u64) -> bool {
        for list in [&mut self.inflight, &mut self.queue] {
            if let Ok(i) = list.binary_search_by_key(&id, |p| p.id) {
                list.remove(i);
                self.progressed = true;
                return true;
            }
        }
        false
    }

    /// Moves queued notices into the window while there is room; returns those to send.
    pub fn pump(&mut self, max_inflight: usize) -> Vec<Pending> {
        let mut out = Vec::new();
        while self.inflight.len() < max_inflight.max(1) {
            let Some(p) = self.queue.pop_front() else {
                break;
            };
            self.inflight.push_back(p.clone());
            out.push(p);
        }
        out
    }

    /// The broker has handed notices up to `id` to the cluster (it never goes back).
    pub fn set_handed(&mut self, id: u64) {
        self.handed = self.handed.max(id);
    }

    /// Everything in flight that has left the broker, to send again (in order, marked `dup`).
    pub fn resend_all(&mut self) -> Vec<Pending> {
        let handed = self.handed;
        let mut out = Vec::new();
        for p in self.inflight.iter_mut().filter(|p| p.id <= handed) {
            p.dup = true;
            p.age = 0;
            p.resends = 0;
            out.push(p.clone());
        }
        out
    }

    /// One tick of the broker's clock: returns the notices unacknowledged for `redeliver_ticks`
    /// ticks, in order, marked `dup`. While the subscriber acknowledges (some acknowledgement
    /// in every tick) it is working through a window that may take longer than that to arrive,
    /// so only notices unacknowledged for [`PROGRESS_FACTOR`] times as long go again; a window
    /// sent twice would double its work.
    pub fn tick(&mut self, redeliver_ticks: u32) -> Vec<Pending> {
        let limit = if std::mem::take(&mut self.progressed) {
            redeliver_ticks.saturating_mul(PROGRESS_FACTOR)
        } else {
            redeliver_ticks
        };
        let mut out = Vec::new();
        for p in &mut self.inflight {
            if p.id > self.handed {
                // Still in the broker's outbound queue: its clock starts once it has left.
                continue;
            }
            p.age += 1;
            let backoff = 1u32 << p.resends.min(MAX_BACKOFF.trailing_zeros());
            if p.age >= limit.saturating_mul(backoff) {
                p.age = 0;
                p.dup = true;
                p.resends += 1;
                out.push(p.clone());
            }
        }
        out
    }

    /// Ids of everything held (in flight, then queued).
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.inflight.iter().chain(&self.queue).map(|p| p.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> Message {
        Message::new(format!("t/{n}"), vec![n], 1, false)
    }

    #[test]
    fn window_queue_drop_and_ack_in_any_order() {
        let mut q = ActorQueue::default();
        assert_eq!(q.offer(1, msg(1), 2, 1), ActorOffer::Send);
        assert_eq!(q.offer(2, msg(2), 2, 1), ActorOffer::Send);
        assert_eq!(q.offer(3, msg(3), 2, 1), ActorOffer::Queued);
        assert_eq!(q.offer(4, msg(4), 2, 1), ActorOffer::Dropped);
        assert!(q.ack(2));
        assert!(!q.ack(2));
        let moved = q.pump(2);
        assert_eq!(moved.iter().map(|p| p.id).collect::<Vec<_>>(), [3]);
        assert_eq!(q.ids().collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn unacknowledged_notices_are_redelivered_in_order_after_the_timeout() {
        let mut q = ActorQueue::default();
        q.offer(1, msg(1), 10, 10);
        q.offer(2, msg(2), 10, 10);
        q.set_handed(2);
        assert!(q.tick(3).is_empty());
        q.ack(1);
        assert!(q.tick(3).is_empty());
        let again = q.tick(3);
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].id, again[0].dup), (2, true));
        assert!(q.tick(3).is_empty(), "the age restarts after a resend");
    }

    #[test]
    fn an_unanswered_notice_goes_again_less_and_less_often() {
        let mut q = ActorQueue::default();
        q.offer(1, msg(1), 10, 10);
        q.set_handed(1);
        let sent_at: Vec<u32> = (1..=200).filter(|_| !q.tick(2).is_empty()).collect();
        assert_eq!(sent_at, [2, 6, 14, 30, 62, 94, 126, 158, 190]);
        // A subscriber that comes back starts from the usual time again.
        q.resend_all();
        assert!(q.tick(2).is_empty());
        assert_eq!(q.tick(2).len(), 1);
    }

    #[test]
    fn a_subscriber_that_acknowledges_gets_more_time() {
        let mut q = ActorQueue::default();
        for id in 1..=3 {
            q.offer(id, msg(id as u8), 10, 10);
        }
        q.set_handed(3);
        for id in 1..=2 {
            assert!(q.tick(2).is_empty());
            assert!(q.ack(id));
        }
        // Two ticks old, but an acknowledgement came in the last one.
        assert!(q.tick(2).is_empty());
        // No acknowledgement since: it goes again.
        assert_eq!(q.tick(2).iter().map(|p| p.id).collect::<Vec<_>>(), [3]);
        assert!(!q.ack(1), "an id acknowledged twice is not held");
    }

    #[test]
    fn resubscribing_resends_everything_in_flight() {
        let mut q = ActorQueue::default();
        q.offer(1, msg(1), 1, 10);
        q.offer(2, msg(2), 1, 10);
        q.set_handed(1);
        let again = q.resend_all();
        assert_eq!(
            again.iter().map(|p| (p.id, p.dup)).collect::<Vec<_>>(),
            [(1, true)]
        );
    }

    #[test]
    fn what_has_not_left_the_broker_is_neither_aged_nor_sent_again() {
        let mut q = ActorQueue::default();
        for id in 1..=3 {
            q.offer(id, msg(id as u8), 10, 10);
        }
        // 1 and 2 went out; 3 waits in the broker's queue to a subscriber that is not taking.
        q.set_handed(2);
        q.set_handed(1);
        assert!(q.tick(2).is_empty());
        let ids = |v: Vec<Pending>| v.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(q.tick(2)), [1, 2]);
        assert_eq!(ids(q.resend_all()), [1, 2]);
        // 3 leaves now: its clock starts from zero.
        q.set_handed(3);
        assert!(q.tick(2).is_empty());
        assert_eq!(ids(q.tick(2)), [1, 2, 3]);
    }

    #[test]
    fn restored_notices_go_out_marked_dup_in_id_order() {
        let mut q = ActorQueue::default();
        q.restore(vec![(9, msg(9)), (4, msg(4))]);
        let out = q.pump(10);
        assert_eq!(
            out.iter().map(|p| (p.id, p.dup)).collect::<Vec<_>>(),
            [(4, true), (9, true)]
        );
    }
}
