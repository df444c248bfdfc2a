//! `bouncer demo`: three backends behind the proxy, balanced, and one crashing without any client
//! noticing.

use std::collections::HashSet;

use bouncer_proxy::demo;

#[tokio::test]
async fn the_demo_balances_and_survives_a_crashed_backend() {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let mut demo = demo::start(loopback, loopback).await.unwrap();
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
