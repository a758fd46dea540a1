//! Fleet mode (`[cluster]`): replicas share route weights and shifts, the controller's lease,
//! per-color request counts and per-client rate-limit counts through Redis.
//!
//! Each route has one control record in Redis (a hash: `rev`, `fence`, `data`), changed only by
//! a compare-and-set on `rev` (a Lua script) that also publishes the route's name. Replicas
//! follow by pub/sub and by polling every second, so a lost message or a reconnect cannot
//! leave one behind. The request path never touches Redis: it reads the same lock-free state
//! as in single-replica mode, which the follower updates.
//!
//! One replica holds the controller lease (`SET NX PX`, renewed every 500 ms, expiring after
//! 2 s). Its fencing token (an `INCR` at each acquisition) goes with each of its writes, and a
//! record refuses a write whose token is older than one it has seen. The leader steps shifts
//! and judges rollback on the sum of every replica's per-second counts.
//!
//! When Redis cannot be reached, serving goes on with the last known state; admin writes are
//! refused (503); each replica judges rollback on its own counts (the single-replica rule) and
//! records such a rollback when Redis is back, unless the fleet moved on meanwhile.

pub mod limits;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Script;
use serde_json::{json, Value};

use crate::snapshot::Snapshot;
use crate::traffic::store::SavedRoute;
use crate::traffic::window::Totals;
use crate::traffic::{Change, Color, Op, Refused, Source, Traffic};
pub use store::{Store, Unavailable};

/// How long the controller lease lives without renewal; another replica takes over within
/// this plus one renewal period.
const LEASE: Duration = Duration::from_millis(2000);
const RENEW: Duration = Duration::from_millis(500);
/// A member not heard from for this long no longer counts as live.
const LIVE: Duration = Duration::from_secs(3);
/// Members not heard from for this long are removed from the list.
const FORGET: Duration = Duration::from_secs(60);
/// Per-second count buckets live this long in Redis (longer than any rollback window used).
const BUCKET_TTL_SECS: u64 = 3600;

const CAS: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'rev', 'fence', 'data')
local rev = tonumber(cur[1]) or 0
local fence = tonumber(cur[2]) or 0
local base = tonumber(ARGV[1])
local new = tonumber(ARGV[2])
local mine = tonumber(ARGV[3])
if base >= 0 and rev ~= base then return {0, rev, cur[3] or ''} end
if base < 0 and cur[3] and rev >= new then return {0, rev, cur[3]} end
if mine > 0 and mine < fence then return {-1, rev, cur[3] or ''} end
if mine > fence then fence = mine end
redis.call('HSET', KEYS[1], 'rev', new, 'fence', fence, 'data', ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {1, new, ''}
";

const SUM: &str = r"
local t = {0, 0, 0, 0}
for _, k in ipairs(KEYS) do
  local v = redis.call('HMGET', k, 'b', 'bf', 'g', 'gf')
  for j = 1, 4 do t[j] = t[j] + (tonumber(v[j]) or 0) end
end
return t
";

const LEASE_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder, token = string.match(cur, '^(.*)#(%d+)$')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(token), holder}
  end
  return {0, holder or ''}
end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. t, 'PX', ARGV[2])
return {t, ARGV[1]}
";

const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now)
local all = redis.call('HGETALL', KEYS[1])
local out = {now}
for i = 1, #all, 2 do
  local seen = tonumber(all[i + 1]) or 0
  if now - seen > tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, seen)
  end
end
return out
";

/// What the rest of sluice needs of fleet mode.
pub struct Fleet {
    pub store: Arc<Store>,
    traffic: Arc<Traffic>,
    /// `instance`, and the id the lease names (instance + a random nonce: two processes with
    /// one name cannot both believe they hold it).
    instance: String,
    holder: String,
    /// The fencing token while this replica holds the lease; 0 otherwise.
    token: AtomicU64,
    leader: Mutex<Option<String>>,
    /// Members with their last heartbeat (unix ms, Redis's clock).
    members: Mutex<Vec<(String, u64)>>,
    live: Arc<AtomicUsize>,
    leader_gauge: prometheus::IntGauge,
    sync_seconds: prometheus::HistogramVec,
    /// Wakes the follower (a pub/sub message or a local change to record).
    wake: tokio::sync::Notify,
    /// One admin write at a time per replica (the store orders writes across replicas).
    writes: tokio::sync::Mutex<()>,
    cas: Script,
    sum: Script,
}

