//! Layer: store (imports core only).
//!
//! The write-ahead log that makes a commit durable with one small synchronous write.
//!
//! A durable redb commit writes every page the transaction dirtied plus the header, then fsyncs:
//! about 0.4 ms here, 0.6 ms when two nodes commit at once. A write of one page to a file whose
//! blocks are already allocated, opened with `O_DSYNC`, costs about 0.2 ms and half the kernel
//! CPU. So a batch is made durable by appending its record here, and redb then commits it
//! without fsync (visible at once, durable at the next checkpoint). See [`super`].
//!
//! Layout: a file of [`WAL_BYTES`], zero-filled when created so that no later write changes its
//! metadata. Page 0 is the header: `head magic u32 | epoch u64 | crc32(epoch) u32`, where the
//! epoch is the sequence number the log was last started over at (the checkpoint that covered
//! everything before it). Records start on page boundaries from page 1:
//! `magic u32 | seq u64 | len u32 | crc32(seq, payload) u32 | payload`, padded to a whole page.
//! Sequence numbers grow by one per record and never repeat. After a checkpoint (a durable redb
//! commit that stores the last sequence number it covers) the header gets the new epoch and the
//! log is written again from page 1.
//!
//! Recovery reads from page 1 and keeps records while each is intact and numbered exactly one
//! more than the previous, starting after the checkpoint. A torn record fails its CRC; a record
//! left over from before the last checkpoint has a number at most the checkpoint's. Recovery
//! refuses, rather than start with less than was acknowledged, when:
//! - the header's epoch is past the checkpoint the database recorded (the database went back to
//!   an older commit, behind records the log no longer holds);
//! - the first record is numbered past the one after the checkpoint (the same, seen from a
//!   record);
//! - an intact record numbered past the last replayed one lies after the record that stopped the
//!   replay (a damaged record in the middle, not a torn tail).
//!
//! A log written before the header existed (records from offset 0) is read as such once; the
//! checkpoint that follows recovery starts it over in the current layout.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Size of the log file. A full log is checkpointed before the next append.
pub const WAL_BYTES: u64 = 8 << 20;
/// A record larger than this is not logged: its batch commits to redb durably (a checkpoint).
pub const RECORD_MAX: usize = 1 << 20;
const PAGE: u64 = 4096;
const MAGIC: u32 = 0x5043_574c;
const HEAD_MAGIC: u32 = 0x5043_4844;
const HEADER: usize = 20;

/// Why the log cannot be trusted to recover the store: starting would lose acknowledged writes.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the database's last checkpoint ({store}) is older than the log's start ({epoch}): the database went back to an older commit and the log no longer holds what followed it")]
    StoreBehind { store: u64, epoch: u64 },
    #[error("the log's first record is number {found}, but the database's last checkpoint is {store}: records {} to {} are missing", store + 1, found - 1)]
    Gap { store: u64, found: u64 },
    #[error("record {next} of the log is damaged, but record {later} after it is intact: the log lost records in the middle")]
    Damaged { next: u64, later: u64 },
    #[error("the log is {len} bytes instead of {WAL_BYTES}: it was truncated, and the records it held are gone")]
    Truncated { len: u64 },
    #[error("the log is missing, but the database was written through it (checkpoint {store}): its records are gone")]
    Missing { store: u64 },
}

/// Where the log's bytes go.
enum Device {
    /// A file written with `O_DIRECT|O_DSYNC` (or buffered `O_DSYNC` where O_DIRECT is refused).
    File {
        file: File,
        /// Opened with O_DIRECT (else buffered O_DSYNC).
        direct: bool,
    },
    /// A simulated disk (tests and the simulator): writes are durable when they return.
    #[cfg(any(test, feature = "sim"))]
    Sim(super::simdisk::SimDisk),
}

