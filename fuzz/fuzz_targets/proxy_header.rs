//! The PROXY protocol parser never panics, and a header it accepts lies within the bytes given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(header) = bouncer_rules::parse_proxy_header(bytes) {
        assert!(header.length <= bytes.len());
        assert!(header.length <= bouncer_rules::proxy_protocol::MAX_HEADER_BYTES);
    }
});
