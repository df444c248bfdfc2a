use std::path::Path;
use std::time::Duration;

use crate::{AccessLogFormat, ConfigProblem, HostPattern, UpstreamProtocol, parse};

const FULL: &str = r#"
[admin]
bind = "127.0.0.1:9900"

[[listeners]]
name = "public"
bind = "127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8", "192.168.1.1"]

[[routes]]
name = "app"
hosts = ["App.Example", "*.app.example"]
path_prefix = "/api/"
listeners = ["public"]
upstream = "app"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:3001", "[::1]:3002", "app.internal:8080"]
connect_timeout = "2s"
response_timeout = "30s"
read_timeout = "500ms"

[server]
header_timeout = "10s"
idle_timeout = "60s"
max_header_bytes = 65536
max_body_bytes = "100MiB"

[access_log]
format = "common"
"#;

fn problems(text: &str) -> Vec<ConfigProblem> {
    match parse(Path::new("bouncer.toml"), text) {
        Ok(config) => panic!("expected problems, got {config:?}"),
        Err(problems) => problems.0,
    }
}

#[test]
fn the_documented_shape_is_accepted() {
    let config = parse(Path::new("bouncer.toml"), FULL).expect("valid config");
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].trusted_proxies.len(), 2);
    assert!(config.listeners[0].trusts("10.1.2.3".parse().expect("ip")));
    assert!(config.listeners[0].trusts("::ffff:10.1.2.3".parse().expect("ip")));
    assert!(!config.listeners[0].trusts("11.1.2.3".parse().expect("ip")));
    assert_eq!(
        config.routes[0].hosts,
        vec![
            HostPattern::Exact("app.example".into()),
            HostPattern::Wildcard(".app.example".into())
        ]
    );
    assert_eq!(config.routes[0].path_prefix, "/api");
    assert_eq!(config.routes[1].name, "1");
    assert_eq!(config.routes[1].path_prefix, "/");
    let upstream = config.upstream("app").expect("upstream");
    assert_eq!(upstream.servers.len(), 3);
    assert_eq!(upstream.servers[1].address.to_string(), "[::1]:3002");
    assert_eq!(upstream.read_timeout, Duration::from_millis(500));
    assert_eq!(config.server.max_body_bytes, 100 << 20);
    assert_eq!(config.access_log.format, AccessLogFormat::Common);
}

#[test]
fn every_problem_is_reported_at_once_with_its_place() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:99999"

[[routes]]
upstream = "apq"

[upstreams.app]
servers = ["127.0.0.1:3001"]
conect_timeout = "2s"
read_timeout = "fast"
"#;
    let found = problems(text);
    let lines: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 4, "{lines:#?}");
    // Problems come in file order, whatever order the checks ran in.
    assert!(lines[0].starts_with("bouncer.toml:4:8"), "{lines:#?}");
    assert!(lines[3].starts_with("bouncer.toml:12:16"), "{lines:#?}");
    assert!(lines.contains(&"bouncer.toml:4:8: listeners[0].bind: \"127.0.0.1:99999\" is not an IP address with a port, such as \"127.0.0.1:8080\" or \"[::1]:8080\"".to_string()), "{lines:#?}");
    assert!(lines.contains(&"bouncer.toml:7:12: routes[0].upstream: no upstream is named \"apq\"; did you mean \"app\"?".to_string()), "{lines:#?}");
    assert!(lines.iter().any(|line| line.starts_with("bouncer.toml:11:1: upstreams.app.conect_timeout: unknown key \"conect_timeout\"; did you mean \"connect_timeout\"?")), "{lines:#?}");
    assert!(
        lines.iter().any(
            |line| line.starts_with("bouncer.toml:12:16: upstreams.app.read_timeout: \"fast\"")
        ),
        "{lines:#?}"
    );
}

