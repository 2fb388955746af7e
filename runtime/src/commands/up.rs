//! Placeholder until the `up` command lands.

/// Runs `colony up`.
pub fn run(_args: crate::cli::UpArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("colony up is being written")
}
