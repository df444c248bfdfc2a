//! Certificates obtained and renewed with ACME (RFC 8555), through instant-acme.
//!
//! Each TLS listener with `acme` has a manager task. At start it loads the certificate kept in
//! `storage` from an earlier run, so that handshakes need not wait for the CA. It then orders a
//! certificate when there is none, when the one kept does not cover the configured domains, or
//! when renewal is due: inside the window the CA suggests with ACME Renewal Information
//! (RFC 9773) when it offers that, else once two thirds of the certificate's lifetime have passed.
//! The CA's checks are answered by this process: tls-alpn-01 (RFC 8737) with a challenge
//! certificate chosen per handshake for the ALPN protocol `acme-tls/1`, http-01 by the pipeline
//! from the tokens kept here. A failed order is logged and tried again later, with a growing
//! pause; the certificate in use stays until a new one is in hand.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use bouncer_config::{AcmeChallenge, AcmeConfig, CertificateFiles};

use crate::metrics::ReloadMetrics;
use crate::tls::{LoadedCertificate, SniResolver, load_certificate};

/// The ALPN protocol of tls-alpn-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The longest one order may take, from the new order to the certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest pause between retries of a failed order.
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);

/// The longest sleep before renewal is looked at again (ARI windows may move).
const MAX_SLEEP: Duration = Duration::from_secs(6 * 3600);

