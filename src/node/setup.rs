//! Layer: node (imports core, store, net).
//!
//! Data directories: the node-local configuration (never replicated), creating a directory for a
//! new cluster or for a node that joined one, and reading it back.
//!
//! A data directory holds `peerconf.redb` (and its log), `tls/` (the cluster CA, the node's
//! certificate and keys). The directory is 0700 and every file in it 0600: it holds password
//! hashes and private keys.

use super::error::Error;
use crate::core::clock::Clock;
use crate::core::index::row_for;
use crate::core::members::{self, Member, MEMBERS_DOC};
use crate::net::tls::{Material, TlsFiles};
use crate::store::Store;
use automerge::{ActorId, AutoCommit};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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
    /// Serve the admin API over HTTPS even on a loopback address (it always is on any other).
    #[serde(default)]
    pub api_tls: bool,
    /// The admin API's certificate chain and key (PEM files the operator names); None: one
    /// issued by the cluster CA at each start.
    #[serde(default)]
    pub api_cert: Option<ApiCertFiles>,
    /// The name of a `certificate` entity the admin API serves (HTTPS, on loopback too): read
    /// from the store once the node runs and followed as it changes; until it exists here, the
    /// API serves a certificate of the cluster CA.
    #[serde(default)]
    pub api_certificate: Option<String>,
}

/// An admin API certificate the operator provides (`--api-cert FILE --api-key FILE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCertFiles {
    /// PEM certificate chain, the node's certificate first.
    pub cert: std::path::PathBuf,
    /// PEM private key of that certificate.
    pub key: std::path::PathBuf,
}

impl NodeConfig {
    /// Whether the admin API is served over HTTPS: always off loopback (`0.0.0.0` included), and
    /// on loopback when asked for (`init --api-tls`, or a certificate named with `--api-cert`).
    pub fn api_https(&self) -> bool {
        self.api_tls
            || self.api_cert.is_some()
            || self.api_certificate.is_some()
            || !self.api_listen.ip().is_loopback()
    }
}

/// Options of `peerconf init` and `peerconf join`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub name: Option<String>,
    pub api_listen: SocketAddr,
    pub ipc_listen: SocketAddr,
    /// Defaults to `ipc_listen`.
    pub ipc_advertise: Option<String>,
    /// HTTPS on loopback too ([`NodeConfig::api_tls`]).
    pub api_tls: bool,
    /// The admin API's certificate, when not one of the cluster CA ([`NodeConfig::api_cert`]).
    pub api_cert: Option<ApiCertFiles>,
    /// A `certificate` entity the admin API serves ([`NodeConfig::api_certificate`]).
    pub api_certificate: Option<String>,
    /// The first SuperAdmin, created in the same transaction as the node (`peerconf init`
    /// always names one; an embedding server may manage without).
    pub admin: Option<AdminBootstrap>,
}

/// The first SuperAdmin account of a new cluster: its name and clear-text password (hashed with
/// argon2 before anything is stored).
#[derive(Clone)]
pub struct AdminBootstrap {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for AdminBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminBootstrap")
            .field("name", &self.name)
            .field("password", &"(secret)")
            .finish()
    }
}

/// The world of a node that does not exist yet: no entities, the schema's default policy.
struct Fresh;

impl crate::core::entity::World for Fresh {
    fn exists(
        &self,
        _: crdt_schema::Kind,
        _: &str,
    ) -> Result<bool, crate::core::entity::WriteError> {
        Ok(false)
    }
    fn password_min_length(&self) -> Result<usize, crate::core::entity::WriteError> {
        let sec: crdt_schema::typed::Security = crdt_schema::typed::schema_defaults();
        Ok(sec.password_min_length.max(0) as usize)
    }
    fn enabled_superadmins(&self) -> Result<Vec<String>, crate::core::entity::WriteError> {
        Ok(Vec::new())
    }
}

/// A SuperAdmin's document made before the node exists, written with the node's first
/// transaction. Refused (nothing created) when the name or password breaks the schema's rules.
struct PreparedAdmin {
    id: String,
    doc: AutoCommit,
    entry: crate::core::index::IndexEntry,
    secrets: Vec<(String, String)>,
}

