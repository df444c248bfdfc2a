//! The shared cache end to end: a real proxy in front of a counting backend whose `/cache/...`
//! objects are shaped by their query (see `bouncer_testkit::backend::cache_object`). The backend's
//! count of requests for a path proves what was and was not answered from the cache.

use std::sync::Arc;
use std::time::Duration;

use bouncer_testkit::{Backend, Clients, TestProxy, empty, eventually, metric};
use http::{Method, Request, StatusCode};

/// A proxy whose catch-all route caches with `route_cache` (inner keys of its `cache` table),
/// plus `extra` TOML.
async fn caching_proxy(backend: &Backend, route_cache: &str, extra: &str) -> TestProxy {
    let toml = bouncer_testkit::config_for(std::slice::from_ref(backend), extra).replace(
        "[[routes]]\nname = \"app\"\nupstream = \"app\"",
        &format!(
            "[[routes]]\nname = \"app\"\nupstream = \"app\"\ncache = {{ enabled = true{route_cache} }}"
        ),
    );
    TestProxy::start(&toml).await
}

/// Requests the backend received for `path` (query left out).
fn fetches(backend: &Backend, path: &str) -> usize {
    backend
        .requests()
        .iter()
        .filter(|request| request.uri.path() == path)
        .count()
}

async fn get(proxy: &TestProxy, target: &str, headers: &[(&str, &str)]) -> bouncer_testkit::Answer {
    let mut request = Request::builder().uri(proxy.url(target));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Clients::new().send(request.body(empty()).unwrap()).await
}

fn cache_status(answer: &bouncer_testkit::Answer) -> String {
    answer
        .header("cache-status")
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_fresh_response_is_served_from_the_cache_without_the_backend() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let target = "/cache/fresh?cc=max-age%3D60";
    let first = get(&proxy, target, &[]).await;
    assert_eq!(first.status, 200);
    assert!(
        cache_status(&first).starts_with("Bouncer; fwd=uri-miss; fwd-status=200; stored"),
        "{}",
        cache_status(&first)
    );
    for _ in 0..5 {
        let again = get(&proxy, target, &[]).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.text(), first.text());
        assert!(
            cache_status(&again).starts_with("Bouncer; hit; ttl="),
            "{}",
            cache_status(&again)
        );
        assert!(again.header("age").is_some());
    }
    assert_eq!(fetches(&backend, "/cache/fresh"), 1);
    let text = proxy.scrape().await;
    assert_eq!(
        metric(
            &text,
            "bouncer_cache_requests_total{route=\"app\",result=\"hit\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            "bouncer_cache_requests_total{route=\"app\",result=\"miss\"}"
        ),
        Some(1.0)
    );
    assert!(metric(&text, "bouncer_cache_stored_bytes{route=\"app\"}").unwrap_or(0.0) > 0.0);
}

#[tokio::test]
async fn responses_that_must_not_be_shared_are_never_served_from_the_cache() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    for (path, query, detail) in [
        ("/cache/private", "cc=private%2C+max-age%3D60", "private"),
        ("/cache/nostore", "cc=no-store", "no-store"),
        ("/cache/cookie", "cc=max-age%3D60&cookie=1", "set-cookie"),
        ("/cache/none", "", "no-freshness"),
    ] {
        for _ in 0..3 {
            let answer = get(&proxy, &format!("{path}?{query}"), &[]).await;
            assert_eq!(answer.status, 200);
            assert!(
                cache_status(&answer).contains("fwd="),
                "{path}: {}",
                cache_status(&answer)
            );
        }
        assert_eq!(fetches(&backend, path), 3, "{path}");
        let first = get(&proxy, &format!("{path}?{query}"), &[]).await;
        assert!(
            cache_status(&first).contains(&format!("detail={detail}"))
                || cache_status(&first).contains("detail=pass"),
            "{path}: {}",
            cache_status(&first)
        );
    }
    // A request with Authorization is not answered from a stored response either.
    let target = "/cache/auth?cc=max-age%3D60";
    get(&proxy, target, &[("authorization", "Bearer a")]).await;
    get(&proxy, target, &[("authorization", "Bearer b")]).await;
    assert_eq!(fetches(&backend, "/cache/auth"), 2);
}

