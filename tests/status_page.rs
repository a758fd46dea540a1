//! The status page in a real headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: a running sluice with two routes, one shifting; the page shows the routes, the
//! weights and the backends' health, and a killed backend turns unhealthy on the page within
//! 2 s without a reload. A screenshot goes to target/tmp/status-page.png.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "page-token-3e9d";

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A headless Chromium with a DevTools connection to its one page.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    fn open(bin: &Path, url: &str) -> Browser {
        let profile = tempdir();
        let child = Command::new(bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=420,1400",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // the port Chromium chose, from the file it writes into its profile
        let port_file = profile.path().join("DevToolsActivePort");
        let mut port = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                port = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|t| t.lines().next().and_then(|l| l.parse::<u16>().ok()));
                port.is_some()
            }),
            "chromium did not open its DevTools port"
        );
        let port = port.unwrap_or_default();
        let debugger = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut page_ws = None;
        assert!(wait_until(Duration::from_secs(10), || {
            // DevTools answers only a Host that is an IP address or localhost, and keeps the
            // connection open: the answer is read by its length
            use std::io::Write;
            let Ok(mut c) = TcpStream::connect(debugger) else {
                return false;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let req = format!("GET /json/list HTTP/1.1\r\nHost: {debugger}\r\n\r\n");
            if c.write_all(req.as_bytes()).is_err() {
                return false;
            }
            let Some((200, _, body)) = read_response(&mut c) else {
                return false;
            };
            let body = String::from_utf8_lossy(&body);
            let list: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            page_ws = list.as_array().and_then(|l| {
                l.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            page_ws.is_some()
        }));
        let (ws, _) = tungstenite::connect(page_ws.unwrap_or_default()).expect("devtools");
        Browser {
            child,
            _profile: profile,
            ws,
            next_id: 1,
        }
    }

    /// One DevTools command; its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(tungstenite::Message::text(msg)).expect("send");
        loop {
            let m = self.ws.read().expect("devtools answer");
            if let tungstenite::Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if v["id"] == id {
                    return v["result"].clone();
                }
            }
        }
    }

    /// A JavaScript expression's value on the page.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_status_page_shows_routes_weights_and_health_live() {
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED: chromium is not installed (make test installs it with apt when it can)"
        );
        return;
    };
    let dir = tempdir();
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("token");
    let blue = Backend::start(dir.path(), "blue");
    let green = Backend::start(dir.path(), "green");
    let api = Backend::start(dir.path(), "api");
    let listen = free_addr();
    let health = r#"health = { path = "/healthz", interval = "300ms", timeout = "250ms", unhealthy_after = 2, healthy_after = 1 }"#;
    let config = format!(
        r#"
[admin]
listen = "{{admin}}"
token_file = "admin.token"
[[listener]]
listen = "{listen}"
[[pool]]
name = "blue"
backends = ["{}"]
{health}
[[pool]]
name = "green"
backends = ["{}"]
{health}
[[pool]]
name = "api"
backends = ["{}"]
{health}
[[route]]
name = "shop"
hosts = ["shop.test"]
blue = ["blue"]
green = ["green"]
weights = {{ blue = 100, green = 0 }}
[[route]]
name = "api"
hosts = ["*"]
blue = ["api"]
"#,
        blue.addr, green.addr, api.addr
    );
    let s = Sluice::start(dir.path(), &config);
    let auth = format!("Bearer {TOKEN}");
    let r = request_with_body(
        s.admin,
        "POST",
        "/routes/shop/shift",
        &[("authorization", &auth)],
        br#"{"to": "green", "step": 10, "every": "1h"}"#,
    )
    .expect("shift");
    assert_eq!(r.code, 202, "{}", r.body);
    for _ in 0..20 {
        let _ = request(listen, "GET", "/", &[("host", "shop.test")]);
        let _ = request(listen, "GET", "/", &[]);
    }
    // the page is self-contained: no external address anywhere in it (the SVG namespace is a
    // name, not a fetch)
    let (code, html) = s.admin_get("/").expect("page");
    assert_eq!(code, 200);
    let html = html.replace("http://www.w3.org/2000/svg", "");
    for external in ["http://", "https://", "//cdn", "@import"] {
        assert!(!html.contains(external), "the page refers to {external}");
    }

    let mut b = Browser::open(&bin, &format!("http://{}/", s.admin));
    assert!(
        wait_until(Duration::from_secs(15), || b
            .eval("document.body.dataset.loaded")
            == "1"),
        "the page never rendered /status"
    );
    let routes = b.eval("[...document.querySelectorAll('[data-route]')].map(e => e.dataset.route)");
    assert_eq!(routes, json!(["shop", "api"]));
    let green_weight = b.eval(
        "document.querySelector('[data-route=shop] [data-weight-green]').dataset.weightGreen",
    );
    assert_eq!(green_weight, "10");
    assert_eq!(
        b.eval("document.querySelector('[data-route=shop] [data-shift]').dataset.shift"),
        "running"
    );
    let health_of = |b: &mut Browser, addr: &str| {
        b.eval(&format!(
            "(document.querySelector('[data-backend=\"{addr}\"]') || {{dataset: {{}}}}).dataset.health"
        ))
    };
    let g = green.addr.to_string();
    assert!(wait_until(Duration::from_secs(5), || health_of(&mut b, &g)
        == "healthy"));
    assert_eq!(health_of(&mut b, &blue.addr.to_string()), "healthy");
    // sparklines are drawn from sluice's own history
    assert!(
        b.eval("document.querySelectorAll('svg.spark').length")
            .as_u64()
            >= Some(2)
    );

    let shot = b.call("Page.captureScreenshot", json!({ "format": "png" }));
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        shot["data"].as_str().unwrap_or_default(),
    )
    .expect("png");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&out, &png).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // a backend dies: the open page shows it within 2 s, without a reload
    green.proc.signal(libc::SIGKILL);
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || health_of(&mut b, &g)
            != "healthy"),
        "the page never showed the dead backend"
    );
    let shown = killed.elapsed();
    eprintln!(
        "status page: dead backend shown after {shown:?}; screenshot {}",
        out.display()
    );
    assert!(shown < Duration::from_secs(2), "{shown:?}");
}
