//! Validation of writes against the schema. Every error names the kind, the field, the value and
//! the rule it broke; validation never changes anything.
//!
//! The value of a secret field (`secret: true`: passwords, private keys) is never part of an
//! error, whatever the variant: errors about one name the field, the type of what was given and
//! the rule, and show the value as `(secret)`.

use crate::{Field, Format, Item, Kind, Type, NAME_LEN_MAX};
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

/// Why a write was refused. Each variant leaves every stored entity exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown kind {kind:?}: expected one of site, user, group, admin, settings, certificate, security, script, rule")]
    UnknownKind { kind: String },
    #[error("{kind}: invalid name {name:?}: {reason}")]
    InvalidName {
        kind: String,
        name: String,
        reason: String,
    },
    #[error("{kind}: the body must be a JSON object of fields, got {got}")]
    NotAnObject { kind: Kind, got: String },
    #[error("{kind}.{field}: unknown field (known: {known})")]
    UnknownField {
        kind: Kind,
        field: String,
        known: String,
    },
    #[error("{kind}.{field}: wrong type: expected {expected}, got {got}")]
    WrongType {
        kind: Kind,
        field: String,
        expected: String,
        got: String,
    },
    #[error("{kind}.{field}: value {value} breaks the rule: {rule}")]
    Constraint {
        kind: Kind,
        field: String,
        value: String,
        rule: String,
    },
    #[error("{kind}.{field}: required field is missing")]
    Missing { kind: Kind, field: String },
    #[error("{kind}.{field}: read-only field (derived from other fields), it cannot be written")]
    ReadOnly { kind: Kind, field: String },
}

impl SchemaError {
    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            SchemaError::UnknownField { field, .. }
            | SchemaError::WrongType { field, .. }
            | SchemaError::Constraint { field, .. }
            | SchemaError::Missing { field, .. }
            | SchemaError::ReadOnly { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// A validated field value, ready to be written into a document. Its `Debug` form never shows a
/// secret.
#[derive(Clone, PartialEq, Eq)]
pub enum FieldValue {
    /// Back to the field's default (the key is removed from the document).
    Reset,
    Bool(bool),
    Int(i64),
    Str(String),
    Set(BTreeSet<String>),
    Text(String),
    /// A secret in clear text: the caller turns it into what is stored (a password hash, or the
    /// key itself) and must never log it.
    Secret(String),
}

impl std::fmt::Debug for FieldValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldValue::Reset => f.write_str("Reset"),
            FieldValue::Bool(b) => f.debug_tuple("Bool").field(b).finish(),
            FieldValue::Int(i) => f.debug_tuple("Int").field(i).finish(),
            FieldValue::Str(s) => f.debug_tuple("Str").field(s).finish(),
            FieldValue::Set(s) => f.debug_tuple("Set").field(s).finish(),
            FieldValue::Text(s) => f.debug_tuple("Text").field(s).finish(),
            FieldValue::Secret(_) => f.write_str("Secret(<redacted>)"),
        }
    }
}

/// Put replaces the whole entity; Patch (JSON merge patch) changes only the fields it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Put,
    Patch,
}

