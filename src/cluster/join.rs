//! Layer: cluster (imports core, store, net, node).
//!
//! Forming a cluster: join tokens, and both sides of a join. A member makes a single-use token
//! (stored hashed, node-local); the joiner proves it over the IPC port, and the member adds it to
//! the member list durably and signs its certificate in return.

use super::state::ClusterState;
use crate::core::health;
use crate::core::members::{self, Member};
use crate::core::proto::{self, JoinRequest, JoinResponse, Refusal, Request, Response};
use crate::net::ipc::{CallError, PeerClient};
use crate::net::tls::{Material, TlsFiles};
use crate::node::driver::{AdmitError, TokenRecord};
use crate::node::setup::{self, InitOptions, NodeConfig};
use crate::node::{Error as NodeError, Node};
use rand::{Rng, RngCore};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::time::Duration;

const TOKEN_PREFIX: &str = "pcjoin1";
/// Handshakes a join tries before it reports a TLS failure.
const JOIN_HANDSHAKE_TRIES: u32 = 3;
/// Default life of a join token.
pub const TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(3600);
/// Longest life a join token may have: a token is a credential.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// A join token: the cluster CA fingerprint (so the joiner can trust the member it contacts) and
/// a secret (so the member can trust the joiner).
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub ca_fingerprint: String,
    pub secret: String,
}

/// A string that is not a join token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("--token {0:?} is not a peerconf join token (expected pcjoin1-<64 hex>-<64 hex>, as printed by `peerconf token create`)")]
pub struct BadToken(pub String);

impl Token {
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}-{}-{}", self.ca_fingerprint, self.secret)
    }

    pub fn parse(s: &str) -> Result<Token, BadToken> {
        let bad = || BadToken(s.chars().take(200).collect());
        let mut parts = s.trim().split('-');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(bad());
        }
        let (Some(fp), Some(secret), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let hex64 = |x: &str| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(fp) || !hex64(secret) {
            return Err(bad());
        }
        Ok(Token {
            ca_fingerprint: fp.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }
}

pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("ttl {}: must be between 1s and {}", humantime::format_duration(*.0), humantime::format_duration(TOKEN_TTL_MAX))]
    Ttl(Duration),
    #[error("TLS material: {0}")]
    Tls(String),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Creates a single-use token valid for `ttl`, stored (hashed) on this node.
pub async fn create_token(node: &Node, ttl: Duration) -> Result<(Token, i64), TokenError> {
    if ttl.is_zero() || ttl > TOKEN_TTL_MAX {
        return Err(TokenError::Ttl(ttl));
    }
    let material = TlsFiles::new(node.data_dir())
        .read()
        .map_err(|e| TokenError::Tls(e.to_string()))?;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = Token {
        ca_fingerprint: material
            .ca_fingerprint()
            .map_err(|e| TokenError::Tls(e.to_string()))?,
        secret: hex::encode(secret),
    };
    let expires = node.clock().wall_ms() + ttl.as_millis() as i64;
    node.put_token(
        secret_hash(&token.secret),
        TokenRecord {
            expires_wall_ms: expires,
            used: false,
        },
    )
    .await?;
    Ok((token, expires))
}

fn valid_node_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A join refused by the member asked: the reason travels to the joiner.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub reason: Refusal,
    pub message: String,
}

impl Refused {
    fn new(reason: Refusal, message: impl Into<String>) -> Refused {
        Refused {
            reason,
            message: message.into(),
        }
    }
}

/// The token a joiner presents, checked before anything else of its request is looked at (its
/// certificate request is neither parsed nor signed for a wrong token). Read-only: the driver
/// consumes the token atomically with the admission.
/// The token is checked before anything else of the request is read. A caller whose token this
/// node never made gets one answer that names nothing ([`driver::check_token`]); one holding a
/// token this node made (so, its legitimate holder) learns why it cannot be used.
fn token_ok(node: &Node, secret: &str, now_ms: i64) -> Result<(), Refused> {
    let refused = |e: AdmitError| match e {
        AdmitError::Token(m) => Refused::new(Refusal::Token, m),
        _ => token_refused(),
    };
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(token_refused());
    }
    let hash = secret_hash(secret);
    let stored = node
        .store()
        .local_get(&crate::node::driver::token_key(&hash))
        .ok()
        .flatten();
    crate::node::driver::check_token(stored.as_deref(), &hash, now_ms).map_err(refused)
}

