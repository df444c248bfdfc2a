//! The admin listener: `GET /metrics` in the Prometheus text format, and a JSON API under
//! `/api/v1/` to look at the proxy and change it while it runs.
//!
//! It answers only to its own address or a configured name in `Host` (so that a DNS-rebinding
//! page cannot reach it through a browser), asks for the bearer token on every call when one is
//! configured, and refuses a state-changing call that a browser made for another origin.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Snapshot;
use crate::listener::Lifecycle;
use crate::metrics::Metrics;

/// Admin connections open at once, at most.
const MAX_CONNECTIONS: usize = 256;
/// How long an admin connection may take to send a request head, or wait between requests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;
/// How long a ban made through the API lasts when the call names no duration.
const DEFAULT_BAN: Duration = Duration::from_secs(3600);

const OPENAPI: &str = include_str!("admin/openapi.json");

/// What the admin API reads and acts on.
pub(crate) struct AdminState {
    pub metrics: Arc<Metrics>,
    /// What the running config built: upstreams, routes, the protection layer, the cache.
    pub live: Arc<ArcSwap<Snapshot>>,
    pub reloader: Arc<crate::reload::Reloader>,
    /// Set by the binary: how to change the log filter.
    pub log_control: Arc<arc_swap::ArcSwapOption<crate::LogControl>>,
    /// The bearer token every call must carry, when one is configured.
    pub token: Option<String>,
    /// Names besides IP literals that `Host` may give (lower case, without port).
    pub hosts: Vec<String>,
    pub address: SocketAddr,
    pub started: Instant,
    pub dashboard: crate::dashboard::Dashboard,
}

pub(crate) async fn serve(
    listener: Arc<TcpListener>,
    state: Arc<AdminState>,
    mut lifecycle: watch::Receiver<Lifecycle>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = lifecycle.wait_for(|state| *state != Lifecycle::Running) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Beyond the cap a connection is closed at once: the admin listener must not use up the
        // descriptors the proxy needs.
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            continue;
        };
        let state = Arc::clone(&state);
        let mut connection_lifecycle = lifecycle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(answer(&state, request).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // A connection that sends no request head for a while (idle between requests
            // included) is closed; a dashboard's event stream is an answer, and goes on.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(HEADER_TIMEOUT));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = connection_lifecycle.wait_for(|state| *state != Lifecycle::Running) => {}
            }
        });
    }
}

type AdminBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;
type AdminResponse = Response<AdminBody>;

const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// An API failure: its status and what to tell the caller.
struct Problem {
    status: StatusCode,
    message: String,
}

impl Problem {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

async fn answer(state: &AdminState, request: Request<Incoming>) -> AdminResponse {
    let result = match check_access(state, &request) {
        Ok(()) => route(state, request).await,
        Err(problem) => Err(problem),
    };
    result.unwrap_or_else(|problem| {
        let mut response = json_response(problem.status, &json!({ "error": problem.message }));
        if problem.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"bouncer admin\""),
            );
        }
        response
    })
}

/// The admin listener's own checks, before any route: the Host, the token, the origin.
fn check_access(state: &AdminState, request: &Request<Incoming>) -> Result<(), Problem> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| request.uri().authority().map(http::uri::Authority::as_str));
    if !host.is_some_and(|host| host_allowed(state, host)) {
        return Err(Problem::new(
            StatusCode::MISDIRECTED_REQUEST,
            "the Host header names neither this admin listener's address nor one of admin.hosts",
        ));
    }
    // The dashboard page holds no data (it asks for the token itself), so it is served to all.
    let page = request.method() == Method::GET && request.uri().path() == "/";
    if let Some(token) = state.token.as_ref().filter(|_| !page) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match given {
            None => {
                return Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "this call needs Authorization: Bearer <token> (admin.token_file)",
                ));
            }
            Some(given) if !same_secret(given.trim().as_bytes(), token.as_bytes()) => {
                return Err(Problem::new(StatusCode::UNAUTHORIZED, "wrong token"));
            }
            Some(_) => {}
        }
    }
    if changes_state(request.method()) && !same_origin(request.headers(), host) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "a browser sent this for another site's page: state-changing calls must come from the admin listener's own origin",
        ));
    }
    Ok(())
}

fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether `host` (as in a `Host` header) names this listener: an IP literal or `localhost`
/// with its port (a DNS-rebinding page has neither), or a configured name.
fn host_allowed(state: &AdminState, host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let (name, port) = split_host_port(&host);
    if port.is_some_and(|port| port != state.address.port()) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.parse::<IpAddr>().is_ok()
        || name == "localhost"
        || state.hosts.iter().any(|allowed| allowed == name)
}

fn split_host_port(host: &str) -> (&str, Option<u16>) {
    // An IPv6 literal keeps its colons inside brackets.
    let after_bracket = host.rfind(']').map_or(0, |end| end + 1);
    match host[after_bracket..].rfind(':') {
        Some(colon) => {
            let colon = after_bracket + colon;
            (&host[..colon], host[colon + 1..].parse().ok())
        }
        None => (host, None),
    }
}

/// A browser names the page that sent a request in `Origin` and says whether it was another
/// site in `Sec-Fetch-Site`; tools such as curl send neither, and are let through.
fn same_origin(headers: &HeaderMap, host: Option<&str>) -> bool {
    if let Some(site) = headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match headers.get(header::ORIGIN).map(|value| value.to_str()) {
        None => true,
        Some(Ok(origin)) => {
            let origin = origin.trim().to_ascii_lowercase();
            let authority = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            authority.is_some_and(|authority| {
                host.is_some_and(|host| host.trim().eq_ignore_ascii_case(authority))
            })
        }
        Some(Err(_)) => false,
    }
}

/// Compares a secret without stopping at the first difference, so that timing does not tell
/// how much of a guess was right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

async fn route(state: &AdminState, request: Request<Incoming>) -> Result<AdminResponse, Problem> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let method = request.method().clone();
    match (method, segments.as_slice()) {
        (Method::GET, ["metrics"]) => Ok(text_response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(state.metrics.encode()),
        )),
        (Method::GET, []) => Ok(dashboard_page()),
        (Method::GET, ["api", "v1", "dashboard"]) => Ok(text_response(
            StatusCode::OK,
            "application/json",
            dashboard_now(state),
        )),
        (Method::GET, ["api", "v1", "events"]) => Ok(events(state)),
        (Method::GET, ["api", "v1"] | ["api", "v1", "status"]) => Ok(ok(status(state))),
        (Method::GET, ["api", "v1", "openapi.json"]) => Ok(text_response(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(OPENAPI.as_bytes()),
        )),
        (Method::GET, ["api", "v1", "config"]) => Ok(ok(config(state))),
        (Method::GET, ["api", "v1", "upstreams"]) => Ok(ok(upstreams(state))),
        (
            Method::POST,
            [
                "api",
                "v1",
                "upstreams",
                upstream,
                "backends",
                backend,
                action,
            ],
        ) => {
            let drained = match *action {
                "drain" => true,
                "undrain" => false,
                other => {
                    return Err(Problem::not_found(format!(
                        "no action \"{other}\" on a backend: use drain or undrain"
                    )));
                }
            };
            drain(state, upstream, backend, drained).map(ok)
        }
        (Method::POST, ["api", "v1", "reload"]) => reload(state).await.map(ok),
        (_, ["api", "v1", "reload"]) => {
            Err(Problem::new(StatusCode::METHOD_NOT_ALLOWED, "use POST"))
        }
        (Method::GET, ["api", "v1", "log-level"]) => log_level(state).map(ok),
        (Method::PUT, ["api", "v1", "log-level"]) => {
            let body = read_json(request).await?;
            set_log_level(state, &body).map(ok)
        }
        (_, ["api", "v1", "log-level"]) => Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET to read the log filter or PUT to change it",
        )),
        (Method::GET, ["api", "v1", "bans"]) => Ok(ok(bans(state))),
        (Method::POST, ["api", "v1", "bans"]) => {
            let body = read_json(request).await?;
            add_ban(state, &body).map(|value| json_response(StatusCode::CREATED, &value))
        }
        (Method::DELETE, ["api", "v1", "bans", ip]) => remove_ban(state, ip).map(ok),
        (Method::POST, ["api", "v1", "cache", "purge"]) => {
            let body = read_json(request).await?;
            purge(state, &body).map(ok)
        }
        (
            _,
            ["metrics"]
            | ["api", "v1"]
            | [
                "api",
                "v1",
                "status" | "openapi.json" | "config" | "upstreams",
            ],
        ) => Err(Problem::new(StatusCode::METHOD_NOT_ALLOWED, "use GET")),
        (_, ["api", "v1", "upstreams", _, "backends", _, _] | ["api", "v1", "cache", "purge"]) => {
            Err(Problem::new(StatusCode::METHOD_NOT_ALLOWED, "use POST"))
        }
        (_, ["api", "v1", "bans"]) => Err(Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET to list bans or POST to add one",
        )),
        (_, ["api", "v1", "bans", _]) => {
            Err(Problem::new(StatusCode::METHOD_NOT_ALLOWED, "use DELETE"))
        }
        _ => Err(Problem::not_found(format!(
            "no such endpoint: {path} (see /api/v1/openapi.json)"
        ))),
    }
}

