//! The cluster CA and the node certificates it signs.
//!
//! A cluster has one CA: `ca.pem` (its self-signed certificate, which every node trusts) and
//! `ca.key` (its private key, which only the operator issuing certificates needs). Each node gets
//! `<node>.pem` and `<node>.key`, a leaf certificate whose one DNS name is the node's name, usable
//! both to accept connections (serverAuth) and to dial them (clientAuth). All keys are ECDSA P-256
//! and every key file is created with mode 0600.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::files::{self, CERT_MODE, KEY_MODE};
use crate::identity::check_key_matches;
use crate::inspect::{origin_of, parse_x509};
use crate::{CertError, validate_node_name};

/// File name of the cluster CA certificate inside the certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA private key inside the certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a new cluster CA is valid.
const CA_LIFETIME: Duration = Duration::days(3652);
/// How far back a new certificate's validity starts, so peers whose clocks run a little behind
/// accept it straight away.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// The two files of a cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The CA certificate (`ca.pem`), which every node trusts.
    pub cert: PathBuf,
    /// The CA private key (`ca.key`, mode 0600), needed only to issue node certificates.
    pub key: PathBuf,
}

impl CaFiles {
    /// The CA files in certificate directory `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
        }
    }
}

/// The two files of a node's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The node's certificate (`<node>.pem`).
    pub cert: PathBuf,
    /// The node's private key (`<node>.key`, mode 0600).
    pub key: PathBuf,
}

impl NodeFiles {
    /// The files of node `node` in certificate directory `dir`.
    pub fn in_dir(dir: &Path, node: &str) -> Self {
        Self {
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
        }
    }
}

/// Choices when issuing a node certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueOptions {
    /// Days the certificate is valid, counted from `not_before`; at least 1.
    pub days: u32,
    /// Start of validity; `None` means five minutes ago, to absorb clock skew between nodes.
    pub not_before: Option<OffsetDateTime>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        Self {
            days: 365,
            not_before: None,
        }
    }
}

/// Creates a cluster CA in `dir` (created if missing): `ca.pem` and `ca.key`.
///
/// Refuses to replace an existing `ca.pem` or `ca.key` unless `force`, because every node
/// certificate signed by the old CA stops being accepted once nodes trust the new one.
pub fn init_ca(dir: &Path, cluster_name: &str, force: bool) -> Result<CaFiles, CertError> {
    let name = cluster_name.trim();
    if name.is_empty() {
        return Err(CertError::InvalidClusterName {
            name: cluster_name.to_owned(),
            reason: "a cluster name cannot be empty",
        });
    }
    if name.chars().any(char::is_control) {
        return Err(CertError::InvalidClusterName {
            name: cluster_name.to_owned(),
            reason: "a cluster name cannot contain control characters",
        });
    }

    let ca = CaFiles::in_dir(dir);
    if !force {
        let existing: Vec<String> = [(&ca.cert, CA_CERT_FILE), (&ca.key, CA_KEY_FILE)]
            .into_iter()
            .filter(|(path, _)| files::exists(path))
            .map(|(_, file)| file.to_owned())
            .collect();
        if !existing.is_empty() {
            return Err(CertError::CaExists {
                dir: dir.to_owned(),
                files: existing,
            });
        }
    }
    files::create_dir(dir)?;

    let create_error = |e: rcgen::Error| CertError::Create {
        path: ca.cert.clone(),
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(create_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} Colony CA"));
    // Path length 0: the CA signs node certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_LIFETIME;
    let cert = params.self_signed(&key).map_err(create_error)?;

    // Key first: a CA certificate without its key on disk would be useless.
    files::write_file(
        &ca.key,
        key.serialize_pem().as_bytes(),
        KEY_MODE,
        "key file",
    )?;
    files::write_file(
        &ca.cert,
        cert.pem().as_bytes(),
        CERT_MODE,
        "certificate file",
    )?;
    Ok(ca)
}

/// Issues node `node` a certificate signed by the CA in `dir`, writing `<node>.pem` and
/// `<node>.key` there (replacing any earlier ones: re-issuing is how certificates are renewed).
pub fn issue_node_cert(
    dir: &Path,
    node: &str,
    opts: &IssueOptions,
) -> Result<NodeFiles, CertError> {
    validate_node_name(node)?;
    let out = NodeFiles::in_dir(dir, node);
    if opts.days == 0 {
        return Err(CertError::InvalidLifetime {
            path: out.cert.clone(),
        });
    }
    let issuer = load_issuer(&CaFiles::in_dir(dir))?;

    let create_error = |e: rcgen::Error| CertError::Create {
        path: out.cert.clone(),
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(create_error)?;
    let mut params = CertificateParams::new(vec![node.to_owned()]).map_err(create_error)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let not_before = opts
        .not_before
        .unwrap_or_else(|| OffsetDateTime::now_utc() - CLOCK_SKEW);
    params.not_before = not_before;
    params.not_after = not_before + Duration::days(i64::from(opts.days));
    let cert = params.signed_by(&key, &issuer).map_err(create_error)?;

    files::write_file(
        &out.key,
        key.serialize_pem().as_bytes(),
        KEY_MODE,
        "key file",
    )?;
    files::write_file(
        &out.cert,
        cert.pem().as_bytes(),
        CERT_MODE,
        "certificate file",
    )?;
    Ok(out)
}

/// The CA's certificate and key, checked to be a CA and to belong together.
pub(crate) fn load_issuer(ca: &CaFiles) -> Result<Issuer<'static, KeyPair>, CertError> {
    let cert = files::read_certificate(&ca.cert, "CA certificate")?;
    let origin = origin_of(&ca.cert);
    if !parse_x509(&cert, &origin)?.is_ca() {
        return Err(CertError::NotCa {
            path: ca.cert.clone(),
        });
    }
    let key_der = files::read_private_key(&ca.key, "CA key")?;
    check_key_matches(&cert, &key_der, &ca.cert, &ca.key)?;
    let key = KeyPair::try_from(&key_der).map_err(|e| CertError::BadKey {
        path: ca.key.clone(),
        reason: e.to_string(),
    })?;
    Issuer::from_ca_cert_der(&cert, key).map_err(|e| CertError::BadCertificate {
        origin,
        reason: e.to_string(),
    })
}
