//! Layer: net (imports core only).
//!
//! Cluster PKI and TLS configuration: the cluster CA, node certificates, and the rustls configs of
//! the IPC server and client (ring provider, chosen explicitly).
//!
//! Every node certificate has the CA as issuer, the node ID as its common name, and the DNS name
//! [`CLUSTER_DNS_NAME`], which is the server name every peer connection verifies. Which node a
//! certificate belongs to is read from its common name.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const CLUSTER_DNS_NAME: &str = "peerconf.cluster";
const ALPN_H2: &[u8] = b"h2";

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn err(ctx: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError(format!("{ctx}: {e}"))
}

/// The PEM files of a node, in `DIR/tls/`. Keys are 0600.
pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    pub fn new(data_dir: &Path) -> TlsFiles {
        TlsFiles {
            dir: data_dir.join("tls"),
        }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn node_cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    pub fn node_key(&self) -> PathBuf {
        self.dir.join("node.key")
    }

    /// Writes every file; keys readable only by their owner.
    pub fn write(&self, m: &Material) -> Result<(), TlsError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| TlsError(format!("cannot create {}: {e}", self.dir.display())))?;
        restrict(&self.dir, 0o700)?;
        for (path, text, secret) in [
            (self.ca_cert(), &m.ca_cert_pem, false),
            (self.ca_key(), &m.ca_key_pem, true),
            (self.node_cert(), &m.node_cert_pem, false),
            (self.node_key(), &m.node_key_pem, true),
        ] {
            write_private(&path, text, if secret { 0o600 } else { 0o644 })?;
        }
        Ok(())
    }

    pub fn read(&self) -> Result<Material, TlsError> {
        let r = |p: PathBuf| {
            std::fs::read_to_string(&p)
                .map_err(|e| TlsError(format!("cannot read {}: {e}", p.display())))
        };
        Ok(Material {
            ca_cert_pem: r(self.ca_cert())?,
            ca_key_pem: r(self.ca_key())?,
            node_cert_pem: r(self.node_cert())?,
            node_key_pem: r(self.node_key())?,
        })
    }
}

fn restrict(path: &Path, mode: u32) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| TlsError(format!("cannot set permissions of {}: {e}", path.display())))?;
    }
    let _ = (path, mode);
    Ok(())
}

/// Creates the file with its final mode before any byte is written, so a key is never readable
/// by others, not even for an instant.
fn write_private(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode);
    }
    let mut f = o
        .open(path)
        .map_err(|e| TlsError(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| TlsError(format!("cannot write {}: {e}", path.display())))?;
    restrict(path, mode)
}

/// A node's certificates and keys, as PEM.
#[derive(Clone)]
pub struct Material {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub node_cert_pem: String,
    pub node_key_pem: String,
}

impl Material {
    /// A new cluster CA and a certificate for the first node.
    pub fn new_cluster(cluster_id: &str, node_id: &str) -> Result<Material, TlsError> {
        let ca_key = KeyPair::generate().map_err(err("CA key"))?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err("CA params"))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, format!("peerconf cluster {cluster_id}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2200, 1, 1);
        let ca_cert = p.self_signed(&ca_key).map_err(err("CA certificate"))?;
        let ca_cert_pem = ca_cert.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let node_key = KeyPair::generate().map_err(err("node key"))?;
        let node_cert_pem = sign_node(&ca_cert_pem, &ca_key_pem, node_id, &node_key)?;
        Ok(Material {
            ca_cert_pem,
            ca_key_pem,
            node_cert_pem,
            node_key_pem: node_key.serialize_pem(),
        })
    }

    pub fn ca_fingerprint(&self) -> Result<String, TlsError> {
        fingerprint_pem(&self.ca_cert_pem)
    }

    /// This node's public key, as its member entry pins it.
    pub fn node_public_key(&self) -> Result<String, TlsError> {
        let key = KeyPair::from_pem(&self.node_key_pem).map_err(err("node key"))?;
        Ok(hex::encode(rcgen::PublicKeyData::der_bytes(&key)))
    }

    /// This node's signature of an admission (see `core::members`).
    pub fn sign(&self, msg: &[u8]) -> Result<String, TlsError> {
        let key = KeyPair::from_pem(&self.node_key_pem).map_err(err("node key"))?;
        rcgen::SigningKey::sign(&key, msg)
            .map(hex::encode)
            .map_err(err("signature"))
    }
}

