//! The validated configuration. Every value here has been checked: addresses are parsed, durations
//! are `Duration`s, and every name that refers to something else refers to something that exists.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this config was read from, for messages and reloads.
    pub source: PathBuf,
    /// The text it was read from, for showing the live config (see [`crate::redacted_json`]).
    pub text: String,
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    /// Upstreams in the order the file names them.
    pub upstreams: Vec<UpstreamConfig>,
    pub server: ServerConfig,
    pub access_log: AccessLogConfig,
    /// How host names in `servers` are looked up.
    pub resolver: ResolverConfig,
    /// Connection caps and IP lists.
    pub protection: ProtectionConfig,
    /// `[[rate_limits]]`, in the order the file gives them.
    pub rate_limits: Vec<RateLimitConfig>,
    /// `[[rules]]`, in the order the file gives them: the first that matches decides.
    pub rules: Vec<RuleConfig>,
    /// `[cluster]`: rate limits and bans shared with other instances; `None` keeps them local.
    pub cluster: Option<ClusterConfig>,
    /// `[cache]`, with its defaults when left out.
    pub cache: CacheConfig,
}

impl Config {
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|upstream| upstream.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// A file holding the bearer token that API calls must carry; required off loopback.
    pub token_file: Option<std::path::PathBuf>,
    /// Host names the admin listener answers to besides its own address (DNS rebinding defence).
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// Peers whose `X-Forwarded-*`, `Forwarded` and `X-Request-Id` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Whether connections start with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
    /// TLS termination; `None` for plain HTTP.
    pub tls: Option<TlsConfig>,
    /// The name of a TLS listener that requests to this one are redirected to (308), except ACME
    /// http-01 challenges.
    pub redirect_to_https: Option<String>,
}

/// `[listeners.tls]`: HTTPS on a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Picked by SNI from each certificate's names; the first is the default.
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in order of preference: `h2` and `http/1.1`.
    pub alpn: Vec<String>,
    pub handshake_timeout: Duration,
    /// Refuse the handshake when the client names no host any certificate covers, rather than
    /// answering with the default certificate.
    pub strict_sni: bool,
    /// A `Strict-Transport-Security` value added to every response.
    pub hsts: Option<String>,
    /// Mutual TLS: client certificates checked against a CA.
    pub client_auth: Option<ClientAuthConfig>,
    /// Certificates obtained and renewed automatically from an ACME CA.
    pub acme: Option<AcmeConfig>,
}

/// `acme = { domains, contact, directory, storage, challenge }`: one certificate for `domains`,
/// obtained and renewed with ACME (RFC 8555).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The names the certificate covers, lower case; the first names its files.
    pub domains: Vec<String>,
    /// Contact URLs for the account, such as `mailto:ops@example.com`.
    pub contact: Vec<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// A PEM CA to trust for the directory's own HTTPS, for private or test CAs.
    pub directory_ca: Option<PathBuf>,
    /// Where the account key and the certificates are kept.
    pub storage: PathBuf,
    pub challenge: AcmeChallenge,
}

/// How the CA checks that this proxy answers for a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A TLS handshake with ALPN `acme-tls/1` on this listener (RFC 8737), port 443 for the CA.
    TlsAlpn01,
    /// `GET /.well-known/acme-challenge/TOKEN` over plain HTTP, port 80 for the CA.
    Http01,
}

/// Let's Encrypt's production directory, the default CA.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// `client_auth = { ca, required, subject_header }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuthConfig {
    /// PEM file of the CA (or CAs) that client certificates must chain to.
    pub ca: PathBuf,
    /// Refuse the handshake without a valid client certificate; otherwise one is only checked
    /// when sent.
    pub required: bool,
    /// The request header that carries the verified certificate's subject to the backend; it is
    /// removed from every request first.
    pub subject_header: String,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl ListenerConfig {
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = canonical_ip(peer);
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is the IPv4 address it carries.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    /// Empty means any host.
    pub hosts: Vec<HostPattern>,
    /// Always starts with `/`; never ends with `/` unless it is exactly `/`.
    pub path_prefix: String,
    /// Empty means every listener.
    pub listeners: Vec<String>,
    pub upstream: String,
    /// `cache = { enabled = true, ... }`: this route's responses go through the shared cache.
    pub cache: Option<RouteCacheConfig>,
}

/// A route's `cache` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCacheConfig {
    /// The freshness of a response that states none (zero: the RFC's heuristic).
    pub default_ttl: Duration,
    /// What names a stored response.
    pub key: Vec<CacheKeyPart>,
    /// Query parameters left out of the key.
    pub ignore_query_params: Vec<String>,
    /// Store responses that carry `Set-Cookie` (never by default).
    pub store_set_cookie: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKeyPart {
    Method,
    Host,
    Path,
    Query,
}

