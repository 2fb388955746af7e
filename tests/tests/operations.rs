//! What operators wire a node into: Prometheus metrics over HTTP and systemd's notify protocol.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use colony_tests::*;

fn config(metrics_port: u16) -> String {
    format!(
        "[cluster]\nname = \"ops\"\n[[node]]\nname = \"solo\"\nlisten = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\
         [[actor]]\nname = \"lb\"\nnode = \"solo\"\nkind = \"balancer\"\n",
        free_udp_port()
    )
}

fn http(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_are_served_for_prometheus_and_bad_requests_are_refused() {
    let port = free_tcp_port();
    let work = Workdir::new(&config(port));
    let _node = work.start_node("solo");
    assert!(wait_for(Duration::from_secs(10), || work
        .status("solo")
        .is_some_and(|s| healthy(&s))));
    work.ctl_ok("solo", &["kill", "solo/lb"]);
    assert!(wait_for(Duration::from_secs(5), || work
        .status("solo")
        .is_some_and(
            |s| actor(&s, "solo/lb").unwrap()["state"] == "running"
        )));

    let page = http(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("application/openmetrics-text"), "{page}");
    assert!(
        page.contains(r#"colony_actor_running{node="solo",actor="solo/lb",kind="balancer"} 1.0"#),
        "{page}"
    );
    assert!(
        page.contains(
            r#"colony_actor_restarts_total{node="solo",actor="solo/lb",kind="balancer"} 1"#
        ),
        "{page}"
    );
    assert!(page.contains("colony_node_uptime_seconds"), "{page}");

    assert!(http(port, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(port, b"DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(http(port, b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(http(port, &[b'A'; 20_000]).starts_with("HTTP/1.1 431"));
    // Still serving.
    assert!(http(port, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    let work = Workdir::new(&config(free_tcp_port()));
    let notify_path = work.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(colony_bin())
        .args(["node", "--config", work.config_str(), "--name", "solo"])
        .current_dir(work.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    let healthy_now = work.status("solo").is_some_and(|s| healthy(&s));
    // A change for SIGHUP to apply.
    let changed = std::fs::read_to_string(&work.config).unwrap().replace(
        "kind = \"balancer\"\n",
        "kind = \"balancer\"\nanti_flap_threshold = 0.3\n",
    );
    std::fs::write(&work.config, changed).unwrap();
    send_signal(child.id(), libc::SIGHUP);
    let reloading = next();
    let ready_again = next();
    send_signal(child.id(), libc::SIGTERM);
    let stopping = next();
    let exit = child.wait().unwrap();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(healthy_now, "READY=1 came before the node was up");
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(ready_again.contains("READY=1"), "{ready_again}");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert!(exit.success());
}
