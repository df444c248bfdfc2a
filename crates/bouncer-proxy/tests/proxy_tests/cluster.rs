//! Several Bouncer instances sharing rate limits and bans through a real `redis-server`, started
//! by each test on a port of its own: one combined limit, bans that reach every instance, and
//! instances that keep serving when Redis dies and share again when it returns.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bouncer_testkit::redis::RedisServer;
use bouncer_testkit::{Backend, Clients, TestProxy, eventually, metric};

use super::protection::{get_from, status_from};

/// Two instances with the same config, sharing `redis`.
async fn two_instances(backend: &Backend, redis: &RedisServer, extra: &str) -> [TestProxy; 2] {
    let toml = instance_config(backend, redis, extra);
    [TestProxy::start(&toml).await, TestProxy::start(&toml).await]
}

fn instance_config(backend: &Backend, redis: &RedisServer, extra: &str) -> String {
    bouncer_testkit::config_for(
        std::slice::from_ref(backend),
        &format!("{extra}\n[cluster]\nredis = \"{}\"\n", redis.url()),
    )
}

const OK: Option<&str> = Some("HTTP/1.1 200 OK");
const LIMITED: Option<&str> = Some("HTTP/1.1 429 Too Many Requests");

/// Sends `count` requests from `from`, alternating between the instances; the number answered 200.
async fn served_alternately(instances: &[TestProxy], from: &str, count: usize) -> usize {
    let mut served = 0;
    for turn in 0..count {
        let status = status_from(from, instances[turn % instances.len()].address, "").await;
        if status.as_deref() == OK {
            served += 1;
        } else {
            assert_eq!(status.as_deref(), LIMITED);
        }
    }
    served
}

#[tokio::test]
async fn two_instances_enforce_one_combined_limit() {
    let redis = RedisServer::start("combined").await;
    let backend = Backend::start(0).await;
    let instances = two_instances(
        &backend,
        &redis,
        "[[rate_limits]]\nname = \"per-ip\"\nrate = \"1/m\"\nburst = 10\n",
    )
    .await;
    // Alone, each instance would let 10 through: 20 in all.
    assert_eq!(served_alternately(&instances, "127.0.3.1", 40).await, 10);
    // Another address has its own allowance.
    assert_eq!(served_alternately(&instances, "127.0.3.2", 14).await, 10);
    assert_eq!(backend.count(), 20);
    for instance in &instances {
        let text = instance.scrape().await;
        assert_eq!(metric(&text, "bouncer_cluster_redis_up"), Some(1.0));
        assert_eq!(
            metric(&text, "bouncer_cluster_local_decisions_total"),
            Some(0.0)
        );
        assert!(metric(&text, "bouncer_cluster_lease_requests_total").unwrap_or(0.0) > 0.0);
    }
    // The state is in Redis, under the documented prefix.
    let keys = redis
        .command(&[
            "EVAL",
            "return #redis.call('KEYS', 'bouncer:rl:per-ip:*')",
            "0",
        ])
        .await;
    assert_eq!(keys.as_deref(), Some(":2"));
}

