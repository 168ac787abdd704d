//! Presence in Redis, shared by every node: the functions of `presence.lua` update a
//! channel's two hashes and announce in one atomic step, in the channel's slot. Beside each
//! entry, the node records `"<channel> <conn>"` in its own set `<P>nodepres:{node}`, which
//! [`Store::purge_node`] reads when the node has died.

use std::collections::HashMap;
use std::sync::Arc;

use redis::Value;

use super::{announce_of, Listing, Member, Page, Stats, Store};
use crate::broker::BoxFuture;
use crate::cluster::directory::backend::BATCH;
use crate::cluster::keys::Keys;
use crate::cluster::redis::Redis;
use crate::config::channels::Announce;
use crate::config::ChannelOptions;
use crate::error::BrokerError;

const LIBRARY: &str = include_str!("presence.lua");

/// See the module docs.
pub struct RedisStore {
    redis: Arc<Redis>,
    keys: Keys,
    node_id: String,
    channels: Vec<ChannelOptions>,
}

fn mode(a: Announce) -> u8 {
    match a {
        Announce::Quiet => 0,
        Announce::Each => 1,
        Announce::PerUser => 2,
    }
}

impl RedisStore {
    pub fn new(redis: Arc<Redis>, node_id: &str, channels: &[ChannelOptions]) -> Self {
        RedisStore {
            keys: Keys::new(&redis.prefix),
            redis,
            node_id: node_id.to_owned(),
            channels: channels.to_vec(),
        }
    }

    /// Loads the function library; the directory's resync loads it again after an outage.
    pub async fn load(&self) -> Result<(), BrokerError> {
        let code = LIBRARY.replace("__PREFIX__", &self.redis.prefix).replace(
            "__PUBLISH__",
            if self.redis.sharded_pubsub() {
                "SPUBLISH"
            } else {
                "PUBLISH"
            },
        );
        self.redis.add_library(code).await
    }

    fn mode(&self, channel: &str) -> u8 {
        mode(announce_of(&self.channels, channel))
    }

    fn add_cmd(&self, channel: &str, member: &Member) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("gw_presence_add")
            .arg(1)
            .arg(channel)
            .arg(&member.conn_id)
            .arg(member.entry(&self.node_id))
            .arg(member.user_id.as_deref().unwrap_or(""))
            .arg(self.mode(channel));
        cmd
    }

    fn remove_cmd(&self, channel: &str, conn: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("gw_presence_remove")
            .arg(1)
            .arg(channel)
            .arg(conn)
            .arg(self.mode(channel));
        cmd
    }

    fn own(&self, verb: &str) -> redis::Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(self.keys.node_presence(&self.node_id));
        cmd
    }

    /// Runs an FCALL; when Redis lost the functions (it restarted empty, and the resync has
    /// not run yet), loads them again and retries once.
    async fn fcall<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: redis::Cmd,
    ) -> Result<T, BrokerError> {
        match self.redis.call::<T>(op, cmd.clone()).await {
            Err(BrokerError::Redis(e)) if e.to_string().contains("Function not found") => {
                self.redis.load_libraries().await?;
                self.redis.call(op, cmd).await
            }
            r => r,
        }
    }
}

