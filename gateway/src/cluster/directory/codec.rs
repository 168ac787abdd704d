//! Messages on a node's own channel `<P>node:<node_id>`.
//!
//! The wire format is fixed by its other producers, so it must stay byte for byte what they
//! write: `gw_send_user`/`gw_send_conn` in `directory.lua` publish `D <conn> <conn>...\n<json>`
//! (deliver `{"type":"direct","data":<json>}` to those connections of the node), and a node's
//! [`Directory::disconnect`](super::Directory::disconnect) publishes `K <conn>\n` (close that
//! connection with 4003), and a node's
//! [`Directory::unsubscribe`](super::Directory::unsubscribe) publishes
//! `U <conn> <conn>...\n<channel>` (take those connections off the channel, and tell them),
//! and `gw_emulate` publishes `E <conn>\n<commands>` (hand those commands, posted to
//! another node, to that streaming connection).
//! Backends never write here directly; they call the functions or the server API.

/// One message on a node's channel. Borrows from the payload: decoding copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeMessage<'a> {
    /// Queue a direct frame carrying `data` (JSON text, not yet checked) to each of `conns`.
    Deliver { conns: Conns<'a>, data: &'a str },
    /// Close `conn` with 4003.
    Kick { conn: &'a str },
    /// Take each of `conns` off `channel` (not yet checked), and tell them so.
    Unsubscribe {
        conns: Vec<&'a str>,
        channel: &'a str,
    },
    /// Hand `commands` (posted to another node, which checked the session) to the
    /// streaming connection `conn`.
    Post { conn: &'a str, commands: &'a str },
}

/// The connections of a [`NodeMessage::Deliver`]: the space-separated list as it came, read
/// by [`Conns::iter`]. A unicast is one message per delivery, so decoding it allocates no
/// list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conns<'a>(pub &'a str);

impl<'a> Conns<'a> {
    pub fn iter(self) -> impl Iterator<Item = &'a str> {
        self.0.split(' ')
    }
}

/// Why a payload is not a [`NodeMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not UTF-8")]
    NotUtf8,
    /// The first line is not `D <conns>`, `K <conn>` or `U <conns>`; carries that line.
    #[error("unknown node message {0:?}")]
    Unknown(String),
}

impl<'a> NodeMessage<'a> {
    /// The payload to publish.
    pub fn encode(&self) -> String {
        match self {
            NodeMessage::Deliver { conns, data } => format!("D {}\n{data}", conns.0),
            NodeMessage::Kick { conn } => format!("K {conn}\n"),
            NodeMessage::Unsubscribe { conns, channel } => {
                format!("U {}\n{channel}", conns.join(" "))
            }
            NodeMessage::Post { conn, commands } => format!("E {conn}\n{commands}"),
        }
    }

    /// Parses a payload. Everything after the first line is the deliver's data; a `K` line
    /// names one connection (the rest of the line, spaces included).
    pub fn decode(payload: &'a [u8]) -> Result<NodeMessage<'a>, DecodeError> {
        let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
        let (head, body) = text.split_once('\n').unwrap_or((text, ""));
        match head.split_once(' ') {
            Some(("D", conns)) => Ok(NodeMessage::Deliver {
                conns: Conns(conns),
                data: body,
            }),
            Some(("K", conn)) => Ok(NodeMessage::Kick { conn }),
            Some(("U", conns)) => Ok(NodeMessage::Unsubscribe {
                conns: conns.split(' ').collect(),
                channel: body,
            }),
            Some(("E", conn)) => Ok(NodeMessage::Post {
                conn,
                commands: body,
            }),
            _ => Err(DecodeError::Unknown(head.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliver_is_what_the_lua_functions_publish() {
        // directory.lua: 'D ' .. table.concat(conns, ' ') .. '\n' .. data
        let wire = b"D n1.a.1 n1.a.2\n{\"x\":[1,2]}";
        let m = NodeMessage::decode(wire).unwrap();
        assert_eq!(
            m,
            NodeMessage::Deliver {
                conns: Conns("n1.a.1 n1.a.2"),
                data: "{\"x\":[1,2]}"
            }
        );
        let NodeMessage::Deliver { conns, .. } = m.clone() else {
            unreachable!()
        };
        assert_eq!(conns.iter().collect::<Vec<_>>(), ["n1.a.1", "n1.a.2"]);
        assert_eq!(m.encode().as_bytes(), wire);
    }

    #[test]
    fn deliver_data_keeps_its_own_newlines() {
        let wire = b"D c\n{\"a\":\n\"b\\nc\"}\n";
        let m = NodeMessage::decode(wire).unwrap();
        assert_eq!(
            m,
            NodeMessage::Deliver {
                conns: Conns("c"),
                data: "{\"a\":\n\"b\\nc\"}\n"
            }
        );
        assert_eq!(m.encode().as_bytes(), wire);
    }

    #[test]
    fn kick_round_trips() {
        let m = NodeMessage::Kick { conn: "n2.b.7" };
        assert_eq!(m.encode(), "K n2.b.7\n");
        assert_eq!(NodeMessage::decode(b"K n2.b.7\n").unwrap(), m);
        // without the trailing newline too, as before the codec
        assert_eq!(NodeMessage::decode(b"K n2.b.7").unwrap(), m);
    }

    #[test]
    fn unsubscribe_round_trips() {
        let m = NodeMessage::Unsubscribe {
            conns: vec!["n1.a.1", "n1.a.2"],
            channel: "chat:1",
        };
        assert_eq!(m.encode(), "U n1.a.1 n1.a.2\nchat:1");
        assert_eq!(NodeMessage::decode(b"U n1.a.1 n1.a.2\nchat:1").unwrap(), m);
    }

    #[test]
    fn post_is_what_gw_emulate_publishes() {
        // directory.lua: 'E ' .. conn .. '\n' .. commands
        let wire = b"E n1.a.1\n{\"id\":2,\"publish\":{}}\n{\"id\":3}";
        let m = NodeMessage::decode(wire).unwrap();
        assert_eq!(
            m,
            NodeMessage::Post {
                conn: "n1.a.1",
                commands: "{\"id\":2,\"publish\":{}}\n{\"id\":3}"
            }
        );
        assert_eq!(m.encode().as_bytes(), wire);
    }

    #[test]
    fn rejects_what_is_not_a_node_message() {
        assert_eq!(
            NodeMessage::decode(b"X a\n1"),
            Err(DecodeError::Unknown("X a".into()))
        );
        assert_eq!(
            NodeMessage::decode(b"D\n1"),
            Err(DecodeError::Unknown("D".into()))
        );
        assert_eq!(
            NodeMessage::decode(b""),
            Err(DecodeError::Unknown("".into()))
        );
        assert_eq!(
            NodeMessage::decode(&[b'K', b' ', 0xff, b'\n']),
            Err(DecodeError::NotUtf8)
        );
    }
}
