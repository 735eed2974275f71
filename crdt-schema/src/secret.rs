//! Secret fields by reference.
//!
//! A secret field (a password hash, a private key) never holds its value in the document: the
//! Automerge history keeps every value a register ever had, and a document travels whole to every
//! node that joins later. The document holds a *reference* instead, `sref1:` followed by the hex
//! SHA-256 of the document ID, the field name and the value; the value itself is kept beside the
//! document by the node (sealed at rest) and travels with the document's sync messages, for the
//! references the sender's document currently shows.
//!
//! Merging is therefore exactly the merge of any other register: a reference is an ordinary
//! string value, the later write in causal order wins, and between concurrent writes the one with
//! the greater operation ID (counter, then actor) wins, as Automerge decides for every map key.
//! A node keeps the values of every reference a secret field currently shows (the winner and any
//! concurrent values still visible), and forgets every other.
//!
//! A reference is safe to keep forever: the values it names are a salted argon2 hash or a private
//! key, which the digest does not reveal, and the document ID and field name bind it to its place
//! (a peer cannot make a value count for another entity).

use crate::{Kind, Merge};
use automerge::{AutoCommit, ChangeHash, ReadDoc, ScalarValue, Value, ROOT};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// The prefix of a reference.
pub const REF_PREFIX: &str = "sref1:";

/// The reference of `value` in `field` of document `doc_id`.
pub fn secret_ref(doc_id: &str, field: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"peerconf secret v1\0");
    h.update(doc_id.as_bytes());
    h.update([0]);
    h.update(field.as_bytes());
    h.update([0]);
    h.update(value.as_bytes());
    format!("{REF_PREFIX}{}", hex::encode(h.finalize()))
}

/// Whether `s` is a well-formed reference.
pub fn is_ref(s: &str) -> bool {
    s.strip_prefix(REF_PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The secret fields of a kind.
pub fn secret_fields(kind: Kind) -> impl Iterator<Item = &'static str> {
    kind.fields()
        .iter()
        .filter(|f| f.secret && f.merge == Merge::Register)
        .map(|f| f.name)
}

/// Every reference the secret fields of `doc` currently show: for each field, the winning value
/// and any concurrent ones still visible. These are the values a node keeps. A value that is not
/// a reference (a document from before references) is left out.
pub fn live_refs(doc: &AutoCommit, kind: Kind) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for field in secret_fields(kind) {
        let Ok(values) = doc.get_all(ROOT, field) else {
            continue;
        };
        for (v, _) in values {
            if let Value::Scalar(s) = v {
                if let ScalarValue::Str(s) = s.as_ref() {
                    if is_ref(s) {
                        out.push((field, s.to_string()));
                    }
                }
            }
        }
    }
    out
}

