//! Actor subscriptions the cluster config implies.
//!
//! A collector with `source = { broker = "n/broker", via = "actor", topics = [...] }` will
//! subscribe to that broker when it starts; but a message published before it first starts, or
//! while it is down before it ever subscribed, would have nobody to be queued for. So the broker
//! creates these subscriptions itself when it starts (idempotently: ones already held are left
//! alone), and their QoS 1/2 messages wait in its store until the subscriber acknowledges them.

use colony_config::kinds::{BridgeRemote, CollectorVia};

use crate::bridge::rules::Side;
use colony_config::{ActorSettings, Address, ClusterConfig};

/// One actor subscription declared by the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredSubscription {
    /// Who receives the notices.
    pub subscriber: Address,
    /// Topic filters.
    pub filters: Vec<String>,
    /// Maximum QoS.
    pub qos: u8,
    /// The subscriber's own publishes are not delivered to it.
    pub no_local: bool,
    /// The in-flight window the subscriber asks for (a collector: a few of its batches), so
    /// that it holds from the broker's start, before the subscriber subscribes again.
    pub window: Option<u32>,
}

/// The actor subscriptions `config` declares on the broker at `broker`.
pub fn declared_subscriptions(
    config: &ClusterConfig,
    broker: &Address,
) -> Vec<DeclaredSubscription> {
    let mut out = Vec::new();
    for actor in &config.actors {
        match &actor.settings {
            ActorSettings::Collector(c) => {
                if c.source.via == CollectorVia::Actor
                    && c.source.broker.as_ref() == Some(broker)
                    && !c.source.topics.is_empty()
                {
                    out.push(DeclaredSubscription {
                        subscriber: actor.address(),
                        filters: c.source.topics.clone(),
                        qos: c.qos.min(2),
                        no_local: false,
                        window: Some(crate::collector::actor_window(c.batch_size)),
                    });
                }
            }
            // A bridge takes its out-rule filters from its local broker and, from a Colony
            // remote, its in-rule filters; never its own publishes.
            ActorSettings::Bridge(b) => {
                let rules = crate::bridge::rules::Rules::new(b.topics.clone());
                let mut sides = vec![(&b.local, Side::Local)];
                if let BridgeRemote::Actor(remote) = &b.remote {
                    sides.push((remote, Side::Remote));
                }
                for (on, side) in sides {
                    if on != broker {
                        continue;
                    }
                    for (qos, filters) in crate::bridge::by_qos(&rules.filters(side)) {
                        out.push(DeclaredSubscription {
                            subscriber: actor.address(),
                            filters,
                            qos,
                            no_local: true,
                            window: Some(crate::bridge::NOTICE_WINDOW),
                        });
                    }
                }
            }
            // Kinds that subscribe to no broker by address.
            ActorSettings::Broker(_)
            | ActorSettings::Tunnel(_)
            | ActorSettings::SensorGroup(_)
            | ActorSettings::Balancer(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_via_actor_on_this_broker_are_declared() {
        let text = r#"
[cluster]
name = "t"

[[node]]
name = "n1"
listen = "127.0.0.1:7000"

[[actor]]
name = "broker"
node = "n1"
kind = "broker"
listen = "127.0.0.1:1883"

[[actor]]
name = "other"
node = "n1"
kind = "broker"
listen = "127.0.0.1:1884"

[[actor]]
name = "by-actor"
node = "n1"
kind = "collector"
database = "a.sqlite"
source = { broker = "n1/broker", topics = ["a/#", "b"], via = "actor" }

[[actor]]
name = "by-mqtt"
node = "n1"
kind = "collector"
database = "b.sqlite"
source = { broker = "n1/broker", topics = ["c/#"], via = "mqtt" }

[[actor]]
name = "elsewhere"
node = "n1"
kind = "collector"
database = "c.sqlite"
qos = 0
source = { broker = "n1/other", topics = ["d/#"], via = "actor" }
"#;
        let config = ClusterConfig::from_toml_str(text, "t.toml").expect("config parses");
        let broker: Address = "n1/broker".parse().unwrap();
        assert_eq!(
            declared_subscriptions(&config, &broker),
            [DeclaredSubscription {
                subscriber: "n1/by-actor".parse().unwrap(),
                filters: vec!["a/#".into(), "b".into()],
                qos: 1,
                no_local: false,
                window: Some(crate::collector::actor_window(5000)),
            }]
        );
        let other: Address = "n1/other".parse().unwrap();
        let d = declared_subscriptions(&config, &other);
        assert_eq!((d.len(), d[0].qos), (1, 0));
    }
}
