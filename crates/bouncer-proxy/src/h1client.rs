//! A lean HTTP/1.1 client for the most common exchange with a plain backend: a request without a
//! body (a GET, a HEAD) on a pooled keep-alive connection.
//!
//! hyper's client runs each connection in a task of its own and talks to it through channels: the
//! request goes over one, the response head comes back over another and the body over a third.
//! Measured with `bench/instructions`, that machinery was about a third of the proxy's work per
//! request. Here the request's own task writes the request, parses the response head with
//! `httparse` and reads the body as the client takes it, and the connection goes back to its pool
//! when the body ends. Requests with a body, upgrades, TLS and HTTP/2 backends stay on hyper.
//!
//! The framing rules are RFC 9112's (section 6.3): no body for HEAD, 1xx, 204 and 304; chunked
//! when `Transfer-Encoding` ends in `chunked` (and then `Content-Length` is ignored and the
//! connection not reused); else one `Content-Length` (several must agree); else until the backend
//! closes. Anything else is a malformed response, never guessed at.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::headers::DeferredFields;
use crate::pool::ConnectionPool;
use crate::raw_fields::{Fate, FieldRuns, RawFields};
use crate::upstream::Wire;

/// Header fields a head may have, as hyper allows.
pub(crate) const MAX_HEADERS: usize = 100;
/// The most a response head may take, as hyper's default read buffer limit.
const MAX_HEAD_BYTES: usize = 400 * 1024;
/// What a read of a response head asks room for at least.
const READ_CHUNK: usize = 16 * 1024;
/// What a read of a response body asks room for at least: a large body then takes fewer reads,
/// each a system call. The room goes when the connection is idle (see `LeanBody::release`).
const BODY_READ_CHUNK: usize = 64 * 1024;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// The most a chunked body's trailer section may take.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// Why an exchange on a lean connection failed.
#[derive(Debug, thiserror::Error)]
pub enum LeanError {
    #[error("reading from or writing to the backend failed")]
    Io(#[from] io::Error),
    #[error("the backend's response is malformed: {0}")]
    Malformed(&'static str),
    #[error("the backend did not answer before the response deadline")]
    ResponseTimeout,
}

fn closed_early() -> LeanError {
    LeanError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the backend closed the connection before the response was complete",
    ))
}

/// An open connection to a backend, idle between exchanges.
pub struct LeanConnection {
    stream: TcpStream,
    /// Bytes read and not yet parsed; empty between exchanges.
    buffer: BytesMut,
    /// The request head being written, kept for its capacity.
    out: Vec<u8>,
    /// The response clock, kept from one exchange to the next. Moving a registered timer to a
    /// later deadline takes no lock; the timer wheel meets it again only when its older deadline
    /// comes, and moves it on then, about once per response timeout. A new timer for every
    /// exchange would take the lock and work the wheel twice per request. Between exchanges the
    /// timer keeps the last task's waker, which it may wake once, for nothing.
    response_clock: Pin<Box<tokio::time::Sleep>>,
}

/// A failed exchange, and whether none of the request was written (it may then go elsewhere).
pub struct ExchangeFailure {
    pub error: LeanError,
    pub unsent: bool,
}

/// A response head, with how its body is framed.
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// The fields, but for `Keep-Alive` and a `Connection` that only says `close` or `keep-alive`
    /// (or names `upgrade` or `te`, whose fields go anyway): those concern this connection alone,
    /// are read into `notes` and never reach the client. A `Connection` naming other fields
    /// stays, so that the fields it names are removed with it. Empty when the fields are kept as
    /// `raw`.
    pub headers: HeaderMap,
    /// The fields as the bytes read, when the exchange asked for them so and the head allows it.
    raw: Option<Box<RawFields>>,
    notes: HeadNotes,
}

/// What the proxy reads in a head's fields while it parses them.
#[derive(Debug, Default, Clone, Copy)]
struct HeadNotes {
    connection: ConnectionOptions,
    framing: FramingFields,
    has_date: bool,
    has_hsts: bool,
}

impl HeadNotes {
    /// What becomes of a field when the fields are kept as the bytes read (see `raw_fields`);
    /// `None` when the head needs a map after all.
    fn raw_fate(&mut self, name: &[u8], value: &[u8]) -> Option<Fate> {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        Some(match name.len() {
            4 if is(b"date") => {
                self.has_date = true;
                Fate::Keep
            }
            10 if is(b"connection") => {
                if self.connection.note(value) {
                    // It names fields, which go with it: the map's work.
                    return None;
                }
                Fate::Drop
            }
            10 if is(b"keep-alive") => Fate::Drop,
            // The proxy sets its own (see `pipeline::add_proxy_headers`).
            12 if is(b"x-request-id") => Fate::Drop,
            14 if is(b"content-length") => {
                self.framing.note_length(value);
                Fate::Drop
            }
            17 if is(b"transfer-encoding") => {
                self.framing.note_transfer_encoding(value);
                Fate::Drop
            }
            25 if is(b"strict-transport-security") => {
                self.has_hsts = true;
                Fate::Keep
            }
            // Hop-by-hop fields and trailer announcements, which `remove_hop_by_hop` and the
            // server's trailer handling read in the map.
            2 if is(b"te") => return None,
            7 if is(b"trailer") || is(b"upgrade") => return None,
            length if length >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-") => return None,
            _ => Fate::Keep,
        })
    }
}

