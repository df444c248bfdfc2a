//! Upstreams: the backends of one `[upstreams.NAME]`, each with its pool of keep-alive HTTP/1.1
//! connections, and the choice of backend for each request.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response};
use tokio::sync::Notify;

use bouncer_config::{HashKey, RetryOn, UpstreamConfig};

use crate::balance::{BackendLoad, Balancer, HasLoad, PickInput};
use crate::body::{BodyProgress, RequestBody, RequestBodyError, UpstreamBody};
use crate::error::{BoxError, ProxyError, Side, find_cause};
use crate::headers::DeferredFields;
use crate::health::{self, BackendHealth, Verdict};
use crate::metrics::{BackendMetrics, Metrics};
use crate::pool::{ConnectionPool, Lease, PoolSettings, SendError};
use crate::sticky::StickyCookie;
use crate::tls::UpstreamTls;

/// One address of an upstream, with everything kept about it. It outlives its place in the
/// upstream's set while requests still use it (a backend dropped by DNS drains that way), and it
/// carries over into a reloaded config that keeps its address.
pub struct Backend {
    /// `ip:port`; used in logs and metric labels.
    pub label: Arc<str>,
    pub address: SocketAddr,
    /// The `servers` entry as written (a host name stays a name), as a `Host` header for the rare
    /// request that arrives without one (HTTP/1.0).
    pub authority: Authority,
    /// Names the backend in sticky cookies: a hash of its address, the same in every instance.
    pub sticky_id: u64,
    pub(crate) pool: Arc<ConnectionPool>,
    pub metrics: BackendMetrics,
    pub load: BackendLoad,
    pub health: BackendHealth,
}

impl HasLoad for Arc<Backend> {
    fn load(&self) -> &BackendLoad {
        &self.load
    }
}

impl Backend {
    /// Sets the health gauge from the backend's state now.
    pub fn refresh_health_gauge(&self) {
        let healthy = self.health.is_healthy(tokio::time::Instant::now());
        self.metrics.healthy.set(i64::from(healthy));
    }
}

/// The backends of an upstream at one time, with the balancer's state over them. Replaced as a
/// whole when the set changes; a request keeps the set it started with across its retries.
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
    balancer: Balancer,
}

/// One backend to be: which `servers` entry it comes from, and its address.
pub type Placement = (usize, SocketAddr);

/// A request's backend (its index in the set), counted in flight there until `guard` is dropped.
pub struct Picked {
    pub index: usize,
    pub guard: InFlight,
    /// When it was picked: the send that follows at once starts its clock from this reading.
    pub at: tokio::time::Instant,
}

/// A backend's answer to a request, with the connection it came on.
pub struct Sent {
    pub response: Response<UpstreamBody>,
    pub lease: Lease,
    /// How long the backend took to answer.
    pub elapsed: Duration,
}

/// What is left to the code that writes a request and reads its answer.
#[derive(Clone, Copy, Default)]
pub struct Wire<'a> {
    /// Fields kept out of the request's map, which the writer adds.
    pub deferred: Option<&'a DeferredFields<'a>>,
    /// The answer's fields may stay the bytes read (see `raw_fields`): nothing reads them on
    /// their way to the lean HTTP/1 server, which writes them.
    pub raw_answer: bool,
}

/// Why a request got no answer from a backend.
pub struct SendFailure {
    pub error: ProxyError,
    /// None of the request reached the backend: it may go to another, whatever its method.
    pub unsent: bool,
}

pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    metrics: Arc<Metrics>,
    settings: PoolSettings,
    set: ArcSwap<BackendSet>,
    /// Backends that DNS dropped lately, with when: taken back with their state when their address
    /// returns soon (resolvers often answer with a varying subset of the addresses).
    retired: Mutex<Vec<(Arc<Backend>, tokio::time::Instant)>>,
    /// What `consistent_hash` hashes.
    pub hash_key: Option<HashKey>,
    /// Whether latencies are tracked (only peak EWMA uses them).
    tracks_latency: bool,
    pub response_timeout: Duration,
    pub read_timeout: Duration,
    /// Other backends to try after a failure that is safe to retry.
    pub retries: u32,
    pub retry_on: RetryOn,
    /// Whether a failure that may have reached a backend is ever retried, which is when a
    /// request must be kept to be sent again.
    pub replays: bool,
    pub retry_buffer: u64,
    retry_budget: RetryBudget,
    queue: Option<Arc<Queue>>,
    pub sticky: Option<StickyCookie>,
    /// TLS to the backends.
    tls: Option<Arc<UpstreamTls>>,
}

