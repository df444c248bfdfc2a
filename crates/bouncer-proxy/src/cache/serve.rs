//! A cacheable request's path: answer from the cache when the policy allows, wait on another
//! request's fill for the same key, or fetch from the backend (revalidating a stale copy), store
//! what may be stored, and say what happened in `Cache-Status`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bouncer_cache_policy::validation::{
    freshen, is_storable_field, not_modified, not_modified_headers, revalidation_headers,
    selects_stored,
};
use bouncer_cache_policy::{
    CacheStatus, Exchange as PolicyExchange, Forward, Freshness, KeyInput, NotStorable,
    RangeAnswer, RequestDirectives, ResponseDirectives, Reuse, invalidate, is_error_status,
    may_serve_stale_on_error, may_store, range, reuse, vary_fields,
};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Body as _;

use super::fill::{Fill, FillHead, StoreJob, Wait, pump};
use super::{Cache, FillReader, Lookup, RouteCache, Variant, variant_key};
use crate::body::{RequestBody, ResponseBody, UpstreamBody};
use crate::error::ProxyError;
use crate::pipeline::{Attempt, Dispatch, send_to_backend};
use crate::pool::Lease;

/// The name this cache gives itself in `Cache-Status`.
const CACHE_NAME: &str = "Bouncer";

/// Which stored object a request is about.
pub(crate) struct CacheRequest {
    pub key: Arc<str>,
    pub host: Arc<str>,
    pub path: Arc<str>,
    /// The client's method: GET or HEAD (a HEAD is filled with a GET).
    pub method: Method,
}

/// An answer made by the cache.
pub(crate) struct CacheAnswer {
    pub parts: http::response::Parts,
    pub body: CacheBody,
}

pub(crate) enum CacheBody {
    Bytes(Bytes),
    Fill(FillReader),
}

/// What the cache made of a request: its own answer, or the backend's to pass on as it is.
pub(crate) enum Served {
    Answer(CacheAnswer),
    Backend {
        response: Response<UpstreamBody>,
        lease: Lease,
        cache_status: HeaderValue,
    },
}

/// The answer from memory to a GET or HEAD whose stored response may be used as it is, if there
/// is one; everything else (misses, stale copies, disk) goes through [`serve`].
pub(crate) fn fresh_hit(
    route: &RouteCache,
    key: &str,
    headers: &HeaderMap,
    method: &Method,
) -> Option<CacheAnswer> {
    let cache = &route.cache;
    if cache.is_pass(key) {
        return None;
    }
    let Lookup::Found(variant) = cache.lookup(key, headers) else {
        return None;
    };
    let now = SystemTime::now();
    match reuse(&variant.freshness, &RequestDirectives::parse(headers), now) {
        Reuse::Fresh | Reuse::StaleAccepted => {
            route.metrics.hit.inc();
            Some(hit(&variant, headers, method, None, false))
        }
        Reuse::StaleWhileRevalidate | Reuse::Revalidate => None,
    }
}

