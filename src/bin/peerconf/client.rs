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

pub struct ApiClient {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    /// For an https:// API: trusts only the CA given with `--cacert`.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// A failed call: the message is what the user is shown.
#[derive(Debug)]
pub struct CallError(pub String);

impl ApiClient {
    pub fn new(api: &str, cacert: Option<&std::path::Path>) -> Result<ApiClient, CallError> {
        let base = if api.contains("://") {
            api.to_string()
        } else {
            format!("http://{api}")
        };
        let tls = if base.starts_with("https://") {
            let Some(path) = cacert else {
                return Err(CallError(format!(
                    "--api {api}: an https:// admin API is verified against the cluster CA: pass --cacert FILE or set PEERCONF_CACERT (peerconf ca show --data-dir DIR prints it)"
                )));
            };
            let pem = std::fs::read_to_string(path)
                .map_err(|e| CallError(format!("--cacert {}: {e}", path.display())))?;
            Some(
                peerconf::net::tls::api_client_config(&pem)
                    .map_err(|e| CallError(format!("--cacert {}: {e}", path.display())))?,
            )
        } else if base.starts_with("http://") {
            None
        } else {
            return Err(CallError(format!(
                "--api {api}: the URL must start with http:// or https://"
            )));
        };
        let base = base.trim_end_matches('/').to_string();
        base.parse::<hyper::Uri>()
            .map_err(|e| CallError(format!("--api {api}: not a URL: {e}")))?;
        Ok(ApiClient {
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
            tls,
        })
    }

    /// One request over a fresh TLS connection (the CLI makes one or two per run).
    async fn send_tls(
        &self,
        tls: std::sync::Arc<rustls::ClientConfig>,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            CallError(format!(
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
        let url = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header("content-type", "application/json");
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
            .map_err(|e| CallError(format!("bad request to {url}: {e}")))?;
        let sent = async {
            match &self.tls {
                Some(tls) => self.send_tls(tls.clone(), req).await,
                None => self.client.request(req).await.map_err(|e| {
                    CallError(format!(
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
                CallError(format!(
                    "no answer from {} within {REQUEST_TIMEOUT:?}",
                    self.base
                ))
            })??;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError(format!("reading the answer from {}: {e}", self.base)))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_string()));
        if status.is_success() {
            Ok(v)
        } else {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{status}: {v}"));
            Err(CallError(
                if status == StatusCode::NOT_FOUND || status.is_client_error() {
                    msg
                } else {
                    format!("{msg} ({status})")
                },
            ))
        }
    }
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
