-- wrk script for quorumd and etcd: one POST per request with a body made unique per run, thread and
-- request. Environment: WRK_BODY (a template where $key and $key_b64 are replaced), WRK_RUN (a
-- prefix that makes the keys of this run new, optional), WRK_AUTH (an optional bearer token),
-- WRK_OK (a substring a successful reply must contain, optional).
-- Prints one JSON line at the end (requests, 2xx-and-substring ok count, errors, latency percentiles).
local body_t = os.getenv("WRK_BODY") or "{}"
local auth = os.getenv("WRK_AUTH")
local must = os.getenv("WRK_OK")
local run = os.getenv("WRK_RUN") or ""
local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(data)
  return ((data:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#data % 3 + 1])
end

local threads = {}
counter, ok, bad, tid = 0, 0, 0, 0  -- globals: read back through thread:get()

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if auth and auth ~= "" then wrk.headers["Authorization"] = "Bearer " .. auth end
end

function request()
  counter = counter + 1
  local key = "w" .. run .. tid .. "-" .. counter
  local body = body_t:gsub("%$key_b64", b64(key)):gsub("%$key", key)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 and (not must or must == "" or body:find(must, 1, true)) then
    ok = ok + 1
  else
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local okt, badt = 0, 0
  for _, t in ipairs(threads) do
    okt = okt + t:get("ok")
    badt = badt + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"ok":%d,"bad":%d,"duration_us":%d,"socket_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, okt, badt, summary.duration, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
