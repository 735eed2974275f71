//! Layer: admin (imports core, store, net, node, cluster).
//!
//! `peerconf run`: a node with its admin API, until SIGINT or SIGTERM.

use crate::node::setup::NodeConfig;
use crate::node::{Node, NodeOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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
    #[error("cannot make the admin API's HTTPS certificate: {0}")]
    Tls(#[from] crate::net::tls::TlsError),
    /// `peerconf setup` on a directory that already holds a node.
    #[error("{0} already holds a node: start it with `peerconf run --data-dir {0}` (setup is for a node that does not exist yet)")]
    AlreadySetUp(String),
}

/// The admin API's listener, and its TLS configuration when it serves HTTPS.
struct ApiListener {
    tcp: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The certificate to replace with the `certificate` entity the node names
    /// ([`NodeConfig::api_certificate`]) once the node runs.
    entity_cert: Option<EntityCert>,
}

/// A `certificate` entity the admin API serves, and the slot its handshakes read it from.
#[derive(Clone)]
struct EntityCert {
    name: String,
    slot: Arc<crate::net::tls::SwappableCert>,
}

/// Binds the admin API. Off loopback (or with `api_tls`) it serves HTTPS only, with a certificate
/// issued by the cluster CA at each start for the addresses and names the node is reached by;
/// there is no way to serve plain HTTP off loopback.
async fn listen_api(cfg: &NodeConfig, dir: &Path) -> Result<ApiListener, ServeError> {
    let mut entity_cert = None;
    let tls = if let Some(files) = &cfg.api_cert {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| crate::net::tls::TlsError(format!("cannot read {}: {e}", p.display())))
        };
        let (cert, key) = (read(&files.cert)?, read(&files.key)?);
        Some(
            crate::net::tls::api_server_config_pem(&cert, &key).map_err(|e| {
                crate::net::tls::TlsError(format!(
                    "--api-cert {} --api-key {}: {e}",
                    files.cert.display(),
                    files.key.display()
                ))
            })?,
        )
    } else if cfg.api_https() {
        let material = crate::net::tls::TlsFiles::new(dir).read()?;
        let (dns, ips) = super::api::node_names(cfg);
        let ca_issued = crate::net::tls::api_ca_key(&material, &cfg.node_id, &dns, &ips)?;
        // With a certificate entity named, the cluster CA's certificate is served until the
        // node has read the entity (`follow_api_certificate`).
        let slot = Arc::new(crate::net::tls::SwappableCert::new(ca_issued));
        if let Some(name) = &cfg.api_certificate {
            entity_cert = Some(EntityCert {
                name: name.clone(),
                slot: slot.clone(),
            });
        }
        Some(crate::net::tls::api_config(slot)?)
    } else {
        None
    };
    let tcp = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.api_listen,
            source,
        })?;
    Ok(ApiListener {
        tcp,
        tls,
        entity_cert,
    })
}

/// Serves the `certificate` entity `cert.name` on the admin API and follows it: every committed
/// change of it, local or replicated, is read (its chain and its unsealed key) and served from
/// the next handshake. A version that cannot be served (the key does not match, the entity was
/// deleted) is logged and the API keeps the certificate it has. Ends when the node stops.
fn follow_api_certificate(node: Node, cert: EntityCert) -> tokio::task::JoinHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    // Subscribed before the first read, so no change falls between the two.
    let mut changes = node.subscribe();
    tokio::spawn(async move {
        let mut served = None;
        load_api_certificate(&node, &cert, &mut served).await;
        loop {
            match changes.recv().await {
                Ok(ev) if ev.kind == crdt_schema::Kind::Certificate && ev.name == cert.name => {
                    load_api_certificate(&node, &cert, &mut served).await
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => load_api_certificate(&node, &cert, &mut served).await,
                Err(RecvError::Closed) => break,
            }
        }
    })
}

