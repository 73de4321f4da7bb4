-- wrk script: POST /ingest with realistic log packets and a unique packet_id per request.
--
--   wrk -t2 -c64 -d10s -s loadtest/wrk_ingest.lua http://127.0.0.1:8080/ingest -- NONCE fixed|skewed 64
--
-- NONCE keeps packet ids unique across runs against the same (deduplicating)
-- analyzers. fixed: 10 messages per packet (~1.8 KB); skewed: 5 and 20 messages
-- alternately (nginx balances requests, the distributor balances messages).
-- The third argument repeats -c (needed to undo wrk's latency correction, below).
-- The packet_id ends in "-m<messages>" and the distributor echoes it in its 202
-- body, so accepted messages are counted exactly from the answers.
-- skewed: each request also carries "X-Messages: n", so free (nginx) sinks
-- behind an nginx proxy can log the messages they received.
-- 503 answers that carry a Retry-After header are counted (status_503_retry_after).
--
-- done() prints machine-readable lines "wrk-result KEY VALUE" (parsed by
-- loadtest/generators.py); per-thread counters are summed there.
--
-- Latency. wrk records one sample per answer whatever its status (202, 503,
-- 429, anything): the percentiles are over ALL answers (answers slower than
-- --timeout are left out and counted in errors_timeout). But wrk 4 then
-- "corrects" its histogram for coordinated omission before done() sees it
-- (stats_correct in wrk.c: every sample n >= 2e adds synthetic samples at
-- n-e, n-2e, ... down to e, where e = duration / (requests / connections) is
-- a connection's mean time between requests). Those corrected figures estimate
-- what an open-loop client would have seen, not what the answers took: one
-- 1-second stall can move the p99 by hundreds of ms. The correction is exact
-- and invertible (raw(m) = corrected(m) - corrected(m + e) for m > e), so the
-- script reads wrk's histogram through the LuaJIT FFI (struct stats { count,
-- limit, min, max, data[] }) and prints both:
--   latency_p*_us / wrk-quantile P US          wrk's corrected figures
--   raw_latency_p*_us / wrk-raw-quantile P US  the answers as measured
-- plus raw_count (must equal the answers counted above, minus timeouts) and
-- raw_mean_us (closed loop: connections / answers per second, Little's law).
-- The quantile lines let the benchmark merge several wrk processes.
local threads = {}
local counter = 0
local nonce = "x"
local skewed = false
local arrays = {}
-- per-thread globals read by done() via thread:get()
n202, n2xx, n429, n503, n503ra, nother, msgs202 = 0, 0, 0, 0, 0, 0, 0

local services = {"auth", "orders", "payments", "search", "gateway", "inventory", "notifications"}
local levels = {"INFO", "INFO", "INFO", "INFO", "INFO", "INFO", "INFO", "DEBUG", "DEBUG", "WARN", "WARN", "ERROR"}
local texts = {
  INFO = "GET /api/v1/orders/%d completed in %d ms for user u%d with status 200 OK",
  DEBUG = "cache lookup key=session:%08x hit=true took %d us pool active=%d",
  WARN = "slow query on orders took %d ms rows=%d for tenant t%d (threshold 250 ms)",
  ERROR = "upstream payments timed out after %d ms: connection reset by peer (attempt %d)",
}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

local function message(i)
  local level = levels[(i * 7) % #levels + 1]
  local service = services[i % #services + 1]
  local text = string.format(texts[level], 100000 + i * 37, 10 + i % 90, 5000 + i * 13)
  return string.format(
    '{"timestamp":%d,"level":"%s","message":"%s","metadata":{"service":"%s","host":"%s-%d",' ..
    '"request_id":"req-%08x","region":"eu-west-1","version":"2.14.3"}}',
    1764172800123 + i, level, text, service, service, i % 12 + 1, i * 7919)
end

local function array(n, offset)
  local parts = {}
  for i = 1, n do
    parts[i] = message(offset + i)
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function init(args)
  nonce = args[1] or tostring(os.time())
  skewed = args[2] == "skewed"
  conns = tonumber(args[3] or "0") or 0  -- global: done() reads it with thread:get
  arrays[5] = array(5, tid * 100)
  arrays[10] = array(10, tid * 100 + 20)
  arrays[20] = array(20, tid * 100 + 40)
end

local headers = {["Content-Type"] = "application/json"}
local skewed_headers = {
  [5] = {["Content-Type"] = "application/json", ["X-Messages"] = "5"},
  [20] = {["Content-Type"] = "application/json", ["X-Messages"] = "20"},
}

function request()
  counter = counter + 1
  local n = 10
  local h = headers
  if skewed then
    if counter % 2 == 0 then n = 20 else n = 5 end
    h = skewed_headers[n]
  end
  local body = '{"emitter_id":"wrk-' .. tid .. '","packet_id":"wrk-' .. nonce .. '-' .. tid .. '-' .. counter ..
    '-m' .. n .. '","messages":' .. arrays[n] .. '}'
  return wrk.format("POST", nil, h, body)
end

function response(status, hdrs, body)
  if status == 202 then
    n202 = n202 + 1
    n2xx = n2xx + 1
    local m = string.match(body, "%-m(%d+)\"")
    if m then msgs202 = msgs202 + tonumber(m) end
  elseif status >= 200 and status < 300 then
    n2xx = n2xx + 1
  elseif status == 503 then
    n503 = n503 + 1
    if hdrs["Retry-After"] or hdrs["retry-after"] then n503ra = n503ra + 1 end
  elseif status == 429 then
    n429 = n429 + 1
  else
    nother = nother + 1
  end
end

QUANTILES = {1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 91, 92, 93, 94, 95, 96, 97, 98,
             98.5, 99, 99.1, 99.2, 99.3, 99.4, 99.5, 99.6, 99.7, 99.8, 99.9, 99.95, 99.99}

-- wrk's histogram without its coordinated-omission correction (see the header), or nil
function raw_histogram(latency, summary, connections)
  local ok, ffi = pcall(require, "ffi")
  if not ok or connections <= 0 then return nil end
  local s = ffi.cast("uint64_t **", latency)[0]  -- the userdata holds a stats *: count, limit, min, max, data[]
  local count, lo, hi = tonumber(s[0]), tonumber(s[2]), tonumber(s[3])
  if count == 0 or hi < lo then return nil end
  local per = math.floor(summary.requests / connections)
  local e = 0
  if per > 0 then e = math.floor(summary.duration / per) end
  local function raw(i)
    local d = tonumber(s[4 + i])
    if e > 0 and i > e and i + e <= hi then d = d - tonumber(s[4 + i + e]) end
    return d
  end
  local total, sum = 0, 0
  for i = lo, hi do
    local r = raw(i)
    if r < 0 then return nil end  -- not the layout or the correction assumed here: print no raw figures
    total = total + r
    sum = sum + r * i
  end
  if total == 0 then return nil end
  local want = {}
  for _, p in ipairs(QUANTILES) do want[#want + 1] = p end
  for _, p in ipairs({50, 90, 99, 99.9}) do want[#want + 1] = p end
  table.sort(want)
  local at, seen, k = {}, 0, 1
  for i = lo, hi do
    seen = seen + raw(i)
    while k <= #want and seen >= math.ceil(want[k] / 100 * total) do
      at[want[k]] = i
      k = k + 1
    end
  end
  while k <= #want do at[want[k]] = hi; k = k + 1 end
  return {count = total, mean = math.floor(sum / total), interval = e, at = at}
end

function done(summary, latency, requests)
  local totals = {n202 = 0, n2xx = 0, n429 = 0, n503 = 0, n503ra = 0, nother = 0, msgs202 = 0}
  for _, thread in ipairs(threads) do
    for key, _ in pairs(totals) do
      totals[key] = totals[key] + (thread:get(key) or 0)
    end
  end
  local e = summary.errors
  local out = {
    {"requests", summary.requests}, {"duration_us", summary.duration}, {"bytes", summary.bytes},
    {"status_202", totals.n202}, {"status_2xx", totals.n2xx}, {"status_429", totals.n429},
    {"status_503", totals.n503}, {"status_503_retry_after", totals.n503ra},
    {"status_other", totals.nother}, {"messages_202", totals.msgs202},
    {"errors_connect", e.connect}, {"errors_read", e.read}, {"errors_write", e.write},
    {"errors_timeout", e.timeout}, {"errors_status", e.status},
  }
  for _, kv in ipairs(out) do
    io.write(string.format("wrk-result %s %d\n", kv[1], kv[2]))
  end
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("wrk-result latency_p%g_us %d\n", p, latency:percentile(p)))
  end
  io.write(string.format("wrk-result latency_max_us %d\n", latency.max))
  io.write(string.format("wrk-result latency_min_us %d\n", latency.min))
  for _, p in ipairs(QUANTILES) do
    io.write(string.format("wrk-quantile %g %d\n", p, latency:percentile(p)))
  end
  local raw = raw_histogram(latency, summary, threads[1] and threads[1]:get("conns") or 0)
  if raw then
    io.write(string.format("wrk-result raw_count %d\n", raw.count))
    io.write(string.format("wrk-result raw_mean_us %d\n", raw.mean))
    io.write(string.format("wrk-result correction_interval_us %d\n", raw.interval))
    for _, p in ipairs({50, 90, 99, 99.9}) do
      io.write(string.format("wrk-result raw_latency_p%g_us %d\n", p, raw.at[p]))
    end
    for _, p in ipairs(QUANTILES) do
      io.write(string.format("wrk-raw-quantile %g %d\n", p, raw.at[p]))
    end
  end
end
