//! JSON access log, one object per line. The request path appends its line to a shared buffer
//! (one short lock, no system call, no wake-up); a dedicated thread swaps the buffer out and
//! writes it every 50 ms, or sooner once 64 KiB are waiting. The request path never blocks on
//! the disk: when the writer falls behind by more than `MAX_PENDING`, lines are dropped and
//! counted in `sluice_access_log_dropped_total`.
//!
//! A file log can be rotated: the writer opens the path again on SIGUSR1 ([`AccessLogger::reopen`],
//! as nginx does) and when, checked every second, the path no longer names the open file
//! (logrotate renamed or removed it). Lines are written in whole batches to one file or the
//! other, so none is lost or written twice across a rotation.

use std::cell::RefCell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;

use crate::config::AccessLog;
use crate::text::{
    push_frac3, push_ip, push_json_opt, push_json_quoted_or_null, push_json_str, push_socket_addr,
    push_u64,
};

/// The writer is woken early once this much is waiting.
const WAKE_AT: usize = 64 * 1024;
/// Beyond this much waiting (the disk is stuck), new lines are dropped.
const MAX_PENDING: usize = 16 * 1024 * 1024;
const INTERVAL: Duration = Duration::from_millis(50);

/// One request's access log line: a JSON object, its fields in this order. `color`, `region`,
/// `failed_backends` and `trace_id` are left out when empty; other absent values are `null`.
pub struct Line<'a> {
    pub time: SystemTime,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub tls: bool,
    pub status: u16,
    pub bytes: usize,
    /// Written as milliseconds with three decimals (microsecond resolution).
    pub duration: Duration,
    pub route: Option<&'a str>,
    pub color: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub region: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub retries: u8,
    /// Backends this request tried and failed on before the answer.
    pub failed_backends: Vec<SocketAddr>,
    pub request_id: &'a str,
    pub trace_id: Option<String>,
    pub error: Option<&'a str>,
}

impl Line<'_> {
    /// Appends the line, without its newline.
    pub fn write_json(&self, o: &mut Vec<u8>) {
        o.extend_from_slice(b"{\"time\":\"");
        push_time(o, self.time);
        o.extend_from_slice(b"\",\"client\":");
        push_json_quoted_or_null(o, self.client, push_ip);
        o.extend_from_slice(b",\"method\":");
        push_json_str(o, self.method);
        o.extend_from_slice(b",\"host\":");
        push_json_str(o, self.host);
        o.extend_from_slice(b",\"path\":");
        push_json_str(o, self.path);
        o.extend_from_slice(b",\"protocol\":");
        push_json_str(o, self.protocol);
        o.extend_from_slice(if self.tls {
            b",\"tls\":true,\"status\":"
        } else {
            b",\"tls\":false,\"status\":"
        });
        push_u64(o, u64::from(self.status));
        o.extend_from_slice(b",\"bytes\":");
        push_u64(o, self.bytes as u64);
        o.extend_from_slice(b",\"duration_ms\":");
        let us = u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX);
        push_u64(o, us / 1000);
        push_frac3(o, (us % 1000) as u32);
        o.extend_from_slice(b",\"route\":");
        push_json_opt(o, self.route);
        if let Some(c) = self.color {
            o.extend_from_slice(b",\"color\":");
            push_json_str(o, c);
        }
        o.extend_from_slice(b",\"pool\":");
        push_json_opt(o, self.pool);
        if let Some(r) = self.region {
            o.extend_from_slice(b",\"region\":");
            push_json_str(o, r);
        }
        o.extend_from_slice(b",\"backend\":");
        push_json_quoted_or_null(o, self.backend, push_socket_addr);
        o.extend_from_slice(b",\"retries\":");
        push_u64(o, u64::from(self.retries));
        if !self.failed_backends.is_empty() {
            o.extend_from_slice(b",\"failed_backends\":[");
            for (i, a) in self.failed_backends.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                push_json_quoted_or_null(o, Some(*a), push_socket_addr);
            }
            o.push(b']');
        }
        o.extend_from_slice(b",\"request_id\":");
        push_json_str(o, self.request_id);
        if let Some(t) = &self.trace_id {
            o.extend_from_slice(b",\"trace_id\":");
            push_json_str(o, t);
        }
        o.extend_from_slice(b",\"error\":");
        push_json_opt(o, self.error);
        o.push(b'}');
    }
}

