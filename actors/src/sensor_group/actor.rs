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

#[derive(Default)]
struct Counters {
    sent: u64,
    errors: u64,
    commands: u64,
    last_error: Option<String>,
    rate: u64,
    sent_at_tick: u64,
}

/// Host or probe sensors: one schedule; each round's readings go to the collector.
async fn periodic(mut ctx: ActorContext, mut s: SensorGroupSettings) -> Result<(), ActorFailure> {
    let collector = s
        .collector
        .clone()
        .ok_or_else(|| ActorFailure::new("host and probe sensors need a `collector`"))?;
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
                        let sent = tokio::time::timeout(Duration::from_secs(2), ctx.cluster.send(&collector, Some(&ctx.address), &m)).await;
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
        "interval_ms": s.interval_ms,
        "readings_sent": n.sent,
        "readings_per_sec": n.rate,
        "send_errors": n.errors,
        "last_error": n.last_error,
        "commands_received": n.commands,
        "finished": finished,
    })
}
