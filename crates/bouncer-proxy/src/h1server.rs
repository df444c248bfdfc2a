//! A lean HTTP/1.1 server for the most common requests on a plain listener: those without a body
//! that ask for no upgrade (GET, HEAD, most DELETEs).
//!
//! Measured with `bench/instructions`, hyper's HTTP/1 server was about a third of the proxy's work
//! per proxied request, more than the proxy's own request path. Here the connection's task parses
//! each request head with `httparse`, runs the request through the pipeline and writes the answer
//! itself, the head and the start of the body in one write.
//!
//! It takes only requests it is sure of. The first one it does not take (one with a body, an
//! upgrade, `Expect`, a target other than a path, a head it cannot parse or one too large) hands
//! the connection to hyper with every byte read so far, and hyper serves the connection from then
//! on, as it serves TLS connections. So malformed requests still get hyper's answers, counted as
//! before, and only well-formed, bodiless requests take the short way.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, StatusCode, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::body::{ClientBody, LeanFacts, ResponseBody};
use crate::boxed_in_place;
use crate::buffers;
use crate::conn::{ClientIo, ConnectionActivity};
use crate::error::Refusal;
use crate::h1client::{FieldSpans, MAX_HEADERS};
use crate::listener::Lifecycle;
use crate::metrics::ListenerMetrics;
use crate::pipeline::{ConnectionContext, handle};

/// What a read asks room for, when the buffer has too little left.
const READ_SIZE: usize = buffers::BUFFER_SIZE;
/// A data frame up to this size is copied next to what precedes it, so that both leave in one
/// write; a larger one is written from where it lies.
const COPY_LIMIT: usize = 4096;
/// Answer bytes gathered before they are written, even if the body has more ready.
const WRITE_AT: usize = 256 * 1024;
/// Pieces gathered into one write at most.
const MAX_SEGMENTS: usize = 16;
/// How long an answer's head waits for the first bytes of its body before it is written alone
/// (1 to 2 ms: tokio's timer rounds a deadline up to its next millisecond).
/// Backends often send the head and the body in two packets (nginx does, with `sendfile`); written
/// as it comes, a small answer would leave in two packets too, and wake the client twice. As
/// nginx's `postpone_output` does, the head waits for data, but here only briefly, so that a
/// stream whose events come later (server-sent events) still gets its head at once.
const HEAD_HOLD: std::time::Duration = std::time::Duration::from_millis(1);

