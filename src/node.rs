//! A peerconf node, in-process: the embedding API and the driver that owns the store.
//!
//! One driver thread owns the write side of the store and the document cache. It takes every
//! write that is waiting, executes them in one redb transaction, commits (fsync), and only then
//! answers each caller and publishes the change events: an acknowledged write is durable, and a
//! failed commit answers every write of its batch with an error and leaves the cache without the
//! uncommitted documents.
//!
//! Reads never go through the driver: redb serves them from committed snapshots.

use crate::core::clock::Clock;
use crate::core::digest::Digest;
use crate::core::entity::{self, Op, WriteError};
use crate::core::members::{Member, MEMBERS_DOC};
use crate::core::proto::{Refusal, Request, Response};
use crate::driver::{Cmd, Driver, Msgs, SyncThen, TokenRecord};
use crate::store::{IndexEntry, Store, StoreError};
use crate::time::SystemClock;
use automerge::{ActorId, AutoCommit};
use crdt_schema::doc::{self, EntityState, HistoryEntry};
use crdt_schema::typed::Entity;
use crdt_schema::{doc_id, Kind, SchemaError};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Writes waiting for the driver before callers are made to wait: bounds memory under overload.
const WRITE_QUEUE_MAX: usize = 4096;
/// Documents kept loaded: memory stays flat whatever the entity count.
const DOC_CACHE_MAX: usize = 1024;
/// Change events buffered per subscriber; a slower subscriber gets `Lagged` and should re-list.
const EVENTS_MAX: usize = 4096;

pub const DB_FILE: &str = "peerconf.redb";
const CONFIG_KEY: &str = "config";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7700";
pub const DEFAULT_IPC_LISTEN: &str = "127.0.0.1:7701";

/// Node-local settings: stored beside the data, never replicated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeConfig {
    pub node_id: String,
    pub name: String,
    pub cluster_id: String,
    pub api_listen: SocketAddr,
    pub ipc_listen: SocketAddr,
    /// Where the other members reach this node's IPC port.
    pub ipc_advertise: String,
    pub created_wall_ms: i64,
    pub schema_version: u32,
}

/// Everything a node operation can fail with. A failed operation changed nothing stored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} is not an initialised peerconf data directory: run `peerconf init --data-dir {0}` first")]
    NotInitialised(String),
    #[error("{0} is already initialised (node {1})")]
    AlreadyInitialised(String, String),
    #[error("{0}")]
    Io(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl From<SchemaError> for Error {
    fn from(e: SchemaError) -> Self {
        Error::Write(WriteError::Schema(e))
    }
}

impl Error {
    pub fn not_found(kind: Kind, name: &str) -> Error {
        Error::Write(WriteError::NotFound {
            kind,
            name: name.to_string(),
        })
    }
}

/// Where a change came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "origin", rename_all = "lowercase")]
pub enum Origin {
    Local,
    Remote { peer: String },
}

/// One committed change of one entity, published after it is durable.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeEvent {
    pub kind: Kind,
    pub name: String,
    /// False when the change deleted the entity (or it is still deleted).
    pub alive: bool,
    #[serde(flatten)]
    pub origin: Origin,
}

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

/// Options of `peerconf init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub name: Option<String>,
    pub api_listen: SocketAddr,
    pub ipc_listen: SocketAddr,
    /// Defaults to `ipc_listen`.
    pub ipc_advertise: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            name: None,
            api_listen: DEFAULT_API_LISTEN.parse().expect("valid default"),
            ipc_listen: DEFAULT_IPC_LISTEN.parse().expect("valid default"),
            ipc_advertise: None,
        }
    }
}

/// State shared by the node's handles, the driver and the cluster tasks.
pub struct Shared {
    pub store: Arc<Store>,
    pub config: NodeConfig,
    pub events: broadcast::Sender<ChangeEvent>,
    pub data_dir: PathBuf,
    /// The replication digest of what is committed (the driver updates it after each commit).
    pub digest: Arc<Mutex<Digest>>,
    /// The member list as committed.
    pub members: watch::Sender<Vec<Member>>,
    /// Documents waiting to be pushed, per peer.
    pub peers: Mutex<HashMap<String, Arc<PeerQueue>>>,
    /// Documents being fetched from some peer right now: a node catching up fetches each
    /// document from one peer, not from all of them at once.
    pub fetching: Mutex<std::collections::HashSet<String>>,
    /// What this node knows of each peer's health.
    pub health: Mutex<std::collections::BTreeMap<String, crate::core::health::PeerHealth>>,
    /// The drain switch of the client-facing service.
    pub drain: crate::drain::Drain,
    pub clock: Arc<dyn Clock>,
}

