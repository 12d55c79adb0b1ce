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
-- Stored values and TTLs are printed with string.format: '%d' (a C long,
-- 64 bits wide on 64-bit Linux) prints every count below 2^53 exactly, and
-- '%.0f' the rest.
--
-- Structure: the plain path judges the common calls (judge mode, checks
-- and credits only, with or without guards) with few tables and no helper
-- functions. Every other call, and every call it does not accept, goes to
-- the general path, which implements the whole contract. Lua creates a
-- closure for each `local function` every time the script runs, so the
-- general path's helpers are defined after the plain path has returned.
--
-- Stored values:
--   bucket:       "<level>:<stamp_ms>:<scale>:<refill_per_tick>:<tick_ms>",
--                 the BucketState fields and the refill it was written
--                 with. A bucket whose level is 0 (full) is deleted
--                 instead. A bucket is a field of a hash that contains the
--                 buckets of one hash tag and one set of middle entries
--                 (see src/limiter/keys.rs), so Redis keeps one key for
--                 them instead of one per bucket. The hash's TTL covers
--                 the bucket that needs the longest: the time until it is
--                 full again plus the slack. A write extends that TTL and
--                 never shortens it, so a bucket may outlive its own time
--                 until full. Its own end is its stamp plus the time its
--                 stored refill needs to empty its level, plus the slack:
--                 a bucket read after that end counts as missing (full),
--                 whatever the limit is now. So a field kept alive by its
--                 siblings is never refilled at a changed rate from an old
--                 stamp, and every bucket lives exactly as long as a key of
--                 its own with a TTL would.
--                 A bucket that never refills (refill_per_tick 0) must have
--                 a capacity of 0: it then never contains anything, so it is
--                 never stored and needs no TTL.
--   estimate key: "o:<amount>" for an open estimate, "s" for a settled one,
--                 with the estimate TTL, renewed on every write.
-- A stored value that is not in these formats aborts the script before it
-- writes anything.
--
-- Modes (ARGV[1]):
--   0 judge    judge the batch, as above.
--   1 reserve  judge the batch and, when its checks are allowed, record what
--              it charged in a hold key, so a release can undo it. When the
--              hold key already exists (a release got there first), do
--              nothing and reply `now_ms, 2`.
--   2 release  credit back what the hold key records, then replace it with a
--              tombstone. When no hold is recorded yet, only write the
--              tombstone, so a reserve that arrives later does nothing.
--              Reply: `now_ms, 1` when a hold was released, else `now_ms, 0`.
-- A check whose buckets span several Redis Cluster hash slots runs reserve
-- in each slot and, unless every slot allowed it, release in each slot.
-- Reports are not held: they apply in reserve mode and a release leaves them.
--
-- Hold key: "h:<units charged per operation>;<amount remembered per estimate
-- key>", comma-separated in KEYS order, or the tombstone "x". Its TTL is the
-- hold TTL (ARGV[5]).
--
-- KEYS (every key the script reads or writes, so Redis Cluster can route it;
-- the caller puts all keys of one call in one hash slot):
--   1        the hold key, in reserve and release modes only; the keys
--            below then start at 2
--   1 .. n   the hash of each operation's bucket, in operation order
--   n+1 ..   estimate keys in the order the operations use them: for each
--            operation, one key per report that has an estimate key, then
--            one key per estimate. The same key may appear more than once.
-- ARGV (decimal integers, except the bucket fields):
--   1 mode (0 judge, 1 reserve, 2 release)
--   2 n, the number of operations
--   3 bucket TTL slack in ms
--   4 estimate TTL in ms (0 remembers nothing)
--   5 hold TTL in ms (ignored in judge mode)
--   then for each operation, 10 fields:
--     capacity, scale, refill_per_tick, tick_ms,
--     check cost (-1 when the operation has no check), shadow (0 or 1),
--     credit, report count R, estimate count E,
--     the bucket's field in its hash
--   followed by R pairs (amount, keyed), where keyed 1 means the report
--   takes the next estimate key, and by E estimate amounts, each taking the
--   next estimate key.
-- Return (judge and reserve): a flat array of integers
--   now_ms, allowed (0 or 1),
--   then for each operation: level, stamp_ms, scale, fits (0 or 1),
--   charged (0 or 1), forgiven units, and one settlement per report:
--   0 unmatched, 1 unknown request, 3 duplicate, or 2 followed by the
--   settled estimate.

