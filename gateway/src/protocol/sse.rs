//! Unidirectional server-sent events for a plain browser `EventSource`, with no SDK:
//! `GET /sse?channel=a&channel=b` (`docs/protocol.md`).
//!
//! The stream carries v1's frames as `data:` events ([`super::v1::SSE_CODEC`]): a welcome,
//! one `subscribed` event per channel, then the channels' `message`s. It is a v1 session
//! like any other (limits, slow-consumer policy, unicast, presence, drain), which only ever
//! runs the subscribes of its URL.
//!
//! **Recovery without client code.** Each event that carries a history channel's message
//! (and each `subscribed` event) has an `id:` that encodes the position of every history
//! channel of the connection ([`Ids`], a [`Framer`]: the position is the connection's own,
//! the `data:` part is shared). When the connection drops, the browser reconnects to the
//! same URL by itself and sends the last id it saw as `Last-Event-ID`; whichever node it
//! reaches subscribes each history channel from that position, so the missed publications
//! come first, then live ones, each once. A position it cannot recover from says so in the
//! channel's `subscribed` event (`"recovered":false`).
//!
//! The id is `<i>:<offset>:<epoch>` for each history channel, joined by `,`, where `<i>` is
//! the channel's place among the URL's `channel` parameters (the browser reuses the URL, so
//! the places stay). It is at most [`MAX_ID`] bytes: at most [`MAX_CHANNELS`] channels,
//! and epochs are short (a longer one makes its channel unrecoverable, not the id longer).

use std::fmt::Write as _;
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};

use crate::broker::Position;
use crate::conn::event::{Event, Framer, Joined};
use crate::error::CloseReason;

/// Channels one `/sse` connection may name.
pub const MAX_CHANNELS: usize = 16;

/// The longest epoch an id carries (epochs are 16–20 characters).
const MAX_EPOCH: usize = 40;

/// The longest id: [`MAX_CHANNELS`] entries of an index, an offset and an epoch.
pub const MAX_ID: usize = MAX_CHANNELS * (2 + 1 + 20 + 1 + MAX_EPOCH + 1);

/// How long the browser waits before it reconnects a dropped stream, sent at the start;
/// a drain's close event replaces it with the drain's `retry_after_ms`.
pub const RETRY_MS: u64 = 1000;

/// The positions of a connection's history channels: see the module docs.
pub struct Ids {
    channels: Mutex<Vec<Entry>>,
}

/// `(place in the URL, channel, its offset and epoch)`; the position is `None` until known.
type Entry = (usize, String, Option<(u64, String)>);

