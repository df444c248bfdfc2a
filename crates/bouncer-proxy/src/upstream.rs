//! Upstreams: the backends of one `[upstreams.NAME]`, each with its pool of keep-alive HTTP/1.1
//! connections, and the choice of backend for each request.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;

use bouncer_config::{HashKey, RetryOn, UpstreamConfig};

use crate::balance::{BackendLoad, Balancer, PickInput};
use crate::body::{BodyProgress, RequestBody, RequestBodyError};
use crate::error::{BoxError, ProxyError, Side, find_cause};
use crate::health::{UpstreamHealth, Verdict};
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
    pub health: UpstreamHealth,
    /// Other backends to try after a failure that is safe to retry.
    pub retries: u32,
    pub retry_on: RetryOn,
    /// Whether a failure that may have reached a backend is ever retried, which is when a
    /// bodiless request must be kept to be sent again.
    pub replays: bool,
    retry_budget: RetryBudget,
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
            health: UpstreamHealth::new(config.servers.len(), config.outlier_detection.clone()),
            retries: config.retries,
            retry_on: config.retry_on,
            replays: config.retries > 0 && config.retry_on != RetryOn::default(),
            retry_budget: RetryBudget::new(),
        })
    }

    /// Sets backend `index`'s health gauge from its state now.
    pub fn refresh_health_gauge(&self, index: usize) {
        let available = self.health.is_available(index, tokio::time::Instant::now());
        self.backends[index]
            .metrics
            .healthy
            .set(i64::from(available));
    }

    /// Whether any backend outside `tried` may take a request now.
    pub fn any_available(&self, tried: u64) -> bool {
        let now = tokio::time::Instant::now();
        (0..self.backends.len()).any(|index| {
            (index >= 64 || tried & (1 << index) == 0) && self.health.is_available(index, now)
        })
    }

    /// Whether a retry may be spent now; spends it when so.
    pub fn take_retry(&self, failed_backend: usize) -> bool {
        let granted = self.retry_budget.withdraw();
        if granted {
            self.backends[failed_backend].metrics.retries.inc();
        }
        granted
    }

    /// Chooses the backend for a request and counts it in flight there until the returned guard
    /// is dropped. `key_hash` is the hash of the configured key, for `consistent_hash`; `tried`
    /// holds the backends this request already failed at (bit i for backend i), which are avoided.
    pub fn pick(
        self: &Arc<Self>,
        key_hash: Option<u64>,
        tried: u64,
    ) -> Result<(usize, InFlight), ProxyError> {
        let now = tokio::time::Instant::now();
        if tried == 0 {
            self.retry_budget.deposit();
        }
        let input = PickInput {
            key_hash,
            random: if self.balancer.uses_random(key_hash) {
                rand::random()
            } else {
                0
            },
            now: now.into_std(),
        };
        let not_tried = |index: usize| index >= 64 || tried & (1 << index) == 0;
        let index = self
            .balancer
            .pick(
                &self.loads,
                |index| not_tried(index) && self.health.is_available(index, now),
                &input,
            )
            .ok_or_else(|| ProxyError::NoBackendAvailable {
                upstream: self.name.clone(),
            })?;
        self.loads[index].in_flight.fetch_add(1, Ordering::Relaxed);
        self.backends[index].metrics.in_flight.inc();
        let guard = InFlight {
            upstream: Arc::clone(self),
            index,
        };
        Ok((index, guard))
    }

    /// Sends `request` to `backend` and waits for its response headers. The response clock starts
    /// once the request body has been sent, so that a slow upload is not mistaken for a slow backend.
    /// On failure, the request comes back when none of it was sent.
    pub async fn send(
        &self,
        index: usize,
        request: Request<RequestBody>,
        body_progress: Option<Arc<BodyProgress>>,
    ) -> Result<(Response<Incoming>, Lease, Duration), (ProxyError, Option<Request<RequestBody>>)>
    {
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
            result = backend.pool.send(request) => {
                result.map_err(|(error, unsent)| (classify(error, backend), unsent))
            }
            () = response_clock => Err((ProxyError::ResponseTimeout {
                backend: backend.label.to_string(),
                timeout: response_timeout,
            }, None)),
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
                if response.status().is_server_error() {
                    self.record_failure(index);
                } else {
                    self.health.record_success(index);
                }
                Ok((response, lease, elapsed))
            }
            Err((error, unsent)) => {
                if error.side() == Side::Upstream {
                    backend.metrics.failures.inc();
                    self.record_failure(index);
                }
                Err((error, unsent))
            }
        }
    }

    /// Passive outlier detection: a failure of real traffic at backend `index`.
    fn record_failure(&self, index: usize) {
        if let Verdict::Ejected(length) = self
            .health
            .record_failure(index, tokio::time::Instant::now())
        {
            let backend = &self.backends[index];
            backend.metrics.ejections.inc();
            tracing::warn!(upstream = %self.name, backend = %backend.label, ejected_for = ?length, "backend ejected after consecutive failures");
            self.refresh_health_gauge(index);
        }
    }
}

/// Keeps the health gauges true when ejections run out, as long as the upstream exists.
pub async fn refresh_health_gauges(upstream: std::sync::Weak<Upstream>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        for index in 0..upstream.backends.len() {
            upstream.refresh_health_gauge(index);
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
        self.upstream.backends[self.index].metrics.in_flight.dec();
    }
}

/// Retries may be at most about a fifth of the requests, plus a small reserve, so that a failing
/// fleet is not hit by a storm of retries. Counted in thousandths of a retry.
struct RetryBudget {
    balance: std::sync::atomic::AtomicI64,
}

impl RetryBudget {
    const PER_REQUEST: i64 = 200;
    const PER_RETRY: i64 = 1000;
    const RESERVE: i64 = 10 * Self::PER_RETRY;

    fn new() -> Self {
        Self {
            balance: std::sync::atomic::AtomicI64::new(Self::RESERVE),
        }
    }

    fn deposit(&self) {
        // Skipped when full, which spares the write on a healthy fleet's hot path.
        if self.balance.load(Ordering::Relaxed) < Self::RESERVE {
            self.balance.fetch_add(Self::PER_REQUEST, Ordering::Relaxed);
        }
    }

    fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                (balance >= Self::PER_RETRY).then_some(balance - Self::PER_RETRY)
            })
            .is_ok()
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
    }) || find_cause::<io::Error>(&error).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
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
