//! The one error type of the request path: what failed, on which side, whether a retry is safe,
//! and its cause. Errors of hyper and the OS are classified into these kinds once, where they arrive.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which party a failure is attributed to, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("no route matches this request")]
    NoRoute,
    #[error("the request's host is not covered by the certificate its connection asked for")]
    Misdirected,
    #[error("the method is not supported by this proxy")]
    MethodNotAllowed,
    #[error("the client's request body failed")]
    ClientBody {
        #[source]
        source: BoxError,
    },
    #[error("cannot connect to backend {backend}")]
    ConnectFailed {
        backend: String,
        #[source]
        source: BoxError,
    },
    #[error("connecting to backend {backend} timed out")]
    ConnectTimeout { backend: String },
    #[error("backend {backend} sent no response headers within {timeout:?}")]
    ResponseTimeout { backend: String, timeout: Duration },
    #[error("backend {backend} closed or reset the connection before answering")]
    UpstreamReset {
        backend: String,
        #[source]
        source: BoxError,
    },
    #[error("no backend of upstream {upstream} is available")]
    NoBackendAvailable { upstream: String },
    #[error(
        "every backend of upstream {upstream} is at max_connections_per_server, and none freed up within {timeout:?}"
    )]
    QueueTimeout { upstream: String, timeout: Duration },
    #[error("backend {backend} failed while answering")]
    UpstreamFailed {
        backend: String,
        #[source]
        source: BoxError,
    },
    #[error("the request body arrived slower than {min_rate} bytes a second")]
    BodyTooSlow { min_rate: u64 },
    #[error("the client's address is refused by the IP lists")]
    Denied(Refusal),
    #[error("rate limit {} exceeded; retry in {:?}", .0.limit, .0.retry_after)]
    RateLimited(crate::protection::RateLimited),
    #[error("the request matched rule {rule}")]
    RuleDenied { rule: Arc<str>, close: bool },
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::NoRoute
            | ProxyError::Misdirected
            | ProxyError::MethodNotAllowed
            | ProxyError::ClientBody { .. }
            | ProxyError::Denied(_)
            | ProxyError::RateLimited(_)
            | ProxyError::RuleDenied { .. }
            | ProxyError::BodyTooSlow { .. } => Side::Client,
            ProxyError::ConnectFailed { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::ResponseTimeout { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::NoBackendAvailable { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::UpstreamFailed { .. } => Side::Upstream,
        }
    }

    /// Whether the request certainly never reached a backend, so that any method may be retried.
    pub fn never_reached_backend(&self) -> bool {
        match self {
            ProxyError::ConnectFailed { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::NoBackendAvailable { .. }
            | ProxyError::QueueTimeout { .. } => true,
            ProxyError::BadRequest(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::NoRoute
            | ProxyError::Misdirected
            | ProxyError::MethodNotAllowed
            | ProxyError::ClientBody { .. }
            | ProxyError::Denied(_)
            | ProxyError::RateLimited(_)
            | ProxyError::RuleDenied { .. }
            | ProxyError::BodyTooSlow { .. }
            | ProxyError::ResponseTimeout { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamFailed { .. } => false,
        }
    }

    /// The status and the short plain body the client gets, and the reason label for metrics.
    pub fn answer(&self) -> (StatusCode, &'static str, Refusal) {
        match self {
            ProxyError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                "bad request\n",
                Refusal::BadRequest,
            ),
            ProxyError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
                Refusal::BodyTooLarge,
            ),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no route\n", Refusal::NoRoute),
            ProxyError::Misdirected => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request\n",
                Refusal::Misdirected,
            ),
            ProxyError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                Refusal::MethodNotAllowed,
            ),
            ProxyError::ClientBody { .. } => (
                StatusCode::BAD_REQUEST,
                "request body incomplete\n",
                Refusal::ClientBody,
            ),
            ProxyError::ConnectFailed { .. } => (
                StatusCode::BAD_GATEWAY,
                "backend unavailable\n",
                Refusal::UpstreamConnect,
            ),
            ProxyError::ConnectTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "backend connect timeout\n",
                Refusal::UpstreamTimeout,
            ),
            ProxyError::ResponseTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "backend timeout\n",
                Refusal::UpstreamTimeout,
            ),
            ProxyError::UpstreamReset { .. } => (
                StatusCode::BAD_GATEWAY,
                "backend closed the connection\n",
                Refusal::UpstreamReset,
            ),
            ProxyError::NoBackendAvailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no backend available\n",
                Refusal::NoBackend,
            ),
            ProxyError::QueueTimeout { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "all backends busy\n",
                Refusal::QueueTimeout,
            ),
            ProxyError::UpstreamFailed { .. } => (
                StatusCode::BAD_GATEWAY,
                "backend error\n",
                Refusal::UpstreamReset,
            ),
            ProxyError::Denied(reason) => (StatusCode::FORBIDDEN, "forbidden\n", *reason),
            ProxyError::RuleDenied { .. } => (StatusCode::FORBIDDEN, "forbidden\n", Refusal::Rule),
            ProxyError::BodyTooSlow { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "request body too slow\n",
                Refusal::BodyTooSlow,
            ),
            ProxyError::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests\n",
                Refusal::RateLimit,
            ),
        }
    }
}

