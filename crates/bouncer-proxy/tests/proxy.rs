//! Integration tests: the real proxy, real backends and real clients on loopback sockets.

#![allow(clippy::unwrap_used)]

mod proxy_tests {
    pub mod acme;
    pub mod admin;
    pub mod backend_framing;
    pub mod balancing;
    pub mod bodies;
    pub mod cache;
    pub mod cluster;
    pub mod dashboard;
    pub mod demo;
    pub mod discovery;
    pub mod errors;
    pub mod failover;
    pub mod flood;
    pub mod grpc;
    pub mod h2_abuse;
    pub mod headers;
    pub mod http1_server;
    pub mod http2_backends;
    pub mod limits;
    pub mod metrics;
    pub mod pooling;
    pub mod protection;
    pub mod protocols;
    pub mod proxy_protocol;
    pub mod reload;
    pub mod routing;
    pub mod shutdown;
    pub mod slow_clients;
    pub mod sticky;
    pub mod timeouts;
    pub mod tls;
}
