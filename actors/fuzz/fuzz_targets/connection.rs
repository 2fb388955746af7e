//! Fuzzes the broker's connection handling: arbitrary bytes on several connections, framed by
//! the MQTT 3.1.1/5 decoder (in random-sized reads), fed to the broker core with its clock
//! moving, every packet the core answers with encoded in both protocol versions, and at the end
//! the store operations replayed into SQLite and the broker restored from them. Nothing may
//! panic, and the core may only ask for packets that encode.

#![no_main]

use bytes::BytesMut;
use colony_actors::broker::auth::AccessPolicy;
use colony_actors::broker::codec::{Decoder, encode};
use colony_actors::broker::core::{Action, BrokerCore, Restored};
use colony_actors::broker::packet::Protocol;
use colony_actors::broker::store::BrokerStore;
use colony_config::kinds::{AclAccess, AclRule, BrokerLimits};
use libfuzzer_sys::fuzz_target;

fn core(restored: Restored) -> BrokerCore {
    let rules = vec![
        AclRule {
            user: None,
            topic: "a/#".into(),
            access: AclAccess::Readwrite,
        },
        AclRule {
            user: None,
            topic: "clients/%c/#".into(),
            access: AclAccess::Readwrite,
        },
        AclRule {
            user: None,
            topic: "a/deny/#".into(),
            access: AclAccess::Deny,
        },
    ];
    let limits = BrokerLimits {
        max_packet_size: 4096,
        max_inflight: 4,
        max_queued: 16,
        max_connections: 8,
    };
    BrokerCore::new(AccessPolicy::new(true, vec![], rules), limits, restored)
}

fn drain(c: &mut BrokerCore, ops: &mut Vec<colony_actors::broker::core::StoreOp>, now: u64) {
    for a in c.take_actions() {
        if let Action::Send(_, p) = a {
            for protocol in [Protocol::V4, Protocol::V5] {
                let mut out = BytesMut::new();
                if let Err(e) = encode(p.clone(), protocol, now, &mut out) {
                    panic!("the core asked for a packet that does not encode: {e}: {p:?}");
                }
            }
        }
    }
    ops.extend(c.take_store_ops());
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let conns = usize::from(data[0] % 4) + 1;
    let mut c = core(Restored::default());
    let mut ops = Vec::new();
    let mut now = 1_000;
    c.tick(now);
    // Split the rest into one stream per connection, at positions the data chooses.
    let rest = &data[2..];
    let size = rest.len() / conns + 1;
    let mut streams: Vec<(u64, Decoder, BytesMut, bool, &[u8])> = rest
        .chunks(size)
        .enumerate()
        .map(|(i, s)| (i as u64 + 1, Decoder::new(4096), BytesMut::new(), false, s))
        .collect();
    let step = usize::from(data[1] % 16) + 1;
    let mut alive = streams.len();
    while alive > 0 {
        alive = 0;
        for (id, decoder, buf, connected, input) in &mut streams {
            if input.is_empty() {
                continue;
            }
            alive += 1;
            let n = step.min(input.len());
            buf.extend_from_slice(&input[..n]);
            *input = &input[n..];
            loop {
                if !*connected {
                    match decoder.connect(buf) {
                        Ok(Some(connect)) => {
                            c.connect(*id, connect);
                            *connected = true;
                        }
                        Ok(None) => break,
                        Err(_) => {
                            c.closed(*id);
                            *input = &[];
                            break;
                        }
                    }
                } else {
                    match decoder.next(buf) {
                        Ok(Some(p)) => c.packet(*id, p),
                        Ok(None) => break,
                        Err(e) => {
                            c.cut_off(*id, e.disconnect_code());
                            *input = &[];
                            break;
                        }
                    }
                }
                drain(&mut c, &mut ops, now);
            }
            if input.is_empty() {
                c.closed(*id);
            }
        }
        now += 1;
        c.tick(now);
        drain(&mut c, &mut ops, now);
    }
    // Later connections find a consistent broker; then restart it from its store.
    now += 10_000;
    c.tick(now);
    drain(&mut c, &mut ops, now);
    if ops.is_empty() {
        return;
    }
    let mut store = BrokerStore::open(std::path::Path::new(":memory:")).expect("in-memory store");
    store.apply(&ops).expect("store ops apply");
    let restored = store.load().expect("store loads");
    let mut again = core(restored);
    again.tick(now);
    again.start();
    drain(&mut again, &mut Vec::new(), now);
});
