//! The operating-system side of a tunnel: the TUN device, its addresses and routes, IP
//! forwarding and source NAT. Uses the `tun` crate for the device and iproute2's `ip` and
//! nftables' `nft` for the rest, so what Colony sets up is what an operator would type.
//!
//! The device is created non-persistent: it disappears with the process, and its addresses and
//! routes with it. The NAT table is removed when the [`Nat`] guard drops (and replaced if a
//! crashed run left it behind); forwarding goes back to what it was when the [`Forwarding`] guard
//! of the namespace's last router drops.

use std::process::Command;
use std::sync::Arc;

use colony_config::tunnel::{IpNet, TunnelAddresses};

/// A TUN device that is up, with its addresses and routes.
pub struct TunDevice {
    /// The device, shared by the reading and writing tasks.
    pub io: Arc<tun::AsyncDevice>,
    /// Its name.
    pub name: String,
}

/// Runs `program args`; an error carries the command and its stderr.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates the device `name` with `mtu`, brings it up, assigns `addrs` and installs `routes`.
pub fn open(
    name: &str,
    mtu: u16,
    addrs: &TunnelAddresses,
    routes: &[IpNet],
) -> Result<TunDevice, String> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).mtu(mtu).up();
    let dev = tun::create_as_async(&config)
        .map_err(|e| format!("cannot create TUN device {name}: {e}"))?;
    if let Some(v4) = addrs.ipv4 {
        run("ip", &["addr", "add", &v4.to_string(), "dev", name])?;
    }
    if let Some(v6) = addrs.ipv6 {
        // nodad: the address is usable at once instead of after duplicate detection.
        run(
            "ip",
            &["-6", "addr", "add", &v6.to_string(), "dev", name, "nodad"],
        )?;
    }
    run("ip", &["link", "set", "dev", name, "up"])?;
    for route in routes {
        let family = if route.is_ipv4() { "-4" } else { "-6" };
        run(
            "ip",
            &[
                family,
                "route",
                "replace",
                &route.network().to_string(),
                "dev",
                name,
            ],
        )?;
    }
    Ok(TunDevice {
        io: Arc::new(dev),
        name: name.to_owned(),
    })
}

/// Lets packets with one of this host's own addresses as source come in through `device`: the
/// ICMP answers a tunnel writes to its device come from its own tunnel address, which Linux
/// would otherwise drop as martian. Best effort (IPv6 has no such check).
pub fn accept_local(device: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{device}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!("cannot set {path}: {e}");
    }
}

/// The forwarding switches a router turns on.
const FORWARDING: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// Serialises routers (of every Colony process on the host) taking and giving back forwarding.
const FORWARDING_LOCK: &str = "/run/colony/forwarding.lock";

/// Prefix of the abstract socket names that mark routers holding forwarding on.
const HOLDER_PREFIX: &str = "colony-forwarding-";

/// IP forwarding held on for a router; dropping it puts back the values found before the first
/// router of this network namespace turned it on, once no other router here holds it.
///
/// Each router holding forwarding binds an abstract Unix socket named
/// `colony-forwarding-<ipv4 value><ipv6 value>-<pid>-<n>`, carrying the values from before the
/// first router. Abstract sockets belong to the network namespace, so the holders of this
/// namespace are exactly the ones `/proc/self/net/unix` lists, whatever process they are in, and
/// a killed router's socket disappears with it. A router that was killed cannot restore anything:
/// if all of a namespace's routers are killed, forwarding stays on (the next router to stop
/// leaves it as it found it).
pub struct Forwarding {
    saved: String,
    _holder: std::os::unix::net::UnixListener,
    name: String,
}

static HOLDERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Holds the host-wide forwarding lock while it lives.
fn lock_forwarding() -> Result<std::fs::File, String> {
    let path = std::path::Path::new(FORWARDING_LOCK);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let lock =
        std::fs::File::create(path).map_err(|e| format!("cannot open {FORWARDING_LOCK}: {e}"))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {FORWARDING_LOCK}: {e}"))?;
    Ok(lock)
}

/// The names (without the prefix) of the holder sockets of this network namespace.
fn holders() -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/net/unix").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|p| p.strip_prefix('@')?.strip_prefix(HOLDER_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// The forwarding values as one string, `"01"` for IPv4 off and IPv6 on.
fn forwarding_now() -> Result<String, String> {
    let mut out = String::new();
    for path in FORWARDING {
        let v = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        out.push(if v.trim() == "0" { '0' } else { '1' });
    }
    Ok(out)
}

/// Turns on IPv4 and IPv6 forwarding in this network namespace (a router's job), remembering
/// the values from before for [`Forwarding`]'s drop.
pub fn enable_forwarding() -> Result<Forwarding, String> {
    use std::os::linux::net::SocketAddrExt;
    let _lock = lock_forwarding()?;
    // Another router here knows the values from before; else they are the ones set now.
    let saved = match holders().first() {
        Some(h) => h.chars().take(FORWARDING.len()).collect(),
        None => forwarding_now()?,
    };
    let n = HOLDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{HOLDER_PREFIX}{saved}-{}-{n}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("cannot name socket {name}: {e}"))?;
    let holder = std::os::unix::net::UnixListener::bind_addr(&addr)
        .map_err(|e| format!("cannot bind socket @{name}: {e}"))?;
    let guard = Forwarding {
        saved,
        _holder: holder,
        name,
    };
    for path in FORWARDING {
        std::fs::write(path, "1").map_err(|e| format!("cannot enable forwarding ({path}): {e}"))?;
    }
    Ok(guard)
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let Ok(_lock) = lock_forwarding() else {
            return;
        };
        let me = &self.name[HOLDER_PREFIX.len()..];
        if holders().iter().any(|h| h != me) {
            return;
        }
        for (path, value) in FORWARDING.iter().zip(self.saved.chars()) {
            if let Err(e) = std::fs::write(path, value.to_string()) {
                tracing::warn!("restoring {path}: {e}");
            }
        }
    }
}

/// Source NAT (masquerade) of traffic leaving by an egress interface; removed on drop.
pub struct Nat {
    table: String,
}

impl Nat {
    /// Masquerades IPv4 and IPv6 traffic leaving by `egress`, in an nftables table of its own.
    pub fn install(table: &str, egress: &str) -> Result<Nat, String> {
        if egress.contains(['"', '\n', ';']) {
            return Err(format!("'{egress}' is not an interface name"));
        }
        let _ = run("nft", &["delete", "table", "inet", table]);
        run("nft", &["add", "table", "inet", table])?;
        let nat = Nat {
            table: table.to_owned(),
        };
        run(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                table,
                "postrouting",
                "{ type nat hook postrouting priority 100 ; }",
            ],
        )?;
        run(
            "nft",
            &[
                "add",
                "rule",
                "inet",
                table,
                "postrouting",
                "oifname",
                egress,
                "masquerade",
            ],
        )?;
        Ok(nat)
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        if let Err(e) = run("nft", &["delete", "table", "inet", &self.table]) {
            tracing::warn!("removing NAT: {e}");
        }
    }
}
