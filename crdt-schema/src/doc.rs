//! The Automerge layout of an entity document, identical on every node.
//!
//! Root map:
//! - `_kind`: the kind, written by the genesis change. The name is not in the document: the
//!   document ID (`kind/name`) carries it, which keeps the genesis one per kind.
//! - `_alive`: boolean register; absent or false means deleted (a tombstone). A create writes
//!   true, a delete writes false, and a field update does not touch it, so a delete concurrent
//!   with an update leaves the entity deleted (the update is kept underneath and comes back if
//!   the entity is created again and the field is not replaced).
//! - one key per field. Registers hold a scalar; sets are maps `item -> true` and texts are
//!   Automerge text objects, both created by the genesis change so that no two nodes ever create
//!   the same nested object concurrently (which would make one side's items vanish).
//!
//! The genesis change uses a fixed actor and timestamp 0, so every node that creates an entity
//! produces the byte-identical first change, and concurrent creations merge field by field.

use crate::validate::{cert_info, FieldValue};
use crate::{Kind, Merge, Type};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, AutomergeError, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::{json, Map, Value as Json};
use std::collections::BTreeSet;

/// The actor of every genesis change. No node ever uses it for anything else.
pub const GENESIS_ACTOR: [u8; 16] = *b"peerconf-genesis";
const ALIVE: &str = "_alive";

/// A kind's genesis: the document, its heads, and the entity it reads as (less the name).
struct Genesis {
    doc: AutoCommit,
    heads: Vec<automerge::ChangeHash>,
    state: EntityState,
    /// The containers (sets, texts) the genesis created, by field: the only ones a document of
    /// the kind may hold.
    containers: Vec<(&'static str, automerge::ObjId)>,
}

thread_local! {
    /// Genesis documents by kind: building one costs about 130 us, cloning it about 6 us.
    static GENESIS: std::cell::RefCell<std::collections::HashMap<Kind, Genesis>> =
        Default::default();
}

fn with_genesis<T>(kind: Kind, f: impl FnOnce(&Genesis) -> T) -> T {
    GENESIS.with(|g| {
        let mut g = g.borrow_mut();
        let e = g.entry(kind).or_insert_with(|| {
            let mut doc = build_genesis(kind);
            let heads = doc.get_heads();
            let state = read(&doc, kind, "").expect("a genesis document reads");
            let containers = kind
                .fields()
                .iter()
                .filter_map(|f| match doc.get(ROOT, f.name) {
                    Ok(Some((Value::Object(_), id))) => Some((f.name, id)),
                    _ => None,
                })
                .collect();
            Genesis {
                doc,
                heads,
                state,
                containers,
            }
        });
        f(e)
    })
}

/// A fresh document of `kind`, holding only the genesis change. The genesis depends on the kind
/// alone (the document ID carries the name), so it is built once per kind and cloned. Its actor is
/// still the genesis actor: call [`AutoCommit::set_actor`] with the node's actor before any write.
pub fn genesis(kind: Kind) -> AutoCommit {
    with_genesis(kind, |g| g.doc.clone())
}

/// [`read`], answered without reading the document when it holds nothing but its genesis (an
/// entity about to be created): the state depends on the kind alone.
pub fn read_mut(
    doc: &mut AutoCommit,
    kind: Kind,
    name: &str,
) -> Result<EntityState, AutomergeError> {
    let heads = doc.get_heads();
    let cached = with_genesis(kind, |g| (g.heads == heads).then(|| g.state.clone()));
    match cached {
        Some(mut state) => {
            state.name = name.to_string();
            Ok(state)
        }
        None => read(doc, kind, name),
    }
}

fn build_genesis(kind: Kind) -> AutoCommit {
    let mut doc = AutoCommit::new().with_actor(ActorId::from(GENESIS_ACTOR.as_slice()));
    (|| -> Result<(), AutomergeError> {
        doc.put(ROOT, "_kind", kind.as_str())?;
        for field in kind.fields() {
            match field.merge {
                Merge::AddWinsSet => {
                    doc.put_object(ROOT, field.name, ObjType::Map)?;
                }
                Merge::Text => {
                    doc.put_object(ROOT, field.name, ObjType::Text)?;
                }
                Merge::Register => {}
            }
        }
        Ok(())
    })()
    .expect("genesis writes to a new document cannot fail");
    doc.commit_with(
        CommitOptions::default()
            .with_message("genesis")
            .with_time(0),
    );
    doc
}

/// Who made a change and why: stored as the change message, read back by [`history`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeNote {
    pub node: String,
    pub op: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// The principal that asked for the change (an admin account, the local operator, the
    /// embedding server), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The client address the change was asked from, when it came over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What one write does to a document.
#[derive(Debug, Clone)]
pub struct Edit<'a> {
    /// Some(true) to create, Some(false) to delete, None to leave as is.
    pub alive: Option<bool>,
    /// Values already validated; secrets already turned into what is stored.
    pub values: &'a [(&'static crate::Field, FieldValue)],
}

