//! A node boots from the cluster config, supervises its actors and answers on its control socket:
//! three real `colony node` processes on loopback, driven with `colony ctl`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use colony_tests::*;

/// A three-node cluster config; `strategy` and intensity for every node's root supervisor.
fn config(strategy: &str, max_restarts: u32) -> String {
    let [a, b, c] = [free_udp_port(), free_udp_port(), free_udp_port()];
    format!(
        r#"
[cluster]
name = "rt"
heartbeat_ms = 100
heartbeat_misses = 3

[supervision]
strategy = "{strategy}"
max_restarts = {max_restarts}
within_secs = 30
backoff_ms = 10

[[node]]
name = "alpha"
listen = "127.0.0.1:{a}"

[[node]]
name = "beta"
listen = "127.0.0.1:{b}"

[[node]]
name = "gamma"
listen = "127.0.0.1:{c}"

[[actor]]
name = "first"
node = "alpha"
kind = "balancer"

[[actor]]
name = "second"
node = "alpha"
kind = "balancer"

[[actor]]
name = "third"
node = "alpha"
kind = "balancer"

[[actor]]
name = "lb"
node = "beta"
kind = "balancer"

[[actor]]
name = "lb"
node = "gamma"
kind = "balancer"
restart = "transient"
"#
    )
}

struct Running {
    work: Workdir,
    nodes: Vec<NodeProc>,
}

fn start(strategy: &str, max_restarts: u32) -> Running {
    let work = Workdir::new(&config(strategy, max_restarts));
    let nodes = ["alpha", "beta", "gamma"]
        .iter()
        .map(|n| work.start_node(n))
        .collect();
    let r = Running { work, nodes };
    let ok = wait_for(Duration::from_secs(20), || {
        r.work.status("alpha").is_some_and(|s| healthy(&s))
    });
    assert!(
        ok,
        "cluster never became healthy: {:?}",
        r.work.status("alpha")
    );
    r
}

fn restarts(status: &serde_json::Value, address: &str) -> u64 {
    actor(status, address).unwrap_or_else(|| panic!("{address} missing"))["restarts"]
        .as_u64()
        .unwrap()
}

