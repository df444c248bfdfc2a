//! `bouncer demo`: three backends behind the proxy, balanced, and one crashing without any client
//! noticing.

use std::collections::HashSet;

use bouncer_proxy::demo;

#[tokio::test]
async fn the_demo_balances_and_survives_a_crashed_backend() {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let mut demo = demo::start(loopback, loopback, loopback).await.unwrap();
    let answers = demo.sample_requests(6).await;
    let backends: HashSet<&str> = answers
        .iter()
        .filter_map(|answer| answer.split(" (").next())
        .collect();
    assert_eq!(backends.len(), 3, "{answers:?}");

    let show = demo.show_failover(12).await;
    assert_eq!(show.failed, 0, "{:?}", show.answers_while_down);
    assert_eq!(show.answers_while_down.len(), 12);
    assert!(
        show.answers_while_down
            .iter()
            .all(|answer| !answer.contains("backend 3")),
        "{:?}",
        show.answers_while_down
    );
    assert!(show.back_after.is_some(), "backend 3 did not come back");
}

#[tokio::test]
async fn the_demo_serves_https_with_a_certificate_it_made() {
    use bouncer_testkit::tls::{TlsClient, Trust};

    let loopback = "127.0.0.1:0".parse().unwrap();
    let demo = demo::start(loopback, loopback, loopback).await.unwrap();
    let https = demo.proxy.listener_address("https").unwrap();
    let ca = std::fs::read_to_string(&demo.certificate).unwrap();
    let client = TlsClient::new(
        Trust::Ca(&ca),
        &["h2", "http/1.1"],
        &[&rustls::version::TLS13],
    );
    let mut connection = client.connect(https, "localhost").await.unwrap();
    assert_eq!(connection.alpn.as_deref(), Some(&b"h2"[..]));
    let answer = connection.get("localhost", "/hello").await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.text().starts_with("hello from demo backend"),
        "{}",
        answer.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_a_flood_refused_while_a_client_is_served() {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let demo = demo::start(loopback, loopback, loopback).await.unwrap();
    let show = demo
        .show_flood(10, std::time::Duration::from_millis(1500))
        .await;
    assert_eq!(show.client_served, show.client_sent);
    assert!(show.client_sent >= 10);
    assert!(show.attack_refused + show.attack_shut_out > 0);
    // Each attacker gets at most its burst and the rate for the flood's length through.
    assert!(
        show.attack_reached <= 10 * (100 + 50 * 2),
        "{}",
        show.attack_reached
    );
    assert!(show.banned >= 1);
}

#[tokio::test]
async fn the_demo_shows_a_miss_hits_and_a_purge() {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let demo = demo::start(loopback, loopback, loopback).await.unwrap();
    let show = demo.show_cache().await;
    let told: Vec<&str> = show
        .steps
        .iter()
        .map(|(_, _, told)| told.as_str())
        .collect();
    assert_eq!(show.steps.len(), 5, "{:?}", show.steps);
    assert!(told[0].contains("fwd=uri-miss"), "{told:?}");
    assert!(told[1].starts_with("Bouncer; hit"), "{told:?}");
    assert!(told[2].starts_with("Bouncer; hit"), "{told:?}");
    assert_eq!(told[3], "{\"purged\":1}");
    assert!(told[4].contains("fwd=uri-miss"), "{told:?}");
    assert_eq!(show.fetched, 2);
}
