//! Real processes forming clusters through the CLI a user runs (`init`, `token create`, `join`,
//! `run`, `node list`, `node remove`): replication between nodes, convergence of concurrent
//! edits, merges after partitions, catch-up after a restart, join refusals, mutual TLS refusing
//! another CA's certificate, and member removal.

use crate::support::*;
use peerconf::core::proto::{Request, Response};
use peerconf::net::ipc::PeerClient;
use peerconf::net::tls::{Material, TlsFiles};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long replication may take to reach every node.
const CONVERGE: Duration = Duration::from_secs(10);
/// Fast repair cycles; heartbeat and offline timeouts keep their defaults.
const FAST: &str = r#"{"replication_interval_ms":500}"#;

/// Names and fields of every entity of `kind` on a node, read through the API (polling with a
/// CLI process every 20 ms would only slow the nodes down); None if the node did not answer.
fn entities(api: &str, kind: &str) -> Option<BTreeMap<String, Value>> {
    let v = http_json(api, &format!("/v1/entities/{kind}"))?;
    Some(
        v.as_array()?
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap_or_default().to_string(),
                    e["fields"].clone(),
                )
            })
            .collect(),
    )
}

/// One field of one entity on a node, read through the API.
fn field(api: &str, kind: &str, name: &str, f: &str) -> Option<Value> {
    http_json(api, &format!("/v1/entities/{kind}/{name}")).map(|v| v["fields"][f].clone())
}

/// Polls `read` on every node until `ok` holds for what they show; panics naming what each node
/// showed last.
fn converge<T: std::fmt::Debug>(
    what: &str,
    nodes: &[&ClusterNode],
    mut read: impl FnMut(&ClusterNode) -> T,
    mut ok: impl FnMut(&[T]) -> bool,
) {
    let mut last: Vec<T> = Vec::new();
    let done = wait_for(CONVERGE, || {
        last = nodes.iter().map(|n| read(n)).collect();
        ok(&last).then_some(())
    });
    if done.is_none() {
        let seen: Vec<String> = nodes
            .iter()
            .zip(&last)
            .map(|(n, v)| format!("{}: {v:?}", n.name))
            .collect();
        let logs: Vec<String> = nodes
            .iter()
            .map(|n| format!("--- log of {} ---\n{}", n.name, tail(&n.d.log_text())))
            .collect();
        panic!(
            "{what}: not reached within {CONVERGE:?}; the nodes showed:\n{}\n{}",
            seen.join("\n"),
            logs.join("\n")
        );
    }
}

