//! Handshakes between two in-process rustls endpoints, bytes pumped in memory.

use std::io::{Read, Write};
use std::path::Path;

use rustls::{
    AlertDescription, CertificateError, ClientConnection, ConnectionCommon, Error, ProtocolVersion,
    ServerConnection,
};
use tempfile::TempDir;
use time::macros::datetime;

use super::*;
use crate::{IssueOptions, init_ca, issue_node_cert, peer_node_name};

/// More than any TLS 1.3 handshake needs; a loop that does not settle by then is a bug.
const MAX_ROUNDS: usize = 16;

/// A cluster CA directory with node certificates in it.
struct Cluster {
    dir: TempDir,
}

impl Cluster {
    fn new(cluster_name: &str, nodes: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), cluster_name, false).expect("init_ca");
        for node in nodes {
            issue_node_cert(dir.path(), node, &IssueOptions::default()).expect("issue");
        }
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A node's identity, loaded with every check.
    fn identity(&self, node: &str) -> NodeIdentity {
        let (ca, cert, key) = self.files(node);
        NodeIdentity::load(&ca, &cert, &key).expect("load identity")
    }

    /// A node's identity without the validity and CA checks, as an attacker could build one.
    fn identity_unchecked(&self, node: &str) -> NodeIdentity {
        let (ca, cert, key) = self.files(node);
        NodeIdentity::load_unchecked(&ca, &cert, &key).expect("load identity")
    }

    fn files(&self, node: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let dir = self.path();
        (
            dir.join("ca.pem"),
            dir.join(format!("{node}.pem")),
            dir.join(format!("{node}.key")),
        )
    }
}

/// Both ends after the handshake settled, with the error each end's rustls reported, if any.
struct Outcome {
    client: ClientConnection,
    server: ServerConnection,
    client_err: Option<Error>,
    server_err: Option<Error>,
}

impl Outcome {
    fn assert_established(&self) {
        assert!(self.client_err.is_none(), "client: {:?}", self.client_err);
        assert!(self.server_err.is_none(), "server: {:?}", self.server_err);
        assert!(!self.client.is_handshaking());
        assert!(!self.server.is_handshaking());
    }

    /// The server's error, which must be a certificate refusal carrying our own reason.
    fn server_refusal(&self) -> &CertError {
        cert_error(self.server_err.as_ref(), "server")
    }

    fn client_refusal(&self) -> &CertError {
        cert_error(self.client_err.as_ref(), "client")
    }
}

fn cert_error<'a>(err: Option<&'a Error>, side: &str) -> &'a CertError {
    match err {
        Some(Error::Other(OtherError(inner))) => inner
            .downcast_ref::<CertError>()
            .unwrap_or_else(|| panic!("{side}: not a CertError: {inner}")),
        other => panic!("{side}: expected our certificate refusal, got {other:?}"),
    }
}

fn handshake(client_cfg: ClientConfig, server_cfg: ServerConfig, dial: &str) -> Outcome {
    let name = ServerName::try_from(dial.to_owned()).expect("server name");
    let mut client = ClientConnection::new(Arc::new(client_cfg), name).expect("client conn");
    let mut server = ServerConnection::new(Arc::new(server_cfg)).expect("server conn");
    let (mut client_err, mut server_err) = (None, None);
    for _ in 0..MAX_ROUNDS {
        let sent = transfer(&mut client, &mut server, &mut server_err)
            + transfer(&mut server, &mut client, &mut client_err);
        if sent == 0 {
            return Outcome {
                client,
                server,
                client_err,
                server_err,
            };
        }
    }
    panic!("handshake still moving bytes after {MAX_ROUNDS} rounds");
}

/// Moves everything `from` wants to send into `to`; returns the bytes moved.
fn transfer<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    to_err: &mut Option<Error>,
) -> usize {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("write_tls into a Vec");
    }
    if to_err.is_some() {
        // A failed endpoint is closed; what reaches it is dropped, as a socket would.
        return wire.len();
    }
    let mut rest = wire.as_slice();
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read_tls from a slice");
        if let Err(e) = to.process_new_packets() {
            *to_err = Some(e);
            break;
        }
    }
    wire.len()
}

fn allowed(names: &[&str]) -> AllowedNodes {
    AllowedNodes::new(names.iter().copied())
}

fn no_auth_client(ca: &Cluster) -> ClientConfig {
    let id = ca.identity("site-a");
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(cluster_roots(&id).expect("roots"))
        .with_no_client_auth()
}

