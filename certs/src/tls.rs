//! rustls configs for node-to-node mutual TLS 1.3 (quinn takes these for QUIC).
//!
//! Both sides of every connection prove their identity. A peer is accepted only if its
//! certificate chains to the cluster CA, is within its validity period, and its DNS name is a node
//! in the current cluster config ([`AllowedNodes`], which a hot reload may change; the check runs
//! at every handshake, so established connections are not affected; session resumption is off so
//! that every handshake is a full one). A client additionally checks
//! that the node that answered is the node it dialled: the server name to dial with is the peer's
//! node name.
//!
//! The configs carry no ALPN protocols; the transport sets those.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::{CertError, NodeIdentity, node_name_from_cert};

/// Installs rustls's ring provider as the process default; later calls do nothing.
///
/// The configs built here name their provider explicitly and do not need this, but libraries that
/// build their own rustls configs from the process default do.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all this function promises.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto every config and verifier in this crate uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The names of the nodes in the current cluster config, shared between the TLS verifiers and
/// whoever applies config reloads. Clones share one set.
#[derive(Debug, Clone, Default)]
pub struct AllowedNodes(Arc<RwLock<BTreeSet<String>>>);

impl AllowedNodes {
    /// A set holding `names`.
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self(Arc::new(RwLock::new(
            names.into_iter().map(Into::into).collect(),
        )))
    }

    /// Replaces the whole set, e.g. after a config reload; every clone sees the new set.
    pub fn replace<I, S>(&self, names: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: BTreeSet<String> = names.into_iter().map(Into::into).collect();
        // A poisoned lock still holds a whole set: writers only ever swap it in one assignment.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = names;
    }

    /// Whether `name` is a node in the cluster config.
    pub fn contains(&self, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(name)
    }

    /// The current names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The peer's node name if it is in the set, else the handshake error refusing it.
    fn admit(&self, cert: &CertificateDer<'_>) -> Result<String, rustls::Error> {
        let name = node_name_from_cert(cert).map_err(refusal)?;
        if self.contains(&name) {
            Ok(name)
        } else {
            Err(refusal(CertError::NotInCluster { name }))
        }
    }
}

/// A handshake error carrying our reason: it reads "other error: <reason>" in logs, the
/// `CertError` can be recovered by downcasting, and the peer gets a handshake_failure alert.
/// (`InvalidCertificate(Other(..))` would send certificate_unknown but prints as Debug noise.)
fn refusal(reason: CertError) -> rustls::Error {
    rustls::Error::Other(OtherError(Arc::new(reason)))
}

/// The config for accepting connections from other nodes: TLS 1.3, client certificate required,
/// chaining to the cluster CA and naming a node in `allowed`.
pub fn server_config(id: &NodeIdentity, allowed: AllowedNodes) -> Result<ServerConfig, CertError> {
    let fail = |reason: String| CertError::TlsConfig {
        side: "server",
        node: id.name().to_owned(),
        reason,
    };
    let provider = provider();
    let roots = cluster_roots(id).map_err(|e| fail(e.to_string()))?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?
        .with_client_cert_verifier(Arc::new(ClusterClientVerifier { inner, allowed }))
        .with_single_cert(id.chain().to_vec(), id.key().clone_key())
        .map_err(|e| fail(e.to_string()))?;
    // A resumed session skips certificate verification, so a node removed from the config (or
    // whose certificate expired) could come back on an old ticket: no resumption, no 0-RTT.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The config for dialling other nodes: TLS 1.3, presenting this node's certificate, trusting
/// only the cluster CA, and accepting only a server that names a node in `allowed`. Dial with
/// the peer's node name as the server name.
pub fn client_config(id: &NodeIdentity, allowed: AllowedNodes) -> Result<ClientConfig, CertError> {
    let fail = |reason: String| CertError::TlsConfig {
        side: "client",
        node: id.name().to_owned(),
        reason,
    };
    let provider = provider();
    let roots = cluster_roots(id).map_err(|e| fail(e.to_string()))?;
    let inner = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?
        // "dangerous" only because the verifier is ours; it runs webpki's checks first.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterServerVerifier { inner, allowed }))
        .with_client_auth_cert(id.chain().to_vec(), id.key().clone_key())
        .map_err(|e| fail(e.to_string()))?;
    // Resuming would skip verifying the server again; see `server_config`.
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// A root store holding only the cluster CA.
fn cluster_roots(id: &NodeIdentity) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(id.ca().clone())?;
    Ok(Arc::new(roots))
}

/// webpki's client certificate checks, then: is the client a node of the cluster?
#[derive(Debug)]
struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: AllowedNodes,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.allowed.admit(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// webpki's server certificate checks (chain and hostname), then: is the server a node of the
/// cluster, and the very node that was dialled?
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    allowed: AllowedNodes,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let presented = self.allowed.admit(end_entity)?;
        // webpki accepted the dialled name as *a* name of the certificate; the node's name is
        // its first, and a certificate naming two nodes must not stand in for the second.
        if let ServerName::DnsName(dialled) = server_name
            && dialled.as_ref() != presented
        {
            return Err(refusal(CertError::WrongPeer {
                dialled: dialled.as_ref().to_owned(),
                presented,
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests;
