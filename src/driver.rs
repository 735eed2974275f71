//! The driver: the one thread that owns the write side of the store, the document cache and the
//! replication sessions. It takes every command waiting (local writes, peers' sync messages,
//! fetched documents, joins), runs them in one redb transaction, commits (durably, through the
//! log), and only then answers each caller, publishes events and wakes the replicators for what it
//! received: persist before you answer. Local writes' pushes alone leave before the commit (see
//! ARCHITECTURE.md, "Push before commit").

use crate::core::clock::Clock;
use crate::core::digest::Digest;
use crate::core::entity::{self, Context, Op, World, WriteError};
use crate::core::members::{self, Member, MEMBERS_DOC};
use crate::core::proto::{Refusal, Request, Response, SYNC_ROUNDS_MAX};
use crate::core::repl::{self, Dir, Docs, Sessions};
use crate::node::{heads_hash, index_entry, ChangeEvent, Error, Origin, Ready, Shared};
use crate::store::{IndexEntry, Store, StoreError, WriteTxn};
use automerge::{ActorId, AutoCommit};
use crdt_schema::doc::{self, EntityState};
use crdt_schema::{doc_id, Kind};
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Commands executed in one transaction: bounds the latency of one commit.
pub const BATCH_MAX: usize = 512;

pub type Msgs = Vec<(String, Vec<u8>)>;

/// A join token as stored (node-local): only a hash of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub expires_wall_ms: i64,
    pub used: bool,
}

pub fn token_key(secret_hash: &str) -> String {
    format!("token/{secret_hash}")
}

/// Where the messages that follow a peer's answer go.
pub enum SyncThen {
    /// Back to the caller, who carries on the exchange.
    Reply(oneshot::Sender<Result<Msgs, String>>),
    /// Into the peer's ready queue, as this round (the answer was to round `round`); dropped past
    /// [`SYNC_ROUNDS_MAX`], the replication cycle repairs whatever is left.
    Queue { round: usize },
}

