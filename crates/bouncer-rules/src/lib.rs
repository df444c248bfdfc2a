//! Pure request decisions for Bouncer. Nothing here does I/O or reads the clock: time, when it
//! matters, is passed in, so that every decision can be tested and fuzzed exactly.

pub mod path;

pub use path::{PathError, normalise_path, path_has_prefix};
