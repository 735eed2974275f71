//! The field table of every kind: type, merge semantics, default, constraints, secrecy and
//! references. Adding a field here is all it takes to store, validate, replicate and serve it.

use crate::Kind;
use serde_json::{json, Value};

/// How concurrent writes to a field merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// One value; concurrent writes are resolved by (Lamport counter, actor) and reported as
    /// conflicts.
    Register,
    /// A set stored as a map of `item -> true`: concurrent adds and removes of different items all
    /// apply, and an add concurrent with a remove of the same item wins.
    AddWinsSet,
    /// Automerge text: a replaced value is applied as the minimal edit, so concurrent edits of
    /// different parts survive.
    Text,
}

impl Merge {
    pub fn as_str(self) -> &'static str {
        match self {
            Merge::Register => "register",
            Merge::AddWinsSet => "add-wins-set",
            Merge::Text => "text",
        }
    }
}

/// Syntactic rules for strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Any text without control characters other than tab and newline.
    Any,
    /// An absolute path (`/srv/x` or `C:\x`).
    AbsPath,
    /// `local@domain`.
    Email,
    /// An IPv4 or IPv6 address with an optional `/prefix`; stored in canonical form.
    Cidr,
    /// `address:port` with port 1..=65535 (`[::1]:22` for IPv6).
    Binding,
    /// An OpenSSH public key line: `type base64 [comment]`.
    SshKey,
    /// A PEM `CERTIFICATE` that parses as X.509.
    CertPem,
    /// A PEM private key (`... PRIVATE KEY`).
    KeyPem,
    /// A password in clear text; stored only as an argon2 hash.
    Password,
    /// `[A-Za-z0-9_.+-]+`, for cipher suite names and the like.
    Token,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Any => "text",
            Format::AbsPath => "absolute-path",
            Format::Email => "email",
            Format::Cidr => "cidr",
            Format::Binding => "address:port",
            Format::SshKey => "ssh-public-key",
            Format::CertPem => "pem-certificate",
            Format::KeyPem => "pem-private-key",
            Format::Password => "password",
            Format::Token => "token",
        }
    }
}

/// The item type of a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Enum(&'static [&'static str]),
    Str { max_len: usize, format: Format },
    Ref(Kind),
}

/// The value type of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Bool,
    Int {
        min: i64,
        max: i64,
    },
    Str {
        max_len: usize,
        format: Format,
    },
    Enum(&'static [&'static str]),
    /// The name of an entity of another kind, which must exist when written.
    Ref(Kind),
    Set {
        item: Item,
        max_items: usize,
    },
    Text {
        max_len: usize,
    },
}

/// A field's value when it was never written (or was reset with `null`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    /// Absent: reads omit the field.
    None,
    Bool(bool),
    Int(i64),
    Str(&'static str),
    EmptySet,
    EmptyText,
}

impl Default {
    pub fn to_json(self) -> Option<Value> {
        match self {
            Default::None => None,
            Default::Bool(b) => Some(json!(b)),
            Default::Int(i) => Some(json!(i)),
            Default::Str(s) => Some(json!(s)),
            Default::EmptySet => Some(json!([])),
            Default::EmptyText => Some(json!("")),
        }
    }
}

/// One field of a kind.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: &'static str,
    pub ty: Type,
    pub merge: Merge,
    pub default: Default,
    /// Must be given when the entity is created.
    pub required: bool,
    /// Write-only: never returned by any read path, never logged.
    pub secret: bool,
    /// Derived from other fields at read time; writes to it are refused.
    pub read_only: bool,
    pub doc: &'static str,
}

impl Field {
    /// The entity kind this field refers to, if any.
    pub fn references(&self) -> Option<Kind> {
        match self.ty {
            Type::Ref(k) => Some(k),
            Type::Set {
                item: Item::Ref(k), ..
            } => Some(k),
            _ => None,
        }
    }

