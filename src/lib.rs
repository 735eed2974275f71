//! peerconf: a replicated, leaderless configuration store for active/active server clusters.
//!
//! Embed it with [`Node`]: open a data directory, read and write entities (as JSON or as the
//! typed values of [`typed`]), and [`Node::subscribe`] to the feed of committed changes. Run it as
//! a daemon with the `peerconf` binary, or beside a server with [`daemon::serve`] (see README.md).
//!
//! The layers, lowest first; each imports only the layers listed before it
//! (`tests/it/architecture.rs` checks the directions):
//! - `core`: sans-IO state machines and pure logic (entity writes, digest, sync sessions, the
//!   peer link, health, the member list, the wire format).
//! - `store`: redb tables, the write-ahead log, index rows.
//! - `net`: TLS material and the IPC server and client.
//! - `node`: the embedding API, the driver thread, data directories, the change feed, drain.
//! - `cluster`: join and tokens, the IPC handler, one replicator and heartbeater per peer.
//! - `admin`: the admin HTTP API and the daemon.
//! - `sim` (feature `sim`, for tests and fuzzing): the deterministic simulator and the fuzz
//!   targets' logic; imports core, store and node only.

pub mod admin;
pub mod cluster;
pub mod core;
pub mod net;
pub mod node;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;

pub use admin::daemon;
pub use crdt_schema::{self as schema, typed, Kind};
pub use node::{ChangeEvent, Error, InitOptions, Node, NodeConfig, NodeOptions, Origin};
