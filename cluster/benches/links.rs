//! Link throughput and call latency between two nodes in one process, over loopback QUIC.
//!
//! Each node has its own tokio runtime with one worker thread, so on a two-core machine each node
//! has a core. Bodies are 100-byte `serde_bytes::ByteBuf`s, CBOR-encoded per message by the
//! sender as an actor would (102 bytes inside the envelope); MB/s counts the 100 payload bytes.
//!
//! Run with `cargo bench -p colony-cluster --bench links`. It prints figures; it does not pass or
//! fail. `BENCH_SECS` sets the measuring time of each throughput row (default 3 s),
//! `BENCH_CALLS` the number of calls in each latency row (default 20 000), and `BENCH_ONLY` runs
//! only the rows whose label contains it (for profiling one of them).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony_certs::{IssueOptions, NodeIdentity, init_ca, issue_node_cert};
use colony_cluster::{Address, Cluster, ClusterSettings, PeerSpec, encode_body};
use serde_bytes::ByteBuf;
use tokio::runtime::Runtime;

const BODY_LEN: usize = 100;
/// Messages per `send_batch` call.
const BATCH: usize = 64;
const WARM_UP: Duration = Duration::from_secs(1);

struct Node {
    cluster: Cluster,
    runtime: Runtime,
}

