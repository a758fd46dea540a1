//! A watch on HTTP/2 connections, between the transport and pingora's h2 server (the `h2`
//! crate). It reads the frame headers going by in both directions (nothing is copied or
//! changed) and cuts the connection when the client abuses the protocol in ways the `h2`
//! crate answers too politely:
//! - the preface and first SETTINGS, and every header block (HEADERS up to the frame with
//!   END_HEADERS), must arrive within `header_timeout`, however slowly the bytes trickle;
//! - control-frame floods: more than `MAX_PINGS` PINGs, `MAX_SETTINGS` SETTINGS, `MAX_EMPTY`
//!   empty DATA frames or `MAX_PRIORITY` PRIORITY frames in a `WINDOW`;
//! - rapid reset (CVE-2023-44487): once a client has reset `RESET_FLOOR` streams, resetting
//!   more than half of the streams it opened;
//! - CONTINUATION floods (CVE-2024-27316 family): more than `MAX_CONTINUATIONS` CONTINUATION
//!   frames in one header block.
//!
//! What the `h2` crate itself refuses (too many concurrent streams, oversized header lists,
//! flow-control and framing errors) is seen on the way out: each RST_STREAM or GOAWAY with an
//! error code counts as a limit hit too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::Stream;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Flood counters start afresh every `WINDOW`.
pub const WINDOW: Duration = Duration::from_secs(10);
pub const MAX_PINGS: u32 = 500;
pub const MAX_SETTINGS: u32 = 100;
pub const MAX_EMPTY: u32 = 500;
pub const MAX_PRIORITY: u32 = 1000;
pub const RESET_FLOOR: u32 = 100;
pub const MAX_CONTINUATIONS: u32 = 64;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

/// How much of each payload the scanner keeps: a SETTINGS frame of 8 settings, the error code
/// of RST_STREAM and GOAWAY.
pub const CAPTURE: usize = 48;

/// Something the scanner saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A frame header, complete.
    Start(FrameHeader),
    /// The end of a frame's payload, with its first bytes (up to `CAPTURE`) and their count.
    End(FrameHeader, [u8; CAPTURE], u8),
}

/// Follows the frame boundaries of one direction of an h2 byte stream.
#[derive(Debug)]
pub struct Scanner {
    /// Bytes still to pass before the next frame header (a preface).
    skip: usize,
    hdr: [u8; 9],
    hdr_len: usize,
    cur: Option<FrameHeader>,
    left: u32,
    cap: [u8; CAPTURE],
    cap_len: u8,
}

impl Scanner {
    pub fn new(skip: usize) -> Scanner {
        Scanner {
            skip,
            hdr: [0; 9],
            hdr_len: 0,
            cur: None,
            left: 0,
            cap: [0; CAPTURE],
            cap_len: 0,
        }
    }

    /// Between frames: nothing of a frame has gone by partially.
    pub fn at_boundary(&self) -> bool {
        self.skip == 0 && self.hdr_len == 0 && self.cur.is_none()
    }

    pub fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(Event)) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            match self.cur {
                None => {
                    let n = (9 - self.hdr_len).min(data.len());
                    self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&data[..n]);
                    self.hdr_len += n;
                    data = &data[n..];
                    if self.hdr_len == 9 {
                        let h = &self.hdr;
                        let f = FrameHeader {
                            len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
                            kind: h[3],
                            flags: h[4],
                            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                        };
                        self.hdr_len = 0;
                        self.left = f.len;
                        self.cap = [0; CAPTURE];
                        self.cap_len = 0;
                        on(Event::Start(f));
                        if f.len == 0 {
                            on(Event::End(f, self.cap, 0));
                        } else {
                            self.cur = Some(f);
                        }
                    }
                }
                Some(f) => {
                    let n = (self.left as usize).min(data.len());
                    let keep = (CAPTURE - usize::from(self.cap_len)).min(n);
                    let at = usize::from(self.cap_len);
                    self.cap[at..at + keep].copy_from_slice(&data[..keep]);
                    self.cap_len += keep as u8;
                    self.left -= n as u32;
                    data = &data[n..];
                    if self.left == 0 {
                        self.cur = None;
                        on(Event::End(f, self.cap, self.cap_len));
                    }
                }
            }
        }
    }
}

