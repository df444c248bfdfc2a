//! Rate limits and bans shared between Bouncer instances through one Redis server.
//!
//! **Rate limits.** Redis holds each shared key's GCRA state (its theoretical arrival time, in
//! microseconds of Redis's own clock, so that the instances' clocks never disagree), and only one
//! Lua script changes it, so every decision is atomic. To spare Redis a round trip per request, an
//! instance takes allowance in batches: a lease of up to a hundredth of a second's worth of the
//! rate, which it spends locally for at most [`LEASE_LIFETIME`] and then gives back unused. Every
//! request admitted anywhere was granted by Redis at most that long before, so in any window the
//! instances together admit at most the limit's burst plus `rate × (window + 100 ms)`: at most a
//! tenth of a second's worth of requests over the limit, which is under 10% for any window of a
//! second or more. A key that Redis refuses is refused locally until its `Retry-After`, without
//! asking again.
//!
//! **Bans** are written as `PREFIX ban:ADDRESS` keys that expire with the ban, and announced on the
//! `PREFIX bans` channel; the other instances apply them as they arrive (well within a second).
//! An instance that (re)connects first reads the bans it missed, then shares its own.
//!
//! **Failure.** When a command fails or times out, the instance stops asking Redis and enforces
//! its limits alone (each instance then allows the whole limit), logs a warning and counts it;
//! it reconnects by itself and shares again as soon as Redis answers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bouncer_config::ClusterConfig;
use bouncer_rules::Gcra;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

use crate::metrics::ClusterMetrics;
use crate::protection::Protection;

/// How long an instance may spend a batch of allowance taken from Redis.
pub(crate) const LEASE_LIFETIME: Duration = Duration::from_millis(100);
/// The largest batch taken at once, whatever the rate.
pub(crate) const MAX_LEASE: u32 = 1000;
/// How often an unreachable Redis is tried again.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// How often a reachable Redis is checked when nothing else shows it is alive.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Keys read at once when catching up with the bans made elsewhere.
const SCAN_BATCH: usize = 500;

/// Takes up to `want` requests of allowance for one key, giving back `refund` unused ones first.
/// KEYS[1] holds the key's TAT in microseconds of Redis's clock. ARGV: the emission interval in
/// microseconds, the burst, `want`, `refund`, and the longest wait a request may be booked for
/// (negative: none). Answers {granted, wait in microseconds}: granted 0 is a refusal, retry after
/// the wait; granted 1 with a wait is a booking for that much later.
const LEASE_SCRIPT: &str = r"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local refund = tonumber(ARGV[4])
local max_wait = tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local stored = tonumber(redis.call('GET', KEYS[1]) or 0)
local tat = stored
if refund > 0 and tat > now then
  tat = math.max(tat - refund * interval, now)
end
if tat < now then
  tat = now
end
local tolerance = interval * (burst - 1)
local room = math.floor((now + tolerance + interval - tat) / interval + 1e-9)
local granted = math.min(want, room)
local wait = 0
if granted < 1 then
  wait = tat - tolerance - now
  if max_wait < 0 or wait > max_wait then
    if tat ~= stored then
      redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    end
    return {0, math.ceil(wait)}
  end
  granted = 1
end
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {granted, math.ceil(wait)}
";

/// Redis's answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseAnswer {
    /// `count` requests may go, the first after `wait` (non-zero only for a booked delay).
    Granted {
        count: u32,
        wait: Duration,
    },
    Refused {
        retry_after: Duration,
    },
}

/// The connection to the cluster's Redis and what goes over it.
pub struct Cluster {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    /// Tells this instance's announcements apart from the others' on the bans channel.
    instance: u64,
    /// The command connection; `None` while Redis is unreachable.
    connection: ArcSwapOption<MultiplexedConnection>,
    up: AtomicBool,
    /// Wakes the supervisor when a command fails, and waiters when Redis becomes reachable.
    failed: Notify,
    reachable: Notify,
    lease_script: redis::Script,
    metrics: ClusterMetrics,
}

