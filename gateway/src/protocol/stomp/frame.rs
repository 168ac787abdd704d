//! STOMP frames on the wire (STOMP 1.0, 1.1 and 1.2): the parser of client frames and the
//! encoder of server frames.
//!
//! ```text
//! frame = command EOL *(header EOL) EOL *OCTET NUL *(EOL)      EOL = [CR] LF
//! ```
//!
//! **Parsing.** [`next`] takes one frame off the front of a WebSocket message. A message
//! holds whole frames only: one or more, each followed by any number of EOLs (heart-beats).
//! A frame is not continued in the next message, so a frame without its NUL is an error,
//! not a wait. Headers keep the first of repeated names (§ Repeated Header Entries); values
//! are unescaped (`\r`, `\n`, `\c`, `\\`) from STOMP 1.1 on, except in CONNECT frames, and
//! any other escape is an error (names are kept as sent: none that we read needs escaping).
//! A `content-length` body is taken byte for byte (it may hold NULs) and must be followed by
//! the NUL; without one, the body ends at the first NUL. The header count and each header
//! line's length are capped ([`MAX_HEADERS`], [`MAX_HEADER_BYTES`]). Every error names what
//! was wrong in words a client developer can act on, and carries a `kind` (`stomp_*`), the
//! label of its metric.
//!
//! **Encoding.** [`encode`] builds a complete server frame; values are escaped by the
//! connection's version ([`escape`]). CONNECTED is never escaped, as the specification
//! says, so its values are sanitised instead.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

/// Most headers one frame may carry.
pub const MAX_HEADERS: usize = 64;

/// Longest header line (name, colon and value), in bytes. A JWT in `passcode` or
/// `Authorization` fits with room to spare.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// A STOMP version, as negotiated at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1_0,
    V1_1,
    V1_2,
}

impl Version {
    pub const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    pub fn parse(s: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.as_str() == s.trim())
    }

    /// The highest version in an `accept-version` list that we speak. A CONNECT without
    /// the header is a STOMP 1.0 client.
    pub fn negotiate(accept_version: Option<&str>) -> Option<Version> {
        match accept_version {
            None => Some(Version::V1_0),
            Some(list) => list.split(',').filter_map(Version::parse).max(),
        }
    }

    /// Header values are escaped from 1.1 on.
    fn escapes(self) -> bool {
        self >= Version::V1_1
    }
}

/// A client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Stomp,
    Send,
    Subscribe,
    Unsubscribe,
    Ack,
    Nack,
    Begin,
    Commit,
    Abort,
    Disconnect,
}

impl Command {
    fn parse(line: &[u8]) -> Option<Command> {
        Some(match line {
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"SEND" => Command::Send,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"DISCONNECT" => Command::Disconnect,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Disconnect => "DISCONNECT",
        }
    }
}

/// One client frame, borrowed from its message (values are owned only when unescaped).
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub command: Command,
    headers: Vec<(&'a str, Cow<'a, str>)>,
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }

    #[cfg(test)]
    pub fn header_count(&self) -> usize {
        self.headers.len()
    }
}

/// Why a message could not be parsed: the `kind` labels the metric, the message is for the
/// client (the ERROR frame's `message` header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub kind: &'static str,
    pub message: String,
}

impl FrameError {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        FrameError {
            kind,
            message: message.into(),
        }
    }
}

/// Up to 40 characters of client input, control characters replaced, for error messages.
pub fn shown(input: &[u8]) -> String {
    String::from_utf8_lossy(input)
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Skips EOLs (heart-beats) at the front of `input`.
fn skip_eols(input: &mut &[u8]) {
    loop {
        match *input {
            [b'\n', rest @ ..] | [b'\r', b'\n', rest @ ..] => *input = rest,
            _ => return,
        }
    }
}

/// Splits off one line (without its EOL); `None` when no LF is left.
fn line<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let at = input.iter().position(|&b| b == b'\n')?;
    let (mut l, rest) = (&input[..at], &input[at + 1..]);
    if let [head @ .., b'\r'] = l {
        l = head;
    }
    *input = rest;
    Some(l)
}

