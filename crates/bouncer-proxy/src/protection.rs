//! The protection layers that refuse abusive traffic before it reaches a backend, cheapest first:
//! IP deny and allow lists and connection caps when a connection is accepted, and rate limits
//! once a request is parsed and routed.
//!
//! The arithmetic and the bounded per-key state are in `bouncer-rules`; this module holds them
//! for the running proxy, reloads list files when they change, and tells the rest of the proxy
//! what to refuse.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderMap;
use ipnet::IpNet;

use bouncer_config::{
    AdaptiveConfig, AdaptiveTrigger, ClusterConfig, IpListsConfig, ProtectionConfig, RateKeyPart,
    RateLimitAction, RateLimitConfig, RuleAction, RuleConfig,
};
use bouncer_rules::{BoundedMap, Decision, Gcra, IpSet, RuleInput, RuleSet, parse_ip_list};
use prometheus_client::metrics::counter::Counter;

use crate::cluster::{Cluster, LEASE_LIFETIME, LeaseAnswer, MAX_LEASE};
use crate::error::Refusal;
use crate::metrics::ProtectionMetrics;

/// Kinds of per-address keys, kept apart from each other and from rate-limit keys (which start
/// with the limit's index).
const KEY_BAN: u8 = 0xb0;
const KEY_VIOLATIONS: u8 = 0xb1;

/// How often list files are looked at for changes.
const LIST_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the protection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
    #[error("cannot read the IP list {path}")]
    ListFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot compile the rules")]
    Rules(#[source] bouncer_rules::RuleError),
    #[error("cluster.redis")]
    Cluster(#[source] redis::RedisError),
}

/// Everything the protection layers keep while the proxy runs; one for all listeners.
pub struct Protection {
    lists: Option<Arc<IpLists>>,
    connections: ConnectionCaps,
    limits: Vec<RateLimit>,
    /// Per-key rate-limit state, for all limits together, bounded by `max_tracked_keys`.
    keys: BoundedMap<u64>,
    /// Keys are hashed with a per-process random key, so that no client can aim collisions.
    hasher: std::hash::RandomState,
    /// The origin of the rate limiter's clock (nanoseconds since then).
    epoch: tokio::time::Instant,
    refusal_log: LogThrottle,
    rules: RuleSet,
    /// Per rule: its name, action and match counter.
    rule_info: Vec<(Arc<str>, RuleAction, Option<Counter>)>,
    /// Banned addresses with the end of their ban (clock nanoseconds).
    bans: BoundedMap<Ban>,
    /// Whether any ban was ever made, so that requests skip the lookup until then.
    any_ban: std::sync::atomic::AtomicBool,
    /// `violations` within `within`, as a rate: one over it is a ban.
    auto_ban: Option<Gcra>,
    ban_for: Duration,
    tarpit_delay: Duration,
    bans_made: Option<Counter>,
    adaptive: Option<Adaptive>,
    /// The Redis that shares rate limits and bans with other instances, when configured.
    cluster: Option<Arc<Cluster>>,
    /// Per shared key: the allowance taken from Redis and not spent yet.
    leases: Option<BoundedMap<Lease>>,
    lease_answers: Box<[tokio::sync::Notify]>,
    max_tracked_keys: usize,
}

/// A batch of shared allowance for one key, taken from Redis.
#[derive(Debug, Default, Clone, Copy)]
struct Lease {
    tokens: u32,
    /// When the tokens must be given back (clock nanoseconds).
    expires: u64,
    /// Whether a request is asking Redis for this key now.
    asking: bool,
    /// Until when Redis refused the key: no need to ask again before.
    refused_until: u64,
}

/// A rate limit's verdict on one request.
enum Verdict {
    Allow,
    /// Admitted, after this wait (a `delay` limit).
    Wait(Duration),
    Refuse(Duration),
}

/// One step of a shared decision taken with the local lease alone.
enum LeaseStep {
    Decided(Verdict),
    /// Redis must be asked, giving back this many expired tokens.
    Ask {
        refund: u32,
    },
    /// Another request is asking Redis for this key: its answer decides.
    Wait,
}

/// Wakes requests waiting on a key's lease answer; a few shards, woken together.
const LEASE_ANSWER_SHARDS: usize = 64;
/// How many answers a request waits for before it decides alone.
const MAX_LEASE_WAITS: u32 = 4;

/// Ends a request's turn at asking Redis for a key, whether or not it got an answer.
struct AskingGuard<'a> {
    leases: &'a BoundedMap<Lease>,
    key: u64,
    answered: &'a tokio::sync::Notify,
}

impl Drop for AskingGuard<'_> {
    fn drop(&mut self) {
        self.leases.update(self.key, |lease| lease.asking = false);
        self.answered.notify_waiters();
    }
}

/// One banned address.
#[derive(Debug, Default, Clone, Copy)]
struct Ban {
    ip: Option<IpAddr>,
    until: u64,
}

