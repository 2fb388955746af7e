//! Colony's runtime: boots a node from the cluster config, supervises its actors, serves the
//! control socket, and holds the `colony` command line.
//!
//! A node ([`node`]) loads its certificate, brings up its cluster endpoint, starts every actor the
//! config places on it under its root supervisor ([`supervision`]), and answers `colony ctl` on a
//! Unix socket ([`control`]) for the whole cluster, asking its peers over QUIC. The supervision
//! semantics (OTP's strategies, restart policies, intensity and backoff) are stated once, in
//! [`supervision::core`].
//!
//! The binary (`src/main.rs`) only calls [`cli::main`]; each subcommand is a module of
//! [`commands`].

pub mod cli;
pub mod commands;
pub mod config_load;
pub mod control;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod plan;
pub mod reload;
pub mod render;
pub mod supervision;
