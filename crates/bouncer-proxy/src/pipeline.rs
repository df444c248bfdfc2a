//! The life of one request, top to bottom: check it, route it, forward it, answer.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Body as _;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

use bouncer_rules::normalise_path;

use crate::balance::request_key_hash;
use crate::body::{BodyPace, BodyProgress, ClientBody, RequestBody, ResponseBody, UpstreamBody};
use crate::conn::{ConnectionActivity, RequestGuard, request_started};
use crate::error::{ProxyError, Refusal, Side};
use crate::headers::{
    ClientAddress, DeferredFields, ForwardingFacts, X_REQUEST_ID, remove_hop_by_hop, request_id,
    set_forwarding_headers,
};
use crate::listener::{Lifecycle, ListenerRuntime};
use crate::pool::Lease;
use crate::protection::RateSubject;
use crate::routing::Route;
use crate::upstream::{InFlight, Picked, SendFailure, Sent, Wire, bit};

/// What a connection knows that every request on it needs.
pub struct ConnectionContext {
    /// The listener's runtime now: each request reads it once as it starts, so that after a
    /// reload even a kept-alive connection's next request follows the new config.
    pub slot: Arc<arc_swap::ArcSwap<ListenerRuntime>>,
    pub peer: SocketAddr,
    pub activity: Arc<ConnectionActivity>,
    pub scheme: &'static str,
    /// The peer's address as a header value, made once for all the connection's requests.
    pub peer_header: HeaderValue,
    /// The peer as a `Forwarded` node, made once for all the connection's requests.
    pub forwarded_for: bytes::Bytes,
    /// On TLS, the certificate the client's SNI matched: every request's host must be one it covers.
    pub sni_certificate: Option<Arc<crate::tls::LoadedCertificate>>,
    /// With mutual TLS, the subject of the client's verified certificate.
    pub client_subject: Option<HeaderValue>,
    /// The proxy's lifecycle, for what outlives the connection's requests (WebSocket tunnels).
    pub lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
}

impl ConnectionContext {
    /// A connection's context before TLS has said anything about it.
    pub(crate) fn new(
        slot: Arc<arc_swap::ArcSwap<ListenerRuntime>>,
        peer: SocketAddr,
        activity: Arc<ConnectionActivity>,
        scheme: &'static str,
        lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
    ) -> Self {
        Self {
            slot,
            lifecycle,
            peer,
            peer_header: crate::headers::peer_header(peer),
            forwarded_for: crate::headers::forwarded_for(peer),
            activity,
            scheme,
            sni_certificate: None,
            client_subject: None,
        }
    }
}

// `handle`, `forward` and `send_to_backend` return an `async move` block rather than being
// `async fn`s: an `async fn` keeps each argument twice in its future (as the argument, and as the
// local it is moved into), and a future is copied whole whenever it is moved. The request alone is
// a few hundred bytes at each level.

/// Handles one request from a client and produces the response to send back.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn handle(
    ctx: &ConnectionContext,
    request: Request<ClientBody>,
) -> impl Future<Output = Response<ResponseBody>> {
    async move {
        let in_flight = request_started(&ctx.activity);
        if request.version() == Version::HTTP_2 {
            ctx.activity.mark_http2();
        }
        let runtime = ctx.slot.load_full();
        // Counted down when the exchange is dropped, with the answer's end.
        runtime.metrics.requests_in_flight.inc();
        let client = ClientAddress::resolve(ctx.peer, &runtime.config, request.headers());
        // Boxed: it travels with the response body, which stays small to move.
        let mut exchange = Box::new(Exchange {
            _in_flight: in_flight,
            started: crate::clock::now(),
            request_id: request_id(request.headers(), client.peer_trusted),
            client: client.ip,
            method: request.method().clone(),
            host: None,
            uri: runtime.access_log.enabled().then(|| request.uri().clone()),
            normalised_path: None,
            status: 0,
            body_progress: None,
            bytes_out: 0,
            route: None,
            attempt: Attempt::default(),
            upstream_body_failed: false,
            grpc: match request.body().lean_facts() {
                Some(facts) => facts.grpc,
                None => request
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|value| bouncer_rules::is_grpc_content_type(value.as_bytes())),
            },
            _pressure: runtime.protection.track_in_flight(),
            runtime,
        });
        if let Some(challenges) = &exchange.runtime.acme_challenges
            && let Some(token) = request.uri().path().strip_prefix(ACME_CHALLENGE_PREFIX)
            && let Some(answer) = challenges.http_answer(token)
        {
            return answer_acme_challenge(answer, exchange);
        }
        if let Some(port) = exchange.runtime.redirect_https_port
            && !request.uri().path().starts_with(ACME_CHALLENGE_PREFIX)
        {
            return redirect_to_https(&request, port, exchange);
        }
        match forward(ctx, &client, &mut exchange, request).await {
            Ok(Outcome::Forwarded(forwarded)) => respond(exchange, forwarded),
            Ok(Outcome::Cached(answer)) => respond_cached(exchange, answer),
            Err(error) => answer_error(&error, exchange),
        }
    }
}

