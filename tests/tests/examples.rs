//! The examples in `examples/`, run as the README tells a user to: `colony check` on each, `colony
//! up` on each that needs no root (the cluster must become healthy and data must flow), and the
//! routing example in the network namespaces its script builds.
//!
//! The examples listen on fixed loopback ports (171xx to 175xx, one range each, below the
//! ephemeral range the other tests use), so they can run next to every other test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use colony_tests::up::Up;
use colony_tests::*;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn example(name: &str) -> String {
    std::fs::read_to_string(examples_dir().join(name)).expect("read example")
}

/// `colony up` on an example, until it says the cluster is up.
fn up(name: &str) -> Up {
    let mut up = Up::start(&example(name), &["--interval", "5", "--timeout", "90"]);
    up.wait_line("is up in", Duration::from_secs(100));
    up
}

fn status(up: &Up, node: &str) -> serde_json::Value {
    serde_json::from_str(&up.ctl(node, &["--json", "status"])).expect("status JSON")
}

fn detail_u64(status: &serde_json::Value, address: &str, key: &str) -> u64 {
    actor(status, address).map_or(0, |a| a["detail"][key].as_u64().unwrap_or(0))
}

#[test]
fn every_example_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(examples_dir()).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let out = Command::new(colony_bin())
            .arg("check")
            .arg(&path)
            .output()
            .expect("run colony check");
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(": ok: cluster"), "{text}");
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} examples found");
}