pub enum Cmd {
    Write {
        kind: Kind,
        name: String,
        op: Op,
        reply: oneshot::Sender<Result<EntityState, Error>>,
    },
    /// A peer's replication request (sync or fetch).
    Serve {
        peer: String,
        req: Request,
        reply: oneshot::Sender<Response>,
    },
    /// Our side's sync messages for these documents, to a peer.
    SyncOut {
        peer: String,
        ids: Vec<String>,
        reply: oneshot::Sender<Msgs>,
    },
    /// A peer's answer to our sync messages, and what to do with the next messages (none when
    /// the exchange is over).
    SyncBack {
        peer: String,
        msgs: Msgs,
        ids: Vec<String>,
        then: SyncThen,
    },
    /// Saved documents fetched from a peer.
    Ingest {
        peer: String,
        docs: Vec<IngestDoc>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// An exchange with the peer failed.
    ResetPeer { peer: String },
    /// Stop after the commands already queued.
    Shutdown,
    /// Stores a join token.
    PutToken {
        secret_hash: String,
        record: TokenRecord,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Consumes a join token and adds the member, atomically. Answers the saved member list.
    Admit {
        secret_hash: String,
        member: Member,
        reply: oneshot::Sender<Result<Vec<u8>, (Refusal, String)>>,
    },
    /// Marks a member removed.
    RemoveMember {
        id: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

pub struct Driver {
    pub store: Arc<Store>,
    pub cache: lru::LruCache<String, AutoCommit>,
    pub actor: ActorId,
    pub rng: ChaCha8Rng,
    pub clock: Arc<dyn Clock>,
    pub shared: Arc<Shared>,
    pub sessions: Sessions,
    /// Node-local rows were written in this batch (they need a commit too).
    pub wrote_local: bool,
}

/// A whole saved document fetched from a peer, with what the driver would derive from it
/// (heads and index row) computed beforehand, off the driver's thread ([`IngestDoc::prepare`]):
/// storing a document new here is then two inserts.
pub struct IngestDoc {
    pub id: String,
    pub bytes: Vec<u8>,
    /// None when the bytes do not load (the driver's own path reports why).
    pub derived: Option<(Vec<automerge::ChangeHash>, IndexEntry)>,
}

impl IngestDoc {
    /// Loads the bytes and derives the document's heads and index row. Pure and CPU-bound: run
    /// it on a blocking thread.
    pub fn prepare(id: String, bytes: Vec<u8>) -> IngestDoc {
        let derived = if repl::valid_doc_id(&id) {
            AutoCommit::load(&bytes).ok().and_then(|mut d| {
                let entry = entry_for(&id, &mut d).ok()?;
                Some((d.get_heads(), entry))
            })
        } else {
            None
        };
        IngestDoc { id, bytes, derived }
    }
}

/// What became of a fetched document offered to [`Driver::store_new`].
enum StoreNew {
    Stored,
    /// Storing failed: the batch is poisoned.
    Failed,
    /// Not new here, or not derived: it goes through the merging path.
    Merge(IngestDoc),
}

/// One transaction's worth of state.
struct Batch {
    txn: WriteTxn,
    touched: HashMap<String, AutoCommit>,
    /// Documents changed in this batch and where the change came from.
    changed: BTreeMap<String, Origin>,
    /// Index rows written, for the digest after commit.
    entries: BTreeMap<String, IndexEntry>,
    /// Whether any peer exists to push to (pushes are made only then).
    has_peers: bool,
    /// What each local write changed, in order, to push: document, heads after, changes.
    pushes: Vec<(String, Vec<automerge::ChangeHash>, Vec<u8>)>,
    /// Messages that peers' answers called for: peer, messages, round.
    follow_ups: Vec<(String, Msgs, usize)>,
    /// Saved bytes that documents new to this node were loaded from (stored as they are).
    loaded: HashMap<String, Vec<u8>>,
    /// The heads of what is stored of each touched document (what a chunk is saved after).
    stored: HashMap<String, Vec<automerge::ChangeHash>>,
    /// Set when a change was applied that the batch's prelogged record may not hold (a
    /// document had changes queued for missing dependencies): the batch logs in full.
    unlogged: bool,
    poisoned: Option<String>,
}

/// The record of a batch made only of sync messages from peers, known before it runs: the
/// changes the messages carry. None for any other batch (its changes are known only once made).
fn received_changes(cmds: &[Cmd]) -> Option<Vec<crate::store::LogOp>> {
    let mut ops = Vec::new();
    for c in cmds {
        let msgs = match c {
            Cmd::Serve {
                req: crate::core::proto::Request::Sync { msgs },
                ..
            } => msgs,
            Cmd::SyncBack { msgs, .. } => msgs,
            _ => return None,
        };
        for (id, bytes) in msgs {
            if let Ok(m) = automerge::sync::Message::decode(bytes) {
                for chunk in m.changes.iter() {
                    ops.push(crate::store::LogOp::Changes(id.clone(), chunk.to_vec()));
                }
            }
        }
    }
    (!ops.is_empty()).then_some(ops)
}

enum Deferred {
    /// The command has no answer.
    Nothing,
    Write(
        oneshot::Sender<Result<EntityState, Error>>,
        Result<EntityState, Error>,
    ),
    Resp(oneshot::Sender<Response>, Response),
    Msgs(oneshot::Sender<Msgs>, Msgs),
    MsgsR(oneshot::Sender<Result<Msgs, String>>, Result<Msgs, String>),
    Count(
        oneshot::Sender<Result<usize, String>>,
        Result<usize, String>,
    ),
    Unit(oneshot::Sender<Result<(), String>>, Result<(), String>),
    Admit(
        oneshot::Sender<Result<Vec<u8>, (Refusal, String)>>,
        Result<Vec<u8>, (Refusal, String)>,
    ),
}

impl Deferred {
    fn send(self, commit: &Result<(), String>) {
        let failed = |e: &String| format!("commit failed: {e}");
        match (self, commit) {
            (Deferred::Nothing, _) => {}
            (Deferred::Write(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Write(r, v), Err(e)) => drop(r.send(match v {
                Ok(_) => Err(Error::Store(StoreError::Redb(failed(e)))),
                Err(x) => Err(x),
            })),
            (Deferred::Resp(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Resp(r, _), Err(e)) => drop(r.send(Response::Refused {
                reason: Refusal::Internal,
                message: failed(e),
            })),
            (Deferred::Msgs(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Msgs(r, _), Err(_)) => drop(r.send(Vec::new())),
            (Deferred::MsgsR(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::MsgsR(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
            (Deferred::Count(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Count(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
            (Deferred::Unit(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Unit(r, _), Err(e)) => drop(r.send(Err(failed(e)))),
            (Deferred::Admit(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Admit(r, _), Err(e)) => drop(r.send(Err((Refusal::Internal, failed(e))))),
        }
    }
}

/// The documents as replication sees them, inside one batch.
struct BatchDocs<'a> {
    cache: &'a mut lru::LruCache<String, AutoCommit>,
    actor: &'a ActorId,
    batch: &'a mut Batch,
    created: BTreeSet<String>,
    changed: BTreeSet<String>,
}

impl BatchDocs<'_> {
    fn load(&mut self, id: &str) -> Result<bool, String> {
        if self.batch.touched.contains_key(id) {
            return Ok(true);
        }
        let d = match self.cache.pop(id) {
            Some(d) => Some(d),
            None => self
                .batch
                .txn
                .load_doc(id)
                .map_err(|e| e.to_string())?
                .map(|mut d| {
                    d.set_actor(self.actor.clone());
                    d
                }),
        };
        match d {
            Some(mut d) => {
                self.batch.stored.insert(id.to_string(), d.get_heads());
                self.batch.touched.insert(id.to_string(), d);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl Docs for BatchDocs<'_> {
    fn get(&mut self, id: &str) -> Result<Option<&mut AutoCommit>, String> {
        if self.load(id)? {
            Ok(self.batch.touched.get_mut(id))
        } else {
            Ok(None)
        }
    }
    fn get_or_create(&mut self, id: &str) -> Result<&mut AutoCommit, String> {
        if !self.load(id)? {
            self.created.insert(id.to_string());
            self.batch.touched.insert(
                id.to_string(),
                AutoCommit::new().with_actor(self.actor.clone()),
            );
        }
        Ok(self.batch.touched.get_mut(id).expect("just loaded"))
    }
    fn insert(&mut self, id: &str, mut doc: AutoCommit) {
        doc.set_actor(self.actor.clone());
        self.batch.touched.insert(id.to_string(), doc);
        self.changed.insert(id.to_string());
    }
    fn insert_loaded(&mut self, id: &str, doc: AutoCommit, saved: &[u8]) {
        self.insert(id, doc);
        self.batch.loaded.insert(id.to_string(), saved.to_vec());
    }
    fn changed(&mut self, id: &str) {
        self.changed.insert(id.to_string());
    }
    fn unlogged(&mut self) {
        self.batch.unlogged = true;
    }
    fn saved(&mut self, id: &str) -> Result<Option<Vec<u8>>, String> {
        if let Some(d) = self.batch.touched.get_mut(id) {
            return Ok(Some(d.save()));
        }
        self.batch.txn.doc_bytes(id).map_err(|e| e.to_string())
    }
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

/// The index row of any stored document (entities and the member list).
pub fn entry_for(id: &str, d: &mut AutoCommit) -> Result<IndexEntry, String> {
    if id == MEMBERS_DOC {
        let list = members::read(d);
        return Ok(IndexEntry {
            alive: true,
            conflicts: false,
            chunks: 0,
            heads_hash: heads_hash(d),
            json: serde_json::to_vec(&list).expect("json serializes"),
        });
    }
    let (kind, name) = crdt_schema::parse_doc_id(id).map_err(|e| e.to_string())?;
    let state = doc::read(d, kind, name).map_err(|e| e.to_string())?;
    Ok(index_entry(d, &state))
}

impl Driver {
    /// Builds the digest from the index: every stored document with its heads hash.
    pub fn load_digest(store: &Store) -> Result<Digest, StoreError> {
        let mut digest = Digest::default();
        store.index_scan("", |id, e| digest.set(id, e.heads_hash))?;
        Ok(digest)
    }

    pub fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Cmd>) {
        let mut stopping = false;
        while !stopping {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let before = batch.len();
            batch.retain(|c| !matches!(c, Cmd::Shutdown));
            stopping = batch.len() != before;
            self.run_batch(batch);
        }
        // Whatever is still queued is answered with ShuttingDown when the channel drops.
    }

    fn run_batch(&mut self, cmds: Vec<Cmd>) {
        // Changes received from peers start going to the log before the batch runs (io_uring), so
        // the disk write overlaps applying them instead of following it.
        let prelogged = received_changes(&cmds).and_then(|ops| self.store.prelog(&ops));
        // Bulk ingestion (a new node seeded with whole documents) commits straight to redb: its
        // records would fill the log at once, and every byte would be written twice.
        let bulk = cmds.iter().any(|c| matches!(c, Cmd::Ingest { .. }));
        let txn = match self.store.write() {
            Ok(t) => t,
            Err(e) => {
                let err = Err(e.to_string());
                for c in cmds {
                    self.defer_failed(c, &e.to_string()).send(&err);
                }
                return;
            }
        };
        let mut b = Batch {
            txn,
            touched: HashMap::new(),
            changed: BTreeMap::new(),
            entries: BTreeMap::new(),
            pushes: Vec::new(),
            has_peers: !self.shared.peer_queues().is_empty(),
            follow_ups: Vec::new(),
            loaded: HashMap::new(),
            stored: HashMap::new(),
            unlogged: false,
            poisoned: None,
        };
        let mut deferred = Vec::with_capacity(cmds.len());
        for c in cmds {
            deferred.push(self.exec(&mut b, c));
        }
        let Batch {
            txn,
            touched,
            changed,
            entries,
            pushes,
            follow_ups,
            poisoned,
            unlogged,
            ..
        } = b;
        let prelogged = prelogged.filter(|_| !unlogged);
        let dirty = !entries.is_empty() || !changed.is_empty() || poisoned.is_some();
        // Local writes go to peers while their own record is being written, so the two disk
        // writes overlap instead of following each other. A crash (or a failed commit) here can
        // leave a peer holding a change this node lost: it comes back by sync, and the actor that
        // made it is never used again (fresh per process start, replaced after a failed commit),
        // so no other change can take its place. See ARCHITECTURE.md, "Push before commit".
        if poisoned.is_none() && self.store.writable() {
            self.push_local(&changed, pushes);
        }
        let commit = match poisoned {
            Some(e) => Err(e),
            // A batch that changed nothing does not pay for an fsync.
            None if !dirty && !self.wrote_local => Ok(()),
            None if bulk => txn.commit_to_redb().map_err(|e| e.to_string()),
            None => txn.commit(prelogged).map_err(|e| e.to_string()),
        };
        self.wrote_local = false;
        // Peers and callers first: caching the documents (and dropping those it evicts) is not
        // on anyone's path.
        match &commit {
            Ok(()) => self.after_commit(&changed, &entries, follow_ups),
            // The touched documents may hold changes that are not durable: they are dropped, so
            // the next use reloads what is committed.
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the batch is refused");
                self.new_actor();
            }
        }
        for d in deferred {
            d.send(&commit);
        }
        if commit.is_ok() {
            for (id, d) in touched {
                self.cache.put(id, d);
            }
        }
    }

    /// After a failed commit: the batch's changes may already be at peers (pushed before the
    /// commit) while this node lost them, so the actor that made them must never make another
    /// change (the next one would reuse their sequence numbers). Cached documents carry the old
    /// actor, so the cache goes too.
    fn new_actor(&mut self) {
        let mut a = [0u8; 16];
        self.rng.fill_bytes(&mut a);
        self.actor = ActorId::from(a.as_slice());
        self.cache.clear();
    }

    /// The answer to a command that could not run because no transaction could start.
    fn defer_failed(&mut self, c: Cmd, why: &str) -> Deferred {
        match c {
            Cmd::Write { reply, .. } => Deferred::Write(
                reply,
                Err(Error::Store(StoreError::Redb(format!(
                    "cannot start a transaction: {why}"
                )))),
            ),
            Cmd::Serve { reply, .. } => Deferred::Resp(
                reply,
                Response::Refused {
                    reason: Refusal::Internal,
                    message: String::new(),
                },
            ),
            Cmd::SyncOut { reply, .. } => Deferred::Msgs(reply, Vec::new()),
            Cmd::SyncBack {
                then: SyncThen::Reply(reply),
                ..
            } => Deferred::MsgsR(reply, Err(String::new())),
            Cmd::SyncBack { .. } => Deferred::Nothing,
            Cmd::Ingest { reply, .. } => Deferred::Count(reply, Err(String::new())),
            Cmd::ResetPeer { .. } | Cmd::Shutdown => Deferred::Nothing,
            Cmd::PutToken { reply, .. } | Cmd::RemoveMember { reply, .. } => {
                Deferred::Unit(reply, Err(String::new()))
            }
            Cmd::Admit { reply, .. } => {
                Deferred::Admit(reply, Err((Refusal::Internal, String::new())))
            }
        }
    }

    fn after_commit(
        &mut self,
        changed: &BTreeMap<String, Origin>,
        entries: &BTreeMap<String, IndexEntry>,
        follow_ups: Vec<(String, Msgs, usize)>,
    ) {
        if let Ok(mut d) = self.shared.digest.lock() {
            for (id, e) in entries {
                d.set(id, e.heads_hash);
            }
        }
        self.queue_follow_ups(follow_ups);
        for (id, origin) in changed {
            if id == MEMBERS_DOC {
                if let Some(e) = entries.get(id) {
                    if let Ok(list) = serde_json::from_slice::<Vec<Member>>(&e.json) {
                        self.shared.members.send_replace(list);
                    }
                }
                continue;
            }
            if let (Ok((kind, name)), Some(e)) = (crdt_schema::parse_doc_id(id), entries.get(id)) {
                let _ = self.shared.events.send(ChangeEvent {
                    kind,
                    name: name.to_string(),
                    alive: e.alive,
                    origin: origin.clone(),
                });
            }
        }
    }

    /// Hands this batch's local writes to every peer's replicator, as push messages made here
    /// (the replicator sends them at once instead of first asking the driver for them). A peer
    /// that is not answering, or has too much waiting, gets the document IDs instead, and its
    /// messages are made when it is ready; so do local changes that are not writes (the member
    /// list).
    fn push_local(
        &mut self,
        changed: &BTreeMap<String, Origin>,
        pushes: Vec<(String, Vec<automerge::ChangeHash>, Vec<u8>)>,
    ) {
        let peers = self.shared.peer_queues();
        let pushed: BTreeSet<&str> = pushes.iter().map(|(id, _, _)| id.as_str()).collect();
        for (id, origin) in changed {
            if *origin == Origin::Local && !pushed.contains(id.as_str()) {
                for (_, q) in &peers {
                    q.mark(id);
                }
            }
        }
        if pushes.is_empty() {
            return;
        }
        let msgs: Vec<(String, Vec<automerge::ChangeHash>, Vec<u8>)> = pushes
            .into_iter()
            .map(|(id, heads, changes)| {
                let m = Sessions::push_message(heads.clone(), changes);
                (id, heads, m)
            })
            .collect();
        for (peer, q) in &peers {
            if !q.wants_messages() {
                for (id, _, _) in &msgs {
                    q.mark(id);
                }
                continue;
            }
            let mut ready = Vec::with_capacity(msgs.len());
            for (id, heads, m) in &msgs {
                self.sessions.pushed(peer, id, heads);
                ready.push(Ready {
                    id: id.clone(),
                    msg: m.clone(),
                    round: 1,
                    pushed: Some(heads.clone()),
                });
            }
            q.add_ready(ready);
        }
    }

    fn queue_follow_ups(&mut self, follow_ups: Vec<(String, Msgs, usize)>) {
        if follow_ups.is_empty() {
            return;
        }
        let peers: HashMap<String, Arc<crate::node::PeerQueue>> =
            self.shared.peer_queues().into_iter().collect();
        for (peer, msgs, round) in follow_ups {
            if let Some(q) = peers.get(&peer) {
                q.add_ready(
                    msgs.into_iter()
                        .map(|(id, msg)| Ready {
                            id,
                            msg,
                            round,
                            pushed: None,
                        })
                        .collect(),
                );
            }
        }
    }

    /// Persists the documents a replication step changed; drops those it only created.
    fn persist(
        &mut self,
        b: &mut Batch,
        created: BTreeSet<String>,
        changed: BTreeSet<String>,
        origin: &Origin,
    ) {
        for id in created.difference(&changed) {
            b.touched.remove(id);
        }
        for id in changed {
            let Some(d) = b.touched.get_mut(&id) else {
                continue;
            };
            let saved = b.loaded.remove(&id);
            let stored = b.stored.get(&id).cloned().unwrap_or_default();
            let r = entry_for(&id, d).and_then(|entry| {
                b.txn
                    .put_doc(&id, d, entry.clone(), saved, &stored)
                    .map(|_| entry)
                    .map_err(|e| e.to_string())
            });
            b.stored.insert(id.clone(), d.get_heads());
            match r {
                Ok(entry) => {
                    b.entries.insert(id.clone(), entry);
                    b.changed.insert(id, origin.clone());
                }
                Err(e) => {
                    tracing::warn!(doc = %id, error = %e, "a document from a peer cannot be stored");
                    b.touched.remove(&id);
                    b.poisoned.get_or_insert(e);
                }
            }
        }
    }

    /// Stores a fetched document that is new to this node as it came, with the heads and index
    /// row derived ahead: no Automerge work on the driver's thread, and nothing cached (a new
    /// node takes in every document once). A document the transaction already holds (stored
    /// before, or earlier in this batch), or one not derived, is given back to be merged.
    fn store_new(b: &mut Batch, doc: IngestDoc, origin: &Origin) -> StoreNew {
        match b.txn.index_get(&doc.id) {
            Ok(None) => {}
            Ok(Some(_)) => return StoreNew::Merge(doc),
            Err(e) => {
                b.poisoned.get_or_insert(e.to_string());
                return StoreNew::Failed;
            }
        }
        let IngestDoc { id, bytes, derived } = doc;
        let Some((heads, entry)) = derived else {
            return StoreNew::Merge(IngestDoc {
                id,
                bytes,
                derived: None,
            });
        };
        match b.txn.put_new_doc(&id, bytes, entry.clone()) {
            Ok(()) => {
                b.stored.insert(id.clone(), heads);
                b.entries.insert(id.clone(), entry);
                b.changed.insert(id, origin.clone());
                StoreNew::Stored
            }
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "a document from a peer cannot be stored");
                b.poisoned.get_or_insert(e.to_string());
                StoreNew::Failed
            }
        }
    }

    fn with_docs<T>(
        &mut self,
        b: &mut Batch,
        origin: Origin,
        f: impl FnOnce(&mut BatchDocs<'_>, &mut Sessions) -> T,
    ) -> T {
        let mut docs = BatchDocs {
            cache: &mut self.cache,
            actor: &self.actor,
            batch: b,
            created: BTreeSet::new(),
            changed: BTreeSet::new(),
        };
        let out = f(&mut docs, &mut self.sessions);
        let (created, changed) = (docs.created, docs.changed);
        self.persist(b, created, changed, &origin);
        out
    }

    fn exec(&mut self, b: &mut Batch, c: Cmd) -> Deferred {
        match c {
            Cmd::Write {
                kind,
                name,
                op,
                reply,
            } => Deferred::Write(reply, self.write(b, kind, &name, &op)),
            Cmd::Serve { peer, req, reply } => {
                let digest = self.shared.digest.clone();
                let origin = Origin::Remote { peer: peer.clone() };
                let resp = self.with_docs(b, origin, |docs, sessions| {
                    let mut d = digest.lock().expect("digest lock");
                    repl::serve(req, &peer, &mut d, sessions, docs)
                });
                Deferred::Resp(reply, resp)
            }
            Cmd::SyncOut { peer, ids, reply } => {
                let msgs = self.with_docs(b, Origin::Local, |docs, sessions| {
                    sessions.generate(docs, &peer, Dir::Out, &ids)
                });
                Deferred::Msgs(reply, msgs)
            }
            Cmd::SyncBack {
                peer,
                msgs,
                ids,
                then,
            } => {
                let origin = Origin::Remote { peer: peer.clone() };
                let next = self.with_docs(b, origin, |docs, sessions| {
                    sessions.receive(docs, &peer, Dir::Out, msgs);
                    sessions.generate(docs, &peer, Dir::Out, &ids)
                });
                match then {
                    SyncThen::Reply(reply) => Deferred::MsgsR(reply, Ok(next)),
                    SyncThen::Queue { round } => {
                        if round < SYNC_ROUNDS_MAX && !next.is_empty() {
                            b.follow_ups.push((peer, next, round + 1));
                        }
                        Deferred::Nothing
                    }
                }
            }
            Cmd::Ingest { peer, docs, reply } => {
                let origin = Origin::Remote { peer };
                let mut n = 0;
                let mut merge = Vec::new();
                for doc in docs {
                    match Self::store_new(b, doc, &origin) {
                        StoreNew::Stored => n += 1,
                        StoreNew::Failed => {}
                        StoreNew::Merge(doc) => merge.push(doc),
                    }
                }
                // Documents this node already has (or that did not load ahead) merge as usual.
                n += self.with_docs(b, origin, |d, _| {
                    merge
                        .into_iter()
                        .filter(|x| repl::ingest(d, &x.id, &x.bytes).is_ok())
                        .count()
                });
                Deferred::Count(reply, Ok(n))
            }
            Cmd::ResetPeer { peer } => {
                self.sessions.reset_peer(&peer);
                Deferred::Nothing
            }
            Cmd::Shutdown => Deferred::Nothing,
            Cmd::PutToken {
                secret_hash,
                record,
                reply,
            } => {
                let r = b
                    .txn
                    .local_put(
                        &token_key(&secret_hash),
                        &serde_json::to_vec(&record).expect("json"),
                    )
                    .map_err(|e| e.to_string());
                self.wrote_local = true;
                Deferred::Unit(reply, r)
            }
            Cmd::Admit {
                secret_hash,
                member,
                reply,
            } => {
                let r = self.admit(b, &secret_hash, &member);
                Deferred::Admit(reply, r)
            }
            Cmd::RemoveMember { id, reply } => {
                let r = self.update_members(b, |list| {
                    let mut m = list
                        .iter()
                        .find(|m| m.id == id && !m.removed)
                        .cloned()
                        .ok_or_else(|| format!("node {id} is not a member of this cluster"))?;
                    m.removed = true;
                    Ok(m)
                });
                Deferred::Unit(reply, r.map(|_| ()))
            }
        }
    }

    fn admit(
        &mut self,
        b: &mut Batch,
        secret_hash: &str,
        member: &Member,
    ) -> Result<Vec<u8>, (Refusal, String)> {
        let key = token_key(secret_hash);
        let internal = |e: String| (Refusal::Internal, e);
        let rec: Option<TokenRecord> = b
            .txn
            .local_get(&key)
            .map_err(|e| internal(e.to_string()))?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let now = self.clock.wall_ms();
        match rec {
            None => {
                return Err((
                    Refusal::Token,
                    "the join token is not valid for this cluster member (wrong or mistyped token, or one made by another node)".into(),
                ))
            }
            Some(r) if r.used => {
                return Err((Refusal::Token, "the join token was already used: create a new one".into()))
            }
            Some(r) if r.expires_wall_ms <= now => {
                return Err((
                    Refusal::Token,
                    format!(
                        "the join token expired {} s ago: create a new one",
                        (now - r.expires_wall_ms) / 1000
                    ),
                ))
            }
            Some(mut r) => {
                r.used = true;
                b.txn
                    .local_put(&key, &serde_json::to_vec(&r).expect("json"))
                    .map_err(|e| internal(e.to_string()))?;
                self.wrote_local = true;
            }
        }
        let m = member.clone();
        self.update_members(b, move |_| Ok(m)).map_err(internal)?;
        let d = b
            .touched
            .get_mut(MEMBERS_DOC)
            .ok_or_else(|| internal("member list missing".into()))?;
        Ok(d.save())
    }

    /// Applies `f`'s member to the member list, as a local change.
    fn update_members(
        &mut self,
        b: &mut Batch,
        f: impl FnOnce(&[Member]) -> Result<Member, String>,
    ) -> Result<Member, String> {
        let now = self.clock.wall_ms();
        let actor = self.actor.clone();
        let mut docs = BatchDocs {
            cache: &mut self.cache,
            actor: &actor,
            batch: b,
            created: BTreeSet::new(),
            changed: BTreeSet::new(),
        };
        let d = docs.get_or_create(MEMBERS_DOC)?;
        if d.get_heads().is_empty() {
            let mut g = members::genesis();
            d.merge(&mut g).map_err(|e| e.to_string())?;
        }
        let m = f(&members::read(d))?;
        let changed = members::upsert(d, &m, now).map_err(|e| e.to_string())?;
        let mut changed_set = docs.changed.clone();
        let created = docs.created.clone();
        if changed || !created.is_empty() {
            changed_set.insert(MEMBERS_DOC.to_string());
        }
        self.persist(b, created, changed_set, &Origin::Local);
        Ok(m)
    }

    fn write(
        &mut self,
        b: &mut Batch,
        kind: Kind,
        name: &str,
        op: &Op,
    ) -> Result<EntityState, Error> {
        crdt_schema::validate_name(kind, name)?;
        let id = doc_id(kind, name);
        let mut d = match b.touched.remove(&id).or_else(|| self.cache.pop(&id)) {
            Some(d) => d,
            None => match b.txn.load_doc(&id)? {
                Some(mut d) => {
                    d.set_actor(self.actor.clone());
                    d
                }
                None => {
                    let mut d = doc::genesis(kind);
                    d.set_actor(self.actor.clone());
                    d
                }
            },
        };
        let before = d.get_heads();
        let mut salt = [0u8; 16];
        self.rng.fill_bytes(&mut salt);
        let ctx = Context {
            node_id: &self.shared.config.node_id,
            wall_ms: self.clock.wall_ms(),
            salt,
        };
        let outcome = match entity::execute(&mut d, kind, name, op, &TxnWorld { txn: &b.txn }, &ctx)
        {
            Ok(o) => o,
            Err(e) => {
                b.touched.insert(id, d);
                return Err(e.into());
            }
        };
        if outcome.changed {
            let entry = index_entry(&mut d, &outcome.state);
            // What the peers need comes back: a document new here whole (the full save just
            // stored, which loads fastest), otherwise the changes this write made.
            let changes = match b.txn.put_doc(&id, &mut d, entry.clone(), None, &before) {
                Ok(c) => c,
                Err(e) => {
                    // The document holds a change the transaction may not: never reuse it, and
                    // commit nothing of this batch.
                    b.poisoned.get_or_insert(e.to_string());
                    return Err(e.into());
                }
            };
            let heads = d.get_heads();
            b.stored.insert(id.clone(), heads.clone());
            // A node with no peers makes no pushes.
            if b.has_peers {
                b.pushes.push((id.clone(), heads, changes));
            }
            b.entries.insert(id.clone(), entry);
            b.changed.insert(id.clone(), Origin::Local);
        }
        b.touched.insert(id, d);
        Ok(outcome.state)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Kind, Node, NodeOptions};
    use serde_json::json;

    /// A failed commit's changes may already be at peers (pushed before the commit): the actor
    /// that made them must never make another change, or the next one would reuse their sequence
    /// numbers with other contents.
    #[test]
    fn a_failed_commit_retires_the_actor_that_made_its_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = |seed| NodeOptions {
            seed: Some(seed),
            ..NodeOptions::default()
        };
        Node::init(dir.path(), &Default::default(), &opts(1)).expect("init");
        let node = Node::open(dir.path(), opts(2)).expect("open");
        let store = node.shared().store.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let site = |dir: &str| json!({"protocols": ["sftp"], "root_dir": dir});
        rt.block_on(async {
            node.put(Kind::Site, "s1", site("/a"))
                .await
                .expect("first write");
            store.fail_commits(true);
            let err = node
                .put(Kind::Site, "s1", site("/b"))
                .await
                .expect_err("the commit fails");
            assert!(err.to_string().contains("injected"), "{err}");
            store.fail_commits(false);
            node.put(Kind::Site, "s1", site("/c"))
                .await
                .expect("third write");
        });
        let mut d = store
            .load_doc(&crdt_schema::doc_id(Kind::Site, "s1"))
            .expect("load")
            .expect("stored");
        let changes = d.get_changes(&[]);
        let first = changes
            .iter()
            .find(|c| c.seq() == 1 && c.actor_id() != changes[0].actor_id())
            .expect("the first write's change");
        let last = changes.last().expect("changes");
        assert_eq!(
            last.seq(),
            1,
            "the write after the failed commit starts a new actor (it reused actor {} at seq {})",
            last.actor_id(),
            last.seq()
        );
        assert_ne!(first.actor_id(), last.actor_id());
        assert_eq!(changes.len(), 3, "genesis and the two committed writes");
        let now = node.get(Kind::Site, "s1").expect("read").expect("exists");
        assert_eq!(now["fields"]["root_dir"], json!("/c"));
    }

    /// A new node stores fetched documents as they came, with index rows derived off the
    /// driver's thread: it must read exactly what the peer reads, a second copy must merge as a
    /// no-op, and a document that does not load must be refused without losing the others.
    #[test]
    fn fetched_documents_read_back_as_on_the_peer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (da, db) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let opts = |seed| NodeOptions {
            seed: Some(seed),
            ..NodeOptions::default()
        };
        Node::init(da.path(), &Default::default(), &opts(1)).expect("init a");
        Node::init(db.path(), &Default::default(), &opts(3)).expect("init b");
        let a = Node::open(da.path(), opts(2)).expect("open a");
        let b = Node::open(db.path(), opts(4)).expect("open b");
        let site = |dir: &str| json!({"protocols": ["sftp"], "root_dir": dir});
        let mut ids = Vec::new();
        rt.block_on(async {
            for i in 0..20 {
                let name = format!("s{i}");
                a.put(Kind::Site, &name, site("/a")).await.expect("put");
                ids.push(crdt_schema::doc_id(Kind::Site, &name));
            }
            a.patch(Kind::Site, "s3", json!({"root_dir": "/b"}))
                .await
                .expect("patch");
            a.delete(Kind::Site, "s4").await.expect("delete");
        });
        let mut docs: Vec<(String, Vec<u8>)> = ids
            .iter()
            .map(|id| {
                let mut d = a.shared().store.load_doc(id).expect("load").expect("doc");
                (id.clone(), d.save())
            })
            .collect();
        docs.push((
            crdt_schema::doc_id(Kind::Site, "broken"),
            b"not automerge".to_vec(),
        ));
        let n = rt.block_on(b.ingest("peer", docs.clone())).expect("ingest");
        assert_eq!(n, 20, "every document but the broken one");
        assert_eq!(b.get(Kind::Site, "broken").expect("read"), None);
        let entries = |node: &Node| {
            let mut v = Vec::new();
            node.shared()
                .store
                .index_scan("site/", |id, mut e| {
                    // How many chunks a document is stored in is this node's business.
                    e.chunks = 0;
                    v.push((id.to_string(), e))
                })
                .expect("scan");
            v
        };
        let before = entries(&b);
        assert!(
            before == entries(&a),
            "the index rows differ from the peer's"
        );
        for i in 0..20 {
            let name = format!("s{i}");
            assert_eq!(
                b.get(Kind::Site, &name).expect("read b"),
                a.get(Kind::Site, &name).expect("read a"),
                "{name}"
            );
        }
        assert_eq!(b.get(Kind::Site, "s4").expect("read"), None, "deleted");
        rt.block_on(b.ingest("peer", docs)).expect("ingest again");
        assert!(entries(&b) == before, "a second copy changed the index");
    }
}