/// ACME http-01 challenges are answered over plain HTTP, never redirected: by this proxy for its
/// own orders, else by the backends.
const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// The key authorization for an http-01 challenge of this proxy's own ACME order.
fn answer_acme_challenge(answer: String, mut exchange: Box<Exchange>) -> Response<ResponseBody> {
    exchange.status = StatusCode::OK.as_u16();
    let mut response = Response::new(ResponseBody::fixed(answer, Some(exchange)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `308 Permanent Redirect` to the same host and target on the HTTPS listener's port; the method
/// and body are kept by a client that follows it.
fn redirect_to_https(
    request: &Request<ClientBody>,
    port: u16,
    mut exchange: Box<Exchange>,
) -> Response<ResponseBody> {
    let location = request_host(request)
        .ok()
        .and_then(|source| Some(normalise_host(source.as_str()).ok()?.into_owned()))
        .filter(|host| !host.is_empty())
        .and_then(|host| {
            let target = request
                .uri()
                .path_and_query()
                .map_or("/", PathAndQuery::as_str);
            let location = if port == 443 {
                format!("https://{host}{target}")
            } else {
                format!("https://{host}:{port}{target}")
            };
            HeaderValue::from_str(&location).ok()
        });
    let Some(location) = location else {
        return answer_error(&ProxyError::BadRequest("invalid Host header"), exchange);
    };
    exchange.status = StatusCode::PERMANENT_REDIRECT.as_u16();
    exchange.host = request_host(request).ok();
    let request_id = exchange.request_id.clone();
    let mut response = Response::new(ResponseBody::fixed(
        "redirecting to HTTPS\n",
        Some(exchange),
    ));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, location);
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A backend's answer, with what is needed to pass it on.
struct Forwarded {
    response: Response<UpstreamBody>,
    /// The backend connection, which goes back to its pool once the response body has been read.
    lease: Lease,
    read_timeout: Duration,
    /// A WebSocket's client side, and the proxy's lifecycle, which its tunnel keeps up with.
    client_upgrade: Option<(OnUpgrade, tokio::sync::watch::Receiver<Lifecycle>)>,
    /// What the cache did, on a caching route.
    cache_status: Option<HeaderValue>,
}

#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn forward(
    ctx: &ConnectionContext,
    client: &ClientAddress,
    exchange: &mut Exchange,
    mut request: Request<ClientBody>,
) -> impl Future<Output = Result<Outcome, ProxyError>> {
    async move {
        // Borrowed: only other fields of `exchange` change as the request goes on.
        let runtime = &exchange.runtime;
        let protection = &runtime.protection;
        if client.peer_trusted {
            // Behind a trusted proxy the client is known only now: the lists act per request, so
            // that the proxy in front is never refused as a whole.
            protection
                .check_lists(client.ip)
                .map_err(|refusal| ProxyError::Denied(refusal.per_request()))?;
        }
        // A ban also ends what a banned client still sends on connections opened before it.
        protection
            .check_ban(client.ip)
            .map_err(|refusal| ProxyError::Denied(refusal.per_request()))?;
        check_framing(&request)?;
        let host_source = request_host(&request)?;
        let host = normalise_host(host_source.as_str())?;
        if runtime.access_log.enabled() {
            exchange.host = Some(host_source.clone());
        }
        if let Some(certificate) = &ctx.sni_certificate
            && !host.is_empty()
            && !certificate.covers(host.trim_start_matches('[').trim_end_matches(']'))
        {
            return Err(ProxyError::Misdirected);
        }

        let path = normalise_path(request.uri().path())
            .map_err(|_| ProxyError::BadRequest("invalid path"))?;
        let path_changed = matches!(path, Cow::Owned(_));
        if protection.has_rules()
            && let Some((rule, action)) =
                protection.match_rule(request.method().as_str(), &path, request.headers())
        {
            apply_rule(protection, client.ip, rule, action).await?;
        }
        let route = runtime
            .routes
            .find(&host, &path)
            .ok_or(ProxyError::NoRoute)?;
        exchange.route = Some(Arc::clone(route));
        if protection.has_rate_limits() {
            let checked = protection
                .check_rate_limits(&RateSubject {
                    client: client.ip,
                    headers: request.headers(),
                    path: &path,
                    route: &route.name,
                })
                .await;
            if let Err(limited) = checked {
                protection.record_violation(client.ip);
                return Err(ProxyError::RateLimited(limited));
            }
        }
        if let Some(route_cache) = &route.cache
            && request.method().as_str() == "PURGE"
        {
            return Ok(Outcome::Cached(crate::cache::purge(
                route_cache,
                client.ip,
                &host,
                &path,
                request.uri().query(),
                request.headers(),
            )));
        }
        // A GET or HEAD without a body on a caching route goes through the cache.
        let cache_target = route.cache.as_ref().and_then(|route_cache| {
            let method = request.method();
            (matches!(*method, Method::GET | Method::HEAD)
                && request.body().is_end_stream()
                && !is_websocket_upgrade(&request))
            .then(|| {
                route_cache.spec.key(&bouncer_cache_policy::KeyInput {
                    method,
                    host: &host,
                    normalised_path: &path,
                    query: request.uri().query(),
                })
            })
        });
        // A fresh hit is answered before anything is prepared for a backend.
        if let (Some(route_cache), Some(key)) = (&route.cache, &cache_target)
            && let Some(answer) =
                crate::cache::fresh_hit(route_cache, key, request.headers(), request.method())
        {
            if path_changed {
                exchange.normalised_path = Some(path.into_owned());
            }
            return Ok(Outcome::Cached(answer));
        }
        let cache_target = cache_target.map(|key| crate::cache::CacheRequest {
            key: key.into(),
            host: host.as_ref().into(),
            path: path.as_ref().into(),
            method: request.method().clone(),
        });
        // An unsafe method on a caching route invalidates what it changed, once it succeeds.
        let invalidates = (route.cache.is_some() && !request.method().is_safe()).then(|| {
            (
                request.method().clone(),
                host.to_string(),
                request
                    .uri()
                    .path_and_query()
                    .map_or_else(|| path.to_string(), |target| target.as_str().to_string()),
            )
        });
        let key_hash = route.upstream.hash_key.as_ref().and_then(|key| {
            request_key_hash(
                key,
                client.ip,
                request.headers(),
                &path,
                request.uri().query(),
            )
        });

        let max_body = runtime.server.max_body_bytes;
        if declared_length(&request).is_some_and(|length| length > max_body) {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }

        // The target to forward when normalising changed it; otherwise the client's is kept.
        let normalised_target = if path_changed {
            let text = match request.uri().query() {
                Some(query) => format!("{path}?{query}"),
                None => path.to_string(),
            };
            exchange.normalised_path = Some(path.into_owned());
            Some(PathAndQuery::try_from(text).map_err(|_| ProxyError::BadRequest("invalid path"))?)
        } else {
            None
        };

        let websocket = is_websocket_upgrade(&request);
        let client_upgrade =
            websocket.then(|| (hyper::upgrade::on(&mut request), ctx.lifecycle.clone()));

        let upstream = &route.upstream;
        // The lean HTTP/1 server took the request (it takes only bodiless ones) and writes the answer;
        // it says what the fields hold.
        let lean_facts = request.body().lean_facts();
        let (mut parts, incoming) = request.into_parts();
        let version = parts.version;
        if lean_facts.is_none_or(|facts| facts.hop_by_hop) {
            remove_hop_by_hop(&mut parts.headers, websocket);
        }
        // This proxy answers `Expect: 100-continue` itself when it starts reading the body. (The lean
        // server leaves every request with an `Expect` to hyper.)
        if lean_facts.is_none() {
            parts.headers.remove(header::EXPECT);
        }
        // The host as the client sent it; an absolute-form target (or HTTP/2's :authority) names the
        // host, and Host must agree with it.
        let authority_value;
        let host_header = match &host_source {
            HostSource::Header(value) => value,
            HostSource::Authority(authority) => {
                let value = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
                parts.headers.insert(header::HOST, value.clone());
                authority_value = value;
                &authority_value
            }
        };
        let forwarding = ForwardingFacts {
            client,
            peer: &ctx.peer_header,
            forwarded_for: &ctx.forwarded_for,
            host: host_header,
            scheme: ctx.scheme,
            version,
        };
        // Nothing reads the forwarding fields of a request that no cache keeps, nor its answer's
        // fields, when the lean client sends it (a plain HTTP/1 upstream) and the lean server answers:
        // the lean client writes the forwarding fields, and the map is spared them.
        let raw_answer =
            lean_facts.is_some() && route.cache.is_none() && route.upstream.plain_http1();
        // Only when nothing the client sent is to be replaced or extended.
        let deferrable = !client.peer_trusted && lean_facts.is_some_and(|facts| !facts.forwarding);
        let deferred = if raw_answer && deferrable {
            Some(DeferredFields {
                facts: forwarding,
                request_id: &exchange.request_id,
            })
        } else {
            // Room for the fields added here, so that the map grows once rather than step by step.
            parts.headers.reserve(6);
            set_forwarding_headers(&mut parts.headers, &forwarding);
            parts
                .headers
                .insert(X_REQUEST_ID.clone(), exchange.request_id.clone());
            None
        };
        if let Some(name) = runtime
            .tls
            .as_ref()
            .and_then(|tls| tls.subject_header.as_ref())
        {
            // Only the handshake may say who the client is: whatever the client sent is dropped.
            parts.headers.remove(name);
            if let Some(subject) = &ctx.client_subject {
                parts.headers.insert(name.clone(), subject.clone());
            }
        }
        // An HTTP/1.0 request may come without a host; the backend's own name is sent then.
        // (A `Connection` naming `Host` has had it removed with the hop-by-hop fields.)
        let host_missing = match lean_facts {
            Some(facts) if !facts.hop_by_hop => !facts.host,
            _ => !parts.headers.contains_key(header::HOST),
        };
        // Backends get the origin form (`/path?query`); the host travels in `Host`.
        parts.uri = match normalised_target {
            Some(target) => http::Uri::from(target),
            None => origin_form(std::mem::take(&mut parts.uri)),
        };
        parts.version = Version::HTTP_11;

        // A request may be sent again after a failure that may have reached the backend only when it
        // is idempotent, some such failure is to be retried, and its whole body is held: bodiless,
        // or kept while it streams because it fits in `retry_buffer`.
        let replayable = upstream.replays && !websocket && is_idempotent(&parts.method);
        let (body, progress, keep) = if let Some(incoming) = incoming.into_incoming() {
            let keep = replayable
                && upstream.retry_buffer > 0
                && declared_length_of(&parts.headers)
                    .is_none_or(|length| length <= upstream.retry_buffer);
            let progress = Arc::new(if keep {
                BodyProgress::keeping(upstream.retry_buffer)
            } else {
                BodyProgress::default()
            });
            exchange.body_progress = Some(Arc::clone(&progress));
            (
                RequestBody::streaming(
                    incoming,
                    max_body,
                    Arc::clone(&progress),
                    BodyPace::new(runtime.server.min_body_rate, runtime.server.body_timeout),
                ),
                Some(progress),
                keep,
            )
        } else {
            (RequestBody::empty(), None, true)
        };
        // A request that goes on a lean connection is only read there, and comes back for a retry
        // as it is: no copy is kept.
        let lean = !websocket && progress.is_none() && upstream.plain_http1();
        // Boxed: most requests keep none, and the dispatch is held across the send.
        let replay = (replayable && keep && !lean).then(|| {
            Box::new(Replay {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
            })
        });
        let sticky = upstream
            .sticky
            .as_ref()
            .map(|sticky| (sticky, sticky.target(&parts.headers)));

        let request = Request::from_parts(parts, body);
        let dispatch = Dispatch {
            runtime,
            route,
            secure: ctx.scheme == "https",
            key_hash,
            sticky,
            replay,
            resend: replayable && keep,
            progress,
            host_missing,
            deferred,
            raw_answer,
        };
        if let (Some(route_cache), Some(target)) = (&route.cache, cache_target) {
            // Boxed: the cache's state machine is larger than the plain path's, which would
            // otherwise carry its size on every request.
            let served = Box::pin(crate::cache::serve(
                route_cache,
                &dispatch,
                &mut exchange.attempt,
                request,
                target,
            ))
            .await?;
            return Ok(match served {
                crate::cache::Served::Answer(answer) => Outcome::Cached(answer),
                crate::cache::Served::Backend {
                    response,
                    lease,
                    cache_status,
                } => Outcome::Forwarded(Forwarded {
                    response,
                    lease,
                    read_timeout: route.upstream.read_timeout,
                    client_upgrade,
                    cache_status: Some(cache_status),
                }),
            });
        }
        let (response, lease) =
            send_to_backend(&dispatch, &mut exchange.attempt, Some(request)).await?;
        if let (Some(route_cache), Some((method, host, target))) = (&route.cache, invalidates) {
            crate::cache::invalidate_after(
                route_cache,
                &method,
                response.status(),
                &host,
                &target,
                response.headers(),
            );
        }
        Ok(Outcome::Forwarded(Forwarded {
            response,
            lease,
            read_timeout: route.upstream.read_timeout,
            client_upgrade,
            cache_status: None,
        }))
    }
}

/// Where a request's answer comes from.
enum Outcome {
    Forwarded(Forwarded),
    Cached(crate::cache::CacheAnswer),
}

/// The backend a request went to: which, its in-flight slot there (held until the response is
/// done, for the balancers), and how long it took to answer.
#[derive(Default)]
pub(crate) struct Attempt {
    pub backend: Option<Arc<str>>,
    pub in_flight: Option<InFlight>,
    pub upstream_time: Option<Duration>,
}

/// What sending a prepared request needs besides the request itself.
pub(crate) struct Dispatch<'a> {
    pub runtime: &'a Arc<ListenerRuntime>,
    pub route: &'a Arc<Route>,
    /// Whether the client came over TLS (a new sticky cookie is then `Secure`).
    pub secure: bool,
    pub key_hash: Option<u64>,
    pub sticky: Option<(&'a crate::sticky::StickyCookie, Option<u64>)>,
    pub replay: Option<Box<Replay>>,
    /// The request may be sent again after a failure that may have reached the backend (see
    /// `replay`), as it is when it comes back from a lean exchange.
    pub resend: bool,
    pub progress: Option<Arc<BodyProgress>>,
    /// The request had no host: each backend gets its own name.
    pub host_missing: bool,
    /// Fields kept out of the request's map, which the code that writes the request adds.
    pub deferred: Option<DeferredFields<'a>>,
    /// Nothing reads the answer's fields on its way to the client, which the lean HTTP/1 server
    /// writes: they may stay the bytes read (see `raw_fields`).
    pub raw_answer: bool,
}

impl Dispatch<'_> {
    /// What is left to the code that writes the request and reads the answer.
    fn wire(&self) -> Wire<'_> {
        Wire {
            deferred: self.deferred.as_ref(),
            raw_answer: self.raw_answer,
        }
    }

    /// The request to send again after a failure that may have reached the backend: the one that
    /// came back from a lean exchange, or one made from the kept copy; none when it may not be
    /// sent twice.
    fn again(
        &self,
        returned: Option<Request<RequestBody>>,
        progress: Option<&BodyProgress>,
    ) -> Option<Request<RequestBody>> {
        if !self.resend {
            return None;
        }
        returned.or_else(|| self.replay.as_ref()?.request(progress))
    }
}

