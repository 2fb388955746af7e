//! Simulated sensors: one MQTT connection (and client id) per sensor, each driven by its own
//! small task ([`super::conn`]) that only moves packets; one scheduler for the whole group
//! decides who publishes when and builds the payloads, so 10,000 sensors cost 10,000
//! connections but no 10,000 timers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_config::ActorSettings;
use colony_config::kinds::{ReadingFormat, SensorGroupSettings};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info};

use super::SensorGroupMessage;
use super::actor::sleep_until;
use super::conn::{self, ConnEvent, Outbox, SensorLink};
use super::schedule::{Fire, Ramp, Scheduler, SensorAction, parse_command};
use crate::collector::store::unix_ms;
use crate::host::{ActorContext, ActorEvent, ActorFailure};
use crate::mqtt_client::MqttTarget;
use crate::reading::{self, Reading};

/// Fills `{id}`, `{group}`, `{node}` (and any other `{key}` given) in a template.
pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        let key = format!("{{{k}}}");
        if out.contains(&key) {
            out = out.replace(&key, v);
        }
    }
    out
}

/// Keep-alive of each sensor's connection.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A plausible gas reading that varies per sensor and over time.
fn simulated_value(id: u32, seq: u64) -> f64 {
    400.0 + ((u64::from(id) * 31 + seq * 17) % 200) as f64 / 2.0
}

/// The payload simulated sensor `id` of `group` on `node` publishes as reading `seq`, sent at
/// `ts` (Unix ms): `payload_template` filled in, or a reading in `format` padded to
/// `payload_size`.
pub fn payload(
    s: &SensorGroupSettings,
    node: &str,
    group: &str,
    id: u32,
    seq: u64,
    ts: u64,
    requested: bool,
) -> Vec<u8> {
    let value = simulated_value(id, seq);
    if let Some(t) = &s.payload_template {
        let (id, seq, ts, value) = (
            id.to_string(),
            seq.to_string(),
            ts.to_string(),
            value.to_string(),
        );
        let vars = [
            ("id", id.as_str()),
            ("group", group),
            ("node", node),
            ("seq", seq.as_str()),
            ("ts", ts.as_str()),
            ("value", value.as_str()),
            ("requested", if requested { "true" } else { "false" }),
        ];
        return fill(t, &vars).into_bytes();
    }
    let gas = s.format == ReadingFormat::Gas;
    let mut r = Reading::single(
        if gas {
            reading::simulated_mac(id)
        } else {
            format!("{node}/{group}/{id}")
        },
        seq,
        ts,
        value,
    );
    r.requested = requested;
    if gas {
        r.sensor_type = Some("Gas".into());
        r.ip = Some(reading::simulated_ip(id));
        r.mac = Some(reading::simulated_mac(id));
    }
    reading::encode(&r, s.format, s.payload_size)
}

/// The topic simulated sensor `id` of `group` on `node` publishes to.
pub fn topic(s: &SensorGroupSettings, node: &str, group: &str, id: u32) -> String {
    fill(
        &s.topic,
        &[("id", &id.to_string()), ("group", group), ("node", node)],
    )
}

struct Group {
    s: SensorGroupSettings,
    node: String,
    group: String,
    qos: QoS,
    clients: Vec<Option<Arc<Outbox>>>,
    up: Vec<bool>,
    seqs: Vec<u64>,
    connected: u64,
    sent: u64,
    errors: u64,
    commands: u64,
    bad_commands: u64,
    last_error: Option<String>,
    rate: u64,
    sent_at_tick: u64,
    /// The sensors wait for their Colony broker to answer before they connect.
    waiting_for_broker: bool,
}

impl Group {
    fn payload(&self, id: u32, seq: u64, ts: u64, requested: bool) -> Vec<u8> {
        payload(&self.s, &self.node, &self.group, id, seq, ts, requested)
    }

    fn publish(&mut self, fire: Fire) {
        let i = fire.index;
        let Some(outbox) = self.clients[i].as_ref() else {
            return;
        };
        let id = i as u32 + 1;
        let seq = self.seqs[i] + 1;
        let payload = self.payload(id, seq, unix_ms(), fire.requested);
        if outbox.push(payload.into()) {
            self.seqs[i] = seq;
            self.sent += 1;
        } else {
            self.errors += 1;
            self.last_error = Some(format!(
                "sensor {id}: {} readings wait to be sent; this one is dropped",
                conn::OUTBOX_LIMIT
            ));
        }
    }

