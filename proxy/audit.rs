//! `admin.audit_log`: one JSON line per mutating admin call, accepted or refused, and per
//! automatic rollback. Tokens appear only as the first 8 hex digits of their SHA-256.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::traffic::RolledBack;

pub struct Audit {
    path: Option<PathBuf>,
    /// Fleet mode: this replica's name, in every line.
    instance: Option<String>,
    /// One writer at a time, so lines never interleave.
    lock: Mutex<()>,
}

/// One admin call as the audit trail records it.
pub struct Entry<'a> {
    pub remote: Option<String>,
    /// The bearer token presented, if any (only its fingerprint is written).
    pub token: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub before: Value,
    pub after: Value,
    /// Why the call was refused.
    pub error: Option<&'a str>,
}

/// The first 8 hex digits of the token's SHA-256: enough to tell tokens apart, useless to
/// anyone reading the log.
pub fn fingerprint(token: &str) -> String {
    let mut hex = crate::config::hex(&Sha256::digest(token.as_bytes()));
    hex.truncate(8);
    hex
}

impl Audit {
    pub fn new(path: Option<PathBuf>, instance: Option<String>) -> Audit {
        Audit {
            path,
            instance,
            lock: Mutex::new(()),
        }
    }

    pub fn record(&self, e: Entry) {
        let mut line = json!({
            "ts": now(),
            "remote": e.remote,
            "token": e.token.map(fingerprint),
            "method": e.method,
            "path": e.path,
            "status": e.status,
            "before": e.before,
            "after": e.after,
        });
        if let (Some(err), Some(obj)) = (e.error, line.as_object_mut()) {
            obj.insert("error".into(), Value::from(err));
        }
        self.write(&line);
    }

    /// Something sluice did by itself (an approval expiring), with what it concerned.
    pub fn event(&self, method: &str, path: &str, subject: Value) {
        self.write(&json!({
            "ts": now(),
            "remote": null,
            "token": null,
            "method": method,
            "path": path,
            "status": null,
            "before": subject,
            "after": null,
        }));
    }

    /// A shift undone by sluice itself.
    pub fn rollback(&self, e: &RolledBack) {
        self.write(&json!({
            "ts": now(),
            "remote": null,
            "token": null,
            "method": "ROLLBACK",
            "path": format!("/routes/{}/shift", e.route),
            "status": null,
            "before": e.before,
            "after": e.after,
            "reason": e.reason,
        }));
    }

    fn write(&self, line: &Value) {
        let Some(path) = &self.path else {
            return;
        };
        let mut line = line.clone();
        if let (Some(i), Some(obj)) = (&self.instance, line.as_object_mut()) {
            obj.insert("instance".into(), Value::from(i.as_str()));
        }
        let mut text = line.to_string();
        text.push('\n');
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let written = (|| {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // opened per line: a rotated log is picked up at once
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            f.write_all(text.as_bytes())
        })();
        if let Err(e) = written {
            log::error!(
                "cannot write audit log {}: {e}: {}",
                path.display(),
                text.trim_end()
            );
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_no_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit/audit.jsonl");
        let a = Audit::new(Some(path.clone()), None);
        for status in [403, 200] {
            a.record(Entry {
                remote: Some("127.0.0.1:5000".into()),
                token: Some("s3cret-token"),
                method: "PUT",
                path: "/routes/shop/weights",
                status,
                before: json!({"weights": {"blue": 100, "green": 0}}),
                after: Value::Null,
                error: (status == 403).then_some("token not accepted"),
            });
        }
        let text = std::fs::read_to_string(&path).expect("audit");
        assert!(!text.contains("s3cret"));
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["token"], fingerprint("s3cret-token"));
        assert_eq!(lines[0]["error"], "token not accepted");
        assert_eq!(lines[1]["status"], 200);
        assert!(lines[1].get("error").is_none());
        assert_eq!(fingerprint("x").len(), 8);
    }
}
