"""What the Redis backplane keeps in Redis: the name of every key and
channel, and the Lua scripts that change them, each atomically.

Every key starts with KEY_PREFIX. A stream's keys and its channel carry the
stream's id in braces (a Redis Cluster hash tag: one stream, one slot). The
broker's side of it all, which runs these scripts and reads these keys, is
backplane.py; this module holds no connection and imports no Redis client.
"""

from __future__ import annotations

# Every key starts with this, so one Redis may hold other data too.
KEY_PREFIX = "zchat:"
EVENTS_CHANNEL = KEY_PREFIX + "events"  # shared: presence, rooms' members and topics
STREAMS_KEY = KEY_PREFIX + "streams"  # the set of every stream with events
EPOCH_KEY = KEY_PREFIX + "epoch"
ALIVE_PREFIX = KEY_PREFIX + "alive:"  # + a broker's id: exists while it runs
BROKERS_KEY = KEY_PREFIX + "brokers"  # the set of every broker's id that may hold users
REAP_PREFIX = KEY_PREFIX + "reap:"  # + a dead broker's id: the lock of the one that reaps it
SESSION_PREFIX = KEY_PREFIX + "session:"  # + a token's digest: that session's record

# Deletes the session records a dead broker still owns (a client that
# failed over in time has its record written by its new broker, which
# owns it now), and that broker's set of them. ARGV: key prefix, broker.
REAP_SESSIONS_SCRIPT = """
local prefix, broker = ARGV[1], ARGV[2]
local owned = prefix .. 'b:' .. broker .. ':sessions'
local gone = 0
for _, token in ipairs(redis.call('SMEMBERS', owned)) do
  local record = prefix .. 'session:' .. token
  if redis.call('HGET', record, 'broker') == broker then
    redis.call('DEL', record)
    gone = gone + 1
  end
end
redis.call('DEL', owned)
return gone
"""

