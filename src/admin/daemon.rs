//! Layer: admin (imports core, store, net, node, cluster).
//!
//! `peerconf run`: a node with its admin API, until SIGINT or SIGTERM.

use crate::node::{Node, NodeOptions};
use std::path::Path;

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
pub async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Why a node could not be served. Nothing stored was changed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Open(#[from] crate::node::Error),
    #[error("cannot listen on {addr} for the admin API: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::StartError),
    #[error("admin API failed: {0}")]
    Api(#[source] std::io::Error),
}

/// Runs the node in `dir` until `stop` resolves, then shuts down cleanly: the API stops taking
/// requests, replication stops, queued writes are committed, and the database is closed.
pub async fn run(
    dir: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let node = Node::open(dir, NodeOptions::default())?;
    let served = serve(node.clone(), stop).await;
    // The driver thread commits what is queued and closes the store; a panic there is already
    // reported on stderr.
    let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    served
}

/// Serves an open node (admin API, IPC, replication, health) until `stop` resolves. An embedding
/// server calls this beside its own listeners.
pub async fn serve(
    node: Node,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cfg = node.config().clone();
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.api_listen,
            source,
        })?;
    let cluster = crate::cluster::Cluster::start(node.clone()).await?;
    tracing::info!(node = %cfg.node_id, name = %cfg.name, api = %cfg.api_listen, "node running");
    eprintln!(
        "peerconf: node {} ({}) of cluster {}: admin API on http://{}, IPC on {}",
        cfg.node_id, cfg.name, cfg.cluster_id, cfg.api_listen, cfg.ipc_listen
    );
    let served = axum::serve(listener, super::api::router(cluster.state().clone()))
        .with_graceful_shutdown(stop)
        .await;
    tracing::info!("shutting down");
    cluster.stop().await;
    served.map_err(ServeError::Api)
}
