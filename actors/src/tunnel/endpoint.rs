//! The endpoint role: a TUN device, two tunnels to routers, probes, failover, and the balancer.
//!
//! A reading task moves packets from the device to the active router (or to every up router in
//! redundant mode: `Redundant` to the active one, `Held` copies to the others, with the same
//! epoch and sequence number, see the router) as datagrams; the actor loop probes both routers,
//! feeds [`PathSelector`], writes packets from routers to the device (dropping repeats per router
//! and router run, [`SenderWindow`]), and follows the balancer's routing decisions.
//!
//! A packet too large for the datagram gets an ICMP/ICMPv6 "too big" answer from the active
//! router's tunnel address, as that router would send it (the device's own address would be
//! dropped by the kernel as a martian source).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use colony_cluster::{Address, DatagramError};
use colony_config::ActorSettings;
use colony_config::kinds::TunnelSettings;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::dedup::SenderWindow;
use super::device::{self, TunDevice};
use super::frame::{self, FrameKind};
use super::packet::{self, TooBig};
use super::path::{PathSelector, PathTiming};
use super::{AbortOnDrop, TunnelMessage, device_name, new_epoch, tunnel_addresses};
use crate::balancer::{BalancerMessage, core::RoutingDecision};
use crate::host::{ActorContext, ActorEvent, ActorFailure};

/// No active path.
const NONE: usize = usize::MAX;

/// Traffic counters of one tunnel.
#[derive(Debug, Default)]
struct Counters {
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    send_errors: AtomicU64,
    too_big: AtomicU64,
}

/// What the reading task and the actor loop share.
struct Shared {
    active: AtomicUsize,
    /// Bit i set: path i is up (for redundant mode).
    up_mask: AtomicUsize,
    redundant: AtomicBool,
    counters: Vec<Counters>,
    too_big: AtomicU64,
}

fn timing(s: &TunnelSettings) -> PathTiming {
    PathTiming {
        probe_interval: Duration::from_millis(s.probe_interval_ms.max(1)),
        dead_after: s.dead_after.max(1),
        hold: Duration::from_millis(s.recovery_hold_ms),
    }
}

fn unix_ms(at: Instant, now: Instant) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(now.saturating_duration_since(at));
    wall.as_millis() as u64
}

/// Runs an endpoint until it is told to stop.
pub async fn run(mut ctx: ActorContext, settings: TunnelSettings) -> Result<(), ActorFailure> {
    let peers = settings.peers.clone();
    if peers.is_empty() {
        return Err(ActorFailure::new(
            "an endpoint needs at least one router in `peers`",
        ));
    }
    let addrs = tunnel_addresses(&ctx)?;
    let name = device_name(&ctx, &settings);
    let path = ctx.address.path().join("/");
    let datagrams = ctx.cluster.registry().register_datagrams(&path, 8192);
    let dev =
        device::open(&name, settings.mtu, &addrs, &settings.routes).map_err(ActorFailure::new)?;
    info!(device = %name, ?addrs, "tunnel endpoint up");
    ctx.started();

    // The routers' tunnel addresses, the source of "too big" answers.
    let router_addrs: Vec<[Option<std::net::IpAddr>; 2]> = peers
        .iter()
        .map(|p| {
            let a = colony_config::tunnel::tunnel_addresses(&ctx.config, p).unwrap_or_default();
            [a.ipv4.map(|n| n.addr), a.ipv6.map(|n| n.addr)]
        })
        .collect();
    let epoch = new_epoch();
    let shared = Arc::new(Shared {
        active: AtomicUsize::new(NONE),
        up_mask: AtomicUsize::new(0),
        redundant: AtomicBool::new(settings.redundant),
        counters: peers.iter().map(|_| Counters::default()).collect(),
        too_big: AtomicU64::new(0),
    });
    let reader = tokio::spawn(read_device(
        dev.io.clone(),
        ctx.cluster.clone(),
        peers.clone(),
        shared.clone(),
        settings.mtu,
        epoch,
        router_addrs,
    ));
    let _reader = AbortOnDrop(reader);

    let (decisions_tx, decisions) = mpsc::channel(16);
    let _asker = settings.balancer.clone().map(|balancer| {
        AbortOnDrop(tokio::spawn(ask_balancer(
            ctx.cluster.clone(),
            ctx.address.clone(),
            balancer,
            peers.clone(),
            decisions_tx,
        )))
    });

    run_loop(
        &mut ctx, settings, &peers, &path, epoch, dev, datagrams, decisions, shared,
    )
    .await
}

