//! The crate's one error type.
//!
//! Every message is one plain sentence that names the file (or node) involved, so the runtime can
//! print it to the user as is. I/O reasons are part of the sentence rather than a `source()`, so a
//! reporter that walks the chain does not print them twice.

use std::io;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

/// Everything that can go wrong creating, reading or checking cluster certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {what} file {}: {}", path.display(), io_reason(error))]
    Read {
        /// What the file was meant to hold ("certificate", "key", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        error: io::Error,
    },

    /// A file or directory could not be created or written.
    #[error("cannot write {what} {}: {}", path.display(), io_reason(error))]
    Write {
        /// What was being written ("key file", "directory", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        error: io::Error,
    },

    /// A file holds no PEM section of the expected kind.
    #[error("{} holds no PEM {what}", path.display())]
    NoPem {
        /// What was looked for ("certificate", "private key").
        what: &'static str,
        /// The file.
        path: PathBuf,
    },

    /// A file's PEM is malformed.
    #[error("{} is not a valid PEM file: {reason}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A certificate's DER does not parse as X.509.
    #[error("{origin} is not a valid X.509 certificate: {reason}")]
    BadCertificate {
        /// Where the certificate came from ("certificate certs/a.pem", "the peer's certificate").
        origin: String,
        /// What the parser said.
        reason: String,
    },

    /// A private key cannot be used (wrong format, unsupported algorithm).
    #[error("{} does not hold a usable private key: {reason}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A private key does not belong to the certificate it was paired with.
    #[error("key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },

    /// A certificate's validity period has ended.
    #[error("certificate {} expired on {}", path.display(), crate::inspect::format_time(*not_after))]
    Expired {
        /// The certificate file.
        path: PathBuf,
        /// When it stopped being valid.
        not_after: OffsetDateTime,
    },

    /// A certificate's validity period has not begun (often a wrong clock).
    #[error(
        "certificate {} is not valid until {} (is the clock right?)",
        path.display(),
        crate::inspect::format_time(*not_before)
    )]
    NotYetValid {
        /// The certificate file.
        path: PathBuf,
        /// When it becomes valid.
        not_before: OffsetDateTime,
    },

    /// A certificate does not chain to the cluster CA.
    #[error("certificate {} was not signed by the cluster CA {}", path.display(), ca.display())]
    WrongCa {
        /// The certificate file.
        path: PathBuf,
        /// The cluster CA certificate file.
        ca: PathBuf,
    },

    /// A certificate chains to the cluster CA but is unfit for a node (usage, encoding, ...).
    #[error("certificate {} is not accepted by the cluster CA {}: {reason}", path.display(), ca.display())]
    Rejected {
        /// The certificate file.
        path: PathBuf,
        /// The cluster CA certificate file.
        ca: PathBuf,
        /// Why the verifier refused it.
        reason: String,
    },

    /// A certificate given as the cluster CA is not a CA certificate.
    #[error("certificate {} is not a CA certificate", path.display())]
    NotCa {
        /// The certificate file.
        path: PathBuf,
    },

    /// A certificate carries no DNS subjectAltName, so it names no node.
    #[error("{origin} has no DNS subjectAltName to name its node")]
    NoNodeName {
        /// Where the certificate came from.
        origin: String,
    },

    /// The peer finished a handshake without presenting a certificate.
    #[error("the peer presented no certificate")]
    NoPeerCertificate,

    /// A peer's certificate names a node that is not in the cluster config.
    #[error("node '{name}' is not in the cluster config")]
    NotInCluster {
        /// The node name from the peer's certificate.
        name: String,
    },

    /// The node that answered is not the node that was dialled.
    #[error("dialled node '{dialled}' but its certificate names node '{presented}'")]
    WrongPeer {
        /// The node name that was dialled.
        dialled: String,
        /// The node name in the presented certificate.
        presented: String,
    },

    /// `init_ca` found an existing CA and was not told to overwrite it.
    #[error("CA already exists in {} ({}); pass --force to overwrite", dir_display(dir), files.join(", "))]
    CaExists {
        /// The CA directory.
        dir: PathBuf,
        /// The file names already present.
        files: Vec<String>,
    },

    /// A cluster name cannot be used for a CA.
    #[error("invalid cluster name '{name}': {reason}")]
    InvalidClusterName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A node name cannot be used as a certificate's DNS name.
    #[error("invalid node name '{name}': {reason}")]
    InvalidNodeName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A certificate lifetime of zero days was asked for.
    #[error("certificate {} must be valid for at least one day", path.display())]
    InvalidLifetime {
        /// The certificate file that would have been written.
        path: PathBuf,
    },

    /// Generating a key or signing a certificate failed.
    #[error("cannot create certificate {}: {reason}", path.display())]
    Create {
        /// The certificate file being created.
        path: PathBuf,
        /// What rcgen reported.
        reason: String,
    },

    /// rustls refused to build a TLS config from a node's identity.
    #[error("cannot build the TLS {side} config for node '{node}': {reason}")]
    TlsConfig {
        /// "server" or "client".
        side: &'static str,
        /// The node whose identity was used.
        node: String,
        /// What rustls reported.
        reason: String,
    },
}

/// An I/O error's description without the "(os error N)" suffix, which helps no user.
fn io_reason(error: &io::Error) -> String {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .map(str::to_owned)
            .unwrap_or(text),
        None => text,
    }
}

/// A directory shown with one trailing slash, as users type it ("certs/").
fn dir_display(dir: &Path) -> String {
    let shown = dir.display().to_string();
    if shown.ends_with('/') {
        shown
    } else {
        format!("{shown}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_read_as_one_sentence_without_os_error_code() {
        let err = CertError::Read {
            what: "certificate",
            path: PathBuf::from("certs/a.pem"),
            error: io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            err.to_string(),
            "cannot read certificate file certs/a.pem: No such file or directory"
        );
    }

    #[test]
    fn ca_exists_names_directory_and_files() {
        let err = CertError::CaExists {
            dir: PathBuf::from("certs"),
            files: vec!["ca.pem".into()],
        };
        assert_eq!(
            err.to_string(),
            "CA already exists in certs/ (ca.pem); pass --force to overwrite"
        );
    }

    #[test]
    fn expiry_date_is_printed_in_utc() {
        let err = CertError::Expired {
            path: PathBuf::from("certs/a.pem"),
            not_after: time::macros::datetime!(2025-01-01 00:00 UTC),
        };
        assert_eq!(
            err.to_string(),
            "certificate certs/a.pem expired on 2025-01-01 00:00:00 UTC"
        );
    }
}
