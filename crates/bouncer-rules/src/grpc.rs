//! How a proxy's own error answer is put to a gRPC client, which reads the outcome of a call from
//! `grpc-status` rather than from the HTTP status.

/// The gRPC status code for an HTTP error status, as gRPC's own HTTP-to-gRPC mapping gives it
/// (`doc/http-grpc-status-mapping.md` in the gRPC repository).
pub fn grpc_status_for_http(status: u16) -> u8 {
    const INTERNAL: u8 = 13;
    const UNAUTHENTICATED: u8 = 16;
    const PERMISSION_DENIED: u8 = 7;
    const UNIMPLEMENTED: u8 = 12;
    const UNAVAILABLE: u8 = 14;
    const UNKNOWN: u8 = 2;
    match status {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// `grpc-message` text: UTF-8, percent-encoded outside printable ASCII and for `%` itself
/// (gRPC over HTTP/2, "Responses").
pub fn grpc_message(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.trim_end().bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Whether a request is a gRPC call: its content type is `application/grpc`, alone or with a
/// `+format` or parameters after it.
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value.len() >= GRPC.len()
        && value[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_failures_are_unavailable_and_the_rest_follow_grpc_mapping() {
        assert_eq!(grpc_status_for_http(502), 14);
        assert_eq!(grpc_status_for_http(503), 14);
        assert_eq!(grpc_status_for_http(504), 14);
        assert_eq!(grpc_status_for_http(429), 14);
        assert_eq!(grpc_status_for_http(404), 12);
        assert_eq!(grpc_status_for_http(403), 7);
        assert_eq!(grpc_status_for_http(401), 16);
        assert_eq!(grpc_status_for_http(400), 13);
        assert_eq!(grpc_status_for_http(413), 2);
    }

    #[test]
    fn messages_are_percent_encoded_outside_printable_ascii() {
        assert_eq!(grpc_message("backend unavailable\n"), "backend unavailable");
        assert_eq!(grpc_message("100% é"), "100%25 %C3%A9");
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        assert!(is_grpc_content_type(b"application/grpc"));
        assert!(is_grpc_content_type(b"application/grpc+proto"));
        assert!(is_grpc_content_type(b"Application/GRPC;charset=utf-8"));
        assert!(!is_grpc_content_type(b"application/grpc-web"));
        assert!(!is_grpc_content_type(b"application/json"));
    }
}