/// The one answer a caller without a token this node made gets: it learns nothing about this
/// cluster.
fn token_refused() -> Refused {
    Refused::new(
        Refusal::Token,
        "the join token is not valid for this cluster member (wrong or mistyped token, or one made by another node)",
    )
}

/// A member's side of a join: checks the token (before anything else), the version, the clock
/// and the request, signs the joiner's certificate and its admission (this member's signature
/// over the joiner's key), and adds it to the member list durably.
pub async fn admit(
    state: &ClusterState,
    joiner_version: &str,
    j: JoinRequest,
) -> Result<JoinResponse, Refused> {
    let node = &state.node;
    token_ok(node, &j.token_secret, node.clock().wall_ms())?;
    let ours = crate::net::ipc::version();
    if !proto::compatible(joiner_version, &ours) {
        return Err(Refused::new(
            Refusal::Version,
            format!(
                "version mismatch: the joining node runs {joiner_version}, this cluster member runs {ours}; nodes must share the major version"
            ),
        ));
    }
    if !valid_node_id(&j.node_id) || j.addr.is_empty() || j.addr.len() > 300 {
        return Err(Refused::new(
            Refusal::BadRequest,
            "the join request is malformed",
        ));
    }
    if !members::valid_node_name(&j.name) {
        return Err(Refused::new(
            Refusal::BadRequest,
            "the node name must be 1 to 64 of A-Z a-z 0-9 . _ -",
        ));
    }
    let limit = node.settings().join_clock_offset_max_ms;
    let offset = j.wall_ms - node.clock().wall_ms();
    health::check_join_clock(offset, limit)
        .map_err(|e| Refused::new(Refusal::Clock, e.to_string()))?;
    if node.members().iter().any(|m| m.id == j.node_id) {
        return Err(Refused::new(
            Refusal::BadRequest,
            format!("node ID {} is already taken", j.node_id),
        ));
    }
    // Sign first (it cannot fail for a valid request), so a consumed token always yields a node.
    let bad = |e: crate::net::tls::TlsError| Refused::new(Refusal::BadRequest, e.to_string());
    let key = crate::net::tls::csr_public_key(&j.csr_pem).map_err(bad)?;
    let cert = crate::net::tls::sign_csr(
        &state.material.ca_cert_pem,
        &state.material.ca_key_pem,
        &j.node_id,
        &j.csr_pem,
    )
    .map_err(bad)?;
    let cluster_id = &node.config().cluster_id;
    let sig = state
        .material
        .sign(&members::admission_message(cluster_id, &j.node_id, &key))
        .map_err(|e| Refused::new(Refusal::Internal, e.to_string()))?;
    let member = Member {
        id: j.node_id.clone(),
        name: j.name.clone(),
        addr: j.addr.clone(),
        version: joiner_version.to_string(),
        removed: false,
        admission: format!("{}:{sig}", node.config().node_id),
        key,
    };
    let members_doc = match node.admit(secret_hash(&j.token_secret), member).await {
        Ok(Ok(doc)) => doc,
        Ok(Err(AdmitError::Token(m))) => return Err(Refused::new(Refusal::Token, m)),
        Ok(Err(e)) => return Err(Refused::new(Refusal::Internal, e.to_string())),
        Err(e) => return Err(Refused::new(Refusal::Internal, e.to_string())),
    };
    tracing::info!(node = %j.node_id, name = %j.name, addr = %j.addr, "a node joined");
    Ok(JoinResponse {
        cluster_id: node.config().cluster_id.clone(),
        ca_cert_pem: state.material.ca_cert_pem.clone(),
        ca_key_pem: state.material.ca_key_pem.clone(),
        node_cert_pem: cert,
        members: node.members(),
        members_doc,
    })
}

