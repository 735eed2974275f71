//! Layer: admin (imports every layer below: core, store, net, node, cluster).
//!
//! The admin HTTP API (JSON). Served on the node's API address, loopback by default.
//!
//! Every request passes the `authorize` layer: it names the [`Action`] the request asks for,
//! authenticates its bearer token ([`Auth::authenticate`]) unless the action is public, and
//! applies the roles table ([`auth::decide`]). Handlers receive the [`Caller`] and record it in
//! the changes they make.

use super::auth::{self, Action, Auth, Caller, Role};
use crate::cluster::ClusterState;
use crate::core::entity::WriteError;
use crate::node::{Error, Node};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use crdt_schema::{Kind, SchemaError};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::openapi::{
    Entity, EntityList, EntityName, EntityPatch, EntityPut, ErrorBody, ErrorDetail, KindName,
};

/// Largest request body: a script of 1 MiB as JSON, escaped, with room to spare.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A request (its body read, its answer made) that takes longer is answered 408: a client that
/// announces a body and sends a few bytes of it does not hold its request for good. Writes wait
/// for a commit (milliseconds); listing 100,000 entities takes a fraction of a second.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The address a request came from, set by the listener on every request.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

#[derive(Clone)]
pub struct ApiState {
    pub node: Node,
    pub cluster: Arc<ClusterState>,
    pub auth: Arc<Auth>,
}

/// Every route of the API, each with its description: the one place routes are registered.
///
/// `routes!` takes each handler's method and path from its `#[utoipa::path]` attribute, so a
/// route cannot be served without being described (the OpenAPI document at
/// `GET /v1/openapi.json` is made from this table, see [`super::openapi`]). One `routes!` per
/// path; handlers of one path go in the same call. To add a route, write the handler with its
/// `#[utoipa::path(...)]` and add one line here.
pub(super) fn api_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(ui_root))
        .routes(routes!(ui_index))
        .routes(routes!(ui_asset))
        .routes(routes!(ui_login))
        .routes(routes!(status_stream))
        .routes(routes!(livez))
        .routes(routes!(readyz))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(whoami))
        .routes(routes!(list_api_tokens, create_api_token))
        .routes(routes!(revoke_api_token))
        .routes(routes!(status))
        .routes(routes!(metrics))
        .routes(routes!(drain))
        .routes(routes!(undrain))
        .routes(routes!(compact))
        .routes(routes!(node_info))
        .routes(routes!(openapi_doc))
        .routes(routes!(schema_all))
        .routes(routes!(schema_kind))
        .routes(routes!(list))
        .routes(routes!(get_entity, put_entity, patch_entity, delete_entity))
        .routes(routes!(history))
        .routes(routes!(conflicts))
        .routes(routes!(watch))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(nodes))
        .routes(routes!(remove_node))
}

/// The OpenAPI document of the route table, as served at `GET /v1/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    super::openapi::finish(api_routes().into_openapi(), is_public)
}

/// [`openapi_document`] as JSON, made once.
pub fn openapi_json() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        openapi_document()
            .to_json()
            .expect("the OpenAPI document serializes")
    })
}

pub fn router(cluster: Arc<ClusterState>) -> Router {
    let node = cluster.node.clone();
    let auth = Arc::new(Auth::new(node.clone()));
    let state = ApiState {
        node: node.clone(),
        cluster,
        auth,
    };
    let (routes, _) = api_routes().split_for_parts();
    routes
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such API route".into(),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(
            Arc::new(Hosts::of(node.config())),
            hygiene,
        ))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(middleware::from_fn_with_state(REQUEST_TIMEOUT, deadline))
        .layer(middleware::map_response(|mut r: Response| async move {
            super::console::secure_headers(r.headers_mut());
            r
        }))
        .with_state(state)
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

/// How long a watch stream asked for while the node starts waits for it to serve.
pub const WATCH_START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The API before and after the node is ready: until [`Gate::open`], `/livez` answers 200 and
/// every other route 503 (`recovering`), so supervisors see the process alive while its store
/// recovers and load balancers keep traffic away. `GET /v1/watch` waits for the node first, up to
/// [`WATCH_START_WAIT`].
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
                // A watcher that connects while the node starts (an EventSource reconnecting to
                // a restarted node, a tool started with the node) gets its stream once the node
                // serves, rather than a 503 it must retry: it waits up to WATCH_START_WAIT.
                if ready.get().is_none() && req.uri().path() == "/v1/watch" {
                    let deadline = tokio::time::Instant::now() + WATCH_START_WAIT;
                    while ready.get().is_none() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
                match ready.get() {
                    Some(r) => {
                        use tower::ServiceExt;
                        match r.clone().oneshot(req).await {
                            Ok(resp) => resp,
                            Err(never) => match never {},
                        }
                    }
                    None if req.uri().path() == "/livez" => "ok (recovering)\n".into_response(),
                    None => {
                        let mut err = ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "recovering",
                            "the node is starting (opening or recovering its store, then starting replication); try again shortly"
                                .into(),
                        );
                        err.retry_after = Some(1);
                        err.into_response()
                    }
                }
            }
        })
    }
}

/// One path segment, percent-decoded as the router decodes it (so that `admi%6E` is `admin`
/// here too); None when it does not decode to UTF-8.
fn segment(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The action a request asks for (see [`auth::decide`]). Anything that is not known to be
/// harmless needs credentials; an entity route whose kind does not parse counts as cluster
/// administration, so a spelling the handler might read differently cannot slip through.
fn action_of(method: &Method, path: &str) -> Action {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        (&Method::GET | &Method::HEAD, ["livez"] | ["readyz"]) => Action::Public,
        (&Method::POST, ["v1", "login"]) => Action::Public,
        // The console's page and files, and its login: what a browser loads before signing in.
        (&Method::GET | &Method::HEAD, [""] | ["ui", ..]) => Action::Public,
        (&Method::POST, ["ui", "login"]) => Action::Public,
        (_, ["v1", "tokens", ..]) => Action::Cluster("managing join tokens"),
        (&Method::DELETE, ["v1", "nodes", _]) => Action::Cluster("removing a node"),
        (_, ["v1", "drain"]) => Action::Cluster("draining the node"),
        (_, ["v1", "undrain"]) => Action::Cluster("undraining the node"),
        (_, ["v1", "compact"]) => Action::Cluster("rotating the at-rest key"),
        (m, ["v1", "entities", k, rest @ ..]) if !rest.is_empty() => {
            let kind = segment(k).and_then(|k| Kind::parse(&k).ok());
            let name = segment(rest[0]);
            let (Some(kind), Some(name)) = (kind, name) else {
                return Action::Cluster("using an entity route of an unknown kind");
            };
            let read = matches!(*m, Method::GET | Method::HEAD);
            if read || rest.len() > 1 {
                Action::Read { kind, name }
            } else {
                Action::Write {
                    kind,
                    name,
                    patch_fields: None,
                }
            }
        }
        _ => Action::Any,
    }
}

/// Whether a route needs no credentials (asked by the OpenAPI document, of the same table the
/// `authorize` layer uses). `path` may be a template (`/v1/entities/{kind}`).
pub(super) fn is_public(method: &str, path: &str) -> bool {
    Method::from_bytes(method.as_bytes()).is_ok_and(|m| action_of(&m, path) == Action::Public)
}

/// The fields a patch body sets (its top-level keys, or those of its `fields` object when the
/// wrapped form is sent); None when it is not a JSON object.
fn patch_fields(body: &[u8]) -> Option<Vec<String>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let o = v.as_object()?;
    let o = match o.get("fields") {
        Some(Value::Object(f)) => f,
        _ => o,
    };
    Some(o.keys().cloned().collect())
}

fn unauthorized(e: &auth::AuthError) -> Response {
    let mut r =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"peerconf\""),
    );
    r
}

/// Authentication and the roles table, for every request (see the module doc).
async fn authorize(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let mut action = action_of(req.method(), req.uri().path());
    if action == Action::Public {
        return next.run(req).await;
    }
    let from = req.extensions().get::<ClientAddr>().map(|a| a.0.ip());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(auth::bearer)
        .map(str::to_string);
    // The console's session cookie counts when no Authorization header is sent.
    let cookie = match bearer {
        Some(_) => None,
        None => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .find_map(auth::cookie_token)
            .map(str::to_string),
    };
    let token = bearer.as_deref().or(cookie.as_deref());
    let caller = match token.map(|t| st.auth.authenticate(t, from)) {
        Some(Ok(c)) => c,
        Some(Err(auth::AuthError::Node(e))) => return ApiError::from(e).into_response(),
        Some(Err(e)) => {
            st.auth.counters.refused_401.fetch_add(1, Relaxed);
            return unauthorized(&e);
        }
        None => {
            st.auth.counters.refused_401.fetch_add(1, Relaxed);
            return unauthorized(&auth::AuthError::Unauthenticated);
        }
    };
    let mut req = req;
    if let Some(t) = &cookie {
        // A cookie is sent by the browser whatever page asks; a write must also prove that the
        // page read the session's anti-CSRF value, which only a page of this node can.
        let sent = req
            .headers()
            .get(auth::CSRF_HEADER)
            .and_then(|h| h.to_str().ok());
        if !matches!(*req.method(), Method::GET | Method::HEAD) && !auth::csrf_matches(t, sent) {
            st.auth.counters.refused_403.fetch_add(1, Relaxed);
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                format!("a request authenticated by the console's cookie must carry the session's {} header (from GET /v1/whoami)", auth::CSRF_HEADER),
            )
            .into_response();
        }
        req.extensions_mut().insert(CookieSession(auth::csrf_of(t)));
    }
    // An Admin may patch its own password: what the patch sets decides.
    if let Action::Write {
        kind: Kind::Admin,
        name,
        patch_fields: pf,
    } = &mut action
    {
        if *req.method() == Method::PATCH && *name == caller.name && caller.role == Role::Admin {
            let (parts, body) = req.into_parts();
            let bytes = match axum::body::to_bytes(body, BODY_BYTES_MAX).await {
                Ok(b) => b,
                Err(e) => {
                    return ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "bad_body",
                        format!("request body could not be read: {e}"),
                    )
                    .into_response()
                }
            };
            *pf = patch_fields(&bytes);
            req = Request::from_parts(parts, axum::body::Body::from(bytes));
        }
    }
    if let Err(denied) = auth::decide(&caller, &action) {
        st.auth.counters.refused_403.fetch_add(1, Relaxed);
        tracing::info!(admin = %caller.name, addr = ?from, refused = %denied, "admin request refused");
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", denied.to_string())
            .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// An error answer: `{"error": {"code", "message", "field"?, "kind"?}}` ([`ErrorBody`], the
/// type the OpenAPI document describes).
pub struct ApiError {
    status: StatusCode,
    error: ErrorDetail,
    /// Seconds for a `Retry-After` header (429, 503).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: String) -> ApiError {
        ApiError {
            status,
            error: ErrorDetail {
                code: code.to_string(),
                message,
                field: None,
                kind: None,
            },
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.error };
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        r
    }
}

