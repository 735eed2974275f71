//! Storage reliability with real processes: a full disk (on a small file system the test mounts)
//! refuses writes honestly, keeps reads working, shows in readiness and in the peers' status, and
//! recovers by itself when space is freed; a restart on a nearly full disk succeeds; nothing
//! acknowledged is lost.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs of a given size, mounted for the test and unmounted after it.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    /// None, with the reason printed, where this machine forbids mounting.
    fn mount(dir: &Path, mib: u64) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match o {
            Ok(o) if o.status.success() => Some(SmallFs {
                dir: dir.to_path_buf(),
            }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a small file system here ({}); the disk-full tests need root and mount(8)",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount(8): {e}");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the file system holding `dir` with `filler` until at most `leave` bytes are free.
fn fill(dir: &Path, filler: &Path, leave: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    loop {
        let free = peerconf::node::disk::free_bytes(dir).unwrap();
        if free <= leave {
            break;
        }
        let n = (free - leave).min(1 << 20) as usize;
        if f.write_all(&vec![7u8; n]).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
}

fn put_user(api: &str, name: &str) -> (u16, String) {
    http(
        api,
        "PUT",
        &format!("/v1/entities/user/{name}"),
        Some(&format!(r#"{{"home_dir":"/home/{name}"}}"#)),
    )
}

fn status_of(api: &str, node: &str) -> Option<String> {
    let st = http_json(api, "/v1/status")?;
    st["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["status"].as_str().map(str::to_string))
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_by_itself() {
    let root = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&root.path().join("small"), 64) else {
        return;
    };
    // n1 on the small file system, n2 on the ordinary one.
    let n1_dir = fs.dir.join("n1");
    let (api1, ipc1, _) = init_node(&n1_dir, "n1");
    let mut n1 = Daemon::start(&n1_dir, &api1);
    wait_listening(&ipc1, "n1's IPC port");
    stdout_json(&n1.cli(&[
        "put",
        "settings",
        "global",
        "--json",
        r#"{"heartbeat_interval_ms":100,"offline_timeout_ms":1000,"replication_interval_ms":500}"#,
    ]));
    let n2_dir = root.path().join("n2");
    let token = token_create(&api1, None);
    let (o, api2, ipc2) = join_node(&n2_dir, &ipc1, &token, "n2", &[]);
    assert!(o.status.success(), "join: {}", stderr(&o));
    let _n2 = Daemon::start(&n2_dir, &api2);
    wait_listening(&ipc2, "n2's IPC port");

    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let name = format!("before{i}");
        let (code, body) = put_user(&api1, &name);
        assert_eq!(code, 200, "{body}");
        acknowledged.push(name);
    }

    // Fill the disk to below the node's limit (8 MiB free).
    let filler = fs.dir.join("filler");
    fill(&fs.dir, &filler, 4 << 20);
    let refused = wait_for(Duration::from_secs(10), || {
        let (code, body) = put_user(&api1, "while-full");
        (code == 507).then_some(body)
    })
    .expect("writes on a full disk were not refused with 507 within 10 s");
    assert!(
        refused.contains("disk_full") && refused.contains("full"),
        "the refusal does not say the disk is full: {refused}"
    );
    assert!(
        wait_for(Duration::from_secs(5), || (http(
            &api1, "GET", "/readyz", None
        )
        .0 == 503)
            .then_some(()))
        .is_some(),
        "/readyz is not 503 on a full disk"
    );
    // Reads of stored entities keep working.
    for name in &acknowledged {
        let (code, body) = http(&api1, "GET", &format!("/v1/entities/user/{name}"), None);
        assert_eq!(code, 200, "reading {name} on a full disk: {body}");
    }
    assert_eq!(
        http(&api1, "GET", "/v1/entities/user", None).0,
        200,
        "listing on a full disk"
    );
    // The peer sees it.
    assert!(
        wait_for(Duration::from_secs(10), || {
            (status_of(&api2, "n1").as_deref() == Some("DISK_FULL")).then_some(())
        })
        .is_some(),
        "n2 does not show n1 as DISK_FULL: {:?}",
        http_json(&api2, "/v1/status")
    );
    // A write made on n2 meanwhile is refused by n1's disk, not lost: it arrives later.
    let (code, body) = put_user(&api2, "from-n2-while-full");
    assert_eq!(code, 200, "{body}");
    let mut elsewhere = vec!["from-n2-while-full".to_string()];

    // Space comes back: writes resume by themselves within seconds.
    std::fs::remove_file(&filler).unwrap();
    let t = std::time::Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || (put_user(&api1, "after").0
            == 200)
            .then_some(()))
        .is_some(),
        "writes did not resume within 10 s of space being freed; log:\n{}",
        n1.log_text()
    );
    eprintln!(
        "writes resumed {} ms after space was freed",
        t.elapsed().as_millis()
    );
    acknowledged.push("after".into());
    assert_eq!(http(&api1, "GET", "/readyz", None).0, 200);

    // A restart on a nearly full disk: filled to the last byte while the node is down.
    n1.kill9();
    fill(&fs.dir, &filler, 0);
    let mut n1 = Daemon::start(&n1_dir, &api1);
    assert!(
        wait_for(Duration::from_secs(20), || (http(
            &api1, "GET", "/livez", None
        )
        .0 == 200)
            .then_some(()))
        .is_some(),
        "n1 did not start on a nearly full disk; log:\n{}",
        n1.log_text()
    );
    let all_there = |api: &str, names: &[String]| {
        wait_for(Duration::from_secs(20), || {
            names
                .iter()
                .all(|name| http(api, "GET", &format!("/v1/entities/user/{name}"), None).0 == 200)
                .then_some(())
        })
        .is_some()
    };
    // Everything n1 acknowledged is there (what it never received waits for space).
    assert!(
        all_there(&api1, &acknowledged),
        "a write n1 acknowledged is missing after a restart on a full disk; log:\n{}",
        n1.log_text()
    );
    assert_eq!(put_user(&api1, "still-full").0, 507);
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || (put_user(&api1, "last").0
            == 200)
            .then_some(()))
        .is_some(),
        "writes did not resume after the restart once space was freed"
    );
    acknowledged.push("last".into());
    acknowledged.append(&mut elsewhere);
    assert!(
        all_there(&api1, &acknowledged),
        "n1 did not catch up once space was freed"
    );
    assert!(
        all_there(&api2, &acknowledged),
        "an acknowledged write is missing on n2"
    );
    n1.stop();
}

