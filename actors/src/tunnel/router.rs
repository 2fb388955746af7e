//! The router role: forwards endpoints' packets between its TUN device and its networks,
//! answers probes, and reports its load to the balancer.
//!
//! Which endpoint owns which tunnel address comes from the config (every endpoint naming this
//! router in `peers`), so replies go back through the right tunnel from the first packet, and a
//! packet whose source address is not the sending endpoint's is dropped (no spoofing across
//! endpoints).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use colony_cluster::{Address, DatagramError};
use colony_config::ActorSettings;
use colony_config::kinds::TunnelSettings;
use serde_json::json;
use tracing::{info, warn};

use super::device::{self, Nat};
use super::frame::{self, FrameKind};
use super::packet::{self, TooBig};
use super::{TunnelMessage, device_name, tunnel_addresses};
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
    counters: Counters,
}

/// A tunnel counts as active while it probed within this long.
const ACTIVE_WITHIN: Duration = Duration::from_secs(3);

/// Runs a router until it is told to stop.
pub async fn run(mut ctx: ActorContext, mut settings: TunnelSettings) -> Result<(), ActorFailure> {
    let addrs = tunnel_addresses(&ctx)?;
    let endpoints: Vec<Endpoint> = colony_config::tunnel::endpoints_of(&ctx.config, &ctx.address)
        .into_iter()
        .map(|(address, _)| Endpoint {
            address,
            counters: Counters::default(),
        })
        .collect();
    let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
    for (i, (_, a)) in colony_config::tunnel::endpoints_of(&ctx.config, &ctx.address)
        .into_iter()
        .enumerate()
    {
        for net in [a.ipv4, a.ipv6].into_iter().flatten() {
            by_ip.insert(net.addr, i);
        }
    }
    let endpoints = Arc::new(endpoints);
    let by_ip = Arc::new(by_ip);
    let name = device_name(&ctx, &settings);
    let path = ctx.address.path().join("/");
    let mut datagrams = ctx.cluster.registry().register_datagrams(&path, 8192);
    let dev =
        device::open(&name, settings.mtu, &addrs, &settings.routes).map_err(ActorFailure::new)?;
    device::enable_forwarding().map_err(ActorFailure::new)?;
    let _nat = match &settings.egress {
        Some(egress) => {
            Some(Nat::install(&format!("colony_{name}"), egress).map_err(ActorFailure::new)?)
        }
        None => None,
    };
    info!(device = %name, ?addrs, endpoints = endpoints.len(), "tunnel router up");
    ctx.started();

    let too_big = Arc::new(AtomicU64::new(0));
    let unroutable = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn(read_device(
        dev.io.clone(),
        ctx.cluster.clone(),
        endpoints.clone(),
        by_ip.clone(),
        settings.mtu,
        [addrs.ipv4.map(|n| n.addr), addrs.ipv6.map(|n| n.addr)],
        too_big.clone(),
        unroutable.clone(),
    ));
    let _reader = super::AbortOnDrop(reader);

    let mut last_probe: Vec<Option<Instant>> = vec![None; endpoints.len()];
    let mut rejected_frames = 0u64;
    let mut spoofed = 0u64;
    let mut buf = Vec::with_capacity(64);
    let mut report =
        tokio::time::interval(Duration::from_secs(settings.report_interval_secs.max(1)));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = tokio::time::interval(Duration::from_millis(500));
    let mut metrics = Metrics::new();
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
                let Ok(f) = frame::decode(&dg.payload) else {
                    rejected_frames += 1;
                    continue;
                };
                match f.kind {
                    FrameKind::Data => {
                        // The packet's source must be a tunnel address of an endpoint on the sending node.
                        let owner = packet::inspect(f.body)
                            .and_then(|p| by_ip.get(&p.source).copied())
                            .filter(|i| endpoints[*i].address.node() == &*dg.from_node);
                        let Some(i) = owner else {
                            spoofed += 1;
                            continue;
                        };
                        let c = &endpoints[i].counters;
                        c.packets_from.fetch_add(1, Ordering::Relaxed);
                        c.bytes_from.fetch_add(f.body.len() as u64, Ordering::Relaxed);
                        let _ = dev.io.send(f.body).await;
                    }
                    FrameKind::Probe => {
                        let known = std::str::from_utf8(f.body).ok().and_then(|p| {
                            endpoints.iter().position(|e| {
                                e.address.node() == &*dg.from_node && e.address.path().join("/") == p
                            })
                        });
                        let Some(i) = known else {
                            rejected_frames += 1;
                            continue;
                        };
                        last_probe[i] = Some(Instant::now());
                        frame::encode(&mut buf, FrameKind::ProbeReply, f.seq, &[]);
                        let _ = ctx.cluster.send_datagram(&endpoints[i].address, &buf);
                    }
                    FrameKind::ProbeReply => rejected_frames += 1,
                }
            }
            _ = report.tick() => {
                let active = active_tunnels(&last_probe);
                let m = metrics.sample(&endpoints, active);
                if let Some(balancer) = settings.balancer.clone() {
                    let cluster = ctx.cluster.clone();
                    let me = ctx.address.clone();
                    let message = BalancerMessage::Report { router: me.to_string(), metrics: m };
                    tokio::spawn(async move {
                        let sent = tokio::time::timeout(Duration::from_secs(2), cluster.send(&balancer, Some(&me), &message)).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::debug!("metrics report to {balancer} not delivered");
                        }
                    });
                }
            }
            _ = status.tick() => {
                let now = Instant::now();
                let tunnels: Vec<_> = endpoints.iter().enumerate().map(|(i, e)| {
                    let c = &e.counters;
                    json!({
                        "peer": e.address.to_string(),
                        "device": dev.name,
                        "state": if last_probe[i].is_some_and(|t| now - t < ACTIVE_WITHIN) { "up" } else { "idle" },
                        "last_probe_ms_ago": last_probe[i].map(|t| now.saturating_duration_since(t).as_millis() as u64),
                        "packets_in": c.packets_from.load(Ordering::Relaxed),
                        "bytes_in": c.bytes_from.load(Ordering::Relaxed),
                        "packets_out": c.packets_to.load(Ordering::Relaxed),
                        "bytes_out": c.bytes_to.load(Ordering::Relaxed),
                    })
                }).collect();
                ctx.stats.set_detail(json!({
                    "role": "router",
                    "device": dev.name,
                    "egress_nat": settings.egress,
                    "active_tunnels": active_tunnels(&last_probe),
                    "tunnels": tunnels,
                    "last_report": metrics.last,
                    "too_big": too_big.load(Ordering::Relaxed),
                    "unroutable": unroutable.load(Ordering::Relaxed),
                    "spoofed": spoofed,
                    "rejected_frames": rejected_frames,
                }));
            }
        }
    }
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
        frame::encode(&mut buf, FrameKind::Data, seq, pkt);
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
