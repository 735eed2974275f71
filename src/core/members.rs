//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! The member list, itself a replicated Automerge document (`_cluster/members`).
//!
//! Layout: flat registers `"<node id>/<field>"` at the root, never nested objects (two nodes adding
//! members concurrently must not create competing containers). A removed member keeps its entry
//! with `removed = true`, so a removal replicates and the node's key is refused everywhere.
//!
//! Identity: each entry pins the member's public key (`key`: its node certificate's key, hex),
//! and carries its admission: the member that admitted it and that member's signature over
//! (cluster, member, key) (`admission`: `"<admitter id>:<signature hex>"`, one register so
//! concurrent writes never pair one admitter with another's signature). The first node admits
//! itself. A connection is accepted only with the key its entry pins, so the cluster CA's key
//! alone grants nothing. A node whose list is behind accepts a member it does not know only if
//! that member's admission chains, signature by signature, to a member it does know
//! ([`verify_chain`]).

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, AutomergeError, ReadDoc, ScalarValue, Value, ROOT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const MEMBERS_DOC: &str = "_cluster/members";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub name: String,
    /// Advertised IPC address, `host:port`.
    pub addr: String,
    pub version: String,
    pub removed: bool,
    /// The member's public key (hex of its certificate's subject public key). Empty for a
    /// member added before keys were pinned.
    #[serde(default)]
    pub key: String,
    /// `"<admitter id>:<signature hex>"`: who admitted the member, and its signature over
    /// [`admission_message`]. Empty before keys were pinned.
    #[serde(default)]
    pub admission: String,
}

/// Whether a node name is safe to print anywhere (terminals, logs, metrics): 1 to 64 of
/// `[A-Za-z0-9._-]`.
pub fn valid_node_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// What an admitting member signs: the cluster, the member and its key.
pub fn admission_message(cluster_id: &str, member_id: &str, key: &str) -> Vec<u8> {
    format!("peerconf-admission-v1\0{cluster_id}\0{member_id}\0{key}").into_bytes()
}

/// Whether `sig_hex` is `key_hex`'s ECDSA P-256 (SHA-256, ASN.1) signature of `msg`.
pub fn verify_signature(key_hex: &str, msg: &[u8], sig_hex: &str) -> bool {
    let (Ok(key), Ok(sig)) = (hex::decode(key_hex), hex::decode(sig_hex)) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(msg, &sig)
        .is_ok()
}

impl Member {
    /// The admitter and signature of this entry's admission, if it has one.
    pub fn admitted_by(&self) -> Option<(&str, &str)> {
        self.admission.split_once(':')
    }

    /// Whether `admitter` (a member entry, with its pinned key) signed this entry's admission.
    pub fn admitted_by_member(&self, cluster_id: &str, admitter: &Member) -> bool {
        match self.admitted_by() {
            Some((by, sig)) if by == admitter.id && !admitter.key.is_empty() => verify_signature(
                &admitter.key,
                &admission_message(cluster_id, &self.id, &self.key),
                sig,
            ),
            _ => false,
        }
    }
}

/// The members of `theirs` (a list fetched from a node this node does not know) whose admission
/// chains to a member of `ours` that is not removed: each link a signature by an admitter
/// already verified. A removed member admits nobody. What cannot be verified this way (a forged
/// entry, a node minted with the cluster CA's key) is left out.
pub fn verify_chain(cluster_id: &str, ours: &[Member], theirs: &[Member]) -> BTreeSet<String> {
    let known = |m: &Member| {
        ours.iter()
            .any(|o| o.id == m.id && !o.removed && !o.key.is_empty() && o.key == m.key)
    };
    let mut admitters: BTreeMap<&str, &Member> = ours
        .iter()
        .filter(|m| !m.removed && !m.key.is_empty())
        .map(|m| (m.id.as_str(), m))
        .collect();
    let mut verified = BTreeSet::new();
    loop {
        let mut grew = false;
        for m in theirs {
            if m.removed || m.key.is_empty() || verified.contains(&m.id) {
                continue;
            }
            // A member this node knows must keep the key it knows: another key is another node.
            if ours.iter().any(|o| o.id == m.id) && !known(m) {
                continue;
            }
            let signed = m
                .admitted_by()
                .and_then(|(by, _)| admitters.get(by))
                .is_some_and(|a| m.admitted_by_member(cluster_id, a));
            if known(m) || signed {
                verified.insert(m.id.clone());
                admitters.insert(m.id.as_str(), m);
                grew = true;
            }
        }
        if !grew {
            return verified;
        }
    }
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
    let prev = cur.as_ref();
    if prev.is_none_or(|p| p.key != m.key) {
        doc.put(ROOT, format!("{}/key", m.id), m.key.as_str())?;
    }
    if prev.is_none_or(|p| p.admission != m.admission) {
        doc.put(ROOT, format!("{}/admission", m.id), m.admission.as_str())?;
    }
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
            key: String::new(),
            admission: String::new(),
        });
        match (field, val) {
            ("name", ScalarValue::Str(s)) => m.name = s.to_string(),
            ("addr", ScalarValue::Str(s)) => m.addr = s.to_string(),
            ("version", ScalarValue::Str(s)) => m.version = s.to_string(),
            ("removed", ScalarValue::Boolean(b)) => m.removed = b,
            ("key", ScalarValue::Str(s)) => m.key = s.to_string(),
            ("admission", ScalarValue::Str(s)) => m.admission = s.to_string(),
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
            key: String::new(),
            admission: String::new(),
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
