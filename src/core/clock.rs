//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! Time, injected. The core reads no clock: the driver passes `now` in. Wall time is used only for
//! display metadata (change timestamps), clock-offset estimation and certificate validity;
//! merges never depend on it.

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch, as the host believes.
    fn wall_ms(&self) -> i64;
    /// Milliseconds since an arbitrary fixed point; never goes backwards.
    fn mono_ms(&self) -> u64;
}
