//! Layer: node (imports core, store, net).
//!
//! The host's clocks, behind the core's [`Clock`] trait.

use crate::core::clock::Clock;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    pub fn shared() -> Arc<dyn Clock> {
        Arc::new(SystemClock {
            start: Instant::now(),
        })
    }
}

impl Clock for SystemClock {
    fn wall_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
    fn mono_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}
