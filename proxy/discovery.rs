//! Backends by name: `name:port` (every A and AAAA record) and `_service._proto.name` (every
//! SRV target, with its port and weight), resolved with hickory off the request path.
//!
//! The last good answer of each (pool, name) lives here, outside any snapshot; snapshots are
//! built from it. The `Resolve` task re-resolves each name every `[resolver] interval` (sooner
//! when the answer's TTL runs out) and, when a pool's members changed, has a new snapshot built
//! with the same config: requests read the new member list lock-free from the next request on,
//! requests in flight finish on the snapshot they started with, and the health of addresses
//! that stay (keyed by pool and address) carries over. A failed lookup keeps the last good list.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::IntCounterVec;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::{Config, Resolver as ResolverConfigSpec, Target};

/// One backend a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub address: SocketAddr,
    pub weight: u32,
    /// The name it was found by (sent as SNI and `Host` to it, and verified), `None` for an
    /// `ip:port` entry.
    pub host: Option<String>,
    /// It appeared after the name's first answer: it takes traffic only after a good probe.
    pub late: bool,
}

/// The answer for one (pool, name).
#[derive(Debug, Default)]
struct Entry {
    /// The last good member list.
    members: Vec<Member>,
    /// The name answered at least once.
    answered: bool,
    resolved_at: Option<SystemTime>,
    last_error: Option<String>,
    /// When it is to be resolved again.
    due: Option<Instant>,
    in_flight: bool,
}

type Key = (String, Target);

/// Every name's last good answer.
pub struct Discovery {
    entries: Mutex<HashMap<Key, Entry>>,
    resolutions: IntCounterVec,
}

/// The shortest time between two resolutions of a name (a TTL of 0 does not mean "always").
const MIN_REFRESH: Duration = Duration::from_millis(500);
/// One resolution (every query of it) gives up after this long.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

