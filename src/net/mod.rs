//! Layer: net (imports core only; never node, cluster, admin or sim).
//!
//! The cluster's transport: TLS material and rustls configurations (`tls`), and the IPC server and
//! client (`ipc`: HTTPS with mutual TLS, HTTP/2, one route carrying `core::proto` envelopes). The
//! server checks everything that needs no knowledge of the cluster (route, protocol, cluster ID,
//! body size, decoding) and hands each request to a [`ipc::Handler`] the cluster layer provides.
//! Before a connection proves a certificate, what it may cost is bounded by `admission` (rate per
//! address, caps per class of connection, counters) and `limits` (the open-file limit, raised
//! when the port opens and sizing those caps).

pub mod admission;
pub mod ipc;
pub mod limits;
pub mod tls;
