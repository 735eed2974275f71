//! Layer: cluster (imports core, store, net, node).
//!
//! Cluster health, the I/O side: one heartbeater per peer, a ticker that re-evaluates liveness,
//! and the status report. The decisions are in `core::health`.

use super::replicator::Inbox;
use super::state::ClusterState;
use crate::core::health::{Cause, Event, HealthConfig, PeerHealth, Sample, Status};
use crate::core::proto::{Heartbeat, HeartbeatAck, Request, Response};
use crate::net::ipc::PeerClient;
use crate::node::Node;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often liveness is re-evaluated: detection is late by at most this much.
const TICK: Duration = Duration::from_millis(25);

fn mono(node: &Node) -> u64 {
    node.clock().mono_ms()
}

fn our_root(node: &Node) -> [u8; 32] {
    node.published().digest().root()
}

fn disk_full(node: &Node) -> bool {
    node.published().storage() == crate::node::disk::Storage::Full
}

fn health_config(node: &Node) -> HealthConfig {
    HealthConfig::from_settings(&node.settings())
}

fn log_events(node: &Node, peer: &str, events: Vec<Event>) {
    let name = node
        .members()
        .into_iter()
        .find(|m| m.id == peer)
        .map(|m| m.name)
        .unwrap_or_else(|| peer.to_string());
    for e in events {
        match e {
            Event::Suspect => {
                tracing::info!(peer = %name, "peer SUSPECT: no heartbeat for a while")
            }
            Event::Offline => {
                tracing::warn!(peer = %name, "peer OFFLINE: silent for offline_timeout_ms")
            }
            Event::Online { was_offline: true } => tracing::info!(peer = %name, "peer back ONLINE"),
            Event::Online { was_offline: false } => tracing::debug!(peer = %name, "peer ONLINE"),
            Event::DriftStarted { offset_ms } => {
                tracing::warn!(peer = %name, offset_ms, "clock drift: the peer's clock is off by more than clock_drift_warn_ms (merges do not depend on clocks; fix NTP)")
            }
            Event::DriftEnded => tracing::info!(peer = %name, "clock drift resolved"),
            Event::Unreachable => {
                tracing::warn!(peer = %name, "peer UNREACHABLE: it is heard, but does not answer this node (a one-way cut?)")
            }
            Event::Reachable => tracing::info!(peer = %name, "peer answers again"),
            Event::DiskFull => {
                tracing::warn!(peer = %name, "peer DISK_FULL: it refuses writes until space is freed")
            }
            Event::DiskOk => tracing::info!(peer = %name, "peer's disk takes writes again"),
            Event::Incompatible { version } => {
                tracing::warn!(peer = %name, %version, ours = %crate::net::ipc::version(), "peer INCOMPATIBLE: another major version; not syncing with it")
            }
        }
    }
}

fn with_health<T>(state: &ClusterState, peer: &str, f: impl FnOnce(&mut PeerHealth) -> T) -> T {
    let now = mono(&state.node);
    let mut h = state.health();
    f(h.entry(peer.to_string())
        .or_insert_with(|| PeerHealth::new(now)))
}

/// A peer's heartbeat arrived (server side). Returns the answer, times to be filled in.
pub fn heard(state: &ClusterState, peer: &str, version: &str, hb: &Heartbeat) -> HeartbeatAck {
    let node = &state.node;
    let now = mono(node);
    let ours = crate::net::ipc::version();
    let events = with_health(state, peer, |h| {
        let mut ev = h.heard(now, version, hb.draining, &ours);
        ev.extend(h.disk(hb.disk_full));
        ev
    });
    log_events(node, peer, events);
    HeartbeatAck {
        received_wall_ms: 0,
        sent_wall_ms: 0,
        draining: node.drain().is_draining(),
        disk_full: disk_full(node),
        root: our_root(node),
    }
}