/// The start of a value's debug form (a digest answer is kilobytes of zeros).
fn short(v: &impl std::fmt::Debug) -> String {
    let s = format!("{v:?}");
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(3000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn cli_json(n: &ClusterNode, args: &[&str]) -> Value {
    let o = n.d.cli(args);
    assert!(
        o.status.success(),
        "`peerconf {}` on {} failed: {}",
        args.join(" "),
        n.name,
        stderr(&o)
    );
    stdout_json(&o)
}

fn put_json(n: &ClusterNode, kind: &str, name: &str, fields: Value) -> Value {
    cli_json(n, &["put", kind, name, "--json", &fields.to_string()])
}

fn patch_json(n: &ClusterNode, kind: &str, name: &str, fields: Value) -> Value {
    cli_json(n, &["patch", kind, name, "--json", &fields.to_string()])
}

/// Promises 1 to 4 on one three-node cluster: writes on each node reach all; one field patched
/// concurrently on two nodes ends identical everywhere; concurrent edits of one script made while
/// the nodes are cut off from each other both survive; a node stopped during 200 writes catches
/// up after its restart.
#[test]
fn three_nodes_replicate_merge_and_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 3, FAST);

    // 1. A group and a user written on each node become visible on all three.
    for (i, n) in ns.iter().enumerate() {
        let k = i + 1;
        put_json(
            n,
            "group",
            &format!("g{k}"),
            json!({"description": format!("made on {}", n.name)}),
        );
        put_json(
            n,
            "user",
            &format!("u{k}"),
            json!({"home_dir": format!("/srv/u{k}")}),
        );
    }
    let want_groups: BTreeMap<String, Value> = (1..=3)
        .map(|k| (format!("g{k}"), json!(format!("made on n{k}"))))
        .collect();
    let want_users: BTreeMap<String, Value> = (1..=3)
        .map(|k| (format!("u{k}"), json!(format!("/srv/u{k}"))))
        .collect();
    let shown = |api: &str, kind: &str, f: &str| -> Option<BTreeMap<String, Value>> {
        Some(
            entities(api, kind)?
                .into_iter()
                .map(|(n, v)| (n, v[f].clone()))
                .collect(),
        )
    };
    let all: Vec<&ClusterNode> = ns.iter().collect();
    converge(
        "groups g1..g3 and users u1..u3 written on n1..n3 visible on every node",
        &all,
        |n| {
            (
                shown(&n.api, "group", "description"),
                shown(&n.api, "user", "home_dir"),
            )
        },
        |seen| {
            seen.iter()
                .all(|(g, u)| g.as_ref() == Some(&want_groups) && u.as_ref() == Some(&want_users))
        },
    );
    // What the CLI shows agrees.
    for n in &ns {
        for k in 1..=3 {
            let g = cli_json(n, &["get", "group", &format!("g{k}")]);
            assert_eq!(
                g["fields"]["description"],
                json!(format!("made on n{k}")),
                "group g{k} on {}: {g}",
                n.name
            );
            let u = cli_json(n, &["get", "user", &format!("u{k}")]);
            assert_eq!(
                u["fields"]["home_dir"],
                json!(format!("/srv/u{k}")),
                "user u{k} on {}: {u}",
                n.name
            );
        }
    }

    // 2. user u1 home_dir patched at the same moment on n1 and n2 ends identical on all three.
    let (a, b) = ("/srv/from-n1", "/srv/from-n2");
    let (api1, api2) = (ns[0].api.clone(), ns[1].api.clone());
    let pa = json!({"home_dir": a}).to_string();
    let pb = json!({"home_dir": b}).to_string();
    let (o1, o2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| cli(&api1, &["patch", "user", "u1", "--json", &pa], None));
        let h2 = s.spawn(|| cli(&api2, &["patch", "user", "u1", "--json", &pb], None));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert!(o1.status.success(), "patch on n1: {}", stderr(&o1));
    assert!(o2.status.success(), "patch on n2: {}", stderr(&o2));
    // Converged: every node holds both patches in u1's history and shows the same home_dir.
    converge(
        "u1.home_dir patched concurrently on n1 and n2: both patches on every node, one value",
        &all,
        |n| {
            let patches = http_json(&n.api, "/v1/entities/user/u1/history").map(|h| {
                h["changes"]
                    .as_array()
                    .map(|c| c.iter().filter(|c| c["op"] == json!("patch")).count())
                    .unwrap_or(0)
            });
            (patches, field(&n.api, "user", "u1", "home_dir"))
        },
        |seen| {
            let first = &seen[0].1;
            seen.iter().all(|(p, v)| {
                *p == Some(2) && v == first && (*v == Some(json!(a)) || *v == Some(json!(b)))
            })
        },
    );
    let homes: Vec<Value> = ns
        .iter()
        .map(|n| cli_json(n, &["get", "user", "u1"])["fields"]["home_dir"].clone())
        .collect();
    assert!(
        homes.iter().all(|h| *h == homes[0]),
        "u1.home_dir differs between nodes after converging: {homes:?}"
    );

    // 3. Concurrent edits of one script's source made while the nodes are cut off both survive.
    put_json(&ns[0], "script", "sc", json!({"source": "line1\nline2\n"}));
    converge(
        "script sc from n1 on every node",
        &all,
        |n| field(&n.api, "script", "sc", "source"),
        |seen| seen.iter().all(|v| *v == Some(json!("line1\nline2\n"))),
    );
    ns[1].stop();
    ns[2].stop();
    patch_json(
        &ns[0],
        "script",
        "sc",
        json!({"source": "line0\nline1\nline2\n"}),
    );
    ns[0].stop();
    ns[1].restart();
    let s2 = cli_json(&ns[1], &["get", "script", "sc"]);
    assert_eq!(
        s2["fields"]["source"],
        json!("line1\nline2\n"),
        "n2 saw n1's edit although n1 was stopped while n2 was down: {s2}"
    );
    patch_json(
        &ns[1],
        "script",
        "sc",
        json!({"source": "line1\nline2\nline3\n"}),
    );
    ns[0].restart();
    ns[2].restart();
    let all: Vec<&ClusterNode> = ns.iter().collect();
    let merged = json!("line0\nline1\nline2\nline3\n");
    converge(
        "script sc edited on n1 (line0 added) and on n2 (line3 added) while apart: both edits on every node",
        &all,
        |n| field(&n.api, "script", "sc", "source"),
        |seen| seen.iter().all(|v| v.as_ref() == Some(&merged)),
    );
    for n in &ns {
        let s = cli_json(n, &["get", "script", "sc"]);
        assert_eq!(
            s["fields"]["source"], merged,
            "script sc on {}: {s}",
            n.name
        );
    }

    // 4. n3, stopped during 200 writes on n1, catches up after its restart.
    ns[2].stop();
    let mut want_bulk = BTreeMap::new();
    for i in 0..200 {
        let name = format!("bulk{i:03}");
        let desc = format!("bulk write {i} while n3 is down");
        let (status, body) = http(
            &ns[0].api,
            "PUT",
            &format!("/v1/entities/group/{name}"),
            Some(&json!({"description": desc}).to_string()),
        );
        assert_eq!(status, 200, "PUT group {name} on n1: {body}");
        want_bulk.insert(name, json!(desc));
    }
    ns[2].restart();
    let bulk = |api: &str| -> Option<BTreeMap<String, Value>> {
        Some(
            shown(api, "group", "description")?
                .into_iter()
                .filter(|(n, _)| n.starts_with("bulk"))
                .collect(),
        )
    };
    let all: Vec<&ClusterNode> = ns.iter().collect();
    converge(
        "200 groups written on n1 while n3 was stopped, on every node after n3's restart",
        &all,
        |n| {
            bulk(&n.api).map(|b| {
                let missing: Vec<&String> =
                    want_bulk.keys().filter(|k| !b.contains_key(*k)).collect();
                (b.len(), missing.len(), b == want_bulk)
            })
        },
        |seen| seen.iter().all(|s| matches!(s, Some((200, 0, true)))),
    );
    let l = cli_json(&ns[2], &["list", "group"]);
    let n3_bulk = l
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap_or_default().starts_with("bulk"))
        .count();
    assert_eq!(
        n3_bulk, 200,
        "`peerconf list group` on n3 after catching up"
    );
}

