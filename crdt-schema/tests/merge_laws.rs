//! Merge laws, as properties over random edit sequences of every kind: merging replicas is
//! commutative, associative and idempotent, including concurrent creation of one name, delete
//! against update, and concurrent text edits.
//!
//! Seeded: `PEERCONF_SEED=N` replays one scenario; `PEERCONF_CASES=N` runs more.

use automerge::{ActorId, AutoCommit};
use crdt_schema::doc::{self, ChangeNote, Edit, EntityState};
use crdt_schema::{Format, Item, Kind, Type, WriteMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

const CERT: &str = include_str!("fixtures/cert.pem");
const KEY: &str = include_str!("fixtures/key.pem");
const CERT2: &str = include_str!("fixtures/cert2.pem");
const KEY2: &str = include_str!("fixtures/key2.pem");

fn str_pool(format: Format) -> Vec<&'static str> {
    match format {
        Format::Any => vec!["", "alpha", "beta gamma"],
        Format::AbsPath => vec!["/a", "/b", "/srv/x"],
        Format::Email => vec!["a@x.io", "b@y.io"],
        Format::Cidr => vec!["10.0.0.0/8", "192.168.0.1", "::1"],
        Format::Binding => vec!["0.0.0.0:22", "[::]:990", "127.0.0.1:2121"],
        Format::SshKey => vec!["ssh-ed25519 AAAA a@h", "ssh-rsa BBBB b@h"],
        Format::CertPem => vec![CERT, CERT2],
        Format::KeyPem => vec![KEY, KEY2],
        Format::Password => vec!["pw-one", "pw-two"],
        Format::Token => vec!["TLS13_AES_128_GCM_SHA256", "TLS13_CHACHA20_POLY1305_SHA256"],
    }
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, v: &[T]) -> T {
    v[rng.random_range(0..v.len())]
}

fn text_edit(rng: &mut ChaCha8Rng, current: &str) -> String {
    let mut lines: Vec<String> = current.lines().map(str::to_string).collect();
    match rng.random_range(0..3) {
        0 if !lines.is_empty() => {
            let i = rng.random_range(0..lines.len());
            lines.remove(i);
        }
        1 if !lines.is_empty() => {
            let i = rng.random_range(0..lines.len());
            lines[i] = format!("{}-{}", lines[i], rng.random_range(0..100));
        }
        _ => {
            let i = rng.random_range(0..=lines.len());
            lines.insert(i, format!("line{}", rng.random_range(0..1000)));
        }
    }
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn random_value(rng: &mut ChaCha8Rng, ty: Type, current: Option<&Value>) -> Value {
    match ty {
        Type::Bool => json!(rng.random_bool(0.5)),
        Type::Int { min, max } => {
            let hi = max.min(min.saturating_add(3));
            json!(rng.random_range(min..=hi))
        }
        Type::Str { format, .. } => json!(pick(rng, &str_pool(format))),
        Type::Enum(vals) => json!(pick(rng, vals)),
        Type::Ref(_) => json!(pick(rng, &["r1", "r2"])),
        Type::Set { item, .. } => {
            let pool: Vec<&str> = match item {
                Item::Enum(vals) => vals.to_vec(),
                Item::Str { format, .. } => str_pool(format),
                Item::Ref(_) => vec!["r1", "r2", "r3"],
            };
            json!(pool.into_iter().filter(|_| rng.random_bool(0.5)).collect::<Vec<_>>())
        }
        Type::Text { .. } => {
            let cur = current.and_then(Value::as_str).unwrap_or("");
            json!(text_edit(rng, cur))
        }
    }
}

fn random_body(rng: &mut ChaCha8Rng, kind: Kind, mode: WriteMode, cur: &EntityState) -> Value {
    let mut body = Map::new();
    for f in kind.fields().iter().filter(|f| !f.read_only) {
        let include = f.required && mode == WriteMode::Put || rng.random_bool(0.4);
        if !include {
            continue;
        }
        let v = if !f.required && rng.random_bool(0.1) {
            Value::Null
        } else {
            random_value(rng, f.ty, cur.fields.get(f.name))
        };
        body.insert(f.name.into(), v);
    }
    if kind == Kind::Certificate && (body.contains_key("cert_pem") || body.contains_key("key_pem")) {
        let second = rng.random_bool(0.5);
        body.insert("cert_pem".into(), json!(if second { CERT2 } else { CERT }));
        body.insert("key_pem".into(), json!(if second { KEY2 } else { KEY }));
    }
    Value::Object(body)
}

struct Replica {
    doc: AutoCommit,
    node: String,
}

fn name_of(kind: Kind) -> &'static str {
    kind.singleton().unwrap_or("e1")
}

