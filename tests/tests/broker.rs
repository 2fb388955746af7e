//! The broker kind with real MQTT clients: Debian's `mosquitto_pub`/`mosquitto_sub` and paho
//! (`/usr/bin/python3`), over TCP and TLS, against a real `colony node`.
//!
//! Needs `mosquitto-clients`, `python3-paho-mqtt` and `openssl` (installed by `.ci/test`).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use colony_tests::mqtt::{Sub, make_certs, publish};
use colony_tests::*;

// argon2id hashes of "alice-pw" and "bob-pw" (made with `colony passwd`).
const ALICE_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$gX0hzDcMu1jVL7yQw2e6aw$TVMokCAkQxu0g+UssLI9CxTwCht7XZSFUjHwi67BeQg";
const BOB_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$4CQWOts6a3jUGkP1k+DQSw$Iqbhl5PVJDibmtPx0pgmozlDkLwH1Y32mDufMCGZurc";

struct Broker {
    work: Workdir,
    _node: NodeProc,
    tcp: u16,
    tls: u16,
    mtls: u16,
}

fn start() -> Broker {
    let (tcp, tls, mtls) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"
[cluster]
name = "mq"

[[node]]
name = "n1"
listen = "127.0.0.1:{quic}"

[supervision]
backoff_ms = 10

[[actor]]
name = "broker"
node = "n1"
kind = "broker"
listen = "127.0.0.1:{tcp}"
listeners = [
  {{ bind = "127.0.0.1:{tls}", tls = {{ cert = "server.pem", key = "server.key" }} }},
  {{ bind = "127.0.0.1:{mtls}", tls = {{ cert = "server.pem", key = "server.key", client_ca = "ca.pem", require_client_cert = true }} }},
]
allow_anonymous = true
users = [
  {{ name = "alice", password_hash = "{ALICE_HASH}" }},
  {{ name = "bob", password_hash = "{BOB_HASH}" }},
]
acl = [
  {{ user = "alice", topic = "#", access = "readwrite" }},
  {{ topic = "devices/%u/#", access = "readwrite" }},
  {{ topic = "public/#", access = "readwrite" }},
  {{ topic = "a/#", access = "readwrite" }},
  {{ topic = "p/#", access = "readwrite" }},
  {{ topic = "r/#", access = "readwrite" }},
  {{ topic = "will/#", access = "readwrite" }},
  {{ topic = "clients/%c/#", access = "readwrite" }},
]
"##,
        quic = free_udp_port()
    );
    let work = Workdir::new(&config);
    make_certs(work.path());
    let node = work.start_node("n1");
    let up = wait_for(Duration::from_secs(20), || {
        work.status("n1").is_some_and(|s| healthy(&s))
            && std::net::TcpStream::connect(("127.0.0.1", tcp)).is_ok()
    });
    assert!(up, "broker never came up:\n{}", node.log_text());
    Broker {
        work,
        _node: node,
        tcp,
        tls,
        mtls,
    }
}

impl Broker {
    fn dir(&self) -> &Path {
        self.work.path()
    }

    fn detail(&self) -> serde_json::Value {
        let s = self.work.status("n1").expect("status");
        actor(&s, "n1/broker").expect("broker in status")["detail"].clone()
    }

    /// `mosquitto_pub` on the plain listener with `args`, bounded to 10 s.
    fn publish(&self, args: &[&str]) -> Output {
        let port = self.tcp.to_string();
        let mut all = vec!["10", "mosquitto_pub", "-h", "127.0.0.1", "-p", &port];
        all.extend_from_slice(args);
        Command::new("timeout")
            .args(&all)
            .current_dir(self.dir())
            .output()
            .expect("run mosquitto_pub")
    }

    fn publish_ok(&self, args: &[&str]) {
        publish(self.dir(), self.tcp, 10, args);
    }

    /// Kills the broker (`colony ctl kill`) and waits until its supervisor has it running and
    /// listening again.
    fn kill_and_wait_back(&self) {
        self.work.ctl_ok("n1", &["kill", "n1/broker"]);
        assert!(
            wait_for(Duration::from_secs(20), || {
                restarted(&self.work, "n1/broker")
                    && std::net::TcpStream::connect(("127.0.0.1", self.tcp)).is_ok()
            }),
            "broker did not come back"
        );
    }

    /// A `mosquitto_sub` on `port` that has its SUBACK.
    fn subscribe(&self, port: u16, args: &[&str]) -> Sub {
        let sub = Sub::spawn(self.dir(), port, args);
        sub.wait_ready();
        sub
    }
}