pub struct Wal {
    dev: Device,
    /// Size of the log.
    bytes: u64,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// Number of the last record appended (or covered by the checkpoint).
    seq: u64,
    /// Set by a failed write: the file's state is unknown, so nothing more is appended.
    broken: Option<String>,
    /// For writes that proceed while the caller works on ([`Wal::submit`]); None where the
    /// kernel refuses io_uring (then every write is synchronous).
    ring: Option<io_uring::IoUring>,
    /// The one write submitted and not yet reaped. Owns the buffer the kernel reads from.
    inflight: Option<Inflight>,
}

struct Inflight {
    raw: Vec<u8>,
    start: usize,
    size: usize,
    offset: u64,
}

impl Drop for Wal {
    fn drop(&mut self) {
        // The kernel may still read the in-flight buffer: wait for it before freeing it.
        let _ = self.finish();
    }
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Bytes a record of `len` payload bytes takes in the log (header, padding to whole pages).
pub fn padded(len: usize) -> u64 {
    ((HEADER + len) as u64).div_ceil(PAGE) * PAGE
}

impl Wal {
    /// Opens (creating and zero-filling if needed) the log, and returns the payloads of the
    /// intact records numbered after `checkpoint`, in order. The caller applies them, records
    /// the last number in a durable commit, then calls [`Wal::reset`].
    pub fn open(path: &Path, checkpoint: u64) -> Result<(Wal, Vec<Vec<u8>>), WalError> {
        // The log is made whole at creation and never shrinks: a shorter one lost records, and a
        // missing one after the database was written through it lost them all.
        match std::fs::metadata(path) {
            Ok(m) if m.len() < WAL_BYTES => return Err(WalError::Truncated { len: m.len() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound && checkpoint > 0 => {
                return Err(WalError::Missing { store: checkpoint })
            }
            _ => {}
        }
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)?;
            let len = f.metadata()?.len();
            if len < WAL_BYTES {
                let zeros = vec![0u8; 1 << 20];
                let mut at = len;
                while at < WAL_BYTES {
                    let n = (WAL_BYTES - at).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                f.sync_all()?;
                if let Some(dir) = path.parent() {
                    File::open(dir)?.sync_all()?;
                }
            }
        }
        // O_DIRECT skips the page cache: less CPU, and about 0.03 ms less per write here. A file
        // system without it (tmpfs) gets buffered O_DSYNC writes.
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DSYNC | libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(libc::O_DSYNC)?, false),
            Err(e) => return Err(e.into()),
        };
        // Read through a second, buffered handle: O_DIRECT reads need aligned buffers.
        let reader = File::open(path)?;
        let (offset, seq, records) = Self::recover(WAL_BYTES, checkpoint, |buf, at| {
            reader.read_exact_at(buf, at)
        })?;
        let wal = Wal {
            dev: Device::File { file, direct },
            bytes: WAL_BYTES,
            path: path.to_path_buf(),
            offset,
            seq,
            broken: None,
            ring: io_uring::IoUring::new(4).ok(),
            inflight: None,
        };
        Ok((wal, records))
    }

    /// The log of a simulated disk, `bytes` long (the simulator uses a small one, so that full
    /// logs and checkpoints happen often).
    #[cfg(any(test, feature = "sim"))]
    pub fn open_sim(
        disk: &super::simdisk::SimDisk,
        bytes: u64,
        checkpoint: u64,
    ) -> Result<(Wal, Vec<Vec<u8>>), WalError> {
        let (offset, seq, records) = Self::recover(bytes, checkpoint, |buf, at| {
            disk.log_read(at, buf);
            Ok(())
        })?;
        let wal = Wal {
            dev: Device::Sim(disk.clone()),
            bytes,
            path: PathBuf::from("simulated.wal"),
            offset,
            seq,
            broken: None,
            ring: None,
            inflight: None,
        };
        Ok((wal, records))
    }

