//! Layer: admin (imports core, node; nothing of the HTTP API itself).
//!
//! Who may use the admin API, and for what: authentication (login sessions, API tokens, the
//! lockout after failed logins) and the roles table. The API's `authorize` layer calls
//! [`Auth::authenticate`] and [`decide`] for every request; nothing else grants access.
//!
//! - **Accounts** are the replicated `admin` entities: an account's role and `enabled` flag are
//!   read from the store at every request, so a demotion, a disabling or a deletion made on any
//!   node takes effect here as soon as it replicates.
//! - **Sessions** (`POST /v1/login`) are node-local and held in memory: a random token whose
//!   SHA-256 is the key; they end after `security/global.session_idle_timeout_s` without use,
//!   `session_max_life_s` after the login, at logout, or when the node stops.
//! - **API tokens** are `api_token` entities: the SHA-256 of the token's secret is a sealed
//!   secret field, so a token works on every node, and its revocation (the entity deleted) or
//!   expiry applies everywhere.
//! - **Lockout**: consecutive failed logins are counted per account and per client address on
//!   this node; at `security/global.max_login_attempts` further logins for it are refused for
//!   `lockout_duration_s`, even with the right password. A success resets both counts.
//! - **Password checks** run argon2 on the blocking pool, at most [`verify_slots`] at a time, so
//!   a login flood queues instead of taking the CPU from replication.
//!
//! Time comes from the node's injected clock: the monotonic one for sessions and lockouts, the
//! wall clock for token expiry (an absolute time that replicates).

use crate::core::entity;
use crate::node::{Error, Node};
use crdt_schema::Kind;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// What an account may do: the roles table of the README, decided in [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    SuperAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::SuperAdmin => "superadmin",
        }
    }
}

/// How a request proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A login session of this node: the SHA-256 of its token.
    Session([u8; 32]),
    /// An API token: its ID (the `api_token` entity's name).
    ApiToken(String),
}

/// An authenticated caller of the admin API.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
    pub via: Via,
    /// The client address, recorded in the changes the caller makes.
    pub from: Option<IpAddr>,
}

impl Caller {
    /// How the caller is recorded in the changes it makes (`by`, `from` in history).
    pub fn recorded(&self) -> entity::Principal {
        entity::Principal {
            name: self.name.clone(),
            from: self.from.map(|a| a.to_string()),
        }
    }

    /// Whether the caller may see this entity (`fields` as read): an Admin sees every entity but
    /// other admins' accounts and API tokens.
    /// Whether [`Caller::may_see`] reads `fields` for this kind (else any value will do).
    pub fn may_see_reads_fields(&self, kind: Kind) -> bool {
        self.role != Role::SuperAdmin && kind == Kind::ApiToken
    }

    pub fn may_see(&self, kind: Kind, name: &str, fields: &Value) -> bool {
        if self.role == Role::SuperAdmin {
            return true;
        }
        match kind {
            Kind::Admin => name == self.name,
            Kind::ApiToken => fields["admin"].as_str() == Some(self.name.as_str()),
            _ => true,
        }
    }
}

/// What a request asks to do, as far as the roles table cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `/livez`, `/readyz`, `POST /v1/login`: no credentials needed.
    Public,
    /// Anything any admin may do: status, metrics, schema, member list, own session and own
    /// API tokens, reading entities (filtered by [`Caller::may_see`]).
    Any,
    /// Reading one entity (or its history).
    Read { kind: Kind, name: String },
    /// Creating, changing or deleting an entity; `fields` names the fields a patch sets.
    Write {
        kind: Kind,
        name: String,
        patch_fields: Option<Vec<String>>,
    },
    /// Cluster administration: join tokens, node removal, drain and undrain, key rotation.
    Cluster(&'static str),
}

/// Why a request is refused (403): what it needed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("forbidden: {what} needs the superadmin role; {name} is an admin")]
    NeedsSuperAdmin { what: String, name: String },
    #[error("forbidden: API tokens are made with POST /v1/api-tokens and revoked with DELETE /v1/api-tokens/ID, not written as entities")]
    TokenEntity,
}

