//! Typed views of every kind, for servers that embed peerconf. Each struct deserializes from the
//! `fields` object of an entity as served by every read path (secrets are never part of it).
//! A test checks that each struct names exactly the public fields of its kind.

use crate::Kind;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeSet;

/// A typed entity: its kind is known at compile time.
pub trait Entity: DeserializeOwned + Serialize + Default {
    const KIND: Kind;
}

macro_rules! entity {
    ($(#[$m:meta])* $name:ident, $kind:expr, { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name { $($(#[$fm])* pub $field: $ty),* }
        impl Entity for $name { const KIND: Kind = $kind; }
    };
}

entity!(
    /// A virtual site.
    Site, Kind::Site, {
    enabled: bool,
    protocols: BTreeSet<String>,
    bindings: BTreeSet<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    root_dir: Option<String>,
    max_sessions: i64,
    idle_timeout_s: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<String>,
    description: String,
});

entity!(
    /// A file-transfer user. The password is write-only and never part of this view.
    User, Kind::User, {
    enabled: bool,
    public_keys: BTreeSet<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    home_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    groups: BTreeSet<String>,
    permissions: BTreeSet<String>,
    allowed_ips: BTreeSet<String>,
    quota_bytes: i64,
    max_sessions: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    description: String,
});

entity!(
    /// A group of users.
    Group, Kind::Group, {
    description: String,
    permissions: BTreeSet<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    home_dir: Option<String>,
    allowed_ips: BTreeSet<String>,
});

entity!(
    /// An Admin or SuperAdmin account.
    Admin, Kind::Admin, {
    role: String,
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
});

entity!(
    /// The global settings.
    Settings, Kind::Settings, {
    heartbeat_interval_ms: i64,
    offline_timeout_ms: i64,
    clock_drift_warn_ms: i64,
    join_clock_offset_max_ms: i64,
    replication_interval_ms: i64,
    banner: String,
    session_timeout_s: i64,
    log_level: String,
    max_connections_per_ip: i64,
});

entity!(
    /// A certificate; the private key is write-only and never part of this view.
    Certificate, Kind::Certificate, {
    cert_pem: String,
    description: String,
    #[serde(skip_serializing)]
    subject: String,
    #[serde(skip_serializing)]
    not_after: String,
    #[serde(skip_serializing)]
    fingerprint: String,
});

entity!(
    /// The global security policy.
    Security, Kind::Security, {
    min_tls_version: String,
    allowed_ciphers: BTreeSet<String>,
    password_min_length: i64,
    max_login_attempts: i64,
    lockout_duration_s: i64,
    session_idle_timeout_s: i64,
    session_max_life_s: i64,
    ip_blocklist: BTreeSet<String>,
});

entity!(
    /// A script.
    Script, Kind::Script, {
    language: String,
    source: String,
    description: String,
});

entity!(
    /// An automation rule.
    Rule, Kind::Rule, {
    event: String,
    condition: String,
    script: String,
    enabled: bool,
    priority: i64,
    description: String,
});

/// The value of a singleton kind (`settings`, `security`) from the `fields` object of its entity
/// as read. Fields absent (never written, or `None` for the whole entity) take the schema's
/// defaults; a value that does not fit the typed view falls back to the defaults whole. The
/// defaults are stated once, in the field table; nothing else restates them.
pub fn singleton<T: Entity>(fields: Option<&serde_json::Value>) -> T {
    let mut all = default_fields(T::KIND);
    if let (Some(serde_json::Value::Object(given)), serde_json::Value::Object(base)) =
        (fields, &mut all)
    {
        for (k, v) in given {
            base.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(all).unwrap_or_else(|_| schema_defaults())
}

/// A kind's value with every field at its schema default (what a never-written singleton reads
/// as).
pub fn schema_defaults<T: Entity>() -> T {
    serde_json::from_value(default_fields(T::KIND)).unwrap_or_default()
}

fn default_fields(kind: Kind) -> serde_json::Value {
    let d = crate::doc::genesis(kind);
    let name = kind.singleton().unwrap_or("defaults");
    crate::doc::read(&d, kind, name)
        .map(|s| s.to_json()["fields"].clone())
        .unwrap_or_default()
}