/// Serves HTTP/1.1 requests on `io` until the connection ends, or until a request comes that this
/// server does not take: then it returns the connection, with the bytes read so far put back, for
/// hyper to serve.
///
/// (An `async move` block rather than an `async fn`, which would keep the connection twice in the
/// task of every connection: see `pipeline::handle`.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub(crate) fn serve<'a>(
    mut io: ClientIo,
    context: &'a ConnectionContext,
    metrics: &'a ListenerMetrics,
    lifecycle: watch::Receiver<Lifecycle>,
    max_header_bytes: usize,
) -> impl Future<Output = Option<(ClientIo, watch::Receiver<Lifecycle>)>> + 'a {
    async move {
        let activity = &context.activity;
        // Given to hyper with the connection. It has seen no change yet, so hyper acts on whatever
        // state the proxy is in by then.
        let handover = lifecycle.clone();
        // One wait for the proxy's signals that lives across requests, so that it is registered once
        // per signal rather than once per request.
        let mut gate = SignalGate {
            lifecycle: lifecycle.clone(),
            activity: Arc::clone(activity),
            registered: false,
        };
        let mut signals = std::pin::pin!(signal_wait(lifecycle, Arc::clone(activity)));
        let mut buffer = BytesMut::new();
        let mut outgoing = Outgoing::default();
        loop {
            let (request, facts) = loop {
                if !buffer.is_empty() {
                    match parse_request(&mut buffer, max_header_bytes) {
                        Parsed::Request(request, facts) => break (request, facts),
                        // Part of a head, perhaps read while the last answer was in flight: the
                        // header clock runs (a no-op when it already does).
                        Parsed::Partial if buffer.len() < max_header_bytes => io.head_pending(),
                        Parsed::Partial | Parsed::NotLean => {
                            io.unread(buffer.freeze());
                            return Some((io, handover));
                        }
                    }
                }
                tokio::select! {
                    biased;
                    read = poll_fn(|cx| {
                        // A buffer let go while the connection was idle is taken again only when
                        // there is something to read into it.
                        if buffer.capacity() == 0 {
                            std::task::ready!(io.poll_idle_ready(cx))?;
                            buffer = buffers::take();
                        } else if buffer.capacity() - buffer.len() < READ_SIZE / 4 {
                            buffer.reserve(READ_SIZE);
                        }
                        tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buffer)
                    }) => match read {
                        // The client closed, or the idle clock ended the connection. A head cut off
                        // is left to hyper, which answers it as it always has.
                        Ok(0) if buffer.is_empty() => return None,
                        Ok(0) => {
                            io.unread(buffer.freeze());
                            return Some((io, handover));
                        }
                        Ok(_) => {}
                        Err(error) => {
                            // A header timeout was counted (and answered) by the socket wrapper.
                            if error.kind() != io::ErrorKind::TimedOut {
                                tracing::debug!(peer = %context.peer, %error, "client connection ended with an error");
                            }
                            return None;
                        }
                    },
                    (signal, lifecycle, activity) = poll_fn(|cx| gate.poll(signals.as_mut(), cx)) => {
                        gate.rearm();
                        signals.set(signal_wait(lifecycle, Arc::clone(&activity)));
                        match signal {
                            Signal::Lifecycle(Lifecycle::Running) => {}
                            // Between requests: the next answer is the last.
                            Signal::Lifecycle(Lifecycle::HandingOver) => activity.close_after_answer(),
                            Signal::Lifecycle(Lifecycle::Draining | Lifecycle::Closing) => return None,
                            Signal::Reaped => {
                                if activity.idle_since().is_some() {
                                    metrics.refused(Refusal::IdleReaped);
                                    return None;
                                }
                                activity.spared();
                            }
                        }
                    }
                }
            };
            // Draining: this answer is the connection's last, whatever its head says.
            let mut draining = false;
            // Boxed: the pipeline's future is large, and the connection's task, which lives as long
            // as the connection, would otherwise be as large for the whole life of an idle one.
            let mut responding = boxed_in_place(|| handle(context, request));
            let response = loop {
                if buffer.capacity() - buffer.len() < READ_SIZE / 4 {
                    buffer.reserve(READ_SIZE);
                }
                tokio::select! {
                    biased;
                    response = &mut responding => break response,
                    // Bytes the client sends meanwhile (a pipelined request) wait in the buffer. An end
                    // means that the client left: its request is dropped, and counted as such.
                    // Readiness is waited for first: it costs less than a read, and usually nothing
                    // comes before the answer.
                    read = async {
                        std::future::poll_fn(|cx| io.poll_read_ready(cx)).await?;
                        io.read_buf(&mut buffer).await
                    }, if buffer.len() < max_header_bytes => match read {
                        Ok(0) => return None,
                        Ok(_) => {}
                        Err(error) => {
                            tracing::debug!(peer = %context.peer, %error, "client connection ended with an error");
                            return None;
                        }
                    },
                    (signal, lifecycle, activity) = poll_fn(|cx| gate.poll(signals.as_mut(), cx)) => {
                        gate.rearm();
                        signals.set(signal_wait(lifecycle, Arc::clone(&activity)));
                        if busy_signal(signal, &activity, &mut draining) {
                            return None;
                        }
                    }
                }
            };
            drop(responding);
            let answered = {
                let closing = activity.closing() || draining;
                // The head is encoded here and only the body's writing is a future: a future is
                // copied whole when it is made, and one layer fewer is one copy fewer per request.
                // That future is boxed, as the pipeline's is: in the task, it would make every
                // idle connection as large as one that writes an answer. The answer's parts are
                // let go in this block, so that the task keeps no room for them either.
                let (mut answering, keep_alive) = {
                    let (parts, body) = response.into_parts();
                    if outgoing.bytes.capacity() == 0 {
                        outgoing.bytes = buffers::take();
                    }
                    let (framing, keep_alive, trailers) =
                        encode_head(&parts, &body, &facts, closing, &mut outgoing.bytes);
                    let writing = boxed_in_place(|| {
                        write_body(&mut io, &mut outgoing, body, framing, trailers)
                    });
                    (writing, keep_alive)
                };
                loop {
                    tokio::select! {
                        biased;
                        // Another request may follow when the head said keep-alive and the body
                        // was whole.
                        answered = &mut answering => {
                            break answered.map(|complete| keep_alive && complete);
                        }
                        (signal, lifecycle, activity) = poll_fn(|cx| gate.poll(signals.as_mut(), cx)) => {
                            gate.rearm();
                            signals.set(signal_wait(lifecycle, Arc::clone(&activity)));
                            if busy_signal(signal, &activity, &mut draining) {
                                return None;
                            }
                        }
                    }
                }
            };
            // An idle connection keeps no buffer, as nginx's do not: the next request, if one comes,
            // takes one when it arrives. Bytes already read (a pipelined request) are kept.
            buffers::give(std::mem::take(&mut outgoing.bytes));
            if outgoing.segments.capacity() > 0 {
                outgoing.segments = Vec::new();
            }
            if buffer.is_empty() {
                buffers::give(std::mem::take(&mut buffer));
            }
            match answered {
                // The head said keep-alive. A handover that began while it was written closes the
                // connection after the next answer, which says so; draining closes it now.
                Ok(true) if !draining => {}
                Ok(_) => {
                    // Best effort: the connection closes whether or not the client hears the FIN.
                    let _ = io.shutdown().await;
                    return None;
                }
                Err(error) => {
                    tracing::debug!(peer = %context.peer, %error, "client connection ended with an error");
                    return None;
                }
            }
        }
    }
}