#[test]
fn nodes_of_one_ca_authenticate_each_other_and_learn_each_others_names() {
    let ca = Cluster::new("gasnet", &["site-a", "site-b"]);
    let nodes = allowed(&["site-a", "site-b"]);
    let server = server_config(&ca.identity("site-a"), nodes.clone()).expect("server config");
    let client = client_config(&ca.identity("site-b"), nodes).expect("client config");

    let mut out = handshake(client, server, "site-a");

    out.assert_established();
    assert_eq!(
        out.server.protocol_version(),
        Some(ProtocolVersion::TLSv1_3)
    );
    let seen_by_server = out
        .server
        .peer_certificates()
        .expect("client presented a cert");
    assert_eq!(peer_node_name(seen_by_server).expect("name"), "site-b");
    let seen_by_client = out
        .client
        .peer_certificates()
        .expect("server presented a cert");
    assert_eq!(peer_node_name(seen_by_client).expect("name"), "site-a");

    out.client.writer().write_all(b"ping").expect("write");
    let mut none = None;
    transfer(&mut out.client, &mut out.server, &mut none);
    assert!(none.is_none(), "{none:?}");
    let mut got = [0u8; 4];
    out.server.reader().read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
}

#[test]
fn client_certificate_from_another_ca_with_the_same_name_is_refused() {
    // Same cluster name, so the issuer DN matches and only the signature differs (a CA re-created
    // with --force, or an attacker copying the CA's name).
    let ca = Cluster::new("gasnet", &["site-a"]);
    let rogue = Cluster::new("gasnet", &["site-b"]);
    // The rogue trusts the real (public) CA so that it gets as far as presenting its certificate.
    let rogue_id = rogue
        .identity("site-b")
        .trusting(ca.identity("site-a").ca().clone());
    let nodes = allowed(&["site-a", "site-b"]);
    let server = server_config(&ca.identity("site-a"), nodes.clone()).expect("server");
    let client = client_config(&rogue_id, nodes).expect("client");

    let out = handshake(client, server, "site-a");

    assert!(
        matches!(
            out.server_err,
            Some(Error::InvalidCertificate(
                CertificateError::BadSignature | CertificateError::UnknownIssuer
            ))
        ),
        "{:?}",
        out.server_err
    );
    assert!(
        matches!(out.client_err, Some(Error::AlertReceived(_))),
        "{:?}",
        out.client_err
    );
}

