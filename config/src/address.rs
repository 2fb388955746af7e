//! Actor addresses: `node/actor`, and `node/actor/child` for an actor's children.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where an actor lives: its node, then the path of names from the node's root down to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    node: String,
    path: Vec<String>,
}

/// Why a string is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No `/` separates a node from an actor name.
    #[error("'{0}' is not an address: expected node/actor")]
    MissingActor(String),
    /// The node part is not a valid node name.
    #[error("'{0}' is not a valid node name (letters, digits and '-', dot-separated)")]
    BadNode(String),
    /// One of the actor names is not valid.
    #[error("'{0}' is not a valid actor name (letters, digits, '-' and '_', at most 64)")]
    BadActor(String),
}

impl Address {
    /// The address of actor `name` on `node`.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        Address {
            node: node.into(),
            path: vec![name.into()],
        }
    }

    /// The node this address lives on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The top-level actor's name (the first path segment).
    pub fn actor(&self) -> &str {
        &self.path[0]
    }

    /// All names below the node, outermost first.
    pub fn path(&self) -> &[String] {
        &self.path
    }

    /// The address of a child of this actor.
    pub fn child(&self, name: impl Into<String>) -> Self {
        let mut path = self.path.clone();
        path.push(name.into());
        Address {
            node: self.node.clone(),
            path,
        }
    }

    /// The address of the top-level actor this one belongs to (itself when it has no parent).
    pub fn top_level(&self) -> Self {
        Address::new(self.node.clone(), self.path[0].clone())
    }
}

/// True when `name` can be a node name: DNS labels of letters, digits and '-', joined by dots.
pub fn is_valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// True when `name` can be a configured actor name: 1 to 64 letters, digits, '-' or '_', starting
/// with a letter or digit (names starting with '_' are reserved for each node's system actors).
pub fn is_valid_actor_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && is_valid_segment(name)
}

/// True when `name` can be one segment of an address path (system names may start with '_').
fn is_valid_segment(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        let node = parts.next().unwrap_or_default();
        let path: Vec<String> = parts.map(str::to_owned).collect();
        if path.is_empty() {
            return Err(AddressError::MissingActor(s.to_owned()));
        }
        if !is_valid_node_name(node) {
            return Err(AddressError::BadNode(node.to_owned()));
        }
        if let Some(bad) = path.iter().find(|p| !is_valid_segment(p)) {
            return Err(AddressError::BadActor(bad.clone()));
        }
        Ok(Address {
            node: node.to_owned(),
            path,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.node)?;
        for p in &self.path {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let a: Address = "site-a/broker".parse().unwrap();
        assert_eq!(a.node(), "site-a");
        assert_eq!(a.actor(), "broker");
        assert_eq!(a.to_string(), "site-a/broker");
        let c = a.child("client_7");
        assert_eq!(c.to_string(), "site-a/broker/client_7");
        assert_eq!(c.top_level(), a);
    }

    #[test]
    fn rejects_bad_addresses() {
        assert_eq!(
            "broker".parse::<Address>(),
            Err(AddressError::MissingActor("broker".into()))
        );
        assert!(matches!(
            "-x/broker".parse::<Address>(),
            Err(AddressError::BadNode(_))
        ));
        assert!(matches!(
            "a/b c".parse::<Address>(),
            Err(AddressError::BadActor(_))
        ));
        assert!(matches!(
            "a/".parse::<Address>(),
            Err(AddressError::BadActor(_))
        ));
        assert!(matches!(
            "/x".parse::<Address>(),
            Err(AddressError::BadNode(_))
        ));
    }

    #[test]
    fn names() {
        assert!(is_valid_node_name("edge-1.lab"));
        assert!(!is_valid_node_name("edge_1"));
        assert!(!is_valid_node_name(""));
        assert!(is_valid_actor_name("uplink_2"));
        assert!(!is_valid_actor_name("a/b"));
        assert!(!is_valid_actor_name(&"x".repeat(65)));
        assert!(!is_valid_actor_name("_node"));
        assert!("edge/_node".parse::<Address>().is_ok());
    }
}
