//! How the proxy reads a backend's HTTP/1.1 responses to requests without a body (the lean client):
//! interim answers, each way of framing a body (RFC 9112 section 6.3), malformed or ambiguous
//! responses, and when a connection is used again. The backend is a scripted one on a raw socket,
//! so that it can answer what no well-behaved server would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bouncer_testkit::{Clients, TestProxy};
use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A backend that answers each request with the response scripted for its path, and counts the
/// connections it accepted.
struct ScriptedBackend {
    address: SocketAddr,
    connections: Arc<AtomicUsize>,
}

/// The response for a path, and whether the backend closes the connection after it.
fn script(path: &str) -> (&'static [u8], bool) {
    match path {
        "/plain" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain", false),
        "/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
            false,
        ),
        "/until-close" => (b"HTTP/1.0 200 OK\r\n\r\nread until the backend closes", true),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nchun\r\n3\r\nked\r\n0\r\n\r\n",
            false,
        ),
        "/both-lengths" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            false,
        ),
        "/conflicting-lengths" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            false,
        ),
        "/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
            false,
        ),
        "/no-content" => (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            false,
        ),
        // Fields that the proxy reads, drops or replaces among those it passes on, each line in
        // the form the proxy writes: kept as the bytes read on the way to an HTTP/1.1 client.
        "/fields" => (
            b"HTTP/1.1 200 OK\r\nServer: scripted\r\nDate: Mon, 07 Dec 2026 00:00:00 GMT\r\nX-Request-Id: from-the-backend\r\nSet-Cookie: a=1\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nSet-Cookie: b=2\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nX-Empty: \r\n\r\nfields",
            false,
        ),
        // The same with a line in another form and a `Connection` naming a field: a map.
        "/fields-odd" => (
            b"HTTP/1.1 200 OK\r\nServer:scripted\r\nDate: Mon, 07 Dec 2026 00:00:00 GMT\r\nX-Request-Id: from-the-backend\r\nSet-Cookie: a=1\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nSet-Cookie: b=2\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nX-Empty: \r\n\r\nfields",
            false,
        ),
        "/cut-short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", true),
        _ => (b"NOT HTTP AT ALL\r\n\r\n", true),
    }
}

impl ScriptedBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (reader, mut writer) = stream.into_split();
                    let mut reader = BufReader::new(reader);
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        // The rest of the head, then the body a Content-Length announces.
                        let mut body_length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some((name, value)) = line.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                body_length = value.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; body_length];
                        if reader.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let path = request_line.split(' ').nth(1).unwrap_or("/");
                        let (response, close) = script(path);
                        if writer.write_all(response).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        ScriptedBackend {
            address,
            connections,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn proxy_for(backend: &ScriptedBackend) -> TestProxy {
    TestProxy::start(&format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"
[[routes]]
upstream = "scripted"
[upstreams.scripted]
servers = ["{}"]
[access_log]
format = "off"
"#,
        backend.address
    ))
    .await
}

#[tokio::test]
async fn each_framing_of_a_response_body_is_read_to_its_end() {
    let backend = ScriptedBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let clients = Clients::new();
    for (path, body) in [
        ("/plain", "plain"),
        ("/interim", "final"),
        ("/chunked", "chunked"),
        ("/until-close", "read until the backend closes"),
        ("/no-content", ""),
    ] {
        let answer = clients.get(&proxy.url(path)).await;
        let expected = if path == "/no-content" {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::OK
        };
        assert_eq!(answer.status, expected, "{path}");
        assert_eq!(answer.text(), body, "{path}");
    }
}

#[tokio::test]
async fn a_connection_is_used_again_only_after_a_response_that_allows_it() {
    let backend = ScriptedBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let clients = Clients::new();
    for _ in 0..5 {
        assert_eq!(clients.get(&proxy.url("/plain")).await.text(), "plain");
    }
    assert_eq!(backend.connections(), 1, "keep-alive responses share one");
    // Interim answers and a chunked body leave the connection fit for more.
    clients.get(&proxy.url("/interim")).await;
    clients.get(&proxy.url("/chunked")).await;
    clients.get(&proxy.url("/plain")).await;
    assert_eq!(backend.connections(), 1);
    // An HTTP/1.0 response read until the close, and one framed both ways: not used again.
    clients.get(&proxy.url("/until-close")).await;
    clients.get(&proxy.url("/plain")).await;
    assert_eq!(backend.connections(), 2);
    let both = clients.get(&proxy.url("/both-lengths")).await;
    assert_eq!(
        both.text(),
        "ok",
        "the transfer coding wins over Content-Length"
    );
    assert_eq!(
        both.header("content-length"),
        None,
        "the length is not passed on"
    );
    clients.get(&proxy.url("/plain")).await;
    assert_eq!(backend.connections(), 3);
}

