//! The `colony` command line: argument parsing and dispatch to the subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands;
use crate::logging::{self, LogFormat};

/// Colony: supervised IoT and network-edge infrastructure over mutually authenticated QUIC.
#[derive(Debug, Parser)]
#[command(name = "colony", version, about, long_about = None)]
pub struct Cli {
    /// Log format on standard error (levels come from RUST_LOG, default "info").
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text, global = true)]
    pub log_format: LogFormatArg,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node of a cluster: its links and every actor the config places on it.
    Node(NodeArgs),
    /// Run every node of a config on this machine (creating dev certificates if needed) and
    /// show the cluster's status until Ctrl-C.
    Up(UpArgs),
    /// Talk to a running node's control socket: status, tree, send, call, restart, stop, start,
    /// kill.
    Ctl(CtlArgs),
    /// Validate a cluster config and print every error, or a one-line summary.
    Check(CheckArgs),
    /// Make and inspect the cluster CA and node certificates.
    Certs(CertsArgs),
    /// Print the argon2 hash of a broker user's password, for `users` in the config.
    Passwd(crate::commands::passwd::PasswdArgs),
    /// Estimate per node and per cluster link the messages/s and bandwidth a config will move
    /// (from sensor counts, intervals and payloads); `--measure` compares with a running
    /// cluster.
    Plan(crate::commands::plan::PlanArgs),
    /// Write a collector's readings (on any node) as CSV to a file or stdout, filtered by source
    /// and received time.
    Export(crate::commands::export::ExportArgs),
}

/// `colony node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The cluster config.
    #[arg(long)]
    pub config: PathBuf,
    /// This node's name in the config.
    #[arg(long)]
    pub name: String,
    /// Where certificates, sockets and data live (default: the config's state_dir, or
    /// `.colony/<cluster>` beside the config).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `colony up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The cluster config.
    pub config: PathBuf,
    /// Where certificates, sockets, data and node logs live.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Seconds between status tables; 0 prints it once.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
    /// How long to wait for the cluster to connect, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Which node's control socket a command talks to: `--socket`, or `--config` with `--node`.
#[derive(Debug, Clone, Default, Args)]
pub struct ControlSocketArgs {
    /// The node's control socket.
    #[arg(long, conflicts_with_all = ["config", "node"])]
    pub socket: Option<PathBuf>,
    /// The cluster config (with --node, to find the node's socket).
    #[arg(long, requires = "node")]
    pub config: Option<PathBuf>,
    /// The node to talk to (with --config).
    #[arg(long, requires = "config")]
    pub node: Option<String>,
    /// The state directory the node was started with, if not the config's.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `colony ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The node to talk to.
    #[command(flatten)]
    pub target: ControlSocketArgs,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The request.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `colony ctl` requests.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Every node and actor in the cluster, with link RTT, loss and bytes.
    Status,
    /// The supervision tree of every node.
    Tree,
    /// Deliver a message (JSON, in the kind's message format) to an actor.
    Send {
        /// `node/actor`.
        address: String,
        /// The message, e.g. '{"status": {}}'.
        message: String,
    },
    /// Deliver a message and print the reply.
    Call {
        /// `node/actor`.
        address: String,
        /// The message.
        message: String,
        /// How long to wait for the reply, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Stop and start an actor.
    Restart {
        /// `node/actor`.
        address: String,
    },
    /// Stop an actor until it is started again.
    Stop {
        /// `node/actor`.
        address: String,
    },
    /// Start a stopped actor.
    Start {
        /// `node/actor`.
        address: String,
    },
    /// Make an actor fail as a crash would (its supervisor restarts it per its policy).
    Kill {
        /// `node/actor`.
        address: String,
    },
    /// Validate a new cluster config and apply it on every node: a plan per node (what starts,
    /// stops, changes in place, restarts), applied atomically per node. Exits non-zero if any
    /// node did not apply it.
    Reload {
        /// The new config.
        config: PathBuf,
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change one actor's settings (a JSON object merged onto its current settings), in place
    /// where its kind allows, otherwise by a supervised restart.
    Reconfigure {
        /// `node/actor`.
        address: String,
        /// The settings to change, e.g. '{"anti_flap_threshold": 0.1}'.
        settings: String,
    },
}

/// `colony check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The cluster config.
    pub config: PathBuf,
}

/// `colony certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// `colony certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA (ca.pem, and ca.key with mode 0600).
    Init {
        /// Directory for ca.pem and ca.key (default: the config's certs directory).
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        /// Take the directory and cluster name from this config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The cluster's name, used in the CA's name.
        #[arg(long, default_value = "colony")]
        cluster: String,
        /// Overwrite an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Sign a node certificate (NODE.pem, NODE.key) whose DNS name is the node's name.
    Issue {
        /// The node's name.
        #[arg(required_unless_present = "all")]
        node: Option<String>,
        /// Issue one for every node in --config.
        #[arg(long, requires = "config", conflicts_with = "node")]
        all: bool,
        /// The directory holding the CA (default: the config's certs directory).
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        /// The cluster config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Lifetime in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Start of validity (RFC 3339), default five minutes ago.
        #[arg(long)]
        not_before: Option<String>,
    },
    /// Print a certificate's subject, names, issuer, validity and fingerprint.
    Show {
        /// A PEM certificate.
        file: PathBuf,
    },
}

/// Parses the arguments, runs the command, and turns any error into one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    logging::init(format);
    let result = match cli.command {
        Command::Node(args) => commands::node::run(args),
        Command::Up(args) => commands::up::run(args),
        Command::Ctl(args) => commands::ctl::run(args),
        Command::Check(args) => commands::check::run(args),
        Command::Certs(args) => commands::certs::run(args),
        Command::Passwd(args) => commands::passwd::run(args),
        Command::Plan(args) => commands::plan::run(args),
        Command::Export(args) => commands::export::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
