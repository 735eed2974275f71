//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! The materialized index row of a stored document, derived from the document alone: what reads,
//! listings and the replication digest use without loading documents. Deriving it is pure, so the
//! driver, the log's replay and a new node's catch-up all derive it the same way.

use super::members::{self, MEMBERS_DOC};
use automerge::AutoCommit;
use crdt_schema::doc::{self, EntityState};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One row of the materialized index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexEntry {
    /// False for a tombstone: the document exists, the entity does not.
    pub alive: bool,
    /// Whether some field holds unresolved concurrent values.
    pub conflicts: bool,
    /// Incremental chunks stored after the full save (the store's business, set by it).
    pub chunks: u32,
    /// SHA-256 over the sorted heads of the document (for the replication digest).
    pub heads_hash: [u8; 32],
    /// The entity's public JSON (never a secret), as served by reads.
    pub json: Vec<u8>,
    /// The references its secret fields show (field, reference): the values the store keeps
    /// for it ([`crdt_schema::secret`]).
    pub secrets: Vec<(String, String)>,
}

/// Why a document has no index row. Nothing was stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowError {
    #[error("{id:?} is not a document ID: {reason}")]
    BadId { id: String, reason: String },
    #[error("document {id} does not read as its kind: {reason}")]
    Unreadable { id: String, reason: String },
}

/// SHA-256 over the sorted heads: what the replication digest compares.
pub fn heads_hash(doc: &mut AutoCommit) -> [u8; 32] {
    let mut heads = doc.get_heads();
    heads.sort();
    let mut h = Sha256::new();
    for x in heads {
        h.update(x.0);
    }
    h.finalize().into()
}

/// The index row of an entity document as it now stands.
pub fn entity_row(doc: &mut AutoCommit, state: &EntityState) -> IndexEntry {
    IndexEntry {
        alive: state.alive,
        conflicts: !state.conflicts.is_empty(),
        chunks: 0,
        heads_hash: heads_hash(doc),
        json: serde_json::to_vec(&state.to_json()).expect("json serializes"),
        secrets: crdt_schema::secret::live_refs(doc, state.kind)
            .into_iter()
            .map(|(f, r)| (f.to_string(), r))
            .collect(),
    }
}

/// The index row of any stored document: an entity, or the member list.
pub fn row_for(id: &str, d: &mut AutoCommit) -> Result<IndexEntry, RowError> {
    if id == MEMBERS_DOC {
        let list = members::read(d);
        return Ok(IndexEntry {
            alive: true,
            conflicts: false,
            chunks: 0,
            heads_hash: heads_hash(d),
            json: serde_json::to_vec(&list).expect("json serializes"),
            secrets: Vec::new(),
        });
    }
    let (kind, name) = crdt_schema::parse_doc_id(id).map_err(|e| RowError::BadId {
        id: id.to_string(),
        reason: e.to_string(),
    })?;
    let state = doc::read(d, kind, name).map_err(|e| RowError::Unreadable {
        id: id.to_string(),
        reason: e.to_string(),
    })?;
    Ok(entity_row(d, &state))
}
