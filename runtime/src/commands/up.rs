//! `colony up CONFIG`: run every node of a cluster on this machine and watch it.
//!
//! In order: load the config; create the state directory (mode 0700) and, where they are missing
//! at their default paths, a development CA and node certificates; start one `colony node`
//! process per node, each logging to `<state>/<node>/node.log`; wait until the cluster is healthy
//! — every node answers on its control socket, sees every other node, every link is up or relayed
//! and every actor runs — and print how long that took; then show the status table every
//! `--interval` seconds until SIGINT, SIGTERM or SIGHUP, which stop every node (SIGTERM, then
//! SIGKILL after 10 s).
//!
//! `up` never leaves a node behind: whichever way it ends — a node that fails to start, a
//! timeout, an error, a panic — it stops the nodes it started, and on Linux each node also gets
//! SIGTERM if `up` itself is killed.

mod fleet;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use colony_certs::{IssueOptions, init_ca, issue_node_cert};
use colony_cluster::LinkState;
use colony_config::{ClusterConfig, FileChecks};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::cli::UpArgs;
use crate::control::client;
use crate::control::protocol::{ClusterStatus, Request};
use crate::render::render_status;
use fleet::Fleet;

/// How often `up` asks the nodes whether the cluster is healthy yet.
const POLL: Duration = Duration::from_millis(200);
/// How long one status request may take (a node waits up to a second for its peers).
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `colony up`.
pub fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let config_path = std::path::absolute(&args.config)
        .with_context(|| format!("config {}", args.config.display()))?;
    let config =
        crate::config_load::load(&config_path, args.state_dir.as_deref(), FileChecks::Skip)
            .map_err(|e| anyhow!("{e}"))?;
    let state_dir = std::path::absolute(config.state_dir()).context("state directory")?;
    fleet::create_private_dir(&state_dir)?;
    ensure_dev_certs(&config)?;
    let exe =
        std::env::current_exe().context("cannot find the colony binary to start nodes with")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut signals = Signals::new()?;
        let mut fleet = Fleet::default();
        let started = Instant::now();
        for node in &config.nodes {
            let process = fleet.spawn(&exe, &config_path, &state_dir, &node.name)?;
            let (pid, log) = (process.pid, process.log.display());
            println!("started node {} (pid {pid}, log {log})", node.name);
        }
        let sockets: Vec<(String, PathBuf)> = config
            .nodes
            .iter()
            .map(|n| (n.name.clone(), config.control_socket(n)))
            .collect();
        let timeout = Duration::from_secs(args.timeout);
        let status = tokio::select! {
            biased;
            signal = signals.recv() => return stop(&mut fleet, signal).await,
            up = wait_until_healthy(&config, &sockets, &mut fleet, started, timeout) => up?,
        };
        println!(
            "cluster {} is up in {} ms",
            config.cluster.name,
            started.elapsed().as_millis()
        );
        print_status(Ok(status));
        watch(&sockets, &mut fleet, &mut signals, args.interval).await
    })
}

/// Creates the development CA and node certificates that are missing at their default paths.
fn ensure_dev_certs(config: &ClusterConfig) -> anyhow::Result<()> {
    let dir = config.certs_dir();
    let ca = config.ca_path();
    if !ca.exists() {
        if ca != dir.join("ca.pem") {
            bail!(
                "the cluster CA {} does not exist (colony up creates development certificates only at the default paths)",
                ca.display()
            );
        }
        let files = init_ca(&dir, &config.cluster.name, false)
            .with_context(|| format!("cannot create a development CA in {}", dir.display()))?;
        println!(
            "created development CA {} (key {})",
            files.cert.display(),
            files.key.display()
        );
    }
    for node in &config.nodes {
        let (cert, key) = config.node_cert_paths(node);
        let Some(missing) = [&cert, &key].into_iter().find(|p| !p.exists()) else {
            continue;
        };
        let defaults = cert == dir.join(format!("{}.pem", node.name))
            && key == dir.join(format!("{}.key", node.name));
        if !defaults {
            bail!(
                "node {}'s {} {} does not exist (colony up creates development certificates only at the default paths)",
                node.name,
                if *missing == cert {
                    "certificate"
                } else {
                    "key"
                },
                missing.display()
            );
        }
        let files =
            issue_node_cert(&dir, &node.name, &IssueOptions::default()).with_context(|| {
                format!(
                    "cannot issue a development certificate for node {}",
                    node.name
                )
            })?;
        println!(
            "issued {} for node {} (key {})",
            files.cert.display(),
            node.name,
            files.key.display()
        );
    }
    Ok(())
}

