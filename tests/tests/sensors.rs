//! Sensor groups and collectors end to end: real `colony node` processes, a UDP device played by
//! a test socket, host and probe sensors, simulated MQTT sensors through a Colony broker, and the
//! collector's SQLite file read with the `sqlite3` CLI.

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use colony_tests::*;

struct Cluster {
    work: Workdir,
    node: NodeProc,
    db: PathBuf,
}

/// One node "core" with `actors` (TOML) and a collector "store" writing `readings.sqlite` in
/// the test directory.
fn start(collector_source: &str, actors: &str) -> Cluster {
    let quic = free_udp_port();
    let config = format!(
        r#"
[cluster]
name = "sensors"

[supervision]
max_restarts = 20
within_secs = 10
backoff_ms = 10

[[node]]
name = "core"
listen = "127.0.0.1:{quic}"

[[actor]]
name = "store"
node = "core"
kind = "collector"
database = "DB"
flush_ms = 50
{collector_source}
{actors}
"#
    );
    let work = Workdir::new(&config);
    let db = work.path().join("readings.sqlite");
    let config = std::fs::read_to_string(&work.config)
        .unwrap()
        .replace("\"DB\"", &format!("{:?}", db.to_str().unwrap()));
    std::fs::write(&work.config, config).unwrap();
    let node = work.start_node("core");
    let ok = wait_for(Duration::from_secs(20), || {
        work.status("core").is_some_and(|s| healthy(&s))
    });
    assert!(
        ok,
        "node never became healthy: {:?}\n{}",
        work.status("core"),
        node.log_text()
    );
    Cluster { work, node, db }
}

fn call(c: &Cluster, address: &str, message: &str) -> serde_json::Value {
    c.work.call("core", address, message)
}

