//! The walk over the TOML tree that builds a [`Config`] and collects every problem on the way.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use toml_edit::{Document, Value};

use crate::diagnostics::{ConfigProblems, Diagnostics};
use crate::model::*;
use crate::section::{Section, Span, expected};

/// The smallest header buffer hyper accepts; smaller values would make it panic.
const MIN_HEADER_BYTES: u64 = 8192;

pub(crate) fn validate(file: &Path, text: &str) -> Result<Config, ConfigProblems> {
    let mut d = Diagnostics::new(file, text);
    let document = match Document::parse(text) {
        Ok(document) => document,
        Err(error) => {
            d.report(
                error.span(),
                "",
                format!("invalid TOML: {}", error.message()),
            );
            return Err(ConfigProblems(d.into_problems()));
        }
    };
    let mut root = Section::new(document.as_table(), String::new(), Some(0..0));

    let admin = root
        .table(&mut d, "admin")
        .map(|section| read_admin(&mut d, section, file));
    let listeners = read_listeners(&mut d, &mut root, file);
    let upstreams = read_upstreams(&mut d, &mut root, file);
    let routes = read_routes(&mut d, &mut root, &listeners, &upstreams);
    let server = match root.table(&mut d, "server") {
        Some(section) => read_server(&mut d, section, file),
        None => ServerConfig::default(),
    };
    let access_log = match root.table(&mut d, "access_log") {
        Some(section) => read_access_log(&mut d, section, file),
        None => AccessLogConfig::default(),
    };
    let resolver = match root.table(&mut d, "resolver") {
        Some(section) => read_resolver(&mut d, section),
        None => ResolverConfig::default(),
    };
    let protection = match root.table(&mut d, "protection") {
        Some(section) => protection::read_protection(&mut d, section, file),
        None => ProtectionConfig::default(),
    };
    let route_names: Vec<&str> = routes.iter().map(|route| route.name.as_str()).collect();
    let rate_limits = protection::read_rate_limits(&mut d, &mut root, &route_names);
    let rules = protection::read_rules(&mut d, &mut root);
    let cluster = root
        .table(&mut d, "cluster")
        .and_then(|section| read_cluster(&mut d, section));
    let cache = match root.table(&mut d, "cache") {
        Some(section) => read_cache(&mut d, section, file),
        None => CacheConfig::default(),
    };
    check_bind_conflicts(&mut d, &root, admin.as_ref(), &listeners);
    check_redirects(&mut d, &listeners);
    root.finish(&mut d);

    let problems = d.into_problems();
    if !problems.is_empty() {
        return Err(ConfigProblems(problems));
    }
    Ok(Config {
        source: file.to_path_buf(),
        text: text.to_string(),
        admin,
        listeners: listeners
            .into_iter()
            .map(|(listener, _)| listener)
            .collect(),
        routes,
        upstreams,
        server,
        access_log,
        resolver,
        protection,
        rate_limits,
        rules,
        cluster,
        cache,
    })
}

/// `[cache]`: the memory bound, the largest object, and how waiting, pass-through and `PURGE`
/// behave.
fn read_cache(d: &mut Diagnostics, mut section: Section, file: &Path) -> CacheConfig {
    let defaults = CacheConfig::default();
    let memory = section.size(d, "memory", defaults.memory, 1 << 20, 1 << 50);
    let max_object_size = section.size(
        d,
        "max_object_size",
        defaults.max_object_size,
        1,
        u64::from(u32::MAX),
    );
    if max_object_size > memory
        && let Some((_, span)) = section.item("max_object_size")
    {
        d.report(
            span,
            section.key_path("max_object_size"),
            format!("is larger than the cache's memory ({memory} bytes)"),
        );
    }
    let lock_timeout = section.duration(
        d,
        "lock_timeout",
        defaults.lock_timeout,
        Duration::from_millis(1),
    );
    let pass_ttl = section.duration(d, "pass_ttl", defaults.pass_ttl, Duration::ZERO);
    let purge_allow = networks(d, &mut section, "purge_allow");
    let disk = section.table(d, "disk").and_then(|mut disk| {
        let path = match disk.item("path") {
            Some(_) => optional_path(d, &mut disk, "path", file, "must name a directory"),
            None => {
                d.report(
                    disk.span(),
                    disk.key_path("path"),
                    "is required: the directory of the cache's files",
                );
                None
            }
        };
        let size = disk.size(d, "size", 1 << 30, 1 << 20, 1 << 50);
        disk.finish(d);
        Some(DiskCacheConfig { path: path?, size })
    });
    section.finish(d);
    CacheConfig {
        memory,
        max_object_size,
        lock_timeout,
        pass_ttl,
        purge_allow,
        disk,
    }
}

/// A route's `cache = { enabled, default_ttl, key, ignore_query_params, store_set_cookie }`;
/// `None` when it is left out or not enabled.
fn read_route_cache(d: &mut Diagnostics, mut section: Section) -> Option<RouteCacheConfig> {
    let enabled = section.bool(d, "enabled").unwrap_or(true);
    let default_ttl = section.duration(d, "default_ttl", Duration::ZERO, Duration::ZERO);
    let key = match section.strings(d, "key") {
        Some(parts) => parts
            .into_iter()
            .enumerate()
            .filter_map(|(index, (part, span))| {
                let parsed = match part.as_str() {
                    "method" => Some(CacheKeyPart::Method),
                    "host" => Some(CacheKeyPart::Host),
                    "path" => Some(CacheKeyPart::Path),
                    "query" => Some(CacheKeyPart::Query),
                    _ => None,
                };
                if parsed.is_none() {
                    d.report(
                        span,
                        format!("{}[{index}]", section.key_path("key")),
                        format!(
                            "\"{part}\" is not a key part: use \"method\", \"host\", \"path\" or \"query\""
                        ),
                    );
                }
                parsed
            })
            .collect(),
        None => vec![
            CacheKeyPart::Method,
            CacheKeyPart::Host,
            CacheKeyPart::Path,
            CacheKeyPart::Query,
        ],
    };
    let ignore_query_params = section
        .strings(d, "ignore_query_params")
        .unwrap_or_default()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let store_set_cookie = section.bool(d, "store_set_cookie").unwrap_or(false);
    section.finish(d);
    enabled.then_some(RouteCacheConfig {
        default_ttl,
        key,
        ignore_query_params,
        store_set_cookie,
    })
}

