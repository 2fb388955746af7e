//! Collectors end to end, beyond `sensors.rs`: `colony export` from a collector on another node,
//! sensors over mqtts, CBOR and templated payloads, `via = "actor"` collection, in-place reload
//! of sensor and collector settings, and readings published before the collector subscribed.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use colony_tests::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn wait_healthy(work: &Workdir, node: &str, nodes: &[&NodeProc]) {
    let ok = wait_for(Duration::from_secs(30), || {
        work.status(node).is_some_and(|s| healthy(&s))
    });
    if !ok {
        for n in nodes {
            eprintln!("--- {} ---\n{}", n.name, n.log_text());
        }
    }
    assert!(ok, "never healthy: {:?}", work.status(node));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// CSV rows (header first) split into fields; the test's values hold no quotes or commas
/// except in the `values` column, which is quoted JSON.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|line| {
            let mut fields = Vec::new();
            let mut field = String::new();
            let mut quoted = false;
            let mut chars = line.chars().peekable();
            while let Some(ch) = chars.next() {
                match ch {
                    '"' if quoted && chars.peek() == Some(&'"') => {
                        field.push('"');
                        chars.next();
                    }
                    '"' => quoted = !quoted,
                    ',' if !quoted => fields.push(std::mem::take(&mut field)),
                    c => field.push(c),
                }
            }
            fields.push(field);
            fields
        })
        .collect()
}

