//! Layer: admin (imports node, cluster, and the console's files).
//!
//! The Setup UI of `peerconf setup`: before a node exists, its admin address serves a page that
//! creates a new cluster or joins one, and nothing else. Every request that sets the node up
//! carries the one-time setup code printed by `peerconf setup` (a random secret), so whoever else
//! reaches the port cannot take the node. A refusal names the form field it concerns, and
//! nothing is created by a refused attempt, so the operator corrects the field and tries again.
//! Once set up, every request goes to the node's own API ([`router`]'s `after`).

use crate::cluster::join::{self, JoinError, Token};
use crate::core::members;
use crate::core::proto::Refusal;
use crate::node::setup::{self, AdminBootstrap, InitOptions, NodeConfig};
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// The largest setup request read (a form of a few fields).
const BODY_MAX: usize = 64 * 1024;

/// One node's Setup UI: where it will live, the code that authorises setting it up, and (once
/// done) the node's configuration.
pub struct SetupUi {
    dir: PathBuf,
    listen: SocketAddr,
    code: String,
    /// One attempt at a time: a second waits, then finds the node set up (or not).
    attempt: tokio::sync::Mutex<()>,
    done: OnceLock<NodeConfig>,
    finished: tokio::sync::Notify,
}

impl SetupUi {
    pub fn new(dir: PathBuf, listen: SocketAddr, code: String) -> SetupUi {
        SetupUi {
            dir,
            listen,
            code,
            attempt: tokio::sync::Mutex::new(()),
            done: OnceLock::new(),
            finished: tokio::sync::Notify::new(),
        }
    }

    /// Resolves once the node has been created or has joined: its configuration.
    pub async fn finished(&self) -> NodeConfig {
        loop {
            let notified = self.finished.notified();
            if let Some(cfg) = self.done.get() {
                return cfg.clone();
            }
            notified.await;
        }
    }
}

/// A refusal of the Setup UI: `{"error": {"code", "message", "field"?}}`, the admin API's shape.
/// `field` names the form field to correct.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl SetupError {
    fn field(field: &'static str, message: impl Into<String>) -> SetupError {
        SetupError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: message.into(),
            field: Some(field),
        }
    }

    fn general(status: StatusCode, code: &'static str, message: impl Into<String>) -> SetupError {
        SetupError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
}

impl IntoResponse for SetupError {
    fn into_response(self) -> Response {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            e["field"] = json!(f);
        }
        (self.status, axum::Json(json!({ "error": e }))).into_response()
    }
}

/// The Setup UI's routes until the node is set up, then `after` (the node's API) for everything.
pub fn router(ui: Arc<SetupUi>, after: Router) -> Router {
    Router::new().fallback(move |req: Request| {
        let (ui, after) = (ui.clone(), after.clone());
        async move {
            let mut resp = if ui.done.get().is_some() {
                use tower::ServiceExt;
                match after.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            } else {
                before(&ui, req).await
            };
            super::console::secure_headers(resp.headers_mut());
            resp
        }
    })
}

async fn before(ui: &SetupUi, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET | &Method::HEAD, "/") => {
            (StatusCode::SEE_OTHER, [(header::LOCATION, "/setup")]).into_response()
        }
        (&Method::GET | &Method::HEAD, "/setup") => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            super::console::SETUP_HTML,
        )
            .into_response(),
        (&Method::GET | &Method::HEAD, "/livez") => "ok (not set up yet)\n".into_response(),
        (&Method::GET | &Method::HEAD, p) if p.starts_with("/ui/assets/") => {
            match super::console::asset(&p["/ui/assets/".len()..]) {
                Some((text, ty)) => (
                    [
                        (header::CONTENT_TYPE, ty),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    text,
                )
                    .into_response(),
                None => SetupError::general(StatusCode::NOT_FOUND, "not_found", "no such file")
                    .into_response(),
            }
        }
        (&Method::POST, "/setup/create" | "/setup/join") => {
            let create = path == "/setup/create";
            match submit(ui, req, create).await {
                Ok(cfg) => axum::Json(json!({
                    "node_id": cfg.node_id,
                    "name": cfg.name,
                    "cluster_id": cfg.cluster_id,
                    "next": "/ui/",
                }))
                .into_response(),
                Err(e) => e.into_response(),
            }
        }
        _ => SetupError::general(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_set_up",
            "this node is not set up yet: open its Setup UI (the URL `peerconf setup` printed)",
        )
        .into_response(),
    }
}

