//! `colony passwd`: prints the argon2 hash of an MQTT password, for a broker's `users` in the
//! cluster config. The password comes from `--password` or the first line of stdin, so it need
//! not appear in the shell's history; the hash is salted, so each run prints a different one.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, bail};

/// Arguments of `colony passwd`.
#[derive(Debug, clap::Args)]
pub struct PasswdArgs {
    /// The password (read from the first line of stdin when absent).
    #[arg(long)]
    pub password: Option<String>,
}

/// Reads the password and prints its hash.
pub fn run(args: PasswdArgs) -> anyhow::Result<ExitCode> {
    let password = match args.password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    let hash = colony_actors::broker::hash_password(&password)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}
