//! The choice of backend for each request: smooth weighted round robin, least connections, peak
//! EWMA (power of two choices), weighted random, and consistent hashing over a Maglev table.
//! Backups are chosen only when no primary is available.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::net::IpAddr;

use bouncer_config::{Balance, HashKey};

/// What a balancer needs to know about one backend. Weight and backup may change on a reload, so
/// they are atomics like the rest.
pub struct BackendLoad {
    weight: AtomicU32,
    backup: AtomicBool,
    /// Requests sent to the backend and not yet answered in full, across every worker thread.
    pub in_flight: AtomicU32,
    latency: Mutex<PeakEwma>,
    epoch: Instant,
    /// When the backend's slow start began, in milliseconds since `epoch`; [`NOT_RAMPING`] once
    /// it has its full share.
    ramp_started_ms: AtomicU64,
    /// A moving average of response times in microseconds, for operators (0 before any).
    recent_latency_us: AtomicU64,
}

const NOT_RAMPING: u64 = u64::MAX;

/// The share a backend starts its slow start with, so that it is tried at once.
const RAMP_FLOOR: f64 = 0.1;

/// Weights are scaled by this for the integer arithmetic of smooth round robin, so that a
/// ramping backend's fraction of a weight still counts.
const WEIGHT_SCALE: f64 = 1000.0;

impl BackendLoad {
    pub fn new(weight: u32, backup: bool) -> Self {
        Self {
            weight: AtomicU32::new(weight.max(1)),
            backup: AtomicBool::new(backup),
            in_flight: AtomicU32::new(0),
            latency: Mutex::new(PeakEwma::new()),
            epoch: Instant::now(),
            ramp_started_ms: AtomicU64::new(NOT_RAMPING),
            recent_latency_us: AtomicU64::new(0),
        }
    }

    /// Folds one response time into the operators' average: each new one weighs an eighth. A
    /// race between two threads loses one sample, which an average for display can afford.
    pub fn record_response_time(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let old = self.recent_latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.recent_latency_us.store(new, Ordering::Relaxed);
    }

    /// The recent average response time; `None` before the first response.
    pub fn recent_latency(&self) -> Option<Duration> {
        match self.recent_latency_us.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    /// Takes a reloaded config's weight and role.
    pub fn set_role(&self, weight: u32, backup: bool) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
        self.backup.store(backup, Ordering::Relaxed);
    }

    /// Starts a slow start at `at` (which may lie ahead, at the end of an ejection).
    pub fn start_ramp(&self, at: Instant) {
        let millis = at.saturating_duration_since(self.epoch).as_millis();
        self.ramp_started_ms.store(
            u64::try_from(millis).unwrap_or(NOT_RAMPING - 1),
            Ordering::Relaxed,
        );
    }

    /// The weight at `now`: the configured one, or during a slow start a share of it that grows
    /// linearly from a tenth to all of it over `slow_start`.
    pub fn weight_at(&self, now: Instant, slow_start: Duration) -> f64 {
        let weight = f64::from(self.weight());
        let started = self.ramp_started_ms.load(Ordering::Relaxed);
        if started == NOT_RAMPING || slow_start.is_zero() {
            return weight;
        }
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(NOT_RAMPING - 1);
        let ramp_ms = u64::try_from(slow_start.as_millis()).unwrap_or(u64::MAX);
        let elapsed = now_ms.saturating_sub(started);
        if now_ms >= started && elapsed >= ramp_ms {
            // Done: later picks skip the arithmetic, unless a new ramp began meanwhile.
            let _ = self.ramp_started_ms.compare_exchange(
                started,
                NOT_RAMPING,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return weight;
        }
        let share = (elapsed as f64 / ramp_ms as f64).max(RAMP_FLOOR);
        weight * share
    }

    /// Records how long the backend took to answer.
    pub fn observe_latency(&self, latency: Duration, now: Instant) {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(latency, now);
    }

    /// The peak-EWMA latency now, in seconds.
    #[cfg(test)]
    pub fn latency_estimate(&self, now: Instant) -> f64 {
        self.latency
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .estimate(now)
    }

    /// Expected cost of one more request: latency times the load it would join, per unit weight.
    fn cost(&self, input: &PickInput) -> f64 {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let latency = {
            let ewma = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
            // Without answers the estimate decays, but not while requests are pending: a
            // backend that stalls must not look fast for having answered nothing lately.
            if in_flight > 0 {
                ewma.seconds
            } else {
                ewma.estimate(input.now)
            }
        };
        latency * (f64::from(in_flight) + 1.0) / self.weight_at(input.now, input.slow_start)
    }
}

/// Gives a balancer the [`BackendLoad`] of whatever the upstream keeps per backend.
pub trait HasLoad {
    fn load(&self) -> &BackendLoad;
}

impl HasLoad for BackendLoad {
    fn load(&self) -> &BackendLoad {
        self
    }
}

/// A moving average of latency that jumps to a new peak at once and decays towards faster answers
/// over [`PeakEwma::DECAY`], so that a backend turning slow is avoided straight away.
#[derive(Debug)]
struct PeakEwma {
    seconds: f64,
    stamp: Option<Instant>,
}

impl PeakEwma {
    const DECAY: Duration = Duration::from_secs(10);
    /// What a backend with no answers yet is assumed to take.
    const DEFAULT: Duration = Duration::from_millis(5);

