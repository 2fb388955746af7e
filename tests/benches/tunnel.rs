//! Tunnel benchmark (needs root): TCP throughput with iperf3 through the tunnel (plain and in
//! redundant mode) next to the same namespaces routed without it, the failover time over
//! repeated kills of the active router, and in redundant mode the pings lost and the duplicate
//! echo requests reaching the server over repeated kills.
//!
//! Run: `cargo build --release --bins && cargo bench -p colony-tests --bench tunnel`
//! (`TUNNEL_BENCH_KILLS=N` sets the number of router kills, 10 by default).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use colony_tests::env_setting;
use colony_tests::netns::{EchoCounter, LabOptions, Netns, SERVER_V4, TunnelLab, ip, ping_gap};

/// Runs iperf3 from `client_ns` to the server in `server_ns`; Gbit/s received.
fn iperf(ns: &Netns, client_ns: &str, server_ns: &str) -> f64 {
    let mut server = ns
        .command(server_ns, "iperf3")
        .args(["-s", "-1", "-B", SERVER_V4])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let out = ns.exec(client_ns, "iperf3", &["-c", SERVER_V4, "-t", "5", "-J"]);
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn main() {
    if !Netns::available() {
        eprintln!("tunnel bench needs root and iproute2");
        return;
    }
    // Baseline: the same namespaces, the endpoint routed to the server through router A
    // without the tunnel.
    let baseline = {
        let (ns, [e, ra, _rb, s], _) = TunnelLab::namespaces();
        ip(&[
            "-n",
            &e,
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "10.200.1.2",
        ]);
        ip(&[
            "-n",
            &s,
            "route",
            "add",
            "10.200.1.0/24",
            "via",
            "10.201.1.1",
        ]);
        ns.exec(&ra, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        iperf(&ns, &e, &s)
    };
    let tunneled = {
        let lab = TunnelLab::start(&LabOptions::default());
        iperf(&lab.ns, &lab.e, &lab.s)
    };
    let redundant = {
        let lab = TunnelLab::start(&LabOptions {
            redundant: true,
            ..LabOptions::default()
        });
        iperf(&lab.ns, &lab.e, &lab.s)
    };
    println!("tcp throughput (iperf3, 5 s, 1 stream)");
    println!("  routed, no tunnel           : {baseline:.2} Gbit/s");
    println!("  through the tunnel          : {tunneled:.2} Gbit/s");
    println!(
        "  ratio                       : {:.2}",
        tunneled / baseline.max(1e-9)
    );
    println!("  through the tunnel, redundant: {redundant:.2} Gbit/s");

    let kills: usize = env_setting("TUNNEL_BENCH_KILLS", 10);
    let mut gaps_ms = Vec::new();
    let mut lost = Vec::new();
    let mut dups_at_server = Vec::new();
    for run in 0..2 * kills {
        // First the plain runs, then the redundant ones.
        let redundant = run >= kills;
        let mut lab = TunnelLab::start(&LabOptions {
            redundant,
            ..LabOptions::default()
        });
        let counter = EchoCounter::install(&lab.ns, &lab.s);
        let victim = if lab.active().as_deref() == Some("rb/tun") {
            "rb"
        } else {
            "ra"
        };
        let mut child = lab
            .ns
            .command(&lab.e, "ping")
            .args(["-i", "0.01", "-W", "1", "-c", "300", SERVER_V4])
            .stdout(Stdio::piped())
            .spawn()
            .expect("ping");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
                .join("\n")
        });
        std::thread::sleep(Duration::from_millis(1000));
        lab.kill(victim);
        let _ = child.wait();
        let out = reader.join().unwrap_or_default();
        let (gap, replies) = ping_gap(&out);
        if redundant {
            lost.push(300 - replies as u64);
            // Requests beyond the 300 sent reached the server twice.
            dups_at_server.push(counter.requests(&lab.ns).saturating_sub(300));
        } else {
            // Each lost ping is 10 ms of no traffic.
            gaps_ms.push(gap * 10);
        }
    }
    gaps_ms.sort_unstable();
    if !gaps_ms.is_empty() {
        let pct = |p: f64| gaps_ms[((gaps_ms.len() - 1) as f64 * p).round() as usize];
        println!(
            "failover (kill -9 of the active router, 20 ms probes, dead after 3), {} runs",
            gaps_ms.len()
        );
        println!(
            "  traffic gap ms: min {} / median {} / p90 {} / max {}",
            gaps_ms[0],
            pct(0.5),
            pct(0.9),
            gaps_ms[gaps_ms.len() - 1]
        );
        println!("  all: {gaps_ms:?}");
    }
    if !lost.is_empty() {
        println!(
            "redundant mode, kill -9 of the active router during 300 pings at 10 ms, {} runs",
            lost.len()
        );
        println!(
            "  pings lost: {} in all {lost:?}; duplicate requests at the server: {} in all {dups_at_server:?}",
            lost.iter().sum::<u64>(),
            dups_at_server.iter().sum::<u64>()
        );
    }
}
