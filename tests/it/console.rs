//! The web console's server side and the Setup UI, through real processes: `peerconf setup`
//! refusing field by field and then becoming the node on the same address; the console's
//! cookie session, its anti-CSRF header and its security headers. (The pages themselves are
//! driven in a browser by `tests/web/`.)

use crate::support::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;

/// One HTTP/1.1 request with the headers given; returns (status, head, body).
fn raw(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        extra.push_str("Content-Type: application/json\r\n");
    }
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.to_string(), rest.to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// `peerconf setup` on a fresh directory; returns the process (killed when dropped), its address
/// and its setup code, read from the first URL it printed.
fn start_setup(dir: &std::path::Path) -> (Daemon, String, String) {
    start_setup_env(dir, &[])
}

/// [`start_setup`] with extra environment variables (an advertised version).
fn start_setup_env(dir: &std::path::Path, envs: &[(&str, &str)]) -> (Daemon, String, String) {
    let listen = free_addr();
    let log = dir.with_extension("setup.log");
    let child = Command::new(BIN)
        .args(["setup", "--data-dir"])
        .arg(dir)
        .args(["--listen", &listen])
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("spawn peerconf setup");
    let d = Daemon {
        child: Some(child),
        api: listen.clone(),
        log: log.clone(),
    };
    let url = wait_for(Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let first = text
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))?;
        Some(first.to_string())
    })
    .unwrap_or_else(|| panic!("peerconf setup printed no URL: {}", d.log_text()));
    assert!(
        url.starts_with(&format!("http://{listen}/setup#code=")),
        "the first URL printed is not the Setup UI's: {url}"
    );
    let code = url.rsplit('=').next().unwrap().to_string();
    assert_eq!(code.len(), 32, "{url}");
    (d, listen, code)
}

#[test]
fn setup_refuses_field_by_field_then_the_same_process_becomes_the_node() {
    let tmp = tempfile::tempdir().unwrap();
    let n1_dir = tmp.path().join("n1");
    let (n1_api, n1_ipc, _) = init_node(&n1_dir, "n1");
    let _n1 = Daemon::start(&n1_dir, &n1_api);
    let dir = tmp.path().join("n2");
    let (mut d, addr, code) = start_setup(&dir);

    let (status, head, body) = raw(&addr, "GET", "/setup", &[], "");
    assert_eq!(status, 200, "{body}");
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = header(&head, "content-security-policy").expect("a CSP");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    // Nothing but the Setup UI until the node is set up.
    let (status, _, body) = raw(&addr, "GET", "/v1/status", &[], "");
    assert_eq!(status, 503, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], "not_set_up");

    let ipc = free_addr();
    let token = token_create(&n1_api, None);
    let join = |fields: Value| {
        let mut body = json!({"code": code, "node_name": "n2", "ipc_listen": ipc, "peer": n1_ipc, "token": token});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, text) = raw(&addr, "POST", "/setup/join", &[], &body.to_string());
        (status, json_of(&text))
    };
    let refused = |fields: Value, field: &str, words: &str| {
        let (status, v) = join(fields.clone());
        assert_eq!(status, 400, "{fields}: {v}");
        assert_eq!(v["error"]["field"], field, "{fields}: {v}");
        let msg = v["error"]["message"].as_str().unwrap().to_lowercase();
        assert!(msg.contains(words), "{fields}: {msg:?} lacks {words:?}");
        assert!(
            !dir.join("peerconf.redb").exists() && !dir.join("tls").exists(),
            "a refused attempt created files"
        );
    };
    let (status, v) = join(json!({"code": "0".repeat(32)}));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("setup_code")),
        "{v}"
    );
    refused(json!({"node_name": "bad name!"}), "node_name", "node name");
    refused(
        json!({"ipc_listen": "nowhere"}),
        "ipc_listen",
        "address:port",
    );
    refused(json!({"ipc_listen": n1_ipc}), "ipc_listen", "in use");
    refused(json!({"ipc_listen": addr}), "ipc_listen", "own address");
    refused(
        json!({"token": "pcjoin1-nonsense"}),
        "token",
        "not a join token",
    );
    let unreachable = free_addr();
    refused(json!({"peer": unreachable}), "peer", "join failed");
    // A token of the right form with a wrong secret: refused by the member.
    let wrong = format!(
        "{}{}",
        &token[..token.len() - 1],
        if token.ends_with('0') { '1' } else { '0' }
    );
    refused(json!({"token": wrong}), "token", "token refused");
    // From another page: refused whatever the code.
    let (status, _, body) = raw(
        &addr,
        "POST",
        "/setup/join",
        &[("Origin", "http://evil.example")],
        &json!({"code": code}).to_string(),
    );
    assert_eq!(status, 403, "{body}");

    // Corrected: the node joins, and the process goes on as that node on the same address.
    let (status, v) = join(json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "n2");
    assert_eq!(v["next"], "/ui/");
    let ready = wait_for(Duration::from_secs(20), || {
        let (s, _, _) = raw(&addr, "GET", "/v1/whoami", &[], "");
        (s == 401).then_some(())
    });
    assert!(ready.is_some(), "the node did not start: {}", d.log_text());
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the setup process exited"
    );
    // The accounts came with the cluster: the SuperAdmin of n1 signs in on n2.
    let members = wait_for(Duration::from_secs(20), || {
        let v = http_json(&addr, "/v1/status")?;
        (v["nodes"].as_array()?.len() == 2).then_some(v)
    });
    assert!(
        members.is_some(),
        "n2 does not list both nodes: {}",
        d.log_text()
    );
    // The code is spent: the Setup UI is gone.
    let (status, _, _) = raw(
        &addr,
        "POST",
        "/setup/create",
        &[],
        &json!({"code": code}).to_string(),
    );
    assert_ne!(status, 200);
    d.stop();

    // Setup of a directory that holds a node is refused, naming `peerconf run`.
    let o = Command::new(BIN)
        .args(["setup", "--data-dir"])
        .arg(&dir)
        .args(["--listen", &free_addr()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("peerconf run"), "{}", stderr(&o));
}