impl From<SchemaError> for ApiError {
    fn from(e: SchemaError) -> Self {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
        if let Some(f) = e.field() {
            err.error.field = Some(f.to_string());
        }
        if let SchemaError::UnknownKind { .. } = e {
            err.error.code = "unknown_kind".into();
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
                err.error.kind = Some(kind.as_str().to_string());
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
                err.error.field = Some(field.to_string());
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
            | Error::BadApiCertificate { .. }
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

/// This node's ID, name, version, schema version and addresses.
#[utoipa::path(
    get, path = "/v1/node", tag = "node",
    responses((status = 200, description = "this node", body = NodeInfo))
)]
async fn node_info(State(st): State<ApiState>) -> ApiResult {
    let c = st.node.config();
    Ok(Json(NodeInfo {
        id: c.node_id.clone(),
        name: c.name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        schema_version: crdt_schema::SCHEMA_VERSION,
        api_listen: c.api_listen.to_string(),
        ipc_listen: c.ipc_listen.to_string(),
    })
    .into_response())
}

/// The schema of every kind: fields, types, defaults, merge semantics.
#[utoipa::path(
    get, path = "/v1/schema", tag = "schema",
    responses((status = 200, description = "`{version, kinds: [{kind, description, singleton, fields: [...]}]}`", body = Object))
)]
async fn schema_all() -> ApiResult {
    Ok(Json(crdt_schema::schema_json(None)).into_response())
}

/// The schema of one kind.
#[utoipa::path(
    get, path = "/v1/schema/{kind}", tag = "schema",
    params(("kind" = KindName, Path, description = "the entity kind")),
    responses((status = 200, description = "`{version, kinds: [...]}` with the one kind", body = Object), (status = 400, description = "unknown kind (`unknown_kind`)", body = ErrorBody))
)]
async fn schema_kind(Path(k): Path<String>) -> ApiResult {
    Ok(Json(crdt_schema::schema_json(Some(kind(&k)?))).into_response())
}

/// Every entity of a kind.
#[utoipa::path(
    get, path = "/v1/entities/{kind}", tag = "entities",
    params(("kind" = KindName, Path, description = "the entity kind")),
    responses((status = 200, description = "the entities of the kind (an admin sees only its own account and API tokens)", body = EntityList), (status = 400, description = "unknown kind (`unknown_kind`)", body = ErrorBody))
)]
async fn list(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path(k): Path<String>,
) -> ApiResult {
    let k = kind(&k)?;
    let node = st.node.clone();
    if who.role != Role::SuperAdmin && matches!(k, Kind::Admin | Kind::ApiToken) {
        // Filtered: an Admin sees its own account and tokens only.
        let all = tokio::task::spawn_blocking(move || node.list(k))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??;
        let seen: Vec<Value> = all
            .into_iter()
            .filter(|v| who.may_see(k, v["name"].as_str().unwrap_or_default(), &v["fields"]))
            .collect();
        return Ok(Json(seen).into_response());
    }
    let body = tokio::task::spawn_blocking(move || node.list_json(k))
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// One entity.
///
/// Singletons (`settings/global`, `security/global`) always exist and read as their defaults until written.
#[utoipa::path(
    get, path = "/v1/entities/{kind}/{name}", tag = "entities",
    params(("kind" = KindName, Path, description = "the entity kind"), ("name" = EntityName, Path, description = "the entity's name")),
    responses((status = 200, description = "the entity as read: secrets never, only whether they are set", body = Entity), (status = 400, description = "unknown kind or invalid name (`unknown_kind`, `invalid`)", body = ErrorBody), (status = 404, description = "no such entity (`not_found`)", body = ErrorBody))
)]
async fn get_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult {
    let k = kind(&k)?;
    match st.node.get(k, &name)? {
        Some(v) if who.may_see(k, &name, &v["fields"]) => Ok(Json(v).into_response()),
        Some(_) => Err(not_yours(&who, k, &name)),
        None => Err(Error::not_found(k, &name).into()),
    }
}

/// 403 for an entity the caller may not see (another admin's account or token).
fn not_yours(who: &Caller, k: Kind, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "forbidden: reading {}/{name} needs the superadmin role; {} is an admin",
            k.as_str(),
            who.name
        ),
    )
}

/// Creates or replaces an entity.
///
/// The body is the fields of the kind named in the path (`{kind}_fields`).
#[utoipa::path(
    put, path = "/v1/entities/{kind}/{name}", tag = "entities",
    params(("kind" = KindName, Path, description = "the entity kind"), ("name" = EntityName, Path, description = "the entity's name")),
    request_body(content = EntityPut, content_type = "application/json"),
    responses((status = 200, description = "the entity as it now reads, once durable", body = Entity), (status = 400, description = "invalid body or field (`bad_json`, `invalid`, `unknown_kind`, `missing_reference`; `field` names it)", body = ErrorBody), (status = 409, description = "the last enabled superadmin would be lost (`last_superadmin`)", body = ErrorBody), (status = 507, description = "the disk is full: writes are refused (`disk_full`)", body = ErrorBody))
)]
async fn put_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let k = kind(&k)?;
    let v = json_body(&body)?;
    Ok(Json(st.node.acting_as(who.recorded()).put(k, &name, v).await?).into_response())
}

/// Changes some fields of an entity (a JSON merge patch).
///
/// An admin may patch its own account's `password` only. A patch of a singleton never written creates it.
#[utoipa::path(
    patch, path = "/v1/entities/{kind}/{name}", tag = "entities",
    params(("kind" = KindName, Path, description = "the entity kind"), ("name" = EntityName, Path, description = "the entity's name")),
    request_body(content = EntityPatch, content_type = "application/json"),
    responses((status = 200, description = "the entity as it now reads, once durable", body = Entity), (status = 400, description = "invalid body or field (`bad_json`, `invalid`, `unknown_kind`, `missing_reference`; `field` names it)", body = ErrorBody), (status = 404, description = "no such entity (`not_found`)", body = ErrorBody), (status = 409, description = "the last enabled superadmin would be lost (`last_superadmin`)", body = ErrorBody), (status = 507, description = "the disk is full: writes are refused (`disk_full`)", body = ErrorBody))
)]
async fn patch_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let k = kind(&k)?;
    let v = json_body(&body)?;
    Ok(Json(st.node.acting_as(who.recorded()).patch(k, &name, v).await?).into_response())
}

/// Deletes an entity.
///
/// Deleting an admin account revokes its API tokens.
#[utoipa::path(
    delete, path = "/v1/entities/{kind}/{name}", tag = "entities",
    params(("kind" = KindName, Path, description = "the entity kind"), ("name" = EntityName, Path, description = "the entity's name")),
    responses((status = 200, description = "deleted (a tombstone that replicates; the name can be used again)", body = Deleted), (status = 400, description = "unknown kind or invalid name", body = ErrorBody), (status = 404, description = "no such entity (`not_found`)", body = ErrorBody), (status = 409, description = "the last enabled superadmin would be lost (`last_superadmin`)", body = ErrorBody), (status = 507, description = "the disk is full (`disk_full`)", body = ErrorBody))
)]
async fn delete_entity(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult {
    let k = kind(&k)?;
    st.node.acting_as(who.recorded()).delete(k, &name).await?;
    if k == Kind::Admin {
        // A new account made under this name must not inherit the old one's tokens.
        st.auth.drop_tokens_of(&who, &name).await?;
    }
    Ok(Json(Deleted {
        deleted: DeletedEntity {
            kind: k.as_str(),
            name,
        },
    })
    .into_response())
}

/// The change history of an entity.
#[utoipa::path(
    get, path = "/v1/entities/{kind}/{name}/history", tag = "entities",
    params(("kind" = KindName, Path, description = "the entity kind"), ("name" = EntityName, Path, description = "the entity's name")),
    responses((status = 200, description = "`{kind, name, changes: [...]}`: who changed what, when, from where", body = Object), (status = 400, description = "unknown kind or invalid name", body = ErrorBody), (status = 404, description = "no such entity (`not_found`)", body = ErrorBody))
)]
async fn history(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path((k, name)): Path<(String, String)>,
) -> ApiResult {
    let k = kind(&k)?;
    if k == Kind::ApiToken && who.role != Role::SuperAdmin {
        let mine = st
            .node
            .get(k, &name)?
            .is_some_and(|v| who.may_see(k, &name, &v["fields"]));
        if !mine {
            return Err(not_yours(&who, k, &name));
        }
    }
    let h = st.node.history(k, &name)?;
    Ok(Json(json!({"kind": k.as_str(), "name": name, "changes": h})).into_response())
}

