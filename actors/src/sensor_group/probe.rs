//! Network probes: ICMP ping (RTT, jitter, loss) through `surge-ping`, TCP connect time, and
//! name resolution time through the system resolver. Each target yields one reading's values.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use surge_ping::{Client, Config, ICMP, PingIdentifier, PingSequence};

/// How long one echo, connect or resolution may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One target's result: its reading's name and values.
pub type ProbeResult = (String, BTreeMap<String, f64>);

async fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    let mut addrs = tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| format!("resolving {host} timed out"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    addrs
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| format!("{host} has no address"))
}

/// Pings `host` `count` times: `rtt_min_ms`, `rtt_avg_ms`, `rtt_max_ms`, `jitter_ms` (mean
/// difference between consecutive RTTs), `loss_pct`, `sent`, `received`.
pub async fn ping(host: &str, count: u32, id: u16) -> Result<BTreeMap<String, f64>, String> {
    let ip = resolve(host).await?;
    let config = match ip {
        IpAddr::V4(_) => Config::default(),
        IpAddr::V6(_) => Config::builder().kind(ICMP::V6).build(),
    };
    let client = Client::new(&config).map_err(|e| format!("cannot open an ICMP socket: {e}"))?;
    let mut pinger = client.pinger(ip, PingIdentifier(id)).await;
    pinger.timeout(TIMEOUT);
    let payload = [0u8; 56];
    let mut rtts = Vec::new();
    for seq in 0..count {
        if let Ok((_, rtt)) = pinger.ping(PingSequence(seq as u16), &payload).await {
            rtts.push(rtt.as_secs_f64() * 1000.0);
        }
        if seq + 1 < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut v = BTreeMap::new();
    v.insert("sent".to_owned(), f64::from(count));
    v.insert("received".to_owned(), rtts.len() as f64);
    v.insert(
        "loss_pct".to_owned(),
        100.0 * (f64::from(count) - rtts.len() as f64) / f64::from(count.max(1)),
    );
    if !rtts.is_empty() {
        let n = rtts.len() as f64;
        v.insert(
            "rtt_min_ms".to_owned(),
            rtts.iter().copied().fold(f64::MAX, f64::min),
        );
        v.insert(
            "rtt_max_ms".to_owned(),
            rtts.iter().copied().fold(0.0, f64::max),
        );
        v.insert("rtt_avg_ms".to_owned(), rtts.iter().sum::<f64>() / n);
        let jitter = if rtts.len() > 1 {
            rtts.windows(2).map(|w| (w[1] - w[0]).abs()).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        v.insert("jitter_ms".to_owned(), jitter);
    }
    Ok(v)
}

/// Times a TCP connect to `target` (`host:port`): `connect_ms` and `ok` (1 or 0).
pub async fn tcp(target: &str) -> BTreeMap<String, f64> {
    let start = Instant::now();
    let ok = matches!(
        tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(target)).await,
        Ok(Ok(_))
    );
    let mut v = BTreeMap::new();
    v.insert("ok".to_owned(), if ok { 1.0 } else { 0.0 });
    if ok {
        v.insert(
            "connect_ms".to_owned(),
            start.elapsed().as_secs_f64() * 1000.0,
        );
    }
    v
}

/// Times a resolution of `name`: `resolve_ms`, `addresses` and `ok`.
pub async fn dns(name: &str) -> BTreeMap<String, f64> {
    let start = Instant::now();
    let r = tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((name, 0))).await;
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    let mut v = BTreeMap::new();
    match r {
        Ok(Ok(addrs)) => {
            v.insert("ok".to_owned(), 1.0);
            v.insert("resolve_ms".to_owned(), elapsed);
            v.insert("addresses".to_owned(), addrs.count() as f64);
        }
        _ => {
            v.insert("ok".to_owned(), 0.0);
        }
    }
    v
}

/// One round over every target.
pub async fn round(
    ping_targets: &[String],
    tcp_targets: &[String],
    dns_names: &[String],
    ping_count: u32,
    id: u16,
) -> (Vec<ProbeResult>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for t in ping_targets {
        match ping(t, ping_count, id).await {
            Ok(v) => out.push((format!("ping:{t}"), v)),
            Err(e) => errors.push(e),
        }
    }
    for t in tcp_targets {
        out.push((format!("tcp:{t}"), tcp(t).await));
    }
    for t in dns_names {
        out.push((format!("dns:{t}"), dns(t).await));
    }
    (out, errors)
}