/// Answers a GET or HEAD on a caching route.
pub(crate) async fn serve(
    route: &RouteCache,
    dispatch: &Dispatch<'_>,
    attempt: &mut Attempt,
    request: Request<RequestBody>,
    target: CacheRequest,
) -> Result<Served, ProxyError> {
    let cache = &route.cache;
    let request_cc = RequestDirectives::parse(request.headers());
    let now = SystemTime::now();
    if cache.is_pass(&target.key) {
        route.metrics.pass.inc();
        return pass_through(
            dispatch,
            attempt,
            request,
            CacheStatus {
                forward: Some(Forward::Miss),
                detail: Some("pass".into()),
                ..CacheStatus::default()
            },
        )
        .await;
    }
    let mut lookup = cache.lookup(&target.key, request.headers());
    if !matches!(lookup, Lookup::Found(_))
        && let Some(variant) = cache
            .load_from_disk(&target.key, request.headers(), &route.metrics.store)
            .await
    {
        lookup = Lookup::Found(variant);
    }
    let (stale, forward) = match lookup {
        Lookup::Found(variant) => match reuse(&variant.freshness, &request_cc, now) {
            Reuse::Fresh | Reuse::StaleAccepted => {
                route.metrics.hit.inc();
                return Ok(Served::Answer(hit(
                    &variant,
                    request.headers(),
                    &target.method,
                    None,
                    false,
                )));
            }
            Reuse::StaleWhileRevalidate => {
                route.metrics.stale.inc();
                refresh_in_background(route, dispatch, &request, &target, &variant);
                return Ok(Served::Answer(hit(
                    &variant,
                    request.headers(),
                    &target.method,
                    Some("stale-while-revalidate"),
                    false,
                )));
            }
            Reuse::Revalidate => {
                let forward = if variant.freshness.is_fresh(now) {
                    Forward::Request
                } else {
                    Forward::Stale
                };
                (Some(variant), forward)
            }
        },
        Lookup::VaryMiss => (None, Forward::VaryMiss),
        Lookup::UriMiss => (None, Forward::UriMiss),
    };
    if request_cc.only_if_cached {
        // RFC 9111 section 5.2.1.7: nothing usable is stored, and the backend may not be asked.
        return Ok(Served::Answer(gateway_timeout()));
    }

    let (fill, leader) = cache.join_or_lead(&target.key);
    if !leader {
        route.metrics.coalesced.inc();
        let deadline = tokio::time::Instant::now() + cache.lock_timeout;
        match fill.wait(request.headers(), deadline).await {
            Wait::Stream(head, reader) => {
                let status = CacheStatus {
                    forward: Some(forward),
                    forward_status: Some(head.status.as_u16()),
                    collapsed: true,
                    ..CacheStatus::default()
                };
                return Ok(Served::Answer(answer_from_fill(
                    &head,
                    reader,
                    request.headers(),
                    status,
                )));
            }
            Wait::Done => {
                if let Lookup::Found(variant) = cache.lookup(&target.key, request.headers()) {
                    route.metrics.hit.inc();
                    return Ok(Served::Answer(hit(
                        &variant,
                        request.headers(),
                        &target.method,
                        None,
                        true,
                    )));
                }
            }
            Wait::Alone => {}
        }
        route.metrics.miss.inc();
        return pass_through(
            dispatch,
            attempt,
            request,
            CacheStatus {
                forward: Some(forward),
                collapsed: true,
                detail: Some("alone".into()),
                ..CacheStatus::default()
            },
        )
        .await;
    }

    let client_headers = request.headers().clone();
    let fetched = fetch(
        route,
        dispatch,
        attempt,
        request,
        &target,
        stale.clone(),
        &fill,
    )
    .await;
    match fetched {
        Fetched::Revalidated(variant) => {
            route.metrics.revalidated.inc();
            let now = SystemTime::now();
            let status = CacheStatus {
                forward: Some(forward),
                forward_status: Some(StatusCode::NOT_MODIFIED.as_u16()),
                ttl: Some(variant.freshness.ttl_seconds(now)),
                stored: true,
                ..CacheStatus::default()
            };
            Ok(Served::Answer(answer_from(
                &variant,
                &client_headers,
                &target.method,
                status,
                now,
            )))
        }
        Fetched::Filling(head, reader) => {
            route.metrics.miss.inc();
            let status = CacheStatus {
                forward: Some(forward),
                forward_status: Some(head.status.as_u16()),
                stored: true,
                ..CacheStatus::default()
            };
            Ok(Served::Answer(answer_from_fill(
                &head,
                reader,
                &client_headers,
                status,
            )))
        }
        Fetched::NotStored {
            response,
            lease,
            reason,
        } => {
            route.metrics.miss.inc();
            let status = CacheStatus {
                forward: Some(forward),
                forward_status: Some(response.status().as_u16()),
                detail: Some(reason.into()),
                ..CacheStatus::default()
            };
            Ok(Served::Backend {
                response,
                lease,
                cache_status: status_value(&status),
            })
        }
        Fetched::Failed { error, status } => {
            let now = SystemTime::now();
            match stale {
                Some(variant) if may_serve_stale_on_error(&variant.freshness, &request_cc, now) => {
                    route.metrics.stale.inc();
                    let cache_status = CacheStatus {
                        forward: Some(Forward::Stale),
                        forward_status: status.map(|status| status.as_u16()),
                        ttl: Some(variant.freshness.ttl_seconds(now)),
                        detail: Some("stale-if-error".into()),
                        ..CacheStatus::default()
                    };
                    Ok(Served::Answer(answer_from(
                        &variant,
                        &client_headers,
                        &target.method,
                        cache_status,
                        now,
                    )))
                }
                _ => Err(error),
            }
        }
    }
}

