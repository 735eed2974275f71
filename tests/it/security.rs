//! Cluster security with real processes: a node refuses to start on a data directory whose
//! secrets others could read, and join tokens can be listed and revoked.

use crate::support::*;
use peerconf::cluster::join::{secret_hash, Token};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// As ssh's StrictModes: `peerconf run` refuses a data directory where group or others can read
/// or write a key, the database, its log or node.json, or write in the directory; the message
/// names the file, its mode and the chmod to run. Put back, the node runs.
#[test]
fn run_refuses_secrets_readable_by_others() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("n1");
    let (api, _ipc, _id) = init_node(&dir, "n1");
    let cases = [
        (dir.join("tls/node.key"), 0o644, 0o600),
        (dir.join("tls/ca.key"), 0o640, 0o600),
        (dir.join("peerconf.redb"), 0o604, 0o600),
        (dir.join("peerconf.redb.wal"), 0o620, 0o600),
        (dir.join("node.json"), 0o660, 0o600),
        (dir.clone(), 0o777, 0o700),
        (dir.clone(), 0o720, 0o700),
    ];
    for (path, open, fixed) in cases {
        assert!(path.exists(), "{} was not made by init", path.display());
        chmod(&path, open);
        let o = run_must_fail(&dir);
        chmod(&path, fixed);
        assert!(
            !o.status.success(),
            "ran with {open:o} on {}",
            path.display()
        );
        let err = stderr(&o);
        for words in [
            "permissions too open".to_string(),
            path.display().to_string(),
            format!("mode {open:04o}"),
            format!("chmod {fixed:o} {}", path.display()),
        ] {
            assert!(err.contains(&words), "{:?} does not say {words:?}", err);
        }
    }
    // Certificates are public: 0644 is fine for them.
    chmod(&dir.join("tls/node.crt"), 0o644);
    let mut d = Daemon::start(&dir, &api);
    let info = http_json(&api, "/v1/node").expect("the node answers");
    assert!(info["id"].is_string(), "{info}");
    assert!(d.stop().success(), "{}", d.log_text());
}

/// A token's ID in `peerconf token list`: the start of the hash of its secret.
fn id_of(token: &str) -> String {
    let secret = Token::parse(token).expect("a token").secret;
    secret_hash(&secret)[..12].to_string()
}

fn states(listed: &serde_json::Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = listed["tokens"]
        .as_array()
        .expect("a list of tokens")
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap_or("?").to_string(),
                t["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Two tokens are listed (IDs, never the tokens nor their hashes); one is revoked; a join with it
/// is refused naming the revocation and creates nothing; the other still joins a node.
#[test]
fn a_revoked_join_token_is_refused_and_the_others_still_work() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("n1");
    let (api, ipc, _id) = init_node(&dir, "n1");
    let mut d = Daemon::start(&dir, &api);
    wait_listening(&ipc, "n1's IPC port");
    let (t1, t2) = (token_create(&api, None), token_create(&api, None));
    let (id1, id2) = (id_of(&t1), id_of(&t2));
    let listed = stdout_json(&d.cli(&["token", "list"]));
    let mut want = vec![
        (id1.clone(), "valid".to_string()),
        (id2.clone(), "valid".to_string()),
    ];
    want.sort();
    assert_eq!(states(&listed), want, "{listed}");
    let text = listed.to_string();
    for t in [&t1, &t2] {
        let secret = Token::parse(t).expect("token").secret;
        assert!(
            !text.contains(&secret),
            "a token's secret is listed: {text}"
        );
        assert!(
            !text.contains(&secret_hash(&secret)),
            "a token's whole hash is listed: {text}"
        );
    }

    let revoked = stdout_json(&d.cli(&["token", "revoke", &id1]));
    assert_eq!(revoked["revoked"]["id"], serde_json::json!(id1));
    assert_eq!(revoked["revoked"]["state"], serde_json::json!("revoked"));
    let unknown = d.cli(&["token", "revoke", "0123456789ab"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no join token with ID 0123456789ab"),
        "{}",
        stderr(&unknown)
    );

    let n2 = root.path().join("n2");
    let (o, _, _) = join_node(&n2, &ipc, &t1, "n2", &[]);
    assert!(!o.status.success(), "joined with a revoked token");
    let err = stderr(&o);
    assert!(
        err.contains("revoked"),
        "the refusal does not name the revocation: {err}"
    );
    assert!(
        err.contains(&id1),
        "the refusal does not name the token: {err}"
    );
    assert!(
        !n2.join("peerconf.redb").exists(),
        "a refused join left a node"
    );

    let n3 = root.path().join("n3");
    let (o, api3, ipc3) = join_node(&n3, &ipc, &t2, "n3", &[]);
    assert!(
        o.status.success(),
        "join with the other token: {}",
        stderr(&o)
    );
    let mut d3 = Daemon::start(&n3, &api3);
    wait_listening(&ipc3, "n3's IPC port");
    let listed = stdout_json(&d.cli(&["token", "list"]));
    let mut want = vec![(id1, "revoked".to_string()), (id2, "used".to_string())];
    want.sort();
    assert_eq!(states(&listed), want, "{listed}");
    let members = stdout_json(&d.cli(&["node", "list"]));
    assert_eq!(
        members["members"].as_array().map(Vec::len),
        Some(2),
        "{members}"
    );
    assert!(d3.stop().success(), "{}", d3.log_text());
    assert!(d.stop().success(), "{}", d.log_text());
}
