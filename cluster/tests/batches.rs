//! `Cluster::send_batch`: order with other sends, frames too large, relays, local targets and
//! back-pressure; and `Cluster::try_send_local`, which never waits.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use colony_cluster::{Address, CallError, LinkState, MailboxReceiver, encode_body};
use common::*;

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

fn numbered(range: std::ops::Range<u32>) -> Vec<Bytes> {
    range
        .map(|i| Bytes::from(encode_body(&i).unwrap()))
        .collect()
}

/// Receives `expected` in order on `node`, failing on anything else or after 5 s of silence.
fn expect_in_order(node: &TestNode, mailbox: &mut MailboxReceiver, expected: &[u32]) {
    node.block_on(async {
        for &want in expected {
            let d = tokio::time::timeout(Duration::from_secs(5), mailbox.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing after {want} was expected"))
                .unwrap();
            assert_eq!(d.decode::<u32>().unwrap(), want);
        }
    });
}

/// Nodes `a` and `b`, linked.
fn two_nodes() -> (TestNode, TestNode) {
    let pki = Pki::new();
    let specs = [spec("a", true), spec("b", true)];
    let a = TestNode::start(settings(&specs[0], &specs), pki.issue("a"));
    let b = TestNode::start(settings(&specs[1], &specs), pki.issue("b"));
    assert!(wait_for(Duration::from_secs(10), || both_up(&a, &b)));
    (a, b)
}

fn both_up(a: &TestNode, b: &TestNode) -> bool {
    [a, b].iter().all(|n| {
        n.cluster
            .link_stats()
            .iter()
            .all(|l| l.state != LinkState::Down)
    })
}

#[test]
fn batches_keep_order_with_single_sends() {
    let (a, b) = two_nodes();
    let mut inbox = b.cluster.registry().register("inbox", 64);

    // Batches of 1, a few, and many more than one 32 KiB chunk (max_frame is 64 KiB here),
    // between single sends; one batch has a 20 KB body that must travel in a chunk of its own.
    let cluster = a.cluster.clone();
    let sender = a.spawn(async move {
        let to = addr("b/inbox");
        let mut next = 0u32;
        for size in [1u32, 3, 5000, 2, 10_000] {
            cluster
                .send_batch(&to, None, numbered(next..next + size))
                .await
                .unwrap();
            next += size;
            cluster.send(&to, None, &next).await.unwrap();
            next += 1;
        }
        let mut bodies = numbered(next..next + 10);
        let bulky = (next + 4, serde_bytes::ByteBuf::from(vec![0u8; 20_000]));
        bodies[4] = Bytes::from(encode_body(&bulky).unwrap());
        cluster.send_batch(&to, None, bodies).await.unwrap();
        next + 10
    });
    let total = 5000 + 10_000 + 6 + 5;
    let expected: Vec<u32> = (0..total).collect();
    expect_in_order(&b, &mut inbox, &expected);
    let next = a.block_on(sender).unwrap();
    b.block_on(async {
        for i in next - 10..next {
            let d = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
                .await
                .unwrap()
                .unwrap();
            let got = match d.decode::<u32>() {
                Ok(n) => n,
                Err(_) => d.decode::<(u32, serde_bytes::ByteBuf)>().unwrap().0,
            };
            assert_eq!(got, i);
        }
    });
    let out = a.cluster.link_stats()[0].messages_out;
    assert!(out >= u64::from(next), "{out} messages counted out");
}

#[test]
fn a_body_too_large_stops_the_batch_where_it_is() {
    let (a, b) = two_nodes();
    let mut inbox = b.cluster.registry().register("inbox", 64);

    let to = addr("b/inbox");
    let mut bodies = numbered(0..4);
    bodies[2] = Bytes::from(vec![0x40; 70_000]);
    let r = a.block_on(a.cluster.send_batch(&to, None, bodies));
    assert!(
        matches!(&r, Err(CallError::Rejected(why)) if why.contains("frame limit")),
        "{r:?}"
    );
    a.block_on(a.cluster.send(&to, None, &9u32)).unwrap();
    expect_in_order(&b, &mut inbox, &[0, 1, 9]);
}

#[test]
fn batches_go_through_relays_and_to_local_actors_in_order() {
    let pki = Pki::new();
    let specs = [spec("hub", true), spec("n1", false), spec("n2", false)];
    let _hub = TestNode::start(settings(&specs[0], &specs), pki.issue("hub"));
    let n1 = TestNode::start(settings(&specs[1], &specs), pki.issue("n1"));
    let n2 = TestNode::start(settings(&specs[2], &specs), pki.issue("n2"));
    let mut far = n2.cluster.registry().register("inbox", 64);
    let mut near = n1.cluster.registry().register("inbox", 64);
    assert!(
        wait_for(Duration::from_secs(10), || {
            n1.cluster
                .link_stats()
                .iter()
                .any(|l| l.peer == "n2" && l.state == LinkState::Relayed)
        }),
        "relay did not form"
    );

    for (target, mailbox, node) in [("n2/inbox", &mut far, &n2), ("n1/inbox", &mut near, &n1)] {
        let cluster = n1.cluster.clone();
        let to = addr(target);
        let sender = n1.spawn(async move {
            for start in (0..6000).step_by(2000) {
                cluster
                    .send_batch(&to, None, numbered(start..start + 2000))
                    .await
                    .unwrap();
            }
        });
        let expected: Vec<u32> = (0..6000).collect();
        expect_in_order(node, mailbox, &expected);
        n1.block_on(sender).unwrap();
    }
}

#[test]
fn a_slow_receiver_pushes_back_on_batches() {
    let (a, b) = two_nodes();
    let _stuck = b.cluster.registry().register("stuck", 4);

    // Nobody reads "stuck": once its mailbox, the link's queue and QUIC's windows are full,
    // the sender waits instead of buffering without bound.
    let cluster = a.cluster.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    a.spawn(async move {
        let body = Bytes::from(encode_body(&vec![7u8; 1000]).unwrap());
        for _ in 0..100_000u32 {
            let batch = std::iter::repeat_n(body.clone(), 100);
            if cluster
                .send_batch(&addr("b/stuck"), None, batch)
                .await
                .is_err()
            {
                return;
            }
            counter.fetch_add(100, Ordering::Relaxed);
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let first = sent.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    let second = sent.load(Ordering::Relaxed);
    assert_eq!(first, second, "sender kept going");
    // A batch holds room in the link queue for each of its frames, as single sends do.
    assert!(
        first < 100_000,
        "{first} messages buffered for a receiver that reads nothing"
    );
}

#[test]
fn try_send_local_takes_only_what_fits_now_and_only_for_this_node() {
    let (a, b) = two_nodes();
    let mut inbox = a.cluster.registry().register("inbox", 2);
    let _far = b.cluster.registry().register("inbox", 8);
    let body = |i: u32| Bytes::from(encode_body(&i).unwrap());
    let from = addr("a/sender");

    // Room for two: the third is refused, not queued, and nothing waits.
    assert!(
        a.cluster
            .try_send_local(&addr("a/inbox"), Some(&from), body(1))
    );
    assert!(
        a.cluster
            .try_send_local(&addr("a/inbox"), Some(&from), body(2))
    );
    assert!(
        !a.cluster
            .try_send_local(&addr("a/inbox"), Some(&from), body(3))
    );
    // No such actor here, and an actor on another node: refused.
    assert!(!a.cluster.try_send_local(&addr("a/nobody"), None, body(4)));
    assert!(!a.cluster.try_send_local(&addr("b/inbox"), None, body(5)));

    a.block_on(async {
        let first = inbox.recv().await.unwrap();
        assert_eq!(first.from.as_ref(), Some(&from));
        assert_eq!(first.decode::<u32>().unwrap(), 1);
    });
    // Room again after one was read.
    assert!(a.cluster.try_send_local(&addr("a/inbox"), None, body(6)));
    expect_in_order(&a, &mut inbox, &[2, 6]);
    a.block_on(async {
        let more = tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await;
        assert!(more.is_err(), "nothing else was taken");
    });
}