/// What a head's fields say about how its body is framed.
#[derive(Debug, Clone, Copy)]
struct FramingFields {
    /// Whether a `Transfer-Encoding` was sent, and then whether the last coding of the last one
    /// is `chunked`.
    transfer_coding: Option<bool>,
    /// The `Content-Length`, if one was sent; an error when one is invalid or they disagree,
    /// which matters only when there is no transfer coding.
    length: Result<Option<u64>, &'static str>,
}

impl Default for FramingFields {
    fn default() -> Self {
        Self {
            transfer_coding: None,
            length: Ok(None),
        }
    }
}

impl FramingFields {
    fn note_transfer_encoding(&mut self, value: &[u8]) {
        let last = value.rsplit(|&b| b == b',').next().map(<[u8]>::trim_ascii);
        self.transfer_coding =
            Some(last.is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked")));
    }

    fn note_length(&mut self, value: &[u8]) {
        let Ok(mut length) = self.length else {
            return;
        };
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) || item.len() > 19 {
                self.length = Err("invalid Content-Length");
                return;
            }
            let parsed = item
                .iter()
                .fold(0u64, |total, digit| total * 10 + u64::from(digit - b'0'));
            if length.is_some_and(|known| known != parsed) {
                self.length = Err("conflicting Content-Length values");
                return;
            }
            length = Some(parsed);
        }
        self.length = Ok(length);
    }

    /// Whether any `Content-Length` was sent, valid or not.
    fn length_sent(&self) -> bool {
        self.length != Ok(None)
    }
}

/// What the backend's `Connection` fields say about the connection.
#[derive(Debug, Default, Clone, Copy)]
struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
}

impl ConnectionOptions {
    /// Notes one `Connection` value; says whether it names anything else, and must then be kept.
    fn note(&mut self, value: &[u8]) -> bool {
        let mut names_others = false;
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                names_others |= !(token.is_empty()
                    || token.eq_ignore_ascii_case(b"upgrade")
                    || token.eq_ignore_ascii_case(b"te"));
            }
        }
        names_others
    }

    /// Whether the backend keeps the connection open after this response.
    fn keeps_alive(self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive && !self.close
        } else {
            !self.close
        }
    }
}