/// The roles table, in one place:
/// - SuperAdmin: everything (but `api_token` entities are written only through their routes).
/// - Admin: read everything but other admins' accounts and tokens; write sites, users, groups,
///   certificates, scripts and rules; change its own password; its own API tokens. Not: admin
///   accounts, `security`, `settings`, join tokens, node removal, drain, undrain, key rotation.
pub fn decide(caller: &Caller, action: &Action) -> Result<(), Denied> {
    let needs = |what: String| Denied::NeedsSuperAdmin {
        what,
        name: caller.name.clone(),
    };
    match action {
        Action::Public | Action::Any => Ok(()),
        Action::Write {
            kind: Kind::ApiToken,
            ..
        } => Err(Denied::TokenEntity),
        _ if caller.role == Role::SuperAdmin => Ok(()),
        Action::Read { kind, name } => match kind {
            Kind::Admin if *name != caller.name => {
                Err(needs(format!("reading admin account {name:?}")))
            }
            _ => Ok(()),
        },
        Action::Write {
            kind,
            name,
            patch_fields,
        } => match kind {
            Kind::Site
            | Kind::User
            | Kind::Group
            | Kind::Certificate
            | Kind::Script
            | Kind::Rule => Ok(()),
            Kind::Admin
                if *name == caller.name
                    && patch_fields
                        .as_ref()
                        .is_some_and(|f| !f.is_empty() && f.iter().all(|f| f == "password")) =>
            {
                Ok(())
            }
            Kind::Admin if *name == caller.name => Err(needs(
                "changing an admin account other than its own password".into(),
            )),
            Kind::Admin => Err(needs(format!("changing admin account {name:?}"))),
            Kind::Security | Kind::Settings | Kind::ApiToken => {
                Err(needs(format!("changing {}/{name}", kind.as_str())))
            }
        },
        Action::Cluster(what) => Err(needs((*what).to_string())),
    }
}

/// Why credentials were not accepted (401). One answer for every cause, so a caller learns
/// nothing about which accounts or tokens exist.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing, malformed, expired or revoked credentials: log in (POST /v1/login, or `peerconf login`) and send Authorization: Bearer TOKEN")]
    Unauthenticated,
    #[error("credentials could not be checked: {0}")]
    Node(#[from] Error),
}

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Wrong password, unknown or disabled account: one answer for all.
    #[error("wrong name or password")]
    Refused,
    #[error("too many failed logins for this account or from this address: try again in {retry_after_s} s")]
    LockedOut { retry_after_s: u64 },
    #[error("too many logins are being checked at once: try again shortly")]
    Busy,
    #[error("the login could not be checked: {0}")]
    Node(#[from] Error),
}

/// Why an API token could not be made or revoked.
#[derive(Debug, thiserror::Error)]
pub enum ApiTokenError {
    #[error("ttl {}: must be between 1m and {}", humantime::format_duration(*.0), humantime::format_duration(API_TOKEN_TTL_MAX))]
    Ttl(Duration),
    #[error("no API token {id:?}")]
    NotFound { id: String },
    #[error("forbidden: revoking another admin's API token needs the superadmin role")]
    NotYours,
    #[error(transparent)]
    Node(#[from] Error),
}

/// An API token lives this long unless `ttl` says otherwise.
pub const API_TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(30 * 86_400);
pub const API_TOKEN_TTL_MAX: Duration = Duration::from_secs(366 * 86_400);
const API_TOKEN_TTL_MIN: Duration = Duration::from_secs(60);

/// Prefixes that tell the two kinds of bearer token apart.
const SESSION_PREFIX: &str = "pcs_";
const API_TOKEN_PREFIX: &str = "pcat_";
/// Sessions and lockout entries kept at most; beyond, the stalest go first.
const SESSIONS_MAX: usize = 10_000;
const ATTEMPTS_MAX: usize = 10_000;
/// How long a login waits for a verification slot before it is answered 503.
const VERIFY_WAIT: Duration = Duration::from_secs(10);

/// Concurrent password verifications: half the cores, at least one.
pub fn verify_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| (n.get() / 2).max(1))
        .unwrap_or(1)
}

