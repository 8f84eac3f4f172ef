"""The Lua scripts ``JobStore`` runs in Redis: each reads a job record and changes it in one
atomic step, so that a terminal state is never overwritten, a part counts once however often it
finishes, and a part or stage is held by one runner at a time (its token and heartbeat, Redis
time). Each returns what the caller needs to decide its next step.
"""

# a state change (ARGV: the state, then fields set with it): 0 when the job has no record or is
# terminal already, or for RUNNING when it is no longer QUEUED
SET_STATE = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur or cur == 'DONE' or cur == 'FAILED' or cur == 'CANCELLED' then return 0 end
if ARGV[1] == 'RUNNING' and cur ~= 'QUEUED' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], unpack(ARGV, 2))
return 1
"""

# the scripts below begin with this: Redis's clock, in seconds, as ``now``
NOW = """
if redis.replicate_commands then redis.replicate_commands() end -- Redis < 5: TIME before writes
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# a part starts (again): -1 when it already finished (a redelivered or resent copy: nothing to
# do), -2 while another runner of it still sends heartbeats; else take the part (its token,
# a first heartbeat), count the attempt, take back the frames an earlier attempt reported
START_PART = NOW + """
local i = ARGV[1]
if redis.call('SISMEMBER', KEYS[3], i) == 1 then return -1 end
local state = redis.call('HGET', KEYS[2], i .. '.state')
local beat = tonumber(redis.call('HGET', KEYS[2], i .. '.beat') or '0') or 0
if state == 'RUNNING' and now - beat < tonumber(ARGV[4]) then return -2 end
local old = tonumber(redis.call('HGET', KEYS[2], i .. '.done') or '0')
if old > 0 then redis.call('HINCRBY', KEYS[1], 'done', -old) end
redis.call('HSET', KEYS[2], i .. '.done', 0, i .. '.state', 'RUNNING', i .. '.worker', ARGV[2],
           i .. '.started', now, i .. '.token', ARGV[3], i .. '.beat', now, i .. '.error', '')
redis.call('HSET', KEYS[1], 'updated', now)
return redis.call('HINCRBY', KEYS[2], i .. '.attempts', 1)
"""

# a heartbeat of whoever holds the lease ``ARGV[1]`` (a part's "I." or a stage's "plan." /
# "last." fields): 0 when another runner (or the watchdog) took it meanwhile
BEAT = NOW + """
if redis.call('HGET', KEYS[1], ARGV[1] .. 'token') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1] .. 'beat', now)
return 1
"""

# plan, join or summary starts: 0 while another runner of it still sends heartbeats
TAKE_STAGE = NOW + """
local token = redis.call('HGET', KEYS[1], ARGV[1] .. 'token')
local beat = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. 'beat') or '0') or 0
if token and token ~= '' and token ~= ARGV[2] and now - beat < tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1] .. 'token', ARGV[2], ARGV[1] .. 'beat', now)
return 1
"""

# a part finished: {1, n} the first time (n: distinct parts finished), {0, n} for a copy
FINISH_PART = NOW + """
local i = ARGV[1]
local n = redis.call('SCARD', KEYS[2])
if redis.call('SISMEMBER', KEYS[2], i) == 1 then return {0, n} end
redis.call('SADD', KEYS[2], i)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], i .. '.state', 'DONE', i .. '.token', '', unpack(ARGV, 3))
redis.call('HSET', KEYS[3], 'updated', now)
return {1, n + 1}
"""

# the watchdog sends a part again: only if it has not finished and no runner sent a heartbeat
# meanwhile; the old runner's token is void (it stops at its next heartbeat). Returns how many
# times the part was sent again, 0 when it was not.
RESEND_PART = NOW + """
local i = ARGV[1]
if redis.call('SISMEMBER', KEYS[2], i) == 1 then return 0 end
local beat = tonumber(redis.call('HGET', KEYS[1], i .. '.beat') or '0') or 0
if now - beat < tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], i .. '.state', 'QUEUED', i .. '.token', '', i .. '.sent_at', now,
           i .. '.error', ARGV[3])
return redis.call('HINCRBY', KEYS[1], i .. '.resent', 1)
"""
