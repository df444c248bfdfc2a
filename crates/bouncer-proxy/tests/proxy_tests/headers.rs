use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, config_for, raw_exchange};
use http::Request;

#[tokio::test]
async fn an_untrusted_client_cannot_forge_forwarding_headers() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let request = Request::get(proxy.url("/"))
        .header("host", "app.example")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "forged-id")
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = Clients::new().send(request).await;
    let seen = backends[0].last_request().headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "app.example");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;host=app.example;proto=http"
    );
    assert_eq!(seen["via"], "1.1 bouncer");
    assert_eq!(seen["host"], "app.example");
    let request_id = answer.header("x-request-id").unwrap();
    assert_ne!(request_id, "forged-id");
    assert_eq!(seen["x-request-id"], request_id);
}

/// A request that carries none of the forwarding fields gets them written beside its map by the
/// lean client (see `DeferredFields`): each once, as the map would carry them.
#[tokio::test]
async fn a_request_without_forwarding_fields_gets_each_once() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    for (version, via) in [
        (http::Version::HTTP_11, "1.1 bouncer"),
        (http::Version::HTTP_2, "2 bouncer"),
    ] {
        // The host is the URL's (`Host`, or `:authority` over HTTP/2); with a colon, it is quoted
        // in `Forwarded`.
        let request = Request::get(proxy.url("/"))
            .version(version)
            .body(bouncer_testkit::empty())
            .unwrap();
        let answer = Clients::new().send(request).await;
        let seen = backends[0].last_request().headers;
        let host = proxy.address.to_string();
        let forwarded = format!("for=127.0.0.1;host=\"{host}\";proto=http");
        for (name, value) in [
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", host.as_str()),
            ("forwarded", forwarded.as_str()),
            ("via", via),
            ("x-request-id", answer.header("x-request-id").unwrap()),
        ] {
            let values: Vec<_> = seen.get_all(name).iter().collect();
            assert_eq!(values, [value], "{name} over {version:?}");
        }
    }
}

/// A request sent again after a backend refused it unsent carries its forwarding fields once,
/// also to an upstream that hyper's client speaks to (HTTP/2 here).
#[tokio::test]
async fn a_request_sent_again_after_a_refusal_carries_each_forwarding_field_once() {
    let refusing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused_address = refusing.local_addr().unwrap();
    drop(refusing);
    let backend = Backend::start(0).await;
    for protocol in ["http1", "h2c"] {
        let proxy = TestProxy::start(&format!(
            r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
[[routes]]
upstream = "app"
[upstreams.app]
servers = ["{refused_address}", "{}"]
protocol = "{protocol}"
retries = 2
[access_log]
format = "off"
"#,
            backend.address
        ))
        .await;
        // Round robin starts at either backend: two requests meet the refusing one.
        for _ in 0..2 {
            let answer = Clients::new().get(&proxy.url("/")).await;
            assert_eq!(answer.status, 200, "{protocol}");
            let seen = backend.last_request().headers;
            for name in ["via", "x-forwarded-for", "forwarded", "x-request-id"] {
                assert_eq!(
                    seen.get_all(name).iter().count(),
                    1,
                    "{name} over {protocol}"
                );
            }
            assert_eq!(seen["via"], "1.1 bouncer", "{protocol}");
        }
    }
}

/// A `Connection` that names `Host` takes it away with the hop-by-hop fields; the backend then
/// gets its own name, as for an HTTP/1.0 request without one.
#[tokio::test]
async fn a_host_named_in_connection_is_replaced_by_the_backends_name() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let answer = raw_exchange(
        proxy.address,
        b"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: host, close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = backends[0].last_request().headers;
    assert_eq!(seen["host"], backends[0].address.to_string());
}

#[tokio::test]
async fn a_trusted_proxy_extends_the_chain_and_keeps_its_request_id() {
    let backends = Backend::start_many(1).await;
    let config = config_for(&backends, "").replace(
        "name = \"public\"\nbind = \"127.0.0.1:0\"",
        "name = \"public\"\nbind = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
    );
    let proxy = TestProxy::start(&config).await;
    let request = Request::get(proxy.url("/"))
        .header("host", "app.example")
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=198.51.100.7;proto=https")
        .header("x-request-id", "edge-42")
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = Clients::new().send(request).await;
    let seen = backends[0].last_request().headers;
    assert_eq!(seen["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(
        seen["forwarded"],
        "for=198.51.100.7;proto=https, for=127.0.0.1;host=app.example;proto=http"
    );
    assert_eq!(answer.header("x-request-id"), Some("edge-42"));
    assert_eq!(seen["x-request-id"], "edge-42");
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let request = Request::get(proxy.url("/"))
        .header("connection", "x-private, keep-alive")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "gzip")
        .header("x-end-to-end", "kept")
        .body(bouncer_testkit::empty())
        .unwrap();
    Clients::new().send(request).await;
    let seen = backends[0].last_request().headers;
    for name in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            !seen.contains_key(name),
            "{name} reached the backend: {seen:?}"
        );
    }
    assert_eq!(seen["x-end-to-end"], "kept");
}

#[tokio::test]
async fn an_h2c_upgrade_is_never_tunnelled() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let reply = raw_exchange(
        proxy.address,
        b"GET /plain HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nGET /second HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    // Not `101 Switching Protocols` (a bare "101" may occur in a random request id).
    assert!(!reply.contains(" 101 "), "{reply}");
    let requests = backends[0].requests();
    assert_eq!(
        requests.len(),
        2,
        "both requests were forwarded as plain HTTP/1.1"
    );
    assert!(!requests[0].headers.contains_key("upgrade"));
    assert!(!requests[0].headers.contains_key("http2-settings"));
    assert_eq!(requests[1].uri.path(), "/second");
}
