//! Building what a config describes, at start and again on a reload.
//!
//! A reload validates the new config, then builds a new [`Snapshot`] from it while taking over
//! what the old one holds and the new one keeps: an upstream whose config is unchanged is the same
//! object (its pools, health and balancer state); a changed upstream keeps the backends it still
//! has, with their connections and health; the protection layer is kept when its sections are
//! unchanged, and otherwise rebuilt with every ban carried over; the cache, the metrics and the
//! listening sockets are never rebuilt. Only when everything is built is the snapshot swapped in:
//! requests already in flight finish with the config they started with, and every later request,
//! on new and kept-alive connections alike, uses the new one.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bouncer_config::Config;

use crate::access_log::AccessLog;
use crate::listener::ListenerRuntime;
use crate::metrics::Metrics;
use crate::protection::Protection;
use crate::resolve::Resolver;
use crate::routing::{Route, RouteTable};
use crate::tls::ListenerTls;
use crate::upstream::Upstream;
use crate::{Snapshot, StartError, acme, cache, resolve, tls};

/// What outlives every config: built once at start.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    pub resolver: Arc<Resolver>,
    pub acme_challenges: Option<Arc<acme::AcmeChallenges>>,
    /// Every listener's name and bound address, in config order.
    pub bound: Vec<(String, SocketAddr)>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{section} changed, which a reload cannot apply: restart (or upgrade) to change it; nothing was changed"
    )]
    NeedsRestart { section: &'static str },
    #[error("the new config could not be set up; nothing was changed")]
    Build(#[source] StartError),
}

/// Builds the snapshot `config` describes, taking over from `previous` what it keeps.
pub(crate) async fn build(
    config: &Config,
    previous: Option<&Snapshot>,
    shared: &Shared,
) -> Result<Snapshot, StartError> {
    let metrics = &shared.metrics;
    let protection = match previous {
        Some(previous) if same_protection(&previous.config, config) => {
            Arc::clone(&previous.protection)
        }
        _ => {
            let protection = Protection::new(
                &config.protection,
                &config.rate_limits,
                &config.rules,
                config.cluster.as_ref(),
                Some(metrics.protection()),
                previous.map(|previous| &*previous.protection),
            )
            .map_err(StartError::Protection)?;
            // A Redis that answers is used from the first request; one that does not is tried
            // again in the background while each instance enforces its limits alone.
            if let (Some(cluster), Some(cluster_config)) = (protection.cluster(), &config.cluster) {
                cluster.wait_until_up(cluster_config.timeout).await;
            }
            // Bans and rate-limit counts carry over in `Reloader::reload`, right before the swap,
            // so that none made while the rest is built is lost.
            protection
        }
    };
    let access_log = match previous {
        Some(previous) if previous.config.access_log == config.access_log => {
            previous.access_log.clone()
        }
        _ => AccessLog::start(
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
        })?,
    };
    let mut upstreams: Vec<Arc<Upstream>> = Vec::with_capacity(config.upstreams.len());
    for upstream_config in &config.upstreams {
        let before = previous.and_then(|previous| {
            previous
                .upstreams
                .iter()
                .find(|upstream| *upstream.name == *upstream_config.name)
        });
        if let Some(before) = before
            && before.config == *upstream_config
        {
            upstreams.push(Arc::clone(before));
            continue;
        }
        let known = before.map(|before| before.placements()).unwrap_or_default();
        let placements = resolve::resolve_servers(upstream_config, &shared.resolver, &known).await;
        let tls = upstream_config
            .tls
            .as_ref()
            .map(|tls| tls::UpstreamTls::new(tls).map(Arc::new))
            .transpose()
            .map_err(|source| StartError::UpstreamTls {
                upstream: upstream_config.name.clone(),
                source,
            })?;
        let upstream = Upstream::new(
            upstream_config,
            metrics,
            before.map(AsRef::as_ref),
            &placements,
            tls,
        )
        .map_err(|source| StartError::BadServerAddress {
            upstream: upstream_config.name.clone(),
            source,
        })?;
        let upstream = Arc::new(upstream);
        upstream.start_tasks();
        if upstream_config.has_host_names() {
            tokio::spawn(resolve::refresh_loop(
                Arc::downgrade(&upstream),
                Arc::clone(&shared.resolver),
            ));
        }
        upstreams.push(upstream);
    }
    // One cache for the whole process, made when some route first caches.
    let cache = match previous.and_then(|previous| previous.cache.clone()) {
        Some(cache) => Some(cache),
        None => config
            .routes
            .iter()
            .any(|route| route.cache.is_some())
            .then(|| cache::Cache::new(&config.cache, metrics.cache()))
            .transpose()
            .map_err(StartError::Cache)?,
    };
    let mut runtimes = Vec::with_capacity(config.listeners.len());
    for (index, listener_config) in config.listeners.iter().enumerate() {
        let routes = config
            .routes
            .iter()
            .filter(|route| {
                route.listeners.is_empty() || route.listeners.contains(&listener_config.name)
            })
            .filter_map(|route| {
                let upstream = upstreams
                    .iter()
                    .find(|upstream| *upstream.name == *route.upstream)?;
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
                    metrics.route(&listener_config.name, &route.name, &route.upstream),
                    route_cache,
                )))
            })
            .collect();
        // Listeners do not change on a reload, so their TLS (and its certificate watchers and
        // ACME renewals) carries on.
        let tls = match previous.and_then(|previous| previous.runtimes.get(index)) {
            Some(before) => before.tls.clone(),
            None => new_listener_tls(listener_config, shared)?,
        };
        let redirect_https_port = listener_config
            .redirect_to_https
            .as_ref()
            .and_then(|target| {
                shared
                    .bound
                    .iter()
                    .find(|(name, _)| name == target)
                    .map(|(_, address)| address.port())
            });
        runtimes.push(Arc::new(ListenerRuntime {
            tls,
            redirect_https_port,
            acme_challenges: shared.acme_challenges.clone(),
            protection: Arc::clone(&protection),
            name: listener_config.name.as_str().into(),
            config: listener_config.clone(),
            routes: RouteTable::new(routes),
            server: config.server.clone(),
            metrics: match previous.and_then(|previous| previous.runtimes.get(index)) {
                Some(before) => Arc::clone(&before.metrics),
                None => {
                    let mut listener_metrics = metrics.listener(&listener_config.name);
                    if listener_config.tls.is_some() {
                        listener_metrics.handshakes =
                            Some(metrics.tls_handshakes(&listener_config.name));
                    }
                    Arc::new(listener_metrics)
                }
            },
            access_log: access_log.clone(),
        }));
    }
    Ok(Snapshot {
        config: Arc::new(config.clone()),
        upstreams,
        listeners: shared.bound.clone(),
        runtimes,
        protection,
        cache,
        access_log,
    })
}