/// Acts on a signal that comes while a request is in flight or its answer is written; notes a
/// drain in `draining`, and says whether to close at once.
fn busy_signal(signal: Signal, activity: &ConnectionActivity, draining: &mut bool) -> bool {
    match signal {
        Signal::Lifecycle(Lifecycle::Running) => false,
        // The next answer whose head is still to be written is the connection's last, and says so.
        Signal::Lifecycle(Lifecycle::HandingOver) => {
            activity.close_after_answer();
            false
        }
        // The connection closes after this answer.
        Signal::Lifecycle(Lifecycle::Draining) => {
            *draining = true;
            false
        }
        Signal::Lifecycle(Lifecycle::Closing) => true,
        // Busy: it carries on.
        Signal::Reaped => {
            activity.spared();
            false
        }
    }
}

/// What the proxy asks of a connection while it serves.
enum Signal {
    Lifecycle(Lifecycle),
    /// Asked to close, if idle, to make room at the connection cap.
    Reaped,
}

/// Whether the wait for signals needs polling: once after it is made, so that it registers the
/// task, and then only when a signal may have come. Its own futures (a watch and a notification)
/// cost a few hundred instructions a poll, and a connection's task is polled a few times for every
/// request; these checks are two atomic loads.
struct SignalGate {
    /// A copy of the wait's receiver, kept level with it, for `has_changed`.
    lifecycle: watch::Receiver<Lifecycle>,
    activity: Arc<ConnectionActivity>,
    registered: bool,
}

impl SignalGate {
    fn poll<F: Future>(&mut self, wait: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let may_have_come = !self.registered
            || self.lifecycle.has_changed().unwrap_or(true)
            || self.activity.reap_asked();
        if !may_have_come {
            return Poll::Pending;
        }
        self.registered = true;
        wait.poll(cx)
    }

    /// A wait ended and the next begins: it registers afresh, and what the last one saw is seen.
    fn rearm(&mut self) {
        self.registered = false;
        self.lifecycle.mark_unchanged();
    }
}

/// The wait for the next signal, exempt from the task's budget: the gate polls it once to register
/// the task, then only when a flag says that a signal came, and a first poll that a spent budget
/// made a no-op would leave nothing registered, and the signal unheard.
fn signal_wait(
    lifecycle: watch::Receiver<Lifecycle>,
    activity: Arc<ConnectionActivity>,
) -> impl Future<Output = (Signal, watch::Receiver<Lifecycle>, Arc<ConnectionActivity>)> {
    tokio::task::unconstrained(next_signal(lifecycle, activity))
}

/// Waits for the next signal; hands back what it waited with, to wait again.
async fn next_signal(
    mut lifecycle: watch::Receiver<Lifecycle>,
    activity: Arc<ConnectionActivity>,
) -> (Signal, watch::Receiver<Lifecycle>, Arc<ConnectionActivity>) {
    let signal = tokio::select! {
        changed = lifecycle.changed() => Signal::Lifecycle(if changed.is_ok() {
            *lifecycle.borrow_and_update()
        } else {
            Lifecycle::Closing
        }),
        () = activity.reaped() => Signal::Reaped,
    };
    (signal, lifecycle, activity)
}

/// What the answer to a request depends on, besides the response itself.
#[derive(Debug, Clone, Copy)]
struct RequestFacts {
    http10: bool,
    head: bool,
    keep_alive: bool,
    /// The client said `TE: trailers`: trailer fields may be sent.
    trailers: bool,
}

// Not boxed: it is matched as soon as it is made, and a box would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Request(Request<ClientBody>, RequestFacts),
    Partial,
    /// Not a request this server takes; hyper serves the connection from here on.
    NotLean,
}

