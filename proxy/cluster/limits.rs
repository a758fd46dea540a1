//! Fleet-wide per-client rate limits (`[rate_limit] scope = "cluster"`).
//!
//! The decision stays local and lock-free: each client has a budget on this replica (an
//! atomic counter), spent by its requests. The budget is a grant of the client's fleet quota,
//! reserved in Redis: the quota is a GCRA state kept in Redis on Redis's clock (one key per
//! client and quota). Every `sync`, the replica exchanges, pipelined, for each client seen
//! since the last exchange: it reports what it spent, gives back what it did not, and takes a
//! new grant of `ceil(available / live replicas)`, so the replicas share what the fleet has
//! left and a burst faster than one `sync` cannot multiply the limit by the replica count.
//!
//! Error bound: grants are taken from the fleet's quota atomically, so granted requests never
//! exceed the limit. A client a replica has not met before (or forgot after a whole idle
//! window) gets `burst / live replicas` on trust until the next exchange (at most `sync`
//! later), which charges that trust whole and grants nothing more, so trust given by replicas
//! meeting a client at the same time adds up to one burst at most: a new client gets `burst`
//! at once, as with one replica. The one excess: a replica meeting a client late, after the
//! other replicas spent its quota, admits up to `burst / live replicas` beyond the limit; that
//! overdraft is charged, so the client waits it off afterwards and the limit holds over any
//! longer window. Live replicas are those heard from within 3 s.
//!
//! `sync = "0s"`: every request asks the store (one Lua GCRA call, exact), within the command
//! timeout. Whenever the store cannot be asked, the replica counts alone (the local GCRA of
//! single-replica mode): the fleet then admits up to the limit times the number of replicas.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::Script;

use super::Store;
use crate::rate_limit::{Counts, Denied, Limit, LocalCounts, Verdict};

/// GCRA on Redis's clock. KEYS[1]: the client's state (its theoretical arrival time, µs).
/// ARGV: requests spent beyond this replica's grant (added even past the limit: they were
/// admitted), requests of the grant not spent (given back), emission interval (µs), burst
/// tolerance (µs), live replicas, mode (1: exact, one request refused past the limit; 2:
/// charge only, no new grant; 0: charge and grant).
/// Returns {granted, available after the grant, retry_after_ms}.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local T = tonumber(ARGV[3])
local tau = tonumber(ARGV[4])
tat = tat + tonumber(ARGV[1]) * T - tonumber(ARGV[2]) * T
if tat < now then tat = now end
local avail = math.floor((now + tau - tat) / T)
if avail < 0 then avail = 0 end
local grant
if ARGV[6] == '1' then
  grant = math.min(avail, 1)
elseif ARGV[6] == '2' then
  grant = 0
else
  grant = math.min(avail, math.ceil(avail / math.max(tonumber(ARGV[5]), 1)))
end
tat = tat + grant * T
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
local retry = 0
if avail - grant <= 0 then retry = math.ceil((tat + T - tau - now) / 1000) end
return {grant, avail - grant, retry}
";

struct Client {
    /// Requests this replica may still admit before the next exchange.
    budget: AtomicI64,
    /// Admitted since the last exchange (reported at the next one).
    pending: AtomicU32,
    /// The last grant, reserved in the store (written by the exchange only).
    granted: AtomicI64,
    /// Not exchanged about yet: the trust it was given is charged whole at the first exchange.
    fresh: AtomicBool,
    /// Refused since the last exchange: the next exchange asks for a fresh budget.
    refused: AtomicBool,
    /// When a refused client may try again (unix ms, from the last exchange).
    retry_at_ms: AtomicU64,
    /// Last request (ms since the exchange started), for forgetting idle clients.
    seen_ms: AtomicU64,
}

/// The fleet counts of one quota and scope.
pub struct FleetCounts {
    limit: Limit,
    prefix: String,
    clients: DashMap<u128, Client>,
    /// The replica's own count, used whenever the store cannot be asked.
    local: LocalCounts,
    exact: bool,
    shared: Arc<SharedState>,
    store: Arc<Store>,
}

/// What every fleet counter reads: whether the last exchange reached the store, and how many
/// replicas share the budget.
pub struct SharedState {
    up: AtomicBool,
    live: Arc<AtomicUsize>,
    start: Instant,
}

impl SharedState {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

impl FleetCounts {
    fn interval_us(&self) -> u64 {
        (self.limit.per.as_micros() as u64 / u64::from(self.limit.requests.max(1))).max(1)
    }

    fn tau_us(&self) -> u64 {
        self.interval_us() * u64::from(self.limit.burst)
    }

