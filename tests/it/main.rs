//! One integration-test binary: in-process node tests, real-process tests of the daemon and CLI,
//! and the checks that hold the architecture's lines.

mod support;

mod architecture;
mod auth;
mod cluster;
mod console;
mod embedded;
mod fuzz_regressions;
mod health;
mod https;
mod ipc_abuse;
mod process;
mod secrets;
mod security;
mod simulation;
mod storage;
mod watch;
