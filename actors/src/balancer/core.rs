//! The balancer's deterministic core: router scores, liveness and anti-flap routing decisions.
//!
//! [`BalancerCore`] takes events (a router's report, an endpoint's question, a timer tick) together
//! with the current `Instant` and returns decisions; it owns no socket, timer or clock, so every rule
//! below is tested with plain calls and a fake clock.
//!
//! - A router is *live* while its last report is at most three report intervals old.
//! - [`score`] is in `[0, 1]`, higher is better: one minus the weighted mean load. A metric that is
//!   negative or NaN counts as fully loaded, so a router with garbage metrics is never preferred.
//! - An endpoint with no router gets the best live one. An endpoint whose router is still live and
//!   still a candidate moves only when the best beats it by at least `anti_flap_threshold` and
//!   `anti_flap_hold_secs` have passed since its last move. One whose router went out, or was
//!   dropped from its candidates, moves at once. Equal scores go to the smallest router name.
//! - When no candidate is live, the endpoint keeps the router it was last told (there is nothing
//!   better to tell it) and [`BalancerCore::decide`] returns `None`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use colony_config::kinds::{BalancerSettings, BalancerWeights};
use serde::{Deserialize, Serialize};

/// A router is out after this many report intervals without a report.
const MISSED_INTERVALS: u32 = 3;

/// Slack on the anti-flap comparison so a margin of exactly the threshold is not lost to rounding.
const MARGIN_EPSILON: f64 = 1e-9;

/// The load a router reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterMetrics {
    /// CPU use, 0 to 100.
    pub cpu_percent: f64,
    /// Memory use, 0 to 100.
    pub memory_percent: f64,
    /// Traffic forwarded, in Mbit/s.
    pub bandwidth_mbps: f64,
    /// Tunnels currently open to the router.
    pub tunnels: u32,
}

/// Why an endpoint is on the router it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionReason {
    /// The endpoint's first router.
    Initial,
    /// A router beat the previous one by the anti-flap threshold after the hold time.
    BetterScore,
    /// The previous router went out or is no longer among the endpoint's candidates.
    CurrentDown,
    /// Same router as last time.
    Unchanged,
}

/// Which router an endpoint should prefer, as sent to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingDecision {
    /// The endpoint the decision is for.
    pub endpoint: String,
    /// The router it should prefer.
    pub router: String,
    /// That router's score now.
    pub score: f64,
    /// Why this router.
    pub reason: DecisionReason,
}

/// One router as shown in status.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterView {
    /// The router's address.
    pub router: String,
    /// Its latest report.
    pub metrics: RouterMetrics,
    /// Its score under the current weights.
    pub score: f64,
    /// Time since its latest report.
    pub age: Duration,
    /// False once it has missed three report intervals.
    pub live: bool,
}

/// A router's latest report and when it arrived.
#[derive(Debug, Clone)]
struct RouterEntry {
    metrics: RouterMetrics,
    received: Instant,
}

/// What the balancer remembers about an endpoint.
#[derive(Debug, Clone, Default)]
struct EndpointState {
    /// Routers it may use; `None` means any.
    candidates: Option<Vec<String>>,
    /// The router it was last told, with when that changed.
    current: Option<(String, Instant)>,
}

/// Scores routers and decides which one each endpoint uses; no I/O, no clock.
#[derive(Debug, Clone)]
pub struct BalancerCore {
    settings: BalancerSettings,
    routers: BTreeMap<String, RouterEntry>,
    endpoints: BTreeMap<String, EndpointState>,
}

/// Fraction of `max` that `value` uses, in `[0, 1]`; anything not measurable counts as full.
fn load_fraction(value: f64, max: f64) -> f64 {
    if value.is_nan() || value < 0.0 || max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let fraction = value / max;
    if fraction.is_nan() {
        1.0
    } else {
        fraction.min(1.0)
    }
}

/// A weight usable in a sum: negative, NaN and infinite weights count as zero.
fn usable_weight(w: f64) -> f64 {
    if w.is_finite() && w > 0.0 { w } else { 0.0 }
}

