//! `colony certs init | issue | show`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use colony_certs::{IssueOptions, describe, init_ca, issue_node_cert};
use colony_config::{ClusterConfig, FileChecks};

use crate::cli::{CertsArgs, CertsCommand};

fn load_config(path: &Path) -> anyhow::Result<ClusterConfig> {
    ClusterConfig::load(path, FileChecks::Skip).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `colony certs`.
pub fn run(args: CertsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CertsCommand::Init {
            dir,
            config,
            cluster,
            force,
        } => {
            let (dir, cluster) = match (dir, config) {
                (Some(dir), Some(c)) => (dir, load_config(&c)?.cluster.name),
                (Some(dir), None) => (dir, cluster),
                (None, Some(c)) => {
                    let c = load_config(&c)?;
                    (c.certs_dir(), c.cluster.name)
                }
                (None, None) => bail!("give --dir or --config"),
            };
            let files = init_ca(&dir, &cluster, force)?;
            println!(
                "created cluster CA {} (key {})",
                files.cert.display(),
                files.key.display()
            );
        }
        CertsCommand::Issue {
            node,
            all,
            dir,
            config,
            days,
            not_before,
        } => {
            let not_before = match not_before {
                Some(s) => Some(
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("--not-before '{s}' is not an RFC 3339 time"))?,
                ),
                None => None,
            };
            let opts = IssueOptions { days, not_before };
            let config = config.as_deref().map(load_config).transpose()?;
            let dir: PathBuf = match (dir, &config) {
                (Some(d), _) => d,
                (None, Some(c)) => c.certs_dir(),
                (None, None) => bail!("give --dir or --config"),
            };
            let nodes: Vec<String> = match (node, all, &config) {
                (_, true, Some(c)) => c.nodes.iter().map(|n| n.name.clone()).collect(),
                (Some(n), false, _) => vec![n],
                _ => bail!("name a node, or pass --all with --config"),
            };
            for node in nodes {
                let files = issue_node_cert(&dir, &node, &opts)?;
                println!(
                    "issued {} for node {node} (key {})",
                    files.cert.display(),
                    files.key.display()
                );
            }
        }
        CertsCommand::Show { file } => {
            println!("{}", describe(&file)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
