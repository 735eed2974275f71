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