impl LeanConnection {
    pub fn new(stream: TcpStream) -> Box<Self> {
        Box::new(Self {
            stream,
            buffer: BytesMut::new(),
            out: Vec::new(),
            // Not registered until first polled; every exchange sets its own deadline.
            response_clock: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }

    /// Whether an idle connection may carry another exchange: the backend has neither closed it
    /// nor sent anything on it. Costs no system call unless the socket has become readable.
    pub fn is_usable(&self) -> bool {
        if !self.buffer.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends `request` (which has no body) and reads the response head, which must come by
    /// `deadline`; the body is read through the returned [`LeanBody`], which gives the connection
    /// back to `pool` when it ends.
    ///
    /// `wire` brings fields to write beside the request's map, and says whether the response's
    /// fields may be kept as the bytes read, in the body (see [`LeanBody::raw_fields`]).
    pub async fn exchange<B>(
        mut self: Box<Self>,
        request: &Request<B>,
        pool: &Arc<ConnectionPool>,
        deadline: Instant,
        wire: Wire<'_>,
    ) -> Result<(ResponseHead, LeanBody), ExchangeFailure> {
        self.response_clock.as_mut().reset(deadline);
        let LeanConnection {
            stream,
            buffer,
            out,
            response_clock,
        } = &mut *self;
        let head_request = *request.method() == Method::HEAD;
        // A HEAD answer's length is passed on as the backend sent it, which the map does.
        let raw = wire.raw_answer && !head_request;
        let head = tokio::select! {
            biased;
            head = send_and_read_head(stream, buffer, out, request, wire.deferred, raw) => head?,
            () = response_clock.as_mut() => {
                return Err(ExchangeFailure {
                    error: LeanError::ResponseTimeout,
                    unsent: false,
                });
            }
        };
        let mut head = head;
        let (framing, reusable) =
            framing(&head, head_request).map_err(|error| ExchangeFailure {
                error,
                unsent: false,
            })?;
        let body = LeanBody {
            connection: Some(self),
            framing,
            reusable,
            pool: Some(Arc::clone(pool)),
            raw: head.raw.take(),
        };
        Ok((head, body.finish_if_done()))
    }
}

/// Writes the request head in `out` and reads the response head into `buffer`.
async fn send_and_read_head<B>(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    out: &mut Vec<u8>,
    request: &Request<B>,
    deferred: Option<&DeferredFields<'_>>,
    raw: bool,
) -> Result<ResponseHead, ExchangeFailure> {
    out.clear();
    encode_head(request, deferred, out);
    let mut written = 0;
    while written < out.len() {
        match stream.write(&out[written..]).await {
            Ok(0) => {
                return Err(ExchangeFailure {
                    error: closed_early(),
                    unsent: written == 0,
                });
            }
            Ok(count) => written += count,
            Err(error) => {
                return Err(ExchangeFailure {
                    error: LeanError::Io(error),
                    unsent: written == 0,
                });
            }
        }
    }
    let sent = |error| ExchangeFailure {
        error,
        unsent: false,
    };
    loop {
        // Between exchanges the buffer is empty: the answer has to be read first.
        if !buffer.is_empty()
            && let Some(head) = parse_head(buffer, raw).map_err(sent)?
        {
            match head.status.as_u16() {
                // Interim answers (100 Continue, 103 Early Hints) are not passed on.
                100 | 102..=199 => continue,
                101 => return Err(sent(LeanError::Malformed("101 without an upgrade"))),
                _ => return Ok(head),
            }
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(sent(LeanError::Malformed("response head too large")));
        }
        if read_more(stream, buffer)
            .await
            .map_err(|error| sent(LeanError::Io(error)))?
            == 0
        {
            return Err(sent(closed_early()));
        }
    }
}

/// The request line and fields, as HTTP/1.1, with the `deferred` fields after the map's. The
/// request has no body: methods that expect one say `Content-Length: 0` unless the fields already
/// frame it.
fn encode_head<B>(request: &Request<B>, deferred: Option<&DeferredFields<'_>>, out: &mut Vec<u8>) {
    let method = request.method();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = request.headers();
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(deferred) = deferred {
        deferred.write_to(out);
    }
    let expects_body = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    if expects_body
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads once into `buffer`'s spare room, growing it first when little is left.
async fn read_more(stream: &mut TcpStream, buffer: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(stream, buffer, READ_CHUNK, cx)).await
}

fn poll_read_more(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    chunk: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buffer.capacity() - buffer.len() < chunk / 4 {
        buffer.reserve(chunk);
    }
    // Through `AsyncRead`, which takes a read that leaves room in the buffer as the socket
    // drained: the next read then waits for the poller instead of trying a read that finds nothing
    // (a system call per exchange; `try_read_buf` would keep the socket marked readable).
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buffer)
}

/// Parses a complete response head off the front of `buffer`, or says that more is needed. The
/// field values keep pointing into the bytes read, without a copy. With `raw`, the fields are
/// kept as those bytes when the head allows it (see `raw_fields`), and otherwise put in a map.
fn parse_head(buffer: &mut BytesMut, raw: bool) -> Result<Option<ResponseHead>, LeanError> {
    // Left uninitialised, and the spans below kept small: zeroing kilobytes for every response
    // would cost more than parsing it.
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut no_slots: [httparse::Header<'_>; 0] = [];
    let mut parsed = httparse::Response::new(&mut no_slots);
    let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buffer,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(LeanError::Malformed("too many header fields"));
        }
        Err(_) => return Err(LeanError::Malformed("invalid response head")),
    };
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(LeanError::Malformed("invalid status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Interim answers are not passed on, and 204 and 304 keep a length as the backend sent it.
    let raw = raw
        && status.as_u16() >= 200
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    let mut notes = HeadNotes::default();
    if raw
        && let Some(runs) = FieldRuns::of(buffer, parsed.headers, |name, value| {
            notes.raw_fate(name, value)
        })
    {
        let head = buffer.split_to(length).freeze();
        return Ok(Some(ResponseHead {
            status,
            version,
            headers: HeaderMap::new(),
            raw: Some(Box::new(RawFields::new(
                head,
                runs,
                notes.has_date,
                notes.has_hsts,
            ))),
            notes,
        }));
    }
    // What a scan that gave up noted is noted again below.
    notes = HeadNotes::default();
    let spans = FieldSpans::of(buffer, parsed.headers);
    let head = buffer.split_to(length).freeze();
    // Room for what the proxy adds to an answer, so that the map grows once at most. The fields
    // about this connection alone are read here rather than put in the map and taken out again.
    let mut headers = spans
        .header_map_keeping(&head, 4, |name, value| {
            if *name == header::CONNECTION {
                notes.connection.note(value)
            } else if *name == crate::headers::KEEP_ALIVE {
                false
            } else {
                if *name == header::CONTENT_LENGTH {
                    notes.framing.note_length(value);
                } else if *name == header::TRANSFER_ENCODING {
                    notes.framing.note_transfer_encoding(value);
                }
                true
            }
        })
        .ok_or(LeanError::Malformed("invalid header field"))?;
    if notes.framing.transfer_coding.is_some() && notes.framing.length_sent() {
        // Both framings: the transfer coding wins, and the length is not passed on (RFC 9112
        // section 6.3 says a sender must remove it).
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        raw: None,
        notes,
    }))
}

/// Where each field's name and value lie in a parsed head, so that the head can be split off the
/// read buffer and the values kept as slices of it, without a copy.
pub(crate) struct FieldSpans {
    /// Start and end of each name and value, within a head that the read limits keep far below
    /// `u32::MAX` bytes. Most heads fit here; the rest go to `more`.
    inline: [[u32; 4]; INLINE_SPANS],
    more: Vec<[u32; 4]>,
    count: usize,
}

/// Fields whose spans are kept without an allocation; kept small, as the spans are made and moved
/// for every head.
const INLINE_SPANS: usize = 20;

impl FieldSpans {
    /// The spans of `fields`, which `httparse` found in `head`.
    pub(crate) fn of(head: &[u8], fields: &[httparse::Header<'_>]) -> Self {
        let base = head.as_ptr() as usize;
        let span = |field: &httparse::Header<'_>| {
            let name = field.name.as_ptr() as usize - base;
            let value = field.value.as_ptr() as usize - base;
            [
                name as u32,
                (name + field.name.len()) as u32,
                value as u32,
                (value + field.value.len()) as u32,
            ]
        };
        let mut spans = Self {
            inline: [[0; 4]; INLINE_SPANS],
            more: Vec::new(),
            count: fields.len(),
        };
        for (slot, field) in spans.inline.iter_mut().zip(fields) {
            *slot = span(field);
        }
        spans
            .more
            .extend(fields.iter().skip(INLINE_SPANS).map(span));
        spans
    }

