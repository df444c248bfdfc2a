//! `Cache-Control` (RFC 9111 section 5.2): the directives of requests and of responses.
//!
//! The field is a comma-separated list of `name` or `name=value` (a token or a quoted string),
//! across any number of field lines. Names are case-insensitive. When a directive appears twice,
//! the first occurrence counts (section 4.2.1). A `delta-seconds` value too large to represent is
//! 2^31 seconds (section 1.2.2); an invalid `max-age` or `s-maxage` makes the response stale, the
//! safe reading of a value nobody can interpret.

use std::borrow::Cow;
use std::time::Duration;

use http::HeaderMap;
use http::header::{CACHE_CONTROL, PRAGMA};

/// The largest delta-seconds a cache must represent; larger values are taken as this one.
pub const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// One directive as written: its name (original case) and its value, unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive<'a> {
    pub name: &'a str,
    pub value: Option<Cow<'a, str>>,
}

/// The directives of every `Cache-Control` line of `headers`, in order. Lines that are not UTF-8
/// and empty list members are skipped.
pub fn directives(headers: &HeaderMap) -> impl Iterator<Item = Directive<'_>> {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|value| std::str::from_utf8(value.as_bytes()).ok())
        .flat_map(parse_list)
}

/// The directives of one field line.
pub fn parse_list(line: &str) -> impl Iterator<Item = Directive<'_>> {
    split_list(line).filter_map(|member| {
        let (name, value) = match member.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
            None => (member, None),
        };
        (!name.is_empty() && name.bytes().all(is_token_byte)).then_some(Directive { name, value })
    })
}

/// Splits a comma-separated list, leaving commas inside quoted strings alone, and trims each
/// member's surrounding whitespace; empty members are dropped (RFC 9110 section 5.6.1).
pub fn split_list(line: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(line);
    std::iter::from_fn(move || {
        loop {
            let text = rest?;
            let mut quoted = false;
            let mut escaped = false;
            let mut end = None;
            for (index, byte) in text.bytes().enumerate() {
                if escaped {
                    escaped = false;
                } else if quoted && byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    quoted = !quoted;
                } else if byte == b',' && !quoted {
                    end = Some(index);
                    break;
                }
            }
            let member = match end {
                Some(index) => {
                    rest = Some(&text[index + 1..]);
                    &text[..index]
                }
                None => {
                    rest = None;
                    text
                }
            };
            let member = member.trim_matches([' ', '\t']);
            if !member.is_empty() {
                return Some(member);
            }
        }
    })
}

/// A token or a quoted string, with the quotes and escapes removed.
fn unquote(value: &str) -> Cow<'_, str> {
    let Some(inner) = value
        .strip_prefix('"')
        .and_then(|value| value.strip_suffix('"'))
    else {
        return Cow::Borrowed(value);
    };
    if !inner.contains('\\') {
        return Cow::Borrowed(inner);
    }
    let mut unescaped = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                unescaped.push(next);
            }
        } else {
            unescaped.push(c);
        }
    }
    Cow::Owned(unescaped)
}

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// A delta-seconds value: digits only, capped at 2^31; `None` when it is not one.
pub fn delta_seconds(value: &str) -> Option<Duration> {
    if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let seconds = value
        .parse::<u64>()
        .unwrap_or(DELTA_SECONDS_MAX)
        .min(DELTA_SECONDS_MAX);
    Some(Duration::from_secs(seconds))
}

/// What a response's `Cache-Control` says to a shared cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDirectives {
    /// `max-age`; an invalid value reads as zero (stale).
    pub max_age: Option<Duration>,
    /// `s-maxage`, for shared caches only; an invalid value reads as zero.
    pub s_maxage: Option<Duration>,
    pub no_store: bool,
    /// `no-cache`, with or without field names: both are taken as the unqualified form (stored,
    /// but revalidated before every use), as RFC 9111 section 5.2.2.4 notes caches commonly do.
    pub no_cache: bool,
    /// `private`, with or without field names: a shared cache stores neither form.
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub must_understand: bool,
    pub no_transform: bool,
    pub immutable: bool,
    /// RFC 5861 section 3.
    pub stale_while_revalidate: Option<Duration>,
    /// RFC 5861 section 4.
    pub stale_if_error: Option<Duration>,
}

