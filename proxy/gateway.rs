//! The request path: route, pick a backend, forward with the standard headers, answer errors
//! with short bodies, and record metrics and the access log.
//!
//! Header names go on lower-case both ways (a few common ones, `Host` among them, title-cased
//! by pingora), as HTTP/2 writes them and as HAProxy and Envoy send them: names are
//! case-insensitive (RFC 9110 section 5.1). Pingora parses HTTP/1 heads without its second,
//! case-keeping header map for that (`set_keep_header_case(false)` in `edge`,
//! `keep_response_header_case = false` on every peer in `snapshot`; pingora patch 0003).
//!
//! Nothing here reads a head back from pingora's sessions after it moved on: the response head
//! reaches `response_filter` as pingora's HTTP/1 client parsed it, not a copy, and the client
//! keeps only what its reuse decision needs (`keep_response_header = false` on every peer,
//! patch 0007); over h2 the written head goes to h2 itself, and `response_written()` has only its
//! status (`h2_hand_over_response_header` in `edge`, patch 0009). Code that needs more of either
//! must keep its own copy or turn those options off.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::access_log;
use crate::client_ip;
use crate::geo;
use crate::metrics::code_class;
use crate::router::Host;
use crate::snapshot::{ColorRt, NoBackend, PoolRt, RouteRt, Snapshot};
use crate::state::{InflightGuard, Shared};
use crate::traffic::{sticky, Color};

// looked up by a prebuilt name: a `&str` is parsed into one on every lookup
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The request path for every listener; each request finds its listener from the connection.
pub struct Gateway {
    pub shared: Arc<Shared>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    snap: Option<Arc<Snapshot>>,
    route: Option<usize>,
    /// The color serving this request (chosen after routing and rate limiting).
    color: Color,
    colored: bool,
    /// The chosen color could not serve and the other one took over.
    crossed: bool,
    /// A new client id cookie to hand out with the response.
    set_cookie: Option<String>,
    /// Index into the color's pools.
    pool_slot: usize,
    backend: Option<usize>,
    /// Bit i set: backend i of the pool was tried and failed to connect.
    failed: u64,
    retries: u8,
    /// The request id: the client's if it sent a sane one, else a new one. Built once as a
    /// header value, shared by the upstream request, the response and the access log.
    request_id: HeaderValue,
    /// The normalized host (inline: no allocation).
    host: Host,
    /// The request arrived over TLS.
    tls: bool,
    /// Seconds for `Retry-After` when every backend is down.
    retry_after: Option<u64>,
    /// The client address: the peer, or what trusted proxies say it is.
    client_ip: Option<IpAddr>,
    /// The color's pools (slots) in the order they should serve this client, how many, and
    /// which one is being tried.
    order: [u8; geo::MAX_POOLS],
    order_len: usize,
    order_pos: usize,
    geo_counted: bool,
    /// The route's `max_body_bytes` (0: no limit) and the body bytes seen so far.
    body_limit: u64,
    body_seen: u64,
    /// The request's spans (`[tracing]`).
    trace: Option<crate::trace::RequestTrace>,
    _inflight: Option<InflightGuard>,
}

/// At most this many retries on another backend when the connection to one fails.
const MAX_RETRIES: u8 = 2;

impl Gateway {
    fn client_ip(session: &Session) -> Option<IpAddr> {
        session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
    }

