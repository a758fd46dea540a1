//! The immutable runtime view of one config generation. Built once per (re)load, swapped
//! atomically, and read lock-free by every request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::upstreams::peer::HttpPeer;
use prometheus::{Histogram, IntCounter};

use crate::balancer::SmoothRoundRobin;
use crate::config::{Config, Eject, HealthCheck, Listener, Resolver, RouteLimit, Sticky, Target};
use crate::discovery::{Discovery, Member};
use crate::geo::{GeoDb, Site};
use crate::health::{self, BackendHealth, Clock, ProbeTarget};
use crate::metrics::{Metrics, CODE_CLASSES};
use crate::rate_limit::{self, Limiter};
use crate::router::Router;
use crate::tls::CertSet;
use crate::traffic::{Color, RouteControl, Traffic};
use ipnet::IpNet;

/// How long an idle upstream connection is kept for reuse.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

pub struct Snapshot {
    pub generation: u64,
    pub loaded_at: SystemTime,
    /// Shared with later snapshots of the same generation (a pool's members changed).
    pub config: Arc<Config>,
    pub router: Router,
    pub routes: Vec<RouteRt>,
    pub pools: Vec<PoolRt>,
    pub certs: Arc<CertSet>,
    /// `Strict-Transport-Security` value, `None` when disabled or without TLS.
    pub hsts: Option<http::HeaderValue>,
    /// `[client_ip] trusted_proxies`.
    pub trusted_proxies: Vec<IpNet>,
    /// `[rate_limit] exempt`.
    pub exempt: Vec<IpNet>,
    /// `[geoip]` database.
    pub geo: Option<Arc<GeoDb>>,
    pub geo_header: Option<String>,
}

pub struct RouteRt {
    pub name: String,
    /// Blue, then green.
    pub colors: [ColorRt; 2],
    /// Weights, shifts and error windows: live state that outlives this snapshot.
    pub control: Arc<RouteControl>,
    pub sticky: Sticky,
    pub override_header: Option<String>,
    pub duration: Histogram,
    /// The route's rate limiter, if it is limited.
    pub limit: Option<Arc<Limiter>>,
    pub rate_limited: IntCounter,
    /// `[route.limits] max_body_bytes`, else `[limits]`'s; 0: no limit.
    pub max_body_bytes: u64,
}

/// The pools of one color of a route.
pub struct ColorRt {
    /// Indexes into `Snapshot::pools`.
    pub pools: Vec<usize>,
    /// Per pool (same order), one request counter per status class.
    pub requests: Vec<[IntCounter; 5]>,
    /// Per pool: its data center, if its region is known.
    pub sites: Vec<Option<Site>>,
    /// Per pool: the region name ("" without one) and its geo decision counter.
    pub regions: Vec<(String, IntCounter)>,
}

impl RouteRt {
    pub fn has_green(&self) -> bool {
        !self.colors[1].pools.is_empty()
    }
}

pub struct PoolRt {
    pub name: String,
    /// The pool's members now: its `ip:port` backends and what its names resolved to.
    pub backends: Vec<BackendRt>,
    /// The same health handles as in `backends`, for the floor computation.
    pub health: Vec<Arc<BackendHealth>>,
    pub rr: SmoothRoundRobin,
    pub check: HealthCheck,
    pub eject: Eject,
    pub min_healthy: f64,
    /// The pool's `tls`: probes present its client certificate.
    probe_tls: Option<Arc<rustls::ClientConfig>>,
    /// `tls.sni`, which overrides every backend's own name.
    sni: Option<String>,
}

pub struct BackendRt {
    pub address: SocketAddr,
    /// The name it was found by (`None`: an `ip:port` entry).
    pub host: Option<String>,
    /// Fully configured peer (timeouts, TLS, h2); cloned per request.
    pub peer: HttpPeer,
    pub health: Arc<BackendHealth>,
}

/// Why no backend could be picked.
pub enum NoBackend {
    /// Every backend is out of rotation; the earliest may return in this many seconds.
    AllDown { retry_after: u64 },
    /// This request already failed on every backend it could try.
    Exhausted,
}

impl PoolRt {
    /// The next backend by (smooth weighted) round-robin among those in rotation, skipping
    /// `tried` (bit i: backend i failed for this request). Honors the `min_healthy` floor.
    pub fn pick(&self, tried: u64, clock: &Clock) -> Result<usize, NoBackend> {
        let untried = |i: usize| i >= 64 || tried & (1u64 << i) == 0;
        let picked = if self.min_healthy > 0.0 {
            let allowed = health::allowed(&self.health, self.min_healthy);
            self.rr.next_where(|i| allowed[i] && untried(i))
        } else {
            self.rr
                .next_where(|i| self.backends[i].health.usable() && untried(i))
        };
        if let Some(b) = picked {
            return Ok(b);
        }
        // This request already failed on some backend: that is a bad gateway, not an outage
        // known in advance.
        let any_usable = self.backends.iter().any(|b| b.health.usable());
        if tried != 0 || any_usable || self.min_healthy > 0.0 {
            return Err(NoBackend::Exhausted);
        }
        let now = clock.now_ms();
        let soonest = self
            .backends
            .iter()
            .filter_map(|b| b.health.ejected_until_ms())
            .min()
            .map_or(self.check.interval.as_millis() as u64, |t| {
                t.saturating_sub(now)
            });
        Err(NoBackend::AllDown {
            retry_after: soonest.div_ceil(1000).max(1),
        })
    }
}