/// Applies an edit as one change stamped with `note` and `time_ms`. Unchanged values are not
/// written (so history shows real changes), except where a field holds conflicting values: then
/// the write resolves the conflict. Returns the names of the fields written, and whether a change
/// was made at all.
pub fn apply(
    doc: &mut AutoCommit,
    kind: Kind,
    edit: &Edit<'_>,
    note: &ChangeNote,
    time_ms: i64,
) -> Result<Vec<String>, AutomergeError> {
    let mut written = Vec::new();
    if let Some(alive) = edit.alive {
        let cur = doc.get_all(ROOT, ALIVE)?;
        if cur.len() != 1 || scalar(&cur[0].0) != Some(&ScalarValue::Boolean(alive)) {
            doc.put(ROOT, ALIVE, alive)?;
            written.push(ALIVE.to_string());
        }
    }
    for (field, value) in edit.values {
        if write_field(doc, kind, field, value)? {
            written.push(field.name.to_string());
        }
    }
    if written.is_empty() {
        return Ok(written);
    }
    let mut note = note.clone();
    note.fields = written.iter().filter(|f| *f != ALIVE).cloned().collect();
    let msg = serde_json::to_string(&note).unwrap_or_default();
    doc.commit_with(
        CommitOptions::default()
            .with_message(msg)
            .with_time(time_ms),
    );
    Ok(written)
}

fn scalar<'a>(v: &'a Value<'_>) -> Option<&'a ScalarValue> {
    match v {
        Value::Scalar(s) => Some(s.as_ref()),
        Value::Object(_) => None,
    }
}

fn to_scalar(value: &FieldValue) -> Option<ScalarValue> {
    match value {
        FieldValue::Bool(b) => Some(ScalarValue::Boolean(*b)),
        FieldValue::Int(i) => Some(ScalarValue::Int(*i)),
        FieldValue::Str(s) | FieldValue::Secret(s) => Some(ScalarValue::Str(s.as_str().into())),
        _ => None,
    }
}

fn write_field(
    doc: &mut AutoCommit,
    _kind: Kind,
    field: &crate::Field,
    value: &FieldValue,
) -> Result<bool, AutomergeError> {
    match field.merge {
        Merge::Register => {
            let cur = doc.get_all(ROOT, field.name)?;
            match value {
                FieldValue::Reset => {
                    if cur.is_empty() {
                        return Ok(false);
                    }
                    doc.delete(ROOT, field.name)?;
                }
                v => {
                    let new = to_scalar(v).ok_or(AutomergeError::InvalidOp(ObjType::Map))?;
                    if cur.len() == 1 && scalar(&cur[0].0) == Some(&new) {
                        return Ok(false);
                    }
                    doc.put(ROOT, field.name, new)?;
                }
            }
            Ok(true)
        }
        Merge::AddWinsSet => {
            let obj = container(doc, field.name, ObjType::Map)?;
            let want = match value {
                FieldValue::Set(s) => s.clone(),
                _ => BTreeSet::new(),
            };
            let have: BTreeSet<String> = doc.keys(&obj).collect();
            let mut changed = false;
            for gone in have.difference(&want) {
                doc.delete(&obj, gone.as_str())?;
                changed = true;
            }
            for new in want.difference(&have) {
                doc.put(&obj, new.as_str(), true)?;
                changed = true;
            }
            Ok(changed)
        }
        Merge::Text => {
            let obj = container(doc, field.name, ObjType::Text)?;
            let want = match value {
                FieldValue::Text(s) => s.as_str(),
                _ => "",
            };
            if doc.text(&obj)? == want {
                return Ok(false);
            }
            doc.update_text(&obj, want)?;
            Ok(true)
        }
    }
}

