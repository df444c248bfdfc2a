//! Which backends may take requests. Active checks probe each backend on a timer; passive
//! detection ejects a backend whose real traffic keeps failing, for a time that grows when it is
//! ejected again soon after coming back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, header};
use tokio::time::Instant;

use bouncer_config::{HealthCheckConfig, OutlierDetectionConfig};

use crate::body::RequestBody;
use crate::upstream::{Backend, Upstream};

/// Ejections of one backend grow up to this many times the configured ejection time.
const MAX_EJECTION_FACTOR: u32 = 10;

/// One backend's health, read on every pick and written by checks and by request outcomes.
pub struct BackendHealth {
    epoch: Instant,
    /// The verdict of active checks; true when none are configured.
    up: AtomicBool,
    /// Until when, in milliseconds since `epoch`, the backend is ejected; 0 if it is not.
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    /// How many ejections in a row, each soon after the previous one ended.
    ejection_streak: AtomicU32,
    /// Set by an operator: the backend takes no new requests and finishes those it has.
    drained: AtomicBool,
}

/// What passive detection concluded from one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// The backend was just ejected until this instant.
    Ejected {
        length: Duration,
        until: Instant,
    },
}

impl Default for BackendHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendHealth {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            up: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejection_streak: AtomicU32::new(0),
            drained: AtomicBool::new(false),
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the backend may take a request at `now`.
    pub fn is_available(&self, now: Instant) -> bool {
        self.is_healthy(now) && !self.is_drained()
    }