impl Protection {
    /// Loads the list files and compiles the rules; inside a Tokio runtime it also starts
    /// watching the list files.
    pub fn new(
        config: &ProtectionConfig,
        rate_limits: &[RateLimitConfig],
        rules: &[RuleConfig],
        cluster: Option<&ClusterConfig>,
        metrics: Option<ProtectionMetrics>,
        replacing: Option<&Protection>,
    ) -> Result<Arc<Self>, ProtectionError> {
        let cluster = cluster
            .map(|cluster| {
                Cluster::new(
                    cluster,
                    metrics.as_ref().map(|metrics| metrics.cluster.clone()),
                )
            })
            .transpose()
            .map_err(ProtectionError::Cluster)?;
        let specs: Vec<bouncer_rules::RuleSpec> =
            rules.iter().map(|rule| rule.when.clone()).collect();
        let rule_set = RuleSet::new(&specs).map_err(ProtectionError::Rules)?;
        let lists = if config.ip.is_empty() {
            None
        } else {
            Some(Arc::new(IpLists::load(&config.ip)?))
        };
        if let Some(lists) = &lists
            && !(config.ip.deny_files.is_empty() && config.ip.allow_files.is_empty())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(watch_lists(Arc::downgrade(lists), config.ip.clone()));
        }
        // A layer that replaces another on a reload hashes and keeps time as it did, so that the
        // per-key state it takes over (`take_state_from`) means the same here.
        let (hasher, epoch) = match replacing {
            Some(previous) => (previous.hasher.clone(), previous.epoch),
            None => (std::hash::RandomState::new(), tokio::time::Instant::now()),
        };
        let protection = Arc::new(Protection {
            lists,
            connections: ConnectionCaps::new(config),
            limits: rate_limits
                .iter()
                .map(|limit| {
                    RateLimit::new(
                        limit,
                        config.adaptive.as_ref(),
                        hasher.hash_one(limit.name.as_str()),
                    )
                })
                .collect(),
            keys: BoundedMap::new(config.max_tracked_keys),
            hasher,
            epoch,
            refusal_log: LogThrottle::default(),
            rules: rule_set,
            rule_info: rules
                .iter()
                .map(|rule| {
                    let counter = metrics
                        .as_ref()
                        .map(|metrics| metrics.rule(&rule.name, action_label(rule.action)));
                    (rule.name.as_str().into(), rule.action, counter)
                })
                .collect(),
            bans: BoundedMap::new(config.max_tracked_keys),
            any_ban: std::sync::atomic::AtomicBool::new(false),
            auto_ban: config.auto_ban.as_ref().map(|auto_ban| {
                Gcra::new(auto_ban.violations, auto_ban.within, auto_ban.violations)
            }),
            ban_for: config.ban_for(),
            tarpit_delay: config.tarpit_delay,
            bans_made: metrics.as_ref().map(|metrics| metrics.bans.clone()),
            adaptive: config
                .adaptive
                .as_ref()
                .map(|adaptive| Adaptive::new(adaptive, metrics)),
            leases: cluster
                .is_some()
                .then(|| BoundedMap::new(config.max_tracked_keys)),
            lease_answers: if cluster.is_some() {
                (0..LEASE_ANSWER_SHARDS)
                    .map(|_| tokio::sync::Notify::new())
                    .collect()
            } else {
                Box::default()
            },
            cluster,
            max_tracked_keys: config.max_tracked_keys,
        });
        if let Some(cluster) = &protection.cluster
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(crate::cluster::supervise(
                Arc::clone(cluster),
                Arc::downgrade(&protection),
            ));
        }
        if protection.adaptive.is_some()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(watch_backends(Arc::downgrade(&protection)));
        }
        Ok(protection)
    }

    /// Whether `ip` may connect (or, behind a trusted proxy, send a request) by the IP lists.
    pub fn check_lists(&self, ip: IpAddr) -> Result<(), Refusal> {
        match &self.lists {
            Some(lists) => lists.check(ip),
            None => Ok(()),
        }
    }

    /// Admits a connection from `ip` under the connection caps; the permit gives its place back
    /// when dropped. `per_ip` is false for a trusted proxy, whose connections carry many clients.
    /// At the total cap, the keep-alive connection idle the longest is closed to make room (so
    /// the cap may be passed by a connection or two until it is gone); only when none is idle is
    /// the new one refused.
    pub fn admit_connection(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip: bool,
    ) -> Result<ConnectionPermit, Refusal> {
        match self.connections.admit(ip, per_ip, true) {
            Err(Refusal::ConnectionLimit) if self.connections.reap_idle() => {
                self.connections.admit(ip, per_ip, false)?;
            }
            other => other?,
        }
        Ok(ConnectionPermit {
            protection: Arc::clone(self),
            ip: per_ip.then_some(ip),
        })
    }

    /// Whether `ip` is banned now.
    pub fn check_ban(&self, ip: IpAddr) -> Result<(), Refusal> {
        if !self.any_ban.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = self.now_nanos();
        // Looked at without making the entry recent: the map holds bans only, so a ban is
        // forgotten early only when a million newer ones push it out.
        let banned = self
            .bans
            .peek(self.ban_key(ip), |ban| ban.until > now)
            .unwrap_or(false);
        if banned { Err(Refusal::Banned) } else { Ok(()) }
    }

    /// Bans `ip` for the configured time from now.
    pub fn ban(&self, ip: IpAddr, reason: &str) {
        self.ban_for(ip, self.ban_for, reason);
    }

    /// Bans `ip` for `ban_for` from now (on every instance of a cluster), replacing any ban it has.
    /// A ban made again (through the admin API, in practice: a banned address is refused before
    /// anything could ban it again) is shared again, so that the other instances extend theirs;
    /// they never shorten one.
    pub fn ban_for(&self, ip: IpAddr, ban_for: Duration, reason: &str) {
        let until = self
            .now_nanos()
            .saturating_add(u64::try_from(ban_for.as_nanos()).unwrap_or(u64::MAX));
        let was_banned = self.bans.update(self.ban_key(ip), |ban| {
            let was = ban.until > self.now_nanos();
            *ban = Ban {
                ip: Some(ip),
                until,
            };
            was
        });
        self.any_ban.store(true, Ordering::Relaxed);
        if was_banned {
            tracing::info!(%ip, reason, ?ban_for, "ban made again");
        } else {
            if let Some(counter) = &self.bans_made {
                counter.inc();
            }
            tracing::warn!(%ip, reason, ?ban_for, "address banned");
        }
        if let Some(cluster) = &self.cluster {
            cluster.share_ban(ip, ban_for);
        }
    }

    /// Takes over the state of the protection layer this one replaces on a reload (made with it
    /// as `replacing`): the per-key rate-limit and violation counts, so that a reload is no way
    /// around a limit, and the bans, quietly (they were counted, logged and shared when made).
    /// A limit's count goes on under its name, whatever its place in the file and its new rate.
    pub(crate) fn take_state_from(&self, previous: &Protection) {
        previous.keys.for_each(|key, state| {
            self.keys.update(key, |mine| *mine = *state);
        });
        self.take_bans_from(previous);
    }

    fn take_bans_from(&self, previous: &Protection) {
        let now = self.now_nanos();
        for (ip, left) in previous.bans() {
            let until = now.saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX));
            self.bans.update(self.ban_key(ip), |ban| {
                ban.ip = Some(ip);
                ban.until = ban.until.max(until);
            });
            self.any_ban.store(true, Ordering::Relaxed);
        }
    }

    /// Lifts the ban on `ip` (here and, in a cluster, everywhere); tells whether there was one.
    pub fn unban(&self, ip: IpAddr) -> bool {
        let was_banned = self.apply_unban(ip);
        if let Some(cluster) = &self.cluster {
            cluster.share_unban(ip);
        }
        was_banned
    }

    fn apply_unban(&self, ip: IpAddr) -> bool {
        let now = self.now_nanos();
        let was_banned = self
            .bans
            .peek(self.ban_key(ip), |ban| ban.until > now)
            .unwrap_or(false);
        self.bans.remove(self.ban_key(ip));
        if was_banned {
            tracing::info!(%ip, "ban lifted");
        }
        was_banned
    }

    /// Applies a ban made by another instance, for `ban_for` from now (extending one already
    /// here, never shortening it); tells whether the address was not banned until now.
    pub(crate) fn apply_shared_ban(&self, ip: IpAddr, ban_for: Duration) -> bool {
        let now = self.now_nanos();
        let until = now.saturating_add(u64::try_from(ban_for.as_nanos()).unwrap_or(u64::MAX));
        let was_banned = self.bans.update(self.ban_key(ip), |ban| {
            let was = ban.until > now;
            ban.ip = Some(ip);
            ban.until = ban.until.max(until);
            was
        });
        self.any_ban.store(true, Ordering::Relaxed);
        if !was_banned {
            tracing::info!(%ip, ?ban_for, "address banned by another instance");
        }
        !was_banned
    }

    /// Applies another instance's lifting of a ban.
    pub(crate) fn apply_shared_unban(&self, ip: IpAddr) {
        self.apply_unban(ip);
    }

    pub(crate) fn max_tracked_keys(&self) -> usize {
        self.max_tracked_keys
    }

    /// The cluster's Redis connection, when `[cluster]` is configured.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Counts a refusal of `ip`'s request (a rate limit or a rule) towards `auto_ban`; one too
    /// many within the window bans the address.
    pub fn record_violation(&self, ip: IpAddr) {
        let Some(limit) = &self.auto_ban else {
            return;
        };
        let key = self.violation_key(ip);
        let now = self.now_nanos();
        // The violation that uses up the allowance is the one that bans: `violations` of them
        // within the window.
        let over = self.keys.update(key, |tat| match limit.check(*tat, now) {
            Decision::Allow {
                tat: next,
                remaining,
                ..
            } => {
                *tat = next;
                remaining == 0
            }
            Decision::Deny { .. } => true,
        });
        if over {
            self.ban(ip, "auto_ban: too many refused requests");
        }
    }

    /// The banned addresses now, with the time left on each.
    pub fn bans(&self) -> Vec<(IpAddr, Duration)> {
        let now = self.now_nanos();
        let mut list = Vec::new();
        self.bans.for_each(|_, ban| {
            if let Some(ip) = ban.ip
                && ban.until > now
            {
                list.push((ip, Duration::from_nanos(ban.until - now)));
            }
        });
        list
    }

    fn ban_key(&self, ip: IpAddr) -> u64 {
        self.ip_key(KEY_BAN, ip)
    }

    fn violation_key(&self, ip: IpAddr) -> u64 {
        self.ip_key(KEY_VIOLATIONS, ip)
    }

    /// The key of one address's entry of one kind (`KEY_*`).
    fn ip_key(&self, kind: u8, ip: IpAddr) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        hasher.write_u8(kind);
        hash_ip(&mut hasher, ip);
        hasher.finish()
    }

    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The first rule the request matches: its name and action (counted).
    pub fn match_rule(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<(Arc<str>, RuleAction)> {
        let visit = |name: &str, visit: &mut dyn FnMut(&[u8])| {
            for value in headers.get_all(name) {
                visit(value.as_bytes());
            }
        };
        let index = self.rules.first_match(&RuleInput {
            method,
            path,
            headers: &visit,
        })?;
        let (name, action, counter) = self.rule_info.get(index)?;
        if let Some(counter) = counter {
            counter.inc();
        }
        Some((Arc::clone(name), *action))
    }

    pub fn tarpit_delay(&self) -> Duration {
        self.tarpit_delay
    }

    pub fn has_rate_limits(&self) -> bool {
        !self.limits.is_empty()
    }

    /// Counts a request against every rate limit that applies to `route`. Refused, it says which
    /// limit and when to retry; with `delay`, it may first wait (up to the limit's `max_delay`).
    /// In a cluster the limits are shared through Redis while it answers, and local otherwise.
    pub async fn check_rate_limits(&self, request: &RateSubject<'_>) -> Result<(), RateLimited> {
        for limit in &self.limits {
            if !limit.applies_to(request.route) {
                continue;
            }
            let key = self.key_of(limit, request);
            // Under attack the tightened limit applies, to the same per-key state.
            let gcra = match (&limit.tight, &self.adaptive) {
                (Some(tight), Some(adaptive)) if adaptive.active.load(Ordering::Relaxed) => tight,
                _ => &limit.gcra,
            };
            let verdict = match &self.cluster {
                Some(cluster) if cluster.is_up() => {
                    match self.check_shared(cluster, limit, gcra, key, request).await {
                        Some(verdict) => verdict,
                        None => {
                            cluster.count_local_decision();
                            self.check_local(limit, gcra, key)
                        }
                    }
                }
                Some(cluster) => {
                    cluster.count_local_decision();
                    self.check_local(limit, gcra, key)
                }
                None => self.check_local(limit, gcra, key),
            };
            match verdict {
                Verdict::Allow => {}
                Verdict::Wait(wait) => tokio::time::sleep(wait).await,
                Verdict::Refuse(retry_after) => {
                    return Err(RateLimited {
                        limit: Arc::clone(&limit.name),
                        burst: gcra.burst(),
                        retry_after,
                    });
                }
            }
        }
        Ok(())
    }

    /// Decides by this instance's own state of `key`.
    fn check_local(&self, limit: &RateLimit, gcra: &Gcra, key: u64) -> Verdict {
        let now = self.now_nanos();
        let decision = self.keys.update(key, |tat| {
            let decision = gcra.check(*tat, now);
            match decision {
                Decision::Allow { tat: next, .. } => *tat = next,
                Decision::Deny { retry_after } => {
                    if let RateLimitAction::Delay { max_delay } = limit.action
                        && retry_after <= max_delay
                    {
                        // The request takes the first place that frees up, reserved now so that
                        // waiting requests keep their order and the rate stays exact.
                        let at = now + u64::try_from(retry_after.as_nanos()).unwrap_or(u64::MAX);
                        if let Decision::Allow { tat: next, .. } = gcra.check(*tat, at) {
                            *tat = next;
                        }
                    }
                }
            }
            decision
        });
        match decision {
            Decision::Allow { .. } => Verdict::Allow,
            Decision::Deny { retry_after } => match limit.action {
                RateLimitAction::Delay { max_delay } if retry_after <= max_delay => {
                    Verdict::Wait(retry_after)
                }
                _ => Verdict::Refuse(retry_after),
            },
        }
    }

    /// Decides by the state shared in Redis: from this instance's lease of allowance when it has
    /// one, otherwise by asking Redis, one request per key at a time (the others wait for its
    /// answer). `None` when Redis failed.
    async fn check_shared(
        &self,
        cluster: &Cluster,
        limit: &RateLimit,
        gcra: &Gcra,
        key: u64,
        request: &RateSubject<'_>,
    ) -> Option<Verdict> {
        let leases = self.leases.as_ref()?;
        let asked = &self.lease_answers[(key % LEASE_ANSWER_SHARDS as u64) as usize];
        let mut waits = 0;
        let refund = loop {
            match self.lease_step(leases, key) {
                LeaseStep::Decided(verdict) => return Some(verdict),
                LeaseStep::Ask { refund } => break refund,
                LeaseStep::Wait => {}
            }
            if waits == MAX_LEASE_WAITS {
                return None;
            }
            waits += 1;
            // Registered before looking again, so that an answer in between is not missed.
            let answered = asked.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            match self.lease_step(leases, key) {
                LeaseStep::Decided(verdict) => return Some(verdict),
                LeaseStep::Ask { refund } => break refund,
                LeaseStep::Wait => {
                    let _ = tokio::time::timeout(cluster.timeout(), answered).await;
                }
            }
        };
        // Whatever happens to this request from here, the key is free to ask again after it.
        let _asking = AskingGuard {
            leases,
            key,
            answered: asked,
        };
        let shared_key = cluster.rate_key(&limit.name, &self.shared_digest(limit, request));
        let max_wait = match limit.action {
            RateLimitAction::Delay { max_delay } => Some(max_delay),
            RateLimitAction::Reject => None,
        };
        let want = lease_size(gcra);
        let answer = cluster
            .lease(&shared_key, gcra, want, refund, max_wait)
            .await?;
        let now = self.now_nanos();
        Some(match answer {
            LeaseAnswer::Granted { count, wait } => {
                if count > 1 {
                    leases.update(key, |lease| {
                        // Tokens already held keep their earlier expiry, so that none is spent
                        // longer than the lease lifetime after Redis granted it.
                        if lease.tokens == 0 || lease.expires <= now {
                            lease.expires = now + LEASE_NANOS;
                        }
                        lease.tokens = lease.tokens.saturating_add(count - 1);
                    });
                }
                if wait.is_zero() {
                    Verdict::Allow
                } else {
                    Verdict::Wait(wait)
                }
            }
            LeaseAnswer::Refused { retry_after } => {
                // Redis is asked again once a whole lease has freed up rather than a single
                // request, so that a key over its limit costs a round trip per lease, not per
                // request; the client is told when one request would pass. A `delay` limit asks
                // as soon as a request could be booked within its `max_delay`.
                let ask_again = match max_wait {
                    Some(max_delay) => retry_after.saturating_sub(max_delay),
                    None => {
                        let batch = want.min(gcra.burst()).saturating_sub(1);
                        retry_after + gcra.emission_interval() * batch
                    }
                };
                let until = now + u64::try_from(ask_again.as_nanos()).unwrap_or(u64::MAX);
                leases.update(key, |lease| {
                    lease.refused_until = lease.refused_until.max(until)
                });
                Verdict::Refuse(retry_after)
            }
        })
    }

    /// What the local lease of `key` says about one more request.
    fn lease_step(&self, leases: &BoundedMap<Lease>, key: u64) -> LeaseStep {
        let now = self.now_nanos();
        leases.update(key, |lease| {
            if lease.refused_until > now {
                return LeaseStep::Decided(Verdict::Refuse(Duration::from_nanos(
                    lease.refused_until - now,
                )));
            }
            if lease.tokens > 0 && lease.expires > now {
                lease.tokens -= 1;
                return LeaseStep::Decided(Verdict::Allow);
            }
            if lease.asking {
                return LeaseStep::Wait;
            }
            lease.asking = true;
            LeaseStep::Ask {
                refund: std::mem::take(&mut lease.tokens),
            }
        })
    }

    fn key_of(&self, limit: &RateLimit, request: &RateSubject<'_>) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        hasher.write_u64(limit.seed);
        write_key_parts(&mut hasher, limit, request);
        hasher.finish()
    }

    /// A digest of the key's parts that every instance computes alike, and that no client can
    /// aim a collision at: the first 16 bytes of their SHA-256.
    fn shared_digest(&self, limit: &RateLimit, request: &RateSubject<'_>) -> [u8; 16] {
        let mut digest = DigestHasher(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256));
        write_key_parts(&mut digest, limit, request);
        let sum = digest.0.finish();
        let mut head = [0u8; 16];
        head.copy_from_slice(&sum.as_ref()[..16]);
        head
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a refusal may be logged now: at most one line a second, however many refusals,
    /// so that an attack cannot flood the logs. Gives the number of refusals not logged since.
    pub fn may_log_refusal(&self) -> Option<u64> {
        self.refusal_log.allow(self.now_nanos())
    }

    /// Registers a connection's activity, so that it can be reaped when idle at the cap.
    pub fn register_connection(&self, activity: &Arc<crate::conn::ConnectionActivity>) {
        self.connections.register(activity);
    }

    /// Open connections now, all listeners together.
    pub fn open_connections(&self) -> u32 {
        self.connections.total.load(Ordering::Relaxed)
    }

    /// Keys with rate-limit state now.
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }
}