/// Why a request or connection was refused or failed, as counted in `bouncer_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    HeaderTimeout,
    NoRoute,
    MethodNotAllowed,
    ClientBody,
    UpstreamConnect,
    UpstreamTimeout,
    UpstreamReset,
    ProxyProtocol,
    NoBackend,
    QueueTimeout,
    TlsHandshake,
    TlsHandshakeTimeout,
    Misdirected,
    DenyList,
    NotAllowed,
    ConnectionLimit,
    ConnectionLimitPerIp,
    RateLimit,
    /// The IP lists, applied to a request behind a trusted proxy.
    RequestDenyList,
    RequestNotAllowed,
    /// A client that took no response data for the write timeout.
    WriteTimeout,
    /// A request body that arrived slower than `min_body_rate`.
    BodyTooSlow,
    /// An HTTP/2 connection closed by the library for abuse (ENHANCE_YOUR_CALM).
    H2Abuse,
    /// An HTTP/2 connection closed for broken framing.
    H2ProtocolError,
    /// A banned address, at accept.
    Banned,
    /// A banned address, on a request.
    RequestBanned,
    /// A request that matched a deny, ban or tarpit rule.
    Rule,
    /// An idle keep-alive connection closed to make room at the connection cap.
    IdleReaped,
}

impl Refusal {
    pub const ALL: [Refusal; 31] = [
        Refusal::BadRequest,
        Refusal::BodyTooLarge,
        Refusal::HeadersTooLarge,
        Refusal::HeaderTimeout,
        Refusal::NoRoute,
        Refusal::MethodNotAllowed,
        Refusal::ClientBody,
        Refusal::UpstreamConnect,
        Refusal::UpstreamTimeout,
        Refusal::UpstreamReset,
        Refusal::ProxyProtocol,
        Refusal::NoBackend,
        Refusal::QueueTimeout,
        Refusal::TlsHandshake,
        Refusal::TlsHandshakeTimeout,
        Refusal::Misdirected,
        Refusal::DenyList,
        Refusal::NotAllowed,
        Refusal::ConnectionLimit,
        Refusal::ConnectionLimitPerIp,
        Refusal::RateLimit,
        Refusal::RequestDenyList,
        Refusal::RequestNotAllowed,
        Refusal::WriteTimeout,
        Refusal::BodyTooSlow,
        Refusal::H2Abuse,
        Refusal::H2ProtocolError,
        Refusal::Banned,
        Refusal::RequestBanned,
        Refusal::Rule,
        Refusal::IdleReaped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::NoRoute => "no_route",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::ClientBody => "client_body",
            Refusal::UpstreamConnect => "upstream_connect",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::UpstreamReset => "upstream_reset",
            Refusal::ProxyProtocol => "proxy_protocol",
            Refusal::NoBackend => "no_backend",
            Refusal::QueueTimeout => "queue_timeout",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::TlsHandshakeTimeout => "tls_handshake_timeout",
            Refusal::Misdirected => "misdirected",
            Refusal::DenyList => "deny_list",
            Refusal::NotAllowed => "not_allowed",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::ConnectionLimitPerIp => "connection_limit_per_ip",
            Refusal::RateLimit => "rate_limit",
            Refusal::RequestDenyList => "deny_list",
            Refusal::RequestNotAllowed => "not_allowed",
            Refusal::WriteTimeout => "write_timeout",
            Refusal::BodyTooSlow => "body_too_slow",
            Refusal::H2Abuse => "h2_abuse",
            Refusal::H2ProtocolError => "h2_protocol_error",
            Refusal::Banned | Refusal::RequestBanned => "banned",
            Refusal::Rule => "rule",
            Refusal::IdleReaped => "idle_reaped",
        }
    }

    /// Where it was refused: `connection` (at accept, before any parsing), `tls`, `request`
    /// (checks and limits on a parsed request), or `upstream` (the backends failed it).
    pub fn layer(self) -> &'static str {
        match self {
            Refusal::ProxyProtocol
            | Refusal::DenyList
            | Refusal::NotAllowed
            | Refusal::ConnectionLimit
            | Refusal::ConnectionLimitPerIp
            | Refusal::WriteTimeout
            | Refusal::H2Abuse
            | Refusal::H2ProtocolError
            | Refusal::Banned
            | Refusal::IdleReaped => "connection",
            Refusal::TlsHandshake | Refusal::TlsHandshakeTimeout => "tls",
            Refusal::BadRequest
            | Refusal::BodyTooLarge
            | Refusal::HeadersTooLarge
            | Refusal::HeaderTimeout
            | Refusal::NoRoute
            | Refusal::MethodNotAllowed
            | Refusal::ClientBody
            | Refusal::Misdirected
            | Refusal::RateLimit
            | Refusal::RequestDenyList
            | Refusal::RequestNotAllowed
            | Refusal::BodyTooSlow
            | Refusal::RequestBanned
            | Refusal::Rule => "request",
            Refusal::UpstreamConnect
            | Refusal::UpstreamTimeout
            | Refusal::UpstreamReset
            | Refusal::NoBackend
            | Refusal::QueueTimeout => "upstream",
        }
    }

    /// The same refusal made on a request rather than on a connection.
    pub fn per_request(self) -> Refusal {
        match self {
            Refusal::DenyList => Refusal::RequestDenyList,
            Refusal::NotAllowed => Refusal::RequestNotAllowed,
            Refusal::Banned => Refusal::RequestBanned,
            other => other,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Finds an error of type `T` anywhere in `error`'s chain of causes.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(inner) = current {
        if let Some(found) = inner.downcast_ref::<T>() {
            return Some(found);
        }
        current = inner.source();
    }
    None
}

/// Displays an error with its chain of causes on one line, for logs.
pub struct Causes<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(inner) = cause {
            write!(f, ": {inner}")?;
            cause = inner.source();
        }
        Ok(())
    }
}
