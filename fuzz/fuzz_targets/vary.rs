//! `Vary` lines and request fields of arbitrary bytes never panic; the fields found are lower-case
//! and distinct, and a request always selects the variant stored under its own values.
#![no_main]

use arbitrary::Arbitrary;
use bouncer_cache_policy::{secondary_key, variant_matches, vary_fields};
use http::{HeaderMap, HeaderName, HeaderValue, header::VARY};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Case {
    vary: Vec<Vec<u8>>,
    request: Vec<(String, Vec<u8>)>,
    other: Vec<(String, Vec<u8>)>,
}

fn fields(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs.iter().take(16) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

fuzz_target!(|case: Case| {
    let mut response = HeaderMap::new();
    for line in case.vary.iter().take(8) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            response.append(VARY, value);
        }
    }
    let Ok(names) = vary_fields(&response) else {
        return;
    };
    for (index, name) in names.iter().enumerate() {
        assert_eq!(name.as_str(), name.as_str().to_ascii_lowercase());
        assert!(!names[..index].contains(name));
    }
    let request = fields(&case.request);
    let stored = secondary_key(&names, &request);
    assert!(variant_matches(&names, &stored, &request));
    let other = fields(&case.other);
    assert_eq!(
        variant_matches(&names, &stored, &other),
        secondary_key(&names, &other) == stored
    );
});
