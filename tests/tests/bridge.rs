//! The bridge kind between real `colony` nodes, and between Colony and Debian's `mosquitto`
//! (TLS with a client certificate, and a password), driven by `mosquitto_pub`/`mosquitto_sub`.
//!
//! Needs `mosquitto`, `mosquitto-clients` and `openssl`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use colony_tests::mqtt::{self, Mosquitto, MosquittoSetup, Sub, make_certs, publish};
use colony_tests::*;

const SECS: Duration = Duration::from_secs(15);

/// A `[[node]]` table.
fn node(name: &str) -> String {
    format!(
        "[[node]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{}\"\n\n",
        free_udp_port()
    )
}

/// A broker on `node` listening on `port`.
fn broker(node: &str, port: u16) -> String {
    format!(
        "[[actor]]\nname = \"broker\"\nnode = \"{node}\"\nkind = \"broker\"\n\
         listen = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\
         limits = {{ max_queued = 100000 }}\n\n"
    )
}

/// The cluster table, then a node with a broker (on the given MQTT port) for each entry.
fn cluster(sites: &[(&str, u16)]) -> String {
    let mut text = "[cluster]\nname = \"br\"\n\n[supervision]\nbackoff_ms = 10\n\n".to_owned();
    for (name, _) in sites {
        text += &node(name);
    }
    for (name, port) in sites {
        text += &broker(name, *port);
    }
    text
}

/// Two nodes, `site` and `cloud`, each with a broker (on MQTT ports `p1` and `p2`), and the
/// bridge `site/bridge` between them with its `topics` and an `extra` setting (or none).
fn site_and_cloud(p1: u16, p2: u16, topics: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("{extra}\n")
    };
    format!(
        "{}[[actor]]\nname = \"bridge\"\nnode = \"site\"\nkind = \"bridge\"\n\
         local = \"site/broker\"\nremote = \"cloud/broker\"\n{extra}topics = {topics}\n",
        cluster(&[("site", p1), ("cloud", p2)])
    )
}

/// Starts every node of `w` and waits until all are healthy.
fn start_all(w: &Workdir, names: &[&str]) -> Vec<NodeProc> {
    let nodes: Vec<_> = names.iter().map(|n| w.start_node(n)).collect();
    let up = wait_for(Duration::from_secs(30), || {
        w.status(names[0]).is_some_and(|s| healthy(&s))
    });
    let logs: String = nodes.iter().map(|n| n.log_text()).collect();
    assert!(up, "cluster never became healthy:\n{logs}");
    nodes
}

fn detail(w: &Workdir, node: &str, address: &str) -> serde_json::Value {
    let s = w.status(node).expect("status");
    actor(&s, address).expect("actor in status")["detail"].clone()
}

/// Waits until the bridge at `address` says it is connected.
fn wait_connected(w: &Workdir, node: &str, address: &str) {
    let ok = wait_for(SECS, || {
        w.status(node)
            .and_then(|s| actor(&s, address).map(|a| a["detail"]["connected"] == true))
            .unwrap_or(false)
    });
    assert!(
        ok,
        "{address} never connected: {}",
        detail(w, node, address)
    );
}

/// The `count` lines `sub` is expected to receive (waiting up to `wait`), and whatever else
/// comes in the `quiet` time after them.
fn receive(sub: &Sub, count: usize, wait: Duration, quiet: Duration) -> Vec<String> {
    let mut lines = sub.take(count, wait);
    lines.extend(sub.quiet(quiet));
    lines
}

/// Lines per topic/payload, ignoring bridge state notifications.
fn tally(lines: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines.iter().filter(|l| !l.starts_with("colony/bridge/")) {
        *m.entry(l.clone()).or_insert(0) += 1;
    }
    m
}

fn expect(lines: &[&str]) -> BTreeMap<String, usize> {
    lines.iter().map(|l| (l.to_string(), 1)).collect()
}

fn pub1(dir: &Path, port: u16, topic: &str, payload: &str) {
    publish(dir, port, 10, &["-q", "1", "-t", topic, "-m", payload]);
}

