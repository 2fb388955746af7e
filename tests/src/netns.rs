//! Network namespaces for tunnel tests: created by the test, always removed (a drop guard), with
//! names unique to the process so tests run in parallel. Traffic only ever goes to addresses
//! inside these namespaces; the host's own interfaces are never touched (veth pairs are created
//! directly inside their namespaces).

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::assert_success;

/// Runs `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A set of namespaces, removed on drop.
pub struct Netns {
    prefix: String,
    names: Vec<String>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// A fresh set; every name it makes starts with `c<pid><n>`.
    pub fn new() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Netns {
            prefix: format!("c{}{}", std::process::id(), (b'a' + (n % 26) as u8) as char),
            names: Vec::new(),
        }
    }

    /// True when namespaces can be made here (root, iproute2 present).
    pub fn available() -> bool {
        // SAFETY-free check: only root may create namespaces.
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            && Command::new("ip").arg("-V").output().is_ok()
    }

    /// The full name of this set's namespace or interface `short`.
    pub fn name(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// Creates namespace `short` with its loopback up; returns its full name.
    pub fn add(&mut self, short: &str) -> String {
        let name = self.name(short);
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Joins namespaces `a` and `b` (full names) with a veth pair named `<a-short>` /
    /// `<b-short>` (full interface names returned), addressed with the given `addr/len` lists.
    pub fn link(
        &self,
        a: &str,
        a_if: &str,
        a_addrs: &[&str],
        b: &str,
        b_if: &str,
        b_addrs: &[&str],
    ) -> (String, String) {
        let (ai, bi) = (self.name(a_if), self.name(b_if));
        ip(&[
            "-n", a, "link", "add", &ai, "type", "veth", "peer", "name", &bi, "netns", b,
        ]);
        for (ns, ifname, addrs) in [(a, &ai, a_addrs), (b, &bi, b_addrs)] {
            for addr in addrs {
                if addr.contains(':') {
                    ip(&["-n", ns, "-6", "addr", "add", addr, "dev", ifname, "nodad"]);
                } else {
                    ip(&["-n", ns, "addr", "add", addr, "dev", ifname]);
                }
            }
            ip(&["-n", ns, "link", "set", ifname, "up"]);
        }
        (ai, bi)
    }

    /// Runs `program args` inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// A command that runs `program` inside `ns` (to spawn).
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// An nftables counter of ICMP echo requests arriving in a namespace (the server's), so a test
/// can tell how many copies of its pings reached it.
pub struct EchoCounter {
    name: String,
}

impl EchoCounter {
    /// Installs the counter in namespace `name` of `ns` (removed with the namespace).
    pub fn install(ns: &Netns, name: &str) -> EchoCounter {
        for cmd in [
            "add table inet colonytest",
            "add chain inet colonytest input { type filter hook input priority 0 ; }",
            "add rule inet colonytest input icmp type echo-request counter",
            "add rule inet colonytest input icmpv6 type echo-request counter",
        ] {
            let out = ns.exec(name, "nft", &cmd.split(' ').collect::<Vec<_>>());
            assert_success(&out, &format!("nft {cmd}"));
        }
        EchoCounter {
            name: name.to_owned(),
        }
    }

    /// Echo requests (IPv4 and IPv6) counted so far.
    pub fn requests(&self, ns: &Netns) -> u64 {
        let out = ns.exec(&self.name, "nft", &["list", "table", "inet", "colonytest"]);
        String::from_utf8_lossy(&out.stdout)
            .split("packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

/// Options of a [`TunnelLab`].
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The endpoint's probe interval.
    pub probe_interval_ms: u64,
    /// The endpoint's recovery hold.
    pub recovery_hold_ms: u64,
    /// Redundant mode.
    pub redundant: bool,
    /// The endpoint follows the balancer `edge/lb`.
    pub follow_balancer: bool,
    /// The balancer's anti-flap hold time.
    pub balancer_hold_secs: u64,
    /// How often routers report (and the balancer's report interval).
    pub report_interval_secs: u64,
    /// The endpoint's device MTU (the tunnel's default when `None`).
    pub endpoint_mtu: Option<u16>,
    /// The routers' device MTU (the tunnel's default when `None`).
    pub router_mtu: Option<u16>,
    /// More config appended as is (more actors).
    pub extra_config: String,
    /// Turn IPv4 and IPv6 forwarding on in router B's namespace before its node starts.
    pub preset_forwarding_rb: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            probe_interval_ms: 20,
            recovery_hold_ms: 2000,
            redundant: false,
            follow_balancer: false,
            balancer_hold_secs: 30,
            report_interval_secs: 10,
            endpoint_mtu: None,
            router_mtu: None,
            extra_config: String::new(),
            preset_forwarding_rb: false,
        }
    }
}

/// An endpoint namespace `e`, two router namespaces `ra` and `rb` joined to it by veth pairs,
/// and a server namespace `s` behind both routers with `10.99.0.1` and `fd99::1`; a node in each
/// of `e`, `ra`, `rb` running the endpoint (`edge/tun`, plus the balancer `edge/lb`) and the two
/// routers (`ra/tun`, `rb/tun`, with NAT on their server-side interface).
pub struct TunnelLab {
    /// The nodes, by name: `edge`, `ra`, `rb` (killed before the namespaces go).
    pub nodes: Vec<crate::NodeProc>,
    /// Config and certificates.
    pub work: crate::Workdir,
    /// The namespaces (dropped last).
    pub ns: Netns,
    /// Full names of the endpoint, router and server namespaces.
    pub e: String,
    /// Router A's namespace.
    pub ra: String,
    /// Router B's namespace.
    pub rb: String,
    /// The server's namespace.
    pub s: String,
    /// Router A's and B's server-side interfaces.
    pub egress: (String, String),
}

/// The server's addresses, reached through the tunnel.
pub const SERVER_V4: &str = "10.99.0.1";
/// The server's IPv6 address.
pub const SERVER_V6: &str = "fd99::1";

impl TunnelLab {
    /// Builds the namespaces only (no nodes), for the baseline without the tunnel.
    pub fn namespaces() -> (Netns, [String; 4], (String, String)) {
        let mut ns = Netns::new();
        let e = ns.add("e");
        let ra = ns.add("ra");
        let rb = ns.add("rb");
        let s = ns.add("s");
        ns.link(&e, "ea", &["10.200.1.1/24"], &ra, "ae", &["10.200.1.2/24"]);
        ns.link(&e, "eb", &["10.200.2.1/24"], &rb, "be", &["10.200.2.2/24"]);
        let (ras, _) = ns.link(
            &ra,
            "as",
            &["10.201.1.1/24", "fd01:1::1/64"],
            &s,
            "sa",
            &["10.201.1.2/24", "fd01:1::2/64"],
        );
        let (rbs, _) = ns.link(
            &rb,
            "bs",
            &["10.201.2.1/24", "fd01:2::1/64"],
            &s,
            "sb",
            &["10.201.2.2/24", "fd01:2::2/64"],
        );
        ip(&["-n", &s, "addr", "add", "10.99.0.1/32", "dev", "lo"]);
        ip(&[
            "-n",
            &s,
            "-6",
            "addr",
            "add",
            "fd99::1/128",
            "dev",
            "lo",
            "nodad",
        ]);
        ip(&[
            "-n",
            &ra,
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "10.201.1.2",
        ]);
        ip(&[
            "-n",
            &ra,
            "-6",
            "route",
            "add",
            "fd99::/64",
            "via",
            "fd01:1::2",
        ]);
        ip(&[
            "-n",
            &rb,
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "10.201.2.2",
        ]);
        ip(&[
            "-n",
            &rb,
            "-6",
            "route",
            "add",
            "fd99::/64",
            "via",
            "fd01:2::2",
        ]);
        // The routers are joined directly (their nodes talk: redundant mode's notices).
        ns.link(&ra, "ab", &["10.202.0.1/30"], &rb, "ba", &["10.202.0.2/30"]);
        ip(&[
            "-n",
            &ra,
            "route",
            "add",
            "10.200.2.2/32",
            "via",
            "10.202.0.2",
        ]);
        ip(&[
            "-n",
            &rb,
            "route",
            "add",
            "10.200.1.2/32",
            "via",
            "10.202.0.1",
        ]);
        // Router B reaches the endpoint node's listen address through its own link.
        ip(&[
            "-n",
            &rb,
            "route",
            "add",
            "10.200.1.0/24",
            "via",
            "10.200.2.1",
        ]);
        (ns, [e, ra, rb, s], (ras, rbs))
    }

    /// Builds everything and waits until the endpoint has an active tunnel.
    pub fn start(opts: &LabOptions) -> TunnelLab {
        let (ns, [e, ra, rb, s], egress) = Self::namespaces();
        if opts.preset_forwarding_rb {
            let out = ns.exec(
                &rb,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            );
            assert!(out.status.success(), "sysctl in {rb}");
        }
        let router = |node: &str, v4: &str, v6: &str, egress: &str| {
            format!(
                "[[actor]]\nname = \"tun\"\nnode = \"{node}\"\nkind = \"tunnel\"\nrole = \"router\"\n\
                 ipv4 = \"{v4}\"\nipv6 = \"{v6}\"\negress = \"{egress}\"\nbalancer = \"edge/lb\"\n\
                 report_interval_secs = {}\n{}\n",
                opts.report_interval_secs,
                opts.router_mtu
                    .map(|m| format!("mtu = {m}\n"))
                    .unwrap_or_default(),
            )
        };
        let config = format!(
            r#"
[cluster]
name = "tun"
heartbeat_ms = 100
heartbeat_misses = 3

[[node]]
name = "edge"
listen = "10.200.1.1:7000"

[[node]]
name = "ra"
listen = "10.200.1.2:7000"

[[node]]
name = "rb"
listen = "10.200.2.2:7000"

[[actor]]
name = "lb"
node = "edge"
kind = "balancer"
anti_flap_hold_secs = {hold}
report_interval_secs = {report}

{ra_actor}{rb_actor}[[actor]]
name = "tun"
node = "edge"
kind = "tunnel"
role = "endpoint"
peers = ["ra/tun", "rb/tun"]
{balancer}pool = {{ ipv4 = "10.77.0.10/24", ipv6 = "fd77::10/64", size = 50 }}
routes = ["10.99.0.0/24", "fd99::/64"]
probe_interval_ms = {probe}
recovery_hold_ms = {recovery}
redundant = {redundant}
{endpoint_mtu}
{extra}
"#,
            hold = opts.balancer_hold_secs,
            report = opts.report_interval_secs,
            ra_actor = router("ra", "10.77.0.1/24", "fd77::1/64", &egress.0),
            rb_actor = router("rb", "10.77.0.2/24", "fd77::2/64", &egress.1),
            balancer = if opts.follow_balancer {
                "balancer = \"edge/lb\"\n"
            } else {
                ""
            },
            probe = opts.probe_interval_ms,
            recovery = opts.recovery_hold_ms,
            redundant = opts.redundant,
            endpoint_mtu = opts
                .endpoint_mtu
                .map(|m| format!("mtu = {m}"))
                .unwrap_or_default(),
            extra = opts.extra_config,
        );
        let work = crate::Workdir::new(&config);
        let nodes = vec![
            work.start_node_in("ra", &ra),
            work.start_node_in("rb", &rb),
            work.start_node_in("edge", &e),
        ];
        let lab = TunnelLab {
            nodes,
            work,
            ns,
            e,
            ra,
            rb,
            s,
            egress,
        };
        let up = lab.wait_both_up(std::time::Duration::from_secs(20));
        assert!(
            up,
            "the endpoint's tunnels never came up: {:?}",
            lab.work.status("edge")
        );
        lab
    }

    /// The endpoint's status detail.
    pub fn endpoint(&self) -> Option<serde_json::Value> {
        self.detail("edge/tun")
    }

    /// An actor's status detail, as the edge node reports it.
    pub fn detail(&self, address: &str) -> Option<serde_json::Value> {
        let s = self.work.status("edge")?;
        crate::actor(&s, address).map(|a| a["detail"].clone())
    }

    /// The router the endpoint sends through now (`ra/tun` or `rb/tun`).
    pub fn active(&self) -> Option<String> {
        self.endpoint()?["active"].as_str().map(str::to_owned)
    }

    /// Kills router node `name` (`ra` or `rb`) with SIGKILL.
    pub fn kill(&mut self, name: &str) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == name) {
            n.kill9();
        }
    }

    /// Starts router node `name` (`ra` or `rb`) again, in its namespace.
    pub fn restart_node(&mut self, name: &str) {
        self.nodes.retain(|n| n.name != name);
        let ns = if name == "ra" { &self.ra } else { &self.rb };
        let node = self.work.start_node_in(name, ns);
        self.nodes.push(node);
    }

    /// Waits until both of the endpoint's tunnels are up (bounded by `within`).
    pub fn wait_both_up(&self, within: std::time::Duration) -> bool {
        crate::wait_for(within, || {
            self.endpoint().is_some_and(|d| {
                d["tunnels"]
                    .as_array()
                    .is_some_and(|t| t.len() == 2 && t.iter().all(|t| t["state"] == "up"))
            })
        })
    }

    /// Reads a sysctl file (`/proc/sys/...`) inside namespace `ns`.
    pub fn sysctl(&self, ns: &str, path: &str) -> String {
        let out = self.ns.exec(ns, "cat", &[path]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `program args` in the endpoint namespace.
    pub fn in_endpoint(&self, program: &str, args: &[&str]) -> Output {
        self.ns.exec(&self.e, program, args)
    }
}

impl Drop for TunnelLab {
    fn drop(&mut self) {
        // Nodes first, while their namespaces still exist.
        self.nodes.clear();
    }
}

/// The longest run of missing sequence numbers between the first and last reply in `ping`
/// output, and the number of distinct replies.
pub fn ping_gap(output: &str) -> (u64, usize) {
    let mut seqs: Vec<u64> = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let gap = seqs.windows(2).map(|w| w[1] - w[0] - 1).max().unwrap_or(0);
    (gap, seqs.len())
}
