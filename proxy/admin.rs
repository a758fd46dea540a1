//! The admin listener (contract: `shared/spec/admin-api.md`): probes, metrics and status for
//! anyone who can reach it; weights, shifts and reloads for holders of a bearer token, each
//! call written to the audit log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Map, Value};

use crate::approvals::PendingChange;
use crate::audit::Entry;
use crate::auth;
use crate::snapshot::Snapshot;
use crate::state::Shared;
use crate::traffic::{Change, Color, Op as TrafficOp, Refused, Weights};

/// Bodies of admin calls are small JSON documents.
pub const MAX_BODY: usize = 64 * 1024;
/// A larger body is still read (and thrown away) up to this size so that the client reads the
/// 413 instead of a reset connection; beyond it the connection is closed.
const DRAIN_LIMIT: usize = 8 * 1024 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Admin {
    pub shared: Arc<Shared>,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = r.body().len().to_string().parse() {
        r.headers_mut().insert(http::header::CONTENT_LENGTH, v);
    }
    r
}

/// The status page: one self-contained HTML page (inline style and script, no external
/// assets) that reads `/status` every second. Nothing on it changes anything.
const STATUS_PAGE: &[u8] = include_bytes!("status_page.html");

fn status_page() -> Response<Vec<u8>> {
    let mut r = reply(
        StatusCode::OK,
        "text/html; charset=utf-8",
        STATUS_PAGE.to_vec(),
    );
    let h = r.headers_mut();
    for (k, v) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    }
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn error(status: StatusCode, msg: &str) -> Response<Vec<u8>> {
    json_reply(status, &json!({ "error": msg }))
}

fn route_json(snap: &Snapshot, i: usize) -> Value {
    snap.routes[i].control.to_json()
}

pub fn status_json(shared: &Shared) -> Value {
    let snap = shared.snapshot();
    let pools: Vec<Value> = snap
        .config
        .pools
        .iter()
        .zip(&snap.pools)
        .map(|(p, rt)| {
            let mut pool = json!({
                "name": p.name,
                "region": p.region,
                "members": rt.backends.len(),
                "backends": rt.backends.iter().zip(rt.rr.weights()).map(|(r, w)| {
                    let v = r.health.view();
                    json!({
                        "address": r.address.to_string(),
                        "name": r.host,
                        "weight": w,
                        "healthy": v.usable,
                        "state": v.state,
                        "ejected_until": v.ejected_until
                            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                        "reason": v.reason,
                        "ejections": { "active": v.ejections.0, "passive": v.ejections.1 },
                    })
                }).collect::<Vec<_>>(),
            });
            let names = shared.discovery.view(&p.name);
            if let (false, Some(obj)) = (names.is_empty(), pool.as_object_mut()) {
                obj.insert("names".into(), Value::from(names));
            }
            pool
        })
        .collect();
    json!({
        "config": {
            "path": snap.config.path.display().to_string(),
            "generation": snap.generation,
            "sha256": snap.config.sha256,
            "loaded_at": humantime::format_rfc3339_seconds(snap.loaded_at).to_string(),
            "last_error": shared.last_error(),
            "restart_required": shared.restart_required(),
            "state_file_error": shared.traffic.problem(),
        },
        "limits": limits_json(&snap.config.limits),
        "connections": { "open": shared.conns.total() },
        "draining": shared.lifecycle.is_draining(),
        "inflight": shared.lifecycle.inflight(),
        "routes": (0..snap.routes.len()).map(|i| route_json(&snap, i)).collect::<Vec<_>>(),
        "pools": pools,
        "cluster": shared.fleet.as_ref().map(|f| f.status()),
        "limits_hit": limits_hit(&shared.metrics),
        "history": shared.history.json(),
    })
}

