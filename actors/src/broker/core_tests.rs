use super::*;
use crate::broker::codec::next_packet;
use bytes::BytesMut;
use colony_config::kinds::{AclAccess, AclRule};
use rumqttc::mqttbytes::v4::{LastWill, Subscribe, SubscribeFilter, Unsubscribe};

fn core() -> BrokerCore {
    BrokerCore::new(
        AccessPolicy::new(true, vec![], vec![]),
        BrokerLimits::default(),
        Restored::default(),
    )
}

fn connect(c: &mut BrokerCore, conn: ConnId, id: &str, clean: bool) -> Vec<Action> {
    let mut p = Connect::new(id);
    p.clean_session = clean;
    c.connect(conn, p);
    c.take_actions()
}

fn sub(c: &mut BrokerCore, conn: ConnId, filter: &str, qos: QoS) -> Vec<Action> {
    c.packet(
        conn,
        Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter::new(filter.into(), qos)],
        }),
    );
    c.take_actions()
}

fn publish(c: &mut BrokerCore, conn: ConnId, topic: &str, qos: QoS, pkid: u16) -> Vec<Action> {
    let mut p = Publish::new(topic, qos, b"x".to_vec());
    p.pkid = pkid;
    c.packet(conn, Packet::Publish(p));
    c.take_actions()
}

fn publishes_to(actions: &[Action], conn: ConnId) -> Vec<(String, u8, u16)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(c, Packet::Publish(p)) if *c == conn => {
                Some((p.topic.clone(), p.qos as u8, p.pkid))
            }
            _ => None,
        })
        .collect()
}

fn connack(actions: &[Action]) -> Option<(ConnectReturnCode, bool)> {
    actions.iter().find_map(|a| match a {
        Action::Send(_, Packet::ConnAck(c)) => Some((c.code, c.session_present)),
        _ => None,
    })
}

#[test]
fn connect_subscribe_publish_at_each_qos() {
    let mut c = core();
    assert_eq!(
        connack(&connect(&mut c, 1, "sub", true)),
        Some((ConnectReturnCode::Success, false))
    );
    connect(&mut c, 2, "pub", true);
    sub(&mut c, 1, "a/+", QoS::AtLeastOnce);
    let a = publish(&mut c, 2, "a/b", QoS::AtMostOnce, 0);
    assert_eq!(publishes_to(&a, 1), [("a/b".into(), 0, 0)]);
    let a = publish(&mut c, 2, "a/b", QoS::AtLeastOnce, 5);
    assert_eq!(publishes_to(&a, 1), [("a/b".into(), 1, 1)]);
    assert!(a.contains(&Action::Send(2, Packet::PubAck(PubAck::new(5)))));
    // QoS 2 in, downgraded to the subscription's QoS 1 out.
    let a = publish(&mut c, 2, "a/b", QoS::ExactlyOnce, 6);
    assert_eq!(publishes_to(&a, 1), [("a/b".into(), 1, 2)]);
    assert!(a.contains(&Action::Send(2, Packet::PubRec(PubRec::new(6)))));
    // A duplicate QoS 2 before PUBREL is acknowledged but not routed again.
    let a = publish(&mut c, 2, "a/b", QoS::ExactlyOnce, 6);
    assert!(publishes_to(&a, 1).is_empty());
    c.packet(2, Packet::PubRel(PubRel::new(6)));
    assert_eq!(
        c.take_actions(),
        [Action::Send(2, Packet::PubComp(PubComp::new(6)))]
    );
    assert_eq!(c.counters().messages_in, 4);
}

#[test]
fn persistent_session_queues_while_offline_and_resends_in_flight() {
    let mut c = core();
    connect(&mut c, 1, "p", false);
    sub(&mut c, 1, "t", QoS::AtLeastOnce);
    connect(&mut c, 2, "pub", true);
    let a = publish(&mut c, 2, "t", QoS::AtLeastOnce, 1);
    assert_eq!(publishes_to(&a, 1), [("t".into(), 1, 1)]);
    c.closed(1);
    publish(&mut c, 2, "t", QoS::AtLeastOnce, 2);
    publish(&mut c, 2, "t", QoS::AtMostOnce, 0);
    let ops = c.take_store_ops();
    assert!(
        ops.iter()
            .any(|o| matches!(o, StoreOp::SaveSession { client_id, .. } if client_id == "p"))
    );
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, StoreOp::PutMessage { .. }))
            .count(),
        2
    );
    let a = connect(&mut c, 3, "p", false);
    assert_eq!(connack(&a), Some((ConnectReturnCode::Success, true)));
    // The unacknowledged one again (DUP), then the queued one; the QoS 0 one was not kept.
    let sent: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send(3, Packet::Publish(p)) => Some((p.pkid, p.dup)),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [(1, true), (2, false)]);
    c.packet(3, Packet::PubAck(PubAck::new(1)));
    assert!(
        c.take_store_ops()
            .iter()
            .any(|o| matches!(o, StoreOp::DeleteMessage { .. }))
    );
}

