use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, full, pattern_body, raw_exchange, read_head};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn pattern(total: usize) -> Vec<u8> {
    (0..total)
        .map(|i| ((i % (64 * 1024)) % 251) as u8)
        .collect()
}

#[tokio::test]
async fn uploads_stream_through_with_and_without_a_length() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();

    let sized = Request::post(proxy.url("/count"))
        .body(full(vec![7u8; 300_000]))
        .unwrap();
    assert_eq!(clients.send(sized).await.text(), "300000");

    // A body of unknown length goes out chunked.
    let (mut sender, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(2);
    tokio::spawn(async move {
        for _ in 0..10 {
            sender
                .send_data(Bytes::from(vec![1u8; 10_000]))
                .await
                .unwrap();
        }
    });
    let chunked = Request::post(proxy.url("/count"))
        .body(body.boxed())
        .unwrap();
    assert_eq!(clients.send(chunked).await.text(), "100000");
    assert_eq!(
        backends[0].requests()[1].headers["transfer-encoding"],
        "chunked"
    );
}

#[tokio::test]
async fn bodies_arrive_intact_both_ways() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();
    let download = clients.get(&proxy.url("/bytes/3000000")).await;
    assert_eq!(download.header("content-length"), Some("3000000"));
    assert!(
        download.body == pattern(3_000_000),
        "the downloaded body differs"
    );

    let echo = Request::post(proxy.url("/echo"))
        .body(pattern_body(1_000_000))
        .unwrap();
    let echoed = clients.send(echo).await;
    assert!(echoed.body == pattern(1_000_000), "the echoed body differs");
}

#[tokio::test]
async fn head_answers_carry_no_body() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let request = Request::head(proxy.url("/bytes/5000"))
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = Clients::new().send(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-length"), Some("5000"));
    assert!(answer.body.is_empty());
    assert_eq!(backends[0].last_request().method, Method::HEAD);
}

#[tokio::test]
async fn response_trailers_pass_through() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let request = Request::get(proxy.url("/trailers"))
        .version(http::Version::HTTP_2)
        .header("te", "trailers")
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = Clients::new().send(request).await;
    assert_eq!(answer.text(), "part one, part two");
    let trailers = answer.trailers.expect("trailers reached the client");
    assert_eq!(trailers["x-checksum"], "abc123");
}

#[tokio::test]
async fn expect_continue_is_answered_only_when_the_body_is_wanted() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nmax_body_bytes = \"1KiB\"").await;

    // Too large: refused at once, with no 100 and without reading the body.
    let reply = raw_exchange(
        proxy.address,
        b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(!reply.contains("100 Continue"), "{reply}");
    assert_eq!(backends[0].count(), 0);

    // Small enough: the client is told to go on, and the body reaches the backend.
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let interim = read_head(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    stream.write_all(b"0123456789").await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = [0u8; 2];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"10");
    assert!(!backends[0].last_request().headers.contains_key("expect"));
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_with_413() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nmax_body_bytes = \"16KiB\"").await;
    let mut request =
        b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        request.extend_from_slice(b"2000\r\n");
        request.extend_from_slice(&[b'x'; 0x2000]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_exchange(proxy.address, &request, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(
        backends[0].requests().is_empty(),
        "the backend never got a whole body"
    );
}