impl Shared {
    pub fn peer_queues(&self) -> Vec<(String, Arc<PeerQueue>)> {
        self.peers
            .lock()
            .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Messages the driver made for one peer right after a commit, waiting for its replicator: the
/// most a peer that does not answer can hold before the driver only lists the documents instead.
pub const READY_MAX: usize = 4096;

/// A sync message waiting to be sent to a peer.
pub struct Ready {
    pub id: String,
    pub msg: Vec<u8>,
    /// 1 for a push; n + 1 for what the answer to a round-n message called for.
    pub round: usize,
    /// For a push, the heads it announces.
    pub pushed: Option<Vec<automerge::ChangeHash>>,
}

/// What waits to be pushed to one peer, and a wake-up for its replicator.
#[derive(Default)]
pub struct PeerQueue {
    /// Documents whose messages are still to be made.
    pub dirty: Mutex<BTreeSet<String>>,
    /// Sync messages made by the driver (pushes of local writes, and what peers' answers called
    /// for), in the order made.
    pub ready: Mutex<Vec<Ready>>,
    pub notify: tokio::sync::Notify,
    /// A replication cycle is wanted now (heartbeats showed the digests differ).
    pub cycle_now: std::sync::atomic::AtomicBool,
    /// The last exchange with the peer failed: the driver lists documents instead of making
    /// messages nobody will take.
    pub failing: std::sync::atomic::AtomicBool,
}

impl PeerQueue {
    /// Whether the driver should make this peer's messages now.
    pub fn wants_messages(&self) -> bool {
        !self.failing.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .ready
                .lock()
                .map(|r| r.len() < READY_MAX)
                .unwrap_or(false)
    }

    pub fn mark(&self, id: &str) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(id.to_string());
        }
        self.notify.notify_one();
    }

    pub fn add_ready(&self, msgs: Vec<Ready>) {
        if msgs.is_empty() {
            return;
        }
        if let Ok(mut r) = self.ready.lock() {
            r.extend(msgs);
        }
        self.notify.notify_one();
    }

    /// Takes up to `n` ready messages.
    pub fn take_ready(&self, n: usize) -> Vec<Ready> {
        let Ok(mut r) = self.ready.lock() else {
            return Vec::new();
        };
        let n = n.min(r.len());
        r.drain(..n).collect()
    }

    /// Takes up to `n` documents whose messages are still to be made.
    pub fn take(&self, n: usize) -> Vec<String> {
        let Ok(mut d) = self.dirty.lock() else {
            return Vec::new();
        };
        let ids: Vec<String> = d.iter().take(n).cloned().collect();
        for id in &ids {
            d.remove(id);
        }
        ids
    }

    pub fn request_cycle(&self) {
        self.cycle_now
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Documents whose push failed: their messages are made again later.
    pub fn put_back(&self, ids: impl IntoIterator<Item = String>) {
        if let Ok(mut d) = self.dirty.lock() {
            d.extend(ids);
        }
    }

    /// After a failed exchange: every ready message is dropped (its session was reset) and its
    /// document listed to be pushed again.
    pub fn requeue_ready(&self) {
        let msgs = self
            .ready
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        self.put_back(msgs.into_iter().map(|r| r.id));
    }
}

/// The software version this node advertises to peers. `PEERCONF_TEST_ADVERTISE_VERSION`
/// overrides it, for compatibility tests.
pub fn version() -> String {
    std::env::var("PEERCONF_TEST_ADVERTISE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

/// A running node. Cheap to clone; every clone talks to the same driver.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
    driver: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

fn make_private_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::Io(format!("cannot restrict {}: {e}", dir.display())))?;
    }
    Ok(())
}

fn restrict_file(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::Io(format!("cannot restrict {}: {e}", path.display())))?;
    }
    Ok(())
}

impl Node {
    /// Creates a node in `dir` and a new cluster around it: a cluster ID, the cluster CA, the
    /// node's certificate, and a member list holding this node. Fails if `dir` is initialised.
    pub fn init(
        dir: &Path,
        opts: &InitOptions,
        node_opts: &NodeOptions,
    ) -> Result<NodeConfig, Error> {
        let mut rng = seeded(node_opts.seed);
        let node_id = random_hex(&mut rng);
        let cluster_id = random_hex(&mut rng);
        let material = crate::tls::Material::new_cluster(&cluster_id, &node_id)
            .map_err(|e| Error::Io(e.to_string()))?;
        let cfg = new_config(node_id, cluster_id, opts, node_opts);
        create_dir(dir, &cfg, &material, None, node_opts)?;
        Ok(cfg)
    }

