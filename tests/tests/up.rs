//! `colony up`: the README's main job. It creates development certificates, starts every node of
//! a config as its own process, says when the cluster is up, and stops every node on Ctrl-C —
//! or, when a node cannot start, says why and leaves nothing running.

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use colony_tests::up::{Up, is_colony_node};
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
