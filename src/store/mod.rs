//! Layer: store (imports core only).
//!
//! Durable storage in redb: saved documents, their incremental changes, the materialized index
//! that answers reads and listings without loading documents, and node-local data.
//!
//! Invariants:
//! - A document's bytes are `DOCS[id]` followed by `CHUNKS[(id, 0..n)]`, concatenated; together
//!   they load as one Automerge document. `INDEX[id].chunks == n`.
//! - `INDEX[id]` always describes the document as committed in the same transaction.
//! - Nothing in `LOCAL` is ever sent to a peer.
//! - Every commit is durable before it returns: its record is in the write-ahead log
//!   ([`crate::wal`]) and redb has committed it without fsync, or (a checkpoint) redb has
//!   committed it with fsync together with every earlier non-durable commit.
//! - `META[WAL_SEQ]` is the number of the last log record a durable redb commit covers. Opening
//!   the store replays the records after it, then checkpoints.
//! - A log record holds what one transaction stored, logically: the Automerge bytes each document
//!   gained, and node-local rows. Replay merges the bytes and derives index rows again; merging is
//!   idempotent, so replaying records redb already has changes nothing.

use automerge::AutoCommit;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use secrets::{KeyFile, Keyring};
use wal::Wal;

pub mod feed;
pub mod metrics;
pub mod secrets;
#[cfg(any(test, feature = "sim"))]
pub mod simdisk;
pub mod wal;

use metrics::StoreMetrics;

/// Space used by one table ([`Store::space`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableSpace {
    pub name: &'static str,
    /// Bytes of keys and values.
    pub stored: u64,
    /// Bytes of branch keys and other metadata.
    pub metadata: u64,
    /// Bytes lost to fragmentation.
    pub fragmented: u64,
    /// Leaf and branch pages.
    pub pages: u64,
}

/// Space used by the database ([`Store::space`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Space {
    pub tables: Vec<TableSpace>,
    /// Bytes of every page allocated (tables, redb's own trees, freed pages not yet reused).
    pub allocated: u64,
    pub page_size: u64,
}

const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("docs");
/// The change feed (`feed.rs`): sequence number -> change event.
const FEED: TableDefinition<u64, &[u8]> = TableDefinition::new("feed");
const CHUNKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("chunks");
const INDEX: TableDefinition<&str, &[u8]> = TableDefinition::new("index");
const LOCAL: TableDefinition<&str, &[u8]> = TableDefinition::new("local");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Secret values, sealed ([`secrets`]): `"<document ID>\n<reference>"` -> sealed value.
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
const WAL_SEQ: &str = "wal_seq";
/// `META[FORMAT]`: the layout of what is stored. 3: documents hold secret references, the
/// values are sealed in `SECRETS`, index rows list the references. Absent: an older store,
/// migrated at open ([`migrate`]).
const FORMAT: &str = "format";
const FORMAT_NOW: u64 = 3;

/// One entry of a log record. Records are logical: what a document gained, as Automerge bytes
/// (changes or a whole save), and node-local rows. Replaying merges the bytes into the stored
/// document and derives its index row again; a merge is idempotent, so replaying what redb
/// already holds changes nothing.
#[derive(Serialize, Deserialize)]
pub enum LogOp {
    Changes(String, Vec<u8>),
    Local(String, Vec<u8>),
    /// A secret value offered with a document's changes (document, field, value sealed under
    /// the at-rest key): replay keeps it if the document shows its reference.
    Secret(String, String, Vec<u8>),
}

/// A batch's record, started ahead of the batch ([`Store::prelog`]).
pub enum Prelogged {
    /// Being written; the commit waits for it.
    Submitted,
    /// The log is full: the commit is a checkpoint.
    Full,
    /// The write failed: the commit fails.
    Failed(String),
}

/// Incremental chunks kept per document before it is compacted into one full save: bounds the
/// work of a load and the space of a long history.
pub const CHUNKS_MAX: u32 = 32;
/// redb page cache: the store must not grow with the entity count (100k entities in < 250 MB).
const CACHE_BYTES: usize = 32 * 1024 * 1024;

pub use crate::core::index::IndexEntry;

/// A storage failure. The operation that hit it changed nothing that was acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {0} is already in use by another running peerconf node")]
    InUse(String),
    #[error("storage: {0}")]
    Redb(String),
    /// Writing the write-ahead log failed; its commit did not happen.
    #[error("write-ahead log: {0}")]
    Log(String),
    /// A test made the commit fail.
    #[error("injected commit failure")]
    Injected,
    /// The commit's log record is durable but redb's commit after it failed: the batch is not
    /// visible now and comes back when the store is next opened (the log is replayed).
    #[error("storage: the commit is in the write-ahead log but redb failed after it ({0}); it takes effect when the node restarts")]
    Unsettled(Box<StoreError>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The disk holding the data directory is full: the operation changed nothing (or, for a
    /// commit, see [`StoreError::Unsettled`]).
    #[error("the disk holding the data directory is full ({0})")]
    DiskFull(String),
    /// An I/O error in the database: redb refuses everything until the store is reopened.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// An index row fails its checksum (damaged on disk, or written before rows carried one):
    /// it is rebuilt from its document, never served.
    #[error("the index row of {0} is damaged")]
    BadRow(String),
    /// The log and the database disagree in a way that would lose acknowledged writes if the
    /// node started: it does not start (the node is rebuilt from its peers by `peerconf repair`).
    #[error("the store is damaged: {0}")]
    Damaged(String),
    /// The at-rest key ring cannot be read or written.
    #[error("at-rest keys: {0}")]
    Keys(#[from] secrets::KeyringError),
}

impl From<wal::WalError> for StoreError {
    fn from(e: wal::WalError) -> Self {
        match e {
            wal::WalError::Io(io) => io.into(),
            other => StoreError::Damaged(other.to_string()),
        }
    }
}

impl StoreError {
    /// Whether the database must be reopened before it serves again (redb refuses every
    /// operation after an I/O error).
    pub fn breaks_the_store(&self) -> bool {
        matches!(self, StoreError::DiskFull(_) | StoreError::Io(_))
    }

    /// Whether the disk is full: said so, or behind an unsettled commit.
    pub fn disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull(_) => true,
            StoreError::Unsettled(inner) => inner.disk_full(),
            _ => false,
        }
    }
}

/// A redb storage failure, classified by its I/O error's kind (never by its text).
fn from_storage(s: &redb::StorageError) -> StoreError {
    match s {
        redb::StorageError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::DiskFull(e.to_string())
        }
        redb::StorageError::Io(e) => StoreError::Io(e.to_string()),
        redb::StorageError::PreviousIo => StoreError::Io(s.to_string()),
        redb::StorageError::Corrupted(m) => {
            StoreError::Damaged(format!("the database is corrupted: {m}"))
        }
        other => StoreError::Redb(other.to_string()),
    }
}

impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        from_storage(&e)
    }
}

impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        match e {
            redb::CommitError::Storage(s) => from_storage(&s),
            other => StoreError::Redb(other.to_string()),
        }
    }
}

impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        match e {
            redb::TransactionError::Storage(s) => from_storage(&s),
            other => StoreError::Redb(other.to_string()),
        }
    }
}

impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        match e {
            redb::TableError::Storage(s) => from_storage(&s),
            other => StoreError::Redb(other.to_string()),
        }
    }
}

impl From<redb::SetDurabilityError> for StoreError {
    fn from(e: redb::SetDurabilityError) -> Self {
        StoreError::Redb(e.to_string())
    }
}

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::Storage(s) => from_storage(&s),
            other => StoreError::Redb(other.to_string()),
        }
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull {
            StoreError::DiskFull(e.to_string())
        } else {
            StoreError::Log(e.to_string())
        }
    }
}