/// The genesis-created container of a set or text field.
fn container(
    doc: &AutoCommit,
    name: &str,
    ty: ObjType,
) -> Result<automerge::ObjId, AutomergeError> {
    match doc.get(ROOT, name)? {
        Some((Value::Object(t), id)) if t == ty => Ok(id),
        _ => Err(AutomergeError::InvalidOp(ty)),
    }
}

/// An entity as read from its document.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityState {
    pub kind: Kind,
    pub name: String,
    pub alive: bool,
    /// Every public field, defaults filled in, derived fields computed. Secrets are absent.
    pub fields: Map<String, Json>,
    /// Names of the secret fields that hold a value.
    pub secrets_set: Vec<String>,
    /// Fields whose concurrent writes have not been resolved: every value, winner first.
    pub conflicts: Map<String, Json>,
}

impl EntityState {
    /// The public JSON form served by every read path.
    pub fn to_json(&self) -> Json {
        let mut o = Map::new();
        o.insert("kind".into(), json!(self.kind.as_str()));
        o.insert("name".into(), json!(self.name));
        o.insert("fields".into(), Json::Object(self.fields.clone()));
        if !self.secrets_set.is_empty() {
            o.insert("secrets_set".into(), json!(self.secrets_set));
        }
        if !self.conflicts.is_empty() {
            o.insert("conflicts".into(), Json::Object(self.conflicts.clone()));
        }
        Json::Object(o)
    }
}

/// Reads the entity out of its document. Secret values never leave this function: only whether
/// they are set.
pub fn read(doc: &AutoCommit, kind: Kind, name: &str) -> Result<EntityState, AutomergeError> {
    let alive = matches!(
        doc.get(ROOT, ALIVE)?,
        Some((Value::Scalar(s), _)) if s.as_ref() == &ScalarValue::Boolean(true)
    );
    let mut fields = Map::new();
    let mut secrets_set = Vec::new();
    let mut conflicts = Map::new();
    for field in kind.fields() {
        if field.read_only {
            continue;
        }
        match field.merge {
            Merge::Register => {
                let all = doc.get_all(ROOT, field.name)?;
                if field.secret {
                    if !all.is_empty() {
                        secrets_set.push(field.name.to_string());
                    }
                    continue;
                }
                // The winner is the last of the values (`get` is `get_all`'s last, in
                // automerge): one seek of the key instead of two.
                let winner = all
                    .last()
                    .and_then(|(v, _)| scalar(v).and_then(scalar_json));
                if all.len() > 1 {
                    let mut distinct: Vec<Json> = winner.iter().cloned().collect();
                    for v in all
                        .iter()
                        .filter_map(|(v, _)| scalar(v).and_then(scalar_json))
                    {
                        if !distinct.contains(&v) {
                            distinct.push(v);
                        }
                    }
                    if distinct.len() > 1 {
                        conflicts.insert(field.name.into(), Json::Array(distinct));
                    }
                }
                if let Some(v) = winner.or_else(|| field.default.to_json()) {
                    fields.insert(field.name.into(), v);
                }
            }
            Merge::AddWinsSet => {
                let items: Vec<Json> = match doc.get(ROOT, field.name)? {
                    Some((Value::Object(ObjType::Map), obj)) => {
                        doc.keys(&obj).map(Json::String).collect()
                    }
                    _ => Vec::new(),
                };
                fields.insert(field.name.into(), Json::Array(items));
            }
            Merge::Text => {
                let text = match doc.get(ROOT, field.name)? {
                    Some((Value::Object(ObjType::Text), obj)) => doc.text(&obj)?,
                    _ => String::new(),
                };
                fields.insert(field.name.into(), Json::String(text));
            }
        }
    }
    if kind == Kind::Certificate {
        if let Some((subject, not_after, fp)) = fields
            .get("cert_pem")
            .and_then(Json::as_str)
            .and_then(|pem| cert_info(pem).ok())
        {
            fields.insert("subject".into(), json!(subject));
            fields.insert("not_after".into(), json!(not_after));
            fields.insert("fingerprint".into(), json!(fp));
        }
    }
    Ok(EntityState {
        kind,
        name: name.to_string(),
        alive,
        fields,
        secrets_set,
        conflicts,
    })
}

