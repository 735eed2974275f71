//! The IPC port under abuse by clients without a certificate, against a real two-node cluster:
//! thousands of idle TCP and TLS connections (from one address, then from many), oversized
//! request bodies, requests other than a join. The node's memory stays bounded, its admin API
//! answers, a member's new connection is served, writes keep replicating both ways, and
//! oversized bodies are refused with 413 (or the connection is closed).

use crate::support::*;
use hyper::body::{Body, Bytes, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use peerconf::core::proto::{
    Envelope, JoinRequest, Request, Response, HEADER_CLUSTER, HEADER_PROTOCOL, PROTOCOL_VERSION,
};
use peerconf::net::admission::Limits;
use peerconf::net::ipc::{PeerClient, PATH};
use peerconf::net::tls::{Material, TlsFiles, CLUSTER_DNS_NAME};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// Fast repair cycles, so a write reaches the other node within a second or two.
const FAST: &str = r#"{"replication_interval_ms":500}"#;
/// Growth of the attacked node's resident memory the test tolerates over its figure before the
/// abuse. Measured (debug build, 2 cores): +8 MiB (24 -> 32 MiB) with the limits in place; the
/// port without them (every connection kept, bodies of up to 32 MiB read, 16 streams each) grew
/// by 234 MiB (23 -> 263 MiB) under this same test.
const RSS_GROWTH_MAX_KIB: u64 = 100 * 1024;
/// Connections attempted from one address as fast as they can be opened.
const ONE_ADDRESS: usize = 2000;
/// Addresses (127.0.1.x) that each open a few idle connections at once, then keep opening.
const MANY_ADDRESSES: u8 = 100;
const PER_ADDRESS: usize = 10;
/// Connections (127.0.4.x) with requests whose bodies stall after this many bytes.
const STALLED_CONNECTIONS: u8 = 16;
const STALLED_STREAMS: usize = 4;
const STALLED_BYTES: usize = 3 << 20;
/// How long the abuse lasts after its first waves, while the checks run.
const PRESSURE_FOR: Duration = Duration::from_secs(20);

/// A process's resident set (VmRSS), in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's resident set every 50 ms until stopped; keeps the largest.
struct RssSampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let max = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (max.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    m.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler {
            max,
            stop,
            thread: Some(thread),
        }
    }

    fn max_kib(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client that trusts the cluster's CA and presents no certificate: what a joiner (or anyone)
/// looks like to the IPC port.
fn anonymous_tls(m: &Material) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(m.ca_cert_pem.as_bytes()).expect("CA PEM"))
        .expect("CA certificate");
    let mut c = rustls::ClientConfig::builder_with_provider(peerconf::net::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(c)
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// A TCP connection from `src` (any 127.0.0.0/8 address is local on Linux).
async fn tcp_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    match tokio::time::timeout(Duration::from_secs(5), s.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// A TLS connection without a certificate from `src`, or None if the node closed it during the
/// handshake (refused at accept) or it failed.
async fn tls_from(
    src: IpAddr,
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Option<TlsStream<TcpStream>> {
    let tcp = tcp_from(src, dst).await.ok()?;
    let connect =
        tokio_rustls::TlsConnector::from(tls).connect(peerconf::net::tls::server_name(), tcp);
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .ok()?
        .ok()
}

/// Whether the node still holds a connection open: a read that would block means yes; an end
/// of stream or an error, that the node closed it.
async fn still_open<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_millis(2), s.read(&mut buf)).await {
            Err(_) => return true,
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            // TLS session tickets and the like: read on.
            Ok(Ok(_)) => continue,
        }
    }
}

/// A request body sent in 16 KiB frames with no declared length.
struct Streamed {
    data: Bytes,
    /// Once `data` is sent, never end (the node must not wait for the rest).
    stall: bool,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.data.is_empty() {
            // Stalled: nothing more, ever (no waker is kept, nothing will wake it).
            return if self.stall {
                Poll::Pending
            } else {
                Poll::Ready(None)
            };
        }
        let n = self.data.len().min(16 * 1024);
        let chunk = self.data.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

/// What became of one request sent without a certificate.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Answered with this HTTP status.
    Status(u16),
    /// The node closed the connection or the stream instead (or never let it open).
    Closed(String),
    /// Nothing came back in time: the node is still reading (or holding) the body.
    NoAnswer,
}

impl Outcome {
    /// 413, or a connection the node closed: how an oversized body must end.
    fn refused(&self) -> bool {
        matches!(self, Outcome::Status(413) | Outcome::Closed(_))
    }
}

/// An HTTP/2 connection without a certificate from `src`.
async fn h2_from(
    src: IpAddr,
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<hyper::client::conn::http2::SendRequest<BoxBody>, String> {
    let tcp = tcp_from(src, dst)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(peerconf::net::tls::server_name(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;

/// One POST of `body` to the IPC route on an open connection; waits `wait` for the answer.
async fn post(
    send: &mut hyper::client::conn::http2::SendRequest<BoxBody>,
    cluster: &str,
    body: BoxBody,
    wait: Duration,
) -> Outcome {
    let req = match hyper::Request::builder()
        .method("POST")
        .uri(format!("https://{CLUSTER_DNS_NAME}{PATH}"))
        .header(HEADER_PROTOCOL, PROTOCOL_VERSION.to_string())
        .header(HEADER_CLUSTER, cluster)
        .body(body)
    {
        Ok(r) => r,
        Err(e) => return Outcome::Closed(format!("request: {e}")),
    };
    let answer = async {
        send.ready().await?;
        send.send_request(req).await
    };
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(resp)) => Outcome::Status(resp.status().as_u16()),
        Ok(Err(e)) => Outcome::Closed(format!("request: {e}")),
        Err(_) => Outcome::NoAnswer,
    }
}

/// One POST to the IPC route without a certificate, on a connection of its own from `src`.
async fn post_anonymous(
    src: IpAddr,
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    cluster: &str,
    body: BoxBody,
) -> Outcome {
    match h2_from(src, dst, tls).await {
        Ok(mut send) => post(&mut send, cluster, body, Duration::from_secs(20)).await,
        Err(e) => Outcome::Closed(e),
    }
}

/// A join request whose certificate request is `bytes` long: a multi-MiB body to the join route.
fn oversized_join(bytes: usize) -> Bytes {
    let env = Envelope {
        protocol: PROTOCOL_VERSION,
        cluster_id: String::new(),
        from: "0123456789abcdef0123456789abcdef".into(),
        version: peerconf::net::ipc::version(),
        body: Request::Join(JoinRequest {
            token_secret: "not-a-token".into(),
            csr_pem: "A".repeat(bytes),
            node_id: "0123456789abcdef0123456789abcdef".into(),
            name: "intruder".into(),
            addr: "127.0.0.1:1".into(),
            wall_ms: wall_ms(),
        }),
    };
    Bytes::from(peerconf::core::wire::encode(&env))
}

/// Sends the oversized bodies: `n` POSTs of 1 MiB with a declared length, each from its own
/// address in 127.0.2.x starting at `first`, and one streamed multi-MiB join; returns each one's
/// outcome.
async fn oversized_bodies(
    first: u8,
    n: u8,
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    cluster: String,
) -> Vec<Outcome> {
    use http_body_util::BodyExt;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (tls, cluster) = (tls.clone(), cluster.clone());
        tasks.push(tokio::spawn(async move {
            let body = http_body_util::Full::new(Bytes::from(vec![0x5a; 1 << 20]));
            post_anonymous(
                v4(127, 0, 2, first + i),
                dst,
                tls,
                &cluster,
                body.boxed_unsync(),
            )
            .await
        }));
    }
    let join = Streamed {
        data: oversized_join(4 << 20),
        stall: false,
    };
    let streamed =
        post_anonymous(v4(127, 0, 2, first + n), dst, tls, "", join.boxed_unsync()).await;
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Outcome::Closed(e.to_string())));
    }
    out.push(streamed);
    out
}