#[test]
fn setup_creates_a_cluster_whose_first_superadmin_signs_in() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (mut d, addr, code) = start_setup(&dir);
    let ipc = free_addr();
    let create = |fields: Value| {
        let mut body = json!({"code": code, "node_name": "n1", "ipc_listen": ipc, "admin_name": "root", "password": "Root-password-1", "confirm_password": "Root-password-1"});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, text) = raw(&addr, "POST", "/setup/create", &[], &body.to_string());
        (status, json_of(&text))
    };
    for (fields, field) in [
        (
            json!({"password": "short", "confirm_password": "short"}),
            "password",
        ),
        (
            json!({"confirm_password": "Other-password-1"}),
            "confirm_password",
        ),
        (json!({"admin_name": ""}), "admin_name"),
        (json!({"ipc_advertise": "no port"}), "ipc_advertise"),
    ] {
        let (status, v) = create(fields.clone());
        assert_eq!(
            (status, v["error"]["field"].as_str()),
            (400, Some(field)),
            "{fields}: {v}"
        );
        assert!(
            !dir.join("peerconf.redb").exists(),
            "{fields} created the node"
        );
    }
    let (status, v) = create(json!({}));
    assert_eq!(status, 200, "{v}");
    let session = wait_for(Duration::from_secs(20), || {
        let (s, head, body) = raw(
            &addr,
            "POST",
            "/ui/login",
            &[],
            &json!({"name": "root", "password": "Root-password-1"}).to_string(),
        );
        (s == 200).then_some((head, body))
    });
    let (head, _) = session.unwrap_or_else(|| panic!("root cannot sign in: {}", d.log_text()));
    assert!(header(&head, "set-cookie")
        .unwrap()
        .starts_with("pc_session=pcs_"));
    d.stop();
}

