#!lua name=gw_presence
-- Presence: who is subscribed to a presence channel, with O(1) counts, and the join and
-- leave announcements. Loaded by every node at start and after Redis comes back
-- (FUNCTION LOAD REPLACE). The node fills in __PREFIX__ and __PUBLISH__ (PUBLISH, or SPUBLISH
-- with sharded pub/sub). Keys, all in the slot of {<channel>}:
--   <P>pres:{<channel>}    hash  conn_id -> {"conn_id","user_id","info","node"} (JSON)
--   <P>presu:{<channel>}   hash  user_id -> connections of that user in the channel
-- HLEN of the first is the number of clients, HLEN of the second the number of users
-- (anonymous connections are not in it). Announcements go to <P>ch:<channel> behind the
-- header line "\30event=join\n" or "\30event=leave\n", with the member's JSON as the data.
-- <mode>: 0 announces nothing, 1 every connection, 2 a user's first join and last leave
-- (an anonymous connection counts as a user of its own).
local P = '__PREFIX__'
local PUBLISH = '__PUBLISH__'

local function announce(channel, event, entry)
  redis.call(PUBLISH, P .. 'ch:' .. channel, '\30event=' .. event .. '\n' .. entry)
end

-- FCALL gw_presence_add 1 <channel> <conn_id> <entry json> <user_id or ''> <mode>
-- -> 1 when the connection is new in the channel, 0 when it was there (entry replaced).
redis.register_function('gw_presence_add', function(keys, args)
  local tag = '{' .. keys[1] .. '}'
  local conn, entry, user, mode = args[1], args[2], args[3], tonumber(args[4])
  if redis.call('HSET', P .. 'pres:' .. tag, conn, entry) == 0 then
    return 0
  end
  local first = true
  if user ~= '' then
    first = redis.call('HINCRBY', P .. 'presu:' .. tag, user, 1) == 1
  end
  if mode == 1 or (mode == 2 and first) then
    announce(keys[1], 'join', entry)
  end
  return 1
end)

-- FCALL gw_presence_remove 1 <channel> <conn_id> <mode>
-- -> 1 when the connection was in the channel, 0 when not.
redis.register_function('gw_presence_remove', function(keys, args)
  local tag = '{' .. keys[1] .. '}'
  local members, conn, mode = P .. 'pres:' .. tag, args[1], tonumber(args[2])
  local entry = redis.call('HGET', members, conn)
  if not entry then
    return 0
  end
  redis.call('HDEL', members, conn)
  local last = true
  local ok, member = pcall(cjson.decode, entry)
  local user = ok and member['user_id']
  if type(user) == 'string' then
    local users = P .. 'presu:' .. tag
    if redis.call('HINCRBY', users, user, -1) <= 0 then
      redis.call('HDEL', users, user)
    else
      last = false
    end
  end
  if mode == 1 or (mode == 2 and last) then
    announce(keys[1], 'leave', entry)
  end
  return 1
end)

-- FCALL_RO gw_presence 1 <channel> <max> -> {truncated (0 or 1), conn_id, entry, ...}
-- At most <max> members: all of them (HGETALL) when there are no more, else HSCAN pages
-- until <max> are found.
redis.register_function{function_name = 'gw_presence', flags = {'no-writes'}, callback = function(keys, args)
  local members, max = P .. 'pres:{' .. keys[1] .. '}', tonumber(args[1])
  if redis.call('HLEN', members) <= max then
    local all = redis.call('HGETALL', members)
    table.insert(all, 1, 0)
    return all
  end
  local out, cursor, n = {1}, '0', 0
  repeat
    local page = redis.call('HSCAN', members, cursor, 'COUNT', max)
    cursor = page[1]
    for i = 1, #page[2], 2 do
      if n < max then
        table.insert(out, page[2][i])
        table.insert(out, page[2][i + 1])
        n = n + 1
      end
    end
  until cursor == '0' or n >= max
  return out
end}

-- FCALL_RO gw_presence_stats 1 <channel> -> {clients, users}: two HLENs, O(1).
redis.register_function{function_name = 'gw_presence_stats', flags = {'no-writes'}, callback = function(keys, args)
  local tag = '{' .. keys[1] .. '}'
  return {redis.call('HLEN', P .. 'pres:' .. tag), redis.call('HLEN', P .. 'presu:' .. tag)}
end}
