//! The `Cache-Status` response field (RFC 9211): what the cache did with a request.

use std::fmt::Write;

/// Why a request went to the backend (RFC 9211 section 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The cache bypassed itself (a method or route it does not cache, for instance).
    Bypass,
    /// Nothing stored under this key.
    UriMiss,
    /// Stored, but no variant matches the request's `Vary` fields.
    VaryMiss,
    /// Not stored, for a reason other than the two above.
    Miss,
    /// Stored but stale: revalidated or refetched.
    Stale,
    /// The request asked for it (`no-cache`, `max-age`...).
    Request,
}

impl Forward {
    pub fn token(self) -> &'static str {
        match self {
            Forward::Bypass => "bypass",
            Forward::UriMiss => "uri-miss",
            Forward::VaryMiss => "vary-miss",
            Forward::Miss => "miss",
            Forward::Stale => "stale",
            Forward::Request => "request",
        }
    }
}

/// One `Cache-Status` member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStatus {
    /// Answered from the cache without going to the backend.
    pub hit: bool,
    pub forward: Option<Forward>,
    /// The backend's status, when the request went forward.
    pub forward_status: Option<u16>,
    /// Seconds of freshness left (negative when stale).
    pub ttl: Option<i64>,
    /// The backend's response was stored.
    pub stored: bool,
    /// The request waited for another request's response to the same key.
    pub collapsed: bool,
    /// Why, in a word (a token) or a short text.
    pub detail: Option<String>,
}

impl CacheStatus {
    /// The field value, with `cache` as the cache's name: `Bouncer; hit; ttl=30`, or
    /// `Bouncer; fwd=uri-miss; fwd-status=200; stored`.
    pub fn to_field_value(&self, cache: &str) -> String {
        let mut value = String::with_capacity(48);
        value.push_str(cache);
        if self.hit {
            value.push_str("; hit");
        }
        if let Some(forward) = self.forward {
            let _ = write!(value, "; fwd={}", forward.token());
        }
        if let Some(status) = self.forward_status {
            let _ = write!(value, "; fwd-status={status}");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(value, "; ttl={ttl}");
        }
        if self.stored {
            value.push_str("; stored");
        }
        if self.collapsed {
            value.push_str("; collapsed");
        }
        if let Some(detail) = &self.detail {
            value.push_str("; detail=");
            if is_token(detail) {
                value.push_str(detail);
            } else {
                value.push('"');
                for c in detail
                    .chars()
                    .filter(|c| c.is_ascii() && !c.is_ascii_control())
                {
                    if c == '"' || c == '\\' {
                        value.push('\\');
                    }
                    value.push(c);
                }
                value.push('"');
            }
        }
        value
    }
}

/// A structured-field token (RFC 8941 section 3.3.4).
fn is_token(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'*')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_list_their_parameters_in_order() {
        let hit = CacheStatus {
            hit: true,
            ttl: Some(30),
            ..CacheStatus::default()
        };
        assert_eq!(hit.to_field_value("Bouncer"), "Bouncer; hit; ttl=30");
        let miss = CacheStatus {
            forward: Some(Forward::UriMiss),
            forward_status: Some(200),
            stored: true,
            collapsed: true,
            detail: Some("a \"quoted\" reason".into()),
            ..CacheStatus::default()
        };
        assert_eq!(
            miss.to_field_value("Bouncer"),
            "Bouncer; fwd=uri-miss; fwd-status=200; stored; collapsed; detail=\"a \\\"quoted\\\" reason\""
        );
        let stale = CacheStatus {
            forward: Some(Forward::Stale),
            ttl: Some(-5),
            detail: Some("private".into()),
            ..CacheStatus::default()
        };
        assert_eq!(
            stale.to_field_value("Bouncer"),
            "Bouncer; fwd=stale; ttl=-5; detail=private"
        );
    }
}
