//! Layer: node (imports core, store, net; never cluster, admin or sim).
//!
//! A peerconf node in-process: the embedding API ([`Node`]), the driver thread that owns the
//! write side of the store, the data directory, the change feed and the drain switch.
//!
//! - `driver`: the one owner of writes, the document cache and the sync sessions (one thread).
//! - `state`: what the driver publishes after each commit (digest, member list, settings, events),
//!   and the seam through which it hands pushes to the links to peers.
//! - `setup`: node-local configuration and data directories.
//! - `events`, `error`, `drain`, `time`: the change feed, the errors, the drain switch, the
//!   host's clocks.
//!
//! Reads never go through the driver: redb serves them from committed snapshots.

pub mod disk;
pub mod drain;
pub mod driver;
pub mod error;
pub mod events;
pub mod metrics;
pub mod setup;
pub mod state;
pub mod time;

pub use error::Error;
pub use events::{ChangeEvent, Origin};
pub use setup::{
    AdminBootstrap, ApiCertFiles, InitOptions, NodeConfig, DB_FILE, DEFAULT_API_LISTEN,
    DEFAULT_IPC_LISTEN,
};

use crate::core::clock::Clock;
use crate::core::entity::{self, Op};
use crate::core::link::Msgs;
use crate::core::members::Member;
use crate::core::proto::{Request, Response};
use crate::store::{Store, StoreError};
use crdt_schema::doc::{self, EntityState, HistoryEntry};
use crdt_schema::typed::Entity;
use crdt_schema::{doc_id, Kind};
use driver::{AdmitError, Cmd, Driver, IngestDoc, Revoked, SyncThen, TokenInfo, TokenRecord};
use serde_json::Value;
use state::Published;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::SystemClock;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Writes waiting for the driver before callers are made to wait: bounds memory under overload.
const WRITE_QUEUE_MAX: usize = 4096;
/// Messages a peer's link may hold unanswered before local writes wait for it (see
/// `Node::pace`). With 64 writers through the API on three nodes sharing two cores, 256 kept
/// member 3's visibility p99 at 0.13 to 0.15 s instead of 0.52 to 0.58 s, for 3% fewer writes/s
/// (medians of 6 runs each, within the machine's noise); 64 cut throughput by a fifth.
pub const PEER_BACKLOG_MAX: usize = 256;
/// The longest a local write waits for peers' links to catch up.
pub const PEER_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// How to open a node. Time and randomness are injected here.
#[derive(Clone)]
pub struct NodeOptions {
    pub clock: Arc<dyn Clock>,
    /// Seeds the node's random generator (actor ID, salts); None draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            clock: SystemClock::shared(),
            seed: None,
        }
    }
}

struct Inner {
    store: Arc<Store>,
    config: NodeConfig,
    data_dir: PathBuf,
    published: Arc<Published>,
    drain: drain::Drain,
    clock: Arc<dyn Clock>,
}

/// A running node. Cheap to clone; every clone talks to the same driver.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    tx: mpsc::Sender<Cmd>,
    driver: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Who this handle's writes are recorded as ([`Node::acting_as`]).
    by: Option<Arc<crate::core::entity::Principal>>,
}

impl Node {
    /// Creates a node in `dir` and a new cluster around it: a cluster ID, the cluster CA, the
    /// node's certificate, and a member list holding this node. Fails if `dir` is initialised.
    pub fn init(
        dir: &Path,
        opts: &InitOptions,
        node_opts: &NodeOptions,
    ) -> Result<NodeConfig, Error> {
        setup::init(dir, opts, &node_opts.clock, node_opts.seed)
    }

    /// Opens an initialised data directory and starts the node's driver (its own thread).
    pub fn open(dir: &Path, opts: NodeOptions) -> Result<Node, Error> {
        Node::opening(dir)?.start(opts)
    }

