//! `colony up` driven as a user runs it: its output read line by line, the node processes it
//! starts tracked so that nothing outlives a test.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{assert_success, colony_bin, send_signal};

/// A running `colony up`, its output, and the node pids it announced. Dropping it SIGKILLs `up`
/// and every node it started that is still alive, and shows the output if the test failed.
pub struct Up {
    dir: tempfile::TempDir,
    child: Option<Child>,
    lines: Receiver<String>,
    /// Its standard output so far, line by line.
    pub stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
    /// The pids of the nodes `up` announced.
    pub node_pids: Vec<u32>,
}

impl Up {
    /// Runs `colony up cluster.toml ARGS` in a new directory holding `config` as cluster.toml.
    pub fn start(config: &str, args: &[&str]) -> Up {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cluster.toml"), config).expect("write config");
        let mut child = Command::new(colony_bin())
            .arg("up")
            .arg("cluster.toml")
            .args(args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn colony up");
        let (tx, lines) = channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&text);
        });
        Up {
            dir,
            child: Some(child),
            lines,
            stdout: Vec::new(),
            stderr,
            node_pids: Vec::new(),
        }
    }

    /// The directory it runs in (holding cluster.toml and the state directory).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Reads stdout until a line contains `needle`, for at most `limit`; the line.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(pid) = announced_pid(&line) {
                        self.node_pids.push(pid);
                    }
                    self.stdout.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within {limit:?}"),
            }
        }
    }

    /// Waits up to `limit` for `up` to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let child = self.child.as_mut().expect("up runs");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for up") {
                self.child = None;
                // Take the rest of stdout (the reader ends at EOF).
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.stdout.push(line);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "colony up did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of `colony up` (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What it wrote to standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `colony ctl --config cluster.toml --node NODE ARGS`, asserting success; its output.
    pub fn ctl(&self, node: &str, args: &[&str]) -> String {
        let out = Command::new(colony_bin())
            .args(["ctl", "--config", "cluster.toml", "--node", node])
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run colony ctl");
        assert_success(&out, &format!("ctl {args:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for &pid in &self.node_pids {
            if is_colony_node(pid) {
                send_signal(pid, libc::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- colony up stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout.join("\n"),
                self.stderr()
            );
            for log in node_logs(&self.path().join(".colony")) {
                eprintln!(
                    "--- {} ---\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
}

/// The pid in "started node NAME (pid N, log PATH)".
pub fn announced_pid(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("started node ")?;
    let digits = rest.split("(pid ").nth(1)?.split(',').next()?;
    digits.parse().ok()
}

/// True while `pid` is a live (not zombie) `colony node` process.
pub fn is_colony_node(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|s| s.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains("node\0--config")
}

/// Every `node.log` under a state directory (`<cluster>/<node>/node.log`).
fn node_logs(state: &Path) -> Vec<PathBuf> {
    let mut logs = Vec::new();
    for cluster in std::fs::read_dir(state).into_iter().flatten().flatten() {
        for node in std::fs::read_dir(cluster.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let log = node.path().join("node.log");
            if log.exists() {
                logs.push(log);
            }
        }
    }
    logs.sort();
    logs
}
