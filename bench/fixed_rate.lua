-- A neighbour's load at a fixed offered rate, for bench/reload.py (run with wrk -t1).
--
-- wrk alone is a closed loop: each connection sends its next request once the last one
-- is answered, so it measures a saturated server. This script spaces the requests on a
-- schedule of `rate` per second (args: rate, output file, path prefix): when a
-- connection is free (its last response read) it claims the next slot of the schedule
-- and waits for it (delay(), whole milliseconds, rounded up).
--
-- Each request carries its slot (µs, CLOCK_MONOTONIC) as its key; the server echoes it.
-- response() writes one row per response to the output file:
--   status slot_us sent_us received_us claimed_late inflight
-- claimed_late is 1 when the slot had already passed when a connection claimed it: no
-- connection was free at the slot (the server held every one of them), so the request
-- left late because of the server and is timed from its slot (no coordinated omission).
-- A slot claimed in advance by a free connection and sent late was delayed by wrk
-- itself (its timers or its thread late): bench/reload.py times it from when it left
-- (and counts such requests). inflight: requests in flight when this one left.
-- Every 200 responses a row "S now_us ran_ns waited_ns" gives the wrk thread's
-- /proc/thread-self/schedstat (CPU time, time runnable but waiting for a CPU).
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } xcore_timespec;
int clock_gettime(int clk_id, xcore_timespec *tp);
]]
local ts = ffi.new("xcore_timespec")

local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local interval, out, prefix, next_slot
-- slots claimed by delay(), in order, for the request() calls that follow (timers fire in
-- the order of their slots; ties within a millisecond may swap, an error below 1 ms)
local claimed, head, tail = {}, 1, 0
-- per slot key: when its request left, whether its slot was claimed after it passed
local sent, late = {}, {}
local inflight, responses = 0, 0

function init(args)
  interval = 1e6 / tonumber(args[1])
  out = assert(io.open(args[2], "w"))
  prefix = args[3]
end

local function claim(now)
  if next_slot == nil then
    next_slot = now
  end
  local slot = next_slot
  next_slot = slot + interval
  return slot
end

function delay()
  local now = now_us()
  local slot = claim(now)
  tail = tail + 1
  claimed[tail] = slot
  local wait = (slot - now) / 1000
  if wait <= 0 then
    late[string.format("%.0f", slot)] = true
    return 0
  end
  return math.ceil(wait)
end

function request()
  local now = now_us()
  local slot
  if head <= tail then
    slot = claimed[head]
    claimed[head] = nil
    head = head + 1
  else
    slot = claim(now)
    if now - slot > 0 then
      late[string.format("%.0f", slot)] = true
    end
  end
  local key = string.format("%.0f", slot)
  sent[key] = { now, inflight }
  inflight = inflight + 1
  return wrk.format("GET", prefix .. key)
end

local function schedstat(now)
  local f = io.open("/proc/thread-self/schedstat", "r")
  if f == nil then
    return
  end
  local ran, waited = f:read("*n", "*n")
  f:close()
  if ran ~= nil then
    out:write(string.format("S %.0f %d %d\n", now, ran, waited))
  end
end

function response(status, headers, body)
  local now = now_us()
  inflight = inflight - 1
  local key = body
  local info = sent[key]
  if info == nil then
    out:write(string.format("%d -1 -1 -1 0 0\n", status))
  else
    sent[key] = nil
    local flag = 0
    if late[key] then
      flag = 1
      late[key] = nil
    end
    out:write(string.format("%d %s %.0f %.0f %d %d\n", status, key, info[1], now, flag, info[2]))
  end
  responses = responses + 1
  if responses % 200 == 1 then
    schedstat(now)
  end
end