#[test]
fn server_refuses_client_from_another_ca_even_if_the_client_trusts_the_server() {
    let ca = Cluster::new("gasnet", &["site-a"]);
    let rogue = Cluster::new("other", &["site-b"]);
    // The rogue client trusts the real CA (it has the public ca.pem), so it gets as far as
    // presenting its own certificate: the server's verdict is what is being tested.
    let rogue_id = rogue
        .identity("site-b")
        .trusting(ca.identity("site-a").ca().clone());
    let nodes = allowed(&["site-a", "site-b"]);
    let server = server_config(&ca.identity("site-a"), nodes.clone()).expect("server");
    let client = client_config(&rogue_id, nodes).expect("client");

    let out = handshake(client, server, "site-a");

    assert!(
        matches!(
            out.server_err,
            Some(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        ),
        "{:?}",
        out.server_err
    );
    assert!(
        matches!(
            out.client_err,
            Some(Error::AlertReceived(AlertDescription::UnknownCA))
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn expired_client_certificate_is_refused() {
    let ca = Cluster::new("gasnet", &["site-a"]);
    let opts = IssueOptions {
        days: 1,
        not_before: Some(datetime!(2020-01-01 00:00 UTC)),
    };
    issue_node_cert(ca.path(), "site-b", &opts).expect("issue expired");
    let nodes = allowed(&["site-a", "site-b"]);
    let server = server_config(&ca.identity("site-a"), nodes.clone()).expect("server");
    let client = client_config(&ca.identity_unchecked("site-b"), nodes).expect("client");

    let out = handshake(client, server, "site-a");

    assert!(
        matches!(
            out.server_err,
            Some(Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. } | CertificateError::Expired
            ))
        ),
        "{:?}",
        out.server_err
    );
    assert!(
        matches!(
            out.client_err,
            Some(Error::AlertReceived(AlertDescription::CertificateExpired))
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn client_without_a_certificate_is_refused() {
    let ca = Cluster::new("gasnet", &["site-a"]);
    let server = server_config(&ca.identity("site-a"), allowed(&["site-a"])).expect("server");

    let out = handshake(no_auth_client(&ca), server, "site-a");

    assert!(
        matches!(out.server_err, Some(Error::NoCertificatesPresented)),
        "{:?}",
        out.server_err
    );
    assert!(
        matches!(
            out.client_err,
            Some(Error::AlertReceived(AlertDescription::CertificateRequired))
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn client_not_in_the_cluster_config_is_refused_with_its_name() {
    let ca = Cluster::new("gasnet", &["site-a", "intruder"]);
    let server =
        server_config(&ca.identity("site-a"), allowed(&["site-a", "site-b"])).expect("server");
    let client = client_config(&ca.identity("intruder"), allowed(&["site-a"])).expect("client");

    let out = handshake(client, server, "site-a");

    let refusal = out.server_refusal();
    assert!(
        matches!(refusal, CertError::NotInCluster { name } if name == "intruder"),
        "{refusal:?}"
    );
    assert_eq!(
        out.server_err.as_ref().map(ToString::to_string).as_deref(),
        Some("other error: node 'intruder' is not in the cluster config")
    );
    assert!(
        matches!(
            out.client_err,
            Some(Error::AlertReceived(AlertDescription::HandshakeFailure))
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn a_reload_that_removes_a_node_refuses_its_next_handshake() {
    let ca = Cluster::new("gasnet", &["site-a", "site-b"]);
    let nodes = allowed(&["site-a", "site-b"]);
    let server = server_config(&ca.identity("site-a"), nodes.clone()).expect("server");
    let client = client_config(&ca.identity("site-b"), allowed(&["site-a"])).expect("client");
    handshake(client.clone(), server.clone(), "site-a").assert_established();

    nodes.replace(["site-a"]);

    let out = handshake(client, server, "site-a");
    assert!(
        matches!(out.server_refusal(), CertError::NotInCluster { name } if name == "site-b"),
        "{:?}",
        out.server_err
    );
}

#[test]
fn client_refuses_a_server_not_in_the_cluster_config() {
    let ca = Cluster::new("gasnet", &["site-a", "site-b"]);
    let server =
        server_config(&ca.identity("site-a"), allowed(&["site-a", "site-b"])).expect("server");
    let client = client_config(&ca.identity("site-b"), allowed(&["site-b"])).expect("client");

    let out = handshake(client, server, "site-a");

    assert!(
        matches!(out.client_refusal(), CertError::NotInCluster { name } if name == "site-a"),
        "{:?}",
        out.client_err
    );
    assert!(out.server_err.is_some(), "server must not complete");
}

#[test]
fn client_refuses_a_server_that_is_not_the_node_it_dialled() {
    let ca = Cluster::new("gasnet", &["site-a", "site-b"]);
    let nodes = allowed(&["site-a", "site-b", "site-c"]);
    let server = server_config(&ca.identity("site-a"), nodes.clone()).expect("server");
    let client = client_config(&ca.identity("site-b"), nodes).expect("client");

    let out = handshake(client, server, "site-c");

    assert!(
        matches!(
            out.client_err,
            Some(Error::InvalidCertificate(
                CertificateError::NotValidForNameContext { .. } | CertificateError::NotValidForName
            ))
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn client_refuses_a_server_whose_certificate_names_another_node_first() {
    // Our CA never issues such a certificate, but a CA key in the wrong hands could: webpki
    // accepts it for any of its names, while the node it belongs to is the first.
    let ca = Cluster::new("gasnet", &["site-b"]);
    let issuer = crate::ca::load_issuer(&crate::CaFiles::in_dir(ca.path())).expect("issuer");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["site-a".to_owned(), "site-c".to_owned()])
        .expect("params");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(ca.path().join("twin.pem"), cert.pem()).expect("write");
    std::fs::write(ca.path().join("twin.key"), key.serialize_pem()).expect("write");
    let twin = ca.identity("twin");
    assert_eq!(twin.name(), "site-a");

    let nodes = allowed(&["site-a", "site-b", "site-c"]);
    let server = server_config(&twin, nodes.clone()).expect("server");
    let client = client_config(&ca.identity("site-b"), nodes).expect("client");

    let out = handshake(client, server, "site-c");

    assert!(
        matches!(
            out.client_refusal(),
            CertError::WrongPeer { dialled, presented } if dialled == "site-c" && presented == "site-a"
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn client_refuses_a_server_from_another_ca() {
    let ca = Cluster::new("gasnet", &["site-b"]);
    let rogue = Cluster::new("other", &["site-a"]);
    let nodes = allowed(&["site-a", "site-b"]);
    let server = server_config(&rogue.identity("site-a"), nodes.clone()).expect("server");
    let client = client_config(&ca.identity("site-b"), nodes).expect("client");

    let out = handshake(client, server, "site-a");

    assert!(
        matches!(
            out.client_err,
            Some(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        ),
        "{:?}",
        out.client_err
    );
}

#[test]
fn server_refuses_tls_1_2() {
    let ca = Cluster::new("gasnet", &["site-a", "site-b"]);
    let server =
        server_config(&ca.identity("site-a"), allowed(&["site-a", "site-b"])).expect("server");
    let id = ca.identity("site-b");
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(cluster_roots(&id).expect("roots"))
        .with_client_auth_cert(id.chain().to_vec(), id.key().clone_key())
        .expect("client");

    let out = handshake(client, server, "site-a");

    assert!(
        matches!(out.server_err, Some(Error::PeerIncompatible(_))),
        "{:?}",
        out.server_err
    );
    assert!(out.client_err.is_some());
}

#[test]
fn allowed_nodes_clones_share_one_set() {
    let a = allowed(&["x"]);
    let b = a.clone();
    b.replace(["y", "z"]);
    assert!(!a.contains("x"));
    assert!(a.contains("y"));
    assert_eq!(a.names(), vec!["y".to_owned(), "z".to_owned()]);
}

#[test]
fn installing_the_crypto_provider_twice_is_harmless() {
    install_crypto_provider();
    install_crypto_provider();
    assert!(CryptoProvider::get_default().is_some());
}