/// `max_connections_per_server`: requests beyond it wait here for a backend to free a slot.
struct Queue {
    max: u32,
    timeout: Duration,
    freed: Arc<Notify>,
}

impl Upstream {
    /// Builds an upstream over `placements`. Backends of `previous` (the upstream of the config
    /// before a reload) at the same addresses carry on with their health, load, latency and
    /// connections.
    pub fn new(
        config: &UpstreamConfig,
        metrics: &Arc<Metrics>,
        previous: Option<&Upstream>,
        placements: &[Placement],
        tls: Option<Arc<UpstreamTls>>,
    ) -> Result<Self, http::Error> {
        let settings = PoolSettings {
            connect_timeout: config.connect_timeout,
            max_idle: config.pool_max_idle,
            idle_timeout: config.pool_idle_timeout,
        };
        let mut upstream = Self {
            name: config.name.as_str().into(),
            config: config.clone(),
            metrics: Arc::clone(metrics),
            settings,
            set: ArcSwap::from_pointee(BackendSet {
                backends: Vec::new(),
                balancer: Balancer::new::<Arc<Backend>, &str>(
                    config.balance,
                    &[],
                    &[],
                    config.slow_start,
                ),
            }),
            retired: Mutex::new(Vec::new()),
            hash_key: config.hash_key.clone(),
            tracks_latency: config.balance == bouncer_config::Balance::PeakEwma,
            response_timeout: config.response_timeout,
            read_timeout: config.read_timeout,
            retries: config.retries,
            retry_on: config.retry_on,
            replays: config.retries > 0 && config.retry_on != RetryOn::default(),
            retry_buffer: config.retry_buffer,
            retry_budget: RetryBudget::new(),
            queue: config.max_connections_per_server.map(|max| {
                Arc::new(Queue {
                    max,
                    timeout: config.queue_timeout,
                    // Shared with the upstream before a reload, whose requests in flight free
                    // the slots of backends carried over.
                    freed: previous
                        .and_then(|previous| previous.queue.as_ref())
                        .map_or_else(|| Arc::new(Notify::new()), |queue| Arc::clone(&queue.freed)),
                })
            }),
            sticky: config.sticky.as_ref().map(StickyCookie::new),
            tls,
        };
        // Backends whose connections were made another way (TLS or HTTP version changed) start
        // afresh.
        let known: Vec<Arc<Backend>> = previous
            .filter(|previous| {
                previous.config.tls == config.tls && previous.config.protocol == config.protocol
            })
            .map(|previous| previous.set.load().backends.clone())
            .unwrap_or_default();
        let set = upstream.build_set(&known, placements, false)?;
        upstream.set = ArcSwap::from_pointee(set);
        Ok(upstream)
    }

    /// The backends now.
    pub fn current(&self) -> Arc<BackendSet> {
        self.set.load_full()
    }

    /// The placements of the backends now.
    pub fn placements(&self) -> Vec<Placement> {
        let set = self.set.load();
        set.backends
            .iter()
            .filter_map(|backend| {
                let entry =
                    self.config.servers.iter().position(|server| {
                        backend.authority.as_str() == server.address.to_string()
                    })?;
                Some((entry, backend.address))
            })
            .collect()
    }

    /// Starts what keeps the upstream's view true while it exists: active health checks and the
    /// health gauges' refresh.
    pub fn start_tasks(self: &Arc<Self>) {
        let set = self.current();
        for backend in &set.backends {
            backend.refresh_health_gauge();
            if let Some(check) = &self.config.health_check {
                health::spawn_checks(self, backend, check);
            }
        }
        if self.config.outlier_detection.is_some() {
            tokio::spawn(refresh_health_gauges(Arc::downgrade(self)));
        }
    }