#[test]
fn clean_session_ends_with_its_connection() {
    let mut c = core();
    connect(&mut c, 1, "c", true);
    sub(&mut c, 1, "t", QoS::AtLeastOnce);
    assert_eq!(c.subscriptions(), 1);
    c.closed(1);
    assert_eq!(c.subscriptions(), 0);
    assert_eq!(c.sessions(), 0);
    assert!(
        c.take_store_ops().is_empty(),
        "clean sessions never touch the disk"
    );
}

#[test]
fn takeover_closes_the_old_connection_and_publishes_its_will() {
    let mut c = core();
    connect(&mut c, 9, "watcher", true);
    sub(&mut c, 9, "will/#", QoS::AtMostOnce);
    let mut p = Connect::new("dev");
    p.last_will = Some(LastWill::new("will/dev", "gone", QoS::AtMostOnce, false));
    c.connect(1, p);
    c.take_actions();
    let a = connect(&mut c, 2, "dev", true);
    assert!(a.contains(&Action::Close(1)));
    assert_eq!(publishes_to(&a, 9), [("will/dev".into(), 0, 0)]);
    assert_eq!(c.connections(), 2);
    // The old connection's late close changes nothing.
    c.closed(1);
    assert_eq!(c.connections(), 2);
    // DISCONNECT discards the will.
    let mut p = Connect::new("polite");
    p.last_will = Some(LastWill::new("will/polite", "gone", QoS::AtMostOnce, false));
    c.connect(3, p);
    c.packet(3, Packet::Disconnect);
    c.closed(3);
    assert!(publishes_to(&c.take_actions(), 9).is_empty());
}

#[test]
fn retained_messages_go_to_new_subscribers() {
    let mut c = core();
    connect(&mut c, 1, "pub", true);
    let mut p = Publish::new("r/1", QoS::AtLeastOnce, b"kept".to_vec());
    p.retain = true;
    p.pkid = 1;
    c.packet(1, Packet::Publish(p));
    c.take_actions();
    assert!(matches!(c.take_store_ops()[..], [StoreOp::PutRetained(_)]));
    connect(&mut c, 2, "sub", true);
    let a = sub(&mut c, 2, "r/#", QoS::AtMostOnce);
    let got = a.iter().find_map(|x| match x {
        Action::Send(2, Packet::Publish(p)) => Some((p.retain, p.qos)),
        _ => None,
    });
    assert_eq!(got, Some((true, QoS::AtMostOnce)));
}

#[test]
fn shared_subscriptions_deliver_to_one_member_in_turn() {
    let mut c = core();
    connect(&mut c, 1, "w1", true);
    connect(&mut c, 2, "w2", true);
    connect(&mut c, 3, "pub", true);
    sub(&mut c, 1, "$share/g/jobs/+", QoS::AtMostOnce);
    sub(&mut c, 2, "$share/g/jobs/+", QoS::AtMostOnce);
    let mut counts = [0, 0];
    for _ in 0..4 {
        let a = publish(&mut c, 3, "jobs/x", QoS::AtMostOnce, 0);
        counts[0] += publishes_to(&a, 1).len();
        counts[1] += publishes_to(&a, 2).len();
    }
    assert_eq!(counts, [2, 2]);
}

