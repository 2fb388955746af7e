//! The control socket: a Unix socket (mode 0600, in a directory only the node's user can enter)
//! that `colony ctl` talks to. See [`protocol`] for the requests and [`server`] for what a node
//! answers for the whole cluster.

pub mod client;
pub mod framing;
pub mod protocol;
pub mod server;
