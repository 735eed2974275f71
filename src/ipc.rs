//! The IPC port: HTTPS with mutual TLS, HTTP/2, one POST route (`/ipc/v1`) carrying the versioned
//! envelopes of `core::proto`. The server admits a client without a certificate only to join;
//! everything else needs a certificate from the cluster CA that belongs to a current member.

use crate::core::proto::{
    self, Envelope, Refusal, Request, Response, BODY_BYTES_MAX, HEADER_CLUSTER, HEADER_PROTOCOL,
    PROTOCOL_VERSION,
};
use crate::core::wire;
use crate::node::Node;
use axum::body::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub const PATH: &str = "/ipc/v1";

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
/// flight per peer, so a few is plenty.
const STREAMS_MAX: u32 = 16;

/// What the server needs besides the node.
pub struct ServerContext {
    pub node: Node,
    pub material: crate::tls::Material,
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<ServerContext>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
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
        let ctx = ctx.clone();
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
            let peer_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::node_id_of(c));
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                let peer_id = peer_id.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(ctx, peer_id, remote, req).await) }
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

fn answer(status: StatusCode, env: &Envelope<Response>) -> HttpResponse<Full<Bytes>> {
    HttpResponse::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(wire::encode(env))))
        .expect("valid response")
}

async fn handle(
    ctx: Arc<ServerContext>,
    peer_id: Option<String>,
    remote: SocketAddr,
    req: HttpRequest<Incoming>,
) -> HttpResponse<Full<Bytes>> {
    let cfg = ctx.node.config();
    let me = |body: Response| Envelope {
        protocol: PROTOCOL_VERSION,
        cluster_id: cfg.cluster_id.clone(),
        from: cfg.node_id.clone(),
        version: crate::node::version(),
        body,
    };
    let refuse = |status: StatusCode, reason: Refusal, message: String| {
        if reason != Refusal::Token {
            tracing::warn!(peer = %remote, node = ?peer_id, %message, "IPC request refused");
        }
        answer(status, &me(Response::Refused { reason, message }))
    };
    if req.method() != Method::POST || req.uri().path() != PATH {
        return refuse(
            StatusCode::NOT_FOUND,
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
            StatusCode::BAD_REQUEST,
            Refusal::Version,
            format!(
                "IPC protocol {} is not supported (this node speaks {PROTOCOL_VERSION})",
                header(HEADER_PROTOCOL).unwrap_or_default()
            ),
        );
    }
    let cluster = header(HEADER_CLUSTER).unwrap_or_default();
    if !cluster.is_empty() && cluster != cfg.cluster_id {
        return refuse(
            StatusCode::FORBIDDEN,
            Refusal::Cluster,
            format!(
                "this node belongs to cluster {}, not {cluster}",
                cfg.cluster_id
            ),
        );
    }
    let body = match Limited::new(req.into_body(), BODY_BYTES_MAX)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::BadRequest,
                format!("request body: {e}"),
            )
        }
    };
    let env: Envelope<Request> = match wire::decode(&body) {
        Ok(e) => e,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, Refusal::BadRequest, e.to_string()),
    };
    if let Request::Join(j) = env.body {
        return match crate::cluster::admit(&ctx, &env.version, j).await {
            Ok(resp) => answer(StatusCode::OK, &me(Response::Joined(Box::new(resp)))),
            Err((reason, message)) => {
                let status = match reason {
                    Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::FORBIDDEN,
                };
                tracing::warn!(peer = %remote, %message, "join refused");
                refuse(status, reason, message)
            }
        };
    }
    // Everything but a join needs a current member's certificate.
    let Some(peer) = peer_id.clone() else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            Refusal::NotMember,
            "a client certificate of the cluster is required".into(),
        );
    };
    if env.cluster_id != cfg.cluster_id || env.from != peer {
        return refuse(
            StatusCode::FORBIDDEN,
            Refusal::Cluster,
            "the envelope does not match the certificate".into(),
        );
    }
    let members = ctx.node.members();
    if !members.iter().any(|m| m.id == peer && !m.removed) {
        return refuse(
            StatusCode::FORBIDDEN,
            Refusal::NotMember,
            format!("node {peer} is not a current member of this cluster"),
        );
    }
    if let Request::Heartbeat(hb) = &env.body {
        // Answered whatever the sender's version: that is how an incompatible member is seen.
        let received = ctx.node.shared().clock.wall_ms();
        let ack = crate::monitor::heard(&ctx.node, &peer, &env.version, hb);
        let mut ack = ack;
        ack.received_wall_ms = received;
        ack.sent_wall_ms = ctx.node.shared().clock.wall_ms();
        return answer(StatusCode::OK, &me(Response::HeartbeatAck(ack)));
    }
    if !proto::compatible(&env.version, &crate::node::version()) {
        return refuse(
            StatusCode::CONFLICT,
            Refusal::Version,
            format!("version mismatch: node {peer} runs {}, this node runs {}; nodes must share the major version", env.version, crate::node::version()),
        );
    }
    let resp = match env.body {
        Request::DigestRoot { .. } | Request::BucketDocs { .. } => {
            // Answered from the digest of what is committed, without the driver.
            let digest = ctx.node.shared().digest.clone();
            let mut d = digest.lock().expect("digest lock");
            let catching_up = !ctx
                .node
                .shared()
                .fetching
                .lock()
                .map(|f| f.is_empty())
                .unwrap_or(true);
            match env.body {
                Request::DigestRoot { root } if root == d.root() => Response::InSync,
                Request::DigestRoot { .. } if catching_up => Response::CatchingUp,
                Request::DigestRoot { .. } => Response::Buckets {
                    hashes: d.buckets().to_vec(),
                },
                Request::BucketDocs { buckets } => Response::BucketDocs {
                    docs: d.entries(&buckets),
                },
                _ => unreachable!(),
            }
        }
        other => match ctx.node.serve(&peer, other).await {
            Ok(r) => r,
            Err(e) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Refusal::Internal,
                    e.to_string(),
                )
            }
        },
    };
    answer(StatusCode::OK, &me(resp))
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
        }
    }

    pub fn disconnect(&mut self) {
        self.send = None;
    }

    pub async fn connect(&mut self) -> Result<(), String> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                format!(
                    "cannot reach {}: connect timed out after {CONNECT_TIMEOUT:?}",
                    self.addr
                )
            })?
            .map_err(|e| format!("cannot reach {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(crate::tls::server_name(), tcp),
        )
        .await
        .map_err(|_| format!("TLS handshake with {} timed out", self.addr))?
        .map_err(|e| format!("TLS failure with {}: {e}", self.addr))?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {}: {e}", self.addr))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.send = Some(send);
        Ok(())
    }

    /// One request and its answer. A refusal comes back as `Ok(Response::Refused)`.
    pub async fn call(&mut self, body: Request) -> Result<Response, String> {
        self.call_timeout(body, REQUEST_TIMEOUT).await
    }

    pub async fn call_timeout(
        &mut self,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, String> {
        if self.send.is_none() {
            self.connect().await?;
        }
        let send = self.send.as_mut().expect("connected");
        let env = Envelope {
            protocol: PROTOCOL_VERSION,
            cluster_id: self.cluster_id.clone(),
            from: self.from.clone(),
            version: crate::node::version(),
            body,
        };
        let body_bytes = wire::encode(&env);
        CLIENT_BYTES.fetch_add(
            body_bytes.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let req = HttpRequest::builder()
            .method(Method::POST)
            .uri(format!("https://{}{PATH}", crate::tls::CLUSTER_DNS_NAME))
            .header(HEADER_PROTOCOL, PROTOCOL_VERSION.to_string())
            .header(HEADER_CLUSTER, self.cluster_id.clone())
            .body(Full::new(Bytes::from(body_bytes)))
            .map_err(|e| e.to_string())?;
        let result = tokio::time::timeout(timeout, async {
            send.ready()
                .await
                .map_err(|e| format!("connection to {}: {e}", self.addr))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("request to {} failed: {}", self.addr, root_cause(&e)))?;
            let bytes = Limited::new(resp.into_body(), BODY_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| format!("answer from {}: {e}", self.addr))?
                .to_bytes();
            CLIENT_BYTES.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let env: Envelope<Response> =
                wire::decode(&bytes).map_err(|e| format!("answer from {}: {e}", self.addr))?;
            Ok::<_, String>(env)
        })
        .await
        .map_err(|_| {
            format!(
                "request to {} timed out after {REQUEST_TIMEOUT:?}",
                self.addr
            )
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

pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