fn scalar_json(s: &ScalarValue) -> Option<Json> {
    match s {
        ScalarValue::Boolean(b) => Some(json!(b)),
        ScalarValue::Int(i) => Some(json!(i)),
        ScalarValue::Uint(u) => Some(json!(u)),
        ScalarValue::Str(s) => Some(json!(s.as_str())),
        _ => None,
    }
}

/// One entry of an entity's history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryEntry {
    pub hash: String,
    pub actor: String,
    pub seq: u64,
    pub time_ms: i64,
    pub node: Option<String>,
    pub op: Option<String>,
    pub fields: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// The note of the newest change at the document's heads (by its timestamp, then its hash): who
/// made the change a node just received, and on which node. None when no head carries a note
/// (genesis only, or a change from outside peerconf).
pub fn latest_note(doc: &mut AutoCommit) -> Option<ChangeNote> {
    let heads = doc.get_heads();
    heads
        .iter()
        .filter_map(|h| {
            let meta = doc.get_change_meta_by_hash(h)?;
            let note: ChangeNote = serde_json::from_str(meta.message.as_deref()?).ok()?;
            Some(((meta.timestamp, *h), note))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, note)| note)
}

/// Every change of the document after genesis, in causal order.
pub fn history(doc: &mut AutoCommit) -> Vec<HistoryEntry> {
    let genesis = ActorId::from(GENESIS_ACTOR.as_slice());
    doc.get_changes_meta(&[])
        .into_iter()
        .filter(|c| *c.actor != genesis)
        .map(|c| {
            let note: Option<ChangeNote> = c
                .message
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok());
            HistoryEntry {
                hash: c.hash.to_string(),
                actor: c.actor.to_hex_string(),
                seq: c.seq,
                time_ms: c.timestamp,
                node: note.as_ref().map(|n| n.node.clone()),
                op: note.as_ref().map(|n| n.op.clone()),
                by: note.as_ref().and_then(|n| n.by.clone()),
                from: note.as_ref().and_then(|n| n.from.clone()),
                fields: note.map(|n| n.fields).unwrap_or_default(),
            }
        })
        .collect()
}

/// How a document breaks the layout of its kind. The messages name the key and what is wrong
/// with it, never a value (a secret field's value must not reach a log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("document is not of kind {kind} (its _kind register is missing, of another kind, or written more than once)")]
    NotOfKind { kind: Kind },
    #[error("{kind}.{key}: not a field of {kind}")]
    UnknownKey { kind: Kind, key: String },
    #[error("{kind}.{key}: derived field stored in the document (it is computed at read time, never stored)")]
    Derived { kind: Kind, key: String },
    #[error("{kind}.{key}: container replaced or duplicated (expected the one {expected} its genesis created)")]
    Container {
        kind: Kind,
        key: String,
        expected: &'static str,
    },
    #[error("{kind}.{key}: holds {found}, expected {expected}")]
    WrongType {
        kind: Kind,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{kind}.{key}: the document cannot be read: {reason}")]
    Unreadable {
        kind: Kind,
        key: String,
        reason: String,
    },
}

/// What a value is, for [`LayoutError::WrongType`] (never the value itself).
fn value_type(v: &Value<'_>) -> &'static str {
    match v {
        Value::Object(ObjType::Map) => "a map",
        Value::Object(ObjType::List) => "a list",
        Value::Object(ObjType::Text) => "a text",
        Value::Object(ObjType::Table) => "a table",
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Boolean(_) => "a boolean",
            ScalarValue::Int(_) => "an integer",
            ScalarValue::Uint(_) => "an unsigned integer",
            ScalarValue::F64(_) => "a float",
            ScalarValue::Str(_) => "a string",
            ScalarValue::Bytes(_) => "bytes",
            ScalarValue::Counter(_) => "a counter",
            ScalarValue::Timestamp(_) => "a timestamp",
            ScalarValue::Null => "null",
            ScalarValue::Unknown { .. } => "an unknown scalar",
        },
    }
}

