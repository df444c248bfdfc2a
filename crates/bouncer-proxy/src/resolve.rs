//! Host names in `servers`: looked up at start and every `resolve_interval`, each address they
//! resolve to becoming a backend. A failed lookup keeps the addresses of the last good one.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverOpts,
    ServerOrderingStrategy,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;

use bouncer_config::{ResolverConfig, UpstreamConfig};

use crate::upstream::{Placement, Upstream};

/// Where names are looked up: the system's resolver, or the DNS servers of `[resolver]`.
pub enum Resolver {
    System,
    Dns(Box<DnsResolver>),
}

impl Resolver {
    pub fn new(config: &ResolverConfig) -> io::Result<Self> {
        if config.nameservers.is_empty() {
            Ok(Resolver::System)
        } else {
            Ok(Resolver::Dns(Box::new(DnsResolver::new(config)?)))
        }
    }

    /// Every address `host` resolves to, with `port`.
    pub async fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let mut addresses: Vec<SocketAddr> = match self {
            Resolver::System => tokio::net::lookup_host((host, port)).await?.collect(),
            Resolver::Dns(dns) => dns
                .lookup(host)
                .await?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect(),
        };
        // The same order every time, so that an unchanged answer is seen to be unchanged.
        addresses.sort_unstable();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the name has no address",
            ));
        }
        Ok(addresses)
    }
}

/// The backends `config.servers` stand for now: IP addresses as they are, host names looked up.
/// When a lookup fails, the name keeps its addresses in `previous`, and the failure is logged.
pub async fn resolve_servers(
    config: &UpstreamConfig,
    resolver: &Resolver,
    previous: &[Placement],
) -> Vec<Placement> {
    let mut placements = Vec::with_capacity(config.servers.len());
    for (entry, server) in config.servers.iter().enumerate() {
        if let Ok(ip) = server.address.host.parse::<IpAddr>() {
            placements.push((entry, SocketAddr::new(ip, server.address.port)));
            continue;
        }
        match resolver
            .lookup(&server.address.host, server.address.port)
            .await
        {
            Ok(addresses) => {
                placements.extend(addresses.into_iter().map(|address| (entry, address)));
            }
            Err(error) => {
                let kept: Vec<Placement> = previous
                    .iter()
                    .filter(|(known, _)| *known == entry)
                    .copied()
                    .collect();
                tracing::warn!(upstream = %config.name, server = %server.address, %error, kept = kept.len(), "looking up a backend's name failed; its last known addresses stay");
                placements.extend(kept);
            }
        }
    }
    placements
}

/// Looks the upstream's names up again every `resolve_interval`, for as long as it exists.
pub async fn refresh_loop(upstream: Weak<Upstream>, resolver: Arc<Resolver>) {
    loop {
        let Some(interval) = upstream
            .upgrade()
            .map(|upstream| upstream.config.resolve_interval)
        else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(target) = upstream.upgrade() else {
            return;
        };
        let placements = resolve_servers(&target.config, &resolver, &target.placements()).await;
        target.replace_backends(&placements);
    }
}

/// A DNS client asking the configured servers, over UDP with TCP for truncated answers. It keeps
/// no cache: `resolve_interval` alone decides how fresh the addresses are.
pub struct DnsResolver {
    client: TokioResolver,
}

impl DnsResolver {
    fn new(config: &ResolverConfig) -> io::Result<Self> {
        let servers = config
            .nameservers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        options.use_hosts_file = ResolveHosts::Never;
        options.timeout = config.timeout.unwrap_or(Duration::from_secs(2));
        options.attempts = 2;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
        let client = TokioResolver::builder_with_config(
            hickory_resolver::config::ResolverConfig::from_parts(None, Vec::new(), servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(io::Error::other)?;
        Ok(Self { client })
    }

    async fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        // Fully qualified, so that no search domains are tried.
        let mut name: Name = host
            .parse()
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        name.set_fqdn(true);
        let lookup = self.client.lookup_ip(name).await.map_err(|error| {
            if error.is_no_records_found() {
                io::Error::new(io::ErrorKind::NotFound, error)
            } else {
                io::Error::other(error)
            }
        })?;
        Ok(lookup.iter().collect())
    }
}
