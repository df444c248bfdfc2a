use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy};
use http::StatusCode;
use tokio::net::TcpStream;

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_in_flight_requests_finish() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nshutdown_grace = \"10s\"").await;
    let address = proxy.address;
    let clients = Clients::new();
    let in_flight = tokio::spawn({
        let clients = clients.clone();
        let url = proxy.url("/delay/400");
        async move { clients.get(&url).await }
    });
    bouncer_testkit::eventually(
        Duration::from_secs(5),
        "the slow request reached the backend",
        || async { backends[0].count() == 1 },
    )
    .await;
    let report = proxy.proxy.shutdown().await;
    assert!(
        report.drained,
        "every connection finished inside the grace period"
    );
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        TcpStream::connect(address).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn a_request_longer_than_the_grace_period_is_cut_off() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nshutdown_grace = \"100ms\"").await;
    let url = proxy.url("/hang");
    let in_flight =
        tokio::spawn(async move { Clients::new().http1.get(url.parse().unwrap()).await });
    bouncer_testkit::eventually(
        Duration::from_secs(5),
        "the request reached the backend",
        || async { backends[0].count() == 1 },
    )
    .await;
    let report = proxy.proxy.shutdown().await;
    assert!(!report.drained);
    let result = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(
        result.is_err(),
        "the hanging request was ended by the shutdown"
    );
}
