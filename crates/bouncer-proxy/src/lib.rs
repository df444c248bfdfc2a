//! Bouncer's I/O: listeners, the request pipeline, upstream pools, metrics and the admin API.
//!
//! [`start`] binds every socket of a validated config and serves it until [`RunningProxy::shutdown`].

mod access_log;
pub mod acme;
mod admin;
mod balance;
mod body;
pub mod cache;
pub mod cluster;
mod conn;
pub mod demo;
mod error;
mod headers;
mod health;
mod listener;
mod metrics;
mod pipeline;
mod pool;
pub mod protection;
mod resolve;
mod routing;
mod sticky;
pub mod tls;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use bouncer_config::Config;

pub use error::{ProxyError, Refusal, Side};
pub use metrics::Metrics;

use crate::access_log::AccessLog;
use crate::listener::{Lifecycle, ListenerRuntime};
use crate::resolve::Resolver;
use crate::routing::{Route, RouteTable};
use crate::tls::ListenerTls;
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
}

/// A proxy serving its listeners. Dropping it without [`RunningProxy::shutdown`] closes everything.
pub struct RunningProxy {
    listeners: Vec<(String, SocketAddr)>,
    admin: Option<SocketAddr>,
    lifecycle: watch::Sender<Lifecycle>,
    grace: Duration,
    metrics: Arc<Metrics>,
    protection: Arc<protection::Protection>,
    access_log: AccessLog,
    log_control: Arc<arc_swap::ArcSwapOption<LogControl>>,
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
        self.protection.bans()
    }

    /// Lifts the ban on `ip`, on every instance of a cluster; tells whether it was banned here.
    pub fn unban(&self, ip: std::net::IpAddr) -> bool {
        self.protection.unban(ip)
    }

    /// Lets the admin API read and change the log filter, which is `current` now.
    pub fn set_log_filter_control(&self, current: &str, set: LogFilterSetter) {
        self.log_control.store(Some(Arc::new(LogControl {
            set,
            current: std::sync::Mutex::new(current.to_string()),
        })));
    }

    /// Reopens the access log file (after logrotate moved it away); nothing for standard output.
    pub fn reopen_logs(&self) {
        self.access_log.reopen();
    }

    /// Whether the cluster's Redis answers now (`None` without `[cluster]`).
    pub fn cluster_up(&self) -> Option<bool> {
        self.protection.cluster().map(|cluster| cluster.is_up())
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

    /// Stops accepting, lets in-flight requests finish within the grace period, then closes what
    /// is left.
    pub async fn shutdown(self) -> ShutdownReport {
        self.lifecycle.send_replace(Lifecycle::Draining);
        let drained = tokio::time::timeout(self.grace, self.lifecycle.closed())
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

/// Binds every listener of `config` and starts serving. Must run inside a Tokio runtime.
pub async fn start(config: &Config) -> Result<RunningProxy, StartError> {
    check_connection_budget(config)?;
    let metrics = Metrics::new();
    let protection = protection::Protection::new(
        &config.protection,
        &config.rate_limits,
        &config.rules,
        config.cluster.as_ref(),
        Some(metrics.protection()),
    )
    .map_err(StartError::Protection)?;
    // A Redis that answers is used from the first request; one that does not is tried again in
    // the background while each instance enforces its limits alone.
    if let (Some(cluster), Some(cluster_config)) = (protection.cluster(), &config.cluster) {
        cluster.wait_until_up(cluster_config.timeout).await;
    }
    let access_log = AccessLog::start(
        config.access_log.format,
        config.access_log.path.as_deref(),
        metrics.access_log_dropped().clone(),
    )
    .map_err(|source| StartError::AccessLog {
        target: config.access_log.path.as_ref().map_or_else(
            || "standard output".to_string(),
            |path| path.display().to_string(),
        ),
        source,
    })?;
    let resolver = Arc::new(Resolver::new(&config.resolver).map_err(StartError::Resolver)?);
    let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
    for upstream in &config.upstreams {
        let placements = resolve::resolve_servers(upstream, &resolver, &[]).await;
        let tls = upstream
            .tls
            .as_ref()
            .map(|tls| tls::UpstreamTls::new(tls).map(Arc::new))
            .transpose()
            .map_err(|source| StartError::UpstreamTls {
                upstream: upstream.name.clone(),
                source,
            })?;
        let pool = Upstream::new(upstream, &metrics, None, &placements, tls).map_err(|source| {
            StartError::BadServerAddress {
                upstream: upstream.name.clone(),
                source,
            }
        })?;
        let pool = Arc::new(pool);
        pool.start_tasks();
        if upstream.has_host_names() {
            tokio::spawn(resolve::refresh_loop(
                Arc::downgrade(&pool),
                Arc::clone(&resolver),
            ));
        }
        upstreams.insert(upstream.name.as_str(), pool);
    }

    let (lifecycle, lifecycle_receiver) = watch::channel(Lifecycle::Running);
    // Every socket is bound first, so that a redirect can name the port its HTTPS listener got.
    let mut bound = Vec::with_capacity(config.listeners.len());
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for listener_config in &config.listeners {
        let bind_error = |source| StartError::Bind {
            listener: listener_config.name.clone(),
            address: listener_config.bind,
            source,
        };
        let socket = listener::bind(listener_config.bind).map_err(bind_error)?;
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
    // One cache for the whole process, when some route caches.
    let cache = config
        .routes
        .iter()
        .any(|route| route.cache.is_some())
        .then(|| cache::Cache::new(&config.cache, metrics.cache()))
        .transpose()
        .map_err(StartError::Cache)?;
    let mut runtimes = Vec::with_capacity(config.listeners.len());
    for (listener_config, socket) in config.listeners.iter().zip(sockets) {
        let routes = config
            .routes
            .iter()
            .filter(|route| {
                route.listeners.is_empty() || route.listeners.contains(&listener_config.name)
            })
            .filter_map(|route| {
                let upstream = upstreams.get(route.upstream.as_str())?;
                let route_cache =
                    route
                        .cache
                        .as_ref()
                        .zip(cache.as_ref())
                        .map(|(route_cache, cache)| {
                            cache::RouteCache::new(
                                Arc::clone(cache),
                                route_cache,
                                metrics.route_cache(&route.name),
                            )
                        });
                Some(Arc::new(Route::new(
                    route,
                    Arc::clone(upstream),
                    metrics.route(&listener_config.name, &route.name),
                    route_cache,
                )))
            })
            .collect();
        let tls = listener_config
            .tls
            .as_ref()
            .map(|tls| {
                let reloads = metrics.certificate_reloads(&listener_config.name);
                ListenerTls::new(
                    &listener_config.name,
                    tls,
                    Some(reloads),
                    acme_challenges.clone(),
                )
            })
            .transpose()
            .map_err(|source| StartError::Tls {
                listener: listener_config.name.clone(),
                source,
            })?;
        if let (Some(listener_tls), Some(acme_config), Some(challenges)) = (
            &tls,
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
        let redirect_https_port = listener_config
            .redirect_to_https
            .as_ref()
            .and_then(|target| {
                bound
                    .iter()
                    .find(|(name, _)| name == target)
                    .map(|(_, address)| address.port())
            });
        let runtime = Arc::new(ListenerRuntime {
            tls,
            redirect_https_port,
            acme_challenges: acme_challenges.clone(),
            protection: Arc::clone(&protection),
            name: listener_config.name.as_str().into(),
            config: listener_config.clone(),
            routes: RouteTable::new(routes),
            server: config.server.clone(),
            metrics: {
                let mut listener_metrics = metrics.listener(&listener_config.name);
                if listener_config.tls.is_some() {
                    listener_metrics.handshakes =
                        Some(metrics.tls_handshakes(&listener_config.name));
                }
                Arc::new(listener_metrics)
            },
            access_log: access_log.clone(),
        });
        runtimes.push((socket, runtime));
    }
    let live = Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot {
        config: Arc::new(config.clone()),
        upstreams: config
            .upstreams
            .iter()
            .filter_map(|upstream| upstreams.get(upstream.name.as_str()).cloned())
            .collect(),
        listeners: bound.clone(),
        runtimes: runtimes
            .iter()
            .map(|(_, runtime)| Arc::clone(runtime))
            .collect(),
    }));
    let log_control = Arc::new(arc_swap::ArcSwapOption::empty());
    let admin = match &config.admin {
        Some(admin) => {
            let token = admin
                .token_file
                .as_ref()
                .map(|path| read_token(path))
                .transpose()?;
            let socket = listener::bind(admin.bind).map_err(|source| StartError::Bind {
                listener: "admin".into(),
                address: admin.bind,
                source,
            })?;
            let address = socket.local_addr().map_err(|source| StartError::Bind {
                listener: "admin".into(),
                address: admin.bind,
                source,
            })?;
            let state = admin::AdminState {
                metrics: Arc::clone(&metrics),
                protection: Arc::clone(&protection),
                cache: cache.clone(),
                live: Arc::clone(&live),
                log_control: Arc::clone(&log_control),
                token,
                hosts: admin.hosts.clone(),
                address,
                started: std::time::Instant::now(),
            };
            tokio::spawn(admin::serve(
                socket,
                Arc::new(state),
                lifecycle_receiver.clone(),
            ));
            Some(address)
        }
        None => None,
    };
    // Sockets are all bound before any is served, so that a bad address fails the start cleanly.
    for (socket, runtime) in runtimes {
        tokio::spawn(listener::accept_loop(
            socket,
            runtime,
            lifecycle_receiver.clone(),
        ));
    }
    drop(lifecycle_receiver);

    for (name, address) in &bound {
        tracing::info!(listener = %name, %address, "listening");
    }
    if let Some(address) = admin {
        tracing::info!(listener = "admin", %address, "admin API listening");
    }
    Ok(RunningProxy {
        listeners: bound,
        admin,
        lifecycle,
        grace: config.server.shutdown_grace,
        metrics,
        protection,
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
