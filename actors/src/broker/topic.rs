//! Topic names, topic filters and the subscription trie.
//!
//! A [`SubscriptionTrie`] maps topic filters (with `+` and `#` wildcards) to subscribers and
//! answers "who receives a publish on this topic" in time proportional to the topic's depth, not
//! to the number of subscriptions. Shared subscriptions (`$share/group/filter`) are kept per group;
//! [`SubscriptionTrie::matches`] reports each group once, with all of its members, and the caller
//! picks one member per group. Filters beginning with a wildcard do not match topics beginning with
//! `$` (MQTT 3.1.1 §4.7.2), so `#` does not receive `$SYS`.

use std::collections::HashMap;
use std::hash::Hash;

/// Longest topic name or filter accepted, in bytes (the MQTT string limit).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// True when `topic` may be published to: non-empty, no wildcards, no NUL.
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.contains(['+', '#', '\0'])
}

/// True when `filter` is a valid topic filter: non-empty, `#` only as the whole last level, `+`
/// only as a whole level, no NUL.
pub fn is_valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > MAX_TOPIC_LEN || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return false,
            "#" | "+" => {}
            l if l.contains(['#', '+']) => return false,
            _ => {}
        }
    }
    true
}

/// A subscription filter split into its share group (for `$share/group/filter`) and filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    /// The share group, for a shared subscription.
    pub group: Option<&'a str>,
    /// The filter proper.
    pub filter: &'a str,
}

/// Parses a subscription filter, `$share/group/filter` included; `None` when it is invalid.
pub fn parse_filter(raw: &str) -> Option<ParsedFilter<'_>> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/')?;
        if group.is_empty() || group.contains(['+', '#']) || !is_valid_topic_filter(filter) {
            return None;
        }
        return Some(ParsedFilter {
            group: Some(group),
            filter,
        });
    }
    is_valid_topic_filter(raw).then_some(ParsedFilter {
        group: None,
        filter: raw,
    })
}

/// True when `topic` matches `filter` (both valid). The reference the trie is tested against.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every topic `filter` matches is also matched by `pattern` (used for ACLs on
/// subscriptions: a client may subscribe to `a/+` under a rule for `a/#`, not the reverse).
pub fn filter_covered_by(filter: &str, pattern: &str) -> bool {
    let mut f = filter.split('/');
    let mut p = pattern.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// How a subscriber subscribed to one filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    /// Maximum QoS.
    pub qos: u8,
    /// Publishes from the subscriber itself are not delivered to it (MQTT 5 no-local).
    pub no_local: bool,
    /// Deliver with the retain flag as published, not cleared (MQTT 5 retain-as-published).
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier.
    pub id: Option<u32>,
}

impl From<u8> for SubOptions {
    fn from(qos: u8) -> Self {
        SubOptions {
            qos,
            ..SubOptions::default()
        }
    }
}

/// One subscriber's entry on a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry<K> {
    key: K,
    opts: SubOptions,
    group: Option<String>,
}

#[derive(Debug)]
struct Node<K> {
    children: HashMap<String, Node<K>>,
    /// Subscribers whose filter ends at this node.
    here: Vec<Entry<K>>,
    /// Subscribers whose filter ends with `#` below this node.
    multi: Vec<Entry<K>>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            here: Vec::new(),
            multi: Vec::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.multi.is_empty()
    }
}

/// A subscriber that a publish reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<K> {
    /// The subscriber.
    pub key: K,
    /// The QoS it subscribed with (the highest of its matching filters).
    pub qos: u8,
    /// Every matching filter was subscribed with no-local.
    pub no_local: bool,
    /// Some matching filter was subscribed with retain-as-published.
    pub retain_as_published: bool,
    /// Subscription identifiers of the matching filters.
    pub ids: Vec<u32>,
}

impl<K> Match<K> {
    fn new(key: K, o: &SubOptions) -> Self {
        Match {
            key,
            qos: o.qos,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            ids: o.id.into_iter().collect(),
        }
    }

    fn merge(&mut self, o: &SubOptions) {
        self.qos = self.qos.max(o.qos);
        self.no_local &= o.no_local;
        self.retain_as_published |= o.retain_as_published;
        self.ids.extend(o.id);
    }
}

/// A share group (`group`, `filter`) and the members a publish on it may go to.
pub type SharedGroup<K> = ((String, String), Vec<Match<K>>);

/// What a publish on a topic reaches: plain subscribers and, per share group, its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matches<K> {
    /// Each plain subscriber once, with its highest matching QoS.
    pub direct: Vec<Match<K>>,
    /// Share groups (`group`, `filter`) and their members; deliver to one member of each.
    pub shared: Vec<SharedGroup<K>>,
}

