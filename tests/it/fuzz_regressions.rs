//! Replays every input kept in `fuzz/regressions/<target>/` through the fuzz target's logic
//! (`peerconf::sim::fuzzing`); `fuzz/regressions/README.md` says what each input covers. A
//! target whose directory is missing or empty fails: a replay of nothing proves nothing.

use peerconf::sim::fuzzing::ByteSource;
use peerconf::sim::Scenario;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn regressions(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target)
}

/// The inputs (regular files) in `dir`, sorted by name. Panics if the directory is missing or
/// holds none.
fn inputs(dir: &Path, target: &str) -> Vec<PathBuf> {
    let rd = std::fs::read_dir(dir).unwrap_or_else(|e| {
        panic!(
            "fuzz target {target}: cannot read its regression inputs in {}: {e}",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = rd
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "fuzz target {target}: {} holds no regression input; it must keep at least one (see fuzz/regressions/README.md)",
        dir.display()
    );
    files
}

/// Runs `f` on every input in `dir`; panics naming every input that panicked.
fn replay_dir(dir: &Path, target: &str, f: fn(&[u8])) {
    let files = inputs(dir, target);
    let mut failed = Vec::new();
    for p in &files {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        eprintln!("replaying {} ({} bytes)", p.display(), data.len());
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            failed.push(p.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target {target}: {} of {} regression inputs failed (their panics are printed above): {failed:?}\nreplay one with `cargo fuzz run -s none -O {target} FILE` in fuzz/",
        failed.len(),
        files.len()
    );
    eprintln!("{target}: {} regression inputs replayed", files.len());
}

fn replay(target: &str, f: fn(&[u8])) {
    replay_dir(&regressions(target), target, f);
}

#[test]
fn merge_convergence_regressions() {
    replay(
        "merge_convergence",
        peerconf::sim::fuzzing::merge_convergence,
    );
}

#[test]
fn decode_regressions() {
    replay("decode", peerconf::sim::fuzzing::decode);
}

#[test]
fn simulation_regressions() {
    replay("simulation", peerconf::sim::fuzzing::simulation);
}

/// The replay refuses a missing or an empty directory, and names an input that fails.
#[test]
fn replay_fails_on_a_missing_or_empty_directory_and_on_a_failing_input() {
    fn ok(_: &[u8]) {}
    fn fails(data: &[u8]) {
        assert!(data != b"bad", "this input fails");
    }
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    assert!(
        catch_unwind(|| replay_dir(&missing, "missing", ok)).is_err(),
        "a missing directory was replayed without failing"
    );
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    // A subdirectory is not an input.
    std::fs::create_dir(empty.join("sub")).unwrap();
    assert!(
        catch_unwind(|| replay_dir(&empty, "empty", ok)).is_err(),
        "an empty directory was replayed without failing"
    );
    let some = tmp.path().join("some");
    std::fs::create_dir(&some).unwrap();
    std::fs::write(some.join("good"), b"good").unwrap();
    replay_dir(&some, "some", fails);
    std::fs::write(some.join("bad"), b"bad").unwrap();
    assert!(
        catch_unwind(|| replay_dir(&some, "some", fails)).is_err(),
        "a failing input was replayed without failing"
    );
}

/// The simulation inputs still draw the scenarios their names promise (a change to
/// `Scenario::draw` can make an input cover something else; then find new bytes for it, as
/// fuzz/regressions/README.md says).
#[test]
fn simulation_inputs_draw_the_scenarios_they_are_named_for() {
    type Check = fn(&Scenario) -> bool;
    let named: &[(&str, Check)] = &[
        ("two-nodes-calm-network-one-write", |s| {
            s.nodes == 2
                && s.writes == 1
                && s.faults.drop_pct == 0
                && s.faults.dup_pct == 0
                && !s.faults.partitions
                && !s.faults.crashes
        }),
        ("two-nodes-crashes", |s| {
            s.nodes == 2 && s.faults.crashes && s.faults.commit_crash_pct == 0
        }),
        ("two-nodes-one-write-one-crash", |s| {
            s.nodes == 2 && s.writes == 1 && s.faults.crashes
        }),
        ("three-nodes-partitions", |s| {
            s.nodes == 3 && s.faults.partitions && !s.faults.crashes
        }),
        ("three-nodes-commit-crashes", |s| {
            s.nodes == 3 && s.faults.crashes && s.faults.commit_crash_pct > 0
        }),
        ("four-nodes-loss-partitions-crashes", |s| {
            s.nodes == 4
                && s.faults.drop_pct > 0
                && s.faults.partitions
                && s.faults.crashes
                && s.faults.commit_crash_pct > 0
        }),
    ];
    let dir = regressions("simulation");
    for (name, check) in named {
        let p = dir.join(name);
        let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let sc = Scenario::draw(&mut ByteSource::then_seeded(&data), 0);
        assert!(
            check(&sc),
            "{} no longer draws the scenario its name says: {sc:?}",
            p.display()
        );
    }
}
