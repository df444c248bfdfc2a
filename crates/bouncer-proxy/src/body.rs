//! Bodies that stream through the proxy: frames are passed on as they come, with backpressure, and
//! nothing is buffered whole.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::pipeline::Exchange;
use crate::pool::Lease;

/// Why a client's request body could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body from the client failed")]
    Client(#[source] hyper::Error),
    #[error("the request body arrived slower than {min_rate} bytes a second")]
    TooSlow { min_rate: u64 },
}

/// The floor on a request body's rate: by `grace + received / min_rate` after the body began,
/// `received` bytes must have arrived (a slow-POST attack holds a connection and a backend slot
/// with a body dripped a byte at a time).
pub struct BodyPace {
    min_rate: u64,
    grace: Duration,
    started: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl BodyPace {
    pub fn new(min_rate: u64, grace: Duration) -> Option<Box<Self>> {
        (min_rate > 0).then(|| {
            Box::new(BodyPace {
                min_rate,
                grace,
                started: Instant::now(),
                timer: None,
            })
        })
    }

    /// When the next byte is due, with `received` bytes in.
    fn due(&self, received: u64) -> Instant {
        let allowed = Duration::from_secs_f64((received + 1) as f64 / self.min_rate as f64);
        self.started + self.grace + allowed
    }

    /// `Ready` when the body is behind its pace.
    fn poll_behind(&mut self, cx: &mut Context<'_>, received: u64) -> Poll<()> {
        let due = self.due(received);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= due {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// How far a request body has got, shared between the body (which the upstream client consumes)
/// and the pipeline (which starts the response clock once the body is sent, and logs its size).
#[derive(Debug, Default)]
pub struct BodyProgress {
    pub bytes: AtomicU64,
    pub finished: AtomicBool,
    pub finished_signal: Notify,
    /// A copy of the body as it streams, when the request may be sent again (`retry_buffer`).
    kept: Option<Mutex<KeptBody>>,
}

/// The frames of a request body, kept up to a limit. The copies share the received buffers, so
/// keeping costs no copying of bytes.
#[derive(Debug, Default)]
struct KeptBody {
    chunks: Vec<Bytes>,
    size: u64,
    limit: u64,
    complete: bool,
    /// Over the limit, or with trailers: the body cannot be replayed.
    given_up: bool,
}

impl BodyProgress {
    /// Progress that also keeps up to `limit` bytes of the body for a replay.
    pub fn keeping(limit: u64) -> Self {
        Self {
            kept: Some(Mutex::new(KeptBody {
                limit,
                ..KeptBody::default()
            })),
            ..Self::default()
        }
    }

    /// The whole body, when it was received in full and kept.
    pub fn replay(&self) -> Option<VecDeque<Bytes>> {
        let kept = self
            .kept
            .as_ref()?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (kept.complete && !kept.given_up).then(|| kept.chunks.iter().cloned().collect())
    }

    /// Frees the kept copy once the request cannot be sent again.
    pub fn release_kept(&self) {
        if let Some(kept) = &self.kept {
            let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
            kept.given_up = true;
            kept.chunks = Vec::new();
        }
    }

    fn keep(&self, frame: &Frame<Bytes>) {
        let Some(kept) = &self.kept else {
            return;
        };
        let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.given_up {
            return;
        }
        match frame.data_ref() {
            Some(data) if kept.size + data.len() as u64 <= kept.limit => {
                kept.size += data.len() as u64;
                kept.chunks.push(data.clone());
            }
            _ => {
                kept.given_up = true;
                kept.chunks = Vec::new();
            }
        }
    }

    fn keep_end(&self) {
        if let Some(kept) = &self.kept {
            kept.lock().unwrap_or_else(PoisonError::into_inner).complete = true;
        }
    }

    /// Waits until the whole body has been handed to the backend connection.
    pub async fn wait_finished(&self) {
        loop {
            let notified = self.finished_signal.notified();
            if self.finished.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn finish(&self) {
        if !self.finished.swap(true, Ordering::AcqRel) {
            self.finished_signal.notify_waiters();
        }
    }
}

/// A client's request body on its way to a backend, cut off at the configured size limit.
pub struct RequestBody {
    inner: Option<Incoming>,
    /// A kept body being sent again.
    replayed: VecDeque<Bytes>,
    limit: u64,
    received: u64,
    progress: Option<Arc<BodyProgress>>,
    pace: Option<Box<BodyPace>>,
}

impl RequestBody {
    /// Wraps a body that may have content; `progress` is told about every byte and the end.
    pub fn streaming(
        inner: Incoming,
        limit: u64,
        progress: Arc<BodyProgress>,
        pace: Option<Box<BodyPace>>,
    ) -> Self {
        Self {
            inner: Some(inner),
            replayed: VecDeque::new(),
            limit,
            received: 0,
            progress: Some(progress),
            pace,
        }
    }

    pub fn empty() -> Self {
        Self::replay(VecDeque::new())
    }

    /// A body kept by [`BodyProgress::replay`], sent again.
    pub fn replay(chunks: VecDeque<Bytes>) -> Self {
        Self {
            inner: None,
            replayed: chunks,
            limit: 0,
            received: 0,
            progress: None,
            pace: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(
                this.replayed
                    .pop_front()
                    .map(|chunk| Ok(Frame::data(chunk))),
            );
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if let Some(pace) = this.pace.as_mut()
                    && pace.poll_behind(cx, this.received).is_ready()
                {
                    let min_rate = pace.min_rate;
                    this.inner = None;
                    return Poll::Ready(Some(Err(RequestBodyError::TooSlow { min_rate })));
                }
                return Poll::Pending;
            }
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(progress) = &this.progress {
                    progress.keep(&frame);
                }
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if let Some(progress) = &this.progress {
                        progress.bytes.store(this.received, Ordering::Relaxed);
                    }
                    if this.received > this.limit {
                        this.inner = None;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                            limit: this.limit,
                        })));
                    }
                }
                // A body of known length ends with its last byte: the connection does not poll
                // again for the end, so the end is marked here.
                if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                    this.inner = None;
                    if let Some(progress) = &this.progress {
                        progress.keep_end();
                        progress.finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                this.inner = None;
                Poll::Ready(Some(Err(RequestBodyError::Client(error))))
            }
            None => {
                this.inner = None;
                if let Some(progress) = &this.progress {
                    progress.keep_end();
                    progress.finish();
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Some(inner) => inner.is_end_stream(),
            None => self.replayed.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => {
                SizeHint::with_exact(self.replayed.iter().map(|chunk| chunk.len() as u64).sum())
            }
        }
    }
}

/// A request's body as the client sends it: read by hyper, or none at all for a request that the
/// lean HTTP/1 server took (it takes only requests without a body, see `h1server`), which says
/// what it saw among the fields.
pub enum ClientBody {
    Hyper(Incoming),
    Lean(LeanFacts),
}

/// What the lean HTTP/1 server saw among a request's fields while it parsed the head, so that the
/// pipeline need not look for them in the map, a hash and a probe each. That server takes no
/// request with `Content-Length`, `Transfer-Encoding`, `Upgrade` or `Expect`, and none whose
/// target is not a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeanFacts {
    /// A `Host` is among the fields.
    pub host: bool,
    /// Hop-by-hop fields are: `Connection`, `Keep-Alive`, `TE` or `Proxy-*`.
    pub hop_by_hop: bool,
    /// Forwarding fields or a request id are: `X-Forwarded-*`, `Forwarded`, `Via` or
    /// `X-Request-Id`.
    pub forwarding: bool,
    /// The first `Content-Type` names gRPC.
    pub grpc: bool,
}

impl ClientBody {
    /// What the lean server saw among the fields, when it took the request.
    pub fn lean_facts(&self) -> Option<LeanFacts> {
        match self {
            ClientBody::Lean(facts) => Some(*facts),
            ClientBody::Hyper(_) => None,
        }
    }

