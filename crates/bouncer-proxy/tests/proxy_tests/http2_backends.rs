//! HTTP/2 to the backends: `protocol = "h2c"` (cleartext, prior knowledge) and `"h2"` (over TLS,
//! by ALPN), with requests multiplexed on one connection per backend.

use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestCa, TestProxy, eventually, full, read_head};
use http::{Request, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A test backend behind a proxy that speaks cleartext HTTP/2 to it.
async fn h2c_proxy() -> (Backend, TestProxy) {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::start(&bouncer_testkit::config_with_upstream_keys(
        std::slice::from_ref(&backend),
        "protocol = \"h2c\"",
        "",
    ))
    .await;
    (backend, proxy)
}

#[tokio::test]
async fn h2c_backends_take_concurrent_requests_on_one_connection() {
    let (backend, proxy) = h2c_proxy().await;
    let clients = Clients::new();
    let requests = (0..20).map(|index| {
        let clients = clients.clone();
        let url = proxy.url(&format!("/delay/20?n={index}"));
        async move { clients.get(&url).await.status }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(backend.count(), 20);
    assert_eq!(backend.connections(), 1, "one multiplexed connection");

    // HTTP/2 names the host in :authority, not in a Host header.
    let seen = backend.last_request();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(
        seen.uri.authority().map(|authority| authority.as_str()),
        Some(proxy.address.to_string().as_str())
    );
    assert_eq!(seen.uri.scheme_str(), Some("http"));

    // Bodies stream both ways intact; trailers reach an HTTP/2 client.
    let body: Vec<u8> = (0..3_000_000u32).map(|index| (index % 251) as u8).collect();
    let echoed = clients
        .send(
            Request::post(proxy.url("/echo"))
                .body(full(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(echoed.status, 200);
    assert!(echoed.body == body, "the echoed body differs");
    let with_trailers = clients
        .send(
            Request::get(proxy.url("/trailers"))
                .version(Version::HTTP_2)
                .body(bouncer_testkit::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(with_trailers.status, 200);
    assert!(
        with_trailers
            .trailers
            .as_ref()
            .is_some_and(|trailers| trailers.contains_key("x-checksum")),
        "{with_trailers:?}"
    );
    assert_eq!(backend.connections(), 1);
}

#[tokio::test]
async fn h2_backends_are_reached_over_tls_and_health_checked_the_same_way() {
    let internal_ca = TestCa::new("internal CA");
    let dir = std::env::temp_dir().join(format!("bouncer-h2-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("internal-ca.pem"), &internal_ca.cert_pem).unwrap();
    let backend = Backend::start_tls(0, &internal_ca.issue(&["127.0.0.1"])).await;
    let proxy = TestProxy::start(&bouncer_testkit::config_with_upstream_keys(
        std::slice::from_ref(&backend),
        &format!(
            "protocol = \"h2\"\nhealth_check = {{ path = \"/health\", interval = \"50ms\", timeout = \"1s\" }}\n[upstreams.app.tls]\nca = \"{}/internal-ca.pem\"",
            dir.display()
        ),
        "",
    ))
    .await;

    // Health checks speak the backend's protocol over TLS, each on a connection of its own.
    eventually(
        Duration::from_secs(5),
        "a health check over TLS",
        || async {
            backend.requests().iter().any(|request| {
                request.uri.path() == "/health" && request.version == Version::HTTP_2
            })
        },
    )
    .await;

    let clients = Clients::new();
    for _ in 0..5 {
        let answer = clients.get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let traffic: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|request| request.uri.path() == "/")
        .collect();
    assert_eq!(traffic.len(), 5);
    assert!(
        traffic
            .iter()
            .all(|request| request.version == Version::HTTP_2)
    );
    assert_eq!(traffic[0].uri.scheme_str(), Some("https"));
    assert_eq!(
        proxy_metric_requests(&proxy).await,
        Some(5.0),
        "the backend was up throughout"
    );
}

async fn proxy_metric_requests(proxy: &TestProxy) -> Option<f64> {
    let text = proxy.scrape().await;
    bouncer_testkit::metric(
        &text,
        "bouncer_requests_total{listener=\"public\",route=\"app\",upstream=\"app\",status_class=\"2xx\"}",
    )
}

#[tokio::test]
async fn websocket_upgrades_to_an_http2_upstream_go_on_http1() {
    let (backend, proxy) = h2c_proxy().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    assert_eq!(backend.last_request().version, Version::HTTP_11);
}

#[tokio::test]
async fn a_backend_that_closed_its_http2_connection_gets_a_new_one() {
    let (backend, proxy) = h2c_proxy().await;
    let clients = Clients::new();
    assert_eq!(clients.get(&proxy.url("/")).await.status, 200);
    // The backend drops every connection it has; the proxy's next request opens a new one.
    backend.close_connections();
    eventually(Duration::from_secs(5), "the connection closed", || async {
        backend.open_connections() == 0
    })
    .await;
    let answer = clients.get(&proxy.url("/")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(backend.connections(), 2);
}
