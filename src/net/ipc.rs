//! Layer: net (imports core only).
//!
//! The IPC port: HTTPS with mutual TLS, HTTP/2, one POST route (`/ipc/v1`) carrying the versioned
//! envelopes of `core::proto`. The server refuses, before anything else, what needs no knowledge
//! of the cluster: another route, another protocol version, another cluster's traffic (by header,
//! before the body is read), an oversized body, bytes that do not decode. Everything that does
//! (membership, joins, replication) is the [`Handler`]'s, which the cluster layer provides.

use crate::core::health::Cause;
use crate::core::proto::{
    Envelope, Refusal, Request, Response, BODY_BYTES_MAX, HEADER_CLUSTER, HEADER_PROTOCOL,
    PROTOCOL_VERSION,
};
use crate::core::wire;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub const PATH: &str = "/ipc/v1";

/// The software version this node advertises to peers. `PEERCONF_TEST_ADVERTISE_VERSION`
/// overrides it, for compatibility tests.
pub fn version() -> String {
    std::env::var("PEERCONF_TEST_ADVERTISE_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
}

/// IPC bytes sent and received by every client of this process (request and answer bodies), for
/// benchmarks.
pub static CLIENT_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// A TLS handshake that takes longer is a stuck or hostile client.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One request/answer; a fetch batch of several MB takes well under this on any LAN.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent streams a peer may open on one connection: each node sends at most one request in
/// flight per peer and link, so a few is plenty.
const STREAMS_MAX: u32 = 16;

/// Who answers: what the server puts in every answer's envelope.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: String,
}

/// A request that passed the transport's checks.
pub struct IpcRequest {
    /// The node ID of the client's certificate, if it presented one the CA signed.
    pub peer: Option<String>,
    /// That certificate's public key (hex), to be checked against the key pinned for the node.
    pub peer_key: Option<String>,
    pub remote: SocketAddr,
    pub env: Envelope<Request>,
}

/// What the cluster layer does with a request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: IpcRequest) -> impl Future<Output = Response> + Send;
}

/// The HTTP status of an answer: a refusal's reason decides it.
fn status_of(resp: &Response) -> StatusCode {
    match resp {
        Response::Refused { reason, .. } => match reason {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::NotMember => StatusCode::FORBIDDEN,
            Refusal::Token | Refusal::Clock | Refusal::Cluster => StatusCode::FORBIDDEN,
            Refusal::Version => StatusCode::CONFLICT,
            Refusal::Internal => StatusCode::SERVICE_UNAVAILABLE,
        },
        _ => StatusCode::OK,
    }
}

pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    id: Identity,
    handler: Arc<H>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let id = Arc::new(id);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let (tcp, remote) = match accepted {
            None => return,
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "IPC accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let id = id.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %remote, error = %e, "IPC TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %remote, "IPC TLS handshake timed out");
                    return;
                }
            };
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let peer_id = cert.and_then(|c| crate::net::tls::node_id_of(c));
            let peer_key = cert.and_then(|c| crate::net::tls::public_key_of(c));
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let peer = (peer_id.clone(), peer_key.clone());
                let id = id.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(&*handler, &id, peer, remote, req).await,
                    )
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(STREAMS_MAX)
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20));
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(peer = %remote, error = %e, "IPC connection ended");
                },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

fn answer(id: &Identity, body: Response) -> HttpResponse<Full<Bytes>> {
    let status = status_of(&body);
    let env = Envelope {
        protocol: PROTOCOL_VERSION,
        cluster_id: id.cluster_id.clone(),
        from: id.node_id.clone(),
        version: version(),
        body,
    };
    HttpResponse::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(wire::encode(&env))))
        .expect("valid response")
}