/// Why `peerconf join` failed. Nothing was created in the data directory.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    BadToken(#[from] BadToken),
    #[error("{0} is already initialised")]
    AlreadyInitialised(String),
    #[error("--name {0:?}: a node name is 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("join refused: {0}")]
    Untrusted(String),
    #[error("join failed: {0}")]
    Unreachable(CallError),
    #[error("join refused by {peer} ({}): {message}", what(*.reason))]
    Refused {
        peer: String,
        reason: Refusal,
        message: String,
    },
    #[error("join failed: unexpected answer from {peer}: {answer}")]
    Unexpected { peer: String, answer: &'static str },
    #[error("join refused: member {member} runs {theirs}, this node runs {ours}; nodes must share the major version")]
    Version {
        member: String,
        theirs: String,
        ours: String,
    },
    #[error("join refused: the CA received does not match the token's fingerprint")]
    CaMismatch,
    #[error("TLS material: {0}")]
    Tls(String),
    #[error(transparent)]
    Setup(#[from] NodeError),
}

fn what(r: Refusal) -> &'static str {
    match r {
        Refusal::Token => "token refused",
        Refusal::Version => "version refused",
        Refusal::Cluster => "wrong cluster",
        Refusal::Clock => "clock offset",
        _ => "refused",
    }
}

/// `peerconf join`: contacts a member, proves the token, and creates the data directory.
pub async fn join(
    dir: &Path,
    peer: &str,
    token: &str,
    opts: &InitOptions,
) -> Result<NodeConfig, JoinError> {
    let token = Token::parse(token)?;
    if dir.join(crate::node::DB_FILE).exists() {
        return Err(JoinError::AlreadyInitialised(dir.display().to_string()));
    }
    let clock = crate::node::time::SystemClock::shared();
    let mut rng = setup::seeded(None);
    let node_id = hex::encode(rand::rng().random::<[u8; 16]>());
    let tls_err = |e: crate::net::tls::TlsError| JoinError::Tls(e.to_string());
    let (key_pem, csr_pem) = crate::net::tls::new_node_key_and_csr(&node_id).map_err(tls_err)?;
    let (tls, refusal) = crate::net::tls::joiner_config(&token.ca_fingerprint).map_err(tls_err)?;
    let mut client = PeerClient::new(peer, tls, "", &node_id);
    if let Some(name) = &opts.name {
        if !members::valid_node_name(name) {
            return Err(JoinError::BadName(name.chars().take(80).collect()));
        }
    }
    setup::check_api_certificate(opts)?;
    let cfg = setup::new_config(node_id.clone(), String::new(), opts, clock.as_ref());
    let req = Request::Join(JoinRequest {
        token_secret: token.secret.clone(),
        csr_pem,
        node_id: node_id.clone(),
        name: cfg.name.clone(),
        addr: cfg.ipc_advertise.clone(),
        wall_ms: clock.wall_ms(),
    });
    let mut attempts = 0;
    let resp = loop {
        attempts += 1;
        match client.call(req.clone()).await {
            Ok(r) => break r,
            Err(e) => {
                if let Some(why) = refusal.lock().ok().and_then(|r| r.clone()) {
                    return Err(JoinError::Untrusted(why));
                }
                // A handshake cut short never carried the request (the token is unspent): try
                // again, twice, before reporting it.
                if matches!(e, CallError::Tls { .. }) && attempts < JOIN_HANDSHAKE_TRIES {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                return Err(JoinError::Unreachable(e));
            }
        }
    };
    let joined = match resp {
        Response::Joined(j) => *j,
        Response::Refused { reason, message } => {
            return Err(JoinError::Refused {
                peer: peer.to_string(),
                reason,
                message,
            })
        }
        other => {
            return Err(JoinError::Unexpected {
                peer: peer.to_string(),
                answer: other.name(),
            })
        }
    };
    let ours = crate::net::ipc::version();
    if let Some(m) = joined
        .members
        .iter()
        .find(|m| !proto::compatible(&m.version, &ours))
    {
        return Err(JoinError::Version {
            member: m.name.clone(),
            theirs: m.version.clone(),
            ours,
        });
    }
    let material = Material {
        ca_cert_pem: joined.ca_cert_pem,
        ca_key_pem: joined.ca_key_pem,
        node_cert_pem: joined.node_cert_pem,
        node_key_pem: key_pem,
    };
    if material.ca_fingerprint().map_err(tls_err)? != token.ca_fingerprint {
        return Err(JoinError::CaMismatch);
    }
    let mut cfg = cfg;
    cfg.cluster_id = joined.cluster_id;
    setup::create_dir(
        dir,
        &cfg,
        &material,
        Some(&joined.members_doc),
        clock.as_ref(),
        &mut rng,
    )?;
    Ok(cfg)
}
