//! Layer: cluster (imports core, store, net, node).
//!
//! What the cluster side of a node shares between its tasks: the node, the TLS material, what is
//! known of each peer's health, and the fetch claims of the replicators.

use crate::core::health::PeerHealth;
use crate::core::link::{Claims, Failure};
use crate::net::tls::Material;
use crate::node::Node;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub peer: String,
    /// `sync`, `digest`, `fetch`.
    pub kind: String,
    /// `ok`, `refused`, `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CycleLabels {
    pub peer: String,
    pub outcome: String,
}

/// What the replicators count.
#[derive(Debug)]
pub struct ClusterMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<KindLabel, Histogram>,
    pub cycles: Family<CycleLabels, Counter>,
    pub documents_sent: Counter,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        ClusterMetrics {
            requests: Family::default(),
            // 50 us to about 3 s.
            request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(50e-6, 2.0, 17))
            }),
            cycles: Family::default(),
            documents_sent: Counter::default(),
        }
    }
}

impl ClusterMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "peerconf_replication_requests",
            "Replication requests this node sent, by peer, kind and outcome",
            self.requests.clone(),
        );
        r.register(
            "peerconf_replication_request_seconds",
            "Seconds from sending a replication request to its answer",
            self.request_seconds.clone(),
        );
        r.register(
            "peerconf_replication_cycles",
            "Replication cycles with each peer, by outcome",
            self.cycles.clone(),
        );
        r.register(
            "peerconf_replication_documents_sent",
            "Documents carried by the sync requests this node sent",
            self.documents_sent.clone(),
        );
    }
}

/// What the cluster side of a node shares between its tasks.
pub struct ClusterState {
    pub node: Node,
    /// The cluster CA and this node's certificate.
    pub material: Material,
    /// What this node knows of each peer's health.
    health: Mutex<BTreeMap<String, PeerHealth>>,
    /// Documents some replicator is fetching now.
    claims: Mutex<Claims>,
    pub metrics: ClusterMetrics,
    /// Peers this node is fetching the member list from now (it heard from members it does not
    /// know).
    learning: Mutex<std::collections::HashSet<String>>,
    /// The client TLS configuration, for those fetches.
    pub client_tls: Mutex<Option<std::sync::Arc<rustls::ClientConfig>>>,
}

impl ClusterState {
    pub fn new(node: Node, material: Material) -> ClusterState {
        ClusterState {
            node,
            material,
            health: Default::default(),
            claims: Default::default(),
            metrics: Default::default(),
            learning: Default::default(),
            client_tls: Default::default(),
        }
    }

    pub fn health(&self) -> MutexGuard<'_, BTreeMap<String, PeerHealth>> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn claims(&self) -> MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A node this node does not know (certified by the cluster CA) was heard from: its member
    /// list is fetched from it (from the address it gave, whose server must hold the same key),
    /// and merged only if its admission chains, signature by signature, to a member this node
    /// knows: then this node's list is behind, and merging brings it up to date and starts its
    /// replicators. A node minted with the CA's key, or a removed member, never verifies.
    pub fn learn_members_from(self: &std::sync::Arc<Self>, peer: &str, addr: &str, key: &str) {
        if addr.is_empty() || addr.len() > 300 {
            return;
        }
        let Some(tls) = self.client_tls.lock().ok().and_then(|t| t.clone()) else {
            return;
        };
        {
            let mut l = self.learning.lock().unwrap_or_else(|p| p.into_inner());
            if !l.insert(peer.to_string()) {
                return;
            }
        }
        let (state, peer, addr) = (self.clone(), peer.to_string(), addr.to_string());
        let key = key.to_string();
        tokio::spawn(async move {
            let cfg = state.node.config().clone();
            let mut client =
                crate::net::ipc::PeerClient::new(&addr, tls, &cfg.cluster_id, &cfg.node_id)
                    .expect_key(&key);
            let req = crate::core::proto::Request::Fetch {
                ids: vec![crate::core::members::MEMBERS_DOC.to_string()],
            };
            match client.call(req).await {
                Ok(crate::core::proto::Response::Docs { docs }) => {
                    let theirs: Vec<crate::core::members::Member> = docs
                        .iter()
                        .filter(|(id, _)| id == crate::core::members::MEMBERS_DOC)
                        .filter_map(|(_, b)| automerge::AutoCommit::load(b).ok())
                        .map(|d| crate::core::members::read(&d))
                        .next()
                        .unwrap_or_default();
                    let verified = crate::core::members::verify_chain(
                        &cfg.cluster_id,
                        &state.node.members(),
                        &theirs,
                    );
                    let claimed = theirs.iter().find(|m| m.id == peer).map(|m| m.key.as_str());
                    if !verified.contains(&peer) || claimed != Some(key.as_str()) {
                        tracing::warn!(peer = %peer, %addr, key = %crate::net::ipc::short(&key),
                            "refused the member list of a node whose admission does not chain to a known member");
                    } else {
                        match state.node.ingest(&peer, docs).await {
                            Ok(_) => tracing::info!(peer = %peer, %addr,
                                "learned the member list from a member this node did not know"),
                            Err(e) => tracing::warn!(peer = %peer, error = %e,
                                "the member list fetched cannot be stored"),
                        }
                    }
                }
                Ok(other) => {
                    tracing::warn!(peer = %peer, answer = other.name(), "the member list could not be fetched")
                }
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "the member list could not be fetched")
                }
            }
            // Again after a pause if the list still lacks it (the next heartbeat asks).
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            state
                .learning
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
        });
    }

    /// A member's name (its ID if it is not a member).
    pub fn name_of(&self, id: &str) -> String {
        self.node
            .members()
            .into_iter()
            .find(|m| m.id == id)
            .map(|m| m.name)
            .unwrap_or_else(|| id.to_string())
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
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics
            .cycles
            .get_or_create(&CycleLabels {
                peer: self.name_of(peer),
                outcome: outcome.into(),
            })
            .inc();
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