    async fn respond(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        code: u16,
        body: &str,
        extra: &[(&'static str, String)],
    ) -> Result<()> {
        let mut h = ResponseHeader::build(code, Some(6))?;
        h.insert_header("content-type", "text/plain; charset=utf-8")?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header("cache-control", "no-store")?;
        for (name, value) in extra {
            h.insert_header(*name, value.as_str())?;
        }
        if !ctx.request_id.is_empty() {
            h.insert_header("x-request-id", ctx.request_id.clone())?;
        }
        self.add_hsts(&mut h, ctx)?;
        session.set_keepalive(None);
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
            .await
    }

    /// 413 before any of the body is read; the connection is closed after the answer.
    async fn body_too_large(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.shared
            .metrics
            .limit_hits
            .with_label_values(&["body_bytes"])
            .inc();
        self.respond(session, ctx, 413, "request body too large\n", &[])
            .await?;
        Ok(true)
    }

    fn add_hsts(&self, h: &mut ResponseHeader, ctx: &Ctx) -> Result<()> {
        if ctx.tls {
            if let Some(v) = ctx.snap.as_ref().and_then(|s| s.hsts.as_ref()) {
                h.insert_header("strict-transport-security", v.clone())?;
            }
        }
        Ok(())
    }
}

impl Ctx {
    fn route(&self) -> Option<&RouteRt> {
        Some(&self.snap.as_deref()?.routes[self.route?])
    }

    /// The pools of the color serving this request.
    fn color_rt(&self) -> Option<&ColorRt> {
        Some(&self.route()?.colors[self.color.index()])
    }

    /// The pool serving this request (chosen by `upstream_peer`).
    fn pool(&self) -> Option<&PoolRt> {
        let p = self.color_rt()?.pools.get(self.pool_slot)?;
        Some(&self.snap.as_deref()?.pools[*p])
    }

    /// The region name of the pool serving this request ("" without one).
    fn region(&self) -> Option<&str> {
        let (name, _) = self.color_rt()?.regions.get(self.pool_slot)?;
        Some(name.as_str())
    }

    fn mark_failed(&mut self) {
        if let Some(b) = self.backend.filter(|b| *b < 64) {
            self.failed |= 1u64 << b;
        }
    }
}

fn request_host(req: &RequestHeader) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get("host").and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

/// The color of a request: the override header's if it names one, else by the client's
/// bucket. Also the cookie to set when the client has none yet.
fn choose_color(
    route: &RouteRt,
    req: &RequestHeader,
    client_ip: Option<IpAddr>,
    tls: bool,
) -> (Color, Option<String>) {
    if !route.has_green() {
        return (Color::Blue, None);
    }
    if let Some(c) = route
        .override_header
        .as_deref()
        .and_then(|h| sticky::override_color(&req.headers, h))
    {
        return (c, None);
    }
    let green = route.control.green_weight();
    sticky::choose(route.sticky, green, &req.headers, client_ip, tls)
}

/// A request id the client sent is kept if it is a sane token; otherwise a new one is made
/// (128 random bits in hex, written without `format!`).
///
/// The value is marked sensitive: over HTTP/2 it then goes as a never-indexed literal. An id
/// is new with every request, so HPACK indexing it would only push each one into the
/// connection's table, evicting the headers that do repeat (and cost the table's upkeep).
fn request_id(req: &RequestHeader) -> HeaderValue {
    let mut id = req
        .headers
        .get(&X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut buf = [0u8; 32];
            let r = fastrand::u128(..);
            for (i, out) in buf.iter_mut().enumerate() {
                *out = HEX[((r >> (124 - 4 * i)) & 0xf) as usize];
            }
            HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("-"))
        });
    id.set_sensitive(true);
    id
}

