//! Layer: binary (the `peerconf` tool; uses the library's public API only).
//!
//! `peerconf bench ...`: measurements on this machine, printed as a table and as JSON.

use crdt_schema::Kind;
use peerconf::node::{InitOptions, Node, NodeOptions};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// Peak resident set size of this process, in bytes (Linux: VmHWM).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time this process has used (user and system, every thread), in seconds.
fn process_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Log records (one per batch of sequential single writes, a page each) that fill most of the
/// 8 MiB log without making it checkpoint.
const RECORDS_IN_A_FULL_LOG: usize = 1900;

/// Copies a node's database and log while it is open: what `kill -9` leaves (redb's last commits
/// non-durable, the log holding them).
fn copy_as_crashed(from: &std::path::Path, to: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for f in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let f = f.map_err(|e| e.to_string())?;
        if f.path().is_file() {
            std::fs::copy(f.path(), to.join(f.file_name())).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Crash recovery in bounded time: how long a node takes from `open` to serving after a crash
/// with a full log, whatever the edit pattern.
pub async fn recovery(entities: usize) -> Result<(), String> {
    let mut rows = Vec::new();
    for pattern in ["hot", "many"] {
        let tmp = tempfile::Builder::new()
            .prefix("peerconf-bench-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let live = tmp.path().join("live");
        let opts = NodeOptions::default();
        Node::init(&live, &InitOptions::default(), &opts).map_err(|e| e.to_string())?;
        let node = Node::open(&live, opts.clone()).map_err(|e| e.to_string())?;
        // The stored entities, written concurrently, then checkpointed: the log then holds only
        // what follows.
        let writers = 64;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..entities).step_by(writers) {
                    let body = json!({"home_dir": format!("/home/u{i}"), "quota_bytes": i as i64});
                    node.put(Kind::User, &format!("u{i}"), body).await?;
                }
                Ok::<_, peerconf::Error>(())
            }));
        }
        for t in tasks {
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        node.store().checkpoint().map_err(|e| e.to_string())?;
        let checkpoints = node.store().metrics().checkpoints.get();
        for i in 0..RECORDS_IN_A_FULL_LOG {
            let (name, body) = match pattern {
                "hot" => (
                    "hot".to_string(),
                    json!({"home_dir": "/home/hot", "quota_bytes": i as i64}),
                ),
                _ => (format!("m{i}"), json!({"home_dir": format!("/home/m{i}")})),
            };
            node.put(Kind::User, &name, body)
                .await
                .map_err(|e| e.to_string())?;
        }
        if node.store().metrics().checkpoints.get() != checkpoints {
            return Err(
                "the log checkpointed while being filled: the bench needs fewer records".into(),
            );
        }
        let crashed = tmp.path().join("crashed");
        copy_as_crashed(&live, &crashed)?;
        let expected = node.doc_count().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let opening = Node::opening(&crashed).map_err(|e| e.to_string())?;
        let opened_ms = t.elapsed().as_secs_f64() * 1e3;
        let back = opening.start(opts).map_err(|e| e.to_string())?;
        let total_ms = t.elapsed().as_secs_f64() * 1e3;
        let replayed = back.store().metrics().replayed_records.get();
        let count = back.doc_count().map_err(|e| e.to_string())?;
        if count != expected {
            return Err(format!(
                "{pattern}: {count} documents after recovery, {expected} before"
            ));
        }
        if pattern == "hot" {
            let q = back
                .get(Kind::User, "hot")
                .map_err(|e| e.to_string())?
                .and_then(|v| v["fields"]["quota_bytes"].as_i64());
            if q != Some(RECORDS_IN_A_FULL_LOG as i64 - 1) {
                return Err(format!(
                    "hot: the last patch is missing after recovery ({q:?})"
                ));
            }
        }
        eprintln!("{pattern}: {replayed} records replayed, {count} documents, open {opened_ms:.0} ms, serving after {total_ms:.0} ms");
        rows.push(
            json!({"pattern": pattern, "stored_entities": entities, "records_replayed": replayed,
            "redb_open_ms": opened_ms, "recovered_ms": total_ms}),
        );
        let _ = tokio::task::spawn_blocking(move || {
            back.shutdown();
            node.shutdown();
        })
        .await;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"recovery": rows})).expect("json")
    );
    Ok(())
}

