//! The balancer: decides which router each endpoint should prefer.
//!
//! Routers report their load (CPU, memory, bandwidth, tunnel count) every `report_interval_secs`.
//! The balancer keeps the latest report of each, scores it with the configured weights (1 is idle,
//! 0 is fully loaded) and answers endpoints that ask which router to use. A router silent for more
//! than three report intervals is out and is never chosen.
//!
//! Anti-flap keeps endpoints from bouncing between routers of similar load: an endpoint moves to a
//! better router only when that router beats its current one by `anti_flap_threshold` and at least
//! `anti_flap_hold_secs` have passed since its last move. Failure beats anti-flap: when the current
//! router goes out, the endpoint moves at once.
//!
//! Messages ([`BalancerMessage`]): `report` (a router's metrics), `decide` (which router for an
//! endpoint; the reply is the decision, and later changes are pushed to the asking actor as an
//! [`EndpointNotice`]), and `status`. A message that does not decode is refused with the reason.
//!
//! All of this logic lives in [`core`], which does no I/O and reads no clock; weights, threshold,
//! hold time, report interval and the scoring maxima all reload in place.

mod actor;
pub mod core;

pub use actor::{BalancerMessage, EndpointNotice, run};
