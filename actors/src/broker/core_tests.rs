use super::*;
use crate::broker::codec::{Decoder, connect_v4, from_v4, to_v4};
use bytes::BytesMut;
use colony_config::kinds::{AclAccess, AclRule};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, PubRel, Publish, Subscribe,
    SubscribeReasonCode, Unsubscribe,
};

type Connect = rumqttc::mqttbytes::v4::Connect;

/// An action with its packet as 3.1.1 would send it.
#[derive(Debug, Clone, PartialEq)]
enum A {
    Send(ConnId, Packet),
    Close(ConnId),
    Other(Action),
}

fn take4(c: &mut BrokerCore) -> Vec<A> {
    c.take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Send(conn, p) => to_v4(p).map(|p| A::Send(conn, p)),
            Action::Close(conn) => Some(A::Close(conn)),
            other => Some(A::Other(other)),
        })
        .collect()
}

fn pkt(c: &mut BrokerCore, conn: ConnId, p: Packet) {
    c.packet(conn, from_v4(p));
}

fn conn4(c: &mut BrokerCore, conn: ConnId, p: Connect) {
    c.connect(conn, connect_v4(p));
}

fn core() -> BrokerCore {
    BrokerCore::new(
        AccessPolicy::new(true, vec![], vec![]),
        BrokerLimits::default(),
        Restored::default(),
    )
}

fn connect(c: &mut BrokerCore, conn: ConnId, id: &str, clean: bool) -> Vec<A> {
    let mut p = Connect::new(id);
    p.clean_session = clean;
    conn4(c, conn, p);
    take4(c)
}

fn sub(c: &mut BrokerCore, conn: ConnId, filter: &str, qos: QoS) -> Vec<A> {
    pkt(c, conn, Packet::Subscribe(Subscribe::new(filter, qos)));
    take4(c)
}

fn publish(c: &mut BrokerCore, conn: ConnId, topic: &str, qos: QoS, pkid: u16) -> Vec<A> {
    let mut p = Publish::new(topic, qos, b"x".to_vec());
    p.pkid = pkid;
    pkt(c, conn, Packet::Publish(p));
    take4(c)
}

fn publishes_to(actions: &[A], conn: ConnId) -> Vec<(String, u8, u16)> {
    actions
        .iter()
        .filter_map(|a| match a {
            A::Send(c, Packet::Publish(p)) if *c == conn => {
                Some((p.topic.clone(), p.qos as u8, p.pkid))
            }
            _ => None,
        })
        .collect()
}