    /// A replica's trust for a client it has not exchanged about yet.
    fn first_share(&self) -> i64 {
        let live = self.shared.live.load(Ordering::Relaxed).max(1) as u64;
        (u64::from(self.limit.burst) / live).max(1) as i64
    }

    fn key(&self, client: u128) -> String {
        format!("{}{client:032x}", self.prefix)
    }
}

#[async_trait::async_trait]
impl Counts for FleetCounts {
    fn check(&self, key: u128) -> Verdict {
        if !self.shared.up.load(Ordering::Relaxed) {
            return match self.local.check_key(key) {
                Ok(()) => Verdict::Allowed,
                Err(d) => Verdict::Denied(d),
            };
        }
        if self.exact {
            return Verdict::AskStore;
        }
        let now = self.shared.now_ms();
        if let Some(c) = self.clients.get(&key) {
            c.seen_ms.store(now, Ordering::Relaxed);
            return if c.budget.fetch_sub(1, Ordering::Relaxed) > 0 {
                c.pending.fetch_add(1, Ordering::Relaxed);
                Verdict::Allowed
            } else {
                c.refused.store(true, Ordering::Relaxed);
                let wait = c
                    .retry_at_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(crate::traffic::now_ms());
                Verdict::Denied(Denied::after(Duration::from_millis(wait)))
            };
        }
        // first seen: this replica's share of a full budget
        let budget = self.first_share() - 1;
        self.clients.entry(key).or_insert_with(|| Client {
            budget: AtomicI64::new(budget),
            pending: AtomicU32::new(1),
            granted: AtomicI64::new(0),
            fresh: AtomicBool::new(true),
            refused: AtomicBool::new(false),
            retry_at_ms: AtomicU64::new(0),
            seen_ms: AtomicU64::new(now),
        });
        Verdict::Allowed
    }

    async fn ask(&self, key: u128) -> Result<(), Denied> {
        let ex = self.exchange_one(key, 0, 0, Mode::Exact).await;
        match ex {
            Ok((1, _, _)) => Ok(()),
            Ok((_, _, retry_ms)) => Err(Denied::after(Duration::from_millis(retry_ms))),
            // the store cannot say: this replica's own count decides
            Err(_) => self.local.check_key(key),
        }
    }

    fn shrink(&self) {
        let now = self.shared.now_ms();
        let idle = self.limit.per.as_millis() as u64;
        self.clients.retain(|_, c| {
            c.pending.load(Ordering::Relaxed) > 0
                || now.saturating_sub(c.seen_ms.load(Ordering::Relaxed)) < idle
        });
        self.clients.shrink_to_fit();
        self.local.shrink();
    }

