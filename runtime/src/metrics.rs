//! Prometheus metrics for one node, served over HTTP at `/metrics` when the node's config has
//! `metrics = "ADDR"`.
//!
//! Every scrape renders a fresh snapshot of the node's status (the same data `colony ctl status`
//! shows) in the OpenMetrics text format with the `prometheus-client` crate: actor states,
//! restarts, messages and mailboxes; link state, RTT, loss and bytes; the root supervisor; and
//! every numeric field of each actor's kind-specific status as `colony_actor_stat{stat="…"}`
//! (broker connections, bridge spool depth, collector gaps, tunnel failovers, …).
//!
//! The HTTP side is deliberately tiny: `GET /metrics` and `GET /`, one request per connection,
//! request heads bounded in size and time; anything else gets a 4xx and the listener carries on.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::control::protocol::NodeStatus;
use crate::node::Node;

type Labels = Vec<(String, String)>;
type GaugeF = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterU = Family<Labels, Counter>;

/// The largest request head read.
const MAX_HEAD: usize = 8 * 1024;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The node's status in the OpenMetrics text format.
pub fn render(status: &NodeStatus) -> String {
    let mut registry = <Registry>::with_prefix("colony");
    let gauge = |registry: &mut Registry, name: &str, help: &str| {
        let f = GaugeF::default();
        registry.register(name, help, f.clone());
        f
    };
    let counter = |registry: &mut Registry, name: &str, help: &str| {
        let f = CounterU::default();
        registry.register(name, help, f.clone());
        f
    };
    let node = status.node.as_str();
    let uptime = gauge(
        &mut registry,
        "node_uptime_seconds",
        "How long the node has run",
    );
    uptime
        .get_or_create(&labels(&[("node", node)]))
        .set(status.uptime_ms as f64 / 1000.0);
    let given_up = gauge(
        &mut registry,
        "supervisor_given_up",
        "1 when the root supervisor exceeded its restart intensity",
    );
    given_up
        .get_or_create(&labels(&[("node", node)]))
        .set(f64::from(u8::from(status.supervisor.given_up)));
    let window = gauge(
        &mut registry,
        "supervisor_restarts_in_window",
        "Restarts inside the intensity window",
    );
    window
        .get_or_create(&labels(&[("node", node)]))
        .set(status.supervisor.restarts_in_window as f64);

    let running = gauge(
        &mut registry,
        "actor_running",
        "1 when the actor is running",
    );
    let restarts = counter(&mut registry, "actor_restarts", "Restarts of the actor");
    let handled = counter(
        &mut registry,
        "actor_messages_handled",
        "Messages the actor handled",
    );
    let rejected = counter(
        &mut registry,
        "actor_messages_rejected",
        "Messages the actor refused",
    );
    let rate = gauge(
        &mut registry,
        "actor_messages_per_second",
        "Messages handled per second, lately",
    );
    let depth = gauge(
        &mut registry,
        "actor_mailbox_depth",
        "Messages waiting in the actor's mailbox",
    );
    let up = gauge(
        &mut registry,
        "actor_uptime_seconds",
        "How long the actor has run since its last start",
    );
    let stat = gauge(
        &mut registry,
        "actor_stat",
        "Numeric fields of the actor's kind-specific status",
    );
    for a in &status.actors {
        let l = labels(&[("node", node), ("actor", &a.address), ("kind", &a.kind)]);
        running
            .get_or_create(&l)
            .set(f64::from(u8::from(a.state == "running")));
        restarts.get_or_create(&l).inc_by(a.restarts);
        handled.get_or_create(&l).inc_by(a.messages_handled);
        rejected.get_or_create(&l).inc_by(a.messages_rejected);
        rate.get_or_create(&l).set(a.messages_per_sec as f64);
        depth.get_or_create(&l).set(a.mailbox_depth as f64);
        up.get_or_create(&l)
            .set(a.uptime_ms.unwrap_or(0) as f64 / 1000.0);
        if let serde_json::Value::Object(fields) = &a.detail {
            for (key, value) in fields {
                if let Some(v) = value.as_f64() {
                    let l = labels(&[
                        ("node", node),
                        ("actor", &a.address),
                        ("kind", &a.kind),
                        ("stat", key),
                    ]);
                    stat.get_or_create(&l).set(v);
                }
            }
        }
    }

    let link_up = gauge(
        &mut registry,
        "link_up",
        "1 when the peer is reachable (directly or relayed)",
    );
    let rtt = gauge(
        &mut registry,
        "link_rtt_seconds",
        "Smoothed round-trip time to the peer",
    );
    let sent = counter(
        &mut registry,
        "link_packets_sent",
        "QUIC packets sent to the peer",
    );
    let lost = counter(
        &mut registry,
        "link_packets_lost",
        "QUIC packets to the peer declared lost",
    );
    let bytes_out = counter(
        &mut registry,
        "link_bytes_sent",
        "UDP bytes sent to the peer",
    );
    let bytes_in = counter(
        &mut registry,
        "link_bytes_received",
        "UDP bytes received from the peer",
    );
    let msgs_out = counter(
        &mut registry,
        "link_messages_sent",
        "Messages sent to the peer",
    );
    let msgs_in = counter(
        &mut registry,
        "link_messages_received",
        "Messages received from the peer",
    );
    let refused = counter(
        &mut registry,
        "link_refused_handshakes",
        "Handshakes with the peer refused",
    );
    for l in &status.links {
        let state = serde_json::to_value(l.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let lb = labels(&[("node", node), ("peer", &l.peer)]);
        link_up
            .get_or_create(&labels(&[
                ("node", node),
                ("peer", &l.peer),
                ("state", &state),
            ]))
            .set(f64::from(u8::from(state != "down")));
        rtt.get_or_create(&lb).set(l.rtt_us as f64 / 1e6);
        sent.get_or_create(&lb).inc_by(l.packets_sent);
        lost.get_or_create(&lb).inc_by(l.packets_lost);
        bytes_out.get_or_create(&lb).inc_by(l.bytes_out);
        bytes_in.get_or_create(&lb).inc_by(l.bytes_in);
        msgs_out.get_or_create(&lb).inc_by(l.messages_out);
        msgs_in.get_or_create(&lb).inc_by(l.messages_in);
        refused.get_or_create(&lb).inc_by(l.refused_handshakes);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}

/// Serves `/metrics` until the node stops.
pub async fn serve(listener: TcpListener, node: Arc<Node>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, node.clone()));
            }
            Err(e) => {
                debug!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Index,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let mut parts = text.lines().next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        Some("/") => Route::Index,
        _ => Route::NotFound,
    }
}

