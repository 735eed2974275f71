//! Real processes: `peerconf init`, `peerconf run`, every CLI command, restarts and `kill -9`.

use crate::support::*;
use serde_json::json;
use std::process::Command;

#[test]
fn init_prints_a_node_id_and_refuses_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let o = Command::new(BIN)
        .arg("init")
        .args(admin_args())
        .arg("--data-dir")
        .arg(&dir)
        .args(["--api-listen", &free_addr()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let id = out.trim();
    assert_eq!(id.len(), 32, "node ID {id:?}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let o = Command::new(BIN)
        .arg("init")
        .args(admin_args())
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already initialised"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(id),
        "the refusal names the existing node: {}",
        stderr(&o)
    );
    // A second node gets another ID.
    let o2 = Command::new(BIN)
        .arg("init")
        .args(admin_args())
        .arg("--data-dir")
        .arg(tmp.path().join("n2"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8(o2.stdout).unwrap().trim(), id);
}

#[test]
fn run_refuses_an_uninitialised_or_busy_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(tmp.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not an initialised peerconf data directory"),
        "{}",
        stderr(&o)
    );
    assert!(
        !tmp.path().join("none").exists(),
        "run must not create a directory"
    );

    let dir = tmp.path().join("n");
    let api = init(&dir, "n");
    let _d = Daemon::start(&dir, &api);
    let o = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already in use"), "{}", stderr(&o));
}

#[test]
fn every_cli_command_against_a_running_node() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let api = init(&dir, "n");
    let d = Daemon::start(&dir, &api);

    // put with --json and from stdin
    stdout_json(&d.cli(&[
        "put",
        "site",
        "s1",
        "--json",
        r#"{"protocols":["sftp"],"bindings":["0.0.0.0:2222"]}"#,
    ]));
    let u = stdout_json(&d.cli_stdin(
        &["put", "user", "alice"],
        r#"{"home_dir":"/srv/alice","site":"s1","password":"a long enough pw"}"#,
    ));
    assert_eq!(u["fields"]["home_dir"], json!("/srv/alice"));
    assert!(!u.to_string().contains("long enough"));
    // get, list
    let g = stdout_json(&d.cli(&["get", "user", "alice"]));
    assert_eq!(g["fields"]["site"], json!("s1"));
    let l = stdout_json(&d.cli(&["list", "user"]));
    assert_eq!(l.as_array().unwrap().len(), 1);
    assert_eq!(l[0]["name"], json!("alice"));
    // patch, history
    stdout_json(&d.cli(&["patch", "user", "alice", "--json", r#"{"quota_bytes":77}"#]));
    let h = stdout_json(&d.cli(&["history", "user", "alice"]));
    let changes = h["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1]["fields"], json!(["quota_bytes"]));
    assert_eq!(changes[1]["op"], json!("patch"));
    // schema
    let s = stdout_json(&d.cli(&["schema"]));
    assert_eq!(s["kinds"].as_array().unwrap().len(), 10);
    let s = stdout_json(&d.cli(&["schema", "rule"]));
    assert_eq!(s["kinds"][0]["kind"], json!("rule"));
    // conflicts: none on a single node
    let c = stdout_json(&d.cli(&["conflicts"]));
    assert_eq!(c["conflicts"], json!([]));
    // delete
    stdout_json(&d.cli(&["delete", "user", "alice"]));
    let o = d.cli(&["get", "user", "alice"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("user \"alice\" not found"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn cli_errors_name_what_was_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let api = init(&dir, "n");
    let d = Daemon::start(&dir, &api);
    let cases: &[(&[&str], &str)] = &[
        (
            &["put", "nosuchkind", "x", "--json", "{}"],
            "unknown kind \"nosuchkind\"",
        ),
        (
            &["put", "user", "bob", "--json", r#"{"quota_bytes":"lots"}"#],
            "user.quota_bytes: wrong type",
        ),
        (
            &["put", "user", "bob", "--json", r#"{"shoe":1}"#],
            "user.shoe: unknown field",
        ),
        (
            &["put", "user", "bob", "--json", r#"{"quota_bytes":-5}"#],
            "user.quota_bytes",
        ),
        (
            &["put", "user", "bob", "--json", r#"{"site":"nope"}"#],
            "user.site: site \"nope\" does not exist",
        ),
        (
            &["put", "user", "bob", "--json", "{not json"],
            "not valid JSON",
        ),
        (&["put", "user", "bad/name", "--json", "{}"], "invalid name"),
        (
            &["patch", "user", "ghost", "--json", "{}"],
            "user \"ghost\" not found",
        ),
        (&["get", "site", "ghost"], "site \"ghost\" not found"),
        (&["history", "site", "ghost"], "site \"ghost\" not found"),
        (
            &["put", "settings", "other", "--json", "{}"],
            "single entity named \"global\"",
        ),
        (&["schema", "widget"], "unknown kind"),
    ];
    for (args, want) in cases {
        let o = d.cli(args);
        assert_eq!(o.status.code(), Some(1), "{args:?} did not fail");
        assert!(
            stderr(&o).contains(want),
            "{args:?}: stderr {:?} lacks {want:?}",
            stderr(&o)
        );
        assert!(o.stdout.is_empty(), "{args:?}: an error printed to stdout");
    }
    assert_eq!(
        stdout_json(&d.cli(&["list", "user"])),
        json!([]),
        "refused writes left something"
    );
    // An unreachable node is named.
    let o = cli(&free_addr(), &["list", "user"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot reach the node API"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn restart_keeps_everything_and_sigterm_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let api = init(&dir, "n");
    let mut d = Daemon::start(&dir, &api);
    for i in 0..20 {
        stdout_json(&d.cli(&[
            "put",
            "group",
            &format!("g{i}"),
            "--json",
            &format!(r#"{{"description":"d{i}"}}"#),
        ]));
    }
    stdout_json(&d.cli(&["put", "script", "sc", "--json", r#"{"source":"a\nb\n"}"#]));
    let status = d.stop();
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}; log: {}",
        d.log_text()
    );
    let d2 = Daemon::start(&dir, &api);
    let l = stdout_json(&d2.cli(&["list", "group"]));
    assert_eq!(l.as_array().unwrap().len(), 20);
    let s = stdout_json(&d2.cli(&["get", "script", "sc"]));
    assert_eq!(s["fields"]["source"], json!("a\nb\n"));
}

/// An acknowledged write survives `kill -9` issued the moment the acknowledgement arrives.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let api = init(&dir, "n");
    for round in 0..3 {
        let mut d = Daemon::start(&dir, &api);
        let name = format!("dave{round}");
        stdout_json(&d.cli(&[
            "put",
            "user",
            &name,
            "--json",
            r#"{"home_dir":"/srv/dave"}"#,
        ]));
        d.kill9();
        let d = Daemon::start(&dir, &api);
        let g = stdout_json(&d.cli(&["get", "user", &name]));
        assert_eq!(g["fields"]["home_dir"], json!("/srv/dave"), "round {round}");
        drop(d);
    }
}

/// Promise: `init` without `--admin-password-file` makes the SuperAdmin `admin` with a random
/// password printed once on stdout, labelled, after the node ID; it logs in, and no file of the
/// data directory holds it in clear.
#[test]
fn init_without_a_password_prints_a_generated_one_that_logs_in() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let api = free_addr();
    let o = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(&dir)
        .args(["--api-listen", &api, "--ipc-listen", &free_addr()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next().map(str::len), Some(32), "{out}");
    let pw = lines
        .find_map(|l| l.strip_prefix("password (shown once, store it now): "))
        .unwrap_or_else(|| panic!("no labelled password in {out:?}"))
        .trim()
        .to_string();
    assert!(pw.len() >= 16, "{pw:?}");
    assert!(out.contains("first SuperAdmin: admin"), "{out}");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.path().is_file() {
            let bytes = std::fs::read(e.path()).unwrap();
            let found = bytes.windows(pw.len()).any(|w| w == pw.as_bytes());
            assert!(!found, "{} holds the password in clear", e.path().display());
        }
    }
    let _d = Daemon::start(&dir, &api);
    let body = json!({"name": "admin", "password": pw}).to_string();
    let (status, b) = try_http_as(&api, "POST", "/v1/login", Some(&body), None).unwrap();
    assert_eq!(status, 200, "{b}");
}

/// A one-request-per-connection HTTP server on loopback that answers with `answers` in turn
/// (status, JSON body) and counts the requests it got.
fn scripted_api(
    answers: Vec<(u16, &'static str)>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for (status, body) in answers {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut r = BufReader::new(stream);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut req_body = vec![0; len];
            let _ = r.read_exact(&mut req_body);
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut s = r.into_inner();
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, count)
}

/// A command typed right after `peerconf run` meets a node that is still opening its store
/// (503 `recovering`): the CLI waits for it instead of failing; any other 503 is reported at once.
#[test]
fn the_cli_waits_for_a_starting_node_and_reports_other_refusals_at_once() {
    let starting = r#"{"error":{"code":"recovering","message":"the node is starting"}}"#;
    let session = r#"{"token":"pcs_0123456789abcdef0123456789abcdef","name":"admin","role":"superadmin","expires_at_ms":4102444800000}"#;
    let (api, count) = scripted_api(vec![
        (503, starting),
        (503, starting),
        (503, starting),
        (200, session),
    ]);
    let url = format!("http://{api}");
    let o = run_cli(
        &["--api", &url, "login", "--user", "admin"],
        Some("whatever-pw"),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 4);

    let busy = r#"{"error":{"code":"busy","message":"too many logins are being checked"}}"#;
    let (api, count) = scripted_api(vec![(503, busy), (200, session)]);
    let url = format!("http://{api}");
    let o = run_cli(
        &["--api", &url, "login", "--user", "admin"],
        Some("whatever-pw"),
        None,
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("too many logins are being checked"),
        "{}",
        stderr(&o)
    );
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Promise: a client command whose reader goes away (`peerconf list group | head -1`) ends
/// quietly, like other Unix tools, instead of panicking on the broken pipe (seen as "failed
/// printing to stdout: Broken pipe" in an acceptance run that piped `history` into `grep -q`).
#[test]
fn a_closed_stdout_ends_a_client_command_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    let api = init(&dir, "n");
    let d = Daemon::start(&dir, &api);
    let o = d.cli(&["put", "group", "g", "--json", r#"{"description":"x"}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut child = Command::new(BIN)
        .env("XDG_CONFIG_HOME", cli_config_dir())
        .env("PEERCONF_TOKEN", token_for(&api).expect("a token"))
        .args(["--api", &format!("http://{api}"), "list", "group"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The reading end closes before the command prints anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}