/// True once the actor at `address` has been restarted and runs (asked of the node the address
/// names).
fn restarted(work: &Workdir, address: &str) -> bool {
    let node = address.split('/').next().unwrap_or_default();
    work.status(node).is_some_and(|s| {
        actor(&s, address)
            .is_some_and(|a| a["restarts"].as_u64() >= Some(1) && a["state"] == "running")
    })
}

/// Runs a paho script with Debian's python, bounded to 20 s; returns stdout.
fn paho(dir: &Path, script: &str) -> String {
    paho_with(dir, 20, script, &[])
}

/// Runs a paho script with Debian's python and `args` (its `sys.argv[1:]`), bounded to `secs`
/// seconds; returns stdout.
fn paho_with(dir: &Path, secs: u32, script: &str, args: &[&str]) -> String {
    let secs = secs.to_string();
    let out = Command::new("timeout")
        .args([secs.as_str(), "/usr/bin/python3", "-c", script])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        out.status.success(),
        "paho script failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SECS: Duration = Duration::from_secs(10);

#[test]
fn publish_and_subscribe_at_each_qos_with_wildcards() {
    let b = start();
    let plus = b.subscribe(b.tcp, &["-q", "2", "-t", "a/+/c"]);
    let hash = b.subscribe(b.tcp, &["-q", "1", "-t", "a/#"]);
    for qos in ["0", "1", "2"] {
        b.publish_ok(&["-q", qos, "-t", "a/b/c", "-m", &format!("q{qos}")]);
    }
    b.publish_ok(&["-q", "1", "-t", "a/x", "-m", "only-hash"]);
    b.publish_ok(&["-q", "1", "-t", "other", "-m", "nobody"]);
    assert_eq!(plus.take(3, SECS), ["a/b/c q0", "a/b/c q1", "a/b/c q2"]);
    assert_eq!(
        hash.take(4, SECS),
        ["a/b/c q0", "a/b/c q1", "a/b/c q2", "a/x only-hash"]
    );
    assert!(plus.quiet(Duration::from_millis(300)).is_empty());
    // QoS 2 from the client's side: the broker must complete PUBREC/PUBREL/PUBCOMP.
    let dbg = b.subscribe(b.tcp, &["-q", "2", "-t", "a/q2"]);
    b.publish_ok(&["-q", "2", "-t", "a/q2", "-m", "exactly"]);
    assert_eq!(dbg.take(1, SECS), ["a/q2 exactly"]);
    assert!(
        dbg.wait_for_debug("PUBREL", SECS).is_some(),
        "no PUBREL from the broker"
    );
}

#[test]
fn retained_messages_reach_later_subscribers_and_clear() {
    let b = start();
    b.publish_ok(&["-r", "-q", "1", "-t", "r/one", "-m", "kept"]);
    let s = b.subscribe(b.tcp, &["-t", "r/#"]);
    assert_eq!(s.take(1, SECS), ["r/one kept"]);
    b.publish_ok(&["-r", "-t", "r/one", "-n"]);
    drop(s);
    let s = b.subscribe(b.tcp, &["-t", "r/#"]);
    assert!(
        s.quiet(Duration::from_millis(500)).is_empty(),
        "retained message not cleared"
    );
    assert!(wait_for(Duration::from_secs(5), || b.detail()["retained"] == 0));
}

#[test]
fn will_is_published_on_abrupt_disconnect_only() {
    let b = start();
    let s = b.subscribe(b.tcp, &["-t", "will/#"]);
    // A client that dies without DISCONNECT.
    paho(
        b.dir(),
        &format!(
            r#"
import os, time, paho.mqtt.client as mqtt
c = mqtt.Client(client_id="dies")
c.will_set("will/dies", "gone", qos=1)
c.connect("127.0.0.1", {port}, keepalive=5)
c.loop_start()
time.sleep(0.5)
os._exit(0)
"#,
            port = b.tcp
        ),
    );
    assert_eq!(s.take(1, SECS), ["will/dies gone"]);
    // A client that says goodbye: no will.
    paho(
        b.dir(),
        &format!(
            r#"
import time, paho.mqtt.client as mqtt
c = mqtt.Client(client_id="polite")
c.will_set("will/polite", "gone", qos=1)
c.connect("127.0.0.1", {port}, keepalive=5)
c.loop_start()
time.sleep(0.3)
c.disconnect()
c.loop_stop()
"#,
            port = b.tcp
        ),
    );
    assert!(s.quiet(Duration::from_millis(500)).is_empty());
}

#[test]
fn persistent_session_gets_what_was_published_while_away() {
    let b = start();
    let s = b.subscribe(b.tcp, &["-c", "-i", "keeper", "-q", "1", "-t", "p/#"]);
    drop(s);
    assert!(wait_for(SECS, || b.detail()["connections"] == 0));
    b.publish_ok(&["-q", "1", "-t", "p/1", "-m", "while-away-1"]);
    b.publish_ok(&["-q", "2", "-t", "p/2", "-m", "while-away-2"]);
    b.publish_ok(&["-q", "0", "-t", "p/3", "-m", "qos0-not-kept"]);
    let s = Sub::spawn(
        b.dir(),
        b.tcp,
        &["-c", "-i", "keeper", "-q", "1", "-t", "p/#"],
    );
    assert_eq!(s.take(2, SECS), ["p/1 while-away-1", "p/2 while-away-2"]);
    // A clean session with the same id starts empty.
    drop(s);
    let s = Sub::spawn(b.dir(), b.tcp, &["-i", "keeper", "-q", "1", "-t", "x/none"]);
    s.wait_ready();
    assert!(s.quiet(Duration::from_millis(300)).is_empty());
}

#[test]
fn wrong_password_and_anonymous_rules() {
    let b = start();
    let out = b.publish(&["-u", "alice", "-P", "wrong", "-t", "a/b", "-m", "x"]);
    assert!(!out.status.success(), "a wrong password was accepted");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("bad user name or password") || err.contains("not authori"),
        "unexpected refusal: {err}"
    );
    b.publish_ok(&["-u", "alice", "-P", "alice-pw", "-t", "a/b", "-m", "x"]);
    assert!(wait_for(Duration::from_secs(5), || {
        b.detail()["auth_failures"].as_u64() >= Some(1)
    }));
    let log = std::fs::read_to_string(b.dir().join("n1.log")).unwrap();
    assert!(log.contains("login refused"));
    assert!(!log.contains("wrong"), "the password reached the log");
}

