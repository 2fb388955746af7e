//! `colony up`: the README's main job. It creates development certificates, starts every node of
//! a config as its own process, says when the cluster is up, and stops every node on Ctrl-C —
//! or, when a node cannot start, says why and leaves nothing running.

use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colony_tests::*;

/// Two nodes, one balancer on each.
fn config(core: u16, edge: u16) -> String {
    format!(
        r#"
[cluster]
name = "updemo"
heartbeat_ms = 100
heartbeat_misses = 3

[[node]]
name = "core"
listen = "127.0.0.1:{core}"

[[node]]
name = "edge"
listen = "127.0.0.1:{edge}"

[[actor]]
name = "lb"
node = "core"
kind = "balancer"

[[actor]]
name = "lb"
node = "edge"
kind = "balancer"
"#
    )
}

/// A running `colony up`, its output, and the node pids it announced. Dropping it SIGKILLs `up`
/// and every node it started that is still alive, and shows the output if the test failed.
struct Up {
    dir: tempfile::TempDir,
    child: Option<Child>,
    lines: Receiver<String>,
    stdout: Vec<String>,
    stderr: Arc<Mutex<String>>,
    node_pids: Vec<u32>,
}

impl Up {
    fn start(config: &str, args: &[&str]) -> Up {
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

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Reads stdout until a line contains `needle`, for at most `limit`; the line.
    fn wait_line(&mut self, needle: &str, limit: Duration) -> String {
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
    fn wait_exit(&mut self, limit: Duration) -> i32 {
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

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn ctl(&self, node: &str, args: &[&str]) -> String {
        let out = Command::new(colony_bin())
            .args(["ctl", "--config", "cluster.toml", "--node", node])
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run colony ctl");
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
            for log in ["core", "edge"]
                .map(|n| self.path().join(".colony/updemo").join(n).join("node.log"))
            {
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
fn announced_pid(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("started node ")?;
    let digits = rest.split("(pid ").nth(1)?.split(',').next()?;
    digits.parse().ok()
}

/// True while `pid` is a live (not zombie) `colony node` process.
fn is_colony_node(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|s| s.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains("node\0--config")
}

#[test]
fn up_starts_the_cluster_and_stops_every_node_on_sigint() {
    let mut up = Up::start(
        &config(free_udp_port(), free_udp_port()),
        &["--interval", "1", "--timeout", "30"],
    );
    let line = up.wait_line("is up in", Duration::from_secs(40));
    let ms: u64 = line
        .strip_prefix("cluster updemo is up in ")
        .and_then(|s| s.strip_suffix(" ms"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    assert!(ms < 30_000, "{line}");
    assert_eq!(up.node_pids.len(), 2, "{:?}", up.stdout);
    assert!(
        up.stdout
            .iter()
            .any(|l| l.starts_with("created development CA ")),
        "{:?}",
        up.stdout
    );
    for node in ["core", "edge"] {
        assert!(up.stdout.iter().any(|l| l.ends_with(&format!(
            "for node {node} (key {})",
            cert(up.path(), node, "key")
        ))));
    }

    // The first table, then another one a second later: both nodes up, both actors running.
    up.wait_line("ACTORS", Duration::from_secs(10));
    let edge = up.wait_line("edge/lb", Duration::from_secs(10));
    assert!(edge.contains("running"), "{edge}");
    up.wait_line("UTC", Duration::from_secs(10));
    up.wait_line("LINKS", Duration::from_secs(10));
    let link = up.wait_line("core ", Duration::from_secs(10));
    assert!(link.contains(" up "), "{link}");

    // The state directory is private, and `colony ctl` finds the nodes `up` started.
    let state = up.path().join(".colony/updemo");
    let mode = std::fs::metadata(&state)
        .expect("state dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "state directory mode {mode:o}");
    let status = up.ctl("edge", &["status"]);
    assert!(
        status.contains("core/lb") && status.contains("edge/lb"),
        "{status}"
    );
    let tree = up.ctl("core", &["tree"]);
    assert!(
        tree.contains("└── core/lb") && tree.contains("└── edge/lb"),
        "{tree}"
    );

    send_signal(up.pid(), libc::SIGINT);
    assert_eq!(
        up.wait_exit(Duration::from_secs(30)),
        0,
        "stderr: {}",
        up.stderr()
    );
    assert_eq!(
        up.stdout.last().map(String::as_str),
        Some("stopped"),
        "{:?}",
        up.stdout
    );
    for &pid in &up.node_pids {
        assert!(!is_colony_node(pid), "node pid {pid} still runs");
    }
    for node in ["core", "edge"] {
        let log = std::fs::read_to_string(state.join(node).join("node.log")).expect("node log");
        assert!(
            log.contains("SIGTERM: stopping"),
            "node {node} was stopped with SIGTERM:\n{log}"
        );
    }
}

#[test]
fn a_node_that_cannot_start_fails_up_and_stops_the_others() {
    // Another program holds edge's port, so edge cannot bind it and exits.
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let edge_port = taken.local_addr().expect("local addr").port();
    let mut up = Up::start(&config(free_udp_port(), edge_port), &["--timeout", "30"]);
    up.wait_line("started node edge", Duration::from_secs(20));
    let code = up.wait_exit(Duration::from_secs(40));
    let stderr = up.stderr();
    assert_eq!(code, 1, "stdout: {:?}\nstderr: {stderr}", up.stdout);
    assert!(stderr.starts_with("error: node edge (pid "), "{stderr}");
    assert!(
        stderr.contains("exited (exit status: 1) before the cluster was up"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("127.0.0.1:{edge_port}")),
        "the log's tail names the port:\n{stderr}"
    );
    assert!(
        !up.stdout.iter().any(|l| l.contains("is up in")),
        "{:?}",
        up.stdout
    );
    for &pid in &up.node_pids {
        assert!(!is_colony_node(pid), "node pid {pid} still runs");
    }
    drop(taken);
}

fn cert(dir: &Path, node: &str, ext: &str) -> String {
    // `up` makes the config's path absolute from its working directory, which has no symlinks.
    let dir = std::fs::canonicalize(dir).expect("canonical temp dir");
    let path: PathBuf = dir
        .join(".colony/updemo/certs")
        .join(format!("{node}.{ext}"));
    path.display().to_string()
}
