//! Layer: core (sans-IO).
//!
//! The IPC protocol: versioned request and response enums inside an envelope. Every request
//! travels as one HTTPS POST to `/ipc/v1`; the cluster ID and protocol version also travel as
//! headers, so another cluster's traffic is refused before its body is decoded.

use super::digest::Hash;
use super::members::Member;
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to these types.
pub const PROTOCOL_VERSION: u32 = 3;
/// Documents in one sync request: bounds one request's size and the work of one commit.
pub const SYNC_DOCS_MAX: usize = 512;
/// Documents in one fetch: a batch of saved documents stays around a few MB.
pub const FETCH_DOCS_MAX: usize = 2048;
/// Largest IPC body accepted: a fetch batch of large scripts, with room.
pub const BODY_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Rounds of one sync exchange before it is left to the next cycle: a pair converges in two or
/// three; more means a peer misbehaves.
pub const SYNC_ROUNDS_MAX: usize = 16;

pub const HEADER_CLUSTER: &str = "x-peerconf-cluster";
pub const HEADER_PROTOCOL: &str = "x-peerconf-protocol";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope<T> {
    pub protocol: u32,
    /// Empty on a join request (the joiner does not know it yet).
    pub cluster_id: String,
    /// Node ID of the sender.
    pub from: String,
    /// Software version of the sender.
    pub version: String,
    pub body: T,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// Automerge sync messages, one per document.
    Sync {
        msgs: Vec<(String, Vec<u8>)>,
    },
    /// Start of a replication cycle: our digest root.
    DigestRoot {
        root: Hash,
    },
    /// Our document heads hashes are wanted for these buckets; send yours.
    BucketDocs {
        buckets: Vec<u8>,
    },
    /// Send the saved bytes of these documents.
    Fetch {
        ids: Vec<String>,
    },
    Join(JoinRequest),
    /// Liveness, clock and version: answered even by a node of another major version.
    Heartbeat(Heartbeat),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    /// Sender's wall clock when sent (t1).
    pub wall_ms: i64,
    pub draining: bool,
    /// The sender's disk is full: it refuses writes.
    pub disk_full: bool,
    /// Where the sender's IPC port is reached (so a node whose member list is behind can fetch
    /// the current one from it).
    pub addr: String,
    /// Sender's digest root: a mismatch that persists starts a replication cycle.
    pub root: Hash,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeartbeatAck {
    /// Receiver's wall clock on receipt (t2) and when answering (t3).
    pub received_wall_ms: i64,
    pub sent_wall_ms: i64,
    pub draining: bool,
    pub disk_full: bool,
    pub root: Hash,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Response {
    Sync {
        msgs: Vec<(String, Vec<u8>)>,
    },
    InSync,
    /// The answering node is fetching documents to catch up: comparing digests with it now would
    /// only list what it lacks; try at the next cycle.
    CatchingUp,
    Buckets {
        hashes: Vec<Hash>,
    },
    BucketDocs {
        docs: Vec<(String, Hash)>,
    },
    Docs {
        docs: Vec<(String, Vec<u8>)>,
    },
    Joined(Box<JoinResponse>),
    HeartbeatAck(HeartbeatAck),
    Refused {
        reason: Refusal,
        message: String,
    },
}

impl Response {
    /// The variant's name, for messages about unexpected answers.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Sync { .. } => "Sync",
            Response::InSync => "InSync",
            Response::CatchingUp => "CatchingUp",
            Response::Buckets { .. } => "Buckets",
            Response::BucketDocs { .. } => "BucketDocs",
            Response::Docs { .. } => "Docs",
            Response::Joined(_) => "Joined",
            Response::HeartbeatAck(_) => "HeartbeatAck",
            Response::Refused { .. } => "Refused",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Refusal {
    Token,
    Version,
    Cluster,
    Clock,
    NotMember,
    BadRequest,
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JoinRequest {
    pub token_secret: String,
    pub csr_pem: String,
    pub node_id: String,
    pub name: String,
    /// Where the other members reach the joiner.
    pub addr: String,
    pub wall_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JoinResponse {
    pub cluster_id: String,
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub node_cert_pem: String,
    pub members: Vec<Member>,
    /// The saved member list document, which seeds the joiner's own.
    pub members_doc: Vec<u8>,
}

/// The major version of a version string (`"1.4.2"` -> `"1"`).
pub fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

pub fn compatible(a: &str, b: &str) -> bool {
    major(a) == major(b)
}
