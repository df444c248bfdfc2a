//! Under a flood from many addresses, a legitimate client keeps being served: the attackers are
//! held to their limits, then banned at the door, and the proxy's memory stays bounded.

use std::net::IpAddr;
use std::time::Duration;

use bouncer_testkit::flood::{FloodPlan, flood, resident_memory};
use bouncer_testkit::{Backend, TestProxy, metric};

/// Requests per second and burst each client address is allowed.
const RATE: u64 = 100;
const BURST: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legitimate_client_is_served_through_a_flood() {
    let backend = Backend::start(0).await;
    let toml = bouncer_testkit::config_for(
        std::slice::from_ref(&backend),
        &format!(
            r#"
[protection]
max_connections_per_ip = 4
max_tracked_keys = 10000

[protection.auto_ban]
violations = 50
within = "10s"
ban_for = "10m"

[[rate_limits]]
name = "per-ip"
rate = "{RATE}/s"
burst = {BURST}
"#
        ),
    );
    let proxy = TestProxy::start(&toml).await;
    let attackers: Vec<IpAddr> = (0..30u8)
        .map(|index| IpAddr::from([127, 10, 0, 1 + index]))
        .collect();
    let legitimate: IpAddr = [127, 20, 0, 1].into();
    let memory_before = resident_memory();
    let plan = FloodPlan {
        attackers: attackers.clone(),
        connections_per_attacker: 2,
        legitimate,
        // 83 requests a second, within the per-address limit however fast the machine is: at a
        // faster pace this client would be limited too, and rightly so.
        legitimate_requests: 1_000,
        legitimate_interval: Duration::from_millis(12),
        legitimate_deadline: Duration::from_secs(2),
        limit: Duration::from_secs(60),
    };
    let report = flood(proxy.address, &plan).await;
    let memory_after = resident_memory();
    eprintln!("{report:?}");

    assert_eq!(report.legitimate_sent, 1_000, "{report:?}");
    // At least 99.9% of the legitimate requests got a 200 from the backend within 2 s.
    assert!(report.legitimate_ok >= 999, "{report:?}");

    // What reached the backend from the attackers is within what their limits allow: a burst
    // and the rate for as long as the flood ran (in fact far less: each was banned).
    let from_attackers = backend
        .requests()
        .iter()
        .filter(|request| request.uri.path() == "/attack")
        .count() as u64;
    let allowed = attackers.len() as u64 * (BURST + RATE * report.elapsed.as_secs().max(1));
    assert!(from_attackers <= allowed, "{from_attackers} > {allowed}");
    assert!(from_attackers >= 1, "the attack reached the proxy at all");
    let text = proxy.scrape().await;
    let bans = metric(&text, "bouncer_bans_total").unwrap_or(0.0);
    assert!(bans >= 1.0, "attackers were banned: {text}");
    // The proxy (and this test, which shares its process) stayed within a small memory budget.
    let grown = memory_after.saturating_sub(memory_before);
    assert!(grown < 200 << 20, "memory grew by {} MiB", grown >> 20);
}