/// Sends a prepared request to a backend of the route's upstream, with the retries its upstream
/// allows, and gives the answer with the connection it came on.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub(crate) fn send_to_backend(
    dispatch: &Dispatch<'_>,
    attempt: &mut Attempt,
    // An `Option` because it is lent to each attempt and stays here unless hyper's client takes it
    // (see `Upstream::send`); taken as one, so that the future keeps one slot for it.
    mut request: Option<Request<RequestBody>>,
) -> impl Future<Output = Result<(Response<UpstreamBody>, Lease), ProxyError>> {
    async move {
        let upstream = &dispatch.route.upstream;
        let (key_hash, sticky, progress) = (dispatch.key_hash, dispatch.sticky, &dispatch.progress);
        let set = upstream.current();
        let mut tried = 0u64;
        let mut attempt_number = 0u32;
        let mut last_error: Option<ProxyError> = None;
        loop {
            let picked = upstream
                .pick(&set, key_hash, tried, sticky.and_then(|(_, target)| target))
                .await;
            let Picked {
                index: backend_index,
                guard,
                at: picked_at,
            } = match picked {
                Ok(picked) => picked,
                // No other backend to try: the client learns what went wrong with the last one.
                Err(none_left) => return Err(last_error.unwrap_or(none_left)),
            };
            // Borrowed from the set this loop holds (the slot's guard keeps its own reference for as
            // long as the answer lasts), so that no reference count is touched for it.
            let Some(backend) = set.backends.get(backend_index) else {
                return Err(last_error.unwrap_or(ProxyError::NoBackendAvailable {
                    upstream: upstream.name.to_string(),
                }));
            };
            attempt.backend = Some(Arc::clone(&backend.label));
            attempt.in_flight = Some(guard);
            if dispatch.host_missing
                && let Some(request) = &mut request
            {
                let authority = HeaderValue::from_str(backend.authority.as_str())
                    .map_err(|_| ProxyError::BadRequest("invalid target"))?;
                request.headers_mut().insert(header::HOST, authority);
            }
            let may_retry = attempt_number < upstream.retries;
            let failure = match upstream
                .send(
                    &set,
                    backend,
                    &mut request,
                    progress.clone(),
                    dispatch.wire(),
                    picked_at,
                )
                .await
            {
                Ok(Sent {
                    mut response,
                    lease,
                    elapsed: upstream_time,
                }) => {
                    let status = response.status().as_u16();
                    // The backend's own answer is kept when there is no other backend to ask.
                    let again = (may_retry
                        && upstream.retry_on.retries_status(status)
                        && upstream.any_available(&set, tried | bit(backend_index)))
                    .then(|| dispatch.again(request.take(), progress.as_deref()))
                    .flatten();
                    match again {
                        Some(again) if upstream.take_retry(backend) => {
                            tracing::debug!(backend = %backend.label, status, "retrying on another backend");
                            // The failed answer is dropped; its connection closes unless it was done.
                            drop((response, lease));
                            // Its slot at the failed backend is freed before another is taken.
                            attempt.in_flight = None;
                            request = Some(again);
                            tried |= bit(backend_index);
                            attempt_number += 1;
                            continue;
                        }
                        _ => {}
                    }
                    if let Some((cookie, target)) = sticky
                        && target != Some(backend.sticky_id)
                        && let Some(value) = cookie.set_cookie(backend.sticky_id, dispatch.secure)
                    {
                        // A new client, or one whose backend is gone: it sticks to this one now.
                        response.headers_mut().append(header::SET_COOKIE, value);
                    }
                    attempt.upstream_time = Some(upstream_time);
                    dispatch
                        .runtime
                        .protection
                        .observe_backend_latency(upstream_time);
                    if let Some(progress) = &progress {
                        // The answer is committed: a kept copy of the body is not needed any more.
                        progress.release_kept();
                    }
                    return Ok((response, lease));
                }
                Err(failure) => failure,
            };
            let SendFailure { error, unsent } = failure;
            if let ProxyError::ResponseTimeout { timeout, .. } = &error {
                // A backend too slow to answer at all is the slowest answer of all.
                dispatch
                    .runtime
                    .protection
                    .observe_backend_latency(*timeout);
            }
            if may_retry && unsent && request.is_some() {
                // It reached no backend, so any request may go to another, and doing so adds no load
                // to the fleet: such retries are not counted against the budget.
                tracing::debug!(backend = %backend.label, error = %ErrorChain(&error), "sending to another backend");
                backend.metrics.retries.inc();
                attempt.in_flight = None;
                tried |= bit(backend_index);
                attempt_number += 1;
                last_error = Some(error);
                continue;
            }
            let next = if !may_retry {
                None
            } else {
                let retryable = match &error {
                    ProxyError::UpstreamReset { .. } => upstream.retry_on.reset_before_response,
                    ProxyError::ResponseTimeout { .. } => upstream.retry_on.timeout,
                    _ => false,
                };
                retryable
                    .then(|| dispatch.again(request.take(), progress.as_deref()))
                    .flatten()
            };
            match next {
                Some(again) if upstream.take_retry(backend) => {
                    tracing::debug!(backend = %backend.label, error = %ErrorChain(&error), "retrying on another backend");
                    attempt.in_flight = None;
                    request = Some(again);
                    tried |= bit(backend_index);
                    attempt_number += 1;
                    last_error = Some(error);
                }
                _ => return Err(error),
            }
        }
    }
}

