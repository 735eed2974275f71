//! Layer: node (imports core, store, net).
//!
//! The driver: the one owner of the write side of the store, the document cache and the
//! replication sessions. It takes every command waiting (local writes, peers' sync messages,
//! fetched documents, joins) and runs them as one batch in one redb transaction.
//!
//! What a batch does is returned as values whose types fix the order ([`Driver::step`] carries
//! them out; the simulator calls the same `step`):
//! 1. [`Driver::execute`] runs the commands and returns [`Staged`]: the pushes of the batch's
//!    local writes, which may leave now ("push before commit", see ARCHITECTURE.md), and the
//!    [`Pending`] commit. Nothing else of the batch can reach anyone yet: the answers are inside
//!    `Pending`, which has no way to send them.
//! 2. [`Pending::commit`] makes the batch durable (through the write-ahead log) and returns
//!    [`Committed`]. Only now are the digest, the member list and the settings published.
//! 3. [`Committed::finish`] answers each caller, queues follow-up messages for peers and
//!    publishes the change events.
//!
//! A failed commit answers every command with an error (a local write that was already pushed
//! with [`Error::Unknown`]), retires the actor that made the batch's changes and empties the
//! cache: nothing uncommitted is served or built upon.

use super::error::Error;
use super::events::{ChangeEvent, Origin};
use super::metrics::{NodeMetrics, PeerLabel};
use super::state::{LinkWork, PeerInbox, Published};
use crate::core::clock::Clock;
use crate::core::digest::Digest;
use crate::core::entity::{self, Context, Op, World, WriteError};
use crate::core::index::{self, row_for, IndexEntry};
use crate::core::link::{Msgs, Ready};
use crate::core::members::{self, Member, MEMBERS_DOC};
use crate::core::proto::{Refusal, Request, Response, SYNC_ROUNDS_MAX};
use crate::core::repl::{self, Dir, Docs, DocsError, Sessions};
use crate::store::{LogOp, Prelogged, Rotation, Store, StoreError, WriteTxn};
use automerge::{ActorId, AutoCommit, ChangeHash, ReadDoc, ScalarValue, Value as AmValue, ROOT};
use crdt_schema::doc::{self, EntityState};
use crdt_schema::typed::{self as typed, Security, Settings};
use crdt_schema::{doc_id, Kind};
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Commands executed in one transaction: bounds the latency of one commit.
pub const BATCH_MAX: usize = 512;
/// Documents kept loaded: memory stays flat whatever the entity count.
pub const DOC_CACHE_MAX: usize = 1024;

/// A join token as stored (node-local): only a hash of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub expires_wall_ms: i64,
    pub used: bool,
}

pub fn token_key(secret_hash: &str) -> String {
    format!("token/{secret_hash}")
}

/// A token record as the driver stores it: [`TokenRecord`] and whether it was revoked (absent,
/// so false, in records written before tokens could be revoked).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    expires_wall_ms: i64,
    used: bool,
    #[serde(default)]
    revoked: bool,
}

/// The one rule on a presented join token: unknown (wrong, mistyped, another node's) gets one
/// answer that names nothing; a token this node made gets the reason it cannot be used.
fn judge_token(
    rec: Option<StoredToken>,
    secret_hash: &str,
    now_wall_ms: i64,
) -> Result<StoredToken, AdmitError> {
    match rec {
        None => Err(AdmitError::Token(
            "the join token is not valid for this cluster member (wrong or mistyped token, or one made by another node)".into(),
        )),
        Some(r) if r.revoked => Err(AdmitError::Token(format!(
            "the join token was revoked (token ID {}): create a new one",
            token_id(secret_hash)
        ))),
        Some(r) if r.used => Err(AdmitError::Token(
            "the join token was already used: create a new one".into(),
        )),
        Some(r) if r.expires_wall_ms <= now_wall_ms => Err(AdmitError::Token(format!(
            "the join token expired {} s ago: create a new one",
            now_wall_ms.saturating_sub(r.expires_wall_ms) / 1000
        ))),
        Some(r) => Ok(r),
    }
}

/// A join token's stored row (`stored`, as read from the node-local table) judged by
/// [`judge_token`], read-only: what a member checks before it reads anything else of a join
/// request. The driver judges again, atomically, when it consumes the token.
pub fn check_token(
    stored: Option<&[u8]>,
    secret_hash: &str,
    now_wall_ms: i64,
) -> Result<(), AdmitError> {
    let rec = stored.and_then(|b| serde_json::from_slice::<StoredToken>(b).ok());
    judge_token(rec, secret_hash, now_wall_ms).map(|_| ())
}

/// The node-local row listing the hashes of the tokens this node made (the store has no scan of
/// node-local rows): what `peerconf token list` shows. Tokens made before it existed are not in
/// it, and cannot be listed.
const TOKENS_KEY: &str = "tokens";

/// Hex digits of a token's stored hash that make its ID: enough to tell a node's tokens apart,
/// nothing of the secret (the hash of a 256-bit secret).
pub const TOKEN_ID_LEN: usize = 12;

/// How long a token that expired stays listed.
const TOKEN_LISTED_AFTER_EXPIRY_MS: i64 = 7 * 24 * 3600 * 1000;

/// The ID of a token, from the hash of its secret.
pub fn token_id(secret_hash: &str) -> String {
    secret_hash.chars().take(TOKEN_ID_LEN).collect()
}

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    /// A join may still use it.
    Valid,
    Used,
    Expired,
    Revoked,
}

/// A join token as listed: its ID (a prefix of the stored hash, never the secret), its expiry
/// and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub expires_wall_ms: i64,
    pub used: bool,
    pub revoked: bool,
    pub state: TokenState,
}

impl TokenInfo {
    fn of(secret_hash: &str, t: &StoredToken, now_ms: i64) -> TokenInfo {
        TokenInfo {
            id: token_id(secret_hash),
            expires_wall_ms: t.expires_wall_ms,
            used: t.used,
            revoked: t.revoked,
            state: if t.revoked {
                TokenState::Revoked
            } else if t.used {
                TokenState::Used
            } else if t.expires_wall_ms <= now_ms {
                TokenState::Expired
            } else {
                TokenState::Valid
            },
        }
    }
}

/// What revoking the token whose ID starts with a prefix found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// That token, now revoked (or revoked already).
    Token(TokenInfo),
    NotFound,
    /// The prefix starts this many tokens' IDs: nothing was revoked.
    Ambiguous(usize),
}

/// How the member list document breaks its layout (flat registers `<node id>/<field>` and
/// `_kind`, see `core::members`). Messages name the key, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembersLayoutError {
    #[error("{MEMBERS_DOC}: not a member list (its _kind register is missing, another, or written more than once)")]
    NotMembers,
    #[error("{MEMBERS_DOC}: key {key:?} is not <node id>/<field>")]
    Key { key: String },
    #[error("{MEMBERS_DOC}.{key}: holds {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{MEMBERS_DOC}.{key}: the document cannot be read: {reason}")]
    Unreadable { key: String, reason: String },
}

