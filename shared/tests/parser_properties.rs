//! Property tests for the protocol parser, driven by a seeded generator so that a failure
//! reproduces. This stands in for `cargo fuzz`, which needs a nightly toolchain that this
//! project's machines do not have; it runs in every `make test`.
//!
//! Properties: `parse_request` never panics; whatever it accepts names a valid channel and,
//! for publish, carries data that is valid JSON within the nesting limit; whatever it refuses
//! gets one of the documented error codes. Numbers beyond f64's range are valid JSON
//! (RFC 8259 leaves their precision to the receiver) and are forwarded as written.
// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shared::channel;
use shared::protocol::{parse_request, ErrorCode, Request};

/// xorshift64*: tiny, fast and deterministic.
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
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const SEEDS: &[&str] = &[
    r#"{"type":"subscribe","channel":"chat:1","id":1}"#,
    r#"{"type":"unsubscribe","channel":"a/b@c.d-e_f","id":2}"#,
    r#"{"type":"publish","channel":"chat:1","data":{"a":[1,2,{"b":null}]},"id":3}"#,
    r#"{"type":"refresh","token":"x.y.z","id":4}"#,
    r#"{"type":"publish","channel":"c","data":"\u00e9\ud83d\ude00","id":18446744073709551615}"#,
    // escaped strings, as PHP's json_encode writes them
    r#"{"type":"subscribe","channel":"chat\/1","id":5}"#,
    r#"{"type":"\u0070ublish","channel":"a\u002fb","data":"\/","id":6}"#,
];

const PIECES: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "-1e999",
    "1e400",
    "\"type\"",
    "\"channel\"",
    "\"data\"",
    "\"id\"",
    "\"subscribe\"",
    "\"publish\"",
    "\u{0}",
    "\u{7f}",
    "é",
    "\u{feff}",
    "\u{10ffff}",
    "chat:*",
    " ",
    "\n",
    "🙂",
];

fn mutate(rng: &mut Rng, s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(chars.len() + 1);
        match rng.below(4) {
            0 if at < chars.len() => {
                chars.remove(at);
            }
            1 if at < chars.len() => chars[at] = char::from(rng.below(128) as u8),
            _ => {
                let piece: Vec<char> = rng.pick(PIECES).chars().collect();
                chars.splice(at..at, piece);
            }
        }
    }
    chars.into_iter().collect()
}

fn generate(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => {
            // deep nesting around the data field
            let depth = 1 + rng.below(300);
            format!(
                r#"{{"type":"publish","channel":"c","data":{}1{},"id":1}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        }
        1 => {
            // a huge flat array
            let n = rng.below(5_000);
            format!(
                r#"{{"type":"publish","channel":"c","data":[{}0],"id":1}}"#,
                "0,".repeat(n)
            )
        }
        2 => {
            // channel names with odd bytes
            let name: String = (0..rng.below(260))
                .map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('x'))
                .collect();
            serde_json::json!({"type":"subscribe","channel":name,"id":1}).to_string()
        }
        3 => (0..rng.below(64))
            .map(|_| *rng.pick(PIECES))
            .collect::<String>(),
        _ => {
            let seed = rng.pick(SEEDS).to_string();
            mutate(rng, &seed)
        }
    }
}

#[test]
fn parser_never_panics_and_answers_every_input() {
    let seed = std::env::var("PARSER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let iterations = std::env::var("PARSER_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut rng = Rng(seed);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..iterations {
        let input = generate(&mut rng);
        match parse_request(&input) {
            Ok((_, req)) => {
                accepted += 1;
                match req {
                    Request::Subscribe { channel: c, .. }
                    | Request::History { channel: c, .. }
                    | Request::Unsubscribe { channel: c }
                    | Request::Presence { channel: c }
                    | Request::PresenceStats { channel: c } => {
                        assert!(channel::is_valid(&c), "case {i}: accepted channel {c:?}")
                    }
                    Request::Publish { channel: c, data } => {
                        assert!(channel::is_valid(&c), "case {i}: accepted channel {c:?}");
                        assert!(
                            serde_json::from_str::<serde::de::IgnoredAny>(data.get()).is_ok(),
                            "case {i}: data is not JSON: {}",
                            data.get()
                        );
                    }
                    Request::Send { data } => assert!(
                        serde_json::from_str::<serde::de::IgnoredAny>(data.get()).is_ok(),
                        "case {i}: data is not JSON"
                    ),
                    Request::Refresh { .. } => {}
                }
            }
            Err(e) => {
                refused += 1;
                assert!(
                    matches!(
                        e.code,
                        ErrorCode::MalformedJson
                            | ErrorCode::UnknownType
                            | ErrorCode::BadRequest
                            | ErrorCode::InvalidChannel
                    ),
                    "case {i}: unexpected code {:?} for {input:?}",
                    e.code
                );
                assert!(!e.message.is_empty());
            }
        }
    }
    // the generator must exercise both sides, or this test proves nothing
    assert!(accepted > iterations / 20, "accepted {accepted}");
    assert!(refused > iterations / 5, "refused {refused}");
}
