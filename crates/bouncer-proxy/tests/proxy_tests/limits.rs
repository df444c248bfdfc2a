//! `max_connections_per_server`: requests beyond the limit wait in a queue for a free slot, and
//! get 503 when none frees up within `queue_timeout`.

use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, config_with_upstream_keys, eventually};

#[tokio::test]
async fn requests_beyond_the_limit_wait_for_a_slot() {
    let backends = vec![Backend::start_slow(0, Duration::from_millis(50)).await];
    let keys = "max_connections_per_server = 2\nqueue_timeout = \"10s\"";
    let proxy = TestProxy::start(&config_with_upstream_keys(&backends, keys, "")).await;
    let clients = Clients::new();
    let url = proxy.url("/");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let clients = clients.clone();
            let url = url.clone();
            tokio::spawn(async move { clients.get(&url).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    // Connections are kept and reused, so two slots never needed more than two connections.
    assert_eq!(backends[0].count(), 8);
    assert!(
        backends[0].connections() <= 2,
        "{} connections",
        backends[0].connections()
    );
}

#[tokio::test]
async fn a_request_that_waits_longer_than_queue_timeout_gets_503() {
    let backends = vec![Backend::start(0).await];
    let keys = "max_connections_per_server = 1\nqueue_timeout = \"100ms\"";
    let proxy = TestProxy::start(&config_with_upstream_keys(&backends, keys, "")).await;
    let clients = Clients::new();
    // The one slot is held by a request that hangs until the test ends.
    let holder = {
        let clients = clients.clone();
        let url = proxy.url("/hang");
        tokio::spawn(async move { clients.get(&url).await })
    };
    eventually(Duration::from_secs(5), "the slot is taken", || async {
        backends[0].count() == 1
    })
    .await;
    let answer = clients.get(&proxy.url("/")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(
        backends[0].count(),
        1,
        "the queued request reached the backend"
    );
    let text = proxy.scrape().await;
    assert!(
        text.contains("reason=\"queue_timeout\"} 1"),
        "{}",
        text.lines()
            .filter(|line| line.contains("queue"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    holder.abort();
}
