//! Replays every minimized fuzz input kept in `fuzz/regressions/<target>/`.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            eprintln!("replaying {}", p.display());
            f(&data);
            n += 1;
        }
    }
    eprintln!("{target}: {n} regression inputs replayed");
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
