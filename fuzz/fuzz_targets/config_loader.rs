//! Any text given to the config loader yields a config or a list of problems, never a panic, and
//! every problem names a place inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(problems) = bouncer_config::parse(std::path::Path::new("fuzz.toml"), text) {
        assert!(!problems.0.is_empty());
        let lines = text.lines().count() + 1;
        for problem in &problems.0 {
            assert!(problem.line <= lines, "{problem}");
        }
    }
});