/// What a fetch for a fill brought.
enum Fetched {
    /// A `304` freshened the stale copy, stored again.
    Revalidated(Arc<Variant>),
    /// A storable response, streaming into the cache.
    Filling(Arc<FillHead>, FillReader),
    /// A response that may not be stored, to pass on.
    NotStored {
        response: Response<UpstreamBody>,
        lease: Lease,
        reason: &'static str,
    },
    /// The backend failed, or answered an error while a stale copy exists.
    Failed {
        error: ProxyError,
        status: Option<StatusCode>,
    },
}

/// Fetches the object from the backend for `fill` (which this request leads), revalidating the
/// `stale` copy when there is one.
async fn fetch(
    route: &RouteCache,
    dispatch: &Dispatch<'_>,
    attempt: &mut Attempt,
    request: Request<RequestBody>,
    target: &CacheRequest,
    stale: Option<Arc<Variant>>,
    fill: &Arc<Fill>,
) -> Fetched {
    let cache = &route.cache;
    // Should this request go away before the fill is settled, the waiters must not wait on it.
    let mut lead = LeadGuard {
        cache,
        key: &target.key,
        fill,
        armed: true,
    };
    let (mut parts, body) = request.into_parts();
    let client_headers = parts.headers.clone();
    let request_cc = RequestDirectives::parse(&client_headers);
    // The cache asks for the whole object with its own conditions, and answers the client's
    // conditions and ranges from it.
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ] {
        parts.headers.remove(name);
    }
    parts.method = Method::GET;
    if let Some(stale) = &stale {
        for (name, value) in revalidation_headers(&stale.headers) {
            parts.headers.insert(name, value);
        }
    }
    let request_time = SystemTime::now();
    let sent = send_to_backend(dispatch, attempt, Some(Request::from_parts(parts, body))).await;
    let response_time = SystemTime::now();
    let (response, lease) = match sent {
        Ok(answer) => answer,
        Err(error) => {
            fill.fail();
            cache.remove_fill(&target.key, fill);
            return Fetched::Failed {
                error,
                status: None,
            };
        }
    };
    let status = response.status();
    if let Some(stale) = &stale {
        if status == StatusCode::NOT_MODIFIED && selects_stored(response.headers(), &stale.headers)
        {
            let mut headers = stale.headers.clone();
            freshen(&mut headers, response.headers());
            let headers = super::compact_headers(&headers);
            let freshness = Freshness::new(
                stale.status,
                &headers,
                request_time,
                response_time,
                route.options.default_ttl,
            );
            let variant = Variant {
                status: stale.status,
                headers,
                body: stale.body.clone(),
                freshness,
                vary: stale.vary.clone(),
                secondary: stale.secondary.clone(),
                tags: stale.tags.clone(),
                answer_fields: std::sync::OnceLock::new(),
            };
            lease.release();
            cache.store(
                &target.key,
                &target.host,
                &target.path,
                variant,
                &route.metrics.store,
            );
            fill.done();
            cache.remove_fill(&target.key, fill);
            return match cache.lookup(&target.key, &client_headers) {
                Lookup::Found(variant) => Fetched::Revalidated(variant),
                // Evicted at once (a cache too small for it): the stale copy, freshened, is
                // still the answer.
                _ => Fetched::Revalidated(Arc::clone(stale)),
            };
        }
        if is_error_status(status)
            && may_serve_stale_on_error(&stale.freshness, &request_cc, response_time)
        {
            fill.fail();
            cache.remove_fill(&target.key, fill);
            return Fetched::Failed {
                error: ProxyError::UpstreamFailed {
                    backend: attempt.backend.as_deref().unwrap_or_default().to_string(),
                    source: format!("the backend answered {status}").into(),
                },
                status: Some(status),
            };
        }
    }

    let response_cc = ResponseDirectives::parse(response.headers());
    let storable = may_store(
        &PolicyExchange {
            method: &Method::GET,
            request_headers: &client_headers,
            status,
            response_headers: response.headers(),
        },
        &request_cc,
        &response_cc,
        &route.options,
        response_time,
    );
    let length = response.body().size_hint().exact();
    let too_large = length.is_some_and(|length| length > cache.max_object_size);
    let reason = match storable {
        Err(reason) => Some(reason),
        Ok(()) if too_large => None,
        Ok(()) => {
            let vary = vary_fields(response.headers()).unwrap_or_default();
            let secondary = variant_key(&vary, &client_headers);
            let (response_parts, incoming) = response.into_parts();
            let mut headers = HeaderMap::with_capacity(response_parts.headers.len());
            for (name, value) in &response_parts.headers {
                if is_storable_field(name, &response_parts.headers) {
                    headers.append(name.clone(), value.clone());
                }
            }
            let headers = super::compact_headers(&headers);
            let tags = tags_of(&headers);
            let freshness = Freshness::new(
                status,
                &headers,
                request_time,
                response_time,
                route.options.default_ttl,
            );
            let head = Arc::new(FillHead {
                status,
                headers,
                vary,
                secondary,
                length,
            });
            fill.start(Arc::clone(&head));
            let reader = fill.reader(true);
            let job = StoreJob {
                cache: Arc::clone(cache),
                key: Arc::clone(&target.key),
                host: Arc::clone(&target.host),
                path: Arc::clone(&target.path),
                head: Arc::clone(&head),
                freshness,
                tags,
                metrics: route.metrics.store.clone(),
            };
            let body =
                ResponseBody::detached(incoming, Some(lease), dispatch.route.upstream.read_timeout);
            // The backend slot is the fill's until the body is read; the request keeps the name.
            let slot = Attempt {
                backend: attempt.backend.clone(),
                in_flight: attempt.in_flight.take(),
                upstream_time: attempt.upstream_time,
            };
            lead.armed = false;
            tokio::spawn(pump(Arc::clone(fill), body, job, slot));
            return Fetched::Filling(head, reader);
        }
    };
    // Not stored: whoever waits goes to the backend now, and the next requests for the key pass
    // straight through for a while, unless the request alone was the reason.
    fill.pass();
    cache.remove_fill(&target.key, fill);
    let request_side = matches!(
        reason,
        Some(NotStorable::RequestNoStore | NotStorable::Authorization)
    );
    if !request_side {
        cache.mark_pass(&target.key);
    }
    Fetched::NotStored {
        response,
        lease,
        reason: reason.map_or("too-large", NotStorable::detail),
    }
}

