//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! The member list, itself a replicated Automerge document (`_cluster/members`).
//!
//! Layout: flat registers `"<node id>/<field>"` at the root, never nested objects (two nodes adding
//! members concurrently must not create competing containers). A removed member keeps its entry
//! with `removed = true`, so a removal replicates and the node's certificate is refused everywhere.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, AutomergeError, ReadDoc, ScalarValue, Value, ROOT};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MEMBERS_DOC: &str = "_cluster/members";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub name: String,
    /// Advertised IPC address, `host:port`.
    pub addr: String,
    pub version: String,
    pub removed: bool,
}

/// The genesis of every member list (fixed actor, time 0), so two nodes' lists merge.
pub fn genesis() -> AutoCommit {
    let mut doc =
        AutoCommit::new().with_actor(ActorId::from(crdt_schema::doc::GENESIS_ACTOR.as_slice()));
    doc.put(ROOT, "_kind", "_members")
        .expect("write to a new document");
    doc.commit_with(
        CommitOptions::default()
            .with_message("genesis")
            .with_time(0),
    );
    doc
}

/// Adds or updates a member. Returns whether anything changed.
pub fn upsert(doc: &mut AutoCommit, m: &Member, wall_ms: i64) -> Result<bool, AutomergeError> {
    let cur = read(doc).into_iter().find(|x| x.id == m.id);
    if cur.as_ref() == Some(m) {
        return Ok(false);
    }
    doc.put(ROOT, format!("{}/name", m.id), m.name.as_str())?;
    doc.put(ROOT, format!("{}/addr", m.id), m.addr.as_str())?;
    doc.put(ROOT, format!("{}/version", m.id), m.version.as_str())?;
    doc.put(ROOT, format!("{}/removed", m.id), m.removed)?;
    doc.commit_with(
        CommitOptions::default()
            .with_message(format!("{{\"op\":\"member\",\"node\":\"{}\"}}", m.id))
            .with_time(wall_ms),
    );
    Ok(true)
}

/// Every member ever added, removed ones included, by node ID.
pub fn read(doc: &AutoCommit) -> Vec<Member> {
    let mut by_id: BTreeMap<String, Member> = BTreeMap::new();
    for key in doc.keys(ROOT) {
        let Some((id, field)) = key.split_once('/') else {
            continue;
        };
        let val = match doc.get(ROOT, key.as_str()) {
            Ok(Some((Value::Scalar(s), _))) => s.into_owned(),
            _ => continue,
        };
        let m = by_id.entry(id.to_string()).or_insert_with(|| Member {
            id: id.to_string(),
            name: String::new(),
            addr: String::new(),
            version: String::new(),
            removed: false,
        });
        match (field, val) {
            ("name", ScalarValue::Str(s)) => m.name = s.to_string(),
            ("addr", ScalarValue::Str(s)) => m.addr = s.to_string(),
            ("version", ScalarValue::Str(s)) => m.version = s.to_string(),
            ("removed", ScalarValue::Boolean(b)) => m.removed = b,
            _ => {}
        }
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str) -> Member {
        Member {
            id: id.into(),
            name: format!("n-{id}"),
            addr: "127.0.0.1:1".into(),
            version: "0.1.0".into(),
            removed: false,
        }
    }

    #[test]
    fn concurrent_adds_merge_and_removal_sticks() {
        let mut a = genesis();
        a.set_actor(ActorId::from(vec![1; 16]));
        let mut b = genesis();
        b.set_actor(ActorId::from(vec![2; 16]));
        upsert(&mut a, &m("a"), 1).unwrap();
        upsert(&mut b, &m("b"), 1).unwrap();
        a.merge(&mut b).unwrap();
        assert_eq!(read(&a).len(), 2);
        let mut gone = m("b");
        gone.removed = true;
        assert!(upsert(&mut a, &gone, 2).unwrap());
        assert!(!upsert(&mut a, &gone, 3).unwrap());
        b.merge(&mut a).unwrap();
        assert!(read(&b).iter().find(|x| x.id == "b").unwrap().removed);
    }
}