fn free_addr() -> SocketAddr {
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free loopback port")
        .port();
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn start_node(name: &str, me: SocketAddr, peer: (&str, SocketAddr), pki: &std::path::Path) -> Node {
    let files = issue_node_cert(pki, name, &IssueOptions::default()).expect("node certificate");
    let identity =
        NodeIdentity::load(&pki.join("ca.pem"), &files.cert, &files.key).expect("node identity");
    let settings = ClusterSettings {
        node: name.to_owned(),
        listen: Some(me),
        peers: vec![PeerSpec {
            name: peer.0.to_owned(),
            listen: Some(peer.1),
        }],
        heartbeat: Duration::from_millis(500),
        failure_timeout: Duration::from_secs(10),
        max_frame: 1 << 20,
        call_timeout: Duration::from_secs(10),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("node-{name}"))
        .enable_all()
        .build()
        .expect("a runtime");
    let cluster = runtime
        .block_on(Cluster::start(settings, identity))
        .expect("node starts");
    Node { cluster, runtime }
}

fn body() -> Bytes {
    let payload = ByteBuf::from(vec![0xA5u8; BODY_LEN]);
    Bytes::from(encode_body(&payload).expect("encodable"))
}

fn addr(s: &str) -> Address {
    s.parse().expect("a valid address")
}

/// How one-way messages are sent.
#[derive(Clone, Copy)]
enum Mode {
    /// `Cluster::send` with a `ByteBuf` (encodes the body).
    Send,
    /// `Cluster::send_batch` of [`BATCH`] bodies, each encoded from a `ByteBuf`.
    Batch,
}

/// Runs `senders` tasks on `a` sending to a counting actor on `b`; returns (msg/s, MB/s).
fn throughput(a: &Node, b: &Node, senders: usize, mode: Mode, secs: f64) -> (f64, f64) {
    let received = Arc::new(AtomicU64::new(0));
    let mut mailbox = b.cluster.registry().register("sink", 4096);
    let counter = received.clone();
    let sink = b.runtime.spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while mailbox.recv_many(&mut batch, 256).await > 0 {
            counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.clear();
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let to = addr("b/sink");
    let tasks: Vec<_> = (0..senders)
        .map(|i| {
            let cluster = a.cluster.clone();
            let stop = stop.clone();
            let to = to.clone();
            let from = addr(&format!("a/sender-{i}"));
            a.runtime.spawn(async move {
                let payload = ByteBuf::from(vec![0xA5u8; BODY_LEN]);
                while !stop.load(Ordering::Relaxed) {
                    match mode {
                        Mode::Send => cluster
                            .send(&to, Some(&from), &payload)
                            .await
                            .expect("send"),
                        Mode::Batch => {
                            let bodies = (0..BATCH)
                                .map(|_| Bytes::from(encode_body(&payload).expect("encodable")));
                            cluster
                                .send_batch(&to, Some(&from), bodies)
                                .await
                                .expect("send_batch")
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(WARM_UP);
    let (n0, t0) = (received.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (n1, t1) = (received.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        a.runtime.block_on(t).expect("sender finished");
    }
    // Let the queues drain before the next row.
    let mut last = u64::MAX;
    while received.load(Ordering::Relaxed) != last {
        last = received.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
    }
    b.cluster.registry().unregister("sink");
    sink.abort();
    let rate = (n1 - n0) as f64 / (t1 - t0).as_secs_f64();
    (rate, rate * BODY_LEN as f64 / 1e6)
}

/// Registers an actor on `b` that answers every call with its body.
fn echo(b: &Node) {
    let mut mailbox = b.cluster.registry().register("echo", 1024);
    b.runtime.spawn(async move {
        while let Some(mut d) = mailbox.recv().await {
            if let Some(reply) = d.reply.take() {
                reply.send_raw(Ok(d.body));
            }
        }
    });
}

/// `calls` sequential calls; the latency of each in µs.
fn latency_sequential(a: &Node, calls: usize) -> Vec<f64> {
    let cluster = a.cluster.clone();
    a.runtime.block_on(async move {
        let to = addr("b/echo");
        let from = addr("a/caller");
        let body = body();
        for _ in 0..1000 {
            cluster
                .call_raw(&to, Some(&from), body.clone(), None)
                .await
                .expect("warm-up call");
        }
        let mut out = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            let reply = cluster
                .call_raw(&to, Some(&from), body.clone(), None)
                .await
                .expect("call");
            out.push(start.elapsed().as_secs_f64() * 1e6);
            assert_eq!(reply.len(), body.len());
        }
        out
    })
}

/// `calls` calls started at `rate` per second, paced in 1 ms ticks; each is timed from the moment
/// it starts (tokio's timer wheel has millisecond resolution, so a tick may fire late).
fn latency_at_rate(a: &Node, calls: usize, rate: usize) -> Vec<f64> {
    let cluster = a.cluster.clone();
    a.runtime.block_on(async move {
        let to = Arc::new(addr("b/echo"));
        let from = Arc::new(addr("a/caller"));
        let body = body();
        let per_tick = (rate / 1000).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut handles = Vec::with_capacity(calls);
        for i in 0..calls {
            if i % per_tick == 0 {
                tick.tick().await;
            }
            let (cluster, to, from, body) =
                (cluster.clone(), to.clone(), from.clone(), body.clone());
            handles.push(tokio::spawn(async move {
                let start = Instant::now();
                cluster
                    .call_raw(&to, Some(&from), body, None)
                    .await
                    .expect("call");
                start.elapsed().as_secs_f64() * 1e6
            }));
        }
        let mut out = Vec::with_capacity(calls);
        for h in handles {
            out.push(h.await.expect("call task"));
        }
        out
    })
}

fn percentiles(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "{:>8.0} {:>8.0} {:>8.0} {:>8.0}",
        at(0.50),
        at(0.90),
        at(0.99),
        v[v.len() - 1]
    )
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let calls: usize = env_or("BENCH_CALLS", 20_000);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    println!("command: cargo bench -p colony-cluster --bench links");
    println!(
        "load average (1/5/15 min) at start: {}; cpus: {}",
        load(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "two nodes, one tokio worker each, loopback QUIC; \
         body: {BODY_LEN}-byte ByteBuf ({} bytes CBOR)",
        body().len()
    );

    let pki = tempfile::tempdir().expect("a temporary directory");
    init_ca(pki.path(), "bench", false).expect("a CA");
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let a = start_node("a", addr_a, ("b", addr_b), pki.path());
    let b = start_node("b", addr_b, ("a", addr_a), pki.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.cluster.is_up("b") && b.cluster.is_up("a")) {
        assert!(Instant::now() < deadline, "the nodes did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }

    println!(
        "\none-way, a -> b ({secs} s after {} s warm-up)",
        WARM_UP.as_secs()
    );
    println!("{:<34} {:>12} {:>8}", "", "msg/s", "MB/s");
    for (label, senders, mode) in [
        ("send, 1 sender", 1, Mode::Send),
        ("send, 4 senders", 4, Mode::Send),
        ("send_batch of 64, 1 sender", 1, Mode::Batch),
        ("send_batch of 64, 4 senders", 4, Mode::Batch),
    ] {
        if !label.contains(&only) {
            continue;
        }
        let (rate, mb) = throughput(&a, &b, senders, mode, secs);
        println!("{label:<34} {rate:>12.0} {mb:>8.1}");
    }

    echo(&b);
    println!("\ncall_raw a -> b/echo, {calls} calls, latency in µs");
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8}",
        "", "p50", "p90", "p99", "max"
    );
    let label = "one at a time";
    if label.contains(&only) {
        let figures = percentiles(latency_sequential(&a, calls));
        println!("{label:<34} {figures}");
    }
    let label = "10 000 calls/s (10 per 1 ms tick)";
    if label.contains(&only) {
        let figures = percentiles(latency_at_rate(&a, calls, 10_000));
        println!("{label:<34} {figures}");
    }
    println!("\nload average (1/5/15 min) at end: {}", load());
}