    fn new() -> Self {
        Self {
            seconds: Self::DEFAULT.as_secs_f64(),
            stamp: None,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        match self.stamp {
            None => self.seconds,
            Some(stamp) => {
                let elapsed = now.saturating_duration_since(stamp).as_secs_f64();
                // Decay is towards zero, so that a backend avoided for being slow (and so getting
                // no new samples) is tried again after a while: after about 50 s for 100 ms.
                self.seconds * (-elapsed / Self::DECAY.as_secs_f64()).exp()
            }
        }
    }

    fn observe(&mut self, latency: Duration, now: Instant) {
        let sample = latency.as_secs_f64();
        let current = self.decayed(now);
        self.seconds = if sample > current {
            sample
        } else {
            let elapsed = self.stamp.map_or(0.0, |stamp| {
                now.saturating_duration_since(stamp).as_secs_f64()
            });
            // A sample counts more the longer ago the last one was.
            let keep = (-elapsed / Self::DECAY.as_secs_f64()).exp().min(0.9);
            current * keep + sample * (1.0 - keep)
        };
        self.stamp = Some(now);
    }

    fn estimate(&self, now: Instant) -> f64 {
        self.decayed(now)
    }
}

/// The per-upstream state of the chosen algorithm.
pub struct Balancer {
    algorithm: Balance,
    /// Round-robin position for equal weights, and the tie-breaker of least connections.
    next: AtomicUsize,
    /// Smooth weighted round robin's running weights, when weights differ.
    smooth: Option<Mutex<Vec<i64>>>,
    maglev: Option<Maglev>,
}

/// The request facts a balancer may use.
pub struct PickInput {
    /// A hash of the configured key, for `consistent_hash`.
    pub key_hash: Option<u64>,
    /// A random number, for `random` and `peak_ewma`.
    pub random: u64,
    pub now: Instant,
    /// The upstream's slow-start time (zero for none).
    pub slow_start: Duration,
}

impl Balancer {
    /// `names` are stable backend names (their addresses), which place them in the hash table.
    /// Weighted round robin is used when weights differ now or may differ later (slow start).
    pub fn new<B: HasLoad, N: AsRef<str>>(
        algorithm: Balance,
        backends: &[B],
        names: &[N],
        slow_start: Duration,
    ) -> Self {
        let weights_differ = backends
            .windows(2)
            .any(|pair| pair[0].load().weight() != pair[1].load().weight());
        Self {
            algorithm,
            next: AtomicUsize::new(0),
            smooth: (algorithm == Balance::RoundRobin && (weights_differ || !slow_start.is_zero()))
                .then(|| Mutex::new(vec![0; backends.len()])),
            maglev: (algorithm == Balance::ConsistentHash).then(|| {
                let weights: Vec<u32> = backends
                    .iter()
                    .map(|backend| backend.load().weight())
                    .collect();
                Maglev::new(names, &weights)
            }),
        }
    }