/// `[cluster]`: `redis` (required), `key_prefix` and `timeout`.
fn read_cluster(d: &mut Diagnostics, mut section: Section) -> Option<ClusterConfig> {
    let redis = match section.string(d, "redis") {
        Some((url, span)) => match redis_url_problem(&url) {
            None => Some(url),
            Some(problem) => {
                d.report(span, section.key_path("redis"), problem);
                None
            }
        },
        None => {
            d.report(
                section.span(),
                section.key_path("redis"),
                "is required: the Redis server to share state through, such as \"redis://127.0.0.1:6379\"",
            );
            None
        }
    };
    let key_prefix = match section.string(d, "key_prefix") {
        Some((prefix, span)) if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            d.report(
                span,
                section.key_path("key_prefix"),
                "must not contain spaces or control characters",
            );
            String::new()
        }
        Some((prefix, _)) => prefix,
        None => "bouncer:".to_string(),
    };
    let timeout = section.duration(
        d,
        "timeout",
        Duration::from_millis(250),
        Duration::from_millis(1),
    );
    section.finish(d);
    Some(ClusterConfig {
        redis: redis?,
        key_prefix,
        timeout,
    })
}

/// What is wrong with a Redis URL, if anything: the scheme, and a host for a TCP address.
fn redis_url_problem(url: &str) -> Option<String> {
    let example = "such as \"redis://127.0.0.1:6379\" or \"unix:///run/redis.sock\"";
    if url.starts_with("rediss://") || url.starts_with("valkeys://") {
        return Some(format!(
            "\"{url}\": TLS to Redis is not supported; use a plain or unix-socket address, {example}"
        ));
    }
    if let Some(path) = url
        .strip_prefix("unix://")
        .or_else(|| url.strip_prefix("redis+unix://"))
    {
        return (!path.starts_with('/'))
            .then(|| format!("\"{url}\" does not name an absolute socket path, {example}"));
    }
    let Some(rest) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("valkey://"))
    else {
        return Some(format!("\"{url}\" is not a Redis URL, {example}"));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    // "[v6]:port" keeps its colons inside the brackets; otherwise the last colon starts the port.
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, after)) => (host, Some(after.strip_prefix(':').unwrap_or(after))),
            None => ("", None),
        },
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Some(format!("\"{url}\" names no host, {example}"));
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Some(format!("\"{url}\": \"{port}\" is not a port number"));
    }
    let database = rest[authority.len()..]
        .strip_prefix('/')
        .map(|path| path.split('?').next().unwrap_or_default());
    if let Some(database) = database
        && !database.is_empty()
        && database.parse::<u32>().is_err()
    {
        return Some(format!(
            "\"{url}\": the path must be a database number, not \"{database}\""
        ));
    }
    None
}

/// `[resolver]`: `nameservers = ["127.0.0.1:53"]` (port 53 when left out) and a query `timeout`.
fn read_resolver(d: &mut Diagnostics, mut section: Section) -> ResolverConfig {
    let mut nameservers = Vec::new();
    for (index, (text, span)) in section
        .strings(d, "nameservers")
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let parsed = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
        match parsed {
            Ok(address) => nameservers.push(address),
            Err(_) => d.report(
                span,
                format!("{}[{index}]", section.key_path("nameservers")),
                format!(
                    "\"{text}\" is not an IP address with an optional port, such as \"10.0.0.2:53\""
                ),
            ),
        }
    }
    let timeout = section.item("timeout").is_some().then(|| {
        section.duration(
            d,
            "timeout",
            Duration::from_secs(2),
            Duration::from_millis(1),
        )
    });
    section.finish(d);
    ResolverConfig {
        nameservers,
        timeout,
    }
}

fn read_admin(d: &mut Diagnostics, mut section: Section, config_file: &Path) -> AdminConfig {
    let bind =
        socket_address(d, &mut section, "bind").unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9900)));
    let token_file = optional_path(
        d,
        &mut section,
        "token_file",
        config_file,
        "the token file's name cannot be empty",
    );
    if token_file.is_none() && !bind.ip().is_loopback() {
        d.report(
            section.span(),
            section.key_path("bind"),
            format!(
                "the admin API on {bind}, off loopback, needs token_file = \"FILE\" so that only holders of the token can use it"
            ),
        );
    }
    let mut hosts = Vec::new();
    for (host, span) in section.strings(d, "hosts").unwrap_or_default() {
        let lower = host.to_ascii_lowercase();
        if lower.is_empty()
            || !lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']'))
        {
            d.report(
                span,
                section.key_path("hosts"),
                format!("\"{host}\" is not a host name"),
            );
        } else {
            hosts.push(lower);
        }
    }
    section.finish(d);
    AdminConfig {
        bind,
        token_file,
        hosts,
    }
}

fn read_listeners(
    d: &mut Diagnostics,
    root: &mut Section,
    file: &Path,
) -> Vec<(ListenerConfig, Span)> {
    let sections = root.tables(d, "listeners");
    if sections.is_empty() {
        d.report(
            None,
            "listeners",
            "at least one [[listeners]] section is required",
        );
    }
    let mut listeners: Vec<(ListenerConfig, Span)> = Vec::new();
    for mut section in sections {
        let span = section.span();
        let name = match section.string(d, "name") {
            Some((name, name_span)) => {
                if name.is_empty() {
                    d.report(
                        name_span,
                        section.key_path("name"),
                        "a listener name cannot be empty",
                    );
                } else if listeners.iter().any(|(other, _)| other.name == name) {
                    d.report(
                        name_span,
                        section.key_path("name"),
                        format!("another listener is already named \"{name}\""),
                    );
                }
                name
            }
            None => {
                d.report(
                    span.clone(),
                    section.key_path("name"),
                    "every listener needs a name",
                );
                String::new()
            }
        };
        let bind = socket_address(d, &mut section, "bind");
        if bind.is_none() && section.item("bind").is_none() {
            d.report(
                span.clone(),
                section.key_path("bind"),
                "every listener needs a bind address such as \"127.0.0.1:8080\"",
            );
        }
        let trusted_proxies = networks(d, &mut section, "trusted_proxies");
        let proxy_protocol = section.bool(d, "proxy_protocol").unwrap_or(false);
        if proxy_protocol && trusted_proxies.is_empty() {
            d.report(
                span.clone(),
                section.key_path("proxy_protocol"),
                "a PROXY protocol header is only accepted from trusted peers: list them in trusted_proxies",
            );
        }
        let redirect_to_https = section.string(d, "redirect_to_https").map(|(name, _)| name);
        let tls = section.table(d, "tls").map(|mut tls_section| {
            let tls = read_tls(d, &mut tls_section, file);
            tls_section.finish(d);
            tls
        });
        section.finish(d);
        listeners.push((
            ListenerConfig {
                name,
                bind: bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
                trusted_proxies,
                proxy_protocol,
                tls,
                redirect_to_https,
            },
            span,
        ));
    }
    listeners
}

