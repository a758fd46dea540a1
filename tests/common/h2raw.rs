//! A raw HTTP/2 client for conformance and abuse tests: frames as bytes, HPACK by hand.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 1;
pub const END_HEADERS: u8 = 4;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    v.extend([kind, flags]);
    v.extend(stream.to_be_bytes());
    v.extend(payload);
    v
}

/// An HPACK block for `GET path` on authority `t` (static-table indices, literals unindexed).
pub fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    b.push(0x04); // :path, literal without indexing, name index 4
    b.push(path.len() as u8);
    b.extend(path.as_bytes());
    b.extend([0x01, 0x01, b't']); // :authority t
    b
}

pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A raw h2c (prior knowledge) client.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn open(addr: SocketAddr, settings: &[(u16, u32)]) -> Raw {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let mut hello = PREFACE.to_vec();
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
            .collect();
        hello.extend(frame(SETTINGS, 0, 0, &payload));
        s.write_all(&hello).expect("preface");
        let mut raw = Raw { s, buf: Vec::new() };
        // the server's SETTINGS come first: acknowledged, whatever they are
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let (frames, closed) = raw.frames(Duration::from_millis(50));
            if frames
                .iter()
                .any(|f| f.kind == SETTINGS && f.flags & 1 == 0)
                || closed
            {
                break;
            }
        }
        raw.send(&frame(SETTINGS, 1, 0, &[]));
        raw
    }

    /// Sends; false once the server has closed the connection.
    pub fn send(&mut self, bytes: &[u8]) -> bool {
        self.s.write_all(bytes).is_ok()
    }

    /// Frames received until the connection closes or `wait` passes with nothing new.
    pub fn frames(&mut self, wait: Duration) -> (Vec<Frame>, bool) {
        let _ = self.s.set_read_timeout(Some(wait));
        let mut tmp = [0u8; 65536];
        let closed = loop {
            match self.s.read(&mut tmp) {
                Ok(0) => break true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        let mut out = Vec::new();
        while self.buf.len() >= 9 {
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            if self.buf.len() < 9 + len {
                break;
            }
            let f: Vec<u8> = self.buf.drain(..9 + len).collect();
            out.push(Frame {
                kind: f[3],
                flags: f[4],
                stream: u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff,
                payload: f[9..].to_vec(),
            });
        }
        (out, closed)
    }

    /// Reads until the connection closes (true) or `within` passes (false).
    pub fn closed_within(&mut self, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.frames(Duration::from_millis(100)).1 {
                return true;
            }
        }
        false
    }
}

pub fn code(f: &Frame) -> u32 {
    let at = if f.kind == GOAWAY { 4 } else { 0 };
    f.payload
        .get(at..at + 4)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub const PRIORITY: u8 = 2;
pub const WINDOW_UPDATE: u8 = 8;

/// An HPACK literal header field without indexing, with a new name.
pub fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00, name.len() as u8];
    b.extend(name.as_bytes());
    b.push(value.len() as u8);
    b.extend(value.as_bytes());
    b
}

/// How the server answered the first request of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A connection error: GOAWAY with this code.
    Goaway(u32),
    /// A stream error: RST_STREAM on this stream with this code.
    Reset(u32, u32),
    /// A response HEADERS frame on this stream, with its status when it could be read.
    Response(u32, Option<u16>),
    /// Closed without a GOAWAY.
    Closed,
    /// Nothing within the wait.
    Silent,
}

impl Raw {
    /// The first GOAWAY, RST_STREAM or response within `wait` (SETTINGS, PING and
    /// WINDOW_UPDATE traffic is skipped).
    pub fn outcome(&mut self, wait: Duration) -> Outcome {
        let end = Instant::now() + wait;
        while Instant::now() < end {
            let (frames, closed) = self.frames(Duration::from_millis(50));
            for f in frames {
                match f.kind {
                    GOAWAY => return Outcome::Goaway(code(&f)),
                    RST_STREAM => return Outcome::Reset(f.stream, code(&f)),
                    HEADERS if f.stream > 0 => {
                        return Outcome::Response(f.stream, status_of(&f.payload))
                    }
                    _ => {}
                }
            }
            if closed {
                return Outcome::Closed;
            }
        }
        Outcome::Silent
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), the prefix's other bits in `first`.
pub fn hpack_int(first: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![first | v as u8];
    }
    let mut out = vec![first | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// A literal header field without indexing, new name, any length.
pub fn long_literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00];
    b.extend(hpack_int(0, 7, name.len()));
    b.extend(name.as_bytes());
    b.extend(hpack_int(0, 7, value.len()));
    b.extend(value.as_bytes());
    b
}

/// The `:status` of a response header block, when it comes first (as servers send it):
/// indexed (static entries 8-14) or a literal with the static name 8.
pub fn status_of(block: &[u8]) -> Option<u16> {
    match block.first()? {
        0x88 => Some(200),
        0x89 => Some(204),
        0x8a => Some(206),
        0x8b => Some(304),
        0x8c => Some(400),
        0x8d => Some(404),
        0x8e => Some(500),
        0x48 | 0x08 | 0x18 => match *block.get(1)? {
            3 => std::str::from_utf8(block.get(2..5)?).ok()?.parse().ok(),
            n if n & 0x80 != 0 => huffman_digits(block.get(2..2 + usize::from(n & 0x7f))?),
            _ => None,
        },
        _ => None,
    }
}

/// Decodes a Huffman-coded (RFC 7541 Appendix B) string of decimal digits.
fn huffman_digits(b: &[u8]) -> Option<u16> {
    let bits: Vec<u8> = b
        .iter()
        .flat_map(|x| (0..8).rev().map(move |i| (x >> i) & 1))
        .collect();
    let (mut i, mut out) = (0, 0u16);
    while i + 5 <= bits.len() {
        let v5 = bits[i..i + 5].iter().fold(0, |a, b| a << 1 | b);
        let digit = if v5 <= 2 {
            i += 5;
            v5
        } else if i + 6 <= bits.len() {
            let v6 = bits[i..i + 6].iter().fold(0, |a, b| a << 1 | b);
            if !(0b011001..=0b011111).contains(&v6) {
                break; // padding (all ones) or not a digit
            }
            i += 6;
            v6 - 0b011001 + 3
        } else {
            break;
        };
        out = out * 10 + u16::from(digit);
    }
    Some(out)
}
