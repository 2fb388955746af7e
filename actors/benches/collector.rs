//! Collector ingest: JSON payloads decoded, sequence-tracked and committed to SQLite in batches,
//! as the collector actor does (no network). Prints readings stored per second; measures, does
//! not pass or fail. `cargo bench -p colony-actors --bench collector`.

use std::time::{Duration, Instant};

use colony_actors::collector::sequence::SequenceTracker;
use colony_actors::collector::store::{Commit, Store, StoredReading, unix_ms};
use colony_actors::reading::{self, Reading};
use colony_config::kinds::ReadingFormat;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = |name: &str| std::env::var(name).ok();
    let sensors = 10_000u64;
    let total: u64 = env("COLLECTOR_BENCH_TOTAL")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let batches: Vec<usize> = env("COLLECTOR_BENCH_BATCHES")
        .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 5_000, 20_000]);
    // The actor checkpoints its sequence tracker once a second; under a profiler, which runs
    // fifty times slower, pass a longer period to keep the proportions.
    let checkpoint_every = Duration::from_millis(
        env("COLLECTOR_BENCH_CHECKPOINT_MS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
    );
    for batch in batches {
        let path = dir.path().join(format!("bench-{batch}.sqlite"));
        let mut store = Store::open(&path).expect("open");
        let mut tracker = SequenceTracker::new();
        let payloads: Vec<Vec<u8>> = (0..sensors)
            .map(|i| {
                reading::encode(
                    &Reading::single(format!("core/sensors/{i}"), 1, unix_ms(), 412.5),
                    ReadingFormat::Json,
                    0,
                )
            })
            .collect();
        let start = Instant::now();
        let cpu_start = cpu_secs();
        let mut pending = Commit::default();
        let mut stored = 0;
        let mut checkpoint_at = Instant::now();
        for n in 0..total {
            let sensor = n % sensors;
            let seq = n / sensors + 1;
            // Decode a real payload, then give it this round's sequence number.
            let mut r = reading::decode(&payloads[sensor as usize], None).expect("decode");
            r.seq = Some(seq);
            let (event, epoch) = tracker.observe_in_epoch(&r.source, seq, r.ts.map(|t| t + seq));
            if !event.is_new() {
                continue;
            }
            pending.readings.push(StoredReading {
                reading: r,
                epoch,
                topic: format!("sensors/{sensor}"),
                received_ms: unix_ms(),
                flags: String::new(),
            });
            if pending.readings.len() >= batch {
                // As the actor does: the tracker is checkpointed with a batch once a second.
                if checkpoint_at.elapsed() >= checkpoint_every {
                    pending.sources = tracker.take_changed();
                    pending.checkpoint = true;
                    checkpoint_at = Instant::now();
                }
                stored += store.commit(&pending).expect("commit");
                pending = Commit::default();
            }
        }
        pending.sources = tracker.take_changed();
        pending.checkpoint = true;
        stored += store.commit(&pending).expect("commit");
        let secs = start.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu_start;
        println!(
            "collector ingest, batch {batch:>6}: {stored} readings from {sensors} sources in {secs:.2} s = {:.0} readings/s; {cpu:.2} s of CPU = {:.0} readings per CPU-second (decode + track + SQLite WAL commit)",
            stored as f64 / secs,
            stored as f64 / cpu.max(1e-9),
        );
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat (clock ticks at
/// the usual 100 Hz).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        / 100.0
}