    /// The body to read, if the request has one.
    pub fn into_incoming(self) -> Option<Incoming> {
        match self {
            ClientBody::Hyper(incoming) if !incoming.is_end_stream() => Some(incoming),
            _ => None,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(incoming) => Pin::new(incoming).poll_frame(cx),
            ClientBody::Lean(_) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(incoming) => incoming.is_end_stream(),
            ClientBody::Lean(_) => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(incoming) => incoming.size_hint(),
            ClientBody::Lean(_) => SizeHint::with_exact(0),
        }
    }
}

/// Why a response body broke off after its headers were sent; the client connection is then
/// aborted, because the response cannot be completed honestly.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error("the backend sent nothing for {0:?} inside a response body")]
    ReadTimeout(Duration),
    #[error("the backend's response body failed")]
    Upstream(#[source] hyper::Error),
    #[error("the backend's response body failed")]
    UpstreamLean(#[source] crate::h1client::LeanError),
    #[error("the cache fill this response was read from broke off")]
    Fill(#[source] crate::cache::FillBroken),
}

/// A backend's response body: from a hyper connection, or from a lean one (see `h1client`).
pub enum UpstreamBody {
    Hyper(Incoming),
    Lean(crate::h1client::LeanBody),
}

impl UpstreamBody {
    /// The response's fields as the bytes read, when a lean exchange kept them so.
    pub fn raw_fields(&self) -> Option<&crate::raw_fields::RawFields> {
        match self {
            UpstreamBody::Lean(body) => body.raw_fields(),
            UpstreamBody::Hyper(_) => None,
        }
    }

    pub fn raw_fields_mut(&mut self) -> Option<&mut crate::raw_fields::RawFields> {
        match self {
            UpstreamBody::Lean(body) => body.raw_fields_mut(),
            UpstreamBody::Hyper(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(ResponseBodyError::Upstream),
            UpstreamBody::Lean(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(ResponseBodyError::UpstreamLean),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(body) => body.is_end_stream(),
            UpstreamBody::Lean(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(body) => body.size_hint(),
            UpstreamBody::Lean(body) => body.size_hint(),
        }
    }
}

pin_project! {
    /// A response on its way to the client: a backend's streamed body or a short local answer. It
    /// carries the request's [`Exchange`], which logs and counts the request when the body is done.
    pub struct ResponseBody {
        upstream: Option<UpstreamBody>,
        lease: Option<Lease>,
        fixed: Option<Bytes>,
        read_timeout: Duration,
        // Since when the body has waited on the backend; read only when it has to wait, so that a
        // body whose frames are ready costs no clock reading.
        waiting_since: Option<Instant>,
        // Boxed: most bodies never wait, and a response is moved several times on its way.
        silence: Option<Pin<Box<Sleep>>>,
        // On HTTP/2: whether data handed over waits on the client (see `conn`).
        send_watch: Option<crate::conn::SendWatch>,
        // A response read from a cache fill in progress.
        shared: Option<crate::cache::FillReader>,
        exchange: Option<Box<Exchange>>,
    }
}

impl ResponseBody {
    /// A body with nothing to send, the base of the others.
    fn nothing(exchange: Option<Box<Exchange>>) -> Self {
        Self {
            upstream: None,
            lease: None,
            fixed: None,
            read_timeout: Duration::ZERO,
            waiting_since: None,
            silence: None,
            send_watch: None,
            shared: None,
            exchange,
        }
    }

    pub fn upstream(
        body: UpstreamBody,
        lease: Option<Lease>,
        read_timeout: Duration,
        exchange: Box<Exchange>,
    ) -> Self {
        Self {
            upstream: Some(body),
            lease,
            read_timeout,
            send_watch: exchange.send_watch(),
            ..Self::nothing(Some(exchange))
        }
    }

    /// A backend's body read by no request (a cache fill's task reads it).
    pub fn detached(body: UpstreamBody, lease: Option<Lease>, read_timeout: Duration) -> Self {
        Self {
            upstream: Some(body),
            lease,
            read_timeout,
            ..Self::nothing(None)
        }
    }

    /// A response read from a cache fill as it arrives.
    pub fn shared(reader: crate::cache::FillReader, exchange: Box<Exchange>) -> Self {
        Self {
            shared: Some(reader),
            ..Self::nothing(Some(exchange))
        }
    }

    /// The response's fields as the bytes read, when a lean exchange kept them so: the lean
    /// server writes them with those of the response's map.
    pub fn raw_fields(&self) -> Option<&crate::raw_fields::RawFields> {
        self.upstream.as_ref()?.raw_fields()
    }

    /// Takes the fields kept as the bytes read, for a writer that knows only the map.
    pub fn take_raw_fields(&mut self) -> Option<Box<crate::raw_fields::RawFields>> {
        match self.upstream.as_mut()? {
            UpstreamBody::Lean(body) => body.take_raw_fields(),
            UpstreamBody::Hyper(_) => None,
        }
    }

    pub fn fixed(text: impl Into<Bytes>, exchange: Option<Box<Exchange>>) -> Self {
        let text = text.into();
        Self {
            fixed: (!text.is_empty()).then_some(text),
            ..Self::nothing(exchange)
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Some(text) = this.fixed.take() {
            if let Some(exchange) = this.exchange.as_mut() {
                exchange.bytes_out += text.len() as u64;
            }
            return Poll::Ready(Some(Ok(Frame::data(text))));
        }
        if let Some(reader) = this.shared.as_mut() {
            return match ready!(Pin::new(reader).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let (Some(data), Some(exchange)) = (frame.data_ref(), this.exchange.as_mut())
                    {
                        exchange.bytes_out += data.len() as u64;
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(error)) => {
                    *this.shared = None;
                    if let Some(exchange) = this.exchange.as_mut() {
                        exchange.upstream_body_failed = true;
                    }
                    Poll::Ready(Some(Err(ResponseBodyError::Fill(error))))
                }
                None => {
                    *this.shared = None;
                    Poll::Ready(None)
                }
            };
        }
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(watch) = this.send_watch.as_mut() {
            watch.asked();
        }
        match Pin::new(&mut *upstream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(watch) = this.send_watch.as_mut()
                    && frame.is_data()
                    && !upstream.is_end_stream()
                {
                    watch.handed_out();
                }
                // The server may stop polling once the body says it is complete, so the
                // connection is given back at its last frame rather than at the end of the stream.
                if upstream.is_end_stream()
                    && let Some(lease) = this.lease.take()
                {
                    lease.release();
                }
                *this.waiting_since = None;
                if let (Some(data), Some(exchange)) = (frame.data_ref(), this.exchange.as_mut()) {
                    exchange.bytes_out += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                *this.upstream = None;
                if let Some(exchange) = this.exchange.as_mut() {
                    exchange.upstream_body_failed = true;
                }
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                *this.upstream = None;
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                // The timer is set once, and only moved when it fires early (its deadline may be
                // an earlier wait's).
                let since = *this.waiting_since.get_or_insert_with(Instant::now);
                let deadline = since + *this.read_timeout;
                let silence = this
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                loop {
                    ready!(silence.as_mut().poll(cx));
                    if Instant::now() >= deadline {
                        *this.upstream = None;
                        if let Some(exchange) = this.exchange.as_mut() {
                            exchange.upstream_body_failed = true;
                        }
                        return Poll::Ready(Some(Err(ResponseBodyError::ReadTimeout(
                            *this.read_timeout,
                        ))));
                    }
                    silence.as_mut().reset(deadline);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.fixed.is_none()
            && self.upstream.as_ref().is_none_or(Body::is_end_stream)
            && self.shared.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(reader) = &self.shared {
            return reader.size_hint();
        }
        match (&self.fixed, &self.upstream) {
            (Some(text), _) => SizeHint::with_exact(text.len() as u64),
            (None, Some(upstream)) => upstream.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}
