//! `colony check CONFIG`: validate a config, print every error or a one-line summary.

use std::collections::BTreeMap;
use std::process::ExitCode;

use colony_config::{ClusterConfig, FileChecks};

use crate::cli::CheckArgs;

/// Loads and validates a config as `colony node` will, plus the kinds this build can host.
pub fn load_runnable(path: &std::path::Path, checks: FileChecks) -> Result<ClusterConfig, String> {
    let config = ClusterConfig::load(path, checks).map_err(|e| e.to_string())?;
    runnable(&config, &path.display().to_string())?;
    Ok(config)
}

/// An error naming every actor of `config` whose kind this build cannot run.
pub fn runnable(config: &ClusterConfig, file: &str) -> Result<(), String> {
    let unavailable: Vec<String> = config
        .actors
        .iter()
        .filter(|a| !colony_actors::is_available(a.kind()))
        .map(|a| {
            format!(
                "{file}: actor {} is a {}, which this build cannot run yet",
                a.address(),
                a.kind()
            )
        })
        .collect();
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(unavailable.join("\n"))
    }
}

/// Runs `colony check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    match load_runnable(&args.config, FileChecks::Check) {
        Ok(config) => {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for a in &config.actors {
                *kinds.entry(a.kind().as_str()).or_default() += 1;
            }
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            println!(
                "{}: ok: cluster '{}', {} node{}, {} actor{} ({})",
                args.config.display(),
                config.cluster.name,
                config.nodes.len(),
                if config.nodes.len() == 1 { "" } else { "s" },
                config.actors.len(),
                if config.actors.len() == 1 { "" } else { "s" },
                if kinds.is_empty() {
                    "none".to_owned()
                } else {
                    kinds.join(", ")
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            println!("{errors}");
            let n = errors.lines().count();
            eprintln!(
                "{}: {n} error{}",
                args.config.display(),
                if n == 1 { "" } else { "s" }
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