fn read_upstreams(d: &mut Diagnostics, root: &mut Section, file: &Path) -> Vec<UpstreamConfig> {
    let Some(section) = root.table(d, "upstreams") else {
        d.report(
            None,
            "upstreams",
            "at least one [upstreams.NAME] section is required",
        );
        return Vec::new();
    };
    let mut upstreams = Vec::new();
    for (name, item, span) in section.entries() {
        let path = section.key_path(name);
        let Some(table) = item.as_table_like() else {
            d.report(span, path, expected("a table", item));
            continue;
        };
        let mut upstream = Section::new(table, path, span.clone());
        let servers = read_servers(d, &mut upstream);
        let (balance, hash_key) = read_balance(d, &mut upstream);
        let connect_timeout = upstream.duration(
            d,
            "connect_timeout",
            Duration::from_secs(2),
            Duration::from_millis(1),
        );
        let response_timeout = upstream.duration(
            d,
            "response_timeout",
            Duration::from_secs(30),
            Duration::from_millis(1),
        );
        let read_timeout = upstream.duration(
            d,
            "read_timeout",
            Duration::from_secs(30),
            Duration::from_millis(1),
        );
        let pool_max_idle = upstream
            .integer(d, "pool_max_idle", 0, 100_000)
            .unwrap_or(256);
        let pool_idle_timeout = upstream.duration(
            d,
            "pool_idle_timeout",
            Duration::from_secs(60),
            Duration::from_millis(1),
        );
        let retries = upstream.integer(d, "retries", 0, 10).unwrap_or(2);
        let retry_on = read_retry_on(d, &mut upstream);
        let retry_buffer = upstream.size(d, "retry_buffer", 0, 0, 64 << 20);
        let resolve_interval = upstream.duration(
            d,
            "resolve_interval",
            Duration::from_secs(30),
            Duration::from_millis(10),
        );
        let sticky = upstream.table(d, "sticky").and_then(|mut section| {
            let sticky = read_sticky(d, &mut section, file);
            section.finish(d);
            sticky
        });
        let max_connections_per_server = upstream
            .integer(d, "max_connections_per_server", 1, 1_000_000)
            .and_then(|max| u32::try_from(max).ok());
        let queue_timeout =
            upstream.duration(d, "queue_timeout", Duration::from_secs(1), Duration::ZERO);
        let slow_start = upstream.duration(d, "slow_start", Duration::ZERO, Duration::ZERO);
        let tls = upstream.table(d, "tls").map(|mut section| {
            let ca = section
                .string(d, "ca")
                .map(|(name, _)| relative_to(file, &name));
            let server_name = match section.string(d, "server_name") {
                None => None,
                Some((name, _)) if is_host_name(&name) || name.parse::<IpAddr>().is_ok() => {
                    Some(name.to_ascii_lowercase())
                }
                Some((name, span)) => {
                    d.report(
                        span,
                        section.key_path("server_name"),
                        format!("\"{name}\" is neither a host name nor an IP address"),
                    );
                    None
                }
            };
            let client_cert = section.table(d, "client_cert").and_then(|mut entry| {
                let cert = entry.string(d, "cert");
                let key = entry.string(d, "key");
                let files = match (cert, key) {
                    (Some((cert, _)), Some((key, _))) => Some(CertificateFiles {
                        cert: relative_to(file, &cert),
                        key: relative_to(file, &key),
                    }),
                    _ => {
                        d.report(
                            entry.span(),
                            entry.path().to_string(),
                            "client_cert needs both cert = \"FILE\" and key = \"FILE\" (PEM)",
                        );
                        None
                    }
                };
                entry.finish(d);
                files
            });
            section.finish(d);
            UpstreamTlsConfig {
                ca,
                server_name,
                client_cert,
            }
        });
        let protocol = read_protocol(d, &mut upstream, tls.is_some());
        if !slow_start.is_zero() && balance == Balance::ConsistentHash {
            let span = upstream.item("slow_start").map(|(_, span)| span);
            d.report(
                span.flatten(),
                upstream.key_path("slow_start"),
                "slow_start does not work with consistent_hash: a key's backend does not depend on weights",
            );
        }
        let health_check = upstream.table(d, "health_check").map(|mut section| {
            let check = read_health_check(d, &mut section);
            section.finish(d);
            check
        });
        // On unless switched off with max_ejected_percent = 0, as nginx marks a failing server
        // unavailable by default: a dead backend must not cost every request a failed connect.
        let outlier_detection = match upstream.table(d, "outlier_detection") {
            Some(mut section) => {
                let detection = read_outlier_detection(d, &mut section);
                section.finish(d);
                Some(detection)
            }
            None => Some(OutlierDetectionConfig::default()),
        }
        .filter(|detection| detection.max_ejected_percent > 0);
        upstream.finish(d);
        upstreams.push(UpstreamConfig {
            name: name.to_string(),
            servers,
            balance,
            hash_key,
            connect_timeout,
            response_timeout,
            read_timeout,
            pool_max_idle: usize::try_from(pool_max_idle).unwrap_or(256),
            pool_idle_timeout,
            retries: u32::try_from(retries).unwrap_or(2),
            retry_on,
            retry_buffer,
            health_check,
            outlier_detection,
            resolve_interval,
            sticky,
            max_connections_per_server,
            queue_timeout,
            slow_start,
            tls,
            protocol,
        });
    }
    if upstreams.is_empty() {
        d.report(
            section.span(),
            section.path(),
            "at least one [upstreams.NAME] section is required",
        );
    }
    upstreams
}