#[test]
fn acl_denies_publish_and_subscribe() {
    let b = start();
    let alice = b.subscribe(
        b.tcp,
        &[
            "-u",
            "alice",
            "-P",
            "alice-pw",
            "-t",
            "devices/#",
            "-q",
            "1",
        ],
    );
    // bob may write under devices/bob, not under devices/alice.
    b.publish_ok(&[
        "-u",
        "bob",
        "-P",
        "bob-pw",
        "-q",
        "1",
        "-t",
        "devices/alice/x",
        "-m",
        "forged",
    ]);
    b.publish_ok(&[
        "-u",
        "bob",
        "-P",
        "bob-pw",
        "-q",
        "1",
        "-t",
        "devices/bob/x",
        "-m",
        "own",
    ]);
    assert_eq!(alice.take(1, SECS), ["devices/bob/x own"]);
    assert!(alice.quiet(Duration::from_millis(300)).is_empty());
    // bob may not subscribe to alice's devices.
    let denied = Sub::spawn(
        b.dir(),
        b.tcp,
        &["-u", "bob", "-P", "bob-pw", "-t", "devices/alice/#"],
    );
    let seen = denied.wait_for_debug("SUBACK", SECS).expect("a SUBACK");
    assert!(
        denied
            .wait_for_debug("denied", Duration::from_secs(2))
            .is_some()
            || seen.contains("denied"),
        "subscription not refused: {seen}"
    );
    assert!(wait_for(Duration::from_secs(5), || {
        b.detail()["denied"].as_u64() >= Some(2)
    }));
}

#[test]
fn tls_listeners_with_paho_and_mosquitto_and_client_certs() {
    let b = start();
    // paho over TLS, QoS 1 and 2 round trip.
    let out = paho(
        b.dir(),
        &format!(
            r#"
import time, paho.mqtt.client as mqtt
got = []
def on_message(c, u, m): got.append((m.topic, m.payload.decode(), m.qos))
c = mqtt.Client(client_id="tls-paho")
c.tls_set(ca_certs="ca.pem")
c.on_message = on_message
c.connect("127.0.0.1", {port}, keepalive=10)
c.loop_start()
c.subscribe("a/tls", qos=2)[1]
time.sleep(0.3)
c.publish("a/tls", "one", qos=1).wait_for_publish()
c.publish("a/tls", "two", qos=2).wait_for_publish()
deadline = time.time() + 5
while len(got) < 2 and time.time() < deadline: time.sleep(0.05)
print(sorted(got))
c.disconnect()
"#,
            port = b.tls
        ),
    );
    assert_eq!(out.trim(), "[('a/tls', 'one', 1), ('a/tls', 'two', 2)]");
    // mosquitto over TLS.
    let s = b.subscribe(b.tls, &["--cafile", "ca.pem", "-t", "a/t"]);
    b.publish_ok(&["-t", "a/t", "-m", "plain-to-tls"]);
    assert_eq!(s.take(1, SECS), ["a/t plain-to-tls"]);
    // The listener requiring client certificates refuses a client without one…
    let mtls = b.mtls.to_string();
    let no_cert = Command::new("timeout")
        .args([
            "10",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &mtls,
            "--cafile",
            "ca.pem",
            "-t",
            "a/m",
            "-m",
            "x",
        ])
        .current_dir(b.dir())
        .output()
        .unwrap();
    assert!(
        !no_cert.status.success(),
        "client without a certificate was accepted"
    );
    // …and takes one with a certificate from the client CA.
    let s = b.subscribe(b.tcp, &["-t", "a/m"]);
    let with_cert = Command::new("timeout")
        .args([
            "10",
            "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            &mtls,
            "--cafile",
            "ca.pem",
            "--cert",
            "client.pem",
            "--key",
            "client.key",
            "-t",
            "a/m",
            "-m",
            "mtls",
        ])
        .current_dir(b.dir())
        .output()
        .unwrap();
    assert!(
        with_cert.status.success(),
        "{}",
        String::from_utf8_lossy(&with_cert.stderr)
    );
    assert_eq!(s.take(1, SECS), ["a/m mtls"]);
}

