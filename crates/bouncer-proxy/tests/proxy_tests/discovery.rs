//! Backends named by host names: looked up at start and every `resolve_interval` at a DNS server
//! the test runs, addresses that appear become backends, those that vanish are drained, and a
//! failed lookup keeps the last good set.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bouncer_testkit::{Backend, Clients, DnsServer, TestProxy, eventually};
use tokio::net::TcpListener;

/// Three backends on one port at 127.0.0.1, .2 and .3, as one name's addresses would be.
async fn backends_on_one_port() -> (u16, Vec<Backend>) {
    'attempt: for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for host in [2, 3] {
            match TcpListener::bind(SocketAddr::from(([127, 0, 0, host], port))).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => continue 'attempt,
            }
        }
        let backends = listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| Backend::serve(listener, index + 1))
            .collect();
        return (port, backends);
    }
    panic!("no port free on 127.0.0.1, .2 and .3");
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

fn config(dns: &DnsServer, port: u16) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["app.test:{port}"]
resolve_interval = "50ms"

[resolver]
nameservers = ["{dns}"]
timeout = "500ms"

[access_log]
format = "off"
"#,
        dns = dns.address
    )
}

/// Sends `count` requests and returns the backends' answers.
async fn answers(clients: &Clients, url: &str, count: usize) -> Vec<String> {
    let mut answers = Vec::with_capacity(count);
    for _ in 0..count {
        let answer = clients.get(url).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        answers.push(answer.text());
    }
    answers
}

#[tokio::test]
async fn backends_follow_the_names_addresses() {
    let (port, backends) = backends_on_one_port().await;
    let dns = DnsServer::start().await;
    dns.set("app.test", &[ip(2)]);
    let proxy = TestProxy::start(&config(&dns, port)).await;
    let clients = Clients::new();
    let url = proxy.url("/");
    for answer in answers(&clients, &url, 10).await {
        assert_eq!(answer, "backend 2\n");
    }

    // A new address becomes a backend.
    dns.set("app.test", &[ip(2), ip(3)]);
    eventually(
        Duration::from_secs(5),
        "the new address takes requests",
        || async {
            answers(&clients, &url, 4)
                .await
                .iter()
                .any(|answer| answer == "backend 3\n")
        },
    )
    .await;

    // An address that vanishes is drained: its request in flight finishes, new ones go elsewhere.
    let slow = {
        let clients = clients.clone();
        let url = proxy.url("/delay/300");
        tokio::spawn(async move {
            // Round robin over two: one of the two requests lands on each backend.
            let (first, second) = tokio::join!(clients.get(&url), clients.get(&url));
            (first, second)
        })
    };
    eventually(
        Duration::from_secs(5),
        "both backends have a slow request",
        || async {
            backends[1]
                .requests()
                .iter()
                .any(|request| request.uri.path() == "/delay/300")
                && backends[2]
                    .requests()
                    .iter()
                    .any(|request| request.uri.path() == "/delay/300")
        },
    )
    .await;
    dns.set("app.test", &[ip(3)]);
    eventually(
        Duration::from_secs(5),
        "only the remaining address takes requests",
        || async {
            answers(&clients, &url, 6)
                .await
                .iter()
                .all(|answer| answer == "backend 3\n")
        },
    )
    .await;
    let (first, second) = slow.await.unwrap();
    assert_eq!(first.status, 200, "a drained request failed");
    assert_eq!(second.status, 200, "a drained request failed");

    // A failing lookup keeps the last good set.
    dns.set_failing(true);
    let asked = dns.queries();
    eventually(Duration::from_secs(5), "the proxy asks again", || async {
        dns.queries() >= asked + 4
    })
    .await;
    for answer in answers(&clients, &url, 10).await {
        assert_eq!(answer, "backend 3\n");
    }
    assert_eq!(backends[0].count(), 0, "127.0.0.1 was never named");
}
