//! An MQTT load generator for comparing brokers: the same clients (rumqttc, over TCP and TLS)
//! against each broker given, scenario by scenario, printing delivered messages per second,
//! p50/p99 latency and the ratio of the first broker to the second.
//!
//! ```text
//! cargo run --release -p colony-actors --example mqtt_bench -- \
//!     --ca ca.pem mqtt://127.0.0.1:1883 mqtt://127.0.0.1:1884 \
//!     mqtts://127.0.0.1:8883 mqtts://127.0.0.1:8884
//! ```
//! The first two URLs are the plain TCP listeners (Colony, the reference), the optional last two
//! the TLS ones, whose certificates must chain to `--ca`.
//! `actors/benches/broker_vs_mosquitto.sh` starts a Colony broker and Debian's mosquitto and runs
//! this against both. It measures; it does not pass or fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use colony_actors::mqtt_client::MqttTarget;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod common;
use common::{PAYLOAD, p50_p99, spawn_poll, stamped_payload, wait_delivered};

fn options(id: String, addr: &MqttTarget) -> MqttOptions {
    let mut o = addr.options(&id, Duration::from_secs(30));
    o.set_inflight(100);
    o
}

/// Starts `n` subscribers to `filter`; returns the delivered counter and latency samples.
async fn subscribers(
    addr: &MqttTarget,
    tag: &str,
    n: usize,
    filter: &str,
    qos: QoS,
    latencies: Option<Arc<std::sync::Mutex<Vec<u64>>>>,
    epoch: Instant,
) -> (Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let count = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(n.max(1));
    for i in 0..n {
        let (client, mut ev) = AsyncClient::new(options(format!("{tag}-sub-{i}"), addr), 1000);
        client.subscribe(filter, qos).await.expect("subscribe");
        let count = count.clone();
        let ready = ready_tx.clone();
        let lat = latencies.clone();
        handles.push(tokio::spawn(async move {
            let _keep = client;
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready.send(()).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        if let Some(l) = &lat
                            && let Some(latency) = common::latency_of(&p.payload, epoch)
                        {
                            l.lock().unwrap().push(latency);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    for _ in 0..n {
        let _ = tokio::time::timeout(Duration::from_secs(10), ready_rx.recv()).await;
    }
    (count, handles)
}

/// Throughput: `pubs` publishers send `total` messages between them as fast as they can.
async fn throughput(
    addr: &MqttTarget,
    pubs: usize,
    subs: usize,
    qos: QoS,
    total: usize,
) -> (f64, u64) {
    let tag = format!("t{}", common::tag());
    let epoch = Instant::now();
    let (count, sub_handles) = subscribers(addr, &tag, subs, "bench/#", qos, None, epoch).await;
    let per = total / pubs;
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..pubs {
        let (client, ev) = AsyncClient::new(options(format!("{tag}-pub-{i}"), addr), 1000);
        let topic = format!("bench/{i}");
        handles.push(tokio::spawn(async move {
            let poll = spawn_poll(ev);
            for _ in 0..per {
                if client
                    .publish(topic.as_str(), qos, false, vec![b'x'; PAYLOAD])
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // Let the last acknowledgements arrive, then stop.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = client.disconnect().await;
            poll.abort();
        }));
    }
    let expected = (per * pubs * subs) as u64;
    // Until everything arrived, or nothing new for 2 s (messages were dropped), or 60 s.
    let done_at = wait_delivered(
        &count,
        expected,
        Duration::from_secs(2),
        Duration::from_secs(60),
        start,
    )
    .await;
    let last = count.load(Ordering::Relaxed);
    let secs = done_at.duration_since(start).as_secs_f64().max(1e-6);
    for h in handles {
        h.abort();
    }
    for h in sub_handles {
        h.abort();
    }
    (last as f64 / secs, expected.saturating_sub(last))
}

/// Latency at a fixed rate: one publisher, one subscriber, `rate` msg/s for `secs`.
async fn latency(addr: &MqttTarget, qos: QoS, rate: u64, secs: u64) -> (u64, u64) {
    let tag = format!("l{}", common::tag());
    let epoch = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (_count, sub_handles) =
        subscribers(addr, &tag, 1, "lat/#", qos, Some(samples.clone()), epoch).await;
    let (client, ev) = AsyncClient::new(options(format!("{tag}-pub"), addr), 1000);
    let poll = spawn_poll(ev);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for _ in 0..rate * secs {
        tick.tick().await;
        let payload = stamped_payload(epoch);
        let _ = client.publish("lat/x", qos, false, payload).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    poll.abort();
    for h in sub_handles {
        h.abort();
    }
    p50_p99(&samples)
}

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut ca = None;
    if let Some(i) = args.iter().position(|a| a == "--ca") {
        args.remove(i);
        ca = Some(std::path::PathBuf::from(args.remove(i)));
    }
    assert!(
        args.len() == 2 || args.len() == 4,
        "usage: mqtt_bench [--ca CA.pem] COLONY_URL REFERENCE_URL [COLONY_TLS_URL REFERENCE_TLS_URL]"
    );
    let targets: Vec<MqttTarget> = args
        .iter()
        .map(|u| MqttTarget::url(u, ca.as_deref()).expect("broker URL"))
        .collect();
    let scenarios: [(&str, usize, usize, QoS, usize); 8] = [
        ("1 pub -> 1 sub, QoS 0", 1, 1, QoS::AtMostOnce, 100_000),
        ("1 pub -> 1 sub, QoS 1", 1, 1, QoS::AtLeastOnce, 50_000),
        ("100 pubs -> 1 sub, QoS 0", 100, 1, QoS::AtMostOnce, 100_000),
        ("100 pubs -> 1 sub, QoS 1", 100, 1, QoS::AtLeastOnce, 50_000),
        (
            "1000 pubs -> 1 sub, QoS 0",
            1000,
            1,
            QoS::AtMostOnce,
            100_000,
        ),
        (
            "1000 pubs -> 1 sub, QoS 1",
            1000,
            1,
            QoS::AtLeastOnce,
            50_000,
        ),
        ("1 pub -> 100 subs, QoS 0", 1, 100, QoS::AtMostOnce, 2_000),
        ("1 pub -> 100 subs, QoS 1", 1, 100, QoS::AtLeastOnce, 1_000),
    ];
    println!("delivered msgs/s, 100-byte payloads; Colony vs reference: {args:?}");
    for (transport, brokers) in ["TCP", "TLS"].into_iter().zip(targets.chunks(2)) {
        println!("-- {transport}");
        for (name, pubs, subs, qos, total) in scenarios {
            let mut rates = Vec::new();
            let mut line = format!("{transport} {name:<28}");
            for b in brokers {
                let (rate, lost) = throughput(b, pubs, subs, qos, total).await;
                line.push_str(&format!(" {rate:>10.0}/s (undelivered {lost:>6})"));
                rates.push(rate);
            }
            if rates.len() == 2 && rates[1] > 0.0 {
                line.push_str(&format!("  ratio {:.2}", rates[0] / rates[1]));
            }
            println!("{line}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            let mut line = format!("{transport} latency 1000 msg/s, QoS {}", qos as u8);
            line = format!("{line:<32}");
            let mut p99s = Vec::new();
            for b in brokers {
                let (p50, p99) = latency(b, qos, 1000, 5).await;
                line.push_str(&format!("   p50 {p50:>5} us p99 {p99:>6} us"));
                p99s.push(p99 as f64);
            }
            if p99s.len() == 2 && p99s[0] > 0.0 {
                line.push_str(&format!("  p99 Colony/reference {:.2}", p99s[0] / p99s[1]));
            }
            println!("{line}");
        }
    }
}
