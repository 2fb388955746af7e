//! Reading a certificate back for people: subject, names, issuer, validity and fingerprint.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::format_description;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::CertError;
use crate::files;

/// What `colony certs show` prints about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject distinguished name, e.g. `CN=site-a`.
    pub subject: String,
    /// The subject alternative names, openssl-style: `DNS:site-a`, `IP:10.0.0.1`.
    pub sans: Vec<String>,
    /// The issuer distinguished name, e.g. `CN=gasnet Colony CA`.
    pub issuer: String,
    /// Start of the validity period.
    pub not_before: OffsetDateTime,
    /// End of the validity period.
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, as colon-separated upper-case hex (95 characters).
    pub sha256_fingerprint: String,
    /// Whether the certificate is a CA (basicConstraints CA:TRUE).
    pub is_ca: bool,
}

impl CertInfo {
    /// Whether `now` falls within the certificate's validity period.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const W: usize = "fingerprint (SHA-256):".len() + 1;
        let now = OffsetDateTime::now_utc();
        let sans = if self.sans.is_empty() {
            "(none)".to_owned()
        } else {
            self.sans.join(", ")
        };
        let from_note = if now < self.not_before {
            " (not yet valid)"
        } else {
            ""
        };
        let until_note = if now > self.not_after {
            " (expired)"
        } else {
            ""
        };
        writeln!(f, "{:<W$}{}", "subject:", self.subject)?;
        writeln!(f, "{:<W$}{}", "SANs:", sans)?;
        writeln!(f, "{:<W$}{}", "issuer:", self.issuer)?;
        writeln!(f, "{:<W$}{}", "CA:", if self.is_ca { "yes" } else { "no" })?;
        writeln!(
            f,
            "{:<W$}{}{from_note}",
            "valid from:",
            format_time(self.not_before)
        )?;
        writeln!(
            f,
            "{:<W$}{}{until_note}",
            "valid until:",
            format_time(self.not_after)
        )?;
        write!(
            f,
            "{:<W$}{}",
            "fingerprint (SHA-256):", self.sha256_fingerprint
        )
    }
}

/// Describes the first certificate in the PEM file at `path`.
pub fn describe(path: &Path) -> Result<CertInfo, CertError> {
    let der = files::read_certificate(path, "certificate")?;
    let cert = parse_x509(&der, &origin_of(path))?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().map(san_text).collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(CertError::BadCertificate {
                origin: origin_of(path),
                reason: e.to_string(),
            });
        }
    };
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        sans,
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        sha256_fingerprint: sha256_fingerprint(&der),
        is_ca: cert.is_ca(),
    })
}

/// SHA-256 of `der` as colon-separated upper-case hex, the form openssl prints.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A timestamp as users read it in messages: `2025-01-01 00:00:00 UTC`.
pub(crate) fn format_time(t: OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    utc.format(format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
    ))
    .unwrap_or_else(|_| utc.to_string())
}

/// How error messages refer to a certificate file.
pub(crate) fn origin_of(path: &Path) -> String {
    format!("certificate {}", path.display())
}

/// Parses DER as X.509, naming `origin` on failure.
pub(crate) fn parse_x509<'a>(
    der: &'a [u8],
    origin: &str,
) -> Result<X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_rest, cert)| cert)
        .map_err(|e| CertError::BadCertificate {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })
}

/// The first DNS subjectAltName, which is the node's name.
pub(crate) fn first_dns_san(cert: &X509Certificate<'_>, origin: &str) -> Result<String, CertError> {
    let ext = cert
        .subject_alternative_name()
        .map_err(|e| CertError::BadCertificate {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
    ext.and_then(|ext| {
        ext.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
    })
    .ok_or_else(|| CertError::NoNodeName {
        origin: origin.to_owned(),
    })
}

fn san_text(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::IPAddress(bytes) => match ip_from_bytes(bytes) {
            Some(ip) => format!("IP:{ip}"),
            None => format!("IP:{bytes:02X?}"),
        },
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        GeneralName::URI(uri) => format!("URI:{uri}"),
        other => other.to_string(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_95_chars_of_upper_hex_pairs() {
        let fp = sha256_fingerprint(b"hello");
        assert_eq!(fp.len(), 95);
        assert!(fp.starts_with("2C:F2:4D:BA:5F:B0:A3:0E"), "{fp}");
        assert!(
            fp.split(':')
                .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        );
        assert_eq!(fp, fp.to_uppercase());
    }

    #[test]
    fn times_format_in_utc_whatever_their_offset() {
        let t = time::macros::datetime!(2025-01-01 02:00 +02:00);
        assert_eq!(format_time(t), "2025-01-01 00:00:00 UTC");
    }
}
