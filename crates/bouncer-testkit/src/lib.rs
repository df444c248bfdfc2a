//! Test support for Bouncer: real backends on loopback port 0, a launcher that starts the real
//! proxy from a TOML string, and clients (HTTP/1.1, HTTP/2, raw bytes). Nothing here is mocked.

#![allow(clippy::unwrap_used)]

pub mod backend;
pub mod browser;
pub mod certificates;
pub mod dns;
pub mod flood;
pub mod grpc;
pub mod h2raw;
pub mod pebble;
pub mod redis;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use backend::{Backend, Behaviour, BoxBody, RecordedRequest, pattern_body};
pub use bouncer_proxy::RunningProxy;
pub use certificates::{TestCa, TestCertificate};
pub use dns::DnsServer;
pub use grpc::{GrpcBackend, GrpcClient};

/// A proxy started in this process from a TOML config.
pub struct TestProxy {
    pub proxy: RunningProxy,
    /// The first listener's address.
    pub address: SocketAddr,
}

impl TestProxy {
    /// Starts the proxy from `toml`; listeners should bind port 0.
    pub async fn start(toml: &str) -> TestProxy {
        let config = bouncer_config::parse(Path::new("test.toml"), toml)
            .unwrap_or_else(|problems| panic!("invalid test config:\n{problems}"));
        let proxy = bouncer_proxy::start(&config)
            .await
            .expect("start the proxy");
        let address = proxy.listener_addresses()[0].1;
        TestProxy { proxy, address }
    }

