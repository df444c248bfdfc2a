//! `Vary` (RFC 9111 section 4.1): which request header fields select among a response's stored
//! variants, and the normalised values of those fields that a variant is stored under.

use http::HeaderMap;
use http::header::{HeaderName, VARY};

use crate::cache_control::split_list;

/// Why a response's `Vary` can never match a later request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaryError {
    /// `Vary: *`.
    Star,
    /// A member that is not a field name, or a line that is not text.
    Unreadable,
}

/// The request fields a response varies on, lower-cased, each once, in the order first named.
/// Empty when the response has no `Vary`.
pub fn vary_fields(headers: &HeaderMap) -> Result<Vec<HeaderName>, VaryError> {
    let mut fields: Vec<HeaderName> = Vec::new();
    for line in headers.get_all(VARY) {
        let line = line.to_str().map_err(|_| VaryError::Unreadable)?;
        for member in split_list(line) {
            if member == "*" {
                return Err(VaryError::Star);
            }
            let name =
                HeaderName::from_bytes(member.as_bytes()).map_err(|_| VaryError::Unreadable)?;
            if !fields.contains(&name) {
                fields.push(name);
            }
        }
    }
    Ok(fields)
}

/// The values of `fields` in a request, normalised so that requests with the same meaning match:
/// all lines of a field joined, list members trimmed of whitespace and joined by ", " (RFC 9111
/// section 4.1 allows such normalisation). `None` for a field the request lacks, which matches
/// only another request that lacks it.
pub fn secondary_key(fields: &[HeaderName], request: &HeaderMap) -> Vec<Option<String>> {
    fields
        .iter()
        .map(|field| normalised_value(request, field))
        .collect()
}

/// Whether a request selects the variant stored under `stored` for `fields`.
pub fn variant_matches(
    fields: &[HeaderName],
    stored: &[Option<String>],
    request: &HeaderMap,
) -> bool {
    fields.len() == stored.len()
        && fields
            .iter()
            .zip(stored)
            .all(|(field, stored)| normalised_value(request, field) == *stored)
}

fn normalised_value(request: &HeaderMap, field: &HeaderName) -> Option<String> {
    let mut lines = request.get_all(field).iter().peekable();
    lines.peek()?;
    let mut value = String::new();
    for line in lines {
        // A value that is not text is compared byte for byte, as written.
        let text = String::from_utf8_lossy(line.as_bytes());
        for member in split_list(&text) {
            if !value.is_empty() {
                value.push_str(", ");
            }
            value.push_str(member);
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn fields_are_lower_cased_once_each_and_a_star_never_matches() {
        let fields = vary_fields(&headers(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "ACCEPT-ENCODING"),
        ]))
        .expect("a readable Vary");
        assert_eq!(fields, ["accept-encoding", "accept-language"]);
        assert_eq!(
            vary_fields(&headers(&[("vary", "accept, *")])),
            Err(VaryError::Star)
        );
        assert_eq!(
            vary_fields(&headers(&[("vary", "bad field")])),
            Err(VaryError::Unreadable)
        );
        assert_eq!(vary_fields(&HeaderMap::new()), Ok(vec![]));
    }

    #[test]
    fn values_are_normalised_across_lines_and_whitespace() {
        let fields = [HeaderName::from_static("accept-encoding")];
        let stored = secondary_key(&fields, &headers(&[("accept-encoding", "gzip,  br")]));
        assert!(variant_matches(
            &fields,
            &stored,
            &headers(&[("accept-encoding", "gzip"), ("accept-encoding", " br ")])
        ));
        assert!(!variant_matches(
            &fields,
            &stored,
            &headers(&[("accept-encoding", "br, gzip")])
        ));
        // Absent matches absent only.
        let absent = secondary_key(&fields, &HeaderMap::new());
        assert_eq!(absent, [None]);
        assert!(!variant_matches(
            &fields,
            &absent,
            &headers(&[("accept-encoding", "")])
        ));
        assert!(variant_matches(&fields, &absent, &HeaderMap::new()));
    }
}