    /// The first half of [`Node::open`]: the database is open and the node's configuration
    /// known, the write-ahead log not replayed yet (which may take a while after a crash).
    ///
    /// Refuses a directory whose secrets others could read or change, as ssh's `StrictModes`
    /// does (see [`check_permissions`]).
    pub fn opening(dir: &Path) -> Result<Opening, Error> {
        let db_path = dir.join(DB_FILE);
        if !db_path.exists() {
            return Err(Error::NotInitialised(dir.display().to_string()));
        }
        check_permissions(dir)?;
        let store = Store::opening(&db_path).map_err(|e| match e {
            StoreError::Damaged(reason) => Error::Damaged {
                dir: dir.display().to_string(),
                reason,
            },
            other => other.into(),
        })?;
        let config = setup::read_config_opening(&store)?
            .ok_or_else(|| Error::NotInitialised(dir.display().to_string()))?;
        Ok(Opening {
            dir: dir.to_path_buf(),
            config,
            store,
        })
    }
}

/// A node being opened: configuration known, store not recovered yet ([`Node::opening`]).
pub struct Opening {
    dir: PathBuf,
    config: NodeConfig,
    store: crate::store::Opening,
}

impl Opening {
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Replays the log and starts the driver.
    pub fn start(self, opts: NodeOptions) -> Result<Node, Error> {
        let Opening { dir, config, store } = self;
        let dir = dir.as_path();
        // A disk too full to replay the log gets the reserve's room first.
        if disk::free_bytes(dir).is_ok_and(|f| f < disk::RESERVE_BYTES)
            && disk::release_reserve(dir)
        {
            tracing::warn!(dir = %dir.display(), "the disk is nearly full: the reserve was released to recover the store");
        }
        let store = Arc::new(store.recover().map_err(|e| match e {
            StoreError::Damaged(reason) => Error::Damaged {
                dir: dir.display().to_string(),
                reason,
            },
            other => other.into(),
        })?);
        if let Err(e) = disk::make_reserve(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "no room for the reserve file: writes are refused until space is freed");
        }
        if let Err(e) = setup::ensure_identity_file(dir, &config) {
            tracing::warn!(error = %e, "the identity file (for peerconf repair) could not be written");
        }
        let (published, damaged) = Driver::load_published(&store)?;
        let published = Arc::new(published);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let driver = Driver::new(
            store.clone(),
            published.clone(),
            &config.node_id,
            opts.clock.clone(),
            setup::seeded(opts.seed),
        )
        .with_disk(dir);
        watch_disk(tx.clone(), published.clone(), Arc::downgrade(&store));
        let handle = std::thread::Builder::new()
            .name("peerconf-driver".into())
            .spawn(move || driver.run(rx))
            .map_err(|e| Error::io("cannot start the driver thread for", dir, e))?;
        if !damaged.is_empty() {
            // Damaged index rows are rebuilt before the node serves anything.
            let (reply, rx) = oneshot::channel();
            tx.blocking_send(Cmd::RepairRows {
                ids: damaged,
                reply: Some(reply),
            })
            .map_err(|_| Error::ShuttingDown)?;
            rx.blocking_recv().map_err(|_| Error::ShuttingDown)??;
        }
        Ok(Node {
            inner: Arc::new(Inner {
                store,
                config,
                data_dir: dir.to_path_buf(),
                published,
                drain: Default::default(),
                clock: opts.clock,
            }),
            tx,
            driver: Arc::new(std::sync::Mutex::new(Some(handle))),
            by: None,
        })
    }
}

impl Node {
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// What the driver published after its last commit: digest, members, settings, the feed.
    pub fn published(&self) -> &Arc<Published> {
        &self.inner.published
    }

    /// The store, for read paths and tests; writes go through the driver.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    async fn ask<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(f(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Answers a peer's request for documents (after committing what it changed).
    pub async fn serve(&self, peer: &str, req: Request) -> Result<Response, Error> {
        self.ask(|reply| Cmd::Serve {
            peer: peer.to_string(),
            req,
            reply,
        })
        .await
    }

    /// This node's sync messages for these documents, to `peer`.
    pub async fn sync_out(&self, peer: &str, ids: Vec<String>) -> Result<Msgs, Error> {
        self.ask(|reply| Cmd::SyncOut {
            peer: peer.to_string(),
            ids,
            reply,
        })
        .await
    }