/// Checks that a document has the layout of `kind`, as every node writes it: a peer cannot plant
/// a document of another kind, replace a genesis container, nest an object where the schema has
/// a register, store a value of another type than its field's (in any of a register's
/// concurrent values), add keys the schema does not have, or store a derived field.
pub fn check_layout(doc: &AutoCommit, kind: Kind) -> Result<(), LayoutError> {
    let unreadable = |key: &str, e: AutomergeError| LayoutError::Unreadable {
        kind,
        key: key.to_string(),
        reason: e.to_string(),
    };
    let wrong = |key: &str, expected: &'static str, found: &Value<'_>| LayoutError::WrongType {
        kind,
        key: key.to_string(),
        expected,
        found: value_type(found),
    };
    let kinds = doc
        .get_all(ROOT, "_kind")
        .map_err(|e| unreadable("_kind", e))?;
    let of_kind = matches!(
        kinds.as_slice(),
        [(Value::Scalar(s), _)] if matches!(s.as_ref(), ScalarValue::Str(k) if k.as_str() == kind.as_str())
    );
    if !of_kind {
        return Err(LayoutError::NotOfKind { kind });
    }
    for key in doc.keys(ROOT) {
        let key = key.as_str();
        if key == "_kind" {
            continue;
        }
        if key == ALIVE {
            for (v, _) in doc.get_all(ROOT, ALIVE).map_err(|e| unreadable(ALIVE, e))? {
                if !matches!(&v, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Boolean(_)))
                {
                    return Err(wrong(ALIVE, "a boolean", &v));
                }
            }
            continue;
        }
        let Some(field) = kind.field(key) else {
            return Err(LayoutError::UnknownKey {
                kind,
                key: key.chars().take(128).collect(),
            });
        };
        if field.read_only {
            return Err(LayoutError::Derived {
                kind,
                key: key.to_string(),
            });
        }
    }
    let genesis = with_genesis(kind, |g| g.containers.clone());
    for field in kind.fields().iter().filter(|f| !f.read_only) {
        let all = doc
            .get_all(ROOT, field.name)
            .map_err(|e| unreadable(field.name, e))?;
        let container = |ty: ObjType, expected: &'static str| match all.as_slice() {
            [(Value::Object(t), id)] if *t == ty && genesis.contains(&(field.name, id.clone())) => {
                Ok(id.clone())
            }
            _ => Err(LayoutError::Container {
                kind,
                key: field.name.to_string(),
                expected,
            }),
        };
        match field.ty {
            Type::Set { .. } => {
                let obj = container(ObjType::Map, "map")?;
                for item in doc.keys(&obj) {
                    let values = doc
                        .get_all(&obj, item.as_str())
                        .map_err(|e| unreadable(field.name, e))?;
                    for (v, _) in values {
                        if !matches!(&v, Value::Scalar(s) if s.as_ref() == &ScalarValue::Boolean(true))
                        {
                            return Err(wrong(field.name, "set items mapped to true", &v));
                        }
                    }
                }
            }
            Type::Text { .. } => {
                container(ObjType::Text, "text")?;
            }
            Type::Bool | Type::Int { .. } | Type::Str { .. } | Type::Enum(_) | Type::Ref(_) => {
                let expected = match field.ty {
                    Type::Bool => "a boolean",
                    Type::Int { .. } => "an integer",
                    _ => "a string",
                };
                for (v, _) in &all {
                    let ok = match (v, field.ty) {
                        (Value::Scalar(s), Type::Bool) => {
                            matches!(s.as_ref(), ScalarValue::Boolean(_))
                        }
                        (Value::Scalar(s), Type::Int { .. }) => {
                            matches!(s.as_ref(), ScalarValue::Int(_))
                        }
                        // A secret field holds a reference, never a value.
                        (Value::Scalar(s), _) if field.secret => matches!(
                            s.as_ref(),
                            ScalarValue::Str(r) if crate::secret::is_ref(r)
                        ),
                        (Value::Scalar(s), _) => matches!(s.as_ref(), ScalarValue::Str(_)),
                        (Value::Object(_), _) => false,
                    };
                    if !ok {
                        let expected = if field.secret {
                            "a secret reference"
                        } else {
                            expected
                        };
                        return Err(wrong(field.name, expected, v));
                    }
                }
            }
        }
    }
    Ok(())
}
