//! The deterministic cluster simulator: many seeded scenarios of loss, duplication, reordering,
//! delay, partitions and crashes. Every node must end with identical documents and entities, no
//! acknowledged write may be lost, and sync must never stall.
//!
//! `PEERCONF_SEED=N` replays one scenario; `PEERCONF_SIM_CASES=N` runs more.

use peerconf::sim::{run, Scenario};

#[test]
fn seeded_scenarios_converge() {
    if let Ok(seed) = std::env::var("PEERCONF_SEED") {
        let seed: u64 = seed.parse().expect("PEERCONF_SEED must be a number");
        let sc = Scenario::from_seed(seed);
        eprintln!("{sc:?}");
        let r = run(&sc).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{r:?}");
        return;
    }
    let cases: u64 = std::env::var("PEERCONF_SIM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let base: u64 = rand::random::<u64>() >> 1;
    eprintln!(
        "simulation: seeds {base}..{} (replay one with PEERCONF_SEED=N)",
        base + cases
    );
    let mut worst = 0;
    let mut dropped = 0;
    for seed in base..base + cases {
        let sc = Scenario::from_seed(seed);
        match run(&sc) {
            Ok(r) => {
                worst = worst.max(r.virtual_ms_to_converge);
                dropped += r.dropped;
            }
            Err(e) => panic!("{e}\nreplay: PEERCONF_SEED={seed} cargo nextest run seeded_scenarios_converge\n{sc:?}"),
        }
    }
    eprintln!("{cases} scenarios converged; slowest {worst} virtual ms after the faults stopped; {dropped} messages dropped in all");
}

#[test]
fn a_scenario_replays_identically() {
    let sc = Scenario::from_seed(42);
    let a = run(&sc).unwrap();
    let b = run(&sc).unwrap();
    assert_eq!(a.messages, b.messages);
    assert_eq!(a.virtual_ms_to_converge, b.virtual_ms_to_converge);
}

/// The driver pushes a local write before its own commit. A crash between the two loses the
/// write at its origin while a peer may hold it: the cluster must still converge, and such a
/// write must come back to its origin (it does only if pushes really leave before the commit).
#[test]
fn writes_lost_at_their_origin_after_their_push_left_converge_and_come_back() {
    let base: u64 = rand::random::<u64>() >> 1;
    eprintln!(
        "seeds {base}..{} (replay one with PEERCONF_SEED=N and commit_crash_pct 50)",
        base + 200
    );
    let (mut lost, mut recovered) = (0, 0);
    for seed in base..base + 200 {
        let mut sc = Scenario::from_seed(seed);
        sc.faults.crashes = true;
        sc.faults.commit_crash_pct = 50;
        let r = run(&sc).unwrap_or_else(|e| panic!("{e}\n{sc:?}"));
        lost += r.lost_before_commit;
        recovered += r.recovered;
    }
    eprintln!("{lost} writes lost at their origin, {recovered} came back from a peer");
    assert!(
        lost > 0,
        "no write was lost before its commit: the fault did not run"
    );
    assert!(
        recovered > 0,
        "no write lost at its origin came back from a peer"
    );
}
