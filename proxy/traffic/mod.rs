//! Blue-green traffic: the weights of each route (from the config file or set through the admin
//! API), gradual shifts with automatic rollback, per-color error windows, and their persistence
//! in `admin.state_file`.
//!
//! This state outlives config reloads: it is keyed by route name, and each snapshot's routes
//! hold the `RouteControl` of their name. The request path reads one atomic (the green weight)
//! and records its outcome in a lock-free window; everything else happens under a lock, on
//! admin calls and on the controller's tick.

pub mod sticky;
pub mod store;
pub mod window;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounterVec, IntGaugeVec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{Config, Rollback};
use crate::snapshot::Snapshot;
use store::{Loaded, Saved, SavedRoute};
use window::Window;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn index(self) -> usize {
        match self {
            Color::Blue => 0,
            Color::Green => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }
    /// `blue` or `green`, in any case.
    pub fn parse(s: &str) -> Option<Color> {
        if s.eq_ignore_ascii_case("blue") {
            Some(Color::Blue)
        } else if s.eq_ignore_ascii_case("green") {
            Some(Color::Green)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Shares of clients, summing to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub blue: u8,
    pub green: u8,
}

impl Weights {
    pub fn new(blue: u8, green: u8) -> Weights {
        Weights { blue, green }
    }
    pub fn valid(&self) -> bool {
        u16::from(self.blue) + u16::from(self.green) == 100
    }
    pub fn of(&self, c: Color) -> u8 {
        match c {
            Color::Blue => self.blue,
            Color::Green => self.green,
        }
    }
    /// `c` gets `share` (at most 100), the other color the rest.
    pub fn with(c: Color, share: u8) -> Weights {
        let share = share.min(100);
        match c {
            Color::Blue => Weights::new(share, 100 - share),
            Color::Green => Weights::new(100 - share, share),
        }
    }
    pub fn to_json(self) -> Value {
        json!({ "blue": self.blue, "green": self.green })
    }
}

/// Who set the weights in force: the config file or the admin API (a shift is an admin action).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Admin,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShiftState {
    Running,
    Done,
    RolledBack,
    Stopped,
}

impl ShiftState {
    pub fn name(self) -> &'static str {
        match self {
            ShiftState::Running => "running",
            ShiftState::Done => "done",
            ShiftState::RolledBack => "rolled_back",
            ShiftState::Stopped => "stopped",
        }
    }
}

/// A gradual shift: `step` points towards `to` every `every` until `to` has 100. The last shift
/// of a route stays on record (done, rolled back, stopped) until the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shift {
    pub to: Color,
    pub step: u8,
    pub every_ms: u64,
    /// The weights (and their source) the shift started from: a rollback restores them.
    pub from: Weights,
    pub from_source: Source,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// When the next step is due (unix ms); `None` unless running.
    pub next_at_ms: Option<u64>,
    pub state: ShiftState,
    pub reason: Option<String>,
}

impl Shift {
    fn end(&mut self, state: ShiftState, reason: Option<String>) {
        self.state = state;
        self.reason = reason;
        self.next_at_ms = None;
    }
    fn running(&self) -> bool {
        self.state == ShiftState::Running
    }
}

/// A refused admin operation: HTTP status and the reason for the `{"error": …}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

fn refused(status: u16, reason: impl Into<String>) -> Refused {
    Refused {
        status,
        reason: reason.into(),
    }
}

/// What an accepted admin operation did: the route before and after, and a warning when the
/// change could not be written to the state file (it applies all the same).
pub struct Change {
    pub before: Value,
    pub after: Value,
    pub warning: Option<String>,
}

/// A shift undone by the controller.
pub struct RolledBack {
    pub route: String,
    pub reason: String,
    pub before: Value,
    pub after: Value,
}

#[derive(Debug, Clone)]
struct Inner {
    /// Incremented by every change; in fleet mode, the Redis record's revision.
    rev: u64,
    weights: Weights,
    source: Source,
    /// The config file's weights as last read: the admin weights hold until they change.
    config_weights: Weights,
    shift: Option<Shift>,
    has_green: bool,
    rollback: Option<Rollback>,
}