/// Committed changes as Server-Sent Events (see [`super::watch`]).
#[utoipa::path(
    get, path = "/v1/watch", tag = "entities",
    summary = "Follow committed changes (Server-Sent Events)",
    description = "One event per committed change on this node, local or replicated, in commit order: `id:` the node's change number, `event:` `put` or `delete` (or `reset`: re-list), `data:` one JSON line with `seq`, `kind`, `name`, `origin`, `by` and `entity`. Resume with `Last-Event-ID` or `since`. Keep-alive comments every 15 s.",
    params(
        ("kind" = Option<Vec<String>>, Query, description = "only these kinds (repeatable)"),
        ("name" = Option<String>, Query, description = "only this entity (with kind)"),
        ("since" = Option<u64>, Query, description = "replay the changes after this number first"),
        ("Last-Event-ID" = Option<u64>, Header, description = "as `since`; wins over it"),
    ),
    responses(
        (status = 200, description = "the event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "an unknown kind, `name` without `kind`, or a position that is not a number", body = ErrorBody),
    )
)]
async fn watch(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> ApiResult {
    let q = super::watch::parse_query(uri.query(), &headers).map_err(|e| {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
        if let super::watch::WatchError::Kind(SchemaError::UnknownKind { .. }) = e {
            err.error.code = "unknown_kind".into();
        }
        err
    })?;
    Ok(super::watch::stream(st.node.clone(), who, q))
}

/// Entities whose concurrent writes are not resolved.
#[utoipa::path(
    get, path = "/v1/conflicts", tag = "entities",
    responses((status = 200, description = "`{conflicts: [entity, ...]}`: the entities with unresolved concurrent writes the caller may see", body = Object))
)]
async fn conflicts(State(st): State<ApiState>, Extension(who): Extension<Caller>) -> ApiResult {
    let node = st.node.clone();
    let mut c = tokio::task::spawn_blocking(move || node.conflicts())
        .await
        .map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })??;
    c.retain(|v| {
        let k = v["kind"].as_str().and_then(|k| Kind::parse(k).ok());
        k.is_none_or(|k| who.may_see(k, v["name"].as_str().unwrap_or_default(), &v["fields"]))
    });
    Ok(Json(json!({"conflicts": c})).into_response())
}

/// Makes a join token for a new node (superadmin).
#[utoipa::path(
    post, path = "/v1/tokens", tag = "cluster",
    request_body(content = Option<JoinTokenRequest>, content_type = "application/json", description = "optional"),
    responses((status = 200, description = "the token, shown once", body = JoinTokenMade), (status = 400, description = "bad JSON or ttl out of range (`bad_json`, `invalid`)", body = ErrorBody), (status = 507, description = "the disk is full (`disk_full`)", body = ErrorBody))
)]
async fn create_token(
    State(st): State<ApiState>,
    Extension(_who): Extension<Caller>,
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
    Ok(Json(JoinTokenMade {
        token: token.encode(),
        expires_wall_ms: expires,
        ipc: st.node.config().ipc_advertise.clone(),
    })
    .into_response())
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

/// The join tokens this node made (superadmin).
#[utoipa::path(
    get, path = "/v1/tokens", tag = "cluster",
    responses((status = 200, description = "`{tokens: [{id, expires_wall_ms, used, revoked, state}]}`: never a secret", body = Object))
)]
async fn list_tokens(State(st): State<ApiState>, Extension(_who): Extension<Caller>) -> ApiResult {
    let tokens = crate::cluster::tokens::list_tokens(&st.node).await?;
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

/// Revokes a join token (superadmin).
#[utoipa::path(
    delete, path = "/v1/tokens/{id}", tag = "cluster",
    params(("id" = String, Path, description = "a join token ID (a prefix of its hash, as listed)")),
    responses((status = 200, description = "`{revoked: {id, expires_wall_ms, used, revoked, state}}`", body = Object), (status = 400, description = "malformed ID (`invalid`)", body = ErrorBody), (status = 404, description = "no such token (`not_found`)", body = ErrorBody), (status = 409, description = "the ID names several tokens (`ambiguous`)", body = ErrorBody))
)]
async fn revoke_token(
    State(st): State<ApiState>,
    Extension(_who): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let token = crate::cluster::tokens::revoke_token(&st.node, &id).await?;
    Ok(Json(json!({ "revoked": token })).into_response())
}

/// A request that came with the console's session cookie: the session's anti-CSRF value.
#[derive(Clone)]
struct CookieSession(String);

fn page(html: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        html,
    )
        .into_response()
}

/// The web console's page, at the root too.
#[utoipa::path(
    get, path = "/", tag = "console",
    responses((status = 200, description = "the console's page (as `/ui/`)", body = String, content_type = "text/html"))
)]
async fn ui_root() -> Response {
    page(super::console::INDEX_HTML)
}

/// The web console's page (it signs in with `POST /ui/login`, then uses this API).
#[utoipa::path(
    get, path = "/ui/", tag = "console",
    responses((status = 200, description = "the console's page", body = String, content_type = "text/html"))
)]
async fn ui_index() -> Response {
    page(super::console::INDEX_HTML)
}

/// A script or style sheet of the web console, embedded in the binary.
#[utoipa::path(
    get, path = "/ui/assets/{file}", tag = "console",
    params(("file" = String, Path, description = "`app.js`, `common.js`, `setup.js` or `style.css`")),
    responses((status = 200, description = "the file", body = String, content_type = "text/javascript"), (status = 404, description = "no such file (`not_found`)", body = ErrorBody))
)]
async fn ui_asset(Path(file): Path<String>) -> Response {
    match super::console::asset(&file) {
        Some((text, ty)) => (
            [
                (header::CONTENT_TYPE, ty),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            text,
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no console file {:?}",
                file.chars().take(100).collect::<String>()
            ),
        )
        .into_response(),
    }
}

/// The console's session.
#[derive(Serialize, ToSchema)]
struct ConsoleSession {
    name: String,
    /// `admin` or `superadmin`.
    role: &'static str,
    /// When the session ends at the latest, milliseconds since the Unix epoch.
    expires_at_ms: i64,
    /// The value every write of the console sends in `X-CSRF-Token`.
    csrf: String,
}

/// Signs the web console in: as `POST /v1/login`, but the session goes into an `HttpOnly`,
/// `SameSite=Strict` cookie (`Secure` over HTTPS) that scripts cannot read, and the answer gives
/// the anti-CSRF value instead of the token.
#[utoipa::path(
    post, path = "/ui/login", tag = "console",
    request_body(content = LoginRequest, content_type = "application/json"),
    responses((status = 200, description = "signed in (`Set-Cookie: pc_session=...`)", body = ConsoleSession), (status = 400, description = "bad JSON, or name or password missing (`bad_json`, `invalid`)", body = ErrorBody), (status = 401, description = "wrong name or password, or a disabled account (`unauthorized`)", body = ErrorBody), (status = 429, description = "too many failed logins (`locked_out`)", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))), (status = 503, description = "too many logins are being checked at once (`busy`)", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))))
)]
async fn ui_login(
    State(st): State<ApiState>,
    addr: Option<Extension<ClientAddr>>,
    body: Bytes,
) -> ApiResult {
    let (name, password) = login_fields(&body)?;
    let from = addr.map(|a| a.0 .0.ip());
    let s = st.auth.login(&name, &password, from).await?;
    let cookie = auth::session_cookie(Some(&s.token), st.node.config().api_https());
    let mut resp = Json(ConsoleSession {
        csrf: auth::csrf_of(&s.token),
        expires_at_ms: s.expires_at_ms,
        name: s.name,
        role: s.role.as_str(),
    })
    .into_response();
    let v = header::HeaderValue::from_str(&cookie).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the session cookie could not be made".into(),
        )
    })?;
    resp.headers_mut().insert(header::SET_COOKIE, v);
    Ok(resp)
}

/// The node's view of the cluster as a stream: `GET /v1/status` as an `event: status` every
/// second (Server-Sent Events), for dashboards that follow it live.
#[utoipa::path(
    get, path = "/v1/status/stream", tag = "node",
    responses((status = 200, description = "`event: status` with `data:` the JSON of `GET /v1/status`, every second", body = String, content_type = "text/event-stream"))
)]
async fn status_stream(State(st): State<ApiState>) -> Response {
    let cluster = st.cluster.clone();
    let ticks = tokio::time::interval(STATUS_STREAM_EVERY);
    let body = futures_util::stream::unfold((cluster, ticks), |(cluster, mut ticks)| async move {
        ticks.tick().await;
        let v = serde_json::to_string(&crate::cluster::monitor::status(&cluster))
            .unwrap_or_else(|_| "{}".into());
        let text = format!("event: status\ndata: {v}\n\n");
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(text)),
            (cluster, ticks),
        ))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// How often `GET /v1/status/stream` sends the status.