    /// The recovery rule (see the module doc). Returns where the next record goes, the last
    /// number, and the payloads to replay.
    fn recover(
        bytes: u64,
        checkpoint: u64,
        read: impl Fn(&mut [u8], u64) -> io::Result<()>,
    ) -> Result<(u64, u64, Vec<Vec<u8>>), WalError> {
        let mut head = [0u8; 16];
        read(&mut head, 0)?;
        let word = |b: &[u8]| u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        let start = match word(&head) {
            HEAD_MAGIC => {
                let epoch = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
                let sum = word(&head[12..16]);
                if sum == crc(epoch, &[]) && epoch > checkpoint {
                    return Err(WalError::StoreBehind {
                        store: checkpoint,
                        epoch,
                    });
                }
                PAGE
            }
            // A log from before the header: records from offset 0.
            MAGIC => 0,
            _ => PAGE,
        };
        let record_at = |offset: u64| -> io::Result<Option<(u64, Vec<u8>)>> {
            if offset + HEADER as u64 > bytes {
                return Ok(None);
            }
            let mut header = [0u8; HEADER];
            read(&mut header, offset)?;
            let magic = word(&header);
            let n = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
            let sum = word(&header[16..20]);
            if magic != MAGIC || len > RECORD_MAX || offset + padded(len) > bytes {
                return Ok(None);
            }
            let mut payload = vec![0u8; len];
            read(&mut payload, offset + HEADER as u64)?;
            Ok((crc(n, &payload) == sum).then_some((n, payload)))
        };
        let mut records = Vec::new();
        let mut seq = checkpoint;
        let mut offset = start;
        while let Some((n, payload)) = record_at(offset)? {
            if n != seq + 1 {
                if records.is_empty() && n > seq + 1 {
                    return Err(WalError::Gap {
                        store: checkpoint,
                        found: n,
                    });
                }
                break;
            }
            offset += padded(payload.len());
            records.push(payload);
            seq = n;
        }
        // What stopped the replay must be the end: no intact record numbered later may follow.
        let mut at = offset + PAGE;
        while at + HEADER as u64 <= bytes {
            if let Some((n, _)) = record_at(at)? {
                if n > seq + 1 {
                    return Err(WalError::Damaged {
                        next: seq + 1,
                        later: n,
                    });
                }
            }
            at += PAGE;
        }
        Ok((offset.max(PAGE), seq, records))
    }

    /// Number of the last record appended or checkpointed.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether a record of `len` payload bytes can be appended now (else the caller checkpoints).
    pub fn fits(&self, len: usize) -> bool {
        len <= RECORD_MAX && self.offset.max(PAGE) + padded(len) <= self.bytes
    }

    /// Whether a failed write has stopped the log (every later commit is refused).
    pub fn broken(&self) -> bool {
        self.broken.is_some()
    }

    fn refuse_if_broken(&self) -> io::Result<()> {
        match &self.broken {
            Some(e) => Err(io::Error::other(format!(
                "an earlier write to {} failed ({e}); restart the node",
                self.path.display()
            ))),
            None => Ok(()),
        }
    }

    /// Lays out the next record in a page-aligned buffer (as O_DIRECT requires) and reserves its
    /// number and place: (buffer, start of the aligned part, size).
    fn layout(&mut self, payload: &[u8]) -> (Vec<u8>, usize, usize, u64) {
        let n = self.seq + 1;
        let size = padded(payload.len()) as usize;
        let mut raw = vec![0u8; size + PAGE as usize];
        let start = raw.as_ptr().align_offset(PAGE as usize);
        let buf = &mut raw[start..start + size];
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        buf[4..12].copy_from_slice(&n.to_le_bytes());
        buf[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        buf[16..20].copy_from_slice(&crc(n, payload).to_le_bytes());
        buf[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        let offset = self.offset;
        self.offset += size as u64;
        self.seq = n;
        (raw, start, size, offset)
    }

    /// Writes synchronously; O_DSYNC makes the write return once the data is on stable storage.
    fn write_sync(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let written = match &mut self.dev {
            Device::File { file, direct } => {
                let mut written = file.write_all_at(buf, offset);
                if *direct && matches!(&written, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
                    // A file system that accepts O_DIRECT at open but not for this write wrote
                    // nothing: go on with buffered O_DSYNC writes.
                    *file = OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_DSYNC)
                        .open(&self.path)?;
                    *direct = false;
                    written = file.write_all_at(buf, offset);
                }
                written
            }
            #[cfg(any(test, feature = "sim"))]
            Device::Sim(disk) => disk.log_write(offset, buf),
        };
        if let Err(e) = &written {
            self.broken = Some(e.to_string());
        }
        written
    }

    /// Appends one record and returns once it is on stable storage. Precondition: `fits`.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        self.finish()?;
        self.refuse_if_broken()?;
        let (raw, start, size, offset) = self.layout(payload);
        self.write_sync(&raw[start..start + size], offset)
    }

