//! The protection layers on real sockets: IP lists at accept time (and per request behind a
//! trusted proxy), list files reloaded, connection caps, and rate limits that reject or delay.
//! Clients on many addresses are simulated by binding to different addresses of 127.0.0.0/8.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bouncer_testkit::{Backend, TestProxy, eventually, metric, refusals};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `proxy` from the source address `from`.
pub async fn connect_from(from: &str, proxy: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(proxy).await.unwrap()
}

/// Sends `GET path` from `from` with `extra` header lines and reads the whole answer; `None` when
/// the proxy closed the connection without one.
pub async fn get_from(from: &str, proxy: SocketAddr, path: &str, extra: &str) -> Option<String> {
    let mut stream = connect_from(from, proxy).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: app\r\n{extra}Connection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return None;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the proxy answered or closed in time");
    if read.is_err() || answer.is_empty() {
        return None;
    }
    Some(String::from_utf8_lossy(&answer).into_owned())
}

/// Sends one request from `from` with `extra` header lines; the status line of the answer, or
/// `None` when the proxy closed the connection without one.
pub async fn status_from(from: &str, proxy: SocketAddr, extra: &str) -> Option<String> {
    let answer = get_from(from, proxy, "/", extra).await?;
    Some(answer.lines().next().unwrap_or_default().to_string())
}

#[tokio::test]
async fn denied_addresses_are_refused_at_accept_and_others_served() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[protection.ip]\ndeny = [\"127.0.0.2\", \"127.0.9.0/24\"]",
    )
    .await;
    assert_eq!(status_from("127.0.0.2", proxy.address, "").await, None);
    assert_eq!(status_from("127.0.9.77", proxy.address, "").await, None);
    let served = status_from("127.0.0.3", proxy.address, "").await;
    assert_eq!(served.as_deref(), Some("HTTP/1.1 200 OK"));
    assert_eq!(backend.count(), 1);
    let text = proxy.scrape().await;
    assert_eq!(refusals(&text, "connection", "deny_list"), 2.0);
}

#[tokio::test]
async fn an_allow_list_lets_only_its_addresses_in() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[protection.ip]\nallow = [\"127.0.1.0/24\"]",
    )
    .await;
    assert_eq!(status_from("127.0.0.4", proxy.address, "").await, None);
    let served = status_from("127.0.1.9", proxy.address, "").await;
    assert_eq!(served.as_deref(), Some("HTTP/1.1 200 OK"));
    let text = proxy.scrape().await;
    assert_eq!(refusals(&text, "connection", "not_allowed"), 1.0);
}

#[tokio::test]
async fn list_files_are_reloaded_when_they_change_and_bad_lines_skipped() {
    let backend = Backend::start(0).await;
    let dir = std::env::temp_dir().join(format!("bouncer-lists-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("drop.txt");
    std::fs::write(&file, "; DROP list\n127.0.2.5 ; SBL1\nnot an address\n").unwrap();
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        &format!("[protection.ip]\ndeny_files = [\"{}\"]", file.display()),
    )
    .await;
    assert_eq!(status_from("127.0.2.5", proxy.address, "").await, None);
    assert!(status_from("127.0.2.6", proxy.address, "").await.is_some());

    std::fs::write(&file, "# FireHOL netset\n127.0.2.6\n127.0.3.0/24\n").unwrap();
    eventually(Duration::from_secs(10), "the new list in use", || async {
        status_from("127.0.2.6", proxy.address, "").await.is_none()
    })
    .await;
    assert!(status_from("127.0.2.5", proxy.address, "").await.is_some());
    assert_eq!(status_from("127.0.3.200", proxy.address, "").await, None);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_lists_act_per_request() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(
        std::slice::from_ref(&backend),
        "[protection.ip]\ndeny = [\"198.51.100.9\", \"127.0.0.1\"]",
    )
    .replace(
        "name = \"public\"\nbind = \"127.0.0.1:0\"",
        "name = \"public\"\nbind = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
    );
    let proxy = TestProxy::start(&toml).await;
    let refused = status_from(
        "127.0.4.1",
        proxy.address,
        "X-Forwarded-For: 198.51.100.9\r\n",
    )
    .await;
    assert_eq!(refused.as_deref(), Some("HTTP/1.1 403 Forbidden"));
    // The proxy in front is not refused for it, even when its own address is on the list.
    let served = status_from(
        "127.0.0.1",
        proxy.address,
        "X-Forwarded-For: 198.51.100.10\r\n",
    )
    .await;
    assert_eq!(served.as_deref(), Some("HTTP/1.1 200 OK"));
    assert_eq!(backend.count(), 1);
    let text = proxy.scrape().await;
    assert_eq!(refusals(&text, "request", "deny_list"), 1.0);
    assert_eq!(refusals(&text, "connection", "deny_list"), 0.0);
}

/// Opens a connection from `from` and completes one keep-alive request on it, so that the proxy
/// has admitted it; the connection stays open.
async fn held_connection(from: &str, proxy: SocketAddr) -> Option<TcpStream> {
    let mut stream = connect_from(from, proxy).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .ok()?;
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(head)
    })
    .await
    .expect("an answer or a close in time")?;
    assert!(head.starts_with(b"HTTP/1.1 200"));
    // The body ("backend 0") follows; it is left unread.
    Some(stream)
}

