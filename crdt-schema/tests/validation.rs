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
        Kind::ApiToken => {
            json!({"admin": "root", "token_hash": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "expires_at_ms": 1_900_000_000_000_i64, "label": "ci"})
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
    assert_eq!(kinds.len(), Kind::ALL.len());
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

/// Values a secret field of `format` refuses, each holding text that must never be echoed.
fn invalid_secrets(format: crdt_schema::Format) -> Vec<Value> {
    let long = format!("Marker-Long-7734{}", "y".repeat(70_000));
    let mut v = vec![
        json!("Marker-Ctl\u{1}-7733"),
        json!(long),
        json!("Marker-Nul\u{0}-7739"),
    ];
    match format {
        crdt_schema::Format::Password => v.extend([
            json!(""),
            json!("    "),
            json!("\u{200B}\u{FEFF}\u{2060}"),
            json!(" \u{00A0}\u{3000}\u{200B} "),
            json!("\u{3164}\u{115F}"),
        ]),
        crdt_schema::Format::KeyPem => v.extend([
            json!("Marker-NotPem-7736"),
            json!("-----BEGIN PRIVATE KEY-----\nMarkerGarbage7735AAAA\n-----END PRIVATE KEY-----\n"),
            json!("-----BEGIN PRIVATE KEY-----\nTWFya2VyQmFzZTY0U2VjcmV0NzczNw==\n-----END PRIVATE KEY-----\n"),
            json!(format!("{KEY}{KEY}")),
            json!(KEY2),
        ]),
        crdt_schema::Format::Token => v.extend([
            json!("Marker Space 7741"),
            json!("Marker/Slash/7742"),
            json!("a".repeat(65) + "Marker7743"),
        ]),
        other => panic!("a secret field of format {other:?}: add its invalid values here"),
    }
    v
}

/// Every secret field of every kind refuses wrong-typed and invalid values without showing them:
/// the error names the field and the rule, and its text (Display and Debug) holds no part of the
/// value.
#[test]
fn secret_values_never_appear_in_errors() {
    let wrong_types = [
        json!(987654321),
        json!(-12345.678),
        json!(["Marker-In-Array-7731"]),
        json!({"k": "Marker-In-Object-7732"}),
        json!(false),
    ];
    let mut checked = 0;
    for kind in Kind::ALL {
        for f in kind.fields().iter().filter(|f| f.secret) {
            let crdt_schema::Type::Str { format, .. } = f.ty else {
                panic!("{kind}.{}: a secret field that is not a string", f.name);
            };
            for bad in wrong_types.iter().chain(invalid_secrets(format).iter()) {
                let mut body = valid(kind);
                body[f.name] = bad.clone();
                for (mode, exists) in [(WriteMode::Put, false), (WriteMode::Patch, true)] {
                    let e = validate_write(kind, &body, mode, exists).expect_err(&format!(
                        "{kind}.{} accepted {:.60}",
                        f.name,
                        bad.to_string()
                    ));
                    assert_eq!(e.field(), Some(f.name), "{kind}.{}: {e}", f.name);
                    let texts = [e.to_string(), format!("{e:?}")];
                    for text in &texts {
                        assert!(text.contains(f.name), "{text:?} does not name the field");
                        for secret in secret_parts(bad) {
                            assert!(
                                !text.contains(&secret),
                                "{kind}.{}: the error {text:.300} shows the secret {secret:.60}",
                                f.name
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
    }
    // user.password, admin.password, certificate.key_pem; both modes.
    assert!(checked >= 3 * 2 * 10, "only {checked} refusals checked");
}

/// The parts of a refused value an error must not hold: its strings and numbers, each line of a
/// multi-line one, and each invisible character of one that is only that.
fn secret_parts(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::String(s) => {
            let visible: String = s.chars().filter(|c| !c.is_whitespace()).collect();
            if visible.chars().count() >= 3 && s.is_ascii() {
                out.push(s.chars().take(40).collect());
            }
            for line in s
                .lines()
                .filter(|l| l.len() >= 12 && !l.starts_with("-----"))
            {
                out.push(line.to_string());
            }
            out.extend(
                s.chars()
                    .filter(|c| !c.is_ascii() && !c.is_whitespace())
                    .map(String::from),
            );
            if s.contains("Marker") {
                out.push("Marker".into());
            }
        }
        Value::Number(n) => out.push(n.to_string().trim_start_matches('-').to_string()),
        Value::Array(a) => a.iter().for_each(|x| out.extend(secret_parts(x))),
        Value::Object(o) => o.values().for_each(|x| out.extend(secret_parts(x))),
        Value::Bool(_) | Value::Null => {}
    }
    out
}

const CERT2: &str = include_str!("fixtures/cert2.pem");
const KEY2: &str = include_str!("fixtures/key2.pem");
const KEY_SEC1: &str = include_str!("fixtures/key-sec1.pem");
const RSA_CERT: &str = include_str!("fixtures/rsa-cert.pem");
const RSA_KEY: &str = include_str!("fixtures/rsa-key.pem");
const RSA_KEY_PKCS1: &str = include_str!("fixtures/rsa-key-pkcs1.pem");
const ED25519_CERT: &str = include_str!("fixtures/ed25519-cert.pem");
const ED25519_KEY_V1: &str = include_str!("fixtures/ed25519-key.pem");

fn cert_write(cert: &str, key: &str) -> Result<(), SchemaError> {
    validate_write(
        Kind::Certificate,
        &json!({"cert_pem": cert, "key_pem": key}),
        WriteMode::Put,
        false,
    )
    .map(|_| ())
}

/// The base64 lines of a PEM: what an error must never hold of a key.
fn key_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 8)
        .collect()
}

/// A key is parsed and must be the certificate's: matching pairs in every supported encoding
/// pass, a crossed pair is refused naming the rule, and no error shows the key.
#[test]
fn key_pem_must_parse_and_match_cert_pem() {
    for (cert, key, what) in [
        (CERT, KEY, "EC P-256, PKCS#8"),
        (CERT2, KEY2, "EC P-256, PKCS#8 (second pair)"),
        (CERT, KEY_SEC1, "EC P-256, SEC1"),
        (RSA_CERT, RSA_KEY, "RSA, PKCS#8"),
        (RSA_CERT, RSA_KEY_PKCS1, "RSA, PKCS#1"),
    ] {
        cert_write(cert, key).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    for (cert, key, words) in [
        (CERT, KEY2, "does not match"),
        (CERT2, KEY, "does not match"),
        (CERT2, KEY_SEC1, "does not match"),
        (CERT, RSA_KEY, "does not match"),
        (RSA_CERT, KEY, "does not match"),
        (
            ED25519_CERT,
            ED25519_KEY_V1,
            "does not carry its public key",
        ),
        (CERT, &format!("{KEY}{KEY2}"), "more than one private key"),
        (
            CERT,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "encrypted",
        ),
        (
            CERT,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            "not supported",
        ),
        (
            CERT,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "does not parse",
        ),
        (
            CERT,
            "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
            "does not decode",
        ),
        (CERT, "just some text", "no PEM block"),
        (CERT, CERT2, "no private key block"),
    ] {
        let e = cert_write(cert, key).expect_err(&format!("refused: {words}"));
        let msg = e.to_string();
        assert_eq!(e.field(), Some("key_pem"), "{msg}");
        assert!(msg.contains(words), "{msg:?} does not say {words:?}");
        assert!(msg.contains("(secret)"), "{msg:?}");
        for line in key_lines(key) {
            assert!(!msg.contains(line), "{msg:?} shows the key");
            assert!(!format!("{e:?}").contains(line), "{e:?} shows the key");
        }
    }
    // The same rule on a patch naming both.
    let e = validate_write(
        Kind::Certificate,
        &json!({"cert_pem": RSA_CERT, "key_pem": KEY}),
        WriteMode::Patch,
        true,
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
}

/// Passwords: NFKC-normalized, and refused when nothing of them shows (empty, whitespace,
/// control, format or other invisible characters only).
#[test]
fn passwords_are_normalized_and_must_show() {
    for pw in [
        "",
        "   ",
        "\u{200B}",
        "\u{FEFF}\u{200B}\u{2060}",
        " \u{00A0}\u{3000} ",
        "\u{3164}",
        "\u{2800}\u{2800}",
        "\u{E0041}\u{E0042}",
        "\u{FE0F}\u{200D}",
    ] {
        for kind in [Kind::User, Kind::Admin] {
            let e = validate_write(kind, &json!({ "password": pw }), WriteMode::Put, false)
                .expect_err(&format!("{kind} password {pw:?} was accepted"));
            let msg = e.to_string();
            assert_eq!(e.field(), Some("password"), "{msg}");
            assert!(
                msg.contains("visible") || msg.contains("empty"),
                "{msg:?} does not say why"
            );
        }
    }
    let stored = |pw: &str| {
        let v = validate_write(
            Kind::User,
            &json!({ "password": pw }),
            WriteMode::Put,
            false,
        )
        .unwrap_or_else(|e| panic!("{pw:?}: {e}"));
        match &v.iter().find(|(f, _)| f.name == "password").unwrap().1 {
            FieldValue::Secret(s) => s.clone(),
            other => panic!("{other:?}"),
        }
    };
    // Full-width letters and a decomposed accent are the same password as their plain forms.
    assert_eq!(stored("ｐａｓｓｗｏｒｄ"), "password");
    assert_eq!(stored("cafe\u{301}-long"), "caf\u{e9}-long");
    assert_eq!(stored("correct horse"), "correct horse");
    // The length policy counts what shows, after normalization.
    assert_eq!(crdt_schema::visible_len("a\u{200B}b c\u{FEFF}"), 3);
    assert_eq!(
        crdt_schema::visible_len(&crdt_schema::normalize_password("e\u{301}")),
        1
    );
    // The Debug form of a validated secret never shows it.
    let v = validate_write(
        Kind::User,
        &json!({"password": "Marker-Debug-7740"}),
        WriteMode::Put,
        false,
    )
    .unwrap();
    assert!(!format!("{v:?}").contains("Marker-Debug-7740"), "{v:?}");
}

/// A document a peer built by hand breaks the layout of its kind: each way is refused by
/// `check_layout`, and what every node writes never is.
#[test]
fn check_layout_refuses_what_no_node_writes() {
    use automerge::transaction::Transactable;
    use automerge::{ObjType, ReadDoc, ROOT};
    use crdt_schema::doc::{self, LayoutError};
    let fresh = || {
        let mut d = doc::genesis(Kind::Site);
        d.set_actor(automerge::ActorId::from(vec![9u8; 16]));
        d
    };
    let valid = fresh();
    doc::check_layout(&valid, Kind::Site).unwrap();
    assert!(matches!(
        doc::check_layout(&valid, Kind::User),
        Err(LayoutError::NotOfKind { .. })
    ));
    type Edit = Box<dyn Fn(&mut automerge::AutoCommit)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "a map where a register is",
            Box::new(|d| {
                d.put_object(ROOT, "root_dir", ObjType::Map).unwrap();
            }),
        ),
        (
            "a string in an int field",
            Box::new(|d| d.put(ROOT, "max_sessions", "many").unwrap()),
        ),
        (
            "an int in a bool field",
            Box::new(|d| d.put(ROOT, "enabled", 1i64).unwrap()),
        ),
        (
            "an unsigned int in an int field",
            Box::new(|d| d.put(ROOT, "max_sessions", 5u64).unwrap()),
        ),
        (
            "a string as _alive",
            Box::new(|d| d.put(ROOT, "_alive", "yes").unwrap()),
        ),
        (
            "a replaced set container",
            Box::new(|d| {
                d.put_object(ROOT, "protocols", ObjType::Map).unwrap();
            }),
        ),
        (
            "a set replaced by a register",
            Box::new(|d| d.put(ROOT, "protocols", "sftp").unwrap()),
        ),
        (
            "a set item that is not true",
            Box::new(|d| {
                let (_, obj) = d.get(ROOT, "protocols").unwrap().unwrap();
                d.put(&obj, "sftp", "x").unwrap();
            }),
        ),
        (
            "an unknown key",
            Box::new(|d| d.put(ROOT, "shoe_size", 42i64).unwrap()),
        ),
        (
            "another _kind",
            Box::new(|d| d.put(ROOT, "_kind", "user").unwrap()),
        ),
    ];
    for (what, f) in cases {
        let mut d = fresh();
        f(&mut d);
        d.commit();
        let e = doc::check_layout(&d, Kind::Site).expect_err(what);
        assert!(!e.to_string().is_empty());
    }
    // A derived field stored in a certificate.
    let mut d = doc::genesis(Kind::Certificate);
    d.set_actor(automerge::ActorId::from(vec![9u8; 16]));
    d.put(ROOT, "subject", "CN=forged").unwrap();
    d.commit();
    assert!(matches!(
        doc::check_layout(&d, Kind::Certificate),
        Err(LayoutError::Derived { .. })
    ));
}
