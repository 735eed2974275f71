//! `GET /v1/watch` with real processes: a change made on another node arrives; resuming after a
//! disconnect and after a restart of the watched node delivers exactly what was missed, in
//! order; filters; `reset` when the position cannot be replayed (after an unclean stop); a
//! stalled reader is reset while 2,500 writes complete; `peerconf watch` prints JSON lines.

use crate::support::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// One server-sent event.
#[derive(Debug, Clone)]
struct Event {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// A watch stream read by a thread; events arrive on `rx`.
struct Sse {
    rx: Receiver<Event>,
    sock: std::net::TcpStream,
}

impl Sse {
    /// Opens `GET /v1/watch?QUERY` on `addr`, with `Last-Event-ID` when given.
    fn open(addr: &str, query: &str, last: Option<u64>) -> Sse {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let token = wait_for(Duration::from_secs(10), || token_for(addr)).expect("a session");
        let last = last
            .map(|l| format!("Last-Event-ID: {l}\r\n"))
            .unwrap_or_default();
        write!(
            sock,
            "GET /v1/watch?{query} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{last}Connection: close\r\n\r\n"
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = sock.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut r = BufReader::new(reader);
            let mut line = String::new();
            // The head, then chunked SSE text: chunk-size lines are hex and never "id:" etc.
            let (mut id, mut event, mut data) = (None, String::from("message"), None);
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let l = line.trim_end_matches(['\r', '\n']);
                if let Some(v) = l.strip_prefix("id: ") {
                    id = v.parse().ok();
                } else if let Some(v) = l.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = l.strip_prefix("data: ") {
                    data = serde_json::from_str(v).ok();
                } else if l.is_empty() {
                    if let Some(d) = data.take() {
                        let e = Event {
                            id: id.take(),
                            event: std::mem::replace(&mut event, "message".into()),
                            data: d,
                        };
                        if tx.send(e).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Sse { rx, sock }
    }

    /// The next event within `t`.
    fn next(&self, t: Duration) -> Option<Event> {
        self.rx.recv_timeout(t).ok()
    }

    /// Events until none comes for `quiet`.
    fn drain(&self, quiet: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next(quiet) {
            out.push(e);
        }
        out
    }
}

impl Drop for Sse {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

fn put_group(addr: &str, name: &str, description: &str) {
    let body = json!({ "description": description }).to_string();
    let (s, b) = http(
        addr,
        "PUT",
        &format!("/v1/entities/group/{name}"),
        Some(&body),
    );
    assert_eq!(s, 200, "{b}");
}

fn names(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e.data["name"].as_str().map(str::to_string))
        .collect()
}

const FAST: &str =
    r#"{"heartbeat_interval_ms":200,"offline_timeout_ms":2000,"replication_interval_ms":300}"#;

/// Promise: a change made on n1 arrives on n2's stream with its kind, name, origin, `by` and the
/// entity; a stream resumed with Last-Event-ID gets exactly the changes it missed, in order,
/// after a disconnect and after a restart of n2; filters by kind and name hold.
#[test]
fn changes_arrive_live_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = form_cluster(tmp.path(), 2, FAST);
    let (a1, a2) = (nodes[0].api.clone(), nodes[1].api.clone());

    let live = Sse::open(&a2, "kind=group", None);
    let users = Sse::open(&a2, "kind=user", None);
    let named = Sse::open(&a2, "kind=group&name=g2", None);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    put_group(&a1, "g1", "first");
    let e = live
        .next(Duration::from_secs(10))
        .expect("the change made on n1 reached n2's stream");
    let latency = t0.elapsed();
    assert_eq!(e.event, "put");
    assert_eq!(e.data["kind"], "group", "{:?}", e.data);
    assert_eq!(e.data["name"], "g1");
    assert_eq!(e.data["entity"]["fields"]["description"], "first");
    assert_eq!(e.data["origin"], nodes[0].id.as_str(), "{:?}", e.data);
    assert_eq!(e.data["by"], "admin", "who made it on n1: {:?}", e.data);
    assert_eq!(e.id, e.data["seq"].as_u64());
    let first = e.id.expect("an id");
    // On n1 itself the event is local and names who made it.
    let here = Sse::open(&a1, "kind=group", Some(0));
    let mine = here.drain(Duration::from_millis(500));
    let g1 = mine
        .iter()
        .find(|e| e.data["name"] == "g1")
        .expect("g1 on n1");
    assert_eq!(g1.data["origin"], "local");
    assert_eq!(g1.data["by"], "admin");
    drop(here);
    put_group(&a1, "g2", "second");
    let e = named.next(Duration::from_secs(10)).expect("g2 event");
    assert_eq!(e.data["name"], "g2");
    let e = live.next(Duration::from_secs(10)).expect("g2 event");
    assert_eq!(e.data["name"], "g2");
    let last = e.id.unwrap();
    assert!(last > first);
    drop(live);
    let (s, b) = http(
        &a1,
        "PUT",
        "/v1/entities/user/u1",
        Some(r#"{"home_dir":"/srv/u1"}"#),
    );
    assert_eq!(s, 200, "{b}");
    let e = users.next(Duration::from_secs(10)).expect("the user event");
    assert_eq!(e.data["name"], "u1");
    assert!(
        users.drain(Duration::from_millis(300)).is_empty(),
        "a group event passed the kind=user filter"
    );
    assert!(
        named.drain(Duration::from_millis(300)).is_empty(),
        "an event of another name passed the name filter"
    );

    // Disconnected: five changes and a delete, then resume from the last event seen.
    for i in 1..=5 {
        put_group(&a1, &format!("m{i}"), &format!("missed {i}"));
    }
    let (s, _) = http(&a1, "DELETE", "/v1/entities/group/g1", None);
    assert_eq!(s, 200);
    wait_for(Duration::from_secs(10), || {
        (http(&a2, "GET", "/v1/entities/group/g1", None).0 == 404).then_some(())
    })
    .expect("the delete reached n2");
    let resumed = Sse::open(&a2, "kind=group", Some(last));
    let got = resumed.drain(Duration::from_millis(700));
    // Every missed change once. Changes that reach n2 in one batch commit together and are
    // numbered in document order, so the delete of g1 may come before m4 and m5 when it
    // arrived with them; m1..m5 keep their order either way.
    let mut all = names(&got);
    all.sort();
    assert_eq!(all, ["g1", "m1", "m2", "m3", "m4", "m5"], "{got:?}");
    let ms: Vec<String> = names(&got)
        .into_iter()
        .filter(|n| n.starts_with('m'))
        .collect();
    assert_eq!(ms, ["m1", "m2", "m3", "m4", "m5"], "{got:?}");
    let del = got.iter().find(|e| e.data["name"] == "g1").expect("g1");
    assert_eq!(del.event, "delete", "{got:?}");
    let ids: Vec<u64> = got.iter().filter_map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let last = *ids.last().unwrap();
    drop(resumed);

    // n2 restarted (a clean stop), changes made meanwhile on n1: resume after the restart.
    nodes[1].stop();
    for i in 1..=3 {
        put_group(&a1, &format!("r{i}"), &format!("while n2 was down {i}"));
    }
    nodes[1].restart();
    wait_for(Duration::from_secs(15), || {
        (http(&a2, "GET", "/v1/entities/group/r3", None).0 == 200).then_some(())
    })
    .expect("n2 caught up");
    let resumed = Sse::open(&a2, "kind=group", Some(last));
    let got = resumed.drain(Duration::from_millis(700));
    let mut n = names(&got);
    n.sort();
    assert_eq!(n, ["r1", "r2", "r3"], "{got:?}");
    assert!(got.iter().all(|e| e.event == "put"), "{got:?}");
    eprintln!("n1 write seen on n2's stream after {latency:?}");
}

/// Promise: after an unclean stop (kill -9) a client resuming from before it is told to
/// re-list (`event: reset`), then gets the changes made from then on; a position not reached
/// yet is reset too; a bad position is a 400.
#[test]
fn positions_that_cannot_be_replayed_get_a_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (api, _ipc, _id) = init_node(&dir, "n1");
    let mut d = Daemon::start(&dir, &api);
    let s = Sse::open(&api, "kind=group", None);
    std::thread::sleep(Duration::from_millis(200));
    put_group(&api, "a", "before the crash");
    let last = s.next(Duration::from_secs(10)).expect("event").id.unwrap();
    drop(s);
    put_group(&api, "b", "logged, then the crash");
    d.kill9();
    forget_token(&api);
    let _d = Daemon::start(&dir, &api);
    let s = Sse::open(&api, "kind=group", Some(last));
    let e = s.next(Duration::from_secs(10)).expect("a first event");
    assert_eq!(e.event, "reset", "{e:?}");
    assert_eq!(e.data["reason"], "too_old", "{e:?}");
    put_group(&api, "c", "after the restart");
    let e = s
        .next(Duration::from_secs(10))
        .expect("the live event after the reset");
    assert_eq!(e.data["name"], "c");
    assert!(
        e.id.unwrap() > last + 1_000_000,
        "numbers after a crash start at a new base"
    );
    let ahead = Sse::open(&api, "", Some(e.id.unwrap() + 1000));
    let r = ahead.next(Duration::from_secs(10)).expect("a first event");
    assert_eq!(
        (r.event.as_str(), &r.data["reason"]),
        ("reset", &json!("not_yet"))
    );
    let (st, b) = http(&api, "GET", "/v1/watch?since=yesterday", None);
    assert_eq!(st, 400, "{b}");
    let (st, b) = http(&api, "GET", "/v1/watch?kind=nope", None);
    assert_eq!(st, 400, "{b}");
}

/// Promise: a reader that stops reading is reset and closed, while 2,500 writes on the node
/// complete; a reader that keeps up gets all 2,500.
#[test]
fn a_stalled_reader_is_reset_and_writes_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (api, _ipc, _id) = init_node(&dir, "n1");
    let _d = Daemon::start(&dir, &api);
    let mut stalled = open_unread(&api, "kind=group");
    let reader = Sse::open(&api, "kind=group", None);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    // About 1.2 KB an event: 2,500 of them are three times what a stream holds (1 MiB).
    let pad = "x".repeat(1000);
    for i in 0..2500 {
        put_group(&api, &format!("w{i}"), &format!("{i} {pad}"));
    }
    let took = started.elapsed();
    let mut seen = 0;
    while let Some(e) = reader.next(Duration::from_secs(5)) {
        assert_eq!(e.event, "put", "the reader that keeps up was reset: {e:?}");
        seen += 1;
        if seen == 2500 {
            break;
        }
    }
    assert_eq!(seen, 2500, "the reader that keeps up missed events");
    let metrics = http(&api, "GET", "/metrics", None).1;
    let resets = metrics
        .lines()
        .find(|l| l.starts_with("peerconf_watch_resets_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    let resets_line = metrics
        .lines()
        .filter(|l| l.starts_with("peerconf_watch"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(resets, Some(1), "{resets_line}");
    // The stalled reader, reading at last, finds what was buffered, then `reset`, then the end.
    let mut text = String::new();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = std::io::Read::read_to_string(&mut stalled, &mut text);
    let events = text.matches("event: put").count();
    assert!(events < 2500, "the stalled reader got all {events} events");
    assert!(
        text.contains("event: reset"),
        "no reset at the end: {:?}",
        &text[text.len().saturating_sub(300)..]
    );
    eprintln!("2,500 writes with a stalled and a live watcher took {took:?}; the stalled one got {events} events, then reset");
}

/// `GET /v1/watch` on a socket with a 4 KiB receive buffer that nobody reads yet.
fn open_unread(addr: &str, query: &str) -> std::net::TcpStream {
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&sa.into()).unwrap();
    let mut sock: std::net::TcpStream = s.into();
    let token = token_for(addr).expect("a session");
    write!(
        sock,
        "GET /v1/watch?{query} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    sock
}

/// Promise: `peerconf watch group` prints one JSON object per line for each change.
#[test]
fn the_cli_prints_one_json_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1");
    let (api, _ipc, _id) = init_node(&dir, "n1");
    let _d = Daemon::start(&dir, &api);
    let token = token_for(&api).unwrap();
    let mut child = std::process::Command::new(BIN)
        .env("PEERCONF_TOKEN", &token)
        .args(["--api", &format!("http://{api}"), "watch", "group"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    put_group(&api, "cli", "watched by the CLI");
    let line = rx.recv_timeout(Duration::from_secs(10)).expect("a line");
    let _ = child.kill();
    let _ = child.wait();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["event"], "put", "{v}");
    assert_eq!(v["name"], "cli", "{v}");
    assert_eq!(v["entity"]["fields"]["description"], "watched by the CLI");
}
