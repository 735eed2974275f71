//! The deciding parts of peerconf, free of I/O: no sockets, files, clocks or unseeded randomness
//! here (a test greps for them). The driver feeds inputs in and carries effects out.

pub mod clock;
pub mod digest;
pub mod entity;
pub mod health;
pub mod members;
pub mod proto;
pub mod repl;
pub mod wire;
