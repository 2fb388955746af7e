//! Loading a cluster config the way every subcommand does: validated, with the kinds this build
//! can run, and with `--state-dir` applied.

use std::path::Path;

use colony_config::{ClusterConfig, FileChecks};

/// Loads and validates `path`; `state_dir` (from the command line) overrides the config's.
pub fn load(
    path: &Path,
    state_dir: Option<&Path>,
    checks: FileChecks,
) -> Result<ClusterConfig, String> {
    let mut config = crate::commands::check::load_runnable(path, checks)?;
    if let Some(dir) = state_dir {
        let dir = std::path::absolute(dir)
            .map_err(|e| format!("state directory {}: {e}", dir.display()))?;
        config.cluster.state_dir = Some(dir);
    }
    Ok(config)
}