/// The lease lifetime in clock nanoseconds.
const LEASE_NANOS: u64 = LEASE_LIFETIME.as_nanos() as u64;

/// How much allowance to take from Redis at once: a hundredth of a second's worth of the rate,
/// so that a key is asked about at most about a hundred times a second per instance.
fn lease_size(limit: &Gcra) -> u32 {
    let per_second = 1e9 / limit.emission_interval().as_nanos().max(1) as f64;
    ((per_second / 100.0) as u32).clamp(1, MAX_LEASE)
}

/// Feeds the parts of a request's key for `limit` to `hasher`.
fn write_key_parts(hasher: &mut impl Hasher, limit: &RateLimit, request: &RateSubject<'_>) {
    for part in &limit.key {
        match part {
            RateKeyPart::ClientIp => hash_ip(hasher, request.client),
            RateKeyPart::Header(name) => {
                for value in request.headers.get_all(name.as_str()) {
                    hasher.write(value.as_bytes());
                    hasher.write_u8(0xff);
                }
            }
            RateKeyPart::Cookie(name) => {
                if let Some(value) = cookie_value(request.headers, name) {
                    hasher.write(value.as_bytes());
                }
            }
            RateKeyPart::Path => hasher.write(request.path.as_bytes()),
            RateKeyPart::Route => hasher.write(request.route.as_bytes()),
        }
        // Parts are separated, so that ("ab", "c") and ("a", "bc") differ.
        hasher.write_u8(0);
    }
}

