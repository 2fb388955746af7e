//! Nodes on loopback: full mesh, refused certificates, failure detection and rejoin, relays,
//! bad frames, datagrams, order and back-pressure.

mod common;

use std::time::{Duration, Instant};

use colony_cluster::{Address, CallError, LinkState, NodeEvent};
use common::*;

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

fn all_up(nodes: &[&TestNode], peers: usize) -> bool {
    nodes.iter().all(|n| {
        n.cluster
            .link_stats()
            .iter()
            .filter(|l| l.state != LinkState::Down)
            .count()
            == peers
    })
}

#[test]
fn three_nodes_form_a_mesh_and_reach_every_actor() {
    let pki = Pki::new();
    let specs = [spec("a", true), spec("b", true), spec("c", true)];
    let nodes: Vec<TestNode> = specs
        .iter()
        .map(|s| TestNode::start(settings(s, &specs), pki.issue(&s.name)))
        .collect();
    let mut inboxes: Vec<_> = nodes.iter().map(|n| echo_actor(n, "echo")).collect();
    let refs: Vec<&TestNode> = nodes.iter().collect();
    assert!(
        wait_for(Duration::from_secs(10), || all_up(&refs, 2)),
        "mesh did not form"
    );
    for from in &nodes {
        for (i, to) in specs.iter().enumerate() {
            let target = addr(&format!("{}/echo", to.name));
            let me = from.cluster.node_name().to_owned();
            let reply: String = from
                .block_on(
                    from.cluster
                        .call(&target, None, &format!("hi from {me}"), None),
                )
                .unwrap_or_else(|e| panic!("{me} -> {target}: {e}"));
            assert_eq!(reply, format!("{}:hi from {me}", to.name));
            from.block_on(from.cluster.send(&target, None, &format!("note from {me}")))
                .unwrap();
            let got = nodes[i].block_on(async {
                tokio::time::timeout(Duration::from_secs(5), inboxes[i].recv()).await
            });
            assert_eq!(got.unwrap().unwrap(), format!("note from {me}"));
        }
    }
    for n in &nodes {
        for l in n.cluster.link_stats() {
            assert_eq!(
                n.cluster.link_generation(&l.peer),
                Some((l.state, l.since_unix_ms))
            );
            assert_eq!(l.state, LinkState::Up);
            assert!(
                l.rtt_us > 0 && l.messages_out > 0 && l.bytes_in > 0,
                "{l:?}"
            );
        }
    }
}

#[test]
fn calls_to_missing_actors_and_nodes_fail_with_typed_errors() {
    let pki = Pki::new();
    let specs = [spec("a", true), spec("b", true)];
    let a = TestNode::start(settings(&specs[0], &specs), pki.issue("a"));
    let b = TestNode::start(settings(&specs[1], &specs), pki.issue("b"));
    let _echo = echo_actor(&b, "echo");
    assert!(wait_for(Duration::from_secs(10), || all_up(&[&a, &b], 1)));
    let r: Result<String, _> = a.block_on(a.cluster.call(&addr("b/nobody"), None, "x", None));
    assert_eq!(r, Err(CallError::NoSuchActor("b/nobody".into())));
    let r: Result<String, _> = a.block_on(a.cluster.call(&addr("a/nobody"), None, "x", None));
    assert_eq!(r, Err(CallError::NoSuchActor("a/nobody".into())));
    let started = Instant::now();
    let r: Result<String, _> = a.block_on(a.cluster.call(&addr("zz/echo"), None, "x", None));
    assert_eq!(r, Err(CallError::NodeDown("zz".into())));
    assert!(started.elapsed() < Duration::from_millis(100));
    // A body the actor cannot decode is rejected with the reason.
    let r: Result<String, _> = a.block_on(a.cluster.call(&addr("b/echo"), None, &42u32, None));
    assert!(
        matches!(r, Err(CallError::Rejected(ref why)) if why.contains("does not fit")),
        "{r:?}"
    );
    // An actor that never answers makes the call time out, promptly.
    let _silent = b.cluster.registry().register("silent", 8);
    let started = Instant::now();
    let r: Result<String, _> = a.block_on(a.cluster.call(
        &addr("b/silent"),
        None,
        "x",
        Some(Duration::from_millis(200)),
    ));
    assert_eq!(r, Err(CallError::Timeout(200)));
    assert!(started.elapsed() < Duration::from_millis(600));
}

