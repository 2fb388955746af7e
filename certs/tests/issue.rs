//! Creating a cluster CA and node certificates, checked from outside with the real openssl.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use colony_certs::{CertError, IssueOptions, describe, init_ca, issue_node_cert};
use time::OffsetDateTime;

const OPENSSL: &str = "/usr/bin/openssl";

fn openssl(args: &[&str]) -> Output {
    Command::new(OPENSSL)
        .args(args)
        .output()
        .expect("run /usr/bin/openssl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn init_ca_creates_certificate_and_private_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("certs");

    let ca = init_ca(&dir, "gasnet", false).expect("init_ca");

    assert_eq!(ca.cert, dir.join("ca.pem"));
    assert_eq!(ca.key, dir.join("ca.key"));
    assert!(
        fs::read_to_string(&ca.cert)
            .expect("read")
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(
        fs::read_to_string(&ca.key)
            .expect("read")
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert_eq!(mode(&ca.key), 0o600);

    let info = describe(&ca.cert).expect("describe");
    assert_eq!(info.subject, "CN=gasnet Colony CA");
    assert_eq!(info.issuer, info.subject, "self-signed");
    assert!(info.is_ca);
    let lifetime = info.not_after - info.not_before;
    assert!(
        lifetime.whole_days() >= 3652 && lifetime.whole_days() <= 3653,
        "{lifetime}"
    );

    let out = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "basicConstraints,keyUsage",
        "-in",
        ca.cert.to_str().expect("utf-8"),
    ]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("CA:TRUE"), "{shown}");
    assert!(shown.contains("Certificate Sign, CRL Sign"), "{shown}");
}

#[test]
fn init_ca_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let first = init_ca(dir, "gasnet", false).expect("first init");
    let original = fs::read(&first.cert).expect("read");

    let err = init_ca(dir, "gasnet", false).expect_err("second init must fail");
    assert!(matches!(err, CertError::CaExists { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "CA already exists in {}/ (ca.pem, ca.key); pass --force to overwrite",
            dir.display()
        )
    );
    assert_eq!(fs::read(&first.cert).expect("read"), original, "untouched");

    let again = init_ca(dir, "gasnet", true).expect("forced init");
    assert_ne!(fs::read(&again.cert).expect("read"), original, "replaced");
    assert_eq!(mode(&again.key), 0o600);
}

#[test]
fn init_ca_refuses_when_only_the_key_is_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = init_ca(tmp.path(), "gasnet", false).expect("init");
    fs::remove_file(&ca.cert).expect("rm ca.pem");
    let err = init_ca(tmp.path(), "gasnet", false).expect_err("must refuse");
    assert!(err.to_string().contains("(ca.key)"), "{err}");
}

#[test]
fn node_certificate_verifies_with_openssl_and_names_the_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = init_ca(dir, "gasnet", false).expect("init_ca");

    let node = issue_node_cert(dir, "site-a", &IssueOptions::default()).expect("issue");

    assert_eq!(node.cert, dir.join("site-a.pem"));
    assert_eq!(node.key, dir.join("site-a.key"));
    assert_eq!(mode(&node.key), 0o600);

    let out = openssl(&[
        "verify",
        "-CAfile",
        ca.cert.to_str().expect("utf-8"),
        node.cert.to_str().expect("utf-8"),
    ]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.trim_end().ends_with(": OK"), "{shown}");

    for purpose in ["sslserver", "sslclient"] {
        let out = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            ca.cert.to_str().expect("utf-8"),
            node.cert.to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{purpose}: {}", text(&out));
    }

    let out = openssl(&[
        "x509",
        "-noout",
        "-subject",
        "-ext",
        "subjectAltName,extendedKeyUsage,keyUsage,basicConstraints",
        "-in",
        node.cert.to_str().expect("utf-8"),
    ]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("DNS:site-a"), "{shown}");
    assert!(!shown.contains("DNS:site-a,"), "only one SAN: {shown}");
    assert!(
        shown.contains("CN = site-a") || shown.contains("CN=site-a"),
        "{shown}"
    );
    assert!(
        shown.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{shown}"
    );
    assert!(shown.contains("Digital Signature"), "{shown}");
    assert!(shown.contains("CA:FALSE"), "{shown}");

    // The key really is an EC P-256 key and belongs to the certificate.
    let out = openssl(&[
        "pkey",
        "-noout",
        "-text",
        "-in",
        node.key.to_str().expect("utf-8"),
    ]);
    let shown = text(&out);
    assert!(
        shown.contains("prime256v1") || shown.contains("P-256"),
        "{shown}"
    );
}

#[test]
fn certificate_from_another_ca_fails_openssl_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    let ca = init_ca(&ours, "gasnet", false).expect("init ours");
    init_ca(&theirs, "gasnet", false).expect("init theirs");
    let foreign = issue_node_cert(&theirs, "site-a", &IssueOptions::default()).expect("issue");

    let out = openssl(&[
        "verify",
        "-CAfile",
        ca.cert.to_str().expect("utf-8"),
        foreign.cert.to_str().expect("utf-8"),
    ]);

    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).trim_end().ends_with(": OK"), "{}", text(&out));
}

