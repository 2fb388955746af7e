//! Collector ingest: readings stored per second from the broker.
//!
//! Two nodes on loopback: `hub` runs a broker and a collector (QoS 1, JSON readings, batches of
//! `INGEST_BENCH_BATCH`, default 5,000) subscribed to it by actor (`via = "actor"`) or as an
//! MQTT client (`via = "mqtt"`); `field` runs a sensor group of 10,000 sensors publishing at
//! QoS 1 over TCP. For each way the bench measures twice:
//! - **drain**: the collector is stopped while the sensors publish `INGEST_BENCH_TOTAL`
//!   readings (default 1 M) into the broker, which queues them; then the collector is started
//!   and the bench polls its status until every reading the broker took is stored. Figure: the
//!   readings stored divided by the time from the start to the end of the commit that stored
//!   the last one (the collector's `last_commit_ms`), plus the CPU seconds `hub` spent (broker
//!   and collector) per reading.
//! - **live**: the collector runs while the sensors publish; the figure is the readings stored
//!   from the first to the last divided by that time (publishers, broker and collector share
//!   the machine's cores).
//!
//! Every run prints what the broker took (`taken`: publishes, including a sensor's resend after
//! a reconnect), the distinct readings (`distinct`: the sum of each sensor's highest sequence
//! number), what the collector stored, the duplicates it dropped and the gaps: exactly once is
//! stored = distinct with 0 gaps. Measures, does not pass or fail.
//!
//! Run: `cargo build --release --bins && cargo bench -p colony-tests --bench ingest`
//! (`INGEST_BENCH_VIA=actor,mqtt`, `INGEST_BENCH_MODES=drain,live`, `INGEST_BENCH_TOTAL`,
//! `INGEST_BENCH_BATCH`). Each node needs a file descriptor per sensor: `ulimit -n` > 10,000.

use std::time::{Duration, Instant};

use colony_tests::*;

const SENSORS: u32 = 10_000;