/// How often each limit was hit since start (the counters of /metrics, summed over labels).
fn limits_hit(m: &crate::metrics::Metrics) -> Value {
    use prometheus::core::Collector;
    let sum = |c: &dyn Collector| -> u64 {
        c.collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    };
    let mut by_limit = serde_json::Map::new();
    for f in m.limit_hits.collect() {
        for metric in f.get_metric() {
            let name = metric
                .get_label()
                .iter()
                .find(|l| l.name() == "limit")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            by_limit.insert(name, Value::from(metric.get_counter().get_value() as u64));
        }
    }
    json!({
        "connections_refused": sum(&m.connections_refused),
        "rate_limited": sum(&m.rate_limited),
        "by_limit": by_limit,
    })
}

/// `[limits]` as in force.
fn limits_json(l: &crate::config::Limits) -> Value {
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    json!({
        "max_connections": l.max_connections,
        "max_connections_per_ip": l.max_connections_per_ip,
        "header_timeout": secs(l.header_timeout),
        "keepalive_timeout": secs(l.keepalive_timeout),
        "keepalive_requests": l.keepalive_requests,
        "max_header_bytes": l.max_header_bytes,
        "max_body_bytes": l.max_body_bytes,
        "h2_max_concurrent_streams": l.h2_max_concurrent_streams,
        "send_timeout": secs(l.send_timeout),
    })
}

/// A mutating call, once its method and path are known.
enum Op {
    Reload,
    SetWeights(String),
    StartShift(String),
    StopShift(String),
    /// `GET /approvals` (a read, but with a token).
    ListApprovals,
    Approve(String),
    Reject(String),
}

impl Op {
    fn route(&self) -> Option<&str> {
        match self {
            Op::Reload | Op::ListApprovals | Op::Approve(_) | Op::Reject(_) => None,
            Op::SetWeights(r) | Op::StartShift(r) | Op::StopShift(r) => Some(r),
        }
    }

    /// The `require_approval` kind of a guarded call.
    fn kind(&self) -> Option<&'static str> {
        match self {
            Op::SetWeights(_) => Some("weights"),
            Op::StartShift(_) => Some("shift"),
            _ => None,
        }
    }
}

/// What a method + path asks for: a mutating call, a refusal of the method (with the methods
/// allowed), or neither (a read-only endpoint).
enum Endpoint {
    Mutating(Op),
    WrongMethod(&'static str),
    ReadOnly,
}

fn endpoint(method: &Method, path: &str) -> Endpoint {
    let m = |allowed: &Method, op: Op, allow: &'static str| {
        if method == allowed {
            Endpoint::Mutating(op)
        } else {
            Endpoint::WrongMethod(allow)
        }
    };
    if path == "/reload" {
        return m(&Method::POST, Op::Reload, "POST");
    }
    if path == "/approvals" {
        return m(&Method::GET, Op::ListApprovals, "GET");
    }
    if let Some(id) = path.strip_prefix("/approvals/") {
        return match *method {
            Method::POST => Endpoint::Mutating(Op::Approve(id.into())),
            Method::DELETE => Endpoint::Mutating(Op::Reject(id.into())),
            _ => Endpoint::WrongMethod("POST, DELETE"),
        };
    }
    let Some(rest) = path.strip_prefix("/routes/") else {
        return Endpoint::ReadOnly;
    };
    match rest.split_once('/') {
        Some((name, "weights")) => m(&Method::PUT, Op::SetWeights(name.into()), "PUT"),
        Some((name, "shift")) if method == Method::DELETE => {
            Endpoint::Mutating(Op::StopShift(name.into()))
        }
        Some((name, "shift")) => m(&Method::POST, Op::StartShift(name.into()), "POST, DELETE"),
        _ => Endpoint::ReadOnly,
    }
}

