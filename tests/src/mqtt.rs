//! MQTT helpers for end-to-end tests: a test CA with server and client certificates (openssl),
//! `mosquitto_sub` subscribers, `mosquitto_pub` publishes and a real `mosquitto` broker started
//! on ephemeral ports — every process killed (by PID) on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::assert_success;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert_success(&out, &format!("openssl {args:?}"));
}

/// Writes a test CA (`ca.pem`), a server certificate for 127.0.0.1/localhost (`server.pem`,
/// `server.key`) and a client certificate (`client.pem`, `client.key`) into `dir`.
pub fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mqtt-test-ca",
    ]);
    openssl(dir, &ca);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
        .expect("write client.ext");
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={name}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
}

/// A running `mosquitto_sub -d -v`; its payload lines arrive on a channel. Killed on drop.
pub struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    debug: mpsc::Receiver<String>,
}

impl Sub {
    /// Starts `mosquitto_sub -d -v -h 127.0.0.1 -p PORT ARGS` and waits for its SUBACK.
    pub fn start(dir: &Path, port: u16, args: &[&str]) -> Sub {
        let sub = Sub::spawn(dir, port, args);
        sub.wait_ready();
        sub
    }

    /// Starts `mosquitto_sub -d -v -h 127.0.0.1 -p PORT ARGS` without waiting for anything.
    pub fn spawn(dir: &Path, port: u16, args: &[&str]) -> Sub {
        let port = port.to_string();
        // stdbuf: mosquitto_sub's debug lines are otherwise block-buffered into the pipe.
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-d",
                "-v",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
            ])
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mosquitto_sub");
        let (tx, lines) = mpsc::channel();
        let (dtx, debug) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let dtx2 = dtx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Client ")
                    || line.starts_with("All subscription")
                    || line.starts_with("Subscribed (mid")
                {
                    let _ = dtx.send(line);
                } else {
                    let _ = tx.send(line);
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = dtx2.send(line);
            }
        });
        Sub {
            child,
            lines,
            debug,
        }
    }

    /// Waits for the SUBACK (or a refusal); returns the debug lines seen.
    pub fn wait_for_debug(&self, what: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut seen = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.debug.recv_timeout(left) {
                Ok(l) => {
                    seen.push_str(&l);
                    seen.push('\n');
                    if l.contains(what) {
                        return Some(seen);
                    }
                }
                Err(_) => break,
            }
        }
        None
    }

    /// Panics unless its SUBACK comes within 10 s.
    pub fn wait_ready(&self) {
        assert!(
            self.wait_for_debug("SUBACK", Duration::from_secs(10))
                .is_some(),
            "mosquitto_sub got no SUBACK"
        );
    }

    /// The next `n` payload lines (`topic payload`), waiting at most `limit` in all.
    pub fn take(&self, n: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while got.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(l) => got.push(l),
                Err(_) => break,
            }
        }
        got
    }

    /// Whatever arrives within `wait`.
    pub fn quiet(&self, wait: Duration) -> Vec<String> {
        std::thread::sleep(wait);
        self.lines.try_iter().collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mosquitto_pub -h 127.0.0.1 -p PORT ARGS`, bounded to `secs` seconds; panics on failure.
pub fn publish(dir: &Path, port: u16, secs: u32, args: &[&str]) -> Output {
    mosquitto_pub(dir, port, secs, args, None)
}

/// Publishes each line of `file` as one message (`mosquitto_pub -l`, the file on its stdin),
/// bounded to `secs` seconds; panics on failure.
pub fn publish_lines(dir: &Path, port: u16, secs: u32, args: &[&str], file: &Path) -> Output {
    let mut all = args.to_vec();
    all.push("-l");
    mosquitto_pub(dir, port, secs, &all, Some(file))
}

fn mosquitto_pub(dir: &Path, port: u16, secs: u32, args: &[&str], stdin: Option<&Path>) -> Output {
    let port = port.to_string();
    let secs = secs.to_string();
    let mut all = vec![
        secs.as_str(),
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
    ];
    all.extend_from_slice(args);
    let mut cmd = Command::new("timeout");
    cmd.args(&all).current_dir(dir);
    if let Some(file) = stdin {
        cmd.stdin(std::fs::File::open(file).expect("open the lines to publish"));
    }
    let out = cmd.output().expect("run mosquitto_pub");
    assert_success(&out, &format!("mosquitto_pub {args:?}"));
    out
}

/// A real `mosquitto` broker (Debian's) with its own config in `dir`; killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Plain TCP port.
    pub port: u16,
    /// TLS port (`server.pem`/`server.key`, clients need a certificate from `ca.pem`).
    pub tls_port: Option<u16>,
}

/// How a test Mosquitto is set up.
pub struct MosquittoSetup<'a> {
    /// A file name (in `dir`) for this broker's config, log, data.
    pub name: &'a str,
    /// Plain TCP port.
    pub port: u16,
    /// TLS port requiring a client certificate (needs [`make_certs`] first).
    pub tls_port: Option<u16>,
    /// `(user, password)`: anonymous clients refused when given.
    pub user: Option<(&'a str, &'a str)>,
    /// Extra config lines (bridges).
    pub extra: &'a str,
}

impl Mosquitto {
    /// Writes the config and starts the broker; waits until its plain port accepts.
    pub fn start(dir: &Path, s: &MosquittoSetup) -> Mosquitto {
        let data = dir.join(format!("{}-data", s.name));
        std::fs::create_dir_all(&data).expect("mosquitto data dir");
        let mut conf = format!(
            "per_listener_settings false\nuser root\npersistence true\npersistence_location {}/\n\
             autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             listener {} 127.0.0.1\n",
            data.display(),
            s.port
        );
        match s.user {
            Some((user, pw)) => {
                let file = dir.join(format!("{}.passwd", s.name));
                let out = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&file)
                    .args([user, pw])
                    .output()
                    .expect("run mosquitto_passwd");
                assert!(out.status.success(), "mosquitto_passwd failed");
                conf += &format!("allow_anonymous false\npassword_file {}\n", file.display());
            }
            None => conf += "allow_anonymous true\n",
        }
        if let Some(tls) = s.tls_port {
            conf += &format!(
                "listener {tls} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n\
                 keyfile {d}/server.key\nrequire_certificate true\n",
                d = dir.display()
            );
        }
        conf += s.extra;
        let config = dir.join(format!("{}.conf", s.name));
        std::fs::write(&config, conf).expect("write mosquitto.conf");
        let log = dir.join(format!("{}.log", s.name));
        let mut m = Mosquitto {
            child: None,
            config,
            log,
            port: s.port,
            tls_port: s.tls_port,
        };
        m.restart();
        m
    }

    /// Starts it again (after [`Mosquitto::stop`]) with the same config and data.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("mosquitto log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("run mosquitto");
        self.child = Some(child);
        let port = self.port;
        let up = crate::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "mosquitto did not start:\n{}", self.log_text());
    }

    /// Stops it with SIGTERM (it saves its persistence file) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::send_signal(c.id(), 15);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes it (SIGSTOP): its connections stay open, and nothing is read or acknowledged.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            crate::send_signal(c.id(), 19);
        }
    }

    /// Lets it go on after [`Mosquitto::pause`] (SIGCONT).
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            crate::send_signal(c.id(), 18);
        }
    }

    /// Kills it (SIGKILL, paused or not) and reaps it: what it had not saved is lost, and every
    /// connection breaks at once.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- mosquitto log ---\n{}", self.log_text());
        }
    }
}