/// Why an order or its storage failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA refused or failed")]
    Acme(#[from] instant_acme::Error),
    #[error("cannot use {path}")]
    Storage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the stored ACME account in {path} is unreadable")]
    Account {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the CA offers no {0} challenge for a domain")]
    NoChallenge(&'static str),
    #[error("the authorization for {domain} is {status:?}")]
    Authorization {
        domain: String,
        status: AuthorizationStatus,
    },
    #[error("the order ended {0:?} instead of ready")]
    Order(OrderStatus),
    #[error("making a key or a certificate signing request failed")]
    Key(#[from] rcgen::Error),
    #[error("the certificate from the CA is unusable")]
    Certificate(#[from] crate::tls::CertificateError),
    #[error("the order took longer than {0:?}")]
    Timeout(Duration),
    #[error("the tls-alpn-01 challenge certificate was refused")]
    ChallengeCertificate(#[source] rustls::Error),
}

/// The answers to the CA's challenges in progress, shared by every listener of the process: a
/// tls-alpn-01 check arrives on the TLS listener, an http-01 check on a plain one.
#[derive(Default)]
pub struct AcmeChallenges {
    /// Challenge certificates by domain, for `acme-tls/1` handshakes.
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Key authorizations by token, for `/.well-known/acme-challenge/TOKEN`.
    http: Mutex<HashMap<String, String>>,
}

impl AcmeChallenges {
    pub fn tls_alpn_certificate(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.tls_alpn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&domain)
            .cloned()
    }

    pub fn http_answer(&self, token: &str) -> Option<String> {
        self.http
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    fn set_tls_alpn(&self, domain: &str, key: Option<Arc<CertifiedKey>>) {
        let mut map = self.tls_alpn.lock().unwrap_or_else(PoisonError::into_inner);
        match key {
            Some(key) => map.insert(domain.to_string(), key),
            None => map.remove(domain),
        };
    }

    fn set_http(&self, token: &str, answer: Option<String>) {
        let mut map = self.http.lock().unwrap_or_else(PoisonError::into_inner);
        match answer {
            Some(answer) => map.insert(token.to_string(), answer),
            None => map.remove(token),
        };
    }
}

/// Whether a handshake is a tls-alpn-01 check: the client offers `acme-tls/1` and nothing else
/// (RFC 8737 section 3).
pub fn is_validation_handshake<'a>(mut offered: impl Iterator<Item = &'a [u8]>) -> bool {
    offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
}

/// Where a listener's ACME state lives under `storage`.
struct Storage {
    account: PathBuf,
    files: CertificateFiles,
}

impl Storage {
    fn new(config: &AcmeConfig) -> Self {
        // One account per CA: a directory URL becomes a file name.
        let directory: String = config
            .directory
            .trim_start_matches("https://")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let stem = &config.domains[0];
        Storage {
            account: config.storage.join(format!("account-{directory}.json")),
            files: CertificateFiles {
                cert: config.storage.join(format!("{stem}.crt.pem")),
                key: config.storage.join(format!("{stem}.key.pem")),
            },
        }
    }
}

/// Starts managing `config`'s certificate for `resolver`: the stored certificate, if usable, is
/// served at once; the manager task runs until the proxy stops (or the resolver is gone).
pub(crate) fn start(
    listener: &str,
    config: &AcmeConfig,
    resolver: &Arc<SniResolver>,
    challenges: &Arc<AcmeChallenges>,
    metrics: ReloadMetrics,
    mut lifecycle: tokio::sync::watch::Receiver<crate::listener::Lifecycle>,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let storage = Storage::new(config);
    match load_certificate(&storage.files, &provider) {
        Ok(stored) => {
            tracing::info!(%listener, cert = %storage.files.cert.display(), "serving the certificate kept from an earlier ACME order");
            resolver.set_managed(Some(Arc::new(stored)));
        }
        Err(error) if storage.files.cert.exists() => {
            tracing::warn!(%listener, error = %crate::error::Causes(&error), "the stored ACME certificate is unusable; a new one is ordered");
        }
        Err(_) => {}
    }
    let manager = Manager {
        listener: listener.to_string(),
        config: config.clone(),
        storage,
        resolver: Arc::downgrade(resolver),
        challenges: Arc::clone(challenges),
        provider,
        metrics,
    };
    tokio::spawn(async move {
        tokio::select! {
            () = manager.run() => {}
            _ = lifecycle.wait_for(|state| *state != crate::listener::Lifecycle::Running) => {}
        }
    });
}

struct Manager {
    listener: String,
    config: AcmeConfig,
    storage: Storage,
    resolver: Weak<SniResolver>,
    challenges: Arc<AcmeChallenges>,
    provider: Arc<CryptoProvider>,
    metrics: ReloadMetrics,
}

impl Manager {
    async fn run(self) {
        let mut account: Option<Account> = None;
        let mut backoff: Option<Duration> = None;
        loop {
            let Some(resolver) = self.resolver.upgrade() else {
                return;
            };
            let current = resolver.managed();
            drop(resolver);
            let outcome = async {
                let account = match &account {
                    Some(account) => account,
                    None => account.insert(self.account().await?),
                };
                let due = self.renewal_due(account, current.as_deref()).await;
                let wait = due
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                if !wait.is_zero() {
                    return Ok(Some(wait.min(MAX_SLEEP)));
                }
                let replaces = current
                    .as_deref()
                    .and_then(|certificate| certificate_identifier(certificate).ok());
                tokio::time::timeout(ORDER_TIMEOUT, self.order(account, replaces))
                    .await
                    .map_err(|_| AcmeError::Timeout(ORDER_TIMEOUT))??;
                Ok::<_, AcmeError>(None)
            }
            .await;
            let pause = match outcome {
                Ok(Some(wait)) => wait,
                Ok(None) => {
                    backoff = None;
                    self.metrics.succeeded.inc();
                    continue;
                }
                Err(error) => {
                    self.metrics.failed.inc();
                    if is_unknown_account(&error) {
                        // The CA forgot the account (or never had it): register anew next time.
                        account = None;
                        let _ = std::fs::remove_file(&self.storage.account);
                    }
                    let pause = next_backoff(backoff, current.as_deref());
                    backoff = Some(pause);
                    tracing::error!(listener = %self.listener, domains = ?self.config.domains, error = %crate::error::Causes(&error), retry_in = ?pause, "ACME: no new certificate; the one in use (if any) stays");
                    pause
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// The account kept in storage, or a new one registered (and kept).
    async fn account(&self) -> Result<Account, AcmeError> {
        let path = &self.storage.account;
        let builder = || -> Result<_, AcmeError> {
            Ok(match &self.config.directory_ca {
                Some(ca) => Account::builder_with_root(ca)?,
                None => Account::builder()?,
            })
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let credentials: AccountCredentials =
                    serde_json::from_slice(&bytes).map_err(|source| AcmeError::Account {
                        path: path.clone(),
                        source,
                    })?;
                Ok(builder()?.from_credentials(credentials).await?)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory.clone(),
                        None,
                    )
                    .await?;
                let json =
                    serde_json::to_vec(&credentials).map_err(|source| AcmeError::Account {
                        path: path.clone(),
                        source,
                    })?;
                write_private(path, &json)?;
                tracing::info!(listener = %self.listener, directory = %self.config.directory, "ACME account registered");
                Ok(account)
            }
            Err(source) => Err(AcmeError::Storage {
                path: path.clone(),
                source,
            }),
        }
    }

    /// When the certificate in use should be replaced: now when there is none or it lacks a
    /// configured domain; else a random moment in the CA's renewal window (ARI), or once two
    /// thirds of its lifetime have passed.
    async fn renewal_due(
        &self,
        account: &Account,
        current: Option<&LoadedCertificate>,
    ) -> SystemTime {
        let now = SystemTime::now();
        let Some(certificate) = current else {
            return now;
        };
        if !self
            .config
            .domains
            .iter()
            .all(|domain| certificate.covers(domain))
        {
            return now;
        }
        if let Ok(identifier) = certificate_identifier(certificate) {
            match account.renewal_info(&identifier).await {
                Ok((info, _)) => {
                    let start: SystemTime = info.suggested_window.start.into();
                    let end: SystemTime = info.suggested_window.end.into();
                    let span = end.duration_since(start).unwrap_or(Duration::ZERO);
                    return start + span.mul_f64(rand::random::<f64>());
                }
                Err(instant_acme::Error::Unsupported(_)) => {}
                Err(error) => {
                    tracing::debug!(listener = %self.listener, %error, "ACME renewal information unavailable; renewing by lifetime");
                }
            }
        }
        let lifetime = certificate
            .not_after
            .duration_since(certificate.not_before)
            .unwrap_or(Duration::ZERO);
        certificate.not_before + lifetime.mul_f64(2.0 / 3.0)
    }

    /// One order, from the new order to the certificate served and stored.
    async fn order(
        &self,
        account: &Account,
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<(), AcmeError> {
        let identifiers: Vec<Identifier> = self
            .config
            .domains
            .iter()
            .map(|domain| Identifier::Dns(domain.clone()))
            .collect();
        let mut new_order = NewOrder::new(&identifiers);
        if let Some(replaces) = replaces {
            new_order = new_order.replaces(replaces);
        }
        let mut order = match account.new_order(&new_order).await {
            // A CA without renewal information refuses `replaces`; order plainly then.
            Err(instant_acme::Error::Unsupported(_)) => {
                account.new_order(&NewOrder::new(&identifiers)).await?
            }
            other => other?,
        };
        let mut answered = Answered {
            challenges: &self.challenges,
            domains: Vec::new(),
            tokens: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(AcmeError::Authorization {
                        domain: format!("{:?}", authorization.identifier().identifier),
                        status,
                    });
                }
            }
            let (kind, name) = match self.config.challenge {
                AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
                AcmeChallenge::Http01 => (ChallengeType::Http01, "http-01"),
            };
            let mut challenge = authorization
                .challenge(kind)
                .ok_or(AcmeError::NoChallenge(name))?;
            let key_authorization = challenge.key_authorization();
            match self.config.challenge {
                AcmeChallenge::TlsAlpn01 => {
                    let Identifier::Dns(domain) = challenge.identifier().identifier else {
                        return Err(AcmeError::NoChallenge(name));
                    };
                    let key = self.challenge_certificate(domain, key_authorization.digest())?;
                    self.challenges.set_tls_alpn(domain, Some(key));
                    answered.domains.push(domain.clone());
                }
                AcmeChallenge::Http01 => {
                    let token = challenge.token.clone();
                    self.challenges
                        .set_http(&token, Some(key_authorization.as_str().to_string()));
                    answered.tokens.push(token);
                }
            }
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(status));
        }
        drop(answered);

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(self.config.domains.clone())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&retries).await?;

        // Written key first, so that a reader never pairs the new certificate with the old key
        // for long; both are checked together by loading them before they are served.
        write_private(&self.storage.files.key, key.serialize_pem().as_bytes())?;
        write_private(&self.storage.files.cert, chain.as_bytes())?;
        let loaded = load_certificate(&self.storage.files, &self.provider)?;
        tracing::info!(listener = %self.listener, domains = ?self.config.domains, not_after = ?loaded.not_after, "ACME: new certificate in use");
        if let Some(resolver) = self.resolver.upgrade() {
            resolver.set_managed(Some(Arc::new(loaded)));
        }
        Ok(())
    }

    /// The self-signed certificate of a tls-alpn-01 check: the domain, and the digest of the key
    /// authorization in a critical acmeIdentifier extension.
    fn challenge_certificate(
        &self,
        domain: &str,
        digest: impl AsRef<[u8]>,
    ) -> Result<Arc<CertifiedKey>, AcmeError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![domain.to_string()])?;
        params.custom_extensions =
            vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
        let certificate = params.self_signed(&key)?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // Not `CertifiedKey::from_der`, whose consistency check parses the certificate and
        // refuses the critical acmeIdentifier extension it does not know.
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(private)
            .map_err(AcmeError::ChallengeCertificate)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(certificate.der().to_vec())],
            signing_key,
        )))
    }
}