/// What the watch counts (its metrics).
#[derive(Clone)]
pub struct Counters {
    /// `sluice_limit_hits_total{limit="h2"}`
    pub h2: IntCounter,
    /// `sluice_limit_hits_total{limit="header_timeout"}`
    pub header_timeout: IntCounter,
    /// `sluice_limit_hits_total{limit="header_bytes"}`
    pub header_bytes: IntCounter,
}

/// Whether an outgoing HEADERS block starts with `:status: 431`, as the h2 crate sends it when a
/// request's header list is over `max_header_list_size` (a literal of the static `:status`
/// name, Huffman-coded or not). A later 431 on the same connection may come as an index into
/// the encoder's dynamic table instead, and is then not seen.
fn is_431(block: &[u8]) -> bool {
    matches!(
        block,
        [0x48 | 0x08 | 0x18, 0x83, 0x69, 0x90, 0xff, ..]
            | [0x48 | 0x08 | 0x18, 0x03, b'4', b'3', b'1', ..]
    )
}

/// The client's behaviour so far.
#[derive(Debug, Default)]
struct Inbound {
    window_start: Option<Instant>,
    pings: u32,
    settings: u32,
    empty: u32,
    priority: u32,
    streams: u32,
    resets: u32,
    continuations: u32,
    /// A header block is open (or the preface and first SETTINGS have not arrived).
    in_header: bool,
    violation: Option<&'static str>,
    /// The highest stream the client opened (for a GOAWAY of ours).
    last_stream: u32,
    /// A framing error the `h2` crate would report with a less precise code: the code RFC 9113
    /// asks for, which this watch sends itself.
    frame_error: Option<(u32, &'static str)>,
}

const FRAME_SIZE_ERROR: u32 = 0x6;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const WINDOW_UPDATE: u8 = 0x8;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// RFC 9113 §4.2/§6: frames whose payload has a fixed size (or a multiple of one), checked
/// from the header alone.
fn frame_size_error(f: &FrameHeader) -> Option<&'static str> {
    match f.kind {
        PING if f.len != 8 => Some("PING frame of the wrong size"),
        SETTINGS if f.flags & ACK != 0 && f.len != 0 => Some("SETTINGS ACK with a payload"),
        SETTINGS if !f.len.is_multiple_of(6) => Some("SETTINGS frame of the wrong size"),
        RST_STREAM if f.len != 4 => Some("RST_STREAM frame of the wrong size"),
        WINDOW_UPDATE if f.len != 4 => Some("WINDOW_UPDATE frame of the wrong size"),
        PRIORITY if f.len != 5 => Some("PRIORITY frame of the wrong size"),
        GOAWAY if f.len < 8 => Some("GOAWAY frame too short"),
        _ => None,
    }
}

impl Inbound {
    fn see(&mut self, e: Event, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= WINDOW {
            self.window_start = Some(now);
            self.pings = 0;
            self.settings = 0;
            self.empty = 0;
            self.priority = 0;
        }
        if let Event::Start(f) = e {
            if let Some(why) = frame_size_error(&f) {
                self.frame_error = self.frame_error.or(Some((FRAME_SIZE_ERROR, why)));
            }
        }
        if let Event::End(f, cap, len) = e {
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                let entries = &cap[..usize::from(len).min(CAPTURE / 6 * 6)];
                for s in entries.chunks_exact(6) {
                    let id = u16::from_be_bytes([s[0], s[1]]);
                    let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    if id == SETTINGS_INITIAL_WINDOW_SIZE && v > 0x7fff_ffff {
                        self.frame_error = self.frame_error.or(Some((
                            FLOW_CONTROL_ERROR,
                            "initial window size over 2^31-1",
                        )));
                    }
                }
            }
        }
        match e {
            Event::Start(f) => match f.kind {
                PING if f.flags & ACK == 0 => self.pings += 1,
                SETTINGS if f.flags & ACK == 0 => {
                    self.settings += 1;
                }
                DATA if f.len == 0 && f.flags & END_STREAM == 0 => self.empty += 1,
                PRIORITY => self.priority += 1,
                RST_STREAM => self.resets += 1,
                HEADERS => {
                    self.last_stream = self.last_stream.max(f.stream);
                    self.streams += 1;
                    self.continuations = 0;
                    self.in_header = true;
                }
                CONTINUATION => self.continuations += 1,
                _ => {}
            },
            Event::End(f, _, _) => {
                if matches!(f.kind, HEADERS | CONTINUATION) && f.flags & END_HEADERS != 0 {
                    self.in_header = false;
                }
                // the first SETTINGS frame completes the connection preface
                if f.kind == SETTINGS && self.settings == 1 && self.streams == 0 {
                    self.in_header = false;
                }
            }
        }
        self.violation = self.violation.or(if self.pings > MAX_PINGS {
            Some("PING flood")
        } else if self.settings > MAX_SETTINGS {
            Some("SETTINGS flood")
        } else if self.empty > MAX_EMPTY {
            Some("empty DATA frame flood")
        } else if self.priority > MAX_PRIORITY {
            Some("PRIORITY flood")
        } else if self.resets > RESET_FLOOR && self.resets * 2 > self.streams {
            Some("rapid reset")
        } else if self.continuations > MAX_CONTINUATIONS {
            Some("CONTINUATION flood")
        } else {
            None
        });
    }
}

