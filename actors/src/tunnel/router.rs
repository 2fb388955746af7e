//! The router role: forwards endpoints' packets between its TUN device and its networks,
//! answers probes, and reports its load to the balancer.
//!
//! Which endpoint owns which tunnel address comes from the config (every endpoint naming this
//! router in `peers`), so replies go back through the right tunnel from the first packet, and a
//! packet whose source address is not the sending endpoint's is dropped (no spoofing across
//! endpoints).
//!
//! Redundant mode: an endpoint sends each packet to both of its routers with the same epoch and
//! sequence number — `Redundant` to its active router, `Held` to the other. The active router
//! sends it on at once and tells the other router which numbers it sent (`Emitted` notices,
//! batched per burst of datagrams). The other router holds its copies: while the endpoint keeps
//! to the active router they expire (after twice the endpoint's failure-detection time and
//! 100 ms); when the endpoint moves here (the active router died), the held copies the old one
//! never reported go out after a short grace for late notices (at least 10 ms and four round
//! trips to the partner; doubled, up to 1 s, whenever a late notice shows a packet went out
//! twice). So nothing is lost when the active router dies, the network behind the routers sees
//! each packet once but for one exception, and a flow never leaks through the standby router's NAT
//! (which would reset a TCP connection). The exception: a packet the active router forwarded in
//! the instant it was killed, before the notice naming it left the process (the notice goes out
//! just after its burst of packets), goes out again from the other router. The network then sees
//! it twice; its answer, if any, came back to the dead router and was lost, so the endpoint sees
//! it once. The rules are the pure [`Redundancy`] core, one per endpoint, whose window
//! also drops repeated datagrams and starts afresh when the endpoint restarts (a new epoch). The
//! routers of an endpoint need a direct cluster link for the notices; without one, the copies
//! held when the endpoint moves all go out (no loss, some duplicates), and status counts the
//! failed notices.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use colony_cluster::{Address, DatagramError};
use colony_config::ActorSettings;
use colony_config::kinds::TunnelSettings;
use serde_json::json;
use tracing::{info, warn};

use super::dedup::{Copy, HoldTimes, Redundancy};
use super::device::{self, Nat, TunDevice};
use super::frame::{self, FrameKind};
use super::packet::{self, TooBig};
use super::{TunnelMessage, device_name, new_epoch, tunnel_addresses};
use crate::balancer::{BalancerMessage, core::RouterMetrics};
use crate::host::{ActorContext, ActorEvent, ActorFailure};

/// Per-endpoint traffic counters.
#[derive(Debug, Default)]
struct Counters {
    packets_to: AtomicU64,
    bytes_to: AtomicU64,
    packets_from: AtomicU64,
    bytes_from: AtomicU64,
}

/// One endpoint this router serves.
struct Endpoint {
    address: Address,
    /// Its address as text (as `Emitted` notices name it).
    key: String,
    /// The endpoint's other router, which holds copies in redundant mode.
    partner: Option<Address>,
    /// How long held copies of this endpoint's packets live while the partner is active.
    expiry: Duration,
    counters: Counters,
}

/// What the loop keeps per endpoint for redundant mode, with notice counters.
struct PerEndpoint {
    copies: Redundancy<Bytes>,
    notices_sent: u64,
    notices_failed: u64,
}

/// The most copies held per endpoint; past it the oldest goes out early.
const MAX_HELD: usize = 16_384;

/// A tunnel counts as active while it probed within this long.
const ACTIVE_WITHIN: Duration = Duration::from_secs(3);

/// The endpoints that name `me` among their peers, with each one's other router.
fn endpoints(ctx: &ActorContext) -> (Vec<Endpoint>, HashMap<IpAddr, usize>) {
    let mut by_ip = HashMap::new();
    let mut out = Vec::new();
    for (i, (address, addrs)) in colony_config::tunnel::endpoints_of(&ctx.config, &ctx.address)
        .into_iter()
        .enumerate()
    {
        for net in [addrs.ipv4, addrs.ipv6].into_iter().flatten() {
            by_ip.insert(net.addr, i);
        }
        let settings = ctx
            .config
            .actors
            .iter()
            .find(|a| a.address() == address)
            .and_then(|a| match &a.settings {
                ActorSettings::Tunnel(t) => Some(t),
                _ => None,
            });
        let partner = settings.and_then(|t| t.peers.iter().find(|p| **p != ctx.address).cloned());
        // Twice the time the endpoint takes to find a router dead, and 100 ms more.
        let detect = settings.map_or(Duration::from_millis(60), |t| {
            Duration::from_millis(t.probe_interval_ms.saturating_mul(u64::from(t.dead_after)))
        });
        let expiry = (detect * 2 + Duration::from_millis(100)).min(Duration::from_secs(10));
        out.push(Endpoint {
            key: address.to_string(),
            address,
            partner,
            expiry,
            counters: Counters::default(),
        });
    }
    (out, by_ip)
}

