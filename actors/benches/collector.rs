//! Collector ingest: JSON payloads decoded, sequence-tracked and committed to SQLite in batches,
//! as the collector actor does (no network). Prints readings stored per second; measures, does
//! not pass or fail. `cargo bench -p colony-actors --bench collector`.

use std::time::Instant;

use colony_actors::collector::sequence::SequenceTracker;
use colony_actors::collector::store::{Commit, Store, StoredReading, unix_ms};
use colony_actors::reading::{self, Reading};
use colony_config::kinds::ReadingFormat;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sensors = 10_000u64;
    let total = 1_000_000u64;
    for batch in [1_000usize, 5_000, 20_000] {
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
        let mut pending = Commit::default();
        let mut stored = 0;
        for n in 0..total {
            let sensor = n % sensors;
            let seq = n / sensors + 1;
            // Decode a real payload, then give it this round's sequence number.
            let mut r = reading::decode(&payloads[sensor as usize], None).expect("decode");
            r.seq = Some(seq);
            let event = tracker.observe(&r.source, seq, r.ts.map(|t| t + seq));
            if !event.is_new() {
                continue;
            }
            pending.readings.push(StoredReading {
                reading: r,
                epoch: 0,
                topic: format!("sensors/{sensor}"),
                received_ms: unix_ms(),
                flags: String::new(),
            });
            if pending.readings.len() >= batch {
                pending.sources = tracker.take_changed();
                stored += store.commit(&pending).expect("commit");
                pending = Commit::default();
            }
        }
        pending.sources = tracker.take_changed();
        stored += store.commit(&pending).expect("commit");
        let secs = start.elapsed().as_secs_f64();
        println!(
            "collector ingest, batch {batch:>6}: {stored} readings from {sensors} sources in {secs:.2} s = {:.0} readings/s (decode + track + SQLite WAL commit)",
            stored as f64 / secs
        );
    }
}