async fn answer(mut stream: TcpStream, node: Arc<Node>) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    })
    .await;
    let (status, content_type, body) = match read {
        Ok(true) if head.windows(4).any(|w| w == b"\r\n\r\n") => match route(&head) {
            Route::Metrics => match node.local_status().await {
                Ok(s) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(&s),
                ),
                Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
            },
            Route::Index => (
                "200 OK",
                "text/plain",
                format!("colony node {}: metrics at /metrics\n", node.name),
            ),
            Route::NotFound => (
                "404 Not Found",
                "text/plain",
                "only /metrics is here\n".to_owned(),
            ),
            Route::MethodNotAllowed => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n".to_owned(),
            ),
            Route::BadRequest => (
                "400 Bad Request",
                "text/plain",
                "not an HTTP/1 request\n".to_owned(),
            ),
        },
        Ok(true) => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".to_owned(),
        ),
        _ => return,
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Closing with unread request bytes would reset the connection before the client reads
    // the answer: read what is left, bounded in size and time.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut buf = [0u8; 4096];
        let mut left: usize = 1 << 20;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{ActorStatus, SupervisorStatus};

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::Index);
        assert_eq!(route(b"GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
        assert_eq!(route(b"GET\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn renders_actors_links_and_kind_stats() {
        let status = NodeStatus {
            node: "edge".into(),
            pid: 1,
            uptime_ms: 1500,
            supervisor: SupervisorStatus {
                strategy: "one_for_one".into(),
                max_restarts: 5,
                within_secs: 10,
                restarts_in_window: 1,
                given_up: false,
            },
            links: vec![],
            actors: vec![ActorStatus {
                address: "edge/broker".into(),
                kind: "broker".into(),
                state: "running".into(),
                restart: "permanent".into(),
                restarts: 2,
                last_error: None,
                last_error_ago_ms: None,
                uptime_ms: Some(1000),
                mailbox_depth: 3,
                mailbox_capacity: 1024,
                messages_handled: 42,
                messages_rejected: 0,
                messages_per_sec: 7,
                settings_source: "config".into(),
                settings: serde_json::json!({}),
                detail: serde_json::json!({"connections": 12, "name": "not a number"}),
            }],
        };
        let text = render(&status);
        assert!(
            text.contains(
                r#"colony_actor_restarts_total{node="edge",actor="edge/broker",kind="broker"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"colony_actor_running{node="edge",actor="edge/broker",kind="broker"} 1.0"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"colony_actor_stat{node="edge",actor="edge/broker",kind="broker",stat="connections"} 12.0"#), "{text}");
        assert!(!text.contains("not a number"));
        assert!(
            text.contains(r#"colony_node_uptime_seconds{node="edge"} 1.5"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
