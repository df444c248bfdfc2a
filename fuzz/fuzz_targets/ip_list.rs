//! The list-file parser never panics; every block it returns is found by the set built from it,
//! and every line it refuses is reported with a line number that exists.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (blocks, errors) = bouncer_rules::parse_ip_list(text);
    let lines = text.lines().count();
    for error in &errors {
        assert!(error.line >= 1 && error.line <= lines);
    }
    let set = bouncer_rules::IpSet::new(blocks.iter().copied());
    for block in &blocks {
        assert!(set.contains(block.network()));
        assert!(set.contains(block.broadcast()));
    }
    assert!(set.range_count() <= blocks.len());
});
