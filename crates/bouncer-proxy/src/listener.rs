//! Listening sockets: the accept loop, which survives every accept error, and the serving of one
//! client connection with HTTP/1.1 or HTTP/2 (h2c with prior knowledge).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use bouncer_config::{ListenerConfig, ServerConfig};
use bouncer_rules::proxy_protocol::{MAX_HEADER_BYTES, ProxyHeaderError, parse_proxy_header};

use crate::access_log::AccessLog;
use crate::body::ClientBody;
use crate::conn::ClientIo;
use crate::error::{Refusal, find_cause};
use crate::metrics::ListenerMetrics;
use crate::pipeline::{ConnectionContext, handle};
use crate::routing::RouteTable;
use crate::tls::ListenerTls;

/// Running: serve. Draining: finish what is in flight, accept nothing. Closing: drop everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lifecycle {
    Running,
    /// Another process took the listening sockets over: accept nothing, and close each
    /// connection after its next answer (or at its idle timeout).
    HandingOver,
    Draining,
    Closing,
}

/// Everything a listener's connections need, built once from the config.
pub struct ListenerRuntime {
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub routes: RouteTable,
    pub server: ServerConfig,
    /// Shared by every connection of the listener, which holds it for its whole life.
    pub metrics: Arc<ListenerMetrics>,
    pub access_log: AccessLog,
    /// TLS termination, when the listener has `[listeners.tls]`.
    pub tls: Option<ListenerTls>,
    /// The port of the HTTPS listener that `redirect_to_https` names.
    pub redirect_https_port: Option<u16>,
    /// Answers to ACME http-01 challenges, when some listener gets certificates from ACME.
    pub acme_challenges: Option<Arc<crate::acme::AcmeChallenges>>,
    /// IP lists, connection caps and rate limits, shared by all listeners.
    pub protection: Arc<crate::protection::Protection>,
}

/// Binds a listening socket with a deep accept queue, as a busy proxy needs.
pub(crate) fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

/// A listening socket taken over from the process this one replaces, checked against the address
/// the config gives it (a takeover cannot move a listener).
pub(crate) fn adopt(
    socket: std::net::TcpListener,
    configured: SocketAddr,
) -> io::Result<TcpListener> {
    let address = socket.local_addr()?;
    let same = address == configured || (configured.port() == 0 && address.ip() == configured.ip());
    if !same {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!(
                "the running process listens on {address}, not on the configured {configured}: a takeover cannot move a listener"
            ),
        ));
    }
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket)
}

/// HTTP/2 streams one client connection may have open at once; more are refused one by one.
const MAX_CONCURRENT_STREAMS: u32 = 256;
const MAX_PENDING_RESET_STREAMS: usize = 20;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
const SEND_BUFFER_PER_STREAM: usize = 256 * 1024;

pub(crate) fn http_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection wrapper runs the header and idle clocks; hyper's own header clock would
        // also run while a keep-alive connection is idle.
        .header_read_timeout(None)
        .max_buf_size(server.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // Streams a client may reset before they are served (rapid reset, CVE-2023-44487), and
        // streams the proxy may reset for a client's errors (CVE-2025-8671), before the
        // connection is closed with ENHANCE_YOUR_CALM.
        .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        // Response data buffered per stream for a client that reads slowly.
        .max_send_buf_size(SEND_BUFFER_PER_STREAM);
    builder
}