    /// The fields as a map over `head` (the bytes the spans were taken from), with room for
    /// `spare` more; `None` when a name or value is not a valid field.
    pub(crate) fn header_map(&self, head: &Bytes, spare: usize) -> Option<HeaderMap> {
        self.header_map_keeping(head, spare, |_, _| true)
    }

    /// As `header_map`, with only the fields for which `keep` (given the name and the raw value)
    /// says yes.
    fn header_map_keeping(
        &self,
        head: &Bytes,
        spare: usize,
        mut keep: impl FnMut(&HeaderName, &[u8]) -> bool,
    ) -> Option<HeaderMap> {
        let mut headers = HeaderMap::with_capacity(self.count + spare);
        let inline = &self.inline[..self.count.min(INLINE_SPANS)];
        for &[name_start, name_end, value_start, value_end] in inline.iter().chain(&self.more) {
            let name =
                HeaderName::from_bytes(&head[name_start as usize..name_end as usize]).ok()?;
            let value_span = value_start as usize..value_end as usize;
            if !keep(&name, &head[value_span.clone()]) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice(value_span)).ok()?;
            headers.append(name, value);
        }
        Some(headers)
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    UntilClose,
    Done,
}

/// Where a chunked body's reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    SizeLine,
    /// This many bytes of the current chunk remain.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// The body's framing and whether the connection may carry another exchange after it.
fn framing(head: &ResponseHead, head_request: bool) -> Result<(Framing, bool), LeanError> {
    let HeadNotes {
        connection,
        framing: fields,
        ..
    } = head.notes;
    let mut reusable = connection.keeps_alive(head.version);
    let status = head.status;
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, reusable));
    }
    if let Some(chunked) = fields.transfer_coding {
        // Both framings: the connection is not trusted again.
        reusable &= !fields.length_sent();
        return Ok(if chunked {
            (Framing::Chunked(Chunk::SizeLine), reusable)
        } else {
            (Framing::UntilClose, false)
        });
    }
    Ok(match fields.length.map_err(LeanError::Malformed)? {
        Some(0) => (Framing::Done, reusable),
        Some(length) => (Framing::Length(length), reusable),
        None => (Framing::UntilClose, false),
    })
}

/// A response body read from a lean connection as the client takes it.
pub struct LeanBody {
    // Boxed once per connection, so that a response carrying it stays small to move.
    connection: Option<Box<LeanConnection>>,
    framing: Framing,
    reusable: bool,
    pool: Option<Arc<ConnectionPool>>,
    /// The response's fields, when they are kept as the bytes read. Boxed, as a response is moved
    /// several times on its way.
    raw: Option<Box<RawFields>>,
}

impl LeanBody {
    /// The response's fields as the bytes read, when the exchange asked for them so (then the
    /// response's map holds none of them).
    pub fn raw_fields(&self) -> Option<&RawFields> {
        self.raw.as_deref()
    }

    pub fn raw_fields_mut(&mut self) -> Option<&mut RawFields> {
        self.raw.as_deref_mut()
    }