impl Inner {
    fn stop_running(&mut self, state: ShiftState, reason: &str) {
        if let Some(s) = self.shift.as_mut().filter(|s| s.running()) {
            s.end(state, Some(reason.to_string()));
        }
    }
    fn saved(&self) -> Option<SavedRoute> {
        (self.source == Source::Admin || self.shift.is_some()).then(|| self.record())
    }
    /// The whole state, as fleet mode records it.
    fn record(&self) -> SavedRoute {
        SavedRoute {
            weights: self.weights,
            source: self.source,
            config_weights: self.config_weights,
            shift: self.shift.clone(),
        }
    }
    fn take(&mut self, rev: u64, r: SavedRoute) {
        self.rev = rev;
        self.weights = r.weights;
        self.source = r.source;
        self.config_weights = r.config_weights;
        self.shift = r.shift;
        if !self.has_green && self.weights.green > 0 {
            // the fleet says green, but this replica's config has no green pools
            self.weights = Weights::new(100, 0);
        }
    }
}

/// One route's live traffic state.
pub struct RouteControl {
    pub name: String,
    green: AtomicU8,
    windows: [Window; 2],
    /// Requests and failures per color since start (fleet mode sends the increments).
    served: [[AtomicU64; 2]; 2],
    inner: Mutex<Inner>,
}

impl RouteControl {
    /// A control outside any registry, with the config's weights.
    pub fn detached(name: &str, green: u8) -> RouteControl {
        let w = Weights::with(Color::Green, green);
        RouteControl {
            name: name.to_string(),
            green: AtomicU8::new(w.green),
            windows: std::array::from_fn(|_| Window::new(Rollback::default().window)),
            served: Default::default(),
            inner: Mutex::new(Inner {
                rev: 0,
                weights: w,
                source: Source::Config,
                config_weights: w,
                shift: None,
                has_green: false,
                rollback: None,
            }),
        }
    }

    /// The green weight in force (the request path's one read).
    pub fn green_weight(&self) -> u8 {
        self.green.load(Ordering::Relaxed)
    }

