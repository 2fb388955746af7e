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
    let ok = wait_for(Duration::from_secs(90), || {
        let s = status(&up, "core");
        let connected: u64 = ["sensors-1/sensors", "sensors-2/sensors"]
            .iter()
            .map(|a| detail_u64(&s, a, "connected"))
            .sum();
        connected == 10_000 && detail_u64(&s, "core/store", "stored") > 20_000
    });
    assert!(ok, "{:#}", status(&up, "core"));
    let s = status(&up, "core");
    assert!(healthy(&s), "{s:#}");
    assert_eq!(detail_u64(&s, "core/store", "rejected"), 0);
    assert!(detail_u64(&s, "core/broker", "connections") >= 10_000);

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
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
}
