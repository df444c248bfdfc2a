//! TLS termination: certificates loaded from PEM files and checked (chain, key, match, expiry),
//! chosen per handshake by SNI from each certificate's names (exact and wildcard), and the rustls
//! server configuration of a listener (versions, ALPN, session resumption).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use bouncer_config::{CertificateFiles, ClientAuthConfig, TlsConfig, TlsVersion};

use crate::metrics::ReloadMetrics;

/// Sessions kept for stateful resumption per listener (clients that do not take tickets).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Why a certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a valid PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} holds no usable private key (PEM PKCS#8, RSA or SEC1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate in {path} expired {days} days ago")]
    Expired { path: PathBuf, days: u64 },
    #[error("the certificate in {path} names no DNS host (no subjectAltName or common name)")]
    NoNames { path: PathBuf },
}

/// A certificate ready for handshakes, with the host names it covers (lower case; wildcards as
/// `*.example.com`).
#[derive(Debug)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub cert_path: PathBuf,
}

impl LoadedCertificate {
    /// Whether this certificate covers `host` (lower case, without port).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|name| name_covers(name, host))
    }
}

/// Whether certificate name `name` covers `host`: exactly, or as a wildcard for one label.
fn name_covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => name == host,
    }
}

/// Reads and checks one certificate chain and its key.
pub fn load_certificate(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<LoadedCertificate, CertificateError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertificateError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertificateError::BadCertificate {
            path: files.cert.clone(),
            reason: error.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertificateError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let (names, not_before, not_after) =
        leaf_facts(leaf).map_err(|reason| CertificateError::BadCertificate {
            path: files.cert.clone(),
            reason,
        })?;
    if names.is_empty() {
        return Err(CertificateError::NoNames {
            path: files.cert.clone(),
        });
    }
    if let Ok(ago) = SystemTime::now().duration_since(not_after) {
        return Err(CertificateError::Expired {
            path: files.cert.clone(),
            days: ago.as_secs() / 86_400,
        });
    }
    let key_pem = read(&files.key)?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| CertificateError::BadKey {
            path: files.key.clone(),
            reason: error.to_string(),
        })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => CertificateError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        other => CertificateError::BadKey {
            path: files.key.clone(),
            reason: other.to_string(),
        },
    })?;
    Ok(LoadedCertificate {
        key: Arc::new(key),
        names,
        not_before,
        not_after,
        cert_path: files.cert.clone(),
    })
}

/// The DNS names a leaf certificate covers (its subjectAltNames, else its common name) and its
/// validity.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime, SystemTime), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|error| error.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(alt_names)) = parsed.subject_alternative_name() {
        for name in &alt_names.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    names.push(dns.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            parsed
                .subject()
                .iter_common_name()
                .filter_map(|name| name.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    let instant = |time: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(time.timestamp()).unwrap_or(0))
    };
    let validity = parsed.validity();
    Ok((
        names,
        instant(validity.not_before),
        instant(validity.not_after),
    ))
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Chooses a certificate by the SNI name: an exact name first, then a wildcard for its parent
/// domain, else the default (the first configured), unless `strict` refuses unknown names. The
/// certificates can be replaced while handshakes go on.
pub struct SniResolver {
    certificates: ArcSwap<Certificates>,
    /// What `certificates` is made of: the configured files' certificates, then the one ACME
    /// manages. Locked only to replace one part.
    parts: std::sync::Mutex<CertificateSources>,
    strict: bool,
    /// tls-alpn-01 challenge certificates, when the listener gets certificates from ACME.
    acme_challenges: Option<Arc<crate::acme::AcmeChallenges>>,
}

/// A listener's certificates from its files, and the one ACME manages.
type CertificateSources = (Vec<Arc<LoadedCertificate>>, Option<Arc<LoadedCertificate>>);

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("certificates", &self.certificates.load().list)
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