/// Appends `t` as RFC 3339 UTC with milliseconds (`2026-12-02T14:33:34.123Z`, as
/// `humantime::format_rfc3339_millis`). The date and time of day are formatted once per second
/// per thread.
fn push_time(o: &mut Vec<u8>, t: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
    }
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let cached = SECOND.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let whole = UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            let Some(head) = text.as_bytes().get(..19) else {
                return false;
            };
            c.1.copy_from_slice(head);
            c.0 = secs;
        }
        o.extend_from_slice(&c.1);
        true
    });
    if !cached {
        // not a four-digit year: no cache, humantime's own text
        let _ = write!(o, "{}", humantime::format_rfc3339_millis(t));
        return;
    }
    push_frac3(o, since.subsec_millis());
    o.push(b'Z');
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// Flush requests made / served (a flush waits until its request is served).
    asked: u64,
    served: u64,
    closed: bool,
    /// Open the file again before the next write (SIGUSR1).
    reopen: bool,
}

struct Inner {
    pending: Mutex<Pending>,
    /// Wakes the writer (early write, flush, close).
    wake: Condvar,
    /// Wakes flushers once the writer served them.
    done: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct AccessLogger {
    inner: Option<Arc<Inner>>,
    dropped: IntCounter,
}

impl AccessLogger {
    pub fn start(target: &AccessLog, dropped: IntCounter) -> Result<Self, String> {
        let out = match target {
            AccessLog::Off => {
                return Ok(AccessLogger {
                    inner: None,
                    dropped,
                })
            }
            AccessLog::Stdout => Out::Stdout(std::io::stdout()),
            AccessLog::File(p) => Out::File(LogFile::open(p)?),
        };
        let inner = Arc::new(Inner {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let w = inner.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(&w, out))
            .map_err(|e| format!("cannot start access log thread: {e}"))?;
        Ok(AccessLogger {
            inner: Some(inner),
            dropped,
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Formats `line` (in a buffer kept by this thread) and queues it.
    pub fn log_line(&self, line: &Line<'_>) {
        if self.inner.is_none() {
            return;
        }
        thread_local! {
            static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
        }
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            line.write_json(&mut b);
            self.log(&b);
            // one huge line (a long path) does not keep its buffer for the thread's life
            if b.capacity() > 16 * 1024 {
                *b = Vec::with_capacity(512);
            }
        });
    }

    /// Queues one line (without its newline).
    pub fn log(&self, line: &[u8]) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut p = inner.lock();
        if p.buf.len() + line.len() > MAX_PENDING {
            drop(p);
            self.dropped.inc();
            return;
        }
        let before = p.buf.len();
        p.buf.extend_from_slice(line);
        p.buf.push(b'\n');
        let wake = before < WAKE_AT && p.buf.len() >= WAKE_AT;
        drop(p);
        if wake {
            inner.wake.notify_one();
        }
    }

    /// Opens the log file again before the next write (SIGUSR1 after a rotation).
    pub fn reopen(&self) {
        if let Some(inner) = &self.inner {
            inner.lock().reopen = true;
            inner.wake.notify_one();
        }
    }

    /// Waits (at most 2 s) until every line queued so far is written.
    pub fn flush(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut p = inner.lock();
        p.asked += 1;
        let ticket = p.asked;
        inner.wake.notify_one();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while p.served < ticket && !p.closed {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            p = inner
                .done
                .wait_timeout(p, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl Drop for AccessLogger {
    fn drop(&mut self) {
        if let Some(inner) = &self.inner {
            inner.lock().closed = true;
            inner.wake.notify_one();
        }
    }
}

/// Where lines go.
enum Out {
    Stdout(std::io::Stdout),
    File(LogFile),
}

/// An open log file and the path it was opened as.
struct LogFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// Device and inode of the open file.
    id: (u64, u64),
}

impl LogFile {
    fn open(path: &std::path::Path) -> Result<LogFile, String> {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open access log {}: {e}", path.display()))?;
        let m = file
            .metadata()
            .map_err(|e| format!("access log {}: {e}", path.display()))?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            id: (m.dev(), m.ino()),
        })
    }

    /// Whether the path still names the open file.
    fn current(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

impl Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Out::Stdout(s) => s.write_all(buf).and_then(|()| s.flush()),
            Out::File(f) => f.file.write_all(buf),
        }
    }

    /// Opens the file again if asked to, or if its path names another file (or none) now.
    fn reopen_if(&mut self, asked: bool) {
        let Out::File(f) = self else {
            return;
        };
        if !asked && f.current() {
            return;
        }
        match LogFile::open(&f.path) {
            Ok(new) => {
                log::info!("access log {} reopened", f.path.display());
                *f = new;
            }
            // keep writing where we can; try again at the next check
            Err(e) => log::error!("{e}"),
        }
    }
}

const CHECK_PATH_EVERY: Duration = Duration::from_secs(1);

fn writer(inner: &Inner, mut out: Out) {
    let mut spare = Vec::with_capacity(WAKE_AT * 2);
    let mut checked = std::time::Instant::now();
    loop {
        let (ticket, closed, reopen) = {
            let mut p = inner.lock();
            if p.buf.len() < WAKE_AT && p.served == p.asked && !p.closed && !p.reopen {
                p = inner
                    .wake
                    .wait_timeout(p, INTERVAL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut p.buf, &mut spare);
            (p.asked, p.closed, std::mem::take(&mut p.reopen))
        };
        // a whole batch goes to one file: before or after the reopen, never both
        if reopen || checked.elapsed() >= CHECK_PATH_EVERY {
            out.reopen_if(reopen);
            checked = std::time::Instant::now();
        }
        if !spare.is_empty() {
            if let Err(e) = out.write(&spare) {
                log::error!("access log write failed: {e}");
            }
            spare.clear();
            // keep a reasonable buffer, not the high-water mark of a burst
            spare.shrink_to(WAKE_AT * 2);
        }
        {
            let mut p = inner.lock();
            p.served = p.served.max(ticket);
        }
        inner.done.notify_all();
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_are_json_with_every_field() {
        let path = "/a \"quoted\" \\ path\u{1}\n é";
        let mut line = Line {
            time: UNIX_EPOCH + Duration::from_millis(1_764_686_014_007),
            client: Some("192.0.2.7".parse().expect("ip")),
            method: "GET",
            host: "example.com",
            path,
            protocol: "HTTP/1.1",
            tls: true,
            status: 200,
            bytes: 1234,
            duration: Duration::from_micros(12_345_678),
            route: Some("web"),
            color: Some("green"),
            pool: Some("web-green"),
            region: None,
            backend: Some("[2001:db8::1]:8080".parse().expect("addr")),
            retries: 1,
            failed_backends: vec!["10.0.0.1:80".parse().expect("addr")],
            request_id: "abc",
            trace_id: None,
            error: None,
        };
        let json = |l: &Line<'_>| {
            let mut o = Vec::new();
            l.write_json(&mut o);
            serde_json::from_slice::<serde_json::Value>(&o).expect("valid JSON")
        };
        let v = json(&line);
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2025-12-02T14:33:34.007Z",
                "client": "192.0.2.7",
                "method": "GET",
                "host": "example.com",
                "path": path,
                "protocol": "HTTP/1.1",
                "tls": true,
                "status": 200,
                "bytes": 1234,
                "duration_ms": 12345.678,
                "route": "web",
                "color": "green",
                "pool": "web-green",
                "backend": "[2001:db8::1]:8080",
                "retries": 1,
                "failed_backends": ["10.0.0.1:80"],
                "request_id": "abc",
                "error": null,
            })
        );
        line.client = None;
        line.color = None;
        line.route = None;
        line.pool = None;
        line.backend = None;
        line.region = Some("eu");
        line.failed_backends.clear();
        line.trace_id = Some("4bf92f3577b34da6a3ce929d0e0e4736".into());
        line.error = Some("ConnectRefused");
        line.duration = Duration::from_micros(5);
        let v = json(&line);
        assert!(v["client"].is_null() && v["route"].is_null() && v["pool"].is_null());
        assert!(v["backend"].is_null() && v.get("color").is_none());
        assert!(v.get("failed_backends").is_none());
        assert_eq!(v["region"], "eu");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["error"], "ConnectRefused");
        assert_eq!(v["duration_ms"], 0.005);
    }

    #[test]
    fn times_read_as_humantime_writes_them() {
        let mut o = Vec::new();
        // within a second, across seconds, and back: the per-second cache must follow
        for ms in [
            0u64,
            999,
            1_000,
            1_764_686_014_007,
            1_764_686_014_999,
            1_764_686_015_000,
            5,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms) + Duration::from_nanos(999_999);
            o.clear();
            push_time(&mut o, t);
            assert_eq!(
                String::from_utf8_lossy(&o),
                humantime::format_rfc3339_millis(t).to_string()
            );
        }
    }

    #[test]
    fn lines_are_written_in_order_and_flush_waits_for_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let counter = IntCounter::new("d", "d").expect("counter");
        let log =
            AccessLogger::start(&AccessLog::File(path.clone()), counter.clone()).expect("logger");
        let threads: Vec<Vec<String>> = (0..4)
            .map(|t| {
                (0..1000)
                    .map(|i| format!("{{\"t\":{t},\"i\":{i}}}"))
                    .collect()
            })
            .collect();
        std::thread::scope(|s| {
            for lines in &threads {
                let log = &log;
                s.spawn(move || {
                    for l in lines {
                        log.log(l.as_bytes());
                    }
                });
            }
        });
        log.flush();
        let text = std::fs::read_to_string(&path).expect("log");
        assert_eq!(text.lines().count(), 4000);
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{{\"t\":{t},")))
                .collect();
            assert_eq!(mine.len(), 1000);
            assert!(mine[999].ends_with("\"i\":999}"), "{}", mine[999]);
        }
        assert_eq!(counter.get(), 0);
    }

    #[test]
    fn a_renamed_log_is_reopened_on_request_and_by_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let counter = IntCounter::new("d", "d").expect("counter");
        let log = AccessLogger::start(&AccessLog::File(path.clone()), counter).expect("logger");
        log.log(b"one");
        log.flush();
        std::fs::rename(&path, dir.path().join("access.log.1")).expect("rename");
        log.log(b"two");
        log.flush();
        log.reopen();
        log.log(b"three");
        log.flush();
        std::fs::rename(&path, dir.path().join("access.log.2")).expect("rename");
        // no signal: the path check notices within a second
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !path.exists() && std::time::Instant::now() < deadline {
            log.log(b"four");
            log.flush();
            std::thread::sleep(Duration::from_millis(100));
        }
        log.log(b"five");
        log.flush();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        assert_eq!(read("access.log.1"), "one\ntwo\n");
        assert_eq!(
            read("access.log.2"),
            "three\n".to_string() + &"four\n".repeat(read("access.log.2").matches("four").count())
        );
        assert!(
            read("access.log").ends_with("five\n"),
            "{}",
            read("access.log")
        );
    }
}