/// Runs a router until it is told to stop.
pub async fn run(mut ctx: ActorContext, mut settings: TunnelSettings) -> Result<(), ActorFailure> {
    let addrs = tunnel_addresses(&ctx)?;
    let (endpoints, by_ip) = endpoints(&ctx);
    let endpoints = Arc::new(endpoints);
    let by_ip = Arc::new(by_ip);
    let name = device_name(&ctx, &settings);
    let path = ctx.address.path().join("/");
    let mut datagrams = ctx.cluster.registry().register_datagrams(&path, 8192);
    let dev =
        device::open(&name, settings.mtu, &addrs, &settings.routes).map_err(ActorFailure::new)?;
    // Packets this router answers with its own address come in through the device.
    device::accept_local(&name);
    // Dropped last: NAT and forwarding go once the device is gone.
    let _forwarding = device::enable_forwarding().map_err(ActorFailure::new)?;
    let _nat = match &settings.egress {
        Some(egress) => {
            Some(Nat::install(&format!("colony_{name}"), egress).map_err(ActorFailure::new)?)
        }
        None => None,
    };
    info!(device = %name, ?addrs, endpoints = endpoints.len(), "tunnel router up");
    ctx.started();

    let epoch = new_epoch();
    let too_big = Arc::new(AtomicU64::new(0));
    let unroutable = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(read_device(
        dev.io.clone(),
        ctx.cluster.clone(),
        endpoints.clone(),
        by_ip.clone(),
        settings.mtu,
        epoch,
        [addrs.ipv4.map(|n| n.addr), addrs.ipv6.map(|n| n.addr)],
        too_big.clone(),
        unroutable.clone(),
    ));
    let _reader = super::AbortOnDrop(reader);

    let mut r = Router {
        endpoints: endpoints.clone(),
        by_ip,
        last_probe: vec![None; endpoints.len()],
        redundancy: endpoints
            .iter()
            .map(|_| PerEndpoint {
                copies: Redundancy::new(MAX_HELD),
                notices_sent: 0,
                notices_failed: 0,
            })
            .collect(),
        hold: MIN_HOLD,
        hold_floor: MIN_HOLD,
        late_notices: 0,
        epoch,
        rejected_frames: 0,
        spoofed: 0,
        buf: Vec::with_capacity(64),
    };
    let mut report =
        tokio::time::interval(Duration::from_secs(settings.report_interval_secs.max(1)));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = tokio::time::interval(Duration::from_millis(500));
    let mut metrics = Metrics::new();
    let report_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let release = tokio::time::sleep_until(far());
    tokio::pin!(release);
    loop {
        tokio::select! {
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => return Ok(()),
                ActorEvent::Reconfigure(ActorSettings::Tunnel(s)) => {
                    if s.report_interval_secs != settings.report_interval_secs {
                        report = tokio::time::interval(Duration::from_secs(s.report_interval_secs.max(1)));
                        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    settings = s;
                }
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(mut d) => match d.decode::<TunnelMessage>() {
                    Ok(TunnelMessage::Status {}) => {
                        ctx.stats.handled();
                        d.reply(&ctx.stats.detail());
                    }
                    Ok(TunnelMessage::RoutingDecision(_)) => {
                        ctx.stats.handled();
                        d.reply(&());
                    }
                    Err(e) => {
                        ctx.stats.rejected();
                        d.reject(e);
                    }
                },
            },
            Some(dg) = datagrams.recv() => {
                r.handle(&ctx, &dev, dg).await;
                // Take what else has arrived, then tell partners about it in one notice.
                for _ in 0..256 {
                    let Ok(dg) = datagrams.try_recv() else { break };
                    r.handle(&ctx, &dev, dg).await;
                }
                r.release(&dev, Instant::now()).await;
                r.notify(&ctx);
                release.as_mut().reset(r.next_release().map_or_else(far, Into::into));
            }
            _ = &mut release => {
                r.release(&dev, Instant::now()).await;
                r.notify(&ctx);
                release.as_mut().reset(r.next_release().map_or_else(far, Into::into));
            }
            _ = report.tick() => {
                let m = metrics.sample(&endpoints, active_tunnels(&r.last_probe));
                send_report(&ctx, &settings, m, &report_failed);
            }
            // A report that did not get through (the balancer's node not linked yet, say) is
            // sent again a second later rather than a whole interval later.
            _ = retry.tick(), if report_failed.load(Ordering::Relaxed) => {
                let m = metrics.sample(&endpoints, active_tunnels(&r.last_probe));
                send_report(&ctx, &settings, m, &report_failed);
            }
            _ = status.tick() => {
                r.adapt_hold(&ctx);
                ctx.stats.set_detail(r.detail(&dev, &settings, &metrics, &too_big, &unroutable));
            }
        }
    }
}

