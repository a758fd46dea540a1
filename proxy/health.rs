//! Backend health: active probes, passive ejection on live failures, and the floor that keeps
//! a pool from ejecting itself into an outage.
//!
//! State lives in a registry keyed by pool name + backend address, outside any snapshot, so a
//! reload (or a weight change) never resets it. The request path reads it through atomics only.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::config::{Eject, HealthCheck};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

const UNKNOWN: u8 = 0;
const HEALTHY: u8 = 1;
const UNHEALTHY: u8 = 2;
/// Not probed yet, and out of rotation until a probe succeeds (a member that joined a named
/// pool after its first answer).
const PENDING: u8 = 3;

/// Milliseconds on a monotonic clock shared by every backend.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn now_ms(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
    /// Wall-clock time of a monotonic instant, for display.
    pub fn wall(&self, ms: u64) -> SystemTime {
        let now = self.now_ms();
        if ms >= now {
            SystemTime::now() + Duration::from_millis(ms - now)
        } else {
            SystemTime::now() - Duration::from_millis(now - ms)
        }
    }
}

/// The health of one backend of one pool.
pub struct BackendHealth {
    pub pool: String,
    pub address: SocketAddr,
    clock: Clock,
    probe_state: AtomicU8,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    ejected: AtomicBool,
    ejected_until: AtomicU64,
    passive_failures: AtomicU32,
    ejections: AtomicU32,
    last_return: AtomicU64,
    /// When the backend last left the rotation (for the floor: it keeps the backends that
    /// went down longest ago, a choice that does not flip while they keep failing).
    down_since: AtomicU64,
    healthy_gauge: IntGauge,
    ejected_active: IntCounter,
    ejected_passive: IntCounter,
}

/// What `/status` shows of a backend.
pub struct View {
    pub usable: bool,
    pub state: &'static str,
    pub ejected_until: Option<SystemTime>,
    pub reason: Option<&'static str>,
    /// Times taken out of rotation, by active checks and by passive ejection.
    pub ejections: (u64, u64),
}

impl BackendHealth {
    /// In rotation: not ejected and not failing its active checks.
    pub fn usable(&self) -> bool {
        !self.ejected.load(Relaxed)
            && !matches!(self.probe_state.load(Relaxed), UNHEALTHY | PENDING)
    }

    pub fn down_since_ms(&self) -> u64 {
        self.down_since.load(Relaxed)
    }

    fn went_down(&self, was_usable: bool, now: u64) {
        if was_usable {
            self.down_since.store(now, Relaxed);
        }
    }

    pub fn ejected_until_ms(&self) -> Option<u64> {
        self.ejected
            .load(Relaxed)
            .then(|| self.ejected_until.load(Relaxed))
    }

    fn refresh_gauge(&self) {
        self.healthy_gauge.set(i64::from(self.usable()));
    }

    /// A connection to the backend failed: unambiguous, it leaves the rotation at once.
    pub fn connect_failed(&self, eject: &Eject) {
        self.eject(eject, "connection failed");
    }

    /// A live request failed (timeout, reset, or a 502/503/504 from the backend).
    pub fn failure(&self, eject: &Eject) {
        let n = self.passive_failures.fetch_add(1, Relaxed) + 1;
        if n >= eject.consecutive_failures {
            self.eject(eject, &format!("{n} consecutive failures"));
        }
    }

    /// A live request succeeded.
    pub fn success(&self) {
        // read first: no write to a shared cache line on the common path
        if self.passive_failures.load(Relaxed) != 0 {
            self.passive_failures.store(0, Relaxed);
        }
    }

    fn eject(&self, eject: &Eject, why: &str) {
        let was_usable = self.usable();
        if self.ejected.swap(true, Relaxed) {
            return; // already out
        }
        let now = self.clock.now_ms();
        self.went_down(was_usable, now);
        // a backend that stayed in rotation for max_time starts its backoff afresh
        if now.saturating_sub(self.last_return.load(Relaxed)) > eject.max_time.as_millis() as u64 {
            self.ejections.store(0, Relaxed);
        }
        let k = self.ejections.fetch_add(1, Relaxed).min(20);
        let time = eject
            .base_time
            .saturating_mul(1u32 << k)
            .min(eject.max_time);
        self.ejected_until
            .store(now + time.as_millis() as u64, Relaxed);
        self.passive_failures.store(0, Relaxed);
        self.ejected_passive.inc();
        self.refresh_gauge();
        log::warn!(
            "backend {} of pool {} ejected for {:?} ({why})",
            self.address,
            self.pool,
            time
        );
    }