/// The dashboard page: one self-contained file, embedded in the binary.
fn dashboard_page() -> AdminResponse {
    let mut response = text_response(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Bytes::from_static(DASHBOARD.as_bytes()),
    );
    // Its script and style are inline; nothing else may load, and no other site may frame it.
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'",
        ),
    );
    response
}

/// The dashboard's picture now, taking a first sample if none was taken yet.
fn dashboard_now(state: &AdminState) -> Bytes {
    let current = state.dashboard.current();
    if !current.is_empty() {
        return current;
    }
    crate::dashboard::sample(state);
    state.dashboard.current()
}

/// Server-sent events: the dashboard's picture now, then each new one (every second).
fn events(state: &AdminState) -> AdminResponse {
    let first = dashboard_now(state);
    let updates = state.dashboard.subscribe();
    let frame = |json: Bytes| {
        let mut event = Vec::with_capacity(json.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&json);
        event.extend_from_slice(b"\n\n");
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(event)))
    };
    let later = futures_util::stream::unfold(updates, move |mut updates| async move {
        updates.changed().await.ok()?;
        let json = updates.borrow_and_update().clone();
        Some((frame(json), updates))
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { frame(first) }),
        later,
    );
    with_headers(
        Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream))),
        StatusCode::OK,
        "text/event-stream",
    )
}

fn ok(value: Value) -> AdminResponse {
    json_response(StatusCode::OK, &value)
}

fn json_response(status: StatusCode, value: &Value) -> AdminResponse {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    text_response(status, "application/json", Bytes::from(body))
}

fn text_response(status: StatusCode, content_type: &'static str, body: Bytes) -> AdminResponse {
    with_headers(Response::new(Full::new(body).boxed()), status, content_type)
}

fn with_headers(
    mut response: AdminResponse,
    status: StatusCode,
    content_type: &'static str,
) -> AdminResponse {
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    // Nothing here is for another site to frame or sniff.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// The body of a call as JSON, bounded in size.
async fn read_json(request: Request<Incoming>) -> Result<Value, Problem> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(';')
                .next()
                .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as Content-Type: application/json",
        ));
    }
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes or was cut off"),
            )
        })?
        .to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .map_err(|error| Problem::bad_request(format!("the body is not valid JSON: {error}")))?;
    if !value.is_object() {
        return Err(Problem::bad_request("the body must be a JSON object"));
    }
    Ok(value)
}