#[tokio::test]
async fn a_stale_response_is_revalidated_and_a_304_refreshes_it() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    // Stored already stale: its Age is past its max-age.
    let target = "/cache/reval?cc=max-age%3D60&etag=v1&age=100";
    let first = get(&proxy, target, &[]).await;
    assert_eq!(first.status, 200);
    let revalidated = get(&proxy, target, &[]).await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.text(), first.text());
    assert!(
        cache_status(&revalidated).starts_with("Bouncer; fwd=stale; fwd-status=304"),
        "{}",
        cache_status(&revalidated)
    );
    let requests = backend.requests();
    let revalidation = requests
        .iter()
        .rfind(|request| request.uri.path() == "/cache/reval")
        .unwrap();
    assert_eq!(revalidation.headers["if-none-match"], "\"v1\"");
    // Refreshed by the 304 (which carries no Age): fresh again, with the body stored first.
    let answer = get(&proxy, target, &[]).await;
    assert_eq!(answer.text(), first.text());
    assert!(
        cache_status(&answer).starts_with("Bouncer; hit"),
        "{}",
        cache_status(&answer)
    );
    assert_eq!(fetches(&backend, "/cache/reval"), 2);
    assert_eq!(
        metric(
            &proxy.scrape().await,
            "bouncer_cache_requests_total{route=\"app\",result=\"revalidated\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let target =
        "/cache/swr?cc=max-age%3D60%2C+stale-while-revalidate%3D600&etag=v1&age=100&delay=200";
    let first = get(&proxy, target, &[]).await;
    let started = std::time::Instant::now();
    let stale = get(&proxy, target, &[]).await;
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "it waited for the backend"
    );
    assert_eq!(stale.text(), first.text());
    assert!(
        cache_status(&stale).contains("detail=stale-while-revalidate"),
        "{}",
        cache_status(&stale)
    );
    // One refresh, in the background, however many stale answers go out meanwhile.
    for _ in 0..5 {
        get(&proxy, target, &[]).await;
    }
    eventually(Duration::from_secs(5), "the background refresh", || async {
        fetches(&backend, "/cache/swr") == 2
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the refreshed copy is served",
        || async {
            cache_status(&get(&proxy, target, &[]).await).starts_with("Bouncer; hit; ttl=")
                && !cache_status(&get(&proxy, target, &[]).await).contains("stale")
        },
    )
    .await;
    assert_eq!(fetches(&backend, "/cache/swr"), 2);
}

#[tokio::test]
async fn a_client_validator_gets_a_304_from_the_cache() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let target = "/cache/validators?cc=max-age%3D60&etag=abc&lm=3600";
    let first = get(&proxy, target, &[]).await;
    let etag = first.header("etag").unwrap().to_string();
    let not_modified = get(&proxy, target, &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    let last_modified = first.header("last-modified").unwrap().to_string();
    let since = get(&proxy, target, &[("if-modified-since", &last_modified)]).await;
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    let changed = get(&proxy, target, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(changed.status, 200);
    assert_eq!(fetches(&backend, "/cache/validators"), 1);
}

#[tokio::test]
async fn vary_keeps_one_variant_per_request_header_value() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let target = "/cache/vary?cc=max-age%3D60&vary=accept-language";
    let french = get(&proxy, target, &[("accept-language", "fr")]).await;
    let english = get(&proxy, target, &[("accept-language", "en")]).await;
    assert!(french.text().contains("accept-language=fr"));
    assert!(english.text().contains("accept-language=en"));
    assert!(
        cache_status(&english).contains("fwd=vary-miss"),
        "{}",
        cache_status(&english)
    );
    let french_again = get(&proxy, target, &[("accept-language", "fr")]).await;
    let english_again = get(&proxy, target, &[("accept-language", "en")]).await;
    assert_eq!(french_again.text(), french.text());
    assert_eq!(english_again.text(), english.text());
    assert_eq!(fetches(&backend, "/cache/vary"), 2);
    // Vary: * is never served from the cache.
    get(&proxy, "/cache/star?cc=max-age%3D60&vary=*", &[]).await;
    get(&proxy, "/cache/star?cc=max-age%3D60&vary=*", &[]).await;
    assert_eq!(fetches(&backend, "/cache/star"), 2);
}

#[tokio::test]
async fn head_and_ranges_are_answered_from_a_stored_get() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let target = "/cache/ranges?cc=max-age%3D60&size=1000";
    let whole = get(&proxy, target, &[]).await;
    assert_eq!(whole.body.len(), 1000);
    let head = Clients::new()
        .send(
            Request::builder()
                .method(Method::HEAD)
                .uri(proxy.url(target))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some("1000"));
    let part = get(&proxy, target, &[("range", "bytes=10-19")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(&part.body[..], &whole.body[10..20]);
    let past = get(&proxy, target, &[("range", "bytes=5000-")]).await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past.header("content-range"), Some("bytes */1000"));
    assert_eq!(fetches(&backend, "/cache/ranges"), 1);
}

#[tokio::test]
async fn a_thousand_concurrent_misses_reach_the_backend_once() {
    let limit = bouncer_proxy::raise_open_file_limit().unwrap_or(1024);
    assert!(limit >= 4096, "the open-file limit ({limit}) is too low");
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let url = Arc::new(proxy.url("/cache/cold?cc=max-age%3D60&delay=300&size=10000"));
    let clients = Arc::new(Clients::new());
    let requests: Vec<_> = (0..1000)
        .map(|_| {
            let (url, clients) = (Arc::clone(&url), Arc::clone(&clients));
            tokio::spawn(async move { clients.get(&url).await })
        })
        .collect();
    let mut collapsed = 0;
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len(), 10_000);
        if cache_status(&answer).contains("collapsed") {
            collapsed += 1;
        }
    }
    assert_eq!(fetches(&backend, "/cache/cold"), 1);
    assert!(collapsed > 0, "no request waited on another");
}