/// The disk fills while writes are under way (something else takes the space between the
/// node's check of the free space and its commits): some commits meet ENOSPC inside redb. No
/// write is reported done that is not, the node reopens its store (reads keep working), refuses
/// writes, and resumes once space is freed; every acknowledged write is there.
#[test]
fn the_disk_filling_under_running_writes_breaks_nothing() {
    let root = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&root.path().join("small"), 64) else {
        return;
    };
    let dir = fs.dir.join("n1");
    let api = init(&dir, "n1");
    let mut n1 = Daemon::start(&dir, &api);
    wait_listening(&api, "n1's API");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (api, stop) = (api.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("w{w}-{i}");
                    let (code, text) = put_user(&api, &name);
                    outcomes.push((name, code, text));
                    i += 1;
                }
                outcomes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let filler = fs.dir.join("filler");
    fill(&fs.dir, &filler, 0);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes: Vec<(String, u16, String)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let count = |c: u16| outcomes.iter().filter(|o| o.1 == c).count();
    for (name, code, text) in &outcomes {
        assert!(
            *code == 200 || *code == 507 || (*code == 503 && text.contains("outcome_unknown")),
            "{name} answered {code}: {text}"
        );
    }
    assert!(
        count(200) > 0 && count(200) < outcomes.len(),
        "{outcomes:?}"
    );
    eprintln!(
        "{} writes: {} acknowledged, {} refused (disk_full), {} outcome unknown",
        outcomes.len(),
        count(200),
        count(507),
        count(503)
    );
    assert!(
        wait_for(Duration::from_secs(10), || (http(
            &api, "GET", "/readyz", None
        )
        .0 == 503)
            .then_some(()))
        .is_some(),
        "/readyz is not 503 on a full disk"
    );
    let acknowledged: Vec<&String> = outcomes
        .iter()
        .filter(|o| o.1 == 200)
        .map(|o| &o.0)
        .collect();
    let all_there = || {
        wait_for(Duration::from_secs(10), || {
            acknowledged
                .iter()
                .all(|n| http(&api, "GET", &format!("/v1/entities/user/{n}"), None).0 == 200)
                .then_some(())
        })
        .is_some()
    };
    assert!(
        all_there(),
        "reads fail, or an acknowledged write is missing, on the full disk; log:\n{}",
        n1.log_text()
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || (put_user(&api, "after").0
            == 200)
            .then_some(()))
        .is_some(),
        "writes did not resume once space was freed; log:\n{}",
        n1.log_text()
    );
    assert!(
        all_there(),
        "an acknowledged write is missing after recovery"
    );
    // And across a restart.
    n1.stop();
    let n1 = Daemon::start(&dir, &api);
    wait_listening(&api, "n1's API");
    assert!(
        all_there(),
        "an acknowledged write is missing after a restart"
    );
    drop(n1);
}