#[tokio::test]
async fn connection_caps_hold_per_address_and_in_all() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[protection]\nmax_connections = 3\nmax_connections_per_ip = 2",
    )
    .await;
    let first = held_connection("127.0.5.1", proxy.address)
        .await
        .expect("admitted");
    let _second = held_connection("127.0.5.1", proxy.address)
        .await
        .expect("admitted");
    assert!(held_connection("127.0.5.1", proxy.address).await.is_none());
    let _third = held_connection("127.0.5.2", proxy.address)
        .await
        .expect("admitted");
    let text = proxy.scrape().await;
    assert_eq!(
        refusals(&text, "connection", "connection_limit_per_ip"),
        1.0
    );

    // At the total cap, the connection idle the longest makes room for a new one.
    let _fourth = held_connection("127.0.5.3", proxy.address)
        .await
        .expect("admitted");
    let mut first = first;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest))
        .await
        .expect("the oldest idle connection was closed");
    assert!(closed.is_ok());
    eventually(Duration::from_secs(5), "the reaping counted", || async {
        refusals(&proxy.scrape().await, "connection", "idle_reaped") == 1.0
    })
    .await;
}

#[tokio::test]
async fn at_the_cap_with_every_connection_busy_a_new_one_is_refused() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(
        std::slice::from_ref(&backend),
        "[protection]\nmax_connections = 2",
    )
    .await;
    // Two connections with requests in flight: nothing is idle to make room.
    let mut busy = Vec::new();
    for from in ["127.0.6.1", "127.0.6.2"] {
        let mut stream = connect_from(from, proxy.address).await;
        stream
            .write_all(b"GET /delay/3000 HTTP/1.1\r\nHost: app\r\n\r\n")
            .await
            .unwrap();
        busy.push(stream);
    }
    eventually(
        Duration::from_secs(5),
        "both requests at the backend",
        || async { backend.count() == 2 },
    )
    .await;
    assert_eq!(status_from("127.0.6.3", proxy.address, "").await, None);
    let text = proxy.scrape().await;
    assert_eq!(refusals(&text, "connection", "connection_limit"), 1.0);
    assert_eq!(refusals(&text, "connection", "idle_reaped"), 0.0);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_ratelimit_headers() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(
        std::slice::from_ref(&backend),
        r#"
[[rate_limits]]
name = "per-user"
key = ["client_ip", "header:x-user"]
rate = "2/m"
burst = 2
"#,
    );
    let proxy = TestProxy::start(&toml).await;
    let clients = bouncer_testkit::Clients::new();
    let get = |user: &'static str| {
        let clients = clients.clone();
        let url = proxy.url("/");
        async move {
            clients
                .send(
                    http::Request::get(url)
                        .header("x-user", user)
                        .body(bouncer_testkit::empty())
                        .unwrap(),
                )
                .await
        }
    };
    assert_eq!(get("alice").await.status, 200);
    assert_eq!(get("alice").await.status, 200);
    let refused = get("alice").await;
    assert_eq!(refused.status, 429);
    // The next place frees up 30 s after the first request.
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry), "{retry}");
    assert_eq!(refused.header("ratelimit-limit"), Some("2"));
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        refused.header("ratelimit-reset"),
        Some(retry.to_string().as_str())
    );
    // Another key has its own bucket.
    assert_eq!(get("bob").await.status, 200);
    assert_eq!(backend.count(), 3);
    let text = proxy.scrape().await;
    assert_eq!(refusals(&text, "request", "rate_limit"), 1.0);
}

