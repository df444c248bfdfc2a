//! Slow attacks: a body dripped in (slow POST), a client that does not read its answer (slow
//! read), and an HTTP/2 client that keeps its flow-control window shut.

use std::time::Duration;

use bouncer_testkit::{Backend, TestProxy, eventually, metric, read_head, refusals};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy whose clients must take their answers within 300 ms of silence.
async fn proxy_with_write_timeout() -> (Backend, TestProxy) {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[server]\nwrite_timeout = \"300ms\"",
    )
    .await;
    (backend, proxy)
}

#[tokio::test]
async fn a_body_dripped_slower_than_the_minimum_rate_gets_408() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[server]\nmin_body_rate = \"1KiB\"\nbody_timeout = \"200ms\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await
        .unwrap();
    // Nothing more is sent; the answer comes after the grace and the ten bytes' allowance.
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream))
        .await
        .expect("an answer in time");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let text = proxy.scrape().await;
    assert_eq!(refusals(&text, "request", "body_too_slow"), 1.0);

    // A body that keeps up is forwarded whole.
    let answer = bouncer_testkit::Clients::new()
        .send(
            http::Request::post(proxy.url("/count"))
                .body(bouncer_testkit::full(vec![7u8; 200_000]))
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "200000");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_disconnected_after_the_write_timeout() {
    let (_backend, proxy) = proxy_with_write_timeout().await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(b"GET /bytes/200000000 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .unwrap();
    // The client reads nothing: the proxy's writes fill the socket and then wait.
    eventually(Duration::from_secs(10), "the write timeout", || async {
        refusals(&proxy.scrape().await, "connection", "write_timeout") == 1.0
    })
    .await;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("the connection was closed");
    assert!(received.len() < 200_000_000);
}

#[tokio::test]
async fn an_http2_client_that_keeps_its_window_shut_is_disconnected() {
    let (_backend, proxy) = proxy_with_write_timeout().await;
    let stream = TcpStream::connect(proxy.address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/bytes/10000000", proxy.address))
        .body(bouncer_testkit::empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    // The body is never read, so the client never opens its window past the first 64 KiB; the
    // socket itself is not full, and yet nothing moves.
    eventually(Duration::from_secs(10), "the stall noticed", || async {
        refusals(&proxy.scrape().await, "connection", "write_timeout") == 1.0
    })
    .await;
    let open = metric(
        &proxy.scrape().await,
        "bouncer_connections_open{listener=\"public\"}",
    );
    assert_eq!(open, Some(0.0), "the proxy closed the connection");
    let outcome = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends once the connection is closed");
    assert!(outcome.is_err(), "the stalled answer cannot have completed");
    connection.abort();
}

#[tokio::test]
async fn a_slow_but_reading_http2_client_is_not_cut_off() {
    let (_backend, proxy) = proxy_with_write_timeout().await;
    let stream = TcpStream::connect(proxy.address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/bytes/1000000", proxy.address))
        .body(bouncer_testkit::empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let mut body = response.into_body();
    let mut total = 0;
    // Reads a frame every 100 ms: slow, but always well within the write timeout.
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the answer is not cut off");
        total += frame.data_ref().map_or(0, bytes::Bytes::len);
        frames += 1;
        if frames <= 5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(total, 1_000_000);
    assert_eq!(
        refusals(&proxy.scrape().await, "connection", "write_timeout"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_with_thousands_of_connections_does_not_keep_a_client_out() {
    // Each slow connection costs this process two descriptors (its end and the proxy's).
    let limit = bouncer_proxy::raise_open_file_limit().unwrap_or(1024);
    let slow = usize::try_from(limit.saturating_sub(512) / 2)
        .unwrap_or(0)
        .min(2_000);
    assert!(
        slow >= 400,
        "the open-file limit ({limit}) leaves room for too few connections"
    );
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[server]\nheader_timeout = \"1s\"",
    )
    .await;
    let address = proxy.address;
    let mut drippers = Vec::with_capacity(slow);
    for index in 0..slow {
        let from = std::net::IpAddr::from([127, 30, (index / 200) as u8, 1 + (index % 200) as u8]);
        drippers.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().ok()?;
            socket.bind(std::net::SocketAddr::new(from, 0)).ok()?;
            let mut stream = socket.connect(address).await.ok()?;
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: ")
                .await
                .ok()?;
            // A byte every 300 ms, never finishing the head; at most ten bytes.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if stream.write_all(b"a").await.is_err() {
                    return Some(true);
                }
            }
            Some(false)
        }));
    }
    // Meanwhile a client makes its requests and is served promptly.
    let clients = bouncer_testkit::Clients::new();
    let mut served = 0;
    for _ in 0..100 {
        let answer = tokio::time::timeout(Duration::from_secs(2), clients.get(&proxy.url("/")))
            .await
            .expect("served within 2 s");
        if answer.status == 200 {
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served, 100);
    // The slow connections are cut off by the header timeout.
    let mut cut_off = 0;
    for dripper in drippers {
        if dripper.await.ok().flatten() == Some(true) {
            cut_off += 1;
        }
    }
    assert!(cut_off * 10 >= slow * 9, "{cut_off} of {slow} cut off");
    assert_eq!(backend.count(), 100);
}
