-- Judges one batch of bucket operations atomically inside Redis.
--
-- This script runs the steps of `judge()` in src/limiter/judge.rs and the
-- bucket arithmetic of src/limiter/bucket.rs, in the same order and with the
-- same integer results. Running it as one script makes read, refill, judge
-- and write a single atomic step and a single round trip. No other client
-- can change a bucket between the read and the write, so concurrent checks
-- never admit more than a bucket holds.
--
-- Clock: every time comes from Redis's own TIME (whole milliseconds), never
-- from the caller, so replicas with skewed clocks share one time line.
--
-- Exactness: Lua 5.1 numbers are doubles, exact for integers below 2^53.
-- Every value the script computes stays below 2^53 when the caller's
-- parameters do (capacity * scale * 2 + refill_per_tick < 2^53, which
-- RedisStore checks before it calls). Integer division uses math.floor and
-- math.ceil on the double quotient. For a, b < 2^53 the rounded quotient
-- never crosses an integer, so both give the exact integer result.
--
-- Stored values:
--   bucket key:   "<level>:<stamp_ms>:<scale>", the BucketState fields.
--                 A bucket whose level is 0 (full) is deleted instead.
--                 TTL: the time until the bucket is full again plus the
--                 slack. A bucket that never refills (refill_per_tick 0) is
--                 stored without a TTL.
--   estimate key: "o:<amount>" for an open estimate, "s" for a settled one,
--                 with the estimate TTL, renewed on every write.
-- A stored value that is not in these formats aborts the script before it
-- writes anything.
--
-- KEYS (every key the script reads or writes, so Redis Cluster can route it;
-- the caller puts all keys of a batch in one hash slot):
--   1 .. n   the bucket key of each operation, in operation order
--   n+1 ..   estimate keys in the order the operations use them: for each
--            operation, one key per report that has an estimate key, then
--            one key per estimate. The same key may appear more than once.
-- ARGV (decimal integers):
--   1 n, the number of operations
--   2 bucket TTL slack in ms
--   3 estimate TTL in ms (0 remembers nothing)
--   then for each operation, 9 fields:
--     capacity, scale, refill_per_tick, tick_ms,
--     check cost (-1 when the operation has no check), shadow (0 or 1),
--     credit, report count R, estimate count E
--   followed by R pairs (amount, keyed), where keyed 1 means the report
--   takes the next estimate key, and by E estimate amounts, each taking the
--   next estimate key.
-- Return: a flat array of integers
--   now_ms, allowed (0 or 1),
--   then for each operation: level, stamp_ms, scale, fits (0 or 1),
--   charged (0 or 1), forgiven units, and one settlement per report:
--   0 unmatched, 1 unknown request, 3 duplicate, or 2 followed by the
--   settled estimate.

local MAX_EXACT = 9007199254740992 -- 2^53

local SETTLED = -1 -- estimate record of a request id already reported

local SETTLEMENT_UNMATCHED = 0
local SETTLEMENT_UNKNOWN = 1
local SETTLEMENT_SETTLED = 2
local SETTLEMENT_DUPLICATE = 3

local function fail(message)
  error({ err = 'FRLSCRIPT ' .. message })
end

local function is_count(x)
  return x ~= nil and x >= 0 and x < MAX_EXACT and x == math.floor(x)
end

local function parse_count(text, what)
  local x = tonumber(text)
  if not is_count(x) then
    fail('invalid ' .. what .. ': ' .. tostring(text))
  end
  return x
end

-- Formats an integer without the exponent form tostring uses above 1e14.
local function int(x)
  return string.format('%.0f', x)
end

