//! Layer: net (imports core only).
//!
//! The IPC port: HTTPS with mutual TLS, HTTP/2, one POST route (`/ipc/v1`) carrying the versioned
//! envelopes of `core::proto`. The server refuses, before anything else, what needs no knowledge
//! of the cluster: another route, another protocol version, another cluster's traffic (by header,
//! before the body is read), an oversized body, bytes that do not decode. Everything that does
//! (membership, joins, replication) is the [`Handler`]'s, which the cluster layer provides.
//!
//! Client certificates are optional in the TLS handshake (a joiner has none yet), so before the
//! handshake ends a connection could be anyone's. What it may cost the node is bounded in two
//! steps:
//!
//! - Admission (`net::admission`): a token bucket per address, charged at accept and given back
//!   when the handshake proves a certificate; caps, sized from the open-file limit (raised to its
//!   hard limit when the port opens, `net::limits`), on connections in their handshake, on
//!   connections without a certificate and on certified ones (in total and per node ID). A
//!   connection over any of them is closed at once, and counted.
//! - Per connection, by class ([`Policy`]): a connection without a certificate may only ask to
//!   join, with one stream at a time, a body of at most [`UNCERTIFIED_BODY_BYTES_MAX`] read within
//!   [`UNCERTIFIED_BODY_TIMEOUT`], at most [`UNCERTIFIED_REQUESTS_MAX`] requests, and it is closed
//!   once idle for [`UNCERTIFIED_IDLE`] (which also bounds the wait for its first request). Any
//!   refusal closes it. Certified connections keep the members' limits ([`BODY_BYTES_MAX`],
//!   [`STREAMS_MAX`] streams, no idle timeout; keep-alive pings find dead peers).

use crate::core::health::Cause;
use crate::core::proto::{
    Envelope, Refusal, Request, Response, BODY_BYTES_MAX, HEADER_CLUSTER, HEADER_PROTOCOL,
    PROTOCOL_VERSION,
};
use crate::core::wire;
use crate::net::admission::{Admission, Handshaking, Limits, Reason, CONNECTIONS};
use crate::net::limits;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

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
pub const STREAMS_MAX: u32 = 16;
/// The largest request a client without a certificate may send: a join request (a certificate
/// request, a token, a name, an address) is about 1 KiB.
pub const UNCERTIFIED_BODY_BYTES_MAX: usize = 8 * 1024;
/// A connection without a certificate that has no request in flight for this long is closed; so
/// is one that sends no request this soon after its handshake. A joiner sends its request at once.
pub const UNCERTIFIED_IDLE: Duration = Duration::from_secs(10);
/// A request of a client without a certificate must arrive whole in this time.
pub const UNCERTIFIED_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection without a certificate may make; a joiner makes one.
pub const UNCERTIFIED_REQUESTS_MAX: u32 = 4;
/// HTTP/2 flow-control window and header list size of a connection without a certificate: what
/// it can make the node buffer before a request is read stays a few KiB (the protocol's minimum
/// connection window, 64 KiB, applies on top).
const UNCERTIFIED_WINDOW: u32 = 16 * 1024;
const UNCERTIFIED_HEADERS_MAX: u32 = 8 * 1024;
/// A connection being closed after a refusal gets this long to send its last answers.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

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

/// Raises this process's open-file limit to its hard limit and logs both (again, it changes
/// nothing); returns the soft limit in force, which sizes the IPC port's connection caps.
pub fn init_file_limit() -> u64 {
    let before = limits::nofile();
    match limits::raise_nofile() {
        Ok(now) => {
            tracing::info!(
                soft_before = before.as_ref().map(|b| b.soft).unwrap_or(now.soft),
                soft = now.soft,
                hard = now.hard,
                "open-file limit (RLIMIT_NOFILE): soft limit raised to the hard limit"
            );
            now.soft
        }
        Err(e) => {
            let soft = before.as_ref().map(|b| b.soft).unwrap_or(1024);
            tracing::warn!(
                error = %e,
                soft,
                hard = before.as_ref().map(|b| b.hard).unwrap_or(0),
                "open-file limit (RLIMIT_NOFILE) left as it is"
            );
            soft
        }
    }
}

/// What a connection of one class may do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Its certificate names a node: anything may be asked (the handler checks membership).
    /// Otherwise only a join.
    pub certified: bool,
    pub body_max: usize,
    pub body_timeout: Option<Duration>,
    /// Closed once no request has been in flight for this long.
    pub idle: Option<Duration>,
    pub requests_max: Option<u32>,
}

impl Policy {
    pub const CERTIFIED: Policy = Policy {
        certified: true,
        body_max: BODY_BYTES_MAX,
        body_timeout: None,
        idle: None,
        requests_max: None,
    };
    pub const UNCERTIFIED: Policy = Policy {
        certified: false,
        body_max: UNCERTIFIED_BODY_BYTES_MAX,
        body_timeout: Some(UNCERTIFIED_BODY_TIMEOUT),
        idle: Some(UNCERTIFIED_IDLE),
        requests_max: Some(UNCERTIFIED_REQUESTS_MAX),
    };