/// `node remove` on n1 makes n3's certificate refused: n1 and n2 mark it removed, their writes
/// never reach n3 and n3's writes never reach them, while n1 and n2 keep replicating.
#[test]
fn a_removed_node_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = form_cluster(tmp.path(), 3, FAST);
    let all: Vec<&ClusterNode> = ns.iter().collect();
    put_json(&ns[0], "group", "before", json!({"description": "before"}));
    converge(
        "group `before` (written on n1) on every node",
        &all,
        |n| field(&n.api, "group", "before", "description"),
        |seen| seen.iter().all(|v| *v == Some(json!("before"))),
    );

    let list = cli_json(&ns[0], &["node", "list"]);
    let members = list["members"].as_array().expect("members array").clone();
    assert_eq!(members.len(), 3, "node list on n1: {list}");
    let n3 = members
        .iter()
        .find(|m| m["name"] == json!("n3"))
        .unwrap_or_else(|| panic!("n3 is not in n1's node list: {list}"));
    assert_eq!(
        n3["id"],
        json!(ns[2].id),
        "n3's ID in the node list: {list}"
    );
    assert_eq!(n3["removed"], json!(false), "n3 before removal: {list}");

    let r = cli_json(&ns[0], &["node", "remove", &ns[2].id]);
    assert_eq!(r["removed"], json!(ns[2].id), "node remove answered {r}");

    let removed = |api: &str| -> Option<BTreeMap<String, bool>> {
        let v = http_json(api, "/v1/nodes")?;
        Some(
            v["members"]
                .as_array()?
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or_default().to_string(),
                        m["removed"].as_bool().unwrap_or(false),
                    )
                })
                .collect(),
        )
    };
    let want: BTreeMap<String, bool> = [("n1", false), ("n2", false), ("n3", true)]
        .into_iter()
        .map(|(n, r)| (n.to_string(), r))
        .collect();
    converge(
        "n3 marked removed in the member lists of n1 and n2",
        &[&ns[0], &ns[1]],
        |n| removed(&n.api),
        |seen| seen.iter().all(|m| m.as_ref() == Some(&want)),
    );
    let list = cli_json(&ns[0], &["node", "list"]);
    let shown: Vec<(Value, Value)> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].clone(), m["removed"].clone()))
        .collect();
    assert!(
        shown.contains(&(json!("n3"), json!(true)))
            && shown.contains(&(json!("n1"), json!(false)))
            && shown.contains(&(json!("n2"), json!(false))),
        "`peerconf node list` on n1 after removing n3: {list}"
    );

    // Fresh writes on every side.
    put_json(&ns[0], "group", "after1", json!({"description": "on n1"}));
    put_json(&ns[1], "group", "after2", json!({"description": "on n2"}));
    put_json(&ns[2], "group", "from-n3", json!({"description": "on n3"}));
    // The remaining members still replicate to each other...
    converge(
        "groups after1 (n1) and after2 (n2) on n1 and n2",
        &[&ns[0], &ns[1]],
        |n| {
            (
                field(&n.api, "group", "after1", "description"),
                field(&n.api, "group", "after2", "description"),
            )
        },
        |seen| {
            seen.iter()
                .all(|(a, b)| *a == Some(json!("on n1")) && *b == Some(json!("on n2")))
        },
    );
    // ...but nothing crosses between them and n3, in either direction. That can only be
    // watched for a while: 2 s, checked every 100 ms. Between members a write crosses at once
    // (it is pushed as it is made; after1 and after2 just did), and else at the next repair
    // cycle: every 500 ms (FAST, at most 600 ms with jitter), or after two heartbeats (1 s
    // apart by default) that saw different digests. 2 s is more than three replication
    // intervals and two heartbeats, so every way a write would cross gets its chances.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let n3 = entities(&ns[2].api, "group").expect("n3 still answers its API");
        assert!(
            !n3.contains_key("after1") && !n3.contains_key("after2"),
            "a write made after n3's removal reached n3: {:?}",
            n3.keys().collect::<Vec<_>>()
        );
        for n in &ns[..2] {
            let g = entities(&n.api, "group").expect("member answers its API");
            assert!(
                !g.contains_key("from-n3"),
                "n3's write made after its removal reached {}: {:?}",
                n.name,
                g.keys().collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // n3's data directory holds the cluster CA's key. With it: n3's own certificate, and a
    // certificate minted for n2 (a current member), are both refused by n1 before any request
    // is served: nothing is read (a fetch, a digest) and nothing is written (a sync message).
    let n3_tls = TlsFiles::new(&ns[2].dir).read().expect("n3's TLS files");
    let n1_tls = TlsFiles::new(&ns[0].dir).read().expect("n1's TLS files");
    let (minted_key, csr) = peerconf::net::tls::new_node_key_and_csr(&ns[1].id).unwrap();
    let minted_cert =
        peerconf::net::tls::sign_csr(&n3_tls.ca_cert_pem, &n3_tls.ca_key_pem, &ns[1].id, &csr)
            .unwrap();
    let cluster = http_json(&ns[0].api, "/v1/nodes").expect("GET /v1/nodes on n1")["cluster_id"]
        .as_str()
        .expect("cluster_id")
        .to_string();
    let evil = {
        use automerge::sync::SyncDoc;
        let mut d = crdt_schema::doc::genesis(crdt_schema::Kind::Group);
        let m = d
            .sync()
            .generate_sync_message(&mut automerge::sync::State::new());
        m.map(|m| m.encode()).unwrap_or_default()
    };
    let before = entities(&ns[0].api, "group").expect("n1 answers");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cases = [
            (
                "n3's own certificate (removed)",
                foreign_client(&n1_tls, &n3_tls.node_cert_pem, &n3_tls.node_key_pem),
                ns[2].id.clone(),
            ),
            (
                "a certificate minted with n3's copy of the CA key for n2's ID",
                foreign_client(&n1_tls, &minted_cert, &minted_key),
                ns[1].id.clone(),
            ),
        ];
        for (label, tls, from) in cases {
            for req in [
                Request::Fetch {
                    ids: vec!["group/before".into(), "members".into()],
                },
                Request::DigestRoot { root: [0; 32] },
                Request::Sync {
                    msgs: vec![("group/evil".into(), evil.clone())],
                },
            ] {
                let mut c = PeerClient::new(&ns[0].ipc, tls.clone(), &cluster, &from);
                let r = c.call(req.clone()).await;
                assert!(
                    matches!(r, Err(_) | Ok(Response::Refused { .. })),
                    "{label}: {req:?} was answered: {}",
                    short(&r)
                );
            }
        }
    });
    assert_eq!(
        entities(&ns[0].api, "group").expect("n1 answers"),
        before,
        "a refused peer changed n1's groups"
    );
    let log = ns[0].d.log_text();
    assert!(
        log.contains("refused a certificate whose key is not the one pinned for its node")
            && log.contains(&ns[1].id),
        "n1 did not log the minted certificate: {}",
        tail(&log)
    );
}

