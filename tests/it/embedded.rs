//! The embedding API, in-process: what a server that embeds peerconf relies on.

use peerconf::typed::{Site, User};
use peerconf::{Kind, Node, NodeOptions};
use serde_json::{json, Value};
use std::path::Path;

const CERT: &str = include_str!("../../crdt-schema/tests/fixtures/cert.pem");
const KEY: &str = include_str!("../../crdt-schema/tests/fixtures/key.pem");

fn opts(seed: u64) -> NodeOptions {
    NodeOptions {
        seed: Some(seed),
        ..NodeOptions::default()
    }
}

fn fresh(dir: &Path) -> Node {
    Node::init(dir, &Default::default(), &opts(1)).unwrap();
    Node::open(dir, opts(2)).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn write_read_list_delete_recreate() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    rt().block_on(async {
        node.put(
            Kind::Site,
            "s1",
            json!({"protocols": ["sftp"], "root_dir": "/srv"}),
        )
        .await
        .unwrap();
        let u = node
            .put(
                Kind::User,
                "alice",
                json!({"home_dir": "/h/a", "site": "s1", "quota_bytes": 5}),
            )
            .await
            .unwrap();
        assert_eq!(u["fields"]["quota_bytes"], json!(5));
        assert_eq!(
            u["fields"]["enabled"],
            json!(true),
            "defaults are filled in"
        );
        let typed: User = node.get_typed("alice").unwrap().unwrap();
        assert_eq!(typed.home_dir.as_deref(), Some("/h/a"));
        assert_eq!(typed.site.as_deref(), Some("s1"));
        let sites: Vec<(String, Site)> = node.list_typed().unwrap();
        assert_eq!(sites.len(), 1);
        assert_eq!(sites[0].0, "s1");

        node.patch(Kind::User, "alice", json!({"quota_bytes": 9, "site": null}))
            .await
            .unwrap();
        let a = node.get(Kind::User, "alice").unwrap().unwrap();
        assert_eq!(a["fields"]["quota_bytes"], json!(9));
        assert!(
            a["fields"].get("site").is_none(),
            "null resets to the default (absent)"
        );

        node.delete(Kind::User, "alice").await.unwrap();
        assert!(node.get(Kind::User, "alice").unwrap().is_none());
        assert!(node.list(Kind::User).unwrap().is_empty());
        let e = node
            .patch(Kind::User, "alice", json!({}))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let e = node.delete(Kind::User, "alice").await.unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");

        node.put(Kind::User, "alice", json!({"home_dir": "/h/new"}))
            .await
            .unwrap();
        let a = node.get(Kind::User, "alice").unwrap().unwrap();
        assert_eq!(a["fields"]["home_dir"], json!("/h/new"));
        assert_eq!(
            a["fields"]["quota_bytes"],
            json!(0),
            "a re-created entity starts from defaults"
        );
        let h = node.history(Kind::User, "alice").unwrap();
        let ops: Vec<_> = h.iter().map(|c| c.op.clone().unwrap()).collect();
        assert_eq!(ops, ["put", "patch", "delete", "put"]);
        assert!(h
            .iter()
            .all(|c| c.node.as_deref() == Some(node.config().node_id.as_str())));
    });
    node.shutdown();
}

/// Writes that fail validation change nothing: not the entity, not its history.
#[test]
fn bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    rt().block_on(async {
        node.put(
            Kind::User,
            "bob",
            json!({"home_dir": "/h", "quota_bytes": 10, "permissions": ["read"]}),
        )
        .await
        .unwrap();
        let before = node.get(Kind::User, "bob").unwrap();
        let hist = node.history(Kind::User, "bob").unwrap().len();
        let bad = [
            json!({"quota_bytes": -1}),
            json!({"quota_bytes": "x", "home_dir": "/other"}),
            json!({"home_dir": "/ok", "permissions": ["fly"]}),
            json!({"home_dir": "/ok", "nonsense": 1}),
            json!({"home_dir": "/ok", "site": "missing"}),
            json!({"home_dir": "/ok", "groups": ["nogroup"]}),
            json!({"password": "short"}),
            json!([1, 2]),
        ];
        for b in &bad {
            assert!(
                node.patch(Kind::User, "bob", b.clone()).await.is_err(),
                "patch {b} accepted"
            );
            assert!(
                node.put(Kind::User, "bob", b.clone()).await.is_err(),
                "put {b} accepted"
            );
        }
        assert_eq!(node.get(Kind::User, "bob").unwrap(), before);
        assert_eq!(node.history(Kind::User, "bob").unwrap().len(), hist);
        // A refused create leaves no entity behind.
        assert!(node
            .put(Kind::User, "carol", json!({"site": "nope"}))
            .await
            .is_err());
        assert!(node.get(Kind::User, "carol").unwrap().is_none());
        assert!(node.history(Kind::User, "carol").is_err());
    });
    node.shutdown();
}

