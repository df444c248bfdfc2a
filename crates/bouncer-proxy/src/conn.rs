//! A client connection's socket, wrapped to enforce the two client-side silences hyper cannot tell
//! apart: the keep-alive idle time between requests and the time to send a request's headers.
//!
//! hyper's own header timeout starts as soon as a connection waits for a request, so it would cut
//! idle keep-alive connections at the header timeout. Instead the request pipeline tells this
//! wrapper when a request is in flight, and the wrapper's reads run the right clock: while idle,
//! the idle timeout (then a clean EOF); once the first byte of a new request arrives, the header
//! timeout (then a 408 and close).
//!
//! It also bounds how long a client may refuse to take its answer (a slow-read attack): a write
//! that finds the socket full for `write_timeout` fails, and on HTTP/2, where a client can instead
//! leave its flow-control window shut so that nothing is even written, a connection whose answers
//! wait on the client with no write progress for `write_timeout` is closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::error::Refusal;
use crate::metrics::ListenerMetrics;

/// Waiting between requests: the idle clock runs.
const PHASE_IDLE: u8 = 0;
/// Part of a request head has arrived (or a new connection waits for its first): the header clock runs.
const PHASE_HEAD: u8 = 1;
/// Busy, with answers waiting on a client that takes no data: the write clock runs (HTTP/2).
const PHASE_STALLED: u8 = 2;

const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 26\r\n\r\nrequest headers too slow.\n";

/// What the request pipeline tells a connection's socket about requests in flight. While any is in
/// flight no clock runs here; `phase` only says which clock runs when none is. HTTP/2 requests run
/// on tasks of their own, so every change is a single atomic step that another thread cannot undo.
#[derive(Debug)]
pub struct ConnectionActivity {
    started: Instant,
    phase: AtomicU8,
    in_flight: AtomicU32,
    /// Milliseconds after `started` when the current phase began.
    phase_since_ms: AtomicU64,
    is_http2: AtomicBool,
    /// HTTP/2 answers that handed data to the connection which the client has not taken yet.
    waiting_sends: AtomicU32,
    /// Milliseconds after `started` when `waiting_sends` last rose from zero.
    stall_since_ms: AtomicU64,
    /// Milliseconds after `started` of the last write to the client that made progress.
    write_progress_ms: AtomicU64,
    /// The HTTP/2 connection task, woken when a stall may begin so that it arms the write clock
    /// (it may have read last before the answer handed its data over, with nothing to wake it).
    reader: futures_util::task::AtomicWaker,
    /// Told to close this connection between requests, to make room at the connection cap.
    reap: tokio::sync::Notify,
    /// Whether it was told, so that it is not picked twice.
    reaping: AtomicBool,
    /// Set when another process took the listening sockets over: the next answer closes the
    /// connection.
    closing: AtomicBool,
    /// Told when a closing connection turns out to be HTTP/2, which closes by GOAWAY instead.
    goaway: tokio::sync::Notify,
}

