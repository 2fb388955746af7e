//! The Colony cluster config: its schema, parsing, validation and diffing.
//!
//! A cluster config is one TOML file that names the cluster, its nodes (each with a QUIC listen
//! address and a certificate) and its actors (each placed on a node, with the settings of its kind).
//! This crate turns that file into typed values and checks everything that can be checked without
//! starting anything: unique names, references between actors, listen addresses, files, ranges.
//! Every error carries the file, line and column it concerns, and all errors are reported at once.
//!
//! It also computes the difference between two valid configs ([`ConfigDiff`]), which hot reload
//! turns into a plan.
//!
//! It does no I/O beyond reading the config file and checking that files it names exist, and knows
//! nothing of QUIC, MQTT or actors at run time.
//!
//! ```
//! let src = r#"
//! [cluster]
//! name = "lab"
//!
//! [[node]]
//! name = "core"
//! listen = "127.0.0.1:7100"
//!
//! [[actor]]
//! name = "lb"
//! node = "core"
//! kind = "balancer"
//! "#;
//! let config = colony_config::ClusterConfig::from_toml_str(src, "lab.toml").unwrap();
//! assert_eq!(config.actors_on("core").count(), 1);
//! ```

mod address;
mod diff;
mod error;
pub mod kinds;
mod model;
mod parse;
pub mod tunnel;
mod validate;

pub use address::{Address, AddressError, is_valid_actor_name, is_valid_node_name};
pub use diff::{ActorChange, ConfigDiff, NodeDiff};
pub use error::{ConfigError, ConfigErrors};
pub use kinds::{ActorKind, ActorSettings};
pub use model::{
    ActorConfig, ClusterConfig, ClusterSection, NodeConfig, RestartPolicy, Strategy,
    SupervisionSettings,
};
pub use validate::FileChecks;
