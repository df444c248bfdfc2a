//! Which backends may take requests. Active checks probe each backend on a timer; passive
//! detection ejects a backend whose real traffic keeps failing, for a time that grows when it is
//! ejected again soon after coming back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, StatusCode, header};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use bouncer_config::{HealthCheckConfig, OutlierDetectionConfig};

use crate::upstream::Upstream;

/// Ejections of one backend grow up to this many times the configured ejection time.
const MAX_EJECTION_FACTOR: u32 = 10;

/// One backend's health, read on every pick and written by checks and by request outcomes.
pub struct BackendHealth {
    /// The verdict of active checks; true when none are configured.
    up: AtomicBool,
    /// Until when, in milliseconds since the upstream's epoch, the backend is ejected; 0 if it is not.
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// How many ejections in a row, each soon after the previous one ended.
    ejection_streak: AtomicU32,
}

impl BackendHealth {
    fn new() -> Self {
        Self {
            up: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejection_streak: AtomicU32::new(0),
        }
    }
}

/// The health of every backend of one upstream.
pub struct UpstreamHealth {
    backends: Vec<BackendHealth>,
    epoch: Instant,
    outlier: Option<OutlierDetectionConfig>,
}

/// What passive detection concluded from one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// The backend was just ejected for this long.
    Ejected(Duration),
}

