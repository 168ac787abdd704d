//! Presence of a single node without Redis: the same maps as the Redis keys, in memory.
//! Announcements go straight to the sink (the hub's delivery), with the same header lines a
//! Redis announcement has.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{announce_of, Listing, Member, Page, Stats, Store};
use crate::broker::{announced, BoxFuture, Sink};
use crate::config::channels::Announce;
use crate::config::ChannelOptions;
use crate::error::BrokerError;

#[derive(Default)]
struct Channel {
    /// conn → (member, its stored entry).
    members: BTreeMap<String, (Member, String)>,
    /// user → connections in the channel.
    users: HashMap<String, u64>,
}

/// See the module docs.
pub struct MemoryStore {
    node_id: String,
    channels: Vec<ChannelOptions>,
    sink: Sink,
    state: Mutex<HashMap<String, Channel>>,
}

impl MemoryStore {
    pub fn new(node_id: &str, channels: &[ChannelOptions], sink: Sink) -> Self {
        MemoryStore {
            node_id: node_id.to_owned(),
            channels: channels.to_vec(),
            sink,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// As `gw_presence_add`. The lock is held across the announcement, as a Redis function
    /// runs, so announcements come in the order of the changes.
    fn add_one(&self, state: &mut HashMap<String, Channel>, channel: &str, member: &Member) {
        let entry = member.entry(&self.node_id);
        let c = state.entry(channel.to_owned()).or_default();
        let new = c
            .members
            .insert(member.conn_id.clone(), (member.clone(), entry.clone()))
            .is_none();
        if !new {
            return;
        }
        let first = match &member.user_id {
            Some(u) => {
                let n = c.users.entry(u.clone()).or_default();
                *n += 1;
                *n == 1
            }
            None => true,
        };
        match announce_of(&self.channels, channel) {
            Announce::Each => (self.sink)(channel, &announced("join", &entry)),
            Announce::PerUser if first => (self.sink)(channel, &announced("join", &entry)),
            _ => {}
        }
    }

    /// As `gw_presence_remove`.
    fn remove_one(&self, state: &mut HashMap<String, Channel>, channel: &str, conn: &str) -> bool {
        let Some(c) = state.get_mut(channel) else {
            return false;
        };
        let Some((member, entry)) = c.members.remove(conn) else {
            return false;
        };
        let mut last = true;
        if let Some(u) = &member.user_id {
            if let Some(n) = c.users.get_mut(u) {
                *n -= 1;
                last = *n == 0;
                if last {
                    c.users.remove(u);
                }
            }
        }
        if c.members.is_empty() {
            state.remove(channel);
        }
        match announce_of(&self.channels, channel) {
            Announce::Each => (self.sink)(channel, &announced("leave", &entry)),
            Announce::PerUser if last => (self.sink)(channel, &announced("leave", &entry)),
            _ => {}
        }
        true
    }
}

fn ready<'a, T: Send + 'a>(v: T) -> BoxFuture<'a, Result<T, BrokerError>> {
    Box::pin(async move { Ok(v) })
}

impl Store for MemoryStore {
    fn add<'a>(
        &'a self,
        channel: &'a str,
        member: &'a Member,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.add_one(&mut self.state(), channel, member);
        ready(())
    }

    fn remove<'a>(
        &'a self,
        channel: &'a str,
        conn: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.remove_one(&mut self.state(), channel, conn);
        ready(())
    }

    fn add_many<'a>(
        &'a self,
        entries: &'a [(String, Member)],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let mut state = self.state();
        for (channel, member) in entries {
            self.add_one(&mut state, channel, member);
        }
        ready(())
    }

    fn remove_many<'a>(
        &'a self,
        entries: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        let mut state = self.state();
        for (channel, conn) in entries {
            self.remove_one(&mut state, channel, conn);
        }
        ready(())
    }

    fn list<'a>(
        &'a self,
        channel: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, BrokerError>> {
        let state = self.state();
        let listing = match state.get(channel) {
            Some(c) => Listing {
                members: c
                    .members
                    .values()
                    .take(max)
                    .map(|(m, _)| m.clone())
                    .collect(),
                truncated: c.members.len() > max,
            },
            None => Listing::default(),
        };
        ready(listing)
    }

    fn page<'a>(
        &'a self,
        channel: &'a str,
        cursor: Option<&'a str>,
        count: usize,
    ) -> BoxFuture<'a, Result<Page, BrokerError>> {
        let state = self.state();
        let Some(c) = state.get(channel) else {
            return ready(Page::default());
        };
        // The cursor is the last conn_id of the previous page.
        let after = cursor.unwrap_or("");
        let mut members: Vec<Member> = c
            .members
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(count.max(1) + 1)
            .map(|(_, (m, _))| m.clone())
            .collect();
        let more = members.len() > count.max(1);
        members.truncate(count.max(1));
        let cursor = if more {
            members.last().map(|m| m.conn_id.clone())
        } else {
            None
        };
        ready(Page { members, cursor })
    }

    fn stats<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<Stats, BrokerError>> {
        let stats = self
            .state()
            .get(channel)
            .map_or(Stats::default(), |c| Stats {
                num_clients: c.members.len() as u64,
                num_users: c.users.len() as u64,
            });
        ready(stats)
    }

    fn purge_node<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<usize, BrokerError>> {
        let mut state = self.state();
        let mut n = 0;
        if node == self.node_id {
            let all: Vec<(String, String)> = state
                .iter()
                .flat_map(|(ch, c)| c.members.keys().map(|k| (ch.clone(), k.clone())))
                .collect();
            for (channel, conn) in all {
                n += usize::from(self.remove_one(&mut state, &channel, &conn));
            }
        }
        ready(n)
    }
}