    /// The field's name in words, for forms: `home_dir` is "Home directory",
    /// `heartbeat_interval_ms` "Heartbeat interval (ms)".
    pub fn label(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        let parts: Vec<&str> = self.name.split('_').collect();
        for (i, w) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let word = match *w {
                "dir" => "directory",
                "ip" => "IP",
                "ips" => "IPs",
                "ipc" => "IPC",
                "tls" => "TLS",
                "ssh" => "SSH",
                "id" => "ID",
                "pem" => "(PEM)",
                "max" => "maximum",
                "min" => "minimum",
                "ms" if last => "(ms)",
                "s" if last => "(seconds)",
                "at" if !last && parts.get(i + 1) == Some(&"ms") => "at",
                other => other,
            };
            words.push(word.to_string());
        }
        let mut out = words.join(" ");
        if let Some(first) = out.get(..1) {
            out = first.to_uppercase() + &out[1..];
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let mut o = serde_json::Map::new();
        o.insert("name".into(), json!(self.name));
        o.insert("label".into(), json!(self.label()));
        let (ty, extra) = type_json(self.ty);
        o.insert("type".into(), json!(ty));
        for (k, v) in extra {
            o.insert(k.into(), v);
        }
        o.insert("merge".into(), json!(self.merge.as_str()));
        if let Some(d) = self.default.to_json() {
            o.insert("default".into(), d);
        }
        o.insert("required".into(), json!(self.required));
        o.insert("secret".into(), json!(self.secret));
        o.insert("read_only".into(), json!(self.read_only));
        if let Some(k) = self.references() {
            o.insert("references".into(), json!(k.as_str()));
        }
        o.insert("doc".into(), json!(self.doc));
        Value::Object(o)
    }
}

fn type_json(ty: Type) -> (&'static str, Vec<(&'static str, Value)>) {
    match ty {
        Type::Bool => ("bool", vec![]),
        Type::Int { min, max } => ("int", vec![("min", json!(min)), ("max", json!(max))]),
        Type::Str { max_len, format } => (
            "string",
            vec![
                ("max_len", json!(max_len)),
                ("format", json!(format.as_str())),
            ],
        ),
        Type::Enum(vals) => ("enum", vec![("values", json!(vals))]),
        Type::Ref(k) => ("ref", vec![("kind", json!(k.as_str()))]),
        Type::Set { item, max_items } => {
            let item_json = match item {
                Item::Enum(vals) => json!({"type": "enum", "values": vals}),
                Item::Str { max_len, format } => {
                    json!({"type": "string", "max_len": max_len, "format": format.as_str()})
                }
                Item::Ref(k) => json!({"type": "ref", "kind": k.as_str()}),
            };
            (
                "set",
                vec![("item", item_json), ("max_items", json!(max_items))],
            )
        }
        Type::Text { max_len } => ("text", vec![("max_len", json!(max_len))]),
    }
}

// Limits, each with its reason.
/// Free-form descriptions: a paragraph, not a document.
const DESC_LEN_MAX: usize = 1024;
/// Linux PATH_MAX.
const PATH_LEN_MAX: usize = 4096;
/// RFC 5321 path limit.
const EMAIL_LEN_MAX: usize = 254;
/// Passwords longer than this are a denial-of-service vector for the hash.
const PASSWORD_LEN_MAX: usize = 1024;
/// An RSA-16384 OpenSSH key line is about 2.8 KB.
const SSH_KEY_LEN_MAX: usize = 16 * 1024;
/// A certificate chain of a few certificates.
const PEM_LEN_MAX: usize = 64 * 1024;
/// Scripts are configuration, not programs of megabytes; documents stay small to sync fast.
const SCRIPT_LEN_MAX: usize = 1024 * 1024;
/// Items in one set field: keeps a document, and one sync message, bounded.
const SET_ITEMS_MAX: usize = 4096;

const PROTOCOLS: &[&str] = &["sftp", "ftp", "ftps", "https"];
const PERMISSIONS: &[&str] = &["read", "write", "delete", "list", "rename", "mkdir"];
const ROLES: &[&str] = &["admin", "superadmin"];
const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];
const TLS_VERSIONS: &[&str] = &["1.2", "1.3"];
const LANGUAGES: &[&str] = &["javascript", "typescript", "lua", "python", "shell"];
const EVENTS: &[&str] = &[
    "after_login",
    "after_logout",
    "before_upload",
    "after_upload",
    "after_download",
    "after_delete",
    "after_rename",
    "after_mkdir",
    "on_schedule",
];

