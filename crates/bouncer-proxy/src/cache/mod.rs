//! The shared HTTP cache: stored responses in memory, bounded by bytes (moka's W-TinyLFU admission
//! and eviction), the fills that turn concurrent misses for one key into one backend request, and
//! purges. The policy (may it be stored, is it fresh, may it be served stale) is in
//! `bouncer-cache-policy`; the request path is in `serve.rs`.

mod disk;
mod fill;
mod serve;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bouncer_cache_policy::{
    Freshness, KeyPart, KeySpec, StoreOptions, secondary_key, variant_matches,
};
use bouncer_config::{CacheConfig, CacheKeyPart, RouteCacheConfig};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;

use crate::metrics::{CacheMetrics, StoreMetrics};

pub use disk::{DiskError, DiskMetrics};
pub use fill::FillBroken;
pub(crate) use fill::FillReader;
pub(crate) use serve::{
    CacheAnswer, CacheBody, CacheRequest, Served, fresh_hit, invalidate_after, purge, serve,
};

/// At most this many variants (by `Vary`) are kept per key; the oldest goes first.
const MAX_VARIANTS: usize = 16;

/// One stored response: one variant of a key.
pub(crate) struct Variant {
    pub status: StatusCode,
    /// The response's fields as stored (hop-by-hop fields removed).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub freshness: Freshness,
    /// The request fields it varies on, and their values in the request that fetched it.
    pub vary: Vec<HeaderName>,
    pub secondary: Vec<Option<String>>,
    /// Its `Surrogate-Key` and `Cache-Tag` names, for purges by tag.
    pub tags: Vec<String>,
    /// The fields of a whole answer from it, made at its first hit; every hit copies them and
    /// fills in the places kept for `Age`, `Cache-Status` and `X-Request-Id`, so that a hit
    /// neither edits nor grows the map. See [`Variant::answer_fields`].
    pub answer_fields: std::sync::OnceLock<HeaderMap>,
}

impl Variant {
    /// The fields of a whole answer from this variant: the stored ones without
    /// `Transfer-Encoding`, with its `Content-Length`, `Accept-Ranges` for a `200`, and places
    /// for the fields each answer sets: `Age`, `Cache-Status` and the proxy's `X-Request-Id`.
    /// Filling a place replaces a value; adding a field to a copied map would grow it.
    pub(crate) fn answer_fields(&self) -> &HeaderMap {
        self.answer_fields.get_or_init(|| {
            // One spare slot beyond the fields added below, so that no insert into a copy
            // finds the map at its load limit.
            let mut fields = HeaderMap::with_capacity(self.headers.len() + 6);
            for (name, value) in &self.headers {
                if !matches!(
                    *name,
                    http::header::TRANSFER_ENCODING
                        | http::header::CONTENT_LENGTH
                        | http::header::ACCEPT_RANGES
                        | http::header::AGE
                ) && *name != serve::CACHE_STATUS
                    && *name != crate::headers::X_REQUEST_ID
                {
                    fields.append(name.clone(), value.clone());
                }
            }
            fields.insert(http::header::AGE, HeaderValue::from_static("0"));
            fields.insert(serve::CACHE_STATUS.clone(), HeaderValue::from_static(""));
            fields.insert(
                crate::headers::X_REQUEST_ID.clone(),
                HeaderValue::from_static(""),
            );
            if self.status == StatusCode::OK {
                fields.insert(
                    http::header::ACCEPT_RANGES,
                    HeaderValue::from_static("bytes"),
                );
            }
            fields.insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from(self.body.len() as u64),
            );
            fields
        })
    }

    /// The bytes it takes: body, fields, and a fixed share for the rest, which includes the
    /// answer fields its first hit makes (they share the values' bytes, not the map's slots).
    fn weight(&self) -> u64 {
        const SLOT: usize = 32;
        let fields: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + SLOT)
            .sum();
        let answer_slots = (self.headers.len() + 6) * SLOT;
        self.body.len() as u64 + fields as u64 + answer_slots as u64 + 256
    }
}

