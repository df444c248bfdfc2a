//! The decisions of a shared cache (RFC 9111): may a response be stored (section 3), for how long
//! is it fresh (section 4.2), how old is it (section 4.2.3), and may it answer a request as it is,
//! stale, or only after revalidation (sections 4.2.4 and 5.2.1, RFC 5861).

use std::time::{Duration, SystemTime};

use http::header::{AUTHORIZATION, DATE, ETAG, EXPIRES, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, Method, StatusCode};

use crate::cache_control::{MaxStale, RequestDirectives, ResponseDirectives, delta_seconds};
use crate::vary::{VaryError, vary_fields};

/// The share of the time since `Last-Modified` that a heuristic freshness lifetime takes
/// (RFC 9111 section 4.2.2 suggests 10%).
const HEURISTIC_SHARE: u32 = 10;
/// The longest heuristic freshness: a file untouched for years is not fresh for a month.
pub const HEURISTIC_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// Status codes whose responses may be given a heuristic lifetime (RFC 9110 section 15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose caching semantics this cache knows: those RFC 9110 defines
/// (for `must-understand`, RFC 9111 section 5.2.2.3).
pub fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        100..=101 | 200..=206 | 300..=305 | 307..=308 | 400..=417 | 421..=422 | 426 | 500..=505
    )
}

/// Why a response is not stored. The detail names go into `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// Only responses to GET are stored.
    Method,
    /// A non-final, partial (206) or 304 response.
    Status,
    /// `no-store` in the request.
    RequestNoStore,
    /// `no-store` in the response.
    NoStore,
    /// `private`: for one user only.
    Private,
    /// A request with `Authorization`, and no `public`, `s-maxage` or `must-revalidate`.
    Authorization,
    /// `Set-Cookie`, which is per client, and the route does not allow storing it.
    SetCookie,
    /// `Vary: *` (or an unreadable `Vary`): no later request can match it.
    Vary,
    /// `must-understand` with a status code this cache does not know.
    MustUnderstand,
    /// Neither a freshness lifetime nor a validator: it could never be reused.
    NoFreshness,
}

impl NotStorable {
    /// A token for `Cache-Status`'s `detail` parameter.
    pub fn detail(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::Status => "status",
            NotStorable::RequestNoStore => "request-no-store",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::Vary => "vary",
            NotStorable::MustUnderstand => "must-understand",
            NotStorable::NoFreshness => "no-freshness",
        }
    }
}

/// What the operator allows beyond the RFC's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Store responses that carry `Set-Cookie` (off by default: cookies are per client).
    pub store_set_cookie: bool,
    /// The freshness lifetime of a response that states none, used instead of the heuristic
    /// (`None` or zero: the heuristic, for the status codes that allow one).
    pub default_ttl: Option<Duration>,
}

/// The request and the response a storage decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    pub method: &'a Method,
    pub request_headers: &'a HeaderMap,
    pub status: StatusCode,
    pub response_headers: &'a HeaderMap,
}