/// `[cache]`: the shared HTTP cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bound on the bytes stored in memory, headers included.
    pub memory: u64,
    /// Larger responses stream through without being stored.
    pub max_object_size: u64,
    /// How long a request waits for another's response to the same key before it goes to the
    /// backend itself.
    pub lock_timeout: Duration,
    /// How long a key whose response could not be stored is passed straight through, so that
    /// the next burst does not queue behind one request again.
    pub pass_ttl: Duration,
    /// Addresses allowed to send `PURGE` requests.
    pub purge_allow: Vec<IpNet>,
    /// The second tier on disk, which survives restarts.
    pub disk: Option<DiskCacheConfig>,
}

/// `[cache] disk = { path, size }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCacheConfig {
    /// The directory of the cache's files (relative paths are taken from the config file's).
    pub path: PathBuf,
    /// Bound on the bytes of the files.
    pub size: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory: 256 << 20,
            max_object_size: 8 << 20,
            lock_timeout: Duration::from_secs(5),
            pass_ttl: Duration::from_secs(10),
            purge_allow: Vec::new(),
            disk: None,
        }
    }
}

/// A host a route answers for: an exact name, or `*.suffix` for any name below the suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Lower-case, without a trailing dot.
    Exact(String),
    /// The suffix with its leading dot, such as `.app.example` for `*.app.example`.
    Wildcard(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => name == host,
            HostPattern::Wildcard(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub servers: Vec<BackendSpec>,
    pub balance: Balance,
    /// What `consistent_hash` hashes; `None` for the other algorithms.
    pub hash_key: Option<HashKey>,
    pub connect_timeout: Duration,
    /// Until the response headers arrive.
    pub response_timeout: Duration,
    /// The longest silence allowed inside a response body.
    pub read_timeout: Duration,
    /// Idle keep-alive connections kept per backend.
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Other backends to try after a failure that is safe to retry.
    pub retries: u32,
    pub retry_on: RetryOn,
    /// Request bodies up to this size are kept so that they can be sent again; 0 keeps none.
    pub retry_buffer: u64,
    pub health_check: Option<HealthCheckConfig>,
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// How often host names in `servers` are looked up again.
    pub resolve_interval: Duration,
    pub sticky: Option<StickyConfig>,
    /// Requests in flight per backend beyond which new ones wait for a free slot.
    pub max_connections_per_server: Option<u32>,
    /// How long a request waits for a free slot before it is answered 503.
    pub queue_timeout: Duration,
    /// A backend that is new or has just recovered ramps its share up over this time; zero for off.
    pub slow_start: Duration,
    /// TLS to the backends; `None` for plain HTTP.
    pub tls: Option<UpstreamTlsConfig>,
    /// The HTTP version spoken to the backends.
    pub protocol: UpstreamProtocol,
}

/// `protocol`: how requests travel to an upstream's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 on pooled keep-alive connections, over TLS when `[upstreams.NAME.tls]` is set.
    #[default]
    Http1,
    /// HTTP/2 over TLS, agreed by ALPN, on one multiplexed connection per backend.
    H2,
    /// Cleartext HTTP/2 with prior knowledge, on one multiplexed connection per backend.
    H2c,
}

impl UpstreamProtocol {
    pub const NAMES: &'static str = "\"http1\", \"h2\" or \"h2c\"";

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "http1" => Some(Self::Http1),
            "h2" => Some(Self::H2),
            "h2c" => Some(Self::H2c),
            _ => None,
        }
    }

    pub fn is_http2(self) -> bool {
        matches!(self, Self::H2 | Self::H2c)
    }
}

/// `[upstreams.NAME.tls]`: TLS to the backends, always verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// PEM CA the backends' certificates must chain to; the system's CAs when `None`.
    pub ca: Option<PathBuf>,
    /// The name to send as SNI and to verify; each `servers` entry's host when `None`.
    pub server_name: Option<String>,
    /// A certificate to present to backends that ask for one.
    pub client_cert: Option<CertificateFiles>,
}

impl UpstreamConfig {
    /// Whether any server is named by a host name rather than an IP address.
    pub fn has_host_names(&self) -> bool {
        self.servers
            .iter()
            .any(|server| server.address.host.parse::<std::net::IpAddr>().is_err())
    }
}

/// `sticky = { ... }`: a signed cookie that keeps a client on the backend that first served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyConfig {
    pub cookie: String,
    /// The cookie's lifetime; `None` for a cookie that ends with the browser session.
    pub ttl: Option<Duration>,
    /// The key the cookie is signed with; `None` when no `secret_file` is given, and then each
    /// process draws its own, so cookies do not survive a restart.
    pub secret: Option<Secret>,
}

