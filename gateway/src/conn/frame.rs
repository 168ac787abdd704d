//! WebSocket frames on the wire (RFC 6455 §5): server frames encoded once and shared, client
//! frames decoded without a standing buffer.
//!
//! **Encoding.** Server frames are never masked, so a frame's bytes depend only on its
//! content: [`text`] encodes once, and the [`Bytes`] are shared with every subscriber.
//!
//! **Decoding.** [`FrameReader`] replaces fastwebsockets' read half for one reason: memory.
//! fastwebsockets gives every connection a fixed 8 KiB read buffer at the handshake, and most
//! gateway connections are idle subscribers that send a pong every ping interval and nothing
//! else. Here a read that starts with no partial frame pending goes into an 8 KiB array on
//! the stack of that one poll, and only the bytes that arrived are copied to the heap; once
//! every complete frame is handed out, the heap buffer is released. An idle connection
//! holds no read buffer at all. A frame that arrives in pieces grows a buffer to its
//! declared length (never past the message cap) and reads straight into it.
//!
//! The reader enforces what the gateway needs from the framing layer, each with the close
//! it causes: the mask bit on every client frame (§5.1), zero reserved bits (no extension
//! is negotiated), known opcodes, unfragmented control frames of ≤ 125 bytes, and a frame
//! length within the message cap, checked from the header before any payload is buffered.
//! Reassembly of fragments and UTF-8 checks are the caller's ([`crate::conn::socket`]).
//!
//! It is cancel-safe: all state lives in the reader, not in the future.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::error::CloseReason;

const FIN: u8 = 0x80;

/// Size of the per-poll stack buffer for a read that starts with nothing pending.
const STACK_READ: usize = 8192;

/// Encodes one unfragmented server frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut buf, opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// A text frame whose payload is `parts` joined, built in one buffer (no joined copy first).
pub fn text_of(parts: &[&[u8]]) -> Bytes {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut buf = BytesMut::with_capacity(len + 10);
    put_header(&mut buf, 0x1, len);
    for p in parts {
        buf.put_slice(p);
    }
    buf.freeze()
}

/// Writes the header of an unfragmented server frame whose payload of `len` bytes follows.
fn put_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    buf.put_u8(FIN | opcode);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// Text-frame headers for every payload length below 64 KiB, 4 bytes a length (the short
/// form uses the first 2), built at compile time: 256 KiB of read-only data, of which only
/// the pages of lengths in use are ever loaded.
static TEXT_HEADERS: [[u8; 4]; 1 << 16] = {
    let mut t = [[0u8; 4]; 1 << 16];
    let mut len = 0;
    while len < t.len() {
        t[len] = if len < 126 {
            [FIN | 0x1, len as u8, 0, 0]
        } else {
            [FIN | 0x1, 126, (len >> 8) as u8, len as u8]
        };
        len += 1;
    }
    t
};

/// The header of an unfragmented text frame whose payload of `len` bytes follows in other
/// buffers (STOMP's MESSAGE: a per-subscription part, then the part shared by every
/// subscriber). Below 64 KiB it is a slice of a static table, so a frame sent to thousands
/// of connections builds no header of its own: no allocation and no reference count per
/// delivery. Longer frames (10-byte headers) are encoded.
pub fn text_header(len: usize) -> Bytes {
    match TEXT_HEADERS.get(len) {
        Some(h) if len < 126 => Bytes::from_static(&h[..2]),
        Some(h) => Bytes::from_static(h),
        None => {
            let mut b = BytesMut::with_capacity(10);
            put_header(&mut b, 0x1, len);
            b.freeze()
        }
    }
}

/// A text frame.
pub fn text(s: &str) -> Bytes {
    encode(0x1, s.as_bytes())
}

/// How a connection's messages reach its client: each a WebSocket text frame, or one
/// long HTTP response that carries them as lines (HTTP-streaming) or as server-sent events.
/// A protocol's codec encodes its JSON once per transport (each transport is its own codec
/// id), so that subscribers on each transport share the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    /// `Transfer-Encoding: chunked`, one JSON text per line (Centrifugo's `http_stream`).
    HttpStream,
    /// `text/event-stream`: each message a `data:` event.
    Sse,
}

