//! `colony export`: a collector's readings as CSV, written on the machine the command runs on (a
//! file or stdout), from a collector on any node of the cluster.
//!
//! The readings come in pages (the collector's `export_page` message) through the control socket
//! of any node, which forwards each call over the cluster; the export covers what was stored when
//! it began, so a collector that keeps ingesting does not make it run for ever. A file is written
//! beside its final name and renamed when complete: a failed export leaves no partial CSV.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use colony_actors::collector::ExportPageReply;
use colony_config::Address;

use crate::cli::ControlSocketArgs;
use crate::control::client;
use crate::control::protocol::Request;

/// Arguments of `colony export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The collector, `node/actor`.
    pub address: String,
    /// The node to ask (any node of the cluster will do).
    #[command(flatten)]
    pub target: ControlSocketArgs,
    /// Write the CSV to this file (stdout when absent or `-`).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Only readings of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only readings received at or after this time: Unix milliseconds, RFC 3339
    /// (`2026-11-21T10:00:00Z`), or an age such as `90s`, `15m`, `2h`, `1d` (that long ago).
    #[arg(long)]
    pub since: Option<String>,
    /// Only readings received before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// How long to wait for each page, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// Runs `colony export`.
pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let address: Address = args.address.parse().map_err(|e| {
        anyhow!(
            "'{}' is not an actor address (node/actor): {e}",
            args.address
        )
    })?;
    let now = unix_ms_now();
    let from_ms = args
        .since
        .as_deref()
        .map(|t| parse_time(t, now).with_context(|| format!("--since {t}")))
        .transpose()?;
    let to_ms = args
        .until
        .as_deref()
        .map(|t| parse_time(t, now).with_context(|| format!("--until {t}")))
        .transpose()?;
    if let (Some(from), Some(to)) = (from_ms, to_ms)
        && from >= to
    {
        bail!("--since ({from} ms) must be before --until ({to} ms)");
    }
    let socket = args.target.path()?;
    let to_file = args.output.as_deref().filter(|p| *p != Path::new("-"));
    let mut sink = Sink::open(to_file)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let page = |after_id: Option<i64>, upto_id: Option<i64>| {
        let message = serde_json::json!({ "export_page": {
            "source": args.source, "from_ms": from_ms, "to_ms": to_ms,
            "after_id": after_id, "upto_id": upto_id,
        }});
        let request = Request::Call {
            address: address.to_string(),
            message,
            timeout_ms: Some(args.timeout_ms),
        };
        let timeout = Duration::from_millis(args.timeout_ms) + Duration::from_secs(2);
        let answer = runtime
            .block_on(client::request(&socket, request, timeout))
            .with_context(|| format!("export from {address}"))?;
        let reply = answer.get("reply").cloned().unwrap_or_default();
        serde_json::from_value::<ExportPageReply>(reply)
            .map_err(|e| anyhow!("{address} did not answer like a collector: {e}"))
    };
    let first = page(None, None)?;
    sink.write(format!("{}\n", first.header).as_bytes())?;
    let upto = first.upto_id;
    let mut rows = 0u64;
    let mut current = first;
    loop {
        sink.write(current.csv.as_bytes())?;
        rows += current.rows;
        match current.last_id {
            Some(last) if !current.done && current.rows > 0 => {
                current = page(Some(last), Some(upto))?;
            }
            _ => break,
        }
    }
    let place = sink.finish()?;
    eprintln!("{rows} readings from {address} written to {place}");
    Ok(ExitCode::SUCCESS)
}

/// Where the CSV goes: stdout, or a temporary file renamed into place at the end.
enum Sink {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File {
        out: std::io::BufWriter<std::fs::File>,
        tmp: PathBuf,
        path: PathBuf,
    },
}

impl Sink {
    fn open(path: Option<&Path>) -> anyhow::Result<Sink> {
        let Some(path) = path else {
            return Ok(Sink::Stdout(std::io::BufWriter::new(std::io::stdout())));
        };
        if path.is_dir() {
            bail!("--output {} is a directory", path.display());
        }
        let mut name = path
            .file_name()
            .ok_or_else(|| anyhow!("--output {} names no file", path.display()))?
            .to_os_string();
        name.push(".partial");
        let tmp = path.with_file_name(name);
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        Ok(Sink::File {
            out: std::io::BufWriter::new(file),
            tmp,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match self {
            Sink::Stdout(out) => out.write_all(bytes).context("cannot write to stdout"),
            Sink::File { out, tmp, .. } => out
                .write_all(bytes)
                .with_context(|| format!("cannot write {}", tmp.display())),
        }
    }

    /// Flushes (and renames a file into place); says where the CSV went.
    fn finish(&mut self) -> anyhow::Result<String> {
        match self {
            Sink::Stdout(out) => {
                out.flush().context("cannot write to stdout")?;
                Ok("stdout".to_owned())
            }
            Sink::File { out, tmp, path } => {
                out.flush()
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
                std::fs::rename(&*tmp, &*path).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), path.display())
                })?;
                Ok(path.display().to_string())
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // An export that failed half way leaves no partial file behind.
        if let Sink::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A point in time as Unix ms: whole milliseconds, RFC 3339, or an age (`15m`) before `now`.
fn parse_time(text: &str, now: u64) -> anyhow::Result<u64> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let units = [
        ("ms", 1u64),
        ("s", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
    ];
    for (suffix, ms) in units {
        if let Some(n) = text.strip_suffix(suffix)
            && let Ok(n) = n.parse::<u64>()
        {
            let age = n
                .checked_mul(ms)
                .filter(|age| *age <= now)
                .ok_or_else(|| anyhow!("{text} ago is before 1970"))?;
            return Ok(now - age);
        }
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            anyhow!(
                "'{text}' is not a time: give Unix milliseconds, RFC 3339 \
                 (2026-11-21T10:00:00Z) or an age such as 15m, 2h, 1d"
            )
        })?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).map_err(|_| anyhow!("{text} is before 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("1700000000000", now).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("15m", now).unwrap(), now - 900_000);
        assert_eq!(parse_time("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(parse_time("500ms", now).unwrap(), now - 500);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00", now).unwrap(),
            1_700_000_000_500
        );
        let err = parse_time("yesterday", now).unwrap_err().to_string();
        assert!(err.contains("not a time"), "{err}");
        assert!(parse_time("1969-12-31T00:00:00Z", now).is_err());
        assert!(parse_time("99999999999d", now).is_err());
    }
}