/// `servers`: each entry a `"host:port"` string (weight 1) or a table `{ addr, weight, backup }`.
fn read_servers(d: &mut Diagnostics, upstream: &mut Section) -> Vec<BackendSpec> {
    let path = upstream.key_path("servers");
    let Some((item, span)) = upstream.item("servers") else {
        d.report(
            upstream.span(),
            path,
            "every upstream needs servers = [\"host:port\", ...]",
        );
        return Vec::new();
    };
    let Some(array) = item.as_array() else {
        d.report(
            span,
            path,
            expected(
                "an array of \"host:port\" strings or { addr = ... } tables",
                item,
            ),
        );
        return Vec::new();
    };
    if array.is_empty() {
        d.report(span.clone(), path.clone(), "servers cannot be empty");
    }
    let mut servers: Vec<BackendSpec> = Vec::with_capacity(array.len());
    for (index, value) in array.iter().enumerate() {
        let entry_path = format!("{path}[{index}]");
        let spec = match value {
            Value::String(text) => parse_server_address(text.value())
                .map(|address| BackendSpec {
                    address,
                    weight: 1,
                    backup: false,
                })
                .map_err(|reason| {
                    (
                        value.span(),
                        entry_path.clone(),
                        format!("\"{}\": {reason}", text.value()),
                    )
                }),
            Value::InlineTable(table) => {
                let mut entry = Section::new(table, entry_path.clone(), value.span());
                let spec = read_server_table(d, &mut entry);
                entry.finish(d);
                match spec {
                    Some(spec) => Ok(spec),
                    None => continue,
                }
            }
            other => Err((
                other.span(),
                entry_path.clone(),
                format!(
                    "expected a \"host:port\" string or a {{ addr = ... }} table, found {}",
                    other.type_name()
                ),
            )),
        };
        match spec {
            Ok(spec) if servers.iter().any(|known| known.address == spec.address) => d.report(
                value.span(),
                entry_path,
                format!("\"{}\" is listed twice", spec.address),
            ),
            Ok(spec) => servers.push(spec),
            Err((span, path, reason)) => d.report(span, path, reason),
        }
    }
    if !servers.is_empty() && servers.iter().all(|server| server.backup) {
        d.report(
            span,
            path,
            "every server is a backup: at least one must be a primary",
        );
    }
    servers
}

fn read_server_table(d: &mut Diagnostics, entry: &mut Section) -> Option<BackendSpec> {
    let weight = entry.integer(d, "weight", 1, 1000).unwrap_or(1);
    let backup = entry.bool(d, "backup").unwrap_or(false);
    let Some((text, span)) = entry.string(d, "addr") else {
        d.report(
            entry.span(),
            entry.key_path("addr"),
            "a server table needs addr = \"host:port\"",
        );
        return None;
    };
    match parse_server_address(&text) {
        Ok(address) => Some(BackendSpec {
            address,
            weight: u32::try_from(weight).unwrap_or(1),
            backup,
        }),
        Err(reason) => {
            d.report(
                span,
                entry.key_path("addr"),
                format!("\"{text}\": {reason}"),
            );
            None
        }
    }
}

/// `[listeners.tls]`. The files are only named here; they are read, and checked, when the proxy
/// loads them (and by `bouncer check`).
fn read_tls(d: &mut Diagnostics, section: &mut Section, config_file: &Path) -> TlsConfig {
    let mut certificates = Vec::new();
    let acme = section.table(d, "acme").and_then(|mut acme| {
        let config = read_acme(d, &mut acme, config_file);
        acme.finish(d);
        config
    });
    let entries = section.tables(d, "certificates");
    if entries.is_empty() && acme.is_none() {
        d.report(
            section.span(),
            section.key_path("certificates"),
            "TLS needs at least one certificate: certificates = [{ cert = \"cert.pem\", key = \"key.pem\" }], or acme = { domains = [...] }",
        );
    }
    for mut entry in entries {
        let cert = entry.string(d, "cert");
        let key = entry.string(d, "key");
        match (cert, key) {
            (Some((cert, _)), Some((key, _))) => certificates.push(CertificateFiles {
                cert: relative_to(config_file, &cert),
                key: relative_to(config_file, &key),
            }),
            _ => d.report(
                entry.span(),
                entry.path().to_string(),
                "a certificate needs both cert = \"FILE\" and key = \"FILE\" (PEM)",
            ),
        }
        entry.finish(d);
    }
    let min_version = match section.string(d, "min_version") {
        None => TlsVersion::V1_2,
        Some((text, _)) if text == "1.2" => TlsVersion::V1_2,
        Some((text, _)) if text == "1.3" => TlsVersion::V1_3,
        Some((text, span)) => {
            d.report(
                span,
                section.key_path("min_version"),
                format!(
                    "\"{text}\" is not a TLS version this proxy offers: use \"1.2\" or \"1.3\""
                ),
            );
            TlsVersion::V1_2
        }
    };
    let alpn = match section.strings(d, "alpn") {
        None => vec!["h2".to_string(), "http/1.1".to_string()],
        Some(entries) => {
            let mut alpn = Vec::new();
            for (index, (protocol, span)) in entries.into_iter().enumerate() {
                if protocol == "h2" || protocol == "http/1.1" {
                    alpn.push(protocol);
                } else {
                    d.report(
                        span,
                        format!("{}[{index}]", section.key_path("alpn")),
                        format!("\"{protocol}\" is not a protocol this proxy serves: use \"h2\" and \"http/1.1\""),
                    );
                }
            }
            alpn
        }
    };
    let handshake_timeout = section.duration(
        d,
        "handshake_timeout",
        Duration::from_secs(10),
        Duration::from_millis(1),
    );
    let strict_sni = section.bool(d, "strict_sni").unwrap_or(false);
    let hsts = match section.string(d, "hsts") {
        None => None,
        Some((value, _))
            if value.starts_with("max-age=")
                && value.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
        {
            Some(value)
        }
        Some((value, span)) => {
            d.report(
                span,
                section.key_path("hsts"),
                format!("\"{value}\" is not a Strict-Transport-Security value: it starts with max-age=SECONDS, such as \"max-age=63072000; includeSubDomains\""),
            );
            None
        }
    };
    let client_auth = section.table(d, "client_auth").and_then(|mut auth| {
        let ca = auth.string(d, "ca").map(|(name, _)| relative_to(config_file, &name));
        let required = auth.bool(d, "required").unwrap_or(true);
        let subject_header = match auth.string(d, "subject_header") {
            None => "x-client-subject".to_string(),
            Some((name, _)) if bouncer_rules::is_token(name.as_bytes()) => name.to_ascii_lowercase(),
            Some((name, span)) => {
                d.report(
                    span,
                    auth.key_path("subject_header"),
                    format!("\"{name}\" is not a header name"),
                );
                "x-client-subject".to_string()
            }
        };
        if ca.is_none() {
            d.report(
                auth.span(),
                auth.key_path("ca"),
                "client_auth needs ca = \"FILE\": the PEM CA that client certificates must chain to",
            );
        }
        auth.finish(d);
        Some(ClientAuthConfig {
            ca: ca?,
            required,
            subject_header,
        })
    });
    TlsConfig {
        certificates,
        min_version,
        alpn,
        handshake_timeout,
        strict_sni,
        hsts,
        client_auth,
        acme,
    }
}