impl Transport {
    /// The `transport` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::HttpStream => "http_stream",
            Transport::Sse => "sse",
        }
    }

    /// One message of JSON text (which holds no raw newline: serialized JSON escapes them,
    /// and several messages joined by `\n` become one event of several `data:` lines).
    pub fn text(self, json: &str) -> Bytes {
        match self {
            Transport::WebSocket => text(json),
            Transport::HttpStream => {
                let mut b = BytesMut::with_capacity(json.len() + 1);
                b.put_slice(json.as_bytes());
                b.put_u8(b'\n');
                b.freeze()
            }
            Transport::Sse => {
                let mut b = BytesMut::with_capacity(json.len() + 8);
                for line in json.split('\n') {
                    b.put_slice(b"data: ");
                    b.put_slice(line.as_bytes());
                    b.put_u8(b'\n');
                }
                b.put_u8(b'\n');
                b.freeze()
            }
        }
    }
}

/// A binary frame (the echo example; protocol v1 has none).
#[cfg(any(test, feature = "test-util"))]
pub fn binary(b: &[u8]) -> Bytes {
    encode(0x2, b)
}

/// A close frame. The reason is cut to fit the 125-byte control-frame limit on a char
/// boundary, so it stays valid UTF-8.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    encode(0x8, &p)
}

/// An empty ping.
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | 0x9, 0])
}

/// A pong echoing `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    encode(0xA, payload)
}

/// A frame's opcode (RFC 6455 §5.2); reserved opcodes are refused by the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// One client frame, unmasked.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: BytesMut,
}

/// Reads client frames from `R`. See the module docs.
pub struct FrameReader<R> {
    io: R,
    /// Bytes read but not yet handed out as frames. Empty, with no allocation, between frames.
    pending: BytesMut,
    max_frame: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses frames longer than `max_frame` bytes with [`CloseReason::TooBig`].
    pub fn new(io: R, max_frame: usize) -> Self {
        FrameReader {
            io,
            pending: BytesMut::new(),
            max_frame,
        }
    }

    /// Starts with `leftover`: bytes that arrived with the handshake, already read past it.
    pub fn with_leftover(mut self, leftover: &[u8]) -> Self {
        self.pending.extend_from_slice(leftover);
        self
    }

    /// The next frame. EOF and I/O errors are [`CloseReason::Abnormal`]; framing violations
    /// are the close that answers them.
    pub async fn next(&mut self) -> Result<Frame, CloseReason> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(frame);
            }
            let n = if self.pending.is_empty() {
                // Nothing pending: read on this poll's stack, keep only what arrived.
                let (io, pending) = (&mut self.io, &mut self.pending);
                poll_fn(|cx| {
                    // Uninitialised: zeroing 8 KiB on every read would cost more than the read.
                    let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
                    let mut rb = ReadBuf::uninit(&mut stack);
                    ready!(Pin::new(&mut *io).poll_read(cx, &mut rb))?;
                    pending.extend_from_slice(rb.filled());
                    Poll::Ready(Ok::<_, std::io::Error>(rb.filled().len()))
                })
                .await
            } else {
                // A frame in progress: `parse` reserved room for it, read straight into it.
                self.io.read_buf(&mut self.pending).await
            };
            match n {
                Ok(0) | Err(_) => return Err(CloseReason::Abnormal),
                Ok(_) => {}
            }
        }
    }

    /// Takes one complete frame off `pending`, if there is one.
    fn parse(&mut self) -> Result<Option<Frame>, CloseReason> {
        let b = &self.pending[..];
        let [b0, b1, ..] = *b else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(CloseReason::Protocol("reserved_bits"));
        }
        let opcode = match b0 & 0x0f {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return Err(CloseReason::Protocol("reserved_opcode")),
        };
        let fin = b0 & FIN != 0;
        if b1 & 0x80 == 0 {
            return Err(CloseReason::Protocol("unmasked_frame"));
        }
        let (len, at) = match (b1 & 0x7f, b) {
            (126, [_, _, a, b, ..]) => (u64::from(u16::from_be_bytes([*a, *b])), 4),
            (127, [_, _, rest @ ..]) if rest.len() >= 8 => {
                let mut l = [0u8; 8];
                l.copy_from_slice(&rest[..8]);
                (u64::from_be_bytes(l), 10)
            }
            (126 | 127, _) => return Ok(None),
            (n, _) => (u64::from(n), 2),
        };
        if matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong) {
            if !fin {
                return Err(CloseReason::Protocol("fragmented_control_frame"));
            }
            if len > 125 {
                return Err(CloseReason::Protocol("control_frame_too_long"));
            }
        }
        if len > self.max_frame as u64 {
            return Err(CloseReason::TooBig(self.max_frame));
        }
        let total = at + 4 + len as usize;
        if b.len() < total {
            self.pending.reserve(total - b.len());
            return Ok(None);
        }
        let key = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        let mut payload = self.pending.split_to(total);
        payload.advance(at + 4);
        unmask(&mut payload, key);
        if self.pending.is_empty() {
            // Release the buffer (the payload keeps its own part until it is handled).
            self.pending = BytesMut::new();
        }
        Ok(Some(Frame {
            fin,
            opcode,
            payload,
        }))
    }
}

