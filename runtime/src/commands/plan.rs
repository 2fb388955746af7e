//! `colony plan CONFIG`: what the cluster will move, per flow, node and link, estimated from the
//! config ([`crate::plan`]); with `--measure`, next to what a running cluster's status shows.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use colony_config::{ClusterConfig, FileChecks};

use crate::control::client;
use crate::control::protocol::{ClusterStatus, NodeStatus, Request};
use crate::plan::{Flow, OVERHEADS, Plan, estimate};
use crate::render::{push_table, table};

/// `colony plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The cluster config.
    pub config: PathBuf,
    /// Also measure the running cluster (through --node's control socket) and compare.
    #[arg(long, requires = "node")]
    pub measure: bool,
    /// The node whose control socket answers for the cluster (with --measure).
    #[arg(long)]
    pub node: Option<String>,
    /// Seconds to measure over (two status snapshots this far apart).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// The state directory the nodes run with, if not the config's.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Runs `colony plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let config =
        crate::config_load::load(&args.config, args.state_dir.as_deref(), FileChecks::Skip)
            .map_err(|e| anyhow!("{e}"))?;
    let plan = estimate(&config);
    let measured = if args.measure {
        let node = args.node.as_deref().unwrap_or_default();
        Some(measure(&config, node, Duration::from_secs(args.seconds))?)
    } else {
        None
    };
    let comparison = measured.as_ref().map(|m| compare(&plan, m));
    if args.json {
        let value = serde_json::json!({ "plan": plan, "measured": comparison });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render(&plan));
        if let Some(rows) = &comparison {
            print!("{}", render_comparison(rows, args.seconds));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Two status snapshots `window` apart.
pub struct Measured {
    /// The first.
    pub before: ClusterStatus,
    /// The second.
    pub after: ClusterStatus,
    /// The time between them.
    pub elapsed: Duration,
}

fn measure(config: &ClusterConfig, node: &str, window: Duration) -> anyhow::Result<Measured> {
    let node_config = config
        .node(node)
        .ok_or_else(|| anyhow!("no node named '{node}' in the config"))?;
    let socket = config.control_socket(node_config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = |socket: &std::path::Path| -> anyhow::Result<ClusterStatus> {
        let value = runtime.block_on(client::request(
            socket,
            Request::Status,
            Duration::from_secs(10),
        ))?;
        serde_json::from_value(value).context("the node's status does not have the expected shape")
    };
    let before = status(&socket)?;
    let started = Instant::now();
    std::thread::sleep(window);
    let after = status(&socket)?;
    if after.nodes.iter().all(|n| n.status.is_none()) {
        bail!("no node of the cluster answered");
    }
    Ok(Measured {
        before,
        after,
        elapsed: started.elapsed(),
    })
}

/// One line of the estimate-versus-measurement table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Compared {
    /// What is compared.
    pub what: String,
    /// The unit of both figures.
    pub unit: &'static str,
    /// From the config.
    pub estimated: f64,
    /// From status; `None` when the cluster does not report it (node down, actor missing).
    pub measured: Option<f64>,
}

/// The estimate next to what the cluster measured: per sensor group, broker, collector and link.
pub fn compare(plan: &Plan, m: &Measured) -> Vec<Compared> {
    let secs = m.elapsed.as_secs_f64().max(0.001);
    let mut rows = Vec::new();
    let sum = |pred: &dyn Fn(&Flow) -> bool| -> f64 {
        plan.flows
            .iter()
            .filter(|f| pred(f))
            .map(|f| f.messages_per_sec)
            .sum()
    };
    // An actor's detail counter, as a rate over the window.
    let rate = |address: &str, key: &str| -> Option<f64> {
        let a = detail_u64(&m.before, address, key)?;
        let b = detail_u64(&m.after, address, key)?;
        Some(b.saturating_sub(a) as f64 / secs)
    };
    for (address, kind) in actors(&m.after) {
        match kind.as_str() {
            "sensor_group" => rows.push(Compared {
                what: format!("{address} readings sent"),
                unit: "msg/s",
                estimated: sum(&|f| f.from == address && f.what == "readings"),
                measured: rate(&address, "readings_sent"),
            }),
            "broker" => {
                rows.push(Compared {
                    what: format!("{address} messages in"),
                    unit: "msg/s",
                    estimated: sum(&|f| {
                        f.to == address && matches!(f.what.as_str(), "readings" | "bridged")
                    }),
                    measured: rate(&address, "messages_in"),
                });
                rows.push(Compared {
                    what: format!("{address} messages out"),
                    unit: "msg/s",
                    estimated: sum(&|f| f.from == address),
                    measured: rate(&address, "messages_out"),
                });
            }
            "collector" => rows.push(Compared {
                what: format!("{address} readings stored"),
                unit: "msg/s",
                estimated: plan.stored_per_sec.get(&address).copied().unwrap_or(0.0),
                measured: rate(&address, "stored"),
            }),
            _ => {}
        }
    }
    for link in &plan.links {
        for (from, to, estimated) in [
            (&link.a, &link.b, link.bits_a_to_b),
            (&link.b, &link.a, link.bits_b_to_a),
        ] {
            let bytes = |s: &ClusterStatus| -> Option<u64> {
                node_status(s, from)?
                    .links
                    .iter()
                    .find(|l| l.peer == *to)
                    .map(|l| l.bytes_out)
            };
            let measured = match (bytes(&m.before), bytes(&m.after)) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 * 8.0 / secs),
                _ => None,
            };
            rows.push(Compared {
                what: format!("link {from} -> {to}"),
                unit: "bit/s",
                estimated,
                measured,
            });
        }
    }
    rows
}