/// Does what a matched rule says: `log` lets the request through; `deny` refuses it (a
/// violation towards `auto_ban`); `ban` bans the address and refuses it; `tarpit` holds it for
/// the tarpit delay first.
async fn apply_rule(
    protection: &crate::protection::Protection,
    client: IpAddr,
    rule: Arc<str>,
    action: bouncer_config::RuleAction,
) -> Result<(), ProxyError> {
    use bouncer_config::RuleAction;
    match action {
        RuleAction::Log => {
            if let Some(suppressed) = protection.may_log_refusal() {
                tracing::info!(%client, %rule, suppressed, "request matched a logging rule");
            }
            Ok(())
        }
        RuleAction::Deny => {
            protection.record_violation(client);
            Err(ProxyError::RuleDenied { rule, close: false })
        }
        RuleAction::Ban => {
            protection.ban(client, &rule);
            Err(ProxyError::RuleDenied { rule, close: true })
        }
        RuleAction::Tarpit => {
            protection.record_violation(client);
            tokio::time::sleep(protection.tarpit_delay()).await;
            Err(ProxyError::RuleDenied { rule, close: true })
        }
    }
}

/// What is needed to send an idempotent request again.
pub(crate) struct Replay {
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl Replay {
    /// The request again, when its whole body (if it has one) is still held.
    fn request(&self, body: Option<&BodyProgress>) -> Option<Request<RequestBody>> {
        let body = match body {
            None => RequestBody::empty(),
            Some(progress) => RequestBody::replay(progress.replay()?),
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 section 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Passes a backend's response on to the client, its body streaming.
fn respond(mut exchange: Box<Exchange>, forwarded: Forwarded) -> Response<ResponseBody> {
    let Forwarded {
        mut response,
        lease,
        read_timeout,
        client_upgrade,
        cache_status,
    } = forwarded;
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let backend = exchange
            .attempt
            .backend
            .clone()
            .unwrap_or_else(|| "".into());
        let Some(client_upgrade) = client_upgrade else {
            let error = ProxyError::UpstreamFailed {
                backend: backend.to_string(),
                source: "the backend switched protocols without being asked to".into(),
            };
            return answer_error(&error, exchange);
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let (client_upgrade, lifecycle) = client_upgrade;
        tokio::spawn(tunnel(client_upgrade, backend_upgrade, backend, lifecycle));
    }
    let (mut parts, mut incoming) = response.into_parts();
    // A connection that switched protocols belongs to the tunnel now.
    let lease = if switching {
        None
    } else if incoming.is_end_stream() {
        lease.release();
        None
    } else {
        Some(lease)
    };
    remove_hop_by_hop(&mut parts.headers, switching);
    // An HTTP/2 backend's answer goes to the client in the client's own version.
    parts.version = Version::HTTP_11;
    add_proxy_headers(&mut parts.headers, &mut exchange, incoming.raw_fields_mut());
    if let Some(cache_status) = cache_status {
        parts.headers.insert(CACHE_STATUS.clone(), cache_status);
    }
    exchange.status = parts.status.as_u16();
    Response::from_parts(
        parts,
        ResponseBody::upstream(incoming, lease, read_timeout, exchange),
    )
}

static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

/// `uri` in origin form (`/path?query`), which is what backends get: an absolute-form target
/// (or HTTP/2's) loses its scheme and authority, the host travelling in `Host`.
fn origin_form(uri: http::Uri) -> http::Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let target = uri
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    http::Uri::from(target)
}

/// What this proxy adds to every answer it passes on: the request id, and HSTS on a TLS listener
/// that sets it (unless the answer has its own). An answer whose fields are kept as the bytes read
/// (`raw`) carries the request id with them.
fn add_proxy_headers(
    headers: &mut http::HeaderMap,
    exchange: &mut Exchange,
    raw: Option<&mut crate::raw_fields::RawFields>,
) {
    // Only the access log reads the request's id after this: without it, the id moves to the
    // answer rather than being shared with it.
    let request_id = if exchange.runtime.access_log.enabled() {
        exchange.request_id.clone()
    } else {
        std::mem::replace(&mut exchange.request_id, HeaderValue::from_static(""))
    };
    let raw_hsts = match raw {
        Some(raw) => {
            raw.request_id = Some(request_id);
            raw.has_hsts
        }
        None => {
            headers.insert(X_REQUEST_ID.clone(), request_id);
            false
        }
    };
    if let Some(hsts) = exchange
        .runtime
        .tls
        .as_ref()
        .and_then(|tls| tls.hsts.as_ref())
        && !raw_hsts
    {
        headers
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| hsts.clone());
    }
}

/// Passes an answer made by the cache on to the client.
fn respond_cached(
    mut exchange: Box<Exchange>,
    answer: crate::cache::CacheAnswer,
) -> Response<ResponseBody> {
    let crate::cache::CacheAnswer { mut parts, body } = answer;
    add_proxy_headers(&mut parts.headers, &mut exchange, None);
    exchange.status = parts.status.as_u16();
    let body = match body {
        crate::cache::CacheBody::Bytes(bytes) => ResponseBody::fixed(bytes, Some(exchange)),
        crate::cache::CacheBody::Fill(reader) => ResponseBody::shared(reader, exchange),
    };
    Response::from_parts(parts, body)
}

/// Copies bytes both ways between a client and a backend after a WebSocket handshake.
/// It holds a lifecycle receiver, so that a shutdown or a handover waits for it (within its grace
/// period) like for any connection, and it ends when the proxy closes.
async fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    backend_label: Arc<str>,
    mut lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(backend = %backend_label, %error, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut backend = hyper_util::rt::TokioIo::new(backend);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(error) = copied {
                tracing::debug!(backend = %backend_label, %error, "tunnel closed with an error");
            }
        }
        _ = lifecycle.wait_for(|state| *state == Lifecycle::Closing) => {}
    }
}

