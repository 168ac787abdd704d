//! Redis key and channel names, in one place. Backends use the same names through
//! `shared::backend::Names` (channels, the inbound stream); the history keys are named in
//! `broker/history.lua`, which runs inside Redis.

/// Every Redis key and channel name under one prefix. Every per-id key carries the id as
/// its hash tag, so that on Redis Cluster each lives in its id's slot.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn tagged(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{{{id}}}", self.prefix)
    }

    /// `<P>user:{user}` hash `conn → "node connected_ms"`.
    pub fn user(&self, user: &str) -> String {
        self.tagged("user", user)
    }

    /// `<P>conn:{conn}` string `"node connected_ms user"`.
    pub fn conn(&self, conn: &str) -> String {
        self.tagged("conn", conn)
    }

    /// `<P>nodeconns:{node}` hash `conn → user`.
    pub fn nodeconns(&self, node: &str) -> String {
        self.tagged("nodeconns", node)
    }

    /// `<P>pres:{channel}` hash `conn → {"conn_id","user_id","info","node"}` (JSON): a
    /// presence channel's members. `HLEN` is its number of clients. Beside it, in the same
    /// slot, `<P>presu:{channel}` hash `user → connections in the channel`, whose `HLEN` is
    /// its number of users (anonymous connections are not in it); `presence.lua` names both.
    pub fn presence(&self, channel: &str) -> String {
        self.tagged("pres", channel)
    }

    /// `<P>nodepres:{node}` set of `"<channel> <conn>"`: the presence entries a node wrote,
    /// removed (with their leaves) when it dies.
    pub fn node_presence(&self, node: &str) -> String {
        self.tagged("nodepres", node)
    }

    /// `<P>chans:{node}` hash `channel → subscribers`: a node's channels with local
    /// subscribers, written every heartbeat (the server API's `channels` and `info`).
    pub fn channels_of(&self, node: &str) -> String {
        self.tagged("chans", node)
    }

    /// `<P>nodes` sorted set `node → expiry_ms`.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// `<P>load` hash `node → connections`.
    pub fn load(&self) -> String {
        format!("{}load", self.prefix)
    }

    /// `<P>janitor`: the janitor lock.
    pub fn janitor(&self) -> String {
        format!("{}janitor", self.prefix)
    }

    /// `<P>node:<node>`: the pub/sub channel of one node's unicasts, disconnects and
    /// server-side unsubscribes.
    pub fn node_channel(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }

    /// `<P>ch:<channel>`: the pub/sub channel of a gateway channel (as backends name it).
    pub fn channel(&self, channel: &str) -> String {
        shared::backend::Names::new(&self.prefix).channel(channel)
    }

    /// `<P>inbound`: the backends' stream.
    pub fn inbound(&self) -> String {
        shared::backend::Names::new(&self.prefix).inbound()
    }
}
