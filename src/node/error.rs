//! Layer: node (imports core, store, net).
//!
//! The errors of the node's operations. Each variant's doc says what the failure did to state.

use crate::core::entity::WriteError;
use crate::core::index::RowError;
use crate::store::StoreError;
use crdt_schema::{Kind, SchemaError};

/// Everything a node operation (open, read, write, replication command) can fail with. A failed
/// operation changed nothing stored, except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The write was refused before it touched anything.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Storage failed; the operation's transaction was not committed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write's commit failed after it left this node's hands (pushed to peers, or its log
    /// record durable): it may take effect (from a peer that stored it, or when the log is
    /// replayed) or not. Retry it: writes are idempotent.
    #[error("the outcome of this write is unknown: its commit failed after the write was sent to peers or logged ({0}); retry it, or read it back")]
    Unknown(StoreError),
    #[error("{0} is not an initialised peerconf data directory: run `peerconf init --data-dir {0}` first")]
    NotInitialised(String),
    #[error("{dir} is already initialised (node {node_id})")]
    AlreadyInitialised { dir: String, node_id: String },
    /// A node name outside the safe set; nothing was created.
    #[error("--name {0:?}: a node name is 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadName(String),
    /// `--api-certificate` names no possible `certificate` entity; nothing was created.
    #[error("--api-certificate {name:?}: {reason}")]
    BadApiCertificate { name: String, reason: String },
    /// A file of the data directory could not be made or read; nothing was initialised.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TLS material could not be made or read.
    #[error("TLS material: {0}")]
    Tls(String),
    /// A document received or stored does not read as its kind.
    #[error(transparent)]
    Row(#[from] RowError),
    /// A typed view does not fit the stored entity.
    #[error("{kind} does not fit its typed view: {reason}")]
    Typed { kind: Kind, reason: String },
    /// A node that is not a (current) member was named.
    #[error("node {0} is not a member of this cluster")]
    NotMember(String),
    /// The store cannot be trusted to hold what the node acknowledged: the node does not start.
    #[error("the store in {dir} is damaged: {reason}. The node did not start, so that it never serves less than it acknowledged. Rebuild it from its peers: peerconf repair --data-dir {dir}")]
    Damaged { dir: String, reason: String },
    /// The disk holding the data directory is full: refused before anything was changed.
    #[error("the disk holding {dir} is full ({free_mib} MiB free): writes are refused until space is freed; reads still work")]
    DiskFull { dir: String, free_mib: u64 },
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl From<SchemaError> for Error {
    fn from(e: SchemaError) -> Self {
        Error::Write(WriteError::Schema(e))
    }
}

impl Error {
    pub fn not_found(kind: Kind, name: &str) -> Error {
        Error::Write(WriteError::NotFound {
            kind,
            name: name.to_string(),
        })
    }

    pub(crate) fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
        Error::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}
