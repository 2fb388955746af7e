//! Tunnels in network namespaces: an endpoint namespace, two router namespaces and a server
//! namespace behind the routers, each node a real `colony node` run with `ip netns exec`. Needs
//! root; every namespace is removed when a test ends (pass or fail). Traffic only goes to
//! addresses inside those namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::Duration;

use colony_tests::netns::{LabOptions, Netns, SERVER_V4, SERVER_V6, TunnelLab, ping_gap};
use colony_tests::wait_for;

fn root() -> bool {
    if Netns::available() {
        true
    } else {
        eprintln!("skipped: needs root and iproute2 for network namespaces");
        false
    }
}

fn ping(lab: &TunnelLab, args: &[&str]) -> String {
    let out = lab.in_endpoint("ping", args);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn ping_v4_and_v6_and_tcp_reach_the_server_through_the_tunnel() {
    if !root() {
        return;
    }
    let lab = TunnelLab::start(&LabOptions::default());
    let v4 = ping(&lab, &["-c", "5", "-i", "0.05", "-W", "1", SERVER_V4]);
    assert!(v4.contains(" 0% packet loss"), "ping v4: {v4}");
    let v6 = ping(&lab, &["-6", "-c", "5", "-i", "0.05", "-W", "1", SERVER_V6]);
    assert!(v6.contains(" 0% packet loss"), "ping v6: {v6}");

    // The packets went through the tunnel: the active router counted them.
    let active = lab.active().expect("active tunnel");
    let counted = wait_for(Duration::from_secs(3), || {
        lab.endpoint().is_some_and(|d| {
            d["tunnels"].as_array().unwrap().iter().any(|t| {
                t["peer"] == active.as_str()
                    && t["packets_out"].as_u64() >= Some(10)
                    && t["packets_in"].as_u64() >= Some(10)
                    && t["rtt_us"].as_u64().is_some()
            })
        })
    });
    assert!(counted, "{:?}", lab.endpoint());

    // TCP: an echo server in the server namespace, a client in the endpoint namespace.
    for (addr, listen) in [(SERVER_V4, "10.99.0.1"), (SERVER_V6, "fd99::1")] {
        let mut server = lab
            .ns
            .command(&lab.s, "nc")
            .args(["-l", "-N", listen, "5201"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("nc -l");
        std::thread::sleep(Duration::from_millis(300));
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut client = lab
            .ns
            .command(&lab.e, "nc")
            .args(["-N", addr, "5201"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("nc");
        client.stdin.take().unwrap().write_all(&payload).unwrap();
        let mut got = Vec::new();
        server.stdout.take().unwrap().read_to_end(&mut got).unwrap();
        let _ = client.wait();
        let _ = server.wait();
        assert_eq!(got.len(), payload.len(), "TCP over {addr}");
        assert!(got == payload, "TCP bytes differ over {addr}");
    }

    // The routers see the endpoint and NAT is in place.
    let r = lab.detail(&active).expect("router detail");
    assert_eq!(r["active_tunnels"], 1, "{r}");
    let nft = lab.ns.exec(
        if active == "ra/tun" { &lab.ra } else { &lab.rb },
        "nft",
        &["list", "ruleset"],
    );
    assert!(String::from_utf8_lossy(&nft.stdout).contains("masquerade"));
}

/// Runs `ping -i 0.01` while `kill` happens; returns (longest gap, replies, ping output).
fn ping_through(
    lab: &mut TunnelLab,
    count: u32,
    kill: impl FnOnce(&mut TunnelLab),
) -> (u64, usize, String) {
    let mut child = lab
        .ns
        .command(&lab.e, "ping")
        .args(["-i", "0.01", "-W", "1", "-c", &count.to_string(), SERVER_V4])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    std::thread::sleep(Duration::from_millis(1500));
    kill(lab);
    let _ = child.wait();
    let out = reader.join().unwrap();
    let (gap, replies) = ping_gap(&out);
    (gap, replies, out)
}

#[test]
fn killing_the_active_router_fails_over_within_ten_pings() {
    if !root() {
        return;
    }
    let mut lab = TunnelLab::start(&LabOptions::default());
    let active = lab.active().unwrap();
    let (victim, other) = if active == "ra/tun" {
        ("ra", "rb/tun")
    } else {
        ("rb", "ra/tun")
    };
    let (gap, replies, out) = ping_through(&mut lab, 400, |lab| lab.kill(victim));
    eprintln!("failover: {gap} pings lost in a row, {replies} of 400 answered");
    assert!(replies > 300, "{out}");
    assert!(gap < 10, "lost {gap} pings in a row:\n{out}");
    assert_eq!(lab.active().as_deref(), Some(other));
    let d = lab.endpoint().unwrap();
    assert!(d["failovers"].as_u64().unwrap() >= 1, "{d}");
    assert_eq!(
        d["switches"].as_array().unwrap().last().unwrap()["reason"],
        "dead"
    );
}

#[test]
fn redundant_mode_loses_nothing_when_a_router_dies() {
    if !root() {
        return;
    }
    let mut lab = TunnelLab::start(&LabOptions {
        redundant: true,
        ..LabOptions::default()
    });
    let (gap, replies, out) = ping_through(&mut lab, 400, |lab| lab.kill("ra"));
    eprintln!("redundant: {gap} pings lost in a row, {replies} of 400 answered");
    assert_eq!(gap, 0, "{out}");
    assert!(replies >= 399, "{out}");
}

#[test]
fn the_balancer_moves_the_endpoint_only_for_a_clear_difference_after_the_hold() {
    if !root() {
        return;
    }
    // Routers report once at start and then rarely, so the test's reports stand.
    let lab = TunnelLab::start(&LabOptions {
        follow_balancer: true,
        balancer_hold_secs: 3,
        report_interval_secs: 3600,
        recovery_hold_ms: 500,
        ..LabOptions::default()
    });
    let report = |router: &str, cpu: f64| {
        let msg = format!(
            r#"{{"report": {{"router": "{router}", "metrics": {{"cpu_percent": {cpu}, "memory_percent": 20, "bandwidth_mbps": 10, "tunnels": 1}}}}}}"#
        );
        lab.work.ctl_ok("edge", &["send", "edge/lb", &msg]);
    };
    // Routers reported their real metrics at start.
    let reported = wait_for(Duration::from_secs(10), || {
        lab.detail("edge/lb")
            .is_some_and(|d| d["routers"].as_array().is_some_and(|r| r.len() == 2))
    });
    assert!(
        reported,
        "routers never reported: {:?}",
        lab.detail("edge/lb")
    );
    report("ra/tun", 10.0);
    report("rb/tun", 12.0);
    let first = wait_for(Duration::from_secs(15), || {
        lab.endpoint()
            .is_some_and(|d| !d["balancer_decision"].is_null())
    });
    assert!(first, "no decision: {:?}", lab.endpoint());
    std::thread::sleep(Duration::from_secs(4));
    let start = lab.active().unwrap();
    let (here, there) = if start == "ra/tun" {
        ("ra/tun", "rb/tun")
    } else {
        ("rb/tun", "ra/tun")
    };
    // A small difference does not move it.
    report(here, 14.0);
    report(there, 10.0);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        lab.active().as_deref(),
        Some(here),
        "moved for a small difference"
    );
    // A clear one does.
    report(here, 95.0);
    report(there, 5.0);
    let moved = wait_for(Duration::from_secs(8), || {
        lab.active().as_deref() == Some(there)
    });
    assert!(moved, "did not move to {there}: {:?}", lab.endpoint());
    let ping = ping(&lab, &["-c", "3", "-i", "0.05", "-W", "1", SERVER_V4]);
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    // A change back inside the hold time does not move it back.
    report(here, 5.0);
    report(there, 95.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        lab.active().as_deref(),
        Some(there),
        "moved back inside the hold time"
    );
}