/// Fails a fill whose leader went away before settling it, so that its waiters go on at once.
struct LeadGuard<'a> {
    cache: &'a Arc<Cache>,
    key: &'a Arc<str>,
    fill: &'a Arc<Fill>,
    /// Off once the fill belongs to its task.
    armed: bool,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Settled fills stay as they are; an unsettled one fails.
            self.fill.fail();
            self.cache.remove_fill(self.key, self.fill);
        }
    }
}

/// Sends the request on without the cache, saying why in `Cache-Status`.
async fn pass_through(
    dispatch: &Dispatch<'_>,
    attempt: &mut Attempt,
    request: Request<RequestBody>,
    mut status: CacheStatus,
) -> Result<Served, ProxyError> {
    let (response, lease) = send_to_backend(dispatch, attempt, Some(request)).await?;
    status.forward_status = Some(response.status().as_u16());
    Ok(Served::Backend {
        response,
        lease,
        cache_status: status_value(&status),
    })
}

/// Starts one background revalidation of a stale object (none when one is in progress).
fn refresh_in_background(
    route: &RouteCache,
    dispatch: &Dispatch<'_>,
    request: &Request<RequestBody>,
    target: &CacheRequest,
    stale: &Arc<Variant>,
) {
    let cache = Arc::clone(&route.cache);
    if cache.filling(&target.key) {
        return;
    }
    let (fill, leader) = cache.join_or_lead(&target.key);
    if !leader {
        return;
    }
    let runtime = Arc::clone(dispatch.runtime);
    let route_arc = Arc::clone(dispatch.route);
    let (secure, host_missing) = (dispatch.secure, dispatch.host_missing);
    let mut background = Request::new(RequestBody::empty());
    *background.method_mut() = Method::GET;
    *background.uri_mut() = request.uri().clone();
    *background.headers_mut() = request.headers().clone();
    let target = CacheRequest {
        key: Arc::clone(&target.key),
        host: Arc::clone(&target.host),
        path: Arc::clone(&target.path),
        method: Method::GET,
    };
    let stale = Arc::clone(stale);
    tokio::spawn(async move {
        let Some(route_cache) = route_arc.cache.as_ref() else {
            return;
        };
        let dispatch = Dispatch {
            runtime: &runtime,
            route: &route_arc,
            secure,
            key_hash: None,
            sticky: None,
            replay: None,
            resend: false,
            progress: None,
            host_missing,
            deferred: None,
            raw_answer: false,
        };
        let mut attempt = Attempt::default();
        // Whatever the refresh brings is stored by the fill, or dropped.
        let _ = fetch(
            route_cache,
            &dispatch,
            &mut attempt,
            background,
            &target,
            Some(stale),
            &fill,
        )
        .await;
    });
}

