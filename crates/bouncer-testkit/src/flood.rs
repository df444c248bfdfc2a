//! A bounded flood on loopback: attackers on many addresses of 127.0.0.0/8 sending as fast as they
//! can, and one legitimate client at a modest, steady rate, for as long as the legitimate client
//! needs. Every loop stops by itself: when the legitimate client is done, or at the deadline.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::time::Instant;

use crate::{BoxBody, empty};

/// What to send.
#[derive(Debug, Clone)]
pub struct FloodPlan {
    /// Attacker addresses, each in 127.0.0.0/8.
    pub attackers: Vec<IpAddr>,
    /// Connections each attacker keeps going at once.
    pub connections_per_attacker: usize,
    /// The legitimate client's address.
    pub legitimate: IpAddr,
    pub legitimate_requests: usize,
    /// The legitimate client's pace.
    pub legitimate_interval: Duration,
    /// A legitimate request slower than this counts as failed.
    pub legitimate_deadline: Duration,
    /// The whole flood stops by this time, whatever happened.
    pub limit: Duration,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct FloodReport {
    pub legitimate_sent: usize,
    /// Legitimate requests answered 200 within the deadline.
    pub legitimate_ok: usize,
    /// The slowest legitimate answers, sorted: their 99th percentile is `legitimate_p99`.
    pub legitimate_p99: Duration,
    pub attacker_requests: u64,
    /// Attacker requests answered 200 (they reached a backend).
    pub attacker_ok: u64,
    /// Attacker connections the proxy refused or closed.
    pub attacker_refused_connections: u64,
    pub elapsed: Duration,
}

/// Runs `plan` against `proxy` (an HTTP/1.1 listener).
pub async fn flood(proxy: SocketAddr, plan: &FloodPlan) -> FloodReport {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = started + plan.limit;
    let mut attackers = Vec::new();
    for &address in &plan.attackers {
        for _ in 0..plan.connections_per_attacker {
            attackers.push(tokio::spawn(attack(
                proxy,
                address,
                deadline,
                Arc::clone(&stop),
                Arc::clone(&requests),
                Arc::clone(&ok),
                Arc::clone(&refused),
            )));
        }
    }

    let mut latencies = Vec::with_capacity(plan.legitimate_requests);
    let mut legitimate_ok = 0;
    let mut sender = None;
    let mut next = Instant::now();
    for index in 0..plan.legitimate_requests {
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep_until(next).await;
        next += plan.legitimate_interval;
        let sent = Instant::now();
        let outcome = tokio::time::timeout(
            plan.legitimate_deadline,
            legitimate_request(proxy, plan.legitimate, &mut sender, index),
        )
        .await;
        let took = sent.elapsed();
        latencies.push(took);
        match outcome {
            Ok(Some(200)) => legitimate_ok += 1,
            // A failed or slow request costs its connection; the next one opens another.
            _ => sender = None,
        }
    }
    stop.store(true, Ordering::Release);
    for attacker in attackers {
        // Each attacker stops at its next step; one stuck in a step is not waited for long.
        let abort = attacker.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), attacker)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    latencies.sort_unstable();
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    FloodReport {
        legitimate_sent: latencies.len(),
        legitimate_ok,
        legitimate_p99: p99,
        attacker_requests: requests.load(Ordering::Acquire),
        attacker_ok: ok.load(Ordering::Acquire),
        attacker_refused_connections: refused.load(Ordering::Acquire),
        elapsed: started.elapsed(),
    }
}

type Sender = hyper::client::conn::http1::SendRequest<BoxBody>;

async fn connect_from(from: IpAddr, proxy: SocketAddr) -> Option<Sender> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    let stream = socket.connect(proxy).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// One request and its whole answer; the status, or `None` when the exchange failed.
async fn exchange(sender: &mut Sender, path: &str) -> Option<u16> {
    sender.ready().await.ok()?;
    let request = Request::get(path)
        .header(http::header::HOST, "app")
        .body(empty())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    response.into_body().collect().await.ok()?;
    Some(status)
}

async fn legitimate_request(
    proxy: SocketAddr,
    from: IpAddr,
    sender: &mut Option<Sender>,
    index: usize,
) -> Option<u16> {
    if sender.as_ref().is_none_or(Sender::is_closed) {
        *sender = Some(connect_from(from, proxy).await?);
    }
    let current = sender.as_mut()?;
    exchange(current, &format!("/legitimate/{index}")).await
}

async fn attack(
    proxy: SocketAddr,
    from: IpAddr,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) {
    let mut sender: Option<Sender> = None;
    while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
        if sender.as_ref().is_none_or(Sender::is_closed) {
            // Every step is bounded by the deadline: a connect whose SYN is dropped would
            // otherwise wait minutes.
            sender = tokio::time::timeout_at(deadline, connect_from(from, proxy))
                .await
                .ok()
                .flatten();
            if sender.is_none() {
                refused.fetch_add(1, Ordering::Relaxed);
                // Refused at the door: knock again shortly, as a flood does, without spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let Some(current) = sender.as_mut() else {
            continue;
        };
        requests.fetch_add(1, Ordering::Relaxed);
        let answered = tokio::time::timeout_at(deadline, exchange(current, "/attack"))
            .await
            .ok()
            .flatten();
        match answered {
            Some(200) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {}
            None => {
                refused.fetch_add(1, Ordering::Relaxed);
                sender = None;
            }
        }
    }
}

/// This process's resident memory, in bytes (from /proc).
pub fn resident_memory() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let kib = line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?;
                kib.trim().parse::<u64>().ok()
            })
        })
        .map_or(0, |kib| kib * 1024)
}