#[tokio::test]
async fn batching_keeps_the_combined_rate_within_a_tenth_of_a_second_over_the_limit() {
    let redis = RedisServer::start("batching").await;
    let backend = Backend::start(0).await;
    // 500 a second: each instance takes allowance five requests at a time.
    let instances = two_instances(
        &backend,
        &redis,
        "[[rate_limits]]\nname = \"fast\"\nrate = \"500/s\"\nburst = 10\n",
    )
    .await;
    let urls: Vec<String> = instances.iter().map(|proxy| proxy.url("/")).collect();
    let attempted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1);
    let mut clients = Vec::new();
    for worker in 0..8 {
        let url = urls[worker % urls.len()].clone();
        let attempted = Arc::clone(&attempted);
        clients.push(tokio::spawn(async move {
            let client = Clients::new();
            while Instant::now() < deadline {
                let status = client.get(&url).await.status;
                assert!(status == 200 || status == 429, "{status}");
                attempted.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = backend.count() as f64;
    let attempted = attempted.load(Ordering::Relaxed) as f64;
    // The documented bound: the burst plus the rate over the window and one lease lifetime.
    let bound = 10.0 + 500.0 * (elapsed + 0.1);
    assert!(
        admitted <= bound,
        "{admitted} admitted in {elapsed:.3} s, over {bound}"
    );
    assert!(
        attempted > bound,
        "too little traffic to test the limit: {attempted} requests"
    );
    // Leases given back or refused keys do not starve the limit either.
    assert!(
        admitted >= 0.7 * 500.0 * elapsed,
        "only {admitted} admitted in {elapsed:.3} s"
    );
    let mut round_trips = 0.0;
    for instance in &instances {
        let text = instance.scrape().await;
        round_trips += metric(&text, "bouncer_cluster_lease_requests_total").unwrap_or(0.0);
    }
    eprintln!(
        "{attempted} requests in {elapsed:.3} s: {admitted} admitted (bound {bound:.0}), {round_trips} round trips to Redis"
    );
    assert!(
        round_trips < attempted / 2.0,
        "{round_trips} round trips to Redis for {attempted} requests"
    );
}

const BAN_RULE: &str = r#"
[[rules]]
name = "secrets"
when = { path_regex = "^/\\.env" }
action = "ban"
"#;

#[tokio::test]
async fn a_ban_reaches_every_instance_within_a_second_and_so_does_its_lifting() {
    let redis = RedisServer::start("bans").await;
    let backend = Backend::start(0).await;
    let [first, second] = two_instances(&backend, &redis, BAN_RULE).await;
    let banned: IpAddr = "127.0.4.1".parse().unwrap();
    assert_eq!(
        status_from("127.0.4.1", second.address, "")
            .await
            .as_deref(),
        OK
    );
    let refused = get_from("127.0.4.1", first.address, "/.env", "")
        .await
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let banned_at = Instant::now();
    eventually(
        Duration::from_secs(1),
        "the ban reaches the second instance",
        || async { second.proxy.bans().iter().any(|(ip, _)| *ip == banned) },
    )
    .await;
    assert!(banned_at.elapsed() < Duration::from_secs(1));
    // Refused at the connection now, and the other addresses still served.
    assert_eq!(status_from("127.0.4.1", second.address, "").await, None);
    assert_eq!(
        status_from("127.0.4.2", second.address, "")
            .await
            .as_deref(),
        OK
    );
    let ban = second.proxy.bans()[0].1;
    assert!(
        ban > Duration::from_secs(9 * 60) && ban <= Duration::from_secs(10 * 60),
        "{ban:?}"
    );
    let text = first.scrape().await;
    assert_eq!(
        metric(&text, "bouncer_cluster_bans_total{direction=\"sent\"}"),
        Some(1.0)
    );
    let text = second.scrape().await;
    assert_eq!(
        metric(&text, "bouncer_cluster_bans_total{direction=\"received\"}"),
        Some(1.0)
    );

    // An instance that starts later reads the bans stored in Redis before it serves.
    let third = TestProxy::start(&instance_config(&backend, &redis, BAN_RULE)).await;
    assert_eq!(status_from("127.0.4.1", third.address, "").await, None);

    // Lifting the ban on one instance lifts it everywhere.
    assert!(second.proxy.unban(banned));
    for instance in [&first, &third] {
        eventually(
            Duration::from_secs(1),
            "the ban is lifted everywhere",
            || async { instance.proxy.bans().is_empty() },
        )
        .await;
    }
    assert_eq!(
        status_from("127.0.4.1", first.address, "").await.as_deref(),
        OK
    );
    assert_eq!(
        redis
            .command(&["EXISTS", "bouncer:ban:127.0.4.1"])
            .await
            .as_deref(),
        Some(":0")
    );
}

#[tokio::test]
async fn a_ban_made_again_through_the_admin_api_is_extended_on_every_instance() {
    let redis = RedisServer::start("renewed").await;
    let backend = Backend::start(0).await;
    let [first, second] = two_instances(&backend, &redis, "").await;
    let banned: IpAddr = "127.0.4.9".parse().unwrap();
    let ban = |duration: &str| {
        super::admin::call(
            first.admin(),
            http::Method::POST,
            "/api/v1/bans",
            &[],
            Some(serde_json::json!({ "ip": "127.0.4.9", "duration": duration })),
        )
    };
    let left_on_second = || {
        second
            .proxy
            .bans()
            .iter()
            .find(|(ip, _)| *ip == banned)
            .map(|(_, left)| *left)
    };
    assert_eq!(ban("1m").await.0, http::StatusCode::CREATED);
    eventually(
        Duration::from_secs(5),
        "the ban reaches the second instance",
        || async { left_on_second().is_some() },
    )
    .await;
    assert!(left_on_second() <= Some(Duration::from_secs(60)));

    assert_eq!(ban("1h").await.0, http::StatusCode::CREATED);
    eventually(
        Duration::from_secs(5),
        "the longer ban reaches the second instance",
        || async { left_on_second() > Some(Duration::from_secs(59 * 60)) },
    )
    .await;
    let stored = redis
        .command(&["PTTL", "bouncer:ban:127.0.4.9"])
        .await
        .and_then(|reply| reply.trim_start_matches(':').parse::<u64>().ok())
        .expect("the ban is stored with a time to live");
    assert!(stored > 59 * 60 * 1000, "{stored} ms left in Redis");
    let text = first.scrape().await;
    assert_eq!(
        metric(&text, "bouncer_cluster_bans_total{direction=\"sent\"}"),
        Some(2.0)
    );
}

#[tokio::test]
async fn both_instances_keep_serving_when_redis_dies_and_share_again_when_it_returns() {
    let mut redis = RedisServer::start("outage").await;
    let backend = Backend::start(0).await;
    let extra =
        format!("{BAN_RULE}\n[[rate_limits]]\nname = \"per-ip\"\nrate = \"1/m\"\nburst = 5\n");
    let instances = two_instances(&backend, &redis, &extra).await;
    assert_eq!(served_alternately(&instances, "127.0.5.1", 8).await, 5);

    redis.kill().await;
    // Every request is still answered: by each instance's own limits now.
    assert_eq!(served_alternately(&instances, "127.0.5.2", 20).await, 10);
    for instance in &instances {
        assert_eq!(instance.proxy.cluster_up(), Some(false));
        let text = instance.scrape().await;
        assert_eq!(metric(&text, "bouncer_cluster_redis_up"), Some(0.0));
        assert!(metric(&text, "bouncer_cluster_local_decisions_total").unwrap_or(0.0) >= 9.0);
    }
    // A ban made while Redis is away is shared once it is back.
    let refused = get_from("127.0.5.9", instances[0].address, "/.env", "")
        .await
        .unwrap();
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(instances[1].proxy.bans().is_empty());

    redis.restart().await;
    for instance in &instances {
        eventually(
            Duration::from_secs(5),
            "the instance reconnects",
            || async { instance.proxy.cluster_up() == Some(true) },
        )
        .await;
    }
    eventually(
        Duration::from_secs(1),
        "the ban made during the outage is shared",
        || async { !instances[1].proxy.bans().is_empty() },
    )
    .await;
    assert_eq!(served_alternately(&instances, "127.0.5.3", 8).await, 5);
    let text = instances[0].scrape().await;
    assert_eq!(metric(&text, "bouncer_cluster_redis_up"), Some(1.0));
}

#[tokio::test]
async fn a_redis_that_hangs_costs_at_most_one_timeout_then_instances_decide_alone() {
    let redis = RedisServer::start("hang").await;
    let backend = Backend::start(0).await;
    let extra = "[[rate_limits]]\nname = \"per-ip\"\nrate = \"1/m\"\nburst = 50\n";
    let toml = instance_config(&backend, &redis, extra)
        .replace("[cluster]\n", "[cluster]\ntimeout = \"100ms\"\n");
    let proxy = TestProxy::start(&toml).await;
    assert_eq!(proxy.proxy.cluster_up(), Some(true));
    redis.freeze(true).await;
    // Concurrent requests for one key: one asks Redis and waits out the timeout, the others wait
    // for its answer; then all are decided locally.
    let started = Instant::now();
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let address = proxy.address;
            tokio::spawn(async move { status_from("127.0.6.1", address, "").await })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap().as_deref(), OK);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_millis(900), "{took:?}");
    assert_eq!(proxy.proxy.cluster_up(), Some(false));
    let text = proxy.scrape().await;
    assert!(metric(&text, "bouncer_cluster_redis_errors_total").unwrap_or(0.0) >= 1.0);
    redis.freeze(false).await;
    eventually(
        Duration::from_secs(5),
        "the instance reconnects",
        || async { proxy.proxy.cluster_up() == Some(true) },
    )
    .await;
}

#[tokio::test]
async fn a_shared_delay_limit_spaces_requests_across_instances() {
    let redis = RedisServer::start("delay").await;
    let backend = Backend::start(0).await;
    let instances = two_instances(
        &backend,
        &redis,
        "[[rate_limits]]\nname = \"paced\"\nrate = \"10/s\"\nburst = 1\naction = \"delay\"\nmax_delay = \"450ms\"\n",
    )
    .await;
    // Six at once, three to each instance: the first passes, the next four wait their turn (a
    // tenth of a second apart, booked in Redis), the sixth would wait too long and is refused.
    let started = Instant::now();
    let requests: Vec<_> = (0..6)
        .map(|turn| {
            let address = instances[turn % 2].address;
            tokio::spawn(async move {
                let status = status_from("127.0.7.1", address, "").await;
                (status, Instant::now())
            })
        })
        .collect();
    let mut served = Vec::new();
    let mut refused = 0;
    for request in requests {
        let (status, at) = request.await.unwrap();
        match status.as_deref() {
            OK => served.push(at.duration_since(started)),
            LIMITED => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    served.sort();
    assert_eq!((served.len(), refused), (5, 1), "{served:?}");
    // Spaced by the rate, whichever instance each went through.
    assert!(served[4] >= Duration::from_millis(390), "{served:?}");
    assert!(served[4] < Duration::from_millis(900), "{served:?}");
}
