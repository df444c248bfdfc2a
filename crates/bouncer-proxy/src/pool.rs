//! Connections to one backend.
//!
//! HTTP/1.1: idle keep-alive connections are kept, the most recently used handed out first (it is
//! the least likely to have been closed by the backend), and one that the backend closed or that
//! idled too long is dropped. A connection goes back to the pool only when its response was read to
//! the end, so that it is never shared by two requests.
//!
//! HTTP/2 (`h2` and `h2c`): every request shares one multiplexed connection, opened by the first
//! request that finds none and replaced when it closes. WebSocket upgrades, which HTTP/2 cannot
//! carry, still go on HTTP/1.1 connections of their own.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::header;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode};
use hyper::body::Body as _;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{RequestBody, UpstreamBody};
use crate::h1client::{ExchangeFailure, LeanConnection, LeanError};
use crate::tls::UpstreamTls;
use crate::upstream::Wire;

/// TCP keep-alive probes on backend connections, so that a backend that vanished without closing
/// its sockets is noticed even on an idle pooled connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// HTTP/2 PINGs on a shared backend connection: its silence would otherwise hide a dead backend
/// from every request that is multiplexed on it.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request could not be sent to a backend.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the backend failed")]
    Connect(#[source] io::Error),
    #[error("connecting to the backend timed out")]
    ConnectTimeout,
    #[error("the TLS handshake with the backend failed")]
    Tls(#[source] io::Error),
    #[error("the HTTP handshake with the backend failed")]
    Handshake(#[source] hyper::Error),
    #[error("connecting to the backend failed while this request waited for that connection")]
    SharedConnectFailed,
    #[error("the exchange with the backend failed")]
    Exchange(#[source] hyper::Error),
    #[error("the exchange with the backend failed")]
    Lean(#[source] LeanError),
    #[error("the backend did not answer before the response deadline")]
    ResponseTimeout,
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            SendError::Connect(_)
                | SendError::ConnectTimeout
                | SendError::Tls(_)
                | SendError::Handshake(_)
                | SendError::SharedConnectFailed
        )
    }
}

/// How a pool behaves; taken from the upstream's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

pub struct ConnectionPool {
    target: SocketAddr,
    label: Arc<str>,
    /// TLS to the backend, with the name its certificate must carry.
    tls: Option<(Arc<UpstreamTls>, rustls_pki_types::ServerName<'static>)>,
    /// Whether requests share one HTTP/2 connection rather than take HTTP/1.1 ones in turn.
    http2: bool,
    /// Settings live beside the idle connections, under one lock that is taken anyway, so that a
    /// reload can change them for a pool that carries on.
    idle: Mutex<Idle>,
    /// The HTTP/2 connection that requests share, while it is open.
    shared: Mutex<Option<http2::SendRequest<RequestBody>>>,
    /// Held while the shared connection is opened, so that a burst of requests opens one.
    opening: tokio::sync::Mutex<()>,
    /// Failed attempts to open the shared connection. A request that waited for an attempt that
    /// failed fails too rather than try again itself, so that a dead backend costs a burst one
    /// connect timeout, not one after another.
    failed_opens: std::sync::atomic::AtomicU64,
}

struct Idle {
    connections: VecDeque<IdleConnection>,
    /// Connections of the lean client (see `h1client`), most recently returned last.
    lean: VecDeque<IdleLean>,
    settings: PoolSettings,
}

impl Idle {
    /// Makes room for one more idle connection within `max_idle`, which bounds both kinds
    /// together, by closing the oldest; false when no connection may idle at all.
    fn make_room(&mut self) -> bool {
        if self.settings.max_idle == 0 {
            return false;
        }
        while self.connections.len() + self.lean.len() >= self.settings.max_idle {
            let oldest_is_lean = match (self.lean.front(), self.connections.front()) {
                (Some(lean), Some(hyper)) => lean.since <= hyper.since,
                (Some(_), None) => true,
                _ => false,
            };
            if oldest_is_lean {
                self.lean.pop_front();
            } else if self.connections.pop_front().is_none() {
                break;
            }
        }
        true
    }
}

struct IdleLean {
    connection: Box<LeanConnection>,
    since: Instant,
}

struct IdleConnection {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl ConnectionPool {
    /// Makes a pool for `target`; inside a Tokio runtime it also starts a sweeper that closes
    /// connections idle for longer than the idle timeout, and that ends with the pool.
    pub fn new(
        target: SocketAddr,
        label: Arc<str>,
        settings: PoolSettings,
        tls: Option<(Arc<UpstreamTls>, rustls_pki_types::ServerName<'static>)>,
        http2: bool,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            target,
            label,
            tls,
            http2,
            idle: Mutex::new(Idle {
                connections: VecDeque::new(),
                lean: VecDeque::new(),
                settings,
            }),
            shared: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            failed_opens: std::sync::atomic::AtomicU64::new(0),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep_idle(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Takes a reloaded config's settings; connections already idle stay.
    pub fn update_settings(&self, settings: PoolSettings) {
        self.lock().settings = settings;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settings(&self) -> PoolSettings {
        self.lock().settings.clone()
    }

    /// Sends `request` on a pooled connection, or a new one. A request that a reused connection
    /// refused before writing any of it (the backend had just closed it) is sent again on another
    /// connection, as it cannot have reached the backend.
    ///
    /// On failure the request comes back when none of it was sent, so that it can go to another
    /// backend.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Lease), (SendError, Option<Request<RequestBody>>)> {
        if self.http2 && !request.headers().contains_key(header::UPGRADE) {
            return self.send_multiplexed(request).await;
        }
        loop {
            let (mut sender, reused) = match self.take_idle().await {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare on a warm pool, and its large future would otherwise
                // make every send bigger to create and move.
                None => match Box::pin(self.connect_http1()).await {
                    Ok(sender) => (sender, false),
                    Err(error) => return Err((error, Some(request))),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        returning: Some((sender, Arc::clone(self))),
                    };
                    return Ok((response.map(UpstreamBody::Hyper), lease));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    unsent => return Err((SendError::Exchange(error.into_error()), unsent)),
                },
            }
        }
    }

    /// Sends `request` on the shared HTTP/2 connection, opened first when there is none. A request
    /// refused by a connection that closed meanwhile is sent on a new one.
    async fn send_multiplexed(
        &self,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Lease), (SendError, Option<Request<RequestBody>>)> {
        into_http2_form(&mut request, self.tls.is_some());
        let mut refusals = 0;
        loop {
            let (mut sender, reused) = match self.shared_connection() {
                Some(sender) => (sender, true),
                None => match Box::pin(self.open_shared()).await {
                    Ok(opened) => opened,
                    Err(error) => return Err((error, Some(request))),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok((response.map(UpstreamBody::Hyper), Lease { returning: None }));
                }
                Err(mut error) => match error.take_message() {
                    // A connection that closed before taking the request; the next one is new.
                    Some(unsent) if reused && refusals < 2 => {
                        refusals += 1;
                        self.forget_shared();
                        request = unsent;
                    }
                    unsent => return Err((SendError::Exchange(error.into_error()), unsent)),
                },
            }
        }
    }

    /// Whether `request` goes on a lean connection ([`Self::send_lean`]) rather than hyper's: a
    /// request without a body, not an upgrade, to a plain HTTP/1 backend.
    pub fn takes_lean(&self, request: &Request<RequestBody>) -> bool {
        self.tls.is_none()
            && !self.http2
            && request.body().is_end_stream()
            && !request.headers().contains_key(header::UPGRADE)
    }

    /// Sends a request that [`Self::takes_lean`] on a lean connection of its own task (see
    /// `h1client`), pooled or new. A reused connection that turns out closed before any of the
    /// request was written is replaced, as for hyper's connections. The request is only read, so
    /// that it can be sent again as it is; a failure says whether none of it was sent. `wire` says
    /// what the exchange adds to the request and whether the answer's fields may stay as read;
    /// `now` is a fresh reading of the clock, to judge how long pooled connections were idle.
    pub async fn send_lean(
        self: &Arc<Self>,
        request: &Request<RequestBody>,
        now: Instant,
        response_deadline: Instant,
        wire: Wire<'_>,
    ) -> Result<(Response<UpstreamBody>, Lease), (SendError, bool)> {
        loop {
            let (connection, reused) = match self.pop_lean(now) {
                Some(connection) => (connection, true),
                None => match Box::pin(self.connect_lean(response_deadline)).await {
                    Ok(connection) => (connection, false),
                    // Nothing was sent; but the deadline is the request's, not this backend's.
                    Err(SendError::ResponseTimeout) => {
                        return Err((SendError::ResponseTimeout, false));
                    }
                    Err(error) => return Err((error, true)),
                },
            };
            match connection
                .exchange(request, self, response_deadline, wire)
                .await
            {
                Ok((head, body)) => {
                    let mut response = Response::new(UpstreamBody::Lean(body));
                    *response.status_mut() = head.status;
                    *response.version_mut() = head.version;
                    *response.headers_mut() = head.headers;
                    return Ok((response, Lease { returning: None }));
                }
                Err(failure) if failure.unsent && reused => {}
                Err(ExchangeFailure {
                    error: LeanError::ResponseTimeout,
                    unsent,
                }) => return Err((SendError::ResponseTimeout, unsent)),
                Err(failure) => return Err((SendError::Lean(failure.error), failure.unsent)),
            }
        }
    }

    /// Connects within the connect timeout, or by the response deadline when that comes first.
    async fn connect_lean(
        &self,
        response_deadline: Instant,
    ) -> Result<Box<LeanConnection>, SendError> {
        let connect_deadline = Instant::now() + self.settings().connect_timeout;
        let deadline = connect_deadline.min(response_deadline);
        tokio::time::timeout_at(deadline, self.open_stream())
            .await
            .map_err(|_| {
                if deadline < connect_deadline {
                    SendError::ResponseTimeout
                } else {
                    SendError::ConnectTimeout
                }
            })?
            .map(LeanConnection::new)
    }

    /// The most recently returned lean connection that is still usable, `now`.
    fn pop_lean(&self, now: Instant) -> Option<Box<LeanConnection>> {
        let mut idle = self.lock();
        let idle_timeout = idle.settings.idle_timeout;
        while let Some(entry) = idle.lean.pop_back() {
            if entry.connection.is_usable() && now.duration_since(entry.since) < idle_timeout {
                return Some(entry.connection);
            }
        }
        None
    }

    /// Takes back a lean connection whose response was read to its end.
    pub(crate) fn give_back_lean(&self, connection: Box<LeanConnection>) {
        let mut idle = self.lock();
        if !idle.make_room() {
            return;
        }
        idle.lean.push_back(IdleLean {
            connection,
            since: crate::clock::now(),
        });
    }

    fn shared_connection(&self) -> Option<http2::SendRequest<RequestBody>> {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|sender| !sender.is_closed())
            .cloned()
    }

    /// Drops the shared connection, so that the next request opens another. Requests already on
    /// it keep their streams.
    fn forget_shared(&self) {
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Opens the shared connection, or takes the one another request opened meanwhile; the bool
    /// says whether it was taken.
    async fn open_shared(&self) -> Result<(http2::SendRequest<RequestBody>, bool), SendError> {
        use std::sync::atomic::Ordering;
        let failures_before = self.failed_opens.load(Ordering::Acquire);
        let _opening = self.opening.lock().await;
        if let Some(sender) = self.shared_connection() {
            return Ok((sender, true));
        }
        if self.failed_opens.load(Ordering::Acquire) != failures_before {
            return Err(SendError::SharedConnectFailed);
        }
        match self.connect_http2().await {
            Ok(sender) => {
                *self.shared.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
                Ok((sender, false))
            }
            Err(error) => {
                self.failed_opens.fetch_add(1, Ordering::AcqRel);
                Err(error)
            }
        }
    }

    /// Sends one request on a connection of its own, closed afterwards: a health check, which
    /// must find out whether the backend takes new connections.
    pub async fn probe(&self, mut request: Request<RequestBody>) -> Result<StatusCode, SendError> {
        let response = if self.http2 {
            into_http2_form(&mut request, self.tls.is_some());
            let mut sender = self.connect_http2().await?;
            sender.send_request(request).await
        } else {
            request
                .headers_mut()
                .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            let mut sender = self.connect_http1().await?;
            sender.send_request(request).await
        };
        response
            .map(|response| response.status())
            .map_err(SendError::Exchange)
    }

    /// The most recently returned live connection, once it is ready for another request.
    async fn take_idle(&self) -> Option<SendRequest<RequestBody>> {
        loop {
            let (mut sender, patience) = self.pop_idle()?;
            if sender.is_ready() {
                return Some(sender);
            }
            // It was returned when its response ended; its connection task has not run since to
            // take the next request. That takes one turn of the scheduler, unless the backend
            // closed the connection meanwhile.
            if let Ok(Ok(())) = tokio::time::timeout(patience, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    /// The most recent live idle connection, with how long to wait for it to be ready.
    fn pop_idle(&self) -> Option<(SendRequest<RequestBody>, Duration)> {
        let now = Instant::now();
        let mut idle = self.lock();
        let Idle {
            connections,
            settings,
            ..
        } = &mut *idle;
        while let Some(connection) = connections.pop_back() {
            if !connection.sender.is_closed()
                && now.duration_since(connection.since) < settings.idle_timeout
            {
                return Some((connection.sender, settings.connect_timeout));
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if !idle.make_room() {
            return;
        }
        idle.connections.push_back(IdleConnection {
            sender,
            since: Instant::now(),
        });
    }

    /// Drops the connections that idled too long or that the backend closed.
    fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.lock();
        let idle_timeout = idle.settings.idle_timeout;
        idle.connections.retain(|connection| {
            !connection.sender.is_closed() && now.duration_since(connection.since) < idle_timeout
        });
        idle.lean.retain(|entry| {
            entry.connection.is_usable() && now.duration_since(entry.since) < idle_timeout
        });
    }

    async fn connect_http1(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let connect_timeout = self.settings().connect_timeout;
        // One deadline for TCP, TLS and the HTTP handshake together.
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let handshake = async {
            match &self.tls {
                None => self.handshake_http1(self.open_stream().await?).await,
                Some((tls, name)) => {
                    let stream = tls
                        .connector
                        .connect(name.clone(), self.open_stream().await?)
                        .await
                        .map_err(SendError::Tls)?;
                    self.handshake_http1(stream).await
                }
            }
        };
        tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| SendError::ConnectTimeout)?
    }

    async fn connect_http2(&self) -> Result<http2::SendRequest<RequestBody>, SendError> {
        let connect_timeout = self.settings().connect_timeout;
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let handshake = async {
            match &self.tls {
                None => self.handshake_http2(self.open_stream().await?).await,
                Some((tls, name)) => {
                    let stream = tls
                        .connector_h2
                        .connect(name.clone(), self.open_stream().await?)
                        .await
                        .map_err(SendError::Tls)?;
                    self.handshake_http2(stream).await
                }
            }
        };
        tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| SendError::ConnectTimeout)?
    }

    /// HTTP/1.1 over an open connection, whose task runs until the connection ends.
    async fn handshake_http1<I>(&self, io: I) -> Result<SendRequest<RequestBody>, SendError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Handshake)?;
        let label = Arc::clone(&self.label);
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(backend = %label, %error, "backend connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// HTTP/2 over an open connection, whose task runs until the connection ends: when the
    /// backend closes it, or when the last sender is dropped and its streams are done.
    async fn handshake_http2<I>(&self, io: I) -> Result<http2::SendRequest<RequestBody>, SendError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(HTTP2_PING_INTERVAL)
            .keep_alive_timeout(HTTP2_PING_TIMEOUT)
            .handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Handshake)?;
        let label = Arc::clone(&self.label);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(backend = %label, %error, "backend HTTP/2 connection closed with an error");
            }
        });
        Ok(sender)
    }

    async fn open_stream(&self) -> Result<TcpStream, SendError> {
        let stream = TcpStream::connect(self.target)
            .await
            .map_err(SendError::Connect)?;
        let configure = |stream: &TcpStream| -> io::Result<()> {
            stream.set_nodelay(true)?;
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
        };
        configure(&stream).map_err(SendError::Connect)?;
        Ok(stream)
    }
}

/// HTTP/2 names the target in `:scheme` and `:authority` rather than in a Host header
/// (RFC 9113 section 8.3.1), so the request's Host moves into its URI.
fn into_http2_form(request: &mut Request<RequestBody>, tls: bool) {
    let Some(host) = request.headers_mut().remove(header::HOST) else {
        return;
    };
    let Ok(authority) = Authority::try_from(host.as_bytes()) else {
        // Not an authority after all: it travels as the header it came as.
        request.headers_mut().insert(header::HOST, host);
        return;
    };
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    match http::Uri::from_parts(parts) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => {
            request.headers_mut().insert(header::HOST, host);
        }
    }
}

async fn sweep_idle(pool: Weak<ConnectionPool>) {
    loop {
        // Read every round, as a reload may change the idle timeout.
        let Some(period) = pool.upgrade().map(|pool| {
            (pool.settings().idle_timeout / 2)
                .clamp(Duration::from_millis(100), Duration::from_secs(30))
        }) else {
            return;
        };
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// A connection lent to one request. An HTTP/1.1 connection returns to its pool only through
/// [`Lease::release`], called when the response has been read to its end; dropped otherwise, it is
/// closed. A request on a shared HTTP/2 connection holds nothing: its stream is its own.
pub struct Lease {
    returning: Option<(SendRequest<RequestBody>, Arc<ConnectionPool>)>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some((sender, pool)) = self.returning.take() {
            pool.give_back(sender);
        }
    }
}
