//! No single failing backend becomes a failed client request: retries on another backend where
//! that is safe, passive ejection, active health checks, and 503 when nothing is left.

use std::time::Duration;

use bouncer_testkit::{Backend, Behaviour, Clients, TestProxy, eventually, full, metric};
use http::Request;
use tokio::net::TcpListener;

fn config(backends: &[&Backend], upstream_keys: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|backend| format!("\"{}\"", backend.address))
        .collect();
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
upstream = "app"

[upstreams.app]
servers = [{servers}]
connect_timeout = "1s"
response_timeout = "300ms"
{upstream_keys}

[access_log]
format = "off"
"#,
        servers = servers.join(", ")
    )
}

/// Waits until the proxy's health gauge for the backend at `address` reads `healthy`.
async fn wait_for_health(proxy: &TestProxy, address: std::net::SocketAddr, healthy: bool) {
    let gauge = format!("bouncer_upstream_healthy{{upstream=\"app\",backend=\"{address}\"}}");
    let expected = if healthy { 1.0 } else { 0.0 };
    eventually(
        Duration::from_secs(5),
        "the health gauge changes",
        || async { metric(&proxy.scrape().await, &gauge) == Some(expected) },
    )
    .await;
}

async fn all_ok(clients: &Clients, url: &str, count: usize) {
    for n in 0..count {
        let answer = clients.get(url).await;
        assert_eq!(answer.status, 200, "request {n}: {}", answer.text());
    }
}