struct Session {
    name: String,
    created_ms: u64,
    last_ms: u64,
    /// Wall-clock end of the maximum life, reported to the client.
    max_end_wall_ms: i64,
}

#[derive(Default, Clone, Copy)]
struct Attempts {
    failures: u32,
    locked_until_ms: u64,
}

#[derive(Default)]
struct Lockouts {
    accounts: HashMap<String, Attempts>,
    addrs: HashMap<IpAddr, Attempts>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct AuthCounters {
    pub logins_ok: std::sync::atomic::AtomicU64,
    pub logins_failed: std::sync::atomic::AtomicU64,
    pub logins_locked: std::sync::atomic::AtomicU64,
    pub refused_401: std::sync::atomic::AtomicU64,
    pub refused_403: std::sync::atomic::AtomicU64,
}

/// The admin API's authentication state on one node.
pub struct Auth {
    node: Node,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    lockouts: Mutex<Lockouts>,
    verify: tokio::sync::Semaphore,
    /// A hash checked when the account does not exist, so that such a login costs what a
    /// wrong password costs.
    decoy: std::sync::OnceLock<String>,
    pub counters: AuthCounters,
    /// API tokens checked against the store, by ID (see [`Verified`]).
    verified: Mutex<HashMap<String, Verified>>,
}

/// An API token found valid, and the versions of the two documents that decided it: the token's
/// and its admin's heads, as the node's digest had them. The digest moves after every commit
/// that changes either (a revocation, a disabled, demoted or deleted admin, local or
/// replicated), so a cached answer is used only while both are exactly as when it was checked;
/// the expiry is checked against the clock every time. This spares three reads of the store and
/// an unsealing per request (7% of a writer's CPU under load, ARCHITECTURE.md "Performance").
#[derive(Clone)]
struct Verified {
    secret_sha: [u8; 32],
    name: String,
    role: Role,
    expires_at_ms: i64,
    token_heads: Option<crate::core::digest::Hash>,
    admin_heads: Option<crate::core::digest::Hash>,
}

/// How many verified API tokens are remembered; past it the memory starts again.
const VERIFIED_MAX: usize = 4096;

/// A new session or API token: the token itself is shown once, to its maker.
#[derive(Debug)]
pub struct Issued {
    pub token: String,
    pub id: Option<String>,
    pub expires_at_ms: i64,
    pub name: String,
    pub role: Role,
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Auth {
    pub fn new(node: Node) -> Auth {
        Auth {
            node,
            sessions: Mutex::new(HashMap::new()),
            lockouts: Mutex::new(Lockouts::default()),
            verify: tokio::sync::Semaphore::new(verify_slots()),
            decoy: std::sync::OnceLock::new(),
            counters: AuthCounters::default(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The heads of an API token's and an admin's documents, as committed on this node.
    fn heads_of(
        &self,
        id: &str,
        admin: &str,
    ) -> (
        Option<crate::core::digest::Hash>,
        Option<crate::core::digest::Hash>,
    ) {
        let d = self.node.published().digest();
        (
            d.get(&crdt_schema::doc_id(Kind::ApiToken, id)).copied(),
            d.get(&crdt_schema::doc_id(Kind::Admin, admin)).copied(),
        )
    }

    fn mono(&self) -> u64 {
        self.node.clock().mono_ms()
    }

    /// An account's role if it exists and is enabled.
    fn account(&self, name: &str) -> Result<Option<Role>, Error> {
        if crdt_schema::validate_name(Kind::Admin, name).is_err() {
            return Ok(None);
        }
        let Some(v) = self.node.get(Kind::Admin, name)? else {
            return Ok(None);
        };
        let f = &v["fields"];
        if f["enabled"].as_bool() == Some(false) {
            return Ok(None);
        }
        Ok(Some(match f["role"].as_str() {
            Some("superadmin") => Role::SuperAdmin,
            _ => Role::Admin,
        }))
    }

    /// Who a bearer token belongs to, checked against the store as it is now.
    pub fn authenticate(&self, token: &str, from: Option<IpAddr>) -> Result<Caller, AuthError> {
        if let Some(secret) = token.strip_prefix(SESSION_PREFIX) {
            self.session(secret, from)
        } else if let Some(rest) = token.strip_prefix(API_TOKEN_PREFIX) {
            self.api_token(rest, from)
        } else {
            Err(AuthError::Unauthenticated)
        }
    }

    fn session(&self, secret: &str, from: Option<IpAddr>) -> Result<Caller, AuthError> {
        let key = sha256(secret);
        let sec = self.node.published().security();
        let now = self.mono();
        let name = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = sessions.get_mut(&key) else {
                return Err(AuthError::Unauthenticated);
            };
            let idle = sec.session_idle_timeout_s.max(0) as u64 * 1000;
            let life = sec.session_max_life_s.max(0) as u64 * 1000;
            if now.saturating_sub(s.last_ms) >= idle || now.saturating_sub(s.created_ms) >= life {
                sessions.remove(&key);
                return Err(AuthError::Unauthenticated);
            }
            s.last_ms = now;
            s.name.clone()
        };
        match self.account(&name)? {
            Some(role) => Ok(Caller {
                name,
                role,
                via: Via::Session(key),
                from,
            }),
            None => {
                self.end_session(&key);
                Err(AuthError::Unauthenticated)
            }
        }
    }

    fn api_token(&self, rest: &str, from: Option<IpAddr>) -> Result<Caller, AuthError> {
        let Some((id, secret)) = rest.split_once('_') else {
            return Err(AuthError::Unauthenticated);
        };
        if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuthError::Unauthenticated);
        }
        let given_sha = sha256(secret);
        let cached = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        if let Some(c) = cached {
            use subtle::ConstantTimeEq;
            if bool::from(c.secret_sha.ct_eq(&given_sha))
                && c.expires_at_ms > self.node.clock().wall_ms()
                && self.heads_of(id, &c.name) == (c.token_heads, c.admin_heads)
            {
                return Ok(Caller {
                    name: c.name,
                    role: c.role,
                    via: Via::ApiToken(id.to_string()),
                    from,
                });
            }
        }
        // The versions read before the documents: a change committed in between makes the
        // cached entry stale at once, never a stale answer current.
        let before = self
            .node
            .published()
            .digest()
            .get(&crdt_schema::doc_id(Kind::ApiToken, id))
            .copied();
        let Some(v) = self.node.get(Kind::ApiToken, id)? else {
            return Err(AuthError::Unauthenticated);
        };
        let f = &v["fields"];
        let expires = f["expires_at_ms"].as_i64().unwrap_or(0);
        if expires <= self.node.clock().wall_ms() {
            return Err(AuthError::Unauthenticated);
        }
        let Some(stored) = self.node.secret(Kind::ApiToken, id, "token_hash")? else {
            return Err(AuthError::Unauthenticated);
        };
        let given = hex::encode(given_sha);
        use subtle::ConstantTimeEq;
        if !bool::from(given.as_bytes().ct_eq(stored.as_bytes())) {
            return Err(AuthError::Unauthenticated);
        }
        let name = f["admin"].as_str().unwrap_or_default().to_string();
        let admin_before = self
            .node
            .published()
            .digest()
            .get(&crdt_schema::doc_id(Kind::Admin, &name))
            .copied();
        match self.account(&name)? {
            Some(role) => {
                if self.heads_of(id, &name) == (before, admin_before) {
                    let mut m = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                    if m.len() >= VERIFIED_MAX {
                        m.clear();
                    }
                    m.insert(
                        id.to_string(),
                        Verified {
                            secret_sha: given_sha,
                            name: name.clone(),
                            role,
                            expires_at_ms: expires,
                            token_heads: before,
                            admin_heads: admin_before,
                        },
                    );
                }
                Ok(Caller {
                    name,
                    role,
                    via: Via::ApiToken(id.to_string()),
                    from,
                })
            }
            None => Err(AuthError::Unauthenticated),
        }
    }

    /// Ends a login session (logout); API tokens are revoked instead.
    pub fn end_session(&self, key: &[u8; 32]) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .is_some()
    }