impl ConnectionActivity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            phase: AtomicU8::new(PHASE_IDLE),
            in_flight: AtomicU32::new(0),
            phase_since_ms: AtomicU64::new(0),
            is_http2: AtomicBool::new(false),
            waiting_sends: AtomicU32::new(0),
            stall_since_ms: AtomicU64::new(0),
            write_progress_ms: AtomicU64::new(0),
            reader: futures_util::task::AtomicWaker::new(),
            reap: tokio::sync::Notify::new(),
            reaping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            goaway: tokio::sync::Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        let elapsed = crate::clock::now().saturating_duration_since(self.started);
        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
    }

    fn enter(&self, phase: u8) {
        self.phase_since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.phase.store(phase, Ordering::Release);
    }

    /// Asks that the connection be closed after its next answer.
    pub fn close_after_answer(&self) {
        // With `mark_http2`, sequentially consistent: of the two, one sees the other's store, so
        // an HTTP/2 connection is always told to send its GOAWAY.
        self.closing.store(true, Ordering::SeqCst);
        if self.is_http2.load(Ordering::SeqCst) {
            self.goaway.notify_one();
        }
    }

    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Resolves when a connection asked to close turns out to be HTTP/2.
    pub async fn goaway_requested(&self) {
        self.goaway.notified().await;
    }

    /// Told by the pipeline once it sees an HTTP/2 request: HTTP/2 never gets a raw 408. A
    /// connection already asked to close after its next answer gets a GOAWAY instead.
    pub fn mark_http2(&self) {
        if !self.is_http2.swap(true, Ordering::SeqCst) && self.closing.load(Ordering::SeqCst) {
            self.goaway.notify_one();
        }
    }

    /// Since when this keep-alive connection has waited for its next request; `None` while a
    /// request is in flight or one has begun to arrive.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.busy() || self.phase.load(Ordering::Acquire) != PHASE_IDLE {
            return None;
        }
        Some(self.started + Duration::from_millis(self.phase_since_ms.load(Ordering::Relaxed)))
    }

    /// A candidate to close at the connection cap: idle, and not asked already.
    pub fn reapable_since(&self) -> Option<Instant> {
        if self.reaping.load(Ordering::Acquire) {
            return None;
        }
        self.idle_since()
    }

    /// Asks the connection to close, if it is still idle when it hears.
    pub fn reap(&self) {
        self.reaping.store(true, Ordering::Release);
        self.reap.notify_one();
    }

    /// Whether the connection was asked to close to make room, and has not answered yet.
    pub fn reap_asked(&self) -> bool {
        self.reaping.load(Ordering::Acquire)
    }

    /// The connection was busy when it heard, and carries on.
    pub fn spared(&self) {
        self.reaping.store(false, Ordering::Release);
    }

    /// Resolves when the connection was asked to close to make room.
    pub async fn reaped(&self) {
        self.reap.notified().await;
    }

    pub fn is_http2(&self) -> bool {
        self.is_http2.load(Ordering::Relaxed)
    }

    /// An HTTP/2 answer handed data to the connection; until it is asked for more, that data
    /// waits on the client.
    pub fn send_waiting(&self) {
        if self.waiting_sends.fetch_add(1, Ordering::AcqRel) == 0 {
            self.stall_since_ms.store(self.now_ms(), Ordering::Release);
            self.reader.wake();
        }
    }

    /// The answer was asked for more data (or ended): the client took what it had.
    pub fn send_taken(&self) {
        self.waiting_sends.fetch_sub(1, Ordering::AcqRel);
    }

    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.enter(PHASE_IDLE);
        }
    }

    /// As `request_finished`, with a reading of the clock already taken.
    fn request_finished_at(&self, now: Instant) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = u64::try_from(now.saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX);
            self.phase_since_ms.store(since, Ordering::Relaxed);
            self.phase.store(PHASE_IDLE, Ordering::Release);
        }
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// The first bytes of a new request arrived while idle: start the header clock.
    fn head_started(&self) {
        let since = self.now_ms();
        if self
            .phase
            .compare_exchange(PHASE_IDLE, PHASE_HEAD, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.phase_since_ms.store(since, Ordering::Release);
        }
    }

    fn deadline(&self, timeouts: &ClientTimeouts) -> Option<(Instant, u8)> {
        if self.busy() {
            if self.waiting_sends.load(Ordering::Acquire) == 0 {
                return None;
            }
            let since = self
                .stall_since_ms
                .load(Ordering::Acquire)
                .max(self.write_progress_ms.load(Ordering::Relaxed));
            return Some((
                self.started + Duration::from_millis(since) + timeouts.write,
                PHASE_STALLED,
            ));
        }
        let phase = self.phase.load(Ordering::Acquire);
        let since =
            self.started + Duration::from_millis(self.phase_since_ms.load(Ordering::Relaxed));
        if phase == PHASE_HEAD {
            Some((since + timeouts.header, PHASE_HEAD))
        } else {
            Some((since + timeouts.idle, PHASE_IDLE))
        }
    }
}

/// Holds a connection busy while a request is in flight; dropping it lets the idle clock run again.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Option<Arc<ConnectionActivity>>,
}

impl RequestGuard {
    /// Ends the request now, a reading of the clock its owner took anyway (the guard's drop would
    /// take another).
    pub fn finish_at(&mut self, now: Instant) {
        if let Some(activity) = self.activity.take() {
            activity.request_finished_at(now);
        }
    }

