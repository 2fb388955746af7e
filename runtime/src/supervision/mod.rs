//! Supervision: the decision core ([`core`], where Colony's supervision semantics are stated) and
//! the task that carries its decisions out ([`supervisor`]).

pub mod core;
pub mod supervisor;
