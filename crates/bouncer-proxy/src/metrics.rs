//! Prometheus metrics. Handles for the hot path are looked up once, when a route or listener is
//! built, so that counting a request touches atomics only.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Refusal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    route: String,
    upstream: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendStatusLabels {
    upstream: String,
    backend: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    listener: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    listener: String,
    layer: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthCheckLabels {
    upstream: String,
    backend: String,
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 105 s in factors of two: fine enough for a proxy, coarse enough to stay small.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// Every metric Bouncer exports, registered once per process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteLabels>,
    /// Every request's total time, for the dashboard's percentiles.
    request_latency: Arc<crate::latency::LatencyHistogram>,
    upstream_duration: HistogramFamily<UpstreamLabels>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_failures: Family<UpstreamLabels, Counter>,
    upstream_in_flight: Family<UpstreamLabels, Gauge>,
    upstream_responses: Family<BackendStatusLabels, Counter>,
    requests_in_flight: Family<ListenerLabels, Gauge>,
    upstream_healthy: Family<UpstreamLabels, Gauge>,
    upstream_ejections: Family<UpstreamLabels, Counter>,
    upstream_retries: Family<UpstreamLabels, Counter>,
    health_checks: Family<HealthCheckLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    connections_accepted: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    certificate_reloads: Family<ReloadLabels, Counter>,
    acme_certificates: Family<ReloadLabels, Counter>,
    tls_handshakes: Family<HandshakeLabels, Counter>,
    access_log_dropped: Counter,
    config_reloads: Family<ResultLabels, Counter>,
    bans: Counter,
    rule_matches: Family<RuleLabels, Counter>,
    adaptive_changes: Family<ChangeLabels, Counter>,
    adaptive_active: Gauge,
    cluster: ClusterMetrics,
    cache_requests: Family<CacheResultLabels, Counter>,
    cache_coalesced: Family<CacheRouteLabels, Counter>,
    cache_evictions: Family<CacheRouteLabels, Counter>,
    cache_stored_bytes: Family<CacheRouteLabels, Gauge>,
    cache: CacheMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheResultLabels {
    route: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheRouteLabels {
    route: String,
}

/// What the cache counts for the whole process.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub disk: crate::cache::DiskMetrics,
}

/// What a route's stored objects count.
#[derive(Clone, Default)]
pub struct StoreMetrics {
    /// Objects pushed out of memory to make room.
    pub evictions: Counter,
    /// Bytes stored in memory now, fields included.
    pub stored_bytes: Gauge,
}

/// What the cache counts for one route.
#[derive(Clone)]
pub struct RouteCacheMetrics {
    pub hit: Counter,
    pub miss: Counter,
    pub stale: Counter,
    pub revalidated: Counter,
    pub pass: Counter,
    pub coalesced: Counter,
    pub store: StoreMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
    action: &'static str,
}

/// What the protection layers count besides refusals.
#[derive(Clone)]
pub struct ProtectionMetrics {
    pub bans: Counter,
    rule_matches: Family<RuleLabels, Counter>,
    pub adaptive_tightened: Counter,
    pub adaptive_relaxed: Counter,
    pub adaptive_active: Gauge,
    pub cluster: ClusterMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// What the sharing of rate limits and bans through Redis counts.
#[derive(Clone, Default)]
pub struct ClusterMetrics {
    /// 1 while Redis answers, 0 while the instance decides alone.
    pub redis_up: Gauge,
    pub redis_errors: Counter,
    /// Round trips to Redis for a batch of rate-limit allowance.
    pub lease_requests: Counter,
    /// Rate-limit decisions made with the local limits because Redis was unreachable.
    pub local_decisions: Counter,
    pub bans_sent: Counter,
    pub bans_received: Counter,
}

impl ProtectionMetrics {
    /// The counter of requests that matched `rule`, whose action is `action`.
    pub fn rule(&self, rule: &str, action: &'static str) -> Counter {
        self.rule_matches.get_or_create_owned(&RuleLabels {
            rule: rule.to_string(),
            action,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    listener: String,
    result: &'static str,
}

/// Counts a listener's certificate reloads, by outcome.
#[derive(Clone)]
pub struct ReloadMetrics {
    pub succeeded: Counter,
    pub failed: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("bouncer");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by listener, route and status class",
            requests.clone(),
        );
        let request_duration = HistogramFamily::<RouteLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "request_duration",
            "Time from request headers to the end of the response body",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_duration = HistogramFamily::<UpstreamLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "upstream_response_duration",
            "Time from sending a request to a backend to receiving its response headers",
            prometheus_client::registry::Unit::Seconds,
            upstream_duration.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests sent to each backend",
            upstream_requests.clone(),
        );
        let upstream_failures = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Requests to each backend that failed (connect, reset, timeout)",
            upstream_failures.clone(),
        );
        let upstream_in_flight = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_in_flight_requests",
            "Requests sent to each backend and not yet answered in full",
            upstream_in_flight.clone(),
        );
        let upstream_responses = Family::<BackendStatusLabels, Counter>::default();
        registry.register(
            "upstream_responses",
            "Responses from each backend, by status class",
            upstream_responses.clone(),
        );
        let requests_in_flight = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "requests_in_flight",
            "Requests being handled now, from their headers to the end of their answer",
            requests_in_flight.clone(),
        );
        let upstream_healthy = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "upstream_healthy",
            "Whether each backend may take requests (1) or is down or ejected (0)",
            upstream_healthy.clone(),
        );
        let upstream_ejections = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Times each backend was ejected by outlier detection",
            upstream_ejections.clone(),
        );
        let upstream_retries = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Requests sent again to another backend after this one failed",
            upstream_retries.clone(),
        );
        let health_checks = Family::<HealthCheckLabels, Counter>::default();
        registry.register(
            "health_checks",
            "Active health checks of each backend, by result (success, failure)",
            health_checks.clone(),
        );
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Client connections open now",
            connections_open.clone(),
        );
        let connections_accepted = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            connections_accepted.clone(),
        );
        let accept_errors = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "accept_errors",
            "Errors from accept(), such as running out of file descriptors",
            accept_errors.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Requests and connections refused or failed, by layer (connection, tls, request, upstream) and reason",
            refusals.clone(),
        );
        let certificate_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "tls_certificate_reloads",
            "Reloads of a listener's certificates after their files changed, by result (success, failure)",
            certificate_reloads.clone(),
        );
        let acme_certificates = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "acme_certificates",
            "Attempts to obtain or renew a listener's certificate with ACME, by result (success, failure)",
            acme_certificates.clone(),
        );
        let tls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes, by result: ok, or why they failed (not_tls, incompatible, alpn, client_certificate, no_certificate, alert_received, misbehaved, connection, timeout, other)",
            tls_handshakes.clone(),
        );
        let bans = Counter::default();
        registry.register(
            "bans",
            "Addresses banned, by auto_ban or a ban rule",
            bans.clone(),
        );
        let rule_matches = Family::<RuleLabels, Counter>::default();
        registry.register(
            "rule_matches",
            "Requests that matched a [[rules]] entry, by rule and action",
            rule_matches.clone(),
        );
        let adaptive_changes = Family::<ChangeLabels, Counter>::default();
        registry.register(
            "adaptive_changes",
            "Adaptive mode switching on (tightened) and off (relaxed)",
            adaptive_changes.clone(),
        );
        let adaptive_active = Gauge::default();
        registry.register(
            "adaptive_active",
            "Whether adaptive mode has the rate limits tightened now (1) or not (0)",
            adaptive_active.clone(),
        );
        let cluster = ClusterMetrics::default();
        registry.register(
            "cluster_redis_up",
            "Whether the cluster's Redis answers (1) or each instance enforces its limits alone (0)",
            cluster.redis_up.clone(),
        );
        registry.register(
            "cluster_redis_errors",
            "Redis commands that failed or timed out",
            cluster.redis_errors.clone(),
        );
        registry.register(
            "cluster_lease_requests",
            "Round trips to Redis for a batch of shared rate-limit allowance",
            cluster.lease_requests.clone(),
        );
        registry.register(
            "cluster_local_decisions",
            "Rate-limit decisions made with the local limits because Redis was unreachable",
            cluster.local_decisions.clone(),
        );
        let cluster_bans = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "cluster_bans",
            "Bans shared with the other instances (sent) and learnt from them (received)",
            cluster_bans.clone(),
        );
        let cluster = ClusterMetrics {
            bans_sent: cluster_bans.get_or_create_owned(&DirectionLabels { direction: "sent" }),
            bans_received: cluster_bans.get_or_create_owned(&DirectionLabels {
                direction: "received",
            }),
            ..cluster
        };
        let cache_requests = Family::<CacheResultLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Requests on caching routes, by result: hit (answered from the cache), miss (fetched from a backend), stale (a stale copy served: stale-while-revalidate or stale-if-error), revalidated (a stale copy confirmed by a 304), pass (a key whose last response could not be stored)",
            cache_requests.clone(),
        );
        let cache_coalesced = Family::<CacheRouteLabels, Counter>::default();
        registry.register(
            "cache_coalesced",
            "Requests that waited for another request's backend response to the same key",
            cache_coalesced.clone(),
        );
        let cache = CacheMetrics::default();
        let cache_evictions = Family::<CacheRouteLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Cached objects pushed out of memory to make room, by the route that stored them",
            cache_evictions.clone(),
        );
        let cache_stored_bytes = Family::<CacheRouteLabels, Gauge>::default();
        registry.register(
            "cache_stored_bytes",
            "Bytes held in the cache's memory now, fields included, by the route that stored them",
            cache_stored_bytes.clone(),
        );
        registry.register(
            "cache_disk_bytes",
            "Bytes of the cache's files on disk now",
            cache.disk.bytes.clone(),
        );
        registry.register(
            "cache_disk_corrupt",
            "Cache files dropped because their checksums did not match or they could not be read",
            cache.disk.corrupt.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by result (ok, failed: the running config stayed)",
            config_reloads.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            request_duration,
            request_latency: Arc::default(),
            upstream_duration,
            upstream_requests,
            upstream_failures,
            upstream_in_flight,
            upstream_responses,
            requests_in_flight,
            upstream_healthy,
            upstream_ejections,
            upstream_retries,
            health_checks,
            connections_open,
            connections_accepted,
            accept_errors,
            refusals,
            certificate_reloads,
            acme_certificates,
            tls_handshakes,
            access_log_dropped,
            config_reloads,
            bans,
            rule_matches,
            adaptive_changes,
            adaptive_active,
            cluster,
            cache_requests,
            cache_coalesced,
            cache_evictions,
            cache_stored_bytes,
            cache,
        })
    }

    pub fn cache(&self) -> CacheMetrics {
        self.cache.clone()
    }

    pub fn route_cache(&self, route: &str) -> RouteCacheMetrics {
        let result = |result| {
            self.cache_requests.get_or_create_owned(&CacheResultLabels {
                route: route.to_string(),
                result,
            })
        };
        RouteCacheMetrics {
            hit: result("hit"),
            miss: result("miss"),
            stale: result("stale"),
            revalidated: result("revalidated"),
            pass: result("pass"),
            coalesced: self.cache_coalesced.get_or_create_owned(&CacheRouteLabels {
                route: route.to_string(),
            }),
            store: StoreMetrics {
                evictions: self.cache_evictions.get_or_create_owned(&CacheRouteLabels {
                    route: route.to_string(),
                }),
                stored_bytes: self
                    .cache_stored_bytes
                    .get_or_create_owned(&CacheRouteLabels {
                        route: route.to_string(),
                    }),
            },
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// A route's counters; `upstream` is the one it sends to (`none` for requests that matched no
    /// route).
    pub fn route(&self, listener: &str, route: &str, upstream: &str) -> RouteMetrics {
        let requests_by_class = STATUS_CLASSES.map(|status_class| {
            self.requests.get_or_create_owned(&RequestLabels {
                listener: listener.to_string(),
                route: route.to_string(),
                upstream: upstream.to_string(),
                status_class,
            })
        });
        RouteMetrics {
            requests_by_class,
            duration: self.request_duration.get_or_create_owned(&RouteLabels {
                listener: listener.to_string(),
                route: route.to_string(),
            }),
            latency: Arc::clone(&self.request_latency),
        }
    }

    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let labels = ListenerLabels {
            listener: listener.to_string(),
        };
        ListenerMetrics {
            connections_open: self.connections_open.get_or_create_owned(&labels),
            connections_accepted: self.connections_accepted.get_or_create_owned(&labels),
            accept_errors: self.accept_errors.get_or_create_owned(&labels),
            refusals: Refusal::ALL.map(|reason| {
                self.refusals.get_or_create_owned(&RefusalLabels {
                    listener: listener.to_string(),
                    layer: reason.layer(),
                    reason: reason.label(),
                })
            }),
            no_route: self.route(listener, "none", "none"),
            requests_in_flight: self.requests_in_flight.get_or_create_owned(&labels),
            handshakes: None,
        }
    }

    pub fn backend(&self, upstream: &str, backend: &str) -> BackendMetrics {
        let labels = UpstreamLabels {
            upstream: upstream.to_string(),
            backend: backend.to_string(),
        };
        BackendMetrics {
            requests: self.upstream_requests.get_or_create_owned(&labels),
            failures: self.upstream_failures.get_or_create_owned(&labels),
            response_duration: self.upstream_duration.get_or_create_owned(&labels),
            in_flight: self.upstream_in_flight.get_or_create_owned(&labels),
            responses_by_class: STATUS_CLASSES.map(|status_class| {
                self.upstream_responses
                    .get_or_create_owned(&BackendStatusLabels {
                        upstream: upstream.to_string(),
                        backend: backend.to_string(),
                        status_class,
                    })
            }),
            healthy: self.upstream_healthy.get_or_create_owned(&labels),
            ejections: self.upstream_ejections.get_or_create_owned(&labels),
            retries: self.upstream_retries.get_or_create_owned(&labels),
            checks_passed: self.health_checks.get_or_create_owned(&HealthCheckLabels {
                upstream: upstream.to_string(),
                backend: backend.to_string(),
                result: "success",
            }),
            checks_failed: self.health_checks.get_or_create_owned(&HealthCheckLabels {
                upstream: upstream.to_string(),
                backend: backend.to_string(),
                result: "failure",
            }),
        }
    }

    pub fn certificate_reloads(&self, listener: &str) -> ReloadMetrics {
        let counter = |result| {
            self.certificate_reloads.get_or_create_owned(&ReloadLabels {
                listener: listener.to_string(),
                result,
            })
        };
        ReloadMetrics {
            succeeded: counter("success"),
            failed: counter("failure"),
        }
    }

    /// Counts a listener's ACME orders, by outcome.
    pub fn acme_certificates(&self, listener: &str) -> ReloadMetrics {
        let counter = |result| {
            self.acme_certificates.get_or_create_owned(&ReloadLabels {
                listener: listener.to_string(),
                result,
            })
        };
        ReloadMetrics {
            succeeded: counter("success"),
            failed: counter("failure"),
        }
    }

    /// The handshake counters of a TLS listener, one per result.
    pub fn tls_handshakes(&self, listener: &str) -> HandshakeMetrics {
        HandshakeMetrics {
            counters: HANDSHAKE_RESULTS.map(|result| {
                self.tls_handshakes.get_or_create_owned(&HandshakeLabels {
                    listener: listener.to_string(),
                    result,
                })
            }),
        }
    }

    pub fn protection(&self) -> ProtectionMetrics {
        let change = |change| {
            self.adaptive_changes
                .get_or_create_owned(&ChangeLabels { change })
        };
        ProtectionMetrics {
            bans: self.bans.clone(),
            rule_matches: self.rule_matches.clone(),
            adaptive_tightened: change("tightened"),
            adaptive_relaxed: change("relaxed"),
            adaptive_active: self.adaptive_active.clone(),
            cluster: self.cluster.clone(),
        }
    }

    pub fn access_log_dropped(&self) -> &Counter {
        &self.access_log_dropped
    }

    /// Every request's total time since the last take (the dashboard takes them each second).
    pub fn take_request_latencies(&self) -> crate::latency::LatencySample {
        self.request_latency.take()
    }

    /// Counts one config reload under `result` (`ok` or `failed`).
    pub fn config_reloaded(&self, result: &'static str) {
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index of a status code's class in [`STATUS_CLASSES`].
pub fn status_class_index(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

#[derive(Clone)]
pub struct RouteMetrics {
    requests_by_class: [Counter; 5],
    duration: Histogram,
    latency: Arc<crate::latency::LatencyHistogram>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("requests_by_class", &self.requests_by_class())
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    pub fn record(&self, status: u16, took: std::time::Duration) {
        self.requests_by_class[status_class_index(status)].inc();
        self.duration.observe(took.as_secs_f64());
        self.latency.record(took);
    }

    /// Requests answered so far, by status class (1xx to 5xx).
    pub fn requests_by_class(&self) -> [u64; 5] {
        self.requests_by_class.each_ref().map(Counter::get)
    }
}

#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    pub accept_errors: Counter,
    refusals: [Counter; Refusal::ALL.len()],
    /// Requests that matched no route are counted under the route label `none`.
    pub no_route: RouteMetrics,
    pub requests_in_flight: Gauge,
    /// On a TLS listener, its handshakes by result.
    pub handshakes: Option<HandshakeMetrics>,
}

/// Every result a TLS handshake is counted under.
const HANDSHAKE_RESULTS: [&str; 11] = [
    "ok",
    "not_tls",
    "incompatible",
    "alpn",
    "client_certificate",
    "no_certificate",
    "alert_received",
    "misbehaved",
    "connection",
    "timeout",
    "other",
];

#[derive(Clone, Debug)]
pub struct HandshakeMetrics {
    counters: [Counter; HANDSHAKE_RESULTS.len()],
}

impl HandshakeMetrics {
    /// Counts a handshake under `result`, one of the results above (`other` if not).
    pub fn record(&self, result: &str) {
        let index = HANDSHAKE_RESULTS
            .iter()
            .position(|known| *known == result)
            .unwrap_or(HANDSHAKE_RESULTS.len() - 1);
        self.counters[index].inc();
    }
}

impl ListenerMetrics {
    pub fn refused(&self, reason: Refusal) {
        self.refusals[reason.index()].inc();
    }

    /// Refusals so far, by reason.
    pub fn refusal_counts(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .iter()
            .map(|reason| (*reason, self.refusals[reason.index()].get()))
    }
}

#[derive(Clone, Debug)]
pub struct BackendMetrics {
    pub requests: Counter,
    pub failures: Counter,
    /// Responses by status class (1xx to 5xx).
    pub responses_by_class: [Counter; 5],
    pub response_duration: Histogram,
    pub in_flight: Gauge,
    pub healthy: Gauge,
    pub ejections: Counter,
    /// Retries of requests that failed at this backend.
    pub retries: Counter,
    pub checks_passed: Counter,
    pub checks_failed: Counter,
}
