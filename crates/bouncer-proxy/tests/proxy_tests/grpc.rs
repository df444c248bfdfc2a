//! gRPC through the proxy with a real tonic server and client: every kind of call, trailers,
//! `TE: trailers`, TLS at the edge, and a backend failure told to the client as a gRPC status.

use std::sync::Arc;

use bouncer_testkit::grpc::GrpcCall;
use bouncer_testkit::tls::{TlsClient, Trust};
use bouncer_testkit::{GrpcBackend, GrpcClient, TestCa, TestProxy};
use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use tonic::Code;

fn grpc_config(backend: std::net::SocketAddr, listener_tls: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
{listener_tls}

[[routes]]
name = "grpc"
upstream = "grpc"

[upstreams.grpc]
servers = ["{backend}"]
protocol = "h2c"
connect_timeout = "1s"

[access_log]
format = "off"
"#
    )
}

#[tokio::test]
async fn grpc_calls_of_every_kind_pass_through_with_their_trailers() {
    let backend = GrpcBackend::start().await;
    let proxy = TestProxy::start(&grpc_config(backend.address, "")).await;
    let mut client = GrpcClient::connect(proxy.address).await;

    assert_eq!(client.unary(b"hello").await.unwrap(), "hello");
    // A status set by the server travels in the trailers, message included.
    let failed = client.unary(b"fail").await.unwrap_err();
    assert_eq!(failed.code(), Code::NotFound);
    assert_eq!(failed.message(), "no such thing");

    let counted = client.count(5).await.unwrap();
    assert_eq!(counted, ["0", "1", "2", "3", "4"]);

    let sum = client
        .sum(vec![
            Bytes::from_static(b"abc"),
            Bytes::from(vec![7u8; 100_000]),
        ])
        .await
        .unwrap();
    assert_eq!(sum, "100003");

    // Both directions stream: each reply arrives before the next message is sent.
    let (sender, mut replies) = client.chat().await.unwrap();
    for message in ["one", "two", "three"] {
        sender.send(Bytes::from(message)).await.unwrap();
        let reply = replies.next().await.expect("a reply").unwrap();
        assert_eq!(reply, format!("echo: {message}"));
    }
    drop(sender);
    assert!(
        replies.next().await.is_none(),
        "the call ends when the client's stream does"
    );

    assert_eq!(
        client.missing().await.unwrap_err().code(),
        Code::Unimplemented
    );

    let calls = backend.calls();
    assert_eq!(calls.len(), 6);
    for GrpcCall {
        version,
        headers,
        authority,
        ..
    } in &calls
    {
        assert_eq!(*version, http::Version::HTTP_2);
        assert_eq!(
            headers.get("te").map(|te| te.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert_eq!(
            authority.as_deref(),
            Some(proxy.address.to_string().as_str())
        );
        assert!(headers.contains_key("x-forwarded-for"));
    }
}

#[tokio::test]
async fn grpc_works_through_a_tls_listener() {
    let ca = TestCa::new("Bouncer test CA");
    let dir = std::env::temp_dir().join(format!("bouncer-grpc-tls-{}", std::process::id()));
    ca.issue(&["grpc.example"]).write(&dir, "grpc");
    let backend = GrpcBackend::start().await;
    let listener_tls = format!(
        "[listeners.tls]\ncertificates = [{{ cert = \"{dir}/grpc.pem\", key = \"{dir}/grpc.key\" }}]",
        dir = dir.display()
    );
    let proxy = TestProxy::start(&grpc_config(backend.address, &listener_tls)).await;

    let tls = Arc::new(TlsClient::new(
        Trust::Ca(&ca.cert_pem),
        &["h2"],
        &[&rustls::version::TLS13],
    ));
    let address = proxy.address;
    let channel = tonic::transport::Endpoint::from_static("http://grpc.example")
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = Arc::clone(&tls);
            async move {
                let stream = tokio::net::TcpStream::connect(address).await?;
                let name = rustls::pki_types::ServerName::try_from("grpc.example")
                    .map_err(std::io::Error::other)?;
                let stream = tls.connector().connect(name, stream).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    let mut client = GrpcClient::over(channel);
    assert_eq!(client.unary(b"over tls").await.unwrap(), "over tls");
    assert_eq!(client.count(3).await.unwrap(), ["0", "1", "2"]);
    let call = backend.calls().pop().unwrap();
    assert_eq!(call.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn a_failed_backend_is_reported_as_a_grpc_status() {
    // Nothing listens on this port any more.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = TestProxy::start(&grpc_config(closed, "")).await;
    let mut client = GrpcClient::connect(proxy.address).await;
    let status = client.unary(b"hello").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "backend unavailable");

    // A plain HTTP client still gets the plain answer.
    let answer = bouncer_testkit::Clients::new()
        .get(&format!("http://{}/", proxy.address))
        .await;
    assert_eq!(answer.status, 502);
}
