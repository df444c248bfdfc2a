use std::time::Duration;

use bouncer_testkit::{Backend, TestProxy, config_for, metric, raw_exchange};

const WAIT: Duration = Duration::from_secs(5);

async fn proxy_protocol_proxy(backends: &[Backend], trusted: &str) -> TestProxy {
    let config = config_for(backends, "").replace(
        "name = \"public\"\nbind = \"127.0.0.1:0\"",
        &format!("name = \"public\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"{trusted}\"]"),
    );
    TestProxy::start(&config).await
}

#[tokio::test]
async fn the_client_address_comes_from_a_version_1_header() {
    let backends = Backend::start_many(1).await;
    let proxy = proxy_protocol_proxy(&backends, "127.0.0.0/8").await;
    let reply = raw_exchange(
        proxy.address,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // The client named by the header is not itself trusted, so its own X-Forwarded-For is dropped.
    assert_eq!(
        backends[0].last_request().headers["x-forwarded-for"],
        "203.0.113.7"
    );
}

#[tokio::test]
async fn the_client_address_comes_from_a_version_2_header() {
    let backends = Backend::start_many(1).await;
    let proxy = proxy_protocol_proxy(&backends, "127.0.0.0/8").await;
    let mut request = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    request.extend_from_slice(&[198, 51, 100, 9, 127, 0, 0, 1, 0x30, 0x39, 0, 80]);
    request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let reply = raw_exchange(proxy.address, &request, WAIT).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(
        backends[0].last_request().headers["x-forwarded-for"],
        "198.51.100.9"
    );
}

#[tokio::test]
async fn connections_without_a_header_or_from_untrusted_peers_are_refused() {
    let backends = Backend::start_many(1).await;
    let proxy = proxy_protocol_proxy(&backends, "127.0.0.0/8").await;
    let reply = raw_exchange(proxy.address, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", WAIT).await;
    assert_eq!(reply, "");

    let untrusting = proxy_protocol_proxy(&backends, "10.0.0.0/8").await;
    let reply = raw_exchange(
        untrusting.address,
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(reply, "");
    assert_eq!(backends[0].count(), 0);
    let text = proxy.scrape().await;
    assert_eq!(
        metric(
            &text,
            "bouncer_refusals_total{listener=\"public\",layer=\"connection\",reason=\"proxy_protocol\"}"
        ),
        Some(1.0)
    );
}