const STATUS_STREAM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The name and password of a login body.
fn login_fields(body: &Bytes) -> Result<(String, String), ApiError> {
    let v = json_body(body)?;
    let field = |f: &str| {
        v.get(f).and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("login needs {{\"name\": \"...\", \"password\": \"...\"}}: {f} is missing or not a string"),
            );
            e.error.field = Some(f.to_string());
            e
        })
    };
    Ok((field("name")?, field("password")?))
}

/// Logs in: a session token for a name and password.
///
/// Wrong password, unknown or disabled account: one 401 for all. Failed logins lock out the account and the address (429).
#[utoipa::path(
    post, path = "/v1/login", tag = "auth",
    request_body(content = LoginRequest, content_type = "application/json"),
    responses((status = 200, description = "a session", body = Session), (status = 400, description = "bad JSON, or name or password missing (`bad_json`, `invalid`)", body = ErrorBody), (status = 401, description = "wrong name or password, or a disabled account: one answer for all (`unauthorized`)", body = ErrorBody), (status = 429, description = "too many failed logins for this account or from this address (`locked_out`)", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds until a login may be tried again"))), (status = 503, description = "too many logins are being checked at once (`busy`)", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))))
)]
async fn login(
    State(st): State<ApiState>,
    addr: Option<Extension<ClientAddr>>,
    body: Bytes,
) -> ApiResult {
    let (name, password) = login_fields(&body)?;
    let from = addr.map(|a| a.0 .0.ip());
    match st.auth.login(&name, &password, from).await {
        Ok(s) => Ok(Json(Session {
            token: s.token,
            expires_at_ms: s.expires_at_ms,
            name: s.name,
            role: s.role.as_str(),
        })
        .into_response()),
        Err(e) => Err(e.into()),
    }
}

impl From<auth::LoginError> for ApiError {
    fn from(e: auth::LoginError) -> Self {
        use auth::LoginError as E;
        match e {
            E::Refused => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
            E::LockedOut { retry_after_s } => {
                let mut err =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "locked_out", e.to_string());
                err.retry_after = Some(retry_after_s);
                err
            }
            E::Busy => {
                let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string());
                err.retry_after = Some(1);
                err
            }
            E::Node(n) => n.into(),
        }
    }
}

impl From<auth::ApiTokenError> for ApiError {
    fn from(e: auth::ApiTokenError) -> Self {
        use auth::ApiTokenError as E;
        match e {
            E::Ttl(_) => {
                let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
                err.error.field = Some("ttl".to_string());
                err
            }
            E::NotFound { .. } => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            E::NotYours => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            E::Node(n) => n.into(),
        }
    }
}

/// Ends the session the request came with.
///
/// An API token is revoked with `DELETE /v1/api-tokens/{id}` instead.
#[utoipa::path(
    post, path = "/v1/logout", tag = "auth",
    responses((status = 200, description = "whether a session ended (false for an API token)", body = LoggedOut))
)]
async fn logout(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    cookie: Option<Extension<CookieSession>>,
) -> ApiResult {
    let ended = match &who.via {
        auth::Via::Session(key) => st.auth.end_session(key),
        auth::Via::ApiToken(_) => false,
    };
    let mut resp = Json(LoggedOut { logged_out: ended }).into_response();
    if cookie.is_some() {
        let clear = auth::session_cookie(None, st.node.config().api_https());
        if let Ok(v) = header::HeaderValue::from_str(&clear) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// The caller's account, role and credentials (never the token).
#[utoipa::path(
    get, path = "/v1/whoami", tag = "auth",
    responses((status = 200, description = "the caller", body = WhoAmI))
)]
async fn whoami(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    cookie: Option<Extension<CookieSession>>,
) -> ApiResult {
    let (via, id, expires) = match &who.via {
        auth::Via::Session(key) => ("session", None, st.auth.session_end(key)),
        auth::Via::ApiToken(id) => {
            let exp = st
                .node
                .get(Kind::ApiToken, id)?
                .and_then(|v| v["fields"]["expires_at_ms"].as_i64());
            ("api_token", Some(id.clone()), exp)
        }
    };
    Ok(Json(WhoAmI {
        name: who.name.clone(),
        role: who.role.as_str(),
        via,
        token_id: id,
        expires_at_ms: expires,
        csrf: cookie.map(|c| c.0 .0),
    })
    .into_response())
}

/// Makes an API token acting as the caller, shown once.
#[utoipa::path(
    post, path = "/v1/api-tokens", tag = "auth",
    request_body(content = Option<ApiTokenRequest>, content_type = "application/json", description = "optional"),
    responses((status = 200, description = "the token, shown once", body = ApiTokenMade), (status = 400, description = "bad JSON, ttl or label (`bad_json`, `invalid`; `field` names it)", body = ErrorBody), (status = 507, description = "the disk is full (`disk_full`)", body = ErrorBody))
)]
async fn create_api_token(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let ttl = optional_duration(&body, "ttl", "30d")?;
    let label = if body.is_empty() {
        String::new()
    } else {
        match json_body(&body)?.get("label") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                let mut e = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("label: expected a string, got {other}"),
                );
                e.error.field = Some("label".to_string());
                return Err(e);
            }
        }
    };
    let t = st.auth.create_api_token(&who, ttl, &label).await?;
    Ok(Json(ApiTokenMade {
        id: t.id,
        token: t.token,
        admin: t.name,
        label,
        expires_at_ms: t.expires_at_ms,
    })
    .into_response())
}

/// The API tokens the caller may see.
#[utoipa::path(
    get, path = "/v1/api-tokens", tag = "auth",
    responses((status = 200, description = "`{tokens: [...]}`: the caller's API tokens (a superadmin's: all), never a secret", body = Object))
)]
async fn list_api_tokens(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
) -> ApiResult {
    let tokens = st.auth.list_api_tokens(&who)?;
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

/// Revokes an API token: one's own, or any (superadmin).
#[utoipa::path(
    delete, path = "/v1/api-tokens/{id}", tag = "auth",
    params(("id" = String, Path, description = "an API token ID (the part after `pcat_` and before the next `_`)")),
    responses((status = 200, description = "`{revoked: ...}`", body = Object), (status = 404, description = "no such token (`not_found`)", body = ErrorBody), (status = 507, description = "the disk is full (`disk_full`)", body = ErrorBody))
)]
async fn revoke_api_token(
    State(st): State<ApiState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let revoked = st.auth.revoke_api_token(&who, &id).await?;
    Ok(Json(json!({ "revoked": revoked })).into_response())
}

/// The cluster's members.
#[utoipa::path(
    get, path = "/v1/nodes", tag = "cluster",
    responses((status = 200, description = "`{self, cluster_id, members: [{id, name, addr, version, removed, key}]}`", body = Object))
)]
async fn nodes(State(st): State<ApiState>) -> ApiResult {
    Ok(Json(json!({"self": st.node.config().node_id, "cluster_id": st.node.config().cluster_id, "members": st.node.members()})).into_response())
}

/// Removes a node from the cluster (superadmin), from another member.
#[utoipa::path(
    delete, path = "/v1/nodes/{id}", tag = "cluster",
    params(("id" = String, Path, description = "the ID of the node to remove")),
    responses((status = 200, description = "removed", body = Removed), (status = 400, description = "a node cannot remove itself (`invalid`)", body = ErrorBody), (status = 404, description = "no such member (`not_found`)", body = ErrorBody), (status = 507, description = "the disk is full (`disk_full`)", body = ErrorBody))
)]
async fn remove_node(
    State(st): State<ApiState>,
    Extension(_who): Extension<Caller>,
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
    Ok(Json(Removed { removed: id }).into_response())
}

/// Readiness: 200 while the node takes clients and writes.
///
/// 503 while it drains (so load balancers stop sending clients) or its disk is full (writes are refused).
#[utoipa::path(
    get, path = "/readyz", tag = "node",
    responses((status = 200, description = "ready", body = String, content_type = "text/plain"), (status = 503, description = "draining, disk full, or recovering", body = String, content_type = "text/plain"))
)]
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

/// Cluster and node status.
#[utoipa::path(
    get, path = "/v1/status", tag = "node",
    responses((status = 200, description = "the node's view of the cluster: members, links, replication, storage", body = Object))
)]
async fn status(State(st): State<ApiState>) -> ApiResult {
    Ok(Json(crate::cluster::monitor::status(&st.cluster)).into_response())
}

/// Drains the node (superadmin): new client connections are refused.
#[utoipa::path(
    post, path = "/v1/drain", tag = "node",
    request_body(content = Option<DrainRequest>, content_type = "application/json", description = "optional"),
    responses((status = 200, description = "draining", body = Draining), (status = 400, description = "bad JSON or deadline (`bad_json`, `invalid`)", body = ErrorBody))
)]
async fn drain(
    State(st): State<ApiState>,
    Extension(_who): Extension<Caller>,
    body: Bytes,
) -> ApiResult {
    let deadline = optional_duration(&body, "deadline", "30s")?;
    st.node.drain().try_start(deadline).map_err(|e| {
        let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
        err.error.field = Some("deadline".to_string());
        err
    })?;
    tracing::info!(deadline = ?deadline, "draining: new client connections are refused");
    Ok(Json(Draining {
        draining: true,
        deadline_s: deadline.map(|d| d.as_secs_f64()),
        active_connections: st.node.drain().active(),
    })
    .into_response())
}

/// Ends a drain (superadmin).
#[utoipa::path(
    post, path = "/v1/undrain", tag = "node",
    responses((status = 200, description = "not draining", body = Undrained))
)]
async fn undrain(State(st): State<ApiState>, Extension(_who): Extension<Caller>) -> ApiResult {
    st.node.drain().stop();
    tracing::info!("undrained: client connections are accepted again");
    Ok(Json(Undrained { draining: false }).into_response())
}

