//! What the MQTT load generators (`mqtt_bench`, `bridge_bench`) share: payloads stamped with
//! their send time, client ids, the publisher's event loop, waiting for deliveries and latency
//! percentiles.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::EventLoop;

/// Payload size of every message.
pub const PAYLOAD: usize = 100;

/// A number for unique client ids within a run.
pub fn tag() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64 % 1_000_000_000)
}

/// A payload whose first 8 bytes are the µs since `epoch`, for the subscriber to measure the
/// latency.
pub fn stamped_payload(epoch: Instant) -> Vec<u8> {
    let mut payload = vec![b'x'; PAYLOAD];
    payload[..8].copy_from_slice(&(epoch.elapsed().as_micros() as u64).to_be_bytes());
    payload
}

/// The latency in µs a stamped payload tells, received now.
pub fn latency_of(payload: &[u8], epoch: Instant) -> Option<u64> {
    let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    Some((epoch.elapsed().as_micros() as u64).saturating_sub(sent))
}

/// Drives a client's event loop until aborted, retrying after errors.
pub fn spawn_poll(mut ev: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if ev.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

/// Waits until `count` reaches `expected`, or nothing new arrived for `idle` (the rest were
/// dropped), or `limit` passed since `start`; returns when the last delivery was seen.
pub async fn wait_delivered(
    count: &AtomicU64,
    expected: u64,
    idle: Duration,
    limit: Duration,
    start: Instant,
) -> Instant {
    let (mut last, mut last_change) = (0, Instant::now());
    let mut done_at = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
            done_at = last_change;
        }
        if now >= expected || last_change.elapsed() > idle || start.elapsed() > limit {
            return done_at;
        }
    }
}

/// p50 and p99 of the latency samples (0, 0 when there are none).
pub fn p50_p99(samples: &Mutex<Vec<u64>>) -> (u64, u64) {
    let mut v = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_unstable();
    if v.is_empty() {
        return (0, 0);
    }
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (pct(0.50), pct(0.99))
}

/// A setting from the environment: `default` when `name` is unset; a value that does not parse
/// stops the run with a message naming it (a typo must not measure the default). Only
/// `bridge_bench` has such settings; `mqtt_bench` takes its own as arguments.
#[allow(dead_code)]
pub fn env_setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            panic!("{name}={v:?} is not a valid {}", std::any::type_name::<T>())
        }),
    }
}