/// `headers` with their values copied into one buffer of their own. Values parsed from a
/// backend's response point into that connection's whole read buffer (8 KiB or more), which a
/// stored entry would otherwise keep alive for a few hundred bytes of fields, past the cache's
/// bound on stored bytes.
pub(crate) fn compact_headers(headers: &HeaderMap) -> HeaderMap {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    let mut buffer = bytes::BytesMut::with_capacity(total);
    for value in headers.values() {
        buffer.extend_from_slice(value.as_bytes());
    }
    let buffer = buffer.freeze();
    let mut compact = HeaderMap::with_capacity(headers.len());
    let mut offset = 0;
    for (name, value) in headers {
        let end = offset + value.len();
        // The bytes were a valid value a moment ago; should the check disagree, the value is
        // kept as it was rather than lost.
        let copied = HeaderValue::from_maybe_shared(buffer.slice(offset..end))
            .map(|mut copied| {
                copied.set_sensitive(value.is_sensitive());
                copied
            })
            .unwrap_or_else(|_| value.clone());
        compact.append(name.clone(), copied);
        offset = end;
    }
    compact
}

/// Everything stored under one key.
pub(crate) struct Object {
    /// The host and normalised path it was fetched for, for purges by URL and prefix.
    host: Arc<str>,
    path: Arc<str>,
    variants: Vec<Arc<Variant>>,
    /// The counters of the route that stored it.
    metrics: StoreMetrics,
}

/// What a key holds for a request.
pub(crate) enum Lookup {
    /// Nothing under the key.
    UriMiss,
    /// Variants, but none for this request's `Vary` fields.
    VaryMiss,
    Found(Arc<Variant>),
}

/// The cache of the whole proxy, shared by every route that caches.
pub struct Cache {
    memory: moka::sync::Cache<Arc<str>, Arc<Object>>,
    /// Keys whose last response could not be stored: requests go straight to the backend for
    /// `pass_ttl` rather than queue behind one another.
    passes: moka::sync::Cache<Arc<str>, ()>,
    /// Backend requests in progress that other requests for the key may wait on.
    fills: Mutex<HashMap<Arc<str>, Arc<fill::Fill>>>,
    max_object_size: u64,
    lock_timeout: Duration,
    purge_allow: Vec<IpNet>,
    /// The second tier, on disk, when configured: every stored variant is written there too.
    disk: Option<Arc<disk::DiskTier>>,
}

impl Cache {
    /// The cache, with its disk tier read back from its directory when it has one.
    pub fn new(config: &CacheConfig, metrics: CacheMetrics) -> Result<Arc<Cache>, DiskError> {
        let disk = config
            .disk
            .as_ref()
            .map(|disk| {
                disk::DiskTier::open(&disk.path, disk.size, metrics.disk.clone()).map(Arc::new)
            })
            .transpose()?;
        let memory = moka::sync::Cache::builder()
            .max_capacity(config.memory)
            .weigher(|_key: &Arc<str>, object: &Arc<Object>| {
                let weight: u64 = object.variants.iter().map(|variant| variant.weight()).sum();
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_key, object: Arc<Object>, cause| {
                let weight: u64 = object.variants.iter().map(|variant| variant.weight()).sum();
                object
                    .metrics
                    .stored_bytes
                    .dec_by(i64::try_from(weight).unwrap_or(i64::MAX));
                if cause == moka::notification::RemovalCause::Size {
                    object.metrics.evictions.inc();
                }
            })
            .support_invalidation_closures()
            .build();
        let passes = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.pass_ttl.max(Duration::from_millis(1)))
            .build();
        Ok(Arc::new(Cache {
            memory,
            passes,
            fills: Mutex::new(HashMap::new()),
            max_object_size: config.max_object_size,
            lock_timeout: config.lock_timeout,
            purge_allow: config.purge_allow.clone(),
            disk,
        }))
    }