impl Cluster {
    /// Reads the address; nothing is connected until [`supervise`] runs.
    pub fn new(
        config: &ClusterConfig,
        metrics: Option<ClusterMetrics>,
    ) -> Result<Arc<Cluster>, redis::RedisError> {
        Ok(Arc::new(Cluster {
            client: redis::Client::open(config.redis.as_str())?,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            instance: rand::random(),
            connection: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            failed: Notify::new(),
            reachable: Notify::new(),
            lease_script: redis::Script::new(LEASE_SCRIPT),
            metrics: metrics.unwrap_or_default(),
        }))
    }

    /// Whether Redis answers now, so that limits are shared.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Waits until Redis is reachable, at most `limit`; tells whether it is.
    pub async fn wait_until_up(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reachable = self.reachable.notified();
            if self.is_up() {
                return true;
            }
            if tokio::time::timeout_at(deadline, reachable).await.is_err() {
                return self.is_up();
            }
        }
    }

    /// How long a Redis command may take.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn count_local_decision(&self) {
        self.metrics.local_decisions.inc();
    }

    /// The Redis key of one rate-limit key: the limit's name and a digest of the key's parts.
    pub(crate) fn rate_key(&self, limit: &str, digest: &[u8]) -> String {
        let mut key = String::with_capacity(self.prefix.len() + limit.len() + 4 + 2 * digest.len());
        key.push_str(&self.prefix);
        key.push_str("rl:");
        key.push_str(limit);
        key.push(':');
        for byte in digest {
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        key
    }

    /// Asks Redis for up to `want` requests of `limit`'s allowance for `key`, giving back
    /// `refund` unused ones. `None` when Redis failed: the caller decides alone.
    pub(crate) async fn lease(
        &self,
        key: &str,
        limit: &Gcra,
        want: u32,
        refund: u32,
        max_wait: Option<Duration>,
    ) -> Option<LeaseAnswer> {
        let mut connection = MultiplexedConnection::clone(&*self.connection.load_full()?);
        self.metrics.lease_requests.inc();
        let interval = limit.emission_interval().as_secs_f64() * 1e6;
        let max_wait = max_wait.map_or(-1, |wait| {
            i64::try_from(wait.as_micros()).unwrap_or(i64::MAX)
        });
        let answer: Result<(i64, i64), _> = self
            .lease_script
            .key(key)
            .arg(interval)
            .arg(limit.burst())
            .arg(want)
            .arg(refund)
            .arg(max_wait)
            .invoke_async(&mut connection)
            .await;
        match answer {
            Ok((granted, wait)) => {
                let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
                Some(match u32::try_from(granted) {
                    Ok(count) if count > 0 => LeaseAnswer::Granted { count, wait },
                    _ => LeaseAnswer::Refused { retry_after: wait },
                })
            }
            Err(error) => {
                self.command_failed(&error);
                None
            }
        }
    }

    /// Announces a ban to the other instances (and stores it for those not connected now). A
    /// ban made while Redis is unreachable is shared when it is back.
    pub(crate) fn share_ban(self: &Arc<Self>, ip: IpAddr, ban_for: Duration) {
        let mut pipe = redis::pipe();
        self.add_ban(&mut pipe, ip, ban_for, false);
        self.send_in_background(pipe, true);
    }

    /// Announces that `ip` is no longer banned.
    pub(crate) fn share_unban(self: &Arc<Self>, ip: IpAddr) {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.ban_key(ip))
            .ignore()
            .publish(self.bans_channel(), format!("{} unban {ip}", self.instance))
            .ignore();
        self.send_in_background(pipe, false);
    }

    /// Sends `pipe` from a task of its own while Redis is reachable; a failure takes the
    /// instance off Redis until the supervisor sees it answer again.
    fn send_in_background(self: &Arc<Self>, pipe: redis::Pipeline, counts_as_ban: bool) {
        let Some(connection) = self.connection.load_full() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cluster = Arc::clone(self);
        runtime.spawn(async move {
            let mut connection = MultiplexedConnection::clone(&connection);
            match pipe.query_async::<()>(&mut connection).await {
                Ok(()) if counts_as_ban => {
                    cluster.metrics.bans_sent.inc();
                }
                Ok(()) => {}
                Err(error) => cluster.command_failed(&error),
            }
        });
    }

    /// Adds the commands that store and announce one ban to `pipe`. `keep_longer` leaves a ban
    /// already stored alone (when catching up, another instance's may run longer).
    fn add_ban(
        &self,
        pipe: &mut redis::Pipeline,
        ip: IpAddr,
        ban_for: Duration,
        keep_longer: bool,
    ) {
        let millis = u64::try_from(ban_for.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let set = pipe
            .cmd("SET")
            .arg(self.ban_key(ip))
            .arg(1)
            .arg("PX")
            .arg(millis);
        if keep_longer {
            set.arg("NX");
        }
        set.ignore();
        pipe.publish(
            self.bans_channel(),
            format!("{} ban {ip} {millis}", self.instance),
        )
        .ignore();
    }

    fn ban_key(&self, ip: IpAddr) -> String {
        format!("{}ban:{ip}", self.prefix)
    }

    fn bans_channel(&self) -> String {
        format!("{}bans", self.prefix)
    }

    fn command_failed(&self, error: &redis::RedisError) {
        self.metrics.redis_errors.inc();
        // Only the first failure of an outage is logged; the supervisor says when it is over.
        if self.set_down() {
            tracing::warn!(error = %error, "Redis failed: rate limits are enforced by each instance alone until it answers again");
        }
        self.failed.notify_one();
    }

    /// Marks Redis unreachable; tells whether it was reachable until now.
    fn set_down(&self) -> bool {
        self.connection.store(None);
        self.metrics.redis_up.set(0);
        self.up.swap(false, Ordering::AcqRel)
    }

    fn set_up(&self, connection: MultiplexedConnection) {
        self.connection.store(Some(Arc::new(connection)));
        self.metrics.redis_up.set(1);
        self.up.store(true, Ordering::Release);
        self.reachable.notify_waiters();
    }

    async fn connect(
        &self,
    ) -> Result<(MultiplexedConnection, redis::aio::PubSub), redis::RedisError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(timed_out)??;
        tokio::time::timeout(self.timeout, pubsub.subscribe(self.bans_channel()))
            .await
            .map_err(timed_out)??;
        Ok((connection, pubsub))
    }

    /// Reads the bans stored in Redis into `protection`, then stores and announces its own.
    async fn catch_up(
        &self,
        connection: &mut MultiplexedConnection,
        protection: &Protection,
    ) -> Result<(), redis::RedisError> {
        let pattern = format!("{}ban:*", self.prefix);
        let key_prefix_len = self.prefix.len() + "ban:".len();
        let mut cursor: u64 = 0;
        let mut seen = 0usize;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .query_async(connection)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.pttl(key);
                }
                let ttls: Vec<i64> = pipe.query_async(connection).await?;
                for (key, ttl) in keys.iter().zip(ttls) {
                    let address = key.get(key_prefix_len..).and_then(|ip| ip.parse().ok());
                    if let (Some(ip), Ok(ttl)) = (address, u64::try_from(ttl))
                        && ttl > 0
                    {
                        protection.apply_shared_ban(ip, Duration::from_millis(ttl));
                    }
                }
            }
            seen += keys.len();
            cursor = next;
            if cursor == 0 || seen >= protection.max_tracked_keys() {
                break;
            }
        }
        let own = protection.bans();
        for chunk in own.chunks(SCAN_BATCH) {
            let mut pipe = redis::pipe();
            for (ip, left) in chunk {
                self.add_ban(&mut pipe, *ip, *left, true);
            }
            pipe.query_async::<()>(connection).await?;
        }
        Ok(())
    }

    /// Applies one announcement from the bans channel (others' only; malformed ones ignored).
    fn apply_message(&self, payload: &str, protection: &Protection) {
        let mut words = payload.split(' ');
        let (Some(sender), Some(kind), Some(address)) = (words.next(), words.next(), words.next())
        else {
            return;
        };
        if sender.parse::<u64>().ok() == Some(self.instance) {
            return;
        }
        let Ok(ip) = address.parse::<IpAddr>() else {
            return;
        };
        match (kind, words.next().map(str::parse::<u64>)) {
            ("ban", Some(Ok(millis))) if millis > 0 => {
                if protection.apply_shared_ban(ip, Duration::from_millis(millis)) {
                    self.metrics.bans_received.inc();
                }
            }
            ("unban", None) => protection.apply_shared_unban(ip),
            _ => tracing::debug!(payload, "ignored a malformed message on the bans channel"),
        }
    }

    async fn ping(&self, connection: &mut MultiplexedConnection) -> bool {
        redis::cmd("PING")
            .query_async::<()>(connection)
            .await
            .is_ok()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn timed_out(_: tokio::time::error::Elapsed) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// Keeps the instance connected to Redis while `protection` exists: connects (again), catches
/// up with the bans, applies the others' announcements, and notices when Redis goes away.
pub(crate) async fn supervise(cluster: Arc<Cluster>, protection: Weak<Protection>) {
    let mut failures_logged = false;
    loop {
        if protection.strong_count() == 0 {
            return;
        }
        match cluster.connect().await {
            Ok((mut connection, pubsub)) => {
                let caught_up = match protection.upgrade() {
                    Some(protection) => cluster.catch_up(&mut connection, &protection).await,
                    None => return,
                };
                match caught_up {
                    Ok(()) => {
                        cluster.set_up(connection.clone());
                        tracing::info!(
                            "Redis reachable: rate limits and bans are shared with the other instances"
                        );
                        cluster.serve(connection, pubsub, &protection).await;
                        if cluster.set_down() {
                            tracing::warn!(
                                "Redis unreachable: rate limits are enforced by each instance alone until it answers again"
                            );
                        }
                        // The outage is logged; failed reconnections are not logged again.
                        failures_logged = true;
                    }
                    Err(error) => {
                        cluster.metrics.redis_errors.inc();
                        tracing::warn!(error = %error, "could not read the bans stored in Redis");
                    }
                }
            }
            Err(error) => {
                cluster.metrics.redis_errors.inc();
                if !failures_logged {
                    failures_logged = true;
                    tracing::warn!(error = %error, "cannot reach Redis: rate limits are enforced by each instance alone; trying again every {RECONNECT_INTERVAL:?}");
                }
            }
        }
        tokio::time::sleep(RECONNECT_INTERVAL).await;
    }
}

impl Cluster {
    /// Runs while Redis is reachable: applies announcements and checks health.
    async fn serve(
        &self,
        mut connection: MultiplexedConnection,
        pubsub: redis::aio::PubSub,
        protection: &Weak<Protection>,
    ) {
        let mut messages = pubsub.into_on_message();
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        return;
                    };
                    let Some(protection) = protection.upgrade() else {
                        return;
                    };
                    match std::str::from_utf8(message.get_payload_bytes()) {
                        Ok(payload) => self.apply_message(payload, &protection),
                        Err(_) => tracing::debug!("ignored a message on the bans channel that is not UTF-8"),
                    }
                }
                () = self.failed.notified() => {
                    if !self.ping(&mut connection).await {
                        return;
                    }
                    // A passing failure: Redis answers, so sharing goes on.
                    self.set_up(connection.clone());
                    tracing::info!("Redis answers again: rate limits and bans are shared");
                }
                _ = health.tick() => {
                    if protection.strong_count() == 0 || !self.ping(&mut connection).await {
                        return;
                    }
                }
            }
        }
    }
}
