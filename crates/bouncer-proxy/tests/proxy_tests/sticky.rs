//! Sticky sessions: a signed cookie keeps a client on one backend, cannot be forged into naming
//! another, and re-sticks the client elsewhere when its backend is gone.

use bouncer_testkit::{Answer, Backend, Clients, TestProxy, config_with_upstream_keys, empty};
use http::Request;

const STICKY: &str = r#"sticky = { cookie = "route", ttl = "1h" }"#;

async fn get_with_cookie(clients: &Clients, url: &str, cookie: Option<&str>) -> Answer {
    let mut request = Request::get(url);
    if let Some(cookie) = cookie {
        request = request.header("cookie", format!("theme=dark; {cookie}"));
    }
    clients.send(request.body(empty()).unwrap()).await
}

/// The `name=value` part of a `Set-Cookie` answer.
fn cookie_of(answer: &Answer) -> Option<String> {
    let set_cookie = answer.header("set-cookie")?;
    Some(set_cookie.split(';').next()?.to_string())
}

#[tokio::test]
async fn a_client_with_the_cookie_stays_on_its_backend() {
    let backends = Backend::start_many(3).await;
    let proxy = TestProxy::start(&config_with_upstream_keys(&backends, STICKY, "")).await;
    let clients = Clients::new();
    let url = proxy.url("/");

    let first = get_with_cookie(&clients, &url, None).await;
    assert_eq!(first.status, 200);
    let set_cookie = first.header("set-cookie").unwrap().to_string();
    assert!(set_cookie.starts_with("route="), "{set_cookie}");
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("Max-Age=3600"),
        "{set_cookie}"
    );
    let cookie = cookie_of(&first).unwrap();
    let home = first.text();

    for _ in 0..30 {
        let answer = get_with_cookie(&clients, &url, Some(&cookie)).await;
        assert_eq!(answer.text(), home, "a stuck client moved");
        // The cookie is only set again when the backend changes.
        assert_eq!(answer.header("set-cookie"), None);
    }
    let total: usize = backends.iter().map(Backend::count).sum();
    assert_eq!(total, 31);
    assert!(backends.iter().any(|backend| backend.count() == 31));
}

#[tokio::test]
async fn a_forged_or_foreign_cookie_is_not_believed() {
    let backends = Backend::start_many(3).await;
    let proxy = TestProxy::start(&config_with_upstream_keys(&backends, STICKY, "")).await;
    let clients = Clients::new();
    let url = proxy.url("/");
    let cookie = cookie_of(&get_with_cookie(&clients, &url, None).await).unwrap();

    // Another backend id with the old signature, and a cookie of another key: both are ignored,
    // balanced like a new client, and replaced by a good cookie.
    let (id, rest) = cookie["route=".len()..].split_at(16);
    let other_id = if id == "0000000000000001" {
        "0000000000000002"
    } else {
        "0000000000000001"
    };
    let forged = format!("route={other_id}{rest}");
    let foreign = "route=00000000000000aa.0.00";
    let mut seen = std::collections::HashSet::new();
    for _ in 0..9 {
        for bad in [forged.as_str(), foreign] {
            let answer = get_with_cookie(&clients, &url, Some(bad)).await;
            assert_eq!(answer.status, 200);
            assert!(answer.header("set-cookie").is_some());
            seen.insert(answer.text());
        }
    }
    // Balanced over all three, not steered anywhere by the bad cookies.
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test]
async fn when_the_sticky_backend_is_gone_the_client_fails_over_and_sticks_again() {
    let backends = Backend::start_many(3).await;
    let proxy = TestProxy::start(&config_with_upstream_keys(&backends, STICKY, "")).await;
    let clients = Clients::new();
    let url = proxy.url("/");
    let first = get_with_cookie(&clients, &url, None).await;
    let cookie = cookie_of(&first).unwrap();
    let home = backends
        .iter()
        .position(|backend| backend.count() == 1)
        .unwrap();
    backends[home].kill();

    let moved = get_with_cookie(&clients, &url, Some(&cookie)).await;
    assert_eq!(moved.status, 200, "{}", moved.text());
    assert_ne!(moved.text(), first.text());
    let new_cookie = cookie_of(&moved).expect("a new cookie after the failover");
    assert_ne!(new_cookie, cookie);
    for _ in 0..10 {
        let answer = get_with_cookie(&clients, &url, Some(&new_cookie)).await;
        assert_eq!(answer.text(), moved.text());
    }
}

#[tokio::test]
async fn instances_sharing_a_secret_file_accept_each_others_cookies() {
    let backends = Backend::start_many(3).await;
    let dir = std::env::temp_dir().join(format!("bouncer-sticky-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("sticky.key");
    std::fs::write(&secret, "a shared secret of enough bytes\n").unwrap();
    let keys = format!(
        "sticky = {{ cookie = \"route\", secret_file = \"{}\" }}",
        secret.display()
    );
    let toml = config_with_upstream_keys(&backends, &keys, "");
    let one = TestProxy::start(&toml).await;
    let other = TestProxy::start(&toml).await;
    let clients = Clients::new();
    let first = get_with_cookie(&clients, &one.url("/"), None).await;
    let cookie = cookie_of(&first).unwrap();
    for _ in 0..10 {
        let answer = get_with_cookie(&clients, &other.url("/"), Some(&cookie)).await;
        assert_eq!(answer.text(), first.text());
        assert_eq!(answer.header("set-cookie"), None);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
