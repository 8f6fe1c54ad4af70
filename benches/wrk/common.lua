-- Shared by every workload: prepared request pools and a JSON summary.
-- (The e2e harness prepends this file to each workload script.)

-- Client IPs spread through X-Forwarded-For (from the trusted loopback
-- peer), so per-IP rate limits are exercised but do not dominate.
function client_ip(i)
  return string.format("198.18.%d.%d", math.floor(i / 250) % 250, i % 250 + 1)
end

-- wrk.format drops wrk.headers (and so Host) when given headers: add it back,
-- or HTTP/1.1 servers such as nginx answer 400.
function req(method, path, headers, body)
  headers = headers or {}
  headers["Host"] = "bench.local"
  return wrk.format(method, path, headers, body)
end

-- wrk calls request() for every request; returning prepared strings keeps
-- the load generator cheap.
function pool_request(pool)
  local n = #pool
  local i = 0
  return function()
    i = i + 1
    if i > n then i = 1 end
    return pool[i]
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"socket_errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean))
end

-- RDVZ_DELAY_MS paces each connection: it waits that long after each answer
-- before sending the next request (a load below saturation, where latency
-- is the server's and not the scheduler's).
local pace = tonumber(os.getenv("RDVZ_DELAY_MS") or "")
if pace then
  delay = function() return pace end
end
