//! When each sensor of a group reads: the pure scheduler behind simulated, host and probe
//! sensors, and the ramp that paces new connections. No I/O, no clock: callers pass `now`.
//!
//! Every active sensor has a base time that advances by its interval; it fires at that base
//! plus a random offset within ± the group's jitter, so readings keep their average rate while
//! not all landing at once. A sensor that falls behind (the process was busy) skips ahead rather
//! than firing a burst. Sensors start spread evenly over one interval. "Read now" fires once at
//! the next poll, marked requested, without moving the regular schedule; pause stops a sensor
//! until resume; an interval change takes effect from now.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A command to one sensor or to all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorAction {
    /// Send a reading now, marked requested.
    ReadNow,
    /// Read every this many milliseconds from now on.
    IntervalMs(u64),
    /// Stop reading until resumed.
    Pause,
    /// Read again at the current interval.
    Resume,
}

/// The shortest interval a command may set.
pub const MIN_INTERVAL_MS: u64 = 10;

/// Parses a command payload from the command topic: JSON (`"read_now"`, `{"interval_ms": 5000}`,
/// `"pause"`, `"resume"`) or the gas detectors' words (`Request` = read now, `SleepN-` = a reading
/// every N seconds).
pub fn parse_command(payload: &[u8]) -> Result<SensorAction, String> {
    if payload.len() > 1024 {
        return Err("command longer than 1024 bytes".into());
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| "command is not UTF-8".to_owned())?
        .trim();
    let action = if text.starts_with('{') || text.starts_with('"') {
        serde_json::from_str(text).map_err(|e| format!("bad command: {e}"))?
    } else if text.eq_ignore_ascii_case("request") || text == "read_now" {
        SensorAction::ReadNow
    } else if text.eq_ignore_ascii_case("pause") {
        SensorAction::Pause
    } else if text.eq_ignore_ascii_case("resume") {
        SensorAction::Resume
    } else if let Some(n) = text.strip_prefix("Sleep") {
        let secs: u64 = n
            .trim_end_matches('-')
            .parse()
            .map_err(|_| format!("bad command '{text}': SleepN- needs a whole number N"))?;
        SensorAction::IntervalMs(secs.saturating_mul(1000))
    } else {
        return Err(format!("unknown command '{text}'"));
    };
    if let SensorAction::IntervalMs(ms) = action
        && !(MIN_INTERVAL_MS..=86_400_000).contains(&ms)
    {
        return Err(format!("interval {ms} ms is out of range"));
    }
    Ok(action)
}

/// A reading that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fire {
    /// Which sensor (0-based).
    pub index: usize,
    /// True for a "read now" reading.
    pub requested: bool,
}

#[derive(Debug, Clone)]
struct Slot {
    base: Instant,
    interval: Duration,
    active: bool,
    paused: bool,
    generation: u64,
}

/// The schedule of every sensor in a group.
#[derive(Debug)]
pub struct Scheduler {
    slots: Vec<Slot>,
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    immediate: VecDeque<usize>,
    jitter: Duration,
    rng: u64,
}

impl Scheduler {
    /// `count` inactive sensors reading every `interval` ± `jitter`; `seed` makes jitter
    /// reproducible.
    pub fn new(count: usize, interval: Duration, jitter: Duration, seed: u64) -> Scheduler {
        let interval = interval.max(Duration::from_millis(1));
        let now = Instant::now();
        Scheduler {
            slots: vec![
                Slot {
                    base: now,
                    interval,
                    active: false,
                    paused: false,
                    generation: 0,
                };
                count
            ],
            heap: BinaryHeap::with_capacity(count),
            immediate: VecDeque::new(),
            jitter: jitter.min(interval),
            rng: seed | 1,
        }
    }