/// Takes the next frame off the front of `input`; `Ok(None)` once only EOLs were left.
/// `version` is the connection's, `None` before CONNECT.
pub fn next<'a>(
    input: &mut &'a [u8],
    version: Option<Version>,
) -> Result<Option<Frame<'a>>, FrameError> {
    skip_eols(input);
    if input.is_empty() {
        return Ok(None);
    }
    let Some(cmd) = line(input) else {
        return Err(FrameError::new(
            "stomp_missing_nul",
            format!(
                "frame `{}` ends inside its command line: no EOL, no NUL",
                shown(input)
            ),
        ));
    };
    let command = Command::parse(cmd).ok_or_else(|| {
        FrameError::new(
            "stomp_unknown_command",
            format!("unknown command `{}`", shown(cmd)),
        )
    })?;
    let unescape = version.is_some_and(Version::escapes) && command != Command::Connect;
    let unescape = unescape && command != Command::Stomp;
    let mut headers: Vec<(&str, Cow<'_, str>)> = Vec::new();
    loop {
        let Some(h) = line(input) else {
            return Err(FrameError::new(
                "stomp_missing_nul",
                format!(
                    "{} frame ends inside its headers: no blank line, no NUL",
                    command.as_str()
                ),
            ));
        };
        if h.is_empty() {
            break;
        }
        if h.len() > MAX_HEADER_BYTES {
            return Err(FrameError::new(
                "stomp_header_too_large",
                format!(
                    "a header of {} bytes in a {} frame: at most {MAX_HEADER_BYTES} bytes per header",
                    h.len(),
                    command.as_str()
                ),
            ));
        }
        if headers.len() == MAX_HEADERS {
            return Err(FrameError::new(
                "stomp_too_many_headers",
                format!(
                    "more than {MAX_HEADERS} headers in a {} frame",
                    command.as_str()
                ),
            ));
        }
        let Some(colon) = h.iter().position(|&b| b == b':') else {
            return Err(FrameError::new(
                "stomp_malformed_header",
                format!("header line `{}` has no colon", shown(h)),
            ));
        };
        let (Ok(name), Ok(value)) = (
            std::str::from_utf8(&h[..colon]),
            std::str::from_utf8(&h[colon + 1..]),
        ) else {
            return Err(FrameError::new(
                "stomp_malformed_header",
                format!("header line `{}` is not UTF-8", shown(h)),
            ));
        };
        let value = if unescape {
            unescape_value(value).map_err(|seq| {
                FrameError::new(
                    "stomp_bad_escape",
                    format!(
                        "undefined escape sequence `{seq}` in header `{}`",
                        shown(name.as_bytes())
                    ),
                )
            })?
        } else {
            Cow::Borrowed(value)
        };
        headers.push((name, value));
    }
    let length = headers
        .iter()
        .find(|(n, _)| *n == "content-length")
        .map(|(_, v)| v.as_ref());
    let body = match length {
        Some(len) => {
            let n: usize = len.trim().parse().map_err(|_| {
                FrameError::new(
                    "stomp_bad_content_length",
                    format!(
                        "content-length `{}` is not a number of bytes",
                        shown(len.as_bytes())
                    ),
                )
            })?;
            if n > input.len() {
                return Err(FrameError::new(
                    "stomp_bad_content_length",
                    format!(
                        "content-length {n} is larger than the {} bytes after the headers",
                        input.len()
                    ),
                ));
            }
            if input.get(n) != Some(&0) {
                return Err(FrameError::new(
                    "stomp_missing_nul",
                    format!(
                        "no NUL after the {n} bytes of content-length in a {} frame",
                        command.as_str()
                    ),
                ));
            }
            n
        }
        None => input.iter().position(|&b| b == 0).ok_or_else(|| {
            FrameError::new(
                "stomp_missing_nul",
                format!(
                    "{} frame has no NUL terminator: end every frame with a NUL byte",
                    command.as_str()
                ),
            )
        })?,
    };
    let (body, rest) = (&input[..body], &input[body + 1..]);
    *input = rest;
    skip_eols(input);
    Ok(Some(Frame {
        command,
        headers,
        body,
    }))
}