#[test]
fn references_must_exist_when_written() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    rt().block_on(async {
        let e = node
            .put(
                Kind::Rule,
                "r1",
                json!({"event": "after_upload", "script": "sc1"}),
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("rule.script") && e.to_string().contains("sc1"),
            "{e}"
        );
        node.put(Kind::Script, "sc1", json!({"source": "x"}))
            .await
            .unwrap();
        node.put(
            Kind::Rule,
            "r1",
            json!({"event": "after_upload", "script": "sc1"}),
        )
        .await
        .unwrap();
        node.put(Kind::Group, "g1", json!({})).await.unwrap();
        node.delete(Kind::Group, "g1").await.unwrap();
        let e = node
            .put(Kind::User, "u", json!({"groups": ["g1"]}))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("g1"),
            "a deleted group is not a valid reference: {e}"
        );
    });
    node.shutdown();
}

/// Secrets are write-only: no read path returns them, but the embedding server can check them.
#[test]
fn secrets_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    rt().block_on(async {
        let pw = "correct horse battery staple";
        let r = node
            .put(Kind::User, "alice", json!({"password": pw}))
            .await
            .unwrap();
        node.put(
            Kind::Admin,
            "root",
            json!({"role": "superadmin", "password": "Sup3r-secret"}),
        )
        .await
        .unwrap();
        node.put(
            Kind::Certificate,
            "c1",
            json!({"cert_pem": CERT, "key_pem": KEY}),
        )
        .await
        .unwrap();
        let mut seen = vec![r.to_string()];
        for k in [Kind::User, Kind::Admin, Kind::Certificate] {
            seen.push(Value::Array(node.list(k).unwrap()).to_string());
            seen.push(String::from_utf8(node.list_json(k).unwrap()).unwrap());
        }
        seen.push(
            node.get(Kind::Certificate, "c1")
                .unwrap()
                .unwrap()
                .to_string(),
        );
        seen.push(serde_json::to_string(&node.history(Kind::User, "alice").unwrap()).unwrap());
        seen.push(Value::Array(node.conflicts().unwrap()).to_string());
        for s in &seen {
            for secret in [pw, "Sup3r-secret", "PRIVATE KEY", "argon2"] {
                assert!(!s.contains(secret), "{secret} readable in {s}");
            }
        }
        let u = node.get(Kind::User, "alice").unwrap().unwrap();
        assert_eq!(u["secrets_set"], json!(["password"]));
        let c = node.get(Kind::Certificate, "c1").unwrap().unwrap();
        assert_eq!(c["fields"]["subject"], json!("CN=fixture.example"));
        assert_eq!(c["fields"]["fingerprint"].as_str().unwrap().len(), 64);
        assert!(node.verify_password(Kind::User, "alice", pw).unwrap());
        assert!(!node.verify_password(Kind::User, "alice", "wrong").unwrap());
        assert!(node
            .secret(Kind::User, "alice", "password")
            .unwrap()
            .unwrap()
            .starts_with("$argon2id$"));
        // A put without the password (a read-modify-write) keeps it.
        node.put(Kind::User, "alice", u.clone()).await.unwrap();
        assert!(node.verify_password(Kind::User, "alice", pw).unwrap());
        // Password policy from the security settings.
        node.put(Kind::Security, "global", json!({"password_min_length": 30}))
            .await
            .unwrap();
        let e = node
            .patch(Kind::User, "alice", json!({"password": "still too short"}))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("password_min_length"), "{e}");
        assert!(!e.to_string().contains("still too short"), "{e}");
    });
    node.shutdown();
}

/// A peer's link as the node's pacing sees it: how many messages it holds unanswered.
struct Behind(std::sync::atomic::AtomicUsize);