/// An h2 connection's transport, watched.
pub struct Watched {
    inner: Stream,
    read: Scanner,
    write: Scanner,
    client: Inbound,
    header_timeout: Duration,
    /// Armed while the preface or a header block is incomplete.
    deadline: Option<Pin<Box<Sleep>>>,
    counters: Counters,
    cut: bool,
    /// A GOAWAY of this watch's being written (bytes, how many went out).
    goaway: Option<(Vec<u8>, usize)>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Watched {
    /// Watches `inner`, whose next bytes are the client preface. The preface and the first
    /// SETTINGS must be complete by `preface_deadline`.
    pub fn new(
        inner: Stream,
        header_timeout: Duration,
        preface_deadline: Instant,
        counters: Counters,
    ) -> Watched {
        Watched {
            inner,
            read: Scanner::new(PREFACE.len()),
            write: Scanner::new(0),
            client: Inbound {
                in_header: true,
                ..Inbound::default()
            },
            header_timeout,
            deadline: Some(Box::pin(tokio::time::sleep_until(preface_deadline))),
            counters,
            cut: false,
            goaway: None,
        }
    }

    /// Writes the pending GOAWAY (if any) and flushes; `Ready` once done or failed.
    fn drive_goaway(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some((bytes, written)) = self.goaway.as_mut() else {
            return Poll::Ready(());
        };
        while *written < bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(n)) if n > 0 => *written += n,
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx).map(|_| ())
    }

    fn cut(&mut self, why: &str) -> io::Error {
        if !self.cut {
            self.cut = true;
            log::debug!("h2 connection cut: {why}");
        }
        io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string())
    }
}

