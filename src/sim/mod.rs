//! Layer: sim (feature `sim`, for tests and fuzzing; imports core, store, net, node, cluster;
//! nothing imports it).
//!
//! - `simulator`: a deterministic cluster of the production driver, store and peer links over a
//!   simulated network and disk.
//! - `fuzzing`: the logic of the fuzz targets, here so `cargo test` replays their regressions.

pub mod fuzzing;
pub mod simulator;

pub use simulator::{run, run_with, Faults, Report, Scenario, Seeded, SimError};
