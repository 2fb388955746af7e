//! The collector actor: a mailbox, a UDP socket and an MQTT session around the tracker, the
//! batcher and the store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use colony_cluster::{Address, CallError, Delivery};
use colony_config::ActorSettings;
use colony_config::kinds::{CollectorSettings, CollectorVia};
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, Publish, QoS};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::batch::Batcher;
use super::sequence::SequenceTracker;
use super::store::{
    CSV_HEADER, Commit, ExportFilter, Reject, Store, StoreError, StoredReading, unix_ms,
};
use super::{CollectorMessage, CollectorQuery, ExportPageReply};
use crate::broker::BrokerMessage;
use crate::host::{ActorContext, ActorEvent, ActorFailure};
use crate::mqtt_client::MqttTarget;
use crate::notice_ids::NoticeIds;
use crate::reading::{self, Reading};

/// Publishes taken before they must be committed and acknowledged when the broker's in-flight
/// window is not known (the broker stops sending at its window, so waiting longer only adds
/// latency); a Colony broker's window is read from the config.
const ACK_WINDOW: usize = 32;
/// Rejected payloads are kept up to this size.
const REJECT_KEEP: usize = 4096;
/// Sources listed one by one in status.
const STATUS_SOURCES: usize = 20;
/// The sequence tracker is checkpointed with a batch at most this often while readings flow.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping collector's MQTT session may take to write its last acknowledgements.
const STOP_WRITE: Duration = Duration::from_secs(2);
/// The most rows one export page holds.
const EXPORT_PAGE_ROWS: u32 = 5_000;

enum Item {
    Reading(StoredReading),
    Reject(Reject),
}

#[derive(Default)]
struct Counters {
    received: u64,
    stored: u64,
    rejected: u64,
    duplicates: u64,
    commits: u64,
    /// Broker notices this collector already had, sent again (acknowledged again, not stored).
    notices_again: u64,
    /// When the last commit finished, Unix ms.
    last_commit_ms: Option<u64>,
    commands: u64,
}

/// A batch being committed on a blocking thread, and the acknowledgements waiting for it.
struct Committing {
    task: tokio::task::JoinHandle<(Store, Result<u64, StoreError>)>,
    acks: Vec<Publish>,
    actor_acks: Vec<u64>,
}

/// The store, or the commit that has it.
enum StoreSlot {
    Ready(Store),
    Committing(Committing),
    /// A commit's thread panicked with the store.
    Lost,
}

struct Collector {
    settings: CollectorSettings,
    db_path: PathBuf,
    data_dir: PathBuf,
    /// Commits run on a blocking thread while the next batch is decoded; at most one at a time.
    store: StoreSlot,
    tracker: SequenceTracker,
    batch: Batcher<Item>,
    acks: Vec<Publish>,
    /// Ids of broker notices (via = "actor") to acknowledge once committed.
    actor_acks: Vec<u64>,
    /// The notices taken, to recognise one sent again (the broker sends its window again when
    /// the collector subscribes anew, while the first copies still wait in its mailbox, which
    /// outlives it; or an acknowledgement was late).
    taken: NoticeIds,
    /// When the sequence tracker was last checkpointed.
    checkpoint_at: Instant,
    /// The cluster, this collector's address and its broker, to acknowledge notices.
    actor_source: Option<(colony_cluster::Cluster, Address, Address)>,
    /// Commit once this many notices wait for acknowledgement: over MQTT half the broker's
    /// in-flight window, so that it never stalls waiting for a batch's time bound; by actor a
    /// batch (the window asked for holds several).
    ack_window: usize,
    seen: HashMap<String, (Option<String>, u64)>,
    devices: HashMap<String, SocketAddr>,
    n: Counters,
}

fn fail(e: impl std::fmt::Display) -> ActorFailure {
    ActorFailure::new(e.to_string())
}

impl Collector {
    /// Decodes a payload and queues it (or its reject).
    fn ingest(
        &mut self,
        payload: &[u8],
        origin: String,
        fallback_source: &str,
        addr: Option<SocketAddr>,
        now: Instant,
    ) {
        match reading::decode(payload, self.settings.format) {
            Ok(r) => self.ingest_reading(r, origin, fallback_source, addr, now),
            Err(e) => self.reject(origin, e.to_string(), payload, now),
        }
    }