    /// The connection's activity when it is HTTP/2, whose answers are watched for a client that
    /// leaves its flow-control window shut.
    pub fn http2_activity(&self) -> Option<&Arc<ConnectionActivity>> {
        self.activity
            .as_ref()
            .filter(|activity| activity.is_http2())
    }
}

/// One HTTP/2 answer's part in the stall watch: between handing data to the connection and
/// being asked for more, its data waits on the client.
pub struct SendWatch {
    activity: Arc<ConnectionActivity>,
    handed_out: bool,
}

impl SendWatch {
    pub fn new(activity: Arc<ConnectionActivity>) -> Self {
        SendWatch {
            activity,
            handed_out: false,
        }
    }

    /// Called whenever the answer is asked for data.
    pub fn asked(&mut self) {
        if self.handed_out {
            self.handed_out = false;
            self.activity.send_taken();
        }
    }

    /// Called when the answer hands data over.
    pub fn handed_out(&mut self) {
        if !self.handed_out {
            self.handed_out = true;
            self.activity.send_waiting();
        }
    }
}

impl Drop for SendWatch {
    fn drop(&mut self) {
        self.asked();
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.request_finished();
        }
    }
}

/// Starts tracking a request on `activity`.
pub fn request_started(activity: &Arc<ConnectionActivity>) -> RequestGuard {
    activity.in_flight.fetch_add(1, Ordering::AcqRel);
    RequestGuard {
        activity: Some(Arc::clone(activity)),
    }
}

/// The client-side clocks of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    pub idle: Duration,
    pub header: Duration,
    pub write: Duration,
}

/// The client socket, wrapped (hyper sees it through `TokioIo`).
pub struct ClientIo {
    io: TcpStream,
    /// Bytes read past a PROXY protocol header, handed to hyper before the socket's.
    replay: bytes::Bytes,
    activity: Arc<ConnectionActivity>,
    timeouts: ClientTimeouts,
    timer: Pin<Box<Sleep>>,
    timer_deadline: Option<Instant>,
    /// Runs while a write finds the socket full; made at the first such write.
    write_timer: Option<Pin<Box<Sleep>>>,
    write_blocked: bool,
    /// Whether part of the next request's head has arrived (then a timeout earns a 408).
    head_bytes_seen: bool,
    metrics: Arc<ListenerMetrics>,
}

impl ClientIo {
    pub fn new(
        stream: TcpStream,
        replay: bytes::Bytes,
        timeouts: ClientTimeouts,
        metrics: Arc<ListenerMetrics>,
    ) -> (Self, Arc<ConnectionActivity>) {
        let activity = ConnectionActivity::new();
        // A new connection is waiting for its first request's headers straight away.
        activity.enter(PHASE_HEAD);
        let io = Self {
            io: stream,
            replay,
            activity: Arc::clone(&activity),
            timeouts,
            timer: Box::pin(tokio::time::sleep(timeouts.header)),
            timer_deadline: None,
            write_timer: None,
            write_blocked: false,
            head_bytes_seen: false,
            metrics,
        };
        (io, activity)
    }