fn status(state: &AdminState) -> Value {
    let snapshot = state.live.load();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "config_file": snapshot.config.source.display().to_string(),
        "listeners": snapshot.listeners.iter().map(|(name, address)| json!({
            "name": name,
            "address": address.to_string(),
        })).collect::<Vec<_>>(),
        "admin": state.address.to_string(),
        "cache": snapshot.cache.is_some(),
        "cluster": snapshot.protection.cluster().map(|cluster| json!({ "redis_up": cluster.is_up() })),
    })
}

fn config(state: &AdminState) -> Value {
    let snapshot = state.live.load();
    json!({
        "config_file": snapshot.config.source.display().to_string(),
        "config": bouncer_config::redacted_json(&snapshot.config),
    })
}

fn upstreams(state: &AdminState) -> Value {
    upstreams_json(&state.live.load())
}

/// Every upstream with each backend's state, load and counters.
pub(crate) fn upstreams_json(snapshot: &Snapshot) -> Value {
    let now = tokio::time::Instant::now();
    let list: Vec<Value> = snapshot
        .upstreams
        .iter()
        .map(|upstream| {
            let set = upstream.current();
            let backends: Vec<Value> = set
                .backends
                .iter()
                .map(|backend| {
                    let health = &backend.health;
                    json!({
                        "address": backend.label.as_ref(),
                        "server": backend.authority.as_str(),
                        "state": backend_state(backend, now),
                        "healthy": health.is_healthy(now),
                        "checks_passing": health.is_up(),
                        "ejected": health.is_ejected(now),
                        "drained": health.is_drained(),
                        "weight": backend.load.weight(),
                        "backup": backend.load.backup(),
                        "in_flight": backend.load.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                        "latency_ms": backend.load.recent_latency().map(|latency| latency.as_secs_f64() * 1000.0),
                        "requests": backend.metrics.requests.get(),
                        "failures": backend.metrics.failures.get(),
                        "ejections": backend.metrics.ejections.get(),
                    })
                })
                .collect();
            json!({
                "name": upstream.name.as_ref(),
                "balance": upstream.config.balance.name(),
                "backends": backends,
            })
        })
        .collect();
    json!({ "upstreams": list })
}

fn backend_state(backend: &crate::upstream::Backend, now: tokio::time::Instant) -> &'static str {
    let health = &backend.health;
    if !health.is_up() {
        "down"
    } else if health.is_ejected(now) {
        "ejected"
    } else if health.is_drained() {
        "drained"
    } else {
        "up"
    }
}

fn drain(
    state: &AdminState,
    upstream_name: &str,
    address: &str,
    drained: bool,
) -> Result<Value, Problem> {
    let snapshot = state.live.load();
    let upstream = snapshot
        .upstreams
        .iter()
        .find(|upstream| &*upstream.name == upstream_name)
        .ok_or_else(|| Problem::not_found(format!("no upstream \"{upstream_name}\"")))?;
    let set = upstream.current();
    let backend = set
        .backends
        .iter()
        .find(|backend| &*backend.label == address || backend.authority.as_str() == address)
        .ok_or_else(|| {
            Problem::not_found(format!(
                "upstream \"{upstream_name}\" has no backend \"{address}\" (give ip:port as GET /api/v1/upstreams lists it)"
            ))
        })?;
    let changed = backend.health.set_drained(drained);
    if changed {
        tracing::info!(upstream = upstream_name, backend = %backend.label, drained, "backend drain changed through the admin API");
    }
    Ok(json!({
        "upstream": upstream_name,
        "backend": backend.label.as_ref(),
        "drained": drained,
        "changed": changed,
        "in_flight": backend.load.in_flight.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

/// Reads the config file again and applies it; a config with problems is refused with them all.
async fn reload(state: &AdminState) -> Result<Value, Problem> {
    match state.reloader.reload_from_file().await {
        Ok(report) => Ok(json!({
            "reloaded": true,
            "upstreams_changed": report.upstreams_changed,
            "protection_rebuilt": report.protection_rebuilt,
        })),
        Err(crate::ReloadError::Invalid(problems)) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the config file has problems; the running config stays:\n{problems}"),
        )),
        Err(error @ crate::ReloadError::NeedsRestart { .. }) => {
            Err(Problem::new(StatusCode::CONFLICT, error.to_string()))
        }
        Err(error @ crate::ReloadError::Build(_)) => {
            let cause = std::error::Error::source(&error)
                .map(|cause| format!(": {cause}"))
                .unwrap_or_default();
            Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{error}{cause}"),
            ))
        }
    }
}