#[test]
fn the_console_session_is_a_cookie_and_its_writes_need_the_csrf_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (api, _, _) = init_node(&dir, "n1");
    let _d = Daemon::start(&dir, &api);

    // The page and its files need no credentials and carry the policy.
    let (status, _, root) = raw(&api, "GET", "/", &[], "");
    assert_eq!(status, 200);
    let (status, head, body) = raw(&api, "GET", "/ui/", &[], "");
    assert_eq!(status, 200);
    assert_eq!(root, body);
    assert!(body.contains("/ui/assets/app.js"), "{body}");
    assert!(header(&head, "content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));
    assert_eq!(header(&head, "x-frame-options"), Some("DENY"));
    let (status, head, _) = raw(&api, "GET", "/ui/assets/app.js", &[], "");
    assert_eq!(status, 200);
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert_eq!(raw(&api, "GET", "/ui/assets/nope.js", &[], "").0, 404);

    // A wrong password gives no cookie.
    let login = |pw: &str| {
        raw(
            &api,
            "POST",
            "/ui/login",
            &[],
            &json!({"name": "admin", "password": pw}).to_string(),
        )
    };
    let (status, head, _) = login("wrong-password-1");
    assert_eq!(status, 401);
    assert!(header(&head, "set-cookie").is_none());
    let (status, head, body) = login(ADMIN_PW);
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    let csrf = v["csrf"].as_str().expect("csrf").to_string();
    assert!(
        v.get("token").is_none() && !body.contains("pcs_"),
        "the token is readable by scripts: {body}"
    );
    let set = header(&head, "set-cookie").expect("a cookie");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP on loopback: {set}");
    let cookie = set.split(';').next().unwrap().to_string();

    // Reads need the cookie only; whoami gives the same anti-CSRF value.
    let (status, _, body) = raw(&api, "GET", "/v1/whoami", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["csrf"], csrf.as_str());
    // Writes need the header too; a bearer caller never gets a csrf value.
    let write = |headers: &[(&str, &str)]| {
        raw(
            &api,
            "PUT",
            "/v1/entities/group/g1",
            headers,
            r#"{"home_dir":"/srv/g1"}"#,
        )
    };
    let (status, _, body) = write(&[("Cookie", &cookie)]);
    assert_eq!(
        (status, json_of(&body)["error"]["code"].as_str()),
        (403, Some("csrf")),
        "{body}"
    );
    let (status, _, _) = write(&[("Cookie", &cookie), ("X-CSRF-Token", &"0".repeat(32))]);
    assert_eq!(status, 403);
    let (status, _, body) = write(&[
        ("Cookie", &cookie),
        ("X-CSRF-Token", &csrf),
        ("Origin", "http://evil.example"),
    ]);
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = write(&[("Cookie", &cookie), ("X-CSRF-Token", &csrf)]);
    assert_eq!(status, 200, "{body}");
    let (_, _, body) = raw(
        &api,
        "GET",
        "/v1/entities/group/g1/history",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(json_of(&body)["changes"][0]["by"], "admin", "{body}");

    // The status stream sends the status as events.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(&api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /v1/status/stream HTTP/1.1\r\nHost: {api}\r\nCookie: {cookie}\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut seen = false;
        while r.read_line(&mut line).unwrap() > 0 {
            if let Some(d) = line.trim().strip_prefix("data: ") {
                let v = json_of(d);
                assert_eq!(v["nodes"][0]["name"], "n1", "{v}");
                seen = true;
                break;
            }
            line.clear();
        }
        assert!(seen, "no status event");
    }

    // Logout ends the session and removes the cookie.
    let (status, head, body) = raw(
        &api,
        "POST",
        "/v1/logout",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    assert!(header(&head, "set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(
        raw(&api, "GET", "/v1/whoami", &[("Cookie", &cookie)], "").0,
        401
    );
}

/// A peer of another cluster than the token's, and a node of another major version: refused at
/// the peer address, naming why.
#[test]
fn setup_names_another_cluster_and_another_major_version_at_the_peer_field() {
    let tmp = tempfile::tempdir().unwrap();
    let (a_api, a_ipc, _) = init_node(&tmp.path().join("a"), "a");
    let _a = Daemon::start(&tmp.path().join("a"), &a_api);
    let (b_api, b_ipc, _) = init_node(&tmp.path().join("b"), "b");
    let _b = Daemon::start(&tmp.path().join("b"), &b_api);
    let token = token_create(&a_api, None);
    let join = |addr: &str, code: &str, peer: &str| {
        let body = json!({"code": code, "node_name": "n", "ipc_listen": free_addr(), "peer": peer, "token": token});
        let (status, _, text) = raw(addr, "POST", "/setup/join", &[], &body.to_string());
        (status, json_of(&text))
    };
    let dir = tmp.path().join("n");
    let (mut d, addr, code) = start_setup(&dir);
    let (status, v) = join(&addr, &code, &b_ipc);
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (400, Some("peer")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not of the cluster"),
        "{v}"
    );
    d.stop();
    let dir = tmp.path().join("m");
    let (mut d, addr, code) =
        start_setup_env(&dir, &[("PEERCONF_TEST_ADVERTISE_VERSION", "99.0.0")]);
    let (status, v) = join(&addr, &code, &a_ipc);
    assert_eq!(
        (status, v["error"]["field"].as_str()),
        (400, Some("peer")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("99"),
        "{v}"
    );
    assert!(!dir.join("peerconf.redb").exists());
    d.stop();
}
