//! Layer: node (imports core, store, net).
//!
//! The disk under the data directory: how much is free, and a reserve file that keeps room for
//! recovery. When the disk fills, the reserve is deleted at once, so the store can be reopened
//! and its log replayed and reads keep working; writes are refused until the operator frees
//! space, then the reserve is made again and writes resume.

use std::io;
use std::path::{Path, PathBuf};

pub const RESERVE_FILE: &str = "reserve";
/// Room kept for recovery on a full disk: reopening the store, replaying a full log (8 MiB of
/// records) and its checkpoint.
pub const RESERVE_BYTES: u64 = 16 << 20;
/// Writes are refused when less than this is free with the reserve in place: one batch, a
/// checkpoint and redb's growth fit in it.
pub const FREE_MIN_BYTES: u64 = 8 << 20;
/// Writes resume once this much is free beyond what the reserve takes back: a margin, so a disk
/// hovering at the limit does not flap.
pub const RESUME_FREE_BYTES: u64 = 16 << 20;

/// Whether the node's disk takes writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    Ok,
    /// Writes are refused until space is freed; reads work.
    Full,
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

pub fn reserve_path(dir: &Path) -> PathBuf {
    dir.join(RESERVE_FILE)
}

/// Makes the reserve file if it is missing (blocks allocated, not sparse). Err when there is
/// no room for it.
pub fn make_reserve(dir: &Path) -> io::Result<()> {
    let path = reserve_path(dir);
    if path.metadata().is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return Ok(());
    }
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    // SAFETY: a valid open file descriptor.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, RESERVE_BYTES as libc::off_t) };
    if r != 0 {
        drop(f);
        let _ = std::fs::remove_file(&path);
        return Err(io::Error::from_raw_os_error(r));
    }
    f.sync_all()
}

/// Deletes the reserve file, giving its room to the store. Whether there was one.
pub fn release_reserve(dir: &Path) -> bool {
    std::fs::remove_file(reserve_path(dir)).is_ok()
}
