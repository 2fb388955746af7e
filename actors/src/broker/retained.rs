//! Retained messages: the last retained publish on each topic, handed to new subscribers.
//!
//! A retained publish with an empty payload clears the topic (MQTT 3.1.1 §3.3.1.3).

use std::collections::BTreeMap;

use super::session::Message;
use super::topic::filter_matches;

/// What a retained publish did to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetainChange {
    /// The topic now holds this message.
    Set,
    /// The topic was cleared.
    Cleared,
    /// Nothing changed (an empty payload on a topic with nothing retained).
    None,
}

/// Retained messages by topic.
#[derive(Debug, Default)]
pub struct RetainedStore {
    by_topic: BTreeMap<String, Message>,
}

impl RetainedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a retained publish.
    pub fn apply(&mut self, message: &Message) -> RetainChange {
        if message.payload.is_empty() {
            match self.by_topic.remove(&message.topic) {
                Some(_) => RetainChange::Cleared,
                None => RetainChange::None,
            }
        } else {
            let mut m = message.clone();
            m.retain = true;
            m.origin = None;
            self.by_topic.insert(message.topic.clone(), m);
            RetainChange::Set
        }
    }

    /// Retained messages whose topic `filter` matches, in topic order.
    pub fn matching(&self, filter: &str) -> Vec<Message> {
        self.by_topic
            .values()
            .filter(|m| filter_matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    /// Number of retained topics.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn m(topic: &str, payload: &'static [u8]) -> Message {
        Message::new(topic, Bytes::from_static(payload), 1, true)
    }

    #[test]
    fn set_replace_clear() {
        let mut r = RetainedStore::new();
        assert_eq!(r.apply(&m("a/b", b"1")), RetainChange::Set);
        assert_eq!(r.apply(&m("a/b", b"2")), RetainChange::Set);
        assert_eq!(r.apply(&m("a/c", b"3")), RetainChange::Set);
        assert_eq!(r.len(), 2);
        let got = r.matching("a/+");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].payload, Bytes::from_static(b"2"));
        assert_eq!(r.apply(&m("a/b", b"")), RetainChange::Cleared);
        assert_eq!(r.apply(&m("a/b", b"")), RetainChange::None);
        assert_eq!(r.matching("#").len(), 1);
        assert!(r.matching("$SYS/#").is_empty());
    }
}
