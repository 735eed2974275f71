//! Private keys in PEM: parsed far enough to know their public key, and checked against the
//! certificate they are stored with. Pure (no I/O, no randomness): the public key is read from
//! the key itself (RSA keys carry their modulus and exponent; EC keys, as written by OpenSSL,
//! rcgen, ring and Go, carry their public point; Ed25519/Ed448 keys in PKCS#8 v2 carry theirs).
//!
//! Errors never hold any byte of the key: only which structure failed and why.

/// Why a private key was refused. The messages name the rule, never the key's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no PEM block found (expected -----BEGIN PRIVATE KEY----- ... -----END PRIVATE KEY-----)"
    )]
    NotPem,
    #[error("a PEM block does not decode (bad base64 or a missing END line)")]
    BadPem,
    #[error("no private key block (-----BEGIN ... PRIVATE KEY-----) found")]
    NoPrivateKey,
    #[error("more than one private key block: give exactly one")]
    SeveralKeys,
    #[error("the key is encrypted: store it decrypted (e.g. openssl pkey -in KEY -out KEY.plain), the server must be able to load it")]
    Encrypted,
    #[error("a {label:?} block is not supported: use PKCS#8 (PRIVATE KEY), PKCS#1 (RSA PRIVATE KEY) or SEC1 (EC PRIVATE KEY)")]
    UnsupportedLabel { label: String },
    #[error("the {what} structure does not parse")]
    Malformed { what: &'static str },
    #[error(
        "the key algorithm {oid} is not supported: use RSA, ECDSA (P-256, P-384, P-521) or Ed25519"
    )]
    UnsupportedAlgorithm { oid: String },
    #[error("the {alg} key does not carry its public key, so it cannot be checked against cert_pem: write it with its public key (for EC: openssl pkey -in KEY -out KEY.full)")]
    NoPublicKey { alg: &'static str },
    #[error("the certificate's public key cannot be read")]
    CertKey,
    #[error("it does not match the certificate in cert_pem: its public key ({key}) is not the certificate's ({cert}); give the key the certificate was issued for")]
    Mismatch {
        key: &'static str,
        cert: &'static str,
    },
}

/// A public key as the private key or the certificate states it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Public {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ec {
        curve: Option<Vec<u8>>,
        point: Vec<u8>,
    },
    Edwards {
        oid: Vec<u8>,
        key: Vec<u8>,
    },
}

impl Public {
    fn name(&self) -> &'static str {
        match self {
            Public::Rsa { .. } => "RSA",
            Public::Ec { .. } => "EC",
            Public::Edwards { oid, .. } if oid == OID_ED448 => "Ed448",
            Public::Edwards { .. } => "Ed25519",
        }
    }

    fn same_as(&self, other: &Public) -> bool {
        match (self, other) {
            (Public::Rsa { n: a, e: x }, Public::Rsa { n: b, e: y }) => a == b && x == y,
            (
                Public::Ec {
                    curve: c1,
                    point: p1,
                },
                Public::Ec {
                    curve: c2,
                    point: p2,
                },
            ) => {
                let curves_agree = match (c1, c2) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                };
                curves_agree && same_point(p1, p2)
            }
            (Public::Edwards { oid: o1, key: k1 }, Public::Edwards { oid: o2, key: k2 }) => {
                o1 == o2 && k1 == k2
            }
            _ => false,
        }
    }
}

/// Two SEC1 encodings of one EC point: uncompressed (`04 X Y`) or compressed (`02|03 X`, the
/// prefix telling the parity of Y).
fn same_point(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    let parts = |p: &[u8]| -> Option<(Vec<u8>, u8)> {
        let (&prefix, rest) = p.split_first()?;
        match prefix {
            0x04 if rest.len() % 2 == 0 && !rest.is_empty() => {
                let (x, y) = rest.split_at(rest.len() / 2);
                Some((x.to_vec(), y.last()? & 1))
            }
            0x02 | 0x03 if !rest.is_empty() => Some((rest.to_vec(), prefix & 1)),
            _ => None,
        }
    };
    matches!((parts(a), parts(b)), (Some(x), Some(y)) if x == y)
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_RSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_ED448: &[u8] = &[0x2b, 0x65, 0x71];

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
/// `[0]` and `[1]`, constructed (explicit tagging).
const CTX0: u8 = 0xa0;
const CTX1: u8 = 0xa1;
/// `[1] IMPLICIT BIT STRING` (PKCS#8 v2's public key).
const CTX1_PRIMITIVE: u8 = 0x81;

/// One DER element: its tag and its contents.
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
}