/// Reads the certificate entity and, when its chain differs from `served` (the PEM served now,
/// None while the cluster CA's is), serves it.
async fn load_api_certificate(node: &Node, cert: &EntityCert, served: &mut Option<String>) {
    use crdt_schema::Kind;
    let (n, name) = (node.clone(), cert.name.clone());
    let read = tokio::task::spawn_blocking(move || {
        let pem = n
            .get(Kind::Certificate, &name)?
            .and_then(|e| e["fields"]["cert_pem"].as_str().map(str::to_string));
        let key = n.secret(Kind::Certificate, &name, "key_pem")?;
        Ok::<_, crate::node::Error>(pem.zip(key))
    })
    .await;
    let name = &cert.name;
    match read {
        Ok(Ok(Some((pem, key)))) => {
            if served.as_deref() == Some(pem.as_str()) {
                return;
            }
            match crate::net::tls::certified_key_pem(&pem, &key) {
                Ok(k) => {
                    cert.slot.set(k);
                    let (subject, not_after, _) = crdt_schema::cert_info(&pem).unwrap_or_default();
                    tracing::info!(certificate = %name, %subject, %not_after, "the admin API serves this certificate entity");
                    *served = Some(pem);
                }
                Err(e) => tracing::warn!(
                    certificate = %name, error = %e,
                    "cannot serve this certificate entity on the admin API; it keeps the certificate it serves"
                ),
            }
        }
        Ok(Ok(None)) if served.is_none() => tracing::warn!(
            certificate = %name,
            "no such certificate entity on this node yet: the admin API serves a certificate of the cluster CA until it arrives"
        ),
        Ok(Ok(None)) => tracing::warn!(
            certificate = %name,
            "the certificate entity the admin API serves is gone; it keeps serving the last one"
        ),
        Ok(Err(e)) => {
            tracing::warn!(certificate = %name, error = %e, "cannot read the certificate entity")
        }
        Err(_) => {}
    }
}

/// How long a client has to finish its TLS handshake with the admin API.
const API_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's headers (HTTP/1; idle keep-alive connections are
/// closed after this too).
pub const API_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the admin API holds at once at most (a quarter of the open-file limit if that is
/// less): past it, new ones are closed at once, so slow or idle clients cannot take the
/// descriptors the store and the IPC port need.
pub const API_CONNECTIONS_MAX: usize = 512;
/// Send buffer of an admin API connection (Linux doubles it for bookkeeping).
pub const API_SEND_BUFFER: usize = 128 * 1024;

/// Serves `app` on the listener until `stop` resolves, one task per connection (HTTP/1.1 or
/// HTTP/2; over TLS when the listener has it), with a cap on connections and a header-read
/// timeout; the request timeout and body limit are the router's.
async fn serve_api(
    l: ApiListener,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = l.tls.map(tokio_rustls::TlsAcceptor::from);
    let quarter = crate::net::limits::nofile()
        .map(|l| usize::try_from(l.soft / 4).unwrap_or(usize::MAX))
        .unwrap_or(API_CONNECTIONS_MAX);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        quarter.clamp(16, API_CONNECTIONS_MAX),
    ));
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(API_HEADER_TIMEOUT);
    let builder = Arc::new(builder);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.tcp.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "admin API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => return Ok(()),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the cap: closed at once (dropped).
            continue;
        };
        // A fixed send buffer (the kernel's autotuning would let one connection queue megabytes):
        // a watch stream whose reader stops falls behind within a few hundred events and is
        // reset, rather than parking them in the kernel. Loopback and LAN throughput stay far
        // above what the API produces.
        if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(API_SEND_BUFFER) {
            tracing::debug!(error = %e, "admin API: cannot set the send buffer");
        }
        // No Nagle: a watch stream's events are small writes that must leave at once, not
        // wait for the reader's delayed ACK of the one before (up to 40 ms: the spikes of
        // visibility latency seen through the stream).
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Every request carries the address it came from (history records it).
            let app = tower::ServiceExt::map_request(
                app,
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(super::api::ClientAddr(peer));
                    req
                },
            );
            let svc = hyper_util::service::TowerToHyperService::new(app);
            match acceptor {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(API_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = builder.serve_connection(io, svc).await;
                }
                None => {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = builder.serve_connection(io, svc).await;
                }
            }
        });
    }
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
    let listener = listen_api(&cfg, dir).await?;
    let entity_cert = listener.entity_cert.clone();
    let gate = super::api::Gate::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let app = gate.router();
    let api = tokio::spawn(serve_api(listener, app, async move {
        let _ = api_stop.wait_for(|s| *s).await;
    }));
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    start_and_serve(opening, gate, api, stop_rx, entity_cert).await
}