/// The public key a certificate holds (hex of its subject public key), as member entries pin it.
pub fn public_key_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(&cert.public_key().subject_public_key.data))
}

/// The public key of a joiner's certificate request; only ECDSA P-256 keys are taken (the
/// admissions of the member list are verified with that algorithm).
pub fn csr_public_key(csr_pem: &str) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| TlsError(format!("the certificate request is not valid: {e}")))?;
    if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(TlsError(
            "the certificate request's key must be ECDSA P-256".into(),
        ));
    }
    Ok(hex::encode(rcgen::PublicKeyData::der_bytes(
        &csr.public_key,
    )))
}

fn node_params(node_id: &str) -> Result<CertificateParams, TlsError> {
    let mut p =
        CertificateParams::new(vec![CLUSTER_DNS_NAME.to_string()]).map_err(err("node params"))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, node_id);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2200, 1, 1);
    Ok(p)
}

fn sign_node(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    node_id: &str,
    key: &KeyPair,
) -> Result<String, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(err("CA certificate"))?;
    let cert = node_params(node_id)?
        .signed_by(key, &issuer)
        .map_err(err("node certificate"))?;
    Ok(cert.pem())
}

/// A key pair and a certificate request for a joining node.
pub fn new_node_key_and_csr(node_id: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(err("node key"))?;
    let csr = node_params(node_id)?
        .serialize_request(&key)
        .map_err(err("certificate request"))?;
    Ok((
        key.serialize_pem(),
        csr.pem().map_err(err("certificate request"))?,
    ))
}

/// Signs a joiner's request. Only its public key is taken from the request: the name and usages
/// are ours.
pub fn sign_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    node_id: &str,
    csr_pem: &str,
) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| TlsError(format!("the certificate request is not valid: {e}")))?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).map_err(err("CA certificate"))?;
    let cert = node_params(node_id)?
        .signed_by(&csr.public_key, &issuer)
        .map_err(err("node certificate"))?;
    Ok(cert.pem())
}

fn pem_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError(format!("bad certificate PEM: {e}")))
}

pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub fn fingerprint_pem(pem: &str) -> Result<String, TlsError> {
    Ok(fingerprint_der(&pem_der(pem)?))
}

/// The node ID a certificate names (its common name).
pub fn node_id_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

fn key_der(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError(format!("bad key PEM: {e}")))
}

fn roots(m: &Material) -> Result<Arc<RootCertStore>, TlsError> {
    let mut r = RootCertStore::empty();
    r.add(pem_der(&m.ca_cert_pem)?)
        .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
    Ok(Arc::new(r))
}

/// The IPC server: presents the node certificate (with the CA certificate, so a joiner can check
/// the fingerprint); verifies client certificates against the cluster CA but also admits clients
/// without one, because a joiner has none yet. The HTTP layer lets such clients only join.
pub fn server_config(m: &Material) -> Result<Arc<ServerConfig>, TlsError> {
    let p = provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(m)?, p.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError(format!("client verifier: {e}")))?;
    let mut c = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![pem_der(&m.node_cert_pem)?, pem_der(&m.ca_cert_pem)?],
            key_der(&m.node_key_pem)?,
        )
        .map_err(|e| TlsError(format!("node certificate: {e}")))?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(c))
}

/// The admin API's HTTPS server: a certificate for this node issued by the cluster CA at each
/// start (its key never leaves memory), naming `dns` and `ips` as subject alternative names,
/// served with the CA certificate so a client holding only that (`peerconf ca show`) verifies it.
/// No client certificate is asked for: admins authenticate over HTTP.
pub fn api_server_config(
    m: &Material,
    node_id: &str,
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> Result<Arc<ServerConfig>, TlsError> {
    api_config(Arc::new(FixedCert(api_ca_key(m, node_id, dns, ips)?)))
}

/// A certificate for the admin API issued by the cluster CA for the names and addresses the node
/// is reached by, with the CA certificate after it in the chain.
pub fn api_ca_key(
    m: &Material,
    node_id: &str,
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = KeyPair::generate().map_err(err("API key"))?;
    let mut p = CertificateParams::new(dns.to_vec()).map_err(err("API certificate names"))?;
    for ip in ips {
        p.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
    }
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("{node_id} admin API"));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2200, 1, 1);
    let ca_key = KeyPair::from_pem(&m.ca_key_pem).map_err(err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&m.ca_cert_pem, ca_key).map_err(err("CA certificate"))?;
    let cert = p.signed_by(&key, &issuer).map_err(err("API certificate"))?;
    CertifiedKey::from_der(
        vec![cert.der().clone(), pem_der(&m.ca_cert_pem)?],
        key_der(&key.serialize_pem())?,
        &provider(),
    )
    .map(Arc::new)
    .map_err(|e| TlsError(format!("API certificate: {e}")))
}

