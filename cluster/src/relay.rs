//! Relayed links between two nodes that cannot dial each other (both behind NAT).
//!
//! Both nodes dial every listening node, so a listening node both reach carries their traffic.
//! The relay forwards [`FrameKind::Relay`] frames between its links without being able to read or
//! forge them: the two ends run a session of their own on top.
//!
//! **Session.** The end whose name sorts first sends `Hello` with its certificate chain, a fresh
//! X25519 public key and an ECDSA signature (by its node key) over the session transcript; the
//! other end checks the chain against the cluster CA and the signed name, answers with its own
//! signed `Hello`, and both derive two ChaCha20-Poly1305 keys (one per direction) with HKDF from
//! the X25519 secret. Every frame between them is then sealed with a strictly increasing counter as
//! nonce, so the relay can neither read, alter, replay nor inject one. Sealed empty frames every
//! heartbeat keep the session alive; silence for the failure timeout, or the loss of the relay's
//! link, takes it down, and the initiator starts a new one (through any relay that is up).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
use ring::hkdf;
use ring::rand::SystemRandom;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::SigningKey;
use rustls::{RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use colony_certs::NodeIdentity;

use crate::frame::{Frame, FrameDecoder, FrameKind, frame_bytes};
use crate::link::Link;
use crate::node::Inner;
use crate::registry::FrameSink;
use crate::stats::{LinkState, LinkStats, NodeEvent, unix_ms};

const TRANSCRIPT_LABEL: &[u8] = b"colony relay session v1";

#[derive(Serialize, Deserialize)]
struct RelayMsg {
    from: String,
    to: String,
    body: RelayBody,
}

#[derive(Serialize, Deserialize)]
enum RelayBody {
    Hello {
        #[serde(with = "serde_bytes")]
        cert: Vec<u8>,
        #[serde(with = "serde_bytes")]
        ephemeral: Vec<u8>,
        /// The initiator's ephemeral key, in an answer; empty in the first hello.
        #[serde(with = "serde_bytes")]
        answers: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    Sealed {
        counter: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

fn encode(msg: &RelayMsg) -> Bytes {
    let mut out = Vec::new();
    let _ = ciborium::into_writer(msg, &mut out);
    frame_bytes(FrameKind::Relay, 0, &out)
}

/// The bytes each side signs: label, both names in initiator-responder order, and both
/// ephemeral keys (the responder's signature covers the initiator's key too).
fn transcript(
    initiator: &str,
    responder: &str,
    initiator_key: &[u8],
    responder_key: &[u8],
) -> Vec<u8> {
    let mut t = TRANSCRIPT_LABEL.to_vec();
    for part in [
        initiator.as_bytes(),
        responder.as_bytes(),
        initiator_key,
        responder_key,
    ] {
        t.extend_from_slice(&(part.len() as u32).to_be_bytes());
        t.extend_from_slice(part);
    }
    t
}

/// One end-to-end session with a peer through a relay.
pub(crate) struct Session {
    peer: String,
    via: Arc<str>,
    since: SystemTime,
    seal_key: LessSafeKey,
    open_key: LessSafeKey,
    /// Held across sealing and queueing so counters reach the relay in order.
    send_counter: tokio::sync::Mutex<u64>,
    recv_counter: Mutex<u64>,
    last_heard: Mutex<Instant>,
    messages_out: AtomicU64,
    messages_in: AtomicU64,
    frames_rejected: AtomicU64,
}

/// Sends to a peer through a relay session.
#[derive(Clone)]
pub(crate) struct RelayRoute {
    session: Arc<Session>,
    relay: Arc<Link>,
    me: Arc<str>,
}

impl RelayRoute {
    /// Seals `frame` and queues it on the relay's link; false when the relay link is gone.
    pub(crate) async fn send(&self, frame: Bytes) -> bool {
        self.send_frames(frame, 1).await
    }

    /// Seals `count` whole frames laid end to end in `frames` into one relay message.
    pub(crate) async fn send_frames(&self, frames: Bytes, count: u64) -> bool {
        let mut counter = self.session.send_counter.lock().await;
        *counter += 1;
        let mut data = frames.to_vec();
        if self
            .session
            .seal_key
            .seal_in_place_append_tag(nonce(*counter), Aad::empty(), &mut data)
            .is_err()
        {
            return false;
        }
        let msg = RelayMsg {
            from: self.me.to_string(),
            to: self.session.peer.clone(),
            body: RelayBody::Sealed {
                counter: *counter,
                data,
            },
        };
        self.session
            .messages_out
            .fetch_add(count, Ordering::Relaxed);
        self.relay.send_frames(encode(&msg), count).await
    }
}

impl FrameSink for RelayRoute {
    fn send_frame(&self, frame: Bytes) {
        let route = self.clone();
        tokio::spawn(async move {
            route.send(frame).await;
        });
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

type SessionVia = (Arc<Session>, Arc<Link>);

struct PendingHello {
    key: EphemeralPrivateKey,
    public: Vec<u8>,
    sent: Instant,
}

/// This node's relay sessions, and the relay duty for others.
pub(crate) struct RelayHub {
    identity: NodeIdentity,
    signer: Option<Arc<dyn SigningKey>>,
    verifier: Option<Arc<WebPkiServerVerifier>>,
    rng: SystemRandom,
    /// Established sessions by peer, with the link to the relay carrying each.
    sessions: Mutex<HashMap<String, SessionVia>>,
    pending: Mutex<HashMap<String, PendingHello>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RelayHub {
    pub(crate) fn new(identity: NodeIdentity) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(identity.key()).ok();
        let mut roots = RootCertStore::empty();
        let verifier = roots.add(identity.ca().clone()).ok().and_then(|()| {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .ok()
        });
        RelayHub {
            identity,
            signer,
            verifier,
            rng: SystemRandom::new(),
            sessions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn route(&self, peer: &str) -> Option<RelayRoute> {
        let sessions = lock(&self.sessions);
        let (session, relay) = sessions.get(peer)?;
        Some(RelayRoute {
            session: session.clone(),
            relay: relay.clone(),
            me: self.identity.name().into(),
        })
    }

    /// Since when (Unix ms) `peer` is reached through a relay, if it is.
    pub(crate) fn relayed_since(&self, peer: &str) -> Option<u64> {
        lock(&self.sessions)
            .get(peer)
            .map(|(s, _)| unix_ms(s.since))
    }

    pub(crate) fn fill_stats(&self, stats: &mut LinkStats) {
        if let Some((s, relay)) = lock(&self.sessions).get(&stats.peer) {
            stats.state = LinkState::Relayed;
            stats.via = Some(s.via.to_string());
            stats.since_unix_ms = unix_ms(s.since);
            stats.rtt_us = relay.conn.rtt().as_micros() as u64 * 2;
            stats.messages_out = s.messages_out.load(Ordering::Relaxed);
            stats.messages_in = s.messages_in.load(Ordering::Relaxed);
            stats.frames_rejected = s.frames_rejected.load(Ordering::Relaxed);
        }
    }

    fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let signer = self
            .signer
            .as_ref()?
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])?;
        signer.sign(message).ok()
    }

    /// Checks that `cert` is a valid cluster certificate for `node` and signed `message`.
    fn verify(
        &self,
        node: &str,
        cert: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String> {
        let verifier = self.verifier.as_ref().ok_or("no verifier")?;
        let cert = CertificateDer::from(cert.to_vec());
        let name = ServerName::try_from(node.to_owned()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .map_err(|e| e.to_string())?;
        let end_entity = webpki::EndEntityCert::try_from(&cert).map_err(|e| e.to_string())?;
        end_entity
            .verify_signature(webpki::ring::ECDSA_P256_SHA256, message, signature)
            .map_err(|e| format!("bad signature: {e}"))
    }

    fn hello(&self, to: &str, ephemeral: Vec<u8>, answers: Vec<u8>, signature: Vec<u8>) -> Bytes {
        encode(&RelayMsg {
            from: self.identity.name().to_owned(),
            to: to.to_owned(),
            body: RelayBody::Hello {
                cert: self.identity.cert().to_vec(),
                ephemeral,
                answers,
                signature,
            },
        })
    }

    /// Starts a session with `peer` through `relay`.
    fn initiate(&self, peer: &str, relay: &Link) -> Option<Bytes> {
        let key = EphemeralPrivateKey::generate(&X25519, &self.rng).ok()?;
        let public = key.compute_public_key().ok()?.as_ref().to_vec();
        let signature = self.sign(&transcript(self.identity.name(), peer, &public, &[]))?;
        let hello = self.hello(peer, public.clone(), Vec::new(), signature);
        lock(&self.pending).insert(
            peer.to_owned(),
            PendingHello {
                key,
                public,
                sent: Instant::now(),
            },
        );
        debug!(peer, via = %relay.peer, "relay hello sent");
        Some(hello)
    }

    /// Drops every session carried by `relay` (its link went down); returns the peers lost.
    fn drop_via(&self, relay: &str) -> Vec<String> {
        let mut sessions = lock(&self.sessions);
        let lost: Vec<String> = sessions
            .iter()
            .filter(|(_, (s, _))| &*s.via == relay)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &lost {
            sessions.remove(p);
        }
        lost
    }

    pub(crate) fn link_lost(&self, inner: &Inner, relay: &str) {
        for peer in self.drop_via(relay) {
            warn!(peer = %peer, via = relay, "relayed link down: relay lost");
            inner.fail_pending(&peer);
            inner.emit(NodeEvent::Down {
                node: peer,
                reason: format!("relay {relay} lost"),
            });
        }
    }
}

fn derive_keys(
    secret: &[u8],
    initiator_key: &[u8],
    responder_key: &[u8],
) -> Option<(LessSafeKey, LessSafeKey)> {
    let mut salt = initiator_key.to_vec();
    salt.extend_from_slice(responder_key);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(secret);
    let key = |info: &[u8]| -> Option<LessSafeKey> {
        let info = [info];
        let okm = prk.expand(&info, &CHACHA20_POLY1305).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    };
    Some((
        key(b"initiator to responder")?,
        key(b"responder to initiator")?,
    ))
}

fn new_session(
    peer: &str,
    via: &Link,
    seal_key: LessSafeKey,
    open_key: LessSafeKey,
) -> Arc<Session> {
    Arc::new(Session {
        peer: peer.to_owned(),
        via: via.peer.clone(),
        since: SystemTime::now(),
        seal_key,
        open_key,
        send_counter: tokio::sync::Mutex::new(0),
        recv_counter: Mutex::new(0),
        last_heard: Mutex::new(Instant::now()),
        messages_out: AtomicU64::new(0),
        messages_in: AtomicU64::new(0),
        frames_rejected: AtomicU64::new(0),
    })
}

/// Handles a relay frame that arrived on the direct link from `link_peer`.
pub(crate) async fn handle_frame(inner: &Arc<Inner>, link_peer: &str, frame: Frame) {
    let msg: RelayMsg = match ciborium::from_reader(frame.payload.as_ref()) {
        Ok(m) => m,
        Err(e) => {
            debug!(peer = link_peer, "undecodable relay frame: {e}");
            return;
        }
    };
    if msg.to != *inner.name {
        // Relay duty: forward as is, but only what the sending link's own node originated.
        if msg.from != link_peer {
            warn!(peer = link_peer, claimed = %msg.from, "dropped a relay frame with a forged origin");
            return;
        }
        if let Some(link) = inner.direct_link(&msg.to) {
            link.send(frame_bytes(FrameKind::Relay, 0, &frame.payload))
                .await;
        }
        return;
    }
    if !inner.is_configured(&msg.from) {
        return;
    }
    let Some(via) = inner.direct_link(link_peer) else {
        return;
    };
    let hub = &inner.relay;
    match msg.body {
        RelayBody::Hello {
            cert,
            ephemeral,
            answers,
            signature,
        } => {
            let me = inner.name.to_string();
            let initiator_first = answers.is_empty();
            let (initiator, responder, ik, rk) = if initiator_first {
                (
                    msg.from.as_str(),
                    me.as_str(),
                    ephemeral.as_slice(),
                    &[][..],
                )
            } else {
                (
                    me.as_str(),
                    msg.from.as_str(),
                    answers.as_slice(),
                    ephemeral.as_slice(),
                )
            };
            if let Err(e) = hub.verify(
                &msg.from,
                &cert,
                &transcript(initiator, responder, ik, rk),
                &signature,
            ) {
                warn!(peer = %msg.from, via = link_peer, "refused relay hello: {e}");
                return;
            }
            if initiator_first {
                accept_hello(inner, &msg.from, &via, ephemeral).await;
            } else {
                complete_hello(inner, &msg.from, &via, &answers, &ephemeral);
            }
        }
        RelayBody::Sealed { counter, mut data } => {
            let Some((session, relay)) = lock(&hub.sessions).get(&msg.from).cloned() else {
                return;
            };
            {
                let mut last = lock(&session.recv_counter);
                if counter <= *last
                    || session
                        .open_key
                        .open_in_place(nonce(counter), Aad::empty(), &mut data)
                        .is_err()
                {
                    session.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                *last = counter;
            }
            *lock(&session.last_heard) = Instant::now();
            data.truncate(data.len() - CHACHA20_POLY1305.tag_len());
            if data.is_empty() {
                return; // heartbeat
            }
            let mut decoder = FrameDecoder::new(inner.max_frame);
            decoder.push(&data);
            let counted = session.clone();
            let sink: Arc<dyn FrameSink> = Arc::new(RelayRoute {
                session,
                relay,
                me: inner.name.clone(),
            });
            // A sealed message may carry several frames (a batch).
            while let Some(Ok(inner_frame)) = decoder.next_frame() {
                if inner_frame.kind != FrameKind::Relay {
                    counted.messages_in.fetch_add(1, Ordering::Relaxed);
                    inner.handle_frame(&msg.from, &sink, inner_frame).await;
                }
            }
        }
    }
}

async fn accept_hello(inner: &Arc<Inner>, peer: &str, via: &Arc<Link>, their_key: Vec<u8>) {
    let hub = &inner.relay;
    let Ok(key) = EphemeralPrivateKey::generate(&X25519, &hub.rng) else {
        return;
    };
    let Ok(public) = key.compute_public_key().map(|k| k.as_ref().to_vec()) else {
        return;
    };
    let keys = agree_ephemeral(
        key,
        &UnparsedPublicKey::new(&X25519, &their_key),
        |secret| derive_keys(secret, &their_key, &public),
    );
    let Ok(Some((i2r, r2i))) = keys else { return };
    let Some(signature) = hub.sign(&transcript(peer, &inner.name, &their_key, &public)) else {
        return;
    };
    let session = new_session(peer, via, r2i, i2r);
    let replaced = lock(&hub.sessions).insert(peer.to_owned(), (session, via.clone()));
    via.send(hub.hello(peer, public, their_key, signature))
        .await;
    session_up(inner, peer, via, replaced.is_some());
}

fn complete_hello(
    inner: &Arc<Inner>,
    peer: &str,
    via: &Arc<Link>,
    my_key: &[u8],
    their_key: &[u8],
) {
    let hub = &inner.relay;
    let pending = {
        let mut pending = lock(&hub.pending);
        match pending.get(peer) {
            Some(p) if p.public == my_key => pending.remove(peer),
            _ => None,
        }
    };
    let Some(pending) = pending else { return };
    let keys = agree_ephemeral(
        pending.key,
        &UnparsedPublicKey::new(&X25519, their_key),
        |secret| derive_keys(secret, my_key, their_key),
    );
    let Ok(Some((i2r, r2i))) = keys else { return };
    let session = new_session(peer, via, i2r, r2i);
    let replaced = lock(&hub.sessions).insert(peer.to_owned(), (session, via.clone()));
    session_up(inner, peer, via, replaced.is_some());
}

fn session_up(inner: &Inner, peer: &str, via: &Link, replaced: bool) {
    if replaced {
        inner.fail_pending(peer);
        inner.emit(NodeEvent::Down {
            node: peer.to_owned(),
            reason: "relay session renewed".into(),
        });
    }
    info!(peer, via = %via.peer, "relayed link up");
    inner.emit(NodeEvent::Up {
        node: peer.to_owned(),
        via: Some(via.peer.to_string()),
    });
}

/// Every heartbeat: keeps sessions alive, expires silent ones, and starts missing ones.
pub(crate) async fn maintain(inner: Arc<Inner>) {
    let weak = Arc::downgrade(&inner);
    drop(inner);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (heartbeat, failure_timeout) = {
            let s = inner.settings.read().unwrap_or_else(|e| e.into_inner());
            (s.heartbeat, s.failure_timeout)
        };
        let hub = &inner.relay;
        let wanted = inner.unreachable_directly();
        // Expire silent sessions and sessions with peers no longer configured.
        let expired: Vec<String> = {
            let mut sessions = lock(&hub.sessions);
            let dead: Vec<String> = sessions
                .iter()
                .filter(|(p, (s, _))| {
                    !wanted.contains(p) || lock(&s.last_heard).elapsed() > failure_timeout
                })
                .map(|(p, _)| p.clone())
                .collect();
            for p in &dead {
                sessions.remove(p);
            }
            dead
        };
        for peer in expired {
            warn!(peer = %peer, "relayed link down: silent for {failure_timeout:?}");
            inner.fail_pending(&peer);
            inner.emit(NodeEvent::Down {
                node: peer,
                reason: "relayed peer silent".into(),
            });
        }
        let relays = inner.listening_peers_up();
        for peer in &wanted {
            if let Some(route) = hub.route(peer) {
                route.send(Bytes::new()).await;
                continue;
            }
            // The end whose name sorts first starts the session.
            if *inner.name > **peer {
                continue;
            }
            let retry = lock(&hub.pending)
                .get(peer)
                .is_none_or(|p| p.sent.elapsed() > failure_timeout);
            if !retry || relays.is_empty() {
                continue;
            }
            // Rotate through the relays so one that cannot reach the peer does not block.
            let attempt = lock(&hub.pending).len()
                + peer.len()
                + (unix_ms(SystemTime::now()) / 1000) as usize;
            let relay = &relays[attempt % relays.len()];
            if let Some(hello) = hub.initiate(peer, relay) {
                relay.send(hello).await;
            }
        }
        drop(inner);
        tokio::time::sleep(heartbeat.min(Duration::from_millis(500))).await;
    }
}