/// Parses a whole request head off the front of `buffer`, if it is one this server takes. The
/// field values keep pointing into the bytes read, without a copy.
fn parse_request(buffer: &mut BytesMut, max_header_bytes: usize) -> Parsed {
    // Left uninitialised: zeroing kilobytes for every request would cost more than parsing it.
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut no_slots: [httparse::Header<'_>; 0] = [];
    let mut parsed = httparse::Request::new(&mut no_slots);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buffer,
        &mut slots,
    ) {
        // A head over the limit is hyper's to refuse (431), even when it came whole in one read.
        Ok(httparse::Status::Complete(length)) if length <= max_header_bytes => length,
        Ok(httparse::Status::Complete(_)) => return Parsed::NotLean,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotLean,
    };
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Parsed::NotLean;
    };
    // Origin form only: absolute and authority forms, and `*`, are hyper's.
    if !target.starts_with('/') {
        return Parsed::NotLean;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::NotLean;
    };
    if method == Method::CONNECT {
        return Parsed::NotLean;
    }
    let version = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Framing, upgrades and `Expect` are hyper's: this server takes no body. They are looked for
    // among the parsed fields, with what keep-alive and trailers depend on, in one pass.
    // The same pass notes what the pipeline would otherwise look up in the map (`LeanFacts`).
    let (mut close, mut keep_alive, mut trailers) = (false, false, false);
    let mut lean = LeanFacts::default();
    let mut content_type_seen = false;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        let is = |expected: &[u8]| name.eq_ignore_ascii_case(expected);
        match name.len() {
            2 if is(b"te") => {
                trailers |= lists_token(field.value, b"trailers");
                lean.hop_by_hop = true;
            }
            3 if is(b"via") => lean.forwarding = true,
            4 if is(b"host") => lean.host = true,
            6 if is(b"expect") => return Parsed::NotLean,
            7 if is(b"upgrade") => return Parsed::NotLean,
            9 if is(b"forwarded") => lean.forwarding = true,
            10 if is(b"connection") => {
                close |= lists_token(field.value, b"close");
                keep_alive |= lists_token(field.value, b"keep-alive");
                lean.hop_by_hop = true;
            }
            10 if is(b"keep-alive") => lean.hop_by_hop = true,
            12 if is(b"x-request-id") => lean.forwarding = true,
            12 if is(b"content-type") && !content_type_seen => {
                content_type_seen = true;
                lean.grpc = bouncer_rules::is_grpc_content_type(field.value);
            }
            14 if is(b"content-length") => return Parsed::NotLean,
            17 if is(b"transfer-encoding") => return Parsed::NotLean,
            15 if is(b"x-forwarded-for") => lean.forwarding = true,
            16 if is(b"x-forwarded-host") => lean.forwarding = true,
            17 if is(b"x-forwarded-proto") => lean.forwarding = true,
            length if length >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-") => {
                lean.hop_by_hop = true;
            }
            _ => {}
        }
    }
    let facts = RequestFacts {
        http10: version == Version::HTTP_10,
        head: method == Method::HEAD,
        keep_alive: if version == Version::HTTP_10 {
            keep_alive && !close
        } else {
            !close
        },
        trailers,
    };
    let base = buffer.as_ptr() as usize;
    let target_start = target.as_ptr() as usize - base;
    let target_end = target_start + target.len();
    let spans = FieldSpans::of(buffer, parsed.headers);
    let head = buffer.split_to(length).freeze();
    // No room kept for the forwarding fields: most requests get them written beside the map
    // (see `DeferredFields`), and a map of a handful of fields stays a small block.
    let taken = spans
        .header_map(&head, 0)
        .zip(http::Uri::from_maybe_shared(head.slice(target_start..target_end)).ok());
    let Some((headers, uri)) = taken else {
        // The head goes back in front of what follows it, for hyper to read (a copy, made once
        // in a connection's life at most).
        let mut whole = BytesMut::with_capacity(head.len() + buffer.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(buffer);
        *buffer = whole;
        return Parsed::NotLean;
    };
    let mut request = Request::new(ClientBody::Lean(lean));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Parsed::Request(request, facts)
}

/// Whether a comma-separated list value has `token`, case-insensitively.
fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// How an answer's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body, whatever the fields say (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    Close,
}