fn log_control(state: &AdminState) -> Result<Arc<crate::LogControl>, Problem> {
    state.log_control.load_full().ok_or_else(|| {
        Problem::new(
            StatusCode::CONFLICT,
            "this process's logger is not adjustable (only the bouncer binary's is)",
        )
    })
}

fn log_level(state: &AdminState) -> Result<Value, Problem> {
    let control = log_control(state)?;
    let current = control
        .current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Ok(json!({ "filter": current }))
}

fn set_log_level(state: &AdminState, body: &Value) -> Result<Value, Problem> {
    let control = log_control(state)?;
    let filter = body
        .get("filter")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|filter| !filter.is_empty())
        .ok_or_else(|| {
            Problem::bad_request(
                "\"filter\" is required: a level such as \"debug\", or directives such as \"info,bouncer_proxy=debug\"",
            )
        })?;
    // Held across the change, so that two calls at once leave the filter reported the one in
    // force.
    let mut current = control
        .current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    (control.set)(filter)
        .map_err(|reason| Problem::bad_request(format!("\"filter\": {reason}")))?;
    *current = filter.to_string();
    drop(current);
    tracing::info!(filter, "log filter changed through the admin API");
    Ok(json!({ "filter": filter }))
}

fn bans(state: &AdminState) -> Value {
    let mut bans = state.live.load().protection.bans();
    bans.sort_unstable_by_key(|(ip, _)| *ip);
    json!({
        "bans": bans.iter().map(|(ip, left)| json!({
            "ip": ip.to_string(),
            "expires_in_seconds": left.as_secs(),
        })).collect::<Vec<_>>(),
    })
}

fn add_ban(state: &AdminState, body: &Value) -> Result<Value, Problem> {
    let ip = body.get("ip").and_then(Value::as_str).ok_or_else(|| {
        Problem::bad_request("\"ip\" is required: the address to ban, as a string")
    })?;
    let ip = parse_ip(ip)?;
    let duration = match body.get("duration") {
        None | Some(Value::Null) => DEFAULT_BAN,
        Some(Value::String(text)) => bouncer_config::parse_duration(text)
            .map_err(|reason| Problem::bad_request(format!("\"duration\": {reason}")))?,
        Some(_) => {
            return Err(Problem::bad_request(
                "\"duration\" must be a string such as \"10m\"",
            ));
        }
    };
    if duration.is_zero() {
        return Err(Problem::bad_request(
            "\"duration\" must be longer than zero",
        ));
    }
    let reason = match body.get("reason") {
        None | Some(Value::Null) => "admin API",
        Some(Value::String(text)) => text.as_str(),
        Some(_) => return Err(Problem::bad_request("\"reason\" must be a string")),
    };
    state.live.load().protection.ban_for(ip, duration, reason);
    Ok(json!({ "ip": ip.to_string(), "duration_seconds": duration.as_secs() }))
}

fn remove_ban(state: &AdminState, ip: &str) -> Result<Value, Problem> {
    let ip = parse_ip(ip)?;
    let was_banned = state.live.load().protection.unban(ip);
    Ok(json!({ "ip": ip.to_string(), "was_banned": was_banned }))
}

fn parse_ip(text: &str) -> Result<IpAddr, Problem> {
    text.parse::<IpAddr>()
        .map(bouncer_config::canonical_ip)
        .map_err(|_| Problem::bad_request(format!("\"{text}\" is not an IP address")))
}

