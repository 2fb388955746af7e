//! Support for Colony's end-to-end tests: they run the real `colony` binary as a user would —
//! nodes as separate processes on loopback with ephemeral ports, `colony ctl` for status — and
//! clean up every process they start (by PID) and every file, even when a test fails.
//!
//! The binary must be built first (`cargo build --bins`, which the README's test command does);
//! [`colony_bin`] finds it next to the test executables.

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod mqtt;
pub mod netns;
pub mod up;

/// Asserts that a finished command succeeded; if not, the panic shows `what`, the exit status
/// and the command's standard error.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CPU seconds (user + system) process `pid` has used, from /proc/PID/stat.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when it cannot be asked).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A bench setting from the environment: `default` when `name` is unset; a value that does
/// not parse stops the bench with a message naming it (a typo must not measure the default).
pub fn env_setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            panic!("{name}={v:?} is not a valid {}", std::any::type_name::<T>())
        }),
    }
}

/// A comma-separated bench setting from the environment (each item parsed as by
/// [`env_setting`]), `default` when `name` is unset.
pub fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    let v = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                panic!(
                    "{name}: {s:?} is not a valid {}",
                    std::any::type_name::<T>()
                )
            })
        })
        .collect()
}

/// The `colony` binary of this build.
pub fn colony_bin() -> PathBuf {
    // Test executables live in target/<profile>/deps; the binary in target/<profile>.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("colony");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --bins`",
        bin.display()
    );
    bin
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind UDP")
        .port()
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind TCP")
        .port()
}

/// Polls `f` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test's own directory with a cluster config and certificates.
pub struct Workdir {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
}

impl Workdir {
    /// Writes `config` as `cluster.toml` in a fresh directory and issues a CA and a certificate
    /// for every node with `colony certs`.
    pub fn new(config: &str) -> Workdir {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, config).expect("write config");
        let w = Workdir { dir, config: path };
        w.colony_ok(&["certs", "init", "--config", w.config_str()]);
        w.colony_ok(&["certs", "issue", "--all", "--config", w.config_str()]);
        w
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The config path as a string.
    pub fn config_str(&self) -> &str {
        self.config.to_str().expect("utf-8 path")
    }

    /// Runs `colony ARGS` and returns its output.
    pub fn colony(&self, args: &[&str]) -> Output {
        Command::new(colony_bin())
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run colony")
    }

    /// Runs `colony ARGS`, which must succeed; returns stdout.
    pub fn colony_ok(&self, args: &[&str]) -> String {
        let out = self.colony(args);
        assert!(
            out.status.success(),
            "colony {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `colony ctl --config CONFIG --node NODE ARGS`.
    pub fn ctl(&self, node: &str, args: &[&str]) -> Output {
        let mut all = vec!["ctl", "--config", self.config_str(), "--node", node];
        all.extend_from_slice(args);
        self.colony(&all)
    }

    /// `colony ctl --config CONFIG --node NODE ARGS`, which must succeed; returns stdout.
    pub fn ctl_ok(&self, node: &str, args: &[&str]) -> String {
        let mut all = vec!["ctl", "--config", self.config_str(), "--node", node];
        all.extend_from_slice(args);
        self.colony_ok(&all)
    }

    /// `colony ctl … --json ARGS`, which must succeed, parsed.
    pub fn ctl_json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ctl(node, &all);
        assert_success(&out, &format!("ctl {args:?}"));
        serde_json::from_slice(&out.stdout).expect("ctl printed JSON")
    }

    /// `colony ctl call ADDRESS MESSAGE` through `node`, which must succeed: the reply.
    pub fn call(&self, node: &str, address: &str, message: &str) -> serde_json::Value {
        self.ctl_json(node, &["call", address, message])["reply"].take()
    }

    /// The same, for an actor that may be (re)starting: the reply, or null when the call
    /// fails.
    pub fn try_call(&self, node: &str, address: &str, message: &str) -> serde_json::Value {
        let out = self.ctl(node, &["call", address, message, "--json"]);
        if !out.status.success() {
            return serde_json::Value::Null;
        }
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map_or(serde_json::Value::Null, |mut v| v["reply"].take())
    }

    /// Cluster status as `node` answers it, or `None` if it does not answer.
    pub fn status(&self, node: &str) -> Option<serde_json::Value> {
        let out = self.ctl(node, &["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Starts `colony node` for `name` inside network namespace `netns` (`ip netns exec`, which
    /// execs, so the process id is the node's), logging to `<name>.log` here.
    pub fn start_node_in(&self, name: &str, netns: &str) -> NodeProc {
        self.spawn_node(name, Some(netns))
    }

    /// Starts `colony node` for `name`, logging to `<name>.log` here.
    pub fn start_node(&self, name: &str) -> NodeProc {
        self.spawn_node(name, None)
    }

    /// Starts `colony node` for `name`, inside network namespace `netns` when given.
    fn spawn_node(&self, name: &str, netns: Option<&str>) -> NodeProc {
        let log_path = self.path().join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(colony_bin());
                c
            }
            None => Command::new(colony_bin()),
        };
        let child = command
            .args(["node", "--config", self.config_str(), "--name", name])
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn colony node");
        NodeProc {
            name: name.to_owned(),
            child: Some(child),
            log: log_path,
        }
    }
}

/// One `colony node` process; killed (SIGKILL, by its PID) when dropped.
pub struct NodeProc {
    /// The node's name.
    pub name: String,
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
}

impl NodeProc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            send_signal(c.id(), sig);
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `limit` for it to exit; its exit code, or `None` if it did not exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let mut stderr = std::io::stderr();
            let _ = writeln!(
                stderr,
                "--- log of node {} ---\n{}",
                self.name,
                self.log_text()
            );
        }
    }
}