    /// Applies a peer's answer and returns what follows.
    pub async fn sync_back(&self, peer: &str, msgs: Msgs, ids: Vec<String>) -> Result<Msgs, Error> {
        self.ask(|reply| Cmd::SyncBack {
            peer: peer.to_string(),
            msgs,
            ids,
            then: SyncThen::Reply(reply),
        })
        .await?
    }

    /// Hands a peer's answer to pushed messages to the driver without waiting for it: whatever
    /// the answer calls for is queued for that peer's link, as round `round + 1`.
    pub fn sync_back_later(&self, peer: &str, msgs: Msgs, ids: Vec<String>, round: usize) {
        let cmd = Cmd::SyncBack {
            peer: peer.to_string(),
            msgs,
            ids,
            then: SyncThen::Queue { round },
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }

    /// Stores documents fetched from a peer; returns how many were taken.
    pub async fn ingest(&self, peer: &str, docs: Msgs) -> Result<usize, Error> {
        // Loading each document and deriving its index row is most of the work, and needs
        // nothing from the store: it runs on a blocking thread, in parallel with the driver
        // storing the previous batch.
        let docs = tokio::task::spawn_blocking(move || {
            docs.into_iter()
                .map(|(id, bytes)| IngestDoc::prepare(id, bytes))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|_| Error::ShuttingDown)?;
        self.ask(|reply| Cmd::Ingest {
            peer: peer.to_string(),
            docs,
            reply,
        })
        .await?
    }

    /// An exchange with `peer` failed: its sync sessions forget what was in flight.
    pub async fn reset_peer(&self, peer: &str) {
        let _ = self
            .tx
            .send(Cmd::ResetPeer {
                peer: peer.to_string(),
            })
            .await;
    }

    /// Stores a join token (node-local).
    pub async fn put_token(&self, secret_hash: String, record: TokenRecord) -> Result<(), Error> {
        self.ask(|reply| Cmd::PutToken {
            secret_hash,
            record,
            reply,
        })
        .await?
    }

    /// The join tokens this node made: their IDs (a prefix of the stored hash, never the
    /// secret), expiry, and whether they were used or revoked.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        self.ask(|reply| Cmd::ListTokens { reply }).await?
    }

    /// Rotates the at-rest key now: every secret value this node holds is sealed again under a
    /// fresh key and the old keys are deleted, so values replaced or deleted since (still in
    /// freed database pages or old log records) can no longer be read from any file. The node
    /// also does this by itself within [`driver::ROTATE_EVERY_MS`] of forgetting a secret.
    pub async fn compact(&self) -> Result<crate::store::Rotation, Error> {
        self.ask(|reply| Cmd::Compact { reply: Some(reply) })
            .await?
    }

    /// Revokes the join token whose ID starts with `id` (hex, as listed): joins with it are
    /// refused from then on. Revoking one already revoked changes nothing.
    pub async fn revoke_token(&self, id: &str) -> Result<Revoked, Error> {
        self.ask(|reply| Cmd::RevokeToken {
            id: id.to_ascii_lowercase(),
            reply,
        })
        .await?
    }

    /// Consumes a join token and adds the member, atomically; answers the saved member list.
    pub async fn admit(
        &self,
        secret_hash: String,
        member: Member,
    ) -> Result<Result<Vec<u8>, AdmitError>, Error> {
        self.ask(|reply| Cmd::Admit {
            secret_hash,
            member,
            reply,
        })
        .await
    }

    /// Removes a member: from then on every node refuses its certificate.
    pub async fn remove_member(&self, id: &str) -> Result<(), Error> {
        self.ask(|reply| Cmd::RemoveMember {
            id: id.to_string(),
            reply,
        })
        .await?
    }

    /// The member list as committed, removed members included.
    pub fn members(&self) -> Vec<Member> {
        self.inner.published.members()
    }

    /// The drain switch of the client-facing service, for the embedding server.
    pub fn drain(&self) -> &drain::Drain {
        &self.inner.drain
    }

    /// The global settings as committed (schema defaults where never written).
    pub fn settings(&self) -> Arc<crdt_schema::typed::Settings> {
        self.inner.published.settings()
    }

    /// A feed of committed changes, local and remote.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.inner.published.events.subscribe()
    }