/// One generation of a listener's certificates, indexed by name.
#[derive(Debug)]
struct Certificates {
    list: Vec<Arc<LoadedCertificate>>,
    exact: HashMap<String, usize>,
    /// Wildcard suffixes (`example.com` for `*.example.com`).
    wildcard: HashMap<String, usize>,
}

impl Certificates {
    fn new(list: Vec<Arc<LoadedCertificate>>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, certificate) in list.iter().enumerate() {
            for name in &certificate.names {
                // The first certificate to name a host keeps it.
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_insert(index),
                    None => exact.entry(name.clone()).or_insert(index),
                };
            }
        }
        Self {
            list,
            exact,
            wildcard,
        }
    }

    fn matching(&self, server_name: &str) -> Option<&Arc<LoadedCertificate>> {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        let index = self.exact.get(&name).copied().or_else(|| {
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent).copied()
        })?;
        self.list.get(index)
    }
}

impl SniResolver {
    pub fn new(
        certificates: Vec<Arc<LoadedCertificate>>,
        strict: bool,
        acme_challenges: Option<Arc<crate::acme::AcmeChallenges>>,
    ) -> Self {
        Self {
            certificates: ArcSwap::from_pointee(Certificates::new(certificates.clone())),
            parts: std::sync::Mutex::new((certificates, None)),
            strict,
            acme_challenges,
        }
    }

    /// The certificate ACME manages, if there is one yet.
    pub fn managed(&self) -> Option<Arc<LoadedCertificate>> {
        self.lock_parts().1.clone()
    }

    /// New handshakes use `certificate` as the ACME-managed one from now on.
    pub fn set_managed(&self, certificate: Option<Arc<LoadedCertificate>>) {
        let mut parts = self.lock_parts();
        parts.1 = certificate;
        self.rebuild(&parts);
    }

    fn lock_parts(&self) -> std::sync::MutexGuard<'_, CertificateSources> {
        self.parts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn rebuild(&self, parts: &CertificateSources) {
        let list = parts.0.iter().chain(parts.1.iter()).cloned().collect();
        self.certificates.store(Arc::new(Certificates::new(list)));
    }

    /// Every certificate handshakes may use now.
    pub fn certificates(&self) -> Vec<Arc<LoadedCertificate>> {
        self.certificates.load().list.clone()
    }

    /// The certificate whose names cover `server_name`, if any.
    pub fn matching(&self, server_name: &str) -> Option<Arc<LoadedCertificate>> {
        self.certificates.load().matching(server_name).cloned()
    }

    /// New handshakes use `certificates` from the files from now on; connections already open
    /// keep theirs.
    fn replace(&self, certificates: Vec<Arc<LoadedCertificate>>) {
        let mut parts = self.lock_parts();
        parts.0 = certificates;
        self.rebuild(&parts);
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(challenges) = &self.acme_challenges
            && client_hello
                .alpn()
                .is_some_and(crate::acme::is_validation_handshake)
        {
            // The CA checking a tls-alpn-01 challenge gets the challenge certificate, or nothing.
            return challenges.tls_alpn_certificate(client_hello.server_name()?);
        }
        let certificates = self.certificates.load();
        let chosen = match client_hello.server_name() {
            Some(name) => match certificates.matching(name) {
                Some(certificate) => Some(certificate),
                None if self.strict => None,
                None => certificates.list.first(),
            },
            // Clients that send no name (by IP address) get the default.
            None => certificates.list.first(),
        };
        chosen.map(|certificate| Arc::clone(&certificate.key))
    }
}