/// The admin API's server configuration with a certificate the operator provides: `cert_pem`
/// (the chain, the node's certificate first) and `key_pem` (its private key, which must match).
pub fn api_server_config_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, TlsError> {
    api_config(Arc::new(FixedCert(certified_key_pem(cert_pem, key_pem)?)))
}

/// A certificate chain and its private key, both PEM, as rustls serves them; refused when the key
/// is not the certificate's.
pub fn certified_key_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("certificate: not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError(
            "certificate: the file holds no CERTIFICATE block".into(),
        ));
    }
    CertifiedKey::from_der(chain, key_der(key_pem)?, &provider())
        .map(Arc::new)
        .map_err(|e| TlsError(format!("certificate and key: {e}")))
}

/// The admin API's server configuration (HTTP/2 and HTTP/1.1) with certificates from `resolver`.
pub fn api_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    c.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// One certificate for every handshake.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The certificate of a server that can change while it runs (the admin API serving a
/// `certificate` entity, which replicates and may be replaced): every handshake takes the one
/// set last.
#[derive(Debug)]
pub struct SwappableCert(std::sync::RwLock<Arc<CertifiedKey>>);

impl SwappableCert {
    pub fn new(first: Arc<CertifiedKey>) -> Self {
        SwappableCert(std::sync::RwLock::new(first))
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    /// The certificate served now (its end-entity certificate first).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A client of the admin API over HTTPS that trusts only the CA certificate(s) in `ca_pem`.
pub fn api_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let der = der.map_err(|e| TlsError(format!("bad CA certificate PEM: {e}")))?;
        roots
            .add(der)
            .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError("no certificate in the CA file".into()));
    }
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// A member's client: presents the node certificate, trusts only the cluster CA.
pub fn client_config(m: &Material) -> Result<Arc<ClientConfig>, TlsError> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots(m)?)
        .with_client_auth_cert(vec![pem_der(&m.node_cert_pem)?], key_der(&m.node_key_pem)?)
        .map_err(|e| TlsError(format!("node certificate: {e}")))?;
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(c))
}

/// Why the fingerprint verifier refused a server, for the join error message.
pub type Refusal = Arc<Mutex<Option<String>>>;

/// A joiner's client: no certificate of its own; trusts the server only if the CA certificate it
/// presents has the fingerprint from the join token and signed the server's certificate. Why a
/// server was refused is kept in `refusal` for a clear message.
pub fn joiner_config(ca_fingerprint: &str) -> Result<(Arc<ClientConfig>, Refusal), TlsError> {
    let refusal = Arc::new(Mutex::new(None));
    let v = Arc::new(FingerprintVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
        refusal: refusal.clone(),
    });
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(v)
        .with_no_client_auth();
    c.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(c), refusal))
}

#[derive(Debug)]
struct FingerprintVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
    refusal: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |why: String| {
            if let Ok(mut r) = self.refusal.lock() {
                *r = Some(why.clone());
            }
            rustls::Error::General(why)
        };
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint_der(c) == self.fingerprint)
        else {
            let seen: Vec<String> = intermediates.iter().map(|c| fingerprint_der(c)).collect();
            return Err(refuse(format!(
                "the peer belongs to another cluster: its CA fingerprint is {}, the token expects {}",
                seen.first().map(String::as_str).unwrap_or("(none presented)"),
                self.fingerprint
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| refuse(format!("the peer's CA certificate is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| refuse(format!("verifier: {e}")))?;
        inner
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
            .map_err(|e| {
                refuse(format!(
                    "the peer's certificate is not from its cluster CA: {e}"
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(CLUSTER_DNS_NAME).expect("valid DNS name")
}