/// The request's `Content-Length` (0 when absent or unreadable: a streamed body is counted as
/// it arrives instead).
fn content_length(req: &RequestHeader) -> u64 {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `Upgrade: h2c` (RFC 7540's cleartext upgrade, removed by RFC 9113) is never passed on: a
/// backend that took it would speak h2 with the client past sluice (h2c smuggling). The request
/// is served as the HTTP/1.1 request it also is, as RFC 9110 allows.
fn strip_h2c_upgrade(req: &mut RequestHeader) {
    let h2c = req.headers.get_all(http::header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(b"h2c"))
    });
    if h2c {
        req.remove_header(&http::header::UPGRADE);
        req.remove_header("http2-settings");
        req.remove_header(&http::header::CONNECTION);
    }
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn as_str(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("-")
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    /// No downstream modules: pingora's default adds a response-compression module, disabled,
    /// whose context is still built for every request. sluice does not compress.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            snap: None,
            route: None,
            color: Color::Blue,
            colored: false,
            crossed: false,
            set_cookie: None,
            pool_slot: 0,
            backend: None,
            failed: 0,
            retries: 0,
            request_id: HeaderValue::from_static(""),
            host: Host::empty(),
            tls: false,
            retry_after: None,
            client_ip: None,
            order: [0; geo::MAX_POOLS],
            order_len: 0,
            order_pos: 0,
            geo_counted: false,
            body_limit: 0,
            body_seen: 0,
            trace: None,
            _inflight: Some(self.shared.lifecycle.enter()),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snap = self.shared.snapshot();
        ctx.snap = Some(snap.clone());
        if let Some(t) = &self.shared.tracing {
            ctx.trace = Some(t.start_request(session.req_header()));
        }
        // a client that stops reading (or an h2 window left at zero) is not waited for forever
        session.set_write_timeout(Some(snap.config.limits.send_timeout));
        strip_h2c_upgrade(session.req_header_mut());
        let req = session.req_header();
        ctx.request_id = request_id(req);
        ctx.host = Host::new(request_host(req));
        let digest = session.digest();
        ctx.tls = digest.is_some_and(|d| d.ssl_digest.is_some());
        let local = digest
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| s.local_addr())
            .and_then(|a| a.as_inet())
            .copied();
        let redirect = local
            .and_then(|a| snap.listener(a))
            .and_then(|l| l.redirect_https);

        if let Some(port) = redirect {
            let authority = if port == 443 {
                ctx.host.as_str().to_string()
            } else if ctx.host.as_str().contains(':') {
                format!("[{}]:{port}", ctx.host.as_str())
            } else {
                format!("{}:{port}", ctx.host.as_str())
            };
            let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let location = format!("https://{authority}{path}");
            self.respond(
                session,
                ctx,
                308,
                "redirecting to https\n",
                &[("location", location)],
            )
            .await?;
            return Ok(true);
        }

        ctx.client_ip = Self::client_ip(session).map(|peer| {
            let xff = session
                .req_header()
                .headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok());
            client_ip::resolve(peer, xff, &snap.trusted_proxies)
        });
        let path = session.req_header().uri.path();
        match snap.router.route(ctx.host.as_str(), path) {
            Some(r) => {
                ctx.route = Some(r);
                let route = &snap.routes[r];
                ctx.body_limit = route.max_body_bytes;
                if ctx.body_limit > 0 && content_length(session.req_header()) > ctx.body_limit {
                    return self.body_too_large(session, ctx).await;
                }
                if let (Some(limiter), Some(ip)) = (&route.limit, ctx.client_ip) {
                    if !client_ip::is_in(ip, &snap.exempt) {
                        if let Err(denied) = limiter.check(ip).await {
                            route.rate_limited.inc();
                            let headers = [
                                ("retry-after", denied.retry_after.to_string()),
                                ("ratelimit-policy", limiter.policy.clone()),
                                (
                                    "ratelimit",
                                    format!("\"sluice\";r=0;t={}", denied.retry_after),
                                ),
                            ];
                            self.respond(session, ctx, 429, "rate limit exceeded\n", &headers)
                                .await?;
                            return Ok(true);
                        }
                    }
                }
                (ctx.color, ctx.set_cookie) =
                    choose_color(route, session.req_header(), ctx.client_ip, ctx.tls);
                ctx.colored = true;
                Ok(false)
            }
            None => {
                self.respond(session, ctx, 404, "no route for this host and path\n", &[])
                    .await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // a chunked (or h2) body is counted as it streams; nothing is kept
        if let Some(b) = body {
            ctx.body_seen += b.len() as u64;
            if ctx.body_limit > 0 && ctx.body_seen > ctx.body_limit {
                self.shared
                    .metrics
                    .limit_hits
                    .with_label_values(&["body_bytes"])
                    .inc();
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body over max_body_bytes",
                ));
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(snap), Some(r)) = (ctx.snap.clone(), ctx.route) else {
            return Err(Error::explain(ErrorType::InternalError, "no route chosen"));
        };
        let route = &snap.routes[r];
        let clock = self.shared.health.clock();
        let mut all_down: Option<u64> = None;
        loop {
            let color = &route.colors[ctx.color.index()];
            if ctx.order_len == 0 {
                // nearest healthy data center first; without a location, the listed order (a
                // color with one pool needs no lookup)
                let place = snap
                    .geo
                    .as_ref()
                    .filter(|_| color.sites.len() > 1)
                    .zip(ctx.client_ip)
                    .and_then(|(db, ip)| db.lookup(ip));
                (ctx.order, ctx.order_len) = geo::order(&color.sites, place.as_ref());
            }
            while ctx.order_pos < ctx.order_len {
                let slot = usize::from(ctx.order[ctx.order_pos]);
                let pool = &snap.pools[color.pools[slot]];
                match pool.pick(ctx.failed, &clock) {
                    Ok(b) => {
                        ctx.pool_slot = slot;
                        ctx.backend = Some(b);
                        if snap.geo.is_some() && !ctx.geo_counted {
                            ctx.geo_counted = true;
                            color.regions[slot].1.inc();
                        }
                        if let (Some(t), Some(rt)) = (&self.shared.tracing, ctx.trace.as_mut()) {
                            let method = session.req_header().method.as_str();
                            t.start_attempt(rt, method, pool.backends[b].address);
                        }
                        return Ok(Box::new(pool.backends[b].peer.clone()));
                    }
                    Err(NoBackend::AllDown { retry_after }) => {
                        all_down = Some(all_down.map_or(retry_after, |s| s.min(retry_after)));
                    }
                    Err(NoBackend::Exhausted) => {}
                }
                // this pool cannot serve: the next nearest one (backend indexes start afresh)
                ctx.order_pos += 1;
                ctx.failed = 0;
            }
            // no pool of this color can serve: the other color's take over, once
            let other = ctx.color.other();
            if ctx.crossed || route.colors[other.index()].pools.is_empty() {
                break;
            }
            ctx.crossed = true;
            ctx.color = other;
            (ctx.order_len, ctx.order_pos, ctx.failed) = (0, 0, 0);
        }
        match all_down {
            Some(retry_after) if ctx.retries == 0 => {
                ctx.retry_after = Some(retry_after);
                Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no healthy backend",
                ))
            }
            _ => Err(Error::explain(
                ErrorType::HTTPStatus(502),
                "no backend reachable",
            )),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent, so another backend may take any request, whatever its method.
        if let Some((pool, b)) = ctx.pool().zip(ctx.backend) {
            pool.backends[b].health.connect_failed(&pool.eject);
        }
        if let Some(route) = ctx.route() {
            route.control.record(ctx.color, true);
        }
        ctx.mark_failed();
        let retry = ctx.retries < MAX_RETRIES;
        if retry {
            ctx.retries += 1;
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let upstream = e.esource() == &pingora::ErrorSource::Upstream;
        if upstream {
            if let Some((pool, b)) = ctx.pool().zip(ctx.backend) {
                pool.backends[b].health.failure(&pool.eject);
            }
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        // The connection broke before the backend answered: another backend may take the
        // request if replaying it is safe (idempotent, body still buffered, nothing answered).
        let broken = matches!(
            e.etype(),
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
        );
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        let retry = upstream && broken && replayable && ctx.retries < MAX_RETRIES;
        if retry {
            ctx.retries += 1;
            ctx.mark_failed();
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(rt) = ctx.trace.as_ref() {
            rt.attempt_status(resp.status.as_u16());
        }
        if let Some((pool, b)) = ctx.pool().zip(ctx.backend) {
            let h = &pool.backends[b].health;
            if matches!(resp.status.as_u16(), 502..=504) {
                h.failure(&pool.eject);
            } else if !resp.status.is_informational() {
                h.success();
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let xff = Self::client_ip(session).and_then(|ip| {
            let prev = upstream
                .headers
                .get(&X_FORWARDED_FOR)
                .filter(|v| v.to_str().is_ok_and(|p| !p.trim().is_empty()));
            let mut xff = Vec::with_capacity(prev.map_or(0, |p| p.len() + 2) + 39);
            if let Some(prev) = prev {
                xff.extend_from_slice(prev.as_bytes());
                xff.extend_from_slice(b", ");
            }
            crate::text::push_ip(&mut xff, ip);
            HeaderValue::from_maybe_shared(Bytes::from(xff)).ok()
        });
        // the client's Host header as it came (a shared copy), or the h2 :authority
        let req = session.req_header();
        let host = match req.headers.get(http::header::HOST) {
            Some(h) => Some(h.clone()),
            None => req
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        }
        .filter(|h| !h.is_empty());
        // room for exactly what is added here and by the trace context (`traceparent`,
        // `tracestate`): a reserve beyond that can move a map that had room into a table twice
        // its size, every entry hashed again (see response_filter)
        let tracing = usize::from(self.shared.tracing.is_some() && ctx.trace.is_some());
        let added = usize::from(xff.is_some()) + 2 * usize::from(host.is_some()) + 2 + 2 * tracing;
        // after this reserve the inserts below cannot overflow the map (they would panic)
        upstream.reserve_headers(added)?;
        // prebuilt names go in as they are (pingora-http patch 0002: no case map, no parsing)
        if let Some(xff) = xff {
            upstream.insert_header(X_FORWARDED_FOR, xff)?;
        }
        let proto = HeaderValue::from_static(if ctx.tls { "https" } else { "http" });
        upstream.insert_header(X_FORWARDED_PROTO, proto)?;
        if let Some(host) = host {
            if !upstream.headers.contains_key(http::header::HOST) {
                upstream.insert_header(http::header::HOST, host.clone())?;
            }
            upstream.insert_header(X_FORWARDED_HOST, host)?;
        }
        upstream.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        if let (Some(t), Some(rt)) = (&self.shared.tracing, ctx.trace.as_ref()) {
            t.inject(rt, upstream);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let hsts = ctx
            .snap
            .as_ref()
            .and_then(|s| s.hsts.as_ref())
            .filter(|_| ctx.tls);
        let cookie = ctx
            .set_cookie
            .take()
            .map(HeaderValue::try_from)
            .transpose()
            .explain_err(ErrorType::InvalidHTTPHeader, |_| "set-cookie")?;
        let geo = ctx.snap.as_deref().and_then(|s| s.geo_header.as_deref());
        // exactly what is added: a backend's 8-field response (nginx's) is parsed into a map
        // with room for 12, which a reserve of 6 doubled for every request
        resp.reserve_headers(
            usize::from(hsts.is_some())
                + usize::from(cookie.is_some())
                + 1
                + usize::from(geo.is_some()),
        )?;
        if let Some(v) = hsts {
            resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, v.clone())?;
        }
        if let Some(cookie) = cookie {
            resp.append_header(http::header::SET_COOKIE, cookie)?;
        }
        if !resp.headers.contains_key(&X_REQUEST_ID) {
            resp.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
        }
        // a debugging aid, off in production: the name is parsed here
        if let Some(name) = geo {
            if let Some(region) = ctx.region() {
                resp.insert_header(name.to_string(), region)?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        let (code, body) = match e.etype() {
            HTTPStatus(c) if *c == 502 => (502, "no backend reachable\n"),
            HTTPStatus(c) if *c == 503 => (503, "no healthy backend\n"),
            HTTPStatus(413) => (413, "request body too large\n"),
            HTTPStatus(c) => (*c, "error\n"),
            ConnectTimedout | ReadTimedout | WriteTimedout => (504, "backend timed out\n"),
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
            | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => {
                (502, "no backend reachable\n")
            }
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => (502, "bad gateway\n"),
                pingora::ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => (0, ""),
                    _ => (400, "bad request\n"),
                },
                _ => (500, "internal error\n"),
            },
        };
        // a chunked body whose framing the edge refused
        let framing = session
            .stream()
            .and_then(|s| s.as_any().downcast_ref::<crate::edge::chunked::Checked>())
            .and_then(|c| c.verdict.violation());
        let (code, body) = match framing {
            Some(_) => {
                let m = &self.shared.metrics;
                m.bad_requests.with_label_values(&["400"]).inc();
                (400, "bad chunked framing\n")
            }
            None => (code, body),
        };
        if code > 0 && session.response_written().is_none() {
            let retry_after: Vec<_> = ctx
                .retry_after
                .filter(|_| code == 503)
                .map(|s| ("retry-after", s.to_string()))
                .into_iter()
                .collect();
            if let Err(err) = self.respond(session, ctx, code, body, &retry_after).await {
                log::debug!("cannot send error response: {err}");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let trace = ctx.trace.take();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.elapsed();
        let route = ctx.route();
        let pool = ctx.pool();
        match route {
            Some(r) => {
                if status > 0 && ctx.colored {
                    if let Some(c) = r.colors[ctx.color.index()].requests.get(ctx.pool_slot) {
                        c[code_class(status)].inc();
                    }
                    r.control.record(ctx.color, status >= 500);
                }
                r.duration.observe(elapsed.as_secs_f64());
            }
            None if status > 0 => {
                let m = &self.shared.metrics;
                m.requests
                    .with_label_values(&[
                        "",
                        "",
                        "",
                        crate::metrics::CODE_CLASSES[code_class(status)],
                    ])
                    .inc();
            }
            None => {}
        }
        let trace_id = trace
            .as_ref()
            .filter(|_| self.shared.access_log.enabled())
            .map(|t| t.trace_id());
        if let Some(rt) = trace {
            let req = session.req_header();
            let backend = pool.zip(ctx.backend).map(|(p, b)| p.backends[b].address);
            let attrs = || {
                use opentelemetry::KeyValue;
                let mut a = vec![
                    KeyValue::new("http.request.method", req.method.as_str().to_string()),
                    KeyValue::new("url.path", req.uri.path().to_string()),
                    KeyValue::new("url.scheme", if ctx.tls { "https" } else { "http" }),
                    KeyValue::new("server.address", ctx.host.as_str().to_string()),
                    KeyValue::new(
                        "network.protocol.version",
                        if session.is_http2() { "2" } else { "1.1" },
                    ),
                    KeyValue::new("http.response.status_code", i64::from(status)),
                    KeyValue::new("sluice.retries", i64::from(ctx.retries)),
                    KeyValue::new("sluice.request_id", as_str(&ctx.request_id).to_string()),
                ];
                if let Some(ip) = ctx.client_ip {
                    a.push(KeyValue::new("client.address", ip.to_string()));
                }
                if let Some(r) = route {
                    a.push(KeyValue::new("sluice.route", r.name.clone()));
                    a.push(KeyValue::new("http.route", r.name.clone()));
                }
                if ctx.colored {
                    a.push(KeyValue::new("sluice.color", ctx.color.name()));
                }
                if let Some(p) = pool {
                    a.push(KeyValue::new("sluice.pool", p.name.clone()));
                }
                if let Some(b) = backend {
                    a.push(KeyValue::new("sluice.backend", b.to_string()));
                }
                a
            };
            rt.end(attrs, status, e.map(|e| e.etype().as_str()));
        }
        if !self.shared.access_log.enabled() {
            return;
        }
        let req = session.req_header();
        let line = access_log::Line {
            time: SystemTime::now(),
            client: ctx.client_ip,
            method: req.method.as_str(),
            host: ctx.host.as_str(),
            path: req.uri.path(),
            protocol: if session.is_http2() {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            },
            tls: ctx.tls,
            status,
            bytes: session.body_bytes_sent(),
            duration: elapsed,
            route: route.map(|r| r.name.as_str()),
            color: ctx.colored.then(|| ctx.color.name()),
            pool: pool.map(|p| p.name.as_str()),
            region: ctx
                .region()
                .filter(|n| ctx.backend.is_some() && !n.is_empty()),
            backend: pool.zip(ctx.backend).map(|(p, b)| p.backends[b].address),
            retries: ctx.retries,
            failed_backends: pool.map_or_else(Vec::new, |p| {
                (0..p.backends.len().min(64))
                    .filter(|i| ctx.failed & (1u64 << i) != 0)
                    .map(|i| p.backends[i].address)
                    .collect()
            }),
            request_id: as_str(&ctx.request_id),
            trace_id,
            error: e.map(|e| e.etype().as_str()),
        };
        self.shared.access_log.log_line(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the hooks add goes on as they name it, next to what the client sent, on heads
    /// parsed the way edge parses them (no case map) and on ones that keep case; nothing else
    /// of the head changes (pingora-http patch 0002 takes a `HeaderName` as it is).
    #[test]
    fn added_fields_keep_the_rest_of_the_head() {
        let wire = |r: &RequestHeader| {
            let mut b = bytes::BytesMut::new();
            r.header_to_h1_wire(&mut b);
            String::from_utf8(b.to_vec()).expect("utf-8")
        };
        for target in [
            &b"/a/b?c=D%2F"[..],
            b"http://Example.com/x?y",
            b"/caf\xe9",
            b"*",
        ] {
            let mut req = RequestHeader::build_no_case("GET", target, None).expect("req");
            req.append_header("X-Custom-Thing", "1").expect("hdr");
            req.append_header("x-custom-thing", "2").expect("hdr");
            req.append_header("HOST", "example.com").expect("hdr");
            req.insert_header(X_REQUEST_ID, HeaderValue::from_static("r"))
                .expect("hdr");
            req.insert_header(X_FORWARDED_HOST, HeaderValue::from_static("a"))
                .expect("hdr");
            req.insert_header(X_FORWARDED_HOST, HeaderValue::from_static("b"))
                .expect("hdr");
            assert!(!req.has_case());
            assert_eq!(
                wire(&req),
                "x-custom-thing: 1\r\nx-custom-thing: 2\r\nHost: example.com\r\n\
                 x-request-id: r\r\nx-forwarded-host: b\r\n"
            );
            assert_eq!(req.raw_path(), target);
            assert_eq!(req.method, http::Method::GET);
        }
        // a head that keeps case gets the added name in its case map too
        let mut cased = RequestHeader::build("GET", b"/", None).expect("req");
        cased.append_header("X-Custom-Thing", "1").expect("hdr");
        cased
            .insert_header(X_REQUEST_ID, HeaderValue::from_static("r"))
            .expect("hdr");
        assert_eq!(wire(&cased), "X-Custom-Thing: 1\r\nx-request-id: r\r\n");

        let mut resp = ResponseHeader::build_no_case(200, None).expect("resp");
        resp.set_reason_phrase(Some("Fine Thanks")).expect("reason");
        resp.append_header("X-Backend-Thing", "1").expect("hdr");
        resp.append_header(http::header::SET_COOKIE, HeaderValue::from_static("a=1"))
            .expect("hdr");
        resp.append_header(http::header::SET_COOKIE, HeaderValue::from_static("b=2"))
            .expect("hdr");
        assert_eq!(resp.get_reason_phrase(), Some("Fine Thanks"));
        let mut b = bytes::BytesMut::new();
        resp.header_to_h1_wire(&mut b);
        assert_eq!(
            &b[..],
            b"x-backend-thing: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        );
    }

    /// A head whose map is full refuses the reserve with an error, so the hooks answer an
    /// error instead of panicking in `insert_header` (the request-side reserve of pingora-http
    /// patch 0003).
    #[test]
    fn a_full_head_refuses_more_fields_with_an_error() {
        let mut req = RequestHeader::build_no_case("GET", b"/", None).expect("req");
        let mut n = 0u32;
        while req.append_header(format!("x-f{n}"), "v").is_ok() {
            n += 1;
            assert!(n < 40_000, "the map never filled up");
        }
        assert!(req.reserve_headers(1).is_err());
        assert!(req.reserve_headers(0).is_ok());
    }

    #[test]
    fn request_ids() {
        let mut req = RequestHeader::build("GET", b"/", None).expect("req");
        let a = request_id(&req);
        assert_eq!(a.len(), 32);
        assert!(a.is_sensitive());
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(a, request_id(&req));
        req.insert_header("x-request-id", "abc-123").expect("hdr");
        assert_eq!(request_id(&req), "abc-123");
        assert!(request_id(&req).is_sensitive());
        req.insert_header("x-request-id", "has space").expect("hdr");
        assert_ne!(request_id(&req), "has space");
    }
}