/// `{"blue": 90, "green": 10}`: two whole numbers 0–100 summing to 100, nothing else.
pub fn parse_weights(body: &[u8]) -> Result<Weights, String> {
    let obj = json_object(body, r#"{"blue": 90, "green": 10}"#)?;
    for k in obj.keys() {
        if k != "blue" && k != "green" {
            return Err(format!(
                "unknown color \"{k}\" (the colors are \"blue\" and \"green\")"
            ));
        }
    }
    let share = |c: &str| -> Result<u8, String> {
        let v = obj
            .get(c)
            .ok_or_else(|| format!("missing \"{c}\": both blue and green are needed"))?;
        v.as_u64()
            .filter(|n| *n <= 100)
            .map(|n| n as u8)
            .ok_or_else(|| format!("\"{c}\" must be a whole number from 0 to 100, not {v}"))
    };
    let (blue, green) = (share("blue")?, share("green")?);
    if u16::from(blue) + u16::from(green) != 100 {
        return Err(format!(
            "weights must sum to 100 (blue {blue} + green {green} = {})",
            u16::from(blue) + u16::from(green)
        ));
    }
    Ok(Weights::new(blue, green))
}

/// `{"to": "green", "step": 10, "every": "30s"}`.
pub fn parse_shift(body: &[u8]) -> Result<(Color, u8, Duration), String> {
    let obj = json_object(body, r#"{"to": "green", "step": 10, "every": "30s"}"#)?;
    for k in obj.keys() {
        if !["to", "step", "every"].contains(&k.as_str()) {
            return Err(format!(
                "unknown field \"{k}\" (a shift has \"to\", \"step\" and \"every\")"
            ));
        }
    }
    let to = match obj.get("to") {
        None => return Err("missing \"to\": \"blue\" or \"green\"".into()),
        Some(Value::String(s)) if s == "blue" || s == "green" => {
            Color::parse(s).ok_or("unknown color")?
        }
        Some(v) => {
            return Err(format!(
                "unknown color {v} for \"to\" (the colors are \"blue\" and \"green\")"
            ))
        }
    };
    let step = match obj.get("step") {
        None => return Err("missing \"step\": points moved per step, 1 to 100".into()),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=100).contains(n))
            .map(|n| n as u8)
            .ok_or_else(|| format!("\"step\" must be a whole number from 1 to 100, not {v}"))?,
    };
    let every = match obj.get("every") {
        None => return Err("missing \"every\": time between steps, like \"30s\"".into()),
        Some(Value::String(s)) => {
            crate::config::reader::parse_duration(s).map_err(|e| format!("\"every\": {e}"))?
        }
        Some(v) => {
            return Err(format!(
                "\"every\" must be a duration like \"30s\", not {v}"
            ))
        }
    };
    if every < Duration::from_millis(100) || every > Duration::from_secs(24 * 3600) {
        return Err("\"every\" must be between 100ms and 24h".into());
    }
    Ok((to, step, every))
}

fn json_object(body: &[u8], example: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!("the body must be a JSON object like {example}")),
        Err(e) => Err(format!("the body is not JSON ({e}); send {example}")),
    }
}

/// Reads the request body, at most `MAX_BODY`; `Err` is the refusal to send.
async fn read_body(session: &mut ServerSession) -> Result<Bytes, (StatusCode, String)> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {} KiB", MAX_BODY / 1024),
        )
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        session.set_keepalive(None);
        return Err(too_large());
    }
    let mut body = Vec::new();
    let mut seen = 0usize;
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        while let Some(chunk) = session.read_request_body().await? {
            seen += chunk.len();
            if seen <= MAX_BODY {
                body.extend_from_slice(&chunk);
            } else if seen > DRAIN_LIMIT {
                break;
            }
        }
        Ok::<_, Box<pingora::Error>>(())
    })
    .await;
    match read {
        Ok(Ok(())) if seen <= MAX_BODY => Ok(Bytes::from(body)),
        Ok(Ok(())) => {
            if seen > DRAIN_LIMIT {
                session.set_keepalive(None);
            }
            Err(too_large())
        }
        Ok(Err(e)) => {
            session.set_keepalive(None);
            Err((
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {}", e.etype().as_str()),
            ))
        }
        Err(_) => {
            session.set_keepalive(None);
            Err((
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time".into(),
            ))
        }
    }
}