/// Writes the status line and fields of `response`, with the framing, `Connection` and `Date`
/// fields the answer needs, as hyper would. Returns the framing, whether the connection stays
/// open after it, and the trailer fields that may be sent.
fn encode_head(
    parts: &http::response::Parts,
    body: &ResponseBody,
    facts: &RequestFacts,
    closing: bool,
    out: &mut BytesMut,
) -> (Framing, bool, Option<Vec<HeaderName>>) {
    let status = parts.status;
    if !facts.http10 && status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if facts.http10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let bodiless = facts.head || no_length;
    let exact = body.size_hint().exact();
    let mut keep_alive = facts.keep_alive && !closing;
    let mut says_close = false;
    let mut says_keep_alive = false;
    let mut has_date = false;
    let mut has_length = false;
    let mut declared: Option<u64> = None;
    let mut trailer_names: Option<Vec<HeaderName>> = None;
    if let Some(raw) = body.raw_fields() {
        // The backend's fields, less those the lean client read (framing, `Connection`): written
        // as they came, before those the proxy added to the map.
        raw.write_to(out);
        has_date = raw.has_date;
    }
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            has_length = true;
            // A HEAD answer keeps the length of what a GET would get; otherwise the body's own
            // length wins, and a declared one is written once, below.
            if !bodiless {
                if exact.is_none() && declared.is_none() {
                    declared = value.to_str().ok().and_then(|text| text.parse().ok());
                }
                continue;
            }
            // Never on 1xx and 204 (RFC 9110 section 8.6), whatever a backend sent.
            if !facts.head && (status.is_informational() || status == StatusCode::NO_CONTENT) {
                continue;
            }
        } else if *name == header::TRANSFER_ENCODING {
            // The framing is this server's to choose.
            continue;
        } else if *name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                says_close |= token.eq_ignore_ascii_case(b"close");
                says_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if *name == header::DATE {
            has_date = true;
        } else if *name == header::TRAILER && facts.trailers && !bodiless && !facts.http10 {
            let names = trailer_names.get_or_insert_with(Vec::new);
            names.extend(
                value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .filter_map(|item| HeaderName::from_bytes(item.trim_ascii()).ok()),
            );
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    keep_alive &= !says_close;
    let framing = if bodiless {
        // A HEAD answer says how long the body would be, when it is known.
        if facts.head
            && !no_length
            && !has_length
            && let Some(length) = exact.filter(|&length| length > 0)
        {
            write_length(out, length);
        }
        Framing::None
    } else if let Some(length) = exact.or(declared) {
        write_length(out, length);
        Framing::Length(length)
    } else if facts.http10 {
        keep_alive = false;
        Framing::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if facts.http10 {
        if keep_alive && !says_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    } else if !keep_alive && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        crate::date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let trailers = if framing == Framing::Chunked {
        trailer_names
    } else {
        None
    };
    (framing, keep_alive, trailers)
}

fn write_length(out: &mut BytesMut, length: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// What waits to be written, in order: the head and small pieces copied together, and large data
/// frames written from where they lie, all in one vectored write.
#[derive(Default)]
struct Outgoing {
    /// Bytes copied since the last segment was cut off.
    bytes: BytesMut,
    /// Whole segments, before `bytes`.
    segments: Vec<Bytes>,
    /// The length of `segments`, together.
    queued: usize,
}

impl Outgoing {
    fn len(&self) -> usize {
        self.queued + self.bytes.len()
    }

    /// Whether to write before taking more of the body.
    fn is_full(&self) -> bool {
        self.len() >= WRITE_AT || self.segments.len() + 2 >= MAX_SEGMENTS
    }

    fn push_data(&mut self, data: Bytes) {
        if data.len() <= COPY_LIMIT {
            self.bytes.extend_from_slice(&data);
            return;
        }
        self.cut();
        self.queued += data.len();
        self.segments.push(data);
    }

    /// Ends the copied bytes as a segment of their own.
    fn cut(&mut self) {
        if !self.bytes.is_empty() {
            let bytes = self.bytes.split().freeze();
            self.queued += bytes.len();
            self.segments.push(bytes);
        }
    }

    async fn write(&mut self, io: &mut ClientIo) -> io::Result<()> {
        if self.segments.is_empty() {
            io.write_all(&self.bytes).await?;
            self.bytes.clear();
            return Ok(());
        }
        self.cut();
        let mut first = 0;
        while first < self.segments.len() {
            let mut written = {
                let mut slices = [io::IoSlice::new(&[]); MAX_SEGMENTS];
                let mut count = 0;
                for (slice, segment) in slices.iter_mut().zip(&self.segments[first..]) {
                    *slice = io::IoSlice::new(segment);
                    count += 1;
                }
                io.write_vectored(&slices[..count]).await?
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while written > 0 {
                let segment = &mut self.segments[first];
                if written >= segment.len() {
                    written -= segment.len();
                    first += 1;
                } else {
                    segment.advance(written);
                    written = 0;
                }
            }
        }
        self.segments.clear();
        self.queued = 0;
        Ok(())
    }
}

/// What the body gave, or that it has nothing ready while answer bytes wait to be written.
enum Next {
    Frame(Option<Result<Frame<Bytes>, crate::body::ResponseBodyError>>),
    Write,
}

/// Writes the answer's head (already in `outgoing`) and its body, framed. Says whether the body
/// was whole, so that the connection may carry another request.
/// (An `async move` block rather than an `async fn`, which would keep the body twice in its
/// future: see `pipeline::handle`.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn write_body(
    io: &mut ClientIo,
    outgoing: &mut Outgoing,
    mut body: ResponseBody,
    framing: Framing,
    trailer_names: Option<Vec<HeaderName>>,
) -> impl Future<Output = io::Result<bool>> {
    async move {
        let mut remaining = match framing {
            Framing::Length(length) => length,
            _ => 0,
        };
        let mut trailers: Option<HeaderMap> = None;
        // It ends, with the request's accounting, when the future is done. Pinned where it lies (it
        // is `Unpin`), not moved again.
        let mut body = Pin::new(&mut body);
        let mut ended = framing == Framing::None || body.is_end_stream();
        // Until the body gives its first frame or the head is written: the head waits for it, up
        // to `HEAD_HOLD`. The timer is made only for an answer whose body is not there yet.
        let mut head_only = true;
        let mut hold: Option<Pin<Box<tokio::time::Sleep>>> = None;
        while !ended {
            let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
                Poll::Pending if outgoing.len() == 0 => Poll::Pending,
                Poll::Pending if head_only => {
                    let timer = hold.get_or_insert_with(|| Box::pin(tokio::time::sleep(HEAD_HOLD)));
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Next::Write),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Poll::Pending => Poll::Ready(Next::Write),
            })
            .await;
            // The wait is over either way; a timer left armed would wake the task for nothing.
            head_only = false;
            hold = None;
            let frame = match next {
                Next::Write => {
                    outgoing.write(io).await?;
                    continue;
                }
                Next::Frame(None) => break,
                Next::Frame(Some(Err(error))) => {
                    // A head held for its body still goes out, whenever the body failed: the
                    // client learns of the failure from a body cut short, as it would have had the
                    // head been written at once. (Best effort: the connection closes anyway.)
                    let _ = outgoing.write(io).await;
                    return Err(io::Error::other(error));
                }
                Next::Frame(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    let length = data.len();
                    match framing {
                        Framing::Length(_) => {
                            if length as u64 > remaining {
                                // As for a failed body: what is held still goes out.
                                let _ = outgoing.write(io).await;
                                return Err(io::Error::other(
                                    "the response body is longer than its Content-Length",
                                ));
                            }
                            remaining -= length as u64;
                        }
                        Framing::Chunked => write_chunk_size(&mut outgoing.bytes, length),
                        Framing::Close | Framing::None => {}
                    }
                    outgoing.push_data(data);
                    if framing == Framing::Chunked {
                        outgoing.bytes.extend_from_slice(b"\r\n");
                    }
                }
                Err(frame) => {
                    if let Ok(fields) = frame.into_trailers() {
                        trailers = Some(fields);
                    }
                }
            }
            if outgoing.is_full() {
                outgoing.write(io).await?;
            }
            ended = body.is_end_stream();
        }
        if framing == Framing::Chunked {
            let out = &mut outgoing.bytes;
            out.extend_from_slice(b"0\r\n");
            if let (Some(names), Some(fields)) = (&trailer_names, &trailers) {
                write_trailers(out, names, fields);
            }
            out.extend_from_slice(b"\r\n");
        }
        outgoing.write(io).await?;
        if remaining > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the response body ended before its Content-Length",
            ));
        }
        Ok(framing != Framing::Close)
    }
}

