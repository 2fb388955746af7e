//! Where an MQTT client of a sensor group or collector connects: a Colony broker by address
//! (its first plain-TCP listener, from the cluster config) or any broker by URL
//! (`mqtt://host:port`, `mqtts://host:port` with a CA file), with optional credentials.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use colony_config::kinds::BrokerSettings;
use colony_config::{ActorSettings, Address, ClusterConfig};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};

/// A broker to connect to.
#[derive(Clone)]
pub struct MqttTarget {
    /// Host name or IP.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS client config for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for MqttTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(
            f,
            "{}://{}:{}",
            if self.tls.is_some() { "mqtts" } else { "mqtt" },
            self.host,
            self.port
        )
    }
}

impl MqttTarget {
    /// The first plain-TCP listener of the Colony broker at `broker`. An unspecified listen IP
    /// (0.0.0.0) is reached on loopback from the same node, else at the broker node's QUIC IP.
    pub fn colony_broker(
        config: &ClusterConfig,
        broker: &Address,
        my_node: &str,
    ) -> Result<MqttTarget, String> {
        let actor = config
            .actor(broker)
            .ok_or_else(|| format!("{broker} is not in the cluster config"))?;
        let ActorSettings::Broker(settings) = &actor.settings else {
            return Err(format!("{broker} is not a broker"));
        };
        let listener = plain_listener(settings)
            .ok_or_else(|| format!("{broker} has no plain TCP listener to connect to"))?;
        let mut ip = listener.ip();
        if ip.is_unspecified() {
            ip = if broker.node() == my_node {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                config
                    .node(broker.node())
                    .and_then(|n| n.listen)
                    .map(|a| a.ip())
                    .filter(|ip| !ip.is_unspecified())
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
            };
        }
        Ok(MqttTarget {
            host: ip.to_string(),
            port: listener.port(),
            tls: None,
            credentials: None,
        })
    }

    /// A broker by URL; `ca` (PEM) is what an `mqtts://` broker's certificate must chain to.
    pub fn url(url: &str, ca: Option<&Path>) -> Result<MqttTarget, String> {
        let (tls, host, port) = parse_url(url)?;
        let tls = if tls {
            Some(Arc::new(client_tls(ca)?))
        } else {
            None
        };
        Ok(MqttTarget {
            host,
            port,
            tls,
            credentials: None,
        })
    }

    /// Options for one client with `client_id`.
    pub fn options(&self, client_id: &str, keep_alive: Duration) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(keep_alive);
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        o
    }
}

/// Splits `mqtt://host[:port]` or `mqtts://host[:port]` (an IPv6 host in brackets) into whether
/// it is TLS, the host and the port (1883, or 8883 for TLS, when absent).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("'{url}' must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("'{url}': the port is not a number"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("'{url}' names no host"));
    }
    Ok((tls, host.to_owned(), port))
}

fn plain_listener(b: &BrokerSettings) -> Option<std::net::SocketAddr> {
    b.all_listeners()
        .into_iter()
        .find(|l| l.tls.is_none())
        .map(|l| l.bind)
}

fn client_tls(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let ca = ca.ok_or("an mqtts:// broker needs `ca` (the CA certificate, PEM)")?;
    tls_config(ca, None)
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A TLS client config trusting `ca`, with a client certificate when `cert` and `key` are given.
pub fn tls_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let pem = read_pem(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let pem = read_pem(cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!("{} holds no certificate", cert.display()));
            }
            let key_pem = read_pem(key)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = MqttTarget::url("mqtt://example.net:1884", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls.is_none()),
            ("example.net", 1884, true)
        );
        let t = MqttTarget::url("mqtt://10.0.0.1", None).unwrap();
        assert_eq!(t.port, 1883);
        assert!(MqttTarget::url("mqtts://h:1", None).is_err(), "no CA");
        assert!(MqttTarget::url("http://h", None).is_err());
        assert!(MqttTarget::url("mqtt://h:x", None).is_err());
        assert!(MqttTarget::url("mqtt://", None).is_err());
    }
}