fn new_listener_tls(
    listener_config: &bouncer_config::ListenerConfig,
    shared: &Shared,
) -> Result<Option<ListenerTls>, StartError> {
    let Some(tls) = &listener_config.tls else {
        return Ok(None);
    };
    let reloads = shared.metrics.certificate_reloads(&listener_config.name);
    ListenerTls::new(
        &listener_config.name,
        tls,
        Some(reloads),
        shared.acme_challenges.clone(),
    )
    .map(Some)
    .map_err(|source| StartError::Tls {
        listener: listener_config.name.clone(),
        source,
    })
}

fn same_protection(before: &Config, after: &Config) -> bool {
    before.protection == after.protection
        && before.rate_limits == after.rate_limits
        && before.rules == after.rules
        && before.cluster == after.cluster
}

/// The sections a reload cannot change, with the first that differs.
fn needs_restart(before: &Config, after: &Config) -> Option<&'static str> {
    if before.listeners != after.listeners {
        Some("[[listeners]]")
    } else if before.admin != after.admin {
        Some("[admin]")
    } else if before.resolver != after.resolver {
        Some("[resolver]")
    } else if before.server.workers != after.server.workers {
        Some("server.workers")
    } else if before.server.upgrade_socket != after.server.upgrade_socket {
        Some("server.upgrade_socket")
    } else if before.server.watch_config != after.server.watch_config {
        Some("server.watch_config")
    } else if before.cache != after.cache && before.routes.iter().any(|route| route.cache.is_some())
    {
        Some("[cache]")
    } else {
        None
    }
}