    /// Starts appending one record and returns at once; [`Wal::finish`] waits until it is on
    /// stable storage. Ok(false): no io_uring here, nothing was started (append instead).
    /// Precondition: `fits`.
    pub fn submit(&mut self, payload: &[u8]) -> io::Result<bool> {
        self.finish()?;
        self.refuse_if_broken()?;
        let file = match &self.dev {
            Device::File { file, .. } => file,
            // Simulated writes are synchronous.
            #[cfg(any(test, feature = "sim"))]
            Device::Sim(_) => return Ok(false),
        };
        if self.ring.is_none() {
            return Ok(false);
        }
        let fd = io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(file));
        let (raw, start, size, offset) = self.layout(payload);
        let sqe = io_uring::opcode::Write::new(fd, raw[start..].as_ptr(), size as u32)
            .offset(offset)
            .build();
        let ring = self.ring.as_mut().expect("checked above");
        // SAFETY: the buffer is kept in `inflight` (a Vec's heap memory does not move) and the
        // file stays open until the completion is reaped in `finish` (also on drop).
        let pushed = unsafe { ring.submission().push(&sqe).is_ok() };
        let submitted = pushed && ring.submit().is_ok();
        self.inflight = Some(Inflight {
            raw,
            start,
            size,
            offset,
        });
        if !submitted {
            // Nothing reached the kernel: write it now instead.
            let f = self.inflight.take().expect("just set");
            self.write_sync(&f.raw[f.start..f.start + f.size], f.offset)?;
        }
        Ok(true)
    }

    /// Waits for the submitted record, if any, to be on stable storage.
    pub fn finish(&mut self) -> io::Result<()> {
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let ring = self.ring.as_mut().expect("a write in flight has a ring");
        let result = loop {
            if let Some(cqe) = ring.completion().next() {
                break cqe.result();
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The kernel may still hold the buffer: keep it (leak) rather than free it.
                    std::mem::forget(f);
                    self.broken = Some(e.to_string());
                    return Err(e);
                }
            }
        };
        let buf = &f.raw[f.start..f.start + f.size];
        if result == f.size as i32 {
            return Ok(());
        }
        // A short or refused write: do it again synchronously (which also falls back from
        // O_DIRECT where the file system refuses it).
        if result < 0 && -result != libc::EINVAL {
            let e = io::Error::from_raw_os_error(-result);
            self.broken = Some(e.to_string());
            return Err(e);
        }
        self.write_sync(buf, f.offset)
    }

    /// Called after a durable redb commit that stored [`Wal::seq`]: every record is now covered,
    /// so the header takes the new epoch and the log is written again from page 1. A failed
    /// header write is harmless (the old epoch is at most the checkpoint) but stops the log, as
    /// any failed write does.
    pub fn reset(&mut self) {
        debug_assert!(self.inflight.is_none(), "reset with a write in flight");
        let epoch = self.seq;
        let mut raw = vec![0u8; 2 * PAGE as usize];
        let start = raw.as_ptr().align_offset(PAGE as usize);
        let page = &mut raw[start..start + PAGE as usize];
        page[0..4].copy_from_slice(&HEAD_MAGIC.to_le_bytes());
        page[4..12].copy_from_slice(&epoch.to_le_bytes());
        page[12..16].copy_from_slice(&crc(epoch, &[]).to_le_bytes());
        let written = self.write_sync(&raw[start..start + PAGE as usize], 0);
        if let Err(e) = written {
            tracing::warn!(error = %e, "the log's header could not be written");
        }
        self.offset = PAGE;
    }

    /// Overwrites the whole log with zeros, then starts it over ([`Wal::reset`]): after a
    /// checkpoint, so that no record written before (which may hold a value that must be
    /// forgotten) survives in the file. Used once, when an old store is migrated.
    pub fn scrub(&mut self) -> io::Result<()> {
        self.finish()?;
        const CHUNK: usize = 1 << 20;
        // Aligned, as the log's direct writes need.
        let raw = vec![0u8; CHUNK + PAGE as usize];
        let start = raw.as_ptr().align_offset(PAGE as usize);
        let mut offset = PAGE;
        while offset < self.bytes {
            let n = ((self.bytes - offset) as usize).min(CHUNK);
            self.write_sync(&raw[start..start + n], offset)?;
            offset += n as u64;
        }
        self.reset();
        Ok(())
    }

    /// Whether records are waiting for a checkpoint.
    pub fn pending(&self) -> bool {
        self.offset > PAGE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_after_the_checkpoint_come_back_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, recs) = Wal::open(&path, 0).expect("open");
        assert!(recs.is_empty());
        for i in 0..5u8 {
            w.append(&vec![i; 100 + i as usize * 5000]).expect("append");
        }
        drop(w);
        let (w, recs) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(recs.len(), 5);
        assert_eq!(recs[3], vec![3u8; 15100]);
        assert_eq!(w.seq(), 5);
        // Records up to the checkpoint are not returned.
        let (_, recs) = Wal::open(&path, 5).expect("reopen");
        assert_eq!(
            recs.len(),
            0,
            "record 1 is not numbered 6: nothing follows checkpoint 5"
        );
    }

    fn flip_byte_of_record(path: &Path, record: u64) {
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(&[9], record * PAGE + HEADER as u64)
            .expect("write");
    }

    /// The last record torn (a crash mid-write): it is dropped, the others replay.
    #[test]
    fn a_torn_last_record_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        for i in 0..3u8 {
            w.append(&[i; 10]).expect("append");
        }
        drop(w);
        flip_byte_of_record(&path, 3);
        let (w, recs) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(recs, vec![vec![0u8; 10], vec![1u8; 10]]);
        assert_eq!(w.seq(), 2);
    }

    /// A damaged record with intact ones after it is not a torn tail: records the node
    /// acknowledged would be dropped silently, so the log refuses.
    #[test]
    fn a_damaged_record_before_intact_ones_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        for i in 0..3u8 {
            w.append(&[i; 10]).expect("append");
        }
        drop(w);
        flip_byte_of_record(&path, 2);
        match Wal::open(&path, 0) {
            Err(WalError::Damaged { next: 2, later: 3 }) => {}
            other => panic!("a damaged middle record was not refused: {:?}", other.err()),
        }
    }

    /// The database went back to an older commit (its checkpoint is behind the log's start):
    /// the records between are gone, so the log refuses.
    #[test]
    fn a_database_behind_the_log_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        for i in 0..4u8 {
            w.append(&[i; 10]).expect("append");
        }
        w.reset();
        drop(w);
        match Wal::open(&path, 2) {
            Err(WalError::StoreBehind { store: 2, epoch: 4 }) => {}
            other => panic!("{:?}", other.err()),
        }
        // A record past the next expected one at the start: a gap, refused too.
        let (mut w, _) = Wal::open(&path, 4).expect("open at the epoch");
        w.append(&[5; 10]).expect("append");
        drop(w);
        // Forge the header back to epoch 0 so only the record tells.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(&[0u8; 16], 0).expect("write");
        match Wal::open(&path, 1) {
            Err(WalError::Gap { store: 1, found: 5 }) => {}
            other => panic!("{:?}", other.err()),
        }
    }

    /// A log cut short, or deleted after the database was written through it, lost records:
    /// refused, never recreated empty.
    #[test]
    fn a_truncated_or_missing_log_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        w.append(&[1; 10]).expect("append");
        drop(w);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(PAGE * 3).expect("truncate");
        assert!(matches!(
            Wal::open(&path, 0),
            Err(WalError::Truncated { len }) if len == PAGE * 3
        ));
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(
            Wal::open(&path, 7),
            Err(WalError::Missing { store: 7 })
        ));
        assert!(Wal::open(&path, 0).is_ok(), "a new store makes its log");
    }

    /// A log written before the header existed (records from offset 0) is read once.
    #[test]
    fn a_log_without_a_header_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (w, _) = Wal::open(&path, 0).expect("create");
        drop(w);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        for (i, seq) in [1u64, 2].iter().enumerate() {
            let payload = [*seq as u8; 10];
            let mut rec = vec![0u8; PAGE as usize];
            rec[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            rec[4..12].copy_from_slice(&seq.to_le_bytes());
            rec[12..16].copy_from_slice(&10u32.to_le_bytes());
            rec[16..20].copy_from_slice(&crc(*seq, &payload).to_le_bytes());
            rec[HEADER..HEADER + 10].copy_from_slice(&payload);
            f.write_all_at(&rec, i as u64 * PAGE).expect("write");
        }
        let (w, recs) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(recs, vec![vec![1u8; 10], vec![2u8; 10]]);
        assert_eq!(w.seq(), 2);
    }

    #[test]
    fn after_a_reset_stale_records_are_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        for i in 0..4u8 {
            w.append(&[i; 10]).expect("append");
        }
        // Checkpoint at 4, then one more record: it overwrites record 1 only.
        w.reset();
        w.append(&[7; 10]).expect("append");
        drop(w);
        let (w, recs) = Wal::open(&path, 4).expect("reopen");
        assert_eq!(recs, vec![vec![7u8; 10]]);
        assert_eq!(w.seq(), 5);
    }

    #[test]
    fn a_full_log_refuses_a_record_that_does_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut w, _) = Wal::open(&dir.path().join("wal"), 0).expect("open");
        assert!(!w.fits(RECORD_MAX + 1));
        let big = vec![1u8; RECORD_MAX - HEADER];
        while w.fits(big.len()) {
            w.append(&big).expect("append");
        }
        assert!(w.offset + padded(big.len()) > WAL_BYTES);
        w.reset();
        assert!(w.fits(big.len()));
    }

    #[test]
    fn records_started_ahead_come_back_in_order_with_appended_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        let ahead = w.submit(&[1; 10]).expect("submit");
        // An append waits for the record in flight, then follows it.
        w.append(&[2; 5000]).expect("append");
        if ahead {
            assert!(w.submit(&[3; 10]).expect("submit"));
            w.finish().expect("finish");
        } else {
            // No io_uring on this kernel: submit started nothing.
            w.append(&[1; 10]).expect("append");
            w.append(&[3; 10]).expect("append");
        }
        drop(w);
        let (w, recs) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[1], vec![2u8; 5000]);
        if ahead {
            assert_eq!(recs[0], vec![1u8; 10]);
            assert_eq!(recs[2], vec![3u8; 10]);
        }
        assert_eq!(w.seq(), 3);
    }

    /// Where the kernel refuses io_uring, nothing is started ahead and appends are synchronous.
    #[test]
    fn without_io_uring_records_are_appended_synchronously() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path, 0).expect("open");
        w.ring = None;
        assert!(
            !w.submit(&[1; 10]).expect("submit"),
            "nothing can start ahead"
        );
        assert_eq!(w.seq(), 0, "a submit that started nothing reserves nothing");
        w.append(&[1; 10]).expect("append");
        w.finish().expect("nothing in flight");
        drop(w);
        let (_, recs) = Wal::open(&path, 0).expect("reopen");
        assert_eq!(recs, vec![vec![1u8; 10]]);
    }
}