    /// The seconds left of a lockout of this account or address, if one holds.
    fn locked(&self, name: &str, addr: Option<IpAddr>, now: u64) -> Option<u64> {
        let l = self.lockouts.lock().unwrap_or_else(|p| p.into_inner());
        let a = l.accounts.get(name).map_or(0, |a| a.locked_until_ms);
        let b = addr
            .and_then(|ip| l.addrs.get(&ip))
            .map_or(0, |a| a.locked_until_ms);
        let until = a.max(b);
        (until > now).then(|| (until - now).div_ceil(1000).max(1))
    }

    /// Counts a failure; answers whether it started a lockout.
    fn failed(&self, name: &str, addr: Option<IpAddr>, now: u64, max: u32, lock_ms: u64) -> bool {
        let mut l = self.lockouts.lock().unwrap_or_else(|p| p.into_inner());
        let mut started = false;
        let mut count = |a: &mut Attempts| {
            if a.locked_until_ms <= now && a.locked_until_ms != 0 {
                *a = Attempts::default();
            }
            a.failures += 1;
            if max > 0 && a.failures >= max {
                a.locked_until_ms = now + lock_ms.max(1);
                a.failures = 0;
                started = true;
            }
        };
        prune(&mut l.accounts, now);
        count(l.accounts.entry(name.to_string()).or_default());
        if let Some(ip) = addr {
            prune(&mut l.addrs, now);
            count(l.addrs.entry(ip).or_default());
        }
        started
    }