-- Returns ceil(a * b / d) exactly for a < d, even when a * b exceeds 2^53.
-- The slow path is a binary long multiplication that keeps the product as
-- q * d + r with r < d. It compares before it adds, so no sum exceeds d.
local function mul_div_ceil(a, b, d)
  local product = a * b
  if product < MAX_EXACT then
    return math.ceil(product / d)
  end

  local bits = {}
  local rest = b
  while rest > 0 do
    local half = math.floor(rest / 2)
    bits[#bits + 1] = rest - half * 2
    rest = half
  end

  local q, r = 0, 0
  for i = #bits, 1, -1 do
    q = q * 2
    if r >= d - r then
      r = r - (d - r)
      q = q + 1
    else
      r = r + r
    end
    if bits[i] == 1 then
      if r >= d - a then
        r = r - (d - a)
        q = q + 1
      else
        r = r + a
      end
    end
  end
  if r > 0 then
    q = q + 1
  end
  return q
end

-- Converts a level between sub-unit scales, rounding up (bucket.rs rescale).
-- A result above 2^53 is only ever clamped to the maximum level, so its
-- rounding does not matter.
local function rescale(level, from, to)
  if from == 0 then
    return 0
  end
  local whole = math.floor(level / from)
  local part = level - whole * from
  return whole * to + mul_div_ceil(part, to, from)
end

-- BucketState::refill
local function refill(state, op, now)
  if state.scale ~= op.scale then
    state.level = rescale(state.level, state.scale, op.scale)
    state.scale = op.scale
  end
  if state.level > op.max_level then
    state.level = op.max_level
  end

  -- A clock that went back refills nothing and keeps the stamp.
  local elapsed = now - state.stamp
  if elapsed < 0 then
    elapsed = 0
  end
  local ticks = math.floor(elapsed / op.tick)
  if state.level == 0 then
    state.stamp = now
    return
  end
  local needed = math.huge
  if op.refill > 0 then
    needed = math.ceil(state.level / op.refill)
  end
  if ticks >= needed then
    state.level = 0
    state.stamp = now
  else
    state.level = state.level - ticks * op.refill
    state.stamp = state.stamp + ticks * op.tick
  end
end

-- BucketState::fits. A product at or above 2^53 is rounded, but it stays
-- above the capacity, so the result is still exact.
local function fits(state, op, cost)
  local need = cost
  if need < 1 then
    need = 1
  end
  return state.level + need * op.scale <= op.capacity_sub
end

-- BucketState::charge_report: returns the units forgiven by the debt clamp.
local function charge_report(state, op, amount)
  local room = math.floor((op.max_level - state.level) / op.scale)
  local taken = amount
  if taken > room then
    taken = room
  end
  state.level = state.level + taken * op.scale
  return amount - taken
end

-- BucketState::credit
local function credit(state, op, amount)
  local sub = amount * op.scale
  if sub >= state.level then
    state.level = 0
  else
    state.level = state.level - sub
  end
end

-- BucketParams::wait_ms for the whole level, or nil for never.
local function reset_ms(state, op, now)
  if state.level == 0 then
    return 0
  end
  if op.refill == 0 then
    return nil
  end
  local ticks = math.ceil(state.level / op.refill)
  local wait = state.stamp + ticks * op.tick - now
  if wait < 0 then
    return 0
  end
  return wait
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- Decode the operations.
local n = parse_count(ARGV[1], 'operation count')
local slack_ms = parse_count(ARGV[2], 'TTL slack')
local estimate_ttl_ms = parse_count(ARGV[3], 'estimate TTL')
local ops = {}
local arg = 4
local key_index = n + 1

local function next_count(what)
  local x = parse_count(ARGV[arg], what)
  arg = arg + 1
  return x
end

local function next_estimate_key()
  local key = KEYS[key_index]
  if key == nil then
    fail('missing estimate key ' .. key_index)
  end
  key_index = key_index + 1
  return key
end

for i = 1, n do
  local op = {}
  op.capacity = next_count('capacity')
  op.scale = next_count('scale')
  op.refill = next_count('refill_per_tick')
  op.tick = next_count('tick_ms')
  if op.scale == 0 or op.tick == 0 then
    fail('scale and tick_ms must be positive for KEYS[' .. i .. ']')
  end
  op.capacity_sub = op.capacity * op.scale
  op.max_level = 2 * op.capacity_sub
  if op.max_level + op.refill >= MAX_EXACT then
    fail('parameters of KEYS[' .. i .. '] exceed 2^53')
  end

  local check = tonumber(ARGV[arg])
  arg = arg + 1
  if check == -1 then
    op.check = nil
  elseif is_count(check) then
    op.check = check
  else
    fail('invalid check cost for KEYS[' .. i .. ']')
  end
  op.shadow = next_count('shadow flag') == 1
  op.credit = next_count('credit')

  local report_count = next_count('report count')
  local estimate_count = next_count('estimate count')
  op.reports = {}
  for r = 1, report_count do
    local report = {}
    report.amount = next_count('report amount')
    if next_count('report key flag') == 1 then
      report.key = next_estimate_key()
    end
    op.reports[r] = report
  end
  op.estimates = {}
  for e = 1, estimate_count do
    local amount = next_count('estimate amount')
    op.estimates[e] = { key = next_estimate_key(), amount = amount }
  end
  ops[i] = op
end
if ARGV[arg] ~= nil or KEYS[key_index] ~= nil then
  fail('more arguments or keys than the operations use')
end

-- Read every bucket and estimate before writing anything, so an unreadable
-- value aborts the batch without a partial write.
local states = {}
local present = {}
for i = 1, n do
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local level, stamp, scale = string.match(raw, '^(%d+):(%d+):(%d+)$')
    level, stamp, scale = tonumber(level), tonumber(stamp), tonumber(scale)
    if not (is_count(level) and is_count(stamp) and is_count(scale)) then
      fail('unreadable bucket value at ' .. KEYS[i])
    end
    states[i] = { level = level, stamp = stamp, scale = scale }
    present[KEYS[i]] = true
  else
    states[i] = { level = 0, stamp = now, scale = ops[i].scale }
  end
end

-- Estimate records: false when absent, SETTLED, or an open amount.
local records = {}
local changed = {}
for i = n + 1, #KEYS do
  local key = KEYS[i]
  if records[key] == nil then
    local raw = redis.call('GET', key)
    if not raw then
      records[key] = false
    elseif raw == 's' then
      records[key] = SETTLED
    else
      local amount = tonumber(string.match(raw, '^o:(%d+)$'))
      if not is_count(amount) then
        fail('unreadable estimate value at ' .. key)
      end
      records[key] = amount
    end
  end
end

-- A record written with a TTL of 0 expires at once, as in the memory store.
local function put_record(key, record)
  if estimate_ttl_ms == 0 then
    records[key] = false
  else
    records[key] = record
  end
  changed[key] = true
end

-- judge: refill every bucket and apply its credit.
local results = {}
for i = 1, n do
  local op = ops[i]
  local state = states[i]
  refill(state, op, now)
  credit(state, op, op.credit)
  results[i] = { fits = true, charged = false, forgiven = 0, settlements = {} }
end

-- judge: apply reports, never denied.
for i = 1, n do
  local op = ops[i]
  local state = states[i]
  local result = results[i]
  for r, report in ipairs(op.reports) do
    local settlement
    if report.key == nil then
      result.forgiven = result.forgiven + charge_report(state, op, report.amount)
      settlement = { SETTLEMENT_UNMATCHED }
    else
      local record = records[report.key]
      if record == false then
        result.forgiven = result.forgiven + charge_report(state, op, report.amount)
        put_record(report.key, SETTLED)
        settlement = { SETTLEMENT_UNKNOWN }
      elseif record == SETTLED then
        settlement = { SETTLEMENT_DUPLICATE }
      else
        if report.amount >= record then
          result.forgiven = result.forgiven + charge_report(state, op, report.amount - record)
        else
          credit(state, op, record - report.amount)
        end
        put_record(report.key, SETTLED)
        settlement = { SETTLEMENT_SETTLED, record }
      end
    end
    result.settlements[r] = settlement
  end
end

-- judge: the checks are allowed only if every enforced bucket can pay.
local allowed = true
for i = 1, n do
  local op = ops[i]
  if op.check ~= nil then
    results[i].fits = fits(states[i], op, op.check)
    if not op.shadow and not results[i].fits then
      allowed = false
    end
  end
end

-- judge: charge all fitting checks, and remember their estimates.
if allowed then
  for i = 1, n do
    local op = ops[i]
    if op.check ~= nil and results[i].fits then
      states[i].level = states[i].level + op.check * op.scale
      results[i].charged = true
      for _, estimate in ipairs(op.estimates) do
        if estimate.amount > 0 then
          local record = records[estimate.key]
          if record == false then
            put_record(estimate.key, estimate.amount)
          elseif record ~= SETTLED then
            put_record(estimate.key, record + estimate.amount)
          end
        end
      end
    end
  end
end

-- Write buckets in operation order, so a key named twice keeps the last
-- state, as in the memory store.
for i = 1, n do
  local key = KEYS[i]
  local state = states[i]
  if state.level == 0 then
    if present[key] then
      redis.call('DEL', key)
      present[key] = false
    end
  else
    local value = int(state.level) .. ':' .. int(state.stamp) .. ':' .. int(state.scale)
    local wait = reset_ms(state, ops[i], now)
    if wait == nil then
      -- NOTE: a bucket that never refills keeps its key without a TTL,
      -- matching the memory store, which never expires it either.
      redis.call('SET', key, value)
    else
      local ttl = wait + slack_ms
      if ttl < 1 then
        ttl = 1
      end
      redis.call('SET', key, value, 'PX', int(ttl))
    end
    present[key] = true
  end
end

for key in pairs(changed) do
  local record = records[key]
  if record == false then
    redis.call('DEL', key)
  elseif record == SETTLED then
    redis.call('SET', key, 's', 'PX', int(estimate_ttl_ms))
  else
    redis.call('SET', key, 'o:' .. int(record), 'PX', int(estimate_ttl_ms))
  end
end

local reply = { now, allowed and 1 or 0 }
for i = 1, n do
  local state = states[i]
  local result = results[i]
  reply[#reply + 1] = state.level
  reply[#reply + 1] = state.stamp
  reply[#reply + 1] = state.scale
  reply[#reply + 1] = result.fits and 1 or 0
  reply[#reply + 1] = result.charged and 1 or 0
  reply[#reply + 1] = result.forgiven
  for _, settlement in ipairs(result.settlements) do
    for _, value in ipairs(settlement) do
      reply[#reply + 1] = value
    end
  end
end
return reply