#[tokio::test]
async fn malformed_or_ambiguous_responses_are_502_never_guessed_at() {
    let backend = ScriptedBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let clients = Clients::new();
    for path in ["/conflicting-lengths", "/garbage"] {
        let answer = clients.get(&proxy.url(path)).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{path}");
    }
    // A body that breaks off after its head was passed on cannot be answered with a 502: the
    // client's connection is cut, so that it cannot take the body for whole.
    for path in ["/bad-chunk", "/cut-short"] {
        let url = proxy.url(path);
        let response = reqwest_like_get(&url).await;
        assert!(
            response.is_err(),
            "{path}: the answer must not look complete"
        );
    }
    // The proxy still serves.
    assert_eq!(clients.get(&proxy.url("/plain")).await.text(), "plain");
}

/// A GET whose whole body must arrive; an error when the answer breaks off.
async fn reqwest_like_get(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client
        .get(url.parse().map_err(|error| format!("{error}"))?)
        .await
        .map_err(|error| error.to_string())?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| error.to_string())?;
    Ok(body.to_bytes().to_vec())
}

#[tokio::test]
async fn a_response_framed_both_ways_loses_its_length_on_the_path_for_requests_with_a_body() {
    let backend = ScriptedBackend::start().await;
    let proxy = proxy_for(&backend).await;
    // A request with a body goes on hyper's client rather than the lean one.
    let request = http::Request::post(proxy.url("/both-lengths"))
        .body(bouncer_testkit::full("a body"))
        .unwrap();
    let answer = Clients::new().send(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok");
    assert_eq!(answer.header("content-length"), None);
}

/// The fields of `answer` but the request id, whose value is each request's own, as sorted
/// name-value pairs.
fn fields_but_the_request_id(answer: &bouncer_testkit::Answer) -> Vec<(String, String)> {
    let ids: Vec<_> = answer.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "one request id: {:?}", answer.headers);
    assert_ne!(ids[0], "from-the-backend", "the proxy sets its own");
    let mut fields: Vec<(String, String)> = answer
        .headers
        .iter()
        .filter(|(name, _)| *name != "x-request-id")
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    fields.sort();
    fields
}

#[tokio::test]
async fn an_http1_client_gets_the_same_fields_whether_or_not_they_stay_the_bytes_read() {
    let backend = ScriptedBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let clients = Clients::new();
    let expected: Vec<(String, String)> = [
        ("content-length", "6"),
        ("content-type", "text/plain"),
        ("date", "Mon, 07 Dec 2026 00:00:00 GMT"),
        ("server", "scripted"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("x-empty", ""),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    for path in ["/fields", "/fields-odd"] {
        // HTTP/1.1 goes through the lean server; HTTP/2 through hyper's, which writes a map.
        let http1 = clients.get(&proxy.url(path)).await;
        let request = http::Request::get(proxy.url(path))
            .version(http::Version::HTTP_2)
            .body(bouncer_testkit::empty())
            .unwrap();
        let http2 = clients.send(request).await;
        for answer in [&http1, &http2] {
            assert_eq!(answer.status, StatusCode::OK, "{path}");
            assert_eq!(answer.text(), "fields", "{path}");
            assert_eq!(fields_but_the_request_id(answer), expected, "{path}");
        }
        let cookies: Vec<_> = http1.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"], "in the order sent");
    }
    // The first answer's lines were written as they came (names in their own case), the second's
    // from a map: both ways were taken above.
    for (path, server_line) in [
        ("/fields", "\r\nServer: scripted\r\n"),
        ("/fields-odd", "\r\nserver: scripted\r\n"),
    ] {
        let answer = bouncer_testkit::raw_exchange(
            proxy.address,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            std::time::Duration::from_secs(10),
        )
        .await;
        assert!(answer.contains(server_line), "{path}: {answer:?}");
    }
}
