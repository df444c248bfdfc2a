//! `Cache-Control` lines of arbitrary bytes never panic the parsers; every directive found has a
//! token for a name, list members come out trimmed and non-empty, and parsing is deterministic.
#![no_main]

use bouncer_cache_policy::cache_control::{parse_list, split_list};
use bouncer_cache_policy::{RequestDirectives, ResponseDirectives};
use http::{HeaderMap, HeaderValue, header::CACHE_CONTROL};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|lines: Vec<Vec<u8>>| {
    let mut headers = HeaderMap::new();
    for line in lines.iter().take(8) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(CACHE_CONTROL, value);
        }
        if let Ok(text) = std::str::from_utf8(line) {
            for member in split_list(text) {
                assert!(!member.is_empty());
                assert_eq!(member, member.trim_matches([' ', '\t']));
            }
            for directive in parse_list(text) {
                assert!(!directive.name.is_empty());
                assert!(!directive.name.contains([',', '=', ' ', '"']));
            }
        }
    }
    let response = ResponseDirectives::parse(&headers);
    assert_eq!(response, ResponseDirectives::parse(&headers));
    let request = RequestDirectives::parse(&headers);
    assert_eq!(request, RequestDirectives::parse(&headers));
    // Delta-seconds are capped at 2^31 seconds.
    for value in [response.max_age, response.s_maxage, request.max_age, request.min_fresh]
        .into_iter()
        .flatten()
    {
        assert!(value.as_secs() <= 1 << 31);
    }
});
