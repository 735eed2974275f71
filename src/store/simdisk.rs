//! Layer: store (imports core only). Compiled for tests and the `sim` feature only.
//!
//! A disk in memory that forgets like a real one: the database image as of its last `sync_data`
//! is what survives a crash, and the write-ahead log's writes (synchronous, as `O_DSYNC` makes
//! them) survive as soon as they return. The simulator and the store's crash tests open a real
//! [`super::Store`] on it, crash it, and reopen it, so they exercise the log's real recovery rule.
//!
//! It can also fail: while `fail` is set, every log write and every database sync returns an
//! error, as a full or broken disk does.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// The database file as written (page cache included).
    current: Vec<u8>,
    /// The database file as of its last sync: what a crash leaves.
    durable: Vec<u8>,
    /// The write-ahead log: every write is synchronous.
    log: Vec<u8>,
    /// Writes and syncs fail (a broken or full disk).
    fail: bool,
    /// Crashed: nothing more becomes durable (database syncs and log writes are lost) until it
    /// is restored.
    frozen: bool,
    syncs: u64,
}

/// One node's disk. Cheap to share; a store opened on it holds a clone.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    /// The at-rest key file: replaced atomically and durably (write, fsync, rename), so every
    /// write survives as soon as it returns.
    keys: Arc<Mutex<Option<Vec<u8>>>>,
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("SimDisk")
            .field("db_bytes", &s.current.len())
            .field("log_bytes", &s.log.len())
            .finish()
    }
}

fn failed() -> io::Error {
    io::Error::other("simulated disk failure")
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// While set, log writes and database syncs fail.
    pub fn set_failing(&self, fail: bool) {
        self.lock().fail = fail;
    }

    /// The power goes: from now on nothing becomes durable. Call before dropping the store that
    /// uses it, then [`SimDisk::restore`] before opening it again.
    pub fn freeze(&self) {
        self.lock().frozen = true;
    }

    /// After a crash: the database is what its last sync left; the log what was written.
    pub fn restore(&self) {
        let mut s = self.lock();
        s.current = s.durable.clone();
        s.frozen = false;
        s.fail = false;
    }

    /// Database syncs so far (durable redb commits).
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The key file's contents, shared with the store opened on this disk.
    pub(crate) fn keys(&self) -> Arc<Mutex<Option<Vec<u8>>>> {
        self.keys.clone()
    }

    pub(crate) fn backend(&self) -> Backend {
        Backend(self.clone())
    }

    pub(crate) fn log_write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.lock();
        if s.fail {
            return Err(failed());
        }
        if s.frozen {
            return Ok(());
        }
        let end = offset as usize + data.len();
        if s.log.len() < end {
            s.log.resize(end, 0);
        }
        s.log[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    pub(crate) fn log_read(&self, offset: u64, out: &mut [u8]) {
        let s = self.lock();
        let start = (offset as usize).min(s.log.len());
        let end = (offset as usize + out.len()).min(s.log.len());
        out.fill(0);
        out[..end - start].copy_from_slice(&s.log[start..end]);
    }
}

/// The redb backend of a [`SimDisk`].
#[derive(Debug)]
pub struct Backend(SimDisk);

impl redb::StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.lock().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.0.lock();
        let src = s
            .current
            .get(offset as usize..offset as usize + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.lock().current.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        if s.fail {
            return Err(failed());
        }
        if !s.frozen {
            s.durable = s.current.clone();
            s.syncs += 1;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.0.lock();
        let end = offset as usize + data.len();
        if s.current.len() < end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "write past the end",
            ));
        }
        s.current[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}
