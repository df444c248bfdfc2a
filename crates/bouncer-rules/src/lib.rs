//! Pure request decisions for Bouncer. Nothing here does I/O or reads the clock: time, when it
//! matters, is passed in, so that every decision can be tested and fuzzed exactly.

pub mod path;
pub mod proxy_protocol;

pub use path::{PathError, normalise_path, path_has_prefix};
pub use proxy_protocol::{ProxyHeader, ProxyHeaderError, parse_proxy_header};