/// Connections (from 127.0.4.x) that each start `STALLED_STREAMS` requests whose bodies send
/// `STALLED_BYTES` and then stall, never ending: a port that reads bodies of non-members into
/// memory holds all of it. Returns each request's outcome after at most 10 s.
async fn stalled_bodies(
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    cluster: String,
) -> Vec<Outcome> {
    use http_body_util::BodyExt;
    static JUNK: [u8; 64 * 1024] = [0x5a; 64 * 1024];
    let mut conns = Vec::new();
    for c in 1..=STALLED_CONNECTIONS {
        let (tls, cluster) = (tls.clone(), cluster.clone());
        conns.push(tokio::spawn(async move {
            let send = match h2_from(v4(127, 0, 4, c), dst, tls).await {
                Ok(s) => s,
                Err(e) => return vec![Outcome::Closed(e); STALLED_STREAMS],
            };
            let mut streams = Vec::new();
            for _ in 0..STALLED_STREAMS {
                let mut send = send.clone();
                let cluster = cluster.clone();
                streams.push(tokio::spawn(async move {
                    let mut data = Vec::with_capacity(STALLED_BYTES / JUNK.len() + 1);
                    let mut left = STALLED_BYTES;
                    while left > 0 {
                        let n = left.min(JUNK.len());
                        data.push(Bytes::from_static(&JUNK[..n]));
                        left -= n;
                    }
                    let body = Frames {
                        frames: data.into(),
                    };
                    post(
                        &mut send,
                        &cluster,
                        body.boxed_unsync(),
                        Duration::from_secs(10),
                    )
                    .await
                }));
            }
            let mut out = Vec::new();
            for s in streams {
                out.push(s.await.unwrap_or_else(|e| Outcome::Closed(e.to_string())));
            }
            out
        }));
    }
    let mut out = Vec::new();
    for c in conns {
        out.extend(c.await.unwrap_or_default());
    }
    out
}

