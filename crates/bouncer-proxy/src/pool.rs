//! Keep-alive connections to one backend. Idle HTTP/1.1 connections are kept, the most recently
//! used handed out first (it is the least likely to have been closed by the backend), and one that
//! the backend closed or that idled too long is dropped. A connection goes back to the pool only
//! when its response was read to the end, so that it is never shared by two requests.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use bouncer_config::ServerAddress;

use crate::body::RequestBody;

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
    #[error("the HTTP/1.1 handshake with the backend failed")]
    Handshake(#[source] hyper::Error),
    #[error("the exchange with the backend failed")]
    Exchange(#[source] hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            SendError::Connect(_) | SendError::ConnectTimeout | SendError::Handshake(_)
        )
    }
}

/// How a pool behaves; taken from the upstream's config.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

pub struct ConnectionPool {
    target: ServerAddress,
    settings: PoolSettings,
    idle: Mutex<VecDeque<IdleConnection>>,
}

struct IdleConnection {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl ConnectionPool {
    /// Makes a pool for `target`; inside a Tokio runtime it also starts a sweeper that closes
    /// connections idle for longer than the idle timeout, and that ends with the pool.
    pub fn new(target: ServerAddress, settings: PoolSettings) -> Arc<Self> {
        let pool = Arc::new(Self {
            target,
            settings,
            idle: Mutex::new(VecDeque::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && !pool.settings.idle_timeout.is_zero()
        {
            runtime.spawn(sweep_idle(Arc::downgrade(&pool)));
        }
        pool
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
                None => match self.connect().await {
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
            let mut sender = self.pop_idle()?;
            if sender.is_ready() {
                return Some(sender);
            }
            // It was returned when its response ended; its connection task has not run since to
            // take the next request. That takes one turn of the scheduler, unless the backend
            // closed the connection meanwhile.
            if let Ok(Ok(())) =
                tokio::time::timeout(self.settings.connect_timeout, sender.ready()).await
            {
                return Some(sender);
            }
        }
    }

    fn pop_idle(&self) -> Option<SendRequest<RequestBody>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(connection) = idle.pop_back() {
            if !connection.sender.is_closed()
                && now.duration_since(connection.since) < self.settings.idle_timeout
            {
                return Some(connection.sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() || self.settings.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= self.settings.max_idle {
            idle.pop_front();
        }
        idle.push_back(IdleConnection {
            sender,
            since: Instant::now(),
        });
    }

    /// Drops the connections that idled too long or that the backend closed.
    fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|connection| {
            !connection.sender.is_closed()
                && now.duration_since(connection.since) < self.settings.idle_timeout
        });
    }

    async fn connect(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let stream = tokio::time::timeout(self.settings.connect_timeout, self.open_stream())
            .await
            .map_err(|_| SendError::ConnectTimeout)?
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Handshake)?;
        let label = self.target.to_string();
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(backend = %label, %error, "backend connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// Opens a TCP connection to the first of the target's addresses that answers.
    async fn open_stream(&self) -> io::Result<TcpStream> {
        let addresses: Vec<SocketAddr> = match self.target.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.target.port)],
            Err(_) => tokio::net::lookup_host((self.target.host.as_str(), self.target.port))
                .await?
                .collect(),
        };
        let mut last_error = None;
        for address in addresses {
            match TcpStream::connect(address).await {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
                    return Ok(stream);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the host name has no address")
        }))
    }
}

async fn sweep_idle(pool: Weak<ConnectionPool>) {
    let Some(period) = pool
        .upgrade()
        .map(|pool| (pool.settings.idle_timeout / 2).max(Duration::from_millis(100)))
    else {
        return;
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
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
