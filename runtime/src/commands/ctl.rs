//! Placeholder until the `ctl` command lands.

/// Runs `colony ctl`.
pub fn run(_args: crate::cli::CtlArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("colony ctl is being written")
}