/// Key material read from a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// `[resolver]`: where host names in `servers` are looked up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolverConfig {
    /// DNS servers to ask; empty means the system's resolver (`/etc/hosts`, `/etc/resolv.conf`).
    pub nameservers: Vec<std::net::SocketAddr>,
    pub timeout: Option<Duration>,
}

/// Which failures a request is retried on (`retry_on`). A failure to connect is always retried:
/// the request reached no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn {
    /// The backend closed or reset the connection before any response header.
    pub reset_before_response: bool,
    /// The backend sent no response headers within `response_timeout`.
    pub timeout: bool,
    pub status_502: bool,
    pub status_503: bool,
    pub status_504: bool,
}

impl RetryOn {
    pub const NAMES: &'static str =
        "connect_failure, reset_before_response, timeout, 502, 503, 504";

    pub fn retries_status(&self, status: u16) -> bool {
        match status {
            502 => self.status_502,
            503 => self.status_503,
            504 => self.status_504,
            _ => false,
        }
    }
}

/// `[upstreams.NAME.health_check]`: active checks of every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Inclusive range of statuses that count as healthy.
    pub expect_status: (u16, u16),
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// `[upstreams.NAME.outlier_detection]`: passive ejection from real traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetectionConfig {
    pub consecutive_failures: u32,
    /// The first ejection's length; each further ejection of the same backend lasts longer.
    pub ejection_time: Duration,
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(30),
            max_ejected_percent: 50,
        }
    }
}

/// One entry of `servers`: an address with its share of the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: ServerAddress,
    /// Relative share of the requests, 1 to 1000.
    pub weight: u32,
    /// Used only when no primary backend is available.
    pub backup: bool,
}

/// How an upstream spreads requests over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    PeakEwma,
    Random,
    ConsistentHash,
}

impl Balance {
    pub const NAMES: &'static str =
        "round_robin, least_connections, peak_ewma, random, consistent_hash";

    /// The name the config uses for it.
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::PeakEwma => "peak_ewma",
            Balance::Random => "random",
            Balance::ConsistentHash => "consistent_hash",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "round_robin" => Some(Balance::RoundRobin),
            "least_connections" => Some(Balance::LeastConnections),
            "peak_ewma" => Some(Balance::PeakEwma),
            "random" => Some(Balance::Random),
            "consistent_hash" => Some(Balance::ConsistentHash),
            _ => None,
        }
    }
}

/// What a consistent hash is computed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// A request header, by its lower-case name.
    Header(String),
    Cookie(String),
    /// The normalised path, without the query.
    Path,
    /// The normalised path with the query.
    Uri,
}

impl HashKey {
    pub fn parse(text: &str) -> Result<Self, String> {
        let nonempty = |name: &str, what: &str| {
            if name.is_empty() {
                Err(format!("\"{text}\" names no {what}"))
            } else {
                Ok(name.to_string())
            }
        };
        match text {
            "client_ip" => Ok(HashKey::ClientIp),
            "path" => Ok(HashKey::Path),
            "uri" => Ok(HashKey::Uri),
            _ => {
                if let Some(name) = text.strip_prefix("header:") {
                    let name = nonempty(name, "header")?;
                    let valid = name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                    if !valid {
                        return Err(format!("\"{name}\" is not a valid header name"));
                    }
                    Ok(HashKey::Header(name.to_ascii_lowercase()))
                } else if let Some(name) = text.strip_prefix("cookie:") {
                    Ok(HashKey::Cookie(nonempty(name, "cookie")?))
                } else {
                    Err(format!(
                        "\"{text}\" is not a hash key: use client_ip, header:NAME, cookie:NAME, path or uri"
                    ))
                }
            }
        }
    }
}

/// A backend address: an IP or a host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Limits on the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// To receive a request's headers once it has started.
    pub header_timeout: Duration,
    /// Keep-alive silence allowed between requests.
    pub idle_timeout: Duration,
    /// How long a client may take no response data (a full socket, or an HTTP/2 flow-control
    /// window left shut) before its connection is closed.
    pub write_timeout: Duration,
    /// A request body must arrive at this many bytes a second at least, averaged since it began,
    /// after a grace of `body_timeout`; 0 for no floor.
    pub min_body_rate: u64,
    pub body_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// The unix socket a new Bouncer process takes the listening sockets over through.
    pub upgrade_socket: Option<PathBuf>,
    /// Whether a change to the config file is reloaded by itself, as on SIGHUP.
    pub watch_config: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            min_body_rate: 1024,
            body_timeout: Duration::from_secs(10),
            max_header_bytes: 65536,
            max_body_bytes: 100 << 20,
            shutdown_grace: Duration::from_secs(30),
            workers: 0,
            upgrade_socket: None,
            watch_config: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    #[default]
    Json,
    /// The Common Log Format with the request id, route, backend and times appended.
    Common,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessLogConfig {
    pub format: AccessLogFormat,
    /// A file to append to, reopened on SIGUSR1 (for logrotate); standard output when `None`.
    pub path: Option<PathBuf>,
}