    fn reject(&mut self, origin: String, reason: String, payload: &[u8], now: Instant) {
        self.n.received += 1;
        self.n.rejected += 1;
        debug!(%origin, %reason, "reading rejected");
        let r = Reject {
            received_ms: unix_ms(),
            origin,
            reason,
            payload: payload[..payload.len().min(REJECT_KEEP)].to_vec(),
        };
        self.batch.push(Item::Reject(r), now);
    }

    fn ingest_reading(
        &mut self,
        mut r: Reading,
        topic: String,
        fallback_source: &str,
        addr: Option<SocketAddr>,
        now: Instant,
    ) {
        if let Err(e) = r.validate() {
            let payload = serde_json::to_vec(&r).unwrap_or_default();
            return self.reject(topic, e.to_string(), &payload, now);
        }
        self.n.received += 1;
        if r.source.is_empty() {
            r.source = fallback_source.to_owned();
        }
        let mut flags = Vec::new();
        if r.requested {
            flags.push("requested");
        }
        let mut epoch = 0;
        if let Some(seq) = r.seq {
            let (event, e) = self.tracker.observe_in_epoch(&r.source, seq, r.ts);
            if !event.is_new() {
                self.n.duplicates += 1;
                return;
            }
            if !event.as_str().is_empty() {
                flags.push(event.as_str());
            }
            epoch = e;
        }
        if let Some(addr) = addr {
            self.devices.insert(r.source.clone(), addr);
            self.seen
                .insert(r.source.clone(), (Some(addr.to_string()), unix_ms()));
        }
        let item = StoredReading {
            reading: r,
            epoch,
            topic,
            received_ms: unix_ms(),
            flags: flags.join(","),
        };
        self.batch.push(Item::Reading(item), now);
    }

    /// Commits the batch (with a checkpoint of the sequence tracker when one is due), then
    /// acknowledges the publishes it holds.
    async fn flush(&mut self, mqtt: Option<&AsyncClient>) -> Result<(), ActorFailure> {
        let checkpoint =
            self.checkpoint_pending() && self.checkpoint_at.elapsed() >= CHECKPOINT_EVERY;
        self.commit(mqtt, checkpoint).await
    }

    /// Commits the batch and a checkpoint of the sequence tracker (before a query or an
    /// export, which read it, and at shutdown).
    async fn flush_all(&mut self, mqtt: Option<&AsyncClient>) -> Result<(), ActorFailure> {
        let checkpoint = self.checkpoint_pending();
        self.commit(mqtt, checkpoint).await?;
        self.settle(mqtt).await?;
        // The store's own pending sources are known only now.
        if self.checkpoint_pending() {
            self.commit(mqtt, true).await?;
            self.settle(mqtt).await?;
        }
        Ok(())
    }

    /// Sequence state or sources' newest readings not yet checkpointed (the latter known only
    /// while no commit runs).
    fn checkpoint_pending(&self) -> bool {
        self.tracker.changed() > 0
            || matches!(&self.store, StoreSlot::Ready(s) if s.pending_sources() > 0)
    }

    /// The store, once no commit runs ([`Collector::settle`]).
    fn store(&self) -> Result<&Store, String> {
        match &self.store {
            StoreSlot::Ready(s) => Ok(s),
            _ => Err("the database is busy committing".to_owned()),
        }
    }

    /// Waits for the running commit, if any, then acknowledges what it held.
    async fn settle(&mut self, mqtt: Option<&AsyncClient>) -> Result<(), ActorFailure> {
        let StoreSlot::Committing(running) = &mut self.store else {
            return Ok(());
        };
        let done = (&mut running.task).await;
        self.finish(done, mqtt).await
    }

    /// Takes back the store from a finished commit and acknowledges what the commit held.
    async fn finish(
        &mut self,
        done: Result<(Store, Result<u64, StoreError>), tokio::task::JoinError>,
        mqtt: Option<&AsyncClient>,
    ) -> Result<(), ActorFailure> {
        let StoreSlot::Committing(running) = std::mem::replace(&mut self.store, StoreSlot::Lost)
        else {
            return Ok(());
        };
        let (store, result) = done.map_err(|e| fail(format!("commit: {e}")))?;
        self.store = StoreSlot::Ready(store);
        self.n.stored += result.map_err(fail)?;
        self.n.commits += 1;
        self.n.last_commit_ms = Some(unix_ms());
        self.acknowledge(mqtt, running.acks, running.actor_acks)
            .await;
        Ok(())
    }

