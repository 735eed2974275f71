//! Admin access control with real processes: API tokens replicate and their revocation, the
//! disabling and the deletion of their admin reach the other node; the last SuperAdmin survives
//! concurrent demotions through `peerconf admin reset`; history names the admin; no log line
//! holds a password, a hash or a token.

use crate::support::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const OPS_PW: &str = "Ops-password-17";

/// `POST /v1/login`: the session token, or the status and body of the refusal.
fn login(addr: &str, name: &str, pw: &str) -> Result<String, (u16, String)> {
    let body = json!({"name": name, "password": pw}).to_string();
    let (status, b) = http_as(addr, "POST", "/v1/login", Some(&body), None);
    if status != 200 {
        return Err((status, b));
    }
    let v: Value = serde_json::from_str(&b).expect("json");
    Ok(v["token"].as_str().expect("token").to_string())
}

fn http_as(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    try_http_as(addr, method, path, body, token).unwrap_or_else(|e| panic!("{e}"))
}

/// A new API token made with `session`.
fn api_token(addr: &str, session: &str) -> String {
    let (status, b) = http_as(
        addr,
        "POST",
        "/v1/api-tokens",
        Some(r#"{"ttl":"1h","label":"it"}"#),
        Some(session),
    );
    assert_eq!(status, 200, "{b}");
    let v: Value = serde_json::from_str(&b).expect("json");
    v["token"].as_str().expect("token").to_string()
}

/// A 2-node cluster with every log level on.
fn traced_cluster(root: &Path) -> Vec<ClusterNode> {
    let settings =
        r#"{"heartbeat_interval_ms":200,"offline_timeout_ms":2000,"replication_interval_ms":300}"#;
    form_cluster_env(root, 2, settings, &[("PEERCONF_LOG", "trace")])
}

/// Waits until `GET /v1/whoami` with `token` on `addr` answers `want`; the time it took.
fn until_answers(addr: &str, token: &str, want: u16, what: &str) -> Duration {
    let t0 = Instant::now();
    let mut last = (0, String::new());
    let ok = wait_for(Duration::from_secs(10), || {
        last = http_as(addr, "GET", "/v1/whoami", None, Some(token));
        (last.0 == want).then_some(())
    });
    assert!(
        ok.is_some(),
        "{what}: still {} {} after 10 s",
        last.0,
        last.1
    );
    t0.elapsed()
}

/// Promise: an API token made on n1 works on n2; revoking it, disabling its admin and deleting
/// its admin on n1 each make n2 refuse it (once the change replicates); history names the admin
/// who made a change through the API and through the CLI; no log line, at any level, holds a
/// password, a password hash or a token used in the test.
#[test]
fn api_tokens_replicate_and_their_revocation_reaches_the_other_node() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = traced_cluster(tmp.path());
    let (a1, a2) = (nodes[0].api.clone(), nodes[1].api.clone());
    let o = nodes[0].d.cli(&[
        "put",
        "admin",
        "ops",
        "--json",
        &json!({"role": "admin", "password": OPS_PW}).to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let session = login(&a1, "ops", OPS_PW).expect("ops logs in on n1");
    let mut secrets = vec![session.clone()];

    // Made on n1, accepted on n2; revoked on n1, refused on n2.
    let t = api_token(&a1, &session);
    secrets.push(t.clone());
    let seen = until_answers(&a2, &t, 200, "a token made on n1, on n2");
    let id = t.split('_').nth(1).expect("id");
    let (status, b) = http_as(
        &a1,
        "DELETE",
        &format!("/v1/api-tokens/{id}"),
        None,
        Some(&session),
    );
    assert_eq!(status, 200, "{b}");
    let revoked = until_answers(&a2, &t, 401, "a revoked token, on n2");

    // The admin disabled, then deleted.
    let t = api_token(&a1, &session);
    secrets.push(t.clone());
    until_answers(&a2, &t, 200, "a second token, on n2");
    // History names ops for a change through the API and one through the CLI.
    let (status, b) = http_as(
        &a2,
        "PUT",
        "/v1/entities/group/staff",
        Some(r#"{"description":"by ops over HTTP"}"#),
        Some(&t),
    );
    assert_eq!(status, 200, "{b}");
    let o = cli_as(
        &a1,
        &[
            "put",
            "group",
            "staff",
            "--json",
            r#"{"description":"by ops with the CLI"}"#,
        ],
        None,
        Some(&t),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let h = stdout_json(&nodes[0].d.cli(&["history", "group", "staff"]));
    let by: Vec<&str> = h["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["by"].as_str())
        .collect();
    assert!(by.iter().filter(|b| **b == "ops").count() >= 2, "{h}");

    let o = nodes[0]
        .d
        .cli(&["patch", "admin", "ops", "--json", r#"{"enabled":false}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    let disabled = until_answers(&a2, &t, 401, "a disabled admin's token, on n2");
    assert_eq!(
        http_as(&a1, "GET", "/v1/whoami", None, Some(&session)).0,
        401,
        "a disabled admin's session still works"
    );
    let o = nodes[0]
        .d
        .cli(&["patch", "admin", "ops", "--json", r#"{"enabled":true}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    until_answers(&a2, &t, 200, "the token of an admin enabled again, on n2");
    let o = nodes[0].d.cli(&["delete", "admin", "ops"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let deleted = until_answers(&a2, &t, 401, "a deleted admin's token, on n2");
    eprintln!(
        "token accepted on n2 after {seen:?}; refused on n2 after revocation {revoked:?}, disabling {disabled:?}, deletion {deleted:?}"
    );

    // No log line holds a password, a hash or a token of this test.
    for n in nodes.iter_mut() {
        n.stop();
    }
    let mut needles: Vec<String> = vec![
        ADMIN_PW.into(),
        OPS_PW.into(),
        "$argon2".into(),
        "pcat_".into(),
        "pcs_".into(),
    ];
    needles.extend(secrets.iter().map(|s| s[s.len() - 32..].to_string()));
    for n in &nodes {
        let log = n.d.log_text();
        assert!(
            log.lines().count() > 20,
            "{}: the trace log is nearly empty",
            n.name
        );
        for needle in &needles {
            if let Some(line) = log.lines().find(|l| l.contains(needle.as_str())) {
                panic!("{}'s log holds a secret ({needle:.6}...): {line}", n.name);
            }
        }
    }
}

/// Promise: two nodes cut off from each other can each demote one of the last two SuperAdmins;
/// once they meet none is left, and `peerconf admin reset` on a stopped node makes one again, a
/// change that replicates.
#[test]
fn concurrent_demotions_of_the_last_superadmins_and_admin_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = form_cluster(
        tmp.path(),
        2,
        r#"{"heartbeat_interval_ms":200,"offline_timeout_ms":2000,"replication_interval_ms":300}"#,
    );
    let (a1, a2) = (nodes[0].api.clone(), nodes[1].api.clone());
    let o = nodes[0].d.cli(&[
        "put",
        "admin",
        "root2",
        "--json",
        &json!({"role": "superadmin", "password": "Root2-password-1"}).to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for(Duration::from_secs(10), || {
        http_json(&a2, "/v1/entities/admin/root2").map(|_| ())
    })
    .expect("root2 reaches n2");
    let demote = r#"{"role":"admin"}"#;
    // Cut off: n2 stopped while n1 demotes root2; n1 stopped while n2 demotes admin.
    nodes[1].stop();
    let o = nodes[0]
        .d
        .cli(&["patch", "admin", "root2", "--json", demote]);
    assert!(o.status.success(), "n1 demotes root2: {}", stderr(&o));
    nodes[0].stop();
    nodes[1].restart();
    forget_token(&a2);
    let o = nodes[1]
        .d
        .cli(&["patch", "admin", "admin", "--json", demote]);
    assert!(o.status.success(), "n2 demotes admin: {}", stderr(&o));
    nodes[0].restart();
    forget_token(&a1);
    // They meet: no enabled SuperAdmin is left, on either node.
    let roles = |addr: &str| -> Option<Vec<String>> {
        let t = login(addr, "root2", "Root2-password-1").ok()?;
        let (s, b) = http_as(addr, "GET", "/v1/entities/admin", None, Some(&t));
        (s == 200).then_some(())?;
        let v: Value = serde_json::from_str(&b).ok()?;
        Some(
            v.as_array()?
                .iter()
                .map(|a| a["fields"]["role"].as_str().unwrap_or("").to_string())
                .collect(),
        )
    };
    for addr in [&a1, &a2] {
        wait_for(Duration::from_secs(15), || {
            let r = roles(addr)?;
            // An Admin lists only its own account: both demotions arrived when root2 sees
            // itself demoted and admin can no longer create tokens.
            (r == ["admin"]).then_some(())
        })
        .unwrap_or_else(|| panic!("root2 still a superadmin on {addr}"));
    }
    // n2's demotion of admin reached n1 too.
    wait_for(Duration::from_secs(15), || {
        let t = login(&a1, "admin", ADMIN_PW).ok()?;
        let (s, _) = http_as(&a1, "GET", "/v1/tokens", None, Some(&t));
        (s == 403).then_some(())
    })
    .expect("admin still a superadmin on n1 after the meeting");

    // admin reset on stopped n1: a SuperAdmin again, on both nodes.
    nodes[0].stop();
    let pw_file = tmp.path().join("reset-pw");
    std::fs::write(&pw_file, "Reset-password-1\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["admin", "reset", "--data-dir"])
        .arg(&nodes[0].dir)
        .args(["--user", "admin", "--password-file"])
        .arg(&pw_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "admin reset: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("Reset-password-1"),
        "reset printed the given password"
    );
    nodes[0].restart();
    for addr in [&a1, &a2] {
        wait_for(Duration::from_secs(15), || {
            let t = login(addr, "admin", "Reset-password-1").ok()?;
            let (s, _) = http_as(addr, "GET", "/v1/tokens", None, Some(&t));
            (s == 200).then_some(())
        })
        .unwrap_or_else(|| panic!("admin is not a SuperAdmin again on {addr}"));
    }
    let h = stdout_json(&cli_as(
        &a2,
        &["history", "admin", "admin"],
        None,
        Some(&login(&a2, "admin", "Reset-password-1").expect("login")),
    ));
    assert!(
        h["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .any(|c| c["by"] == "admin-reset"),
        "{h}"
    );
}

/// Promise: without credentials every admin command is refused and says to run `peerconf
/// login`; `login` stores a session (mode 0600 under XDG_CONFIG_HOME) the CLI then uses;
/// `logout` ends it; `api-token create` prints the token alone on its last line.
#[test]
fn the_cli_logs_in_and_out_and_makes_api_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (api, _ipc, _id) = init_node(&dir, "n1");
    let _d = Daemon::start(&dir, &api);
    let config = tmp.path().join("config");
    let pc = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = std::process::Command::new(BIN)
            .env_remove("PEERCONF_TOKEN")
            .env("XDG_CONFIG_HOME", &config)
            .arg("--api")
            .arg(format!("http://{api}"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let o = pc(&["list", "user"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("peerconf login"), "{}", stderr(&o));
    let o = pc(&["login", "--user", "admin"], Some("wrong-password\n"));
    assert!(!o.status.success(), "a wrong password logged in");
    let o = pc(
        &["login", "--user", "admin"],
        Some(&format!("{ADMIN_PW}\n")),
    );
    assert!(o.status.success(), "login: {}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("pcs_"));
    let o = pc(&["list", "user"], None);
    assert!(o.status.success(), "the stored session: {}", stderr(&o));
    let files: Vec<_> = walk(&config);
    assert!(!files.is_empty(), "login stored nothing");
    for f in &files {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is mode {mode:o}", f.display());
    }
    let o = pc(
        &["api-token", "create", "--ttl", "1h", "--label", "ci"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let token = out.lines().last().unwrap_or_default().trim().to_string();
    assert!(token.starts_with("pcat_"), "{out:?}");
    let o = cli_as(&api, &["list", "user"], None, Some(&token));
    assert!(o.status.success(), "PEERCONF_TOKEN: {}", stderr(&o));
    let o = pc(&["--token", &token, "list", "user"], None);
    assert!(o.status.success(), "--token: {}", stderr(&o));
    let o = pc(&["api-token", "list"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = String::from_utf8_lossy(&o.stdout).to_string();
    let id = token.split('_').nth(1).unwrap();
    assert!(
        listing.contains(id) && !listing.contains(&token[20..]),
        "{listing}"
    );
    let o = pc(&["api-token", "revoke", id], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli_as(&api, &["list", "user"], None, Some(&token));
    assert!(!o.status.success(), "a revoked token still works");
    assert!(stderr(&o).contains("login"), "{}", stderr(&o));
    let o = pc(&["logout"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pc(&["list", "user"], None);
    assert!(!o.status.success(), "the session survived logout");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