/// The first DER element of `input` and what follows it. None when it does not parse (only
/// single-byte tags and definite lengths up to 4 bytes: all a key needs).
fn tlv(input: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (body, rest) = rest.split_at(len);
    Some((Tlv { tag, body }, rest))
}

/// The elements inside a constructed element's contents.
fn children(mut body: &[u8]) -> Option<Vec<Tlv<'_>>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let (t, rest) = tlv(body)?;
        out.push(t);
        body = rest;
    }
    Some(out)
}

/// A whole input that is exactly one element with `tag`.
fn only(input: &[u8], tag: u8) -> Option<Tlv<'_>> {
    let (t, rest) = tlv(input)?;
    (t.tag == tag && rest.is_empty()).then_some(t)
}

/// A sequence's elements.
fn sequence(input: &[u8]) -> Option<Vec<Tlv<'_>>> {
    children(only(input, SEQUENCE)?.body)
}

/// An INTEGER's magnitude without leading zero bytes (positive integers only).
fn unsigned(t: &Tlv<'_>) -> Option<Vec<u8>> {
    if t.tag != INTEGER || t.body.is_empty() || t.body[0] & 0x80 != 0 {
        return None;
    }
    let start = t.body.iter().position(|&b| b != 0).unwrap_or(t.body.len());
    Some(t.body[start..].to_vec())
}

/// A BIT STRING's bytes (whole bytes only, as keys are).
fn bits(t: &Tlv<'_>) -> Option<Vec<u8>> {
    match t.body.split_first() {
        Some((0, rest)) if !rest.is_empty() => Some(rest.to_vec()),
        _ => None,
    }
}

fn malformed(what: &'static str) -> KeyError {
    KeyError::Malformed { what }
}

fn oid_text(oid: &[u8]) -> String {
    // Dotted form; a first arc past 2 is not a valid OID, shown as hex instead.
    let mut arcs = Vec::new();
    let mut cur: u64 = 0;
    for &b in oid {
        cur = match cur.checked_mul(128) {
            Some(c) => c | u64::from(b & 0x7f),
            None => return hex::encode(oid),
        };
        if b & 0x80 == 0 {
            arcs.push(cur);
            cur = 0;
        }
    }
    match arcs.split_first() {
        Some((&first, rest)) => {
            let (a, b) = if first < 80 {
                (first / 40, first % 40)
            } else {
                (2, first - 80)
            };
            let mut s = format!("{a}.{b}");
            for x in rest {
                s.push_str(&format!(".{x}"));
            }
            s
        }
        None => hex::encode(oid),
    }
}

/// `RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, dp, dq, qinv, ... }` (PKCS#1).
fn rsa_private(der: &[u8]) -> Result<Public, KeyError> {
    let bad = || malformed("PKCS#1 RSA private key");
    let items = sequence(der).ok_or_else(bad)?;
    if items.len() < 9 || items.iter().take(9).any(|t| t.tag != INTEGER) {
        return Err(bad());
    }
    let n = unsigned(&items[1])
        .filter(|n| !n.is_empty())
        .ok_or_else(bad)?;
    let e = unsigned(&items[2])
        .filter(|e| !e.is_empty())
        .ok_or_else(bad)?;
    if unsigned(&items[3]).is_none_or(|d| d.is_empty()) {
        return Err(bad());
    }
    Ok(Public::Rsa { n, e })
}

/// `ECPrivateKey ::= SEQUENCE { version 1, privateKey OCTET STRING, [0] curve OID OPTIONAL,
/// [1] publicKey BIT STRING OPTIONAL }` (SEC1). `curve` is the one the PKCS#8 wrapper names.
/// `v2_public`: the PKCS#8 v2 public key, if the wrapper holds one.
fn ec_private(
    der: &[u8],
    curve: Option<Vec<u8>>,
    v2_public: Option<Vec<u8>>,
) -> Result<Public, KeyError> {
    let bad = || malformed("SEC1 EC private key");
    let items = sequence(der).ok_or_else(bad)?;
    match items.as_slice() {
        [v, k, ..] if v.tag == INTEGER && v.body == [1] && k.tag == OCTET_STRING => {
            if k.body.is_empty() || k.body.iter().all(|&b| b == 0) {
                return Err(bad());
            }
        }
        _ => return Err(bad()),
    }
    let mut own_curve = None;
    let mut point = None;
    for t in &items[2..] {
        match t.tag {
            CTX0 => {
                let c = only(t.body, OID).ok_or_else(bad)?;
                own_curve = Some(c.body.to_vec());
            }
            CTX1 => {
                let b = only(t.body, BIT_STRING).ok_or_else(bad)?;
                point = Some(bits(&b).ok_or_else(bad)?);
            }
            _ => return Err(bad()),
        }
    }
    if let (Some(a), Some(b)) = (&curve, &own_curve) {
        if a != b {
            return Err(bad());
        }
    }
    let point = point
        .or(v2_public)
        .ok_or(KeyError::NoPublicKey { alg: "EC" })?;
    Ok(Public::Ec {
        curve: curve.or(own_curve),
        point,
    })
}