fn answer_error(error: &ProxyError, mut exchange: Box<Exchange>) -> Response<ResponseBody> {
    let (status, text, refusal) = error.answer();
    exchange.runtime.metrics.refused(refusal);
    match error.side() {
        Side::Upstream | Side::Proxy => {
            tracing::warn!(request_id = ?exchange.request_id, error = %ErrorChain(error), "request failed")
        }
        Side::Client => {
            tracing::debug!(request_id = ?exchange.request_id, error = %ErrorChain(error), "request refused")
        }
    }
    // Logged and counted as the error it is, even when a gRPC client is told in other words.
    exchange.status = status.as_u16();
    let request_id = exchange.request_id.clone();
    let hsts = exchange
        .runtime
        .tls
        .as_ref()
        .and_then(|tls| tls.hsts.clone());
    if exchange.grpc {
        return answer_grpc_error(status, text, request_id, exchange);
    }
    let mut response = Response::new(ResponseBody::fixed(text, Some(exchange)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(X_REQUEST_ID.clone(), request_id);
    if let Some(hsts) = hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts);
    }
    if matches!(refusal, Refusal::NoBackend | Refusal::QueueTimeout) {
        // Health checks go on; a client may come back shortly.
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ProxyError::RateLimited(limited) = error {
        // Whole seconds, rounded up, so that a client that waits that long gets through.
        let seconds =
            limited.retry_after.as_secs() + u64::from(limited.retry_after.subsec_nanos() > 0);
        let seconds = HeaderValue::from(seconds.max(1));
        headers.insert(header::RETRY_AFTER, seconds.clone());
        headers.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(limited.burst));
        headers.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from_static("0"));
        headers.insert(RATELIMIT_RESET.clone(), seconds);
    }
    // After a malformed request, or one whose body was not read, the connection cannot be trusted
    // to be in step with the client any more.
    let closes = matches!(error, ProxyError::RuleDenied { close: true, .. })
        || refusal == Refusal::RequestBanned;
    if closes
        || matches!(
            refusal,
            Refusal::BadRequest
                | Refusal::BodyTooLarge
                | Refusal::ClientBody
                | Refusal::BodyTooSlow
        )
    {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

// Made once: a name given as a string is parsed again on every use, and a flood of 429s uses
// them often.
static RATELIMIT_LIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: header::HeaderName =
    header::HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: header::HeaderName = header::HeaderName::from_static("ratelimit-reset");
static GRPC_STATUS: header::HeaderName = header::HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: header::HeaderName = header::HeaderName::from_static("grpc-message");

/// A gRPC "trailers-only" answer: status 200 with the outcome in `grpc-status` and `grpc-message`,
/// which is how a gRPC client learns of a failure (an HTTP error status reaches its application
/// only as a vague UNKNOWN or INTERNAL).
fn answer_grpc_error(
    status: StatusCode,
    text: &str,
    request_id: HeaderValue,
    exchange: Box<Exchange>,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::fixed("", Some(exchange)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        GRPC_STATUS.clone(),
        HeaderValue::from(u16::from(bouncer_rules::grpc_status_for_http(
            status.as_u16(),
        ))),
    );
    if let Ok(message) = HeaderValue::from_str(&bouncer_rules::grpc_message(text)) {
        headers.insert(GRPC_MESSAGE.clone(), message);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id);
    response
}

/// Displays an error with its chain of causes on one line.
struct ErrorChain<'a>(&'a ProxyError);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = std::error::Error::source(self.0);
        while let Some(inner) = cause {
            write!(f, ": {inner}")?;
            cause = inner.source();
        }
        Ok(())
    }
}

