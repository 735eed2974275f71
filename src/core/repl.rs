//! Layer: core (sans-IO; imports only other core modules and `crdt-schema`).
//!
//! Replication: Automerge sync sessions per (peer, direction, document), the responder side of
//! every replication request, and the initiator's replication cycle.
//!
//! Each pair of nodes runs two independent sessions per document: one for exchanges this node
//! starts (`Dir::Out`) and one for exchanges the peer starts (`Dir::In`), so each session is a
//! clean request/response dialogue. A session whose exchange failed is reset (its in-flight
//! markers cleared) so a lost message can never stall a pair.

use super::digest::{self, Digest, Hash, Plan};
use super::members::MEMBERS_DOC;
use super::proto::{Request, Response, FETCH_DOCS_MAX};
use automerge::sync::{self, SyncDoc};
use automerge::AutoCommit;
use std::num::NonZeroUsize;

/// Sync sessions kept: beyond this the least recently used restart from scratch (one extra round
/// trip), so memory does not grow with the number of documents.
pub const SESSIONS_MAX: usize = 65_536;
/// Bytes of saved documents in one fetch answer.
pub const FETCH_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    Out,
    In,
}

/// The documents of a node, as replication sees them. The caller persists every document reported
/// by [`Docs::changed`] before any answer leaves the node.
pub trait Docs {
    /// An existing document.
    fn get(&mut self, id: &str) -> Result<Option<&mut AutoCommit>, DocsError>;
    /// An existing document, or a new empty one (not persisted unless it changes).
    fn get_or_create(&mut self, id: &str) -> Result<&mut AutoCommit, DocsError>;
    /// Adds a document this node did not have (it is changed, and persisted).
    fn insert(&mut self, id: &str, doc: AutoCommit);
    /// Adds a document this node did not have, loaded from `saved`: those bytes can be stored as
    /// they are instead of saving the document again.
    fn insert_loaded(&mut self, id: &str, doc: AutoCommit, saved: &[u8]) {
        let _ = saved;
        self.insert(id, doc);
    }
    /// The document changed.
    fn changed(&mut self, id: &str);
    /// Changes were applied that the message did not carry (the document held changes queued
    /// for missing dependencies, and this message released them).
    fn unlogged(&mut self) {}
    /// Its saved bytes, for a peer that lacks it.
    fn saved(&mut self, id: &str) -> Result<Option<Vec<u8>>, DocsError>;
    /// The secret values its secret fields currently show (field, value), which travel with
    /// every message that carries its changes ([`crdt_schema::secret`]).
    fn secrets(&mut self, id: &str) -> Vec<(String, String)> {
        let _ = id;
        Vec::new()
    }
    /// Secret values a peer sent with a message for the document: kept if, once the batch is
    /// applied, the document shows their references.
    fn offer_secrets(&mut self, id: &str, secrets: Vec<(String, String)>) {
        let _ = (id, secrets);
    }
}

/// A message for one document as it travels: the Automerge bytes (a sync message, or a saved
/// document in a fetch answer), followed, when the document has secret values to send, by those
/// values. Bytes that do not start with [`FRAMED`] are Automerge bytes alone (an Automerge
/// message or document never starts with it).
const FRAMED: u8 = 0xF5;

/// Frames Automerge bytes with the document's secret values (none: the bytes as they are).
pub fn frame(bytes: Vec<u8>, secrets: &[(String, String)]) -> Vec<u8> {
    if secrets.is_empty() {
        return bytes;
    }
    let tail = super::wire::encode(&secrets.to_vec());
    let mut out = Vec::with_capacity(1 + 4 + bytes.len() + tail.len());
    out.push(FRAMED);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
    out.extend_from_slice(&tail);
    out
}

/// A document message from a peer: its Automerge bytes and the secret values sent with them.
pub type Unframed<'a> = (&'a [u8], Vec<(String, String)>);

