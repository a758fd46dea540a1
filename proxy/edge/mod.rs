//! The edge: everything between an accepted TCP connection and pingora's HTTP proxy, built to
//! survive hostile clients at a cost an idle connection can afford.
//!
//! Every listener is a plain TCP endpoint in pingora; this app does the rest per connection:
//! 1. the PROXY protocol header (when `client_ip.proxy_protocol`);
//! 2. the connection limits of `[limits]` (process and per client address): past them the
//!    connection is closed at once, before TLS, and counted;
//! 3. the TLS handshake (rustls; TLS 1.3 only when `tls.min_version = "1.3"`), bounded by
//!    `header_timeout`;
//! 4. HTTP/2 (ALPN h2, or the h2c preface on a plain listener with `http2`) goes to pingora's
//!    h2 server behind a frame watch (`h2.rs`); HTTP/1.x stays here: each request head is read
//!    whole by this loop, within `header_timeout` from its first byte (from accept for the
//!    first request) and `max_header_bytes`, checked strictly (`http1.rs`), and only then
//!    handed to pingora; between requests the connection waits at most `keepalive_timeout`
//!    holding nothing but its socket, and after `keepalive_requests` it is closed gracefully.

/// Implements pingora's transport traits for a wrapper (a struct with an `inner: Stream`) by
/// handing every call to `inner`.
macro_rules! delegate_io {
    ($t:ty) => {
        #[async_trait::async_trait]
        impl pingora::protocols::Shutdown for $t {
            async fn shutdown(&mut self) {
                pingora::protocols::Shutdown::shutdown(&mut *self.inner).await
            }
        }
        impl pingora::protocols::UniqueID for $t {
            fn id(&self) -> pingora::protocols::UniqueIDType {
                self.inner.id()
            }
        }
        impl pingora::protocols::Ssl for $t {
            fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
                self.inner.get_ssl()
            }
            fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
                self.inner.get_ssl_digest()
            }
            fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
                self.inner.selected_alpn_proto()
            }
        }
        impl pingora::protocols::GetTimingDigest for $t {
            fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
                self.inner.get_timing_digest()
            }
            fn get_read_pending_time(&self) -> std::time::Duration {
                self.inner.get_read_pending_time()
            }
            fn get_write_pending_time(&self) -> std::time::Duration {
                self.inner.get_write_pending_time()
            }
        }
        impl pingora::protocols::GetProxyDigest for $t {
            fn get_proxy_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
                self.inner.get_proxy_digest()
            }
            fn set_proxy_digest(&mut self, d: pingora::protocols::raw_connect::ProxyDigest) {
                self.inner.set_proxy_digest(d)
            }
        }
        impl pingora::protocols::GetSocketDigest for $t {
            fn get_socket_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::SocketDigest>> {
                self.inner.get_socket_digest()
            }
            fn set_socket_digest(&mut self, d: pingora::protocols::SocketDigest) {
                self.inner.set_socket_digest(d)
            }
        }
        #[async_trait::async_trait]
        impl pingora::protocols::Peek for $t {}
    };
}

pub mod chunked;
pub mod conns;
pub mod h2;
pub mod http1;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, HttpServerOptions, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::v2::server::default_h2_options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream, UniqueID, ALPN};
use pingora::proxy::{http_proxy, HttpProxy};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::{Limits, Listener};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::snapshot::find_listener;
use crate::state::Shared;
use conns::{Conns, Refusal};

/// A request head is read into a buffer of this size first (grown up to `max_header_bytes`):
/// small, at the price of a second read for heads longer than this. A busy connection holds it
/// while it waits for its next request; a quiet one gives it back (see [`QUIET`]).
const HEAD_BUF: usize = 2048;

/// How long a client connection may be quiet between its requests and still hold what serves
/// its next request fastest:
/// - the upstream connection its last request used (pingora patch 0004, `connectors::bound`):
///   a busy connection's next request to the same backend takes it back without the shared
///   pool's idle watch, lock and `getpeername`; a quiet one gives it to the shared pool, so idle
///   clients hold none;
/// - its head buffer ([`HEAD_BUF`]): a busy connection reads its next head straight into it; a
///   quiet one frees it and waits for one byte without it (one more read when it wakes up), so
///   an idle keep-alive connection holds no buffer;
/// - no watch for a shutdown: a busy connection's next request is answered with
///   `connection: close` once the shutdown began; a quiet one is closed at once.
const QUIET: Duration = Duration::from_millis(20);

