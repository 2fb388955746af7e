//! Loading a node's identity: every way the files can be wrong gets one clear sentence.

use std::fs;
use std::path::{Path, PathBuf};

use colony_certs::{
    AllowedNodes, CertError, IssueOptions, NodeIdentity, client_config, init_ca, issue_node_cert,
    node_name_from_cert, peer_node_name, server_config,
};
use tempfile::TempDir;

struct Dir {
    tmp: TempDir,
}

impl Dir {
    fn with_ca() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        init_ca(tmp.path(), "gasnet", false).expect("init_ca");
        Self { tmp }
    }

    fn p(&self, file: &str) -> PathBuf {
        self.tmp.path().join(file)
    }

    fn issue(&self, node: &str) {
        issue_node_cert(self.tmp.path(), node, &IssueOptions::default()).expect("issue");
    }

    fn load(&self, node: &str) -> Result<NodeIdentity, CertError> {
        NodeIdentity::load(
            &self.p("ca.pem"),
            &self.p(&format!("{node}.pem")),
            &self.p(&format!("{node}.key")),
        )
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_good_identity_loads_with_its_name_from_the_certificate() {
    let dir = Dir::with_ca();
    dir.issue("site-a");

    let id = dir.load("site-a").expect("load");

    assert_eq!(id.name(), "site-a");
    assert_eq!(id.chain().len(), 1);
    assert_eq!(node_name_from_cert(id.cert()).expect("name"), "site-a");
    assert_eq!(peer_node_name(id.chain()).expect("name"), "site-a");
    let copy = id.clone();
    assert_eq!(copy.name(), id.name());
    assert_eq!(copy.key().secret_der(), id.key().secret_der());
    let debug = format!("{id:?}");
    assert!(debug.contains("site-a"), "{debug}");
    assert!(
        !debug.to_lowercase().contains("key"),
        "no key material in Debug: {debug}"
    );

    let nodes = AllowedNodes::new(["site-a"]);
    server_config(&id, nodes.clone()).expect("server config");
    client_config(&id, nodes).expect("client config");
}

#[test]
fn missing_file_names_the_path() {
    let dir = Dir::with_ca();
    let err = dir.load("site-a").expect_err("no such node");
    assert!(matches!(err, CertError::Read { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read certificate file {}: No such file or directory",
            show(&dir.p("site-a.pem"))
        )
    );

    dir.issue("site-a");
    fs::remove_file(dir.p("site-a.key")).expect("rm key");
    let err = dir.load("site-a").expect_err("no key");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read key file {}: No such file or directory",
            show(&dir.p("site-a.key"))
        )
    );

    fs::remove_file(dir.p("ca.pem")).expect("rm ca");
    let err = dir.load("site-a").expect_err("no ca");
    assert!(
        err.to_string().starts_with(&format!(
            "cannot read CA certificate file {}",
            show(&dir.p("ca.pem"))
        )),
        "{err}"
    );
}

