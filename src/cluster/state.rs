//! Layer: cluster (imports core, store, net, node).
//!
//! What the cluster side of a node shares between its tasks: the node, the TLS material, what is
//! known of each peer's health, and the fetch claims of the replicators.

use crate::core::health::PeerHealth;
use crate::core::link::{Claims, Failure};
use crate::net::tls::Material;
use crate::node::Node;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// What the cluster side of a node shares between its tasks.
pub struct ClusterState {
    pub node: Node,
    /// The cluster CA and this node's certificate.
    pub material: Material,
    /// What this node knows of each peer's health.
    health: Mutex<BTreeMap<String, PeerHealth>>,
    /// Documents some replicator is fetching now.
    claims: Mutex<Claims>,
}

impl ClusterState {
    pub fn new(node: Node, material: Material) -> ClusterState {
        ClusterState {
            node,
            material,
            health: Default::default(),
            claims: Default::default(),
        }
    }

    pub fn health(&self) -> MutexGuard<'_, BTreeMap<String, PeerHealth>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn claims(&self) -> MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer runs another major version: neither synced to nor from.
    pub fn incompatible(&self, peer: &str) -> bool {
        self.health().get(peer).is_some_and(|p| p.incompatible())
    }
}

/// Records the outcome of a replication cycle with a peer, for status.
impl ClusterState {
    pub fn cycle_done(&self, peer: &str, result: &Result<usize, Failure>) {
        let wall = self.node.clock().wall_ms();
        let now = self.node.clock().mono_ms();
        let mut h = self.health();
        let h = h
            .entry(peer.to_string())
            .or_insert_with(|| PeerHealth::new(now));
        match result {
            Ok(n) => {
                h.last_cycle_wall_ms = Some(wall);
                h.docs_out_of_sync = Some(*n as u64);
            }
            Err(f) => h.failed(f.cause, f.message.clone(), wall),
        }
    }
}