    /// Counts a request (or a failed connection attempt) to `color` for rollback decisions.
    pub fn record(&self, color: Color, failed: bool) {
        self.windows[color.index()].record(failed);
        let served = &self.served[color.index()];
        served[0].fetch_add(1, Ordering::Relaxed);
        if failed {
            served[1].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests and failures to `color` since start.
    pub fn served(&self, color: Color) -> (u64, u64) {
        let s = &self.served[color.index()];
        (s[0].load(Ordering::Relaxed), s[1].load(Ordering::Relaxed))
    }

    /// The revision of the state in force.
    pub fn revision(&self) -> u64 {
        self.lock().rev
    }

    /// The rollback rule and, if a shift is running, its target and start (fleet mode's
    /// controller fetches the fleet's counts for these).
    pub fn running_shift(&self) -> Option<(Color, u64, Option<Rollback>)> {
        let i = self.lock();
        i.shift
            .as_ref()
            .filter(|s| s.running())
            .map(|s| (s.to, s.started_at_ms, i.rollback))
    }

    pub fn totals(&self, color: Color) -> window::Totals {
        self.windows[color.index()].totals()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /routes/{name}`.
    pub fn to_json(&self) -> Value {
        route_json(&self.name, &self.lock())
    }
}

fn rfc3339_ms(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn route_json(name: &str, i: &Inner) -> Value {
    json!({
        "name": name,
        "revision": i.rev,
        "weights": i.weights.to_json(),
        "source": i.source.name(),
        "shift": i.shift.as_ref().map(|s| json!({
            "to": s.to.name(),
            "step": s.step,
            "every": humantime::format_duration(Duration::from_millis(s.every_ms)).to_string(),
            "next_at": s.next_at_ms.map(rfc3339_ms),
            "state": s.state.name(),
            "reason": s.reason,
            "from": s.from.to_json(),
            "started_at": rfc3339_ms(s.started_at_ms),
        })),
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every route's traffic state, keyed by route name.
pub struct Traffic {
    routes: RwLock<HashMap<String, Arc<RouteControl>>>,
    /// Serializes changes (admin calls, reloads, the controller) so that each is written to the
    /// state file whole and in order; holds the state read at start until routes claim it.
    ops: Mutex<HashMap<String, SavedRoute>>,
    state_file: Option<PathBuf>,
    /// The state file exists but could not be read: it is never written over.
    read_only: bool,
    /// The last problem with the state file (shown in `/status`).
    problem: Mutex<Option<String>>,
    route_weight: IntGaugeVec,
    rollbacks: IntCounterVec,
    /// Fleet mode: revisions of the records preloaded from the store, and the routes whose
    /// state the config file changed (to be recorded in the store).
    fleet: Mutex<Option<Fleet>>,
}

#[derive(Default)]
struct Fleet {
    revs: HashMap<String, u64>,
    to_push: std::collections::BTreeSet<String>,
}

impl Traffic {
    /// Reads `state_file` (if any). A missing file is a fresh start; a corrupt one is reported,
    /// copied aside and ignored; an unreadable one is reported and never overwritten.
    pub fn new(
        state_file: Option<PathBuf>,
        route_weight: IntGaugeVec,
        rollbacks: IntCounterVec,
    ) -> Traffic {
        let mut pending = HashMap::new();
        let mut problem = None;
        let mut read_only = false;
        if let Some(path) = &state_file {
            match store::load(path) {
                Loaded::Missing => {}
                Loaded::Found(s) => {
                    log::info!(
                        "restored admin traffic state of {} route(s) from {}",
                        s.routes.len(),
                        path.display()
                    );
                    pending = s.routes.into_iter().collect();
                }
                Loaded::Corrupt { error, kept } => {
                    let msg = format!(
                        "state file ignored: {error}{}",
                        kept.map(|k| format!(" (copied to {})", k.display()))
                            .unwrap_or_default()
                    );
                    log::error!("{msg}; starting from the config's weights");
                    problem = Some(msg);
                }
                Loaded::Unreadable(e) => {
                    log::error!("state file ignored and left untouched: {e}");
                    problem = Some(format!("state file ignored and not written: {e}"));
                    read_only = true;
                }
            }
        }
        Traffic {
            routes: RwLock::new(HashMap::new()),
            ops: Mutex::new(pending),
            state_file,
            read_only,
            problem: Mutex::new(problem),
            route_weight,
            rollbacks,
            fleet: Mutex::new(None),
        }
    }

    /// Fleet mode: the state comes from the store's records (revision, state) instead of the
    /// state file; call before the first `apply_config`.
    pub fn preload(&self, records: Vec<(String, u64, SavedRoute)>) {
        let mut f = Fleet::default();
        let mut pending = self.ops();
        pending.clear();
        for (name, rev, r) in records {
            f.revs.insert(name.clone(), rev);
            pending.insert(name, r);
        }
        *self.fleet.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Fleet mode: the routes whose state the config file changed since the last call.
    pub fn take_pushes(&self) -> Vec<String> {
        self.fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(|f| std::mem::take(&mut f.to_push).into_iter().collect())
            .unwrap_or_default()
    }

    /// Fleet mode: `route` must be recorded in the store again (its local state is newer).
    pub fn push_later(&self, route: &str) {
        if let Some(f) = self
            .fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            f.to_push.insert(route.to_string());
        }
    }

    fn ops(&self) -> MutexGuard<'_, HashMap<String, SavedRoute>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<RouteControl>>> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, route: &str) -> Option<Arc<RouteControl>> {
        self.map().get(route).cloned()
    }

    /// The last state file problem, if any.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().map(|p| p.clone()).unwrap_or(None)
    }

    /// Brings the routes in line with a config that is about to serve. A route whose file
    /// weights changed takes them (the latest action wins); otherwise admin weights and shifts
    /// stay. At the first load, the state file's routes are restored by the same rule.
    pub fn apply_config(&self, cfg: &Config) {
        let mut pending = self.ops();
        let mut fleet = self.fleet.lock().unwrap_or_else(|e| e.into_inner());
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let mut old = std::mem::take(&mut *routes);
        let mut changed = false;
        for r in &cfg.routes {
            let file = Weights::new(r.weights.0, r.weights.1);
            let has_green = !r.green.is_empty();
            let window = r.rollback.unwrap_or_default().window;
            let ctl = match old.remove(&r.name) {
                Some(ctl) => ctl,
                None => {
                    let (mut inner, restored_changed) =
                        restore(&r.name, file, pending.remove(&r.name));
                    inner.rev = fleet
                        .as_ref()
                        .and_then(|f| f.revs.get(&r.name).copied())
                        .unwrap_or(0);
                    if let Some(f) = fleet.as_mut() {
                        // a route the store has no record of yet is recorded from the file
                        if restored_changed || !f.revs.contains_key(&r.name) {
                            inner.rev += u64::from(restored_changed);
                            f.to_push.insert(r.name.clone());
                        }
                    }
                    changed |= restored_changed;
                    Arc::new(RouteControl {
                        name: r.name.clone(),
                        green: AtomicU8::new(inner.weights.green),
                        windows: [Window::new(window), Window::new(window)],
                        served: Default::default(),
                        inner: Mutex::new(inner),
                    })
                }
            };
            {
                let mut i = ctl.lock();
                if i.config_weights != file {
                    if i.source == Source::Admin {
                        log::info!(
                            "route {}: the config file's weights changed to {}/{}: they replace the admin weights {}/{}",
                            r.name, file.blue, file.green, i.weights.blue, i.weights.green
                        );
                    }
                    changed |= i.source == Source::Admin || i.shift.is_some();
                    i.rev += 1;
                    if let Some(f) = fleet.as_mut() {
                        f.to_push.insert(r.name.clone());
                    }
                    i.weights = file;
                    i.source = Source::Config;
                    i.config_weights = file;
                    i.stop_running(ShiftState::Stopped, "the config file's weights changed");
                }
                if !has_green && i.weights.green > 0 {
                    i.weights = Weights::new(100, 0);
                    i.source = Source::Config;
                    i.stop_running(ShiftState::Stopped, "the route has no green pools");
                    changed = true;
                }
                i.has_green = has_green;
                i.rollback = r.rollback;
                // exported from the start (0), so dashboards and alerts see the series
                self.rollbacks.with_label_values(&[&r.name]);
                for w in &ctl.windows {
                    w.set_window(window);
                }
                self.publish(&ctl, &i);
            }
            routes.insert(r.name.clone(), ctl);
        }
        for (name, ctl) in old {
            changed |= ctl.lock().saved().is_some();
            let _ = self.rollbacks.remove_label_values(&[&name]);
            for c in ["blue", "green"] {
                let _ = self.route_weight.remove_label_values(&[&name, c]);
            }
        }
        // state of routes the config does not have is dropped at the first save
        pending.clear();
        if let Some(f) = fleet.as_mut() {
            f.revs.clear();
        }
        if changed && fleet.is_none() {
            self.save(&routes, None);
        }
    }

    fn publish(&self, ctl: &RouteControl, i: &Inner) {
        ctl.green.store(i.weights.green, Ordering::Relaxed);
        for c in [Color::Blue, Color::Green] {
            self.route_weight
                .with_label_values(&[&ctl.name, c.name()])
                .set(i64::from(i.weights.of(c)));
        }
    }

    /// Writes every route's admin state, with `replace` standing in for one route's; records
    /// (and returns) the problem if that fails.
    fn save(
        &self,
        routes: &HashMap<String, Arc<RouteControl>>,
        replace: Option<(&str, &Inner)>,
    ) -> Option<String> {
        let path = self.state_file.as_ref()?;
        if self.read_only {
            return Some(format!(
                "not saved: {} could not be read at start and is left untouched",
                path.display()
            ));
        }
        let saved = Saved {
            version: store::VERSION,
            routes: routes
                .iter()
                .filter_map(|(name, ctl)| {
                    let s = match replace {
                        Some((n, i)) if n == name => i.saved(),
                        _ => ctl.lock().saved(),
                    };
                    s.map(|s| (name.clone(), s))
                })
                .collect(),
        };
        let result = store::save(path, &saved);
        let mut problem = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                *problem = None;
                None
            }
            Err(e) => {
                log::error!("admin traffic state not saved: {e}");
                *problem = Some(e.clone());
                Some(e)
            }
        }
    }

    /// Works out `op` on a route's current state: the control, the state before and after.
    fn compute(&self, route: &str, op: Op) -> Result<(Arc<RouteControl>, Inner, Inner), Refused> {
        let ctl = self
            .get(route)
            .ok_or_else(|| refused(404, format!("unknown route \"{route}\"")))?;
        let before = ctl.lock().clone();
        let mut after = before.clone();
        apply_op(route, &mut after, &ctl, op)?;
        after.rev = before.rev + 1;
        Ok((ctl, before, after))
    }

    /// Applies an admin operation here (one replica: the state file keeps it).
    pub fn apply(&self, route: &str, op: Op) -> Result<Change, Refused> {
        let _ops = self.ops();
        let (ctl, before, after) = self.compute(route, op)?;
        let warning = {
            let routes = self.map();
            self.save(&routes, Some((route, &after)))
        };
        let mut i = ctl.lock();
        *i = after;
        self.publish(&ctl, &i);
        Ok(Change {
            before: route_json(route, &before),
            after: route_json(route, &i),
            warning,
        })
    }

    /// An admin operation worked out but not applied (fleet mode commits it to the store
    /// first): the revision it builds on, the state before (JSON) and the record after.
    pub fn propose(&self, route: &str, op: Op) -> Result<(u64, Value, SavedRoute), Refused> {
        let (_, before, after) = self.compute(route, op)?;
        Ok((before.rev, route_json(route, &before), after.record()))
    }

    /// Takes a route's state as recorded elsewhere (the fleet's store) if it is newer than
    /// the one in force. Returns the route's JSON after.
    pub fn adopt(&self, route: &str, rev: u64, r: SavedRoute) -> Option<Value> {
        let ctl = self.get(route)?;
        let mut i = ctl.lock();
        if rev < i.rev {
            return None;
        }
        // nothing new once this replica's own limits apply (a route without green pools here)
        let mut next = i.clone();
        next.take(rev, r.clone());
        if next.rev == i.rev && next.record() == i.record() {
            return None;
        }
        if i.weights != r.weights {
            log::info!(
                "route {route}: fleet revision {rev}: blue {} / green {}",
                r.weights.blue,
                r.weights.green
            );
        }
        i.take(rev, r);
        self.publish(&ctl, &i);
        Some(route_json(route, &i))
    }

    /// The route's JSON for a given revision and state (what a write left, even when a newer
    /// one is already in force).
    pub fn json_of(&self, route: &str, rev: u64, r: SavedRoute) -> Option<Value> {
        let ctl = self.get(route)?;
        let mut i = ctl.lock().clone();
        i.take(rev, r);
        Some(route_json(route, &i))
    }

    /// One route's revision and whole state.
    pub fn record_of(&self, route: &str) -> Option<(u64, SavedRoute)> {
        let ctl = self.get(route)?;
        let i = ctl.lock();
        Some((i.rev, i.record()))
    }

    /// Every route's revision and whole state (fleet mode re-seeds an empty store with them).
    pub fn records(&self) -> Vec<(String, u64, SavedRoute)> {
        self.map()
            .iter()
            .map(|(n, c)| {
                let i = c.lock();
                (n.clone(), i.rev, i.record())
            })
            .collect()
    }

    /// Every route's name.
    pub fn route_names(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    /// `PUT /routes/{name}/weights`: takes effect for the next request; stops a running shift.
    pub fn set_weights(&self, route: &str, w: Weights) -> Result<Change, Refused> {
        self.apply(route, Op::Weights(w))
    }

    /// `POST /routes/{name}/shift`: the first step is taken at once, the next after `every`.
    pub fn start_shift(
        &self,
        route: &str,
        to: Color,
        step: u8,
        every: Duration,
    ) -> Result<Change, Refused> {
        self.apply(route, Op::Shift { to, step, every })
    }

    /// `DELETE /routes/{name}/shift`: a running shift stops where it is.
    pub fn stop_shift(&self, route: &str) -> Result<Change, Refused> {
        self.apply(route, Op::Stop)
    }

    /// The controller's tick on this replica's own counts: rolls back shifts whose target
    /// fails, takes the steps that are due. Returns the rollbacks (for the log and the audit
    /// trail).
    pub fn tick(&self, snap: &Snapshot) -> Vec<RolledBack> {
        let _ops = self.ops();
        let decisions = self.decide(snap, &|ctl, c| ctl.totals(c), true);
        self.apply_decisions(decisions)
    }

    /// Applies decisions here; saves the state file once.
    pub fn apply_decisions(&self, decisions: Vec<Decision>) -> Vec<RolledBack> {
        if decisions.is_empty() {
            return Vec::new();
        }
        let mut events = Vec::new();
        let routes = self.map();
        for d in decisions {
            let Some(ctl) = routes.get(&d.route) else {
                continue;
            };
            let mut i = ctl.lock();
            if i.rev != d.base {
                continue;
            }
            *i = d.after;
            self.publish(ctl, &i);
            if let Some(e) = d.event {
                self.rolled_back(&e);
                events.push(e);
            }
        }
        self.save(&routes, None);
        events
    }

    /// Counts and logs a rollback (by whichever replica made it).
    pub fn rolled_back(&self, e: &RolledBack) {
        self.rollbacks.with_label_values(&[&e.route]).inc();
        log::warn!("route {}: shift rolled back: {}", e.route, e.reason);
    }

    /// What the controller would change now: rollbacks of shifts whose target fails (judged
    /// on `totals`), and, with `steps`, the steps that are due.
    pub fn decide(
        &self,
        snap: &Snapshot,
        totals: &dyn Fn(&RouteControl, Color) -> window::Totals,
        steps: bool,
    ) -> Vec<Decision> {
        let routes = self.map();
        let now = now_ms();
        let mut out = Vec::new();
        for rt in &snap.routes {
            let ctl = &rt.control;
            // a route renamed away by a reload in between: not this map's control
            if !routes.get(&ctl.name).is_some_and(|c| Arc::ptr_eq(c, ctl)) {
                continue;
            }
            let before = ctl.lock().clone();
            let Some(shift) = before.shift.clone().filter(Shift::running) else {
                continue;
            };
            let mut i = before.clone();
            i.rev += 1;
            let to = shift.to;
            let healthy = rt.colors[to.index()]
                .pools
                .iter()
                .any(|p| snap.pools[*p].backends.iter().any(|b| b.health.usable()));
            let why = if !healthy {
                Some(format!("{to} has no healthy backend"))
            } else {
                i.rollback.and_then(|rule| {
                    let t = totals(ctl, to);
                    (t.requests >= u64::from(rule.min_requests)
                        && t.error_rate() > rule.max_error_rate)
                        .then(|| {
                            format!(
                                "{to} error rate {:.1}% ({} of {} requests in {}) is over {:.1}%",
                                t.error_rate() * 100.0,
                                t.failures,
                                t.requests,
                                humantime::format_duration(rule.window),
                                rule.max_error_rate * 100.0
                            )
                        })
                })
            };
            let event = if let Some(reason) = why {
                i.weights = shift.from;
                i.source = shift.from_source;
                if let Some(s) = i.shift.as_mut() {
                    s.end(ShiftState::RolledBack, Some(reason.clone()));
                }
                Some(RolledBack {
                    route: ctl.name.clone(),
                    reason,
                    before: route_json(&ctl.name, &before),
                    after: route_json(&ctl.name, &i),
                })
            } else if steps && shift.next_at_ms.is_some_and(|t| t <= now) {
                i.weights = Weights::with(to, i.weights.of(to).saturating_add(shift.step));
                let done = i.weights.of(to) == 100;
                if let Some(s) = i.shift.as_mut() {
                    if done {
                        s.end(ShiftState::Done, None);
                    } else {
                        // steps keep their cadence; after a long pause, the next is `every` on
                        s.next_at_ms = Some((s.next_at_ms.unwrap_or(now) + s.every_ms).max(now));
                    }
                }
                log::info!(
                    "route {}: shift to {to}: blue {} / green {}{}",
                    ctl.name,
                    i.weights.blue,
                    i.weights.green,
                    if done { " (done)" } else { "" }
                );
                None
            } else {
                continue;
            };
            out.push(Decision {
                route: ctl.name.clone(),
                base: before.rev,
                after: i,
                event,
            });
        }
        out
    }
}

/// An admin operation on a route's traffic.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Weights(Weights),
    Shift {
        to: Color,
        step: u8,
        every: Duration,
    },
    Stop,
}

fn apply_op(route: &str, i: &mut Inner, ctl: &RouteControl, op: Op) -> Result<(), Refused> {
    match op {
        Op::Weights(w) => {
            if w.green > 0 && !i.has_green {
                return Err(refused(
                    400,
                    format!("route \"{route}\" has no green pools: green must be 0"),
                ));
            }
            i.stop_running(ShiftState::Stopped, "weights set through the API");
            i.weights = w;
            i.source = Source::Admin;
        }
        Op::Shift { to, step, every } => {
            if !i.has_green {
                return Err(refused(
                    400,
                    format!("route \"{route}\" has no green pools to shift between"),
                ));
            }
            if i.shift.as_ref().is_some_and(Shift::running) {
                return Err(refused(
                    409,
                    format!("a shift is already running on route \"{route}\" (DELETE /routes/{route}/shift stops it)"),
                ));
            }
            let now = now_ms();
            let every_ms = every.as_millis() as u64;
            let mut shift = Shift {
                to,
                step,
                every_ms,
                from: i.weights,
                from_source: i.source,
                started_at_ms: now,
                next_at_ms: Some(now + every_ms),
                state: ShiftState::Running,
                reason: None,
            };
            // the target is judged on what it serves during this shift
            ctl.windows[to.index()].reset();
            i.weights = Weights::with(to, i.weights.of(to).saturating_add(step));
            if i.weights.of(to) == 100 {
                shift.end(ShiftState::Done, None);
            }
            i.shift = Some(shift);
            i.source = Source::Admin;
        }
        Op::Stop => i.stop_running(ShiftState::Stopped, "stopped through the API"),
    }
    Ok(())
}

/// A change the controller decided on, built on revision `base` of the route.
pub struct Decision {
    pub route: String,
    pub base: u64,
    after: Inner,
    pub event: Option<RolledBack>,
}

impl Decision {
    /// The route's whole state after the change.
    pub fn record(&self) -> SavedRoute {
        self.after.record()
    }
}

/// A route's state at the first load: the state file's if the config file still has the
/// weights it was taken against; the file's otherwise. Also says whether the state file needs
/// rewriting.
fn restore(name: &str, file: Weights, saved: Option<SavedRoute>) -> (Inner, bool) {
    let mut i = Inner {
        rev: 0,
        weights: file,
        source: Source::Config,
        config_weights: file,
        shift: None,
        has_green: false,
        rollback: None,
    };
    let Some(s) = saved else {
        return (i, false);
    };
    if s.config_weights == file {
        i.weights = s.weights;
        i.source = s.source;
        i.shift = s.shift;
        if let Some(sh) = i.shift.as_ref().filter(|s| s.running()) {
            log::info!(
                "route {name}: resuming the shift to {} at blue {} / green {}",
                sh.to,
                i.weights.blue,
                i.weights.green
            );
        }
        (i, false)
    } else {
        log::info!(
            "route {name}: the config file's weights changed while sluice was stopped: they replace the saved admin weights"
        );
        i.shift = s.shift;
        i.stop_running(
            ShiftState::Stopped,
            "the config file's weights changed while sluice was stopped",
        );
        (i, true)
    }
}

/// Runs the shift controller every 100 ms: rollbacks happen well within a second of their
/// condition, steps within 100 ms of being due.
pub struct Controller {
    pub traffic: Arc<Traffic>,
    pub audit: Arc<crate::audit::Audit>,
    pub current: Arc<dyn Fn() -> Arc<Snapshot> + Send + Sync>,
}

pub const TICK: Duration = Duration::from_millis(100);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Controller {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.changed() => return,
            }
            let (traffic, audit, snap) =
                (self.traffic.clone(), self.audit.clone(), (self.current)());
            // the state file is written with fsync: off the async threads
            let done = tokio::task::spawn_blocking(move || {
                for e in traffic.tick(&snap) {
                    audit.rollback(&e);
                }
            })
            .await;
            if let Err(e) = done {
                log::error!("shift controller: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(state: Option<PathBuf>) -> Traffic {
        let g =
            IntGaugeVec::new(prometheus::Opts::new("w", "w"), &["route", "color"]).expect("gauge");
        let c = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["route"]).expect("counter");
        Traffic::new(state, g, c)
    }

    fn config(dir: &std::path::Path, green_weight: u8) -> Config {
        let text = format!(
            r#"
[admin]
listen = "127.0.0.1:1"
[[listener]]
listen = "127.0.0.1:2"
[[pool]]
name = "b"
backends = ["127.0.0.1:3"]
[[pool]]
name = "g"
backends = ["127.0.0.1:4"]
[[route]]
name = "shop"
hosts = ["*"]
blue = ["b"]
green = ["g"]
weights = {{ blue = {}, green = {green_weight} }}
"#,
            100 - green_weight
        );
        crate::config::parse(&dir.join("sluice.toml"), &text).expect("config")
    }

    fn weights(t: &Traffic) -> (u8, Source) {
        let ctl = t.get("shop").expect("route");
        let i = ctl.lock();
        (i.weights.green, i.source)
    }

    #[test]
    fn admin_weights_hold_until_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state.json");
        let t = traffic(Some(state.clone()));
        t.apply_config(&config(dir.path(), 0));
        assert_eq!(weights(&t), (0, Source::Config));
        t.set_weights("shop", Weights::new(70, 30)).expect("set");
        assert_eq!(t.get("shop").map(|c| c.green_weight()), Some(30));
        // a reload of the same file keeps them
        t.apply_config(&config(dir.path(), 0));
        assert_eq!(weights(&t), (30, Source::Admin));
        // a restart restores them
        let t2 = traffic(Some(state.clone()));
        t2.apply_config(&config(dir.path(), 0));
        assert_eq!(weights(&t2), (30, Source::Admin));
        // a changed file wins, also across a restart
        t2.apply_config(&config(dir.path(), 5));
        assert_eq!(weights(&t2), (5, Source::Config));
        let t3 = traffic(Some(state));
        t3.apply_config(&config(dir.path(), 5));
        assert_eq!(weights(&t3), (5, Source::Config));
        assert_eq!(
            t3.set_weights("nope", Weights::new(100, 0))
                .map(|_| ())
                .map_err(|r| r.status),
            Err(404)
        );
    }

    #[test]
    fn file_edited_while_stopped_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state.json");
        let t = traffic(Some(state.clone()));
        t.apply_config(&config(dir.path(), 0));
        t.start_shift("shop", Color::Green, 10, Duration::from_secs(60))
            .expect("shift");
        drop(t);
        let t2 = traffic(Some(state));
        t2.apply_config(&config(dir.path(), 20));
        assert_eq!(weights(&t2), (20, Source::Config));
        let ctl = t2.get("shop").expect("route");
        let i = ctl.lock();
        assert_eq!(i.shift.as_ref().map(|s| s.state), Some(ShiftState::Stopped));
    }

    #[test]
    fn shifts_step_and_refuse_a_second_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = traffic(None);
        t.apply_config(&config(dir.path(), 0));
        let c = t
            .start_shift("shop", Color::Green, 60, Duration::from_millis(1))
            .expect("shift");
        assert_eq!(c.after["weights"]["green"], 60);
        assert_eq!(c.after["shift"]["state"], "running");
        assert_eq!(
            t.start_shift("shop", Color::Green, 10, Duration::from_secs(1))
                .map(|_| ())
                .map_err(|r| r.status),
            Err(409)
        );
        let c = t.stop_shift("shop").expect("stop");
        assert_eq!(c.after["shift"]["state"], "stopped");
        assert_eq!(c.after["weights"]["green"], 60);
        let c = t
            .start_shift("shop", Color::Blue, 100, Duration::from_secs(1))
            .expect("shift");
        assert_eq!(c.after["weights"]["blue"], 100);
        assert_eq!(c.after["shift"]["state"], "done");
    }

    #[test]
    fn a_corrupt_state_file_is_reported_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state.json");
        std::fs::write(&state, "not json").expect("write");
        let t = traffic(Some(state.clone()));
        assert!(t.problem().is_some_and(|p| p.contains("state.json")));
        t.apply_config(&config(dir.path(), 0));
        assert_eq!(weights(&t), (0, Source::Config));
        let copies = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
            .count();
        assert_eq!(copies, 1);
        t.set_weights("shop", Weights::new(50, 50)).expect("set");
        assert!(t.problem().is_none());
    }
}