const fn f(name: &'static str, ty: Type, default: Default, doc: &'static str) -> Field {
    let merge = match ty {
        Type::Set { .. } => Merge::AddWinsSet,
        Type::Text { .. } => Merge::Text,
        _ => Merge::Register,
    };
    Field {
        name,
        ty,
        merge,
        default,
        required: false,
        secret: false,
        read_only: false,
        doc,
    }
}

const fn required(mut field: Field) -> Field {
    field.required = true;
    field
}

const fn secret(mut field: Field) -> Field {
    field.secret = true;
    field
}

const fn derived(mut field: Field) -> Field {
    field.read_only = true;
    field
}

const fn s(max_len: usize, format: Format) -> Type {
    Type::Str { max_len, format }
}

const fn set(item: Item) -> Type {
    Type::Set {
        item,
        max_items: SET_ITEMS_MAX,
    }
}

const fn int(min: i64, max: i64) -> Type {
    Type::Int { min, max }
}

const DESCRIPTION: Field = f(
    "description",
    s(DESC_LEN_MAX, Format::Any),
    Default::Str(""),
    "free text for operators",
);

static SITE: &[Field] = &[
    f(
        "enabled",
        Type::Bool,
        Default::Bool(true),
        "whether the site accepts clients",
    ),
    f(
        "protocols",
        set(Item::Enum(PROTOCOLS)),
        Default::EmptySet,
        "protocols served",
    ),
    f(
        "bindings",
        set(Item::Str {
            max_len: 300,
            format: Format::Binding,
        }),
        Default::EmptySet,
        "address:port pairs the site listens on",
    ),
    f(
        "root_dir",
        s(PATH_LEN_MAX, Format::AbsPath),
        Default::None,
        "root directory of the site's file storage",
    ),
    f(
        "max_sessions",
        int(0, 1_000_000),
        Default::Int(0),
        "concurrent client sessions; 0 means unlimited",
    ),
    f(
        "idle_timeout_s",
        int(0, 86_400),
        Default::Int(300),
        "idle client sessions are closed after this many seconds; 0 disables",
    ),
    f(
        "certificate",
        Type::Ref(Kind::Certificate),
        Default::None,
        "certificate presented for ftps and https",
    ),
    DESCRIPTION,
];

static USER: &[Field] = &[
    f(
        "enabled",
        Type::Bool,
        Default::Bool(true),
        "whether the user may log in",
    ),
    secret(f(
        "password",
        s(PASSWORD_LEN_MAX, Format::Password),
        Default::None,
        "write-only; stored as an argon2 hash",
    )),
    f(
        "public_keys",
        set(Item::Str {
            max_len: SSH_KEY_LEN_MAX,
            format: Format::SshKey,
        }),
        Default::EmptySet,
        "OpenSSH public keys accepted for SFTP",
    ),
    f(
        "home_dir",
        s(PATH_LEN_MAX, Format::AbsPath),
        Default::None,
        "home directory",
    ),
    f(
        "site",
        Type::Ref(Kind::Site),
        Default::None,
        "the virtual site the user belongs to",
    ),
    f(
        "groups",
        set(Item::Ref(Kind::Group)),
        Default::EmptySet,
        "groups the user is a member of",
    ),
    f(
        "permissions",
        set(Item::Enum(PERMISSIONS)),
        Default::EmptySet,
        "file operations allowed, added to those of the user's groups",
    ),
    f(
        "allowed_ips",
        set(Item::Str {
            max_len: 64,
            format: Format::Cidr,
        }),
        Default::EmptySet,
        "client addresses allowed to log in as this user; empty allows all",
    ),
    f(
        "quota_bytes",
        int(0, i64::MAX),
        Default::Int(0),
        "storage quota in bytes; 0 means unlimited",
    ),
    f(
        "max_sessions",
        int(0, 10_000),
        Default::Int(0),
        "concurrent sessions of this user; 0 means unlimited",
    ),
    f(
        "email",
        s(EMAIL_LEN_MAX, Format::Email),
        Default::None,
        "contact address",
    ),
    DESCRIPTION,
];