#[test]
fn two_nodes_out_in_both_and_prefixes_deliver_what_they_should_and_nothing_else() {
    let (p1, p2) = (free_tcp_port(), free_tcp_port());
    let config = site_and_cloud(
        p1,
        p2,
        r##"[
  { pattern = "up/#", direction = "out", qos = 1 },
  { pattern = "down/#", direction = "in", qos = 1 },
  { pattern = "sync/#", direction = "both", qos = 1 },
  { pattern = "#", direction = "out", qos = 1, local_prefix = "site/", remote_prefix = "sites/s1/" },
  { pattern = "cmd/#", direction = "in", qos = 0, local_prefix = "ctl/", remote_prefix = "sites/s1/" },
]"##,
        "",
    );
    let w = Workdir::new(&config);
    let _nodes = start_all(&w, &["site", "cloud"]);
    wait_connected(&w, "site", "site/bridge");
    let s1 = Sub::start(w.path(), p1, &["-q", "1", "-t", "#"]);
    let s2 = Sub::start(w.path(), p2, &["-q", "1", "-t", "#"]);
    let d = w.path();
    pub1(d, p1, "up/a", "1");
    pub1(d, p2, "up/b", "2"); // out only: stays on the cloud
    pub1(d, p2, "down/a", "3");
    pub1(d, p1, "down/b", "4"); // in only: stays on the site
    pub1(d, p1, "sync/x", "5");
    pub1(d, p2, "sync/y", "6");
    pub1(d, p1, "site/gas/1", "7");
    pub1(d, p2, "sites/s1/cmd/go", "8");
    pub1(d, p1, "other/x", "9"); // no rule
    let want1 = expect(&[
        "up/a 1",
        "down/a 3",
        "down/b 4",
        "sync/x 5",
        "sync/y 6",
        "site/gas/1 7",
        "ctl/cmd/go 8",
        "other/x 9",
    ]);
    let want2 = expect(&[
        "up/a 1",
        "up/b 2",
        "down/a 3",
        "sync/x 5",
        "sync/y 6",
        "sites/s1/gas/1 7",
        "sites/s1/cmd/go 8",
    ]);
    // Nothing more comes: no echo, no loop, nothing unbridged.
    let got1 = receive(&s1, want1.len(), SECS, Duration::from_secs(2));
    let got2 = receive(&s2, want2.len(), SECS, Duration::from_secs(1));
    assert_eq!(tally(&got1), want1, "site subscriber");
    assert_eq!(tally(&got2), want2, "cloud subscriber");

    // Status (sampled once a second): three each way, nothing left in the spool.
    let ok = wait_for(SECS, || {
        let b = detail(&w, "site", "site/bridge");
        b["connected"] == true
            && b["forwarded_out"] == 3
            && b["forwarded_in"] == 3
            && b["spool_depth"] == 0
    });
    assert!(ok, "{}", detail(&w, "site", "site/bridge"));

    // The bridge answers a status call; anything else is refused, and it keeps running.
    let reply = w.ctl_json("site", &["call", "site/bridge", r#"{"status": {}}"#]);
    assert_eq!(reply["reply"]["remote"], "cloud/broker", "{reply}");
    let out = w.ctl("site", &["call", "site/bridge", r#"{"launch": {}}"#]);
    assert!(!out.status.success());

    // The connection state is retained on the site broker.
    let state = Sub::start(d, p1, &["-t", "colony/bridge/site/bridge/state"]);
    let line = state.take(1, SECS);
    assert!(
        line.first().is_some_and(|l| l.contains("\"connected\"")),
        "state: {line:?}"
    );

    // Rules change in place: `up/#` stops, `new/#` starts.
    let reloaded = config.replace(
        r#"{ pattern = "up/#", direction = "out", qos = 1 }"#,
        r#"{ pattern = "new/#", direction = "out", qos = 1 }"#,
    );
    let new_config = w.path().join("reloaded.toml");
    std::fs::write(&new_config, reloaded).unwrap();
    let out = w.ctl("site", &["reload", new_config.to_str().unwrap()]);
    assert_success(&out, "ctl");
    let restarts = actor(&w.status("site").unwrap(), "site/bridge").unwrap()["restarts"].clone();
    let ok = wait_for(SECS, || {
        pub1(d, p1, "new/z", "10");
        s2.take(1, Duration::from_millis(500))
            .iter()
            .any(|l| l == "new/z 10")
    });
    assert!(ok, "the new rule never forwarded");
    pub1(d, p1, "up/c", "11");
    let later = s2.quiet(Duration::from_secs(2));
    assert!(
        !later.iter().any(|l| l.starts_with("up/")),
        "the removed rule still forwards: {later:?}"
    );
    assert_eq!(
        actor(&w.status("site").unwrap(), "site/bridge").unwrap()["restarts"],
        restarts,
        "rules changed without a restart"
    );
}

#[test]
fn an_intermediate_broker_splits_topics_between_two_remotes() {
    let ports: Vec<u16> = (0..4).map(|_| free_tcp_port()).collect();
    let names = ["site", "mid", "r1", "r2"];
    let sites: Vec<(&str, u16)> = names.into_iter().zip(ports.iter().copied()).collect();
    let mut config = cluster(&sites);
    config += r##"
[[actor]]
name = "up"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mid/broker"
topics = [ { pattern = "#", direction = "out", qos = 1 } ]

[[actor]]
name = "to-r1"
node = "mid"
kind = "bridge"
local = "mid/broker"
remote = "r1/broker"
topics = [ { pattern = "gas/#", direction = "out", qos = 1 } ]

[[actor]]
name = "to-r2"
node = "mid"
kind = "bridge"
local = "mid/broker"
remote = "r2/broker"
topics = [ { pattern = "temp/#", direction = "out", qos = 1 } ]
"##;
    let w = Workdir::new(&config);
    let _nodes = start_all(&w, &names);
    wait_connected(&w, "site", "site/up");
    wait_connected(&w, "mid", "mid/to-r1");
    wait_connected(&w, "mid", "mid/to-r2");
    let r1 = Sub::start(w.path(), ports[2], &["-q", "1", "-t", "#"]);
    let r2 = Sub::start(w.path(), ports[3], &["-q", "1", "-t", "#"]);
    for i in 0..5 {
        pub1(w.path(), ports[0], &format!("gas/{i}"), "g");
        pub1(w.path(), ports[0], &format!("temp/{i}"), "t");
    }
    pub1(w.path(), ports[0], "other/x", "o");
    let g1 = receive(&r1, 5, SECS, Duration::from_secs(2));
    let g2 = receive(&r2, 5, SECS, Duration::from_millis(200));
    let want1: Vec<String> = (0..5).map(|i| format!("gas/{i} g")).collect();
    let want2: Vec<String> = (0..5).map(|i| format!("temp/{i} t")).collect();
    assert_eq!(
        tally(&g1),
        expect(&want1.iter().map(String::as_str).collect::<Vec<_>>())
    );
    assert_eq!(
        tally(&g2),
        expect(&want2.iter().map(String::as_str).collect::<Vec<_>>())
    );
}

#[test]
fn a_ring_of_both_direction_bridges_does_not_loop() {
    let ports: Vec<u16> = (0..3).map(|_| free_tcp_port()).collect();
    let names = ["a", "b", "c"];
    let sites: Vec<(&str, u16)> = names.into_iter().zip(ports.iter().copied()).collect();
    let mut config = cluster(&sites);
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        config += &format!(
            "[[actor]]\nname = \"to-{to}\"\nnode = \"{from}\"\nkind = \"bridge\"\n\
             local = \"{from}/broker\"\nremote = \"{to}/broker\"\n\
             topics = [ {{ pattern = \"ring/#\", direction = \"both\", qos = 1 }} ]\n\n"
        );
    }
    let w = Workdir::new(&config);
    let _nodes = start_all(&w, &names);
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a")] {
        wait_connected(&w, from, &format!("{from}/to-{to}"));
    }
    let subs: Vec<Sub> = ports
        .iter()
        .map(|p| Sub::start(w.path(), *p, &["-q", "1", "-t", "ring/#"]))
        .collect();
    pub1(w.path(), ports[0], "ring/x", "once");
    assert_no_loop(&subs, "ring/x once");
    let stopped: u64 = [("a", "a/to-b"), ("b", "b/to-c"), ("c", "c/to-a")]
        .iter()
        .map(|(n, a)| detail(&w, n, a)["loops_stopped"].as_u64().unwrap_or(0))
        .sum();
    assert!(stopped > 0, "no bridge stopped a looping message");
}

const MQ_USER: &str = "bridge";
const MQ_PASS: &str = "bridge-secret";

#[test]
fn colony_and_a_real_mosquitto_bridge_both_ways_over_tls_with_a_password() {
    let (p1, mp, mt) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "bridge"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mqtts://127.0.0.1:{mt}"
ca = "ca.pem"
cert = "client.pem"
key = "client.key"
username = "{MQ_USER}"
password = "{MQ_PASS}"
keepalive_secs = 5
topics = [
  {{ pattern = "up/#", direction = "out", qos = 1 }},
  {{ pattern = "down/#", direction = "in", qos = 1 }},
  {{ pattern = "sync/#", direction = "both", qos = 1 }},
  {{ pattern = "#", direction = "out", qos = 0, local_prefix = "q0/", remote_prefix = "site/q0/" }},
]
"##,
        cluster(&[("site", p1)]),
    );
    let w = Workdir::new(&config);
    make_certs(w.path());
    let _m = mosquitto_with_user(&w, mp, Some(mt));
    let _nodes = start_all(&w, &["site"]);
    wait_connected(&w, "site", "site/bridge");
    exchange_with_mosquitto(&w, p1, mp, true);
    let b = detail(&w, "site", "site/bridge");
    assert_eq!(b["address"], format!("mqtts://127.0.0.1:{mt}"), "{b}");
}

