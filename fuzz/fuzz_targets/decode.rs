#![no_main]
//! Arbitrary bytes into every decoder a client or peer can reach: no panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| peerconf::sim::fuzzing::decode(data));