static GROUP: &[Field] = &[
    DESCRIPTION,
    f(
        "permissions",
        set(Item::Enum(PERMISSIONS)),
        Default::EmptySet,
        "file operations allowed to members",
    ),
    f(
        "home_dir",
        s(PATH_LEN_MAX, Format::AbsPath),
        Default::None,
        "home directory of members without their own",
    ),
    f(
        "allowed_ips",
        set(Item::Str {
            max_len: 64,
            format: Format::Cidr,
        }),
        Default::EmptySet,
        "client addresses members may log in from; empty allows all",
    ),
];

static ADMIN: &[Field] = &[
    f(
        "role",
        Type::Enum(ROLES),
        Default::Str("admin"),
        "admin or superadmin",
    ),
    secret(f(
        "password",
        s(PASSWORD_LEN_MAX, Format::Password),
        Default::None,
        "write-only; stored as an argon2 hash",
    )),
    f(
        "enabled",
        Type::Bool,
        Default::Bool(true),
        "whether the account may log in",
    ),
    f(
        "email",
        s(EMAIL_LEN_MAX, Format::Email),
        Default::None,
        "contact address",
    ),
];

static SETTINGS: &[Field] = &[
    f(
        "heartbeat_interval_ms",
        int(50, 60_000),
        Default::Int(1000),
        "how often each node sends a heartbeat to each peer",
    ),
    f(
        "offline_timeout_ms",
        int(200, 600_000),
        Default::Int(5000),
        "a peer silent this long is marked offline; must exceed two heartbeat intervals",
    ),
    f(
        "clock_drift_warn_ms",
        int(1, 3_600_000),
        Default::Int(1000),
        "clock offset to a peer above which a warning is raised",
    ),
    f(
        "join_clock_offset_max_ms",
        int(1, 86_400_000),
        Default::Int(60_000),
        "a node whose clock is further off than this is refused at join",
    ),
    f(
        "replication_interval_ms",
        int(100, 3_600_000),
        Default::Int(10_000),
        "period of the replication cycle that repairs missed changes",
    ),
    f(
        "banner",
        s(4096, Format::Any),
        Default::Str(""),
        "greeting shown to clients at login",
    ),
    f(
        "session_timeout_s",
        int(1, 86_400),
        Default::Int(600),
        "idle client sessions end after this many seconds",
    ),
    f(
        "log_level",
        Type::Enum(LOG_LEVELS),
        Default::Str("info"),
        "verbosity of server logs",
    ),
    f(
        "max_connections_per_ip",
        int(0, 100_000),
        Default::Int(0),
        "concurrent client connections from one address; 0 means unlimited",
    ),
];

static CERTIFICATE: &[Field] = &[
    required(f(
        "cert_pem",
        s(PEM_LEN_MAX, Format::CertPem),
        Default::None,
        "the certificate (chain) in PEM",
    )),
    required(secret(f(
        "key_pem",
        s(PEM_LEN_MAX, Format::KeyPem),
        Default::None,
        "write-only; the private key in PEM",
    ))),
    DESCRIPTION,
    derived(f(
        "subject",
        s(4096, Format::Any),
        Default::None,
        "subject of the certificate (derived)",
    )),
    derived(f(
        "not_after",
        s(64, Format::Any),
        Default::None,
        "end of validity, RFC 3339 (derived)",
    )),
    derived(f(
        "fingerprint",
        s(128, Format::Any),
        Default::None,
        "SHA-256 of the DER certificate, hex (derived)",
    )),
];

