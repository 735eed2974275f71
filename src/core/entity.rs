//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! Executing one write against one entity document: validation, references, secrets, the edit
//! itself. Pure: what it needs from the world (does a referenced entity exist, what is the password
//! policy) comes through [`World`], and time and salt come as arguments.
//!
//! Invariant: when `execute` returns an error, the document is exactly as it was.

use automerge::AutoCommit;
use crdt_schema::doc::{self, ChangeNote, Edit, EntityState};
use crdt_schema::{check_entity, Field, FieldValue, Kind, SchemaError, WriteMode};
use serde_json::{Map, Value};

/// What a write does.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Create or replace: every field not named goes back to its default (secrets excepted).
    Put(Value),
    /// JSON merge patch (RFC 7386) of the fields: named fields change, `null` resets one.
    Patch(Value),
    /// Tombstone the entity.
    Delete,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Put(_) => "put",
            Op::Patch(_) => "patch",
            Op::Delete => "delete",
        }
    }
}

/// Why a write was refused. In every case nothing stored was changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: Kind, name: String },
    #[error("{kind}.{field}: {target_kind} {target:?} does not exist")]
    MissingReference {
        kind: Kind,
        field: String,
        target_kind: Kind,
        target: String,
    },
    /// The write would leave the cluster without an enabled SuperAdmin (as this node knows it).
    #[error("admin {name:?} is the last enabled superadmin: it cannot be deleted, disabled or demoted (make another superadmin first)")]
    LastSuperAdmin { name: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The parts of the node's state a write depends on, besides its own document.
pub trait World {
    /// Whether the entity exists (alive) as of this write.
    fn exists(&self, kind: Kind, name: &str) -> Result<bool, WriteError>;
    /// `security/global.password_min_length`.
    fn password_min_length(&self) -> Result<usize, WriteError>;
    /// Names of the admin accounts that are alive, enabled and superadmins, as of this write.
    fn enabled_superadmins(&self) -> Result<Vec<String>, WriteError>;
}

/// Whether an admin account's fields (as read, defaults filled in) make an enabled SuperAdmin.
fn enabled_superadmin(fields: &Map<String, Value>) -> bool {
    fields.get("role").and_then(Value::as_str) == Some("superadmin")
        && fields.get("enabled").and_then(Value::as_bool) != Some(false)
}

/// Who writes and when.
pub struct Context<'a> {
    pub node_id: &'a str,
    /// Wall-clock time recorded in the change, for history only.
    pub wall_ms: i64,
    /// Fresh random salt for password hashes, from the driver's seeded generator.
    pub salt: [u8; 16],
    /// Who asked for the write, recorded in the change (history shows it).
    pub by: Option<&'a Principal>,
}

/// Who asks for a write: recorded in the change as `by` (name) and `from` (client address).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    pub name: String,
    pub from: Option<String>,
}