/// A router's score in `[0, 1]`, higher is better; 0 when the weights are all zero or unusable.
pub fn score(metrics: &RouterMetrics, settings: &BalancerSettings) -> f64 {
    let BalancerWeights {
        cpu,
        memory,
        bandwidth,
        connections,
    } = settings.weights;
    let terms = [
        (cpu, load_fraction(metrics.cpu_percent, 100.0)),
        (memory, load_fraction(metrics.memory_percent, 100.0)),
        (
            bandwidth,
            load_fraction(metrics.bandwidth_mbps, settings.max_bandwidth_mbps),
        ),
        (
            connections,
            load_fraction(
                f64::from(metrics.tunnels),
                f64::from(settings.max_connections),
            ),
        ),
    ];
    let total: f64 = terms.iter().map(|&(w, _)| usable_weight(w)).sum();
    if total <= 0.0 || !total.is_finite() {
        return 0.0;
    }
    let load: f64 = terms.iter().map(|&(w, f)| usable_weight(w) * f).sum();
    let s = 1.0 - load / total;
    if s.is_nan() { 0.0 } else { s.clamp(0.0, 1.0) }
}

impl BalancerCore {
    /// A balancer with no routers and no endpoints.
    pub fn new(settings: BalancerSettings) -> Self {
        BalancerCore {
            settings,
            routers: BTreeMap::new(),
            endpoints: BTreeMap::new(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &BalancerSettings {
        &self.settings
    }

    /// Replaces the settings in place (hot reload); they apply from the next decision on.
    pub fn set_settings(&mut self, settings: BalancerSettings) {
        self.settings = settings;
    }

    /// Records `router`'s latest metrics, received at `now`.
    pub fn report(&mut self, router: &str, metrics: RouterMetrics, now: Instant) {
        let entry = RouterEntry {
            metrics,
            received: now,
        };
        self.routers.insert(router.to_owned(), entry);
    }

    /// Forgets a router; endpoints on it move at their next decision. True if it was known.
    pub fn remove_router(&mut self, router: &str) -> bool {
        self.routers.remove(router).is_some()
    }

    /// Forgets an endpoint, so ticks no longer re-evaluate it. True if it was known.
    pub fn forget_endpoint(&mut self, endpoint: &str) -> bool {
        self.endpoints.remove(endpoint).is_some()
    }

    /// When the endpoint's router last changed (or was first assigned).
    pub fn last_change(&self, endpoint: &str) -> Option<Instant> {
        self.endpoints
            .get(endpoint)?
            .current
            .as_ref()
            .map(|(_, at)| *at)
    }

    /// The router the endpoint was last told to prefer.
    pub fn current_router(&self, endpoint: &str) -> Option<&str> {
        self.endpoints
            .get(endpoint)?
            .current
            .as_ref()
            .map(|(r, _)| r.as_str())
    }

    /// Decides the endpoint's router, remembering it and its candidates (`None`: any router) for
    /// later ticks; `None` when no candidate is live.
    pub fn decide(
        &mut self,
        endpoint: &str,
        candidates: Option<&[String]>,
        now: Instant,
    ) -> Option<RoutingDecision> {
        let mut state = self.endpoints.remove(endpoint).unwrap_or_default();
        state.candidates = candidates.map(<[String]>::to_vec);
        let decision = self.evaluate(endpoint, &mut state, now);
        self.endpoints.insert(endpoint.to_owned(), state);
        decision
    }

    /// Re-evaluates every known endpoint and returns only the decisions that changed.
    pub fn tick(&mut self, now: Instant) -> Vec<RoutingDecision> {
        let mut endpoints = std::mem::take(&mut self.endpoints);
        let changed = endpoints
            .iter_mut()
            .filter_map(|(name, state)| self.evaluate(name, state, now))
            .filter(|d| d.reason != DecisionReason::Unchanged)
            .collect();
        self.endpoints = endpoints;
        changed
    }

    /// Every router with its score, age and liveness, sorted by name.
    pub fn routers(&self, now: Instant) -> Vec<RouterView> {
        self.routers
            .iter()
            .map(|(name, entry)| RouterView {
                router: name.clone(),
                metrics: entry.metrics.clone(),
                score: score(&entry.metrics, &self.settings),
                age: now.saturating_duration_since(entry.received),
                live: self.is_live(entry, now),
            })
            .collect()
    }

    fn is_live(&self, entry: &RouterEntry, now: Instant) -> bool {
        let interval = Duration::from_secs(self.settings.report_interval_secs);
        let limit = interval.saturating_mul(MISSED_INTERVALS);
        now.saturating_duration_since(entry.received) <= limit
    }

    /// The score of `router` if it is live and allowed by `candidates`.
    fn eligible_score(
        &self,
        router: &str,
        candidates: Option<&[String]>,
        now: Instant,
    ) -> Option<f64> {
        if candidates.is_some_and(|c| !c.iter().any(|r| r == router)) {
            return None;
        }
        let entry = self.routers.get(router)?;
        self.is_live(entry, now)
            .then(|| score(&entry.metrics, &self.settings))
    }

    /// The best eligible router; ties go to the smallest name because the map iterates in order
    /// and only a strictly higher score replaces the best so far.
    fn best(&self, candidates: Option<&[String]>, now: Instant) -> Option<(&str, f64)> {
        let mut best: Option<(&str, f64)> = None;
        for name in self.routers.keys() {
            if let Some(s) = self.eligible_score(name, candidates, now)
                && best.is_none_or(|(_, b)| s > b)
            {
                best = Some((name, s));
            }
        }
        best
    }

    fn evaluate(
        &self,
        endpoint: &str,
        state: &mut EndpointState,
        now: Instant,
    ) -> Option<RoutingDecision> {
        let candidates = state.candidates.as_deref();
        let (best, best_score) = self.best(candidates, now)?;
        let (router, score, reason) = match &state.current {
            None => (best, best_score, DecisionReason::Initial),
            Some((current, since)) => match self.eligible_score(current, candidates, now) {
                None => (best, best_score, DecisionReason::CurrentDown),
                Some(current_score) => {
                    let hold = Duration::from_secs(self.settings.anti_flap_hold_secs);
                    let held = now.saturating_duration_since(*since) >= hold;
                    let margin = best_score - current_score + MARGIN_EPSILON;
                    if best != current && held && margin >= self.settings.anti_flap_threshold {
                        (best, best_score, DecisionReason::BetterScore)
                    } else {
                        (current.as_str(), current_score, DecisionReason::Unchanged)
                    }
                }
            },
        };
        let router = router.to_owned();
        if reason != DecisionReason::Unchanged {
            state.current = Some((router.clone(), now));
        }
        Some(RoutingDecision {
            endpoint: endpoint.to_owned(),
            router,
            score,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BalancerSettings {
        BalancerSettings {
            weights: BalancerWeights::default(),
            anti_flap_threshold: 0.05,
            anti_flap_hold_secs: 30,
            report_interval_secs: 10,
            max_bandwidth_mbps: 1000.0,
            max_connections: 1000,
        }
    }

    fn m(cpu: f64, memory: f64, bandwidth: f64, tunnels: u32) -> RouterMetrics {
        RouterMetrics {
            cpu_percent: cpu,
            memory_percent: memory,
            bandwidth_mbps: bandwidth,
            tunnels,
        }
    }

    /// A fake clock: `at(s)` is `s` seconds after a fixed base.
    fn clock() -> impl Fn(u64) -> Instant {
        let base = Instant::now();
        move |s| base + Duration::from_secs(s)
    }

    /// Load that scores `1 - cpu/100` with CPU alone varying.
    fn cpu(cpu: f64) -> RouterMetrics {
        m(cpu, 0.0, 0.0, 0)
    }

    fn route(d: &RoutingDecision) -> (&str, DecisionReason) {
        (d.router.as_str(), d.reason)
    }

    fn assert_close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn default_weights_score_a_known_example() {
        // load = .30*.50 + .20*.40 + .30*(250/1000) + .20*(100/1000) = .325
        assert_close(score(&m(50.0, 40.0, 250.0, 100), &settings()), 0.675);
        assert_close(score(&m(0.0, 0.0, 0.0, 0), &settings()), 1.0);
        // Bandwidth and tunnels beyond the maxima count as fully loaded, not more.
        assert_close(score(&m(100.0, 100.0, 5000.0, 5000), &settings()), 0.0);
        assert_close(score(&m(0.0, 0.0, 2000.0, 0), &settings()), 0.7);
    }

    #[test]
    fn nan_and_negative_metrics_score_worst_without_panicking() {
        let s = settings();
        assert_close(score(&m(f64::NAN, f64::NAN, f64::NAN, 0), &s), 0.2);
        assert_close(score(&m(-5.0, -1.0, -3.0, 0), &s), 0.2);
        assert_close(score(&m(f64::INFINITY, 0.0, f64::INFINITY, 0), &s), 0.4);
        assert_close(
            score(&m(f64::NAN, 0.0, 0.0, 0), &s),
            score(&m(100.0, 0.0, 0.0, 0), &s),
        );
        // Degenerate settings give a finite score instead of NaN.
        let mut bad = settings();
        bad.weights = BalancerWeights {
            cpu: f64::NAN,
            memory: -1.0,
            bandwidth: 0.0,
            connections: 0.0,
        };
        bad.max_bandwidth_mbps = 0.0;
        assert_close(score(&m(10.0, 10.0, 10.0, 1), &bad), 0.0);

        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", m(f64::NAN, -1.0, f64::NAN, 0), at(0));
        b.report("router-b", m(50.0, 50.0, 500.0, 500), at(0));
        let d = b.decide("ep", None, at(0)).expect("a live router");
        assert_eq!(d.router, "router-b");
    }

    #[test]
    fn first_decision_takes_best_router_with_ties_by_name() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        assert_eq!(b.decide("ep", None, at(0)), None);
        b.report("router-b", cpu(20.0), at(0));
        b.report("router-a", cpu(20.0), at(0));
        b.report("router-c", cpu(60.0), at(0));
        let d = b.decide("ep", None, at(1)).expect("a live router");
        assert_eq!(route(&d), ("router-a", DecisionReason::Initial));
        assert_close(d.score, 1.0 - 0.3 * 0.2);
        assert_eq!(b.last_change("ep"), Some(at(1)));
        let again = b.decide("ep", None, at(2)).expect("a live router");
        assert_eq!(route(&again), ("router-a", DecisionReason::Unchanged));
    }

    #[test]
    fn clearly_better_router_takes_over_only_after_the_hold() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(10.0), at(0));
        b.report("router-b", cpu(50.0), at(0));
        assert_eq!(
            b.decide("ep", None, at(0)).map(|d| d.router),
            Some("router-a".into())
        );
        // A now runs hot: B is better by .3 * .8 = .24, far above the threshold.
        b.report("router-a", cpu(90.0), at(5));
        b.report("router-b", cpu(10.0), at(5));
        let d = b.decide("ep", None, at(29)).expect("live");
        assert_eq!(route(&d), ("router-a", DecisionReason::Unchanged));
        assert!(b.tick(at(29)).is_empty());
        let moved = b.tick(at(30));
        assert_eq!(moved.len(), 1);
        assert_eq!(route(&moved[0]), ("router-b", DecisionReason::BetterScore));
        assert_eq!(b.last_change("ep"), Some(at(30)));
    }

    #[test]
    fn differences_below_the_threshold_never_move() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(20.0), at(0));
        b.report("router-b", cpu(30.0), at(0));
        b.decide("ep", None, at(0));
        // B ahead by .3 * (20 - 6) / 100 = .042 < .05, reported for ten minutes.
        for t in (10..600).step_by(10) {
            b.report("router-a", cpu(20.0), at(t));
            b.report("router-b", cpu(6.0), at(t));
            assert!(b.tick(at(t)).is_empty(), "moved at {t}s");
        }
        assert_eq!(b.current_router("ep"), Some("router-a"));
        // Ahead by exactly the threshold does move.
        b.report("router-b", cpu(10.0 / 3.0), at(600));
        assert_eq!(b.tick(at(600)).len(), 1);
    }

    #[test]
    fn stale_current_router_moves_endpoint_at_once_inside_the_hold() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(10.0), at(0));
        b.report("router-b", cpu(80.0), at(0));
        b.decide("ep", None, at(0));
        for t in [10, 20, 30, 31] {
            b.report("router-b", cpu(80.0), at(t));
        }
        // 30 s after its last report A is still live; one second later it has missed three intervals.
        assert!(b.tick(at(30)).is_empty());
        let moved = b.tick(at(31));
        assert_eq!(moved.len(), 1);
        assert_eq!(route(&moved[0]), ("router-b", DecisionReason::CurrentDown));
        assert_eq!(b.last_change("ep"), Some(at(31)));
        let views = b.routers(at(31));
        assert!(!views[0].live && views[1].live);
        assert_eq!(views[0].age, Duration::from_secs(31));
    }

    #[test]
    fn failure_beats_the_hold() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(10.0), at(0));
        b.report("router-b", cpu(20.0), at(0));
        b.decide("ep", None, at(0));
        assert!(b.remove_router("router-a"));
        let d = b.decide("ep", None, at(1)).expect("live");
        assert_eq!(route(&d), ("router-b", DecisionReason::CurrentDown));
    }

    #[test]
    fn recovered_router_does_not_flap_back() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(10.0), at(0));
        b.report("router-b", cpu(30.0), at(0));
        b.decide("ep", None, at(0));
        for t in [10, 20, 30, 40] {
            b.report("router-b", cpu(30.0), at(t));
        }
        assert_eq!(b.tick(at(40))[0].router, "router-b"); // A went out; moved at 40 s.
        // A is back and idle at once: better by .06, but inside B's hold.
        for t in [45, 55, 65] {
            b.report("router-a", cpu(10.0), at(t));
            b.report("router-b", cpu(30.0), at(t));
            assert!(b.tick(at(t)).is_empty(), "flapped at {t}s");
        }
        // Hold passed, but A is now only .03 better: stays.
        b.report("router-a", cpu(20.0), at(70));
        b.report("router-b", cpu(30.0), at(70));
        assert!(b.tick(at(70)).is_empty());
        // Better by the threshold after the hold: moves back.
        b.report("router-a", cpu(5.0), at(75));
        let moved = b.tick(at(75));
        assert_eq!(route(&moved[0]), ("router-a", DecisionReason::BetterScore));
    }

    #[test]
    fn candidate_restriction_is_respected() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(0.0), at(0));
        b.report("router-b", cpu(40.0), at(0));
        b.report("router-c", cpu(60.0), at(0));
        let pair = ["router-b".to_owned(), "router-c".to_owned()];
        let d = b.decide("ep", Some(&pair), at(0)).expect("live");
        assert_eq!(d.router, "router-b");
        // Ticks keep the restriction: A stays out of reach however good it is.
        assert!(b.tick(at(10)).is_empty());
        // The endpoint drops B from its candidates: it moves at once, inside the hold.
        let only_c = ["router-c".to_owned()];
        let d = b.decide("ep", Some(&only_c), at(11)).expect("live");
        assert_eq!(route(&d), ("router-c", DecisionReason::CurrentDown));
        // Candidates that are unknown or empty leave nothing to choose.
        assert_eq!(
            b.decide("ep2", Some(&["router-z".to_owned()]), at(11)),
            None
        );
        assert_eq!(b.decide("ep3", Some(&[]), at(11)), None);
    }

    #[test]
    fn no_live_router_keeps_the_last_one_told() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(10.0), at(0));
        b.decide("ep", None, at(0));
        assert_eq!(b.decide("ep", None, at(31)), None);
        assert!(b.tick(at(31)).is_empty());
        // A comes back: the endpoint was never told otherwise, so nothing changes.
        b.report("router-a", cpu(10.0), at(40));
        assert!(b.tick(at(40)).is_empty());
        assert_eq!(b.current_router("ep"), Some("router-a"));
    }

    #[test]
    fn tick_returns_only_changed_decisions() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(10.0), at(0));
        b.report("router-b", cpu(50.0), at(0));
        b.decide("ep-1", None, at(0));
        b.decide("ep-2", Some(&["router-b".to_owned()]), at(0));
        b.decide("ep-3", None, at(0));
        assert!(b.forget_endpoint("ep-3"));
        b.report("router-a", cpu(90.0), at(30));
        b.report("router-b", cpu(10.0), at(30));
        let changed = b.tick(at(30));
        let names: Vec<_> = changed.iter().map(|d| d.endpoint.as_str()).collect();
        assert_eq!(names, ["ep-1"]);
        assert!(b.tick(at(31)).is_empty());
    }

    #[test]
    fn settings_reload_in_place() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-a", cpu(20.0), at(0));
        b.report("router-b", cpu(10.0), at(0));
        b.decide("ep", Some(&["router-a".to_owned()]), at(0));
        b.decide("ep", None, at(5));
        // B is .03 better: not enough under the default threshold, enough under .02 and hold 5 s.
        assert!(b.tick(at(5)).is_empty());
        b.set_settings(BalancerSettings {
            anti_flap_threshold: 0.02,
            anti_flap_hold_secs: 5,
            ..settings()
        });
        assert_eq!(b.tick(at(5)).len(), 1);
        // A longer report interval keeps a quiet router live.
        b.set_settings(BalancerSettings {
            report_interval_secs: 60,
            ..settings()
        });
        assert!(b.routers(at(100)).iter().all(|v| v.live));
    }

    #[test]
    fn router_views_are_sorted_and_decisions_serialize() {
        let at = clock();
        let mut b = BalancerCore::new(settings());
        b.report("router-b", cpu(0.0), at(3));
        b.report("router-a", m(50.0, 40.0, 250.0, 100), at(0));
        let views = b.routers(at(5));
        let names: Vec<_> = views.iter().map(|v| v.router.as_str()).collect();
        assert_eq!(names, ["router-a", "router-b"]);
        assert_close(views[0].score, 0.675);
        assert_eq!(views[1].age, Duration::from_secs(2));

        let d = b.decide("ep", None, at(5)).expect("live");
        let json = serde_json::to_string(&d).expect("serialize");
        assert!(json.contains("\"reason\":\"initial\""), "{json}");
        let back: RoutingDecision = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, d);
    }
}
