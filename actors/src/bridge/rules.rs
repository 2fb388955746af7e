//! Topic rules, as Mosquitto's `topic pattern direction qos local_prefix remote_prefix`, and the
//! hop marker that keeps forwarded messages from going back where they came from. Pure: no I/O.
//!
//! A rule subscribes to `local_prefix + pattern` on the local broker (directions `out` and
//! `both`) and to `remote_prefix + pattern` on the remote one (`in` and `both`). A message on
//! one side that matches a rule's filter for that side goes to the other side with its prefix
//! swapped, at the lower of its QoS and the rule's. When several rules match, the first one in
//! the config decides (so a message is forwarded once, never once per rule).

use colony_config::kinds::{BridgeDirection, BridgeRule};

use crate::broker::topic::filter_matches;

/// A side of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The local Colony broker.
    Local,
    /// The far broker.
    Remote,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Remote,
            Side::Remote => Side::Local,
        }
    }
}

/// The rules of one bridge.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rules {
    rules: Vec<BridgeRule>,
}

/// Where a message goes on the other side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The topic on the other side.
    pub topic: String,
    /// The QoS it is forwarded at.
    pub qos: u8,
}

fn takes_from(rule: &BridgeRule, side: Side) -> bool {
    matches!(
        (rule.direction, side),
        (BridgeDirection::Both, _)
            | (BridgeDirection::Out, Side::Local)
            | (BridgeDirection::In, Side::Remote)
    )
}

fn prefix(rule: &BridgeRule, side: Side) -> &str {
    match side {
        Side::Local => &rule.local_prefix,
        Side::Remote => &rule.remote_prefix,
    }
}

impl Rules {
    /// Rules in config order.
    pub fn new(rules: Vec<BridgeRule>) -> Rules {
        Rules { rules }
    }

    /// The filters to subscribe to on `side`, each once, with the highest QoS any rule wants.
    pub fn filters(&self, side: Side) -> Vec<(String, u8)> {
        let mut out: Vec<(String, u8)> = Vec::new();
        for r in self.rules.iter().filter(|r| takes_from(r, side)) {
            let f = format!("{}{}", prefix(r, side), r.pattern);
            match out.iter_mut().find(|(g, _)| *g == f) {
                Some((_, q)) => *q = (*q).max(r.qos),
                None => out.push((f, r.qos)),
            }
        }
        out
    }

    /// The highest QoS of the filters on `side` (what one subscription asks for).
    pub fn max_qos(&self, side: Side) -> u8 {
        self.filters(side).iter().map(|f| f.1).max().unwrap_or(0)
    }

    /// Where a message published on `from` with `topic` and `qos` goes on the other side, if
    /// any rule forwards it.
    pub fn map(&self, from: Side, topic: &str, qos: u8) -> Option<Mapped> {
        self.rules.iter().find_map(|r| {
            if !takes_from(r, from) {
                return None;
            }
            let p = prefix(r, from);
            let rest = topic.strip_prefix(p)?;
            if !filter_matches(&format!("{p}{}", r.pattern), topic) {
                return None;
            }
            let mapped = format!("{}{rest}", prefix(r, from.other()));
            if mapped.is_empty() {
                return None;
            }
            Some(Mapped {
                topic: mapped,
                qos: qos.min(r.qos),
            })
        })
    }
}

/// Whether a message that has been in the brokers `hops` (and is now in `from`) may go to `to`:
/// never back to a broker it has been in, never to the broker it comes from.
pub fn may_forward(hops: &[String], from: &str, to: &str) -> bool {
    from != to && !hops.iter().any(|h| h == to)
}

