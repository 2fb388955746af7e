//! The sensor group actor: picks the source, and runs host and probe sensors (one schedule,
//! readings sent to the collector by message).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use colony_config::ActorSettings;
use colony_config::kinds::{SensorGroupSettings, SensorSource};
use serde_json::json;
use tracing::{debug, warn};

use super::metrics::{CPU_SAMPLE, HostMetrics};
use super::schedule::{Scheduler, SensorAction};
use super::{SensorGroupMessage, probe, simulated};
use crate::balancer::BalancerMessage;
use crate::balancer::core::RouterMetrics;
use crate::collector::CollectorMessage;
use crate::collector::store::unix_ms;
use crate::host::{ActorContext, ActorEvent, ActorFailure};
use crate::reading::Reading;

/// Runs a sensor group until it is told to stop.
pub async fn run(mut ctx: ActorContext) -> Result<(), ActorFailure> {
    let ActorSettings::SensorGroup(settings) = ctx.settings() else {
        return Err(ActorFailure::new(
            "sensor group started with another kind's settings",
        ));
    };
    match settings.source {
        SensorSource::Simulated => simulated::run(ctx, settings).await,
        SensorSource::Host | SensorSource::Probe => periodic(ctx, settings).await,
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Turns host readings into the load a balancer scores: CPU and memory as read, network
/// throughput from the interface byte counters' growth since the previous reading.
#[derive(Default)]
struct LoadReport {
    last: Option<(Instant, f64)>,
}

impl LoadReport {
    fn metrics(&mut self, values: &BTreeMap<String, f64>, now: Instant) -> RouterMetrics {
        let bytes: f64 = values
            .iter()
            .filter(|(k, _)| {
                k.starts_with("net.") && (k.ends_with(".rx_bytes") || k.ends_with(".tx_bytes"))
            })
            .map(|(_, v)| v)
            .sum();
        let bandwidth_mbps = match self.last.replace((now, bytes)) {
            Some((then, before)) if now > then && bytes >= before => {
                (bytes - before) * 8.0 / now.duration_since(then).as_secs_f64() / 1e6
            }
            _ => 0.0,
        };
        RouterMetrics {
            cpu_percent: values.get("cpu").copied().unwrap_or(0.0),
            memory_percent: values.get("mem_used_pct").copied().unwrap_or(0.0),
            bandwidth_mbps,
            tunnels: 0,
        }
    }
}

#[derive(Default)]
struct Counters {
    reports: u64,
    sent: u64,
    errors: u64,
    commands: u64,
    last_error: Option<String>,
    rate: u64,
    sent_at_tick: u64,
}

/// Host or probe sensors: one schedule; each round's readings go to the collector.
async fn periodic(mut ctx: ActorContext, mut s: SensorGroupSettings) -> Result<(), ActorFailure> {
    if s.collector.is_none() && s.balancer.is_none() {
        return Err(ActorFailure::new(
            "host and probe sensors need a `collector` (or, for host sensors, a `balancer`)",
        ));
    }
    let mut load = LoadReport::default();
    let base = ctx.address.to_string();
    let mut host = (s.source == SensorSource::Host).then(HostMetrics::new);
    if host.is_some() {
        tokio::time::sleep(CPU_SAMPLE).await;
    }
    let mut sched = Scheduler::new(
        1,
        Duration::from_millis(s.interval_ms),
        Duration::from_millis(s.jitter_ms),
        u64::from(std::process::id()),
    );
    let started = Instant::now();
    sched.activate(0, started);
    let mut seqs: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = Counters::default();
    let ping_id = (std::process::id() as u16) ^ 0x5a5a;
    ctx.started();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fires = Vec::new();
    loop {
        let finished = s
            .duration_secs
            .is_some_and(|d| started.elapsed() >= Duration::from_secs(d));
        let due = if finished {
            None
        } else {
            sched.next_due(Instant::now())
        };
        tokio::select! {
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => return Ok(()),
                ActorEvent::Reconfigure(ActorSettings::SensorGroup(new)) => {
                    if new.interval_ms != s.interval_ms {
                        sched.command(None, SensorAction::IntervalMs(new.interval_ms), Instant::now());
                    }
                    if new.jitter_ms != s.jitter_ms || new.interval_ms != s.interval_ms {
                        sched.set_jitter(Duration::from_millis(new.jitter_ms));
                    }
                    s = new;
                }
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(mut d) => {
                    let message: SensorGroupMessage = match d.decode() {
                        Ok(m) => m,
                        Err(e) => { ctx.stats.rejected(); d.reject(e); continue; }
                    };
                    ctx.stats.handled();
                    match message {
                        SensorGroupMessage::Command { action, .. } => {
                            n.commands += 1;
                            sched.command(None, action, Instant::now());
                            d.reply(&());
                        }
                        SensorGroupMessage::Status {} => d.reply(&detail(&s, &n, finished)),
                    }
                }
            },
            _ = sleep_until(due) => {
                sched.due(Instant::now(), &mut fires);
                for fire in fires.drain(..) {
                    let results: Vec<(String, BTreeMap<String, f64>)> = match host.as_mut() {
                        Some(h) => vec![("host".to_owned(), h.read())],
                        None => {
                            let (results, errors) = probe::round(&s.ping, &s.tcp, &s.dns, s.ping_count, ping_id).await;
                            for e in errors {
                                warn!("probe failed: {e}");
                                n.errors += 1;
                                n.last_error = Some(e);
                            }
                            results
                        }
                    };
                    if let (Some(balancer), Some((_, values)), true) = (&s.balancer, results.first(), host.is_some()) {
                        let m = BalancerMessage::Report { router: base.clone(), metrics: load.metrics(values, Instant::now()) };
                        match tokio::time::timeout(Duration::from_secs(2), ctx.cluster.send(balancer, Some(&ctx.address), &m)).await {
                            Ok(Ok(())) => n.reports += 1,
                            Ok(Err(e)) => { n.errors += 1; n.last_error = Some(format!("balancer: {e}")); }
                            Err(_) => { n.errors += 1; n.last_error = Some("balancer did not take the report within 2 s".into()); }
                        }
                    }
                    let Some(collector) = &s.collector else { continue };
                    for (name, values) in results {
                        let source = format!("{base}/{name}");
                        let seq = seqs.entry(source.clone()).or_insert(0);
                        *seq += 1;
                        let reading = Reading {
                            source,
                            seq: Some(*seq),
                            ts: Some(unix_ms()),
                            values,
                            requested: fire.requested,
                            sensor_type: Some(name.split(':').next().unwrap_or("host").to_owned()),
                            ip: None,
                            mac: None,
                        };
                        let m = CollectorMessage::Reading { reading, topic: None };
                        let sent = tokio::time::timeout(Duration::from_secs(2), ctx.cluster.send(collector, Some(&ctx.address), &m)).await;
                        match sent {
                            Ok(Ok(())) => n.sent += 1,
                            Ok(Err(e)) => { n.errors += 1; debug!("reading not delivered: {e}"); n.last_error = Some(e.to_string()); }
                            Err(_) => { n.errors += 1; n.last_error = Some("collector did not take the reading within 2 s".into()); }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                n.rate = n.sent - n.sent_at_tick;
                n.sent_at_tick = n.sent;
                ctx.stats.set_detail(detail(&s, &n, finished));
            }
        }
    }
}

fn detail(s: &SensorGroupSettings, n: &Counters, finished: bool) -> serde_json::Value {
    json!({
        "source": s.source,
        "collector": s.collector,
        "balancer": s.balancer,
        "load_reports_sent": n.reports,
        "interval_ms": s.interval_ms,
        "readings_sent": n.sent,
        "readings_per_sec": n.rate,
        "send_errors": n.errors,
        "last_error": n.last_error,
        "commands_received": n.commands,
        "finished": finished,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reports_turn_interface_counters_into_throughput() {
        let mut load = LoadReport::default();
        let at = Instant::now();
        let values = |rx: f64, tx: f64| {
            BTreeMap::from([
                ("cpu".to_owned(), 42.0),
                ("mem_used_pct".to_owned(), 61.5),
                ("net.eth0.rx_bytes".to_owned(), rx),
                ("net.eth0.tx_bytes".to_owned(), tx),
                ("disk_read_bytes".to_owned(), 1e9),
            ])
        };
        let first = load.metrics(&values(1e6, 1e6), at);
        assert_eq!((first.cpu_percent, first.memory_percent), (42.0, 61.5));
        assert_eq!(first.bandwidth_mbps, 0.0, "no rate from one sample");
        // 2.5 MB more in 2 s: 10 Mbit/s.
        let second = load.metrics(&values(2e6, 2.5e6), at + Duration::from_secs(2));
        assert!((second.bandwidth_mbps - 10.0).abs() < 1e-9, "{second:?}");
        // Counters that went back (an interface reset) give no rate rather than a negative one.
        let third = load.metrics(&values(0.0, 0.0), at + Duration::from_secs(4));
        assert_eq!(third.bandwidth_mbps, 0.0);
    }
}
