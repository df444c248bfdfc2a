use std::time::{Duration, Instant};

use bouncer_testkit::{Backend, TestProxy, read_head};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_client_too_slow_with_its_headers_gets_408_and_is_disconnected() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nheader_timeout = \"200ms\"").await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply))
        .await
        .expect("the proxy closed the slow connection")
        .ok();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert_eq!(backends[0].count(), 0);
}

#[tokio::test]
async fn a_client_dripping_its_headers_without_pause_still_gets_408_at_the_header_timeout() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "[server]\nheader_timeout = \"300ms\"").await;
    let stream = TcpStream::connect(proxy.address).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // Read all along, so that the 408 is taken before the socket is reset by the writes after it.
    let reply = tokio::spawn(async move {
        let mut reply = Vec::new();
        let _ = reader.read_to_end(&mut reply).await;
        reply
    });
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Drip: ")
        .await
        .unwrap();
    let started = Instant::now();
    // A byte every 10 ms for at most 3 s: the head never ends, and the socket never stays quiet
    // for long, so the header clock must be checked on reads that find data too.
    let mut cut_off = None;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if writer.write_all(b"a").await.is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
    }
    let reply = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("the proxy closed the connection")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    let cut_off = cut_off.expect("the proxy let a 3 s drip through a 300 ms header timeout");
    assert!(
        cut_off < Duration::from_secs(2),
        "cut off after {cut_off:?}"
    );
    assert_eq!(backends[0].count(), 0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_then_closes_at_the_idle_timeout()
{
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(
        &backends,
        "[server]\nheader_timeout = \"100ms\"\nidle_timeout = \"600ms\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = [0u8; 10];
    stream.read_exact(&mut body).await.unwrap();
    let idle_since = Instant::now();

    // Silence three times longer than the header timeout: the connection must still serve.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(request).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream.read_exact(&mut body).await.unwrap();
    let idle_since_second = Instant::now();
    assert!(idle_since_second - idle_since >= Duration::from_millis(300));

    // Then the idle timeout closes it cleanly.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the idle connection was closed")
        .unwrap();
    assert!(
        rest.is_empty(),
        "nothing is sent on an idle close: {rest:?}"
    );
    assert!(idle_since_second.elapsed() >= Duration::from_millis(550));
}

#[tokio::test]
async fn requests_slower_than_the_client_clocks_are_not_cut_off() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(
        &backends,
        "[server]\nheader_timeout = \"100ms\"\nidle_timeout = \"150ms\"",
    )
    .await;
    let clients = bouncer_testkit::Clients::new();
    for version in [http::Version::HTTP_11, http::Version::HTTP_2] {
        let request = http::Request::get(proxy.url("/delay/400"))
            .version(version)
            .body(bouncer_testkit::empty())
            .unwrap();
        let answer = clients.send(request).await;
        assert_eq!(answer.status, http::StatusCode::OK, "{version:?}");
    }
}