fn prepare_admin(
    boot: &AdminBootstrap,
    node_id: &str,
    clock: &dyn Clock,
    rng: &mut ChaCha8Rng,
) -> Result<PreparedAdmin, Error> {
    use crate::core::entity;
    use crdt_schema::Kind;
    let mut doc = crdt_schema::doc::genesis(Kind::Admin);
    let mut actor = [0u8; 16];
    rng.fill_bytes(&mut actor);
    doc.set_actor(ActorId::from(actor.as_slice()));
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let by = entity::Principal {
        name: "init".into(),
        from: None,
    };
    let ctx = entity::Context {
        node_id,
        wall_ms: clock.wall_ms(),
        salt,
        by: Some(&by),
    };
    let body =
        serde_json::json!({"role": "superadmin", "password": boot.password, "enabled": true});
    let outcome = entity::execute(
        &mut doc,
        Kind::Admin,
        &boot.name,
        &entity::Op::Put(body),
        &Fresh,
        &ctx,
    )?;
    let entry = crate::core::index::entity_row(&mut doc, &outcome.state);
    Ok(PreparedAdmin {
        id: crdt_schema::doc_id(Kind::Admin, &boot.name),
        doc,
        entry,
        secrets: outcome.secrets,
    })
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            name: None,
            api_listen: DEFAULT_API_LISTEN.parse().expect("valid default"),
            ipc_listen: DEFAULT_IPC_LISTEN.parse().expect("valid default"),
            ipc_advertise: None,
            api_tls: false,
            api_cert: None,
            api_certificate: None,
            admin: None,
        }
    }
}

/// A seeded generator: from `seed`, or from the OS when None.
pub fn seeded(seed: Option<u64>) -> ChaCha8Rng {
    match seed {
        Some(s) => ChaCha8Rng::seed_from_u64(s),
        None => ChaCha8Rng::seed_from_u64(rand::rng().random()),
    }
}

pub fn random_hex(rng: &mut ChaCha8Rng) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    hex::encode(b)
}

pub fn new_config(
    node_id: String,
    cluster_id: String,
    opts: &InitOptions,
    clock: &dyn Clock,
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
        created_wall_ms: clock.wall_ms(),
        schema_version: crdt_schema::SCHEMA_VERSION,
        api_tls: opts.api_tls,
        api_cert: opts.api_cert.clone(),
        api_certificate: opts.api_certificate.clone(),
    }
}

/// Creates a node in `dir` and a new cluster around it: a cluster ID, the cluster CA, the node's
/// certificate, and a member list holding this node. Fails if `dir` is initialised.
pub fn init(
    dir: &Path,
    opts: &InitOptions,
    clock: &Arc<dyn Clock>,
    seed: Option<u64>,
) -> Result<NodeConfig, Error> {
    if let Some(name) = &opts.name {
        if !members::valid_node_name(name) {
            return Err(Error::BadName(name.chars().take(80).collect()));
        }
    }
    check_api_certificate(opts)?;
    let mut rng = seeded(seed);
    let node_id = random_hex(&mut rng);
    let cluster_id = random_hex(&mut rng);
    let material =
        Material::new_cluster(&cluster_id, &node_id).map_err(|e| Error::Tls(e.to_string()))?;
    let cfg = new_config(node_id, cluster_id, opts, clock.as_ref());
    let admin = opts
        .admin
        .as_ref()
        .map(|b| prepare_admin(b, &cfg.node_id, clock.as_ref(), &mut rng))
        .transpose()?;
    make_private_dir(dir)?;
    TlsFiles::new(dir)
        .write(&material)
        .map_err(|e| Error::Tls(e.to_string()))?;
    write_store(dir, &cfg, &material, None, admin, clock.as_ref(), &mut rng)?;
    Ok(cfg)
}

/// `--api-certificate` must be a name a `certificate` entity can have (it need not exist yet).
pub fn check_api_certificate(opts: &InitOptions) -> Result<(), Error> {
    match &opts.api_certificate {
        Some(name) => {
            crdt_schema::validate_name(crdt_schema::Kind::Certificate, name).map_err(|e| {
                Error::BadApiCertificate {
                    name: name.chars().take(80).collect(),
                    reason: e.to_string(),
                }
            })
        }
        None => Ok(()),
    }
}

