//! Schema validation of every kind: one valid body and several invalid ones each, every error
//! naming the field and the rule.

use crdt_schema::{
    check_entity, validate_name, validate_write, FieldValue, Kind, SchemaError, WriteMode,
};
use serde_json::{json, Value};

const CERT: &str = include_str!("fixtures/cert.pem");
const KEY: &str = include_str!("fixtures/key.pem");

fn valid(kind: Kind) -> Value {
    match kind {
        Kind::Site => {
            json!({"enabled": true, "protocols": ["sftp", "ftps"], "bindings": ["0.0.0.0:2222", "[::]:990"],
            "root_dir": "/srv/site", "max_sessions": 100, "description": "main"})
        }
        Kind::User => {
            json!({"enabled": true, "password": "correct horse", "public_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvM alice@host"],
            "home_dir": "/home/alice", "site": "s1", "groups": ["g1"], "permissions": ["read", "list"],
            "allowed_ips": ["10.0.0.0/8", "192.168.1.7"], "quota_bytes": 1000, "email": "alice@example.com"})
        }
        Kind::Group => {
            json!({"description": "staff", "permissions": ["read"], "home_dir": "/srv/staff"})
        }
        Kind::Admin => {
            json!({"role": "superadmin", "password": "s3cret-pw", "enabled": true, "email": "root@example.com"})
        }
        Kind::Settings => {
            json!({"heartbeat_interval_ms": 500, "offline_timeout_ms": 3000, "banner": "hi", "log_level": "debug"})
        }
        Kind::Certificate => json!({"cert_pem": CERT, "key_pem": KEY, "description": "ftps"}),
        Kind::Security => {
            json!({"min_tls_version": "1.3", "allowed_ciphers": ["TLS13_AES_256_GCM_SHA384"],
            "password_min_length": 12, "ip_blocklist": ["203.0.113.0/24"]})
        }
        Kind::Script => json!({"language": "javascript", "source": "log(1)\nlog(2)\n"}),
        Kind::Rule => {
            json!({"event": "after_upload", "condition": "size > 0", "script": "sc1", "enabled": true})
        }
    }
}

#[track_caller]
fn refused(kind: Kind, body: Value, field: &str, words: &str) {
    let err = validate_write(kind, &body, WriteMode::Put, false)
        .expect_err(&format!("{kind} {body} was accepted"));
    let msg = err.to_string();
    assert!(
        msg.contains(field),
        "error {msg:?} does not name field {field}"
    );
    assert!(msg.contains(words), "error {msg:?} does not say {words:?}");
    assert!(
        msg.starts_with(kind.as_str()),
        "error {msg:?} does not name the kind first"
    );
}

#[test]
fn every_kind_accepts_a_valid_entity() {
    for kind in Kind::ALL {
        let v = validate_write(kind, &valid(kind), WriteMode::Put, false)
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert!(!v.is_empty(), "{kind}");
    }
}

#[test]
fn canonicalizes_sets() {
    let v = validate_write(Kind::User, &valid(Kind::User), WriteMode::Put, false).unwrap();
    let ips = v.iter().find(|(f, _)| f.name == "allowed_ips").unwrap();
    assert_eq!(
        ips.1,
        FieldValue::Set(["10.0.0.0/8".to_string(), "192.168.1.7/32".to_string()].into())
    );
    let pw = v.iter().find(|(f, _)| f.name == "password").unwrap();
    assert!(matches!(pw.1, FieldValue::Secret(_)));
}

#[test]
fn site_rules() {
    refused(
        Kind::Site,
        json!({"protocols": ["gopher"]}),
        "protocols",
        "one of",
    );
    refused(
        Kind::Site,
        json!({"bindings": ["0.0.0.0"]}),
        "bindings",
        "address:port",
    );
    refused(
        Kind::Site,
        json!({"bindings": ["0.0.0.0:70000"]}),
        "bindings",
        "port",
    );
    refused(
        Kind::Site,
        json!({"root_dir": "relative/dir"}),
        "root_dir",
        "absolute",
    );
    refused(
        Kind::Site,
        json!({"root_dir": "/srv/../etc"}),
        "root_dir",
        "..",
    );
    refused(
        Kind::Site,
        json!({"max_sessions": -1}),
        "max_sessions",
        "between",
    );
    refused(
        Kind::Site,
        json!({"enabled": "yes"}),
        "enabled",
        "wrong type",
    );
    refused(
        Kind::Site,
        json!({"description": "x".repeat(2000)}),
        "description",
        "at most",
    );
}

