//! Real HTTP backends on loopback port 0 whose behaviour is chosen by the request path, and which
//! record every request they receive.
//!
//! | path | answer |
//! |---|---|
//! | `/status/{code}` | that status |
//! | `/delay/{ms}` | 200 after the delay |
//! | `/hang` | never answers |
//! | `/reset` | closes the connection without an answer |
//! | `/close` | 200 with `Connection: close`, then closes the connection |
//! | `/bytes/{n}` | `n` bytes, streamed in 64 KiB chunks |
//! | `/partial/{n}` | promises `2n` bytes, sends `n`, then stalls |
//! | `/echo` | the request body, streamed back |
//! | `/count` | the number of request body bytes, after reading them all |
//! | `/trailers` | a chunked body followed by a `x-checksum` trailer |
//! | `/ws` | a WebSocket-style upgrade whose tunnel echoes bytes |
//! | `/cache/{name}?...` | a cacheable object, shaped by the query (see [`cache_object`]) |
//! | anything else | `backend {index}` |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// Body bytes read, for the paths that read the body (`/echo`, `/count`).
    pub body_bytes: u64,
}

struct Shared {
    index: usize,
    requests: Mutex<Vec<RecordedRequest>>,
    count: AtomicUsize,
    connections: AtomicUsize,
    open_connections: AtomicUsize,
    behaviour: Behaviour,
    /// Wakes every connection task to drop its connection.
    close_all: tokio::sync::Notify,
}

/// How a backend answers every request, whatever its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// As the path says (see the table above).
    Normal,
    /// As the path says, after this delay.
    Latency(Duration),
    /// This status, with a short body.
    Status(u16),
    /// Reads the request, then closes the connection without an answer.
    Reset,
    /// Reads the request and never answers.
    Hang,
}

/// A running test backend. Dropping it stops it.
pub struct Backend {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl Backend {
    /// Starts backend number `index` on 127.0.0.1, port 0.
    pub async fn start(index: usize) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a test backend");
        Self::serve(listener, index)
    }

    /// Serves on an already bound listener (to bring a backend back on the same port).
    pub fn serve(listener: TcpListener, index: usize) -> Backend {
        Self::serve_with(listener, index, Behaviour::Normal)
    }

    /// Starts backend number `index` that waits `latency` before every answer.
    pub async fn start_slow(index: usize, latency: Duration) -> Backend {
        Self::start_with(index, Behaviour::Latency(latency)).await
    }

    /// Starts backend number `index` that behaves as `behaviour` says for every path.
    pub async fn start_with(index: usize, behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a test backend");
        Self::serve_with(listener, index, behaviour)
    }

    /// Starts backend number `index` that speaks HTTPS with `certificate` (HTTP/2 or HTTP/1.1, as
    /// the client offers by ALPN).
    pub async fn start_tls(index: usize, certificate: &crate::TestCertificate) -> Backend {
        Self::start_tls_with(index, certificate, None).await
    }