/// Purges by `url` (every route that caches it), by `prefix` (optionally of one `host`), or by
/// `tag`.
fn purge(state: &AdminState, body: &Value) -> Result<Value, Problem> {
    let snapshot = state.live.load();
    let Some(cache) = &snapshot.cache else {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "no route caches: there is nothing to purge",
        ));
    };
    let field = |name: &str| -> Result<Option<&str>, Problem> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.as_str())),
            Some(_) => Err(Problem::bad_request(format!("\"{name}\" must be a string"))),
        }
    };
    let (url, prefix, tag, host) = (
        field("url")?,
        field("prefix")?,
        field("tag")?,
        field("host")?,
    );
    let purged = match (url, prefix, tag) {
        (Some(url), None, None) => purge_url(state, url)?,
        (None, Some(prefix), None) => {
            if !prefix.starts_with('/') {
                return Err(Problem::bad_request(
                    "\"prefix\" is a path and starts with /",
                ));
            }
            let host = host.map(str::to_ascii_lowercase);
            cache.purge_prefix(host.as_deref(), prefix)
        }
        (None, None, Some(tag)) if !tag.is_empty() => cache.purge_tag(tag),
        _ => {
            return Err(Problem::bad_request(
                "give exactly one of \"url\", \"prefix\" (with an optional \"host\") or \"tag\"",
            ));
        }
    };
    tracing::info!(
        ?url,
        ?prefix,
        ?tag,
        purged,
        "cache purged through the admin API"
    );
    Ok(json!({ "purged": purged }))
}

fn purge_url(state: &AdminState, url: &str) -> Result<usize, Problem> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| Problem::bad_request(format!("\"{url}\" is not a URL")))?;
    let host = uri
        .host()
        .ok_or_else(|| Problem::bad_request("\"url\" must be absolute: http://host/path"))?
        .to_ascii_lowercase();
    let path = bouncer_rules::normalise_path(uri.path())
        .map_err(|error| Problem::bad_request(format!("the URL's path: {error}")))?;
    let snapshot = state.live.load();
    let mut purged = 0;
    let mut seen = Vec::new();
    for runtime in &snapshot.runtimes {
        let Some(route) = runtime.routes.find(&host, &path) else {
            continue;
        };
        let Some(route_cache) = &route.cache else {
            continue;
        };
        // Routes shared by several listeners are purged once.
        if seen.iter().any(|known| Arc::ptr_eq(known, route)) {
            continue;
        }
        seen.push(Arc::clone(route));
        purged += route_cache.purge_url(&host, &path, uri.query());
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_split_around_ipv6_brackets() {
        assert_eq!(split_host_port("127.0.0.1:9900"), ("127.0.0.1", Some(9900)));
        assert_eq!(split_host_port("[::1]:9900"), ("[::1]", Some(9900)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
        assert_eq!(split_host_port("admin.internal"), ("admin.internal", None));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
    }

    #[test]
    fn a_page_of_another_origin_may_not_change_state() {
        let mut headers = HeaderMap::new();
        assert!(same_origin(&headers, Some("127.0.0.1:9900")));
        headers.insert(
            header::ORIGIN,
            http::HeaderValue::from_static("http://127.0.0.1:9900"),
        );
        assert!(same_origin(&headers, Some("127.0.0.1:9900")));
        headers.insert(
            header::ORIGIN,
            http::HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&headers, Some("127.0.0.1:9900")));
        headers.insert(header::ORIGIN, http::HeaderValue::from_static("null"));
        assert!(!same_origin(&headers, Some("127.0.0.1:9900")));
        let mut fetch = HeaderMap::new();
        fetch.insert(
            "sec-fetch-site",
            http::HeaderValue::from_static("cross-site"),
        );
        assert!(!same_origin(&fetch, Some("127.0.0.1:9900")));
    }
}