/// `PrivateKeyInfo`/`OneAsymmetricKey ::= SEQUENCE { version 0|1, algorithm
/// AlgorithmIdentifier, privateKey OCTET STRING, [0] attributes OPTIONAL, [1] IMPLICIT
/// publicKey BIT STRING OPTIONAL }` (PKCS#8, RFC 5958).
fn pkcs8(der: &[u8]) -> Result<Public, KeyError> {
    let bad = || malformed("PKCS#8 private key");
    let items = sequence(der).ok_or_else(bad)?;
    let (alg, key, extra) = match items.as_slice() {
        [v, alg, key, extra @ ..]
            if v.tag == INTEGER
                && (v.body == [0] || v.body == [1])
                && alg.tag == SEQUENCE
                && key.tag == OCTET_STRING =>
        {
            (alg, key, extra)
        }
        _ => return Err(bad()),
    };
    let mut v2_public = None;
    for t in extra {
        match t.tag {
            CTX0 => {}
            CTX1_PRIMITIVE => v2_public = Some(bits(t).ok_or_else(bad)?),
            _ => return Err(bad()),
        }
    }
    let alg = children(alg.body).ok_or_else(bad)?;
    let (oid, params) = match alg.as_slice() {
        [oid, rest @ ..] if oid.tag == OID && rest.len() <= 1 => (oid.body, rest.first()),
        _ => return Err(bad()),
    };
    match oid {
        OID_RSA | OID_RSA_PSS => rsa_private(key.body),
        OID_EC => {
            let curve = params
                .filter(|p| p.tag == OID)
                .map(|p| p.body.to_vec())
                .ok_or_else(bad)?;
            ec_private(key.body, Some(curve), v2_public)
        }
        OID_ED25519 | OID_ED448 => {
            let want = if oid == OID_ED25519 { 32 } else { 57 };
            let seed = only(key.body, OCTET_STRING).ok_or_else(bad)?;
            if seed.body.len() != want {
                return Err(bad());
            }
            let alg = if oid == OID_ED25519 {
                "Ed25519"
            } else {
                "Ed448"
            };
            let key = v2_public.ok_or(KeyError::NoPublicKey { alg })?;
            if key.len() != want {
                return Err(bad());
            }
            Ok(Public::Edwards {
                oid: oid.to_vec(),
                key,
            })
        }
        other => Err(KeyError::UnsupportedAlgorithm {
            oid: oid_text(other),
        }),
    }
}

/// The public key of the one private key in `pem`.
fn private_public(pem: &str) -> Result<Public, KeyError> {
    // Legacy PEM encryption (`Proc-Type: 4,ENCRYPTED`) is told apart before decoding.
    if pem
        .lines()
        .any(|l| l.starts_with("Proc-Type:") && l.contains("ENCRYPTED"))
    {
        return Err(KeyError::Encrypted);
    }
    let mut key = None;
    let mut blocks = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).take(64) {
        blocks += 1;
        let block = block.map_err(|_| KeyError::BadPem)?;
        if !block.label.ends_with("PRIVATE KEY") {
            continue;
        }
        if key.is_some() {
            return Err(KeyError::SeveralKeys);
        }
        key = Some(block);
    }
    let block = match key {
        Some(b) => b,
        None if blocks == 0 => return Err(KeyError::NotPem),
        None => return Err(KeyError::NoPrivateKey),
    };
    match block.label.as_str() {
        "PRIVATE KEY" => pkcs8(&block.contents),
        "RSA PRIVATE KEY" => rsa_private(&block.contents),
        "EC PRIVATE KEY" => ec_private(&block.contents, None, None),
        "ENCRYPTED PRIVATE KEY" => Err(KeyError::Encrypted),
        other => Err(KeyError::UnsupportedLabel {
            label: other
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(64)
                .collect(),
        }),
    }
}