#[test]
fn wrong_types_and_values_below_minimums_are_named() {
    let text = r#"
[[listeners]]
name = "a"
bind = "127.0.0.1:8080"
proxy_protocol = "yes"

[[routes]]
upstream = "app"
path_prefix = "api"

[upstreams.app]
servers = []

[server]
max_header_bytes = "1KiB"
idle_timeout = 5
"#;
    let lines: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
    let expect = [
        "listeners[0].proxy_protocol: expected true or false, found string",
        "routes[0].path_prefix: \"api\": a path prefix must start with \"/\"",
        "upstreams.app.servers: servers cannot be empty",
        "server.max_header_bytes: 1024 bytes is out of range",
        "server.idle_timeout: expected a duration string",
    ];
    for fragment in expect {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn duplicates_are_refused() {
    let text = r#"
[[listeners]]
name = "a"
bind = "127.0.0.1:8080"
[[listeners]]
name = "a"
bind = "127.0.0.1:8080"

[[routes]]
name = "r"
upstream = "app"
[[routes]]
name = "r"
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1", "127.0.0.1:1"]
"#;
    let lines: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
    for fragment in [
        "listeners[1].name: another listener is already named \"a\"",
        "listeners[1].bind: 127.0.0.1:8080 is already used",
        "routes[1].name: another route is already named \"r\"",
        "upstreams.app.servers[1]: \"127.0.0.1:1\" is listed twice",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn invalid_toml_points_at_the_syntax_error() {
    let found = problems("[[listeners]\nname = 1\n");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].line, 1);
    assert!(found[0].reason.starts_with("invalid TOML"), "{}", found[0]);
}

#[test]
fn unknown_sections_and_missing_essentials_are_reported() {
    let lines: Vec<String> = problems("[servr]\nidle_timeout = \"1s\"\n")
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line.contains("listeners: at least one")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("routes: at least one")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("upstreams: at least one")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("unknown key \"servr\"; did you mean \"server\"?")),
        "{lines:#?}"
    );
}

#[test]
fn host_patterns_match_exact_and_wildcard_names() {
    let exact = HostPattern::Exact("app.example".into());
    let wildcard = HostPattern::Wildcard(".app.example".into());
    assert!(exact.matches("app.example"));
    assert!(!exact.matches("x.app.example"));
    assert!(wildcard.matches("x.app.example"));
    assert!(wildcard.matches("a.b.app.example"));
    assert!(!wildcard.matches("app.example"));
    assert!(!wildcard.matches("xapp.example"));
}

const BALANCED: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
balance = "consistent_hash"
hash_key = "header:X-User"
servers = [
  { addr = "127.0.0.1:3001", weight = 3 },
  { addr = "127.0.0.1:3002", backup = true },
  "127.0.0.1:3003",
]
"#;

#[test]
fn servers_take_weights_and_backups_and_the_balance_is_read() {
    let config = parse(Path::new("bouncer.toml"), BALANCED).expect("valid config");
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.balance, crate::Balance::ConsistentHash);
    assert_eq!(
        upstream.hash_key,
        Some(crate::HashKey::Header("x-user".into()))
    );
    let shape: Vec<(String, u32, bool)> = upstream
        .servers
        .iter()
        .map(|server| (server.address.to_string(), server.weight, server.backup))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("127.0.0.1:3001".into(), 3, false),
            ("127.0.0.1:3002".into(), 1, true),
            ("127.0.0.1:3003".into(), 1, false),
        ]
    );
}

#[test]
fn balance_mistakes_are_each_reported() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[[routes]]
path_prefix = "/b"
upstream = "b"

[upstreams.app]
balance = "least_conn"
hash_key = "client_ip"
servers = [{ addr = "127.0.0.1:1", weight = 0 }, { adr = "127.0.0.1:2" }, 7]

