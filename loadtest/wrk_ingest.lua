-- wrk script: POST /ingest with realistic log packets and a unique packet_id per request.
--
--   wrk -t2 -c64 -d10s -s loadtest/wrk_ingest.lua http://127.0.0.1:8080/ingest -- NONCE fixed|skewed 64
--   wrk ... http://127.0.0.1:8080/ingest/batch -- NONCE fixed 64 batch=100
--   wrk ... http://127.0.0.1:8080/v1/logs -- NONCE pool 64 pool=FILE packets=100 messages=10 answer=otlp
--       type=application/x-protobuf [encoding=gzip]
--
-- Options after the third argument (key=value):
--   batch=N     N packets per request, one NDJSON line each (for POST /ingest/batch), unique ids as above;
--   pool=FILE   request bodies built by the benchmark (loadtest/bench/payloads.py: "<length>\n<bytes>" each),
--               sent in turn, unchanged (ids repeat once the pool has been sent: fine for sinks that do not
--               deduplicate); packets=N packets per body, messages=M messages per packet, type= and
--               encoding= the Content-Type and Content-Encoding headers, answer= how to read an answer:
--               ingest (202: one packet), batch (200 {"accepted":n,...}) or otlp (200 ExportLogsServiceResponse:
--               empty when every record was taken, else partial_success.rejected_log_records).
-- packets_accepted counts the packets taken (from the answers: batch and OTLP answers say how many);
-- messages_unknown counts 2xx answers whose accepted messages cannot be told (a partial skewed batch).
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
local batch = 0          -- packets per generated request (0: one packet per POST /ingest)
local pool = nil         -- pre-formatted requests (pool mode)
local answer = "ingest"  -- how answers say what was taken: ingest, batch or otlp
local per_packet = 10    -- messages per packet; nil when they vary (skewed)
local per_request = 10   -- messages of a request when every packet of it was taken
local packets = 1        -- packets per request
-- per-thread globals read by done() via thread:get()
n202, n2xx, n429, n503, n503ra, nother, msgs202, pkts, unknown = 0, 0, 0, 0, 0, 0, 0, 0, 0

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

-- the pool file: "<length>\n<bytes>" per body; each formatted once into a whole request
local function load_pool(path, headers)
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  local requests, at = {}, 1
  while at <= #data do
    local newline = string.find(data, "\n", at, true)
    local length = tonumber(string.sub(data, at, newline - 1))
    requests[#requests + 1] = wrk.format("POST", nil, headers, string.sub(data, newline + 1, newline + length))
    at = newline + length + 1
  end
  return requests
end

function init(args)
  nonce = args[1] or tostring(os.time())
  skewed = args[2] == "skewed"
  conns = tonumber(args[3] or "0") or 0  -- global: done() reads it with thread:get
  local options = {}
  for i = 4, #args do
    local key, value = string.match(args[i], "^([%w_]+)=(.*)$")
    if key then options[key] = value end
  end
  arrays[5] = array(5, tid * 100)
  arrays[10] = array(10, tid * 100 + 20)
  arrays[20] = array(20, tid * 100 + 40)
  if skewed then per_packet = nil end
  batch = tonumber(options.batch or "0") or 0
  if batch > 0 then
    answer, packets, per_request = "batch", batch, 0
    for i = 1, batch do
      if skewed then per_request = per_request + ((i % 2 == 0) and 20 or 5) else per_request = per_request + 10 end
    end
  end
  if options.pool then
    local headers = {["Content-Type"] = options.type or "application/json"}
    if options.encoding and options.encoding ~= "" then headers["Content-Encoding"] = options.encoding end
    pool = load_pool(options.pool, headers)
    answer = options.answer or "ingest"
    packets = tonumber(options.packets or "1") or 1
    per_packet = tonumber(options.messages or "10") or 10
    per_request = packets * per_packet
  end
end

local headers = {["Content-Type"] = "application/json"}
local skewed_headers = {
  [5] = {["Content-Type"] = "application/json", ["X-Messages"] = "5"},
  [20] = {["Content-Type"] = "application/json", ["X-Messages"] = "20"},
}

local function line(n)
  counter = counter + 1
  return '{"emitter_id":"wrk-' .. tid .. '","packet_id":"wrk-' .. nonce .. '-' .. tid .. '-' .. counter ..
    '-m' .. n .. '","messages":' .. arrays[n] .. '}'
end

local batch_headers = {["Content-Type"] = "application/x-ndjson"}

function request()
  if pool then
    counter = counter + 1
    return pool[(counter + tid * 7) % #pool + 1]
  end
  if batch > 0 then
    local lines = {}
    for i = 1, batch do
      local n = 10
      if skewed then n = (i % 2 == 0) and 20 or 5 end
      lines[i] = line(n)
    end
    return wrk.format("POST", nil, batch_headers, table.concat(lines, "\n"))
  end
  local n = 10
  local h = headers
  if skewed then
    if (counter + 1) % 2 == 0 then n = 20 else n = 5 end
    h = skewed_headers[n]
  end
  return wrk.format("POST", nil, h, line(n))
end

-- partial_success.rejected_log_records of an ExportLogsServiceResponse (field 1 of field 1), or nil
local function otlp_rejected(body)
  local function varint(at)
    local value, scale = 0, 1
    while at <= #body do
      local byte = string.byte(body, at)
      value = value + (byte % 128) * scale
      at = at + 1
      if byte < 128 then return value, at end
      scale = scale * 128
    end
    return nil, at
  end
  if string.byte(body, 1) ~= 10 then return nil end
  local _, at = varint(2)
  if string.byte(body, at) ~= 8 then return 0 end  -- partial_success without a count: nothing rejected
  return (varint(at + 1))
end

-- a 200 to a batch or an OTLP export: how many packets (and messages) were taken
local function taken(body)
  if answer == "batch" then
    local n = tonumber(string.match(body, '"accepted":%s*(%d+)')) or 0
    pkts = pkts + n
    if string.find(body, '"rejected":[]', 1, true) then
      msgs202 = msgs202 + per_request
    elseif per_packet then
      msgs202 = msgs202 + n * per_packet
    else
      unknown = unknown + 1
    end
    return
  end
  local rejected = 0
  if #body > 0 then rejected = otlp_rejected(body) end
  if rejected == nil or rejected % per_packet ~= 0 then
    unknown = unknown + 1
    return
  end
  pkts = pkts + packets - math.floor(rejected / per_packet)  -- records are refused by whole packets
  msgs202 = msgs202 + per_request - rejected
end

function response(status, hdrs, body)
  if status == 202 then
    n202 = n202 + 1
    n2xx = n2xx + 1
    pkts = pkts + 1
    if pool then
      msgs202 = msgs202 + per_packet
    else
      local m = string.match(body, "%-m(%d+)\"")
      if m then msgs202 = msgs202 + tonumber(m) end
    end
  elseif status == 200 and answer ~= "ingest" then
    n2xx = n2xx + 1
    taken(body)
  elseif status >= 200 and status < 300 then
    n2xx = n2xx + 1
    pkts = pkts + 1
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
  local totals = {n202 = 0, n2xx = 0, n429 = 0, n503 = 0, n503ra = 0, nother = 0, msgs202 = 0, pkts = 0,
                  unknown = 0}
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
    {"packets_accepted", totals.pkts}, {"messages_unknown", totals.unknown},
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