impl ResponseDirectives {
    pub fn parse(headers: &HeaderMap) -> ResponseDirectives {
        let mut parsed = ResponseDirectives::default();
        let mut seen_max_age = false;
        let mut seen_s_maxage = false;
        for directive in directives(headers) {
            let value = directive.value.as_deref();
            let name = directive.name;
            if name.eq_ignore_ascii_case("max-age") {
                if !seen_max_age {
                    seen_max_age = true;
                    parsed.max_age = Some(value.and_then(delta_seconds).unwrap_or_default());
                }
            } else if name.eq_ignore_ascii_case("s-maxage") {
                if !seen_s_maxage {
                    seen_s_maxage = true;
                    parsed.s_maxage = Some(value.and_then(delta_seconds).unwrap_or_default());
                }
            } else if name.eq_ignore_ascii_case("no-store") {
                parsed.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                parsed.no_cache = true;
            } else if name.eq_ignore_ascii_case("private") {
                parsed.private = true;
            } else if name.eq_ignore_ascii_case("public") {
                parsed.public = true;
            } else if name.eq_ignore_ascii_case("must-revalidate") {
                parsed.must_revalidate = true;
            } else if name.eq_ignore_ascii_case("proxy-revalidate") {
                parsed.proxy_revalidate = true;
            } else if name.eq_ignore_ascii_case("must-understand") {
                parsed.must_understand = true;
            } else if name.eq_ignore_ascii_case("no-transform") {
                parsed.no_transform = true;
            } else if name.eq_ignore_ascii_case("immutable") {
                parsed.immutable = true;
            } else if name.eq_ignore_ascii_case("stale-while-revalidate") {
                if parsed.stale_while_revalidate.is_none() {
                    parsed.stale_while_revalidate = value.and_then(delta_seconds);
                }
            } else if name.eq_ignore_ascii_case("stale-if-error") && parsed.stale_if_error.is_none()
            {
                parsed.stale_if_error = value.and_then(delta_seconds);
            }
        }
        parsed
    }

    /// Whether a stale copy may never be used without revalidation (RFC 9111 section 4.2.4):
    /// `must-revalidate`, or for a shared cache `proxy-revalidate` or `s-maxage` (which implies
    /// it, section 5.2.2.10).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some()
    }
}

/// How stale a request accepts a response (`max-stale`, RFC 9111 section 5.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxStale {
    /// `max-stale` without a value: any staleness.
    Any,
    Up(Duration),
}

/// What a request's `Cache-Control` asks of a cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    pub max_age: Option<Duration>,
    pub max_stale: Option<MaxStale>,
    pub min_fresh: Option<Duration>,
    /// `no-cache`, or `Pragma: no-cache` in a request without `Cache-Control`.
    pub no_cache: bool,
    pub no_store: bool,
    pub only_if_cached: bool,
    /// RFC 5861 section 4, in a request.
    pub stale_if_error: Option<Duration>,
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> RequestDirectives {
        let mut parsed = RequestDirectives::default();
        for directive in directives(headers) {
            let value = directive.value.as_deref();
            let name = directive.name;
            if name.eq_ignore_ascii_case("max-age") {
                if parsed.max_age.is_none() {
                    parsed.max_age = value.and_then(delta_seconds);
                }
            } else if name.eq_ignore_ascii_case("max-stale") {
                if parsed.max_stale.is_none() {
                    parsed.max_stale = match value {
                        None => Some(MaxStale::Any),
                        Some(value) => delta_seconds(value).map(MaxStale::Up),
                    };
                }
            } else if name.eq_ignore_ascii_case("min-fresh") {
                if parsed.min_fresh.is_none() {
                    parsed.min_fresh = value.and_then(delta_seconds);
                }
            } else if name.eq_ignore_ascii_case("no-cache") {
                parsed.no_cache = true;
            } else if name.eq_ignore_ascii_case("no-store") {
                parsed.no_store = true;
            } else if name.eq_ignore_ascii_case("only-if-cached") {
                parsed.only_if_cached = true;
            } else if name.eq_ignore_ascii_case("stale-if-error") && parsed.stale_if_error.is_none()
            {
                parsed.stale_if_error = value.and_then(delta_seconds);
            }
        }
        // HTTP/1.0's `Pragma: no-cache` counts when the request has no `Cache-Control`
        // (RFC 7234 section 5.4; RFC 9111 deprecates the field but clients still send it).
        if !headers.contains_key(CACHE_CONTROL)
            && headers
                .get_all(PRAGMA)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(split_list)
                .any(|member| member.eq_ignore_ascii_case("no-cache"))
        {
            parsed.no_cache = true;
        }
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(line: &str) -> Vec<(String, Option<String>)> {
        parse_list(line)
            .map(|directive| {
                (
                    directive.name.to_string(),
                    directive.value.map(Cow::into_owned),
                )
            })
            .collect()
    }

    #[test]
    fn lists_split_outside_quotes_and_values_are_unquoted() {
        assert_eq!(
            names(r#" max-age=60 ,, private="set-cookie, x-a" , no-cache ,x="a\"b""#),
            [
                ("max-age".into(), Some("60".into())),
                ("private".into(), Some("set-cookie, x-a".into())),
                ("no-cache".into(), None),
                ("x".into(), Some("a\"b".into())),
            ]
        );
        assert!(names("").is_empty());
        assert!(names(" , ,").is_empty());
        // A member that is not a token is skipped, the rest kept.
        assert_eq!(names("bad name, public").len(), 1);
    }

    #[test]
    fn delta_seconds_are_digits_capped_at_two_to_the_31() {
        assert_eq!(delta_seconds("0"), Some(Duration::ZERO));
        assert_eq!(delta_seconds("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            delta_seconds("99999999999999999999999"),
            Some(Duration::from_secs(DELTA_SECONDS_MAX))
        );
        for bad in ["", "-1", "1.5", " 1", "0x10", "1s"] {
            assert_eq!(delta_seconds(bad), None, "{bad:?}");
        }
    }
}