/// The state that outlives snapshots, which a snapshot is built with.
pub struct Registries<'a> {
    pub metrics: &'a Metrics,
    pub health: &'a health::Registry,
    pub limits: &'a rate_limit::Registry,
    pub traffic: &'a Traffic,
    pub discovery: &'a Discovery,
}

impl Snapshot {
    pub fn build(config: Arc<Config>, generation: u64, reg: &Registries) -> Snapshot {
        let (metrics, limits, traffic) = (reg.metrics, reg.limits, reg.traffic);
        let pools: Vec<PoolRt> = config
            .pools
            .iter()
            .map(|p| build_pool(p, &config.resolver, reg))
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| RouteRt {
                name: r.name.clone(),
                colors: [Color::Blue, Color::Green].map(|c| {
                    let pools = if c == Color::Blue { &r.blue } else { &r.green };
                    build_color(&config, &r.name, c, pools, metrics)
                }),
                control: traffic.get(&r.name).unwrap_or_else(|| {
                    // `apply_config` ran first; a control of its own keeps the request
                    // path total even so
                    Arc::new(RouteControl::detached(&r.name, r.weights.1))
                }),
                sticky: r.sticky,
                override_header: r.override_header.clone(),
                duration: metrics.request_duration.with_label_values(&[&r.name]),
                limit: route_limiter(&config, r, limits),
                rate_limited: metrics.rate_limited.with_label_values(&[&r.name]),
                max_body_bytes: r.max_body_bytes.unwrap_or(config.limits.max_body_bytes),
            })
            .collect();
        let router = Router::new(
            config
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.hosts.as_slice(), r.path_prefix.as_str())),
        );
        let (certs, hsts) = match &config.tls {
            Some(t) => {
                let entries: Vec<_> = t
                    .certs
                    .iter()
                    .map(|c| (c.hosts.clone(), c.loaded.clone()))
                    .collect();
                (
                    CertSet::new(&entries, t.min_version),
                    http::HeaderValue::from_str(&t.hsts)
                        .ok()
                        .filter(|_| !t.hsts.is_empty()),
                )
            }
            None => (CertSet::default(), None),
        };
        Snapshot {
            generation,
            loaded_at: SystemTime::now(),
            router,
            routes,
            pools,
            certs: Arc::new(certs),
            hsts,
            trusted_proxies: config.client_ip.trusted_proxies.clone(),
            exempt: config
                .rate_limit
                .as_ref()
                .map(|r| r.exempt.clone())
                .unwrap_or_default(),
            geo: config.geoip.as_ref().map(|g| g.db.clone()),
            geo_header: config.geoip.as_ref().and_then(|g| g.debug_header.clone()),
            config,
        }
    }

    /// What the prober needs for every backend of every pool.
    pub fn probe_targets(&self) -> Vec<ProbeTarget> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.backends.iter().map(|b| {
                    // the name the backend is known by: tls.sni, its DNS name, else its address
                    let name = p.sni.as_ref().or(b.host.as_ref());
                    ProbeTarget {
                        address: b.address,
                        host: name.cloned().unwrap_or_else(|| b.address.to_string()),
                        check: p.check.clone(),
                        tls: p.probe_tls.clone().map(|cfg| {
                            let server = name
                                .and_then(|n| {
                                    rustls::pki_types::ServerName::try_from(n.clone()).ok()
                                })
                                .unwrap_or_else(|| {
                                    rustls::pki_types::ServerName::from(b.address.ip())
                                });
                            (cfg, server)
                        }),
                        health: b.health.clone(),
                    }
                })
            })
            .collect()
    }

    /// The listener a connection arrived on, from the connection's local address.
    pub fn listener(&self, local: SocketAddr) -> Option<&Listener> {
        find_listener(&self.config.listeners, local, |l| l.listen)
    }
}

fn build_color(
    config: &Config,
    route: &str,
    color: Color,
    pools: &[usize],
    metrics: &Metrics,
) -> ColorRt {
    ColorRt {
        pools: pools.to_vec(),
        requests: pools
            .iter()
            .map(|p| {
                CODE_CLASSES.map(|c| {
                    metrics.requests.with_label_values(&[
                        route,
                        color.name(),
                        &config.pools[*p].name,
                        c,
                    ])
                })
            })
            .collect(),
        sites: pools
            .iter()
            .map(|p| {
                let region = config.pools[*p].region.as_ref()?;
                let g = config.regions.iter().find(|g| &g.name == region)?;
                Some(Site {
                    location: g.location,
                    countries: g
                        .countries
                        .iter()
                        .filter_map(|c| <[u8; 2]>::try_from(c.as_bytes()).ok())
                        .collect(),
                })
            })
            .collect(),
        regions: pools
            .iter()
            .map(|p| {
                let region = config.pools[*p].region.clone().unwrap_or_default();
                let c = metrics.geo_decisions.with_label_values(&[route, &region]);
                (region, c)
            })
            .collect(),
    }
}

