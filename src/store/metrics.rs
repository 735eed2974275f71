//! Layer: store (imports core only).
//!
//! What the store counts: log records written (and how long the synchronous write took),
//! checkpoints, records replayed at open.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct StoreMetrics {
    pub log_appends: Counter,
    pub log_bytes: Counter,
    /// Seconds a commit waited for its log record to be on stable storage.
    pub log_write_seconds: Histogram,
    pub checkpoints: Counter,
    /// Seconds a checkpoint (a durable redb commit) took.
    pub checkpoint_seconds: Histogram,
    pub replayed_records: Counter,
    pub commit_failures: Counter,
    /// Secret references a document shows whose value this node does not hold (yet).
    pub secrets_missing: Counter,
    /// Secret values dropped because their document no longer shows them.
    pub secrets_forgotten: Counter,
    /// Rotations of the at-rest key (each one makes every dropped value unreadable).
    pub key_rotations: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            log_appends: Counter::default(),
            log_bytes: Counter::default(),
            // 25 us to about 0.8 s.
            log_write_seconds: Histogram::new(exponential_buckets(25e-6, 2.0, 16)),
            checkpoints: Counter::default(),
            // 0.1 ms to about 3 s.
            checkpoint_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            replayed_records: Counter::default(),
            commit_failures: Counter::default(),
            secrets_missing: Counter::default(),
            secrets_forgotten: Counter::default(),
            key_rotations: Counter::default(),
        }
    }
}

impl StoreMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "peerconf_secrets_missing",
            "Secret references a stored document showed whose value this node did not hold",
            self.secrets_missing.clone(),
        );
        r.register(
            "peerconf_secrets_forgotten",
            "Secret values dropped because their document no longer shows them",
            self.secrets_forgotten.clone(),
        );
        r.register(
            "peerconf_key_rotations",
            "Rotations of the at-rest key that seals secret values",
            self.key_rotations.clone(),
        );
        r.register(
            "peerconf_log_appends",
            "Write-ahead log records made durable",
            self.log_appends.clone(),
        );
        r.register(
            "peerconf_log_bytes",
            "Bytes of write-ahead log records (padded to pages)",
            self.log_bytes.clone(),
        );
        r.register(
            "peerconf_log_write_seconds",
            "How long a commit waited for its log record to be on stable storage",
            self.log_write_seconds.clone(),
        );
        r.register(
            "peerconf_checkpoints",
            "Durable redb commits that cover the log (full log, big or bulk batch, close)",
            self.checkpoints.clone(),
        );
        r.register(
            "peerconf_checkpoint_seconds",
            "How long a checkpoint (a durable redb commit) took",
            self.checkpoint_seconds.clone(),
        );
        r.register(
            "peerconf_log_replayed_records",
            "Log records replayed when the store was opened",
            self.replayed_records.clone(),
        );
        r.register(
            "peerconf_commit_failures",
            "Commits that failed (their batch was refused)",
            self.commit_failures.clone(),
        );
    }
}