    /// Like [`Backend::start_tls`]; with `client_ca` (PEM), it also requires a client certificate
    /// signed by that CA.
    pub async fn start_tls_with(
        index: usize,
        certificate: &crate::TestCertificate,
        client_ca: Option<&str>,
    ) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a test backend");
        let chain =
            rustls::pki_types::CertificateDer::pem_slice_iter(certificate.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("the backend's certificate");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(certificate.key_pem.as_bytes())
            .expect("the backend's key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    roots
                        .add(cert.expect("client CA PEM"))
                        .expect("a client CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .expect("a certificate for the backend");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::serve_inner(
            listener,
            index,
            Behaviour::Normal,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
    }

    /// Like [`Backend::start_with`], on an already bound listener.
    pub fn serve_with(listener: TcpListener, index: usize, behaviour: Behaviour) -> Backend {
        Self::serve_inner(listener, index, behaviour, None)
    }

    fn serve_inner(
        listener: TcpListener,
        index: usize,
        behaviour: Behaviour,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Backend {
        let address = listener.local_addr().expect("backend address");
        let shared = Arc::new(Shared {
            index,
            requests: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            behaviour,
            close_all: tokio::sync::Notify::new(),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped, tls));
        Backend {
            address,
            shared,
            stop,
        }
    }

    /// Starts `count` backends numbered from 0.
    pub async fn start_many(count: usize) -> Vec<Backend> {
        let mut backends = Vec::with_capacity(count);
        for index in 0..count {
            backends.push(Backend::start(index).await);
        }
        backends
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// TCP connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    pub fn last_request(&self) -> RecordedRequest {
        self.requests()
            .pop()
            .expect("the backend received a request")
    }

    /// Stops accepting and closes every connection at once, like a crashed server.
    pub fn kill(&self) {
        self.stop.send_replace(true);
    }

    /// Drops every open connection, abruptly, and goes on accepting new ones.
    pub fn close_connections(&self) {
        self.shared.close_all.notify_waiters();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.open_connections.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(&shared);
        let mut stopped = stopped.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let counted = Arc::clone(&shared);
            let service = service_fn(move |request| answer(Arc::clone(&shared), request));
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = stopped.wait_for(|stop| *stop) => {}
                        _ = counted.close_all.notified() => {}
                    }
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = connection => {}
                            _ = stopped.wait_for(|stop| *stop) => {}
                            _ = counted.close_all.notified() => {}
                        }
                    }
                }
            }
            counted.open_connections.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

#[derive(Debug)]
struct DeliberateReset;

impl std::fmt::Display for DeliberateReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the test backend resets this connection on purpose")
    }
}

impl std::error::Error for DeliberateReset {}

fn record_of(request: &Request<Incoming>) -> RecordedRequest {
    RecordedRequest {
        method: request.method().clone(),
        uri: request.uri().clone(),
        version: request.version(),
        headers: request.headers().clone(),
        body_bytes: 0,
    }
}

/// Reads and counts a request body to its end (or to its first error).
async fn read_body(request: &mut Request<Incoming>) -> u64 {
    let mut total = 0u64;
    while let Some(Ok(frame)) = request.body_mut().frame().await {
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
        }
    }
    total
}

