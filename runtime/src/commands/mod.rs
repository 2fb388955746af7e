//! One module per `colony` subcommand; each exposes `run(args) -> anyhow::Result<ExitCode>`.

pub mod certs;
pub mod check;
pub mod ctl;
pub mod export;
pub mod node;
pub mod passwd;
pub mod plan;
pub mod up;