#[allow(clippy::too_many_arguments)] // the pieces the loop owns, built once in `run`
async fn run_loop(
    ctx: &mut ActorContext,
    mut settings: TunnelSettings,
    peers: &[Address],
    path: &str,
    epoch: u32,
    dev: TunDevice,
    mut datagrams: mpsc::Receiver<colony_cluster::Datagram>,
    mut decisions: mpsc::Receiver<RoutingDecision>,
    shared: Arc<Shared>,
) -> Result<(), ActorFailure> {
    let mut sel = PathSelector::new(peers.len(), timing(&settings), Instant::now());
    let mut probe = tokio::time::interval(timing(&settings).probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = tokio::time::interval(Duration::from_millis(500));
    let mut buf = Vec::with_capacity(64);
    let mut last_decision: Option<RoutingDecision> = None;
    let mut rejected_frames = 0u64;
    let mut windows: Vec<SenderWindow> = peers.iter().map(|_| SenderWindow::default()).collect();
    loop {
        tokio::select! {
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => return Ok(()),
                ActorEvent::Reconfigure(ActorSettings::Tunnel(s)) => {
                    sel.set_timing(timing(&s));
                    shared.redundant.store(s.redundant, Ordering::Relaxed);
                    probe = tokio::time::interval(timing(&s).probe_interval);
                    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    settings = s;
                }
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(mut d) => match d.decode::<TunnelMessage>() {
                    Ok(TunnelMessage::RoutingDecision(decision)) => {
                        ctx.stats.handled();
                        follow(&mut sel, peers, &decision);
                        last_decision = Some(decision);
                        d.reply(&());
                    }
                    Ok(TunnelMessage::Status {}) => {
                        ctx.stats.handled();
                        d.reply(&ctx.stats.detail());
                    }
                    Err(e) => {
                        ctx.stats.rejected();
                        d.reject(e);
                    }
                },
            },
            Some(decision) = decisions.recv() => {
                follow(&mut sel, peers, &decision);
                last_decision = Some(decision);
            }
            Some(dg) = datagrams.recv() => {
                let Some(i) = peers.iter().position(|p| p.node() == &*dg.from_node) else {
                    rejected_frames += 1;
                    continue;
                };
                match frame::decode(&dg.payload) {
                    Ok(f) if f.kind == FrameKind::Data => {
                        if !windows[i].accept(f.epoch, f.seq) {
                            continue;
                        }
                        let c = &shared.counters[i];
                        c.packets_in.fetch_add(1, Ordering::Relaxed);
                        c.bytes_in.fetch_add(f.body.len() as u64, Ordering::Relaxed);
                        if packet::inspect(f.body).is_some() {
                            let _ = dev.io.send(f.body).await;
                        } else {
                            rejected_frames += 1;
                        }
                    }
                    Ok(f) if f.kind == FrameKind::ProbeReply => {
                        sel.probe_reply(i, f.seq, Instant::now());
                        apply(&mut sel, &shared, peers, Instant::now());
                    }
                    _ => rejected_frames += 1,
                }
            }
            _ = probe.tick() => {
                let now = Instant::now();
                for (i, peer) in peers.iter().enumerate() {
                    let Some(seq) = sel.probe_sent(i, now) else { continue };
                    frame::encode(&mut buf, FrameKind::Probe, epoch, seq, path.as_bytes());
                    if let Err(DatagramError::NoLink(_)) = ctx.cluster.send_datagram(peer, &buf) {
                        sel.link_lost(i, now);
                    }
                }
                apply(&mut sel, &shared, peers, now);
            }
            _ = status.tick() => {
                // What a datagram to each router carries now (its largest IP packet).
                let max_packet: Vec<Option<usize>> = peers
                    .iter()
                    .map(|p| {
                        ctx.cluster
                            .max_datagram_payload(p.node(), &p.path().join("/"))
                            .map(|m| m.saturating_sub(frame::HEADER_LEN))
                    })
                    .collect();
                ctx.stats.set_detail(detail(&dev, &settings, peers, &sel, &shared, &windows, &max_packet, last_decision.as_ref(), rejected_frames));
            }
        }
    }
}

/// Turns a routing decision into the selector's preference.
fn follow(sel: &mut PathSelector, peers: &[Address], decision: &RoutingDecision) {
    let i = peers.iter().position(|p| p.to_string() == decision.router);
    sel.set_preferred(i);
}

/// Runs the selector's tick and publishes the active path to the reading task.
fn apply(sel: &mut PathSelector, shared: &Shared, peers: &[Address], now: Instant) {
    if let Some(switch) = sel.tick(now) {
        let from = switch.from.map(|i| peers[i].to_string());
        info!(from = ?from, to = %peers[switch.to], reason = switch.reason.as_str(), "tunnel path switch");
    }
    shared
        .active
        .store(sel.active().unwrap_or(NONE), Ordering::Relaxed);
    let mask = sel.up_paths().fold(0usize, |m, i| m | (1 << i));
    shared.up_mask.store(mask, Ordering::Relaxed);
}