    /// Opens an initialised data directory and starts the node's driver. Must be called inside a
    /// tokio runtime only for the async operations; the driver is its own thread.
    pub fn open(dir: &Path, opts: NodeOptions) -> Result<Node, Error> {
        let db_path = dir.join(DB_FILE);
        if !db_path.exists() {
            return Err(Error::NotInitialised(dir.display().to_string()));
        }
        let store = Arc::new(Store::open(&db_path)?);
        let config =
            read_config(&store)?.ok_or_else(|| Error::NotInitialised(dir.display().to_string()))?;
        let (events, _) = broadcast::channel(EVENTS_MAX);
        let digest = crate::driver::Driver::load_digest(&store)?;
        let members: Vec<Member> = store
            .index_get(MEMBERS_DOC)?
            .and_then(|e| serde_json::from_slice(&e.json).ok())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            store: store.clone(),
            config: config.clone(),
            events,
            data_dir: dir.to_path_buf(),
            digest: Arc::new(Mutex::new(digest)),
            members: watch::Sender::new(members),
            peers: Mutex::new(HashMap::new()),
            fetching: Mutex::new(Default::default()),
            health: Mutex::new(Default::default()),
            drain: Default::default(),
            clock: opts.clock.clone(),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let mut rng = seeded(opts.seed);
        // A fresh actor for every incarnation: an actor must be one linear stream of changes, and
        // a restart (or a restore from backup) must never reuse one.
        let mut actor = [0u8; 16];
        rng.fill_bytes(&mut actor);
        let driver = Driver {
            store,
            cache: lru::LruCache::new(NonZeroUsize::new(DOC_CACHE_MAX).expect("nonzero")),
            actor: ActorId::from(actor.as_slice()),
            rng,
            clock: opts.clock,
            shared: shared.clone(),
            sessions: Default::default(),
            wrote_local: false,
        };
        let handle = std::thread::Builder::new()
            .name("peerconf-driver".into())
            .spawn(move || driver.run(rx))
            .map_err(|e| Error::Io(format!("cannot start the driver thread: {e}")))?;
        Ok(Node {
            shared,
            tx,
            driver: Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    async fn ask<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(f(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Answers a peer's replication request (after committing what it changed).
    pub async fn serve(&self, peer: &str, req: Request) -> Result<Response, Error> {
        self.ask(|reply| Cmd::Serve {
            peer: peer.to_string(),
            req,
            reply,
        })
        .await
    }

    pub async fn sync_out(&self, peer: &str, ids: Vec<String>) -> Result<Msgs, Error> {
        self.ask(|reply| Cmd::SyncOut {
            peer: peer.to_string(),
            ids,
            reply,
        })
        .await
    }

    pub async fn sync_back(&self, peer: &str, msgs: Msgs, ids: Vec<String>) -> Result<Msgs, Error> {
        self.ask(|reply| Cmd::SyncBack {
            peer: peer.to_string(),
            msgs,
            ids,
            then: SyncThen::Reply(reply),
        })
        .await?
        .map_err(Error::Io)
    }

    /// Hands a peer's answer to pushed messages to the driver without waiting for it: whatever
    /// the answer calls for is queued for that peer's replicator, as round `round + 1`.
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

    pub async fn ingest(&self, peer: &str, docs: Msgs) -> Result<usize, Error> {
        // Loading each document and deriving its index row is most of the work, and needs
        // nothing from the store: it runs on a blocking thread, in parallel with the driver
        // storing the previous batch.
        let docs = tokio::task::spawn_blocking(move || {
            docs.into_iter()
                .map(|(id, bytes)| crate::driver::IngestDoc::prepare(id, bytes))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Io(format!("preparing fetched documents: {e}")))?;
        self.ask(|reply| Cmd::Ingest {
            peer: peer.to_string(),
            docs,
            reply,
        })
        .await?
        .map_err(Error::Io)
    }

    pub async fn reset_peer(&self, peer: &str) {
        let _ = self
            .tx
            .send(Cmd::ResetPeer {
                peer: peer.to_string(),
            })
            .await;
    }

    pub async fn put_token(&self, secret_hash: String, record: TokenRecord) -> Result<(), Error> {
        self.ask(|reply| Cmd::PutToken {
            secret_hash,
            record,
            reply,
        })
        .await?
        .map_err(Error::Io)
    }

    pub async fn admit(
        &self,
        secret_hash: String,
        member: Member,
    ) -> Result<Result<Vec<u8>, (Refusal, String)>, Error> {
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
        .map_err(Error::Io)
    }

    /// The member list as committed, removed members included.
    pub fn members(&self) -> Vec<Member> {
        self.shared.members.borrow().clone()
    }

    /// The drain switch of the client-facing service, for the embedding server.
    pub fn drain(&self) -> &crate::drain::Drain {
        &self.shared.drain
    }

    /// The global settings that drive health checks.
    pub fn health_config(&self) -> crate::core::health::HealthConfig {
        let f = self
            .get(Kind::Settings, "global")
            .ok()
            .flatten()
            .map(|v| v["fields"].clone())
            .unwrap_or_default();
        let d = crate::core::health::HealthConfig::default();
        let get = |k: &str, dflt: u64| f[k].as_u64().unwrap_or(dflt);
        crate::core::health::HealthConfig {
            heartbeat_interval_ms: get("heartbeat_interval_ms", d.heartbeat_interval_ms),
            offline_timeout_ms: get("offline_timeout_ms", d.offline_timeout_ms),
            clock_drift_warn_ms: get("clock_drift_warn_ms", d.clock_drift_warn_ms),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.shared.data_dir
    }

    /// A feed of committed changes, local and remote.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.shared.events.subscribe()
    }

    async fn write(&self, kind: Kind, name: &str, op: Op) -> Result<EntityState, Error> {
        self.ask(|reply| Cmd::Write {
            kind,
            name: name.to_string(),
            op,
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
        let fields = serde_json::to_value(value).map_err(|e| Error::Io(e.to_string()))?;
        self.put(T::KIND, name, fields).await.map(|_| ())
    }

    /// An entity as JSON (`{"kind", "name", "fields", ...}`), or None if it does not exist.
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>, Error> {
        crdt_schema::validate_name(kind, name)?;
        match self.shared.store.index_get(&doc_id(kind, name))? {
            Some(e) if e.alive => Ok(Some(parse_json(&e.json)?)),
            // A singleton never written reads as its defaults.
            _ if kind.singleton().is_some() => {
                let d = doc::genesis(kind);
                let mut state = doc::read(&d, kind, name).map_err(|e| Error::Io(e.to_string()))?;
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
                .map_err(|e| Error::Store(StoreError::Corrupt(format!("{}: {e}", T::KIND)))),
        }
    }

    /// Every entity of a kind, by name.
    pub fn list(&self, kind: Kind) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut err = None;
        self.shared.store.index_scan(&prefix(kind), |_, e| {
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
                    .map_err(|e| Error::Store(StoreError::Corrupt(format!("{}: {e}", T::KIND))))
            })
            .collect()
    }

    /// A JSON array of every entity of a kind, built from the index without parsing it: the
    /// listing path of the admin API.
    pub fn list_json(&self, kind: Kind) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(4096);
        out.push(b'[');
        self.shared.store.index_scan(&prefix(kind), |_, e| {
            if e.alive {
                if out.len() > 1 {
                    out.push(b',');
                }
                out.extend_from_slice(&e.json);
            }
        })?;
        out.push(b']');
        Ok(out)
    }

    /// The changes of an entity, oldest first (deleted entities keep their history).
    pub fn history(&self, kind: Kind, name: &str) -> Result<Vec<HistoryEntry>, Error> {
        crdt_schema::validate_name(kind, name)?;
        let mut d = self
            .shared
            .store
            .load_doc(&doc_id(kind, name))?
            .ok_or_else(|| Error::not_found(kind, name))?;
        Ok(doc::history(&mut d))
    }

    /// Every entity with fields holding unresolved concurrent values.
    pub fn conflicts(&self) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        let mut err = None;
        self.shared.store.index_scan("", |_, e| {
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
        match self.shared.store.index_get(&doc_id(kind, name))? {
            Some(e) if e.alive => {}
            _ => return Ok(None),
        }
        Ok(self
            .shared
            .store
            .load_doc(&doc_id(kind, name))?
            .and_then(|d| doc::read_secret(&d, field)))
    }

    /// Checks a user's or admin's password against its stored hash.
    pub fn verify_password(&self, kind: Kind, name: &str, clear: &str) -> Result<bool, Error> {
        Ok(self
            .secret(kind, name, "password")?
            .is_some_and(|h| entity::verify_password(clear, &h)))
    }

    /// Number of documents stored (entities and tombstones).
    pub fn doc_count(&self) -> Result<u64, Error> {
        Ok(self.shared.store.doc_count()?)
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

fn prefix(kind: Kind) -> String {
    format!("{}/", kind.as_str())
}

fn parse_json(b: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(b)
        .map_err(|e| Error::Store(StoreError::Corrupt(format!("index json: {e}"))))
}

fn random_hex(rng: &mut ChaCha8Rng) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    hex::encode(b)
}

pub(crate) fn new_config(
    node_id: String,
    cluster_id: String,
    opts: &InitOptions,
    node_opts: &NodeOptions,
) -> NodeConfig {
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("node-{}", &node_id[..8]));
    NodeConfig {
        ipc_advertise: opts
            .ipc_advertise
            .clone()
            .unwrap_or_else(|| opts.ipc_listen.to_string()),
        node_id,
        name,
        cluster_id,
        api_listen: opts.api_listen,
        ipc_listen: opts.ipc_listen,
        created_wall_ms: node_opts.clock.wall_ms(),
        schema_version: crdt_schema::SCHEMA_VERSION,
    }
}

/// Creates a data directory: the database with the node-local settings and the member list, and
/// the TLS files. `members_doc` is the saved member list a joiner received; None starts a new one
/// holding this node.
pub(crate) fn create_dir(
    dir: &Path,
    cfg: &NodeConfig,
    material: &crate::tls::Material,
    members_doc: Option<&[u8]>,
    node_opts: &NodeOptions,
) -> Result<(), Error> {
    make_private_dir(dir)?;
    let db_path = dir.join(DB_FILE);
    let store = Store::open(&db_path)?;
    restrict_file(&db_path)?;
    if let Some(existing) = read_config(&store)? {
        return Err(Error::AlreadyInitialised(
            dir.display().to_string(),
            existing.node_id,
        ));
    }
    crate::tls::TlsFiles::new(dir)
        .write(material)
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut members = match members_doc {
        Some(b) => AutoCommit::load(b)
            .map_err(|e| Error::Io(format!("the member list received is corrupt: {e}")))?,
        None => {
            let mut d = crate::core::members::genesis();
            let mut rng = seeded(node_opts.seed.map(|s| s ^ 1));
            let mut actor = [0u8; 16];
            rng.fill_bytes(&mut actor);
            d.set_actor(ActorId::from(actor.as_slice()));
            let me = Member {
                id: cfg.node_id.clone(),
                name: cfg.name.clone(),
                addr: cfg.ipc_advertise.clone(),
                version: version(),
                removed: false,
            };
            crate::core::members::upsert(&mut d, &me, node_opts.clock.wall_ms())
                .map_err(|e| Error::Io(e.to_string()))?;
            d
        }
    };
    let entry = crate::driver::entry_for(MEMBERS_DOC, &mut members).map_err(Error::Io)?;
    let mut txn = store.write()?;
    txn.put_doc(MEMBERS_DOC, &mut members, entry, None, &[])?;
    txn.local_put(
        CONFIG_KEY,
        &serde_json::to_vec(cfg).expect("config serializes"),
    )?;
    txn.commit(None)?;
    Ok(())
}

fn seeded(seed: Option<u64>) -> ChaCha8Rng {
    match seed {
        Some(s) => ChaCha8Rng::seed_from_u64(s),
        None => ChaCha8Rng::seed_from_u64(rand::rng().random()),
    }
}

fn read_config(store: &Store) -> Result<Option<NodeConfig>, Error> {
    match store.local_get(CONFIG_KEY)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Store(StoreError::Corrupt(format!("node config: {e}")))),
    }
}

/// SHA-256 over the sorted heads: what the replication digest compares.
pub fn heads_hash(doc: &mut AutoCommit) -> [u8; 32] {
    let mut heads = doc.get_heads();
    heads.sort();
    let mut h = Sha256::new();
    for x in heads {
        h.update(x.0);
    }
    h.finalize().into()
}

/// The index row of a document as it now stands.
pub fn index_entry(doc: &mut AutoCommit, state: &EntityState) -> IndexEntry {
    IndexEntry {
        alive: state.alive,
        conflicts: !state.conflicts.is_empty(),
        chunks: 0,
        heads_hash: heads_hash(doc),
        json: serde_json::to_vec(&state.to_json()).expect("json serializes"),
    }
}
