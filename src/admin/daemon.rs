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

/// Runs the node in `dir` until `stop` resolves, then shuts down cleanly: the API stops taking
/// requests, replication stops, queued writes are committed, and the database is closed.
pub async fn run(
    dir: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let node = Node::open(dir, NodeOptions::default()).map_err(|e| e.to_string())?;
    let served = serve(node.clone(), stop).await;
    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .map_err(|e| e.to_string())?;
    served
}

/// Serves an open node (admin API, IPC, replication, health) until `stop` resolves. An embedding
/// server calls this beside its own listeners.
pub async fn serve(
    node: Node,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let cfg = node.config().clone();
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .map_err(|e| format!("cannot listen on {} for the admin API: {e}", cfg.api_listen))?;
    let cluster = crate::cluster::Cluster::start(node.clone())
        .await
        .map_err(|e| e.to_string())?;
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
    served.map_err(|e| format!("admin API failed: {e}"))
}