async fn handle<H: Handler>(
    handler: &H,
    id: &Identity,
    (peer_id, peer_key): (Option<String>, Option<String>),
    remote: SocketAddr,
    req: HttpRequest<Incoming>,
) -> HttpResponse<Full<Bytes>> {
    let refuse = |reason: Refusal, message: String| {
        tracing::warn!(peer = %remote, node = ?peer_id, %message, "IPC request refused");
        answer(id, Response::Refused { reason, message })
    };
    if req.method() != Method::POST || req.uri().path() != PATH {
        return refuse(
            Refusal::BadRequest,
            format!("no IPC route {} {}", req.method(), req.uri().path()),
        );
    }
    // Another cluster's or another protocol's traffic is refused before its body is read.
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if header(HEADER_PROTOCOL).as_deref() != Some(PROTOCOL_VERSION.to_string().as_str()) {
        return refuse(
            Refusal::Version,
            format!(
                "IPC protocol {} is not supported (this node speaks {PROTOCOL_VERSION})",
                header(HEADER_PROTOCOL).unwrap_or_default()
            ),
        );
    }
    let cluster = header(HEADER_CLUSTER).unwrap_or_default();
    if !cluster.is_empty() && cluster != id.cluster_id {
        return refuse(
            Refusal::Cluster,
            format!(
                "this node belongs to cluster {}, not {cluster}",
                id.cluster_id
            ),
        );
    }
    let body = match Limited::new(req.into_body(), BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return refuse(Refusal::BadRequest, format!("request body: {e}")),
    };
    let env: Envelope<Request> = match wire::decode(&body) {
        Ok(e) => e,
        Err(e) => return refuse(Refusal::BadRequest, e.to_string()),
    };
    let resp = handler
        .handle(IpcRequest {
            peer: peer_id,
            peer_key,
            remote,
            env,
        })
        .await;
    answer(id, resp)
}

/// Why a call to a peer failed. The connection is dropped after any of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {addr}: {message}")]
    Connect {
        addr: String,
        kind: std::io::ErrorKind,
        message: String,
    },
    #[error("cannot reach {addr}: connect timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { addr: String },
    #[error("TLS failure with {addr}: {message}")]
    Tls { addr: String, message: String },
    #[error("request to {addr} timed out after {after_ms} ms")]
    Timeout { addr: String, after_ms: u64 },
    #[error("request to {addr} failed: {message}")]
    Http { addr: String, message: String },
    #[error("answer from {addr}: {message}")]
    Answer { addr: String, message: String },
}

impl CallError {
    /// The failure's cause, as health reports it.
    pub fn cause(&self) -> Cause {
        match self {
            CallError::Connect { kind, .. } if *kind == std::io::ErrorKind::ConnectionRefused => {
                Cause::ConnectionRefused
            }
            CallError::Connect { .. } => Cause::Other,
            CallError::ConnectTimeout { .. } | CallError::Timeout { .. } => Cause::Timeout,
            CallError::Tls { .. } => Cause::TlsFailure,
            CallError::Http { .. } | CallError::Answer { .. } => Cause::Other,
        }
    }
}

/// An HTTP/2 connection to one peer, reopened when it breaks.
pub struct PeerClient {
    pub addr: String,
    tls: Arc<rustls::ClientConfig>,
    send: Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
    cluster_id: String,
    from: String,
    /// The software version in the peer's last answer.
    pub peer_version: Option<String>,
    /// The public key the peer's certificate must hold (the one its member entry pins).
    expected_key: Option<String>,
}

impl PeerClient {
    pub fn new(
        addr: &str,
        tls: Arc<rustls::ClientConfig>,
        cluster_id: &str,
        from: &str,
    ) -> PeerClient {
        PeerClient {
            addr: addr.to_string(),
            tls,
            send: None,
            cluster_id: cluster_id.to_string(),
            from: from.to_string(),
            peer_version: None,
            expected_key: None,
        }
    }

    /// Refuses a server whose certificate does not hold `key` (empty: no key pinned).
    pub fn expect_key(mut self, key: &str) -> PeerClient {
        self.expected_key = (!key.is_empty()).then(|| key.to_string());
        self
    }

