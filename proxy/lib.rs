//! sluice: a Layer-7 reverse proxy and edge gateway on pingora.

pub mod access_log;
pub mod admin;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod balancer;
pub mod client_ip;
pub mod cluster;
pub mod config;
pub mod demo_backend;
pub mod discovery;
pub mod edge;
pub mod gateway;
pub mod geo;
pub mod health;
pub mod history;
pub mod metrics;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod tls;
pub mod traffic;
pub mod watch;
