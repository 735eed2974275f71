//! `peerconf bench ...`: measurements on this machine, printed as a table and as JSON.

use crate::node::{InitOptions, Node, NodeOptions};
use crdt_schema::Kind;
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

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
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
    let db_bytes = std::fs::metadata(dir.path().join(crate::node::DB_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
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
        "  database file      {:>10.1} MB",
        db_bytes as f64 / 1048576.0
    );
    println!("{report}");
    let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    Ok(())
}
