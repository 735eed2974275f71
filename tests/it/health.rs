//! Cluster health through what a user runs (`peerconf status --json`, `drain`, `undrain`, the
//! admin API's `/readyz` and `/v1/status`), with real processes on loopback: a killed node is
//! OFFLINE within the configured timeout and catches up after its restart; a drained node refuses
//! new client connections of the embedding server, keeps the open ones, closes them at the
//! deadline, and is shown DRAINING by its peers; a member of another major version is shown
//! INCOMPATIBLE and is not synced; a node whose clock is off is shown CLOCK_DRIFT, and a join from
//! a node whose clock is far off is refused.

use crate::support::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HEARTBEAT_MS: u64 = 200;
const OFFLINE_MS: u64 = 1000;
/// Heartbeats every 200 ms, a peer silent for 1 s is OFFLINE.
const FAST_HEALTH: &str = r#"{"heartbeat_interval_ms":200,"offline_timeout_ms":1000}"#;
/// What polling the status every ~20 ms (a request and its answer included) may add to a
/// detection time.
const POLL_MARGIN_MS: u64 = 300;
/// How long a restarted node may take to be seen ONLINE, and replication to converge.
const SETTLE: Duration = Duration::from_secs(15);

/// libfaketime, which the clock-drift test preloads into a node to skew its wall clock: Debian's
/// package `faketime` puts it in `/usr/lib/<multiarch triple>/faketime/`. Panics if it is
/// missing: a test that skips itself when it cannot run proves nothing.
fn libfaketime() -> PathBuf {
    let lib = Path::new("faketime/libfaketime.so.1");
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(lib))
        .chain([Path::new("/usr/lib").join(lib)])
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "libfaketime is not installed (no /usr/lib/*/faketime/libfaketime.so.1): the clock-drift test needs it to skew a node's clock. Install the Debian package `faketime` (apt-get install faketime); scripts/test-all and .ci/run install it when apt-get is available"
        )
    })
}

static NULL: Value = Value::Null;

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(4000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// The end of every node's current log, for failure messages.
fn logs(nodes: &[&ClusterNode]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "--- log of {} ({}) ---\n{}",
                n.name,
                if n.d.child.is_some() {
                    "running"
                } else {
                    "not running"
                },
                tail(&n.d.log_text())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `GET /v1/status`: the report `peerconf status --json` prints, read without starting a CLI
/// process (for polling every 20 ms).
fn status_api(api: &str) -> Value {
    http_json(api, "/v1/status").unwrap_or(Value::Null)
}

/// `peerconf status --json` on a node.
fn status_cli(n: &ClusterNode, all: &[&ClusterNode]) -> Value {
    let o = n.d.cli(&["status", "--json"]);
    assert!(
        o.status.success(),
        "`peerconf status --json` on {} failed: {}\n{}",
        n.name,
        stderr(&o),
        logs(all)
    );
    stdout_json(&o)
}

/// The entry of the node named `name` in a status report.
fn entry<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|e| e["name"] == json!(name)))
        .unwrap_or(&NULL)
}

/// The `status` a report shows for the node named `name`.
fn status_of(st: &Value, name: &str) -> String {
    entry(st, name)["status"]
        .as_str()
        .unwrap_or("<absent>")
        .to_string()
}

/// Every node of a report is ONLINE, and there are `n` of them.
fn all_online(st: &Value, n: usize) -> bool {
    st["nodes"]
        .as_array()
        .is_some_and(|ns| ns.len() == n && ns.iter().all(|e| e["status"] == json!("ONLINE")))
}

/// Polls `/v1/status` on `observer` every 20 ms until `ok` holds; returns the report and the
/// time it took. Panics with the last report and the nodes' logs.
fn wait_status(
    observer: &ClusterNode,
    what: &str,
    bound: Duration,
    all: &[&ClusterNode],
    ok: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let t0 = Instant::now();
    let mut last = Value::Null;
    let got = wait_for(bound, || {
        last = status_api(&observer.api);
        ok(&last).then(|| last.clone())
    });
    match got {
        Some(v) => (v, t0.elapsed()),
        None => panic!(
            "{what}: not seen on {} within {bound:?}; its last status report:\n{}\n{}",
            observer.name,
            serde_json::to_string_pretty(&last).unwrap(),
            logs(all)
        ),
    }
}