/// One listener's runtime handles.
struct ListenerRt {
    listen: SocketAddr,
    tls: bool,
    http2: bool,
    open: IntGauge,
    refused: [IntCounter; 2],
}

/// The limit counters (`sluice_limit_hits_total{limit}`).
#[derive(Clone)]
pub struct Hits {
    pub header_timeout: IntCounter,
    pub keepalive_timeout: IntCounter,
    pub header_bytes: IntCounter,
    pub h2: IntCounter,
}

impl Hits {
    pub fn new(m: &Metrics) -> Hits {
        let c = |l: &str| m.limit_hits.with_label_values(&[l]);
        // body_bytes is counted by the gateway; exported from the start like the others
        c("body_bytes");
        // the statuses a refused request head gets, exported from the start (0) so that
        // dashboards see the series
        for status in ["400", "408", "413", "431"] {
            m.bad_requests.with_label_values(&[status]);
        }
        Hits {
            header_timeout: c("header_timeout"),
            keepalive_timeout: c("keepalive_timeout"),
            header_bytes: c("header_bytes"),
            h2: c("h2"),
        }
    }
}

/// The h2 settings a proxy instance was built with.
#[derive(Clone, Copy, PartialEq)]
struct H2Key {
    streams: u32,
    header_bytes: usize,
    idle: Duration,
}

impl H2Key {
    fn of(l: &Limits) -> H2Key {
        H2Key {
            streams: l.h2_max_concurrent_streams,
            header_bytes: l.max_header_bytes,
            idle: l.keepalive_timeout,
        }
    }
}

/// The TLS acceptors: with and without h2 in ALPN, with TLS 1.2 allowed or not.
struct Acceptors {
    /// [http2][tls13 only]
    by: [[Acceptor; 2]; 2],
}

pub struct Edge {
    shared: Arc<Shared>,
    conf: Arc<ServerConf>,
    /// The proxy serving requests, rebuilt (for new connections) when its h2 settings change.
    proxy: ArcSwap<(H2Key, Arc<HttpProxy<Gateway>>)>,
    rebuild: Mutex<()>,
    listeners: Vec<ListenerRt>,
    acceptors: Option<Acceptors>,
    conns: Conns,
    hits: Hits,
    bad_requests: prometheus::IntCounterVec,
}

fn build_proxy(
    conf: &Arc<ServerConf>,
    shared: &Arc<Shared>,
    l: &Limits,
) -> Arc<HttpProxy<Gateway>> {
    let mut proxy = http_proxy(
        conf,
        Gateway {
            shared: shared.clone(),
        },
    );
    let mut opts = HttpServerOptions::default();
    // only connections known to be h2 reach the proxy's own connection handling
    opts.h2c = true;
    opts.h2_idle_timeout = Some(l.keepalive_timeout);
    // h2 gets each response head itself, not a copy: `gateway` reads only the status of what
    // was written (pingora-core patch 0009)
    opts.h2_hand_over_response_header = true;
    proxy.server_options = Some(opts);
    let mut h2 = default_h2_options();
    h2.max_concurrent_streams(l.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX));
    proxy.h2_options = Some(h2);
    Arc::new(proxy)
}

impl Edge {
    pub fn new(
        shared: Arc<Shared>,
        conf: Arc<ServerConf>,
        listeners: &[Listener],
    ) -> Result<Edge, String> {
        let snap = shared.snapshot();
        let limits = snap.config.limits;
        let m = &shared.metrics;
        let listeners = listeners
            .iter()
            .map(|l| {
                let label = l.listen.to_string();
                ListenerRt {
                    listen: l.listen,
                    tls: l.tls,
                    http2: l.http2,
                    open: m.downstream_connections.with_label_values(&[&label]),
                    refused: [Refusal::MaxConnections, Refusal::PerIp].map(|r| {
                        m.connections_refused
                            .with_label_values(&[&label, r.label()])
                    }),
                }
            })
            .collect::<Vec<_>>();
        let acceptors = if listeners.iter().any(|l| l.tls) {
            let make = |h2: bool, only13: bool| {
                let s = shared.clone();
                crate::tls::acceptor(h2, only13, move || s.snapshot().certs.clone())
            };
            Some(Acceptors {
                by: [
                    [make(false, false)?, make(false, true)?],
                    [make(true, false)?, make(true, true)?],
                ],
            })
        } else {
            None
        };
        let proxy = build_proxy(&conf, &shared, &limits);
        Ok(Edge {
            hits: Hits::new(m),
            bad_requests: m.bad_requests.clone(),
            shared: shared.clone(),
            conf,
            proxy: ArcSwap::from_pointee((H2Key::of(&limits), proxy)),
            rebuild: Mutex::new(()),
            listeners,
            acceptors,
            conns: shared.conns.clone(),
        })
    }