/// An index row as stored: the encoded entry, then the CRC-32 of those bytes, so a damaged row
/// is told from a good one (and rebuilt from its document) instead of being served.
fn encode_entry(e: &IndexEntry) -> Vec<u8> {
    let mut b = crate::core::wire::encode(e);
    let sum = crc32fast::hash(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

fn decode_entry(id: &str, b: &[u8]) -> Result<IndexEntry, StoreError> {
    let bad = || StoreError::BadRow(id.to_string());
    let split = b.len().checked_sub(4).ok_or_else(bad)?;
    let (body, sum) = b.split_at(split);
    if crc32fast::hash(body).to_le_bytes() != sum {
        return Err(bad());
    }
    crate::core::wire::decode(body).map_err(|_| bad())
}

pub struct Store {
    /// Behind a lock so that [`Store::reopen`] can replace it after an I/O error.
    db: std::sync::RwLock<Database>,
    /// Where the database lives; None on a simulated disk (never reopened).
    path: Option<PathBuf>,
    /// An I/O error left redb refusing everything: reopen before the next use.
    broken: Arc<std::sync::atomic::AtomicBool>,
    wal: Arc<Mutex<Wal>>,
    metrics: Arc<StoreMetrics>,
    /// Set by [`Store::crash`]: dropped as a crash leaves it, without a checkpoint.
    crashed: std::sync::atomic::AtomicBool,
    /// The at-rest keys that seal secret values.
    keys: Arc<Mutex<Keyring>>,
    /// A secret value was dropped since the last key rotation: rotating makes it unreadable.
    forgot: Arc<std::sync::atomic::AtomicBool>,
    /// Tests: every commit fails while set.
    #[cfg(test)]
    fail_commits: std::sync::atomic::AtomicBool,
}

/// A store whose database is open and whose log is not replayed yet ([`Store::opening`]).
pub struct Opening {
    db: Database,
    path: Option<PathBuf>,
    keys: KeyFile,
    #[allow(clippy::type_complexity)]
    open_wal: Box<dyn FnOnce(u64) -> Result<(Wal, Vec<Vec<u8>>), wal::WalError> + Send>,
}

impl Opening {
    /// A node-local row as of the last redb commit (the log not replayed).
    pub fn local_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        match txn.open_table(LOCAL) {
            Ok(t) => Ok(t.get(key)?.map(|v| v.value().to_vec())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A document's saved bytes as of the last redb commit (the log not replayed).
    pub fn doc_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let chunks = txn.open_table(CHUNKS)?;
        bytes(&docs, &chunks, id)
    }

    /// Recovery: replays what the log holds after the last checkpoint, and checkpoints.
    pub fn recover(self) -> Result<Store, StoreError> {
        let Opening {
            mut db,
            path,
            keys,
            open_wal,
        } = self;
        let metrics = Arc::new(StoreMetrics::default());
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let has_sealed = {
            let txn = db.begin_read()?;
            match txn.open_table(SECRETS) {
                Ok(t) => !t.is_empty()?,
                Err(redb::TableError::TableDoesNotExist(_)) => false,
                Err(e) => return Err(e.into()),
            }
        };
        let keys = Arc::new(Mutex::new(Keyring::open(
            keys,
            has_sealed,
            secrets::os_fill(),
        )?));
        let forgot = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = Shared {
            metrics: &metrics,
            broken: &broken,
            keys: &keys,
            forgot: &forgot,
        };
        let wal = Arc::new(Mutex::new(replay_log(&db, open_wal, &shared)?));
        db = migrate(db, path.as_deref(), wal.clone(), &shared)?;
        let store = Store {
            db: std::sync::RwLock::new(db),
            path,
            broken,
            wal,
            metrics,
            crashed: Default::default(),
            keys,
            forgot,
            #[cfg(test)]
            fail_commits: Default::default(),
        };
        // A rotation a crash interrupted is finished before anything else is sealed.
        if store.keys.lock().map_err(|_| poisoned())?.rotating() {
            store.rotate_keys()?;
        }
        Ok(store)
    }
}

/// What a store's transactions share besides the database.
struct Shared<'a> {
    metrics: &'a Arc<StoreMetrics>,
    broken: &'a Arc<std::sync::atomic::AtomicBool>,
    keys: &'a Arc<Mutex<Keyring>>,
    forgot: &'a Arc<std::sync::atomic::AtomicBool>,
}

/// The additional data a secret value is sealed with in a log record.
fn log_aad(id: &str, field: &str) -> Vec<u8> {
    format!("log\n{id}\n{field}").into_bytes()
}

/// Replays what the log holds after the database's last checkpoint into it, and checkpoints;
/// returns the log, ready for appends.
fn replay_log(
    db: &Database,
    open_wal: impl FnOnce(u64) -> Result<(Wal, Vec<Vec<u8>>), wal::WalError>,
    shared: &Shared<'_>,
) -> Result<Wal, StoreError> {
    let Shared {
        metrics,
        broken,
        keys,
        forgot,
    } = *shared;
    let txn = db.begin_write()?;
    let checkpoint = {
        txn.open_table(DOCS)?;
        txn.open_table(CHUNKS)?;
        txn.open_table(INDEX)?;
        txn.open_table(LOCAL)?;
        txn.open_table(SECRETS)?;
        let meta = txn.open_table(META)?;
        let v = meta.get(WAL_SEQ)?.map(|v| v.value()).unwrap_or(0);
        v
    };
    let (wal, records) = open_wal(checkpoint)?;
    // The replay commits through its own handle on the log; the caller gets it back after.
    let wal = Arc::new(Mutex::new(wal));
    let mut replay = WriteTxn {
        txn,
        ops: Vec::new(),
        wal: wal.clone(),
        metrics: metrics.clone(),
        broken: broken.clone(),
        keys: keys.clone(),
        forgot: forgot.clone(),
        #[cfg(test)]
        fail: false,
    };
    let started = std::time::Instant::now();
    if !records.is_empty() {
        tracing::info!(
            records = records.len(),
            "replaying the write-ahead log after an unclean stop"
        );
    }
    // Every document's logged bytes, in log order, so each is loaded, merged and stored
    // once however often it was written: replay costs one load per document, not one per
    // change (a document patched 8,000 times made recovery take 40 s).
    let mut docs: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut offered: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for r in &records {
        let ops: Vec<LogOp> = crate::core::wire::decode(r)
            .map_err(|e| StoreError::Corrupt(format!("write-ahead log record: {e}")))?;
        for op in ops {
            match op {
                LogOp::Local(k, v) => replay.local_put(&k, &v)?,
                LogOp::Changes(id, bytes) => docs.entry(id).or_default().push(bytes),
                LogOp::Secret(id, field, sealed) => {
                    let plain = keys
                        .lock()
                        .map_err(|_| poisoned())?
                        .open_sealed(&log_aad(&id, &field), &sealed)?;
                    let value = String::from_utf8(plain).map_err(|_| {
                        StoreError::Corrupt(format!("a logged secret of {id} is not UTF-8"))
                    })?;
                    offered.entry(id).or_default().push((field, value));
                }
            }
        }
    }
    let total = docs.len();
    let mut last_report = started;
    for (n, (id, chunks)) in docs.into_iter().enumerate() {
        let offer = offered.remove(&id).unwrap_or_default();
        replay.replay_doc(&id, &chunks, &offer)?;
        if last_report.elapsed() >= std::time::Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            tracing::info!(done = n + 1, of = total, "replaying the write-ahead log");
        }
    }
    if !records.is_empty() {
        replay.feed_after_crash()?;
    }
    replay.checkpoint()?;
    if !records.is_empty() {
        tracing::info!(
            records = records.len(),
            documents = total,
            ms = started.elapsed().as_millis() as u64,
            "replayed the write-ahead log"
        );
    }
    metrics.replayed_records.inc_by(records.len() as u64);
    let wal = Arc::try_unwrap(wal)
        .map_err(|_| StoreError::Redb("the log is still in use after replay".into()))?;
    wal.into_inner().map_err(|_| poisoned())
}

/// Brings a store written before secret references ([`FORMAT`]) to the current layout, once:
/// every document whose history holds a secret value is rewritten so that it holds references
/// instead ([`crdt_schema::secret::redact_history`], the same rewrite on every node), the values
/// its fields show move to `SECRETS`, every index row is derived again, and then the database
/// file is rewritten into a fresh file and the log zero-filled, so that no freed page or old
/// record still holds a value. Returns the database to use from now on.
fn migrate(
    db: Database,
    path: Option<&Path>,
    wal: Arc<Mutex<Wal>>,
    shared: &Shared<'_>,
) -> Result<Database, StoreError> {
    let format = {
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let v = meta.get(FORMAT)?.map(|v| v.value());
        v
    };
    if format == Some(FORMAT_NOW) {
        return Ok(db);
    }
    let started = std::time::Instant::now();
    let ids: Vec<String> = {
        let txn = db.begin_read()?;
        let index = txn.open_table(INDEX)?;
        let mut ids = Vec::new();
        for row in index.iter()? {
            ids.push(row?.0.value().to_string());
        }
        ids
    };
    if !ids.is_empty() {
        tracing::info!(
            documents = ids.len(),
            "migrating the store: secret values move out of the documents' history"
        );
    }
    let mut txn = WriteTxn {
        txn: db.begin_write()?,
        ops: Vec::new(),
        wal: wal.clone(),
        metrics: shared.metrics.clone(),
        broken: shared.broken.clone(),
        keys: shared.keys.clone(),
        forgot: shared.forgot.clone(),
        #[cfg(test)]
        fail: false,
    };
    let mut redacted = 0usize;
    for id in &ids {
        let Some(mut doc) = txn.load_doc(id)? else {
            continue;
        };
        let mut values = Vec::new();
        if let Ok((kind, _)) = crdt_schema::parse_doc_id(id) {
            if let Some(r) = crdt_schema::secret::redact_history(&mut doc, id, kind)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
            {
                doc = r.doc;
                values = r
                    .values
                    .into_iter()
                    .map(|(f, v)| (f.to_string(), v))
                    .collect();
                redacted += 1;
            }
        }
        let entry = match crate::core::index::row_for(id, &mut doc) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "a stored document has no index row; left out of the migration");
                continue;
            }
        };
        txn.replace_doc(id, &mut doc, entry, &values)?;
    }
    txn.txn.open_table(META)?.insert(FORMAT, FORMAT_NOW)?;
    // Durable (redb's default): nothing of this commit is in the log.
    txn.txn.commit()?;
    if ids.is_empty() {
        return Ok(db);
    }
    let db = match path {
        Some(p) => rewrite_file(db, p)?,
        None => db,
    };
    wal.lock().map_err(|_| poisoned())?.scrub()?;
    tracing::info!(
        documents = ids.len(),
        rewritten = redacted,
        ms = started.elapsed().as_millis() as u64,
        "store migrated: no document history holds a secret value"
    );
    Ok(db)
}

