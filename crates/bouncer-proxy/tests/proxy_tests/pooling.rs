//! Keep-alive connections to the backends: reused, bounded, closed when idle, and never reused
//! once the backend has closed them.

use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, config_with_upstream_keys, eventually};

#[tokio::test]
async fn sequential_requests_share_one_backend_connection() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();
    for _ in 0..20 {
        let answer = clients.get(&proxy.url("/")).await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(backends[0].count(), 20);
    assert_eq!(backends[0].connections(), 1);
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_not_reused() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();
    for round in 0..5 {
        let closing = clients.get(&proxy.url("/close")).await;
        assert_eq!(closing.status, 200, "round {round}");
        let next = clients.get(&proxy.url("/")).await;
        assert_eq!(next.status, 200, "round {round}: {}", next.text());
    }
    assert_eq!(backends[0].count(), 10);
    // Each `/close` ends the connection it came on, and the request after it opens a new one,
    // which the next `/close` reuses: one connection to start with, and one more per round.
    assert_eq!(backends[0].connections(), 6);
}

#[tokio::test]
async fn idle_backend_connections_are_closed_after_the_idle_timeout() {
    let backends = Backend::start_many(1).await;
    let toml = config_with_upstream_keys(&backends, "pool_idle_timeout = \"200ms\"", "");
    let proxy = TestProxy::start(&toml).await;
    let answer = Clients::new().get(&proxy.url("/")).await;
    assert_eq!(answer.status, 200);
    eventually(
        Duration::from_secs(5),
        "the idle backend connection is closed",
        || async { backends[0].open_connections() == 0 },
    )
    .await;
}

#[tokio::test]
async fn the_idle_pool_keeps_at_most_pool_max_idle_connections() {
    let backends = Backend::start_many(1).await;
    let toml = config_with_upstream_keys(&backends, "pool_max_idle = 2", "");
    let proxy = TestProxy::start(&toml).await;
    let clients = Clients::new();
    // Six requests at once need six backend connections; afterwards only two stay open.
    let url = proxy.url("/delay/300");
    let answers = futures_util::future::join_all((0..6).map(|_| clients.get(&url))).await;
    assert!(answers.iter().all(|answer| answer.status == 200));
    assert_eq!(backends[0].connections(), 6);
    eventually(
        Duration::from_secs(5),
        "the surplus backend connections are closed",
        || async { backends[0].open_connections() == 2 },
    )
    .await;
    // The kept ones serve the next requests.
    for _ in 0..4 {
        assert_eq!(clients.get(&proxy.url("/")).await.status, 200);
    }
    assert_eq!(backends[0].connections(), 6);
}

#[tokio::test]
async fn pool_max_idle_bounds_both_kinds_of_idle_connection_together() {
    let backends = Backend::start_many(1).await;
    let toml = config_with_upstream_keys(&backends, "pool_max_idle = 2", "");
    let proxy = TestProxy::start(&toml).await;
    let clients = Clients::new();
    // Bodiless requests go on the lean client's connections, requests with a body on hyper's:
    // six at once need six backend connections, three of each kind.
    let url = proxy.url("/delay/300");
    let gets = (0..3).map(|_| clients.get(&url));
    let posts = (0..3).map(|_| {
        let request = http::Request::post(url.as_str())
            .body(bouncer_testkit::full("a body"))
            .unwrap();
        clients.send(request)
    });
    let (got, posted) = tokio::join!(
        futures_util::future::join_all(gets),
        futures_util::future::join_all(posts)
    );
    assert!(got.iter().chain(&posted).all(|answer| answer.status == 200));
    assert_eq!(backends[0].connections(), 6);
    eventually(
        Duration::from_secs(5),
        "the surplus backend connections of both kinds are closed",
        || async { backends[0].open_connections() == 2 },
    )
    .await;
}