/// Polls every node until the cluster is healthy; fails when a node exits or `timeout` passes.
async fn wait_until_healthy(
    config: &ClusterConfig,
    sockets: &[(String, PathBuf)],
    fleet: &mut Fleet,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<ClusterStatus> {
    let deadline = started + timeout;
    loop {
        if let Some(i) = fleet.reap().into_iter().next() {
            let node = &fleet.nodes[i];
            let what = format!(
                "node {} (pid {}) exited ({}) before the cluster was up; the end of its log {}:\n{}",
                node.name,
                node.pid,
                node.exit
                    .map_or_else(|| "unknown status".to_owned(), |s| s.to_string()),
                node.log.display(),
                fleet::log_tail(&node.log, 20)
            );
            fleet.stop().await;
            bail!(what);
        }
        let answers = futures::future::join_all(
            sockets
                .iter()
                .map(|(_, socket)| client::request(socket, Request::Status, STATUS_TIMEOUT)),
        )
        .await;
        let mut problems = BTreeSet::new();
        let mut first = None;
        for ((name, _), answer) in sockets.iter().zip(answers) {
            match answer
                .and_then(|v| serde_json::from_value::<ClusterStatus>(v).map_err(Into::into))
            {
                Ok(status) => {
                    problems.extend(health_problems(&status));
                    first.get_or_insert(status);
                }
                Err(e) => {
                    problems.insert(format!("node {name} does not answer: {e:#}"));
                }
            }
        }
        if problems.is_empty()
            && let Some(status) = first
        {
            return Ok(status);
        }
        if Instant::now() + POLL > deadline {
            if let Some(status) = &first {
                println!("\n{}", render_status(status).trim_end());
            }
            fleet.stop().await;
            let problems: Vec<String> = problems.into_iter().collect();
            bail!(
                "cluster {} is not healthy after {} s (--timeout); what is not:\n  {}",
                config.cluster.name,
                timeout.as_secs(),
                problems.join("\n  ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What keeps `status` (one node's view of the cluster) from being healthy; empty when healthy.
fn health_problems(status: &ClusterStatus) -> Vec<String> {
    let mut problems = Vec::new();
    for n in &status.nodes {
        let Some(s) = n.status.as_ref().filter(|_| n.reachable) else {
            problems.push(format!(
                "node {} is unreachable from {}: {}",
                n.node,
                status.answered_by,
                n.error.as_deref().unwrap_or("no report")
            ));
            continue;
        };
        for l in s.links.iter().filter(|l| l.state == LinkState::Down) {
            problems.push(format!("link {} → {} is down", n.node, l.peer));
        }
        for a in s.actors.iter().filter(|a| a.state != "running") {
            problems.push(format!("actor {} is {}", a.address, a.state));
        }
    }
    problems
}

/// Shows the status every `interval` seconds (once for 0) and reports nodes that exit, until a
/// signal stops the cluster.
async fn watch(
    sockets: &[(String, PathBuf)],
    fleet: &mut Fleet,
    signals: &mut Signals,
    interval: u64,
) -> anyhow::Result<ExitCode> {
    let interval = (interval > 0).then(|| Duration::from_secs(interval));
    let mut next_status = interval.map(|i| tokio::time::Instant::now() + i);
    loop {
        let show = async {
            match next_status {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    true
                }
                None => std::future::pending().await,
            }
        };
        let show = tokio::select! {
            biased;
            signal = signals.recv() => return stop(fleet, signal).await,
            _ = tokio::time::sleep(POLL) => false,
            show = show => show,
        };
        for i in fleet.reap() {
            let node = &fleet.nodes[i];
            println!(
                "node {} (pid {}) exited ({}); its log: {}",
                node.name,
                node.pid,
                node.exit
                    .map_or_else(|| "unknown status".to_owned(), |s| s.to_string()),
                node.log.display()
            );
        }
        if fleet.running().next().is_none() {
            bail!("every node has exited");
        }
        if show {
            let alive: Vec<&Path> = sockets
                .iter()
                .filter(|(name, _)| fleet.running().any(|n| &n.name == name))
                .map(|(_, socket)| socket.as_path())
                .collect();
            let status = tokio::select! {
                biased;
                signal = signals.recv() => return stop(fleet, signal).await,
                status = first_answer(&alive) => status,
            };
            print_status(status);
            next_status = interval.map(|i| tokio::time::Instant::now() + i);
        }
    }
}

/// The cluster status from the first of `sockets` that answers.
async fn first_answer(sockets: &[&Path]) -> anyhow::Result<ClusterStatus> {
    let mut errors = Vec::new();
    for socket in sockets {
        match client::request(socket, Request::Status, STATUS_TIMEOUT).await {
            Ok(value) => {
                return serde_json::from_value(value)
                    .context("the node's status does not have the expected shape");
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    Err(anyhow!("no node answers: {}", errors.join("; ")))
}

/// A blank line, the time, and the status table (or why there is none).
fn print_status(status: anyhow::Result<ClusterStatus>) {
    let stamp = fleet::utc_now();
    match status {
        Ok(status) => println!("\n{stamp}\n{}", render_status(&status).trim_end()),
        Err(e) => println!("\n{stamp}\n{e:#}"),
    }
}

/// Stops every node after `signal` and ends `up` successfully.
async fn stop(fleet: &mut Fleet, signal: &str) -> anyhow::Result<ExitCode> {
    println!("{signal}: stopping every node");
    fleet.stop().await;
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The signals that stop the cluster.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        let watch = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot watch {name}"))
        };
        Ok(Signals {
            interrupt: watch(SignalKind::interrupt(), "SIGINT")?,
            terminate: watch(SignalKind::terminate(), "SIGTERM")?,
            hangup: watch(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ActorStatus, NodeEntry, NodeStatus, SupervisorStatus};
    use colony_cluster::LinkStats;

    fn node(name: &str, link: LinkState, actor_state: &str) -> NodeEntry {
        let peer = if name == "core" { "edge" } else { "core" };
        NodeEntry {
            node: name.to_owned(),
            reachable: true,
            error: None,
            status: Some(NodeStatus {
                node: name.to_owned(),
                pid: 1,
                uptime_ms: 1,
                supervisor: SupervisorStatus {
                    strategy: "one_for_one".into(),
                    max_restarts: 5,
                    within_secs: 10,
                    restarts_in_window: 0,
                    given_up: false,
                },
                links: vec![LinkStats {
                    peer: peer.to_owned(),
                    state: link,
                    since_unix_ms: 0,
                    via: None,
                    remote_addr: None,
                    rtt_us: 0,
                    packets_sent: 0,
                    packets_lost: 0,
                    bytes_out: 0,
                    bytes_in: 0,
                    messages_out: 0,
                    messages_in: 0,
                    frames_rejected: 0,
                    datagrams_dropped: 0,
                    refused_handshakes: 0,
                    last_error: None,
                }],
                actors: vec![ActorStatus {
                    address: format!("{name}/lb"),
                    kind: "balancer".into(),
                    state: actor_state.to_owned(),
                    restart: "permanent".into(),
                    restarts: 0,
                    last_error: None,
                    last_error_ago_ms: None,
                    uptime_ms: Some(1),
                    mailbox_depth: 0,
                    mailbox_capacity: 16,
                    messages_handled: 0,
                    messages_rejected: 0,
                    messages_per_sec: 0,
                    settings_source: "config".into(),
                    settings: serde_json::Value::Null,
                    detail: serde_json::Value::Null,
                }],
            }),
        }
    }

    fn cluster(nodes: Vec<NodeEntry>) -> ClusterStatus {
        ClusterStatus {
            answered_by: "core".into(),
            nodes,
        }
    }

    #[test]
    fn healthy_means_reachable_linked_and_running() {
        let ok = cluster(vec![
            node("core", LinkState::Up, "running"),
            node("edge", LinkState::Relayed, "running"),
        ]);
        assert!(health_problems(&ok).is_empty());

        let bad = cluster(vec![
            node("core", LinkState::Down, "running"),
            node("edge", LinkState::Up, "restarting"),
            NodeEntry {
                node: "far".into(),
                reachable: false,
                error: Some("timed out".into()),
                status: None,
            },
        ]);
        assert_eq!(
            health_problems(&bad),
            [
                "link core → edge is down",
                "actor edge/lb is restarting",
                "node far is unreachable from core: timed out"
            ]
        );
    }

    fn config_in(dir: &Path, extra: &str) -> ClusterConfig {
        let path = dir.join("cluster.toml");
        let text = format!(
            "[cluster]\nname = \"devtest\"\n\n[[node]]\nname = \"core\"\nlisten = \"127.0.0.1:7101\"\n{extra}\n\
             [[node]]\nname = \"edge\"\nlisten = \"127.0.0.1:7102\"\n"
        );
        std::fs::write(&path, text).unwrap();
        crate::config_load::load(&path, None, FileChecks::Skip).unwrap()
    }

    #[test]
    fn dev_certificates_are_created_once_at_default_paths() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), "");
        ensure_dev_certs(&config).unwrap();
        assert!(config.ca_path().exists());
        let core = config.node_cert_paths(config.node("core").unwrap());
        let before = std::fs::read(&core.0).unwrap();
        ensure_dev_certs(&config).unwrap();
        assert_eq!(
            std::fs::read(&core.0).unwrap(),
            before,
            "existing certificates are kept"
        );
        std::fs::remove_file(&core.1).unwrap();
        ensure_dev_certs(&config).unwrap();
        assert!(core.1.exists(), "a missing key is issued again");
    }

    #[test]
    fn a_missing_certificate_at_a_chosen_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(
            dir.path(),
            "cert = \"pki/core.pem\"\nkey = \"pki/core.key\"\n",
        );
        let err = ensure_dev_certs(&config).unwrap_err().to_string();
        assert!(
            err.contains("node core's certificate") && err.contains("pki/core.pem"),
            "{err}"
        );
    }
}