/// Refuses CONNECT and requests whose framing is ambiguous (RFC 9112 section 6).
fn check_framing(request: &Request<ClientBody>) -> Result<(), ProxyError> {
    if request.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    // A request with both Content-Length and Transfer-Encoding never gets here with both: hyper
    // drops the length, reads the chunked framing and closes the connection after the response
    // (RFC 9112 section 6.3), and Transfer-Encoding itself is not forwarded. The lean server
    // takes no request with a length.
    if request.body().lean_facts().is_some() {
        return Ok(());
    }
    let mut lengths = request.headers().get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next()
        && (lengths.any(|other| other != first) || parse_length(first).is_none())
    {
        return Err(ProxyError::BadRequest("invalid Content-Length"));
    }
    Ok(())
}

fn parse_length(value: &HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn declared_length(request: &Request<ClientBody>) -> Option<u64> {
    // The lean server takes no request with a length.
    match request.body() {
        ClientBody::Lean(_) => None,
        ClientBody::Hyper(_) => declared_length_of(request.headers()),
    }
}

fn declared_length_of(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(parse_length)
}

fn is_websocket_upgrade(request: &Request<ClientBody>) -> bool {
    // The lean server takes no request with an `Upgrade`.
    request.body().lean_facts().is_none()
        && request.version() == Version::HTTP_11
        && request.method() == Method::GET
        && request
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Where a request names its host: the `Host` header, or the target's authority (absolute-form
/// targets and HTTP/2's `:authority`). Both are cheap reference-counted clones.
#[derive(Clone, Debug)]
pub enum HostSource {
    Header(HeaderValue),
    Authority(Authority),
}

impl HostSource {
    fn as_str(&self) -> &str {
        match self {
            HostSource::Header(value) => value.to_str().unwrap_or(""),
            HostSource::Authority(authority) => authority.as_str(),
        }
    }
}

fn request_host(request: &Request<ClientBody>) -> Result<HostSource, ProxyError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if let Some(authority) = request.uri().authority() {
        return Ok(HostSource::Authority(authority.clone()));
    }
    match first {
        Some(value) if value.to_str().is_ok() => Ok(HostSource::Header(value.clone())),
        Some(_) => Err(ProxyError::BadRequest("invalid Host header")),
        None if request.version() == Version::HTTP_10 => {
            Ok(HostSource::Header(HeaderValue::from_static("")))
        }
        None => Err(ProxyError::BadRequest("missing Host header")),
    }
}

/// Lower-cases the host and strips its port and any trailing dot; borrows when nothing changes.
fn normalise_host(raw: &str) -> Result<Cow<'_, str>, ProxyError> {
    let invalid = ProxyError::BadRequest("invalid Host header");
    let bytes = raw.as_bytes();
    let without_port = if bytes.first() == Some(&b'[') {
        match bytes.iter().position(|&b| b == b']') {
            Some(end) => &raw[..=end],
            None => return Err(invalid),
        }
    } else {
        match bytes.iter().rposition(|&b| b == b':') {
            Some(colon) if bytes[colon + 1..].iter().all(u8::is_ascii_digit) => &raw[..colon],
            Some(_) => return Err(invalid),
            None => raw,
        }
    };
    let name = without_port.strip_suffix('.').unwrap_or(without_port);
    // One pass checks the characters and looks for capitals.
    let mut upper = false;
    for &b in name.as_bytes() {
        upper |= b.is_ascii_uppercase();
        if !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')) {
            return Err(invalid);
        }
    }
    Ok(if upper {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    })
}