    /// The outcome of one active probe.
    pub fn probe_result(&self, ok: bool, check: &HealthCheck) {
        let now = self.clock.now_ms();
        if ok {
            self.fail_streak.store(0, Relaxed);
            let streak = self.ok_streak.fetch_add(1, Relaxed) + 1;
            if self.ejected.load(Relaxed) && now >= self.ejected_until.load(Relaxed) {
                self.ejected.store(false, Relaxed);
                self.last_return.store(now, Relaxed);
                log::info!(
                    "backend {} of pool {} back in rotation",
                    self.address,
                    self.pool
                );
            }
            let state = self.probe_state.load(Relaxed);
            if state == UNKNOWN
                || state == PENDING
                || (state == UNHEALTHY && streak >= check.healthy_after)
            {
                self.probe_state.store(HEALTHY, Relaxed);
                if state == PENDING {
                    log::info!(
                        "backend {} of pool {} passed its first probe: in rotation",
                        self.address,
                        self.pool
                    );
                } else if state == UNHEALTHY {
                    log::info!(
                        "backend {} of pool {} healthy again",
                        self.address,
                        self.pool
                    );
                }
            }
        } else {
            self.ok_streak.store(0, Relaxed);
            let streak = self.fail_streak.fetch_add(1, Relaxed) + 1;
            if self.probe_state.load(Relaxed) != UNHEALTHY && streak >= check.unhealthy_after {
                self.went_down(self.usable(), now);
                self.probe_state.store(UNHEALTHY, Relaxed);
                self.ejected_active.inc();
                log::warn!(
                    "backend {} of pool {} unhealthy after {streak} failed checks",
                    self.address,
                    self.pool
                );
            }
        }
        self.refresh_gauge();
    }

    pub fn view(&self) -> View {
        let ejected = self.ejected.load(Relaxed);
        let state = self.probe_state.load(Relaxed);
        View {
            usable: self.usable(),
            state: match (ejected, state) {
                (true, _) => "ejected",
                (_, UNHEALTHY) => "unhealthy",
                (_, HEALTHY) => "healthy",
                (_, PENDING) => "pending",
                _ => "unknown",
            },
            ejected_until: ejected.then(|| self.clock.wall(self.ejected_until.load(Relaxed))),
            reason: if ejected {
                Some("passive")
            } else if state == UNHEALTHY {
                Some("active")
            } else {
                None
            },
            ejections: (self.ejected_active.get(), self.ejected_passive.get()),
        }
    }
}

/// Every backend's health, keyed by pool + address; outlives snapshots.
pub struct Registry {
    clock: Clock,
    map: Mutex<HashMap<(String, SocketAddr), Arc<BackendHealth>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            clock: Clock(Instant::now()),
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl Registry {
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The health of `address` in `pool`, created on first use: unknown and in rotation, or
    /// (`pending`) out of rotation until its first good probe.
    pub fn get(
        &self,
        pool: &str,
        address: SocketAddr,
        pending: bool,
        metrics: &Metrics,
    ) -> Arc<BackendHealth> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((pool.to_string(), address))
            .or_insert_with(|| {
                let b = address.to_string();
                let gauge = metrics.backend_healthy.with_label_values(&[pool, &b]);
                gauge.set(i64::from(!pending));
                Arc::new(BackendHealth {
                    pool: pool.to_string(),
                    address,
                    clock: self.clock,
                    probe_state: AtomicU8::new(if pending { PENDING } else { UNKNOWN }),
                    ok_streak: AtomicU32::new(0),
                    fail_streak: AtomicU32::new(0),
                    ejected: AtomicBool::new(false),
                    ejected_until: AtomicU64::new(0),
                    passive_failures: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    last_return: AtomicU64::new(0),
                    down_since: AtomicU64::new(0),
                    healthy_gauge: gauge,
                    ejected_active: metrics
                        .backend_ejections
                        .with_label_values(&[pool, &b, "active"]),
                    ejected_passive: metrics
                        .backend_ejections
                        .with_label_values(&[pool, &b, "passive"]),
                })
            })
            .clone()
    }

