-- wrk script: POST /ingest with ~1.8 KB packets of 10 messages and a unique packet_id per request.
-- wrk -t1 -c64 -d10s -s loadtest/wrk_ingest.lua http://127.0.0.1:8080/ingest
local threads = {}
local counter = 0
local tid = 0
local messages

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local parts = {}
  for i = 1, 10 do
    parts[i] = string.format(
      '{"timestamp":%d,"level":"INFO","message":"GET /api/v1/orders/%d completed in %d ms for user %d with status 200 OK",' ..
      '"metadata":{"service":"orders","host":"web-%d","request_id":"req-%08x","region":"eu-west-1","version":"2.14.3"}}',
      1764172800123 + i, 100000 + i, 10 + i, 5000 + i, i % 8, i * 7919)
  end
  messages = "[" .. table.concat(parts, ",") .. "]"
end

function request()
  counter = counter + 1
  local body = '{"emitter_id":"wrk-' .. tid .. '","packet_id":"wrk-' .. tid .. '-' .. counter .. '","messages":' .. messages .. '}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
  if status ~= 202 then
    wrk.thread:set("non202", (wrk.thread:get("non202") or 0) + 1)
  end
end

function done(summary, latency, requests)
  local non202 = 0
  for _, thread in ipairs(threads) do
    non202 = non202 + (thread:get("non202") or 0)
  end
  io.write(string.format("requests %d, non-202 %d\n", summary.requests, non202))
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("p%g %.2f ms\n", p, latency:percentile(p) / 1000))
  end
end