    /// Replaces the backends with those at `placements` (after a DNS refresh). Backends that stay
    /// keep their state; new ones start slow; those that vanished take no new requests and finish
    /// the ones they have. Returns whether anything changed.
    pub fn replace_backends(self: &Arc<Self>, placements: &[Placement]) -> bool {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current();
        let mut addresses: Vec<SocketAddr> =
            placements.iter().map(|&(_, address)| address).collect();
        addresses.sort_unstable();
        addresses.dedup();
        let unchanged = current.backends.len() == addresses.len()
            && addresses.iter().all(|address| {
                current
                    .backends
                    .iter()
                    .any(|backend| backend.address == *address)
            });
        if unchanged {
            return false;
        }
        let now = tokio::time::Instant::now();
        let keep_for = (self.config.resolve_interval * 5).max(Duration::from_secs(60));
        retired.retain(|(_, since)| now.saturating_duration_since(*since) < keep_for);
        let known: Vec<Arc<Backend>> = current
            .backends
            .iter()
            .chain(retired.iter().map(|(backend, _)| backend))
            .cloned()
            .collect();
        let set = match self.build_set(&known, placements, true) {
            Ok(set) => set,
            Err(error) => {
                tracing::warn!(upstream = %self.name, %error, "cannot use the new backend addresses");
                return false;
            }
        };
        retired.retain(|(old, _)| !set.backends.iter().any(|backend| Arc::ptr_eq(old, backend)));
        for backend in &set.backends {
            if current.backends.iter().any(|old| Arc::ptr_eq(old, backend)) {
                continue;
            }
            tracing::info!(upstream = %self.name, backend = %backend.label, "backend added");
            backend.refresh_health_gauge();
            if let Some(check) = &self.config.health_check {
                health::spawn_checks(self, backend, check);
            }
        }
        for old in &current.backends {
            if !set.backends.iter().any(|backend| Arc::ptr_eq(old, backend)) {
                tracing::info!(upstream = %self.name, backend = %old.label, in_flight = old.load.in_flight.load(Ordering::Relaxed), "backend removed: it finishes its requests and takes no new ones");
                old.metrics.healthy.set(0);
                retired.push((Arc::clone(old), now));
            }
        }
        self.set.store(Arc::new(set));
        true
    }

    /// TLS for a backend of the `servers` entry with host `host`: the configured server name, or
    /// the entry's own host name (or IP address).
    fn tls_for(
        &self,
        host: &str,
    ) -> Option<(Arc<UpstreamTls>, rustls_pki_types::ServerName<'static>)> {
        let tls = self.tls.as_ref()?;
        let name = match &tls.server_name {
            Some(name) => name.clone(),
            None => rustls_pki_types::ServerName::try_from(host.to_string()).ok()?,
        };
        Some((Arc::clone(tls), name))
    }

    /// Whether `backend` is in the set now (a retired one is not).
    pub fn contains(&self, backend: &Arc<Backend>) -> bool {
        self.set
            .load()
            .backends
            .iter()
            .any(|member| Arc::ptr_eq(member, backend))
    }

    /// A set over `placements`, reusing the backends of `known` at the same addresses. New
    /// backends start slow when `ramp` is set (they joined a running upstream).
    fn build_set(
        &self,
        known: &[Arc<Backend>],
        placements: &[Placement],
        ramp: bool,
    ) -> Result<BackendSet, http::Error> {
        let mut backends: Vec<Arc<Backend>> = Vec::with_capacity(placements.len());
        for &(entry, address) in placements {
            let Some(spec) = self.config.servers.get(entry) else {
                continue;
            };
            if backends.iter().any(|backend| backend.address == address) {
                // Two entries that lead to one address make one backend.
                continue;
            }
            let backend = match known.iter().find(|backend| backend.address == address) {
                Some(backend) => {
                    backend.load.set_role(spec.weight, spec.backup);
                    backend.pool.update_settings(self.settings.clone());
                    Arc::clone(backend)
                }
                None => {
                    let label: Arc<str> = address.to_string().into();
                    let load = BackendLoad::new(spec.weight, spec.backup);
                    if ramp {
                        load.start_ramp(tokio::time::Instant::now().into_std());
                    }
                    Arc::new(Backend {
                        authority: Authority::try_from(spec.address.to_string())?,
                        sticky_id: self
                            .sticky
                            .as_ref()
                            .map_or(0, |sticky| sticky.backend_id(&label)),
                        metrics: self.metrics.backend(&self.name, &label),
                        pool: ConnectionPool::new(
                            address,
                            Arc::clone(&label),
                            self.settings.clone(),
                            self.tls_for(&spec.address.host),
                            self.config.protocol.is_http2(),
                        ),
                        load,
                        health: BackendHealth::new(),
                        address,
                        label,
                    })
                }
            };
            backends.push(backend);
        }
        let names: Vec<&str> = backends.iter().map(|backend| &*backend.label).collect();
        let balancer = Balancer::new(
            self.config.balance,
            &backends,
            &names,
            self.config.slow_start,
        );
        Ok(BackendSet { backends, balancer })
    }