/// Starts an opened node behind an API already listening (its `gate` closed until then), serves
/// until `stop_rx` turns true, then shuts the node down.
async fn start_and_serve(
    opening: crate::node::Opening,
    gate: super::api::Gate,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    entity_cert: Option<EntityCert>,
) -> Result<(), ServeError> {
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
    let served = serve_on(node.clone(), gate, api, entity_cert, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
    .await;
    // The driver thread commits what is queued and closes the store; a panic there is already
    // reported on stderr.
    let _ = tokio::task::spawn_blocking(move || node.shutdown()).await;
    served
}

/// What `peerconf setup` tells its operator before the Setup UI waits for them.
#[derive(Debug, Clone)]
pub struct SetupAnnouncement {
    /// The Setup UI's URL, carrying the one-time setup code.
    pub url: String,
    /// The SHA-256 fingerprint of the page's self-signed certificate, when it is served over
    /// HTTPS (any address but loopback).
    pub cert_sha256: Option<String>,
}

/// `peerconf setup`: on a data directory that holds no node yet, serves the Setup UI on
/// `listen` (see [`super::setup_ui`]) and calls `announce` with its URL; once the operator has
/// created or joined a cluster there, the same process and the same listener go on as the node
/// (`run`), its API and console on `listen`. Off loopback the page is HTTPS with a self-signed
/// certificate made for the occasion (its fingerprint is announced); the node keeps serving with
/// it until it restarts, then with the cluster CA's.
pub async fn setup(
    dir: &Path,
    listen: std::net::SocketAddr,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    announce: impl FnOnce(&SetupAnnouncement),
) -> Result<(), ServeError> {
    if dir.join(crate::node::DB_FILE).exists() {
        return Err(ServeError::AlreadySetUp(dir.display().to_string()));
    }
    let (tls, cert_sha256) = if listen.ip().is_loopback() {
        (None, None)
    } else {
        let (cfg, fp) = setup_certificate(listen)?;
        (Some(cfg), Some(fp))
    };
    let tcp = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen,
            source,
        })?;
    let code = {
        use rand::Rng;
        hex::encode(rand::rng().random::<[u8; 16]>())
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    announce(&SetupAnnouncement {
        url: format!("{scheme}://{listen}/setup#code={code}"),
        cert_sha256,
    });
    let ui = Arc::new(super::setup_ui::SetupUi::new(
        dir.to_path_buf(),
        listen,
        code,
    ));
    let gate = super::api::Gate::default();
    let app = super::setup_ui::router(ui.clone(), gate.router());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(serve_api(
        ApiListener {
            tcp,
            tls,
            entity_cert: None,
        },
        app,
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        _ = ui.finished() => {}
        _ = stop_rx.wait_for(|s| *s) => {
            api.abort();
            return Ok(());
        }
    }
    let d = dir.to_path_buf();
    let opening = tokio::task::spawn_blocking(move || Node::opening(&d))
        .await
        .map_err(|_| crate::node::Error::ShuttingDown)??;
    start_and_serve(opening, gate, api, stop_rx, None).await
}

/// A self-signed certificate for the Setup UI off loopback, and its SHA-256 fingerprint.
fn setup_certificate(
    listen: std::net::SocketAddr,
) -> Result<(Arc<rustls::ServerConfig>, String), ServeError> {
    let tls_err = |e: String| ServeError::Tls(crate::net::tls::TlsError(e));
    let mut names = vec!["localhost".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| tls_err(e.to_string()))?;
    let fp = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(made.cert.der()))
    };
    let cfg = crate::net::tls::api_server_config_pem(
        &made.cert.pem(),
        &made.signing_key.serialize_pem(),
    )?;
    Ok((cfg, fp))
}

/// Serves an open node (admin API, IPC, replication, health) until `stop` resolves. An embedding
/// server calls this beside its own listeners.
pub async fn serve(
    node: Node,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cfg = node.config().clone();
    let listener = listen_api(&cfg, node.data_dir()).await?;
    let entity_cert = listener.entity_cert.clone();
    let gate = super::api::Gate::default();
    let app = gate.router();
    let api = tokio::spawn(serve_api(listener, app, stop));
    serve_on(node, gate, api, entity_cert, std::future::pending()).await
}

/// Starts the cluster side of an open node, opens the gate of an API already listening, and
/// waits for the API to stop (or `stop`).
async fn serve_on(
    node: Node,
    gate: super::api::Gate,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    entity_cert: Option<EntityCert>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cfg = node.config().clone();
    let follower = entity_cert.map(|c| follow_api_certificate(node.clone(), c));
    let cluster = match crate::cluster::Cluster::start(node.clone()).await {
        Ok(c) => c,
        Err(e) => {
            api.abort();
            return Err(e.into());
        }
    };
    gate.open(super::api::router(cluster.state().clone()));
    let scheme = if cfg.api_https() { "https" } else { "http" };
    tracing::info!(
        node = %cfg.node_id,
        name = %cfg.name,
        cluster = %cfg.cluster_id,
        api = %format!("{scheme}://{}", cfg.api_listen),
        ipc = %cfg.ipc_listen,
        "node running"
    );
    let served = tokio::select! {
        r = api => r.unwrap_or(Ok(())),
        _ = stop => Ok(()),
    };
    tracing::info!("shutting down");
    if let Some(f) = follower {
        f.abort();
    }
    cluster.stop().await;
    served.map_err(ServeError::Api)
}
