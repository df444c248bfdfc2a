//! The live dashboard in a real headless Chromium: it loads from the admin listener, its numbers
//! change as traffic passes, a killed backend turns down on it, and a screenshot is kept.

use std::time::Duration;

use bouncer_testkit::browser::Browser;
use bouncer_testkit::{Backend, Clients, TestProxy};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_traffic_and_a_killed_backend_live() {
    let mut backends = Backend::start_many(2).await;
    let proxy = TestProxy::start(&bouncer_testkit::config_with_upstream_keys(
        &backends,
        "[upstreams.app.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_threshold = 1",
        "",
    ))
    .await;
    let admin = proxy.admin();
    let page_answer = Clients::new().get(&format!("http://{admin}/")).await;
    assert_eq!(page_answer.status, StatusCode::OK);
    assert!(page_answer.text().contains("<title>Bouncer</title>"));
    assert!(
        page_answer
            .header("content-security-policy")
            .is_some_and(|policy| policy.contains("default-src 'none'")),
        "the page loads nothing from elsewhere"
    );

    let browser = Browser::start("dashboard").await;
    let mut page = browser.open(&format!("http://{admin}/")).await;
    page.wait_for(
        Duration::from_secs(10),
        "the page follows the event stream",
        "document.getElementById('live').textContent === 'live'",
    )
    .await;
    page.wait_for(
        Duration::from_secs(10),
        "both backends are listed up",
        "document.querySelectorAll('#backends .state-up').length === 2",
    )
    .await;
    let before = page
        .evaluate("document.getElementById('requests-total').textContent")
        .await;
    assert_eq!(before, "0", "no traffic yet");

    // Traffic: the same open page shows it within a few seconds, without a reload.
    let clients = Clients::new();
    for _ in 0..25 {
        assert_eq!(clients.get(&proxy.url("/")).await.status, StatusCode::OK);
    }
    page.wait_for(
        Duration::from_secs(10),
        "the request count reaches 25",
        "document.getElementById('requests-total').textContent === '25'",
    )
    .await;
    page.wait_for(
        Duration::from_secs(10),
        "requests per second and latency show",
        "parseFloat(document.getElementById('rps').textContent) > 0 \
         && parseFloat(document.getElementById('p99').textContent) > 0",
    )
    .await;

    // A backend dies: the health checks see it, and so does the page.
    let killed = backends.remove(0);
    let address = killed.address.to_string();
    drop(killed);
    page.wait_for(
        Duration::from_secs(10),
        "the killed backend turns down",
        &format!(
            "(document.querySelector('#backends tr[data-address=\"{address}\"] .badge') || {{}}).textContent === 'down'"
        ),
    )
    .await;
    assert_eq!(
        page.evaluate("document.querySelectorAll('#backends .state-up').length")
            .await,
        1,
        "the other backend stays up"
    );

    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    page.screenshot(&screenshot).await;
    let size = std::fs::metadata(&screenshot).unwrap().len();
    assert!(size > 10_000, "a real picture: {size} bytes");
    eprintln!("dashboard screenshot: {}", screenshot.display());
}