    /// The HTTP server for a connection of this class.
    fn builder(&self) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
        let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if self.certified {
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT);
            b.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(STREAMS_MAX)
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20));
        } else {
            // Clients speak HTTP/2 only; a joiner has no reason for anything else.
            b = b.http2_only();
            b.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(1)
                .initial_stream_window_size(UNCERTIFIED_WINDOW)
                .initial_connection_window_size(UNCERTIFIED_WINDOW)
                .max_header_list_size(UNCERTIFIED_HEADERS_MAX)
                .max_pending_accept_reset_streams(2)
                .max_local_error_reset_streams(8);
        }
        b
    }
}

/// When a connection last did something, what it has in flight, and the signal to close it.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    requests: AtomicU32,
    last: Mutex<tokio::time::Instant>,
    close: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            requests: AtomicU32::new(0),
            last: Mutex::new(tokio::time::Instant::now()),
            close: Notify::new(),
        })
    }

    /// A request starts; its guard ends it. The last request a policy allows asks for the
    /// connection to be closed once it is answered.
    fn begin(self: &Arc<Self>, policy: &Policy) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        *lock(&self.last) = tokio::time::Instant::now();
        let n = self
            .requests
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if policy.requests_max.is_some_and(|max| n >= max) {
            self.close.notify_one();
        }
        InFlight(self.clone())
    }

    /// Completes once nothing has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let due = *lock(&self.last) + idle;
            tokio::time::sleep_until(due).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(idle).await;
                continue;
            }
            if *lock(&self.last) + idle <= tokio::time::Instant::now() {
                return;
            }
        }
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *lock(&self.0.last) = tokio::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One served connection: who is on the other side and what it may do.
struct Conn {
    policy: Policy,
    remote: SocketAddr,
    peer_id: Option<String>,
    peer_key: Option<String>,
    admission: Arc<Admission>,
    activity: Arc<Activity>,
}

impl Conn {
    /// A refusal that ends a connection without a certificate: counted (and logged at most once
    /// an interval, never once a request), then the connection is closed after this answer.
    fn close_after(&self, reason: Reason, detail: &str) {
        self.admission.refused(reason, self.remote.ip(), detail);
        self.activity.close.notify_one();
    }
}

pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    id: Identity,
    handler: Arc<H>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let files = init_file_limit();
    let admission = Admission::new(Limits::for_file_limit(files), &CONNECTIONS);
    {
        let l = admission.limits();
        tracing::info!(
            handshakes_max = l.handshakes_max,
            uncertified_max = l.uncertified_max,
            certified_max = l.certified_max,
            certified_per_node_max = l.certified_per_node_max,
            burst = l.burst,
            per_sec = l.per_sec,
            "IPC connection caps"
        );
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let id = Arc::new(id);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => Some(r),
            _ = stop.wait_for(|s| *s) => None,
        };
        let (tcp, remote) = match accepted {
            None => break,
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                admission.accept_failed(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over its address's rate or a cap: closed before anything is read from it.
        let Ok(slot) = admission.accept(remote.ip()) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            acceptor.clone(),
            tcp,
            remote,
            slot,
            admission.clone(),
            handler.clone(),
            id.clone(),
            stop.clone(),
        ));
    }
    let refused: Vec<String> = CONNECTIONS
        .refused_all()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.label()))
        .collect();
    tracing::info!(
        refused = ?refused.join(" "),
        accept_failed = CONNECTIONS.accept_failed(),
        "IPC port closed; connections refused since the process started"
    );
}