    /// The proxy for settings `l`; rebuilt when its h2 settings changed since.
    fn proxy(&self, l: &Limits) -> Arc<HttpProxy<Gateway>> {
        let key = H2Key::of(l);
        let cur = self.proxy.load();
        if cur.0 == key {
            return cur.1.clone();
        }
        let _one = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.proxy.load();
        if cur.0 == key {
            return cur.1.clone();
        }
        let p = build_proxy(&self.conf, &self.shared, l);
        self.proxy.store(Arc::new((key, p.clone())));
        p
    }
}

struct Open(IntGauge);
impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads the PROXY header of a new connection and makes its source the connection's peer
/// address. `false`: no valid header, the connection must be closed.
pub async fn accept_proxy_header<S>(stream: &mut S) -> bool
where
    S: tokio::io::AsyncRead + Unpin + GetSocketDigest + UniqueID + ?Sized,
{
    match crate::proxy_protocol::read_header(stream).await {
        Ok(Some(addr)) => {
            let digest = SocketDigest::from_raw_fd(stream.id());
            let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(addr)));
            stream.set_socket_digest(digest);
            true
        }
        Ok(None) => true,
        Err(e) => {
            log::debug!("closing connection: {e}");
            false
        }
    }
}

fn peer_ip<S: GetSocketDigest + ?Sized>(s: &S) -> Option<IpAddr> {
    s.get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
}

