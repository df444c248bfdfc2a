//! Validators and conditional requests: answering a client's `If-None-Match` or
//! `If-Modified-Since` from a stored response (RFC 9110 section 13, RFC 9111 section 4.3.2),
//! revalidating a stored response with the backend (section 4.3.1), and freshening it with the
//! backend's `304` (sections 3.2 and 4.3.4).

use std::time::SystemTime;

use http::header::{
    self, CONNECTION, CONTENT_LENGTH, DATE, ETAG, HeaderName, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED,
};
use http::{HeaderMap, HeaderValue};

use crate::cache_control::split_list;
use crate::policy::header_date;

/// An entity tag (RFC 9110 section 8.8.3): its opaque part and whether it is weak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityTag<'a> {
    pub weak: bool,
    pub opaque: &'a str,
}

impl<'a> EntityTag<'a> {
    /// `"xyz"` or `W/"xyz"`; `None` for anything else.
    pub fn parse(text: &'a str) -> Option<EntityTag<'a>> {
        let text = text.trim();
        let (weak, quoted) = match text.strip_prefix("W/") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let opaque = quoted.strip_prefix('"')?.strip_suffix('"')?;
        (!opaque.contains('"')).then_some(EntityTag { weak, opaque })
    }

    /// Weak comparison: the opaque parts are equal, whatever their weakness.
    pub fn weak_eq(&self, other: &EntityTag<'_>) -> bool {
        self.opaque == other.opaque
    }

    /// Strong comparison: both strong and equal.
    pub fn strong_eq(&self, other: &EntityTag<'_>) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }
}

/// Whether a GET or HEAD with these headers may be answered `304 Not Modified` from a stored
/// response with `stored` headers, received at `received` (RFC 9110 section 13.2.2:
/// `If-None-Match` first, with weak comparison; otherwise `If-Modified-Since` against
/// `Last-Modified`, or failing that the stored `Date` or arrival time, RFC 9111 section 4.3.2).
pub fn not_modified(request: &HeaderMap, stored: &HeaderMap, received: SystemTime) -> bool {
    if request.contains_key(IF_NONE_MATCH) {
        let stored_tag = stored
            .get(ETAG)
            .and_then(|value| value.to_str().ok())
            .and_then(EntityTag::parse);
        return request
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(split_list)
            .any(|member| {
                member == "*"
                    || stored_tag.is_some_and(|stored_tag| {
                        EntityTag::parse(member).is_some_and(|tag| tag.weak_eq(&stored_tag))
                    })
            });
    }
    let Some(since) = header_date(request, IF_MODIFIED_SINCE) else {
        return false;
    };
    let modified = header_date(stored, LAST_MODIFIED)
        .or_else(|| header_date(stored, DATE))
        .unwrap_or(received);
    modified <= since
}

/// The fields a `304` from the cache carries: those a `200` would have sent that RFC 9110
/// section 15.4.5 names.
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    const KEPT: [HeaderName; 6] = [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        DATE,
        ETAG,
        header::EXPIRES,
        header::VARY,
    ];
    let mut headers = HeaderMap::new();
    for name in KEPT {
        for value in stored.get_all(&name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(last_modified) = stored.get(LAST_MODIFIED) {
        headers.insert(LAST_MODIFIED, last_modified.clone());
    }
    headers
}

/// The conditional fields that revalidate a stored response with the backend (RFC 9111 section
/// 4.3.1): its entity tag in `If-None-Match` and its `Last-Modified` in `If-Modified-Since`.
pub fn revalidation_headers(stored: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut conditions = Vec::new();
    if let Some(etag) = stored.get(ETAG) {
        conditions.push((IF_NONE_MATCH, etag.clone()));
    }
    if let Some(last_modified) = stored.get(LAST_MODIFIED) {
        conditions.push((IF_MODIFIED_SINCE, last_modified.clone()));
    }
    conditions
}

/// Hop-by-hop fields, never stored nor taken from a `304` (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether a field may be stored with a response (RFC 9111 section 3.1): not hop-by-hop and not
/// named by `Connection`.
pub fn is_storable_field(name: &HeaderName, headers: &HeaderMap) -> bool {
    if HOP_BY_HOP.contains(&name.as_str()) {
        return false;
    }
    !headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(split_list)
        .any(|listed| listed.eq_ignore_ascii_case(name.as_str()))
}

/// Freshens stored headers with a backend's `304` (RFC 9111 sections 3.2 and 4.3.4): each field
/// of the `304` replaces the stored field of that name, except `Content-Length` and the fields
/// that are not stored at all. A stored `Age` that the `304` does not restate is dropped: it was
/// the age of the first response, and the validation has just confirmed the stored one.
pub fn freshen(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    if !not_modified.contains_key(header::AGE) {
        stored.remove(header::AGE);
    }
    for name in not_modified.keys() {
        if name == CONTENT_LENGTH || !is_storable_field(name, not_modified) {
            continue;
        }
        stored.remove(name);
        for value in not_modified.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
}

/// Whether a `304` from the backend is about the stored response (RFC 9111 section 4.3.4):
/// the same strong entity tag, or when it has none, the same `Last-Modified`; with no validator
/// at all, it is taken to be about the one that was revalidated.
pub fn selects_stored(not_modified: &HeaderMap, stored: &HeaderMap) -> bool {
    let tag = |headers: &HeaderMap| {
        headers
            .get(ETAG)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    match (tag(not_modified), tag(stored)) {
        (Some(new), Some(old)) => match (EntityTag::parse(&new), EntityTag::parse(&old)) {
            (Some(new), Some(old)) => new.weak_eq(&old),
            _ => false,
        },
        (Some(_), None) => false,
        (None, _) => match (
            header_date(not_modified, LAST_MODIFIED),
            header_date(stored, LAST_MODIFIED),
        ) {
            (Some(new), Some(old)) => new == old,
            (Some(_), None) => false,
            (None, _) => true,
        },
    }
}