#[tokio::test]
async fn waiters_are_released_at_once_when_the_response_cannot_be_stored() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let url = Arc::new(proxy.url("/cache/uncacheable?cc=private&delay=200"));
    let clients = Arc::new(Clients::new());
    let requests: Vec<_> = (0..10)
        .map(|_| {
            let (url, clients) = (Arc::clone(&url), Arc::clone(&clients));
            tokio::spawn(async move { clients.get(&url).await })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().status, 200);
    }
    // Each went to the backend; and the next burst passes straight through.
    assert_eq!(fetches(&backend, "/cache/uncacheable"), 10);
    let next = clients.get(&url).await;
    assert!(
        cache_status(&next).contains("detail=pass"),
        "{}",
        cache_status(&next)
    );
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_stored_url() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let target = "/cache/item?cc=max-age%3D60";
    get(&proxy, target, &[]).await;
    get(&proxy, target, &[]).await;
    assert_eq!(fetches(&backend, "/cache/item"), 1);
    let post = Clients::new()
        .send(
            Request::builder()
                .method(Method::POST)
                .uri(proxy.url(target))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(post.status, 200);
    get(&proxy, target, &[]).await;
    assert_eq!(fetches(&backend, "/cache/item"), 3);
}

#[tokio::test]
async fn stale_if_error_serves_the_stored_copy_when_the_backend_fails() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    // Stored already stale, and allowed to be served stale on error for ten minutes.
    let target = "/cache/sie?cc=max-age%3D60%2C+stale-if-error%3D600&age=100";
    let good = get(&proxy, target, &[]).await;
    assert_eq!(good.status, 200);
    backend.kill();
    let answer = get(&proxy, target, &[]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), good.text());
    assert!(
        cache_status(&answer).contains("fwd=stale")
            && cache_status(&answer).contains("detail=stale-if-error"),
        "{}",
        cache_status(&answer)
    );
    // Without stale-if-error the failure reaches the client.
    let plain = "/cache/plain?cc=max-age%3D60&age=100";
    let answer = get(&proxy, plain, &[]).await;
    assert_eq!(answer.status, 502);
}