fn connack(actions: &[A]) -> Option<(ConnectReturnCode, bool)> {
    actions.iter().find_map(|a| match a {
        A::Send(_, Packet::ConnAck(c)) => Some((c.code, c.session_present)),
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
    assert!(a.contains(&A::Send(2, Packet::PubAck(PubAck::new(5)))));
    // QoS 2 in, downgraded to the subscription's QoS 1 out.
    let a = publish(&mut c, 2, "a/b", QoS::ExactlyOnce, 6);
    assert_eq!(publishes_to(&a, 1), [("a/b".into(), 1, 2)]);
    assert!(a.contains(&A::Send(2, Packet::PubRec(PubRec::new(6)))));
    // A duplicate QoS 2 before PUBREL is acknowledged but not routed again.
    let a = publish(&mut c, 2, "a/b", QoS::ExactlyOnce, 6);
    assert!(publishes_to(&a, 1).is_empty());
    pkt(&mut c, 2, Packet::PubRel(PubRel::new(6)));
    assert_eq!(
        take4(&mut c),
        [A::Send(2, Packet::PubComp(PubComp::new(6)))]
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
            A::Send(3, Packet::Publish(p)) => Some((p.pkid, p.dup)),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [(1, true), (2, false)]);
    pkt(&mut c, 3, Packet::PubAck(PubAck::new(1)));
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
    conn4(&mut c, 1, p);
    take4(&mut c);
    let a = connect(&mut c, 2, "dev", true);
    assert!(a.contains(&A::Close(1)));
    assert_eq!(publishes_to(&a, 9), [("will/dev".into(), 0, 0)]);
    assert_eq!(c.connections(), 2);
    // The old connection's late close changes nothing.
    c.closed(1);
    assert_eq!(c.connections(), 2);
    // DISCONNECT discards the will.
    let mut p = Connect::new("polite");
    p.last_will = Some(LastWill::new("will/polite", "gone", QoS::AtMostOnce, false));
    conn4(&mut c, 3, p);
    pkt(&mut c, 3, Packet::Disconnect);
    c.closed(3);
    assert!(publishes_to(&take4(&mut c), 9).is_empty());
}

#[test]
fn retained_messages_go_to_new_subscribers() {
    let mut c = core();
    connect(&mut c, 1, "pub", true);
    let mut p = Publish::new("r/1", QoS::AtLeastOnce, b"kept".to_vec());
    p.retain = true;
    p.pkid = 1;
    pkt(&mut c, 1, Packet::Publish(p));
    take4(&mut c);
    assert!(matches!(c.take_store_ops()[..], [StoreOp::PutRetained(_)]));
    connect(&mut c, 2, "sub", true);
    let a = sub(&mut c, 2, "r/#", QoS::AtMostOnce);
    let got = a.iter().find_map(|x| match x {
        A::Send(2, Packet::Publish(p)) => Some((p.retain, p.qos)),
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
    assert!(a.contains(&A::Close(1)));
    let mut p = Connect::new("x");
    p.set_login("u", "bad");
    conn4(&mut c, 2, p);
    assert_eq!(
        connack(&take4(&mut c)).unwrap().0,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(c.counters().auth_failures, 2);
    let mut p = Connect::new("x");
    p.set_login("u", "pw");
    conn4(&mut c, 3, p);
    assert_eq!(
        connack(&take4(&mut c)).unwrap().0,
        ConnectReturnCode::Success
    );
    let a = sub(&mut c, 3, "own/other/#", QoS::AtMostOnce);
    assert!(a.iter().any(|x| matches!(x, A::Send(3, Packet::SubAck(s)) if s.return_codes == [SubscribeReasonCode::Failure])));
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
    conn4(&mut c, 1, Connect::new("a"));
    assert!(take4(&mut c).contains(&A::Close(1)));
    let a = publish(&mut c, 2, "bad/+/topic", QoS::AtMostOnce, 0);
    assert!(a.contains(&A::Close(2)));
    assert_eq!(c.connections(), 0);
    assert_eq!(c.counters().protocol_errors, 2);
    // Packets from a connection the core no longer knows are ignored.
    pkt(&mut c, 2, Packet::PingReq);
    assert!(take4(&mut c).is_empty());
    pkt(&mut c, 7, Packet::Unsubscribe(Unsubscribe::new("x")));
    assert!(take4(&mut c).is_empty());
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
        |o| matches!(o, StoreOp::DeleteActorMessages { address, first, last }
            if address == "n/c" && (*first, *last) == (id0, id0))
    ));
    // Unacked for the redelivery timeout once handed to the cluster: sent again, marked dup,
    // in order.
    c.actor_handed("n/c", u64::MAX);
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
        let mut d = Decoder::new(1024);
        if let Ok(Some(cp)) = d.connect(&mut buf) {
            c.connect(conn, cp);
            while let Ok(Some(p)) = d.next(&mut buf) {
                c.packet(conn, p);
            }
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

fn connect5(c: &mut BrokerCore, conn: ConnId, id: &str, clean: bool, expiry: u32) -> Vec<Action> {
    c.connect(
        conn,
        ConnectIn {
            protocol: Protocol::V5,
            client_id: id.into(),
            clean_start: clean,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            session_expiry: expiry,
            receive_maximum: None,
            max_packet_size: None,
            auth_method: None,
        },
    );
    c.take_actions()
}

fn sub5(c: &mut BrokerCore, conn: ConnId, filter: &str, opts: SubOptions, retain_handling: u8) {
    c.packet(
        conn,
        ClientPacket::Subscribe {
            pkid: 1,
            filters: vec![FilterIn {
                filter: filter.into(),
                opts,
                retain_handling,
            }],
        },
    );
}

fn pub5(c: &mut BrokerCore, conn: ConnId, topic: &str, qos: u8, expiry: Option<u32>) {
    c.packet(
        conn,
        ClientPacket::Publish(PublishIn {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            pkid: u16::from(qos > 0),
            expiry,
            props: None,
        }),
    );
}

fn sent5(actions: &[Action], conn: ConnId) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(c, ServerPacket::Publish { message, .. }) if *c == conn => {
                Some(message.clone())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn mqtt5_session_expiry_ends_an_offline_session_on_time() {
    let mut c = core();
    c.tick(1000);
    connect5(&mut c, 1, "s", true, 10);
    sub5(&mut c, 1, "t", qos(1), 0);
    c.closed(1);
    c.tick(1005);
    assert_eq!(c.sessions(), 1);
    let a = connect5(&mut c, 2, "s", false, 10);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Send(2, ServerPacket::ConnAck(k)) if k.session_present))
    );
    c.closed(2);
    c.tick(1016);
    assert_eq!(c.sessions(), 0, "expired 10 s after the disconnect");
    assert!(
        c.take_store_ops()
            .iter()
            .any(|o| matches!(o, StoreOp::DeleteSession { .. }))
    );
    // Expiry 0 (MQTT 5 default): the session ends with the connection.
    connect5(&mut c, 3, "z", false, 0);
    c.closed(3);
    assert_eq!(c.sessions(), 0);
}

#[test]
fn mqtt5_message_expiry_drops_stale_queued_messages_and_counts_down() {
    let mut c = core();
    c.tick(100);
    connect5(&mut c, 1, "s", true, 60);
    sub5(&mut c, 1, "t", qos(1), 0);
    c.closed(1);
    connect5(&mut c, 2, "p", true, 0);
    pub5(&mut c, 2, "t", 1, Some(5));
    pub5(&mut c, 2, "t", 1, Some(50));
    c.take_actions();
    c.tick(110);
    let a = connect5(&mut c, 3, "s", false, 60);
    let got = sent5(&a, 3);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].expires_at,
        Some(150),
        "encoded as 40 s left at t=110"
    );
}

#[test]
fn mqtt5_will_delay_is_cancelled_by_a_reconnect_and_published_otherwise() {
    let mut c = core();
    c.tick(0);
    connect5(&mut c, 9, "watch", true, 0);
    sub5(&mut c, 9, "will/#", qos(0), 0);
    let will = |delay| crate::broker::packet::WillIn {
        topic: "will/dev".into(),
        payload: Bytes::from_static(b"gone"),
        qos: 0,
        retain: false,
        delay,
        expiry: None,
        props: None,
    };
    let cn = |c: &mut BrokerCore, conn| {
        let mut k = ConnectIn {
            protocol: Protocol::V5,
            client_id: "dev".into(),
            clean_start: false,
            keep_alive: 60,
            username: None,
            password: None,
            will: Some(will(5)),
            session_expiry: 100,
            receive_maximum: None,
            max_packet_size: None,
            auth_method: None,
        };
        k.clean_start = conn == 1;
        c.connect(conn, k);
        c.take_actions()
    };
    cn(&mut c, 1);
    c.closed(1);
    c.tick(3);
    assert!(sent5(&c.take_actions(), 9).is_empty(), "still waiting");
    cn(&mut c, 2);
    c.closed(2);
    c.tick(6);
    assert!(
        sent5(&c.take_actions(), 9).is_empty(),
        "the reconnect cancelled the first"
    );
    c.tick(7);
    assert!(sent5(&c.take_actions(), 9).is_empty());
    c.tick(8);
    assert_eq!(
        sent5(&c.take_actions(), 9).len(),
        1,
        "due 5 s after the second close (t=3)"
    );
}

#[test]
fn mqtt5_no_local_retain_handling_and_receive_maximum() {
    let mut c = core();
    c.connect(
        1,
        ConnectIn {
            protocol: Protocol::V5,
            client_id: "a".into(),
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            session_expiry: 0,
            receive_maximum: Some(2),
            max_packet_size: Some(64),
            auth_method: None,
        },
    );
    c.take_actions();
    let nl = SubOptions {
        qos: 1,
        no_local: true,
        ..SubOptions::default()
    };
    sub5(&mut c, 1, "t", nl, 0);
    connect5(&mut c, 2, "b", true, 0);
    pub5(&mut c, 1, "t", 1, None);
    assert!(sent5(&c.take_actions(), 1).is_empty(), "no-local");
    for _ in 0..4 {
        pub5(&mut c, 2, "t", 1, None);
    }
    assert_eq!(sent5(&c.take_actions(), 1).len(), 2, "receive maximum 2");
    // Larger than the client's maximum packet size: dropped, counted.
    let dropped = c.counters().dropped;
    c.packet(
        2,
        ClientPacket::Publish(PublishIn {
            topic: "t".into(),
            payload: Bytes::from(vec![0u8; 100]),
            qos: 0,
            retain: false,
            pkid: 0,
            expiry: None,
            props: None,
        }),
    );
    assert!(sent5(&c.take_actions(), 1).is_empty());
    assert_eq!(c.counters().dropped, dropped + 1);
    // Retain handling 1: retained messages only for a new subscription.
    c.publish(Message::new("r", Bytes::from_static(b"k"), 0, true), None);
    c.take_actions();
    sub5(&mut c, 2, "r", qos(0), 1);
    assert_eq!(sent5(&c.take_actions(), 2).len(), 1);
    sub5(&mut c, 2, "r", qos(0), 1);
    assert!(sent5(&c.take_actions(), 2).is_empty());
}

#[test]
fn an_actor_subscriber_gets_the_window_it_asks_for_up_to_the_bound() {
    let mut c = core();
    let max = c.limits().max_inflight as usize;
    c.actor_subscribe("n/c", &["w/#".into()], qos(1));
    for i in 0..(3 * max) {
        actor_publish(&mut c, "n/p", &format!("w/{i}"), 1);
    }
    assert_eq!(notices(&c.take_actions()).len(), max, "the broker's window");
    // A larger window sends what was queued behind the old one.
    c.set_actor_window("n/c", Some(2 * max as u32));
    assert_eq!(notices(&c.take_actions()).len(), max);
    // Acknowledging the first half of the window lets as many more out.
    let ids: Vec<u64> = c
        .actor_subscriptions()
        .find(|(a, _)| &***a == "n/c")
        .map(|(_, q)| q.ids().take(max).collect())
        .unwrap();
    c.actor_ack("n/c", &ids);
    assert_eq!(notices(&c.take_actions()).len(), max);
    // Beyond the bound, the bound holds.
    c.set_actor_window("n/c", Some(u32::MAX));
    let q = c.actor_subscriptions().next().unwrap().1;
    assert_eq!(
        super::actor_window(q, c.limits()),
        crate::broker::ACTOR_WINDOW_MAX as usize
    );
}

#[test]
fn deliveries_precede_the_commit_only_with_reserved_ids_and_no_exactly_once_receiver() {
    let mut c = core();
    c.actor_subscribe("n/c", &["s/#".into()], qos(1));
    let mut ops = c.take_store_ops();
    c.may_deliver_before_commit();
    c.take_actions();
    // The first id used is past what the disk has reserved: that batch waits for its commit,
    // which reserves ids ahead.
    actor_publish(&mut c, "n/p", "s/a", 1);
    let batch = c.take_store_ops();
    assert!(!c.may_deliver_before_commit());
    let reserved = batch
        .iter()
        .find_map(|o| match o {
            StoreOp::NextSeq(n) => Some(*n),
            _ => None,
        })
        .expect("ids reserved");
    ops.extend(batch);
    // Within the reservation the deliveries go first, and nothing more is reserved.
    actor_publish(&mut c, "n/p", "s/b", 1);
    let batch = c.take_store_ops();
    assert!(c.may_deliver_before_commit());
    assert!(!batch.iter().any(|o| matches!(o, StoreOp::NextSeq(_))));
    ops.extend(batch);
    let handed = notices(&c.take_actions());
    assert_eq!(handed.len(), 2);
    // A publish on a stream that reaches an actor waits: the actor recognises a repeat by its
    // notice's id, so the mark that recognises the stream's repeat must be on disk first.
    let stream_publish = |c: &mut BrokerCore, topic: &str, qos: u8, seq: u64| {
        c.publish(
            Message::new(topic, Bytes::from_static(b"v"), qos, false),
            Some(("bridge:x".into(), seq)),
        );
        c.take_store_ops();
        let early = c.may_deliver_before_commit();
        c.take_actions();
        early
    };
    assert!(!stream_publish(&mut c, "s/c", 1, 1));
    // One that reaches only QoS 0/1 client subscriptions goes first: a crash before the
    // commit gives such a subscriber a repeat at worst, which QoS 1 allows.
    connect(&mut c, 2, "sub1", true);
    sub(&mut c, 2, "q/#", QoS::AtLeastOnce);
    connect(&mut c, 3, "sub0", true);
    sub(&mut c, 3, "q/#", QoS::AtMostOnce);
    c.take_store_ops();
    c.may_deliver_before_commit();
    c.take_actions();
    assert!(stream_publish(&mut c, "q/a", 2, 2));
    // With a QoS 2 subscription there too, a QoS 1 publish still goes first; a QoS 2 one,
    // delivered to it at QoS 2, waits.
    connect(&mut c, 4, "sub2", true);
    sub(&mut c, 4, "q/#", QoS::ExactlyOnce);
    c.take_store_ops();
    c.may_deliver_before_commit();
    c.take_actions();
    assert!(stream_publish(&mut c, "q/b", 1, 3));
    assert!(!stream_publish(&mut c, "q/c", 2, 4));
    // So does a QoS 2 publish from a client (exactly once).
    connect(&mut c, 1, "pub", true);
    c.take_store_ops();
    assert!(c.may_deliver_before_commit());
    publish(&mut c, 1, "s/d", QoS::ExactlyOnce, 1);
    c.take_store_ops();
    assert!(!c.may_deliver_before_commit());
    // A restart from what was committed hands out no id it handed out before, even the ones
    // that went before a commit the restart never saw.
    let dir = tempfile::tempdir().unwrap();
    let mut store = crate::broker::store::BrokerStore::open(&dir.path().join("b.sqlite")).unwrap();
    store.apply(&ops).unwrap();
    let mut c = BrokerCore::new(
        AccessPolicy::new(true, vec![], vec![]),
        BrokerLimits::default(),
        store.load().unwrap(),
    );
    c.start();
    c.take_actions();
    actor_publish(&mut c, "n/p", "s/e", 1);
    let fresh = notices(&c.take_actions());
    assert!(fresh[0].2.unwrap() >= reserved);
    assert!(handed.iter().all(|n| n.2.unwrap() < reserved));
}
