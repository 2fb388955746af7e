//! Which strings can name a node.
//!
//! A node's name is the DNS subjectAltName of its certificate and the name peers dial it by, so it
//! must be a DNS name that TLS hostname checks accept; it is also the stem of its certificate's file
//! name, so it must not reach outside the certificate directory or collide with the CA's files.

use crate::CertError;

/// Longest DNS label.
const MAX_LABEL: usize = 63;
/// Longest DNS name.
const MAX_NAME: usize = 253;

/// Checks that `name` can be a node's name: dot-separated labels of 1–63 ASCII letters, digits
/// and hyphens, not starting or ending with a hyphen, the last label not all digits, 253
/// characters at most, and not `ca`.
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let refuse = |reason| {
        Err(CertError::InvalidNodeName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("a node name cannot be empty");
    }
    if name.len() > MAX_NAME {
        return refuse("a node name is at most 253 characters");
    }
    if name.eq_ignore_ascii_case("ca") {
        return refuse("'ca' is reserved for the cluster CA's files");
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return refuse("a node name cannot have an empty part between dots");
        }
        if label.len() > MAX_LABEL {
            return refuse("each dot-separated part of a node name is at most 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return refuse("a node name may only contain ASCII letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return refuse("a part of a node name cannot start or end with '-'");
        }
    }
    if labels
        .last()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return refuse("a node name cannot end in all digits (it would read as an IP address)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "site-a",
            "cloud",
            "edge01",
            "a",
            "gw-1.site-b",
            &"x".repeat(63),
        ] {
            assert!(validate_node_name(name).is_ok(), "{name} refused");
        }
    }

    #[test]
    fn refuses_names_that_are_not_dns_labels_or_escape_the_directory() {
        for name in [
            "",
            "-a",
            "a-",
            "a_b",
            "a b",
            "../etc",
            "a/b",
            "a..b",
            "a.",
            ".a",
            "10.0.0.1",
            "123",
            "ca",
            "CA",
            "zürich",
            &"x".repeat(64),
        ] {
            assert!(validate_node_name(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn the_refusal_names_the_node_and_the_rule() {
        let err = validate_node_name("a/b").expect_err("must refuse");
        assert_eq!(
            err.to_string(),
            "invalid node name 'a/b': a node name may only contain ASCII letters, digits, '-' and '.'"
        );
    }

    #[test]
    fn every_accepted_name_is_a_dns_name_to_rustls() {
        for name in ["site-a", "gw-1.site-b", "edge01"] {
            assert!(validate_node_name(name).is_ok());
            assert!(rustls_pki_types::DnsName::try_from(name).is_ok(), "{name}");
        }
    }
}