fn make_private_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("cannot restrict", dir, e))?;
    }
    Ok(())
}

fn restrict_file(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("cannot restrict", path, e))?;
    }
    Ok(())
}

/// Creates a data directory: the database with the node-local settings and the member list, and
/// the TLS files. `members_doc` is the saved member list a joiner received; None starts a new one
/// holding this node.
pub fn create_dir(
    dir: &Path,
    cfg: &NodeConfig,
    material: &Material,
    members_doc: Option<&[u8]>,
    clock: &dyn Clock,
    rng: &mut ChaCha8Rng,
) -> Result<(), Error> {
    make_private_dir(dir)?;
    TlsFiles::new(dir)
        .write(material)
        .map_err(|e| Error::Tls(e.to_string()))?;
    write_store(dir, cfg, material, members_doc, None, clock, rng)
}

/// The identity file: a copy of the node-local configuration beside the database, read by
/// `peerconf repair` when the database itself cannot be.
const IDENTITY_FILE: &str = "node.json";

/// Writes the identity file of a node made before it existed (at open; cheap and idempotent).
pub fn ensure_identity_file(dir: &Path, cfg: &NodeConfig) -> Result<(), Error> {
    let identity = dir.join(IDENTITY_FILE);
    if identity.exists() {
        return Ok(());
    }
    let json = serde_json::to_vec_pretty(cfg).expect("config serializes");
    std::fs::write(&identity, json).map_err(|e| Error::io("cannot write", &identity, e))?;
    restrict_file(&identity)
}

/// A new database holding the node-local settings and the member list (`members_doc`, or a
/// new list holding this node), the identity file, and the disk reserve.
fn write_store(
    dir: &Path,
    cfg: &NodeConfig,
    material: &Material,
    members_doc: Option<&[u8]>,
    admin: Option<PreparedAdmin>,
    clock: &dyn Clock,
    rng: &mut ChaCha8Rng,
) -> Result<(), Error> {
    let db_path = dir.join(DB_FILE);
    let store = Store::open(&db_path)?;
    restrict_file(&db_path)?;
    if let Some(existing) = read_config(&store)? {
        return Err(Error::AlreadyInitialised {
            dir: dir.display().to_string(),
            node_id: existing.node_id,
        });
    }
    let mut members = match members_doc {
        Some(b) => AutoCommit::load(b).map_err(|e| {
            Error::Row(crate::core::index::RowError::Unreadable {
                id: MEMBERS_DOC.into(),
                reason: format!("the member list does not load: {e}"),
            })
        })?,
        None => {
            let mut d = members::genesis();
            let mut actor = [0u8; 16];
            rng.fill_bytes(&mut actor);
            d.set_actor(ActorId::from(actor.as_slice()));
            // The first member admits itself: its signature over its own key.
            let tls = |e: crate::net::tls::TlsError| Error::Tls(e.to_string());
            let key = material.node_public_key().map_err(tls)?;
            let sig = material
                .sign(&members::admission_message(
                    &cfg.cluster_id,
                    &cfg.node_id,
                    &key,
                ))
                .map_err(tls)?;
            let me = Member {
                id: cfg.node_id.clone(),
                name: cfg.name.clone(),
                addr: cfg.ipc_advertise.clone(),
                version: crate::net::ipc::version(),
                removed: false,
                admission: format!("{}:{sig}", cfg.node_id),
                key,
            };
            members::upsert(&mut d, &me, clock.wall_ms()).map_err(|e| {
                Error::Row(crate::core::index::RowError::Unreadable {
                    id: MEMBERS_DOC.into(),
                    reason: e.to_string(),
                })
            })?;
            d
        }
    };
    let entry = row_for(MEMBERS_DOC, &mut members)?;
    let mut txn = store.write()?;
    txn.put_doc(MEMBERS_DOC, &mut members, entry, None, &[], &[])?;
    if let Some(mut a) = admin {
        txn.put_doc(&a.id, &mut a.doc, a.entry, None, &[], &a.secrets)?;
    }
    let json = serde_json::to_vec_pretty(cfg).expect("config serializes");
    txn.local_put(CONFIG_KEY, &json)?;
    txn.commit(None)?;
    let identity = dir.join(IDENTITY_FILE);
    std::fs::write(&identity, &json).map_err(|e| Error::io("cannot write", &identity, e))?;
    restrict_file(&identity)?;
    if let Err(e) = super::disk::make_reserve(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "no room for the reserve file");
    }
    Ok(())
}

