//! Merge laws, as properties over random edit sequences of every kind: merging replicas is
//! commutative, associative and idempotent, including concurrent creation of one name, delete
//! against update, and concurrent text edits.
//!
//! Seeded: `PEERCONF_SEED=N` replays one scenario; `PEERCONF_CASES=N` runs more.

use automerge::{ActorId, AutoCommit};
use crdt_schema::doc::{self, ChangeNote, Edit};
use crdt_schema::testing::{converged, random_write, Source};
use crdt_schema::{Kind, WriteMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

struct Seeded(ChaCha8Rng);

impl Source for Seeded {
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.0.random_range(0..n)
        }
    }
}

fn merged(a: &AutoCommit, b: &AutoCommit) -> AutoCommit {
    let mut x = a.clone();
    let mut y = b.clone();
    x.merge(&mut y).unwrap();
    x
}

fn same(kind: Kind, a: &mut AutoCommit, b: &mut AutoCommit) -> Result<(), String> {
    converged(kind, a, b)
}

fn scenario(seed: u64) -> Result<(), String> {
    let mut rng = Seeded(ChaCha8Rng::seed_from_u64(seed));
    let kind = Kind::ALL[rng.below(Kind::ALL.len())];
    // Each replica starts from its own genesis: concurrent creation of one name.
    let mut reps: Vec<AutoCommit> = (0..3)
        .map(|i| {
            let mut d = doc::genesis(kind);
            d.set_actor(ActorId::from(vec![i as u8 + 1; 16]));
            d
        })
        .collect();
    let steps = 1 + rng.below(24);
    for t in 0..steps {
        let i = rng.below(3);
        if rng.chance(20) {
            let j = rng.below(3);
            if i != j {
                let mut other = reps[j].clone();
                reps[i].merge(&mut other).unwrap();
            }
        } else {
            random_write(&mut rng, &mut reps[i], kind, &format!("node{i}"), t as i64);
        }
    }
    let (a, b, c) = (&reps[0], &reps[1], &reps[2]);
    // Commutative.
    same(kind, &mut merged(a, b), &mut merged(b, a))
        .map_err(|e| format!("{kind}: a+b != b+a: {e}"))?;
    // Associative.
    same(
        kind,
        &mut merged(&merged(a, b), c),
        &mut merged(a, &merged(b, c)),
    )
    .map_err(|e| format!("{kind}: (a+b)+c != a+(b+c): {e}"))?;
    // Idempotent.
    same(kind, &mut merged(a, a), &mut a.clone()).map_err(|e| format!("{kind}: a+a != a: {e}"))?;
    let ab = merged(a, b);
    same(kind, &mut merged(&ab, b), &mut ab.clone())
        .map_err(|e| format!("{kind}: (a+b)+b != a+b: {e}"))?;
    // Every replica reads its document back as the layout of (kind, name).
    doc::check_layout(&merged(&ab, c), kind).map_err(|e| format!("{kind}: {e}"))?;
    Ok(())
}

#[test]
fn merge_is_commutative_associative_idempotent() {
    if let Ok(seed) = std::env::var("PEERCONF_SEED") {
        let seed: u64 = seed.parse().expect("PEERCONF_SEED must be a number");
        scenario(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let cases: u64 = std::env::var("PEERCONF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let base: u64 = rand::rng().random_range(0..u64::MAX / 2);
    eprintln!(
        "merge laws: seeds {base}..{} (replay one with PEERCONF_SEED=N)",
        base + cases
    );
    for seed in base..base + cases {
        if let Err(e) = scenario(seed) {
            panic!("seed {seed} (replay: PEERCONF_SEED={seed}): {e}");
        }
    }
}

fn user_doc(actor: u8) -> AutoCommit {
    let mut d = doc::genesis(Kind::User);
    d.set_actor(ActorId::from(vec![actor; 16]));
    d
}

fn write(d: &mut AutoCommit, kind: Kind, body: Value, mode: WriteMode, alive: Option<bool>) {
    let values = crdt_schema::validate_write(kind, &body, mode, true).unwrap();
    let note = ChangeNote {
        node: "n".into(),
        op: "w".into(),
        fields: vec![],
        ..Default::default()
    };
    doc::apply(
        d,
        kind,
        &Edit {
            alive,
            values: &values,
        },
        &note,
        1,
    )
    .unwrap();
}

#[test]
fn concurrent_creation_of_one_name_merges_field_by_field() {
    let mut a = user_doc(1);
    let mut b = user_doc(2);
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/a"}),
        WriteMode::Patch,
        Some(true),
    );
    write(
        &mut b,
        Kind::User,
        json!({"quota_bytes": 7}),
        WriteMode::Patch,
        Some(true),
    );
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
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/x"}),
        WriteMode::Put,
        Some(true),
    );
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/a"}),
        WriteMode::Patch,
        None,
    );
    write(
        &mut b,
        Kind::User,
        json!({"home_dir": "/b"}),
        WriteMode::Patch,
        None,
    );
    let mut m = merged(&a, &b);
    let s = doc::read(&m, Kind::User, "alice").unwrap();
    let vals = s.conflicts["home_dir"].as_array().unwrap();
    assert_eq!(vals.len(), 2);
    assert_eq!(vals[0], s.fields["home_dir"], "the winner is listed first");
    // The winner read is Automerge's own, whichever actor wrote last, on either side.
    use automerge::ReadDoc;
    for d in [&m, &merged(&b, &a)] {
        let (v, _) = d
            .get(automerge::ROOT, "home_dir")
            .unwrap()
            .expect("a value");
        assert_eq!(
            json!(v.as_str().expect("a string")),
            doc::read(d, Kind::User, "alice").unwrap().fields["home_dir"]
        );
    }
    // Writing the winner again resolves the conflict.
    let winner = s.fields["home_dir"].clone();
    write(
        &mut m,
        Kind::User,
        json!({ "home_dir": winner }),
        WriteMode::Patch,
        None,
    );
    assert!(doc::read(&m, Kind::User, "alice")
        .unwrap()
        .conflicts
        .is_empty());
}