    /// Whether any backend of `set` outside `tried` may take a request now.
    pub fn any_available(&self, set: &BackendSet, tried: u64) -> bool {
        let now = tokio::time::Instant::now();
        set.backends
            .iter()
            .enumerate()
            .any(|(index, backend)| not_tried(tried, index) && backend.health.is_available(now))
    }

    /// Whether a retry may be spent now; spends it when so.
    pub fn take_retry(&self, failed: &Backend) -> bool {
        let granted = self.retry_budget.withdraw();
        if granted {
            failed.metrics.retries.inc();
        }
        granted
    }

    /// Chooses the backend for a request among `set` and counts it in flight there. `key_hash` is
    /// the hash of the configured key, for `consistent_hash`; `tried` holds the backends this
    /// request already failed at (bit i for backend i), which are avoided; `sticky` names the
    /// backend a valid sticky cookie points to, which is taken when it may take the request.
    ///
    /// When `max_connections_per_server` keeps every available backend busy, the request waits up
    /// to `queue_timeout` for one to free a slot.
    pub async fn pick(
        &self,
        set: &BackendSet,
        key_hash: Option<u64>,
        tried: u64,
        sticky: Option<u64>,
    ) -> Result<Picked, ProxyError> {
        if tried == 0 {
            self.retry_budget.deposit();
        }
        let Some(queue) = &self.queue else {
            return self
                .pick_now(set, key_hash, tried, sticky, u32::MAX)
                .ok_or_else(|| self.none_available());
        };
        // The waiter list is only touched when the request has to wait.
        if let Some(picked) = self.pick_now(set, key_hash, tried, sticky, queue.max) {
            return Ok(picked);
        }
        let deadline = tokio::time::Instant::now() + queue.timeout;
        loop {
            // Registered before looking again, so that a slot freed in between is not missed.
            let freed = queue.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(picked) = self.pick_now(set, key_hash, tried, sticky, queue.max) {
                return Ok(picked);
            }
            if !self.any_available(set, tried) {
                return Err(self.none_available());
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(ProxyError::QueueTimeout {
                    upstream: self.name.to_string(),
                    timeout: queue.timeout,
                });
            }
        }
    }

    fn none_available(&self) -> ProxyError {
        ProxyError::NoBackendAvailable {
            upstream: self.name.to_string(),
        }
    }

