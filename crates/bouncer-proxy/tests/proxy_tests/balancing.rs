//! Balancing algorithms on real backends: exact shares for (weighted) round robin, the slow
//! backend avoided by least connections and peak EWMA, and stable consistent hashing.

use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy};
use http::Request;

/// A config with one upstream of `backends` with these weights and balancing keys.
fn config(backends: &[Backend], weights: &[u32], upstream_keys: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .zip(weights)
        .map(|(backend, weight)| format!("{{ addr = \"{}\", weight = {weight} }}", backend.address))
        .collect();
    format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
upstream = "app"

[upstreams.app]
servers = [{servers}]
{upstream_keys}

[access_log]
format = "off"
"#,
        servers = servers.join(", ")
    )
}

/// `workers` clients at once, each sending `each` GETs one after another, all answered 200.
async fn concurrent_gets(url: &str, workers: usize, each: usize) {
    let clients = Clients::new();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let clients = clients.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                for _ in 0..each {
                    assert_eq!(clients.get(&url).await.status, 200);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("client task");
    }
}

fn counts(backends: &[Backend]) -> Vec<usize> {
    backends.iter().map(Backend::count).collect()
}

#[tokio::test]
async fn weighted_round_robin_gives_exact_shares() {
    let backends = Backend::start_many(3).await;
    let proxy = TestProxy::start(&config(&backends, &[3, 2, 1], "")).await;
    let clients = Clients::new();
    for _ in 0..600 {
        assert_eq!(clients.get(&proxy.url("/")).await.status, 200);
    }
    assert_eq!(counts(&backends), vec![300, 200, 100]);
}

#[tokio::test]
async fn least_connections_sends_little_to_a_slow_backend() {
    let mut backends = Backend::start_many(2).await;
    backends.push(Backend::start_slow(2, Duration::from_millis(300)).await);
    let proxy = TestProxy::start(&config(
        &backends,
        &[1, 1, 1],
        "balance = \"least_connections\"",
    ))
    .await;
    // Ten clients, each sending requests one after another.
    concurrent_gets(&proxy.url("/"), 10, 30).await;
    let counts = counts(&backends);
    assert_eq!(counts.iter().sum::<usize>(), 300);
    // The slow backend holds its requests long, so it is rarely the least loaded.
    assert!(counts[2] < 30, "{counts:?}");
}

#[tokio::test]
async fn peak_ewma_sends_under_a_tenth_to_a_backend_100ms_slower() {
    let mut backends = Backend::start_many(2).await;
    backends.push(Backend::start_slow(2, Duration::from_millis(100)).await);
    let proxy = TestProxy::start(&config(&backends, &[1, 1, 1], "balance = \"peak_ewma\"")).await;
    concurrent_gets(&proxy.url("/"), 5, 60).await;
    let counts = counts(&backends);
    assert_eq!(counts.iter().sum::<usize>(), 300);
    assert!(counts[2] * 10 < 300, "{counts:?}");
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_one_backend() {
    let backends = Backend::start_many(4).await;
    let proxy = TestProxy::start(&config(
        &backends,
        &[1, 1, 1, 1],
        "balance = \"consistent_hash\"\nhash_key = \"header:x-user\"",
    ))
    .await;
    let clients = Clients::new();
    let mut owners = Vec::new();
    for user in 0..40 {
        let mut seen = Vec::new();
        for _ in 0..5 {
            let request = Request::get(proxy.url("/"))
                .header("x-user", format!("user-{user}"))
                .body(bouncer_testkit::empty())
                .expect("request");
            let answer = clients.send(request).await;
            assert_eq!(answer.status, 200);
            seen.push(answer.text());
        }
        seen.dedup();
        assert_eq!(seen.len(), 1, "user-{user} moved: {seen:?}");
        owners.push(seen.remove(0));
    }
    // Forty keys spread over more than one backend.
    owners.sort();
    owners.dedup();
    assert!(owners.len() >= 3, "{owners:?}");
}