/// XORs the client's masking key over the payload, eight bytes at a time.
fn unmask(payload: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    #[test]
    fn text_headers_match_encoded_frames() {
        for len in [0, 1, 125, 126, 127, 255, 256, 4096, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; len];
            let whole = encode(0x1, &payload);
            let header = text_header(len);
            assert_eq!(&whole[..header.len()], &header[..], "length {len}");
            assert_eq!(header.len() + len, whole.len(), "length {len}");
        }
    }

    #[test]
    fn a_frame_of_parts_is_the_frame_of_their_text() {
        for len in [0, 100, 125, 126, 70_000] {
            let data = "d".repeat(len);
            let parts: [&[u8]; 3] = [b"{\"a\":", data.as_bytes(), b"}"];
            assert_eq!(
                text_of(&parts),
                text(&format!("{{\"a\":{data}}}")),
                "length {len}"
            );
        }
    }

    async fn read_all(
        wire: Vec<u8>,
        max: usize,
    ) -> Vec<Result<(bool, OpCode, Vec<u8>), CloseReason>> {
        // Feed the bytes one at a time through a duplex pipe, to exercise every split point.
        let (mut tx, rx) = tokio::io::duplex(1);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for b in wire {
                if tx.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        });
        let mut r = FrameReader::new(rx, max);
        let mut out = Vec::new();
        loop {
            match r.next().await {
                Ok(f) => out.push(Ok((f.fin, f.opcode, f.payload.to_vec()))),
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn decodes_every_length_form_across_splits() {
        let long = vec![b'x'; 300];
        let huge = vec![b'y'; 70_000];
        let mut wire = client(0x81, b"hello");
        wire.extend(client(0x02, &long));
        wire.extend(client(0x89, b"p"));
        wire.extend(client(0x80, &huge));
        let got = read_all(wire, 100_000).await;
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], Ok((true, OpCode::Text, b"hello".to_vec())));
        assert_eq!(got[1], Ok((false, OpCode::Binary, long)));
        assert_eq!(got[2], Ok((true, OpCode::Ping, b"p".to_vec())));
        assert_eq!(got[3], Ok((true, OpCode::Continuation, huge)));
        assert_eq!(got[4], Err(CloseReason::Abnormal));
    }

    #[tokio::test]
    async fn refuses_violations_from_the_header() {
        let cases: [(Vec<u8>, CloseReason); 6] = [
            (client(0xC1, b"x"), CloseReason::Protocol("reserved_bits")),
            (client(0x83, b"x"), CloseReason::Protocol("reserved_opcode")),
            (
                vec![0x81, 0x01, b'x'],
                CloseReason::Protocol("unmasked_frame"),
            ),
            (
                client(0x09, b"x"),
                CloseReason::Protocol("fragmented_control_frame"),
            ),
            (
                client(0x89, &[0; 126]),
                CloseReason::Protocol("control_frame_too_long"),
            ),
            (client(0x81, &[b'a'; 11]), CloseReason::TooBig(10)),
        ];
        for (wire, want) in cases {
            let got = read_all(wire, 10).await;
            assert_eq!(got, vec![Err(want)]);
        }
    }

    #[tokio::test]
    async fn holds_no_buffer_between_frames() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut r = FrameReader::new(rx, 100);
        use tokio::io::AsyncWriteExt;
        tx.write_all(&client(0x8A, b"")).await.unwrap();
        let f = r.next().await.unwrap();
        assert_eq!(f.opcode, OpCode::Pong);
        assert_eq!(r.pending.capacity(), 0);
    }

    #[test]
    fn encodes_lengths() {
        assert_eq!(&text("hi")[..], &[0x81, 2, b'h', b'i']);
        let f = text(&"x".repeat(300));
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        let f = text(&"x".repeat(70_000));
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(f.len(), 70_010);
        let c = close(1000, &"é".repeat(100));
        assert!(c.len() <= 127);
        assert!(std::str::from_utf8(&c[4..]).is_ok());
    }
}