/// `[cluster]`: the state that several Bouncer instances share through one Redis server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host[:port][/db]` or `unix:///path/to/redis.sock`.
    pub redis: String,
    /// Put before every key and channel name, so that several clusters can share one Redis.
    pub key_prefix: String,
    /// How long a Redis command may take before the instance decides alone.
    pub timeout: Duration,
}

/// `[protection]`: what is refused before a request reaches a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectionConfig {
    /// Open client connections, all listeners together.
    pub max_connections: Option<u32>,
    /// Open client connections from one address.
    pub max_connections_per_ip: Option<u32>,
    /// The bound on per-key state (rate limits); the least recently seen keys go first.
    pub max_tracked_keys: usize,
    pub ip: IpListsConfig,
    /// Repeated violations that ban an address.
    pub auto_ban: Option<AutoBanConfig>,
    /// How long a `tarpit` rule holds a request before refusing it.
    pub tarpit_delay: Duration,
    /// "Under attack" mode: rate limits tighten while the backends suffer.
    pub adaptive: Option<AdaptiveConfig>,
}

/// `[protection.adaptive]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub trigger: AdaptiveTrigger,
    /// The share of each rate limit (rate and burst) that holds while triggered.
    pub tighten_to: f64,
}

// The share is a finite number in (0, 1], so equality is total here.
impl Eq for AdaptiveConfig {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveTrigger {
    /// The 99th percentile of the backends' response times over a second.
    BackendP99(Duration),
    /// Requests in flight, all listeners together.
    InFlight(u32),
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        ProtectionConfig {
            max_connections: None,
            max_connections_per_ip: None,
            max_tracked_keys: 1_000_000,
            ip: IpListsConfig::default(),
            auto_ban: None,
            tarpit_delay: Duration::from_secs(10),
            adaptive: None,
        }
    }
}

impl ProtectionConfig {
    /// How long a ban lasts, by `auto_ban` or a `ban` rule.
    pub fn ban_for(&self) -> Duration {
        self.auto_ban
            .as_ref()
            .map_or(DEFAULT_BAN, |auto_ban| auto_ban.ban_for)
    }
}

/// The length of a ban when `[protection.auto_ban]` does not say.
pub const DEFAULT_BAN: Duration = Duration::from_secs(600);

/// `[protection.auto_ban]`: `violations` refusals (rate limit or rule) `within` a window ban the
/// address for `ban_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoBanConfig {
    pub violations: u32,
    pub within: Duration,
    pub ban_for: Duration,
}

/// `[[rules]]`: a request pattern and what to do with a request that matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    pub name: String,
    pub when: bouncer_rules::RuleSpec,
    pub action: RuleAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    /// 403.
    Deny,
    /// 403, and the address is banned.
    Ban,
    /// The request is held for `tarpit_delay`, then refused with 403 and the connection closed.
    Tarpit,
    /// Logged and counted, and let through.
    Log,
}

/// `[protection.ip]`: addresses refused, or the only ones let in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpListsConfig {
    pub deny: Vec<IpNet>,
    /// Files of addresses and blocks, one a line, reloaded when they change.
    pub deny_files: Vec<PathBuf>,
    /// When this and `allow_files` are both empty, every address not denied may connect.
    pub allow: Vec<IpNet>,
    pub allow_files: Vec<PathBuf>,
}

impl IpListsConfig {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty()
            && self.deny_files.is_empty()
            && self.allow.is_empty()
            && self.allow_files.is_empty()
    }

    pub fn has_allow_list(&self) -> bool {
        !self.allow.is_empty() || !self.allow_files.is_empty()
    }
}

/// `[[rate_limits]]`: a GCRA limit per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub name: String,
    /// What identifies a client for this limit; parts are combined.
    pub key: Vec<RateKeyPart>,
    /// `count` requests per `period`.
    pub count: u32,
    pub period: Duration,
    /// Requests a key may make at once.
    pub burst: u32,
    /// Route names this limit applies to; empty for all.
    pub routes: Vec<String>,
    pub action: RateLimitAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKeyPart {
    ClientIp,
    /// A request header, lower case; requests without it share the empty value.
    Header(String),
    Cookie(String),
    Path,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitAction {
    /// 429 with `Retry-After` at once.
    Reject,
    /// Hold the request until it fits, when that is within `max_delay`; 429 otherwise.
    Delay { max_delay: Duration },
}
