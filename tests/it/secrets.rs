//! Secrets that can be forgotten, with real processes: after a password change, a user delete
//! and a certificate delete on a 3-node cluster, and a key rotation (`peerconf compact`), no
//! file of any node holds an old value that can be read, and a node joined afterwards never
//! received one; the values still in use are found by the same scan (it is not blind).

use crate::support::*;
use peerconf::node::setup::DB_FILE;
use peerconf::store::secrets::{os_fill, KeyFile, Keyring};
use peerconf::store::{sealed_copies, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

const FAST: &str = r#"{"replication_interval_ms":500}"#;

/// A fresh self-signed certificate and its private key (PEM).
fn cert_pair(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![format!("{name}.example")])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Every file under `dir`, read whole.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let b = std::fs::read(&p).unwrap();
                out.push((p, b));
            }
        }
    }
    out
}

/// The key ring of a stopped node.
fn keyring(dir: &Path) -> Keyring {
    Keyring::open(KeyFile::beside(&dir.join(DB_FILE)), true, os_fill()).unwrap()
}

/// Copies of a secret value readable with the node's own keys, in any of its files.
fn readable_copies(dir: &Path, id: &str, field: &str, value: &str) -> usize {
    let keys = keyring(dir);
    files(dir)
        .iter()
        .map(|(_, b)| sealed_copies(b, &keys, id, field, value))
        .sum()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// No file of the node holds `text` in the clear.
fn assert_nowhere(dir: &Path, text: &str, what: &str) {
    for (p, b) in files(dir) {
        assert!(
            !contains(&b, text.as_bytes()),
            "{what} is in the clear in {}",
            p.display()
        );
    }
}

/// The body of a PEM, one line of it: what would show if the PEM were stored anywhere.
fn pem_line(pem: &str) -> String {
    pem.lines().nth(2).unwrap().to_string()
}

fn names(api: &str, kind: &str) -> Option<Vec<String>> {
    let v = http_json(api, &format!("/v1/entities/{kind}"))?;
    Some(
        v.as_array()?
            .iter()
            .filter_map(|e| e["name"].as_str().map(String::from))
            .collect(),
    )
}

fn history_len(api: &str, kind: &str, name: &str) -> Option<usize> {
    let v = http_json(api, &format!("/v1/entities/{kind}/{name}/history"))?;
    v["changes"].as_array().map(|a| a.len())
}

#[test]
fn replaced_and_deleted_secrets_are_unreadable_everywhere_after_compaction() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 3, FAST);
    let (old_cert, old_key) = cert_pair("old");
    let (kept_cert, kept_key) = cert_pair("kept");
    let put = |kind: &str, name: &str, body: serde_json::Value| {
        let o = ns[0]
            .d
            .cli(&["put", kind, name, "--json", &body.to_string()]);
        assert!(o.status.success(), "put {kind}/{name}: {}", stderr(&o));
    };
    put(
        "certificate",
        "old",
        serde_json::json!({"cert_pem": old_cert, "key_pem": old_key}),
    );
    put(
        "certificate",
        "kept",
        serde_json::json!({"cert_pem": kept_cert, "key_pem": kept_key}),
    );
    put(
        "user",
        "alice",
        serde_json::json!({"password": "first-Passw0rd!"}),
    );
    put(
        "user",
        "bob",
        serde_json::json!({"password": "bobs-Passw0rd!"}),
    );
    put(
        "user",
        "carol",
        serde_json::json!({"password": "carols-Passw0rd!"}),
    );
    for n in &ns {
        wait_for(Duration::from_secs(30), || {
            let users = names(&n.api, "user")?;
            let certs = names(&n.api, "certificate")?;
            (users.len() == 3 && certs.len() == 2).then_some(())
        })
        .unwrap_or_else(|| panic!("{} did not receive the entities", n.name));
    }

    // The password hashes as the nodes hold them (the same on every node): read from n2's store
    // while it is stopped. No read path of the API returns them.
    ns[1].stop();
    let db = ns[1].dir.join(DB_FILE);
    let (alice1, bob1, carol1) = {
        let store = Store::open(&db).unwrap();
        let get = |name: &str| {
            store
                .secret(&format!("user/{name}"), "password")
                .unwrap()
                .unwrap_or_else(|| panic!("{name}'s password hash is not held"))
        };
        (get("alice"), get("bob"), get("carol"))
    };
    assert!(alice1.starts_with("$argon2"), "{alice1:?}");
    // The scan finds values that are held: it is not blind.
    assert!(readable_copies(&ns[1].dir, "user/alice", "password", &alice1) > 0);
    ns[1].restart();

    // Replace one password, delete a user and a certificate, on n1.
    let o = ns[0].d.cli(&[
        "patch",
        "user",
        "alice",
        "--json",
        r#"{"password":"second-Passw0rd!"}"#,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (kind, name) in [("user", "bob"), ("certificate", "old")] {
        let o = ns[0].d.cli(&["delete", kind, name]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for n in &ns {
        wait_for(Duration::from_secs(30), || {
            let users = names(&n.api, "user")?;
            let certs = names(&n.api, "certificate")?;
            let alice = history_len(&n.api, "user", "alice")?;
            (users.len() == 2 && certs == ["kept"] && alice == 2).then_some(())
        })
        .unwrap_or_else(|| panic!("{} did not receive the changes", n.name));
    }
    for n in &ns {
        let r = stdout_json(&n.d.cli(&["compact"]));
        let retired = r["retired"].as_array().unwrap();
        assert!(!retired.is_empty(), "{}: {r}", n.name);
        assert!(!retired.contains(&r["key"]), "{}: {r}", n.name);
    }

    // A node that joins afterwards.
    let token = token_create(&ns[0].api, None);
    let dir4 = tmp.path().join("n4");
    let (o, api4, ipc4) = join_node(&dir4, &ns[0].ipc, &token, "n4", &[]);
    assert!(o.status.success(), "join of n4 failed: {}", stderr(&o));
    let mut d4 = Daemon::start(&dir4, &api4);
    wait_listening(&ipc4, "n4's IPC port");
    wait_for(Duration::from_secs(30), || {
        let users = names(&api4, "user")?;
        let certs = names(&api4, "certificate")?;
        (users.len() == 2 && certs == ["kept"]).then_some(())
    })
    .expect("n4 did not receive the entities");
    let status = d4.stop();
    assert!(status.success(), "n4: {}", d4.log_text());
    for n in &mut ns {
        n.stop();
    }

    let mut dirs: Vec<(String, PathBuf)> =
        ns.iter().map(|n| (n.name.clone(), n.dir.clone())).collect();
    dirs.push(("n4".into(), dir4));
    for (name, dir) in &dirs {
        let keys = keyring(dir);
        assert_eq!(keys.key_ids().len(), 1, "{name} still holds old keys");
        for (id, field, value, what) in [
            (
                "user/alice",
                "password",
                alice1.as_str(),
                "alice's old hash",
            ),
            ("user/bob", "password", bob1.as_str(), "deleted bob's hash"),
            (
                "certificate/old",
                "key_pem",
                old_key.as_str(),
                "deleted key",
            ),
        ] {
            assert_eq!(
                readable_copies(dir, id, field, value),
                0,
                "{name}: {what} can still be read from its files"
            );
        }
        // What is still in use is found by the same scan.
        assert!(
            readable_copies(dir, "user/carol", "password", &carol1) > 0,
            "{name}: carol's hash not found"
        );
        assert!(
            readable_copies(dir, "certificate/kept", "key_pem", &kept_key) > 0,
            "{name}: the kept key not found"
        );
        // Nothing secret is in the clear, in any file.
        for (text, what) in [
            (pem_line(&old_key), "the deleted private key"),
            (pem_line(&kept_key), "the kept private key"),
            ("$argon2".to_string(), "a password hash"),
            ("first-Passw0rd!".to_string(), "a password"),
        ] {
            assert_nowhere(dir, &text, &format!("{name}: {what}"));
        }
    }
}
