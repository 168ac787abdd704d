//! Protocol v1: one JSON object per WebSocket text frame (`docs/protocol.md`).
//!
//! Requests are parsed by `shared::protocol` (which backends and tests share) and answered
//! with `ack` or `error`, carrying the request's `id`.

use bytes::Bytes;
use serde_json::value::RawValue;
use shared::protocol::{
    parse_request, PresenceMember, Publication, Request, RequestId, ServerFrame,
};

use crate::broker::Position;

use crate::conn::event::{Codec, Event};
use crate::conn::frame::{self, Transport};
use crate::conn::socket::Handler;
use crate::core::session::{Admit, Command, Done, Failure, Session};
use crate::error::CloseReason;

/// The v1 codec: WebSocket text frames, id 0.
pub static CODEC: V1 = V1 {
    id: 0,
    transport: Transport::WebSocket,
};

/// v1 frames as server-sent events (`GET /sse`, see `protocol::sse`), id 5.
pub static SSE_CODEC: V1 = V1 {
    id: 5,
    transport: Transport::Sse,
};

/// See [`CODEC`].
pub struct V1 {
    id: usize,
    transport: Transport,
}

impl Codec for V1 {
    fn id(&self) -> usize {
        self.id
    }

    fn encode(&self, event: &Event<'_>) -> Bytes {
        // A unicast is encoded for one connection at a time: its WebSocket frame is built
        // in one buffer, without the JSON text as a separate copy first.
        if let (Event::Direct { data }, Transport::WebSocket) = (*event, self.transport) {
            let (head, tail) = shared::protocol::DIRECT_PARTS;
            return frame::text_of(&[head.as_bytes(), data.as_bytes(), tail.as_bytes()]);
        }
        let json = match *event {
            Event::Message {
                channel,
                data,
                position,
            } => shared::protocol::encode_message_at(channel, data, position.map(|(o, _)| o)),
            Event::Unsubscribed { channel, code } => {
                ServerFrame::Unsubscribed { channel, code }.to_json()
            }
            Event::Direct { data } => shared::protocol::encode_direct(data),
            Event::TokenExpiring { grace_ms } => ServerFrame::TokenExpired { grace_ms }.to_json(),
            Event::Join {
                channel,
                conn_id,
                user_id,
                info,
            } => ServerFrame::Join {
                channel,
                conn_id,
                user_id,
                info: info.and_then(raw),
            }
            .to_json(),
            Event::Leave {
                channel,
                conn_id,
                user_id,
                info,
            } => ServerFrame::Leave {
                channel,
                conn_id,
                user_id,
                info: info.and_then(raw),
            }
            .to_json(),
        };
        self.transport.text(&json)
    }

    fn ping(&self) -> Bytes {
        match self.transport {
            // A comment line: EventSource ignores it, proxies see traffic.
            Transport::Sse => Bytes::from_static(b": ping\n\n"),
            _ => frame::ping(),
        }
    }

    fn close(&self, reason: &CloseReason) -> Bytes {
        match self.transport {
            Transport::WebSocket => frame::close(reason.code(), &reason.to_string()),
            _ => super::sse::close_event(reason),
        }
    }
}

/// JSON text the gateway checked (a token's `info` claim) as a raw value.
fn raw(json: &str) -> Option<&RawValue> {
    serde_json::from_str(json).ok()
}

/// A v1 connection: its session, driven by the frames its reader hands over.
pub struct Connection {
    session: Session,
}

impl Connection {
    /// Sends the `welcome` frame and returns the connection, ready to serve.
    pub fn open(session: Session) -> Self {
        let c = Connection { session };
        c.send(&ServerFrame::Welcome {
            conn_id: c.session.conn_id().to_owned(),
            node_id: c.session.node_id().to_owned(),
            user_id: c.session.user_id().map(str::to_owned),
        });
        c
    }

    fn send(&self, f: &ServerFrame<'_>) {
        self.session.reply(frame::text(&f.to_json()));
    }

