//! A client for the gateway's HTTP transports, spoken by hand over HTTP/1.1 so that it costs
//! little next to the server it measures: a long response read line by line out of its
//! chunks ([`Stream`]), and kept-alive posts to `/emulation` ([`Poster`]). `loadtest streams`
//! and the gateway's integration tests (`tests/streams.rs`) use it.

use std::net::SocketAddr;

use anyhow::bail;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One long response, read line by line out of its chunks. An SSE stream's `data: ` prefix
/// is taken off; its blank separator lines and comments are skipped.
pub struct Stream {
    r: BufReader<TcpStream>,
    /// The response's status and head.
    pub status: u16,
    pub head: String,
    /// Decoded body bytes not yet handed out.
    pending: Vec<u8>,
    /// Bytes of the current chunk still to read.
    left: usize,
}

impl Stream {
    /// Sends one request (`body` with its length, when not empty) and reads the response
    /// head, whatever its status.
    pub async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<Self> {
        let mut s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut r = BufReader::new(s);
        let head = read_head(&mut r).await?;
        let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(Stream {
            r,
            status,
            head,
            pending: Vec::new(),
            left: 0,
        })
    }

    /// Body bytes as they arrive (part of a chunk, or a whole one); an error at the end.
    pub async fn bytes(&mut self) -> anyhow::Result<Vec<u8>> {
        if self.left == 0 {
            let mut size = String::new();
            // The CRLF that ends the previous chunk, then the size line.
            while size.trim().is_empty() {
                size.clear();
                if self.r.read_line(&mut size).await? == 0 {
                    bail!("stream ended");
                }
            }
            self.left = usize::from_str_radix(size.trim(), 16)?;
            if self.left == 0 {
                bail!("stream ended");
            }
        }
        let mut buf = vec![0; self.left.min(64 * 1024)];
        let n = self.r.read(&mut buf).await?;
        if n == 0 {
            bail!("stream ended");
        }
        self.left -= n;
        buf.truncate(n);
        Ok(buf)
    }

    /// The next non-empty line of the body, without its `data: ` prefix.
    pub async fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=i).collect();
                line.pop();
                let text = String::from_utf8(line)?;
                let text = text.strip_prefix("data: ").unwrap_or(&text);
                if text.is_empty() || text.starts_with(':') || text.starts_with("retry:") {
                    continue;
                }
                return Ok(text.to_owned());
            }
            let more = self.bytes().await?;
            self.pending.extend_from_slice(&more);
        }
    }

    /// Lines until the reply with `id`; returns it.
    pub async fn reply(&mut self, id: u64) -> anyhow::Result<String> {
        loop {
            let l = self.line().await?;
            if l.contains("\"id\":")
                && serde_json::from_str::<serde_json::Value>(&l)?["id"].as_u64() == Some(id)
            {
                return Ok(l);
            }
        }
    }
}

async fn read_head(r: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed in the response head");
        }
        if line == "\r\n" {
            return Ok(head);
        }
        head.push_str(&line);
    }
}

/// Percent-encodes a query component.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A kept-alive connection that posts to `/emulation`.
pub struct Poster {
    r: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Poster {
    pub async fn new(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        Ok(Poster {
            r: BufReader::new(s),
            addr,
        })
    }

    /// Posts `data` (commands) for `session`; the status.
    pub async fn post(&mut self, session: &str, data: &str) -> anyhow::Result<u16> {
        let body = json!({ "session": session, "node": "", "data": data }).to_string();
        let req = format!(
            "POST /emulation HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.r.get_mut().write_all(req.as_bytes()).await?;
        let head = read_head(&mut self.r).await?;
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut rest = vec![0; len];
        self.r.read_exact(&mut rest).await?;
        Ok(status)
    }
}
