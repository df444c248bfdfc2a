//! The client side of HTTP/1.1 on a plain listener, spoken byte by byte: the lean server takes
//! bodiless requests, and hands a connection to hyper at its first request with a body. These
//! tests hold both to the same protocol.

use std::time::Duration;

use bouncer_testkit::{Backend, TestProxy, raw_exchange, read_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

/// Reads exactly `length` body bytes after a head.
async fn read_body(stream: &mut TcpStream, length: usize) -> String {
    let mut body = vec![0u8; length];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut body))
        .await
        .expect("the body came in time")
        .expect("read the body");
    String::from_utf8_lossy(&body).into_owned()
}

/// Reads one `200 OK` answer to an HTTP/1.1 request, and gives its body.
async fn read_ok(stream: &mut TcpStream) -> String {
    let head = read_head(stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    read_body(stream, content_length(&head)).await
}

/// The paths a backend was asked for, in order.
fn paths_seen(backend: &Backend) -> Vec<String> {
    backend
        .requests()
        .iter()
        .map(|request| request.uri.path().to_string())
        .collect()
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head:?}"))
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_the_last_closes() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let answers = raw_exchange(
        proxy.address,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nHEAD /second HTTP/1.1\r\nHost: a\r\n\r\nGET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    let starts: Vec<_> = answers.match_indices("HTTP/1.1 200 OK\r\n").collect();
    assert_eq!(starts.len(), 3, "{answers}");
    // The HEAD answer has a length and no body: the third answer follows its head directly.
    let second = &answers[starts[1].0..starts[2].0];
    assert!(second.contains("content-length: 10\r\n"), "{second}");
    assert!(second.ends_with("\r\n\r\n"), "{second}");
    let third = &answers[starts[2].0..];
    assert!(third.contains("connection: close\r\n"), "{third}");
    assert!(third.ends_with("\r\n\r\nbackend 0\n"), "{third}");
    assert_eq!(paths_seen(&backends[0]), ["/first", "/second", "/third"]);
}

#[tokio::test]
async fn http10_clients_get_http10_answers_and_keep_alive_only_when_asked() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    // Without keep-alive the answer ends the connection.
    let answer = raw_exchange(proxy.address, b"GET / HTTP/1.0\r\n\r\n", DEADLINE).await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nbackend 0\n"), "{answer}");

    // With it, the connection carries a second request.
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
        assert_eq!(
            read_body(&mut stream, content_length(&head)).await,
            "backend 0\n"
        );
    }

    // A body of unknown length is sent until the connection closes, as HTTP/1.0 has no chunks.
    let answer = raw_exchange(
        proxy.address,
        b"GET /trailers HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        DEADLINE,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(!answer.contains("transfer-encoding"), "{answer}");
    assert!(answer.ends_with("\r\n\r\npart one, part two"), "{answer}");
}

#[tokio::test]
async fn bodies_of_unknown_length_are_chunked_with_trailers_only_when_the_client_takes_them() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let plain = raw_exchange(
        proxy.address,
        b"GET /trailers HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    assert!(plain.contains("transfer-encoding: chunked\r\n"), "{plain}");
    assert!(plain.ends_with("0\r\n\r\n"), "{plain}");
    let chunks = plain.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(chunks.replace("\r\n", "|"), "A|part one, |8|part two|0||");

    let with_trailers = raw_exchange(
        proxy.address,
        b"GET /trailers HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    assert!(
        with_trailers.ends_with("0\r\nx-checksum: abc123\r\n\r\n"),
        "{with_trailers}"
    );
}

#[tokio::test]
async fn a_head_that_arrives_in_pieces_is_answered() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for piece in [
        &b"GET /pie"[..],
        b"ces HTTP/1.1\r\nHo",
        b"st: a\r\n",
        b"\r\n",
    ] {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
        // Gives the proxy a turn, so that it most often reads the pieces apart; the answer must
        // be the same however they are read.
        tokio::task::yield_now().await;
    }
    assert_eq!(read_ok(&mut stream).await, "backend 0\n");
    assert_eq!(backends[0].last_request().uri.path(), "/pieces");
}

#[tokio::test]
async fn a_connection_goes_on_after_a_request_with_a_body_and_a_malformed_one_gets_400() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_ok(&mut stream).await, "backend 0\n");

    // A body, then a bodiless request in the same write: both are answered, in order.
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_ok(&mut stream).await, "hello");
    assert_eq!(read_ok(&mut stream).await, "backend 0\n");

    stream
        .write_all(b"GET /bad HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the connection closed in time")
        .ok();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{rest}");
    assert_eq!(paths_seen(&backends[0]), ["/before", "/echo", "/after"]);
}

#[tokio::test]
async fn a_malformed_first_request_gets_400_and_never_reaches_a_backend() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let answer = raw_exchange(proxy.address, request, DEADLINE).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
    }
    assert!(backends[0].requests().is_empty());
}

#[tokio::test]
async fn part_of_a_head_pipelined_behind_a_request_in_flight_runs_the_header_clock() {
    let backends = Backend::start_many(1).await;
    // The idle clock is far longer than the test's deadline: only the header clock can end it.
    let proxy = TestProxy::for_backends(
        &backends,
        "[server]\nheader_timeout = \"200ms\"\nidle_timeout = \"60s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(b"GET /delay/100 HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let length = content_length(&head);
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the header clock closed the connection")
        .ok();
    let rest = String::from_utf8_lossy(&rest[length..]).into_owned();
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest:?}");
    assert_eq!(backends[0].count(), 1);
}

#[tokio::test]
async fn a_head_over_the_limit_gets_431() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nmax_header_bytes = 8192").await;
    for size in [9_000, 12_000, 20_000] {
        let request = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let answer = raw_exchange(proxy.address, request.as_bytes(), DEADLINE).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{size}: {answer}");
    }
    assert!(backends[0].requests().is_empty());
}
