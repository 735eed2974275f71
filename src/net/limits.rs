//! Layer: net (imports core only).
//!
//! The process's limit on open files (`RLIMIT_NOFILE`): raised to the hard limit when the IPC
//! port opens, and read to size the port's connection caps, so that connections from clients
//! without a certificate can never take the descriptors members and the admin API need.

/// The soft and hard limits on open files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Why the limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("cannot read the open-file limit (getrlimit RLIMIT_NOFILE): {0}")]
    Get(#[source] std::io::Error),
    #[error(
        "cannot raise the open-file limit from {from} to {to} (setrlimit RLIMIT_NOFILE): {source}"
    )]
    Set {
        from: u64,
        to: u64,
        #[source]
        source: std::io::Error,
    },
}

/// A target for an unlimited hard limit: Linux refuses a soft limit above `fs.nr_open`, whose
/// default is this.
const UNLIMITED_TARGET: u64 = 1 << 20;

/// `rlim_t` is u64 on 64-bit Linux but narrower on some targets: the conversions are spelled out.
#[allow(clippy::useless_conversion)]
fn to_u64(v: libc::rlim_t) -> u64 {
    u64::from(v)
}

/// Both values converted come from an rlimit (or are 2^20), so they fit one.
#[allow(clippy::useless_conversion, clippy::unnecessary_fallible_conversions)]
fn to_rlim(v: u64) -> libc::rlim_t {
    libc::rlim_t::try_from(v).unwrap_or(libc::RLIM_INFINITY)
}

/// The current limits.
pub fn nofile() -> Result<FileLimit, LimitError> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(LimitError::Get(std::io::Error::last_os_error()));
    }
    Ok(FileLimit {
        soft: to_u64(r.rlim_cur),
        hard: to_u64(r.rlim_max),
    })
}

/// Raises the soft limit to the hard one (an unlimited hard limit: to 2^20) and returns the
/// limits in force afterwards. Idempotent.
pub fn raise_nofile() -> Result<FileLimit, LimitError> {
    let now = nofile()?;
    let target = if now.hard == to_u64(libc::RLIM_INFINITY) {
        UNLIMITED_TARGET.max(now.soft)
    } else {
        now.hard
    };
    if now.soft >= target {
        return Ok(now);
    }
    let r = libc::rlimit {
        rlim_cur: to_rlim(target),
        rlim_max: to_rlim(now.hard),
    };
    // SAFETY: `r` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(LimitError::Set {
            from: now.soft,
            to: target,
            source: std::io::Error::last_os_error(),
        });
    }
    nofile()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_leaves_the_soft_limit_at_the_hard_one() {
        let before = nofile().expect("getrlimit");
        let after = raise_nofile().expect("setrlimit");
        assert_eq!(after.hard, before.hard);
        assert!(after.soft >= before.soft, "{before:?} -> {after:?}");
        if before.hard != to_u64(libc::RLIM_INFINITY) {
            assert_eq!(after.soft, after.hard);
        }
        assert_eq!(raise_nofile().expect("again"), after, "not idempotent");
    }
}
