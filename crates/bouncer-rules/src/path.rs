//! The one normal form of a request path that routing, rules and cache keys all see.
//!
//! Normalisation follows RFC 3986 section 6.2.2: percent-encoded unreserved characters are decoded,
//! the remaining percent-encodings are upper-cased, and dot-segments are removed (section 5.2.4).
//! An encoded slash (`%2F`) stays encoded, because decoding it would change which segments exist.

use std::borrow::Cow;

/// Why a path cannot be normalised; each is answered with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path has a '%' not followed by two hex digits")]
    InvalidPercentEncoding,
}

/// Returns the normal form of `path` (the part of the target before `?`), borrowing when the path
/// is already normal, which is the common case.
pub fn normalise_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let needs_decoding = path.contains('%');
    let has_dot_segments = has_dot_segment(path);
    if !needs_decoding && !has_dot_segments {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = if needs_decoding {
        Cow::Owned(decode_unreserved(path)?)
    } else {
        Cow::Borrowed(path)
    };
    if has_dot_segment(&decoded) {
        Ok(Cow::Owned(remove_dot_segments(&decoded)))
    } else {
        Ok(decoded)
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|segment| segment == "." || segment == "..")
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte != b'%' {
            // Only ASCII bytes need care; copy the rest of a UTF-8 sequence through unchanged.
            let next = path[index..]
                .char_indices()
                .nth(1)
                .map_or(bytes.len(), |(offset, _)| index + offset);
            out.push_str(&path[index..next]);
            index = next;
            continue;
        }
        let high = bytes.get(index + 1).copied().and_then(hex_value);
        let low = bytes.get(index + 2).copied().and_then(hex_value);
        let (Some(high), Some(low)) = (high, low) else {
            return Err(PathError::InvalidPercentEncoding);
        };
        let decoded = high * 16 + low;
        if is_unreserved(decoded) {
            out.push(char::from(decoded));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(high)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(low)]));
        }
        index += 3;
    }
    Ok(out)
}

/// RFC 3986 section 5.2.4 for an absolute path: `.` segments vanish and `..` removes the segment
/// before it, never climbing above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path.split('/').skip(1).peekable();
    let mut ends_in_directory = false;
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "." => ends_in_directory = last,
            ".." => {
                segments.pop();
                ends_in_directory = last;
            }
            _ => {
                segments.push(segment);
                ends_in_directory = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if ends_in_directory || out.is_empty() {
        out.push('/');
    }
    out
}

/// Whether `path` falls under `prefix` on a segment boundary: `/api` covers `/api` and `/api/x`,
/// not `/apix`. The prefix `/` covers everything.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> String {
        normalise_path(path).expect("valid path").into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for path in ["/", "/a/b", "/a/b/", "/a..b/.c", "/a//b", "/ünï"] {
            assert!(
                matches!(normalise_path(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed_per_rfc_3986_5_2_4() {
        assert_eq!(normal("/a/./b"), "/a/b");
        assert_eq!(normal("/a/../b"), "/b");
        assert_eq!(normal("/a/b/.."), "/a/");
        assert_eq!(normal("/a/b/."), "/a/b/");
        assert_eq!(normal("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(normal("/.."), "/");
        assert_eq!(normal("/."), "/");
        assert_eq!(normal("/a/.../b"), "/a/.../b");
    }

    #[test]
    fn unreserved_characters_are_decoded_and_the_rest_upper_cased() {
        assert_eq!(normal("/%41%62%7e"), "/Ab~");
        assert_eq!(normal("/a%2fb"), "/a%2Fb");
        assert_eq!(normal("/a%2Fb"), "/a%2Fb");
        assert_eq!(normal("/%20x"), "/%20x");
        assert_eq!(normal("/%c3%a9"), "/%C3%A9");
    }

    #[test]
    fn encoded_dots_cannot_smuggle_a_traversal() {
        assert_eq!(normal("/a/%2e%2E/b"), "/b");
        assert_eq!(normal("/static/%2e%2e/admin"), "/admin");
        assert_eq!(normal("/a/..%2Fb"), "/a/..%2Fb");
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(normalise_path("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(normalise_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(normalise_path("/%"), Err(PathError::InvalidPercentEncoding));
        assert_eq!(
            normalise_path("/%4"),
            Err(PathError::InvalidPercentEncoding)
        );
        assert_eq!(
            normalise_path("/%zz"),
            Err(PathError::InvalidPercentEncoding)
        );
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for path in [
            "/a/%2e%2e/b/./c/",
            "/x%2f..%2F/..",
            "/%7e/%2E/",
            "/é/%41/../",
        ] {
            let once = normal(path);
            assert_eq!(normal(&once), once, "{path}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/x", "/api"));
        assert!(!path_has_prefix("/apix", "/api"));
        assert!(!path_has_prefix("/ap", "/api"));
        assert!(path_has_prefix("/anything", "/"));
    }
}
