//! Layer: net (imports core only; never node, cluster, admin or sim).
//!
//! The cluster's transport: TLS material and rustls configurations (`tls`), and the IPC server and
//! client (`ipc`: HTTPS with mutual TLS, HTTP/2, one route carrying `core::proto` envelopes). The
//! server checks everything that needs no knowledge of the cluster (route, protocol, cluster ID,
//! body size, decoding) and hands each request to a [`ipc::Handler`] the cluster layer provides.

pub mod ipc;
pub mod tls;