/// How often certificate files are looked at for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Reloads a listener's certificates when their files change, for as long as the resolver
/// exists. A set that fails to load is logged and the certificates in use stay.
async fn watch_certificates(
    listener: String,
    resolver: std::sync::Weak<SniResolver>,
    files: Vec<CertificateFiles>,
    provider: Arc<CryptoProvider>,
    metrics: Option<ReloadMetrics>,
) {
    let mut seen = fingerprint(&files);
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let Some(resolver) = resolver.upgrade() else {
            return;
        };
        let now = fingerprint(&files);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = files
            .iter()
            .map(|files| load_certificate(files, &provider).map(Arc::new))
            .collect::<Result<Vec<_>, _>>();
        match loaded {
            Ok(certificates) => {
                resolver.replace(certificates);
                tracing::info!(%listener, "certificates reloaded: new handshakes use them");
                if let Some(metrics) = &metrics {
                    metrics.succeeded.inc();
                }
            }
            Err(error) => {
                tracing::error!(%listener, %error, "the changed certificate files were not loaded; the certificates in use stay");
                if let Some(metrics) = &metrics {
                    metrics.failed.inc();
                }
            }
        }
    }
}

/// What tells a changed file: its length and modification time, for every file.
fn fingerprint(files: &[CertificateFiles]) -> Vec<Option<(u64, SystemTime)>> {
    files
        .iter()
        .flat_map(|files| [&files.cert, &files.key])
        .map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.len(), metadata.modified().ok()?))
        })
        .collect()
}

/// A listener's TLS: its rustls configuration and the resolver, kept to tell after a handshake
/// which certificate the client's SNI matched.
#[derive(Clone)]
pub struct ListenerTls {
    pub config: Arc<rustls::ServerConfig>,
    pub resolver: Arc<SniResolver>,
    pub handshake_timeout: Duration,
    /// `Strict-Transport-Security`, added to every response.
    pub hsts: Option<http::HeaderValue>,
    /// With mutual TLS: the header that carries the client certificate's subject.
    pub subject_header: Option<http::HeaderName>,
}

/// Why a listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error("the TLS configuration was refused")]
    Rustls(#[source] rustls::Error),
    #[error("cannot use {path} as the CA for client certificates: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("cannot use {path} as the CA for the backends' certificates: {reason}")]
    BackendCa { path: PathBuf, reason: String },
}

impl ListenerTls {
    /// Loads the certificates of `config`. Inside a Tokio runtime it also starts watching their
    /// files, to reload them when they change (counted in `metrics` when given).
    /// `acme_challenges` are the answers to the CA's tls-alpn-01 checks, for a listener whose
    /// certificate ACME manages.
    pub fn new(
        listener: &str,
        config: &TlsConfig,
        metrics: Option<ReloadMetrics>,
        acme_challenges: Option<Arc<crate::acme::AcmeChallenges>>,
    ) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certificates = config
            .certificates
            .iter()
            .map(|files| load_certificate(files, &provider).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let answers_tls_alpn = acme_challenges.is_some()
            && config
                .acme
                .as_ref()
                .is_some_and(|acme| acme.challenge == bouncer_config::AcmeChallenge::TlsAlpn01);
        let resolver = Arc::new(SniResolver::new(
            certificates,
            config.strict_sni,
            acme_challenges.filter(|_| answers_tls_alpn),
        ));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch_certificates(
                listener.to_string(),
                Arc::downgrade(&resolver),
                config.certificates.clone(),
                Arc::clone(&provider),
                metrics,
            ));
        }
        let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(TlsSetupError::Rustls)?;
        let builder = match &config.client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => builder.with_client_cert_verifier(client_verifier(auth, &provider)?),
        };
        let mut server =
            builder.with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = config
            .alpn
            .iter()
            .map(|protocol| protocol.as_bytes().to_vec())
            .collect();
        if answers_tls_alpn {
            // Last, so that it is chosen only for a client that offers nothing else: the CA.
            server
                .alpn_protocols
                .push(crate::acme::ACME_TLS_ALPN.to_vec());
        }
        // Resumption both ways: stateless tickets from the provider's rotating ticketer, and a
        // bounded cache of sessions for clients that do not take tickets.
        server.ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsSetupError::Rustls)?;
        server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        Ok(Self {
            config: Arc::new(server),
            resolver,
            handshake_timeout: config.handshake_timeout,
            hsts: config
                .hsts
                .as_deref()
                .and_then(|value| http::HeaderValue::from_str(value).ok()),
            subject_header: config
                .client_auth
                .as_ref()
                .and_then(|auth| http::HeaderName::try_from(auth.subject_header.as_str()).ok()),
        })
    }
}