#[test]
fn acl_denials_are_counted_and_login_failures_refused() {
    let hash = crate::broker::hash_password("pw").unwrap();
    let users = vec![colony_config::kinds::BrokerUser {
        name: "u".into(),
        password_hash: hash,
    }];
    let rules = vec![AclRule {
        user: None,
        topic: "own/%u/#".into(),
        access: AclAccess::Readwrite,
    }];
    let mut c = BrokerCore::new(
        AccessPolicy::new(false, users, rules),
        BrokerLimits::default(),
        Restored::default(),
    );
    let a = connect(&mut c, 1, "anon", true);
    assert_eq!(connack(&a).unwrap().0, ConnectReturnCode::NotAuthorized);
    assert!(a.contains(&Action::Close(1)));
    let mut p = Connect::new("x");
    p.set_login("u", "bad");
    c.connect(2, p);
    assert_eq!(
        connack(&c.take_actions()).unwrap().0,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(c.counters().auth_failures, 2);
    let mut p = Connect::new("x");
    p.set_login("u", "pw");
    c.connect(3, p);
    assert_eq!(
        connack(&c.take_actions()).unwrap().0,
        ConnectReturnCode::Success
    );
    let a = sub(&mut c, 3, "own/other/#", QoS::AtMostOnce);
    assert!(a.iter().any(|x| matches!(x, Action::Send(3, Packet::SubAck(s)) if s.return_codes == [SubscribeReasonCode::Failure])));
    sub(&mut c, 3, "own/u/#", QoS::AtMostOnce);
    assert!(publishes_to(&publish(&mut c, 3, "own/other/x", QoS::AtMostOnce, 0), 3).is_empty());
    assert_eq!(
        publishes_to(&publish(&mut c, 3, "own/u/x", QoS::AtMostOnce, 0), 3).len(),
        1
    );
    assert_eq!(c.counters().denied, 2);
}

#[test]
fn limits_on_connections_and_queues() {
    let mut c = BrokerCore::new(
        AccessPolicy::new(true, vec![], vec![]),
        BrokerLimits {
            max_connections: 2,
            max_inflight: 1,
            max_queued: 1,
            ..BrokerLimits::default()
        },
        Restored::default(),
    );
    connect(&mut c, 1, "a", true);
    connect(&mut c, 2, "b", true);
    let a = connect(&mut c, 3, "c", true);
    assert_eq!(
        connack(&a).unwrap().0,
        ConnectReturnCode::ServiceUnavailable
    );
    sub(&mut c, 1, "t", QoS::AtLeastOnce);
    for pid in 1..=3 {
        publish(&mut c, 2, "t", QoS::AtLeastOnce, pid);
    }
    // One in flight, one queued, one dropped.
    assert_eq!(c.counters().dropped, 1);
    assert_eq!(c.queued(), 1);
}

#[test]
fn protocol_violations_close_only_that_connection() {
    let mut c = core();
    connect(&mut c, 1, "a", true);
    connect(&mut c, 2, "b", true);
    c.connect(1, Connect::new("a"));
    assert!(c.take_actions().contains(&Action::Close(1)));
    let a = publish(&mut c, 2, "bad/+/topic", QoS::AtMostOnce, 0);
    assert!(a.contains(&Action::Close(2)));
    assert_eq!(c.connections(), 0);
    assert_eq!(c.counters().protocol_errors, 2);
    // Packets from a connection the core no longer knows are ignored.
    c.packet(2, Packet::PingReq);
    assert!(c.take_actions().is_empty());
    c.packet(7, Packet::Unsubscribe(Unsubscribe::new("x")));
    assert!(c.take_actions().is_empty());
}

fn qos(q: u8) -> SubOptions {
    SubOptions::from(q)
}

/// The notices in `actions`: (to, topic, id, dup).
fn notices(actions: &[Action]) -> Vec<(String, String, Option<u64>, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify {
                to,
                message,
                id,
                dup,
            } => Some((to.to_string(), message.topic.clone(), *id, *dup)),
            _ => None,
        })
        .collect()
}

fn actor_publish(c: &mut BrokerCore, from: &str, topic: &str, qos: u8) -> ActorPublish {
    c.publish(
        Message {
            origin: Some(Subscriber::Actor(from.into())),
            ..Message::new(topic, Bytes::from_static(b"v"), qos, false)
        },
        None,
    )
}

#[test]
fn actor_subscribers_get_notices_and_can_publish() {
    let mut c = core();
    assert_eq!(
        c.actor_subscribe("n/collector", &["s/#".into(), "bad/#/x".into()], qos(0)),
        [Some(0), None]
    );
    assert_eq!(actor_publish(&mut c, "n/x", "s/1", 1), ActorPublish::Routed);
    let a = c.take_actions();
    assert_eq!(
        notices(&a),
        [("n/collector".into(), "s/1".into(), None, false)]
    );
    assert_eq!(
        actor_publish(&mut c, "n/x", "s/+", 0),
        ActorPublish::InvalidTopic
    );
    c.actor_unsubscribe("n/collector", &[]);
    assert_eq!(c.subscriptions(), 0);
}

