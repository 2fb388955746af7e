//! Load across one bridge: a publisher on one broker, a subscriber on the broker the bridge
//! forwards to, for each setup given; prints delivered messages per second at QoS 0 and 1 and
//! the end-to-end latency (p50/p99) at a fixed rate, after a fifth of a second of warm-up that is
//! not measured (the publisher connecting, the path's first message).
//!
//! ```text
//! cargo run --release -p colony-actors --example bridge_bench -- \
//!     colony-colony=127.0.0.1:1883,127.0.0.1:1884,cc mosquitto-mosquitto=127.0.0.1:1885,127.0.0.1:1886,mm
//! ```
//! Each setup is `label=PUBLISH_ADDR,SUBSCRIBE_ADDR,TOPIC_ROOT` (the bridge forwards
//! `TOPIC_ROOT/#`). `actors/benches/bridge_vs_mosquitto.sh` builds the setups (Colony to Colony
//! over QUIC, Colony to Mosquitto, Mosquitto to Mosquitto) and runs this. It measures; it does not
//! pass or fail. `BRIDGE_BENCH_MESSAGES` sets the messages per throughput run (20,000),
//! `BRIDGE_BENCH_LATENCY_SECS` the latency run's length (5 s), `BRIDGE_BENCH_LATENCY_ONLY`
//! skips the throughput runs, and `BRIDGE_BENCH_QOS=1` (or `0`) runs only that throughput run
//! (with `BRIDGE_BENCH_LATENCY_SECS=0`, no latency run).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod common;
use common::{PAYLOAD, p50_p99, spawn_poll, stamped_payload, tag, wait_delivered};

