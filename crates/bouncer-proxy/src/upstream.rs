//! Upstreams: the backends of one `[upstreams.NAME]`, each with its pool of keep-alive HTTP/1.1
//! connections, and the choice of backend for each request.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;

use bouncer_config::UpstreamConfig;

use crate::body::{BodyProgress, RequestBody, RequestBodyError};
use crate::error::{BoxError, ProxyError, find_cause};
use crate::metrics::{BackendMetrics, Metrics};
use crate::pool::{ConnectionPool, Lease, PoolSettings, SendError};

pub struct Backend {
    /// `host:port`, as written in the config; used in logs and metric labels.
    pub label: Arc<str>,
    /// `host:port` as a `Host` header, for the rare request that arrives without one (HTTP/1.0).
    pub authority: Authority,
    pool: Arc<ConnectionPool>,
    pub metrics: BackendMetrics,
}

pub struct Upstream {
    pub backends: Vec<Backend>,
    next: AtomicUsize,
    pub response_timeout: Duration,
    pub read_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, metrics: &Metrics) -> Result<Self, http::Error> {
        let settings = PoolSettings {
            connect_timeout: config.connect_timeout,
            max_idle: config.pool_max_idle,
            idle_timeout: config.pool_idle_timeout,
        };
        let backends = config
            .servers
            .iter()
            .map(|server| {
                let label = server.to_string();
                Ok(Backend {
                    authority: Authority::try_from(label.as_str())?,
                    metrics: metrics.backend(&config.name, &label),
                    pool: ConnectionPool::new(server.clone(), settings.clone()),
                    label: label.into(),
                })
            })
            .collect::<Result<Vec<_>, http::Error>>()?;
        Ok(Self {
            backends,
            next: AtomicUsize::new(0),
            response_timeout: config.response_timeout,
            read_timeout: config.read_timeout,
        })
    }

    /// Round robin over the backends.
    pub fn pick(&self) -> &Backend {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.backends.len().max(1);
        &self.backends[index]
    }

    /// Sends `request` to `backend` and waits for its response headers. The response clock starts
    /// once the request body has been sent, so that a slow upload is not mistaken for a slow backend.
    pub async fn send(
        &self,
        backend: &Backend,
        request: Request<RequestBody>,
        body_progress: Option<Arc<BodyProgress>>,
    ) -> Result<(Response<Incoming>, Lease, Duration), ProxyError> {
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
            result = backend.pool.send(request) => result.map_err(|error| classify(error, backend)),
            () = response_clock => Err(ProxyError::ResponseTimeout {
                backend: backend.label.to_string(),
                timeout: response_timeout,
            }),
        };
        let elapsed = started.elapsed();
        match result {
            Ok((response, lease)) => {
                backend
                    .metrics
                    .response_duration
                    .observe(elapsed.as_secs_f64());
                Ok((response, lease, elapsed))
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
fn classify(error: SendError, backend: &Backend) -> ProxyError {
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
        let timed_out = matches!(error, SendError::ConnectTimeout)
            || find_cause::<io::Error>(&error)
                .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
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