/// Copies every table into a fresh file that replaces the database (so that no freed page of
/// the old file survives), with the old file's permissions. Returns the new database.
fn rewrite_file(db: Database, path: &Path) -> Result<Database, StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".rewrite");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    {
        let fresh = redb::Builder::new().create(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        let r = db.begin_read()?;
        let w = fresh.begin_write()?;
        macro_rules! copy {
            ($t:expr) => {{
                let mut to = w.open_table($t)?;
                match r.open_table($t) {
                    Ok(from) => {
                        for row in from.iter()? {
                            let (k, v) = row?;
                            to.insert(k.value(), v.value())?;
                        }
                    }
                    Err(redb::TableError::TableDoesNotExist(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }};
        }
        copy!(DOCS);
        copy!(CHUNKS);
        copy!(INDEX);
        copy!(LOCAL);
        copy!(META);
        copy!(SECRETS);
        w.commit()?;
    }
    drop(db);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)?)
}

/// `PEERCONF_BENCH_COMMIT=redb` makes every commit a durable redb commit (fsync) instead of a
/// log record: how the write-ahead log's gain is measured (ARCHITECTURE.md, "Durability"). Read
/// once per process.
fn redb_commits() -> bool {
    static MODE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| std::env::var("PEERCONF_BENCH_COMMIT").is_ok_and(|v| v == "redb"))
}

/// The log's path: beside the database.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".wal");
    PathBuf::from(p)
}

