//! ACME against a real CA on loopback (Debian's pebble, its DNS answered by pebble-challtestsrv):
//! issuance with tls-alpn-01 and http-01, renewal, the old certificate kept through a CA outage,
//! and the stored certificate served after a restart without asking the CA.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use bouncer_testkit::pebble::{Pebble, PebbleSettings, free_port};
use bouncer_testkit::tls::{TlsClient, Trust};
use bouncer_testkit::{Backend, TestProxy, metric};

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The certificate served for `name`: its DER, issuer and names; `None` while there is none.
async fn served(address: SocketAddr, name: &str) -> Option<(Vec<u8>, String, Vec<String>)> {
    let client = TlsClient::new(Trust::Anything, &["http/1.1"], TLS13);
    let connection = client.connect(address, name).await.ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&connection.leaf).ok()?;
    let names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|names| {
            names
                .value
                .general_names
                .iter()
                .map(ToString::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some((connection.leaf.clone(), parsed.issuer().to_string(), names))
}

/// Waits for a certificate from pebble for `name` other than `previous`.
async fn wait_for_new_certificate(
    address: SocketAddr,
    name: &str,
    previous: Option<&[u8]>,
    pebble: &Pebble,
    deadline: Duration,
) -> Vec<u8> {
    let start = tokio::time::Instant::now();
    loop {
        if let Some((leaf, issuer, _)) = served(address, name).await
            && issuer.contains("Pebble")
            && previous != Some(leaf.as_slice())
        {
            return leaf;
        }
        assert!(
            start.elapsed() < deadline,
            "no new certificate from pebble for {name}; pebble's log:\n{}",
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn acme_config(
    pebble: &Pebble,
    https_port: u16,
    plain_port: Option<u16>,
    challenge: &str,
    backend: &Backend,
) -> String {
    let plain = plain_port.map_or_else(String::new, |port| {
        format!(
            "[[listeners]]\nname = \"http\"\nbind = \"127.0.0.1:{port}\"\nredirect_to_https = \"https\"\n"
        )
    });
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "https"
bind = "127.0.0.1:{https_port}"
[listeners.tls]
acme = {{ domains = ["acme.test", "www.acme.test"], contact = "mailto:ops@acme.test", directory = "{directory}", directory_ca = "{ca}", storage = "{storage}", challenge = "{challenge}" }}

{plain}

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["{backend}"]

[access_log]
format = "off"
"#,
        directory = pebble.directory,
        ca = pebble.directory_ca.display(),
        storage = pebble.dir().join("storage").display(),
        backend = backend.address,
    )
}

fn assert_private(path: &Path) {
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", path.display());
}

#[tokio::test]
async fn tls_alpn_01_issues_renews_and_keeps_the_old_certificate_through_an_outage() {
    let backend = Backend::start(0).await;
    let https_port = free_port();
    let mut pebble = Pebble::start(
        "alpn",
        PebbleSettings {
            http_port: free_port(),
            tls_port: https_port,
            validity: Duration::from_secs(12),
        },
    )
    .await;
    let proxy = TestProxy::start(&acme_config(
        &pebble,
        https_port,
        None,
        "tls-alpn-01",
        &backend,
    ))
    .await;
    let address = proxy.address;

    let first =
        wait_for_new_certificate(address, "acme.test", None, &pebble, Duration::from_secs(30))
            .await;
    let (_, _, names) = served(address, "www.acme.test")
        .await
        .expect("a certificate");
    assert!(
        names.iter().any(|name| name.contains("www.acme.test")),
        "{names:?}"
    );
    let storage = pebble.dir().join("storage");
    assert_private(&storage.join("acme.test.crt.pem"));
    assert_private(&storage.join("acme.test.key.pem"));
    let account = std::fs::read_dir(&storage)
        .unwrap()
        .filter_map(Result::ok)
        .find(|entry| entry.file_name().to_string_lossy().starts_with("account-"))
        .expect("the account is stored");
    assert_private(&account.path());

    // Requests are served with it.
    let client = TlsClient::new(Trust::Anything, &["http/1.1"], TLS13);
    let mut connection = client.connect(address, "acme.test").await.unwrap();
    assert_eq!(connection.get("acme.test", "/").await.status, 200);

    // Renewal at two thirds of the 12 s lifetime.
    let second = wait_for_new_certificate(
        address,
        "acme.test",
        Some(&first),
        &pebble,
        Duration::from_secs(30),
    )
    .await;

    // The CA goes away: renewal fails, and the certificate in use stays.
    pebble.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let failures = metric(
            &proxy.scrape().await,
            "bouncer_acme_certificates_total{listener=\"https\",result=\"failure\"}",
        )
        .unwrap_or(0.0);
        if failures >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed renewal was counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (still, _, _) = served(address, "acme.test").await.expect("a certificate");
    assert_eq!(
        still, second,
        "the certificate in use stays while renewal fails"
    );

    // The CA comes back without the account; the proxy registers again and renews.
    pebble.restart().await;
    wait_for_new_certificate(
        address,
        "acme.test",
        Some(&second),
        &pebble,
        Duration::from_secs(40),
    )
    .await;
    let successes = metric(
        &proxy.scrape().await,
        "bouncer_acme_certificates_total{listener=\"https\",result=\"success\"}",
    );
    assert!(successes.is_some_and(|count| count >= 3.0), "{successes:?}");
}

#[tokio::test]
async fn http_01_issues_and_a_restart_serves_the_stored_certificate() {
    let backend = Backend::start(0).await;
    let (http_port, https_port) = (free_port(), free_port());
    let mut pebble = Pebble::start(
        "http01",
        PebbleSettings {
            http_port,
            tls_port: free_port(),
            validity: Duration::from_secs(3600),
        },
    )
    .await;
    let config = acme_config(&pebble, https_port, Some(http_port), "http-01", &backend);
    let proxy = TestProxy::start(&config).await;
    let address = proxy.address;
    let issued =
        wait_for_new_certificate(address, "acme.test", None, &pebble, Duration::from_secs(30))
            .await;
    // The challenges went to the proxy itself, never to the backend.
    assert!(backend.requests().iter().all(|request| {
        !request
            .uri
            .path()
            .starts_with("/.well-known/acme-challenge/")
    }),);
    proxy.proxy.shutdown().await;

    // Without the CA, a new proxy serves the stored certificate from its first handshake.
    pebble.stop().await;
    let restarted = TestProxy::start(&config).await;
    let (leaf, _, _) = served(restarted.address, "acme.test")
        .await
        .expect("the stored certificate is served at once");
    assert_eq!(leaf, issued);
}
