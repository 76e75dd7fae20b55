-- wrk script: POST pre-signed, unique webhook bodies, each wrk thread from its own file.
--
-- BENCH_BODIES=<prefix> : thread n (1-based) reads <prefix>.<n>, one request per line:
--   <X-Hub-Signature-256 value> TAB <JSON body>
-- Files are disjoint, so no body is ever sent twice. A thread that runs out stops itself
-- (counted as "exhausted" in the summary). done() prints one JSON line prefixed "BENCH_JSON ".

local counter = 1
local threads = {}

-- BENCH_TARGETS=<host:port>,<host:port>,... (optional): thread n connects to target n mod count, so one
-- wrk spreads its threads (and their connections) over several wacored nodes with no balancer.
local targets = {}
for target in (os.getenv("BENCH_TARGETS") or ""):gmatch("[^,]+") do
   table.insert(targets, target)
end

function setup(thread)
   thread:set("id", counter)
   if #targets > 0 then
      local host, port = targets[(counter - 1) % #targets + 1]:match("^(.+):(%d+)$")
      thread.addr = wrk.lookup(host, port)[1]
   end
   table.insert(threads, thread)
   counter = counter + 1
end

function init(args)
   -- Read lazily, one line per request: a thread's init runs while earlier threads already send, so
   -- a slow init would give those threads a head start outside wrk's measured duration.
   local prefix = os.getenv("BENCH_BODIES")
   file = assert(io.open(prefix .. "." .. id, "rb"))
   sent = 0
   exhausted = 0
   -- wrk calls request() once on its first thread to verify the script, and discards the result.
   verifying = (id == 1)
end

local headers = {["Content-Type"] = "application/json"}

function request()
   if verifying then
      verifying = false
      return wrk.format("GET", "/count")  -- discarded by wrk: keep the first body for a real send
   end
   local line = file:read("*l")
   if not line then
      exhausted = 1
      wrk.thread:stop()
      return wrk.format("GET", "/count")  -- not a webhook: never a duplicate
   end
   sent = sent + 1
   local tab = line:find("\t", 1, true)
   headers["X-Hub-Signature-256"] = line:sub(1, tab - 1)
   return wrk.format("POST", "/webhook", headers, line:sub(tab + 1))
end

function done(summary, latency, requests)
   local sent_total, exhausted_total = 0, 0
   for _, t in ipairs(threads) do
      sent_total = sent_total + t:get("sent")
      exhausted_total = exhausted_total + t:get("exhausted")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f},' ..
      '"sent":%d,"exhausted_threads":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean,
      sent_total, exhausted_total))
end
