//! Time, injected. The core reads no clock: the driver passes `now` in. Wall time is used only for
//! display metadata (change timestamps), clock-offset estimation and certificate validity;
//! merges never depend on it.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch, as the host believes.
    fn wall_ms(&self) -> i64;
    /// Milliseconds since an arbitrary fixed point; never goes backwards.
    fn mono_ms(&self) -> u64;
}

/// The host's clocks.
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