/// Sends `metrics` to the balancer, if there is one, without holding up the loop; sets `failed`
/// while a report does not get through.
fn send_report(
    ctx: &ActorContext,
    settings: &TunnelSettings,
    metrics: RouterMetrics,
    failed: &Arc<std::sync::atomic::AtomicBool>,
) {
    let Some(balancer) = settings.balancer.clone() else {
        return;
    };
    let cluster = ctx.cluster.clone();
    let me = ctx.address.clone();
    let failed = failed.clone();
    let message = BalancerMessage::Report {
        router: me.to_string(),
        metrics,
    };
    tokio::spawn(async move {
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            cluster.send(&balancer, Some(&me), &message),
        )
        .await;
        let ok = matches!(sent, Ok(Ok(())));
        if !ok {
            tracing::debug!("metrics report to {balancer} not delivered");
        }
        failed.store(!ok, Ordering::Relaxed);
    });
}

/// The shortest grace a held copy gets for the partner's notice once this router is active.
const MIN_HOLD: Duration = Duration::from_millis(10);

/// The longest.
const MAX_HOLD: Duration = Duration::from_secs(1);

/// The router loop's state.
struct Router {
    endpoints: Arc<Vec<Endpoint>>,
    by_ip: Arc<HashMap<IpAddr, usize>>,
    last_probe: Vec<Option<Instant>>,
    redundancy: Vec<PerEndpoint>,
    /// How long standby copies wait now.
    hold: Duration,
    /// The hold's lower bound, raised when notices come late.
    hold_floor: Duration,
    /// Late notices seen so far (packets that went out twice).
    late_notices: u64,
    epoch: u32,
    rejected_frames: u64,
    spoofed: u64,
    buf: Vec<u8>,
}

impl Router {
    /// Sets the hold time: four round trips to the slowest partner, and at least the floor,
    /// which doubles whenever a notice came after its copy had been forwarded.
    fn adapt_hold(&mut self, ctx: &ActorContext) {
        let late: u64 = self
            .redundancy
            .iter()
            .map(|r| r.copies.both_forwarded)
            .sum();
        if late > self.late_notices {
            self.late_notices = late;
            self.hold_floor = (self.hold_floor * 2).min(MAX_HOLD);
        }
        let links = ctx.cluster.link_stats();
        let rtt = self
            .endpoints
            .iter()
            .filter_map(|e| e.partner.as_ref())
            .filter_map(|p| links.iter().find(|l| l.peer == p.node()))
            .map(|l| Duration::from_micros(l.rtt_us))
            .max()
            .unwrap_or_default();
        self.hold = (rtt * 4).clamp(self.hold_floor, MAX_HOLD);
    }

    async fn handle(&mut self, ctx: &ActorContext, dev: &TunDevice, dg: colony_cluster::Datagram) {
        let Ok(f) = frame::decode(&dg.payload) else {
            self.rejected_frames += 1;
            return;
        };
        match f.kind {
            FrameKind::Data | FrameKind::Redundant | FrameKind::Held => {
                // The packet's source must be a tunnel address of an endpoint on the sending node.
                let owner = packet::inspect(f.body)
                    .and_then(|p| self.by_ip.get(&p.source).copied())
                    .filter(|i| self.endpoints[*i].address.node() == &*dg.from_node);
                let Some(i) = owner else {
                    self.spoofed += 1;
                    return;
                };
                let copy = match f.kind {
                    FrameKind::Redundant => Copy::Active,
                    FrameKind::Held => Copy::Standby,
                    _ => Copy::Only,
                };
                let packet = dg.payload.slice(frame::HEADER_LEN..);
                let now = Instant::now();
                let copies = &mut self.redundancy[i].copies;
                if let Some(p) = copies.packet(copy, f.epoch, f.seq, packet, now) {
                    write(dev, &self.endpoints[i], &p).await;
                }
            }
            FrameKind::Emitted => {
                let Ok((endpoint, seqs)) = frame::decode_emitted(f.body) else {
                    self.rejected_frames += 1;
                    return;
                };
                // Only the endpoint's other router may say what it forwarded.
                let Some(i) = self.endpoints.iter().position(|e| {
                    e.key == endpoint
                        && e.partner
                            .as_ref()
                            .is_some_and(|p| p.node() == &*dg.from_node)
                }) else {
                    self.rejected_frames += 1;
                    return;
                };
                self.redundancy[i].copies.notice(f.epoch, &seqs);
            }
            FrameKind::Probe => {
                let known = std::str::from_utf8(f.body).ok().and_then(|p| {
                    self.endpoints.iter().position(|e| {
                        e.address.node() == &*dg.from_node && e.address.path().join("/") == p
                    })
                });
                let Some(i) = known else {
                    self.rejected_frames += 1;
                    return;
                };
                self.last_probe[i] = Some(Instant::now());
                frame::encode(&mut self.buf, FrameKind::ProbeReply, self.epoch, f.seq, &[]);
                let _ = ctx
                    .cluster
                    .send_datagram(&self.endpoints[i].address, &self.buf);
            }
            FrameKind::ProbeReply => self.rejected_frames += 1,
        }
    }