async fn answer(
    shared: Arc<Shared>,
    mut request: Request<Incoming>,
) -> Result<Response<BoxBody>, DeliberateReset> {
    shared.count.fetch_add(1, Ordering::SeqCst);
    match shared.behaviour {
        Behaviour::Normal => {}
        Behaviour::Latency(latency) => tokio::time::sleep(latency).await,
        Behaviour::Status(code) => {
            let body_bytes = read_body(&mut request).await;
            shared.requests.lock().expect("lock").push(RecordedRequest {
                body_bytes,
                ..record_of(&request)
            });
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(with_status(text(format!("status {status}\n")), status));
        }
        Behaviour::Reset => {
            let body_bytes = read_body(&mut request).await;
            shared.requests.lock().expect("lock").push(RecordedRequest {
                body_bytes,
                ..record_of(&request)
            });
            return Err(DeliberateReset);
        }
        Behaviour::Hang => {
            shared
                .requests
                .lock()
                .expect("lock")
                .push(record_of(&request));
            std::future::pending::<()>().await;
        }
    }
    let record = RecordedRequest {
        method: request.method().clone(),
        uri: request.uri().clone(),
        version: request.version(),
        headers: request.headers().clone(),
        body_bytes: 0,
    };
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let response = match segments.as_slice() {
        ["status", code] => {
            shared.requests.lock().expect("lock").push(record);
            let status = code
                .parse()
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .unwrap_or(StatusCode::OK);
            with_status(text(format!("status {status}\n")), status)
        }
        ["delay", ms] => {
            shared.requests.lock().expect("lock").push(record);
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            text(format!("backend {} after {ms} ms\n", shared.index))
        }
        ["hang"] => {
            shared.requests.lock().expect("lock").push(record);
            std::future::pending::<()>().await;
            unreachable!("pending never completes")
        }
        ["close"] => {
            shared.requests.lock().expect("lock").push(record);
            let mut response = text("closing\n".to_string());
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        ["reset"] => {
            shared.requests.lock().expect("lock").push(record);
            return Err(DeliberateReset);
        }
        ["bytes", n] => {
            shared.requests.lock().expect("lock").push(record);
            let total: u64 = n.parse().unwrap_or(0);
            let mut response = Response::new(PatternBody { remaining: total }.boxed());
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(total));
            response
        }
        ["partial", n] => {
            shared.requests.lock().expect("lock").push(record);
            let sent: u64 = n.parse().unwrap_or(0);
            let (mut sender, body) =
                http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
            tokio::spawn(async move {
                let _ = sender
                    .send_data(Bytes::from(vec![b'x'; sent as usize]))
                    .await;
                std::future::pending::<()>().await;
                drop(sender);
            });
            let mut response = Response::new(body.boxed());
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(2 * sent));
            response
        }
        ["echo"] => {
            shared.requests.lock().expect("lock").push(record);
            let body = request.into_body().map_err(std::io::Error::other).boxed();
            Response::new(body)
        }
        ["count"] => {
            let mut received = 0u64;
            let mut body = request.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => received += frame.data_ref().map_or(0, |data| data.len() as u64),
                    Err(_) => return Err(DeliberateReset),
                }
            }
            let mut record = record;
            record.body_bytes = received;
            shared.requests.lock().expect("lock").push(record);
            text(format!("{received}"))
        }
        ["trailers"] => {
            shared.requests.lock().expect("lock").push(record);
            let (sender, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
            tokio::spawn(async move {
                let mut sender = sender;
                let _ = sender.send_data(Bytes::from_static(b"part one, ")).await;
                let _ = sender.send_data(Bytes::from_static(b"part two")).await;
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
                let _ = sender.send_trailers(trailers).await;
            });
            let mut response = Response::new(body.boxed());
            response
                .headers_mut()
                .insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
            response
        }
        ["cache", ..] => {
            shared.requests.lock().expect("lock").push(record);
            let served = shared.count.load(Ordering::SeqCst);
            cache_object(&request, served).await
        }
        ["ws"] => {
            shared.requests.lock().expect("lock").push(record);
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buffer = [0u8; 4096];
                loop {
                    match io.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            let mut response = with_status(empty(), StatusCode::SWITCHING_PROTOCOLS);
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            response
        }
        _ => {
            shared.requests.lock().expect("lock").push(record);
            text(format!("backend {}\n", shared.index))
        }
    };
    Ok(response)
}