/// Undoes the header escapes of STOMP 1.1 and 1.2; `Err` names an undefined one.
fn unescape_value(value: &str) -> Result<Cow<'_, str>, String> {
    if !value.contains('\\') {
        return Ok(Cow::Borrowed(value));
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('c') => out.push(':'),
            Some('\\') => out.push('\\'),
            Some(other) => return Err(format!("\\{other}")),
            None => return Err("\\".into()),
        }
    }
    Ok(Cow::Owned(out))
}

/// A header value as the connection's version writes it: escaped from 1.1 on (1.1 has no
/// `\r` escape, so a CR is dropped there); in 1.0, and when `escaped` is false (CONNECTED),
/// line breaks become spaces so the frame keeps its shape.
pub fn escape(value: &str, version: Version, escaped: bool) -> Cow<'_, str> {
    let special = |c: char| matches!(c, '\r' | '\n' | ':' | '\\');
    if !value.contains(special) {
        return Cow::Borrowed(value);
    }
    if !escaped || !version.escapes() {
        if !value.contains(['\r', '\n']) {
            return Cow::Borrowed(value);
        }
        return Cow::Owned(value.replace(['\r', '\n'], " "));
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            ':' => out.push_str("\\c"),
            '\n' => out.push_str("\\n"),
            '\r' if version == Version::V1_2 => out.push_str("\\r"),
            '\r' => {}
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A complete server frame, as the payload of one WebSocket text frame. Header values are
/// escaped for `version` unless the command is CONNECTED. A non-empty body gets a
/// `content-length`.
pub fn encode(command: &str, headers: &[(&str, &str)], body: &str, version: Version) -> Bytes {
    let escaped = command != "CONNECTED";
    let mut s = String::with_capacity(64 + body.len());
    s.push_str(command);
    s.push('\n');
    for (name, value) in headers {
        s.push_str(name);
        s.push(':');
        s.push_str(&escape(value, version, escaped));
        s.push('\n');
    }
    if !body.is_empty() {
        let _ = writeln!(s, "content-length:{}", body.len());
    }
    s.push('\n');
    s.push_str(body);
    s.push('\0');
    crate::conn::frame::text(&s)
}

/// The part of a MESSAGE frame that every connection shares: `ack` and `message-id` (both
/// `id`, the same for every subscriber), the other headers that do not depend on the
/// connection, the blank line, the body and the NUL. See the parent module. `ack` comes
/// first, so that a subscription without client acks skips its line with a slice
/// ([`ack_line_len`]).
pub fn message_tail(id: &dyn std::fmt::Display, data: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(96 + data.len());
    let _ = write!(
        b,
        "ack:{id}\nmessage-id:{id}\ncontent-type:application/json\ncontent-length:{}\n\n",
        data.len()
    );
    b.put_slice(data.as_bytes());
    b.put_u8(0);
    b.freeze()
}

/// The length of a [`message_tail`]'s `ack` line, which a subscription without client acks
/// leaves out.
pub fn ack_line_len(tail: &[u8]) -> usize {
    tail.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8], version: Option<Version>) -> Result<Vec<Frame<'_>>, FrameError> {
        let mut rest = input;
        let mut out = Vec::new();
        while let Some(f) = next(&mut rest, version)? {
            out.push(f);
        }
        Ok(out)
    }

    fn kind(input: &[u8]) -> &'static str {
        parse_all(input, Some(Version::V1_2))
            .expect_err("refused")
            .kind
    }

    #[test]
    fn parses_frames_heartbeats_and_crlf() {
        let wire = b"\n\r\nSEND\r\ndestination:/topic/a\r\n\r\n{}\0\n\nSUBSCRIBE\nid:0\ndestination:/topic/b\n\n\0\r\n";
        let frames = parse_all(wire, Some(Version::V1_2)).expect("parses");
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].command, Command::Send);
        assert_eq!(frames[0].header("destination"), Some("/topic/a"));
        assert_eq!(frames[0].body, b"{}");
        assert_eq!(frames[1].command, Command::Subscribe);
        assert_eq!(frames[1].header("id"), Some("0"));
        assert_eq!(frames[1].body, b"");
        assert!(parse_all(b"\n\n\r\n", None).expect("only EOLs").is_empty());
    }

    #[test]
    fn first_repeated_header_wins_and_colons_in_values_are_kept() {
        let f = parse_all(
            b"SEND\nx:1\nx:2\ndestination:/topic/a:b\n\n\0",
            Some(Version::V1_2),
        )
        .expect("parses");
        assert_eq!(f[0].header("x"), Some("1"));
        assert_eq!(f[0].header("destination"), Some("/topic/a:b"));
    }

    #[test]
    fn escapes_are_undone_from_1_1_but_not_in_connect() {
        let wire = b"SEND\nd:a\\cb\\nc\\\\d\\re\n\n\0";
        let f = parse_all(wire, Some(Version::V1_2)).expect("parses");
        assert_eq!(f[0].header("d"), Some("a:b\nc\\d\re"));
        let f = parse_all(wire, Some(Version::V1_0)).expect("1.0 keeps backslashes");
        assert_eq!(f[0].header("d"), Some("a\\cb\\nc\\\\d\\re"));
        let f = parse_all(b"CONNECT\npasscode:a\\b\n\n\0", Some(Version::V1_2)).expect("parses");
        assert_eq!(f[0].header("passcode"), Some("a\\b"));
        let e = parse_all(b"SEND\nd:a\\tb\n\n\0", Some(Version::V1_2)).expect_err("bad escape");
        assert_eq!(e.kind, "stomp_bad_escape");
        assert!(e.message.contains("`\\t`"), "{}", e.message);
    }

    #[test]
    fn content_length_bodies_may_hold_nuls() {
        let wire = b"SEND\ncontent-length:5\n\na\0b\0c\0SEND\n\nx\0";
        let f = parse_all(wire, Some(Version::V1_2)).expect("parses");
        assert_eq!(f[0].body, b"a\0b\0c");
        assert_eq!(f[1].body, b"x");
    }

    #[test]
    fn refuses_broken_frames_with_a_precise_message() {
        assert_eq!(
            kind(b"SEND\ndestination:/topic/a\n\n{}"),
            "stomp_missing_nul"
        );
        assert_eq!(kind(b"SEND\ndestination:/topic/a"), "stomp_missing_nul");
        assert_eq!(kind(b"SEND"), "stomp_missing_nul");
        assert_eq!(kind(b"FLY\n\n\0"), "stomp_unknown_command");
        assert_eq!(kind(b"send\n\n\0"), "stomp_unknown_command");
        assert_eq!(kind(b"SEND\nnocolon\n\n\0"), "stomp_malformed_header");
        assert_eq!(
            kind(b"SEND\ncontent-length:x\n\n\0"),
            "stomp_bad_content_length"
        );
        // content-length larger than what follows
        let e = parse_all(b"SEND\ncontent-length:100\n\nhello\0", Some(Version::V1_2))
            .expect_err("too long");
        assert_eq!(e.kind, "stomp_bad_content_length");
        assert_eq!(
            e.message,
            "content-length 100 is larger than the 6 bytes after the headers"
        );
        // content-length shorter than the body: no NUL where it ends
        assert_eq!(
            kind(b"SEND\ncontent-length:2\n\nhello\0"),
            "stomp_missing_nul"
        );
        let e = parse_all(b"SEND\ndestination:/topic/a\n\n{}", Some(Version::V1_2))
            .expect_err("no nul");
        assert_eq!(
            e.message,
            "SEND frame has no NUL terminator: end every frame with a NUL byte"
        );
    }

    #[test]
    fn caps_headers() {
        let mut many = b"SEND\n".to_vec();
        for i in 0..10_000 {
            many.extend_from_slice(format!("h{i}:v\n").as_bytes());
        }
        many.extend_from_slice(b"\n\0");
        let e = parse_all(&many, Some(Version::V1_2)).expect_err("too many");
        assert_eq!(e.kind, "stomp_too_many_headers");
        assert_eq!(e.message, "more than 64 headers in a SEND frame");
        let mut ok = b"SEND\n".to_vec();
        for i in 0..MAX_HEADERS {
            ok.extend_from_slice(format!("h{i}:v\n").as_bytes());
        }
        ok.extend_from_slice(b"\n\0");
        assert_eq!(
            parse_all(&ok, None).expect("64 is fine")[0].header_count(),
            64
        );
        let long = format!("SEND\nx:{}\n\n\0", "y".repeat(MAX_HEADER_BYTES));
        assert_eq!(kind(long.as_bytes()), "stomp_header_too_large");
    }

    #[test]
    fn negotiates_versions() {
        assert_eq!(Version::negotiate(None), Some(Version::V1_0));
        assert_eq!(Version::negotiate(Some("1.0,1.1,1.2")), Some(Version::V1_2));
        assert_eq!(Version::negotiate(Some("1.1, 1.0")), Some(Version::V1_1));
        assert_eq!(Version::negotiate(Some("2.0")), None);
    }

    #[test]
    fn encodes_and_escapes_by_version() {
        assert_eq!(
            escape("a:b\\c\nd\re", Version::V1_2, true),
            "a\\cb\\\\c\\nd\\re"
        );
        assert_eq!(
            escape("a:b\\c\nd\re", Version::V1_1, true),
            "a\\cb\\\\c\\nde"
        );
        assert_eq!(escape("a:b\nc", Version::V1_0, true), "a:b c");
        assert_eq!(escape("a:b\nc", Version::V1_2, false), "a:b c");
        let f = encode("RECEIPT", &[("receipt-id", "r:1")], "", Version::V1_2);
        assert_eq!(&f[2..], b"RECEIPT\nreceipt-id:r\\c1\n\n\0");
        let f = encode("ERROR", &[("message", "no")], "why", Version::V1_2);
        assert_eq!(&f[2..], b"ERROR\nmessage:no\ncontent-length:3\n\nwhy\0");
        let f = encode("CONNECTED", &[("session", "n:1")], "", Version::V1_2);
        assert_eq!(&f[2..], b"CONNECTED\nsession:n:1\n\n\0");
        // what we encode, we parse back (an ERROR is not a client command: use SEND)
        let f = encode("SEND", &[("d", "a:b\\c\nd")], "{}", Version::V1_2);
        let mut rest = &f[2..];
        let back = next(&mut rest, Some(Version::V1_2))
            .expect("parses")
            .expect("a frame");
        assert_eq!(back.header("d"), Some("a:b\\c\nd"));
        assert_eq!(back.body, b"{}");
    }

    #[test]
    fn message_tail_carries_length_and_nul() {
        assert_eq!(
            &message_tail(&7, "[1]")[..],
            b"ack:7\nmessage-id:7\ncontent-type:application/json\ncontent-length:3\n\n[1]\0"
        );
        let tail = message_tail(&"e:7", "[1]");
        assert_eq!(
            &tail[ack_line_len(&tail)..],
            b"message-id:e:7\ncontent-type:application/json\ncontent-length:3\n\n[1]\0"
        );
    }
}