    /// Under load, a local write first waits (up to [`PEER_WAIT_MAX`]) while a link that takes
    /// messages has more than [`PEER_BACKLOG_MAX`] its peer has not answered. The node then
    /// takes writes at the pace its peers commit them, and a write reaches them within about a
    /// push, instead of a backlog growing for as long as the load lasts (with 64 writers on
    /// three nodes sharing two cores, member 3 fell up to 0.7 s behind). A peer that is down or
    /// failing takes no messages and is not waited for; a stuck one costs a write at most the
    /// cap. Pacing only: nothing depends on it for correctness.
    async fn pace(&self) {
        let t = std::time::Instant::now();
        let peers = &self.published().peers;
        if peers.caught_up(PEER_BACKLOG_MAX) {
            return;
        }
        peers.wait_for_room(PEER_BACKLOG_MAX, PEER_WAIT_MAX).await;
        self.published()
            .metrics
            .paced_seconds
            .inc_by(t.elapsed().as_secs_f64());
        self.published().metrics.paced.inc();
    }

    /// A handle to the same node whose writes are recorded as made by `principal` (history
    /// shows `by` and `from`): the admin API's caller, or the embedding server itself.
    pub fn acting_as(&self, principal: crate::core::entity::Principal) -> Node {
        Node {
            by: Some(Arc::new(principal)),
            ..self.clone()
        }
    }

    async fn write(&self, kind: Kind, name: &str, op: Op) -> Result<EntityState, Error> {
        self.pace().await;
        let by = self.by.as_deref().cloned();
        self.ask(|reply| Cmd::Write {
            kind,
            name: name.to_string(),
            op,
            by,
            reply,
        })
        .await?
    }

    /// Creates or replaces an entity. Returns it as it now reads, once durable.
    pub async fn put(&self, kind: Kind, name: &str, fields: Value) -> Result<Value, Error> {
        Ok(self.write(kind, name, Op::Put(fields)).await?.to_json())
    }

    /// Applies a JSON merge patch to an existing entity's fields.
    pub async fn patch(&self, kind: Kind, name: &str, patch: Value) -> Result<Value, Error> {
        Ok(self.write(kind, name, Op::Patch(patch)).await?.to_json())
    }

    /// Deletes an entity (a tombstone that replicates; the name can be created again).
    pub async fn delete(&self, kind: Kind, name: &str) -> Result<(), Error> {
        self.write(kind, name, Op::Delete).await.map(|_| ())
    }

    /// Writes a typed entity (secrets are not part of typed values and are left as they are).
    pub async fn put_typed<T: Entity>(&self, name: &str, value: &T) -> Result<(), Error> {
        let fields = serde_json::to_value(value).map_err(|e| Error::Typed {
            kind: T::KIND,
            reason: e.to_string(),
        })?;
        self.put(T::KIND, name, fields).await.map(|_| ())
    }

    /// A read met a damaged index row: the driver rebuilds it (the read fails; the next one
    /// gets the rebuilt row).
    fn repair(&self, e: Error) -> Error {
        if let Error::Store(StoreError::BadRow(id)) = &e {
            let _ = self.tx.try_send(Cmd::RepairRows {
                ids: vec![id.clone()],
                reply: None,
            });
        }
        e
    }

    /// An entity as JSON (`{"kind", "name", "fields", ...}`), or None if it does not exist.
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>, Error> {
        crdt_schema::validate_name(kind, name)?;
        let row = self
            .inner
            .store
            .index_get(&doc_id(kind, name))
            .map_err(|e| self.repair(e.into()))?;
        match row {
            Some(e) if e.alive => Ok(Some(parse_json(&e.json)?)),
            // A singleton never written reads as its defaults.
            _ if kind.singleton().is_some() => {
                let d = doc::genesis(kind);
                let mut state = doc::read(&d, kind, name)
                    .map_err(|e| Error::Store(StoreError::Corrupt(e.to_string())))?;
                state.alive = true;
                Ok(Some(state.to_json()))
            }
            _ => Ok(None),
        }
    }