    /// The variant of `key` that a request with `headers` selects, read from the disk tier and
    /// put back in memory; `None` without a disk tier or such a file.
    pub(crate) async fn load_from_disk(
        &self,
        key: &Arc<str>,
        headers: &HeaderMap,
        metrics: &StoreMetrics,
    ) -> Option<Arc<Variant>> {
        let disk = Arc::clone(self.disk.as_ref()?);
        if !disk.contains(key) {
            return None;
        }
        let (owned_key, owned_headers) = (Arc::clone(key), headers.clone());
        let (variant, host, path) =
            tokio::task::spawn_blocking(move || disk.read(&owned_key, &owned_headers))
                .await
                .ok()??;
        Some(self.insert_memory(key, &host, &path, variant, metrics))
    }

    /// The stored variant of `key` that a request with `headers` selects.
    pub(crate) fn lookup(&self, key: &str, headers: &HeaderMap) -> Lookup {
        let Some(object) = self.memory.get(key) else {
            return Lookup::UriMiss;
        };
        // The newest variant first: a later store replaces an older one with the same key.
        match object
            .variants
            .iter()
            .rev()
            .find(|variant| variant_matches(&variant.vary, &variant.secondary, headers))
        {
            Some(variant) => Lookup::Found(Arc::clone(variant)),
            None => Lookup::VaryMiss,
        }
    }

    /// Stores `variant` under `key`, replacing the variant for the same `Vary` values, in memory
    /// and (in the background) on disk.
    pub(crate) fn store(
        &self,
        key: &Arc<str>,
        host: &Arc<str>,
        path: &Arc<str>,
        variant: Variant,
        metrics: &StoreMetrics,
    ) {
        let variant = self.insert_memory(key, host, path, variant, metrics);
        if let Some(disk) = &self.disk {
            let disk = Arc::clone(disk);
            let (key, host, path) = (Arc::clone(key), Arc::clone(host), Arc::clone(path));
            tokio::task::spawn_blocking(move || disk.write(&key, &host, &path, &variant));
        }
    }

