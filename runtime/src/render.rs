//! Renders a [`ClusterStatus`] for people: the status tables of `colony ctl status` and
//! `colony up`, and the supervision trees of `colony ctl tree`.
//!
//! The output is plain text — no colour codes, and the same whatever the terminal's width (long
//! cells are never wrapped), so it reads the same in a terminal, a log file or a test. Unreachable
//! nodes are shown as unreachable, with the reason, never left out.

use std::fmt::Write as _;

use colony_cluster::{LinkState, LinkStats};
use comfy_table::{CellAlignment, ContentArrangement, Table, TableComponent, presets};

use crate::control::protocol::{ActorStatus, ClusterStatus, NodeStatus};

/// The NODES, LINKS and ACTORS tables.
pub fn render_status(status: &ClusterStatus) -> String {
    let mut out = format!("cluster status as node {} sees it\n", status.answered_by);
    let reachable: Vec<&NodeStatus> = status
        .nodes
        .iter()
        .filter_map(|n| n.status.as_ref())
        .collect();

    out.push_str("\nNODES\n");
    let mut nodes = table(
        &["node", "state", "pid", "uptime", "actors", "error"],
        &[2, 4],
    );
    for n in &status.nodes {
        match &n.status {
            Some(s) if n.reachable => {
                let state = if s.supervisor.given_up {
                    "up (supervisor gave up)"
                } else {
                    "up"
                };
                nodes.add_row(vec![
                    n.node.clone(),
                    state.to_owned(),
                    s.pid.to_string(),
                    duration_ms(s.uptime_ms),
                    s.actors.len().to_string(),
                    "-".to_owned(),
                ]);
            }
            _ => {
                nodes.add_row(vec![
                    n.node.clone(),
                    "unreachable".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    one_line(n.error.as_deref().unwrap_or("no report")),
                ]);
            }
        }
    }
    push_table(&mut out, &nodes);

    out.push_str("\nLINKS\n");
    let mut links = table(
        &[
            "node",
            "peer",
            "state",
            "via",
            "rtt",
            "loss",
            "bytes out",
            "bytes in",
            "msgs out",
            "msgs in",
            "rejected",
            "refused",
            "last error",
        ],
        &[4, 5, 6, 7, 8, 9, 10, 11],
    );
    for s in &reachable {
        for l in &s.links {
            links.add_row(link_row(&s.node, l));
        }
    }
    if links.is_empty() {
        out.push_str("(no links)\n");
    } else {
        push_table(&mut out, &links);
    }

    out.push_str("\nACTORS\n");
    let mut actors = table(
        &[
            "address",
            "kind",
            "state",
            "restarts",
            "last error",
            "uptime",
            "mailbox",
            "handled",
            "msgs/s",
            "summary",
        ],
        &[3, 5, 6, 7, 8],
    );
    for n in &status.nodes {
        match &n.status {
            Some(s) if n.reachable => {
                for a in &s.actors {
                    actors.add_row(actor_row(a));
                }
            }
            _ => {
                let mut row = vec!["-".to_owned(); 10];
                row[0] = format!("{}/*", n.node);
                row[2] = "unknown (node unreachable)".to_owned();
                actors.add_row(row);
            }
        }
    }
    if actors.is_empty() {
        out.push_str("(no actors)\n");
    } else {
        push_table(&mut out, &actors);
    }
    out
}

/// Each node's root supervisor and its children, one tree per node, in node order.
pub fn render_tree(status: &ClusterStatus) -> String {
    let mut out = String::new();
    for (i, n) in status.nodes.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let Some(s) = n.status.as_ref().filter(|_| n.reachable) else {
            let _ = writeln!(
                out,
                "{} (unreachable: {})",
                n.node,
                one_line(n.error.as_deref().unwrap_or("no report"))
            );
            continue;
        };
        let sup = &s.supervisor;
        let _ = writeln!(
            out,
            "{} (root supervisor: {}, max {} restarts in {}s, {} in window{})",
            n.node,
            sup.strategy,
            sup.max_restarts,
            sup.within_secs,
            sup.restarts_in_window,
            if sup.given_up { ", gave up" } else { "" }
        );
        if s.actors.is_empty() {
            out.push_str("└── (no actors)\n");
            continue;
        }
        let width = |f: fn(&ActorStatus) -> &str| {
            s.actors
                .iter()
                .map(|a| f(a).chars().count())
                .max()
                .unwrap_or(0)
        };
        let (wa, wk, ws, wr) = (
            width(|a| &a.address),
            width(|a| &a.kind),
            width(|a| &a.state),
            width(|a| &a.restart),
        );
        for (j, a) in s.actors.iter().enumerate() {
            let branch = if j + 1 == s.actors.len() {
                "└──"
            } else {
                "├──"
            };
            let mut line = format!(
                "{branch} {:<wa$}  {:<wk$}  {:<ws$}  {:<wr$}  restarts {}",
                a.address, a.kind, a.state, a.restart, a.restarts
            );
            if let Some(e) = &a.last_error {
                let _ = write!(line, "  last error: {}", last_error(e, a.last_error_ago_ms));
            }
            out.push_str(line.trim_end());
            out.push('\n');
            let stem = if j + 1 == s.actors.len() {
                "    "
            } else {
                "│   "
            };
            push_children(&mut out, stem, &a.detail);
        }
    }
    out
}