impl Store {
    /// Opens (creating if needed) the database file. Fails with [`StoreError::InUse`] when another
    /// process holds it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::opening(path)?.recover()
    }

    /// The first half of [`Store::open`]: the database as its last redb commit left it, before
    /// the write-ahead log is replayed. Node-local rows written at setup (checkpointed) can be
    /// read from it, so a node can answer `/livez` while it recovers.
    pub fn opening(path: &Path) -> Result<Opening, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::InUse(path.parent().unwrap_or(path).display().to_string())
                }
                other => StoreError::Redb(other.to_string()),
            })?;
        let wal_file = wal_path(path);
        Ok(Opening {
            db,
            path: Some(path.to_path_buf()),
            keys: KeyFile::beside(path),
            open_wal: Box::new(move |checkpoint| Wal::open(&wal_file, checkpoint)),
        })
    }

    /// A store on a simulated disk (tests and the simulator), with a log of `log_bytes`.
    #[cfg(any(test, feature = "sim"))]
    pub fn open_sim(disk: &simdisk::SimDisk, log_bytes: u64) -> Result<Store, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(1 << 20)
            .create_with_backend(disk.backend())
            .map_err(|e| StoreError::Redb(e.to_string()))?;
        let disk = disk.clone();
        Opening {
            db,
            path: None,
            keys: KeyFile::Mem(disk.keys()),
            open_wal: Box::new(move |checkpoint| Wal::open_sim(&disk, log_bytes, checkpoint)),
        }
        .recover()
    }

    fn db(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an I/O error left the database refusing everything ([`Store::reopen`] it).
    pub fn broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes and opens the database again, replaying the log: what redb needs after an I/O
    /// error (a full disk). Callers hold no write transaction (the driver reopens between
    /// batches); readers that still hold the old database delay it by at most two seconds.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let Some(path) = self.path.clone() else {
            return Err(StoreError::Redb("a simulated store is not reopened".into()));
        };
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let mut wal = self.wal.lock().map_err(|_| poisoned())?;
        let _ = wal.finish();
        // redb holds the file until the database is closed: close it first (an empty in-memory
        // database stands in meanwhile).
        let stand_in =
            redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())?;
        drop(std::mem::replace(&mut *db, stand_in));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let fresh = loop {
            match redb::Builder::new()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
            {
                Ok(d) => break d,
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let wal_file = wal_path(&path);
        let replayed = replay_log(
            &fresh,
            |checkpoint| Wal::open(&wal_file, checkpoint),
            &Shared {
                metrics: &self.metrics,
                broken: &self.broken,
                keys: &self.keys,
                forgot: &self.forgot,
            },
        )?;
        *db = fresh;
        *wal = replayed;
        self.broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(path = %path.display(), "the store was reopened");
        Ok(())
    }

    /// Marks the store to be dropped as a crash leaves it: no checkpoint. (What reaches the disk is the disk's
    /// business: a simulated one forgets what was not synced.)
    pub fn crash(&self) {
        self.crashed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts writing a batch's record before the batch runs, so the disk works while the
    /// batch does; [`WriteTxn::commit`] waits for it. For a batch whose every change is known
    /// before it runs (changes received from a peer). None where writes cannot be started
    /// ahead (no io_uring): the commit logs as usual.
    pub fn prelog(&self, ops: &[LogOp]) -> Option<Prelogged> {
        if redb_commits() {
            return None;
        }
        let record = crate::core::wire::encode(&ops);
        let mut wal = self.wal.lock().ok()?;
        if !wal.fits(record.len()) {
            return Some(Prelogged::Full);
        }
        match wal.submit(&record) {
            Ok(true) => Some(Prelogged::Submitted),
            Ok(false) => None,
            Err(e) => Some(Prelogged::Failed(e.to_string())),
        }
    }

    /// Whether commits can still succeed: false once a write to the log failed (until the node
    /// restarts).
    pub fn writable(&self) -> bool {
        self.wal.lock().map(|w| !w.broken()).unwrap_or(false)
    }

    /// What the store counted.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    pub fn write(&self) -> Result<WriteTxn, StoreError> {
        Ok(WriteTxn {
            txn: self.db().begin_write()?,
            ops: Vec::new(),
            wal: self.wal.clone(),
            metrics: self.metrics.clone(),
            broken: self.broken.clone(),
            keys: self.keys.clone(),
            forgot: self.forgot.clone(),
            #[cfg(test)]
            fail: self.fail_commits.load(std::sync::atomic::Ordering::SeqCst),
        })
    }

    /// A secret value offered with a peer's changes, as a log entry (sealed): for a record
    /// written ahead of its batch ([`Store::prelog`]).
    pub fn log_secret(&self, id: &str, field: &str, value: &str) -> Result<LogOp, StoreError> {
        let sealed = self
            .keys
            .lock()
            .map_err(|_| poisoned())?
            .seal(&log_aad(id, field), value.as_bytes());
        Ok(LogOp::Secret(id.to_string(), field.to_string(), sealed))
    }

    /// The current value of a secret field of a committed document (the winning reference's
    /// value). For the embedding server's own use (a login, loading a key); no read path of
    /// peerconf serves it.
    pub fn secret(&self, id: &str, field: &str) -> Result<Option<String>, StoreError> {
        // The key ring is held from before the snapshot is taken until the value is opened. A
        // rotation drops the old key only after the values sealed again are committed, and needs
        // this lock to drop it: the snapshot's value is then always under a key the ring holds.
        // (Taken after the snapshot, a rotation in between made a stored value unreadable to this
        // read: UnknownKey.)
        let keys = self.keys.lock().map_err(|_| poisoned())?;
        let txn = self.db().begin_read()?;
        let Some(entry) = txn
            .open_table(INDEX)?
            .get(id)?
            .map(|v| decode_entry(id, v.value()))
            .transpose()?
        else {
            return Ok(None);
        };
        let Some((_, r)) = entry.secrets.iter().find(|(f, _)| f == field) else {
            return Ok(None);
        };
        let table = match txn.open_table(SECRETS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let row = secret_row(id, r);
        let Some(sealed) = table.get(row.as_str())? else {
            return Ok(None);
        };
        open_value(&keys, &row, sealed.value()).map(Some)
    }

    /// Whether a secret value was dropped since the last key rotation.
    pub fn rotation_due(&self) -> bool {
        self.forgot.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Rotates the at-rest key: every secret value is sealed again under a fresh key in one
    /// durable commit (a checkpoint, so no log record needs the old key), then the key file
    /// drops the old key. Every copy of a dropped value left in the files is then unreadable.
    /// Callers hold no write transaction.
    pub fn rotate_keys(&self) -> Result<Rotation, StoreError> {
        self.forgot
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let r = self.rotate_inner();
        if r.is_err() {
            self.forgot.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    fn rotate_inner(&self) -> Result<Rotation, StoreError> {
        let txn = self.write()?;
        let retired = {
            let mut keys = self.keys.lock().map_err(|_| poisoned())?;
            let retired = keys.key_ids();
            keys.add_key()?;
            retired
        };
        let mut resealed = 0;
        {
            let mut table = txn.txn.open_table(SECRETS)?;
            let mut rows = Vec::new();
            for row in table.iter()? {
                let (k, v) = row?;
                rows.push((k.value().to_string(), v.value().to_vec()));
            }
            let mut keys = self.keys.lock().map_err(|_| poisoned())?;
            for (row, sealed) in rows {
                let plain = keys.open_sealed(row.as_bytes(), &sealed)?;
                table.insert(row.as_str(), keys.seal(row.as_bytes(), &plain).as_slice())?;
                resealed += 1;
            }
        }
        txn.commit_to_redb()?;
        let mut keys = self.keys.lock().map_err(|_| poisoned())?;
        keys.drop_old_keys()?;
        self.metrics.key_rotations.inc();
        let key = keys.current();
        tracing::info!(key, retired = ?retired, resealed, "the at-rest key was rotated");
        Ok(Rotation {
            key,
            retired,
            resealed,
        })
    }

    /// Tests: overwrites an index row with other bytes, as damage on disk would.
    #[cfg(test)]
    pub(crate) fn tamper_row(&self, id: &str, bytes: &[u8]) {
        let txn = self.db().begin_write().expect("txn");
        txn.open_table(INDEX)
            .expect("index")
            .insert(id, bytes)
            .expect("insert");
        txn.commit().expect("commit");
    }

    /// Tests: makes every commit fail (before anything is written) until called with false.
    #[cfg(test)]
    pub(crate) fn fail_commits(&self, fail: bool) {
        self.fail_commits
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// Where the database file's bytes go: per table, what its keys and values hold, what the
    /// B-tree adds and what fragmentation wastes; and the pages allocated in all. For
    /// `peerconf bench store`.
    pub fn space(&self) -> Result<Space, StoreError> {
        let db = self.db();
        let txn = db.begin_write()?;
        let whole = txn.stats()?;
        let mut tables = Vec::new();
        {
            let mut one = |name: &'static str, st: redb::TableStats| {
                tables.push(TableSpace {
                    name,
                    stored: st.stored_bytes(),
                    metadata: st.metadata_bytes(),
                    fragmented: st.fragmented_bytes(),
                    pages: st.leaf_pages() + st.branch_pages(),
                });
            };
            one("docs", txn.open_table(DOCS)?.stats()?);
            one("chunks", txn.open_table(CHUNKS)?.stats()?);
            one("index", txn.open_table(INDEX)?.stats()?);
            one("secrets", txn.open_table(SECRETS)?.stats()?);
            one("feed", txn.open_table(FEED)?.stats()?);
            one("local", txn.open_table(LOCAL)?.stats()?);
        }
        txn.abort()?;
        Ok(Space {
            tables,
            allocated: whole.allocated_pages() * whole.page_size() as u64,
            page_size: whole.page_size() as u64,
        })
    }

    /// Makes every commit so far durable in redb itself, so the log can start over. Done when the
    /// store closes (a full log is checkpointed by the commit that finds it full); never needed
    /// for correctness.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        // A transaction before the log's lock, as everywhere: the driver locks the log while it
        // holds its transaction.
        let txn = self.db().begin_write()?;
        let mut wal = self.wal.lock().map_err(|_| poisoned())?;
        let _ = wal.finish();
        if !wal.pending() {
            return Ok(());
        }
        let t = std::time::Instant::now();
        txn.open_table(META)?.insert(WAL_SEQ, wal.seq())?;
        txn.commit()?;
        wal.reset();
        self.metrics.checkpoints.inc();
        self.metrics
            .checkpoint_seconds
            .observe(t.elapsed().as_secs_f64());
        Ok(())
    }

    pub fn local_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(LOCAL)?;
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    pub fn index_get(&self, id: &str) -> Result<Option<IndexEntry>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(INDEX)?;
        t.get(id)?.map(|v| decode_entry(id, v.value())).transpose()
    }

    /// Calls `f` with every index row whose ID starts with `prefix`, in ID order, from one
    /// consistent snapshot. Fails with [`StoreError::BadRow`] at the first damaged row.
    pub fn index_scan(
        &self,
        prefix: &str,
        mut f: impl FnMut(&str, IndexEntry),
    ) -> Result<(), StoreError> {
        self.index_rows(prefix, |id, row| row.map(|e| f(id, e)))
    }

    /// Like [`Store::index_scan`], with each row's outcome: the caller decides what a damaged
    /// row means (the driver rebuilds it). `f` stops the scan by returning an error.
    pub fn index_rows(
        &self,
        prefix: &str,
        mut f: impl FnMut(&str, Result<IndexEntry, StoreError>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(INDEX)?;
        for row in t.range(prefix..)? {
            let (k, v) = row?;
            if !k.value().starts_with(prefix) {
                break;
            }
            f(k.value(), decode_entry(k.value(), v.value()))?;
        }
        Ok(())
    }

    /// Number of documents (alive or not).
    pub fn doc_count(&self) -> Result<u64, StoreError> {
        let txn = self.db().begin_read()?;
        Ok(txn.open_table(INDEX)?.len()?)
    }

    /// Loads a committed document.
    pub fn load_doc(&self, id: &str) -> Result<Option<AutoCommit>, StoreError> {
        let txn = self.db().begin_read()?;
        let docs = txn.open_table(DOCS)?;
        let chunks = txn.open_table(CHUNKS)?;
        load(&docs, &chunks, id)
    }
}

fn bytes(
    docs: &impl ReadableTable<&'static str, &'static [u8]>,
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    id: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(full) = docs.get(id)? else {
        return Ok(None);
    };
    let mut out = full.value().to_vec();
    for row in chunks.range((id, 0u32)..=(id, u32::MAX))? {
        out.extend_from_slice(row?.1.value());
    }
    Ok(Some(out))
}

fn load(
    docs: &impl ReadableTable<&'static str, &'static [u8]>,
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    id: &str,
) -> Result<Option<AutoCommit>, StoreError> {
    match bytes(docs, chunks, id)? {
        None => Ok(None),
        Some(b) => AutoCommit::load(&b)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("document {id}: {e}"))),
    }
}

fn poisoned() -> StoreError {
    StoreError::Redb("the write-ahead log's lock is poisoned".into())
}

/// The `SECRETS` row of a reference.
fn secret_row(id: &str, r: &str) -> String {
    format!("{id}\n{r}")
}

/// How many copies of `value`, the secret `field` of document `id`, sealed as this store seals
/// it (in its table, under the row of the value's reference, or in a log record) can be opened
/// with `keys` anywhere in `bytes` (a database, log or backup file, read raw). For audits and
/// tests: after a secret was replaced or deleted and the key rotated, this is 0 for the old value
/// in every file of every node, while the current value is still found.
pub fn sealed_copies(bytes: &[u8], keys: &Keyring, id: &str, field: &str, value: &str) -> usize {
    let rows = [
        secret_row(id, &crdt_schema::secret::secret_ref(id, field, value)).into_bytes(),
        log_aad(id, field),
    ];
    let len = secrets::sealed_len(value.len());
    let mut found = 0;
    // Only where a key this ring holds is named: the cheap search before an AEAD open.
    for key in keys.key_ids() {
        for start in memchr::memmem::find_iter(bytes, &key.to_le_bytes()) {
            let Some(blob) = bytes.get(start..start + len) else {
                break;
            };
            if rows.iter().any(|row| {
                keys.open_sealed(row, blob)
                    .is_ok_and(|p| p == value.as_bytes())
            }) {
                found += 1;
            }
        }
    }
    found
}

fn open_value(keys: &Keyring, row: &str, sealed: &[u8]) -> Result<String, StoreError> {
    let plain = keys.open_sealed(row.as_bytes(), sealed)?;
    String::from_utf8(plain)
        .map_err(|_| StoreError::Corrupt(format!("the secret value of {row:?} is not UTF-8")))
}

/// What a key rotation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rotation {
    /// The key that seals from now on.
    pub key: u32,
    /// The keys that no longer exist anywhere.
    pub retired: Vec<u32>,
    /// Values sealed again under the new key.
    pub resealed: usize,
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "checkpoint at close failed; the next open replays the log");
        }
    }
}

