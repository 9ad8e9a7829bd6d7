-- A neighbour's load at a fixed offered rate, for bench/reload.py (run with wrk -t1).
--
-- wrk alone is a closed loop: each connection sends its next request once the last one
-- is answered, so it measures a saturated server. This script spaces the requests on a
-- schedule of `rate` per second (args: rate, output file, path prefix): before each
-- request a connection claims the next slot of the schedule and waits for it (delay(),
-- whole milliseconds, rounded up).
-- A request sent more than `late_us` after its slot (every connection was waiting on the
-- server) is stamped with its slot, not with the time it left, so a stall counts every
-- request that should have been sent during it (no coordinated omission); otherwise it
-- is stamped when sent. The server echoes the stamp; response() writes
-- "status stamp_us latency_us" per response to the output file.
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
local late_us = 2000
-- slots claimed by delay(), in order, for the request() calls that follow (timers fire in
-- the order of their slots; ties within a millisecond may swap, an error below 1 ms)
local claimed, head, tail = {}, 1, 0

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
  end
  local stamp = now
  if now - slot > late_us then
    stamp = slot
  end
  return wrk.format("GET", prefix .. string.format("%.0f", stamp))
end

function response(status, headers, body)
  local stamp = tonumber(body)
  local now = now_us()
  if stamp == nil then
    out:write(string.format("%d -1 -1\n", status))
  else
    out:write(string.format("%d %.0f %.0f\n", status, stamp, now - stamp))
  end
end
