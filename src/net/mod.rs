//! Layer: net (imports core only; never node, cluster, admin or sim).
//!
//! The cluster's transport: TLS material and rustls configurations (`tls`), and the IPC server and
//! client (`ipc`: HTTPS with mutual TLS, HTTP/2, one route carrying `core::proto` envelopes). The
//! server checks everything that needs no knowledge of the cluster (route, protocol, cluster ID,
//! body size, decoding) and hands each request to a [`ipc::Handler`] the cluster layer provides.

pub mod ipc;
pub mod tls;

/// The software version this node advertises to peers. `PEERCONF_TEST_ADVERTISE_VERSION`
/// overrides it, for compatibility tests.
pub fn version() -> String {
    std::env::var("PEERCONF_TEST_ADVERTISE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}
