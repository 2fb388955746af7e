//! Collectors end to end, beyond `sensors.rs`: `colony export` from a collector on another node,
//! sensors over mqtts, CBOR and templated payloads, `via = "actor"` collection, in-place reload
//! of sensor and collector settings, and readings published before the collector subscribed.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use colony_tests::*;

/// Runs `sqlite3 -json FILE SQL` and parses the rows.
fn sqlite(db: &Path, sql: &str) -> Vec<serde_json::Value> {
    let out = Command::new("sqlite3")
        .arg("-json")
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("sqlite3 JSON")
}

fn count(db: &Path, sql: &str) -> i64 {
    sqlite(db, sql)
        .first()
        .and_then(|r| r.as_object()?.values().next()?.as_i64())
        .unwrap_or(-1)
}

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
            let reply = work.ctl_json("edge", &["call", "core/store", r#"{"flush": {}}"#]);
            reply["reply"]["stored"].as_i64() == Some(n)
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
    let node = work.start_node("core");
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

/// Every source's readings are exactly 1..=max(seq), each once; returns the total.
fn assert_exactly_once(db: &Path, sources: i64) -> i64 {
    let rows = sqlite(
        db,
        "select source, count(*) as n, count(distinct seq) as d, min(seq) as lo, max(seq) as hi \
         from readings group by source",
    );
    assert_eq!(rows.len() as i64, sources, "sources: {rows:?}");
    let mut total = 0;
    for r in &rows {
        let (n, d, lo, hi) = (
            r["n"].as_i64().unwrap(),
            r["d"].as_i64().unwrap(),
            r["lo"].as_i64().unwrap(),
            r["hi"].as_i64().unwrap(),
        );
        assert!(n == d && lo == 1 && hi == n, "not exactly once: {r}");
        total += n;
    }
    total
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
    let ok = wait_for(Duration::from_secs(20), || c.work.status("core").is_some());
    assert!(ok, "the node never answered\n{}", c.node.log_text());
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
    let counts = c.work.ctl_json(
        "core",
        &["call", "core/store", r#"{"query": {"counts": {}}}"#],
    );
    assert_eq!(counts["reply"]["gaps"], 0, "{counts}");
    eprintln!(
        "{total} readings of 50 sensors, sent before and while the collector ran, stored exactly once"
    );
}
