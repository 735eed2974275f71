//! The deterministic cluster simulator: many seeded scenarios of loss, duplication, reordering,
//! delay, partitions and crashes. Every node must end with identical documents and entities, no
//! acknowledged write may be lost, and sync must never stall.
//!
//! `seeded_scenarios_converge` runs the known seeds of [`KNOWN`] first (regressions and hard
//! cases), then a random batch. `PEERCONF_SEED=N` replays one scenario; `PEERCONF_SIM_CASES=N`
//! sets the size of the random batch (default 1000).

use peerconf::sim::{run, Report, Scenario, SimError};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A seed kept for what it exercises. `draws` checks that the seed still draws the scenario it
/// was picked for and `exercised` that the run really met its faults: a change to the simulator
/// can turn a known seed into an easy one, and then it must be replaced, not kept silently.
struct Known {
    seed: u64,
    why: &'static str,
    draws: fn(&Scenario) -> bool,
    exercised: fn(&Report) -> bool,
}

const KNOWN: &[Known] = &[
    Known {
        seed: 5399606881237833068,
        why: "regression: two pushes of one new document in one request stored only the first",
        draws: |s| s.nodes == 2 && s.writes >= 2,
        exercised: |r| r.acknowledged >= 2,
    },
    Known {
        seed: 109,
        why: "4 nodes, partitions, crashes with 19% commit crashes; lost writes come back",
        draws: |s| {
            s.nodes == 4 && s.faults.partitions && s.faults.crashes && s.faults.commit_crash_pct > 0
        },
        exercised: |r| r.lost_before_commit > 0 && r.recovered > 0,
    },
    Known {
        seed: 109,
        why: "4 nodes, partitions, crashes with 16% commit crashes; a lost write stays lost",
        draws: |s| {
            s.nodes == 4 && s.faults.partitions && s.faults.crashes && s.faults.commit_crash_pct > 0
        },
        exercised: |r| r.lost_before_commit > r.recovered,
    },
    Known {
        seed: 69,
        why: "3 nodes, crashes with 17% commit crashes, 12% loss",
        draws: |s| s.nodes == 3 && s.faults.crashes && s.faults.commit_crash_pct > 0,
        exercised: |r| r.lost_before_commit > 0 && r.recovered > 0,
    },
    Known {
        seed: 375,
        why: "3 nodes, 20% commit crashes, five crashes",
        draws: |s| s.nodes == 3 && s.faults.crashes && s.faults.commit_crash_pct > 0,
        exercised: |r| r.crashes >= 3 && r.lost_before_commit > 0,
    },
    Known {
        seed: 90,
        why: "4 nodes, partitions, 30 writes: the most messages of the first hundred seeds",
        draws: |s| s.nodes == 4 && s.faults.partitions && s.writes == 30,
        exercised: |r| r.acknowledged > 0 && r.failures > 0,
    },
    Known {
        seed: 117,
        why: "4 nodes, partitions, 28% loss",
        draws: |s| s.nodes == 4 && s.faults.partitions && s.faults.drop_pct >= 20,
        exercised: |r| r.dropped > 0,
    },
    Known {
        seed: 5,
        why: "2 nodes, partitions, 22% loss",
        draws: |s| s.nodes == 2 && s.faults.partitions && s.faults.drop_pct >= 20,
        exercised: |r| r.dropped > 0,
    },
];

const REPLAY: &str = "cargo nextest run --no-capture -E 'test(seeded_scenarios_converge)'";

/// Runs one seed's scenario; a panic in the simulator is a failure too.
fn run_seed(seed: u64) -> (Scenario, Result<Report, String>) {
    let sc = Scenario::from_seed(seed);
    let r = catch_unwind(AssertUnwindSafe(|| run(&sc)))
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("seed {seed}: the simulator panicked: {msg}")
        })
        .and_then(|r| r.map_err(|e: SimError| e.to_string()));
    (sc, r)
}

/// A failure's report: the error, the seed's replay command and the scenario. Printed at once
/// (so a later hang cannot hide it) and kept for the final panic.
fn failed(failures: &mut Vec<String>, seed: u64, what: &str, sc: &Scenario) {
    let f = format!("FAILED {what}\n  replay: PEERCONF_SEED={seed} {REPLAY}\n  {sc:?}");
    eprintln!("{f}");
    failures.push(f);
}

#[test]
fn seeded_scenarios_converge() {
    if let Ok(seed) = std::env::var("PEERCONF_SEED") {
        let seed: u64 = seed.parse().expect("PEERCONF_SEED must be a number");
        let (sc, r) = run_seed(seed);
        eprintln!("{sc:?}");
        match r {
            Ok(r) => eprintln!("{r:?}"),
            Err(e) => panic!("{e}\n{sc:?}"),
        }
        return;
    }
    let t0 = std::time::Instant::now();
    let mut failures = Vec::new();

    for k in KNOWN {
        let (sc, r) = run_seed(k.seed);
        match r {
            Err(e) => failed(
                &mut failures,
                k.seed,
                &format!("known seed ({}): {e}", k.why),
                &sc,
            ),
            Ok(_) if !(k.draws)(&sc) => failed(
                &mut failures,
                k.seed,
                &format!(
                    "known seed {} no longer draws the scenario it was kept for ({}): pick another",
                    k.seed, k.why
                ),
                &sc,
            ),
            Ok(r) if !(k.exercised)(&r) => failed(
                &mut failures,
                k.seed,
                &format!(
                    "known seed {} no longer exercises what it was kept for ({}): {r:?}; pick another",
                    k.seed, k.why
                ),
                &sc,
            ),
            Ok(r) => eprintln!("known seed {} ({}): ok, {r:?}", k.seed, k.why),
        }
    }

    let cases: u64 = match std::env::var("PEERCONF_SIM_CASES") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("PEERCONF_SIM_CASES={s:?} is not a number")),
        Err(_) => 1000,
    };
    let base: u64 = rand::random::<u64>() >> 1;
    eprintln!(
        "simulation: random batch of {cases} seeds {base}..{} (replay one with PEERCONF_SEED=N {REPLAY})",
        base + cases
    );
    let (mut worst, mut dropped, mut crashes, mut lost) = (0, 0, 0, 0);
    for seed in base..base + cases {
        let (sc, r) = run_seed(seed);
        match r {
            Ok(r) => {
                worst = worst.max(r.virtual_ms_to_converge);
                dropped += r.dropped;
                crashes += r.crashes;
                lost += r.lost_before_commit;
            }
            Err(e) => failed(&mut failures, seed, &e, &sc),
        }
    }
    eprintln!(
        "{} known and {cases} random scenarios run in {:?}; slowest convergence {worst} virtual ms after the faults stopped; {dropped} messages dropped, {crashes} crashes, {lost} writes lost at their origin before their commit, in all",
        KNOWN.len(),
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} scenarios failed (random batch base seed {base}):\n{}",
        failures.len(),
        failures.join("\n")
    );
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