/// Loads `n` users into a fresh node with `writers` concurrent writers.
pub async fn store(n: usize, writers: usize) -> Result<(), String> {
    let writers = writers.max(1);
    let dir = tempfile::Builder::new()
        .prefix("peerconf-bench-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let opts = NodeOptions::default();
    Node::init(dir.path(), &InitOptions::default(), &opts).map_err(|e| e.to_string())?;
    let node = Node::open(dir.path(), opts).map_err(|e| e.to_string())?;
    let rss_start = peak_rss_bytes().unwrap_or(0);
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let node = node.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(lat);
                }
                let body = json!({
                    "home_dir": format!("/home/user{i}"),
                    "permissions": ["read", "list", "write"],
                    "quota_bytes": i as i64,
                    "email": format!("user{i}@example.com"),
                });
                let t = Instant::now();
                node.put(Kind::User, &format!("user{i}"), body)
                    .await
                    .map_err(|e| e.to_string())?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    let load_s = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let t = Instant::now();
    let listed = node.list_json(Kind::User).map_err(|e| e.to_string())?;
    let list_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Peak RSS is read before checking the listing, whose check is not part of the node's work.
    let peak = peak_rss_bytes().unwrap_or(0);
    let count = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&listed)
        .map(|v| v.len())
        .unwrap_or(0);
    if count != n {
        return Err(format!("listed {count} users, wrote {n}"));
    }
    let db_bytes = std::fs::metadata(dir.path().join(peerconf::node::DB_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    let space = {
        let store = node.store().clone();
        tokio::task::spawn_blocking(move || store.space())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    let report = json!({
        "bench": "store",
        "entities": n,
        "writers": writers,
        "writes_per_s": (n as f64 / load_s).round(),
        "write_p50_ms": percentile(&lat, 0.50),
        "write_p99_ms": percentile(&lat, 0.99),
        "list_all_ms": list_ms,
        "list_bytes": listed.len(),
        "peak_rss_mb": peak as f64 / 1048576.0,
        "rss_before_load_mb": rss_start as f64 / 1048576.0,
        "db_file_mb": db_bytes as f64 / 1048576.0,
        "db_bytes_per_entity": db_bytes / n.max(1) as u64,
        "space": space,
    });
    println!("peerconf bench store: {n} users, {writers} concurrent writers, durable commits");
    println!("  writes/s           {:>10.0}", n as f64 / load_s);
    println!("  write latency p50  {:>10.2} ms", percentile(&lat, 0.5));
    println!("  write latency p99  {:>10.2} ms", percentile(&lat, 0.99));
    println!(
        "  list all users     {:>10.1} ms ({} bytes)",
        list_ms,
        listed.len()
    );
    println!("  peak RSS           {:>10.1} MB", peak as f64 / 1048576.0);
    println!(
        "  database file      {:>10.1} MB ({} bytes per user)",
        db_bytes as f64 / 1048576.0,
        db_bytes / n.max(1) as u64
    );
    println!(
        "  pages allocated    {:>10.1} MB",
        space.allocated as f64 / 1048576.0
    );
    for t in &space.tables {
        println!(
            "    {:8} {:>8.1} MB in {:>7} pages: {:>8.1} MB keys and values, {:>6.1} MB metadata, {:>6.1} MB fragmented",
            t.name,
            (t.pages * space.page_size) as f64 / 1048576.0,
            t.pages,
            t.stored as f64 / 1048576.0,
            t.metadata as f64 / 1048576.0,
            t.fragmented as f64 / 1048576.0
        );
    }
    println!("{report}");
    let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    Ok(())
}

/// A node of the benchmark cluster: the node, its replication, and a feed of its changes.
struct BenchNode {
    node: Node,
    cluster: peerconf::cluster::Cluster,
}

async fn start_bench_node(dir: &std::path::Path) -> Result<BenchNode, String> {
    let node = Node::open(dir, NodeOptions::default()).map_err(|e| e.to_string())?;
    let cluster = peerconf::cluster::Cluster::start(node.clone())
        .await
        .map_err(|e| e.to_string())?;
    Ok(BenchNode { node, cluster })
}

fn free_loopback() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn root_of(n: &Node) -> [u8; 32] {
    n.published().digest().root()
}

/// Waits until every node has the same digest root; returns how long it took.
async fn converge(
    nodes: &[&Node],
    deadline: std::time::Duration,
) -> Result<std::time::Duration, String> {
    let t = Instant::now();
    loop {
        let r0 = root_of(nodes[0]);
        if nodes.iter().all(|n| root_of(n) == r0) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > deadline {
            return Err(format!("no convergence within {deadline:?}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Puts `n` users named `{prefix}{i}` on `node` with `writers` concurrent writers.
async fn load(node: &Node, prefix: &str, n: usize, writers: usize) -> Result<(), String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (node, next, prefix) = (node.clone(), next.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(());
                }
                node.put(
                    Kind::User,
                    &format!("{prefix}{i}"),
                    json!({"home_dir": format!("/home/{prefix}{i}"), "quota_bytes": i as i64}),
                )
                .await
                .map_err(|e| e.to_string())?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Write-to-visible-everywhere latency: writes on `writer`, each timed until the change event has
/// arrived on every other node.
async fn visibility(
    nodes: &[BenchNode],
    writers: usize,
    total: usize,
    tag: &str,
) -> Result<(Vec<f64>, f64), String> {
    use std::collections::HashMap;
    let seen: Arc<std::sync::Mutex<HashMap<String, (usize, Instant)>>> = Default::default();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let mut watchers = Vec::new();
    for bn in &nodes[1..] {
        let mut feed = bn.node.subscribe();
        let seen = seen.clone();
        let tag = tag.to_string();
        let arrived = arrived.clone();
        watchers.push(tokio::spawn(async move {
            while let Ok(ev) = feed.recv().await {
                if ev.name.starts_with(&tag) {
                    let mut s = seen.lock().expect("lock");
                    let e = s.entry(ev.name.clone()).or_insert((0, Instant::now()));
                    e.0 += 1;
                    e.1 = Instant::now();
                    drop(s);
                    arrived.notify_waiters();
                }
            }
        }));
    }
    let started: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let t0 = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (node, next, started, tag) = (
            nodes[0].node.clone(),
            next.clone(),
            started.clone(),
            tag.to_string(),
        );
        let seen = seen.clone();
        let arrived = arrived.clone();
        let others = nodes.len() - 1;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, String>(());
                }
                let name = format!("{tag}{i}");
                started
                    .lock()
                    .expect("lock")
                    .insert(name.clone(), Instant::now());
                node.put(Kind::Group, &name, json!({"description": "bench"}))
                    .await
                    .map_err(|e| e.to_string())?;
                if writers == 1 {
                    // One writer: the next write starts once this one is visible everywhere.
                    let until = Instant::now() + std::time::Duration::from_secs(10);
                    loop {
                        let wake = arrived.notified();
                        tokio::pin!(wake);
                        wake.as_mut().enable();
                        if seen
                            .lock()
                            .expect("lock")
                            .get(&name)
                            .is_some_and(|e| e.0 >= others)
                        {
                            break;
                        }
                        if Instant::now() > until {
                            return Err(format!("{name} not visible everywhere after 10 s"));
                        }
                        let _ =
                            tokio::time::timeout(std::time::Duration::from_millis(100), wake).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let others = nodes.len() - 1;
    let until = Instant::now() + std::time::Duration::from_secs(60);
    while seen
        .lock()
        .expect("lock")
        .values()
        .filter(|e| e.0 >= others)
        .count()
        < total
    {
        if Instant::now() > until {
            return Err("writes not visible everywhere after 60 s".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    for w in watchers {
        w.abort();
    }
    let started = started.lock().expect("lock");
    let seen = seen.lock().expect("lock");
    let mut lat: Vec<f64> = started
        .iter()
        .filter_map(|(k, t)| {
            seen.get(k)
                .map(|(_, v)| v.duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((lat, total as f64 / elapsed))
}

async fn idle_bytes_per_s(window: std::time::Duration, pairs: usize) -> f64 {
    use std::sync::atomic::Ordering;
    let b0 = peerconf::net::ipc::CLIENT_BYTES.load(Ordering::Relaxed);
    tokio::time::sleep(window).await;
    let b1 = peerconf::net::ipc::CLIENT_BYTES.load(Ordering::Relaxed);
    (b1 - b0) as f64 / window.as_secs_f64() / pairs as f64
}

/// `peerconf bench cluster`: a local 3-node cluster with TLS and durable storage.
pub async fn cluster(
    entities: usize,
    interval_ms: u64,
    latency_only: Option<usize>,
) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("peerconf-bench-cluster-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let mk = |i: usize| InitOptions {
        name: Some(format!("bench{i}")),
        api_listen: free_loopback(),
        ipc_listen: free_loopback(),
        ipc_advertise: None,
        api_tls: false,
        api_cert: None,
        api_certificate: None,
        admin: None,
    };
    let dir = |i: usize| tmp.path().join(format!("n{i}"));
    let first = mk(1);
    Node::init(&dir(1), &first, &NodeOptions::default()).map_err(|e| e.to_string())?;
    let mut nodes = vec![start_bench_node(&dir(1)).await?];
    for i in 2..=3 {
        let (token, _) =
            peerconf::cluster::create_token(&nodes[0].node, std::time::Duration::from_secs(600))
                .await
                .map_err(|e| e.to_string())?;
        peerconf::cluster::join::join(
            &dir(i),
            &first.ipc_listen.to_string(),
            &token.encode(),
            &mk(i),
        )
        .await
        .map_err(|e| e.to_string())?;
        nodes.push(start_bench_node(&dir(i)).await?);
    }
    nodes[0]
        .node
        .put(
            Kind::Settings,
            "global",
            json!({"replication_interval_ms": interval_ms}),
        )
        .await
        .map_err(|e| e.to_string())?;
    let all = |ns: &[BenchNode]| ns.iter().map(|b| b.node.clone()).collect::<Vec<_>>();
    let refs = all(&nodes);
    let r: Vec<&Node> = refs.iter().collect();
    converge(&r, std::time::Duration::from_secs(30)).await?;
    eprintln!("bench cluster: 3 nodes up; replication interval {interval_ms} ms");
    if let Some(n) = latency_only {
        let cpu0 = process_cpu_s();
        let (lat, _) = visibility(&nodes, 1, n, "lat1-").await?;
        let cpu_ms = (process_cpu_s() - cpu0) * 1000.0 / n.max(1) as f64;
        println!(
            "  write-to-visible p50/p99/max, 1 writer, {n} writes  {:.3} / {:.3} / {:.3} ms; CPU per replicated write (3 nodes) {cpu_ms:.3} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0)
        );
        stop_all(nodes).await;
        return Ok(());
    }

    // Idle traffic with 1,000 entities.
    load(&nodes[0].node, "small", 1000, 64).await?;
    converge(&r, std::time::Duration::from_secs(60)).await?;
    // Ten cycles per direction: the count of cycles in the window barely depends on the jitter.
    let window = std::time::Duration::from_millis(interval_ms * 10);
    // Let pushes still in flight finish before measuring what an idle cluster costs.
    tokio::time::sleep(std::time::Duration::from_millis(interval_ms * 2)).await;
    let idle_1k = idle_bytes_per_s(window, 3).await;
    eprintln!("idle at 1,000 entities: {idle_1k:.0} B/s per pair");

    // Latency, one writer (2,000 writes, each after the last is visible everywhere) and 64.
    let (lat1, _) = visibility(&nodes, 1, 2000, "lat1-").await?;
    let (lat64, rate64) = visibility(&nodes, 64, 3000, "lat64-").await?;
    eprintln!("latency measured");

    // Sustained writes to the full count.
    let t = Instant::now();
    let remaining = entities.saturating_sub(1000 + 3300);
    let cpu0 = process_cpu_s();
    load(&nodes[0].node, "big", remaining, 64).await?;
    converge(&r, std::time::Duration::from_secs(600)).await?;
    let sustained = remaining as f64 / t.elapsed().as_secs_f64();
    // Every node's work for each write (the writer's and both receivers'), and the load's own.
    let cpu_per_write_ms = (process_cpu_s() - cpu0) * 1000.0 / remaining.max(1) as f64;
    let total_docs = nodes[0].node.doc_count().map_err(|e| e.to_string())?;
    eprintln!("loaded {total_docs} documents");
    tokio::time::sleep(std::time::Duration::from_millis(interval_ms * 2)).await;
    let idle_big = idle_bytes_per_s(window, 3).await;

    // A new node catches up.
    let (token, _) =
        peerconf::cluster::create_token(&nodes[0].node, std::time::Duration::from_secs(600))
            .await
            .map_err(|e| e.to_string())?;
    let b0 = peerconf::net::ipc::CLIENT_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    peerconf::cluster::join::join(
        &dir(4),
        &first.ipc_listen.to_string(),
        &token.encode(),
        &mk(4),
    )
    .await
    .map_err(|e| e.to_string())?;
    nodes.push(start_bench_node(&dir(4)).await?);
    let refs = all(&nodes);
    let r: Vec<&Node> = refs.iter().collect();
    converge(&r, std::time::Duration::from_secs(600)).await?;
    let catch_up_s = t.elapsed().as_secs_f64();
    let catch_up_bytes =
        peerconf::net::ipc::CLIENT_BYTES.load(std::sync::atomic::Ordering::Relaxed) - b0;
    let peak = peak_rss_bytes().unwrap_or(0);

    let report = json!({
        "bench": "cluster",
        "nodes": 3,
        "documents": total_docs,
        "latency_1_writer_ms": {"p50": percentile(&lat1, 0.5), "p99": percentile(&lat1, 0.99), "samples": lat1.len()},
        "latency_64_writers_ms": {"p50": percentile(&lat64, 0.5), "p99": percentile(&lat64, 0.99), "samples": lat64.len()},
        "replicated_writes_per_s_64_writers": rate64.round(),
        "sustained_writes_per_s": sustained.round(),
        "cpu_ms_per_replicated_write": cpu_per_write_ms,
        "catch_up": {"documents": total_docs, "seconds": catch_up_s, "bytes": catch_up_bytes},
        "idle_bytes_per_s_per_pair": {"1000": idle_1k.round(), "all": idle_big.round(), "all_count": total_docs},
        "replication_interval_ms": interval_ms,
        "peak_rss_mb_all_nodes": peak as f64 / 1048576.0,
    });
    println!("peerconf bench cluster: 3 nodes on loopback, mutual TLS, durable commits");
    println!(
        "  write-to-visible p50/p99, 1 writer    {:>8.2} / {:>8.2} ms",
        percentile(&lat1, 0.5),
        percentile(&lat1, 0.99)
    );
    println!(
        "  write-to-visible p50/p99, 64 writers  {:>8.2} / {:>8.2} ms",
        percentile(&lat64, 0.5),
        percentile(&lat64, 0.99)
    );
    println!("  replicated writes/s, 64 writers       {rate64:>8.0}");
    println!("  sustained writes/s to {total_docs} docs   {sustained:>8.0}");
    println!("  CPU per replicated write, 3 nodes     {cpu_per_write_ms:>8.3} ms");
    println!("  new node catch-up                     {catch_up_s:>8.2} s, {catch_up_bytes} bytes");
    println!("  idle bytes/s per pair, 1,000 docs     {idle_1k:>8.0}");
    println!("  idle bytes/s per pair, {total_docs} docs {idle_big:>8.0}");
    println!("{report}");
    stop_all(nodes).await;
    Ok(())
}

async fn stop_all(nodes: Vec<BenchNode>) {
    for bn in nodes {
        bn.cluster.stop().await;
        let n = bn.node;
        let _ = tokio::task::spawn_blocking(move || n.shutdown()).await;
    }
}