/// One request's record: filled in as the request goes, then counted and logged when it is
/// dropped, which is when its response body is done (or abandoned).
pub struct Exchange {
    runtime: Arc<ListenerRuntime>,
    _in_flight: RequestGuard,
    started: Instant,
    request_id: HeaderValue,
    client: IpAddr,
    method: Method,
    /// The host and the target, for the access log only: kept when it writes.
    host: Option<HostSource>,
    uri: Option<http::Uri>,
    normalised_path: Option<String>,
    status: u16,
    body_progress: Option<Arc<BodyProgress>>,
    pub(crate) bytes_out: u64,
    route: Option<Arc<Route>>,
    /// The backend it went to, counted there for least-connections and peak-EWMA balancing.
    attempt: Attempt,
    pub(crate) upstream_body_failed: bool,
    /// A gRPC call, whose client reads errors from `grpc-status`.
    grpc: bool,
    /// Counts the request in flight for adaptive mode, when it watches that.
    _pressure: Option<crate::protection::InFlightGuard>,
}

impl Exchange {
    /// For an answer on an HTTP/2 connection: its part in the watch for a client that takes no
    /// data.
    pub(crate) fn send_watch(&self) -> Option<crate::conn::SendWatch> {
        self._in_flight
            .http2_activity()
            .map(|activity| crate::conn::SendWatch::new(Arc::clone(activity)))
    }
}