/// `[conn, entry, conn, entry, ...]` as members; entries that do not parse are skipped.
fn members(flat: impl IntoIterator<Item = Value>) -> Vec<Member> {
    let mut out = Vec::new();
    let mut it = flat.into_iter();
    while let (Some(_conn), Some(entry)) = (it.next(), it.next()) {
        if let Some(m) = text(entry).as_deref().and_then(Member::parse) {
            out.push(m);
        }
    }
    out
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

fn integer(v: Option<Value>) -> Option<u64> {
    match v? {
        Value::Int(i) => u64::try_from(i).ok(),
        Value::BulkString(b) => std::str::from_utf8(&b).ok()?.parse().ok(),
        _ => None,
    }
}

impl Store for RedisStore {
    fn add<'a>(
        &'a self,
        channel: &'a str,
        member: &'a Member,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut own = self.own("SADD");
            own.arg(format!("{channel} {}", member.conn_id));
            let (a, b) = tokio::join!(
                self.fcall::<i64>("presence_add", self.add_cmd(channel, member)),
                self.redis.call::<i64>("presence_add", own)
            );
            a.and(b).map(|_| ())
        })
    }

    fn remove<'a>(
        &'a self,
        channel: &'a str,
        conn: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let mut own = self.own("SREM");
            own.arg(format!("{channel} {conn}"));
            let (a, b) = tokio::join!(
                self.fcall::<i64>("presence_remove", self.remove_cmd(channel, conn)),
                self.redis.call::<i64>("presence_remove", own)
            );
            a.and(b).map(|_| ())
        })
    }

    fn add_many<'a>(
        &'a self,
        entries: &'a [(String, Member)],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            for chunk in entries.chunks(BATCH) {
                let mut cmds = Vec::with_capacity(chunk.len() + 1);
                let mut own = self.own("SADD");
                for (channel, member) in chunk {
                    cmds.push(self.add_cmd(channel, member));
                    own.arg(format!("{channel} {}", member.conn_id));
                }
                cmds.push(own);
                self.redis.batch("presence_add", cmds).await?;
            }
            Ok(())
        })
    }

    fn remove_many<'a>(
        &'a self,
        entries: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            for chunk in entries.chunks(BATCH) {
                let mut cmds = Vec::with_capacity(chunk.len() + 1);
                let mut own = self.own("SREM");
                for (channel, conn) in chunk {
                    cmds.push(self.remove_cmd(channel, conn));
                    own.arg(format!("{channel} {conn}"));
                }
                cmds.push(own);
                self.redis.batch("presence_remove", cmds).await?;
            }
            Ok(())
        })
    }

    fn list<'a>(
        &'a self,
        channel: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL_RO");
            cmd.arg("gw_presence").arg(1).arg(channel).arg(max);
            let Value::Array(items) = self.fcall::<Value>("presence", cmd).await? else {
                return Err(BrokerError::Malformed("gw_presence reply"));
            };
            let mut it = items.into_iter();
            let truncated = integer(it.next()) == Some(1);
            let mut members = members(it);
            members.truncate(max);
            Ok(Listing { members, truncated })
        })
    }

    fn page<'a>(
        &'a self,
        channel: &'a str,
        cursor: Option<&'a str>,
        count: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("HSCAN");
            cmd.arg(self.keys.presence(channel))
                .arg(cursor.unwrap_or("0"))
                .arg("COUNT")
                .arg(count.max(1));
            let (next, flat): (String, Vec<Value>) = self.redis.call("presence_page", cmd).await?;
            Ok(Page {
                members: members(flat),
                cursor: (next != "0").then_some(next),
            })
        })
    }

    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Stats, BrokerError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("FCALL_RO");
            cmd.arg("gw_presence_stats").arg(1).arg(channel);
            let (num_clients, num_users): (u64, u64) = self.fcall("presence_stats", cmd).await?;
            Ok(Stats {
                num_clients,
                num_users,
            })
        })
    }

    fn purge_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<usize, BrokerError>> {
        Box::pin(async move {
            let key = self.keys.node_presence(node);
            let mut all = redis::cmd("SMEMBERS");
            all.arg(&key);
            let entries: Vec<String> = self.redis.call("presence_purge", all).await?;
            // Grouped by channel only to keep each batch's commands in a few slots.
            let mut by_channel: HashMap<&str, Vec<&str>> = HashMap::new();
            for e in &entries {
                if let Some((channel, conn)) = e.split_once(' ') {
                    by_channel.entry(channel).or_default().push(conn);
                }
            }
            let cmds: Vec<redis::Cmd> = by_channel
                .iter()
                .flat_map(|(channel, conns)| conns.iter().map(|c| self.remove_cmd(channel, c)))
                .collect();
            let mut cmds = cmds.into_iter().peekable();
            while cmds.peek().is_some() {
                let batch: Vec<redis::Cmd> = cmds.by_ref().take(BATCH).collect();
                self.redis.batch("presence_purge", batch).await?;
            }
            let mut del = redis::cmd("DEL");
            del.arg(&key);
            self.redis.call::<i64>("presence_purge", del).await?;
            Ok(entries.len())
        })
    }

    fn start(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.load())
    }
}
