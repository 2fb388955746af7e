//! Tunnel addressing: IP networks written `addr/prefix`, address pools, and which tunnel address
//! each endpoint gets.
//!
//! An endpoint's tunnel addresses come from its own `ipv4`/`ipv6` keys, or else from its `pool`:
//! the n-th endpoint (in config order) that draws from a pool gets `base + n`. The assignment is a
//! pure function of the config, so it is the same on every node and across restarts, and
//! validation checks that no two tunnels in the cluster share an address and that distinct pools
//! do not overlap. Append new endpoints after existing ones to keep earlier assignments.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::kinds::{ActorSettings, TunnelRole, TunnelSettings};
use crate::model::ClusterConfig;

/// An IP address with a prefix length, `10.77.0.1/24` or `fd77::1/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    /// The address (not necessarily the network's first).
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl IpNet {
    /// True for an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The address `offset` after this one, or `None` past the end of the address family.
    pub fn offset(&self, offset: u32) -> Option<IpNet> {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a).checked_add(offset)?)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                u128::from(a).checked_add(u128::from(offset))?,
            )),
        };
        Some(IpNet {
            addr,
            prefix: self.prefix,
        })
    }

    /// The network part, as `addr/prefix` with the host bits cleared.
    pub fn network(&self) -> IpNet {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        IpNet {
            addr,
            prefix: self.prefix,
        }
    }

    /// True when `ip` lies inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        IpNet {
            addr: ip,
            prefix: self.prefix,
        }
        .network()
            == self.network()
            && ip.is_ipv4() == self.is_ipv4()
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not an address with a prefix length (addr/len)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("'{prefix}' is not a prefix length from 0 to {max}"))?;
        Ok(IpNet { addr, prefix })
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A pool endpoints draw tunnel addresses from: `size` consecutive addresses from each base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelPool {
    /// First IPv4 address handed out, with the tunnel network's prefix length.
    #[serde(default)]
    pub ipv4: Option<IpNet>,
    /// First IPv6 address handed out, with the tunnel network's prefix length.
    #[serde(default)]
    pub ipv6: Option<IpNet>,
    /// How many addresses the pool holds (its range).
    pub size: u32,
}

/// The tunnel addresses one tunnel actor uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TunnelAddresses {
    /// Its IPv4 address and network.
    pub ipv4: Option<IpNet>,
    /// Its IPv6 address and network.
    pub ipv6: Option<IpNet>,
}

/// The tunnel actors of `config`, in config order.
fn tunnels(config: &ClusterConfig) -> impl Iterator<Item = (usize, Address, &TunnelSettings)> {
    config
        .actors
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match &a.settings {
            ActorSettings::Tunnel(t) => Some((i, a.address(), t)),
            _ => None,
        })
}

/// The tunnel addresses of the tunnel actor at `address`, from its settings or its pool.
pub fn tunnel_addresses(
    config: &ClusterConfig,
    address: &Address,
) -> Result<TunnelAddresses, String> {
    let mut seen_in_pool: Vec<(&TunnelPool, u32)> = Vec::new();
    for (_, at, t) in tunnels(config) {
        let index = match &t.pool {
            Some(pool) if t.ipv4.is_none() || t.ipv6.is_none() => {
                match seen_in_pool.iter_mut().find(|(p, _)| *p == pool) {
                    Some((_, n)) => {
                        *n += 1;
                        *n - 1
                    }
                    None => {
                        seen_in_pool.push((pool, 1));
                        0
                    }
                }
            }
            _ => 0,
        };
        if at != *address {
            continue;
        }
        let from_pool = |base: Option<IpNet>, pool: &TunnelPool| -> Result<Option<IpNet>, String> {
            let Some(base) = base else { return Ok(None) };
            if index >= pool.size {
                return Err(format!(
                    "pool from {base} holds {} addresses; {address} would be number {}",
                    pool.size,
                    index + 1
                ));
            }
            base.offset(index)
                .map(Some)
                .ok_or_else(|| format!("pool from {base} runs past the end of the address space"))
        };
        let mut out = TunnelAddresses {
            ipv4: t.ipv4,
            ipv6: t.ipv6,
        };
        if let Some(pool) = &t.pool {
            if out.ipv4.is_none() {
                out.ipv4 = from_pool(pool.ipv4, pool)?;
            }
            if out.ipv6.is_none() {
                out.ipv6 = from_pool(pool.ipv6, pool)?;
            }
        }
        return Ok(out);
    }
    Err(format!("{address} is not a tunnel in this config"))
}