fn write_chunk_size(out: &mut BytesMut, length: usize) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = length;
    loop {
        at -= 1;
        digits[at] = HEX[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// The trailer fields the answer declared in `Trailer`, less those that may never be trailers
/// (RFC 9110 section 6.5.1), as hyper sends them.
fn write_trailers(out: &mut BytesMut, names: &[HeaderName], fields: &HeaderMap) {
    for (name, value) in fields {
        let forbidden = matches!(
            *name,
            header::AUTHORIZATION
                | header::CACHE_CONTROL
                | header::CONTENT_ENCODING
                | header::CONTENT_LENGTH
                | header::CONTENT_RANGE
                | header::CONTENT_TYPE
                | header::HOST
                | header::MAX_FORWARDS
                | header::SET_COOKIE
                | header::TRAILER
                | header::TRANSFER_ENCODING
                | header::TE
        );
        if forbidden || !names.contains(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    /// A long answer written in one poll can spend the task's budget before the gate first polls a
    /// new wait; the wait must register the task all the same, or the signal is never heard.
    #[tokio::test(start_paused = true)]
    async fn a_signal_wait_first_polled_without_budget_still_hears_its_signal() {
        let (sender, lifecycle) = watch::channel(Lifecycle::Running);
        let activity = ConnectionActivity::new();
        let mut gate = SignalGate {
            lifecycle: lifecycle.clone(),
            activity: Arc::clone(&activity),
            registered: false,
        };
        let (spend, mut budget) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1000 {
            spend.send(()).expect("the receiver is alive");
        }
        let waiting = tokio::spawn(async move {
            let mut signals = std::pin::pin!(signal_wait(lifecycle, activity));
            poll_fn(|cx| {
                while let Poll::Ready(Some(())) = budget.poll_recv(cx) {}
                assert!(gate.poll(signals.as_mut(), cx).is_pending());
                Poll::Ready(())
            })
            .await;
            poll_fn(|cx| gate.poll(signals.as_mut(), cx)).await.0
        });
        // The waiting task runs until it waits.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        sender
            .send(Lifecycle::Draining)
            .expect("the wait holds a receiver");
        let signal = tokio::time::timeout(std::time::Duration::from_secs(60), waiting)
            .await
            .expect("the waiting task was woken by the signal")
            .expect("the waiting task did not panic");
        assert!(matches!(signal, Signal::Lifecycle(Lifecycle::Draining)));
    }

    /// A backend that answers one request with the head of a five-byte answer, and sends the body
    /// when told; the proxy's client socket; and what writing the answer needs.
    struct HeldAnswer {
        body_go: tokio::sync::oneshot::Sender<()>,
        /// Not yet a tokio socket: its reads are real reads, not answers from cached readiness.
        client: std::net::TcpStream,
        answer: Answer,
    }

    struct Answer {
        io: ClientIo,
        outgoing: Outgoing,
        response: Option<Response<ResponseBody>>,
    }

    impl Answer {
        /// Encodes the head, as `serve` does, and gives the body's writing, not yet polled.
        fn writing(&mut self) -> impl Future<Output = io::Result<bool>> + '_ {
            let response = self.response.take().expect("written once");
            let facts = RequestFacts {
                http10: false,
                head: false,
                keep_alive: true,
                trailers: false,
            };
            let (parts, body) = response.into_parts();
            let (framing, _, trailers) =
                encode_head(&parts, &body, &facts, false, &mut self.outgoing.bytes);
            write_body(&mut self.io, &mut self.outgoing, body, framing, trailers)
        }
    }

    async fn held_answer() -> HeldAnswer {
        use crate::body::RequestBody;
        use crate::pool::{ConnectionPool, PoolSettings};
        use crate::upstream::Wire;
        use tokio::io::AsyncWriteExt;
        use tokio::time::{Duration, Instant};

        let backend_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let backend_address = backend_listener.local_addr().expect("address");
        let (body_go, body_wait) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut socket, _) = backend_listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                socket.read_exact(&mut byte).await.expect("request");
                head.push(byte[0]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                .await
                .expect("head");
            if body_wait.await.is_ok() {
                socket.write_all(b"hello").await.expect("body");
            }
            // Kept open until the proxy has read the body.
            let _ = socket.read(&mut [0u8; 1]).await;
        });
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(5),
            max_idle: 4,
            idle_timeout: Duration::from_secs(3600),
        };
        let pool = ConnectionPool::new(backend_address, "backend".into(), settings, None, false);
        let request = Request::get("/")
            .header(header::HOST, "backend")
            .body(RequestBody::empty())
            .expect("request");
        let now = Instant::now();
        let (response, lease) = pool
            .send_lean(
                &request,
                now,
                now + Duration::from_secs(60),
                Wire::default(),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("the backend answers");
        let response =
            response.map(|body| ResponseBody::detached(body, Some(lease), Duration::from_secs(60)));

        let client_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = std::net::TcpStream::connect(client_listener.local_addr().expect("address"))
            .expect("connect");
        client.set_nonblocking(true).expect("non-blocking");
        let (accepted, _) = client_listener.accept().await.expect("accept");
        let timeouts = crate::conn::ClientTimeouts {
            idle: Duration::from_secs(60),
            header: Duration::from_secs(60),
            write: Duration::from_secs(60),
        };
        let metrics = Arc::new(crate::metrics::Metrics::new().listener("test"));
        let (io, _activity) = ClientIo::new(accepted, Bytes::new(), timeouts, metrics);
        HeldAnswer {
            body_go,
            client,
            answer: Answer {
                io,
                outgoing: Outgoing::default(),
                response: Some(response),
            },
        }
    }

    /// Polls a future once.
    async fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        let mut future = Some(future);
        poll_fn(|cx| Poll::Ready(future.take().expect("polled once").poll(cx))).await
    }

    /// Reads an answer's head from the client socket, and checks that it is the backend's. The
    /// bytes were written before this is called: a blocking read (with a limit) takes them, and no
    /// tokio clock, which a paused runtime moves on its own, is involved.
    fn read_head(client: &std::net::TcpStream) {
        client.set_nonblocking(false).expect("blocking");
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("a read limit");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            std::io::Read::read_exact(&mut &*client, &mut byte).expect("the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).expect("text");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
    }

    /// Reads the five-byte body from the client socket, as `read_head` reads the head.
    fn read_body(client: &std::net::TcpStream) -> String {
        let mut bytes = [0u8; 5];
        std::io::Read::read_exact(&mut &*client, &mut bytes).expect("the body");
        String::from_utf8(bytes.to_vec()).expect("text")
    }

    /// A backend sent the head and not yet the body: the head waits for the body, and both leave
    /// in one write.
    #[tokio::test(start_paused = true)]
    async fn an_answers_head_waits_briefly_for_its_body() {
        let HeldAnswer {
            body_go,
            client,
            mut answer,
        } = held_answer().await;
        let mut writing = std::pin::pin!(answer.writing());
        assert!(poll_once(writing.as_mut()).await.is_pending());
        let mut probe = [0u8; 64];
        assert_eq!(
            std::io::Read::read(&mut &client, &mut probe).map_err(|error| error.kind()),
            Err(io::ErrorKind::WouldBlock),
            "the head is held while the body is on its way"
        );
        body_go.send(()).expect("the backend waits");
        assert!(
            writing.await.expect("written"),
            "the connection may be reused"
        );
        read_head(&client);
        assert_eq!(read_body(&client), "hello");
    }

    /// The head waits for the body only briefly: a stream whose first bytes come later gets its
    /// head at once all the same.
    #[tokio::test(start_paused = true)]
    async fn an_answers_head_is_written_alone_when_its_body_is_late() {
        let HeldAnswer {
            body_go,
            client,
            mut answer,
        } = held_answer().await;
        let mut writing = std::pin::pin!(answer.writing());
        assert!(poll_once(writing.as_mut()).await.is_pending());
        // Past the timer's millisecond rounding.
        tokio::time::advance(HEAD_HOLD * 2).await;
        assert!(
            poll_once(writing.as_mut()).await.is_pending(),
            "the body is still to come"
        );
        read_head(&client);
        body_go.send(()).expect("the backend waits");
        assert!(writing.await.expect("written"));
        assert_eq!(read_body(&client), "hello");
    }

    fn parse(text: &str) -> Parsed {
        parse_request(&mut BytesMut::from(text.as_bytes()), 65536)
    }

    /// What the pipeline would look up in the map is noted while the head is parsed.
    #[test]
    fn the_fields_the_pipeline_asks_about_are_noted_while_parsing() {
        let facts_of = |fields: &str| {
            let text = format!("GET / HTTP/1.1\r\n{fields}\r\n");
            match parse(&text) {
                Parsed::Request(request, _) => request.body().lean_facts().expect("lean"),
                _ => panic!("not taken: {fields:?}"),
            }
        };
        assert_eq!(
            facts_of("Host: a\r\nAccept: */*\r\n"),
            LeanFacts {
                host: true,
                ..LeanFacts::default()
            }
        );
        assert_eq!(facts_of("Accept: */*\r\n"), LeanFacts::default());
        for hop in [
            "Connection: close",
            "Keep-Alive: 5",
            "TE: trailers",
            "Proxy-Authorization: x",
        ] {
            assert!(
                facts_of(&format!("Host: a\r\n{hop}\r\n")).hop_by_hop,
                "{hop}"
            );
        }
        for forwarding in [
            "X-Forwarded-For: 1.2.3.4",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: b",
            "Forwarded: for=1.2.3.4",
            "Via: 1.1 other",
            "X-Request-Id: 7",
        ] {
            let facts = facts_of(&format!("Host: a\r\n{forwarding}\r\n"));
            assert!(facts.forwarding && !facts.hop_by_hop, "{forwarding}");
        }
        assert!(facts_of("Content-Type: application/grpc+proto\r\n").grpc);
        // As `HeaderMap::get`, the first `Content-Type` counts.
        assert!(!facts_of("Content-Type: text/plain\r\nContent-Type: application/grpc\r\n").grpc);
    }

    #[test]
    fn takes_a_bodiless_request_and_keeps_what_follows() {
        let mut buffer = BytesMut::from(
            &b"GET /a?b=c HTTP/1.1\r\nHost: example\r\nTE: trailers\r\nX-Thing: 1\r\n\r\nGET /next"
                [..],
        );
        let Parsed::Request(request, facts) = parse_request(&mut buffer, 65536) else {
            panic!("not taken");
        };
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=c");
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["host"], "example");
        assert_eq!(request.headers()["x-thing"], "1");
        assert!(facts.keep_alive && facts.trailers && !facts.head && !facts.http10);
        assert_eq!(&buffer[..], b"GET /next");
        assert!(matches!(parse_request(&mut buffer, 65536), Parsed::Partial));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let facts = |text: &str| match parse(text) {
            Parsed::Request(_, facts) => facts,
            _ => panic!("not taken: {text}"),
        };
        assert!(!facts("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!facts("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(facts("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(facts("HEAD / HTTP/1.0\r\n\r\n").head);
    }

    #[test]
    fn a_request_left_to_hyper_stays_whole_in_the_buffer() {
        let text = "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\n";
        let mut buffer = BytesMut::from(text.as_bytes());
        assert!(matches!(parse_request(&mut buffer, 65536), Parsed::NotLean));
        assert_eq!(&buffer[..], text.as_bytes());
    }

    #[test]
    fn a_whole_head_over_the_limit_is_left_to_hyper() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\nX-Long: 0123456789\r\n\r\n";
        let mut buffer = BytesMut::from(text.as_bytes());
        assert!(matches!(
            parse_request(&mut buffer, text.len() - 1),
            Parsed::NotLean
        ));
        assert_eq!(&buffer[..], text.as_bytes());
        assert!(matches!(
            parse_request(&mut buffer, text.len()),
            Parsed::Request(..)
        ));
    }

    #[test]
    fn leaves_bodies_upgrades_and_odd_targets_to_hyper() {
        for text in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(matches!(parse(text), Parsed::NotLean), "{text}");
        }
    }

    fn head_of(response: Response<ResponseBody>, facts: RequestFacts) -> (String, Framing, bool) {
        let mut out = BytesMut::new();
        let (parts, body) = response.into_parts();
        let (framing, keep_alive, _) = encode_head(&parts, &body, &facts, false, &mut out);
        let text = String::from_utf8(out.to_vec()).expect("ASCII head");
        // The date changes; its presence is what matters.
        let (before, after) = text.split_once("date: ").expect("a date field");
        let rest = after.split_once("\r\n").expect("end of the date").1;
        (format!("{before}date: *\r\n{rest}"), framing, keep_alive)
    }

    const GET11: RequestFacts = RequestFacts {
        http10: false,
        head: false,
        keep_alive: true,
        trailers: false,
    };

    #[test]
    fn frames_answers_as_hyper_does() {
        let fixed = Response::new(ResponseBody::fixed("hello", None));
        assert_eq!(
            head_of(fixed, GET11),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: *\r\n\r\n".to_string(),
                Framing::Length(5),
                true
            )
        );
        let mut closed = Response::new(ResponseBody::fixed("", None));
        *closed.status_mut() = StatusCode::NOT_FOUND;
        let facts = RequestFacts {
            keep_alive: false,
            ..GET11
        };
        assert_eq!(
            head_of(closed, facts),
            (
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\ndate: *\r\n\r\n"
                    .to_string(),
                Framing::Length(0),
                false
            )
        );
        let mut head = Response::new(ResponseBody::fixed("", None));
        head.headers_mut()
            .insert(header::CONTENT_LENGTH, "42".parse().expect("valid"));
        let facts = RequestFacts {
            http10: true,
            head: true,
            ..GET11
        };
        assert_eq!(
            head_of(head, facts),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 42\r\nconnection: keep-alive\r\ndate: *\r\n\r\n"
                    .to_string(),
                Framing::None,
                true
            )
        );
    }

    #[test]
    fn a_204_never_carries_a_length() {
        let mut empty = Response::new(ResponseBody::fixed("", None));
        *empty.status_mut() = StatusCode::NO_CONTENT;
        empty
            .headers_mut()
            .insert(header::CONTENT_LENGTH, "10".parse().expect("valid"));
        assert_eq!(
            head_of(empty, GET11),
            (
                "HTTP/1.1 204 No Content\r\ndate: *\r\n\r\n".to_string(),
                Framing::None,
                true
            )
        );
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut out = BytesMut::new();
        write_chunk_size(&mut out, 0);
        write_chunk_size(&mut out, 255);
        write_chunk_size(&mut out, 65536);
        assert_eq!(&out[..], b"0\r\nFF\r\n10000\r\n");
    }
}
