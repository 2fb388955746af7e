//! Host metrics through `sysinfo`: CPU (overall and per core), memory, swap, disk usage and I/O,
//! load averages and network interface counters, as one reading's values.

use std::collections::BTreeMap;

use sysinfo::{Disks, Networks, System};

use crate::reading::MAX_VALUES;

/// How long CPU usage needs between two samples to mean anything.
pub const CPU_SAMPLE: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps the sysinfo handles between readings (CPU usage and I/O are deltas between refreshes).
pub struct HostMetrics {
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
}

impl HostMetrics {
    /// Takes a first sample; wait [`CPU_SAMPLE`] before the first [`HostMetrics::read`].
    pub fn new() -> HostMetrics {
        let mut system = System::new().ok();
        if let Some(s) = system.as_mut() {
            s.refresh_cpu_usage();
            s.refresh_memory();
        }
        HostMetrics {
            system,
            disks: Disks::new_with_refreshed_list().ok(),
            networks: Networks::new_with_refreshed_list().ok(),
        }
    }

    /// The values now. Names: `cpu`, `cpu.N`, `mem_used_pct`, `mem_used`, `mem_total`,
    /// `swap_used_pct`, `swap_used`, `load1`/`load5`/`load15`, `disk_read_bytes` and
    /// `disk_written_bytes` (since the last reading), `disk.MOUNT.used_pct`, and per interface
    /// `net.IFACE.rx_bytes`/`tx_bytes` (totals).
    pub fn read(&mut self) -> BTreeMap<String, f64> {
        let mut v = BTreeMap::new();
        if let Some(s) = self.system.as_mut() {
            s.refresh_cpu_usage();
            s.refresh_memory();
            v.insert(
                "cpu".to_owned(),
                f64::from(s.global_cpu_usage()).clamp(0.0, 100.0),
            );
            for (i, cpu) in s.cpus().iter().enumerate().take(128) {
                v.insert(format!("cpu.{i}"), f64::from(cpu.usage()).clamp(0.0, 100.0));
            }
            let (total, used) = (s.total_memory(), s.used_memory());
            v.insert("mem_total".to_owned(), total as f64);
            v.insert("mem_used".to_owned(), used as f64);
            v.insert("mem_used_pct".to_owned(), pct(used, total));
            let (total, used) = (s.total_swap(), s.used_swap());
            v.insert("swap_used".to_owned(), used as f64);
            v.insert("swap_used_pct".to_owned(), pct(used, total));
        }
        if let Ok(l) = System::load_average() {
            v.insert("load1".to_owned(), l.one);
            v.insert("load5".to_owned(), l.five);
            v.insert("load15".to_owned(), l.fifteen);
        }
        if let Some(d) = self.disks.as_mut() {
            d.refresh(true);
            let (mut read, mut written) = (0u64, 0u64);
            for disk in d.iter() {
                let u = disk.usage();
                read += u.read_bytes;
                written += u.written_bytes;
                if v.len() < MAX_VALUES - 40 {
                    let total = disk.total_space();
                    let used = total.saturating_sub(disk.available_space());
                    v.insert(
                        format!("disk.{}.used_pct", disk.mount_point().display()),
                        pct(used, total),
                    );
                }
            }
            v.insert("disk_read_bytes".to_owned(), read as f64);
            v.insert("disk_written_bytes".to_owned(), written as f64);
        }
        if let Some(n) = self.networks.as_mut() {
            n.refresh(true);
            for (name, data) in n.iter() {
                let name = name.to_string_lossy();
                if v.len() >= MAX_VALUES - 2 {
                    break;
                }
                v.insert(format!("net.{name}.rx_bytes"), data.total_received() as f64);
                v.insert(
                    format!("net.{name}.tx_bytes"),
                    data.total_transmitted() as f64,
                );
            }
        }
        v
    }
}

fn pct(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (used as f64 * 100.0 / total as f64).clamp(0.0, 100.0)
    }
}