/// `acme = { ... }` of a TLS listener.
fn read_acme(d: &mut Diagnostics, section: &mut Section, config_file: &Path) -> Option<AcmeConfig> {
    let mut domains = Vec::new();
    match section.strings(d, "domains") {
        None => d.report(
            section.span(),
            section.key_path("domains"),
            "acme needs domains = [\"example.com\", ...]: the names the certificate is for",
        ),
        Some(entries) => {
            for (index, (name, span)) in entries.into_iter().enumerate() {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if name.starts_with("*.") {
                    d.report(
                        span,
                        format!("{}[{index}]", section.key_path("domains")),
                        format!("\"{name}\": wildcard names need the dns-01 challenge, which Bouncer does not do"),
                    );
                } else if !is_host_name(&name) || name.parse::<IpAddr>().is_ok() {
                    d.report(
                        span,
                        format!("{}[{index}]", section.key_path("domains")),
                        format!("\"{name}\" is not a DNS name"),
                    );
                } else if !domains.contains(&name) {
                    domains.push(name);
                }
            }
        }
    }
    let contact = match section.item("contact") {
        Some((item, _)) if item.as_str().is_some() => section
            .string(d, "contact")
            .map(|(text, _)| vec![text])
            .unwrap_or_default(),
        Some(_) => section
            .strings(d, "contact")
            .map(|entries| entries.into_iter().map(|(text, _)| text).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    for url in &contact {
        if !url.starts_with("mailto:") {
            d.report(
                section.span(),
                section.key_path("contact"),
                format!("\"{url}\" is not a contact URL: use \"mailto:ops@example.com\""),
            );
        }
    }
    let directory = match section.string(d, "directory") {
        None => LETS_ENCRYPT_DIRECTORY.to_string(),
        Some((url, _)) if url.starts_with("https://") => url,
        Some((url, span)) => {
            d.report(
                span,
                section.key_path("directory"),
                format!("\"{url}\" is not an https:// URL: an ACME directory is served over HTTPS"),
            );
            LETS_ENCRYPT_DIRECTORY.to_string()
        }
    };
    let directory_ca = section
        .string(d, "directory_ca")
        .map(|(name, _)| relative_to(config_file, &name));
    let storage = section.string(d, "storage").map_or_else(
        || relative_to(config_file, "acme"),
        |(name, _)| relative_to(config_file, &name),
    );
    let challenge = match section.string(d, "challenge") {
        None => AcmeChallenge::TlsAlpn01,
        Some((name, _)) if name == "tls-alpn-01" => AcmeChallenge::TlsAlpn01,
        Some((name, _)) if name == "http-01" => AcmeChallenge::Http01,
        Some((name, span)) => {
            d.report(
                span,
                section.key_path("challenge"),
                format!("\"{name}\" is not a challenge Bouncer answers: use \"tls-alpn-01\" or \"http-01\""),
            );
            AcmeChallenge::TlsAlpn01
        }
    };
    if domains.is_empty() {
        return None;
    }
    Some(AcmeConfig {
        domains,
        contact,
        directory,
        directory_ca,
        storage,
        challenge,
    })
}

/// `sticky = { cookie, ttl, secret_file }`; the secret file is read now so that a missing or weak
/// key is reported with the config.
fn read_sticky(
    d: &mut Diagnostics,
    section: &mut Section,
    config_file: &Path,
) -> Option<StickyConfig> {
    let cookie = match section.string(d, "cookie") {
        None => "bouncer_route".to_string(),
        Some((name, _)) if is_cookie_name(&name) => name,
        Some((name, span)) => {
            d.report(
                span,
                section.key_path("cookie"),
                format!("\"{name}\" is not a cookie name: use letters, digits, '-' and '_'"),
            );
            return None;
        }
    };
    let ttl = section
        .item("ttl")
        .is_some()
        .then(|| section.duration(d, "ttl", Duration::from_secs(3600), Duration::from_secs(1)));
    let secret = match section.string(d, "secret_file") {
        None => None,
        Some((name, span)) => {
            let path = relative_to(config_file, &name);
            match std::fs::read(&path) {
                Ok(bytes) if bytes.trim_ascii().len() >= 16 => {
                    Some(Secret(bytes.trim_ascii().to_vec()))
                }
                Ok(_) => {
                    d.report(
                        span,
                        section.key_path("secret_file"),
                        format!("{}: the secret must hold at least 16 bytes", path.display()),
                    );
                    return None;
                }
                Err(error) => {
                    d.report(
                        span,
                        section.key_path("secret_file"),
                        format!("cannot read {}: {error}", path.display()),
                    );
                    return None;
                }
            }
        }
    };
    Some(StickyConfig {
        cookie,
        ttl,
        secret,
    })
}

/// A cookie name: an RFC 6265 token, kept to the characters that need no thought.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An optional path under `key`, relative to the config file; an empty one is reported with
/// `empty_reason`.
fn optional_path(
    d: &mut Diagnostics,
    section: &mut Section,
    key: &'static str,
    config_file: &Path,
    empty_reason: &str,
) -> Option<std::path::PathBuf> {
    let (name, span) = section.string(d, key)?;
    if name.is_empty() {
        d.report(span, section.key_path(key), empty_reason);
        return None;
    }
    Some(relative_to(config_file, &name))
}

/// A path from the config, taken relative to the config file's directory unless it is absolute.
fn relative_to(config_file: &Path, name: &str) -> std::path::PathBuf {
    let path = Path::new(name);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    config_file
        .parent()
        .map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

fn read_retry_on(d: &mut Diagnostics, upstream: &mut Section) -> RetryOn {
    let default = RetryOn {
        reset_before_response: true,
        timeout: true,
        status_502: true,
        status_503: true,
        status_504: true,
    };
    let Some(entries) = upstream.strings(d, "retry_on") else {
        return default;
    };
    let mut retry_on = RetryOn::default();
    for (index, (name, span)) in entries.into_iter().enumerate() {
        match name.as_str() {
            // Always on: such a request reached no backend.
            "connect_failure" => {}
            "reset_before_response" => retry_on.reset_before_response = true,
            "timeout" => retry_on.timeout = true,
            "502" => retry_on.status_502 = true,
            "503" => retry_on.status_503 = true,
            "504" => retry_on.status_504 = true,
            _ => d.report(
                span,
                format!("{}[{index}]", upstream.key_path("retry_on")),
                format!(
                    "\"{name}\" is not a retry condition: use {}",
                    RetryOn::NAMES
                ),
            ),
        }
    }
    retry_on
}

fn read_health_check(d: &mut Diagnostics, section: &mut Section) -> HealthCheckConfig {
    let path = match section.string(d, "path") {
        Some((path, _))
            if path.starts_with('/')
                && !path.bytes().any(|b| b.is_ascii_control() || b == b' ') =>
        {
            path
        }
        Some((path, span)) => {
            d.report(
                span,
                section.key_path("path"),
                format!(
                    "\"{path}\" is not a request path: it must start with / and hold no spaces"
                ),
            );
            "/".to_string()
        }
        None => "/".to_string(),
    };
    let interval = section.duration(
        d,
        "interval",
        Duration::from_secs(2),
        Duration::from_millis(10),
    );
    let timeout = section.duration(
        d,
        "timeout",
        Duration::from_secs(1),
        Duration::from_millis(1),
    );
    let expect_status = match section.string(d, "expect_status") {
        None => (200, 399),
        Some((text, span)) => parse_status_range(&text).unwrap_or_else(|reason| {
            d.report(
                span,
                section.key_path("expect_status"),
                format!("\"{text}\": {reason}"),
            );
            (200, 399)
        }),
    };
    let healthy_threshold = section.integer(d, "healthy_threshold", 1, 100).unwrap_or(2);
    let unhealthy_threshold = section
        .integer(d, "unhealthy_threshold", 1, 100)
        .unwrap_or(3);
    HealthCheckConfig {
        path,
        interval,
        timeout,
        expect_status,
        healthy_threshold: u32::try_from(healthy_threshold).unwrap_or(2),
        unhealthy_threshold: u32::try_from(unhealthy_threshold).unwrap_or(3),
    }
}

/// `"200"` or `"200-399"`.
fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let parse = |part: &str| -> Result<u16, String> {
        match part.trim().parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Ok(code),
            _ => Err(format!(
                "\"{part}\" is not a status code between 100 and 599"
            )),
        }
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low > high {
        return Err("the range is empty: its first code is above its last".to_string());
    }
    Ok((low, high))
}

fn read_outlier_detection(d: &mut Diagnostics, section: &mut Section) -> OutlierDetectionConfig {
    let consecutive_failures = section
        .integer(d, "consecutive_failures", 1, 1000)
        .unwrap_or(5);
    let ejection_time = section.duration(
        d,
        "ejection_time",
        Duration::from_secs(30),
        Duration::from_millis(10),
    );
    let max_ejected_percent = section
        .integer(d, "max_ejected_percent", 0, 100)
        .unwrap_or(50);
    OutlierDetectionConfig {
        consecutive_failures: u32::try_from(consecutive_failures).unwrap_or(5),
        ejection_time,
        max_ejected_percent: u32::try_from(max_ejected_percent).unwrap_or(50),
    }
}

/// `protocol`, which must agree with whether the backends are spoken to over TLS.
fn read_protocol(d: &mut Diagnostics, upstream: &mut Section, has_tls: bool) -> UpstreamProtocol {
    let Some((name, span)) = upstream.string(d, "protocol") else {
        return UpstreamProtocol::Http1;
    };
    let Some(protocol) = UpstreamProtocol::from_name(&name) else {
        d.report(
            span,
            upstream.key_path("protocol"),
            format!(
                "\"{name}\" is not a backend protocol: use {}",
                UpstreamProtocol::NAMES
            ),
        );
        return UpstreamProtocol::Http1;
    };
    let problem = match protocol {
        UpstreamProtocol::H2 if !has_tls => Some(
            "\"h2\" is HTTP/2 over TLS and needs [upstreams.NAME.tls]; cleartext HTTP/2 is \"h2c\"",
        ),
        UpstreamProtocol::H2c if has_tls => Some(
            "\"h2c\" is cleartext HTTP/2, but [upstreams.NAME.tls] is set; HTTP/2 over TLS is \"h2\"",
        ),
        _ => None,
    };
    if let Some(problem) = problem {
        d.report(span, upstream.key_path("protocol"), problem);
    }
    protocol
}

fn read_balance(d: &mut Diagnostics, upstream: &mut Section) -> (Balance, Option<HashKey>) {
    let balance = match upstream.string(d, "balance") {
        None => Balance::RoundRobin,
        Some((name, span)) => Balance::from_name(&name).unwrap_or_else(|| {
            d.report(
                span,
                upstream.key_path("balance"),
                format!(
                    "\"{name}\" is not a balancing algorithm: use one of {}",
                    Balance::NAMES
                ),
            );
            Balance::RoundRobin
        }),
    };
    let hash_key = match upstream.string(d, "hash_key") {
        Some((text, span)) => {
            if balance != Balance::ConsistentHash {
                d.report(
                    span.clone(),
                    upstream.key_path("hash_key"),
                    "hash_key applies only to balance = \"consistent_hash\"",
                );
            }
            match HashKey::parse(&text) {
                Ok(key) => Some(key),
                Err(reason) => {
                    d.report(span, upstream.key_path("hash_key"), reason);
                    None
                }
            }
        }
        None if balance == Balance::ConsistentHash => Some(HashKey::ClientIp),
        None => None,
    };
    (
        balance,
        hash_key.filter(|_| balance == Balance::ConsistentHash),
    )
}

fn parse_server_address(text: &str) -> Result<ServerAddress, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(ServerAddress {
            host: address.ip().to_string(),
            port: address.port(),
        });
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or("expected host:port, such as \"127.0.0.1:3001\" or \"app.internal:8080\"")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("\"{port}\" is not a port number"))?;
    if port == 0 {
        return Err("port 0 is not a backend port".to_string());
    }
    if !is_host_name(host) {
        return Err(format!(
            "\"{host}\" is neither an IP address nor a valid host name"
        ));
    }
    Ok(ServerAddress {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn read_routes(
    d: &mut Diagnostics,
    root: &mut Section,
    listeners: &[(ListenerConfig, Span)],
    upstreams: &[UpstreamConfig],
) -> Vec<RouteConfig> {
    let sections = root.tables(d, "routes");
    if sections.is_empty() {
        d.report(
            None,
            "routes",
            "at least one [[routes]] section is required",
        );
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    let mut names: HashMap<String, ()> = HashMap::new();
    for (index, mut section) in sections.into_iter().enumerate() {
        let name = match section.string(d, "name") {
            Some((name, span)) if name.is_empty() => {
                d.report(
                    span,
                    section.key_path("name"),
                    "a route name cannot be empty",
                );
                name
            }
            Some((name, span)) => {
                if names.insert(name.clone(), ()).is_some() {
                    d.report(
                        span,
                        section.key_path("name"),
                        format!("another route is already named \"{name}\""),
                    );
                }
                name
            }
            None => index.to_string(),
        };
        let hosts = section
            .strings(d, "hosts")
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(
                |(host_index, (text, span))| match parse_host_pattern(&text) {
                    Ok(pattern) => Some(pattern),
                    Err(reason) => {
                        d.report(
                            span,
                            format!("{}[{host_index}]", section.key_path("hosts")),
                            format!("\"{text}\": {reason}"),
                        );
                        None
                    }
                },
            )
            .collect();
        let path_prefix = match section.string(d, "path_prefix") {
            Some((prefix, span)) => normalise_prefix(&prefix).unwrap_or_else(|reason| {
                d.report(
                    span,
                    section.key_path("path_prefix"),
                    format!("\"{prefix}\": {reason}"),
                );
                "/".to_string()
            }),
            None => "/".to_string(),
        };
        let route_listeners = section
            .strings(d, "listeners")
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(listener_index, (listener, span))| {
                if listeners.iter().any(|(known, _)| known.name == listener) {
                    Some(listener)
                } else {
                    let names: Vec<&str> = listeners
                        .iter()
                        .map(|(known, _)| known.name.as_str())
                        .collect();
                    d.report(
                        span,
                        format!("{}[{listener_index}]", section.key_path("listeners")),
                        format!(
                            "no listener is named \"{listener}\"{}",
                            did_you_mean(&listener, &names)
                        ),
                    );
                    None
                }
            })
            .collect();
        let upstream = match section.string(d, "upstream") {
            Some((upstream, span)) => {
                if !upstreams.iter().any(|known| known.name == upstream) {
                    let names: Vec<&str> =
                        upstreams.iter().map(|known| known.name.as_str()).collect();
                    d.report(
                        span,
                        section.key_path("upstream"),
                        format!(
                            "no upstream is named \"{upstream}\"{}",
                            did_you_mean(&upstream, &names)
                        ),
                    );
                }
                upstream
            }
            None => {
                d.report(
                    section.span(),
                    section.key_path("upstream"),
                    "every route needs an upstream",
                );
                String::new()
            }
        };
        let cache = section
            .table(d, "cache")
            .and_then(|cache| read_route_cache(d, cache));
        section.finish(d);
        routes.push(RouteConfig {
            name,
            hosts,
            path_prefix,
            listeners: route_listeners,
            upstream,
            cache,
        });
    }
    routes
}

fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|candidate| (strsim::damerau_levenshtein(word, candidate), candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| format!("; did you mean \"{candidate}\"?"))
        .unwrap_or_default()
}

fn parse_host_pattern(text: &str) -> Result<HostPattern, String> {
    let lower = text.trim_end_matches('.').to_ascii_lowercase();
    if let Some(suffix) = lower.strip_prefix("*.") {
        if !is_host_name(suffix) {
            return Err("the part after \"*.\" must be a valid host name".to_string());
        }
        return Ok(HostPattern::Wildcard(format!(".{suffix}")));
    }
    if lower.parse::<IpAddr>().is_ok() || is_host_name(&lower) {
        return Ok(HostPattern::Exact(lower));
    }
    if lower.contains(':') {
        return Err("write the host without a port".to_string());
    }
    Err("expected a host name (\"app.example\") or a wildcard (\"*.app.example\")".to_string())
}

/// A route prefix must be a normalised absolute path; a trailing slash is dropped so that
/// `/api/` and `/api` mean the same segment-bounded prefix.
fn normalise_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err("a path prefix must start with \"/\"".to_string());
    }
    if prefix.contains(['?', '#']) || prefix.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(
            "a path prefix cannot hold a query, a fragment, spaces or control characters"
                .to_string(),
        );
    }
    if prefix
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(
            "a path prefix cannot hold \".\" or \"..\" segments (requests are normalised first)"
                .to_string(),
        );
    }
    let trimmed = prefix.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