#[tokio::test]
async fn purge_by_url_prefix_and_tag_from_allowed_addresses_only() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "[cache]\npurge_allow = [\"127.0.0.1\"]").await;
    for path in [
        "/cache/a?cc=max-age%3D60&tag=red",
        "/cache/b?cc=max-age%3D60&tag=blue",
    ] {
        get(&proxy, path, &[]).await;
    }
    let purge = |target: &str, tag: Option<&str>| {
        let mut request = Request::builder()
            .method(Method::from_bytes(b"PURGE").unwrap())
            .uri(proxy.url(target));
        if let Some(tag) = tag {
            request = request.header("surrogate-key", tag);
        }
        request.body(empty()).unwrap()
    };
    let clients = Clients::new();
    let by_tag = clients.send(purge("/", Some("red"))).await;
    assert_eq!(by_tag.status, 200);
    assert_eq!(by_tag.text(), "{\"purged\":1}\n");
    get(&proxy, "/cache/a?cc=max-age%3D60&tag=red", &[]).await;
    get(&proxy, "/cache/b?cc=max-age%3D60&tag=blue", &[]).await;
    assert_eq!(fetches(&backend, "/cache/a"), 2);
    assert_eq!(fetches(&backend, "/cache/b"), 1);
    let exact = clients
        .send(purge("/cache/b?cc=max-age%3D60&tag=blue", None))
        .await;
    assert_eq!(exact.text(), "{\"purged\":1}\n");
    let prefix = clients.send(purge("/cache/*", None)).await;
    assert_eq!(prefix.text(), "{\"purged\":1}\n");
}

#[tokio::test]
async fn purge_is_refused_from_other_addresses() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "[cache]\npurge_allow = [\"127.0.0.1\"]").await;
    get(&proxy, "/cache/kept?cc=max-age%3D60", &[]).await;
    let mut stream = super::protection::connect_from("127.0.0.2", proxy.address).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            b"PURGE /cache/kept?cc=max-age%3D60 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    get(&proxy, "/cache/kept?cc=max-age%3D60", &[]).await;
    assert_eq!(fetches(&backend, "/cache/kept"), 1);
}

/// The cache files under `dir`.
fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if file
                .path()
                .extension()
                .is_some_and(|extension| extension == "obj")
            {
                files.push(file.path());
            }
        }
    }
    files
}

