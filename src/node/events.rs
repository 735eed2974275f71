//! Layer: node (imports core, store, net).
//!
//! The change feed: one event per committed change of an entity, published by the driver after
//! the commit that made it durable.

use crdt_schema::Kind;
use serde::Serialize;

/// Where a change came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "origin", rename_all = "lowercase")]
pub enum Origin {
    Local,
    Remote { peer: String },
}

/// One committed change of one entity, published after it is durable.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ChangeEvent {
    /// Its number in this node's change feed (`GET /v1/watch`): increasing, never reused.
    pub seq: u64,
    pub kind: Kind,
    pub name: String,
    /// False when the change deleted the entity (or it is still deleted).
    pub alive: bool,
    #[serde(flatten)]
    pub origin: Origin,
    /// The node that made a change a peer sent, as the change's note names it (the sending peer
    /// may only have passed it on). None for local changes and where no note says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_on: Option<String>,
    /// Who asked for it: the principal of a change made here, or the one a peer's change names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The entity's public JSON as this change left it (as `GET` reads it), when alive: a live
    /// watch stream sends it without reading the store again. Not kept in the feed's rows (a
    /// replay reads the entity).
    #[serde(skip)]
    pub entity: Option<std::sync::Arc<[u8]>>,
}