impl UpstreamHealth {
    pub fn new(backends: usize, outlier: Option<OutlierDetectionConfig>) -> Self {
        Self {
            backends: (0..backends).map(|_| BackendHealth::new()).collect(),
            epoch: Instant::now(),
            outlier,
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether backend `index` may take a request at `now`.
    pub fn is_available(&self, index: usize, now: Instant) -> bool {
        let Some(backend) = self.backends.get(index) else {
            return false;
        };
        backend.up.load(Ordering::Relaxed)
            && backend.ejected_until_ms.load(Ordering::Relaxed) <= self.millis(now)
    }

    /// Sets the active checks' verdict; returns whether it changed. A backend that the checks
    /// find up again is also no longer ejected, as Envoy does: the checks have just seen it work.
    pub fn set_up(&self, index: usize, up: bool) -> bool {
        let Some(backend) = self.backends.get(index) else {
            return false;
        };
        let changed = backend.up.swap(up, Ordering::Relaxed) != up;
        if changed && up {
            backend.ejected_until_ms.store(0, Ordering::Relaxed);
            backend.consecutive_failures.store(0, Ordering::Relaxed);
        }
        changed
    }

    pub fn record_success(&self, index: usize) {
        if let Some(backend) = self.backends.get(index) {
            backend.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure of real traffic (connect error, reset, timeout or 5xx) and ejects the
    /// backend when it reached `consecutive_failures`, unless that would eject more than
    /// `max_ejected_percent` of the backends.
    pub fn record_failure(&self, index: usize, now: Instant) -> Verdict {
        let (Some(outlier), Some(backend)) = (&self.outlier, self.backends.get(index)) else {
            return Verdict::Fine;
        };
        let failures = backend.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures {
            return Verdict::Fine;
        }
        let now_ms = self.millis(now);
        let ejected_now = self
            .backends
            .iter()
            .filter(|other| other.ejected_until_ms.load(Ordering::Relaxed) > now_ms)
            .count();
        let allowed = self.backends.len() * outlier.max_ejected_percent as usize / 100;
        if ejected_now >= allowed {
            return Verdict::Fine;
        }
        let base = outlier.ejection_time;
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        // Ejected again within five ejection times of coming back: the next ejection is longer.
        let previous_end = backend.ejected_until_ms.load(Ordering::Relaxed);
        let streak = if previous_end > 0 && now_ms.saturating_sub(previous_end) < base_ms * 5 {
            (backend.ejection_streak.load(Ordering::Relaxed) + 1).min(MAX_EJECTION_FACTOR)
        } else {
            1
        };
        backend.ejection_streak.store(streak, Ordering::Relaxed);
        let length = base * streak;
        let until = now_ms.saturating_add(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
        backend
            .ejected_until_ms
            .store(until.max(1), Ordering::Relaxed);
        backend.consecutive_failures.store(0, Ordering::Relaxed);
        Verdict::Ejected(length)
    }
}

/// Runs the active checks of every backend of `upstream`, each on its own timer with jitter, until
/// the upstream is dropped.
pub fn spawn_checks(upstream: &Arc<Upstream>, config: &HealthCheckConfig) {
    for index in 0..upstream.backends.len() {
        tokio::spawn(check_loop(Arc::downgrade(upstream), index, config.clone()));
    }
}

async fn check_loop(upstream: Weak<Upstream>, index: usize, config: HealthCheckConfig) {
    // Spread the first checks over one interval so that backends are not probed in lockstep.
    let first = config.interval.mul_f64(rand::random::<f64>());
    tokio::time::sleep(first).await;
    let mut successes = 0u32;
    let mut failures = 0u32;
    loop {
        let Some(target) = upstream.upgrade() else {
            return;
        };
        let backend = &target.backends[index];
        let outcome = probe(backend.label.as_ref(), &backend.authority, &config).await;
        match outcome {
            Ok(()) => {
                backend.metrics.checks_passed.inc();
                successes += 1;
                failures = 0;
                if successes >= config.healthy_threshold && target.health.set_up(index, true) {
                    tracing::info!(upstream = %target.name, backend = %backend.label, "backend is up: health checks pass");
                }
            }
            Err(reason) => {
                backend.metrics.checks_failed.inc();
                failures += 1;
                successes = 0;
                if failures >= config.unhealthy_threshold && target.health.set_up(index, false) {
                    tracing::warn!(upstream = %target.name, backend = %backend.label, %reason, "backend is down: health checks fail");
                }
            }
        }
        target.refresh_health_gauge(index);
        drop(target);
        // Up to a tenth of the interval either way.
        let pause = config.interval.mul_f64(0.9 + 0.2 * rand::random::<f64>());
        tokio::time::sleep(pause).await;
    }
}

/// One check: a fresh connection, `GET path`, a status in the expected range, all within the timeout.
async fn probe(
    label: &str,
    authority: &http::uri::Authority,
    config: &HealthCheckConfig,
) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(label)
            .await
            .map_err(|error| format!("connect: {error}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| format!("handshake: {error}"))?;
        let driver = tokio::spawn(connection);
        let request = Request::get(config.path.as_str())
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, "bouncer-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|error| format!("request: {error}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| format!("request: {error}"))?;
        driver.abort();
        Ok::<StatusCode, String>(response.status())
    };
    let status = tokio::time::timeout(config.timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {:?}", config.timeout))??;
    let (low, high) = config.expect_status;
    if (low..=high).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(failures: u32, percent: u32) -> Option<OutlierDetectionConfig> {
        Some(OutlierDetectionConfig {
            consecutive_failures: failures,
            ejection_time: Duration::from_secs(30),
            max_ejected_percent: percent,
        })
    }

    #[test]
    fn consecutive_failures_eject_for_the_ejection_time() {
        let health = UpstreamHealth::new(3, outlier(3, 50));
        let now = health.epoch;
        assert_eq!(health.record_failure(0, now), Verdict::Fine);
        assert_eq!(health.record_failure(0, now), Verdict::Fine);
        assert_eq!(
            health.record_failure(0, now),
            Verdict::Ejected(Duration::from_secs(30))
        );
        assert!(!health.is_available(0, now + Duration::from_secs(29)));
        assert!(health.is_available(0, now + Duration::from_secs(30)));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let health = UpstreamHealth::new(3, outlier(2, 50));
        let now = health.epoch;
        health.record_failure(1, now);
        health.record_success(1);
        assert_eq!(health.record_failure(1, now), Verdict::Fine);
        assert!(health.is_available(1, now));
    }

    #[test]
    fn no_more_than_max_ejected_percent_are_ejected() {
        let health = UpstreamHealth::new(4, outlier(1, 50));
        let now = health.epoch;
        assert!(matches!(health.record_failure(0, now), Verdict::Ejected(_)));
        assert!(matches!(health.record_failure(1, now), Verdict::Ejected(_)));
        assert_eq!(health.record_failure(2, now), Verdict::Fine);
        assert!(health.is_available(2, now));
    }

    #[test]
    fn ejected_again_soon_means_ejected_longer() {
        let health = UpstreamHealth::new(2, outlier(1, 50));
        let start = health.epoch;
        assert_eq!(
            health.record_failure(0, start),
            Verdict::Ejected(Duration::from_secs(30))
        );
        let back = start + Duration::from_secs(31);
        assert_eq!(
            health.record_failure(0, back),
            Verdict::Ejected(Duration::from_secs(60))
        );
        // Long healthy after that ejection: back to the base time.
        let much_later = back + Duration::from_secs(60 + 30 * 5 + 1);
        assert_eq!(
            health.record_failure(0, much_later),
            Verdict::Ejected(Duration::from_secs(30))
        );
    }

    #[test]
    fn without_outlier_detection_nothing_is_ejected() {
        let health = UpstreamHealth::new(1, None);
        let now = health.epoch;
        for _ in 0..100 {
            assert_eq!(health.record_failure(0, now), Verdict::Fine);
        }
        assert!(health.is_available(0, now));
    }

    #[test]
    fn active_checks_decide_up_and_down() {
        let health = UpstreamHealth::new(1, None);
        let now = health.epoch;
        assert!(health.set_up(0, false));
        assert!(!health.is_available(0, now));
        assert!(!health.set_up(0, false));
        assert!(health.set_up(0, true));
        assert!(health.is_available(0, now));
    }
}