fn read_server(d: &mut Diagnostics, mut section: Section, file: &Path) -> ServerConfig {
    let defaults = ServerConfig::default();
    let header_timeout = section.duration(
        d,
        "header_timeout",
        defaults.header_timeout,
        Duration::from_millis(1),
    );
    let idle_timeout = section.duration(
        d,
        "idle_timeout",
        defaults.idle_timeout,
        Duration::from_millis(1),
    );
    let write_timeout = section.duration(
        d,
        "write_timeout",
        defaults.write_timeout,
        Duration::from_millis(1),
    );
    let min_body_rate = section.size(d, "min_body_rate", defaults.min_body_rate, 0, 1 << 40);
    let body_timeout = section.duration(
        d,
        "body_timeout",
        defaults.body_timeout,
        Duration::from_millis(1),
    );
    let max_header_bytes = section.size(
        d,
        "max_header_bytes",
        defaults.max_header_bytes as u64,
        MIN_HEADER_BYTES,
        16 << 20,
    );
    let max_body_bytes = section.size(d, "max_body_bytes", defaults.max_body_bytes, 0, u64::MAX);
    let shutdown_grace =
        section.duration(d, "shutdown_grace", defaults.shutdown_grace, Duration::ZERO);
    let workers = section.integer(d, "workers", 0, 1024).unwrap_or(0);
    let upgrade_socket = optional_path(
        d,
        &mut section,
        "upgrade_socket",
        file,
        "the upgrade socket's path cannot be empty",
    );
    let watch_config = section.bool(d, "watch_config").unwrap_or(false);
    section.finish(d);
    ServerConfig {
        header_timeout,
        idle_timeout,
        write_timeout,
        min_body_rate,
        body_timeout,
        max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(defaults.max_header_bytes),
        max_body_bytes,
        shutdown_grace,
        workers: usize::try_from(workers).unwrap_or(0),
        upgrade_socket,
        watch_config,
    }
}