/// What `peerconf repair` did.
#[derive(Debug)]
pub struct Repaired {
    pub config: NodeConfig,
    /// Where the damaged files went.
    pub moved_to: Vec<std::path::PathBuf>,
    /// Whether the member list could be read from the damaged store (else the node learns it
    /// from its peers' heartbeats).
    pub members_kept: bool,
}

/// Rebuilds a stopped node whose store is damaged: keeps its identity (node ID, certificate,
/// node-local settings), moves the damaged database, log and key file aside, and starts an empty store
/// holding only the member list. Started again, the node draws a fresh actor (as at every start)
/// and fetches everything from its peers.
pub fn repair(dir: &Path, clock: &dyn Clock) -> Result<Repaired, Error> {
    let db_path = dir.join(DB_FILE);
    if !db_path.exists() && !dir.join(IDENTITY_FILE).exists() {
        return Err(Error::NotInitialised(dir.display().to_string()));
    }
    let material = TlsFiles::new(dir).read().map_err(|e| {
        Error::Tls(format!(
            "the node's certificate and keys are needed to repair it: {e}"
        ))
    })?;
    let (from_db, members_doc) = match Store::opening(&db_path) {
        Err(crate::store::StoreError::InUse(_)) => {
            return Err(Error::Store(crate::store::StoreError::InUse(
                dir.display().to_string(),
            )))
        }
        Ok(opening) => (
            read_config_opening(&opening).ok().flatten(),
            opening.doc_bytes(MEMBERS_DOC).ok().flatten(),
        ),
        Err(_) => (None, None),
    };
    let identity = dir.join(IDENTITY_FILE);
    let config = match from_db {
        Some(c) => c,
        None => std::fs::read(&identity)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                Error::NotInitialised(format!(
                    "{} (neither the database nor {} holds the node's identity)",
                    dir.display(),
                    identity.display()
                ))
            })?,
    };
    // The member list must load, or it is left for the peers to teach.
    let members_doc = members_doc.filter(|b| AutoCommit::load(b).is_ok());
    let stamp = clock.wall_ms();
    let mut moved_to = Vec::new();
    // The key file goes with the database it opens: the damaged copy stays readable by whoever
    // investigates it, and the new store draws a fresh key.
    let mut files = vec![db_path.clone(), crate::store::wal_path(&db_path)];
    if let crate::store::secrets::KeyFile::Path(keys) =
        crate::store::secrets::KeyFile::beside(&db_path)
    {
        files.push(keys);
    }
    for file in files {
        if file.exists() {
            let mut to = file.clone().into_os_string();
            to.push(format!(".damaged-{stamp}"));
            let to = std::path::PathBuf::from(to);
            std::fs::rename(&file, &to).map_err(|e| Error::io("cannot move aside", &file, e))?;
            moved_to.push(to);
        }
    }
    let mut rng = seeded(None);
    write_store(
        dir,
        &config,
        &material,
        members_doc.as_deref(),
        None,
        clock,
        &mut rng,
    )?;
    Ok(Repaired {
        config,
        moved_to,
        members_kept: members_doc.is_some(),
    })
}

pub fn read_config(store: &Store) -> Result<Option<NodeConfig>, Error> {
    parse_config(store.local_get(CONFIG_KEY)?)
}

/// The node-local configuration of a store being opened (written at setup, checkpointed).
pub fn read_config_opening(store: &crate::store::Opening) -> Result<Option<NodeConfig>, Error> {
    parse_config(store.local_get(CONFIG_KEY)?)
}

fn parse_config(row: Option<Vec<u8>>) -> Result<Option<NodeConfig>, Error> {
    match row {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::Store(crate::store::StoreError::Corrupt(format!(
                "node config: {e}"
            )))
        }),
    }
}