/// SHA-256 fed through the `Hasher` interface; only `write` is used.
struct DigestHasher(aws_lc_rs::digest::Context);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        0
    }
}

fn hash_ip(hasher: &mut impl Hasher, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => hasher.write(&v4.octets()),
        IpAddr::V6(v6) => hasher.write(&v6.octets()),
    }
}

fn action_label(action: RuleAction) -> &'static str {
    match action {
        RuleAction::Deny => "deny",
        RuleAction::Ban => "ban",
        RuleAction::Tarpit => "tarpit",
        RuleAction::Log => "log",
    }
}

/// Adaptive ("under attack") mode: a signal of the backends' suffering, looked at every second,
/// turns the tightened limits on after two bad seconds in a row, and off again after five calm
/// ones (below half the trigger), so that it does not flap.
struct Adaptive {
    trigger: AdaptiveTrigger,
    tighten_to: f64,
    active: std::sync::atomic::AtomicBool,
    /// Backend response times in the current second.
    latencies: crate::latency::LatencyHistogram,
    in_flight: AtomicU64,
    metrics: Option<ProtectionMetrics>,
}

/// Seconds in a row of a bad signal that turn adaptive mode on, and of a calm one that turn it off.
const BAD_SECONDS_TO_TIGHTEN: u32 = 2;
const CALM_SECONDS_TO_RELAX: u32 = 5;

