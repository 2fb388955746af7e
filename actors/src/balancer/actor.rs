//! The balancer actor: a mailbox and a one-second tick around [`BalancerCore`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use colony_cluster::{Address, CallError};
use colony_config::ActorSettings;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::debug;

use super::core::{BalancerCore, RouterMetrics, RoutingDecision};
use crate::host::{ActorContext, ActorEvent, ActorFailure};

/// What the balancer accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalancerMessage {
    /// A router's latest metrics.
    Report {
        /// The router (its tunnel actor's address).
        router: String,
        /// Its load.
        metrics: RouterMetrics,
    },
    /// Which router should `endpoint` use? Replies with `Option<RoutingDecision>`; later changes
    /// are pushed to the sender as [`EndpointNotice::RoutingDecision`].
    Decide {
        /// The endpoint asking.
        endpoint: String,
        /// Routers it can use (its tunnels' peers); any router when absent.
        #[serde(default)]
        candidates: Option<Vec<String>>,
    },
    /// Replies with the routers and the decisions (the same JSON status shows).
    Status {},
}

/// What the balancer sends to an endpoint on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointNotice {
    /// The endpoint's preferred router changed.
    RoutingDecision(RoutingDecision),
}

struct Balancer {
    core: BalancerCore,
    /// Where to push each endpoint's changed decisions.
    subscribers: BTreeMap<String, Address>,
}

impl Balancer {
    fn status(&self, now: Instant) -> serde_json::Value {
        let routers: Vec<_> = self
            .core
            .routers(now)
            .into_iter()
            .map(|r| {
                json!({
                    "router": r.router, "score": r.score, "live": r.live,
                    "age_ms": r.age.as_millis() as u64, "metrics": r.metrics,
                })
            })
            .collect();
        let decisions: Vec<_> = self
            .subscribers
            .keys()
            .map(|e| {
                json!({
                    "endpoint": e,
                    "router": self.core.current_router(e),
                    "changed_ms_ago": self.core.last_change(e).map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    "changed_unix_ms": self.core.last_change(e).map(|t| unix_ms(now.saturating_duration_since(t))),
                })
            })
            .collect();
        json!({ "routers": routers, "decisions": decisions })
    }
}

/// Wall-clock milliseconds since the Unix epoch, `ago` before now.
fn unix_ms(ago: Duration) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(ago)
        .as_millis() as u64
}

/// Runs a balancer until it is told to stop.
pub async fn run(mut ctx: ActorContext) -> Result<(), ActorFailure> {
    let ActorSettings::Balancer(settings) = ctx.settings() else {
        return Err(ActorFailure::new(
            "balancer started with another kind's settings",
        ));
    };
    let mut b = Balancer {
        core: BalancerCore::new(settings),
        subscribers: BTreeMap::new(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = ctx.next_event() => match event {
                ActorEvent::Shutdown => return Ok(()),
                ActorEvent::Reconfigure(ActorSettings::Balancer(s)) => b.core.set_settings(s),
                ActorEvent::Reconfigure(_) => {}
                ActorEvent::Message(mut d) => {
                    let message: BalancerMessage = match d.decode() {
                        Ok(m) => m,
                        Err(e) => {
                            ctx.stats.rejected();
                            d.reject(e);
                            continue;
                        }
                    };
                    ctx.stats.handled();
                    let now = Instant::now();
                    match message {
                        BalancerMessage::Report { router, metrics } => {
                            b.core.report(&router, metrics, now);
                            d.reply(&());
                        }
                        BalancerMessage::Decide { endpoint, candidates } => {
                            let decision = b.core.decide(&endpoint, candidates.as_deref(), now);
                            if let Some(from) = d.from.clone() {
                                b.subscribers.insert(endpoint.clone(), from);
                            } else {
                                b.subscribers.entry(endpoint.clone()).or_insert_with(|| ctx.address.clone());
                            }
                            d.reply(&decision);
                        }
                        BalancerMessage::Status {} => d.reply(&b.status(now)),
                    }
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for decision in b.core.tick(now) {
                    let Some(to) = b.subscribers.get(&decision.endpoint).filter(|a| **a != ctx.address) else { continue };
                    let notice = EndpointNotice::RoutingDecision(decision);
                    let sent = tokio::time::timeout(Duration::from_millis(200), ctx.cluster.send(to, Some(&ctx.address), &notice)).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        debug!(endpoint = %to, "routing decision not delivered: {:?}", sent.map_err(|_| CallError::Timeout(200)));
                    }
                }
                ctx.stats.set_detail(b.status(now));
            }
        }
    }
}
