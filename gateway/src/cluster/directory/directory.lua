#!lua name=gw_v1
-- The gateway's Redis function library, version 1 (the library name carries the version).
-- Loaded by every node at start and after Redis comes back (FUNCTION LOAD REPLACE).
-- __PREFIX__ and __CLUSTER__ are filled in by the node. Keys:
--   <P>user:{<user>}      hash  conn_id -> "<node_id> <connected_ms>"
--   <P>conn:{<conn>}      string "<node_id> <connected_ms> <user_id or ->[ <secret>]"
--                         (the secret of a connection over an HTTP stream, see gw_emulate)
-- Each function declares the one key whose slot it works in, so it runs on Redis Cluster.
-- Messages to a node go to the pub/sub channel <P>node:<node_id> as
--   "D <conn> <conn>...\n<json>"   deliver {"type":"direct","data":<json>}
--   "E <conn>\n<commands>"          commands posted for a streaming connection
local P = '__PREFIX__'
local CLUSTER = __CLUSTER__

local function check(data)
  if type(data) ~= 'string' or not pcall(cjson.decode, data) then
    return redis.error_reply('ERR data must be JSON text')
  end
end

-- In a standalone Redis, PUBLISH counts the subscribers that got the message, so a node that
-- died a moment ago (its subscription gone) is not counted. Redis Cluster only counts the
-- local shard's subscribers, so there every routed connection counts.
local function deliver(node, conns, data)
  local n = redis.call('PUBLISH', P .. 'node:' .. node, 'D ' .. table.concat(conns, ' ') .. '\n' .. data)
  if n > 0 or CLUSTER then return #conns end
  return 0
end

-- FCALL gw_send_user 1 <user_id> <json> -> connections reached
redis.register_function('gw_send_user', function(keys, args)
  local bad = check(args[1])
  if bad then return bad end
  local entries = redis.call('HGETALL', P .. 'user:{' .. keys[1] .. '}')
  local nodes, order = {}, {}
  for i = 1, #entries, 2 do
    local node = string.match(entries[i + 1], '^(%S+)')
    if nodes[node] == nil then
      nodes[node] = {}
      table.insert(order, node)
    end
    table.insert(nodes[node], entries[i])
  end
  local reached = 0
  for _, node in ipairs(order) do
    reached = reached + deliver(node, nodes[node], args[1])
  end
  return reached
end)

-- FCALL gw_send_conn 1 <conn_id> <json> -> 1 or 0
redis.register_function('gw_send_conn', function(keys, args)
  local bad = check(args[1])
  if bad then return bad end
  local entry = redis.call('GET', P .. 'conn:{' .. keys[1] .. '}')
  if not entry then return 0 end
  return deliver(string.match(entry, '^(%S+)'), {keys[1]}, args[1])
end)

-- FCALL gw_emulate 1 <conn_id> <secret> <commands> -> 1 (sent to the node that holds it) or 0
-- Commands a client posted (Centrifugo's /emulation) on whichever node it reached: sent on
-- only with the secret recorded for that connection.
redis.register_function('gw_emulate', function(keys, args)
  local entry = redis.call('GET', P .. 'conn:{' .. keys[1] .. '}')
  if not entry then return 0 end
  local node, secret = string.match(entry, '^(%S+) %S+ %S+ (%S+)$')
  if secret == nil or secret ~= args[1] then return 0 end
  local n = redis.call('PUBLISH', P .. 'node:' .. node, 'E ' .. keys[1] .. '\n' .. args[2])
  if n > 0 or CLUSTER then return 1 end
  return 0
end)

-- FCALL gw_add_conn 1 <user_id> <conn_id> <node_id> <connected_ms> <max>
-- Adds a connection to its user unless the user already has <max> (0: no cap): 1 or 0.
redis.register_function('gw_add_conn', function(keys, args)
  local key = P .. 'user:{' .. keys[1] .. '}'
  local max = tonumber(args[4])
  if max > 0 and redis.call('HLEN', key) >= max and redis.call('HEXISTS', key, args[1]) == 0 then
    return 0
  end
  redis.call('HSET', key, args[1], args[2] .. ' ' .. args[3])
  return 1
end)