#[test]
fn delete_against_update_leaves_entity_deleted_everywhere() {
    let mut a = user_doc(1);
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/x"}),
        WriteMode::Put,
        Some(true),
    );
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(&mut a, Kind::User, json!({}), WriteMode::Patch, Some(false));
    write(
        &mut b,
        Kind::User,
        json!({"home_dir": "/y"}),
        WriteMode::Patch,
        None,
    );
    let ab = doc::read(&merged(&a, &b), Kind::User, "alice").unwrap();
    let ba = doc::read(&merged(&b, &a), Kind::User, "alice").unwrap();
    assert!(!ab.alive);
    assert_eq!(ab, ba);
}

#[test]
fn concurrent_text_edits_both_survive() {
    let mut a = doc::genesis(Kind::Script);
    a.set_actor(ActorId::from(vec![1; 16]));
    write(
        &mut a,
        Kind::Script,
        json!({"source": "line1\nline2\n"}),
        WriteMode::Put,
        Some(true),
    );
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(
        &mut a,
        Kind::Script,
        json!({"source": "line0\nline1\nline2\n"}),
        WriteMode::Patch,
        None,
    );
    write(
        &mut b,
        Kind::Script,
        json!({"source": "line1\nline2\nline3\n"}),
        WriteMode::Patch,
        None,
    );
    for m in [merged(&a, &b), merged(&b, &a)] {
        let s = doc::read(&m, Kind::Script, "s").unwrap();
        assert_eq!(s.fields["source"], json!("line0\nline1\nline2\nline3\n"));
    }
}

#[test]
fn concurrent_set_adds_and_removes_all_apply() {
    let mut a = user_doc(1);
    write(
        &mut a,
        Kind::User,
        json!({"permissions": ["read", "list"]}),
        WriteMode::Put,
        Some(true),
    );
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    write(
        &mut a,
        Kind::User,
        json!({"permissions": ["read", "list", "write"]}),
        WriteMode::Patch,
        None,
    );
    write(
        &mut b,
        Kind::User,
        json!({"permissions": ["read"]}),
        WriteMode::Patch,
        None,
    );
    let s = doc::read(&merged(&a, &b), Kind::User, "alice").unwrap();
    assert_eq!(s.fields["permissions"], json!(["read", "write"]));
}

#[test]
fn genesis_is_identical_on_every_node() {
    let mut a = doc::genesis(Kind::Site);
    // Built from scratch in another thread (another cache), it is still the same change.
    let mut b = std::thread::spawn(|| doc::genesis(Kind::Site))
        .join()
        .unwrap();
    assert_eq!(a.get_heads(), b.get_heads());
    assert_eq!(a.save(), b.save());
    assert_ne!(doc::genesis(Kind::User).get_heads(), a.get_heads());
}

#[test]
fn history_records_node_op_fields_and_time() {
    let mut a = user_doc(1);
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/x"}),
        WriteMode::Put,
        Some(true),
    );
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/y"}),
        WriteMode::Patch,
        None,
    );
    write(
        &mut a,
        Kind::User,
        json!({"home_dir": "/y"}),
        WriteMode::Patch,
        None,
    ); // no change
    let h = doc::history(&mut a);
    assert_eq!(h.len(), 2);
    assert_eq!(h[1].fields, vec!["home_dir".to_string()]);
    assert_eq!(h[1].node.as_deref(), Some("n"));
    assert_eq!(h[1].time_ms, 1);
}

/// `latest_note` names who made the newest change at the heads, and on which node: for a
/// linear history its last change, for concurrent heads the one with the later timestamp; a
/// document with no note (genesis only) has none.
#[test]
fn the_latest_note_names_the_newest_change_at_the_heads() {
    let by = |d: &mut AutoCommit, node: &str, who: &str, home: &str, t: i64| {
        let values = crdt_schema::validate_write(
            Kind::User,
            &json!({ "home_dir": home }),
            WriteMode::Patch,
            true,
        )
        .unwrap();
        let note = ChangeNote {
            node: node.into(),
            op: "patch".into(),
            by: Some(who.into()),
            ..Default::default()
        };
        let edit = Edit {
            alive: Some(true),
            values: &values,
        };
        doc::apply(d, Kind::User, &edit, &note, t).unwrap();
    };
    let mut a = user_doc(1);
    assert_eq!(doc::latest_note(&mut a), None, "genesis carries no note");
    by(&mut a, "n1", "alice", "/one", 10);
    by(&mut a, "n1", "bob", "/two", 20);
    let n = doc::latest_note(&mut a).expect("a note");
    assert_eq!((n.node.as_str(), n.by.as_deref()), ("n1", Some("bob")));
    let mut b = a.fork();
    b.set_actor(ActorId::from(vec![2; 16]));
    by(&mut a, "n1", "carol", "/a", 30);
    by(&mut b, "n2", "dave", "/b", 40);
    for mut m in [merged(&a, &b), merged(&b, &a)] {
        assert_eq!(m.get_heads().len(), 2);
        let n = doc::latest_note(&mut m).expect("a note");
        assert_eq!((n.node.as_str(), n.by.as_deref()), ("n2", Some("dave")));
    }
}
