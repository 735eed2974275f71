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
use crate::core::entity::{self, Context, Op, World, WriteError};
use crate::store::{IndexEntry, Store, StoreError, WriteTxn};
use crate::time::SystemClock;
use automerge::{ActorId, AutoCommit};
use crdt_schema::doc::{self, EntityState, HistoryEntry};
use crdt_schema::typed::Entity;
use crdt_schema::{doc_id, Kind, SchemaError};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Writes waiting for the driver before callers are made to wait: bounds memory under overload.
const WRITE_QUEUE_MAX: usize = 4096;
/// Writes executed in one transaction: bounds the latency of one commit.
const BATCH_MAX: usize = 512;
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
    pub api_listen: SocketAddr,
    pub ipc_listen: SocketAddr,
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
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            name: None,
            api_listen: DEFAULT_API_LISTEN.parse().expect("valid default"),
            ipc_listen: DEFAULT_IPC_LISTEN.parse().expect("valid default"),
        }
    }
}

enum Cmd {
    Write {
        kind: Kind,
        name: String,
        op: Op,
        reply: oneshot::Sender<Result<EntityState, Error>>,
    },
}

struct Shared {
    store: Arc<Store>,
    config: NodeConfig,
    events: broadcast::Sender<ChangeEvent>,
    data_dir: PathBuf,
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
    /// Creates a node in `dir`: a fresh node ID and the node-local settings. Fails if `dir` is
    /// already initialised.
    pub fn init(
        dir: &Path,
        opts: &InitOptions,
        node_opts: &NodeOptions,
    ) -> Result<NodeConfig, Error> {
        make_private_dir(dir)?;
        let db_path = dir.join(DB_FILE);
        let existed = db_path.exists();
        let store = Store::open(&db_path)?;
        restrict_file(&db_path)?;
        if let Some(cfg) = read_config(&store)? {
            return Err(Error::AlreadyInitialised(
                dir.display().to_string(),
                cfg.node_id,
            ));
        }
        let _ = existed;
        let mut rng = seeded(node_opts.seed);
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let node_id = hex::encode(id);
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| format!("node-{}", &node_id[..8]));
        let cfg = NodeConfig {
            node_id,
            name,
            api_listen: opts.api_listen,
            ipc_listen: opts.ipc_listen,
            created_wall_ms: node_opts.clock.wall_ms(),
            schema_version: crdt_schema::SCHEMA_VERSION,
        };
        let mut txn = store.write()?;
        txn.local_put(
            CONFIG_KEY,
            &serde_json::to_vec(&cfg).expect("config serializes"),
        )?;
        txn.commit()?;
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
        let shared = Arc::new(Shared {
            store: store.clone(),
            config: config.clone(),
            events: events.clone(),
            data_dir: dir.to_path_buf(),
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
            node_id: config.node_id.clone(),
            events,
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

    pub fn data_dir(&self) -> &Path {
        &self.shared.data_dir
    }

    /// A feed of committed changes, local and remote.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.shared.events.subscribe()
    }

    async fn write(&self, kind: Kind, name: &str, op: Op) -> Result<EntityState, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Write {
                kind,
                name: name.to_string(),
                op,
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
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

struct Driver {
    store: Arc<Store>,
    cache: lru::LruCache<String, AutoCommit>,
    actor: ActorId,
    rng: ChaCha8Rng,
    clock: Arc<dyn Clock>,
    node_id: String,
    events: broadcast::Sender<ChangeEvent>,
}

/// What the write path sees of the rest of the store: the uncommitted transaction, so a batch sees
/// its own earlier writes.
struct TxnWorld<'a> {
    txn: &'a WriteTxn,
}

impl World for TxnWorld<'_> {
    fn exists(&self, kind: Kind, name: &str) -> Result<bool, WriteError> {
        self.txn
            .index_get(&doc_id(kind, name))
            .map(|e| e.is_some_and(|e| e.alive))
            .map_err(|e| WriteError::Internal(e.to_string()))
    }

    fn password_min_length(&self) -> Result<usize, WriteError> {
        let default = 8;
        let entry = self
            .txn
            .index_get(&doc_id(Kind::Security, "global"))
            .map_err(|e| WriteError::Internal(e.to_string()))?;
        Ok(entry
            .filter(|e| e.alive)
            .and_then(|e| serde_json::from_slice::<Value>(&e.json).ok())
            .and_then(|v| v["fields"]["password_min_length"].as_u64())
            .map_or(default, |n| n as usize))
    }
}

type Reply = oneshot::Sender<Result<EntityState, Error>>;

impl Driver {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.run_batch(batch);
        }
    }

    fn run_batch(&mut self, batch: Vec<Cmd>) {
        let mut txn = match self.store.write() {
            Ok(t) => t,
            Err(e) => {
                for Cmd::Write { reply, .. } in batch {
                    let _ = reply.send(Err(Error::Io(e.to_string())));
                }
                return;
            }
        };
        let mut touched: HashMap<String, AutoCommit> = HashMap::new();
        let mut results: Vec<(Reply, Result<EntityState, Error>, Option<ChangeEvent>)> =
            Vec::with_capacity(batch.len());
        let mut poisoned = None;
        for Cmd::Write {
            kind,
            name,
            op,
            reply,
        } in batch
        {
            let r = self.execute(&mut txn, &mut touched, kind, &name, &op);
            let (res, ev) = match r {
                Ok((state, changed)) => {
                    let ev = changed.then(|| ChangeEvent {
                        kind,
                        name: name.clone(),
                        alive: state.alive,
                        origin: Origin::Local,
                    });
                    (Ok(state), ev)
                }
                Err(Error::Store(e)) => {
                    // A storage failure mid-transaction: the transaction may be half-written,
                    // so none of the batch is committed.
                    poisoned = Some(e.to_string());
                    (Err(Error::Store(e)), None)
                }
                Err(e) => (Err(e), None),
            };
            results.push((reply, res, ev));
        }
        let committed = match poisoned {
            Some(e) => Err(StoreError::Redb(e)),
            None => txn.commit(),
        };
        match committed {
            Ok(()) => {
                for (id, d) in touched {
                    self.cache.put(id, d);
                }
                for (reply, res, ev) in results {
                    if let Some(ev) = ev {
                        let _ = self.events.send(ev);
                    }
                    let _ = reply.send(res);
                }
            }
            Err(e) => {
                // The touched documents hold changes that are not durable: drop them, so the
                // next use reloads what is committed.
                tracing::error!(error = %e, "commit failed; the batch is refused");
                for (reply, res, _) in results {
                    let _ = reply.send(match res {
                        Ok(_) => Err(Error::Store(StoreError::Redb(format!(
                            "commit failed: {e}"
                        )))),
                        Err(x) => Err(x),
                    });
                }
            }
        }
    }

    /// Takes a document out of the cache, the batch, or the store; or makes its genesis.
    fn take_doc(
        &mut self,
        txn: &WriteTxn,
        touched: &mut HashMap<String, AutoCommit>,
        kind: Kind,
        id: &str,
    ) -> Result<AutoCommit, Error> {
        if let Some(d) = touched.remove(id) {
            return Ok(d);
        }
        if let Some(d) = self.cache.pop(id) {
            return Ok(d);
        }
        let mut d = match txn.load_doc(id)? {
            Some(d) => d,
            None => doc::genesis(kind),
        };
        d.set_actor(self.actor.clone());
        Ok(d)
    }

    fn execute(
        &mut self,
        txn: &mut WriteTxn,
        touched: &mut HashMap<String, AutoCommit>,
        kind: Kind,
        name: &str,
        op: &Op,
    ) -> Result<(EntityState, bool), Error> {
        crdt_schema::validate_name(kind, name)?;
        let id = doc_id(kind, name);
        let mut d = self.take_doc(txn, touched, kind, &id)?;
        let mut salt = [0u8; 16];
        self.rng.fill_bytes(&mut salt);
        let ctx = Context {
            node_id: &self.node_id,
            wall_ms: self.clock.wall_ms(),
            salt,
        };
        let result = entity::execute(&mut d, kind, name, op, &TxnWorld { txn }, &ctx);
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                touched.insert(id, d);
                return Err(e.into());
            }
        };
        if outcome.changed {
            let entry = index_entry(&mut d, &outcome.state);
            if let Err(e) = txn.put_doc(&id, &mut d, entry) {
                // The document holds a change the transaction does not: never reuse it.
                return Err(e.into());
            }
        }
        touched.insert(id, d);
        Ok((outcome.state, outcome.changed))
    }
}