    fn insert_memory(
        &self,
        key: &Arc<str>,
        host: &Arc<str>,
        path: &Arc<str>,
        variant: Variant,
        metrics: &StoreMetrics,
    ) -> Arc<Variant> {
        let variant = Arc::new(variant);
        let mut variants: Vec<Arc<Variant>> = match self.memory.get(key) {
            Some(object) => object
                .variants
                .iter()
                .filter(|old| !(old.vary == variant.vary && old.secondary == variant.secondary))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if variants.len() >= MAX_VARIANTS {
            variants.remove(0);
        }
        variants.push(Arc::clone(&variant));
        // The replaced object's bytes leave through the eviction listener (cause: replaced).
        let weight: u64 = variants.iter().map(|variant| variant.weight()).sum();
        metrics
            .stored_bytes
            .inc_by(i64::try_from(weight).unwrap_or(i64::MAX));
        self.memory.insert(
            Arc::clone(key),
            Arc::new(Object {
                host: Arc::clone(host),
                path: Arc::clone(path),
                variants,
                metrics: metrics.clone(),
            }),
        );
        self.passes.invalidate(key);
        variant
    }

    /// Forgets everything stored under `key`, in memory and on disk.
    pub(crate) fn remove(&self, key: &str) {
        self.memory.invalidate(key);
        // Forgotten by the index at once, so that no request reads them from disk again; the
        // files are deleted off the request path.
        if let Some(disk) = &self.disk {
            let files = disk.forget(key);
            if !files.is_empty() {
                tokio::task::spawn_blocking(move || disk::DiskTier::delete_files(files));
            }
        }
    }

    /// Forgets every object of `host` whose path starts with `prefix`; `None` as the host matches
    /// every host. Gives how many keys were stored.
    pub(crate) fn purge_prefix(&self, host: Option<&str>, prefix: &str) -> usize {
        let host = host.map(str::to_string);
        let prefix = prefix.to_string();
        let on_disk = self.disk.as_ref().map(|disk| {
            let (host, prefix) = (host.clone(), prefix.clone());
            disk.remove_if(move |object_host, object_path, _| {
                host.as_deref().is_none_or(|host| object_host == host)
                    && object_path.starts_with(prefix.as_str())
            })
        });
        self.purge_if(
            move |object| {
                host.as_deref().is_none_or(|host| &*object.host == host)
                    && object.path.starts_with(prefix.as_str())
            },
            on_disk.unwrap_or_default(),
        )
    }

    /// Forgets every object with a variant tagged `tag`.
    pub(crate) fn purge_tag(&self, tag: &str) -> usize {
        let tag = tag.to_string();
        let on_disk = self.disk.as_ref().map(|disk| {
            let tag = tag.clone();
            disk.remove_if(move |_, _, tags| tags.contains(&tag))
        });
        self.purge_if(
            move |object| {
                object
                    .variants
                    .iter()
                    .any(|variant| variant.tags.contains(&tag))
            },
            on_disk.unwrap_or_default(),
        )
    }

    /// Forgets the objects in memory that match, and counts them with the keys already removed
    /// from disk (each key once).
    fn purge_if(
        &self,
        matches: impl Fn(&Object) -> bool + Send + Sync + 'static,
        on_disk: Vec<Arc<str>>,
    ) -> usize {
        let matches = Arc::new(matches);
        let mut keys: std::collections::HashSet<Arc<str>> = self
            .memory
            .iter()
            .filter(|(_, object)| matches(object))
            .map(|(key, _)| Arc::clone(&*key))
            .collect();
        keys.extend(on_disk);
        let count = keys.len();
        let predicate = Arc::clone(&matches);
        if self
            .memory
            .invalidate_entries_if(move |_, object| predicate(object))
            .is_err()
        {
            // Invalidation closures are enabled when the cache is built, so this does not happen;
            // were it to, the entries are removed one by one instead.
            let keys: Vec<Arc<str>> = self
                .memory
                .iter()
                .filter(|(_, object)| matches(object))
                .map(|(key, _)| Arc::clone(&*key))
                .collect();
            for key in keys {
                self.memory.invalidate(&key);
            }
        }
        self.memory.run_pending_tasks();
        count
    }

    /// Whether `ip` may send `PURGE` requests.
    pub(crate) fn may_purge(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.purge_allow.iter().any(|network| network.contains(&ip))
    }

    fn is_pass(&self, key: &str) -> bool {
        self.passes.contains_key(key)
    }

    fn mark_pass(&self, key: &Arc<str>) {
        self.passes.insert(Arc::clone(key), ());
    }

    /// Entries and bytes stored in memory now (after pending maintenance).
    pub fn usage(&self) -> (u64, u64) {
        self.memory.run_pending_tasks();
        (self.memory.entry_count(), self.memory.weighted_size())
    }

    /// Objects and bytes on disk now, with a disk tier.
    pub fn disk_usage(&self) -> Option<(usize, u64)> {
        self.disk.as_ref().map(|disk| disk.usage())
    }
}

/// A route's use of the cache: how it keys requests and what it lets be stored.
pub struct RouteCache {
    pub(crate) cache: Arc<Cache>,
    pub(crate) spec: KeySpec,
    pub(crate) options: StoreOptions,
    pub(crate) metrics: crate::metrics::RouteCacheMetrics,
}

impl RouteCache {
    /// Forgets the object at one URL (every variant, in memory and on disk) as this route keys
    /// it; returns how many objects were in memory (0 or 1).
    pub(crate) fn purge_url(
        &self,
        host: &str,
        normalised_path: &str,
        query: Option<&str>,
    ) -> usize {
        let key = self.spec.key(&bouncer_cache_policy::KeyInput {
            method: &http::Method::GET,
            host,
            normalised_path,
            query,
        });
        let present = self.cache.memory.contains_key(key.as_str());
        self.cache.remove(&key);
        usize::from(present)
    }