/// Every endpoint whose `peers` include `router`, with its tunnel addresses.
pub fn endpoints_of(config: &ClusterConfig, router: &Address) -> Vec<(Address, TunnelAddresses)> {
    tunnels(config)
        .filter(|(_, _, t)| t.role == TunnelRole::Endpoint && t.peers.contains(router))
        .filter_map(|(_, a, _)| tunnel_addresses(config, &a).ok().map(|addrs| (a, addrs)))
        .collect()
}

/// Problems with tunnel addressing across the cluster: (actor index, key, message).
pub(crate) fn problems(config: &ClusterConfig) -> Vec<(usize, &'static str, String)> {
    let mut out = Vec::new();
    // Distinct pools must not overlap.
    let pools: Vec<(usize, &TunnelPool)> = tunnels(config)
        .filter_map(|(i, _, t)| t.pool.as_ref().map(|p| (i, p)))
        .collect();
    for (n, (i, a)) in pools.iter().enumerate() {
        if a.size == 0 {
            out.push((*i, "pool", "a pool needs a size of at least 1".to_owned()));
        }
        for (j, b) in pools.iter().skip(n + 1) {
            if a == b {
                continue;
            }
            let overlap = |x: Option<IpNet>, y: Option<IpNet>| match (x, y) {
                (Some(x), Some(y)) => ranges_overlap(x.addr, a.size, y.addr, b.size),
                _ => false,
            };
            if overlap(a.ipv4, b.ipv4) || overlap(a.ipv6, b.ipv6) {
                out.push((
                    *j,
                    "pool",
                    format!("this pool overlaps the pool of actor #{}", i + 1),
                ));
            }
        }
    }
    // Every tunnel's addresses resolve and are unique.
    let mut taken: Vec<(IpAddr, usize)> = Vec::new();
    for (i, address, t) in tunnels(config) {
        if t.ipv4.is_some_and(|n| !n.is_ipv4()) {
            out.push((i, "ipv4", "`ipv4` must be an IPv4 address".to_owned()));
        }
        if t.ipv6.is_some_and(|n| n.is_ipv4()) {
            out.push((i, "ipv6", "`ipv6` must be an IPv6 address".to_owned()));
        }
        if let Some(p) = &t.pool
            && (p.ipv4.is_some_and(|n| !n.is_ipv4()) || p.ipv6.is_some_and(|n| n.is_ipv4()))
        {
            out.push((
                i,
                "pool",
                "pool `ipv4` and `ipv6` must be of their family".to_owned(),
            ));
        }
        match tunnel_addresses(config, &address) {
            Err(e) => out.push((i, "pool", e)),
            Ok(addrs) => {
                for ip in [addrs.ipv4, addrs.ipv6].into_iter().flatten() {
                    if let Some((_, first)) = taken.iter().find(|(a, _)| *a == ip.addr) {
                        out.push((
                            i,
                            if ip.is_ipv4() { "ipv4" } else { "ipv6" },
                            format!(
                                "tunnel address {} is also used by actor #{}",
                                ip.addr,
                                first + 1
                            ),
                        ));
                    } else {
                        taken.push((ip.addr, i));
                    }
                }
            }
        }
    }
    out
}

