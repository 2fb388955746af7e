//! Hot reconfiguration: a new config (or one actor's new settings) becomes a per-node [`plan`]
//! — what starts, stops, changes in place, restarts, stays untouched, and what only a node
//! restart can change — which each node applies atomically: if any step fails, that node goes
//! back to its previous config and actors.

pub mod node;
pub mod plan;