#[test]
fn a_killed_node_is_reported_down_within_the_bound_and_rejoins() {
    let pki = Pki::new();
    let specs = [spec("a", true), spec("b", true)];
    let a = TestNode::start(settings(&specs[0], &specs), pki.issue("a"));
    let b = TestNode::start(settings(&specs[1], &specs), pki.issue("b"));
    let _echo = echo_actor(&b, "echo");
    assert!(wait_for(Duration::from_secs(10), || all_up(&[&a, &b], 1)));
    let mut events = a.cluster.subscribe();

    drop(b);
    let killed = Instant::now();
    let down = a.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), events.recv()).await {
                Ok(Ok(NodeEvent::Down { node, .. })) if node == "b" => {
                    return Some(killed.elapsed());
                }
                Ok(Ok(_)) => continue,
                _ => return None,
            }
        }
    });
    let down = down.expect("no NodeDown for b");
    // failure timeout is 300 ms; allow scheduling slack on a loaded machine.
    assert!(down < Duration::from_millis(900), "NodeDown after {down:?}");
    let started = Instant::now();
    let r: Result<String, _> = a.block_on(a.cluster.call(&addr("b/echo"), None, "x", None));
    assert_eq!(r, Err(CallError::NodeDown("b".into())));
    assert!(started.elapsed() < Duration::from_millis(50));

    // Restart b on the same address: the link and delivery come back.
    let b2 = TestNode::restart(settings(&specs[1], &specs), pki.issue("b"));
    let _echo2 = echo_actor(&b2, "echo");
    assert!(
        wait_for(Duration::from_secs(10), || all_up(&[&a, &b2], 1)),
        "b did not rejoin"
    );
    let r: String = a
        .block_on(a.cluster.call(&addr("b/echo"), None, "back", None))
        .unwrap();
    assert_eq!(r, "b:back");
}

#[test]
fn dial_only_nodes_talk_through_a_relay() {
    let pki = Pki::new();
    let specs = [spec("hub", true), spec("n1", false), spec("n2", false)];
    let mut hub = TestNode::start(settings(&specs[0], &specs), pki.issue("hub"));
    let n1 = TestNode::start(settings(&specs[1], &specs), pki.issue("n1"));
    let n2 = TestNode::start(settings(&specs[2], &specs), pki.issue("n2"));
    let _e = [
        echo_actor(&hub, "echo"),
        echo_actor(&n1, "echo"),
        echo_actor(&n2, "echo"),
    ];
    assert!(
        wait_for(Duration::from_secs(10), || all_up(&[&hub, &n1, &n2], 2)),
        "relay did not form"
    );

    let l = n1
        .cluster
        .link_stats()
        .into_iter()
        .find(|l| l.peer == "n2")
        .unwrap();
    assert_eq!(
        (l.state, l.via.as_deref()),
        (LinkState::Relayed, Some("hub"))
    );
    assert_eq!(
        n1.cluster.link_generation("n2"),
        Some((LinkState::Relayed, l.since_unix_ms))
    );
    assert_eq!(n1.cluster.link_generation("nowhere"), None);
    let l = n1
        .cluster
        .link_stats()
        .into_iter()
        .find(|l| l.peer == "hub")
        .unwrap();
    assert_eq!(l.state, LinkState::Up);
    // The hub has no direct or relayed route between the two: it just forwards.
    assert!(
        hub.cluster
            .link_stats()
            .iter()
            .all(|l| l.state == LinkState::Up)
    );

    for (from, to) in [(&n1, "n2"), (&n2, "n1"), (&n1, "hub"), (&hub, "n2")] {
        let r: String = from
            .block_on(
                from.cluster
                    .call(&addr(&format!("{to}/echo")), None, "ping", None),
            )
            .unwrap();
        assert_eq!(r, format!("{to}:ping"));
    }
    let mut inbox = echo_actor(&n2, "inbox");
    for i in 0..100 {
        n1.block_on(n1.cluster.send(&addr("n2/inbox"), None, &format!("m{i}")))
            .unwrap();
    }
    for i in 0..100 {
        let got =
            n2.block_on(async { tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await });
        assert_eq!(got.unwrap().unwrap(), format!("m{i}"));
    }

    hub.crash();
    assert!(
        wait_for(Duration::from_secs(3), || !n1.cluster.is_up("n2")),
        "relayed link stayed up"
    );
    let started = Instant::now();
    let r: Result<String, _> = n1.block_on(n1.cluster.call(&addr("n2/echo"), None, "x", None));
    assert_eq!(r, Err(CallError::NodeDown("n2".into())));
    assert!(started.elapsed() < Duration::from_millis(50));
}