/// One random write (put, patch or delete) on a replica, as a node would make it.
fn random_write(rng: &mut ChaCha8Rng, r: &mut Replica, kind: Kind, t: i64) {
    let cur = doc::read(&r.doc, kind, name_of(kind)).unwrap();
    let choice = rng.random_range(0..10);
    let note = |op: &str| ChangeNote { node: r.node.clone(), op: op.into(), fields: vec![] };
    if choice == 0 {
        doc::apply(&mut r.doc, kind, &Edit { alive: Some(false), values: &[] }, &note("delete"), t).unwrap();
        return;
    }
    let mode = if choice < 5 || !cur.alive { WriteMode::Put } else { WriteMode::Patch };
    let body = random_body(rng, kind, mode, &cur);
    let values = crdt_schema::validate_write(kind, &body, mode, cur.alive)
        .unwrap_or_else(|e| panic!("generator made an invalid body {body}: {e}"));
    let alive = (mode == WriteMode::Put).then_some(true);
    doc::apply(&mut r.doc, kind, &Edit { alive, values: &values }, &note("write"), t).unwrap();
}

fn merged(a: &AutoCommit, b: &AutoCommit) -> AutoCommit {
    let mut x = a.clone();
    let mut y = b.clone();
    x.merge(&mut y).unwrap();
    x
}

fn same(kind: Kind, a: &mut AutoCommit, b: &mut AutoCommit) -> Result<(), String> {
    let mut ha = a.get_heads();
    let mut hb = b.get_heads();
    ha.sort();
    hb.sort();
    if ha != hb {
        return Err(format!("heads differ: {ha:?} vs {hb:?}"));
    }
    let ra = doc::read(a, kind, name_of(kind)).unwrap();
    let rb = doc::read(b, kind, name_of(kind)).unwrap();
    if ra != rb {
        return Err(format!("states differ:\n{}\n{}", ra.to_json(), rb.to_json()));
    }
    Ok(())
}

fn scenario(seed: u64) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let kind = Kind::ALL[rng.random_range(0..Kind::ALL.len())];
    // Each replica starts from its own genesis: concurrent creation of one name.
    let mut reps: Vec<Replica> = (0..3)
        .map(|i| {
            let mut d = doc::genesis(kind, name_of(kind));
            d.set_actor(ActorId::from(vec![i as u8 + 1; 16]));
            Replica { doc: d, node: format!("node{i}") }
        })
        .collect();
    let steps = rng.random_range(1..25);
    for t in 0..steps {
        let i = rng.random_range(0..3);
        if rng.random_bool(0.2) {
            let j = rng.random_range(0..3);
            if i != j {
                let mut other = reps[j].doc.clone();
                reps[i].doc.merge(&mut other).unwrap();
            }
        } else {
            random_write(&mut rng, &mut reps[i], kind, t as i64);
        }
    }
    let (a, b, c) = (&reps[0].doc, &reps[1].doc, &reps[2].doc);
    // Commutative.
    same(kind, &mut merged(a, b), &mut merged(b, a)).map_err(|e| format!("{kind}: a+b != b+a: {e}"))?;
    // Associative.
    same(kind, &mut merged(&merged(a, b), c), &mut merged(a, &merged(b, c)))
        .map_err(|e| format!("{kind}: (a+b)+c != a+(b+c): {e}"))?;
    // Idempotent.
    same(kind, &mut merged(a, a), &mut a.clone()).map_err(|e| format!("{kind}: a+a != a: {e}"))?;
    let ab = merged(a, b);
    same(kind, &mut merged(&ab, b), &mut ab.clone()).map_err(|e| format!("{kind}: (a+b)+b != a+b: {e}"))?;
    // Every replica reads its document back as the layout of (kind, name).
    doc::check_layout(&merged(&ab, c), kind, name_of(kind))?;
    Ok(())
}