/// A string field of the form, trimmed; None when absent or empty.
fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

async fn submit(ui: &SetupUi, req: Request, create: bool) -> Result<NodeConfig, SetupError> {
    // Only the Setup UI's own page may post (a browser names the page's origin).
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let same = origin.to_str().ok().is_some_and(|o| {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            rest.zip(host)
                .is_some_and(|(r, h)| r.eq_ignore_ascii_case(h))
        });
        if !same {
            return Err(SetupError::general(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "requests from pages of another origin are refused",
            ));
        }
    }
    let body: Bytes = axum::body::to_bytes(req.into_body(), BODY_MAX)
        .await
        .map_err(|e| {
            SetupError::general(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_body",
                format!("the request body could not be read: {e}"),
            )
        })?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        SetupError::general(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the request body is not JSON: {e}"),
        )
    })?;
    let code = text(&v, "code").unwrap_or_default();
    {
        use subtle::ConstantTimeEq;
        if !bool::from(code.as_bytes().ct_eq(ui.code.as_bytes())) {
            return Err(SetupError::general(
                StatusCode::FORBIDDEN,
                "setup_code",
                "the setup code is missing or wrong: open the exact URL `peerconf setup` printed",
            ));
        }
    }
    let _one = ui.attempt.lock().await;
    if ui.done.get().is_some() {
        return Err(SetupError::general(
            StatusCode::CONFLICT,
            "already_set_up",
            "this node is already set up: sign in to its console at /ui/",
        ));
    }
    let opts = common_options(ui, &v)?;
    let cfg = if create {
        create_cluster(ui, &v, opts).await?
    } else {
        join_cluster(ui, &v, opts).await?
    };
    tracing::info!(node = %cfg.node_id, name = %cfg.name, cluster = %cfg.cluster_id, created = create, "set up from the Setup UI");
    let _ = ui.done.set(cfg.clone());
    ui.finished.notify_waiters();
    Ok(cfg)
}

/// The fields both forms have: node name, IPC listen and advertise addresses.
fn common_options(ui: &SetupUi, v: &Value) -> Result<InitOptions, SetupError> {
    let name = text(v, "node_name")
        .ok_or_else(|| SetupError::field("node_name", "a node name is needed"))?;
    if !members::valid_node_name(&name) {
        return Err(SetupError::field(
            "node_name",
            "a node name is 1 to 64 of A-Z a-z 0-9 . _ -",
        ));
    }
    let ipc = text(v, "ipc_listen").ok_or_else(|| {
        SetupError::field(
            "ipc_listen",
            "an IPC listen address is needed (address:port, e.g. 127.0.0.1:7701)",
        )
    })?;
    let ipc_listen: SocketAddr = ipc.parse().map_err(|_| {
        SetupError::field(
            "ipc_listen",
            format!("{ipc:?} is not an address:port (e.g. 127.0.0.1:7701 or 0.0.0.0:7701)"),
        )
    })?;
    if ipc_listen == ui.listen {
        return Err(SetupError::field(
            "ipc_listen",
            format!("{ipc_listen} is this page's own address (the admin API): choose another port"),
        ));
    }
    if let Err(e) = std::net::TcpListener::bind(ipc_listen) {
        return Err(SetupError::field(
            "ipc_listen",
            format!("cannot listen on {ipc_listen}: {e}"),
        ));
    }
    let ipc_advertise = text(v, "ipc_advertise");
    if let Some(a) = &ipc_advertise {
        let port_ok = a
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok || a.len() > 300 || a.chars().any(char::is_whitespace) {
            return Err(SetupError::field(
                "ipc_advertise",
                format!("{a:?} is not host:port (the address peers reach this node's IPC port at)"),
            ));
        }
    }
    Ok(InitOptions {
        name: Some(name),
        api_listen: ui.listen,
        ipc_listen,
        ipc_advertise,
        ..InitOptions::default()
    })
}