#[test]
fn an_mqtt_3_1_1_bridge_to_mosquitto_forwards_both_ways_and_drops_its_own_echoes() {
    let (p1, mp) = (free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "bridge"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mqtt://127.0.0.1:{mp}"
mqtt_version = "3.1.1"
client_id = "site-bridge-311"
username = "{MQ_USER}"
password = "{MQ_PASS}"
topics = [
  {{ pattern = "up/#", direction = "out", qos = 1 }},
  {{ pattern = "down/#", direction = "in", qos = 1 }},
  {{ pattern = "sync/#", direction = "both", qos = 1 }},
]
"##,
        cluster(&[("site", p1)]),
    );
    let w = Workdir::new(&config);
    let m = mosquitto_with_user(&w, mp, None);
    let _nodes = start_all(&w, &["site"]);
    wait_connected(&w, "site", "site/bridge");
    // Mosquitto names the protocol of each client it accepts: p2 is MQTT 3.1.1.
    let log = m.log_text();
    assert!(
        log.lines().any(|l| l.contains("as site-bridge-311 (p2,")),
        "{log}"
    );
    // Without no-local, Mosquitto sends `sync/x 5` back to the bridge, which must not publish it
    // at the site a second time.
    exchange_with_mosquitto(&w, p1, mp, false);
    let b = detail(&w, "site", "site/bridge");
    assert_eq!(b["loops_stopped"], 1, "{b}");
    assert_eq!(b["forwarded_out"], 2, "{b}");
    assert_eq!(b["forwarded_in"], 2, "{b}");
}

/// Mosquitto on `port` (and TLS on `tls_port`) that takes the test user only.
fn mosquitto_with_user(w: &Workdir, port: u16, tls_port: Option<u16>) -> Mosquitto {
    Mosquitto::start(
        w.path(),
        &MosquittoSetup {
            name: "mosq",
            port,
            tls_port,
            user: Some((MQ_USER, MQ_PASS)),
            extra: "",
        },
    )
}

/// One message each way under the rules `up/# out`, `down/# in` and `sync/# both` between the
/// site broker (on `p1`) and Mosquitto (on `mp`, with the test user), and with `qos0` one more
/// at QoS 0 under `# out` from `q0/` to `site/q0/`: each subscriber gets what the rules deliver,
/// each once, and nothing else.
fn exchange_with_mosquitto(w: &Workdir, p1: u16, mp: u16, qos0: bool) {
    let auth = ["-u", MQ_USER, "-P", MQ_PASS];
    let mut args = vec!["-q", "1", "-t", "#"];
    args.extend(auth);
    let s1 = Sub::start(w.path(), p1, &["-q", "1", "-t", "#"]);
    let sm = Sub::start(w.path(), mp, &args);
    let d = w.path();
    let mpub = |topic: &str, payload: &str| {
        let mut a = vec!["-q", "1", "-t", topic, "-m", payload];
        a.extend(auth);
        publish(d, mp, 10, &a);
    };
    pub1(d, p1, "up/a", "1");
    mpub("up/b", "2");
    mpub("down/a", "3");
    pub1(d, p1, "down/b", "4");
    pub1(d, p1, "sync/x", "5");
    mpub("sync/y", "6");
    let mut want1 = vec!["up/a 1", "down/a 3", "down/b 4", "sync/x 5", "sync/y 6"];
    let mut want2 = vec!["up/a 1", "up/b 2", "down/a 3", "sync/x 5", "sync/y 6"];
    if qos0 {
        publish(d, p1, 10, &["-q", "0", "-t", "q0/t", "-m", "7"]);
        want1.push("q0/t 7");
        want2.push("site/q0/t 7");
    }
    let (want1, want2) = (expect(&want1), expect(&want2));
    let got1 = receive(&s1, want1.len(), SECS, Duration::from_secs(2));
    let got2 = receive(&sm, want2.len(), SECS, Duration::from_secs(1));
    assert_eq!(tally(&got1), want1, "colony subscriber");
    assert_eq!(tally(&got2), want2, "mosquitto subscriber");
}