impl Fleet {
    pub fn new(
        store: Arc<Store>,
        traffic: Arc<Traffic>,
        leader_gauge: prometheus::IntGauge,
        sync_seconds: prometheus::HistogramVec,
    ) -> Fleet {
        let instance = store.config().instance.clone();
        leader_gauge.set(0);
        Fleet {
            holder: format!("{instance}/{:016x}", fastrand::u64(..)),
            instance,
            store,
            traffic,
            token: AtomicU64::new(0),
            leader: Mutex::new(None),
            members: Mutex::new(Vec::new()),
            live: Arc::new(AtomicUsize::new(1)),
            leader_gauge,
            sync_seconds,
            wake: tokio::sync::Notify::new(),
            writes: tokio::sync::Mutex::new(()),
            cas: Script::new(CAS),
            sum: Script::new(SUM),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Live replicas (heard from within 3 s), at least 1.
    pub fn live_members(&self) -> Arc<AtomicUsize> {
        self.live.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.token.load(Ordering::Relaxed) > 0
    }

    fn record_key(&self, route: &str) -> String {
        self.store.key(&format!("{{r:{route}}}:ctl"))
    }

    fn bucket_key(&self, route: &str, sec: u64) -> String {
        self.store.key(&format!("{{r:{route}}}:w:{sec}"))
    }

    fn channel(&self) -> String {
        self.store.key("control")
    }

    /// Every route's record in the store: (route, revision, state); routes without a record
    /// are left out.
    pub async fn fetch_all(
        &self,
        routes: &[String],
    ) -> Result<Vec<(String, u64, SavedRoute)>, Unavailable> {
        let started = Instant::now();
        let fetches = routes.iter().map(|r| self.fetch(r));
        let got = futures_util::future::join_all(fetches).await;
        let mut out = Vec::new();
        for (r, g) in routes.iter().zip(got) {
            if let Some((rev, rec)) = g? {
                out.push((r.clone(), rev, rec));
            }
        }
        self.sync_seconds
            .with_label_values(&["control"])
            .observe(started.elapsed().as_secs_f64());
        Ok(out)
    }

    async fn fetch(&self, route: &str) -> Result<Option<(u64, SavedRoute)>, Unavailable> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.record_key(route)).arg("rev").arg("data");
        let (rev, data): (Option<u64>, Option<String>) = self.store.query(cmd).await?;
        Ok(match (rev, data) {
            (Some(rev), Some(d)) => match serde_json::from_str::<SavedRoute>(&d) {
                Ok(rec) => Some((rev, rec)),
                Err(e) => {
                    log::error!("cluster store: route {route}: unreadable record ignored: {e}");
                    None
                }
            },
            _ => None,
        })
    }

