use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, config_for, raw_exchange};
use http::StatusCode;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn malformed_and_ambiguous_requests_get_400_and_never_reach_a_backend() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let cases: [(&str, &[u8]); 7] = [
        (
            "conflicting lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        ),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "unknown coding",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        ("no host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        (
            "bad header bytes",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad\x01: yes\r\n\r\n",
        ),
        (
            "bad percent encoding",
            b"GET /%g0 HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
    ];
    for (name, request) in cases {
        let reply = raw_exchange(proxy.address, request, WAIT).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{name}: {reply}");
    }
    assert_eq!(
        backends[0].count(),
        0,
        "a malformed request reached the backend"
    );
}

/// RFC 9112 section 6.3: with both headers, only the chunked framing is used, and the client
/// connection is closed after the response so that nothing can be smuggled behind it.
#[tokio::test]
async fn a_request_with_both_lengths_is_forwarded_chunked_only_and_the_connection_closed() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let reply = raw_exchange(
        proxy.address,
        b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        WAIT,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with("\r\n\r\n5"),
        "one response, then the connection closed: {reply}"
    );
    let requests = backends[0].requests();
    assert_eq!(
        requests.len(),
        1,
        "nothing was smuggled behind the first request"
    );
    assert_eq!(requests[0].body_bytes, 5);
    assert!(!requests[0].headers.contains_key("content-length"));
    assert_eq!(requests[0].headers["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn connect_is_refused() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let reply = raw_exchange(
        proxy.address,
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nmax_header_bytes = \"8KiB\"").await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(20_000)
    );
    let reply = raw_exchange(proxy.address, request.as_bytes(), WAIT).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert_eq!(backends[0].count(), 0);
}

#[tokio::test]
async fn a_refused_connection_is_502() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let config = format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
[[routes]]
upstream = "gone"
[upstreams.gone]
servers = ["{closed_port}"]
[access_log]
format = "off"
"#
    );
    let proxy = TestProxy::start(&config).await;
    let answer = Clients::new().get(&proxy.url("/")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.text(), "backend unavailable\n");
}

#[tokio::test]
async fn a_reset_is_502_and_a_slow_backend_is_504() {
    let backends = Backend::start_many(1).await;
    let config = config_for(&backends, "")
        .replace("response_timeout = \"5s\"", "response_timeout = \"200ms\"");
    let proxy = TestProxy::start(&config).await;
    let clients = Clients::new();
    assert_eq!(
        clients.get(&proxy.url("/reset")).await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        clients.get(&proxy.url("/hang")).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    // The proxy still serves normally afterwards.
    assert_eq!(clients.get(&proxy.url("/")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_backend_silent_inside_a_body_is_cut_off_after_the_read_timeout() {
    let backends = Backend::start_many(1).await;
    let config =
        config_for(&backends, "").replace("read_timeout = \"5s\"", "read_timeout = \"200ms\"");
    let proxy = TestProxy::start(&config).await;
    let response = Clients::new()
        .http1
        .request(
            http::Request::get(proxy.url("/partial/1000"))
                .body(bouncer_testkit::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body =
        tokio::time::timeout(WAIT, http_body_util::BodyExt::collect(response.into_body())).await;
    assert!(
        matches!(body, Ok(Err(_))),
        "the client saw the body fail rather than hang or end short"
    );
}