/// A hit: the stored variant answers, with `Cache-Status` saying so (and why, for a stale one).
fn hit(
    variant: &Variant,
    request: &HeaderMap,
    method: &Method,
    detail: Option<&str>,
    collapsed: bool,
) -> CacheAnswer {
    let now = SystemTime::now();
    let status = CacheStatus {
        hit: true,
        ttl: Some(variant.freshness.ttl_seconds(now)),
        collapsed,
        detail: detail.map(str::to_string),
        ..CacheStatus::default()
    };
    answer_from(variant, request, method, status, now)
}

/// The answer to a request from a stored variant: `304` when the client's validators match,
/// `206` or `416` for a range, the whole response otherwise, with `Age` and `Cache-Status`.
fn answer_from(
    variant: &Variant,
    request: &HeaderMap,
    method: &Method,
    status: CacheStatus,
    now: SystemTime,
) -> CacheAnswer {
    let age = HeaderValue::from(variant.freshness.age(now).as_secs());
    let ok = variant.status == StatusCode::OK;
    if ok && not_modified(request, &variant.headers, variant.freshness.response_time) {
        let mut headers = not_modified_headers(&variant.headers);
        headers.insert(header::AGE, age);
        headers.insert(CACHE_STATUS.clone(), status_value(&status));
        return answer(StatusCode::NOT_MODIFIED, headers, Bytes::new());
    }
    let length = variant.body.len() as u64;
    let wants_range = ok && *method == Method::GET && request.contains_key(header::RANGE);
    let answer_range = if wants_range {
        range::evaluate(request, &variant.headers, length)
    } else {
        RangeAnswer::Full
    };
    match answer_range {
        RangeAnswer::Full => {
            // The common case: a copy of the prepared fields, with the two that change per
            // answer written into the places kept for them (the request id is the pipeline's).
            let mut headers = variant.answer_fields().clone();
            if let Some(slot) = headers.get_mut(header::AGE) {
                *slot = age;
            }
            if let Some(slot) = headers.get_mut(&CACHE_STATUS) {
                *slot = status_value(&status);
            }
            answer(variant.status, headers, variant.body.clone())
        }
        RangeAnswer::Partial { first, last } => {
            let mut headers = range_answer_fields(variant, age, &status);
            if let Some(value) = answer_range
                .content_range(length)
                .and_then(|text| HeaderValue::from_str(&text).ok())
            {
                headers.insert(header::CONTENT_RANGE, value);
            }
            let (first, last) = (first as usize, last as usize);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(last + 1 - first));
            answer(
                StatusCode::PARTIAL_CONTENT,
                headers,
                variant.body.slice(first..=last),
            )
        }
        RangeAnswer::Unsatisfiable => {
            let mut headers = range_answer_fields(variant, age, &status);
            if let Some(value) = answer_range
                .content_range(length)
                .and_then(|text| HeaderValue::from_str(&text).ok())
            {
                headers.insert(header::CONTENT_RANGE, value);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            answer(StatusCode::RANGE_NOT_SATISFIABLE, headers, Bytes::new())
        }
    }
}

/// The fields of a `206` or `416` from a stored `200`, before its range fields are added.
fn range_answer_fields(variant: &Variant, age: HeaderValue, status: &CacheStatus) -> HeaderMap {
    let mut headers = variant.headers.clone();
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::AGE, age);
    headers.insert(CACHE_STATUS.clone(), status_value(status));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers
}

/// The answer to a request from a fill in progress: the response as it streams (ranges get the
/// whole of it), or `304` when the client's validators match its head.
fn answer_from_fill(
    head: &FillHead,
    reader: FillReader,
    request: &HeaderMap,
    status: CacheStatus,
) -> CacheAnswer {
    if head.status == StatusCode::OK && not_modified(request, &head.headers, SystemTime::now()) {
        let mut headers = not_modified_headers(&head.headers);
        headers.insert(CACHE_STATUS.clone(), status_value(&status));
        return answer(StatusCode::NOT_MODIFIED, headers, Bytes::new());
    }
    let mut headers = head.headers.clone();
    headers.insert(CACHE_STATUS.clone(), status_value(&status));
    let mut parts = Response::new(()).into_parts().0;
    parts.status = head.status;
    parts.headers = headers;
    CacheAnswer {
        parts,
        body: CacheBody::Fill(reader),
    }
}

