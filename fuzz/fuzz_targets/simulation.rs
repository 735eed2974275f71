#![no_main]
//! A simulated cluster under loss, duplication, reordering, partitions and crashes, scenario
//! chosen by the fuzzer: every node converges and keeps every acknowledged write.
libfuzzer_sys::fuzz_target!(|data: &[u8]| peerconf::sim::fuzzing::simulation(data));