/// Waits until every node holds the global settings `want` (field: value).
fn wait_settings(nodes: &[&ClusterNode], want: &Value) {
    for n in nodes {
        let mut last = Value::Null;
        let ok = wait_for(SETTLE, || {
            last = http_json(&n.api, "/v1/entities/settings/global")
                .map(|v| v["fields"].clone())
                .unwrap_or(Value::Null);
            want.as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| last[k] == *v)
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "settings {want} not on {} within {SETTLE:?}; it holds {last}\n{}",
            n.name,
            logs(nodes)
        );
    }
}

/// Waits until every node reports every node ONLINE in `peerconf status --json`.
fn wait_all_online(nodes: &[&ClusterNode]) {
    let mut last = Vec::new();
    let ok = wait_for(SETTLE, || {
        last = nodes.iter().map(|n| status_cli(n, nodes)).collect();
        last.iter()
            .all(|st| all_online(st, nodes.len()))
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "not every node reported every node ONLINE within {SETTLE:?}; `status --json` showed:\n{}\n{}",
        nodes
            .iter()
            .zip(&last)
            .map(|(n, st)| format!("{}: {}", n.name, serde_json::to_string_pretty(st).unwrap()))
            .collect::<Vec<_>>()
            .join("\n"),
        logs(nodes)
    );
}

/// Waits until, on every node, every node has been ONLINE and every peer heard from within two
/// heartbeats, continuously for 1.2 s: after a change of `heartbeat_interval_ms` a node may still
/// sleep one old (default 1 s) interval before its first heartbeat at the new pace. Then checks
/// `peerconf status --json` once more.
fn wait_steady(nodes: &[&ClusterNode]) {
    let window = Duration::from_millis(1200);
    let until = Instant::now() + SETTLE;
    let mut since: Option<Instant> = None;
    loop {
        let last: Vec<Value> = nodes.iter().map(|n| status_api(&n.api)).collect();
        let ok = last.iter().all(|st| {
            all_online(st, nodes.len())
                && st["nodes"].as_array().unwrap().iter().all(|e| {
                    e["self"] == json!(true)
                        || e["last_heartbeat_ms_ago"]
                            .as_u64()
                            .is_some_and(|ms| ms <= 2 * HEARTBEAT_MS)
                })
        });
        if ok {
            if since.get_or_insert_with(Instant::now).elapsed() >= window {
                break;
            }
        } else {
            since = None;
        }
        assert!(
            Instant::now() < until,
            "the nodes did not all report every node ONLINE, heard within {} ms, for {window:?} in a row within {SETTLE:?}; last reports:\n{}\n{}",
            2 * HEARTBEAT_MS,
            nodes
                .iter()
                .zip(&last)
                .map(|(n, st)| format!("{}: {}", n.name, serde_json::to_string_pretty(st).unwrap()))
                .collect::<Vec<_>>()
                .join("\n"),
            logs(nodes)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_all_online(nodes);
}

/// Whether a node holds group `name`: `GET /v1/entities/group/{name}` answered 200 (yes) or 404
/// (no); any other answer fails the test.
fn has_group(api: &str, name: &str) -> bool {
    match http(api, "GET", &format!("/v1/entities/group/{name}"), None) {
        (200, _) => true,
        (404, _) => false,
        other => panic!("GET /v1/entities/group/{name} on {api} answered {other:?}"),
    }
}

fn put_group(n: &ClusterNode, name: &str, all: &[&ClusterNode]) {
    let fields = json!({"description": format!("written on {}", n.name)}).to_string();
    let o = n.d.cli(&["put", "group", name, "--json", &fields]);
    assert!(
        o.status.success(),
        "`peerconf put group {name}` on {} failed: {}\n{}",
        n.name,
        stderr(&o),
        logs(all)
    );
}

/// Promise: a node killed with SIGKILL is reported OFFLINE by every other node within
/// `offline_timeout_ms` + one heartbeat (passing through SUSPECT is allowed), the cluster is
/// DEGRADED and the cause of the last error is `connection_refused`; after its restart it is
/// ONLINE everywhere, the cluster ACTIVE again, and it holds a write made while it was dead.
#[test]
fn a_killed_node_goes_offline_in_time_and_catches_up_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 3, "{}");
    {
        let all: Vec<&ClusterNode> = ns.iter().collect();
        let o = ns[0]
            .d
            .cli(&["patch", "settings", "global", "--json", FAST_HEALTH]);
        assert!(
            o.status.success(),
            "`peerconf patch settings global --json {FAST_HEALTH}` on n1 failed: {}",
            stderr(&o)
        );
        wait_settings(&all, &serde_json::from_str(FAST_HEALTH).unwrap());
        wait_steady(&all);
    }

    // Kill n3; poll n1's and n2's view of it every ~20 ms.
    let t0 = Instant::now();
    ns[2].d.kill9();
    let mut seen: [Vec<(u128, String)>; 2] = [Vec::new(), Vec::new()];
    let mut offline_at: [Option<Duration>; 2] = [None, None];
    while offline_at.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(5) {
        for i in 0..2 {
            let s = status_of(&status_api(&ns[i].api), "n3");
            let at = t0.elapsed();
            if seen[i].last().map(|(_, l)| l) != Some(&s) {
                seen[i].push((at.as_millis(), s.clone()));
            }
            if s == "OFFLINE" && offline_at[i].is_none() {
                offline_at[i] = Some(at);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bound = Duration::from_millis(OFFLINE_MS + HEARTBEAT_MS + POLL_MARGIN_MS);
    let all: Vec<&ClusterNode> = ns.iter().collect();
    for i in 0..2 {
        let observer = &ns[i].name;
        let at = offline_at[i].unwrap_or_else(|| {
            panic!(
                "{observer} never reported n3 OFFLINE within 5 s of its kill -9; statuses seen (ms after the kill, status): {:?}\n{}",
                seen[i],
                logs(&all)
            )
        });
        assert!(
            at <= bound,
            "{observer} reported n3 OFFLINE {} ms after its kill -9, more than offline_timeout_ms {OFFLINE_MS} + heartbeat {HEARTBEAT_MS} + polling margin {POLL_MARGIN_MS}; statuses seen (ms, status): {:?}\n{}",
            at.as_millis(),
            seen[i],
            logs(&all)
        );
        let before: Vec<&(u128, String)> =
            seen[i].iter().take_while(|(_, s)| s != "OFFLINE").collect();
        assert!(
            before.iter().all(|(_, s)| s == "ONLINE" || s == "SUSPECT"),
            "{observer} showed n3 in a status other than ONLINE or SUSPECT before OFFLINE: {:?}",
            seen[i]
        );
        eprintln!(
            "{observer}: n3 OFFLINE {} ms after kill -9 (bound {} ms); statuses seen: {:?}",
            at.as_millis(),
            bound.as_millis(),
            seen[i]
        );
    }

    // The CLI agrees: n3 OFFLINE, the cluster DEGRADED, on both survivors.
    for n in &ns[..2] {
        let st = status_cli(n, &all);
        assert_eq!(
            status_of(&st, "n3"),
            "OFFLINE",
            "`peerconf status --json` on {} while n3 is dead: {st:#}",
            n.name
        );
        assert_eq!(
            st["state"],
            json!("DEGRADED"),
            "cluster state in `peerconf status --json` on {} while n3 is dead: {st:#}",
            n.name
        );
    }
    // The last error names the cause: nothing listens on n3's IPC port any more.
    for n in &ns[..2] {
        let (st, _) = wait_status(
            n,
            "n3's last_error.cause connection_refused",
            Duration::from_secs(3),
            &all,
            |st| entry(st, "n3")["last_error"]["cause"] == json!("connection_refused"),
        );
        let e = &entry(&st, "n3")["last_error"];
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains(&ns[2].ipc)),
            "n3's last_error on {} does not name n3's address {}: {e}",
            n.name,
            ns[2].ipc
        );
    }
    let st = status_cli(&ns[0], &all);
    assert_eq!(
        entry(&st, "n3")["last_error"]["cause"],
        json!("connection_refused"),
        "`peerconf status --json` on n1: {st:#}"
    );

    // A write while n3 is dead; n3 comes back.
    put_group(&ns[0], "written-while-n3-dead", &all);
    ns[2].restart();
    let all: Vec<&ClusterNode> = ns.iter().collect();
    for n in &ns[..2] {
        let (_, took) = wait_status(
            n,
            "n3 ONLINE and the cluster ACTIVE after n3's restart",
            SETTLE,
            &all,
            |st| status_of(st, "n3") == "ONLINE" && st["state"] == json!("ACTIVE"),
        );
        eprintln!(
            "{}: n3 ONLINE, cluster ACTIVE {} ms after n3's restart",
            n.name,
            took.as_millis()
        );
    }
    let t_back = Instant::now();
    let caught_up = wait_for(SETTLE, || {
        has_group(&ns[2].api, "written-while-n3-dead").then_some(())
    });
    assert!(
        caught_up.is_some(),
        "group written-while-n3-dead, written on n1 while n3 was dead, not on n3 within {SETTLE:?} of its restart\n{}",
        logs(&all)
    );
    eprintln!(
        "n3 held the write made while it was dead {} ms after it was ONLINE again",
        t_back.elapsed().as_millis()
    );
    let o = ns[2].d.cli(&["get", "group", "written-while-n3-dead"]);
    assert_eq!(
        stdout_json(&o)["fields"]["description"],
        json!("written on n1"),
        "`peerconf get group written-while-n3-dead` on n3"
    );
    wait_all_online(&all);
    for n in &ns {
        let st = status_cli(n, &all);
        assert_eq!(
            st["state"],
            json!("ACTIVE"),
            "`peerconf status --json` on {} after n3's return: {st:#}",
            n.name
        );
    }
}

// ---- The embedding server's client service under drain ----

/// The example server built next to the `peerconf` binary.
fn example_server() -> PathBuf {
    let bin = Path::new(BIN);
    let p = bin.parent().unwrap().join("examples/embedded_server");
    assert!(
        p.exists(),
        "the example server {} does not exist: it is built by `cargo nextest run` / `cargo test` without a target filter, or by `cargo build --examples` (a run filtered with `--test it` does not build it)",
        p.display()
    );
    // Built before the library it links was last rebuilt: it would test old code. (Linked after
    // the library in every build that builds it; how long after depends on the machine's load.)
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    let newest_lib = std::fs::read_dir(bin.parent().unwrap().join("deps"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("libpeerconf-") && n.ends_with(".rlib")
        })
        .filter_map(|e| e.metadata().and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or_else(|| mtime(bin));
    assert!(
        mtime(&p) >= newest_lib,
        "the example server {} is older than the peerconf library: it comes from an earlier build (a run filtered with `--test it` does not rebuild it); run `cargo build --examples` first",
        p.display()
    );
    p
}

/// A client connection of the example service, with a read timeout.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
    what: String,
}

impl Client {
    fn connect(addr: &str, what: &str) -> Client {
        let s = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("{what}: cannot connect to the service at {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            what: what.to_string(),
        }
    }

    /// The next line without its line end; "" at EOF.
    fn line(&mut self, log: &Path) -> String {
        let mut l = String::new();
        if let Err(e) = self.r.read_line(&mut l) {
            panic!(
                "{}: no line from the service ({e}); server log:\n{}",
                self.what,
                tail(&std::fs::read_to_string(log).unwrap_or_default())
            );
        }
        l.trim_end_matches(['\r', '\n']).to_string()
    }

    fn send(&mut self, l: &str) {
        self.w
            .write_all(format!("{l}\n").as_bytes())
            .unwrap_or_else(|e| panic!("{}: cannot send {l:?}: {e}", self.what));
    }

    /// Reads until EOF; returns what came.
    fn rest(&mut self, log: &Path) -> String {
        let mut buf = Vec::new();
        if let Err(e) = self.r.read_to_end(&mut buf) {
            panic!(
                "{}: the service did not close the connection ({e}); got {:?}; server log:\n{}",
                self.what,
                String::from_utf8_lossy(&buf),
                tail(&std::fs::read_to_string(log).unwrap_or_default())
            );
        }
        String::from_utf8_lossy(&buf).to_string()
    }
}

/// Promise: `peerconf drain` on a node embedded in a server makes `/readyz` answer 503 and new
/// client connections get "421 draining", while open ones keep being served and the node shows
/// DRAINING; `undrain` restores both; `drain --deadline 1s` tells an open connection "421 closing"
/// and closes it about one second later.
#[test]
fn drain_of_the_example_server_refuses_new_clients_and_closes_at_the_deadline() {
    let exe = example_server();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ex");
    let api = free_addr();
    let ipc = free_addr();
    let o = Command::new(BIN)
        .arg("init")
        .args(admin_args())
        .arg("--data-dir")
        .arg(&dir)
        .args(["--api-listen", &api, "--ipc-listen", &ipc])
        .output()
        .unwrap();
    assert!(o.status.success(), "peerconf init failed: {}", stderr(&o));
    let service = free_addr();
    let log = tmp.path().join("ex.log");
    let child = Command::new(&exe)
        .arg(&dir)
        .arg(&service)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    // Killed when dropped.
    let mut ex = Daemon {
        child: Some(child),
        api: api.clone(),
        log: log.clone(),
    };
    let listening = format!("service listening on {service}");
    let up = wait_for(Duration::from_secs(20), || {
        ex.log_text().contains(&listening).then_some(())
    });
    assert!(
        up.is_some(),
        "the example server did not print {listening:?}; its output:\n{}",
        ex.log_text()
    );
    ex.wait_ready("the example server's admin API");
    let cli_ok = |args: &[&str]| -> Value {
        let o = ex.cli(args);
        assert!(
            o.status.success(),
            "`peerconf {}` against the example server failed: {}\n{}",
            args.join(" "),
            stderr(&o),
            tail(&ex.log_text())
        );
        stdout_json(&o)
    };
    let readyz = || http(&api, "GET", "/readyz", None);
    let self_status = |st: &Value| -> String {
        st["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|e| e["self"] == json!(true)))
            .and_then(|e| e["status"].as_str())
            .unwrap_or("<absent>")
            .to_string()
    };

    // Serving: a connection is greeted and echoed.
    assert_eq!(readyz().0, 200, "/readyz before any drain: {:?}", readyz());
    let mut old = Client::connect(&service, "the connection opened before the drain");
    assert_eq!(old.line(&log), "220 ready", "greeting of a new connection");
    old.send("hello");
    assert_eq!(old.line(&log), "250 hello", "echo of \"hello\"");

    // Drain: not ready, new connections refused, the open one still served, DRAINING shown.
    let d = cli_ok(&["drain"]);
    eprintln!("peerconf drain: {d}");
    let r = readyz();
    assert_eq!(r.0, 503, "/readyz while draining answered {r:?}");
    let mut new = Client::connect(&service, "a connection opened while draining");
    let l = new.line(&log);
    assert!(
        l.starts_with("421 draining"),
        "a connection opened while draining was greeted with {l:?}, not \"421 draining...\""
    );
    let rest = new.rest(&log);
    assert_eq!(
        rest, "",
        "a refused connection got more than the refusal: {rest:?}"
    );
    old.send("still");
    assert_eq!(
        old.line(&log),
        "250 still",
        "the connection opened before the drain is no longer served"
    );
    let st = cli_ok(&["status", "--json"]);
    assert_eq!(
        self_status(&st),
        "DRAINING",
        "`peerconf status --json` while draining: {st:#}"
    );
    drop(old);

    // Undrain: ready, new connections served.
    cli_ok(&["undrain"]);
    let r = readyz();
    assert_eq!(r.0, 200, "/readyz after undrain answered {r:?}");
    let mut again = Client::connect(&service, "a connection opened after undrain");
    assert_eq!(
        again.line(&log),
        "220 ready",
        "greeting of a connection opened after undrain"
    );
    drop(again);
    let st = cli_ok(&["status", "--json"]);
    assert_eq!(
        self_status(&st),
        "ONLINE",
        "`peerconf status --json` after undrain: {st:#}"
    );

    // Drain with a deadline: the open connection is told to close, then closed.
    let mut c = Client::connect(&service, "the connection open at `drain --deadline 1s`");
    assert_eq!(
        c.line(&log),
        "220 ready",
        "greeting before the deadline drain"
    );
    let t_start = Instant::now();
    cli_ok(&["drain", "--deadline", "1s"]);
    let t_drained = Instant::now();
    c.send("before-deadline");
    assert_eq!(
        c.line(&log),
        "250 before-deadline",
        "the open connection is served until the deadline"
    );
    let l = c.line(&log);
    let t_msg = Instant::now();
    assert!(
        l.starts_with("421 closing"),
        "at the deadline the open connection got {l:?}, not \"421 closing...\""
    );
    let rest = c.rest(&log);
    let t_eof = Instant::now();
    assert_eq!(
        rest, "",
        "after \"421 closing\" the connection got {rest:?}"
    );
    let early = t_msg - t_drained;
    let late = t_eof - t_start;
    eprintln!(
        "drain --deadline 1s: \"421 closing\" {} ms after the command returned, EOF {} ms after it started",
        early.as_millis(),
        late.as_millis()
    );
    assert!(
        early >= Duration::from_millis(800),
        "\"421 closing\" came {} ms after `drain --deadline 1s` returned: before the deadline",
        early.as_millis()
    );
    assert!(
        late <= Duration::from_secs(3),
        "the connection was closed {} ms after `drain --deadline 1s` started: long after the deadline",
        late.as_millis()
    );
}

/// Promise: in a two-node cluster, `peerconf drain` on n2 makes n1 report n2 DRAINING within a
/// few heartbeats, and `undrain` makes it ONLINE again.
#[test]
fn draining_is_seen_by_the_other_node_of_a_two_node_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = form_cluster(tmp.path(), 2, FAST_HEALTH);
    let all: Vec<&ClusterNode> = ns.iter().collect();
    wait_settings(&all, &serde_json::from_str(FAST_HEALTH).unwrap());
    wait_steady(&all);
    let bound = Duration::from_millis(3 * HEARTBEAT_MS + POLL_MARGIN_MS);

    let t0 = Instant::now();
    let o = ns[1].d.cli(&["drain"]);
    assert!(o.status.success(), "`peerconf drain` on n2: {}", stderr(&o));
    let (_, _) = wait_status(
        &ns[0],
        "n2 DRAINING after `peerconf drain` on n2",
        Duration::from_secs(5),
        &all,
        |st| status_of(st, "n2") == "DRAINING",
    );
    let took = t0.elapsed();
    eprintln!("n1 saw n2 DRAINING {} ms after `drain`", took.as_millis());
    assert!(
        took <= bound,
        "n1 reported n2 DRAINING {} ms after `peerconf drain` on n2 started: more than 3 heartbeats ({HEARTBEAT_MS} ms) + {POLL_MARGIN_MS} ms",
        took.as_millis()
    );
    for n in &ns {
        let st = status_cli(n, &all);
        assert_eq!(
            status_of(&st, "n2"),
            "DRAINING",
            "`peerconf status --json` on {} while n2 drains: {st:#}",
            n.name
        );
    }

    let t0 = Instant::now();
    let o = ns[1].d.cli(&["undrain"]);
    assert!(
        o.status.success(),
        "`peerconf undrain` on n2: {}",
        stderr(&o)
    );
    wait_status(
        &ns[0],
        "n2 ONLINE after `peerconf undrain` on n2",
        Duration::from_secs(5),
        &all,
        |st| status_of(st, "n2") == "ONLINE",
    );
    let took = t0.elapsed();
    eprintln!("n1 saw n2 ONLINE {} ms after `undrain`", took.as_millis());
    assert!(
        took <= bound,
        "n1 reported n2 ONLINE {} ms after `peerconf undrain` on n2 started: more than 3 heartbeats + {POLL_MARGIN_MS} ms",
        took.as_millis()
    );
    wait_all_online(&all);
}

/// Promise: a member that comes back advertising another major version is shown INCOMPATIBLE
/// (with its version) and nothing is synced either way; back on the same version it is ONLINE
/// and the writes of both sides converge.
#[test]
fn a_member_of_another_major_version_is_incompatible_and_not_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 2, FAST_HEALTH);
    {
        let all: Vec<&ClusterNode> = ns.iter().collect();
        wait_settings(&all, &serde_json::from_str(FAST_HEALTH).unwrap());
        wait_all_online(&all);
    }
    let ours = {
        let st = status_api(&ns[0].api);
        entry(&st, "n1")["version"]
            .as_str()
            .unwrap_or_else(|| panic!("no version for n1 in its status: {st:#}"))
            .to_string()
    };

    ns[1].stop();
    ns[1].restart_env(&[("PEERCONF_TEST_ADVERTISE_VERSION", "99.0.0")]);
    let all: Vec<&ClusterNode> = ns.iter().collect();
    wait_status(
        &ns[0],
        "n2 INCOMPATIBLE with version 99.0.0",
        SETTLE,
        &all,
        |st| status_of(st, "n2") == "INCOMPATIBLE" && entry(st, "n2")["version"] == json!("99.0.0"),
    );
    let st = status_cli(&ns[0], &all);
    assert_eq!(
        (status_of(&st, "n2"), entry(&st, "n2")["version"].clone()),
        ("INCOMPATIBLE".to_string(), json!("99.0.0")),
        "`peerconf status --json` on n1: {st:#}"
    );
    wait_status(
        &ns[1],
        "n1 INCOMPATIBLE as n2 (advertising 99.0.0) sees it",
        SETTLE,
        &all,
        |st| status_of(st, "n1") == "INCOMPATIBLE",
    );

    put_group(&ns[0], "from-n1-while-incompatible", &all);
    put_group(&ns[1], "from-n2-while-incompatible", &all);
    // That nothing crosses can only be watched for a while: 2 s, checked every 50 ms. Between
    // compatible nodes a write crosses at once (it is pushed as it is made), and else within
    // two heartbeats (400 ms here), since two heartbeats that see different digests start a
    // replication cycle; 2 s is ten heartbeats, so every way a write would cross gets several
    // chances. (The replication interval keeps its 10 s default: the heartbeats are what would
    // start a cycle within the watch.)
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        assert!(
            !has_group(&ns[1].api, "from-n1-while-incompatible"),
            "a write on n1 reached n2, which advertises 99.0.0, {} ms after it\n{}",
            t0.elapsed().as_millis(),
            logs(&all)
        );
        assert!(
            !has_group(&ns[0].api, "from-n2-while-incompatible"),
            "a write on n2, which advertises 99.0.0, reached n1 {} ms after it\n{}",
            t0.elapsed().as_millis(),
            logs(&all)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    ns[1].stop();
    ns[1].restart();
    let all: Vec<&ClusterNode> = ns.iter().collect();
    wait_status(
        &ns[0],
        "n2 ONLINE with n1's version after its normal restart",
        SETTLE,
        &all,
        |st| status_of(st, "n2") == "ONLINE" && entry(st, "n2")["version"] == json!(ours),
    );
    // Nothing speeds this repair up (the heartbeats' digests differed all along), so it may take
    // a replication cycle: 10 s by default, +20% jitter.
    let bound = Duration::from_secs(18);
    let names = ["from-n1-while-incompatible", "from-n2-while-incompatible"];
    let t0 = Instant::now();
    // (node, group) -> ms after n2 was ONLINE again when first seen.
    let mut seen_at: Vec<(String, &str, Option<u128>)> = ns
        .iter()
        .flat_map(|n| names.map(|g| (n.name.clone(), g, None)))
        .collect();
    let done = wait_for(bound, || {
        for (node, g, at) in seen_at.iter_mut() {
            let api = &ns.iter().find(|n| n.name == *node).unwrap().api;
            if at.is_none() && has_group(api, g) {
                *at = Some(t0.elapsed().as_millis());
            }
        }
        seen_at.iter().all(|(_, _, at)| at.is_some()).then_some(())
    });
    assert!(
        done.is_some(),
        "the writes made while n2 was incompatible did not converge within {bound:?} of n2 being ONLINE again; (node, group, ms when first seen): {seen_at:?}\n{}",
        logs(&all)
    );
    eprintln!(
        "the writes made while n2 was incompatible converged; (node, group, ms after n2 was ONLINE again): {seen_at:?}"
    );
    wait_all_online(&all);
}

/// Promise: a node whose clock is 10 s ahead is shown CLOCK_DRIFT with an offset of about 10 s;
/// a join from a node whose clock is 120 s ahead is refused, naming the clock.
#[test]
fn clock_drift_is_shown_and_a_join_with_a_far_off_clock_is_refused() {
    let faketime = libfaketime();
    let faketime = faketime.to_str().expect("a UTF-8 path");
    let tmp = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(tmp.path(), 3, FAST_HEALTH);
    {
        let all: Vec<&ClusterNode> = ns.iter().collect();
        wait_settings(&all, &serde_json::from_str(FAST_HEALTH).unwrap());
        wait_all_online(&all);
    }

    ns[2].stop();
    ns[2].restart_env(&[
        ("LD_PRELOAD", faketime),
        ("FAKETIME", "+10s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    let all: Vec<&ClusterNode> = ns.iter().collect();
    let in_range = |st: &Value| {
        entry(st, "n3")["clock_offset_ms"]
            .as_f64()
            .is_some_and(|o| (9000.0..=11000.0).contains(&o.abs()))
    };
    let (st, took) = wait_status(
        &ns[0],
        "n3 (clock +10 s) CLOCK_DRIFT with |clock_offset_ms| in 9000..=11000",
        SETTLE,
        &all,
        |st| status_of(st, "n3") == "CLOCK_DRIFT" && in_range(st),
    );
    eprintln!(
        "n1 saw n3 CLOCK_DRIFT {} ms after its restart: {}",
        took.as_millis(),
        entry(&st, "n3")
    );
    let st = status_cli(&ns[0], &all);
    assert!(
        status_of(&st, "n3") == "CLOCK_DRIFT" && in_range(&st),
        "`peerconf status --json` on n1 with n3's clock 10 s ahead: {st:#}"
    );
    // The metrics show it too.
    let (code, text) = http(&ns[0].api, "GET", "/metrics", None);
    assert_eq!(code, 200, "/metrics: {text}");
    assert!(
        text.contains("peerconf_peer_status{peer=\"n3\",status=\"CLOCK_DRIFT\"} 1")
            && text.contains("peerconf_peer_status{peer=\"n3\",status=\"ONLINE\"} 0"),
        "/metrics does not show n3 in CLOCK_DRIFT:\n{text}"
    );
    let offset = text
        .lines()
        .find(|l| l.starts_with("peerconf_peer_clock_offset_ms{peer=\"n3\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no clock offset metric for n3:\n{text}"));
    assert!(
        (9000.0..=11000.0).contains(&offset.abs()),
        "metric offset {offset}"
    );

    let token = token_create(&ns[0].api, None);
    let dir = tmp.path().join("n4");
    let (o, _, _) = join_node(
        &dir,
        &ns[0].ipc,
        &token,
        "n4",
        &[
            ("LD_PRELOAD", faketime),
            ("FAKETIME", "+120s"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "`peerconf join` from a node whose clock is 120 s ahead succeeded: stdout {:?}, stderr {err:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.to_lowercase().contains("clock"),
        "the refusal of a join with a clock 120 s ahead does not mention the clock: {err:?}"
    );
    eprintln!("join with a clock 120 s ahead: {}", err.trim());
    assert!(
        !dir.join(peerconf::node::DB_FILE).exists(),
        "a refused join left a data directory in {}",
        dir.display()
    );
    let members = stdout_json(&ns[0].d.cli(&["node", "list"]));
    assert_eq!(
        members["members"].as_array().map(Vec::len),
        Some(3),
        "members on n1 after a refused join: {members:#}"
    );
}
