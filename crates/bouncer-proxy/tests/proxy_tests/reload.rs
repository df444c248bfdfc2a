//! Reloading the config of a running proxy: under a sustained load no request fails, kept-alive
//! connections follow the new config, state carries over, and a bad config changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bouncer_testkit::{Backend, Clients, config_for as config, empty, eventually, full, metric};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// A config file in a directory of its own, and the proxy started from it.
struct FileProxy {
    path: PathBuf,
    proxy: bouncer_proxy::RunningProxy,
    address: SocketAddr,
}

impl FileProxy {
    async fn start(name: &str, toml: &str) -> FileProxy {
        let dir =
            std::env::temp_dir().join(format!("bouncer-reload-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bouncer.toml");
        std::fs::write(&path, toml).unwrap();
        let config = bouncer_config::load(&path).unwrap();
        let proxy = bouncer_proxy::start(&config).await.unwrap();
        let address = proxy.listener_address("public").unwrap();
        FileProxy {
            path,
            proxy,
            address,
        }
    }

    /// Writes `toml` as the config file and asks the admin API to reload it.
    async fn reload_through_api(&self, toml: &str) -> (StatusCode, serde_json::Value) {
        std::fs::write(&self.path, toml).unwrap();
        let admin = self.proxy.admin_address().unwrap();
        let answer = Clients::new()
            .send(
                Request::post(format!("http://{admin}/api/v1/reload"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        let body = serde_json::from_slice(&answer.body).unwrap();
        (answer.status, body)
    }

    async fn scrape(&self) -> String {
        let admin = self.proxy.admin_address().unwrap();
        Clients::new()
            .get(&format!("http://{admin}/metrics"))
            .await
            .text()
    }
}

impl Drop for FileProxy {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What the keep-alive clients saw.
#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// Answers from backend 1, which only the reloaded config names.
    from_second: AtomicUsize,
    stop: AtomicBool,
}

/// One client on one keep-alive connection, sending GETs one after another until told to stop
/// (or for 30 s at most).
async fn keep_alive_client(proxy: SocketAddr, load: Arc<Load>) {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !load.stop.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
        let request = Request::get("/")
            .header("host", "app")
            .body(empty())
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            sender.ready().await.ok()?;
            let response = sender.send_request(request).await.ok()?;
            let status = response.status();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        })
        .await;
        match outcome {
            Ok(Some((StatusCode::OK, body))) => {
                load.ok.fetch_add(1, Ordering::Relaxed);
                if body.as_ref() == b"backend 1\n" {
                    load.from_second.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_a_sustained_load_lose_no_request_and_kept_alive_connections_follow_them() {
    let backends = Backend::start_many(2).await;
    let one = config(&backends[..1], "");
    let two = config(&backends, "");
    let proxy = FileProxy::start("load", &one).await;
    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(keep_alive_client(proxy.address, Arc::clone(&load))))
        .collect();
    eventually(Duration::from_secs(5), "the load is running", || async {
        load.ok.load(Ordering::Relaxed) >= 100
    })
    .await;
    let connections_to_first = backends[0].connections();

    for round in 0..6 {
        let next = if round % 2 == 0 { &two } else { &one };
        let (status, body) = proxy.reload_through_api(next).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["upstreams_changed"], serde_json::json!(["app"]));
        let ok_before = load.ok.load(Ordering::Relaxed);
        eventually(
            Duration::from_secs(5),
            "requests go on after the reload",
            || async { load.ok.load(Ordering::Relaxed) >= ok_before + 100 },
        )
        .await;
        if round == 0 {
            // The same connections, opened before the reload, now reach the new backend too.
            eventually(
                Duration::from_secs(5),
                "the new backend is used",
                || async { load.from_second.load(Ordering::Relaxed) > 0 },
            )
            .await;
        }
    }
    load.stop.store(true, Ordering::Release);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(load.failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(load.ok.load(Ordering::Relaxed) >= 700);
    // The first backend's pool was carried through every reload: its connections were reused.
    assert!(
        backends[0].connections() <= connections_to_first + 4,
        "{} connections before the reloads, {} after",
        connections_to_first,
        backends[0].connections()
    );
    let text = proxy.scrape().await;
    assert_eq!(
        metric(&text, "bouncer_config_reloads_total{result=\"ok\"}"),
        Some(6.0)
    );
    // The counters carried on through the reloads: every answer is counted once (as its
    // exchange ends, just after the client has it all).
    let answered = load.ok.load(Ordering::Relaxed) as f64;
    eventually(Duration::from_secs(5), "every answer is counted", || async {
        metric(
            &proxy.scrape().await,
            "bouncer_requests_total{listener=\"public\",route=\"app\",upstream=\"app\",status_class=\"2xx\"}",
        ) == Some(answered)
    })
    .await;
    eprintln!(
        "six reloads under load: {} requests answered on 4 keep-alive connections, {} failed, {} answered by the backend only the reloaded config names",
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
        load.from_second.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn the_cache_survives_a_reload() {
    let backends = Backend::start_many(2).await;
    let caching = |servers: &[Backend]| {
        config(servers, "").replace(
            "[[routes]]\nname = \"app\"\nupstream = \"app\"",
            "[[routes]]\nname = \"app\"\nupstream = \"app\"\ncache = { enabled = true }",
        )
    };
    let proxy = FileProxy::start("cache", &caching(&backends[..1])).await;
    let clients = Clients::new();
    let url = format!("http://{}/cache/kept?cc=max-age%3D600", proxy.address);
    assert_eq!(
        clients.get(&url).await.text().len(),
        clients.get(&url).await.text().len()
    );
    assert_eq!(backends[0].count(), 1, "cached");
    let (status, body) = proxy.reload_through_api(&caching(&backends)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = clients.get(&url).await;
    assert!(
        again
            .header("cache-status")
            .unwrap_or_default()
            .contains("hit"),
        "{:?}",
        again.header("cache-status")
    );
    assert_eq!(
        backends[0].count() + backends[1].count(),
        1,
        "still from the cache"
    );
}

#[tokio::test]
async fn a_bad_config_or_a_listener_change_is_refused_and_the_running_config_stays() {
    let backends = Backend::start_many(2).await;
    let good = config(&backends[..1], "");
    let proxy = FileProxy::start("bad", &good).await;
    let clients = Clients::new();
    let url = format!("http://{}/", proxy.address);

    let broken = config(&backends[1..], "[server]\nidle_timout = \"5s\"");
    let (status, body) = proxy.reload_through_api(&broken).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("bouncer.toml"), "names the file: {error}");
    assert!(
        error.contains("server.idle_timout"),
        "names the key: {error}"
    );
    assert!(
        error.contains("idle_timeout"),
        "suggests the right key: {error}"
    );
    assert_eq!(
        clients.get(&url).await.text(),
        "backend 0\n",
        "old config kept"
    );

    let moved = good.replacen(
        "bind = \"127.0.0.1:0\"\n\n[[routes]]",
        "bind = \"127.0.0.2:0\"\n\n[[routes]]",
        1,
    );
    assert_ne!(moved, good);
    let (status, body) = proxy.reload_through_api(&moved).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"].as_str().unwrap().contains("[[listeners]]"));
    assert_eq!(clients.get(&url).await.text(), "backend 0\n");

    let text = proxy.scrape().await;
    assert_eq!(
        metric(&text, "bouncer_config_reloads_total{result=\"failed\"}"),
        Some(2.0)
    );
    // The good file applies.
    let (status, _) = proxy.reload_through_api(&config(&backends[1..], "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(clients.get(&url).await.text(), "backend 1\n");
}

#[tokio::test]
async fn bans_and_a_drained_backend_survive_a_reload_that_rebuilds_them() {
    let backends = Backend::start_many(2).await;
    let limited = "[[rate_limits]]\nname = \"per-ip\"\nrate = \"1000/s\"";
    let before = config(&backends, limited);
    let proxy = FileProxy::start("state", &before).await;
    let admin = proxy.proxy.admin_address().unwrap();
    let clients = Clients::new();
    let ban = Request::post(format!("http://{admin}/api/v1/bans"))
        .header("content-type", "application/json")
        .body(full(r#"{"ip": "10.9.8.7", "duration": "1h"}"#))
        .unwrap();
    assert_eq!(clients.send(ban).await.status, StatusCode::CREATED);
    let drain = format!(
        "http://{admin}/api/v1/upstreams/app/backends/{}/drain",
        backends[0].address
    );
    let answer = clients
        .send(
            Request::builder()
                .method(Method::POST)
                .uri(drain)
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);

    // Another limit and another upstream setting: both the protection layer and the upstream
    // are rebuilt.
    let after = config(
        &backends,
        "[[rate_limits]]\nname = \"per-ip\"\nrate = \"2000/s\"",
    )
    .replace("servers = [", "pool_max_idle = 7\nservers = [");
    let (status, body) = proxy.reload_through_api(&after).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["protection_rebuilt"], true);
    assert_eq!(body["upstreams_changed"], serde_json::json!(["app"]));

    let bans = proxy.proxy.bans();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].0, "10.9.8.7".parse::<std::net::IpAddr>().unwrap());
    assert!(bans[0].1 > Duration::from_secs(3500));
    let requests_to_drained = backends[0].count();
    for _ in 0..6 {
        let answer = clients.get(&format!("http://{}/", proxy.address)).await;
        assert_eq!(
            answer.text(),
            "backend 1\n",
            "the drained backend stays drained"
        );
    }
    assert_eq!(backends[0].count(), requests_to_drained);
}

#[tokio::test]
async fn rate_limit_counts_go_on_through_a_reload_that_rebuilds_the_protection_layer() {
    let backends = Backend::start_many(1).await;
    let limits = |names: [&str; 2]| {
        names
            .iter()
            .map(|name| {
                let rate = if *name == "per-ip" { "2/m" } else { "1000/s" };
                format!("[[rate_limits]]\nname = \"{name}\"\nrate = \"{rate}\"\nburst = 2\n")
            })
            .collect::<String>()
    };
    let before = config(&backends, &limits(["per-ip", "other"]));
    let proxy = FileProxy::start("limits", &before).await;
    let clients = Clients::new();
    let url = format!("http://{}/", proxy.address);
    assert_eq!(clients.get(&url).await.status, StatusCode::OK);
    assert_eq!(clients.get(&url).await.status, StatusCode::OK);
    assert_eq!(
        clients.get(&url).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // The limits change places in the file and a rule comes: the layer is rebuilt, and the
    // address's count under "per-ip" goes on.
    let rule =
        "[[rules]]\nname = \"secrets\"\nwhen = { path_regex = \"^/secrets\" }\naction = \"deny\"\n";
    let after = config(&backends, &(limits(["other", "per-ip"]) + rule));
    let (status, body) = proxy.reload_through_api(&after).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["protection_rebuilt"], true);
    assert_eq!(
        clients.get(&url).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn with_watch_config_a_changed_file_is_reloaded_by_itself() {
    let backends = Backend::start_many(2).await;
    let watching = "[server]\nwatch_config = true";
    let proxy = FileProxy::start("watch", &config(&backends[..1], watching)).await;
    let clients = Clients::new();
    let url = format!("http://{}/", proxy.address);
    assert_eq!(clients.get(&url).await.text(), "backend 0\n");

    std::fs::write(&proxy.path, config(&backends[1..], watching)).unwrap();
    eventually(Duration::from_secs(10), "the change is applied", || async {
        clients.get(&url).await.text() == "backend 1\n"
    })
    .await;

    std::fs::write(&proxy.path, "[[listeners]]\nname = 7\n").unwrap();
    eventually(
        Duration::from_secs(10),
        "the broken file is refused",
        || async {
            metric(
                &proxy.scrape().await,
                "bouncer_config_reloads_total{result=\"failed\"}",
            ) == Some(1.0)
        },
    )
    .await;
    assert_eq!(
        clients.get(&url).await.text(),
        "backend 1\n",
        "the running config stays"
    );
}
