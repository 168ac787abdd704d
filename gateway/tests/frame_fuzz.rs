//! Random frame sequences against a real node over real sockets: whatever arrives, the node
//! answers with a close code from the documented set (or stays open for valid input), never
//! hangs a connection, never panics, and a bystander keeps receiving messages throughout.
//! Seeded, so a failure reproduces (`FRAME_FUZZ_SEED`).
// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const TEXTS: &[&[u8]] = &[
    br#"{"type":"subscribe","channel":"chat:f","id":1}"#,
    br#"{"type":"publish","channel":"chat:f","data":[1,{"a":"b"}],"id":2}"#,
    br#"{"type":"unsubscribe","channel":"chat:f","id":3}"#,
    br#"{"type":"nope"}"#,
    b"[[[[[[[[[[",
    b"\xff\xfe\xfd",
    b"\xce",
    b"",
];

/// One frame: mostly masked, mostly FIN, with opcodes biased towards valid ones.
fn frame(rng: &mut Rng) -> Vec<u8> {
    let fin = if rng.below(5) == 0 { 0 } else { 0x80 };
    let rsv = if rng.below(12) == 0 {
        (rng.below(8) as u8) << 4
    } else {
        0
    };
    let opcode = match rng.below(10) {
        0..=4 => 1,
        5 => 0,
        6 => 2,
        7 => 8,
        8 => 9,
        _ => rng.below(16) as u8,
    };
    let payload: Vec<u8> = match rng.below(4) {
        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        1 if opcode == 8 => {
            let mut p = (rng.below(5000) as u16).to_be_bytes().to_vec();
            p.extend((0..rng.below(10)).map(|_| rng.next() as u8));
            p
        }
        _ => TEXTS[rng.below(TEXTS.len())].to_vec(),
    };
    let b0 = fin | rsv | opcode;
    if rng.below(20) == 0 {
        // unmasked
        let mut out = vec![b0, payload.len().min(125) as u8];
        out.extend_from_slice(&payload[..payload.len().min(125)]);
        return out;
    }
    masked(b0, &payload)
}

/// Close codes the node may send: normal, going away, protocol error, unsupported data,
/// invalid payload, policy, too big.
const ALLOWED: &[u16] = &[1000, 1001, 1002, 1003, 1007, 1008, 1009];

/// Writes frames, then a normal close, and reads until the node hangs up. Returns the code
/// of the first close frame the node sent.
async fn run_case(addr: std::net::SocketAddr, frames: Vec<Vec<u8>>) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("handshake");
    for f in frames {
        if s.write_all(&f).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(&masked(0x88, &1000u16.to_be_bytes())).await;
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .expect("the node ends every connection it is done with")
        .ok();
    let start = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    assert!(buf.starts_with(b"HTTP/1.1 101"));
    let mut rest = &buf[start..];
    while rest.len() >= 2 {
        let (op, len7) = (rest[0] & 0x0f, (rest[1] & 0x7f) as usize);
        let (hdr, len) = match len7 {
            126 => (4, u16::from_be_bytes([rest[2], rest[3]]) as usize),
            127 => (
                10,
                u64::from_be_bytes(rest[2..10].try_into().ok()?) as usize,
            ),
            n => (2, n),
        };
        if rest.len() < hdr + len {
            break;
        }
        if op == 8 {
            let p = &rest[hdr..hdr + len];
            return Some(if p.len() >= 2 {
                u16::from_be_bytes([p[0], p[1]])
            } else {
                1005
            });
        }
        rest = &rest[hdr + len..];
    }
    None
}

#[tokio::test]
async fn random_frames_get_documented_answers_and_spare_bystanders() {
    let seed = std::env::var("FRAME_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d_u64);
    let mut rng = Rng(seed);
    let mut cfg = config();
    cfg.max_message_bytes = 256;
    let node = start(cfg).await;
    let mut bystander = node.subscriber("chat:by").await;
    let (mut publisher, _) = node.client().await;
    let mut codes = std::collections::BTreeMap::new();
    for batch in 0..15 {
        let cases: Vec<Vec<Vec<u8>>> = (0..20)
            .map(|_| (0..1 + rng.below(6)).map(|_| frame(&mut rng)).collect())
            .collect();
        let mut running = tokio::task::JoinSet::new();
        for frames in cases {
            running.spawn(run_case(node.addr, frames));
        }
        while let Some(code) = running.join_next().await {
            let code = code
                .expect("case ran")
                .expect("every connection gets a close frame");
            assert!(ALLOWED.contains(&code), "seed {seed}: close code {code}");
            *codes.entry(code).or_insert(0) += 1;
        }
        request(
            &mut publisher,
            json!({"type":"publish","channel":"chat:by","data":batch,"id":batch}),
        )
        .await;
        assert_eq!(
            bystander.recv_json(T).await.expect("bystander")["data"],
            batch
        );
    }
    assert!(!node.task.is_finished(), "the node is still running");
    eprintln!("close codes seen: {codes:?}");
    // the generator reached both clean closes and protocol errors
    assert!(
        codes.contains_key(&1000) && codes.contains_key(&1002),
        "{codes:?}"
    );
    // no connection leaked: only the bystander and the publisher are left
    node.wait_metric("gateway_connections_open 2").await;
}

/// A client may send its first frames in the same packet as the handshake, so they reach
/// the node's HTTP read buffer before the upgrade: the connection must still read them.
#[tokio::test]
async fn frames_sent_with_the_handshake_are_read() {
    let node = start(config()).await;
    let mut s = TcpStream::connect(node.addr).await.expect("connect");
    let mut first = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    first.extend(masked(
        0x81,
        br#"{"type":"subscribe","channel":"chat:early","id":7}"#,
    ));
    s.write_all(&first).await.expect("handshake and frame");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let acked = tokio::time::timeout(T, async {
        loop {
            let n = s.read(&mut chunk).await.expect("read");
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&seen).contains(r#""type":"ack""#) {
                return true;
            }
        }
    })
    .await
    .expect("an answer in time");
    assert!(acked, "{}", String::from_utf8_lossy(&seen));
}
