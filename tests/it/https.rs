//! The admin API over HTTPS: a node asked for it (and every node off loopback) serves a
//! certificate issued by the cluster CA, which the CLI verifies with `--cacert` (printed by
//! `peerconf ca show`); plain HTTP gets nothing, and another cluster's CA does not verify it.

use crate::support::*;
use peerconf::node::setup::NodeConfig;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The CLI against `api`, with the session stored by `pc_login` (in the test config folder).
fn pc(api: &str, cacert: Option<&Path>, args: &[&str]) -> Output {
    pc_stdin(api, cacert, args, "")
}

fn pc_stdin(api: &str, cacert: Option<&Path>, args: &[&str], stdin: &str) -> Output {
    let ca = cacert.map(|p| p.display().to_string());
    let mut all = vec!["--api", api];
    if let Some(ca) = &ca {
        all.extend(["--cacert", ca.as_str()]);
    }
    all.extend_from_slice(args);
    run_cli(&all, Some(stdin), None)
}

/// `peerconf login --user admin` over `api`, the password on stdin.
fn pc_login(api: &str, cacert: Option<&Path>) -> Output {
    pc_stdin(api, cacert, &["login", "--user", "admin"], ADMIN_PW)
}

/// `peerconf init` of a node in `dir` with the test SuperAdmin, fresh addresses and `extra`
/// arguments: its API address and the command's output.
fn init_api(dir: &Path, extra: &[&std::ffi::OsStr]) -> (String, Output) {
    let api = free_addr();
    let o = Command::new(BIN)
        .arg("init")
        .args(admin_args())
        .arg("--data-dir")
        .arg(dir)
        .args(["--api-listen", &api, "--ipc-listen", &free_addr()])
        .args(extra)
        .output()
        .unwrap();
    (api, o)
}

/// `peerconf run` of the node in `dir`, logging to `n1.log` in `logs`; an API served over
/// HTTPS is not waited for here (the caller knows which CA verifies it).
fn spawn_https(dir: &Path, api: &str, logs: &Path) -> Daemon {
    let log = logs.join("n1.log");
    let child = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon {
        child: Some(child),
        api: api.to_string(),
        log,
    }
}

fn ca_show(dir: &Path) -> String {
    let o = Command::new(BIN)
        .args(["ca", "show", "--data-dir"])
        .arg(dir)
        .output()
        .expect("spawn");
    assert!(o.status.success(), "ca show: {}", stderr(&o));
    let pem = String::from_utf8(o.stdout).expect("utf-8");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    pem
}

#[test]
fn off_loopback_or_when_asked_the_api_is_https_only() {
    let cfg = |listen: &str, tls: bool| NodeConfig {
        node_id: "n".into(),
        name: "n".into(),
        cluster_id: "c".into(),
        api_listen: listen.parse().unwrap(),
        ipc_listen: "127.0.0.1:1".parse().unwrap(),
        ipc_advertise: "127.0.0.1:1".into(),
        created_wall_ms: 0,
        schema_version: 1,
        api_tls: tls,
        api_cert: None,
        api_certificate: None,
    };
    assert!(!cfg("127.0.0.1:7700", false).api_https());
    assert!(!cfg("[::1]:7700", false).api_https());
    assert!(cfg("127.0.0.1:7700", true).api_https());
    assert!(cfg("0.0.0.0:7700", false).api_https());
    assert!(cfg("[::]:7700", false).api_https());
    assert!(cfg("10.1.2.3:7700", false).api_https());
}

