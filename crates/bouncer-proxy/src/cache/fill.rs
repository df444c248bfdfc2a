//! A fill: one backend response for a key, read by a task of its own into memory, from which the
//! request that asked for it and every request that waited on the key are answered as it streams,
//! and which is stored once complete. Because the task reads the backend, a client that goes away
//! neither cuts the fill short nor leaves a truncated entry: a body that breaks off is not stored.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::Notify;

use super::{Cache, Variant, lock};
use crate::body::ResponseBody;
use crate::pipeline::Attempt;

/// Past `max_object_size` a fill keeps at most this much ahead of its one reader.
const OVERFLOW_WINDOW: u64 = 1 << 20;

/// The head of a fill's response.
pub(crate) struct FillHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub vary: Vec<HeaderName>,
    pub secondary: Vec<Option<String>>,
    /// The declared length, when it fits in an object: then waiting requests stream along.
    pub length: Option<u64>,
}

/// How a fill ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    /// Complete and stored (or complete and too large to store).
    Done,
    /// Its response may not be stored: waiting requests go to the backend themselves.
    Passed,
    Failed,
}

pub(crate) struct Fill {
    state: Mutex<FillState>,
    /// The head arrived, or the fill ended.
    changed: Notify,
    /// Its reader took data (past `max_object_size`, the task waits for that).
    drained: Notify,
}

struct FillState {
    head: Option<Arc<FillHead>>,
    outcome: Outcome,
    /// The body so far, from chunk number `base` on.
    chunks: VecDeque<Bytes>,
    base: usize,
    retained: u64,
    received: u64,
    complete: bool,
    /// More than `max_object_size` arrived: nothing is stored, and chunks go once read.
    overflowed: bool,
    readers: usize,
    wakers: Vec<Waker>,
}

/// What a waiting request does once the fill it waited on has moved on.
pub(crate) enum Wait {
    /// Stream the fill's response along with the others.
    Stream(Arc<FillHead>, FillReader),
    /// The fill is done and stored: look the key up again.
    Done,
    /// Go to the backend alone.
    Alone,
}

impl Fill {
    pub(crate) fn new() -> Arc<Fill> {
        Arc::new(Fill {
            state: Mutex::new(FillState {
                head: None,
                outcome: Outcome::Pending,
                chunks: VecDeque::new(),
                base: 0,
                retained: 0,
                received: 0,
                complete: false,
                overflowed: false,
                readers: 0,
                wakers: Vec::new(),
            }),
            changed: Notify::new(),
            drained: Notify::new(),
        })
    }

    /// The response head is here and its body will be filled.
    pub(crate) fn start(&self, head: Arc<FillHead>) {
        lock(&self.state).head = Some(head);
        self.changed.notify_waiters();
    }

    /// The response will not be stored: the waiting requests are released at once.
    pub(crate) fn pass(&self) {
        self.end(Outcome::Passed);
    }

    pub(crate) fn fail(&self) {
        self.end(Outcome::Failed);
    }

    /// Complete (and stored, unless it overflowed).
    pub(crate) fn done(&self) {
        self.end(Outcome::Done);
    }