    /// Resolves when the socket may have something to read (or bytes wait to be replayed),
    /// without reading and without running any clock.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.io.poll_read_ready(cx)
    }

    /// Resolves when the socket may have something to read, or when the idle clock has run out
    /// (the read that follows then ends the connection), without reading.
    pub fn poll_idle_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Readiness first: when it is there, the read that follows runs the clock anyway.
        match self.poll_read_ready(cx) {
            Poll::Pending => self.poll_deadline(cx).map(|_| Ok(())),
            ready => ready,
        }
    }

    /// Part of a request head has been read, though not through this reader's clocks (while the
    /// previous request was in flight): the header clock runs, and its end earns a 408.
    pub fn head_pending(&mut self) {
        if !self.activity.busy() {
            self.head_bytes_seen = true;
            self.activity.head_started();
        }
    }

    /// Puts bytes already read back in front of what is still to come, for the next reader.
    pub fn unread(&mut self, bytes: bytes::Bytes) {
        if self.replay.is_empty() {
            self.replay = bytes;
        } else if !bytes.is_empty() {
            let mut joined = bytes::BytesMut::with_capacity(bytes.len() + self.replay.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.replay);
            self.replay = joined.freeze();
        }
    }

    /// The current phase, when its time is up already (by this poll's reading of the clock).
    fn phase_expired(&self) -> Option<u8> {
        let (deadline, phase) = self.activity.deadline(&self.timeouts)?;
        (crate::clock::now() >= deadline).then_some(phase)
    }

    /// What a read returns when the time of `phase` is up: the connection ends.
    fn end_phase(&mut self, phase: u8, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if phase == PHASE_STALLED {
            self.metrics.refused(Refusal::WriteTimeout);
            tracing::debug!("closing an HTTP/2 connection whose client takes no data");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no data for the write timeout",
            )));
        }
        let http2 = self.activity.is_http2.load(Ordering::Relaxed);
        if phase == PHASE_HEAD && !http2 && self.head_bytes_seen {
            self.metrics.refused(Refusal::HeaderTimeout);
            // Best effort: the socket is about to close whether or not the client reads this.
            let _ = Pin::new(&mut self.io).poll_write(cx, REQUEST_TIMEOUT_RESPONSE);
            tracing::debug!("closing a connection whose request headers were too slow");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request headers too slow",
            )));
        }
        // An idle connection (or one that never sent a byte) simply ends, like a clean close.
        Poll::Ready(Ok(()))
    }

    /// Runs the clock of the current phase; `Ready` means the phase's time is up.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<u8> {
        let Some((deadline, phase)) = self.activity.deadline(&self.timeouts) else {
            return Poll::Pending;
        };
        // The timer is moved only to an earlier deadline. Moving it costs more than letting it
        // fire early now and then and setting it again, and under steady traffic the deadline
        // moves later with every request.
        if self.timer_deadline.is_none_or(|armed| deadline < armed) {
            self.timer.as_mut().reset(deadline);
            self.timer_deadline = Some(deadline);
        }
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(phase);
            }
            self.timer.as_mut().reset(deadline);
            self.timer_deadline = Some(deadline);
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.activity.is_http2() {
            this.activity.reader.register(cx.waker());
        }
        let waiting_for_request = !this.activity.busy();
        // The phase's time is checked before every read, so that a client whose bytes keep coming
        // cannot outlast it; the timer itself is polled (which registers it) only when the read
        // has to wait.
        if let Some(phase) = this.phase_expired() {
            return this.end_phase(phase, cx);
        }
        if !this.replay.is_empty() {
            let take = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(take));
            if waiting_for_request {
                this.head_bytes_seen = true;
            }
            return Poll::Ready(Ok(()));
        }
        let filled_before = buf.filled().len();
        if Pin::new(&mut this.io).poll_read(cx, buf)?.is_pending() {
            return match this.poll_deadline(cx) {
                Poll::Ready(phase) => this.end_phase(phase, cx),
                Poll::Pending => Poll::Pending,
            };
        }
        let read_something = buf.filled().len() > filled_before;
        if !waiting_for_request {
            this.head_bytes_seen = false;
        } else if read_something && !this.activity.is_http2.load(Ordering::Relaxed) {
            // On HTTP/2, bytes between streams (pings, window updates) are not a request head.
            this.head_bytes_seen = true;
            this.activity.head_started();
        }
        Poll::Ready(Ok(()))
    }
}

impl ClientIo {
    /// Passes a write's outcome on, running the write clock while the socket is full: a client
    /// that takes nothing for the write timeout gets its connection closed.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        outcome: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match outcome {
            Poll::Ready(result) => {
                self.write_blocked = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.timeouts.write;
                let timer = self
                    .write_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !self.write_blocked {
                    self.write_blocked = true;
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    self.metrics.refused(Refusal::WriteTimeout);
                    tracing::debug!("closing a connection whose client takes no data");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took no data for the write timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl ClientIo {
    /// On HTTP/2, bytes written restart the stall clock. Only bytes do: a flush with nothing to
    /// send, which the connection does whenever it wakes, is no sign that the client takes data.
    fn note_written(&self, outcome: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(written)) = outcome
            && *written > 0
            && self.activity.is_http2()
        {
            self.activity
                .write_progress_ms
                .store(self.activity.now_ms(), Ordering::Relaxed);
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note_written(&outcome);
        this.after_write(cx, outcome)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.io).poll_flush(cx);
        this.after_write(cx, outcome)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let outcome = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note_written(&outcome);
        this.after_write(cx, outcome)
    }
}
