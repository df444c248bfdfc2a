//! HTTP/2 abuse, with a frame-level client: rapid reset (CVE-2023-44487), CONTINUATION floods,
//! too many concurrent streams, and PING and SETTINGS floods. Each is bounded; where the protocol
//! allows, the connection is closed, and the closing is counted.

use std::time::Duration;

use bouncer_testkit::h2raw::{
    self, CANCEL, CONTINUATION, ENHANCE_YOUR_CALM, GOAWAY, HEADERS, PING, REFUSED_STREAM,
    RST_STREAM, RawH2, SETTINGS,
};
use bouncer_testkit::{Backend, TestProxy, eventually};

fn h2_abuse(text: &str) -> f64 {
    bouncer_testkit::refusals(text, "connection", "h2_abuse")
}

#[tokio::test]
async fn rapid_reset_closes_the_connection_with_enhance_your_calm() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let mut client = RawH2::connect(proxy.address).await;
    let mut burst = Vec::new();
    for index in 0..2_000u32 {
        let stream = 1 + 2 * index;
        burst.extend(h2raw::get(stream, "/delay/1000"));
        burst.extend(h2raw::rst_stream(stream, CANCEL));
    }
    client.send(&burst).await;
    let goaway = client
        .find(Duration::from_secs(5), |frame| frame.kind == GOAWAY)
        .await
        .expect("a GOAWAY");
    assert_eq!(goaway.error_code(), Some(ENHANCE_YOUR_CALM));
    eventually(Duration::from_secs(5), "the abuse counted", || async {
        h2_abuse(&proxy.scrape().await) >= 1.0
    })
    .await;
    // Few of the cancelled requests reached the backend.
    assert!(backend.count() < 2_000, "{}", backend.count());
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let mut client = RawH2::connect(proxy.address).await;
    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION after
    // CONTINUATION, each carrying another header.
    let mut flood = h2raw::frame(HEADERS, 0, 1, &h2raw::get_block("/"));
    let header = [0x00, 0x01, b'x', 0x01, b'y'];
    for _ in 0..20_000 {
        flood.extend(h2raw::frame(CONTINUATION, 0, 1, &header));
    }
    client.send(&flood).await;
    let goaway = client
        .find(Duration::from_secs(5), |frame| frame.kind == GOAWAY)
        .await
        .expect("a GOAWAY");
    assert_eq!(goaway.error_code(), Some(ENHANCE_YOUR_CALM));
    eventually(Duration::from_secs(5), "the abuse counted", || async {
        h2_abuse(&proxy.scrape().await) >= 1.0
    })
    .await;
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn streams_beyond_the_concurrent_limit_are_refused() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let mut client = RawH2::connect(proxy.address).await;
    let mut burst = Vec::new();
    for index in 0..300u32 {
        burst.extend(h2raw::get(1 + 2 * index, "/delay/2000"));
    }
    client.send(&burst).await;
    let mut refused = 0;
    while let Some(frame) = client.next_frame(Duration::from_millis(1500)).await {
        if frame.kind == RST_STREAM && frame.error_code() == Some(REFUSED_STREAM) {
            refused += 1;
        }
        if refused >= 44 {
            break;
        }
    }
    assert!(refused >= 44, "{refused} streams refused");
}

#[tokio::test]
async fn ping_and_settings_floods_are_answered_in_step_and_the_connection_keeps_serving() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), "").await;
    let mut client = RawH2::connect(proxy.address).await;
    let mut flood = Vec::new();
    for index in 0..5_000u64 {
        flood.extend(h2raw::ping(index));
        flood.extend(h2raw::frame(SETTINGS, 0, 0, &[]));
    }
    // Written while the answers are read, as a client that reads what it provokes.
    let writer = {
        let mut writer_side = RawH2::connect(proxy.address).await;
        tokio::spawn(async move {
            writer_side.send(&flood).await;
            writer_side
        })
    };
    let mut flooded = writer.await.unwrap();
    let mut ping_acks = 0;
    while let Some(frame) = flooded.next_frame(Duration::from_secs(2)).await {
        if frame.kind == PING && frame.flags & h2raw::ACK != 0 {
            ping_acks += 1;
            if ping_acks == 5_000 {
                break;
            }
        }
    }
    // Every PING got its answer, one for one: nothing piles up.
    assert_eq!(ping_acks, 5_000);
    // The flooded connection still serves a request.
    flooded.send(&h2raw::get(1, "/")).await;
    let answer = flooded
        .find(Duration::from_secs(5), |frame| {
            frame.kind == HEADERS && frame.stream == 1
        })
        .await;
    assert!(answer.is_some(), "the connection still serves");
    // And so does a fresh one.
    client.send(&h2raw::get(1, "/")).await;
    assert!(
        client
            .find(Duration::from_secs(5), |frame| frame.kind == HEADERS)
            .await
            .is_some()
    );
}
