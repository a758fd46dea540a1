//! Recent request and error counts per route and color, kept for the status page (sparklines
//! of the last minutes without Prometheus): every `SLOT` the sampler reads each route's
//! cumulative counts and keeps the difference, `SLOTS` of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::snapshot::Snapshot;
use crate::traffic::Color;

pub const SLOT: Duration = Duration::from_secs(2);
/// Five minutes of slots.
pub const SLOTS: usize = 150;

#[derive(Default)]
struct RouteHistory {
    /// Cumulative (requests, failures) per color at the last sample.
    last: [(u64, u64); 2],
    /// Oldest first: (requests, failures) per color in each slot.
    slots: VecDeque<[(u64, u64); 2]>,
}

#[derive(Default)]
pub struct History {
    routes: Mutex<HashMap<String, RouteHistory>>,
}

impl History {
    /// Takes one slot's counts of every route of `snap`.
    pub fn sample(&self, snap: &Snapshot) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|name, _| snap.routes.iter().any(|r| &r.control.name == name));
        for rt in &snap.routes {
            let c = &rt.control;
            let now = [c.served(Color::Blue), c.served(Color::Green)];
            // a new route's first slot counts everything it served so far
            let h = routes.entry(c.name.clone()).or_default();
            let d = [0, 1].map(|i| {
                (
                    now[i].0.saturating_sub(h.last[i].0),
                    now[i].1.saturating_sub(h.last[i].1),
                )
            });
            h.last = now;
            if h.slots.len() == SLOTS {
                h.slots.pop_front();
            }
            h.slots.push_back(d);
        }
    }

    /// `{"slot_seconds", "routes": {name: {"blue": {"requests": [...], "errors": [...]}, ...}}}`,
    /// oldest slot first.
    pub fn json(&self) -> Value {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let per_route: serde_json::Map<String, Value> = routes
            .iter()
            .map(|(name, h)| {
                let color = |i: usize| {
                    json!({
                        "requests": h.slots.iter().map(|s| s[i].0).collect::<Vec<_>>(),
                        "errors": h.slots.iter().map(|s| s[i].1).collect::<Vec<_>>(),
                    })
                };
                (name.clone(), json!({ "blue": color(0), "green": color(1) }))
            })
            .collect();
        json!({ "slot_seconds": SLOT.as_secs(), "routes": per_route })
    }
}

/// Samples every `SLOT`.
pub struct Sampler {
    pub history: Arc<History>,
    pub current: Arc<dyn Fn() -> Arc<Snapshot> + Send + Sync>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Sampler {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut every = tokio::time::interval(SLOT);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
            self.history.sample(&(self.current)());
        }
    }
}