/// Whether a shared cache may store the response, received at `received` (RFC 9111 section 3).
pub fn may_store(
    exchange: &Exchange<'_>,
    request: &RequestDirectives,
    response: &ResponseDirectives,
    options: &StoreOptions,
    received: SystemTime,
) -> Result<(), NotStorable> {
    if exchange.method != Method::GET {
        return Err(NotStorable::Method);
    }
    let status = exchange.status;
    if status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Err(NotStorable::Status);
    }
    if request.no_store {
        return Err(NotStorable::RequestNoStore);
    }
    // `must-understand` lets a cache that knows the status code ignore `no-store` (sent with it
    // for caches that do not know the directive); one that does not know the code stores nothing.
    if response.must_understand {
        if !understood(status) {
            return Err(NotStorable::MustUnderstand);
        }
    } else if response.no_store {
        return Err(NotStorable::NoStore);
    }
    if response.private {
        return Err(NotStorable::Private);
    }
    if exchange.request_headers.contains_key(AUTHORIZATION)
        && !(response.public || response.must_revalidate || response.s_maxage.is_some())
    {
        return Err(NotStorable::Authorization);
    }
    if !options.store_set_cookie && exchange.response_headers.contains_key(SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    if let Err(VaryError::Star | VaryError::Unreadable) = vary_fields(exchange.response_headers) {
        return Err(NotStorable::Vary);
    }
    let explicit = response.max_age.is_some()
        || response.s_maxage.is_some()
        || exchange.response_headers.contains_key(EXPIRES);
    let default_ttl = options.default_ttl.filter(|ttl| !ttl.is_zero());
    let heuristic = heuristically_cacheable(status)
        && (exchange.response_headers.contains_key(LAST_MODIFIED) || default_ttl.is_some());
    let validated = exchange.response_headers.contains_key(ETAG)
        || exchange.response_headers.contains_key(LAST_MODIFIED);
    if !(explicit || heuristic || response.public) {
        return Err(NotStorable::NoFreshness);
    }
    // Stored only to be revalidated each time: worth it only with a validator to revalidate by.
    let lifetime = lifetime_of(
        status,
        exchange.response_headers,
        response,
        options.default_ttl,
        received,
    )
    .0;
    if lifetime.is_zero() && !validated {
        return Err(NotStorable::NoFreshness);
    }
    Ok(())
}

/// What a cache keeps about a stored response's age and freshness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freshness {
    /// When the request that brought the response was sent, and when the response arrived.
    pub request_time: SystemTime,
    pub response_time: SystemTime,
    /// The response's age when it arrived (RFC 9111 section 4.2.3).
    pub corrected_initial_age: Duration,
    /// How long it stays fresh (section 4.2.1).
    pub lifetime: Duration,
    /// Whether the lifetime is the heuristic one (section 4.2.2).
    pub heuristic: bool,
    pub directives: ResponseDirectives,
}

impl Freshness {
    /// The freshness of a response with `headers`, requested at `request_time` and received at
    /// `response_time`.
    pub fn new(
        status: StatusCode,
        headers: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        default_ttl: Option<Duration>,
    ) -> Freshness {
        let directives = ResponseDirectives::parse(headers);
        let (lifetime, heuristic) =
            lifetime_of(status, headers, &directives, default_ttl, response_time);
        Freshness {
            request_time,
            response_time,
            corrected_initial_age: corrected_initial_age(headers, request_time, response_time),
            lifetime,
            heuristic,
            directives,
        }
    }

    /// The response's age at `now` (RFC 9111 section 4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        let resident = now
            .duration_since(self.response_time)
            .unwrap_or(Duration::ZERO);
        self.corrected_initial_age.saturating_add(resident)
    }

    /// Whether it is fresh at `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        self.lifetime > self.age(now)
    }

    /// How long it has been stale at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_sub(self.lifetime)
    }

    /// Seconds of freshness left at `now`, negative once stale (`Cache-Status`'s `ttl`).
    pub fn ttl_seconds(&self, now: SystemTime) -> i64 {
        let age = self.age(now);
        let seconds = |duration: Duration| i64::try_from(duration.as_secs()).unwrap_or(i64::MAX);
        if self.lifetime >= age {
            seconds(self.lifetime - age)
        } else {
            -seconds(age - self.lifetime)
        }
    }
}