#[test]
fn actor_notices_at_qos1_are_kept_until_acked_windowed_and_redelivered() {
    let limits = BrokerLimits {
        max_inflight: 2,
        max_queued: 2,
        ..BrokerLimits::default()
    };
    let mut c = BrokerCore::new(
        AccessPolicy::new(true, vec![], vec![]),
        limits,
        Restored::default(),
    );
    c.actor_subscribe("n/c", &["s/#".into()], qos(1));
    for i in 0..5 {
        actor_publish(&mut c, "n/p", &format!("s/{i}"), 1);
    }
    let a = c.take_actions();
    let n = notices(&a);
    // Two in flight with ids, two queued, one dropped and counted.
    assert_eq!(n.len(), 2);
    let (id0, id1) = (n[0].2.unwrap(), n[1].2.unwrap());
    assert!(id1 > id0);
    assert_eq!(c.queued(), 2);
    assert_eq!(c.counters().dropped, 1);
    let ops = c.take_store_ops();
    let puts = ops
        .iter()
        .filter(|o| matches!(o, StoreOp::PutActorMessage { .. }))
        .count();
    assert_eq!(puts, 4);
    // The ack frees the window: the next queued goes out, in order.
    c.actor_ack("n/c", &[id0]);
    let n = notices(&c.take_actions());
    assert_eq!(n.len(), 1);
    assert_eq!((n[0].1.as_str(), n[0].3), ("s/2", false));
    assert!(c.take_store_ops().iter().any(
        |o| matches!(o, StoreOp::DeleteActorMessage { address, id } if address == "n/c" && *id == id0)
    ));
    // Unacked for the redelivery timeout: sent again, marked dup, in order.
    for _ in 0..ACTOR_REDELIVER_TICKS - 1 {
        c.actor_tick();
    }
    assert!(c.take_actions().is_empty());
    c.actor_tick();
    let n = notices(&c.take_actions());
    assert_eq!(
        n.iter().map(|x| (x.1.as_str(), x.3)).collect::<Vec<_>>(),
        [("s/1", true), ("s/2", true)]
    );
    // Subscribing again is a reconnect: what is in flight goes again at once.
    c.actor_subscribe("n/c", &["s/#".into()], qos(1));
    let n = notices(&c.take_actions());
    assert_eq!(
        n.iter().map(|x| (x.1.as_str(), x.3)).collect::<Vec<_>>(),
        [("s/1", true), ("s/2", true)]
    );
}

#[test]
fn actor_queue_and_subscription_survive_a_restart() {
    let mut c = core();
    c.actor_subscribe("n/c", &["s/#".into()], qos(1));
    actor_publish(&mut c, "n/p", "s/a", 1);
    actor_publish(&mut c, "n/p", "s/b", 2);
    let n = notices(&c.take_actions());
    let ops = c.take_store_ops();
    c.actor_ack("n/c", &[n[0].2.unwrap()]);
    let ops2 = c.take_store_ops();
    // Replay the store ops into a fresh store and restart from it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.sqlite");
    let mut store = crate::broker::store::BrokerStore::open(&path).unwrap();
    store.apply(&ops).unwrap();
    store.apply(&ops2).unwrap();
    let restored = store.load().unwrap();
    let mut c = BrokerCore::new(
        AccessPolicy::new(true, vec![], vec![]),
        BrokerLimits::default(),
        restored,
    );
    c.start();
    let again = notices(&c.take_actions());
    assert_eq!(again, [("n/c".into(), "s/b".into(), n[1].2, true)]);
    // New ids never reuse old ones.
    actor_publish(&mut c, "n/p", "s/c", 1);
    let fresh = notices(&c.take_actions());
    assert!(fresh[0].2.unwrap() > n[1].2.unwrap());
}

