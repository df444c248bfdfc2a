//! Upstreams: the backends of one `[upstreams.NAME]`, each with its pool of keep-alive HTTP/1.1
//! connections, and the choice of backend for each request.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;

use bouncer_config::{HashKey, UpstreamConfig};

use crate::balance::{BackendLoad, Balancer, PickInput};
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
    pub name: String,
    pub backends: Vec<Backend>,
    /// The balancer's view of each backend, in the order of `backends`.
    loads: Vec<BackendLoad>,
    balancer: Balancer,
    /// What `consistent_hash` hashes.
    pub hash_key: Option<HashKey>,
    /// Whether latencies are tracked (only peak EWMA uses them).
    tracks_latency: bool,
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
                let label = server.address.to_string();
                Ok(Backend {
                    authority: Authority::try_from(label.as_str())?,
                    metrics: metrics.backend(&config.name, &label),
                    pool: ConnectionPool::new(server.address.clone(), settings.clone()),
                    label: label.into(),
                })
            })
            .collect::<Result<Vec<_>, http::Error>>()?;
        let loads: Vec<BackendLoad> = config
            .servers
            .iter()
            .map(|server| BackendLoad::new(server.weight, server.backup))
            .collect();
        let names: Vec<String> = config
            .servers
            .iter()
            .map(|server| server.address.to_string())
            .collect();
        Ok(Self {
            name: config.name.clone(),
            balancer: Balancer::new(config.balance, &loads, &names),
            loads,
            backends,
            hash_key: config.hash_key.clone(),
            tracks_latency: config.balance == bouncer_config::Balance::PeakEwma,
            response_timeout: config.response_timeout,
            read_timeout: config.read_timeout,
        })
    }

    /// Chooses the backend for a request and counts it in flight there until the returned guard
    /// is dropped. `key_hash` is the hash of the configured key, for `consistent_hash`.
    pub fn pick(self: &Arc<Self>, key_hash: Option<u64>) -> Result<(usize, InFlight), ProxyError> {
        let input = PickInput {
            key_hash,
            random: rand::random(),
            now: Instant::now(),
        };
        let index = self
            .balancer
            .pick(&self.loads, |_| true, &input)
            .ok_or_else(|| ProxyError::NoBackendAvailable {
                upstream: self.name.clone(),
            })?;
        self.loads[index].in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight {
            upstream: Arc::clone(self),
            index,
        };
        Ok((index, guard))
    }

    /// Sends `request` to `backend` and waits for its response headers. The response clock starts
    /// once the request body has been sent, so that a slow upload is not mistaken for a slow backend.
    pub async fn send(
        &self,
        index: usize,
        request: Request<RequestBody>,
        body_progress: Option<Arc<BodyProgress>>,
    ) -> Result<(Response<Incoming>, Lease, Duration), ProxyError> {
        let backend = &self.backends[index];
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
        if self.tracks_latency {
            // A failure counts as slow as it took, so that a failing backend is not preferred.
            self.loads[index].observe_latency(elapsed, started + elapsed);
        }
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

/// Counts a request in flight at one backend until dropped, which is when its response has been
/// passed on in full (or abandoned).
pub struct InFlight {
    upstream: Arc<Upstream>,
    index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.loads[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
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