    fn succeeded(&self, name: &str, addr: Option<IpAddr>) {
        let mut l = self.lockouts.lock().unwrap_or_else(|p| p.into_inner());
        l.accounts.remove(name);
        if let Some(ip) = addr {
            l.addrs.remove(&ip);
        }
    }

    /// `POST /v1/login`: checks the password and opens a session.
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        from: Option<IpAddr>,
    ) -> Result<Issued, LoginError> {
        use std::sync::atomic::Ordering::Relaxed;
        let sec = self.node.published().security();
        let now = self.mono();
        // Names longer than any account's are counted under a fixed key: they cannot fill
        // memory, and they lock out nothing real.
        let key = if name.len() <= crdt_schema::NAME_LEN_MAX {
            name
        } else {
            "(too long)"
        };
        if let Some(retry_after_s) = self.locked(key, from, now) {
            self.counters.logins_locked.fetch_add(1, Relaxed);
            tracing::warn!(account = %key, addr = ?from, retry_after_s, "admin login refused: locked out");
            return Err(LoginError::LockedOut { retry_after_s });
        }
        let permit = tokio::time::timeout(VERIFY_WAIT, self.verify.acquire())
            .await
            .map_err(|_| LoginError::Busy)?
            .map_err(|_| LoginError::Busy)?;
        let role = self.account(key)?;
        let stored = match role {
            Some(_) => self.node.secret(Kind::Admin, key, "password")?,
            None => None,
        };
        let decoy = self.decoy.get_or_init(entity::decoy_password_hash).clone();
        let (hash, real) = match stored {
            Some(h) => (h, true),
            None => (decoy, false),
        };
        let clear = password.to_string();
        let ok = tokio::task::spawn_blocking(move || entity::verify_password(&clear, &hash))
            .await
            .unwrap_or(false)
            && real;
        drop(permit);
        let (Some(role), true) = (role, ok) else {
            let max = sec.max_login_attempts.clamp(0, u32::MAX as i64) as u32;
            let lock_ms = sec.lockout_duration_s.max(0) as u64 * 1000;
            self.counters.logins_failed.fetch_add(1, Relaxed);
            if self.failed(key, from, now, max, lock_ms) {
                tracing::warn!(account = %key, addr = ?from, lockout_s = sec.lockout_duration_s, "admin login failed; locked out");
            } else {
                tracing::warn!(account = %key, addr = ?from, "admin login failed");
            }
            return Err(LoginError::Refused);
        };
        self.succeeded(key, from);
        self.counters.logins_ok.fetch_add(1, Relaxed);
        let secret = random_hex(32);
        let wall = self.node.clock().wall_ms();
        let max_end_wall_ms = wall.saturating_add(sec.session_max_life_s.max(0) * 1000);
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if sessions.len() >= SESSIONS_MAX {
                // The stalest session goes.
                if let Some(k) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_ms)
                    .map(|(k, _)| *k)
                {
                    sessions.remove(&k);
                }
            }
            sessions.insert(
                sha256(&secret),
                Session {
                    name: key.to_string(),
                    created_ms: now,
                    last_ms: now,
                    max_end_wall_ms,
                },
            );
        }
        tracing::info!(account = %key, addr = ?from, "admin logged in");
        Ok(Issued {
            token: format!("{SESSION_PREFIX}{secret}"),
            id: None,
            expires_at_ms: max_end_wall_ms,
            name: key.to_string(),
            role,
        })
    }

    /// The wall-clock end of a session's maximum life.
    pub fn session_end(&self, key: &[u8; 32]) -> Option<i64> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|s| s.max_end_wall_ms)
    }

    /// `POST /v1/api-tokens`: a new API token acting as `caller`, stored as a hash.
    pub async fn create_api_token(
        &self,
        caller: &Caller,
        ttl: Option<Duration>,
        label: &str,
    ) -> Result<Issued, ApiTokenError> {
        let ttl = ttl.unwrap_or(API_TOKEN_TTL_DEFAULT);
        if !(API_TOKEN_TTL_MIN..=API_TOKEN_TTL_MAX).contains(&ttl) {
            return Err(ApiTokenError::Ttl(ttl));
        }
        let id = random_hex(8);
        let secret = random_hex(32);
        let now = self.node.clock().wall_ms();
        let expires_at_ms = now.saturating_add(ttl.as_millis() as i64);
        self.node
            .acting_as(caller.recorded())
            .put(
                Kind::ApiToken,
                &id,
                json!({
                    "admin": caller.name,
                    "token_hash": hex::encode(sha256(&secret)),
                    "expires_at_ms": expires_at_ms,
                    "label": label,
                    "created_at_ms": now,
                }),
            )
            .await?;
        tracing::info!(admin = %caller.name, id = %id, "API token created");
        Ok(Issued {
            token: format!("{API_TOKEN_PREFIX}{id}_{secret}"),
            id: Some(id),
            expires_at_ms,
            name: caller.name.clone(),
            role: caller.role,
        })
    }

    /// The API tokens the caller may see (a SuperAdmin sees every admin's), never a secret.
    pub fn list_api_tokens(&self, caller: &Caller) -> Result<Vec<Value>, Error> {
        let now = self.node.clock().wall_ms();
        Ok(self
            .node
            .list(Kind::ApiToken)?
            .into_iter()
            .filter_map(|v| {
                let name = v["name"].as_str()?.to_string();
                let f = &v["fields"];
                caller
                    .may_see(Kind::ApiToken, &name, f)
                    .then(|| token_json(&name, f, now))
            })
            .collect())
    }

    /// `DELETE /v1/api-tokens/{id}`: its owner or a SuperAdmin revokes it, on every node.
    pub async fn revoke_api_token(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Value, ApiTokenError> {
        let not_found = || ApiTokenError::NotFound {
            id: id.chars().take(40).collect(),
        };
        if crdt_schema::validate_name(Kind::ApiToken, id).is_err() {
            return Err(not_found());
        }
        let Some(v) = self.node.get(Kind::ApiToken, id)? else {
            return Err(not_found());
        };
        let f = &v["fields"];
        if !caller.may_see(Kind::ApiToken, id, f) {
            return Err(ApiTokenError::NotYours);
        }
        self.node
            .acting_as(caller.recorded())
            .delete(Kind::ApiToken, id)
            .await?;
        tracing::info!(admin = %caller.name, id = %id, "API token revoked");
        Ok(token_json(id, f, self.node.clock().wall_ms()))
    }

    /// Deletes every API token of `admin` (after the account itself was deleted, so that an
    /// account made again under the name does not inherit them).
    pub async fn drop_tokens_of(&self, caller: &Caller, admin: &str) -> Result<usize, Error> {
        let ids: Vec<String> = self
            .node
            .list(Kind::ApiToken)?
            .into_iter()
            .filter(|v| v["fields"]["admin"].as_str() == Some(admin))
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect();
        let me = self.node.acting_as(caller.recorded());
        for id in &ids {
            me.delete(Kind::ApiToken, id).await?;
        }
        Ok(ids.len())
    }

    /// Sessions open on this node (for `/metrics`).
    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

fn token_json(id: &str, f: &Value, now: i64) -> Value {
    let expires = f["expires_at_ms"].as_i64().unwrap_or(0);
    json!({
        "id": id,
        "admin": f["admin"],
        "label": f["label"],
        "created_at_ms": f["created_at_ms"],
        "expires_at_ms": expires,
        "expired": expires <= now,
    })
}

/// Drops the entries whose lockout is over and that hold no failure, then (if still too many)
/// the unlocked ones: a flood of names or addresses cannot grow the table without bound.
fn prune<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, Attempts>, now: u64) {
    if map.len() < ATTEMPTS_MAX {
        return;
    }
    map.retain(|_, a| a.locked_until_ms > now);
    if map.len() >= ATTEMPTS_MAX {
        map.clear();
    }
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() <= 256
        && token.bytes().all(|b| b.is_ascii_graphic()))
    .then_some(token)
}