    pub fn take_raw_fields(&mut self) -> Option<Box<RawFields>> {
        self.raw.take()
    }

    /// At the body's end, the connection goes back to its pool (when the backend keeps it open
    /// and sent nothing past the response) or is closed.
    fn finish_if_done(mut self) -> Self {
        if self.framing == Framing::Done {
            self.release();
        }
        self
    }

    fn release(&mut self) {
        if let (Some(mut connection), Some(pool)) = (self.connection.take(), self.pool.take())
            && self.reusable
            && connection.buffer.is_empty()
        {
            // An idle connection keeps no large buffer (nor the block its frames were cut from).
            if connection.buffer.capacity() > READ_CHUNK {
                connection.buffer = BytesMut::new();
            }
            pool.give_back_lean(connection);
        }
    }

    /// Fails the body: the connection is closed.
    fn fail(&mut self, error: LeanError) -> Poll<Option<Result<Frame<Bytes>, LeanError>>> {
        self.connection = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(error)))
    }

    fn buffered(&mut self) -> Option<&mut BytesMut> {
        self.connection
            .as_mut()
            .map(|connection| &mut connection.buffer)
    }

    /// Reads more from the backend; a close where more was due fails the body.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, LeanError>> {
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(Err(closed_early()));
        };
        let count = ready!(poll_read_more(
            &mut connection.stream,
            &mut connection.buffer,
            BODY_READ_CHUNK,
            cx
        ))?;
        Poll::Ready(Ok(count))
    }
}