    /// Picks a backend that may take the request now and reserves one of its slots. Backups are
    /// candidates only when no primary is available; a primary that is merely full makes the
    /// request wait rather than go to a backup.
    fn pick_now(
        &self,
        set: &BackendSet,
        key_hash: Option<u64>,
        tried: u64,
        sticky: Option<u64>,
        max_in_flight: u32,
    ) -> Option<Picked> {
        let now = crate::clock::now();
        let usable =
            |index: usize| not_tried(tried, index) && set.backends[index].health.is_available(now);
        let use_backups = !(0..set.backends.len())
            .any(|index| !set.backends[index].load.backup() && usable(index));
        // Backends whose slot was taken by a concurrent request between the choice and the
        // reservation; they are passed over on the next round.
        let mut full = 0u64;
        for _ in 0..set.backends.len().min(64) {
            let may_take = |index: usize| {
                let backend = &set.backends[index];
                backend.load.backup() == use_backups
                    && usable(index)
                    && not_tried(full, index)
                    && backend.load.in_flight.load(Ordering::Relaxed) < max_in_flight
            };
            let stuck = sticky.filter(|_| tried == 0).and_then(|id| {
                set.backends
                    .iter()
                    .position(|backend| backend.sticky_id == id)
                    .filter(|&index| may_take(index))
            });
            let index = match stuck {
                Some(index) => index,
                None => {
                    let input = PickInput {
                        key_hash,
                        random: if set.balancer.uses_random(key_hash) {
                            rand::random()
                        } else {
                            0
                        },
                        now: now.into_std(),
                        slow_start: self.config.slow_start,
                    };
                    set.balancer.pick(&set.backends, may_take, &input)?
                }
            };
            let backend = &set.backends[index];
            let reserved = if max_in_flight == u32::MAX {
                backend.load.in_flight.fetch_add(1, Ordering::Relaxed);
                true
            } else {
                backend
                    .load
                    .in_flight
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |count| {
                        (count < max_in_flight).then_some(count + 1)
                    })
                    .is_ok()
            };
            if !reserved {
                full |= bit(index);
                continue;
            }
            backend.metrics.in_flight.inc();
            return Some(Picked {
                index,
                guard: InFlight {
                    backend: Arc::clone(backend),
                    queue: self.queue.clone(),
                },
                at: now,
            });
        }
        None
    }

    /// Whether its backends are plain HTTP/1 servers, which take requests without a body on lean
    /// connections (see `ConnectionPool::takes_lean`).
    pub fn plain_http1(&self) -> bool {
        self.tls.is_none() && !self.config.protocol.is_http2()
    }

    /// Sends the request in `request` to `backend` and waits for its response headers. The
    /// response clock starts once the request body has been sent, so that a slow upload is not
    /// mistaken for a slow backend. The request stays in `request` when it was only read (a lean
    /// exchange), or when none of it was sent; hyper's client takes it otherwise. It is lent rather
    /// than moved in and out, because every level of the request's future would carry its size.
    /// `wire` says what is left to the code that writes the request and reads the answer.
    /// `started` is a reading of the clock taken just before (when the backend was picked).
    /// (An `async move` block rather than an `async fn`, which would keep its arguments twice in
    /// its future: see `pipeline::handle`.)
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice"
    )]
    pub fn send<'a>(
        &'a self,
        set: &'a BackendSet,
        backend: &'a Backend,
        request: &'a mut Option<Request<RequestBody>>,
        body_progress: Option<Arc<BodyProgress>>,
        wire: Wire<'a>,
        started: tokio::time::Instant,
    ) -> impl Future<Output = Result<Sent, SendFailure>> + 'a {
        async move {
            backend.metrics.requests.inc();
            let response_timeout = self.response_timeout;
            let result = match request.take_if(|request| !backend.pool.takes_lean(request)) {
                None => {
                    // The caller always lends a request; an empty slot finds no backend to take it.
                    let Some(lean) = request.as_ref() else {
                        return Err(SendFailure {
                            error: ProxyError::NoBackendAvailable {
                                upstream: self.name.to_string(),
                            },
                            unsent: true,
                        });
                    };
                    // Without a body the deadline is known now; the lean connection keeps its own
                    // clock. The lean client only reads the request.
                    backend
                        .pool
                        .send_lean(lean, started, started + response_timeout, wire)
                        .await
                        .map_err(|(error, unsent)| match error {
                            SendError::ResponseTimeout => {
                                (response_timed_out(backend, response_timeout), unsent)
                            }
                            error => (classify(error, backend), unsent),
                        })
                }
                Some(mut owned) => {
                    // hyper writes only the map.
                    if let Some(deferred) = wire.deferred {
                        deferred.put_in(owned.headers_mut());
                    }
                    // Boxed: hyper's exchange and its clock are large, and every request's future
                    // would otherwise carry their size, lean ones too.
                    let (result, unsent) = Box::pin(send_with_hyper(
                        backend,
                        owned,
                        body_progress,
                        started,
                        response_timeout,
                    ))
                    .await;
                    *request = unsent;
                    result
                }
            };
            let elapsed = crate::clock::now().saturating_duration_since(started);
            if self.tracks_latency {
                // A failure counts as slow as it took, so that a failing backend is not preferred.
                backend
                    .load
                    .observe_latency(elapsed, (started + elapsed).into_std());
            }
            match result {
                Ok((response, lease)) => {
                    backend
                        .metrics
                        .response_duration
                        .observe(elapsed.as_secs_f64());
                    backend.load.record_response_time(elapsed);
                    backend.metrics.responses_by_class
                        [crate::metrics::status_class_index(response.status().as_u16())]
                    .inc();
                    if response.status().is_server_error() {
                        self.record_failure(set, backend);
                    } else {
                        backend.health.record_success();
                    }
                    Ok(Sent {
                        response,
                        lease,
                        elapsed,
                    })
                }
                Err((error, unsent)) => {
                    if error.side() == Side::Upstream {
                        backend.metrics.failures.inc();
                        self.record_failure(set, backend);
                    }
                    Err(SendFailure { error, unsent })
                }
            }
        }
    }

    /// Passive outlier detection: a failure of real traffic at `backend`.
    fn record_failure(&self, set: &BackendSet, backend: &Backend) {
        let Some(outlier) = &self.config.outlier_detection else {
            return;
        };
        let fleet = set.backends.iter().map(|backend| &backend.health);
        if let Verdict::Ejected { length, until } =
            backend
                .health
                .record_failure(outlier, fleet, tokio::time::Instant::now())
        {
            backend.metrics.ejections.inc();
            // It comes back slowly when the ejection ends.
            backend.load.start_ramp(until.into_std());
            tracing::warn!(upstream = %self.name, backend = %backend.label, ejected_for = ?length, "backend ejected after consecutive failures");
            backend.refresh_health_gauge();
        }
    }

    /// Active checks found `backend` up again: it ramps its share up from now.
    pub fn recovered(&self, backend: &Backend) {
        backend
            .load
            .start_ramp(tokio::time::Instant::now().into_std());
    }
}

