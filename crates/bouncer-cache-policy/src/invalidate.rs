//! Invalidation by unsafe methods (RFC 9111 section 4.4): a successful POST, PUT, DELETE or
//! PATCH makes the stored responses for its target URI, and for its `Location` and
//! `Content-Location` when they have the same origin, unusable.

use http::header::{CONTENT_LOCATION, LOCATION};
use http::{HeaderMap, Method, StatusCode};

/// The paths (with their queries) whose stored responses a response to `method` on
/// `target_path` invalidates, on the same host `host`. Empty for safe methods and for error
/// responses (section 4.4 invalidates only on a non-error status).
pub fn invalidated_paths(
    method: &Method,
    status: StatusCode,
    host: &str,
    target_path: &str,
    response: &HeaderMap,
) -> Vec<String> {
    if method.is_safe() || !(status.is_success() || status.is_redirection()) {
        return Vec::new();
    }
    let mut paths = vec![target_path.to_string()];
    for name in [LOCATION, CONTENT_LOCATION] {
        if let Some(reference) = response.get(name).and_then(|value| value.to_str().ok())
            && let Some(path) = same_origin_path(reference.trim(), host, target_path)
            && !paths.contains(&path)
        {
            paths.push(path);
        }
    }
    paths
}

/// The path of `reference` when it points at `host` (an absolute path, a relative path, or an
/// absolute URI whose authority is `host`); `None` for another origin.
pub fn same_origin_path(reference: &str, host: &str, base_path: &str) -> Option<String> {
    if let Some((scheme, rest)) = reference.split_once("://") {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return None;
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(index) => (&rest[..index], &rest[index..]),
            None => (rest, "/"),
        };
        if !authority.eq_ignore_ascii_case(host) {
            return None;
        }
        return Some(with_slash(path));
    }
    if let Some(rest) = reference.strip_prefix("//") {
        // A network-path reference names an authority of its own.
        let (authority, path) = match rest.find(['/', '?']) {
            Some(index) => (&rest[..index], &rest[index..]),
            None => (rest, "/"),
        };
        return authority
            .eq_ignore_ascii_case(host)
            .then(|| with_slash(path));
    }
    if reference.starts_with('/') {
        return Some(reference.to_string());
    }
    if reference.is_empty() || reference.contains(':') {
        return None;
    }
    // A relative path resolves against the target's directory.
    let directory = base_path
        .rfind('/')
        .map_or("/", |index| &base_path[..=index]);
    Some(format!("{directory}{reference}"))
}

fn with_slash(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    }
}