#[tokio::test]
async fn the_delay_action_holds_requests_until_they_fit_and_refuses_beyond_max_delay() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(
        std::slice::from_ref(&backend),
        r#"
[[rate_limits]]
name = "smooth"
rate = "1/s"
burst = 1
action = "delay"
max_delay = "1500ms"
"#,
    );
    let proxy = TestProxy::start(&toml).await;
    let clients = bouncer_testkit::Clients::new();
    let started = Instant::now();
    let requests = (0..3).map(|_| {
        let clients = clients.clone();
        let url = proxy.url("/");
        async move { clients.get(&url).await.status.as_u16() }
    });
    let mut statuses = futures_util::future::join_all(requests).await;
    statuses.sort_unstable();
    // One at once, one a second later, and one that would have waited two seconds: refused.
    assert_eq!(statuses, [200, 200, 429]);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(backend.count(), 2);
}

#[tokio::test]
async fn rate_limits_apply_only_to_their_routes() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(std::slice::from_ref(&backend), "")
        .replace(
            "[[routes]]\nname = \"app\"\nupstream = \"app\"",
            "[[routes]]\nname = \"login\"\npath_prefix = \"/login\"\nupstream = \"app\"\n\n[[routes]]\nname = \"app\"\nupstream = \"app\"",
        )
        + "\n[[rate_limits]]\nname = \"login\"\nrate = \"1/m\"\nburst = 1\nroutes = [\"login\"]\n";
    let proxy = TestProxy::start(&toml).await;
    let clients = bouncer_testkit::Clients::new();
    assert_eq!(clients.get(&proxy.url("/login")).await.status, 200);
    assert_eq!(clients.get(&proxy.url("/login")).await.status, 429);
    for _ in 0..5 {
        assert_eq!(clients.get(&proxy.url("/other")).await.status, 200);
    }
}

const RULES: &str = r#"
[protection]
tarpit_delay = "300ms"

[[rules]]
name = "scanners"
when = { path_regex = "^/(wp-admin|wp-login\\.php)", header = { "user-agent" = "(?i)(sqlmap|nikto)" }, any = true }
action = "deny"

[[rules]]
name = "secrets"
when = { path_regex = "^/\\.(env|git)" }
action = "ban"

[[rules]]
name = "slowdown"
when = { path_regex = "^/tarpit", method = ["GET"] }
action = "tarpit"

[[rules]]
name = "watch"
when = { path_regex = "^/watched" }
action = "log"
"#;

fn rule_matches(text: &str, rule: &str, action: &str) -> f64 {
    metric(
        text,
        &format!("bouncer_rule_matches_total{{rule=\"{rule}\",action=\"{action}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn rules_deny_log_and_tarpit_requests_that_match() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), RULES).await;
    let denied = get_from("127.0.8.1", proxy.address, "/wp-login.php", "")
        .await
        .unwrap();
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    let by_agent = get_from(
        "127.0.8.1",
        proxy.address,
        "/",
        "User-Agent: sqlmap/1.7\r\n",
    )
    .await
    .unwrap();
    assert!(by_agent.starts_with("HTTP/1.1 403"), "{by_agent}");
    let logged = get_from("127.0.8.1", proxy.address, "/watched/page", "")
        .await
        .unwrap();
    assert!(logged.starts_with("HTTP/1.1 200"), "{logged}");
    let started = Instant::now();
    let tarpitted = get_from("127.0.8.1", proxy.address, "/tarpit", "")
        .await
        .unwrap();
    assert!(tarpitted.starts_with("HTTP/1.1 403"), "{tarpitted}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        backend.count(),
        1,
        "only the logged request reached the backend"
    );
    let text = proxy.scrape().await;
    assert_eq!(rule_matches(&text, "scanners", "deny"), 2.0);
    assert_eq!(rule_matches(&text, "watch", "log"), 1.0);
    assert_eq!(rule_matches(&text, "slowdown", "tarpit"), 1.0);
    assert_eq!(refusals(&text, "request", "rule"), 3.0);
}

#[tokio::test]
async fn a_ban_rule_bans_the_address_at_the_connection_level() {
    let backend = Backend::start(0).await;
    let proxy = TestProxy::for_backends(std::slice::from_ref(&backend), RULES).await;
    let banned = get_from("127.0.8.2", proxy.address, "/.env", "")
        .await
        .unwrap();
    assert!(banned.starts_with("HTTP/1.1 403"), "{banned}");
    // From now on its connections are refused before anything is read.
    assert_eq!(get_from("127.0.8.2", proxy.address, "/", "").await, None);
    let other = get_from("127.0.8.3", proxy.address, "/", "").await.unwrap();
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    let text = proxy.scrape().await;
    assert_eq!(metric(&text, "bouncer_bans_total"), Some(1.0));
    assert_eq!(refusals(&text, "connection", "banned"), 1.0);
    let bans = proxy.proxy.bans();
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].0, "127.0.8.2".parse::<IpAddr>().unwrap());
}

