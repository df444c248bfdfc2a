//! The path normaliser never panics, its output is normal (normalising again changes nothing),
//! has no dot-segments, and never turns an encoded slash into a real one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    if let Ok(normal) = bouncer_rules::normalise_path(path) {
        assert!(normal.starts_with('/'));
        let again = bouncer_rules::normalise_path(&normal).expect("a normal path normalises");
        assert_eq!(again, normal);
        assert!(!normal.split('/').any(|segment| segment == "." || segment == ".."));
        // Removing a `..` may drop a segment holding %2F, but none is ever decoded into a slash.
        let encoded_slashes = |text: &str| text.to_ascii_uppercase().matches("%2F").count();
        assert!(encoded_slashes(&normal) <= encoded_slashes(path));
        let real_slashes = |text: &str| text.matches('/').count();
        assert!(real_slashes(&normal) <= real_slashes(path).max(1));
    }
});