#[test]
fn datagrams_carry_1400_byte_payloads() {
    let pki = Pki::new();
    let specs = [spec("a", true), spec("b", true)];
    let a = TestNode::start(settings(&specs[0], &specs), pki.issue("a"));
    let b = TestNode::start(settings(&specs[1], &specs), pki.issue("b"));
    let mut inbox = b.cluster.registry().register_datagrams("tun", 64);
    assert!(wait_for(Duration::from_secs(10), || all_up(&[&a, &b], 1)));
    let max = a.cluster.max_datagram_payload("b", "tun").unwrap();
    assert!(max >= 1400, "max datagram payload {max}");
    let payload = vec![0xAB; 1400];
    let got = a.block_on(async {
        for _ in 0..50 {
            a.cluster.send_datagram(&addr("b/tun"), &payload).unwrap();
            if let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(100), inbox.recv()).await
            {
                return Some(d);
            }
        }
        None
    });
    let d = got.expect("no datagram arrived");
    assert_eq!(&*d.from_node, "a");
    assert_eq!(d.payload.len(), 1400);
    let too_big = vec![0u8; 70_000];
    assert!(a.cluster.send_datagram(&addr("b/tun"), &too_big).is_err());
}

#[test]
fn order_is_kept_and_a_slow_receiver_pushes_back() {
    let pki = Pki::new();
    let specs = [spec("a", true), spec("b", true)];
    let a = TestNode::start(settings(&specs[0], &specs), pki.issue("a"));
    let b = TestNode::start(settings(&specs[1], &specs), pki.issue("b"));
    let mut ordered = b.cluster.registry().register("ordered", 16);
    let _stuck = b.cluster.registry().register("stuck", 4);
    assert!(wait_for(Duration::from_secs(10), || all_up(&[&a, &b], 1)));

    let cluster = a.cluster.clone();
    let sender = a.spawn(async move {
        for i in 0u32..5000 {
            cluster
                .send(&"b/ordered".parse().unwrap(), None, &i)
                .await
                .unwrap();
        }
    });
    b.block_on(async {
        for i in 0u32..5000 {
            let d = tokio::time::timeout(Duration::from_secs(5), ordered.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.decode::<u32>().unwrap(), i);
        }
    });
    a.block_on(sender).unwrap();

    // Nobody reads "stuck": once its mailbox, the link's queue and QUIC's windows are full,
    // the sender waits instead of buffering without bound.
    let cluster = a.cluster.clone();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    a.spawn(async move {
        let body = vec![7u8; 1000];
        for _ in 0..1_000_000u32 {
            if cluster
                .send(&"b/stuck".parse().unwrap(), None, &body)
                .await
                .is_err()
            {
                return;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // The count must stop growing (on a busy machine filling the windows takes a while): two
    // readings 500 ms apart that agree, within 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = u64::MAX;
    let stopped = loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = sent.load(std::sync::atomic::Ordering::Relaxed);
        if now == last {
            break Some(now);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        last = now;
    };
    let first = stopped.expect("the sender kept going for 30 s");
    assert!(
        first < 100_000,
        "{first} messages buffered for a receiver that reads nothing"
    );
}
