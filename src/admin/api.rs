//! Layer: admin (imports every layer below: core, store, net, node, cluster).
//!
//! The admin HTTP API (JSON). Served on the node's API address, loopback by default.
//!
//! Every request passes the `authorize` layer, which attaches the [`Principal`] making it. Until
//! admin authentication lands every caller of the (loopback) listener is the local operator; the
//! accounts will come from this very store (`admin` kind), and handlers already receive the
//! principal, so authentication slots in at that one layer.

use crate::cluster::ClusterState;
use crate::core::entity::WriteError;
use crate::node::{Error, Node};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use crdt_schema::{Kind, SchemaError};
use serde_json::{json, Value};
use std::sync::Arc;

/// Largest request body: a script of 1 MiB as JSON, escaped, with room to spare.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A request (its body read, its answer made) that takes longer is answered 408: a client that
/// announces a body and sends a few bytes of it does not hold its request for good. Writes wait
/// for a commit (milliseconds); listing 100,000 entities takes a fraction of a second.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A caller of the node's own API listener, trusted as the operator of this node, and the
    /// address it called from (none for an in-process call).
    LocalOperator { from: Option<std::net::SocketAddr> },
}

impl Principal {
    /// How the principal is recorded in the changes it makes (`by`, `from` in history).
    pub fn recorded(&self) -> crate::core::entity::Principal {
        match self {
            Principal::LocalOperator { from } => crate::core::entity::Principal {
                name: "operator".into(),
                from: from.map(|a| a.ip().to_string()),
            },
        }
    }
}

/// The address a request came from, set by the listener on every request.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

#[derive(Clone)]
pub struct ApiState {
    pub node: Node,
    pub cluster: Arc<ClusterState>,
}

pub fn router(cluster: Arc<ClusterState>) -> Router {
    let node = cluster.node.clone();
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/drain", axum::routing::post(drain))
        .route("/v1/undrain", axum::routing::post(undrain))
        .route("/v1/compact", axum::routing::post(compact))
        .route("/v1/node", get(node_info))
        .route("/v1/schema", get(schema_all))
        .route("/v1/schema/{kind}", get(schema_kind))
        .route("/v1/entities/{kind}", get(list))
        .route(
            "/v1/entities/{kind}/{name}",
            get(get_entity)
                .put(put_entity)
                .patch(patch_entity)
                .delete(delete_entity),
        )
        .route("/v1/entities/{kind}/{name}/history", get(history))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{id}", axum::routing::delete(remove_node))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such API route".into(),
            )
        })
        .layer(middleware::from_fn(authorize))
        .layer(middleware::from_fn_with_state(
            Arc::new(Hosts::of(node.config())),
            hygiene,
        ))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(REQUEST_TIMEOUT, deadline))
        .with_state(ApiState { node, cluster })
}

/// Answers 408 when the request is not done within `limit` (reading its body included).
async fn deadline(State(limit): State<std::time::Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request was not complete within {limit:?}"),
        )
        .into_response(),
    }
}

/// The host names a request may name (`Host`, or the authority of an HTTP/2 request): any IP
/// literal, `localhost`, this machine's host name and the host the node advertises. A page on
/// another origin whose name an attacker re-points at this address (DNS rebinding) names its
/// own host, and is answered 421.
#[derive(Debug, Clone)]
pub struct Hosts {
    names: Vec<String>,
}

/// The names and addresses the node is reached by: loopback, `localhost`, the machine's host
/// name, the listen address (unless unspecified) and the advertised host. The admin API's
/// certificate holds them, and the `Host` check accepts the names.
pub fn node_names(cfg: &crate::node::setup::NodeConfig) -> (Vec<String>, Vec<std::net::IpAddr>) {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut dns = vec!["localhost".to_string()];
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            dns.push(h.to_string());
        }
    }
    let listen = cfg.api_listen.ip();
    if !listen.is_unspecified() {
        ips.push(listen);
    }
    if let Some((host, _)) = cfg.ipc_advertise.rsplit_once(':') {
        let host = host.trim_matches(['[', ']']);
        match host.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ips.push(ip),
            Ok(_) => {}
            Err(_) => dns.push(host.to_string()),
        }
    }
    dns.sort();
    dns.dedup();
    ips.sort();
    ips.dedup();
    (dns, ips)
}