/// Accepts connections until told to stop. Errors such as running out of file descriptors are
/// counted and waited out with a growing pause; they never end the loop.
pub(crate) async fn accept_loop(
    listener: Arc<TcpListener>,
    slot: Arc<ArcSwap<ListenerRuntime>>,
    mut lifecycle: watch::Receiver<Lifecycle>,
) {
    const MIN_PAUSE: Duration = Duration::from_millis(5);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    let mut runtime = slot.load_full();
    let mut builder = Arc::new(http_builder(&runtime.server));
    let mut pause = MIN_PAUSE;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = lifecycle.wait_for(|state| *state != Lifecycle::Running) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                pause = MIN_PAUSE;
                // A reload swaps the runtime: new connections take the new one (and the HTTP
                // settings made from its [server] section).
                let current = slot.load();
                if !Arc::ptr_eq(&current, &runtime) {
                    runtime = Arc::clone(&current);
                    builder = Arc::new(http_builder(&runtime.server));
                }
                drop(current);
                runtime.metrics.connections_accepted.inc();
                // Each poll of a connection's task reads the clock at most once (`clock`).
                tokio::spawn(crate::clock::OneReadingPerPoll::new(serve_connection(
                    stream,
                    peer,
                    Arc::clone(&runtime),
                    Arc::clone(&slot),
                    Arc::clone(&builder),
                    lifecycle.clone(),
                )));
            }
            Err(error) => {
                runtime.metrics.accept_errors.inc();
                if is_transient_peer_error(&error) {
                    continue;
                }
                tracing::warn!(listener = %runtime.name, %error, pause_ms = pause.as_millis() as u64, "accept failed; pausing before accepting again");
                tokio::select! {
                    _ = lifecycle.wait_for(|state| *state != Lifecycle::Running) => break,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
    }
}

/// Errors about one connection that went away before it was accepted; the next accept is fine.
fn is_transient_peer_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Serves one accepted connection to its end. (An `async move` block rather than an `async fn`,
/// which would keep its arguments twice in a task that lives as long as the connection: see
/// `pipeline::handle`.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    runtime: Arc<ListenerRuntime>,
    slot: Arc<ArcSwap<ListenerRuntime>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    lifecycle: watch::Receiver<Lifecycle>,
) -> impl Future<Output = ()> {
    async move {
        let _ = stream.set_nodelay(true);
        // Owned, so that the runtime itself can be let go once the connection is set up: after a
        // reload, a long-lived connection must not keep the old config's upstreams (and their health
        // checks) alive.
        let metrics = Arc::clone(&runtime.metrics);
        metrics.connections_open.inc();
        let _open = OpenConnection(Arc::clone(&metrics));
        let (peer, replay) = if runtime.config.proxy_protocol {
            match read_proxy_header(&mut stream, peer, &runtime).await {
                Ok(found) => found,
                Err(reason) => {
                    metrics.refused(Refusal::ProxyProtocol);
                    tracing::info!(%peer, reason, "refused a connection without a valid PROXY protocol header");
                    return;
                }
            }
        } else {
            (peer, Bytes::new())
        };
        // The first layer, before TLS or any parsing. A trusted proxy's connections carry many
        // clients named in headers: for those, the lists act per request and the per-address cap
        // does not apply.
        let client_ip = bouncer_config::canonical_ip(peer.ip());
        let forwarder = !runtime.config.proxy_protocol && runtime.config.trusts(client_ip);
        let protection = &runtime.protection;
        let admitted = if forwarder {
            Ok(())
        } else {
            protection
                .check_lists(client_ip)
                .and_then(|()| protection.check_ban(client_ip))
        }
        .and_then(|()| protection.admit_connection(client_ip, !forwarder));
        let _permit = match admitted {
            Ok(permit) => permit,
            Err(reason) => {
                metrics.refused(reason);
                if let Some(suppressed) = protection.may_log_refusal() {
                    tracing::info!(%peer, reason = reason.label(), suppressed, "connection refused");
                }
                return;
            }
        };
        let (io, activity) = ClientIo::new(
            stream,
            replay,
            crate::conn::ClientTimeouts {
                idle: runtime.server.idle_timeout,
                header: runtime.server.header_timeout,
                write: runtime.server.write_timeout,
            },
            Arc::clone(&metrics),
        );
        runtime.protection.register_connection(&activity);
        if runtime.tls.is_none() {
            let max_header_bytes = runtime.server.max_header_bytes;
            drop(runtime);
            let context = Arc::new(ConnectionContext::new(
                slot,
                peer,
                activity,
                "http",
                lifecycle.clone(),
            ));
            // Bodiless requests are served by the lean server; the first request it does not take
            // hands the connection to hyper. Boxed, as TLS is below: most connections never need
            // it. (Made inside a block, so that the task keeps no room for what the lean server
            // handed over.)
            let fallback = {
                let handed =
                    crate::h1server::serve(io, &context, &metrics, lifecycle, max_header_bytes)
                        .await;
                let Some((io, lifecycle)) = handed else {
                    return;
                };
                Box::pin(serve_http(io, context, &metrics, &builder, lifecycle))
            };
            fallback.await;
        } else {
            // Boxed: the handshake and the TLS stream would otherwise make every plain connection's
            // task, which lives as long as the connection, as large as a TLS one's.
            Box::pin(serve_tls(
                io, peer, activity, runtime, slot, &builder, lifecycle,
            ))
            .await;
        }
    }
}