/// The children an actor reports in its status detail (`children`: objects with `address`,
/// `kind`, `state` and an optional `info` line; `children_total` when the list is cut short),
/// as branches under it.
fn push_children(out: &mut String, stem: &str, detail: &serde_json::Value) {
    let Some(children) = detail.get("children").and_then(|c| c.as_array()) else {
        return;
    };
    let total = detail
        .get("children_total")
        .and_then(|t| t.as_u64())
        .unwrap_or(children.len() as u64);
    let more = total.saturating_sub(children.len() as u64);
    let field = |c: &serde_json::Value, k: &str| {
        c.get(k)
            .and_then(|v| v.as_str())
            .map(one_line)
            .unwrap_or_default()
    };
    let rows: Vec<[String; 4]> = children
        .iter()
        .map(|c| {
            [
                field(c, "address"),
                field(c, "kind"),
                field(c, "state"),
                field(c, "info"),
            ]
        })
        .collect();
    let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
    let (wa, wk, ws) = (width(0), width(1), width(2));
    for (k, r) in rows.iter().enumerate() {
        let last = k + 1 == rows.len() && more == 0;
        let branch = if last { "└──" } else { "├──" };
        let line = format!(
            "{stem}{branch} {:<wa$}  {:<wk$}  {:<ws$}  {}",
            r[0], r[1], r[2], r[3]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if more > 0 {
        let _ = writeln!(out, "{stem}└── ... and {more} more");
    }
}

/// A table that looks the same on every terminal: no colour, no wrapping, `right` columns
/// right-aligned (numbers).
pub(crate) fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_style(TableComponent::HeaderLines, '─')
        .set_style(TableComponent::MiddleHeaderIntersections, '─')
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

pub(crate) fn push_table(out: &mut String, t: &Table) {
    out.push_str(&t.trim_fmt());
    out.push('\n');
}

fn link_row(node: &str, l: &LinkStats) -> Vec<String> {
    let state = match l.state {
        LinkState::Up => "up",
        LinkState::Relayed => "relayed",
        LinkState::Down => "down",
    };
    let rtt = if l.state == LinkState::Down && l.rtt_us == 0 {
        "-".to_owned()
    } else {
        format!("{:.2} ms", l.rtt_us as f64 / 1000.0)
    };
    vec![
        node.to_owned(),
        l.peer.clone(),
        state.to_owned(),
        l.via.clone().unwrap_or_else(|| "-".to_owned()),
        rtt,
        loss(l.packets_lost, l.packets_sent),
        bytes(l.bytes_out),
        bytes(l.bytes_in),
        l.messages_out.to_string(),
        l.messages_in.to_string(),
        l.frames_rejected.to_string(),
        l.refused_handshakes.to_string(),
        l.last_error
            .as_deref()
            .map_or_else(|| "-".to_owned(), one_line),
    ]
}

fn actor_row(a: &ActorStatus) -> Vec<String> {
    vec![
        a.address.clone(),
        a.kind.clone(),
        a.state.clone(),
        a.restarts.to_string(),
        a.last_error
            .as_deref()
            .map_or_else(|| "-".to_owned(), |e| last_error(e, a.last_error_ago_ms)),
        a.uptime_ms.map_or_else(|| "-".to_owned(), duration_ms),
        format!("{}/{}", a.mailbox_depth, a.mailbox_capacity),
        a.messages_handled.to_string(),
        a.messages_per_sec.to_string(),
        summary(&a.kind, &a.detail),
    ]
}

/// The few figures of an actor's status detail that say how it is doing, by kind: "5000/5000
/// connected, 4998/s sent". Figures its detail does not carry are left out.
pub fn summary(kind: &str, detail: &serde_json::Value) -> String {
    let fields: &[(&str, &str)] = match kind {
        "broker" => &[
            ("connections", "conn"),
            ("messages_in_per_sec", "in/s"),
            ("messages_out_per_sec", "out/s"),
            ("retained", "retained"),
            ("dropped", "dropped"),
            ("denied", "denied"),
        ],
        "sensor_group" => &[
            ("connected", "connected"),
            ("readings_per_sec", "sent/s"),
            ("send_errors", "errors"),
            ("commands_received", "commands"),
        ],
        "collector" => &[
            ("stored", "stored"),
            ("rejected", "rejected"),
            ("gaps", "gaps"),
            ("duplicates", "dup"),
        ],
        "bridge" => &[
            ("state", "link"),
            ("spool_depth", "spooled"),
            ("out_per_sec", "out/s"),
            ("in_per_sec", "in/s"),
            ("reconnects", "reconnects"),
        ],
        "tunnel" => &[
            ("role", "role"),
            ("active", "via"),
            ("failovers", "failovers"),
        ],
        "balancer" => &[("routers", "routers"), ("decisions", "endpoints")],
        _ => &[],
    };
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|(key, label)| {
            let v = detail.get(*key)?;
            let text = match v {
                serde_json::Value::Null => return None,
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(a) => a.len().to_string(),
                serde_json::Value::Object(o) => o.len().to_string(),
                other => other.to_string(),
            };
            Some(format!("{label} {text}"))
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

/// "connection reset (12s ago)".
fn last_error(error: &str, ago_ms: Option<u64>) -> String {
    match ago_ms {
        Some(ms) => format!("{} ({} ago)", one_line(error), duration_ms(ms)),
        None => one_line(error),
    }
}

/// A cell's text on one line, so no row grows taller than one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Lost packets as a percentage of those sent, "-" before any were sent.
fn loss(lost: u64, sent: u64) -> String {
    if sent == 0 {
        "-".to_owned()
    } else {
        format!("{:.2}%", lost as f64 * 100.0 / sent as f64)
    }
}

/// Bytes in binary units: "512 B", "1.5 KiB", "12.0 MiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration at the precision a person wants: "850ms", "42s", "3m12s", "2h05m", "3d04h".
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{NodeEntry, SupervisorStatus};

    fn actor(address: &str, state: &str, restart: &str, restarts: u64) -> ActorStatus {
        ActorStatus {
            address: address.to_owned(),
            kind: "balancer".to_owned(),
            state: state.to_owned(),
            restart: restart.to_owned(),
            restarts,
            last_error: None,
            last_error_ago_ms: None,
            uptime_ms: Some(192_000),
            mailbox_depth: 3,
            mailbox_capacity: 1024,
            messages_handled: 4711,
            messages_rejected: 0,
            messages_per_sec: 12,
            settings_source: "config".to_owned(),
            settings: serde_json::json!({}),
            detail: serde_json::json!({}),
        }
    }

    fn link(peer: &str, state: LinkState) -> LinkStats {
        LinkStats {
            peer: peer.to_owned(),
            state,
            since_unix_ms: 0,
            via: None,
            remote_addr: Some("127.0.0.1:7102".to_owned()),
            rtt_us: 1234,
            packets_sent: 400,
            packets_lost: 10,
            bytes_out: 1536,
            bytes_in: 3 * 1024 * 1024,
            messages_out: 17,
            messages_in: 19,
            frames_rejected: 2,
            datagrams_dropped: 0,
            refused_handshakes: 1,
            last_error: None,
        }
    }

    fn sample() -> ClusterStatus {
        let mut stopped = actor("edge-1/sensors", "stopped", "transient", 2);
        stopped.last_error = Some("sensor bus\nwent away".to_owned());
        stopped.last_error_ago_ms = Some(12_000);
        stopped.uptime_ms = None;
        let mut down = link("edge-2", LinkState::Down);
        down.rtt_us = 0;
        down.packets_sent = 0;
        down.packets_lost = 0;
        down.last_error = Some("timed out".to_owned());
        ClusterStatus {
            answered_by: "edge-1".to_owned(),
            nodes: vec![
                NodeEntry {
                    node: "edge-1".to_owned(),
                    reachable: true,
                    error: None,
                    status: Some(NodeStatus {
                        node: "edge-1".to_owned(),
                        pid: 4242,
                        uptime_ms: 7_500_000,
                        supervisor: SupervisorStatus {
                            strategy: "one_for_one".to_owned(),
                            max_restarts: 5,
                            within_secs: 10,
                            restarts_in_window: 0,
                            given_up: false,
                        },
                        links: vec![link("core", LinkState::Up), down],
                        actors: vec![actor("edge-1/lb", "running", "permanent", 0), stopped],
                    }),
                },
                NodeEntry {
                    node: "edge-2".to_owned(),
                    reachable: false,
                    error: Some("call timed out after 1s".to_owned()),
                    status: None,
                },
            ],
        }
    }

    fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{text}"))
    }

    #[test]
    fn status_shows_nodes_links_and_actors() {
        let text = render_status(&sample());
        let nodes = text.find("NODES").unwrap();
        let links = text.find("LINKS").unwrap();
        let actors = text.find("ACTORS").unwrap();
        assert!(nodes < links && links < actors, "{text}");

        let up = line_with(&text[nodes..links], "edge-1");
        assert!(
            up.contains(" up ") && up.contains("4242") && up.contains("2h05m"),
            "{up}"
        );
        let unreachable = line_with(&text[nodes..links], "edge-2");
        assert!(
            unreachable.contains("unreachable") && unreachable.contains("call timed out after 1s"),
            "{unreachable}"
        );

        let core = line_with(&text[links..actors], " core ");
        for expected in ["1.23 ms", "2.50%", "1.5 KiB", "3.0 MiB", " 17 ", " 19 "] {
            assert!(core.contains(expected), "{expected:?} missing from {core}");
        }
        let down = line_with(&text[links..actors], " edge-2 ");
        assert!(
            down.contains("down") && down.contains("timed out"),
            "{down}"
        );

        let lb = line_with(&text[actors..], "edge-1/lb");
        for expected in ["running", "3m12s", "3/1024", "4711", "12"] {
            assert!(lb.contains(expected), "{expected:?} missing from {lb}");
        }
        let sensors = line_with(&text[actors..], "edge-1/sensors");
        assert!(
            sensors.contains("stopped") && sensors.contains("sensor bus went away (12s ago)"),
            "{sensors}"
        );
        assert!(line_with(&text[actors..], "edge-2/*").contains("unreachable"));

        assert!(!text.contains('\x1b'), "no colour codes");
        assert!(
            text.lines().all(|l| l == l.trim_end()),
            "no trailing blanks"
        );
    }

    #[test]
    fn status_tables_align_and_do_not_wrap() {
        let mut status = sample();
        let long = "x".repeat(400);
        status.nodes[1].error = Some(long.clone());
        let text = render_status(&status);
        assert!(
            line_with(&text, "edge-2").contains(&long),
            "a long cell stays on its row"
        );
        let actors = &text[text.find("ACTORS").unwrap()..];
        let column = |l: &str| l.find("balancer").unwrap();
        assert_eq!(
            column(line_with(actors, "edge-1/lb")),
            column(line_with(actors, "edge-1/sensors"))
        );
    }

    #[test]
    fn tree_shows_each_supervisor_and_unreachable_nodes() {
        let text = render_tree(&sample());
        let mut lines = text.lines();
        assert_eq!(
            lines.next(),
            Some("edge-1 (root supervisor: one_for_one, max 5 restarts in 10s, 0 in window)")
        );
        let lb = lines.next().unwrap();
        let sensors = lines.next().unwrap();
        assert!(
            lb.starts_with("├── edge-1/lb ")
                && lb.contains("running")
                && lb.ends_with("restarts 0"),
            "{lb}"
        );
        assert!(
            sensors.starts_with("└── edge-1/sensors") && sensors.contains("transient"),
            "{sensors}"
        );
        assert!(
            sensors.contains("restarts 2") && sensors.contains("sensor bus went away (12s ago)"),
            "{sensors}"
        );
        assert_eq!(
            lb.find("balancer"),
            sensors.find("balancer"),
            "columns align"
        );
        assert_eq!(lines.next(), Some(""));
        assert_eq!(
            lines.next(),
            Some("edge-2 (unreachable: call timed out after 1s)")
        );
    }

    #[test]
    fn tree_shows_children_an_actor_reports() {
        let mut status = sample();
        let actors = &mut status.nodes[0].status.as_mut().unwrap().actors;
        actors[0].detail = serde_json::json!({
            "children": [
                {"address": "edge-1/lb/dev-1", "kind": "connection", "state": "running", "info": "mqtt 5"},
                {"address": "edge-1/lb/d2", "kind": "connection", "state": "running"},
            ],
            "children_total": 3,
        });
        let text = render_tree(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("├── edge-1/lb "), "{text}");
        assert_eq!(
            lines[2],
            "│   ├── edge-1/lb/dev-1  connection  running  mqtt 5"
        );
        assert_eq!(lines[3], "│   ├── edge-1/lb/d2     connection  running");
        assert_eq!(lines[4], "│   └── ... and 1 more");
        assert!(lines[5].starts_with("└── edge-1/sensors"), "{text}");
    }

    #[test]
    fn numbers_read_naturally() {
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(192_000), "3m12s");
        assert_eq!(duration_ms(7_500_000), "2h05m");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(loss(0, 0), "-");
        assert_eq!(loss(1, 3), "33.33%");
    }
}