    /// A proxy with one listener, one catch-all route and the given backends, plus `extra` TOML.
    pub async fn for_backends(backends: &[Backend], extra: &str) -> TestProxy {
        Self::start(&config_for(backends, extra)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn admin(&self) -> SocketAddr {
        self.proxy
            .admin_address()
            .expect("the test config has an [admin] section")
    }

    /// The Prometheus text from the admin listener.
    pub async fn scrape(&self) -> String {
        let response = Clients::new()
            .get(&format!("http://{}/metrics", self.admin()))
            .await;
        assert_eq!(response.status, StatusCode::OK);
        response.text()
    }
}

/// The TOML for one listener on port 0, an admin listener on port 0, a catch-all route to the
/// upstream `app` made of `backends`, and `extra` appended (more sections, or keys of `[server]`
/// when `extra` starts with `[server]`).
pub fn config_for(backends: &[Backend], extra: &str) -> String {
    config_with_upstream_keys(backends, "", extra)
}

/// Like [`config_for`], with `upstream_keys` added to `[upstreams.app]`.
pub fn config_with_upstream_keys(backends: &[Backend], upstream_keys: &str, extra: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|backend| format!("\"{}\"", backend.address))
        .collect();
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
name = "app"
upstream = "app"

[upstreams.app]
servers = [{servers}]
connect_timeout = "1s"
response_timeout = "5s"
read_timeout = "5s"
{upstream_keys}

[access_log]
format = "off"

{extra}
"#,
        servers = servers.join(", ")
    )
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// HTTP clients over real sockets: one for HTTP/1.1, one for HTTP/2 with prior knowledge.
#[derive(Clone)]
pub struct Clients {
    pub http1: Client<HttpConnector, BoxBody>,
    pub http2: Client<HttpConnector, BoxBody>,
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

impl Clients {
    pub fn new() -> Self {
        Clients {
            http1: Client::builder(TokioExecutor::new()).build_http(),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.send(Request::get(url).body(empty()).unwrap()).await
    }

    pub async fn send(&self, request: Request<BoxBody>) -> Answer {
        let client = if request.version() == http::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        };
        let response = client
            .request(request)
            .await
            .expect("a response from the proxy");
        read_whole(response).await
    }
}

pub async fn read_whole(response: http::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("the whole response body");
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

pub fn empty() -> BoxBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Sends raw bytes on a new connection and returns everything the proxy sends back until it
/// closes the connection (or `deadline` passes, which fails the test).
pub async fn raw_exchange(address: SocketAddr, request: &[u8], deadline: Duration) -> String {
    let mut stream = TcpStream::connect(address)
        .await
        .expect("connect to the proxy");
    stream
        .write_all(request)
        .await
        .expect("send the raw request");
    let mut received = Vec::new();
    tokio::time::timeout(deadline, stream.read_to_end(&mut received))
        .await
        .expect("the proxy closed the connection in time")
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

/// Reads one HTTP/1.1 response head (up to the blank line) from a raw stream.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = stream.read(&mut byte).await.expect("read a response head");
        assert!(
            read > 0,
            "connection closed inside a response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The value of one sample in Prometheus text, such as
/// `bouncer_requests_total{listener="public",route="app",upstream="app",status_class="2xx"}`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|value| value.trim().parse().ok())
}

/// What is wrong with `text` as the OpenMetrics text format (the Prometheus exposition format
/// with `# EOF`): each line a known comment or a sample of a declared family, names and labels
/// well formed, values numbers, counters' samples ending `_total` (or `_created`), histograms'
/// `_bucket`, `_sum` or `_count`, and `# EOF` last. Empty when it is well formed.
pub fn exposition_problems(text: &str) -> Vec<String> {
    fn is_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_' || first == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn labels_ok(labels: &str) -> bool {
        // name="value" pairs separated by commas; values may hold escaped quotes.
        let mut rest = labels;
        while !rest.is_empty() {
            let Some((name, after)) = rest.split_once("=\"") else {
                return false;
            };
            if !is_name(name) {
                return false;
            }
            let mut end = None;
            let mut escaped = false;
            for (index, c) in after.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(index);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let Some(end) = end else { return false };
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        true
    }
    let mut problems = Vec::new();
    let mut types: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        problems.push("the text does not end with # EOF".to_string());
    }
    for line in &lines {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("EOF"), None, None) => {}
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_name(name) {
                        problems.push(format!("bad family name: {line}"));
                    }
                    types.insert(name.to_string(), kind.to_string());
                }
                (Some("HELP" | "UNIT"), Some(name), _) if is_name(name) => {}
                _ => problems.push(format!("unknown comment: {line}")),
            }
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(split) => split,
            None => {
                problems.push(format!("no value: {line}"));
                continue;
            }
        };
        if value.parse::<f64>().is_err() && !matches!(value, "+Inf" | "-Inf" | "NaN") {
            problems.push(format!("not a number: {line}"));
        }
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => match labels.strip_suffix('}') {
                Some(labels) => (name, labels),
                None => {
                    problems.push(format!("unclosed labels: {line}"));
                    continue;
                }
            },
            None => (series, ""),
        };
        if !is_name(name) || !labels_ok(labels) {
            problems.push(format!("bad name or labels: {line}"));
        }
        let family = types.iter().find(|(family, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                _ => &[""],
            };
            suffixes
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(family.as_str()))
        });
        if family.is_none() {
            problems.push(format!(
                "a sample of no declared family (or a counter without _total): {line}"
            ));
        }
    }
    problems
}

/// How many refusals of `layer` and `reason` the listener `public` counted, from Prometheus text.
pub fn refusals(text: &str, layer: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!(
            "bouncer_refusals_total{{listener=\"public\",layer=\"{layer}\",reason=\"{reason}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

/// Polls `condition` every few milliseconds until it holds, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::exposition_problems;

    #[test]
    fn the_exposition_check_finds_what_is_wrong() {
        let good = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\",y=\"a \\\"b\\\"\"} 3\n# TYPE b gauge\nb 0.5\n# EOF\n";
        assert_eq!(exposition_problems(good), Vec::<String>::new());
        assert_eq!(
            exposition_problems("# TYPE a counter\na 1\n# EOF\n").len(),
            1,
            "no _total"
        );
        assert_eq!(
            exposition_problems("# TYPE b gauge\nb one\n# EOF\n").len(),
            1,
            "no number"
        );
        assert_eq!(
            exposition_problems("# TYPE b gauge\nb{x=1} 1\n# EOF\n").len(),
            1,
            "bad labels"
        );
        assert_eq!(
            exposition_problems("# TYPE b gauge\nb 1\n").len(),
            1,
            "no EOF"
        );
        assert_eq!(exposition_problems("c 1\n# EOF\n").len(), 1, "no family");
    }
}