/// Challenge answers published for one order, withdrawn when it is done whatever the outcome.
struct Answered<'a> {
    challenges: &'a AcmeChallenges,
    domains: Vec<String>,
    tokens: Vec<String>,
}

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        for domain in &self.domains {
            self.challenges.set_tls_alpn(domain, None);
        }
        for token in &self.tokens {
            self.challenges.set_http(token, None);
        }
    }
}

fn is_unknown_account(error: &AcmeError) -> bool {
    matches!(
        error,
        AcmeError::Acme(instant_acme::Error::Api(problem))
            if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist")
    )
}

/// The pause before the next try after a failure: it doubles each time up to six hours, and
/// starts at a hundredth of the certificate's lifetime (between 1 s and a minute), or at 30 s when
/// there is no certificate yet.
fn next_backoff(previous: Option<Duration>, current: Option<&LoadedCertificate>) -> Duration {
    match previous {
        Some(previous) => (previous * 2).min(MAX_BACKOFF),
        None => current
            .and_then(|certificate| {
                certificate
                    .not_after
                    .duration_since(certificate.not_before)
                    .ok()
            })
            .map_or(Duration::from_secs(30), |lifetime| {
                (lifetime / 100).clamp(Duration::from_secs(1), Duration::from_secs(60))
            }),
    }
}

