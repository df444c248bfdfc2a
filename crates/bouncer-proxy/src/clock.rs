//! One reading of the clock per poll of a connection's task, as nginx reads it once per turn of
//! its event loop. A proxied request asks the time about six times (its start, the pick, the
//! pool's idle check, the backend's response time, the pool's idle mark, its end), nearly all of
//! them in the two polls that receive the request and its answer; each reading is a call into the
//! vDSO, about 20 ns in a tight loop but about 70 ns amid a request's work (measured under load,
//! bench/README.md). Within one poll the work takes microseconds, far below the millisecond
//! resolution the logs show and the timeouts need, so the polls share one reading.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

#[derive(Clone, Copy)]
enum Reading {
    /// Not inside a poll that shares a reading: every call reads the clock.
    Outside,
    /// Inside such a poll, before anything asked the time.
    Due,
    /// Inside such a poll: what was read first.
    Taken(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Outside) };
}

/// The time now: the reading this poll of the task has already taken, if it shares one.
pub fn now() -> Instant {
    READING.with(|reading| match reading.get() {
        Reading::Taken(now) => now,
        Reading::Due => {
            let now = Instant::now();
            reading.set(Reading::Taken(now));
            now
        }
        Reading::Outside => Instant::now(),
    })
}

pin_project_lite::pin_project! {
    /// A future whose every poll shares one reading of the clock among those who ask.
    pub struct OneReadingPerPoll<F> {
        #[pin]
        inner: F,
    }
}

impl<F> OneReadingPerPoll<F> {
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<F: Future> Future for OneReadingPerPoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _scope = Scope::enter();
        self.project().inner.poll(cx)
    }
}

/// Puts the reading state back as it was when dropped, even when the poll panics, so that no
/// stale reading outlives its poll.
struct Scope {
    outer: Reading,
}

impl Scope {
    fn enter() -> Self {
        Self {
            outer: READING.replace(Reading::Due),
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        READING.set(self.outer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_poll_shares_one_reading_and_the_next_poll_takes_a_new_one() {
        let (first, second) = OneReadingPerPoll::new(async {
            let first = now();
            // The real clock moves on (its resolution is a nanosecond), the shared reading not.
            let moved_from = std::time::Instant::now();
            while std::time::Instant::now() == moved_from {}
            assert_eq!(now(), first);
            tokio::task::yield_now().await;
            // A later poll: a fresh reading.
            (first, now())
        })
        .await;
        assert!(second > first);
    }

    #[tokio::test(start_paused = true)]
    async fn outside_a_shared_poll_every_call_reads_the_clock() {
        let before = now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(now() - before, Duration::from_millis(5));
    }

    #[test]
    fn a_panicking_poll_leaves_no_reading_behind() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime for the test");
        runtime.block_on(async {
            let task = tokio::spawn(OneReadingPerPoll::new(async {
                let _ = now();
                panic!("the poll fails after reading the clock");
            }));
            assert!(task.await.is_err());
            let before = now();
            tokio::time::advance(Duration::from_millis(5)).await;
            assert_eq!(now() - before, Duration::from_millis(5));
        });
    }
}