#[tokio::test]
async fn repeated_violations_ban_the_address_and_others_are_served() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(
        std::slice::from_ref(&backend),
        r#"
[protection.auto_ban]
violations = 3
within = "10s"
ban_for = "1h"

[[rate_limits]]
name = "tight"
rate = "1/m"
burst = 1
"#,
    );
    let proxy = TestProxy::start(&toml).await;
    let first = status_from("127.0.9.1", proxy.address, "").await;
    assert_eq!(first.as_deref(), Some("HTTP/1.1 200 OK"));
    // The third refusal within ten seconds bans.
    for _ in 0..3 {
        let refused = status_from("127.0.9.1", proxy.address, "").await;
        assert_eq!(refused.as_deref(), Some("HTTP/1.1 429 Too Many Requests"));
    }
    assert_eq!(status_from("127.0.9.1", proxy.address, "").await, None);
    let other = status_from("127.0.9.2", proxy.address, "").await;
    assert_eq!(other.as_deref(), Some("HTTP/1.1 200 OK"));
    assert_eq!(
        metric(&proxy.scrape().await, "bouncer_bans_total"),
        Some(1.0)
    );
}

#[tokio::test]
async fn adaptive_mode_tightens_limits_while_backends_are_slow_and_relaxes_after() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(std::slice::from_ref(&backend), "")
        .replace(
            "[[routes]]\nname = \"app\"\nupstream = \"app\"",
            "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"app\"\n\n[[routes]]\nname = \"app\"\nupstream = \"app\"",
        )
        + r#"
[protection.adaptive]
trigger_backend_p99 = "100ms"
tighten_to = 0.25

[[rate_limits]]
name = "users"
key = "header:x-user"
rate = "8/m"
burst = 8
routes = ["api"]
"#;
    let proxy = TestProxy::start(&toml).await;
    let clients = bouncer_testkit::Clients::new();
    let user = |name: &'static str| {
        let clients = clients.clone();
        let url = proxy.url("/api/x");
        async move {
            clients
                .send(
                    http::Request::get(url)
                        .header("x-user", name)
                        .body(bouncer_testkit::empty())
                        .unwrap(),
                )
                .await
                .status
                .as_u16()
        }
    };
    let active = |proxy: &TestProxy| {
        let address = proxy.admin();
        async move {
            let text = bouncer_testkit::Clients::new()
                .get(&format!("http://{address}/metrics"))
                .await
                .text();
            metric(&text, "bouncer_adaptive_active")
        }
    };
    // Slow answers (300 ms) from the backend, a few at a time, until adaptive mode is on.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        let clients = clients.clone();
        let url = proxy.url("/delay/300");
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < deadline {
                let batch = (0..4).map(|_| clients.get(&url));
                futures_util::future::join_all(batch).await;
            }
        })
    };
    eventually(Duration::from_secs(15), "adaptive mode on", || async {
        active(&proxy).await == Some(1.0)
    })
    .await;
    // A quarter of the burst of 8 now.
    let mut passed = 0;
    for _ in 0..8 {
        if user("alice").await == 200 {
            passed += 1;
        }
    }
    assert_eq!(passed, 2);
    stop.store(true, std::sync::atomic::Ordering::Release);
    load.await.unwrap();
    eventually(Duration::from_secs(20), "adaptive mode off", || async {
        active(&proxy).await == Some(0.0)
    })
    .await;
    let mut passed = 0;
    for _ in 0..8 {
        if user("bob").await == 200 {
            passed += 1;
        }
    }
    assert_eq!(passed, 8);
    let text = proxy.scrape().await;
    assert_eq!(
        metric(
            &text,
            "bouncer_adaptive_changes_total{change=\"tightened\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "bouncer_adaptive_changes_total{change=\"relaxed\"}"),
        Some(1.0)
    );
}