/// ENOSPC inside a commit, at the store: the commit fails with a disk-full error (or, its log
/// record durable, as unsettled), the store says it must be reopened, and reopening it once space
/// is back replays the log: the unsettled batch takes effect, nothing committed before is lost.
#[test]
fn a_store_that_ran_out_of_space_reopens_and_replays() {
    use automerge::transaction::Transactable;
    use peerconf::store::{Store, StoreError};
    let root = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&root.path().join("small"), 48) else {
        return;
    };
    let db = fs.dir.join("db");
    let store = Store::open(&db).unwrap();
    let put = |store: &Store, id: &str, size: usize| -> Result<(), StoreError> {
        let mut d = automerge::AutoCommit::new();
        // Incompressible bytes, so the document really takes `size` bytes.
        let mut x: u64 = id.len() as u64 + size as u64;
        let bytes: Vec<u8> = (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        d.put(automerge::ROOT, "blob", bytes).unwrap();
        d.commit();
        let entry = peerconf::store::IndexEntry {
            alive: true,
            conflicts: false,
            chunks: 0,
            heads_hash: [1; 32],
            json: b"{}".to_vec(),
            secrets: Vec::new(),
        };
        let mut txn = store.write()?;
        txn.put_doc(id, &mut d, entry, None, &[], &[])?;
        txn.commit(None)
    };
    put(&store, "user/kept", 1000).unwrap();
    let filler = fs.dir.join("filler");
    fill(&fs.dir, &filler, 0);
    let mut failed = None;
    for i in 0..64 {
        if let Err(e) = put(&store, &format!("user/big{i}"), 512 * 1024) {
            failed = Some((i, e));
            break;
        }
    }
    let (i, e) = failed.expect("writes never ran out of space");
    assert!(
        e.disk_full(),
        "the failure does not say the disk is full: {e}"
    );
    eprintln!(
        "write {i} failed: {e:?}; the store asks to be reopened: {}",
        store.broken()
    );
    if store.broken() {
        // redb refuses everything after an I/O error inside its commit.
        assert!(matches!(e, StoreError::Unsettled(_)), "{e:?}");
    } else {
        // Refused before redb committed anything: the store still serves.
        assert!(store.load_doc("user/kept").unwrap().is_some());
    }
    std::fs::remove_file(&filler).unwrap();
    store.reopen().expect("reopen once space is back");
    assert!(!store.broken());
    assert!(
        store.load_doc("user/kept").unwrap().is_some(),
        "a committed document was lost"
    );
    let settled = store.load_doc(&format!("user/big{i}")).unwrap().is_some();
    assert_eq!(
        settled,
        matches!(e, StoreError::Unsettled(_)),
        "an unsettled batch must come back at reopen, a refused one must not ({e})"
    );
    put(&store, "user/after", 1000).expect("writes work after the reopen");
}