impl peerconf::node::state::PeerInbox for Behind {
    fn accepting(&self) -> bool {
        true
    }
    fn deliver(&self, _work: peerconf::node::state::LinkWork) {}
    fn backlog(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Promise (issue 16, pacing): through the embedding API, a write waits while a peer's link
/// holds more than `PEER_BACKLOG_MAX` unanswered messages, at most `PEER_WAIT_MAX`, and is then
/// stored; the link counts as stalled and the next write does not wait, until the link makes
/// room again. Waiting writes are counted in `/metrics`.
#[test]
fn a_write_waits_for_a_peer_that_is_behind_at_most_the_cap() {
    use peerconf::node::{PEER_BACKLOG_MAX, PEER_WAIT_MAX};
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    let link = std::sync::Arc::new(Behind(PEER_BACKLOG_MAX.into()));
    node.published().peers.register("b", link.clone());
    let paced = || node.published().metrics.paced.get();
    rt().block_on(async {
        node.put(Kind::Group, "at-the-bound", json!({}))
            .await
            .unwrap();
        assert_eq!(paced(), 0, "a link at the bound is not waited for");

        link.0.store(1000, std::sync::atomic::Ordering::SeqCst);
        let t = std::time::Instant::now();
        node.put(Kind::Group, "behind", json!({})).await.unwrap();
        assert!(
            t.elapsed() >= PEER_WAIT_MAX,
            "went ahead of a link that is behind"
        );
        assert_eq!(paced(), 1);
        assert!(
            node.get(Kind::Group, "behind").unwrap().is_some(),
            "stored after the wait"
        );

        node.put(Kind::Group, "stalled", json!({})).await.unwrap();
        assert_eq!(paced(), 1, "waited again for a stalled link");

        node.published().peers.room_made("b");
        let t = std::time::Instant::now();
        node.put(Kind::Group, "again", json!({})).await.unwrap();
        assert!(
            t.elapsed() >= PEER_WAIT_MAX,
            "a link that made room is waited for again"
        );
        assert_eq!(paced(), 2);
    });
    node.shutdown();
}

#[test]
fn change_feed_reports_committed_changes() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    let mut feed = node.subscribe();
    rt().block_on(async {
        node.put(Kind::Group, "g", json!({"description": "a"}))
            .await
            .unwrap();
        node.put(Kind::Group, "g", json!({"description": "a"}))
            .await
            .unwrap(); // no change
        node.delete(Kind::Group, "g").await.unwrap();
        let a = feed.recv().await.unwrap();
        assert_eq!((a.kind, a.name.as_str(), a.alive), (Kind::Group, "g", true));
        let b = feed.recv().await.unwrap();
        assert_eq!((b.kind, b.alive), (Kind::Group, false));
        assert!(
            feed.try_recv().is_err(),
            "a write that changed nothing is not an event"
        );
    });
    node.shutdown();
}

#[test]
fn survives_reopen_and_compacts_long_histories() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    let writes = peerconf::store::CHUNKS_MAX as usize * 2 + 5;
    rt().block_on(async {
        for i in 0..writes {
            node.put(Kind::Script, "s", json!({"source": format!("line {i}\n")}))
                .await
                .unwrap();
            if i % 7 == 0 {
                // Evictions and reloads between writes must not lose or duplicate changes.
                let mut many = tokio::task::JoinSet::new();
                for j in 0..20 {
                    let node = node.clone();
                    many.spawn(async move {
                        node.put(Kind::Group, &format!("g{i}-{j}"), json!({})).await
                    });
                }
                while let Some(w) = many.join_next().await {
                    w.unwrap().unwrap();
                }
            }
        }
    });
    node.shutdown();
    let node = Node::open(dir.path(), opts(3)).unwrap();
    let s = node.get(Kind::Script, "s").unwrap().unwrap();
    assert_eq!(
        s["fields"]["source"],
        json!(format!("line {}\n", writes - 1))
    );
    assert_eq!(node.history(Kind::Script, "s").unwrap().len(), writes);
    rt().block_on(async {
        node.patch(Kind::Script, "s", json!({"description": "after reopen"}))
            .await
            .unwrap();
    });
    assert_eq!(node.history(Kind::Script, "s").unwrap().len(), writes + 1);
    node.shutdown();
}

#[test]
fn many_concurrent_writers_are_all_acknowledged_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(dir.path());
    let n = 3000; // more than the document cache holds
    rt().block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let node = node.clone();
            tasks.spawn(async move {
                node.put(Kind::User, &format!("u{i}"), json!({"quota_bytes": i}))
                    .await
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
    });
    let all = node.list(Kind::User).unwrap();
    assert_eq!(all.len(), n);
    for v in &all {
        let name = v["name"].as_str().unwrap();
        assert_eq!(format!("u{}", v["fields"]["quota_bytes"]), name);
    }
    node.shutdown();
}

#[test]
fn a_directory_is_opened_once_and_only_when_initialised() {
    let dir = tempfile::tempdir().unwrap();
    let e = Node::open(dir.path(), opts(1)).err().unwrap();
    assert!(e.to_string().contains("not an initialised"), "{e}");
    let node = fresh(dir.path());
    let e = Node::open(dir.path(), opts(4)).err().unwrap();
    assert!(e.to_string().contains("already in use"), "{e}");
    let e = Node::init(dir.path(), &Default::default(), &opts(5)).unwrap_err();
    assert!(
        e.to_string().contains("in use") || e.to_string().contains("already initialised"),
        "{e}"
    );
    node.shutdown();
    let e = Node::init(dir.path(), &Default::default(), &opts(5)).unwrap_err();
    assert!(e.to_string().contains("already initialised"), "{e}");
}

#[cfg(unix)]
#[test]
fn data_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let node = fresh(&dir.path().join("d"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("d")), 0o700);
    assert_eq!(
        mode(&dir.path().join("d").join(peerconf::node::DB_FILE)),
        0o600
    );
    node.shutdown();
}
