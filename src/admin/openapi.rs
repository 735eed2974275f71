//! Layer: admin (imports nothing of the crate: `crdt-schema` and `utoipa` only; the API imports it).
//!
//! The OpenAPI 3.1 description of the admin API, served at `GET /v1/openapi.json` and generated
//! from the code, never written by hand:
//! - **Operations** come from the route table (`api_routes` in `api.rs`): every route is
//!   registered with `utoipa_axum::routes!`, which takes the method and path from the handler's
//!   `#[utoipa::path]` attribute, so a route without a description does not compile.
//! - **Entity bodies** are built at run time from `crdt-schema` ([`entity_schemas`]): per kind a
//!   fields schema (`site_fields`, ...), a patch schema (`site_patch`) and the entity as read
//!   (`site_entity`).
//! - **What the layers answer** (401 without credentials, 403 for another origin, 408, 415, 421,
//!   503 while recovering, 413 for bodies) is added to every operation by [`finish`], and which
//!   operations need no credentials is asked of the `authorize` layer's own table (`is_public`
//!   in `api.rs`, passed in: this module does not import the API, the API imports it).

use crdt_schema::{Field, Format, Item, Kind, Type};
use serde::Serialize;
use serde_json::{json, Value};
use std::borrow::Cow;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, Discriminator, ObjectBuilder, OneOfBuilder, Ref, Schema,
    SchemaFormat, SchemaType, Type as T,
};
use utoipa::openapi::security::{HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, HttpMethod, OpenApi, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// The name of the bearer security scheme.
pub const BEARER: &str = "bearer";

type Schemas = Vec<(String, RefOr<Schema>)>;

fn schema_ref(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

/// An entity kind, as a path segment: one of [`Kind::ALL`].
pub struct KindName;

impl PartialSchema for KindName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(T::String)
            .enum_values(Some(Kind::ALL.iter().map(|k| k.as_str())))
            .description(Some("an entity kind"))
            .into()
    }
}

impl ToSchema for KindName {
    fn name() -> Cow<'static, str> {
        "Kind".into()
    }
}

/// An entity name: 1 to [`crdt_schema::NAME_LEN_MAX`] bytes.
pub struct EntityName;

impl PartialSchema for EntityName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(T::String)
            .min_length(Some(1))
            .max_length(Some(crdt_schema::NAME_LEN_MAX))
            .description(Some(format!(
                "an entity's name, 1 to {} bytes; the singleton kinds ({}) have one entity, `global`",
                crdt_schema::NAME_LEN_MAX,
                singletons().join(", ")
            )))
            .into()
    }
}

impl ToSchema for EntityName {
    fn name() -> Cow<'static, str> {
        "EntityName".into()
    }
}

fn singletons() -> Vec<&'static str> {
    Kind::ALL
        .iter()
        .filter(|k| k.singleton().is_some())
        .map(|k| k.as_str())
        .collect()
}

/// The body of `PUT /v1/entities/{kind}/{name}`: the fields of the kind named in the path.
///
/// Described as `oneOf` over the kinds' `{kind}_fields` schemas. The kind is in the path, not in
/// the body, so there is no body property to discriminate on; `oneOf` of named `$ref`s is what
/// client generators handle best (a union or sealed type of named classes: TypeScript
/// `SiteFields | UserFields | ...`, a Rust enum, a Java interface), where `anyOf` is still
/// half-supported by several of them. The extension `x-peerconf-schema-by-kind` maps each kind
/// to its branch, for generators and readers that want the exact one. A validator that checks
/// `oneOf` strictly may find a body valid for several kinds (`{}`): the server validates against
/// the kind of the path only.
pub struct EntityPut;
/// The body of `PATCH /v1/entities/{kind}/{name}`: a JSON merge patch of the kind's fields
/// (`oneOf` the `{kind}_patch` schemas, for the reason given at [`EntityPut`]).
pub struct EntityPatch;
/// An entity as read (`oneOf` the `{kind}_entity` schemas, discriminated by `kind`).
pub struct Entity;
/// A list of entities of one kind.
pub struct EntityList;

