//! The peerconf data model: entity kinds, their fields, merge semantics, validation and the
//! Automerge document layout every node agrees on.
//!
//! This crate is pure: it never touches a socket, a file, a clock or a random number generator.
//! Everything that needs time (change timestamps) or randomness (password salts) is passed in.
//!
//! # Merge laws
//!
//! Every entity is one Automerge document whose ID is derived from `(kind, name)` and whose first
//! change ([`doc::genesis`]) is byte-identical on every node. Merging two replicas is therefore
//! Automerge's merge, which is commutative, associative and idempotent; the property tests in
//! `tests/merge_laws.rs` check those three laws for random edit sequences of every kind.
//!
//! Field merge semantics:
//! - [`Merge::Register`]: last writer by (Lamport counter, actor) wins; concurrent values stay
//!   visible as conflicts until a later write overwrites them.
//! - [`Merge::AddWinsSet`]: a map of `item -> true`; an add concurrent with a remove survives.
//! - [`Merge::Text`]: Automerge text; concurrent edits to different parts all survive.

pub mod doc;
mod fields;
mod keys;
pub mod secret;
pub mod testing;
pub mod typed;
mod validate;

pub use fields::{Default, Field, Format, Item, Merge, Type};
pub use keys::{check_key_matches_cert, check_private_key, KeyError};
pub use validate::{
    cert_info, check_entity, normalize_password, validate_name, validate_write, visible_len,
    FieldValue, SchemaError, WriteMode,
};

use serde::{Deserialize, Serialize};

/// Version of the schema. Bumped on any change to kinds, fields or the document layout; served to
/// admin tools and checked by peers.
pub const SCHEMA_VERSION: u32 = 2;

/// Longest entity name accepted, in bytes: names are document IDs and keys in every index.
pub const NAME_LEN_MAX: usize = 128;

/// The kinds of configuration entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Site,
    User,
    Group,
    Admin,
    Settings,
    Certificate,
    Security,
    Script,
    Rule,
    #[serde(rename = "api_token")]
    ApiToken,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Site,
        Kind::User,
        Kind::Group,
        Kind::Admin,
        Kind::Settings,
        Kind::Certificate,
        Kind::Security,
        Kind::Script,
        Kind::Rule,
        Kind::ApiToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Site => "site",
            Kind::User => "user",
            Kind::Group => "group",
            Kind::Admin => "admin",
            Kind::Settings => "settings",
            Kind::Certificate => "certificate",
            Kind::Security => "security",
            Kind::Script => "script",
            Kind::Rule => "rule",
            Kind::ApiToken => "api_token",
        }
    }

    /// Parses a kind name; the error lists the valid kinds.
    pub fn parse(s: &str) -> Result<Kind, SchemaError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| SchemaError::UnknownKind {
                kind: s.to_string(),
            })
    }

    /// Singleton kinds hold exactly one entity, whose name is returned here.
    pub fn singleton(self) -> Option<&'static str> {
        match self {
            Kind::Settings | Kind::Security => Some("global"),
            _ => None,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Kind::Site => "a virtual site: protocols, listening bindings and a root directory",
            Kind::User => "an account of a file-transfer client",
            Kind::Group => "a set of users sharing permissions and a home directory",
            Kind::Admin => "an Admin or SuperAdmin account of the management interface",
            Kind::Settings => "server-wide and cluster-wide settings (one entity: global)",
            Kind::Certificate => "an X.509 certificate and its private key, for FTPS and HTTPS",
            Kind::Security => "security policy (one entity: global)",
            Kind::Script => "a script run by automation rules",
            Kind::Rule => "an automation rule: on an event, if a condition holds, run a script",
            Kind::ApiToken => {
                "an admin's API token: only its hash is stored; made and revoked through /v1/api-tokens"
            }
        }
    }

    /// Every field of this kind, in a stable order.
    pub fn fields(self) -> &'static [Field] {
        fields::fields_of(self)
    }

    pub fn field(self, name: &str) -> Option<&'static Field> {
        self.fields().iter().find(|f| f.name == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = SchemaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::parse(s)
    }
}

/// The document ID of an entity: derived from its kind and name, so two nodes that create the same
/// name create the same document.
pub fn doc_id(kind: Kind, name: &str) -> String {
    format!("{}/{}", kind.as_str(), name)
}

/// Splits a document ID back into kind and name.
pub fn parse_doc_id(id: &str) -> Result<(Kind, &str), SchemaError> {
    let (k, n) = id.split_once('/').ok_or_else(|| SchemaError::InvalidName {
        kind: String::new(),
        name: id.to_string(),
        reason: "a document ID has the form KIND/NAME".into(),
    })?;
    let kind = Kind::parse(k)?;
    validate_name(kind, n)?;
    Ok((kind, n))
}

/// The schema as JSON, served to admin tools (`peerconf schema`).
pub fn schema_json(kind: Option<Kind>) -> serde_json::Value {
    let kinds: Vec<Kind> = match kind {
        Some(k) => vec![k],
        None => Kind::ALL.to_vec(),
    };
    let kinds_json: Vec<serde_json::Value> = kinds
        .into_iter()
        .map(|k| {
            serde_json::json!({
                "kind": k.as_str(),
                "description": k.description(),
                "singleton": k.singleton(),
                "fields": k.fields().iter().map(Field::to_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "version": SCHEMA_VERSION, "kinds": kinds_json })
}