[upstreams.b]
balance = "consistent_hash"
hash_key = "body"
servers = [{ addr = "127.0.0.1:3", backup = true }]
"#;
    let lines: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
    for fragment in [
        "upstreams.app.balance: \"least_conn\" is not a balancing algorithm",
        "upstreams.app.hash_key: hash_key applies only to balance = \"consistent_hash\"",
        "upstreams.app.servers[0].weight: 0 is out of range",
        "upstreams.app.servers[1].adr: unknown key \"adr\"; did you mean \"addr\"?",
        "upstreams.app.servers[1].addr: a server table needs addr",
        "upstreams.app.servers[2]: expected a \"host:port\" string or a { addr = ... } table, found integer",
        "upstreams.b.hash_key: \"body\" is not a hash key",
        "upstreams.b.servers: every server is a backup",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn sessions_limits_ramps_and_name_lookups_are_read() {
    let dir = std::env::temp_dir().join(format!("bouncer-config-sticky-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("sticky.key"), "0123456789abcdef0123\n").expect("key");
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["app.internal:8080"]
resolve_interval = "5s"
sticky = { cookie = "route", ttl = "1h", secret_file = "sticky.key" }
max_connections_per_server = 200
queue_timeout = "250ms"
slow_start = "30s"
retry_buffer = "64KiB"

[resolver]
nameservers = ["127.0.0.1:5353", "10.0.0.2"]
timeout = "500ms"
"#;
    let config = parse(&dir.join("bouncer.toml"), text).expect("valid");
    let upstream = &config.upstreams[0];
    assert!(upstream.has_host_names());
    assert_eq!(upstream.resolve_interval, Duration::from_secs(5));
    let sticky = upstream.sticky.as_ref().expect("sticky");
    assert_eq!(sticky.cookie, "route");
    assert_eq!(sticky.ttl, Some(Duration::from_secs(3600)));
    assert_eq!(
        sticky.secret.as_ref().map(|secret| secret.0.as_slice()),
        Some(&b"0123456789abcdef0123"[..])
    );
    assert!(
        !format!("{sticky:?}").contains("0123456789"),
        "the secret is printed"
    );
    assert_eq!(upstream.max_connections_per_server, Some(200));
    assert_eq!(upstream.queue_timeout, Duration::from_millis(250));
    assert_eq!(upstream.slow_start, Duration::from_secs(30));
    assert_eq!(upstream.retry_buffer, 64 * 1024);
    assert_eq!(
        config.resolver.nameservers,
        vec![
            "127.0.0.1:5353".parse().expect("address"),
            "10.0.0.2:53".parse().expect("address")
        ]
    );
    assert_eq!(config.resolver.timeout, Some(Duration::from_millis(500)));
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn session_and_lookup_mistakes_are_each_reported() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
balance = "consistent_hash"
servers = ["127.0.0.1:1"]
slow_start = "10s"
sticky = { cookie = "bad name", secret_file = "/nonexistent/sticky.key" }
max_connections_per_server = 0

[upstreams.b]
servers = ["127.0.0.1:2"]
sticky = { secret_file = "/nonexistent/b.key" }

[resolver]
nameservers = ["dns.example"]
"#;
    let lines: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
    for fragment in [
        "upstreams.app.slow_start: slow_start does not work with consistent_hash",
        "upstreams.app.sticky.cookie: \"bad name\" is not a cookie name",
        "upstreams.app.max_connections_per_server: 0 is out of range",
        "upstreams.b.sticky.secret_file: cannot read /nonexistent/b.key",
        "resolver.nameservers[0]: \"dns.example\" is not an IP address",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn tls_and_redirect_mistakes_are_each_reported() {
    let text = r#"
[[listeners]]
name = "http"
bind = "127.0.0.1:8080"
redirect_to_https = "plain"

[[listeners]]
name = "plain"
bind = "127.0.0.1:8081"

[[listeners]]
name = "https"
bind = "127.0.0.1:8443"
redirect_to_https = "https"
[listeners.tls]
certificates = [{ cert = "a.pem" }]
min_version = "1.1"
alpn = ["h3"]
hsts = "forever"
client_auth = { required = true, subject_header = "bad header" }

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]
"#;
    let lines: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
    for fragment in [
        "listeners[0].redirect_to_https: listener \"plain\" has no [listeners.tls]",
        "listeners[2].redirect_to_https: a TLS listener cannot redirect to HTTPS",
        "listeners[2].tls.certificates[0]: a certificate needs both cert",
        "listeners[2].tls.min_version: \"1.1\" is not a TLS version this proxy offers",
        "listeners[2].tls.alpn[0]: \"h3\" is not a protocol this proxy serves",
        "listeners[2].tls.hsts: \"forever\" is not a Strict-Transport-Security value",
        "listeners[2].tls.client_auth.ca: client_auth needs ca",
        "listeners[2].tls.client_auth.subject_header: \"bad header\" is not a header name",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn upstream_tls_is_read_relative_to_the_config_file() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["10.0.0.5:8443"]
[upstreams.app.tls]
ca = "certs/internal-ca.pem"
server_name = "App.Internal"
client_cert = { cert = "certs/proxy.pem", key = "/etc/bouncer/proxy.key" }
"#;
    let config = parse(Path::new("/etc/bouncer/bouncer.toml"), text).expect("valid");
    let tls = config.upstreams[0].tls.as_ref().expect("tls");
    assert_eq!(
        tls.ca.as_deref(),
        Some(Path::new("/etc/bouncer/certs/internal-ca.pem"))
    );
    assert_eq!(tls.server_name.as_deref(), Some("app.internal"));
    let client = tls.client_cert.as_ref().expect("client certificate");
    assert_eq!(client.cert, Path::new("/etc/bouncer/certs/proxy.pem"));
    assert_eq!(client.key, Path::new("/etc/bouncer/proxy.key"));
}

#[test]
fn backend_protocols_must_agree_with_tls() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "grpc"

[upstreams.grpc]
servers = ["127.0.0.1:50051"]
protocol = "h2c"

[upstreams.secure]
servers = ["127.0.0.1:50052"]
protocol = "h2"
[upstreams.secure.tls]
server_name = "grpc.internal"
"#;
    let config = parse(Path::new("bouncer.toml"), text).expect("valid");
    assert_eq!(config.upstreams[0].protocol, UpstreamProtocol::H2c);
    assert_eq!(config.upstreams[1].protocol, UpstreamProtocol::H2);

    let wrong = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "a"

[upstreams.a]
servers = ["127.0.0.1:1"]
protocol = "h2"

[upstreams.b]
servers = ["127.0.0.1:2"]
protocol = "h2c"
[upstreams.b.tls]

[upstreams.c]
servers = ["127.0.0.1:3"]
protocol = "http3"
"#;
    let lines: Vec<String> = problems(wrong).iter().map(ToString::to_string).collect();
    for fragment in [
        "upstreams.a.protocol: \"h2\" is HTTP/2 over TLS and needs [upstreams.NAME.tls]",
        "upstreams.b.protocol: \"h2c\" is cleartext HTTP/2, but [upstreams.NAME.tls] is set",
        "upstreams.c.protocol: \"http3\" is not a backend protocol",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn acme_listeners_need_no_certificate_files() {
    let text = r#"
[[listeners]]
name = "https"
bind = "127.0.0.1:8443"
[listeners.tls]
acme = { domains = ["Example.com", "www.example.com"], contact = "mailto:ops@example.com", storage = "state/acme" }

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]
"#;
    let config = parse(Path::new("/etc/bouncer/bouncer.toml"), text).expect("valid");
    let tls = config.listeners[0].tls.as_ref().expect("tls");
    assert!(tls.certificates.is_empty());
    let acme = tls.acme.as_ref().expect("acme");
    assert_eq!(acme.domains, ["example.com", "www.example.com"]);
    assert_eq!(acme.contact, ["mailto:ops@example.com"]);
    assert_eq!(acme.directory, crate::LETS_ENCRYPT_DIRECTORY);
    assert_eq!(acme.storage, Path::new("/etc/bouncer/state/acme"));
    assert_eq!(acme.challenge, crate::AcmeChallenge::TlsAlpn01);

    let wrong = r#"
[[listeners]]
name = "https"
bind = "127.0.0.1:8443"
[listeners.tls]
acme = { domains = ["*.example.com", "bad name", "ok.example.com"], contact = ["ops@example.com"], directory = "http://ca.example/dir", challenge = "http-01" }

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]
"#;
    let lines: Vec<String> = problems(wrong).iter().map(ToString::to_string).collect();
    for fragment in [
        "listeners[0].tls.acme.domains[0]: \"*.example.com\": wildcard names need the dns-01 challenge",
        "listeners[0].tls.acme.domains[1]: \"bad name\" is not a DNS name",
        "listeners[0].tls.acme.contact: \"ops@example.com\" is not a contact URL",
        "listeners[0].tls.acme.directory: \"http://ca.example/dir\" is not an https:// URL",
        "listeners[0].tls.acme.challenge: http-01 is answered over plain HTTP",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn a_name_is_ordered_by_one_acme_listener_only() {
    let text = r#"
[[listeners]]
name = "a"
bind = "127.0.0.1:8443"
[listeners.tls]
acme = { domains = ["example.com"] }

[[listeners]]
name = "b"
bind = "127.0.0.1:9443"
[listeners.tls]
acme = { domains = ["www.example.com", "example.com"] }

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]
"#;
    let lines: Vec<String> = problems(text).iter().map(ToString::to_string).collect();
    assert!(
        lines.iter().any(|line| line.contains(
            "listeners[1].tls.acme.domains: \"example.com\" is already ordered by listeners[0]"
        )),
        "{lines:#?}"
    );
}

#[test]
fn protection_and_rate_limits_are_read() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]

[protection]
max_connections = 10000
max_connections_per_ip = 256
max_tracked_keys = 50000

[protection.ip]
deny = ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]
deny_files = ["lists/drop.txt"]

[[rate_limits]]
name = "per-ip"
rate = "50/s"
burst = 100

[[rate_limits]]
name = "login"
key = ["client_ip", "header:X-User", "cookie:session", "path"]
rate = "5/10s"
routes = ["api"]
action = "delay"
max_delay = "250ms"
"#;
    let config = parse(Path::new("/etc/bouncer/bouncer.toml"), text).expect("valid");
    let protection = &config.protection;
    assert_eq!(protection.max_connections, Some(10_000));
    assert_eq!(protection.max_connections_per_ip, Some(256));
    assert_eq!(protection.max_tracked_keys, 50_000);
    assert_eq!(protection.ip.deny.len(), 3);
    assert_eq!(
        protection.ip.deny_files,
        [Path::new("/etc/bouncer/lists/drop.txt")]
    );
    let [per_ip, login] = &config.rate_limits[..] else {
        panic!("two limits");
    };
    assert_eq!(per_ip.key, [crate::RateKeyPart::ClientIp]);
    assert_eq!(
        (per_ip.count, per_ip.period, per_ip.burst),
        (50, Duration::from_secs(1), 100)
    );
    assert_eq!(per_ip.action, crate::RateLimitAction::Reject);
    assert_eq!(
        login.key,
        [
            crate::RateKeyPart::ClientIp,
            crate::RateKeyPart::Header("x-user".into()),
            crate::RateKeyPart::Cookie("session".into()),
            crate::RateKeyPart::Path,
        ]
    );
    // Without a burst, one second's worth, at least one.
    assert_eq!(login.burst, 1);
    assert_eq!(login.routes, ["api"]);
    assert_eq!(
        login.action,
        crate::RateLimitAction::Delay {
            max_delay: Duration::from_millis(250)
        }
    );

    let wrong = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]

[protection]
max_connections = 0

[protection.ip]
deny = ["300.1.1.1"]

[[rate_limits]]
name = "a"
rate = "fast"
key = "ip"
routes = ["nowhere"]
max_delay = "1s"

[[rate_limits]]
name = "a"
rate = "1/s"
action = "drop"
"#;
    let lines: Vec<String> = problems(wrong).iter().map(ToString::to_string).collect();
    for fragment in [
        "protection.max_connections: 0 is out of range",
        "protection.ip.deny[0]: \"300.1.1.1\" is not an address",
        "rate_limits[0].rate: \"fast\" is not a rate",
        "rate_limits[0].key: \"ip\" is not a key",
        "rate_limits[0].routes: no route is named \"nowhere\"",
        "rate_limits[0].max_delay: max_delay applies only to action = \"delay\"",
        "rate_limits[1].name: another rate limit is named \"a\"",
        "rate_limits[1].action: \"drop\" is not a rate limit action",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn rules_and_auto_ban_are_read_and_bad_patterns_named() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]

[protection]
tarpit_delay = "2s"

[protection.auto_ban]
violations = 20
within = "10s"
ban_for = "10m"

[[rules]]
name = "scanners"
when = { path_regex = "^/(wp-admin|\\.env)", method = ["get", "POST"], header = { "User-Agent" = "(?i)(sqlmap|nikto)" }, any = true }
action = "ban"

[[rules]]
name = "quiet"
when = { path_regex = "^/probe" }
action = "log"
"#;
    let config = parse(Path::new("bouncer.toml"), text).expect("valid");
    let auto_ban = config.protection.auto_ban.as_ref().expect("auto_ban");
    assert_eq!(auto_ban.violations, 20);
    assert_eq!(config.protection.ban_for(), Duration::from_secs(600));
    assert_eq!(config.protection.tarpit_delay, Duration::from_secs(2));
    assert_eq!(config.rules.len(), 2);
    let scanners = &config.rules[0];
    assert_eq!(scanners.action, crate::RuleAction::Ban);
    assert_eq!(scanners.when.methods, ["GET", "POST"]);
    assert_eq!(
        scanners.when.headers,
        [("user-agent".to_string(), "(?i)(sqlmap|nikto)".to_string())]
    );
    assert!(scanners.when.any);
    assert_eq!(config.rules[1].action, crate::RuleAction::Log);

    let wrong = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]

[[rules]]
name = "broken"
when = { path_regex = "^/(unclosed" }

[[rules]]
name = "empty"
when = { any = true }
action = "shout"
"#;
    let lines: Vec<String> = problems(wrong).iter().map(ToString::to_string).collect();
    for fragment in [
        "rules[0].when.path_regex: rule \"broken\": not a valid regular expression",
        "rules[1].when: rule \"empty\" has no condition",
        "rules[1].action: \"shout\" is not a rule action",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(fragment)),
            "missing {fragment:?} in {lines:#?}"
        );
    }
}