    pub fn disconnect(&mut self) {
        self.send = None;
    }

    pub async fn connect(&mut self) -> Result<(), CallError> {
        let addr = self.addr.clone();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| CallError::ConnectTimeout { addr: addr.clone() })?
            .map_err(|e| CallError::Connect {
                addr: addr.clone(),
                kind: e.kind(),
                message: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(crate::net::tls::server_name(), tcp),
        )
        .await
        .map_err(|_| CallError::Tls {
            addr: addr.clone(),
            message: "handshake timed out".into(),
        })?
        .map_err(|e| CallError::Tls {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
        if let Some(want) = &self.expected_key {
            let got = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::net::tls::public_key_of(c));
            if got.as_deref() != Some(want.as_str()) {
                return Err(CallError::Tls {
                    addr,
                    message: format!(
                        "the server's key {} is not the key pinned for this member ({})",
                        short(got.as_deref().unwrap_or("none")),
                        short(want)
                    ),
                });
            }
        }
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| CallError::Tls {
                addr: addr.clone(),
                message: format!("HTTP/2 handshake: {e}"),
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.send = Some(send);
        Ok(())
    }

    /// One request and its answer. A refusal comes back as `Ok(Response::Refused)`.
    pub async fn call(&mut self, body: Request) -> Result<Response, CallError> {
        self.call_timeout(body, REQUEST_TIMEOUT).await
    }

    pub async fn call_timeout(
        &mut self,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, CallError> {
        if self.send.is_none() {
            self.connect().await?;
        }
        let addr = self.addr.clone();
        let send = self.send.as_mut().expect("connected");
        let env = Envelope {
            protocol: PROTOCOL_VERSION,
            cluster_id: self.cluster_id.clone(),
            from: self.from.clone(),
            version: version(),
            body,
        };
        let body_bytes = wire::encode(&env);
        CLIENT_BYTES.fetch_add(
            body_bytes.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let req = HttpRequest::builder()
            .method(Method::POST)
            .uri(format!(
                "https://{}{PATH}",
                crate::net::tls::CLUSTER_DNS_NAME
            ))
            .header(HEADER_PROTOCOL, PROTOCOL_VERSION.to_string())
            .header(HEADER_CLUSTER, self.cluster_id.clone())
            .body(Full::new(Bytes::from(body_bytes)))
            .map_err(|e| CallError::Http {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
        let result = tokio::time::timeout(timeout, async {
            send.ready().await.map_err(|e| CallError::Http {
                addr: addr.clone(),
                message: format!("connection: {e}"),
            })?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| http_failure(&addr, &e))?;
            let bytes = Limited::new(resp.into_body(), BODY_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| CallError::Answer {
                    addr: addr.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            CLIENT_BYTES.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let env: Envelope<Response> = wire::decode(&bytes).map_err(|e| CallError::Answer {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
            Ok::<_, CallError>(env)
        })
        .await
        .map_err(|_| CallError::Timeout {
            addr: addr.clone(),
            after_ms: timeout.as_millis() as u64,
        })
        .and_then(|r| r);
        match result {
            Ok(env) => {
                self.peer_version = Some(env.version);
                Ok(env.body)
            }
            Err(e) => {
                self.send = None;
                Err(e)
            }
        }
    }
}

/// A failed request. A TLS alert from the server (a client certificate it refused) surfaces here,
/// late, as the source of the HTTP/2 error: found by its type, not its text.
fn http_failure(addr: &str, e: &hyper::Error) -> CallError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        let tls = x.downcast_ref::<rustls::Error>().is_some()
            || x.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if tls {
            return CallError::Tls {
                addr: addr.to_string(),
                message: root_cause(e),
            };
        }
        cur = x.source();
    }
    CallError::Http {
        addr: addr.to_string(),
        message: root_cause(e),
    }
}

/// A key, shortened for messages (its first 16 hex digits).
pub fn short(key: &str) -> &str {
    &key[..key.len().min(16)]
}

pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