# KEYS: none (the keys are built from ARGV; see README "Scaling out" for
# what Redis Cluster needs instead). ARGV: key prefix, history, ids
# remembered, this broker's id, the set of brokers not reaped (a name
# held by a broker that is not in it is free: a broker whose liveness key
# merely lapsed, say while Redis restarted, still holds its names until it
# is reaped), the presence threshold (--presence-threshold: members above
# which a room's presence is counted, not stored); then the names this
# broker now holds, as a count and (name key, secret digest, the broker
# whose session of it this one took over, whose hold then does not count
# against it, or "") each; the names it gave up, as a count and name
# keys; who is now online here or
# not, as a count and (name key, name or "" for offline) each, kept in a
# hash per broker and told to the others; the session records to write,
# as a count and (token digest, name key or "" to delete it, secret
# digest, quiet "1" or "", rooms as JSON) each: the record is this
# broker's (owner "broker", and in its set b:ID:sessions, which the reaper
# of a dead broker deletes), a record of a refused name is not written,
# and one is deleted only by its owner; then six per new event:
# stream, kind, name key, message id, the event's JSON with seq 0, and the
# broker on whose behalf (this one, or a dead one whose users leave).
#
# Kinds: "m" a message (its id is remembered: a resend is not stored
# again); "f" a direct message's copy for the addressee (skipped with its
# sender's copy); "p" a room's presence event of one pass, whose name key
# field carries its people as JSON [[name key, name, leave reason or "" for
# a join], ...], whose message id field carries the room's name, and whose
# JSON has empty "joined" and "left": a person
# joins when the first broker where that user is in the room enters and
# leaves when the last leaves (a person on several brokers joins and leaves
# once), and the event stored names only those; "t" a room's topic (the
# name key field carries the topic, the message id field the room's name,
# both kept in the room's {room}:info hash for brokers that do not follow
# it); "" anything else. A person's name as shown is kept with the broker's
# memberships (b:ID:in, "stream name-key" -> name) for the leaves of a
# broker that dies, and in the room's members (NAME-KEY -> name). A room
# whose members go above the threshold is "counting" ({room}:counting)
# until a change leaves it at the threshold or below: its presence is not
# stored but told as a count change (each broker publishes the count, as
# main's broker does for a big room). Returns {names taken, per event: its
# seq, minus the seq of a resend accepted earlier, or 0 if not stored}.
# Each stream's new events are published on the stream's own channel
# (stream_channel), for the brokers that follow it:
# {"e": [[stream, seq, name key, message id, event JSON], ...]}; what
# every broker needs goes on EVENTS_CHANNEL:
# {"p": [[broker, name key, name or ""], ...],
#  "c": [[stream, room name, [[name key, name] joined, ...], [name key left, ...]], ...],
#  "r": [[stream, room name, joined as in "c", left as in "c", seq], ...] (a stored
#       presence event: who is in each room, for the rooms listing and who),
#  "t": [[stream, room name, topic, seq], ...]}.
APPEND_SCRIPT = """
local prefix, history, remember = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local me, brokers, threshold = ARGV[4], ARGV[5], tonumber(ARGV[6])
local taken, refused, i = {}, {}, 8
for _ = 1, tonumber(ARGV[7]) do
  local key, digest, from = ARGV[i], ARGV[i+1], ARGV[i+2]
  local holders = prefix .. 'name:' .. key
  local held = redis.call('HGETALL', holders)
  local free = true
  for h = 1, #held, 2 do
    if held[h] ~= me and held[h] ~= from then
      if redis.call('SISMEMBER', brokers, held[h]) == 0 then
        redis.call('HDEL', holders, held[h])
      elseif digest == '' or held[h+1] ~= digest then
        free = false
      end
    end
  end
  if free then
    redis.call('HSET', holders, me, digest)
  else
    taken[#taken+1] = key
    refused[key] = true
  end
  i = i + 3
end
local released = tonumber(ARGV[i])
for r = 1, released do redis.call('HDEL', prefix .. 'name:' .. ARGV[i+r], me) end
i = i + released + 1
local presence = {}
for _ = 1, tonumber(ARGV[i]) do
  local key, name = ARGV[i+1], ARGV[i+2]
  if name == '' then
    redis.call('HDEL', prefix .. 'b:' .. me .. ':online', key)
  else
    redis.call('HSET', prefix .. 'b:' .. me .. ':online', key, name)
  end
  presence[#presence+1] = {me, key, name}
  i = i + 2
end
i = i + 1
local mine = prefix .. 'b:' .. me .. ':sessions'
for _ = 1, tonumber(ARGV[i]) do
  local token, key = ARGV[i+1], ARGV[i+2]
  local record = prefix .. 'session:' .. token
  if key == '' then
    redis.call('SREM', mine, token)
    if redis.call('HGET', record, 'broker') == me then redis.call('DEL', record) end
  elseif not refused[key] then
    redis.call('HSET', record, 'broker', me, 'key', key, 'digest', ARGV[i+3],
               'quiet', ARGV[i+4], 'rooms', ARGV[i+5])
    redis.call('SADD', mine, token)
  end
  i = i + 5
end
i = i + 1
local results, notes, order, counts, skipping = {}, {}, {}, {}, false
local rooms, topics = {}, {}
while i <= #ARGV do
  local sid, kind, key, mid = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local ev, actor = ARGV[i+4], ARGV[i+5]
  local changes = nil
  i = i + 6
  local base = prefix .. '{' .. sid .. '}'
  local store, seen, topic = true, false, nil
  if kind == 't' then
    topic, key = key, ''
  end
  if kind == 'f' and skipping then
    store = false
  elseif kind == 'p' then
    local joined, left, came, went = {}, {}, {}, {}
    for _, person in ipairs(cjson.decode(key)) do
      local k, name, reason = person[1], person[2], person[3]
      local holders = base .. ':m:' .. k
      if reason == '' then
        if not refused[k] then
          redis.call('HSET', prefix .. 'b:' .. actor .. ':in', sid .. ' ' .. k, name)
          if redis.call('SADD', holders, actor) == 1 and redis.call('SCARD', holders) == 1 then
            redis.call('HSET', base .. ':members', k, name)
            joined[#joined+1] = cjson.encode(name)
            came[#came+1] = {k, name}
          end
        end
      else
        redis.call('HDEL', prefix .. 'b:' .. actor .. ':in', sid .. ' ' .. k)
        if redis.call('SREM', holders, actor) == 1 and redis.call('SCARD', holders) == 0 then
          redis.call('HDEL', base .. ':members', k)
          left[#left+1] = '[' .. cjson.encode(name) .. ',' .. cjson.encode(reason) .. ']'
          went[#went+1] = k
        end
      end
    end
    key = ''
    redis.call('HSETNX', base .. ':info', 'name', mid)
    store = #joined + #left > 0
    if store then
      local counting = redis.call('EXISTS', base .. ':counting') == 1
      if redis.call('HLEN', base .. ':members') > threshold then
        redis.call('SET', base .. ':counting', '1')
        counting = true
      elseif counting then
        redis.call('DEL', base .. ':counting')  -- this change still counted, the next told
      end
      if counting then
        store = false
        counts[#counts+1] = {sid, mid, came, went}
        redis.call('SADD', prefix .. 'streams', sid)  -- its members load with it
      else
        changes = {sid, mid, came, went}
        local at = string.find(ev, '"joined":[],"left":[]', 1, true)
        ev = string.sub(ev, 1, at - 1) .. '"joined":[' .. table.concat(joined, ',')
             .. '],"left":[' .. table.concat(left, ',') .. ']' .. string.sub(ev, at + 21)
      end
    end
  end
  if kind ~= 'f' then skipping = false end
  if kind == 'm' then
    seen = redis.call('HGET', base .. ':ids', key .. ' ' .. mid)
  end
  if seen then
    results[#results+1] = -tonumber(seen)
    skipping = true
  elseif not store then
    results[#results+1] = 0
  else
    local seq = redis.call('INCR', base .. ':n')
    redis.call('XADD', base .. ':x', 'MAXLEN', '~', history, seq .. '-0',
               'e', ev, 'k', key, 'i', kind == 'm' and mid or '')
    if kind == 'm' then
      local field = key .. ' ' .. mid
      redis.call('HSET', base .. ':ids', field, seq)
      redis.call('RPUSH', base .. ':idq', field)
      if redis.call('LLEN', base .. ':idq') > remember then
        redis.call('HDEL', base .. ':ids', redis.call('LPOP', base .. ':idq'))
      end
    end
    if seq == 1 then redis.call('SADD', prefix .. 'streams', sid) end
    results[#results+1] = seq
    if not notes[sid] then
      notes[sid] = {}
      order[#order+1] = sid
    end
    local note = notes[sid]
    note[#note+1] = {sid, seq, kind == 'm' and key or '', kind == 'm' and mid or '', ev}
    if changes then
      changes[5] = seq
      rooms[#rooms+1] = changes
    end
    if topic then
      redis.call('HSET', base .. ':info', 'topic', topic, 'name', mid)
      topics[#topics+1] = {sid, mid, topic, seq}
    end
  end
end
if #presence > 0 or #counts > 0 or #rooms > 0 or #topics > 0 then
  redis.call('PUBLISH', prefix .. 'events',
             cjson.encode({p = presence, c = counts, r = rooms, t = topics}))
end
for _, sid in ipairs(order) do
  redis.call('PUBLISH', prefix .. '{' .. sid .. '}:events', cjson.encode({e = notes[sid]}))
end
return {taken, results}
"""


def stream_key(stream: str, kind: str) -> str:
    """A stream's key of one kind: n (counter), x (Redis Stream), ids, idq,
    members (a room's, name key -> name), m:NAME-KEY (the brokers where
    that user is in the room).
    The braces are a Cluster hash tag: one stream's keys share a slot."""
    return f"{KEY_PREFIX}{{{stream}}}:{kind}"


def stream_channel(stream: str) -> str:
    """The channel of a stream's new events: hash-tagged as its keys are, so
    that with Cluster's sharded pub/sub it lives in the stream's slot."""
    return stream_key(stream, "events")


def channel_stream(channel: bytes) -> str | None:
    """The stream of a channel from stream_channel; None for another channel."""
    text = channel.decode()
    head, tail = KEY_PREFIX + "{", "}:events"
    return text[len(head):-len(tail)] if text.startswith(head) and text.endswith(tail) else None
