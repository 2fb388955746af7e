//! `colony node --config CONFIG --name NODE`: run one node until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use colony_certs::NodeIdentity;
use colony_cluster::{Cluster, ClusterSettings};
use colony_config::FileChecks;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument, info, info_span, warn};

use crate::cli::NodeArgs;
use crate::control::server;
use crate::node::{Node, system};
use crate::reload::node::START_TIMEOUT;
use crate::supervision::supervisor;

/// Runs `colony node`.
pub fn run(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let config =
        crate::config_load::load(&args.config, args.state_dir.as_deref(), FileChecks::Check)
            .map_err(|e| anyhow!("{e}"))?;
    let node_config = config
        .node(&args.name)
        .ok_or_else(|| {
            anyhow!(
                "{}: no node named '{}' in the config",
                args.config.display(),
                args.name
            )
        })?
        .clone();
    let (cert, key) = config.node_cert_paths(&node_config);
    let identity = NodeIdentity::load(&config.ca_path(), &cert, &key)
        .with_context(|| format!("node {}", args.name))?;
    let settings = ClusterSettings::from_config(&config, &args.name)
        .ok_or_else(|| anyhow!("no node {}", args.name))?;
    let socket = config.control_socket(&node_config);
    let data_dir = config.node_data_dir(&args.name);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let span = info_span!("node", node = %args.name);
    runtime.block_on(
        async move {
            let started = Instant::now();
            let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
            let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
            let cluster = Cluster::start(settings, identity).await.with_context(|| format!("node {}", args.name))?;
            let listener = server::bind(&socket).await.map_err(|e| anyhow!("node {}: {e}", args.name))?;
            let metrics = match node_config.metrics {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow!("node {}: cannot bind metrics on {addr}: {e}", args.name))?,
                ),
                None => None,
            };
            std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
            let config = Arc::new(config);
            let (supervisor, starts) = supervisor::start(cluster.clone(), config.clone(), &args.name, data_dir);
            for (actor, started) in starts {
                let outcome = tokio::time::timeout(START_TIMEOUT, started).await;
                let failure = match outcome {
                    Ok(Ok(Ok(()))) => continue,
                    Ok(Ok(Err(reason))) => reason,
                    Ok(Err(_)) => "stopped before it started".to_owned(),
                    Err(_) => format!("did not start within {START_TIMEOUT:?}"),
                };
                supervisor.shutdown().await;
                let _ = std::fs::remove_file(&socket);
                cluster.shutdown().await;
                return Err(anyhow!("node {}: actor {}/{actor} failed to start: {failure}", args.name, args.name));
            }
            let node = Arc::new(Node {
                name: args.name.clone(),
                cluster: cluster.clone(),
                config: std::sync::RwLock::new(config.clone()),
                config_path: args.config.clone(),
                state_dir_override: args.state_dir.as_deref().map(std::path::absolute).transpose()?,
                reload_lock: tokio::sync::Mutex::new(()),
                supervisor: supervisor.clone(),
                started,
                socket: socket.clone(),
            });
            tokio::spawn(system::serve(node.clone()).in_current_span());
            tokio::spawn(server::serve(listener, node.clone()).in_current_span());
            if let Some(metrics) = metrics {
                tokio::spawn(crate::metrics::serve(metrics, node.clone()).in_current_span());
            }
            // Tells systemd (Type=notify) the node is up; does nothing outside systemd.
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            info!(
                actors = config.actors_on(&args.name).count(),
                listen = ?node_config.listen.map(|a| a.to_string()),
                control = %socket.display(),
                "node up in {} ms",
                started.elapsed().as_millis()
            );
            let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
            loop {
                tokio::select! {
                    _ = terminate.recv() => { info!("SIGTERM: stopping"); break }
                    _ = interrupt.recv() => { info!("SIGINT: stopping"); break }
                    _ = hangup.recv() => {
                        info!("SIGHUP: reloading {}", args.config.display());
                        match node.reload_from_file().await {
                            Ok(report) => info!(outcome = ?report.outcome, errors = ?report.errors, "reload finished"),
                            Err(e) => warn!("reload refused: {e}"),
                        }
                    }
                }
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            supervisor.shutdown().await;
            let _ = std::fs::remove_file(&socket);
            cluster.shutdown().await;
            info!("stopped");
            Ok::<_, anyhow::Error>(())
        }
        .instrument(span),
    )?;
    Ok(ExitCode::SUCCESS)
}
