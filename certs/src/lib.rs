//! Colony's cluster identity: the cluster CA, node certificates, and the rustls configs nodes use
//! to authenticate each other.
//!
//! Every Colony cluster has its own certificate authority. The operator creates it once
//! ([`init_ca`]) and issues each node a certificate ([`issue_node_cert`]) whose single DNS name
//! *is* the node's name. A node loads its identity ([`NodeIdentity::load`]), which checks the
//! files before the node starts, and builds its TLS configs from it ([`server_config`],
//! [`client_config`]): mutual TLS 1.3 where a peer is accepted only if its certificate chains to
//! the cluster CA, is currently valid, and names a node in the cluster config ([`AllowedNodes`]).
//! After a handshake, [`peer_node_name`] reads the peer's name from the certificate it presented —
//! a peer's name is never taken from what it says.
//!
//! This crate is not the transport: it opens no sockets and knows nothing of QUIC, quinn or ALPN;
//! the cluster crate feeds these configs to quinn. It is not a general PKI either: no revocation
//! lists, no intermediate CAs, no RSA — one CA per cluster, ECDSA P-256 keys, re-issue to renew.
//! All files are PEM; key files are created with mode 0600 (Unix only).

mod ca;
mod error;
mod files;
mod identity;
mod inspect;
mod names;
mod tls;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CaFiles, IssueOptions, NodeFiles, init_ca, issue_node_cert,
};
pub use error::CertError;
pub use identity::{NodeIdentity, node_name_from_cert, peer_node_name};
pub use inspect::{CertInfo, describe, sha256_fingerprint};
pub use names::validate_node_name;
pub use tls::{AllowedNodes, client_config, install_crypto_provider, server_config};