/// Terminates TLS on an accepted connection, then serves HTTP on it.
async fn serve_tls(
    io: ClientIo,
    peer: SocketAddr,
    activity: Arc<crate::conn::ConnectionActivity>,
    runtime: Arc<ListenerRuntime>,
    slot: Arc<ArcSwap<ListenerRuntime>>,
    builder: &auto::Builder<TokioExecutor>,
    mut lifecycle: watch::Receiver<Lifecycle>,
) {
    let Some(tls) = &runtime.tls else {
        return;
    };
    let metrics = &runtime.metrics;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(io)) => handshake,
        // A handover lets a handshake in progress finish: the connection is then served once.
        _ = lifecycle.wait_for(|state| *state >= Lifecycle::Draining) => return,
    };
    let record = |result| {
        if let Some(handshakes) = &metrics.handshakes {
            handshakes.record(result);
        }
    };
    let stream = match handshake {
        Ok(Ok(stream)) => {
            record("ok");
            stream
        }
        Ok(Err(error)) => {
            let reason = crate::tls::handshake_failure_reason(&error);
            record(reason);
            metrics.refused(Refusal::TlsHandshake);
            tracing::debug!(%peer, %error, reason, "TLS handshake failed");
            return;
        }
        Err(_) => {
            record("timeout");
            metrics.refused(Refusal::TlsHandshakeTimeout);
            tracing::debug!(%peer, timeout = ?tls.handshake_timeout, "TLS handshake timed out");
            return;
        }
    };
    let session = stream.get_ref().1;
    if session.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
        // A CA's tls-alpn-01 check ends with the handshake (RFC 8737 section 3).
        return;
    }
    let mut context = ConnectionContext::new(slot, peer, activity, "https", lifecycle.clone());
    // The certificate the client asked for by name, whose names every request must then stay
    // within (421 otherwise).
    context.sni_certificate = session
        .server_name()
        .and_then(|name| tls.resolver.matching(name));
    // Verified by the handshake when the listener asks for client certificates.
    context.client_subject = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::tls::client_subject);
    // The runtime is let go for the rest of the connection (see serve_connection).
    let metrics = Arc::clone(metrics);
    drop(runtime);
    serve_http(stream, Arc::new(context), &metrics, builder, lifecycle).await;
}