#[tokio::test]
async fn the_disk_tier_survives_a_restart_and_drops_a_corrupt_body() {
    let dir = std::env::temp_dir().join(format!("bouncer-cache-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let backend = Backend::start(0).await;
    let disk = format!(
        "[cache]\npurge_allow = [\"127.0.0.1\"]\ndisk = {{ path = \"{}\", size = \"64MiB\" }}",
        dir.display()
    );
    let target = "/cache/kept?cc=max-age%3D600&size=5000";
    let first = {
        let proxy = caching_proxy(&backend, "", &disk).await;
        let first = get(&proxy, target, &[]).await;
        assert_eq!(first.status, 200);
        eventually(
            Duration::from_secs(5),
            "the object is written to disk",
            || async { cache_files(&dir).len() == 1 },
        )
        .await;
        first
    };
    // A new proxy on the same directory answers from disk, without the backend.
    let proxy = caching_proxy(&backend, "", &disk).await;
    let again = get(&proxy, target, &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body);
    assert!(
        cache_status(&again).starts_with("Bouncer; hit"),
        "{}",
        cache_status(&again)
    );
    assert_eq!(fetches(&backend, "/cache/kept"), 1);
    drop(proxy);

    // One flipped byte in the stored body: detected, dropped, and fetched again.
    let file = cache_files(&dir).remove(0);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let proxy = caching_proxy(&backend, "", &disk).await;
    let refetched = get(&proxy, target, &[]).await;
    assert_eq!(refetched.status, 200);
    assert_eq!(refetched.body, first.body);
    assert!(
        cache_status(&refetched).contains("fwd=uri-miss"),
        "{}",
        cache_status(&refetched)
    );
    assert_eq!(fetches(&backend, "/cache/kept"), 2);
    assert_eq!(
        metric(&proxy.scrape().await, "bouncer_cache_disk_corrupt_total"),
        Some(1.0)
    );

    // A purge forgets the object on disk too: the next request goes to the backend.
    eventually(
        Duration::from_secs(5),
        "the refetched object is on disk",
        || async { cache_files(&dir).len() == 1 },
    )
    .await;
    let purged_files = cache_files(&dir);
    let purge = Request::builder()
        .method(Method::from_bytes(b"PURGE").unwrap())
        .uri(proxy.url(target))
        .body(empty())
        .unwrap();
    assert_eq!(Clients::new().send(purge).await.text(), "{\"purged\":1}\n");
    // Its file is gone at once from the index; from the directory soon after.
    let after_purge = get(&proxy, target, &[]).await;
    assert!(
        cache_status(&after_purge).contains("fwd=uri-miss"),
        "{}",
        cache_status(&after_purge)
    );
    // The purged file is deleted; the one fetched since is written.
    eventually(
        Duration::from_secs(5),
        "the purged file is replaced",
        || async {
            let files = cache_files(&dir);
            files.len() == 1 && !purged_files.contains(&files[0])
        },
    )
    .await;
    drop(proxy);
    let proxy = caching_proxy(&backend, "", &disk).await;
    let restarted = get(&proxy, target, &[]).await;
    assert!(
        cache_status(&restarted).starts_with("Bouncer; hit"),
        "{}",
        cache_status(&restarted)
    );
    assert_eq!(fetches(&backend, "/cache/kept"), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_key_uses_the_normalised_path() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    get(&proxy, "/cache/x/../same?cc=max-age%3D60", &[]).await;
    let again = get(&proxy, "/cache/same?cc=max-age%3D60", &[]).await;
    assert!(
        cache_status(&again).starts_with("Bouncer; hit"),
        "{}",
        cache_status(&again)
    );
    assert_eq!(fetches(&backend, "/cache/same"), 1);
}

#[tokio::test]
async fn a_body_the_backend_cuts_off_is_never_stored() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(&backend, "", "").await;
    let url = proxy.url("/cache/cut?cc=max-age%3D60&size=100000&cut=1");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    // The client sees the cut too: the body ends in an error, not short and silent.
    assert!(
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .is_err()
    );
    // Nothing was stored: the next request goes to the backend again.
    let again = client.get(url.parse().unwrap()).await.unwrap();
    let status = again.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(status.contains("fwd=uri-miss"), "{status}");
    drop(again);
    assert_eq!(fetches(&backend, "/cache/cut"), 2);
}

#[tokio::test]
async fn memory_stays_within_its_bound_by_evicting() {
    let backend = Backend::start(0).await;
    let proxy = caching_proxy(
        &backend,
        "",
        "[cache]\nmemory = \"1MiB\"\nmax_object_size = \"200KiB\"",
    )
    .await;
    for number in 0..40 {
        let answer = get(
            &proxy,
            &format!("/cache/big{number}?cc=max-age%3D600&size=100000"),
            &[],
        )
        .await;
        assert_eq!(answer.body.len(), 100_000);
    }
    eventually(
        Duration::from_secs(5),
        "the cache settles within its bound",
        || async {
            let text = proxy.scrape().await;
            let stored =
                metric(&text, "bouncer_cache_stored_bytes{route=\"app\"}").unwrap_or(f64::MAX);
            let evicted =
                metric(&text, "bouncer_cache_evictions_total{route=\"app\"}").unwrap_or(0.0);
            // Each request is a chance for the cache's maintenance to catch up.
            get(&proxy, "/cache/big0?cc=max-age%3D600&size=100000", &[]).await;
            stored <= f64::from(1u32 << 20) && evicted > 0.0
        },
    )
    .await;
}