impl Ids {
    /// For the history channels among the URL's, with their places.
    pub fn new(history: Vec<(usize, String)>) -> Ids {
        Ids {
            channels: Mutex::new(history.into_iter().map(|(i, c)| (i, c, None)).collect()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `channel` is one of the connection's history channels.
    pub fn is_history(&self, channel: &str) -> bool {
        self.lock().iter().any(|(_, c, _)| c == channel)
    }

    /// Records `channel`'s position; true when it is one of the connection's history
    /// channels.
    pub fn advance(&self, channel: &str, offset: u64, epoch: &str) -> bool {
        let mut channels = self.lock();
        let Some(entry) = channels.iter_mut().find(|(_, c, _)| c == channel) else {
            return false;
        };
        match &mut entry.2 {
            Some((o, e)) if e == epoch => *o = offset,
            slot => *slot = Some((offset, epoch.to_owned())),
        }
        true
    }

    /// `id: <the positions>\n`.
    pub fn id_line(&self) -> Bytes {
        let mut s = String::with_capacity(64);
        s.push_str("id: ");
        for (n, (i, _, position)) in self
            .lock()
            .iter()
            .filter_map(|(i, c, p)| p.as_ref().map(|p| (i, c, p)))
            .enumerate()
        {
            if n > 0 {
                s.push(',');
            }
            let (offset, epoch) = position;
            let _ = write!(s, "{i}:{offset}:{epoch}");
        }
        s.push('\n');
        Bytes::from(s)
    }
}

impl Framer for Ids {
    fn frame(
        &self,
        event: &Event<'_>,
        shared: &Bytes,
        _: &mut Joined,
        part: &mut dyn FnMut(Bytes),
    ) {
        if let Event::Message {
            channel,
            position: Some((offset, epoch)),
            ..
        } = event
        {
            if self.advance(channel, *offset, epoch) {
                part(self.id_line());
            }
        }
        part(shared.clone());
    }
}

/// The positions a `Last-Event-ID` names, by place in the URL. Entries that do not parse,
/// name a place out of range or carry an over-long epoch are left out: their channels
/// subscribe from an unknown position, which cannot be recovered (and says so).
pub fn parse_id(id: &str, channels: usize) -> Vec<Option<Position>> {
    let mut out = vec![None; channels];
    if id.len() > MAX_ID {
        return out;
    }
    for entry in id.split(',') {
        let mut parts = entry.splitn(3, ':');
        let (Some(i), Some(offset), Some(epoch)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(i), Ok(offset)) = (i.parse::<usize>(), offset.parse::<u64>()) else {
            continue;
        };
        if i < channels && !epoch.is_empty() && epoch.len() <= MAX_EPOCH {
            out[i] = Some(Position {
                epoch: epoch.to_owned(),
                offset,
            });
        }
    }
    out
}

/// The first bytes of the stream: the browser's reconnect delay.
pub fn opening() -> Bytes {
    Bytes::from(format!("retry: {RETRY_MS}\n\n"))
}

/// The event that ends a stream: `event: close` with the code and reason the WebSocket
/// close would carry (so a page can tell a drain from an operator's disconnect, and stop
/// its `EventSource` on the latter), and for a drain or a rebalance the hinted delay as the
/// browser's reconnect delay.
pub fn close_event(reason: &CloseReason) -> Bytes {
    let mut b = BytesMut::with_capacity(96);
    let data = serde_json::json!({ "code": reason.code(), "reason": reason.to_string() });
    b.put_slice(b"event: close\ndata: ");
    b.put_slice(data.to_string().as_bytes());
    b.put_u8(b'\n');
    if let CloseReason::Restart(ms) | CloseReason::Rebalance(ms) = reason {
        b.put_slice(format!("retry: {ms}\n").as_bytes());
    }
    b.put_u8(b'\n');
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_last_event_id() {
        let ids = Ids::new(vec![(0, "h:a".into()), (2, "h:b".into())]);
        assert!(ids.advance("h:a", 7, "e1"));
        assert!(
            !ids.advance("plain", 1, "x"),
            "not a history channel of this stream"
        );
        assert_eq!(&ids.id_line()[..], b"id: 0:7:e1\n");
        assert!(ids.advance("h:b", 3, "e2"));
        assert!(ids.advance("h:a", 8, "e1"));
        let line = ids.id_line();
        assert_eq!(&line[..], b"id: 0:8:e1,2:3:e2\n");
        let id = std::str::from_utf8(&line[4..line.len() - 1]).unwrap();
        let parsed = parse_id(id, 3);
        assert_eq!(parsed[0].as_ref().map(|p| p.offset), Some(8));
        assert!(parsed[1].is_none());
        assert_eq!(parsed[2].as_ref().map(|p| p.epoch.as_str()), Some("e2"));
    }

    #[test]
    fn bad_ids_recover_nothing() {
        for id in [
            "",
            "x",
            "0:1",
            "9:1:e",
            "0:-1:e",
            "0:1:",
            &format!("0:1:{}", "e".repeat(41)),
        ] {
            assert!(parse_id(id, 2).iter().all(Option::is_none), "{id:?}");
        }
        assert!(parse_id(&"0:1:e,".repeat(200), 2)
            .iter()
            .all(Option::is_none));
    }

    #[test]
    fn a_drain_sets_the_reconnect_delay() {
        let e = close_event(&CloseReason::Restart(1500));
        let text = std::str::from_utf8(&e).unwrap();
        assert!(text.starts_with("event: close\ndata: {"), "{text}");
        assert!(text.ends_with("retry: 1500\n\n"), "{text}");
        let bye = close_event(&CloseReason::Disconnected);
        assert!(!std::str::from_utf8(&bye).unwrap().contains("retry:"));
    }
}
