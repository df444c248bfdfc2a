//! Keep-alive connections to one backend. Idle HTTP/1.1 connections are kept, the most recently
//! used handed out first (it is the least likely to have been closed by the backend), and one that
//! the backend closed or that idled too long is dropped. A connection goes back to the pool only
//! when its response was read to the end, so that it is never shared by two requests.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::tls::UpstreamTls;

/// TCP keep-alive probes on backend connections, so that a backend that vanished without closing
/// its sockets is noticed even on an idle pooled connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a request could not be sent to a backend.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the backend failed")]
    Connect(#[source] io::Error),
    #[error("connecting to the backend timed out")]
    ConnectTimeout,
    #[error("the TLS handshake with the backend failed")]
    Tls(#[source] io::Error),
    #[error("the HTTP/1.1 handshake with the backend failed")]
    Handshake(#[source] hyper::Error),
    #[error("the exchange with the backend failed")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            SendError::Connect(_)
                | SendError::ConnectTimeout
                | SendError::Tls(_)
                | SendError::Handshake(_)
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
    /// Settings live beside the idle connections, under one lock that is taken anyway, so that a
    /// reload can change them for a pool that carries on.
    idle: Mutex<Idle>,
}

struct Idle {
    connections: VecDeque<IdleConnection>,
    settings: PoolSettings,
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
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            target,
            label,
            tls,
            idle: Mutex::new(Idle {
                connections: VecDeque::new(),
                settings,
            }),
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
    ) -> Result<(Response<Incoming>, Lease), (SendError, Option<Request<RequestBody>>)> {
        loop {
            let (mut sender, reused) = match self.take_idle().await {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare on a warm pool, and its large future would otherwise
                // make every send bigger to create and move.
                None => match Box::pin(self.connect()).await {
                    Ok(sender) => (sender, false),
                    Err(error) => return Err((error, Some(request))),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        sender: Some(sender),
                        pool: Arc::clone(self),
                    };
                    return Ok((response, lease));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    unsent => return Err((SendError::Exchange(error.into_error()), unsent)),
                },
            }
        }
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
        if idle.settings.max_idle == 0 {
            return;
        }
        if idle.connections.len() >= idle.settings.max_idle {
            idle.connections.pop_front();
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
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let connect_timeout = self.settings().connect_timeout;
        // One deadline for TCP and TLS together.
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let stream = tokio::time::timeout_at(deadline, self.open_stream())
            .await
            .map_err(|_| SendError::ConnectTimeout)?
            .map_err(SendError::Connect)?;
        match &self.tls {
            None => self.handshake(stream).await,
            Some((tls, name)) => {
                let stream =
                    tokio::time::timeout_at(deadline, tls.connector.connect(name.clone(), stream))
                        .await
                        .map_err(|_| SendError::ConnectTimeout)?
                        .map_err(SendError::Tls)?;
                self.handshake(stream).await
            }
        }
    }

    /// HTTP/1.1 over an open connection, whose task runs until the connection ends.
    async fn handshake<I>(&self, io: I) -> Result<SendRequest<RequestBody>, SendError>
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

    async fn open_stream(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(self.target).await?;
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        Ok(stream)
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

/// A connection lent to one request. It returns to its pool only through [`Lease::release`],
/// called when the response has been read to its end; dropped otherwise, it is closed.
pub struct Lease {
    sender: Option<SendRequest<RequestBody>>,
    pool: Arc<ConnectionPool>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.give_back(sender);
        }
    }
}