/// Applies new configs to a running proxy, one at a time.
pub(crate) struct Reloader {
    pub shared: Shared,
    pub live: Arc<ArcSwap<Snapshot>>,
    /// Each listener's current runtime, which its accept loop and connections read.
    pub slots: Vec<Arc<ArcSwap<ListenerRuntime>>>,
    /// Held for the whole of a reload, so that two never interleave.
    pub busy: tokio::sync::Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Upstreams whose config changed (rebuilt, keeping the backends they still have).
    pub upstreams_changed: Vec<String>,
    /// Whether the protection layer was rebuilt (its bans carried over).
    pub protection_rebuilt: bool,
}

impl Reloader {
    /// Reads and validates the config file the proxy runs from, then applies it.
    pub async fn reload_from_file(&self) -> Result<ReloadReport, ReloadError> {
        let source = self.live.load().config.source.clone();
        let loaded = bouncer_config::load(&source);
        let config = match loaded {
            Ok(config) => config,
            Err(error) => {
                return Err(self.failed(ReloadError::Invalid(error.problems().join("\n"))));
            }
        };
        self.reload(&config).await
    }

    /// Applies `config`, which must be valid; on any error the running config stays.
    pub async fn reload(&self, config: &Config) -> Result<ReloadReport, ReloadError> {
        let _busy = self.busy.lock().await;
        let previous = self.live.load_full();
        if let Some(section) = needs_restart(&previous.config, config) {
            return Err(self.failed(ReloadError::NeedsRestart { section }));
        }
        let snapshot = match build(config, Some(&previous), &self.shared).await {
            Ok(snapshot) => snapshot,
            Err(error) => return Err(self.failed(ReloadError::Build(error))),
        };
        let report = ReloadReport {
            upstreams_changed: snapshot
                .upstreams
                .iter()
                .filter(|upstream| {
                    !previous
                        .upstreams
                        .iter()
                        .any(|before| Arc::ptr_eq(before, upstream))
                })
                .map(|upstream| upstream.name.to_string())
                .collect(),
            protection_rebuilt: !Arc::ptr_eq(&previous.protection, &snapshot.protection),
        };
        if report.protection_rebuilt {
            // No await from here to the swap: every ban made (or lifted) and every request
            // counted until now is taken.
            snapshot.protection.take_state_from(&previous.protection);
        }
        for (slot, runtime) in self.slots.iter().zip(&snapshot.runtimes) {
            slot.store(Arc::clone(runtime));
        }
        self.live.store(Arc::new(snapshot));
        self.shared.metrics.config_reloaded("ok");
        tracing::info!(
            file = %config.source.display(),
            upstreams_changed = ?report.upstreams_changed,
            protection_rebuilt = report.protection_rebuilt,
            "config reloaded"
        );
        Ok(report)
    }

    fn failed(&self, error: ReloadError) -> ReloadError {
        self.shared.metrics.config_reloaded("failed");
        tracing::error!(error = %error, cause = ?std::error::Error::source(&error).map(ToString::to_string), "config reload failed; the running config stays");
        error
    }
}

/// How often the config file is looked at, with `server.watch_config`.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// With `server.watch_config`: reloads the config file whenever its length, modification time or
/// content changes, until the proxy stops. A change that does not load is logged and counted, and
/// the running config stays, as with SIGHUP.
pub(crate) async fn watch_config_file(
    reloader: std::sync::Weak<Reloader>,
    mut lifecycle: tokio::sync::watch::Receiver<crate::listener::Lifecycle>,
) {
    let fingerprint = |path: &std::path::Path| {
        let metadata = std::fs::metadata(path).ok()?;
        let text = std::fs::read(path).ok()?;
        Some((metadata.len(), metadata.modified().ok(), text))
    };
    let Some(path) = reloader
        .upgrade()
        .map(|reloader| reloader.live.load().config.source.clone())
    else {
        return;
    };
    let mut seen = fingerprint(&path);
    loop {
        tokio::select! {
            _ = lifecycle.wait_for(|state| *state != crate::listener::Lifecycle::Running) => return,
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let Some(reloader) = reloader.upgrade() else {
            return;
        };
        tracing::info!(file = %path.display(), "the config file changed: reloading");
        // The outcome is logged and counted by the reload itself.
        let _ = reloader.reload_from_file().await;
    }
}