#[test]
fn the_cluster_section_names_a_redis_server() {
    let base = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]
"#;
    let config = parse(
        Path::new("bouncer.toml"),
        &format!("{base}\n[cluster]\nredis = \"redis://10.0.0.5:6380/2\"\n"),
    )
    .expect("valid");
    let cluster = config.cluster.expect("a cluster");
    assert_eq!(cluster.redis, "redis://10.0.0.5:6380/2");
    assert_eq!(cluster.key_prefix, "bouncer:");
    assert_eq!(cluster.timeout, Duration::from_millis(250));
    assert!(
        parse(Path::new("bouncer.toml"), base)
            .expect("valid")
            .cluster
            .is_none()
    );
    for good in [
        "redis://localhost",
        "redis://:secret@[::1]:6379/0",
        "unix:///run/redis/redis.sock",
    ] {
        let text = format!("{base}\n[cluster]\nredis = \"{good}\"\ntimeout = \"100ms\"\n");
        assert!(
            parse(Path::new("bouncer.toml"), &text).is_ok(),
            "{good} is refused"
        );
    }
    for (bad, reason) in [
        ("http://127.0.0.1:6379", "is not a Redis URL"),
        ("rediss://127.0.0.1:6379", "TLS to Redis is not supported"),
        ("redis://:6379", "names no host"),
        ("redis://127.0.0.1:63790000", "is not a port number"),
        ("redis://127.0.0.1:6379/cache", "must be a database number"),
        ("unix://run/redis.sock", "absolute socket path"),
    ] {
        let text = format!("{base}\n[cluster]\nredis = \"{bad}\"\n");
        let lines: Vec<String> = problems(&text).iter().map(ToString::to_string).collect();
        assert!(
            lines
                .iter()
                .any(|line| line.contains("cluster.redis") && line.contains(reason)),
            "{bad}: {lines:#?}"
        );
    }
    let lines: Vec<String> = problems(&format!("{base}\n[cluster]\nkey_prefix = \"a b\"\n"))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line.contains("cluster.redis: is required")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.contains("cluster.key_prefix: must not contain spaces")),
        "{lines:#?}"
    );
}

