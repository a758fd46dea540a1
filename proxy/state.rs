//! State shared by the gateway, the admin API and the lifecycle: the current snapshot (swapped
//! atomically) and what must outlive any single snapshot.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access_log::AccessLogger;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::snapshot::{Registries, Snapshot};

pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub access_log: AccessLogger,
    pub lifecycle: Lifecycle,
    /// Backend health, keyed by pool + address: survives reloads.
    pub health: crate::health::Registry,
    /// Rate-limit buckets, keyed by scope + quota: survive reloads that keep the quota.
    pub limits: crate::rate_limit::Registry,
    /// Route weights, shifts and color error windows, keyed by route name; persisted in
    /// `admin.state_file`.
    pub traffic: Arc<crate::traffic::Traffic>,
    /// `admin.audit_log`.
    pub audit: Arc<crate::audit::Audit>,
    /// Fleet mode (`[cluster]`): the shared store of weights, shifts and counts.
    pub fleet: Option<Arc<crate::cluster::Fleet>>,
    /// Fleet mode: the exchange of fleet-wide rate-limit counts.
    pub exchange: Option<Arc<crate::cluster::limits::Exchange>>,
    /// OpenTelemetry spans (`[tracing]`); `None`: nothing is traced.
    pub tracing: Option<Arc<crate::trace::Tracing>>,
    /// Recent per-color counts of every route, for the status page.
    pub history: Arc<crate::history::History>,
    /// Changes waiting for a second token (`[admin] require_approval`): here, or in Redis in
    /// fleet mode.
    pub approvals: Arc<dyn crate::approvals::ApprovalStore>,
    /// Admin clients that failed authentication too often.
    pub lockout: crate::auth::Lockout,
    /// What the pools' backend names resolve to: survives reloads.
    pub discovery: Arc<crate::discovery::Discovery>,
    /// Open downstream connections (process and per client address).
    pub conns: crate::edge::conns::Conns,
    pub config_path: PathBuf,
    /// `file:line:col: message` of the last failed load, if the last load failed.
    pub last_error: Mutex<Option<String>>,
    /// What the served config changes that only a restart can apply (listeners, admin address,
    /// state file and audit log, threads, access log target), if anything.
    pub restart_required: Mutex<Option<String>>,
    /// Reloads run one at a time.
    reload_lock: Mutex<()>,
    /// Fingerprint of the config file and the files it names as of the last load, whether
    /// it succeeded or was refused: the watcher reloads only when the files differ from it.
    loaded_fingerprint: Mutex<String>,
}