#[test]
fn an_api_served_over_https_is_verified_with_the_cluster_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let api = free_addr();
    let ipc = free_addr();
    let o = Command::new(BIN)
        .arg("init")
        .args(admin_args())
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "--name",
            "n1",
            "--api-listen",
            &api,
            "--ipc-listen",
            &ipc,
            "--api-tls",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "init: {}", stderr(&o));
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, ca_show(&dir)).unwrap();
    // Another cluster's CA, to show that verification is real.
    let other = tmp.path().join("other");
    init(&other, "other");
    let other_ca = tmp.path().join("other-ca.pem");
    std::fs::write(&other_ca, ca_show(&other)).unwrap();

    let mut d = spawn_https(&dir, &api, tmp.path());
    let https = format!("https://{api}");
    wait_for(Duration::from_secs(20), || {
        pc_login(&https, Some(&ca)).status.success().then_some(())
    })
    .unwrap_or_else(|| panic!("no HTTPS login; log: {}", d.log_text()));
    let o = pc(
        &https,
        Some(&ca),
        &[
            "put",
            "group",
            "g1",
            "--json",
            r#"{"description":"over tls"}"#,
        ],
    );
    assert!(o.status.success(), "put over https: {}", stderr(&o));
    let g = stdout_json(&pc(&https, Some(&ca), &["get", "group", "g1"]));
    assert_eq!(g["fields"]["description"], "over tls", "{g}");
    let h = stdout_json(&pc(&https, Some(&ca), &["history", "group", "g1"]));
    assert_eq!(h["changes"][0]["from"], "127.0.0.1", "{h}");
    // The certificate names localhost too (a session is stored per API URL: log in there).
    let port = api.rsplit_once(':').unwrap().1;
    let o = pc_login(&format!("https://localhost:{port}"), Some(&ca));
    assert!(
        o.status.success(),
        "login at https://localhost: {}",
        stderr(&o)
    );
    let o = pc(
        &format!("https://localhost:{port}"),
        Some(&ca),
        &["list", "group"],
    );
    assert!(o.status.success(), "https://localhost: {}", stderr(&o));
    // Plain HTTP gets no answer.
    if let Ok((status, body)) = try_http(&api, "GET", "/livez", None) {
        panic!("plain HTTP was answered {status}: {body}");
    }
    // Without a CA the CLI says what it needs; with another cluster's CA it does not connect.
    let o = pc(&https, None, &["list", "group"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--cacert"), "{}", stderr(&o));
    let o = pc(&https, Some(&other_ca), &["list", "group"]);
    assert!(!o.status.success(), "another cluster's CA verified the API");
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    assert!(d.stop().success(), "{}", d.log_text());
}

/// Every change made through the admin API records who asked (the admin the credentials belong
/// to) and from where; history shows it.
#[test]
fn history_names_who_made_each_change_and_from_where() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (api, _ipc, _id) = init_node(&dir, "n1");
    let mut d = Daemon::start(&dir, &api);
    let o = d.cli(&["put", "group", "g1", "--json", r#"{"description":"one"}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.cli(&["patch", "group", "g1", "--json", r#"{"description":"two"}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    let h = stdout_json(&d.cli(&["history", "group", "g1"]));
    let changes = h["changes"].as_array().unwrap_or_else(|| panic!("{h}"));
    assert_eq!(changes.len(), 2, "{h}");
    for c in changes {
        assert_eq!(c["by"], "admin", "{c}");
        assert_eq!(c["from"], "127.0.0.1", "{c}");
    }
    assert!(d.stop().success());
}

/// A CA of the operator's own and a certificate it issued for 127.0.0.1, as PEM:
/// (CA certificate, node certificate, node key).
fn operator_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Promise: `init --api-cert FILE --api-key FILE` serves the admin API over HTTPS with the
/// operator's certificate: the CLI verifies it with the operator's CA, not the cluster's; a
/// key that does not match its certificate stops `run` with a message naming the options.
#[test]
fn an_operator_certificate_serves_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = operator_pki();
    let files = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let (ca_f, cert_f, key_f) = (
        files("op-ca.pem", &ca),
        files("api.pem", &cert),
        files("api.key", &key),
    );
    let init_with = |dir: &Path, key: &Path| {
        let (api, o) = init_api(
            dir,
            &[
                "--api-cert".as_ref(),
                cert_f.as_ref(),
                "--api-key".as_ref(),
                key.as_ref(),
            ],
        );
        assert!(o.status.success(), "init: {}", stderr(&o));
        api
    };
    let dir = tmp.path().join("n1");
    let api = init_with(&dir, &key_f);
    let d = spawn_https(&dir, &api, tmp.path());
    let https = format!("https://{api}");
    wait_for(Duration::from_secs(20), || {
        pc_login(&https, Some(&ca_f)).status.success().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no HTTPS login with the operator's CA; log: {}",
            d.log_text()
        )
    });
    let o = pc(&https, Some(&ca_f), &["list", "group"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cluster_ca = tmp.path().join("cluster-ca.pem");
    std::fs::write(&cluster_ca, ca_show(&dir)).unwrap();
    let o = pc(&https, Some(&cluster_ca), &["list", "group"]);
    assert!(
        !o.status.success(),
        "the cluster CA verified the operator's certificate"
    );
    drop(d);

    // A key of another certificate: refused at start, naming the options.
    let (_, _, other_key) = operator_pki();
    let wrong = files("other.key", &other_key);
    let dir2 = tmp.path().join("n2");
    init_with(&dir2, &wrong);
    let o = run_must_fail(&dir2);
    assert!(stderr(&o).contains("--api-cert"), "{}", stderr(&o));
}

/// Promise: `init --api-certificate NAME` serves the `certificate` entity NAME on the admin API
/// (HTTPS on loopback too): a certificate of the cluster CA until the entity exists, then the
/// entity's, and a replacement written through the API is served from the next connection,
/// without a restart. A name no certificate can have is refused by init, naming the option.
#[test]
fn a_certificate_entity_serves_the_api_and_is_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let init =
        |dir: &Path, cert: &str| init_api(dir, &["--api-certificate".as_ref(), cert.as_ref()]);
    let o = init(&tmp.path().join("bad"), "not a name!");
    assert!(!o.1.status.success(), "init took a bad certificate name");
    assert!(
        stderr(&o.1).contains("--api-certificate"),
        "{}",
        stderr(&o.1)
    );
    assert!(
        !tmp.path().join("bad").exists(),
        "a refused init left a data directory"
    );

    let dir = tmp.path().join("n1");
    let (api, o) = init(&dir, "api");
    assert!(o.status.success(), "init: {}", stderr(&o));
    let mut d = spawn_https(&dir, &api, tmp.path());
    let https = format!("https://{api}");
    // No such entity yet: the cluster CA's certificate.
    let cluster_ca = file("cluster-ca.pem", &ca_show(&dir));
    wait_for(Duration::from_secs(20), || {
        pc_login(&https, Some(&cluster_ca))
            .status
            .success()
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no HTTPS with the cluster CA; log: {}", d.log_text()));
    // The entity, written through the API, is served from then on.
    let served_by = |ca: &Path| pc(&https, Some(ca), &["list", "group"]).status.success();
    for round in 0..2 {
        let (ca, cert, key) = operator_pki();
        let ca = file(&format!("op-ca-{round}.pem"), &ca);
        let before = if round == 0 {
            cluster_ca.clone()
        } else {
            tmp.path().join("op-ca-0.pem")
        };
        let body = serde_json::json!({"cert_pem": cert, "key_pem": key}).to_string();
        let o = pc_stdin(&https, Some(&before), &["put", "certificate", "api"], &body);
        assert!(o.status.success(), "put certificate: {}", stderr(&o));
        wait_for(Duration::from_secs(10), || served_by(&ca).then_some(())).unwrap_or_else(|| {
            panic!(
                "round {round}: the entity is not served; log: {}",
                d.log_text()
            )
        });
        assert!(
            !served_by(&before),
            "round {round}: the previous certificate is still served"
        );
    }
    // A version whose key is not the certificate's is not served; the API keeps the one it has.
    let (_, other_cert, _) = operator_pki();
    let o = pc(
        &https,
        Some(&tmp.path().join("op-ca-1.pem")),
        &[
            "patch",
            "certificate",
            "api",
            "--json",
            &serde_json::json!({"cert_pem": other_cert}).to_string(),
        ],
    );
    assert!(
        !o.status.success(),
        "a certificate without its key was stored"
    );
    assert!(served_by(&tmp.path().join("op-ca-1.pem")));
    assert!(d
        .log_text()
        .contains("the admin API serves this certificate entity"));
    assert!(d.stop().success(), "{}", d.log_text());
}
