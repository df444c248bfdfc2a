//! The live dashboard's data: once a second, a sample of the traffic (requests by status class,
//! latency percentiles) joins a five-minute history, and the whole picture (history, upstreams,
//! cache, refusals, bans, certificates) is published as one JSON document that the admin API
//! streams to open pages as server-sent events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::listener::Lifecycle;

/// Seconds of history kept and shown.
const HISTORY: usize = 300;

/// One second of traffic.
#[derive(Clone, Copy)]
struct Sample {
    at: u64,
    /// Requests answered in that second, by status class (1xx to 5xx).
    by_class: [u64; 5],
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

pub(crate) struct Dashboard {
    history: Mutex<History>,
    /// The latest picture as JSON (empty before the first sample), for every open page.
    updates: watch::Sender<Bytes>,
}

#[derive(Default)]
struct History {
    samples: VecDeque<Sample>,
    /// Totals by status class at the last sample.
    last_totals: Option<[u64; 5]>,
}

impl Default for Dashboard {
    fn default() -> Self {
        Self {
            history: Mutex::new(History::default()),
            updates: watch::Sender::new(Bytes::new()),
        }
    }
}

impl Dashboard {
    /// A receiver of every new picture, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Bytes> {
        self.updates.subscribe()
    }

    /// The current picture (empty until the first sample).
    pub fn current(&self) -> Bytes {
        self.updates.borrow().clone()
    }
}

/// Samples once a second until the proxy stops.
pub(crate) async fn run(state: Arc<AdminState>, mut lifecycle: watch::Receiver<Lifecycle>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = lifecycle.wait_for(|state| *state != Lifecycle::Running) => return,
            _ = ticks.tick() => {}
        }
        sample(&state);
    }
}

/// Takes one sample and publishes the picture with it.
pub(crate) fn sample(state: &AdminState) {
    let totals = requests_by_class(state);
    let latencies = state.metrics.take_request_latencies();
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let history = {
        let mut history = state
            .dashboard
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A reload that drops a route drops its counts from the totals: never a negative rate.
        let by_class = match history.last_totals {
            Some(last) => std::array::from_fn(|class| totals[class].saturating_sub(last[class])),
            None => [0; 5],
        };
        history.last_totals = Some(totals);
        history.samples.push_back(Sample {
            at,
            by_class,
            p50: latencies.percentile(0.5),
            p90: latencies.percentile(0.9),
            p99: latencies.percentile(0.99),
        });
        while history.samples.len() > HISTORY {
            history.samples.pop_front();
        }
        history.samples.iter().copied().collect::<Vec<_>>()
    };
    let picture = picture(state, &history, totals);
    let body = serde_json::to_vec(&picture).unwrap_or_default();
    state.dashboard.updates.send_replace(Bytes::from(body));
}