fn ranges_overlap(a: IpAddr, a_len: u32, b: IpAddr, b_len: u32) -> bool {
    let as_u128 = |ip: IpAddr| match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    };
    let (a, b) = (as_u128(a), as_u128(b));
    a < b + u128::from(b_len) && b < a + u128::from(a_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(actors: &str) -> Result<ClusterConfig, String> {
        let src = format!(
            "[cluster]\nname = \"t\"\n[[node]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\n\
             [[node]]\nname = \"b\"\nlisten = \"127.0.0.1:7001\"\n{actors}"
        );
        ClusterConfig::from_toml_str(&src, "t.toml").map_err(|e| e.to_string())
    }

    const ROUTER: &str = "[[actor]]\nname = \"r\"\nnode = \"b\"\nkind = \"tunnel\"\nrole = \"router\"\nipv4 = \"10.77.0.1/24\"\n";

    #[test]
    fn parses_networks() {
        let n: IpNet = "10.1.2.3/24".parse().unwrap();
        assert_eq!(n.network().to_string(), "10.1.2.0/24");
        assert!(n.contains("10.1.2.200".parse().unwrap()));
        assert!(!n.contains("10.1.3.1".parse().unwrap()));
        assert!("10.1.2.3/33".parse::<IpNet>().is_err());
        assert!("10.1.2.3".parse::<IpNet>().is_err());
        let v6: IpNet = "fd77::5/64".parse().unwrap();
        assert_eq!(v6.offset(3).unwrap().addr.to_string(), "fd77::8");
    }

    #[test]
    fn pool_assigns_in_config_order_and_stably() {
        let ep = |name: &str| {
            format!(
                "[[actor]]\nname = \"{name}\"\nnode = \"a\"\nkind = \"tunnel\"\nrole = \"endpoint\"\npeers = [\"b/r\"]\n\
                 pool = {{ ipv4 = \"10.77.0.10/24\", ipv6 = \"fd77::10/64\", size = 10 }}\n"
            )
        };
        let c = config(&format!("{ROUTER}{}{}", ep("e1"), ep("e2"))).unwrap();
        let e2 = tunnel_addresses(&c, &"a/e2".parse().unwrap()).unwrap();
        assert_eq!(e2.ipv4.unwrap().to_string(), "10.77.0.11/24");
        assert_eq!(e2.ipv6.unwrap().to_string(), "fd77::11/64");
        let e1 = tunnel_addresses(&c, &"a/e1".parse().unwrap()).unwrap();
        assert_eq!(e1.ipv4.unwrap().to_string(), "10.77.0.10/24");
        // Appending an endpoint keeps the earlier ones.
        let c2 = config(&format!("{ROUTER}{}{}{}", ep("e1"), ep("e2"), ep("e3"))).unwrap();
        assert_eq!(tunnel_addresses(&c2, &"a/e2".parse().unwrap()).unwrap(), e2);
        assert_eq!(endpoints_of(&c2, &"b/r".parse().unwrap()).len(), 3);
    }

    #[test]
    fn overlapping_pools_and_duplicates_are_refused() {
        let ep = |name: &str, base: &str, size: u32| {
            format!(
                "[[actor]]\nname = \"{name}\"\nnode = \"a\"\nkind = \"tunnel\"\nrole = \"endpoint\"\n\
                 pool = {{ ipv4 = \"{base}/24\", size = {size} }}\n"
            )
        };
        let e = config(&format!(
            "{}{}",
            ep("e1", "10.77.0.10", 10),
            ep("e2", "10.77.0.15", 10)
        ))
        .unwrap_err();
        assert!(e.contains("overlaps"), "{e}");
        let e = config(&format!("{ROUTER}{}", ep("e1", "10.77.0.1", 1))).unwrap_err();
        assert!(e.contains("also used"), "{e}");
        let e = config(&format!(
            "{}{}",
            ep("e1", "10.77.0.10", 1),
            ep("e2", "10.77.0.10", 1)
        ))
        .unwrap_err();
        assert!(e.contains("holds 1 addresses"), "{e}");
    }
}