#[test]
fn killed_broker_restarts_with_sessions_and_retained_intact() {
    let b = start();
    b.publish_ok(&[
        "-r",
        "-q",
        "1",
        "-t",
        "r/keep",
        "-m",
        "retained-across-kill",
    ]);
    let s = b.subscribe(b.tcp, &["-c", "-i", "survivor", "-q", "1", "-t", "p/#"]);
    drop(s);
    assert!(wait_for(SECS, || b.detail()["connections"] == 0));
    b.publish_ok(&["-q", "1", "-t", "p/k", "-m", "queued-before-kill"]);
    // A client that stays connected through the kill and reconnects by itself.
    let live = Sub::spawn(
        b.dir(),
        b.tcp,
        &["-c", "-i", "stayer", "-q", "1", "-t", "p/live"],
    );
    live.wait_ready();

    b.kill_and_wait_back();
    let s = Sub::spawn(
        b.dir(),
        b.tcp,
        &["-c", "-i", "survivor", "-q", "1", "-t", "p/#"],
    );
    assert_eq!(s.take(1, SECS), ["p/k queued-before-kill"]);
    let r = b.subscribe(b.tcp, &["-t", "r/#"]);
    assert_eq!(r.take(1, SECS), ["r/keep retained-across-kill"]);
    // mosquitto_sub reconnects on its own (its session was persistent): it gets new messages.
    assert!(
        live.wait_for_debug("CONNACK", Duration::from_secs(15))
            .is_some(),
        "client never reconnected"
    );
    b.publish_ok(&["-q", "1", "-t", "p/live", "-m", "after-kill"]);
    assert_eq!(live.take(1, SECS), ["p/live after-kill"]);
}

#[test]
fn actors_publish_by_message_and_malformed_clients_are_cut_off_alone() {
    let b = start();
    let s = b.subscribe(b.tcp, &["-t", "public/#"]);
    let out = b.work.ctl(
        "n1",
        &[
            "send",
            "n1/broker",
            r#"{"publish": {"topic": "public/from-actor", "payload": "hello", "qos": 1}}"#,
        ],
    );
    assert_success(&out, "ctl");
    assert_eq!(s.take(1, SECS), ["public/from-actor hello"]);
    // Garbage, then a CONNECT that is not first, on raw sockets: each is dropped alone.
    use std::io::{Read, Write};
    for bytes in [
        &[0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..],
        &[0x30, 0x05, 0x00, 0x01, b'a', b'x', b'y'][..],
        &[0x10, 0xFF, 0xFF, 0xFF, 0x7F][..],
    ] {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", b.tcp)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bytes).unwrap();
        let mut buf = [0u8; 16];
        let n = c.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "connection not closed after {bytes:?}");
    }
    b.publish_ok(&["-t", "public/still", "-m", "alive"]);
    assert_eq!(s.take(1, SECS), ["public/still alive"]);
}

/// A broker on n1 and a collector on n2 that takes readings from it as an actor subscriber
/// (`via = "actor"`, QoS 1).
fn start_with_actor_collector() -> (Workdir, NodeProc, u16) {
    let tcp = free_tcp_port();
    let config = format!(
        r##"
[cluster]
name = "mqa"

[[node]]
name = "n1"
listen = "127.0.0.1:{q1}"

[[node]]
name = "n2"
listen = "127.0.0.1:{q2}"

[supervision]
backoff_ms = 10

[[actor]]
name = "broker"
node = "n1"
kind = "broker"
listen = "127.0.0.1:{tcp}"
allow_anonymous = true

[[actor]]
name = "store"
node = "n2"
kind = "collector"
database = "readings.sqlite"
flush_ms = 50
source = {{ broker = "n1/broker", topics = ["readings/#"], via = "actor" }}
"##,
        q1 = free_udp_port(),
        q2 = free_udp_port(),
    );
    let work = Workdir::new(&config);
    let n1 = work.start_node("n1");
    let up = wait_for(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", tcp)).is_ok()
    });
    assert!(up, "broker never came up:\n{}", n1.log_text());
    (work, n1, tcp)
}