    /// Sensors in the group.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True for an empty group.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Sensors active and not paused.
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.active && !s.paused).count()
    }

    /// Starts `index` reading (it connected); its first reading comes after an offset that
    /// spreads the group evenly over one interval.
    pub fn activate(&mut self, index: usize, now: Instant) {
        let count = self.slots.len() as u32;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.active {
            return;
        }
        slot.active = true;
        let phase = slot.interval * (index as u32 % count.max(1)) / count.max(1);
        slot.base = now + phase;
        self.schedule(index);
    }

    /// Stops `index` reading (it disconnected) until activated again.
    pub fn deactivate(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.active = false;
            slot.generation += 1;
        }
    }

    /// Applies `action` to sensor `index`, or to every sensor when `None`.
    pub fn command(&mut self, target: Option<usize>, action: SensorAction, now: Instant) {
        let targets = match target {
            Some(i) if i < self.slots.len() => i..i + 1,
            Some(_) => return,
            None => 0..self.slots.len(),
        };
        for i in targets {
            self.apply(i, action, now);
        }
    }

    fn apply(&mut self, i: usize, action: SensorAction, now: Instant) {
        let slot = &mut self.slots[i];
        match action {
            SensorAction::ReadNow => {
                if slot.active {
                    self.immediate.push_back(i);
                }
            }
            SensorAction::IntervalMs(ms) => {
                slot.interval = Duration::from_millis(ms.max(1));
                slot.base = now + slot.interval;
                if slot.active && !slot.paused {
                    self.schedule(i);
                }
            }
            SensorAction::Pause => {
                slot.paused = true;
                slot.generation += 1;
            }
            SensorAction::Resume => {
                if slot.paused {
                    slot.paused = false;
                    slot.base = now + slot.interval;
                    if slot.active {
                        self.schedule(i);
                    }
                }
            }
        }
    }

    /// Changes the jitter of every reading scheduled from now on.
    pub fn set_jitter(&mut self, jitter: Duration) {
        let shortest = self.slots.iter().map(|s| s.interval).min();
        self.jitter = shortest.map_or(jitter, |i| jitter.min(i));
    }

    /// The current interval of sensor `index`.
    pub fn interval(&self, index: usize) -> Option<Duration> {
        self.slots.get(index).map(|s| s.interval)
    }

    /// True when sensor `index` is paused.
    pub fn is_paused(&self, index: usize) -> bool {
        self.slots.get(index).is_some_and(|s| s.paused)
    }

    /// When the next reading is due (now, for a pending "read now").
    pub fn next_due(&mut self, now: Instant) -> Option<Instant> {
        if !self.immediate.is_empty() {
            return Some(now);
        }
        self.drop_stale();
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Appends every reading due at `now` to `out`, and schedules the following ones.
    pub fn due(&mut self, now: Instant, out: &mut Vec<Fire>) {
        while let Some(index) = self.immediate.pop_front() {
            out.push(Fire {
                index,
                requested: true,
            });
        }
        let mut rescheduled = Vec::new();
        while let Some(&Reverse((t, index, generation))) = self.heap.peek() {
            if t > now {
                break;
            }
            self.heap.pop();
            let slot = &mut self.slots[index];
            if generation != slot.generation || !slot.active || slot.paused {
                continue;
            }
            out.push(Fire {
                index,
                requested: false,
            });
            slot.base += slot.interval;
            if slot.base <= now {
                // Behind (the process was busy): skip ahead instead of bursting.
                slot.base = now + slot.interval;
            }
            rescheduled.push(index);
        }
        // Scheduled after the loop so that a negative jitter cannot fire a sensor twice at once.
        for index in rescheduled {
            self.schedule(index);
        }
    }

    fn drop_stale(&mut self) {
        while let Some(&Reverse((_, index, generation))) = self.heap.peek() {
            let slot = &self.slots[index];
            if generation == slot.generation && slot.active && !slot.paused {
                break;
            }
            self.heap.pop();
        }
    }

    fn schedule(&mut self, index: usize) {
        let jitter = self.next_jitter();
        let slot = &mut self.slots[index];
        slot.generation += 1;
        let at = if jitter >= 0 {
            slot.base + Duration::from_micros(jitter as u64)
        } else {
            slot.base
                .checked_sub(Duration::from_micros(jitter.unsigned_abs()))
                .unwrap_or(slot.base)
        };
        self.heap.push(Reverse((at, index, slot.generation)));
    }

    /// A uniform offset in ± jitter, in microseconds (splitmix64).
    fn next_jitter(&mut self) -> i64 {
        let j = self.jitter.as_micros() as i64;
        if j == 0 {
            return 0;
        }
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % (2 * j as u64 + 1)) as i64 - j
    }
}

/// Paces new connections at `per_sec`.
#[derive(Debug, Clone)]
pub struct Ramp {
    start: Instant,
    per_sec: u32,
    started: usize,
    total: usize,
}

impl Ramp {
    /// `total` connections from `start`, `per_sec` a second.
    pub fn new(start: Instant, per_sec: u32, total: usize) -> Ramp {
        Ramp {
            start,
            per_sec: per_sec.max(1),
            started: 0,
            total,
        }
    }

    /// The connections that may start by `now` and have not yet.
    pub fn due(&mut self, now: Instant) -> std::ops::Range<usize> {
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let allowed = ((elapsed * self.per_sec as f64) as usize + 1).min(self.total);
        let range = self.started..allowed.max(self.started);
        self.started = range.end;
        range
    }