/// Every join failure exits 1 with a message that says why, and leaves no usable node behind.
#[test]
fn join_failures_say_why_and_leave_no_node() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Cluster A: one running node. Cluster B: another running node.
    let a_dir = root.join("a1");
    let (a_api, a_ipc, _) = init_node(&a_dir, "a1");
    let _a = Daemon::start(&a_dir, &a_api);
    wait_listening(&a_ipc, "a1's IPC port");
    let b_dir = root.join("b1");
    let (b_api, b_ipc, _) = init_node(&b_dir, "b1");
    let _b = Daemon::start(&b_dir, &b_api);
    wait_listening(&b_ipc, "b1's IPC port");

    let info = http_json(&a_api, "/v1/node").expect("GET /v1/node on a1");
    let version = info["version"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "GET /v1/node on a1: {info}"
    );

    // Made first, so its second of life passes while the other cases run.
    let (expiring, expires_wall_ms) = token_create_expiring(&a_api, "1s");

    let mut n = 0;
    let mut fails = |label: &str, token: &str, peer: &str, envs: &[(&str, &str)], want: &[&str]| {
        n += 1;
        let dir = root.join(format!("failed{n}"));
        let (o, _, _) = join_node(&dir, peer, token, &format!("j{n}"), envs);
        let err = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(1),
            "join with {label}: exit {:?}, stdout {:?}, stderr {err:?}",
            o.status,
            String::from_utf8_lossy(&o.stdout)
        );
        for w in want {
            assert!(
                err.contains(w),
                "join with {label}: stderr does not mention {w:?}: {err:?}"
            );
        }
        assert!(
            o.stdout.is_empty(),
            "join with {label} printed to stdout: {:?}",
            String::from_utf8_lossy(&o.stdout)
        );
        let r = run_must_fail(&dir);
        assert_eq!(
            r.status.code(),
            Some(1),
            "`peerconf run` after a join with {label}: {:?}, stderr {:?}",
            r.status,
            stderr(&r)
        );
    };

    fails("a bogus token", "not-a-token", &a_ipc, &[], &["token"]);

    let real = token_create(&a_api, None);
    let last = real.chars().last().unwrap();
    let wrong = format!(
        "{}{}",
        &real[..real.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    assert_ne!(wrong, real);
    fails("a wrong token", &wrong, &a_ipc, &[], &["token"]);

    let t = token_create(&a_api, None);
    let unreachable = free_addr();
    fails(
        "an unreachable peer",
        &t,
        &unreachable,
        &[],
        &["cannot reach"],
    );

    let t = token_create(&a_api, None);
    fails(
        "cluster A's token at a node of cluster B",
        &t,
        &b_ipc,
        &[],
        &["another cluster"],
    );

    let t = token_create(&a_api, None);
    fails(
        "a joiner advertising version 99.0.0",
        &t,
        &a_ipc,
        &[("PEERCONF_TEST_ADVERTISE_VERSION", "99.0.0")],
        &["99.0.0", &version],
    );

    // The real token still works after the wrong one was refused; once only.
    let ok_dir = root.join("joined");
    let (o, _, _) = join_node(&ok_dir, &a_ipc, &real, "joined", &[]);
    assert!(
        o.status.success(),
        "join with a fresh token after a wrong one was refused: {}",
        stderr(&o)
    );
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(id.len(), 32, "a successful join printed {id:?}");
    fails("a token used twice", &real, &a_ipc, &[], &["already used"]);

    // a1 and this test read the same wall clock: once it is past the expiry a1 gave the token,
    // a1 sees it expired.
    assert!(
        wait_for(Duration::from_secs(10), || (wall_ms() > expires_wall_ms).then_some(())).is_some(),
        "the wall clock did not pass the token's expiry ({expires_wall_ms} ms since the epoch) within 10 s"
    );
    fails("an expired token", &expiring, &a_ipc, &[], &["expired"]);
}

/// The peer port refuses a client certificate from another cluster's CA, even one that names a
/// current member's node ID, while the member's own certificate is answered.
#[test]
fn a_certificate_from_another_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a1");
    let (a_api, a_ipc, a_id) = init_node(&a_dir, "a1");
    let _a = Daemon::start(&a_dir, &a_api);
    wait_listening(&a_ipc, "a1's IPC port");
    // Cluster B needs no running node: only its CA and node certificate.
    let b_dir = tmp.path().join("b1");
    let (_, _, b_id) = init_node(&b_dir, "b1");

    let a = TlsFiles::new(&a_dir).read().expect("a1's TLS files");
    let b = TlsFiles::new(&b_dir).read().expect("b1's TLS files");
    assert_ne!(
        a.ca_fingerprint().unwrap(),
        b.ca_fingerprint().unwrap(),
        "two clusters share a CA"
    );
    let cluster_a = http_json(&a_api, "/v1/nodes").expect("GET /v1/nodes on a1")["cluster_id"]
        .as_str()
        .expect("cluster_id")
        .to_string();

    // B's CA signs a certificate that names a1's node ID.
    let (forged_key, csr) = peerconf::net::tls::new_node_key_and_csr(&a_id).unwrap();
    let forged_cert =
        peerconf::net::tls::sign_csr(&b.ca_cert_pem, &b.ca_key_pem, &a_id, &csr).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ask = |tls: Arc<rustls::ClientConfig>, from: &str| {
            let mut c = PeerClient::new(&a_ipc, tls, &cluster_a, from);
            async move { c.call(Request::DigestRoot { root: [0; 32] }).await }
        };
        // Control: a1's own certificate gets a normal answer, so a refusal below is the CA's doing.
        let r = ask(peerconf::net::tls::client_config(&a).unwrap(), &a_id).await;
        assert!(
            matches!(r, Ok(Response::Buckets { .. }) | Ok(Response::InSync)),
            "a1's own certificate was not answered normally: {}",
            short(&r)
        );
        let cases = [
            (
                "b1's node certificate (cluster B's CA)",
                foreign_client(&a, &b.node_cert_pem, &b.node_key_pem),
                b_id.clone(),
            ),
            (
                "a certificate from cluster B's CA naming a1's node ID",
                foreign_client(&a, &forged_cert, &forged_key),
                a_id.clone(),
            ),
        ];
        for (label, tls, from) in cases {
            let r = ask(tls, &from).await;
            assert!(
                matches!(r, Err(_) | Ok(Response::Refused { .. })),
                "{label} was answered: {}",
                short(&r)
            );
        }
    });
}

