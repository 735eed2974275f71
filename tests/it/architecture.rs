//! The lines the architecture draws, checked.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn assert_absent(dir: &str, forbidden: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(!files.is_empty(), "no sources under {dir}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                assert!(
                    !code.contains(word),
                    "{}:{}: `{word}` in code that must stay free of I/O: {line}",
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
            "Instant::now",
            "SystemTime::now",
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
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crdt-schema/Cargo.toml"),
    )
    .unwrap();
    for dep in ["tokio", "hyper", "redb"] {
        assert!(!manifest.contains(dep), "crdt-schema depends on {dep}");
    }
}