/// `count` JSON readings of source `s1` with seq `from..from+count`, one per line.
fn readings(dir: &Path, name: &str, from: u64, count: u64) -> std::path::PathBuf {
    let mut text = String::new();
    for seq in from..from + count {
        text += &reading_line(seq);
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// One JSON reading of source `s1` with seq `seq`, as [`readings`] writes them.
fn reading_line(seq: u64) -> String {
    format!(
        "{{\"source\": \"s1\", \"seq\": {seq}, \"ts\": {}, \"value\": 1.5}}",
        1_700_000_000_000u64 + seq
    )
}

/// Publishes the lines of `file` as QoS 1 messages to `topic` at `port`, in order.
fn publish_lines(dir: &Path, port: u16, topic: &str, file: &Path, auth: &[&str]) {
    let mut args = vec!["-q", "1", "-t", topic];
    args.extend_from_slice(auth);
    mqtt::publish_lines(dir, port, 60, &args, file);
}

/// The collector query for its counts.
const COUNTS: &str = r#"{"query": {"counts": {}}}"#;

/// The collector at `address` has source `s1` up to `highest`, none out of order; returns its
/// status detail.
fn assert_all_in_order(w: &Workdir, address: &str, highest: u64) -> serde_json::Value {
    let node = address.split('/').next().unwrap_or_default();
    let col = detail(w, node, address);
    let s1 = &col["per_source"][0];
    assert_eq!(s1["source"], "s1", "{col}");
    assert_eq!(s1["highest"], highest, "{col}");
    assert_eq!(s1["reordered"], 0, "{col}");
    col
}

/// The bridge `site/bridge` has nothing left in its spool.
fn assert_spool_empty(w: &Workdir) {
    let b = detail(w, "site", "site/bridge");
    assert_eq!(b["spool_depth"], 0, "{b}");
}

fn kill_actor(w: &Workdir, node: &str, address: &str) {
    w.ctl_ok(node, &["kill", address]);
}

fn wait_spooled(w: &Workdir, node: &str, address: &str, at_least: u64) {
    let ok = wait_for(SECS, || {
        w.status(node)
            .and_then(|s| actor(&s, address).map(|a| a["detail"]["spool_depth"].as_u64()))
            .flatten()
            .is_some_and(|n| n >= at_least)
    });
    assert!(
        ok,
        "spool never reached {at_least}: {}",
        detail(w, node, address)
    );
}

/// A far broker drops a publish at or below its stream's mark as a repeat: a bridge whose
/// spool is made afresh (its data directory cleared) numbers from 1 again, so it must not go
/// on under the old stream, or its messages would vanish until they passed the old mark.
#[test]
fn a_bridge_whose_data_directory_was_cleared_is_not_taken_for_a_repeat() {
    let (p1, p2) = (free_tcp_port(), free_tcp_port());
    let config = site_and_cloud(
        p1,
        p2,
        r##"[ { pattern = "gas/#", direction = "out", qos = 1 } ]"##,
        "",
    );
    let w = Workdir::new(&config);
    let mut nodes = start_all(&w, &["site", "cloud"]);
    wait_connected(&w, "site", "site/bridge");
    let d = w.path();
    let far = Sub::spawn(d, p2, &["-q", "1", "-t", "gas/#"]);
    far.wait_ready();
    for n in 1..=5 {
        pub1(d, p1, "gas/s1", &format!("before-{n}"));
    }
    assert_eq!(far.take(5, SECS).len(), 5);
    nodes[0].signal(15);
    assert!(nodes[0].wait_exit(SECS).is_some(), "site did not stop");
    let data = d.join(".colony/br/site/bridge");
    assert!(
        data.join("spool.sqlite").exists(),
        "no spool in {}",
        data.display()
    );
    std::fs::remove_dir_all(&data).unwrap();
    nodes[0] = w.start_node("site");
    wait_connected(&w, "site", "site/bridge");
    for n in 1..=3 {
        pub1(d, p1, "gas/s1", &format!("after-{n}"));
    }
    let got = receive(&far, 3, SECS, Duration::from_millis(500));
    assert_eq!(
        tally(&got),
        expect(&["gas/s1 after-1", "gas/s1 after-2", "gas/s1 after-3"]),
        "bridge: {}",
        detail(&w, "site", "site/bridge")
    );
}

#[test]
fn ten_thousand_messages_survive_a_remote_outage_a_bridge_kill_and_a_node_restart() {
    let (p1, p2) = (free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "collector"
node = "cloud"
kind = "collector"
database = "readings.sqlite"
source = {{ broker = "cloud/broker", topics = ["gas/#"], via = "actor" }}
"##,
        site_and_cloud(
            p1,
            p2,
            r##"[ { pattern = "gas/#", direction = "out", qos = 1 } ]"##,
            ""
        ),
    );
    let w = Workdir::new(&config);
    let mut nodes = start_all(&w, &["site", "cloud"]);
    wait_connected(&w, "site", "site/bridge");
    let d = w.path();
    let broker_in = |w: &Workdir| {
        w.status("cloud")
            .and_then(|s| actor(&s, "cloud/broker").map(|a| a["detail"]["messages_in"].as_u64()))
            .flatten()
    };
    publish_lines(d, p1, "gas/s1", &readings(d, "a.txt", 1, 2000), &[]);
    let through = wait_for(SECS, || broker_in(&w) == Some(2000));
    assert!(through, "first part: {:?}", broker_in(&w));
    // The far node is stopped.
    nodes[1].signal(15);
    assert!(nodes[1].wait_exit(SECS).is_some(), "cloud did not stop");
    publish_lines(d, p1, "gas/s1", &readings(d, "b.txt", 2001, 4000), &[]);
    kill_actor(&w, "site", "site/bridge");
    publish_lines(d, p1, "gas/s1", &readings(d, "c.txt", 6001, 4000), &[]);
    wait_spooled(&w, "site", "site/bridge", 1);
    // The site node restarts too, with its spool on disk.
    nodes[0].kill9();
    nodes[0] = w.start_node("site");
    std::thread::sleep(Duration::from_secs(3));
    nodes[1] = w.start_node("cloud");
    let counts = || w.try_call("cloud", "cloud/collector", COUNTS);
    // Mid-way through the catch-up the site node crashes again, with calls in flight.
    let midway = wait_for(Duration::from_secs(60), || {
        broker_in(&w).is_some_and(|n| n >= 1000)
    });
    assert!(midway, "catch-up never started: {:?}", broker_in(&w));
    nodes[0].kill9();
    nodes[0] = w.start_node("site");
    let ok = wait_for(Duration::from_secs(120), || {
        w.status("cloud").is_some_and(|s| healthy(&s)) && counts()["readings"] == 10_000
    });
    assert!(
        ok,
        "readings: {}\nbridge: {}",
        counts(),
        detail(&w, "site", "site/bridge")
    );
    let c = counts();
    assert_eq!(c["gaps"], 0, "{c}");
    // The bridge delivered each message once: the far broker accepted exactly the 8,000 sent
    // since it restarted (repeats of a stream's messages are acknowledged but not routed).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(broker_in(&w), Some(8000));
    // And the collector stored each once, in order.
    assert_all_in_order(&w, "cloud/collector", 10_000);
    assert_eq!(c["readings"], 10_000, "{c}");
    assert_spool_empty(&w);
}

#[test]
fn ten_thousand_messages_come_in_from_a_colony_remote_across_a_local_outage_and_a_bridge_kill() {
    let (p1, p2) = (free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "collector"
node = "site"
kind = "collector"
database = "commands.sqlite"
source = {{ broker = "site/broker", topics = ["cmd/#"] }}
"##,
        site_and_cloud(
            p1,
            p2,
            r##"[ { pattern = "cmd/#", direction = "in", qos = 1 } ]"##,
            ""
        ),
    );
    let w = Workdir::new(&config);
    let mut nodes = start_all(&w, &["site", "cloud"]);
    wait_connected(&w, "site", "site/bridge");
    let d = w.path();
    // The collector's counts; null while the site node is (re)starting.
    let stored = |w: &Workdir| w.try_call("site", "site/collector", COUNTS);
    publish_lines(d, p2, "cmd/s1", &readings(d, "a.txt", 1, 2000), &[]);
    let through = wait_for(SECS, || stored(&w)["readings"] == 2000);
    assert!(through, "first part: {}", stored(&w));
    // The local node (bridge, broker and collector) is down while the remote takes 4,000.
    nodes[0].signal(15);
    assert!(nodes[0].wait_exit(SECS).is_some(), "site did not stop");
    publish_lines(d, p2, "cmd/s1", &readings(d, "b.txt", 2001, 4000), &[]);
    nodes[0] = w.start_node("site");
    // The bridge is killed during the catch-up, then 4,000 more come.
    let started = wait_for(Duration::from_secs(60), || {
        stored(&w)["readings"].as_u64().is_some_and(|n| n > 2000)
    });
    assert!(started, "catch-up never started: {}", stored(&w));
    kill_actor(&w, "site", "site/bridge");
    publish_lines(d, p2, "cmd/s1", &readings(d, "c.txt", 6001, 4000), &[]);
    let ok = wait_for(Duration::from_secs(120), || {
        stored(&w)["readings"] == 10_000
    });
    assert!(
        ok,
        "readings: {}\nbridge: {}",
        stored(&w),
        detail(&w, "site", "site/bridge")
    );
    let c = stored(&w);
    assert_eq!(c["gaps"], 0, "{c}");
    // Each message reached the collector once (a stream's repeats are acknowledged by the local
    // broker, not routed), in order.
    std::thread::sleep(Duration::from_secs(2));
    let col = assert_all_in_order(&w, "site/collector", 10_000);
    assert_eq!(col["per_source"][0]["duplicates"], 0, "{col}");
    assert_spool_empty(&w);
}

/// A site node whose bridge forwards `gas/#` out at QoS 1 to a Mosquitto with a password, and
/// a far subscriber there with a persistent session. Fields drop in order, processes first, so
/// a test keeps it whole (a destructured binding would drop the directory first).
struct ToMosquitto {
    far: Sub,
    _nodes: Vec<NodeProc>,
    m: Mosquitto,
    w: Workdir,
    /// The site broker's MQTT port.
    p1: u16,
}

fn site_bridged_to_mosquitto() -> ToMosquitto {
    let (p1, mp) = (free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "bridge"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mqtt://127.0.0.1:{mp}"
username = "{MQ_USER}"
password = "{MQ_PASS}"
reconnect_max_ms = 1000
topics = [ {{ pattern = "gas/#", direction = "out", qos = 1 }} ]
"##,
        cluster(&[("site", p1)]),
    );
    let w = Workdir::new(&config);
    let m = mosquitto_with_user(&w, mp, None);
    let nodes = start_all(&w, &["site"]);
    wait_connected(&w, "site", "site/bridge");
    let far = Sub::start(
        w.path(),
        mp,
        &[
            "-q", "1", "-c", "-i", "far", "-t", "gas/#", "-u", MQ_USER, "-P", MQ_PASS,
        ],
    );
    ToMosquitto {
        far,
        _nodes: nodes,
        m,
        w,
        p1,
    }
}

#[test]
fn ten_thousand_messages_reach_mosquitto_after_it_was_stopped_and_the_bridge_killed() {
    // Held whole, so that its fields drop in their order (processes before the directory).
    let mut setup = site_bridged_to_mosquitto();
    let (far, m, w, p1) = (&setup.far, &mut setup.m, &setup.w, setup.p1);
    let d = w.path();
    publish_lines(d, p1, "gas/s1", &readings(d, "a.txt", 1, 2000), &[]);
    // MQTT QoS 1 is at least once: a message in flight when the connection breaks is sent
    // again. Stop Mosquitto once the first part is through, so the rest is exactly once.
    let through = wait_for(SECS, || {
        let b = detail(w, "site", "site/bridge");
        b["forwarded_out"] == 2000 && b["spool_depth"] == 0
    });
    assert!(through, "{}", detail(w, "site", "site/bridge"));
    m.stop();
    publish_lines(d, p1, "gas/s1", &readings(d, "b.txt", 2001, 4000), &[]);
    kill_actor(w, "site", "site/bridge");
    publish_lines(d, p1, "gas/s1", &readings(d, "c.txt", 6001, 4000), &[]);
    wait_spooled(w, "site", "site/bridge", 1);
    std::thread::sleep(Duration::from_secs(2));
    m.restart();
    let seqs = far_seqs(far, 10_000);
    let want: Vec<u64> = (1..=10_000).collect();
    if seqs != want {
        panic!(
            "{}; bridge {}\n{}",
            seq_report(&seqs, 10_000),
            detail(w, "site", "site/bridge"),
            m.log_text()
        );
    }
}

/// The reading seqs `far` receives: `n` of them, then whatever comes within 2 s more.
fn far_seqs(far: &Sub, n: usize) -> Vec<u64> {
    let mut lines = far.take(n, Duration::from_secs(120));
    lines.extend(far.quiet(Duration::from_secs(2)));
    lines
        .iter()
        .map(|l| {
            let json = l.split_once(' ').map_or("", |x| x.1);
            serde_json::from_str::<serde_json::Value>(json).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// What is wrong with `seqs` against `1..=n`: count, duplicates, missing.
fn seq_report(seqs: &[u64], n: u64) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let dups: Vec<_> = seqs.iter().filter(|s| !seen.insert(**s)).take(20).collect();
    let missing: Vec<_> = (1..=n).filter(|s| !seen.contains(s)).collect();
    format!(
        "got {} messages; duplicates {dups:?}; {} missing {:?}..{:?}",
        seqs.len(),
        missing.len(),
        missing.first(),
        missing.last(),
    )
}

#[test]
fn messages_in_flight_without_the_spool_survive_a_bridge_kill_and_a_mosquitto_crash_in_order() {
    // Held whole, so that its fields drop in their order (processes before the directory).
    let mut setup = site_bridged_to_mosquitto();
    let (far, m, w, p1) = (&setup.far, &mut setup.m, &setup.w, setup.p1);
    let d = w.path();
    let broker_handled = || {
        let s = w.status("site").expect("status");
        actor(&s, "site/broker").expect("broker in status")["messages_handled"]
            .as_u64()
            .unwrap()
    };
    let handled_before = broker_handled();
    // A link that keeps up gets the broker's messages without the spool.
    for n in 1..=20 {
        pub1(d, p1, "gas/s1", &reading_line(n));
    }
    let direct = wait_for(SECS, || {
        detail(w, "site", "site/bridge")["forwarded_out"] == 20
    });
    let b = detail(w, "site", "site/bridge");
    assert!(direct, "{b}");
    assert_eq!(b["forwarded_direct"], 20, "{b}");
    // Each message costs the broker its publish and at most one acknowledgement from the
    // bridge, sent once Mosquitto has it: no call that acknowledges nothing.
    std::thread::sleep(Duration::from_millis(500));
    let handled = broker_handled() - handled_before;
    assert!(
        handled <= 2 * 20 + 5,
        "the broker handled {handled} messages for 20"
    );
    // The bridge is killed right after a burst: what it had in flight is the broker's still,
    // which sends it again.
    publish_lines(d, p1, "gas/s1", &readings(d, "a.txt", 21, 3000), &[]);
    kill_actor(w, "site", "site/bridge");
    let mut seqs = far_seqs(far, 3020);
    // Mosquitto freezes with messages in flight, and is killed: the link goes down with them
    // still unacknowledged, and they go into the spool ahead of what comes next. Then again
    // with more than the bridge keeps in flight, so that it starts spooling while the link is
    // still up.
    let mut next = 3021;
    for (burst, after) in [(200, 300), (3000, 300)] {
        // Mosquitto saves its sessions each second: what it has must be on disk first.
        std::thread::sleep(Duration::from_millis(1500));
        m.pause();
        let file = readings(d, &format!("p{next}.txt"), next, burst);
        publish_lines(d, p1, "gas/s1", &file, &[]);
        m.kill();
        let file = readings(d, &format!("q{next}.txt"), next + burst, after);
        publish_lines(d, p1, "gas/s1", &file, &[]);
        m.restart();
        next += burst + after;
        seqs.extend(far_seqs(far, (burst + after) as usize));
    }
    let total = next - 1;
    // At least once across the kill (what was in flight may come twice), but complete, and
    // each message first arrives in order.
    let mut firsts = std::collections::BTreeSet::new();
    let order: Vec<u64> = seqs.iter().copied().filter(|s| firsts.insert(*s)).collect();
    let want: Vec<u64> = (1..=total).collect();
    assert!(
        order == want,
        "{}; bridge {}\n{}",
        seq_report(&seqs, total),
        detail(w, "site", "site/bridge"),
        m.log_text()
    );
    let done = wait_for(SECS, || {
        detail(w, "site", "site/bridge")["spool_depth"] == 0
    });
    assert!(done, "{}", detail(w, "site", "site/bridge"));
}

#[test]
fn a_qos_0_burst_while_mosquitto_is_frozen_is_forwarded_without_drops_once_it_is_back() {
    let setup = site_bridged_to_mosquitto();
    let (m, w, p1) = (&setup.m, &setup.w, setup.p1);
    let d = w.path();
    // Mosquitto freezes while a burst comes: the link cannot write. The bridge hands the MQTT
    // client only what it can queue, and keeps the rest in its own queue (65,536) instead of
    // having the client drop it.
    // 1 kB each, so that socket buffers cannot take them all.
    const BURST: u64 = 40_000;
    let line = format!("{}\n", "x".repeat(1000));
    let file = d.join("burst.txt");
    std::fs::write(&file, line.repeat(BURST as usize)).unwrap();
    m.pause();
    mqtt::publish_lines(d, p1, 60, &["-q", "0", "-t", "gas/s1"], &file);
    std::thread::sleep(Duration::from_millis(500));
    m.resume();
    let b = || detail(w, "site", "site/bridge");
    let all = wait_for(SECS, || b()["forwarded_out"] == BURST);
    assert!(all, "{}", b());
    assert_eq!(b()["dropped_qos0"], 0, "{}", b());
}

#[test]
fn an_external_bridge_fails_over_and_goes_back_to_the_primary() {
    let (p1, primary, secondary) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "bridge"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mqtt://127.0.0.1:{primary}"
failover = ["mqtt://127.0.0.1:{secondary}"]
username = "{MQ_USER}"
password = "{MQ_PASS}"
reconnect_min_ms = 100
reconnect_max_ms = 500
primary_retry_secs = 1
topics = [ {{ pattern = "up/#", direction = "out", qos = 1 }} ]
"##,
        cluster(&[("site", p1)]),
    );
    let w = Workdir::new(&config);
    let setup = |name, port| MosquittoSetup {
        name,
        port,
        tls_port: None,
        user: Some((MQ_USER, MQ_PASS)),
        extra: "",
    };
    // Only the secondary is there at first.
    let _s = Mosquitto::start(w.path(), &setup("secondary", secondary));
    let _nodes = start_all(&w, &["site"]);
    let on = |port: u16| {
        let want = format!("mqtt://127.0.0.1:{port}");
        let ok = wait_for(Duration::from_secs(20), || {
            let b = detail(&w, "site", "site/bridge");
            b["connected"] == true && b["address"] == want.as_str()
        });
        assert!(ok, "not on {want}: {}", detail(&w, "site", "site/bridge"));
    };
    on(secondary);
    let auth = ["-u", MQ_USER, "-P", MQ_PASS];
    let mut args = vec!["-q", "1", "-t", "up/#"];
    args.extend(auth);
    let sub_s = Sub::start(w.path(), secondary, &args);
    pub1(w.path(), p1, "up/1", "to-secondary");
    assert_eq!(sub_s.take(1, SECS), ["up/1 to-secondary"]);

    // The primary comes up: the bridge goes back to it.
    let _p = Mosquitto::start(w.path(), &setup("primary", primary));
    on(primary);
    let sub_p = Sub::start(w.path(), primary, &args);
    pub1(w.path(), p1, "up/2", "to-primary");
    assert_eq!(sub_p.take(1, SECS), ["up/2 to-primary"]);
    assert!(sub_s.quiet(Duration::from_millis(500)).is_empty());
    let b = detail(&w, "site", "site/bridge");
    assert!(b["reconnects"].as_u64().unwrap_or(0) >= 1, "{b}");
}

#[test]
fn a_full_spool_drops_the_oldest_and_counts_them() {
    let (p1, p2) = (free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "collector"
node = "cloud"
kind = "collector"
database = "readings.sqlite"
source = {{ broker = "cloud/broker", topics = ["gas/#"], via = "actor" }}
"##,
        site_and_cloud(
            p1,
            p2,
            r##"[ { pattern = "gas/#", direction = "out", qos = 1 } ]"##,
            "spool_max_messages = 100"
        ),
    );
    let w = Workdir::new(&config);
    // Only the site runs: the far side is unreachable from the start.
    let site = w.start_node("site");
    let up = wait_for(SECS, || {
        std::net::TcpStream::connect(("127.0.0.1", p1)).is_ok()
            && w.status("site")
                .is_some_and(|s| actor(&s, "site/bridge").is_some_and(|a| a["state"] == "running"))
    });
    assert!(up, "site never came up:\n{}", site.log_text());
    let d = w.path();
    publish_lines(d, p1, "gas/s1", &readings(d, "a.txt", 1, 300), &[]);
    let ok = wait_for(SECS, || {
        let b = detail(&w, "site", "site/bridge");
        b["spool_out"]["messages"] == 100 && b["spool_out"]["dropped_full"] == 200
    });
    assert!(ok, "{}", detail(&w, "site", "site/bridge"));
    assert_eq!(detail(&w, "site", "site/bridge")["connected"], false);
    // The far side comes: it gets the newest 100, in order.
    let _cloud = w.start_node("cloud");
    wait_connected(&w, "site", "site/bridge");
    let ok = wait_for(SECS, || {
        let b = detail(&w, "site", "site/bridge");
        b["spool_out"]["messages"] == 0 && b["forwarded_out"] == 100
    });
    assert!(ok, "{}", detail(&w, "site", "site/bridge"));
    // Exactly 201..=300 arrived: 100 readings, the highest 300, no gap after the first.
    let ok = wait_for(SECS, || {
        detail(&w, "cloud", "cloud/collector")["per_source"][0]["received"] == 100
    });
    let col = detail(&w, "cloud", "cloud/collector");
    assert!(ok, "{col}");
    let s1 = &col["per_source"][0];
    assert_eq!(
        (s1["highest"].as_u64(), s1["gaps"].as_u64()),
        (Some(300), Some(0)),
        "{col}"
    );
    assert_eq!(s1["reordered"], 0, "{col}");
}

#[test]
fn hops_travel_through_mosquitto_so_a_mixed_ring_does_not_loop() {
    let (pa, pb, mp) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
    let mut config = cluster(&[("a", pa), ("b", pb)]);
    for (n, remote) in [
        ("a", format!("mqtt://127.0.0.1:{mp}")),
        ("b", format!("mqtt://127.0.0.1:{mp}")),
        ("a", "b/broker".to_owned()),
    ] {
        let name = if remote.starts_with("mqtt") {
            "to-m"
        } else {
            "to-b"
        };
        config += &format!(
            "[[actor]]\nname = \"{name}\"\nnode = \"{n}\"\nkind = \"bridge\"\n\
             local = \"{n}/broker\"\nremote = \"{remote}\"\n\
             topics = [ {{ pattern = \"x/#\", direction = \"both\", qos = 1 }} ]\n\n"
        );
    }
    let w = Workdir::new(&config);
    let _m = Mosquitto::start(
        w.path(),
        &MosquittoSetup {
            name: "mosq",
            port: mp,
            tls_port: None,
            user: None,
            extra: "",
        },
    );
    let _nodes = start_all(&w, &["a", "b"]);
    for (n, a) in [("a", "a/to-m"), ("b", "b/to-m"), ("a", "a/to-b")] {
        wait_connected(&w, n, a);
    }
    let subs: Vec<Sub> = [pa, pb, mp]
        .iter()
        .map(|p| Sub::start(w.path(), *p, &["-q", "1", "-t", "x/#"]))
        .collect();
    pub1(w.path(), pa, "x/1", "m");
    // Without the hops carried through Mosquitto, a/broker would get its message back from b.
    assert_no_loop(&subs, "x/1 m");
}

/// One message published at the first subscriber's broker of a ring: that broker never gets it
/// back; the others get it once per path (two paths in a ring of three), and then it stops, with
/// nothing left circulating.
fn assert_no_loop(subs: &[Sub], line: &str) {
    let got: Vec<Vec<String>> = subs
        .iter()
        .map(|s| {
            let mut l = s.take(1, SECS);
            l.extend(s.quiet(Duration::from_secs(3)));
            l
        })
        .collect();
    assert_eq!(got[0], [line], "a got it back");
    for (i, g) in got.iter().enumerate().skip(1) {
        assert!(
            (1..=2).contains(&g.len()) && g.iter().all(|l| l == line),
            "broker {i}: {g:?}"
        );
    }
    for s in subs {
        assert!(s.quiet(Duration::from_secs(1)).is_empty());
    }
}

#[test]
fn mosquitto_keeps_the_bridge_session_while_the_bridge_is_stopped() {
    let (p1, mp) = (free_tcp_port(), free_tcp_port());
    let config = format!(
        r##"{}
[[actor]]
name = "bridge"
node = "site"
kind = "bridge"
local = "site/broker"
remote = "mqtt://127.0.0.1:{mp}"
topics = [ {{ pattern = "down/#", direction = "in", qos = 1 }} ]
"##,
        cluster(&[("site", p1)]),
    );
    let w = Workdir::new(&config);
    let _m = Mosquitto::start(
        w.path(),
        &MosquittoSetup {
            name: "mosq",
            port: mp,
            tls_port: None,
            user: None,
            extra: "",
        },
    );
    let _nodes = start_all(&w, &["site"]);
    wait_connected(&w, "site", "site/bridge");
    let sub = Sub::start(w.path(), p1, &["-q", "1", "-t", "down/#"]);
    let out = w.ctl("site", &["stop", "site/bridge"]);
    assert_success(&out, "ctl");
    // While the bridge is away, Mosquitto queues for its persistent session.
    let d = w.path();
    publish_lines(d, mp, "down/cmd", &readings(d, "a.txt", 1, 200), &[]);
    let out = w.ctl("site", &["start", "site/bridge"]);
    assert_success(&out, "ctl");
    let got = receive(&sub, 200, Duration::from_secs(30), Duration::from_secs(1));
    let seqs: Vec<u64> = got
        .iter()
        .map(|l| {
            let json = l.split_once(' ').map_or("", |x| x.1);
            serde_json::from_str::<serde_json::Value>(json).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
}
