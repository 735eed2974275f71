//! Layer: core. The deciding parts of peerconf, free of I/O: no sockets, files, clocks or unseeded
//! randomness here (`tests/it/architecture.rs` greps for them). The core imports only itself and
//! `crdt-schema`; every other layer may import it. Drivers (the node's driver thread, the
//! cluster's replicators, the simulator) feed inputs in and carry effects out.

pub mod clock;
pub mod digest;
pub mod entity;
pub mod health;
pub mod index;
pub mod link;
pub mod members;
pub mod proto;
pub mod repl;
pub mod wire;