#[test]
fn garbage_files_are_refused_naming_the_file() {
    let dir = Dir::with_ca();
    dir.issue("site-a");

    fs::write(dir.p("site-a.pem"), "this is not a certificate\n").expect("write");
    let err = dir.load("site-a").expect_err("garbage cert");
    assert_eq!(
        err.to_string(),
        format!("{} holds no PEM certificate", show(&dir.p("site-a.pem")))
    );

    fs::write(
        dir.p("site-a.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let err = dir.load("site-a").expect_err("bad der");
    assert!(matches!(err, CertError::BadCertificate { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "certificate {} is not a valid X.509 certificate",
            show(&dir.p("site-a.pem"))
        )),
        "{err}"
    );

    fs::write(
        dir.p("site-a.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let err = dir.load("site-a").expect_err("bad base64");
    assert!(matches!(err, CertError::BadPem { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&show(&dir.p("site-a.pem"))),
        "{err}"
    );

    dir.issue("site-a");
    fs::write(dir.p("site-a.key"), "garbage").expect("write");
    let err = dir.load("site-a").expect_err("garbage key");
    assert_eq!(
        err.to_string(),
        format!("{} holds no PEM private key", show(&dir.p("site-a.key")))
    );
}

#[test]
fn expired_certificate_is_refused_with_its_end_date() {
    let dir = Dir::with_ca();
    let opts = IssueOptions {
        days: 1,
        not_before: Some(time::macros::datetime!(2020-01-01 00:00 UTC)),
    };
    issue_node_cert(dir.tmp.path(), "site-a", &opts).expect("issue");

    let err = dir.load("site-a").expect_err("expired");

    assert!(matches!(err, CertError::Expired { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "certificate {} expired on 2020-01-02 00:00:00 UTC",
            show(&dir.p("site-a.pem"))
        )
    );
}

#[test]
fn not_yet_valid_certificate_is_refused() {
    let dir = Dir::with_ca();
    let opts = IssueOptions {
        days: 30,
        not_before: Some(time::OffsetDateTime::now_utc() + time::Duration::days(2)),
    };
    issue_node_cert(dir.tmp.path(), "site-a", &opts).expect("issue");

    let err = dir.load("site-a").expect_err("future");

    assert!(matches!(err, CertError::NotYetValid { .. }), "{err:?}");
    assert!(err.to_string().contains("is not valid until"), "{err}");
}

#[test]
fn certificate_signed_by_another_ca_is_refused() {
    for other_cluster in ["gasnet", "other"] {
        let dir = Dir::with_ca();
        let other = tempfile::tempdir().expect("tempdir");
        init_ca(other.path(), other_cluster, false).expect("init other");
        issue_node_cert(other.path(), "site-a", &IssueOptions::default()).expect("issue");
        for file in ["site-a.pem", "site-a.key"] {
            fs::copy(other.path().join(file), dir.p(file)).expect("copy");
        }

        let err = dir.load("site-a").expect_err("foreign cert");

        assert!(
            matches!(err, CertError::WrongCa { .. }),
            "{other_cluster}: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "certificate {} was not signed by the cluster CA {}",
                show(&dir.p("site-a.pem")),
                show(&dir.p("ca.pem"))
            )
        );
    }
}

#[test]
fn key_of_another_node_is_refused() {
    let dir = Dir::with_ca();
    dir.issue("site-a");
    dir.issue("site-b");
    fs::copy(dir.p("site-b.key"), dir.p("site-a.key")).expect("copy");

    let err = dir.load("site-a").expect_err("wrong key");

    assert_eq!(
        err.to_string(),
        format!(
            "key {} does not belong to certificate {}",
            show(&dir.p("site-a.key")),
            show(&dir.p("site-a.pem"))
        )
    );
}

#[test]
fn a_node_certificate_given_as_the_ca_is_refused() {
    let dir = Dir::with_ca();
    dir.issue("site-a");
    let err = NodeIdentity::load(
        &dir.p("site-a.pem"),
        &dir.p("site-a.pem"),
        &dir.p("site-a.key"),
    )
    .expect_err("not a CA");
    assert_eq!(
        err.to_string(),
        format!(
            "certificate {} is not a CA certificate",
            show(&dir.p("site-a.pem"))
        )
    );
}

#[test]
fn peer_without_certificates_has_no_name() {
    let err = peer_node_name(&[]).expect_err("empty chain");
    assert_eq!(err.to_string(), "the peer presented no certificate");

    let dir = Dir::with_ca();
    // The CA certificate has no DNS name, so it names no node.
    let ca = rustls_pki_types_cert(&dir.p("ca.pem"));
    let err = node_name_from_cert(&ca).expect_err("no SAN");
    assert_eq!(
        err.to_string(),
        "the peer's certificate has no DNS subjectAltName to name its node"
    );
}

fn rustls_pki_types_cert(path: &Path) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path).expect("pem")
}