impl Adaptive {
    fn new(config: &AdaptiveConfig, metrics: Option<ProtectionMetrics>) -> Self {
        Adaptive {
            trigger: config.trigger,
            tighten_to: config.tighten_to,
            active: std::sync::atomic::AtomicBool::new(false),
            latencies: crate::latency::LatencyHistogram::default(),
            in_flight: AtomicU64::new(0),
            metrics,
        }
    }

    /// The 99th percentile of this second's samples (none: zero), and a fresh second.
    fn take_p99(&self) -> Duration {
        self.latencies.take().percentile(0.99)
    }

    /// How bad this second was, as a share of the trigger (1.0 is the trigger itself).
    fn pressure(&self) -> f64 {
        match self.trigger {
            AdaptiveTrigger::BackendP99(limit) => {
                self.take_p99().as_secs_f64() / limit.as_secs_f64().max(f64::MIN_POSITIVE)
            }
            AdaptiveTrigger::InFlight(limit) => {
                self.in_flight.load(Ordering::Acquire) as f64 / f64::from(limit.max(1))
            }
        }
    }

    fn switch(&self, on: bool, pressure: f64) {
        self.active.store(on, Ordering::Release);
        if let Some(metrics) = &self.metrics {
            metrics.adaptive_active.set(i64::from(on));
            if on {
                metrics.adaptive_tightened.inc();
            } else {
                metrics.adaptive_relaxed.inc();
            }
        }
        if on {
            tracing::warn!(trigger = ?self.trigger, pressure, tighten_to = self.tighten_to, "adaptive mode on: the backends suffer, rate limits are tightened");
        } else {
            tracing::info!(trigger = ?self.trigger, pressure, "adaptive mode off: the backends are calm, rate limits are back to normal");
        }
    }
}