/// Rotates the at-rest key now (superadmin).
#[utoipa::path(
    post, path = "/v1/compact", tag = "node",
    responses((status = 200, description = "the new key, the keys deleted, how many secrets were sealed again", body = KeyRotation), (status = 507, description = "the disk is full (`disk_full`)", body = ErrorBody))
)]
async fn compact(State(st): State<ApiState>, Extension(_who): Extension<Caller>) -> ApiResult {
    let rotation = st.node.compact().await?;
    Ok(Json(KeyRotation {
        key: rotation.key,
        retired: rotation.retired,
        resealed: rotation.resealed,
    })
    .into_response())
}

/// Metrics in the OpenMetrics text format.
#[utoipa::path(
    get, path = "/metrics", tag = "node",
    responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"))
)]
async fn metrics(State(st): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        super::metrics::encode(&st.cluster, Some(&st.auth)),
    )
        .into_response()
}

/// Liveness: 200 while the process runs, recovering or not.
#[utoipa::path(get, path = "/livez", tag = "node",
    responses((status = 200, description = "alive (`ok`, or `ok (recovering)` while the store recovers)", body = String, content_type = "text/plain"))
)]
async fn livez() -> &'static str {
    "ok\n"
}

/// This document: the OpenAPI 3.1 description of the admin API, generated from the code.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "the OpenAPI 3.1 document", body = Object))
)]
async fn openapi_doc() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

// Request bodies (described here; the handlers read them field by field, with errors that name
// the field) and answers.

/// `POST /v1/login`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct LoginRequest {
    /// The admin account's name.
    name: String,
    /// Its password.
    #[schema(format = Password, write_only)]
    password: String,
}

/// `POST /v1/api-tokens`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct ApiTokenRequest {
    /// How long the token lives, a duration (`90m`, `30d`): 1m to 366d; 30d if absent.
    #[schema(example = "30d")]
    ttl: Option<String>,
    /// What the token is for.
    label: Option<String>,
}

/// `POST /v1/drain`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct DrainRequest {
    /// How long to wait for client connections to end, a duration (`30s`), at most 24h;
    /// none: until undrained.
    #[schema(example = "30s")]
    deadline: Option<String>,
}

/// `POST /v1/tokens`.
#[derive(ToSchema)]
#[allow(dead_code)]
struct JoinTokenRequest {
    /// How long the token is valid, a duration (`1h`).
    #[schema(example = "1h")]
    ttl: Option<String>,
}

/// A login session.
#[derive(Serialize, ToSchema)]
struct Session {
    /// The session token (`pcs_...`), sent as `Authorization: Bearer TOKEN`.
    token: String,
    /// When the session ends at the latest, milliseconds since the Unix epoch.
    expires_at_ms: i64,
    name: String,
    /// `admin` or `superadmin`.
    role: &'static str,
}

/// The caller.
#[derive(Serialize, ToSchema)]
struct WhoAmI {
    name: String,
    /// `admin` or `superadmin`.
    role: &'static str,
    /// `session` or `api_token`.
    via: &'static str,
    /// The API token's ID, when the caller used one.
    token_id: Option<String>,
    /// When the credentials end, milliseconds since the Unix epoch.
    expires_at_ms: Option<i64>,
    /// When the caller came with the console's session cookie: the value its writes send in
    /// `X-CSRF-Token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf: Option<String>,
}

/// A new API token.
#[derive(Serialize, ToSchema)]
struct ApiTokenMade {
    /// The token's ID (for `DELETE /v1/api-tokens/{id}`).
    id: Option<String>,
    /// The token (`pcat_...`), shown this once.
    token: String,
    /// The admin the token acts as.
    admin: String,
    label: String,
    /// End of validity, milliseconds since the Unix epoch.
    expires_at_ms: i64,
}

/// This node.
#[derive(Serialize, ToSchema)]
struct NodeInfo {
    id: String,
    name: String,
    /// The peerconf version.
    version: &'static str,
    schema_version: u32,
    api_listen: String,
    ipc_listen: String,
}

/// A deleted entity.
#[derive(Serialize, ToSchema)]
struct Deleted {
    deleted: DeletedEntity,
}

#[derive(Serialize, ToSchema)]
struct DeletedEntity {
    kind: &'static str,
    name: String,
}

/// The answer to a logout.
#[derive(Serialize, ToSchema)]
struct LoggedOut {
    /// Whether a session ended.
    logged_out: bool,
}

/// A new join token.
#[derive(Serialize, ToSchema)]
struct JoinTokenMade {
    /// The token, shown this once: give it to `peerconf join`.
    token: String,
    /// End of validity, milliseconds since the Unix epoch.
    expires_wall_ms: i64,
    /// The address the new node reaches this one at.
    ipc: String,
}

/// A removed node.
#[derive(Serialize, ToSchema)]
struct Removed {
    /// The node's ID.
    removed: String,
}

/// A drain started.
#[derive(Serialize, ToSchema)]
struct Draining {
    draining: bool,
    /// The deadline in seconds, if one was given.
    deadline_s: Option<f64>,
    /// Client connections still open.
    active_connections: usize,
}

/// A drain ended.
#[derive(Serialize, ToSchema)]
struct Undrained {
    draining: bool,
}

