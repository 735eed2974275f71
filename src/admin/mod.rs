//! Layer: admin (imports every layer below: core, store, net, node, cluster).
//!
//! The node's admin surfaces inside the library: the admin HTTP API and `serve`/`run`, which
//! run a node with its cluster side and its API. The command-line tool that talks to the API
//! (`peerconf` CLI, demo, benchmarks) is the binary's (`src/bin/peerconf/`), not the library's.

pub mod api;
pub mod auth;
pub mod console;
pub mod daemon;
pub mod metrics;
pub mod openapi;
pub mod setup_ui;
pub mod watch;
