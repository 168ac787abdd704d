#!lua name=gw_history
-- History channels: publish and append in one step, and read back. Loaded by every node at
-- start and after Redis comes back (FUNCTION LOAD REPLACE). The node fills in __PREFIX__,
-- __PUBLISH__ (PUBLISH, or SPUBLISH with sharded pub/sub) and __OPTIONS__ (its [[channels]]
-- entries with history, in order, as {lua_pattern, size, ttl_secs}), so a backend's
-- FCALL applies the same options as the nodes. Keys, all in the slot of {<channel>}:
--   <P>hist:{<channel>}          stream, entry ids <offset>-0, field d = the data; expires
--                                ttl after the last publication
--   <P>meta:{<channel>}          hash e = epoch, s = the last offset; expires ttl after the
--                                last publication or read, so that a quiet channel whose
--                                nodes check it (every heartbeat, while it has subscribers)
--                                keeps its epoch: nothing was lost, only old entries expired
--   <P>idem:{<channel>}:<key>    string "<offset> <epoch>", the first result of a key
-- Publications go to <P>ch:<channel> (<P>ch:{<channel>} with sharded pub/sub) behind the
-- header line "\30pos=<offset>:<epoch>\n".
local P = '__PREFIX__'
local PUBLISH = '__PUBLISH__'
local OPTIONS = { __OPTIONS__ }
-- With sharded pub/sub (Redis Cluster), a history channel travels on <P>ch:{<channel>}, in
-- the slot of its keys, so that this function appends and publishes on one shard.
local SHARDED = __SHARDED__

local function options(channel)
  for _, o in ipairs(OPTIONS) do
    if string.find(channel, o[1]) then return o end
  end
  return nil
end

-- The channel's epoch, made when absent: Redis lost the meta (restart, eviction) or it
-- expired, so every earlier position is void. A stale stream is dropped with it, since its
-- ids would be above the new offsets.
local function epoch_of(meta, stream, ttl)
  local e = redis.call('HGET', meta, 'e')
  if e then return e end
  local t = redis.call('TIME')
  e = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', e, 's', 0)
  redis.call('EXPIRE', meta, ttl)
  return e
end

-- FCALL gw_publish 1 <channel> <json> [<idempotency_key>] -> {offset, epoch}
-- On a channel without history: a plain publish, -> {0, ''}.
redis.register_function('gw_publish', function(keys, args)
  local channel, data, key = keys[1], args[1], args[2]
  if type(data) ~= 'string' or not pcall(cjson.decode, data) then
    return redis.error_reply('ERR data must be JSON text')
  end
  local o = options(channel)
  if o == nil then
    redis.call(PUBLISH, P .. 'ch:' .. channel, data)
    return {0, ''}
  end
  local tag = '{' .. channel .. '}'
  local meta, stream = P .. 'meta:' .. tag, P .. 'hist:' .. tag
  local idem = nil
  if key and key ~= '' then
    idem = P .. 'idem:' .. tag .. ':' .. key
    local first = redis.call('GET', idem)
    if first then
      local offset, e = string.match(first, '^(%d+) (.*)$')
      return {tonumber(offset), e}
    end
  end
  local e = epoch_of(meta, stream, o[3])
  local offset = redis.call('HINCRBY', meta, 's', 1)
  redis.call('XADD', stream, 'MAXLEN', o[2], offset .. '-0', 'd', data)
  redis.call('EXPIRE', stream, o[3])
  redis.call('EXPIRE', meta, o[3])
  if idem then redis.call('SET', idem, offset .. ' ' .. e, 'EX', o[3]) end
  local target = P .. 'ch:' .. channel
  if SHARDED then target = P .. 'ch:' .. tag end
  redis.call(PUBLISH, target, '\30pos=' .. offset .. ':' .. e .. '\n' .. data)
  return {offset, e}
end)

-- FCALL gw_history 1 <channel> <mode> <n> [<after>] -> {epoch, top, offset, data, ...}
-- mode: 'none' (only epoch and top), 'last' (the last n), 'after' (at most n after <after>).
-- Refreshes the meta's TTL (see the keys above).
redis.register_function{function_name = 'gw_history', flags = {}, callback = function(keys, args)
  local channel, mode, n = keys[1], args[1], tonumber(args[2])
  local o = options(channel)
  if o == nil then return {'', 0} end
  local tag = '{' .. channel .. '}'
  local meta, stream = P .. 'meta:' .. tag, P .. 'hist:' .. tag
  local e = epoch_of(meta, stream, o[3])
  redis.call('EXPIRE', meta, o[3])
  local top = tonumber(redis.call('HGET', meta, 's') or '0')
  local out = {e, top}
  local entries = {}
  if mode == 'last' and n > 0 then
    entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', n)
    for i = #entries, 1, -1 do
      table.insert(out, tonumber(string.match(entries[i][1], '^(%d+)')))
      table.insert(out, entries[i][2][2])
    end
  elseif mode == 'after' and n > 0 then
    entries = redis.call('XRANGE', stream, '(' .. args[3] .. '-0', '+', 'COUNT', n)
    for i = 1, #entries do
      table.insert(out, tonumber(string.match(entries[i][1], '^(%d+)')))
      table.insert(out, entries[i][2][2])
    end
  end
  return out
end}

-- FCALL gw_history_remove 1 <channel> -> 1
-- Drops the stored publications and keeps the meta: the epoch and the last offset stay, so
-- the next publication gets the next offset and positions clients hold stay valid.
redis.register_function('gw_history_remove', function(keys, args)
  local tag = '{' .. keys[1] .. '}'
  redis.call('DEL', P .. 'hist:' .. tag)
  return 1
end)