/// The parts of a framed message ([`frame`]).
pub fn unframe(bytes: &[u8]) -> Result<Unframed<'_>, Reject> {
    if bytes.first() != Some(&FRAMED) {
        return Ok((bytes, Vec::new()));
    }
    let bad = |what: &str| Reject::Malformed(format!("framed message: {what}"));
    let len = bytes
        .get(1..5)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| bad("truncated length"))?;
    let body = bytes
        .get(5..5usize.saturating_add(len))
        .ok_or_else(|| bad("truncated body"))?;
    let secrets: Vec<(String, String)> =
        super::wire::decode(&bytes[5 + len..]).map_err(|e| bad(&e.to_string()))?;
    Ok((body, secrets))
}

/// The secret field a chunk of Automerge bytes (one change, or a saved document) writes a value
/// into rather than a reference: never accepted from a peer.
pub fn secret_value_in(chunk: &[u8], id: &str) -> Option<&'static str> {
    let Ok((kind, _)) = crdt_schema::parse_doc_id(id) else {
        return None;
    };
    crdt_schema::secret::secret_fields(kind).next()?;
    if let Ok(change) = automerge::Change::try_from(chunk) {
        return crdt_schema::secret::change_puts_value(&change, kind);
    }
    let mut doc = AutoCommit::load(chunk).ok()?;
    secret_value_in_doc(&mut doc, kind)
}

/// The secret field some change of `doc` writes a value into, if any.
pub fn secret_value_in_doc(doc: &mut AutoCommit, kind: crdt_schema::Kind) -> Option<&'static str> {
    crdt_schema::secret::secret_fields(kind).next()?;
    doc.get_changes(&[])
        .into_iter()
        .find_map(|c| crdt_schema::secret::change_puts_value(&c, kind))
}

/// A document access failed below the core (the store); the message says why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DocsError(pub String);

/// Why a peer's message for one document was not applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Reject {
    #[error("not a document ID")]
    BadId,
    #[error("malformed sync message: {0}")]
    Malformed(String),
    #[error("does not apply: {0}")]
    Apply(String),
    #[error("storage: {0}")]
    Storage(DocsError),
    #[error("a change writes a secret value into {0} (only references travel)")]
    SecretValue(&'static str),
}

/// A peer's message for one document that was not applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: String,
    pub reason: Reject,
}

impl Rejected {
    fn new(id: &str, reason: Reject) -> Rejected {
        Rejected {
            id: id.chars().take(200).collect(),
            reason,
        }
    }
}

/// What answering a peer's request produced: the answer, and what of the request was refused.
#[derive(Debug)]
pub struct Served {
    pub resp: Response,
    pub rejected: Vec<Rejected>,
}

/// Whether a peer may name this document: the member list or a valid `kind/name`.
pub fn valid_doc_id(id: &str) -> bool {
    id == MEMBERS_DOC || crdt_schema::parse_doc_id(id).is_ok()
}

pub struct Sessions {
    map: lru::LruCache<(String, Dir, String), sync::State>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            map: lru::LruCache::new(NonZeroUsize::new(SESSIONS_MAX).expect("nonzero")),
        }
    }
}