#[test]
fn no_local_hops_and_streams() {
    let mut c = core();
    let opts = SubOptions {
        qos: 1,
        no_local: true,
        ..SubOptions::default()
    };
    c.actor_subscribe("n/bridge", &["x/#".into()], opts);
    c.actor_subscribe("n/other", &["x/#".into()], qos(0));
    // Its own publish does not come back to it; others get it, hops untouched.
    let m = Message {
        origin: Some(Subscriber::Actor("n/bridge".into())),
        hops: vec!["site-a".into()],
        ..Message::new("x/1", Bytes::from_static(b"v"), 1, false)
    };
    assert_eq!(c.publish(m, None), ActorPublish::Routed);
    let a = c.take_actions();
    assert_eq!(notices(&a).len(), 1);
    assert!(
        matches!(&a[0], Action::Notify { to, message, .. } if &**to == "n/other" && message.hops == ["site-a"])
    );
    actor_publish(&mut c, "n/else", "x/2", 1);
    assert_eq!(notices(&c.take_actions()).len(), 2);
    // A stream's repeated seq is acknowledged but not routed again.
    let m = || Message::new("x/3", Bytes::from_static(b"v"), 1, false);
    assert_eq!(c.publish(m(), Some(("s1".into(), 5))), ActorPublish::Routed);
    assert_eq!(
        c.publish(m(), Some(("s1".into(), 5))),
        ActorPublish::Duplicate
    );
    assert_eq!(
        c.publish(m(), Some(("s1".into(), 4))),
        ActorPublish::Duplicate
    );
    assert_eq!(c.publish(m(), Some(("s2".into(), 0))), ActorPublish::Routed);
    assert_eq!(c.publish(m(), Some(("s1".into(), 6))), ActorPublish::Routed);
    assert_eq!(notices(&c.take_actions()).len(), 6);
    assert!(c.take_store_ops().contains(&StoreOp::PutStream {
        id: "s1".into(),
        seq: 6
    }));
}

#[test]
fn declared_subscriptions_are_idempotent() {
    let mut c = core();
    c.publish(
        Message::new("d/r", Bytes::from_static(b"kept"), 1, true),
        None,
    );
    c.take_actions();
    c.ensure_actor_subscription("n/c", &["d/#".into()], qos(1));
    assert_eq!(
        notices(&c.take_actions()).len(),
        1,
        "retained on first creation"
    );
    assert!(!c.take_store_ops().is_empty());
    c.ensure_actor_subscription("n/c", &["d/#".into()], qos(1));
    assert!(c.take_actions().is_empty());
    assert!(c.take_store_ops().is_empty());
}

/// Fuzz-style: garbage byte streams framed and fed to the core on several connections never
/// panic, and leave the core able to serve a well-behaved client.
#[test]
fn garbage_streams_never_panic_the_core() {
    let mut c = core();
    let mut x: u64 = 0xDEAD_BEEF_CAFE_F00D;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Seeds: valid packets, mutated.
    let mut seeds = Vec::new();
    for p in [
        Packet::Connect(Connect::new("fz")),
        Packet::Publish(Publish::new("a/b", QoS::ExactlyOnce, b"p".to_vec())),
        Packet::Subscribe(Subscribe::new("a/#", QoS::AtLeastOnce)),
        Packet::PubRel(PubRel::new(1)),
        Packet::Unsubscribe(Unsubscribe::new("a/#")),
    ] {
        let mut b = BytesMut::new();
        if let Packet::Publish(mut pb) = p.clone() {
            pb.pkid = 1;
            Packet::Publish(pb).write(&mut b, usize::MAX).unwrap();
        } else {
            p.write(&mut b, usize::MAX).unwrap();
        }
        seeds.push(b.to_vec());
    }
    for conn in 100..3_000u64 {
        let mut stream = Vec::new();
        for _ in 0..(rnd() % 4 + 1) {
            let mut s = seeds[(rnd() % seeds.len() as u64) as usize].clone();
            for _ in 0..(rnd() % 3) {
                let i = (rnd() % s.len() as u64) as usize;
                s[i] = rnd() as u8;
            }
            stream.extend(s);
        }
        let mut buf = BytesMut::from(&stream[..]);
        let mut first = true;
        while let Ok(Some(p)) = next_packet(&mut buf, 1024) {
            match (first, p) {
                (true, Packet::Connect(cp)) => c.connect(conn, cp),
                (true, _) => break,
                (false, p) => c.packet(conn, p),
            }
            first = false;
        }
        c.closed(conn);
        c.take_actions();
        c.take_store_ops();
    }
    assert_eq!(c.connections(), 0);
    connect(&mut c, 1, "ok", true);
    sub(&mut c, 1, "z", QoS::AtMostOnce);
    assert_eq!(
        publishes_to(&publish(&mut c, 1, "z", QoS::AtMostOnce, 0), 1).len(),
        1
    );
}