fn not_tried(tried: u64, index: usize) -> bool {
    index >= 64 || tried & (1 << index) == 0
}

/// Bit `index` of a set of backends; backends past the 64th are not tracked.
pub fn bit(index: usize) -> u64 {
    1u64.checked_shl(u32::try_from(index).unwrap_or(u32::MAX))
        .unwrap_or(0)
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
        for backend in &upstream.current().backends {
            backend.refresh_health_gauge();
        }
    }
}

/// Counts a request in flight at one backend until dropped, which is when its response has been
/// passed on in full (or abandoned).
pub struct InFlight {
    backend: Arc<Backend>,
    /// Told when a slot frees, when the upstream limits requests per backend.
    queue: Option<Arc<Queue>>,
}

#[cfg(test)]
impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.metrics.in_flight.dec();
        if let Some(queue) = &self.queue {
            // Every waiter looks again: one woken alone might be unable to use this backend
            // (it already failed there), and the wakeup would be lost to the others.
            queue.freed.notify_waiters();
        }
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

/// What a request answered, or why not (and whether none of it was sent), from hyper's client; the
/// request comes back only when none of it was sent.
type HyperOutcome = (
    Result<(Response<UpstreamBody>, Lease), (ProxyError, bool)>,
    Option<Request<RequestBody>>,
);

/// Sends `request` through hyper's client. The response clock starts once the request body has
/// been sent (from `started` when there is none).
async fn send_with_hyper(
    backend: &Backend,
    request: Request<RequestBody>,
    body_progress: Option<Arc<BodyProgress>>,
    started: tokio::time::Instant,
    response_timeout: Duration,
) -> HyperOutcome {
    let response_clock = async move {
        let deadline = match body_progress {
            Some(progress) => {
                progress.wait_finished().await;
                tokio::time::Instant::now() + response_timeout
            }
            // Without a body, from the start: no second reading of the clock.
            None => started + response_timeout,
        };
        tokio::time::sleep_until(deadline).await;
    };
    let result = tokio::select! {
        biased;
        result = backend.pool.send(request) => result.map_err(|(error, unsent)| {
            (classify(error, backend), unsent)
        }),
        () = response_clock => Err((response_timed_out(backend, response_timeout), None)),
    };
    match result {
        Ok(sent) => (Ok(sent), None),
        Err((error, unsent)) => (Err((error, unsent.is_some())), unsent),
    }
}