/// How waiting for a request head ended.
enum HeadWait {
    /// A complete head (and whatever followed it in the same reads).
    Ready(BytesMut),
    /// The connection closed, went idle too long, or the server is shutting down: close quietly.
    Close,
    /// Answer this and close.
    Refuse(u16, &'static str),
}

/// Waits for the next request head: at most `idle` for its first byte, then until `deadline`
/// (if given, else `header_timeout` from the first byte) for the rest, at most `max` bytes.
/// While it waits, the connection holds its socket and this small future, and for the first
/// [`QUIET`] the read buffer (`HEAD_BUF`).
async fn read_head(
    stream: &mut Stream,
    idle_until: Instant,
    first_deadline: Option<Instant>,
    limits: &Limits,
    hits: &Hits,
    shutdown: &mut ShutdownWatch,
) -> HeadWait {
    let mut buf = BytesMut::with_capacity(HEAD_BUF);
    // the first bytes, or the end of the idle time; a shutdown is watched for only once the
    // connection is quiet: a busy one's next request comes sooner (and is told to close, see
    // `serve_h1`), and the watch is a waiter pushed and popped under a lock per request
    let first = match read_busy(stream, &mut buf, idle_until).await {
        Some(r) => r,
        None => tokio::select! {
            biased;
            r = read_quiet(stream, &mut buf, idle_until) => r,
            _ = shutdown.changed() => return HeadWait::Close,
        },
    };
    match first {
        Ok(Ok(n)) if n > 0 => {}
        Ok(_) => return HeadWait::Close,
        Err(_) => {
            if first_deadline.is_some() {
                hits.header_timeout.inc();
            } else {
                hits.keepalive_timeout.inc();
            }
            return HeadWait::Close;
        }
    }
    let deadline = first_deadline.unwrap_or_else(|| Instant::now() + limits.header_timeout);
    let mut scanned = 0;
    loop {
        // empty lines before a request line are ignored (RFC 9112 §2.2)
        let skip = http1::leading_empty_lines(&buf);
        if skip > 0 {
            let _ = buf.split_to(skip);
            scanned = 0;
        }
        if let Some(end) = http1::head_end(&buf, scanned) {
            if end > limits.max_header_bytes {
                hits.header_bytes.inc();
                return HeadWait::Refuse(431, "request header fields too large");
            }
            return HeadWait::Ready(buf);
        }
        scanned = buf.len();
        if buf.len() > limits.max_header_bytes {
            hits.header_bytes.inc();
            return HeadWait::Refuse(431, "request header fields too large");
        }
        if buf.capacity() == buf.len() {
            buf.reserve(
                buf.len()
                    .min(limits.max_header_bytes + 1 - buf.len())
                    .max(1024),
            );
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return HeadWait::Close,
            Err(_) => {
                hits.header_timeout.inc();
                return HeadWait::Refuse(408, "the request head did not arrive in time");
            }
        }
    }
}

/// What [`read_busy`] and [`read_quiet`] read: the bytes read, or the idle time over.
type FirstRead = Result<std::io::Result<usize>, tokio::time::error::Elapsed>;

/// The first bytes of the next request head into `buf`, if they come within [`QUIET`] (and
/// before `idle_until`); `None` once the client has been quiet that long, after the upstream
/// connection this task kept (if any) went to the shared pool. (Reading is cancel-safe: a read
/// cut off by the timer took no bytes.)
async fn read_busy(
    stream: &mut Stream,
    buf: &mut BytesMut,
    idle_until: Instant,
) -> Option<FirstRead> {
    let quiet = Instant::now() + QUIET;
    if quiet >= idle_until {
        return None;
    }
    match tokio::time::timeout_at(quiet, stream.read_buf(buf)).await {
        Err(_) => {
            pingora::connectors::bound::release();
            None
        }
        read => Some(read),
    }
}

/// The first bytes of the next request head of a quiet client, by `idle_until`: `buf` is freed
/// until the next byte comes.
async fn read_quiet(stream: &mut Stream, buf: &mut BytesMut, idle_until: Instant) -> FirstRead {
    *buf = BytesMut::new();
    let mut first = [0u8; 1];
    let read = tokio::time::timeout_at(idle_until, stream.read(&mut first)).await?;
    if let Ok(1) = read {
        buf.reserve(HEAD_BUF);
        buf.extend_from_slice(&first);
    }
    Ok(read)
}

/// Writes a short error answer and closes (used before pingora has seen the request).
async fn refuse(stream: &mut Stream, status: u16, reason: &str) {
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = format!("{reason}\n");
    let head = format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.flush().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

impl Edge {
    /// Serves an HTTP/1.x connection, request after request.
    async fn serve_h1(
        self: &Arc<Self>,
        stream: Stream,
        accepted: Instant,
        listener: &ListenerRt,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut shutdown = shutdown.clone();
        let mut conn = Box::new(chunked::Checked::new(stream));
        let mut served: u32 = 0;
        loop {
            let limits = self.shared.snapshot().config.limits;
            let (idle_until, first_deadline) = if served == 0 {
                let d = accepted + limits.header_timeout;
                (d, Some(d))
            } else {
                (Instant::now() + limits.keepalive_timeout, None)
            };
            let head = match read_head(
                conn.inner_mut(),
                idle_until,
                first_deadline,
                &limits,
                &self.hits,
                &mut shutdown,
            )
            .await
            {
                HeadWait::Ready(h) => h,
                HeadWait::Close => return None,
                HeadWait::Refuse(status, why) => {
                    self.refuse(conn.inner_mut(), status, why).await;
                    return None;
                }
            };
            if served == 0 && listener.http2 && !listener.tls && head.starts_with(&h2::PREFACE[..])
            {
                let stream: Stream = conn;
                return self
                    .serve_h2_prior_knowledge(stream, head, accepted, shutdown)
                    .await;
            }
            let end = http1::head_end(&head, 0).unwrap_or(head.len());
            let framing = match http1::check(&head[..end]) {
                Err(r) => {
                    log::debug!("refused a request head: {}", r.reason);
                    self.refuse(conn.inner_mut(), r.status, r.reason).await;
                    return None;
                }
                Ok(h) if h.chunked => {
                    let mut f = chunked::Framing::default();
                    if let Err(why) = f.feed(&head[end..]) {
                        self.refuse(conn.inner_mut(), 400, why).await;
                        return None;
                    }
                    Some(f)
                }
                Ok(_) => None,
            };
            conn.expect(framing);
            served += 1;
            let mut session = ServerSession::new_http1(conn);
            session.set_pipelined_prefix(head);
            // header names go on lower-case (see `gateway`): pingora need not keep their case
            session.set_keep_header_case(false);
            // pingora decides keep-alive from the request's own headers; this loop keeps the
            // idle time, and the last allowed request is told to close
            let last = served >= limits.keepalive_requests || *shutdown.borrow();
            if last {
                session.set_keepalive_reuses_remaining(Some(0));
            }
            session.set_write_timeout(Some(limits.send_timeout));
            let proxy = self.proxy(&limits);
            let reused = proxy.process_new_http(session, &shutdown).await?;
            if served == 1 {
                // a connection keeps its upstream connection from its second request on: one
                // that makes a single request and then idles or closes would only hold it back
                // from the shared pool (a burst of such clients opened twice the connections)
                pingora::connectors::bound::release();
            }
            conn = reused.consume().0.into_any().downcast().ok()?;
            if last {
                return None;
            }
        }
    }

    async fn refuse(&self, stream: &mut Stream, status: u16, why: &str) {
        self.bad_requests
            .with_label_values(&[&status.to_string()])
            .inc();
        refuse(stream, status, why).await
    }

    /// h2c with prior knowledge: the bytes read so far go back in front of the stream.
    async fn serve_h2_prior_knowledge(
        self: &Arc<Self>,
        stream: Stream,
        read: BytesMut,
        accepted: Instant,
        shutdown: ShutdownWatch,
    ) -> Option<Stream> {
        // the first layer is the chunk check, the one under it the TCP stream
        let checked = stream.into_any().downcast::<chunked::Checked>().ok()?;
        let mut l4 = checked.inner.into_any().downcast::<L4Stream>().ok()?;
        l4.rewind(&read);
        self.serve_h2(l4, accepted, &shutdown).await
    }

    /// Serves an h2 connection with pingora's h2 server behind the frame watch.
    async fn serve_h2(
        self: &Arc<Self>,
        stream: Stream,
        accepted: Instant,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let limits = self.shared.snapshot().config.limits;
        let watched = h2::Watched::new(
            stream,
            limits.header_timeout,
            accepted + limits.header_timeout,
            h2::Counters {
                h2: self.hits.h2.clone(),
                header_timeout: self.hits.header_timeout.clone(),
                header_bytes: self.hits.header_bytes.clone(),
            },
        );
        let proxy = self.proxy(&limits);
        ServerApp::process_new(&proxy, Box::new(watched), shutdown).await
    }
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        // every endpoint is plain TCP in pingora: TLS happens here
        let mut l4 = *stream.into_any().downcast::<L4Stream>().ok()?;
        let local = l4
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())?;
        let listener = find_listener(&self.listeners, local, |l| l.listen)?;
        let (limits, proxy_protocol, v6_prefix, tls13) = {
            let snap = self.shared.snapshot();
            (
                snap.config.limits,
                snap.config.client_ip.proxy_protocol,
                snap.config
                    .rate_limit
                    .as_ref()
                    .map_or(64, |r| r.ipv6_prefix),
                snap.certs.requires_tls13(),
            )
        };
        let deadline = accepted + limits.header_timeout;
        if proxy_protocol {
            let ok = tokio::time::timeout_at(deadline, accept_proxy_header(&mut l4)).await;
            if !matches!(ok, Ok(true)) {
                return None;
            }
        }
        let _conn = match self.conns.acquire(
            peer_ip(&l4),
            v6_prefix,
            limits.max_connections,
            limits.max_connections_per_ip,
        ) {
            Ok(g) => g,
            Err(r) => {
                listener.refused[r as usize].inc();
                return None;
            }
        };
        listener.open.inc();
        let open = Open(listener.open.clone());
        let stream: Stream = if listener.tls {
            let acceptor =
                &self.acceptors.as_ref()?.by[usize::from(listener.http2)][usize::from(tls13)];
            // boxed: the handshake's state (rustls' in-flight connection) is large and needed
            // only now; inline it would stay in this connection's future for its whole life
            let handshake = Box::pin(acceptor.tls_handshake(l4));
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    log::debug!("TLS handshake failed: {e}");
                    return None;
                }
                Err(_) => {
                    self.hits.header_timeout.inc();
                    return None;
                }
            }
        } else {
            Box::new(l4)
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return Box::pin(self.serve_h2(stream, accepted, shutdown)).await;
        }
        // the upstream connection of a busy client connection stays with it between its
        // requests (see QUIET); when it ends it goes to the shared pool, before
        // the connection stops counting as open
        let done =
            pingora::connectors::bound::scope(self.serve_h1(stream, accepted, listener, shutdown))
                .await;
        drop(open);
        done
    }

    async fn cleanup(&self) {
        self.proxy.load().1.http_cleanup().await
    }
}