/// Why a document a peer changed or sent is not stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Layout(#[from] doc::LayoutError),
    #[error(transparent)]
    Members(#[from] MembersLayoutError),
    #[error(transparent)]
    Row(#[from] crate::core::index::RowError),
}

/// What a value is (for errors; never the value itself).
fn am_type(v: &AmValue<'_>) -> &'static str {
    match v {
        AmValue::Object(_) => "an object",
        AmValue::Scalar(s) => match s.as_ref() {
            ScalarValue::Boolean(_) => "a boolean",
            ScalarValue::Str(_) => "a string",
            ScalarValue::Int(_) | ScalarValue::Uint(_) => "an integer",
            _ => "another scalar",
        },
    }
}

/// Checks the member list's layout: `_kind` is `_members`, every other key `<node id>/<field>`
/// holding a scalar (never an object: two nodes must never create competing containers), and
/// the fields the list reads of the types it reads them as. Fields it does not know yet are
/// left to the version that writes them.
pub fn check_members_layout(d: &AutoCommit) -> Result<(), MembersLayoutError> {
    let unreadable = |key: &str, e: automerge::AutomergeError| MembersLayoutError::Unreadable {
        key: key.chars().take(128).collect(),
        reason: e.to_string(),
    };
    let kinds = d
        .get_all(ROOT, "_kind")
        .map_err(|e| unreadable("_kind", e))?;
    let is_members = matches!(
        kinds.as_slice(),
        [(AmValue::Scalar(s), _)] if matches!(s.as_ref(), ScalarValue::Str(k) if k.as_str() == "_members")
    );
    if !is_members {
        return Err(MembersLayoutError::NotMembers);
    }
    for key in d.keys(ROOT) {
        if key == "_kind" {
            continue;
        }
        let short = || key.chars().take(128).collect::<String>();
        let Some((id, field)) = key.split_once('/') else {
            return Err(MembersLayoutError::Key { key: short() });
        };
        if id.is_empty() || field.is_empty() {
            return Err(MembersLayoutError::Key { key: short() });
        }
        let expected = match field {
            "name" | "addr" | "version" | "key" | "admission" => Some("a string"),
            "removed" => Some("a boolean"),
            _ => None,
        };
        for (v, _) in d
            .get_all(ROOT, key.as_str())
            .map_err(|e| unreadable(&key, e))?
        {
            let ok = match (&v, expected) {
                (AmValue::Object(_), _) => false,
                (AmValue::Scalar(_), None) => true,
                (AmValue::Scalar(s), Some("a boolean")) => {
                    matches!(s.as_ref(), ScalarValue::Boolean(_))
                }
                (AmValue::Scalar(s), Some(_)) => matches!(s.as_ref(), ScalarValue::Str(_)),
            };
            if !ok {
                return Err(MembersLayoutError::WrongType {
                    key: short(),
                    expected: expected.unwrap_or("a scalar"),
                    found: am_type(&v),
                });
            }
        }
    }
    Ok(())
}

/// Checks a document a peer changed or sent before it is stored: the layout of its kind (the
/// member list: its own), and that it reads as its kind.
pub fn check_received(id: &str, d: &mut AutoCommit) -> Result<IndexEntry, Invalid> {
    if id == MEMBERS_DOC {
        check_members_layout(d)?;
    } else {
        let (kind, _) =
            crdt_schema::parse_doc_id(id).map_err(|e| crate::core::index::RowError::BadId {
                id: id.chars().take(200).collect(),
                reason: e.to_string(),
            })?;
        doc::check_layout(d, kind)?;
    }
    Ok(row_for(id, d)?)
}

/// Where the messages that follow a peer's answer go.
pub enum SyncThen {
    /// Back to the caller, who carries on the exchange.
    Reply(oneshot::Sender<Result<Msgs, Error>>),
    /// Into the peer's ready queue, as round `round + 1`; dropped past [`SYNC_ROUNDS_MAX`], the
    /// replication cycle repairs whatever is left.
    Queue { round: usize },
}

/// Why a join was refused by the member asked.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The token is wrong, used or expired; the message says which.
    #[error("{0}")]
    Token(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the member list cannot be updated: {0}")]
    Members(String),
}

pub enum Cmd {
    Write {
        kind: Kind,
        name: String,
        op: Op,
        /// Who asked for it (recorded in the change).
        by: Option<entity::Principal>,
        reply: oneshot::Sender<Result<EntityState, Error>>,
    },
    /// A peer's request for documents (sync or fetch).
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
    /// A peer's answer to our sync messages, and what to do with the next messages.
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
        reply: oneshot::Sender<Result<usize, Error>>,
    },
    /// An exchange with the peer failed: clear in-flight sync state.
    ResetPeer { peer: String },
    /// Stop after the commands already queued.
    Shutdown,
    /// Rebuilds damaged index rows from their documents (answered when done, if asked).
    RepairRows {
        ids: Vec<String>,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    /// Nothing but the check of the disk every batch starts with (sent while the disk is full
    /// or the store needs reopening, so that recovery does not wait for a write).
    CheckDisk,
    /// Stores a join token.
    PutToken {
        secret_hash: String,
        record: TokenRecord,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Lists the join tokens this node made (their IDs, never their secrets).
    ListTokens {
        reply: oneshot::Sender<Result<Vec<TokenInfo>, Error>>,
    },
    /// Revokes the join token whose ID starts with `id` (lowercase hex): a join with it is
    /// refused from then on.
    RevokeToken {
        id: String,
        reply: oneshot::Sender<Result<Revoked, Error>>,
    },
    /// Consumes a join token and adds the member, atomically. Answers the saved member list.
    Admit {
        secret_hash: String,
        member: Member,
        reply: oneshot::Sender<Result<Vec<u8>, AdmitError>>,
    },
    /// Marks a member removed.
    RemoveMember {
        id: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    /// Rotates the at-rest key so that secret values replaced or deleted become unreadable in
    /// every file ([`Store::rotate_keys`]). Asked by an operator (`reply` is some: it always
    /// runs) or by the store watcher when a secret was forgotten (at most once per
    /// [`ROTATE_EVERY_MS`]).
    Compact {
        reply: Option<oneshot::Sender<Result<Rotation, Error>>>,
    },
}

impl Cmd {
    pub fn is_shutdown(&self) -> bool {
        matches!(self, Cmd::Shutdown)
    }
}

/// A whole saved document fetched from a peer, with what the driver would derive from it
/// (heads and index row) computed beforehand, off the driver's thread ([`IngestDoc::prepare`]):
/// storing a document new here is then two inserts.
pub struct IngestDoc {
    pub id: String,
    /// The document's saved bytes (unframed).
    pub bytes: Vec<u8>,
    /// The secret values that came with it (field, value).
    pub secrets: Vec<(String, String)>,
    /// None when the bytes do not load (the driver's own path reports why).
    pub derived: Option<(Vec<ChangeHash>, IndexEntry)>,
}

impl IngestDoc {
    /// Loads the bytes and derives the document's heads and index row. Pure and CPU-bound: run
    /// it on a blocking thread.
    pub fn prepare(id: String, framed: Vec<u8>) -> IngestDoc {
        let (bytes, secrets) = match repl::unframe(&framed) {
            Ok((b, s)) if b.len() == framed.len() => (framed, s),
            Ok((b, s)) => (b.to_vec(), s),
            // Bytes that do not unframe do not load either: the merging path says why.
            Err(_) => (framed, Vec::new()),
        };
        // A document that breaks its layout, or whose history holds a secret value, is not
        // derived: it goes the merging path, which refuses it and counts it against the peer.
        let derived = if repl::valid_doc_id(&id) {
            AutoCommit::load(&bytes).ok().and_then(|mut d| {
                let entry = check_received(&id, &mut d).ok()?;
                if let Ok((kind, _)) = crdt_schema::parse_doc_id(&id) {
                    if repl::secret_value_in_doc(&mut d, kind).is_some() {
                        return None;
                    }
                }
                Some((d.get_heads(), entry))
            })
        } else {
            None
        };
        IngestDoc {
            id,
            bytes,
            secrets,
            derived,
        }
    }
}

pub struct Driver {
    store: Arc<Store>,
    published: Arc<Published>,
    node_id: String,
    cache: lru::LruCache<String, AutoCommit>,
    actor: ActorId,
    rng: ChaCha8Rng,
    clock: Arc<dyn Clock>,
    sessions: Sessions,
    /// The data directory, whose disk the driver watches (None in the simulator).
    dir: Option<std::path::PathBuf>,
    /// The disk is full: commands that write are refused before they run.
    full: bool,
    last_disk_check: Option<std::time::Instant>,
    /// When the at-rest key was last rotated without being asked (monotonic ms).
    last_rotation_ms: Option<u64>,
    /// The change feed's next number (read from the store at the first batch).
    feed_next: Option<u64>,
}

/// Forgotten secrets make the at-rest key rotate by itself at most this often (milliseconds):
/// a rotation seals every secret again in one durable commit, so a burst of password changes
/// costs one rotation, not one each. `POST /v1/compact` rotates at once.
pub const ROTATE_EVERY_MS: u64 = 10_000;

/// How often the free space is read before a batch while the disk is fine (a statvfs costs
/// about a microsecond; this only bounds how far a filling disk can get ahead of the check).
const DISK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

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
    /// What each local write changed, in order, to push: document, heads after, changes, the
    /// secret values it wrote.
    pushes: Vec<Push>,
    /// Secret values peers sent with their messages, by document: stored when the document is,
    /// if it shows their references.
    offered: HashMap<String, Vec<(String, String)>>,
    /// Messages that peers' answers called for: peer, messages, round.
    follow_ups: Vec<(String, Msgs, usize)>,
    /// Saved bytes that documents new to this node were loaded from, with the heads they load
    /// to: stored as they are, unless the document changed again since (a second message for it
    /// in the same batch), when they no longer hold all of it.
    loaded: HashMap<String, (Vec<u8>, Vec<ChangeHash>)>,
    /// The heads of what is stored of each touched document (what a chunk is saved after).
    stored: HashMap<String, Vec<ChangeHash>>,
    /// Set when a change was applied that the batch's prelogged record may not hold (a
    /// document had changes queued for missing dependencies): the batch logs in full.
    unlogged: bool,
    /// Node-local rows were written (they need a commit too).
    wrote_local: bool,
    /// Documents a peer changed or sent that were refused (they break their layout): their
    /// changes may be in a record started ahead, which must then never be replayed.
    refused: usize,
    poisoned: Option<StoreError>,
    /// Who made each change of the batch (the change feed records it): the principal of a local
    /// write; for a peer's change, the one its note names.
    by: HashMap<String, String>,
    /// The node that made each change a peer sent, from the change's note.
    made_on: HashMap<String, String>,
}

/// One local write's push: document, heads after, changes, secret values written.
type Push = (String, Vec<ChangeHash>, Vec<u8>, Vec<(String, String)>);

/// The record of a batch made only of sync messages from peers, known before it runs: the
/// changes the messages carry, and the secret values sent with them (sealed: replay keeps those
/// the documents show). None for any other batch (its changes are known only once made).
fn received_changes(cmds: &[Cmd], store: &Store) -> Option<Vec<LogOp>> {
    let mut ops = Vec::new();
    for c in cmds {
        let msgs = match c {
            Cmd::Serve {
                req: Request::Sync { msgs },
                ..
            } => msgs,
            Cmd::SyncBack { msgs, .. } => msgs,
            _ => return None,
        };
        for (id, framed) in msgs {
            let Ok((bytes, secrets)) = repl::unframe(framed) else {
                continue;
            };
            if let Ok(m) = automerge::sync::Message::decode(bytes) {
                for chunk in m.changes.iter() {
                    ops.push(LogOp::Changes(id.clone(), chunk.to_vec()));
                }
            }
            for (field, value) in secrets {
                ops.push(store.log_secret(id, &field, &value).ok()?);
            }
        }
    }
    (!ops.is_empty()).then_some(ops)
}

/// A command's answer, held until its batch's commit returned.
enum Deferred {
    /// The command has no answer.
    Nothing,
    /// A local write, and whether its change was pushed before the commit.
    Write(
        oneshot::Sender<Result<EntityState, Error>>,
        Result<EntityState, Error>,
        bool,
    ),
    Resp(oneshot::Sender<Response>, Response),
    Msgs(oneshot::Sender<Msgs>, Msgs),
    MsgsR(oneshot::Sender<Result<Msgs, Error>>, Result<Msgs, Error>),
    Count(oneshot::Sender<Result<usize, Error>>, Result<usize, Error>),
    Unit(oneshot::Sender<Result<(), Error>>, Result<(), Error>),
    Admit(
        oneshot::Sender<Result<Vec<u8>, AdmitError>>,
        Result<Vec<u8>, AdmitError>,
    ),
    Tokens(
        oneshot::Sender<Result<Vec<TokenInfo>, Error>>,
        Result<Vec<TokenInfo>, Error>,
    ),
    Revoke(
        oneshot::Sender<Result<Revoked, Error>>,
        Result<Revoked, Error>,
    ),
}

impl Deferred {
    fn send(self, commit: &Result<(), StoreError>, metrics: &NodeMetrics) {
        match (self, commit) {
            (Deferred::Nothing, _) => {}
            (Deferred::Write(r, v, pushed), commit) => {
                let answer = match (v, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Ok(_), Err(e)) if pushed || matches!(e, StoreError::Unsettled(_)) => {
                        Err(Error::Unknown(e.clone()))
                    }
                    (Ok(_), Err(e)) => Err(Error::Store(e.clone())),
                    (Err(x), _) => Err(x),
                };
                metrics.write(match &answer {
                    Ok(_) => "ok",
                    Err(Error::Unknown(_)) => "unknown",
                    Err(Error::DiskFull { .. }) => "disk_full",
                    Err(Error::Write(WriteError::Internal(_)) | Error::Store(_)) => "failed",
                    Err(_) => "refused",
                });
                drop(r.send(answer))
            }
            (Deferred::Resp(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Resp(r, _), Err(e)) => drop(r.send(Response::Refused {
                reason: Refusal::Internal,
                message: format!("commit failed: {e}"),
            })),
            (Deferred::Msgs(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Msgs(r, _), Err(_)) => drop(r.send(Vec::new())),
            (Deferred::MsgsR(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::MsgsR(r, _), Err(e)) => drop(r.send(Err(Error::Store(e.clone())))),
            (Deferred::Count(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Count(r, _), Err(e)) => drop(r.send(Err(Error::Store(e.clone())))),
            (Deferred::Unit(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Unit(r, _), Err(e)) => drop(r.send(Err(Error::Store(e.clone())))),
            (Deferred::Admit(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Admit(r, _), Err(e)) => drop(r.send(Err(AdmitError::Store(e.clone())))),
            (Deferred::Tokens(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Tokens(r, _), Err(e)) => drop(r.send(Err(Error::Store(e.clone())))),
            (Deferred::Revoke(r, v), Ok(())) => drop(r.send(v)),
            (Deferred::Revoke(r, _), Err(e)) => drop(r.send(Err(Error::Store(e.clone())))),
        }
    }
}

/// A batch executed and not committed. Its pushes may leave now; nothing else can.
pub struct Staged {
    /// The batch's local writes for each peer's link: push messages, or the documents to sync
    /// for a peer not taking messages now.
    pub pushes: Vec<(Arc<dyn PeerInbox>, LinkWork)>,
    pub pending: Pending,
}

/// The commit a batch waits for, with every answer and publication that must follow it.
pub struct Pending {
    /// None when no transaction could start.
    txn: Option<WriteTxn>,
    /// How the transaction is made durable; None when it changed nothing.
    mode: Option<CommitMode>,
    poisoned: Option<StoreError>,
    deferred: Vec<Deferred>,
    touched: HashMap<String, AutoCommit>,
    changed: BTreeMap<String, Origin>,
    entries: BTreeMap<String, IndexEntry>,
    follow_ups: Vec<(Arc<dyn PeerInbox>, LinkWork)>,
    /// The batch's change events, numbered, their feed rows in the transaction.
    events: Vec<ChangeEvent>,
}

enum CommitMode {
    /// Through the write-ahead log (its record started ahead, or appended now).
    Logged(Option<Prelogged>),
    /// Bulk ingestion: durable in redb itself (its records would fill the log at once).
    Checkpoint,
}

/// A batch whose commit returned: now, and only now, callers are answered, follow-ups queued and
/// events published.
pub struct Committed {
    pub result: Result<(), StoreError>,
    deferred: Vec<Deferred>,
    events: Vec<ChangeEvent>,
    follow_ups: Vec<(Arc<dyn PeerInbox>, LinkWork)>,
    touched: HashMap<String, AutoCommit>,
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
    fn load(&mut self, id: &str) -> Result<bool, DocsError> {
        if self.batch.touched.contains_key(id) {
            return Ok(true);
        }
        let d = match self.cache.pop(id) {
            Some(d) => Some(d),
            None => self
                .batch
                .txn
                .load_doc(id)
                .map_err(|e| DocsError(e.to_string()))?
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
    fn get(&mut self, id: &str) -> Result<Option<&mut AutoCommit>, DocsError> {
        if self.load(id)? {
            Ok(self.batch.touched.get_mut(id))
        } else {
            Ok(None)
        }
    }
    fn get_or_create(&mut self, id: &str) -> Result<&mut AutoCommit, DocsError> {
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
    fn insert_loaded(&mut self, id: &str, mut doc: AutoCommit, saved: &[u8]) {
        let heads = doc.get_heads();
        self.insert(id, doc);
        self.batch
            .loaded
            .insert(id.to_string(), (saved.to_vec(), heads));
    }
    fn changed(&mut self, id: &str) {
        self.changed.insert(id.to_string());
    }
    fn unlogged(&mut self) {
        self.batch.unlogged = true;
    }
    fn saved(&mut self, id: &str) -> Result<Option<Vec<u8>>, DocsError> {
        if let Some(d) = self.batch.touched.get_mut(id) {
            return Ok(Some(d.save()));
        }
        self.batch
            .txn
            .doc_bytes(id)
            .map_err(|e| DocsError(e.to_string()))
    }
    fn secrets(&mut self, id: &str) -> Vec<(String, String)> {
        // The references the document shows as it now stands in this batch; each value from
        // what peers offered in this batch, or from the store.
        let live: Vec<(String, String)> =
            match (self.batch.touched.get(id), crdt_schema::parse_doc_id(id)) {
                (Some(d), Ok((kind, _))) => crdt_schema::secret::live_refs(d, kind)
                    .into_iter()
                    .map(|(f, r)| (f.to_string(), r))
                    .collect(),
                (None, Ok(_)) => match self.batch.txn.index_get(id) {
                    Ok(Some(e)) => e.secrets,
                    _ => return Vec::new(),
                },
                (_, Err(_)) => return Vec::new(),
            };
        let mut out = Vec::new();
        for (field, r) in live {
            let offered = self.batch.offered.get(id).and_then(|o| {
                o.iter()
                    .find(|(f, v)| *f == field && crdt_schema::secret::secret_ref(id, f, v) == r)
            });
            let value = match offered {
                Some((_, v)) => Some(v.clone()),
                None => self.batch.txn.secret_value(id, &r).ok().flatten(),
            };
            if let Some(v) = value {
                out.push((field, v));
            }
        }
        out
    }
    fn offer_secrets(&mut self, id: &str, secrets: Vec<(String, String)>) {
        self.batch
            .offered
            .entry(id.to_string())
            .or_default()
            .extend(secrets);
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
        let entry = self
            .txn
            .index_get(&doc_id(Kind::Security, "global"))
            .map_err(|e| WriteError::Internal(e.to_string()))?;
        let fields = entry.filter(|e| e.alive).and_then(|e| fields_of(&e));
        let sec: Security = typed::singleton(fields.as_ref());
        Ok(sec.password_min_length.max(0) as usize)
    }

    fn enabled_superadmins(&self) -> Result<Vec<String>, WriteError> {
        let prefix = format!("{}/", Kind::Admin.as_str());
        let mut names = Vec::new();
        self.txn
            .index_scan(&prefix, |id, e| {
                let Some(f) = e.alive.then(|| fields_of(&e)).flatten() else {
                    return;
                };
                let superadmin = f["role"].as_str() == Some("superadmin");
                let enabled = f["enabled"].as_bool() != Some(false);
                if superadmin && enabled {
                    names.push(id[prefix.len()..].to_string());
                }
            })
            .map_err(|e| WriteError::Internal(e.to_string()))?;
        Ok(names)
    }
}

/// The `fields` object of an entity's index row.
fn fields_of(e: &IndexEntry) -> Option<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(&e.json)
        .ok()
        .map(|mut v| v["fields"].take())
}

/// The typed value of a singleton from its stored row (its defaults when never written).
fn singleton_from<T: typed::Entity>(row: Option<&IndexEntry>) -> T {
    let fields = row.filter(|e| e.alive).and_then(fields_of);
    typed::singleton(fields.as_ref())
}

impl Driver {
    /// What the driver publishes, as stored: the digest of every document, the member list, the
    /// settings; and the documents whose index rows are damaged (left out of the digest until
    /// [`Cmd::RepairRows`] rebuilds them).
    pub fn load_published(store: &Store) -> Result<(Published, Vec<String>), StoreError> {
        let mut digest = Digest::default();
        let mut damaged = Vec::new();
        store.index_rows("", |id, row| {
            match row {
                Ok(e) => digest.set(id, e.heads_hash),
                Err(StoreError::BadRow(_)) => damaged.push(id.to_string()),
                Err(e) => return Err(e),
            }
            Ok(())
        })?;
        if !damaged.is_empty() {
            tracing::warn!(
                rows = damaged.len(),
                "index rows fail their checksum: they are rebuilt from their documents"
            );
        }
        // A damaged row reads as absent here; its repair publishes it.
        let row = |id: &str| match store.index_get(id) {
            Err(StoreError::BadRow(_)) => Ok(None),
            other => other,
        };
        let members: Vec<Member> = row(MEMBERS_DOC)?
            .and_then(|e| serde_json::from_slice(&e.json).ok())
            .unwrap_or_default();
        let settings: Settings = singleton_from(row(&doc_id(Kind::Settings, "global"))?.as_ref());
        let security: Security = singleton_from(row(&doc_id(Kind::Security, "global"))?.as_ref());
        Ok((Published::new(digest, members, settings, security), damaged))
    }

    /// A driver over `store`. Every driver draws a fresh actor: an actor must be one linear
    /// stream of changes, and a restarted (or restored) node must never reuse one.
    pub fn new(
        store: Arc<Store>,
        published: Arc<Published>,
        node_id: &str,
        clock: Arc<dyn Clock>,
        mut rng: ChaCha8Rng,
    ) -> Driver {
        let mut actor = [0u8; 16];
        rng.fill_bytes(&mut actor);
        Driver {
            store,
            published,
            node_id: node_id.to_string(),
            cache: lru::LruCache::new(NonZeroUsize::new(DOC_CACHE_MAX).expect("nonzero")),
            actor: ActorId::from(actor.as_slice()),
            rng,
            clock,
            sessions: Sessions::default(),
            dir: None,
            full: false,
            last_disk_check: None,
            last_rotation_ms: None,
            feed_next: None,
        }
    }

    /// Watches the disk under `dir`: writes are refused while it is full, and resume by
    /// themselves once space is freed.
    pub fn with_disk(mut self, dir: &std::path::Path) -> Driver {
        self.dir = Some(dir.to_path_buf());
        self
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Reads the free space (every [`DISK_CHECK_EVERY`], and at every batch while full) and
    /// moves between taking and refusing writes; reopens a store an I/O error left unusable.
    fn check_disk(&mut self) {
        let Some(dir) = self.dir.clone() else {
            return;
        };
        let due = self.full
            || self.store.broken()
            || self
                .last_disk_check
                .is_none_or(|t| t.elapsed() >= DISK_CHECK_EVERY);
        if !due {
            return;
        }
        self.last_disk_check = Some(std::time::Instant::now());
        let free = super::disk::free_bytes(&dir).unwrap_or(u64::MAX);
        // Writes are taken only with the reserve in place (or made now) and room beyond it.
        if !self.full
            && (free < super::disk::FREE_MIN_BYTES || super::disk::make_reserve(&dir).is_err())
        {
            self.disk_full(&dir, free);
        }
        if self.full
            && free >= super::disk::RESERVE_BYTES + super::disk::RESUME_FREE_BYTES
            && super::disk::make_reserve(&dir).is_ok()
        {
            self.full = false;
            self.published
                .storage
                .send_replace(super::disk::Storage::Ok);
            tracing::info!(dir = %dir.display(), free_mib = free >> 20, "disk space is back: writes are accepted again");
        }
        if self.store.broken() {
            match self.store.reopen() {
                Ok(()) => self.cache.clear(),
                Err(e) => tracing::warn!(error = %e, "the store cannot be reopened yet"),
            }
        }
    }

    /// The disk is full: writes are refused from now on, and the reserve is given back so that
    /// the store can be reopened and its log replayed.
    fn disk_full(&mut self, dir: &std::path::Path, free: u64) {
        if self.full {
            return;
        }
        self.full = true;
        let released = super::disk::release_reserve(dir);
        self.published
            .storage
            .send_replace(super::disk::Storage::Full);
        tracing::error!(dir = %dir.display(), free_mib = free >> 20, released_reserve = released,
            "the disk is full: writes are refused until space is freed; reads still work");
    }

    fn full_error(&self) -> Error {
        let dir = self.dir.clone().unwrap_or_default();
        Error::DiskFull {
            free_mib: super::disk::free_bytes(&dir).unwrap_or(0) >> 20,
            dir: dir.display().to_string(),
        }
    }

    /// While the disk is full: commands that would write are answered at once, before anything
    /// runs (nothing is pushed); reads of the store (sync messages to make, fetches to serve)
    /// go on.
    fn refuse_when_full(&mut self, cmds: Vec<Cmd>) -> Vec<Cmd> {
        if !self.full {
            return cmds;
        }
        let full = |d: &Driver| d.full_error();
        let mut keep = Vec::with_capacity(cmds.len());
        for c in cmds {
            let refused = match c {
                Cmd::SyncOut { .. }
                | Cmd::ResetPeer { .. }
                | Cmd::Shutdown
                | Cmd::CheckDisk
                | Cmd::RepairRows { .. }
                | Cmd::ListTokens { .. }
                | Cmd::Compact { .. }
                | Cmd::Serve {
                    req: Request::Fetch { .. },
                    ..
                } => {
                    keep.push(c);
                    continue;
                }
                Cmd::Write { reply, .. } => Deferred::Write(reply, Err(full(self)), false),
                Cmd::Serve { reply, .. } => Deferred::Resp(
                    reply,
                    Response::Refused {
                        reason: Refusal::Internal,
                        message: full(self).to_string(),
                    },
                ),
                Cmd::SyncBack {
                    then: SyncThen::Reply(reply),
                    ..
                } => Deferred::MsgsR(reply, Err(full(self))),
                Cmd::SyncBack { .. } => Deferred::Nothing,
                Cmd::Ingest { reply, .. } => Deferred::Count(reply, Err(full(self))),
                Cmd::PutToken { reply, .. } | Cmd::RemoveMember { reply, .. } => {
                    Deferred::Unit(reply, Err(full(self)))
                }
                Cmd::Admit { reply, .. } => Deferred::Admit(
                    reply,
                    Err(AdmitError::Store(StoreError::DiskFull(
                        full(self).to_string(),
                    ))),
                ),
                Cmd::RevokeToken { reply, .. } => Deferred::Revoke(reply, Err(full(self))),
            };
            refused.send(&Ok(()), &self.published.metrics);
        }
        keep
    }

    /// The thread's loop: takes every command waiting (up to [`BATCH_MAX`]) as one batch.
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
            batch.retain(|c| !c.is_shutdown());
            stopping = batch.len() != before;
            // A failed commit was logged and answered to every caller.
            let _ = self.step(batch);
        }
        // Whatever is still queued is answered with ShuttingDown when the channel drops.
    }

    /// One batch, start to finish: execute, push, commit, answer. Returns the commit's outcome.
    pub fn step(&mut self, cmds: Vec<Cmd>) -> Result<(), StoreError> {
        self.check_disk();
        let cmds = self.refuse_when_full(cmds);
        // Rotations run after the batch; the common batch holds none and is not copied.
        let (compacts, cmds): (Vec<Cmd>, Vec<Cmd>) =
            if cmds.iter().any(|c| matches!(c, Cmd::Compact { .. })) {
                cmds.into_iter()
                    .partition(|c| matches!(c, Cmd::Compact { .. }))
            } else {
                (Vec::new(), cmds)
            };
        if cmds.is_empty() {
            self.compact(compacts);
            return Ok(());
        }
        let started = std::time::Instant::now();
        let m = &self.published.metrics;
        m.batches.inc();
        m.batch_commands.observe(cmds.len() as f64);
        let Staged { pushes, pending } = self.execute(cmds);
        // Push before commit: the peers' log writes overlap ours (see ARCHITECTURE.md).
        for (inbox, work) in pushes {
            inbox.deliver(work);
        }
        let committed = pending.commit(self);
        let r = committed.finish(self);
        self.published
            .metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.compact(compacts);
        r
    }

    /// Key rotations asked for, after the batch committed (a rotation holds the store's only
    /// write transaction). One rotation answers every caller in the batch.
    fn compact(&mut self, cmds: Vec<Cmd>) {
        let mut replies = Vec::new();
        for c in cmds {
            if let Cmd::Compact { reply: Some(reply) } = c {
                replies.push(reply);
            }
        }
        let now = self.clock.mono_ms();
        if replies.is_empty() {
            // The watcher's nudge: only when something was forgotten, and not too often.
            let recent = self
                .last_rotation_ms
                .is_some_and(|t| now.saturating_sub(t) < ROTATE_EVERY_MS);
            if !self.store.rotation_due() || recent || self.full {
                return;
            }
        }
        self.last_rotation_ms = Some(now);
        if self.full {
            for reply in replies {
                let _ = reply.send(Err(self.full_error()));
            }
            return;
        }
        let r = self.store.rotate_keys();
        match &r {
            Ok(rot) => tracing::info!(
                key = rot.key,
                retired = ?rot.retired,
                resealed = rot.resealed,
                "at-rest key rotated: replaced and deleted secrets are unreadable in every file"
            ),
            Err(e) => tracing::warn!(error = %e, "at-rest key rotation failed; it is retried"),
        }
        for reply in replies {
            let _ = reply.send(r.clone().map_err(Error::Store));
        }
    }

    /// A peer's message or document refused: counted, and logged with the peer's ID.
    fn rejected(&self, peer: &str, r: &repl::Rejected, what: &str) {
        tracing::warn!(peer = %peer, doc = %r.id, reason = %r.reason, "{what} was refused");
        self.published
            .metrics
            .rejected
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .inc();
    }

    /// Runs the commands in one transaction. Returns what may leave before the commit (local
    /// writes' pushes) and the pending commit holding everything else.
    pub fn execute(&mut self, cmds: Vec<Cmd>) -> Staged {
        // Changes received from peers start going to the log before the batch runs (io_uring), so
        // the disk write overlaps applying them instead of following it.
        let prelogged =
            received_changes(&cmds, &self.store).and_then(|ops| self.store.prelog(&ops));
        // Bulk ingestion (a new node seeded with whole documents) commits straight to redb: its
        // records would fill the log at once, and every byte would be written twice.
        let bulk = cmds.iter().any(|c| matches!(c, Cmd::Ingest { .. }));
        let peers = self.published.peers.snapshot();
        let txn = match self.store.write() {
            Ok(t) => t,
            Err(e) => {
                let err = Err(e.clone());
                for c in cmds {
                    Self::refuse(c, &e).send(&err, &self.published.metrics);
                }
                return Staged {
                    pushes: Vec::new(),
                    pending: Pending::failed(e),
                };
            }
        };
        let mut b = Batch {
            txn,
            touched: HashMap::new(),
            changed: BTreeMap::new(),
            entries: BTreeMap::new(),
            pushes: Vec::new(),
            offered: HashMap::new(),
            has_peers: !peers.is_empty(),
            follow_ups: Vec::new(),
            loaded: HashMap::new(),
            stored: HashMap::new(),
            unlogged: false,
            wrote_local: false,
            refused: 0,
            poisoned: None,
            by: HashMap::new(),
            made_on: HashMap::new(),
        };
        let mut deferred = Vec::with_capacity(cmds.len());
        for c in cmds {
            deferred.push(self.exec(&mut b, c));
        }
        let events = self.feed(&mut b);
        let Batch {
            txn,
            touched,
            changed,
            entries,
            pushes,
            follow_ups,
            poisoned,
            unlogged,
            wrote_local,
            refused,
            ..
        } = b;
        // A record started ahead holds every change the peers sent, refused ones included: it
        // must never be replayed, so the batch commits as a checkpoint, which covers it.
        let refused_ahead = refused > 0 && matches!(prelogged, Some(Prelogged::Submitted));
        let prelogged = prelogged.filter(|_| !unlogged);
        let dirty = !entries.is_empty() || !changed.is_empty() || wrote_local;
        // A node whose log has failed pushes nothing: its commits will all fail.
        let push = poisoned.is_none() && self.store.writable();
        let pushes = if push {
            self.push_local(&changed, pushes, &peers)
        } else {
            Vec::new()
        };
        if !pushes.is_empty() {
            for d in deferred.iter_mut() {
                if let Deferred::Write(_, Ok(_), pushed) = d {
                    *pushed = true;
                }
            }
        }
        let follow_ups = follow_ups
            .into_iter()
            .filter_map(|(peer, msgs, round)| {
                let inbox = peers.iter().find(|(p, _)| *p == peer)?.1.clone();
                let ready = msgs
                    .into_iter()
                    .map(|(id, msg)| Ready {
                        id,
                        msg,
                        round,
                        pushed: None,
                    })
                    .collect();
                Some((inbox, LinkWork::Ready(ready)))
            })
            .collect();
        let mode = match () {
            _ if refused_ahead => Some(CommitMode::Checkpoint),
            // A batch that changed nothing does not pay for a disk write.
            _ if !dirty => None,
            // Membership changes go to redb durably at once, not only to the log: a node that
            // lost its log must not lose who its peers are.
            _ if bulk || changed.contains_key(MEMBERS_DOC) => Some(CommitMode::Checkpoint),
            _ => Some(CommitMode::Logged(prelogged)),
        };
        Staged {
            pushes,
            pending: Pending {
                txn: Some(txn),
                mode,
                poisoned,
                deferred,
                touched,
                changed,
                entries,
                follow_ups,
                events,
            },
        }
    }

    /// Numbers the batch's entity changes for the change feed and writes their rows into its
    /// transaction (durable with the changes themselves). Members' list changes are not entity
    /// changes and get no row.
    fn feed(&mut self, b: &mut Batch) -> Vec<ChangeEvent> {
        if b.poisoned.is_some() || b.changed.is_empty() {
            return Vec::new();
        }
        let mut next = match self.feed_next {
            Some(n) => n,
            None => match b.txn.feed_bounds() {
                Ok(f) => f.next,
                Err(e) => {
                    b.poisoned = Some(e);
                    return Vec::new();
                }
            },
        };
        let mut events = Vec::new();
        let mut rows = Vec::new();
        for (id, origin) in &b.changed {
            let Some(e) = b.entries.get(id) else { continue };
            if id == MEMBERS_DOC {
                continue;
            }
            let Ok((kind, name)) = crdt_schema::parse_doc_id(id) else {
                continue;
            };
            let ev = ChangeEvent {
                seq: next,
                kind,
                name: name.to_string(),
                alive: e.alive,
                origin: origin.clone(),
                made_on: b.made_on.get(id).cloned(),
                by: b.by.get(id).cloned(),
                entity: e.alive.then(|| e.json.as_slice().into()),
            };
            next += 1;
            rows.push((
                ev.seq,
                serde_json::to_vec(&ev).expect("an event serializes"),
            ));
            events.push(ev);
        }
        // Numbers are never handed out twice, even when this batch's commit fails.
        self.feed_next = Some(next);
        if let Err(e) = b.txn.feed_append(&rows) {
            b.poisoned = Some(e);
            return Vec::new();
        }
        events
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
    fn refuse(c: Cmd, e: &StoreError) -> Deferred {
        match c {
            Cmd::Write { reply, .. } => Deferred::Write(reply, Err(Error::Store(e.clone())), false),
            Cmd::Serve { reply, .. } => Deferred::Resp(
                reply,
                Response::Refused {
                    reason: Refusal::Internal,
                    message: e.to_string(),
                },
            ),
            Cmd::SyncOut { reply, .. } => Deferred::Msgs(reply, Vec::new()),
            Cmd::SyncBack {
                then: SyncThen::Reply(reply),
                ..
            } => Deferred::MsgsR(reply, Err(Error::Store(e.clone()))),
            Cmd::SyncBack { .. }
            | Cmd::ResetPeer { .. }
            | Cmd::Shutdown
            | Cmd::CheckDisk
            | Cmd::Compact { .. } => Deferred::Nothing,
            Cmd::RepairRows { reply: None, .. } => Deferred::Nothing,
            Cmd::RepairRows {
                reply: Some(reply), ..
            } => Deferred::Unit(reply, Err(Error::Store(e.clone()))),
            Cmd::Ingest { reply, .. } => Deferred::Count(reply, Err(Error::Store(e.clone()))),
            Cmd::PutToken { reply, .. } | Cmd::RemoveMember { reply, .. } => {
                Deferred::Unit(reply, Err(Error::Store(e.clone())))
            }
            Cmd::Admit { reply, .. } => Deferred::Admit(reply, Err(AdmitError::Store(e.clone()))),
            Cmd::ListTokens { reply } => Deferred::Tokens(reply, Err(Error::Store(e.clone()))),
            Cmd::RevokeToken { reply, .. } => Deferred::Revoke(reply, Err(Error::Store(e.clone()))),
        }
    }

    /// This batch's local writes for every peer's link, as push messages made here (the link
    /// sends them at once instead of first asking the driver for them). A peer not taking
    /// messages gets the document IDs instead, and its messages are made when it is ready; so do
    /// local changes that are not writes (the member list).
    fn push_local(
        &mut self,
        changed: &BTreeMap<String, Origin>,
        pushes: Vec<Push>,
        peers: &[(String, Arc<dyn PeerInbox>)],
    ) -> Vec<(Arc<dyn PeerInbox>, LinkWork)> {
        let pushed: BTreeSet<&str> = pushes.iter().map(|(id, ..)| id.as_str()).collect();
        let listed: Vec<String> = changed
            .iter()
            .filter(|(id, origin)| **origin == Origin::Local && !pushed.contains(id.as_str()))
            .map(|(id, _)| id.clone())
            .collect();
        let msgs: Vec<(String, Vec<ChangeHash>, Vec<u8>)> = pushes
            .into_iter()
            .map(|(id, heads, changes, secrets)| {
                let m = Sessions::push_message(heads.clone(), changes, &secrets);
                (id, heads, m)
            })
            .collect();
        let mut out = Vec::new();
        for (peer, inbox) in peers {
            if !listed.is_empty() {
                out.push((inbox.clone(), LinkWork::Dirty(listed.clone())));
            }
            if msgs.is_empty() {
                continue;
            }
            if !inbox.accepting() {
                let ids = msgs.iter().map(|(id, _, _)| id.clone()).collect();
                out.push((inbox.clone(), LinkWork::Dirty(ids)));
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
            out.push((inbox.clone(), LinkWork::Ready(ready)));
        }
        out
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
            let saved = b
                .loaded
                .remove(&id)
                .filter(|(_, heads)| *heads == d.get_heads())
                .map(|(bytes, _)| bytes);
            let stored = b.stored.get(&id).cloned().unwrap_or_default();
            // What a peer changed or sent is checked against the layout of its kind before it
            // is stored: a peer cannot plant what no node would write.
            let checked = match origin {
                Origin::Remote { .. } => check_received(&id, d),
                Origin::Local => row_for(&id, d).map_err(Invalid::from),
            };
            let r = match checked {
                Err(e) => Err(PersistError::Invalid(e)),
                Ok(entry) => {
                    let offered = b.offered.remove(&id).unwrap_or_default();
                    b.txn
                        .put_doc(&id, d, entry.clone(), saved, &stored, &offered)
                        .map(|_| entry)
                        .map_err(PersistError::Store)
                }
            };
            match r {
                Ok(entry) => {
                    b.stored.insert(id.clone(), d.get_heads());
                    b.entries.insert(id.clone(), entry);
                    if let Origin::Remote { .. } = origin {
                        if let Some(note) = doc::latest_note(d) {
                            if let Some(by) = note.by {
                                b.by.insert(id.clone(), by);
                            }
                            b.made_on.insert(id.clone(), note.node);
                        }
                    }
                    b.changed.insert(id, origin.clone());
                }
                Err(PersistError::Invalid(e)) => {
                    // Never stored, and its in-memory copy (with the peer's changes) is dropped
                    // so that nothing serves or builds on it; the rest of the batch goes on.
                    match origin {
                        Origin::Remote { peer } => {
                            tracing::warn!(peer = %peer, doc = %id, reason = %e,
                                "a document from a peer breaks its layout and was refused");
                            self.published
                                .metrics
                                .rejected
                                .get_or_create(&PeerLabel { peer: peer.clone() })
                                .inc();
                            b.refused += 1;
                        }
                        Origin::Local => {
                            tracing::warn!(doc = %id, error = %e, "a document does not read as its kind: not stored");
                        }
                    }
                    b.touched.remove(&id);
                    self.cache.pop(&id);
                }
                Err(PersistError::Store(e)) => {
                    tracing::warn!(doc = %id, error = %e, "a document cannot be stored");
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
                b.poisoned.get_or_insert(e);
                return StoreNew::Failed;
            }
        }
        let IngestDoc {
            id,
            bytes,
            secrets,
            derived,
        } = doc;
        let Some((heads, entry)) = derived else {
            return StoreNew::Merge(IngestDoc {
                id,
                bytes,
                secrets,
                derived: None,
            });
        };
        match b.txn.put_new_doc(&id, bytes, entry.clone(), &secrets) {
            Ok(()) => {
                b.stored.insert(id.clone(), heads);
                b.entries.insert(id.clone(), entry);
                b.changed.insert(id, origin.clone());
                StoreNew::Stored
            }
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "a document from a peer cannot be stored");
                b.poisoned.get_or_insert(e);
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

    /// Runs one command inside the batch; its answer waits for the commit.
    fn exec(&mut self, b: &mut Batch, c: Cmd) -> Deferred {
        match c {
            Cmd::Write {
                kind,
                name,
                op,
                by,
                reply,
            } => Deferred::Write(reply, self.write(b, kind, &name, &op, by.as_ref()), false),
            Cmd::Serve { peer, req, reply } => Deferred::Resp(reply, self.serve(b, &peer, req)),
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
                let next = self.sync_back(b, &peer, msgs, &ids);
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
                Deferred::Count(reply, Ok(self.ingest(b, &peer, docs)))
            }
            Cmd::ResetPeer { peer } => {
                self.sessions.reset_peer(&peer);
                Deferred::Nothing
            }
            Cmd::Shutdown | Cmd::CheckDisk | Cmd::Compact { .. } => Deferred::Nothing,
            Cmd::RepairRows { ids, reply } => {
                let r = self.repair_rows(b, &ids);
                match reply {
                    Some(reply) => Deferred::Unit(reply, r),
                    None => Deferred::Nothing,
                }
            }
            Cmd::PutToken {
                secret_hash,
                record,
                reply,
            } => Deferred::Unit(reply, self.put_token(b, &secret_hash, &record)),
            Cmd::ListTokens { reply } => Deferred::Tokens(reply, self.list_tokens(b)),
            Cmd::RevokeToken { id, reply } => Deferred::Revoke(reply, self.revoke_token(b, &id)),
            Cmd::Admit {
                secret_hash,
                member,
                reply,
            } => Deferred::Admit(reply, self.admit(b, &secret_hash, &member)),
            Cmd::RemoveMember { id, reply } => {
                let r = self.update_members(b, |list| {
                    let mut m = list
                        .iter()
                        .find(|m| m.id == id && !m.removed)
                        .cloned()
                        .ok_or_else(|| Error::NotMember(id.clone()))?;
                    m.removed = true;
                    Ok(m)
                });
                Deferred::Unit(reply, r.map(|_| ()))
            }
        }
    }

    /// Rebuilds the index rows of `ids` from their stored documents (their rows were damaged):
    /// the digest and listings take the rebuilt rows after the commit.
    fn repair_rows(&mut self, b: &mut Batch, ids: &[String]) -> Result<(), Error> {
        for id in ids {
            // A row repaired already (two reads found it) is fine again: leave it.
            match b.txn.index_get(id) {
                Ok(_) => continue,
                Err(StoreError::BadRow(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(entry) = b.txn.rebuild_row(id)? {
                tracing::warn!(doc = %id, "a damaged index row was rebuilt from its document");
                self.cache.pop(id);
                b.entries.insert(id.clone(), entry);
                b.changed.entry(id.clone()).or_insert(Origin::Local);
            }
        }
        Ok(())
    }

    /// A peer's request for documents: its messages applied (and refusals counted).
    fn serve(&mut self, b: &mut Batch, peer: &str, req: Request) -> Response {
        let origin = Origin::Remote {
            peer: peer.to_string(),
        };
        let served = self.with_docs(b, origin, |docs, sessions| {
            repl::serve(req, peer, sessions, docs)
        });
        for r in &served.rejected {
            self.rejected(peer, r, "a peer's sync message");
        }
        served.resp
    }

    /// A peer's answer to our messages applied; returns what follows for `ids`.
    fn sync_back(&mut self, b: &mut Batch, peer: &str, msgs: Msgs, ids: &[String]) -> Msgs {
        let origin = Origin::Remote {
            peer: peer.to_string(),
        };
        let (next, rejected) = self.with_docs(b, origin, |docs, sessions| {
            let rejected = sessions.receive(docs, peer, Dir::Out, msgs);
            (sessions.generate(docs, peer, Dir::Out, ids), rejected)
        });
        for r in &rejected {
            self.rejected(peer, r, "a peer's sync message");
        }
        next
    }

    /// Fetched documents stored: those new here as they came, the rest merged. Returns how many
    /// were taken.
    fn ingest(&mut self, b: &mut Batch, peer: &str, docs: Vec<IngestDoc>) -> usize {
        let origin = Origin::Remote {
            peer: peer.to_string(),
        };
        let mut n = 0;
        let mut merge = Vec::new();
        for doc in docs {
            match Self::store_new(b, doc, &origin) {
                StoreNew::Stored => n += 1,
                StoreNew::Failed => {}
                StoreNew::Merge(doc) => merge.push(doc),
            }
        }
        let merge_count = merge.len();
        let refused_before = b.refused;
        // Documents this node already has (or that did not load ahead) merge as usual.
        let rejected = self.with_docs(b, origin, |d, _| {
            merge
                .into_iter()
                .filter_map(|x| repl::ingest(d, &x.id, &x.bytes, x.secrets).err())
                .collect::<Vec<_>>()
        });
        for r in &rejected {
            self.rejected(peer, r, "a fetched document");
        }
        let refused = b.refused.saturating_sub(refused_before);
        (n + merge_count).saturating_sub(rejected.len() + refused)
    }

    /// A token's stored record.
    fn token(b: &Batch, secret_hash: &str) -> Result<Option<StoredToken>, StoreError> {
        Ok(b.txn
            .local_get(&token_key(secret_hash))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The hashes of the tokens this node made, as listed.
    fn token_hashes(b: &Batch) -> Result<Vec<String>, StoreError> {
        Ok(b.txn
            .local_get(TOKENS_KEY)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// Stores a new token and lists it; tokens expired for a week leave the list.
    fn put_token(
        &mut self,
        b: &mut Batch,
        secret_hash: &str,
        record: &TokenRecord,
    ) -> Result<(), Error> {
        let now = self.clock.wall_ms();
        let stored = StoredToken {
            expires_wall_ms: record.expires_wall_ms,
            used: record.used,
            revoked: false,
        };
        b.txn.local_put(
            &token_key(secret_hash),
            &serde_json::to_vec(&stored).expect("json"),
        )?;
        b.wrote_local = true;
        let mut hashes = Vec::new();
        for h in Self::token_hashes(b)? {
            let keep = Self::token(b, &h)?.is_some_and(|t| {
                t.expires_wall_ms
                    .saturating_add(TOKEN_LISTED_AFTER_EXPIRY_MS)
                    > now
            });
            if keep && h != secret_hash {
                hashes.push(h);
            }
        }
        hashes.push(secret_hash.to_string());
        b.txn
            .local_put(TOKENS_KEY, &serde_json::to_vec(&hashes).expect("json"))?;
        Ok(())
    }

    fn list_tokens(&mut self, b: &mut Batch) -> Result<Vec<TokenInfo>, Error> {
        let now = self.clock.wall_ms();
        let mut out = Vec::new();
        for h in Self::token_hashes(b)? {
            if let Some(t) = Self::token(b, &h)? {
                out.push(TokenInfo::of(&h, &t, now));
            }
        }
        Ok(out)
    }

    /// Revokes the one token whose ID starts with `prefix`.
    fn revoke_token(&mut self, b: &mut Batch, prefix: &str) -> Result<Revoked, Error> {
        let now = self.clock.wall_ms();
        let matching: Vec<String> = Self::token_hashes(b)?
            .into_iter()
            .filter(|h| !prefix.is_empty() && token_id(h).starts_with(prefix))
            .collect();
        let hash = match matching.as_slice() {
            [] => return Ok(Revoked::NotFound),
            [h] => h,
            more => return Ok(Revoked::Ambiguous(more.len())),
        };
        let Some(mut t) = Self::token(b, hash)? else {
            return Ok(Revoked::NotFound);
        };
        if !t.revoked {
            t.revoked = true;
            b.txn
                .local_put(&token_key(hash), &serde_json::to_vec(&t).expect("json"))?;
            b.wrote_local = true;
            tracing::info!(token = %token_id(hash), "a join token was revoked");
        }
        Ok(Revoked::Token(TokenInfo::of(hash, &t, now)))
    }

    fn admit(
        &mut self,
        b: &mut Batch,
        secret_hash: &str,
        member: &Member,
    ) -> Result<Vec<u8>, AdmitError> {
        let key = token_key(secret_hash);
        let rec = Self::token(b, secret_hash)?;
        let now = self.clock.wall_ms();
        match judge_token(rec, secret_hash, now) {
            Err(e) => return Err(e),
            Ok(mut r) => {
                r.used = true;
                b.txn
                    .local_put(&key, &serde_json::to_vec(&r).expect("json"))?;
                b.wrote_local = true;
            }
        }
        let m = member.clone();
        self.update_members(b, move |_| Ok(m))
            .map_err(|e| AdmitError::Members(e.to_string()))?;
        let d = b
            .touched
            .get_mut(MEMBERS_DOC)
            .ok_or_else(|| AdmitError::Members("the member list is missing".into()))?;
        Ok(d.save())
    }

    /// Applies `f`'s member to the member list, as a local change.
    fn update_members(
        &mut self,
        b: &mut Batch,
        f: impl FnOnce(&[Member]) -> Result<Member, Error>,
    ) -> Result<Member, Error> {
        let now = self.clock.wall_ms();
        let actor = self.actor.clone();
        let mut docs = BatchDocs {
            cache: &mut self.cache,
            actor: &actor,
            batch: b,
            created: BTreeSet::new(),
            changed: BTreeSet::new(),
        };
        let storage = |e: DocsError| Error::Store(StoreError::Redb(e.0));
        let d = docs.get_or_create(MEMBERS_DOC).map_err(storage)?;
        if d.get_heads().is_empty() {
            let mut g = members::genesis();
            d.merge(&mut g)
                .map_err(|e| Error::Store(StoreError::Corrupt(e.to_string())))?;
        }
        let m = f(&members::read(d))?;
        let changed = members::upsert(d, &m, now)
            .map_err(|e| Error::Store(StoreError::Corrupt(e.to_string())))?;
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
        by: Option<&entity::Principal>,
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
            node_id: &self.node_id,
            wall_ms: self.clock.wall_ms(),
            salt,
            by,
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
            let entry = index::entity_row(&mut d, &outcome.state);
            // What the peers need comes back: a document new here whole (the full save just
            // stored, which loads fastest), otherwise the changes this write made.
            let changes =
                match b
                    .txn
                    .put_doc(&id, &mut d, entry.clone(), None, &before, &outcome.secrets)
                {
                    Ok(c) => c,
                    Err(e) => {
                        // The document holds a change the transaction may not: never reuse it, and
                        // commit nothing of this batch.
                        b.poisoned.get_or_insert(e.clone());
                        return Err(e.into());
                    }
                };
            let heads = d.get_heads();
            b.stored.insert(id.clone(), heads.clone());
            // A node with no peers makes no pushes.
            if b.has_peers {
                b.pushes.push((id.clone(), heads, changes, outcome.secrets));
            }
            b.entries.insert(id.clone(), entry);
            b.changed.insert(id.clone(), Origin::Local);
            if let Some(p) = by {
                b.by.insert(id.clone(), p.name.clone());
            }
        }
        b.touched.insert(id, d);
        Ok(outcome.state)
    }
}

enum PersistError {
    Invalid(Invalid),
    Store(StoreError),
}

impl Pending {
    /// A batch that could not start a transaction: every command was answered already.
    fn failed(e: StoreError) -> Pending {
        Pending {
            txn: None,
            mode: None,
            poisoned: Some(e),
            deferred: Vec::new(),
            touched: HashMap::new(),
            changed: BTreeMap::new(),
            entries: BTreeMap::new(),
            follow_ups: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Makes the batch durable, then publishes what it changed (digest, member list, settings).
    pub fn commit(self, d: &mut Driver) -> Committed {
        let Pending {
            txn,
            mode,
            poisoned,
            deferred,
            touched,
            changed,
            entries,
            follow_ups,
            events: batch_events,
        } = self;
        // Dropping a transaction aborts it.
        let result = match (poisoned, mode, txn) {
            (Some(e), _, _) => Err(e),
            (None, None, _) | (None, _, None) => Ok(()),
            (None, Some(CommitMode::Checkpoint), Some(txn)) => txn.commit_to_redb(),
            (None, Some(CommitMode::Logged(prelogged)), Some(txn)) => txn.commit(prelogged),
        };
        let mut events = Vec::new();
        match &result {
            Ok(()) => {
                let p = &d.published;
                {
                    let mut digest = p.digest();
                    for (id, e) in &entries {
                        digest.set(id, e.heads_hash);
                    }
                }
                for (id, origin) in &changed {
                    let Some(e) = entries.get(id) else { continue };
                    if let Origin::Remote { peer } = origin {
                        p.metrics
                            .remote_changes
                            .get_or_create(&PeerLabel { peer: peer.clone() })
                            .inc();
                    }
                    if id == MEMBERS_DOC {
                        if let Ok(list) = serde_json::from_slice::<Vec<Member>>(&e.json) {
                            p.members.send_replace(list);
                        }
                        continue;
                    }
                    let Ok((kind, _)) = crdt_schema::parse_doc_id(id) else {
                        continue;
                    };
                    match kind {
                        Kind::Settings => {
                            p.settings
                                .send_replace(Arc::new(singleton_from::<Settings>(Some(e))));
                        }
                        Kind::Security => {
                            p.security
                                .send_replace(Arc::new(singleton_from::<Security>(Some(e))));
                        }
                        _ => {}
                    }
                }
                events = batch_events;
            }
            // The touched documents may hold changes that are not durable: they are dropped, so
            // the next use reloads what is committed.
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the batch is refused");
                d.new_actor();
                if e.disk_full() {
                    if let Some(dir) = d.dir.clone() {
                        let free = super::disk::free_bytes(&dir).unwrap_or(0);
                        d.disk_full(&dir, free);
                    }
                }
            }
        }
        Committed {
            result,
            deferred,
            events,
            follow_ups,
            touched,
        }
    }
}

impl Committed {
    /// Answers every caller, hands follow-ups to the links, publishes the change events, and
    /// caches the batch's documents (last: it is on nobody's path).
    pub fn finish(self, d: &mut Driver) -> Result<(), StoreError> {
        let Committed {
            result,
            deferred,
            events,
            follow_ups,
            touched,
        } = self;
        if result.is_ok() {
            for (inbox, work) in follow_ups {
                inbox.deliver(work);
            }
        }
        for x in deferred {
            x.send(&result, &d.published.metrics);
        }
        for e in events {
            let _ = d.published.events.send(e);
        }
        if result.is_ok() {
            for (id, doc) in touched {
                d.cache.put(id, doc);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Node, NodeOptions};
    use serde_json::json;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Inbox(Mutex<Vec<LinkWork>>);

    impl PeerInbox for Inbox {
        fn accepting(&self) -> bool {
            true
        }
        fn deliver(&self, work: LinkWork) {
            self.0.lock().unwrap().push(work);
        }
    }

    fn opts(seed: u64) -> NodeOptions {
        NodeOptions {
            seed: Some(seed),
            ..NodeOptions::default()
        }
    }

    fn site(dir: &str) -> serde_json::Value {
        json!({"protocols": ["sftp"], "root_dir": dir})
    }

    /// The order of a batch is in its types: the push exists once the batch ran, the caller's
    /// answer only once the commit returned, and a failed commit turns an already pushed write's
    /// answer into "outcome unknown".
    #[test]
    fn a_write_is_pushed_before_its_commit_and_answered_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        Node::init(dir.path(), &Default::default(), &opts(1)).expect("init");
        let store = Arc::new(Store::open(&dir.path().join(super::super::DB_FILE)).expect("open"));
        let published = Arc::new(Driver::load_published(&store).expect("published").0);
        let inbox = Arc::new(Inbox::default());
        published.peers.register("peer", inbox.clone());
        let mut d = Driver::new(
            store.clone(),
            published,
            "node",
            crate::node::time::SystemClock::shared(),
            super::super::setup::seeded(Some(2)),
        );
        for fail in [false, true] {
            // The commit of this batch will fail (or not).
            store.fail_commits(fail);
            let (reply, mut rx) = oneshot::channel();
            let staged = d.execute(vec![Cmd::Write {
                kind: Kind::Site,
                name: "s1".into(),
                op: Op::Put(site(if fail { "/b" } else { "/a" })),
                by: None,
                reply,
            }]);
            assert_eq!(staged.pushes.len(), 1, "the write's push is staged");
            assert!(
                matches!(&staged.pushes[0].1, LinkWork::Ready(r) if r[0].id == "site/s1"),
                "a push message for the peer"
            );
            assert!(rx.try_recv().is_err(), "answered before the commit");
            let committed = staged.pending.commit(&mut d);
            assert_eq!(committed.result.is_err(), fail);
            assert!(rx.try_recv().is_err(), "answered before finish");
            let _ = committed.finish(&mut d);
            let answer = rx.try_recv().expect("answered");
            if fail {
                assert!(
                    matches!(answer, Err(Error::Unknown(_))),
                    "a pushed write whose commit failed has an unknown outcome: {answer:?}"
                );
            } else {
                assert!(answer.is_ok(), "{answer:?}");
            }
        }
        store.fail_commits(false);
    }

    /// Two pushes of one document new to the receiver, in one request (a peer that was busy
    /// sends what queued up together): the first arrives whole and is stored as the bytes it
    /// came in, the second adds a change. Both must be stored, not only the first save, or the
    /// index row (and the digest) would claim a change the stored document lacks. Found by the
    /// simulator (seed 5399606881237833068).
    #[test]
    fn two_pushes_of_a_new_document_in_one_request_are_both_stored() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (da, db) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        Node::init(da.path(), &Default::default(), &opts(1)).expect("init a");
        Node::init(db.path(), &Default::default(), &opts(3)).expect("init b");
        let a = Node::open(da.path(), opts(2)).expect("open a");
        let b = Node::open(db.path(), opts(4)).expect("open b");
        let id = crdt_schema::doc_id(Kind::Site, "s1");
        let (push1, push2, heads) = rt.block_on(async {
            a.put(Kind::Site, "s1", site("/one")).await.expect("put");
            let mut d = a.store().load_doc(&id).expect("load").expect("doc");
            let h1 = d.get_heads();
            let push1 = Sessions::push_message(h1.clone(), d.save(), &[]);
            a.patch(Kind::Site, "s1", json!({"root_dir": "/two"}))
                .await
                .expect("patch");
            let mut d = a.store().load_doc(&id).expect("load").expect("doc");
            let h2 = d.get_heads();
            let push2 = Sessions::push_message(h2.clone(), d.save_after(&h1), &[]);
            (push1, push2, h2)
        });
        let msgs = vec![(id.clone(), push1), (id.clone(), push2)];
        rt.block_on(b.serve("a", Request::Sync { msgs }))
            .expect("served");
        let mut stored = b.store().load_doc(&id).expect("load").expect("stored");
        assert_eq!(
            stored.get_heads(),
            heads,
            "the stored document lacks the second push"
        );
        let row = b.store().index_get(&id).expect("row").expect("indexed");
        assert_eq!(row.heads_hash, index::heads_hash(&mut stored));
        assert_eq!(
            b.get(Kind::Site, "s1").expect("read").expect("exists")["fields"]["root_dir"],
            json!("/two")
        );
    }

    /// A damaged index row (here: another entity's row, as a tampered disk might hold, with its
    /// checksum wrong) is never served: found when the node opens, rebuilt from its document
    /// before anything is served; and one damaged while running is rebuilt on the read that
    /// meets it.
    #[test]
    fn damaged_index_rows_are_rebuilt_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        Node::init(dir.path(), &Default::default(), &opts(1)).expect("init");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let node = Node::open(dir.path(), opts(2)).expect("open");
        rt.block_on(async {
            node.put(Kind::Site, "a", site("/a")).await.expect("put");
            node.put(Kind::Site, "b", site("/b")).await.expect("put");
        });
        let good = node.get(Kind::Site, "a").expect("read").expect("a");
        // The row of b, with its checksum, pasted over a's: the checksum still fails (it
        // covers the bytes, which are b's), and a bit flip is the same to it.
        let mut flipped = encode_entry_for_test(&node, "site/b");
        let last = flipped.len() - 10;
        flipped[last] ^= 1;
        node.store().tamper_row("site/a", &flipped);
        assert!(
            node.get(Kind::Site, "a").is_err(),
            "a damaged row was served"
        );
        // The read asked for a repair: the next one gets the rebuilt row.
        let repaired = (0..100).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            node.get(Kind::Site, "a").ok().flatten()
        });
        assert_eq!(repaired.as_ref(), Some(&good));
        // Damaged while stopped: rebuilt at open, before serving.
        node.store().tamper_row("site/b", b"garbage");
        node.shutdown();
        let node = Node::open(dir.path(), opts(3)).expect("reopen");
        assert_eq!(
            node.get(Kind::Site, "b").expect("read").expect("b")["fields"]["root_dir"],
            json!("/b")
        );
        assert_eq!(node.list(Kind::Site).expect("list").len(), 2);
    }

    fn encode_entry_for_test(node: &Node, id: &str) -> Vec<u8> {
        let e = node.store().index_get(id).expect("row").expect("present");
        let mut b = crate::core::wire::encode(&e);
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        b
    }

    /// A failed commit's changes may already be at peers (pushed before the commit): the actor
    /// that made them must never make another change, or the next one would reuse their sequence
    /// numbers with other contents.
    #[test]
    fn a_failed_commit_retires_the_actor_that_made_its_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        Node::init(dir.path(), &Default::default(), &opts(1)).expect("init");
        let node = Node::open(dir.path(), opts(2)).expect("open");
        let store = node.store().clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
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
        Node::init(da.path(), &Default::default(), &opts(1)).expect("init a");
        Node::init(db.path(), &Default::default(), &opts(3)).expect("init b");
        let a = Node::open(da.path(), opts(2)).expect("open a");
        let b = Node::open(db.path(), opts(4)).expect("open b");
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
                let mut d = a.store().load_doc(id).expect("load").expect("doc");
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
            node.store()
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

    /// A node of its own cluster, in a temporary directory, and a runtime to drive it.
    fn fresh_node() -> (tokio::runtime::Runtime, tempfile::TempDir, Node) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        Node::init(dir.path(), &Default::default(), &opts(1)).expect("init");
        let b = Node::open(dir.path(), opts(2)).expect("open");
        (rt, dir, b)
    }

    /// Messages and documents of `peer` that `b` refused.
    fn rejected_by(b: &Node, peer: &str) -> u64 {
        b.published()
            .metrics
            .rejected
            .get_or_create(&PeerLabel { peer: peer.into() })
            .get()
    }

    /// What a peer changed or sent is checked against the layout of its kind before it is
    /// stored: a hand-built change that nests a map where the schema has a register, or writes a
    /// string to an integer field, or breaks the member list's flat layout, is refused. The
    /// stored document stays as it was, nothing is cached or served from the refused copy, the
    /// refusal is counted against the peer, and a valid change from the same peer still goes
    /// through. A whole document planted by sync or by fetch is refused the same way.
    #[test]
    fn changes_that_break_the_layout_are_refused() {
        use automerge::transaction::Transactable;
        use automerge::ObjType;
        let (rt, dir, b) = fresh_node();
        let id = crdt_schema::doc_id(Kind::Site, "s1");
        rt.block_on(b.put(Kind::Site, "s1", site("/one")))
            .expect("put");
        let stored = |b: &Node, id: &str| b.store().load_doc(id).expect("load");
        let rejected = |b: &Node| rejected_by(b, "evil");
        // A change on top of what `b` stores, by another actor, sent as a push.
        let push = |base: &AutoCommit, edit: &dyn Fn(&mut AutoCommit)| {
            let mut d = base.clone();
            d.set_actor(ActorId::from(vec![0xee; 16]));
            let before = d.get_heads();
            edit(&mut d);
            d.commit();
            let heads = d.get_heads();
            Sessions::push_message(heads.clone(), d.save_after(&before), &[])
        };
        let base = stored(&b, &id).expect("stored");
        let base_heads = base.clone().get_heads();
        type Edit = Box<dyn Fn(&mut AutoCommit)>;
        let bad: Vec<(&str, Edit)> = vec![
            (
                "a map where root_dir's register is",
                Box::new(|d| {
                    d.put_object(automerge::ROOT, "root_dir", ObjType::Map)
                        .expect("put_object");
                }),
            ),
            (
                "a string in max_sessions",
                Box::new(|d| {
                    d.put(automerge::ROOT, "max_sessions", "lots").expect("put");
                }),
            ),
            (
                "a new protocols container",
                Box::new(|d| {
                    d.put_object(automerge::ROOT, "protocols", ObjType::Map)
                        .expect("put_object");
                }),
            ),
        ];
        for (n, (what, edit)) in bad.iter().enumerate() {
            let msgs = vec![(id.clone(), push(&base, edit.as_ref()))];
            rt.block_on(b.serve("evil", Request::Sync { msgs }))
                .expect("served");
            assert_eq!(
                stored(&b, &id).expect("stored").get_heads(),
                base_heads,
                "{what}: the refused change was stored"
            );
            assert_eq!(rejected(&b), n as u64 + 1, "{what}: not counted");
            // What a crash leaves now (the database and the log as they are) must not bring
            // the refused change back when the log is replayed: a record started ahead of the
            // batch held it.
            let crashed = dir.path().join(format!("crashed{n}"));
            std::fs::create_dir(&crashed).expect("mkdir");
            let db = dir.path().join(super::super::DB_FILE);
            let copy = crashed.join(super::super::DB_FILE);
            std::fs::copy(&db, &copy).expect("copy db");
            std::fs::copy(crate::store::wal_path(&db), crate::store::wal_path(&copy))
                .expect("copy wal");
            let replayed = Store::open(&copy).expect("the crashed copy opens");
            assert_eq!(
                replayed
                    .load_doc(&id)
                    .expect("load")
                    .expect("stored")
                    .get_heads(),
                base_heads,
                "{what}: the refused change came back from the log"
            );
        }
        let read = b.get(Kind::Site, "s1").expect("read").expect("exists");
        assert_eq!(read["fields"]["root_dir"], json!("/one"));
        // The cache holds nothing of a refused copy: a local write builds on what is stored.
        rt.block_on(b.patch(Kind::Site, "s1", json!({"max_sessions": 7})))
            .expect("patch");
        let mut now = stored(&b, &id).expect("stored");
        let doc_state = doc::read(&now, Kind::Site, "s1").expect("reads");
        assert_eq!(doc_state.fields["max_sessions"], json!(7));
        doc::check_layout(&now, Kind::Site).expect("what is stored has the layout");
        let ours = now.get_heads();
        // A valid change from the same peer is taken.
        let msgs = vec![(
            id.clone(),
            push(&now, &|d: &mut AutoCommit| {
                d.put(automerge::ROOT, "root_dir", "/two").expect("put");
            }),
        )];
        rt.block_on(b.serve("evil", Request::Sync { msgs }))
            .expect("served");
        assert_ne!(stored(&b, &id).expect("stored").get_heads(), ours);
        assert_eq!(
            b.get(Kind::Site, "s1").expect("read").expect("exists")["fields"]["root_dir"],
            json!("/two")
        );
        assert_eq!(rejected(&b), 3, "a valid change was refused");
        // A whole document planted by sync, and by fetch.
        let planted = crdt_schema::doc_id(Kind::Site, "planted");
        let mut p = doc::genesis(Kind::Site);
        p.set_actor(ActorId::from(vec![0xee; 16]));
        p.put(automerge::ROOT, "_alive", true).expect("put");
        p.put(automerge::ROOT, "enabled", 1i64).expect("put");
        p.commit();
        let whole = p.save();
        let msgs = vec![(
            planted.clone(),
            Sessions::push_message(p.get_heads(), whole.clone(), &[]),
        )];
        rt.block_on(b.serve("evil", Request::Sync { msgs }))
            .expect("served");
        assert!(
            stored(&b, &planted).is_none(),
            "a planted document was stored"
        );
        assert_eq!(b.get(Kind::Site, "planted").expect("read"), None);
        assert_eq!(rejected(&b), 4);
        let n = rt
            .block_on(b.ingest("evil", vec![(planted.clone(), whole)]))
            .expect("ingest");
        assert_eq!(n, 0, "a fetched document that breaks its layout was taken");
        assert!(stored(&b, &planted).is_none());
        assert_eq!(rejected(&b), 5);
        // The member list has its own layout: flat registers, never a nested object.
        let members = stored(&b, MEMBERS_DOC).expect("members");
        let before = members.clone().get_heads();
        let msgs = vec![(
            MEMBERS_DOC.to_string(),
            push(&members, &|d: &mut AutoCommit| {
                d.put_object(automerge::ROOT, "x/name", ObjType::Map)
                    .expect("put_object");
            }),
        )];
        rt.block_on(b.serve("evil", Request::Sync { msgs }))
            .expect("served");
        assert_eq!(
            stored(&b, MEMBERS_DOC).expect("members").get_heads(),
            before
        );
        assert_eq!(b.members().len(), 1);
        assert_eq!(rejected(&b), 6);
    }

    /// A peer's change that writes a secret's value into a document (where only references may
    /// be) is refused and counted, and nothing of it is stored; the same change made properly (a
    /// reference, the value offered beside it) is taken, and the value is held sealed.
    #[test]
    fn a_peer_change_holding_a_secret_value_is_refused() {
        use automerge::transaction::Transactable;
        let (rt, _dir, b) = fresh_node();
        let id = crdt_schema::doc_id(Kind::User, "u1");
        rt.block_on(b.put(Kind::User, "u1", json!({"password": "first-Passw0rd!"})))
            .expect("put");
        let base = b.store().load_doc(&id).expect("load").expect("stored");
        let base_heads = base.clone().get_heads();
        let mine = b.store().secret(&id, "password").expect("secret");
        assert!(mine.is_some());
        let push = |value: &str, offered: &[(String, String)]| {
            let mut d = base.clone();
            d.set_actor(ActorId::from(vec![0xee; 16]));
            let before = d.get_heads();
            d.put(automerge::ROOT, "password", value).expect("put");
            d.commit();
            Sessions::push_message(d.get_heads(), d.save_after(&before), offered)
        };
        let rejected = |b: &Node| rejected_by(b, "evil");
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$planted-by-a-peer";
        let msgs = vec![(id.clone(), push(hash, &[]))];
        rt.block_on(b.serve("evil", Request::Sync { msgs }))
            .expect("served");
        assert_eq!(rejected(&b), 1, "not counted");
        let mut now = b.store().load_doc(&id).expect("load").expect("stored");
        assert_eq!(now.get_heads(), base_heads, "the refused change was stored");
        assert_eq!(b.store().secret(&id, "password").expect("secret"), mine);
        // Done properly: a reference, and the value beside it.
        let r = crdt_schema::secret::secret_ref(&id, "password", hash);
        let msgs = vec![(
            id.clone(),
            push(&r, &[("password".to_string(), hash.to_string())]),
        )];
        rt.block_on(b.serve("evil", Request::Sync { msgs }))
            .expect("served");
        assert_eq!(rejected(&b), 1, "a proper change was refused");
        now = b.store().load_doc(&id).expect("load").expect("stored");
        assert_ne!(now.get_heads(), base_heads);
        assert_eq!(
            b.store()
                .secret(&id, "password")
                .expect("secret")
                .as_deref(),
            Some(hash)
        );
    }

    /// A secret read while the at-rest key rotates always opens: the reader never holds a value
    /// sealed under a key the rotation already dropped (seen as `UnknownKey(1)` in a full test
    /// run, when a rotation fell between a read's snapshot and its look at the key ring).
    #[test]
    fn secrets_read_during_key_rotations_always_open() {
        let (rt, _dir, b) = fresh_node();
        let id = crdt_schema::doc_id(Kind::User, "u1");
        rt.block_on(b.put(Kind::User, "u1", json!({"password": "first-Passw0rd!"})))
            .expect("put");
        let want = b.store().secret(&id, "password").expect("secret");
        assert!(want.is_some());
        let store = b.store().clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let got = store.secret(&id, "password");
                    assert_eq!(got.as_ref().ok(), Some(&want), "read {reads}: {got:?}");
                    reads += 1;
                }
                reads
            })
        };
        for _ in 0..40 {
            rt.block_on(b.compact()).expect("rotation");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().expect("every read opened its value");
        assert!(reads > 0);
    }

    /// The member list's layout check accepts what `core::members` writes and refuses what it
    /// never does.
    #[test]
    fn the_member_list_layout() {
        use automerge::transaction::Transactable;
        let mut d = members::genesis();
        d.set_actor(ActorId::from(vec![1u8; 16]));
        d.put(automerge::ROOT, "n1/name", "one").expect("put");
        d.put(automerge::ROOT, "n1/removed", false).expect("put");
        d.put(automerge::ROOT, "n1/future_field", 3i64)
            .expect("put");
        d.commit();
        check_members_layout(&d).expect("valid");
        for (key, v) in [
            ("n1/removed", automerge::ScalarValue::Str("no".into())),
            ("n1/name", automerge::ScalarValue::Int(1)),
            ("noslash", automerge::ScalarValue::Int(1)),
            ("_kind", automerge::ScalarValue::Str("site".into())),
        ] {
            let mut bad = d.clone();
            bad.put(automerge::ROOT, key, v).expect("put");
            bad.commit();
            assert!(check_members_layout(&bad).is_err(), "{key} accepted");
        }
        assert!(check_members_layout(&doc::genesis(Kind::Site)).is_err());
    }
}
