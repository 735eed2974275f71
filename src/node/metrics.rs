//! Layer: node (imports core, store, net).
//!
//! What the driver counts: writes by outcome, batches (their size and how long each took from its
//! start to its answers), documents changed by each peer, and peers' messages refused.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Debug)]
pub struct NodeMetrics {
    /// Local writes answered, by outcome: `ok`, `refused` (invalid, nothing changed), `failed`
    /// (storage; nothing changed), `unknown` (the commit failed after the push left).
    pub writes: Family<OutcomeLabel, Counter>,
    pub batches: Counter,
    pub batch_commands: Histogram,
    /// Seconds from a batch's start to its answers (execution and the durable commit).
    pub batch_seconds: Histogram,
    /// Documents changed by each peer's messages and fetches, by peer node ID.
    pub remote_changes: Family<PeerLabel, Counter>,
    /// Peers' sync messages and documents refused (malformed, or not of their kind).
    pub rejected: Family<PeerLabel, Counter>,
    /// Local writes that waited for a peer's link to catch up, and the seconds they waited.
    pub paced: Counter,
    pub paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            writes: Family::default(),
            batches: Counter::default(),
            // 1 to 512 commands.
            batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            // 50 us to about 1.6 s.
            batch_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            remote_changes: Family::default(),
            rejected: Family::default(),
            paced: Counter::default(),
            paced_seconds: Counter::default(),
        }
    }
}

impl NodeMetrics {
    pub fn write(&self, outcome: &str) {
        self.writes
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "peerconf_writes",
            "Local writes answered, by outcome",
            self.writes.clone(),
        );
        r.register(
            "peerconf_batches",
            "Driver batches run",
            self.batches.clone(),
        );
        r.register(
            "peerconf_batch_commands",
            "Commands per driver batch",
            self.batch_commands.clone(),
        );
        r.register(
            "peerconf_batch_seconds",
            "Seconds from a batch's start to its answers (execution and durable commit)",
            self.batch_seconds.clone(),
        );
        r.register(
            "peerconf_remote_changes",
            "Documents changed by each peer's messages and fetches",
            self.remote_changes.clone(),
        );
        r.register(
            "peerconf_peer_rejections",
            "Peers' sync messages and documents refused (malformed, not of their layout, or holding a secret value)",
            self.rejected.clone(),
        );
        r.register(
            "peerconf_writes_paced",
            "Local writes that waited for a peer's link to catch up",
            self.paced.clone(),
        );
        r.register(
            "peerconf_writes_paced_seconds",
            "Seconds local writes waited for peers' links to catch up",
            self.paced_seconds.clone(),
        );
    }
}
