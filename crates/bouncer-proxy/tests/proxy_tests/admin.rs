//! The admin API on a real admin listener: every endpoint, bad input, the token, and the Host and
//! origin checks that keep a browser page of another site out.

use std::net::SocketAddr;

use bouncer_testkit::{Backend, Clients, TestProxy, empty, full};
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};

/// An admin call: `method` on `path` with `headers`, a JSON `body` when given (the cluster tests
/// use it too).
pub async fn call(
    admin: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap(),
        None => request.body(empty()).unwrap(),
    };
    let answer = Clients::new().send(request).await;
    let value = serde_json::from_slice(&answer.body).unwrap_or_else(|error| {
        panic!("not JSON ({error}): {:?}", answer.text());
    });
    (answer.status, value)
}

async fn get(admin: SocketAddr, path: &str) -> (StatusCode, Value) {
    call(admin, Method::GET, path, &[], None).await
}

#[tokio::test]
async fn status_config_and_openapi_describe_the_running_proxy() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[cluster]\nredis = \"redis://:hunter2@127.0.0.1:1\"\ntimeout = \"50ms\"",
    )
    .await;
    let admin = proxy.admin();

    let (status, body) = get(admin, "/api/v1/status").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(body["listeners"][0]["name"], "public");
    assert_eq!(
        body["listeners"][0]["address"],
        proxy.address.to_string(),
        "{body}"
    );
    assert_eq!(body["cluster"]["redis_up"], false);

    let (status, body) = get(admin, "/api/v1/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["config"]["upstreams"]["app"]["servers"][0],
        backend.address.to_string()
    );
    assert_eq!(
        body["config"]["cluster"]["redis"], "redis://:(redacted)@127.0.0.1:1",
        "the Redis password is not shown"
    );
    assert!(!body.to_string().contains("hunter2"));

    let (status, body) = get(admin, "/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["openapi"], "3.0.3");
    for path in [
        "/api/v1/status",
        "/api/v1/config",
        "/api/v1/upstreams",
        "/api/v1/bans",
        "/api/v1/cache/purge",
    ] {
        assert!(body["paths"].get(path).is_some(), "{path} is described");
    }

    let (status, body) = get(admin, "/api/v1/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("/api/v1/nothing"));
    let (status, _) = call(admin, Method::DELETE, "/api/v1/status", &[], None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_drained_backend_takes_no_new_requests_until_it_is_taken_back() {
    let backends = Backend::start_many(2).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let admin = proxy.admin();
    let drained = backends[0].address.to_string();

    let (status, body) = get(admin, "/api/v1/upstreams").await;
    assert_eq!(status, StatusCode::OK);
    let listed = &body["upstreams"][0];
    assert_eq!(listed["name"], "app");
    assert_eq!(listed["backends"].as_array().unwrap().len(), 2);
    assert_eq!(listed["backends"][0]["address"], drained.as_str());
    assert_eq!(listed["backends"][0]["state"], "up");

    let path = format!("/api/v1/upstreams/app/backends/{drained}/drain");
    let (status, body) = call(admin, Method::POST, &path, &[], None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], true);
    let before = backends[0].count();
    let clients = Clients::new();
    for _ in 0..10 {
        let answer = clients.get(&proxy.url("/")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "backend 1\n");
    }
    assert_eq!(
        backends[0].count(),
        before,
        "the drained backend got nothing"
    );
    let (_, body) = get(admin, "/api/v1/upstreams").await;
    assert_eq!(body["upstreams"][0]["backends"][0]["state"], "drained");
    assert!(
        body["upstreams"][0]["backends"][1]["requests"]
            .as_u64()
            .unwrap()
            >= 10
    );
    assert!(
        body["upstreams"][0]["backends"][1]["latency_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let path = format!("/api/v1/upstreams/app/backends/{drained}/undrain");
    let (status, _) = call(admin, Method::POST, &path, &[], None).await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..4 {
        clients.get(&proxy.url("/")).await;
    }
    assert!(
        backends[0].count() > before,
        "taken back, it gets requests again"
    );

    let (status, body) = call(
        admin,
        Method::POST,
        "/api/v1/upstreams/app/backends/127.0.0.1:1/drain",
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().unwrap().contains("127.0.0.1:1"));
    let (status, _) = call(
        admin,
        Method::POST,
        &format!("/api/v1/upstreams/nope/backends/{drained}/drain"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        admin,
        Method::POST,
        &format!("/api/v1/upstreams/app/backends/{drained}/explode"),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bans_are_listed_added_and_lifted_and_bad_input_is_named() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let admin = proxy.admin();

    let (status, body) = call(
        admin,
        Method::POST,
        "/api/v1/bans",
        &[],
        Some(json!({ "ip": "127.0.0.1", "duration": "10m", "reason": "test" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["duration_seconds"], 600);
    // The proxy's own clients on 127.0.0.1 are now turned away at the door.
    let refused = reqwest_like_get(proxy.address).await;
    assert!(refused.is_none(), "a banned address is not served");

    let (_, body) = get(admin, "/api/v1/bans").await;
    assert_eq!(body["bans"][0]["ip"], "127.0.0.1");
    let left = body["bans"][0]["expires_in_seconds"].as_u64().unwrap();
    assert!((590..=600).contains(&left), "{left}");

    let (status, body) = call(admin, Method::DELETE, "/api/v1/bans/127.0.0.1", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["was_banned"], true);
    assert_eq!(
        Clients::new().get(&proxy.url("/")).await.status,
        StatusCode::OK
    );
    let (_, body) = get(admin, "/api/v1/bans").await;
    assert_eq!(body["bans"], json!([]));
    let (_, body) = call(admin, Method::DELETE, "/api/v1/bans/127.0.0.1", &[], None).await;
    assert_eq!(body["was_banned"], false);

    for (input, named) in [
        (json!({}), "\"ip\" is required"),
        (json!({ "ip": "not-an-ip" }), "not an IP address"),
        (
            json!({ "ip": "10.0.0.1", "duration": "soon" }),
            "\"duration\"",
        ),
        (
            json!({ "ip": "10.0.0.1", "duration": 5 }),
            "\"duration\" must be a string",
        ),
        (json!(["10.0.0.1"]), "must be a JSON object"),
    ] {
        let (status, body) = call(
            admin,
            Method::POST,
            "/api/v1/bans",
            &[],
            Some(input.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{input}");
        assert!(
            body["error"].as_str().unwrap().contains(named),
            "{input}: {body}"
        );
    }
    let (status, _) = call(admin, Method::DELETE, "/api/v1/bans/nonsense", &[], None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = call(
        admin,
        Method::POST,
        "/api/v1/bans",
        &[("content-type", "text/plain")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
}

/// A GET from 127.0.0.1 on a connection of its own: `None` when the proxy closes it unanswered.
async fn reqwest_like_get(proxy: SocketAddr) -> Option<StatusCode> {
    let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", "app")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.ok()?;
    Some(response.status())
}

#[tokio::test]
async fn the_cache_is_purged_by_url_prefix_and_tag() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(std::slice::from_ref(&backend), "").replace(
        "[[routes]]\nname = \"app\"\nupstream = \"app\"",
        "[[routes]]\nname = \"app\"\nupstream = \"app\"\ncache = { enabled = true }",
    );
    let proxy = TestProxy::start(&toml).await;
    let admin = proxy.admin();
    let clients = Clients::new();
    let fetches = |path: &str| {
        backend
            .requests()
            .iter()
            .filter(|request| request.uri.path() == path)
            .count()
    };
    let objects = [
        "/cache/one?cc=max-age%3D600",
        "/cache/two?cc=max-age%3D600&tag=blue",
        "/cache/three?cc=max-age%3D600",
    ];
    for _ in 0..2 {
        for object in objects {
            assert_eq!(clients.get(&proxy.url(object)).await.status, StatusCode::OK);
        }
    }
    assert_eq!(fetches("/cache/one"), 1, "cached");

    // By URL: the host is the one the client sent (the test client sends the proxy's address).
    let url = format!("http://{}{}", proxy.address, objects[0]);
    let (status, body) = call(
        admin,
        Method::POST,
        "/api/v1/cache/purge",
        &[],
        Some(json!({ "url": url })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["purged"], 1);
    clients.get(&proxy.url(objects[0])).await;
    assert_eq!(fetches("/cache/one"), 2, "fetched again after the purge");

    let (_, body) = call(
        admin,
        Method::POST,
        "/api/v1/cache/purge",
        &[],
        Some(json!({ "tag": "blue" })),
    )
    .await;
    assert_eq!(body["purged"], 1);
    clients.get(&proxy.url(objects[1])).await;
    assert_eq!(fetches("/cache/two"), 2);

    let (_, body) = call(
        admin,
        Method::POST,
        "/api/v1/cache/purge",
        &[],
        Some(json!({ "prefix": "/cache/" })),
    )
    .await;
    assert_eq!(body["purged"], 3, "everything under /cache/");
    clients.get(&proxy.url(objects[2])).await;
    assert_eq!(fetches("/cache/three"), 2);

    for input in [
        json!({}),
        json!({ "url": "/relative" }),
        json!({ "prefix": "no-slash" }),
        json!({ "tag": "a", "prefix": "/b" }),
        json!({ "tag": 7 }),
    ] {
        let (status, _) = call(
            admin,
            Method::POST,
            "/api/v1/cache/purge",
            &[],
            Some(input.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{input}");
    }
}

#[tokio::test]
async fn without_a_cache_a_purge_says_there_is_nothing_to_purge() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let (status, body) = call(
        proxy.admin(),
        Method::POST,
        "/api/v1/cache/purge",
        &[],
        Some(json!({ "prefix": "/" })),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body["error"].as_str().unwrap().contains("no route caches"));
}

#[tokio::test]
async fn with_a_token_every_call_needs_it() {
    let backend = Backend::start(0).await;
    let dir = std::env::temp_dir().join(format!("bouncer-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let toml = bouncer_testkit::config_for(std::slice::from_ref(&backend), "").replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        &format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"",
            token_file.display()
        ),
    );
    let proxy = TestProxy::start(&toml).await;
    let admin = proxy.admin();

    let (status, body) = get(admin, "/api/v1/status").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("Bearer"));
    let (status, body) = call(
        admin,
        Method::GET,
        "/api/v1/status",
        &[("authorization", "Bearer wrong")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "wrong token");
    let (status, _) = call(
        admin,
        Method::POST,
        "/api/v1/bans",
        &[],
        Some(json!({ "ip": "10.0.0.1" })),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        proxy.proxy.bans().is_empty(),
        "nothing changed without the token"
    );

    // The dashboard page holds no data and asks for the token itself.
    let page = Clients::new().get(&format!("http://{admin}/")).await;
    assert_eq!(page.status, StatusCode::OK);
    let (status, _) = get(admin, "/api/v1/dashboard").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "its data needs the token");

    let bearer = [("authorization", "Bearer s3cret-token")];
    let (status, _) = call(admin, Method::GET, "/api/v1/status", &bearer, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        admin,
        Method::POST,
        "/api/v1/bans",
        &bearer,
        Some(json!({ "ip": "10.0.0.1" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(proxy.proxy.bans().len(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_foreign_host_or_a_cross_site_page_is_refused() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let admin = proxy.admin();

    // A DNS-rebinding page reaches the listener under its own host name.
    let (status, _) = call(
        admin,
        Method::GET,
        "/api/v1/status",
        &[("host", &format!("evil.example:{}", admin.port()))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    let (status, _) = call(
        admin,
        Method::GET,
        "/api/v1/status",
        &[("host", &format!("localhost:{}", admin.port()))],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "localhost is its own");

    // A form on another site posts to the API: the browser names the page's origin.
    let (status, _) = call(
        admin,
        Method::POST,
        "/api/v1/bans",
        &[("origin", "http://evil.example")],
        Some(json!({ "ip": "10.0.0.1" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        admin,
        Method::DELETE,
        "/api/v1/bans/10.0.0.1",
        &[("sec-fetch-site", "cross-site")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(proxy.proxy.bans().is_empty());
    // The same call from the admin's own page is fine.
    let (status, _) = call(
        admin,
        Method::POST,
        "/api/v1/bans",
        &[
            ("origin", &format!("http://{admin}")),
            ("sec-fetch-site", "same-origin"),
        ],
        Some(json!({ "ip": "10.0.0.1" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn the_dashboard_data_comes_as_json_and_as_a_stream_of_events() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let admin = proxy.admin();
    for _ in 0..3 {
        Clients::new().get(&proxy.url("/")).await;
    }
    // The picture is taken once a second: the next one counts all three.
    bouncer_testkit::eventually(
        std::time::Duration::from_secs(5),
        "the dashboard counts the requests",
        || async { get(admin, "/api/v1/dashboard").await.1["requests_total"] == 3 },
    )
    .await;
    let (status, body) = get(admin, "/api/v1/dashboard").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["requests_total"], 3, "{body}");
    assert_eq!(body["requests_by_class"][1], 3);
    assert_eq!(body["upstreams"][0]["backends"][0]["requests"], 3);
    assert_eq!(body["cache"], Value::Null, "no route caches");

    // The event stream never ends: read its first event only.
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/api/v1/events")
        .header("host", admin.to_string())
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = response.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    let event = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    let json = event
        .strip_prefix("data: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("an event: {event:?}"));
    let picture: Value = serde_json::from_str(json).unwrap();
    assert_eq!(picture["requests_total"], 3);
    // The next picture follows within the next second or so.
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .expect("a second event");
    assert!(next.is_some());
}
