//! Layer: cluster (imports core, store, net, node; never admin or sim).
//!
//! A node's life in its cluster, over the network:
//! - `join`: join tokens and both sides of a join;
//! - `server`: what the IPC port does with each request (membership, heartbeats, digest requests,
//!   documents);
//! - `replicator`: one task per peer, a thin loop around the core's `PeerLink`;
//! - `monitor`: heartbeats, liveness, the status report;
//! - `state`: what these tasks share (peer health, fetch claims);
//! - this module: [`Cluster`], which starts them and keeps one replicator and one heartbeater per
//!   current member (full mesh), following the member list.

pub mod join;
pub mod monitor;
pub mod replicator;
pub mod server;
pub mod state;
pub mod tokens;

pub use join::{create_token, Token, TOKEN_TTL_DEFAULT, TOKEN_TTL_MAX};
pub use state::ClusterState;

use crate::core::members::Member;
use crate::net::tls::TlsFiles;
use crate::node::Node;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the cluster side could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS material: {0}")]
    Tls(String),
    #[error("cannot listen on {addr} for IPC: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The running cluster side of a node: the IPC server, the replicators, the heartbeaters.
pub struct Cluster {
    state: Arc<ClusterState>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    pub async fn start(node: Node) -> Result<Cluster, StartError> {
        let cfg = node.config().clone();
        let material = TlsFiles::new(node.data_dir())
            .read()
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let server_tls = crate::net::tls::server_config(&material)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let client_tls = crate::net::tls::client_config(&material)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(cfg.ipc_listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: cfg.ipc_listen,
                source,
            })?;
        let (stop, stop_rx) = watch::channel(false);
        let state = Arc::new(ClusterState::new(node.clone(), material));
        if let Ok(mut t) = state.client_tls.lock() {
            *t = Some(client_tls.clone());
        }
        let id = crate::net::ipc::Identity {
            cluster_id: cfg.cluster_id.clone(),
            node_id: cfg.node_id.clone(),
        };
        let handler = Arc::new(server::IpcHandler::new(state.clone()));
        let mut tasks = vec![tokio::spawn(crate::net::ipc::serve(
            listener,
            server_tls,
            id,
            handler,
            stop_rx.clone(),
        ))];
        tasks.push(tokio::spawn(monitor::ticker(
            state.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(manage(state.clone(), client_tls, stop_rx)));
        Ok(Cluster { state, stop, tasks })
    }

    /// What the cluster side knows (health, for status and metrics).
    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Keeps one replicator and one heartbeater per current member (full mesh), following the
/// member list.
async fn manage(
    state: Arc<ClusterState>,
    tls: Arc<rustls::ClientConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let node = state.node.clone();
    let me = node.config().node_id.clone();
    let peers = &node.published().peers;
    let mut members = node.published().members.subscribe();
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
        // Stop the tasks of removed members, or of members whose address changed.
        let stale: Vec<String> = running
            .iter()
            .filter(|(id, (addr, _, _))| wanted.get(*id).is_none_or(|m| &m.addr != addr))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((_, s, h)) = running.remove(&id) {
                let _ = s.send(true);
                let _ = h.await;
                peers.unregister(&id);
            }
        }
        for (id, m) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            let (inbox, rx) = replicator::Inbox::new();
            peers.register(&id, inbox.clone());
            let (s, r) = watch::channel(false);
            let hb = tokio::spawn(monitor::heartbeats(
                state.clone(),
                m.clone(),
                tls.clone(),
                inbox.clone(),
                r.clone(),
            ));
            let rep = tokio::spawn(replicator::run(
                state.clone(),
                m.clone(),
                tls.clone(),
                inbox,
                rx,
                r,
            ));
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
    for (id, (_, s, h)) in running {
        let _ = s.send(true);
        let _ = h.await;
        peers.unregister(&id);
    }
}