/// Checks an entity name: 1 to 128 bytes of `[A-Za-z0-9_.@+-]`, not starting with `.` or `-`;
/// singleton kinds accept only their one name.
pub fn validate_name(kind: Kind, name: &str) -> Result<(), SchemaError> {
    let bad = |reason: String| SchemaError::InvalidName {
        kind: kind.as_str().into(),
        name: name.into(),
        reason,
    };
    if let Some(only) = kind.singleton() {
        if name != only {
            return Err(bad(format!("{kind} has a single entity named {only:?}")));
        }
        return Ok(());
    }
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Err(bad(format!("must be 1 to {NAME_LEN_MAX} bytes long")));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(bad("must not start with '.' or '-'".into()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.@+-".contains(*c)))
    {
        return Err(bad(format!(
            "character {c:?} is not allowed (letters, digits and _ . @ + - are)"
        )));
    }
    Ok(())
}

/// Validates the fields of a write. `exists` says whether the entity exists now (a put that
/// creates must name every required field).
///
/// Put: every non-secret field not named is reset to its default; a secret not named keeps its
/// stored value (so a read-modify-write never wipes a password), and `null` clears it.
/// Patch: only the named fields change; `null` resets one to its default.
pub fn validate_write(
    kind: Kind,
    body: &Value,
    mode: WriteMode,
    exists: bool,
) -> Result<Vec<(&'static Field, FieldValue)>, SchemaError> {
    let obj = body.as_object().ok_or_else(|| SchemaError::NotAnObject {
        kind,
        got: type_name(body).into(),
    })?;
    for key in obj.keys() {
        match kind.field(key) {
            None => {
                return Err(SchemaError::UnknownField {
                    kind,
                    field: key.clone(),
                    known: kind
                        .fields()
                        .iter()
                        .filter(|f| !f.read_only)
                        .map(|f| f.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
            Some(f) if f.read_only => {
                return Err(SchemaError::ReadOnly {
                    kind,
                    field: key.clone(),
                })
            }
            Some(_) => {}
        }
    }
    let mut out = Vec::new();
    for field in kind.fields().iter().filter(|f| !f.read_only) {
        let given = obj.get(field.name);
        let missing = || SchemaError::Missing {
            kind,
            field: field.name.into(),
        };
        match given {
            None | Some(Value::Null) if field.required => {
                // A put of an existing entity keeps its secret; everything else must be named.
                let kept_secret =
                    field.secret && given.is_none() && exists && mode == WriteMode::Put;
                if mode == WriteMode::Put && !kept_secret || given.is_some() {
                    return Err(missing());
                }
            }
            None if mode == WriteMode::Patch || field.secret => {}
            None | Some(Value::Null) => out.push((field, FieldValue::Reset)),
            Some(v) => out.push((field, check_value(kind, field, v)?)),
        }
    }
    check_together(kind, obj)?;
    Ok(out)
}

/// Rules that tie fields of one write together.
fn check_together(kind: Kind, obj: &Map<String, Value>) -> Result<(), SchemaError> {
    if kind == Kind::Certificate && obj.contains_key("cert_pem") != obj.contains_key("key_pem") {
        let (given, other) = if obj.contains_key("cert_pem") {
            ("cert_pem", "key_pem")
        } else {
            ("key_pem", "cert_pem")
        };
        return Err(SchemaError::Missing {
            kind,
            field: format!(
                "{other} (cert_pem and key_pem are written together; {given} was given)"
            ),
        });
    }
    if kind == Kind::Certificate {
        // Each was checked on its own already; here the key must be the certificate's.
        if let (Some(Value::String(cert)), Some(Value::String(key)), Some(field)) = (
            obj.get("cert_pem"),
            obj.get("key_pem"),
            kind.field("key_pem"),
        ) {
            crate::keys::check_key_matches_cert(key, cert).map_err(|e| {
                constraint(
                    kind,
                    field,
                    key,
                    format!("must be the private key of cert_pem: {e}"),
                )
            })?;
        }
    }
    Ok(())
}

/// Rules across the fields of a whole entity, checked on the entity as it would be after a write
/// (`view` holds every public field with defaults filled in).
pub fn check_entity(kind: Kind, view: &Map<String, Value>) -> Result<(), SchemaError> {
    if kind == Kind::Settings {
        let hb = view.get("heartbeat_interval_ms").and_then(Value::as_i64);
        let off = view.get("offline_timeout_ms").and_then(Value::as_i64);
        if let (Some(hb), Some(off)) = (hb, off) {
            if off < 2 * hb {
                return Err(SchemaError::Constraint {
                    kind,
                    field: "offline_timeout_ms".into(),
                    value: off.to_string(),
                    rule: format!(
                        "must be at least twice heartbeat_interval_ms ({hb}), or one late heartbeat marks a node offline"
                    ),
                });
            }
        }
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number with a fraction",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}...", &s[..s.floor_char_boundary(77)])
    } else {
        s
    }
}

/// What an error shows of a value: itself (shortened), or `(secret)` for a secret field.
fn shown(field: &Field, value: impl FnOnce() -> String) -> String {
    if field.secret {
        SECRET_SHOWN.into()
    } else {
        value()
    }
}

/// How an error shows the value of a secret field.
const SECRET_SHOWN: &str = "(secret)";

fn wrong(kind: Kind, field: &Field, expected: impl Into<String>, got: &Value) -> SchemaError {
    SchemaError::WrongType {
        kind,
        field: field.name.into(),
        expected: expected.into(),
        got: format!("{} {}", type_name(got), shown(field, || show(got))),
    }
}

/// A broken rule. `rule` must not quote the value (it is shown here, or hidden for a secret).
fn constraint(kind: Kind, field: &Field, value: &str, rule: impl Into<String>) -> SchemaError {
    SchemaError::Constraint {
        kind,
        field: field.name.into(),
        value: shown(field, || show(&Value::String(value.to_string()))),
        rule: rule.into(),
    }
}

/// A broken rule about a value's size or range: the value shown is `what` (a count, a number),
/// still hidden for a secret field.
fn constraint_shown(kind: Kind, field: &Field, what: String, rule: String) -> SchemaError {
    SchemaError::Constraint {
        kind,
        field: field.name.into(),
        value: shown(field, || what),
        rule,
    }
}

/// The rule a name broke, for a field holding a name: the name's own error quotes the name, so
/// a secret field gets the rule alone.
fn name_rule(field: &Field, target: Kind, e: &SchemaError) -> String {
    match e {
        SchemaError::InvalidName { reason, .. } if field.secret => {
            format!("must be the name of a {target}: {reason}")
        }
        other => other.to_string(),
    }
}

fn check_value(kind: Kind, field: &Field, v: &Value) -> Result<FieldValue, SchemaError> {
    match field.ty {
        Type::Bool => v
            .as_bool()
            .map(FieldValue::Bool)
            .ok_or_else(|| wrong(kind, field, "a boolean", v)),
        Type::Int { min, max } => {
            let i = v
                .as_i64()
                .ok_or_else(|| wrong(kind, field, "an integer", v))?;
            if i < min || i > max {
                return Err(constraint_shown(
                    kind,
                    field,
                    i.to_string(),
                    if max == i64::MAX {
                        format!("must be >= {min}")
                    } else {
                        format!("must be between {min} and {max}")
                    },
                ));
            }
            Ok(FieldValue::Int(i))
        }
        Type::Str { max_len, format } => {
            let s = v
                .as_str()
                .ok_or_else(|| wrong(kind, field, "a string", v))?;
            let s = check_str(kind, field, s, max_len, format)?;
            Ok(if field.secret {
                FieldValue::Secret(s)
            } else {
                FieldValue::Str(s)
            })
        }
        Type::Enum(values) => {
            let s = v
                .as_str()
                .ok_or_else(|| wrong(kind, field, format!("one of {values:?}"), v))?;
            if !values.contains(&s) {
                return Err(constraint(
                    kind,
                    field,
                    s,
                    format!("must be one of {values:?}"),
                ));
            }
            Ok(FieldValue::Str(s.into()))
        }
        Type::Ref(target) => {
            let s = v
                .as_str()
                .ok_or_else(|| wrong(kind, field, format!("the name of a {target}"), v))?;
            validate_name(target, s)
                .map_err(|e| constraint(kind, field, s, name_rule(field, target, &e)))?;
            Ok(FieldValue::Str(s.into()))
        }
        Type::Set { item, max_items } => {
            let arr = v
                .as_array()
                .ok_or_else(|| wrong(kind, field, "an array (a set)", v))?;
            if arr.len() > max_items {
                return Err(constraint_shown(
                    kind,
                    field,
                    format!("{} items", arr.len()),
                    format!("at most {max_items} items"),
                ));
            }
            let mut set = BTreeSet::new();
            for x in arr {
                let s = x
                    .as_str()
                    .ok_or_else(|| wrong(kind, field, "an array of strings", x))?;
                let s = match item {
                    Item::Enum(values) => {
                        if !values.contains(&s) {
                            return Err(constraint(
                                kind,
                                field,
                                s,
                                format!("each item must be one of {values:?}"),
                            ));
                        }
                        s.to_string()
                    }
                    Item::Str { max_len, format } => check_str(kind, field, s, max_len, format)?,
                    Item::Ref(target) => {
                        validate_name(target, s).map_err(|e| {
                            constraint(kind, field, s, name_rule(field, target, &e))
                        })?;
                        s.to_string()
                    }
                };
                set.insert(s);
            }
            Ok(FieldValue::Set(set))
        }
        Type::Text { max_len } => {
            let s = v
                .as_str()
                .ok_or_else(|| wrong(kind, field, "a string", v))?;
            if s.len() > max_len {
                return Err(constraint_shown(
                    kind,
                    field,
                    format!("{} bytes", s.len()),
                    format!("at most {max_len} bytes"),
                ));
            }
            Ok(FieldValue::Text(s.into()))
        }
    }
}

/// Checks a string against its format and returns its canonical form.
fn check_str(
    kind: Kind,
    field: &Field,
    s: &str,
    max_len: usize,
    format: Format,
) -> Result<String, SchemaError> {
    let err = |rule: &str| constraint(kind, field, s, rule);
    let too_long = |len: usize| {
        constraint_shown(
            kind,
            field,
            format!("{len} bytes"),
            format!("at most {max_len} bytes"),
        )
    };
    if s.len() > max_len {
        return Err(too_long(s.len()));
    }
    let multi_line = matches!(format, Format::Any | Format::CertPem | Format::KeyPem);
    if s.chars()
        .any(|c| c.is_control() && !(multi_line && (c == '\n' || c == '\t' || c == '\r')))
    {
        return Err(err("control characters are not allowed"));
    }
    match format {
        Format::Any => Ok(s.into()),
        Format::AbsPath => {
            let windows =
                s.len() >= 3 && s.as_bytes()[0].is_ascii_alphabetic() && &s[1..3] == ":\\";
            if !(s.starts_with('/') || windows) {
                return Err(err(
                    "must be an absolute path (start with / or a drive like C:\\)",
                ));
            }
            if s.split(['/', '\\']).any(|part| part == "..") {
                return Err(err("must not contain '..'"));
            }
            Ok(s.into())
        }
        Format::Email => {
            let ok = s.split_once('@').is_some_and(|(l, d)| {
                !l.is_empty()
                    && d.contains('.')
                    && !d.starts_with('.')
                    && !d.ends_with('.')
                    && !d.contains('@')
                    && !s.contains(char::is_whitespace)
            });
            if !ok {
                return Err(err("must be an email address like name@example.com"));
            }
            Ok(s.into())
        }
        Format::Cidr => canonical_cidr(s).ok_or_else(|| {
            err("must be an IP address or CIDR block like 10.0.0.0/8 or 2001:db8::/32")
        }),
        Format::Binding => canonical_binding(s).ok_or_else(|| {
            err("must be address:port with a port from 1 to 65535, like 0.0.0.0:22 or [::]:22")
        }),
        Format::SshKey => {
            let mut parts = s.split_whitespace();
            let ty = parts.next().unwrap_or("");
            let body = parts.next().unwrap_or("");
            let known =
                ty.starts_with("ssh-") || ty.starts_with("ecdsa-sha2-") || ty.starts_with("sk-");
            let b64 = !body.is_empty()
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
            if !known || !b64 {
                return Err(err(
                    "must be an OpenSSH public key line: TYPE BASE64 [COMMENT], e.g. ssh-ed25519 AAAA... user@host",
                ));
            }
            Ok(s.trim().into())
        }
        Format::CertPem => {
            cert_info(s).map_err(|why| err(&format!("must be a PEM X.509 certificate: {why}")))?;
            Ok(s.into())
        }
        Format::KeyPem => {
            crate::keys::check_private_key(s).map_err(|e| {
                err(&format!(
                    "must be a PEM private key (-----BEGIN ... PRIVATE KEY-----): {e}"
                ))
            })?;
            Ok(s.into())
        }
        Format::Password => {
            if s.trim().is_empty() {
                return Err(err("must not be empty or only whitespace"));
            }
            let normalized = normalize_password(s);
            if normalized.len() > max_len {
                return Err(too_long(normalized.len()));
            }
            if normalized.trim().is_empty() || visible_len(&normalized) == 0 {
                return Err(err(
                    "must hold visible characters: whitespace, control and invisible format characters (such as U+200B or U+FEFF) do not count",
                ));
            }
            Ok(normalized)
        }
        Format::Token => {
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b))
            {
                return Err(err("must be letters, digits and _ . + -"));
            }
            Ok(s.into())
        }
    }
}

/// A password as it is hashed and checked: Unicode NFKC, so that one password typed in
/// different forms (composed or decomposed accents, full-width letters) is one password.
pub fn normalize_password(clear: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    clear.nfkc().collect()
}

/// Characters of `s` that show: not whitespace, not control characters, not format or other
/// default-ignorable (invisible) characters. What the password length policy counts.
pub fn visible_len(s: &str) -> usize {
    s.chars().filter(|&c| !invisible(c)).count()
}

/// Whitespace, control characters, and characters that render as nothing: Unicode's format
/// characters (category Cf) and default-ignorable code points, and blank fillers.
fn invisible(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{115F}'..='\u{1160}'
                | '\u{17B4}'..='\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{FFF0}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E0FFF}'
        )
}

fn canonical_cidr(s: &str) -> Option<String> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
            p.parse::<u8>().ok()?
        }
        Some(_) => return None,
        None => max,
    };
    (prefix <= max).then(|| format!("{ip}/{prefix}"))
}