fn by_kind(suffix: &str, description: &str, discriminate: bool) -> RefOr<Schema> {
    let mut one = OneOfBuilder::new().description(Some(description));
    for k in Kind::ALL {
        one = one.item(schema_ref(&format!("{}_{suffix}", k.as_str())));
    }
    if discriminate {
        one = one.discriminator(Some(Discriminator::with_mapping(
            "kind",
            Kind::ALL.iter().map(|k| {
                (
                    k.as_str(),
                    format!("#/components/schemas/{}_{suffix}", k.as_str()),
                )
            }),
        )));
    }
    let map: serde_json::Map<String, Value> = Kind::ALL
        .iter()
        .map(|k| {
            (
                k.as_str().to_string(),
                json!(format!("#/components/schemas/{}_{suffix}", k.as_str())),
            )
        })
        .collect();
    one = one.extensions(Some(
        Extensions::builder()
            .add("x-peerconf-schema-by-kind", Value::Object(map))
            .build(),
    ));
    one.into()
}

impl PartialSchema for EntityPut {
    fn schema() -> RefOr<Schema> {
        by_kind(
            "fields",
            "the fields of the kind named in the path (`{kind}_fields`). Fields left out take \
             their defaults, but a secret left out of a put of an existing entity is kept. The \
             form every read returns (`{kind, name, fields, ...}`) is accepted too; its \
             read-only fields are ignored.",
            false,
        )
    }
}
impl ToSchema for EntityPut {
    fn name() -> Cow<'static, str> {
        "EntityPut".into()
    }
    fn schemas(out: &mut Schemas) {
        out.extend(entity_schemas());
    }
}

impl PartialSchema for EntityPatch {
    fn schema() -> RefOr<Schema> {
        by_kind(
            "patch",
            "a JSON merge patch of the fields of the kind named in the path (`{kind}_patch`): \
             fields left out keep their values, `null` resets a field to its default",
            false,
        )
    }
}
impl ToSchema for EntityPatch {
    fn name() -> Cow<'static, str> {
        "EntityPatch".into()
    }
    fn schemas(out: &mut Schemas) {
        out.extend(entity_schemas());
    }
}

impl PartialSchema for Entity {
    fn schema() -> RefOr<Schema> {
        by_kind("entity", "an entity as read", true)
    }
}
impl ToSchema for Entity {
    fn name() -> Cow<'static, str> {
        "Entity".into()
    }
    fn schemas(out: &mut Schemas) {
        out.extend(entity_schemas());
    }
}

impl PartialSchema for EntityList {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(schema_ref("Entity"))
            .description(Some("every entity of the kind the caller may see"))
            .into()
    }
}
impl ToSchema for EntityList {
    fn name() -> Cow<'static, str> {
        "EntityList".into()
    }
    fn schemas(out: &mut Schemas) {
        out.push(("Entity".into(), Entity::schema()));
        out.extend(entity_schemas());
    }
}

/// A string format: the schema's own name for it (`absolute-path`, `cidr`, ...).
fn format(f: Format) -> Option<SchemaFormat> {
    Some(SchemaFormat::Custom(f.as_str().to_string()))
}

fn nullable(t: T, patch: bool) -> SchemaType {
    if patch {
        [t, T::Null].into_iter().collect()
    } else {
        SchemaType::new(t)
    }
}

fn enum_values(vals: &[&str], patch: bool) -> Vec<Value> {
    let mut v: Vec<Value> = vals.iter().map(|s| json!(s)).collect();
    if patch {
        v.push(Value::Null);
    }
    v
}

fn reference_doc(k: Kind) -> String {
    format!(
        "the name of a `{}` entity, which must exist when written",
        k.as_str()
    )
}

