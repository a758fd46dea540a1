//! Two-person approval of traffic changes against a real sluice: a guarded call only records a
//! pending change; a second, different token approves it; anyone with a token rejects it; it
//! expires; a route changed meanwhile refuses the approval; stopping a shift never waits; every
//! step is audited.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const ALICE: &str = "alice-token-7f3a";
const BOB: &str = "bob-token-19c2";

struct Setup {
    _dir: tempfile::TempDir,
    _blue: Backend,
    _green: Backend,
    s: Sluice,
}

fn start() -> Setup {
    let dir = tempdir();
    std::fs::write(dir.path().join("admin.token"), format!("{ALICE}\n{BOB}\n")).expect("tokens");
    let blue = Backend::start(dir.path(), "blue");
    let green = Backend::start(dir.path(), "green");
    let listen = free_addr();
    let config = format!(
        r#"
[admin]
listen = "{{admin}}"
token_file = "admin.token"
audit_log = "audit.jsonl"
require_approval = ["weights", "shift"]
approval_timeout = "2s"
[[listener]]
listen = "{listen}"
{shop}"#,
        shop = shop_pools_and_route(blue.addr, green.addr, (100, 0))
    );
    let s = Sluice::start(dir.path(), &config);
    Setup {
        _dir: dir,
        _blue: blue,
        _green: green,
        s,
    }
}

impl Setup {
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let r = request_with_body(self.s.admin, method, path, &headers, body.as_bytes())
            .expect("admin answered");
        (r.code, serde_json::from_str(&r.body).unwrap_or(Value::Null))
    }

    fn green(&self) -> u64 {
        let (_, body) = self.s.admin_get("/routes/shop").expect("route");
        let v: Value = serde_json::from_str(&body).expect("json");
        v["weights"]["green"].as_u64().unwrap_or(999)
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.s.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[test]
fn one_token_cannot_ask_and_approve() {
    let t = start();
    let (code, v) = t.call(
        "PUT",
        "/routes/shop/weights",
        Some(ALICE),
        r#"{"blue": 70, "green": 30}"#,
    );
    assert_eq!(code, 202, "{v}");
    let p = &v["pending"];
    let id = p["id"].as_str().expect("id").to_string();
    assert_eq!(p["route"], "shop");
    assert_eq!(p["kind"], "weights");
    assert_eq!(p["body"]["green"], 30);
    assert_eq!(p["requested_by"].as_str().map(str::len), Some(8));
    assert!(p["expires_at"].is_string());
    // nothing changed yet
    assert_eq!(t.green(), 0);
    // the list needs a token
    assert_eq!(t.call("GET", "/approvals", None, "").0, 401);
    let (code, list) = t.call("GET", "/approvals", Some(BOB), "");
    assert_eq!(code, 200);
    assert_eq!(list["pending"][0]["id"], id.as_str());
    // the asker cannot approve
    let (code, v) = t.call("POST", &format!("/approvals/{id}"), Some(ALICE), "");
    assert_eq!(code, 403, "{v}");
    assert_eq!(t.green(), 0);
    // a second token can
    let (code, v) = t.call("POST", &format!("/approvals/{id}"), Some(BOB), "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["weights"]["green"], 30);
    assert_eq!(t.green(), 30);
    // once
    assert_eq!(
        t.call("POST", &format!("/approvals/{id}"), Some(BOB), "").0,
        404
    );
    // a bad body is refused at once, not kept
    let (code, _) = t.call(
        "PUT",
        "/routes/shop/weights",
        Some(ALICE),
        r#"{"blue": 70}"#,
    );
    assert_eq!(code, 400);
    // stopping a shift never waits for anyone
    let (code, v) = t.call("DELETE", "/routes/shop/shift", Some(ALICE), "");
    assert_eq!(code, 200, "{v}");

    let audit = t.audit();
    let steps: Vec<(String, String, u64)> = audit
        .iter()
        .map(|l| {
            (
                l["method"].as_str().unwrap_or("").to_string(),
                l["path"].as_str().unwrap_or("").to_string(),
                l["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let approve = format!("/approvals/{id}");
    assert!(
        steps.contains(&("PUT".into(), "/routes/shop/weights".into(), 202)),
        "{steps:?}"
    );
    assert!(
        steps.contains(&("POST".into(), approve.clone(), 403)),
        "{steps:?}"
    );
    assert!(
        steps.contains(&("POST".into(), approve.clone(), 200)),
        "{steps:?}"
    );
    let approved = audit
        .iter()
        .find(|l| l["path"] == approve.as_str() && l["status"] == 200)
        .expect("approval audited");
    assert_eq!(approved["before"]["weights"]["green"], 0);
    assert_eq!(approved["after"]["weights"]["green"], 30);
    assert_ne!(
        approved["token"], audit[0]["token"],
        "approved by the other token"
    );
}

#[test]
fn rejection_expiry_and_a_route_changed_meanwhile() {
    let t = start();
    // rejected by anyone with a token (here the asker)
    let (code, v) = t.call(
        "POST",
        "/routes/shop/shift",
        Some(ALICE),
        r#"{"to": "green", "step": 10, "every": "1m"}"#,
    );
    assert_eq!(code, 202, "{v}");
    let id = v["pending"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["pending"]["kind"], "shift");
    let (code, v) = t.call("DELETE", &format!("/approvals/{id}"), Some(ALICE), "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        t.call("POST", &format!("/approvals/{id}"), Some(BOB), "").0,
        404
    );
    assert_eq!(t.green(), 0);

    // expires after approval_timeout (2 s)
    let (code, v) = t.call(
        "PUT",
        "/routes/shop/weights",
        Some(ALICE),
        r#"{"blue": 50, "green": 50}"#,
    );
    assert_eq!(code, 202, "{v}");
    let expiring = v["pending"]["id"].as_str().expect("id").to_string();
    assert!(wait_until(Duration::from_secs(5), || t
        .call("GET", "/approvals", Some(BOB), "")
        .1["pending"]
        .as_array()
        .is_some_and(|a| a.is_empty())));
    assert_eq!(
        t.call("POST", &format!("/approvals/{expiring}"), Some(BOB), "")
            .0,
        404
    );
    assert_eq!(t.green(), 0);
    assert!(wait_until(Duration::from_secs(2), || t.audit().iter().any(
        |l| l["method"] == "EXPIRE" && l["before"]["id"] == expiring.as_str()
    )));

    // asked, then the route changes another way: the approval is refused
    let (code, v) = t.call(
        "PUT",
        "/routes/shop/weights",
        Some(ALICE),
        r#"{"blue": 60, "green": 40}"#,
    );
    assert_eq!(code, 202, "{v}");
    let stale = v["pending"]["id"].as_str().expect("id").to_string();
    assert_eq!(t.call("DELETE", "/routes/shop/shift", Some(BOB), "").0, 200);
    let (code, v) = t.call("POST", &format!("/approvals/{stale}"), Some(BOB), "");
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("changed since"),
        "{v}"
    );
    assert_eq!(t.green(), 0);
    let audit = t.audit();
    assert!(audit
        .iter()
        .any(|l| l["path"] == format!("/approvals/{id}").as_str()
            && l["method"] == "DELETE"
            && l["status"] == 200));
}
