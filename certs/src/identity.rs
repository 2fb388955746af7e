//! A node's identity: its certificate chain and key, the cluster CA it trusts, and its name.
//!
//! A node's name is never configured separately from its certificate: it is the certificate's
//! first DNS subjectAltName. The same rule names peers, from the certificate they present.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, InconsistentKeys, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use time::OffsetDateTime;

use crate::inspect::{first_dns_san, origin_of, parse_x509};
use crate::{CertError, files, tls};

/// What the far end of a connection is called in error messages.
const PEER_ORIGIN: &str = "the peer's certificate";

/// Everything a node needs to prove who it is and to check who its peers are.
pub struct NodeIdentity {
    name: String,
    ca: CertificateDer<'static>,
    /// The node's certificate first, then any intermediates; never empty.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    /// Loads and checks a node's identity: the cluster CA certificate, the node's certificate
    /// (chain) and its private key, all PEM.
    ///
    /// Fails, naming the file, if a file is missing or not PEM, the key does not belong to the
    /// certificate, the certificate (or CA) is expired or not yet valid, the certificate was not
    /// signed by the CA, or it carries no DNS name.
    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let id = Self::load_unchecked(ca_path, cert_path, key_path)?;
        let now = OffsetDateTime::now_utc();
        check_validity(&id.ca, ca_path, now)?;
        check_validity(id.cert(), cert_path, now)?;
        id.check_signed_by_ca(ca_path, cert_path)?;
        Ok(id)
    }

    /// Reads the files and pairs key with certificate, without checking validity dates or the
    /// CA signature. Only `load` and tests (which need expired identities) use it.
    pub(crate) fn load_unchecked(
        ca_path: &Path,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, CertError> {
        let ca = files::read_certificate(ca_path, "CA certificate")?;
        if !parse_x509(&ca, &origin_of(ca_path))?.is_ca() {
            return Err(CertError::NotCa {
                path: ca_path.to_owned(),
            });
        }
        let chain = files::read_chain(cert_path, "certificate")?;
        let leaf = &chain[0]; // read_chain never returns an empty chain
        let origin = origin_of(cert_path);
        let name = first_dns_san(&parse_x509(leaf, &origin)?, &origin)?;
        let key = files::read_private_key(key_path, "key")?;
        check_key_matches(leaf, &key, cert_path, key_path)?;
        Ok(Self {
            name,
            ca,
            chain,
            key,
        })
    }

    /// The same identity trusting another CA: how tests build a node of one CA that trusts
    /// another, to see what the other side's verifier says about it.
    #[cfg(test)]
    pub(crate) fn trusting(mut self, ca: CertificateDer<'static>) -> Self {
        self.ca = ca;
        self
    }

    /// The node's name: its certificate's DNS subjectAltName.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster CA certificate this node trusts.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The node's own certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The node's certificate followed by any intermediates, as presented in handshakes.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The node's private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// Checks with webpki, as a peer's handshake would, that the certificate chains to the CA
    /// and may be used both to accept connections and to dial them under the node's name.
    fn check_signed_by_ca(&self, ca_path: &Path, cert_path: &Path) -> Result<(), CertError> {
        let provider = tls::provider();
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| CertError::BadCertificate {
                origin: origin_of(ca_path),
                reason: e.to_string(),
            })?;
        let roots = Arc::new(roots);
        let verifier_error = |e: rustls::server::VerifierBuilderError| CertError::BadCertificate {
            origin: origin_of(ca_path),
            reason: e.to_string(),
        };
        let refused = |e: rustls::Error| match e {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => CertError::WrongCa {
                path: cert_path.to_owned(),
                ca: ca_path.to_owned(),
            },
            other => CertError::Rejected {
                path: cert_path.to_owned(),
                ca: ca_path.to_owned(),
                reason: other.to_string(),
            },
        };
        let intermediates = &self.chain[1..];
        let now = UnixTime::now();

        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(verifier_error)?
            .verify_client_cert(self.cert(), intermediates, now)
            .map_err(refused)?;

        let server_name =
            ServerName::try_from(self.name.clone()).map_err(|_| CertError::InvalidNodeName {
                name: self.name.clone(),
                reason: "it is not a DNS name",
            })?;
        WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(verifier_error)?
            .verify_server_cert(self.cert(), intermediates, &server_name, &[], now)
            .map_err(refused)?;
        Ok(())
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    // Written by hand so the private key never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The node name a certificate carries: its first DNS subjectAltName.
pub fn node_name_from_cert(cert: &CertificateDer<'_>) -> Result<String, CertError> {
    first_dns_san(&parse_x509(cert, PEER_ORIGIN)?, PEER_ORIGIN)
}

/// The node name of a peer, from the certificate chain it presented in the handshake
/// (e.g. `rustls::CommonState::peer_certificates`, or quinn's `peer_identity`).
pub fn peer_node_name(certs: &[CertificateDer<'_>]) -> Result<String, CertError> {
    certs
        .first()
        .ok_or(CertError::NoPeerCertificate)
        .and_then(node_name_from_cert)
}

/// Fails unless `now` lies in the certificate's validity period.
fn check_validity(
    cert: &CertificateDer<'_>,
    path: &Path,
    now: OffsetDateTime,
) -> Result<(), CertError> {
    let parsed = parse_x509(cert, &origin_of(path))?;
    let not_before = parsed.validity().not_before.to_datetime();
    let not_after = parsed.validity().not_after.to_datetime();
    if now > not_after {
        return Err(CertError::Expired {
            path: path.to_owned(),
            not_after,
        });
    }
    if now < not_before {
        return Err(CertError::NotYetValid {
            path: path.to_owned(),
            not_before,
        });
    }
    Ok(())
}

/// Fails unless `key` is the private half of the public key in `cert`.
pub(crate) fn check_key_matches(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), CertError> {
    let signing_key = tls::provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| CertError::BadKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
    match CertifiedKey::new(vec![cert.clone()], signing_key).keys_match() {
        // Unknown: the key type cannot export its public half; the handshake will tell.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(CertError::KeyMismatch {
                key: key_path.to_owned(),
                cert: cert_path.to_owned(),
            })
        }
        Err(other) => Err(CertError::BadCertificate {
            origin: origin_of(cert_path),
            reason: other.to_string(),
        }),
    }
}
