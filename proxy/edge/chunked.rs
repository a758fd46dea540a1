//! Strict chunked framing (RFC 9112 §7.1) for request bodies, checked on the raw bytes as they
//! arrive. pingora decodes chunked bodies leniently (a bare LF ends a chunk-size line, anything
//! goes in an extension) and re-frames them for the backend; a body that another parser in
//! front of sluice could frame differently is refused here instead.
//!
//! `Checked` wraps an HTTP/1 connection for its whole life; the edge loop turns the check on for
//! each chunked request. A violation fails the read (pingora aborts the request) and is kept for
//! the gateway, which answers 400.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// At most 16 hex digits: every size fits in 64 bits.
const MAX_SIZE_DIGITS: u8 = 16;
/// A chunk line (size and extensions) or a trailer line longer than this is refused.
const MAX_LINE: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading chunk-size hex digits (how many so far).
    Size(u8),
    /// After the size: extensions, up to CR.
    Ext,
    /// CR seen at the end of a chunk line; LF must follow. `true`: the last chunk.
    LineLf(bool),
    /// Chunk data still to come.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    /// The body is complete; what follows is the next request.
    Done,
}

/// The state of one chunked body.
#[derive(Debug, Clone)]
pub struct Framing {
    state: State,
    size: u64,
    line: u32,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            state: State::Size(0),
            size: 0,
            line: 0,
        }
    }
}

fn is_ext_byte(b: u8) -> bool {
    b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80
}

impl Framing {
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Checks the next body bytes; returns how many belong to the body (the rest, after the
    /// body's end, is the next request).
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data(left) => {
                    let n = (left.min((data.len() - i) as u64)) as usize;
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::Size(n) => match (b as char).to_digit(16) {
                    Some(d) if n < MAX_SIZE_DIGITS => {
                        self.size = self.size << 4 | u64::from(d);
                        State::Size(n + 1)
                    }
                    Some(_) => return Err("chunk size too large"),
                    None if n == 0 => return Err("chunk line without a size"),
                    None => match b {
                        b'\r' => State::LineLf(self.size == 0),
                        b';' | b' ' | b'\t' => State::Ext,
                        b'\n' => return Err("bare LF after a chunk size"),
                        _ => return Err("bad character in a chunk size"),
                    },
                },
                State::Ext => match b {
                    b'\r' => State::LineLf(self.size == 0),
                    b'\n' => return Err("bare LF in a chunk extension"),
                    b if is_ext_byte(b) => State::Ext,
                    _ => return Err("control character in a chunk extension"),
                },
                State::LineLf(last) => match b {
                    b'\n' if last => State::TrailerStart,
                    b'\n' => State::Data(self.size),
                    _ => return Err("bare CR in a chunk line"),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err("chunk data longer than its size"),
                },
                State::DataLf => match b {
                    b'\n' => {
                        self.size = 0;
                        self.line = 0;
                        State::Size(0)
                    }
                    _ => return Err("bare CR after chunk data"),
                },
                State::TrailerStart => match b {
                    b'\r' => State::FinalLf,
                    b' ' | b'\t' => return Err("obsolete line folding in a trailer"),
                    b if is_ext_byte(b) => State::Trailer,
                    _ => return Err("bad trailer line"),
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b if is_ext_byte(b) => State::Trailer,
                    _ => return Err("bad character in a trailer"),
                },
                State::TrailerLf => match b {
                    b'\n' => {
                        self.line = 0;
                        State::TrailerStart
                    }
                    _ => return Err("bare CR in a trailer"),
                },
                State::FinalLf => match b {
                    b'\n' => State::Done,
                    _ => return Err("bare CR at the end of the body"),
                },
            };
            if matches!(self.state, State::Size(_) | State::Ext | State::Trailer) {
                self.line += 1;
                if self.line > MAX_LINE {
                    return Err("chunk line too long");
                }
            }
            i += 1;
        }
        Ok(data.len())
    }
}

/// What the gateway finds when it looks at the connection of a failed request.
#[derive(Debug, Default)]
pub struct Verdict {
    violation: std::sync::Mutex<Option<&'static str>>,
}

impl Verdict {
    pub fn violation(&self) -> Option<&'static str> {
        *self.violation.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An HTTP/1 connection whose chunked request bodies are checked.
pub struct Checked {
    pub(super) inner: Stream,
    framing: Option<Framing>,
    pub verdict: Arc<Verdict>,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("inner", &self.inner)
            .finish()
    }
}

impl Checked {
    pub fn new(inner: Stream) -> Checked {
        Checked {
            inner,
            framing: None,
            verdict: Arc::new(Verdict::default()),
        }
    }

    /// Checks the next request's body as chunked (`Some`, with the state after the bytes
    /// already read with its head) or not at all.
    pub fn expect(&mut self, framing: Option<Framing>) {
        self.framing = framing.filter(|f| !f.done());
    }

    pub fn inner_mut(&mut self) -> &mut Stream {
        &mut self.inner
    }
}

impl AsyncRead for Checked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(f)) = (&r, this.framing.as_mut()) {
            match f.feed(&buf.filled()[before..]) {
                Ok(_) if f.done() => this.framing = None,
                Ok(_) => {}
                Err(why) => {
                    *this
                        .verdict
                        .violation
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(why);
                    this.framing = None;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
                }
            }
        }
        r
    }
}

impl AsyncWrite for Checked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

delegate_io!(Checked);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &[u8]) -> Result<usize, &'static str> {
        let mut f = Framing::default();
        let n = f.feed(body)?;
        if f.done() {
            Ok(n)
        } else {
            Err("incomplete")
        }
    }

    #[test]
    fn strict_chunks() {
        assert_eq!(check(b"5\r\nhello\r\n0\r\n\r\n"), Ok(15));
        assert_eq!(check(b"5;a=b;c=\"d e\"\r\nhello\r\n0\r\n\r\nGET"), Ok(27));
        assert_eq!(check(b"A\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n"), Ok(28));
        assert_eq!(check(b"000\r\n\r\n"), Ok(7));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5;a=b\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5\r\nhello\r\n0\r\nX: a\nb\r\n\r\n",
            b"5;\x01\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(check(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // byte by byte is the same as at once
        let body = b"5;x\r\nhello\r\n3\r\nabc\r\n0\r\nT: v\r\n\r\n";
        let mut f = Framing::default();
        for b in body.iter() {
            f.feed(std::slice::from_ref(b)).expect("ok");
        }
        assert!(f.done());
    }
}