impl Admin {
    /// A mutating call: lockout, token, route, body, then the change; every outcome is
    /// written to the audit log.
    async fn mutate(&self, session: &mut ServerSession, op: Op) -> Response<Vec<u8>> {
        let shared = &self.shared;
        let req = session.req_header();
        let method = req.method.as_str().to_string();
        let path = req.uri.path().to_string();
        let remote = session.client_addr().and_then(|a| a.as_inet()).copied();
        let ip = remote.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let header = req
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let presented = header.as_deref().and_then(auth::bearer).map(str::to_string);
        let before = match op.route() {
            Some(r) => shared.traffic.get(r).map_or(Value::Null, |c| c.to_json()),
            None => json!({ "generation": shared.snapshot().generation }),
        };
        let audit_full = |status: StatusCode, before: Value, after: Value, error: Option<&str>| {
            shared.audit.record(Entry {
                remote: remote.map(|a| a.to_string()),
                token: presented.as_deref(),
                method: &method,
                path: &path,
                status: status.as_u16(),
                before,
                after,
                error,
            });
        };
        let audit = |status: StatusCode, after: Value, error: Option<&str>| {
            audit_full(status, before.clone(), after, error)
        };
        let refuse = |status: StatusCode, why: &str| {
            audit(status, Value::Null, Some(why));
            error(status, why)
        };

        if let Some(secs) = shared.lockout.locked(ip, Instant::now()) {
            let why = format!("too many failed attempts from {ip}: locked out for {secs} s");
            let mut r = refuse(StatusCode::TOO_MANY_REQUESTS, &why);
            if let Ok(v) = secs.to_string().parse() {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
            return r;
        }
        let snap = shared.snapshot();
        if let Err((code, why)) =
            auth::check(snap.config.admin.tokens.as_deref(), header.as_deref())
        {
            if shared.lockout.failed(ip, Instant::now()) {
                log::warn!(
                    "admin: {ip} locked out for {} s after {} failed attempts",
                    auth::LOCKOUT.as_secs(),
                    auth::MAX_FAILURES
                );
            }
            return refuse(code, why);
        }
        if let Some(r) = op.route() {
            if shared.traffic.get(r).is_none() {
                return refuse(StatusCode::NOT_FOUND, &format!("unknown route \"{r}\""));
            }
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err((code, why)) => return refuse(code, &why),
        };
        // two-person approval: a guarded call only records what it asks for
        let snap_admin = &snap.config.admin;
        if let (Some(kind), Some(route), Some(token)) =
            (op.kind(), op.route(), presented.as_deref())
        {
            if snap_admin.require_approval.iter().any(|k| k == kind) {
                let valid = match &op {
                    Op::SetWeights(_) => parse_weights(&body).map(|_| ()),
                    _ => parse_shift(&body).map(|_| ()),
                };
                if let Err(why) = valid {
                    return refuse(StatusCode::BAD_REQUEST, &why);
                }
                let revision = shared.traffic.get(route).map_or(0, |c| c.revision());
                let body_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let p = PendingChange::new(
                    route,
                    kind,
                    body_json,
                    token,
                    revision,
                    snap_admin.approval_timeout,
                );
                if shared.approvals.put(&p).await.is_err() {
                    return refuse(StatusCode::SERVICE_UNAVAILABLE, "cluster store unavailable");
                }
                let after = json!({ "pending": p.to_json() });
                audit(StatusCode::ACCEPTED, after.clone(), None);
                log::info!(
                    "admin: {method} {path} by token {} waits for approval {}",
                    p.requested_by,
                    p.id
                );
                return json_reply(StatusCode::ACCEPTED, &after);
            }
        }
        let outcome: Result<(StatusCode, Change), Refused> = match &op {
            Op::ListApprovals => {
                crate::approvals::expire(shared.approvals.as_ref(), &shared.audit).await;
                return match shared.approvals.list().await {
                    Ok(all) => json_reply(
                        StatusCode::OK,
                        &json!({ "pending": all.iter().map(PendingChange::to_json).collect::<Vec<_>>() }),
                    ),
                    Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "cluster store unavailable"),
                };
            }
            Op::Reject(id) => {
                return match shared.approvals.get(id).await {
                    Err(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "cluster store unavailable"),
                    Ok(Some(p)) if !p.expired(crate::traffic::now_ms()) => {
                        match shared.approvals.remove(id).await {
                            Ok(true) => {
                                let after = json!({ "rejected": p.to_json() });
                                audit(StatusCode::OK, after.clone(), None);
                                json_reply(StatusCode::OK, &after)
                            }
                            Ok(false) => refuse(
                                StatusCode::NOT_FOUND,
                                &format!("no pending change \"{id}\""),
                            ),
                            Err(_) => {
                                refuse(StatusCode::SERVICE_UNAVAILABLE, "cluster store unavailable")
                            }
                        }
                    }
                    Ok(_) => {
                        crate::approvals::expire(shared.approvals.as_ref(), &shared.audit).await;
                        refuse(
                            StatusCode::NOT_FOUND,
                            &format!("no pending change \"{id}\" (unknown or expired)"),
                        )
                    }
                };
            }
            Op::Approve(id) => {
                let token = presented.as_deref().unwrap_or_default();
                let p = match shared.approvals.get(id).await {
                    Err(_) => {
                        return refuse(StatusCode::SERVICE_UNAVAILABLE, "cluster store unavailable")
                    }
                    Ok(Some(p)) if !p.expired(crate::traffic::now_ms()) => p,
                    Ok(_) => {
                        crate::approvals::expire(shared.approvals.as_ref(), &shared.audit).await;
                        return refuse(
                            StatusCode::NOT_FOUND,
                            &format!("no pending change \"{id}\" (unknown or expired)"),
                        );
                    }
                };
                if p.asked_by(token) {
                    return refuse(
                        StatusCode::FORBIDDEN,
                        "the token that asked for a change cannot approve it: a second, different token must",
                    );
                }
                let now_rev = shared.traffic.get(&p.route).map(|c| c.revision());
                if now_rev != Some(p.revision) {
                    return refuse(
                        StatusCode::CONFLICT,
                        &format!(
                            "route \"{}\" changed since this was asked (revision {} then, {} now): ask again",
                            p.route,
                            p.revision,
                            now_rev.map_or("none".to_string(), |r| r.to_string())
                        ),
                    );
                }
                match shared.approvals.remove(id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return refuse(
                            StatusCode::NOT_FOUND,
                            &format!("no pending change \"{id}\""),
                        )
                    }
                    Err(_) => {
                        return refuse(StatusCode::SERVICE_UNAVAILABLE, "cluster store unavailable")
                    }
                }
                let body = serde_json::to_vec(&p.body).unwrap_or_default();
                let op = match p.kind.as_str() {
                    "weights" => parse_weights(&body).map(TrafficOp::Weights),
                    _ => parse_shift(&body).map(|(to, step, every)| TrafficOp::Shift {
                        to,
                        step,
                        every,
                    }),
                };
                match op {
                    Err(why) => return refuse(StatusCode::BAD_REQUEST, &why),
                    Ok(op) => change(shared, &p.route, op)
                        .await
                        .map(|c| (StatusCode::OK, c)),
                }
            }
            Op::Reload => {
                let s = shared.clone();
                let reloaded = tokio::task::spawn_blocking(move || s.reload("POST /reload")).await;
                return match reloaded {
                    Ok(Ok(generation)) => {
                        let after = json!({ "generation": generation });
                        audit(StatusCode::OK, after.clone(), None);
                        json_reply(StatusCode::OK, &after)
                    }
                    Ok(Err(msg)) => refuse(StatusCode::UNPROCESSABLE_ENTITY, &msg),
                    Err(_) => refuse(StatusCode::INTERNAL_SERVER_ERROR, "reload failed"),
                };
            }
            Op::SetWeights(r) => match parse_weights(&body) {
                Err(why) => return refuse(StatusCode::BAD_REQUEST, &why),
                Ok(w) => change(shared, r, TrafficOp::Weights(w))
                    .await
                    .map(|c| (StatusCode::OK, c)),
            },
            Op::StartShift(r) => match parse_shift(&body) {
                Err(why) => return refuse(StatusCode::BAD_REQUEST, &why),
                Ok((to, step, every)) => change(shared, r, TrafficOp::Shift { to, step, every })
                    .await
                    .map(|c| (StatusCode::ACCEPTED, c)),
            },
            Op::StopShift(r) => change(shared, r, TrafficOp::Stop)
                .await
                .map(|c| (StatusCode::OK, c)),
        };
        match outcome {
            Ok((code, change)) => {
                // an approval's route is known only once the change is found
                let before = match op {
                    Op::Approve(_) => change.before.clone(),
                    _ => before.clone(),
                };
                audit_full(code, before, change.after.clone(), None);
                log::info!(
                    "admin: {method} {path} by token {} from {ip}: {}",
                    presented
                        .as_deref()
                        .map(crate::audit::fingerprint)
                        .unwrap_or_default(),
                    change.after
                );
                let mut reply = change.after;
                if let (Some(w), Some(obj)) = (change.warning, reply.as_object_mut()) {
                    obj.insert("warning".into(), Value::from(w));
                }
                json_reply(code, &reply)
            }
            Err(r) => refuse(
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
                &r.reason,
            ),
        }
    }
}