/// A key rotation.
#[derive(Serialize, ToSchema)]
struct KeyRotation {
    /// The ID of the key that seals from now on.
    key: u32,
    /// The IDs of the keys deleted.
    retired: Vec<u32>,
    /// Secret values sealed again under the new key.
    resealed: usize,
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
        let resp = app
            .clone()
            .oneshot(
                axum::http::Request::builder()
                    .uri("/v1/entities/user")
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["retry-after"], "1");
        gate.open(Router::new().route("/readyz", get_route()));
        assert_eq!(status_of(&app, "/readyz").await, StatusCode::IM_A_TEAPOT);
    }

    /// A watch stream asked for while the node starts waits for the node, and is then the
    /// node's; every other route still answers 503 at once.
    #[tokio::test]
    async fn a_watch_asked_for_while_the_node_starts_waits_for_it() {
        let gate = Gate::default();
        let app = gate.router();
        let t0 = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let app = app.clone();
            async move { status_of(&app, "/v1/watch").await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        assert_eq!(
            status_of(&app, "/v1/status").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            !waiting.is_finished(),
            "the watch did not wait for the node"
        );
        gate.open(Router::new().route("/v1/watch", get_route()));
        assert_eq!(waiting.await.expect("joined"), StatusCode::IM_A_TEAPOT);
        assert!(t0.elapsed() < WATCH_START_WAIT);
    }

    /// Promise: a commit of many changes at once (a peer's push of hundreds of documents under
    /// load) reaches a watch reader that keeps up whole, in order, with no `reset`. The thousand
    /// events are published as the driver publishes one commit's: all before the stream's
    /// feeder runs. (With a buffer counted in events, 256, this reader was reset: `vs-etcd.sh`
    /// with 64 writers lost the rest of its stream on member 3.)
    #[tokio::test]
    async fn a_commit_of_a_thousand_changes_reaches_a_reader_that_keeps_up() {
        let (app, node, _dir) = app().await;
        let req = axum::http::Request::builder()
            .uri("/v1/watch?kind=group")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let base = 1u64 << 40;
        let entity: std::sync::Arc<[u8]> = serde_json::to_vec(&json!({
            "kind": "group", "name": "g", "fields": {"description": "x".repeat(400)}
        }))
        .expect("json")
        .into();
        for i in 0..1000u64 {
            let ev = crate::node::ChangeEvent {
                seq: base + i,
                kind: Kind::Group,
                name: format!("g{i}"),
                alive: true,
                origin: crate::node::Origin::Remote { peer: "p2".into() },
                made_on: None,
                by: None,
                entity: Some(entity.clone()),
            };
            node.published()
                .events
                .send(ev)
                .expect("the stream is subscribed");
        }
        let text = read_until(&mut body, |t| {
            t.contains("event: reset") || t.matches("event: put").count() >= 1000
        })
        .await;
        assert!(!text.contains("event: reset"), "the reader was reset");
        let ids: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|x| x.parse().expect("an event number"))
            .collect();
        assert_eq!(ids, (0..1000).map(|i| base + i).collect::<Vec<_>>());

        // One event larger than the whole buffer still reaches a reader that keeps up.
        let big: std::sync::Arc<[u8]> = serde_json::to_vec(&json!({
            "kind": "group", "name": "big", "fields": {"description": "y".repeat(3 << 20)}
        }))
        .expect("json")
        .into();
        let ev = crate::node::ChangeEvent {
            seq: base + 1000,
            kind: Kind::Group,
            name: "big".into(),
            alive: true,
            origin: crate::node::Origin::Local,
            made_on: None,
            by: None,
            entity: Some(big),
        };
        node.published().events.send(ev).expect("subscribed");
        let rest = read_until(&mut body, |t| t.contains("\n\n")).await;
        assert!(
            rest.starts_with(&format!("id: {}\nevent: put\n", base + 1000)),
            "{}",
            &rest[..100.min(rest.len())]
        );
        assert!(rest.len() > 3 << 20, "the whole event");
    }

    /// A streamed body's text, read until `done` says so (each frame within 10 s).
    async fn read_until(body: &mut axum::body::Body, done: impl Fn(&str) -> bool) -> String {
        use http_body_util::BodyExt;
        let mut text = String::new();
        while !done(&text) {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("a frame within 10 s")
                .expect("the stream goes on")
                .expect("a frame");
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
        text
    }

    fn get_route() -> axum::routing::MethodRouter {
        axum::routing::get(|| async { StatusCode::IM_A_TEAPOT })
    }

    const ROOT_PW: &str = "Root-password-1";

    /// The API of a fresh node whose first SuperAdmin is `root`, in-process (no listener), and
    /// the directory holding it. The router returned sends the session token of `root` with
    /// every request that names no credentials ([`bare_app`] is the API itself).
    async fn app() -> (Router, crate::node::Node, tempfile::TempDir) {
        let (bare, node, dir) = bare_app();
        let token = login(&bare, "root", ROOT_PW).await.expect("root logs in");
        let app = bare.layer(middleware::map_request(move |mut req: Request| {
            let token = token.clone();
            async move {
                if !req.headers().contains_key(header::AUTHORIZATION) {
                    let v = format!("Bearer {token}").parse().expect("header");
                    req.headers_mut().insert(header::AUTHORIZATION, v);
                }
                req
            }
        }));
        (app, node, dir)
    }

    fn bare_app() -> (Router, crate::node::Node, tempfile::TempDir) {
        bare_app_with(crate::node::time::SystemClock::shared())
    }

    /// A clock the test moves: wall and monotonic time advance together.
    struct StepClock(std::sync::atomic::AtomicU64);

    impl crate::core::clock::Clock for StepClock {
        fn wall_ms(&self) -> i64 {
            1_800_000_000_000 + self.mono_ms() as i64
        }
        fn mono_ms(&self) -> u64 {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn bare_app_with(
        clock: Arc<dyn crate::core::clock::Clock>,
    ) -> (Router, crate::node::Node, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = crate::node::NodeOptions {
            seed: Some(1),
            clock,
        };
        let init = crate::node::InitOptions {
            admin: Some(crate::node::AdminBootstrap {
                name: "root".into(),
                password: ROOT_PW.into(),
            }),
            ..Default::default()
        };
        Node::init(dir.path(), &init, &opts).expect("init");
        let node = Node::open(dir.path(), opts).expect("open");
        let material = crate::net::tls::TlsFiles::new(dir.path())
            .read()
            .expect("tls");
        let state = Arc::new(ClusterState::new(node.clone(), material));
        (router(state), node, dir)
    }

    /// A session token for `name`, or the status of the refusal.
    async fn login(app: &Router, name: &str, password: &str) -> Result<String, StatusCode> {
        let body = json!({"name": name, "password": password}).to_string();
        let (status, v) = call(app, "POST", "/v1/login", &body).await;
        if status != StatusCode::OK {
            return Err(status);
        }
        Ok(v["token"].as_str().expect("token").to_string())
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
        let (app, node, _dir) = app().await;
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
        let (app, _node, _dir) = app().await;
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
        // root's own session lost the role with the write.
        assert_eq!(
            call(&app, "DELETE", "/v1/entities/admin/second", "")
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let e = _node
            .delete(Kind::Admin, "second")
            .await
            .expect_err("the last SuperAdmin was deleted");
        assert!(
            matches!(e, Error::Write(WriteError::LastSuperAdmin { .. })),
            "{e}"
        );
    }

    /// A drain deadline past 24 h is refused with a 400 naming the bound (it used to panic the
    /// worker on an overflowing instant), changes nothing, and the node still answers.
    #[tokio::test]
    async fn a_huge_drain_deadline_is_refused_not_a_panic() {
        let (app, node, _dir) = app().await;
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
        let (app, _node, _dir) = app().await;
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

    /// A request with headers, an optional client address, and its answer.
    async fn send(
        app: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        from: Option<&str>,
        body: &str,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        if let Some(a) = from {
            req.extensions_mut()
                .insert(ClientAddr(a.parse().expect("address")));
        }
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// An API token for `name`, made with its own session.
    async fn api_token_of(app: &Router, name: &str, password: &str) -> String {
        let session = login(app, name, password).await.expect("login");
        let auth = format!("Bearer {session}");
        let (status, _, v) = send(
            app,
            "POST",
            "/v1/api-tokens",
            &[("authorization", &auth)],
            None,
            r#"{"ttl":"1h","label":"test"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["token"].as_str().expect("token").to_string()
    }

    /// Every route by every role: without credentials 401 (with `WWW-Authenticate: Bearer`)
    /// but for liveness, readiness and login; an Admin refused (403, naming the superadmin
    /// role) exactly where the roles table says; a SuperAdmin never refused.
    #[tokio::test]
    async fn every_route_by_every_role() {
        let (app, _node, _dir) = app().await;
        let (status, _) = call(
            &app,
            "PUT",
            "/v1/entities/admin/ops",
            &json!({"role": "admin", "password": "Ops-password-1"}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        call(
            &app,
            "PUT",
            "/v1/entities/site/s1",
            r#"{"root_dir":"/srv/s1"}"#,
        )
        .await;
        let ops = api_token_of(&app, "ops", "Ops-password-1").await;
        let root = api_token_of(&app, "root", ROOT_PW).await;
        // (method, path, body, public, allowed for an Admin)
        let site = r#"{"root_dir":"/srv/s9"}"#;
        let rows: &[(&str, &str, &str, bool, bool)] = &[
            ("GET", "/livez", "", true, true),
            ("GET", "/readyz", "", true, true),
            ("POST", "/v1/login", "{}", true, true),
            ("GET", "/v1/status", "", false, true),
            ("GET", "/metrics", "", false, true),
            ("GET", "/v1/node", "", false, true),
            ("GET", "/v1/schema", "", false, true),
            ("GET", "/v1/schema/user", "", false, true),
            ("GET", "/v1/entities/user", "", false, true),
            ("GET", "/v1/entities/admin", "", false, true),
            ("GET", "/v1/entities/site/s1", "", false, true),
            ("GET", "/v1/entities/site/s1/history", "", false, true),
            ("GET", "/v1/entities/admin/ops", "", false, true),
            ("GET", "/v1/entities/admin/root", "", false, false),
            ("GET", "/v1/entities/admin/root/history", "", false, false),
            ("GET", "/v1/conflicts", "", false, true),
            ("GET", "/v1/nodes", "", false, true),
            ("GET", "/v1/whoami", "", false, true),
            ("GET", "/v1/api-tokens", "", false, true),
            ("POST", "/v1/api-tokens", "{}", false, true),
            ("DELETE", "/v1/api-tokens/0123456789abcdef", "", false, true),
            ("POST", "/v1/logout", "", false, true),
            ("PUT", "/v1/entities/site/s9", site, false, true),
            (
                "PATCH",
                "/v1/entities/site/s9",
                r#"{"description":"x"}"#,
                false,
                true,
            ),
            ("PUT", "/v1/entities/group/g9", "{}", false, true),
            (
                "PUT",
                "/v1/entities/user/u9",
                r#"{"home_dir":"/srv/u9","password":"User-password-1"}"#,
                false,
                true,
            ),
            (
                "PUT",
                "/v1/entities/script/sc9",
                r#"{"source":"log(1)"}"#,
                false,
                true,
            ),
            (
                "PUT",
                "/v1/entities/rule/r9",
                r#"{"event":"after_upload","script":"sc9"}"#,
                false,
                true,
            ),
            ("PUT", "/v1/entities/certificate/c9", "{}", false, true),
            ("DELETE", "/v1/entities/rule/r9", "", false, true),
            (
                "PATCH",
                "/v1/entities/admin/ops",
                r#"{"password":"Ops-password-2"}"#,
                false,
                true,
            ),
            (
                "PATCH",
                "/v1/entities/admin/ops",
                r#"{"email":"ops@example.com"}"#,
                false,
                false,
            ),
            (
                "PUT",
                "/v1/entities/admin/eve",
                r#"{"role":"superadmin","password":"Eve-password-1"}"#,
                false,
                false,
            ),
            (
                "PUT",
                "/v1/entities/admi%6E/eve",
                r#"{"role":"superadmin","password":"Eve-password-1"}"#,
                false,
                false,
            ),
            (
                "PATCH",
                "/v1/entities/admin/root",
                r#"{"password":"Root-password-2"}"#,
                false,
                false,
            ),
            ("DELETE", "/v1/entities/admin/eve", "", false, false),
            (
                "PATCH",
                "/v1/entities/security/global",
                r#"{"password_min_length":8}"#,
                false,
                false,
            ),
            (
                "PATCH",
                "/v1/entities/settings/global",
                r#"{"banner":"hi"}"#,
                false,
                false,
            ),
            ("GET", "/v1/tokens", "", false, false),
            ("POST", "/v1/tokens", "{}", false, false),
            ("DELETE", "/v1/tokens/0123456789ab", "", false, false),
            (
                "DELETE",
                "/v1/nodes/0123456789abcdef0123456789abcdef",
                "",
                false,
                false,
            ),
            ("POST", "/v1/drain", "{}", false, false),
            ("POST", "/v1/undrain", "", false, false),
            ("POST", "/v1/compact", "", false, false),
        ];
        let refused = |s: StatusCode| s == StatusCode::UNAUTHORIZED || s == StatusCode::FORBIDDEN;
        for &(method, path, body, public, admin_may) in rows {
            let what = format!("{method} {path}");
            let (status, headers, v) =
                send(&app, method, path, &[("authorization", "none")], None, body).await;
            let (bare, bare_headers, _) = {
                // No Authorization header at all: the test router would add root's, so
                // send an empty bearer, which is malformed and must be treated as none.
                send(
                    &app,
                    method,
                    path,
                    &[("authorization", "Bearer ")],
                    None,
                    body,
                )
                .await
            };
            if public {
                assert!(
                    !refused(status) && !refused(bare),
                    "{what}: {status} {bare}"
                );
            } else {
                for (s, h) in [(status, &headers), (bare, &bare_headers)] {
                    assert_eq!(
                        s,
                        StatusCode::UNAUTHORIZED,
                        "{what} without credentials: {v}"
                    );
                    let www = h.get("www-authenticate").and_then(|v| v.to_str().ok());
                    assert!(
                        www.is_some_and(|w| w.starts_with("Bearer")),
                        "{what}: {www:?}"
                    );
                }
            }
            let auth = format!("Bearer {ops}");
            let (status, _, v) =
                send(&app, method, path, &[("authorization", &auth)], None, body).await;
            if admin_may {
                assert!(
                    !refused(status),
                    "{what} refused for an Admin: {status} {v}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{what} allowed for an Admin: {v}"
                );
                let msg = v["error"]["message"].as_str().unwrap_or_default();
                assert!(msg.contains("superadmin"), "{what}: {msg}");
            }
            let auth = format!("Bearer {root}");
            let (status, _, v) =
                send(&app, method, path, &[("authorization", &auth)], None, body).await;
            let expect_refused = path.starts_with("/v1/entities/api_token");
            assert_eq!(
                refused(status),
                expect_refused,
                "{what} for a SuperAdmin: {status} {v}"
            );
            if path == "/v1/drain" {
                send(
                    &app,
                    "POST",
                    "/v1/undrain",
                    &[("authorization", &auth)],
                    None,
                    "",
                )
                .await;
            }
        }
        // An Admin lists its own account only; a SuperAdmin lists all.
        let auth = format!("Bearer {ops}");
        let (_, _, admins) = send(
            &app,
            "GET",
            "/v1/entities/admin",
            &[("authorization", &auth)],
            None,
            "",
        )
        .await;
        let names: Vec<&str> = admins
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(names, ["ops"]);
        let (_, all) = call(&app, "GET", "/v1/entities/admin", "").await;
        assert!(all.as_array().expect("list").len() >= 2, "{all}");
        assert!(!all.to_string().contains("argon2"), "{all}");
    }

    /// The OpenAPI document needs credentials like every route but the public three.
    #[tokio::test]
    async fn the_openapi_document_needs_a_token() {
        let (app, _node, _dir) = app().await;
        let (status, headers, _) = send(
            &app,
            "GET",
            "/v1/openapi.json",
            &[("authorization", "Bearer ")],
            None,
            "",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.contains_key("www-authenticate"));
        let (status, headers, doc) = send(&app, "GET", "/v1/openapi.json", &[], None, "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(doc["openapi"], json!("3.1.0"));
        assert!(doc["paths"]["/v1/entities/{kind}/{name}"]["put"].is_object());
    }

    /// Whether `v` fits `schema` of the document `doc` (the parts of JSON Schema the document
    /// uses: `$ref`, `oneOf` with a discriminator, type, enum, properties, required,
    /// additionalProperties false, items); the reason when it does not.
    fn fits(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        if let Some(r) = schema["$ref"].as_str() {
            let target = doc
                .pointer(r.trim_start_matches('#'))
                .ok_or(format!("{at}: {r} does not resolve"))?;
            return fits(doc, target, v, at);
        }
        if let Some(branches) = schema["oneOf"].as_array() {
            if let Some(prop) = schema["discriminator"]["propertyName"].as_str() {
                let tag = v[prop].as_str().unwrap_or_default();
                let r = schema["discriminator"]["mapping"][tag]
                    .as_str()
                    .ok_or(format!("{at}: no branch for {prop} {tag:?}"))?;
                return fits(doc, &json!({ "$ref": r }), v, at);
            }
            let ok = branches
                .iter()
                .filter(|b| fits(doc, b, v, at).is_ok())
                .count();
            return if ok > 0 {
                Ok(())
            } else {
                Err(format!("{at}: no branch fits {v}"))
            };
        }
        let type_of = |v: &Value| match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let t = type_of(v);
        let allowed =
            types.is_empty() || types.contains(&t) || (t == "integer" && types.contains(&"number"));
        if !allowed {
            return Err(format!("{at}: {t} where the document says {types:?}: {v}"));
        }
        if let Some(e) = schema["enum"].as_array() {
            if !e.contains(v) {
                return Err(format!("{at}: {v} is not one of {e:?}"));
            }
        }
        if let Value::Object(o) = v {
            let props = schema["properties"].as_object();
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or_default();
                if !o.contains_key(r)
                    && !schema["properties"][r]["writeOnly"]
                        .as_bool()
                        .unwrap_or(false)
                {
                    return Err(format!("{at}: {r} is required: {v}"));
                }
            }
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => fits(doc, s, x, &format!("{at}.{k}"))?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return Err(format!("{at}: {k} is not in the document"))
                    }
                    None => {}
                }
            }
        }
        if let (Value::Array(a), Some(items)) = (v, schema.get("items")) {
            for (i, x) in a.iter().enumerate() {
                fits(doc, items, x, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }

    /// Real answers fit the schemas the document gives for them: entities of every kind that
    /// has a field table to fill, lists, errors, the login and the caller.
    #[tokio::test]
    async fn answers_fit_the_document() {
        let (app, _node, _dir) = app().await;
        let doc: Value = serde_json::from_str(openapi_json()).expect("json");
        let answer = |path: &str, method: &str, status: &str| {
            doc["paths"][path][method.to_ascii_lowercase()]["responses"][status]["content"]
                ["application/json"]["schema"]
                .clone()
        };
        let check = |schema: Value, v: &Value, what: &str| {
            if let Err(e) = fits(&doc, &schema, v, what) {
                panic!("{e}\nschema: {schema}");
            }
        };
        let writes = [
            (
                "PUT",
                "site",
                "s1",
                json!({"root_dir": "/srv/s1", "protocols": ["sftp"]}),
            ),
            ("PUT", "group", "g1", json!({"permissions": ["read"]})),
            (
                "PUT",
                "user",
                "u1",
                json!({"password": "User-password-1", "groups": ["g1"], "site": "s1"}),
            ),
            ("PUT", "script", "sc1", json!({"source": "log(1)"})),
            (
                "PUT",
                "rule",
                "r1",
                json!({"event": "after_upload", "script": "sc1"}),
            ),
            (
                "PUT",
                "admin",
                "ops",
                json!({"role": "admin", "password": "Ops-password-1"}),
            ),
            ("PATCH", "settings", "global", json!({"banner": "hi"})),
            (
                "PATCH",
                "security",
                "global",
                json!({"password_min_length": 9}),
            ),
        ];
        let entity = "/v1/entities/{kind}/{name}";
        for (method, kind, name, body) in writes {
            let path = format!("/v1/entities/{kind}/{name}");
            let (status, v) = call(&app, method, &path, &body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{method} {path}: {v}");
            check(
                answer(entity, method, "200"),
                &v,
                &format!("{method} {path}"),
            );
            let (_, v) = call(&app, "GET", &path, "").await;
            check(answer(entity, "GET", "200"), &v, &format!("GET {path}"));
            let (_, v) = call(&app, "GET", &format!("/v1/entities/{kind}"), "").await;
            check(
                answer("/v1/entities/{kind}", "GET", "200"),
                &v,
                &format!("list {kind}"),
            );
        }
        let (status, v) = call(&app, "PUT", "/v1/entities/site/s2", r#"{"nope": 1}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        check(answer(entity, "PUT", "400"), &v, "an error");
        let (status, v) = call(&app, "GET", "/v1/entities/site/absent", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        check(answer(entity, "GET", "404"), &v, "not found");
        for (path, method, body) in [
            ("/v1/whoami", "GET", ""),
            ("/v1/node", "GET", ""),
            ("/v1/api-tokens", "POST", r#"{"ttl":"1h","label":"x"}"#),
            (
                "/v1/login",
                "POST",
                r#"{"name":"root","password":"Root-password-1"}"#,
            ),
            ("/v1/undrain", "POST", ""),
        ] {
            let (status, v) = call(&app, method, path, body).await;
            assert_eq!(status, StatusCode::OK, "{method} {path}: {v}");
            check(answer(path, method, "200"), &v, &format!("{method} {path}"));
        }
        let (status, v) = call(&app, "DELETE", "/v1/entities/rule/r1", "").await;
        assert_eq!(status, StatusCode::OK);
        check(answer(entity, "DELETE", "200"), &v, "a delete");
        // The check itself tells a wrong answer.
        let read = answer(entity, "GET", "200");
        for wrong in [
            json!({"kind": "site", "name": "s", "fields": {"bogus": 1}}),
            json!({"kind": "site", "name": "s", "fields": {"max_sessions": "many"}}),
            json!({"kind": "site", "name": "s", "fields": {"protocols": ["gopher"]}}),
            json!({"kind": "user", "name": "u", "fields": {}, "secrets_set": ["nope"]}),
            json!({"kind": "rule", "name": "r", "fields": {"script": "sc1"}}),
        ] {
            assert!(fits(&doc, &read, &wrong, "wrong").is_err(), "{wrong}");
        }
    }

    /// The router serves every operation the document describes, and on a described path no
    /// method the document does not name.
    #[tokio::test]
    async fn the_router_serves_exactly_the_described_operations() {
        let (app, _node, _dir) = app().await;
        let doc = openapi_document();
        let ops = super::super::openapi::operations(&doc);
        let all = ["GET", "PUT", "POST", "DELETE", "PATCH"];
        for path in doc.paths.paths.keys() {
            let concrete = path
                .replace("{kind}", "group")
                .replace("{name}", "g-openapi")
                .replace("{id}", "0123456789abcdef");
            // A stream answers until the client leaves: a bad position is answered at once.
            let concrete = if path == "/v1/watch" {
                format!("{concrete}?since=not-a-number")
            } else {
                concrete
            };
            for m in all {
                let described = ops
                    .iter()
                    .any(|(om, p, _)| p == path && super::super::openapi::method_str(om) == m);
                if m == "POST"
                    && ["/v1/drain", "/v1/compact", "/v1/logout"].contains(&path.as_str())
                {
                    // Served, but not sent here: it would drain the node, rotate its key or end
                    // the session of the requests that follow.
                    assert!(described, "{m} {path}");
                    continue;
                }
                if m == "GET" && path == "/v1/status/stream" {
                    // Endless: only the head is read.
                    let req = axum::http::Request::builder()
                        .uri(path.as_str())
                        .body(axum::body::Body::empty())
                        .expect("request");
                    let resp = app.clone().oneshot(req).await.expect("infallible");
                    assert_eq!(resp.status(), StatusCode::OK, "{m} {path}");
                    assert_eq!(resp.headers()["content-type"], "text/event-stream");
                    continue;
                }
                let body = if matches!(m, "PUT" | "PATCH" | "POST") {
                    "{}"
                } else {
                    ""
                };
                let (status, _, v) = send(&app, m, &concrete, &[], None, body).await;
                let fallback = status == StatusCode::NOT_FOUND
                    && v["error"]["message"] == json!("no such API route");
                if described {
                    assert!(
                        !fallback && status != StatusCode::METHOD_NOT_ALLOWED,
                        "{m} {concrete} is described but not served: {status} {v}"
                    );
                } else {
                    assert_eq!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{m} {concrete} is served but not described: {v}"
                    );
                }
            }
        }
    }

    /// Unknown account and wrong password get the same answer; failures lock out an account
    /// and an address (429 with Retry-After, even for the right password); a success resets
    /// the count; another address still logs in to an account not itself locked.
    #[tokio::test]
    async fn logins_lock_out_by_account_and_by_address() {
        let (app, _node, _dir) = app().await;
        call(
            &app,
            "PUT",
            "/v1/entities/admin/ops",
            &json!({"role": "admin", "password": "Ops-password-1"}).to_string(),
        )
        .await;
        let (s, _) = call(
            &app,
            "PATCH",
            "/v1/entities/security/global",
            r#"{"max_login_attempts":3,"lockout_duration_s":60}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let attempt = |name: &'static str, pw: &'static str, from: &'static str| {
            let app = app.clone();
            async move {
                let body = json!({"name": name, "password": pw}).to_string();
                send(&app, "POST", "/v1/login", &[], Some(from), &body).await
            }
        };
        let (s1, _, b1) = attempt("ops", "wrong", "10.0.0.1:1000").await;
        let (s2, _, b2) = attempt("nobody", "wrong", "10.0.0.2:1000").await;
        assert_eq!(
            (s1, &b1),
            (s2, &b2),
            "unknown account and wrong password differ"
        );
        assert_eq!(s1, StatusCode::UNAUTHORIZED);
        // Two failures, a success (reset), two failures: not locked.
        attempt("ops", "wrong", "10.0.0.3:1").await;
        assert_eq!(
            attempt("ops", "Ops-password-1", "10.0.0.3:1").await.0,
            StatusCode::OK
        );
        attempt("ops", "wrong", "10.0.0.3:1").await;
        attempt("ops", "wrong", "10.0.0.3:1").await;
        assert_eq!(
            attempt("ops", "Ops-password-1", "10.0.0.3:1").await.0,
            StatusCode::OK
        );
        // By account: three failures from three addresses.
        for from in ["10.0.1.1:1", "10.0.1.2:1", "10.0.1.3:1"] {
            assert_eq!(
                attempt("ops", "wrong", from).await.0,
                StatusCode::UNAUTHORIZED
            );
        }
        let (s, h, v) = attempt("ops", "Ops-password-1", "10.0.1.4:1").await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
        let retry: u64 = h["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&retry), "{retry}");
        // By address: three unknown names from one address lock it for every account.
        for name in ["a1", "a2", "a3"] {
            assert_eq!(
                attempt(name, "wrong", "10.0.2.1:1").await.0,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(
            attempt("root", ROOT_PW, "10.0.2.1:1").await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            attempt("root", ROOT_PW, "10.0.2.2:1").await.0,
            StatusCode::OK
        );
        let req = axum::http::Request::builder()
            .uri("/metrics")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&bytes);
        let locked = text
            .lines()
            .find(|l| l.starts_with("peerconf_admin_logins_total{result=\"locked_out\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
        assert_eq!(locked, Some(2), "{text}");
    }

    /// A session ends at logout; an API token is refused once revoked, once its admin is
    /// disabled, and (for an account made again under the name) once its admin was deleted.
    #[tokio::test]
    async fn sessions_end_and_tokens_are_revoked() {
        let (app, _node, _dir) = app().await;
        call(
            &app,
            "PUT",
            "/v1/entities/admin/ops",
            &json!({"role": "admin", "password": "Ops-password-1"}).to_string(),
        )
        .await;
        let get = |token: String| {
            let app = app.clone();
            async move {
                let auth = format!("Bearer {token}");
                send(
                    &app,
                    "GET",
                    "/v1/whoami",
                    &[("authorization", &auth)],
                    None,
                    "",
                )
                .await
            }
        };
        let session = login(&app, "ops", "Ops-password-1").await.expect("login");
        let (s, _, me) = get(session.clone()).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            (me["name"].as_str(), me["role"].as_str()),
            (Some("ops"), Some("admin"))
        );
        let auth = format!("Bearer {session}");
        send(
            &app,
            "POST",
            "/v1/logout",
            &[("authorization", &auth)],
            None,
            "",
        )
        .await;
        assert_eq!(get(session).await.0, StatusCode::UNAUTHORIZED);

        let t1 = api_token_of(&app, "ops", "Ops-password-1").await;
        let t2 = api_token_of(&app, "ops", "Ops-password-1").await;
        assert_eq!(get(t1.clone()).await.0, StatusCode::OK);
        // A token with a wrong secret but a real ID is refused.
        let forged = format!("{}{}", &t1[..t1.len() - 4], "0000");
        assert_eq!(get(forged).await.0, StatusCode::UNAUTHORIZED);
        let (_, listed) = call(&app, "GET", "/v1/api-tokens", "").await;
        let text = listed.to_string();
        assert!(
            !text.contains(&t1[t1.len() - 20..]),
            "a token's secret is listed: {text}"
        );
        let id = t1.split('_').nth(1).expect("id").to_string();
        let (s, v) = call(&app, "DELETE", &format!("/v1/api-tokens/{id}"), "").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(get(t1).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(get(t2.clone()).await.0, StatusCode::OK);
        call(
            &app,
            "PATCH",
            "/v1/entities/admin/ops",
            r#"{"enabled":false}"#,
        )
        .await;
        assert_eq!(get(t2.clone()).await.0, StatusCode::UNAUTHORIZED);
        call(
            &app,
            "PATCH",
            "/v1/entities/admin/ops",
            r#"{"enabled":true}"#,
        )
        .await;
        assert_eq!(get(t2.clone()).await.0, StatusCode::OK);
        call(&app, "DELETE", "/v1/entities/admin/ops", "").await;
        call(
            &app,
            "PUT",
            "/v1/entities/admin/ops",
            &json!({"role": "admin", "password": "Ops-password-9"}).to_string(),
        )
        .await;
        assert_eq!(
            get(t2).await.0,
            StatusCode::UNAUTHORIZED,
            "a new ops inherited a token"
        );
    }

    /// A session ends after `session_idle_timeout_s` without a request, and after
    /// `session_max_life_s` from the login however busy it is (time from the node's clock).
    #[tokio::test]
    async fn sessions_end_after_their_idle_time_and_their_life() {
        let clock = Arc::new(StepClock(std::sync::atomic::AtomicU64::new(1_000)));
        let (app, node, _dir) = bare_app_with(clock.clone());
        node.patch(
            Kind::Security,
            "global",
            json!({"session_idle_timeout_s": 60, "session_max_life_s": 120}),
        )
        .await
        .expect("policy");
        let advance = |s: u64| {
            clock
                .0
                .fetch_add(s * 1000, std::sync::atomic::Ordering::SeqCst);
        };
        let whoami = |token: String| {
            let app = app.clone();
            async move {
                let auth = format!("Bearer {token}");
                send(
                    &app,
                    "GET",
                    "/v1/whoami",
                    &[("authorization", &auth)],
                    None,
                    "",
                )
                .await
                .0
            }
        };
        let t = login(&app, "root", ROOT_PW).await.expect("login");
        advance(59);
        assert_eq!(whoami(t.clone()).await, StatusCode::OK, "idle 59 s of 60");
        advance(59);
        assert_eq!(
            whoami(t.clone()).await,
            StatusCode::OK,
            "used 59 s ago, 118 s old"
        );
        advance(3);
        assert_eq!(
            whoami(t).await,
            StatusCode::UNAUTHORIZED,
            "121 s old: past the maximum life"
        );
        let t = login(&app, "root", ROOT_PW).await.expect("login again");
        assert_eq!(whoami(t.clone()).await, StatusCode::OK);
        advance(61);
        assert_eq!(
            whoami(t).await,
            StatusCode::UNAUTHORIZED,
            "61 s without a request"
        );
    }
}