static SECURITY: &[Field] = &[
    f(
        "min_tls_version",
        Type::Enum(TLS_VERSIONS),
        Default::Str("1.2"),
        "oldest TLS version accepted from clients",
    ),
    f(
        "allowed_ciphers",
        set(Item::Str {
            max_len: 128,
            format: Format::Token,
        }),
        Default::EmptySet,
        "cipher suites allowed; empty means the library defaults",
    ),
    f(
        "password_min_length",
        int(1, 1024),
        Default::Int(8),
        "shortest password accepted for users and admins",
    ),
    f(
        "max_login_attempts",
        int(0, 1000),
        Default::Int(5),
        "failed logins before a lockout; 0 disables lockouts",
    ),
    f(
        "lockout_duration_s",
        int(0, 86_400 * 30),
        Default::Int(900),
        "how long a locked-out client waits",
    ),
    f(
        "session_idle_timeout_s",
        int(60, 86_400 * 30),
        Default::Int(1_800),
        "an admin login session ends after this long without a request",
    ),
    f(
        "session_max_life_s",
        int(60, 86_400 * 365),
        Default::Int(43_200),
        "an admin login session ends this long after the login, used or not",
    ),
    f(
        "ip_blocklist",
        set(Item::Str {
            max_len: 64,
            format: Format::Cidr,
        }),
        Default::EmptySet,
        "client addresses always refused",
    ),
];

static SCRIPT: &[Field] = &[
    f(
        "language",
        Type::Enum(LANGUAGES),
        Default::Str("javascript"),
        "language the source is written in",
    ),
    f(
        "source",
        Type::Text {
            max_len: SCRIPT_LEN_MAX,
        },
        Default::EmptyText,
        "the program; concurrent edits of different lines merge",
    ),
    DESCRIPTION,
];

static RULE: &[Field] = &[
    required(f(
        "event",
        Type::Enum(EVENTS),
        Default::None,
        "the event that triggers the rule",
    )),
    f(
        "condition",
        s(4096, Format::Any),
        Default::Str(""),
        "expression that must hold for the script to run; empty always holds",
    ),
    required(f(
        "script",
        Type::Ref(Kind::Script),
        Default::None,
        "the script to run",
    )),
    f(
        "enabled",
        Type::Bool,
        Default::Bool(true),
        "whether the rule fires",
    ),
    f(
        "priority",
        int(-1000, 1000),
        Default::Int(0),
        "rules of one event run in ascending priority",
    ),
    DESCRIPTION,
];

static API_TOKEN: &[Field] = &[
    required(f(
        "admin",
        Type::Ref(Kind::Admin),
        Default::None,
        "the admin account the token acts as",
    )),
    secret(required(f(
        "token_hash",
        s(64, Format::Token),
        Default::None,
        "write-only; SHA-256 of the token's secret, hex",
    ))),
    required(f(
        "expires_at_ms",
        int(0, i64::MAX),
        Default::None,
        "end of validity, milliseconds since the Unix epoch",
    )),
    f(
        "label",
        s(DESC_LEN_MAX, Format::Any),
        Default::Str(""),
        "what the token is for",
    ),
    f(
        "created_at_ms",
        int(0, i64::MAX),
        Default::Int(0),
        "when the token was made, milliseconds since the Unix epoch",
    ),
];

pub(crate) fn fields_of(kind: Kind) -> &'static [Field] {
    match kind {
        Kind::Site => SITE,
        Kind::User => USER,
        Kind::Group => GROUP,
        Kind::Admin => ADMIN,
        Kind::Settings => SETTINGS,
        Kind::Certificate => CERTIFICATE,
        Kind::Security => SECURITY,
        Kind::Script => SCRIPT,
        Kind::Rule => RULE,
        Kind::ApiToken => API_TOKEN,
    }
}

#[cfg(test)]
mod label_tests {
    use crate::Kind;

    #[test]
    fn labels_are_words() {
        let label = |k: Kind, f: &str| k.field(f).expect(f).label();
        assert_eq!(label(Kind::Group, "home_dir"), "Home directory");
        assert_eq!(label(Kind::Group, "allowed_ips"), "Allowed IPs");
        assert_eq!(
            label(Kind::Settings, "heartbeat_interval_ms"),
            "Heartbeat interval (ms)"
        );
        assert_eq!(
            label(Kind::Security, "lockout_duration_s"),
            "Lockout duration (seconds)"
        );
        assert_eq!(label(Kind::Group, "description"), "Description");
        for k in Kind::ALL {
            for f in k.fields() {
                let l = f.label();
                assert!(!l.is_empty() && !l.contains('_'), "{k}.{}: {l}", f.name);
            }
        }
    }
}