    /// Forwards the held copies whose time is up and that the partner did not forward.
    async fn release(&mut self, dev: &TunDevice, now: Instant) {
        for (e, red) in self.endpoints.iter().zip(&mut self.redundancy) {
            let times = HoldTimes {
                grace: self.hold,
                expiry: e.expiry,
            };
            for p in red.copies.release(now, times) {
                write(dev, e, &p).await;
            }
        }
    }

    /// When the next held copy is due.
    fn next_release(&self) -> Option<Instant> {
        self.endpoints
            .iter()
            .zip(&self.redundancy)
            .filter_map(|(e, r)| {
                r.copies.next_due(HoldTimes {
                    grace: self.hold,
                    expiry: e.expiry,
                })
            })
            .min()
    }

    /// Tells each endpoint's partner which of its packets went out here.
    fn notify(&mut self, ctx: &ActorContext) {
        for (e, red) in self.endpoints.iter().zip(&mut self.redundancy) {
            let Some((epoch, seqs)) = red.copies.take_emitted() else {
                continue;
            };
            let Some(partner) = &e.partner else { continue };
            for chunk in seqs.chunks(frame::MAX_EMITTED) {
                frame::encode_emitted(&mut self.buf, &e.key, epoch, chunk);
                match ctx.cluster.send_datagram(partner, &self.buf) {
                    Ok(()) => red.notices_sent += 1,
                    Err(_) => red.notices_failed += 1,
                }
            }
        }
    }

    fn detail(
        &self,
        dev: &TunDevice,
        settings: &TunnelSettings,
        metrics: &Metrics,
        too_big: &AtomicU64,
        unroutable: &AtomicU64,
    ) -> serde_json::Value {
        let now = Instant::now();
        let tunnels: Vec<_> = self.endpoints.iter().zip(&self.redundancy).enumerate().map(|(i, (e, red))| {
            let c = &e.counters;
            json!({
                "peer": e.key,
                "device": dev.name,
                "state": if self.last_probe[i].is_some_and(|t| now - t < ACTIVE_WITHIN) { "up" } else { "idle" },
                "last_probe_ms_ago": self.last_probe[i].map(|t| now.saturating_duration_since(t).as_millis() as u64),
                "packets_in": c.packets_from.load(Ordering::Relaxed),
                "bytes_in": c.bytes_from.load(Ordering::Relaxed),
                "packets_out": c.packets_to.load(Ordering::Relaxed),
                "bytes_out": c.bytes_to.load(Ordering::Relaxed),
                "partner": e.partner.as_ref().map(ToString::to_string),
                "duplicates_dropped": red.copies.dropped(),
                "held_now": red.copies.held(),
                "held_forwarded": red.copies.held_forwarded,
                "held_dropped": red.copies.held_dropped,
                "held_expired": red.copies.held_expired,
                "redundant_active": red.copies.is_active(),
                "notices_sent": red.notices_sent,
                "notices_failed": red.notices_failed,
                "notices_received": red.copies.notices,
                "both_forwarded": red.copies.both_forwarded,
                "endpoint_restarts": red.copies.endpoint_restarts(),
            })
        }).collect();
        json!({
            "role": "router",
            "device": dev.name,
            "egress_nat": settings.egress,
            "active_tunnels": active_tunnels(&self.last_probe),
            "tunnels": tunnels,
            "hold_grace_ms": self.hold.as_millis() as u64,
            "last_report": metrics.last,
            "too_big": too_big.load(Ordering::Relaxed),
            "unroutable": unroutable.load(Ordering::Relaxed),
            "spoofed": self.spoofed,
            "rejected_frames": self.rejected_frames,
        })
    }
}

