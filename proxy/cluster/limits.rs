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

use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
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

/// One client on this replica. The request path touches `state` (one atomic add) and `seen`
/// (a load, and a store once per second); the rest belongs to the exchange.
struct Client {
    /// Low 32 bits: the budget (requests this replica may still admit before the next
    /// exchange) plus `BIAS`; high 32 bits: requests admitted since the last exchange.
    state: AtomicU64,
    /// The second (since start) of the last request, for forgetting idle clients.
    seen: AtomicU32,
    /// The last grant, reserved in the store.
    granted: AtomicI32,
    /// When a refused client may try again (ms since start, from the last exchange).
    retry_at: AtomicU64,
    /// `FRESH` (not exchanged about yet: its trust is charged whole at the first exchange),
    /// `REFUSED` (refused since the last exchange: the next one asks for a new grant).
    flags: AtomicU8,
}

const BIAS: u64 = 1 << 31;
const LOW: u64 = (1 << 32) - 1;
const ONE_ADMITTED: u64 = 1 << 32;
const FRESH: u8 = 1;
const REFUSED: u8 = 2;

/// `budget` with `admitted` requests, packed.
fn pack(admitted: u64, budget: i64) -> u64 {
    (admitted << 32)
        | ((budget.clamp(-(BIAS as i64) + 1, BIAS as i64 - 1) + BIAS as i64) as u64 & LOW)
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
    /// The GCRA script (its SHA-1 computed once).
    gcra: Arc<Script>,
}

/// What every fleet counter reads: whether the last exchange reached the store, how many
/// replicas share the budget, and the current second (kept by the exchange loop, so the
/// request path reads no clock).
pub struct SharedState {
    up: AtomicBool,
    live: Arc<AtomicUsize>,
    start: Instant,
    second: AtomicU32,
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
        let second = self.shared.second.load(Ordering::Relaxed);
        if let Some(c) = self.clients.get(&key) {
            if c.seen.load(Ordering::Relaxed) != second {
                c.seen.store(second, Ordering::Relaxed);
            }
            // one more admitted, one less budget, in one step
            let old = c.state.fetch_add(ONE_ADMITTED - 1, Ordering::Relaxed);
            if old & LOW > BIAS {
                return Verdict::Allowed;
            }
            c.state.fetch_sub(ONE_ADMITTED, Ordering::Relaxed);
            c.flags.fetch_or(REFUSED, Ordering::Relaxed);
            let wait = c
                .retry_at
                .load(Ordering::Relaxed)
                .saturating_sub(self.shared.now_ms());
            return Verdict::Denied(Denied::after(Duration::from_millis(wait)));
        }
        // first seen: this replica's share of a full budget, on trust
        let trust = self.first_share();
        self.clients.entry(key).or_insert_with(|| Client {
            state: AtomicU64::new(pack(1, trust - 1)),
            seen: AtomicU32::new(second),
            granted: AtomicI32::new(0),
            retry_at: AtomicU64::new(0),
            flags: AtomicU8::new(FRESH),
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
        let now = self.shared.second.load(Ordering::Relaxed);
        let idle = self.limit.per.as_secs().max(1) as u32 + 1;
        self.clients.retain(|_, c| {
            c.state.load(Ordering::Relaxed) >> 32 > 0
                || now.saturating_sub(c.seen.load(Ordering::Relaxed)) < idle
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
        let script = &self.gcra;
        let k = self.key(key);
        let (interval, tau) = (self.interval_us(), self.tau_us());
        let live = self.shared.live.load(Ordering::Relaxed).max(1);
        let call = |mut c: super::store::Conn| async move {
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
        };
        match mode {
            // the request path: no waiting for a connection
            Mode::Exact => store.run_ready(call).await,
            _ => store.run(call).await,
        }
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
            // take the admitted count, keep the budget
            let spent = c.state.fetch_and(LOW, Ordering::Relaxed) >> 32;
            let flags = c.flags.fetch_and(!REFUSED, Ordering::Relaxed);
            if spent > 0 || flags & REFUSED != 0 {
                let granted = c.granted.swap(0, Ordering::Relaxed).max(0) as u64;
                batch.push((*c.key(), spent, granted, flags & FRESH != 0));
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
        let now = self.shared.now_ms();
        let mut ok = true;
        for ((key, spent, granted, fresh), a) in batch.into_iter().zip(answers) {
            let Some(c) = self.clients.get(&key) else {
                continue;
            };
            let retry_at = |ms: u64| now + ms.max(1);
            match a {
                Ok((_, _, retry_ms)) if fresh => {
                    // the unspent trust is now reserved in the store: it stays the budget
                    c.flags.fetch_and(!FRESH, Ordering::Relaxed);
                    c.granted
                        .store(trust.saturating_sub(spent) as i32, Ordering::Relaxed);
                    c.retry_at.store(retry_at(retry_ms), Ordering::Relaxed);
                }
                Ok((grant, _, retry_ms)) => {
                    // requests admitted while the exchange was under way come out of the grant
                    let _ = c
                        .state
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                            let since = cur >> 32;
                            Some(pack(since, grant as i64 - since as i64))
                        });
                    c.granted
                        .store(grant.min(i32::MAX as u64) as i32, Ordering::Relaxed);
                    c.retry_at.store(retry_at(retry_ms), Ordering::Relaxed);
                }
                Err(_) => {
                    ok = false;
                    // not lost: reported with the next exchange
                    c.state.fetch_add(spent << 32, Ordering::Relaxed);
                    c.granted.store(granted as i32, Ordering::Relaxed);
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
    gcra: Arc<Script>,
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
                second: AtomicU32::new(0),
            }),
            counts: Mutex::new(Vec::new()),
            sync: Mutex::new(Duration::from_millis(200)),
            sync_seconds,
            gcra: Arc::new(Script::new(GCRA)),
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
            gcra: self.gcra.clone(),
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
            self.shared.second.store(
                self.shared
                    .start
                    .elapsed()
                    .as_secs()
                    .min(u64::from(u32::MAX)) as u32,
                Ordering::Relaxed,
            );
            let mut ok = true;
            for c in &counts {
                ok &= c.exchange().await;
            }
            if counts.is_empty() || sync.is_zero() {
                // nothing to exchange: the store's state decides the mode
                ok = self.store.is_up() || self.ping().await;
            }
            // an exchange with no client to report proves nothing: the store must answer too
            ok &= self.store.is_up();
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