/// Topic filters to subscribers.
#[derive(Debug)]
pub struct SubscriptionTrie<K> {
    root: Node<K>,
    count: usize,
}

impl<K> Default for SubscriptionTrie<K> {
    fn default() -> Self {
        SubscriptionTrie {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<K: Clone + Eq + Hash> SubscriptionTrie<K> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscriptions held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces `key`'s subscription to `filter` (a valid filter) in `group`.
    pub fn insert(
        &mut self,
        filter: &str,
        group: Option<&str>,
        key: K,
        opts: impl Into<SubOptions>,
    ) {
        let opts = opts.into();
        let (node, multi) = self.node_mut(filter);
        let list = if multi {
            &mut node.multi
        } else {
            &mut node.here
        };
        let group = group.map(str::to_owned);
        match list.iter_mut().find(|e| e.key == key && e.group == group) {
            Some(e) => e.opts = opts,
            None => {
                list.push(Entry { key, opts, group });
                self.count += 1;
            }
        }
    }

    /// Removes `key`'s subscription to `filter` in `group`; true when there was one.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, key: &K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, group, key);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Everyone a publish on `topic` reaches.
    pub fn matches(&self, topic: &str) -> Matches<K> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out: Vec<(&Entry<K>, String)> = Vec::new();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, 0, dollar, String::new(), &mut out);
        let mut direct: Vec<Match<K>> = Vec::new();
        let mut shared: Vec<SharedGroup<K>> = Vec::new();
        for (e, filter) in out {
            match &e.group {
                None => match direct.iter_mut().find(|m| m.key == e.key) {
                    Some(m) => m.merge(&e.opts),
                    None => direct.push(Match::new(e.key.clone(), &e.opts)),
                },
                Some(g) => {
                    let id = (g.clone(), filter);
                    let m = Match::new(e.key.clone(), &e.opts);
                    match shared.iter_mut().find(|(k, _)| *k == id) {
                        Some((_, members)) => members.push(m),
                        None => shared.push((id, vec![m])),
                    }
                }
            }
        }
        Matches { direct, shared }
    }

    fn node_mut(&mut self, filter: &str) -> (&mut Node<K>, bool) {
        let mut node = &mut self.root;
        let mut multi = false;
        for level in filter.split('/') {
            if level == "#" {
                multi = true;
                break;
            }
            node = node.children.entry(level.to_owned()).or_default();
        }
        (node, multi)
    }
}

fn remove_at<K: Eq>(node: &mut Node<K>, levels: &[&str], group: Option<&str>, key: &K) -> bool {
    let same = |e: &Entry<K>| e.key == *key && e.group.as_deref() == group;
    match levels.split_first() {
        Some((&"#", _)) => remove_from(&mut node.multi, same),
        None => remove_from(&mut node.here, same),
        Some((level, rest)) => {
            let Some(child) = node.children.get_mut(*level) else {
                return false;
            };
            let removed = remove_at(child, rest, group, key);
            if child.is_empty() {
                node.children.remove(*level);
            }
            removed
        }
    }
}

fn remove_from<K>(list: &mut Vec<Entry<K>>, same: impl Fn(&Entry<K>) -> bool) -> bool {
    let before = list.len();
    list.retain(|e| !same(e));
    list.len() != before
}