/// The result of a write: the entity as it now reads, whether the document changed, and the
/// secret values it wrote (field, value): the document holds only their references
/// ([`crdt_schema::secret`]), the store keeps the values.
pub struct Outcome {
    pub state: EntityState,
    pub changed: bool,
    pub secrets: Vec<(String, String)>,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret values.
        f.debug_struct("Outcome")
            .field("state", &self.state)
            .field("changed", &self.changed)
            .field(
                "secrets",
                &self.secrets.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Accepts both a bare fields object and the wrapped form every read returns
/// (`{"kind", "name", "fields", ...}`), so `get | edit | put` works. Read-only fields of a wrapped
/// body are dropped: they are derived, and echoing them back is not an attempt to write them.
fn unwrap_body(kind: Kind, body: &Value) -> Value {
    if let Some(o) = body.as_object() {
        let wrapper_keys = ["kind", "name", "fields", "secrets_set", "conflicts"];
        if let Some(Value::Object(fields)) = o.get("fields") {
            if o.keys().all(|k| wrapper_keys.contains(&k.as_str())) {
                let mut f = fields.clone();
                f.retain(|k, _| !kind.field(k).is_some_and(|f| f.read_only));
                return Value::Object(f);
            }
        }
    }
    body.clone()
}

pub fn execute(
    doc: &mut AutoCommit,
    kind: Kind,
    name: &str,
    op: &Op,
    world: &dyn World,
    ctx: &Context<'_>,
) -> Result<Outcome, WriteError> {
    crdt_schema::validate_name(kind, name)?;
    let internal = |e: automerge::AutomergeError| WriteError::Internal(e.to_string());
    let current = doc::read_mut(doc, kind, name).map_err(internal)?;
    let not_found = || WriteError::NotFound {
        kind,
        name: name.to_string(),
    };
    let (alive, mut values) = match op {
        Op::Put(body) => {
            let body = unwrap_body(kind, body);
            let v = crdt_schema::validate_write(kind, &body, WriteMode::Put, current.alive)?;
            (Some(true), v)
        }
        Op::Patch(body) => {
            // A singleton (settings, security) always exists: a patch of one never written
            // creates it from the defaults.
            let create = !current.alive && kind.singleton().is_some();
            if !current.alive && !create {
                return Err(not_found());
            }
            let body = unwrap_body(kind, body);
            (
                create.then_some(true),
                crdt_schema::validate_write(kind, &body, WriteMode::Patch, true)?,
            )
        }
        Op::Delete => {
            if !current.alive {
                return Err(not_found());
            }
            // A deleted entity keeps no secret: its values are forgotten on every node.
            let resets = kind
                .fields()
                .iter()
                .filter(|f| f.secret && current.secrets_set.iter().any(|s| s == f.name))
                .map(|f| (f, FieldValue::Reset))
                .collect();
            (Some(false), resets)
        }
    };
    check_references(kind, &values, world)?;
    let after = view_after(&current, &values);
    check_entity(kind, &after)?;
    if kind == Kind::Admin && current.alive {
        // The last enabled SuperAdmin stays one: no write leaves the cluster without (as far as
        // this node knows; two nodes cut off from each other can still each demote one, which
        // `peerconf admin reset` repairs).
        let before = enabled_superadmin(&view_after(&current, &[]));
        let stays = alive != Some(false) && enabled_superadmin(&after);
        if before && !stays && !world.enabled_superadmins()?.iter().any(|n| n != name) {
            return Err(WriteError::LastSuperAdmin {
                name: name.to_string(),
            });
        }
    }
    for (field, value) in values.iter_mut() {
        if let FieldValue::Secret(clear) = value {
            if field.name == "password" {
                // The schema normalized it (NFKC) and refused one with nothing visible; the
                // policy counts what shows, so padding with spaces or invisible characters
                // does not make a password long enough.
                let clear = crdt_schema::normalize_password(clear);
                let min = world.password_min_length()?;
                let visible = crdt_schema::visible_len(&clear);
                if visible < min {
                    return Err(SchemaError::Constraint {
                        kind,
                        field: field.name.into(),
                        value: format!("(secret, {visible} visible characters)"),
                        rule: format!(
                            "must have at least {min} visible characters after Unicode NFKC normalization; whitespace and invisible characters do not count (security.password_min_length)"
                        ),
                    }
                    .into());
                }
                *value = FieldValue::Secret(hash_password(&clear, &ctx.salt)?);
            }
        }
    }
    // The document gets each secret's reference; the value goes to the store beside it.
    let doc_id = crdt_schema::doc_id(kind, name);
    let mut secrets = Vec::new();
    for (field, value) in values.iter_mut() {
        if let FieldValue::Secret(v) = value {
            let r = crdt_schema::secret::secret_ref(&doc_id, field.name, v);
            secrets.push((field.name.to_string(), std::mem::replace(v, r)));
        }
    }
    let note = ChangeNote {
        node: ctx.node_id.to_string(),
        op: op.name().to_string(),
        fields: Vec::new(),
        by: ctx.by.map(|p| p.name.clone()),
        from: ctx.by.and_then(|p| p.from.clone()),
    };
    let edit = Edit {
        alive,
        values: &values,
    };
    let written = match doc::apply(doc, kind, &edit, &note, ctx.wall_ms) {
        Ok(w) => w,
        Err(e) => {
            doc.rollback();
            return Err(internal(e));
        }
    };
    let state = if written.is_empty() {
        current
    } else {
        doc::read(doc, kind, name).map_err(internal)?
    };
    let changed = !written.is_empty();
    if !changed {
        secrets.clear();
    }
    Ok(Outcome {
        state,
        changed,
        secrets,
    })
}

fn check_references(
    kind: Kind,
    values: &[(&'static Field, FieldValue)],
    world: &dyn World,
) -> Result<(), WriteError> {
    for (field, value) in values {
        let Some(target_kind) = field.references() else {
            continue;
        };
        let names: Vec<&String> = match value {
            FieldValue::Str(s) => vec![s],
            FieldValue::Set(s) => s.iter().collect(),
            _ => vec![],
        };
        for target in names {
            if !world.exists(target_kind, target)? {
                return Err(WriteError::MissingReference {
                    kind,
                    field: field.name.into(),
                    target_kind,
                    target: target.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The public fields as they would read after the write (for rules across fields).
fn view_after(
    current: &EntityState,
    values: &[(&'static Field, FieldValue)],
) -> Map<String, Value> {
    let mut view = if current.alive {
        current.fields.clone()
    } else {
        Map::new()
    };
    for f in current.kind.fields() {
        if let (false, Some(d)) = (view.contains_key(f.name), f.default.to_json()) {
            view.insert(f.name.into(), d);
        }
    }
    for (field, value) in values {
        let v = match value {
            FieldValue::Reset => field.default.to_json(),
            FieldValue::Bool(b) => Some(Value::Bool(*b)),
            FieldValue::Int(i) => Some(Value::from(*i)),
            FieldValue::Str(s) | FieldValue::Text(s) => Some(Value::String(s.clone())),
            FieldValue::Set(s) => {
                Some(Value::Array(s.iter().cloned().map(Value::String).collect()))
            }
            FieldValue::Secret(_) => continue,
        };
        match v {
            Some(v) => view.insert(field.name.into(), v),
            None => view.remove(field.name),
        };
    }
    view
}

/// argon2id with the library's default cost, in PHC string form.
fn hash_password(clear: &str, salt: &[u8; 16]) -> Result<String, WriteError> {
    use argon2::PasswordHasher;
    argon2::Argon2::default()
        .hash_password_with_salt(clear.as_bytes(), salt)
        .map(|h: argon2::PasswordHash| h.to_string())
        .map_err(|e| WriteError::Internal(format!("password hash: {e}")))
}

/// A valid argon2 hash no password is known for: a login for an account that does not exist is
/// checked against it, so it costs what a wrong password costs.
pub fn decoy_password_hash() -> String {
    hash_password("decoy: no account has this password", &[0x5a; 16]).unwrap_or_default()
}

/// Checks a clear-text password against a stored hash (for the embedding server's logins). The
/// password is normalized as it was when it was set (NFKC); a hash stored before passwords were
/// normalized is checked against the password as typed too.
pub fn verify_password(clear: &str, stored_hash: &str) -> bool {
    use argon2::PasswordVerifier;
    let Ok(h) = argon2::PasswordHash::new(stored_hash) else {
        return false;
    };
    let check = |pw: &str| {
        argon2::Argon2::default()
            .verify_password(pw.as_bytes(), &h)
            .is_ok()
    };
    let normalized = crdt_schema::normalize_password(clear);
    check(&normalized) || (normalized != clear && check(clear))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A world where nothing else exists and the password policy is `min`.
    struct Policy(usize);

    impl World for Policy {
        fn exists(&self, _: Kind, _: &str) -> Result<bool, WriteError> {
            Ok(false)
        }
        fn enabled_superadmins(&self) -> Result<Vec<String>, WriteError> {
            Ok(Vec::new())
        }
        fn password_min_length(&self) -> Result<usize, WriteError> {
            Ok(self.0)
        }
    }

    fn put_password(pw: &str, min: usize) -> (AutoCommit, Result<Outcome, WriteError>) {
        let mut d = doc::genesis(Kind::Admin);
        d.set_actor(automerge::ActorId::from(vec![7u8; 16]));
        let ctx = Context {
            node_id: "n",
            wall_ms: 1,
            salt: [3u8; 16],
            by: None,
        };
        let r = execute(
            &mut d,
            Kind::Admin,
            "root",
            &Op::Put(json!({ "password": pw })),
            &Policy(min),
            &ctx,
        );
        (d, r)
    }

    /// The minimum length counts visible characters after NFKC: spaces and invisible characters
    /// pad nothing, and a refusal changes nothing and shows nothing of the password.
    #[test]
    fn password_length_counts_visible_characters() {
        for pw in [
            "abc   \u{200B}\u{200B}\u{FEFF}",
            "  a b c  ",
            "ab\u{2060}\u{2060}\u{2060}\u{2060}c",
        ] {
            let (mut d, r) = put_password(pw, 4);
            let e = r.expect_err(pw);
            let msg = e.to_string();
            assert!(msg.contains("admin.password"), "{msg}");
            assert!(msg.contains("at least 4 visible characters"), "{msg}");
            assert!(msg.contains("3 visible"), "{msg}");
            assert!(!msg.contains("abc") && !msg.contains("a b c"), "{msg}");
            assert_eq!(
                d.get_heads(),
                doc::genesis(Kind::Admin).get_heads(),
                "a refused write changed the document"
            );
        }
        let (_, r) = put_password("abcd", 4);
        r.expect("4 visible characters meet a minimum of 4");
    }

    /// The hash is of the normalized password: its full-width or decomposed spellings log in.
    #[test]
    fn a_password_verifies_in_every_spelling() {
        let (mut d, r) = put_password("caf\u{e9}-ｐａｓｓ", 4);
        let outcome = r.expect("accepted");
        let [(field, hash)] = &outcome.secrets[..] else {
            panic!("one secret written: {outcome:?}")
        };
        assert_eq!(field, "password");
        // The document holds only the hash's reference, in its whole history.
        let r = crdt_schema::secret::current_ref(&d, "password").expect("a reference");
        assert_eq!(
            r,
            crdt_schema::secret::secret_ref("admin/root", "password", hash)
        );
        for c in d.get_changes(&[]) {
            assert_eq!(
                crdt_schema::secret::change_puts_value(&c, Kind::Admin),
                None
            );
        }
        assert!(
            hash.starts_with("$argon2id$"),
            "not a hash: stored as given"
        );
        assert!(verify_password("caf\u{e9}-pass", hash));
        assert!(verify_password("cafe\u{301}-ｐａｓｓ", hash));
        assert!(!verify_password("cafe-pass", hash));
        // A hash of a password that was not normalized when it was set still verifies.
        let old = hash_password("ｐａｓｓ", &[1u8; 16]).expect("hash");
        assert!(verify_password("ｐａｓｓ", &old));
    }
}