/// The answer for a backend whose response head did not come within `timeout`.
fn response_timed_out(backend: &Backend, timeout: Duration) -> ProxyError {
    ProxyError::ResponseTimeout {
        backend: backend.label.to_string(),
        timeout,
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
            RequestBodyError::TooSlow { min_rate } => ProxyError::BodyTooSlow {
                min_rate: *min_rate,
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

#[cfg(test)]
mod tests {
    use super::*;
    use bouncer_config::{BackendSpec, ServerAddress};

    fn config(servers: &[(&str, u32)]) -> UpstreamConfig {
        let text = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nbalance = \"peak_ewma\"\nservers = [\"127.0.0.1:1\"]\n";
        let mut config = bouncer_config::parse(std::path::Path::new("t.toml"), text)
            .map(|config| config.upstreams[0].clone())
            .unwrap_or_else(|problems| panic!("{problems}"));
        config.servers = servers
            .iter()
            .map(|(address, weight)| {
                let (host, port) = address.rsplit_once(':').unwrap_or_default();
                BackendSpec {
                    address: ServerAddress {
                        host: host.to_string(),
                        port: port.parse().unwrap_or(1),
                    },
                    weight: *weight,
                    backup: false,
                }
            })
            .collect();
        config
    }

    fn placements(config: &UpstreamConfig) -> Vec<Placement> {
        config
            .servers
            .iter()
            .enumerate()
            .map(|(entry, server)| {
                let address = format!("{}:{}", server.address.host, server.address.port);
                (
                    entry,
                    address
                        .parse()
                        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1))),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn backends_that_remain_keep_their_state_across_a_reload() {
        let metrics = Metrics::new();
        let before = config(&[("127.0.0.1:1001", 1), ("127.0.0.1:1002", 1)]);
        let old = Upstream::new(&before, &metrics, None, &placements(&before), None)
            .unwrap_or_else(|error| panic!("{error}"));
        let set = old.current();
        let Some(picked) = old.pick_now(&set, None, 0b01, None, u32::MAX) else {
            panic!("no backend picked");
        };
        assert_eq!(picked.guard.backend().address.port(), 1002);
        let now = std::time::Instant::now();
        picked
            .guard
            .backend()
            .load
            .observe_latency(Duration::from_millis(250), now);
        assert!(picked.guard.backend().health.set_up(false));

        let after = config(&[("127.0.0.1:1002", 5), ("127.0.0.1:1003", 1)]);
        let new = Upstream::new(&after, &metrics, Some(&old), &placements(&after), None)
            .unwrap_or_else(|error| panic!("{error}"));
        let set = new.current();
        assert_eq!(set.backends.len(), 2);
        let kept = &set.backends[0];
        assert!(
            Arc::ptr_eq(kept, picked.guard.backend()),
            "the backend was not carried over"
        );
        assert_eq!(kept.load.in_flight.load(Ordering::Relaxed), 1);
        assert!((kept.load.latency_estimate(now) - 0.25).abs() < 1e-9);
        assert!(!kept.health.is_available(tokio::time::Instant::now()));
        assert_eq!(kept.load.weight(), 5, "the new weight applies");
        let fresh = &set.backends[1];
        assert_eq!(fresh.load.in_flight.load(Ordering::Relaxed), 0);
        assert!(fresh.health.is_available(tokio::time::Instant::now()));
        drop(picked);
        assert_eq!(kept.load.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_address_dns_drops_and_returns_keeps_its_backend() {
        let metrics = Metrics::new();
        let config = config(&[("127.0.0.1:1001", 1)]);
        let two: Vec<Placement> = vec![
            (0, SocketAddr::from(([127, 0, 0, 2], 1001))),
            (0, SocketAddr::from(([127, 0, 0, 3], 1001))),
        ];
        let upstream = Arc::new(
            Upstream::new(&config, &metrics, None, &two, None)
                .unwrap_or_else(|error| panic!("{error}")),
        );
        let first = Arc::clone(&upstream.current().backends[1]);
        assert!(first.health.set_up(false));
        assert!(upstream.replace_backends(&two[..1]));
        assert!(!upstream.contains(&first));
        // The same answer again, with a duplicate: nothing changes.
        assert!(!upstream.replace_backends(&[two[0], two[0]]));
        assert!(upstream.replace_backends(&two));
        let back = &upstream.current().backends[1];
        assert!(
            Arc::ptr_eq(back, &first),
            "the returning address lost its state"
        );
        assert!(!back.health.is_available(tokio::time::Instant::now()));
    }
}
