//! Sensors per node: how many simulated sensors (1 reading per second each, QoS 0, plain TCP)
//! one `colony node` keeps at their rate, with that node's CPU and RSS.
//!
//! Two nodes on loopback: `hub` runs the broker, `field` runs one sensor group of N sensors.
//! For each N the bench waits until all N are connected, lets them run for a warm-up, then over
//! a measuring window reads `field`'s CPU time and RSS from /proc and the readings the group sent
//! and the broker received. A count "keeps its rate" when every sensor is connected and the
//! broker received at least 98% of N readings per second. Prints one line per N and the largest
//! N that kept its rate. Measures, does not pass or fail.
//!
//! Run: `cargo build --release --bins && cargo bench -p colony-tests --bench sensors`
//! (`SENSOR_BENCH_COUNTS=1000,10000` chooses the counts; `SENSOR_BENCH_SECS` the window, 10 s).
//! Each process needs a file descriptor per sensor: `ulimit -n` must exceed the largest N.

use std::time::{Duration, Instant};

use colony_tests::*;

/// Resident set size in MiB, from /proc/PID/status.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn detail(work: &Workdir, address: &str) -> serde_json::Value {
    work.status("hub")
        .and_then(|s| actor(&s, address).map(|a| a["detail"].clone()))
        .unwrap_or_default()
}

struct Figures {
    connected: u64,
    sent_per_sec: f64,
    received_per_sec: f64,
    field_cpu: f64,
    field_rss: f64,
    hub_cpu: f64,
    hub_rss: f64,
    ramp_secs: f64,
}

fn run(count: u32, window: Duration) -> Figures {
    let (q1, q2, mqtt) = (free_udp_port(), free_udp_port(), free_tcp_port());
    let config = format!(
        r#"
[cluster]
name = "sensorbench"

[[node]]
name = "hub"
listen = "127.0.0.1:{q1}"

[[node]]
name = "field"
listen = "127.0.0.1:{q2}"

[[actor]]
name = "broker"
node = "hub"
kind = "broker"
listen = "127.0.0.1:{mqtt}"
allow_anonymous = true
limits = {{ max_connections = 100000 }}

[[actor]]
name = "sensors"
node = "field"
kind = "sensor_group"
broker = "hub/broker"
count = {count}
interval_ms = 1000
jitter_ms = 100
qos = 0
ramp_per_sec = 2000
topic = "bench/{{group}}/{{id}}"
"#
    );
    let work = Workdir::new(&config);
    let hub = work.start_node("hub");
    let field = work.start_node("field");
    let started = Instant::now();
    let all = wait_for(Duration::from_secs(120), || {
        std::thread::sleep(Duration::from_millis(300));
        detail(&work, "field/sensors")["connected"].as_u64() == Some(u64::from(count))
    });
    let ramp_secs = started.elapsed().as_secs_f64();
    if !all {
        eprintln!(
            "  {count}: only {} connected after {ramp_secs:.0} s",
            detail(&work, "field/sensors")["connected"]
        );
    }
    // Warm up: every sensor past its first reading, the allocator settled.
    std::thread::sleep(Duration::from_secs(5));
    let sent0 = detail(&work, "field/sensors")["readings_sent"]
        .as_u64()
        .unwrap_or(0);
    let in0 = detail(&work, "hub/broker")["messages_in"]
        .as_u64()
        .unwrap_or(0);
    let (f0, h0) = (cpu_secs(field.pid()), cpu_secs(hub.pid()));
    let t0 = Instant::now();
    std::thread::sleep(window);
    let sent1 = detail(&work, "field/sensors")["readings_sent"]
        .as_u64()
        .unwrap_or(0);
    let in1 = detail(&work, "hub/broker")["messages_in"]
        .as_u64()
        .unwrap_or(0);
    let (f1, h1) = (cpu_secs(field.pid()), cpu_secs(hub.pid()));
    let secs = t0.elapsed().as_secs_f64();
    let figures = Figures {
        connected: detail(&work, "field/sensors")["connected"]
            .as_u64()
            .unwrap_or(0),
        sent_per_sec: sent1.saturating_sub(sent0) as f64 / secs,
        received_per_sec: in1.saturating_sub(in0) as f64 / secs,
        field_cpu: (f1 - f0) / secs,
        field_rss: rss_mib(field.pid()),
        hub_cpu: (h1 - h0) / secs,
        hub_rss: rss_mib(hub.pid()),
        ramp_secs,
    };
    drop((field, hub));
    figures
}

fn main() {
    let counts: Vec<u32> = env_list("SENSOR_BENCH_COUNTS", "1000,5000,10000,15000");
    let window = Duration::from_secs(env_setting("SENSOR_BENCH_SECS", 10));
    println!(
        "sensors per node: N sensors at 1 reading/s (QoS 0, TCP) on node `field`, broker on node `hub`"
    );
    println!(
        "{:>7} {:>9} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9} {:>7} {:>5}",
        "sensors",
        "connected",
        "sent/s",
        "received/s",
        "field CPU",
        "field RSS",
        "hub CPU",
        "hub RSS",
        "ramp s",
        "kept"
    );
    let mut largest = None;
    for count in counts {
        let f = run(count, window);
        let kept = f.connected == u64::from(count) && f.received_per_sec >= 0.98 * f64::from(count);
        if kept {
            largest = Some((count, f.field_cpu, f.field_rss));
        }
        println!(
            "{count:>7} {:>9} {:>10.0} {:>12.0} {:>8.1} % {:>6.0} MiB {:>7.1} % {:>5.0} MiB {:>7.1} {:>5}",
            f.connected,
            f.sent_per_sec,
            f.received_per_sec,
            f.field_cpu * 100.0,
            f.field_rss,
            f.hub_cpu * 100.0,
            f.hub_rss,
            f.ramp_secs,
            if kept { "yes" } else { "no" }
        );
    }
    match largest {
        Some((n, cpu, rss)) => println!(
            "largest group that kept its rate: {n} sensors, {:.1} % of one core, {rss:.0} MiB RSS",
            cpu * 100.0
        ),
        None => println!("no group kept its rate"),
    }
}
