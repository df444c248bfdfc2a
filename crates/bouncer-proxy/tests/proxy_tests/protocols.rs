use bouncer_testkit::{Backend, Clients, TestProxy, full, read_head};
use http::{Request, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http2_clients_are_served_over_http1_backends() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();
    let request = Request::get(proxy.url("/h2?x=1"))
        .version(Version::HTTP_2)
        .body(bouncer_testkit::empty())
        .unwrap();
    let answer = clients.send(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = backends[0].last_request();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.uri.path_and_query().unwrap().as_str(), "/h2?x=1");
    assert_eq!(seen.headers["host"], proxy.address.to_string());
    assert_eq!(seen.headers["via"], "2 bouncer");

    let upload = Request::post(proxy.url("/count"))
        .version(Version::HTTP_2)
        .body(full(vec![0u8; 200_000]))
        .unwrap();
    assert_eq!(clients.send(upload).await.text(), "200000");
}

#[tokio::test]
async fn many_http2_streams_share_one_connection() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let clients = Clients::new();
    let mut tasks = Vec::new();
    for index in 0..50 {
        let clients = clients.clone();
        let url = proxy.url(&format!("/delay/{}", index % 5));
        tasks.push(tokio::spawn(async move {
            let request = Request::get(url)
                .version(Version::HTTP_2)
                .body(bouncer_testkit::empty())
                .unwrap();
            clients.send(request).await.status
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(backends[0].count(), 50);
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_two_way_tunnel() {
    let backends = Backend::start_many(1).await;
    let proxy = TestProxy::for_backends(&backends, "").await;
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"ping"[..], b"a longer second message"] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
    let seen = backends[0].last_request().headers;
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
}
