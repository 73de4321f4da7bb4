-- wrk script: POST /ingest with realistic log packets and a unique packet_id per request.
--
--   wrk -t2 -c64 -d10s -s loadtest/wrk_ingest.lua http://127.0.0.1:8080/ingest -- NONCE fixed|skewed
--
-- NONCE keeps packet ids unique across runs against the same (deduplicating)
-- analyzers. fixed: 10 messages per packet (~1.8 KB); skewed: 5 and 20 messages
-- alternately (nginx balances requests, the distributor balances messages).
-- The packet_id ends in "-m<messages>" and the distributor echoes it in its 202
-- body, so accepted messages are counted exactly from the answers.
-- done() prints machine-readable lines "wrk-result KEY VALUE" (parsed by
-- loadtest/bench.py); per-thread counters are summed there.
local threads = {}
local counter = 0
local nonce = "x"
local skewed = false
local arrays = {}
-- per-thread globals read by done() via thread:get()
n202, n2xx, n429, n503, nother, msgs202 = 0, 0, 0, 0, 0, 0

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
  arrays[5] = array(5, tid * 100)
  arrays[10] = array(10, tid * 100 + 20)
  arrays[20] = array(20, tid * 100 + 40)
end

local headers = {["Content-Type"] = "application/json"}

function request()
  counter = counter + 1
  local n = 10
  if skewed then
    if counter % 2 == 0 then n = 20 else n = 5 end
  end
  local body = '{"emitter_id":"wrk-' .. tid .. '","packet_id":"wrk-' .. nonce .. '-' .. tid .. '-' .. counter ..
    '-m' .. n .. '","messages":' .. arrays[n] .. '}'
  return wrk.format("POST", nil, headers, body)
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
  elseif status == 429 then
    n429 = n429 + 1
  else
    nother = nother + 1
  end
end

function done(summary, latency, requests)
  local totals = {n202 = 0, n2xx = 0, n429 = 0, n503 = 0, nother = 0, msgs202 = 0}
  for _, thread in ipairs(threads) do
    for key, _ in pairs(totals) do
      totals[key] = totals[key] + (thread:get(key) or 0)
    end
  end
  local e = summary.errors
  local out = {
    {"requests", summary.requests}, {"duration_us", summary.duration}, {"bytes", summary.bytes},
    {"status_202", totals.n202}, {"status_2xx", totals.n2xx}, {"status_429", totals.n429},
    {"status_503", totals.n503}, {"status_other", totals.nother}, {"messages_202", totals.msgs202},
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
end