fn state(status: &serde_json::Value, address: &str) -> String {
    actor(status, address).unwrap_or_else(|| panic!("{address} missing"))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn status_from_any_node_lists_every_node_and_actor() {
    let r = start("one_for_one", 5);
    for node in ["alpha", "beta", "gamma"] {
        let s = r.work.status(node).unwrap();
        assert_eq!(s["answered_by"], node);
        let nodes = s["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3);
        for address in [
            "alpha/first",
            "alpha/second",
            "alpha/third",
            "beta/lb",
            "gamma/lb",
        ] {
            let a =
                actor(&s, address).unwrap_or_else(|| panic!("{address} not in status from {node}"));
            assert_eq!(a["kind"], "balancer");
            assert_eq!(a["state"], "running");
            assert!(a["uptime_ms"].as_u64().is_some());
        }
        let links = node_entry(&s, "beta").unwrap()["status"]["links"]
            .as_array()
            .unwrap();
        assert_eq!(links.len(), 2);
        assert!(
            links
                .iter()
                .all(|l| l["state"] == "up" && l["rtt_us"].as_u64().unwrap() > 0)
        );
    }
    // The human table names everything too.
    let out = r.work.ctl("beta", &["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for word in ["alpha/first", "gamma/lb", "balancer", "running"] {
        assert!(table.contains(word), "table lacks {word}:\n{table}");
    }
}

#[test]
fn a_killed_actor_comes_back_with_its_restart_and_reason() {
    let r = start("one_for_one", 5);
    let killed = Instant::now();
    r.work.ctl_ok("beta", &["kill", "alpha/second"]);
    let back = wait_for(Duration::from_secs(5), || {
        r.work.status("alpha").is_some_and(|s| {
            restarts(&s, "alpha/second") == 1 && state(&s, "alpha/second") == "running"
        })
    });
    assert!(back, "alpha/second did not come back");
    let elapsed = killed.elapsed();
    let s = r.work.status("gamma").unwrap();
    let a = actor(&s, "alpha/second").unwrap();
    assert_eq!(a["last_error"], "killed by operator");
    // one_for_one: the siblings were not touched.
    assert_eq!(restarts(&s, "alpha/first"), 0);
    assert_eq!(restarts(&s, "alpha/third"), 0);
    eprintln!("killed actor serving again after {elapsed:?} (as seen through ctl)");
}

#[test]
fn one_for_all_restarts_every_sibling() {
    let r = start("one_for_all", 5);
    r.work.ctl_ok("alpha", &["kill", "alpha/second"]);
    let ok = wait_for(Duration::from_secs(5), || {
        r.work.status("alpha").is_some_and(|s| {
            ["alpha/first", "alpha/second", "alpha/third"]
                .iter()
                .all(|a| restarts(&s, a) == 1 && state(&s, a) == "running")
        })
    });
    assert!(ok, "{:?}", r.work.status("alpha"));
    // Other nodes' supervisors are their own.
    let s = r.work.status("alpha").unwrap();
    assert_eq!(restarts(&s, "beta/lb"), 0);
}

#[test]
fn rest_for_one_restarts_the_failed_actor_and_those_after_it() {
    let r = start("rest_for_one", 5);
    r.work.ctl_ok("alpha", &["kill", "alpha/second"]);
    let ok = wait_for(Duration::from_secs(5), || {
        r.work.status("alpha").is_some_and(|s| {
            restarts(&s, "alpha/second") == 1
                && restarts(&s, "alpha/third") == 1
                && state(&s, "alpha/third") == "running"
        })
    });
    assert!(ok, "{:?}", r.work.status("alpha"));
    assert_eq!(restarts(&r.work.status("alpha").unwrap(), "alpha/first"), 0);
}

#[test]
fn exceeding_the_restart_intensity_escalates_to_the_root() {
    let r = start("one_for_one", 2);
    for i in 1..=2u64 {
        r.work.ctl_ok("alpha", &["kill", "alpha/first"]);
        let ok = wait_for(Duration::from_secs(5), || {
            r.work.status("alpha").is_some_and(|s| {
                restarts(&s, "alpha/first") == i && state(&s, "alpha/first") == "running"
            })
        });
        assert!(ok, "restart {i} did not happen");
    }
    // The third failure within the window is one too many: the root stops every actor.
    r.work.ctl_ok("alpha", &["kill", "alpha/first"]);
    let gave_up = wait_for(Duration::from_secs(5), || {
        r.work.status("beta").is_some_and(|s| {
            let sup = &node_entry(&s, "alpha").unwrap()["status"]["supervisor"];
            sup["given_up"] == true
                && state(&s, "alpha/first") == "failed"
                && state(&s, "alpha/second") == "stopped"
                && state(&s, "alpha/third") == "stopped"
        })
    });
    assert!(gave_up, "{:?}", r.work.status("beta"));
    // The node, its links and its control socket keep working; other nodes are untouched.
    let s = r.work.status("alpha").unwrap();
    assert!(
        node_entry(&s, "alpha").unwrap()["status"]["links"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["state"] == "up")
    );
    assert_eq!(state(&s, "beta/lb"), "running");
    // An operator starts the actor again on a fresh root.
    r.work.ctl_ok("alpha", &["start", "alpha/first"]);
    assert!(wait_for(Duration::from_secs(5), || r
        .work
        .status("alpha")
        .is_some_and(|s| state(&s, "alpha/first") == "running")));
}

#[test]
fn operator_stop_start_and_restart() {
    let r = start("one_for_one", 5);
    r.work.ctl_ok("gamma", &["stop", "beta/lb"]);
    assert!(wait_for(Duration::from_secs(5), || r
        .work
        .status("beta")
        .is_some_and(|s| state(&s, "beta/lb") == "stopped")));
    let again = r.work.ctl("beta", &["stop", "beta/lb"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not running"));
    r.work.ctl_ok("beta", &["start", "beta/lb"]);
    assert!(wait_for(Duration::from_secs(5), || r
        .work
        .status("beta")
        .is_some_and(|s| state(&s, "beta/lb") == "running")));
    r.work.ctl_ok("beta", &["restart", "beta/lb"]);
    assert!(wait_for(Duration::from_secs(5), || r
        .work
        .status("beta")
        .is_some_and(
            |s| restarts(&s, "beta/lb") == 1 && state(&s, "beta/lb") == "running"
        )));
    let s = r.work.status("beta").unwrap();
    assert!(
        actor(&s, "beta/lb").unwrap()["last_error"].is_null(),
        "an operator restart is not a failure"
    );
}

#[test]
fn send_and_call_reach_actors_by_address() {
    let r = start("one_for_one", 5);
    let report = r#"{"report": {"router": "r1", "metrics": {"cpu_percent": 10, "memory_percent": 20, "bandwidth_mbps": 5, "tunnels": 1}}}"#;
    r.work.colony_ok(&[
        "ctl",
        "--config",
        r.work.config_str(),
        "--node",
        "alpha",
        "send",
        "gamma/lb",
        report,
    ]);
    let reply = r.work.ctl_json(
        "beta",
        &["call", "gamma/lb", r#"{"decide": {"endpoint": "e1"}}"#],
    );
    assert_eq!(reply["reply"]["router"], "r1", "{reply}");
    assert_eq!(reply["reply"]["reason"], "initial");
    let s = r.work.status("alpha").unwrap();
    assert_eq!(actor(&s, "gamma/lb").unwrap()["messages_handled"], 2);

    for (address, message, expect) in [
        ("gamma/nobody", "{}", "no actor nobody on node gamma"),
        ("delta/lb", "{}", "no node delta in the cluster"),
        ("gamma/lb", r#"{"explode": {}}"#, "not a balancer message"),
        ("gamma/lb", "not json", "not JSON"),
        ("lb", "{}", "expected node/actor"),
    ] {
        let out = r.work.ctl("alpha", &["call", address, message]);
        assert!(!out.status.success(), "{address} {message} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{address} {message}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    }
}

#[test]
fn a_node_killed_with_sigkill_is_seen_down_and_rejoins() {
    let mut r = start("one_for_one", 5);
    r.nodes[2].kill9();
    let killed = Instant::now();
    let down = wait_for(Duration::from_secs(5), || {
        r.work.status("alpha").is_some_and(|s| {
            node_entry(&s, "gamma").unwrap()["reachable"] == false
                && node_entry(&s, "alpha").unwrap()["status"]["links"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|l| l["peer"] == "gamma" && l["state"] == "down")
        })
    });
    assert!(down, "gamma not reported down");
    // Failure detection is 300 ms here; status polling through ctl adds its own delay.
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "took {:?}",
        killed.elapsed()
    );
    let s = r.work.status("beta").unwrap();
    assert_eq!(node_entry(&s, "gamma").unwrap()["reachable"], false);
    assert!(
        node_entry(&s, "gamma").unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("down")
    );

    r.nodes[2] = r.work.start_node("gamma");
    let back = wait_for(Duration::from_secs(15), || {
        r.work.status("alpha").is_some_and(|s| healthy(&s))
    });
    assert!(back, "gamma did not rejoin: {:?}", r.work.status("alpha"));
}

#[test]
fn sigterm_stops_a_node_cleanly() {
    let mut r = start("one_for_one", 5);
    r.nodes[1].signal(libc::SIGTERM);
    assert_eq!(r.nodes[1].wait_exit(Duration::from_secs(10)), Some(0));
    let log = r.nodes[1].log_text();
    assert!(log.contains("stopped"), "{log}");
    // Its peers see it leave at once (it said goodbye), not after a timeout.
    assert!(wait_for(Duration::from_secs(2), || r
        .work
        .status("alpha")
        .is_some_and(
            |s| node_entry(&s, "beta").unwrap()["reachable"] == false
        )));
}

fn socket_path(work: &Workdir, node: &str) -> std::path::PathBuf {
    work.path()
        .join(".colony/rt")
        .join(node)
        .join("control.sock")
}

fn raw_request(stream: &mut UnixStream, bytes: &[u8]) -> serde_json::Value {
    stream
        .write_all(&(bytes.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(bytes).unwrap();
    read_response(stream)
}

fn read_response(stream: &mut UnixStream) -> serde_json::Value {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).unwrap();
    serde_json::from_slice(&buf).unwrap()
}

#[test]
fn the_control_socket_is_private_and_survives_bad_requests() {
    let r = start("one_for_one", 5);
    let path = socket_path(&r.work, "alpha");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);

    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let garbage = raw_request(&mut s, b"\x00\xffnot json at all");
    assert!(
        garbage["error"].as_str().unwrap().contains("not JSON"),
        "{garbage}"
    );
    let unknown = raw_request(&mut s, br#"{"v":1,"cmd":"explode"}"#);
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("not a valid request"),
        "{unknown}"
    );
    let version = raw_request(&mut s, br#"{"v":9,"cmd":"status"}"#);
    assert!(
        version["error"].as_str().unwrap().contains("version 9"),
        "{version}"
    );
    // The same connection still answers.
    let ok = raw_request(&mut s, br#"{"v":1,"cmd":"status"}"#);
    assert_eq!(ok["ok"]["answered_by"], "alpha");

    // An oversized request is refused and that connection closed; others keep working.
    let mut big = UnixStream::connect(&path).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    big.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    let refused = read_response(&mut big);
    assert!(
        refused["error"].as_str().unwrap().contains("larger than"),
        "{refused}"
    );
    // Half a frame, then hang up.
    let mut half = UnixStream::connect(&path).unwrap();
    half.write_all(&100u32.to_be_bytes()).unwrap();
    half.write_all(b"{\"v\":").unwrap();
    drop(half);
    assert!(r.work.status("alpha").is_some());
}

#[test]
fn startup_failures_print_one_line_and_exit_non_zero() {
    let work = Workdir::new(&config("one_for_one", 5));
    // Unknown node.
    let out = work.colony(&["node", "--config", work.config_str(), "--name", "omega"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no node named 'omega'"), "{err}");
    // Bad config.
    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[cluster]\nname = \"x\"\n[[node]]\nname = 1\n").unwrap();
    let out = work.colony(&["node", "--config", bad.to_str().unwrap(), "--name", "x"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:4:8"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Missing certificate.
    std::fs::remove_file(work.path().join(".colony/rt/certs/beta.pem")).unwrap();
    let out = work.colony(&["node", "--config", work.config_str(), "--name", "beta"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("beta.pem") && err.lines().count() == 1,
        "{err}"
    );
    // Port in use.
    let config = std::fs::read_to_string(&work.config).unwrap();
    let port = config
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let _taken = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let out = work.colony(&["node", "--config", work.config_str(), "--name", "alpha"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot bind") && err.contains("in use"),
        "{err}"
    );
}