fn collect<'a, K>(
    node: &'a Node<K>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    path: String,
    out: &mut Vec<(&'a Entry<K>, String)>,
) {
    let join = |path: &str, level: &str| {
        if depth == 0 {
            level.to_owned()
        } else {
            format!("{path}/{level}")
        }
    };
    // `#` matches the parent level too ("a/#" matches "a"), but not at the root for `$` topics.
    if !(dollar && depth == 0) {
        let filter = join(&path, "#");
        out.extend(node.multi.iter().map(|e| (e, filter.clone())));
    }
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.here.iter().map(|e| (e, path.clone())));
        return;
    };
    if let Some(child) = node.children.get(*level) {
        collect(child, rest, depth + 1, dollar, join(&path, level), out);
    }
    if !(dollar && depth == 0)
        && let Some(child) = node.children.get("+")
    {
        collect(child, rest, depth + 1, dollar, join(&path, "+"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(t: &SubscriptionTrie<u32>, topic: &str) -> Vec<u32> {
        let mut v: Vec<u32> = t.matches(topic).direct.into_iter().map(|m| m.key).collect();
        v.sort();
        v
    }

    #[test]
    fn names_and_filters() {
        for ok in ["a", "a/b", "a/+/c", "#", "a/#", "+", "+/+", "/a", "a//b"] {
            assert!(is_valid_topic_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "a\0", "#/a"] {
            assert!(!is_valid_topic_filter(bad), "{bad:?}");
        }
        assert!(is_valid_topic_name("a/b"));
        for bad in ["", "a/+", "a/#", "a\0b"] {
            assert!(!is_valid_topic_name(bad), "{bad:?}");
        }
        assert_eq!(
            parse_filter("$share/g/a/+"),
            Some(ParsedFilter {
                group: Some("g"),
                filter: "a/+"
            })
        );
        assert_eq!(parse_filter("$share/g"), None);
        assert_eq!(parse_filter("$share//a"), None);
    }

    #[test]
    fn wildcards_match_like_the_spec() {
        let mut t = SubscriptionTrie::new();
        t.insert("sport/tennis/player1/#", None, 1, 0);
        t.insert("sport/+", None, 2, 0);
        t.insert("+/+", None, 3, 0);
        t.insert("#", None, 4, 0);
        t.insert("sport/tennis/+", None, 5, 0);
        t.insert("/finance", None, 6, 0);
        assert_eq!(keys(&t, "sport/tennis/player1"), [1, 4, 5]);
        assert_eq!(keys(&t, "sport/tennis/player1/ranking"), [1, 4]);
        assert_eq!(keys(&t, "sport"), [4]);
        assert_eq!(keys(&t, "sport/"), [2, 3, 4]);
        assert_eq!(keys(&t, "/finance"), [3, 4, 6]);
        assert_eq!(keys(&t, "$SYS/x"), Vec::<u32>::new());
        t.insert("$SYS/#", None, 7, 0);
        assert_eq!(keys(&t, "$SYS/x"), [7]);
    }

    #[test]
    fn trie_agrees_with_reference_matcher() {
        let filters = [
            "a", "a/b", "a/+", "+/b", "#", "a/#", "+/+/c", "a/b/#", "+", "$SYS/#", "a//b", "+/#",
        ];
        let topics = [
            "a", "a/b", "a/c", "b/b", "a/b/c", "x/y/c", "$SYS/a", "a//b", "/b", "a/", "$x",
        ];
        let mut t = SubscriptionTrie::new();
        for (i, f) in filters.iter().enumerate() {
            t.insert(f, None, i as u32, 0);
        }
        for topic in topics {
            let mut want: Vec<u32> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| filter_matches(f, topic))
                .map(|(i, _)| i as u32)
                .collect();
            want.sort();
            assert_eq!(keys(&t, topic), want, "topic {topic}");
        }
    }

    #[test]
    fn overlapping_filters_deliver_once_with_highest_qos() {
        let mut t = SubscriptionTrie::new();
        t.insert("a/#", None, 1, 0);
        t.insert("a/b", None, 1, 2);
        let m = t.matches("a/b");
        assert_eq!(m.direct.len(), 1);
        assert_eq!((m.direct[0].key, m.direct[0].qos), (1, 2));
    }

    #[test]
    fn remove_prunes_and_counts() {
        let mut t = SubscriptionTrie::new();
        t.insert("a/b/c", None, 1, 1);
        t.insert("a/b/c", None, 1, 2);
        assert_eq!(t.len(), 1);
        assert!(t.remove("a/b/c", None, &1));
        assert!(!t.remove("a/b/c", None, &1));
        assert!(t.is_empty());
        assert!(t.root.children.is_empty());
    }

    #[test]
    fn shared_groups_are_reported_per_group() {
        let mut t = SubscriptionTrie::new();
        t.insert("jobs/+", Some("workers"), 1, 1);
        t.insert("jobs/+", Some("workers"), 2, 1);
        t.insert("jobs/#", Some("audit"), 3, 0);
        t.insert("jobs/+", None, 4, 0);
        let m = t.matches("jobs/x");
        assert_eq!(m.direct.len(), 1);
        assert_eq!(m.shared.len(), 2);
        let workers = &m.shared.iter().find(|(g, _)| g.0 == "workers").unwrap().1;
        assert_eq!(workers.len(), 2);
    }

    #[test]
    fn subscription_coverage_for_acls() {
        assert!(filter_covered_by("a/b", "a/#"));
        assert!(filter_covered_by("a/+", "a/#"));
        assert!(filter_covered_by("a/#", "a/#"));
        assert!(!filter_covered_by("a/#", "a/+"));
        assert!(!filter_covered_by("#", "a/#"));
        assert!(filter_covered_by("a/x", "a/+"));
        assert!(!filter_covered_by("a/+", "a/x"));
        assert!(!filter_covered_by("a", "a/+"));
    }
}
