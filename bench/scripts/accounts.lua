-- wrk script of `make bench`: the original text routes, spread over many users.
--
--   wrk ... -s accounts.lua URL -- USERS PREFIX DEPOSIT_PERCENT
--
-- Users are PREFIX0001 .. PREFIX<USERS> (they must exist), taken round robin, each thread
-- starting at its own offset. A request is `GET /<user>/deposit/1` with DEPOSIT_PERCENT
-- percent probability, `GET /<user>/show` otherwise. Every answer other than 200 counts as an
-- error. done() prints one line, `BENCH-JSON {...}`: requests, duration, errors, non-200 by
-- status with the first such body, and latency percentiles (microseconds) for plotting.

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

local users, prefix, deposit_percent
local counter = 0
non200 = 0
statuses = ""
first_error = ""
local by_status = {}

function init(args)
  users = tonumber(args[1]) or 200
  prefix = args[2] or "bench"
  deposit_percent = tonumber(args[3]) or 50
  counter = (id or 0) * 7919
  math.randomseed(12345 + (id or 0))
end

function request()
  counter = counter + 1
  local user = string.format("%s%04d", prefix, counter % users + 1)
  if math.random(100) <= deposit_percent then
    return wrk.format("GET", "/" .. user .. "/deposit/1")
  end
  return wrk.format("GET", "/" .. user .. "/show")
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    by_status[status] = (by_status[status] or 0) + 1
    local parts = {}
    for code, count in pairs(by_status) do
      table.insert(parts, code .. ":" .. count)
    end
    statuses = table.concat(parts, ",")
    if first_error == "" then
      first_error = status .. " " .. string.sub(body or "", 1, 300)
    end
  end
end

local function quote(text)
  text = string.gsub(text, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end)
  return '"' .. text .. '"'
end

function done(summary, latency, requests)
  local non200_total, first = 0, ""
  local merged = {}
  for _, thread in ipairs(threads) do
    non200_total = non200_total + (thread:get("non200") or 0)
    local text = thread:get("statuses") or ""
    for code, count in string.gmatch(text, "(%d+):(%d+)") do
      merged[code] = (merged[code] or 0) + tonumber(count)
    end
    local e = thread:get("first_error") or ""
    if first == "" then first = e end
  end
  local status_parts = {}
  for code, count in pairs(merged) do
    table.insert(status_parts, quote(code) .. ":" .. count)
  end
  local points = {}
  local function point(p)
    table.insert(points, string.format("[%g,%d]", p, latency:percentile(p)))
  end
  for p = 1, 99 do point(p) end
  for p = 99.1, 99.85, 0.1 do point(p) end
  for _, p in ipairs({99.9, 99.95, 99.99, 99.999}) do point(p) end
  table.insert(points, string.format("[100,%d]", latency.max))
  local e = summary.errors
  io.write("BENCH-JSON {",
    '"requests":', summary.requests,
    ',"duration_us":', summary.duration,
    ',"bytes":', summary.bytes,
    ',"connect_errors":', e.connect, ',"read_errors":', e.read,
    ',"write_errors":', e.write, ',"timeouts":', e.timeout,
    ',"status_errors":', e.status,
    ',"non200":', non200_total,
    ',"statuses":{', table.concat(status_parts, ","), "}",
    ',"first_error":', quote(first),
    ',"latency_min_us":', latency.min, ',"latency_max_us":', latency.max,
    ',"latency_mean_us":', string.format("%.1f", latency.mean),
    ',"percentiles_us":[', table.concat(points, ","), "]}\n")
end
