//! Pure HTTP caching decisions for Bouncer's shared cache, with no I/O: whether a response may be
//! stored and for how long it is fresh (RFC 9111), whether a stored response may answer a request
//! as it is, stale, or after revalidation (RFC 9111, RFC 5861), `Vary` variants, validators and
//! conditional requests, range requests answered from a stored body, invalidation by unsafe
//! methods, the cache key, and the `Cache-Status` field (RFC 9211).
//!
//! Times are `SystemTime`s the caller passes in; nothing here reads a clock.

#![forbid(unsafe_code)]

pub mod cache_control;
pub mod invalidate;
pub mod key;
pub mod policy;
pub mod range;
pub mod status;
pub mod validation;
pub mod vary;

pub use cache_control::{MaxStale, RequestDirectives, ResponseDirectives};
pub use key::{KeyInput, KeyPart, KeySpec};
pub use policy::{
    Exchange, Freshness, NotStorable, Reuse, StoreOptions, is_error_status,
    may_serve_stale_on_error, may_store, reuse,
};
pub use range::RangeAnswer;
pub use status::{CacheStatus, Forward};
pub use vary::{VaryError, secondary_key, variant_matches, vary_fields};