/// Serves HTTP/1.1 and HTTP/2 on an established connection until it ends or the proxy closes.
async fn serve_http<I>(
    io: I,
    context: Arc<ConnectionContext>,
    metrics: &ListenerMetrics,
    builder: &auto::Builder<TokioExecutor>,
    mut lifecycle: watch::Receiver<Lifecycle>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = context.peer;
    let activity = Arc::clone(&context.activity);
    let service = service_fn(move |request| {
        let context = Arc::clone(&context);
        // Boxed: HTTP/1 keeps a slot the size of the request's future for the whole life of a
        // connection, busy or idle, and moving a large future costs a copy of all of it.
        Box::pin(async move {
            let mut response = handle(&context, request.map(ClientBody::Hyper)).await;
            // hyper writes only the map. The fields are kept as the bytes read only for answers
            // the lean server writes, so this finds none unless that changes.
            if let Some(raw) = response.body_mut().take_raw_fields() {
                raw.append_to(response.headers_mut());
            }
            // Handing over to another process: this answer is the connection's last, and says
            // so, so that the client opens its next connection (to the new process) at once. A
            // protocol switch keeps its `Connection: upgrade`: its tunnel ends on its own.
            if context.activity.closing()
                && !context.activity.is_http2()
                && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
            {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(response)
        })
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut draining = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = activity.goaway_requested(), if !draining => {
                // An HTTP/2 connection whose first request came after a handover began.
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = activity.reaped() => {
                // Reaped at the connection cap; it must still be idle, or it carries on.
                if activity.idle_since().is_some() {
                    metrics.refused(Refusal::IdleReaped);
                    break Ok(());
                }
                activity.spared();
            }
            changed = lifecycle.changed() => {
                let state = if changed.is_ok() { *lifecycle.borrow_and_update() } else { Lifecycle::Closing };
                match state {
                    Lifecycle::Running => {}
                    // HTTP/2 says GOAWAY, which lets streams in flight finish and sends new ones
                    // elsewhere (told through `goaway_requested`, also when the connection is
                    // found to be HTTP/2 only later); HTTP/1 answers its next request with
                    // `Connection: close`.
                    Lifecycle::HandingOver => activity.close_after_answer(),
                    Lifecycle::Draining if !draining => {
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    Lifecycle::Draining => {}
                    Lifecycle::Closing => break Ok(()),
                }
            }
        }
    };
    if let Err(error) = result {
        record_connection_error(metrics, peer, error.as_ref());
    }
}

/// Reads the PROXY protocol header a trusted load balancer sends first, and returns the client
/// address it names (or the socket peer for `LOCAL` health checks) with any bytes read past it.
async fn read_proxy_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    runtime: &ListenerRuntime,
) -> Result<(SocketAddr, Bytes), &'static str> {
    if !runtime.config.trusts(peer.ip()) {
        return Err("the peer is not in trusted_proxies");
    }
    let mut buffer = BytesMut::with_capacity(MAX_HEADER_BYTES);
    let reading = async {
        loop {
            if stream
                .read_buf(&mut buffer)
                .await
                .map_err(|_| "read failed")?
                == 0
            {
                return Err("the connection closed inside the header");
            }
            match parse_proxy_header(&buffer) {
                Ok(header) => return Ok(header),
                Err(ProxyHeaderError::Incomplete) if buffer.len() < MAX_HEADER_BYTES => continue,
                Err(_) => return Err("malformed header"),
            }
        }
    };
    let header = tokio::time::timeout(runtime.server.header_timeout, reading)
        .await
        .map_err(|_| "the header did not arrive in time")??;
    let rest = buffer.split_off(header.length).freeze();
    Ok((header.source.unwrap_or(peer), rest))
}

/// Counts and logs what hyper refused or failed on by itself, before a request reached the pipeline.
fn record_connection_error(
    metrics: &ListenerMetrics,
    peer: SocketAddr,
    error: &(dyn std::error::Error + 'static),
) {
    if let Some(hyper_error) = find_cause::<hyper::Error>(error) {
        if hyper_error.is_parse_too_large() {
            metrics.refused(Refusal::HeadersTooLarge);
            tracing::info!(%peer, error = %hyper_error, "refused a request whose headers are too large");
            return;
        }
        if hyper_error.is_parse() || hyper_error.is_parse_status() {
            metrics.refused(Refusal::BadRequest);
            tracing::info!(%peer, error = %hyper_error, "refused a malformed request");
            return;
        }
    }
    if let Some(h2_error) = find_cause::<h2::Error>(error)
        && h2_error.is_library()
    {
        // The HTTP/2 library closed the connection for what the client did. It names abuse
        // (rapid reset, CONTINUATION floods, too many resets or tiny frames) ENHANCE_YOUR_CALM,
        // and broken framing a protocol error.
        let refusal = match h2_error.reason() {
            Some(h2::Reason::ENHANCE_YOUR_CALM) => Some(Refusal::H2Abuse),
            Some(
                h2::Reason::PROTOCOL_ERROR
                | h2::Reason::FRAME_SIZE_ERROR
                | h2::Reason::COMPRESSION_ERROR
                | h2::Reason::FLOW_CONTROL_ERROR,
            ) => Some(Refusal::H2ProtocolError),
            _ => None,
        };
        if let Some(refusal) = refusal {
            metrics.refused(refusal);
            tracing::info!(%peer, error = %h2_error, "closed an HTTP/2 connection");
            return;
        }
    }
    let header_timeout =
        find_cause::<io::Error>(error).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
    // A header timeout was counted where it happened; anything else is a client going away.
    if !header_timeout {
        tracing::debug!(%peer, %error, "client connection ended with an error");
    }
}

/// Keeps the open-connections gauge right however the connection task ends.
struct OpenConnection(Arc<ListenerMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}