/// A body sent as these frames, then stalled forever.
struct Frames {
    frames: std::collections::VecDeque<Bytes>,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.frames.pop_front() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// What the abuse did, as seen from its side.
#[derive(Debug, Default)]
struct Abuse {
    /// Connections attempted from the one address, and how many finished a TLS handshake.
    one_address_attempts: usize,
    one_address_handshakes: usize,
    /// From many addresses: raw TCP connections opened, TLS handshakes finished.
    many_raw: usize,
    many_tls: usize,
    /// Of the connections of the first waves, how many the node still held right after them.
    still_open: usize,
    /// Connections opened while the checks ran (pressure), and the most held at once.
    pressure_opened: usize,
    held_max: usize,
}

/// Every connection the abuse holds, with when it was opened.
#[derive(Default)]
struct Held {
    tls: Vec<(Instant, TlsStream<TcpStream>)>,
    raw: Vec<(Instant, TcpStream)>,
}

impl Held {
    fn len(&self) -> usize {
        self.tls.len() + self.raw.len()
    }

    /// Drops what the node closed long ago (it closes idle ones within seconds).
    fn prune(&mut self, older_than: Duration) {
        let now = Instant::now();
        self.tls
            .retain(|(at, _)| now.duration_since(*at) < older_than);
        self.raw
            .retain(|(at, _)| now.duration_since(*at) < older_than);
    }
}

/// The first waves: `ONE_ADDRESS` TLS connections from 127.0.0.2, then from each of
/// `MANY_ADDRESSES` addresses half raw TCP (that never start their handshake) and half TLS
/// without a certificate. Returns what it holds and how many the node still held after them.
async fn first_waves(
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    total: usize,
) -> (Held, Abuse) {
    let mut held = Held::default();
    let mut abuse = Abuse::default();
    let one = v4(127, 0, 0, 2);
    let many = usize::from(MANY_ADDRESSES) * PER_ADDRESS;
    let attempts = ONE_ADDRESS.min(total.saturating_sub(many.min(total / 2)));
    let mut tasks = Vec::new();
    for _ in 0..attempts {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move { tls_from(one, dst, tls).await }));
        // At most a few hundred in flight at once.
        if tasks.len() >= 256 {
            for t in tasks.drain(..) {
                if let Ok(Some(s)) = t.await {
                    held.tls.push((Instant::now(), s));
                    abuse.one_address_handshakes += 1;
                }
            }
        }
    }
    for t in tasks.drain(..) {
        if let Ok(Some(s)) = t.await {
            held.tls.push((Instant::now(), s));
            abuse.one_address_handshakes += 1;
        }
    }
    abuse.one_address_attempts = attempts;
    let per = PER_ADDRESS.min(total.saturating_sub(attempts) / MANY_ADDRESSES as usize);
    let mut tls_tasks = Vec::new();
    for a in 1..=MANY_ADDRESSES {
        let src = v4(127, 0, 1, a);
        for i in 0..per {
            if i % 2 == 0 {
                if let Ok(s) = tcp_from(src, dst).await {
                    held.raw.push((Instant::now(), s));
                    abuse.many_raw += 1;
                }
            } else {
                let tls = tls.clone();
                tls_tasks.push(tokio::spawn(async move { tls_from(src, dst, tls).await }));
            }
        }
    }
    for t in tls_tasks {
        if let Ok(Some(s)) = t.await {
            held.tls.push((Instant::now(), s));
            abuse.many_tls += 1;
        }
    }
    // Let the node act on what it refused after a handshake.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (_, s) in held.tls.iter_mut() {
        if still_open(s).await {
            abuse.still_open += 1;
        }
    }
    for (_, s) in held.raw.iter_mut() {
        if still_open(s).await {
            abuse.still_open += 1;
        }
    }
    abuse.held_max = held.len();
    (held, abuse)
}