/// Readings stored, and when the collector's last commit finished (Unix ms).
fn stored(work: &Workdir) -> (u64, u64) {
    let s = work.try_call("hub", "hub/collector", r#"{"status": {}}"#);
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    (n("stored"), n("last_commit_ms"))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// QoS 1 publishes the broker has taken.
fn broker_in(work: &Workdir) -> u64 {
    work.try_call("hub", "hub/broker", r#"{"status": {}}"#)["detail"]["messages_in"]
        .as_u64()
        .unwrap_or(0)
}

struct Figures {
    taken: u64,
    distinct: u64,
    stored: u64,
    duplicates: u64,
    gaps: u64,
    secs: f64,
    hub_cpu: f64,
    publish_per_sec: f64,
}

fn config(via: &str, batch: usize) -> String {
    let (q1, q2, mqtt) = (free_udp_port(), free_udp_port(), free_tcp_port());
    format!(
        r#"
[cluster]
name = "ingestbench"

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
limits = {{ max_connections = 100000, max_queued = 3000000 }}

[[actor]]
name = "collector"
node = "hub"
kind = "collector"
database = "readings.sqlite"
qos = 1
format = "json"
batch_size = {batch}
source = {{ broker = "hub/broker", topics = ["bench/#"], via = "{via}" }}

[[actor]]
name = "sensors"
node = "field"
kind = "sensor_group"
broker = "hub/broker"
count = {SENSORS}
interval_ms = 50
jitter_ms = 25
qos = 1
ramp_per_sec = 5000
topic = "bench/{{group}}/{{id}}"
"#
    )
}

fn run(via: &str, drain: bool, total: u64, batch: usize) -> Figures {
    let work = Workdir::new(&config(via, batch));
    let hub = work.start_node("hub");
    // The collector's subscription (or MQTT session) exists before anything is published.
    let ready = wait_for(Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(300));
        let s = work.try_call("hub", "hub/collector", r#"{"status": {}}"#);
        via == "actor" || s["broker_connected"] == serde_json::json!(true)
    });
    assert!(ready, "the collector did not connect to the broker");
    std::thread::sleep(Duration::from_secs(2));
    if drain {
        work.ctl_ok("hub", &["stop", "hub/collector"]);
    }
    let field = work.start_node("field");
    let publish_start = Instant::now();
    let mut cpu0 = cpu_secs(hub.pid());
    // Unix ms: when storing began (the collector's start, or the first reading seen stored)
    // and when the commit holding the last reading finished, as the collector tells it.
    let mut first_stored: Option<u64> = None;
    let deadline = Duration::from_secs(1800);
    // Publish until the broker has taken `total`.
    wait_for(deadline, || {
        std::thread::sleep(Duration::from_millis(200));
        if first_stored.is_none() && !drain && stored(&work).0 > 0 {
            first_stored = Some(unix_ms());
        }
        broker_in(&work) >= total
    });
    work.ctl_ok("field", &["stop", "field/sensors"]);
    let publish_secs = publish_start.elapsed().as_secs_f64();
    // What the broker took, once the last acknowledged publishes are counted.
    let mut taken = broker_in(&work);
    wait_for(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = broker_in(&work);
        std::mem::replace(&mut taken, now) == now
    });
    drop(field);
    if drain {
        cpu0 = cpu_secs(hub.pid());
        first_stored = Some(unix_ms());
        work.ctl_ok("hub", &["start", "hub/collector"]);
    }
    let (mut last, mut last_commit_ms) = (0, 0);
    let mut last_at = Instant::now();
    // Polled sparingly: each poll is a `colony ctl` process on the same two cores.
    wait_for(deadline, || {
        std::thread::sleep(Duration::from_millis(500));
        let (s, at) = stored(&work);
        if s != last {
            (last, last_commit_ms) = (s, at);
            last_at = Instant::now();
        }
        if first_stored.is_none() && s > 0 {
            first_stored = Some(unix_ms());
        }
        s >= taken || last_at.elapsed() > Duration::from_secs(20)
    });
    let hub_cpu = cpu_secs(hub.pid()) - cpu0;
    let secs = first_stored.map_or(0.0, |t| last_commit_ms.saturating_sub(t) as f64 / 1000.0);
    let counts = work.call("hub", "hub/collector", r#"{"query": {"counts": {}}}"#);
    let figures = Figures {
        taken,
        distinct: counts["per_source"]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(|s| s["highest"].as_u64()).sum()),
        stored: counts["readings"].as_u64().unwrap_or(0),
        duplicates: counts["duplicates"].as_u64().unwrap_or(0),
        gaps: counts["gaps"].as_u64().unwrap_or(0),
        secs,
        hub_cpu,
        publish_per_sec: taken as f64 / publish_secs,
    };
    drop(hub);
    figures
}

fn main() {
    let vias: Vec<String> = env_list("INGEST_BENCH_VIA", "actor,mqtt");
    let modes: Vec<String> = env_list("INGEST_BENCH_MODES", "drain,live");
    let total: u64 = env_setting("INGEST_BENCH_TOTAL", 1_000_000);
    let batch: usize = env_setting("INGEST_BENCH_BATCH", 5_000);
    println!(
        "collector ingest from the broker: {total} QoS 1 JSON readings from {SENSORS} sensors, \
         batches of {batch}"
    );
    println!(
        "{:>6} {:>6} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8} {:>11} {:>13} {:>12}",
        "via",
        "mode",
        "taken",
        "distinct",
        "stored",
        "dups",
        "gaps",
        "secs",
        "stored/s",
        "hub CPU-s",
        "published/s"
    );
    for via in &vias {
        for mode in &modes {
            let f = run(via, mode == "drain", total, batch);
            let rate = f.stored as f64 / f.secs.max(1e-9);
            println!(
                "{via:>6} {mode:>6} {:>9} {:>9} {:>9} {:>6} {:>5} {:>8.1} {:>11.0} {:>7.1} ({:>3.0} k/s) {:>12.0}",
                f.taken,
                f.distinct,
                f.stored,
                f.duplicates,
                f.gaps,
                f.secs,
                rate,
                f.hub_cpu,
                f.stored as f64 / f.hub_cpu.max(1e-9) / 1000.0,
                f.publish_per_sec
            );
        }
    }
}