    fn detail(&self, sched: &Scheduler) -> serde_json::Value {
        json!({
            "source": "simulated",
            "sensors": self.clients.len(),
            "connections_started": self.clients.iter().filter(|c| c.is_some()).count(),
            "connected": self.connected,
            "running": sched.running(),
            "readings_sent": self.sent,
            "readings_per_sec": self.rate,
            "send_errors": self.errors,
            "commands_received": self.commands,
            "bad_commands": self.bad_commands,
            "last_error": self.last_error,
            "waiting_for_broker": self.waiting_for_broker,
        })
    }
}

/// How long simulated sensors wait for their Colony broker to answer before they connect
/// anyway (and count what is refused).
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// Waits until the Colony broker at `broker` answers a status call, at most [`BROKER_WAIT`]. A
/// node starts its actors together, and a broker answers only once its listeners are bound:
/// sensors that connected before that would be refused and count send errors for it.
async fn broker_answers(
    cluster: colony_cluster::Cluster,
    me: colony_cluster::Address,
    broker: colony_cluster::Address,
) {
    let deadline = Instant::now() + BROKER_WAIT;
    let status = crate::broker::BrokerMessage::Status {};
    while Instant::now() < deadline {
        let asked = cluster
            .call::<_, serde_json::Value>(&broker, Some(&me), &status, Some(Duration::from_secs(1)))
            .await;
        match asked {
            Ok(_) => return,
            Err(e) => debug!(%broker, "waiting for the broker: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `count` simulated sensors.
pub async fn run(mut ctx: ActorContext, s: SensorGroupSettings) -> Result<(), ActorFailure> {
    let fail = ActorFailure::new;
    let mut target = match (&s.broker, &s.url) {
        (Some(b), _) => MqttTarget::colony_broker(&ctx.config, b, ctx.address.node()),
        (None, Some(u)) => {
            let ca = s.ca.as_deref().map(|p| ctx.config.resolve(p));
            MqttTarget::url(u, ca.as_deref())
        }
        (None, None) => Err("simulated sensors need `broker` or `url`".to_owned()),
    }
    .map_err(fail)?;
    if let Some(u) = &s.username {
        target.credentials = Some((u.clone(), s.password.clone().unwrap_or_default()));
    }
    let target = Arc::new(target);
    let count = s.count as usize;
    let mut g = Group {
        node: ctx.address.node().to_owned(),
        group: ctx.address.actor().to_owned(),
        qos: match s.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        },
        clients: vec![None; count],
        up: vec![false; count],
        seqs: vec![0; count],
        connected: 0,
        sent: 0,
        errors: 0,
        commands: 0,
        bad_commands: 0,
        last_error: None,
        rate: 0,
        sent_at_tick: 0,
        waiting_for_broker: s.broker.is_some(),
        s,
    };
    // The group is started (it answers calls and stops when told) while it waits for its
    // broker; its sensors connect once the broker answers.
    let mut broker_wait = g.s.broker.clone().map(|broker| {
        Box::pin(broker_answers(
            ctx.cluster.clone(),
            ctx.address.clone(),
            broker,
        ))
    });
    info!(sensors = count, broker = ?target, "starting simulated sensors");
    let (tx, mut rx) = mpsc::channel::<ConnEvent>(4096);
    let mut tasks = JoinSet::new();
    let mut ramp = Ramp::new(Instant::now(), g.s.ramp_per_sec, count);
    let mut sched = Scheduler::new(
        count,
        Duration::from_millis(g.s.interval_ms),
        Duration::from_millis(g.s.jitter_ms),
        u64::from(std::process::id()),
    );
    ctx.started();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fires = Vec::new();
    // A fixed deadline: other events must not keep pushing the ramp back.
    let mut ramp_at = Instant::now();
    loop {
        let now = Instant::now();
        let ramp_next = (broker_wait.is_none() && !ramp.is_done()).then_some(ramp_at);
        let due = sched.next_due(now);
        tokio::select! {
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => break,
                ActorEvent::Reconfigure(ActorSettings::SensorGroup(new)) => {
                    if new.interval_ms != g.s.interval_ms {
                        sched.command(None, SensorAction::IntervalMs(new.interval_ms), Instant::now());
                    }
                    if new.jitter_ms != g.s.jitter_ms || new.interval_ms != g.s.interval_ms {
                        sched.set_jitter(Duration::from_millis(new.jitter_ms));
                    }
                    g.s = new;
                }
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(mut d) => {
                    let message: SensorGroupMessage = match d.decode() {
                        Ok(m) => m,
                        Err(e) => { ctx.stats.rejected(); d.reject(e); continue; }
                    };
                    ctx.stats.handled();
                    match message {
                        SensorGroupMessage::Command { sensor, action } => {
                            let index = match sensor {
                                Some(id) if id == 0 || id as usize > count => {
                                    d.reject(colony_cluster::CallError::Rejected(format!("no sensor {id}: sensors are 1 to {count}")));
                                    continue;
                                }
                                Some(id) => Some(id as usize - 1),
                                None => None,
                            };
                            g.commands += 1;
                            sched.command(index, action, Instant::now());
                            d.reply(&());
                        }
                        SensorGroupMessage::Status {} => d.reply(&g.detail(&sched)),
                    }
                }
            },
            Some(ev) = rx.recv() => match ev {
                ConnEvent::Up(i) => {
                    if !std::mem::replace(&mut g.up[i], true) { g.connected += 1; }
                    sched.activate(i, Instant::now());
                }
                ConnEvent::Down(i, e) => {
                    if std::mem::replace(&mut g.up[i], false) { g.connected -= 1; }
                    sched.deactivate(i);
                    g.errors += 1;
                    debug!(sensor = i + 1, "connection: {e}");
                    g.last_error = Some(format!("sensor {}: {e}", i + 1));
                }
                ConnEvent::Command(i, payload) => {
                    g.commands += 1;
                    match parse_command(&payload) {
                        Ok(action) => sched.command(Some(i), action, Instant::now()),
                        Err(e) => { g.bad_commands += 1; g.last_error = Some(format!("sensor {}: {e}", i + 1)); }
                    }
                }
            },
            _ = sleep_until(due) => {
                sched.due(Instant::now(), &mut fires);
                for f in fires.drain(..) {
                    g.publish(f);
                }
            }
            () = async { broker_wait.as_mut().expect("waiting").await }, if broker_wait.is_some() => {
                broker_wait = None;
                g.waiting_for_broker = false;
                ramp = Ramp::new(Instant::now(), g.s.ramp_per_sec, count);
                ramp_at = Instant::now();
            }
            _ = sleep_until(ramp_next) => {
                ramp_at = Instant::now() + Duration::from_millis(10);
                for i in ramp.due(Instant::now()) {
                    let id = (i + 1).to_string();
                    let vars = [("id", id.as_str()), ("group", g.group.as_str()), ("node", g.node.as_str())];
                    let link = SensorLink {
                        index: i,
                        client_id: fill(&g.s.client_id, &vars),
                        topic: fill(&g.s.topic, &vars),
                        command_topic: (!g.s.command_topic.is_empty()).then(|| fill(&g.s.command_topic, &vars)),
                        qos: g.qos,
                        keep_alive: KEEP_ALIVE,
                    };
                    let outbox = Arc::new(Outbox::default());
                    tasks.spawn(conn::run(link, target.clone(), outbox.clone(), tx.clone()));
                    g.clients[i] = Some(outbox);
                }
            }
            _ = tick.tick() => {
                g.rate = g.sent - g.sent_at_tick;
                g.sent_at_tick = g.sent;
                ctx.stats.set_detail(g.detail(&sched));
            }
        }
    }
    for c in g.clients.iter().flatten() {
        c.close();
    }
    // Let the disconnects go out before the tasks are dropped.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill() {
        assert_eq!(
            fill(
                "outTopic/{node}/{group}/{id}",
                &[("id", "7"), ("group", "g"), ("node", "n")]
            ),
            "outTopic/n/g/7"
        );
        assert_eq!(fill("{x}{id}", &[("id", "1")]), "{x}1");
    }
}