    /// An entity as a typed value.
    pub fn get_typed<T: Entity>(&self, name: &str) -> Result<Option<T>, Error> {
        match self.get(T::KIND, name)? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v["fields"].clone())
                .map(Some)
                .map_err(|e| Error::Typed {
                    kind: T::KIND,
                    reason: e.to_string(),
                }),
        }
    }

    /// Every entity of a kind, by name.
    pub fn list(&self, kind: Kind) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut err = None;
        self.inner.store.index_scan(&prefix(kind), |_, e| {
            if e.alive {
                match parse_json(&e.json) {
                    Ok(v) => out.push(v),
                    Err(x) => err = Some(x),
                }
            }
        })?;
        err.map_or(Ok(out), Err)
    }

    /// Every entity of a kind as typed values, with their names.
    pub fn list_typed<T: Entity>(&self) -> Result<Vec<(String, T)>, Error> {
        self.list(T::KIND)?
            .into_iter()
            .map(|v| {
                let name = v["name"].as_str().unwrap_or_default().to_string();
                serde_json::from_value(v["fields"].clone())
                    .map(|t| (name, t))
                    .map_err(|e| Error::Typed {
                        kind: T::KIND,
                        reason: e.to_string(),
                    })
            })
            .collect()
    }

    /// A JSON array of every entity of a kind, built from the index without parsing it: the
    /// listing path of the admin API.
    pub fn list_json(&self, kind: Kind) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(4096);
        out.push(b'[');
        self.inner
            .store
            .index_scan(&prefix(kind), |_, e| {
                if e.alive {
                    if out.len() > 1 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&e.json);
                }
            })
            .map_err(|e| self.repair(e.into()))?;
        out.push(b']');
        Ok(out)
    }

    /// The changes of an entity, oldest first (deleted entities keep their history).
    pub fn history(&self, kind: Kind, name: &str) -> Result<Vec<HistoryEntry>, Error> {
        crdt_schema::validate_name(kind, name)?;
        let mut d = self
            .inner
            .store
            .load_doc(&doc_id(kind, name))?
            .ok_or_else(|| Error::not_found(kind, name))?;
        Ok(doc::history(&mut d))
    }

    /// Every entity with fields holding unresolved concurrent values.
    pub fn conflicts(&self) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut err = None;
        self.inner.store.index_scan("", |_, e| {
            if e.conflicts && e.alive {
                match parse_json(&e.json) {
                    Ok(v) => out.push(v),
                    Err(x) => err = Some(x),
                }
            }
        })?;
        err.map_or(Ok(out), Err)
    }

    /// The stored value of a secret field (a password hash, a private key), for the embedding
    /// server's own use: checking a login, loading a key. No admin read path calls this.
    pub fn secret(&self, kind: Kind, name: &str, field: &str) -> Result<Option<String>, Error> {
        crdt_schema::validate_name(kind, name)?;
        if !kind.field(field).is_some_and(|f| f.secret) {
            return Ok(None);
        }
        match self.inner.store.index_get(&doc_id(kind, name))? {
            Some(e) if e.alive => {}
            _ => return Ok(None),
        }
        Ok(self.inner.store.secret(&doc_id(kind, name), field)?)
    }

    /// Checks a user's or admin's password against its stored hash.
    pub fn verify_password(&self, kind: Kind, name: &str, clear: &str) -> Result<bool, Error> {
        Ok(self
            .secret(kind, name, "password")?
            .is_some_and(|h| entity::verify_password(clear, &h)))
    }

    /// Makes `name` an enabled SuperAdmin with `password`, creating the account if it does not
    /// exist: `peerconf admin reset`, run by the host's operator on a stopped node when no
    /// enabled SuperAdmin is left (two nodes cut off from each other can each demote one). The
    /// change replicates like any other; it is recorded as made by `admin-reset`.
    pub async fn reset_superadmin(&self, name: &str, password: &str) -> Result<(), Error> {
        let me = self.acting_as(crate::core::entity::Principal {
            name: "admin-reset".into(),
            from: None,
        });
        let fields =
            serde_json::json!({"role": "superadmin", "enabled": true, "password": password});
        if self.get(Kind::Admin, name)?.is_some() {
            me.patch(Kind::Admin, name, fields).await?;
        } else {
            me.put(Kind::Admin, name, fields).await?;
        }
        Ok(())
    }

    /// Number of documents stored (entities and tombstones).
    pub fn doc_count(&self) -> Result<u64, Error> {
        Ok(self.inner.store.doc_count()?)
    }

    /// Stops the driver after the writes already queued, and waits for it. Other clones of this
    /// node get `ShuttingDown` from then on.
    pub fn shutdown(self) {
        let Node { tx, driver, .. } = self;
        let _ = tx.blocking_send(Cmd::Shutdown);
        drop(tx);
        if let Some(h) = driver.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
    }
}