/// Looks at the backends every second and switches adaptive mode, while the protection exists.
async fn watch_backends(protection: Weak<Protection>) {
    let mut bad = 0u32;
    let mut calm = 0u32;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(protection) = protection.upgrade() else {
            return;
        };
        let Some(adaptive) = &protection.adaptive else {
            return;
        };
        let pressure = adaptive.pressure();
        let active = adaptive.active.load(Ordering::Acquire);
        if pressure >= 1.0 {
            bad += 1;
            calm = 0;
        } else if pressure < 0.5 {
            calm += 1;
            bad = 0;
        } else {
            bad = 0;
            calm = 0;
        }
        if !active && bad >= BAD_SECONDS_TO_TIGHTEN {
            adaptive.switch(true, pressure);
        } else if active && calm >= CALM_SECONDS_TO_RELAX {
            adaptive.switch(false, pressure);
        }
    }
}

/// Counts a request in flight for adaptive mode's `trigger_in_flight`, until dropped.
pub struct InFlightGuard(Arc<Protection>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(adaptive) = &self.0.adaptive {
            adaptive.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Protection {
    /// A backend answered (its headers) after `took`: a sample for adaptive mode.
    pub fn observe_backend_latency(&self, took: Duration) {
        if let Some(adaptive) = &self.adaptive
            && matches!(adaptive.trigger, AdaptiveTrigger::BackendP99(_))
        {
            adaptive.latencies.record(took);
        }
    }

    /// Counts a request in flight, when adaptive mode watches requests in flight.
    pub fn track_in_flight(self: &Arc<Self>) -> Option<InFlightGuard> {
        let adaptive = self.adaptive.as_ref()?;
        if !matches!(adaptive.trigger, AdaptiveTrigger::InFlight(_)) {
            return None;
        }
        adaptive.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlightGuard(Arc::clone(self)))
    }

    /// Whether adaptive mode has the limits tightened now.
    pub fn under_attack(&self) -> bool {
        self.adaptive
            .as_ref()
            .is_some_and(|adaptive| adaptive.active.load(Ordering::Acquire))
    }
}

/// What identifies a request to the rate limits.
pub struct RateSubject<'a> {
    pub client: IpAddr,
    pub headers: &'a HeaderMap,
    pub path: &'a str,
    pub route: &'a str,
}

