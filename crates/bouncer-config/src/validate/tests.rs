use std::path::Path;
use std::time::Duration;

use crate::{AccessLogFormat, ConfigProblem, HostPattern, parse};

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