/// Writes an endpoint's packet to the device and counts it.
async fn write(dev: &TunDevice, e: &Endpoint, packet: &[u8]) {
    e.counters.packets_from.fetch_add(1, Ordering::Relaxed);
    e.counters
        .bytes_from
        .fetch_add(packet.len() as u64, Ordering::Relaxed);
    let _ = dev.io.send(packet).await;
}

fn active_tunnels(last_probe: &[Option<Instant>]) -> u32 {
    let now = Instant::now();
    last_probe
        .iter()
        .filter(|t| t.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WITHIN))
        .count() as u32
}

/// Host load from `sysinfo` and bandwidth from the router's own counters.
struct Metrics {
    /// `None` when the host's figures cannot be read (reported as 0).
    system: Option<sysinfo::System>,
    bytes: u64,
    at: Instant,
    last: Option<RouterMetrics>,
}

impl Metrics {
    fn new() -> Self {
        let mut system = sysinfo::System::new().ok();
        if let Some(s) = &mut system {
            s.refresh_cpu_usage();
            s.refresh_memory();
        }
        Metrics {
            system,
            bytes: 0,
            at: Instant::now(),
            last: None,
        }
    }

    fn sample(&mut self, endpoints: &[Endpoint], tunnels: u32) -> RouterMetrics {
        if let Some(s) = &mut self.system {
            s.refresh_cpu_usage();
            s.refresh_memory();
        }
        let bytes: u64 = endpoints
            .iter()
            .map(|e| {
                e.counters.bytes_from.load(Ordering::Relaxed)
                    + e.counters.bytes_to.load(Ordering::Relaxed)
            })
            .sum();
        let now = Instant::now();
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        let mbps = if secs > 0.0 {
            bytes.saturating_sub(self.bytes) as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        };
        (self.bytes, self.at) = (bytes, now);
        let (cpu, used, total) = self.system.as_ref().map_or((0.0, 0, 0), |s| {
            (s.global_cpu_usage(), s.used_memory(), s.total_memory())
        });
        let m = RouterMetrics {
            cpu_percent: f64::from(cpu).clamp(0.0, 100.0),
            memory_percent: if total > 0 {
                used as f64 * 100.0 / total as f64
            } else {
                0.0
            },
            bandwidth_mbps: mbps,
            tunnels,
        };
        self.last = Some(m.clone());
        m
    }
}

/// Moves packets from the device to the endpoint that owns their destination.
#[allow(clippy::too_many_arguments)] // the shared pieces of the router, handed over once
async fn read_device(
    dev: Arc<tun::AsyncDevice>,
    cluster: colony_cluster::Cluster,
    endpoints: Arc<Vec<Endpoint>>,
    by_ip: Arc<HashMap<IpAddr, usize>>,
    mtu: u16,
    epoch: u32,
    own: [Option<IpAddr>; 2],
    too_big: Arc<AtomicU64>,
    unroutable: Arc<AtomicU64>,
) {
    let mut packet = vec![0u8; usize::from(mtu) + 64];
    let mut buf = Vec::with_capacity(usize::from(mtu) + frame::HEADER_LEN);
    let mut seq = 0u64;
    loop {
        let n = match dev.recv(&mut packet).await {
            Ok(n) => n,
            Err(e) => {
                warn!("reading the TUN device: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let pkt = &packet[..n];
        let Some(i) = packet::inspect(pkt).and_then(|p| by_ip.get(&p.destination).copied()) else {
            unroutable.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        seq += 1;
        frame::encode(&mut buf, FrameKind::Data, epoch, seq, pkt);
        let e = &endpoints[i];
        match cluster.send_datagram(&e.address, &buf) {
            Ok(()) => {
                e.counters.packets_to.fetch_add(1, Ordering::Relaxed);
                e.counters.bytes_to.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(DatagramError::TooLarge { max, .. }) => {
                too_big.fetch_add(1, Ordering::Relaxed);
                let from = if pkt.first().is_some_and(|b| b >> 4 == 6) {
                    own[1]
                } else {
                    own[0]
                };
                if let TooBig::Reply(icmp) =
                    packet::too_big(pkt, max.saturating_sub(frame::HEADER_LEN), from)
                {
                    let _ = dev.send(&icmp).await;
                }
            }
            Err(_) => {}
        }
    }
}