-- Plain path: judges a call in judge mode whose operations have no reports
-- and no estimates, with or without guards, using few tables and no helper
-- functions. It returns nil, before writing anything, for any other call
-- and for anything it does not accept: a bucket named twice, a stored
-- bucket at another scale, an unreadable value or an invalid argument. The
-- general path then judges the call from the start and fails with its own
-- messages. Both paths take the same steps in the same order, so they give
-- the same reply and the same writes.
--
-- The call's keys and arguments are keys[kb + 1 .. kb + nk] and
-- argv[ab + 1 .. ab + na], so the batch script can pass the calls packed
-- into its own KEYS and ARGV without copying them. `now` is an argument and
-- the globals are cached in the function's own locals, because a closure
-- costs more for every upvalue it captures.
local function judge_plain(now, keys, argv, kb, ab, nk, na)
  local tonumber, floor, ceil = tonumber, math.floor, math.ceil
  local format, match, call = string.format, string.match, redis.call
  local MAX_EXACT = 9007199254740992 -- 2^53
  local n = tonumber(argv[ab + 2])
  if argv[ab + 1] ~= '0' or not n or n < 1 or n % 1 ~= 0 or n > nk or 10 * n + 5 > na then
    return nil
  end

  -- Counts are integers from 0 to 2^53 - 1. For numbers at or above 0, the
  -- fractional parts (x % 1, NaN for infinity) add up to 0 only when each
  -- is 0, and a sum below 2^53 bounds each term. Valid counts whose sum
  -- reaches 2^53 go to the general path.
  local slack, estimate_ttl, hold_ttl = tonumber(argv[ab + 3]), tonumber(argv[ab + 4]), tonumber(argv[ab + 5])
  if not (slack and estimate_ttl and hold_ttl and slack >= 0 and estimate_ttl >= 0 and hold_ttl >= 0
      and slack % 1 + estimate_ttl % 1 + hold_ttl % 1 == 0
      and slack + estimate_ttl + hold_ttl < MAX_EXACT) then
    return nil
  end

  -- Decode every operation before reading anything, as the general path
  -- does. Each operation is an array: scale, capacity in sub-units,
  -- maximum level, refill_per_tick, tick_ms, check cost (-1 for none),
  -- credit, shadow flag, whether the bucket exists (set when read) and its
  -- field in its hash. A table constructor
  -- sizes the array at once, which costs less than growing it one field at
  -- a time.
  local ops = {}
  for i = 1, n do
    local a = ab + 10 * i - 4 -- the first field of operation i
    if argv[a + 7] ~= '0' or argv[a + 8] ~= '0' then
      return nil -- reports or estimates
    end
    local key, field = keys[kb + i], argv[a + 9]
    for j = 1, i - 1 do
      if keys[kb + j] == key and ops[j][10] == field then
        return nil -- the general path writes such a bucket once per operation
      end
    end
    local capacity, scale = tonumber(argv[a]), tonumber(argv[a + 1])
    local refill, tick = tonumber(argv[a + 2]), tonumber(argv[a + 3])
    local cost, shadow, credit = tonumber(argv[a + 4]), argv[a + 5], tonumber(argv[a + 6])
    if not (capacity and scale and refill and tick and cost and credit) or (shadow ~= '0' and shadow ~= '1') then
      return nil
    end
    local counted = cost
    if cost == -1 then
      counted = 0
    end
    if not (capacity >= 0 and scale >= 1 and refill >= 0 and tick >= 1 and credit >= 0 and counted >= 0
        and capacity % 1 + scale % 1 + refill % 1 + tick % 1 + credit % 1 + counted % 1 == 0
        and tick + credit + counted < MAX_EXACT) then
      return nil
    end
    local capacity_sub = capacity * scale
    local max_level = 2 * capacity_sub
    if max_level + refill >= MAX_EXACT or (refill == 0 and capacity > 0) then
      return nil
    end
    ops[i] = {
      scale, capacity_sub, max_level, refill, tick, cost, credit, shadow == '1', false, field,
      argv[a + 1] .. ':' .. argv[a + 2] .. ':' .. argv[a + 3],
    }
  end

  -- Guards: their count at ARGV[guard_at], then the expected values. Their
  -- keys follow the bucket keys.
  local guard_at = 10 * n + 6
  local guards = 0
  if guard_at <= na then
    guards = tonumber(argv[ab + guard_at])
    if not guards or guards < 1 or guards % 1 ~= 0 or guard_at + guards > na then
      return nil
    end
  end
  -- The call's arguments end with its guards, or with its operations when
  -- it has none, and its keys end with the guard keys.
  local last_arg = guard_at - 1
  if guards > 0 then
    last_arg = guard_at + guards
  end
  if na ~= last_arg or nk ~= n + guards then
    return nil
  end
  for g = 1, guards do
    if (call('GET', keys[kb + n + g]) or '-') ~= argv[ab + guard_at + g] then
      local stale = { now, 3 }
      for h = 1, guards do
        stale[h + 2] = call('GET', keys[kb + n + h]) or '-'
      end
      return stale
    end
  end

  -- Read, refill and credit every bucket, and see whether its check fits.
  -- The reply collects each state and is sized for one or two operations,
  -- the common counts.
  local reply
  if n == 1 then
    reply = { now, 1, 0, 0, 0, 0, 0, 0 }
  else
    reply = { now, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
  end
  local allowed = true
  for i = 1, n do
    local op = ops[i]
    local scale, max_level, refill = op[1], op[3], op[4]
    local level, stamp = 0, now
    local raw = call('HGET', keys[kb + i], op[10])
    if raw then
      -- The scale, refill and tick are compared as text because ARGV
      -- contains them in the same digits. A bucket written with other
      -- ones goes to the general path, which first checks whether its own
      -- end has passed.
      local level_text, stamp_text, params_text = match(raw, '^(%d+):(%d+):(%d+:%d+:%d+)$')
      if not level_text or params_text ~= op[11] then
        return nil -- unreadable, or written with other parameters
      end
      level, stamp = tonumber(level_text), tonumber(stamp_text)
      if level >= MAX_EXACT or stamp >= MAX_EXACT then
        return nil
      end
      op[9] = true
      if level > max_level then
        level = max_level
      end
      -- The steps of refill() below. For integers and a positive refill,
      -- ticks >= ceil(level / refill) is ticks * refill >= level, and a
      -- product rounded at or above 2^53 still exceeds the level.
      local elapsed = now - stamp
      if elapsed < 0 then
        elapsed = 0
      end
      local ticks = floor(elapsed / op[5])
      if level == 0 then
        stamp = now
      elseif refill > 0 and ticks * refill >= level then
        level, stamp = 0, now
      else
        level = level - ticks * refill
        stamp = stamp + ticks * op[5]
      end
    end

    local credit = op[7] * scale
    if credit >= level then
      level = 0
    else
      level = level - credit
    end

    local fits = 1
    local cost = op[6]
    if cost ~= -1 then
      if cost < 1 then
        cost = 1
      end
      if level + cost * scale > op[2] then
        fits = 0
        if not op[8] then
          allowed = false
        end
      end
    end
    local r = 6 * i - 4
    reply[r + 1], reply[r + 2], reply[r + 3], reply[r + 4] = level, stamp, scale, fits
    reply[r + 5], reply[r + 6] = 0, 0
  end

  -- Charge the fitting checks when allowed, and write every bucket as
  -- store_bucket() does. ttls[i] is the TTL bucket i needs, when written.
  if not allowed then
    reply[2] = 0
  end
  local ttls = {}
  for i = 1, n do
    local op = ops[i]
    local r = 6 * i - 4
    local scale, refill, cost, field = op[1], op[4], op[6], op[10]
    local level, stamp = reply[r + 1], reply[r + 2]
    if allowed and cost ~= -1 and reply[r + 4] == 1 then
      level = level + cost * scale
      reply[r + 1] = level
      reply[r + 5] = 1
    end
    if level == 0 then
      if op[9] then
        call('HDEL', keys[kb + i], field)
      end
    else
      -- The level, stamp and scale stay below 2^53, which '%d' prints
      -- exactly, as int() below does. A level above 0 means the bucket
      -- refills, because a bucket that never refills has a capacity of 0.
      call('HSET', keys[kb + i], field, format('%d:%d:', level, stamp) .. op[11])
      local wait = stamp + ceil(level / refill) * op[5] - now
      if wait < 0 then
        wait = 0
      end
      local ttl = wait + slack
      if ttl < 1 then
        ttl = 1
      end
      ttls[i] = ttl
    end
  end

  -- Give each hash written the longest TTL one of its buckets needs, and
  -- never shorten it: GT extends a TTL, and NX sets one on a hash this
  -- call created (every other bucket hash already has one).
  for i = 1, n do
    local ttl = ttls[i]
    if ttl then
      local key = keys[kb + i]
      for j = i + 1, n do
        if ttls[j] and keys[kb + j] == key then
          if ttls[j] > ttl then
            ttl = ttls[j]
          end
          ttls[j] = nil
        end
      end
      if ttl < MAX_EXACT then
        ttl = format('%d', ttl)
      else
        ttl = format('%.0f', ttl)
      end
      if call('PEXPIRE', key, ttl, 'GT') == 0 then
        call('PEXPIRE', key, ttl, 'NX')
      end
    end
  end
  return reply
end


-- Main part. The batch script (src/store/redis/batch.rs) keeps everything
-- above this line at its top level and runs what follows as a function of
-- each call's KEYS and ARGV.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local plain = judge_plain(now, KEYS, ARGV, 0, 0, #KEYS, #ARGV)
if plain then
  return plain
end

-- General path.

local tonumber, tostring, error, ipairs, pairs = tonumber, tostring, error, ipairs, pairs
local floor, ceil, huge = math.floor, math.ceil, math.huge
local format, match, gmatch, concat = string.format, string.match, string.gmatch, table.concat
local call = redis.call

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
  return x ~= nil and x >= 0 and x < MAX_EXACT and x == floor(x)
end

local function parse_count(text, what)
  local x = tonumber(text)
  if not is_count(x) then
    fail('invalid ' .. what .. ': ' .. tostring(text))
  end
  return x
end

-- Formats an integer without the exponent form tostring uses above 1e14.
-- '%d' prints a count below 2^53 exactly and is faster than '%.0f'.
local function int(x)
  if x < MAX_EXACT then
    return format('%d', x)
  end
  return format('%.0f', x)
end

-- Returns ceil(a * b / d) exactly for a < d, even when a * b exceeds 2^53.
-- The slow path is a binary long multiplication that keeps the product as
-- q * d + r with r < d. It compares before it adds, so no sum exceeds d.
local function mul_div_ceil(a, b, d)
  local product = a * b
  if product < MAX_EXACT then
    return ceil(product / d)
  end

  local bits = {}
  local rest = b
  while rest > 0 do
    local half = floor(rest / 2)
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
  local whole = floor(level / from)
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
  local ticks = floor(elapsed / op.tick)
  if state.level == 0 then
    state.stamp = now
    return
  end
  local needed = huge
  if op.refill > 0 then
    needed = ceil(state.level / op.refill)
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
  local room = floor((op.max_level - state.level) / op.scale)
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
  local ticks = ceil(state.level / op.refill)
  local wait = state.stamp + ticks * op.tick - now
  if wait < 0 then
    return 0
  end
  return wait
end

-- Reads a bucket: its state, and whether it is stored.
local function load_bucket(op, now, slack_ms)
  local raw = call('HGET', op.key, op.field)
  if not raw then
    return { level = 0, stamp = now, scale = op.scale }, false
  end
  local level, stamp, scale, refill_per_tick, tick = match(raw, '^(%d+):(%d+):(%d+):(%d+):(%d+)$')
  level, stamp, scale = tonumber(level), tonumber(stamp), tonumber(scale)
  refill_per_tick, tick = tonumber(refill_per_tick), tonumber(tick)
  if not (is_count(level) and is_count(stamp) and is_count(scale) and is_count(refill_per_tick)
      and is_count(tick) and refill_per_tick > 0 and tick > 0) then
    fail('unreadable bucket value at ' .. op.name)
  end
  -- The bucket's own end, under the refill it was written with. The sum
  -- can pass 2^53 only for values no caller writes; it then stays large.
  if now >= stamp + ceil(level / refill_per_tick) * tick + slack_ms then
    return { level = 0, stamp = now, scale = op.scale }, true
  end
  return { level = level, stamp = stamp, scale = scale }, true
end

-- Writes a bucket into its hash: deletes its field when full, else stores
-- it, and records in `ttls` the TTL each hash needs: the longest time until
-- one of its buckets is full again, plus the slack. Only a bucket that
-- refills can hold a level above 0 (one that never does has a capacity of
-- 0), so reset_ms() returns a time.
local function store_bucket(op, state, now, slack_ms, present, ttls)
  if state.level == 0 then
    if present then
      call('HDEL', op.key, op.field)
    end
    return
  end
  call('HSET', op.key, op.field,
    int(state.level) .. ':' .. int(state.stamp) .. ':' .. int(state.scale) .. ':' .. int(op.refill) .. ':' .. int(op.tick))
  local ttl = reset_ms(state, op, now) + slack_ms
  if ttl < 1 then
    ttl = 1
  end
  if ttl > (ttls[op.key] or 0) then
    ttls[op.key] = ttl
  end
end

-- Extends the TTL of each hash in `ttls` to at least its value, never
-- shortening it: GT extends a TTL, and NX sets one on a hash this call
-- created (every other bucket hash already has one).
local function expire_hashes(ttls)
  for key, ttl in pairs(ttls) do
    if call('PEXPIRE', key, int(ttl), 'GT') == 0 then
      call('PEXPIRE', key, int(ttl), 'NX')
    end
  end
end

local MODE_JUDGE = 0
local MODE_RESERVE = 1
local MODE_RELEASE = 2

-- Decode the operations.
local mode = parse_count(ARGV[1], 'mode')
if mode > MODE_RELEASE then
  fail('unknown mode ' .. ARGV[1])
end
local n = parse_count(ARGV[2], 'operation count')
local slack_ms = parse_count(ARGV[3], 'TTL slack')
local estimate_ttl_ms = parse_count(ARGV[4], 'estimate TTL')
local hold_ttl_ms = parse_count(ARGV[5], 'hold TTL')
local hold_key = nil
local base = 0
if mode ~= MODE_JUDGE then
  hold_key = KEYS[1]
  base = 1
  if hold_ttl_ms < 1 then
    fail('a hold needs a positive hold TTL')
  end
end
local ops = {}
local arg = 6
local key_index = base + n + 1

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
  op.key = KEYS[base + i]
  if op.key == nil then
    fail('missing bucket key ' .. (base + i))
  end
  op.capacity = next_count('capacity')
  op.scale = next_count('scale')
  op.refill = next_count('refill_per_tick')
  op.tick = next_count('tick_ms')
  if op.scale == 0 or op.tick == 0 then
    fail('scale and tick_ms must be positive for ' .. op.key)
  end
  op.capacity_sub = op.capacity * op.scale
  op.max_level = 2 * op.capacity_sub
  if op.max_level + op.refill >= MAX_EXACT then
    fail('parameters of ' .. op.key .. ' exceed 2^53')
  end

  local check = tonumber(ARGV[arg])
  arg = arg + 1
  if check == -1 then
    op.check = nil
  elseif is_count(check) then
    op.check = check
  else
    fail('invalid check cost for ' .. op.key)
  end
  op.shadow = next_count('shadow flag') == 1
  op.credit = next_count('credit')

  local report_count = next_count('report count')
  local estimate_count = next_count('estimate count')
  op.field = ARGV[arg]
  arg = arg + 1
  if op.field == nil then
    fail('missing bucket field for ' .. op.key)
  end
  -- The bucket's name in messages, and its identity within the call.
  op.name = op.key .. ' field ' .. op.field
  if op.refill == 0 and op.capacity > 0 then
    fail('the bucket ' .. op.name .. ' never refills, so its capacity must be 0')
  end
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
-- Optional account record guards, after the operations: ARGV holds their
-- count G and G expected values ('-' for no record), and KEYS ends with the
-- G record keys. When a record differs from its expected value, the script
-- replies `now_ms, 3` and the actual values ('-' for none), touching no
-- bucket, so the caller can plan again with the right tier.
local estimate_end = key_index - 1
local guard_count = 0
if ARGV[arg] ~= nil then
  guard_count = next_count('guard count')
end
local guard_expected = {}
for g = 1, guard_count do
  guard_expected[g] = ARGV[arg]
  if guard_expected[g] == nil then
    fail('missing guard value ' .. g)
  end
  arg = arg + 1
end
local guard_base = key_index
if ARGV[arg] ~= nil or KEYS[key_index + guard_count] ~= nil or (guard_count > 0 and KEYS[key_index + guard_count - 1] == nil) then
  fail('more arguments or keys than the operations use')
end
if guard_count > 0 then
  local actual = {}
  local stale = false
  for g = 1, guard_count do
    actual[g] = call('GET', KEYS[guard_base + g - 1]) or '-'
    if actual[g] ~= guard_expected[g] then
      stale = true
    end
  end
  if stale then
    local reply = { now, 3 }
    for g = 1, guard_count do
      reply[#reply + 1] = actual[g]
    end
    return reply
  end
end

-- Reads a hold key: nil when absent, false for a tombstone, else the units
-- charged per operation and the amounts remembered per estimate key.
local function read_hold()
  local raw = call('GET', hold_key)
  if not raw then
    return nil
  end
  if raw == 'x' then
    return false
  end
  local charged_text, remembered_text = match(raw, '^h:([%d,]*);([%d,]*)$')
  if charged_text == nil then
    fail('unreadable hold value at ' .. hold_key)
  end
  local hold = { charged = {}, remembered = {} }
  for part in gmatch(charged_text, '%d+') do
    hold.charged[#hold.charged + 1] = parse_count(part, 'held units')
  end
  for part in gmatch(remembered_text, '%d+') do
    hold.remembered[#hold.remembered + 1] = parse_count(part, 'held estimate')
  end
  if #hold.charged ~= n then
    fail('hold at ' .. hold_key .. ' does not match the operations')
  end
  return hold
end

if mode == MODE_RELEASE then
  local hold = read_hold()
  local released = 0
  if hold then
    -- Credit each bucket in turn, so a bucket named twice gets both credits.
    local ttls = {}
    for i = 1, n do
      local units = hold.charged[i]
      if units > 0 then
        local op = ops[i]
        local state, present = load_bucket(op, now, slack_ms)
        refill(state, op, now)
        credit(state, op, units)
        store_bucket(op, state, now, slack_ms, present, ttls)
      end
    end
    expire_hashes(ttls)
    -- Take back the estimates the reserve remembered. A settled record
    -- stays settled: its report has already been charged in full.
    local position = 0
    for i = 1, n do
      for _, estimate in ipairs(ops[i].estimates) do
        position = position + 1
        local amount = hold.remembered[position] or 0
        if amount > 0 then
          local raw = call('GET', estimate.key)
          local open = raw and tonumber(match(raw, '^o:(%d+)$'))
          if open ~= nil then
            if open <= amount then
              call('DEL', estimate.key)
            else
              call('SET', estimate.key, 'o:' .. int(open - amount), 'KEEPTTL')
            end
          end
        end
      end
    end
    released = 1
  end
  if hold ~= false then
    call('SET', hold_key, 'x', 'PX', int(hold_ttl_ms))
  end
  return { now, released }
end

if mode == MODE_RESERVE and call('EXISTS', hold_key) == 1 then
  -- A release for this call arrived first: the caller has given up on it.
  return { now, 2 }
end

-- Read every bucket and estimate before writing anything, so an unreadable
-- value aborts the batch without a partial write.
local states = {}
local present = {}
for i = 1, n do
  local state, found = load_bucket(ops[i], now, slack_ms)
  states[i] = state
  if found then
    present[ops[i].name] = true
  end
end

-- Estimate records: false when absent, SETTLED, or an open amount.
local records = {}
local changed = {}
for i = base + n + 1, estimate_end do
  local key = KEYS[i]
  if records[key] == nil then
    local raw = call('GET', key)
    if not raw then
      records[key] = false
    elseif raw == 's' then
      records[key] = SETTLED
    else
      local amount = tonumber(match(raw, '^o:(%d+)$'))
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

-- judge: charge all fitting checks, and remember their estimates. The hold
-- lists what was charged and remembered, for a release.
local held_units = {}
local held_estimates = {}
local holds_anything = false
for i = 1, n do
  local op = ops[i]
  local units = 0
  if allowed and op.check ~= nil and results[i].fits then
    states[i].level = states[i].level + op.check * op.scale
    results[i].charged = true
    units = op.check
  end
  held_units[i] = int(units)
  for _, estimate in ipairs(op.estimates) do
    local added = 0
    if results[i].charged and estimate.amount > 0 then
      local record = records[estimate.key]
      if record == false then
        put_record(estimate.key, estimate.amount)
        added = estimate.amount
      elseif record ~= SETTLED then
        put_record(estimate.key, record + estimate.amount)
        added = estimate.amount
      end
    end
    held_estimates[#held_estimates + 1] = int(added)
    if added > 0 then
      holds_anything = true
    end
  end
  if units > 0 then
    holds_anything = true
  end
end

-- Write buckets in operation order, so a bucket named twice keeps the last
-- state, as in the memory store.
local ttls = {}
for i = 1, n do
  local name = ops[i].name
  store_bucket(ops[i], states[i], now, slack_ms, present[name], ttls)
  present[name] = states[i].level ~= 0
end
expire_hashes(ttls)

for key in pairs(changed) do
  local record = records[key]
  if record == false then
    call('DEL', key)
  elseif record == SETTLED then
    call('SET', key, 's', 'PX', int(estimate_ttl_ms))
  else
    call('SET', key, 'o:' .. int(record), 'PX', int(estimate_ttl_ms))
  end
end

if mode == MODE_RESERVE and holds_anything then
  local value = 'h:' .. concat(held_units, ',') .. ';' .. concat(held_estimates, ',')
  call('SET', hold_key, value, 'PX', int(hold_ttl_ms))
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