    /// Starts committing the batch (after the commit before it, if one runs); what it holds is
    /// acknowledged once it has committed.
    async fn commit(
        &mut self,
        mqtt: Option<&AsyncClient>,
        checkpoint: bool,
    ) -> Result<(), ActorFailure> {
        self.settle(mqtt).await?;
        let acks = std::mem::take(&mut self.acks);
        let actor_acks = std::mem::take(&mut self.actor_acks);
        if self.batch.is_empty() && self.seen.is_empty() && !checkpoint {
            // Nothing to write (all were duplicates): acknowledge at once.
            self.acknowledge(mqtt, acks, actor_acks).await;
            return Ok(());
        }
        let mut c = Commit::default();
        for item in self.batch.take() {
            match item {
                Item::Reading(r) => c.readings.push(r),
                Item::Reject(r) => c.rejects.push(r),
            }
        }
        if checkpoint {
            c.sources = self.tracker.take_changed();
            c.checkpoint = true;
            self.checkpoint_at = Instant::now();
        }
        c.seen = self
            .seen
            .drain()
            .map(|(s, (addr, at))| (s, addr, at))
            .collect();
        let StoreSlot::Ready(mut store) = std::mem::replace(&mut self.store, StoreSlot::Lost)
        else {
            return Err(fail("the database was lost by a failed commit"));
        };
        let task = tokio::task::spawn_blocking(move || {
            let result = store.commit(&c);
            (store, result)
        });
        self.store = StoreSlot::Committing(Committing {
            task,
            acks,
            actor_acks,
        });
        Ok(())
    }

    /// Acknowledges publishes (over MQTT) and notices (by actor) whose readings are stored.
    async fn acknowledge(
        &mut self,
        mqtt: Option<&AsyncClient>,
        acks: Vec<Publish>,
        actor_acks: Vec<u64>,
    ) {
        if let Some(client) = mqtt {
            for p in &acks {
                if client.try_ack(p).is_err() && client.ack(p).await.is_err() {
                    // The session is gone; the broker will redeliver, the tracker drops it.
                    break;
                }
            }
        }
        if !actor_acks.is_empty()
            && let Some((cluster, me, broker)) = &self.actor_source
        {
            let ack = BrokerMessage::Ack {
                ids: actor_acks,
                subscriber: None,
            };
            if let Err(e) = cluster.send(broker, Some(me), &ack).await {
                // Unacknowledged notices come again; the tracker drops what is stored.
                debug!(%broker, "ack not delivered: {e}");
            }
        }
    }

    fn detail(&self, broker_connected: Option<bool>, udp: Option<SocketAddr>) -> serde_json::Value {
        let (gaps, _) = self.tracker.totals();
        let mut sources: Vec<_> = self.tracker.sources().collect();
        sources.sort_by(|a, b| b.1.gaps().cmp(&a.1.gaps()).then(a.0.cmp(b.0)));
        let per_source: Vec<_> = sources
            .iter()
            .take(STATUS_SOURCES)
            .map(|(name, s)| {
                json!({
                    "source": name, "received": s.counters.received, "highest": s.highest,
                    "gaps": s.gaps(), "duplicates": s.counters.duplicates,
                    "reordered": s.counters.reordered, "resets": s.counters.resets,
                })
            })
            .collect();
        json!({
            "database": self.db_path,
            "received": self.n.received,
            "stored": self.n.stored,
            "rejected": self.n.rejected,
            "duplicates": self.n.duplicates,
            "gaps": gaps,
            "sources": self.tracker.len(),
            "pending": self.batch.len(),
            "commits": self.n.commits,
            "notices_again": self.n.notices_again,
            "last_commit_ms": self.n.last_commit_ms,
            "commands_sent": self.n.commands,
            "udp": udp,
            "broker_connected": broker_connected,
            "per_source": per_source,
        })
    }