/// One write transaction: every change of an effect batch goes into one, committed once.
pub struct WriteTxn {
    txn: redb::WriteTransaction,
    /// The transaction's changes, for its log record.
    ops: Vec<LogOp>,
    wal: Arc<Mutex<Wal>>,
    metrics: Arc<StoreMetrics>,
    broken: Arc<std::sync::atomic::AtomicBool>,
    keys: Arc<Mutex<Keyring>>,
    forgot: Arc<std::sync::atomic::AtomicBool>,
    #[cfg(test)]
    fail: bool,
}

impl WriteTxn {
    /// Calls `f` with every index row whose ID starts with `prefix`, as this transaction sees
    /// them (its own writes included). Fails at the first damaged row.
    pub fn index_scan(
        &self,
        prefix: &str,
        mut f: impl FnMut(&str, IndexEntry),
    ) -> Result<(), StoreError> {
        let t = self.txn.open_table(INDEX)?;
        for row in t.range(prefix..)? {
            let (k, v) = row?;
            if !k.value().starts_with(prefix) {
                break;
            }
            f(k.value(), decode_entry(k.value(), v.value())?);
        }
        Ok(())
    }

    pub fn index_get(&self, id: &str) -> Result<Option<IndexEntry>, StoreError> {
        let t = self.txn.open_table(INDEX)?;
        let r = t.get(id)?.map(|v| decode_entry(id, v.value())).transpose();
        r
    }

    pub fn load_doc(&self, id: &str) -> Result<Option<AutoCommit>, StoreError> {
        let docs = self.txn.open_table(DOCS)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        load(&docs, &chunks, id)
    }

    pub fn doc_bytes(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let docs = self.txn.open_table(DOCS)?;
        let chunks = self.txn.open_table(CHUNKS)?;
        bytes(&docs, &chunks, id)
    }

