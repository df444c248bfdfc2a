//! The cache's disk tier: every stored variant is also written to a file of its own, so that the
//! cache survives a restart. A file holds the variant's key, fields and freshness, then its body,
//! with a SHA-256 of each part; a file whose sums do not match is deleted, never served. The index
//! (which file holds which key, how large, how recently used) lives in memory and is rebuilt at
//! start by reading the files' heads; the tier is bounded by bytes, least recently used first.
//!
//! Files are written whole to a temporary name and renamed, so a crash leaves no half file under a
//! real name; temporary files left by one are deleted at the next start.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA256, digest};
use bouncer_cache_policy::{Freshness, ResponseDirectives, variant_matches};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::{Variant, lock};

const MAGIC: &[u8; 14] = b"BOUNCER-CACHE\x01";
/// Magic, head length, head sum, body length, body sum.
const PREAMBLE: usize = 14 + 4 + 32 + 8 + 32;
/// A head larger than this is not one this cache wrote.
const MAX_HEAD: u32 = 1 << 20;
const SUFFIX: &str = "obj";
const TEMPORARY: &str = "tmp";

/// One variant's file, as the index knows it.
#[derive(Clone)]
struct DiskEntry {
    file: PathBuf,
    size: u64,
    vary: Vec<HeaderName>,
    secondary: Vec<Option<String>>,
    host: Arc<str>,
    path: Arc<str>,
    tags: Vec<String>,
    last_used: u64,
}

/// What the disk tier counts.
#[derive(Clone, Default)]
pub struct DiskMetrics {
    pub bytes: Gauge,
    /// Files dropped because their sums did not match (or they could not be read).
    pub corrupt: Counter,
}

pub(crate) struct DiskTier {
    root: PathBuf,
    limit: u64,
    index: Mutex<DiskIndex>,
    /// Orders uses, for least-recently-used eviction.
    clock: AtomicU64,
    metrics: DiskMetrics,
}

#[derive(Default)]
struct DiskIndex {
    entries: HashMap<Arc<str>, Vec<DiskEntry>>,
    total: u64,
}