/// Checks client certificates against the CA of `client_auth`; without `required`, a client that
/// sends none is let in unauthenticated.
fn client_verifier(
    auth: &ClientAuthConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsSetupError> {
    let failure = |reason: String| TlsSetupError::ClientCa {
        path: auth.ca.clone(),
        reason,
    };
    let roots = load_roots(&auth.ca).map_err(failure)?;
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(provider),
    );
    let builder = if auth.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder.build().map_err(|error| failure(error.to_string()))
}

/// The CA certificates of a PEM file, for verifying peers; an error says why the file is unusable.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|error| error.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|error| error.to_string())?;
        roots.add(cert).map_err(|error| error.to_string())?;
    }
    if roots.is_empty() {
        return Err("it holds no PEM certificate".to_string());
    }
    Ok(roots)
}

/// The proxy's certificate for backends that ask for one.
#[derive(Debug)]
struct PresentCertificate(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for PresentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The subject of a client's verified leaf certificate, as `CN=alice,O=Example` (RFC 4514 order
/// as the certificate holds it).
pub fn client_subject(leaf: &CertificateDer<'_>) -> Option<http::HeaderValue> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = parsed.subject().to_string();
    http::HeaderValue::from_str(&subject).ok()
}

/// TLS to an upstream's backends: the client configuration, and the name to verify when the
/// config sets one.
pub struct UpstreamTls {
    /// Offers HTTP/1.1 by ALPN.
    pub connector: tokio_rustls::TlsConnector,
    /// Offers HTTP/2 by ALPN, for `protocol = "h2"`.
    pub connector_h2: tokio_rustls::TlsConnector,
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
}

impl UpstreamTls {
    pub fn new(config: &bouncer_config::UpstreamTlsConfig) -> Result<Self, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        match &config.ca {
            Some(path) => {
                roots = load_roots(path).map_err(|reason| TlsSetupError::BackendCa {
                    path: path.clone(),
                    reason,
                })?;
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // A system certificate that does not parse is skipped, as browsers do.
                    let _ = roots.add(cert);
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Rustls)?
            .with_root_certificates(roots);
        let mut client = match &config.client_cert {
            None => builder.with_no_client_auth(),
            Some(files) => {
                // Checked and loaded as a listener's certificate is, then always presented.
                let loaded = load_certificate(files, &provider)?;
                builder.with_client_cert_resolver(Arc::new(PresentCertificate(loaded.key)))
            }
        };
        // Only the protocol the upstream is configured for is offered, so that a backend that
        // cannot speak it fails the handshake plainly instead of answering in another.
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client_h2 = client.clone();
        client_h2.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = config
            .server_name
            .as_ref()
            .and_then(|name| rustls_pki_types::ServerName::try_from(name.clone()).ok());
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            connector_h2: tokio_rustls::TlsConnector::from(Arc::new(client_h2)),
            server_name,
        })
    }
}

/// Why a handshake failed, as a metric label.
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        // The client went away, or the socket failed, before the handshake finished.
        return "connection";
    };
    match tls {
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => "not_tls",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::NoApplicationProtocol => "alpn",
        rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
            "client_certificate"
        }
        rustls::Error::General(_) => "no_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::PeerMisbehaved(_) | rustls::Error::DecryptError => "misbehaved",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_covers("*.app.example", "a.app.example"));
        assert!(!name_covers("*.app.example", "app.example"));
        assert!(!name_covers("*.app.example", "a.b.app.example"));
        assert!(name_covers("app.example", "app.example"));
        assert!(!name_covers("app.example", "x.app.example"));
    }
}