/// A request refused by a rate limit.
#[derive(Debug, Clone)]
pub struct RateLimited {
    pub limit: Arc<str>,
    pub burst: u32,
    pub retry_after: Duration,
}

struct RateLimit {
    name: Arc<str>,
    /// The name, hashed: what sets this limit's keys apart from other limits', kept across a
    /// reload that rebuilds the protection layer.
    seed: u64,
    key: Vec<RateKeyPart>,
    gcra: Gcra,
    /// The limit while adaptive mode is on.
    tight: Option<Gcra>,
    routes: Vec<String>,
    action: RateLimitAction,
}

impl RateLimit {
    fn new(config: &RateLimitConfig, adaptive: Option<&AdaptiveConfig>, seed: u64) -> Self {
        let gcra = Gcra::new(config.count, config.period, config.burst);
        RateLimit {
            name: config.name.as_str().into(),
            seed,
            key: config.key.clone(),
            gcra,
            tight: adaptive.map(|adaptive| gcra.scaled(adaptive.tighten_to)),
            routes: config.routes.clone(),
            action: config.action,
        }
    }

    fn applies_to(&self, route: &str) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|name| name == route)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// The deny and allow lists: the addresses given in the config, and those of the list files.
struct IpLists {
    deny: ArcSwap<IpSet>,
    /// `None` when no allow list is configured: everyone not denied may connect.
    allow: Option<ArcSwap<IpSet>>,
}

impl IpLists {
    fn load(config: &IpListsConfig) -> Result<Self, ProtectionError> {
        let deny = build_set(&config.deny, &config.deny_files)?;
        let allow = if config.has_allow_list() {
            Some(ArcSwap::from_pointee(build_set(
                &config.allow,
                &config.allow_files,
            )?))
        } else {
            None
        };
        Ok(IpLists {
            deny: ArcSwap::from_pointee(deny),
            allow,
        })
    }

    fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.deny.load().contains(ip) {
            return Err(Refusal::DenyList);
        }
        if let Some(allow) = &self.allow
            && !allow.load().contains(ip)
        {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

/// The set of `blocks` and of every block in `files`. A malformed line is logged with its file
/// and number and skipped; a file that cannot be read is an error.
fn build_set(blocks: &[IpNet], files: &[PathBuf]) -> Result<IpSet, ProtectionError> {
    let mut all = blocks.to_vec();
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|source| ProtectionError::ListFile {
            path: path.clone(),
            source,
        })?;
        let (found, errors) = parse_ip_list(&text);
        for error in errors.iter().take(20) {
            tracing::warn!(file = %path.display(), "{error}; the line is skipped");
        }
        if errors.len() > 20 {
            tracing::warn!(file = %path.display(), more = errors.len() - 20, "more malformed lines skipped");
        }
        all.extend(found);
    }
    Ok(IpSet::new(all))
}

/// Reloads the lists when one of their files changes, for as long as the lists exist. A file that
/// cannot be read keeps the lists as they were.
async fn watch_lists(lists: Weak<IpLists>, config: IpListsConfig) {
    let files: Vec<PathBuf> = config
        .deny_files
        .iter()
        .chain(&config.allow_files)
        .cloned()
        .collect();
    let mut seen = fingerprint(&files);
    loop {
        tokio::time::sleep(LIST_WATCH_INTERVAL).await;
        let Some(lists) = lists.upgrade() else {
            return;
        };
        let now = fingerprint(&files);
        if now == seen {
            continue;
        }
        seen = now;
        let deny = build_set(&config.deny, &config.deny_files);
        let allow = config
            .has_allow_list()
            .then(|| build_set(&config.allow, &config.allow_files))
            .transpose();
        match (deny, allow) {
            (Ok(deny), Ok(allow)) => {
                let ranges = deny.range_count();
                lists.deny.store(Arc::new(deny));
                if let (Some(slot), Some(allow)) = (&lists.allow, allow) {
                    slot.store(Arc::new(allow));
                }
                tracing::info!(deny_ranges = ranges, "IP lists reloaded");
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(error = %crate::error::Causes(&error), "the changed IP lists were not loaded; the lists in use stay");
            }
        }
    }
}