/// The reference a secret field reads as (the winning value), if it holds one.
pub fn current_ref(doc: &AutoCommit, field: &str) -> Option<String> {
    match doc.get(ROOT, field).ok()?? {
        (Value::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Str(s) if is_ref(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// The secret field a change writes a value (not a reference) into, if any: such a change is
/// refused from a peer, since no node of this version writes one and its value would stay in
/// the history of every node.
pub fn change_puts_value(change: &automerge::Change, kind: Kind) -> Option<&'static str> {
    let mut fields = secret_fields(kind).peekable();
    fields.peek()?;
    let fields: Vec<&'static str> = fields.collect();
    for op in change.decode().operations {
        let (automerge::legacy::ObjectId::Root, automerge::legacy::Key::Map(key)) =
            (&op.obj, &op.key)
        else {
            continue;
        };
        let Some(field) = fields.iter().find(|f| **f == key.as_str()) else {
            continue;
        };
        match &op.action {
            automerge::legacy::OpType::Put(ScalarValue::Str(v)) if is_ref(v.as_str()) => {}
            automerge::legacy::OpType::Delete => {}
            _ => return Some(field),
        }
    }
    None
}

/// A document whose history was rewritten so that no change holds a secret value.
pub struct Redacted {
    pub doc: AutoCommit,
    /// The values the original's secret fields showed (field, value): they move beside the
    /// document, under the references the rewritten one shows.
    pub values: Vec<(&'static str, String)>,
}

/// Why a history could not be rewritten.
#[derive(Debug, thiserror::Error)]
#[error("rewriting the history of {doc_id}: {error}")]
pub struct RedactError {
    pub doc_id: String,
    pub error: String,
}

/// Migration of a document written before references: every change that put a secret value
/// into a secret field is rewritten to put the value's reference instead, and every change that
/// depends on a rewritten one is rewritten with the new dependencies. Nothing else changes (the
/// actor, sequence number, operations, time and message of each change stay), so the rewrite is
/// a pure function of the history: every node that holds the same changes produces the same
/// rewritten changes, with the same hashes, and nodes that held different changes still merge
/// exactly as before. None when the history holds no secret value.
pub fn redact_history(
    doc: &mut AutoCommit,
    doc_id: &str,
    kind: Kind,
) -> Result<Option<Redacted>, RedactError> {
    let err = |e: &dyn std::fmt::Display| RedactError {
        doc_id: doc_id.to_string(),
        error: e.to_string(),
    };
    let secret: Vec<&'static str> = secret_fields(kind).collect();
    if secret.is_empty() {
        return Ok(None);
    }
    let changes: Vec<automerge::Change> = doc.get_changes(&[]);
    let mut renamed: HashMap<ChangeHash, ChangeHash> = HashMap::new();
    let mut out: Vec<automerge::Change> = Vec::with_capacity(changes.len());
    for change in changes {
        let mut expanded = change.decode();
        let mut touched = false;
        for op in &mut expanded.operations {
            let automerge::legacy::ObjectId::Root = op.obj else {
                continue;
            };
            let automerge::legacy::Key::Map(key) = &op.key else {
                continue;
            };
            let Some(field) = secret.iter().find(|f| **f == key.as_str()) else {
                continue;
            };
            if let automerge::legacy::OpType::Put(ScalarValue::Str(v)) = &op.action {
                if !is_ref(v.as_str()) {
                    op.action = automerge::legacy::OpType::Put(ScalarValue::Str(
                        secret_ref(doc_id, field, v.as_str()).into(),
                    ));
                    touched = true;
                }
            }
        }
        for dep in &mut expanded.deps {
            if let Some(new) = renamed.get(dep) {
                *dep = *new;
                touched = true;
            }
        }
        if touched {
            expanded.deps.sort();
            expanded.hash = None;
            let old = change.hash();
            let new = automerge::Change::from(expanded);
            renamed.insert(old, new.hash());
            out.push(new);
        } else {
            out.push(change);
        }
    }
    if renamed.is_empty() {
        return Ok(None);
    }
    let mut values = Vec::new();
    for field in &secret {
        let all = doc.get_all(ROOT, *field).map_err(|e| err(&e))?;
        for (v, _) in all {
            if let Value::Scalar(s) = v {
                if let ScalarValue::Str(s) = s.as_ref() {
                    if !is_ref(s) {
                        values.push((*field, s.to_string()));
                    }
                }
            }
        }
    }
    let mut rewritten = AutoCommit::new();
    rewritten.apply_changes(out).map_err(|e| err(&e))?;
    Ok(Some(Redacted {
        doc: rewritten,
        values,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    #[test]
    fn references_are_bound_to_their_place_and_well_formed() {
        let a = secret_ref("user/a", "password", "$argon2id$x");
        assert!(is_ref(&a));
        assert_ne!(a, secret_ref("user/b", "password", "$argon2id$x"));
        assert_ne!(a, secret_ref("user/a", "key_pem", "$argon2id$x"));
        assert!(!is_ref("$argon2id$x"));
        assert!(!is_ref(&a.to_uppercase()));
        assert!(!is_ref(&a[..a.len() - 1]));
    }

    fn doc_with_history(actor: &[u8]) -> AutoCommit {
        let mut doc = crate::doc::genesis(Kind::User);
        doc.set_actor(automerge::ActorId::from(actor));
        doc.put(ROOT, "password", "$argon2id$first").unwrap();
        doc.commit();
        doc.put(ROOT, "enabled", false).unwrap();
        doc.commit();
        doc.put(ROOT, "password", "$argon2id$second").unwrap();
        doc.commit();
        doc
    }

    #[test]
    fn a_rewritten_history_holds_no_value_and_is_the_same_on_every_node() {
        let mut a = doc_with_history(b"aaaa");
        let mut b = a.fork();
        let ra = redact_history(&mut a, "user/u", Kind::User)
            .unwrap()
            .unwrap();
        let rb = redact_history(&mut b, "user/u", Kind::User)
            .unwrap()
            .unwrap();
        let mut da = ra.doc;
        let mut db = rb.doc;
        assert_eq!(da.get_heads(), db.get_heads(), "same changes, same rewrite");
        let saved = da.save();
        assert!(!saved.windows(8).any(|w| w == b"$argon2i"));
        assert_eq!(
            ra.values,
            vec![("password", "$argon2id$second".to_string())]
        );
        assert_eq!(
            current_ref(&da, "password").unwrap(),
            secret_ref("user/u", "password", "$argon2id$second")
        );
        assert_eq!(
            da.get(ROOT, "enabled").unwrap().unwrap().0,
            Value::Scalar(std::borrow::Cow::Owned(ScalarValue::Boolean(false)))
        );
        // Rewriting again changes nothing.
        assert!(redact_history(&mut da, "user/u", Kind::User)
            .unwrap()
            .is_none());
        let _ = &mut db;
    }

    #[test]
    fn diverged_nodes_rewrite_independently_and_still_merge() {
        let mut a = doc_with_history(b"aaaa");
        let mut b = a
            .fork()
            .with_actor(automerge::ActorId::from(b"bbbb".as_slice()));
        a.put(ROOT, "password", "$argon2id$on-a").unwrap();
        a.commit();
        b.put(ROOT, "enabled", true).unwrap();
        b.commit();
        let mut merged = a.fork();
        merged.merge(&mut b).unwrap();
        let mut ra = redact_history(&mut a, "user/u", Kind::User)
            .unwrap()
            .unwrap()
            .doc;
        let mut rb = redact_history(&mut b, "user/u", Kind::User)
            .unwrap()
            .unwrap()
            .doc;
        let mut rm = redact_history(&mut merged, "user/u", Kind::User)
            .unwrap()
            .unwrap()
            .doc;
        ra.merge(&mut rb).unwrap();
        assert_eq!(ra.get_heads(), rm.get_heads());
        assert_eq!(
            current_ref(&ra, "password"),
            Some(secret_ref("user/u", "password", "$argon2id$on-a"))
        );
    }
}