/// The public key of the first certificate in `cert_pem` (the leaf of a chain).
fn cert_public(cert_pem: &str) -> Result<Public, KeyError> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|_| KeyError::CertKey)?;
    let cert = block.parse_x509().map_err(|_| KeyError::CertKey)?;
    let spki = sequence(cert.public_key().raw).ok_or(KeyError::CertKey)?;
    let (alg, key) = match spki.as_slice() {
        [alg, key] if alg.tag == SEQUENCE && key.tag == BIT_STRING => {
            (alg, bits(key).ok_or(KeyError::CertKey)?)
        }
        _ => return Err(KeyError::CertKey),
    };
    let alg = children(alg.body).ok_or(KeyError::CertKey)?;
    let (oid, params) = match alg.as_slice() {
        [oid, rest @ ..] if oid.tag == OID && rest.len() <= 1 => (oid.body, rest.first()),
        _ => return Err(KeyError::CertKey),
    };
    match oid {
        OID_RSA | OID_RSA_PSS => {
            let items = sequence(&key).ok_or(KeyError::CertKey)?;
            match items.as_slice() {
                [n, e] => Ok(Public::Rsa {
                    n: unsigned(n).ok_or(KeyError::CertKey)?,
                    e: unsigned(e).ok_or(KeyError::CertKey)?,
                }),
                _ => Err(KeyError::CertKey),
            }
        }
        OID_EC => Ok(Public::Ec {
            curve: params.filter(|p| p.tag == OID).map(|p| p.body.to_vec()),
            point: key,
        }),
        OID_ED25519 | OID_ED448 => Ok(Public::Edwards {
            oid: oid.to_vec(),
            key,
        }),
        _ => Err(KeyError::CertKey),
    }
}

/// Checks that `key_pem` holds exactly one private key that parses (and carries or implies its
/// public key).
pub fn check_private_key(key_pem: &str) -> Result<(), KeyError> {
    private_public(key_pem).map(|_| ())
}

/// Checks that the private key in `key_pem` is the key of the (first) certificate in
/// `cert_pem`.
pub fn check_key_matches_cert(key_pem: &str, cert_pem: &str) -> Result<(), KeyError> {
    let key = private_public(key_pem)?;
    let cert = cert_public(cert_pem)?;
    if key.same_as(&cert) {
        Ok(())
    } else {
        Err(KeyError::Mismatch {
            key: key.name(),
            cert: cert.name(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = include_str!("../tests/fixtures/cert.pem");
    const KEY: &str = include_str!("../tests/fixtures/key.pem");
    const CERT2: &str = include_str!("../tests/fixtures/cert2.pem");
    const KEY2: &str = include_str!("../tests/fixtures/key2.pem");

    #[test]
    fn fixture_pairs_match_and_crossed_pairs_do_not() {
        check_key_matches_cert(KEY, CERT).unwrap();
        check_key_matches_cert(KEY2, CERT2).unwrap();
        assert!(matches!(
            check_key_matches_cert(KEY2, CERT),
            Err(KeyError::Mismatch { .. })
        ));
        assert!(matches!(
            check_key_matches_cert(KEY, CERT2),
            Err(KeyError::Mismatch { .. })
        ));
    }

    #[test]
    fn der_parsing_never_panics_on_truncations() {
        let (_, block) = x509_parser::pem::parse_x509_pem(KEY.as_bytes()).unwrap();
        for n in 0..block.contents.len() {
            assert!(pkcs8(&block.contents[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(pkcs8(&block.contents).is_ok());
        // Every single-byte corruption either parses or is refused, never panics.
        for i in 0..block.contents.len() {
            let mut c = block.contents.clone();
            c[i] ^= 0xff;
            let _ = pkcs8(&c);
        }
    }

    #[test]
    fn compressed_and_uncompressed_points_compare() {
        let x = [7u8; 32];
        let mut y = [9u8; 32];
        let mut uncompressed = vec![4u8];
        uncompressed.extend_from_slice(&x);
        uncompressed.extend_from_slice(&y);
        let mut odd = vec![3u8];
        odd.extend_from_slice(&x);
        assert!(same_point(&uncompressed, &odd));
        y[31] = 8;
        let mut even_y = vec![4u8];
        even_y.extend_from_slice(&x);
        even_y.extend_from_slice(&y);
        assert!(!same_point(&even_y, &odd));
    }

    #[test]
    fn oids_read_as_dotted_text() {
        assert_eq!(oid_text(OID_RSA), "1.2.840.113549.1.1.1");
        assert_eq!(oid_text(OID_ED25519), "1.3.101.112");
    }
}