/// Moves packets from the device to the active router (and in redundant mode, copies to the
/// other up routers).
async fn read_device(
    dev: Arc<tun::AsyncDevice>,
    cluster: colony_cluster::Cluster,
    peers: Vec<Address>,
    shared: Arc<Shared>,
    mtu: u16,
    epoch: u32,
    router_addrs: Vec<[Option<std::net::IpAddr>; 2]>,
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
        seq += 1;
        let active = shared.active.load(Ordering::Relaxed);
        let targets = if shared.redundant.load(Ordering::Relaxed) {
            shared.up_mask.load(Ordering::Relaxed)
        } else if active == NONE {
            0
        } else {
            1 << active
        };
        for (i, peer) in peers.iter().enumerate() {
            if targets & (1 << i) == 0 {
                continue;
            }
            let kind = if targets.count_ones() == 1 {
                FrameKind::Data
            } else if i == active {
                FrameKind::Redundant
            } else {
                FrameKind::Held
            };
            frame::encode(&mut buf, kind, epoch, seq, pkt);
            let c = &shared.counters[i];
            match cluster.send_datagram(peer, &buf) {
                Ok(()) => {
                    c.packets_out.fetch_add(1, Ordering::Relaxed);
                    c.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(DatagramError::TooLarge { max, .. }) => {
                    c.too_big.fetch_add(1, Ordering::Relaxed);
                    shared.too_big.fetch_add(1, Ordering::Relaxed);
                    let v6 = pkt.first().is_some_and(|b| b >> 4 == 6);
                    let from = router_addrs[i][usize::from(v6)];
                    if let TooBig::Reply(icmp) =
                        packet::too_big(pkt, max.saturating_sub(frame::HEADER_LEN), from)
                    {
                        let _ = dev.send(&icmp).await;
                    }
                    break;
                }
                Err(_) => {
                    c.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)] // everything status shows
fn detail(
    dev: &TunDevice,
    settings: &TunnelSettings,
    peers: &[Address],
    sel: &PathSelector,
    shared: &Shared,
    windows: &[SenderWindow],
    max_packet: &[Option<usize>],
    decision: Option<&RoutingDecision>,
    rejected_frames: u64,
) -> serde_json::Value {
    let now = Instant::now();
    let tunnels: Vec<_> = peers
        .iter()
        .enumerate()
        .filter_map(|(i, peer)| {
            let p = sel.path(i)?;
            let c = &shared.counters[i];
            let (sent, answered) = p.probe_counts();
            Some(json!({
                "peer": peer.to_string(),
                "device": dev.name,
                "state": p.health().as_str(),
                "active": sel.active() == Some(i),
                "since_unix_ms": unix_ms(p.since(), now),
                "rtt_us": p.rtt().map(|r| r.as_micros() as u64),
                "loss": p.loss(sel.timing(), now),
                "probes_sent": sent,
                "probes_answered": answered,
                "packets_out": c.packets_out.load(Ordering::Relaxed),
                "bytes_out": c.bytes_out.load(Ordering::Relaxed),
                "packets_in": c.packets_in.load(Ordering::Relaxed),
                "bytes_in": c.bytes_in.load(Ordering::Relaxed),
                "send_errors": c.send_errors.load(Ordering::Relaxed),
                "too_big": c.too_big.load(Ordering::Relaxed),
                "max_packet": max_packet[i],
                "duplicates_dropped": windows[i].dropped(),
                "router_restarts": windows[i].restarts(),
            }))
        })
        .collect();
    let switches: Vec<_> = sel
        .switches()
        .map(|s| {
            json!({
                "at_unix_ms": unix_ms(s.at, now),
                "from": s.from.map(|i| peers[i].to_string()),
                "to": peers[s.to].to_string(),
                "reason": s.reason.as_str(),
            })
        })
        .collect();
    json!({
        "role": "endpoint",
        "device": dev.name,
        "mtu": settings.mtu,
        "active": sel.active().map(|i| peers[i].to_string()),
        "preferred": sel.preferred().map(|i| peers[i].to_string()),
        "balancer_decision": decision.map(|d| json!({"router": d.router, "score": d.score, "reason": d.reason})),
        "redundant": settings.redundant,
        "tunnels": tunnels,
        "failovers": sel.failovers(),
        "switches": switches,
        "too_big": shared.too_big.load(Ordering::Relaxed),
        "rejected_frames": rejected_frames,
    })
}

/// Asks the balancer for a decision at start and then every ten seconds (pushes arrive in the
/// mailbox in between); sends answers to the actor loop.
async fn ask_balancer(
    cluster: colony_cluster::Cluster,
    me: Address,
    balancer: Address,
    peers: Vec<Address>,
    out: mpsc::Sender<RoutingDecision>,
) {
    let message = BalancerMessage::Decide {
        endpoint: me.to_string(),
        candidates: Some(peers.iter().map(ToString::to_string).collect()),
    };
    loop {
        let answer: Result<Option<RoutingDecision>, _> = cluster
            .call(&balancer, Some(&me), &message, Some(Duration::from_secs(2)))
            .await;
        let wait = match answer {
            Ok(Some(d)) => {
                if out.send(d).await.is_err() {
                    return;
                }
                Duration::from_secs(10)
            }
            Ok(None) => Duration::from_secs(1),
            Err(e) => {
                tracing::debug!("balancer {balancer}: {e}");
                Duration::from_secs(1)
            }
        };
        tokio::time::sleep(wait).await;
    }
}