    fn query(&self, q: CollectorQuery) -> Result<serde_json::Value, String> {
        let e = |e: super::store::StoreError| e.to_string();
        Ok(match q {
            CollectorQuery::Latest { source, limit } => {
                json!(
                    self.store()?
                        .latest(source.as_deref(), limit.unwrap_or(10).min(10_000))
                        .map_err(e)?
                )
            }
            CollectorQuery::LatestPerSource {} => {
                json!(self.store()?.latest_per_source().map_err(e)?)
            }
            CollectorQuery::Counts { source } => {
                let per_source = self.store()?.counts(source.as_deref()).map_err(e)?;
                let (readings, rejects) = self.store()?.totals().map_err(e)?;
                let gaps: u64 = per_source.iter().map(|c| c.gaps).sum();
                let duplicates: u64 = per_source.iter().map(|c| c.duplicates).sum();
                json!({
                    "readings": readings, "rejects": rejects, "sources": per_source.len(),
                    "gaps": gaps, "duplicates": duplicates, "per_source": per_source,
                })
            }
            CollectorQuery::Gaps { source } => {
                json!(self.store()?.gaps(source.as_deref()).map_err(e)?)
            }
            CollectorQuery::Rejects { limit } => json!(
                self.store()?
                    .rejects(limit.unwrap_or(10).min(10_000))
                    .map_err(e)?
            ),
        })
    }

    fn export(
        &self,
        path: Option<String>,
        filter: &ExportFilter,
    ) -> Result<serde_json::Value, String> {
        let path = match path {
            Some(p) => resolve(&self.data_dir, PathBuf::from(p)),
            None => self.data_dir.join(format!("export-{}.csv", unix_ms())),
        };
        let rows = self
            .store()?
            .export_csv(&path, filter)
            .map_err(|e| format!("export to {}: {e}", path.display()))?;
        Ok(json!({ "path": path, "rows": rows }))
    }

    fn export_page(
        &self,
        filter: &ExportFilter,
        after_id: Option<i64>,
        upto_id: Option<i64>,
        max_rows: Option<u32>,
        max_bytes: usize,
    ) -> Result<ExportPageReply, String> {
        let e = |e: super::store::StoreError| e.to_string();
        let upto_id = match upto_id {
            Some(id) => id,
            None => self.store()?.max_id().map_err(e)?,
        };
        let max_rows = max_rows
            .unwrap_or(EXPORT_PAGE_ROWS)
            .clamp(1, EXPORT_PAGE_ROWS);
        let page = self
            .store()?
            .export_page(filter, after_id.unwrap_or(0), upto_id, max_rows, max_bytes)
            .map_err(e)?;
        Ok(ExportPageReply {
            header: CSV_HEADER.to_owned(),
            csv: page.csv,
            rows: page.rows,
            last_id: page.last_id,
            upto_id,
            done: page.done,
        })
    }
}

/// Notices acknowledged at once by a collector subscribed by actor: a batch, or half the window
/// when the broker caps it below two batches.
fn ack_threshold(batch_size: usize) -> usize {
    let half_window = super::actor_window(batch_size) as usize / 2;
    batch_size.clamp(1, half_window.max(1))
}

fn resolve(dir: &std::path::Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { dir.join(p) }
}