#[test]
fn load_test_connects_ten_thousand_sensors_and_stores_their_readings() {
    let up = up("load-test.toml");
    // Both groups ramp up 5,000 connections at 1,000/s; then 10,000 readings a second flow.
    let ok = wait_for(Duration::from_secs(150), || {
        let s = status(&up, "core");
        let connected: u64 = ["sensors-1/sensors", "sensors-2/sensors"]
            .iter()
            .map(|a| detail_u64(&s, a, "connected"))
            .sum();
        connected == 10_000
            && detail_u64(&s, "core/broker", "connections") >= 10_000
            && detail_u64(&s, "core/store", "stored") > 20_000
    });
    assert!(ok, "{:#}", status(&up, "core"));
    let s = status(&up, "core");
    assert!(healthy(&s), "{s:#}");
    assert_eq!(detail_u64(&s, "core/store", "rejected"), 0);

    // The README's query for gaps answers.
    let gaps = up.ctl(
        "core",
        &["call", "core/store", r#"{"query": {"gaps": {}}}"#],
    );
    assert!(!gaps.trim().is_empty());

    // The capacity plan, next to what the running cluster measures.
    let out = Command::new(colony_bin())
        .args(["plan", "cluster.toml", "--measure", "--node", "core"])
        .args(["--seconds", "3"])
        .current_dir(up.path())
        .output()
        .expect("colony plan");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_success(&out, &format!("{text}\n"));
    assert!(text.contains("ESTIMATED vs MEASURED"), "{text}");
    let stored = text
        .lines()
        .find(|l| l.starts_with("core/store readings stored"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(stored.contains("10,000 msg/s"), "{stored}");
}

#[test]
fn monitoring_collects_host_and_probe_readings_from_every_node() {
    let up = up("monitoring.toml");
    let sources = |s: &serde_json::Value| -> Vec<String> {
        actor(s, "core/store").map_or_else(Vec::new, |a| {
            a["detail"]["per_source"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["source"].as_str().map(str::to_owned))
                .collect()
        })
    };
    let ok = wait_for(Duration::from_secs(30), || {
        let s = status(&up, "core");
        let names = sources(&s);
        [
            "core/host",
            "edge-1/host",
            "edge-2/host",
            "edge-1/probe",
            "edge-2/probe",
        ]
        .iter()
        .all(|want| names.iter().any(|n| n.starts_with(want)))
    });
    let s = status(&up, "core");
    assert!(ok, "sources {:?}: {s:#}", sources(&s));
    assert!(healthy(&s), "{s:#}");
    assert_eq!(detail_u64(&s, "core/store", "rejected"), 0);

    // The latest readings answer with plausible values: CPU within 0..=100, loopback RTT > 0.
    let latest: serde_json::Value = serde_json::from_str(&up.ctl(
        "core",
        &[
            "--json",
            "call",
            "core/store",
            r#"{"query": {"latest_per_source": {}}}"#,
        ],
    ))
    .expect("latest JSON");
    let text = latest.to_string();
    assert!(text.contains("cpu"), "{text}");
    assert!(text.contains("rtt"), "{text}");
}

/// Runs examples/routing-lab.sh, and `down` when dropped.
struct RoutingLab {
    state: tempfile::TempDir,
}

impl RoutingLab {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(examples_dir().join("routing-lab.sh"))
            .args(args)
            .env("COLONY", colony_bin())
            .env("COLONY_STATE_DIR", self.state.path())
            .output()
            .expect("run routing-lab.sh")
    }
}

impl Drop for RoutingLab {
    fn drop(&mut self) {
        let out = self.run(&["down"]);
        if std::thread::panicking() {
            for node in ["edge", "ra", "rb"] {
                let log = self.state.path().join(format!("{node}.out"));
                eprintln!(
                    "--- {node} ---\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            eprintln!("down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn routing_example_carries_pings_through_its_tunnels() {
    if !netns::Netns::available() {
        eprintln!("skipped: needs root and network namespaces");
        return;
    }
    let lab = RoutingLab {
        state: tempfile::tempdir().expect("tempdir"),
    };
    let out = lab.run(&["up"]);
    assert_success(&out, "routing-lab.sh up");
    let ping = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", "colony-e", "ping", "-c", "1", "-W", "1"])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        wait_for(Duration::from_secs(30), || ping(&["10.99.0.1"])),
        "IPv4 through the tunnel"
    );
    assert!(
        wait_for(Duration::from_secs(10), || ping(&["-6", "fd99::1"])),
        "IPv6 through the tunnel"
    );
    let out = lab.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("edge/tun") && text.contains("via "), "{text}");

    // `down` leaves no node running and no namespace behind.
    let pids: Vec<String> = ["edge", "ra", "rb"]
        .iter()
        .map(|n| std::fs::read_to_string(lab.state.path().join(format!("{n}.pid"))).unwrap())
        .collect();
    let out = lab.run(&["down"]);
    assert!(out.status.success());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "node pid {pid} still runs"
        );
    }
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains("colony-e"));
}

/// `colony ctl call` on an example's node, the reply as JSON.
fn call(up: &Up, node: &str, address: &str, message: &str) -> serde_json::Value {
    let answer: serde_json::Value =
        serde_json::from_str(&up.ctl(node, &["--json", "call", address, message]))
            .expect("reply JSON");
    answer["reply"].clone()
}

/// The number of stored readings per source, from the collector's counts query.
fn stored_per_source(up: &Up, node: &str, collector: &str) -> Vec<(String, u64)> {
    let counts = call(up, node, collector, r#"{"query": {"counts": {}}}"#);
    counts["per_source"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["source"].as_str().unwrap_or_default().to_owned(),
                s["stored"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn mosquitto_pub(port: u16, topic: &str, message: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", topic, "-m", message])
        .output()
        .expect("run mosquitto_pub (Debian's mosquitto-clients)");
    assert_success(&out, "mosquitto_pub");
}

#[test]
fn demo_walkthrough_works_as_the_readme_tells_it() {
    let up = up("demo.toml");
    // Readings from both sites cross their bridges into the core collector.
    let ok = wait_for(Duration::from_secs(40), || {
        let sources = stored_per_source(&up, "core", "core/store");
        let from = |site: &str| {
            sources
                .iter()
                .filter(|(s, n)| s.starts_with(site) && *n > 0)
                .count()
        };
        from("site-a/sensors/") == 100 && from("site-b/sensors/") == 100
    });
    assert!(ok, "{:?}", stored_per_source(&up, "core", "core/store"));
    let s = status(&up, "core");
    assert!(healthy(&s), "{s:#}");

    // A command to one sensor by actor message: a reading marked requested arrives.
    up.ctl(
        "core",
        &[
            "send",
            "site-a/sensors",
            r#"{"command": {"sensor": 7, "action": "read_now"}}"#,
        ],
    );
    let requested = wait_for(Duration::from_secs(20), || {
        call(
            &up,
            "core",
            "core/store",
            r#"{"query": {"latest": {"source": "site-a/sensors/7", "limit": 20}}}"#,
        )
        .to_string()
        .contains("requested")
    });
    assert!(requested, "no requested reading from site-a/sensors/7");

    // A command over MQTT at the core broker, carried down by site B's bridge to sensor 3 only.
    let before = |source: &str| {
        stored_per_source(&up, "core", "core/store")
            .into_iter()
            .find(|(s, _)| s == source)
            .map_or(0, |(_, n)| n)
    };
    let (fast0, slow0) = (before("site-b/sensors/3"), before("site-b/sensors/4"));
    mosquitto_pub(18100, "InTopic/site-b/sensors/3", r#"{"interval_ms": 200}"#);
    let faster = wait_for(Duration::from_secs(30), || {
        let fast = before("site-b/sensors/3") - fast0;
        let slow = before("site-b/sensors/4") - slow0;
        fast >= 15 && fast > 3 * slow.max(1)
    });
    assert!(
        faster,
        "sensor 3 did not speed up: {} vs {}",
        before("site-b/sensors/3") - fast0,
        before("site-b/sensors/4") - slow0
    );

    // The balancer scores the three nodes from their host sensors' reports.
    let decision = call(
        &up,
        "core",
        "core/lb",
        r#"{"decide": {"endpoint": "readme"}}"#,
    );
    let router = decision["router"].as_str().unwrap_or_default();
    assert!(router.ends_with("/host"), "{decision}");

    // A reload that changes the sensors' interval in place: no restart, same uptime.
    let fast = example("demo.toml").replace("interval_ms = 1000", "interval_ms = 500");
    std::fs::write(up.path().join("demo-fast.toml"), fast).expect("write config");
    let plan = up.ctl("core", &["reload", "demo-fast.toml", "--dry-run"]);
    assert!(
        plan.contains("change in place") && plan.contains("sensors: interval_ms"),
        "{plan}"
    );
    up.ctl("core", &["reload", "demo-fast.toml"]);
    let s = status(&up, "core");
    let sensors = actor(&s, "site-a/sensors").expect("site-a/sensors");
    assert_eq!(sensors["settings"]["interval_ms"], 500, "{sensors:#}");
    assert_eq!(sensors["restarts"], 0, "{sensors:#}");

    // The supervisor restarts a killed broker; readings keep arriving afterwards.
    up.ctl("core", &["kill", "site-a/broker"]);
    let stored = detail_u64(&status(&up, "core"), "core/store", "stored");
    let ok = wait_for(Duration::from_secs(30), || {
        let s = status(&up, "core");
        actor(&s, "site-a/broker").is_some_and(|a| a["state"] == "running" && a["restarts"] == 1)
            && detail_u64(&s, "core/store", "stored") > stored + 200
    });
    assert!(ok, "{:#}", status(&up, "core"));
}

#[test]
fn gas_detection_fans_sites_out_to_their_clouds_and_commands_back_down() {
    let up = up("gas-detection.toml");
    let topics = |cloud: &str| -> Vec<String> {
        call(
            &up,
            "relay",
            &format!("{cloud}/store"),
            r#"{"query": {"latest": {"limit": 200}}}"#,
        )
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["topic"].as_str().map(str::to_owned))
        .collect()
    };
    let ok = wait_for(Duration::from_secs(40), || {
        topics("cloud-1").len() >= 40 && topics("cloud-2").len() >= 40
    });
    assert!(
        ok,
        "cloud-1 {:?}\ncloud-2 {:?}",
        topics("cloud-1"),
        topics("cloud-2")
    );
    // Each cloud has its own site's readings and nothing else.
    assert!(
        topics("cloud-1")
            .iter()
            .all(|t| t.starts_with("gas/site-a/"))
    );
    assert!(
        topics("cloud-2")
            .iter()
            .all(|t| t.starts_with("gas/site-b/"))
    );
    let s = status(&up, "relay");
    assert!(healthy(&s), "{s:#}");
    for cloud in ["cloud-1/store", "cloud-2/store"] {
        assert_eq!(
            detail_u64(&s, cloud, "rejected"),
            0,
            "{cloud} rejected readings"
        );
    }

    // "Read now" for detector 7 of site A, published at cloud 1, reaches that detector only.
    let commands = |group: &str| detail_u64(&status(&up, "relay"), group, "commands_received");
    mosquitto_pub(18204, "InTopic/site-a/7", "Request");
    let ok = wait_for(Duration::from_secs(20), || commands("site-a/gas") >= 1);
    assert!(ok, "{:#}", status(&up, "relay"));
    let requested = wait_for(Duration::from_secs(20), || {
        call(
            &up,
            "relay",
            "cloud-1/store",
            r#"{"query": {"latest": {"limit": 100}}}"#,
        )
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["topic"] == "gas/site-a/7" && r["flags"].to_string().contains("requested"))
    });
    assert!(
        requested,
        "no requested reading from detector 7 reached cloud 1"
    );
    assert_eq!(commands("site-b/gas"), 0, "site B got site A's command");
}