    fn end(&self, outcome: Outcome) {
        let wakers = {
            let mut state = lock(&self.state);
            if state.outcome == Outcome::Pending {
                state.outcome = outcome;
            }
            if outcome == Outcome::Done {
                state.complete = true;
            }
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
        self.changed.notify_waiters();
        self.drained.notify_waiters();
    }

    /// A reader from the first byte. The leader's reader lets chunks go once read when the body
    /// turns out too large to store.
    pub(crate) fn reader(self: &Arc<Self>, leader: bool) -> FillReader {
        let mut state = lock(&self.state);
        state.readers += 1;
        let length = state.head.as_ref().and_then(|head| head.length);
        FillReader {
            fill: Arc::clone(self),
            next: state.base,
            leader,
            length,
            given: 0,
        }
    }

    /// Waits until this fill can answer a request with `headers` (streaming along when the
    /// response's length is known and it selects the same variant), has been stored, or cannot
    /// help; gives up at `deadline`.
    pub(crate) async fn wait(
        self: &Arc<Self>,
        headers: &HeaderMap,
        deadline: tokio::time::Instant,
    ) -> Wait {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = lock(&self.state);
                match state.outcome {
                    Outcome::Done if !state.overflowed => return Wait::Done,
                    Outcome::Done | Outcome::Passed | Outcome::Failed => return Wait::Alone,
                    Outcome::Pending => {}
                }
                if let Some(head) = &state.head {
                    if !bouncer_cache_policy::variant_matches(&head.vary, &head.secondary, headers)
                    {
                        return Wait::Alone;
                    }
                    if head.length.is_some() && state.base == 0 {
                        let head = Arc::clone(head);
                        drop(state);
                        let reader = self.reader(false);
                        return Wait::Stream(head, reader);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Wait::Alone;
            }
        }
    }

    /// Adds a chunk; tells whether the body is still within `max_object_size`.
    fn push(&self, chunk: Bytes, max_object_size: u64) -> bool {
        let wakers = {
            let mut state = lock(&self.state);
            state.received += chunk.len() as u64;
            state.retained += chunk.len() as u64;
            if state.received > max_object_size {
                state.overflowed = true;
            }
            state.chunks.push_back(chunk);
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
        !lock(&self.state).overflowed
    }

    /// The whole body, once complete and within bounds.
    fn body(&self) -> Option<Bytes> {
        let state = lock(&self.state);
        if state.overflowed || state.base != 0 {
            return None;
        }
        if state.chunks.len() == 1 {
            return state.chunks.front().cloned();
        }
        let mut body = BytesMut::with_capacity(usize::try_from(state.received).unwrap_or(0));
        for chunk in &state.chunks {
            body.extend_from_slice(chunk);
        }
        Some(body.freeze())
    }
}

/// What a fill's task stores once the body is complete.
pub(crate) struct StoreJob {
    pub cache: Arc<Cache>,
    pub key: Arc<str>,
    pub host: Arc<str>,
    pub path: Arc<str>,
    pub head: Arc<FillHead>,
    pub freshness: bouncer_cache_policy::Freshness,
    pub tags: Vec<String>,
    pub metrics: crate::metrics::StoreMetrics,
}

/// Reads a backend body into `fill`, then stores it. Holds the request's slot at its backend
/// until the body is read.
pub(crate) async fn pump(fill: Arc<Fill>, body: ResponseBody, job: StoreJob, attempt: Attempt) {
    let max_object_size = job.cache.max_object_size;
    let mut body = std::pin::pin!(body);
    loop {
        // Past the size bound only the leader reads: keep within a window ahead of it, and stop
        // when it is gone, since nothing will be stored.
        loop {
            let drained = fill.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let state = lock(&fill.state);
                if !state.overflowed {
                    break;
                }
                if state.readers == 0 || state.outcome != Outcome::Pending {
                    drop(state);
                    fill.fail();
                    job.cache.remove_fill(&job.key, &fill);
                    return;
                }
                if state.retained <= OVERFLOW_WINDOW {
                    break;
                }
            }
            drained.await;
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                    && !fill.push(data, max_object_size)
                {
                    // Too large to store after all: the waiting requests go on their own.
                    job.cache.remove_fill(&job.key, &fill);
                    fill.changed.notify_waiters();
                }
            }
            Some(Err(error)) => {
                tracing::debug!(key = %job.key, %error, "a cache fill broke off; nothing is stored");
                fill.fail();
                job.cache.remove_fill(&job.key, &fill);
                return;
            }
            None => break,
        }
    }
    drop(attempt);
    if let Some(body) = fill.body() {
        let head = &job.head;
        job.cache.store(
            &job.key,
            &job.host,
            &job.path,
            Variant {
                status: head.status,
                headers: head.headers.clone(),
                body,
                freshness: job.freshness,
                vary: head.vary.clone(),
                secondary: head.secondary.clone(),
                tags: job.tags,
                answer_fields: std::sync::OnceLock::new(),
            },
            &job.metrics,
        );
    }
    fill.done();
    job.cache.remove_fill(&job.key, &fill);
}

/// A response body read from a fill.
pub(crate) struct FillReader {
    fill: Arc<Fill>,
    /// The number of the next chunk to give.
    next: usize,
    leader: bool,
    length: Option<u64>,
    /// Body bytes given so far: the size hint is what remains.
    given: u64,
}

/// The backend's body broke off while a fill was being read.
#[derive(Debug, thiserror::Error)]
#[error("the backend's response body broke off")]
pub struct FillBroken;

impl Body for FillReader {
    type Data = Bytes;
    type Error = FillBroken;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FillBroken>>> {
        let this = &mut *self;
        let mut state = lock(&this.fill.state);
        if this.next < state.base {
            // Chunks this reader had not read were let go: only the leader reads an overflow.
            return Poll::Ready(Some(Err(FillBroken)));
        }
        if let Some(chunk) = state.chunks.get(this.next - state.base).cloned() {
            this.next += 1;
            this.given += chunk.len() as u64;
            if state.overflowed && this.leader {
                while state.base < this.next {
                    if let Some(gone) = state.chunks.pop_front() {
                        state.retained -= gone.len() as u64;
                    }
                    state.base += 1;
                }
                drop(state);
                this.fill.drained.notify_waiters();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match state.outcome {
            Outcome::Failed => Poll::Ready(Some(Err(FillBroken))),
            _ if state.complete => Poll::Ready(None),
            _ => {
                if !state.wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.fill.state);
        state.complete && self.next >= state.base + state.chunks.len()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(length) => SizeHint::with_exact(length.saturating_sub(self.given)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for FillReader {
    fn drop(&mut self) {
        lock(&self.fill.state).readers -= 1;
        self.fill.drained.notify_waiters();
    }
}

impl Cache {
    /// The fill in progress for `key`, or a new one that the caller leads.
    pub(crate) fn join_or_lead(&self, key: &Arc<str>) -> (Arc<Fill>, bool) {
        let mut fills = lock(&self.fills);
        if let Some(fill) = fills.get(key) {
            return (Arc::clone(fill), false);
        }
        let fill = Fill::new();
        fills.insert(Arc::clone(key), Arc::clone(&fill));
        (fill, true)
    }

    /// Whether a fill for `key` is in progress.
    pub(crate) fn filling(&self, key: &Arc<str>) -> bool {
        lock(&self.fills).contains_key(key)
    }

    /// Forgets `fill` as the one for `key` (a later one may have replaced it already).
    pub(crate) fn remove_fill(&self, key: &Arc<str>, fill: &Arc<Fill>) {
        let mut fills = lock(&self.fills);
        if fills
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, fill))
        {
            fills.remove(key);
        }
    }
}