impl Discovery {
    pub fn new(resolutions: IntCounterVec) -> Discovery {
        Discovery {
            entries: Mutex::new(HashMap::new()),
            resolutions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The members of `target` in `pool` as last resolved (none yet: empty).
    pub fn members(&self, pool: &str, target: &Target) -> Vec<Member> {
        self.lock()
            .get(&(pool.to_string(), target.clone()))
            .map(|e| e.members.clone())
            .unwrap_or_default()
    }

    /// `/status`: every name of `pool` with its addresses, last answer and last error.
    pub fn view(&self, pool: &str) -> Vec<Value> {
        let map = self.lock();
        let mut out: Vec<(String, Value)> = map
            .iter()
            .filter(|((p, _), _)| p == pool)
            .map(|((_, t), e)| {
                (
                    t.to_string(),
                    json!({
                        "name": t.to_string(),
                        "addresses": e.members.iter().map(|m| m.address.to_string()).collect::<Vec<_>>(),
                        "last_resolved": e.resolved_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                        "last_error": e.last_error,
                    }),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.into_iter().map(|(_, v)| v).collect()
    }

    /// Records an answer; true when the member list changed.
    pub fn record(&self, pool: &str, target: &Target, result: Result<Vec<Member>, String>) -> bool {
        let mut map = self.lock();
        let e = map.entry((pool.to_string(), target.clone())).or_default();
        e.in_flight = false;
        match result {
            Ok(mut members) => {
                self.resolutions.with_label_values(&[pool, "ok"]).inc();
                members.sort_by_key(|m| m.address);
                members.dedup_by_key(|m| m.address);
                for m in &mut members {
                    let before = e.members.iter().find(|o| o.address == m.address);
                    m.late = match before {
                        Some(o) => o.late,
                        None => e.answered,
                    };
                }
                e.answered = true;
                e.resolved_at = Some(SystemTime::now());
                e.last_error = None;
                let same = e.members.len() == members.len()
                    && e.members
                        .iter()
                        .zip(&members)
                        .all(|(a, b)| a.address == b.address && a.weight == b.weight);
                if !same {
                    log::info!(
                        "pool {pool}: {target} now resolves to {}",
                        members
                            .iter()
                            .map(|m| m.address.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                e.members = members;
                !same
            }
            Err(why) => {
                self.resolutions.with_label_values(&[pool, "error"]).inc();
                if e.last_error.as_deref() != Some(&why) {
                    log::warn!(
                        "pool {pool}: cannot resolve {target} ({why}); keeping the last {} address(es)",
                        e.members.len()
                    );
                }
                e.last_error = Some(why);
                false
            }
        }
    }

    /// Forgets names no pool lists any more; true when some had members.
    fn retain(&self, wanted: &HashSet<Key>) -> bool {
        let mut map = self.lock();
        let mut dropped_members = false;
        map.retain(|k, e| {
            let keep = wanted.contains(k);
            if !keep {
                dropped_members |= !e.members.is_empty();
                let _ = self.resolutions.remove_label_values(&[&k.0, "ok"]);
                let _ = self.resolutions.remove_label_values(&[&k.0, "error"]);
            }
            keep
        });
        dropped_members
    }

    /// The names due for resolution now (marked in flight).
    fn due(&self, wanted: &HashSet<Key>, now: Instant) -> Vec<Key> {
        let mut map = self.lock();
        let mut out = Vec::new();
        for k in wanted {
            let e = map.entry(k.clone()).or_default();
            if !e.in_flight && e.due.is_none_or(|d| d <= now) {
                e.in_flight = true;
                out.push(k.clone());
            }
        }
        out
    }

    fn schedule(&self, key: &Key, at: Instant) {
        if let Some(e) = self.lock().get_mut(key) {
            e.due = Some(at);
        }
    }
}

/// Every (pool, name) of a config.
pub fn names(cfg: &Config) -> HashSet<Key> {
    cfg.pools
        .iter()
        .flat_map(|p| {
            p.backends
                .iter()
                .filter(|b| b.target.is_name())
                .map(|b| (p.name.clone(), b.target.clone()))
        })
        .collect()
}

/// A resolver for `[resolver]`: its name servers, or the system's.
pub fn resolver(spec: &ResolverConfigSpec) -> Result<TokioResolver, String> {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(1);
    opts.attempts = 2;
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    let builder = if spec.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("system resolver: {e}"))?
    } else {
        let servers = spec
            .nameservers
            .iter()
            .map(|a| {
                let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                for c in &mut ns.connections {
                    c.port = a.port();
                }
                ns
            })
            .collect();
        let cfg = ResolverConfig::from_parts(None, Vec::new(), servers);
        TokioResolver::builder_with_config(cfg, TokioRuntimeProvider::default())
    };
    builder
        .with_options(opts)
        .build()
        .map_err(|e| format!("resolver: {e}"))
}

/// Resolves one entry: its members and how long the answer is good for.
pub async fn resolve(
    r: &TokioResolver,
    target: &Target,
    weight: u32,
) -> Result<(Vec<Member>, Duration), String> {
    let left = |until: Instant| until.saturating_duration_since(Instant::now());
    let lookup = async {
        match target {
            Target::Addr(a) => Ok((
                vec![Member {
                    address: *a,
                    weight,
                    host: None,
                    late: false,
                }],
                Duration::MAX,
            )),
            Target::Name { host, port } => {
                let ips = r
                    .lookup_ip(host.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let ttl = left(ips.valid_until());
                // the name as sent (SNI, Host) has no trailing dot
                let name = host.trim_end_matches('.').to_string();
                let members: Vec<Member> = ips
                    .iter()
                    .map(|ip| Member {
                        address: SocketAddr::new(ip, *port),
                        weight,
                        host: Some(name.clone()),
                        late: false,
                    })
                    .collect();
                Ok((members, ttl))
            }
            Target::Srv(name) => {
                let srv = r
                    .srv_lookup(name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut ttl = left(srv.valid_until());
                let records: Vec<_> = srv
                    .answers()
                    .iter()
                    .filter_map(|rec| match &rec.data {
                        RData::SRV(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                // RFC 2782: the lowest priority that has targets is used
                let best = records.iter().map(|s| s.priority).min();
                let mut members = Vec::new();
                for s in records.iter().filter(|s| Some(s.priority) == best) {
                    let target = s.target.to_utf8();
                    let host = target.trim_end_matches('.').to_string();
                    let ips = r
                        .lookup_ip(target.as_str())
                        .await
                        .map_err(|e| format!("{host}: {e}"))?;
                    ttl = ttl.min(left(ips.valid_until()));
                    members.extend(ips.iter().map(|ip| Member {
                        address: SocketAddr::new(ip, s.port),
                        weight: u32::from(s.weight).max(1),
                        host: Some(host.clone()),
                        late: false,
                    }));
                }
                Ok((members, ttl))
            }
        }
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok((m, _))) if m.is_empty() => Err("no addresses in the answer".into()),
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
    }
}

/// Resolves every name of `cfg` once (at start, before the first snapshot), waiting at most
/// `limit`: what has not answered by then is left to the `Resolve` task.
pub async fn resolve_all(d: &Discovery, cfg: &Config, limit: Duration) {
    let r = match resolver(&cfg.resolver) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            log::error!("{e}");
            return;
        }
    };
    let weights = entry_weights(cfg);
    let mut jobs = tokio::task::JoinSet::new();
    for k in names(cfg) {
        let r = r.clone();
        let w = weights.get(&k).copied().unwrap_or(1);
        jobs.spawn(async move {
            let res = resolve(&r, &k.1, w).await;
            (k, res)
        });
    }
    let end = tokio::time::Instant::now() + limit;
    while let Ok(Some(Ok((k, res)))) = tokio::time::timeout_at(end, jobs.join_next()).await {
        let next = next_due(&res, cfg.resolver.interval, Instant::now());
        d.record(&k.0, &k.1, res.map(|(m, _)| m));
        d.schedule(&k, next);
    }
}

/// One warning per backend name of `cfg` that does not resolve now (for `sluice check`).
pub fn check_names(cfg: &Config) -> Vec<String> {
    let names = names(cfg);
    if names.is_empty() {
        return Vec::new();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![format!("cannot check backend names: {e}")],
    };
    rt.block_on(async {
        let r = match resolver(&cfg.resolver) {
            Ok(r) => Arc::new(r),
            Err(e) => return vec![format!("cannot check backend names: {e}")],
        };
        let mut jobs = tokio::task::JoinSet::new();
        for (pool, t) in names {
            let r = r.clone();
            jobs.spawn(async move {
                let res = resolve(&r, &t, 1).await;
                (pool, t, res)
            });
        }
        let mut out = Vec::new();
        while let Some(Ok((pool, t, res))) = jobs.join_next().await {
            if let Err(e) = res {
                out.push(format!(
                    "pool \"{pool}\": {t} does not resolve now ({e}); the pool has no backend from it until it does"
                ));
            }
        }
        out.sort();
        out
    })
}

fn entry_weights(cfg: &Config) -> HashMap<Key, u32> {
    cfg.pools
        .iter()
        .flat_map(|p| {
            p.backends
                .iter()
                .map(|b| ((p.name.clone(), b.target.clone()), b.weight))
        })
        .collect()
}

fn next_due(
    res: &Result<(Vec<Member>, Duration), String>,
    interval: Duration,
    now: Instant,
) -> Instant {
    let wait = match res {
        Ok((_, ttl)) => interval.min(*ttl).max(MIN_REFRESH),
        // a failed name is asked again soon, but not in a tight loop
        Err(_) => interval.min(Duration::from_secs(1)).max(MIN_REFRESH),
    };
    now + wait
}

/// The background task that keeps every name's members current.
pub struct Resolve {
    pub discovery: Arc<Discovery>,
    /// The config serving now.
    pub config: Arc<dyn Fn() -> Arc<Config> + Send + Sync>,
    /// Builds a new snapshot from the serving config and the current members.
    pub rebuild: Arc<dyn Fn() + Send + Sync>,
}

#[async_trait]
impl BackgroundService for Resolve {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) =
            mpsc::unbounded_channel::<(Key, Result<(Vec<Member>, Duration), String>)>();
        let mut current: Option<(ResolverConfigSpec, Arc<TokioResolver>)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
                Some(first) = rx.recv() => {
                    // this answer, and any others already waiting: one rebuild for all
                    let cfg = (self.config)();
                    let mut changed = false;
                    let mut next = Some(first);
                    while let Some((key, res)) = next.take().or_else(|| rx.try_recv().ok()) {
                        let due = next_due(&res, cfg.resolver.interval, Instant::now());
                        changed |= self.discovery.record(&key.0, &key.1, res.map(|(m, _)| m));
                        self.discovery.schedule(&key, due);
                    }
                    if changed {
                        (self.rebuild)();
                    }
                    continue;
                }
            }
            let cfg = (self.config)();
            let wanted = names(&cfg);
            if self.discovery.retain(&wanted) {
                (self.rebuild)();
            }
            if wanted.is_empty() {
                continue;
            }
            if current
                .as_ref()
                .is_none_or(|(spec, _)| *spec != cfg.resolver)
            {
                match resolver(&cfg.resolver) {
                    Ok(r) => current = Some((cfg.resolver.clone(), Arc::new(r))),
                    Err(e) => {
                        log::error!("{e}");
                        continue;
                    }
                }
            }
            let Some((_, r)) = current.as_ref() else {
                continue;
            };
            let weights = entry_weights(&cfg);
            for key in self.discovery.due(&wanted, Instant::now()) {
                let (r, tx) = (r.clone(), tx.clone());
                let w = weights.get(&key).copied().unwrap_or(1);
                tokio::spawn(async move {
                    let res = resolve(&r, &key.1, w).await;
                    let _ = tx.send((key, res));
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(a: &str) -> Member {
        Member {
            address: a.parse().expect("addr"),
            weight: 1,
            host: Some("app".into()),
            late: false,
        }
    }

    #[test]
    fn answers_keep_the_last_good_list_and_mark_late_members() {
        let c = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["pool", "result"])
            .expect("counter");
        let d = Discovery::new(c.clone());
        let t = Target::Name {
            host: "app".into(),
            port: 80,
        };
        assert!(d.record("p", &t, Ok(vec![m("10.0.0.1:80"), m("10.0.0.2:80")])));
        assert!(
            d.members("p", &t).iter().all(|m| !m.late),
            "the first answer is in at once"
        );
        // the same answer in another order: no change
        assert!(!d.record("p", &t, Ok(vec![m("10.0.0.2:80"), m("10.0.0.1:80")])));
        // a failure keeps the list
        assert!(!d.record("p", &t, Err("SERVFAIL".into())));
        assert_eq!(d.members("p", &t).len(), 2);
        assert_eq!(d.view("p")[0]["last_error"], "SERVFAIL");
        // a new address is late, the others are not
        assert!(d.record("p", &t, Ok(vec![m("10.0.0.2:80"), m("10.0.0.3:80")])));
        let now = d.members("p", &t);
        assert_eq!(now.len(), 2);
        assert!(!now[0].late && now[1].late);
        assert_eq!(c.with_label_values(&["p", "error"]).get(), 1);
        assert_eq!(c.with_label_values(&["p", "ok"]).get(), 3);
        // names no pool lists are forgotten
        assert!(d.retain(&HashSet::new()));
        assert!(d.members("p", &t).is_empty());
    }
}
