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

use crate::{RunningProxy, StartError};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start a demo backend")]
    Backend(#[source] std::io::Error),
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
}

/// Starts three demo backends and a proxy listening on `bind`, with its admin API on `admin`.
pub async fn start(bind: SocketAddr, admin: SocketAddr) -> Result<Demo, DemoError> {
    let mut backends = Vec::with_capacity(3);
    for index in 1..=3 {
        backends.push(spawn_backend(index).await.map_err(DemoError::Backend)?);
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

[[routes]]
name = "demo"
path_prefix = "/"
upstream = "demo"

[upstreams.demo]
servers = [{servers}]

[access_log]
format = "common"
"#,
        servers = servers.join(", ")
    );
    let config =
        bouncer_config::parse(Path::new("<demo>"), &config_text).map_err(DemoError::Config)?;
    let proxy = crate::start(&config).await.map_err(DemoError::Proxy)?;
    Ok(Demo {
        proxy,
        backends,
        config_text,
    })
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
            let Ok(uri) = format!("http://{address}/hello").parse::<http::Uri>() else {
                break;
            };
            let answer = match client.get(uri).await {
                Ok(response) => match response.into_body().collect().await {
                    Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
                    Err(error) => format!("error: {error}"),
                },
                Err(error) => format!("error: {error}"),
            };
            answers.push(answer);
        }
        answers
    }
}

async fn spawn_backend(index: usize) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| async move {
                    let text = format!(
                        "hello from demo backend {index} ({} {})\n",
                        request.method(),
                        request.uri().path()
                    );
                    let mut response = Response::new(Full::new(Bytes::from(text)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}