impl Shared {
    pub fn new(config: Config, config_path: PathBuf) -> Result<Arc<Self>, String> {
        let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
        let access_log = AccessLogger::start(
            &config.server.access_log,
            metrics.access_log_dropped.clone(),
        )?;
        let loaded_fingerprint = Mutex::new(crate::watch::fingerprint(&config_files(
            &config_path,
            &config,
        )));
        let health = crate::health::Registry::default();
        let limits = crate::rate_limit::Registry::default();
        let traffic = Arc::new(crate::traffic::Traffic::new(
            // fleet mode keeps the state in the store, not in a file
            config
                .admin
                .state_file
                .clone()
                .filter(|_| config.cluster.is_none()),
            metrics.route_weight.clone(),
            metrics.shift_rollbacks.clone(),
        ));
        let (fleet, exchange) = match &config.cluster {
            Some(c) => {
                let (f, e) = crate::cluster::start(c, &config, &traffic, &metrics, &limits)?;
                (Some(f), Some(e))
            }
            None => (None, None),
        };
        traffic.apply_config(&config);
        let tracing = match &config.tracing {
            Some(t) => Some(Arc::new(crate::trace::Tracing::start(
                t,
                metrics.trace_spans_dropped.clone(),
            )?)),
            None => None,
        };
        let approvals: Arc<dyn crate::approvals::ApprovalStore> = match &fleet {
            Some(f) => Arc::new(crate::approvals::RedisApprovals::new(f.store.clone())),
            None => Arc::new(crate::approvals::LocalApprovals::default()),
        };
        let audit = Arc::new(crate::audit::Audit::new(
            config.admin.audit_log.clone(),
            config.cluster.as_ref().map(|c| c.instance.clone()),
        ));
        let discovery = Arc::new(crate::discovery::Discovery::new(
            metrics.dns_resolutions.clone(),
        ));
        if !crate::discovery::names(&config).is_empty() {
            // the names' first answers, so that the first snapshot has their members (a name
            // that does not answer in time leaves its pool empty until it does)
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("resolver runtime: {e}"))?;
            rt.block_on(crate::discovery::resolve_all(
                &discovery,
                &config,
                std::time::Duration::from_secs(3),
            ));
        }
        let snapshot = Snapshot::build(
            Arc::new(config),
            1,
            &Registries {
                metrics: &metrics,
                health: &health,
                limits: &limits,
                traffic: &traffic,
                discovery: &discovery,
            },
        );
        if let Some(f) = &fleet {
            // routes the store had no record of (or whose file changed) are recorded now
            f.nudge();
        }
        metrics.config_generation.set(1);
        metrics.config_last_reload_success.set(1);
        metrics.config_reloads.with_label_values(&["ok"]).inc();
        metrics.config_reloads.with_label_values(&["error"]);
        Ok(Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            access_log,
            lifecycle: Lifecycle::default(),
            health,
            limits,
            traffic,
            audit,
            fleet,
            exchange,
            approvals,
            history: Arc::default(),
            tracing,
            lockout: crate::auth::Lockout::default(),
            discovery,
            conns: crate::edge::conns::Conns::default(),
            config_path,
            last_error: Mutex::new(None),
            restart_required: Mutex::new(None),
            reload_lock: Mutex::new(()),
            loaded_fingerprint,
        }))
    }

    /// The config file and every file the serving config names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        config_files(&self.config_path, &self.snapshot().config)
    }

    /// Whether the watched files differ from what the last load read.
    pub fn files_changed(&self) -> bool {
        let now = crate::watch::fingerprint(&self.watched_files());
        *self
            .loaded_fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            != now
    }

    /// Re-reads the config file and everything it names; on success the new snapshot serves the
    /// next request, on failure the old one keeps serving and the error is reported in
    /// `/status`, the metrics and the log. Returns the generation now serving.
    pub fn reload(&self, cause: &str) -> Result<u64, String> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let m = &self.metrics;
        let mut cfg = match crate::config::load(&self.config_path) {
            Ok(cfg) => cfg,
            Err(diags) => {
                // remember the refused content, so only a further change retries it
                set(
                    &self.loaded_fingerprint,
                    crate::watch::fingerprint(&config_files(&self.config_path, &old.config)),
                );
                let msg = diags
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n");
                log::error!(
                    "config reload ({cause}) failed; still serving generation {}:\n{msg}",
                    old.generation
                );
                m.config_reloads.with_label_values(&["error"]).inc();
                m.config_last_reload_success.set(0);
                set(&self.last_error, Some(msg.clone()));
                return Err(msg);
            }
        };
        let restart = restart_needed(&old.config, &mut cfg);
        if let Some(r) = &restart {
            log::warn!("config reload ({cause}): restart required to apply: {r}; everything else applies now");
        }
        let generation = old.generation + 1;
        let sha = cfg.sha256.clone();
        set(
            &self.loaded_fingerprint,
            crate::watch::fingerprint(&config_files(&self.config_path, &cfg)),
        );
        self.traffic.apply_config(&cfg);
        if let Some(f) = &self.fleet {
            f.nudge();
        }
        let snap = Snapshot::build(Arc::new(cfg), generation, &self.registries());
        let limiters: Vec<_> = snap.routes.iter().filter_map(|r| r.limit.clone()).collect();
        self.install(snap);
        self.limits.retain(&limiters);
        m.config_reloads.with_label_values(&["ok"]).inc();
        m.config_last_reload_success.set(1);
        m.config_generation.set(generation as i64);
        set(&self.last_error, None);
        set(&self.restart_required, restart);
        log::info!("config reload ({cause}): generation {generation} serving (sha256 {sha})");
        Ok(generation)
    }

    fn registries(&self) -> Registries<'_> {
        Registries {
            metrics: &self.metrics,
            health: &self.health,
            limits: &self.limits,
            traffic: &self.traffic,
            discovery: &self.discovery,
        }
    }

    /// Serves `snap` from the next request on; forgets the health of backends it no longer has.
    fn install(&self, snap: Snapshot) {
        let keep = snap
            .pools
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| (p.name.clone(), b.address)))
            .collect();
        self.snapshot.store(Arc::new(snap));
        self.health.retain(&keep, &self.metrics);
    }

    /// A new snapshot of the serving config with the pools' current members (a backend name
    /// answered differently). The config generation stays.
    pub fn refresh_members(&self) {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.snapshot();
        let snap = Snapshot::build(old.config.clone(), old.generation, &self.registries());
        self.install(snap);
    }

    pub fn restart_required(&self) -> Option<String> {
        self.restart_required
            .lock()
            .map(|e| e.clone())
            .unwrap_or(None)
    }

    /// The snapshot serving requests now. Hold it for a whole request so indexes stay valid.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|e| e.clone()).unwrap_or(None)
    }
}

