//! Layer: admin (imports core, store, net, node, cluster).
//!
//! `/metrics`: every family the node, its store and its replicators count, and the cluster's
//! health as seen from this node, encoded by `prometheus-client` (OpenMetrics text; label values
//! escaped by the library, so a node name cannot forge a series). Peer gauges are made at each
//! scrape from the typed status report, never from its JSON.

use crate::cluster::monitor::{self, StatusReport};
use crate::cluster::ClusterState;
use crate::core::health::Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerStatus {
    peer: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: String,
}

const STATUSES: [(Status, &str); 8] = [
    (Status::Online, "ONLINE"),
    (Status::Suspect, "SUSPECT"),
    (Status::Offline, "OFFLINE"),
    (Status::Draining, "DRAINING"),
    (Status::ClockDrift, "CLOCK_DRIFT"),
    (Status::Incompatible, "INCOMPATIBLE"),
    (Status::Unreachable, "UNREACHABLE"),
    (Status::DiskFull, "DISK_FULL"),
];

type FloatGauge = Gauge<f64, AtomicU64>;

fn peer_families(r: &mut Registry, report: &StatusReport) {
    let status = Family::<PeerStatus, Gauge>::default();
    let offset = Family::<Peer, FloatGauge>::default();
    let rtt = Family::<Peer, FloatGauge>::default();
    let silent = Family::<Peer, Gauge>::default();
    let unsynced = Family::<Peer, Gauge>::default();
    let flaps = Family::<Peer, Counter>::default();
    for n in &report.nodes {
        let peer = Peer {
            peer: n.name.clone(),
        };
        for (s, name) in STATUSES {
            status
                .get_or_create(&PeerStatus {
                    peer: n.name.clone(),
                    status: name.to_string(),
                })
                .set(i64::from(n.status == s));
        }
        if let Some(v) = n.clock_offset_ms {
            offset.get_or_create(&peer).set(v);
        }
        if let Some(v) = n.rtt_ms {
            rtt.get_or_create(&peer).set(v);
        }
        if let Some(v) = n.last_heartbeat_ms_ago {
            silent.get_or_create(&peer).set(v as i64);
        }
        if let Some(v) = n.docs_out_of_sync {
            unsynced.get_or_create(&peer).set(v as i64);
        }
        flaps.get_or_create(&peer).inc_by(u64::from(n.flaps));
    }
    r.register(
        "peerconf_peer_status",
        "1 for the status each node is in, as seen from this node",
        status,
    );
    r.register(
        "peerconf_peer_clock_offset_ms",
        "Estimated clock offset of the peer (its clock minus ours)",
        offset,
    );
    r.register(
        "peerconf_peer_rtt_ms",
        "Round trip of the last heartbeat",
        rtt,
    );
    r.register(
        "peerconf_peer_last_heartbeat_ms_ago",
        "Time since the peer was last heard from",
        silent,
    );
    r.register(
        "peerconf_peer_docs_out_of_sync",
        "Documents that differed at the last replication cycle",
        unsynced,
    );
    r.register(
        "peerconf_peer_flaps",
        "Returns of the peer from OFFLINE",
        flaps,
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Class {
    class: &'static str,
}

/// The IPC port's connection counters (`net::admission::CONNECTIONS`, one set per process).
fn ipc_families(r: &mut Registry) {
    use crate::net::admission::CONNECTIONS;
    let refused = Family::<Reason, Counter>::default();
    for (reason, n) in CONNECTIONS.refused_all() {
        refused
            .get_or_create(&Reason {
                reason: reason.label(),
            })
            .inc_by(n);
    }
    let open = Family::<Class, Gauge>::default();
    for class in crate::net::admission::Class::ALL {
        open.get_or_create(&Class {
            class: class.label(),
        })
        .set(CONNECTIONS.open(class) as i64);
    }
    let accept_failed: Counter = Counter::default();
    accept_failed.inc_by(CONNECTIONS.accept_failed());
    r.register(
        "peerconf_ipc_connections_refused",
        "IPC connections closed before or after one refused request, by reason (limits before authentication)",
        refused,
    );
    r.register(
        "peerconf_ipc_connections_open",
        "IPC connections open now: in their TLS handshake, without a certificate (join only), certified",
        open,
    );
    r.register(
        "peerconf_ipc_accept_failures",
        "Failed accepts on the IPC port (EMFILE and the like)",
        accept_failed,
    );
}

/// The whole exposition, as of now.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedStatus {
    status: &'static str,
}

/// Admin logins by result, refused admin requests by status, sessions open.
fn auth_families(r: &mut Registry, auth: &super::auth::Auth) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &auth.counters;
    let logins = Family::<LoginResult, Counter>::default();
    for (result, n) in [
        ("ok", &c.logins_ok),
        ("failed", &c.logins_failed),
        ("locked_out", &c.logins_locked),
    ] {
        logins
            .get_or_create(&LoginResult { result })
            .inc_by(n.load(Relaxed));
    }
    let refused = Family::<RefusedStatus, Counter>::default();
    for (status, n) in [("401", &c.refused_401), ("403", &c.refused_403)] {
        refused
            .get_or_create(&RefusedStatus { status })
            .inc_by(n.load(Relaxed));
    }
    let sessions: Gauge = Gauge::default();
    sessions.set(auth.session_count() as i64);
    r.register(
        "peerconf_admin_logins",
        "Admin logins on this node, by result (locked_out: refused during a lockout)",
        logins,
    );
    r.register(
        "peerconf_admin_requests_refused",
        "Admin API requests refused: 401 (no valid credentials) and 403 (role)",
        refused,
    );
    r.register(
        "peerconf_admin_sessions",
        "Admin login sessions open on this node",
        sessions,
    );
}

