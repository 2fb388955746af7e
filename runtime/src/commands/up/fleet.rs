//! The node processes `colony up` starts: spawning each with its log file, noticing when one
//! exits, and stopping them all — SIGTERM, then SIGKILL for any still running after
//! [`STOP_TIMEOUT`]. Dropping a [`Fleet`] SIGKILLs whatever still runs, so no error path or panic
//! leaves a node behind.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a node gets to stop after SIGTERM before it is killed.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One `colony node` process.
pub(super) struct NodeProcess {
    /// The node's name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Where its standard output and error go.
    pub log: PathBuf,
    /// How it ended, once it has.
    pub exit: Option<ExitStatus>,
    child: Child,
}

/// Every node process `up` started, in start order.
#[derive(Default)]
pub(super) struct Fleet {
    /// The processes, exited ones included.
    pub nodes: Vec<NodeProcess>,
}

impl Fleet {
    /// Starts `exe node` for node `name`, appending its output to `<state_dir>/<name>/node.log`.
    pub fn spawn(
        &mut self,
        exe: &Path,
        config: &Path,
        state_dir: &Path,
        name: &str,
    ) -> anyhow::Result<&NodeProcess> {
        let dir = state_dir.join(name);
        create_private_dir(&dir)?;
        let log = dir.join("node.log");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log)
            .with_context(|| format!("cannot open the log file {}", log.display()))?;
        // Logs are appended across runs; a marker shows where this run begins.
        writeln!(
            file,
            "--- colony up starts node {name} at {} ---",
            utc_now()
        )
        .with_context(|| format!("cannot write {}", log.display()))?;
        let stderr = file
            .try_clone()
            .with_context(|| format!("log file {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("node")
            .arg("--config")
            .arg(config)
            .arg("--name")
            .arg(name)
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr));
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start node {name} ({})", exe.display()))?;
        self.nodes.push(NodeProcess {
            name: name.to_owned(),
            pid: child.id(),
            log,
            exit: None,
            child,
        });
        Ok(self.nodes.last().expect("just pushed"))
    }

    /// Notices the nodes that exited since the last call; their indices in [`Fleet::nodes`].
    pub fn reap(&mut self) -> Vec<usize> {
        let mut exited = Vec::new();
        for (i, node) in self
            .nodes
            .iter_mut()
            .enumerate()
            .filter(|(_, n)| n.exit.is_none())
        {
            if let Ok(Some(status)) = node.child.try_wait() {
                node.exit = Some(status);
                exited.push(i);
            }
        }
        exited
    }

    /// The nodes still running (as of the last [`Fleet::reap`]).
    pub fn running(&self) -> impl Iterator<Item = &NodeProcess> {
        self.nodes.iter().filter(|n| n.exit.is_none())
    }

    /// Sends SIGTERM to every running node, waits up to [`STOP_TIMEOUT`] for them all, then kills
    /// the ones left.
    pub async fn stop(&mut self) {
        for node in self.nodes.iter().filter(|n| n.exit.is_none()) {
            terminate(node.pid);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            self.reap();
            if self.running().next().is_none() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for node in self.nodes.iter_mut().filter(|n| n.exit.is_none()) {
            println!(
                "node {} (pid {}) did not stop within {} s; killing it",
                node.name,
                node.pid,
                STOP_TIMEOUT.as_secs()
            );
            node.kill();
        }
    }
}

impl NodeProcess {
    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        let _ = self.child.kill();
        self.exit = self.child.wait().ok();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().filter(|n| n.exit.is_none()) {
            node.kill();
        }
    }
}

/// Creates `path` and any missing parents with mode 0700; an existing directory is left as it is.
pub(super) fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// The last `lines` lines of a log file, indented, or why it cannot be read.
pub(super) fn log_tail(path: &Path, lines: usize) -> String {
    // Logs are appended across runs and may be large; the tail is near the end.
    const WINDOW: u64 = 64 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            tail.iter()
                .map(|l| format!("  {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (cannot read it: {e})"),
    }
}

/// The time now, as "2025-01-31 12:00:00 UTC".
pub(super) fn utc_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
    ))
    .unwrap_or_else(|_| now.to_string())
}

/// Sends SIGTERM to `pid`, a child of ours that has not been reaped.
#[allow(unsafe_code)] // kill(2) has no safe wrapper in std; it touches no memory of ours.
fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes any pid and signal. An unreaped child keeps its pid, so this cannot
    // reach another process; failure (it just exited) needs no handling.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Makes the kernel send the node SIGTERM if `up` dies without stopping it (say, SIGKILL).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // pre_exec and prctl(2) have no safe wrappers; the hook is async-signal-safe.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // calls (prctl, getppid); it allocates nothing and touches no shared state.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // `up` may have died between fork and prctl; then nobody would stop this node.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Elsewhere a node outlives an `up` killed with SIGKILL; every other ending still stops it.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tail_is_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 20);
        assert!(
            tail.starts_with("  line 11\n") && tail.ends_with("  line 30"),
            "{tail}"
        );
        assert!(log_tail(&dir.path().join("none.log"), 20).contains("cannot read it"));
    }

    #[test]
    fn a_dropped_fleet_leaves_no_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut fleet = Fleet::default();
        // A script that ignores the node arguments and sleeps stands in for a node.
        let script = dir.path().join("fake-node");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let pid = fleet
            .spawn(&script, Path::new("c.toml"), dir.path(), "n1")
            .unwrap()
            .pid;
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let log = std::fs::read_to_string(dir.path().join("n1/node.log")).unwrap();
        assert!(log.starts_with("--- colony up starts node n1 at "), "{log}");
        drop(fleet);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "killed and reaped"
        );
    }

    #[test]
    fn stop_terminates_every_node() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-node");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut fleet = Fleet::default();
        fleet
            .spawn(&script, Path::new("c.toml"), dir.path(), "n1")
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        runtime.block_on(fleet.stop());
        assert!(
            started.elapsed() < STOP_TIMEOUT,
            "sleep dies of SIGTERM at once"
        );
        let exit = fleet.nodes[0].exit.expect("reaped");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&exit),
            Some(libc::SIGTERM)
        );
        assert!(fleet.reap().is_empty() && fleet.running().next().is_none());
    }
}
