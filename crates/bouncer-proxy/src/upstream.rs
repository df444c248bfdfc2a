//! Upstream pools: the backends of one `[upstreams.NAME]`, a pooled keep-alive HTTP/1.1 client to
//! them, and the choice of backend for each request.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use bouncer_config::UpstreamConfig;

use crate::body::{BodyProgress, RequestBody, RequestBodyError};
use crate::error::{BoxError, ProxyError, find_cause};
use crate::metrics::{BackendMetrics, Metrics};

pub struct Backend {
    /// `host:port`, as written in the config; used in logs and metric labels.
    pub label: Arc<str>,
    authority: Authority,
    pub metrics: BackendMetrics,
}

pub struct Upstream {
    pub backends: Vec<Backend>,
    next: AtomicUsize,
    client: Client<HttpConnector, RequestBody>,
    pub response_timeout: Duration,
    pub read_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, metrics: &Metrics) -> Result<Self, http::Error> {
        let backends = config
            .servers
            .iter()
            .map(|server| {
                let label = server.to_string();
                Ok(Backend {
                    authority: Authority::try_from(label.as_str())?,
                    metrics: metrics.backend(&config.name, &label),
                    label: label.into(),
                })
            })
            .collect::<Result<Vec<_>, http::Error>>()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle)
            .build(connector);
        Ok(Self {
            backends,
            next: AtomicUsize::new(0),
            client,
            response_timeout: config.response_timeout,
            read_timeout: config.read_timeout,
        })
    }

    /// Round robin over the backends.
    pub fn pick(&self) -> &Backend {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len().max(1);
        &self.backends[index]
    }

    /// The absolute URI that sends `path_and_query` to `backend`.
    pub fn uri_for(backend: &Backend, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(backend.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// Sends `request` to `backend` and waits for its response headers. The response clock starts
    /// once the request body has been sent, so that a slow upload is not mistaken for a slow backend.
    pub async fn send(
        &self,
        backend: &Backend,
        request: Request<RequestBody>,
        body_progress: Option<Arc<BodyProgress>>,
    ) -> Result<(Response<Incoming>, Duration), ProxyError> {
        backend.metrics.requests.inc();
        let started = Instant::now();
        let response_timeout = self.response_timeout;
        let response_clock = async move {
            if let Some(progress) = body_progress {
                progress.wait_finished().await;
            }
            tokio::time::sleep(response_timeout).await;
        };
        let result = tokio::select! {
            biased;
            result = self.client.request(request) => result.map_err(|error| classify(error, backend)),
            () = response_clock => Err(ProxyError::ResponseTimeout {
                backend: backend.label.to_string(),
                timeout: response_timeout,
            }),
        };
        let elapsed = started.elapsed();
        match result {
            Ok(response) => {
                backend
                    .metrics
                    .response_duration
                    .observe(elapsed.as_secs_f64());
                Ok((response, elapsed))
            }
            Err(error) => {
                if error.side() == crate::error::Side::Upstream {
                    backend.metrics.failures.inc();
                }
                Err(error)
            }
        }
    }
}

/// Sorts an error of the pooled client into our kinds, once, where it arrives.
fn classify(error: hyper_util::client::legacy::Error, backend: &Backend) -> ProxyError {
    let backend_label = || backend.label.to_string();
    if let Some(body_error) = find_cause::<RequestBodyError>(&error) {
        return match body_error {
            RequestBodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
            RequestBodyError::Client(_) => ProxyError::ClientBody {
                source: Box::new(error),
            },
        };
    }
    if error.is_connect() {
        let timed_out =
            find_cause::<io::Error>(&error).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
        if timed_out {
            return ProxyError::ConnectTimeout {
                backend: backend_label(),
            };
        }
        return ProxyError::ConnectFailed {
            backend: backend_label(),
            source: Box::new(error),
        };
    }
    let reset = find_cause::<hyper::Error>(&error).is_some_and(|hyper_error| {
        hyper_error.is_incomplete_message() || hyper_error.is_canceled() || hyper_error.is_closed()
    });
    let source: BoxError = Box::new(error);
    if reset {
        ProxyError::UpstreamReset {
            backend: backend_label(),
            source,
        }
    } else {
        ProxyError::UpstreamFailed {
            backend: backend_label(),
            source,
        }
    }
}