impl Sessions {
    /// Sync messages for the given documents (those with nothing to say are left out).
    pub fn generate(
        &mut self,
        docs: &mut dyn Docs,
        peer: &str,
        dir: Dir,
        ids: &[String],
    ) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for id in ids {
            self.generate_one(docs, peer, dir, id, &mut out);
        }
        out
    }

    /// A push: the sync message carrying the changes one local write made (`changes`, as saved
    /// bytes) together with the document's heads after it, made without first learning what the
    /// peer has. A peer that has the changes' dependencies applies them at once, so a write reaches
    /// it in one round trip; a peer that lacks some answers with what it needs, and the exchange
    /// goes on as any sync does. The message is the same for every peer; each peer's session
    /// records that our heads were announced, so the peer's answer ends the exchange when it has
    /// everything. The changes are deliberately not recorded as sent: should the peer lose them,
    /// nothing stops them from being sent again.
    pub fn push_message(
        heads: Vec<automerge::ChangeHash>,
        changes: Vec<u8>,
        secrets: &[(String, String)],
    ) -> Vec<u8> {
        let mut flags = sync::MessageFlags::new();
        flags.set(sync::MessageFlags::SUPPORTS_SYNC_RESET);
        let m = sync::Message {
            heads,
            need: Vec::new(),
            have: Vec::new(),
            changes: vec![changes].into(),
            flags: Some(flags),
            version: sync::MessageVersion::V2,
        }
        .encode();
        frame(m, secrets)
    }

    /// Records in `peer`'s session for `id` that a push announcing `heads` went out.
    pub fn pushed(&mut self, peer: &str, id: &str, heads: &[automerge::ChangeHash]) {
        let st = self.map.get_or_insert_mut(
            (peer.to_string(), Dir::Out, id.to_string()),
            sync::State::new,
        );
        st.last_sent_heads = heads.to_vec();
        st.have_responded = true;
        // Not marked in flight: an answer that ends the push is not handed back to the session
        // (see `ends_push`), and a session left in flight would send nothing until reset.
    }

    /// Whether a peer's answer to a push says the exchange is over: it has exactly the heads
    /// pushed, needs nothing and sends nothing. Such an answer is not applied to the session:
    /// it would only teach it the peer's heads, which the session learns again the next time
    /// it is used. Anything else (a need, changes, other heads, bytes that do not decode) goes
    /// through the session as usual.
    pub fn ends_push(answer: &[u8], pushed: &[automerge::ChangeHash]) -> bool {
        let Ok((answer, secrets)) = unframe(answer) else {
            return false;
        };
        if !secrets.is_empty() {
            return false;
        }
        let Ok(m) = sync::Message::decode(answer) else {
            return false;
        };
        let mut heads = m.heads.clone();
        heads.sort();
        let mut want = pushed.to_vec();
        want.sort();
        m.changes.is_empty() && m.need.is_empty() && heads == want
    }

    fn generate_one(
        &mut self,
        docs: &mut dyn Docs,
        peer: &str,
        dir: Dir,
        id: &str,
        out: &mut Vec<(String, Vec<u8>)>,
    ) {
        if !valid_doc_id(id) {
            return;
        }
        let Ok(doc) = docs.get_or_create(id) else {
            return;
        };
        let st = self
            .map
            .get_or_insert_mut((peer.to_string(), dir, id.to_string()), sync::State::new);
        let Some(m) = doc.sync().generate_sync_message(st) else {
            return;
        };
        let carries = !m.changes.is_empty();
        let bytes = m.encode();
        let secrets = if carries {
            docs.secrets(id)
        } else {
            Vec::new()
        };
        out.push((id.to_string(), frame(bytes, &secrets)));
    }

    /// Applies a peer's sync messages. Malformed ones are skipped and their session reset; the
    /// returned rejections name them (the caller counts and logs them with the peer's ID).
    pub fn receive(
        &mut self,
        docs: &mut dyn Docs,
        peer: &str,
        dir: Dir,
        msgs: Vec<(String, Vec<u8>)>,
    ) -> Vec<Rejected> {
        let mut errors = Vec::new();
        for (id, bytes) in msgs {
            if !valid_doc_id(&id) {
                errors.push(Rejected::new(&id, Reject::BadId));
                continue;
            }
            let (body, secrets) = match unframe(&bytes) {
                Ok(x) => x,
                Err(e) => {
                    self.reset(peer, dir, &id);
                    errors.push(Rejected::new(&id, e));
                    continue;
                }
            };
            let mut msg = match sync::Message::decode(body) {
                Ok(m) => m,
                Err(e) => {
                    self.reset(peer, dir, &id);
                    errors.push(Rejected::new(&id, Reject::Malformed(e.to_string())));
                    continue;
                }
            };
            // A change that puts a secret value (not a reference) into the history would keep it
            // there on every node for ever: the whole message is refused.
            if let Some(field) = msg.changes.iter().find_map(|c| secret_value_in(c, &id)) {
                self.reset(peer, dir, &id);
                errors.push(Rejected::new(&id, Reject::SecretValue(field)));
                continue;
            }
            if !secrets.is_empty() {
                docs.offer_secrets(&id, secrets);
            }
            // A document new here that arrives whole (a push of a new document): load it from
            // the bytes and keep them as its stored save, instead of saving it again. The session
            // then takes the message without its changes, which leaves it as if it had applied
            // them (every head the message names is now known).
            if msg.changes.len() == 1 && matches!(docs.get(&id), Ok(None)) {
                let chunk = msg.changes.iter().next().unwrap_or_default();
                if let Ok(loaded) = AutoCommit::load(chunk) {
                    docs.insert_loaded(&id, loaded, chunk);
                    msg.changes = sync::ChunkList::empty();
                }
            }
            let doc = match docs.get_or_create(&id) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(Rejected::new(&id, Reject::Storage(e)));
                    continue;
                }
            };
            let before = doc.get_heads();
            let queued = !doc.get_missing_deps(&[]).is_empty();
            let st = self
                .map
                .get_or_insert_mut((peer.to_string(), dir, id.clone()), sync::State::new);
            let received = doc.sync().receive_sync_message(st, msg);
            match received {
                Ok(()) => {
                    if doc.get_heads() != before {
                        docs.changed(&id);
                        if queued {
                            docs.unlogged();
                        }
                    }
                }
                Err(e) => {
                    self.reset(peer, dir, &id);
                    errors.push(Rejected::new(&id, Reject::Apply(e.to_string())));
                }
            }
        }
        errors
    }

    fn reset(&mut self, peer: &str, dir: Dir, id: &str) {
        if let Some(st) = self.map.get_mut(&(peer.to_string(), dir, id.to_string())) {
            *st = reset_state(st);
        }
    }

    /// After a failed exchange with `peer` (a lost request or answer, a reconnect): clears every
    /// session's in-flight markers, keeping what is known of the peer's heads.
    pub fn reset_peer(&mut self, peer: &str) {
        for ((p, _, _), st) in self.map.iter_mut() {
            if p == peer {
                *st = reset_state(st);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn reset_state(st: &sync::State) -> sync::State {
    sync::State::decode(&st.encode()).unwrap_or_default()
}

/// Applies saved bytes of a document fetched from a peer (merging with what is here).
/// `bytes`: the document's saved bytes, unframed; `secrets`: the values that came with them.
pub fn ingest(
    docs: &mut dyn Docs,
    id: &str,
    bytes: &[u8],
    secrets: Vec<(String, String)>,
) -> Result<(), Rejected> {
    if !valid_doc_id(id) {
        return Err(Rejected::new(id, Reject::BadId));
    }
    let storage = |e| Rejected::new(id, Reject::Storage(e));
    let mut doc =
        AutoCommit::load(bytes).map_err(|e| Rejected::new(id, Reject::Malformed(e.to_string())))?;
    if let Ok((kind, _)) = crdt_schema::parse_doc_id(id) {
        if let Some(field) = secret_value_in_doc(&mut doc, kind) {
            return Err(Rejected::new(id, Reject::SecretValue(field)));
        }
    }
    if !secrets.is_empty() {
        docs.offer_secrets(id, secrets);
    }
    if docs.get(id).map_err(storage)?.is_none() {
        // A document new to this node loads whole: several times cheaper than applying the same
        // bytes to an empty document.
        docs.insert_loaded(id, doc, bytes);
        return Ok(());
    }
    let doc = docs.get_or_create(id).map_err(storage)?;
    let before = doc.get_heads();
    doc.load_incremental(bytes)
        .map_err(|e| Rejected::new(id, Reject::Apply(e.to_string())))?;
    if doc.get_heads() != before {
        docs.changed(id);
    }
    Ok(())
}

/// The answer to a digest request (root, bucket hashes, document heads hashes), from the digest of
/// what is committed: the one responder for these, used by the IPC server (without the driver)
/// and by the simulator. None for any other request. `catching_up`: this node is fetching
/// documents, so comparing digests with it now would only list what it lacks.
pub fn answer_digest(req: &Request, digest: &mut Digest, catching_up: bool) -> Option<Response> {
    Some(match req {
        Request::DigestRoot { root } if *root == digest.root() => Response::InSync,
        Request::DigestRoot { .. } if catching_up => Response::CatchingUp,
        Request::DigestRoot { .. } => Response::Buckets {
            hashes: digest.buckets().to_vec(),
        },
        Request::BucketDocs { buckets } => Response::BucketDocs {
            docs: digest.entries(buckets),
        },
        _ => return None,
    })
}

/// The responder side of the requests that touch documents (sync, fetch). The caller persists the
/// changed documents before sending the answer. Digest requests go to [`answer_digest`]; join and
/// heartbeat are not replication.
pub fn serve(req: Request, peer: &str, sessions: &mut Sessions, docs: &mut dyn Docs) -> Served {
    let resp = match req {
        Request::Sync { msgs } => {
            let ids: Vec<String> = msgs.iter().map(|(id, _)| id.clone()).collect();
            // Errors in a peer's messages reset the sessions concerned; the exchange goes on
            // for the other documents. The caller logs them with the peer's ID.
            let rejected = sessions.receive(docs, peer, Dir::In, msgs);
            let resp = Response::Sync {
                msgs: sessions.generate(docs, peer, Dir::In, &ids),
            };
            return Served { resp, rejected };
        }
        Request::Fetch { ids } => {
            let mut out = Vec::new();
            let mut bytes = 0;
            for id in ids.into_iter().take(FETCH_DOCS_MAX) {
                if !valid_doc_id(&id) {
                    continue;
                }
                if let Ok(Some(b)) = docs.saved(&id) {
                    bytes += b.len();
                    let secrets = docs.secrets(&id);
                    out.push((id, frame(b, &secrets)));
                    if bytes > FETCH_BYTES_MAX {
                        break;
                    }
                }
            }
            Response::Docs { docs: out }
        }
        Request::DigestRoot { .. }
        | Request::BucketDocs { .. }
        | Request::Join(_)
        | Request::Heartbeat(_) => Response::Refused {
            reason: super::proto::Refusal::BadRequest,
            message: "not a request for documents".into(),
        },
    };
    Served {
        resp,
        rejected: Vec::new(),
    }
}

/// Why a replication cycle stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CycleError {
    #[error("the peer refused the cycle ({reason:?}): {message}")]
    Refused {
        reason: super::proto::Refusal,
        message: String,
    },
    #[error("unexpected answer in a replication cycle: {0}")]
    Unexpected(&'static str),
}

/// The initiator's side of a replication cycle: root, then buckets, then document heads.
#[derive(Debug)]
pub enum Cycle {
    AwaitRoot,
    AwaitDocs { buckets: Vec<u8> },
}

/// What a cycle step asks for next.
pub enum Next {
    Send(Request),
    /// The cycle is over; this is the work it found (empty when in sync).
    Done(Plan),
}

impl Cycle {
    pub fn start(digest: &mut Digest) -> (Cycle, Request) {
        (
            Cycle::AwaitRoot,
            Request::DigestRoot {
                root: digest.root(),
            },
        )
    }

    pub fn step(&mut self, digest: &Digest, resp: Response) -> Result<Next, CycleError> {
        match (&*self, resp) {
            (Cycle::AwaitRoot, Response::InSync | Response::CatchingUp) => {
                Ok(Next::Done(Plan::default()))
            }
            (Cycle::AwaitRoot, Response::Buckets { hashes }) => {
                let buckets = digest.differing(&hashes);
                if buckets.is_empty() {
                    return Ok(Next::Done(Plan::default()));
                }
                *self = Cycle::AwaitDocs {
                    buckets: buckets.clone(),
                };
                Ok(Next::Send(Request::BucketDocs { buckets }))
            }
            (Cycle::AwaitDocs { buckets }, Response::BucketDocs { docs }) => {
                let theirs: Vec<(String, Hash)> = docs
                    .into_iter()
                    .filter(|(id, _)| valid_doc_id(id) && buckets.contains(&digest::bucket_of(id)))
                    .collect();
                Ok(Next::Done(digest::plan(&digest.entries(buckets), &theirs)))
            }
            (_, Response::Refused { reason, message }) => {
                Err(CycleError::Refused { reason, message })
            }
            (_, other) => Err(CycleError::Unexpected(other.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ROOT;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Mem(HashMap<String, AutoCommit>);

    impl Docs for Mem {
        fn get(&mut self, id: &str) -> Result<Option<&mut AutoCommit>, DocsError> {
            Ok(self.0.get_mut(id))
        }
        fn get_or_create(&mut self, id: &str) -> Result<&mut AutoCommit, DocsError> {
            Ok(self.0.entry(id.to_string()).or_default())
        }
        fn insert(&mut self, id: &str, doc: AutoCommit) {
            self.0.insert(id.to_string(), doc);
        }
        fn changed(&mut self, _id: &str) {}
        fn saved(&mut self, id: &str) -> Result<Option<Vec<u8>>, DocsError> {
            Ok(self.0.get_mut(id).map(|d| d.save()))
        }
    }

    const ID: &str = "user/alice";

    fn edit(d: &mut AutoCommit, v: &str) {
        d.put(ROOT, "home", v).expect("put");
        d.commit();
    }

    /// Pushes `msg` from a to b and returns b's answer for the document.
    fn exchange(b: &mut Mem, b_sessions: &mut Sessions, msg: Vec<u8>) -> Vec<u8> {
        let errors = b_sessions.receive(b, "a", Dir::In, vec![(ID.into(), msg)]);
        assert!(errors.is_empty(), "{errors:?}");
        let mut out = b_sessions.generate(b, "a", Dir::In, &[ID.into()]);
        assert_eq!(out.len(), 1, "b answers the push");
        out.remove(0).1
    }

    #[test]
    fn a_push_to_a_peer_with_the_dependencies_is_one_round_trip() {
        let mut a = AutoCommit::new();
        edit(&mut a, "/one");
        // A new document goes whole.
        let (mut b, mut bs) = (Mem::default(), Sessions::default());
        let heads = a.get_heads();
        let answer = exchange(
            &mut b,
            &mut bs,
            Sessions::push_message(heads.clone(), a.save(), &[]),
        );
        assert_eq!(b.0.get_mut(ID).expect("b has it").get_heads(), heads);
        assert!(
            Sessions::ends_push(&answer, &heads),
            "the answer ends the push"
        );
        // An edit goes as its changes alone.
        let before = a.get_heads();
        edit(&mut a, "/two");
        let heads = a.get_heads();
        let push = Sessions::push_message(heads.clone(), a.save_after(&before), &[]);
        let answer = exchange(&mut b, &mut bs, push);
        assert_eq!(b.0.get_mut(ID).expect("b has it").get_heads(), heads);
        assert!(Sessions::ends_push(&answer, &heads));
    }

    #[test]
    fn a_peer_missing_dependencies_asks_and_the_session_sends_them() {
        let mut a = Mem::default();
        let mut doc = AutoCommit::new();
        edit(&mut doc, "/one");
        let before = doc.get_heads();
        edit(&mut doc, "/two");
        let heads = doc.get_heads();
        let push = Sessions::push_message(heads.clone(), doc.save_after(&before), &[]);
        a.insert(ID, doc);
        let mut a_sessions = Sessions::default();
        a_sessions.pushed("b", ID, &heads);

        // b never saw the first change.
        let (mut b, mut bs) = (Mem::default(), Sessions::default());
        let mut answer = exchange(&mut b, &mut bs, push);
        assert!(!Sessions::ends_push(&answer, &heads), "b needs more");
        for _ in 0..4 {
            a_sessions.receive(&mut a, "b", Dir::Out, vec![(ID.into(), answer)]);
            let next = a_sessions.generate(&mut a, "b", Dir::Out, &[ID.into()]);
            let Some((_, m)) = next.into_iter().next() else {
                break;
            };
            answer = exchange(&mut b, &mut bs, m);
        }
        assert_eq!(b.0.get_mut(ID).expect("b has it").get_heads(), heads);
        assert!(!Sessions::ends_push(b"not a sync message", &heads));
    }
}
