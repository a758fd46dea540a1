//! The admin listener: probes, metrics and status (contract: `shared/spec/admin-api.md`).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::auth;
use crate::snapshot::Snapshot;
use crate::state::Shared;

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

fn json_reply(status: StatusCode, v: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn error(status: StatusCode, msg: &str) -> Response<Vec<u8>> {
    json_reply(status, &json!({ "error": msg }))
}

fn route_json(snap: &Snapshot, i: usize) -> Value {
    let r = &snap.config.routes[i];
    json!({
        "name": r.name,
        "weights": { "blue": r.weights.0, "green": r.weights.1 },
        "source": "config",
        "shift": null,
    })
}

pub fn status_json(shared: &Shared) -> Value {
    let snap = shared.snapshot();
    let pools: Vec<Value> = snap
        .config
        .pools
        .iter()
        .zip(&snap.pools)
        .map(|(p, rt)| {
            json!({
                "name": p.name,
                "region": p.region,
                "backends": p.backends.iter().zip(&rt.backends).map(|(b, r)| {
                    let v = r.health.view();
                    json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "healthy": v.usable,
                        "state": v.state,
                        "ejected_until": v.ejected_until
                            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
                        "reason": v.reason,
                    })
                }).collect::<Vec<_>>(),
            })
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
        },
        "draining": shared.lifecycle.is_draining(),
        "inflight": shared.lifecycle.inflight(),
        "routes": (0..snap.routes.len()).map(|i| route_json(&snap, i)).collect::<Vec<_>>(),
        "pools": pools,
    })
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        if path == "/reload" {
            if method != Method::POST {
                return error(StatusCode::METHOD_NOT_ALLOWED, "use POST /reload");
            }
            let auth = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let snap = self.shared.snapshot();
            if let Err((code, why)) = auth::check(snap.config.admin.tokens.as_deref(), auth) {
                return error(code, why);
            }
            let shared = self.shared.clone();
            let outcome = tokio::task::spawn_blocking(move || shared.reload("POST /reload")).await;
            return match outcome {
                Ok(Ok(generation)) => {
                    json_reply(StatusCode::OK, &json!({ "generation": generation }))
                }
                Ok(Err(msg)) => error(StatusCode::UNPROCESSABLE_ENTITY, &msg),
                Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "reload failed"),
            };
        }
        if method != Method::GET && method != Method::HEAD {
            let known = matches!(
                path.as_str(),
                "/healthz" | "/readyz" | "/metrics" | "/status"
            ) || path.starts_with("/routes/");
            return if known {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            } else {
                error(StatusCode::NOT_FOUND, "no such endpoint")
            };
        }
        match path.as_str() {
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
                    match snap.config.routes.iter().position(|r| r.name == name) {
                        Some(i) => json_reply(StatusCode::OK, &route_json(&snap, i)),
                        None => error(StatusCode::NOT_FOUND, "unknown route"),
                    }
                }
                None => error(StatusCode::NOT_FOUND, "no such endpoint"),
            },
        }
    }
}