fn answer(status: StatusCode, headers: HeaderMap, body: Bytes) -> CacheAnswer {
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.headers = headers;
    CacheAnswer {
        parts,
        body: CacheBody::Bytes(body),
    }
}

/// `504` for `only-if-cached` when nothing usable is stored.
fn gateway_timeout() -> CacheAnswer {
    let mut headers = HeaderMap::new();
    headers.insert(
        CACHE_STATUS.clone(),
        status_value(&CacheStatus {
            detail: Some("only-if-cached".into()),
            ..CacheStatus::default()
        }),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    answer(
        StatusCode::GATEWAY_TIMEOUT,
        headers,
        Bytes::from_static(b"not in the cache\n"),
    )
}

pub(super) static CACHE_STATUS: header::HeaderName =
    header::HeaderName::from_static("cache-status");

pub(super) fn status_value(status: &CacheStatus) -> HeaderValue {
    if let CacheStatus {
        hit: true,
        forward: None,
        forward_status: None,
        ttl: Some(ttl),
        stored: false,
        collapsed: false,
        detail: None,
    } = status
    {
        // A plain hit, the answer a busy cache gives most, is written without the general
        // formatter: straight into the buffer the value keeps.
        const HIT: &[u8] = b"; hit; ttl=";
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(*ttl).as_bytes();
        let mut value = bytes::BytesMut::with_capacity(CACHE_NAME.len() + HIT.len() + digits.len());
        value.extend_from_slice(CACHE_NAME.as_bytes());
        value.extend_from_slice(HIT);
        value.extend_from_slice(digits);
        if let Ok(value) = HeaderValue::from_maybe_shared(value.freeze()) {
            return value;
        }
    }
    HeaderValue::from_str(&status.to_field_value(CACHE_NAME))
        .unwrap_or_else(|_| HeaderValue::from_static(CACHE_NAME))
}

/// The purge tags of a response: `Surrogate-Key` (space-separated) and `Cache-Tag`
/// (comma-separated).
fn tags_of(headers: &HeaderMap) -> Vec<String> {
    let mut tags = Vec::new();
    for value in headers.get_all("surrogate-key") {
        if let Ok(text) = value.to_str() {
            tags.extend(text.split_ascii_whitespace().map(str::to_string));
        }
    }
    for value in headers.get_all("cache-tag") {
        if let Ok(text) = value.to_str() {
            tags.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|tag| !tag.is_empty())
                    .map(str::to_string),
            );
        }
    }
    tags
}

/// After an unsafe method's response: forgets what it invalidates (RFC 9111 section 4.4).
pub(crate) fn invalidate_after(
    route: &RouteCache,
    method: &Method,
    status: StatusCode,
    host: &str,
    path_and_query: &str,
    response: &HeaderMap,
) {
    for target in invalidate::invalidated_paths(method, status, host, path_and_query, response) {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path.to_string(), Some(query.to_string())),
            None => (target.clone(), None),
        };
        let Ok(path) = bouncer_rules::normalise_path(&path) else {
            continue;
        };
        let key = route.spec.key(&KeyInput {
            method: &Method::GET,
            host,
            normalised_path: &path,
            query: query.as_deref(),
        });
        route.cache.remove(&key);
    }
}

/// Answers a `PURGE` request: by tag when it names `Surrogate-Key` or `Cache-Tag` tags, by prefix
/// when its path ends in `*`, else the exact URL. Only from `purge_allow` addresses.
pub(crate) fn purge(
    route: &RouteCache,
    client: IpAddr,
    host: &str,
    path: &str,
    query: Option<&str>,
    request: &HeaderMap,
) -> CacheAnswer {
    let cache: &Cache = &route.cache;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if !cache.may_purge(client) {
        return answer(
            StatusCode::FORBIDDEN,
            headers,
            Bytes::from_static(b"{\"error\":\"this address may not purge\"}\n"),
        );
    }
    let tags = tags_of(request);
    let purged = if !tags.is_empty() {
        tags.iter().map(|tag| cache.purge_tag(tag)).sum()
    } else if let Some(prefix) = path.strip_suffix('*') {
        cache.purge_prefix(Some(host), prefix)
    } else {
        route.purge_url(host, path, query)
    };
    answer(
        StatusCode::OK,
        headers,
        Bytes::from(format!("{{\"purged\":{purged}}}\n")),
    )
}