    /// Forgets backends no longer in the config (their metrics series go too).
    pub fn retain(&self, keep: &HashSet<(String, SocketAddr)>, metrics: &Metrics) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| {
            let stay = keep.contains(k);
            if !stay {
                let b = k.1.to_string();
                let _ = metrics.backend_healthy.remove_label_values(&[&k.0, &b]);
            }
            stay
        });
    }
}

/// Which backends of a pool may take traffic: the usable ones, plus, when fewer than
/// `min_healthy` of them are usable, the others that failed least recently (went out of
/// rotation longest ago) up to that share.
pub fn allowed(health: &[Arc<BackendHealth>], min_healthy: f64) -> Vec<bool> {
    let mut ok: Vec<bool> = health.iter().map(|h| h.usable()).collect();
    let need = (min_healthy * health.len() as f64).ceil() as usize;
    let have = ok.iter().filter(|x| **x).count();
    if have < need {
        let mut rest: Vec<usize> = (0..health.len()).filter(|i| !ok[*i]).collect();
        rest.sort_by_key(|i| health[*i].down_since_ms());
        for i in rest.into_iter().take(need - have) {
            ok[i] = true;
        }
    }
    ok
}

/// One probe: a TCP connect, or an HTTP/1.1 GET (over TLS for TLS pools) where any 2xx or 3xx
/// answer is healthy.
pub async fn probe(target: &ProbeTarget, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, probe_inner(target))
        .await
        .unwrap_or(false)
}

async fn probe_inner(t: &ProbeTarget) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(t.address).await else {
        return false;
    };
    let Some(path) = &t.check.path else {
        return true;
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n",
        t.host
    );
    match &t.tls {
        Some((cfg, name)) => {
            let connector = tokio_rustls::TlsConnector::from(cfg.clone());
            match connector.connect(name.clone(), tcp).await {
                Ok(s) => http_status_ok(s, &request).await,
                Err(_) => false,
            }
        }
        None => http_status_ok(tcp, &request).await,
    }
}

async fn http_status_ok<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    request: &str,
) -> bool {
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 32];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    // "HTTP/1.1 200"
    let head = &buf[..got];
    head.starts_with(b"HTTP/1.") && matches!(head.get(9), Some(b'2') | Some(b'3'))
}

/// Everything one backend's prober needs.
#[derive(Clone)]
pub struct ProbeTarget {
    pub address: SocketAddr,
    pub host: String,
    pub check: HealthCheck,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub health: Arc<BackendHealth>,
}

/// Probes every backend of the current snapshot, each on its own task (a hung backend delays
/// nobody else), following reloads and changes of the pools' members.
pub struct Prober {
    /// The snapshot serving now.
    pub current: Arc<dyn Fn() -> Arc<Snapshot> + Send + Sync>,
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // (pool, address) -> (check, task)
        let mut tasks: HashMap<(String, SocketAddr), (HealthCheck, JoinHandle<()>)> =
            HashMap::new();
        let mut seen: Option<Arc<Snapshot>> = None;
        loop {
            let snap = (self.current)();
            if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &snap)) {
                seen = Some(snap.clone());
                let mut want = HashSet::new();
                for t in snap.probe_targets() {
                    let key = (t.health.pool.clone(), t.address);
                    want.insert(key.clone());
                    let same = tasks.get(&key).is_some_and(|(c, _)| *c == t.check);
                    if !same {
                        if let Some((_, old)) = tasks.remove(&key) {
                            old.abort();
                        }
                        let check = t.check.clone();
                        tasks.insert(key, (check, tokio::spawn(run_probes(t))));
                    }
                }
                tasks.retain(|k, (_, task)| {
                    let keep = want.contains(k);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
            }
            drop(snap);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        for (_, (_, t)) in tasks {
            t.abort();
        }
    }
}