fn read_access_log(d: &mut Diagnostics, mut section: Section, file: &Path) -> AccessLogConfig {
    let format = match section.string(d, "format") {
        Some((format, span)) => match format.as_str() {
            "json" => AccessLogFormat::Json,
            "common" => AccessLogFormat::Common,
            "off" => AccessLogFormat::Off,
            other => {
                d.report(
                    span,
                    section.key_path("format"),
                    format!("\"{other}\" is not a format: use \"json\", \"common\" or \"off\""),
                );
                AccessLogFormat::default()
            }
        },
        None => AccessLogFormat::default(),
    };
    let path = optional_path(
        d,
        &mut section,
        "path",
        file,
        "the access log's file name cannot be empty (leave path out for standard output)",
    );
    section.finish(d);
    AccessLogConfig { format, path }
}

fn socket_address(
    d: &mut Diagnostics,
    section: &mut Section,
    key: &'static str,
) -> Option<SocketAddr> {
    let (text, span) = section.string(d, key)?;
    match text.parse::<SocketAddr>() {
        Ok(address) => Some(address),
        Err(_) => {
            d.report(span, section.key_path(key), format!("\"{text}\" is not an IP address with a port, such as \"127.0.0.1:8080\" or \"[::1]:8080\""));
            None
        }
    }
}