#[test]
fn reissuing_replaces_the_node_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    init_ca(tmp.path(), "gasnet", false).expect("init");
    let first = issue_node_cert(tmp.path(), "site-a", &IssueOptions::default()).expect("issue");
    let before = fs::read(&first.cert).expect("read");
    let second = issue_node_cert(tmp.path(), "site-a", &IssueOptions::default()).expect("reissue");
    assert_eq!(first, second);
    assert_ne!(fs::read(&second.cert).expect("read"), before);
}

#[test]
fn issue_options_set_the_validity_period() {
    let tmp = tempfile::tempdir().expect("tempdir");
    init_ca(tmp.path(), "gasnet", false).expect("init");
    let start = time::macros::datetime!(2020-01-01 00:00 UTC);
    let opts = IssueOptions {
        days: 1,
        not_before: Some(start),
    };
    let node = issue_node_cert(tmp.path(), "old", &opts).expect("issue");

    let info = describe(&node.cert).expect("describe");
    assert_eq!(info.not_before, start);
    assert_eq!(
        info.not_after,
        time::macros::datetime!(2020-01-02 00:00 UTC)
    );
    assert!(!info.is_valid_at(OffsetDateTime::now_utc()));
    assert!(info.to_string().contains("(expired)"), "{info}");

    let default = issue_node_cert(tmp.path(), "new", &IssueOptions::default()).expect("issue");
    let info = describe(&default.cert).expect("describe");
    let now = OffsetDateTime::now_utc();
    assert!(info.is_valid_at(now));
    assert!(
        now - info.not_before >= time::Duration::minutes(4),
        "backdated for skew"
    );
    assert_eq!((info.not_after - info.not_before).whole_days(), 365);
    assert!(!info.to_string().contains("expired"), "{info}");
}

#[test]
fn bad_node_names_and_lifetimes_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    init_ca(tmp.path(), "gasnet", false).expect("init");
    for name in ["", "../evil", "a/b", "has space", "ca", "1.2.3.4", "-x"] {
        let err =
            issue_node_cert(tmp.path(), name, &IssueOptions::default()).expect_err("must refuse");
        assert!(
            matches!(err, CertError::InvalidNodeName { .. }),
            "{name}: {err:?}"
        );
    }
    let zero = IssueOptions {
        days: 0,
        ..IssueOptions::default()
    };
    let err = issue_node_cert(tmp.path(), "site-a", &zero).expect_err("must refuse");
    assert!(matches!(err, CertError::InvalidLifetime { .. }), "{err:?}");

    let mut left: Vec<String> = fs::read_dir(tmp.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["ca.key", "ca.pem"]);
}

#[test]
fn issuing_without_a_ca_names_the_missing_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err =
        issue_node_cert(tmp.path(), "site-a", &IssueOptions::default()).expect_err("no CA yet");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read CA certificate file {}: No such file or directory",
            tmp.path().join("ca.pem").display()
        )
    );
}

#[test]
fn issuing_with_a_mismatched_ca_key_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init_ca(&a, "gasnet", false).expect("init a");
    init_ca(&b, "gasnet", false).expect("init b");
    fs::copy(b.join("ca.key"), a.join("ca.key")).expect("swap key");

    let err = issue_node_cert(&a, "site-a", &IssueOptions::default()).expect_err("must refuse");
    assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "key {} does not belong to certificate {}",
            a.join("ca.key").display(),
            a.join("ca.pem").display()
        )
    );
}

#[test]
fn describe_shows_names_issuer_and_fingerprint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    init_ca(tmp.path(), "gasnet", false).expect("init");
    let node = issue_node_cert(tmp.path(), "site-a", &IssueOptions::default()).expect("issue");

    let info = describe(&node.cert).expect("describe");

    assert_eq!(info.subject, "CN=site-a");
    assert_eq!(info.sans, vec!["DNS:site-a".to_owned()]);
    assert_eq!(info.issuer, "CN=gasnet Colony CA");
    assert!(!info.is_ca);
    assert_eq!(info.sha256_fingerprint.len(), 95);

    // The same fingerprint openssl computes.
    let out = openssl(&[
        "x509",
        "-noout",
        "-fingerprint",
        "-sha256",
        "-in",
        node.cert.to_str().expect("utf-8"),
    ]);
    let shown = text(&out);
    let theirs = shown.trim().rsplit('=').next().expect("fingerprint line");
    assert_eq!(info.sha256_fingerprint, theirs);

    let printed = info.to_string();
    let lines: Vec<&str> = printed.lines().collect();
    for (line, label) in lines.iter().zip([
        "subject:",
        "SANs:",
        "issuer:",
        "CA:",
        "valid from:",
        "valid until:",
        "fingerprint (SHA-256):",
    ]) {
        assert!(
            line.starts_with(label),
            "{line:?} should start with {label}"
        );
    }
    assert_eq!(lines.len(), 7, "{printed}");
    // Values start in one column, after the longest label and a space.
    for line in &lines {
        let (label, value) = line.split_at(23);
        assert!(label.ends_with(' ') && !value.starts_with(' '), "{printed}");
    }
    assert!(printed.contains("DNS:site-a"), "{printed}");
    assert!(printed.contains(&info.sha256_fingerprint), "{printed}");
}