/// Sends heartbeats to one peer every `heartbeat_interval_ms`, on its own connection so they
/// are never stuck behind a large sync.
pub async fn heartbeats(
    state: Arc<ClusterState>,
    peer: crate::core::members::Member,
    tls: Arc<rustls::ClientConfig>,
    inbox: Arc<Inbox>,
    mut stop: watch::Receiver<bool>,
) {
    let node = state.node.clone();
    let cfg = node.config().clone();
    let mut client =
        PeerClient::new(&peer.addr, tls, &cfg.cluster_id, &cfg.node_id).expect_key(&peer.key);
    let ours = crate::net::ipc::version();
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        // The interval is re-read at least every 100 ms, so a change of the setting takes effect
        // at once (a shortened offline timeout must not meet heartbeats on the old schedule).
        let hc = health_config(&node);
        let interval = Duration::from_millis(hc.heartbeat_interval_ms);
        if let Some(t) = last_sent {
            let due = t + interval;
            let now = tokio::time::Instant::now();
            if now < due {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.min(now + Duration::from_millis(100))) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
        }
        last_sent = Some(tokio::time::Instant::now());
        let t1 = node.clock().wall_ms();
        let m1 = mono(&node);
        let hb = Heartbeat {
            wall_ms: t1,
            draining: node.drain().is_draining(),
            disk_full: disk_full(&node),
            addr: cfg.ipc_advertise.clone(),
            root: our_root(&node),
        };
        // A heartbeat is given up on after the offline timeout: the detector decides from silence.
        let call = client.call_timeout(
            Request::Heartbeat(hb),
            Duration::from_millis(hc.offline_timeout_ms),
        );
        let r = tokio::select! {
            r = call => r,
            _ = stop.changed() => return,
        };
        let wall = node.clock().wall_ms();
        match r {
            Ok(Response::HeartbeatAck(ack)) => {
                let m4 = mono(&node);
                let s = Sample {
                    t1,
                    t2: ack.received_wall_ms,
                    t3: ack.sent_wall_ms,
                    t4: wall,
                    rtt_mono_ms: (m4 - m1) as f64,
                };
                let root_differs = ack.root != our_root(&node);
                let (events, want_cycle) = with_health(&state, &peer.id, |h| {
                    let v = client
                        .peer_version
                        .clone()
                        .unwrap_or_else(|| peer.version.clone());
                    let mut ev = h.answered(m4, s, &v, ack.draining, &ours, &hc);
                    ev.extend(h.disk(ack.disk_full));
                    if root_differs {
                        h.root_mismatches += 1;
                    } else {
                        h.root_mismatches = 0;
                        h.docs_out_of_sync = Some(0);
                    }
                    // Two heartbeats in a row saw different digests: repair now, not at the next
                    // cycle (and again after two more, while they still differ).
                    let repair = h.root_mismatches >= 2;
                    if repair {
                        h.root_mismatches = 0;
                    }
                    // A peer back from OFFLINE or from another version is caught up at once.
                    let back = ev.iter().any(|e| matches!(e, Event::Online { .. }));
                    (ev, repair || back)
                });
                log_events(&node, &peer.id, events);
                if want_cycle && !state.incompatible(&peer.id) {
                    inbox.cycle_now();
                }
            }
            Ok(Response::Refused { message, .. }) => with_health(&state, &peer.id, |h| {
                h.failed(Cause::Refused, message, wall)
            }),
            Ok(other) => with_health(&state, &peer.id, |h| {
                h.failed(
                    Cause::Other,
                    format!("unexpected answer {}", other.name()),
                    wall,
                )
            }),
            Err(e) => with_health(&state, &peer.id, |h| {
                h.failed(e.cause(), e.to_string(), wall)
            }),
        }
    }
}