/// While the disk is full or the store needs reopening, asks the driver every second to look at
/// the disk again, so the node recovers once space is freed even if no write comes; otherwise,
/// once a secret was forgotten, asks it to rotate the at-rest key. Ends with the driver.
fn watch_disk(tx: mpsc::Sender<Cmd>, published: Arc<Published>, store: std::sync::Weak<Store>) {
    let spawned = std::thread::Builder::new()
        .name("peerconf-disk".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            if tx.is_closed() {
                return;
            }
            let Some(store) = store.upgrade() else {
                return;
            };
            if store.broken() || published.storage() == disk::Storage::Full {
                let _ = tx.try_send(Cmd::CheckDisk);
            } else if store.rotation_due() {
                // The driver rotates at most once per ROTATE_EVERY_MS.
                let _ = tx.try_send(Cmd::Compact { reply: None });
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the disk watcher: a full disk recovers at the next write");
    }
}

/// What refusing to start says, before the path.
const TOO_OPEN: &str = "refusing to start: permissions too open on";

/// Refuses to start on a data directory whose secrets other users could read or change, as ssh's
/// `StrictModes` does: the database, its log and its key file (sealed secrets and the key that
/// opens them), `node.json`
/// and the TLS keys must not be readable or writable by group or others, and the directory must
/// not be writable by them (they could replace any file). A directory only readable by them
/// (file names, not contents: every file in it is 0600) is reported and tolerated: copies made
/// with ordinary tools (backups, `cp -r`) are often 0755. The error names the path, its mode
/// and the `chmod` that fixes it.
pub fn check_permissions(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode_of = |path: &Path| -> Result<Option<u32>, Error> {
            match std::fs::metadata(path) {
                Ok(m) => Ok(Some(m.permissions().mode() & 0o7777)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("cannot read the permissions of", path, e)),
            }
        };
        let refuse = |path: &Path, mode: u32, who: &str, fix: u32| Error::Io {
            what: TOO_OPEN,
            path: path.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "mode {mode:04o} lets {who}; run: chmod {fix:o} {}",
                    path.display()
                ),
            ),
        };
        if let Some(mode) = mode_of(dir)? {
            if mode & 0o022 != 0 {
                return Err(refuse(dir, mode, "group or others write in it", 0o700));
            }
            if mode & 0o077 != 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:04o}"),
                    "the data directory is readable by group or others (its files are not): chmod 700 it");
            }
        }
        let db = dir.join(DB_FILE);
        let keys = match crate::store::secrets::KeyFile::beside(&db) {
            crate::store::secrets::KeyFile::Path(p) => Some(p),
            crate::store::secrets::KeyFile::Mem(_) => None,
        };
        let mut files = vec![crate::store::wal_path(&db), db, dir.join("node.json")];
        files.extend(keys);
        let tls = dir.join("tls");
        match std::fs::read_dir(&tls) {
            Ok(entries) => {
                let mut keys: Vec<_> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "key"))
                    .collect();
                keys.sort();
                files.extend(keys);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("cannot read the directory", &tls, e)),
        }
        for file in files {
            if let Some(mode) = mode_of(&file)? {
                if mode & 0o066 != 0 {
                    return Err(refuse(
                        &file,
                        mode,
                        "group or others read or write it",
                        0o600,
                    ));
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn prefix(kind: Kind) -> String {
    format!("{}/", kind.as_str())
}

fn parse_json(b: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(b)
        .map_err(|e| Error::Store(StoreError::Corrupt(format!("index json: {e}"))))
}