#[test]
fn the_cache_section_and_route_caches_are_read() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
name = "static"
path_prefix = "/static"
upstream = "app"
cache = { enabled = true, default_ttl = "30s", key = ["method", "host", "path", "query"], ignore_query_params = ["utm_source"] }

[[routes]]
name = "off"
path_prefix = "/off"
upstream = "app"
cache = { enabled = false }

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:1"]

[cache]
memory = "64MiB"
max_object_size = "1MiB"
purge_allow = ["127.0.0.1"]
"#;
    let config = parse(Path::new("bouncer.toml"), text).expect("valid");
    assert_eq!(config.cache.memory, 64 << 20);
    assert_eq!(config.cache.max_object_size, 1 << 20);
    assert_eq!(config.cache.lock_timeout, Duration::from_secs(5));
    assert_eq!(config.cache.purge_allow.len(), 1);
    let cache = config.routes[0].cache.as_ref().expect("cached");
    assert_eq!(cache.default_ttl, Duration::from_secs(30));
    assert_eq!(cache.ignore_query_params, ["utm_source"]);
    assert_eq!(cache.key.len(), 4);
    assert!(!cache.store_set_cookie);
    assert!(config.routes[1].cache.is_none());
    assert!(config.routes[2].cache.is_none());

    let wrong = text
        .replace("\"query\"]", "\"cookie\"]")
        .replace("max_object_size = \"1MiB\"", "max_object_size = \"128MiB\"")
        .replace("enabled = false", "enabled = false, ttl = \"1s\"");
    let lines: Vec<String> = problems(&wrong).iter().map(ToString::to_string).collect();
    for expected in [
        "routes[0].cache.key[3]: \"cookie\" is not a key part",
        "cache.max_object_size: is larger than the cache's memory",
        "routes[1].cache.ttl",
    ] {
        assert!(
            lines.iter().any(|line| line.contains(expected)),
            "{expected}: {lines:#?}"
        );
    }
}