/// The schema of one field's value: in a patch (`patch`), `null` is allowed too (a reset).
pub fn field_schema(field: &Field, patch: bool) -> Schema {
    let mut doc = field.doc.to_string();
    let o = ObjectBuilder::new();
    let o = match field.ty {
        Type::Bool => o.schema_type(nullable(T::Boolean, patch)),
        Type::Int { min, max } => o
            .schema_type(nullable(T::Integer, patch))
            .format(Some(SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .minimum(Some(min))
            .maximum(Some(max)),
        Type::Str { max_len, format: f } => o
            .schema_type(nullable(T::String, patch))
            .max_length(Some(max_len))
            .format(format(f)),
        Type::Enum(vals) => o
            .schema_type(nullable(T::String, patch))
            .enum_values(Some(enum_values(vals, patch))),
        Type::Ref(k) => {
            doc = format!("{doc}: {}", reference_doc(k));
            o.schema_type(nullable(T::String, patch))
                .min_length(Some(1))
                .max_length(Some(crdt_schema::NAME_LEN_MAX))
                .format(Some(SchemaFormat::Custom(format!("{}-name", k.as_str()))))
        }
        Type::Text { max_len } => o
            .schema_type(nullable(T::String, patch))
            .max_length(Some(max_len)),
        Type::Set { item, max_items } => {
            let items: Schema = match item {
                Item::Enum(vals) => ObjectBuilder::new()
                    .schema_type(T::String)
                    .enum_values(Some(vals.iter().copied()))
                    .into(),
                Item::Str { max_len, format: f } => ObjectBuilder::new()
                    .schema_type(T::String)
                    .max_length(Some(max_len))
                    .format(format(f))
                    .into(),
                Item::Ref(k) => {
                    doc = format!("{doc}: each {}", reference_doc(k));
                    ObjectBuilder::new()
                        .schema_type(T::String)
                        .min_length(Some(1))
                        .max_length(Some(crdt_schema::NAME_LEN_MAX))
                        .format(Some(SchemaFormat::Custom(format!("{}-name", k.as_str()))))
                        .into()
                }
            };
            let mut a = ArrayBuilder::new()
                .schema_type(nullable(T::Array, patch))
                .items(RefOr::T(items))
                .unique_items(true)
                .max_items(Some(max_items))
                .default(field.default.to_json())
                // No set is secret or derived (`readOnly`/`writeOnly` are not on arrays here);
                // the tests check that every secret field is described as write-only.
                .extensions(Some(merge_ext(field)));
            a = a.description(Some(doc));
            return a.into();
        }
    };
    o.description(Some(doc))
        .default(field.default.to_json())
        .read_only(field.read_only.then_some(true))
        .write_only(field.secret.then_some(true))
        .extensions(Some(merge_ext(field)))
        .into()
}

/// How concurrent writes of the field merge, and the kind it refers to.
fn merge_ext(field: &Field) -> Extensions {
    let mut e = Extensions::builder().add("x-peerconf-merge", field.merge.as_str());
    if let Some(k) = field.references() {
        e = e.add("x-peerconf-references", k.as_str());
    }
    e.build()
}

/// A kind's fields (`patch`: the merge-patch form, every field optional and nullable).
pub fn fields_schema(kind: Kind, patch: bool) -> Schema {
    let mut o = ObjectBuilder::new()
        .schema_type(T::Object)
        .description(Some(if patch {
            format!(
                "a merge patch of a {} ({})",
                kind.as_str(),
                kind.description()
            )
        } else {
            format!("the fields of a {}: {}", kind.as_str(), kind.description())
        }))
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
    for f in kind.fields() {
        o = o.property(f.name, field_schema(f, patch));
        if f.required && !patch {
            o = o.required(f.name);
        }
    }
    o.into()
}

/// A kind's entity as read (`EntityState::to_json` in `crdt-schema`).
pub fn entity_schema(kind: Kind) -> Schema {
    let secrets: Vec<&str> = kind
        .fields()
        .iter()
        .filter(|f| f.secret)
        .map(|f| f.name)
        .collect();
    let registers: Vec<&Field> = kind
        .fields()
        .iter()
        .filter(|f| f.merge == crdt_schema::Merge::Register && !f.secret && !f.read_only)
        .collect();
    let mut o = ObjectBuilder::new()
        .schema_type(T::Object)
        .description(Some(format!(
            "an entity of kind `{}`, as read",
            kind.as_str()
        )))
        .property(
            "kind",
            ObjectBuilder::new()
                .schema_type(T::String)
                .enum_values(Some([kind.as_str()])),
        )
        .required("kind")
        .property("name", schema_ref("EntityName"))
        .required("name")
        .property(
            "fields",
            RefOr::Ref(
                Ref::builder()
                    .ref_location_from_schema_name(format!("{}_fields", kind.as_str()))
                    .description(Some("every field but the secrets, defaults filled in"))
                    .build(),
            ),
        )
        .required("fields")
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
    if !secrets.is_empty() {
        o = o.property(
            "secrets_set",
            ArrayBuilder::new()
                .items(
                    ObjectBuilder::new()
                        .schema_type(T::String)
                        .enum_values(Some(secrets)),
                )
                .unique_items(true)
                .description(Some(
                    "the secret fields that hold a value (present when any does); their values are never read",
                )),
        );
    }
    if !registers.is_empty() {
        // Only registers conflict (sets and text merge); each conflict lists the field's values.
        let mut c = ObjectBuilder::new()
            .schema_type(T::Object)
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
            .description(Some(
                "fields whose concurrent writes are not resolved (present when any is): every value, the winner first",
            ));
        for f in registers {
            let mut value = field_schema(f, false);
            if let Schema::Object(o) = &mut value {
                o.default = None;
                o.description = None;
                o.extensions = None;
            }
            c = c.property(
                f.name,
                ArrayBuilder::new()
                    .items(RefOr::T(value))
                    .min_items(Some(2)),
            );
        }
        o = o.property("conflicts", c);
    }
    o.into()
}

/// Every kind's `{kind}_fields`, `{kind}_patch` and `{kind}_entity` schemas, from `crdt-schema`.
pub fn entity_schemas() -> Schemas {
    let mut out = Vec::new();
    for k in Kind::ALL {
        let n = k.as_str();
        out.push((format!("{n}_fields"), fields_schema(k, false).into()));
        out.push((format!("{n}_patch"), fields_schema(k, true).into()));
        out.push((format!("{n}_entity"), entity_schema(k).into()));
    }
    out.push(("EntityName".into(), EntityName::schema()));
    out.push(("Kind".into(), KindName::schema()));
    out
}

/// Every error answer: `{"error": {"code", "message", "field"?, "kind"?}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code (`invalid`, `not_found`, `unauthorized`, `forbidden`, ...).
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The field of the request that is wrong, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The entity kind concerned, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// The answers every route may get from the layers in front of the handlers (`authorize`,
/// `hygiene`, the body limit, the deadline, the recovery gate) or from any handler (500):
/// (status, component name, description). A 401 carries `WWW-Authenticate`.
const LAYER_RESPONSES: &[(&str, &str, &str)] = &[
    (
        "401",
        "Unauthorized",
        "missing, malformed, expired or revoked credentials (`unauthorized`); the answer carries `WWW-Authenticate: Bearer`",
    ),
    (
        "403",
        "Forbidden",
        "the caller's role does not allow this (`forbidden`), or the request came from a browser page of another origin (`cross_origin`)",
    ),
    (
        "408",
        "RequestTimeout",
        "the request (its body read, its answer made) took longer than the deadline (`request_timeout`)",
    ),
    (
        "413",
        "PayloadTooLarge",
        "the body is larger than the API's limit (answered as text by the body limit, or as the error shape, `bad_body`)",
    ),
    (
        "415",
        "UnsupportedMediaType",
        "a body or Content-Type that is not application/json (`unsupported_media_type`)",
    ),
    (
        "421",
        "Misdirected",
        "the Host named is not one of this node's names (`misdirected`)",
    ),
    (
        "500",
        "Internal",
        "an internal error (`internal`)",
    ),
    (
        "503",
        "Unavailable",
        "the node is recovering its store (`recovering`), shutting down (`shutting_down`), or a damaged index row is being rebuilt (`row_damaged`); retry",
    ),
];

fn error_response(status: &str, description: &str) -> Response {
    let mut r = ResponseBuilder::new().description(description).content(
        "application/json",
        Content::new(Some(schema_ref("ErrorBody"))),
    );
    if status == "413" {
        r = r.content("text/plain", Content::new(Some(String::schema())));
    }
    let www_authenticate = status == "401";
    if www_authenticate {
        r = r.header(
            "WWW-Authenticate",
            utoipa::openapi::HeaderBuilder::new()
                .schema(String::schema())
                .description(Some("`Bearer realm=\"peerconf\"`"))
                .build(),
        );
    }
    r.build()
}

/// Each operation of the document, with its method and path.
pub fn operations(doc: &OpenApi) -> Vec<(HttpMethod, &str, &Operation)> {
    let mut out = Vec::new();
    for (path, item) in &doc.paths.paths {
        for (m, op) in [
            (HttpMethod::Get, &item.get),
            (HttpMethod::Put, &item.put),
            (HttpMethod::Post, &item.post),
            (HttpMethod::Delete, &item.delete),
            (HttpMethod::Patch, &item.patch),
            (HttpMethod::Head, &item.head),
            (HttpMethod::Options, &item.options),
            (HttpMethod::Trace, &item.trace),
        ] {
            if let Some(op) = op {
                out.push((m, path.as_str(), op));
            }
        }
    }
    out
}

pub fn method_str(m: &HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => "GET",
        HttpMethod::Put => "PUT",
        HttpMethod::Post => "POST",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Patch => "PATCH",
        HttpMethod::Head => "HEAD",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Trace => "TRACE",
    }
}

/// Completes the document of the route table: info, the bearer scheme (global, and none on the
/// routes the `authorize` layer lets through), the layers' answers on every operation.
pub fn finish(mut doc: OpenApi, is_public: fn(&str, &str) -> bool) -> OpenApi {
    doc.info.title = "peerconf admin API".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(
        "The admin HTTP API of a peerconf node. Every route but the public ones needs \
         `Authorization: Bearer TOKEN` (a session from `POST /v1/login`, or an API token from \
         `POST /v1/api-tokens`). Errors answer `{\"error\": {\"code\", \"message\", \"field\"?, \
         \"kind\"?}}`."
            .into(),
    );
    doc.info.license = Some(utoipa::openapi::License::new("Apache-2.0"));
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        BEARER.into(),
        SecurityScheme::Http(
            utoipa::openapi::security::HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "a session token (`pcs_...`, from POST /v1/login) or an API token (`pcat_...`, from POST /v1/api-tokens)",
                ))
                .build(),
        ),
    );
    for (status, name, description) in LAYER_RESPONSES {
        components.responses.insert(
            (*name).into(),
            RefOr::T(error_response(status, description)),
        );
    }
    doc.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    for (path, item) in doc.paths.paths.iter_mut() {
        for (m, op) in [
            (HttpMethod::Get, &mut item.get),
            (HttpMethod::Put, &mut item.put),
            (HttpMethod::Post, &mut item.post),
            (HttpMethod::Delete, &mut item.delete),
            (HttpMethod::Patch, &mut item.patch),
        ] {
            let Some(op) = op else { continue };
            let public = is_public(method_str(&m), path);
            if public {
                op.security = Some(Vec::new());
            }
            for (status, name, _) in LAYER_RESPONSES {
                let applies = match *status {
                    "401" => !public,
                    "413" => op.request_body.is_some(),
                    "503" => path != "/livez",
                    _ => true,
                };
                if applies {
                    op.responses
                        .responses
                        .entry((*status).into())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
                }
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::api::{
        api_routes, is_public, openapi_document as document, openapi_json as document_json,
    };

    fn doc_json() -> Value {
        serde_json::from_str(document_json()).expect("the document is JSON")
    }

    /// Every `$ref` of the document, with where it points.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// The document is OpenAPI 3.1 (it reads back as one), names the crate's version, and
    /// every reference in it resolves.
    #[test]
    fn the_document_is_openapi_3_1_and_its_references_resolve() {
        if let Ok(p) = std::env::var("PEERCONF_OPENAPI_DUMP") {
            std::fs::write(p, document_json()).expect("dump");
        }
        let v = doc_json();
        assert_eq!(v["openapi"], json!("3.1.0"));
        assert_eq!(v["info"]["version"], json!(env!("CARGO_PKG_VERSION")));
        for (name, schema) in v["components"]["schemas"].as_object().expect("schemas") {
            let back: Result<RefOr<Schema>, _> = serde_json::from_value(schema.clone());
            assert!(back.is_ok(), "{name}: {:?} {schema}", back.err());
        }
        let back: OpenApi = serde_json::from_str(document_json()).expect("reads as OpenAPI");
        assert_eq!(back.paths.paths.len(), document().paths.paths.len());
        let mut all = Vec::new();
        refs(&v, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r.strip_prefix('#').expect("a local reference");
            assert!(v.pointer(pointer).is_some(), "{r} does not resolve");
        }
        assert_eq!(
            v["components"]["securitySchemes"][BEARER],
            json!({"type": "http", "scheme": "bearer", "description": v["components"]["securitySchemes"][BEARER]["description"]})
        );
        assert_eq!(v["security"], json!([{ BEARER: [] }]));
    }

    /// The document's operations are exactly the route table's (the table the router is made
    /// of), and each has a summary, a 2xx answer and, unless the `authorize` layer lets it
    /// through without credentials, a 401 answer; the public ones say `security: []`.
    #[test]
    fn every_route_is_described() {
        let table = api_routes().into_openapi();
        let from_table: Vec<(String, String)> = operations(&table)
            .into_iter()
            .map(|(m, p, _)| (method_str(&m).to_string(), p.to_string()))
            .collect();
        let doc = document();
        let ops = operations(&doc);
        let described: Vec<(String, String)> = ops
            .iter()
            .map(|(m, p, _)| (method_str(m).to_string(), p.to_string()))
            .collect();
        assert_eq!(described, from_table);
        assert!(described.len() >= 28, "{described:?}");
        let mut public = Vec::new();
        for (m, path, op) in ops {
            let what = format!("{} {path}", method_str(&m));
            assert!(
                op.summary.as_deref().is_some_and(|s| !s.is_empty())
                    || op.description.as_deref().is_some_and(|s| !s.is_empty()),
                "{what} has no summary"
            );
            let statuses: Vec<&String> = op.responses.responses.keys().collect();
            assert!(
                statuses.iter().any(|s| s.starts_with('2')),
                "{what}: {statuses:?}"
            );
            let is_public = is_public(method_str(&m), path);
            if is_public {
                public.push(what.clone());
                assert_eq!(op.security.as_deref().map(<[_]>::len), Some(0), "{what}");
            } else {
                assert!(statuses.iter().any(|s| *s == "401"), "{what}: {statuses:?}");
                assert!(op.security.is_none(), "{what}: the global scheme applies");
            }
            for p in path.split('/').filter(|s| s.starts_with('{')) {
                let name = p.trim_matches(['{', '}']);
                let params = op.parameters.as_deref().unwrap_or_default();
                assert!(
                    params.iter().any(|q| q.name == name),
                    "{what}: parameter {name} is not described"
                );
            }
        }
        public.sort();
        assert_eq!(
            public,
            [
                "GET /",
                "GET /livez",
                "GET /readyz",
                "GET /ui/",
                "GET /ui/assets/{file}",
                "POST /ui/login",
                "POST /v1/login"
            ]
        );
        let v = doc_json();
        let login = &v["paths"]["/v1/login"]["post"];
        assert_eq!(login["security"], json!([]));
        assert!(login["responses"]["429"]["headers"]["Retry-After"].is_object());
    }

    /// Each kind's fields schema lists exactly its fields, with their bounds, formats, enums,
    /// defaults and whether they are required; secrets are write-only, derived fields
    /// read-only; the entity schemas are discriminated by `kind`.
    #[test]
    fn entity_schemas_follow_crdt_schema() {
        let v = doc_json();
        let schemas = &v["components"]["schemas"];
        for k in Kind::ALL {
            let n = k.as_str();
            let fields = &schemas[format!("{n}_fields")];
            let props = fields["properties"].as_object().expect("properties");
            let names: Vec<&str> = props.keys().map(String::as_str).collect();
            let mut want: Vec<&str> = k.fields().iter().map(|f| f.name).collect();
            want.sort();
            let mut got = names.clone();
            got.sort();
            assert_eq!(got, want, "{n}");
            assert_eq!(fields["additionalProperties"], json!(false), "{n}");
            let mut required: Vec<&str> = k
                .fields()
                .iter()
                .filter(|f| f.required)
                .map(|f| f.name)
                .collect();
            required.sort();
            let mut got_required: Vec<&str> = fields["required"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            got_required.sort();
            assert_eq!(got_required, required, "{n}");
            for f in k.fields() {
                let p = &props[f.name];
                let what = format!("{n}.{}", f.name);
                assert_eq!(p["writeOnly"].as_bool(), f.secret.then_some(true), "{what}");
                assert_eq!(
                    p["readOnly"].as_bool(),
                    f.read_only.then_some(true),
                    "{what}"
                );
                assert_eq!(
                    p["description"].as_str().map(|d| d.starts_with(f.doc)),
                    Some(true),
                    "{what}"
                );
                assert_eq!(p.get("default").cloned(), f.default.to_json(), "{what}");
                match f.ty {
                    Type::Int { min, max } => {
                        assert_eq!(
                            (p["minimum"].as_i64(), p["maximum"].as_i64()),
                            (Some(min), Some(max)),
                            "{what}"
                        );
                    }
                    Type::Str { max_len, format } => {
                        assert_eq!(p["maxLength"].as_u64(), Some(max_len as u64), "{what}");
                        assert_eq!(p["format"].as_str(), Some(format.as_str()), "{what}");
                    }
                    Type::Enum(vals) => assert_eq!(p["enum"], json!(vals), "{what}"),
                    Type::Ref(r) => {
                        assert!(
                            p["description"]
                                .as_str()
                                .unwrap_or_default()
                                .contains(&format!("`{}`", r.as_str())),
                            "{what}"
                        );
                    }
                    Type::Set { max_items, .. } => {
                        assert_eq!(p["type"], json!("array"), "{what}");
                        assert_eq!(p["uniqueItems"], json!(true), "{what}");
                        assert_eq!(p["maxItems"].as_u64(), Some(max_items as u64), "{what}");
                    }
                    Type::Bool => assert_eq!(p["type"], json!("boolean"), "{what}"),
                    Type::Text { max_len } => {
                        assert_eq!(p["maxLength"].as_u64(), Some(max_len as u64), "{what}")
                    }
                }
                let patch = &schemas[format!("{n}_patch")]["properties"][f.name];
                assert!(
                    patch["type"]
                        .as_array()
                        .is_some_and(|t| t.contains(&json!("null"))),
                    "{what} patch: {patch}"
                );
            }
            assert!(
                schemas[format!("{n}_patch")].get("required").is_none(),
                "{n}"
            );
            let entity = &schemas[format!("{n}_entity")];
            assert_eq!(entity["properties"]["kind"]["enum"], json!([n]));
            let secrets: Vec<&str> = k
                .fields()
                .iter()
                .filter(|f| f.secret)
                .map(|f| f.name)
                .collect();
            if secrets.is_empty() {
                assert!(entity["properties"].get("secrets_set").is_none(), "{n}");
            } else {
                assert_eq!(
                    entity["properties"]["secrets_set"]["items"]["enum"],
                    json!(secrets),
                    "{n}"
                );
            }
        }
        let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(schemas["Kind"]["enum"], json!(kinds));
        assert_eq!(
            schemas["EntityName"]["maxLength"],
            json!(crdt_schema::NAME_LEN_MAX)
        );
        assert_eq!(schemas["EntityName"]["minLength"], json!(1));
        assert_eq!(
            schemas["Entity"]["discriminator"]["propertyName"],
            json!("kind")
        );
        assert_eq!(
            schemas["EntityPut"]["oneOf"].as_array().map(Vec::len),
            Some(Kind::ALL.len())
        );
    }

    /// Routes are registered in one place only, with `routes!` (so each has a description):
    /// no admin source outside the tests adds a route another way.
    #[test]
    fn routes_are_registered_only_through_the_route_table() {
        let sources = [
            ("api.rs", include_str!("api.rs")),
            ("auth.rs", include_str!("auth.rs")),
            ("daemon.rs", include_str!("daemon.rs")),
            ("metrics.rs", include_str!("metrics.rs")),
            ("openapi.rs", include_str!("openapi.rs")),
        ];
        let forbidden = [
            ".route(",
            ".route_service(",
            ".nest(",
            ".nest_service(",
            ".merge(",
            "routing::",
        ];
        for (file, text) in sources {
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for f in forbidden {
                    assert!(
                        !line.contains(f),
                        "{file}:{}: a route registered outside `api_routes` (use routes! with #[utoipa::path]): {line}",
                        n + 1
                    );
                }
            }
        }
        let api = include_str!("api.rs");
        assert_eq!(api.matches("OpenApiRouter::new()").count(), 1);
    }
}