fn counts(c: &Cluster) -> serde_json::Value {
    call(c, "core/store", r#"{"query": {"counts": {}}}"#)
}

#[test]
fn udp_device_readings_rejects_and_a_downstream_command() {
    let udp = free_udp_port();
    let c = start(&format!("source = {{ udp = \"127.0.0.1:{udp}\" }}"), "");
    let device = UdpSocket::bind("127.0.0.1:0").unwrap();
    device
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let to = format!("127.0.0.1:{udp}");
    for seq in 1..=5 {
        let reading = format!(
            r#"{{"source": "dev-1", "seq": {seq}, "ts": {}, "value": {seq}.5}}"#,
            1000 + seq
        );
        device.send_to(reading.as_bytes(), &to).unwrap();
    }
    // Seq 3 again: a duplicate, counted and not stored.
    device
        .send_to(
            br#"{"source": "dev-1", "seq": 3, "ts": 1003, "value": 3.5}"#,
            &to,
        )
        .unwrap();
    device
        .send_to(
            b"7-Gas Sensor IP:10.0.0.7 MAC:02:00:00:00:00:07 Reading value=41.5",
            &to,
        )
        .unwrap();
    for bad in [
        &b"garbage"[..],
        b"{\"seq\": 1",
        b"1-Gas Sensor IP:x MAC:y Reading value=1",
        &[0xff; 300],
    ] {
        device.send_to(bad, &to).unwrap();
    }
    let ok = wait_for(Duration::from_secs(10), || {
        counts(&c)["readings"] == 6 && counts(&c)["rejects"] == 4
    });
    assert!(ok, "counts: {}", counts(&c));
    let n = counts(&c);
    assert_eq!(n["duplicates"], 1, "{n}");
    assert_eq!(n["gaps"], 0, "{n}");

    // What a sqlite3 user sees.
    assert_eq!(
        count(
            &c.db,
            "select count(*) from readings where source = 'dev-1'"
        ),
        5
    );
    assert_eq!(
        count(
            &c.db,
            "select count(*) from readings where mac = '02:00:00:00:00:07' and value = 41.5"
        ),
        1
    );
    let rejects = sqlite(&c.db, "select origin, reason from rejects order by id");
    assert_eq!(rejects.len(), 4);
    assert!(
        rejects[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not JSON, CBOR"),
        "{rejects:?}"
    );
    assert!(
        rejects[2]["reason"]
            .as_str()
            .unwrap()
            .contains("bad gas reading"),
        "{rejects:?}"
    );
    assert!(
        rejects[0]["origin"]
            .as_str()
            .unwrap()
            .starts_with("udp:127.0.0.1:")
    );

    // The collector kept running, and sends a downstream command to the device's last address.
    let status = c.work.status("core").unwrap();
    assert_eq!(actor(&status, "core/store").unwrap()["state"], "running");
    c.work.ctl_ok(
        "core",
        &[
            "send",
            "core/store",
            r#"{"command": {"device": "dev-1", "payload": "switch carrier"}}"#,
        ],
    );
    let mut buf = [0u8; 256];
    let (n, _) = device
        .recv_from(&mut buf)
        .expect("the device got the command");
    assert_eq!(&buf[..n], b"switch carrier");
    // An unknown device is an error, not a crash.
    let out = c.work.ctl(
        "core",
        &[
            "call",
            "core/store",
            r#"{"command": {"device": "nobody", "payload": "x"}}"#,
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no address known"));

    // Latest and gaps queries, and CSV export.
    let latest = call(
        &c,
        "core/store",
        r#"{"query": {"latest": {"source": "dev-1", "limit": 1}}}"#,
    );
    assert_eq!(latest[0]["seq"], 5);
    let export = call(&c, "core/store", r#"{"export": {"path": "out.csv"}}"#);
    let csv = std::fs::read_to_string(export["path"].as_str().unwrap()).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
}

#[test]
fn host_and_probe_sensors_store_plausible_readings() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let c = start(
        "",
        &format!(
            r#"
[[actor]]
name = "host"
node = "core"
kind = "sensor_group"
source = "host"
collector = "core/store"
interval_ms = 300

[[actor]]
name = "probe"
node = "core"
kind = "sensor_group"
source = "probe"
collector = "core/store"
interval_ms = 500
ping = ["127.0.0.1"]
ping_count = 3
tcp = ["127.0.0.1:{tcp_port}"]
dns = ["localhost"]
"#
        ),
    );
    let ok = wait_for(Duration::from_secs(15), || {
        let n = counts(&c);
        n["per_source"]
            .as_array()
            .is_some_and(|s| s.len() == 4 && s.iter().all(|s| s["stored"].as_u64() >= Some(2)))
    });
    assert!(ok, "counts: {}\n{}", counts(&c), c.node.log_text());
    let host = sqlite(
        &c.db,
        "select json_extract(\"values\", '$.cpu') as cpu, json_extract(\"values\", '$.mem_total') as mem, \
         json_extract(\"values\", '$.load1') as load1 from readings where source = 'core/host/host'",
    );
    assert!(host.len() >= 2);
    for r in &host {
        let cpu = r["cpu"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&cpu), "{r}");
        assert!(r["mem"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["load1"].as_f64().unwrap() >= 0.0, "{r}");
    }
    let ping = sqlite(
        &c.db,
        "select json_extract(\"values\", '$.rtt_avg_ms') as rtt, json_extract(\"values\", '$.loss_pct') as loss \
         from readings where source = 'core/probe/ping:127.0.0.1'",
    );
    assert!(!ping.is_empty());
    for r in &ping {
        assert!(r["rtt"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["loss"].as_f64().unwrap(), 0.0, "{r}");
    }
    let tcp_ms = count(
        &c.db,
        &format!(
            "select count(*) from readings where source = 'core/probe/tcp:127.0.0.1:{tcp_port}' \
         and json_extract(\"values\", '$.ok') = 1 and json_extract(\"values\", '$.connect_ms') > 0"
        ),
    );
    assert!(tcp_ms >= 1);
    let dns = count(
        &c.db,
        "select count(*) from readings where source = 'core/probe/dns:localhost' \
         and json_extract(\"values\", '$.resolve_ms') > 0",
    );
    assert!(dns >= 1);
    // Sequence numbers per source run 1, 2, 3, … with no gaps.
    assert_eq!(counts(&c)["gaps"], 0);
    // "Read now" on the host sensor gives a reading marked requested.
    c.work.ctl_ok(
        "core",
        &[
            "send",
            "core/host",
            r#"{"command": {"action": "read_now"}}"#,
        ],
    );
    let ok = wait_for(Duration::from_secs(5), || {
        count(
            &c.db,
            "select count(*) from readings where source = 'core/host/host' and flags like '%requested%'",
        ) == 1
    });
    assert!(ok);
    drop(tcp);
}

fn broker_actor(mqtt: u16) -> String {
    format!(
        r#"
[[actor]]
name = "broker"
node = "core"
kind = "broker"
listen = "127.0.0.1:{mqtt}"
allow_anonymous = true
limits = {{ max_queued = 200000, max_inflight = 64 }}
"#
    )
}

fn sensors_actor(sensors: &str) -> String {
    format!(
        r#"
[[actor]]
name = "sensors"
node = "core"
kind = "sensor_group"
broker = "core/broker"
qos = 1
{sensors}
"#
    )
}

/// Starts the broker and the collector, waits until the collector's MQTT session is up (so that
/// its subscription exists before the first reading), then adds the sensors with `ctl reload`.
fn start_with_sensors(mqtt: u16, sensors: &str) -> Cluster {
    let c = start(COLLECT, &broker_actor(mqtt));
    let ok = wait_for(Duration::from_secs(10), || {
        c.work.status("core").is_some_and(|s| {
            actor(&s, "core/store").is_some_and(|a| a["detail"]["broker_connected"] == true)
        })
    });
    assert!(
        ok,
        "the collector never connected: {:?}",
        c.work.status("core")
    );
    // The subscription is sent right after the session comes up.
    std::thread::sleep(Duration::from_millis(300));
    let mut config = std::fs::read_to_string(&c.work.config).unwrap();
    config.push_str(&sensors_actor(sensors));
    std::fs::write(&c.work.config, config).unwrap();
    c.work.ctl_ok("core", &["reload", c.work.config_str()]);
    c
}

const COLLECT: &str =
    r#"source = { broker = "core/broker", topics = ["sensors/#"], via = "mqtt" }"#;

fn requested_sources(c: &Cluster) -> Vec<String> {
    sqlite(
        &c.db,
        "select source from readings where flags like '%requested%' order by source",
    )
    .iter()
    .map(|r| r["source"].as_str().unwrap().to_owned())
    .collect()
}

#[test]
fn read_now_and_interval_commands_reach_exactly_the_addressed_sensor() {
    let mqtt = free_tcp_port();
    let c = start_with_sensors(
        mqtt,
        "count = 5\ninterval_ms = 600000\ntopic = \"sensors/{group}/{id}\"",
    );
    // Every sensor connected (status), and the collector subscribed.
    let ok = wait_for(Duration::from_secs(10), || {
        c.work.status("core").is_some_and(|s| {
            actor(&s, "core/sensors").is_some_and(|a| a["detail"]["connected"] == 5)
                && actor(&s, "core/store").is_some_and(|a| a["detail"]["broker_connected"] == true)
        })
    });
    assert!(ok, "{:?}", c.work.status("core"));
    std::thread::sleep(Duration::from_millis(500));
    let before = count(&c.db, "select count(*) from readings");

    c.work.ctl_ok(
        "core",
        &[
            "send",
            "core/sensors",
            r#"{"command": {"sensor": 3, "action": "read_now"}}"#,
        ],
    );
    let ok = wait_for(Duration::from_secs(5), || !requested_sources(&c).is_empty());
    assert!(ok, "no requested reading");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(requested_sources(&c), vec!["core/sensors/3"]);

    // The gas detectors' "Request" on sensor 4's command topic.
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.to_string(),
            "-t",
            "InTopic/sensors/4",
            "-m",
            "Request",
            "-q",
            "1",
        ])
        .output()
        .expect("mosquitto_pub");
    assert_success(&out, "mosquitto_pub");
    let ok = wait_for(Duration::from_secs(5), || requested_sources(&c).len() == 2);
    assert!(ok, "{:?}", requested_sources(&c));
    assert_eq!(
        requested_sources(&c),
        vec!["core/sensors/3", "core/sensors/4"]
    );

    // Sensor 2 reads every 100 ms; the others stay at one reading per ten minutes.
    c.work.ctl_ok(
        "core",
        &[
            "send",
            "core/sensors",
            r#"{"command": {"sensor": 2, "action": {"interval_ms": 100}}}"#,
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let per_source: Vec<(String, i64)> = sqlite(
        &c.db,
        "select source, count(*) as n from readings group by source",
    )
    .iter()
    .map(|r| {
        (
            r["source"].as_str().unwrap().to_owned(),
            r["n"].as_i64().unwrap(),
        )
    })
    .collect();
    for (source, n) in &per_source {
        if source == "core/sensors/2" {
            assert!(*n >= 10, "{per_source:?}");
        } else {
            assert!(*n <= 2, "{per_source:?}");
        }
    }
    assert!(count(&c.db, "select count(*) from readings") > before);
    // Unknown sensors are refused.
    let out = c.work.ctl(
        "core",
        &[
            "call",
            "core/sensors",
            r#"{"command": {"sensor": 6, "action": "pause"}}"#,
        ],
    );
    assert!(!out.status.success());
}

/// Waits until the sensors are stopped and the collector has stored everything they sent.
fn stop_sensors_and_drain(c: &Cluster) {
    c.work.ctl_ok("core", &["stop", "core/sensors"]);
    let mut last = -1;
    let ok = wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = count(&c.db, "select count(*) from readings");
        let settled = now == last;
        last = now;
        settled
    });
    assert!(ok, "the collector never settled");
}

#[test]
fn a_thousand_sensors_through_a_broker_are_stored_exactly_once() {
    let mqtt = free_tcp_port();
    let c = start_with_sensors(
        mqtt,
        "count = 1000\ninterval_ms = 1000\njitter_ms = 100\nramp_per_sec = 2000\ntopic = \"sensors/{group}/{id}\"",
    );
    let ok = wait_for(Duration::from_secs(20), || {
        c.work.status("core").is_some_and(|s| {
            actor(&s, "core/sensors").is_some_and(|a| a["detail"]["connected"] == 1000)
        })
    });
    assert!(
        ok,
        "{:?}",
        c.work
            .status("core")
            .map(|s| actor(&s, "core/sensors").cloned())
    );
    std::thread::sleep(Duration::from_secs(6));
    stop_sensors_and_drain(&c);
    let total = assert_exactly_once(&c.db, 1000);
    eprintln!("1000 sensors, {total} readings, every sequence number stored exactly once");
    let n = counts(&c);
    assert_eq!(
        (n["gaps"].as_u64(), n["duplicates"].as_u64()),
        (Some(0), Some(0)),
        "{}",
        n["per_source"][0]
    );
    assert!(n["readings"].as_u64().unwrap() >= 5000, "{}", n["readings"]);
}

#[test]
fn killing_the_collector_loses_nothing_acknowledged_at_qos_1() {
    let mqtt = free_tcp_port();
    let c = start_with_sensors(
        mqtt,
        "count = 200\ninterval_ms = 100\nramp_per_sec = 2000\ntopic = \"sensors/{group}/{id}\"",
    );
    let ok = wait_for(Duration::from_secs(20), || {
        c.work.status("core").is_some_and(|s| {
            actor(&s, "core/sensors").is_some_and(|a| a["detail"]["connected"] == 200)
        })
    });
    assert!(ok);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        c.work.ctl_ok("core", &["kill", "core/store"]);
    }
    std::thread::sleep(Duration::from_secs(2));
    stop_sensors_and_drain(&c);
    let status = c.work.status("core").unwrap();
    assert!(actor(&status, "core/store").unwrap()["restarts"].as_u64() >= Some(3));
    let total = assert_exactly_once(&c.db, 200);
    eprintln!("200 sensors, {total} readings, every sequence number stored exactly once");
    assert_eq!(counts(&c)["gaps"], 0);
}

/// Sensors listed before their broker start with it (a node starts its actors together), but
/// connect only once it listens: no refused connection counts as a send error.
#[test]
fn sensors_started_with_their_broker_wait_for_it_and_count_no_errors() {
    let mqtt = free_tcp_port();
    let actors = sensors_actor("count = 20\ninterval_ms = 200\ntopic = \"sensors/{group}/{id}\"")
        + &broker_actor(mqtt);
    let c = start(COLLECT, &actors);
    let sensors = || {
        c.work
            .status("core")
            .and_then(|s| actor(&s, "core/sensors").map(|a| a["detail"].clone()))
            .unwrap_or_default()
    };
    let ok = wait_for(Duration::from_secs(10), || {
        let d = sensors();
        d["connected"] == 20 && d["readings_sent"].as_u64() >= Some(40)
    });
    assert!(ok, "{}", sensors());
    let d = sensors();
    assert_eq!(d["send_errors"], 0, "{d}");
}

/// A group whose Colony broker is not up is started at once: while it waits for the broker it
/// answers calls and says so, rather than holding up its node's start.
#[test]
fn sensors_whose_broker_is_not_up_answer_while_they_wait_for_it() {
    let (core, edge, mqtt) = (free_udp_port(), free_udp_port(), free_tcp_port());
    let config = format!(
        r#"
[cluster]
name = "sensors"

[[node]]
name = "core"
listen = "127.0.0.1:{core}"

[[node]]
name = "edge"
listen = "127.0.0.1:{edge}"

[[actor]]
name = "broker"
node = "edge"
kind = "broker"
listen = "127.0.0.1:{mqtt}"
allow_anonymous = true

[[actor]]
name = "sensors"
node = "core"
kind = "sensor_group"
broker = "edge/broker"
count = 5
interval_ms = 200
topic = "sensors/{{id}}"
"#
    );
    // The node "edge", and with it the broker, is never started.
    let work = Workdir::new(&config);
    let node = work.start_node("core");
    let mut detail = serde_json::Value::Null;
    let answered = wait_for(Duration::from_secs(10), || {
        detail = work.try_call("core", "core/sensors", r#"{"status": {}}"#);
        !detail.is_null()
    });
    assert!(answered, "no answer:\n{}", node.log_text());
    assert_eq!(detail["waiting_for_broker"], true, "{detail}");
    assert_eq!(detail["connections_started"], 0, "{detail}");
    assert_eq!(detail["send_errors"], 0, "{detail}");
}
