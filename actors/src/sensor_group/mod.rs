//! The sensor group: `count` simulated MQTT sensors (a load generator and device emulator), or
//! real sensors that read this host's metrics or probe the network.
//!
//! - `source = "simulated"`: every sensor is its own MQTT client (its own connection and client
//!   id, `client_id` template) of a Colony broker (`broker`, by address) or any broker (`url`,
//!   `mqtt://` or `mqtts://` with `ca`; `username`/`password`). The sensors of a group on a
//!   Colony broker wait (at most 5 s) until that broker answers before they connect, so that
//!   sensors started with it are not refused before it listens; the group itself is started
//!   meanwhile, and its status says `waiting_for_broker`. Connections ramp up at `ramp_per_sec`. Each sensor publishes a
//!   reading every `interval_ms` ± `jitter_ms` to `topic` (`{id}`, `{group}`, `{node}`) at
//!   `qos`, in `format` (JSON, CBOR, gas text) padded to `payload_size`, or as
//!   `payload_template`. Every reading carries the sensor's sequence number
//!   (from 1 at each start) and the send time. Each sensor also subscribes to `command_topic`.
//!   A sensor's connection is a small task of its own ([`conn`], a few KiB: 10,000 sensors at
//!   one reading a second take some 40 MiB and a sixth of a core, see the README's benchmarks);
//!   at QoS 1 and 2 what the broker has not acknowledged is sent again after a reconnect.
//! - `source = "host"`: one sensor reading CPU (overall and per core), memory, swap, disk usage
//!   and I/O, load averages and network interface counters every `interval_ms`, sent as a
//!   reading to `collector`; with `balancer`, also as this node's load (CPU, memory, network
//!   throughput) to a balancer, which then scores nodes as it scores routers.
//! - `source = "probe"`: every `interval_ms` (for `duration_secs`, if set) pings each of `ping`
//!   (`ping_count` echoes: RTT min/avg/max, jitter, loss), times a TCP connect to each of `tcp`
//!   and a resolution of each of `dns`; each result is a reading to `collector`.
//!
//! Downstream commands ([`SensorAction`]: read now — a reading marked requested —, change the
//! interval, pause, resume) reach one sensor or all, by message (`{"command": {"sensor": 7,
//! "action": "read_now"}}`; without `sensor`, every sensor) or, for simulated sensors, on the
//! sensor's command topic (JSON actions, or the gas detectors' `Request` and `SleepN-`).
//!
//! Status: sensors connected, readings sent (total and per second), send errors, commands.
//! Interval, jitter, payload settings and probe targets reload in place; the broker, count,
//! topics and source restart the group. The group fails to start when its broker cannot be
//! resolved; a sensor that loses its connection reconnects on its own and counts an error.
//!
//! The schedule of every sensor is the pure [`schedule::Scheduler`].

mod actor;
pub mod conn;
mod metrics;
mod probe;
pub mod schedule;
mod simulated;

pub use actor::run;
pub use schedule::SensorAction;
pub use simulated::{payload as simulated_payload, topic as simulated_topic};

/// One reading of this host's metrics, as a host sensor sends it (for sizing).
pub fn host_reading_sample() -> std::collections::BTreeMap<String, f64> {
    metrics::HostMetrics::new().read()
}

use serde::{Deserialize, Serialize};

/// The settings a running group takes in place.
pub const IN_PLACE: &[&str] = &[
    "interval_ms",
    "jitter_ms",
    "payload_size",
    "payload_template",
    "format",
    "ping",
    "tcp",
    "dns",
    "ping_count",
    "duration_secs",
];

/// What a sensor group accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorGroupMessage {
    /// A downstream command.
    Command {
        /// The sensor (1 to `count`); every sensor when absent.
        #[serde(default)]
        sensor: Option<u32>,
        /// What to do.
        action: SensorAction,
    },
    /// Replies with the status detail.
    Status {},
}