    /// True once every connection has started.
    pub fn is_done(&self) -> bool {
        self.started >= self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn drain(s: &mut Scheduler, now: Instant) -> Vec<Fire> {
        let mut v = Vec::new();
        s.due(now, &mut v);
        v
    }

    /// Runs the schedule from `t0` for `span`, stepping 1 ms; counts readings per sensor.
    fn simulate(s: &mut Scheduler, t0: Instant, span: Duration) -> Vec<(usize, usize)> {
        let mut counts = vec![(0, 0); s.len()];
        let mut t = t0;
        while t < t0 + span {
            for f in drain(s, t) {
                if f.requested {
                    counts[f.index].1 += 1;
                } else {
                    counts[f.index].0 += 1;
                }
            }
            t += MS;
        }
        counts
    }

    #[test]
    fn keeps_the_rate_with_jitter_and_spreads_the_start() {
        let t0 = Instant::now();
        let mut spread = Scheduler::new(10, 100 * MS, Duration::ZERO, 42);
        let mut s = Scheduler::new(10, 100 * MS, 20 * MS, 42);
        for i in 0..10 {
            spread.activate(i, t0);
            s.activate(i, t0);
        }
        // The first readings are spread over one interval.
        let first: Vec<_> = drain(&mut spread, t0 + 9 * MS)
            .iter()
            .map(|f| f.index)
            .collect();
        assert_eq!(first, vec![0]);
        let first: Vec<_> = drain(&mut spread, t0 + 10 * MS)
            .iter()
            .map(|f| f.index)
            .collect();
        assert_eq!(first, vec![1]);
        let counts = simulate(&mut s, t0 + 10 * MS, Duration::from_secs(10));
        for (i, (n, _)) in counts.iter().enumerate() {
            assert!((98..=101).contains(n), "sensor {i}: {n} readings in 10 s");
        }
    }

    #[test]
    fn read_now_fires_once_for_the_addressed_sensor_only() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(3, Duration::from_secs(60), Duration::ZERO, 1);
        for i in 0..3 {
            s.activate(i, t0);
        }
        drain(&mut s, t0);
        s.command(Some(1), SensorAction::ReadNow, t0 + MS);
        assert_eq!(s.next_due(t0 + MS), Some(t0 + MS));
        assert_eq!(
            drain(&mut s, t0 + MS),
            vec![Fire {
                index: 1,
                requested: true
            }]
        );
        assert!(drain(&mut s, t0 + 2 * MS).is_empty());
        s.command(None, SensorAction::ReadNow, t0 + 3 * MS);
        assert_eq!(drain(&mut s, t0 + 3 * MS).len(), 3);
        // Out of range does nothing.
        s.command(Some(99), SensorAction::ReadNow, t0);
        assert!(drain(&mut s, t0 + 4 * MS).is_empty());
    }

    #[test]
    fn interval_change_pause_and_resume() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(2, Duration::from_secs(1), Duration::ZERO, 1);
        s.activate(0, t0);
        s.activate(1, t0);
        s.command(Some(0), SensorAction::IntervalMs(100), t0);
        assert_eq!(s.interval(0), Some(100 * MS));
        assert_eq!(s.interval(1), Some(Duration::from_secs(1)));
        let counts = simulate(&mut s, t0, Duration::from_secs(2));
        assert_eq!(counts[0].0, 19);
        assert_eq!(counts[1].0, 2);

        let t1 = t0 + Duration::from_secs(2);
        s.command(None, SensorAction::Pause, t1);
        assert!(s.is_paused(0) && s.is_paused(1));
        assert!(
            simulate(&mut s, t1, Duration::from_secs(3))
                .iter()
                .all(|c| c.0 == 0)
        );
        assert_eq!(s.next_due(t1), None);
        let t2 = t1 + Duration::from_secs(3);
        s.command(Some(1), SensorAction::Resume, t2);
        let counts = simulate(&mut s, t2, Duration::from_millis(3001));
        assert_eq!((counts[0].0, counts[1].0), (0, 3));
    }

    #[test]
    fn inactive_sensors_do_not_read_and_a_busy_process_does_not_burst() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(1, 10 * MS, Duration::ZERO, 1);
        assert_eq!(s.next_due(t0), None);
        s.command(None, SensorAction::ReadNow, t0);
        assert!(drain(&mut s, t0).is_empty());
        s.activate(0, t0);
        assert_eq!(drain(&mut s, t0).len(), 1);
        // One second late: one reading, not a hundred.
        assert_eq!(drain(&mut s, t0 + Duration::from_secs(1)).len(), 1);
        s.deactivate(0);
        assert!(drain(&mut s, t0 + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command(b"Request"), Ok(SensorAction::ReadNow));
        assert_eq!(parse_command(b"\"read_now\""), Ok(SensorAction::ReadNow));
        assert_eq!(
            parse_command(b"Sleep5-"),
            Ok(SensorAction::IntervalMs(5000))
        );
        assert_eq!(
            parse_command(br#"{"interval_ms": 250}"#),
            Ok(SensorAction::IntervalMs(250))
        );
        assert_eq!(parse_command(b" pause "), Ok(SensorAction::Pause));
        for bad in [
            &b"SleepX-"[..],
            b"{",
            b"\xff",
            b"reboot",
            br#"{"interval_ms": 0}"#,
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?}");
        }
        assert!(parse_command(&[b'a'; 2000]).is_err());
    }

    #[test]
    fn ramp_paces_connections() {
        let t0 = Instant::now();
        let mut r = Ramp::new(t0, 100, 250);
        assert_eq!(r.due(t0), 0..1);
        assert_eq!(r.due(t0 + Duration::from_millis(500)), 1..51);
        assert_eq!(r.due(t0 + Duration::from_millis(500)), 51..51);
        assert!(!r.is_done());
        assert_eq!(r.due(t0 + Duration::from_secs(10)), 51..250);
        assert!(r.is_done());
    }
}