impl Hosts {
    pub fn of(cfg: &crate::node::setup::NodeConfig) -> Hosts {
        let names = node_names(cfg)
            .0
            .into_iter()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        Hosts { names }
    }

    /// Whether `authority` (`host[:port]`) names this node.
    fn allows(&self, authority: &str) -> bool {
        let host = match authority.rsplit_once(':') {
            // `[v6]:port`, `[v6]`, `name:port`, `v4:port`; a bare v6 literal has several colons.
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
            _ => authority,
        };
        let host = host.trim_matches(['[', ']']).trim_end_matches('.');
        if host.parse::<std::net::IpAddr>().is_ok() {
            return true;
        }
        let host = host.to_ascii_lowercase();
        self.names.contains(&host)
    }
}

/// Request hygiene, before anything else runs: the host named must be this node's (421), a
/// request from a browser page of another origin is refused (403), and a body must be JSON (415),
/// so that neither a DNS-rebinding page nor a cross-site form can read or change anything.
async fn hygiene(State(hosts): State<Arc<Hosts>>, req: Request, next: Next) -> Response {
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(a) = &authority {
        if !hosts.allows(a) {
            let shown: String = a.chars().take(100).filter(|c| !c.is_control()).collect();
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected",
                format!(
                    "this node does not answer for host {shown:?}: use its address, localhost or its host name"
                ),
            )
            .into_response();
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        // A browser names the page's origin; only a page served by this very API may call it.
        let same = origin.to_str().ok().is_some_and(|o| {
            let rest = o
                .strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"));
            rest.zip(authority.as_deref())
                .is_some_and(|(r, a)| r.eq_ignore_ascii_case(a))
        });
        if !same {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                "requests from pages of another origin are refused".into(),
            )
            .into_response();
        }
    }
    let has_body = {
        use axum::body::HttpBody;
        let b = req.body();
        !b.is_end_stream() && b.size_hint().exact() != Some(0)
    };
    let content_type = req.headers().get(header::CONTENT_TYPE);
    let json = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if (content_type.is_some() || has_body) && !json {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be JSON (Content-Type: application/json)".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// The API before and after the node is ready: until [`Gate::open`], `/livez` answers 200 and
/// every other route 503 (`recovering`), so supervisors see the process alive while its store
/// recovers and load balancers keep traffic away.
#[derive(Clone, Default)]
pub struct Gate {
    ready: Arc<std::sync::OnceLock<Router>>,
}

impl Gate {
    pub fn open(&self, router: Router) {
        let _ = self.ready.set(router);
    }

    pub fn router(&self) -> Router {
        let ready = self.ready.clone();
        Router::new().fallback(move |req: Request| {
            let ready = ready.clone();
            async move {
                match ready.get() {
                    Some(r) => {
                        use tower::ServiceExt;
                        match r.clone().oneshot(req).await {
                            Ok(resp) => resp,
                            Err(never) => match never {},
                        }
                    }
                    None if req.uri().path() == "/livez" => "ok (recovering)\n".into_response(),
                    None => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "recovering",
                        "the node is recovering its store after an unclean stop; try again shortly"
                            .into(),
                    )
                    .into_response(),
                }
            }
        })
    }
}

async fn authorize(mut req: Request, next: Next) -> Response {
    let from = req.extensions().get::<ClientAddr>().map(|a| a.0);
    req.extensions_mut()
        .insert(Principal::LocalOperator { from });
    next.run(req).await
}

