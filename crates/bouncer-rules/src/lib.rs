//! Pure request decisions for Bouncer. Nothing here does I/O or reads the clock: time, when it
//! matters, is passed in, so that every decision can be tested and fuzzed exactly.

pub mod bounded;
pub mod gcra;
pub mod grpc;
pub mod ipset;
pub mod matcher;
pub mod path;
pub mod proxy_protocol;

pub use bounded::BoundedMap;
pub use gcra::{Decision, Gcra};
pub use grpc::{grpc_message, grpc_status_for_http, is_grpc_content_type};
pub use ipset::{IpSet, ListLineError, parse_block, parse_ip_list};
pub use matcher::{RuleError, RuleInput, RuleSet, RuleSpec};
pub use path::{PathError, normalise_path, path_has_prefix};
pub use proxy_protocol::{ProxyHeader, ProxyHeaderError, parse_proxy_header};

/// Whether `text` is an HTTP token (RFC 9110 section 5.6.2): a field name, a parameter name.
pub fn is_token(text: &[u8]) -> bool {
    !text.is_empty()
        && text.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_visible_characters_without_separators() {
        assert!(super::is_token(b"X-Client-Subject"));
        assert!(super::is_token(b"app.example"));
        assert!(!super::is_token(b""));
        assert!(!super::is_token(b"bad header"));
        assert!(!super::is_token(b"a:b"));
        assert!(!super::is_token(b"[::1]"));
    }
}
