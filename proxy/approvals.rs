//! Two-person approval of traffic changes (`[admin] require_approval`): a guarded call is kept
//! as a pending change until a second, different token approves it, anyone with a token
//! rejects it, or it expires. Pending changes live in this process, or in Redis in fleet mode
//! (so any replica can approve what another was asked): [`ApprovalStore`] is that seam.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cluster::{Store, Unavailable};

/// A change waiting for its second token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingChange {
    pub id: String,
    pub route: String,
    /// `"weights"` or `"shift"`.
    pub kind: String,
    /// The request body, as asked.
    pub body: Value,
    /// The first 8 hex digits of the asking token's SHA-256 (as in the audit log).
    pub requested_by: String,
    /// The whole SHA-256 of the asking token (never shown): the approver's must differ.
    pub token_sha256: String,
    /// The route's revision when it was asked: an approval of a route changed since is refused.
    pub revision: u64,
    pub expires_at_ms: u64,
}

impl PendingChange {
    pub fn new(
        route: &str,
        kind: &str,
        body: Value,
        token: &str,
        revision: u64,
        timeout: Duration,
    ) -> PendingChange {
        PendingChange {
            id: format!("{:016x}", fastrand::u64(..)),
            route: route.to_string(),
            kind: kind.to_string(),
            body,
            requested_by: crate::audit::fingerprint(token),
            token_sha256: token_sha256(token),
            revision,
            expires_at_ms: crate::traffic::now_ms() + timeout.as_millis() as u64,
        }
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// Whether `token` is the one that asked.
    pub fn asked_by(&self, token: &str) -> bool {
        crate::auth::ct_eq(token_sha256(token).as_bytes(), self.token_sha256.as_bytes())
    }

    /// What the API shows.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "route": self.route,
            "kind": self.kind,
            "body": self.body,
            "requested_by": self.requested_by,
            "expires_at": humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(self.expires_at_ms)
            ).to_string(),
        })
    }
}

fn token_sha256(token: &str) -> String {
    crate::config::hex(&Sha256::digest(token.as_bytes()))
}

/// Where pending changes are kept.
#[async_trait::async_trait]
pub trait ApprovalStore: Send + Sync {
    async fn put(&self, p: &PendingChange) -> Result<(), Unavailable>;
    /// Every pending change, expired ones included (the caller expires them).
    async fn list(&self) -> Result<Vec<PendingChange>, Unavailable>;
    async fn get(&self, id: &str) -> Result<Option<PendingChange>, Unavailable>;
    /// Takes a change off the list; `true` for the one caller that did (approvals, rejections
    /// and expiries of one change cannot both happen).
    async fn remove(&self, id: &str) -> Result<bool, Unavailable>;
}

/// Pending changes of this process.
#[derive(Default)]
pub struct LocalApprovals(Mutex<HashMap<String, PendingChange>>);

impl LocalApprovals {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingChange>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl ApprovalStore for LocalApprovals {
    async fn put(&self, p: &PendingChange) -> Result<(), Unavailable> {
        self.map().insert(p.id.clone(), p.clone());
        Ok(())
    }
    async fn list(&self) -> Result<Vec<PendingChange>, Unavailable> {
        let mut all: Vec<_> = self.map().values().cloned().collect();
        all.sort_by_key(|p| p.expires_at_ms);
        Ok(all)
    }
    async fn get(&self, id: &str) -> Result<Option<PendingChange>, Unavailable> {
        Ok(self.map().get(id).cloned())
    }
    async fn remove(&self, id: &str) -> Result<bool, Unavailable> {
        Ok(self.map().remove(id).is_some())
    }
}

/// Pending changes of the fleet: one Redis hash, id -> change.
pub struct RedisApprovals {
    store: Arc<Store>,
    key: String,
}

impl RedisApprovals {
    pub fn new(store: Arc<Store>) -> RedisApprovals {
        let key = store.key("{fleet}:approvals");
        RedisApprovals { store, key }
    }
}

#[async_trait::async_trait]
impl ApprovalStore for RedisApprovals {
    async fn put(&self, p: &PendingChange) -> Result<(), Unavailable> {
        let json = serde_json::to_string(p).map_err(|e| Unavailable(e.to_string()))?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.key).arg(&p.id).arg(json);
        self.store.query::<i64>(cmd).await.map(|_| ())
    }
    async fn list(&self) -> Result<Vec<PendingChange>, Unavailable> {
        let mut cmd = redis::cmd("HVALS");
        cmd.arg(&self.key);
        let all: Vec<String> = self.store.query(cmd).await?;
        let mut out: Vec<PendingChange> = all
            .iter()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        out.sort_by_key(|p| p.expires_at_ms);
        Ok(out)
    }
    async fn get(&self, id: &str) -> Result<Option<PendingChange>, Unavailable> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(&self.key).arg(id);
        let got: Option<String> = self.store.query(cmd).await?;
        Ok(got.and_then(|j| serde_json::from_str(&j).ok()))
    }
    async fn remove(&self, id: &str) -> Result<bool, Unavailable> {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&self.key).arg(id);
        Ok(self.store.query::<i64>(cmd).await? == 1)
    }
}

/// Expires pending changes every second; each expiry is audited once (by whoever removed it).
pub struct Expiry {
    pub store: Arc<dyn ApprovalStore>,
    pub audit: Arc<crate::audit::Audit>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Expiry {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
            expire(self.store.as_ref(), &self.audit).await;
        }
    }
}

/// Removes and audits the expired changes.
pub async fn expire(store: &dyn ApprovalStore, audit: &crate::audit::Audit) {
    let now = crate::traffic::now_ms();
    let Ok(all) = store.list().await else {
        return;
    };
    for p in all.into_iter().filter(|p| p.expired(now)) {
        if store.remove(&p.id).await.unwrap_or(false) {
            log::info!(
                "approval {} ({} of route {}) expired",
                p.id,
                p.kind,
                p.route
            );
            audit.event("EXPIRE", &format!("/approvals/{}", p.id), p.to_json());
        }
    }
}
