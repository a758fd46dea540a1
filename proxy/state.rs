//! State shared by the gateway, the admin API and the lifecycle: the current snapshot (swapped
//! atomically) and what must outlive any single snapshot.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access_log::AccessLogger;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

pub struct Shared {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub access_log: AccessLogger,
    pub lifecycle: Lifecycle,
    pub config_path: PathBuf,
    /// `file:line:col: message` of the last failed load, if the last load failed.
    pub last_error: Mutex<Option<String>>,
}

impl Shared {
    pub fn new(config: Config, config_path: PathBuf) -> Result<Arc<Self>, String> {
        let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
        let access_log = AccessLogger::start(
            &config.server.access_log,
            metrics.access_log_dropped.clone(),
        )?;
        let snapshot = Snapshot::build(config, 1, &metrics);
        metrics.config_generation.set(1);
        metrics.config_last_reload_success.set(1);
        metrics.config_reloads.with_label_values(&["ok"]).inc();
        Ok(Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            access_log,
            lifecycle: Lifecycle::default(),
            config_path,
            last_error: Mutex::new(None),
        }))
    }

    /// The snapshot serving requests now. Hold it for a whole request so indexes stay valid.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|e| e.clone()).unwrap_or(None)
    }
}

/// Readiness and draining, plus the count of requests in flight (for graceful shutdown).
#[derive(Default)]
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
    inflight: Arc<AtomicUsize>,
}

impl Lifecycle {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// `/readyz`: loaded, listening, and not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining()
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