#[test]
fn the_cache_disk_tier_names_a_directory_relative_to_the_config() {
    let base = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
upstream = "app"
cache = { enabled = true }

[upstreams.app]
servers = ["127.0.0.1:1"]
"#;
    let config = parse(
        Path::new("/etc/bouncer/bouncer.toml"),
        &format!("{base}\n[cache]\ndisk = {{ path = \"cache\", size = \"2GiB\" }}\n"),
    )
    .expect("valid");
    let disk = config.cache.disk.expect("a disk tier");
    assert_eq!(disk.path, Path::new("/etc/bouncer/cache"));
    assert_eq!(disk.size, 2 << 30);
    let lines: Vec<String> = problems(&format!("{base}\n[cache]\ndisk = {{ size = \"1KiB\" }}\n"))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        lines
            .iter()
            .any(|line| line.contains("cache.disk.path: is required")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|line| line.contains("cache.disk.size")),
        "{lines:#?}"
    );
}

#[test]
fn an_admin_api_off_loopback_needs_a_token_and_hosts_must_be_names() {
    let open = FULL.replace(
        "[admin]\nbind = \"127.0.0.1:9900\"",
        "[admin]\nbind = \"0.0.0.0:9900\"\nhosts = [\"admin.internal\", \"bad name\"]",
    );
    let found = problems(&open);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].key_path, "admin.bind");
    assert!(
        found[0].reason.contains("token_file"),
        "{}",
        found[0].reason
    );
    assert_eq!(found[1].key_path, "admin.hosts");
    assert!(
        found[1].reason.contains("\"bad name\""),
        "{}",
        found[1].reason
    );

    let guarded = FULL.replace(
        "[admin]\nbind = \"127.0.0.1:9900\"",
        "[admin]\nbind = \"0.0.0.0:9900\"\ntoken_file = \"admin.token\"\nhosts = [\"Admin.Internal\"]",
    );
    let config = parse(Path::new("/etc/bouncer/bouncer.toml"), &guarded).expect("valid config");
    let admin = config.admin.expect("[admin]");
    assert_eq!(
        admin.token_file.as_deref(),
        Some(Path::new("/etc/bouncer/admin.token")),
        "relative to the config file"
    );
    assert_eq!(admin.hosts, vec!["admin.internal".to_string()]);
}
