//! Layer: binary (the `peerconf` tool; uses the library's public API only).
//!
//! A small HTTP client for the admin API, used by the CLI.

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

/// How long the CLI waits for one answer: a write waits for a commit, and a listing of 100k
/// entities takes a fraction of a second.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a command waits for a node that is still starting (it answers 503 `recovering` until
/// its store is open and replication has started) before reporting that answer.
const STARTING_WAIT: Duration = Duration::from_secs(30);

pub struct ApiClient {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// For an https:// API: trusts only the CA given with `--cacert`.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Sent as `Authorization: Bearer ...` on every request.
    token: Option<String>,
    /// Whether a 401 is explained as "log in" (every admin command; not `login` itself, whose
    /// 401 means a wrong name or password).
    explain_401: bool,
}

/// A failed call: `message` is what the user is shown.
#[derive(Debug)]
pub struct CallError {
    pub message: String,
    /// The HTTP status of an answer the node gave (none when it could not be reached).
    pub status: Option<StatusCode>,
}

impl CallError {
    pub fn new(message: impl Into<String>) -> CallError {
        CallError {
            message: message.into(),
            status: None,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<CallError> for String {
    fn from(e: CallError) -> String {
        e.message
    }
}

/// The admin API's URL as the CLI knows it (and keys stored sessions by): `http://` added when
/// no scheme is given, trailing slashes removed.
pub fn normalize_api(api: &str) -> String {
    let base = if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    base.trim_end_matches('/').to_string()
}

impl ApiClient {
    pub fn new(api: &str, cacert: Option<&std::path::Path>) -> Result<ApiClient, CallError> {
        let base = normalize_api(api);
        let tls = if base.starts_with("https://") {
            let Some(path) = cacert else {
                return Err(CallError::new(format!(
                    "--api {api}: an https:// admin API is verified against the cluster CA: pass --cacert FILE or set PEERCONF_CACERT (peerconf ca show --data-dir DIR prints it)"
                )));
            };
            let pem = std::fs::read_to_string(path)
                .map_err(|e| CallError::new(format!("--cacert {}: {e}", path.display())))?;
            Some(
                peerconf::net::tls::api_client_config(&pem)
                    .map_err(|e| CallError::new(format!("--cacert {}: {e}", path.display())))?,
            )
        } else if base.starts_with("http://") {
            None
        } else {
            return Err(CallError::new(format!(
                "--api {api}: the URL must start with http:// or https://"
            )));
        };
        base.parse::<hyper::Uri>()
            .map_err(|e| CallError::new(format!("--api {api}: not a URL: {e}")))?;
        Ok(ApiClient {
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
            tls,
            token: None,
            explain_401: false,
        })
    }

    /// The client of an admin command: sends `token` (if any) as its bearer, and explains a 401
    /// as "log in" (naming whether credentials were given at all).
    pub fn for_admin(mut self, token: Option<String>) -> Result<ApiClient, CallError> {
        if let Some(t) = &token {
            check_token(t)?;
        }
        self.token = token;
        self.explain_401 = true;
        Ok(self)
    }

    /// Sends `token` as the bearer, without the "log in" explanation of a 401 (`logout`).
    pub fn with_bearer(mut self, token: &str) -> Result<ApiClient, CallError> {
        check_token(token)?;
        self.token = Some(token.to_string());
        Ok(self)
    }

    /// The API's URL (scheme, host, port; no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request over a fresh TLS connection (the CLI makes one or two per run).
    async fn send_tls(
        &self,
        tls: std::sync::Arc<rustls::ClientConfig>,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            CallError::new(format!(
                "cannot reach the node API at {}: {what}: {e} (is `peerconf run` running? is --cacert the cluster's CA?)",
                self.base
            ))
        };
        let uri = req.uri().clone();
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail("connect", &e))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| fail("server name", &e))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS", &e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail("HTTP", &e))?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| fail("HTTP", &root_cause(&e)))
    }