#[test]
fn merge_is_commutative_associative_idempotent() {
    if let Ok(seed) = std::env::var("PEERCONF_SEED") {
        let seed: u64 = seed.parse().expect("PEERCONF_SEED must be a number");
        scenario(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let cases: u64 = std::env::var("PEERCONF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let base: u64 = rand::rng().random_range(0..u64::MAX / 2);
    eprintln!("merge laws: seeds {base}..{} (replay one with PEERCONF_SEED=N)", base + cases);
    for seed in base..base + cases {
        if let Err(e) = scenario(seed) {
            panic!("seed {seed} (replay: PEERCONF_SEED={seed}): {e}");
        }
    }
}

fn user_doc(actor: u8) -> AutoCommit {
    let mut d = doc::genesis(Kind::User, "alice");
    d.set_actor(ActorId::from(vec![actor; 16]));
    d
}

fn write(d: &mut AutoCommit, kind: Kind, body: Value, mode: WriteMode, alive: Option<bool>) {
    let values = crdt_schema::validate_write(kind, &body, mode, true).unwrap();
    let note = ChangeNote { node: "n".into(), op: "w".into(), fields: vec![] };
    doc::apply(d, kind, &Edit { alive, values: &values }, &note, 1).unwrap();
}

#[test]
fn concurrent_creation_of_one_name_merges_field_by_field() {
    let mut a = user_doc(1);
    let mut b = user_doc(2);
    write(&mut a, Kind::User, json!({"home_dir": "/a"}), WriteMode::Patch, Some(true));
    write(&mut b, Kind::User, json!({"quota_bytes": 7}), WriteMode::Patch, Some(true));
    let m = merged(&a, &b);
    let s = doc::read(&m, Kind::User, "alice").unwrap();
    assert!(s.alive);
    assert_eq!(s.fields["home_dir"], json!("/a"));
    assert_eq!(s.fields["quota_bytes"], json!(7));
    assert!(s.conflicts.is_empty(), "{:?}", s.conflicts);
}

#[test]
fn concurrent_register_writes_are_reported_as_conflicts_and_resolved_by_a_write() {
    let mut a = user_doc(1);
    write(&mut a, Kind::User, json!({"home_dir": "/x"}), WriteMode::Put, Some(true));
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(&mut a, Kind::User, json!({"home_dir": "/a"}), WriteMode::Patch, None);
    write(&mut b, Kind::User, json!({"home_dir": "/b"}), WriteMode::Patch, None);
    let mut m = merged(&a, &b);
    let s = doc::read(&m, Kind::User, "alice").unwrap();
    let vals = s.conflicts["home_dir"].as_array().unwrap();
    assert_eq!(vals.len(), 2);
    assert_eq!(vals[0], s.fields["home_dir"], "the winner is listed first");
    // Writing the winner again resolves the conflict.
    let winner = s.fields["home_dir"].clone();
    write(&mut m, Kind::User, json!({ "home_dir": winner }), WriteMode::Patch, None);
    assert!(doc::read(&m, Kind::User, "alice").unwrap().conflicts.is_empty());
}

#[test]
fn delete_against_update_leaves_entity_deleted_everywhere() {
    let mut a = user_doc(1);
    write(&mut a, Kind::User, json!({"home_dir": "/x"}), WriteMode::Put, Some(true));
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(&mut a, Kind::User, json!({}), WriteMode::Patch, Some(false));
    write(&mut b, Kind::User, json!({"home_dir": "/y"}), WriteMode::Patch, None);
    let ab = doc::read(&merged(&a, &b), Kind::User, "alice").unwrap();
    let ba = doc::read(&merged(&b, &a), Kind::User, "alice").unwrap();
    assert!(!ab.alive);
    assert_eq!(ab, ba);
}

#[test]
fn concurrent_text_edits_both_survive() {
    let mut a = doc::genesis(Kind::Script, "s");
    a.set_actor(ActorId::from(vec![1; 16]));
    write(&mut a, Kind::Script, json!({"source": "line1\nline2\n"}), WriteMode::Put, Some(true));
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(&mut a, Kind::Script, json!({"source": "line0\nline1\nline2\n"}), WriteMode::Patch, None);
    write(&mut b, Kind::Script, json!({"source": "line1\nline2\nline3\n"}), WriteMode::Patch, None);
    for m in [merged(&a, &b), merged(&b, &a)] {
        let s = doc::read(&m, Kind::Script, "s").unwrap();
        assert_eq!(s.fields["source"], json!("line0\nline1\nline2\nline3\n"));
    }
}

#[test]
fn concurrent_set_adds_and_removes_all_apply() {
    let mut a = user_doc(1);
    write(&mut a, Kind::User, json!({"permissions": ["read", "list"]}), WriteMode::Put, Some(true));
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(&mut a, Kind::User, json!({"permissions": ["read", "list", "write"]}), WriteMode::Patch, None);
    write(&mut b, Kind::User, json!({"permissions": ["read"]}), WriteMode::Patch, None);
    let s = doc::read(&merged(&a, &b), Kind::User, "alice").unwrap();
    assert_eq!(s.fields["permissions"], json!(["read", "write"]));
}

#[test]
fn genesis_is_identical_on_every_node() {
    let mut a = doc::genesis(Kind::Site, "s1");
    let mut b = doc::genesis(Kind::Site, "s1");
    assert_eq!(a.get_heads(), b.get_heads());
    assert_eq!(a.save(), b.save());
    assert_ne!(doc::genesis(Kind::Site, "s2").get_heads(), a.get_heads());
}

#[test]
fn history_records_node_op_fields_and_time() {
    let mut a = user_doc(1);
    write(&mut a, Kind::User, json!({"home_dir": "/x"}), WriteMode::Put, Some(true));
    write(&mut a, Kind::User, json!({"home_dir": "/y"}), WriteMode::Patch, None);
    write(&mut a, Kind::User, json!({"home_dir": "/y"}), WriteMode::Patch, None); // no change
    let h = doc::history(&mut a);
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].fields, vec!["home_dir".to_string()]);
    assert_eq!(h[1].node.as_deref(), Some("n"));
    assert_eq!(h[1].time_ms, 1);
}