/// Requests answered so far by every route of every listener, by status class.
fn requests_by_class(state: &AdminState) -> [u64; 5] {
    let snapshot = state.live.load();
    let mut totals = [0u64; 5];
    for runtime in &snapshot.runtimes {
        let counts = runtime
            .routes
            .routes()
            .iter()
            .map(|route| route.metrics.requests_by_class())
            .chain(std::iter::once(
                runtime.metrics.no_route.requests_by_class(),
            ));
        for count in counts {
            for (total, value) in totals.iter_mut().zip(count) {
                *total += value;
            }
        }
    }
    totals
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

fn picture(state: &AdminState, history: &[Sample], totals: [u64; 5]) -> Value {
    let snapshot = state.live.load();
    // Over the last ten seconds, so that one quiet second does not blank the figures.
    let recent: Vec<&Sample> = history.iter().rev().take(10).collect();
    let recent_requests: u64 = recent
        .iter()
        .map(|sample| sample.by_class.iter().sum::<u64>())
        .sum();
    let weighted = |pick: fn(&Sample) -> Duration| -> f64 {
        let (sum, weight) = recent.iter().fold((0.0, 0u64), |(sum, weight), sample| {
            let count: u64 = sample.by_class.iter().sum();
            (sum + millis(pick(sample)) * count as f64, weight + count)
        });
        if weight == 0 {
            0.0
        } else {
            (sum / weight as f64 * 1000.0).round() / 1000.0
        }
    };
    let mut refusals: HashMap<(&'static str, &'static str), u64> = HashMap::new();
    let mut connections_open = 0;
    let mut certificates = Vec::new();
    for runtime in &snapshot.runtimes {
        connections_open += runtime.metrics.connections_open.get();
        for (reason, count) in runtime.metrics.refusal_counts() {
            if count > 0 {
                *refusals
                    .entry((reason.layer(), reason.label()))
                    .or_default() += count;
            }
        }
        if let Some(tls) = &runtime.tls {
            for certificate in tls.resolver.certificates() {
                let left = certificate
                    .not_after
                    .duration_since(SystemTime::now())
                    .map_or(0.0, |left| left.as_secs_f64() / 86_400.0);
                certificates.push(json!({
                    "listener": runtime.name.as_ref(),
                    "names": certificate.names,
                    "expires_at": certificate
                        .not_after
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |since| since.as_secs()),
                    "days_left": (left * 10.0).floor() / 10.0,
                    "file": certificate.cert_path.display().to_string(),
                }));
            }
        }
    }
    let mut refusals: Vec<Value> = refusals
        .into_iter()
        .map(|((layer, reason), count)| json!({ "layer": layer, "reason": reason, "count": count }))
        .collect();
    refusals.sort_by(|a, b| b["count"].as_u64().cmp(&a["count"].as_u64()));
    let mut bans = snapshot.protection.bans();
    bans.sort_unstable_by_key(|(ip, _)| *ip);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "requests_total": totals.iter().sum::<u64>(),
        "requests_by_class": totals,
        "requests_per_second": recent_requests as f64 / recent.len().max(1) as f64,
        "connections_open": connections_open,
        "latency_ms": {
            "p50": weighted(|sample| sample.p50),
            "p90": weighted(|sample| sample.p90),
            "p99": weighted(|sample| sample.p99),
        },
        "history": history.iter().map(|sample| json!({
            "at": sample.at,
            "by_class": sample.by_class,
            "p50_ms": millis(sample.p50),
            "p99_ms": millis(sample.p99),
        })).collect::<Vec<_>>(),
        "upstreams": crate::admin::upstreams_json(&snapshot)["upstreams"].clone(),
        "cache": cache(&snapshot),
        "refusals": refusals,
        "bans": bans.iter().map(|(ip, left)| json!({
            "ip": ip.to_string(),
            "expires_in_seconds": left.as_secs(),
        })).collect::<Vec<_>>(),
        "certificates": certificates,
    })
}

/// Cache lookups on every caching route so far, and the share answered from the cache.
fn cache(snapshot: &crate::Snapshot) -> Value {
    if snapshot.cache.is_none() {
        return Value::Null;
    }
    let mut seen: Vec<&str> = Vec::new();
    let (mut served, mut fetched) = (0u64, 0u64);
    for runtime in &snapshot.runtimes {
        for route in runtime.routes.routes() {
            let Some(route_cache) = &route.cache else {
                continue;
            };
            // A route on several listeners shares its counters.
            if seen.contains(&route.name.as_ref()) {
                continue;
            }
            seen.push(&route.name);
            let metrics = &route_cache.metrics;
            served += metrics.hit.get() + metrics.stale.get() + metrics.revalidated.get();
            fetched += metrics.miss.get() + metrics.pass.get();
        }
    }
    let lookups = served + fetched;
    json!({
        "served_from_cache": served,
        "fetched": fetched,
        "hit_ratio": if lookups == 0 { Value::Null } else { json!(served as f64 / lookups as f64) },
    })
}