#[test]
fn user_rules() {
    refused(
        Kind::User,
        json!({"quota_bytes": "lots"}),
        "quota_bytes",
        "wrong type",
    );
    refused(
        Kind::User,
        json!({"quota_bytes": -5}),
        "quota_bytes",
        ">= 0",
    );
    refused(
        Kind::User,
        json!({"quota_bytes": 1.5}),
        "quota_bytes",
        "wrong type",
    );
    refused(
        Kind::User,
        json!({"permissions": ["fly"]}),
        "permissions",
        "one of",
    );
    refused(
        Kind::User,
        json!({"permissions": "read"}),
        "permissions",
        "array",
    );
    refused(
        Kind::User,
        json!({"allowed_ips": ["10.0.0.0/40"]}),
        "allowed_ips",
        "CIDR",
    );
    refused(
        Kind::User,
        json!({"public_keys": ["not a key"]}),
        "public_keys",
        "OpenSSH",
    );
    refused(
        Kind::User,
        json!({"site": "bad/name"}),
        "site",
        "not allowed",
    );
    refused(Kind::User, json!({"email": "nobody"}), "email", "email");
    refused(Kind::User, json!({"password": ""}), "password", "empty");
    refused(
        Kind::User,
        json!({"shoe_size": 42}),
        "shoe_size",
        "unknown field",
    );
    refused(
        Kind::User,
        json!({"home_dir": "/a\u{0}b"}),
        "home_dir",
        "control",
    );
}

#[test]
fn group_admin_rules() {
    refused(
        Kind::Group,
        json!({"permissions": ["read", 3]}),
        "permissions",
        "strings",
    );
    refused(Kind::Admin, json!({"role": "god"}), "role", "one of");
    refused(Kind::Admin, json!({"role": 1}), "role", "wrong type");
}

#[test]
fn settings_rules() {
    refused(
        Kind::Settings,
        json!({"heartbeat_interval_ms": 10}),
        "heartbeat_interval_ms",
        "between",
    );
    refused(
        Kind::Settings,
        json!({"log_level": "loud"}),
        "log_level",
        "one of",
    );
    let mut view = serde_json::Map::new();
    view.insert("heartbeat_interval_ms".into(), json!(1000));
    view.insert("offline_timeout_ms".into(), json!(1500));
    let e = check_entity(Kind::Settings, &view).unwrap_err();
    assert!(e.to_string().contains("offline_timeout_ms"), "{e}");
    view.insert("offline_timeout_ms".into(), json!(2000));
    check_entity(Kind::Settings, &view).unwrap();
}

#[test]
fn certificate_rules() {
    refused(
        Kind::Certificate,
        json!({"cert_pem": "junk", "key_pem": KEY}),
        "cert_pem",
        "PEM",
    );
    refused(
        Kind::Certificate,
        json!({"cert_pem": KEY, "key_pem": KEY}),
        "cert_pem",
        "CERTIFICATE",
    );
    refused(
        Kind::Certificate,
        json!({"cert_pem": CERT, "key_pem": "junk"}),
        "key_pem",
        "PRIVATE KEY",
    );
    refused(
        Kind::Certificate,
        json!({"key_pem": KEY}),
        "cert_pem",
        "missing",
    );
    refused(
        Kind::Certificate,
        json!({"cert_pem": CERT, "key_pem": KEY, "subject": "x"}),
        "subject",
        "read-only",
    );
    // A patch naming one of the pair is refused too.
    let e = validate_write(
        Kind::Certificate,
        &json!({"cert_pem": CERT}),
        WriteMode::Patch,
        true,
    )
    .unwrap_err();
    assert!(e.to_string().contains("key_pem"), "{e}");
    // A secret in an error is never echoed.
    let e = validate_write(
        Kind::Certificate,
        &json!({"cert_pem": CERT, "key_pem": "-----BEGIN NOTHING-----\nsecretstuff"}),
        WriteMode::Put,
        false,
    )
    .unwrap_err();
    assert!(!e.to_string().contains("secretstuff"), "{e}");
}

#[test]
fn security_script_rule_rules() {
    refused(
        Kind::Security,
        json!({"min_tls_version": "1.0"}),
        "min_tls_version",
        "one of",
    );
    refused(
        Kind::Security,
        json!({"allowed_ciphers": ["no spaces"]}),
        "allowed_ciphers",
        "letters",
    );
    refused(
        Kind::Security,
        json!({"password_min_length": 0}),
        "password_min_length",
        "between",
    );
    refused(
        Kind::Security,
        json!({"ip_blocklist": ["x"]}),
        "ip_blocklist",
        "CIDR",
    );
    refused(
        Kind::Script,
        json!({"language": "cobol"}),
        "language",
        "one of",
    );
    refused(Kind::Script, json!({"source": 5}), "source", "wrong type");
    refused(Kind::Rule, json!({"script": "sc1"}), "event", "missing");
    refused(
        Kind::Rule,
        json!({"event": "after_upload"}),
        "script",
        "missing",
    );
    refused(
        Kind::Rule,
        json!({"event": "sometimes", "script": "sc1"}),
        "event",
        "one of",
    );
}

