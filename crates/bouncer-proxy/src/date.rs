//! The `Date` field of answers, formatted once a second per thread rather than once per answer.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// An IMF-fixdate (RFC 9110 section 5.6.7) is always this long.
const DATE_LENGTH: usize = 29;

struct CachedDate {
    second: u64,
    text: [u8; DATE_LENGTH],
}

thread_local! {
    static CACHED: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: u64::MAX, text: [b' '; DATE_LENGTH] })
    };
}

/// Appends the current time as an HTTP date.
pub(crate) fn extend(out: &mut bytes::BytesMut) {
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    CACHED.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.second != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == DATE_LENGTH {
                cached.text.copy_from_slice(text.as_bytes());
                cached.second = second;
            } else {
                // Years past 9999 do not fit the cache; they are written as they come.
                out.extend_from_slice(text.as_bytes());
                return;
            }
        }
        out.extend_from_slice(&cached.text);
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_an_http_date_that_parses_back() {
        let mut out = bytes::BytesMut::new();
        super::extend(&mut out);
        let text = String::from_utf8(out.to_vec()).expect("ASCII");
        let parsed = httpdate::parse_http_date(&text).expect("an HTTP date");
        let drift = std::time::SystemTime::now()
            .duration_since(parsed)
            .unwrap_or_default();
        assert!(drift.as_secs() < 5, "{text}");
    }
}
