//! The lines the architecture draws, checked: what each layer may import, that no modules import
//! each other in a circle, that every module says which layer it belongs to, that the core stays
//! free of I/O, and that the simulator and the replicator hold no replication logic of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Source without comments and without its `#[cfg(test)] mod tests { .. }` block (tests may
/// reach anywhere).
fn code_of(text: &str) -> String {
    let code = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let Some(start) = code.find("#[cfg(test)]\nmod tests") else {
        return code;
    };
    let open = start + code[start..].find('{').expect("a test module has a body");
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return format!("{}{}", &code[..start], &code[open + i + 1..]);
                }
            }
            _ => {}
        }
    }
    code[..start].to_string()
}

fn assert_absent(dir: &str, forbidden: &[&str]) {
    let mut files = Vec::new();
    rust_files(&root().join(dir), &mut files);
    assert!(!files.is_empty(), "no sources under {dir}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                assert!(
                    !code.contains(word),
                    "{}:{}: `{word}` in code that must stay free of it: {line}",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}

/// The core decides; it never performs I/O, reads a clock or draws unseeded randomness.
#[test]
fn core_is_sans_io() {
    assert_absent(
        "src/core",
        &[
            "tokio",
            "hyper",
            "redb",
            "std::fs",
            "std::net::Tcp",
            "thread_rng",
            "rand::rng()",
            "rand::random",
            "Instant::now",
            "SystemTime::now",
            "std::env",
        ],
    );
}

/// The schema crate is pure: no async runtime, network or storage.
#[test]
fn schema_crate_is_pure() {
    assert_absent(
        "crdt-schema/src",
        &["tokio", "hyper", "redb", "std::fs", "SystemTime", "Instant"],
    );
    let manifest = std::fs::read_to_string(root().join("crdt-schema/Cargo.toml")).unwrap();
    for dep in ["tokio", "hyper", "redb"] {
        assert!(!manifest.contains(dep), "crdt-schema depends on {dep}");
    }
}

/// The library's modules: path of each file as a module path (`core::link`, `node`, ...).
fn modules() -> BTreeMap<String, PathBuf> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().to_string();
        if rel.starts_with("bin/") || rel == "lib.rs" {
            continue;
        }
        let m = rel
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .replace('/', "::");
        out.insert(m, f);
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that follows `prefix` in `code`, with `{a, b::c}` groups expanded (one level).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let mut segs = Vec::new();
        let mut s = rest;
        loop {
            let n = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
            if n == 0 {
                break;
            }
            segs.push(s[..n].to_string());
            s = &s[n..];
            if let Some(t) = s.strip_prefix("::") {
                s = t;
                if let Some(group) = s.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    for item in group[..end].split(',') {
                        let item = item.trim();
                        let mut p = segs.clone();
                        p.extend(
                            item.split("::")
                                .map(|x| x.trim().to_string())
                                .filter(|x| !x.is_empty() && x.chars().all(is_ident)),
                        );
                        out.push(p);
                    }
                    segs.clear();
                    break;
                }
            } else {
                break;
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module.
fn resolve(path: &[String], mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

/// Edges `module -> module it imports`, from `crate::`, `super::` and child-module paths.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, file) in &mods {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let is_mod_rs = file.ends_with("mod.rs");
        let here: Vec<String> = m.split("::").map(str::to_string).collect();
        // `super` of a file module is its parent; of a mod.rs, the parent of its folder.
        let parent: Vec<String> = if is_mod_rs {
            here[..here.len().saturating_sub(1)].to_vec()
        } else {
            here[..here.len() - 1].to_vec()
        };
        let mut targets = Vec::new();
        for p in paths_after(&code, "crate::") {
            targets.push(p);
        }
        for p in paths_after(&code, "super::") {
            let mut full = parent.clone();
            full.extend(p);
            targets.push(full);
        }
        if is_mod_rs {
            // Children named directly (`mod x; use x::Y;`).
            for (child, _) in mods.iter().filter(|(c, _)| {
                c.strip_prefix(&format!("{m}::"))
                    .is_some_and(|rest| !rest.contains("::"))
            }) {
                let name = child.rsplit("::").next().unwrap();
                for p in paths_after(&code, &format!("{name}::")) {
                    let mut full = here.clone();
                    full.push(name.to_string());
                    full.extend(p);
                    targets.push(full);
                }
            }
        }
        let set = edges.entry(m.clone()).or_default();
        for t in targets {
            if let Some(r) = resolve(&t, &mods) {
                if &r != m {
                    set.insert(r);
                }
            }
        }
    }
    edges
}

/// What each layer may import besides itself (lowest layer first).
const LAYERS: &[(&str, &[&str])] = &[
    ("core", &[]),
    ("store", &["core"]),
    ("net", &["core"]),
    ("node", &["core", "store", "net"]),
    ("cluster", &["core", "store", "net", "node"]),
    ("admin", &["core", "store", "net", "node", "cluster"]),
    ("sim", &["core", "store", "net", "node", "cluster"]),
];

#[test]
fn layers_import_only_what_lies_below_them() {
    let edges = imports();
    assert!(
        edges.len() > 20,
        "found only {} modules: the scan is broken",
        edges.len()
    );
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        let layer = from.split("::").next().unwrap();
        let ok = allowed
            .get(layer)
            .unwrap_or_else(|| panic!("module {from} is in no layer: add it to LAYERS"));
        for to in tos {
            let target = to.split("::").next().unwrap();
            if target != layer && !ok.contains(&target) {
                wrong.push(format!("{from} imports {to}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
    // The scan sees real edges (else the test proves nothing).
    assert!(edges["cluster::replicator"].contains("core::link"));
    assert!(edges["node::driver"].contains("store"));
}

#[test]
fn no_module_imports_itself_in_a_circle() {
    let edges = imports();
    // Depth-first search for a back edge; report the circle it closes.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n.as_str()).copied().unwrap_or(0) {
                1 => {
                    let i = stack.iter().position(|x| x == n).unwrap();
                    let mut c = stack[i..].to_vec();
                    c.push(n.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(n, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, &edges, &mut state, &mut Vec::new()) {
                panic!("import circle: {}", c.join(" -> "));
            }
        }
    }
}

#[test]
fn every_module_names_its_layer() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy();
        if name == "lib.rs" || name == "main.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let head: String = text.lines().take(3).collect::<Vec<_>>().join("\n");
        assert!(
            head.contains("Layer: "),
            "{} does not say which layer it belongs to in its first lines",
            f.display()
        );
    }
}

/// The decisions of replication live in the core (`core::link`, `core::repl`, `core::digest`)
/// and the driver; the replicator and the simulator only carry them out. They may not name the
/// pieces those decisions are made of.
#[test]
fn the_simulator_and_the_replicator_hold_no_replication_logic() {
    let decisions = [
        "Sessions",
        "Cycle",
        "plan",
        "Plan",
        "generate_sync_message",
        "receive_sync_message",
        "ends_push",
        "push_message",
        "SYNC_ROUNDS_MAX",
        "SYNC_DOCS_MAX",
        "FETCH_DOCS_MAX",
        "BACKOFF",
        "READY_MAX",
        "INGESTS_MAX",
        "claim",
        "release",
    ];
    // Whole identifiers only: `Output::CycleDone` is not `Cycle`.
    let names = |code: &str, word: &str| {
        code.match_indices(word).any(|(i, _)| {
            let before = code[..i].chars().last();
            let after = code[i + word.len()..].chars().next();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
    };
    for dir in ["src/sim", "src/cluster/replicator.rs"] {
        let p = root().join(dir);
        let mut files = Vec::new();
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else {
            files.push(p);
        }
        for f in files {
            let code = code_of(&std::fs::read_to_string(&f).unwrap());
            for d in decisions {
                assert!(
                    !names(&code, d),
                    "{} names `{d}`: replication decisions belong to the core's peer link and the driver",
                    f.display()
                );
            }
        }
    }
    // And they do drive the production pieces.
    let sim = code_of(&std::fs::read_to_string(root().join("src/sim/simulator.rs")).unwrap());
    for used in [
        "PeerLink",
        "link.handle(",
        "repl::answer_digest",
        "driver.step(",
        "Store::open_sim",
    ] {
        assert!(sim.contains(used), "the simulator no longer uses {used}");
    }
    let rep = code_of(&std::fs::read_to_string(root().join("src/cluster/replicator.rs")).unwrap());
    assert!(rep.contains("PeerLink") && rep.contains("link.handle("));
    let server = code_of(&std::fs::read_to_string(root().join("src/cluster/server.rs")).unwrap());
    assert!(
        server.contains("repl::answer_digest"),
        "the IPC server answers digest requests with the core's responder"
    );
}