/// A cacheable object for `/cache/{name}`, shaped by query parameters (values percent-encoded):
///
/// | parameter | effect |
/// |---|---|
/// | `cc` | the `Cache-Control` value |
/// | `etag` | an `ETag` (`"value"`); a request whose `If-None-Match` names it gets `304` |
/// | `lm` | `Last-Modified` this many seconds before now |
/// | `vary` | the `Vary` value |
/// | `status` | the status (default 200) |
/// | `size` | a body of this many pattern bytes instead of the text one |
/// | `chunked` | send the body without `Content-Length` |
/// | `delay` | milliseconds to wait before answering |
/// | `cookie` | add a `Set-Cookie` |
/// | `tag` | a `Surrogate-Key` value |
/// | `location` | a `Location` value |
/// | `age` | an `Age` value on full answers (not on `304`): stored already stale |
/// | `cut` | with `size`: promise the whole size, send half of it, then close the connection |
///
/// The text body names the object, the number of requests the backend had served, and the
/// values of the fields the object varies on, so that a test can tell fetches and variants apart.
pub async fn cache_object(request: &Request<Incoming>, served: usize) -> Response<BoxBody> {
    let path = request.uri().path().to_string();
    let parameters: Vec<(String, String)> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_string(), percent_decode(value)))
        .collect();
    let get = |name: &str| {
        parameters
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    if let Some(delay) = get("delay").and_then(|delay| delay.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let etag = get("etag").map(|etag| format!("\"{etag}\""));
    let mut headers = HeaderMap::new();
    if let Some(cc) = get("cc") {
        headers.insert(header::CACHE_CONTROL, header_value(cc));
    }
    if let Some(etag) = &etag {
        headers.insert(header::ETAG, header_value(etag));
    }
    if let Some(seconds) = get("lm").and_then(|seconds| seconds.parse::<u64>().ok()) {
        let when = std::time::SystemTime::now() - Duration::from_secs(seconds);
        headers.insert(
            header::LAST_MODIFIED,
            header_value(&httpdate::fmt_http_date(when)),
        );
    }
    if let Some(vary) = get("vary") {
        headers.insert(header::VARY, header_value(vary));
    }
    if get("cookie").is_some() {
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=1"));
    }
    if let Some(tag) = get("tag") {
        headers.insert("surrogate-key", header_value(tag));
    }
    if let Some(location) = get("location") {
        headers.insert(header::LOCATION, header_value(location));
    }
    let not_modified = etag.as_ref().is_some_and(|etag| {
        request
            .headers()
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.split(',').any(|tag| tag.trim() == etag))
    });
    let status = get("status")
        .and_then(|status| status.parse().ok())
        .and_then(|status| StatusCode::from_u16(status).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = if not_modified {
        with_status(empty(), StatusCode::NOT_MODIFIED)
    } else if let Some(size) = get("size").and_then(|size| size.parse::<u64>().ok())
        && get("cut").is_some()
    {
        let (mut sender, channel) =
            http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
        tokio::spawn(async move {
            let half = usize::try_from(size / 2).unwrap_or(0);
            let _ = sender.send_data(Bytes::from(vec![b'x'; half])).await;
            // Dropped without the rest: the connection closes short of its length.
            sender.abort(std::io::Error::other("cut off"));
        });
        let mut response = Response::new(channel.boxed());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        with_status(response, status)
    } else if let Some(size) = get("size").and_then(|size| size.parse::<u64>().ok()) {
        let mut response = Response::new(PatternBody { remaining: size }.boxed());
        if get("chunked").is_none() {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        with_status(response, status)
    } else {
        let varied: Vec<String> = get("vary")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| {
                let value = request
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("-");
                format!("{name}={value}")
            })
            .collect();
        let body = format!("{path} #{served} {}\n", varied.join(" "));
        if get("chunked").is_some() {
            let (mut sender, channel) =
                http_body_util::channel::Channel::<Bytes, std::io::Error>::new(2);
            tokio::spawn(async move {
                let _ = sender.send_data(Bytes::from(body)).await;
            });
            with_status(Response::new(channel.boxed()), status)
        } else {
            with_status(text(body), status)
        }
    };
    if !not_modified && let Some(age) = get("age") {
        headers.insert(header::AGE, header_value(age));
    }
    response.headers_mut().extend(headers);
    response
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Decodes `%XX` escapes and `+` (a space).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        decoded.push(byte);
                        index += 3;
                    }
                    Err(_) => {
                        decoded.push(b'%');
                        index += 1;
                    }
                }
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn text(body: String) -> Response<BoxBody> {
    Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    )
}

fn empty() -> Response<BoxBody> {
    text(String::new())
}

fn with_status(mut response: Response<BoxBody>, status: StatusCode) -> Response<BoxBody> {
    *response.status_mut() = status;
    response
}

/// A body of `remaining` bytes of a repeating pattern, made as it is read.
struct PatternBody {
    remaining: u64,
}

const CHUNK: usize = 64 * 1024;

fn pattern_chunk() -> Bytes {
    static PATTERN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PATTERN
        .get_or_init(|| Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>()))
        .clone()
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let size = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= size as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern_chunk().slice(..size)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A request body of `total` bytes of the same pattern, for uploads.
pub fn pattern_body(total: u64) -> BoxBody {
    PatternBody { remaining: total }.boxed()
}
