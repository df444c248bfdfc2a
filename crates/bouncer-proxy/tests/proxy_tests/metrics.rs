use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, metric, raw_exchange};

#[tokio::test]
async fn metrics_count_requests_and_refusals_exactly() {
    let backends = Backend::start_many(2).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();
    for _ in 0..7 {
        clients.get(&proxy.url("/")).await;
    }
    for _ in 0..3 {
        clients.get(&proxy.url("/status/503")).await;
    }
    clients.get(&proxy.url("/status/404")).await;
    raw_exchange(
        proxy.address,
        b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    raw_exchange(
        proxy.address,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    raw_exchange(proxy.address, b"GARBAGE\r\n\r\n", Duration::from_secs(5)).await;

    let text = proxy.scrape().await;
    let requests = |class: &str| {
        metric(
            &text,
            &format!(
                "bouncer_requests_total{{listener=\"public\",route=\"app\",upstream=\"app\",status_class=\"{class}\"}}"
            ),
        )
    };
    assert_eq!(requests("2xx"), Some(7.0), "{text}");
    assert_eq!(requests("5xx"), Some(3.0));
    assert_eq!(requests("4xx"), Some(1.0));
    assert_eq!(
        metric(
            &text,
            "bouncer_requests_total{listener=\"public\",route=\"none\",upstream=\"none\",status_class=\"4xx\"}"
        ),
        Some(2.0)
    );
    // Two refused by the pipeline, one by the HTTP parser itself.
    assert_eq!(
        metric(
            &text,
            "bouncer_refusals_total{listener=\"public\",layer=\"request\",reason=\"bad_request\"}"
        ),
        Some(3.0)
    );
    let backend_requests: f64 = backends
        .iter()
        .map(|backend| {
            metric(
                &text,
                &format!(
                    "bouncer_upstream_requests_total{{upstream=\"app\",backend=\"{}\"}}",
                    backend.address
                ),
            )
            .unwrap()
        })
        .sum();
    // Each 503 is retried once on the other backend (a GET without a body is safe to send again):
    // 7 + 3 × 2 + 1.
    assert_eq!(backend_requests, 14.0);
    assert_eq!(
        metric(
            &text,
            "bouncer_request_duration_seconds_count{listener=\"public\",route=\"app\"}"
        ),
        Some(11.0)
    );
    // Per backend, by status class: 7 + 3 + 1 answered, plus the 3 retries that got 503 again.
    let backend_responses = |class: &str| -> f64 {
        backends
            .iter()
            .map(|backend| {
                metric(
                    &text,
                    &format!(
                        "bouncer_upstream_responses_total{{upstream=\"app\",backend=\"{}\",status_class=\"{class}\"}}",
                        backend.address
                    ),
                )
                .unwrap_or(0.0)
            })
            .sum()
    };
    assert_eq!(backend_responses("2xx"), 7.0);
    assert_eq!(backend_responses("5xx"), 6.0);
    assert_eq!(backend_responses("4xx"), 1.0);
    assert_eq!(
        metric(&text, "bouncer_requests_in_flight{listener=\"public\"}"),
        Some(0.0)
    );
    assert!(text.contains("# TYPE bouncer_connections_open gauge"));
    let problems = bouncer_testkit::exposition_problems(&text);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_is_counted_as_499() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let url = proxy.url("/hang");
    let waiting = tokio::spawn(async move { Clients::new().get(&url).await });
    bouncer_testkit::eventually(
        Duration::from_secs(5),
        "the request reached the backend",
        || async { backends[0].count() == 1 },
    )
    .await;
    waiting.abort();
    let sample = "bouncer_requests_total{listener=\"public\",route=\"app\",upstream=\"app\",status_class=\"4xx\"}";
    bouncer_testkit::eventually(
        Duration::from_secs(5),
        "the abandoned request was counted",
        || async { metric(&proxy.scrape().await, sample) == Some(1.0) },
    )
    .await;
}