    /// Whether a pick will use `PickInput::random`, so that it is drawn only when needed.
    pub fn uses_random(&self, key_hash: Option<u64>) -> bool {
        match self.algorithm {
            Balance::Random | Balance::PeakEwma => true,
            Balance::ConsistentHash => key_hash.is_none(),
            Balance::RoundRobin | Balance::LeastConnections => false,
        }
    }

    /// Picks a backend among those `available` says may take a request: a primary when any is,
    /// else a backup. `None` when none is available.
    pub fn pick<B: HasLoad>(
        &self,
        backends: &[B],
        available: impl Fn(usize) -> bool,
        input: &PickInput,
    ) -> Option<usize> {
        let primary = |index: usize| !backends[index].load().backup() && available(index);
        if (0..backends.len()).any(primary) {
            return self.pick_among(backends, &primary, input);
        }
        let backup = |index: usize| backends[index].load().backup() && available(index);
        self.pick_among(backends, &backup, input)
    }

    fn pick_among<B: HasLoad>(
        &self,
        backends: &[B],
        eligible: &dyn Fn(usize) -> bool,
        input: &PickInput,
    ) -> Option<usize> {
        let count = backends.len();
        if count == 0 {
            return None;
        }
        match self.algorithm {
            Balance::RoundRobin => match &self.smooth {
                Some(current) => smooth_weighted(backends, current, eligible, input),
                None => {
                    let start = self.next.fetch_add(1, Ordering::Relaxed);
                    (0..count)
                        .map(|offset| (start + offset) % count)
                        .find(|&index| eligible(index))
                }
            },
            Balance::LeastConnections => {
                let load = |index: usize| {
                    let backend = backends[index].load();
                    f64::from(backend.in_flight.load(Ordering::Relaxed))
                        / backend.weight_at(input.now, input.slow_start)
                };
                let mut least = f64::INFINITY;
                let mut ties = 0usize;
                for index in (0..count).filter(|&index| eligible(index)) {
                    let load = load(index);
                    if load < least {
                        least = load;
                        ties = 1;
                    } else if load == least {
                        ties += 1;
                    }
                }
                if ties == 0 {
                    return None;
                }
                // Ties go in turn among the tied backends, so that an idle fleet is not served by
                // its first backend, nor the backend after a busy one favoured.
                let turn = self.next.fetch_add(1, Ordering::Relaxed) % ties;
                (0..count)
                    .filter(|&index| eligible(index) && load(index) == least)
                    .nth(turn)
                    // Loads moved between the two passes: the least loaded now.
                    .or_else(|| {
                        (0..count)
                            .filter(|&index| eligible(index))
                            .min_by(|&a, &b| load(a).total_cmp(&load(b)))
                    })
            }
            Balance::Random => weighted_random(backends, eligible, input),
            Balance::PeakEwma => {
                // Power of two choices: two distinct random candidates, the cheaper one wins.
                let candidates: Vec<usize> = (0..count).filter(|&index| eligible(index)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    n => {
                        let first = (input.random % n as u64) as usize;
                        let second =
                            (first + 1 + ((input.random >> 32) % (n as u64 - 1)) as usize) % n;
                        let (a, b) = (candidates[first], candidates[second]);
                        if backends[a].load().cost(input) <= backends[b].load().cost(input) {
                            Some(a)
                        } else {
                            Some(b)
                        }
                    }
                }
            }
            Balance::ConsistentHash => {
                let maglev = self.maglev.as_ref()?;
                let hash = input.key_hash.unwrap_or(input.random);
                maglev.lookup(hash, eligible)
            }
        }
    }
}

/// nginx's smooth weighted round robin: every pick adds each backend's weight to its running
/// weight and takes the highest, which then gives back the total. Weights 5, 1, 1 give
/// a a b a c a a: the heavy backend's share is spread out, never a burst.
fn smooth_weighted<B: HasLoad>(
    backends: &[B],
    current: &Mutex<Vec<i64>>,
    eligible: &dyn Fn(usize) -> bool,
    input: &PickInput,
) -> Option<usize> {
    let mut current = current.lock().unwrap_or_else(PoisonError::into_inner);
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (index, backend) in backends.iter().enumerate() {
        if !eligible(index) {
            continue;
        }
        let weight = (backend.load().weight_at(input.now, input.slow_start) * WEIGHT_SCALE) as i64;
        current[index] += weight.max(1);
        total += weight.max(1);
        if best.is_none_or(|chosen| current[index] > current[chosen]) {
            best = Some(index);
        }
    }
    let chosen = best?;
    current[chosen] -= total;
    Some(chosen)
}

fn weighted_random<B: HasLoad>(
    backends: &[B],
    eligible: &dyn Fn(usize) -> bool,
    input: &PickInput,
) -> Option<usize> {
    let weight_of = |backend: &B| {
        ((backend.load().weight_at(input.now, input.slow_start) * WEIGHT_SCALE) as u64).max(1)
    };
    let total: u64 = (0..backends.len())
        .filter(|&index| eligible(index))
        .map(|index| weight_of(&backends[index]))
        .sum();
    if total == 0 {
        return None;
    }
    let mut point = input.random % total;
    for (index, backend) in backends.iter().enumerate() {
        if !eligible(index) {
            continue;
        }
        let weight = weight_of(backend);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table in which every backend
/// owns a share of the slots in proportion to its weight. Removing one of N backends moves about
/// 1/N of the keys, and lookups are one array access.
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// A prime well above the backend count times the largest weight keeps the shares even.
    const TABLE_SIZE: usize = 65_537;

    pub fn new<N: AsRef<str>>(names: &[N], weights: &[u32]) -> Self {
        let size = Self::TABLE_SIZE;
        if names.is_empty() {
            return Self { table: Vec::new() };
        }
        let permutations: Vec<(usize, usize)> = names
            .iter()
            .map(|name| {
                let name = name.as_ref().as_bytes();
                let offset = (stable_hash(name, 0x6d61_676c) % size as u64) as usize;
                let skip = (stable_hash(name, 0x736b_6970) % (size as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; names.len()];
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (index, &(offset, skip)) in permutations.iter().enumerate() {
                // A backend of weight w claims w slots per round.
                for _ in 0..weights.get(index).copied().unwrap_or(1).max(1) {
                    let mut slot = (offset + next[index] * skip) % size;
                    while table[slot] != u32::MAX {
                        next[index] += 1;
                        slot = (offset + next[index] * skip) % size;
                    }
                    table[slot] = index as u32;
                    next[index] += 1;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Self { table }
    }

    /// The backend for `hash`; when it is not eligible, the key is hashed again (up to a bound)
    /// so that only the keys of the missing backend move, then the first eligible one is taken.
    pub fn lookup(&self, hash: u64, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let mut hash = hash;
        for _ in 0..32 {
            let index = self.table[(hash % self.table.len() as u64) as usize] as usize;
            if eligible(index) {
                return Some(index);
            }
            hash = mix(hash.wrapping_add(0x9e37_79b9_7f4a_7c15));
        }
        let backends = self
            .table
            .iter()
            .copied()
            .max()
            .map_or(0, |max| max as usize + 1);
        (0..backends).find(|&index| eligible(index))
    }
}

/// The hash of a request's consistent-hash key; `None` when the request lacks it (no such header or
/// cookie), and then the request is placed at random, as HAProxy does.
pub fn request_key_hash(
    key: &HashKey,
    client: IpAddr,
    headers: &http::HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match client {
            IpAddr::V4(v4) => stable_hash(&v4.octets(), 0),
            IpAddr::V6(v6) => stable_hash(&v6.octets(), 0),
        }),
        HashKey::Header(name) => headers
            .get(name.as_str())
            .map(|value| stable_hash(value.as_bytes(), 0)),
        HashKey::Cookie(name) => cookie_value(headers, name).map(|value| stable_hash(value, 0)),
        HashKey::Path => Some(stable_hash(path.as_bytes(), 0)),
        HashKey::Uri => {
            let hash = stable_hash(path.as_bytes(), 0);
            Some(match query {
                Some(query) => stable_hash(query.as_bytes(), hash),
                None => hash,
            })
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let (found, value) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            (found == name.as_bytes()).then(|| value[1..].trim_ascii())
        })
}

/// FNV-1a over the bytes, then a finaliser for even spread. Stable across processes and builds,
/// so that every Bouncer instance maps a key to the same backend.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(hash)
}

/// splitmix64's finaliser.
fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests;
