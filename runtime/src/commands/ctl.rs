//! `colony ctl`: one request to a running node's control socket, its answer printed as tables
//! (or JSON with `--json`).
//!
//! The socket is `--socket`, or the one the config gives `--node`. Any node answers for the whole
//! cluster, so `status` and `tree` show every node, including the ones that cannot be reached.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use colony_config::FileChecks;

use crate::cli::{ControlSocketArgs, CtlArgs, CtlCommand};
use crate::control::client;
use crate::control::protocol::{ClusterStatus, Request};
use crate::reload::node::{ConfigSource, NodeReport, Outcome, ReloadReport};
use crate::render::{render_status, render_tree};

/// How long a request may take, unless it is a call with its own timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// What a call's client waits beyond the call's own timeout, for the node to report it.
const CALL_MARGIN: Duration = Duration::from_secs(2);
/// How long a reload or reconfigure may take across the cluster.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `colony ctl`.
pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let socket = args.target.path()?;
    let (request, timeout) = to_request(&args.command)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let value = runtime.block_on(client::request(&socket, request, timeout))?;
    println!(
        "{}",
        render(&args.command, value.clone(), args.json)?.trim_end()
    );
    if let CtlCommand::Reload { .. } = args.command {
        let report: ReloadReport = serde_json::from_value(value)
            .context("the reload report does not have the expected shape")?;
        if !report.succeeded() {
            eprintln!("error: the reload was not applied everywhere");
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl ControlSocketArgs {
    /// The control socket: `--socket`, or the one the config gives `--node`.
    pub(crate) fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let (Some(path), Some(node)) = (self.config.as_deref(), self.node.as_deref()) else {
            bail!("give the node's control socket with --socket, or --config and --node");
        };
        let config = crate::config_load::load(path, self.state_dir.as_deref(), FileChecks::Skip)
            .map_err(|e| anyhow!("{e}"))?;
        let node_config = config.node(node).ok_or_else(|| {
            let names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow!(
                "{}: no node named '{node}' in the config (its nodes: {})",
                path.display(),
                names.join(", ")
            )
        })?;
        Ok(config.control_socket(node_config))
    }
}

/// The protocol request for a command, and how long to wait for its answer.
fn to_request(command: &CtlCommand) -> anyhow::Result<(Request, Duration)> {
    let message = |text: &str| -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(text).map_err(|e| anyhow!("message is not JSON: {e}: {text}"))
    };
    let request = match command.clone() {
        CtlCommand::Status => Request::Status,
        CtlCommand::Tree => Request::Tree,
        CtlCommand::Send {
            address,
            message: text,
        } => Request::Send {
            address,
            message: message(&text)?,
        },
        CtlCommand::Call {
            address,
            message: text,
            timeout_ms,
        } => {
            let timeout = timeout_ms.map_or(REQUEST_TIMEOUT, |ms| {
                Duration::from_millis(ms) + CALL_MARGIN
            });
            return Ok((
                Request::Call {
                    address,
                    message: message(&text)?,
                    timeout_ms,
                },
                timeout,
            ));
        }
        CtlCommand::Restart { address } => Request::Restart { address },
        CtlCommand::Stop { address } => Request::Stop { address },
        CtlCommand::Start { address } => Request::Start { address },
        CtlCommand::Kill { address } => Request::Kill { address },
        CtlCommand::Reload { config, dry_run } => {
            let source = ConfigSource::read(&config).map_err(|e| anyhow!(e))?;
            return Ok((Request::Reload { source, dry_run }, RELOAD_TIMEOUT));
        }
        CtlCommand::Reconfigure { address, settings } => {
            let settings = serde_json::from_str(&settings)
                .map_err(|e| anyhow!("settings are not JSON: {e}: {settings}"))?;
            return Ok((Request::Reconfigure { address, settings }, RELOAD_TIMEOUT));
        }
    };
    Ok((request, REQUEST_TIMEOUT))
}

/// What to print for the node's answer `value` to `command`.
fn render(command: &CtlCommand, value: serde_json::Value, json: bool) -> anyhow::Result<String> {
    if json {
        return Ok(pretty(&value));
    }
    let status = |value: serde_json::Value| -> anyhow::Result<ClusterStatus> {
        serde_json::from_value(value).context("the node's status does not have the expected shape")
    };
    Ok(match command {
        CtlCommand::Status => render_status(&status(value)?),
        CtlCommand::Tree => render_tree(&status(value)?),
        CtlCommand::Call { .. } => match value {
            serde_json::Value::Object(mut fields) if fields.contains_key("reply") => {
                pretty(&fields.remove("reply").unwrap_or_default())
            }
            other => pretty(&other),
        },
        CtlCommand::Send { address, .. } => format!("sent to {address}"),
        CtlCommand::Restart { address } => format!("restarted {address}"),
        CtlCommand::Stop { address } => format!("stopped {address}"),
        CtlCommand::Start { address } => format!("started {address}"),
        CtlCommand::Kill { address } => format!("killed {address}"),
        CtlCommand::Reload { .. } => {
            let report: ReloadReport = serde_json::from_value(value)
                .context("the reload report does not have the expected shape")?;
            report
                .nodes
                .iter()
                .map(render_node_report)
                .collect::<Vec<_>>()
                .join("\n")
        }
        CtlCommand::Reconfigure { .. } => {
            let report: NodeReport = serde_json::from_value(value)
                .context("the report does not have the expected shape")?;
            render_node_report(&report)
        }
    })
}

