//! Cluster formation and replication over the network: join tokens, the join handshake, the IPC
//! server, and one replicator task per peer (full mesh) that pushes changes as they commit and
//! runs the periodic replication cycle.

use crate::core::digest::Plan;
use crate::core::members::Member;
use crate::core::proto::{
    self, JoinRequest, JoinResponse, Refusal, Request, Response, FETCH_DOCS_MAX, SYNC_DOCS_MAX,
    SYNC_ROUNDS_MAX,
};
use crate::core::repl::{Cycle, Next, Sessions};
use crate::driver::{Msgs, TokenRecord};
use crate::ipc::{PeerClient, ServerContext};
use crate::node::{InitOptions, Node, NodeConfig, NodeOptions, PeerQueue};
use crate::tls::{Material, TlsFiles};
use rand::{Rng, RngCore};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const TOKEN_PREFIX: &str = "pcjoin1";
/// Default life of a join token.
pub const TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(3600);
/// Longest life a join token may have: a token is a credential.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A join token: the cluster CA fingerprint (so the joiner can trust the member it contacts) and
/// a secret (so the member can trust the joiner).
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub ca_fingerprint: String,
    pub secret: String,
}

impl Token {
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}-{}-{}", self.ca_fingerprint, self.secret)
    }

    pub fn parse(s: &str) -> Result<Token, String> {
        let bad = || {
            format!("--token {s:?} is not a peerconf join token (expected {TOKEN_PREFIX}-<64 hex>-<64 hex>, as printed by `peerconf token create`)")
        };
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

/// Creates a single-use token valid for `ttl`, stored (hashed) on this node.
pub async fn create_token(
    node: &Node,
    ttl: Duration,
    wall_ms: i64,
) -> Result<(Token, i64), String> {
    if ttl.is_zero() || ttl > TOKEN_TTL_MAX {
        return Err(format!(
            "ttl {}: must be between 1s and {}",
            humantime::format_duration(ttl),
            humantime::format_duration(TOKEN_TTL_MAX)
        ));
    }
    let material = TlsFiles::new(node.data_dir())
        .read()
        .map_err(|e| e.to_string())?;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = Token {
        ca_fingerprint: material.ca_fingerprint().map_err(|e| e.to_string())?,
        secret: hex::encode(secret),
    };
    let expires = wall_ms + ttl.as_millis() as i64;
    node.put_token(
        secret_hash(&token.secret),
        TokenRecord {
            expires_wall_ms: expires,
            used: false,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((token, expires))
}

fn valid_node_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A member's side of a join: checks the version and the token, adds the member durably, signs
/// its certificate.
pub async fn admit(
    ctx: &ServerContext,
    joiner_version: &str,
    j: JoinRequest,
) -> Result<JoinResponse, (Refusal, String)> {
    let ours = crate::node::version();
    if !proto::compatible(joiner_version, &ours) {
        return Err((
            Refusal::Version,
            format!(
                "version mismatch: the joining node runs {joiner_version}, this cluster member runs {ours}; nodes must share the major version"
            ),
        ));
    }
    if !valid_node_id(&j.node_id)
        || j.name.is_empty()
        || j.name.len() > 128
        || j.addr.is_empty()
        || j.addr.len() > 300
    {
        return Err((Refusal::BadRequest, "the join request is malformed".into()));
    }
    let limit = ctx
        .node
        .get(crdt_schema::Kind::Settings, "global")
        .ok()
        .flatten()
        .and_then(|v| v["fields"]["join_clock_offset_max_ms"].as_i64())
        .unwrap_or(60_000);
    let offset = j.wall_ms - ctx.node.shared().clock.wall_ms();
    crate::core::health::check_join_clock(offset, limit).map_err(|e| (Refusal::Clock, e))?;
    if ctx.node.members().iter().any(|m| m.id == j.node_id) {
        return Err((
            Refusal::BadRequest,
            format!("node ID {} is already taken", j.node_id),
        ));
    }
    // Sign first (it cannot fail for a valid request), so a consumed token always yields a node.
    let cert = crate::tls::sign_csr(
        &ctx.material.ca_cert_pem,
        &ctx.material.ca_key_pem,
        &j.node_id,
        &j.csr_pem,
    )
    .map_err(|e| (Refusal::BadRequest, e.to_string()))?;
    let member = Member {
        id: j.node_id.clone(),
        name: j.name.clone(),
        addr: j.addr.clone(),
        version: joiner_version.to_string(),
        removed: false,
    };
    let members_doc = ctx
        .node
        .admit(secret_hash(&j.token_secret), member)
        .await
        .map_err(|e| (Refusal::Internal, e.to_string()))??;
    tracing::info!(node = %j.node_id, name = %j.name, addr = %j.addr, "a node joined");
    Ok(JoinResponse {
        cluster_id: ctx.node.config().cluster_id.clone(),
        ca_cert_pem: ctx.material.ca_cert_pem.clone(),
        ca_key_pem: ctx.material.ca_key_pem.clone(),
        node_cert_pem: cert,
        members: ctx.node.members(),
        members_doc,
    })
}

/// `peerconf join`: contacts a member, proves the token, and creates the data directory.
pub async fn join(
    dir: &Path,
    peer: &str,
    token: &str,
    opts: &InitOptions,
) -> Result<NodeConfig, String> {
    let token = Token::parse(token)?;
    if dir.join(crate::node::DB_FILE).exists() {
        return Err(format!("{} is already initialised", dir.display()));
    }
    let node_opts = NodeOptions::default();
    let mut rng = rand::rng();
    let node_id = hex::encode(rng.random::<[u8; 16]>());
    let (key_pem, csr_pem) =
        crate::tls::new_node_key_and_csr(&node_id).map_err(|e| e.to_string())?;
    let (tls, refusal) =
        crate::tls::joiner_config(&token.ca_fingerprint).map_err(|e| e.to_string())?;
    let mut client = PeerClient::new(peer, tls, "", &node_id);
    let cfg = crate::node::new_config(node_id.clone(), String::new(), opts, &node_opts);
    let req = Request::Join(JoinRequest {
        token_secret: token.secret.clone(),
        csr_pem,
        node_id: node_id.clone(),
        name: cfg.name.clone(),
        addr: cfg.ipc_advertise.clone(),
        wall_ms: node_opts.clock.wall_ms(),
    });
    let resp =
        client
            .call(req)
            .await
            .map_err(|e| match refusal.lock().ok().and_then(|r| r.clone()) {
                Some(why) => format!("join refused: {why}"),
                None if e.contains("cannot reach") => format!("join failed: {e}"),
                None => format!("join failed: cannot talk to the peer at {peer}: {e}"),
            })?;
    let joined = match resp {
        Response::Joined(j) => *j,
        Response::Refused { reason, message } => {
            let what = match reason {
                Refusal::Token => "token refused",
                Refusal::Version => "version refused",
                Refusal::Cluster => "wrong cluster",
                Refusal::Clock => "clock offset",
                _ => "refused",
            };
            return Err(format!("join refused by {peer} ({what}): {message}"));
        }
        other => {
            return Err(format!(
                "join failed: unexpected answer from {peer}: {other:?}"
            ))
        }
    };
    if let Some(m) = joined
        .members
        .iter()
        .find(|m| !proto::compatible(&m.version, &crate::node::version()))
    {
        return Err(format!(
            "join refused: member {} runs {}, this node runs {}; nodes must share the major version",
            m.name,
            m.version,
            crate::node::version()
        ));
    }
    let material = Material {
        ca_cert_pem: joined.ca_cert_pem,
        ca_key_pem: joined.ca_key_pem,
        node_cert_pem: joined.node_cert_pem,
        node_key_pem: key_pem,
    };
    if material.ca_fingerprint().map_err(|e| e.to_string())? != token.ca_fingerprint {
        return Err("join refused: the CA received does not match the token's fingerprint".into());
    }
    let mut cfg = cfg;
    cfg.cluster_id = joined.cluster_id;
    crate::node::create_dir(dir, &cfg, &material, Some(&joined.members_doc), &node_opts)
        .map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// The running cluster side of a node: the IPC server and the replicators.
pub struct Cluster {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    pub async fn start(node: Node) -> Result<Cluster, String> {
        let cfg = node.config().clone();
        let material = TlsFiles::new(node.data_dir())
            .read()
            .map_err(|e| e.to_string())?;
        let server_tls = crate::tls::server_config(&material).map_err(|e| e.to_string())?;
        let client_tls = crate::tls::client_config(&material).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(cfg.ipc_listen)
            .await
            .map_err(|e| format!("cannot listen on {} for IPC: {e}", cfg.ipc_listen))?;
        let (stop, stop_rx) = watch::channel(false);
        let ctx = Arc::new(ServerContext {
            node: node.clone(),
            material,
        });
        let mut tasks = vec![tokio::spawn(crate::ipc::serve(
            listener,
            server_tls,
            ctx,
            stop_rx.clone(),
        ))];
        tasks.push(tokio::spawn(crate::monitor::ticker(
            node.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(manage(node, client_tls, stop_rx)));
        Ok(Cluster { stop, tasks })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Keeps one replicator per current member (full mesh), following the member list.
async fn manage(node: Node, tls: Arc<rustls::ClientConfig>, mut stop: watch::Receiver<bool>) {
    let me = node.config().node_id.clone();
    let mut members = node.shared().members.subscribe();
    let mut running: HashMap<String, (String, watch::Sender<bool>, JoinHandle<()>)> =
        HashMap::new();
    loop {
        let list: Vec<Member> = members.borrow_and_update().clone();
        let me_removed = list.iter().any(|m| m.id == me && m.removed);
        let wanted: HashMap<String, Member> = list
            .into_iter()
            .filter(|m| m.id != me && !m.removed && !me_removed)
            .map(|m| (m.id.clone(), m))
            .collect();
        // Stop replicators of removed members, or whose address changed.
        let stale: Vec<String> = running
            .iter()
            .filter(|(id, (addr, _, _))| wanted.get(*id).is_none_or(|m| &m.addr != addr))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((_, s, h)) = running.remove(&id) {
                let _ = s.send(true);
                let _ = h.await;
                if let Ok(mut p) = node.shared().peers.lock() {
                    p.remove(&id);
                }
            }
        }
        for (id, m) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            let queue = Arc::new(PeerQueue::default());
            if let Ok(mut p) = node.shared().peers.lock() {
                p.insert(id.clone(), queue.clone());
            }
            let (s, r) = watch::channel(false);
            let hb = tokio::spawn(crate::monitor::heartbeats(
                node.clone(),
                m.clone(),
                tls.clone(),
                queue.clone(),
                r.clone(),
            ));
            let rep = tokio::spawn(replicate(node.clone(), m.clone(), tls.clone(), queue, r));
            let h = tokio::spawn(async move {
                let _ = hb.await;
                let _ = rep.await;
            });
            running.insert(id, (m.addr.clone(), s, h));
        }
        tokio::select! {
            r = members.changed() => if r.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, (_, s, h)) in running {
        let _ = s.send(true);
        let _ = h.await;
    }
}

/// The replication interval from the global settings (each cycle adds ±20% jitter so nodes do
/// not align).
fn cycle_interval(node: &Node) -> Duration {
    let ms = node
        .get(crdt_schema::Kind::Settings, "global")
        .ok()
        .flatten()
        .and_then(|v| v["fields"]["replication_interval_ms"].as_u64())
        .unwrap_or(10_000);
    Duration::from_millis(ms)
}

/// One peer's replicator: at most one request in flight, pushes first, cycles on a timer.
async fn replicate(
    node: Node,
    peer: Member,
    tls: Arc<rustls::ClientConfig>,
    queue: Arc<PeerQueue>,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = node.config().clone();
    let mut client = PeerClient::new(&peer.addr, tls, &cfg.cluster_id, &cfg.node_id);
    let mut backoff = BACKOFF_MIN;
    // Catch up at once on start: a cycle right away. Later cycles are due one interval (with
    // jitter) after the last; the interval is re-read at least every second, so a change of the
    // setting takes effect at once.
    let mut last_cycle: Option<tokio::time::Instant> = None;
    let mut jitter = 1.0;
    let mut failed_last = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let now = tokio::time::Instant::now();
        let due = match last_cycle {
            None => now,
            Some(t) => t + cycle_interval(&node).mul_f64(jitter),
        };
        let wake = due.min(now + Duration::from_secs(1));
        let work = tokio::select! {
            _ = queue.notify.notified() => {
                if queue.cycle_now.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    Work::Cycle
                } else {
                    Work::Push
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= due { Work::Cycle } else { continue }
            }
            _ = stop.changed() => return,
        };
        if crate::monitor::incompatible(&node, &peer.id) {
            // Another major version: neither synced to nor from (its server refuses us too).
            if matches!(work, Work::Cycle) {
                last_cycle = Some(tokio::time::Instant::now());
            }
            continue;
        }
        let r = match work {
            Work::Push => match push(&node, &peer.id, &queue, &mut client).await {
                // Nothing was sent: it proves nothing about the peer.
                Ok(false) => continue,
                Ok(true) => Ok(()),
                Err(e) => Err(e),
            },
            Work::Cycle
                if !node
                    .shared()
                    .fetching
                    .lock()
                    .map(|f| f.is_empty())
                    .unwrap_or(true) =>
            {
                // Another replicator is catching this node up: comparing digests now would only
                // list the same missing documents again.
                last_cycle = Some(tokio::time::Instant::now());
                continue;
            }
            Work::Cycle => {
                last_cycle = Some(tokio::time::Instant::now());
                jitter = rand::rng().random_range(0.8..1.2);
                let r = cycle(&node, &peer.id, &mut client).await;
                crate::monitor::cycle_done(&node, &peer.id, &r);
                r.map(|_| ())
            }
        };
        match r {
            Ok(()) => {
                if failed_last {
                    tracing::info!(peer = %peer.name, addr = %peer.addr, "peer reachable again");
                    // Catch up on anything missed while it was away.
                    last_cycle = None;
                }
                failed_last = false;
                queue
                    .failing
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                if !failed_last {
                    tracing::warn!(peer = %peer.name, addr = %peer.addr, error = %e, "replication to peer failed");
                }
                failed_last = true;
                // The driver lists documents for this peer instead of making messages, and the
                // messages already made go back to being listed: the session reset below makes
                // them stale.
                queue
                    .failing
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                queue.requeue_ready();
                client.disconnect();
                // A lost message must not stall the pair: clear in-flight sync state.
                node.reset_peer(&peer.id).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                // Retry at once: the push (the documents were put back) if any, else a cycle.
                // Waiting for the next cycle instead left a peer that was down when it was
                // first tried (a node just joining) unreachable for a whole interval, and the
                // first write after it came back took the slow path.
                last_cycle = None;
                queue.notify.notify_one();
            }
        }
    }
}

enum Work {
    Push,
    Cycle,
}

/// Pushes everything waiting: the messages the driver made (pushes of local writes, and what
/// peers' answers called for), then the documents whose messages are still to be made. Ok(false)
/// when there was nothing to send.
async fn push(
    node: &Node,
    peer: &str,
    queue: &PeerQueue,
    client: &mut PeerClient,
) -> Result<bool, String> {
    let mut sent = false;
    loop {
        let ready = queue.take_ready(SYNC_DOCS_MAX);
        if !ready.is_empty() {
            let ids: Vec<String> = ready.iter().map(|r| r.id.clone()).collect();
            let round = ready.iter().map(|r| r.round).max().unwrap_or(1);
            let mut pushed: std::collections::HashMap<String, Vec<automerge::ChangeHash>> =
                std::collections::HashMap::new();
            let mut msgs: Msgs = Vec::with_capacity(ready.len());
            for r in ready {
                match r.pushed {
                    Some(h) => {
                        pushed.insert(r.id.clone(), h);
                    }
                    // A document pushed and followed up in one request: its answer goes through
                    // the session.
                    None => {
                        pushed.remove(&r.id);
                    }
                }
                msgs.push((r.id, r.msg));
            }
            match client.call(Request::Sync { msgs }).await {
                // The answer goes to the driver, and the next push does not wait for it: what
                // the answer calls for comes back through the ready queue.
                Ok(Response::Sync { msgs: back }) => {
                    // Answers that end a push need nothing more; a push the peer did not answer
                    // at all is over too. The rest goes through the sessions.
                    let (ended, back): (Msgs, Msgs) = back.into_iter().partition(|(id, m)| {
                        pushed.get(id).is_some_and(|h| Sessions::ends_push(m, h))
                    });
                    let ids: Vec<String> = ids
                        .into_iter()
                        .filter(|id| {
                            !ended.iter().any(|(e, _)| e == id)
                                && (!pushed.contains_key(id) || back.iter().any(|(b, _)| b == id))
                        })
                        .collect();
                    if !ids.is_empty() {
                        node.sync_back_later(peer, back, ids, round);
                    }
                }
                Ok(Response::Refused { message, .. }) => {
                    queue.put_back(ids);
                    return Err(message);
                }
                Ok(other) => {
                    queue.put_back(ids);
                    return Err(format!("unexpected answer to sync: {other:?}"));
                }
                Err(e) => {
                    queue.put_back(ids);
                    return Err(e);
                }
            }
            sent = true;
            continue;
        }
        let ids = queue.take(SYNC_DOCS_MAX);
        if ids.is_empty() {
            return Ok(sent);
        }
        if let Err(e) = sync_docs(node, peer, &ids, client).await {
            queue.put_back(ids);
            return Err(e);
        }
        sent = true;
    }
}

/// Runs sync exchanges for these documents until both sides have nothing more to say.
async fn sync_docs(
    node: &Node,
    peer: &str,
    ids: &[String],
    client: &mut PeerClient,
) -> Result<(), String> {
    let mut msgs = node
        .sync_out(peer, ids.to_vec())
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..SYNC_ROUNDS_MAX {
        if msgs.is_empty() {
            return Ok(());
        }
        match client.call(Request::Sync { msgs }).await? {
            Response::Sync { msgs: back } => {
                msgs = node
                    .sync_back(peer, back, ids.to_vec())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Response::Refused { message, .. } => return Err(message),
            other => return Err(format!("unexpected answer to sync: {other:?}")),
        }
    }
    Ok(())
}

async fn fetch_docs(
    node: &Node,
    peer: &str,
    client: &mut PeerClient,
    fetch: &[String],
) -> Result<(), String> {
    // Pipelined: the next batch is on its way, and is loaded, while the driver stores the last
    // one (at most two batches are taken in at once).
    let mut storing: std::collections::VecDeque<
        tokio::task::JoinHandle<Result<usize, crate::node::Error>>,
    > = Default::default();
    for batch in fetch.chunks(FETCH_DOCS_MAX) {
        let mut want: Vec<String> = batch.to_vec();
        while !want.is_empty() {
            let resp = client.call(Request::Fetch { ids: want.clone() }).await?;
            match resp {
                Response::Docs { docs } => {
                    if docs.is_empty() {
                        break;
                    }
                    let got: std::collections::HashSet<String> =
                        docs.iter().map(|(id, _)| id.clone()).collect();
                    while storing.len() >= 2 {
                        if let Some(h) = storing.pop_front() {
                            h.await
                                .map_err(|e| e.to_string())?
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    let (node, peer) = (node.clone(), peer.to_string());
                    storing.push_back(tokio::spawn(async move { node.ingest(&peer, docs).await }));
                    want.retain(|id| !got.contains(id));
                }
                Response::Refused { message, .. } => return Err(message),
                other => return Err(format!("unexpected answer to fetch: {other:?}")),
            }
        }
    }
    for h in storing {
        h.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One replication cycle: digest root, then differing buckets, then the documents that differ.
/// Returns how many documents differed.
async fn cycle(node: &Node, peer: &str, client: &mut PeerClient) -> Result<usize, String> {
    let (mut c, mut req) = {
        let digest = node.shared().digest.clone();
        let mut d = digest.lock().expect("digest lock");
        Cycle::start(&mut d)
    };
    let plan = loop {
        let resp = client.call(req).await?;
        let digest = node.shared().digest.clone();
        let step = {
            let d = digest.lock().expect("digest lock");
            c.step(&d, resp)?
        };
        match step {
            Next::Send(r) => req = r,
            Next::Done(p) => break p,
        }
    };
    let Plan { fetch, sync } = plan;
    if !fetch.is_empty() || !sync.is_empty() {
        tracing::debug!(
            peer,
            fetch = fetch.len(),
            sync = sync.len(),
            "replication cycle found differences"
        );
    }
    // Claim the documents to fetch, so the other replicators of this node leave them alone.
    let fetch: Vec<String> = {
        let mut f = node.shared().fetching.lock().expect("fetching lock");
        fetch
            .into_iter()
            .filter(|id| f.insert(id.clone()))
            .collect()
    };
    let fetched = fetch_docs(node, peer, client, &fetch).await;
    if let Ok(mut f) = node.shared().fetching.lock() {
        for id in &fetch {
            f.remove(id);
        }
    }
    fetched?;
    for batch in sync.chunks(SYNC_DOCS_MAX) {
        sync_docs(node, peer, batch, client).await?;
    }
    Ok(fetch.len() + sync.len())
}