    pub fn local_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.txn.open_table(LOCAL)?;
        let v = t.get(key)?.map(|v| v.value().to_vec());
        Ok(v)
    }

    /// Stores what `doc` gained since `stored` (the heads of what is stored now) and its index
    /// row; `entry.chunks` is set here. The gain goes in as one chunk, or, for a new document or
    /// when it is time to compact, as one whole save that replaces the chunks. `saved`: bytes the
    /// document was just loaded from, stored as they are when a whole save is due.
    ///
    /// Returns the bytes gained (the whole save for a document new here): the transaction's log
    /// entry, and what a push of a local write carries.
    ///
    /// The heads are passed in rather than left to `save_incremental`, whose cursor a document
    /// loaded from bytes does not have: its first incremental save would repeat the whole history.
    pub fn put_doc(
        &mut self,
        id: &str,
        doc: &mut AutoCommit,
        mut entry: IndexEntry,
        saved: Option<Vec<u8>>,
        stored: &[automerge::ChangeHash],
        offered: &[(String, String)],
    ) -> Result<Vec<u8>, StoreError> {
        let prev = match self.index_get(id) {
            Ok(p) => p,
            // A damaged row is replaced here; only its chunk count matters, and the chunks
            // table has it.
            Err(StoreError::BadRow(_)) => {
                let mut p = entry.clone();
                p.chunks = self.chunk_count(id)?;
                Some(p)
            }
            Err(e) => return Err(e),
        };
        let mut docs = self.txn.open_table(DOCS)?;
        let mut chunks = self.txn.open_table(CHUNKS)?;
        let gained = match prev {
            Some(p) if p.chunks < CHUNKS_MAX => {
                let inc = doc.save_after(stored);
                if !inc.is_empty() {
                    chunks.insert((id, p.chunks), inc.as_slice())?;
                    entry.chunks = p.chunks + 1;
                } else {
                    entry.chunks = p.chunks;
                }
                inc
            }
            prev => {
                // New document, or time to compact: one full save replaces every chunk.
                let bytes = match saved {
                    Some(b) => b,
                    None => doc.save(),
                };
                docs.insert(id, bytes.as_slice())?;
                entry.chunks = 0;
                match prev {
                    None => bytes,
                    Some(p) => {
                        for n in 0..p.chunks {
                            chunks.remove((id, n))?;
                        }
                        doc.save_after(stored)
                    }
                }
            }
        };
        if !gained.is_empty() {
            self.ops
                .push(LogOp::Changes(id.to_string(), gained.clone()));
        }
        drop((docs, chunks));
        let mut index = self.txn.open_table(INDEX)?;
        index.insert(id, encode_entry(&entry).as_slice())?;
        drop(index);
        self.keep_secrets(id, &entry.secrets, offered)?;
        Ok(gained)
    }

    /// Keeps exactly the secret values the document shows (`live`: field, reference): a value
    /// not stored yet is taken from `offered` (field, value) when it matches its reference; a
    /// value the document no longer shows is dropped (and the at-rest key is then due for
    /// rotation). One rule for local writes, peers' messages and the log's replay.
    fn keep_secrets(
        &mut self,
        id: &str,
        live: &[(String, String)],
        offered: &[(String, String)],
    ) -> Result<(), StoreError> {
        let prefix = format!("{id}\n");
        let mut table = self.txn.open_table(SECRETS)?;
        let mut existing = Vec::new();
        for row in table.range(prefix.as_str()..)? {
            let (k, _) = row?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            existing.push(k.value().to_string());
        }
        for row in &existing {
            let r = &row[prefix.len()..];
            if !live.iter().any(|(_, l)| l == r) {
                table.remove(row.as_str())?;
                self.metrics.secrets_forgotten.inc();
                self.forgot.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        for (field, r) in live {
            let row = secret_row(id, r);
            if existing.contains(&row) {
                continue;
            }
            let value = offered
                .iter()
                .find(|(f, v)| f == field && crdt_schema::secret::secret_ref(id, f, v) == *r);
            let Some((_, value)) = value else {
                self.metrics.secrets_missing.inc();
                tracing::debug!(doc = %id, field = %field, "a secret reference without its value (it comes with a later message)");
                continue;
            };
            let mut keys = self.keys.lock().map_err(|_| poisoned())?;
            let sealed = keys.seal(row.as_bytes(), value.as_bytes());
            table.insert(row.as_str(), sealed.as_slice())?;
            let logged = keys.seal(&log_aad(id, field), value.as_bytes());
            self.ops
                .push(LogOp::Secret(id.to_string(), field.clone(), logged));
        }
        Ok(())
    }

    /// The stored value of one secret reference of a document, as this transaction sees it.
    pub fn secret_value(&self, id: &str, r: &str) -> Result<Option<String>, StoreError> {
        let table = self.txn.open_table(SECRETS)?;
        let row = secret_row(id, r);
        let Some(sealed) = table.get(row.as_str())? else {
            return Ok(None);
        };
        let keys = self.keys.lock().map_err(|_| poisoned())?;
        open_value(&keys, &row, sealed.value()).map(Some)
    }

    /// The values of the secret fields the stored document shows (field, value): what travels
    /// with its changes to a peer.
    pub fn secrets_of(&self, id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let Some(entry) = self.index_get(id)? else {
            return Ok(Vec::new());
        };
        if entry.secrets.is_empty() {
            return Ok(Vec::new());
        }
        let table = self.txn.open_table(SECRETS)?;
        let keys = self.keys.lock().map_err(|_| poisoned())?;
        let mut out = Vec::new();
        for (field, r) in &entry.secrets {
            let row = secret_row(id, r);
            if let Some(sealed) = table.get(row.as_str())? {
                out.push((field.clone(), open_value(&keys, &row, sealed.value())?));
            }
        }
        Ok(out)
    }

    fn chunk_count(&self, id: &str) -> Result<u32, StoreError> {
        Ok(self
            .txn
            .open_table(CHUNKS)?
            .range((id, 0u32)..=(id, u32::MAX))?
            .count() as u32)
    }

    /// Rewrites a document's index row from the document as stored (its row was damaged).
    /// Returns the row written.
    pub fn rebuild_row(&mut self, id: &str) -> Result<Option<IndexEntry>, StoreError> {
        let Some(mut doc) = self.load_doc(id)? else {
            self.txn.open_table(INDEX)?.remove(id)?;
            return Ok(None);
        };
        let mut entry = crate::core::index::row_for(id, &mut doc)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        entry.chunks = self.chunk_count(id)?;
        self.txn
            .open_table(INDEX)?
            .insert(id, encode_entry(&entry).as_slice())?;
        // Logged as a node-local fact would be wrong: the row is derived, and replay derives it
        // again from the document, so nothing needs logging.
        Ok(Some(entry))
    }

    /// Replaces a document's stored bytes with one whole save of `doc` (its chunks dropped) and
    /// its index row, keeping the secret values it shows ([`WriteTxn::keep_secrets`]). Not
    /// logged: for the migration, which commits durably itself.
    fn replace_doc(
        &mut self,
        id: &str,
        doc: &mut AutoCommit,
        mut entry: IndexEntry,
        offered: &[(String, String)],
    ) -> Result<(), StoreError> {
        let n = self.chunk_count(id)?;
        {
            let mut chunks = self.txn.open_table(CHUNKS)?;
            for i in 0..n {
                chunks.remove((id, i))?;
            }
        }
        self.txn
            .open_table(DOCS)?
            .insert(id, doc.save().as_slice())?;
        entry.chunks = 0;
        self.txn
            .open_table(INDEX)?
            .insert(id, encode_entry(&entry).as_slice())?;
        self.keep_secrets(id, &entry.secrets, offered)
    }

    /// Stores a document new to this node as the saved bytes it came in, with its index row
    /// derived by the caller. The caller checked that the document is not stored yet.
    pub fn put_new_doc(
        &mut self,
        id: &str,
        bytes: Vec<u8>,
        mut entry: IndexEntry,
        offered: &[(String, String)],
    ) -> Result<(), StoreError> {
        entry.chunks = 0;
        self.txn.open_table(DOCS)?.insert(id, bytes.as_slice())?;
        self.txn
            .open_table(INDEX)?
            .insert(id, encode_entry(&entry).as_slice())?;
        self.ops.push(LogOp::Changes(id.to_string(), bytes));
        self.keep_secrets(id, &entry.secrets, offered)
    }

    pub fn local_put(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(LOCAL)?.insert(key, value)?;
        self.ops.push(LogOp::Local(key.to_string(), value.to_vec()));
        Ok(())
    }

    /// Commits durably before returning: appends the transaction's record to the log, then
    /// commits redb without fsync. A record that does not fit makes this a checkpoint instead.
    /// Readers see the commit only once it is durable.
    ///
    /// `prelogged`: the batch's record was handed to the log thread ahead ([`Store::prelog`]) and
    /// covers every change of the transaction; then only its answer is awaited.
    pub fn commit(self, prelogged: Option<Prelogged>) -> Result<(), StoreError> {
        let metrics = self.metrics.clone();
        let broken = self.broken.clone();
        let r = self.commit_inner(prelogged);
        if let Err(e) = &r {
            metrics.commit_failures.inc();
            if e.breaks_the_store() || matches!(e, StoreError::Unsettled(_)) {
                broken.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        r
    }

    fn commit_inner(mut self, prelogged: Option<Prelogged>) -> Result<(), StoreError> {
        if redb_commits() {
            return self.checkpoint();
        }
        #[cfg(test)]
        if self.fail {
            if let Some(Prelogged::Submitted) = prelogged {
                let _ = self.wal.lock().map_err(|_| poisoned())?.finish();
            }
            return Err(StoreError::Injected);
        }
        match prelogged {
            Some(Prelogged::Submitted) => {
                let t = std::time::Instant::now();
                self.wal.lock().map_err(|_| poisoned())?.finish()?;
                self.metrics
                    .log_write_seconds
                    .observe(t.elapsed().as_secs_f64());
                self.metrics.log_appends.inc();
                return self.commit_after_log();
            }
            Some(Prelogged::Full) => return self.checkpoint(),
            Some(Prelogged::Failed(e)) => return Err(StoreError::Log(e)),
            None => {}
        }
        let record = crate::core::wire::encode(&self.ops);
        let mut wal = self.wal.lock().map_err(|_| poisoned())?;
        if wal.fits(record.len()) {
            let t = std::time::Instant::now();
            wal.append(&record)?;
            self.metrics
                .log_write_seconds
                .observe(t.elapsed().as_secs_f64());
            self.metrics.log_appends.inc();
            self.metrics.log_bytes.inc_by(wal::padded(record.len()));
            self.txn.set_durability(redb::Durability::None)?;
            self.txn.commit()?;
            Ok(())
        } else {
            drop(wal);
            self.checkpoint()
        }
    }

    /// redb's commit without fsync, once the log record is durable: a failure now leaves the
    /// batch in the log ([`StoreError::Unsettled`]).
    fn commit_after_log(mut self) -> Result<(), StoreError> {
        let unsettled = |e: StoreError| StoreError::Unsettled(Box::new(e));
        self.txn
            .set_durability(redb::Durability::None)
            .map_err(|e| unsettled(e.into()))?;
        self.txn.commit().map_err(|e| unsettled(e.into()))
    }

    /// Commits durably in redb itself (fsync), without a log record: for bulk batches, whose
    /// records would fill the log at once. This is a checkpoint too.
    pub fn commit_to_redb(self) -> Result<(), StoreError> {
        let broken = self.broken.clone();
        let r = self.checkpoint();
        if r.as_ref().is_err_and(StoreError::breaks_the_store) {
            broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    /// Commits durably in redb itself, recording that every log record so far is covered, and
    /// starts the log over.
    fn checkpoint(self) -> Result<(), StoreError> {
        let mut wal = self.wal.lock().map_err(|_| poisoned())?;
        // A record still in flight is covered by this commit either way; its outcome only
        // matters to later writes (a failure marks the log broken).
        let _ = wal.finish();
        let t = std::time::Instant::now();
        self.txn.open_table(META)?.insert(WAL_SEQ, wal.seq())?;
        self.txn.commit()?;
        wal.reset();
        self.metrics.checkpoints.inc();
        self.metrics
            .checkpoint_seconds
            .observe(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// Merges every logged chunk of one document into what redb holds, then stores it once.
    /// Bytes that do not merge, and a document whose index row cannot be derived, were never
    /// committed (their batch failed): they are skipped.
    fn replay_doc(
        &mut self,
        id: &str,
        chunks: &[Vec<u8>],
        offered: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut doc = self.load_doc(id)?.unwrap_or_default();
        let before = doc.get_heads();
        for bytes in chunks {
            if let Err(e) = doc.load_incremental(bytes) {
                tracing::warn!(doc = %id, error = %e, "a logged change does not merge; skipped");
            }
        }
        if doc.get_heads() == before {
            return Ok(());
        }
        match crate::core::index::row_for(id, &mut doc) {
            Ok(entry) => self
                .put_doc(id, &mut doc, entry, None, &before, offered)
                .map(|_| ()),
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "a logged document has no index row; skipped");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ROOT;

    fn entry() -> IndexEntry {
        IndexEntry {
            alive: true,
            conflicts: false,
            chunks: 0,
            heads_hash: [0; 32],
            json: b"{}".to_vec(),
            secrets: Vec::new(),
        }
    }

    fn stored_len(store: &Store, id: &str) -> usize {
        let txn = store.write().expect("txn");
        txn.doc_bytes(id).expect("read").expect("stored").len()
    }

    /// A document loaded back from the store and edited stores only the edit, not its whole
    /// history again (a loaded document has no save cursor of its own).
    #[test]
    fn an_edit_of_a_reloaded_document_stores_only_the_edit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        let id = "user/alice";
        let mut d = AutoCommit::new();
        for i in 0..200 {
            d.put(
                ROOT,
                format!("field{i}"),
                format!("a value long enough {i}"),
            )
            .expect("put");
            d.commit();
        }
        let mut txn = store.write().expect("txn");
        txn.put_doc(id, &mut d, entry(), None, &[], &[])
            .expect("put");
        txn.commit(None).expect("commit");
        let full = stored_len(&store, id);

        let mut d = store.load_doc(id).expect("load").expect("present");
        let before = d.get_heads();
        d.put(ROOT, "field0", "edited").expect("put");
        d.commit();
        let mut txn = store.write().expect("txn");
        let mut e = entry();
        e.chunks = 0;
        txn.put_doc(id, &mut d, e, None, &before, &[]).expect("put");
        txn.commit(None).expect("commit");
        let grown = stored_len(&store, id) - full;
        assert!(
            grown < 300,
            "an edit of one field stored {grown} bytes (the whole document is {full})"
        );
        let mut back = store.load_doc(id).expect("load").expect("present");
        assert_eq!(back.get_heads(), d.get_heads());
    }

    /// What a crash leaves: a copy of the database and the log taken while the store is open
    /// (nothing checkpointed at close), opened as a new store.
    fn crash(store: Store, db: &std::path::Path) -> Store {
        let crashed = db.with_extension("crashed");
        std::fs::copy(db, &crashed).expect("copy db");
        std::fs::copy(wal_path(db), wal_path(&crashed)).expect("copy wal");
        drop(store);
        Store::open(&crashed).expect("reopen")
    }

    fn put(store: &Store, id: &str, text: &str) -> AutoCommit {
        let mut d = AutoCommit::new();
        d.put(ROOT, "text", text).expect("put");
        d.commit();
        let mut txn = store.write().expect("txn");
        txn.put_doc(id, &mut d, entry(), None, &[], &[])
            .expect("put");
        txn.local_put(&format!("local-{id}"), text.as_bytes())
            .expect("local");
        txn.commit(None).expect("commit");
        d
    }

    /// What a crash leaves: the database file as of its last fsync'd commit, and the log. A copy
    /// taken while the store is open has exactly that (commits after the checkpoint are
    /// acknowledged through the log only), and opening it replays them.
    #[test]
    fn commits_acknowledged_through_the_log_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = Store::open(&db).expect("open");
        put(&store, "user/before", "checkpointed");
        store.checkpoint().expect("checkpoint");
        let mut docs = Vec::new();
        for i in 0..20 {
            docs.push(put(&store, &format!("user/u{i}"), &format!("value {i}")));
        }
        let back = crash(store, &db);
        assert_eq!(back.doc_count().expect("count"), 21);
        for (i, d) in docs.iter_mut().enumerate() {
            let mut got = back
                .load_doc(&format!("user/u{i}"))
                .expect("load")
                .expect("replayed");
            assert_eq!(got.get_heads(), d.get_heads());
            assert_eq!(
                back.local_get(&format!("local-user/u{i}")).expect("local"),
                Some(format!("value {i}").into_bytes())
            );
        }
        assert!(back.index_get("user/before").expect("index").is_some());
    }

    /// A batch too big for the log commits to redb durably and starts the log over; nothing
    /// before it is lost.
    #[test]
    fn a_batch_too_big_for_the_log_is_a_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = Store::open(&db).expect("open");
        put(&store, "user/small", "logged");
        let big = "x".repeat(wal::RECORD_MAX + 1);
        put(&store, "user/big", &big);
        assert!(!store.wal.lock().expect("lock").pending());
        put(&store, "user/after", "logged again");
        let back = crash(store, &db);
        for id in ["user/small", "user/big", "user/after"] {
            assert!(back.load_doc(id).expect("load").is_some(), "{id} lost");
        }
    }

    /// A batch whose record was started ahead (changes received from a peer) and then committed
    /// survives a crash: the replay merges the logged bytes and derives the index row again.
    #[test]
    fn a_prelogged_batch_survives_a_crash() {
        use crdt_schema::{doc, Kind};
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = Store::open(&db).expect("open");
        let mut sent = doc::genesis(Kind::Group);
        sent.set_actor(automerge::ActorId::from([3u8; 16].as_slice()));
        sent.put(ROOT, "_alive", true).expect("put");
        sent.put(ROOT, "description", "from a peer").expect("put");
        sent.commit();
        let bytes = sent.save();
        let id = "group/ops";
        let prelogged = store.prelog(&[LogOp::Changes(id.to_string(), bytes.clone())]);
        let mut d = AutoCommit::load(&bytes).expect("load");
        let entry = crate::core::index::row_for(id, &mut d).expect("entry");
        let mut txn = store.write().expect("txn");
        txn.put_doc(id, &mut d, entry, Some(bytes), &[], &[])
            .expect("put");
        txn.commit(prelogged).expect("commit");
        let back = crash(store, &db);
        let mut got = back.load_doc(id).expect("load").expect("replayed");
        assert_eq!(got.get_heads(), sent.get_heads());
        let row = back
            .index_get(id)
            .expect("index")
            .expect("index row derived");
        assert!(row.alive);
        assert!(String::from_utf8_lossy(&row.json).contains("from a peer"));
    }

    /// A store written before secret references held password hashes in its documents' history.
    /// Opened, it is migrated: the current value moves to the sealed table, every change of the
    /// history holds a reference instead, and no file of the store (database, log) holds either
    /// value in the clear any more, while it did before.
    #[test]
    fn a_store_from_before_secret_references_is_migrated_on_open() {
        use crdt_schema::doc::{apply, ChangeNote, Edit};
        use crdt_schema::{FieldValue, Kind};
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let old = "$argon2id$v=19$m=19456,t=2,p=1$b2xkc2FsdG9sZHNhbHQ$first-hash-value-0123456789";
        let new = "$argon2id$v=19$m=19456,t=2,p=1$bmV3c2FsdG5ld3NhbHQ$second-hash-value-987654321";
        let files = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
            std::fs::read_dir(dir)
                .expect("dir")
                .map(|e| e.expect("entry").path())
                .map(|p| (p.clone(), std::fs::read(&p).expect("read")))
                .collect()
        };
        let holds = |b: &[u8], v: &str| b.windows(v.len()).any(|w| w == v.as_bytes());
        {
            let store = Store::open(&db).expect("open");
            let password = Kind::User.field("password").expect("field");
            let mut d = crdt_schema::doc::genesis(Kind::User);
            for (t, hash) in [old, new].into_iter().enumerate() {
                let note = ChangeNote {
                    node: "n1".into(),
                    op: "put".into(),
                    fields: Vec::new(),
                    ..Default::default()
                };
                let edit = Edit {
                    alive: Some(true),
                    values: &[(password, FieldValue::Secret(hash.into()))],
                };
                apply(&mut d, Kind::User, &edit, &note, t as i64).expect("apply");
            }
            let mut txn = store.write().expect("txn");
            txn.put_doc("user/alice", &mut d, entry(), None, &[], &[])
                .expect("put");
            txn.commit(None).expect("commit");
            store.checkpoint().expect("checkpoint");
            // As versions before secret references left it: format 2.
            let w = store.db().begin_write().expect("write");
            w.open_table(META)
                .expect("meta")
                .insert(FORMAT, 2)
                .expect("insert");
            w.commit().expect("commit");
        }
        assert!(
            files(dir.path()).iter().any(|(_, b)| holds(b, old)),
            "control: the old layout holds the first hash in the clear"
        );
        let store = Store::open(&db).expect("migrating open");
        assert_eq!(
            store.secret("user/alice", "password").expect("secret"),
            Some(new.to_string())
        );
        let mut doc = store.load_doc("user/alice").expect("load").expect("kept");
        for c in doc.get_changes(&[]) {
            assert_eq!(
                crdt_schema::secret::change_puts_value(&c, Kind::User),
                None,
                "a change of the migrated history still holds a value"
            );
        }
        assert_eq!(
            crdt_schema::secret::current_ref(&doc, "password"),
            Some(crdt_schema::secret::secret_ref(
                "user/alice",
                "password",
                new
            ))
        );
        drop(store);
        for (p, b) in files(dir.path()) {
            for v in [old, new] {
                assert!(!holds(&b, v), "{} holds a hash in the clear", p.display());
            }
        }
        // Migrated once: a second open finds the current format and changes nothing.
        let store = Store::open(&db).expect("open again");
        assert_eq!(
            store.secret("user/alice", "password").expect("secret"),
            Some(new.to_string())
        );
    }

    /// Reopening (what a full disk's I/O error calls for) closes redb, replays the log and goes
    /// on: what was committed through the log is there, and commits work after it.
    #[test]
    fn reopen_replays_the_log_and_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = Store::open(&db).expect("open");
        let mut docs: Vec<AutoCommit> = (0..5)
            .map(|i| put(&store, &format!("user/u{i}"), "before"))
            .collect();
        store.reopen().expect("reopen");
        for (i, d) in docs.iter_mut().enumerate() {
            let mut back = store
                .load_doc(&format!("user/u{i}"))
                .expect("load")
                .expect("kept");
            assert_eq!(back.get_heads(), d.get_heads());
        }
        put(&store, "user/after", "after");
        let back = crash(store, &db);
        assert!(back.load_doc("user/after").expect("load").is_some());
    }

    /// A hot document: thousands of logged changes to one entity, then a crash. Replay merges
    /// them in one load (how long that takes is `peerconf bench recovery`'s to say) and the
    /// document comes back whole, beside the others.
    #[test]
    fn a_hot_document_with_thousands_of_logged_changes_survives_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = Store::open(&db).expect("open");
        let id = "user/hot";
        let mut d = put(&store, id, "v0");
        let cold = put(&store, "user/cold", "cold");
        let mut written = 0;
        // Until the log is nearly full, so every record is replayed.
        while store.wal.lock().expect("lock").fits(wal::RECORD_MAX) && written < 3000 {
            let before = d.get_heads();
            d.put(ROOT, "text", format!("v{written}")).expect("put");
            d.commit();
            let mut txn = store.write().expect("txn");
            txn.put_doc(id, &mut d, entry(), None, &before, &[])
                .expect("put");
            txn.commit(None).expect("commit");
            written += 1;
        }
        assert!(written > 1000, "only {written} records fit the log");
        let back = crash(store, &db);
        assert_eq!(
            back.metrics().replayed_records.get(),
            written as u64 + 2,
            "every record was replayed"
        );
        let mut got = back.load_doc(id).expect("load").expect("replayed");
        assert_eq!(got.get_heads(), d.get_heads());
        let mut cold_back = back.load_doc("user/cold").expect("load").expect("cold");
        let mut cold = cold;
        assert_eq!(cold_back.get_heads(), cold.get_heads());
    }

    /// Edits past the chunk limit (one of them compacts) are logged as the changes they made,
    /// and replay rebuilds the same document.
    #[test]
    fn edits_through_a_compaction_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db");
        let store = Store::open(&db).expect("open");
        let id = "user/edited";
        let mut d = put(&store, id, "v0");
        for i in 1..=(CHUNKS_MAX + 5) {
            let before = d.get_heads();
            d.put(ROOT, "text", format!("v{i}")).expect("put");
            d.commit();
            let mut txn = store.write().expect("txn");
            let gained = txn
                .put_doc(id, &mut d, entry(), None, &before, &[])
                .expect("put");
            assert!(gained.len() < 200, "edit {i} logged {} bytes", gained.len());
            txn.commit(None).expect("commit");
        }
        let back = crash(store, &db);
        let mut got = back.load_doc(id).expect("load").expect("replayed");
        assert_eq!(got.get_heads(), d.get_heads());
    }
}