    fn len(&self) -> usize {
        self.clients.len() + self.local.len()
    }
}

impl FleetCounts {
    /// One GCRA call: requests spent beyond the grant, grant given back; returns (granted,
    /// available after, retry after ms).
    async fn exchange_one(
        &self,
        key: u128,
        over: u64,
        back: u64,
        mode: Mode,
    ) -> Result<(u64, u64, u64), super::Unavailable> {
        let store = &self.store;
        let script = Script::new(GCRA);
        let k = self.key(key);
        let (interval, tau) = (self.interval_us(), self.tau_us());
        let live = self.shared.live.load(Ordering::Relaxed).max(1);
        store
            .run(|mut c| async move {
                script
                    .key(k)
                    .arg(over)
                    .arg(back)
                    .arg(interval)
                    .arg(tau)
                    .arg(live)
                    .arg(mode as u8)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    /// Exchanges with the store for every client seen (or refused) since the last exchange:
    /// reports what was spent, gives back what was not, takes a new grant. A client's first
    /// exchange charges the whole trust it was given and takes no grant: other replicas may
    /// still hold unreported trust for it, so only the next exchange shares what is left.
    /// Returns whether the store answered.
    async fn exchange(&self) -> bool {
        let trust = self.first_share().max(0) as u64;
        let mut batch = Vec::new();
        for c in self.clients.iter() {
            let spent = u64::from(c.pending.swap(0, Ordering::Relaxed));
            let refused = c.refused.swap(false, Ordering::Relaxed);
            if spent > 0 || refused {
                let granted = c.granted.swap(0, Ordering::Relaxed).max(0) as u64;
                let fresh = c.fresh.load(Ordering::Relaxed);
                batch.push((*c.key(), spent, granted, fresh));
            }
        }
        if batch.is_empty() {
            return true;
        }
        let answers =
            futures_util::future::join_all(batch.iter().map(|(k, spent, granted, fresh)| {
                if *fresh {
                    self.exchange_one(*k, trust.max(*spent), 0, Mode::ChargeOnly)
                } else {
                    self.exchange_one(
                        *k,
                        spent.saturating_sub(*granted),
                        granted.saturating_sub(*spent),
                        Mode::Share,
                    )
                }
            }))
            .await;
        let now = crate::traffic::now_ms();
        let mut ok = true;
        for ((key, spent, granted, fresh), a) in batch.into_iter().zip(answers) {
            let Some(c) = self.clients.get(&key) else {
                continue;
            };
            match a {
                Ok((_, _, retry_ms)) if fresh => {
                    // the unspent trust is now reserved in the store: it stays the budget
                    c.fresh.store(false, Ordering::Relaxed);
                    c.granted
                        .store(trust.saturating_sub(spent) as i64, Ordering::Relaxed);
                    c.retry_at_ms
                        .store(now + retry_ms.max(1), Ordering::Relaxed);
                }
                Ok((grant, _, retry_ms)) => {
                    // requests admitted while the exchange was under way come out of the grant
                    let since = i64::from(c.pending.load(Ordering::Relaxed));
                    c.granted.store(grant as i64, Ordering::Relaxed);
                    c.budget.store(grant as i64 - since, Ordering::Relaxed);
                    c.retry_at_ms
                        .store(now + retry_ms.max(1), Ordering::Relaxed);
                }
                Err(_) => {
                    ok = false;
                    // not lost: reported with the next exchange
                    c.pending.fetch_add(spent as u32, Ordering::Relaxed);
                    c.granted.store(granted as i64, Ordering::Relaxed);
                }
            }
        }
        ok
    }
}

/// What one GCRA call does (the script's mode argument).
#[derive(Clone, Copy)]
enum Mode {
    /// Charge what was spent, give back what was not, take a share of what is left.
    Share = 0,
    /// One request, refused past the limit (`sync = "0s"`).
    Exact = 1,
    /// Charge only (a client's first exchange).
    ChargeOnly = 2,
}

/// Makes fleet counters and runs their exchanges every `sync`.
pub struct Exchange {
    store: Arc<Store>,
    shared: Arc<SharedState>,
    counts: Mutex<Vec<Weak<FleetCounts>>>,
    sync: Mutex<Duration>,
    sync_seconds: prometheus::Histogram,
}

impl Exchange {
    pub fn new(
        store: Arc<Store>,
        live: Arc<AtomicUsize>,
        sync_seconds: prometheus::Histogram,
    ) -> Exchange {
        Exchange {
            store,
            shared: Arc::new(SharedState {
                up: AtomicBool::new(false),
                live,
                start: Instant::now(),
            }),
            counts: Mutex::new(Vec::new()),
            sync: Mutex::new(Duration::from_millis(200)),
            sync_seconds,
        }
    }

    /// Counts for a quota of `scope` (exchanged every `sync`; `0s`: asked per request).
    pub fn counts(&self, scope: &str, limit: Limit, sync: Duration) -> Option<Arc<dyn Counts>> {
        *self.sync.lock().unwrap_or_else(|e| e.into_inner()) = sync;
        let c = Arc::new(FleetCounts {
            limit,
            prefix: self.store.key(&format!(
                "rl:{scope}:{}:{}:{}:",
                limit.requests,
                limit.per.as_millis(),
                limit.burst
            )),
            clients: DashMap::new(),
            local: LocalCounts::new(limit)?,
            exact: sync.is_zero(),
            shared: self.shared.clone(),
            store: self.store.clone(),
        });
        let mut all = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&c));
        Some(c)
    }

    pub async fn run(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            let sync = *self.sync.lock().unwrap_or_else(|e| e.into_inner());
            let pause = if sync.is_zero() {
                Duration::from_millis(200)
            } else {
                sync
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            let counts: Vec<Arc<FleetCounts>> = self
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            let started = Instant::now();
            let mut ok = true;
            for c in &counts {
                ok &= c.exchange().await;
            }
            if counts.is_empty() || sync.is_zero() {
                // nothing to exchange: the store's state decides the mode
                ok = self.store.is_up() || self.ping().await;
            }
            if !counts.is_empty() {
                self.sync_seconds.observe(started.elapsed().as_secs_f64());
            }
            let was = self.shared.up.swap(ok, Ordering::Relaxed);
            if was != ok {
                if ok {
                    log::info!("rate limits: counting fleet-wide again");
                } else {
                    log::warn!(
                        "rate limits: the cluster store is unreachable; each replica counts alone"
                    );
                }
            }
        }
    }

    /// Counts as if the last exchange had reached the store (benchmarks of the request path,
    /// which never waits for the store either way).
    pub fn assume_reachable(&self) {
        self.shared.up.store(true, Ordering::Relaxed);
    }

    async fn ping(&self) -> bool {
        self.store.query::<String>(redis::cmd("PING")).await.is_ok()
    }
}