    /// The reply to a command that went through. A subscription's replay follows its
    /// reply: it starts when `done` is dropped, after the reply is queued.
    fn reply(&self, id: Option<RequestId>, done: Done) {
        match &done {
            Done::Ok => self.send(&ServerFrame::Ack { id }),
            Done::Subscribed(s) => match &s.joined {
                None => self.send(&ServerFrame::Ack { id }),
                Some(j) => self.send(&ServerFrame::Positioned {
                    id,
                    epoch: j.position.epoch.clone(),
                    offset: j.position.offset,
                    recovered: j.recovered,
                }),
            },
            Done::Published(p) => self.send(&ServerFrame::Positioned {
                id,
                epoch: p.epoch.clone(),
                offset: p.offset,
                recovered: None,
            }),
            Done::History(h) => {
                let publications = h
                    .publications
                    .iter()
                    .filter_map(|(offset, data)| {
                        // Stored data was checked as JSON when it was published.
                        let data: &RawValue = serde_json::from_str(data).ok()?;
                        Some(Publication {
                            offset: *offset,
                            data,
                        })
                    })
                    .collect();
                self.send(&ServerFrame::History {
                    id,
                    epoch: h.epoch.clone(),
                    offset: h.top,
                    publications,
                });
            }
            Done::Presence(listing) => {
                let presence = listing
                    .members
                    .iter()
                    .map(|m| {
                        let member = PresenceMember {
                            user_id: m.user_id.as_deref(),
                            info: m.info.as_deref().and_then(raw),
                        };
                        (m.conn_id.as_str(), member)
                    })
                    .collect();
                self.send(&ServerFrame::Presence {
                    id,
                    presence,
                    truncated: listing.truncated,
                });
            }
            Done::PresenceStats(s) => self.send(&ServerFrame::PresenceStats {
                id,
                num_clients: s.num_clients,
                num_users: s.num_users,
            }),
        }
        drop(done);
    }

    fn reply_error(&self, id: Option<RequestId>, failure: Failure) {
        self.session.refused(&failure);
        self.send(&ServerFrame::Error {
            id,
            code: failure.code,
            message: failure.message,
        });
    }
}

fn position(p: shared::protocol::Position) -> Position {
    Position {
        epoch: p.epoch,
        offset: p.offset,
    }
}

fn command<'a>(req: &'a Request<'_>) -> Command<'a> {
    match req {
        Request::Subscribe { channel, recover } => Command::Subscribe {
            channel,
            recover: recover.clone().map(position),
        },
        Request::History {
            channel,
            limit,
            since,
        } => Command::History {
            channel,
            limit: *limit,
            since: since.clone().map(position),
        },
        Request::Unsubscribe { channel } => Command::Unsubscribe { channel },
        Request::Publish { channel, data } => Command::Publish {
            channel,
            data: data.get(),
        },
        Request::Refresh { token } => Command::Refresh { token },
        Request::Send { data } => Command::Send {
            data: data.get(),
            destination: None,
        },
        Request::Presence { channel } => Command::Presence { channel },
        Request::PresenceStats { channel } => Command::PresenceStats { channel },
    }
}

impl Handler for Connection {
    async fn on_text(&mut self, text: String) -> Result<(), CloseReason> {
        if let Admit::Refuse(failure) = self.session.admit(text.len())? {
            self.reply_error(None, failure);
            return Ok(());
        }
        match parse_request(&text) {
            Err(e) => self.reply_error(e.id, Failure::new(e.code, e.message)),
            Ok((id, req)) => match self.session.execute(command(&req)).await {
                Ok(done) => self.reply(id, done),
                Err(failure) => self.reply_error(id, failure),
            },
        }
        Ok(())
    }

    /// A ping over the rate gets no pong (and no error frame: a ping has no `id` to answer),
    /// but counts as a strike like a refused message.
    fn on_ping(&mut self, len: usize) -> Result<bool, CloseReason> {
        Ok(self.session.admit_ping(len)? == Admit::Yes)
    }
}