async fn create_cluster(
    ui: &SetupUi,
    v: &Value,
    mut opts: InitOptions,
) -> Result<NodeConfig, SetupError> {
    let admin = text(v, "admin_name")
        .ok_or_else(|| SetupError::field("admin_name", "the first SuperAdmin's name is needed"))?;
    let password = v
        .get("password")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| SetupError::field("password", "a password is needed"))?
        .to_string();
    if let Some(confirm) = v.get("confirm_password").and_then(Value::as_str) {
        if confirm != password {
            return Err(SetupError::field(
                "confirm_password",
                "the two passwords differ",
            ));
        }
    }
    opts.admin = Some(AdminBootstrap {
        name: admin,
        password,
    });
    let dir = ui.dir.clone();
    let made = tokio::task::spawn_blocking(move || {
        let clock = crate::node::time::SystemClock::shared();
        setup::init(&dir, &opts, &clock, None)
    })
    .await
    .map_err(|_| {
        SetupError::general(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "creating the node failed",
        )
    })?;
    made.map_err(|e| {
        use crate::core::entity::WriteError;
        use crate::node::Error as E;
        match &e {
            E::Write(WriteError::Schema(s)) => match s.field() {
                Some("password") => SetupError::field("password", s.to_string()),
                Some(_) | None => SetupError::field("admin_name", s.to_string()),
            },
            E::BadName(_) => SetupError::field("node_name", e.to_string()),
            E::AlreadyInitialised { .. } => {
                SetupError::general(StatusCode::CONFLICT, "already_set_up", e.to_string())
            }
            _ => SetupError::general(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    })
}

async fn join_cluster(
    ui: &SetupUi,
    v: &Value,
    opts: InitOptions,
) -> Result<NodeConfig, SetupError> {
    let peer = text(v, "peer").ok_or_else(|| {
        SetupError::field(
            "peer",
            "the IPC address of a node of the cluster is needed (host:port)",
        )
    })?;
    let token = text(v, "token").ok_or_else(|| {
        SetupError::field(
            "token",
            "a join token is needed (made on a node of the cluster: its console's Cluster page, or `peerconf token create`)",
        )
    })?;
    if Token::parse(&token).is_err() {
        return Err(SetupError::field(
            "token",
            "this is not a join token (pcjoin1-...): copy it whole from the Cluster page or `peerconf token create`",
        ));
    }
    join::join(&ui.dir, &peer, &token, &opts)
        .await
        .map_err(|e| join_refusal(&peer, e))
}

/// Which field a refused join concerns, and the words shown next to it.
fn join_refusal(peer: &str, e: JoinError) -> SetupError {
    let msg = e.to_string();
    match e {
        JoinError::BadToken(_) | JoinError::CaMismatch => SetupError::field("token", msg),
        JoinError::BadName(_) => SetupError::field("node_name", msg),
        JoinError::Refused { reason, .. } => match reason {
            Refusal::Token => SetupError::field(
                "token",
                format!("{msg} (a token works once and expires: make a new one)"),
            ),
            Refusal::Clock => SetupError::field(
                "peer",
                format!("{msg} (set this machine's clock, e.g. with NTP, then try again)"),
            ),
            _ => SetupError::field("peer", msg),
        },
        JoinError::Untrusted(_) => SetupError::field(
            "peer",
            format!("{msg}: the node at {peer} is not of the cluster this token was made in"),
        ),
        JoinError::Unreachable(_) | JoinError::Unexpected { .. } | JoinError::Version { .. } => {
            SetupError::field("peer", msg)
        }
        JoinError::AlreadyInitialised(_) => {
            SetupError::general(StatusCode::CONFLICT, "already_set_up", msg)
        }
        JoinError::Tls(_) | JoinError::Setup(_) => {
            SetupError::general(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
        }
    }
}