#[tokio::test]
async fn a_backend_answering_503_costs_no_client_a_failure_and_is_ejected() {
    let good = Backend::start_many(2).await;
    let failing = Backend::start_with(2, Behaviour::Status(503)).await;
    let toml = config(
        &[&good[0], &good[1], &failing],
        "[upstreams.app.outlier_detection]\nconsecutive_failures = 3\nejection_time = \"30s\"",
    );
    let proxy = TestProxy::start(&toml).await;
    let clients = Clients::new();
    all_ok(&clients, &proxy.url("/"), 60).await;
    // Three failures eject it; after that it sees no traffic.
    assert_eq!(failing.count(), 3);
    let text = proxy.scrape().await;
    let backend = failing.address;
    assert_eq!(
        metric(
            &text,
            &format!("bouncer_upstream_ejections_total{{upstream=\"app\",backend=\"{backend}\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            &format!("bouncer_upstream_healthy{{upstream=\"app\",backend=\"{backend}\"}}")
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_backend_that_resets_or_hangs_costs_no_client_a_failure() {
    for behaviour in [Behaviour::Reset, Behaviour::Hang] {
        let good = Backend::start_many(2).await;
        let failing = Backend::start_with(2, behaviour).await;
        let toml = config(
            &[&good[0], &good[1], &failing],
            "[upstreams.app.outlier_detection]\nconsecutive_failures = 2",
        );
        let proxy = TestProxy::start(&toml).await;
        let clients = Clients::new();
        all_ok(&clients, &proxy.url("/"), 30).await;
        assert_eq!(failing.count(), 2, "{behaviour:?}");
    }
}

#[tokio::test]
async fn a_post_whose_body_reached_a_backend_is_never_sent_twice() {
    let dying = Backend::start_with(0, Behaviour::Reset).await;
    let good = Backend::start(1).await;
    let proxy = TestProxy::start(&config(&[&dying, &good], "")).await;
    let request = Request::post(proxy.url("/echo"))
        .body(full(vec![b'p'; 10_000]))
        .expect("request");
    // Round robin sends the first request to the dying backend.
    let answer = Clients::new().send(request).await;
    assert_eq!(answer.status, 502);
    assert_eq!(dying.count(), 1);
    assert_eq!(dying.requests()[0].body_bytes, 10_000);
    assert_eq!(good.count(), 0, "the POST must not be sent again");
}

#[tokio::test]
async fn a_bodiless_post_that_reached_a_backend_is_never_sent_twice_but_a_delete_is_retried() {
    // Both go on lean backend connections, which give the request back after a failure; only
    // the idempotent one may use it.
    let dying = Backend::start_with(0, Behaviour::Reset).await;
    let good = Backend::start(1).await;
    let proxy = TestProxy::start(&config(&[&dying, &good], "")).await;
    let clients = Clients::new();
    let post = Request::post(proxy.url("/"))
        .body(bouncer_testkit::empty())
        .expect("request");
    let answer = clients.send(post).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        (dying.count(), good.count()),
        (1, 0),
        "the POST must not be sent again"
    );

    // A new proxy, whose round robin starts at the dying backend again.
    let proxy = TestProxy::start(&config(&[&dying, &good], "")).await;
    let delete = Request::delete(proxy.url("/"))
        .body(bouncer_testkit::empty())
        .expect("request");
    let answer = clients.send(delete).await;
    assert_eq!(answer.status, 200);
    assert_eq!((dying.count(), good.count()), (2, 1));
}

#[tokio::test]
async fn a_get_after_a_reset_is_retried_on_another_backend() {
    let dying = Backend::start_with(0, Behaviour::Reset).await;
    let good = Backend::start(1).await;
    let proxy = TestProxy::start(&config(&[&dying, &good], "")).await;
    let answer = Clients::new().get(&proxy.url("/")).await;
    assert_eq!(answer.status, 200);
    assert_eq!((dying.count(), good.count()), (1, 1));
    let text = proxy.scrape().await;
    let backend = dying.address;
    assert_eq!(
        metric(
            &text,
            &format!("bouncer_upstream_retries_total{{upstream=\"app\",backend=\"{backend}\"}}")
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn killing_a_backend_under_load_fails_no_request_and_it_returns_after_health_checks() {
    let backends = Backend::start_many(3).await;
    let address = backends[2].address;
    let toml = config(
        &[&backends[0], &backends[1], &backends[2]],
        "[upstreams.app.health_check]\npath = \"/\"\ninterval = \"50ms\"\ntimeout = \"200ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2",
    );
    let proxy = TestProxy::start(&toml).await;
    let clients = Clients::new();
    let url = proxy.url("/");

    // Eight clients send requests back to back while the third backend dies.
    let load: Vec<_> = (0..8)
        .map(|_| {
            let clients = clients.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut failures = 0;
                for _ in 0..150 {
                    let answer = clients.get(&url).await;
                    if answer.status != 200 {
                        eprintln!("failed request: {} {}", answer.status, answer.text());
                        failures += 1;
                    }
                }
                failures
            })
        })
        .collect();
    eventually(
        Duration::from_secs(5),
        "load reaches the third backend",
        || async { backends[2].count() > 20 },
    )
    .await;
    backends[2].kill();
    let mut failures = 0;
    for worker in load {
        failures += worker.await.expect("load worker");
    }
    assert_eq!(failures, 0, "client requests failed while a backend died");

    wait_for_health(&proxy, address, false).await;

    // Back on the same port: two passing checks and it takes requests again.
    let listener = TcpListener::bind(address)
        .await
        .expect("rebind the backend's port");
    let revived = Backend::serve(listener, 2);
    wait_for_health(&proxy, address, true).await;
    let before = revived.count();
    all_ok(&clients, &url, 30).await;
    assert!(
        revived.count() - before >= 9,
        "{}",
        revived.count() - before
    );
}

#[tokio::test]
async fn with_every_backend_down_the_answer_is_a_quick_503_with_retry_after() {
    let backend = Backend::start(0).await;
    let toml = config(
        &[&backend],
        "[upstreams.app.health_check]\npath = \"/status/500\"\ninterval = \"20ms\"\nunhealthy_threshold = 1",
    );
    let proxy = TestProxy::start(&toml).await;
    let gauge = format!(
        "bouncer_upstream_healthy{{upstream=\"app\",backend=\"{}\"}}",
        backend.address
    );
    eventually(
        Duration::from_secs(5),
        "the backend is marked down",
        || async { metric(&proxy.scrape().await, &gauge) == Some(0.0) },
    )
    .await;
    let before = backend.count();
    let answer = Clients::new().get(&proxy.url("/")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    // Only health checks reached the backend, no client request.
    assert!(
        backend.requests()[before..]
            .iter()
            .all(|request| request.uri.path() == "/status/500")
    );
}

#[tokio::test]
async fn an_idempotent_request_with_a_kept_body_is_replayed_whole_on_another_backend() {
    let dying = Backend::start_with(0, Behaviour::Reset).await;
    let good = Backend::start(1).await;
    let put = |proxy: &TestProxy| {
        Request::put(proxy.url("/count"))
            .body(full(vec![b'u'; 10_000]))
            .expect("request")
    };

    // Kept up to retry_buffer: the reset backend read it, the other one gets it again, whole.
    let proxy = TestProxy::start(&config(&[&dying, &good], "retry_buffer = \"64KiB\"")).await;
    let answer = Clients::new().send(put(&proxy)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "10000");
    assert_eq!((dying.count(), good.count()), (1, 1));
    assert_eq!(dying.requests()[0].body_bytes, 10_000);
    assert_eq!(good.requests()[0].body_bytes, 10_000);

    // Larger than retry_buffer: not kept, so not sent twice.
    let proxy = TestProxy::start(&config(&[&dying, &good], "retry_buffer = \"4KiB\"")).await;
    let answer = Clients::new().send(put(&proxy)).await;
    assert_eq!(answer.status, 502);
    assert_eq!((dying.count(), good.count()), (2, 1));
}

#[tokio::test]
async fn a_recovered_backend_ramps_up_under_slow_start() {
    let backends = Backend::start_many(2).await;
    let address = backends[1].address;
    let toml = config(
        &[&backends[0], &backends[1]],
        "slow_start = \"20s\"\n[upstreams.app.health_check]\npath = \"/\"\ninterval = \"50ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1",
    );
    let proxy = TestProxy::start(&toml).await;
    let clients = Clients::new();
    let url = proxy.url("/");
    backends[1].kill();
    wait_for_health(&proxy, address, false).await;
    let listener = TcpListener::bind(address).await.expect("rebind the port");
    let revived = Backend::serve(listener, 1);
    wait_for_health(&proxy, address, true).await;
    // Within the first seconds of a 20 s ramp its weight is about a tenth of the other's, where
    // without slow start it would take half of the requests.
    let before = revived.count();
    all_ok(&clients, &url, 100).await;
    let share = revived.count() - before;
    assert!((2..=25).contains(&share), "{share} of 100 requests");
}