fn config_files(path: &std::path::Path, config: &Config) -> Vec<PathBuf> {
    std::iter::once(path.to_path_buf())
        .chain(config.files.iter().cloned())
        .collect()
}

fn set<T>(m: &Mutex<T>, v: T) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

/// Settings fixed when the process started. If `new` changes any of them, they are put back to
/// what is running (so the snapshot describes the process as it is) and the change is described.
fn restart_needed(running: &Config, new: &mut Config) -> Option<String> {
    let mut what = Vec::new();
    let ident = |l: &crate::config::Listener| (l.listen, l.tls, l.http2);
    for l in &new.listeners {
        match running.listeners.iter().find(|r| r.listen == l.listen) {
            None => what.push(format!("listener {} added", l.listen)),
            Some(r) if ident(r) != ident(l) => {
                what.push(format!("listener {} changes tls/http2", l.listen))
            }
            Some(_) => {}
        }
    }
    for r in &running.listeners {
        if !new.listeners.iter().any(|l| l.listen == r.listen) {
            what.push(format!("listener {} removed", r.listen));
        }
    }
    if !what.is_empty() {
        // Live settings of listeners that stay (redirect_https) still apply.
        let kept: Vec<_> = running
            .listeners
            .iter()
            .map(|r| {
                new.listeners
                    .iter()
                    .find(|l| ident(l) == ident(r))
                    .cloned()
                    .unwrap_or_else(|| r.clone())
            })
            .collect();
        new.listeners = kept;
    }
    if new.admin.listen != running.admin.listen {
        what.push(format!(
            "admin.listen {} -> {}",
            running.admin.listen, new.admin.listen
        ));
        new.admin.listen = running.admin.listen;
    }
    if new.admin.state_file != running.admin.state_file {
        what.push("admin.state_file".to_string());
        new.admin.state_file = running.admin.state_file.clone();
    }
    if new.admin.audit_log != running.admin.audit_log {
        what.push("admin.audit_log".to_string());
        new.admin.audit_log = running.admin.audit_log.clone();
    }
    if new.server.threads != running.server.threads {
        what.push(format!(
            "server.threads {} -> {}",
            running.server.threads, new.server.threads
        ));
        new.server.threads = running.server.threads;
    }
    if new.tracing != running.tracing {
        what.push("[tracing]".to_string());
        new.tracing = running.tracing.clone();
    }
    if new.cluster != running.cluster {
        what.push("[cluster]".to_string());
        new.cluster = running.cluster.clone();
    }
    let scope = |c: &Config| c.rate_limit.as_ref().and_then(|r| r.cluster_sync);
    if scope(new) != scope(running) {
        what.push("rate_limit.scope/sync".to_string());
        let keep = scope(running);
        if let Some(r) = new.rate_limit.as_mut() {
            r.cluster_sync = keep;
        }
    }
    if new.server.access_log != running.server.access_log {
        what.push("server.access_log target".to_string());
        new.server.access_log = running.server.access_log.clone();
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// Readiness and draining, plus the count of requests in flight (for graceful shutdown).
#[derive(Default)]
pub struct Lifecycle {
    ready: AtomicBool,
    watching: AtomicBool,
    draining: AtomicBool,
    inflight: Arc<AtomicUsize>,
}

impl Lifecycle {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    /// The file watcher is in place (or could not be, and said so).
    pub fn set_watching(&self) {
        self.watching.store(true, Ordering::SeqCst);
    }
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// `/readyz`: loaded, listening, watching for changes, and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && self.watching.load(Ordering::SeqCst)
            && !self.is_draining()
    }
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }
    /// Counts one request in flight until the guard is dropped.
    pub fn enter(&self) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.inflight.clone())
    }
}

pub struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