    /// Sends a request; returns the JSON answer of a 2xx, or the error message the node gave.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, CallError> {
        let resp = self.send_when_started(method, path, body).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError::new(format!("reading the answer from {}: {e}", self.base)))?
            .to_bytes();
        self.answer(status, retry_after, &bytes)
    }

    /// A streamed GET (`text/event-stream`): calls `line` with each line of the answer as it
    /// arrives, until the stream ends or `line` returns false.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&str) -> bool,
    ) -> Result<(), CallError> {
        let resp = self.send_when_started(Method::GET, path, None).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| CallError::new(format!("reading the answer from {}: {e}", self.base)))?
                .to_bytes();
            return self.answer(status, None, &bytes).map(|_| ());
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| CallError::new(format!("the stream from {} broke: {e}", self.base)))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(data);
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let l: Vec<u8> = pending.drain(..=i).collect();
                let text = String::from_utf8_lossy(&l[..l.len() - 1]);
                if !line(text.trim_end_matches('\r')) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends a request; while the node answers that it is still starting (503 `recovering`, as
    /// it does between `peerconf run` and the moment its store is open), sends it again every
    /// 100 ms for up to [`STARTING_WAIT`], so a command typed right after starting a node works.
    async fn send_when_started(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let deadline = tokio::time::Instant::now() + STARTING_WAIT;
        loop {
            let resp = self.send(method.clone(), path, body.clone()).await?;
            if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
                return Ok(resp);
            }
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::new(format!("reading the answer from {}: {e}", self.base)))?
                .to_bytes();
            let starting = serde_json::from_slice::<Value>(&bytes)
                .is_ok_and(|v| v["error"]["code"] == "recovering");
            if !starting || tokio::time::Instant::now() >= deadline {
                return match self.answer(StatusCode::SERVICE_UNAVAILABLE, None, &bytes) {
                    Err(e) => Err(e),
                    Ok(_) => Err(CallError::new(format!(
                        "{} answered 503 Service Unavailable",
                        self.base
                    ))),
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a request and waits (at most [`REQUEST_TIMEOUT`]) for its answer's head.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(token) = &self.token {
            let mut v = hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| CallError::new("the token has characters a token never has"))?;
            v.set_sensitive(true);
            req = req.header(hyper::header::AUTHORIZATION, v);
        }
        if let Some(host) = url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
        {
            // HTTP/1 over our own TLS connection sends no Host unless asked.
            req = req.header("host", host);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError::new(format!("bad request to {url}: {e}")))?;
        let sent = async {
            match &self.tls {
                Some(tls) => self.send_tls(tls.clone(), req).await,
                None => self.client.request(req).await.map_err(|e| {
                    CallError::new(format!(
                        "cannot reach the node API at {}: {} (is `peerconf run` running? set --api or PEERCONF_API)",
                        self.base,
                        root_cause(&e)
                    ))
                }),
            }
        };
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, sent)
            .await
            .map_err(|_| {
                CallError::new(format!(
                    "no answer from {} within {REQUEST_TIMEOUT:?}",
                    self.base
                ))
            })??;
        Ok(resp)
    }

    /// The JSON of a 2xx answer, or the error the node gave, in the words the user is shown.
    fn answer(
        &self,
        status: StatusCode,
        retry_after: Option<u64>,
        bytes: &[u8],
    ) -> Result<Value, CallError> {
        let v: Value = serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).trim().to_string()));
        if status.is_success() {
            Ok(v)
        } else {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{status}: {v}"));
            let message = if status == StatusCode::UNAUTHORIZED && self.explain_401 {
                unauthorized_message(&self.base, self.token.is_some())
            } else if status == StatusCode::TOO_MANY_REQUESTS {
                match retry_after {
                    Some(s) => format!("{msg} (retry after {s} s)"),
                    None => msg,
                }
            } else if status.is_client_error() {
                msg
            } else {
                format!("{msg} ({status})")
            };
            Err(CallError {
                message,
                status: Some(status),
            })
        }
    }
}

/// What an admin command that got a 401 from `base` says: whether credentials were given at all.
pub fn unauthorized_message(base: &str, had_credentials: bool) -> String {
    if had_credentials {
        format!("credentials refused by {base} (expired, revoked, or the account disabled): run 'peerconf login --user NAME' again")
    } else {
        format!("not logged in to {base}: run 'peerconf login --user NAME' (or pass --token / set PEERCONF_TOKEN)")
    }
}

/// A token goes into an HTTP header: visible ASCII only (what the node issues).
fn check_token(token: &str) -> Result<(), CallError> {
    if token.is_empty() {
        return Err(CallError::new("the token is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CallError::new(
            "the token has characters a token never has (spaces, control characters or non-ASCII)",
        ));
    }
    Ok(())
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Percent-encodes a path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