fn networks(d: &mut Diagnostics, section: &mut Section, key: &'static str) -> Vec<IpNet> {
    let path = section.key_path(key);
    section
        .strings(d, key)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(index, (text, span))| {
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => Some(net.trunc()),
                Err(_) => {
                    d.report(
                        span,
                        format!("{path}[{index}]"),
                        format!(
                            "\"{text}\" is not an address or a CIDR block such as \"10.0.0.0/8\""
                        ),
                    );
                    None
                }
            }
        })
        .collect()
}

/// Two listeners (or a listener and the admin API) on one address would fail at bind time; say so now.
/// `redirect_to_https` must name a listener with TLS, and not be set on one. An http-01 ACME
/// challenge is answered on a plain listener, so there must be one.
fn check_redirects(d: &mut Diagnostics, listeners: &[(ListenerConfig, Span)]) {
    let has_plain = listeners.iter().any(|(listener, _)| listener.tls.is_none());
    // Two managers ordering one name would fight over its certificate and the CA's rate limits.
    let mut ordered: HashMap<&str, usize> = HashMap::new();
    for (index, (listener, span)) in listeners.iter().enumerate() {
        let acme = listener.tls.as_ref().and_then(|tls| tls.acme.as_ref());
        for domain in acme.iter().flat_map(|acme| &acme.domains) {
            if let Some(first) = ordered.insert(domain, index) {
                d.report(
                    span.clone(),
                    format!("listeners[{index}].tls.acme.domains"),
                    format!("\"{domain}\" is already ordered by listeners[{first}]: one ACME certificate per name"),
                );
            }
        }
    }
    for (index, (listener, span)) in listeners.iter().enumerate() {
        let http01 = listener
            .tls
            .as_ref()
            .and_then(|tls| tls.acme.as_ref())
            .is_some_and(|acme| acme.challenge == AcmeChallenge::Http01);
        if http01 && !has_plain {
            d.report(
                span.clone(),
                format!("listeners[{index}].tls.acme.challenge"),
                "http-01 is answered over plain HTTP (port 80 for the CA), but no listener is without TLS",
            );
        }
    }
    for (index, (listener, span)) in listeners.iter().enumerate() {
        let Some(target) = &listener.redirect_to_https else {
            continue;
        };
        let path = format!("listeners[{index}].redirect_to_https");
        if listener.tls.is_some() {
            d.report(
                span.clone(),
                path,
                "a TLS listener cannot redirect to HTTPS: it is HTTPS",
            );
            continue;
        }
        match listeners.iter().find(|(other, _)| &other.name == target) {
            Some((other, _)) if other.tls.is_some() => {}
            Some(_) => d.report(
                span.clone(),
                path,
                format!("listener \"{target}\" has no [listeners.tls]: redirects go to an HTTPS listener"),
            ),
            None => d.report(span.clone(), path, format!("no listener is named \"{target}\"")),
        }
    }
}

fn check_bind_conflicts(
    d: &mut Diagnostics,
    root: &Section,
    admin: Option<&AdminConfig>,
    listeners: &[(ListenerConfig, Span)],
) {
    let mut seen: HashSet<SocketAddr> = HashSet::new();
    if let Some(admin) = admin {
        seen.insert(admin.bind);
    }
    for (index, (listener, span)) in listeners.iter().enumerate() {
        if listener.bind.port() != 0 && !seen.insert(listener.bind) {
            d.report(
                span.clone(),
                format!("{}listeners[{index}].bind", root.path()),
                format!(
                    "{} is already used by another listener or the admin API",
                    listener.bind
                ),
            );
        }
    }
}

mod protection;
#[cfg(test)]
mod tests;