async fn run_probes(t: ProbeTarget) {
    let interval = t.check.interval;
    // start soon, spread out so probes of many backends do not move in lockstep
    tokio::time::sleep(jitter(interval / 10)).await;
    loop {
        let ok = probe(&t, t.check.timeout).await;
        t.health.probe_result(ok, &t.check);
        // +-10% jitter around the interval
        let wait = interval.mul_f64(0.9) + jitter(interval / 5);
        tokio::time::sleep(wait).await;
    }
}

fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(fastrand::u64(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(reg: &Registry, m: &Metrics, port: u16) -> Arc<BackendHealth> {
        reg.get("p", SocketAddr::from(([127, 0, 0, 1], port)), false, m)
    }

    #[test]
    fn passive_ejection_doubles_and_returns_after_a_good_probe() {
        let m = Metrics::new().expect("metrics");
        let reg = Registry::default();
        let b = backend(&reg, &m, 1);
        let eject = Eject {
            consecutive_failures: 3,
            base_time: Duration::from_millis(0),
            max_time: Duration::from_secs(60),
        };
        let check = HealthCheck::default();
        assert!(b.usable());
        b.failure(&eject);
        b.failure(&eject);
        b.success();
        b.failure(&eject);
        b.failure(&eject);
        assert!(b.usable(), "success resets the count");
        b.failure(&eject);
        assert!(!b.usable());
        assert_eq!(b.view().reason, Some("passive"));
        b.probe_result(true, &check);
        assert!(
            b.usable(),
            "a good probe after the ejection time returns it"
        );

        let eject = Eject {
            consecutive_failures: 1,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(25),
        };
        let until = |b: &BackendHealth| b.ejected_until_ms().expect("ejected") - b.clock.now_ms();
        let c = backend(&reg, &m, 2);
        c.connect_failed(&eject);
        assert!((9_000..=10_000).contains(&until(&c)));
        c.probe_result(true, &check);
        assert!(!c.usable(), "not before the ejection time");
        // pretend the time passed, then fail again: twice as long, capped at max_time
        c.ejected_until.store(0, Relaxed);
        c.probe_result(true, &check);
        assert!(c.usable());
        c.connect_failed(&eject);
        assert!((19_000..=20_000).contains(&until(&c)));
        c.ejected_until.store(0, Relaxed);
        c.probe_result(true, &check);
        c.connect_failed(&eject);
        assert!((24_000..=25_000).contains(&until(&c)));
    }

    #[test]
    fn active_thresholds_do_not_flap() {
        let m = Metrics::new().expect("metrics");
        let reg = Registry::default();
        let b = backend(&reg, &m, 1);
        let check = HealthCheck {
            unhealthy_after: 2,
            healthy_after: 2,
            ..HealthCheck::default()
        };
        b.probe_result(false, &check);
        assert!(b.usable(), "one failed probe is not enough");
        b.probe_result(true, &check);
        b.probe_result(false, &check);
        assert!(b.usable());
        b.probe_result(false, &check);
        assert!(!b.usable());
        assert_eq!(b.view().reason, Some("active"));
        b.probe_result(true, &check);
        assert!(!b.usable(), "needs healthy_after good probes");
        b.probe_result(true, &check);
        assert!(b.usable());
    }

    #[test]
    fn floor_keeps_least_recently_failed() {
        let m = Metrics::new().expect("metrics");
        let reg = Registry::default();
        let eject = Eject {
            consecutive_failures: 1,
            ..Eject::default()
        };
        let hs: Vec<_> = (1..=4).map(|p| backend(&reg, &m, p)).collect();
        for h in &hs {
            h.connect_failed(&eject);
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(allowed(&hs, 0.0), vec![false; 4]);
        // half must stay: the two that went down longest ago
        assert_eq!(allowed(&hs, 0.5), vec![true, true, false, false]);
        // and the choice does not flip while they all keep failing
        for h in hs.iter().rev() {
            h.probe_result(false, &HealthCheck::default());
            h.failure(&eject);
        }
        assert_eq!(allowed(&hs, 0.5), vec![true, true, false, false]);
        // state survives: the registry hands out the same entry again
        assert!(Arc::ptr_eq(&hs[0], &backend(&reg, &m, 1)));
    }
}