impl Body for LeanBody {
    type Data = Bytes;
    type Error = LeanError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LeanError>>> {
        let this = self.get_mut();
        loop {
            if this.connection.is_none() {
                return Poll::Ready(None);
            }
            match this.framing {
                Framing::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                Framing::Length(remaining) => {
                    if this.buffered().is_none_or(|buffer| buffer.is_empty()) {
                        match ready!(this.poll_fill(cx)) {
                            Ok(0) => return this.fail(closed_early()),
                            Ok(_) => continue,
                            Err(error) => return this.fail(error),
                        }
                    }
                    let Some(buffer) = this.buffered() else {
                        return Poll::Ready(None);
                    };
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len());
                    let data = buffer.split_to(take).freeze();
                    this.framing = match remaining - take as u64 {
                        0 => Framing::Done,
                        left => Framing::Length(left),
                    };
                    if this.framing == Framing::Done {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::UntilClose => {
                    if this.buffered().is_none_or(|buffer| buffer.is_empty()) {
                        match ready!(this.poll_fill(cx)) {
                            Ok(0) => {
                                // The backend's close ends the body; the connection is spent.
                                this.framing = Framing::Done;
                                this.connection = None;
                                return Poll::Ready(None);
                            }
                            Ok(_) => continue,
                            Err(error) => return this.fail(error),
                        }
                    }
                    let Some(buffer) = this.buffered() else {
                        return Poll::Ready(None);
                    };
                    return Poll::Ready(Some(Ok(Frame::data(buffer.split().freeze()))));
                }
                Framing::Chunked(chunk) => {
                    let Some(buffer) = this.buffered() else {
                        return Poll::Ready(None);
                    };
                    match step_chunked(chunk, buffer) {
                        Ok(Step::Data(data, next)) => {
                            this.framing = Framing::Chunked(next);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Step::Next(next)) => this.framing = Framing::Chunked(next),
                        Ok(Step::End(trailers)) => {
                            this.framing = Framing::Done;
                            this.release();
                            return Poll::Ready(
                                trailers.map(|trailers| Ok(Frame::trailers(trailers))),
                            );
                        }
                        Ok(Step::NeedMore) => match ready!(this.poll_fill(cx)) {
                            Ok(0) => return this.fail(closed_early()),
                            Ok(_) => {}
                            Err(error) => return this.fail(error),
                        },
                        Err(error) => return this.fail(error),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(remaining) => SizeHint::with_exact(remaining),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// What one step of chunked decoding found.
enum Step {
    Data(Bytes, Chunk),
    Next(Chunk),
    /// The last chunk and the trailer section, which may be empty.
    End(Option<HeaderMap>),
    NeedMore,
}

fn step_chunked(chunk: Chunk, buffer: &mut BytesMut) -> Result<Step, LeanError> {
    match chunk {
        Chunk::SizeLine => {
            let Some(end) = buffer.iter().position(|&b| b == b'\n') else {
                return if buffer.len() > MAX_CHUNK_LINE {
                    Err(LeanError::Malformed("chunk-size line too long"))
                } else {
                    Ok(Step::NeedMore)
                };
            };
            let size = chunk_size(&buffer[..=end])?;
            buffer.advance(end + 1);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(remaining) => {
            if buffer.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let data = buffer.split_to(take).freeze();
            let next = match remaining - take as u64 {
                0 => Chunk::DataEnd,
                left => Chunk::Data(left),
            };
            Ok(Step::Data(data, next))
        }
        Chunk::DataEnd => {
            if buffer.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buffer[..2] != b"\r\n" {
                return Err(LeanError::Malformed("chunk data not followed by CRLF"));
            }
            buffer.advance(2);
            Ok(Step::Next(Chunk::SizeLine))
        }
        Chunk::Trailers => {
            if buffer.starts_with(b"\r\n") {
                buffer.advance(2);
                return Ok(Step::End(None));
            }
            let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
                return if buffer.len() > MAX_TRAILER_BYTES {
                    Err(LeanError::Malformed("trailer section too large"))
                } else {
                    Ok(Step::NeedMore)
                };
            };
            let section = buffer.split_to(end + 4);
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let fields = match httparse::parse_headers(&section, &mut slots) {
                Ok(httparse::Status::Complete((_, fields))) => fields,
                _ => return Err(LeanError::Malformed("invalid trailer section")),
            };
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| LeanError::Malformed("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| LeanError::Malformed("invalid trailer value"))?;
                trailers.append(name, value);
            }
            Ok(Step::End(Some(trailers)))
        }
    }
}

/// The size on a chunk-size line (hex digits, then optional extensions, then CRLF).
fn chunk_size(line: &[u8]) -> Result<u64, LeanError> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(LeanError::Malformed("chunk-size line without CRLF"))?;
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 15 {
        return Err(LeanError::Malformed("invalid chunk size"));
    }
    // Only extensions may follow, after optional whitespace.
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(LeanError::Malformed("invalid chunk size"));
    }
    Ok(digits.iter().fold(0u64, |size, &digit| {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        size * 16 + u64::from(value)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> ResponseHead {
        let mut buffer = BytesMut::from(text);
        parse_head(&mut buffer, false)
            .expect("valid head")
            .expect("complete head")
    }

    #[test]
    fn a_head_is_parsed_and_its_values_point_into_the_bytes_read() {
        let mut buffer = BytesMut::from(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Many: a\r\nX-Many: b\r\n\r\nhello",
        );
        let head = parse_head(&mut buffer, false)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers[header::CONTENT_LENGTH], "5");
        let many: Vec<_> = head.headers.get_all("x-many").iter().collect();
        assert_eq!(many, ["a", "b"]);
        assert_eq!(&buffer[..], b"hello");
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Len");
        assert!(
            parse_head(&mut partial, false)
                .expect("valid so far")
                .is_none()
        );
        let mut bad = BytesMut::from("HTTP/1.1 2x0 OK\r\n\r\n");
        assert!(parse_head(&mut bad, false).is_err());
    }

    /// Reads from `socket` until `heads` request heads have arrived in all.
    async fn read_heads(socket: &mut TcpStream, seen: &mut Vec<u8>, heads: usize) {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 1024];
        while seen
            .windows(4)
            .filter(|window| *window == b"\r\n\r\n")
            .count()
            < heads
        {
            let read = socket.read(&mut chunk).await.expect("read from the proxy");
            assert!(read > 0, "the proxy closed the connection");
            seen.extend_from_slice(&chunk[..read]);
        }
    }

    /// The response clock stays with the connection and moves to each exchange's deadline: a
    /// reused connection times out at its own exchange's deadline, not at an earlier one's.
    #[tokio::test(start_paused = true)]
    async fn a_reused_connection_times_out_at_its_own_exchanges_deadline() {
        use crate::body::RequestBody;
        use crate::pool::{ConnectionPool, PoolSettings, SendError};
        use http_body_util::BodyExt;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        // Answers the first request, then reads the second and stays silent.
        let backend = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            read_heads(&mut socket, &mut seen, 1).await;
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("answer");
            read_heads(&mut socket, &mut seen, 2).await;
            socket
        });
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(5),
            max_idle: 4,
            idle_timeout: Duration::from_secs(3600),
        };
        let pool = ConnectionPool::new(address, "backend".into(), settings, None, false);
        let request = || {
            Request::get("/")
                .header(header::HOST, "backend")
                .body(RequestBody::empty())
                .expect("request")
        };

        let start = Instant::now();
        let (response, _lease) = pool
            .send_lean(
                &request(),
                start,
                start + Duration::from_secs(1),
                Wire::default(),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("the first exchange is answered");
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes(), "ok");

        // The same connection, back from the pool, with a later deadline.
        let second = start + Duration::from_secs(10);
        let failure = pool
            .send_lean(&request(), Instant::now(), second, Wire::default())
            .await;
        assert!(matches!(failure, Err((SendError::ResponseTimeout, false))));
        assert_eq!(Instant::now(), second, "timed out at the second deadline");
        let socket = backend.await.expect("the backend saw both requests");
        drop(socket);
    }

    #[test]
    fn fields_about_this_connection_alone_stay_out_of_the_map() {
        let parsed = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Connection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(!parsed.headers.contains_key(header::CONNECTION));
        assert!(!parsed.headers.contains_key("keep-alive"));
        // Removed later with the other hop-by-hop fields, by name.
        assert_eq!(parsed.headers[header::UPGRADE], "h2c");
        // A `Connection` that names another field stays, so that the field goes with it.
        let naming = head(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive, x-trace\r\nX-Trace: 1\r\n\
             Content-Length: 0\r\n\r\n",
        );
        assert_eq!(naming.headers[header::CONNECTION], "keep-alive, x-trace");
        assert!(naming.notes.connection.keeps_alive(Version::HTTP_10));
        let mut map = naming.headers;
        crate::headers::remove_hop_by_hop(&mut map, false);
        assert!(!map.contains_key("x-trace") && !map.contains_key(header::CONNECTION));
        // A field the head cannot carry is refused, as before.
        let mut bad = BytesMut::from("HTTP/1.1 200 OK\r\nConnection: close\r\nX: \x7f\r\n\r\n");
        assert!(parse_head(&mut bad, false).is_err());
    }

    /// Parses `text` with its fields kept as the bytes read where the head allows it.
    fn raw_head(text: &str) -> ResponseHead {
        let mut buffer = BytesMut::from(text);
        parse_head(&mut buffer, true)
            .expect("valid head")
            .expect("complete head")
    }

    fn kept_lines(head: &ResponseHead) -> Option<String> {
        let raw = head.raw.as_ref()?;
        Some(raw.runs().map(|run| String::from_utf8_lossy(run)).collect())
    }

    #[test]
    fn fields_kept_as_read_leave_out_what_the_proxy_reads() {
        let head = raw_head(
            "HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nContent-Length: 5\r\n\
             X-Request-Id: backend\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Strict-Transport-Security: max-age=1\r\nSet-Cookie: a=1\r\n\r\nhello",
        );
        assert!(head.headers.is_empty());
        assert_eq!(
            kept_lines(&head).expect("kept as read"),
            "Server: s\r\nDate: d\r\nStrict-Transport-Security: max-age=1\r\nSet-Cookie: a=1\r\n"
        );
        let raw = head.raw.as_ref().expect("kept as read");
        assert!(raw.has_date && raw.has_hsts);
        assert_eq!(
            framing(&head, false).expect("framed"),
            (Framing::Length(5), true)
        );
        let plain = raw_head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let raw = plain.raw.as_ref().expect("kept as read");
        assert!(!raw.has_date && !raw.has_hsts);
        assert_eq!(kept_lines(&plain).as_deref(), Some(""));
    }

    #[test]
    fn heads_that_need_the_maps_work_get_a_map() {
        for text in [
            // Fields that `remove_hop_by_hop` or the trailer handling read in the map.
            "HTTP/1.1 200 OK\r\nConnection: close, x-trace\r\nX-Trace: 1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n",
            // A kept line in another form than the proxy writes.
            "HTTP/1.1 200 OK\r\nX-Tight:1\r\nContent-Length: 0\r\n\r\n",
            // No body, whose length passes on as sent.
            "HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
        ] {
            let head = raw_head(text);
            assert!(head.raw.is_none(), "{text:?}");
            assert!(
                !head.notes.has_date,
                "a scan that gave up leaves nothing noted"
            );
            assert!(!head.headers.is_empty(), "{text:?}");
        }
        // A Connection naming a field noted by a scan that gave up is noted once, by the map.
        let head = raw_head(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive, x-trace\r\nContent-Length: 1\r\n\r\n",
        );
        assert_eq!(
            framing(&head, false).expect("framed"),
            (Framing::Length(1), true)
        );
    }

    #[test]
    fn fields_kept_as_read_frame_a_body_as_the_map_does() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 10, 10\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 11\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (raw, map) = (raw_head(text), head(text));
            assert!(raw.raw.is_some(), "{text:?}");
            assert_eq!(
                format!("{:?}", framing(&raw, false)),
                format!("{:?}", framing(&map, false)),
                "{text:?}"
            );
            // Neither kept form passes the framing fields on.
            let lines = kept_lines(&raw).expect("kept as read").to_ascii_lowercase();
            assert!(!lines.contains("content-length") && !lines.contains("transfer-encoding"));
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let framed = |text: &str, head_request: bool| framing(&head(text), head_request);
        let ok = |text: &str| framed(text, false).expect("framed");
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
            (Framing::Length(10), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 10, 10\r\n\r\n"),
            (Framing::Length(10), true)
        );
        assert!(framed("HTTP/1.1 200 OK\r\nContent-Length: 10, 11\r\n\r\n", false).is_err());
        assert!(framed("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).is_err());
        // No body for HEAD, 204 and 304, whatever the fields say.
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true).expect("valid"),
            (Framing::Done, true)
        );
        assert_eq!(
            ok("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
            (Framing::Done, true)
        );
        // Chunked wins over Content-Length, and then the connection is not reused.
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n"),
            (Framing::Chunked(Chunk::SizeLine), false)
        );
        let both =
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert!(
            !both.headers.contains_key(header::CONTENT_LENGTH),
            "the length is not passed on"
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (Framing::Chunked(Chunk::SizeLine), true)
        );
        // A coding other than a final chunked, or no framing at all: until the backend closes.
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), (Framing::UntilClose, false));
        // Keep-alive: HTTP/1.1 unless `close`; HTTP/1.0 only with `keep-alive`.
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n"),
            (Framing::Length(1), true)
        );
    }

    #[test]
    fn chunked_bodies_are_decoded_with_their_trailers_and_bad_ones_refused() {
        let mut buffer =
            BytesMut::from("5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\nNEXT");
        let mut chunk = Chunk::SizeLine;
        let mut body = Vec::new();
        let trailers = loop {
            match step_chunked(chunk, &mut buffer).expect("valid") {
                Step::Data(data, next) => {
                    body.extend_from_slice(&data);
                    chunk = next;
                }
                Step::Next(next) => chunk = next,
                Step::End(trailers) => break trailers,
                Step::NeedMore => panic!("all of it is there"),
            }
        };
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-sum"], "42");
        assert_eq!(&buffer[..], b"NEXT", "nothing past the body is taken");

        let mut partial = BytesMut::from("5\r\nhel");
        assert!(matches!(
            step_chunked(Chunk::SizeLine, &mut partial),
            Ok(Step::Next(Chunk::Data(5)))
        ));
        assert!(matches!(
            step_chunked(Chunk::Data(5), &mut partial),
            Ok(Step::Data(_, Chunk::Data(2)))
        ));
        assert!(matches!(
            step_chunked(Chunk::Data(2), &mut partial),
            Ok(Step::NeedMore)
        ));
        for bad in ["x\r\n", "\r\n", "5 x\r\n", "5\n", "1234567890abcdef0\r\n"] {
            let mut buffer = BytesMut::from(bad);
            assert!(
                step_chunked(Chunk::SizeLine, &mut buffer).is_err(),
                "{bad:?} is refused"
            );
        }
        let mut missing_crlf = BytesMut::from("xy");
        assert!(step_chunked(Chunk::DataEnd, &mut missing_crlf).is_err());
        let mut no_trailers = BytesMut::from("\r\n");
        assert!(matches!(
            step_chunked(Chunk::Trailers, &mut no_trailers),
            Ok(Step::End(None))
        ));
    }

    #[test]
    fn a_request_head_is_written_in_origin_form_with_a_length_where_a_body_is_expected() {
        let request = Request::get("/a/b?c=d")
            .header("host", "app")
            .body(())
            .expect("valid");
        let mut out = Vec::new();
        encode_head(&request, None, &mut out);
        assert_eq!(out, b"GET /a/b?c=d HTTP/1.1\r\nhost: app\r\n\r\n");
        let request = Request::post("/form").body(()).expect("valid");
        out.clear();
        encode_head(&request, None, &mut out);
        assert_eq!(out, b"POST /form HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }

    /// Deferred forwarding fields are written as the map would have them, for every host form.
    #[test]
    fn deferred_fields_are_written_as_the_map_would_carry_them() {
        use crate::headers::{ClientAddress, ForwardingFacts, peer_header};
        let peer: std::net::SocketAddr = "[::1]:4000".parse().expect("an address");
        let client = ClientAddress {
            ip: peer.ip(),
            peer,
            peer_trusted: false,
        };
        let peer_value = peer_header(peer);
        let forwarded_for = crate::headers::forwarded_for(peer);
        let request_id = HeaderValue::from_static("id-7");
        for (host, version) in [
            ("app.example:8080", Version::HTTP_11),
            ("[::1]:8080", Version::HTTP_10),
            ("app.example", Version::HTTP_2),
        ] {
            let host = HeaderValue::from_static(host);
            let deferred = DeferredFields {
                facts: ForwardingFacts {
                    client: &client,
                    peer: &peer_value,
                    forwarded_for: &forwarded_for,
                    host: &host,
                    scheme: "http",
                    version,
                },
                request_id: &request_id,
            };
            let request = Request::get("/")
                .header("host", &host)
                .body(())
                .expect("valid");
            let mut written = Vec::new();
            encode_head(&request, Some(&deferred), &mut written);
            let mut mapped = request.map(|()| ());
            deferred.put_in(mapped.headers_mut());
            let mut from_map = Vec::new();
            encode_head(&mapped, None, &mut from_map);
            assert_eq!(
                String::from_utf8_lossy(&written),
                String::from_utf8_lossy(&from_map)
            );
        }
    }
}