/// The cookie the web console's session travels in (`HttpOnly`, `SameSite=Strict`, `Secure` over
/// HTTPS): its value is a session token, as `POST /v1/login` answers.
pub const SESSION_COOKIE: &str = "pc_session";
/// The header a request authenticated by the cookie must carry, unless it only reads.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session token of a `Cookie` header value, when it holds [`SESSION_COOKIE`].
pub fn cookie_token(value: &str) -> Option<&str> {
    value.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == SESSION_COOKIE
            && !v.is_empty()
            && v.len() <= 256
            && v.bytes().all(|b| b.is_ascii_graphic()))
        .then_some(v)
    })
}

/// The anti-CSRF value of a session: derived from the session's secret, so it needs no storage,
/// ends with the session, and a page of another site (which can make the browser send the
/// cookie but cannot read it) cannot compute it. The console reads it from `GET /v1/whoami` and
/// sends it in [`CSRF_HEADER`] with every write.
pub fn csrf_of(session_token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"peerconf console csrf\0");
    h.update(session_token.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Whether `sent` is the anti-CSRF value of `session_token` (compared in constant time).
pub fn csrf_matches(session_token: &str, sent: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    sent.is_some_and(|s| bool::from(s.as_bytes().ct_eq(csrf_of(session_token).as_bytes())))
}

/// The `Set-Cookie` value that gives the browser a session (`secure` over HTTPS); `None` gives
/// the value that removes it. The cookie lives until the browser closes; the session's idle time
/// and maximum life are enforced by the node.
pub fn session_cookie(token: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!("{SESSION_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_and_its_csrf_value() {
        assert_eq!(cookie_token("a=b; pc_session=pcs_x1; c=d"), Some("pcs_x1"));
        assert_eq!(cookie_token("pc_session="), None);
        assert_eq!(cookie_token("other=pcs_x1"), None);
        let c = csrf_of("pcs_x1");
        assert_eq!(c.len(), 32);
        assert_ne!(c, csrf_of("pcs_x2"));
        assert!(csrf_matches("pcs_x1", Some(&c)));
        assert!(!csrf_matches("pcs_x2", Some(&c)));
        assert!(!csrf_matches("pcs_x1", None));
        let set = session_cookie(Some("pcs_x1"), true);
        for part in [
            "pc_session=pcs_x1;",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
        ] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!session_cookie(Some("pcs_x1"), false).contains("Secure"));
        assert!(session_cookie(None, false).contains("Max-Age=0"));
    }

    fn caller(name: &str, role: Role) -> Caller {
        Caller {
            name: name.into(),
            role,
            via: Via::ApiToken("0".repeat(16)),
            from: None,
        }
    }

    fn write(kind: Kind, name: &str, patch: Option<&[&str]>) -> Action {
        Action::Write {
            kind,
            name: name.into(),
            patch_fields: patch.map(|f| f.iter().map(|s| s.to_string()).collect()),
        }
    }

    /// The roles table, row by row: what an Admin may and may not do; a SuperAdmin may do all
    /// of it; refusals name the superadmin role.
    #[test]
    fn the_roles_table() {
        let ops = caller("ops", Role::Admin);
        let root = caller("root", Role::SuperAdmin);
        let allowed_for_admin = [
            Action::Any,
            Action::Read {
                kind: Kind::User,
                name: "bob".into(),
            },
            Action::Read {
                kind: Kind::Admin,
                name: "ops".into(),
            },
            Action::Read {
                kind: Kind::Security,
                name: "global".into(),
            },
            write(Kind::Site, "s1", None),
            write(Kind::User, "u", Some(&["home_dir"])),
            write(Kind::Group, "g", None),
            write(Kind::Certificate, "c", None),
            write(Kind::Script, "sc", None),
            write(Kind::Rule, "r", None),
            write(Kind::Admin, "ops", Some(&["password"])),
        ];
        for a in &allowed_for_admin {
            assert_eq!(decide(&ops, a), Ok(()), "{a:?}");
            assert_eq!(decide(&root, a), Ok(()), "{a:?}");
        }
        let refused_for_admin = [
            Action::Read {
                kind: Kind::Admin,
                name: "root".into(),
            },
            write(Kind::Admin, "eve", None),
            write(Kind::Admin, "ops", None),
            write(Kind::Admin, "ops", Some(&["password", "role"])),
            write(Kind::Admin, "ops", Some(&[])),
            write(Kind::Admin, "root", Some(&["password"])),
            write(Kind::Security, "global", Some(&["password_min_length"])),
            write(Kind::Settings, "global", None),
            Action::Cluster("creating a join token"),
            Action::Cluster("removing a node"),
            Action::Cluster("draining the node"),
            Action::Cluster("undraining the node"),
        ];
        for a in &refused_for_admin {
            let e = decide(&ops, a).expect_err(&format!("{a:?} allowed for an Admin"));
            assert!(e.to_string().contains("superadmin"), "{e}");
            assert_eq!(decide(&root, a), Ok(()), "{a:?}");
        }
        for who in [&ops, &root] {
            assert_eq!(
                decide(who, &write(Kind::ApiToken, "0123456789abcdef", None)),
                Err(Denied::TokenEntity)
            );
        }
    }

    #[test]
    fn visibility_of_accounts_and_tokens() {
        let ops = caller("ops", Role::Admin);
        let root = caller("root", Role::SuperAdmin);
        let mine = json!({"admin": "ops"});
        let theirs = json!({"admin": "root"});
        assert!(ops.may_see(Kind::Admin, "ops", &json!({})));
        assert!(!ops.may_see(Kind::Admin, "root", &json!({})));
        assert!(ops.may_see(Kind::ApiToken, "a", &mine));
        assert!(!ops.may_see(Kind::ApiToken, "b", &theirs));
        assert!(ops.may_see(Kind::User, "bob", &json!({})));
        assert!(root.may_see(Kind::Admin, "ops", &json!({})));
        assert!(root.may_see(Kind::ApiToken, "a", &mine));
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer a b"), None);
        assert_eq!(bearer(&format!("Bearer {}", "a".repeat(300))), None);
    }
}
