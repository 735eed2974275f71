#![no_main]
//! Random edits on several replicas, merged in random orders: all end equal.
libfuzzer_sys::fuzz_target!(|data: &[u8]| peerconf::sim::fuzzing::merge_convergence(data));