/// Re-evaluates every peer's liveness every few milliseconds.
pub async fn ticker(state: Arc<ClusterState>, mut stop: watch::Receiver<bool>) {
    let node = state.node.clone();
    let mut seen = health_config(&node);
    let mut grace_until = 0;
    let mut grace_timeout_ms = 0;
    loop {
        let mut hc = health_config(&node);
        let now = mono(&node);
        if hc != seen {
            // Heartbeats sent on the old schedule are still on their way: judge silence by the
            // longer of the two timeouts until a heartbeat of each schedule has had time to land.
            grace_until = now + seen.heartbeat_interval_ms.max(hc.heartbeat_interval_ms) * 2;
            grace_timeout_ms = seen.offline_timeout_ms.max(hc.offline_timeout_ms);
            seen = hc;
        }
        if now < grace_until {
            hc.offline_timeout_ms = hc.offline_timeout_ms.max(grace_timeout_ms);
        }
        let live: Vec<String> = node
            .members()
            .into_iter()
            .filter(|m| !m.removed && m.id != node.config().node_id)
            .map(|m| m.id)
            .collect();
        let mut all = Vec::new();
        {
            let mut h = state.health();
            h.retain(|id, _| live.contains(id));
            for id in &live {
                let p = h.entry(id.clone()).or_insert_with(|| PeerHealth::new(now));
                all.push((id.clone(), p.tick(now, &hc)));
            }
        }
        for (id, ev) in all {
            log_events(&node, &id, ev);
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The last failed exchange with a peer.
#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub cause: Cause,
    pub message: String,
    pub at_wall_ms: i64,
}

/// One node as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub name: String,
    pub address: String,
    pub version: String,
    pub status: Status,
    #[serde(rename = "self")]
    pub is_self: bool,
    pub last_heartbeat_ms_ago: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub clock_offset_ms: Option<f64>,
    pub docs_out_of_sync: Option<u64>,
    /// Wall-clock ms of the last completed replication cycle.
    pub last_replication_cycle: Option<i64>,
    pub last_error: Option<LastError>,
    pub flaps: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_connections: Option<usize>,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    /// ACTIVE, DEGRADED (a peer offline, suspect or incompatible) or STANDALONE.
    pub state: &'static str,
    pub nodes: Vec<NodeStatus>,
}

/// The status report: every node, this one included, and the cluster's state.
pub fn status(state: &ClusterState) -> StatusReport {
    let node = &state.node;
    let now = mono(node);
    let cfg = node.config();
    let mut members: Vec<_> = node.members().into_iter().filter(|m| !m.removed).collect();
    members.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    let health = state.health().clone();
    let me_status = if disk_full(node) {
        Status::DiskFull
    } else if node.drain().is_draining() {
        Status::Draining
    } else {
        Status::Online
    };
    let mut nodes = Vec::new();
    let mut degraded = false;
    for m in &members {
        if m.id == cfg.node_id {
            nodes.push(NodeStatus {
                id: m.id.clone(),
                name: m.name.clone(),
                address: cfg.ipc_advertise.clone(),
                version: crate::net::ipc::version(),
                status: me_status,
                is_self: true,
                last_heartbeat_ms_ago: Some(0),
                rtt_ms: Some(0.0),
                clock_offset_ms: Some(0.0),
                docs_out_of_sync: Some(0),
                last_replication_cycle: None,
                last_error: None,
                flaps: 0,
                active_connections: Some(node.drain().active()),
            });
            continue;
        }
        let h = health
            .get(&m.id)
            .cloned()
            .unwrap_or_else(|| PeerHealth::new(now));
        let st = h.status();
        if matches!(
            st,
            Status::Offline
                | Status::Suspect
                | Status::Incompatible
                | Status::Unreachable
                | Status::DiskFull
        ) {
            degraded = true;
        }
        nodes.push(NodeStatus {
            id: m.id.clone(),
            name: m.name.clone(),
            address: m.addr.clone(),
            version: h.version.clone().unwrap_or_else(|| m.version.clone()),
            status: st,
            is_self: false,
            last_heartbeat_ms_ago: h.silent_ms(now),
            rtt_ms: h.rtt_ms(),
            clock_offset_ms: h.offset_ms(),
            docs_out_of_sync: h.docs_out_of_sync,
            last_replication_cycle: h.last_cycle_wall_ms,
            last_error: h.last_error.as_ref().map(|(cause, msg, at)| LastError {
                cause: *cause,
                message: msg.clone(),
                at_wall_ms: *at,
            }),
            flaps: h.flaps,
            active_connections: None,
        });
    }
    if me_status == Status::DiskFull {
        degraded = true;
    }
    let cluster = if members.len() <= 1 {
        "STANDALONE"
    } else if degraded {
        "DEGRADED"
    } else {
        "ACTIVE"
    };
    StatusReport {
        id: cfg.node_id.clone(),
        name: cfg.name.clone(),
        cluster_id: cfg.cluster_id.clone(),
        state: cluster,
        nodes,
    }
}
