//! Tunnels in network namespaces: an endpoint namespace, two router namespaces and a server
//! namespace behind the routers, each node a real `colony node` run with `ip netns exec`. Needs
//! root; every namespace is removed when a test ends (pass or fail). Traffic only goes to
//! addresses inside those namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::Duration;

use colony_tests::netns::{
    EchoCounter, LabOptions, Netns, SERVER_V4, SERVER_V6, TunnelLab, ping_gap,
};
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
    // Slow probes: a machine loaded by parallel tests must not fail over mid-transfer (a move
    // to the other router's NAT breaks TCP connections).
    let lab = TunnelLab::start(&LabOptions {
        probe_interval_ms: 100,
        ..LabOptions::default()
    });
    let v4 = ping(&lab, &["-c", "5", "-i", "0.05", "-W", "1", SERVER_V4]);
    assert!(v4.contains(" 0% packet loss"), "ping v4: {v4}");
    let v6 = ping(&lab, &["-6", "-c", "5", "-i", "0.05", "-W", "1", SERVER_V6]);
    assert!(v6.contains(" 0% packet loss"), "ping v6: {v6}");

    // The device MTU is 1400 and a 1400-byte packet fits in the datagram; a larger one is
    // refused by the endpoint's own stack, which knows the device's MTU.
    let full = ping(
        &lab,
        &[
            "-M", "do", "-s", "1372", "-c", "3", "-i", "0.05", "-W", "1", SERVER_V4,
        ],
    );
    assert!(full.contains(" 0% packet loss"), "1400-byte ping: {full}");
    let over = ping(
        &lab,
        &["-M", "do", "-s", "1373", "-c", "1", "-W", "1", SERVER_V4],
    );
    assert_eq!(reported_mtu(&over), Some(1400), "{over}");
    let full6 = ping(
        &lab,
        &[
            "-6", "-M", "do", "-s", "1352", "-c", "3", "-i", "0.05", "-W", "1", SERVER_V6,
        ],
    );
    assert!(
        full6.contains(" 0% packet loss"),
        "1400-byte ping -6: {full6}"
    );

    let d = lab.endpoint().unwrap();
    assert_eq!(d["mtu"], 1400, "{d}");
    for t in d["tunnels"].as_array().unwrap() {
        assert!(
            t["max_packet"].as_u64() >= Some(1400),
            "datagram too small: {d}"
        );
    }

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

    // TCP both ways, IPv4 and IPv6.
    for addr in [SERVER_V4, SERVER_V6] {
        tcp_both_ways(&lab, addr, 200_000);
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

/// The MTU `ping` reports (`mtu = 1400`, `mtu=1400`), if any.
fn reported_mtu(out: &str) -> Option<u32> {
    let at = out.find("mtu")? + 3;
    let digits: String = out[at..]
        .chars()
        .skip_while(|c| *c == ' ' || *c == '=')
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Sends `len` bytes over TCP from the endpoint to the server at `addr` and `len` bytes back
/// (`nc` in each namespace); both must arrive intact.
fn tcp_both_ways(lab: &TunnelLab, addr: &str, len: u32) {
    let listen = if addr.contains(':') {
        "fd99::1"
    } else {
        "10.99.0.1"
    };
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    // Download first: an upload would teach the endpoint the path MTU, and its SYN would then
    // announce an MSS small enough that the server never sends a packet too big.
    for upload in [false, true] {
        let (server_in, client_in) = if upload {
            (Stdio::null(), Stdio::piped())
        } else {
            (Stdio::piped(), Stdio::null())
        };
        let mut server = lab
            .ns
            .command(&lab.s, "nc")
            .args(["-l", "-N", listen, "5201"])
            .stdout(Stdio::piped())
            .stdin(server_in)
            .spawn()
            .expect("nc -l");
        // The client connects once the server listens (bounded wait).
        let listening = wait_for(Duration::from_secs(5), || {
            let out = lab.ns.exec(&lab.s, "ss", &["-Hltn", "sport = :5201"]);
            !out.stdout.is_empty()
        });
        assert!(listening, "nc -l never listened");
        // Downloading, the client must not half-close at once (the server would stop).
        let client_args: Vec<&str> = if upload {
            vec!["-N", addr, "5201"]
        } else {
            vec![addr, "5201"]
        };
        let mut client = lab
            .ns
            .command(&lab.e, "nc")
            .args(&client_args)
            .stdin(client_in)
            .stdout(Stdio::piped())
            .spawn()
            .expect("nc");
        let (sender, receiver) = if upload {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        let mut input = sender.stdin.take().unwrap();
        let data = payload.clone();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let mut got = Vec::new();
        let mut out = receiver.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let _ = out.read_to_end(&mut got);
            got
        });
        // Bounded: if the transfer stalls, kill both ends after 20 s.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !reader.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = client.kill();
        let _ = server.kill();
        let _ = client.wait();
        let _ = server.wait();
        let _ = writer.join();
        let got = reader.join().unwrap();
        let way = if upload { "upload" } else { "download" };
        assert_eq!(
            got.len(),
            payload.len(),
            "TCP {way} over {addr}; endpoint {:?}; routers {:?} {:?}",
            lab.endpoint(),
            lab.detail("ra/tun"),
            lab.detail("rb/tun")
        );
        assert!(got == payload, "TCP {way} bytes differ over {addr}");
    }
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

    // Anti-flap: the killed router comes back; the endpoint returns to it (its first peer)
    // only after the path has been up for the recovery hold (2 s here).
    lab.restart_node(victim);
    let victim_tun = format!("{victim}/tun");
    let back = wait_for(Duration::from_secs(30), || {
        lab.active().as_deref() == Some(victim_tun.as_str())
    });
    if victim == "ra" {
        assert!(
            back,
            "never went back to {victim_tun}: {:?}",
            lab.endpoint()
        );
        let d = lab.endpoint().unwrap();
        let up_since = d["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["peer"] == victim_tun.as_str())
            .unwrap()["since_unix_ms"]
            .as_u64()
            .unwrap();
        let last = d["switches"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["reason"], "preferred", "{d}");
        let waited = last["at_unix_ms"].as_u64().unwrap() - up_since;
        assert!(
            (2000..4000).contains(&waited),
            "moved back {waited} ms after the path came up: {d}"
        );
    } else {
        assert!(
            !back,
            "moved to the returning {victim_tun} without being preferred"
        );
    }
}

/// Pings `count` times at 10 ms; asserts none lost, no duplicate reply, and exactly `count`
/// echo requests reaching the server.
fn ping_once_each(lab: &TunnelLab, counter: &EchoCounter, count: u32, what: &str) {
    let before = counter.requests(&lab.ns);
    let out = ping(
        lab,
        &["-i", "0.01", "-W", "1", "-c", &count.to_string(), SERVER_V4],
    );
    assert!(out.contains(" 0% packet loss"), "{what}: {out}");
    assert!(!out.contains("DUP!"), "{what}: duplicates\n{out}");
    let reached = counter.requests(&lab.ns) - before;
    assert_eq!(reached, u64::from(count), "{what}: requests at the server");
}

#[test]
fn redundant_mode_loses_nothing_and_answers_each_ping_once_when_a_router_dies() {
    if !root() {
        return;
    }
    let mut lab = TunnelLab::start(&LabOptions {
        redundant: true,
        recovery_hold_ms: 500,
        ..LabOptions::default()
    });
    let counter = EchoCounter::install(&lab.ns, &lab.s);
    ping_once_each(&lab, &counter, 100, "both routers up");
    // TCP keeps to one router: a segment leaking out through the standby router's NAT would
    // reset the connection.
    tcp_both_ways(&lab, SERVER_V4, 300_000);
    // The standby router held its copies and dropped them on the active one's notices.
    let standby = if lab.active().as_deref() == Some("ra/tun") {
        "rb/tun"
    } else {
        "ra/tun"
    };
    let held = wait_for(Duration::from_secs(3), || {
        lab.detail(standby).is_some_and(|d| {
            let t = &d["tunnels"][0];
            t["held_dropped"].as_u64() >= Some(100)
                && t["notices_received"].as_u64() > Some(0)
                && t["held_forwarded"] == 0
        })
    });
    assert!(held, "standby {standby}: {:?}", lab.detail(standby));

    let before = counter.requests(&lab.ns);
    let victim = if standby == "rb/tun" { "ra" } else { "rb" };
    let (gap, replies, out) = ping_through(&mut lab, 400, |lab| lab.kill(victim));
    eprintln!("redundant: {gap} pings lost in a row, {replies} of 400 answered");
    assert_eq!(gap, 0, "{out}");
    assert!(replies >= 399, "{out}");
    assert!(!out.contains("DUP!"), "duplicates:\n{out}");
    // A request the dying router forwarded just before its notice of it could leave reaches
    // the server again from the other router (its first answer went back to the dead router):
    // at most one such, as the kill comes at one instant.
    let reached = counter.requests(&lab.ns) - before;
    assert!(
        (399..=401).contains(&reached),
        "{reached} echo requests reached the server for 400 sent"
    );

    // The killed router comes back (a new run: its numbers start again) and takes part.
    lab.restart_node(victim);
    assert!(
        lab.wait_both_up(Duration::from_secs(20)),
        "{:?}",
        lab.endpoint()
    );
    std::thread::sleep(Duration::from_millis(800));
    ping_once_each(&lab, &counter, 100, "after the router's restart");

    // The endpoint restarts: its sequence numbers start from 1 again under a new epoch, and the
    // routers must not take them for duplicates of the old run's.
    lab.work.ctl_ok("edge", &["restart", "edge/tun"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.wait_both_up(Duration::from_secs(20)),
        "{:?}",
        lab.endpoint()
    );
    ping_once_each(&lab, &counter, 100, "after the endpoint's restart");
    let restarts = wait_for(Duration::from_secs(3), || {
        lab.detail(standby)
            .is_some_and(|d| d["tunnels"][0]["endpoint_restarts"].as_u64() >= Some(1))
    });
    assert!(restarts, "{:?}", lab.detail(standby));
}

#[test]
fn packets_too_big_for_the_datagram_get_the_icmp_answer() {
    if !root() {
        return;
    }
    // Devices larger than what a datagram carries, so the tunnel itself must answer.
    let lab = TunnelLab::start(&LabOptions {
        probe_interval_ms: 100,
        endpoint_mtu: Some(1500),
        router_mtu: Some(1500),
        ..LabOptions::default()
    });
    // TCP finds the path MTU from these answers both ways: the endpoint's upload through the
    // endpoint's answer, the server's download through the router's.
    for addr in [SERVER_V4, SERVER_V6] {
        tcp_both_ways(&lab, addr, 300_000);
    }
    let v4 = ping(
        &lab,
        &[
            "-M", "do", "-s", "1450", "-c", "3", "-i", "0.2", "-W", "1", SERVER_V4,
        ],
    );
    assert!(
        v4.contains("From 10.77.0.1") && v4.contains("Frag needed"),
        "ping -M do -s 1450: {v4}"
    );
    let mtu = reported_mtu(&v4).expect("an mtu");
    assert!((1300..1500).contains(&mtu), "mtu {mtu}: {v4}");
    let v6 = ping(
        &lab,
        &[
            "-6", "-M", "do", "-s", "1450", "-c", "3", "-i", "0.2", "-W", "1", SERVER_V6,
        ],
    );
    assert!(
        v6.contains("From fd77::1") && v6.contains("Packet too big"),
        "ping -6 -M do -s 1450: {v6}"
    );
    assert_eq!(reported_mtu(&v6), Some(mtu), "{v6}");
    // The MTU it names is exact: a packet of that size goes through.
    let fits = ping(
        &lab,
        &[
            "-M",
            "do",
            "-s",
            &(mtu - 28).to_string(),
            "-c",
            "3",
            "-i",
            "0.05",
            "-W",
            "1",
            SERVER_V4,
        ],
    );
    assert!(fits.contains(" 0% packet loss"), "{fits}");
    let d = lab.endpoint().unwrap();
    assert!(d["too_big"].as_u64() >= Some(2), "{d}");
    // The MTU named is what status says a datagram to the router carries.
    let active = d["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["active"] == true)
        .unwrap()
        .clone();
    assert_eq!(active["max_packet"].as_u64(), Some(u64::from(mtu)), "{d}");
    let active = lab.active().unwrap();
    let r = lab.detail(&active).unwrap();
    assert!(
        r["too_big"].as_u64() >= Some(1),
        "router answered nothing: {r}"
    );
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

#[test]
fn local_health_beats_the_balancer() {
    if !root() {
        return;
    }
    let mut lab = TunnelLab::start(&LabOptions {
        follow_balancer: true,
        balancer_hold_secs: 1,
        report_interval_secs: 3600,
        recovery_hold_ms: 500,
        ..LabOptions::default()
    });
    let report = |lab: &TunnelLab, router: &str, cpu: f64| {
        let msg = format!(
            r#"{{"report": {{"router": "{router}", "metrics": {{"cpu_percent": {cpu}, "memory_percent": 20, "bandwidth_mbps": 10, "tunnels": 1}}}}}}"#
        );
        lab.work.ctl_ok("edge", &["send", "edge/lb", &msg]);
    };
    // The balancer clearly prefers router B, and the endpoint follows.
    let preferred = wait_for(Duration::from_secs(15), || {
        report(&lab, "ra/tun", 90.0);
        report(&lab, "rb/tun", 5.0);
        lab.active().as_deref() == Some("rb/tun")
    });
    assert!(preferred, "{:?}", lab.endpoint());
    // B's node dies; the balancer, which has heard from B recently, still says B, but the
    // endpoint's own probes find B dead and traffic moves to A at once.
    lab.kill("rb");
    let moved = wait_for(Duration::from_secs(2), || {
        lab.active().as_deref() == Some("ra/tun")
    });
    let d = lab.endpoint().unwrap();
    assert!(moved, "{d}");
    assert_eq!(d["balancer_decision"]["router"], "rb/tun", "{d}");
    assert_eq!(d["preferred"], "rb/tun", "{d}");
    let out = ping(&lab, &["-c", "5", "-i", "0.05", "-W", "1", SERVER_V4]);
    assert!(out.contains(" 0% packet loss"), "{out}");
}

#[test]
fn routers_restore_forwarding_and_remove_nat_when_they_stop_and_report_every_interval() {
    if !root() {
        return;
    }
    // A second router on node ra, in the same namespace as ra/tun; rb's namespace had
    // forwarding on before its router started.
    let lab = TunnelLab::start(&LabOptions {
        follow_balancer: true,
        report_interval_secs: 1,
        preset_forwarding_rb: true,
        extra_config: "[[actor]]\nname = \"tun2\"\nnode = \"ra\"\nkind = \"tunnel\"\n\
                       role = \"router\"\ndevice = \"col-tun2\"\n"
            .to_owned(),
        ..LabOptions::default()
    });
    const V4: &str = "/proc/sys/net/ipv4/ip_forward";
    const V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
    let forwarding = |ns: &str| (lab.sysctl(ns, V4), lab.sysctl(ns, V6));
    let on = ("1".to_owned(), "1".to_owned());
    let off = ("0".to_owned(), "0".to_owned());
    let nat = |ns: &str| {
        let out = lab.ns.exec(ns, "nft", &["list", "tables"]);
        String::from_utf8_lossy(&out.stdout).contains("colony_col-tun\n")
    };
    assert_eq!(forwarding(&lab.ra), on);
    assert!(nat(&lab.ra) && nat(&lab.rb));

    // Metrics reach the balancer every report interval (1 s here): the age of each router's
    // report stays under two intervals, and status shows score, metrics and the decision.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        let b = lab.detail("edge/lb").expect("balancer status");
        let routers = b["routers"].as_array().unwrap();
        assert_eq!(routers.len(), 2, "{b}");
        for r in routers {
            assert!(r["age_ms"].as_u64().unwrap() < 2000, "{b}");
            assert_eq!(r["live"], true, "{b}");
            let score = r["score"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&score), "{b}");
            assert!(
                r["metrics"]["memory_percent"].as_f64().unwrap() > 0.0,
                "{b}"
            );
        }
        let decisions = b["decisions"].as_array().unwrap();
        assert!(
            decisions.iter().any(|d| d["endpoint"] == "edge/tun"
                && d["router"].is_string()
                && d["changed_ms_ago"].is_u64()
                && d["changed_unix_ms"].is_u64()),
            "{b}"
        );
    }

    // Later reports count the endpoint's tunnel on each router.
    let counted = wait_for(Duration::from_secs(5), || {
        lab.detail("edge/lb").is_some_and(|b| {
            b["routers"]
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["metrics"]["tunnels"] == 1))
        })
    });
    assert!(counted, "{:?}", lab.detail("edge/lb"));

    // ra/tun stops: its NAT goes, but forwarding stays on for ra/tun2.
    lab.work.ctl_ok("edge", &["stop", "ra/tun"]);
    assert!(
        wait_for(Duration::from_secs(5), || !nat(&lab.ra)),
        "NAT left behind"
    );
    assert_eq!(forwarding(&lab.ra), on, "turned off under ra/tun2");
    // The last router of the namespace stops: forwarding is off again, as it was.
    lab.work.ctl_ok("edge", &["stop", "ra/tun2"]);
    assert!(
        wait_for(Duration::from_secs(5), || forwarding(&lab.ra) == off),
        "forwarding not restored: {:?}",
        forwarding(&lab.ra)
    );
    // In rb's namespace it was on before the router: it stays on, and the NAT goes.
    lab.work.ctl_ok("edge", &["stop", "rb/tun"]);
    assert!(
        wait_for(Duration::from_secs(5), || !nat(&lab.rb)),
        "NAT left behind"
    );
    assert_eq!(forwarding(&lab.rb), on);
    // Started again, a router turns it on again and traffic flows.
    lab.work.ctl_ok("edge", &["start", "ra/tun"]);
    assert!(wait_for(Duration::from_secs(10), || forwarding(&lab.ra)
        == on
        && nat(&lab.ra)));
    let ok = wait_for(Duration::from_secs(10), || {
        lab.active().as_deref() == Some("ra/tun")
    });
    assert!(ok, "{:?}", lab.endpoint());
    // The restarted router's first packet may find its NAT still being installed: wait for one
    // answer, then nothing may be lost.
    let answered = wait_for(Duration::from_secs(10), || {
        ping(&lab, &["-c", "1", "-W", "1", SERVER_V4]).contains(" 0% packet loss")
    });
    assert!(answered, "no answer through the restarted router");
    let out = ping(&lab, &["-c", "5", "-i", "0.05", "-W", "1", SERVER_V4]);
    assert!(out.contains(" 0% packet loss"), "{out}");
}

#[test]
fn pool_addresses_are_stable_across_restarts() {
    if !root() {
        return;
    }
    let lab = TunnelLab::start(&LabOptions::default());
    let addrs = || {
        let out = lab.in_endpoint("ip", &["-o", "addr", "show", "dev", "col-tun"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut found: Vec<String> = text
            .split_whitespace()
            .filter(|w| w.contains('/'))
            .filter(|w| w.starts_with("10.77.") || w.starts_with("fd77:"))
            .map(str::to_owned)
            .collect();
        found.sort();
        found
    };
    let first = addrs();
    // The first (and only) endpoint drawing from the pool gets its base.
    assert_eq!(first, ["10.77.0.10/24", "fd77::10/64"], "{first:?}");
    lab.work.ctl_ok("edge", &["restart", "edge/tun"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(lab.wait_both_up(Duration::from_secs(20)));
    assert_eq!(addrs(), first);
    let out = ping(&lab, &["-c", "3", "-i", "0.05", "-W", "1", SERVER_V4]);
    assert!(out.contains(" 0% packet loss"), "{out}");
}