fn publish_readings(dir: &Path, port: u16, seqs: std::ops::RangeInclusive<u32>) {
    for seq in seqs {
        let reading = format!(r#"{{"source": "dev-1", "seq": {seq}, "value": {seq}.5}}"#);
        publish(
            dir,
            port,
            10,
            &["-q", "1", "-t", "readings/dev-1", "-m", &reading],
        );
    }
}

/// The collector's counts; null while it or its node is (re)starting.
fn collector_counts(work: &Workdir) -> serde_json::Value {
    work.try_call("n2", "n2/store", r#"{"query": {"counts": {}}}"#)
}

fn wait_until_stored(work: &Workdir, n: u64, node: &NodeProc) {
    let ok = wait_for(Duration::from_secs(30), || {
        collector_counts(work)["readings"].as_u64() == Some(n)
    });
    assert!(
        ok,
        "collector never stored {n}: {}\n{}",
        collector_counts(work),
        node.log_text()
    );
}

#[test]
fn actor_subscriber_gets_everything_across_its_absence_and_a_broker_kill() {
    let (work, n1, tcp) = start_with_actor_collector();
    // Published before the collector has ever run: the declared subscription queues them.
    publish_readings(work.path(), tcp, 1..=5);
    let status = work.call("n1", "n1/broker", r#"{"status": {}}"#);
    let subs = &status["actor_subscriptions"]["n2/store"];
    assert_eq!(subs["filters"]["readings/#"], 1, "{status}");
    let n2 = work.start_node("n2");
    wait_until_stored(&work, 5, &n2);

    // Stopped: what is published meanwhile waits for it.
    work.ctl_ok("n2", &["stop", "n2/store"]);
    publish_readings(work.path(), tcp, 6..=10);
    work.ctl_ok("n2", &["start", "n2/store"]);
    wait_until_stored(&work, 10, &n2);

    // Stopped, then the broker is killed with the messages queued: they survive the restart.
    work.ctl_ok("n2", &["stop", "n2/store"]);
    publish_readings(work.path(), tcp, 11..=15);
    work.ctl_ok("n1", &["kill", "n1/broker"]);
    let back = wait_for(Duration::from_secs(20), || restarted(&work, "n1/broker"));
    assert!(back, "broker did not come back:\n{}", n1.log_text());
    work.ctl_ok("n2", &["start", "n2/store"]);
    wait_until_stored(&work, 15, &n2);

    // Killed (crash) while readings arrive: still each exactly once.
    work.ctl_ok("n2", &["kill", "n2/store"]);
    publish_readings(work.path(), tcp, 16..=20);
    wait_until_stored(&work, 20, &n2);
    let n = collector_counts(&work);
    assert_eq!(n["gaps"], 0, "{n}");
    // Everything acknowledged: nothing left in flight or queued at the broker.
    let ok = wait_for(Duration::from_secs(15), || {
        let s = work.call("n1", "n1/broker", r#"{"status": {}}"#);
        let q = &s["actor_subscriptions"]["n2/store"];
        q["inflight"] == 0 && q["queued"] == 0
    });
    assert!(ok, "notices left unacknowledged");
}

#[test]
fn actor_publish_streams_are_exactly_once_and_no_local_holds() {
    let b = start();
    let s = b.subscribe(b.tcp, &["-q", "1", "-t", "public/#"]);
    let publish = |seq: u32, text: &str| {
        let m = format!(
            r#"{{"publish": {{"topic": "public/stream", "payload": "{text}", "qos": 1, "stream": {{"id": "fwd-1", "seq": {seq}}}}}}}"#
        );
        b.work.ctl_ok("n1", &["call", "n1/broker", &m]);
    };
    publish(1, "one");
    publish(1, "one-again");
    publish(2, "two");
    assert_eq!(s.take(2, SECS), ["public/stream one", "public/stream two"]);
    assert!(s.quiet(Duration::from_millis(500)).is_empty());
    // Bad input: an invalid topic is refused, the broker carries on.
    let out = b.work.ctl(
        "n1",
        &[
            "call",
            "n1/broker",
            r#"{"publish": {"topic": "public/#", "payload": "x"}}"#,
        ],
    );
    assert!(!out.status.success());
    let out = b
        .work
        .ctl("n1", &["call", "n1/broker", r#"{"ack": {"ids": "nope"}}"#]);
    assert!(!out.status.success());
    // A subscription by address for an actor that does not exist: messages wait for it.
    let sub = r#"{"subscribe": {"filters": ["public/#"], "qos": 1, "subscriber": "n1/ghost"}}"#;
    b.work.ctl_ok("n1", &["call", "n1/broker", sub]);
    b.publish_ok(&["-q", "1", "-t", "public/x", "-m", "for-ghost"]);
    let ok = wait_for(SECS, || {
        let st = b.work.call("n1", "n1/broker", r#"{"status": {}}"#);
        st["actor_subscriptions"]["n1/ghost"]["inflight"] == 1
    });
    assert!(ok);
    b.publish_ok(&["-t", "public/still", "-m", "alive"]);
    assert_eq!(
        s.take(2, SECS),
        ["public/x for-ghost", "public/still alive"]
    );
}

/// Every MQTT 5 feature a paho client can see: topic aliases, no-local, retain-as-published and
/// retain handling, subscription identifiers, shared subscriptions, reason codes (SUBACK,
/// UNSUBACK, CONNACK), session expiry (resumed within it, gone after it), message expiry and
/// will delay.
#[test]
fn mqtt5_features_with_paho() {
    let b = start();
    let script = include_str!("broker_mqtt5.py");
    let out = paho_with(b.dir(), 60, script, &[&b.tcp.to_string()]);
    let r: serde_json::Value = serde_json::from_str(&out).expect("script printed JSON");
    let j = |v: &str| serde_json::from_str::<serde_json::Value>(v).unwrap();
    assert_eq!(
        r["alias"],
        j(r#"[["a/alias/one", "first"], ["a/alias/one", "second"]]"#)
    );
    assert_eq!(r["no_local"], j(r#"["other"]"#), "no-local");
    assert_eq!(r["rap"], j("[1]"), "retain-as-published keeps the flag");
    assert_eq!(r["not_rap"], j("[0]"), "without it the flag is cleared");
    assert_eq!(r["retain_handling"], j("[0, 1]"), "retain handling 2 and 0");
    assert_eq!(r["sub_ids"], j("[[42]]"), "subscription identifier");
    assert_eq!(r["shared"], j("[3, 3]"), "shared subscription round-robin");
    assert_eq!(r["suback"], j("[135]"), "SUBACK not authorized");
    assert_eq!(r["unsuback"], j("[17]"), "UNSUBACK no subscription existed");
    assert_eq!(
        r["bad_login"],
        j("[0, 134]"),
        "CONNACK bad user name or password"
    );
    assert_eq!(
        r["se_resumed"],
        j(r#"[1, ["while-away"]]"#),
        "session resumed"
    );
    assert_eq!(r["se_expired"], j("[0, []]"), "session expired");
    assert_eq!(
        r["message_expiry"],
        j(r#"["long"]"#),
        "expired message dropped"
    );
    let remaining = r["remaining"][0].as_u64().expect("remaining expiry");
    assert!(
        (90..100).contains(&remaining),
        "remaining expiry {remaining}"
    );
    let wills = &r["will_delay"];
    assert_eq!(wills[0], j("[]"), "will before its delay: {wills}");
    assert_eq!(wills[1], j(r#"["gone"]"#), "will after its delay: {wills}");
}

/// MQTT 5 properties through mosquitto's clients, a 3.1.1 subscriber on the same topic, PUBACK
/// reason codes, and a bad topic alias answered with DISCONNECT 0x94.
#[test]
fn mqtt5_properties_and_reason_codes_with_mosquitto() {
    let b = start();
    let v5 = b.subscribe(b.tcp, &["-V", "mqttv5", "-F", "%j", "-t", "a/props/#"]);
    let v4 = b.subscribe(b.tcp, &["-t", "a/props/#"]);
    b.publish_ok(&[
        "-V",
        "mqttv5",
        "-t",
        "a/props/x",
        "-m",
        "hello",
        "-D",
        "publish",
        "user-property",
        "k",
        "v",
        "-D",
        "publish",
        "content-type",
        "text/plain",
        "-D",
        "publish",
        "response-topic",
        "a/reply",
        "-D",
        "publish",
        "correlation-data",
        "c-1",
        "-D",
        "publish",
        "message-expiry-interval",
        "300",
    ]);
    let line = v5.take(1, SECS);
    let m: serde_json::Value = serde_json::from_str(&line[0]).expect("JSON line");
    let p = &m["properties"];
    assert_eq!(m["payload"], "hello");
    assert_eq!(p["user-properties"]["k"], "v", "{m}");
    assert_eq!(p["content-type"], "text/plain");
    assert_eq!(p["response-topic"], "a/reply");
    assert_eq!(p["correlation-data"], "c-1");
    let left = p["message-expiry-interval"].as_u64().unwrap();
    assert!((290..=300).contains(&left), "{left}");
    // The 3.1.1 subscriber gets the same message, without properties.
    assert_eq!(v4.take(1, SECS), ["a/props/x hello"]);

    // PUBACK reason codes: not authorized (ACL) and no matching subscribers.
    for (topic, rc) in [("forbidden/x", "RC:135"), ("a/nobody", "RC:16")] {
        let out = b.publish(&["-V", "mqttv5", "-d", "-q", "1", "-t", topic, "-m", "x"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.lines().any(|l| l.contains("PUBACK") && l.contains(rc)),
            "{topic}: {text}"
        );
    }

    // A topic alias above the maximum: DISCONNECT with reason 0x94, and nobody else notices.
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", b.tcp)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let connect = [
        0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x01,
        b'x',
    ];
    c.write_all(&connect).unwrap();
    let mut connack = [0u8; 64];
    let n = c.read(&mut connack).unwrap();
    assert!(
        n >= 4 && connack[0] == 0x20 && connack[3] == 0,
        "{:?}",
        &connack[..n]
    );
    // PUBLISH, empty topic, properties: topic alias (0x23) 200.
    c.write_all(&[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0xC8, b'p'])
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.len() >= 3 && got[0] == 0xE0 && got[2] == 0x94,
        "expected DISCONNECT 0x94, got {got:?}"
    );
    b.publish_ok(&["-t", "a/props/still", "-m", "alive"]);
    assert_eq!(v4.take(1, SECS), ["a/props/still alive"]);
    assert!(wait_for(SECS, || b.detail()["protocol_errors"].as_u64() >= Some(1)));
}

/// A raw MQTT 3.1.1 client: CONNECT (and the CONNACK read), then whatever is written.
fn raw_client(port: u16, id: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10];
    push_len(&mut packet, body.len());
    packet.extend(body);
    c.write_all(&packet).unwrap();
    let mut connack = [0u8; 4];
    c.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    c
}

fn push_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// Each client connection shows as a child of the broker (`n1/broker/<client-id>`) in status
/// and `colony ctl tree`; a subscriber that stops reading loses QoS 0 messages, which are
/// counted as dropped, while everyone else keeps being served.
#[test]
fn connections_are_children_and_a_stalled_subscriber_drops_qos0_alone() {
    use std::io::Write;
    let b = start();
    let watcher = b.subscribe(b.tcp, &["-V", "mqttv5", "-i", "watcher", "-t", "a/other"]);
    let mut tree = String::new();
    let listed = wait_for(SECS, || {
        tree = b.work.ctl_ok("n1", &["tree"]);
        tree.lines().any(|l| {
            l.contains("n1/broker/watcher") && l.contains("connection") && l.contains("mqtt 5")
        })
    });
    assert!(listed, "{tree}");
    let children = b.detail()["children"].clone();
    assert!(
        children
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["address"] == "n1/broker/watcher")),
        "{children}"
    );

    // An operator cuts a client off by id; an unknown id is reported as not connected.
    let cut = |id: &str| {
        let m = format!(r#"{{"disconnect": {{"client_id": "{id}"}}}}"#);
        b.work.call("n1", "n1/broker", &m)
    };
    assert_eq!(cut("watcher"), true);
    assert_eq!(cut("nobody"), false);
    // mosquitto_sub reports the MQTT 5 reason: 152, administrative action.
    assert_eq!(watcher.take(1, SECS), ["Received DISCONNECT (152)"]);
    // The same through the supervision commands on the child's address.
    let watcher = b.subscribe(b.tcp, &["-V", "mqttv5", "-i", "watcher2", "-t", "a/other"]);
    let listed = wait_for(SECS, || {
        b.work
            .ctl_ok("n1", &["tree"])
            .contains("n1/broker/watcher2")
    });
    assert!(listed);
    b.work.ctl_ok("n1", &["kill", "n1/broker/watcher2"]);
    assert_eq!(watcher.take(1, SECS), ["Received DISCONNECT (152)"]);
    let gone = b.work.ctl("n1", &["kill", "n1/broker/nobody"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("n1/broker/nobody is not connected"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    let start = b.work.ctl("n1", &["start", "n1/broker/watcher2"]);
    assert!(
        !start.status.success(),
        "a connection is started by its client"
    );
    let watcher = b.subscribe(b.tcp, &["-i", "watcher3", "-t", "a/other"]);

    // A subscriber that never reads again.
    let mut stalled = raw_client(b.tcp, "stalled");
    let mut sub = vec![0x82];
    let body = [
        0x00, 0x01, 0x00, 0x06, b'a', b'/', b'f', b'l', b'o', b'o', 0x00,
    ];
    push_len(&mut sub, body.len());
    sub.extend_from_slice(&body);
    stalled.write_all(&sub).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // 40,000 QoS 0 publishes of 1 KiB: far more than its socket and queue hold.
    let mut flood = raw_client(b.tcp, "flooder");
    let mut one = vec![0x30];
    push_len(&mut one, 2 + 6 + 1024);
    one.extend_from_slice(&[0x00, 0x06]);
    one.extend_from_slice(b"a/floo");
    one.extend_from_slice(&[b'x'; 1024]);
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
    for _ in 0..400 {
        flood.write_all(&batch).unwrap();
    }
    assert!(
        wait_for(Duration::from_secs(20), || b.detail()["dropped"].as_u64()
            > Some(1000)),
        "dropped: {}",
        b.detail()
    );
    b.publish_ok(&["-t", "a/other", "-m", "still-served"]);
    assert_eq!(watcher.take(1, SECS), ["a/other still-served"]);
    drop(stalled);
}

/// An MQTT 5 persistent session (session expiry 600 s) keeps its queued message, with its
/// properties, through a kill of the broker actor.
#[test]
fn mqtt5_session_and_message_properties_survive_a_broker_kill() {
    let b = start();
    let args = [
        "-V",
        "mqttv5",
        "-c",
        "-i",
        "v5-keeper",
        "-x",
        "600",
        "-q",
        "1",
        "-F",
        "%j",
        "-t",
        "a/v5kill",
    ];
    drop(b.subscribe(b.tcp, &args));
    assert!(wait_for(SECS, || b.detail()["connections"] == 0));
    b.publish_ok(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "a/v5kill",
        "-m",
        "kept",
        "-D",
        "publish",
        "user-property",
        "origin",
        "test",
        "-D",
        "publish",
        "message-expiry-interval",
        "600",
    ]);
    b.kill_and_wait_back();
    let s = Sub::spawn(b.dir(), b.tcp, &args);
    let line = s.take(1, SECS);
    assert_eq!(line.len(), 1, "the queued message did not survive");
    let m: serde_json::Value = serde_json::from_str(&line[0]).unwrap();
    assert_eq!(m["payload"], "kept");
    assert_eq!(m["properties"]["user-properties"]["origin"], "test", "{m}");
    let left = m["properties"]["message-expiry-interval"].as_u64().unwrap();
    assert!((500..=600).contains(&left), "{left}");
}

/// A subscriber's PUBACK only forgets a message: it waits for the broker's next commit (a
/// publish's) rather than costing a commit of its own, and it is on disk soon after, so that
/// nothing acknowledged comes back after the broker is killed.
#[test]
fn acknowledgements_ride_with_the_next_commit_and_do_not_come_back() {
    let b = start();
    let commits = || b.detail()["store_commits"].as_u64().expect("store_commits");
    let before = commits();
    let out = paho(
        b.dir(),
        &format!(
            r#"
import os, time, paho.mqtt.client as mqtt
got = []
sub = mqtt.Client(client_id="acker", clean_session=False)
sub.on_message = lambda c, u, m: got.append(m.payload.decode())
sub.connect("127.0.0.1", {port})
sub.loop_start()
sub.subscribe("p/acked", qos=1)[1]
time.sleep(0.3)
pub = mqtt.Client(client_id="acked-pub")
pub.connect("127.0.0.1", {port})
pub.loop_start()
for i in range(20):
    pub.publish("p/acked", str(i), qos=1).wait_for_publish()
    time.sleep(0.005)
end = time.time() + 5
while len(got) < 20 and time.time() < end:
    time.sleep(0.01)
print(",".join(got))
time.sleep(0.3)
os._exit(0)
"#,
            port = b.tcp
        ),
    );
    let want: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(out.trim(), want.join(","));
    // The status is refreshed each second.
    std::thread::sleep(Duration::from_millis(1200));
    let spent = commits() - before;
    // 20 publishes at QoS 1 to a persistent session: a commit each, plus the sessions' own
    // (connects, the subscription, the ends) and the last acknowledgement's: 23 here, with
    // room for a few acknowledgements that waited out the limit on a loaded machine. One
    // commit per acknowledgement as well makes it at least 40 (42 here).
    assert!(spent <= 34, "{spent} commits for 20 messages");
    b.kill_and_wait_back();
    let s = Sub::spawn(
        b.dir(),
        b.tcp,
        &["-c", "-i", "acker", "-q", "1", "-t", "p/acked"],
    );
    s.wait_ready();
    let back = s.quiet(Duration::from_millis(500));
    assert!(back.is_empty(), "acknowledged messages came back: {back:?}");
}