/// The limiter of a route: its own quota (scope: the route), `[rate_limit]`'s (shared scope),
/// or none.
fn route_limiter(
    config: &Config,
    r: &crate::config::Route,
    limits: &rate_limit::Registry,
) -> Option<Arc<Limiter>> {
    let prefix = config.rate_limit.as_ref().map_or(64, |g| g.ipv6_prefix);
    match r.rate_limit {
        RouteLimit::Off => None,
        RouteLimit::Own(l) => limits.get(&r.name, l, prefix),
        RouteLimit::Inherit => config
            .rate_limit
            .as_ref()
            .and_then(|g| limits.get("", g.limit, g.ipv6_prefix)),
    }
}

/// Finds the item whose listen address accepted a connection with local address `local`: the
/// exact address, else a wildcard address (`0.0.0.0`, `[::]`) on the same port.
pub fn find_listener<T>(
    items: &[T],
    local: SocketAddr,
    listen: impl Fn(&T) -> SocketAddr,
) -> Option<&T> {
    items.iter().find(|i| listen(i) == local).or_else(|| {
        items.iter().find(|i| {
            let l = listen(i);
            l.port() == local.port() && l.ip().is_unspecified()
        })
    })
}

/// The members of a pool: its `ip:port` entries and what its names resolved to (first
/// entry wins when an address appears twice).
pub fn members(p: &crate::config::Pool, discovery: &Discovery) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    for b in &p.backends {
        let found = match &b.target {
            Target::Addr(a) => vec![Member {
                address: *a,
                weight: b.weight,
                host: None,
                late: false,
            }],
            t => discovery.members(&p.name, t),
        };
        for m in found {
            if !out.iter().any(|o| o.address == m.address) {
                out.push(m);
            }
        }
    }
    out
}

fn build_pool(p: &crate::config::Pool, resolver: &Resolver, reg: &Registries) -> PoolRt {
    let members = members(p, reg.discovery);
    reg.metrics
        .pool_members
        .with_label_values(&[&p.name])
        .set(members.len() as i64);
    let backends = members
        .iter()
        .map(|m| {
            // TLS verifies the name the backend was found by, unless tls.sni says otherwise
            let (tls, sni) = match &p.tls {
                Some(t) => (
                    true,
                    t.sni
                        .clone()
                        .or_else(|| m.host.clone())
                        .unwrap_or_else(|| m.address.ip().to_string()),
                ),
                None => (false, String::new()),
            };
            let mut peer = HttpPeer::new(m.address, tls, sni);
            let o = &mut peer.options;
            o.connection_timeout = Some(p.connect_timeout);
            o.total_connection_timeout = Some(p.connect_timeout * 2);
            o.read_timeout = Some(p.read_timeout);
            o.write_timeout = Some(p.read_timeout);
            // a backend's header names reach the client lower-case, as over h2 (see `gateway`)
            o.keep_response_header_case = false;
            // the response head goes to the hooks as read, not a copy (nothing here reads the
            // client session's head after that: pingora-core patch 0007)
            o.keep_response_header = false;
            // a name's member may vanish: its idle connections must not outlive that by much
            // (pingora's pool cannot drop a peer's connections on demand)
            o.idle_timeout = Some(if m.host.is_some() {
                UPSTREAM_IDLE.min(resolver.interval.max(Duration::from_secs(1)))
            } else {
                UPSTREAM_IDLE
            });
            if p.http2 {
                o.set_http_version(2, 2);
                o.max_h2_streams = 100;
            }
            if let Some(t) = &p.tls {
                o.ca = t.ca.clone();
                peer.client_cert_key = t.client.clone();
            }
            BackendRt {
                address: m.address,
                host: m.host.clone(),
                peer,
                // a member that joined after the name's first answer waits for a good probe
                health: reg.health.get(&p.name, m.address, m.late, reg.metrics),
            }
        })
        .collect::<Vec<_>>();
    let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
    PoolRt {
        name: p.name.clone(),
        health: backends.iter().map(|b| b.health.clone()).collect(),
        backends,
        rr: SmoothRoundRobin::new(&weights),
        check: p.health.clone(),
        eject: p.eject.clone(),
        min_healthy: p.min_healthy,
        probe_tls: p.tls.as_ref().map(|t| t.probe.clone()),
        sni: p.tls.as_ref().and_then(|t| t.sni.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_lookup_prefers_exact_then_wildcard() {
        let addrs: Vec<SocketAddr> = ["0.0.0.0:8443", "127.0.0.2:8443", "[::]:8080"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        let find = |s: &str| find_listener(&addrs, s.parse().expect("addr"), |a| *a).copied();
        assert_eq!(find("127.0.0.2:8443"), Some(addrs[1]));
        assert_eq!(find("127.0.0.1:8443"), Some(addrs[0]));
        assert_eq!(find("[::1]:8080"), Some(addrs[2]));
        assert_eq!(find("127.0.0.1:9999"), None);
    }
}