/// Why the disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the cache directory {path}")]
pub struct DiskError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl DiskTier {
    /// Opens (creating it if needed) the directory and reads the heads of the files in it.
    pub(crate) fn open(
        root: &Path,
        limit: u64,
        metrics: DiskMetrics,
    ) -> Result<DiskTier, DiskError> {
        let error = |source| DiskError {
            path: root.to_path_buf(),
            source,
        };
        fs::create_dir_all(root).map_err(error)?;
        let tier = DiskTier {
            root: root.to_path_buf(),
            limit,
            index: Mutex::new(DiskIndex::default()),
            clock: AtomicU64::new(1),
            metrics,
        };
        let mut found: Vec<(SystemTime, Arc<str>, DiskEntry)> = Vec::new();
        for shard in fs::read_dir(root).map_err(error)? {
            let Ok(shard) = shard else { continue };
            if !shard.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                match path.extension().and_then(|extension| extension.to_str()) {
                    Some(SUFFIX) => {}
                    Some(TEMPORARY) => {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    _ => continue,
                }
                match read_head(&path) {
                    Ok((key, entry)) => {
                        let used = file
                            .metadata()
                            .and_then(|metadata| metadata.modified())
                            .unwrap_or(UNIX_EPOCH);
                        found.push((used, key, entry));
                    }
                    Err(error) => {
                        tracing::warn!(file = %path.display(), %error, "dropping an unreadable cache file");
                        tier.metrics.corrupt.inc();
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        // Oldest first, so that the clock orders them as their files' times do.
        found.sort_by_key(|(used, _, _)| *used);
        {
            let mut index = lock(&tier.index);
            for (_, key, mut entry) in found {
                entry.last_used = tier.clock.fetch_add(1, Ordering::Relaxed);
                index.total += entry.size;
                index.entries.entry(key).or_default().push(entry);
            }
        }
        tier.evict_over_limit();
        tier.metrics
            .bytes
            .set(i64::try_from(lock(&tier.index).total).unwrap_or(i64::MAX));
        Ok(tier)
    }

    /// Objects and bytes indexed now.
    pub(crate) fn usage(&self) -> (usize, u64) {
        let index = lock(&self.index);
        (index.entries.values().map(Vec::len).sum(), index.total)
    }

    /// Whether some variant of `key` is on disk.
    pub(crate) fn contains(&self, key: &str) -> bool {
        lock(&self.index).entries.contains_key(key)
    }

    /// Writes a variant (replacing the file of the same key and `Vary` values). Blocking.
    pub(crate) fn write(
        &self,
        key: &Arc<str>,
        host: &Arc<str>,
        path: &Arc<str>,
        variant: &Variant,
    ) {
        let file = self.new_file_name();
        let encoded = encode(key, host, path, variant);
        let size = encoded.len() as u64;
        let temporary = file.with_extension(TEMPORARY);
        let written = file
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                let mut out = fs::File::create(&temporary)?;
                out.write_all(&encoded)?;
                out.sync_data()
            })
            .and_then(|()| fs::rename(&temporary, &file));
        if let Err(error) = written {
            tracing::warn!(file = %file.display(), %error, "could not write a cache file");
            let _ = fs::remove_file(&temporary);
            return;
        }
        let replaced = {
            let mut index = lock(&self.index);
            let entries = index.entries.entry(Arc::clone(key)).or_default();
            let mut replaced = Vec::new();
            entries.retain(|entry| {
                let same = entry.vary == variant.vary && entry.secondary == variant.secondary;
                if same {
                    replaced.push(entry.clone());
                }
                !same
            });
            entries.push(DiskEntry {
                file,
                size,
                vary: variant.vary.clone(),
                secondary: variant.secondary.clone(),
                host: Arc::clone(host),
                path: Arc::clone(path),
                tags: variant.tags.clone(),
                last_used: self.clock.fetch_add(1, Ordering::Relaxed),
            });
            index.total += size;
            for old in &replaced {
                index.total -= old.size;
            }
            replaced
        };
        for old in replaced {
            let _ = fs::remove_file(&old.file);
        }
        self.evict_over_limit();
    }

    /// Reads the variant of `key` that a request with `headers` selects, with the host and path it
    /// was fetched for, checking its sums; a file that fails them is deleted. Blocking.
    pub(crate) fn read(
        &self,
        key: &str,
        headers: &HeaderMap,
    ) -> Option<(Variant, Arc<str>, Arc<str>)> {
        let (entry, host, path) = {
            let mut index = lock(&self.index);
            let entry = index
                .entries
                .get_mut(key)?
                .iter_mut()
                .rev()
                .find(|entry| variant_matches(&entry.vary, &entry.secondary, headers))?;
            entry.last_used = self.clock.fetch_add(1, Ordering::Relaxed);
            (
                entry.file.clone(),
                Arc::clone(&entry.host),
                Arc::clone(&entry.path),
            )
        };
        match read_file(&entry) {
            Ok(variant) => Some((variant, host, path)),
            Err(error) => {
                tracing::warn!(file = %entry.display(), %error, "dropping a cache file that failed its check");
                self.metrics.corrupt.inc();
                self.forget_file(key, &entry);
                None
            }
        }
    }

    /// Forgets every variant of `key` at once, so that no read finds them any more, and gives
    /// the files to delete (which [`DiskTier::delete_files`] does, blocking).
    pub(crate) fn forget(&self, key: &str) -> Vec<PathBuf> {
        let removed = {
            let mut index = lock(&self.index);
            let removed = index.entries.remove(key).unwrap_or_default();
            for entry in &removed {
                index.total -= entry.size;
            }
            removed
        };
        self.metrics
            .bytes
            .set(i64::try_from(lock(&self.index).total).unwrap_or(i64::MAX));
        removed.into_iter().map(|entry| entry.file).collect()
    }

    /// Deletes files the index has forgotten. Blocking.
    pub(crate) fn delete_files(files: Vec<PathBuf>) {
        for file in files {
            let _ = fs::remove_file(&file);
        }
    }

    /// Deletes every object one of whose variants' host, path and tags match; gives their keys.
    /// Blocking.
    pub(crate) fn remove_if(
        &self,
        matches: impl Fn(&str, &str, &[String]) -> bool,
    ) -> Vec<Arc<str>> {
        let removed = {
            let mut index = lock(&self.index);
            let keys: Vec<Arc<str>> = index
                .entries
                .iter()
                .filter(|(_, entries)| {
                    entries
                        .iter()
                        .any(|entry| matches(&entry.host, &entry.path, &entry.tags))
                })
                .map(|(key, _)| Arc::clone(key))
                .collect();
            let mut removed = Vec::new();
            for key in &keys {
                if let Some(entries) = index.entries.remove(key) {
                    removed.extend(entries);
                }
            }
            for entry in &removed {
                index.total -= entry.size;
            }
            (keys, removed)
        };
        let (keys, removed) = removed;
        self.delete(removed);
        keys
    }

    fn forget_file(&self, key: &str, file: &Path) {
        let removed = {
            let mut index = lock(&self.index);
            let mut removed = Vec::new();
            if let Some(entries) = index.entries.get_mut(key) {
                entries.retain(|entry| {
                    let gone = entry.file == file;
                    if gone {
                        removed.push(entry.clone());
                    }
                    !gone
                });
                if entries.is_empty() {
                    index.entries.remove(key);
                }
            }
            for entry in &removed {
                index.total -= entry.size;
            }
            removed
        };
        self.delete(removed);
    }

    /// Deletes the least recently used files until the tier fits its bound.
    fn evict_over_limit(&self) {
        let removed = {
            let mut index = lock(&self.index);
            let mut removed = Vec::new();
            while index.total > self.limit {
                let oldest = index
                    .entries
                    .iter()
                    .flat_map(|(key, entries)| {
                        entries.iter().map(move |entry| {
                            (entry.last_used, Arc::clone(key), entry.file.clone())
                        })
                    })
                    .min_by_key(|(used, _, _)| *used);
                let Some((_, key, file)) = oldest else {
                    break;
                };
                if let Some(entries) = index.entries.get_mut(&key) {
                    if let Some(position) = entries.iter().position(|entry| entry.file == file) {
                        let entry = entries.remove(position);
                        index.total -= entry.size;
                        removed.push(entry);
                    }
                    if index.entries.get(&key).is_some_and(Vec::is_empty) {
                        index.entries.remove(&key);
                    }
                }
            }
            removed
        };
        self.delete(removed);
    }

    fn delete(&self, removed: Vec<DiskEntry>) {
        for entry in removed {
            let _ = fs::remove_file(&entry.file);
        }
        self.metrics
            .bytes
            .set(i64::try_from(lock(&self.index).total).unwrap_or(i64::MAX));
    }

    fn new_file_name(&self) -> PathBuf {
        let name: u64 = rand::random();
        self.root
            .join(format!("{:02x}", name >> 56))
            .join(format!("{name:016x}.{SUFFIX}"))
    }
}

fn encode(key: &str, host: &str, path: &str, variant: &Variant) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    put_bytes(&mut head, key.as_bytes());
    put_bytes(&mut head, host.as_bytes());
    put_bytes(&mut head, path.as_bytes());
    head.extend_from_slice(&variant.status.as_u16().to_le_bytes());
    let freshness = &variant.freshness;
    for time in [freshness.request_time, freshness.response_time] {
        head.extend_from_slice(&nanos_since_epoch(time).to_le_bytes());
    }
    for duration in [freshness.corrected_initial_age, freshness.lifetime] {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        head.extend_from_slice(&nanos.to_le_bytes());
    }
    head.push(u8::from(freshness.heuristic));
    put_count(&mut head, variant.headers.len());
    for (name, value) in &variant.headers {
        put_bytes(&mut head, name.as_str().as_bytes());
        put_bytes(&mut head, value.as_bytes());
    }
    put_count(&mut head, variant.vary.len());
    for name in &variant.vary {
        put_bytes(&mut head, name.as_str().as_bytes());
    }
    put_count(&mut head, variant.secondary.len());
    for value in &variant.secondary {
        match value {
            Some(value) => {
                head.push(1);
                put_bytes(&mut head, value.as_bytes());
            }
            None => head.push(0),
        }
    }
    put_count(&mut head, variant.tags.len());
    for tag in &variant.tags {
        put_bytes(&mut head, tag.as_bytes());
    }
    let mut file = Vec::with_capacity(PREAMBLE + head.len() + variant.body.len());
    file.extend_from_slice(MAGIC);
    put_count(&mut file, head.len());
    file.extend_from_slice(digest(&SHA256, &head).as_ref());
    file.extend_from_slice(&(variant.body.len() as u64).to_le_bytes());
    file.extend_from_slice(digest(&SHA256, &variant.body).as_ref());
    file.extend_from_slice(&head);
    file.extend_from_slice(&variant.body);
    file
}

fn put_count(out: &mut Vec<u8>, count: usize) {
    out.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_count(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn nanos_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The preamble and head of a file: what the index needs, checked against the head's sum.
fn read_head(file: &Path) -> io::Result<(Arc<str>, DiskEntry)> {
    let mut input = fs::File::open(file)?;
    let size = input.metadata()?.len();
    let mut preamble = [0u8; PREAMBLE];
    input.read_exact(&mut preamble)?;
    let (head_len, head_sum, body_len, _) = parse_preamble(&preamble)?;
    let mut head = vec![0u8; head_len];
    input.read_exact(&mut head)?;
    if digest(&SHA256, &head).as_ref() != head_sum {
        return Err(bad("the head's sum does not match"));
    }
    if size != (PREAMBLE + head_len) as u64 + body_len {
        return Err(bad("the file's length does not match its head"));
    }
    let parsed = Head::parse(&head)?;
    Ok((
        parsed.key.into(),
        DiskEntry {
            file: file.to_path_buf(),
            size,
            vary: parsed.vary,
            secondary: parsed.secondary,
            host: parsed.host.into(),
            path: parsed.path.into(),
            tags: parsed.tags,
            last_used: 0,
        },
    ))
}

/// A whole file as a variant, with both sums checked.
fn read_file(file: &Path) -> io::Result<Variant> {
    let bytes = fs::read(file)?;
    let preamble = bytes.get(..PREAMBLE).ok_or_else(|| bad("too short"))?;
    let (head_len, head_sum, body_len, body_sum) = parse_preamble(preamble)?;
    let head = bytes
        .get(PREAMBLE..PREAMBLE + head_len)
        .ok_or_else(|| bad("the head is cut short"))?;
    if digest(&SHA256, head).as_ref() != head_sum {
        return Err(bad("the head's sum does not match"));
    }
    let body_start = PREAMBLE + head_len;
    let body = bytes.get(body_start..).ok_or_else(|| bad("no body"))?;
    if body.len() as u64 != body_len {
        return Err(bad("the body's length does not match"));
    }
    if digest(&SHA256, body).as_ref() != body_sum {
        return Err(bad("the body's sum does not match"));
    }
    let head = Head::parse(head)?;
    let directives = ResponseDirectives::parse(&head.headers);
    let body = Bytes::from(bytes).slice(body_start..);
    Ok(Variant {
        status: head.status,
        headers: head.headers,
        body,
        freshness: Freshness {
            request_time: head.request_time,
            response_time: head.response_time,
            corrected_initial_age: head.initial_age,
            lifetime: head.lifetime,
            heuristic: head.heuristic,
            directives,
        },
        vary: head.vary,
        secondary: head.secondary,
        tags: head.tags,
        answer_fields: std::sync::OnceLock::new(),
    })
}

fn parse_preamble(preamble: &[u8]) -> io::Result<(usize, [u8; 32], u64, [u8; 32])> {
    let mut cursor = Cursor(preamble);
    if cursor.take(MAGIC.len())? != MAGIC {
        return Err(bad("not a cache file of this version"));
    }
    let head_len = cursor.u32()?;
    if head_len > MAX_HEAD {
        return Err(bad("the head is too large"));
    }
    let head_sum = cursor.array()?;
    let body_len = cursor.u64()?;
    let body_sum = cursor.array()?;
    Ok((head_len as usize, head_sum, body_len, body_sum))
}

/// A file's head, decoded.
struct Head {
    key: String,
    host: String,
    path: String,
    status: StatusCode,
    request_time: SystemTime,
    response_time: SystemTime,
    initial_age: Duration,
    lifetime: Duration,
    heuristic: bool,
    headers: HeaderMap,
    vary: Vec<HeaderName>,
    secondary: Vec<Option<String>>,
    tags: Vec<String>,
}

impl Head {
    fn parse(bytes: &[u8]) -> io::Result<Head> {
        let mut cursor = Cursor(bytes);
        let key = cursor.string()?;
        let host = cursor.string()?;
        let path = cursor.string()?;
        let status = StatusCode::from_u16(cursor.u16()?).map_err(|_| bad("a bad status"))?;
        let request_time = UNIX_EPOCH + Duration::from_nanos(cursor.u64()?);
        let response_time = UNIX_EPOCH + Duration::from_nanos(cursor.u64()?);
        let initial_age = Duration::from_nanos(cursor.u64()?);
        let lifetime = Duration::from_nanos(cursor.u64()?);
        let heuristic = cursor.take(1)?[0] != 0;
        let mut headers = HeaderMap::new();
        for _ in 0..cursor.u32()? {
            let name = HeaderName::from_bytes(cursor.bytes()?).map_err(|_| bad("a bad name"))?;
            let value = HeaderValue::from_bytes(cursor.bytes()?).map_err(|_| bad("a bad value"))?;
            headers.append(name, value);
        }
        let mut vary = Vec::new();
        for _ in 0..cursor.u32()? {
            vary.push(HeaderName::from_bytes(cursor.bytes()?).map_err(|_| bad("a bad name"))?);
        }
        let mut secondary = Vec::new();
        for _ in 0..cursor.u32()? {
            secondary.push(match cursor.take(1)?[0] {
                0 => None,
                _ => Some(cursor.string()?),
            });
        }
        let mut tags = Vec::new();
        for _ in 0..cursor.u32()? {
            tags.push(cursor.string()?);
        }
        if vary.len() != secondary.len() {
            return Err(bad("Vary fields and values disagree"));
        }
        Ok(Head {
            key,
            host,
            path,
            status,
            request_time,
            response_time,
            initial_age,
            lifetime,
            heuristic,
            headers,
            vary,
            secondary,
            tags,
        })
    }
}

/// Reads little-endian numbers and length-prefixed strings, never past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < count {
            return Err(bad("cut short"));
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant() -> Variant {
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
        headers.append("x-many", HeaderValue::from_static("a"));
        headers.append("x-many", HeaderValue::from_static("b"));
        let now = SystemTime::now();
        Variant {
            status: StatusCode::OK,
            freshness: Freshness::new(StatusCode::OK, &headers, now, now, None),
            headers,
            body: Bytes::from_static(b"the body"),
            vary: vec![HeaderName::from_static("accept-language")],
            secondary: vec![Some("fr".into())],
            tags: vec!["red".into()],
            answer_fields: std::sync::OnceLock::new(),
        }
    }

    #[test]
    fn a_variant_comes_back_as_it_was_written() {
        let dir = std::env::temp_dir().join(format!("bouncer-disk-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let tier = DiskTier::open(&dir, 1 << 20, DiskMetrics::default()).expect("open");
        let key: Arc<str> = "GET\nhost\n/a\n".into();
        tier.write(&key, &"host".into(), &"/a".into(), &variant());
        let mut request = HeaderMap::new();
        request.insert("accept-language", HeaderValue::from_static("fr"));
        let (read, host, _) = tier.read(&key, &request).expect("found");
        assert_eq!(&*host, "host");
        let written = variant();
        assert_eq!(read.body, written.body);
        assert_eq!(read.headers.get_all("x-many").iter().count(), 2);
        assert_eq!(read.freshness.lifetime, written.freshness.lifetime);
        assert_eq!(read.tags, written.tags);
        // Another instance of the tier finds it by reading the heads.
        let reopened = DiskTier::open(&dir, 1 << 20, DiskMetrics::default()).expect("open");
        assert!(reopened.contains(&key));
        assert_eq!(reopened.usage().0, 1);
        // A file cut short or altered is never served, and is deleted.
        let file = lock(&reopened.index).entries[&key][0].file.clone();
        let mut bytes = fs::read(&file).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&file, &bytes).expect("write");
        assert!(reopened.read(&key, &request).is_none());
        assert!(!file.exists());
        assert_eq!(reopened.metrics.corrupt.get(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tier_keeps_within_its_bound_dropping_the_least_recently_used() {
        let dir = std::env::temp_dir().join(format!("bouncer-disk-bound-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let size = encode("k0", "h", "/", &variant()).len() as u64;
        let tier = DiskTier::open(&dir, size * 3, DiskMetrics::default()).expect("open");
        let mut request = HeaderMap::new();
        request.insert("accept-language", HeaderValue::from_static("fr"));
        for number in 0..3 {
            let key: Arc<str> = format!("k{number}").into();
            tier.write(&key, &"h".into(), &"/".into(), &variant());
        }
        // k0 is used, so k1 is the least recently used when k3 arrives.
        assert!(tier.read("k0", &request).is_some());
        tier.write(&"k3".into(), &"h".into(), &"/".into(), &variant());
        assert!(tier.contains("k0"));
        assert!(!tier.contains("k1"));
        assert!(tier.usage().1 <= size * 3);
        let _ = fs::remove_dir_all(&dir);
    }
}