/// What the watch streams cost: open streams, events and bytes sent, events buffered, resets.
fn watch_families(r: &mut Registry) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &super::watch::METRICS;
    let open: Gauge = Gauge::default();
    open.set(m.open.load(Relaxed));
    r.register(
        "peerconf_watch_streams",
        "Watch streams open on this node",
        open,
    );
    let buffered: Gauge = Gauge::default();
    buffered.set(m.buffered.load(Relaxed).max(0));
    r.register(
        "peerconf_watch_buffered_events",
        "Events waiting in watch streams' buffers for their readers",
        buffered,
    );
    for (name, help, v) in [
        (
            "peerconf_watch_events",
            "Events sent to watch streams",
            &m.events,
        ),
        (
            "peerconf_watch_bytes",
            "Bytes sent to watch streams",
            &m.bytes,
        ),
        (
            "peerconf_watch_resets",
            "Watch streams sent a reset (position too old, or a reader that fell behind)",
            &m.resets,
        ),
    ] {
        let c: Counter = Counter::default();
        c.inc_by(v.load(Relaxed));
        r.register(name, help, c);
    }
}

/// The metrics of a node; with `auth`, those of its admin API's logins too.
pub fn encode(state: &ClusterState, auth: Option<&super::auth::Auth>) -> String {
    let node = &state.node;
    let mut r = Registry::default();
    peer_families(&mut r, &monitor::status(state));
    let documents: Gauge = Gauge::default();
    documents.set(node.doc_count().unwrap_or(0) as i64);
    r.register(
        "peerconf_documents",
        "Documents stored on this node",
        documents,
    );
    let digest: Gauge = Gauge::default();
    digest.set(node.published().digest().len() as i64);
    r.register(
        "peerconf_digest_documents",
        "Documents in the replication digest (equal to peerconf_documents when consistent)",
        digest,
    );
    let draining: Gauge = Gauge::default();
    draining.set(i64::from(node.drain().is_draining()));
    r.register("peerconf_draining", "1 while this node drains", draining);
    ipc_families(&mut r);
    node.published().metrics.register(&mut r);
    node.store().metrics().register(&mut r);
    state.metrics.register(&mut r);
    if let Some(a) = auth {
        auth_families(&mut r, a);
    }
    watch_families(&mut r);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::monitor::NodeStatus;

    /// A node name is a label value: whatever it holds, it cannot end its series early or start
    /// another.
    #[test]
    fn label_values_are_escaped() {
        let evil = "n3\"} 1\npeerconf_forged{peer=\"x\"} 7\n#";
        let report = StatusReport {
            id: "a".into(),
            name: "a".into(),
            cluster_id: "c".into(),
            state: "ACTIVE",
            nodes: vec![NodeStatus {
                id: "b".into(),
                name: evil.into(),
                address: "127.0.0.1:1".into(),
                version: "0.1.0".into(),
                status: Status::ClockDrift,
                is_self: false,
                last_heartbeat_ms_ago: Some(5),
                rtt_ms: Some(0.5),
                clock_offset_ms: Some(10_003.0),
                docs_out_of_sync: Some(0),
                last_replication_cycle: None,
                last_error: None,
                flaps: 2,
                active_connections: None,
            }],
        };
        let mut r = Registry::default();
        peer_families(&mut r, &report);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encodes");
        assert!(
            !out.lines().any(|l| l.starts_with("peerconf_forged")),
            "a node name forged a series:\n{out}"
        );
        let drift = out
            .lines()
            .find(|l| l.starts_with("peerconf_peer_status{") && l.contains("CLOCK_DRIFT"))
            .expect("a status series");
        assert!(drift.ends_with(" 1"), "{drift}");
        assert!(out.contains("peerconf_peer_flaps_total{"), "{out}");
        assert!(out.ends_with("# EOF\n"));
    }

    /// Every refusal reason and connection class has its series, so a dashboard sees zeros
    /// rather than missing series before the first refusal.
    #[test]
    fn ipc_connection_series_exist_for_every_reason_and_class() {
        let mut r = Registry::default();
        ipc_families(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encodes");
        for reason in crate::net::admission::Reason::ALL {
            let series = format!(
                "peerconf_ipc_connections_refused_total{{reason=\"{}\"}}",
                reason.label()
            );
            assert!(out.contains(&series), "{series} missing:\n{out}");
        }
        for class in crate::net::admission::Class::ALL {
            let series = format!(
                "peerconf_ipc_connections_open{{class=\"{}\"}}",
                class.label()
            );
            assert!(out.contains(&series), "{series} missing:\n{out}");
        }
        assert!(out.contains("peerconf_ipc_accept_failures_total"));
    }
}
