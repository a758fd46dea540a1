//! Every metric sluice exports, in one place. Names and labels are the contract of
//! `shared/spec/admin-api.md`; dashboards may rely on them.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Status classes used as the `code` label.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn code_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

pub struct Metrics {
    registry: Registry,
    /// `route`, `color`, `pool`, `code`
    pub requests: IntCounterVec,
    /// `route`
    pub request_duration: HistogramVec,
    /// `listener`
    pub downstream_connections: IntGaugeVec,
    /// `pool`, `backend`: 1 while the backend is in rotation
    pub backend_healthy: IntGaugeVec,
    /// `pool`, `backend`, `reason` = active / passive
    pub backend_ejections: IntCounterVec,
    /// `route`, `region`: pools chosen by geo-routing
    pub geo_decisions: IntCounterVec,
    /// `route`: requests answered 429
    pub rate_limited: IntCounterVec,
    /// `route`, `color`: the share of clients each color gets (0-100)
    pub route_weight: IntGaugeVec,
    /// `route`: shifts undone automatically
    pub shift_rollbacks: IntCounterVec,
    /// `result` = ok / error
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_reload_success: IntGauge,
    /// Access log lines dropped because the writer could not keep up.
    pub access_log_dropped: IntCounter,
    /// `listener`, `reason` = max_connections / per_ip: connections closed at accept
    pub connections_refused: IntCounterVec,
    /// `limit` = header_timeout / keepalive_timeout / header_bytes / body_bytes / h2
    pub limit_hits: IntCounterVec,
    /// `status`: request heads refused before they reached the proxy (malformed, ambiguous)
    pub bad_requests: IntCounterVec,
    /// `pool`: members now (its addresses and what its names resolved to)
    pub pool_members: IntGaugeVec,
    /// `pool`, `result` = ok / error: DNS resolutions of the pool's names
    pub dns_resolutions: IntCounterVec,
    pub trace_spans_dropped: IntCounter,
    /// Fleet mode only (registered by [`Metrics::register_cluster`]).
    pub cluster_store_up: IntGauge,
    pub cluster_leader: IntGauge,
    pub cluster_sync_seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "sluice_requests_total",
                "Requests answered, by route, color, pool and status class",
            ),
            &["route", "color", "pool", "code"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_request_duration_seconds",
                "Time from request start to the end of the response, by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["route"],
        )?;
        let downstream_connections = IntGaugeVec::new(
            Opts::new(
                "sluice_downstream_connections",
                "Open client connections, by listener",
            ),
            &["listener"],
        )?;
        let backend_healthy = IntGaugeVec::new(
            Opts::new(
                "sluice_backend_healthy",
                "1 while a backend is in rotation, else 0",
            ),
            &["pool", "backend"],
        )?;
        let backend_ejections = IntCounterVec::new(
            Opts::new(
                "sluice_backend_ejections_total",
                "Backends taken out of rotation, by reason (active checks or passive live failures)",
            ),
            &["pool", "backend", "reason"],
        )?;
        let geo_decisions = IntCounterVec::new(
            Opts::new(
                "sluice_geo_decisions_total",
                "Requests routed by client location, by route and the region that served",
            ),
            &["route", "region"],
        )?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "sluice_rate_limited_total",
                "Requests refused with 429, by route",
            ),
            &["route"],
        )?;
        let route_weight = IntGaugeVec::new(
            Opts::new(
                "sluice_route_weight",
                "Share of a route's clients sent to each color",
            ),
            &["route", "color"],
        )?;
        let shift_rollbacks = IntCounterVec::new(
            Opts::new(
                "sluice_shift_rollbacks_total",
                "Traffic shifts rolled back because the target color failed, by route",
            ),
            &["route"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new("sluice_config_reloads_total", "Config loads, by result"),
            &["result"],
        )?;
        let config_generation = IntGauge::new(
            "sluice_config_generation",
            "Generation of the config being served (1 for the first load)",
        )?;
        let config_last_reload_success = IntGauge::new(
            "sluice_config_last_reload_success",
            "1 if the last config load succeeded, else 0",
        )?;
        let access_log_dropped = IntCounter::new(
            "sluice_access_log_dropped_total",
            "Access log lines dropped because the log writer fell behind",
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "sluice_connections_refused_total",
                "Connections closed at accept because of [limits], by listener and reason",
            ),
            &["listener", "reason"],
        )?;
        let limit_hits = IntCounterVec::new(
            Opts::new(
                "sluice_limit_hits_total",
                "Clients cut off by a limit of [limits], by limit",
            ),
            &["limit"],
        )?;
        let bad_requests = IntCounterVec::new(
            Opts::new(
                "sluice_bad_requests_total",
                "Request heads refused at the edge (malformed, ambiguous, too large), by status",
            ),
            &["status"],
        )?;
        let pool_members = IntGaugeVec::new(
            Opts::new(
                "sluice_pool_members",
                "Backends in a pool now: its addresses and what its names resolve to",
            ),
            &["pool"],
        )?;
        let dns_resolutions = IntCounterVec::new(
            Opts::new(
                "sluice_dns_resolutions_total",
                "DNS resolutions of a pool's backend names, by result",
            ),
            &["pool", "result"],
        )?;
        let trace_spans_dropped = IntCounter::new(
            "sluice_trace_spans_dropped_total",
            "Spans not exported: the export queue was full or the collector could not be reached",
        )?;
        registry.register(Box::new(trace_spans_dropped.clone()))?;
        let cluster_store_up = IntGauge::new(
            "sluice_cluster_store_up",
            "1 while the cluster store (Redis) answers, 0 while it does not",
        )?;
        let cluster_leader = IntGauge::new(
            "sluice_cluster_leader",
            "1 on the replica holding the controller lease (it runs shifts and rollback)",
        )?;
        let cluster_sync_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sluice_cluster_sync_seconds",
                "Time of one exchange with the cluster store, by kind",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["kind"],
        )?;
        registry.register(Box::new(pool_members.clone()))?;
        registry.register(Box::new(dns_resolutions.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(limit_hits.clone()))?;
        registry.register(Box::new(bad_requests.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(downstream_connections.clone()))?;
        registry.register(Box::new(backend_healthy.clone()))?;
        registry.register(Box::new(backend_ejections.clone()))?;
        registry.register(Box::new(geo_decisions.clone()))?;
        registry.register(Box::new(rate_limited.clone()))?;
        registry.register(Box::new(route_weight.clone()))?;
        registry.register(Box::new(shift_rollbacks.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_generation.clone()))?;
        registry.register(Box::new(config_last_reload_success.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            downstream_connections,
            backend_healthy,
            backend_ejections,
            geo_decisions,
            rate_limited,
            route_weight,
            shift_rollbacks,
            config_reloads,
            config_generation,
            config_last_reload_success,
            access_log_dropped,
            connections_refused,
            limit_hits,
            bad_requests,
            pool_members,
            dns_resolutions,
            cluster_store_up,
            cluster_leader,
            cluster_sync_seconds,
            trace_spans_dropped,
        })
    }

    /// Exports the fleet mode metrics.
    pub fn register_cluster(&self) -> Result<(), prometheus::Error> {
        self.registry
            .register(Box::new(self.cluster_store_up.clone()))?;
        self.registry
            .register(Box::new(self.cluster_leader.clone()))?;
        self.registry
            .register(Box::new(self.cluster_sync_seconds.clone()))?;
        for k in ["limits", "windows", "control"] {
            self.cluster_sync_seconds.with_label_values(&[k]);
        }
        Ok(())
    }

    /// Prometheus text format 0.0.4.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::error!("cannot encode metrics: {e}");
        }
        buf
    }
}