#[test]
fn required_fields_survive_put_and_patch_rules() {
    // A patch may not reset a required field.
    let e =
        validate_write(Kind::Rule, &json!({"event": null}), WriteMode::Patch, true).unwrap_err();
    assert!(matches!(e, SchemaError::Missing { .. }), "{e}");
    // A put of an existing certificate without the key keeps the stored key.
    validate_write(
        Kind::Certificate,
        &json!({"cert_pem": CERT}),
        WriteMode::Put,
        true,
    )
    .unwrap_err();
    let v = validate_write(
        Kind::Certificate,
        &json!({"cert_pem": CERT, "key_pem": KEY}),
        WriteMode::Put,
        true,
    )
    .unwrap();
    assert_eq!(v.len(), 3);
}

#[test]
fn bodies_that_are_not_objects() {
    for body in [json!([]), json!("x"), json!(null), json!(1)] {
        let e = validate_write(Kind::User, &body, WriteMode::Put, false).unwrap_err();
        assert!(matches!(e, SchemaError::NotAnObject { .. }), "{e}");
    }
}

#[test]
fn kinds_and_names() {
    assert!(Kind::parse("nosuchkind")
        .unwrap_err()
        .to_string()
        .contains("nosuchkind"));
    for k in Kind::ALL {
        assert_eq!(Kind::parse(k.as_str()).unwrap(), k);
        let id = crdt_schema::doc_id(k, k.singleton().unwrap_or("x1"));
        let (k2, n) = crdt_schema::parse_doc_id(&id).unwrap();
        assert_eq!(k2, k);
        assert!(validate_name(k, n).is_ok());
    }
}

#[test]
fn schema_json_describes_every_field() {
    let s = crdt_schema::schema_json(None);
    assert_eq!(s["version"], json!(crdt_schema::SCHEMA_VERSION));
    let kinds = s["kinds"].as_array().unwrap();
    assert_eq!(kinds.len(), 9);
    for k in kinds {
        for f in k["fields"].as_array().unwrap() {
            for key in [
                "name",
                "type",
                "merge",
                "secret",
                "read_only",
                "required",
                "doc",
            ] {
                assert!(f.get(key).is_some(), "{} lacks {key}", f["name"]);
            }
        }
    }
    let user = &crdt_schema::schema_json(Some(Kind::User))["kinds"][0];
    let pw = user["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "password")
        .unwrap();
    assert_eq!(pw["secret"], json!(true));
    let site = user["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "site")
        .unwrap();
    assert_eq!(site["references"], json!("site"));
}

/// The typed structs of `typed` name exactly the public fields of their kind.
#[test]
fn typed_views_match_the_schema() {
    use crdt_schema::typed::*;
    fn check<T: Entity + Default>() {
        let kind = T::KIND;
        let doc = crdt_schema::doc::genesis(kind);
        let state = crdt_schema::doc::read(&doc, kind, "x").unwrap();
        let mut fields = state.fields.clone();
        // Required fields have no default: give them one so the view parses.
        for f in kind.fields() {
            if f.required && !f.secret {
                fields.entry(f.name.to_string()).or_insert(json!(""));
            }
        }
        let typed: T = serde_json::from_value(Value::Object(fields.clone()))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let back = serde_json::to_value(&typed).unwrap();
        let public: Vec<&str> = kind
            .fields()
            .iter()
            .filter(|f| !f.secret && !f.read_only)
            .map(|f| f.name)
            .collect();
        for key in back.as_object().unwrap().keys() {
            assert!(
                public.contains(&key.as_str()),
                "{kind}: typed field {key} is not in the schema"
            );
        }
        for f in &public {
            let opt = kind.field(f).unwrap().default == crdt_schema::Default::None
                && !kind.field(f).unwrap().required;
            assert!(
                opt || back.get(*f).is_some(),
                "{kind}: schema field {f} missing from typed view"
            );
        }
    }
    check::<Site>();
    check::<User>();
    check::<Group>();
    check::<Admin>();
    check::<Settings>();
    check::<Certificate>();
    check::<Security>();
    check::<Script>();
    check::<Rule>();
}

/// The typed value of a never-written singleton carries the schema's defaults (the one place
/// they are stated), and a written one what was written.
#[test]
fn singletons_default_to_the_schema() {
    use crdt_schema::typed::{schema_defaults, singleton, Security, Settings};
    let s: Settings = schema_defaults();
    let field_default = |kind: Kind, name: &str| match kind.field(name).unwrap().default {
        crdt_schema::Default::Int(n) => n,
        other => panic!("{kind}.{name}: {other:?}"),
    };
    assert_eq!(
        s.heartbeat_interval_ms,
        field_default(Kind::Settings, "heartbeat_interval_ms")
    );
    assert_eq!(
        s.replication_interval_ms,
        field_default(Kind::Settings, "replication_interval_ms")
    );
    assert!(s.offline_timeout_ms > s.heartbeat_interval_ms);
    let sec: Security = singleton(None);
    assert_eq!(
        sec.password_min_length,
        field_default(Kind::Security, "password_min_length")
    );
    let written: Settings = singleton(Some(&json!({"heartbeat_interval_ms": 250})));
    assert_eq!(written.heartbeat_interval_ms, 250);
}
