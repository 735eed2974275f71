//! peerconf: a replicated, leaderless configuration store for active/active server clusters.
//!
//! Embed it with [`Node`]: open a data directory, read and write entities (as JSON or as the
//! typed values of [`typed`]), and [`Node::subscribe`] to the feed of committed changes. Run it as
//! a daemon with the `peerconf` binary (see README.md).

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod core;
pub mod daemon;
pub mod demo;
pub mod drain;
pub mod driver;
pub mod fuzzing;
pub mod ipc;
pub mod monitor;
pub mod node;
pub mod sim;
pub mod store;
pub mod time;
pub mod tls;
pub mod wal;

pub use crdt_schema::{self as schema, typed, Kind};
pub use node::{ChangeEvent, Error, InitOptions, Node, NodeConfig, NodeOptions, Origin};