fn error_code(cap: &[u8; CAPTURE], len: u8, at: usize) -> Option<u32> {
    (usize::from(len) >= at + 4)
        .then(|| u32::from_be_bytes([cap[at], cap[at + 1], cap[at + 2], cap[at + 3]]))
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.cut {
            return Poll::Ready(Err(this.cut("cut")));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        this.counters.header_timeout.inc();
                        return Poll::Ready(Err(this.cut("header timeout")));
                    }
                }
                return Poll::Pending;
            }
        }
        let now = Instant::now();
        let (client, read) = (&mut this.client, &mut this.read);
        let was_in_header = client.in_header;
        read.feed(&buf.filled()[before..], &mut |e| client.see(e, now));
        if let Some(why) = client.violation {
            this.counters.h2.inc();
            return Poll::Ready(Err(this.cut(why)));
        }
        if let Some((code, why)) = client.frame_error {
            // the bytes just read never reach the h2 server; the GOAWAY goes out between two
            // of its frames, or not at all
            this.counters.h2.inc();
            if this.write.at_boundary() && this.goaway.is_none() {
                let mut payload = client.last_stream.to_be_bytes().to_vec();
                payload.extend(code.to_be_bytes());
                let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
                f.extend([GOAWAY, 0, 0, 0, 0, 0]);
                f.extend(payload);
                this.goaway = Some((f, 0));
            }
            if this.drive_goaway(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(Err(this.cut(why)));
        }
        match (was_in_header, client.in_header) {
            (_, false) => this.deadline = None,
            (false, true) => {
                this.deadline = Some(Box::pin(tokio::time::sleep_until(
                    now + this.header_timeout,
                )))
            }
            (true, true) => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.goaway.is_some() {
            // the connection ends with this watch's GOAWAY: nothing of h2's follows it
            return match this.drive_goaway(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => Poll::Ready(Err(this.cut("cut"))),
            };
        }
        let n = match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let (counter, oversize) = (&this.counters.h2, &this.counters.header_bytes);
        this.write.feed(&buf[..n], &mut |e| {
            // the h2 crate refused something of the client's: a stream or the connection
            if let Event::End(f, cap, len) = e {
                if f.kind == HEADERS && is_431(&cap[..usize::from(len)]) {
                    oversize.inc();
                }
                let code = match f.kind {
                    RST_STREAM => error_code(&cap, len, 0),
                    GOAWAY => error_code(&cap, len, 4),
                    _ => None,
                };
                // NO_ERROR (0) and CANCEL (8, a stream the server gave up) are not refusals
                if code.is_some_and(|c| c != 0 && c != 8) {
                    counter.inc();
                }
            }
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

delegate_io!(Watched);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut v = len.to_be_bytes()[1..].to_vec();
        v.extend([kind, flags]);
        v.extend(stream.to_be_bytes());
        v.extend(payload);
        v
    }

    #[test]
    fn scanner_follows_frames_across_any_split() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(frame(HEADERS, 0, 1, &[1, 2, 3]));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &[]));
        bytes.extend(frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
        let whole = {
            let mut s = Scanner::new(PREFACE.len());
            let mut ev = Vec::new();
            s.feed(&bytes, &mut |e| ev.push(e));
            ev
        };
        assert_eq!(whole.len(), 8);
        assert_eq!(
            whole[7],
            Event::End(
                FrameHeader {
                    len: 4,
                    kind: RST_STREAM,
                    flags: 0,
                    stream: 1
                },
                {
                    let mut c = [0; CAPTURE];
                    c[3] = 8;
                    c
                },
                4
            )
        );
        for step in 1..10 {
            let mut s = Scanner::new(PREFACE.len());
            let mut ev = Vec::new();
            for chunk in bytes.chunks(step) {
                s.feed(chunk, &mut |e| ev.push(e));
            }
            assert_eq!(ev, whole, "chunks of {step}");
        }
    }

    #[test]
    fn floods_are_named() {
        let now = Instant::now();
        let h = |kind, flags, len| {
            Event::Start(FrameHeader {
                len,
                kind,
                flags,
                stream: 1,
            })
        };
        let mut c = Inbound::default();
        for _ in 0..=MAX_PINGS {
            c.see(h(PING, 0, 8), now);
        }
        assert_eq!(c.violation, Some("PING flood"));
        // acks and a new window do not count
        let mut c = Inbound::default();
        for i in 0..3 * MAX_PINGS {
            c.see(h(PING, ACK, 8), now);
            c.see(h(PING, 0, 8), now + WINDOW * (i / MAX_PINGS));
        }
        assert_eq!(c.violation, None);
        // resets: fine while most streams complete, a flood once most are reset
        let mut c = Inbound::default();
        for _ in 0..1000 {
            c.see(h(HEADERS, END_HEADERS, 10), now);
        }
        for _ in 0..400 {
            c.see(h(RST_STREAM, 0, 4), now);
        }
        assert_eq!(c.violation, None);
        for _ in 0..200 {
            c.see(h(HEADERS, END_HEADERS, 10), now);
            c.see(h(RST_STREAM, 0, 4), now);
            c.see(h(RST_STREAM, 0, 4), now);
        }
        assert_eq!(c.violation, Some("rapid reset"));
        let mut c = Inbound::default();
        c.see(h(HEADERS, 0, 10), now);
        for _ in 0..=MAX_CONTINUATIONS {
            c.see(h(CONTINUATION, 0, 0), now);
        }
        assert_eq!(c.violation, Some("CONTINUATION flood"));
    }
}