fn canonical_binding(s: &str) -> Option<String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return (addr.port() != 0).then(|| addr.to_string());
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    (port != 0 && host_ok).then(|| format!("{}:{port}", host.to_ascii_lowercase()))
}

/// What is derived from a certificate: subject, end of validity (RFC 3339) and SHA-256
/// fingerprint of the DER encoding.
pub fn cert_info(pem: &str) -> Result<(String, String, String), String> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| format!("bad PEM: {e}"))?;
    if block.label != "CERTIFICATE" {
        return Err(format!("PEM block is {:?}, not CERTIFICATE", block.label));
    }
    let cert = block
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let subject = cert.subject().to_string();
    let not_after = cert.validity().not_after.to_datetime();
    let not_after = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        not_after.year(),
        u8::from(not_after.month()),
        not_after.day(),
        not_after.hour(),
        not_after.minute(),
        not_after.second()
    );
    use sha2::Digest;
    let fp = hex::encode(sha2::Sha256::digest(&block.contents));
    Ok((subject, not_after, fp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_forms() {
        assert_eq!(canonical_cidr("10.0.0.1").as_deref(), Some("10.0.0.1/32"));
        assert_eq!(
            canonical_cidr("2001:DB8::/32").as_deref(),
            Some("2001:db8::/32")
        );
        assert_eq!(canonical_cidr("10.0.0.0/33"), None);
        assert_eq!(canonical_cidr("10.0.0.0/"), None);
        assert_eq!(canonical_cidr("nope"), None);
        assert_eq!(
            canonical_binding("0.0.0.0:22").as_deref(),
            Some("0.0.0.0:22")
        );
        assert_eq!(canonical_binding("[::]:22").as_deref(), Some("[::]:22"));
        assert_eq!(
            canonical_binding("Host.example:2222").as_deref(),
            Some("host.example:2222")
        );
        assert_eq!(canonical_binding("0.0.0.0:0"), None);
        assert_eq!(canonical_binding("0.0.0.0"), None);
    }

    #[test]
    fn names() {
        assert!(validate_name(Kind::User, "alice@example.com").is_ok());
        assert!(validate_name(Kind::User, "").is_err());
        assert!(validate_name(Kind::User, "a/b").is_err());
        assert!(validate_name(Kind::User, ".hidden").is_err());
        assert!(validate_name(Kind::User, &"x".repeat(129)).is_err());
        assert!(validate_name(Kind::Settings, "global").is_ok());
        assert!(validate_name(Kind::Settings, "other").is_err());
    }

    #[test]
    fn put_resets_unnamed_fields_but_keeps_secrets() {
        let v =
            validate_write(Kind::User, &json!({"home_dir": "/h"}), WriteMode::Put, true).unwrap();
        assert!(v
            .iter()
            .any(|(f, x)| f.name == "quota_bytes" && *x == FieldValue::Reset));
        assert!(!v.iter().any(|(f, _)| f.name == "password"));
        let v =
            validate_write(Kind::User, &json!({"password": null}), WriteMode::Put, true).unwrap();
        assert!(v
            .iter()
            .any(|(f, x)| f.name == "password" && *x == FieldValue::Reset));
    }

    #[test]
    fn patch_touches_only_named_fields() {
        let v = validate_write(
            Kind::User,
            &json!({"home_dir": "/h"}),
            WriteMode::Patch,
            true,
        )
        .unwrap();
        assert_eq!(v.len(), 1);
    }

    #[test]
    fn secret_values_are_not_echoed_in_errors() {
        let e = validate_write(Kind::User, &json!({"password": ""}), WriteMode::Put, false)
            .unwrap_err();
        assert!(e.to_string().contains("(secret)"), "{e}");
    }
}
