//! `bouncer demo`: three small backends in-process on loopback and a proxy in front of them, so
//! that a newcomer sees Bouncer work with no files at all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use crate::{RunningProxy, StartError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start a demo backend")]
    Backend(#[source] std::io::Error),
    #[error("cannot make the demo's certificate")]
    Certificate(#[source] rcgen::Error),
    #[error("cannot write the demo's certificate to {path}")]
    CertificateFiles {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the demo config is invalid:\n{0}")]
    Config(#[source] bouncer_config::ConfigProblems),
    #[error("cannot start the demo proxy")]
    Proxy(#[source] StartError),
}

/// A running demo: the proxy, and what to tell the user.
pub struct Demo {
    pub proxy: RunningProxy,
    pub backends: Vec<SocketAddr>,
    pub config_text: String,
    /// The self-signed certificate the HTTPS listener serves, PEM, for `curl --cacert`.
    pub certificate: std::path::PathBuf,
    /// Stops each backend, like a crash.
    stops: Vec<watch::Sender<bool>>,
    _certificate_dir: TemporaryDir,
}

/// What happened while a demo backend was down and after it came back.
pub struct FailoverShow {
    /// Which backend crashed (1-based, as the backends name themselves).
    pub crashed: usize,
    /// The answers to the requests sent while it was down.
    pub answers_while_down: Vec<String>,
    /// How many of those requests failed: none, when all goes well.
    pub failed: usize,
    /// How long after its restart health checks had it take requests again.
    pub back_after: Option<Duration>,
}

/// What a short flood did, and how a normal client fared meanwhile.
pub struct FloodShow {
    pub attackers: usize,
    pub attack_requests: u64,
    /// Attack requests that a backend answered.
    pub attack_reached: u64,
    /// Attack requests refused with 429 or 403.
    pub attack_refused: u64,
    /// Attack connections closed or refused at the door.
    pub attack_shut_out: u64,
    pub banned: usize,
    pub client_sent: usize,
    pub client_served: usize,
}

/// What the cache did with a few requests for one object and a purge.
pub struct CacheShow {
    /// Each step: what was sent, the status, and the answer's `Cache-Status` (or body, for the
    /// purge).
    pub steps: Vec<(String, u16, String)>,
    /// Requests for the object that reached a backend.
    pub fetched: usize,
}

/// Starts three demo backends and a proxy listening on `bind` (HTTP) and `https` (HTTPS, with a
/// certificate it makes itself), with its admin API on `admin`.
pub async fn start(
    bind: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
) -> Result<Demo, DemoError> {
    let (certificate, key) = write_certificate()?;
    let mut backends = Vec::with_capacity(3);
    let mut stops = Vec::with_capacity(3);
    for index in 1..=3 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Backend)?;
        backends.push(listener.local_addr().map_err(DemoError::Backend)?);
        stops.push(serve_backend(listener, index));
    }
    let servers: Vec<String> = backends
        .iter()
        .map(|address| format!("\"{address}\""))
        .collect();
    let config_text = format!(
        r#"[admin]
bind = "{admin}"

[[listeners]]
name = "public"
bind = "{bind}"

[[listeners]]
name = "https"
bind = "{https}"
[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[routes]]
name = "demo"
path_prefix = "/"
upstream = "demo"

# The backends mark /static as cacheable for a minute: the cache answers it.
[[routes]]
name = "static"
path_prefix = "/static"
upstream = "demo"
cache = {{ enabled = true }}

[cache]
memory = "64MiB"
purge_allow = ["127.0.0.1"]

[upstreams.demo]
servers = [{servers}]
retries = 2

[upstreams.demo.health_check]
path = "/healthz"
interval = "500ms"
healthy_threshold = 2
unhealthy_threshold = 2

[[rate_limits]]
name = "per-ip"
rate = "50/s"
burst = 100

[protection.auto_ban]
violations = 50
within = "10s"
ban_for = "1m"

# Off, so that the flood the demo shows does not scroll everything else away.
[access_log]
format = "off"
"#,
        servers = servers.join(", "),
        cert = certificate.display(),
        key = key.display(),
    );
    let config =
        bouncer_config::parse(Path::new("<demo>"), &config_text).map_err(DemoError::Config)?;
    let proxy = crate::start(&config).await.map_err(DemoError::Proxy)?;
    Ok(Demo {
        proxy,
        backends,
        config_text,
        _certificate_dir: TemporaryDir(
            certificate
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default(),
        ),
        certificate,
        stops,
    })
}

/// A self-signed certificate for localhost and 127.0.0.1, written with its key (mode 0600) to a
/// directory of this demo under the temporary directory, removed when the demo ends.
fn write_certificate() -> Result<(std::path::PathBuf, std::path::PathBuf), DemoError> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(DemoError::Certificate)?;
    let dir = std::env::temp_dir().join(format!(
        "bouncer-demo-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let write = |name: &str, text: String, private: bool| {
        let path = dir.join(name);
        let failure = |source| DemoError::CertificateFiles {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(failure)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        if private {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        }
        let mut file = options.open(&path).map_err(failure)?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(failure)?;
        Ok(path)
    };
    let cert = write("demo.pem", certified.cert.pem(), false)?;
    let key = write("demo.key", certified.signing_key.serialize_pem(), true)?;
    Ok((cert, key))
}

/// The demo's certificate directory, removed when the demo ends.
struct TemporaryDir(std::path::PathBuf);

impl Drop for TemporaryDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Demo {
    /// Sends a few requests through the proxy and returns which backend answered each, to show
    /// the load balancing at work.
    pub async fn sample_requests(&self, count: usize) -> Vec<String> {
        let Some(address) = self.proxy.listener_address("public") else {
            return Vec::new();
        };
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut answers = Vec::with_capacity(count);
        for _ in 0..count {
            answers.push(get(&client, address).await.unwrap_or_else(|error| error));
        }
        answers
    }

    /// Crashes backend 3 while requests keep coming, then restarts it on its port and waits (up
    /// to ten seconds) for health checks to bring it back.
    pub async fn show_failover(&mut self, requests: usize) -> FailoverShow {
        let crashed = 3;
        let mut show = FailoverShow {
            crashed,
            answers_while_down: Vec::with_capacity(requests),
            failed: 0,
            back_after: None,
        };
        let (Some(address), Some(&backend)) = (
            self.proxy.listener_address("public"),
            self.backends.get(crashed - 1),
        ) else {
            return show;
        };
        if let Some(stop) = self.stops.get(crashed - 1) {
            stop.send_replace(true);
        }
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        for _ in 0..requests {
            match get(&client, address).await {
                Ok(answer) => show.answers_while_down.push(answer),
                Err(error) => {
                    show.failed += 1;
                    show.answers_while_down.push(error);
                }
            }
        }
        let Ok(listener) = TcpListener::bind(backend).await else {
            return show;
        };
        if let Some(stop) = self.stops.get_mut(crashed - 1) {
            *stop = serve_backend(listener, crashed);
        }
        let restarted = Instant::now();
        let mark = format!("demo backend {crashed} ");
        while restarted.elapsed() < Duration::from_secs(10) {
            match get(&client, address).await {
                Ok(answer) if answer.contains(&mark) => {
                    show.back_after = Some(restarted.elapsed());
                    break;
                }
                Ok(_) => {}
                Err(_) => show.failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        show
    }
}

impl Demo {
    /// Floods the proxy for `length` from `attackers` addresses of 127.66.0.0/16, as fast as they
    /// can, while a normal client on 127.0.0.1 asks for a page every 100 ms.
    pub async fn show_flood(&self, attackers: u8, length: Duration) -> FloodShow {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let mut show = FloodShow {
            attackers: usize::from(attackers),
            attack_requests: 0,
            attack_reached: 0,
            attack_refused: 0,
            attack_shut_out: 0,
            banned: 0,
            client_sent: 0,
            client_served: 0,
        };
        let Some(address) = self.proxy.listener_address("public") else {
            return show;
        };
        let counts = Arc::new([
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        ]);
        let until = Instant::now() + length;
        let mut tasks = Vec::new();
        for index in 0..attackers {
            let counts = Arc::clone(&counts);
            let from = std::net::IpAddr::from([127, 66, 0, 1 + index]);
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    // Bounded: a connect whose SYN is dropped would otherwise wait minutes.
                    let connected = tokio::time::timeout_at(until, connect_from(from, address))
                        .await
                        .ok()
                        .flatten();
                    let Some(mut sender) = connected else {
                        counts[3].fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    while Instant::now() < until {
                        counts[0].fetch_add(1, Ordering::Relaxed);
                        let answered = tokio::time::timeout_at(until, attack_request(&mut sender))
                            .await
                            .ok()
                            .flatten();
                        match answered {
                            Some(200) => counts[1].fetch_add(1, Ordering::Relaxed),
                            Some(_) => counts[2].fetch_add(1, Ordering::Relaxed),
                            None => {
                                counts[3].fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        };
                    }
                }
            }));
        }
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        while Instant::now() < until {
            show.client_sent += 1;
            if get(&client, address).await.is_ok() {
                show.client_served += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for task in tasks {
            let _ = task.await;
        }
        show.attack_requests = counts[0].load(Ordering::Relaxed);
        show.attack_reached = counts[1].load(Ordering::Relaxed);
        show.attack_refused = counts[2].load(Ordering::Relaxed);
        show.attack_shut_out = counts[3].load(Ordering::Relaxed);
        show.banned = self.proxy.bans().len();
        show
    }
}

impl Demo {
    /// Three GETs of a cacheable object (a miss, then hits), a `PURGE`, and a GET again (a miss).
    pub async fn show_cache(&self) -> CacheShow {
        let mut show = CacheShow {
            steps: Vec::new(),
            fetched: 0,
        };
        let Some(address) = self.proxy.listener_address("public") else {
            return show;
        };
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let object = format!("http://{address}/static/logo.txt");
        let steps = [
            ("GET", false),
            ("GET", false),
            ("GET", false),
            ("PURGE", true),
            ("GET", false),
        ];
        for (method, show_body) in steps {
            let Ok(request) = Request::builder()
                .method(method)
                .uri(&object)
                .body(Empty::new())
            else {
                continue;
            };
            let Ok(response) = client.request(request).await else {
                show.steps
                    .push((method.to_string(), 0, "no answer".to_string()));
                continue;
            };
            let status = response.status().as_u16();
            let cache_status = response
                .headers()
                .get("cache-status")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|body| String::from_utf8_lossy(&body.to_bytes()).trim().to_string())
                .unwrap_or_default();
            if method == "GET" && cache_status.contains("fwd=") {
                show.fetched += 1;
            }
            let told = if show_body { body } else { cache_status };
            show.steps
                .push((format!("{method} /static/logo.txt"), status, told));
        }
        show
    }
}

type AttackSender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect_from(from: std::net::IpAddr, proxy: SocketAddr) -> Option<AttackSender> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    let stream = socket.connect(proxy).await.ok()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

async fn attack_request(sender: &mut AttackSender) -> Option<u16> {
    sender.ready().await.ok()?;
    let request = Request::get("/hello")
        .header(header::HOST, "demo")
        .body(Empty::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    response.into_body().collect().await.ok()?;
    Some(status)
}

/// `GET /hello` through the proxy: the answer's text, or what went wrong.
async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    address: SocketAddr,
) -> Result<String, String> {
    let uri = format!("http://{address}/hello")
        .parse::<http::Uri>()
        .map_err(|error| error.to_string())?;
    let response = client
        .get(uri)
        .await
        .map_err(|error| format!("error: {error}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("error: {error}"))?;
    let text = String::from_utf8_lossy(&body.to_bytes()).trim().to_string();
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("{status}: {text}"))
    }
}

/// Serves demo backend `index` on `listener` until the returned sender says stop, which closes
/// the listener and every connection at once, like a crash.
fn serve_backend(listener: TcpListener, index: usize) -> watch::Sender<bool> {
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        let mut stop_accepting = stopped.clone();
        loop {
            let accepted = tokio::select! {
                _ = stop_accepting.wait_for(|stop| *stop) => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let mut stop_serving = stopped.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    let text = format!(
                        "hello from demo backend {index} ({} {})\n",
                        request.method(),
                        request.uri().path()
                    );
                    let cacheable = request.uri().path().starts_with("/static/");
                    let mut response = Response::new(Full::new(Bytes::from(text)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    if cacheable {
                        response.headers_mut().insert(
                            header::CACHE_CONTROL,
                            header::HeaderValue::from_static("public, max-age=60"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
                    _ = stop_serving.wait_for(|stop| *stop) => {}
                }
            });
        }
    });
    stop
}
