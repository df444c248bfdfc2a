//! Route choice: among the routes of a listener, the most specific host match wins (an exact name,
//! then the longest wildcard, then routes without hosts), and within it the longest path prefix
//! that ends on a segment boundary.

use std::sync::Arc;

use bouncer_config::{HostPattern, RouteConfig};
use bouncer_rules::path_has_prefix;

use crate::metrics::RouteMetrics;
use crate::upstream::Upstream;

pub struct Route {
    pub name: Arc<str>,
    hosts: Vec<HostPattern>,
    path_prefix: String,
    pub upstream: Arc<Upstream>,
    pub metrics: RouteMetrics,
    /// The route's use of the shared cache, when it caches.
    pub cache: Option<crate::cache::RouteCache>,
}

impl Route {
    pub fn new(
        config: &RouteConfig,
        upstream: Arc<Upstream>,
        metrics: RouteMetrics,
        cache: Option<crate::cache::RouteCache>,
    ) -> Self {
        Self {
            name: config.name.as_str().into(),
            hosts: config.hosts.clone(),
            path_prefix: config.path_prefix.clone(),
            upstream,
            metrics,
            cache,
        }
    }

    /// How specifically this route names `host`: higher is more specific, `None` is no match.
    fn host_specificity(&self, host: &str) -> Option<usize> {
        if self.hosts.is_empty() {
            return Some(0);
        }
        self.hosts
            .iter()
            .filter(|pattern| pattern.matches(host))
            .map(|pattern| match pattern {
                // An exact name beats any wildcard, and a longer wildcard beats a shorter one.
                HostPattern::Exact(_) => usize::MAX,
                HostPattern::Wildcard(suffix) => 1 + suffix.len(),
            })
            .max()
    }
}

/// The routes one listener serves.
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Arc<Route>>) -> Self {
        Self { routes }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// `host` is lower-case without a port; `path` is normalised.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let mut best: Option<(&Arc<Route>, (usize, usize))> = None;
        for route in &self.routes {
            let Some(host_rank) = route.host_specificity(host) else {
                continue;
            };
            if !path_has_prefix(path, &route.path_prefix) {
                continue;
            }
            let rank = (host_rank, route.path_prefix.len());
            // The first route in the file wins a tie.
            if best.is_none_or(|(_, best_rank)| rank > best_rank) {
                best = Some((route, rank));
            }
        }
        best.map(|(route, _)| route)
    }
}