/// The freshness lifetime for a shared cache (RFC 9111 section 4.2.1): `s-maxage`, else
/// `max-age`, else `Expires` minus `Date`, else the operator's default or the heuristic. Whether
/// it is heuristic comes second. The time it was `received` stands in for a missing `Date`.
fn lifetime_of(
    status: StatusCode,
    headers: &HeaderMap,
    directives: &ResponseDirectives,
    default_ttl: Option<Duration>,
    received: SystemTime,
) -> (Duration, bool) {
    if let Some(s_maxage) = directives.s_maxage {
        return (s_maxage, false);
    }
    if let Some(max_age) = directives.max_age {
        return (max_age, false);
    }
    let date = header_date(headers, DATE).unwrap_or(received);
    if headers.contains_key(EXPIRES) {
        // An invalid Expires, "0" above all, is a time in the past (section 5.3); so is a second
        // Expires line (section 4.2.1).
        let expires = match headers.get_all(EXPIRES).iter().count() {
            1 => header_date(headers, EXPIRES),
            _ => None,
        };
        let lifetime = expires
            .and_then(|expires| expires.duration_since(date).ok())
            .unwrap_or_default();
        return (lifetime, false);
    }
    if !heuristically_cacheable(status) {
        return (Duration::ZERO, false);
    }
    if let Some(ttl) = default_ttl.filter(|ttl| !ttl.is_zero()) {
        return (ttl, false);
    }
    let last_modified = header_date(headers, LAST_MODIFIED);
    match last_modified {
        Some(last_modified) => {
            let unchanged = date.duration_since(last_modified).unwrap_or_default();
            ((unchanged / HEURISTIC_SHARE).min(HEURISTIC_MAX), true)
        }
        None => (Duration::ZERO, false),
    }
}

/// The age of a response when it arrived (RFC 9111 section 4.2.3): the larger of what its `Date`
/// says and what its `Age` says plus the round trip.
fn corrected_initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent_age = header_date(headers, DATE)
        .and_then(|date| response_time.duration_since(date).ok())
        .unwrap_or_default();
    let age_value = headers
        .get(http::header::AGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| delta_seconds(value.trim()))
        .unwrap_or_default();
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or_default();
    apparent_age.max(age_value.saturating_add(response_delay))
}

/// A header's HTTP-date (RFC 9110 section 5.6.7: IMF-fixdate, RFC 850 or asctime form).
pub fn header_date(headers: &HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

/// How a stored response may answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh: answer from the cache.
    Fresh,
    /// Stale, but the request accepts it (`max-stale`): answer from the cache.
    StaleAccepted,
    /// Stale within `stale-while-revalidate`: answer from the cache and refresh it in the
    /// background (RFC 5861 section 3).
    StaleWhileRevalidate,
    /// Ask the backend first, with the stored validators.
    Revalidate,
}

/// May the stored response answer this request, and how (RFC 9111 sections 4.2.4 and 5.2)?
pub fn reuse(freshness: &Freshness, request: &RequestDirectives, now: SystemTime) -> Reuse {
    let response = &freshness.directives;
    if response.no_cache || request.no_cache {
        return Reuse::Revalidate;
    }
    let age = freshness.age(now);
    if request.max_age.is_some_and(|max_age| age > max_age) {
        return Reuse::Revalidate;
    }
    let left = freshness.lifetime.saturating_sub(age);
    let fresh = freshness.lifetime > age;
    if fresh && request.min_fresh.is_none_or(|min_fresh| left >= min_fresh) {
        return Reuse::Fresh;
    }
    if response.forbids_stale() {
        return Reuse::Revalidate;
    }
    let staleness = freshness.staleness(now);
    if !fresh {
        match request.max_stale {
            Some(MaxStale::Any) => return Reuse::StaleAccepted,
            Some(MaxStale::Up(limit)) if staleness <= limit => return Reuse::StaleAccepted,
            _ => {}
        }
        if response
            .stale_while_revalidate
            .is_some_and(|window| staleness <= window)
        {
            return Reuse::StaleWhileRevalidate;
        }
    }
    Reuse::Revalidate
}

/// Whether a stale response may answer when the backend fails or answers 500, 502, 503 or 504
/// (RFC 5861 section 4): within the response's or the request's `stale-if-error` window, unless
/// the response forbids stale use.
pub fn may_serve_stale_on_error(
    freshness: &Freshness,
    request: &RequestDirectives,
    now: SystemTime,
) -> bool {
    let response = &freshness.directives;
    if response.forbids_stale() || response.no_cache {
        return false;
    }
    let window = response
        .stale_if_error
        .into_iter()
        .chain(request.stale_if_error)
        .max();
    window.is_some_and(|window| freshness.staleness(now) <= window)
}

/// Whether a backend's status counts as an error for `stale-if-error`.
pub fn is_error_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}