/// An error answer: `{"error": {"code", "message", "kind"?, "field"?}}`.
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: String) -> ApiError {
        ApiError {
            status,
            body: json!({"error": {"code": code, "message": message}}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<SchemaError> for ApiError {
    fn from(e: SchemaError) -> Self {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
        if let Some(f) = e.field() {
            err.body["error"]["field"] = json!(f);
        }
        if let SchemaError::UnknownKind { .. } = e {
            err.body["error"]["code"] = json!("unknown_kind");
        }
        err
    }
}

/// Each node error maps to one status and one code.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let internal = |e: &Error| {
            tracing::error!(error = %e, "request failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        };
        match e {
            Error::Write(WriteError::Schema(s)) => s.into(),
            Error::Write(WriteError::NotFound { kind, name }) => {
                let mut err = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("{kind} {name:?} not found"),
                );
                err.body["error"]["kind"] = json!(kind.as_str());
                err
            }
            Error::Write(WriteError::MissingReference {
                kind,
                field,
                target_kind,
                target,
            }) => {
                let e = WriteError::MissingReference {
                    kind,
                    field: field.clone(),
                    target_kind,
                    target,
                };
                let mut err =
                    ApiError::new(StatusCode::BAD_REQUEST, "missing_reference", e.to_string());
                err.body["error"]["field"] = json!(field);
                err
            }
            Error::Write(WriteError::LastSuperAdmin { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "last_superadmin", e.to_string())
            }
            Error::NotMember(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            Error::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            Error::Store(crate::store::StoreError::BadRow(_)) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "row_damaged",
                format!("{e}: it is being rebuilt from its document; retry"),
            ),
            Error::DiskFull { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "disk_full", e.to_string())
            }
            // Not refused: the write reached peers before its commit failed here. The client
            // retries (writes are idempotent) or reads to learn the outcome.
            Error::Unknown(_) => {
                tracing::error!(error = %e, "a write's outcome is unknown");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    e.to_string(),
                )
            }
            Error::Write(WriteError::Internal(_))
            | Error::Store(_)
            | Error::Row(_)
            | Error::Typed { .. }
            | Error::Io { .. }
            | Error::Tls(_)
            | Error::NotInitialised(_)
            | Error::Damaged { .. }
            | Error::BadName(_)
            | Error::AlreadyInitialised { .. } => internal(&e),
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn json_body(bytes: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("request body is not valid JSON: {e}"),
        )
    })
}

/// A duration field of an optional JSON body (`{"ttl": "2h"}`): None when the body or the field
/// is absent or null.
fn optional_duration(
    body: &Bytes,
    field: &str,
    example: &str,
) -> Result<Option<std::time::Duration>, ApiError> {
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid", m);
    if body.is_empty() {
        return Ok(None);
    }
    match json_body(body)?.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => humantime::parse_duration(s)
            .map(Some)
            .map_err(|e| invalid(format!("{field} {s:?}: {e} (use e.g. {example})"))),
        Some(other) => Err(invalid(format!(
            "{field}: expected a duration like \"{example}\", got {other}"
        ))),
    }
}

fn kind(s: &str) -> Result<Kind, ApiError> {
    Ok(Kind::parse(s)?)
}

async fn node_info(State(st): State<ApiState>) -> ApiResult {
    let c = st.node.config();
    Ok(Json(json!({
        "id": c.node_id,
        "name": c.name,
        "version": env!("CARGO_PKG_VERSION"),
        "schema_version": crdt_schema::SCHEMA_VERSION,
        "api_listen": c.api_listen.to_string(),
        "ipc_listen": c.ipc_listen.to_string(),
    }))
    .into_response())
}

async fn schema_all() -> ApiResult {
    Ok(Json(crdt_schema::schema_json(None)).into_response())
}

async fn schema_kind(Path(k): Path<String>) -> ApiResult {
    Ok(Json(crdt_schema::schema_json(Some(kind(&k)?))).into_response())
}