/// The MQTT session: connects, subscribes on every (re)connect, and forwards publishes.
async fn mqtt_session(
    mut events: EventLoop,
    client: AsyncClient,
    topics: Vec<String>,
    qos: QoS,
    tx: mpsc::Sender<Publish>,
    connected: Arc<AtomicBool>,
) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected.store(true, Ordering::Relaxed);
                for t in &topics {
                    if let Err(e) = client.try_subscribe(t.clone(), qos) {
                        warn!("cannot subscribe to {t}: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).await.is_err() {
                    // The collector is stopping.
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected.swap(false, Ordering::Relaxed) {
                    warn!("broker session lost: {e}");
                } else {
                    debug!("broker not reachable: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // Let the client write what the collector queued last: the acknowledgements of what it
    // committed, then its disconnect. (A publish that comes meanwhile is not acknowledged: the
    // broker sends it again to the next session.)
    let written = tokio::time::timeout(STOP_WRITE, async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    if written.await.is_err() {
        debug!("the last acknowledgements were not written within {STOP_WRITE:?}");
    }
}

async fn recv_udp(udp: Option<&UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match udp {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

async fn recv_mqtt(rx: &mut Option<mpsc::Receiver<Publish>>) -> Option<Publish> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for the running commit; never, when none runs.
async fn committed(
    slot: &mut StoreSlot,
) -> Result<(Store, Result<u64, StoreError>), tokio::task::JoinError> {
    match slot {
        StoreSlot::Committing(running) => (&mut running.task).await,
        _ => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs a collector until it is told to stop.
pub async fn run(mut ctx: ActorContext) -> Result<(), ActorFailure> {
    let ActorSettings::Collector(settings) = ctx.settings() else {
        return Err(fail("collector started with another kind's settings"));
    };
    let db_path = resolve(&ctx.data_dir, settings.database.clone());
    // Off the async threads: the open may wait for a commit the previous run left going.
    let mut store = tokio::task::spawn_blocking({
        let (path, sync) = (db_path.clone(), settings.synchronous);
        move || Store::open_with(&path, sync)
    })
    .await
    .map_err(fail)?
    .map_err(|e| fail(format!("{}: {e}", db_path.display())))?;
    let mut tracker = SequenceTracker::new();
    let mut devices = HashMap::new();
    for row in store.load_sources().map_err(fail)? {
        if let Some(addr) = row.last_addr.as_deref().and_then(|a| a.parse().ok()) {
            devices.insert(row.source.clone(), addr);
        }
        tracker.restore(row.source, row.state);
    }
    // Readings stored after the last checkpoint bring the tracker up to where the data ends.
    let replay = store.readings_after_checkpoint().map_err(fail)?;
    if !replay.is_empty() {
        info!(
            readings = replay.len(),
            "sequence state replayed from the readings after its checkpoint"
        );
    }
    for (source, seq, ts) in replay {
        tracker.observe(&source, seq, ts);
    }
    let udp = match settings.source.udp {
        Some(addr) => Some(
            crate::host::bind_retrying(|| UdpSocket::bind(addr))
                .await
                .map_err(|e| fail(format!("cannot bind UDP {addr}: {e}")))?,
        ),
        None => None,
    };
    let udp_addr = udp.as_ref().and_then(|s| s.local_addr().ok());
    let qos = if settings.qos >= 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };

    // The broker source.
    let mut mqtt_client = None;
    let mut mqtt_rx = None;
    let mut mqtt_session_task = None;
    let connected = Arc::new(AtomicBool::new(false));
    let mut actor_subscribed = true;
    if let Some(broker) = &settings.source.broker {
        match settings.source.via {
            CollectorVia::Mqtt => {
                let target = MqttTarget::colony_broker(&ctx.config, broker, ctx.address.node())
                    .map_err(fail)?;
                let id = format!(
                    "colony-collector-{}-{}",
                    ctx.address.node(),
                    ctx.address.actor()
                );
                let mut o = target.options(&id, Duration::from_secs(10));
                o.set_clean_session(false);
                o.set_manual_acks(true);
                let (client, events) = AsyncClient::new(o, 10_000);
                let (tx, rx) = mpsc::channel(1024);
                mqtt_session_task = Some(tokio::spawn(mqtt_session(
                    events,
                    client.clone(),
                    settings.source.topics.clone(),
                    qos,
                    tx,
                    connected.clone(),
                )));
                info!(broker = %broker, ?target, "collecting from broker over MQTT");
                mqtt_client = Some(client);
                mqtt_rx = Some(rx);
            }
            CollectorVia::Actor => actor_subscribed = false,
        }
    }
    let ack_window = match settings.source.via {
        // Whole batches, as the window asked for holds several.
        CollectorVia::Actor => ack_threshold(settings.batch_size),
        CollectorVia::Mqtt => settings
            .source
            .broker
            .as_ref()
            .and_then(|b| match &ctx.config.actor(b)?.settings {
                ActorSettings::Broker(bs) => Some(usize::from(bs.limits.max_inflight) / 2),
                _ => None,
            })
            .unwrap_or(ACK_WINDOW)
            .max(1),
    };
    let actor_source = match (&settings.source.broker, settings.source.via) {
        (Some(b), CollectorVia::Actor) => {
            Some((ctx.cluster.clone(), ctx.address.clone(), b.clone()))
        }
        _ => None,
    };
    let mut c = Collector {
        batch: Batcher::new(
            settings.batch_size,
            Duration::from_millis(settings.flush_ms),
        ),
        settings,
        db_path,
        data_dir: ctx.data_dir.clone(),
        store: StoreSlot::Ready(store),
        tracker,
        acks: Vec::new(),
        actor_acks: Vec::new(),
        taken: NoticeIds::default(),
        checkpoint_at: Instant::now(),
        ack_window,
        actor_source,
        seen: HashMap::new(),
        devices,
        n: Counters::default(),
    };
    ctx.started();

    let mut buf = vec![0u8; 65_536];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let deadline = c.batch.deadline();
        tokio::select! {
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => break Ok(()),
                ActorEvent::Reconfigure(ActorSettings::Collector(s)) => {
                    c.batch.set_bounds(s.batch_size, Duration::from_millis(s.flush_ms));
                    c.settings.format = s.format;
                    c.settings.batch_size = s.batch_size;
                    c.settings.flush_ms = s.flush_ms;
                    if c.actor_source.is_some() {
                        // Ask for the window that fits the new batches.
                        c.ack_window = ack_threshold(s.batch_size);
                        actor_subscribed = false;
                    }
                }
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(d) => {
                    if let Err(e) = handle(&mut c, &ctx, d, udp.as_ref(), mqtt_client.as_ref(), udp_addr, &connected).await {
                        break Err(e);
                    }
                }
            },
            r = recv_udp(udp.as_ref(), &mut buf) => match r {
                Ok((n, from)) => {
                    ctx.stats.handled();
                    let origin = format!("udp:{from}");
                    let rejected = c.n.rejected;
                    c.ingest(&buf[..n], origin.clone(), &origin, Some(from), Instant::now());
                    if c.n.rejected > rejected { ctx.stats.rejected(); }
                }
                Err(e) => debug!("UDP receive: {e}"),
            },
            p = recv_mqtt(&mut mqtt_rx) => match p {
                Some(p) => {
                    ctx.stats.handled();
                    let topic = p.topic.clone();
                    let rejected = c.n.rejected;
                    c.ingest(&p.payload, topic.clone(), &topic, None, Instant::now());
                    if c.n.rejected > rejected { ctx.stats.rejected(); }
                    c.acks.push(p);
                    let idle = mqtt_rx.as_ref().is_some_and(|rx| rx.is_empty());
                    if (idle || c.acks.len() >= c.ack_window)
                        && let Err(e) = c.flush(mqtt_client.as_ref()).await
                    {
                        break Err(e);
                    }
                }
                None => break Err(fail("the MQTT session ended")),
            },
            done = committed(&mut c.store) => {
                if let Err(e) = c.finish(done, mqtt_client.as_ref()).await {
                    break Err(e);
                }
            }
            _ = sleep_until(deadline) => {}
            _ = tick.tick() => {
                // A checkpoint comes due even when readings have stopped, and notices that were
                // all duplicates (no batch, no deadline) are acknowledged.
                if (!c.actor_acks.is_empty()
                    || (c.checkpoint_pending() && c.checkpoint_at.elapsed() >= CHECKPOINT_EVERY))
                    && let Err(e) = c.flush(mqtt_client.as_ref()).await
                {
                    break Err(e);
                }
                if !actor_subscribed && let Some(broker) = &c.settings.source.broker {
                    let m = BrokerMessage::Subscribe {
                        filters: c.settings.source.topics.clone(),
                        qos: c.settings.qos,
                        subscriber: None,
                        no_local: false,
                        window: Some(super::actor_window(c.settings.batch_size)),
                    };
                    let r: Result<Vec<Option<u8>>, CallError> = ctx.cluster.call(broker, Some(&ctx.address), &m, Some(Duration::from_secs(2))).await;
                    match r {
                        Ok(_) => { actor_subscribed = true; info!(%broker, "subscribed as an actor"); }
                        Err(e) => debug!(%broker, "actor subscription not yet accepted: {e}"),
                    }
                }
                ctx.stats.set_detail(c.detail(mqtt_client.as_ref().map(|_| connected.load(Ordering::Relaxed)), udp_addr));
            }
        }
        if c.batch.is_due(Instant::now())
            && let Err(e) = c.flush(mqtt_client.as_ref()).await
        {
            break Err(e);
        }
    };
    // Commit what is pending, even when failing for another reason.
    let flushed = c.flush_all(mqtt_client.as_ref()).await;
    if let Some(client) = mqtt_client {
        // After the acknowledgements just queued; the session writes both, then ends.
        let _ = client.try_disconnect();
        drop(mqtt_rx);
        if let Some(task) = mqtt_session_task {
            let _ = task.await;
        }
    }
    ctx.stats.set_detail(c.detail(None, udp_addr));
    result.and(flushed)
}

async fn handle(
    c: &mut Collector,
    ctx: &ActorContext,
    mut d: Delivery,
    udp: Option<&UdpSocket>,
    mqtt: Option<&AsyncClient>,
    udp_addr: Option<SocketAddr>,
    connected: &AtomicBool,
) -> Result<(), ActorFailure> {
    let message: CollectorMessage = match d.decode() {
        Ok(m) => m,
        Err(e) => {
            ctx.stats.rejected();
            d.reject(e);
            return Ok(());
        }
    };
    ctx.stats.handled();
    let now = Instant::now();
    match message {
        CollectorMessage::Reading { reading, topic } => {
            let sender = d
                .from
                .as_ref()
                .map_or_else(|| "actor".to_owned(), Address::to_string);
            let topic = topic.unwrap_or_else(|| format!("actor:{sender}"));
            c.ingest_reading(reading, topic, &sender, None, now);
            d.reply(&());
        }
        CollectorMessage::Publish {
            topic, payload, id, ..
        } => {
            let keep = NoticeIds::keep(super::actor_window(c.settings.batch_size));
            match id {
                // Acknowledged with the next batch: after the commit that stores it, if that
                // is still to come.
                Some(id) if !c.taken.take(id, keep) => c.n.notices_again += 1,
                _ => c.ingest(&payload, topic.clone(), &topic, None, now),
            }
            c.actor_acks.extend(id);
            d.reply(&());
            if c.actor_acks.len() >= c.ack_window {
                c.flush(mqtt).await?;
            }
        }
        CollectorMessage::Query(q) => {
            c.flush_all(mqtt).await?;
            match c.query(q) {
                Ok(v) => d.reply(&v),
                Err(e) => d.reject(CallError::Rejected(e)),
            }
        }
        CollectorMessage::Export { path, filter } => {
            c.flush_all(mqtt).await?;
            match c.export(path, &filter) {
                Ok(v) => d.reply(&v),
                Err(e) => d.reject(CallError::Rejected(e)),
            }
        }
        CollectorMessage::ExportPage {
            filter,
            after_id,
            upto_id,
            max_rows,
        } => {
            if after_id.is_none() {
                c.flush(mqtt).await?;
            }
            c.settle(mqtt).await?;
            // Room for the reply's framing and the other fields within one cluster frame.
            let max_bytes = (ctx.config.cluster.max_frame_bytes as usize / 2).max(512);
            match c.export_page(&filter, after_id, upto_id, max_rows, max_bytes) {
                Ok(v) => d.reply(&v),
                Err(e) => d.reject(CallError::Rejected(e)),
            }
        }
        CollectorMessage::Command { device, payload } => {
            let outcome = match (udp, c.devices.get(&device)) {
                (None, _) => Err("this collector has no UDP source".to_owned()),
                (_, None) => Err(format!("no address known for device '{device}'")),
                (Some(sock), Some(addr)) => sock
                    .send_to(payload.as_bytes(), addr)
                    .await
                    .map(|n| json!({ "sent_to": addr, "bytes": n }))
                    .map_err(|e| format!("send to {addr}: {e}")),
            };
            match outcome {
                Ok(v) => {
                    c.n.commands += 1;
                    info!(%device, "downstream command sent");
                    d.reply(&v)
                }
                Err(e) => d.reject(CallError::Rejected(e)),
            }
        }
        CollectorMessage::Flush {} => {
            c.flush_all(mqtt).await?;
            d.reply(&json!({ "stored": c.n.stored, "rejected": c.n.rejected }));
        }
        CollectorMessage::Status {} => {
            d.reply(&c.detail(mqtt.map(|_| connected.load(Ordering::Relaxed)), udp_addr))
        }
    }
    Ok(())
}
