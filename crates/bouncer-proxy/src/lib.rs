//! Bouncer's I/O: listeners, the request pipeline, upstream pools, metrics and the admin API.
//!
//! [`start`] binds every socket of a validated config and serves it until [`RunningProxy::shutdown`].

mod access_log;
pub mod acme;
mod admin;
mod balance;
mod body;
mod buffers;
pub mod cache;
mod clock;
pub mod cluster;
mod conn;
mod dashboard;
mod date;
pub mod demo;
mod error;
mod h1client;
mod h1server;
mod headers;
mod health;
mod latency;
mod listener;
mod metrics;
mod pipeline;
mod pool;
pub mod protection;
mod raw_fields;
mod reload;
mod resolve;
mod routing;
mod sticky;
pub mod tls;
mod upgrade;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use bouncer_config::Config;

pub use error::{ProxyError, Refusal, Side};
pub use metrics::Metrics;
pub use reload::{ReloadError, ReloadReport};
pub use upgrade::{Inherited, UpgradeError, take_over};

use crate::access_log::AccessLog;
use crate::listener::{Lifecycle, ListenerRuntime};
use crate::resolve::Resolver;
use crate::upstream::Upstream;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address} (listener \"{listener}\")")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream \"{upstream}\" has a server address that is not a valid URI authority")]
    BadServerAddress {
        upstream: String,
        #[source]
        source: http::Error,
    },
    #[error("cannot set up TLS on listener \"{listener}\"")]
    Tls {
        listener: String,
        #[source]
        source: tls::TlsSetupError,
    },
    #[error("cannot set up TLS to the backends of upstream \"{upstream}\"")]
    UpstreamTls {
        upstream: String,
        #[source]
        source: tls::TlsSetupError,
    },
    #[error("cannot set up the DNS resolver of [resolver]")]
    Resolver(#[source] std::io::Error),
    #[error("cannot start the access log ({target})")]
    AccessLog {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up [protection] or [[rules]]")]
    Protection(#[source] protection::ProtectionError),
    #[error("cache")]
    Cache(#[source] cache::DiskError),
    #[error("cannot set up the upgrade socket {}", path.display())]
    UpgradeSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the admin token from {}", path.display())]
    AdminToken {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "protection.max_connections = {max} needs about {needed} open files (a client's and a backend's per connection), but this process may open at most {limit}: lower it, or raise the limit (ulimit -n, LimitNOFILE=)"
    )]
    ConnectionBudget { max: u32, needed: u64, limit: u64 },
}

/// Checks `protection.max_connections` against the open-file limit the process can reach: each
/// proxied connection may hold two descriptors, and some are needed besides.
pub fn check_connection_budget(config: &Config) -> Result<(), StartError> {
    let Some(max) = config.protection.max_connections else {
        return Ok(());
    };
    let Ok((_, hard)) = rlimit::Resource::NOFILE.get() else {
        return Ok(());
    };
    let needed = u64::from(max) * 2 + 128;
    if needed > hard {
        return Err(StartError::ConnectionBudget {
            max,
            needed,
            limit: hard,
        });
    }
    Ok(())
}

/// Sets the process's log filter (`info`, `debug,hyper=info`, ...); given by the binary, which
/// owns the logger. Returns why a filter was refused.
pub type LogFilterSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The log filter control the admin API uses, with the filter in force.
pub(crate) struct LogControl {
    pub set: LogFilterSetter,
    pub current: std::sync::Mutex<String>,
}

/// What one config built, as the admin API sees it.
pub(crate) struct Snapshot {
    pub config: Arc<Config>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub listeners: Vec<(String, SocketAddr)>,
    pub runtimes: Vec<Arc<ListenerRuntime>>,
    pub protection: Arc<protection::Protection>,
    pub cache: Option<Arc<cache::Cache>>,
    pub access_log: AccessLog,
}

/// A proxy serving its listeners. Dropping it without [`RunningProxy::shutdown`] closes everything.
pub struct RunningProxy {
    /// After a start that took sockets over: the line to tell the previous process to drain.
    takeover: std::sync::Mutex<Option<upgrade::Inherited>>,
    listeners: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    lifecycle: Arc<watch::Sender<Lifecycle>>,
    /// Told when another process took the listening sockets over.
    handed_over: Arc<HandOver>,
    metrics: Arc<Metrics>,
    live: Arc<ArcSwap<Snapshot>>,
    reloader: Arc<reload::Reloader>,
    /// The access log at start, which SIGUSR1 reopens (a reload that changes the log starts
    /// another writer, reopened through the live snapshot).
    access_log: AccessLog,
    log_control: Arc<arc_swap::ArcSwapOption<LogControl>>,
}

/// Whether, and to which process, the listening sockets were handed over.
#[derive(Default)]
struct HandOver {
    done: tokio::sync::Notify,
    to_pid: std::sync::atomic::AtomicU32,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every connection finished within the grace period.
    pub drained: bool,
}

impl RunningProxy {
    /// The addresses banned now, with the time left on each.
    pub fn bans(&self) -> Vec<(std::net::IpAddr, Duration)> {
        self.live.load().protection.bans()
    }

    /// The config file the proxy runs from now.
    pub fn config_file(&self) -> std::path::PathBuf {
        self.live.load().config.source.clone()
    }

    /// Reads and validates the config file again and applies it; on any error the running config
    /// stays and the error says why.
    pub async fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        self.reloader.reload_from_file().await
    }

    /// Applies `config` (already validated); on any error the running config stays.
    pub async fn reload(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        self.reloader.reload(config).await
    }

    /// Lifts the ban on `ip`, on every instance of a cluster; tells whether it was banned here.
    pub fn unban(&self, ip: std::net::IpAddr) -> bool {
        self.live.load().protection.unban(ip)
    }

    /// Lets the admin API read and change the log filter, which is `current` now.
    pub fn set_log_filter_control(&self, current: &str, set: LogFilterSetter) {
        self.log_control.store(Some(Arc::new(LogControl {
            set,
            current: std::sync::Mutex::new(current.to_string()),
        })));
    }

    /// The log filter in force, when the admin API may change it.
    pub fn log_filter(&self) -> Option<String> {
        self.log_control.load().as_ref().map(|control| {
            control
                .current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// Reopens the access log file (after logrotate moved it away); nothing for standard output.
    pub fn reopen_logs(&self) {
        self.access_log.reopen();
        self.live.load().access_log.reopen();
    }

    /// Whether the cluster's Redis answers now (`None` without `[cluster]`).
    pub fn cluster_up(&self) -> Option<bool> {
        self.live
            .load()
            .protection
            .cluster()
            .map(|cluster| cluster.is_up())
    }

    /// The bound address of the named listener (useful with port 0).
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(listener, _)| listener == name)
            .map(|(_, address)| *address)
    }

    pub fn listener_addresses(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// After a start that took the listening sockets over, tells the previous process that this
    /// one serves, so that it stops accepting and drains. Call it once nothing that can fail is
    /// left (systemd told of the new main process, say): until then both processes serve.
    pub async fn complete_takeover(&self) {
        let inherited = self
            .takeover
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(inherited) = inherited else {
            return;
        };
        match tokio::task::spawn_blocking(move || inherited.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "the previous process did not acknowledge the takeover; both serve until it exits");
            }
            Err(error) => tracing::warn!(%error, "the takeover acknowledgement failed"),
        }
    }

    /// Resolves when a new process has taken the listening sockets over (see [`upgrade`]), with
    /// its process id; this process has stopped accepting by then and should
    /// [`finish_handover`](Self::finish_handover).
    pub async fn handed_over(&self) -> u32 {
        self.handed_over.done.notified().await;
        // Kept for a second caller, who would otherwise wait forever.
        self.handed_over.done.notify_one();
        self.handed_over
            .to_pid
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// After a handover: waits for the connections left to end (each closes after its next
    /// answer, or at the idle timeout), for at most the idle timeout plus the shutdown grace,
    /// then closes what is left.
    pub async fn finish_handover(self) -> ShutdownReport {
        let server = &self.live.load().config.server;
        let wait = server.idle_timeout + server.shutdown_grace;
        let drained = tokio::time::timeout(wait, self.lifecycle.closed())
            .await
            .is_ok();
        self.lifecycle.send_replace(Lifecycle::Closing);
        ShutdownReport { drained }
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, then closes what
    /// is left.
    pub async fn shutdown(self) -> ShutdownReport {
        self.lifecycle.send_replace(Lifecycle::Draining);
        let grace = self.live.load().config.server.shutdown_grace;
        let drained = tokio::time::timeout(grace, self.lifecycle.closed())
            .await
            .is_ok();
        self.lifecycle.send_replace(Lifecycle::Closing);
        ShutdownReport { drained }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.lifecycle.send_replace(Lifecycle::Closing);
    }
}

/// What a start may be given besides the config.
#[derive(Default)]
pub struct StartOptions {
    /// The log filter in force and how to change it, for the admin API.
    pub log_filter: Option<(String, LogFilterSetter)>,
    /// Listening sockets taken over from the process this one replaces ([`upgrade::take_over`]).
    pub inherited: Option<upgrade::Inherited>,
}

/// Binds every listener of `config` and starts serving. Must run inside a Tokio runtime.
pub async fn start(config: &Config) -> Result<RunningProxy, StartError> {
    start_with(config, StartOptions::default()).await
}

/// Like [`start`], with a log filter control and, for an upgrade, the sockets of the process
/// this one replaces: it serves on those instead of binding, then tells that process to drain.
pub async fn start_with(
    config: &Config,
    options: StartOptions,
) -> Result<RunningProxy, StartError> {
    check_connection_budget(config)?;
    let StartOptions {
        log_filter,
        mut inherited,
    } = options;
    let metrics = Metrics::new();
    let resolver = Arc::new(Resolver::new(&config.resolver).map_err(StartError::Resolver)?);
    let (lifecycle, lifecycle_receiver) = watch::channel(Lifecycle::Running);
    // Every socket is bound first, so that a redirect can name the port its HTTPS listener got,
    // and a bad address fails the start before anything is served.
    let mut bound = Vec::with_capacity(config.listeners.len());
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for listener_config in &config.listeners {
        let bind_error = |source| StartError::Bind {
            listener: listener_config.name.clone(),
            address: listener_config.bind,
            source,
        };
        let socket = match inherited
            .as_mut()
            .and_then(|inherited| inherited.take(&listener_config.name))
        {
            Some(socket) => listener::adopt(socket, listener_config.bind),
            None => listener::bind(listener_config.bind),
        }
        .map_err(bind_error)?;
        let address = socket.local_addr().map_err(bind_error)?;
        bound.push((listener_config.name.clone(), address));
        sockets.push(socket);
    }
    // The answers to ACME challenges in progress: one set for the process, since the CA checks
    // http-01 on a plain listener for a TLS listener's certificate.
    let acme_challenges = config
        .listeners
        .iter()
        .any(|listener| listener.tls.as_ref().is_some_and(|tls| tls.acme.is_some()))
        .then(|| Arc::new(acme::AcmeChallenges::default()));
    let shared = reload::Shared {
        metrics: Arc::clone(&metrics),
        resolver,
        acme_challenges: acme_challenges.clone(),
        bound: bound.clone(),
    };
    let snapshot = reload::build(config, None, &shared).await?;
    // Certificates from ACME are renewed for as long as the listener runs.
    for (listener_config, runtime) in config.listeners.iter().zip(&snapshot.runtimes) {
        if let (Some(listener_tls), Some(acme_config), Some(challenges)) = (
            &runtime.tls,
            listener_config
                .tls
                .as_ref()
                .and_then(|tls| tls.acme.as_ref()),
            &acme_challenges,
        ) {
            acme::start(
                &listener_config.name,
                acme_config,
                &listener_tls.resolver,
                challenges,
                metrics.acme_certificates(&listener_config.name),
                lifecycle_receiver.clone(),
            );
        }
    }
    let slots: Vec<Arc<ArcSwap<ListenerRuntime>>> = snapshot
        .runtimes
        .iter()
        .map(|runtime| Arc::new(ArcSwap::new(Arc::clone(runtime))))
        .collect();
    let access_log = snapshot.access_log.clone();
    let live = Arc::new(ArcSwap::from_pointee(snapshot));
    let reloader = Arc::new(reload::Reloader {
        shared,
        live: Arc::clone(&live),
        slots: slots.clone(),
        busy: tokio::sync::Mutex::new(()),
    });
    let log_control = Arc::new(arc_swap::ArcSwapOption::from(log_filter.map(
        |(current, set)| {
            Arc::new(LogControl {
                set,
                current: std::sync::Mutex::new(current),
            })
        },
    )));
    let sockets: Vec<Arc<tokio::net::TcpListener>> = sockets.into_iter().map(Arc::new).collect();
    // What a takeover hands to the next process: every listener, by name.
    let mut handed: Vec<(String, Arc<tokio::net::TcpListener>)> = config
        .listeners
        .iter()
        .map(|listener| listener.name.clone())
        .zip(sockets.iter().cloned())
        .collect();
    let admin = match &config.admin {
        Some(admin) => {
            let token = admin
                .token_file
                .as_ref()
                .map(|path| read_token(path))
                .transpose()?;
            let bind_error = |source| StartError::Bind {
                listener: "admin".into(),
                address: admin.bind,
                source,
            };
            let socket = match inherited
                .as_mut()
                .and_then(|inherited| inherited.take(upgrade::ADMIN))
            {
                Some(socket) => listener::adopt(socket, admin.bind),
                None => listener::bind(admin.bind),
            }
            .map_err(bind_error)?;
            let socket = Arc::new(socket);
            handed.push((upgrade::ADMIN.to_string(), Arc::clone(&socket)));
            let address = socket.local_addr().map_err(bind_error)?;
            let state = admin::AdminState {
                metrics: Arc::clone(&metrics),
                live: Arc::clone(&live),
                reloader: Arc::clone(&reloader),
                log_control: Arc::clone(&log_control),
                token,
                hosts: admin.hosts.clone(),
                address,
                started: std::time::Instant::now(),
                dashboard: dashboard::Dashboard::default(),
            };
            let state = Arc::new(state);
            tokio::spawn(dashboard::run(
                Arc::clone(&state),
                lifecycle_receiver.clone(),
            ));
            tokio::spawn(admin::serve(socket, state, lifecycle_receiver.clone()));
            Some(address)
        }
        None => None,
    };
    for (socket, slot) in sockets.into_iter().zip(slots) {
        tokio::spawn(listener::accept_loop(
            socket,
            slot,
            lifecycle_receiver.clone(),
        ));
    }
    // Serving now: the process this one replaces may stop accepting.
    let upgrade_socket = config.server.upgrade_socket.clone();
    let takeover_from = inherited.as_ref().map(|inherited| inherited.previous_pid);
    if config.server.watch_config {
        tokio::spawn(reload::watch_config_file(
            Arc::downgrade(&reloader),
            lifecycle_receiver.clone(),
        ));
    }
    let handed_over = Arc::new(HandOver::default());
    if let Some(path) = upgrade_socket {
        let unix = if takeover_from.is_some() {
            upgrade::bind_replacing(&path)
        } else {
            upgrade::bind(&path)
        }
        .map_err(|source| StartError::UpgradeSocket {
            path: path.clone(),
            source,
        })?;
        let lifecycle_sender = lifecycle.clone();
        let handover = Arc::clone(&handed_over);
        let watching = lifecycle_receiver.clone();
        tokio::spawn(async move {
            if let Some(pid) = upgrade::serve(unix, handed, watching).await {
                lifecycle_sender.send_replace(Lifecycle::HandingOver);
                tracing::info!(
                    new_pid = pid,
                    "a new process took over the listening sockets; draining"
                );
                handover
                    .to_pid
                    .store(pid, std::sync::atomic::Ordering::Release);
                handover.done.notify_one();
            }
        });
    }
    drop(lifecycle_receiver);

    for (name, address) in &bound {
        tracing::info!(listener = %name, %address, "listening");
    }
    if let Some(address) = admin {
        tracing::info!(listener = "admin", %address, "admin API listening");
    }
    if let Some(pid) = takeover_from {
        tracing::info!(
            previous_pid = pid,
            "took the listening sockets over; the previous process drains"
        );
    }
    Ok(RunningProxy {
        takeover: std::sync::Mutex::new(inherited),
        listeners: bound,
        admin,
        lifecycle: Arc::new(lifecycle),
        handed_over,
        metrics,
        live,
        reloader,
        access_log,
        log_control,
    })
}

/// Reads the admin API's bearer token: the file's first line, without surrounding space.
fn read_token(path: &std::path::Path) -> Result<String, StartError> {
    let error = |source| StartError::AdminToken {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(error)?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty: put the token on its first line",
        )));
    }
    Ok(token.to_string())
}

/// Raises the soft limit on open files to the hard limit and returns the new soft limit.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Boxes the future that `make` makes. The box is allocated first, so that the compiler can build
/// the future in it rather than on the stack and then copy it: a copy of kilobytes, for every
/// request, where a large future is boxed on the hot path (`bench/instructions` measured 320
/// instructions less a proxied request).
#[inline(always)]
pub(crate) fn boxed_in_place<F: Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}
