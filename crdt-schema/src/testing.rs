//! Random valid writes of every kind, shared by the property tests and the fuzz targets. The
//! randomness comes from a [`Source`]: a seeded generator in tests, the fuzzer's bytes in fuzzing.

use crate::doc::{self, ChangeNote, Edit, EntityState};
use crate::{Format, Item, Kind, Type, WriteMode};
use automerge::AutoCommit;
use serde_json::{json, Map, Value};

/// Certificates and keys valid for the schema (test fixtures, never used for anything real).
pub const CERTS: [(&str, &str); 2] = [
    (
        include_str!("../tests/fixtures/cert.pem"),
        include_str!("../tests/fixtures/key.pem"),
    ),
    (
        include_str!("../tests/fixtures/cert2.pem"),
        include_str!("../tests/fixtures/key2.pem"),
    ),
];

/// Where choices come from.
pub trait Source {
    /// A number in `0..n` (0 when n is 0).
    fn below(&mut self, n: usize) -> usize;
    /// True with probability about `percent` / 100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn pick<T: Copy>(src: &mut dyn Source, v: &[T]) -> T {
    v[src.below(v.len())]
}

fn str_pool(format: Format) -> Vec<&'static str> {
    match format {
        Format::Any => vec!["", "alpha", "beta gamma"],
        Format::AbsPath => vec!["/a", "/b", "/srv/x"],
        Format::Email => vec!["a@x.io", "b@y.io"],
        Format::Cidr => vec!["10.0.0.0/8", "192.168.0.1", "::1"],
        Format::Binding => vec!["0.0.0.0:22", "[::]:990", "127.0.0.1:2121"],
        Format::SshKey => vec!["ssh-ed25519 AAAA a@h", "ssh-rsa BBBB b@h"],
        Format::CertPem => vec![CERTS[0].0, CERTS[1].0],
        Format::KeyPem => vec![CERTS[0].1, CERTS[1].1],
        Format::Password => vec!["pw-one-long", "pw-two-long"],
        Format::Token => vec!["TLS13_AES_128_GCM_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"],
    }
}

/// A line-based edit of a text: insert, delete or change one line.
pub fn text_edit(src: &mut dyn Source, current: &str) -> String {
    let mut lines: Vec<String> = current.lines().map(str::to_string).collect();
    match src.below(3) {
        0 if !lines.is_empty() => {
            let i = src.below(lines.len());
            lines.remove(i);
        }
        1 if !lines.is_empty() => {
            let i = src.below(lines.len());
            lines[i] = format!("{}-{}", lines[i], src.below(100));
        }
        _ => {
            let i = src.below(lines.len() + 1);
            lines.insert(i, format!("line{}", src.below(1000)));
        }
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn random_value(src: &mut dyn Source, ty: Type, current: Option<&Value>) -> Value {
    match ty {
        Type::Bool => json!(src.chance(50)),
        Type::Int { min, max } => {
            let span = (max.saturating_sub(min)).min(3) as usize;
            json!(min + src.below(span + 1) as i64)
        }
        Type::Str { format, .. } => json!(pick(src, &str_pool(format))),
        Type::Enum(vals) => json!(pick(src, vals)),
        Type::Ref(_) => json!(pick(src, &["r1", "r2"])),
        Type::Set { item, .. } => {
            let pool: Vec<&str> = match item {
                Item::Enum(vals) => vals.to_vec(),
                Item::Str { format, .. } => str_pool(format),
                Item::Ref(_) => vec!["r1", "r2", "r3"],
            };
            json!(pool
                .into_iter()
                .filter(|_| src.chance(50))
                .collect::<Vec<_>>())
        }
        Type::Text { .. } => {
            let cur = current.and_then(Value::as_str).unwrap_or("");
            json!(text_edit(src, cur))
        }
    }
}

/// A body that passes `validate_write(kind, body, mode, ..)`.
pub fn random_body(src: &mut dyn Source, kind: Kind, mode: WriteMode, cur: &EntityState) -> Value {
    let mut body = Map::new();
    for f in kind.fields().iter().filter(|f| !f.read_only) {
        if !(f.required && mode == WriteMode::Put || src.chance(40)) {
            continue;
        }
        let v = if !f.required && src.chance(10) {
            Value::Null
        } else {
            random_value(src, f.ty, cur.fields.get(f.name))
        };
        body.insert(f.name.into(), v);
    }
    if kind == Kind::Certificate && (body.contains_key("cert_pem") || body.contains_key("key_pem"))
    {
        let (c, k) = CERTS[src.below(2)];
        body.insert("cert_pem".into(), json!(c));
        body.insert("key_pem".into(), json!(k));
    }
    // Keep cross-field rules satisfied.
    if kind == Kind::Settings {
        body.remove("offline_timeout_ms");
        body.remove("heartbeat_interval_ms");
    }
    Value::Object(body)
}

/// The name every random scenario of a kind writes to.
pub fn scenario_name(kind: Kind) -> &'static str {
    kind.singleton().unwrap_or("e1")
}

/// One random write (put, patch or delete) as a node makes it; `t` is the change timestamp.
pub fn random_write(src: &mut dyn Source, d: &mut AutoCommit, kind: Kind, node: &str, t: i64) {
    let name = scenario_name(kind);
    let cur = doc::read(d, kind, name).expect("readable document");
    let note = |op: &str| ChangeNote {
        node: node.into(),
        op: op.into(),
        fields: vec![],
        ..Default::default()
    };
    let choice = src.below(10);
    if choice == 0 {
        doc::apply(
            d,
            kind,
            &Edit {
                alive: Some(false),
                values: &[],
            },
            &note("delete"),
            t,
        )
        .expect("delete applies");
        return;
    }
    let mode = if choice < 5 || !cur.alive {
        WriteMode::Put
    } else {
        WriteMode::Patch
    };
    let body = random_body(src, kind, mode, &cur);
    let mut values = crate::validate_write(kind, &body, mode, cur.alive)
        .unwrap_or_else(|e| panic!("generator made an invalid body {body}: {e}"));
    // Documents hold references to secrets, never their values (as the entity layer writes).
    let id = crate::doc_id(kind, name);
    for (field, value) in values.iter_mut() {
        if let crate::FieldValue::Secret(v) = value {
            *v = crate::secret::secret_ref(&id, field.name, v);
        }
    }
    let alive = (mode == WriteMode::Put).then_some(true);
    doc::apply(
        d,
        kind,
        &Edit {
            alive,
            values: &values,
        },
        &note(mode_name(mode)),
        t,
    )
    .expect("write applies");
}

fn mode_name(m: WriteMode) -> &'static str {
    match m {
        WriteMode::Put => "put",
        WriteMode::Patch => "patch",
    }
}

/// Whether two replicas have converged: same heads, same entity.
pub fn converged(kind: Kind, a: &mut AutoCommit, b: &mut AutoCommit) -> Result<(), String> {
    let mut ha = a.get_heads();
    let mut hb = b.get_heads();
    ha.sort();
    hb.sort();
    if ha != hb {
        return Err(format!("heads differ: {ha:?} vs {hb:?}"));
    }
    let name = scenario_name(kind);
    let ra = doc::read(a, kind, name).map_err(|e| e.to_string())?;
    let rb = doc::read(b, kind, name).map_err(|e| e.to_string())?;
    if ra != rb {
        return Err(format!(
            "states differ:\n{}\n{}",
            ra.to_json(),
            rb.to_json()
        ));
    }
    Ok(())
}