fn fingerprint(files: &[PathBuf]) -> Vec<Option<(u64, SystemTime)>> {
    files
        .iter()
        .map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.len(), metadata.modified().ok()?))
        })
        .collect()
}

/// Open connections, in all and per address.
struct ConnectionCaps {
    max_total: Option<u32>,
    max_per_ip: Option<u32>,
    total: AtomicU32,
    /// Only addresses with open connections are held, so this is bounded by `max_total` (or by
    /// the descriptor limit).
    per_ip: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    /// With `max_total`: every connection's activity, to find idle ones to reap at the cap.
    registry: Mutex<Vec<Weak<crate::conn::ConnectionActivity>>>,
}

const PER_IP_SHARDS: usize = 16;

impl ConnectionCaps {
    fn new(config: &ProtectionConfig) -> Self {
        ConnectionCaps {
            max_total: config.max_connections,
            max_per_ip: config.max_connections_per_ip,
            total: AtomicU32::new(0),
            per_ip: (0..PER_IP_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            registry: Mutex::new(Vec::new()),
        }
    }

    fn register(&self, activity: &Arc<crate::conn::ConnectionActivity>) {
        if self.max_total.is_none() {
            return;
        }
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        // Entries of closed connections are dropped now and then, so the list stays near the
        // number of open connections.
        let open = self.total.load(Ordering::Relaxed) as usize;
        if registry.len() > 2 * open + 64 {
            registry.retain(|entry| entry.strong_count() > 0);
        }
        registry.push(Arc::downgrade(activity));
    }

    /// Asks the keep-alive connection idle the longest to close; false when none is idle.
    fn reap_idle(&self) -> bool {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = registry
            .iter()
            .filter_map(Weak::upgrade)
            .filter_map(|activity| Some((activity.reapable_since()?, activity)))
            .min_by_key(|(since, _)| *since);
        match oldest {
            Some((_, activity)) => {
                activity.reap();
                true
            }
            None => false,
        }
    }

    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let index = match ip {
            IpAddr::V4(v4) => usize::from(v4.octets()[3]),
            IpAddr::V6(v6) => usize::from(v6.octets()[15]),
        } % PER_IP_SHARDS;
        self.per_ip[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a new connection; `within_total` is false for one admitted past the total cap in
    /// place of a connection being reaped.
    fn admit(&self, ip: IpAddr, per_ip: bool, within_total: bool) -> Result<(), Refusal> {
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if within_total && self.max_total.is_some_and(|max| total > max) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ConnectionLimit);
        }
        if per_ip && let Some(max) = self.max_per_ip {
            let mut shard = self.shard(ip);
            let count = shard.entry(ip).or_insert(0);
            if *count >= max {
                drop(shard);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::ConnectionLimitPerIp);
            }
            *count += 1;
        }
        Ok(())
    }

    fn release(&self, ip: Option<IpAddr>) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = ip
            && self.max_per_ip.is_some()
        {
            let mut shard = self.shard(ip);
            if let Some(count) = shard.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    shard.remove(&ip);
                }
            }
        }
    }
}

/// A connection's place under the caps, given back when the connection ends.
pub struct ConnectionPermit {
    protection: Arc<Protection>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.protection.connections.release(self.ip);
    }
}

/// Lets one log line through a second.
#[derive(Default)]
struct LogThrottle {
    /// The clock reading (ns) from which the next line may be written.
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    fn allow(&self, now: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now < next
            || self
                .next
                .compare_exchange(
                    next,
                    now + 1_000_000_000,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::COOKIE,
            "a=1; session=abc".parse().expect("value"),
        );
        headers.append(http::header::COOKIE, "other=2".parse().expect("value"));
        assert_eq!(cookie_value(&headers, "session"), Some("abc"));
        assert_eq!(cookie_value(&headers, "other"), Some("2"));
        assert_eq!(cookie_value(&headers, "missing"), None);
    }

    #[test]
    fn the_log_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let throttle = LogThrottle::default();
        assert_eq!(throttle.allow(5), Some(0));
        assert_eq!(throttle.allow(10), None);
        assert_eq!(throttle.allow(999_999_999), None);
        assert_eq!(throttle.allow(1_000_000_005), Some(2));
    }

    #[test]
    fn connection_caps_count_in_all_and_per_address() {
        let caps = ConnectionCaps::new(&ProtectionConfig {
            max_connections: Some(3),
            max_connections_per_ip: Some(2),
            ..ProtectionConfig::default()
        });
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        assert_eq!(caps.admit(a, true, true), Ok(()));
        assert_eq!(caps.admit(a, true, true), Ok(()));
        assert_eq!(
            caps.admit(a, true, true),
            Err(Refusal::ConnectionLimitPerIp)
        );
        assert_eq!(caps.admit(b, true, true), Ok(()));
        assert_eq!(caps.admit(b, true, true), Err(Refusal::ConnectionLimit));
        caps.release(Some(a));
        assert_eq!(caps.admit(b, true, true), Ok(()));
        assert_eq!(caps.total.load(Ordering::Relaxed), 3);
    }
}