/// The hops of a message forwarded out of `from`.
pub fn with_hop(hops: &[String], from: &str) -> Vec<String> {
    let mut h = hops.to_vec();
    if !h.iter().any(|x| x == from) {
        h.push(from.to_owned());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, d: BridgeDirection, qos: u8, lp: &str, rp: &str) -> BridgeRule {
        BridgeRule {
            pattern: pattern.into(),
            direction: d,
            qos,
            local_prefix: lp.into(),
            remote_prefix: rp.into(),
        }
    }

    #[test]
    fn directions_choose_the_side_subscribed() {
        let r = Rules::new(vec![
            rule("a/#", BridgeDirection::Out, 1, "", ""),
            rule("b/#", BridgeDirection::In, 0, "", ""),
            rule("c/+", BridgeDirection::Both, 2, "", ""),
        ]);
        assert_eq!(
            r.filters(Side::Local),
            [("a/#".to_owned(), 1), ("c/+".to_owned(), 2)]
        );
        assert_eq!(
            r.filters(Side::Remote),
            [("b/#".to_owned(), 0), ("c/+".to_owned(), 2)]
        );
        assert_eq!(r.map(Side::Local, "a/x/y", 1).unwrap().topic, "a/x/y");
        assert_eq!(r.map(Side::Remote, "a/x", 1), None, "out only");
        assert_eq!(r.map(Side::Local, "b/x", 1), None, "in only");
        assert_eq!(r.map(Side::Remote, "b/x", 1).unwrap().qos, 0);
        assert!(r.map(Side::Local, "c/1", 2).is_some());
        assert!(r.map(Side::Remote, "c/1", 2).is_some());
        assert_eq!(r.map(Side::Local, "c/1/2", 2), None);
        assert_eq!(r.map(Side::Local, "d", 0), None);
    }

    #[test]
    fn prefixes_are_swapped_both_ways() {
        let r = Rules::new(vec![rule(
            "#",
            BridgeDirection::Both,
            1,
            "site/",
            "plants/p1/",
        )]);
        assert_eq!(r.filters(Side::Local), [("site/#".to_owned(), 1)]);
        assert_eq!(r.filters(Side::Remote), [("plants/p1/#".to_owned(), 1)]);
        let m = r.map(Side::Local, "site/gas/3", 2).unwrap();
        assert_eq!(
            m,
            Mapped {
                topic: "plants/p1/gas/3".into(),
                qos: 1
            }
        );
        let m = r.map(Side::Remote, "plants/p1/cmd", 0).unwrap();
        assert_eq!(m.topic, "site/cmd");
        assert_eq!(m.qos, 0);
        assert_eq!(r.map(Side::Local, "other/gas", 1), None);
        assert_eq!(r.map(Side::Remote, "plants/p2/x", 1), None);
    }

    #[test]
    fn the_first_matching_rule_decides_and_filters_are_merged() {
        let r = Rules::new(vec![
            rule("gas/#", BridgeDirection::Out, 1, "", "a/"),
            rule("#", BridgeDirection::Out, 0, "", "b/"),
            rule("gas/#", BridgeDirection::Out, 2, "", "a/"),
        ]);
        assert_eq!(
            r.filters(Side::Local),
            [("gas/#".to_owned(), 2), ("#".to_owned(), 0)]
        );
        assert_eq!(r.max_qos(Side::Local), 2);
        assert_eq!(r.map(Side::Local, "gas/1", 1).unwrap().topic, "a/gas/1");
        assert_eq!(r.map(Side::Local, "temp/1", 1).unwrap().topic, "b/temp/1");
    }

    #[test]
    fn dollar_topics_do_not_match_leading_wildcards() {
        let r = Rules::new(vec![rule("#", BridgeDirection::Out, 1, "", "")]);
        assert_eq!(r.map(Side::Local, "$SYS/broker/uptime", 0), None);
    }

    #[test]
    fn hops_stop_loops() {
        assert!(may_forward(&[], "n1/broker", "n2/broker"));
        assert!(!may_forward(&[], "n1/broker", "n1/broker"));
        let h = with_hop(&[], "n1/broker");
        let h = with_hop(&h, "n2/broker");
        assert_eq!(h, ["n1/broker", "n2/broker"]);
        assert!(
            !may_forward(&h, "n3/broker", "n1/broker"),
            "back to the start"
        );
        assert!(may_forward(&h, "n3/broker", "n4/broker"));
        assert_eq!(with_hop(&h, "n1/broker").len(), 2);
    }
}
