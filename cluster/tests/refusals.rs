//! Peers that must be refused at the handshake, and frames that must be answered with errors
//! while the link stays up. A raw quinn client stands in for a misbehaving node.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use colony_certs::IssueOptions;
use colony_cluster::envelope::{decode_reply, encode_envelope};
use colony_cluster::frame::{FrameDecoder, FrameKind, encode_frame};
use colony_cluster::{ALPN, Address, CallError, LinkState};
use common::*;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A bare QUIC client presenting the given certificate; returns the connection or the error.
async fn raw_connect(
    ca: &Path,
    cert: &Path,
    key: &Path,
    to: SocketAddr,
    name: &str,
) -> Result<quinn::Connection, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(cert).unwrap()],
            PrivateKeyDer::from_pem_file(key).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = endpoint
        .connect(to, name)
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the server checks the client certificate after the client is done: a refused
    // client sees its connection closed right after.
    match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
        Ok(reason) => Err(reason.to_string()),
        Err(_) => Ok(conn),
    }
}

fn node_a(pki: &Pki, extra_peers: &[Spec]) -> (TestNode, Spec) {
    let a = spec("a", true);
    let mut all = vec![a.clone()];
    all.extend_from_slice(extra_peers);
    (TestNode::start(settings(&a, &all), pki.issue("a")), a)
}

#[test]
fn foreign_unknown_and_expired_certificates_are_refused() {
    let pki = Pki::new();
    let peer = spec("b", false);
    let (a, a_spec) = node_a(&pki, std::slice::from_ref(&peer));
    let to = a_spec.listen.unwrap();

    // A certificate for a configured name, from another CA.
    let other = Pki::new();
    let (_, cert, key) = other.issue_files("b", &IssueOptions::default());
    let r = a.block_on(raw_connect(
        &pki.path().join("ca.pem"),
        &cert,
        &key,
        to,
        "a",
    ));
    assert!(r.is_err(), "foreign CA accepted");

    // A valid certificate for a name the config does not know.
    let (ca, cert, key) = pki.issue_files("intruder", &IssueOptions::default());
    let r = a.block_on(raw_connect(&ca, &cert, &key, to, "a"));
    assert!(r.is_err(), "unknown node accepted");

    // An expired certificate for a configured name.
    let expired = IssueOptions {
        days: 1,
        not_before: Some(time::macros::datetime!(2020-01-01 0:00 UTC)),
    };
    let (ca, cert, key) = pki.issue_files("b", &expired);
    let r = a.block_on(raw_connect(&ca, &cert, &key, to, "a"));
    assert!(r.is_err(), "expired certificate accepted");

    assert!(
        a.cluster.refused_unknown_handshakes() >= 3,
        "refusals not counted: {}",
        a.cluster.refused_unknown_handshakes()
    );
    assert!(
        a.cluster
            .link_stats()
            .iter()
            .all(|l| l.state == LinkState::Down)
    );

    // The node keeps serving: a proper b connects.
    let (ca, cert, key) = pki.issue_files("b", &IssueOptions::default());
    let conn = a
        .block_on(raw_connect(&ca, &cert, &key, to, "a"))
        .expect("valid node refused");
    assert!(wait_for(Duration::from_secs(5), || a.cluster.is_up("b")));
    drop(conn);
}

#[test]
fn a_node_refuses_a_server_with_the_wrong_certificate() {
    // "b" listens but presents a certificate from another CA: "a" must not link to it.
    let pki = Pki::new();
    let other = Pki::new();
    let specs = [spec("a", true), spec("b", true)];
    let a = TestNode::start(settings(&specs[0], &specs), pki.issue("a"));
    let b = TestNode::start(settings(&specs[1], &specs), other.issue("b"));
    assert!(
        wait_for(Duration::from_secs(5), || a.cluster.link_stats()[0]
            .refused_handshakes
            >= 2),
        "{:?}",
        a.cluster.link_stats()
    );
    assert!(!a.cluster.is_up("b") && !b.cluster.is_up("a"));
    let error = a.cluster.link_stats()[0].last_error.clone().unwrap();
    assert!(error.contains("handshake failed"), "{error}");
}

fn call_frame(out: &mut BytesMut, id: u64, to: &str, body: &[u8]) {
    let mut payload = Vec::new();
    encode_envelope(&mut payload, &to.parse::<Address>().unwrap(), None, body);
    encode_frame(out, FrameKind::Call, id, &payload);
}

#[test]
fn bad_frames_get_errors_and_the_link_stays_up() {
    let pki = Pki::new();
    let peer = spec("c", false);
    let (a, a_spec) = node_a(&pki, std::slice::from_ref(&peer));
    let _echo = echo_actor(&a, "echo");
    let (ca, cert, key) = pki.issue_files("c", &IssueOptions::default());
    let replies = a.block_on(async {
        let conn = raw_connect(&ca, &cert, &key, a_spec.listen.unwrap(), "a")
            .await
            .unwrap();
        let mut send = conn.open_uni().await.unwrap();
        let mut out = BytesMut::new();
        encode_frame(&mut out, FrameKind::Call, 77, b"\xffthis is not CBOR");
        encode_frame(&mut out, FrameKind::Call, 78, &vec![0u8; 100_000]);
        call_frame(&mut out, 79, "a/ghost", b"\x60");
        let mut body = Vec::new();
        ciborium::into_writer(&"still there?", &mut body).unwrap();
        call_frame(&mut out, 80, "a/echo", &body);
        send.write_all(&out).await.unwrap();

        let mut recv = conn.accept_uni().await.unwrap();
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut replies = Vec::new();
        while replies.len() < 4 {
            let chunk = tokio::time::timeout(Duration::from_secs(5), recv.read_chunk(65536, true))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            decoder.push(&chunk.bytes);
            while let Some(f) = decoder.next_frame() {
                let f = f.unwrap();
                assert_eq!(f.kind, FrameKind::Reply);
                replies.push((f.correlation, decode_reply(&f.payload)));
            }
        }
        replies.sort_by_key(|r| r.0);
        replies
    });
    assert!(
        matches!(&replies[0], (77, Err(CallError::Rejected(r))) if r.contains("undecodable")),
        "{:?}",
        replies[0]
    );
    assert!(
        matches!(&replies[1], (78, Err(CallError::Rejected(r))) if r.contains("larger than")),
        "{:?}",
        replies[1]
    );
    assert_eq!(
        replies[2],
        (79, Err(CallError::NoSuchActor("a/ghost".into())))
    );
    let (id, ok) = &replies[3];
    assert_eq!(*id, 80);
    let text: String = ciborium::from_reader(ok.as_ref().unwrap().as_ref()).unwrap();
    assert_eq!(text, "a:still there?");
    let stats = a.cluster.link_stats();
    assert_eq!(stats[0].state, LinkState::Up);
    assert!(stats[0].frames_rejected >= 1);
}