fn options(id: String, addr: &str) -> MqttOptions {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut o = MqttOptions::new(id, host, port.parse().expect("port"));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// A subscriber on `addr` to `filter`: the delivered counter and latency samples (µs since
/// `epoch`, read from the payload's first 8 bytes).
async fn subscriber(
    addr: &str,
    filter: &str,
    qos: QoS,
    epoch: Instant,
) -> (
    Arc<AtomicU64>,
    Arc<std::sync::Mutex<Vec<u64>>>,
    tokio::task::JoinHandle<()>,
) {
    let count = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (client, mut ev) = AsyncClient::new(options(format!("bb-sub-{}", tag()), addr), 1000);
    client.subscribe(filter, qos).await.expect("subscribe");
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(1);
    let (c, s) = (count.clone(), samples.clone());
    let handle = tokio::spawn(async move {
        let _keep = client;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(()).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    c.fetch_add(1, Ordering::Relaxed);
                    if let Some(l) = common::latency_of(&p.payload, epoch) {
                        s.lock().unwrap().push(l);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    if tokio::time::timeout(STALL, ready.recv()).await.is_err() {
        panic!("no SUBACK from {addr} within {STALL:?}: is its broker up?");
    }
    (count, samples, handle)
}

/// How long a client may make no progress before the bench gives up on its setup.
const STALL: Duration = Duration::from_secs(10);

/// Publishes one message; false when the client's event loop is gone. Fails the bench when the
/// publisher's queue has not moved for [`STALL`] (its broker is gone or never answered).
async fn publish(
    client: &AsyncClient,
    from: &str,
    topic: &str,
    qos: QoS,
    payload: Vec<u8>,
) -> bool {
    match tokio::time::timeout(STALL, client.publish(topic, qos, false, payload)).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => panic!("publishing to {from} made no progress for {STALL:?}: is its broker up?"),
    }
}

/// A publisher on `addr`, its event loop polled in the background.
fn publisher(addr: &str) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let (client, ev) = AsyncClient::new(options(format!("bb-pub-{}", tag()), addr), 1000);
    (client, spawn_poll(ev))
}

/// Throughput: `total` messages as fast as one publisher can send them; delivered msgs/s and
/// how many did not arrive.
async fn throughput(from: &str, to: &str, root: &str, qos: QoS, total: u64) -> (f64, u64) {
    let epoch = Instant::now();
    let (count, _, sub) = subscriber(to, &format!("{root}/#"), qos, epoch).await;
    let (client, poll) = publisher(from);
    // Warm up the path (and the bridge's subscription) with a few messages.
    let topic = format!("{root}/t");
    for _ in 0..10 {
        publish(&client, from, &topic, qos, vec![b'w'; PAYLOAD]).await;
    }
    let warm = Instant::now();
    while count.load(Ordering::Relaxed) < 10 && warm.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    count.store(0, Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..total {
        if !publish(&client, from, &topic, qos, stamped_payload(epoch)).await {
            break;
        }
    }
    let done_at = wait_delivered(
        &count,
        total,
        Duration::from_secs(3),
        Duration::from_secs(120),
        start,
    )
    .await;
    let last = count.load(Ordering::Relaxed);
    poll.abort();
    sub.abort();
    let secs = done_at.duration_since(start).as_secs_f64().max(1e-6);
    (last as f64 / secs, total.saturating_sub(last))
}

/// Latency at `rate` msg/s for `secs`: p50 and p99 in µs.
async fn latency(from: &str, to: &str, root: &str, qos: QoS, rate: u64, secs: u64) -> (u64, u64) {
    let epoch = Instant::now();
    let (_, samples, sub) = subscriber(to, &format!("{root}/#"), qos, epoch).await;
    let (client, poll) = publisher(from);
    let topic = format!("{root}/lat");
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    // Warm-up, not measured (too short to carry a stamp): publishes queued while the
    // publisher still connects, and a path's first message, would otherwise count.
    for _ in 0..rate / 5 {
        tick.tick().await;
        publish(&client, from, &topic, qos, b"warm".to_vec()).await;
    }
    for _ in 0..rate * secs {
        tick.tick().await;
        publish(&client, from, &topic, qos, stamped_payload(epoch)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    poll.abort();
    sub.abort();
    p50_p99(&samples)
}

#[tokio::main]
async fn main() {
    let setups: Vec<(String, String, String, String)> = std::env::args()
        .skip(1)
        .map(|a| {
            let (label, rest) = a.split_once('=').expect("label=PUB,SUB,ROOT");
            let parts: Vec<&str> = rest.split(',').collect();
            assert_eq!(parts.len(), 3, "label=PUB,SUB,ROOT");
            (
                label.to_owned(),
                parts[0].to_owned(),
                parts[1].to_owned(),
                parts[2].to_owned(),
            )
        })
        .collect();
    assert!(
        !setups.is_empty(),
        "usage: bridge_bench label=PUB,SUB,ROOT ..."
    );
    let total: u64 = common::env_setting("BRIDGE_BENCH_MESSAGES", 20_000);
    let latency_secs: u64 = common::env_setting("BRIDGE_BENCH_LATENCY_SECS", 5);
    let throughput_runs = std::env::var_os("BRIDGE_BENCH_LATENCY_ONLY").is_none();
    let only_qos: Option<u8> = std::env::var("BRIDGE_BENCH_QOS")
        .ok()
        .map(|q| match q.trim() {
            "0" => 0,
            "1" => 1,
            _ => panic!("BRIDGE_BENCH_QOS={q:?} is not 0 or 1"),
        });
    println!("across one bridge, 1 publisher -> 1 subscriber, 100-byte payloads, {total} messages");
    for (label, from, to, root) in &setups {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce]
            .into_iter()
            .filter(|q| throughput_runs && only_qos.is_none_or(|o| o == *q as u8))
        {
            let (rate, lost) = throughput(from, to, root, qos, total).await;
            println!(
                "{label:<22} QoS {}  {rate:>9.0} msg/s delivered (undelivered {lost})",
                qos as u8
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if latency_secs == 0 {
            continue;
        }
        let (p50, p99) = latency(from, to, root, QoS::AtLeastOnce, 1000, latency_secs).await;
        println!("{label:<22} QoS 1 at 1000 msg/s: latency p50 {p50} us, p99 {p99} us");
    }
}