    /// Compare-and-set of one route's record: `base` is the revision it builds on (`None`:
    /// a re-seed, written only if the store has nothing newer), `fence` the controller's token
    /// (0 for admin writes).
    async fn commit(
        &self,
        route: &str,
        base: Option<u64>,
        rev: u64,
        rec: &SavedRoute,
        fence: u64,
    ) -> Result<Commit, Unavailable> {
        let data = serde_json::to_string(rec).map_err(|e| Unavailable(format!("record: {e}")))?;
        let (key, channel) = (self.record_key(route), self.channel());
        let base = base.map_or(-1, |b| b as i64);
        let script = &self.cas;
        let (ok, cur_rev, cur): (i64, u64, String) = self
            .store
            .run(|mut c| async move {
                script
                    .key(key)
                    .arg(base)
                    .arg(rev)
                    .arg(fence)
                    .arg(data)
                    .arg(channel)
                    .arg(route)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match ok {
            1 => Commit::Done,
            -1 => Commit::Fenced,
            _ => Commit::Conflict(
                (!cur.is_empty())
                    .then(|| serde_json::from_str(&cur).ok())
                    .flatten()
                    .map(|r| (cur_rev, r)),
            ),
        })
    }

    /// An admin operation, fleet-wide: built on the latest record, written by compare-and-set,
    /// applied here at once and by every replica within a second.
    pub async fn change(&self, route: &str, op: Op) -> Result<Change, Refused> {
        let _one = self.writes.lock().await;
        let unavailable = |_| Refused {
            status: 503,
            reason: "cluster store unavailable".into(),
        };
        for _ in 0..8 {
            let (base, before, after) = self.traffic.propose(route, op)?;
            match self
                .commit(route, Some(base), base + 1, &after, 0)
                .await
                .map_err(unavailable)?
            {
                Commit::Done => {
                    // the route as this write left it (a newer write may already be in force)
                    let json = self
                        .traffic
                        .json_of(route, base + 1, after.clone())
                        .unwrap_or(Value::Null);
                    self.traffic.adopt(route, base + 1, after);
                    return Ok(Change {
                        before,
                        after: json,
                        warning: None,
                    });
                }
                Commit::Conflict(Some((rev, rec))) => {
                    self.traffic.adopt(route, rev, rec);
                }
                Commit::Conflict(None) | Commit::Fenced => {
                    // the store lost the record (restarted empty): put ours back, then retry
                    self.reseed(route).await.map_err(unavailable)?;
                }
            }
        }
        Err(Refused {
            status: 503,
            reason: "the route kept changing under this write; try again".into(),
        })
    }

    /// Writes this replica's state of `route` unless the store has a newer one.
    async fn reseed(&self, route: &str) -> Result<(), Unavailable> {
        let Some((rev, rec)) = self.traffic.record_of(route) else {
            return Ok(());
        };
        if let Commit::Conflict(Some((r, newer))) =
            self.commit(route, None, rev.max(1), &rec, 0).await?
        {
            self.traffic.adopt(route, r, newer);
        }
        Ok(())
    }

    /// Brings this replica in line with the store: adopts newer records, re-seeds missing
    /// ones, records local changes waiting to be recorded.
    async fn follow(&self) -> Result<(), Unavailable> {
        let names = self.traffic.route_names();
        let records = self.fetch_all(&names).await?;
        let mut have: HashSet<&str> = HashSet::new();
        for (name, rev, rec) in &records {
            have.insert(name.as_str());
            self.traffic.adopt(name, *rev, rec.clone());
        }
        for name in &names {
            if !have.contains(name.as_str()) {
                // an empty (restarted) store: it gets the newest state a replica holds
                self.reseed(name).await?;
            }
        }
        for route in self.traffic.take_pushes() {
            if let Err(e) = self.push(&route).await {
                self.traffic.push_later(&route);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Records a state this replica changed on its own (the config file's weights, or a
    /// rollback judged while the store was away), on the revision it was built on.
    async fn push(&self, route: &str) -> Result<(), Unavailable> {
        let Some((rev, rec)) = self.traffic.record_of(route) else {
            return Ok(());
        };
        match self
            .commit(route, Some(rev.saturating_sub(1)), rev.max(1), &rec, 0)
            .await?
        {
            Commit::Done => {}
            Commit::Conflict(Some((r, theirs))) => {
                if rec.source == Source::Config && theirs.config_weights != rec.config_weights {
                    // the file changed here after the fleet's last change: the file wins
                    match self.commit(route, Some(r), r + 1, &rec, 0).await? {
                        Commit::Done => {
                            self.traffic.adopt(route, r + 1, rec);
                        }
                        Commit::Conflict(Some((r2, t2))) => {
                            self.traffic.adopt(route, r2, t2);
                        }
                        _ => {}
                    }
                } else {
                    self.traffic.adopt(route, r, theirs);
                }
            }
            Commit::Conflict(None) | Commit::Fenced => self.reseed(route).await?,
        }
        Ok(())
    }

    /// Follows the store: pub/sub messages, a poll every second, local changes to record.
    async fn follower(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use futures_util::StreamExt;
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sub: Option<redis::aio::PubSub> = None;
        loop {
            if sub.is_none() && self.store.is_up() {
                sub = self.subscribe().await;
            }
            let message = async {
                match sub.as_mut() {
                    Some(s) => s.on_message().next().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = poll.tick() => {}
                _ = self.wake.notified() => {}
                m = message => {
                    if m.is_none() {
                        sub = None; // the subscription broke: made again when Redis answers
                    }
                }
            }
            if let Err(e) = self.follow().await {
                log::debug!("cluster store: follow: {e}");
            }
        }
    }

    async fn subscribe(&self) -> Option<redis::aio::PubSub> {
        let client = self.store.pubsub_client()?;
        let t = self.store.config().timeout.max(Duration::from_millis(500));
        let made = tokio::time::timeout(t, async {
            let mut s = client.get_async_pubsub().await?;
            s.subscribe(self.channel()).await?;
            Ok::<_, redis::RedisError>(s)
        })
        .await;
        match made {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                log::debug!("cluster store: subscribe: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Heartbeat, member list and the controller lease, every 500 ms.
    async fn membership(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let heartbeat = Script::new(HEARTBEAT);
        let lease = Script::new(LEASE_SCRIPT);
        let members_key = self.store.key("{fleet}:members");
        let lease_key = self.store.key("{fleet}:lease");
        let fence_key = self.store.key("{fleet}:fence");
        let mut every = tokio::time::interval(RENEW);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = every.tick() => {}
            }
            let hb: Result<Vec<Value2>, _> = {
                let (s, k) = (&heartbeat, members_key.clone());
                let (inst, forget) = (self.instance.clone(), FORGET.as_millis() as u64);
                self.store
                    .run(|mut c| async move {
                        s.key(k).arg(inst).arg(forget).invoke_async(&mut c).await
                    })
                    .await
            };
            if let Ok(list) = hb {
                let now = list.first().map_or(0, Value2::as_u64);
                let members: Vec<(String, u64)> = list[1.min(list.len())..]
                    .chunks(2)
                    .filter_map(|p| match p {
                        [n, t] => Some((n.as_string(), t.as_u64())),
                        _ => None,
                    })
                    .collect();
                let live = members
                    .iter()
                    .filter(|(_, t)| now.saturating_sub(*t) <= LIVE.as_millis() as u64)
                    .count();
                self.live.store(live.max(1), Ordering::Relaxed);
                *self.members.lock().unwrap_or_else(|e| e.into_inner()) = members;
            }
            let got: Result<(u64, String), _> = {
                let (s, lk, fk) = (&lease, lease_key.clone(), fence_key.clone());
                let (holder, px) = (self.holder.clone(), LEASE.as_millis() as u64);
                self.store
                    .run(|mut c| async move {
                        s.key(lk)
                            .key(fk)
                            .arg(holder)
                            .arg(px)
                            .invoke_async(&mut c)
                            .await
                    })
                    .await
            };
            match got {
                Ok((token, holder)) => {
                    let was = self.token.swap(token, Ordering::Relaxed);
                    if token > 0 && was == 0 {
                        log::info!(
                            "cluster: {} holds the controller lease (token {token})",
                            self.instance
                        );
                    } else if token == 0 && was > 0 {
                        log::warn!("cluster: {} lost the controller lease", self.instance);
                    }
                    let name = holder.split_once('/').map_or(holder.clone(), |(i, _)| {
                        // the holder id is "instance/nonce"
                        i.to_string()
                    });
                    *self.leader.lock().unwrap_or_else(|e| e.into_inner()) =
                        (!holder.is_empty()).then_some(name);
                }
                Err(_) => {
                    // without the store, no replica may act as the fleet's controller
                    self.token.store(0, Ordering::Relaxed);
                    *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
            self.leader_gauge.set(i64::from(self.is_leader()));
        }
        // a replica shutting down gives the lease away at once
        if self.is_leader() {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
                .arg(1)
                .arg(lease_key)
                .arg(format!("{}#{}", self.holder, self.token.load(Ordering::Relaxed)));
            let _: Result<i64, _> = self.store.query(cmd).await;
        }
    }

    /// Sends this replica's per-route, per-color counts of the last second to the store.
    async fn counts(&self, mut shutdown: pingora::server::ShutdownWatch, current: Current) {
        let mut sent: HashMap<String, [(u64, u64); 2]> = HashMap::new();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
            let snap = current();
            let sec = crate::traffic::now_ms() / 1000;
            let started = Instant::now();
            for rt in &snap.routes {
                let ctl = &rt.control;
                let now = [ctl.served(Color::Blue), ctl.served(Color::Green)];
                let last = sent.get(&ctl.name).copied().unwrap_or([(0, 0); 2]);
                let d: Vec<u64> = (0..2)
                    .flat_map(|c| {
                        [
                            now[c].0.saturating_sub(last[c].0),
                            now[c].1.saturating_sub(last[c].1),
                        ]
                    })
                    .collect();
                if d.iter().all(|n| *n == 0) {
                    sent.insert(ctl.name.clone(), now);
                    continue;
                }
                let key = self.bucket_key(&ctl.name, sec);
                let mut p = redis::pipe();
                p.atomic();
                for (field, n) in ["b", "bf", "g", "gf"].iter().zip(&d) {
                    if *n > 0 {
                        p.cmd("HINCRBY").arg(&key).arg(*field).arg(*n).ignore();
                    }
                }
                p.cmd("EXPIRE").arg(&key).arg(BUCKET_TTL_SECS).ignore();
                let r: Result<(), _> = self
                    .store
                    .run(|mut c| async move { p.query_async(&mut c).await })
                    .await;
                if r.is_ok() {
                    sent.insert(ctl.name.clone(), now);
                }
            }
            self.sync_seconds
                .with_label_values(&["windows"])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// The fleet's requests and failures to `color` of `route` from `since_ms` (unix) on,
    /// within `window`.
    async fn fleet_totals(
        &self,
        route: &str,
        color: Color,
        since_ms: u64,
        window: Duration,
    ) -> Result<Totals, Unavailable> {
        let now = crate::traffic::now_ms() / 1000;
        let from = (now.saturating_sub(window.as_secs().max(1)) + 1).max(since_ms / 1000);
        let keys: Vec<String> = (from..=now).map(|s| self.bucket_key(route, s)).collect();
        let script = &self.sum;
        let t: Vec<u64> = self
            .store
            .run(|mut c| async move {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(k);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        let (r, f) = match color {
            Color::Blue => (0, 1),
            Color::Green => (2, 3),
        };
        Ok(Totals {
            requests: t.get(r).copied().unwrap_or(0),
            failures: t.get(f).copied().unwrap_or(0),
        })
    }

    /// The controller: on the lease holder, steps shifts and judges rollback on the fleet's
    /// counts; everywhere, while the store is unreachable, judges rollback on this replica's
    /// own counts (the single-replica rule, as a safety net).
    async fn controller(
        &self,
        mut shutdown: pingora::server::ShutdownWatch,
        current: Current,
        audit: Arc<crate::audit::Audit>,
    ) {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
            let snap = current();
            let token = self.token.load(Ordering::Relaxed);
            if token > 0 {
                if let Err(e) = self.lead(&snap, token, &audit).await {
                    log::debug!("cluster controller: {e}");
                }
            } else if !self.store.is_up() {
                let decisions = self.traffic.decide(&snap, &|ctl, c| ctl.totals(c), false);
                let routes: Vec<String> = decisions.iter().map(|d| d.route.clone()).collect();
                for e in self.traffic.apply_decisions(decisions) {
                    audit.rollback(&e);
                }
                for r in routes {
                    self.traffic.push_later(&r);
                }
            }
        }
    }

    async fn lead(
        &self,
        snap: &Snapshot,
        token: u64,
        audit: &crate::audit::Audit,
    ) -> Result<(), Unavailable> {
        let mut totals: HashMap<String, Totals> = HashMap::new();
        for rt in &snap.routes {
            if let Some((to, started, rule)) = rt.control.running_shift() {
                let window = rule.map_or(Duration::from_secs(60), |r| r.window);
                let t = self
                    .fleet_totals(&rt.control.name, to, started, window)
                    .await?;
                totals.insert(rt.control.name.clone(), t);
            }
        }
        let decisions = self.traffic.decide(
            snap,
            &|ctl, _| totals.get(&ctl.name).copied().unwrap_or_default(),
            true,
        );
        for d in decisions {
            let rec = d.record();
            match self
                .commit(&d.route, Some(d.base), d.base + 1, &rec, token)
                .await?
            {
                Commit::Done => {
                    self.traffic.adopt(&d.route, d.base + 1, rec);
                    if let Some(e) = &d.event {
                        self.traffic.rolled_back(e);
                        audit.rollback(e);
                    }
                }
                Commit::Conflict(Some((rev, theirs))) => {
                    self.traffic.adopt(&d.route, rev, theirs);
                }
                Commit::Fenced => {
                    log::warn!("cluster: a newer controller holds the lease; stepping down");
                    self.token.store(0, Ordering::Relaxed);
                    return Ok(());
                }
                Commit::Conflict(None) => self.reseed(&d.route).await?,
            }
        }
        Ok(())
    }

    /// `/status`'s `cluster` block.
    pub fn status(&self) -> Value {
        let members = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let revision = self
            .traffic
            .records()
            .iter()
            .map(|(_, r, _)| *r)
            .max()
            .unwrap_or(0);
        json!({
            "store": if self.store.is_up() { "up" } else { "down" },
            "instance": self.instance,
            "leader": *self.leader.lock().unwrap_or_else(|e| e.into_inner()),
            "revision": revision,
            "members": members.iter().map(|(i, t)| json!({
                "instance": i,
                "last_seen": humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(*t)).to_string(),
            })).collect::<Vec<_>>(),
        })
    }
}

enum Commit {
    Done,
    /// The record moved on (its revision and state), or is missing (`None`).
    Conflict(Option<(u64, SavedRoute)>),
    /// A controller with a newer lease has written this record.
    Fenced,
}

/// The snapshot serving now.
pub type Current = Arc<dyn Fn() -> Arc<Snapshot> + Send + Sync>;

/// A reply element of the heartbeat script (numbers and names).
struct Value2(redis::Value);

impl redis::FromRedisValue for Value2 {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        Ok(Value2(v))
    }
}

impl Value2 {
    fn as_u64(&self) -> u64 {
        match &self.0 {
            redis::Value::Int(n) => (*n).max(0) as u64,
            redis::Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => 0,
        }
    }
    fn as_string(&self) -> String {
        match &self.0 {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            redis::Value::Int(n) => n.to_string(),
            _ => String::new(),
        }
    }
}

/// The fleet's background work, one service: the follower, membership and lease, the counts
/// sender, the controller and the rate-limit exchange.
pub struct Service {
    pub fleet: Arc<Fleet>,
    pub current: Current,
    pub audit: Arc<crate::audit::Audit>,
    pub limits: Arc<limits::Exchange>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Service {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        let f = &self.fleet;
        tokio::join!(
            f.follower(shutdown.clone()),
            f.membership(shutdown.clone()),
            f.counts(shutdown.clone(), self.current.clone()),
            f.controller(shutdown.clone(), self.current.clone(), self.audit.clone()),
            self.limits.run(shutdown.clone()),
        );
    }
}

/// Wakes the follower now (after a local change that must be recorded).
impl Fleet {
    pub fn nudge(&self) {
        self.wake.notify_one();
    }
}

/// Sets fleet mode up at start: the store, the first read of every route's record (so that a
/// new replica serves the fleet's weights from its first request, not the config file's), and
/// fleet-wide rate-limit counts when `[rate_limit] scope = "cluster"`. A store that does not
/// answer within 2 s leaves the replica on the config file's weights until it does.
pub fn start(
    c: &crate::config::Cluster,
    config: &crate::config::Config,
    traffic: &Arc<Traffic>,
    metrics: &crate::metrics::Metrics,
    limits: &crate::rate_limit::Registry,
) -> Result<(Arc<Fleet>, Arc<limits::Exchange>), String> {
    metrics
        .register_cluster()
        .map_err(|e| format!("metrics: {e}"))?;
    let store = Arc::new(Store::new(c.clone(), metrics.cluster_store_up.clone()));
    let fleet = Arc::new(Fleet::new(
        store.clone(),
        traffic.clone(),
        metrics.cluster_leader.clone(),
        metrics.cluster_sync_seconds.clone(),
    ));
    let names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cluster runtime: {e}"))?;
    let first = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), fleet.fetch_all(&names)).await
    });
    match first {
        Ok(Ok(records)) => {
            log::info!(
                "cluster store: {} route record(s) read; instance {}",
                records.len(),
                c.instance
            );
            traffic.preload(records);
        }
        Ok(Err(e)) => {
            log::warn!("cluster store unreachable at start ({e}): serving the config file's weights until it answers");
            traffic.preload(Vec::new());
        }
        Err(_) => {
            log::warn!("cluster store did not answer within 2 s: serving the config file's weights until it does");
            traffic.preload(Vec::new());
        }
    }
    // the connection made above belongs to a runtime that ends here
    rt.block_on(store.forget());
    drop(rt);
    let exchange = Arc::new(limits::Exchange::new(
        store,
        fleet.live_members(),
        metrics.cluster_sync_seconds.with_label_values(&["limits"]),
    ));
    if let Some(sync) = config.rate_limit.as_ref().and_then(|r| r.cluster_sync) {
        let ex = exchange.clone();
        limits.share_through(Arc::new(move |scope: &str, limit, _prefix| {
            ex.counts(scope, limit, sync)
        }));
    }
    Ok((fleet, exchange))
}