/// Keeps opening connections from 127.0.3.x (each address within its rate: two a second), half
/// raw TCP and half TLS, holding each for 15 s, until `stop`.
async fn pressure(
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    mut held: Held,
    mut abuse: Abuse,
    budget: usize,
    stop: Arc<AtomicBool>,
) -> Abuse {
    let mut round: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        held.prune(Duration::from_secs(15));
        let mut tasks = Vec::new();
        for a in 1..=MANY_ADDRESSES {
            if held.len() + tasks.len() >= budget {
                break;
            }
            let src = v4(127, 0, 3, a);
            if (round + u32::from(a)).is_multiple_of(2) {
                if let Ok(s) = tcp_from(src, dst).await {
                    held.raw.push((Instant::now(), s));
                    abuse.pressure_opened += 1;
                }
            } else {
                let tls = tls.clone();
                tasks.push(tokio::spawn(async move { tls_from(src, dst, tls).await }));
            }
        }
        for t in tasks {
            if let Ok(Some(s)) = t.await {
                held.tls.push((Instant::now(), s));
                abuse.pressure_opened += 1;
            }
        }
        abuse.held_max = abuse.held_max.max(held.len());
        round = round.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    abuse
}

/// A user's home directory on a node, through its API.
fn user_home(api: &str, name: &str) -> Option<Value> {
    http_json(api, &format!("/v1/entities/user/{name}")).map(|v| v["fields"]["home_dir"].clone())
}

fn home_of(name: &str) -> String {
    format!("/home/{name}")
}

fn put_user(n: &ClusterNode, name: &str) {
    let fields = serde_json::json!({ "home_dir": home_of(name) }).to_string();
    let o = n.d.cli(&["put", "user", name, "--json", &fields]);
    assert!(
        o.status.success(),
        "put user {name} on {}: {}",
        n.name,
        stderr(&o)
    );
}

/// Waits until user `name` shows on the node at `api`; returns how long it took.
fn replicated(api: &str, name: &str, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    wait_for(within, || {
        (user_home(api, name) == Some(Value::String(home_of(name)))).then_some(())
    })
    .map(|_| t0.elapsed())
}

