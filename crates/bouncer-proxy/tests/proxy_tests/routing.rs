use bouncer_testkit::{Backend, Clients, TestProxy};
use http::{Request, StatusCode};

/// One upstream per backend, so that the backend that answers names the route that matched.
async fn routed_proxy(backends: &[Backend]) -> TestProxy {
    let config = format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[listeners]]
name = "internal"
bind = "127.0.0.1:0"

[[routes]]
name = "exact"
hosts = ["app.example"]
upstream = "b0"

[[routes]]
name = "long-wildcard"
hosts = ["*.app.example"]
upstream = "b1"

[[routes]]
name = "short-wildcard"
hosts = ["*.example"]
upstream = "b2"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "b3"

[[routes]]
name = "fallback"
path_prefix = "/"
listeners = ["public"]
upstream = "b4"

[upstreams.b0]
servers = ["{}"]
[upstreams.b1]
servers = ["{}"]
[upstreams.b2]
servers = ["{}"]
[upstreams.b3]
servers = ["{}"]
[upstreams.b4]
servers = ["{}"]

[access_log]
format = "off"
"#,
        backends[0].address,
        backends[1].address,
        backends[2].address,
        backends[3].address,
        backends[4].address
    );
    TestProxy::start(&config).await
}

async fn answer_for(clients: &Clients, proxy: &TestProxy, host: &str, path: &str) -> String {
    let request = Request::get(proxy.url(path))
        .header("host", host)
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = clients.send(request).await;
    if answer.status != StatusCode::OK {
        return answer.status.to_string();
    }
    answer.text().trim().to_string()
}

#[tokio::test]
async fn the_most_specific_host_wins_then_the_longest_prefix() {
    let backends = Backend::start_many(5).await;
    let proxy = routed_proxy(&backends).await;
    let clients = Clients::new();
    let cases = [
        ("app.example", "/", "backend 0"),
        ("APP.example:8080", "/x", "backend 0"),
        ("www.app.example", "/", "backend 1"),
        ("a.b.app.example", "/api/x", "backend 1"),
        ("other.example", "/", "backend 2"),
        ("elsewhere.test", "/api", "backend 3"),
        ("elsewhere.test", "/api/v1/x", "backend 3"),
        ("elsewhere.test", "/apix", "backend 4"),
        ("elsewhere.test", "/", "backend 4"),
    ];
    for (host, path, expected) in cases {
        assert_eq!(
            answer_for(&clients, &proxy, host, path).await,
            expected,
            "{host}{path}"
        );
    }
}

#[tokio::test]
async fn routes_belong_to_their_listeners_and_no_route_is_404() {
    let backends = Backend::start_many(5).await;
    let proxy = routed_proxy(&backends).await;
    let internal = proxy.proxy.listener_address("internal").unwrap();
    let clients = Clients::new();
    let answer = clients.get(&format!("http://{internal}/api/x")).await;
    assert_eq!(answer.text(), "backend 3\n");
    let answer = clients.get(&format!("http://{internal}/other")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.text(), "no route\n");
    assert!(answer.header("x-request-id").is_some());
    assert_eq!(backends[4].count(), 0);
}

#[tokio::test]
async fn paths_are_normalised_once_and_forwarded_as_matched() {
    let backends = Backend::start_many(5).await;
    let proxy = routed_proxy(&backends).await;
    let clients = Clients::new();
    assert_eq!(
        answer_for(
            &clients,
            &proxy,
            "elsewhere.test",
            "/static/../api/users?q=1"
        )
        .await,
        "backend 3"
    );
    assert_eq!(
        backends[3]
            .last_request()
            .uri
            .path_and_query()
            .unwrap()
            .as_str(),
        "/api/users?q=1"
    );
    assert_eq!(
        answer_for(&clients, &proxy, "elsewhere.test", "/%61pi/%2e%2E/api/%7Ex").await,
        "backend 3"
    );
    assert_eq!(backends[3].last_request().uri.path(), "/api/~x");
    // An encoded slash stays encoded, so it does not create a segment boundary.
    assert_eq!(
        answer_for(&clients, &proxy, "elsewhere.test", "/api%2Fx").await,
        "backend 4"
    );
    assert_eq!(backends[4].last_request().uri.path(), "/api%2Fx");
    assert_eq!(
        answer_for(&clients, &proxy, "elsewhere.test", "/a/%zz").await,
        "400 Bad Request"
    );
}