/// What the log and metrics say when the client went away before it was answered (as nginx does).
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.status == 0 {
            self.status = CLIENT_CLOSED_REQUEST;
        }
        // One reading of the clock serves the request's duration and the connection's idle clock.
        let now = crate::clock::now();
        let total = now.saturating_duration_since(self.started);
        self._in_flight.finish_at(now);
        let runtime = &self.runtime;
        runtime.metrics.requests_in_flight.dec();
        match &self.route {
            Some(route) => route.metrics.record(self.status, total),
            None => runtime.metrics.no_route.record(self.status, total),
        }
        if self.upstream_body_failed {
            runtime.metrics.refused(Refusal::UpstreamReset);
        }
        if !runtime.access_log.enabled() {
            return;
        }
        let path = self
            .normalised_path
            .as_deref()
            .or_else(|| self.uri.as_ref().map(http::Uri::path))
            .unwrap_or("");
        runtime.access_log.write(&crate::access_log::AccessRecord {
            request_id: self.request_id.to_str().unwrap_or("-"),
            client: self.client,
            method: self.method.as_str(),
            host: self.host.as_ref().map_or("", HostSource::as_str),
            path,
            status: self.status,
            bytes_in: self.body_progress.as_ref().map_or(0, |progress| {
                progress.bytes.load(std::sync::atomic::Ordering::Relaxed)
            }),
            bytes_out: self.bytes_out,
            listener: &runtime.name,
            route: self.route.as_ref().map_or("-", |route| &route.name),
            backend: self.attempt.backend.as_deref().unwrap_or(""),
            total,
            upstream: self.attempt.upstream_time,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_lower_cased_without_port_or_trailing_dot() {
        assert_eq!(
            normalise_host("App.Example:8080").ok().as_deref(),
            Some("app.example")
        );
        assert_eq!(
            normalise_host("app.example.").ok().as_deref(),
            Some("app.example")
        );
        assert_eq!(normalise_host("[::1]:80").ok().as_deref(), Some("[::1]"));
        assert!(matches!(
            normalise_host("app.example"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(normalise_host("bad host").is_err());
        assert!(normalise_host("a:b").is_err());
        assert!(normalise_host("[::1").is_err());
        assert_eq!(normalise_host("app:").ok().as_deref(), Some("app"));
        assert_eq!(normalise_host("[::1]").ok().as_deref(), Some("[::1]"));
    }
}
