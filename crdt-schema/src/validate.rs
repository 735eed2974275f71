//! Validation of writes against the schema. Every error names the kind, the field, the value and
//! the rule it broke; validation never changes anything.

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

/// A validated field value, ready to be written into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
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

fn wrong(kind: Kind, field: &Field, expected: impl Into<String>, got: &Value) -> SchemaError {
    SchemaError::WrongType {
        kind,
        field: field.name.into(),
        expected: expected.into(),
        got: format!("{} {}", type_name(got), show(got)),
    }
}

fn constraint(kind: Kind, field: &Field, value: &str, rule: impl Into<String>) -> SchemaError {
    let v = Value::String(value.to_string());
    SchemaError::Constraint {
        kind,
        field: field.name.into(),
        value: if field.secret {
            "(secret)".into()
        } else {
            show(&v)
        },
        rule: rule.into(),
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
                return Err(SchemaError::Constraint {
                    kind,
                    field: field.name.into(),
                    value: i.to_string(),
                    rule: if max == i64::MAX {
                        format!("must be >= {min}")
                    } else {
                        format!("must be between {min} and {max}")
                    },
                });
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
            validate_name(target, s).map_err(|e| constraint(kind, field, s, e.to_string()))?;
            Ok(FieldValue::Str(s.into()))
        }
        Type::Set { item, max_items } => {
            let arr = v
                .as_array()
                .ok_or_else(|| wrong(kind, field, "an array (a set)", v))?;
            if arr.len() > max_items {
                return Err(SchemaError::Constraint {
                    kind,
                    field: field.name.into(),
                    value: format!("{} items", arr.len()),
                    rule: format!("at most {max_items} items"),
                });
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
                        validate_name(target, s)
                            .map_err(|e| constraint(kind, field, s, e.to_string()))?;
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
                return Err(SchemaError::Constraint {
                    kind,
                    field: field.name.into(),
                    value: format!("{} bytes", s.len()),
                    rule: format!("at most {max_len} bytes"),
                });
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
    if s.len() > max_len {
        return Err(SchemaError::Constraint {
            kind,
            field: field.name.into(),
            value: format!("{} bytes", s.len()),
            rule: format!("at most {max_len} bytes"),
        });
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
            let ok = s.contains("-----BEGIN ")
                && s.lines()
                    .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"));
            if !ok {
                return Err(err(
                    "must be a PEM private key (-----BEGIN ... PRIVATE KEY-----)",
                ));
            }
            Ok(s.into())
        }
        Format::Password => {
            if s.is_empty() {
                return Err(err("must not be empty"));
            }
            Ok(s.into())
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