const FAST: &str =
    r#"{"heartbeat_interval_ms":100,"offline_timeout_ms":1000,"replication_interval_ms":500}"#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn group(api: &str, name: &str, description: &str) {
    let (code, body) = http(
        api,
        "PUT",
        &format!("/v1/entities/group/{name}"),
        Some(&format!(r#"{{"description":"{description}"}}"#)),
    );
    assert_eq!(code, 200, "{body}");
}

fn has_group(api: &str, name: &str) -> bool {
    http(api, "GET", &format!("/v1/entities/group/{name}"), None).0 == 200
}

/// A node restored from a copy taken before the others joined knows only itself. Its peers'
/// heartbeats (certified by the cluster CA) teach it the current member list, and it replicates
/// with them again by itself; a removed member is still refused.
#[test]
fn a_node_restored_from_an_old_copy_learns_the_members_from_its_peers() {
    let root = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(root.path(), 1, FAST);
    // The copy: n1 alone, stopped cleanly.
    ns[0].stop();
    let backup = root.path().join("n1-backup");
    copy_dir(&ns[0].dir, &backup);
    ns[0].restart();
    for i in 2..=3 {
        let name = format!("n{i}");
        let dir = root.path().join(&name);
        let token = token_create(&ns[0].api, None);
        let (o, api, ipc) = join_node(&dir, &ns[0].ipc, &token, &name, &[]);
        assert!(o.status.success(), "join {name}: {}", stderr(&o));
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let d = Daemon::start(&dir, &api);
        wait_listening(&ipc, &name);
        ns.push(ClusterNode {
            name,
            dir,
            api,
            ipc,
            id,
            d,
        });
    }
    group(&ns[1].api, "before", "written on n2 before the restore");
    // n1 back from the copy: its member list holds only itself.
    ns[0].stop();
    std::fs::remove_dir_all(&ns[0].dir).unwrap();
    copy_dir(&backup, &ns[0].dir);
    ns[0].restart();
    let t = std::time::Instant::now();
    let healed = wait_for(Duration::from_secs(20), || {
        let ok = ["n2", "n3"]
            .iter()
            .all(|n| status_of(&ns[0].api, n).as_deref() == Some("ONLINE"));
        (ok && has_group(&ns[0].api, "before")).then_some(())
    });
    assert!(
        healed.is_some(),
        "n1 did not learn its peers back: {:?}\nlog:\n{}",
        http_json(&ns[0].api, "/v1/status"),
        ns[0].d.log_text()
    );
    eprintln!(
        "n1 healed its member list in {} ms",
        t.elapsed().as_millis()
    );
    // Both ways, at once.
    group(&ns[0].api, "from-n1", "after the restore");
    assert!(
        wait_for(Duration::from_secs(5), || (has_group(
            &ns[1].api, "from-n1"
        ) && has_group(
            &ns[2].api, "from-n1"
        ))
        .then_some(()))
        .is_some(),
        "a write on the restored n1 does not reach n2 and n3"
    );
    // A removed member stays removed for the healed node. n3 is stopped while it is removed, so
    // that it cannot learn of its removal (a removed node stops calling its peers) and calls n1
    // when it runs again.
    ns[2].stop();
    let o = ns[1].d.cli(&["node", "remove", &ns[2].id]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        wait_for(Duration::from_secs(10), || {
            http_json(&ns[0].api, "/v1/nodes")
                .and_then(|v| {
                    v["members"]
                        .as_array()?
                        .iter()
                        .find(|m| m["id"] == ns[2].id.as_str())
                        .map(|m| m["removed"] == true)
                })
                .filter(|r| *r)
        })
        .is_some(),
        "n1 does not see n3 removed"
    );
    group(&ns[0].api, "after-removal", "not for n3");
    ns[2].restart();
    // n3 keeps trying every replication interval (0.5 s) and heartbeat (0.1 s): 3 s is six
    // intervals, enough for a write to cross many times over if it were let through.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !has_group(&ns[2].api, "after-removal"),
        "a removed node received a write"
    );
    assert!(
        ns[0].d.log_text().contains("was removed from this cluster"),
        "n1 did not refuse the removed node"
    );
}

