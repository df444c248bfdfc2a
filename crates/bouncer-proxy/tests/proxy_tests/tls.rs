//! TLS termination: certificates chosen by SNI (exact, wildcard, unknown, strict), ALPN, TLS
//! versions, 421 for a host the connection's certificate does not cover, handshake timeouts, and
//! broken certificates refused at start.

use std::path::PathBuf;
use std::time::Duration;

use bouncer_testkit::tls::{TlsClient, Trust, leaf_der};
use bouncer_testkit::{Backend, TestCa, TestCertificate, TestProxy, metric};
use tokio::io::AsyncReadExt;

const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

struct Site {
    ca: TestCa,
    app: TestCertificate,
    other: TestCertificate,
    dir: PathBuf,
}

impl Site {
    fn new(test: &str) -> Site {
        let ca = TestCa::new("Bouncer test CA");
        let app = ca.issue(&["app.example", "*.app.example"]);
        let other = ca.issue(&["other.example"]);
        let dir = std::env::temp_dir().join(format!("bouncer-tls-{test}-{}", std::process::id()));
        app.write(&dir, "app");
        other.write(&dir, "other");
        Site {
            ca,
            app,
            other,
            dir,
        }
    }

    fn config(&self, backend: &Backend, tls_keys: &str) -> String {
        let dir = self.dir.display();
        format!(
            r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"
[listeners.tls]
certificates = [
  {{ cert = "{dir}/app.pem", key = "{dir}/app.key" }},
  {{ cert = "{dir}/other.pem", key = "{dir}/other.key" }},
]
handshake_timeout = "300ms"
{tls_keys}

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["{backend}"]

[access_log]
format = "off"
"#,
            backend = backend.address
        )
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn address(proxy: &TestProxy) -> std::net::SocketAddr {
    proxy.address
}

#[tokio::test]
async fn the_certificate_is_chosen_by_sni_exact_wildcard_or_default() {
    let site = Site::new("sni");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let verified = TlsClient::new(Trust::Ca(&site.ca.cert_pem), &["http/1.1"], BOTH);
    for (name, expected) in [
        ("other.example", &site.other),
        ("app.example", &site.app),
        ("shop.app.example", &site.app),
    ] {
        let mut connection = verified.connect(address(&proxy), name).await.unwrap();
        assert_eq!(connection.leaf, leaf_der(&expected.cert_pem), "{name}");
        let answer = connection.get(name, "/").await;
        assert_eq!(answer.status, 200, "{name}");
    }
    // A name no certificate covers gets the default, the first one.
    let anything = TlsClient::new(Trust::Anything, &["http/1.1"], BOTH);
    let connection = anything
        .connect(address(&proxy), "unknown.example")
        .await
        .unwrap();
    assert_eq!(connection.leaf, leaf_der(&site.app.cert_pem));
}

#[tokio::test]
async fn strict_sni_refuses_unknown_names() {
    let site = Site::new("strict");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "strict_sni = true")).await;
    let anything = TlsClient::new(Trust::Anything, &["http/1.1"], BOTH);
    assert!(
        anything
            .connect(address(&proxy), "unknown.example")
            .await
            .is_err()
    );
    assert!(
        anything
            .connect(address(&proxy), "other.example")
            .await
            .is_ok()
    );
    let text = proxy.scrape().await;
    assert!(text.contains("reason=\"tls_handshake\"} 1"), "{text}");
    let handshakes = |result: &str| {
        metric(
            &text,
            &format!("bouncer_tls_handshakes_total{{listener=\"public\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(handshakes("no_certificate"), Some(1.0));
    assert_eq!(handshakes("ok"), Some(1.0));
}

#[tokio::test]
async fn plain_http_to_a_tls_listener_counts_as_not_tls() {
    use tokio::io::AsyncWriteExt;

    let site = Site::new("not-tls");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let mut plain = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut rest)).await;
    assert_eq!(backend.count(), 0);
    let result = "bouncer_tls_handshakes_total{listener=\"public\",result=\"not_tls\"}";
    bouncer_testkit::eventually(Duration::from_secs(5), "the refusal is counted", || async {
        metric(&proxy.scrape().await, result) == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn alpn_chooses_http2_or_http1_and_backends_hear_https() {
    let site = Site::new("alpn");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    for (offered, chosen) in [
        (&["h2", "http/1.1"][..], "h2"),
        (&["http/1.1"][..], "http/1.1"),
    ] {
        let client = TlsClient::new(Trust::Ca(&site.ca.cert_pem), offered, BOTH);
        let mut connection = client
            .connect(address(&proxy), "app.example")
            .await
            .unwrap();
        assert_eq!(connection.alpn.as_deref(), Some(chosen.as_bytes()));
        let answer = connection.get("app.example", "/").await;
        assert_eq!(answer.status, 200);
        let seen = backend.last_request();
        assert_eq!(
            seen.headers
                .get("x-forwarded-proto")
                .and_then(|value| value.to_str().ok()),
            Some("https")
        );
    }
}

#[tokio::test]
async fn tls_1_2_is_served_unless_the_minimum_is_1_3() {
    let site = Site::new("versions");
    let backend = Backend::start(0).await;
    let only_1_2 = TlsClient::new(
        Trust::Ca(&site.ca.cert_pem),
        &["http/1.1"],
        &[&rustls::version::TLS12],
    );
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let mut connection = only_1_2
        .connect(address(&proxy), "app.example")
        .await
        .unwrap();
    assert_eq!(connection.version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(connection.get("app.example", "/").await.status, 200);
    let modern = TestProxy::start(&site.config(&backend, "min_version = \"1.3\"")).await;
    assert!(
        only_1_2
            .connect(address(&modern), "app.example")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_host_outside_the_sni_certificate_gets_421() {
    let site = Site::new("misdirected");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let client = TlsClient::new(Trust::Ca(&site.ca.cert_pem), &["h2", "http/1.1"], BOTH);
    let mut connection = client
        .connect(address(&proxy), "other.example")
        .await
        .unwrap();
    assert_eq!(connection.get("app.example", "/").await.status, 421);
    assert_eq!(connection.get("other.example", "/").await.status, 200);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn a_stuck_handshake_is_closed_after_the_handshake_timeout() {
    let site = Site::new("timeout");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let mut silent = tokio::net::TcpStream::connect(address(&proxy))
        .await
        .unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buffer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open: {read:?}"
    );
    let text = proxy.scrape().await;
    assert_eq!(
        metric(
            &text,
            "bouncer_refusals_total{listener=\"public\",layer=\"tls\",reason=\"tls_handshake_timeout\"}"
        ),
        Some(1.0)
    );
}

/// Why the proxy refused to start with the site's certificates.
async fn start_error(site: &Site) -> String {
    let backend = Backend::start(0).await;
    let config =
        bouncer_config::parse(std::path::Path::new("t.toml"), &site.config(&backend, "")).unwrap();
    let error = bouncer_proxy::start(&config)
        .await
        .err()
        .expect("the start must fail");
    format!(
        "{error}: {}",
        std::error::Error::source(&error)
            .map(ToString::to_string)
            .unwrap_or_default()
    )
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_stops_the_start() {
    let site = Site::new("mismatch");
    // The other certificate's key under the app certificate.
    std::fs::copy(site.dir.join("other.key"), site.dir.join("app.key")).unwrap();
    let chain = start_error(&site).await;
    assert!(
        chain.contains("does not belong to the certificate"),
        "{chain}"
    );
}

#[tokio::test]
async fn an_expired_certificate_stops_the_start() {
    let site = Site::new("expired");
    site.ca
        .issue_expired(&["app.example"])
        .write(&site.dir, "app");
    let chain = start_error(&site).await;
    assert!(chain.contains("app.pem expired"), "{chain}");
}

#[tokio::test]
async fn plain_http_is_redirected_to_https_except_acme_challenges_and_https_adds_hsts() {
    let site = Site::new("redirect");
    let backend = Backend::start(0).await;
    let toml = site
        .config(&backend, "hsts = \"max-age=63072000; includeSubDomains\"")
        .replace(
            "[[routes]]",
            "[[listeners]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\nredirect_to_https = \"public\"\n\n[[routes]]",
        );
    let proxy = TestProxy::start(&toml).await;
    let http = proxy.proxy.listener_address("http").unwrap();
    let https_port = proxy.address.port();
    let clients = bouncer_testkit::Clients::new();
    let request = http::Request::post(format!("http://{http}/cart?item=7"))
        .header("host", "app.example")
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = clients.send(request).await;
    assert_eq!(answer.status, 308);
    assert_eq!(
        answer.header("location"),
        Some(format!("https://app.example:{https_port}/cart?item=7").as_str())
    );
    assert_eq!(backend.count(), 0);
    // ACME http-01 challenges go through to the backend over plain HTTP.
    let challenge = clients
        .get(&format!("http://{http}/.well-known/acme-challenge/token"))
        .await;
    assert_eq!(challenge.status, 200);
    assert_eq!(backend.count(), 1);

    let client = TlsClient::new(Trust::Ca(&site.ca.cert_pem), &["h2"], BOTH);
    let mut connection = client.connect(proxy.address, "app.example").await.unwrap();
    let answer = connection.get("app.example", "/").await;
    assert_eq!(
        answer.header("strict-transport-security"),
        Some("max-age=63072000; includeSubDomains")
    );
    // Error answers carry it too.
    let answer = connection.get("other.example", "/").await;
    assert_eq!(answer.status, 421);
    assert!(answer.header("strict-transport-security").is_some());
}

#[tokio::test]
async fn changed_certificate_files_are_used_by_new_handshakes_while_old_connections_go_on() {
    use http_body_util::BodyExt;

    let site = Site::new("reload");
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let client = TlsClient::new(Trust::Ca(&site.ca.cert_pem), &["http/1.1"], BOTH);

    // A long download on a connection made with the first certificate.
    let mut old = client.connect(proxy.address, "app.example").await.unwrap();
    assert_eq!(old.leaf, leaf_der(&site.app.cert_pem));
    let total: u64 = 32 << 20;
    let mut download = old
        .start_get("app.example", &format!("/bytes/{total}"))
        .await
        .into_body();
    let mut received = 0u64;
    while received < 1 << 20 {
        let frame = download.frame().await.unwrap().unwrap();
        received += frame.data_ref().map_or(0, |data| data.len() as u64);
    }

    let renewed = site.ca.issue(&["app.example", "*.app.example"]);
    renewed.write(&site.dir, "app");
    bouncer_testkit::eventually(
        Duration::from_secs(10),
        "new handshakes get the new certificate",
        || async {
            client
                .connect(proxy.address, "app.example")
                .await
                .unwrap()
                .leaf
                == leaf_der(&renewed.cert_pem)
        },
    )
    .await;

    // A broken file is refused, counted, and the renewed certificate stays. (The renewal itself
    // may have counted a failure, when the new certificate was seen before its new key.)
    let failures = "bouncer_tls_certificate_reloads_total{listener=\"public\",result=\"failure\"}";
    let before = metric(&proxy.scrape().await, failures).unwrap_or(0.0);
    std::fs::write(
        site.dir.join("app.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    bouncer_testkit::eventually(
        Duration::from_secs(10),
        "the broken file is refused",
        || async { metric(&proxy.scrape().await, failures).unwrap_or(0.0) > before },
    )
    .await;
    let connection = client.connect(proxy.address, "app.example").await.unwrap();
    assert_eq!(connection.leaf, leaf_der(&renewed.cert_pem));

    while let Some(frame) = download.frame().await {
        received += frame
            .unwrap()
            .data_ref()
            .map_or(0, |data| data.len() as u64);
    }
    assert_eq!(
        received, total,
        "the download on the old connection broke off"
    );
}

/// A site whose listener asks for client certificates from a CA of its own.
async fn mutual_tls_site(test: &str, required: bool) -> (Site, TestCa, Backend, TestProxy) {
    let site = Site::new(test);
    let clients_ca = TestCa::new("clients CA");
    std::fs::write(site.dir.join("clients-ca.pem"), &clients_ca.cert_pem).unwrap();
    let backend = Backend::start(0).await;
    let keys = format!(
        "client_auth = {{ ca = \"{}/clients-ca.pem\", required = {required}, subject_header = \"X-Client-Subject\" }}",
        site.dir.display()
    );
    let proxy = TestProxy::start(&site.config(&backend, &keys)).await;
    (site, clients_ca, backend, proxy)
}

/// Sends `GET /` with a forged subject header; the answer's status, or `None` when the handshake
/// or the request failed.
async fn forged_get(client: &TlsClient, proxy: &TestProxy) -> Option<u16> {
    let mut connection = client.connect(proxy.address, "app.example").await.ok()?;
    let request = http::Request::get("/")
        .header("host", "app.example")
        .header("x-client-subject", "CN=admin")
        .body(bouncer_testkit::empty())
        .unwrap();
    connection
        .send(request)
        .await
        .map(|answer| answer.status.as_u16())
}

#[tokio::test]
async fn mutual_tls_passes_the_verified_subject_and_drops_a_forged_one() {
    let (site, clients_ca, backend, proxy) = mutual_tls_site("mtls-required", true).await;
    let alice = clients_ca.issue(&["alice"]);
    let with_certificate = TlsClient::with_identity(
        Trust::Ca(&site.ca.cert_pem),
        &["http/1.1"],
        BOTH,
        Some(&alice),
    );
    assert_eq!(forged_get(&with_certificate, &proxy).await, Some(200));
    let seen = backend.last_request();
    assert_eq!(
        seen.headers
            .get("x-client-subject")
            .and_then(|value| value.to_str().ok()),
        Some("CN=alice")
    );
    assert_eq!(seen.headers.get_all("x-client-subject").iter().count(), 1);

    // Without a certificate, or with one of another CA, nothing gets through.
    let without = TlsClient::new(Trust::Ca(&site.ca.cert_pem), &["http/1.1"], BOTH);
    assert_eq!(forged_get(&without, &proxy).await, None);
    let stranger = TestCa::new("another CA").issue(&["mallory"]);
    let foreign = TlsClient::with_identity(
        Trust::Ca(&site.ca.cert_pem),
        &["http/1.1"],
        BOTH,
        Some(&stranger),
    );
    assert_eq!(forged_get(&foreign, &proxy).await, None);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn optional_client_certificates_let_anonymous_clients_in_without_a_subject() {
    let (site, _clients_ca, backend, proxy) = mutual_tls_site("mtls-optional", false).await;
    let without = TlsClient::new(Trust::Ca(&site.ca.cert_pem), &["http/1.1"], BOTH);
    assert_eq!(forged_get(&without, &proxy).await, Some(200));
    assert_eq!(backend.last_request().headers.get("x-client-subject"), None);
}

/// A proxy in front of `backend` with `[upstreams.app.tls]` set to `tls_keys`.
async fn proxy_to_tls_backend(backend: &Backend, tls_keys: &str) -> TestProxy {
    let toml = bouncer_testkit::config_with_upstream_keys(
        std::slice::from_ref(backend),
        "",
        &format!("[upstreams.app.tls]\n{tls_keys}"),
    );
    TestProxy::start(&toml).await
}

#[tokio::test]
async fn backends_are_reached_over_tls_verified_against_a_private_ca() {
    let site = Site::new("upstream-tls");
    let internal_ca = TestCa::new("internal CA");
    std::fs::write(site.dir.join("internal-ca.pem"), &internal_ca.cert_pem).unwrap();
    let ca_key = format!("ca = \"{}/internal-ca.pem\"", site.dir.display());
    let clients = bouncer_testkit::Clients::new();

    // The certificate names the backend's address.
    let by_address = Backend::start_tls(0, &internal_ca.issue(&["127.0.0.1"])).await;
    let proxy = proxy_to_tls_backend(&by_address, &ca_key).await;
    let answer = clients.get(&proxy.url("/")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(by_address.count(), 1);

    // Or a name given as server_name.
    let by_name = Backend::start_tls(1, &internal_ca.issue(&["app.internal"])).await;
    let proxy = proxy_to_tls_backend(
        &by_name,
        &format!("{ca_key}\nserver_name = \"app.internal\""),
    )
    .await;
    assert_eq!(clients.get(&proxy.url("/")).await.status, 200);

    // A certificate of another CA is refused: no request reaches that backend.
    let stranger = Backend::start_tls(2, &TestCa::new("another CA").issue(&["127.0.0.1"])).await;
    let proxy = proxy_to_tls_backend(&stranger, &ca_key).await;
    assert_eq!(clients.get(&proxy.url("/")).await.status, 502);
    assert_eq!(stranger.count(), 0);
}

/// Runs a command to its end (bounded by a deadline) and returns its exit success and output.
async fn run(program: &str, args: &[&str]) -> (bool, String) {
    run_with_input(program, args, b"").await
}

/// Like [`run`], with `input` on the command's standard input.
async fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> (bool, String) {
    use tokio::io::AsyncWriteExt;

    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the command ran");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).await.expect("write the input");
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the command finished in time")
        .expect("the command's output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn curl_and_openssl_see_sni_alpn_and_versions() {
    let site = Site::new("cli-clients");
    let ca = site.dir.join("ca.pem");
    std::fs::write(&ca, &site.ca.cert_pem).unwrap();
    let ca = ca.display().to_string();
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let port = proxy.address.port();
    let resolve = format!("app.example:{port}:127.0.0.1");
    let url = format!("https://app.example:{port}/");

    for (flags, expected) in [
        (&["--http2"][..], "2 200"),
        (&["--http1.1"][..], "1.1 200"),
        (
            &["--http1.1", "--tlsv1.2", "--tls-max", "1.2"][..],
            "1.1 200",
        ),
    ] {
        let mut args = vec![
            "-sS",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "-o",
            "/dev/null",
        ];
        args.extend_from_slice(&["-w", "%{http_version} %{http_code}"]);
        args.extend_from_slice(flags);
        args.push(&url);
        let (ok, text) = run("curl", &args).await;
        assert!(ok, "curl {args:?}: {text}");
        assert_eq!(text.trim(), expected, "curl {args:?}");
    }

    let connect = format!("127.0.0.1:{port}");
    let (ok, text) = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            "other.example",
            "-alpn",
            "h2",
            "-CAfile",
            &ca,
        ],
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    assert!(
        text.contains("CN = other.example") || text.contains("CN=other.example"),
        "{text}"
    );
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");

    // TLS 1.1 is never accepted, even from a client willing to use it.
    let (_, text) = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            "app.example",
            "-tls1_1",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ],
    )
    .await;
    // The server refuses with an alert: no cipher suite is agreed.
    assert!(text.contains("Cipher is (NONE)"), "{text}");
    assert!(text.contains("alert"), "{text}");
}

#[tokio::test]
async fn openssl_resumes_a_session_with_a_ticket() {
    let site = Site::new("resumption");
    let ca = site.dir.join("ca.pem");
    std::fs::write(&ca, &site.ca.cert_pem).unwrap();
    let ca = ca.display().to_string();
    let session = site.dir.join("session.pem").display().to_string();
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&site.config(&backend, "")).await;
    let connect = format!("127.0.0.1:{}", proxy.address.port());
    // A request, so that the client stays to read the tickets that TLS 1.3 sends after the handshake.
    let request = b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n";
    // -ign_eof: the client waits for the answer (and the tickets) after its input ends.
    let common = [
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "app.example",
        "-CAfile",
        &ca,
        "-ign_eof",
    ];
    let mut first = common.to_vec();
    first.extend_from_slice(&["-sess_out", &session]);
    let (ok, text) = run_with_input("openssl", &first, request).await;
    assert!(ok, "{text}");
    assert!(text.contains("\nNew, TLSv1.3"), "{text}");
    let mut second = common.to_vec();
    second.extend_from_slice(&["-sess_in", &session]);
    let (ok, text) = run_with_input("openssl", &second, request).await;
    assert!(ok, "{text}");
    assert!(
        text.contains("Reused, TLSv1.3"),
        "the session was not resumed: {text}"
    );
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn the_proxy_presents_its_client_certificate_to_backends_that_require_one() {
    let site = Site::new("upstream-mtls");
    let internal_ca = TestCa::new("internal CA");
    let proxy_ca = TestCa::new("proxy identity CA");
    std::fs::write(site.dir.join("internal-ca.pem"), &internal_ca.cert_pem).unwrap();
    proxy_ca
        .issue(&["bouncer.internal"])
        .write(&site.dir, "proxy");
    let backend = Backend::start_tls_with(
        0,
        &internal_ca.issue(&["127.0.0.1"]),
        Some(&proxy_ca.cert_pem),
    )
    .await;
    let dir = site.dir.display();
    let clients = bouncer_testkit::Clients::new();

    let with_identity = proxy_to_tls_backend(
        &backend,
        &format!("ca = \"{dir}/internal-ca.pem\"\nclient_cert = {{ cert = \"{dir}/proxy.pem\", key = \"{dir}/proxy.key\" }}"),
    )
    .await;
    assert_eq!(clients.get(&with_identity.url("/")).await.status, 200);

    let without = proxy_to_tls_backend(&backend, &format!("ca = \"{dir}/internal-ca.pem\"")).await;
    assert_eq!(clients.get(&without.url("/")).await.status, 502);
    assert_eq!(backend.count(), 1);
}