fn node_status<'a>(s: &'a ClusterStatus, node: &str) -> Option<&'a NodeStatus> {
    s.nodes
        .iter()
        .find(|n| n.node == node)
        .and_then(|n| n.status.as_ref())
}

fn actors(s: &ClusterStatus) -> Vec<(String, String)> {
    s.nodes
        .iter()
        .filter_map(|n| n.status.as_ref())
        .flat_map(|n| n.actors.iter())
        .map(|a| (a.address.clone(), a.kind.clone()))
        .collect()
}

fn detail_u64(s: &ClusterStatus, address: &str, key: &str) -> Option<u64> {
    s.nodes
        .iter()
        .filter_map(|n| n.status.as_ref())
        .flat_map(|n| n.actors.iter())
        .find(|a| a.address == address)?
        .detail
        .get(key)?
        .as_u64()
}

/// The estimate as tables.
pub fn render(plan: &Plan) -> String {
    let mut out = String::from("FLOWS (estimated from the config)\n");
    let mut t = table(
        &[
            "from",
            "to",
            "via",
            "what",
            "msg/s",
            "payload",
            "on wire",
            "bandwidth",
            "acks back",
        ],
        &[4, 5, 6, 7, 8],
    );
    for f in &plan.flows {
        t.add_row(vec![
            f.from.clone(),
            f.to.clone(),
            if f.crosses_nodes() {
                f.transport.as_str().to_owned()
            } else {
                format!("{} (same node)", f.transport.as_str())
            },
            f.what.clone(),
            rate(f.messages_per_sec),
            format!("{} B", f.payload_bytes),
            format!("{} B", f.wire_bytes),
            bits(f.bits_per_sec()),
            bits(f.ack_bits_per_sec()),
        ]);
    }
    push_table(&mut out, &t);

    out.push_str("\nNODES (bandwidth counts what crosses to other nodes or outside)\n");
    let mut t = table(
        &["node", "msg/s in", "msg/s out", "in", "out"],
        &[1, 2, 3, 4],
    );
    for (name, n) in &plan.nodes {
        t.add_row(vec![
            name.clone(),
            rate(n.messages_in_per_sec),
            rate(n.messages_out_per_sec),
            bits(n.bits_in_per_sec),
            bits(n.bits_out_per_sec),
        ]);
    }
    push_table(&mut out, &t);

    out.push_str("\nCLUSTER LINKS (QUIC; bandwidth includes keep-alives)\n");
    let mut t = table(
        &["link", "msg/s →", "msg/s ←", "→", "←", "keep-alive"],
        &[1, 2, 3, 4, 5],
    );
    for l in &plan.links {
        t.add_row(vec![
            format!("{} ↔ {}", l.a, l.b),
            rate(l.messages_a_to_b),
            rate(l.messages_b_to_a),
            bits(l.bits_a_to_b),
            bits(l.bits_b_to_a),
            bits(l.keepalive_bits),
        ]);
    }
    push_table(&mut out, &t);

    if !plan.stored_per_sec.is_empty() {
        out.push_str("\nCOLLECTORS\n");
        let mut t = table(&["collector", "readings stored/s"], &[1]);
        for (c, r) in &plan.stored_per_sec {
            t.add_row(vec![c.clone(), rate(*r)]);
        }
        push_table(&mut out, &t);
    }

    let o = OVERHEADS;
    out.push_str(&format!(
        "\nOVERHEADS per message: MQTT PUBLISH headers counted exactly (fixed header, topic, packet \
         id), acks {} B each (1 at QoS 1, 3 at QoS 2); TCP/IPv4 {} B per segment; TLS 1.3 {} B per \
         record; cluster messages: Colony frame {} B + envelope {} B + both addresses, QUIC {} B \
         + UDP/IPv4 {} B per packet. One segment or packet per message: exact at sensor rates, an \
         upper bound when busy links pack many messages per packet.\n",
        o.mqtt_ack, o.tcp_ip, o.tls_record, o.colony_frame, o.envelope, o.quic_packet, o.udp_ip
    ));
    for note in &plan.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

fn render_comparison(rows: &[Compared], seconds: u64) -> String {
    let mut out = format!("\nESTIMATED vs MEASURED (status over {seconds} s)\n");
    let mut t = table(
        &["what", "estimated", "measured", "measured/estimated"],
        &[1, 2, 3],
    );
    for r in rows {
        let fmt = |v: f64| {
            if r.unit == "bit/s" {
                bits(v)
            } else {
                format!("{} {}", rate(v), r.unit)
            }
        };
        t.add_row(vec![
            r.what.clone(),
            fmt(r.estimated),
            r.measured.map_or_else(|| "-".to_owned(), fmt),
            match r.measured {
                Some(m) if r.estimated > 0.0 => format!("{:.2}", m / r.estimated),
                _ => "-".to_owned(),
            },
        ]);
    }
    push_table(&mut out, &t);
    out
}

/// A rate with sensible precision: "0.5", "12.0", "2,000".
fn rate(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        let n = v.round() as u64;
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
}

/// Bits per second in decimal units: "800 bit/s", "1.6 kbit/s", "12.3 Mbit/s".
fn bits(v: f64) -> String {
    const UNITS: [&str; 4] = ["kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"];
    if v < 1000.0 {
        return format!("{v:.0} bit/s");
    }
    let mut value = v / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(rate(0.5), "0.5");
        assert_eq!(rate(2000.0), "2,000");
        assert_eq!(rate(1_234_567.0), "1,234,567");
        assert_eq!(bits(800.0), "800 bit/s");
        assert_eq!(bits(1600.0), "1.6 kbit/s");
        assert_eq!(bits(12_300_000.0), "12.3 Mbit/s");
    }
}
