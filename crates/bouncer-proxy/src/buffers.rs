//! A small per-thread stash of I/O buffers, as HAProxy's buffer pools and nginx's per-request
//! pools have.
//!
//! An idle keep-alive connection holds no buffer (so that 10,000 of them cost little memory), and
//! takes one when its next request arrives. Under steady traffic that is a release and a take per
//! request; the stash makes both a push and a pop on a thread-local list rather than a round trip
//! through the allocator, whose path for blocks of this size is its slow one.

use std::cell::RefCell;

use bytes::BytesMut;

/// The size of a stashed buffer: most request heads fit in one (browsers send 500 to 1,500 bytes
/// without large cookies), and so does a small answer's head with a body up to about 1.5 KiB.
pub(crate) const BUFFER_SIZE: usize = 2048;

/// Buffers kept per thread at most (256 KiB): enough for the connections that finish a request
/// between two turns of the event loop, bounded however many connections come and go.
const STASH_LIMIT: usize = 128;

thread_local! {
    static STASH: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least `BUFFER_SIZE` bytes.
pub(crate) fn take() -> BytesMut {
    STASH
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_SIZE))
}

/// Gives a buffer back, for another connection to take. Its contents are dropped. Only a buffer
/// that alone owns storage of about the standard size is kept: one that shares its storage (with
/// a request head still alive) or grew for a large answer is let go.
pub(crate) fn give(mut buffer: BytesMut) {
    buffer.clear();
    if buffer.capacity() > 2 * BUFFER_SIZE || !buffer.try_reclaim(BUFFER_SIZE) {
        return;
    }
    STASH.with_borrow_mut(|stash| {
        if stash.len() < STASH_LIMIT {
            stash.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_empty() {
        let mut buffer = take();
        buffer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let storage = buffer.as_ptr();
        give(buffer);
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), storage, "the same storage comes back");
        assert!(again.capacity() >= BUFFER_SIZE);
    }

    #[test]
    fn a_buffer_sharing_its_storage_is_not_kept() {
        let mut buffer = take();
        buffer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buffer.split_to(8).freeze();
        give(buffer);
        assert_eq!(stashed(), 0, "the head still uses the storage");
        drop(head);
    }

    #[test]
    fn a_buffer_grown_for_a_large_answer_is_let_go() {
        let mut buffer = take();
        buffer.reserve(64 * 1024);
        give(buffer);
        assert_eq!(stashed(), 0);
    }

    #[test]
    fn the_stash_is_bounded() {
        let buffers: Vec<BytesMut> = (0..STASH_LIMIT + 10).map(|_| take()).collect();
        for buffer in buffers {
            give(buffer);
        }
        assert_eq!(stashed(), STASH_LIMIT);
    }

    /// Each test runs on a thread of its own, with a stash of its own.
    fn stashed() -> usize {
        STASH.with_borrow(Vec::len)
    }
}