/// A node whose log is damaged in the middle does not start (it would serve less than it
/// acknowledged); `peerconf repair` rebuilds it from its peers, keeping its identity.
#[test]
fn a_damaged_node_refuses_to_start_and_repair_rebuilds_it_from_its_peers() {
    let root = tempfile::tempdir().unwrap();
    let mut ns = form_cluster(root.path(), 3, FAST);
    for i in 0..30 {
        group(&ns[1].api, &format!("g{i}"), "x");
    }
    // Replicated before the damage: repair rebuilds the node from its peers, so it drops what
    // only the damaged node held.
    let everywhere = || {
        (0..30).all(|i| {
            let g = format!("g{i}");
            has_group(&ns[0].api, &g) && has_group(&ns[2].api, &g)
        })
    };
    assert!(wait_for(Duration::from_secs(10), || everywhere().then_some(())).is_some());
    // Killed with records in its log, then one record in the middle damaged.
    ns[1].d.kill9();
    let wal = ns[1].dir.join("peerconf.redb.wal");
    let bytes = std::fs::read(&wal).unwrap();
    let records = bytes
        .chunks(4096)
        .skip(1)
        .take_while(|p| p[..4] == 0x5043_574c_u32.to_le_bytes())
        .count();
    assert!(records >= 3, "only {records} records in n2's log");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
        f.write_all_at(&[0xff], 2 * 4096 + 40).unwrap();
    }
    let o = run_must_fail(&ns[1].dir);
    let err = stderr(&o);
    assert!(
        err.contains("damaged") && err.contains("peerconf repair --data-dir"),
        "a damaged node's refusal does not say what to run: {err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_peerconf"))
        .args(["repair", "--data-dir"])
        .arg(&ns[1].dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "repair: {}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        ns[1].id,
        "repair changed the node's identity"
    );
    ns[1].d = Daemon::start(&ns[1].dir, &ns[1].api);
    wait_listening(&ns[1].api, "n2's API");
    let t = std::time::Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || (0..30)
            .all(|i| has_group(&ns[1].api, &format!("g{i}")))
            .then_some(()))
        .is_some(),
        "the repaired n2 did not get its data back from its peers; log:\n{}",
        ns[1].d.log_text()
    );
    eprintln!("repaired n2 caught up in {} ms", t.elapsed().as_millis());
    let me = http_json(&ns[1].api, "/v1/node").unwrap();
    assert_eq!(me["id"], ns[1].id.as_str());
    group(&ns[1].api, "after-repair", "y");
    assert!(
        wait_for(Duration::from_secs(5), || has_group(
            &ns[0].api,
            "after-repair"
        )
        .then_some(()))
        .is_some(),
        "a write on the repaired node does not replicate"
    );
}

/// A byte flipped in the database after an unclean stop, wherever it lands: the node either
/// refuses to start (saying what to run) or starts with every acknowledged write readable (or a
/// read that fails loudly); it never starts quietly without one.
#[test]
fn a_flipped_byte_in_the_database_never_starts_a_node_with_less() {
    use peerconf::{Kind, Node, NodeOptions};
    let root = tempfile::tempdir().unwrap();
    let live = root.path().join("live");
    Node::init(&live, &Default::default(), &NodeOptions::default()).unwrap();
    let node = Node::open(&live, NodeOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut names = Vec::new();
    rt.block_on(async {
        for i in 0..300 {
            let name = format!("g{i}");
            node.put(
                Kind::Group,
                &name,
                serde_json::json!({"description": format!("d{i}")}),
            )
            .await
            .unwrap();
            names.push(name);
            // Some are durable in redb itself, the rest only in the log.
            if i == 150 {
                node.store().checkpoint().unwrap();
            }
        }
    });
    // What an unclean stop leaves: the files as they are while the node runs.
    let crashed = root.path().join("crashed");
    copy_dir(&live, &crashed);
    let db_len = std::fs::metadata(crashed.join("peerconf.redb"))
        .unwrap()
        .len();
    let (mut refused, mut served) = (0, 0);
    for k in 0..48u64 {
        let dir = root.path().join(format!("flip{k}"));
        copy_dir(&crashed, &dir);
        let at = (db_len / 48) * k + 97;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join("peerconf.redb"))
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
        }
        match Node::open(&dir, NodeOptions::default()) {
            Err(e) => {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    msg.contains("peerconf repair")
                        || msg.contains("corrupt")
                        || msg.contains("storage"),
                    "byte {at}: the refusal does not say what is wrong: {msg}"
                );
            }
            Ok(n) => {
                served += 1;
                for name in &names {
                    if let Ok(v) = n.get(Kind::Group, name) {
                        assert!(
                            v.is_some(),
                            "byte {at}: the node started without acknowledged group {name}"
                        );
                    }
                }
                n.shutdown();
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("48 flipped bytes: {refused} refused to start, {served} started with everything");
    node.shutdown();
}