/// Replication requests from the node at `api` to the peer named `peer` that failed, as
/// counted in its `/metrics` (`peerconf_replication_requests` with `outcome="failed"`, every
/// request kind added up); 0 if the node did not answer.
fn replication_requests_failed(api: &str, peer: &str) -> u64 {
    let (status, text) = http(api, "GET", "/metrics", None);
    if status != 200 {
        return 0;
    }
    let peer = format!("peer=\"{peer}\"");
    text.lines()
        .filter(|l| {
            matches!(
                l.split('{').next(),
                Some("peerconf_replication_requests_total" | "peerconf_replication_requests")
            ) && l.contains(&peer)
                && l.contains("outcome=\"failed\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A client that trusts `server`'s CA (so it accepts the server) and presents this certificate.
fn foreign_client(server: &Material, cert_pem: &str, key_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(peerconf::net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

/// Concurrent writes to one field, made while the nodes could not see each other, converge to
/// one winner everywhere and are reported by `peerconf conflicts` on every node until a write
/// resolves them.
#[test]
fn concurrent_register_writes_are_reported_as_conflicts_until_resolved() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 2, FAST);
    put_json(&ns[0], "user", "cf", json!({"home_dir": "/start"}));
    let on = |n: &ClusterNode| {
        entities(&n.api, "user").and_then(|u| u.get("cf").map(|f| f["home_dir"].clone()))
    };
    assert!(wait_for(Duration::from_secs(10), || (on(&ns[1])
        == Some(json!("/start")))
    .then_some(()))
    .is_some());
    ns[1].stop();
    patch_json(&ns[0], "user", "cf", json!({"home_dir": "/from-n1"}));
    ns[0].stop();
    ns[1].restart();
    patch_json(&ns[1], "user", "cf", json!({"home_dir": "/from-n2"}));
    ns[0].restart();
    let conflict_on = |n: &ClusterNode| -> Option<Value> {
        let c = cli_json(n, &["conflicts"]);
        c["conflicts"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "cf")
            .map(|e| e["conflicts"]["home_dir"].clone())
    };
    let seen: Vec<Value> = ns
        .iter()
        .map(|n| {
            wait_for(Duration::from_secs(10), || {
                conflict_on(n).filter(|v| v.as_array().is_some_and(|a| a.len() == 2))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} never reported the conflict: {}",
                    n.name,
                    cli_json(n, &["conflicts"])
                )
            })
        })
        .collect();
    assert_eq!(seen[0], seen[1], "the nodes disagree on the conflict");
    let values: Vec<&str> = seen[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        values.contains(&"/from-n1") && values.contains(&"/from-n2"),
        "{values:?}"
    );
    assert_eq!(on(&ns[0]), on(&ns[1]), "both nodes show the same winner");
    assert_eq!(
        on(&ns[0]),
        Some(json!(values[0])),
        "the winner is listed first"
    );
    // A write resolves it everywhere.
    patch_json(&ns[0], "user", "cf", json!({"home_dir": "/resolved"}));
    for n in &ns {
        assert!(
            wait_for(Duration::from_secs(10), || (conflict_on(n).is_none()
                && on(n) == Some(json!("/resolved")))
            .then_some(()))
            .is_some(),
            "{} still shows the conflict: {}",
            n.name,
            cli_json(n, &["conflicts"])
        );
    }
}

/// A peer that was down is tried again after a short backoff, not at the next replication
/// cycle. n1 starts while n2 is down, so its first cycle with n2 fails, and nothing is written
/// after that; the interval is a minute, yet n1 completes a cycle with n2 within seconds of n2's
/// return (before, it waited the whole interval, and the first write after took the slow path).
#[test]
fn a_peer_back_from_down_is_reached_without_waiting_for_the_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 2, r#"{"replication_interval_ms":60000}"#);
    let all: Vec<&ClusterNode> = ns.iter().collect();
    put_json(&ns[0], "group", "g", json!({"description": "before"}));
    converge(
        "group g (written on n1) on both nodes",
        &all,
        |n| field(&n.api, "group", "g", "description"),
        |seen| seen.iter().all(|v| *v == Some(json!("before"))),
    );
    let n1_api = ns[0].api.clone();
    let last_cycle = || -> Option<i64> {
        let v = http_json(&n1_api, "/v1/status")?;
        v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == json!("n2"))?["last_replication_cycle"]
            .as_i64()
    };
    ns[1].stop();
    ns[0].stop();
    ns[0].restart();
    // n1's first cycle with n2 (at start) fails: wait until n1 counts a failed replication
    // request to n2.
    let failed = wait_for(Duration::from_secs(10), || {
        (replication_requests_failed(&ns[0].api, "n2") > 0).then_some(())
    });
    assert!(
        failed.is_some(),
        "n1 counted no failed replication request to n2 (which is down) within 10 s of its start; its metrics:\n{}\nits log:\n{}",
        http(&ns[0].api, "GET", "/metrics", None).1,
        tail(&ns[0].d.log_text())
    );
    assert_eq!(last_cycle(), None, "n1 cannot have had a cycle with n2 yet");
    ns[1].restart();
    let t = Instant::now();
    let reached = wait_for(Duration::from_secs(15), last_cycle);
    assert!(
        reached.is_some(),
        "n1 completed no cycle with n2 within 15 s of n2's return (the interval is 60 s)"
    );
    eprintln!(
        "n1 reached n2 again {} ms after n2 restarted",
        t.elapsed().as_millis()
    );
}
