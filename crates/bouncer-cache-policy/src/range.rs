//! `Range` requests answered from a stored full response (RFC 9110 section 14): one byte range
//! gets `206`, a range past the end `416`, anything else the whole response.

use std::time::SystemTime;

use http::HeaderMap;
use http::header::{ETAG, IF_RANGE, LAST_MODIFIED, RANGE};

use crate::policy::header_date;
use crate::validation::EntityTag;

/// How to answer a GET for a stored response of `length` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable `Range` (none, another unit, several ranges, bad syntax, or an `If-Range` that
    /// does not match): `200` with the whole body.
    Full,
    /// `206` with bytes `first..=last`.
    Partial { first: u64, last: u64 },
    /// `416`: no byte of the range exists.
    Unsatisfiable,
}

impl RangeAnswer {
    /// The `Content-Range` value for a `206` or `416` of a body of `length` bytes.
    pub fn content_range(&self, length: u64) -> Option<String> {
        match self {
            RangeAnswer::Full => None,
            RangeAnswer::Partial { first, last } => Some(format!("bytes {first}-{last}/{length}")),
            RangeAnswer::Unsatisfiable => Some(format!("bytes */{length}")),
        }
    }
}

/// Evaluates a request's `Range` (and `If-Range`) against a stored response with `stored`
/// headers and a body of `length` bytes.
pub fn evaluate(request: &HeaderMap, stored: &HeaderMap, length: u64) -> RangeAnswer {
    let mut ranges = request.get_all(RANGE).iter();
    let (Some(range), None) = (ranges.next(), ranges.next()) else {
        return RangeAnswer::Full;
    };
    let Ok(range) = range.to_str() else {
        return RangeAnswer::Full;
    };
    if request.contains_key(IF_RANGE) && !if_range_matches(request, stored) {
        return RangeAnswer::Full;
    }
    parse_single_range(range, length)
}

/// One `bytes=first-last`, `bytes=first-` or `bytes=-suffix` range over `length` bytes.
pub fn parse_single_range(range: &str, length: u64) -> RangeAnswer {
    let Some((unit, set)) = range.split_once('=') else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeAnswer::Full;
    }
    let set = set.trim();
    // Several ranges would need a multipart answer; the whole body is a valid answer instead.
    if set.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = set.split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // The last `suffix` bytes.
        let Some(suffix) = number(last) else {
            return RangeAnswer::Full;
        };
        if suffix == 0 || length == 0 {
            return RangeAnswer::Unsatisfiable;
        }
        return RangeAnswer::Partial {
            first: length.saturating_sub(suffix),
            last: length - 1,
        };
    }
    let Some(first) = number(first) else {
        return RangeAnswer::Full;
    };
    let last = if last.is_empty() {
        None
    } else {
        match number(last) {
            Some(last) if last >= first => Some(last),
            // An invalid range is ignored rather than refused (section 14.2).
            _ => return RangeAnswer::Full,
        }
    };
    if first >= length {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Partial {
        first,
        last: last.map_or(length - 1, |last| last.min(length - 1)),
    }
}

/// `If-Range` (RFC 9110 section 13.1.5): a strong entity tag equal to the stored one, or a date
/// equal to the stored `Last-Modified`.
fn if_range_matches(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(IF_RANGE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    if let Some(tag) = EntityTag::parse(condition) {
        return stored
            .get(ETAG)
            .and_then(|value| value.to_str().ok())
            .and_then(EntityTag::parse)
            .is_some_and(|stored| stored.strong_eq(&tag));
    }
    let asked: Option<SystemTime> = httpdate::parse_http_date(condition.trim()).ok();
    asked.is_some() && asked == header_date(stored, LAST_MODIFIED)
}