/// One accepted connection: its handshake, its class, then HTTP until it ends, idles out (without
/// a certificate), is closed after a refusal, or the node stops.
#[allow(clippy::too_many_arguments)]
async fn connection<H: Handler>(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Handshaking,
    admission: Arc<Admission>,
    handler: Arc<H>,
    id: Arc<Identity>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ip = remote.ip();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let tls = tokio::select! {
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                admission.refused(Reason::HandshakeFailed, ip, &e.to_string());
                return;
            }
            Err(_) => {
                admission.refused(Reason::HandshakeTimeout, ip, "");
                return;
            }
        },
        // Counted when it was evicted.
        _ = slot.evicted() => return,
        _ = stop.wait_for(|s| *s) => return,
    };
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let peer_id = cert.and_then(|c| crate::net::tls::node_id_of(c));
    let peer_key = cert.and_then(|c| crate::net::tls::public_key_of(c));
    // Over a cap: closed (counted and logged by admission).
    let (admitted, policy) = match &peer_id {
        Some(node) => (slot.certified(node), Policy::CERTIFIED),
        None => (slot.uncertified(), Policy::UNCERTIFIED),
    };
    let Ok(_admitted) = admitted else {
        return;
    };
    let activity = Activity::new();
    let conn = Arc::new(Conn {
        policy,
        remote,
        peer_id,
        peer_key,
        admission: admission.clone(),
        activity: activity.clone(),
    });
    let svc = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        let id = id.clone();
        let conn = conn.clone();
        let guard = conn.activity.begin(&conn.policy);
        async move {
            let resp = handle(&*handler, &id, &conn, req).await;
            drop(guard);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let builder = policy.builder();
    let served = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(served);
    let idle = async {
        match policy.idle {
            Some(idle) => activity.idle_for(idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle);
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        let closing_at = closing;
        let grace = async move {
            match closing_at {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %remote, error = %e, "IPC connection ended");
                }
                return;
            }
            _ = &mut idle, if closing.is_none() => {
                admission.refused(Reason::Idle, ip, "");
                return;
            }
            _ = activity.close.notified(), if closing.is_none() => {
                served.as_mut().graceful_shutdown();
                closing = Some(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = grace => return,
            _ = stop.wait_for(|s| *s) => return,
        }
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
    let mut resp = HttpResponse::new(Full::new(Bytes::from(wire::encode(&env))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Why the transport refused a request: its answer, and for a connection without a certificate,
/// the reason it is closed for.
struct Refused {
    status: Option<StatusCode>,
    reason: Refusal,
    close: Reason,
    message: String,
}

impl Refused {
    fn new(reason: Refusal, message: String) -> Refused {
        Refused {
            status: None,
            reason,
            close: Reason::NotJoin,
            message,
        }
    }
}

async fn handle<H: Handler>(
    handler: &H,
    id: &Identity,
    conn: &Conn,
    req: HttpRequest<Incoming>,
) -> HttpResponse<Full<Bytes>> {
    match check(id, conn, req).await {
        Ok(env) => {
            let resp = handler
                .handle(IpcRequest {
                    peer: conn.peer_id.clone(),
                    peer_key: conn.peer_key.clone(),
                    remote: conn.remote,
                    env,
                })
                .await;
            answer(id, resp)
        }
        Err(r) => {
            if conn.policy.certified {
                tracing::warn!(peer = %conn.remote, node = ?conn.peer_id, message = %r.message, "IPC request refused");
            } else {
                conn.close_after(r.close, &r.message);
            }
            let mut resp = answer(
                id,
                Response::Refused {
                    reason: r.reason,
                    message: r.message,
                },
            );
            if let Some(status) = r.status {
                *resp.status_mut() = status;
            }
            resp
        }
    }
}

/// The transport's checks, cheapest first: route, protocol and cluster (headers), size (declared,
/// then read), decoding, and for a client without a certificate, that it asks to join.
async fn check(
    id: &Identity,
    conn: &Conn,
    req: HttpRequest<Incoming>,
) -> Result<Envelope<Request>, Refused> {
    if req.method() != Method::POST || req.uri().path() != PATH {
        return Err(Refused::new(
            Refusal::BadRequest,
            format!("no IPC route {} {}", req.method(), req.uri().path()),
        ));
    }
    // Another cluster's or another protocol's traffic is refused before its body is read.
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if header(HEADER_PROTOCOL).as_deref() != Some(PROTOCOL_VERSION.to_string().as_str()) {
        return Err(Refused::new(
            Refusal::Version,
            format!(
                "IPC protocol {} is not supported (this node speaks {PROTOCOL_VERSION})",
                header(HEADER_PROTOCOL).unwrap_or_default()
            ),
        ));
    }
    let cluster = header(HEADER_CLUSTER).unwrap_or_default();
    if !cluster.is_empty() && cluster != id.cluster_id {
        return Err(Refused::new(
            Refusal::Cluster,
            format!(
                "this node belongs to cluster {}, not {cluster}",
                id.cluster_id
            ),
        ));
    }
    let max = conn.policy.body_max;
    let too_large = || Refused {
        status: Some(StatusCode::PAYLOAD_TOO_LARGE),
        reason: Refusal::BadRequest,
        close: Reason::TooLarge,
        message: format!("the request body is over {max} bytes"),
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let collect = Limited::new(req.into_body(), max).collect();
    let collected = match conn.policy.body_timeout {
        Some(t) => tokio::time::timeout(t, collect)
            .await
            .map_err(|_| Refused {
                status: Some(StatusCode::REQUEST_TIMEOUT),
                reason: Refusal::BadRequest,
                close: Reason::TooSlow,
                message: format!("the request body did not arrive within {t:?}"),
            })?,
        None => collect.await,
    };
    let body = match collected {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(Refused::new(
                Refusal::BadRequest,
                format!("request body: {e}"),
            ))
        }
    };
    let env: Envelope<Request> =
        wire::decode(&body).map_err(|e| Refused::new(Refusal::BadRequest, e.to_string()))?;
    if !conn.policy.certified && !matches!(env.body, Request::Join(_)) {
        return Err(Refused::new(
            Refusal::NotMember,
            "a client certificate of the cluster is required".into(),
        ));
    }
    Ok(env)
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
        let Some(send) = self.send.as_mut() else {
            return Err(CallError::Http {
                addr,
                message: "not connected".into(),
            });
        };
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
    match key.char_indices().nth(16) {
        Some((i, _)) => &key[..i],
        None => key,
    }
}

pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