    pub fn new(
        cache: Arc<Cache>,
        config: &RouteCacheConfig,
        metrics: crate::metrics::RouteCacheMetrics,
    ) -> RouteCache {
        RouteCache {
            cache,
            spec: KeySpec {
                parts: config
                    .key
                    .iter()
                    .map(|part| match part {
                        CacheKeyPart::Method => KeyPart::Method,
                        CacheKeyPart::Host => KeyPart::Host,
                        CacheKeyPart::Path => KeyPart::Path,
                        CacheKeyPart::Query => KeyPart::Query,
                    })
                    .collect(),
                ignore_query_params: config.ignore_query_params.clone(),
            },
            options: StoreOptions {
                store_set_cookie: config.store_set_cookie,
                default_ttl: Some(config.default_ttl).filter(|ttl| !ttl.is_zero()),
            },
            metrics,
        }
    }
}

/// The values a variant is stored under for `vary` fields of the request `headers`.
pub(crate) fn variant_key(vary: &[HeaderName], headers: &HeaderMap) -> Vec<Option<String>> {
    secondary_key(vary, headers)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacted_fields_keep_their_values_and_order_in_a_buffer_of_their_own() {
        // Values that point into a large buffer, as a parsed response's do.
        let big = bytes::Bytes::from(format!("{}abc, def", " ".repeat(8192)));
        let mut headers = HeaderMap::new();
        headers.append(
            http::header::CACHE_CONTROL,
            HeaderValue::from_maybe_shared(big.slice(8192..)).expect("value"),
        );
        headers.append(http::header::VARY, HeaderValue::from_static("accept"));
        headers.append(http::header::VARY, HeaderValue::from_static("cookie"));
        let compact = compact_headers(&headers);
        assert_eq!(compact, headers);
        let vary: Vec<_> = compact.get_all(http::header::VARY).iter().collect();
        assert_eq!(vary, ["accept", "cookie"]);
        // The big buffer is no longer needed by the copy: it is uniquely owned again.
        drop(headers);
        assert!(
            big.is_unique(),
            "the stored fields let the response's buffer go"
        );
    }

    #[test]
    fn answer_fields_hold_places_for_what_each_answer_sets_and_have_room_for_it() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        headers.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(http::header::AGE, HeaderValue::from_static("100"));
        headers.insert(
            crate::headers::X_REQUEST_ID.clone(),
            HeaderValue::from_static("old"),
        );
        headers.append("x-many", HeaderValue::from_static("a"));
        headers.append("x-many", HeaderValue::from_static("b"));
        let now = std::time::SystemTime::now();
        let variant = Variant {
            status: StatusCode::OK,
            freshness: Freshness::new(StatusCode::OK, &headers, now, now, None),
            headers,
            body: Bytes::from_static(b"twelve bytes"),
            vary: Vec::new(),
            secondary: Vec::new(),
            tags: Vec::new(),
            answer_fields: std::sync::OnceLock::new(),
        };
        let fields = variant.answer_fields();
        assert!(!fields.contains_key(http::header::TRANSFER_ENCODING));
        assert_eq!(fields[http::header::CONTENT_LENGTH], "12");
        assert_eq!(fields[http::header::ACCEPT_RANGES], "bytes");
        assert_eq!(fields[http::header::AGE], "0");
        assert_eq!(fields[&crate::headers::X_REQUEST_ID], "");
        assert!(fields.contains_key(&serve::CACHE_STATUS));
        let many: Vec<_> = fields.get_all("x-many").iter().collect();
        assert_eq!(many, ["a", "b"]);
        // A copy takes the per-answer values in place: same length, no field added.
        let mut copy = fields.clone();
        for name in [
            http::header::AGE,
            serve::CACHE_STATUS.clone(),
            crate::headers::X_REQUEST_ID.clone(),
        ] {
            copy.insert(name, HeaderValue::from_static("set"));
        }
        assert_eq!(copy.len(), fields.len());
        assert!(copy.capacity() > copy.len(), "a spare slot is kept");
    }

    #[test]
    fn a_plain_hit_is_written_as_the_general_formatter_writes_it() {
        for ttl in [0, 7, 3599, -5, i64::MAX, i64::MIN] {
            let status = bouncer_cache_policy::CacheStatus {
                hit: true,
                ttl: Some(ttl),
                ..Default::default()
            };
            assert_eq!(
                serve::status_value(&status),
                status.to_field_value("Bouncer").as_str()
            );
        }
        let collapsed = bouncer_cache_policy::CacheStatus {
            hit: true,
            ttl: Some(3),
            collapsed: true,
            ..Default::default()
        };
        assert_eq!(
            serve::status_value(&collapsed),
            "Bouncer; hit; ttl=3; collapsed"
        );
    }
}
