//! The operating-system side of a tunnel: the TUN device, its addresses and routes, IP
//! forwarding and source NAT. Uses the `tun` crate for the device and iproute2's `ip` and
//! nftables' `nft` for the rest, so what Colony sets up is what an operator would type.
//!
//! The device is created non-persistent: it disappears with the process, and its addresses and
//! routes with it. The NAT table is removed when the [`Nat`] guard drops (and replaced if a
//! crashed run left it behind).

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

/// Turns on IPv4 and IPv6 forwarding in this network namespace (a router's job).
pub fn enable_forwarding() -> Result<(), String> {
    for path in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        std::fs::write(path, "1").map_err(|e| format!("cannot enable forwarding ({path}): {e}"))?;
    }
    Ok(())
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