/// One node's part of a reload, as lines.
fn render_node_report(report: &NodeReport) -> String {
    let outcome = match report.outcome {
        Outcome::Applied => "applied",
        Outcome::NoChange => "no change",
        Outcome::DryRun => "plan (dry run, nothing applied)",
        Outcome::RolledBack => "FAILED, rolled back to the previous config",
        Outcome::NotReloaded => "NOT RELOADED",
    };
    let mut out = format!("{}: {outcome}\n", report.node);
    let p = &report.plan;
    for (label, items) in [
        ("start", &p.start),
        ("stop", &p.stop),
        ("change in place", &p.change_in_place),
        ("restart", &p.restart),
        ("untouched", &p.untouched),
        ("node (live)", &p.node),
        ("needs node restart", &p.needs_node_restart),
        ("error", &report.errors),
    ] {
        if !items.is_empty() {
            out.push_str(&format!("  {label:<19} {}\n", items.join("; ")));
        }
    }
    out
}

fn pretty(value: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail; `to_string` is the fallback all the same.
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(
        socket: Option<&str>,
        config: Option<PathBuf>,
        node: Option<&str>,
    ) -> ControlSocketArgs {
        ControlSocketArgs {
            socket: socket.map(PathBuf::from),
            config,
            node: node.map(str::to_owned),
            state_dir: None,
        }
    }

    fn write_config(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("cluster.toml");
        std::fs::write(
            &path,
            "[cluster]\nname = \"demo\"\n\n[[node]]\nname = \"core\"\nlisten = \"127.0.0.1:7101\"\n\n\
             [[node]]\nname = \"edge\"\nlisten = \"127.0.0.1:7102\"\ncontrol_socket = \"/run/edge.sock\"\n",
        )
        .unwrap();
        path
    }

    #[test]
    fn the_socket_comes_from_the_flag_or_the_config() {
        assert_eq!(
            args(Some("/x/control.sock"), None, None).path().unwrap(),
            PathBuf::from("/x/control.sock")
        );

        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path());
        let core = args(None, Some(config.clone()), Some("core"))
            .path()
            .unwrap();
        assert!(
            core.ends_with(".colony/demo/core/control.sock"),
            "{}",
            core.display()
        );
        assert!(core.starts_with(dir.path()), "{}", core.display());
        let edge = args(None, Some(config.clone()), Some("edge"))
            .path()
            .unwrap();
        assert_eq!(edge, PathBuf::from("/run/edge.sock"));

        let mut with_state = args(None, Some(config.clone()), Some("core"));
        with_state.state_dir = Some(dir.path().join("elsewhere"));
        assert_eq!(
            with_state.path().unwrap(),
            dir.path().join("elsewhere/core/control.sock")
        );
    }

    #[test]
    fn socket_resolution_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path());
        let err = args(None, Some(config), Some("nowhere"))
            .path()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no node named 'nowhere'") && err.contains("core, edge"),
            "{err}"
        );

        let err = args(None, Some(dir.path().join("missing.toml")), Some("core"))
            .path()
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");

        let err = args(None, None, None).path().unwrap_err().to_string();
        assert!(err.contains("--socket"), "{err}");
    }

    #[test]
    fn messages_must_be_json() {
        let send = CtlCommand::Send {
            address: "a/b".into(),
            message: "{status".into(),
        };
        let err = to_request(&send).unwrap_err().to_string();
        assert!(err.starts_with("message is not JSON: "), "{err}");

        let call = CtlCommand::Call {
            address: "a/b".into(),
            message: r#"{"status":{}}"#.into(),
            timeout_ms: Some(500),
        };
        let (request, timeout) = to_request(&call).unwrap();
        assert_eq!(timeout, Duration::from_millis(2500));
        assert_eq!(
            request,
            Request::Call {
                address: "a/b".into(),
                message: serde_json::json!({"status": {}}),
                timeout_ms: Some(500)
            }
        );
        let (_, timeout) = to_request(&CtlCommand::Kill {
            address: "a/b".into(),
        })
        .unwrap();
        assert_eq!(timeout, REQUEST_TIMEOUT);
    }

    #[test]
    fn answers_print_as_tables_lines_or_json() {
        let kill = CtlCommand::Kill {
            address: "edge-1/lb".into(),
        };
        assert_eq!(
            render(&kill, serde_json::Value::Null, false).unwrap(),
            "killed edge-1/lb"
        );
        assert_eq!(
            render(&kill, serde_json::Value::Null, true).unwrap(),
            "null"
        );

        let call = CtlCommand::Call {
            address: "a/b".into(),
            message: "{}".into(),
            timeout_ms: None,
        };
        let reply = serde_json::json!({"reply": {"load": 3}});
        assert_eq!(
            render(&call, reply.clone(), false).unwrap(),
            "{\n  \"load\": 3\n}"
        );
        assert!(render(&call, reply, true).unwrap().contains("\"reply\""));

        let status = serde_json::json!({"answered_by": "core", "nodes": [
            {"node": "core", "reachable": false, "error": "gone", "status": null}
        ]});
        assert!(
            render(&CtlCommand::Status, status.clone(), false)
                .unwrap()
                .contains("unreachable")
        );
        assert_eq!(
            render(&CtlCommand::Tree, status, false).unwrap(),
            "core (unreachable: gone)\n"
        );
        let err = render(&CtlCommand::Status, serde_json::json!(3), false).unwrap_err();
        assert!(err.to_string().contains("expected shape"), "{err}");
    }
}