#[test]
fn export_writes_csv_from_a_collector_on_another_node() {
    let (q1, q2, udp) = (free_udp_port(), free_udp_port(), free_udp_port());
    let config = format!(
        r#"
[cluster]
name = "export"

[[node]]
name = "core"
listen = "127.0.0.1:{q1}"

[[node]]
name = "edge"
listen = "127.0.0.1:{q2}"

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "readings.sqlite"
flush_ms = 50
source = {{ udp = "127.0.0.1:{udp}" }}
"#
    );
    let work = Workdir::new(&config);
    let core = work.start_node("core");
    let edge = work.start_node("edge");
    wait_healthy(&work, "edge", &[&core, &edge]);

    let device = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = format!("127.0.0.1:{udp}");
    for seq in 1..=3 {
        let r =
            format!(r#"{{"source": "dev-a", "seq": {seq}, "ts": {seq}000, "value": {seq}.25}}"#);
        device.send_to(r.as_bytes(), &to).unwrap();
    }
    let stored = |n: i64| {
        wait_for(Duration::from_secs(10), || {
            let reply = work.call("edge", "core/store", r#"{"flush": {}}"#);
            reply["stored"].as_i64() == Some(n)
        })
    };
    assert!(stored(3), "dev-a readings never stored");
    std::thread::sleep(Duration::from_millis(20));
    let between = now_ms();
    std::thread::sleep(Duration::from_millis(20));
    device
        .send_to(
            br#"{"source": "dev-b", "seq": 1, "ts": 5000, "values": {"temp": 21.5, "rh": 40}}"#,
            &to,
        )
        .unwrap();
    device
        .send_to(
            b"9-Gas Sensor IP:10.0.0.9 MAC:02:00:00:00:00:09 Reading value=412.5 requested",
            &to,
        )
        .unwrap();
    assert!(stored(5), "later readings never stored");

    // Everything, to a file, through the other node's control socket.
    let csv_path = work.path().join("out/all.csv");
    std::fs::create_dir_all(csv_path.parent().unwrap()).unwrap();
    let cfg = work.config_str();
    let out = work.colony(&[
        "export",
        "core/store",
        "--config",
        cfg,
        "--node",
        "edge",
        "-o",
        csv_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("5 readings from core/store"),
        "{}",
        stderr(&out)
    );
    let rows = csv_rows(&std::fs::read_to_string(&csv_path).unwrap());
    assert_eq!(
        rows[0].join(","),
        "source,epoch,seq,topic,value,values,sensor_type,ip,mac,sent_ms,received_ms,flags"
    );
    assert_eq!(rows.len(), 6, "{rows:?}");
    let a: Vec<_> = rows[1..4]
        .iter()
        .map(|r| (r[0].as_str(), r[2].as_str(), r[4].as_str(), r[9].as_str()))
        .collect();
    assert_eq!(
        a,
        vec![
            ("dev-a", "1", "1.25", "1000"),
            ("dev-a", "2", "2.25", "2000"),
            ("dev-a", "3", "3.25", "3000")
        ]
    );
    assert!(rows[1][3].starts_with("udp:127.0.0.1:"), "{:?}", rows[1]);
    assert_eq!(rows[1][11], "first");
    let b = &rows[4];
    assert_eq!((b[0].as_str(), b[2].as_str()), ("dev-b", "1"));
    let values: serde_json::Value = serde_json::from_str(&b[5]).unwrap();
    assert_eq!(values, serde_json::json!({"rh": 40.0, "temp": 21.5}));
    let gas = &rows[5];
    assert_eq!(
        (
            gas[0].as_str(),
            gas[4].as_str(),
            gas[6].as_str(),
            gas[7].as_str()
        ),
        ("02:00:00:00:00:09", "412.5", "Gas", "10.0.0.9")
    );
    assert!(gas[11].contains("requested"), "{gas:?}");
    assert!(!work.path().join("out/all.csv.partial").exists());

    // One source, to stdout, through the collector's own node.
    let out = work.colony(&[
        "export",
        "core/store",
        "--config",
        cfg,
        "--node",
        "core",
        "--source",
        "dev-a",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = csv_rows(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(rows.len(), 4);
    assert!(rows[1..].iter().all(|r| r[0] == "dev-a"));

    // A time range on the received time.
    let between_s = between.to_string();
    let out = work.colony(&[
        "export",
        "core/store",
        "--config",
        cfg,
        "--node",
        "edge",
        "--since",
        &between_s,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = csv_rows(&String::from_utf8_lossy(&out.stdout));
    let sources: Vec<_> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(sources, vec!["dev-b", "02:00:00:00:00:09"]);
    let out = work.colony(&[
        "export",
        "core/store",
        "--config",
        cfg,
        "--node",
        "edge",
        "--until",
        &between_s,
    ]);
    let rows = csv_rows(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(rows.len(), 4, "{rows:?}");
    let out = work.colony(&[
        "export",
        "core/store",
        "--config",
        cfg,
        "--node",
        "edge",
        "--since",
        "1h",
        "--until",
        "2099-01-01T00:00:00Z",
    ]);
    assert_eq!(csv_rows(&String::from_utf8_lossy(&out.stdout)).len(), 6);
    // A source with no readings: the header only.
    let out = work.colony(&[
        "export",
        "core/store",
        "--config",
        cfg,
        "--node",
        "edge",
        "--source",
        "nobody",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    // Bad arguments: clear errors, no partial files, the collector keeps running.
    let bad_out = work.path().join("bad.csv");
    let bad = bad_out.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["export", "store", "--config", cfg, "--node", "edge"],
            "not an actor address",
        ),
        (
            vec![
                "export",
                "core/store",
                "--config",
                cfg,
                "--node",
                "edge",
                "--since",
                "yesterday",
            ],
            "not a time",
        ),
        (
            vec![
                "export",
                "core/store",
                "--config",
                cfg,
                "--node",
                "edge",
                "--since",
                "1000",
                "--until",
                "1000",
            ],
            "must be before",
        ),
        (
            vec![
                "export",
                "core/nothing",
                "--config",
                cfg,
                "--node",
                "edge",
                "-o",
                bad,
            ],
            "core/nothing",
        ),
        (
            vec!["export", "core/store", "--config", cfg, "--node", "nowhere"],
            "no node named 'nowhere'",
        ),
        (
            vec![
                "export",
                "core/store",
                "--socket",
                "/nonexistent/control.sock",
            ],
            "/nonexistent/control.sock",
        ),
        (
            vec![
                "export",
                "core/store",
                "--config",
                cfg,
                "--node",
                "edge",
                "-o",
                work.path().to_str().unwrap(),
            ],
            "is a directory",
        ),
    ] {
        let out = work.colony(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    assert!(!bad_out.exists() && !work.path().join("bad.csv.partial").exists());
    let status = work.status("edge").unwrap();
    assert_eq!(actor(&status, "core/store").unwrap()["state"], "running");
    drop((core, edge));
}

/// One node "core" running `actors` (TOML; `"DB"` stands for the collector's database file in
/// the test directory).
struct Single {
    work: Workdir,
    node: NodeProc,
    db: PathBuf,
}

fn single_node(actors: &str) -> Single {
    single_node_with(actors, |_| {})
}

/// As [`single_node`], calling `prepare` with the test directory before the node starts.
/// Returns once the node answers on its control socket.
fn single_node_with(actors: &str, prepare: impl FnOnce(&Path)) -> Single {
    let quic = free_udp_port();
    let config = format!(
        r#"
[cluster]
name = "collect"

[supervision]
max_restarts = 20
within_secs = 10
backoff_ms = 10

[[node]]
name = "core"
listen = "127.0.0.1:{quic}"
{actors}
"#
    );
    let work = Workdir::new(&config);
    let db = work.path().join("readings.sqlite");
    let text = std::fs::read_to_string(&work.config)
        .unwrap()
        .replace("\"DB\"", &format!("{:?}", db.to_str().unwrap()));
    std::fs::write(&work.config, text).unwrap();
    prepare(work.path());
    let node = work.start_node("core");
    let ok = wait_for(Duration::from_secs(20), || work.status("core").is_some());
    assert!(ok, "the node never answered\n{}", node.log_text());
    Single { work, node, db }
}

impl Single {
    fn detail(&self, address: &str) -> serde_json::Value {
        self.work
            .status("core")
            .and_then(|s| actor(&s, address).map(|a| a["detail"].clone()))
            .unwrap_or_default()
    }

    fn wait_detail(&self, address: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
        let ok = wait_for(Duration::from_secs(30), || f(&self.detail(address)));
        assert!(
            ok,
            "{address}: {what}: {}\n{}",
            self.detail(address),
            self.node.log_text()
        );
    }

    /// Pauses every sensor and waits until the collector has stored everything they sent;
    /// returns how many readings the group sent.
    fn pause_sensors_and_drain(&self, sensors: &str) -> i64 {
        self.work.ctl_ok(
            "core",
            &["send", sensors, r#"{"command": {"action": "pause"}}"#],
        );
        // The status detail is refreshed every second.
        std::thread::sleep(Duration::from_millis(2500));
        let sent = self.detail(sensors)["readings_sent"].as_i64().unwrap();
        let mut last = -1;
        let ok = wait_for(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(700));
            let now = count(&self.db, "select count(*) from readings");
            let settled = now == last && now > 0;
            last = now;
            settled
        });
        assert!(ok, "the collector never settled");
        sent
    }
}

fn broker(mqtt: u16) -> String {
    format!(
        r#"
[[actor]]
name = "broker"
node = "core"
kind = "broker"
listen = "127.0.0.1:{mqtt}"
allow_anonymous = true
limits = {{ max_queued = 200000, max_inflight = 256 }}
"#
    )
}

#[test]
fn via_actor_readings_sent_before_the_collector_runs_are_stored_exactly_once() {
    let mqtt = free_tcp_port();
    // The sensors come first in the config, so they start (and publish) before the collector.
    let c = single_node(&format!(
        r#"{}
[[actor]]
name = "sensors"
node = "core"
kind = "sensor_group"
broker = "core/broker"
qos = 1
count = 50
interval_ms = 100
ramp_per_sec = 5000
topic = "sensors/{{group}}/{{id}}"

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "DB"
flush_ms = 50
qos = 1
source = {{ broker = "core/broker", topics = ["sensors/#"], via = "actor" }}
"#,
        broker(mqtt)
    ));
    c.work.ctl_ok("core", &["stop", "core/store"]);
    // The collector is down while the sensors publish a few thousand readings.
    c.wait_detail("core/sensors", "connected", |d| d["connected"] == 50);
    let stopped_at = count(&c.db, "select count(*) from readings");
    c.wait_detail("core/sensors", "sent 2,000", |d| {
        d["readings_sent"].as_u64() >= Some(2000)
    });
    assert_eq!(
        count(&c.db, "select count(*) from readings"),
        stopped_at,
        "nothing is stored while the collector is stopped"
    );
    // The broker restarts under the sensors: they reconnect and send again what it had not
    // acknowledged; its queue for the collector survives.
    c.work.ctl_ok("core", &["restart", "core/broker"]);
    c.wait_detail("core/sensors", "reconnected", |d| {
        d["connected"] == 50 && d["send_errors"].as_u64() >= Some(50)
    });
    c.work.ctl_ok("core", &["start", "core/store"]);
    // And killed twice while catching up and while the sensors keep publishing.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1200));
        c.work.ctl_ok("core", &["kill", "core/store"]);
    }
    std::thread::sleep(Duration::from_secs(1));
    let sent = c.pause_sensors_and_drain("core/sensors");
    let total = assert_exactly_once(&c.db, 50);
    assert_eq!(total, sent, "every reading sent is stored");
    let counts = c
        .work
        .call("core", "core/store", r#"{"query": {"counts": {}}}"#);
    assert_eq!(counts["gaps"], 0, "{counts}");
    // The collector's in-flight window is four of its batches (5,000 by default), not the
    // broker's `max_inflight`, also after the broker's restart.
    let b = c.work.call("core", "core/broker", r#"{"status": {}}"#);
    assert_eq!(
        b["actor_subscriptions"]["core/store"]["window"], 20_000,
        "{b}"
    );
    eprintln!(
        "{total} readings of 50 sensors, sent before and while the collector ran, stored exactly once"
    );
}

fn password_hash(password: &str) -> String {
    let out = Command::new(colony_bin())
        .args(["passwd", "--password", password])
        .output()
        .expect("colony passwd");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn sensors_over_mqtts_with_cbor_and_templated_payloads_are_stored_and_parsed() {
    let (tcp, tls) = (free_tcp_port(), free_tcp_port());
    let hash = password_hash("s3cret");
    // Sensors authenticate; the collector takes readings by address (`via = "actor"`).
    let c = single_node_with(
        &format!(
            r#"
[[actor]]
name = "broker"
node = "core"
kind = "broker"
listen = "127.0.0.1:{tcp}"
listeners = [ {{ bind = "127.0.0.1:{tls}", tls = {{ cert = "server.pem", key = "server.key" }} }} ]
users = [ {{ name = "sensor", password_hash = "{hash}" }} ]

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "DB"
flush_ms = 50
synchronous = "full"
source = {{ broker = "core/broker", topics = ["cbor/#", "tpl/#", "gas/#", "intruder/#"], via = "actor" }}

[[actor]]
name = "cbor"
node = "core"
kind = "sensor_group"
url = "mqtts://127.0.0.1:{tls}"
ca = "ca.pem"
username = "sensor"
password = "s3cret"
qos = 1
count = 3
interval_ms = 200
format = "cbor"
payload_size = 300
topic = "cbor/{{id}}"

[[actor]]
name = "tpl"
node = "core"
kind = "sensor_group"
broker = "core/broker"
username = "sensor"
password = "s3cret"
qos = 1
count = 2
interval_ms = 200
topic = "tpl/{{id}}"
payload_template = '{{"source": "tpl-{{node}}-{{id}}", "seq": {{seq}}, "ts": {{ts}}, "values": {{"co2": {{value}}, "sensor": {{id}}}}}}'

[[actor]]
name = "gas"
node = "core"
kind = "sensor_group"
url = "mqtts://127.0.0.1:{tls}"
ca = "ca.pem"
username = "sensor"
password = "s3cret"
qos = 1
count = 2
interval_ms = 200
topic = "gas/{{id}}"
payload_template = "{{seq}}-Gas Sensor IP:10.9.0.{{id}} MAC:02:00:00:00:09:0{{id}} Reading value={{value}}"

[[actor]]
name = "intruder"
node = "core"
kind = "sensor_group"
url = "mqtts://127.0.0.1:{tls}"
ca = "ca.pem"
username = "sensor"
password = "wrong"
count = 1
interval_ms = 200
topic = "intruder/{{id}}"
"#
        ),
        colony_tests::mqtt::make_certs,
    );
    for group in ["cbor", "tpl", "gas"] {
        let n = if group == "cbor" { 3 } else { 2 };
        c.wait_detail(&format!("core/{group}"), "connected", |d| {
            d["connected"] == n
        });
    }
    c.wait_detail("core/cbor", "sent", |d| {
        d["readings_sent"].as_u64() >= Some(30)
    });
    for g in ["core/tpl", "core/gas", "core/intruder"] {
        c.work
            .ctl_ok("core", &["send", g, r#"{"command": {"action": "pause"}}"#]);
    }
    let sent = c.pause_sensors_and_drain("core/cbor");

    // CBOR over TLS: every reading of every sensor, its sender's timestamp and value.
    let cbor = sqlite(
        &c.db,
        "select source, count(*) as n, min(seq) as lo, max(seq) as hi, min(sent_ms) as ts, \
         min(value) as v, min(topic) as topic from readings where topic like 'cbor/%' group by source order by source",
    );
    assert_eq!(cbor.len(), 3, "{cbor:?}");
    let mut total = 0;
    for (i, r) in cbor.iter().enumerate() {
        assert_eq!(r["source"], format!("core/cbor/{}", i + 1));
        assert_eq!(r["topic"], format!("cbor/{}", i + 1));
        assert_eq!(
            (r["lo"].as_i64(), r["hi"].as_i64()),
            (Some(1), r["n"].as_i64()),
            "{r}"
        );
        assert!(r["ts"].as_i64().unwrap() > 1_600_000_000_000, "{r}");
        let v = r["v"].as_f64().unwrap();
        assert!((400.0..=500.0).contains(&v), "{r}");
        total += r["n"].as_i64().unwrap();
    }
    assert_eq!(total, sent, "every CBOR reading sent over mqtts is stored");

    // The JSON template: its own source names and two named values.
    let tpl = sqlite(
        &c.db,
        "select source, \"values\" as vals, sent_ms, seq from readings where topic = 'tpl/2' order by seq",
    );
    assert!(tpl.len() >= 3, "{tpl:?}");
    assert!(tpl.iter().all(|r| r["source"] == "tpl-core-2"));
    let vals: serde_json::Value = serde_json::from_str(tpl[0]["vals"].as_str().unwrap()).unwrap();
    assert_eq!(vals["sensor"], 2.0, "{vals}");
    assert!(vals["co2"].as_f64().is_some_and(|v| v >= 400.0), "{vals}");
    assert!(tpl[0]["sent_ms"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(tpl[0]["seq"], 1);

    // The gas text template over TLS: source is the MAC, type and IP parsed.
    let gas = sqlite(
        &c.db,
        "select source, sensor_type, ip, mac, count(*) as n, max(seq) as hi from readings \
         where topic like 'gas/%' group by source order by source",
    );
    assert_eq!(gas.len(), 2, "{gas:?}");
    assert_eq!(gas[0]["source"], "02:00:00:00:09:01");
    assert_eq!(gas[0]["sensor_type"], "Gas");
    assert_eq!(gas[1]["ip"], "10.9.0.2");
    assert!(gas.iter().all(|r| r["n"] == r["hi"]), "{gas:?}");

    // Nothing is malformed, and the sensor with a wrong password never got in.
    assert_eq!(count(&c.db, "select count(*) from rejects"), 0);
    assert_eq!(
        count(
            &c.db,
            "select count(*) from readings where topic like 'intruder/%'"
        ),
        0
    );
    let intruder = c.detail("core/intruder");
    assert_eq!(intruder["connected"], 0, "{intruder}");
    assert!(intruder["send_errors"].as_u64() > Some(0), "{intruder}");
}

#[test]
fn sensor_and_collector_settings_reload_in_place() {
    let mqtt = free_tcp_port();
    let sensors = |interval: u32, jitter: u32| {
        format!(
            r#"
[[actor]]
name = "sensors"
node = "core"
kind = "sensor_group"
broker = "core/broker"
qos = 1
count = 3
interval_ms = {interval}
jitter_ms = {jitter}
topic = "sensors/{{id}}"
"#
        )
    };
    let collector = |flush: u32, format: &str| {
        format!(
            r#"
[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "DB"
flush_ms = {flush}
{format}
source = {{ broker = "core/broker", topics = ["sensors/#"], via = "actor" }}
"#
        )
    };
    let c = single_node(&format!(
        "{}{}{}",
        broker(mqtt),
        collector(50, ""),
        sensors(2000, 0)
    ));
    c.wait_detail("core/sensors", "connected", |d| d["connected"] == 3);
    std::thread::sleep(Duration::from_secs(3));
    let rate = |window: Duration| {
        let before = count(&c.db, "select count(*) from readings");
        std::thread::sleep(window);
        count(&c.db, "select count(*) from readings") - before
    };
    let slow = rate(Duration::from_secs(2));
    assert!(slow <= 6, "3 sensors at 2 s: {slow} readings in 2 s");
    let uptime = |a: &str| {
        let s = c.work.status("core").unwrap();
        let a = actor(&s, a).unwrap();
        (
            a["uptime_ms"].as_u64().unwrap(),
            a["restarts"].as_u64().unwrap(),
        )
    };
    let (sensors_up, _) = uptime("core/sensors");
    let (store_up, _) = uptime("core/store");

    // Faster readings and a shorter flush, in place.
    let text = std::fs::read_to_string(&c.work.config).unwrap();
    let text = text
        .replace(
            "interval_ms = 2000\njitter_ms = 0",
            "interval_ms = 100\njitter_ms = 20",
        )
        .replace("flush_ms = 50\n", "flush_ms = 20\n");
    std::fs::write(&c.work.config, &text).unwrap();
    let plan = c.work.ctl_ok("core", &["reload", c.work.config_str()]);
    assert!(plan.contains("change in place"), "{plan}");
    assert!(!plan.contains("restart "), "{plan}");
    std::thread::sleep(Duration::from_millis(500));
    let fast = rate(Duration::from_secs(2));
    assert!(fast >= 40, "3 sensors at 100 ms: {fast} readings in 2 s");
    let (sensors_up2, sensors_restarts) = uptime("core/sensors");
    let (store_up2, store_restarts) = uptime("core/store");
    assert!(
        sensors_up2 > sensors_up && store_up2 > store_up,
        "uptime kept"
    );
    assert_eq!((sensors_restarts, store_restarts), (0, 0));
    let s = c.work.status("core").unwrap();
    assert_eq!(
        actor(&s, "core/sensors").unwrap()["settings"]["interval_ms"],
        100
    );
    assert_eq!(actor(&s, "core/store").unwrap()["settings"]["flush_ms"], 20);
    // The sequence numbers went on where they were: still exactly once from 1.
    c.work
        .ctl_ok("core", &["call", "core/store", r#"{"flush": {}}"#]);
    assert_exactly_once(&c.db, 3);

    // The collector's format, in place: JSON readings are now refused as not CBOR.
    let text = text.replace("flush_ms = 20\n", "flush_ms = 20\nformat = \"cbor\"\n");
    std::fs::write(&c.work.config, &text).unwrap();
    c.work.ctl_ok("core", &["reload", c.work.config_str()]);
    let ok = wait_for(Duration::from_secs(10), || {
        count(
            &c.db,
            "select count(*) from rejects where reason like 'bad CBOR%'",
        ) > 0
    });
    assert!(
        ok,
        "no CBOR rejects: {:?}",
        sqlite(&c.db, "select reason from rejects limit 3")
    );
    assert_eq!(uptime("core/store").1, 0);
}

/// `count` JSON readings of source `s1`, seq `1..=count`, one per line, in a file of `dir`.
fn reading_lines(dir: &Path, count: u64) -> PathBuf {
    let text: String = (1..=count)
        .map(|seq| {
            format!(
                "{{\"source\": \"s1\", \"seq\": {seq}, \"ts\": {}, \"value\": 1.5}}\n",
                1_700_000_000_000u64 + seq
            )
        })
        .collect();
    let path = dir.join("readings.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_node_stopped_while_its_collector_catches_up_stores_each_reading_once_with_no_duplicates() {
    stopped_during_catch_up("actor");
}

#[test]
fn a_node_stopped_while_its_mqtt_collector_catches_up_stores_each_reading_once_with_no_duplicates()
{
    stopped_during_catch_up("mqtt");
}

/// A node with a broker and a collector taking readings `via` actor or MQTT, stopped (SIGTERM)
/// three times while the collector works through 60,000 queued readings: each is stored once,
/// and none is counted as a duplicate.
fn stopped_during_catch_up(via: &str) {
    const READINGS: u64 = 60_000;
    let mqtt = free_tcp_port();
    let mut c = single_node(&format!(
        r#"{}
[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "DB"
batch_size = 200
flush_ms = 20
source = {{ broker = "core/broker", topics = ["gas/#"], via = "{via}" }}
"#,
        broker(mqtt)
    ));
    // Over MQTT the broker queues for the collector once its session exists.
    c.wait_detail("core/store", "subscribed", |d| {
        via == "actor" || d["broker_connected"] == true
    });
    // The broker queues the readings for the collector while it is stopped. By actor it has
    // already sent the collector a window of them, which wait in its mailbox, and sends that
    // window again when the collector subscribes anew: the collector recognises those notices.
    c.work.ctl_ok("core", &["stop", "core/store"]);
    let lines = reading_lines(c.work.path(), READINGS);
    mqtt::publish_lines(
        c.work.path(),
        mqtt,
        120,
        &["-q", "1", "-t", "gas/s1"],
        &lines,
    );
    c.work.ctl_ok("core", &["start", "core/store"]);
    let counts = |c: &Single| {
        c.work
            .try_call("core", "core/store", r#"{"query": {"counts": {}}}"#)
    };
    // The node is stopped three times while the collector works through the queue: the
    // collector stops first and acknowledges what it committed, and the broker handles those
    // acknowledgements before it stops, so nothing is sent again after the restart.
    for round in 1..=3 {
        let at = round * READINGS as i64 / 12;
        let ok = wait_for(Duration::from_secs(60), || {
            count(&c.db, "select count(*) from readings") >= at
        });
        assert!(ok, "round {round}: {}\n{}", counts(&c), c.node.log_text());
        c.node.signal(15);
        assert!(
            c.node.wait_exit(Duration::from_secs(20)).is_some(),
            "the node did not stop"
        );
        c.node = c.work.start_node("core");
    }
    let ok = wait_for(Duration::from_secs(60), || {
        counts(&c)["readings"] == READINGS
    });
    assert!(ok, "{}\n{}", counts(&c), c.node.log_text());
    let got = counts(&c);
    assert_eq!(
        (got["gaps"].as_u64(), got["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{got}"
    );
    assert_exactly_once(&c.db, 1);
}