async fn list(State(st): State<ApiState>, Path(k): Path<String>) -> ApiResult {
    let k = kind(&k)?;
    let node = st.node.clone();
    let body = tokio::task::spawn_blocking(move || node.list_json(k))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn get_entity(
    State(st): State<ApiState>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult {
    let k = kind(&k)?;
    match st.node.get(k, &name)? {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(Error::not_found(k, &name).into()),
    }
}

async fn put_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path((k, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let k = kind(&k)?;
    let v = json_body(&body)?;
    Ok(Json(st.node.acting_as(who.recorded()).put(k, &name, v).await?).into_response())
}

async fn patch_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path((k, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let k = kind(&k)?;
    let v = json_body(&body)?;
    Ok(Json(st.node.acting_as(who.recorded()).patch(k, &name, v).await?).into_response())
}

async fn delete_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Principal>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult {
    let k = kind(&k)?;
    st.node.acting_as(who.recorded()).delete(k, &name).await?;
    Ok(Json(json!({"deleted": {"kind": k.as_str(), "name": name}})).into_response())
}

async fn history(State(st): State<ApiState>, Path((k, name)): Path<(String, String)>) -> ApiResult {
    let k = kind(&k)?;
    let h = st.node.history(k, &name)?;
    Ok(Json(json!({"kind": k.as_str(), "name": name, "changes": h})).into_response())
}

async fn conflicts(State(st): State<ApiState>) -> ApiResult {
    let node = st.node.clone();
    let c = tokio::task::spawn_blocking(move || node.conflicts())
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    Ok(Json(json!({"conflicts": c})).into_response())
}

async fn create_token(
    State(st): State<ApiState>,
    Extension(_who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let ttl = optional_duration(&body, "ttl", "1h")?.unwrap_or(crate::cluster::TOKEN_TTL_DEFAULT);
    let (token, expires) =
        crate::cluster::create_token(&st.node, ttl)
            .await
            .map_err(|e| match e {
                crate::cluster::join::TokenError::Ttl(_) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string())
                }
                crate::cluster::join::TokenError::Node(n) => n.into(),
                other => ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    other.to_string(),
                ),
            })?;
    Ok(Json(json!({"token": token.encode(), "expires_wall_ms": expires, "ipc": st.node.config().ipc_advertise})).into_response())
}

/// Each token-management error maps to one status and one code; none shows a secret.
impl From<crate::cluster::tokens::TokenAdminError> for ApiError {
    fn from(e: crate::cluster::tokens::TokenAdminError) -> Self {
        use crate::cluster::tokens::TokenAdminError as E;
        match e {
            E::BadId => ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            E::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            E::Ambiguous { .. } => ApiError::new(StatusCode::CONFLICT, "ambiguous", e.to_string()),
            E::Node(n) => n.into(),
        }
    }
}

/// The join tokens this node made: IDs (a prefix of the stored hash), expiry, state. Never a
/// secret: a token is shown once, when it is made.
async fn list_tokens(
    State(st): State<ApiState>,
    Extension(_who): Extension<Principal>,
) -> ApiResult {
    let tokens = crate::cluster::tokens::list_tokens(&st.node).await?;
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

async fn revoke_token(
    State(st): State<ApiState>,
    Extension(_who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    let token = crate::cluster::tokens::revoke_token(&st.node, &id).await?;
    Ok(Json(json!({ "revoked": token })).into_response())
}

async fn nodes(State(st): State<ApiState>) -> ApiResult {
    Ok(Json(json!({"self": st.node.config().node_id, "cluster_id": st.node.config().cluster_id, "members": st.node.members()})).into_response())
}

async fn remove_node(
    State(st): State<ApiState>,
    Extension(_who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult {
    if id == st.node.config().node_id {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "a node cannot remove itself: remove it from another member".into(),
        ));
    }
    st.node.remove_member(&id).await?;
    Ok(Json(json!({"removed": id})).into_response())
}

/// 200 while the node takes clients and writes; 503 while it drains (so load balancers stop
/// sending clients) or its disk is full (writes are refused).
async fn readyz(State(st): State<ApiState>) -> Response {
    if st.node.drain().is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if st.node.published().storage() == crate::node::disk::Storage::Full {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "disk full: writes refused\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn status(State(st): State<ApiState>) -> ApiResult {
    Ok(Json(crate::cluster::monitor::status(&st.cluster)).into_response())
}

async fn drain(
    State(st): State<ApiState>,
    Extension(_who): Extension<Principal>,
    body: Bytes,
) -> ApiResult {
    let deadline = optional_duration(&body, "deadline", "30s")?;
    st.node.drain().try_start(deadline).map_err(|e| {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
        err.body["error"]["field"] = json!("deadline");
        err
    })?;
    tracing::info!(deadline = ?deadline, "draining: new client connections are refused");
    Ok(Json(json!({"draining": true, "deadline_s": deadline.map(|d| d.as_secs_f64()), "active_connections": st.node.drain().active()})).into_response())
}

async fn undrain(State(st): State<ApiState>, Extension(_who): Extension<Principal>) -> ApiResult {
    st.node.drain().stop();
    tracing::info!("undrained: client connections are accepted again");
    Ok(Json(json!({"draining": false})).into_response())
}

/// Rotates the at-rest key now (see [`crate::node::Node::compact`]): answers the new key's ID,
/// the IDs of the keys deleted and how many secret values were sealed again.
async fn compact(State(st): State<ApiState>, Extension(_who): Extension<Principal>) -> ApiResult {
    let rotation = st.node.compact().await?;
    Ok(Json(json!({
        "key": rotation.key,
        "retired": rotation.retired,
        "resealed": rotation.resealed,
    }))
    .into_response())
}

async fn metrics(State(st): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        super::metrics::encode(&st.cluster),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn status_of(app: &Router, path: &str) -> StatusCode {
        let req = axum::http::Request::builder()
            .uri(path)
            .body(axum::body::Body::empty())
            .expect("request");
        app.clone().oneshot(req).await.expect("infallible").status()
    }

    /// While the store recovers the process is alive but not ready; once the gate opens every
    /// route is the node's.
    #[tokio::test]
    async fn the_gate_answers_livez_while_recovering_and_503_otherwise() {
        let gate = Gate::default();
        let app = gate.router();
        assert_eq!(status_of(&app, "/livez").await, StatusCode::OK);
        assert_eq!(
            status_of(&app, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status_of(&app, "/v1/entities/user").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        gate.open(Router::new().route("/readyz", get_route()));
        assert_eq!(status_of(&app, "/readyz").await, StatusCode::IM_A_TEAPOT);
    }

    fn get_route() -> axum::routing::MethodRouter {
        axum::routing::get(|| async { StatusCode::IM_A_TEAPOT })
    }

    /// The API of a fresh node, in-process (no listener), and the directory holding it.
    fn app() -> (Router, crate::node::Node, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = crate::node::NodeOptions {
            seed: Some(1),
            ..Default::default()
        };
        Node::init(dir.path(), &Default::default(), &opts).expect("init");
        let node = Node::open(dir.path(), opts).expect("open");
        let material = crate::net::tls::TlsFiles::new(dir.path())
            .read()
            .expect("tls");
        let state = Arc::new(ClusterState::new(node.clone(), material));
        (router(state), node, dir)
    }

    async fn call(app: &Router, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn raw(
        app: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> StatusCode {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        app.clone().oneshot(req).await.expect("infallible").status()
    }

    /// A DNS-rebinding page (a host name that is not this node's), a cross-site page (another
    /// Origin) and a form post (not JSON) are refused before anything runs; the node's own
    /// names and addresses, same-origin pages and JSON are served.
    #[tokio::test]
    async fn requests_for_other_hosts_origins_or_media_types_are_refused() {
        let (app, node, _dir) = app();
        let ok = StatusCode::OK;
        for (host, want) in [
            ("evil.example", StatusCode::MISDIRECTED_REQUEST),
            ("evil.example:7700", StatusCode::MISDIRECTED_REQUEST),
            (
                "localhost.evil.example:7700",
                StatusCode::MISDIRECTED_REQUEST,
            ),
            ("127.0.0.1:7700", ok),
            ("[::1]:7700", ok),
            ("localhost:7700", ok),
            ("LOCALHOST", ok),
        ] {
            let got = raw(&app, "GET", "/v1/entities/user", &[("host", host)], "").await;
            assert_eq!(got, want, "Host: {host}");
        }
        let host = ("host", "127.0.0.1:7700");
        for (origin, want) in [
            ("http://evil.example", StatusCode::FORBIDDEN),
            ("null", StatusCode::FORBIDDEN),
            ("http://127.0.0.1:7701", StatusCode::FORBIDDEN),
            ("http://127.0.0.1:7700", ok),
        ] {
            let got = raw(&app, "GET", "/v1/node", &[host, ("origin", origin)], "").await;
            assert_eq!(got, want, "Origin: {origin}");
        }
        // A cross-site form can post only these media types: refused, and nothing happens.
        for ct in [
            "application/x-www-form-urlencoded",
            "text/plain",
            "multipart/form-data; boundary=x",
        ] {
            let got = raw(
                &app,
                "POST",
                "/v1/drain",
                &[host, ("content-type", ct)],
                "a=b",
            )
            .await;
            assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
            let got = raw(
                &app,
                "POST",
                "/v1/tokens",
                &[host, ("content-type", ct)],
                "",
            )
            .await;
            assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}, empty body");
        }
        let got = raw(&app, "POST", "/v1/drain", &[host], "{}").await;
        assert_eq!(
            got,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a body without a type"
        );
        assert!(
            !node.drain().is_draining(),
            "a refused request drained the node"
        );
        assert!(
            node.tokens().await.expect("tokens").is_empty(),
            "a refused request made a token"
        );
        let json = ("content-type", "application/json; charset=utf-8");
        let got = raw(&app, "PUT", "/v1/entities/group/g1", &[host, json], "{}").await;
        assert_eq!(got, ok);
        // No body, no type (what `peerconf undrain` sends): served.
        assert_eq!(raw(&app, "POST", "/v1/undrain", &[host], "").await, ok);
    }

    /// A client that announces a body and sends a few bytes of it is answered 408 at the
    /// deadline, not held for good.
    #[tokio::test]
    async fn a_stalled_body_is_answered_408() {
        let app: Router = Router::new()
            .route(
                "/echo",
                axum::routing::put(|b: Bytes| async move { b.len().to_string() }),
            )
            .layer(middleware::from_fn_with_state(
                std::time::Duration::from_millis(200),
                deadline,
            ));
        let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"{\"a\": "));
        let stalled = futures_util::StreamExt::chain(
            futures_util::stream::iter([first]),
            futures_util::stream::pending(),
        );
        let req = axum::http::Request::builder()
            .method("PUT")
            .uri("/echo")
            .header("content-length", "1000000")
            .body(axum::body::Body::from_stream(stalled))
            .expect("request");
        let started = std::time::Instant::now();
        let resp = app.oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// The last enabled SuperAdmin cannot be deleted, disabled or demoted (409 naming why);
    /// with a second one, it can; ordinary admins come and go.
    #[tokio::test]
    async fn the_last_superadmin_stays() {
        let (app, _node, _dir) = app();
        let put = |name: &str, body: Value| {
            let app = app.clone();
            let path = format!("/v1/entities/admin/{name}");
            async move { call(&app, "PUT", &path, &body.to_string()).await }
        };
        let su = json!({"role": "superadmin", "password": "Root-password-1"});
        assert_eq!(put("root", su.clone()).await.0, StatusCode::OK);
        assert_eq!(
            put(
                "ops",
                json!({"role": "admin", "password": "Ops-password-1"})
            )
            .await
            .0,
            StatusCode::OK
        );
        for (method, body) in [
            ("DELETE", "".to_string()),
            ("PATCH", json!({"enabled": false}).to_string()),
            ("PATCH", json!({"role": "admin"}).to_string()),
            ("PUT", json!({"role": "admin"}).to_string()),
        ] {
            let (status, err) = call(&app, method, "/v1/entities/admin/root", &body).await;
            assert_eq!(status, StatusCode::CONFLICT, "{method} {body}: {err}");
            assert_eq!(err["error"]["code"], "last_superadmin", "{err}");
        }
        let (status, root) = call(&app, "GET", "/v1/entities/admin/root", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(root["fields"]["role"], "superadmin", "{root}");
        assert_eq!(
            call(&app, "DELETE", "/v1/entities/admin/ops", "").await.0,
            StatusCode::OK
        );
        assert_eq!(put("second", su).await.0, StatusCode::OK);
        let demote = json!({"role": "admin"}).to_string();
        assert_eq!(
            call(&app, "PATCH", "/v1/entities/admin/root", &demote)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, "DELETE", "/v1/entities/admin/second", "")
                .await
                .0,
            StatusCode::CONFLICT
        );
    }

    /// A drain deadline past 24 h is refused with a 400 naming the bound (it used to panic the
    /// worker on an overflowing instant), changes nothing, and the node still answers.
    #[tokio::test]
    async fn a_huge_drain_deadline_is_refused_not_a_panic() {
        let (app, node, _dir) = app();
        for deadline in ["18446744073709551615s", "25h", "1000years"] {
            let (status, body) = call(
                &app,
                "POST",
                "/v1/drain",
                &json!({ "deadline": deadline }).to_string(),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{deadline}: {body}");
            let msg = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                msg.contains("24h") || msg.contains("deadline"),
                "{deadline}: {msg}"
            );
            assert!(!node.drain().is_draining(), "{deadline} started a drain");
        }
        let (status, body) = call(&app, "POST", "/v1/drain", r#"{"deadline":"24h"}"#).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["deadline_s"], json!(86400.0));
        assert!(node.drain().is_draining());
        let (status, _) = call(&app, "POST", "/v1/undrain", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(!node.drain().is_draining());
    }

    /// Tokens through the API: listed without their secrets, revoked by ID; an unknown ID is a
    /// 404, a malformed one a 400 that does not echo it.
    #[tokio::test]
    async fn tokens_are_listed_and_revoked_through_the_api() {
        let (app, _node, _dir) = app();
        let (status, made) = call(&app, "POST", "/v1/tokens", r#"{"ttl":"1h"}"#).await;
        assert_eq!(status, StatusCode::OK, "{made}");
        let token = made["token"].as_str().expect("token").to_string();
        let secret = crate::cluster::Token::parse(&token).expect("parses").secret;
        let hash = crate::cluster::join::secret_hash(&secret);
        let (status, listed) = call(&app, "GET", "/v1/tokens", "").await;
        assert_eq!(status, StatusCode::OK);
        let text = listed.to_string();
        assert!(!text.contains(&secret) && !text.contains(&hash), "{text}");
        let id = listed["tokens"][0]["id"].as_str().expect("id").to_string();
        assert!(
            hash.starts_with(&id),
            "the ID is a prefix of the stored hash"
        );
        assert_eq!(listed["tokens"][0]["state"], json!("valid"));
        let (status, body) = call(&app, "DELETE", "/v1/tokens/0123456789ab", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], json!("not_found"));
        let (status, body) = call(&app, "DELETE", &format!("/v1/tokens/{secret}"), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(!body.to_string().contains(&secret), "{body}");
        let (status, body) = call(&app, "DELETE", &format!("/v1/tokens/{id}"), "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["revoked"]["state"], json!("revoked"));
        let (_, listed) = call(&app, "GET", "/v1/tokens", "").await;
        assert_eq!(listed["tokens"][0]["revoked"], json!(true));
    }
}