    /// Whether checks and passive detection find the backend fit, drained or not.
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.up.load(Ordering::Relaxed) && !self.is_ejected(now)
    }

    /// The active checks' last verdict (true when there are none).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Drains the backend, or takes it back; returns whether that changed anything.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::Relaxed) != drained
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        // Zero: never ejected, the common case, which needs no clock arithmetic (every pick asks
        // this of each backend it considers).
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > self.millis(now)
    }

    /// Sets the active checks' verdict; returns whether it changed. A backend that the checks
    /// find up again is also no longer ejected, as Envoy does: the checks have just seen it work.
    pub fn set_up(&self, up: bool) -> bool {
        let changed = self.up.swap(up, Ordering::Relaxed) != up;
        if changed && up {
            self.end_ejection(Instant::now());
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        changed
    }

    /// Ends an ejection at `now`. The end is kept (not cleared), so that an ejection soon after
    /// still counts as a repeat and lasts longer.
    fn end_ejection(&self, now: Instant) {
        let now_ms = self.millis(now).max(1);
        let _ = self
            .ejected_until_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |until| {
                (until > now_ms).then_some(now_ms)
            });
    }

    /// Ends an ejection before its time; returns whether the backend was ejected.
    pub fn uneject(&self, now: Instant) -> bool {
        if !self.is_ejected(now) {
            return false;
        }
        self.end_ejection(now);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    pub fn record_success(&self) {
        // Read first: most answers are successes, and most backends have no failures to forget.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure of real traffic (connect error, reset, timeout or 5xx) and ejects the
    /// backend when it reached `consecutive_failures`, unless that would eject more than
    /// `max_ejected_percent` of `fleet`, the health of every backend of the upstream.
    pub fn record_failure<'a>(
        &self,
        outlier: &OutlierDetectionConfig,
        fleet: impl ExactSizeIterator<Item = &'a BackendHealth>,
        now: Instant,
    ) -> Verdict {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures {
            return Verdict::Fine;
        }
        let fleet_size = fleet.len();
        let ejected_now = fleet.filter(|other| other.is_ejected(now)).count();
        let allowed = fleet_size * outlier.max_ejected_percent as usize / 100;
        if ejected_now >= allowed {
            return Verdict::Fine;
        }
        let now_ms = self.millis(now);
        let base = outlier.ejection_time;
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        // Ejected again within five ejection times of coming back: the next ejection is longer.
        let previous_end = self.ejected_until_ms.load(Ordering::Relaxed);
        let streak = if previous_end > 0 && now_ms.saturating_sub(previous_end) < base_ms * 5 {
            (self.ejection_streak.load(Ordering::Relaxed) + 1).min(MAX_EJECTION_FACTOR)
        } else {
            1
        };
        self.ejection_streak.store(streak, Ordering::Relaxed);
        let length = base * streak;
        let until = now_ms.saturating_add(u64::try_from(length.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        Verdict::Ejected {
            length,
            until: now + length,
        }
    }
}

/// Runs the active checks of one backend on its own timer with jitter, for as long as both the
/// backend and the upstream that spawned the checks exist.
pub fn spawn_checks(upstream: &Arc<Upstream>, backend: &Arc<Backend>, config: &HealthCheckConfig) {
    tokio::spawn(check_loop(
        Arc::downgrade(upstream),
        Arc::downgrade(backend),
        config.clone(),
    ));
}

async fn check_loop(upstream: Weak<Upstream>, backend: Weak<Backend>, config: HealthCheckConfig) {
    // Spread the first checks over one interval so that backends are not probed in lockstep.
    let first = config.interval.mul_f64(rand::random::<f64>());
    tokio::time::sleep(first).await;
    let mut successes = 0u32;
    let mut failures = 0u32;
    let mut ejection_seen = false;
    loop {
        let (Some(upstream), Some(backend)) = (upstream.upgrade(), backend.upgrade()) else {
            return;
        };
        if !upstream.contains(&backend) {
            // Dropped by DNS and kept aside in case it returns: not probed meanwhile.
            drop((upstream, backend));
            tokio::time::sleep(config.interval).await;
            continue;
        }
        // An ejection is ended early by `healthy_threshold` passing checks after it began.
        if backend.health.is_ejected(Instant::now()) {
            if !ejection_seen {
                successes = 0;
                ejection_seen = true;
            }
        } else {
            ejection_seen = false;
        }
        let outcome = probe(&backend, &config).await;
        match outcome {
            Ok(()) => {
                backend.metrics.checks_passed.inc();
                successes += 1;
                failures = 0;
                if successes >= config.healthy_threshold {
                    if backend.health.set_up(true) {
                        tracing::info!(upstream = %upstream.name, backend = %backend.label, "backend is up: health checks pass");
                        upstream.recovered(&backend);
                    } else if backend.health.uneject(Instant::now()) {
                        // Passing checks outweigh the failures of traffic, as in Envoy.
                        tracing::info!(upstream = %upstream.name, backend = %backend.label, "ejection ended early: health checks pass");
                        upstream.recovered(&backend);
                    }
                }
            }
            Err(reason) => {
                backend.metrics.checks_failed.inc();
                failures += 1;
                successes = 0;
                if failures >= config.unhealthy_threshold && backend.health.set_up(false) {
                    tracing::warn!(upstream = %upstream.name, backend = %backend.label, %reason, "backend is down: health checks fail");
                }
            }
        }
        backend.refresh_health_gauge();
        drop((upstream, backend));
        // Up to a tenth of the interval either way.
        let pause = config.interval.mul_f64(0.9 + 0.2 * rand::random::<f64>());
        tokio::time::sleep(pause).await;
    }
}

/// One check: a fresh connection made as requests' connections are (TLS and HTTP version
/// included), `GET path`, a status in the expected range, all within the timeout.
async fn probe(backend: &Backend, config: &HealthCheckConfig) -> Result<(), String> {
    let request = Request::get(config.path.as_str())
        .header(header::HOST, backend.authority.as_str())
        .header(header::USER_AGENT, "bouncer-health-check")
        .body(RequestBody::empty())
        .map_err(|error| format!("request: {error}"))?;
    let status = tokio::time::timeout(config.timeout, backend.pool.probe(request))
        .await
        .map_err(|_| format!("no answer within {:?}", config.timeout))?
        .map_err(|error| crate::error::Causes(&error).to_string())?;
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

    fn outlier(failures: u32, percent: u32) -> OutlierDetectionConfig {
        OutlierDetectionConfig {
            consecutive_failures: failures,
            ejection_time: Duration::from_secs(30),
            max_ejected_percent: percent,
        }
    }

    fn fleet(count: usize) -> Vec<BackendHealth> {
        (0..count).map(|_| BackendHealth::new()).collect()
    }

    fn fail(
        fleet: &[BackendHealth],
        index: usize,
        outlier: &OutlierDetectionConfig,
        now: Instant,
    ) -> Verdict {
        fleet[index].record_failure(outlier, fleet.iter(), now)
    }

    fn ejected_for(verdict: Verdict) -> Option<Duration> {
        match verdict {
            Verdict::Ejected { length, .. } => Some(length),
            Verdict::Fine => None,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_the_ejection_time() {
        let health = fleet(3);
        let config = outlier(3, 50);
        let now = health[0].epoch;
        assert_eq!(fail(&health, 0, &config, now), Verdict::Fine);
        assert_eq!(fail(&health, 0, &config, now), Verdict::Fine);
        assert_eq!(
            ejected_for(fail(&health, 0, &config, now)),
            Some(Duration::from_secs(30))
        );
        assert!(!health[0].is_available(now + Duration::from_secs(29)));
        assert!(health[0].is_available(now + Duration::from_secs(30)));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let health = fleet(3);
        let config = outlier(2, 50);
        let now = health[1].epoch;
        fail(&health, 1, &config, now);
        health[1].record_success();
        assert_eq!(fail(&health, 1, &config, now), Verdict::Fine);
        assert!(health[1].is_available(now));
    }

    #[test]
    fn no_more_than_max_ejected_percent_are_ejected() {
        let health = fleet(4);
        let config = outlier(1, 50);
        let now = Instant::now();
        assert!(ejected_for(fail(&health, 0, &config, now)).is_some());
        assert!(ejected_for(fail(&health, 1, &config, now)).is_some());
        assert_eq!(fail(&health, 2, &config, now), Verdict::Fine);
        assert!(health[2].is_available(now));
    }

    #[test]
    fn ejected_again_soon_means_ejected_longer() {
        let health = fleet(2);
        let config = outlier(1, 50);
        let start = health[0].epoch;
        assert_eq!(
            ejected_for(fail(&health, 0, &config, start)),
            Some(Duration::from_secs(30))
        );
        let back = start + Duration::from_secs(31);
        assert_eq!(
            ejected_for(fail(&health, 0, &config, back)),
            Some(Duration::from_secs(60))
        );
        // Long healthy after that ejection: back to the base time.
        let much_later = back + Duration::from_secs(60 + 30 * 5 + 1);
        assert_eq!(
            ejected_for(fail(&health, 0, &config, much_later)),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn active_checks_decide_up_and_down() {
        let health = BackendHealth::new();
        let now = health.epoch;
        assert!(health.set_up(false));
        assert!(!health.is_available(now));
        assert!(!health.set_up(false));
        assert!(health.set_up(true));
        assert!(health.is_available(now));
    }

    #[test]
    fn an_ejection_ended_early_by_checks_still_counts_as_a_repeat() {
        let health = fleet(2);
        let config = outlier(1, 50);
        let start = Instant::now();
        assert_eq!(
            ejected_for(fail(&health, 0, &config, start)),
            Some(Duration::from_secs(30))
        );
        assert!(health[0].uneject(start + Duration::from_secs(1)));
        assert!(health[0].is_available(start + Duration::from_secs(1)));
        assert!(!health[0].uneject(start + Duration::from_secs(1)));
        assert_eq!(
            ejected_for(fail(&health, 0, &config, start + Duration::from_secs(2))),
            Some(Duration::from_secs(60))
        );
    }
}
