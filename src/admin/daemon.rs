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
///
/// The admin API answers from the start: while the store recovers (replaying the log after an
/// unclean stop) `/livez` is 200 and everything else 503 (`/readyz` included), then the node
/// serves as usual.
pub async fn run(
    dir: &Path,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let d = dir.to_path_buf();
    let opening = tokio::task::spawn_blocking(move || Node::opening(&d))
        .await
        .map_err(|_| crate::node::Error::ShuttingDown)??;
    let cfg = opening.config().clone();
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.api_listen,
            source,
        })?;
    let gate = super::api::Gate::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let app = gate.router();
    let api = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.wait_for(|s| *s).await;
            })
            .await
    });
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    let started = tokio::task::spawn_blocking(move || opening.start(NodeOptions::default()))
        .await
        .map_err(|_| crate::node::Error::ShuttingDown);
    let node = match started {
        Ok(Ok(node)) => node,
        Ok(Err(e)) | Err(e) => {
            api.abort();
            return Err(e.into());
        }
    };
    let mut rx = stop_rx.clone();
    let served = serve_on(node.clone(), gate, api, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
    .await;
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
    let gate = super::api::Gate::default();
    let app = gate.router();
    let api = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
    });
    serve_on(node, gate, api, std::future::pending()).await
}

/// Starts the cluster side of an open node, opens the gate of an API already listening, and
/// waits for the API to stop (or `stop`).
async fn serve_on(
    node: Node,
    gate: super::api::Gate,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cfg = node.config().clone();
    let cluster = match crate::cluster::Cluster::start(node.clone()).await {
        Ok(c) => c,
        Err(e) => {
            api.abort();
            return Err(e.into());
        }
    };
    gate.open(super::api::router(cluster.state().clone()));
    tracing::info!(node = %cfg.node_id, name = %cfg.name, api = %cfg.api_listen, "node running");
    eprintln!(
        "peerconf: node {} ({}) of cluster {}: admin API on http://{}, IPC on {}",
        cfg.node_id, cfg.name, cfg.cluster_id, cfg.api_listen, cfg.ipc_listen
    );
    let served = tokio::select! {
        r = api => r.unwrap_or(Ok(())),
        _ = stop => Ok(()),
    };
    tracing::info!("shutting down");
    cluster.stop().await;
    served.map_err(ServeError::Api)
}