/// The counts in the node's last "IPC port closed" line: `reason=count` pairs.
fn refused_counts(log: &str) -> Vec<(String, u64)> {
    let Some(line) = log.lines().rev().find(|l| l.contains("IPC port closed")) else {
        return Vec::new();
    };
    let Some(list) = line
        .split("refused=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
    else {
        return Vec::new();
    };
    list.split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Thousands of connections without a certificate, from one address and from many, and
/// oversized bodies, against n1 of a two-node cluster: n1's resident memory grows by less than
/// [`RSS_GROWTH_MAX_KIB`]; it holds no more of those connections than its caps; its admin API
/// answers; a member's new connection is served; writes made on either node during the abuse
/// reach the other; oversized bodies are refused with 413 or a closed connection.
#[test]
fn clients_without_a_certificate_cannot_exhaust_the_ipc_port() {
    // This process holds thousands of sockets: its soft open-file limit goes up to the hard one
    // (the node's own function, so the same as the node does).
    let files = peerconf::net::limits::raise_nofile()
        .expect("raising the open-file limit")
        .soft;
    // The node inherits this limit (and raises its soft limit to the hard one, which this is).
    let caps = Limits::for_file_limit(files);
    let uncertified_cap = caps.handshakes_max + caps.uncertified_max;
    // Sockets this test may hold: most of its limit, and well over the node's caps.
    let total = usize::try_from(files)
        .unwrap_or(usize::MAX)
        .saturating_sub(512)
        .min(ONE_ADDRESS + usize::from(MANY_ADDRESSES) * PER_ADDRESS);
    assert!(
        total > 2 * uncertified_cap,
        "the open-file limit ({files}) is too low for this test"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut ns = form_cluster(tmp.path(), 2, FAST);
    let ipc: SocketAddr = ns[0].ipc.parse().expect("n1's IPC address");
    let pid = ns[0].d.child.as_ref().expect("n1 runs").id();
    let n1_tls = TlsFiles::new(&ns[0].dir).read().expect("n1's TLS files");
    let n2_tls = TlsFiles::new(&ns[1].dir).read().expect("n2's TLS files");
    let cluster = http_json(&ns[0].api, "/v1/nodes").expect("GET /v1/nodes")["cluster_id"]
        .as_str()
        .expect("cluster_id")
        .to_string();
    let anonymous = anonymous_tls(&n1_tls);
    let log = ns[0].d.log_text();
    assert!(
        log.contains("soft limit raised to the hard limit"),
        "n1 did not log its open-file limit: {log}"
    );

    // The cluster works, and n1 has settled: its resident memory before the abuse.
    put_user(&ns[0], "before");
    assert!(
        replicated(&ns[1].api, "before", Duration::from_secs(15)).is_some(),
        "the cluster does not replicate even before the abuse"
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(pid).expect("n1's VmRSS");
    let sampler = RssSampler::start(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");

    // Oversized bodies on a quiet port: each refused with 413. A small request other than a join
    // is refused too.
    let quiet = rt.block_on(oversized_bodies(
        1,
        8,
        ipc,
        anonymous.clone(),
        cluster.clone(),
    ));
    for (i, r) in quiet.iter().enumerate() {
        assert_eq!(
            r,
            &Outcome::Status(413),
            "oversized body {i} without a certificate on a quiet port"
        );
    }
    let not_join = rt.block_on(async {
        let mut c = PeerClient::new(&ns[0].ipc, anonymous.clone(), &cluster, "intruder");
        c.call(Request::DigestRoot { root: [0; 32] }).await
    });
    assert!(
        matches!(not_join, Ok(Response::Refused { .. })),
        "a replication request without a certificate was not refused: {not_join:?}"
    );

    // Requests whose bodies stall, held while the rest goes on; then the first waves, and
    // pressure while the checks run.
    let stalled = rt.spawn(stalled_bodies(ipc, anonymous.clone(), cluster.clone()));
    let t0 = Instant::now();
    let (held, abuse) = rt.block_on(first_waves(ipc, anonymous.clone(), total));
    let waves_took = t0.elapsed();
    assert!(
        abuse.still_open <= uncertified_cap,
        "n1 held {} connections without a certificate, over its caps ({} in handshake + {} uncertified): {abuse:?}",
        abuse.still_open,
        caps.handshakes_max,
        caps.uncertified_max
    );
    let stop = Arc::new(AtomicBool::new(false));
    let pressure = rt.spawn(pressure(
        ipc,
        anonymous.clone(),
        held,
        abuse,
        total,
        stop.clone(),
    ));
    let checks_from = Instant::now();

    // The admin API answers.
    let t = Instant::now();
    let (status, body) = http(&ns[0].api, "GET", "/v1/node", None);
    let api_took = t.elapsed();
    assert_eq!(status, 200, "n1's admin API during the abuse: {body}");

    // A member's new connection (n2's certificate, from 127.0.0.1) is served.
    let (member_ok, member_attempts) = rt.block_on(async {
        let mut attempts = 0;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            attempts += 1;
            let tls = peerconf::net::tls::client_config(&n2_tls).expect("n2's client config");
            let mut c = PeerClient::new(&ns[0].ipc, tls, &cluster, &ns[1].id);
            let r = c.call(Request::DigestRoot { root: [0; 32] }).await;
            if matches!(r, Ok(Response::Buckets { .. }) | Ok(Response::InSync)) {
                return (true, attempts);
            }
            if Instant::now() > until {
                return (false, attempts);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(
        member_ok,
        "a member's new connection was not served within 10 s ({member_attempts} attempts)"
    );

    // Writes on either node reach the other.
    put_user(&ns[0], "during-n1");
    let to_n2 = replicated(&ns[1].api, "during-n1", Duration::from_secs(15));
    put_user(&ns[1], "during-n2");
    let to_n1 = replicated(&ns[0].api, "during-n2", Duration::from_secs(15));
    assert!(
        to_n2.is_some() && to_n1.is_some(),
        "replication during the abuse: n1 -> n2 {to_n2:?}, n2 -> n1 {to_n1:?}; n1's log:\n{}",
        ns[0].d.log_text()
    );

    // Oversized bodies during the abuse: 413 or a closed connection, never an answer.
    let during = rt.block_on(oversized_bodies(
        101,
        8,
        ipc,
        anonymous.clone(),
        cluster.clone(),
    ));
    for (i, r) in during.iter().enumerate() {
        assert!(
            r.refused(),
            "oversized body {i} without a certificate during the abuse: {r:?}"
        );
    }

    // Keep the pressure on for the rest of its time, then stop it.
    if let Some(rest) = PRESSURE_FOR.checked_sub(checks_from.elapsed()) {
        std::thread::sleep(rest);
    }
    stop.store(true, Ordering::Relaxed);
    let abuse = rt.block_on(pressure).expect("the pressure task");
    let stalled = rt.block_on(stalled).expect("the stalled bodies");
    let rss_max = sampler.max_kib();
    drop(sampler);
    drop(rt);
    let rss_after = rss_kib(pid).unwrap_or(0);
    let growth = rss_max.saturating_sub(rss_before);

    ns[0].stop();
    let refused = refused_counts(&ns[0].d.log_text());
    eprintln!(
        "ipc_abuse: n1 VmRSS before {rss_before} KiB, max during {rss_max} KiB (+{growth} KiB), after {rss_after} KiB; \
         caps {caps:?}; first waves took {waves_took:?}; {abuse:?}; admin API answered in {api_took:?}; \
         member served after {member_attempts} attempt(s); replication n1->n2 {to_n2:?}, n2->n1 {to_n1:?}; \
         oversized quiet {quiet:?}; during {during:?}; stalled {stalled:?}; n1 refused {refused:?}"
    );
    for (i, r) in stalled.iter().enumerate() {
        assert!(
            r.refused(),
            "stalled oversized body {i} without a certificate: {r:?}"
        );
    }
    assert!(
        growth < RSS_GROWTH_MAX_KIB,
        "n1's resident memory grew by {growth} KiB under the abuse (from {rss_before} KiB), over {RSS_GROWTH_MAX_KIB} KiB"
    );
    let count = |label: &str| {
        refused
            .iter()
            .find(|(k, _)| k == label)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    assert!(
        count("rate_limited") > 0,
        "nothing was refused for its address's rate: {refused:?}"
    );
    assert!(
        count("too_large") >= 9,
        "the oversized bodies were not counted: {refused:?}"
    );
    assert_eq!(
        count("certified_full"),
        0,
        "a member was refused: {refused:?}"
    );
    ns[1].stop();
}