/// The ARI identifier of a certificate: its issuer's key identifier and its serial number.
fn certificate_identifier(
    certificate: &LoadedCertificate,
) -> Result<CertificateIdentifier<'static>, String> {
    let leaf = certificate
        .key
        .cert
        .first()
        .ok_or_else(|| "no certificate".to_string())?;
    CertificateIdentifier::try_from(leaf).map(CertificateIdentifier::into_owned)
}

/// Writes `bytes` to `path` readable by the owner only (mode 0600), replacing the file at once:
/// written beside it, then renamed over it. The storage directory is made (mode 0700) if needed.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let failure = |source| AcmeError::Storage {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(failure)?;
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(failure)?;
    file.write_all(bytes).map_err(failure)?;
    file.sync_all().map_err(failure)?;
    std::fs::rename(&temporary, path).map_err(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sole_acme_protocol_makes_a_validation_handshake() {
        let offer =
            |protocols: &[&'static [u8]]| is_validation_handshake(protocols.iter().copied());
        assert!(offer(&[b"acme-tls/1"]));
        assert!(!offer(&[b"acme-tls/1", b"h2"]));
        assert!(!offer(&[b"h2", b"http/1.1"]));
        assert!(!offer(&[]));
    }

    #[test]
    fn private_files_are_written_for_the_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("bouncer-acme-unit-{}", std::process::id()));
        let path = dir.join("nested").join("site.key.pem");
        write_private(&path, b"first").expect("written");
        write_private(&path, b"second").expect("replaced");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("parent"))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_starts_from_the_lifetime_and_doubles_to_a_cap() {
        assert_eq!(next_backoff(None, None), Duration::from_secs(30));
        assert_eq!(
            next_backoff(Some(Duration::from_secs(30)), None),
            Duration::from_secs(60)
        );
        assert_eq!(next_backoff(Some(MAX_BACKOFF), None), MAX_BACKOFF);
    }
}