/// Runs a traffic change: through the fleet's store in fleet mode, else here (the state file
/// is written with fsync, off the async threads).
async fn change(shared: &Arc<Shared>, route: &str, op: TrafficOp) -> Result<Change, Refused> {
    if let Some(fleet) = &shared.fleet {
        return fleet.change(route, op).await;
    }
    let (s, r) = (shared.clone(), route.to_string());
    tokio::task::spawn_blocking(move || s.traffic.apply(&r, op))
        .await
        .unwrap_or_else(|_| {
            Err(Refused {
                status: 500,
                reason: "the change failed".into(),
            })
        })
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        match endpoint(&method, &path) {
            Endpoint::Mutating(op) => return self.mutate(session, op).await,
            Endpoint::WrongMethod(allow) => {
                let mut r = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{method} is not allowed here (use {allow})"),
                );
                if let Ok(v) = allow.parse() {
                    r.headers_mut().insert(http::header::ALLOW, v);
                }
                if method != Method::GET && method != Method::HEAD {
                    self.shared.audit.record(Entry {
                        remote: session.client_addr().map(|a| a.to_string()),
                        token: None,
                        method: method.as_str(),
                        path: &path,
                        status: 405,
                        before: Value::Null,
                        after: Value::Null,
                        error: Some("method not allowed"),
                    });
                }
                return r;
            }
            Endpoint::ReadOnly => {}
        }
        if method != Method::GET && method != Method::HEAD {
            let known = matches!(
                path.as_str(),
                "/" | "/healthz" | "/readyz" | "/metrics" | "/status"
            ) || path.starts_with("/routes/");
            return if known {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            } else {
                error(StatusCode::NOT_FOUND, "no such endpoint")
            };
        }
        match path.as_str() {
            "/" => status_page(),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if self.shared.lifecycle.is_ready() {
                    reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
                } else if self.shared.lifecycle.is_draining() {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        b"draining\n".to_vec(),
                    )
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        b"starting\n".to_vec(),
                    )
                }
            }
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.shared.metrics.render(),
            ),
            "/status" => json_reply(StatusCode::OK, &status_json(&self.shared)),
            p => match p.strip_prefix("/routes/") {
                Some(name) => {
                    let snap = self.shared.snapshot();
                    match snap.routes.iter().position(|r| r.name == name) {
                        Some(i) => json_reply(StatusCode::OK, &route_json(&snap, i)),
                        None => error(StatusCode::NOT_FOUND, &format!("unknown route \"{name}\"")),
                    }
                }
                None => error(StatusCode::NOT_FOUND, "no such endpoint"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_bodies() {
        assert_eq!(
            parse_weights(br#"{"blue": 90, "green": 10}"#),
            Ok(Weights::new(90, 10))
        );
        for (body, why) in [
            (&br#"{"blue": 90, "green": 20}"#[..], "sum to 100"),
            (br#"{"blue": 110, "green": -10}"#, "0 to 100"),
            (br#"{"blue": 90.5, "green": 9.5}"#, "whole number"),
            (br#"{"blue": 90, "red": 10}"#, "unknown color \"red\""),
            (br#"{"blue": 100}"#, "missing \"green\""),
            (b"blue=90", "not JSON"),
            (b"[90, 10]", "JSON object"),
            (br#"{"blue": "90", "green": 10}"#, "whole number"),
        ] {
            let e = parse_weights(body).expect_err("refused");
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn shift_bodies() {
        assert_eq!(
            parse_shift(br#"{"to": "green", "step": 10, "every": "30s"}"#),
            Ok((Color::Green, 10, Duration::from_secs(30)))
        );
        for (body, why) in [
            (
                &br#"{"to": "red", "step": 10, "every": "30s"}"#[..],
                "unknown color",
            ),
            (br#"{"to": "green", "step": 0, "every": "30s"}"#, "1 to 100"),
            (br#"{"to": "green", "step": 10, "every": "soon"}"#, "every"),
            (br#"{"to": "green", "step": 10, "every": "1ms"}"#, "100ms"),
            (br#"{"to": "green", "step": 10}"#, "missing \"every\""),
            (
                br#"{"to": "green", "step": 10, "every": "1s", "x": 1}"#,
                "unknown field",
            ),
        ] {
            let e = parse_shift(body).expect_err("refused");
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn endpoints() {
        let op = |m: Method, p: &str| match endpoint(&m, p) {
            Endpoint::Mutating(Op::Reload) => "reload".to_string(),
            Endpoint::Mutating(Op::SetWeights(r)) => format!("weights {r}"),
            Endpoint::Mutating(Op::StartShift(r)) => format!("shift {r}"),
            Endpoint::Mutating(Op::StopShift(r)) => format!("stop {r}"),
            Endpoint::Mutating(Op::ListApprovals) => "approvals".to_string(),
            Endpoint::Mutating(Op::Approve(id)) => format!("approve {id}"),
            Endpoint::Mutating(Op::Reject(id)) => format!("reject {id}"),
            Endpoint::WrongMethod(a) => format!("405 {a}"),
            Endpoint::ReadOnly => "read".to_string(),
        };
        assert_eq!(op(Method::PUT, "/routes/shop/weights"), "weights shop");
        assert_eq!(op(Method::POST, "/routes/shop/weights"), "405 PUT");
        assert_eq!(op(Method::POST, "/routes/shop/shift"), "shift shop");
        assert_eq!(op(Method::DELETE, "/routes/shop/shift"), "stop shop");
        assert_eq!(op(Method::PUT, "/routes/shop/shift"), "405 POST, DELETE");
        assert_eq!(op(Method::GET, "/reload"), "405 POST");
        assert_eq!(op(Method::GET, "/routes/shop"), "read");
        assert_eq!(op(Method::GET, "/approvals"), "approvals");
        assert_eq!(op(Method::POST, "/approvals"), "405 GET");
        assert_eq!(op(Method::POST, "/approvals/ab12"), "approve ab12");
        assert_eq!(op(Method::DELETE, "/approvals/ab12"), "reject ab12");
        assert_eq!(op(Method::PUT, "/approvals/ab12"), "405 POST, DELETE");
    }
}