/// Sends `sig` to `pid` (a process this test started).
#[allow(unsafe_code)] // kill(2) has no safe wrapper in std; it touches no memory of ours.
pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes any pid and signal number; it only affects our own child here.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The actors in a status JSON, by address.
pub fn actor<'a>(status: &'a serde_json::Value, address: &str) -> Option<&'a serde_json::Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .filter_map(|n| n["status"]["actors"].as_array())
        .flatten()
        .find(|a| a["address"] == address)
}

/// A node's entry in a status JSON.
pub fn node_entry<'a>(status: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
}

/// True when every node is reachable, every link up and every actor running.
pub fn healthy(status: &serde_json::Value) -> bool {
    let Some(nodes) = status["nodes"].as_array() else {
        return false;
    };
    nodes.iter().all(|n| {
        n["reachable"] == true
            && n["status"]["links"]
                .as_array()
                .is_some_and(|l| l.iter().all(|l| l["state"] != "down"))
            && n["status"]["actors"]
                .as_array()
                .is_some_and(|a| a.iter().all(|a| a["state"] == "running"))
    })
}

/// Runs `sqlite3 -json FILE SQL` (the CLI a user queries a collector's file with) and parses the
/// rows. It waits up to 5 s for a lock, as a reader beside a live writer should: a node that is
/// (re)starting holds the file alone for a moment while it opens it and recovers its log.
pub fn sqlite(db: &Path, sql: &str) -> Vec<serde_json::Value> {
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg("-json")
        .arg(db)
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert_success(&out, &format!("sqlite3 {sql}"));
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("sqlite3 JSON")
}

/// The first column of the first row `sqlite3` returns for `sql`, as a number (-1 if none).
pub fn count(db: &Path, sql: &str) -> i64 {
    sqlite(db, sql)
        .first()
        .and_then(|r| r.as_object()?.values().next()?.as_i64())
        .unwrap_or(-1)
}

/// Asserts that a collector's file holds `sources` sources whose readings are exactly
/// 1..=max(seq), each once; returns how many readings there are.
pub fn assert_exactly_once(db: &Path, sources: i64) -> i64 {
    let rows = sqlite(
        db,
        "select source, count(*) as n, count(distinct seq) as d, min(seq) as lo, max(seq) as hi \
         from readings group by source",
    );
    assert_eq!(rows.len() as i64, sources, "sources: {rows:?}");
    let mut total = 0;
    for r in &rows {
        let (n, d, lo, hi) = (
            r["n"].as_i64().unwrap(),
            r["d"].as_i64().unwrap(),
            r["lo"].as_i64().unwrap(),
            r["hi"].as_i64().unwrap(),
        );
        assert!(n == d && lo == 1 && hi == n, "not exactly once: {r}");
        total += n;
    }
    total
}
